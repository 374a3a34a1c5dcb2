//! Probing: can a client send UDP out through its firewall, receive UDP from outside, and is
//! it behind NAT? (Seed, "Determining Whether Voice Transmissions Are Blocked": the gateway
//! "sends a UDP packet … back to the internal computer system", and "the telephony
//! communication program … may be set up to always send a UDP transmission to the gateway
//! server. If this expected transmission is not received by the gateway server, it assumes that
//! the outgoing UDP voice transmissions are blocked".)
//!
//! Probes are STUN (RFC 8489) so any STUN client also learns its mapped address here:
//!
//! ```text
//!  client                                        gateway
//!        ◀── probe_begin{probe, port_a, port_b, token, timeout_ms} ── (control connection)
//!  probe socket ── Binding request (USERNAME=token, MI(token), FP) ──▶ port A
//!        ◀── Binding success (XOR-MAPPED-ADDRESS, MI(token), FP) ─── port A
//!        ── probe_local{probe, local} ──▶
//!              (after probe_local, and the Binding or probe_bind_wait)
//!        ◀── probe_repeats × Binding indication (USERNAME, MI, FP) ── ports A and B, 50 ms apart
//!        ◀── probe_check{probe, grace_ms} ──
//!        ── probe_report{probe, got_a, got_b} ──▶
//!        ◀── probe_result{probe, capabilities, mapped, translated} ──
//! ```
//!
//! The verdict ([`outcome`]):
//! - `send_udp`: the Binding request with the token arrived.
//! - `translated`: the mapped address (the Binding's source) differs from the `local` address
//!   the client reported (IP or port); with no Binding, the control connection's observed IP
//!   differs from `local`'s IP.
//! - `recv_udp = got_a || got_b`.
//! - `nat = translated || (got_a && !got_b)`. Our reading of the second term: datagrams from
//!   port A (where the client's Binding went) arrived but those from port B did not, so the
//!   client's firewall admits only *replies* to what the client sent (a stateful firewall or
//!   a restricted NAT). Such a receiver cannot take unsolicited UDP from a peer either, which
//!   is exactly what the planner's `nat` means ("a receiver behind NAT cannot take unsolicited
//!   UDP from the peer"), so directions towards it go through the gateway, which it reaches by
//!   replies to its own Binding (latched delivery).
//! - A client behind NAT (or reply-only) that cannot send UDP has no mapping the gateway could
//!   deliver on, and its reported address is not reachable from outside: it is reported as
//!   unable to receive UDP, so it receives over TCP.
//! - No `probe_report` within `probe_timeout` of `probe_begin`: `recv_udp = false` (what was
//!   not shown to work is not relied on; TCP always works), and the outcome is marked
//!   `reported: false` (a re-plan treats that as a failed probe). Without `probe_local`, no
//!   probe datagrams can be aimed and `translated` is unknown, taken as `false`; `recv_udp` is
//!   then false anyway.
//!
//! Every STUN Binding request on either port is answered (XOR-MAPPED-ADDRESS, FINGERPRINT, and
//! MESSAGE-INTEGRITY keyed by the token when it carried a valid running probe's token), and
//! so is a classic RFC 3489 Binding request (no magic cookie: MAPPED-ADDRESS, the whole
//! 16-byte transaction id echoed). Anything else is dropped without state or answer. Answers
//! are at most 76 bytes, and requests at least 20: the amplification of a plain STUN server,
//! no more; and answers without a running probe's token are limited per source prefix (a
//! token bucket per IPv4 /24 or IPv6 /64, `ProbeLimiter`), so the ports cannot be used to
//! reflect traffic at a victim network.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::gateway::{Action, ConnId, Gateway, Phase, ProbePort, Timer, later, millis, random_hex};
use super::planner::Capabilities;
use crate::net::canonical;
use crate::wire::control::ServerMsg;
use crate::wire::stun;

/// Datagrams longer than this are not parsed.
const MAX_PROBE_DATAGRAM: usize = 1500;

/// Answers one source prefix may get at once, and how fast its allowance refills.
const PROBE_BURST: f64 = 20.0;
const PROBE_PER_SECOND: f64 = 10.0;
/// Source prefixes tracked at most: a full table forgets prefixes whose bucket is full again
/// (idle), and if none is, refuses new prefixes until one is (bounded memory under a spoofed
/// flood from many prefixes; such a flood gets no answers rather than all of them).
const PROBE_PREFIXES: usize = 4096;

/// Token buckets per source prefix for answers to anonymous Bindings on the probe ports.
#[derive(Debug, Default)]
pub struct ProbeLimiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl ProbeLimiter {
    /// Whether a datagram from `src` may be answered at `now` (and takes a token if so).
    pub fn allow(&mut self, now: Instant, src: SocketAddr) -> bool {
        let prefix = probe_prefix(src);
        let refill = |tokens: f64, since: Instant| {
            let dt = now.saturating_duration_since(since).as_secs_f64();
            (tokens + dt * PROBE_PER_SECOND).min(PROBE_BURST)
        };
        if !self.buckets.contains_key(&prefix) && self.buckets.len() >= PROBE_PREFIXES {
            self.buckets
                .retain(|_, (t, at)| refill(*t, *at) < PROBE_BURST);
            if self.buckets.len() >= PROBE_PREFIXES {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(prefix).or_insert((PROBE_BURST, now));
        let t = refill(*tokens, *at);
        *at = now;
        if t >= 1.0 {
            *tokens = t - 1.0;
            true
        } else {
            *tokens = t;
            false
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// The prefix a source is limited by: its /24 (IPv4) or /64 (IPv6).
fn probe_prefix(src: SocketAddr) -> IpAddr {
    match canonical(src).ip() {
        IpAddr::V4(a) => {
            let o = a.octets();
            IpAddr::V4([o[0], o[1], o[2], 0].into())
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

/// One running probe of one client.
#[derive(Clone, Debug)]
pub struct Probe {
    pub id: u32,
    /// Random hex; USERNAME and MESSAGE-INTEGRITY key of the probe's STUN messages.
    pub token: String,
    pub started: Instant,
    /// From `probe_local`.
    pub local: Option<SocketAddr>,
    /// Source of the client's Binding request with the token.
    pub mapped: Option<SocketAddr>,
    pub stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for `probe_local`, and for the Binding or `probe_bind_wait`.
    Binding,
    /// Sending indications: `sent` rounds done, the next at `next`.
    Sending { sent: u32, next: Instant },
    /// `probe_check` sent; waiting for `probe_report`.
    Checking,
}

/// The result of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub probe: u32,
    pub capabilities: Capabilities,
    pub mapped: Option<SocketAddr>,
    pub translated: bool,
    /// The client sent its `probe_report` in time.
    pub reported: bool,
}

/// The verdict from what the probe saw (see the module docs). `observed` is the control
/// connection's peer address.
pub fn outcome(
    probe: u32,
    observed: SocketAddr,
    local: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    report: Option<(bool, bool)>,
) -> ProbeOutcome {
    let observed = canonical(observed);
    let send_udp = mapped.is_some();
    let translated = match local.map(canonical) {
        None => false,
        Some(l) => {
            // A client that reports an unspecified IP is taken at its word for the port only.
            let l = if l.ip().is_unspecified() {
                SocketAddr::new(observed.ip(), l.port())
            } else {
                l
            };
            match mapped.map(canonical) {
                Some(m) => m != l,
                None => observed.ip() != l.ip(),
            }
        }
    };
    let (got_a, got_b) = report.unwrap_or((false, false));
    let nat = translated || (got_a && !got_b);
    let recv_udp = (got_a || got_b) && (send_udp || !nat);
    ProbeOutcome {
        probe,
        capabilities: Capabilities {
            send_udp,
            recv_udp,
            nat,
        },
        mapped: mapped.map(canonical),
        translated,
        reported: report.is_some(),
    }
}

/// A Binding success response to the request `txid` from `src`; MESSAGE-INTEGRITY keyed by
/// `key` when given.
pub fn binding_response(txid: &[u8; 12], src: SocketAddr, key: Option<&[u8]>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 128];
    let mut w = stun::Writer::new(&mut buf, stun::Class::Success, stun::BINDING, txid).ok()?;
    w.xor_address(stun::attr::XOR_MAPPED_ADDRESS, canonical(src))
        .ok()?;
    if let Some(k) = key {
        w.message_integrity(k).ok()?;
    }
    w.fingerprint().ok()?;
    let n = w.finish();
    buf.get(..n).map(<[u8]>::to_vec)
}

/// A Binding indication carrying the probe token (USERNAME, MESSAGE-INTEGRITY, FINGERPRINT).
pub fn indication(token: &str, txid: &[u8; 12]) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut w = stun::Writer::new(&mut buf, stun::Class::Indication, stun::BINDING, txid).ok()?;
    w.attr(stun::attr::USERNAME, token.as_bytes()).ok()?;
    w.message_integrity(token.as_bytes()).ok()?;
    w.fingerprint().ok()?;
    let n = w.finish();
    buf.get(..n).map(<[u8]>::to_vec)
}

impl Probe {
    /// When this probe next needs attention.
    fn next_deadline(&self, cfg: &super::gateway::GatewayConfig) -> Instant {
        let end = later(self.started, cfg.probe_timeout);
        match self.stage {
            Stage::Binding if self.local.is_some() && self.mapped.is_none() => {
                later(self.started, cfg.probe_bind_wait).min(end)
            }
            Stage::Binding | Stage::Checking => end,
            Stage::Sending { next, .. } => next.min(end),
        }
    }
}

impl Gateway {
    /// Starts a probe of a logged-in client, unless one is running (then its result answers
    /// this request too).
    pub(crate) fn start_probe(&mut self, now: Instant, conn: ConnId) {
        if self.is_virtual(conn) {
            return; // a callee on another node: planned from the result its node sent
        }
        match self.session(conn) {
            Some(s) if s.probe.is_none() => {}
            _ => return,
        }
        let token = loop {
            let t = random_hex(&mut self.rng, 16);
            if !self.tokens.contains_key(&t) {
                break t;
            }
        };
        let Some(s) = self.session_mut(conn) else {
            return;
        };
        s.last_probe_id = s.last_probe_id.wrapping_add(1).max(1);
        let id = s.last_probe_id;
        let probe = Probe {
            id,
            token: token.clone(),
            started: now,
            local: None,
            mapped: None,
            stage: Stage::Binding,
        };
        let at = probe.next_deadline(&self.cfg);
        if let Some(s) = self.session_mut(conn) {
            s.probe = Some(probe);
        }
        self.tokens.insert(token.clone(), conn);
        self.timers.set(Timer::Probe(conn), at);
        let (port_a, port_b) = self.cfg.probe_ports;
        self.send(
            conn,
            ServerMsg::ProbeBegin {
                probe: id,
                port_a,
                port_b,
                token,
                timeout_ms: millis(self.cfg.probe_timeout),
            },
        );
    }

    /// The id of the client's running probe, starting one if none runs.
    pub(crate) fn ensure_probe(&mut self, now: Instant, conn: ConnId) -> Option<u32> {
        self.start_probe(now, conn);
        self.session(conn)?.probe.as_ref().map(|p| p.id)
    }

    pub(crate) fn on_probe_local(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: u32,
        local: SocketAddr,
    ) {
        match self.session_mut(conn).and_then(|s| s.probe.as_mut()) {
            Some(p) if p.id == id && p.local.is_none() => p.local = Some(canonical(local)),
            _ => {
                let msg = format!("probe_local for probe {id}, which is not waiting for it");
                return self.error(conn, crate::wire::control::ErrorCode::BadMessage, msg);
            }
        }
        self.advance_probe(now, conn);
    }

    pub(crate) fn on_probe_report(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: u32,
        got_a: bool,
        got_b: bool,
    ) {
        match self.session(conn).and_then(|s| s.probe.as_ref()) {
            Some(p) if p.id == id && p.stage == Stage::Checking => {
                self.finish_probe(now, conn, Some((got_a, got_b)));
            }
            _ => {
                let msg = format!("probe_report for probe {id}, which is not waiting for it");
                self.error(conn, crate::wire::control::ErrorCode::BadMessage, msg);
            }
        }
    }

    /// Moves a probe on as far as `now` allows, and re-arms its timer.
    pub(crate) fn advance_probe(&mut self, now: Instant, conn: ConnId) {
        let timed_out = match self.session(conn).and_then(|s| s.probe.as_ref()) {
            Some(p) => now >= later(p.started, self.cfg.probe_timeout),
            None => return,
        };
        if timed_out {
            return self.finish_probe(now, conn, None);
        }
        let Gateway {
            conns,
            cfg,
            rng,
            actions,
            timers,
            ..
        } = self;
        let Some(c) = conns.get_mut(&conn) else {
            return;
        };
        let observed = c.peer;
        let Phase::LoggedIn(s) = &mut c.phase else {
            return;
        };
        let Some(p) = s.probe.as_mut() else {
            return;
        };
        loop {
            match p.stage {
                Stage::Binding => {
                    let bind_done =
                        p.mapped.is_some() || now >= later(p.started, cfg.probe_bind_wait);
                    if p.local.is_none() || !bind_done {
                        break;
                    }
                    p.stage = Stage::Sending { sent: 0, next: now };
                }
                Stage::Sending { sent, next } => {
                    if sent >= cfg.probe_repeats {
                        actions.push_back(Action::Send {
                            conn,
                            msg: ServerMsg::ProbeCheck {
                                probe: p.id,
                                grace_ms: millis(cfg.probe_grace),
                            },
                        });
                        p.stage = Stage::Checking;
                        continue;
                    }
                    if now < next {
                        break;
                    }
                    // Aim at the mapped address when the Binding came, else at the observed
                    // IP with the reported local port (right unless a NAT translates).
                    let target = match (p.mapped, p.local) {
                        (Some(m), _) => m,
                        (None, Some(l)) => SocketAddr::new(observed.ip(), l.port()),
                        (None, None) => break,
                    };
                    for port in [ProbePort::A, ProbePort::B] {
                        let mut txid = [0u8; 12];
                        rand::RngCore::fill_bytes(rng, &mut txid);
                        if let Some(data) = indication(&p.token, &txid) {
                            actions.push_back(Action::ProbeSend {
                                port,
                                dst: target,
                                data,
                            });
                        }
                    }
                    p.stage = Stage::Sending {
                        sent: sent + 1,
                        next: later(now, cfg.probe_spacing),
                    };
                    if sent + 1 < cfg.probe_repeats {
                        break;
                    }
                }
                Stage::Checking => break,
            }
        }
        let at = p.next_deadline(cfg);
        timers.set(Timer::Probe(conn), at);
    }

    /// Ends the client's probe with the client's report (or `None`: timed out), tells the
    /// client, and lets its calls proceed.
    fn finish_probe(&mut self, now: Instant, conn: ConnId, report: Option<(bool, bool)>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let observed = c.peer;
        let Phase::LoggedIn(s) = &mut c.phase else {
            return;
        };
        let Some(p) = s.probe.take() else {
            return;
        };
        let out = outcome(p.id, observed, p.local, p.mapped, report);
        s.result = Some(out);
        let user = s.user.clone();
        self.tokens.remove(&p.token);
        self.timers.cancel(Timer::Probe(conn));
        self.counters.tally.probe(&out);
        tracing::debug!(conn, %user, ?out, "probe finished");
        self.send(
            conn,
            ServerMsg::ProbeResult {
                probe: out.probe,
                capabilities: out.capabilities,
                mapped: out.mapped,
                translated: out.translated,
            },
        );
        self.on_probe_done(now, conn, out);
        self.fleet_probe_done(conn);
    }

    /// A datagram on a probe port: answer STUN Binding requests, note probe Bindings.
    pub(crate) fn on_probe_datagram(
        &mut self,
        now: Instant,
        port: ProbePort,
        src: SocketAddr,
        data: &[u8],
    ) {
        if data.len() > MAX_PROBE_DATAGRAM {
            return;
        }
        if stun::is_rfc3489_binding_request(data) {
            // A classic client (RFC 3489: no magic cookie) gets MAPPED-ADDRESS, rate-limited.
            let src = canonical(src);
            if !self.probe_limiter.allow(now, src) {
                self.counters.probe_rate_limited += 1;
                return;
            }
            let mut buf = [0u8; 48];
            if let Ok(n) = stun::write_rfc3489_binding_response(&mut buf, data, src) {
                self.actions.push_back(Action::ProbeSend {
                    port,
                    dst: src,
                    data: buf[..n].to_vec(),
                });
            }
            return;
        }
        if !stun::looks_like_stun(data) {
            return;
        }
        let Ok(msg) = stun::Message::parse(data) else {
            return;
        };
        if msg.class() != stun::Class::Request
            || msg.method() != stun::BINDING
            || msg.check_fingerprint().is_err()
        {
            return;
        }
        let src = canonical(src);
        let probe = msg
            .username()
            .and_then(|u| std::str::from_utf8(u).ok())
            .and_then(|t| Some((t, *self.tokens.get(t)?)))
            .filter(|(t, _)| msg.check_integrity(t.as_bytes()).is_ok())
            .map(|(t, conn)| (t.to_owned(), conn));
        let key = probe.as_ref().map(|(t, _)| t.as_bytes());
        // A running probe's own Bindings are always answered (they are bounded by the
        // sessions); anonymous ones within the source prefix's allowance.
        if probe.is_none() && !self.probe_limiter.allow(now, src) {
            self.counters.probe_rate_limited += 1;
            return;
        }
        if let Some(data) = binding_response(msg.transaction_id(), src, key) {
            self.actions.push_back(Action::ProbeSend {
                port,
                dst: src,
                data,
            });
        }
        if let Some((_, conn)) = probe {
            if let Some(p) = self.session_mut(conn).and_then(|s| s.probe.as_mut())
                && p.mapped.is_none()
            {
                p.mapped = Some(src);
            }
            self.advance_probe(now, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    const OBS: &str = "203.0.113.10:50000";

    fn caps(o: ProbeOutcome) -> (bool, bool, bool) {
        let c = o.capabilities;
        (c.send_udp, c.recv_udp, c.nat)
    }

    #[test]
    fn verdicts_for_the_firewall_classes() {
        let public = Some(a("203.0.113.10:4000"));
        // Open: Binding arrived from the local address; A and B arrived.
        let o = outcome(1, a(OBS), public, public, Some((true, true)));
        assert_eq!(caps(o), (true, true, false));
        assert!(!o.translated && o.reported);
        // Send only.
        assert_eq!(
            caps(outcome(1, a(OBS), public, public, Some((false, false)))),
            (true, false, false)
        );
        // Receive only: no Binding; the datagrams went to observed IP + local port and arrived.
        let o = outcome(1, a(OBS), public, None, Some((true, true)));
        assert_eq!(caps(o), (false, true, false));
        assert!(!o.translated);
        // Blocked.
        assert_eq!(
            caps(outcome(1, a(OBS), public, None, Some((false, false)))),
            (false, false, false)
        );
    }

    #[test]
    fn nat_verdicts() {
        let local = Some(a("10.0.0.5:4000"));
        let mapped = Some(a("203.0.113.10:61000"));
        // Port-restricted NAT: replies from A arrive, B does not.
        let o = outcome(1, a(OBS), local, mapped, Some((true, false)));
        assert_eq!(caps(o), (true, true, true));
        assert!(o.translated);
        assert_eq!(o.mapped, mapped);
        // Full-cone NAT: both arrive; still translated.
        assert_eq!(
            caps(outcome(1, a(OBS), local, mapped, Some((true, true)))),
            (true, true, true)
        );
        // Port-preserving NAT: same port, other IP.
        let o = outcome(
            1,
            a(OBS),
            local,
            Some(a("203.0.113.10:4000")),
            Some((true, true)),
        );
        assert!(o.translated);
        // Stateful firewall, no translation: only replies admitted -> nat (reply-only).
        let public = Some(a("203.0.113.10:4000"));
        let o = outcome(1, a(OBS), public, public, Some((true, false)));
        assert_eq!(caps(o), (true, true, true));
        assert!(!o.translated);
        // NAT and no Binding: translated by the control connection's IP; no way to deliver
        // UDP, so recv_udp is false even if something came through.
        let o = outcome(1, a(OBS), local, None, Some((true, true)));
        assert_eq!(caps(o), (false, false, true));
        assert!(o.translated);
    }

    #[test]
    fn timeouts_and_missing_local() {
        let public = Some(a("203.0.113.10:4000"));
        let o = outcome(1, a(OBS), public, public, None);
        assert_eq!(caps(o), (true, false, false));
        assert!(!o.reported);
        let o = outcome(1, a(OBS), None, public, None);
        assert_eq!(caps(o), (true, false, false));
        assert!(!o.translated);
        // Unspecified local IP: only the port is compared.
        let o = outcome(
            1,
            a(OBS),
            Some(a("0.0.0.0:4000")),
            public,
            Some((true, true)),
        );
        assert!(!o.translated);
        // v4-mapped forms compare equal to IPv4.
        let o = outcome(
            1,
            a("[::ffff:203.0.113.10]:50000"),
            Some(a("[::ffff:203.0.113.10]:4000")),
            public,
            Some((true, true)),
        );
        assert!(!o.translated);
    }

    // ---- flows through the gateway (sim::World) ----

    use crate::control::gateway::Input;
    use crate::control::sim::{self, World};
    use crate::wire::control::{ClientMsg, ErrorCode};
    use std::time::Duration;

    fn result(msgs: &[ServerMsg]) -> Option<(Capabilities, Option<SocketAddr>, bool)> {
        msgs.iter().find_map(|m| match m {
            ServerMsg::ProbeResult {
                capabilities,
                mapped,
                translated,
                ..
            } => Some((*capabilities, *mapped, *translated)),
            _ => None,
        })
    }

    #[test]
    fn firewall_classes_through_the_gateway() {
        let cases = [
            ("open", sim::OPEN, (true, true, false), false),
            ("send only", sim::SEND_ONLY, (true, false, false), false),
            ("receive only", sim::RECV_ONLY, (false, true, false), false),
            ("blocked", sim::BLOCKED, (false, false, false), false),
            ("port-restricted NAT", sim::NAT, (true, true, true), true),
            ("full-cone NAT", sim::NAT_OPEN, (true, true, true), true),
            (
                "reply-only firewall",
                sim::REPLY_ONLY,
                (true, true, true),
                false,
            ),
        ];
        for (name, fw, want, translated) in cases {
            let mut w = World::new();
            let mut c = w.login_only("alice");
            c.fw = fw;
            let out = w.probe(&c);
            assert_eq!(caps(out), want, "{name}");
            assert_eq!(out.translated, translated, "{name}");
            let mapped = fw.send_udp.then(|| c.mapped(sim::PROBE_PORT));
            assert_eq!(out.mapped, mapped, "{name}");
            assert_eq!(w.gw.stats().probes_running, 0);
        }
    }

    #[test]
    fn indications_go_from_both_ports_50ms_apart_after_the_binding() {
        let mut w = World::new();
        let mut c = w.login_only("alice");
        c.fw = sim::NAT;
        let (probe, token) = w.probe_begin(c.conn);
        w.send_binding(&c, &token);
        // The Binding came but not probe_local: nothing is sent yet.
        w.advance_ms(700);
        assert!(w.take_probe_out().is_empty());
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(sim::PROBE_PORT),
            },
        );
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let out = w.take_probe_out();
            rounds.push(out);
            w.advance_ms(50);
        }
        for out in &rounds {
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].0, ProbePort::A);
            assert_eq!(out[1].0, ProbePort::B);
            for (_, dst, data) in out {
                assert_eq!(
                    *dst,
                    c.mapped(sim::PROBE_PORT),
                    "aimed at the mapped address"
                );
                let m = stun::Message::parse(data).expect("STUN");
                assert_eq!(m.class(), stun::Class::Indication);
                assert_eq!(m.username(), Some(token.as_bytes()));
                assert!(m.check_integrity(token.as_bytes()).is_ok());
                assert!(m.check_fingerprint().is_ok());
            }
        }
        assert!(w.take_probe_out().is_empty());
        let msgs = w.take(c.conn);
        assert!(
            matches!(msgs.as_slice(), [ServerMsg::ProbeCheck { probe: p, grace_ms: 300 }] if *p == probe)
        );
    }

    #[test]
    fn without_a_binding_the_probe_waits_then_aims_at_the_observed_ip() {
        let mut w = World::new();
        let c = w.login_only("alice");
        let (probe, _) = w.probe_begin(c.conn);
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(sim::PROBE_PORT),
            },
        );
        w.advance_ms(599);
        assert!(w.take_probe_out().is_empty());
        w.advance_ms(1);
        let out = w.take_probe_out();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1, SocketAddr::new(c.peer.ip(), sim::PROBE_PORT));
        w.advance_ms(100);
        assert_eq!(w.take_probe_out().len(), 4);
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::ProbeCheck { .. }]
        ));
        w.send(
            c.conn,
            ClientMsg::ProbeReport {
                probe,
                got_a: true,
                got_b: true,
            },
        );
        let (caps, mapped, translated) = result(&w.take(c.conn)).expect("result");
        assert_eq!(caps, Capabilities::new(false, true));
        assert_eq!((mapped, translated), (None, false));
    }

    #[test]
    fn timeouts() {
        // No report: recv_udp false at the probe timeout.
        let mut w = World::new();
        let c = w.login_only("alice");
        let (probe, token) = w.probe_begin(c.conn);
        w.send_binding(&c, &token);
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(sim::PROBE_PORT),
            },
        );
        w.advance_ms(1999);
        let msgs = w.take(c.conn);
        assert!(result(&msgs).is_none());
        w.advance_ms(1);
        let (caps, ..) = result(&w.take(c.conn)).expect("result at the timeout");
        assert_eq!(caps, Capabilities::new(true, false));
        assert_eq!(w.gw.stats().probes_running, 0);
        // A late report is out of order.
        w.send(
            c.conn,
            ClientMsg::ProbeReport {
                probe,
                got_a: true,
                got_b: true,
            },
        );
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }]
        ));
        // Nothing at all from the client: nothing sent on the probe ports, result at 2 s.
        let mut w = World::new();
        let c = w.login_only("bob");
        w.probe_begin(c.conn);
        w.advance_ms(2000);
        assert!(w.take_probe_out().is_empty());
        let (caps, mapped, translated) = result(&w.take(c.conn)).expect("result");
        assert_eq!(caps, Capabilities::new(false, false));
        assert_eq!((mapped, translated), (None, false));
    }

    #[test]
    fn report_before_check_and_wrong_ids_are_refused() {
        let mut w = World::new();
        let c = w.login_only("alice");
        let (probe, _) = w.probe_begin(c.conn);
        w.send(
            c.conn,
            ClientMsg::ProbeReport {
                probe,
                got_a: true,
                got_b: true,
            },
        );
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }]
        ));
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe: probe + 1,
                local: c.local(1),
            },
        );
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }]
        ));
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(1),
            },
        );
        w.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(2),
            },
        );
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }]
        ));
    }

    #[test]
    fn reprobe_reuses_a_running_probe_and_retires_old_tokens() {
        let mut w = World::new();
        let mut c = w.login_only("alice");
        c.fw = sim::SEND_ONLY;
        w.send(c.conn, ClientMsg::Reprobe);
        let msgs = w.take(c.conn);
        let begins: Vec<ServerMsg> = msgs
            .iter()
            .filter(|m| matches!(m, ServerMsg::ProbeBegin { .. }))
            .cloned()
            .collect();
        assert_eq!(begins.len(), 1, "{msgs:?}");
        w.inbox.entry(c.conn).or_default().extend(msgs);
        let first = w.probe(&c);
        let ServerMsg::ProbeBegin { token: old, .. } = begins[0].clone() else {
            unreachable!()
        };
        w.send(c.conn, ClientMsg::Reprobe);
        let (probe, token) = w.probe_begin(c.conn);
        assert_eq!(probe, first.probe + 1);
        assert_ne!(token, old);
        // The old token gets a plain answer (no MESSAGE-INTEGRITY) and marks nothing.
        let mut buf = [0u8; 256];
        let n = stun::write_binding_request(&mut buf, old.as_bytes(), old.as_bytes(), &[3; 12])
            .unwrap_or(0);
        w.input(Input::ProbeDatagram {
            port: ProbePort::A,
            src: c.mapped(sim::PROBE_PORT),
            data: buf[..n].to_vec(),
        });
        let out = w.take_probe_out();
        let m = stun::Message::parse(&out[0].2).expect("answered");
        assert_eq!(
            m.check_integrity(old.as_bytes()),
            Err(stun::StunError::MissingIntegrity)
        );
        let p =
            w.gw.session(c.conn)
                .and_then(|s| s.probe.clone())
                .expect("running");
        assert_eq!(p.mapped, None);
        w.advance(Duration::from_secs(2));
    }

    #[test]
    fn anonymous_bindings_are_rate_limited_per_source_prefix() {
        let mut w = World::new();
        let req = |id: u8| {
            let mut buf = [0u8; 64];
            let n = stun::Writer::new(&mut buf, stun::Class::Request, stun::BINDING, &[id; 12])
                .map(|w| w.finish())
                .unwrap_or(0);
            buf[..n].to_vec()
        };
        let send = |w: &mut World, src: &str, k: usize| {
            let mut answered = 0;
            for i in 0..k {
                w.input(Input::ProbeDatagram {
                    port: ProbePort::A,
                    src: a(src),
                    data: req(i as u8),
                });
                answered += w.take_probe_out().len();
            }
            answered
        };
        assert_eq!(
            send(&mut w, "198.51.100.7:1000", 100),
            20,
            "the burst, then nothing"
        );
        assert_eq!(
            send(&mut w, "198.51.100.200:9", 5),
            0,
            "same /24: same bucket"
        );
        assert_eq!(
            send(&mut w, "198.51.101.7:1000", 5),
            5,
            "another /24 is not affected"
        );
        w.advance(Duration::from_secs(1));
        assert_eq!(send(&mut w, "198.51.100.7:1000", 100), 10, "10 a second");
        assert_eq!(w.gw.counters.probe_rate_limited, 80 + 5 + 90);
        // Classic RFC 3489 requests share the allowance and get MAPPED-ADDRESS.
        w.advance(Duration::from_secs(5));
        let mut classic = vec![0, 1, 0, 0];
        classic.extend_from_slice(&[9; 16]);
        w.input(Input::ProbeDatagram {
            port: ProbePort::B,
            src: a("198.51.100.7:1000"),
            data: classic,
        });
        let out = w.take_probe_out();
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].2[4..20], &[9; 16]);
        assert_eq!(
            &out[0].2[20..32],
            &[0, 1, 0, 8, 0, 1, 0x03, 0xe8, 198, 51, 100, 7]
        );
    }

    #[test]
    fn the_limiter_table_is_bounded() {
        let mut l = ProbeLimiter::default();
        let t0 = Instant::now();
        for i in 0..(PROBE_PREFIXES as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(i << 8);
            let _ = l.allow(t0, SocketAddr::new(ip.into(), 1));
        }
        assert!(l.tracked() <= PROBE_PREFIXES);
        // Once idle prefixes refilled, new ones get room again.
        assert!(l.allow(t0 + Duration::from_secs(5), a("203.0.113.1:1")));
        assert!(l.tracked() <= PROBE_PREFIXES);
    }

    #[test]
    fn any_stun_client_learns_its_address_and_garbage_costs_nothing() {
        let mut w = World::new();
        let src = "203.0.113.99:3478".parse().unwrap_or_else(|_| a(OBS));
        // A bare Binding request (RFC 8489 client without credentials), on either port.
        for port in [ProbePort::A, ProbePort::B] {
            let mut buf = [0u8; 64];
            let n = stun::Writer::new(&mut buf, stun::Class::Request, stun::BINDING, &[5; 12])
                .map(|w| w.finish())
                .unwrap_or(0);
            w.input(Input::ProbeDatagram {
                port,
                src,
                data: buf[..n].to_vec(),
            });
            let out = w.take_probe_out();
            assert_eq!(out.len(), 1);
            assert_eq!((out[0].0, out[0].1), (port, src));
            let m = stun::Message::parse(&out[0].2).expect("STUN");
            assert_eq!(m.class(), stun::Class::Success);
            assert_eq!(m.transaction_id(), &[5; 12]);
            assert_eq!(m.xor_address(stun::attr::XOR_MAPPED_ADDRESS), Ok(Some(src)));
            assert!(m.check_fingerprint().is_ok());
        }
        // Garbage, indications, responses, bad fingerprints, other methods: no answer.
        let mut bad = vec![
            vec![0u8; 3],
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            indication("tok", &[1; 12]).unwrap_or_default(),
            binding_response(&[1; 12], src, None).unwrap_or_default(),
        ];
        let mut fp = binding_response(&[1; 12], src, None).unwrap_or_default();
        fp[0] = 0x00; // make it a request, which breaks the fingerprint
        bad.push(fp);
        let mut buf = [0u8; 64];
        let n = stun::Writer::new(&mut buf, stun::Class::Request, stun::ALLOCATE, &[5; 12])
            .map(|w| w.finish())
            .unwrap_or(0);
        bad.push(buf[..n].to_vec());
        bad.push(vec![0u8; 4000]);
        for data in bad {
            w.input(Input::ProbeDatagram {
                port: ProbePort::A,
                src,
                data,
            });
            assert!(w.take_probe_out().is_empty());
        }
        assert_eq!(w.gw.stats().connections, 0);
    }

    #[test]
    fn stun_messages_are_well_formed() {
        let txid = [7u8; 12];
        let r =
            binding_response(&txid, a("[::ffff:192.0.2.1]:5000"), Some(b"tok")).unwrap_or_default();
        let m = stun::Message::parse(&r).expect("parses");
        assert_eq!(m.class(), stun::Class::Success);
        assert_eq!(m.transaction_id(), &txid);
        assert_eq!(
            m.xor_address(stun::attr::XOR_MAPPED_ADDRESS),
            Ok(Some(a("192.0.2.1:5000")))
        );
        assert!(m.check_integrity(b"tok").is_ok());
        assert!(m.check_fingerprint().is_ok());
        assert!(r.len() <= 76);
        let r = binding_response(&txid, a("[2001:db8::1]:5000"), Some(b"tok")).unwrap_or_default();
        assert_eq!(r.len(), 76);
        let r = binding_response(&txid, a("192.0.2.1:5000"), None).unwrap_or_default();
        let m = stun::Message::parse(&r).expect("parses");
        assert_eq!(
            m.check_integrity(b"tok"),
            Err(stun::StunError::MissingIntegrity)
        );
        let i = indication("abcd", &txid).unwrap_or_default();
        let m = stun::Message::parse(&i).expect("parses");
        assert_eq!(m.class(), stun::Class::Indication);
        assert_eq!(m.username(), Some(&b"abcd"[..]));
        assert!(m.check_integrity(b"abcd").is_ok());
        assert!(m.check_fingerprint().is_ok());
    }
}
