//! The measurement engine: sends the streams on the schedule and receives what the relay
//! delivers, on plain non-blocking sockets it is handed (UDP and TCP, already set up and
//! bound by [`super::setup`] or [`super::turn`]).
//!
//! - **Sender**: per stream a packet template (transport framing + [`packet`]); `smooth` and
//!   `burst` send what [`Schedule::due`] says is due (a sender that fell behind catches up in
//!   `sendmmsg` batches per socket), `flood` sends `sendmmsg` batches round-robin over the
//!   streams as fast as it can. TCP streams write frames; a connection that does not take
//!   them makes the sender drop (counted as `send_dropped`, never buffered without bound).
//! - **Receiver**: epoll over every receive socket, `recvmmsg` on UDP, read + RFC 4571
//!   deframing on TCP; per flow (receive socket × stream) sequence tracking, and an
//!   hdrhistogram of one-way latency (receive time − send time, one `CLOCK_MONOTONIC`).
//! - **Window**: after the warm-up, the relay's CPU time (`/proc/<pid>/task/*/schedstat` and
//!   `/proc/<pid>/stat`) is read at the start and end of the measured window; packets received
//!   in the window give the rate and the CPU per relayed packet. After the window the sender
//!   stops and the receiver drains, so that loss counts only what never arrived.
//!
//! On a machine with fewer than 3 cores sender and receiver run in one thread (one loop
//! alternating between sending what is due and a non-blocking receive): two threads on one
//! core would measure the scheduler, not the relay. With more cores each gets its own thread,
//! both pinned. Every loop is bounded by time.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use super::pacing::{Pacing, Schedule};
use super::packet::{self, PACKET_LEN};
use super::procfs::{self, ProcSample};
use super::seq::SeqTracker;

/// Packets per `sendmmsg`/`recvmmsg`.
pub const BATCH: usize = 64;
/// A sender further behind than this skips ahead (and says so) instead of bursting.
const MAX_CATCH_UP: u64 = 4096;
/// Bytes a TCP receive buffer holds (frames are deframed in place).
const TCP_RX_BUF: usize = 64 * 1024;
/// Flows tracked at most (bounded memory whatever arrives).
const MAX_FLOWS: usize = 200_000;
/// The relay counts as drained after this long without a packet.
const QUIET_NS: u64 = 200_000_000;
/// Longest extra drain.
const MAX_DRAIN_NS: u64 = 10_000_000_000;
/// How long after the drain a cut-off TCP frame may take to be written out.
const FLUSH_NS: u64 = 2_000_000_000;
/// Largest framing header (ChannelData: 4 bytes).
const MAX_HEADER: usize = 4;
const SLOT: usize = MAX_HEADER + PACKET_LEN + 4;

/// `CLOCK_MONOTONIC` in ns.
pub fn mono_ns() -> u64 {
    crate::shard::sockets::clock_ns(libc::CLOCK_MONOTONIC)
}

/// The latency histogram: 1 ns .. 60 s, 3 significant figures (as the gateway's).
pub fn new_histogram() -> Histogram<u64> {
    crate::metrics::dump::new_latency_histogram()
}

/// One stream's sending side.
#[derive(Clone, Debug)]
pub struct TxSpec {
    pub fd: RawFd,
    pub tcp: bool,
    /// Framing before each packet: empty (UDP), RFC 4571 length (2 bytes), ChannelData (4).
    pub header: Vec<u8>,
    /// Bytes after each packet (ChannelData over TCP pads to 4; 172 needs none).
    pub padding: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct RxSpec {
    pub fd: RawFd,
    /// RFC 4571 frames on a TCP connection (else datagrams).
    pub tcp: bool,
}

/// What to run: the sockets and how many copies of each packet should arrive.
#[derive(Clone, Debug)]
pub struct Plan {
    pub streams: Vec<TxSpec>,
    pub rx: Vec<RxSpec>,
    /// Receptions per packet sent: 1, or the listeners of a conference room.
    pub fanout: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub pacing: Pacing,
    /// Packets per second over all streams (ignored by `Flood`).
    pub rate: f64,
    pub warmup: Duration,
    pub measure: Duration,
    pub drain: Duration,
}

/// What one step measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub window_ns: u64,
    pub sent: u64,
    pub sent_in_window: u64,
    pub send_dropped: u64,
    pub sender_skipped: u64,
    pub received_unique: u64,
    pub received_in_window: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub foreign: u64,
    /// (expected, received) per flow.
    pub flows: Vec<(u64, u64)>,
    pub latency: Histogram<u64>,
    pub relay_before: Option<ProcSample>,
    pub relay_after: Option<ProcSample>,
    pub self_before: ProcSample,
    pub self_after: ProcSample,
    /// Busy ticks of the relay's core at the start and end of the window.
    pub relay_core_busy: Option<(u64, u64)>,
    /// The same for the load generator's (sender's) core.
    pub load_core_busy: Option<(u64, u64)>,
}

struct StreamTx {
    fd: RawFd,
    tcp: bool,
    hlen: usize,
    padding: usize,
    /// header + packet template + padding.
    template: [u8; SLOT],
    seq: u64,
    sent: u64,
    pending: Vec<u8>,
}

impl StreamTx {
    fn frame_len(&self) -> usize {
        self.hlen + PACKET_LEN + self.padding
    }
}

struct Sender {
    streams: Vec<StreamTx>,
    sched: Schedule,
    next: u64,
    rr: usize,
    scratch: Vec<[u8; SLOT]>,
    tcp_scratch: Vec<u8>,
    send_dropped: u64,
    skipped: u64,
    sent_total: u64,
    window: (u64, u64),
    sent_in_window: u64,
}

impl Sender {
    fn new(plan: &Plan, sched: Schedule) -> Sender {
        let streams = plan
            .streams
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let hlen = t.header.len().min(MAX_HEADER);
                let mut template = [0u8; SLOT];
                template[..hlen].copy_from_slice(&t.header[..hlen]);
                let _ = packet::write(&mut template[hlen..], i as u32, 0, 0);
                StreamTx {
                    fd: t.fd,
                    tcp: t.tcp,
                    hlen,
                    padding: t.padding.min(3),
                    template,
                    seq: 0,
                    sent: 0,
                    pending: Vec::new(),
                }
            })
            .collect();
        Sender {
            streams,
            sched,
            next: 0,
            rr: 0,
            scratch: vec![[0u8; SLOT]; BATCH],
            tcp_scratch: Vec::with_capacity(BATCH * SLOT),
            send_dropped: 0,
            skipped: 0,
            sent_total: 0,
            window: (0, 0),
            sent_in_window: 0,
        }
    }

    /// Sends `count` (≤ BATCH) packets of stream `s`, stamped `now`.
    fn send(&mut self, s: usize, count: usize, now: u64) {
        let count = count.min(BATCH);
        let in_window = now >= self.window.0 && now < self.window.1;
        let st = &mut self.streams[s];
        let flen = st.frame_len();
        let ok = if st.tcp {
            // Flush what a previous partial write left; if that does not go, drop.
            if !st.pending.is_empty() {
                if let Some(n) = write_fd(st.fd, &st.pending) {
                    st.pending.drain(..n);
                }
            }
            if !st.pending.is_empty() {
                0
            } else {
                self.tcp_scratch.clear();
                for _ in 0..count {
                    let _ = packet::restamp(&mut st.template[st.hlen..], st.seq, now);
                    st.seq += 1;
                    self.tcp_scratch.extend_from_slice(&st.template[..flen]);
                }
                match write_fd(st.fd, &self.tcp_scratch) {
                    Some(n) if n == self.tcp_scratch.len() => count,
                    Some(n) => {
                        // A partial frame must be completed; whole frames not written are
                        // dropped.
                        let whole = n / flen;
                        let part = n % flen;
                        if part > 0 {
                            st.pending
                                .extend_from_slice(&self.tcp_scratch[n..(whole + 1) * flen]);
                            whole + 1
                        } else {
                            whole
                        }
                    }
                    None => 0,
                }
            }
        } else if count == 1 {
            let _ = packet::restamp(&mut st.template[st.hlen..], st.seq, now);
            st.seq += 1;
            // SAFETY: template is valid for flen bytes; the fd is a connected UDP socket.
            let r =
                unsafe { libc::send(st.fd, st.template.as_ptr().cast(), flen, libc::MSG_DONTWAIT) };
            usize::from(r > 0)
        } else {
            let mut iov: [libc::iovec; BATCH] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            // SAFETY: mmsghdr is plain data; zero is a valid (empty) value.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..count {
                let slot = &mut self.scratch[i];
                slot[..flen].copy_from_slice(&st.template[..flen]);
                let _ = packet::restamp(&mut slot[st.hlen..], st.seq, now);
                st.seq += 1;
                iov[i].iov_base = slot.as_mut_ptr().cast();
                iov[i].iov_len = flen;
                msgs[i].msg_hdr.msg_iov = &mut iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: msgs/iov point into live buffers for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(st.fd, msgs.as_mut_ptr(), count as u32, libc::MSG_DONTWAIT)
            };
            if r > 0 { r as usize } else { 0 }
        };
        st.sent += ok as u64;
        self.sent_total += ok as u64;
        if in_window {
            self.sent_in_window += ok as u64;
        }
        self.send_dropped += (count - ok) as u64;
    }

    /// Tries once to write what partial TCP writes left; true when nothing is left. A frame
    /// must never be cut off: the next step writes on the same connection.
    fn flush_pending(&mut self) -> bool {
        let mut done = true;
        for st in self.streams.iter_mut().filter(|s| !s.pending.is_empty()) {
            if let Some(n) = write_fd(st.fd, &st.pending) {
                st.pending.drain(..n);
            }
            done &= st.pending.is_empty();
        }
        done
    }

    /// Sends what is due at `now` (`start`: the schedule's time 0).
    fn pump(&mut self, start: u64, now: u64) {
        let n_streams = self.streams.len();
        if n_streams == 0 {
            return;
        }
        if self.sched.pacing == Pacing::Flood {
            let s = self.rr % n_streams;
            self.rr = self.rr.wrapping_add(1);
            self.send(s, 32, now);
            return;
        }
        let due = self.sched.due(now.saturating_sub(start));
        if due <= self.next {
            return;
        }
        let mut n = due - self.next;
        if n > MAX_CATCH_UP {
            self.skipped += n - MAX_CATCH_UP;
            self.next = due - MAX_CATCH_UP;
            n = MAX_CATCH_UP;
        }
        if n <= 4 || (n as usize) < n_streams {
            for k in self.next..due {
                let s = self.sched.stream_of(k) as usize;
                self.send(s, 1, now);
            }
        } else {
            // Every stream gets n / S packets, the first n % S (from where we are) one more.
            let base = n / n_streams as u64;
            let extra = n % n_streams as u64;
            let first = (self.next % n_streams as u64) as usize;
            for i in 0..n_streams {
                let s = (first + i) % n_streams;
                let mut c = base + u64::from((i as u64) < extra);
                while c > 0 {
                    let b = c.min(BATCH as u64);
                    self.send(s, b as usize, now);
                    c -= b;
                }
            }
        }
        self.next = due;
    }
}

struct RxState {
    fd: RawFd,
    tcp: bool,
    buf: Vec<u8>,
    have: usize,
    open: bool,
}

struct Receiver {
    epfd: RawFd,
    rx: Vec<RxState>,
    flows: FxHashMap<u64, SeqTracker>,
    latency: Histogram<u64>,
    window: (u64, u64),
    in_window: u64,
    foreign: u64,
    /// When the last packet arrived (for draining until the relay is quiet).
    last_rx: u64,
    bufs: Vec<[u8; 2048]>,
}

impl Receiver {
    fn new(plan: &Plan) -> std::io::Result<Receiver> {
        // SAFETY: plain syscall.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut rx = Vec::new();
        for (i, r) in plan.rx.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: valid epoll fd and event.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, r.fd, &mut ev) } < 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: our fd.
                unsafe { libc::close(epfd) };
                return Err(e);
            }
            rx.push(RxState {
                fd: r.fd,
                tcp: r.tcp,
                buf: if r.tcp {
                    vec![0; TCP_RX_BUF]
                } else {
                    Vec::new()
                },
                have: 0,
                open: true,
            });
        }
        Ok(Receiver {
            epfd,
            rx,
            flows: FxHashMap::default(),
            latency: new_histogram(),
            window: (0, 0),
            in_window: 0,
            foreign: 0,
            last_rx: 0,
            bufs: vec![[0u8; 2048]; BATCH],
        })
    }

    fn on_packet(&mut self, rx: usize, b: &[u8], now: u64) {
        self.last_rx = now;
        let Some(st) = packet::read(b) else {
            self.foreign += 1;
            return;
        };
        let key = ((rx as u64) << 32) | u64::from(st.stream);
        if let Some(t) = self.flows.get_mut(&key) {
            t.on_packet(st.seq);
        } else if self.flows.len() < MAX_FLOWS {
            self.flows.entry(key).or_default().on_packet(st.seq);
        } else {
            self.foreign += 1;
            return;
        }
        if now >= self.window.0 && now < self.window.1 {
            self.in_window += 1;
            self.latency
                .saturating_record(now.saturating_sub(st.send_ns).max(1));
        }
    }

    fn drain_udp(&mut self, i: usize) {
        let fd = self.rx[i].fd;
        // At most 16 batches per readiness: other sockets get their turn.
        for _ in 0..16 {
            let mut iov: [libc::iovec; BATCH] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            // SAFETY: plain data, zero is valid.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for j in 0..BATCH {
                iov[j].iov_base = self.bufs[j].as_mut_ptr().cast();
                iov[j].iov_len = 2048;
                msgs[j].msg_hdr.msg_iov = &mut iov[j];
                msgs[j].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: buffers live across the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r <= 0 {
                return;
            }
            let now = mono_ns();
            let bufs = std::mem::take(&mut self.bufs);
            for (j, m) in msgs.iter().enumerate().take(r as usize) {
                self.on_packet(i, &bufs[j][..(m.msg_len as usize).min(2048)], now);
            }
            self.bufs = bufs;
            if (r as usize) < BATCH {
                return;
            }
        }
    }

    fn drain_tcp(&mut self, i: usize) {
        for _ in 0..16 {
            let st = &mut self.rx[i];
            if st.have == st.buf.len() {
                // A frame larger than the buffer cannot be ours: start over.
                st.have = 0;
            }
            let Some(n) = read_fd(st.fd, &mut st.buf[st.have..]) else {
                return;
            };
            if n == 0 {
                st.open = false;
                // SAFETY: deregistering our own fd from our epoll.
                unsafe {
                    libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, st.fd, std::ptr::null_mut())
                };
                return;
            }
            st.have += n;
            let now = mono_ns();
            let mut at = 0;
            let mut buf = std::mem::take(&mut self.rx[i].buf);
            let have = self.rx[i].have;
            while have - at >= 2 {
                let len = usize::from(u16::from_be_bytes([buf[at], buf[at + 1]]));
                if have - at < 2 + len {
                    break;
                }
                self.on_packet(i, &buf[at + 2..at + 2 + len], now);
                at += 2 + len;
            }
            buf.copy_within(at..have, 0);
            let st = &mut self.rx[i];
            st.buf = buf;
            st.have = have - at;
            if n < TCP_RX_BUF / 2 {
                return;
            }
        }
    }

    /// Waits up to `timeout_ms` for readiness and drains the ready sockets.
    fn poll(&mut self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 256];
        // SAFETY: evs is valid for 256 events.
        let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 256, timeout_ms) };
        for ev in evs.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            if i >= self.rx.len() || !self.rx[i].open {
                continue;
            }
            if self.rx[i].tcp {
                self.drain_tcp(i);
            } else {
                self.drain_udp(i);
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SAFETY: our own epoll fd.
        unsafe { libc::close(self.epfd) };
    }
}

fn write_fd(fd: RawFd, b: &[u8]) -> Option<usize> {
    // SAFETY: b is valid for b.len() bytes.
    let r = unsafe {
        libc::send(
            fd,
            b.as_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r >= 0 { Some(r as usize) } else { None }
}

fn read_fd(fd: RawFd, b: &mut [u8]) -> Option<usize> {
    // SAFETY: b is valid for b.len() bytes.
    let r = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    if r >= 0 { Some(r as usize) } else { None }
}

/// Where the engine's threads run.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Cores for the sender and the receiver (the same one: a single combined thread).
    pub sender_core: Option<usize>,
    pub receiver_core: Option<usize>,
    /// The relay's core, to see what else ran there.
    pub relay_core: Option<usize>,
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Runs one step over `plan`; `relay_pid` is sampled around the measured window.
pub fn run_step(
    plan: &Plan,
    step: &Step,
    relay_pid: Option<u32>,
    placement: &Placement,
) -> std::io::Result<Outcome> {
    let sched = Schedule {
        rate: step.rate,
        pacing: step.pacing,
        streams: plan.streams.len() as u32,
    };
    let mut sender = Sender::new(plan, sched);
    let mut receiver = Receiver::new(plan)?;
    let start = mono_ns() + 1_000_000;
    let w0 = start + step.warmup.as_nanos() as u64;
    let w1 = w0 + step.measure.as_nanos() as u64;
    let end = w1 + step.drain.as_nanos() as u64;
    sender.window = (w0, w1);
    receiver.window = (w0, w1);
    let combined = placement.sender_core == placement.receiver_core;

    let core_ticks = || {
        (
            placement.relay_core.and_then(procfs::cpu_busy_ticks),
            placement.sender_core.and_then(procfs::cpu_busy_ticks),
        )
    };
    let mut core_before = (None, None);
    let sample_relay = || relay_pid.and_then(|p| procfs::sample(p).ok());
    let (relay_before, relay_after, self_before, self_after, receiver, core_after) = if combined {
        pin(placement.sender_core);
        let mut relay_before = None;
        let mut self_before = ProcSample::default();
        let mut started = false;
        loop {
            let now = mono_ns();
            if now >= w1 {
                break;
            }
            if !started && now >= w0 {
                started = true;
                core_before = core_ticks();
                relay_before = sample_relay();
                self_before = procfs::sample(0).unwrap_or_default();
            }
            if now >= start {
                sender.pump(start, now);
            }
            receiver.poll(0);
        }
        let relay_after = sample_relay();
        let core_after = core_ticks();
        let self_after = procfs::sample(0).unwrap_or_default();
        let flush_until = end + FLUSH_NS;
        while !sender.flush_pending() && mono_ns() < flush_until {
            receiver.poll(0);
        }
        // Drain until the relay has been quiet for QUIET_NS (queues emptied: the next step
        // starts clean), at most MAX_DRAIN_NS after the drain time.
        loop {
            let now = mono_ns();
            if now >= end + MAX_DRAIN_NS || (now >= end && now >= receiver.last_rx + QUIET_NS) {
                break;
            }
            receiver.poll(1);
        }
        (
            relay_before,
            relay_after,
            self_before,
            self_after,
            receiver,
            core_after,
        )
    } else {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = stop.clone();
        let rcore = placement.receiver_core;
        let rx_thread = std::thread::Builder::new()
            .name("bench-rx".into())
            .spawn(move || {
                pin(rcore);
                let mut r = receiver;
                loop {
                    let now = mono_ns();
                    let quiet = stop_rx.load(Ordering::Relaxed) && now >= r.last_rx + QUIET_NS;
                    if quiet || now >= end + MAX_DRAIN_NS + FLUSH_NS {
                        break;
                    }
                    r.poll(1);
                }
                r
            })?;
        pin(placement.sender_core);
        while mono_ns() < w0 {
            let now = mono_ns();
            if now >= start {
                sender.pump(start, now);
            }
        }
        core_before = core_ticks();
        let relay_before = sample_relay();
        let self_before = procfs::sample(0).unwrap_or_default();
        loop {
            let now = mono_ns();
            if now >= w1 {
                break;
            }
            sender.pump(start, now);
        }
        let relay_after = sample_relay();
        let core_after = core_ticks();
        let self_after = procfs::sample(0).unwrap_or_default();
        let flush_until = end + FLUSH_NS;
        while !sender.flush_pending() && mono_ns() < flush_until {
            std::thread::sleep(Duration::from_micros(100));
        }
        while mono_ns() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        let receiver = rx_thread
            .join()
            .map_err(|_| std::io::Error::other("the receiver thread panicked"))?;
        (
            relay_before,
            relay_after,
            self_before,
            self_after,
            receiver,
            core_after,
        )
    };

    if !sender.flush_pending() {
        return Err(std::io::Error::other(
            "a TCP connection did not take the rest of a frame within 2 s: the stream is cut",
        ));
    }
    let fanout = u64::from(plan.fanout.max(1));
    let mut flows = Vec::new();
    let (mut unique, mut dups, mut reord) = (0, 0, 0);
    // Expected per flow: what its stream sent (each flow is one stream on one socket).
    let mut per_stream_flows: FxHashMap<u32, u64> = FxHashMap::default();
    for (key, t) in &receiver.flows {
        let stream = (*key & 0xffff_ffff) as u32;
        *per_stream_flows.entry(stream).or_default() += 1;
        let sent = sender.streams.get(stream as usize).map_or(0, |s| s.sent);
        flows.push((sent, t.unique.min(sent)));
        unique += t.unique.min(sent);
        dups += t.duplicates;
        reord += t.reordered;
    }
    // Flows that never received anything are starved flows too.
    for (i, s) in sender.streams.iter().enumerate() {
        let seen = per_stream_flows.get(&(i as u32)).copied().unwrap_or(0);
        for _ in seen..fanout {
            flows.push((s.sent, 0));
        }
    }
    Ok(Outcome {
        window_ns: w1 - w0,
        sent: sender.sent_total,
        sent_in_window: sender.sent_in_window,
        send_dropped: sender.send_dropped,
        sender_skipped: sender.skipped,
        received_unique: unique,
        received_in_window: receiver.in_window,
        duplicates: dups,
        reordered: reord,
        foreign: receiver.foreign,
        flows,
        latency: receiver.latency.clone(),
        relay_before,
        relay_after,
        self_before,
        self_after,
        relay_core_busy: core_before.0.zip(core_after.0),
        load_core_busy: core_before.1.zip(core_after.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// The engine against itself (no relay): every packet arrives, in order, once.
    #[test]
    fn loopback_without_relay_loses_nothing() {
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let tx: Vec<UdpSocket> = rx
            .iter()
            .map(|r| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(r.local_addr().unwrap()).unwrap();
                s
            })
            .collect();
        for s in rx.iter().chain(&tx) {
            s.set_nonblocking(true).unwrap();
        }
        let plan = Plan {
            streams: tx
                .iter()
                .map(|s| TxSpec {
                    fd: s.as_raw_fd(),
                    tcp: false,
                    header: Vec::new(),
                    padding: 0,
                })
                .collect(),
            rx: rx
                .iter()
                .map(|s| RxSpec {
                    fd: s.as_raw_fd(),
                    tcp: false,
                })
                .collect(),
            fanout: 1,
        };
        let step = Step {
            pacing: Pacing::Smooth,
            rate: 3000.0,
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
            drain: Duration::from_millis(50),
        };
        let o = run_step(&plan, &step, None, &Placement::default()).unwrap();
        assert!(o.sent >= 300, "sent {}", o.sent);
        assert_eq!(o.received_unique, o.sent);
        assert_eq!(o.duplicates, 0);
        assert_eq!(o.flows.len(), 3);
        assert!(!o.latency.is_empty());
    }
}
