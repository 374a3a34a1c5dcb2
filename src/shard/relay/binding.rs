//! Binding authentication: STUN Bindings that prove a leg key (RFC 8489 §9.1 short-term
//! credential: USERNAME = leg name, MESSAGE-INTEGRITY keyed by the leg key) bind a leg's UDP
//! source or TCP connection; a bound leg's new UDP source is validated with the gateway's own
//! keyed Binding request before media moves (quinn-style path validation with
//! anti-amplification), replayed Bindings are ignored, and the peer policy
//! ([`crate::net::policy`]: built-in special and private ranges, the operator's allowed and
//! denied prefixes) decides which sources a leg may latch onto.

use std::net::SocketAddr;

use super::{
    ConnId, DropReason, LegIdx, Outbox, Relay, SEEN_TXIDS, ShardEvent, UdpOut, canonical, stun,
};
use crate::net::policy::Source;
use crate::shard::pool::{Pool, Seg};

/// A new media source of a leg, not yet validated (quinn-style path validation): the gateway
/// sent it a Binding request keyed with the leg key and moves the leg there only when the
/// success response comes back from that address. Until then it sends that address at most
/// as many bytes as it received from it.
pub(super) struct Latch {
    pub(super) addr: SocketAddr,
    pub(super) txid: [u8; 12],
    pub(super) received: usize,
    pub(super) sent: usize,
}

pub(super) fn is_binding_success(msg: &[u8]) -> bool {
    // Type 0x0101: Binding success response (RFC 8489 §5).
    msg.len() >= stun::HEADER_LEN && msg[0] == 0x01 && msg[1] == 0x01
}

pub use crate::net::is_private;

impl Relay {
    /// A datagram arrived on the shard's UDP socket; `seg` is its payload in the pool, and the
    /// caller holds one reference to the buffer (released by the caller after this returns).
    pub fn on_udp(
        &mut self,
        pool: &mut Pool,
        src: SocketAddr,
        seg: Seg,
        rx_ns: u64,
        out: &mut Outbox,
    ) {
        let src = canonical(src);
        let len = usize::from(seg.len);
        self.counters.udp_in.add(len);
        if self.cfg.stale_ns > 0 && self.now_ns > rx_ns.saturating_add(self.cfg.stale_ns) {
            // Waited in the socket longer than a listener can use: late voice is useless.
            self.counters.drop(DropReason::Stale);
            return;
        }
        let bound = self.udp_bindings.get(&src).copied();
        if stun::looks_like_stun(pool.seg(seg)) {
            self.udp_stun(pool, src, seg, bound, out);
            return;
        }
        match bound {
            Some(leg) => self.forward(pool, leg, &[seg], rx_ns, out.udp_budget, out),
            None => self.counters.drop(DropReason::Unbound),
        }
    }

    pub(super) fn udp_stun(
        &mut self,
        pool: &mut Pool,
        src: SocketAddr,
        seg: Seg,
        bound: Option<LegIdx>,
        out: &mut Outbox,
    ) {
        if self.pending_latch.contains_key(&src) && is_binding_success(pool.seg(seg)) {
            self.latch_answer(pool.seg(seg), src, out);
            return;
        }
        let Some((leg, txid)) = self.authenticate(pool.seg(seg), bound.is_some()) else {
            return;
        };
        let current = self.leg(leg).udp_src;
        let replayed = self.leg(leg).seen_txids.contains(&txid);
        if replayed && current != Some(src) {
            // A Binding seen before, from another address: a capture replayed to steal the
            // leg (or amplify toward a victim). Ignored; a retransmission from the bound
            // source is answered below, unchanged.
            self.counters.drop(DropReason::LatchPending);
            return;
        }
        if !replayed {
            let l = self.leg_mut(leg);
            let k = l.seen_next % SEEN_TXIDS;
            l.seen_txids[k] = txid;
            l.seen_next = (k + 1) % SEEN_TXIDS;
        }
        if current != Some(src) {
            if !self.may_latch(src) {
                return;
            }
            if current.is_some() {
                // A change of source is validated before media moves (`Latch`).
                self.challenge(pool, leg, src, seg, txid, out);
                return;
            }
            // The first binding of a leg: the Binding's MESSAGE-INTEGRITY proves the key.
            self.bind_udp(leg, src);
            self.push_bound(leg, crate::metrics::Transport::Udp, src, out);
        }
        self.answer_in_place(pool, leg, src, seg, &txid, out);
    }

    /// Answer a Binding in place: the request's own buffer holds the response (the caller's
    /// reference is the only one, so the bytes are ours to overwrite).
    pub(super) fn answer_in_place(
        &mut self,
        pool: &mut Pool,
        leg: LegIdx,
        src: SocketAddr,
        seg: Seg,
        txid: &[u8; 12],
        out: &mut Outbox,
    ) -> usize {
        if !out.udp_room() {
            self.counters.drop(DropReason::SendBacklog);
            return 0;
        }
        let start = usize::from(seg.off);
        let key = &self.leg(leg).key;
        let n = pool
            .buf_mut_id(seg.buf)
            .and_then(|b| b.get_mut(start..))
            .and_then(|b| stun::write_binding_success(b, txid, src, key).ok());
        let Some(n) = n else {
            self.counters.drop(DropReason::BadStun);
            return 0;
        };
        self.counters.bindings += 1;
        let Some(data) = pool.send_ref(&[Seg::new(seg.buf, start, n)]) else {
            self.counters.drop(DropReason::SendError);
            return 0;
        };
        out.udp.push(UdpOut {
            dst: src,
            data,
            leg: None,
        });
        self.counters.udp_out.add(n);
        n
    }

    pub(super) fn push_bound(
        &mut self,
        leg: LegIdx,
        transport: crate::metrics::Transport,
        source: SocketAddr,
        out: &mut Outbox,
    ) {
        let l = self.leg(leg);
        out.events.push(ShardEvent::LegBound {
            session: l.session,
            leg: l.event_name.clone(),
            transport,
            source,
        });
    }

    /// A bound leg's Binding came from a new source: check that source with a Binding request
    /// of our own (fresh transaction id, keyed with the leg key), within the anti-amplification
    /// limit, and answer the client's Binding if the limit leaves room.
    pub(super) fn challenge(
        &mut self,
        pool: &mut Pool,
        leg: LegIdx,
        src: SocketAddr,
        seg: Seg,
        txid: [u8; 12],
        out: &mut Outbox,
    ) {
        let got = usize::from(seg.len);
        let same = self.leg(leg).latch.as_ref().is_some_and(|p| p.addr == src);
        if same {
            if let Some(p) = self.leg_mut(leg).latch.as_mut() {
                p.received += got;
            }
        } else {
            if let Some(old) = self.leg_mut(leg).latch.take()
                && self.pending_latch.get(&old.addr) == Some(&leg)
            {
                self.pending_latch.remove(&old.addr);
            }
            if let Some(other) = self.pending_latch.insert(src, leg)
                && other != leg
                && let Some(o) = self.legs[other as usize].as_mut()
            {
                o.latch = None;
            }
            self.leg_mut(leg).latch = Some(Latch {
                addr: src,
                txid: rand::random(),
                received: got,
                sent: 0,
            });
        }
        let Some((check_txid, budget)) = self
            .leg(leg)
            .latch
            .as_ref()
            .map(|p| (p.txid, p.received.saturating_sub(p.sent)))
        else {
            return;
        };
        // The check goes into a spare: the request's buffer will hold our answer.
        let mut spent = 0;
        if out.udp_room()
            && let Some(spare) = pool.take_spare()
        {
            let n = {
                let l = self.leg(leg);
                pool.buf_mut(&spare)
                    .and_then(|b| stun::write_binding_request(b, &l.name, &l.key, &check_txid).ok())
            };
            match n {
                Some(n) if n <= budget => match pool.send_ref(&[Seg::new(spare.id(), 0, n)]) {
                    Some(data) => {
                        out.udp.push(UdpOut {
                            dst: src,
                            data,
                            leg: None,
                        });
                        self.counters.udp_out.add(n);
                        spent = n;
                    }
                    None => self.counters.drop(DropReason::LatchPending),
                },
                _ => self.counters.drop(DropReason::LatchPending),
            }
            pool.release_received(spare);
        }
        // The answer to the client's Binding, if the limit allows it too.
        let resp_len = 64 + if src.is_ipv6() { 12 } else { 0 };
        if spent + resp_len <= budget {
            spent += self.answer_in_place(pool, leg, src, seg, &txid, out);
        } else {
            self.counters.drop(DropReason::LatchPending);
        }
        if let Some(p) = self.leg_mut(leg).latch.as_mut() {
            p.sent += spent;
        }
    }

    /// A Binding success response from a source waiting for validation: if it answers our
    /// check (transaction id, MESSAGE-INTEGRITY with the leg key), the leg moves there.
    pub(super) fn latch_answer(&mut self, msg: &[u8], src: SocketAddr, out: &mut Outbox) {
        let Some(&leg) = self.pending_latch.get(&src) else {
            return;
        };
        let Some(expect) = self.leg(leg).latch.as_ref().map(|p| p.txid) else {
            return;
        };
        let ok = stun::Message::parse(msg).is_ok_and(|m| {
            m.transaction_id() == &expect
                && m.check_integrity(&self.leg(leg).key).is_ok()
                && m.check_fingerprint().is_ok()
        });
        if !ok {
            self.counters.drop(DropReason::BadAuth);
            return;
        }
        self.pending_latch.remove(&src);
        self.leg_mut(leg).latch = None;
        // The policy may have changed (a reload) since the check was sent.
        if !self.may_latch(src) {
            return;
        }
        self.bind_udp(leg, src);
        self.push_bound(leg, crate::metrics::Transport::Udp, src, out);
    }

    /// Whether a leg may latch onto `src` under the peer policy; counts a refusal
    /// (`PrivateLatch` for the built-in ranges, `DeniedLatch` for the operator's `denied_peers`).
    /// Asked only when a source binds or moves, never per packet.
    pub(super) fn may_latch(&mut self, src: SocketAddr) -> bool {
        match self.cfg.peer_policy.check(src.ip()) {
            Ok(()) => true,
            Err(d) => {
                self.counters.drop(match d.source {
                    Source::DeniedPeers => DropReason::DeniedLatch,
                    Source::Private | Source::Special => DropReason::PrivateLatch,
                });
                false
            }
        }
    }

    /// Checks a STUN message: a Binding request whose USERNAME names a leg on this shard and
    /// whose MESSAGE-INTEGRITY verifies with that leg's key. Counts and returns None otherwise.
    /// Binding indications (keep-alives) from bound sources are consumed quietly.
    pub(super) fn authenticate(
        &mut self,
        msg: &[u8],
        from_bound: bool,
    ) -> Option<(LegIdx, [u8; 12])> {
        let m = match stun::Message::parse(msg) {
            Ok(m) => m,
            Err(_) => {
                self.counters.drop(DropReason::BadStun);
                return None;
            }
        };
        if m.method() != stun::BINDING || m.class() != stun::Class::Request {
            if !(from_bound && m.class() == stun::Class::Indication) {
                self.counters.drop(DropReason::BadStun);
            }
            return None;
        }
        let leg = m.username().and_then(|u| self.leg_by_name.get(u).copied());
        let Some(leg) = leg else {
            self.counters.drop(DropReason::BadAuth);
            return None;
        };
        if m.check_integrity(&self.leg(leg).key).is_err() || m.check_fingerprint().is_err() {
            self.counters.drop(DropReason::BadAuth);
            return None;
        }
        Some((leg, *m.transaction_id()))
    }

    pub(super) fn tcp_stun(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        bound: Option<LegIdx>,
        out: &mut Outbox,
    ) {
        let Some((leg, txid)) = self.authenticate(pool.seg(seg), bound.is_some()) else {
            if bound.is_none() {
                self.close(pool, c, out);
            }
            return;
        };
        if bound.is_some_and(|b| b != leg) {
            // A connection belongs to one leg for its whole life.
            self.counters.drop(DropReason::BadAuth);
            return;
        }
        let Some(peer) = self.conn(c).map(|x| x.peer) else {
            return;
        };
        if bound.is_none() {
            if let Some(old) = self.leg(leg).tcp
                && old != c
            {
                // The old connection was bound: closing it does not touch the unbound count
                // (it is not `counted_unbound`), whatever its `leg` says.
                self.close(pool, old, out);
            }
            self.leg_mut(leg).tcp = Some(c);
            self.forget_unbound(c);
            let cap = self.cfg.tcp_queue_frames;
            if let Some(conn) = self.conn_mut(c) {
                conn.leg = Some(leg);
                // Only bound connections carry media: their queue is allocated now (a
                // WebSocket connection's was, at its upgrade: it may hold the 101 answer).
                conn.queue.grow(cap);
            }
            let l = self.leg(leg);
            out.events.push(ShardEvent::LegBound {
                session: l.session,
                leg: l.event_name.clone(),
                transport: crate::metrics::Transport::Tcp,
                source: peer,
            });
        }
        // The response goes into a spare buffer: the request's buffer may hold the next frames.
        let Some(spare) = pool.take_spare() else {
            self.counters.drop(DropReason::NoReassemblyBuffer);
            return;
        };
        let n = {
            let key = &self.leg(leg).key;
            pool.buf_mut(&spare)
                .and_then(|b| stun::write_binding_success(b, &txid, peer, key).ok())
        };
        if let Some(n) = n {
            self.counters.bindings += 1;
            let resp = Seg::new(spare.id(), 0, n);
            self.push_control_frame(pool, c, resp, out);
        }
        pool.release_received(spare);
    }
}
