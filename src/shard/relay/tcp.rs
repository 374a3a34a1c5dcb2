//! TCP media connections: accept and the limits on connections that have not bound yet,
//! RFC 4571 deframing with reassembly across receive buffers, the bounded send queues (per
//! connection and per buffer group, oldest and stale frames dropped first) and the iovecs the
//! event loops send them with. The binding of a connection to its leg is in `binding`.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use super::{DropReason, FRAMES_PER_READ, LegIdx, Outbox, Relay, canonical, framing, stun};
use crate::shard::pool::{BufId, Group, InFlight, Pool, Seg};

/// Identifies a TCP media connection; the generation makes late completions for a reused slot
/// harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub idx: u32,
    pub generation: u32,
}

/// A frame waiting in a connection's send queue. Its payload's buffer references are held by
/// its [`InFlight`] token (a TCP send reads the frame), given back with `Pool::sent` when the
/// frame is sent, dropped or reaped: never by anything else, never twice.
#[derive(Debug)]
pub(super) struct QFrame {
    /// The frame's header: an RFC 4571 length (2 bytes) or a WebSocket frame header (2 or 4),
    /// `hdr_len` bytes of it used (0: raw bytes, the WebSocket handshake's answer).
    pub(super) hdr: [u8; 4],
    pub(super) hdr_len: u8,
    /// The payload (one or two segments) and its references.
    pub(super) data: InFlight,
    /// When the frame's payload was received (its age decides the stale drop).
    pub(super) rx_ns: u64,
    /// The pool group whose queue budget this frame is counted against (None: not counted,
    /// a control frame).
    pub(super) group: Option<Group>,
}

impl QFrame {
    pub(super) fn segs(&self) -> &[Seg] {
        self.data.segs()
    }
    pub(super) fn len(&self) -> usize {
        usize::from(self.hdr_len)
            + self
                .segs()
                .iter()
                .map(|s| usize::from(s.len))
                .sum::<usize>()
    }
}

/// A fixed-capacity ring of frames; never reallocates, so iovecs pointing at `hdr` stay valid.
pub(super) struct FrameQueue {
    pub(super) slots: Box<[Option<QFrame>]>,
    pub(super) head: usize,
    pub(super) len: usize,
    /// Bytes of the head frame already written to the socket.
    pub(super) head_sent: usize,
    /// Frames (from the head) that the send in flight describes: the kernel may read them, so
    /// they are never dropped before it completes.
    pub(super) sending: usize,
}

impl FrameQueue {
    /// A queue of `cap` frames; an unbound connection's queue has room for one (its STUN
    /// answer).
    pub(super) fn new(cap: usize) -> FrameQueue {
        FrameQueue {
            slots: (0..cap.max(1)).map(|_| None).collect(),
            head: 0,
            len: 0,
            head_sent: 0,
            sending: 0,
        }
    }
    /// Room for `cap` frames, keeping the frames queued (in order) and what was sent of the
    /// head. Only while no send is in flight (its iovecs point into the old ring).
    pub(super) fn grow(&mut self, cap: usize) {
        if cap <= self.slots.len() {
            return;
        }
        let mut q = FrameQueue::new(cap);
        q.head_sent = self.head_sent;
        while let Some(f) = self.pop() {
            // Cannot be full: it has more room than the frames it takes.
            let pushed = q.push(f);
            debug_assert!(pushed.is_ok());
        }
        q.head_sent = q.head_sent.min(q.get(0).map_or(0, QFrame::len));
        *self = q;
    }
    /// The first frame that may be dropped: not in flight, not partly written.
    pub(super) fn first_droppable(&self, inflight: bool) -> usize {
        let busy = if inflight { self.sending } else { 0 };
        busy.max(usize::from(self.head_sent > 0))
    }
    /// Removes the frame at `i` (from the head), keeping the order of the rest.
    pub(super) fn remove(&mut self, i: usize) -> Option<QFrame> {
        if i >= self.len {
            return None;
        }
        let cap = self.slots.len();
        let f = self.slots[(self.head + i) % cap].take();
        for k in i..self.len - 1 {
            self.slots[(self.head + k) % cap] = self.slots[(self.head + k + 1) % cap].take();
        }
        self.len -= 1;
        if i == 0 {
            self.head_sent = 0;
        }
        f
    }
    pub(super) fn is_full(&self) -> bool {
        self.len == self.slots.len()
    }
    /// Queues `f`; a full queue gives it back (the caller drops it and its references).
    pub(super) fn push(&mut self, f: QFrame) -> Result<(), QFrame> {
        if self.is_full() {
            return Err(f);
        }
        let i = (self.head + self.len) % self.slots.len();
        self.slots[i] = Some(f);
        self.len += 1;
        Ok(())
    }
    pub(super) fn get(&self, i: usize) -> Option<&QFrame> {
        if i >= self.len {
            return None;
        }
        self.slots[(self.head + i) % self.slots.len()].as_ref()
    }
    pub(super) fn pop(&mut self) -> Option<QFrame> {
        if self.len == 0 {
            return None;
        }
        let f = self.slots[self.head].take();
        self.head = (self.head + 1) % self.slots.len();
        self.len -= 1;
        self.head_sent = 0;
        f
    }
}

impl Drop for FrameQueue {
    fn drop(&mut self) {
        // A connection is freed only after `Relay::reap` retired its frames; a queue dropped
        // with frames is a shard stopping with a send still in flight, whose pool is being
        // dropped too: the references are left behind with it, not handed to a ring.
        for f in self.slots.iter_mut().filter_map(Option::take) {
            std::mem::forget(f.data);
        }
    }
}

pub(super) enum Partial {
    None,
    /// The first piece of a frame, still in its receive buffer: the token holds its reference.
    One(InFlight),
    /// A frame being gathered into a spare buffer (`got` bytes so far).
    Copy {
        buf: BufId,
        got: u16,
    },
    /// The rest of a frame that could not be kept (no spare buffer): ignored.
    Skip,
}

/// A TCP media connection. Queued frames (and their length prefixes, which live in the queue's
/// fixed ring) may be read by the kernel while a send is in flight, so the connection is reaped
/// only when no operation is in flight.
pub struct Conn {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub generation: u32,
    pub(super) leg: Option<LegIdx>,
    pub(super) accepted_ns: u64,
    /// When the connection last delivered bytes (an unbound one that stops is closed).
    pub(super) progress_ns: u64,
    /// Bytes received since accept (saturating): 0 is a silent connection, the first an
    /// unbound one over its source's limit loses.
    pub(super) rx_bytes: u32,
    /// Counted in `Relay::unbound_conns` (cleared exactly once: at bind or close).
    pub(super) counted_unbound: bool,
    /// Frames handled from the current receive buffer (`FRAMES_PER_READ`).
    pub(super) read_frames: u32,
    /// Queued frames by pool group of their payload (each connection may take an eighth of
    /// a group's queue budget: stalled readers cannot take it all).
    pub(super) from_group: [u32; 3],
    pub(super) deframer: framing::Deframer,
    /// RFC 4571 or WebSocket, decided by the first bytes (`ws`).
    pub(super) framing: super::ws::Framing,
    pub(super) partial: Partial,
    pub(super) queue: FrameQueue,
    /// TLS run by the shard (`tls`): records opened before the framing sees the bytes, and
    /// sealed after it; None: the bytes on the socket are the framing's.
    pub(super) tls: Option<Box<super::tls::TlsConn>>,
    /// Driver state: a multishot receive is armed / a send is in flight / shutting down.
    pub recv_armed: bool,
    pub send_inflight: bool,
    pub closing: bool,
}

impl Conn {
    pub fn is_bound(&self) -> bool {
        self.leg.is_some()
    }
    pub fn queued(&self) -> usize {
        self.queue.len
    }
}

/// Copy segments to `buf[at..]`, bounded by the buffer; returns bytes copied.
pub(super) fn copy_into_at(pool: &mut Pool, buf: BufId, mut at: usize, segs: &[Seg]) -> usize {
    let start = at;
    for s in segs {
        let size = pool.buf_size();
        let src_off = usize::from(s.off);
        let n = usize::from(s.len).min(size.saturating_sub(at));
        let src = pool.addr(s.buf).wrapping_add(src_off);
        let dst = pool.addr(buf).wrapping_add(at);
        // SAFETY: both ranges lie inside the pool mapping (bounded by buf_size above and by the
        // segment having been cut from a received buffer); `buf` is a spare distinct from the
        // receive buffers, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
        at += n;
    }
    at - start
}

/// A spare buffer for reassembly. Connections that have not bound may take one only while
/// more than half remain: the rest is reserved for bound connections' media.
pub(super) fn take_spare(pool: &mut Pool, bound: bool) -> Option<BufId> {
    if !bound && pool.spare_free() * 2 <= pool.layout().spare {
        return None;
    }
    pool.take_spare()
        .map(crate::shard::pool::Received::into_ref)
}

/// Buffers of a pool group that TCP queues may pin: half of them, so stalled readers can
/// never drain a receive ring.
pub(super) fn pin_budget(pool: &Pool, g: Group) -> usize {
    (pool.group_size(g) / 2).max(1)
}

/// Frames one connection may queue from one group: an eighth of the group (at least 64, a
/// burst a client may legitimately send after a hiccup), so a few stalled readers cannot take
/// the whole pin budget while frames older than the stale age are dropped anyway.
pub(super) fn conn_share(pool: &Pool, g: Group) -> usize {
    (pool.group_size(g) / 8).max(64)
}

/// The prefix unbound TCP connections are counted by: the address for IPv4, its /64 for IPv6.
pub(super) fn source_prefix(ip: IpAddr) -> IpAddr {
    match canonical(SocketAddr::new(ip, 0)).ip() {
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

impl Relay {
    pub(super) fn enqueue_frame(
        &mut self,
        pool: &mut Pool,
        peer: LegIdx,
        c: ConnId,
        segs: &[Seg],
        rx_ns: u64,
        out: &mut Outbox,
    ) -> bool {
        let len: usize = segs.iter().map(|s| usize::from(s.len)).sum();
        if len > usize::from(self.cfg.max_frame) {
            // The client treats a frame over max_frame as a broken stream.
            self.counters.drop(DropReason::OversizeForTcp);
            return false;
        }
        let Some((hdr, hdr_len)) = self.frame_header(c, len) else {
            return false;
        };
        let group = pool.group(segs[0].buf);
        self.evict_stale(pool, c);
        let budget = pin_budget(pool, group);
        let share = conn_share(pool, group);
        // Full: make room by dropping this connection's oldest unsent frame (late voice is
        // useless; the newest is the one worth sending).
        loop {
            let Some(conn) = self.conn(c) else {
                return false;
            };
            if conn.closing {
                self.counters.drop(DropReason::TcpBackpressure);
                return false;
            }
            // Buffers this frame would newly pin (a frame spans at most two).
            let new_pins = match segs {
                [a, b] if a.buf != b.buf => {
                    usize::from(!pool.is_pinned(a.buf)) + usize::from(!pool.is_pinned(b.buf))
                }
                _ => usize::from(!pool.is_pinned(segs[0].buf)),
            };
            let full = conn.queue.is_full()
                || self.tcp_queued >= self.cfg.tcp_queued_total
                || pool.pinned(group) + new_pins > budget
                || conn.from_group[group as usize] as usize >= share;
            if !full {
                break;
            }
            self.counters.drop(DropReason::TcpBackpressure);
            self.leg_mut(peer).backpressure_drops += 1;
            if !self.drop_oldest(pool, c, Some(group)) {
                return false;
            }
        }
        let Some(conn) = self.conn_mut(c) else {
            return false;
        };
        let Some(data) = pool.send_ref(segs) else {
            return false; // refused and counted by the pool
        };
        let f = QFrame {
            hdr,
            hdr_len,
            data,
            rx_ns,
            group: Some(group),
        };
        if let Err(f) = conn.queue.push(f) {
            // Not full: checked above, under the same borrow.
            pool.sent(f.data);
            return false;
        }
        let was_idle = conn.queue.len == 1;
        for s in segs {
            pool.pin(s.buf);
        }
        conn.from_group[group as usize] += 1;
        self.tcp_queued += 1;
        self.counters.tcp_out.add(len);
        self.leg_mut(peer).tx.add(len);
        if was_idle {
            out.tcp_dirty.push(c);
        }
        true
    }

    /// Drops frames of `c` that waited longer than `stale_ns` (oldest first, never one the
    /// kernel may be reading).
    pub(super) fn evict_stale(&mut self, pool: &mut Pool, c: ConnId) {
        let stale = self.cfg.stale_ns;
        let now = self.now_ns;
        if stale == 0 {
            return;
        }
        loop {
            let Some(conn) = self.conn(c) else { return };
            let i = conn.queue.first_droppable(conn.send_inflight);
            if i >= conn.queue.len {
                return;
            }
            let Some(f) = conn.queue.get(i) else { return };
            if f.group.is_none() || now <= f.rx_ns.saturating_add(stale) {
                return;
            }
            self.remove_frame(pool, c, i);
            self.counters.drop(DropReason::Stale);
        }
    }

    /// Drops the oldest unsent media frame of `c` (of `group` if given, else any); false when
    /// there is none.
    pub(super) fn drop_oldest(&mut self, pool: &mut Pool, c: ConnId, group: Option<Group>) -> bool {
        let Some(conn) = self.conn(c) else {
            return false;
        };
        let from = conn.queue.first_droppable(conn.send_inflight);
        let found = (from..conn.queue.len).find(|&i| {
            let g = conn.queue.get(i).and_then(|f| f.group);
            g.is_some() && (group.is_none() || g == group)
        });
        match found {
            Some(i) => {
                self.remove_frame(pool, c, i);
                true
            }
            None => false,
        }
    }

    pub(super) fn remove_frame(&mut self, pool: &mut Pool, c: ConnId, i: usize) {
        let Some(conn) = self.conn_mut(c) else { return };
        let Some(f) = conn.queue.remove(i) else {
            return;
        };
        if let Some(g) = f.group {
            conn.from_group[g as usize] -= 1;
        }
        self.retire_frame(pool, f);
    }

    /// A frame left its queue (sent, dropped or reaped): its buffers and budgets come back.
    pub(super) fn retire_frame(&mut self, pool: &mut Pool, f: QFrame) {
        if f.group.is_some() {
            for s in f.segs() {
                pool.unpin(s.buf);
            }
        }
        pool.sent(f.data);
        self.tcp_queued -= 1;
    }

    /// A TCP media connection was accepted. Returns None (and counts it) when the shard already
    /// holds its limit of connections that have not yet bound; the caller closes `fd`.
    ///
    /// Over a limit (all unbound connections, or the `max_unbound_tcp_per_source` of one source
    /// prefix) the unbound connection (of that source) that made the least progress is closed
    /// to make room ([`Relay::eviction_rank`]): silent ones first, then the one whose last
    /// bytes are oldest; one that is sending its handshake is never closed for a silent one,
    /// and one source cannot hold them all.
    pub fn on_accept(
        &mut self,
        pool: &mut Pool,
        fd: OwnedFd,
        peer: SocketAddr,
        now_ns: u64,
        out: &mut Outbox,
    ) -> Option<ConnId> {
        let peer = canonical(peer);
        let prefix = source_prefix(peer.ip());
        let per_source = self.cfg.max_unbound_tcp_per_source.max(1);
        let mine = self.unbound_by_source.get(&prefix).copied().unwrap_or(0) as usize;
        if self.cfg.max_unbound_tcp == 0 {
            self.counters.drop(DropReason::TcpConnLimit);
            return None;
        }
        if mine >= per_source {
            self.evict_least_progress(pool, Some(prefix), now_ns, out);
        } else if self.unbound_conns >= self.cfg.max_unbound_tcp {
            self.evict_least_progress(pool, None, now_ns, out);
        }
        if self.unbound_conns >= self.cfg.max_unbound_tcp {
            self.counters.drop(DropReason::TcpConnLimit);
            return None;
        }
        self.counters.tcp_accepted += 1;
        self.unbound_conns += 1;
        *self.unbound_by_source.entry(prefix).or_insert(0) += 1;
        let idx = match self.free_conns.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conn_generation.push(0);
                (self.conns.len() - 1) as u32
            }
        };
        let generation = self.conn_generation[idx as usize].wrapping_add(1) & 0x00ff_ffff;
        self.conn_generation[idx as usize] = generation;
        self.conns[idx as usize] = Some(Conn {
            fd,
            peer,
            generation,
            leg: None,
            accepted_ns: now_ns,
            progress_ns: now_ns,
            rx_bytes: 0,
            counted_unbound: true,
            read_frames: 0,
            from_group: [0; 3],
            deframer: framing::Deframer::new(self.cfg.max_frame),
            framing: super::ws::Framing::Undecided,
            partial: Partial::None,
            queue: FrameQueue::new(0),
            tls: None,
            recv_armed: false,
            send_inflight: false,
            closing: false,
        });
        Some(ConnId { idx, generation })
    }

    /// Where an unbound connection stands in the eviction order (the smallest goes first):
    ///
    /// 0. silent (no byte since accept) past its grace (`unbound_tcp_grace_ns`): oldest
    ///    accept first;
    /// 1. it sent bytes: oldest last progress first (a trickler that paused loses to one
    ///    sending its handshake now);
    /// 2. silent but accepted within the grace, so it has not had its chance to send: newest
    ///    first, so a flood of fresh connections displaces itself rather than a client whose
    ///    Binding is still on its way.
    pub(super) fn eviction_rank(&self, c: &Conn, now_ns: u64) -> (u8, u64) {
        if c.rx_bytes > 0 {
            (1, c.progress_ns)
        } else if now_ns.saturating_sub(c.accepted_ns) > self.cfg.unbound_tcp_grace_ns {
            (0, c.accepted_ns)
        } else {
            (2, u64::MAX - c.accepted_ns)
        }
    }

    /// Closes the unbound connection (of `prefix`, or of any source) that made the least
    /// progress ([`Relay::eviction_rank`]), if there is one.
    pub(super) fn evict_least_progress(
        &mut self,
        pool: &mut Pool,
        prefix: Option<IpAddr>,
        now_ns: u64,
        out: &mut Outbox,
    ) {
        let victim = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let mine = prefix.is_none_or(|p| source_prefix(c.peer.ip()) == p);
                (c.counted_unbound && mine).then(|| {
                    (
                        self.eviction_rank(c, now_ns),
                        ConnId {
                            idx: i as u32,
                            generation: c.generation,
                        },
                    )
                })
            })
            .min_by_key(|(rank, _)| *rank);
        if let Some((_, c)) = victim {
            self.counters.drop(DropReason::TcpConnLimit);
            self.close(pool, c, out);
        }
    }

    /// The connection stops counting as unbound (bound, or closing); exactly once.
    pub(super) fn forget_unbound(&mut self, c: ConnId) {
        let Some(conn) = self.conn_mut(c) else { return };
        if !std::mem::replace(&mut conn.counted_unbound, false) {
            return;
        }
        let prefix = source_prefix(conn.peer.ip());
        self.unbound_conns -= 1;
        if let Some(n) = self.unbound_by_source.get_mut(&prefix) {
            *n -= 1;
            if *n == 0 {
                self.unbound_by_source.remove(&prefix);
            }
        }
    }

    pub fn conn(&self, c: ConnId) -> Option<&Conn> {
        self.conns
            .get(c.idx as usize)?
            .as_ref()
            .filter(|x| x.generation == c.generation)
    }

    pub fn conn_mut(&mut self, c: ConnId) -> Option<&mut Conn> {
        self.conns
            .get_mut(c.idx as usize)?
            .as_mut()
            .filter(|x| x.generation == c.generation)
    }

    /// Look a connection up by slot alone (completions carry a truncated generation).
    pub fn conn_id_at(&self, idx: u32, generation: u32) -> Option<ConnId> {
        let c = self.conns.get(idx as usize)?.as_ref()?;
        (c.generation == generation).then_some(ConnId { idx, generation })
    }

    /// Bytes arrived on a TCP connection: `seg` in the pool, one reference held by the caller.
    /// Under TLS run by the shard they are records, opened first (`tls`).
    pub fn on_tcp(&mut self, pool: &mut Pool, c: ConnId, seg: Seg, rx_ns: u64, out: &mut Outbox) {
        if self.conn(c).is_some_and(|x| x.tls.is_some()) {
            return self.on_tls(pool, c, seg, rx_ns, out);
        }
        self.on_tcp_plain(pool, c, seg, rx_ns, out)
    }

    /// The connection's plain bytes (the socket's, or a TLS record's plaintext).
    pub(super) fn on_tcp_plain(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        rx_ns: u64,
        out: &mut Outbox,
    ) {
        self.counters.tcp_in.bytes += u64::from(seg.len);
        if let Some(conn) = self.conn_mut(c) {
            conn.progress_ns = conn.progress_ns.max(rx_ns);
            conn.rx_bytes = conn.rx_bytes.saturating_add(u32::from(seg.len));
            conn.read_frames = 0;
        }
        let mut pos = 0usize;
        loop {
            let Some(conn) = self.conn_mut(c) else { return };
            if conn.closing {
                return;
            }
            let piece = match self.next_piece(pool, c, seg, &mut pos, out) {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(()) => {
                    self.counters.drop(DropReason::BadFrame);
                    self.close(pool, c, out);
                    return;
                }
            };
            let Some(conn) = self.conn_mut(c) else { return };
            let pseg = Seg::new(
                seg.buf,
                usize::from(seg.off) + piece.range.start,
                piece.range.len(),
            );
            if piece.first && piece.last {
                self.counters.tcp_in.packets += 1;
                self.on_frame(pool, c, &[pseg], rx_ns, out);
                continue;
            }
            let partial = std::mem::replace(&mut conn.partial, Partial::None);
            match partial {
                Partial::Skip => {
                    if !piece.last {
                        conn.partial = Partial::Skip;
                    }
                }
                Partial::None => {
                    // First piece of a frame that continues in the next read.
                    conn.partial = pool.keep(pseg).map_or(Partial::Skip, Partial::One);
                }
                Partial::One(first) if piece.last => {
                    self.counters.tcp_in.packets += 1;
                    self.on_frame(pool, c, &[first.segs()[0], pseg], rx_ns, out);
                    pool.sent(first);
                }
                Partial::One(first) => {
                    // A third piece is coming: gather the frame in a spare buffer.
                    let bound = conn.leg.is_some();
                    let next = match take_spare(pool, bound) {
                        Some(buf) => {
                            self.counters.reassembly_copies += 1;
                            let got = copy_into_at(pool, buf, 0, &[first.segs()[0], pseg]);
                            Partial::Copy {
                                buf,
                                got: got as u16,
                            }
                        }
                        None => {
                            // The frame is dropped; the deframer keeps counting its bytes, so
                            // the stream stays in sync.
                            self.counters.drop(DropReason::NoReassemblyBuffer);
                            Partial::Skip
                        }
                    };
                    pool.sent(first);
                    if let Some(conn) = self.conn_mut(c) {
                        conn.partial = next;
                    }
                }
                Partial::Copy { buf, got } => {
                    let got = usize::from(got) + copy_into_at(pool, buf, usize::from(got), &[pseg]);
                    if piece.last {
                        self.counters.tcp_in.packets += 1;
                        self.on_frame(pool, c, &[Seg::new(buf, 0, got)], rx_ns, out);
                        pool.release(buf);
                    } else if let Some(conn) = self.conn_mut(c) {
                        conn.partial = Partial::Copy {
                            buf,
                            got: got as u16,
                        };
                    }
                }
            }
        }
    }

    pub(super) fn on_frame(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        segs: &[Seg],
        rx_ns: u64,
        out: &mut Outbox,
    ) {
        let Some(conn) = self.conn_mut(c) else { return };
        conn.read_frames += 1;
        let over_budget = conn.read_frames > FRAMES_PER_READ;
        let bound = conn.leg;
        let first_byte = pool.seg(segs[0]).first().copied().unwrap_or(0);
        // STUN (first byte 0..=3, RFC 7983) must be parsed from one piece of memory.
        let is_stun_candidate = first_byte < 4;
        if bound.is_none() || is_stun_candidate {
            let (seg, spare) = match segs {
                [one] => (*one, None),
                _ => match take_spare(pool, bound.is_some()) {
                    Some(buf) => {
                        self.counters.reassembly_copies += 1;
                        let n = copy_into_at(pool, buf, 0, segs);
                        (Seg::new(buf, 0, n), Some(buf))
                    }
                    None => {
                        self.counters.drop(DropReason::NoReassemblyBuffer);
                        return;
                    }
                },
            };
            let is_stun = stun::looks_like_stun(pool.seg(seg));
            if is_stun {
                self.tcp_stun(pool, c, seg, bound, out);
            } else if bound.is_none() {
                // "On a TCP media connection, the first RFC 4571 frame is that same Binding
                // request": anything else closes the connection.
                self.counters.drop(DropReason::BadFrame);
                self.close(pool, c, out);
            } else {
                // Neither STUN nor RTP/RTCP (first byte 0..=3): not media.
                self.counters.drop(DropReason::NotMedia);
                self.close(pool, c, out);
            }
            if let Some(buf) = spare {
                pool.release(buf);
            }
            return;
        }
        // A bound connection carries RTP or RTCP only (RFC 3550: version 2, a 12-byte header
        // at least; RFC 7983 demultiplexing): anything else is not media and ends the
        // connection, before it can cost any forwarding work.
        let len: usize = segs.iter().map(|s| usize::from(s.len)).sum();
        if first_byte >> 6 != 2 || len < 12 {
            self.counters.drop(DropReason::NotMedia);
            self.close(pool, c, out);
            return;
        }
        if over_budget {
            self.counters.drop(DropReason::SendBacklog);
            return;
        }
        if let Some(leg) = bound {
            self.forward(pool, leg, segs, rx_ns, out.udp_budget / 2, out);
        }
    }

    /// Queue a frame that is not media (a STUN response): not subject to the RTP drop policy
    /// unless the queue is completely full.
    pub(super) fn push_control_frame(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        out: &mut Outbox,
    ) {
        let Some((hdr, hdr_len)) = self.frame_header(c, usize::from(seg.len)) else {
            return;
        };
        self.push_raw_frame(pool, c, seg, hdr, hdr_len, out);
    }

    /// Queue a frame that is not media with the header given (`hdr_len` 0: raw bytes).
    pub(super) fn push_raw_frame(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        hdr: [u8; 4],
        hdr_len: u8,
        out: &mut Outbox,
    ) {
        let Some(conn) = self.conn_mut(c) else { return };
        if conn.queue.is_full() {
            self.counters.drop(DropReason::TcpBackpressure);
            return;
        }
        let Some(data) = pool.send_ref(&[seg]) else {
            return; // refused and counted by the pool
        };
        let f = QFrame {
            hdr,
            hdr_len,
            data,
            rx_ns: 0,
            group: None,
        };
        if let Err(f) = conn.queue.push(f) {
            pool.sent(f.data);
            return;
        }
        let was_idle = conn.queue.len == 1;
        self.tcp_queued += 1;
        if was_idle {
            out.tcp_dirty.push(c);
        }
    }

    /// Describe queued frames as iovecs in `iov` (as many as fit). Returns the number of
    /// iovecs used (0: nothing to send, or a send is already in flight). The iovecs point into
    /// pool buffers and the queue's length prefixes, which stay put until `tcp_sent`. Under
    /// TLS run by the shard, one iovec: the record sealed from the queue (`tls`).
    pub fn prepare_tcp_send(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        iov: &mut [libc::iovec],
    ) -> usize {
        let Some(conn) = self.conn_mut(c) else {
            return 0;
        };
        if conn.tls.is_some() {
            return self.prepare_tls_send(pool, c, iov);
        }
        if conn.send_inflight || conn.queue.len == 0 || conn.closing {
            return 0;
        }
        let mut n = 0usize;
        let mut skip = conn.queue.head_sent;
        let mut frames = 0usize;
        'frames: for i in 0..conn.queue.len {
            let Some(f) = conn.queue.get(i) else {
                break;
            };
            let parts = std::iter::once((f.hdr.as_ptr().cast_mut(), usize::from(f.hdr_len))).chain(
                f.segs().iter().map(|s| {
                    (
                        pool.addr(s.buf).wrapping_add(usize::from(s.off)),
                        usize::from(s.len),
                    )
                }),
            );
            for (ptr, len) in parts {
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let Some(slot) = iov.get_mut(n) else {
                    break 'frames;
                };
                *slot = libc::iovec {
                    iov_base: ptr.wrapping_add(skip).cast(),
                    iov_len: len - skip,
                };
                skip = 0;
                n += 1;
            }
            frames = i + 1;
        }
        // A frame cut short by the iovec limit is in flight too.
        conn.queue.sending = (frames + 1).min(conn.queue.len);
        n
    }

    /// `sent` bytes of the prepared send were written: retire whole frames.
    pub fn tcp_sent(&mut self, pool: &mut Pool, c: ConnId, mut sent: usize) {
        if self.conn(c).is_some_and(|x| x.tls.is_some()) {
            return self.tls_sent(c, sent);
        }
        loop {
            let Some(conn) = self.conn_mut(c) else { return };
            conn.queue.sending = 0;
            if conn.queue.len == 0 || sent == 0 {
                return;
            }
            let Some(head_len) = conn.queue.get(0).map(QFrame::len) else {
                return;
            };
            let left = head_len.saturating_sub(conn.queue.head_sent);
            if sent >= left {
                sent -= left;
                let Some(f) = conn.queue.pop() else { return };
                if let Some(g) = f.group {
                    conn.from_group[g as usize] -= 1;
                }
                self.retire_frame(pool, f);
            } else {
                conn.queue.head_sent += sent;
                return;
            }
        }
    }

    pub fn tcp_has_queued(&self, c: ConnId) -> bool {
        self.conn(c).is_some_and(|x| {
            (x.queue.len > 0 || x.tls.as_ref().is_some_and(|t| t.pending())) && !x.closing
        })
    }

    /// Start closing a connection: it no longer carries media; the loop shuts the socket down and
    /// reaps it once nothing is in flight.
    pub fn close(&mut self, pool: &mut Pool, c: ConnId, out: &mut Outbox) {
        let Some(conn) = self.conn_mut(c) else { return };
        if conn.closing {
            return;
        }
        conn.closing = true;
        let leg = conn.leg.take();
        let partial = std::mem::replace(&mut conn.partial, Partial::None);
        match partial {
            Partial::None => {}
            Partial::One(t) => pool.sent(t),
            Partial::Copy { buf, .. } => pool.release(buf),
            Partial::Skip => {}
        }
        super::ws::release(pool, &mut conn.framing);
        if let Some(t) = conn.tls.as_deref_mut() {
            t.release(pool);
        }
        if let Some(l) = leg
            && let Some(leg) = self.legs[l as usize].as_mut()
            && leg.tcp == Some(c)
        {
            leg.tcp = None;
        }
        self.forget_unbound(c);
        out.close.push(c);
    }

    /// Frees a closed connection once no operation is in flight; returns the socket so the loop
    /// can drop (close) it. Queued frames release their buffers here, never earlier, since an
    /// in-flight send may still read them.
    pub fn reap(&mut self, pool: &mut Pool, c: ConnId) -> Option<OwnedFd> {
        let conn = self.conn(c)?;
        if !conn.closing || conn.recv_armed || conn.send_inflight {
            return None;
        }
        let mut conn = self.conns[c.idx as usize].take()?;
        while let Some(f) = conn.queue.pop() {
            self.retire_frame(pool, f);
        }
        self.free_conns.push(c.idx);
        self.counters.tcp_closed += 1;
        Some(conn.fd)
    }

    /// Time-based duties: unbound connections that have not bound in time are closed.
    ///
    /// An unbound connection is closed when it has made no progress for `unbound_tcp_idle_ns`
    /// or has not bound `unbound_tcp_timeout_ns` after accept, whichever comes first; frames
    /// that waited in a queue past `stale_ns` are dropped.
    pub fn housekeeping(&mut self, pool: &mut Pool, now_ns: u64, out: &mut Outbox) {
        self.now_ns = self.now_ns.max(now_ns);
        let deadline = self.cfg.unbound_tcp_timeout_ns;
        let idle = self.cfg.unbound_tcp_idle_ns.min(deadline);
        // By index, acting at once: closing or evicting changes a slot, never the table's
        // length, so nothing needs collecting first.
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_ref() else {
                continue;
            };
            if c.closing {
                continue;
            }
            let id = ConnId {
                idx: i as u32,
                generation: c.generation,
            };
            if c.leg.is_none()
                && (now_ns.saturating_sub(c.accepted_ns) > deadline
                    || now_ns.saturating_sub(c.progress_ns) > idle)
            {
                self.counters.drop(DropReason::TcpConnLimit);
                self.close(pool, id, out);
            } else if c.queue.len > 0 {
                self.evict_stale(pool, id);
            }
        }
    }

    /// All live connections (for shutdown).
    pub fn conn_ids(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref().map(|c| ConnId {
                    idx: i as u32,
                    generation: c.generation,
                })
            })
            .collect()
    }

    pub fn raw_fd(&self, c: ConnId) -> Option<i32> {
        self.conn(c).map(|x| x.fd.as_raw_fd())
    }
}
