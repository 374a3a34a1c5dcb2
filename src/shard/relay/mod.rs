//! The shard's forwarding core, with no IO of its own. This file: the session table (sessions,
//! legs, rooms) and the per-packet decision "forward to these destinations / drop (reason)",
//! with its admission budget. `binding`: authenticated bindings and validated latching. `tcp`:
//! TCP media connections (limits, deframing, bounded send queues). Both event loops (io_uring
//! and the epoll fallback) feed it the same events and carry out what it puts in the
//! [`Outbox`], so the two share every rule, and each rule lives in one place.
//!
//! Nothing here copies a payload, with one exception: a TCP frame that arrives spread over more
//! than two receive buffers (or a first STUN frame split across two) is gathered into a spare
//! buffer (`Counters::reassembly_copies`).
//!
//! Rules quoted from the design:
//! - "Destinations come only from the control plane: the gateway is never an open relay." A leg's
//!   media goes only to the legs of its own session, at the addresses the control plane gave or
//!   at a source address that proved the leg key with a STUN Binding (RFC 8489 §9.1 short-term
//!   credential: USERNAME = leg name, MESSAGE-INTEGRITY keyed by the leg key).
//! - "Packets from unbound sources are dropped and counted, and never answered with anything
//!   larger than what came in": an unauthenticated datagram gets no answer at all.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

mod binding;
mod tcp;
mod tls;
mod ws;

#[cfg(test)]
mod test_support;

use binding::Latch;
pub use binding::is_private;
pub use tcp::{Conn, ConnId};

use super::pool::{InFlight, Pool, Seg};
use crate::metrics::rtpstats::{RtpReport, RtpStats};
use crate::metrics::{Counters, DropReason, Flow};
use crate::wire::{framing, rtp, stun};

pub use crate::net::policy::PeerPolicy;
pub use crate::relay_spec::{Delivery, LegSpec, SessionId, SessionSpec};
type LegIdx = u32;

/// Longest leg name accepted (it travels as the STUN USERNAME).
pub const MAX_LEG_NAME: usize = 128;
/// Iovecs gathered into one TCP `sendmsg` (a frame takes two or three: length prefix + parts).
pub const TCP_IOV: usize = 128;
/// Transaction ids of recent Bindings remembered per leg: a Binding replayed from another
/// address is ignored.
const SEEN_TXIDS: usize = 8;
/// Default for [`Outbox::udp_budget`]: datagrams one turn may produce.
pub const DEFAULT_UDP_BUDGET: usize = 4096;
/// Frames one TCP receive buffer may have forwarded; the rest of that read is dropped
/// (counted as `SendBacklog`). A softphone sends 50 frames a second: a read with more is a
/// burst that would be stale anyway, or a flood.
pub const FRAMES_PER_READ: u32 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    #[error("session {0} already exists on this shard")]
    DuplicateSession(SessionId),
    #[error("leg name {0:?} is already in use on this shard")]
    DuplicateLeg(String),
    #[error("leg name {0:?} must be 1..={MAX_LEG_NAME} printable ASCII characters")]
    BadLegName(String),
    #[error("leg {0:?} has an empty key")]
    EmptyKey(String),
    #[error("a session needs 1..={max} legs, got {got}")]
    LegCount { got: usize, max: usize },
    #[error("no session {0} on this shard")]
    NoSession(SessionId),
    #[error("the shard holds its maximum of {0} sessions")]
    Full(usize),
    #[error("leg {leg:?}: address {addr} is IPv6 but the shard's socket is IPv4-only")]
    AddressFamily { leg: String, addr: SocketAddr },
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub max_frame: u16,
    /// Frames a TCP connection may have queued; beyond, RTP for that leg is dropped.
    pub tcp_queue_frames: usize,
    /// Frames all TCP queues together may hold (they pin receive buffers).
    pub tcp_queued_total: usize,
    pub max_unbound_tcp: usize,
    pub unbound_tcp_timeout_ns: u64,
    pub max_sessions: usize,
    pub max_legs_per_session: usize,
    /// The UDP socket is dual-stack (IPv6 with v4-mapped addresses) rather than IPv4-only.
    pub ipv6: bool,
    /// Unbound TCP connections one source IP (an IPv6 /64) may hold; a new one over the limit
    /// closes the one of that source that made the least progress (see
    /// [`Relay::on_accept`]). `[media] max_unbound_tcp_per_source`.
    pub max_unbound_tcp_per_source: usize,
    /// A connection accepted this recently that has sent nothing yet has not had its chance
    /// to: eviction takes it last (and the newest of such first), so a flood of fresh
    /// connections displaces itself, not a client whose Binding is on its way.
    pub unbound_tcp_grace_ns: u64,
    /// An unbound connection that sends nothing for this long is closed (the hard deadline
    /// from accept is `unbound_tcp_timeout_ns`).
    pub unbound_tcp_idle_ns: u64,
    /// Media older than this (kernel receive time to handling, or waiting in a TCP queue) is
    /// dropped; 0: never.
    pub stale_ns: u64,
    /// Which UDP sources a leg may latch onto (bind first, or move to after validation): the
    /// gateway's peer policy (`allow_private_peers`, `allowed_peers`, `denied_peers`), the same
    /// one the control core checks destinations against. Replaced live by
    /// [`Relay::set_peer_policy`] (SIGHUP); consulted only when a source (re)latches, never per
    /// packet.
    pub peer_policy: PeerPolicy,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_frame: 1500,
            tcp_queue_frames: 256,
            tcp_queued_total: 2048,
            max_unbound_tcp: 256,
            unbound_tcp_timeout_ns: 5_000_000_000,
            max_sessions: 100_000,
            max_legs_per_session: 64,
            ipv6: true,
            // A corporate NAT's phones setting up TCP media at the same instant share one
            // source: 64 lets them all bind, and a trickler still holds no more than that
            // (a newcomer closes the connection that made the least progress).
            max_unbound_tcp_per_source: 64,
            unbound_tcp_grace_ns: 200_000_000,
            unbound_tcp_idle_ns: 1_000_000_000,
            stale_ns: 300_000_000,
            peer_policy: PeerPolicy::new(true, &[], &[]),
        }
    }
}

/// A datagram to send on the shard's UDP socket: up to two parts (a TCP frame may straddle two
/// receive buffers), whose buffer references its [`InFlight`] token holds until the send
/// completes (the loop gives it back with `Pool::sent`).
#[derive(Debug)]
pub struct UdpOut {
    pub dst: SocketAddr,
    pub data: InFlight,
    /// The leg it is media for (None: an answer to a request, which goes to its source).
    /// A backend may keep a socket connected to each leg's address.
    pub leg: Option<u32>,
}

/// Something the control thread wants to know about a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardEvent {
    /// A leg proved its key and is bound: from now on media can be delivered to it over
    /// `transport` (sent when a leg binds, and when its source moves).
    LegBound {
        session: SessionId,
        /// Shared with the shard's leg table: no allocation per event.
        leg: std::sync::Arc<str>,
        transport: crate::metrics::Transport,
        source: SocketAddr,
    },
    /// A leg is gone (its session or the leg itself was removed): its final numbers, for the
    /// operator's per-leg quality metrics.
    LegEnded {
        session: SessionId,
        leg: String,
        /// Media received from this leg and sent to it.
        rx: Flow,
        tx: Flow,
        /// RTP quality of what this leg sent (jitter in units of `clock_rate`).
        rtp: RtpReport,
        clock_rate: u32,
    },
}

/// What the event loop must do after feeding events to the relay.
pub struct Outbox {
    pub udp: Vec<UdpOut>,
    /// Admission: the most datagrams `udp` may hold this turn (the loop sets it from its free
    /// send slots). Forwarding checks it before it takes a buffer reference, so the work one
    /// received buffer can cause is bounded before it is done.
    pub udp_budget: usize,
    /// Connections with frames queued that may need a send started.
    pub tcp_dirty: Vec<ConnId>,
    /// Connections to shut down (the loop then reaps them once no operation is in flight).
    pub close: Vec<ConnId>,
    /// Notifications for the control thread.
    pub events: Vec<ShardEvent>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            udp: Vec::new(),
            udp_budget: DEFAULT_UDP_BUDGET,
            tcp_dirty: Vec::new(),
            close: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl Outbox {
    /// Whether one more datagram fits this turn's budget.
    #[inline]
    pub fn udp_room(&self) -> bool {
        self.udp.len() < self.udp_budget
    }

    pub fn is_empty(&self) -> bool {
        self.udp.is_empty()
            && self.tcp_dirty.is_empty()
            && self.close.is_empty()
            && self.events.is_empty()
    }
}

struct Leg {
    session: SessionId,
    name: Rc<[u8]>,
    /// The name as the control thread gets it in events: shared, so a bind change costs the
    /// shard no allocation.
    event_name: Arc<str>,
    key: Box<[u8]>,
    delivery: Delivery,
    peers: Vec<LegIdx>,
    udp_src: Option<SocketAddr>,
    tcp: Option<ConnId>,
    clock_rate: u32,
    rx: Flow,
    tx: Flow,
    rtp: RtpStats,
    last_rx_ns: u64,
    backpressure_drops: u64,
    /// A new source of this leg waiting for its answer to the gateway's keyed check.
    latch: Option<Latch>,
    seen_txids: [[u8; 12]; SEEN_TXIDS],
    seen_next: usize,
}

/// What an operator (and the control thread) sees of one leg.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LegSnapshot {
    pub session: SessionId,
    pub name: String,
    pub udp_source: Option<SocketAddr>,
    pub tcp_peer: Option<SocketAddr>,
    pub rx: Flow,
    pub tx: Flow,
    pub rtp: RtpReport,
    /// Wall-clock nanoseconds of the last media packet from this leg (0: none yet).
    pub last_rx_ns: u64,
    pub backpressure_drops: u64,
}

pub struct Relay {
    cfg: RelayConfig,
    sessions: FxHashMap<SessionId, Vec<LegIdx>>,
    legs: Vec<Option<Leg>>,
    free_legs: Vec<LegIdx>,
    /// Keyed by the leg's own name (one allocation shared by the leg and the table).
    leg_by_name: FxHashMap<Rc<[u8]>, LegIdx>,
    udp_bindings: FxHashMap<SocketAddr, LegIdx>,
    conns: Vec<Option<Conn>>,
    conn_generation: Vec<u32>,
    free_conns: Vec<u32>,
    unbound_conns: usize,
    /// Unbound connections per source prefix (/32, or /64 for IPv6).
    unbound_by_source: FxHashMap<IpAddr, u32>,
    tcp_queued: usize,
    /// New sources waiting for validation: address -> leg.
    pending_latch: FxHashMap<SocketAddr, LegIdx>,
    /// The loop's clock at the start of this turn (the stale check's "now").
    now_ns: u64,
    pub counters: Counters,
    pub latency: Histogram<u64>,
    batch_rx: Vec<u64>,
}

use crate::metrics::dump::new_latency_histogram;

impl Relay {
    pub fn new(cfg: RelayConfig) -> Relay {
        let max_legs = cfg.max_sessions.saturating_mul(2);
        Relay {
            cfg,
            sessions: FxHashMap::default(),
            // Reserved, not touched: the table's pages become resident as legs fill it, and it
            // never moves (growing by doubling would leave each old copy behind in the heap).
            legs: Vec::with_capacity(max_legs),
            free_legs: Vec::new(),
            leg_by_name: FxHashMap::default(),
            udp_bindings: FxHashMap::default(),
            conns: Vec::new(),
            conn_generation: Vec::new(),
            free_conns: Vec::new(),
            unbound_conns: 0,
            unbound_by_source: FxHashMap::default(),
            tcp_queued: 0,
            pending_latch: FxHashMap::default(),
            now_ns: 0,
            counters: Counters::default(),
            latency: new_latency_histogram(),
            batch_rx: Vec::with_capacity(1024),
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn conn_count(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    pub fn tcp_queued_total(&self) -> usize {
        self.tcp_queued
    }

    /// The loop's clock at the start of a turn: media received (kernel timestamp) longer than
    /// `stale_ns` before it is dropped.
    #[inline]
    pub fn begin_turn(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
    }

    /// A new peer policy (the control thread's reload): from now on every UDP source that
    /// binds a leg, or a leg moves to (including validations already under way, checked again
    /// when their answer comes), must pass it. Legs already bound stay where they are: calls in
    /// progress are untouched by a reload.
    pub fn set_peer_policy(&mut self, policy: PeerPolicy) {
        self.cfg.peer_policy = policy;
    }

    /// Unbound TCP connections now counted against the limits.
    pub fn unbound_count(&self) -> usize {
        self.unbound_conns
    }

    // ---------------------------------------------------------------- sessions

    pub fn install(&mut self, spec: SessionSpec) -> Result<(), InstallError> {
        if self.sessions.contains_key(&spec.id) {
            return Err(InstallError::DuplicateSession(spec.id));
        }
        if self.sessions.len() >= self.cfg.max_sessions {
            return Err(InstallError::Full(self.cfg.max_sessions));
        }
        if spec.legs.is_empty() || spec.legs.len() > self.cfg.max_legs_per_session {
            return Err(InstallError::LegCount {
                got: spec.legs.len(),
                max: self.cfg.max_legs_per_session,
            });
        }
        for (i, l) in spec.legs.iter().enumerate() {
            self.validate_leg(l)?;
            if spec.legs[..i].iter().any(|o| o.name == l.name) {
                return Err(InstallError::DuplicateLeg(l.name.clone()));
            }
        }
        let idxs: Vec<LegIdx> = spec
            .legs
            .into_iter()
            .map(|l| self.create_leg(spec.id, l))
            .collect();
        for &i in &idxs {
            let peers = idxs.iter().copied().filter(|&p| p != i).collect();
            self.leg_mut(i).peers = peers;
        }
        self.sessions.insert(spec.id, idxs);
        Ok(())
    }

    fn validate_leg(&self, l: &LegSpec) -> Result<(), InstallError> {
        let ok_name = !l.name.is_empty()
            && l.name.len() <= MAX_LEG_NAME
            && l.name.bytes().all(|b| b.is_ascii_graphic());
        if !ok_name {
            return Err(InstallError::BadLegName(l.name.clone()));
        }
        if self.leg_by_name.contains_key(l.name.as_bytes()) {
            return Err(InstallError::DuplicateLeg(l.name.clone()));
        }
        if l.key.is_empty() {
            return Err(InstallError::EmptyKey(l.name.clone()));
        }
        if !self.cfg.ipv6 {
            let v6 = |a: &SocketAddr| matches!(canonical(*a), SocketAddr::V6(_));
            let bad = match l.delivery {
                Delivery::Udp(a) if v6(&a) => Some(a),
                _ => l.trusted_source.filter(v6),
            };
            if let Some(addr) = bad {
                return Err(InstallError::AddressFamily {
                    leg: l.name.clone(),
                    addr,
                });
            }
        }
        Ok(())
    }

    fn create_leg(&mut self, session: SessionId, l: LegSpec) -> LegIdx {
        let leg = Leg {
            session,
            event_name: Arc::from(l.name.as_str()),
            name: Rc::from(l.name.into_bytes()),
            key: l.key.into_boxed_slice(),
            delivery: match l.delivery {
                Delivery::Udp(a) => Delivery::Udp(canonical(a)),
                d => d,
            },
            peers: Vec::new(),
            udp_src: None,
            tcp: None,
            clock_rate: l.clock_rate.max(1),
            rx: Flow::default(),
            tx: Flow::default(),
            rtp: RtpStats::default(),
            last_rx_ns: 0,
            backpressure_drops: 0,
            latch: None,
            seen_txids: [[0; 12]; SEEN_TXIDS],
            seen_next: 0,
        };
        let idx = match self.free_legs.pop() {
            Some(i) => {
                self.legs[i as usize] = Some(leg);
                i
            }
            None => {
                self.legs.push(Some(leg));
                (self.legs.len() - 1) as LegIdx
            }
        };
        if let Some(src) = l.trusted_source {
            self.bind_udp(idx, canonical(src));
        }
        let name = self.leg(idx).name.clone();
        self.leg_by_name.insert(name, idx);
        idx
    }

    /// A participant joins a session (a conference room): it hears every leg, and every leg
    /// hears it.
    pub fn add_leg(&mut self, id: SessionId, leg: LegSpec) -> Result<(), InstallError> {
        let Some(members) = self.sessions.get(&id) else {
            return Err(InstallError::NoSession(id));
        };
        if members.len() >= self.cfg.max_legs_per_session {
            return Err(InstallError::LegCount {
                got: members.len() + 1,
                max: self.cfg.max_legs_per_session,
            });
        }
        self.validate_leg(&leg)?;
        let members = members.clone();
        let idx = self.create_leg(id, leg);
        for &m in &members {
            self.leg_mut(m).peers.push(idx);
        }
        self.leg_mut(idx).peers = members;
        if let Some(v) = self.sessions.get_mut(&id) {
            v.push(idx);
        }
        Ok(())
    }

    /// A participant leaves a session; its TCP connection is closed. Returns whether it was
    /// there.
    pub fn remove_leg(
        &mut self,
        pool: &mut Pool,
        id: SessionId,
        name: &str,
        out: &mut Outbox,
    ) -> bool {
        let Some(&idx) = self.leg_by_name.get(name.as_bytes()) else {
            return false;
        };
        let Some(members) = self.sessions.get_mut(&id) else {
            return false;
        };
        let Some(pos) = members.iter().position(|&m| m == idx) else {
            return false;
        };
        members.swap_remove(pos);
        let members = members.clone();
        for m in members {
            self.leg_mut(m).peers.retain(|&p| p != idx);
        }
        self.drop_leg(pool, idx, out);
        true
    }

    fn drop_leg(&mut self, pool: &mut Pool, i: LegIdx, out: &mut Outbox) {
        if let Some(c) = self.legs[i as usize].as_ref().and_then(|l| l.tcp) {
            self.close(pool, c, out);
        }
        let Some(leg) = self.legs[i as usize].take() else {
            return;
        };
        self.leg_by_name.remove(&leg.name);
        out.events.push(ShardEvent::LegEnded {
            session: leg.session,
            leg: String::from_utf8_lossy(&leg.name).into_owned(),
            rx: leg.rx,
            tx: leg.tx,
            rtp: leg.rtp.report(),
            clock_rate: leg.clock_rate,
        });
        if let Some(p) = &leg.latch
            && self.pending_latch.get(&p.addr) == Some(&i)
        {
            self.pending_latch.remove(&p.addr);
        }
        if let Some(src) = leg.udp_src
            && self.udp_bindings.get(&src) == Some(&i)
        {
            self.udp_bindings.remove(&src);
        }
        self.free_legs.push(i);
    }

    /// Removes a session; its TCP connections are put on `out.close`. Returns whether it existed.
    pub fn remove(&mut self, pool: &mut Pool, id: SessionId, out: &mut Outbox) -> bool {
        let Some(idxs) = self.sessions.remove(&id) else {
            return false;
        };
        for i in idxs {
            self.drop_leg(pool, i, out);
        }
        true
    }

    /// The legs of one session (none if it is unknown).
    pub fn session_legs(&self, id: SessionId) -> Vec<LegSnapshot> {
        self.sessions.get(&id).map_or_else(Vec::new, |idxs| {
            idxs.iter().map(|&i| self.leg_snapshot(id, i)).collect()
        })
    }

    fn leg_snapshot(&self, session: SessionId, i: LegIdx) -> LegSnapshot {
        let l = self.leg(i);
        LegSnapshot {
            session,
            name: String::from_utf8_lossy(&l.name).into_owned(),
            udp_source: l.udp_src,
            tcp_peer: l.tcp.and_then(|c| self.conn(c)).map(|c| c.peer),
            rx: l.rx,
            tx: l.tx,
            rtp: l.rtp.report(),
            last_rx_ns: l.last_rx_ns,
            backpressure_drops: l.backpressure_drops,
        }
    }

    pub fn snapshot_legs(&self) -> Vec<LegSnapshot> {
        let mut v = Vec::new();
        for (id, idxs) in &self.sessions {
            for &i in idxs {
                let l = self.leg(i);
                v.push(LegSnapshot {
                    session: *id,
                    name: String::from_utf8_lossy(&l.name).into_owned(),
                    udp_source: l.udp_src,
                    tcp_peer: l.tcp.and_then(|c| self.conn(c)).map(|c| c.peer),
                    rx: l.rx,
                    tx: l.tx,
                    rtp: l.rtp.report(),
                    last_rx_ns: l.last_rx_ns,
                    backpressure_drops: l.backpressure_drops,
                });
            }
        }
        v.sort_by(|a, b| (a.session, &a.name).cmp(&(b.session, &b.name)));
        v
    }

    fn leg(&self, i: LegIdx) -> &Leg {
        self.legs[i as usize]
            .as_ref()
            .expect("leg indices held by the table point at live legs")
    }

    fn leg_mut(&mut self, i: LegIdx) -> &mut Leg {
        self.legs[i as usize]
            .as_mut()
            .expect("leg indices held by the table point at live legs")
    }

    fn bind_udp(&mut self, i: LegIdx, src: SocketAddr) {
        if let Some(old) = self.leg(i).udp_src
            && old != src
            && self.udp_bindings.get(&old) == Some(&i)
        {
            self.udp_bindings.remove(&old);
        }
        if let Some(prev) = self.udp_bindings.insert(src, i)
            && prev != i
            && let Some(l) = self.legs[prev as usize].as_mut()
        {
            // The newest authenticated binding of an address wins.
            l.udp_src = None;
        }
        self.leg_mut(i).udp_src = Some(src);
    }

    // ---------------------------------------------------------------- UDP

    /// Media from `from`: one buffer reference per destination, the payload never copied.
    /// At most `budget` datagrams may be in the outbox (media from TCP gets half the turn's
    /// budget, so a flood of small frames on one connection cannot crowd out UDP calls).
    fn forward(
        &mut self,
        pool: &mut Pool,
        from: LegIdx,
        segs: &[Seg],
        rx_ns: u64,
        budget: usize,
        out: &mut Outbox,
    ) {
        let len: usize = segs.iter().map(|s| usize::from(s.len)).sum();
        {
            let first = pool.seg(segs[0]);
            let leg = self.legs[from as usize]
                .as_mut()
                .expect("bound legs are live");
            leg.rx.add(len);
            leg.last_rx_ns = rx_ns;
            if !rtp::is_rtcp(first)
                && let Ok(p) = rtp::RtpPacket::new_checked(first)
            {
                let arrival =
                    (u128::from(rx_ns) * u128::from(leg.clock_rate) / 1_000_000_000) as u64;
                leg.rtp
                    .on_packet(p.ssrc(), p.sequence(), p.timestamp(), arrival);
            }
        }
        // Whether any peer could take this packet at all (a full TCP queue still counts: that
        // drop is counted as backpressure, not as a missing egress).
        let mut delivered = false;
        let mut had_egress = false;
        let npeers = self.leg(from).peers.len();
        for k in 0..npeers {
            let peer = self.leg(from).peers[k];
            let (delivery, udp_src, tcp) = {
                let p = self.leg(peer);
                (p.delivery, p.udp_src, p.tcp)
            };
            let dst = match delivery {
                Delivery::None => continue,
                Delivery::UdpLatched => udp_src,
                Delivery::Udp(a) => Some(a),
                Delivery::Tcp => {
                    if let Some(c) = tcp {
                        had_egress = true;
                        delivered |= self.enqueue_frame(pool, peer, c, segs, rx_ns, out);
                    }
                    continue;
                }
            };
            let Some(dst) = dst else { continue };
            had_egress = true;
            if out.udp.len() >= budget.min(out.udp_budget) {
                // Admission: this turn's sends are spent. Checked before any reference is
                // taken, so a flood of tiny frames costs a bounded amount of work and memory.
                self.counters.drop(DropReason::SendBacklog);
                continue;
            }
            let Some(data) = pool.send_ref(segs) else {
                self.counters.drop(DropReason::SendError);
                continue;
            };
            out.udp.push(UdpOut {
                dst,
                data,
                leg: Some(peer),
            });
            self.counters.udp_out.add(len);
            self.leg_mut(peer).tx.add(len);
            delivered = true;
        }
        if delivered {
            self.batch_rx.push(rx_ns);
        } else if !had_egress {
            self.counters.drop(DropReason::NoEgress);
        }
    }

    /// Record relay latency for everything forwarded since the last call: `now_ns` is the time
    /// the sends are submitted.
    pub fn finish_batch(&mut self, now_ns: u64) {
        for &rx in &self.batch_rx {
            let _ = self.latency.record(now_ns.saturating_sub(rx).max(1));
        }
        self.batch_rx.clear();
    }

    pub fn take_latency(&mut self) -> Histogram<u64> {
        std::mem::replace(&mut self.latency, new_latency_histogram())
    }

    // ---------------------------------------------------------------- TCP
}

/// The canonical form of an address lives in the neutral `net` module (the control core uses
/// it too); re-exported here so existing paths keep compiling.
pub use crate::net::canonical;

#[cfg(test)]
mod tests {
    use super::tcp::QFrame;
    use super::test_support::{bind_t_by_hand, fd, leg, recv, sent_bytes};
    use super::*;
    use crate::shard::pool::PoolLayout;
    use proptest::prelude::*;

    fn pool() -> Pool {
        super::test_support::pool(64)
    }

    /// The loop's part: every send in the outbox completes and gives its references back.
    fn complete_sends(pool: &mut Pool, out: &mut Outbox) {
        for o in out.udp.drain(..) {
            pool.sent(o.data);
        }
    }

    fn frame_bytes(pool: &Pool, f: &QFrame) -> Vec<u8> {
        let mut v = f.hdr[..usize::from(f.hdr_len)].to_vec();
        for s in f.segs() {
            v.extend_from_slice(pool.seg(*s));
        }
        v
    }

    /// A TCP leg `t` bound without STUN (tests only), receiving from UDP leg `u` whose source
    /// is trusted.
    fn tcp_session(relay: &mut Relay, pool: &mut Pool, out: &mut Outbox) -> ConnId {
        relay
            .install(SessionSpec {
                id: 1,
                legs: vec![
                    leg("u", Delivery::UdpLatched, Some("192.0.2.1:1000")),
                    leg("t", Delivery::Tcp, None),
                ],
            })
            .unwrap();
        let c = relay
            .on_accept(pool, fd(), "192.0.2.2:2000".parse().unwrap(), 0, out)
            .unwrap();
        // Bind by hand, as tcp_stun does after a valid Binding.
        bind_t_by_hand(relay, c);
        c
    }

    #[test]
    fn udp_forwards_without_copy_and_unbound_sources_are_dropped() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        relay
            .install(SessionSpec {
                id: 7,
                legs: vec![
                    leg(
                        "a",
                        Delivery::Udp("192.0.2.9:9".parse().unwrap()),
                        Some("192.0.2.1:1"),
                    ),
                    leg("b", Delivery::Udp("192.0.2.8:8".parse().unwrap()), None),
                ],
            })
            .unwrap();
        let seg = recv(&mut pool, 0, &[0x80; 172]);
        relay.on_udp(&mut pool, "192.0.2.1:1".parse().unwrap(), seg, 5, &mut out);
        assert_eq!(out.udp.len(), 1);
        assert_eq!(out.udp[0].dst, "192.0.2.8:8".parse::<SocketAddr>().unwrap());
        assert_eq!(
            out.udp[0].data.segs(),
            [seg],
            "the same bytes, where they landed"
        );
        assert_eq!(pool.refs(0), 2, "the send holds a reference");
        pool.release(0);
        let seg = recv(&mut pool, 1, &[0x80; 172]);
        relay.on_udp(&mut pool, "192.0.2.77:1".parse().unwrap(), seg, 5, &mut out);
        assert_eq!(out.udp.len(), 1, "nothing for a stranger");
        assert_eq!(relay.counters.dropped(DropReason::Unbound), 1);
        // b has no source yet: its packets cannot come in, and a's have somewhere to go.
        relay.finish_batch(10);
        assert_eq!(relay.latency.len(), 1);
        complete_sends(&mut pool, &mut out);
        pool.release(1);
        assert_eq!(
            pool.refs(0),
            0,
            "the completed send gave its reference back"
        );
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.refused(), 0);
    }

    #[test]
    fn frames_split_across_reads_are_reassembled_in_order() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        let c = tcp_session(&mut relay, &mut pool, &mut out);
        // Three frames; deliver the stream in pieces of 1, 3, 150, 2, ... bytes.
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                (0..100 + i as usize * 50)
                    .map(|j| 0x80u8.wrapping_add(i).wrapping_add(j as u8))
                    .collect()
            })
            .collect();
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&(f.len() as u16).to_be_bytes());
            stream.extend_from_slice(f);
        }
        let cuts = [1usize, 3, 150, 2, 1, 1, 40, 500];
        let (mut at, mut k, mut id) = (0usize, 0usize, 64u16);
        while at < stream.len() {
            let n = cuts[k % cuts.len()].min(stream.len() - at);
            let seg = recv(&mut pool, id, &stream[at..at + n]);
            relay.on_tcp(&mut pool, c, seg, 1, &mut out);
            pool.release(id);
            at += n;
            k += 1;
            id += 1;
        }
        assert_eq!(relay.counters.tcp_in.packets, 3);
        let got: Vec<Vec<u8>> = out.udp.iter().map(|o| sent_bytes(&pool, &o.data)).collect();
        assert_eq!(got, frames);
        assert!(
            relay.counters.reassembly_copies >= 1,
            "a frame over 3+ reads was gathered"
        );
        // Releasing the sends frees everything: nothing leaks.
        for o in out.udp.drain(..) {
            pool.sent(o.data);
        }
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_full_tcp_queue_drops_rtp_and_counts_it() {
        let cfg = RelayConfig {
            tcp_queue_frames: 4,
            ..RelayConfig::default()
        };
        let mut relay = Relay::new(cfg);
        // Large enough that the per-connection share of the UDP group (an eighth of its queue
        // budget) is above the queue's own limit.
        let mut pool = Pool::new(PoolLayout {
            buf_size: 2048,
            udp: 256,
            tcp: 64,
            spare: 8,
        })
        .unwrap();
        let mut out = Outbox::default();
        let c = tcp_session(&mut relay, &mut pool, &mut out);
        for i in 0..10u16 {
            let seg = recv(&mut pool, i, &[0x80; 172]);
            relay.on_udp(
                &mut pool,
                "192.0.2.1:1000".parse().unwrap(),
                seg,
                0,
                &mut out,
            );
            pool.release(i);
        }
        assert_eq!(relay.conn(c).unwrap().queued(), 4);
        assert_eq!(relay.counters.dropped(DropReason::TcpBackpressure), 6);
        assert_eq!(relay.counters.dropped(DropReason::NoEgress), 0);
        assert_eq!(pool.in_use(), 4, "only queued frames pin buffers");
        // The queue is described as iovecs (prefix + payload) and retired as it is written.
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TCP_IOV];
        let n = relay.prepare_tcp_send(&mut pool, c, &mut iov);
        assert_eq!(n, 8);
        let first = frame_bytes(&pool, relay.conn(c).unwrap().queue.get(0).unwrap());
        assert_eq!(&first[..2], &172u16.to_be_bytes());
        relay.tcp_sent(&mut pool, c, 174 + 100);
        assert_eq!(
            relay.conn(c).unwrap().queued(),
            3,
            "a partly written frame stays"
        );
        relay.tcp_sent(&mut pool, c, 74 + 3 * 174);
        assert_eq!(relay.conn(c).unwrap().queued(), 0);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn an_oversize_frame_closes_the_connection_and_frees_its_buffers() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        let c = tcp_session(&mut relay, &mut pool, &mut out);
        // Half a frame (holds a buffer), then a header announcing 60000 bytes.
        let mut bytes = 200u16.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0x80; 50]);
        let seg = recv(&mut pool, 70, &bytes);
        relay.on_tcp(&mut pool, c, seg, 0, &mut out);
        pool.release(70);
        assert_eq!(pool.in_use(), 1, "the partial frame keeps its buffer");
        let mut bytes = vec![0x80; 150];
        bytes.extend_from_slice(&60_000u16.to_be_bytes());
        let seg = recv(&mut pool, 71, &bytes);
        relay.on_tcp(&mut pool, c, seg, 0, &mut out);
        pool.release(71);
        assert_eq!(out.close, vec![c]);
        assert_eq!(relay.counters.dropped(DropReason::BadFrame), 1);
        assert!(relay.reap(&mut pool, c).is_some());
        for o in out.udp.drain(..) {
            pool.sent(o.data);
        }
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn rooms_add_and_remove_participants() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        relay
            .install(SessionSpec {
                id: 3,
                legs: vec![
                    leg("p1", Delivery::UdpLatched, Some("192.0.2.1:1")),
                    leg("p2", Delivery::UdpLatched, Some("192.0.2.2:2")),
                ],
            })
            .unwrap();
        relay
            .add_leg(3, leg("p3", Delivery::UdpLatched, Some("192.0.2.3:3")))
            .unwrap();
        assert_eq!(
            relay.add_leg(3, leg("p3", Delivery::None, None)),
            Err(InstallError::DuplicateLeg("p3".into()))
        );
        assert_eq!(
            relay.add_leg(99, leg("p4", Delivery::None, None)),
            Err(InstallError::NoSession(99))
        );
        let seg = recv(&mut pool, 0, &[0x80; 100]);
        relay.on_udp(&mut pool, "192.0.2.1:1".parse().unwrap(), seg, 0, &mut out);
        assert_eq!(out.udp.len(), 2, "p1 reaches p2 and p3");
        assert!(relay.remove_leg(&mut pool, 3, "p2", &mut out));
        for o in out.udp.drain(..) {
            pool.sent(o.data);
        }
        relay.on_udp(&mut pool, "192.0.2.1:1".parse().unwrap(), seg, 0, &mut out);
        assert_eq!(out.udp.len(), 1, "p2 left");
        assert!(relay.remove(&mut pool, 3, &mut out));
        assert_eq!(relay.session_count(), 0);
        assert!(relay.leg_by_name.is_empty() && relay.udp_bindings.is_empty());
        complete_sends(&mut pool, &mut out);
    }

    #[test]
    fn over_its_limit_a_source_loses_its_connection_that_made_the_least_progress() {
        const MS: u64 = 1_000_000;
        let mut relay = Relay::new(RelayConfig {
            max_unbound_tcp_per_source: 4,
            unbound_tcp_grace_ns: 100 * MS,
            ..RelayConfig::default()
        });
        let mut pool = pool();
        let mut out = Outbox::default();
        let src: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let mut accept = |relay: &mut Relay, pool: &mut Pool, t: u64| {
            relay.on_accept(pool, fd(), src, t, &mut out).unwrap()
        };
        // Two connections start a handshake (a frame header and the first bytes of a
        // Binding), accepted before two that stay silent.
        let busy: Vec<ConnId> = (0..2).map(|_| accept(&mut relay, &mut pool, 0)).collect();
        let silent: Vec<ConnId> = (0..2)
            .map(|_| accept(&mut relay, &mut pool, 20 * MS))
            .collect();
        let mut out2 = Outbox::default();
        for (i, &c) in busy.iter().enumerate() {
            let seg = recv(&mut pool, 64 + i as u16, &[0, 100, 0, 1, 0, 80]);
            relay.on_tcp(&mut pool, c, seg, (10 + i as u64) * MS, &mut out2);
            pool.release(64 + i as u16);
        }
        let closing = |relay: &Relay, c: ConnId| relay.conn(c).is_none_or(|x| x.closing);
        // Past the grace, two newcomers close the silent two, not the older handshakes.
        let fresh: Vec<ConnId> = (0..2)
            .map(|i| accept(&mut relay, &mut pool, (500 + i) * MS))
            .collect();
        assert!(silent.iter().all(|&c| closing(&relay, c)));
        assert!(busy.iter().all(|&c| !closing(&relay, c)));
        // Within the newcomers' grace, the next one closes the handshake whose last bytes
        // are oldest, not a newcomer that has had no chance to send yet.
        let late = accept(&mut relay, &mut pool, 510 * MS);
        assert!(closing(&relay, busy[0]) && !closing(&relay, busy[1]));
        assert!(fresh.iter().all(|&c| !closing(&relay, c)));
        // When only fresh connections are left to choose from, a flood of them displaces its
        // own newest, not the earliest (whose Binding may be on its way).
        let seg = recv(&mut pool, 66, &[0, 100, 0, 1, 0, 80]);
        relay.on_tcp(&mut pool, busy[1], seg, 515 * MS, &mut out2);
        pool.release(66);
        let flood = accept(&mut relay, &mut pool, 520 * MS);
        assert!(
            closing(&relay, busy[1]),
            "sent bytes: goes before the fresh ones"
        );
        let _ = accept(&mut relay, &mut pool, 521 * MS);
        assert!(closing(&relay, flood), "the newest fresh connection");
        assert!(!closing(&relay, fresh[0]) && !closing(&relay, fresh[1]) && !closing(&relay, late));
        assert_eq!(
            relay.unbound_count(),
            4,
            "the accounting follows every close"
        );
        assert_eq!(relay.counters.dropped(DropReason::TcpConnLimit), 5);
    }

    #[test]
    fn rebinding_a_tcp_leg_does_not_lift_the_unbound_limit() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        relay
            .install(SessionSpec {
                id: 1,
                legs: vec![leg("t", Delivery::Tcp, None)],
            })
            .unwrap();
        for i in 0..5u16 {
            let c = relay
                .on_accept(
                    &mut pool,
                    fd(),
                    "192.0.2.2:2000".parse().unwrap(),
                    0,
                    &mut out,
                )
                .unwrap();
            assert_eq!(relay.unbound_count(), 1);
            let mut req = [0u8; 256];
            let n = stun::write_binding_request(&mut req, b"t", b"k", &[i as u8; 12]).unwrap();
            let mut frame = (n as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(&req[..n]);
            let seg = recv(&mut pool, 64 + i, &frame);
            relay.on_tcp(&mut pool, c, seg, 0, &mut out);
            pool.release(64 + i);
            assert_eq!(
                relay.unbound_count(),
                0,
                "bound (and the previous connection closed) without a second decrement"
            );
        }
        assert!(relay.unbound_by_source.is_empty());
    }

    #[test]
    fn stale_datagrams_are_dropped_and_counted() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        relay
            .install(SessionSpec {
                id: 1,
                legs: vec![
                    leg("a", Delivery::UdpLatched, Some("192.0.2.1:1")),
                    leg("b", Delivery::UdpLatched, Some("192.0.2.2:2")),
                ],
            })
            .unwrap();
        relay.begin_turn(1_000_000_000);
        let seg = recv(&mut pool, 0, &[0x80; 172]);
        relay.on_udp(
            &mut pool,
            "192.0.2.1:1".parse().unwrap(),
            seg,
            600_000_000,
            &mut out,
        );
        assert!(out.udp.is_empty(), "received 400 ms ago: stale");
        assert_eq!(relay.counters.dropped(DropReason::Stale), 1);
        relay.on_udp(
            &mut pool,
            "192.0.2.1:1".parse().unwrap(),
            seg,
            900_000_000,
            &mut out,
        );
        assert_eq!(out.udp.len(), 1, "100 ms old: forwarded");
        complete_sends(&mut pool, &mut out);
    }

    #[test]
    fn the_send_budget_is_checked_before_references_are_taken() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox {
            udp_budget: 3,
            ..Outbox::default()
        };
        let mut legs = vec![leg("src", Delivery::UdpLatched, Some("192.0.2.1:1"))];
        for i in 0..10 {
            legs.push(leg(
                &format!("r{i}"),
                Delivery::Udp(format!("192.0.2.9:{}", 100 + i).parse().unwrap()),
                None,
            ));
        }
        relay.install(SessionSpec { id: 1, legs }).unwrap();
        let seg = recv(&mut pool, 0, &[0x80; 172]);
        relay.on_udp(&mut pool, "192.0.2.1:1".parse().unwrap(), seg, 0, &mut out);
        assert_eq!(out.udp.len(), 3);
        assert_eq!(
            pool.refs(0),
            4,
            "one reference per admitted send, none more"
        );
        assert_eq!(relay.counters.dropped(DropReason::SendBacklog), 7);
        complete_sends(&mut pool, &mut out);
        assert_eq!(
            pool.refs(0),
            1,
            "each completion gave back exactly its own reference"
        );
    }

    #[test]
    fn reference_counts_hold_at_the_legal_extremes() {
        // buf_size 4096 with rooms of 64, and 16384 with rooms of 16: the most references
        // one buffer can gather is bounded by the budgets, far below the count's range.
        for (buf_size, room) in [(4096usize, 64usize), (16384, 16)] {
            let mut p = Pool::new(PoolLayout {
                buf_size,
                udp: 4,
                tcp: 4,
                spare: 8,
            })
            .unwrap();
            let r = p.received(0).unwrap();
            let frames = buf_size / 3; // 1-byte frames: 3 bytes each
            let holds = frames * (room - 1);
            let seg = [Seg::new(0, 0, 1)];
            let sends: Vec<_> = (0..holds)
                .map(|_| {
                    p.send_ref(&seg)
                        .expect("a reference below the count's range")
                })
                .collect();
            assert_eq!(
                p.refs(0) as usize,
                holds + 1,
                "no wrap at {buf_size}/{room}"
            );
            for t in sends {
                p.sent(t);
            }
            assert!(p.buf_mut(&r).is_some(), "held once again: ours alone");
            p.release_received(r);
            assert!(
                p.buf_mut_id(0).is_none(),
                "back to the kernel: not ours to write"
            );
        }
    }

    proptest! {
        /// Arbitrary datagrams and TCP byte streams (in arbitrary pieces) never panic, and
        /// once every send completes no buffer stays pinned.
        #[test]
        fn arbitrary_input_never_panics_or_leaks(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            stream in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(1usize..400, 1..20),
        ) {
            let mut relay = Relay::new(RelayConfig { max_frame: 600, tcp_queue_frames: 8, ..RelayConfig::default() });
            let mut pool = pool();
            let mut out = Outbox::default();
            let c = tcp_session(&mut relay, &mut pool, &mut out);
            let stranger = relay.on_accept(&mut pool, fd(), "192.0.2.3:3".parse().unwrap(), 0, &mut out).unwrap();
            // Like the kernel, hand out only buffers nobody references.
            let free = |pool: &Pool, range: std::ops::Range<u16>| range.clone().find(|&b| pool.refs(b) == 0).unwrap();
            for d in &datagrams {
                let id = free(&pool, 0..64);
                let seg = recv(&mut pool, id, d);
                let src = if d.len() % 2 == 0 { "192.0.2.1:1000" } else { "192.0.2.5:5" };
                relay.on_udp(&mut pool, src.parse().unwrap(), seg, 0, &mut out);
                pool.release(id);
                // Sends complete at once.
                for o in out.udp.drain(..) {
                    pool.sent(o.data);
                }
            }
            let mut at = 0;
            let mut k = 0;
            while at < stream.len() {
                let n = cuts[k % cuts.len()].min(stream.len() - at);
                for conn in [c, stranger] {
                    let b = free(&pool, 64..128);
                    let seg = recv(&mut pool, b, &stream[at..at + n]);
                    relay.on_tcp(&mut pool, conn, seg, 0, &mut out);
                    pool.release(b);
                }
                for o in out.udp.drain(..) {
                    pool.sent(o.data);
                }
                at += n;
                k += 1;
            }
            for conn in [c, stranger] {
                relay.close(&mut pool, conn, &mut out);
                let _ = relay.reap(&mut pool, conn);
            }
            prop_assert_eq!(pool.in_use(), 0);
            prop_assert!(relay.tcp_queued_total() == 0);
        }
    }
}
