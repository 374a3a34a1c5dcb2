//! The fallback event loop: the same forwarding core over epoll, `recvmmsg` and `sendmmsg`, for
//! hosts where io_uring is disabled (`kernel.io_uring_disabled`, container seccomp) or when the
//! configuration forces it. Buffers come from the same pool (a free list instead of rings), so
//! forwarding still never copies a payload.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustc_hash::FxHashSet;

use super::pool::{BufId, Group, Seg};
use super::relay::ConnId;
use super::sockets::{self, RawAddr, ShardSockets};
use super::{Backend, ShardCore};
use crate::metrics::DropReason;

const K_UDP: u64 = 1;
const K_LISTEN: u64 = 2;
const K_WAKE: u64 = 3;
const K_CONN: u64 = 4;

const BATCH: usize = 64;

fn token(kind: u64, c: Option<ConnId>) -> u64 {
    let (g, i) = c.map_or((0, 0), |c| (c.generation, c.idx));
    (kind << 56) | (u64::from(g & 0x00ff_ffff) << 32) | u64::from(i)
}

pub(crate) struct EpollShard {
    core: ShardCore,
    ep: OwnedFd,
    udp_fd: RawFd,
    tcp_fd: RawFd,
    ipv6: bool,
    /// Free UDP-group and TCP-group buffers (the epoll loop has no rings; the groups are kept
    /// apart as in io_uring, so the per-group queue budgets protect TCP receives here too).
    free: Vec<BufId>,
    free_tcp: Vec<BufId>,
    freed: Vec<BufId>,
    rx_msgs: Vec<libc::mmsghdr>,
    rx_iov: Vec<libc::iovec>,
    rx_names: Vec<RawAddr>,
    rx_ctrl: Vec<[u8; sockets::CONTROL_LEN]>,
    rx_bufs: Vec<BufId>,
    tx_msgs: Vec<libc::mmsghdr>,
    tx_iov: Vec<[libc::iovec; 2]>,
    tx_names: Vec<RawAddr>,
    waiting_out: FxHashSet<ConnId>,
    tcp_iov: Box<[libc::iovec]>,
    tcp_sndbuf: i32,
    coalesce: Duration,
    /// When the current turn's wait ended (`realtime_ns`): the coalescing target counts from it.
    woke: u64,
    send_slots: usize,
    /// No free buffer: the UDP socket (and these connections) are out of the epoll set
    /// until buffers come back (level-triggered readiness would otherwise spin the loop).
    udp_dry: bool,
    tcp_dry: Vec<ConnId>,
    /// Accept failed for lack of descriptors or memory: the listener rests until then.
    accept_backoff_until: Option<u64>,
    overflow: sockets::OverflowTracker,
    _udp: socket2::Socket,
    _tcp: socket2::Socket,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl EpollShard {
    pub fn new(core: ShardCore, sockets: &ShardSockets) -> io::Result<EpollShard> {
        // SAFETY: plain syscall, checked.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a fresh descriptor we own.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let udp = sockets.udp.try_clone()?;
        let tcp = sockets.tcp.try_clone()?;
        let layout = *core.pool.layout();
        let free = (0..layout.udp as u32).rev().map(|i| i as BufId).collect();
        let free_tcp = (layout.udp as u32..(layout.udp + layout.tcp) as u32)
            .rev()
            .map(|i| i as BufId)
            .collect();
        let cfg = &core.ctx.cfg;
        let s = EpollShard {
            udp_fd: udp.as_raw_fd(),
            tcp_fd: tcp.as_raw_fd(),
            ipv6: cfg.relay.ipv6,
            free,
            free_tcp,
            freed: Vec::with_capacity(4096),
            // SAFETY (zeroed): plain C structs.
            rx_msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
            rx_iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            rx_names: vec![RawAddr::default(); BATCH],
            rx_ctrl: vec![[0; sockets::CONTROL_LEN]; BATCH],
            rx_bufs: Vec::with_capacity(BATCH),
            tx_msgs: Vec::with_capacity(BATCH),
            tx_iov: Vec::with_capacity(BATCH),
            tx_names: Vec::with_capacity(BATCH),
            waiting_out: FxHashSet::default(),
            // SAFETY (zeroed): plain C structs.
            tcp_iov: (0..super::relay::TCP_IOV)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            tcp_sndbuf: i32::try_from(cfg.tcp_sndbuf).unwrap_or(i32::MAX),
            coalesce: cfg.coalesce,
            woke: 0,
            send_slots: cfg.send_slots.max(16),
            udp_dry: false,
            tcp_dry: Vec::new(),
            accept_backoff_until: None,
            overflow: sockets::OverflowTracker::default(),
            ep,
            core,
            _udp: udp,
            _tcp: tcp,
        };
        s.ctl(
            libc::EPOLL_CTL_ADD,
            s.udp_fd,
            libc::EPOLLIN as u32,
            token(K_UDP, None),
        )?;
        s.ctl(
            libc::EPOLL_CTL_ADD,
            s.tcp_fd,
            libc::EPOLLIN as u32,
            token(K_LISTEN, None),
        )?;
        let wfd = s.core.ctx.waker.raw_fd();
        s.ctl(
            libc::EPOLL_CTL_ADD,
            wfd,
            libc::EPOLLIN as u32,
            token(K_WAKE, None),
        )?;
        Ok(s)
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: valid epoll fd and event pointer.
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    pub fn run(&mut self) {
        // SAFETY: plain C struct.
        let mut events: Vec<libc::epoll_event> = vec![unsafe { std::mem::zeroed() }; 256];
        loop {
            // SAFETY: events has room for 256 entries.
            let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), events.as_mut_ptr(), 256, 100) };
            let n = if n < 0 { 0 } else { n as usize };
            self.maybe_coalesce(n);
            let now = sockets::realtime_ns();
            self.woke = now;
            self.core.relay.begin_turn(now);
            self.core.out.udp_budget = self.send_slots;
            if let Some(t) = self.accept_backoff_until
                && now >= t
            {
                self.accept_backoff_until = None;
                let _ = self.ctl(
                    libc::EPOLL_CTL_MOD,
                    self.tcp_fd,
                    libc::EPOLLIN as u32,
                    token(K_LISTEN, None),
                );
            }
            let mut work = 0usize;
            for ev in &events[..n] {
                let data = ev.u64;
                let kind = data >> 56;
                let c = ConnId {
                    idx: data as u32,
                    generation: ((data >> 32) & 0x00ff_ffff) as u32,
                };
                match kind {
                    K_UDP => work += self.recv_udp(now),
                    K_LISTEN => self.accept_all(now),
                    K_CONN => {
                        let flags = ev.events;
                        if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                            work += self.read_conn(c, now);
                        }
                        if flags & libc::EPOLLOUT as u32 != 0 {
                            self.core.out.tcp_dirty.push(c);
                        }
                    }
                    _ => {}
                }
            }
            if n > 0 {
                self.core.note_wake(work.max(1), now);
            }
            if !self.core.turn(Backend::Epoll, now) {
                break;
            }
            for c in std::mem::take(&mut self.core.adopted) {
                let added = self.core.relay.raw_fd(c).is_some_and(|raw| {
                    self.ctl(
                        libc::EPOLL_CTL_ADD,
                        raw,
                        libc::EPOLLIN as u32,
                        token(K_CONN, Some(c)),
                    )
                    .is_ok()
                });
                if !added {
                    self.core
                        .relay
                        .close(&mut self.core.pool, c, &mut self.core.out);
                }
            }
            self.flush();
            self.recycle();
        }
        for c in self.core.relay.conn_ids() {
            self.core
                .relay
                .close(&mut self.core.pool, c, &mut self.core.out);
        }
        self.flush();
    }

    /// Under light load, let packets gather before reading them, so that one wake-up (and one
    /// recvmmsg/sendmmsg pair) serves many: until the coalescing target after the last turn's
    /// wake-up (`ShardCore::coalesce_target_us`, the io_uring loop's rule), so the budget
    /// bounds the wait a packet sees here too. A busy shard, whose work took the target,
    /// skips this.
    fn maybe_coalesce(&mut self, ready: usize) {
        if ready == 0 {
            return;
        }
        let budget_us = self.coalesce.as_micros() as u64;
        let Some(target_us) = self.core.coalesce_target_us(budget_us, BATCH) else {
            return;
        };
        let spent_us = sockets::realtime_ns().saturating_sub(self.woke) / 1000;
        if spent_us < target_us {
            std::thread::sleep(Duration::from_micros(target_us - spent_us));
        }
    }

    fn take_free(&mut self) -> Option<BufId> {
        self.free.pop()
    }

    fn recv_udp(&mut self, now: u64) -> usize {
        let mut total = 0;
        let buf_size = self.core.pool.buf_size();
        let namelen = if self.ipv6 {
            size_of::<libc::sockaddr_in6>()
        } else {
            size_of::<libc::sockaddr_in>()
        };
        // Bounded: at most 16 batches per readiness event, then the other sockets get a turn.
        for _ in 0..16 {
            self.rx_bufs.clear();
            while self.rx_bufs.len() < BATCH {
                match self.take_free() {
                    Some(b) => self.rx_bufs.push(b),
                    None => break,
                }
            }
            let want = self.rx_bufs.len();
            if want == 0 {
                self.core.relay.counters.buf_ring_exhausted += 1;
                self.set_udp_dry(true);
                return total;
            }
            for i in 0..want {
                self.rx_iov[i] = libc::iovec {
                    iov_base: self.core.pool.addr(self.rx_bufs[i]).cast(),
                    iov_len: buf_size,
                };
                let m = &mut self.rx_msgs[i].msg_hdr;
                m.msg_name = (&mut self.rx_names[i] as *mut RawAddr).cast();
                m.msg_namelen = namelen as libc::socklen_t;
                m.msg_iov = &mut self.rx_iov[i];
                m.msg_iovlen = 1;
                m.msg_control = self.rx_ctrl[i].as_mut_ptr().cast();
                m.msg_controllen = sockets::CONTROL_LEN as _;
                m.msg_flags = 0;
                self.rx_msgs[i].msg_len = 0;
            }
            // SAFETY: every msghdr points at live buffers sized as declared.
            let r = unsafe {
                libc::recvmmsg(
                    self.udp_fd,
                    self.rx_msgs.as_mut_ptr(),
                    want as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            let got = if r < 0 { 0 } else { r as usize };
            for i in 0..want {
                let bid = self.rx_bufs[i];
                if i >= got {
                    self.free.push(bid);
                    continue;
                }
                let Some(held) = self.core.pool.received(bid) else {
                    continue; // not ours to take: refused and counted by the pool
                };
                let m = &self.rx_msgs[i];
                let len = m.msg_len as usize;
                let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                // SAFETY: the kernel wrote msg_namelen bytes of the name.
                let name = unsafe {
                    std::slice::from_raw_parts(
                        (&self.rx_names[i] as *const RawAddr).cast::<u8>(),
                        (m.msg_hdr.msg_namelen as usize).min(size_of::<RawAddr>()),
                    )
                };
                let src = sockets::decode(name);
                let ctrl_len = m.msg_hdr.msg_controllen.min(sockets::CONTROL_LEN);
                let ts = sockets::rx_timestamp_ns(&self.rx_ctrl[i][..ctrl_len]).unwrap_or(now);
                let lost = self.overflow.update(&self.rx_ctrl[i][..ctrl_len]);
                if lost > 0 {
                    self.core.relay.counters.drops[DropReason::SocketOverflow as usize] += lost;
                }
                match (src, truncated) {
                    (_, true) => self.core.relay.counters.drop(DropReason::Truncated),
                    (Some(src), false) => self.core.relay.on_udp(
                        &mut self.core.pool,
                        src,
                        Seg::new(bid, 0, len),
                        ts,
                        &mut self.core.out,
                    ),
                    (None, false) => {}
                }
                self.core.pool.release_received(held);
            }
            total += got;
            self.recycle();
            if got < want {
                break;
            }
        }
        total
    }

    fn accept_all(&mut self, now: u64) {
        for _ in 0..64 {
            // SAFETY: plain syscall; addresses are not requested.
            let fd = unsafe {
                libc::accept4(
                    self.tcp_fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if matches!(
                    e,
                    libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS
                ) {
                    // The listener stays readable: without a rest the loop would spin.
                    self.core
                        .relay
                        .counters
                        .drop(crate::metrics::DropReason::AcceptBackoff);
                    self.accept_backoff_until = Some(now + 100_000_000);
                    let _ = self.ctl(libc::EPOLL_CTL_MOD, self.tcp_fd, 0, token(K_LISTEN, None));
                }
                return;
            }
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            sockets::media_conn_options(&fd, self.tcp_sndbuf);
            let Some(peer) = sockets::peer_of(fd.as_raw_fd()) else {
                continue;
            };
            let raw = fd.as_raw_fd();
            if let Some(c) =
                self.core
                    .relay
                    .on_accept(&mut self.core.pool, fd, peer, now, &mut self.core.out)
                && self
                    .ctl(
                        libc::EPOLL_CTL_ADD,
                        raw,
                        libc::EPOLLIN as u32,
                        token(K_CONN, Some(c)),
                    )
                    .is_err()
            {
                self.core
                    .relay
                    .close(&mut self.core.pool, c, &mut self.core.out);
            }
        }
    }

    fn read_conn(&mut self, c: ConnId, now: u64) -> usize {
        let mut frames = 0;
        // Bounded per readiness event (level-triggered: the rest is read on the next turn).
        for _ in 0..16 {
            let Some(fd) = self.core.relay.raw_fd(c) else {
                return frames;
            };
            if self.core.relay.conn(c).is_none_or(|x| x.closing) {
                return frames;
            }
            let Some(bid) = self.free_tcp.pop() else {
                self.core.relay.counters.buf_ring_exhausted += 1;
                // Out of the set until buffers come back (level-triggered: it would spin).
                let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, 0, token(K_CONN, Some(c)));
                self.waiting_out.remove(&c);
                self.tcp_dry.push(c);
                return frames;
            };
            let size = self.core.pool.buf_size();
            // SAFETY: reading into a free pool buffer of `size` bytes.
            let r = unsafe { libc::read(fd, self.core.pool.addr(bid).cast(), size) };
            if r > 0 {
                let Some(held) = self.core.pool.received(bid) else {
                    // Not the kernel's (refused and counted by the pool): its holder gives it
                    // back; the bytes read are lost with the connection's sync, so it ends.
                    self.core
                        .relay
                        .close(&mut self.core.pool, c, &mut self.core.out);
                    return frames;
                };
                let before = self.core.relay.counters.tcp_in.packets;
                self.core.relay.on_tcp(
                    &mut self.core.pool,
                    c,
                    Seg::new(bid, 0, r as usize),
                    now,
                    &mut self.core.out,
                );
                frames += (self.core.relay.counters.tcp_in.packets - before) as usize;
                self.core.pool.release_received(held);
                if (r as usize) < size {
                    return frames;
                }
            } else {
                self.free_tcp.push(bid);
                let err = io::Error::last_os_error();
                if r < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    return frames;
                }
                if r < 0 && err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.core
                    .relay
                    .close(&mut self.core.pool, c, &mut self.core.out);
                return frames;
            }
        }
        frames
    }

    fn flush(&mut self) {
        self.core.publish_events();
        let mut out = std::mem::take(&mut self.core.out);
        self.send_udp_batch(&mut out.udp);
        out.tcp_dirty
            .sort_unstable_by_key(|c| (c.idx, c.generation));
        out.tcp_dirty.dedup();
        for c in out.tcp_dirty.drain(..) {
            self.write_conn(c);
        }
        // Writing may fail and close connections: take those too.
        out.close.append(&mut self.core.out.close);
        for c in out.close.drain(..) {
            self.waiting_out.remove(&c);
            if let Some(fd) = self.core.relay.reap(&mut self.core.pool, c) {
                // Closing the descriptor removes it from the epoll set.
                drop(fd);
            }
        }
        debug_assert!(self.core.out.udp.is_empty());
        self.core.out = out;
        self.core.relay.finish_batch(sockets::realtime_ns());
    }

    fn send_udp_batch(&mut self, outs: &mut Vec<super::relay::UdpOut>) {
        let mut start = 0;
        while start < outs.len() {
            let chunk = &outs[start..(start + BATCH).min(outs.len())];
            self.tx_msgs.clear();
            self.tx_iov.clear();
            self.tx_names.clear();
            for o in chunk {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2];
                for (k, s) in o.data.segs().iter().enumerate() {
                    iov[k] = libc::iovec {
                        iov_base: self
                            .core
                            .pool
                            .addr(s.buf)
                            .wrapping_add(usize::from(s.off))
                            .cast(),
                        iov_len: usize::from(s.len),
                    };
                }
                self.tx_iov.push(iov);
                let mut name = RawAddr::default();
                let len = sockets::encode(o.dst, self.ipv6, &mut name);
                self.tx_names.push(name);
                // SAFETY: plain C struct; filled below once the vectors stop moving.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_namelen = len;
                m.msg_hdr.msg_iovlen = o.data.segs().len() as _;
                self.tx_msgs.push(m);
            }
            for (k, m) in self.tx_msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name = (&mut self.tx_names[k] as *mut RawAddr).cast();
                m.msg_hdr.msg_iov = self.tx_iov[k].as_mut_ptr();
            }
            let count = self.tx_msgs.len();
            let mut sent = 0usize;
            while sent < count {
                // SAFETY: the arrays are live and describe pool buffers we hold references on.
                let r = unsafe {
                    libc::sendmmsg(
                        self.udp_fd,
                        self.tx_msgs.as_mut_ptr().add(sent),
                        (count - sent) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    // Socket buffer full or an unreachable destination: skip one datagram.
                    self.core.relay.counters.drop(DropReason::SendError);
                    sent += 1;
                } else {
                    sent += r as usize;
                }
            }
            start += chunk.len();
        }
        // Every datagram was sent or counted as failed: the sends' references go back.
        for o in outs.drain(..) {
            self.core.pool.sent(o.data);
        }
    }

    fn write_conn(&mut self, c: ConnId) {
        loop {
            let n = self
                .core
                .relay
                .prepare_tcp_send(&mut self.core.pool, c, &mut self.tcp_iov);
            if n == 0 {
                break;
            }
            let Some(conn) = self.core.relay.conn(c) else {
                return;
            };
            // SAFETY: plain C struct; the iovecs point at queued frames we hold references on.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.tcp_iov.as_mut_ptr();
            msg.msg_iovlen = n as _;
            // SAFETY: msg is valid for the duration of the call.
            let r = unsafe {
                libc::sendmsg(
                    conn.fd.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if r >= 0 {
                self.core.relay.tcp_sent(&mut self.core.pool, c, r as usize);
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => {
                    if self.waiting_out.insert(c)
                        && let Some(fd) = self.core.relay.raw_fd(c)
                    {
                        let _ = self.ctl(
                            libc::EPOLL_CTL_MOD,
                            fd,
                            (libc::EPOLLIN | libc::EPOLLOUT) as u32,
                            token(K_CONN, Some(c)),
                        );
                    }
                    return;
                }
                io::ErrorKind::Interrupted => continue,
                _ => {
                    self.core.relay.counters.drop(DropReason::SendError);
                    self.core
                        .relay
                        .close(&mut self.core.pool, c, &mut self.core.out);
                    return;
                }
            }
        }
        if self.waiting_out.remove(&c)
            && let Some(fd) = self.core.relay.raw_fd(c)
        {
            let _ = self.ctl(
                libc::EPOLL_CTL_MOD,
                fd,
                libc::EPOLLIN as u32,
                token(K_CONN, Some(c)),
            );
        }
    }

    fn recycle(&mut self) {
        let mut freed = std::mem::take(&mut self.freed);
        self.core.pool.take_freed(&mut freed);
        for &id in &freed {
            match self.core.pool.group(id) {
                Group::Udp => self.free.push(id),
                Group::Tcp => self.free_tcp.push(id),
                Group::Spare => debug_assert!(false, "spares are not handed to the loop"),
            }
        }
        freed.clear();
        self.freed = freed;
        if self.udp_dry && !self.free.is_empty() {
            self.set_udp_dry(false);
        }
        if !self.free_tcp.is_empty() {
            for c in std::mem::take(&mut self.tcp_dry) {
                if let Some(fd) = self.core.relay.raw_fd(c) {
                    let _ = self.ctl(
                        libc::EPOLL_CTL_MOD,
                        fd,
                        (libc::EPOLLIN | libc::EPOLLOUT) as u32,
                        token(K_CONN, Some(c)),
                    );
                    self.waiting_out.insert(c);
                }
            }
        }
    }

    fn set_udp_dry(&mut self, dry: bool) {
        self.udp_dry = dry;
        let events = if dry { 0 } else { libc::EPOLLIN as u32 };
        let _ = self.ctl(libc::EPOLL_CTL_MOD, self.udp_fd, events, token(K_UDP, None));
    }
}
