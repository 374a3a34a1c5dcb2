//! Media path planning: the seed's Table 1 as a pure function.
//!
//! Given what each client's firewall lets through (as measured by the probes
//! right after log-in), [`plan`] decides, **per direction**, how RTP travels
//! from one client to the other. It owns nothing and does no IO; the call
//! state machine feeds it two [`Capabilities`] and acts on the [`Plan`].
//!
//! # The rule
//!
//! The seed, "Avoiding Firewall Security Measures": *"it is preferable to send
//! packets outside the TCP connection, using UDP, if UDP packets are allowed to
//! be passed through the firewall in at least one direction"*, and the slow TCP
//! transfer is *"used only for a short portion of the actual travel path"*.
//! So, for one direction from a sender S to a receiver R:
//!
//! - the **sender → gateway** segment is TCP iff S cannot send UDP;
//! - the **gateway → receiver** segment is TCP iff R cannot receive UDP;
//! - the direction goes **direct** (UDP, no gateway) iff S can send UDP, R can
//!   receive UDP, and R is not behind NAT.
//!
//! NAT, decided precisely:
//! - A **receiver behind NAT** cannot take unsolicited UDP from the peer: the
//!   peer knows no public address for it, and the NAT has no mapping for the
//!   peer. The gateway *can* reach it (the probe showed that: the client's own
//!   traffic to the gateway opened the mapping, and the gateway answers on it),
//!   so the direction goes [`Path::UdpViaGateway`].
//! - A **sender behind NAT** can still send directly to a receiver that has a
//!   public address and accepts UDP: its NAT maps the outgoing datagrams like
//!   any other, and RTP does not need the source address to be the one the
//!   sender reports. So sender-side NAT never forces the gateway.
//! - NAT never changes a segment's transport: a segment that is already TCP
//!   (client-initiated connection to the gateway) is unaffected, and a UDP
//!   segment to or from the gateway works through NAT (the probe proved it).
//!
//! `recv_udp` without NAT is read as the seed's probe reads it: the gateway
//! sent an unsolicited UDP packet and it arrived, so the firewall admits UDP
//! from outside, and a peer's UDP is admitted the same way.
//!
//! # TCP always goes through the gateway
//!
//! A TCP segment is always a connection *the client opens to the gateway*:
//! the seed's clients reach the gateway over TCP because *"most firewall
//! security systems allow TCP/IP data packets from the internal computer or
//! network to pass through the firewall"* (outbound). A firewall that drops
//! inbound UDP from unknown parties (Fig. 4a) drops inbound TCP connections
//! from them too, and the probes never measured inbound TCP from a peer. So
//! when both ends of a direction need TCP ([`Path::TcpBoth`]) the gateway is
//! the rendezvous both clients can reach, and it relays frames from one TCP
//! connection to the other. Each client sees the gateway as the seed says:
//! *"To each client, the gateway server appears to be a client that happens to
//! be able to receive either TCP or UDP."*
//!
//! # Table 1
//!
//! Table 1 describes each client as "Send X, receive Y". Mapping to
//! [`Capabilities`] `(send_udp, recv_udp)`:
//!
//! | seed's words           | `send_udp` | `recv_udp` | index |
//! |------------------------|-----------|-----------|-------|
//! | Send UDP, receive TCP  | true      | false     | 0     |
//! | Send TCP, receive UDP  | false     | true      | 1     |
//! | Send TCP, receive TCP  | false     | false     | 2     |
//! | Send UDP, receive UDP  | true      | true      | 3     |
//!
//! and case = 4 × index(Client 1) + index(Client 2) + 1 (Client 1 = caller).
//! This order is checked against the seed's figure captions (Figs. 5–12),
//! e.g. Fig. 7's case 5 is a caller that "does not allow UDP packets of the
//! caller to be sent, but allows UDP packets to be received" with a callee that
//! "can send UDP packets, but can not receive them".
//!
//! The plans, without NAT (`UDP→TCP` = [`Path::UdpInTcpOut`]: the sender sends
//! UDP to the gateway, which delivers over TCP; `TCP→UDP` =
//! [`Path::TcpInUdpOut`]; `TCP↔TCP` = [`Path::TcpBoth`]; `direct` =
//! [`Path::DirectUdp`]):
//!
//! | case | Client 1 (caller) | Client 2 (callee) | forward 1→2 | backward 2→1 | TCP conns   | seed mark |
//! |------|-------------------|-------------------|-------------|--------------|-------------|-----------|
//! | 1    | UDP out, TCP in   | UDP out, TCP in   | UDP→TCP     | UDP→TCP      | 1 and 2     |           |
//! | 2    | UDP out, TCP in   | TCP out, UDP in   | direct      | TCP↔TCP      | 1 and 2     | `*`       |
//! | 3    | UDP out, TCP in   | TCP out, TCP in   | UDP→TCP     | TCP↔TCP      | 1 and 2     |           |
//! | 4    | UDP out, TCP in   | UDP both          | direct      | UDP→TCP      | 1 only      | `+`       |
//! | 5    | TCP out, UDP in   | UDP out, TCP in   | TCP↔TCP     | direct       | 1 and 2     | `*`       |
//! | 6    | TCP out, UDP in   | TCP out, UDP in   | TCP→UDP     | TCP→UDP      | 1 and 2     |           |
//! | 7    | TCP out, UDP in   | TCP out, TCP in   | TCP↔TCP     | TCP→UDP      | 1 and 2     |           |
//! | 8    | TCP out, UDP in   | UDP both          | TCP→UDP     | direct       | 1 only      | `+`       |
//! | 9    | TCP both          | UDP out, TCP in   | TCP↔TCP     | UDP→TCP      | 1 and 2     |           |
//! | 10   | TCP both          | TCP out, UDP in   | TCP→UDP     | TCP↔TCP      | 1 and 2     |           |
//! | 11   | TCP both          | TCP both          | TCP↔TCP     | TCP↔TCP      | 1 and 2     | `*`       |
//! | 12   | TCP both          | UDP both          | TCP→UDP     | UDP→TCP      | 1 only      | `+`       |
//! | 13   | UDP both          | UDP out, TCP in   | UDP→TCP     | direct       | 2 only      |           |
//! | 14   | UDP both          | TCP out, UDP in   | direct      | TCP→UDP      | 2 only      |           |
//! | 15   | UDP both          | TCP both          | UDP→TCP     | TCP→UDP      | 2 only      |           |
//! | 16   | UDP both          | UDP both          | direct      | direct       | none        | `**`      |
//!
//! With NAT, every `direct` whose *receiver* is behind NAT becomes
//! [`Path::UdpViaGateway`]; nothing else changes.
//!
//! # Reading the footnotes
//!
//! **`+` (cases 4, 8, 12): "only one TCP connection is needed (to Client 1)".**
//! Holds exactly: Client 2 can send and receive UDP, so only Client 1's blocked
//! segments are TCP, and both of its directions share its one TCP connection.
//! This is also why the seed says Client 2 connects to the gateway "except in
//! cases 4, 8, 12, and 16". The seed is silent on the mirror cases 13, 14, 15,
//! which by the same rule need one TCP connection, to Client 2.
//!
//! **`*` (cases 2, 5, 11) and `**` (case 16): "a gateway server is only needed
//! if the client have problems with NAT".** These four are exactly the cases in
//! which, in both directions, the sender's transport equals the receiver's
//! (Client 1 sends what Client 2 receives and vice versa), i.e. the cases where
//! *no re-packaging* between UDP and TCP is needed. Read that way, the footnote
//! says the gateway's job as a *translator* is not needed there, and the seed
//! imagines the TCP directions as a direct TCP connection between the clients.
//!
//! That reading conflicts with the plain rule for the TCP directions: a direct
//! TCP connection requires one client to accept an inbound connection from the
//! other, which the same firewall that blocks inbound UDP blocks (see above),
//! and which no probe measured. The seed contradicts its own footnote here:
//! "Client 2 will, except in cases 4, 8, 12, and 16 above, also establish a
//! connection to the proxy server" — including cases 2, 5 and 11. So we follow
//! the plain rule:
//! - case 16 (`**`): both directions direct; the gateway is needed only for NAT
//!   (footnote holds exactly);
//! - cases 2 and 5 (`*`): the UDP direction is direct and needs the gateway only
//!   for NAT (footnote holds for that direction); the TCP direction goes
//!   [`Path::TcpBoth`] through the gateway, which relays between the two
//!   clients' TCP connections without re-packaging (footnote does not hold);
//! - case 11 (`*`): both directions [`Path::TcpBoth`] through the gateway
//!   (footnote does not hold; the gateway is a TCP relay, not a translator).

use serde::{Deserialize, Serialize};

use crate::wire::path::Transport;
pub use crate::wire::path::{Capabilities, Path, Plan};

impl Capabilities {
    /// Capabilities of a client with no NAT.
    pub const fn new(send_udp: bool, recv_udp: bool) -> Self {
        Capabilities {
            send_udp,
            recv_udp,
            nat: false,
        }
    }

    /// The same capabilities, behind NAT or not.
    pub const fn with_nat(self, nat: bool) -> Self {
        Capabilities { nat, ..self }
    }

    /// This client's row index in Table 1's per-client column (0..4, see the
    /// module docs).
    const fn table1_index(self) -> u8 {
        match (self.send_udp, self.recv_udp) {
            (true, false) => 0,
            (false, true) => 1,
            (false, false) => 2,
            (true, true) => 3,
        }
    }
}

impl Path {
    /// The path for one direction, from `sender` to `receiver` (the rule in
    /// the module docs).
    pub const fn between(sender: Capabilities, receiver: Capabilities) -> Path {
        match (sender.send_udp, receiver.recv_udp) {
            (true, true) if receiver.nat => Path::UdpViaGateway,
            (true, true) => Path::DirectUdp,
            (true, false) => Path::UdpInTcpOut,
            (false, true) => Path::TcpInUdpOut,
            (false, false) => Path::TcpBoth,
        }
    }

    /// Whether the media in this direction passes through the gateway.
    pub const fn uses_gateway(self) -> bool {
        !matches!(self, Path::DirectUdp)
    }

    /// The transport the sender uses (to the gateway, or to the peer if direct).
    pub const fn sender_transport(self) -> Transport {
        match self {
            Path::DirectUdp | Path::UdpViaGateway | Path::UdpInTcpOut => Transport::Udp,
            Path::TcpInUdpOut | Path::TcpBoth => Transport::Tcp,
        }
    }

    /// The transport the receiver receives on (from the gateway, or from the
    /// peer if direct).
    pub const fn receiver_transport(self) -> Transport {
        match self {
            Path::DirectUdp | Path::UdpViaGateway | Path::TcpInUdpOut => Transport::Udp,
            Path::UdpInTcpOut | Path::TcpBoth => Transport::Tcp,
        }
    }
}

impl Plan {
    /// Whether (the caller, the callee) needs a TCP media connection to the
    /// gateway: a client needs one iff it sends or receives over TCP in some
    /// direction. One connection carries both directions.
    pub const fn tcp_connections(&self) -> (bool, bool) {
        let caller = matches!(self.forward.sender_transport(), Transport::Tcp)
            || matches!(self.backward.receiver_transport(), Transport::Tcp);
        let callee = matches!(self.forward.receiver_transport(), Transport::Tcp)
            || matches!(self.backward.sender_transport(), Transport::Tcp);
        (caller, callee)
    }

    /// Whether either direction passes through the gateway (so the gateway
    /// must set up a relay session for this call).
    pub const fn uses_gateway(&self) -> bool {
        self.forward.uses_gateway() || self.backward.uses_gateway()
    }

    /// The case number (1..=16) of Table 1 for this caller and callee. NAT
    /// does not change the case. Total over today's [`Capabilities`]; an
    /// `Option` so that capabilities outside the table (e.g. a future
    /// "not yet probed") can say so.
    pub const fn table1_case(caller: Capabilities, callee: Capabilities) -> Option<u8> {
        Some(4 * caller.table1_index() + callee.table1_index() + 1)
    }
}

/// Plans a call between `caller` (the seed's Client 1) and `callee` (Client 2).
pub const fn plan(caller: Capabilities, callee: Capabilities) -> Plan {
    Plan {
        forward: Path::between(caller, callee),
        backward: Path::between(callee, caller),
    }
}

/// Which IP address families one client can use for media, as its announced media address (its
/// candidate) and its probe show. A client is single-family per call: its call socket has one
/// family (a v4-mapped IPv6 address counts as IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of an address (v4-mapped IPv6 is IPv4).
    pub fn of(addr: std::net::SocketAddr) -> Family {
        match addr.ip() {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Plans a call like [`plan`], aware of address families: a direction goes [`Path::DirectUdp`]
/// only when both ends have a media address of the same family (`families`: the caller's and
/// the callee's, `None` when unknown). Otherwise the two phones cannot reach each other (an
/// IPv6-only socket cannot send to an IPv4 address and vice versa) and the gateway bridges:
/// the direction goes [`Path::UdpViaGateway`] (the relay has sockets of both families).
/// Nothing else of Table 1 changes.
pub fn plan_across(
    caller: Capabilities,
    callee: Capabilities,
    families: (Option<Family>, Option<Family>),
) -> Plan {
    let p = plan(caller, callee);
    let meet = matches!(families, (Some(a), Some(b)) if a == b);
    if meet {
        return p;
    }
    let bridge = |d: Path| {
        if d == Path::DirectUdp {
            Path::UdpViaGateway
        } else {
            d
        }
    };
    Plan {
        forward: bridge(p.forward),
        backward: bridge(p.backward),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Path = Path::DirectUdp;
    const G: Path = Path::UdpViaGateway;
    const UT: Path = Path::UdpInTcpOut;
    const TU: Path = Path::TcpInUdpOut;
    const TT: Path = Path::TcpBoth;

    /// Table 1's per-client column, in the seed's words.
    const SEND_UDP_RECV_TCP: (bool, bool) = (true, false);
    const SEND_TCP_RECV_UDP: (bool, bool) = (false, true);
    const SEND_TCP_RECV_TCP: (bool, bool) = (false, false);
    const SEND_UDP_RECV_UDP: (bool, bool) = (true, true);

    struct Row {
        case: u8,
        caller: (bool, bool),
        callee: (bool, bool),
        /// Forward, without NAT and with the callee behind NAT.
        forward: (Path, Path),
        /// Backward, without NAT and with the caller behind NAT.
        backward: (Path, Path),
        /// TCP connection needed by (caller, callee).
        tcp: (bool, bool),
    }

    /// Written by hand from the seed's Table 1 and the rule in the module docs;
    /// not computed.
    #[rustfmt::skip]
    const TABLE1: [Row; 16] = [
        Row { case: 1,  caller: SEND_UDP_RECV_TCP, callee: SEND_UDP_RECV_TCP, forward: (UT, UT), backward: (UT, UT), tcp: (true, true) },
        Row { case: 2,  caller: SEND_UDP_RECV_TCP, callee: SEND_TCP_RECV_UDP, forward: (D, G),   backward: (TT, TT), tcp: (true, true) },
        Row { case: 3,  caller: SEND_UDP_RECV_TCP, callee: SEND_TCP_RECV_TCP, forward: (UT, UT), backward: (TT, TT), tcp: (true, true) },
        Row { case: 4,  caller: SEND_UDP_RECV_TCP, callee: SEND_UDP_RECV_UDP, forward: (D, G),   backward: (UT, UT), tcp: (true, false) },
        Row { case: 5,  caller: SEND_TCP_RECV_UDP, callee: SEND_UDP_RECV_TCP, forward: (TT, TT), backward: (D, G),   tcp: (true, true) },
        Row { case: 6,  caller: SEND_TCP_RECV_UDP, callee: SEND_TCP_RECV_UDP, forward: (TU, TU), backward: (TU, TU), tcp: (true, true) },
        Row { case: 7,  caller: SEND_TCP_RECV_UDP, callee: SEND_TCP_RECV_TCP, forward: (TT, TT), backward: (TU, TU), tcp: (true, true) },
        Row { case: 8,  caller: SEND_TCP_RECV_UDP, callee: SEND_UDP_RECV_UDP, forward: (TU, TU), backward: (D, G),   tcp: (true, false) },
        Row { case: 9,  caller: SEND_TCP_RECV_TCP, callee: SEND_UDP_RECV_TCP, forward: (TT, TT), backward: (UT, UT), tcp: (true, true) },
        Row { case: 10, caller: SEND_TCP_RECV_TCP, callee: SEND_TCP_RECV_UDP, forward: (TU, TU), backward: (TT, TT), tcp: (true, true) },
        Row { case: 11, caller: SEND_TCP_RECV_TCP, callee: SEND_TCP_RECV_TCP, forward: (TT, TT), backward: (TT, TT), tcp: (true, true) },
        Row { case: 12, caller: SEND_TCP_RECV_TCP, callee: SEND_UDP_RECV_UDP, forward: (TU, TU), backward: (UT, UT), tcp: (true, false) },
        Row { case: 13, caller: SEND_UDP_RECV_UDP, callee: SEND_UDP_RECV_TCP, forward: (UT, UT), backward: (D, G),   tcp: (false, true) },
        Row { case: 14, caller: SEND_UDP_RECV_UDP, callee: SEND_TCP_RECV_UDP, forward: (D, G),   backward: (TU, TU), tcp: (false, true) },
        Row { case: 15, caller: SEND_UDP_RECV_UDP, callee: SEND_TCP_RECV_TCP, forward: (UT, UT), backward: (TU, TU), tcp: (false, true) },
        Row { case: 16, caller: SEND_UDP_RECV_UDP, callee: SEND_UDP_RECV_UDP, forward: (D, G),   backward: (D, G),   tcp: (false, false) },
    ];

    fn caps((send_udp, recv_udp): (bool, bool), nat: bool) -> Capabilities {
        Capabilities {
            send_udp,
            recv_udp,
            nat,
        }
    }

    fn row(case: u8) -> &'static Row {
        &TABLE1[usize::from(case - 1)]
    }

    fn all_caps() -> impl Iterator<Item = Capabilities> {
        (0..8u8).map(|b| Capabilities {
            send_udp: b & 1 != 0,
            recv_udp: b & 2 != 0,
            nat: b & 4 != 0,
        })
    }

    #[test]
    fn table1_without_nat() {
        for (i, r) in TABLE1.iter().enumerate() {
            assert_eq!(usize::from(r.case), i + 1);
            let (caller, callee) = (caps(r.caller, false), caps(r.callee, false));
            let p = plan(caller, callee);
            assert_eq!(
                p,
                Plan {
                    forward: r.forward.0,
                    backward: r.backward.0
                },
                "case {}",
                r.case
            );
            assert_eq!(p.tcp_connections(), r.tcp, "case {}", r.case);
            assert_eq!(Plan::table1_case(caller, callee), Some(r.case));
        }
    }

    #[test]
    fn table1_every_nat_variant() {
        for r in &TABLE1 {
            for (caller_nat, callee_nat) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let (caller, callee) = (caps(r.caller, caller_nat), caps(r.callee, callee_nat));
                let p = plan(caller, callee);
                let forward = if callee_nat { r.forward.1 } else { r.forward.0 };
                let backward = if caller_nat {
                    r.backward.1
                } else {
                    r.backward.0
                };
                assert_eq!(
                    p,
                    Plan { forward, backward },
                    "case {} caller_nat={caller_nat} callee_nat={callee_nat}",
                    r.case
                );
                // NAT changes neither the case nor which TCP connections exist.
                assert_eq!(Plan::table1_case(caller, callee), Some(r.case));
                assert_eq!(p.tcp_connections(), r.tcp);
            }
        }
    }

    /// "In the fourth, eighth, and twelfth cases, only one TCP connection is
    /// needed (to Client 1)." Client 2 then needs no connection to the gateway
    /// at all for TCP, as the seed says for cases 4, 8, 12 and 16.
    #[test]
    fn footnote_plus_one_tcp_connection_to_client1() {
        for case in [4, 8, 12] {
            let r = row(case);
            for nat in [false, true] {
                let p = plan(caps(r.caller, nat), caps(r.callee, nat));
                assert_eq!(p.tcp_connections(), (true, false), "case {case}");
            }
        }
        // And no other case has exactly Client 1's connection.
        for r in TABLE1.iter().filter(|r| ![4, 8, 12].contains(&r.case)) {
            let p = plan(caps(r.caller, false), caps(r.callee, false));
            assert_ne!(p.tcp_connections(), (true, false), "case {}", r.case);
        }
        // Client 2 needs no TCP media connection exactly in 4, 8, 12, 16.
        let no_callee_tcp: Vec<u8> = TABLE1
            .iter()
            .filter(|r| {
                !plan(caps(r.caller, false), caps(r.callee, false))
                    .tcp_connections()
                    .1
            })
            .map(|r| r.case)
            .collect();
        assert_eq!(no_callee_tcp, [4, 8, 12, 16]);
    }

    /// `**` case 16: without NAT no gateway at all; with NAT the gateway only
    /// relays UDP (never TCP) towards the NATed receiver(s).
    #[test]
    fn footnote_double_star_case16_gateway_only_for_nat() {
        let r = row(16);
        assert!(!plan(caps(r.caller, false), caps(r.callee, false)).uses_gateway());
        assert_eq!(
            plan(caps(r.caller, true), caps(r.callee, false)),
            Plan {
                forward: D,
                backward: G
            }
        );
        assert_eq!(
            plan(caps(r.caller, false), caps(r.callee, true)),
            Plan {
                forward: G,
                backward: D
            }
        );
        assert_eq!(
            plan(caps(r.caller, true), caps(r.callee, true)),
            Plan {
                forward: G,
                backward: G
            }
        );
    }

    /// `*` cases 2, 5, 11 are the cases with no UDP/TCP re-packaging in either
    /// direction (with 16). Our reading: the UDP directions need the gateway
    /// only for NAT; the TCP directions still go through the gateway, which
    /// relays TCP to TCP (the plain rule; see the module docs).
    #[test]
    fn footnote_star_no_repackaging_but_tcp_still_relayed() {
        let same_transport_both_ways: Vec<u8> = TABLE1
            .iter()
            .filter(|r| {
                let p = plan(caps(r.caller, false), caps(r.callee, false));
                [p.forward, p.backward]
                    .iter()
                    .all(|d| d.sender_transport() == d.receiver_transport())
            })
            .map(|r| r.case)
            .collect();
        assert_eq!(same_transport_both_ways, [2, 5, 11, 16]);

        // Case 2: forward direct (gateway only for callee's NAT), backward TCP relay.
        let r = row(2);
        let p = plan(caps(r.caller, false), caps(r.callee, false));
        assert_eq!(
            p,
            Plan {
                forward: D,
                backward: TT
            }
        );
        assert_eq!(plan(caps(r.caller, false), caps(r.callee, true)).forward, G);
        // Case 5: the mirror image.
        let r = row(5);
        let p = plan(caps(r.caller, false), caps(r.callee, false));
        assert_eq!(
            p,
            Plan {
                forward: TT,
                backward: D
            }
        );
        assert_eq!(
            plan(caps(r.caller, true), caps(r.callee, false)).backward,
            G
        );
        // Case 11: TCP relay both ways, NAT or not.
        let r = row(11);
        for (a, b) in [(false, false), (true, true)] {
            assert_eq!(
                plan(caps(r.caller, a), caps(r.callee, b)),
                Plan {
                    forward: TT,
                    backward: TT
                }
            );
        }
    }

    /// The rule as invariants, over all 64 combinations of capabilities.
    #[test]
    fn invariants_exhaustive() {
        for caller in all_caps() {
            for callee in all_caps() {
                let p = plan(caller, callee);
                for (path, sender, receiver) in
                    [(p.forward, caller, callee), (p.backward, callee, caller)]
                {
                    // TCP on a segment iff that segment's UDP is blocked.
                    assert_eq!(path.sender_transport() == Transport::Tcp, !sender.send_udp);
                    assert_eq!(
                        path.receiver_transport() == Transport::Tcp,
                        !receiver.recv_udp
                    );
                    // Direct only when allowed, and always when allowed.
                    let direct_allowed = sender.send_udp && receiver.recv_udp && !receiver.nat;
                    assert_eq!(path == Path::DirectUdp, direct_allowed);
                    assert_eq!(path.uses_gateway(), !direct_allowed);
                    // Sender-side NAT never changes a direction.
                    assert_eq!(path, Path::between(sender.with_nat(!sender.nat), receiver));
                    // UdpViaGateway exactly for UDP-capable ends and a NATed receiver.
                    assert_eq!(
                        path == Path::UdpViaGateway,
                        sender.send_udp && receiver.recv_udp && receiver.nat
                    );
                }
                // A client needs a TCP connection iff it cannot do UDP one way.
                let (caller_tcp, callee_tcp) = p.tcp_connections();
                assert_eq!(caller_tcp, !(caller.send_udp && caller.recv_udp));
                assert_eq!(callee_tcp, !(callee.send_udp && callee.recv_udp));
                // Swapping roles swaps the directions.
                let q = plan(callee, caller);
                assert_eq!((q.forward, q.backward), (p.backward, p.forward));
                // Every combination is one of Table 1's 16 cases.
                let case = Plan::table1_case(caller, callee).unwrap_or(0);
                assert!((1..=16).contains(&case));
            }
        }
    }

    #[test]
    fn table1_cases_are_a_bijection() {
        let mut seen = [false; 16];
        for caller in all_caps().filter(|c| !c.nat) {
            for callee in all_caps().filter(|c| !c.nat) {
                let case = Plan::table1_case(caller, callee).unwrap_or(0);
                assert!((1..=16).contains(&case));
                let slot = &mut seen[usize::from(case - 1)];
                assert!(!*slot, "case {case} twice");
                *slot = true;
                assert_eq!((caller.send_udp, caller.recv_udp), row(case).caller);
                assert_eq!((callee.send_udp, callee.recv_udp), row(case).callee);
            }
        }
    }

    #[test]
    fn serde_names() {
        let json = serde_json::to_string(&Plan {
            forward: UT,
            backward: G,
        })
        .unwrap_or_default();
        assert_eq!(
            json,
            r#"{"forward":"udp_in_tcp_out","backward":"udp_via_gateway"}"#
        );
    }

    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn families_of_addresses() {
        assert_eq!(Family::of(sa("192.0.2.1:5")), Family::V4);
        assert_eq!(Family::of(sa("[::ffff:192.0.2.1]:5")), Family::V4);
        assert_eq!(Family::of(sa("[2001:db8::1]:5")), Family::V6);
    }

    /// Exhaustive: with families that meet, Table 1 unchanged; across families (or unknown),
    /// never a direct path, and exactly the direct directions go via the gateway.
    #[test]
    fn no_direct_path_across_address_families() {
        use Family::{V4, V6};
        for caller in all_caps() {
            for callee in all_caps() {
                let p = plan(caller, callee);
                for fams in [(Some(V4), Some(V4)), (Some(V6), Some(V6))] {
                    assert_eq!(plan_across(caller, callee, fams), p);
                }
                for fams in [
                    (Some(V4), Some(V6)),
                    (Some(V6), Some(V4)),
                    (None, Some(V4)),
                    (Some(V6), None),
                    (None, None),
                ] {
                    let q = plan_across(caller, callee, fams);
                    for (was, now) in [(p.forward, q.forward), (p.backward, q.backward)] {
                        assert_ne!(now, Path::DirectUdp, "{caller:?} {callee:?} {fams:?}");
                        if was == Path::DirectUdp {
                            assert_eq!(now, Path::UdpViaGateway);
                        } else {
                            assert_eq!(now, was);
                        }
                    }
                    // The bridge never adds a TCP connection.
                    assert_eq!(q.tcp_connections(), p.tcp_connections());
                }
            }
        }
        // Case 16, an IPv6-only caller and an IPv4-only callee: the gateway bridges both ways.
        let udp = Capabilities::new(true, true);
        assert_eq!(
            plan_across(udp, udp, (Some(V6), Some(V4))),
            Plan {
                forward: G,
                backward: G
            }
        );
    }
}
