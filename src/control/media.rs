//! From a [`Plan`] to what each client is told ([`MediaSend`] / [`MediaRecv`]) and what the
//! relay is given ([`Delivery`]): pure functions, no state, no IO.
//!
//! For one client X of a two-party call, `out` is the path of X's sending direction and `inn`
//! the path of its receiving direction ([`directions`]). Then:
//!
//! | path            | X sends (out)                        | X receives (inn)                       |
//! |-----------------|--------------------------------------|----------------------------------------|
//! | `DirectUdp`     | UDP to the peer's media address      | UDP from the peer's media address      |
//! | `UdpViaGateway` | UDP to the shard's UDP port          | UDP from the shard's UDP port          |
//! | `UdpInTcpOut`   | UDP to the shard's UDP port          | TCP (X's media connection to the shard)|
//! | `TcpInUdpOut`   | TCP to the shard's TCP port          | UDP from the shard's UDP port          |
//! | `TcpBoth`       | TCP to the shard's TCP port          | TCP                                    |
//!
//! X has a relay leg iff `out` or `inn` uses the gateway. The leg's [`Delivery`] (how the
//! gateway delivers *to* X) follows `inn`: none when X receives directly; TCP when X receives
//! over TCP; UDP to the source X bound with its STUN Binding ([`Delivery::UdpLatched`]) when X
//! can send UDP — its own Binding opened the reply path through its NAT or firewall — and
//! never to X's reported media address: an address a client merely reported is a candidate,
//! not a destination, so a client that cannot bind over UDP receives over TCP
//! ([`super::paths::start_path`]).
//!
//! Rooms and telephone routes are expressed with the same paths: a room member always goes
//! through the gateway ([`room_directions`]); the caller of a telephone route too
//! ([`route_plan`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::peer_policy::{Denial, PeerPolicy};
use super::planner::{Capabilities, Path, Plan};
use crate::metrics::Transport;
use crate::net::canonical;
use crate::relay_spec::Delivery;
use crate::wire::control::{MediaRecv, MediaSend};

/// RTP clock rate of every leg (G.711).
pub const CLOCK_RATE: u32 = 8000;
/// RTP payload type (0: G.711 µ-law).
pub const PAYLOAD_TYPE: u8 = 0;

/// A shard's media addresses as one client reaches the gateway: the IP the client's control
/// connection arrived at, with the shard's UDP and TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayAddrs {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
}

impl GatewayAddrs {
    pub fn new(ip: IpAddr, udp_port: u16, tcp_port: u16) -> Self {
        let ip = canonical(SocketAddr::new(ip, 0)).ip();
        GatewayAddrs {
            udp: SocketAddr::new(ip, udp_port),
            tcp: SocketAddr::new(ip, tcp_port),
        }
    }
}

/// `(out, inn)` for the caller (`forward` is its sending direction) or the callee.
pub const fn directions(plan: Plan, caller: bool) -> (Path, Path) {
    if caller {
        (plan.forward, plan.backward)
    } else {
        (plan.backward, plan.forward)
    }
}

/// Whether a client with these directions needs a relay leg.
pub const fn needs_leg(out: Path, inn: Path) -> bool {
    out.uses_gateway() || inn.uses_gateway()
}

/// How a client sends: `peer` is the other party's media address (for `DirectUdp`), `gw` the
/// shard's addresses (for every other path).
pub fn send_for(out: Path, peer: Option<SocketAddr>, gw: Option<GatewayAddrs>) -> MediaSend {
    match out {
        Path::DirectUdp => MediaSend {
            transport: Transport::Udp,
            to: peer,
            via_gateway: false,
        },
        Path::UdpViaGateway | Path::UdpInTcpOut => MediaSend {
            transport: Transport::Udp,
            to: gw.map(|g| g.udp),
            via_gateway: true,
        },
        Path::TcpInUdpOut | Path::TcpBoth => MediaSend {
            transport: Transport::Tcp,
            to: gw.map(|g| g.tcp),
            via_gateway: true,
        },
    }
}

/// How a client receives.
pub fn recv_for(inn: Path, peer: Option<SocketAddr>, gw: Option<GatewayAddrs>) -> MediaRecv {
    match inn {
        Path::DirectUdp => MediaRecv {
            transport: Transport::Udp,
            via_gateway: false,
            from: peer,
        },
        Path::UdpViaGateway | Path::TcpInUdpOut => MediaRecv {
            transport: Transport::Udp,
            via_gateway: true,
            from: gw.map(|g| g.udp),
        },
        Path::UdpInTcpOut | Path::TcpBoth => MediaRecv {
            transport: Transport::Tcp,
            via_gateway: true,
            from: None,
        },
    }
}

/// Why a media destination was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRefused {
    /// The peer policy ([`PeerPolicy`]) denies the address: which range, and why.
    Denied(SocketAddr, Denial),
    /// Unspecified, multicast, broadcast or port 0: never a media destination.
    NotUnicast(SocketAddr),
    /// The client gave no usable media address but the plan needs one.
    NoAddress,
    /// UDP delivery to a client that cannot bind (send UDP): its reported address is unproven.
    Unproven,
}

impl std::error::Error for PeerRefused {}

impl fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRefused::Denied(_, d) => write!(f, "media address {d}"),
            PeerRefused::NotUnicast(a) => write!(f, "media address {a} is not a unicast address"),
            PeerRefused::NoAddress => f.write_str("no media address for a UDP destination"),
            PeerRefused::Unproven => f.write_str(
                "UDP delivery to a reported address that no keyed binding proved (the client cannot send UDP)",
            ),
        }
    }
}

fn not_unicast(a: SocketAddr) -> bool {
    let ip = a.ip();
    a.port() == 0
        || ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether the gateway may send to `addr`, or tell a client to send to it: a unicast address
/// with a port, that `policy` allows.
pub fn check_peer(addr: SocketAddr, policy: &PeerPolicy) -> Result<SocketAddr, PeerRefused> {
    let addr = canonical(addr);
    if not_unicast(addr) {
        return Err(PeerRefused::NotUnicast(addr));
    }
    policy
        .check(addr.ip())
        .map_err(|d| PeerRefused::Denied(addr, d))?;
    Ok(addr)
}

/// A latched UDP delivery goes where the client's keyed Binding comes from, which is the address
/// the gateway observes it at: the peer policy applies there too (the shard applies it again to
/// every source it latches), so a call the gateway could not deliver is refused up front, with
/// the reason, instead of going silent.
pub fn check_latched(
    delivery: Delivery,
    observed: IpAddr,
    policy: &PeerPolicy,
) -> Result<(), PeerRefused> {
    if delivery == Delivery::UdpLatched {
        let at = canonical(SocketAddr::new(observed, 0));
        policy
            .check(at.ip())
            .map_err(|d| PeerRefused::Denied(at, d))?;
    }
    Ok(())
}

/// The media address to use for a client: the one it reported, with an unspecified IP
/// (`0.0.0.0` / `::`) replaced by the IP the gateway observes on its control connection. `None`
/// when it reported none, port 0, or a multicast/broadcast address.
pub fn resolve_media(reported: Option<SocketAddr>, observed: IpAddr) -> Option<SocketAddr> {
    let a = canonical(reported?);
    if a.port() == 0 {
        return None;
    }
    let a = if a.ip().is_unspecified() {
        canonical(SocketAddr::new(observed, a.port()))
    } else {
        a
    };
    (!not_unicast(a)).then_some(a)
}

/// The capabilities that count for one call: a client that gave no media address has no UDP
/// socket for it, so it sends and receives over TCP.
pub fn effective_caps(caps: Capabilities, media: Option<SocketAddr>) -> Capabilities {
    if media.is_some() {
        caps
    } else {
        Capabilities {
            send_udp: false,
            recv_udp: false,
            nat: caps.nat,
        }
    }
}

/// How the gateway delivers to a client whose receiving direction is `inn`.
pub fn delivery_for(
    inn: Path,
    caps: Capabilities,
    media: Option<SocketAddr>,
    policy: &PeerPolicy,
) -> Result<Delivery, PeerRefused> {
    if !inn.uses_gateway() {
        return Ok(Delivery::None);
    }
    match inn.receiver_transport() {
        Transport::Tcp => Ok(Delivery::Tcp),
        Transport::Udp if caps.send_udp => Ok(Delivery::UdpLatched),
        // Never to an address the client merely reported: the paths in force give such a
        // client TCP (`super::paths::start_path`); this is the guard behind that rule.
        Transport::Udp => {
            let _ = (media, policy);
            Err(PeerRefused::Unproven)
        }
    }
}

/// The binding the gateway must see before it can deliver to a leg with `delivery`: UDP for
/// [`Delivery::UdpLatched`] (it delivers to the source that bound), TCP for [`Delivery::Tcp`]
/// (it delivers on the bound connection); none for a fixed UDP address or no delivery. Until
/// that binding is in, media for the leg is dropped (`NoEgress`), which is why `media_ready`
/// waits for it.
pub const fn awaited_binding(delivery: Delivery) -> Option<Transport> {
    match delivery {
        Delivery::UdpLatched => Some(Transport::Udp),
        Delivery::Tcp => Some(Transport::Tcp),
        Delivery::Udp(_) | Delivery::None => None,
    }
}

/// A room member's `(out, inn)`: everything through the gateway, UDP where its firewall allows
/// (out: UDP if it can send UDP, else TCP; in: UDP if it can receive UDP, else TCP).
pub const fn room_directions(caps: Capabilities) -> (Path, Path) {
    let out = if caps.send_udp {
        Path::UdpViaGateway
    } else {
        Path::TcpBoth
    };
    // UDP in only to a member that binds its own source (it sends UDP): never to a reported
    // address (`super::paths`).
    let inn = if caps.recv_udp && caps.send_udp {
        Path::UdpViaGateway
    } else {
        Path::TcpBoth
    };
    (out, inn)
}

/// The plan of a call from a client (caller) to a telephone route: the caller's side always
/// goes through the gateway, UDP where its firewall allows and TCP otherwise; the gateway talks
/// UDP to the IP voice gateway.
pub const fn route_plan(caller: Capabilities) -> Plan {
    Plan {
        forward: if caller.send_udp {
            Path::UdpViaGateway
        } else {
            Path::TcpInUdpOut
        },
        backward: if caller.recv_udp && caller.send_udp {
            Path::UdpViaGateway
        } else {
            Path::UdpInTcpOut
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn private_ranges() {
        let deny = PeerPolicy::default();
        let allow = PeerPolicy::new(true, &[], &[]);
        for p in [
            "127.0.0.1:1",
            "10.1.2.3:1",
            "172.16.0.1:1",
            "172.31.255.255:1",
            "192.168.1.1:1",
            "169.254.0.1:1",
            "100.64.0.1:1",
            "[::1]:1",
            "[fd00::1]:1",
            "[fc00::1]:1",
            "[fe80::1]:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            match check_peer(a(p), &deny) {
                Err(PeerRefused::Denied(at, d)) => {
                    assert_eq!(at, canonical(a(p)));
                    assert_eq!(d.source, crate::control::peer_policy::Source::Private);
                }
                other => panic!("{p}: {other:?}"),
            }
            assert!(check_peer(a(p), &allow).is_ok(), "{p}");
        }
        for p in ["192.0.2.1:1", "172.32.0.1:1", "[2001:db8::1]:1"] {
            assert!(check_peer(a(p), &deny).is_ok(), "{p}");
        }
        // Special ranges stay shut with allow_private_peers.
        for p in ["198.18.0.1:1", "240.0.0.1:1", "0.1.2.3:1"] {
            assert!(check_peer(a(p), &allow).is_err(), "{p}");
        }
        for p in [
            "0.0.0.0:5",
            "224.0.0.1:5",
            "255.255.255.255:5",
            "192.0.2.1:0",
            "[ff02::1]:5",
            "[::]:5",
        ] {
            assert!(matches!(
                check_peer(a(p), &allow),
                Err(PeerRefused::NotUnicast(_))
            ));
        }
        assert_eq!(
            check_peer(a("127.0.0.1:4000"), &deny)
                .unwrap_err()
                .to_string(),
            "media address 127.0.0.1 is in a denied range (loopback 127.0.0.0/8); set allow_private_peers or allowed_peers"
        );
    }

    #[test]
    fn media_addresses_resolve_against_the_observed_ip() {
        let obs = a("198.51.100.7:1").ip();
        assert_eq!(
            resolve_media(Some(a("0.0.0.0:4000")), obs),
            Some(a("198.51.100.7:4000"))
        );
        assert_eq!(
            resolve_media(Some(a("[::]:4000")), obs),
            Some(a("198.51.100.7:4000"))
        );
        assert_eq!(
            resolve_media(Some(a("[::ffff:192.0.2.9]:4000")), obs),
            Some(a("192.0.2.9:4000"))
        );
        assert_eq!(resolve_media(Some(a("192.0.2.9:0")), obs), None);
        assert_eq!(resolve_media(Some(a("224.1.1.1:4000")), obs), None);
        assert_eq!(resolve_media(None, obs), None);
    }

    #[test]
    fn delivery_follows_the_receiving_direction() {
        let media = Some(a("192.0.2.5:4000"));
        let udp_both = Capabilities::new(true, true);
        let recv_only = Capabilities::new(false, true);
        assert_eq!(
            delivery_for(Path::DirectUdp, udp_both, media, &PeerPolicy::default()),
            Ok(Delivery::None)
        );
        assert_eq!(
            delivery_for(Path::UdpViaGateway, udp_both, media, &PeerPolicy::default()),
            Ok(Delivery::UdpLatched)
        );
        // A client that cannot send UDP never gets UDP at the address it reported.
        let open = PeerPolicy::new(true, &[], &[]);
        for m in [media, Some(a("10.0.0.5:4000")), None] {
            for policy in [&PeerPolicy::default(), &open] {
                assert_eq!(
                    delivery_for(Path::TcpInUdpOut, recv_only, m, policy),
                    Err(PeerRefused::Unproven)
                );
            }
        }
        for p in [Path::UdpInTcpOut, Path::TcpBoth] {
            assert_eq!(
                delivery_for(p, recv_only, None, &PeerPolicy::default()),
                Ok(Delivery::Tcp)
            );
        }
    }

    #[test]
    fn only_latched_udp_and_tcp_deliveries_wait_for_a_binding() {
        assert_eq!(awaited_binding(Delivery::UdpLatched), Some(Transport::Udp));
        assert_eq!(awaited_binding(Delivery::Tcp), Some(Transport::Tcp));
        assert_eq!(awaited_binding(Delivery::Udp(a("192.0.2.5:4000"))), None);
        assert_eq!(awaited_binding(Delivery::None), None);
    }

    #[test]
    fn route_and_room_paths_always_use_the_gateway() {
        for b in 0..8u8 {
            let caps = Capabilities {
                send_udp: b & 1 != 0,
                recv_udp: b & 2 != 0,
                nat: b & 4 != 0,
            };
            let p = route_plan(caps);
            assert!(p.forward.uses_gateway() && p.backward.uses_gateway());
            assert_eq!(
                p.forward.sender_transport() == Transport::Udp,
                caps.send_udp
            );
            assert_eq!(
                p.backward.receiver_transport() == Transport::Udp,
                caps.recv_udp && caps.send_udp
            );
            assert_eq!(p.forward.receiver_transport(), Transport::Udp);
            assert_eq!(p.backward.sender_transport(), Transport::Udp);
            let (out, inn) = room_directions(caps);
            assert!(out.uses_gateway() && inn.uses_gateway());
            assert_eq!(out.sender_transport() == Transport::Udp, caps.send_udp);
            assert_eq!(
                inn.receiver_transport() == Transport::Udp,
                caps.recv_udp && caps.send_udp
            );
        }
    }

    #[test]
    fn no_media_address_means_tcp_only() {
        let c = Capabilities::new(true, true).with_nat(true);
        assert_eq!(
            effective_caps(c, None),
            Capabilities::new(false, false).with_nat(true)
        );
        assert_eq!(effective_caps(c, Some(a("192.0.2.1:5"))), c);
    }
}
