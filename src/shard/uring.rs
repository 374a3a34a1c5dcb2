//! The io_uring event loop of one shard.
//!
//! - UDP: one multishot `RecvMsgMulti` over a provided buffer ring (group 0). Each completion
//!   names a buffer holding `io_uring_recvmsg_out`, the source address, the `SO_TIMESTAMPNS`
//!   control message and the datagram; the payload is forwarded from where it landed.
//! - TCP: multishot accept on the listener; on each media connection a multishot receive with
//!   buffer selection from a second ring (group 1).
//! - Sends: `SendMsg` entries, as many as a batch produces, submitted together with the wait for
//!   the next batch in one `io_uring_enter`. All are non-blocking (`MSG_DONTWAIT`): a TCP
//!   connection whose socket is full gets EAGAIN at once and waits for POLLOUT, so its queued
//!   frames are never pinned by a send parked in the kernel (they stay subject to the age and
//!   oldest-first drops), and one slow reader costs the shard nothing else.
//! - The ring is `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`: completions run only when this
//!   thread enters the kernel, which is when it wants them.
//! - The UDP socket and the listener are registered files (`IORING_REGISTER_FILES`): receives,
//!   sends and accepts name them by index, with no file-table lookup per operation.
//! - The ring itself is registered with the shard's thread (`IORING_REGISTER_RING_FDS`): every
//!   `io_uring_enter` names it by index. A coalescing turn enters the kernel once: its sends
//!   and the wait until an absolute deadline (`IORING_ENTER_ABS_TIMER`) in one call.
//! - A UDP datagram of one segment goes out as `IORING_OP_SEND` with the destination in the
//!   entry (no `msghdr` to copy, no iovec to import); two segments as `SENDMSG`.
//! - The UDP buffer ring holds only what a turn takes; the other free buffers wait in a list,
//!   most recently used first, so receives land in warm buffers.
//! - Wake-up coalescing: with a budget `B`, the loop sends its batch, then sleeps until `B`
//!   after it last woke (at most `BATCH / rate`), and then takes whatever has arrived
//!   (`min_wait`); so a lightly loaded shard handles a millisecond's packets per wake-up instead
//!   of one, no packet waits much more than `B`, and a busy shard, whose handling and sending
//!   already took the budget, never sleeps.
//!
//! When a multishot receive stops because its buffer ring ran dry (ENOBUFS) it is re-armed once
//! buffers have come back, and `Counters::buf_ring_exhausted` counts it.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::leg_sockets::{self, LegSockets, Pick};
use super::pool::{BufId, Group, InFlight, Pool, Seg};
use super::relay::{ConnId, UdpOut};
use super::sockets::{self, RawAddr, ShardSockets};
use super::{Backend, ShardCore};

const UDP_BGID: u16 = 0;
const TCP_BGID: u16 = 1;

/// Completions handled per turn of the loop.
const MAX_CQES: usize = 256;
/// The most datagrams a coalescing wait gathers. The kernel's multishot receive takes at most
/// `MULTISHOT_RUN` datagrams per run of its deferred work and leaves the rest for a later run; a
/// turn gets two runs (when it wakes, and when it sends before sleeping), and a turn whose
/// second run was a full one does not sleep. A bigger batch costs a little less CPU and makes
/// more turns go round twice (measured at 100k packets/s: p99 0.8 ms with 60-packet batches,
/// 1.3-4.9 ms with 100).
const BATCH: usize = 60;
/// Datagrams a multishot receive takes per run of its deferred work (the kernel's
/// `MULTISHOT_MAX_RETRY`).
const MULTISHOT_RUN: usize = 32;
/// UDP buffers published in the ring at least (see `UringShard::udp_spare`).
const UDP_RING_LOW: usize = 64;
/// TCP sends started per turn; each may gather up to `TCP_IOV` iovecs from a shared arena.
const TCP_SENDS_PER_TURN: usize = 256;

/// How long multishot accept rests after running out of descriptors or memory.
const ACCEPT_BACKOFF_NS: u64 = 100_000_000;

/// Registered-file indexes.
const FIXED_UDP: u32 = 0;
const FIXED_LISTENER: u32 = 1;
/// Leg sockets (`leg_sockets`) take the registered files from here on, one per slot.
const FIRST_LEG_FILE: u32 = 2;

const K_UDP_RECV: u64 = 1;
const K_ACCEPT: u64 = 2;
const K_WAKE: u64 = 3;
const K_TCP_RECV: u64 = 4;
const K_TCP_SEND: u64 = 5;
const K_UDP_SEND: u64 = 6;
/// A TCP connection whose non-blocking send found its socket full waits for POLLOUT.
const K_TCP_POLL: u64 = 7;
/// The multishot receive of a leg socket (index: its slot; generation: the socket's).
const K_LEG_RECV: u64 = 8;

fn ud(kind: u64, generation: u32, idx: u32) -> u64 {
    (kind << 56) | (u64::from(generation & 0x00ff_ffff) << 32) | u64::from(idx)
}

fn ud_split(u: u64) -> (u64, u32, u32) {
    (u >> 56, ((u >> 32) & 0x00ff_ffff) as u32, u as u32)
}

/// `IORING_REGISTER_RING_FDS` (5.18).
const IORING_REGISTER_RING_FDS: libc::c_long = 20;
/// `IORING_UNREGISTER_RING_FDS`.
const IORING_UNREGISTER_RING_FDS: libc::c_long = 21;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// `struct io_uring_getevents_arg` (`IORING_ENTER_EXT_ARG`).
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

impl KernelTimespec {
    fn from_ns(ns: u64) -> KernelTimespec {
        KernelTimespec {
            tv_sec: (ns / 1_000_000_000) as i64,
            tv_nsec: (ns % 1_000_000_000) as i64,
        }
    }
}

/// A provided-buffer ring (IORING_REGISTER_PBUF_RING): entries in an mmap'd page-aligned area
/// shared with the kernel; we publish buffers by writing entries and advancing the tail.
struct BufRing {
    base: *mut types::BufRingEntry,
    map_len: usize,
    entries: u16,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring, entries: usize, bgid: u16) -> io::Result<BufRing> {
        let entries = entries.next_power_of_two().clamp(1, 32768);
        let map_len = entries * size_of::<types::BufRingEntry>();
        // SAFETY: anonymous mapping, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let br = BufRing {
            base: ptr.cast(),
            map_len,
            entries: entries as u16,
            tail: 0,
        };
        // SAFETY: the mapping lives as long as `br`, which the shard drops after the ring.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ptr as u64, entries as u16, bgid, 0)?;
        }
        Ok(br)
    }

    /// Stage buffer `id` (not visible to the kernel until `commit`).
    fn push(&mut self, pool: &Pool, id: BufId) {
        let i = usize::from(self.tail & (self.entries - 1));
        // SAFETY: i < entries, inside the mapping.
        let e = unsafe { &mut *self.base.add(i) };
        e.set_addr(pool.addr(id) as u64);
        e.set_len(pool.buf_size() as u32);
        e.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    fn commit(&self) {
        // SAFETY: the tail field overlays entry 0's reserved word (the kernel's layout); it is
        // read by the kernel, so it is published with release ordering.
        unsafe {
            let tail = types::BufRingEntry::tail(self.base).cast_mut();
            (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; the ring (which referenced it) is gone by now.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// A UDP send in flight: the kernel reads `msg`, `iov` and `addr` until it completes.
#[repr(C)]
struct SendSlot {
    msg: libc::msghdr,
    iov: [libc::iovec; 2],
    addr: RawAddr,
}

/// A ring set up for a shard, not yet running.
pub(crate) struct Rings {
    ring: IoUring,
    udp_ring: BufRing,
    tcp_ring: BufRing,
    min_wait: bool,
    /// Registered-file slots for leg sockets (0: none, the kernel refused a sparse table).
    leg_files: u32,
}

pub(crate) struct UringShard {
    // Field order is drop order: the ring goes first, then the memory it referenced.
    ring: IoUring,
    udp_ring: BufRing,
    tcp_ring: BufRing,
    core: ShardCore,
    ipv6: bool,
    recv_msg: Box<libc::msghdr>,
    slots: Box<[SendSlot]>,
    /// The references of the send in each slot: taken from its `UdpOut` at submit, given
    /// back (`Pool::sent`) by its completion. A completion for a slot without one releases
    /// nothing.
    sending: Box<[Option<InFlight>]>,
    free_slots: Vec<u32>,
    udp_recv_armed: bool,
    accept_armed: bool,
    wake_armed: bool,
    /// TCP connections whose multishot receive stopped for lack of buffers.
    tcp_rearm: Vec<ConnId>,
    cqes: Vec<(u64, i32, u32)>,
    /// Completions were left in the queue last turn (at most `MAX_CQES` are handled per turn,
    /// so that TCP queues drain between chunks of a burst).
    cq_backlog: bool,
    freed: Vec<BufId>,
    /// msghdrs and iovecs of this turn's TCP sends. The kernel copies them when it consumes
    /// the submission (IORING_FEAT_SUBMIT_STABLE), so they are reused after every submit;
    /// only the frames they point at must stay until the send completes.
    tcp_msgs: Box<[libc::msghdr]>,
    tcp_msgs_used: usize,
    tcp_iov: Box<[libc::iovec]>,
    tcp_iov_used: usize,
    /// Connections whose send did not fit in this turn's arena.
    tcp_deferred: Vec<ConnId>,
    /// UDP sends are non-blocking with IOSQE_CQE_SKIP_SUCCESS (kernel 5.17+).
    skip_success: bool,
    /// Their slots, submitted this turn.
    udp_sent: Vec<u32>,
    /// TCP sends (or waits for POLLOUT) in flight.
    tcp_inflight: usize,
    /// A receive ring ran dry this turn.
    starved: bool,
    /// A TCP connection delivered bytes this turn. The one-enter wait (`submit_and_wait`)
    /// estimates what arrived from the rate of completions, and one TCP completion can carry
    /// a whole buffer of frames: a turn that read TCP takes the two-step wait, which goes on
    /// at once when a full run of completions is already there.
    tcp_read: bool,
    /// Connections whose last receive this turn filled its buffer: the kernel's multishot run
    /// stopped before the socket was empty (it takes a bounded number of buffers per run), so
    /// bytes are waiting. Such a turn does not sleep: TCP holds what is not read in the
    /// sender's window, and a shard that sleeps on it throttles every TCP leg (20 tcp→udp
    /// streams at flood: 109k packets/s with the budget against 174k without, the relay idle
    /// 60 %).
    tcp_full: Vec<ConnId>,
    /// The UDP ring ran dry: the multishot receive is re-armed only once buffers came back
    /// (re-arming a dry ring fails at once, and the loop would spin).
    udp_dry: bool,
    /// TCP connections whose receive stopped on a dry ring; re-armed when TCP buffers return.
    tcp_dry: Vec<ConnId>,
    /// Free UDP buffers not published in the ring, most recently used on top. The kernel takes
    /// a ring's buffers in the order they were published, so a ring holding all of them (4,096
    /// by default) hands out each buffer once per 4,096 datagrams: every receive wrote into a
    /// cache-cold buffer. The ring holds only what a turn takes (`udp_in_ring` at least
    /// `UDP_RING_LOW`, or twice the last turn's datagrams); the rest wait here, and the most
    /// recently freed go back first, so a few dozen warm buffers carry the traffic (as the
    /// epoll loop's free list does).
    udp_spare: Vec<BufId>,
    /// Buffers published in the UDP ring and not yet consumed (as far as the completions
    /// taken show).
    udp_in_ring: usize,
    /// UDP receive buffers consumed since the last top-up.
    udp_used: usize,
    /// Multishot accept failed for lack of descriptors or memory: not re-armed before this.
    accept_backoff_until: u64,
    overflow: sockets::OverflowTracker,
    tcp_sndbuf: i32,
    coalesce: Duration,
    min_wait: bool,
    /// The ring's index among this thread's registered ring descriptors
    /// (`IORING_REGISTER_RING_FDS`): every `io_uring_enter` names the ring by it
    /// (`IORING_ENTER_REGISTERED_RING`), without a file-table lookup and reference count per
    /// call. None where the kernel refused (before 5.18): the descriptor is used.
    ring_index: Option<u32>,
    /// Single-segment UDP sends are `IORING_OP_SEND` with the destination in the entry (6.0+),
    /// not `SENDMSG`: the kernel copies no `msghdr` and imports no iovec per datagram. Turned
    /// off for good if the kernel refuses it (EINVAL).
    send_to: bool,
    /// The kernel takes an absolute deadline for a wait (`IORING_ENTER_ABS_TIMER`, 6.12): a
    /// coalescing turn then sends and sleeps in one enter (see `submit_and_wait`).
    abs_timer: bool,
    /// Connected UDP sockets for the legs media is sent to (see `leg_sockets`).
    legs: LegSockets,
    /// When this turn began (the loop's clock for leg sockets' idle times).
    turn_ns: u64,
    // Keep the sockets open as long as the loop runs (the loop uses their raw fds).
    _udp: socket2::Socket,
    _tcp: socket2::Socket,
}

impl UringShard {
    /// Sets up the ring and its buffer rings for `core`; on failure the caller still owns
    /// `core` and can run the epoll loop instead.
    pub fn prepare(core: &ShardCore, sockets: &ShardSockets) -> io::Result<Rings> {
        let (ring, udp_ring, tcp_ring, min_wait) = Self::setup(core)?;
        // Registered files: the UDP socket and the listener are used by index
        // (IOSQE_FIXED_FILE), so the hot path's receives and sends skip the per-operation
        // file-table lookup and reference count. (The ring holds its own reference to the
        // files; the loop's clones of the descriptors refer to the same sockets.)
        // Leg sockets take slots of a sparse table after these two (`FIRST_LEG_FILE`).
        let fds = [sockets.udp.as_raw_fd(), sockets.tcp.as_raw_fd()];
        let cfg = &core.ctx.cfg;
        let legs = leg_sockets::cap(cfg.leg_sockets, cfg.shards, leg_sockets::nofile_limit());
        let legs = u32::try_from(legs).unwrap_or(0);
        let leg_files = if legs > 0
            && ring
                .submitter()
                .register_files_sparse(FIRST_LEG_FILE + legs)
                .is_ok()
        {
            ring.submitter().register_files_update(0, &fds)?;
            legs
        } else {
            ring.submitter().register_files(&fds)?;
            0
        };
        Ok(Rings {
            ring,
            udp_ring,
            tcp_ring,
            min_wait,
            leg_files,
        })
    }

    pub fn new(core: ShardCore, rings: Rings, sockets: &ShardSockets) -> io::Result<UringShard> {
        let udp = sockets.udp.try_clone()?;
        let tcp = sockets.tcp.try_clone()?;
        let cfg = &core.ctx.cfg;
        let opts = sockets::SocketOptions {
            udp_rcvbuf: cfg.udp_rcvbuf,
            udp_sndbuf: cfg.udp_sndbuf,
            backlog: 0,
        };
        let legs = LegSockets::new(
            sockets.udp_addr,
            sockets.ipv6,
            opts,
            rings.leg_files as usize,
        );
        Ok(Self::assemble(
            core,
            rings.ring,
            rings.udp_ring,
            rings.tcp_ring,
            rings.min_wait,
            legs,
            (udp, tcp),
        ))
    }

    fn setup(core: &ShardCore) -> io::Result<(IoUring, BufRing, BufRing, bool)> {
        let cfg = &core.ctx.cfg;
        let entries = cfg.ring_entries.clamp(64, 32768);
        let ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        if !ring.params().is_feature_submit_stable() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_SUBMIT_STABLE",
            ));
        }
        let min_wait = ring.params().is_feature_min_timeout();
        let mut udp_ring = BufRing::new(&ring, cfg.udp_bufs, UDP_BGID)?;
        let mut tcp_ring = BufRing::new(&ring, cfg.tcp_bufs.max(1), TCP_BGID)?;
        let layout = *core.pool.layout();
        for id in 0..layout.udp.min(UDP_RING_LOW) {
            udp_ring.push(&core.pool, id as BufId);
        }
        for id in layout.udp..layout.udp + layout.tcp {
            tcp_ring.push(&core.pool, id as BufId);
        }
        udp_ring.commit();
        tcp_ring.commit();
        Ok((ring, udp_ring, tcp_ring, min_wait))
    }

    fn assemble(
        core: ShardCore,
        ring: IoUring,
        udp_ring: BufRing,
        tcp_ring: BufRing,
        min_wait: bool,
        legs: LegSockets,
        (udp, tcp): (socket2::Socket, socket2::Socket),
    ) -> UringShard {
        let cfg = &core.ctx.cfg;
        let ipv6 = cfg.relay.ipv6;
        // SAFETY: all-zero msghdr is valid; only the lengths matter for multishot recvmsg.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = if ipv6 {
            size_of::<libc::sockaddr_in6>()
        } else {
            size_of::<libc::sockaddr_in>()
        } as libc::socklen_t;
        recv_msg.msg_controllen = sockets::CONTROL_LEN as _;
        let nslots = cfg.send_slots.clamp(16, 1 << 20);
        let slots: Box<[SendSlot]> = (0..nslots)
            // SAFETY: SendSlot is plain C data; all-zero is valid.
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        UringShard {
            ipv6,
            recv_msg,
            free_slots: (0..nslots as u32).rev().collect(),
            slots,
            sending: (0..nslots).map(|_| None).collect(),
            udp_recv_armed: false,
            accept_armed: false,
            wake_armed: false,
            tcp_rearm: Vec::new(),
            cqes: Vec::with_capacity(MAX_CQES),
            cq_backlog: false,
            freed: Vec::with_capacity(4096),
            // SAFETY (zeroed): plain C structs.
            tcp_msgs: (0..TCP_SENDS_PER_TURN)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            tcp_msgs_used: 0,
            tcp_iov: (0..TCP_SENDS_PER_TURN * 8)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            tcp_iov_used: 0,
            tcp_deferred: Vec::new(),
            skip_success: ring.params().is_feature_skip_cqe_on_success(),
            udp_sent: Vec::with_capacity(nslots),
            tcp_inflight: 0,
            starved: false,
            tcp_read: false,
            tcp_full: Vec::new(),
            udp_dry: false,
            tcp_dry: Vec::new(),
            udp_spare: (UDP_RING_LOW.min(core.pool.layout().udp)..core.pool.layout().udp)
                .rev()
                .map(|i| i as BufId)
                .collect(),
            udp_in_ring: UDP_RING_LOW.min(core.pool.layout().udp),
            udp_used: 0,
            accept_backoff_until: 0,
            overflow: sockets::OverflowTracker::default(),
            tcp_sndbuf: i32::try_from(cfg.tcp_sndbuf).unwrap_or(i32::MAX),
            coalesce: cfg.coalesce,
            min_wait,
            ring_index: None,
            // Both came before min_wait (6.12), which marks a kernel new enough.
            send_to: min_wait,
            abs_timer: min_wait,
            legs,
            turn_ns: 0,
            ring,
            udp_ring,
            tcp_ring,
            core,
            _udp: udp,
            _tcp: tcp,
        }
    }

    /// Queues a submission; false if it could not be queued (the caller then undoes what it
    /// marked armed or in flight, so nothing waits forever for a completion that never comes).
    #[must_use]
    fn push(&mut self, sqe: squeue::Entry) -> bool {
        for _ in 0..3 {
            // SAFETY: every entry we push references memory that outlives the operation
            // (buffers in the pool, msghdrs in boxes owned by self or a live connection).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return true;
            }
            // The submission queue is full: hand what is there to the kernel first.
            if let Err(e) = self.ring.submit() {
                tracing::error!(shard = self.core.ctx.index, "io_uring submit: {e}");
                return false;
            }
        }
        false
    }

    /// Registers the ring's descriptor with this thread (`IORING_REGISTER_RING_FDS`), so that
    /// `enter` names it by index. Called on the shard's thread, which is the only one that
    /// enters this ring (`SINGLE_ISSUER`).
    fn register_ring(&mut self) {
        let mut up = RsrcUpdate {
            offset: u32::MAX,
            resv: 0,
            data: self.ring.as_raw_fd() as u64,
        };
        // SAFETY: one live io_uring_rsrc_update; the kernel writes the index it chose into it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_REGISTER_RING_FDS,
                &mut up as *mut RsrcUpdate,
                1,
            )
        };
        if r == 1 {
            self.ring_index = Some(up.offset);
        }
    }

    /// Gives the registered index back (before the ring is closed: the registration holds a
    /// reference to the ring's file for as long as the thread lives).
    fn unregister_ring(&mut self) {
        let Some(i) = self.ring_index.take() else {
            return;
        };
        let mut up = RsrcUpdate {
            offset: i,
            resv: 0,
            data: 0,
        };
        // SAFETY: as in `register_ring`.
        unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_UNREGISTER_RING_FDS,
                &mut up as *mut RsrcUpdate,
                1,
            )
        };
    }

    /// `io_uring_enter` on this ring: the submission queue's entries are submitted, and with
    /// `GETEVENTS` the deferred work runs and the call waits for `min_complete` completions
    /// (bounded by `arg`'s timeout). By registered index where the kernel allowed it.
    fn enter(
        &self,
        min_complete: u32,
        flags: u32,
        arg: Option<&GeteventsArg>,
    ) -> io::Result<usize> {
        // SAFETY: reading the submission queue's length only.
        let to_submit = unsafe { self.ring.submission_shared() }.len() as u32;
        let (fd, mut flags) = match self.ring_index {
            Some(i) => (
                i as libc::c_long,
                flags | io_uring::EnterFlags::REGISTERED_RING.bits(),
            ),
            None => (self.ring.as_raw_fd() as libc::c_long, flags),
        };
        let (argp, argsz) = match arg {
            Some(a) => {
                flags |= io_uring::EnterFlags::EXT_ARG.bits();
                (
                    (a as *const GeteventsArg).cast::<libc::c_void>(),
                    size_of::<GeteventsArg>(),
                )
            }
            None => (std::ptr::null(), 0),
        };
        // SAFETY: every queued entry references memory that outlives its operation (see
        // `push`); `arg`, and the timespec it points at, live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit,
                min_complete,
                flags,
                argp,
                argsz,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn arm_udp_recv(&mut self) {
        let e = opcode::RecvMsgMulti::new(types::Fixed(FIXED_UDP), &*self.recv_msg, UDP_BGID)
            .build()
            .user_data(ud(K_UDP_RECV, 0, 0));
        self.udp_recv_armed = self.push(e);
    }

    /// Arms the receive of the leg socket in `slot`; one that cannot be queued now is tried
    /// again next turn.
    fn arm_leg_recv(&mut self, slot: u32) {
        let Some(generation) = self.legs.get(slot).map(|s| s.generation) else {
            return;
        };
        let e = opcode::RecvMsgMulti::new(
            types::Fixed(FIRST_LEG_FILE + slot),
            &*self.recv_msg,
            UDP_BGID,
        )
        .build()
        .user_data(ud(K_LEG_RECV, generation, slot));
        let armed = self.push(e);
        if let Some(s) = self.legs.current(slot, generation) {
            s.armed = armed;
        }
        if !armed {
            self.legs.rearm.push(slot);
        }
    }

    /// The registered file media for `leg` at `dst` goes out on: its leg socket's, or None
    /// for the shard socket.
    fn leg_file(&mut self, leg: u32, dst: std::net::SocketAddr) -> Option<u32> {
        match self.legs.pick(leg, dst, self.turn_ns) {
            Pick::Shard => None,
            Pick::Leg(slot) => Some(FIRST_LEG_FILE + slot),
            Pick::Opened(slot) => {
                let fd = self.legs.get(slot)?.sock.as_raw_fd();
                let registered = self
                    .ring
                    .submitter()
                    .register_files_update(FIRST_LEG_FILE + slot, &[fd]);
                if let Err(e) = registered {
                    self.legs.failed(self.turn_ns, &e);
                    self.legs.close(slot);
                    return None;
                }
                self.arm_leg_recv(slot);
                Some(FIRST_LEG_FILE + slot)
            }
        }
    }

    /// Lets go of closed leg sockets: their receives are cancelled and their registered files
    /// emptied before their slots can be used again.
    fn close_legs(&mut self) {
        self.legs.sweep(self.turn_ns);
        for c in self.legs.take_closing() {
            let cancel = opcode::AsyncCancel::new(ud(K_LEG_RECV, c.generation, c.slot))
                .build()
                .user_data(0);
            if !self.push(cancel) {
                // Tried again next turn: the slot stays taken until the receive is gone.
                self.legs.close_later(c);
                continue;
            }
            // The ring keeps the file until the cancelled receive has completed.
            let _ = self
                .ring
                .submitter()
                .register_files_update(FIRST_LEG_FILE + c.slot, &[-1]);
            drop(c.sock);
            self.legs.release(c.slot);
        }
        self.core.leg_sockets = self.legs.open();
    }

    fn arm_accept(&mut self) {
        let e = opcode::AcceptMulti::new(types::Fixed(FIXED_LISTENER))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(K_ACCEPT, 0, 0));
        self.accept_armed = self.push(e);
    }

    fn arm_wake(&mut self) {
        let e = opcode::PollAdd::new(types::Fd(self.core.ctx.waker.raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(ud(K_WAKE, 0, 0));
        self.wake_armed = self.push(e);
    }

    fn arm_tcp_recv(&mut self, c: ConnId) {
        let Some(fd) = self.core.relay.raw_fd(c) else {
            return;
        };
        let e = opcode::RecvMulti::new(types::Fd(fd), TCP_BGID)
            .build()
            .user_data(ud(K_TCP_RECV, c.generation, c.idx));
        if self.push(e) {
            if let Some(conn) = self.core.relay.conn_mut(c) {
                conn.recv_armed = true;
            }
        } else {
            // Not armed: the connection cannot be served; close it rather than forget it.
            self.core
                .relay
                .close(&mut self.core.pool, c, &mut self.core.out);
        }
    }

    pub fn run(&mut self) {
        self.register_ring();
        self.arm_udp_recv();
        self.arm_accept();
        self.arm_wake();
        loop {
            let now = sockets::realtime_ns();
            self.turn_ns = now;
            self.starved = false;
            self.tcp_read = false;
            self.tcp_full.clear();
            self.core.relay.begin_turn(now);
            self.core.out.udp_budget = self.free_slots.len();
            self.reap_completions(now);
            if !self.core.turn(Backend::IoUring, now) {
                break;
            }
            for c in std::mem::take(&mut self.core.adopted) {
                self.arm_tcp_recv(c);
            }
            self.flush();
            self.close_legs();
            self.recycle_buffers();
            let submit_ns = sockets::realtime_ns();
            self.core.relay.finish_batch(submit_ns);
            if let Err(e) = self.submit_and_wait(now) {
                tracing::error!(shard = self.core.ctx.index, "io_uring_enter: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Everything pushed is submitted now: the send arena is free again, and the
            // non-blocking UDP sends have finished.
            self.release_sent();
            self.tcp_msgs_used = 0;
            self.tcp_iov_used = 0;
            self.core.out.tcp_dirty.append(&mut self.tcp_deferred);
        }
        self.shutdown();
        self.unregister_ring();
    }

    /// Send what this turn produced and wait for the next batch. `woke` is when this turn's
    /// wait ended: the oldest packet not yet seen arrived after it, so with a budget `B` the
    /// next wait ends `B` after `woke`, and no packet waits much longer than `B` for its turn.
    /// (The wait is bounded by time, not by a completion count: a multishot receive reports a
    /// whole run of datagrams as one piece of deferred work, so the kernel cannot count them.)
    fn submit_and_wait(&mut self, woke: u64) -> io::Result<()> {
        let budget_us = self.coalesce.as_micros() as u64;
        // A busy or starved shard never waits: completions left over from the last turn, a
        // receive ring that ran dry, or TCP sends stuck behind a full socket (their completion
        // is the event that matters) all mean "take what is there and go on".
        // A send parked behind one slow reader is that connection's affair: it does not turn
        // coalescing off for the shard (its completion is taken at the end of the wait).
        let pressed = self.cq_backlog || self.starved || !self.tcp_full.is_empty();
        let target = (!pressed)
            .then(|| self.core.coalesce_target_us(budget_us, BATCH))
            .flatten();
        let coalesce = target.is_some();
        let getevents = io_uring::EnterFlags::GETEVENTS.bits();
        if let Some(target_us) = target
            && self.abs_timer
            && !self.tcp_read
        {
            let spent_us = sockets::realtime_ns().saturating_sub(woke) / 1000;
            // Datagrams that arrived since the wake-up: the kernel holds them as receive
            // work. While they cannot make a full run (see `MULTISHOT_RUN`), one enter sends
            // the batch and sleeps until `woke + target` (an absolute deadline on the ring's
            // clock, so the sends' time counts against the budget as before); the wait runs
            // that receive work first, and takes what arrived at its end. One enter per turn
            // instead of two.
            let arrived = self.core.rate * spent_us as f64 / 1e6;
            if arrived < (MULTISHOT_RUN / 2) as f64 && spent_us < target_us {
                let deadline =
                    sockets::clock_ns(libc::CLOCK_MONOTONIC) + (target_us - spent_us) * 1000;
                let ts = KernelTimespec::from_ns(deadline);
                let arg = GeteventsArg {
                    sigmask: 0,
                    sigmask_sz: 0,
                    min_wait_usec: 0,
                    ts: &ts as *const KernelTimespec as u64,
                };
                let flags = getevents | io_uring::EnterFlags::ABS_TIMER.bits();
                return Self::wait_result(self.enter(MAX_CQES as u32, flags, Some(&arg)));
            }
        }
        let wait_us = if let Some(target_us) = target {
            // The sends go out first (in the kernel, synchronously: `MSG_DONTWAIT`), so that
            // the time they take counts against the budget. The same enter runs the receive
            // work the kernel holds already (see `BATCH`): what it yields is taken at the end
            // of the wait rather than left in the socket for a run after it.
            self.enter(0, getevents, None)?;
            if self.ring.completion().len() >= MULTISHOT_RUN {
                // That run was a full one: more is waiting in the socket. Go on now.
                return Ok(());
            }
            let spent_us = sockets::realtime_ns().saturating_sub(woke) / 1000;
            let wait_us = target_us.saturating_sub(spent_us);
            if wait_us == 0 {
                // The budget is spent, and the enter above took what had arrived: go on.
                return Ok(());
            }
            wait_us
        } else {
            0
        };
        let want = if coalesce { MAX_CQES } else { 1 } as u32;
        let idle = KernelTimespec::from_ns(100_000_000);
        let r = if coalesce && self.min_wait {
            // Wait `wait_us`, then return as soon as anything is there (or after `idle`).
            let arg = GeteventsArg {
                sigmask: 0,
                sigmask_sz: 0,
                min_wait_usec: wait_us as u32,
                ts: &idle as *const KernelTimespec as u64,
            };
            self.enter(want, getevents, Some(&arg))
        } else if coalesce {
            // Kernels without min_wait: wait out the budget.
            let ts = KernelTimespec::from_ns(wait_us * 1000);
            let arg = GeteventsArg {
                sigmask: 0,
                sigmask_sz: 0,
                min_wait_usec: 0,
                ts: &ts as *const KernelTimespec as u64,
            };
            self.enter(want, getevents, Some(&arg))
        } else {
            let arg = GeteventsArg {
                sigmask: 0,
                sigmask_sz: 0,
                min_wait_usec: 0,
                ts: &idle as *const KernelTimespec as u64,
            };
            self.enter(1, getevents, Some(&arg))
        };
        Self::wait_result(r)
    }

    /// A wait that timed out or was interrupted is a normal end of a wait.
    fn wait_result(r: io::Result<usize>) -> io::Result<()> {
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn reap_completions(&mut self, now: u64) {
        self.cqes.clear();
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for c in cq.by_ref().take(MAX_CQES) {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
            }
            self.cq_backlog = !cq.is_empty();
        }
        self.core.note_wake(self.cqes.len(), now);
        let cqes = std::mem::take(&mut self.cqes);
        for &(user_data, res, flags) in &cqes {
            let (kind, generation, idx) = ud_split(user_data);
            match kind {
                K_UDP_RECV => self.on_udp_recv(None, res, flags, now),
                K_LEG_RECV => {
                    if !cqueue::more(flags)
                        && let Some(s) = self.legs.current(idx, generation)
                    {
                        s.armed = false;
                        self.legs.rearm.push(idx);
                    }
                    // A datagram is handled the same whichever socket it reached (a closed
                    // socket's last ones too).
                    self.on_udp_recv(Some((idx, generation)), res, flags, now)
                }
                K_ACCEPT => self.on_accept(res, flags, now),
                K_WAKE if !cqueue::more(flags) => self.wake_armed = false,
                K_TCP_RECV => self.on_tcp_recv(idx, generation, res, flags, now),
                K_TCP_SEND => self.on_tcp_send(idx, generation, res),
                K_TCP_POLL => self.on_tcp_writable(idx, generation),
                K_UDP_SEND => self.on_udp_send(idx, res),
                _ => {}
            }
        }
        self.cqes = cqes;
        if !self.wake_armed {
            self.arm_wake();
        }
        if !self.accept_armed && now >= self.accept_backoff_until {
            self.arm_accept();
        }
    }

    /// A completion of the shard socket's receive (`leg` None) or of a leg socket's (its slot
    /// and generation).
    fn on_udp_recv(&mut self, leg: Option<(u32, u32)>, res: i32, flags: u32, now: u64) {
        if leg.is_none() && !cqueue::more(flags) {
            self.udp_recv_armed = false;
        }
        if cqueue::buffer_select(flags).is_some() {
            self.udp_in_ring = self.udp_in_ring.saturating_sub(1);
            self.udp_used += 1;
        }
        if res < 0 {
            if -res == libc::ENOBUFS {
                self.starved = true;
                self.udp_dry = true;
                self.udp_in_ring = 0;
                if self.udp_spare.is_empty() {
                    // Every buffer is in use (the ring holding fewer, with free ones here, is
                    // this loop's choice: the top-up below re-arms at once).
                    self.core.relay.counters.buf_ring_exhausted += 1;
                }
            } else {
                tracing::debug!(
                    shard = self.core.ctx.index,
                    "udp recv: {}",
                    io::Error::from_raw_os_error(-res)
                );
            }
            return;
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            return;
        };
        let pool = &mut self.core.pool;
        let Some(held) = pool.received(bid) else {
            return; // not the kernel's to hand back: refused and counted by the pool
        };
        let parsed = {
            let buf = pool.buf(bid);
            let data = &buf[..(res as usize).min(buf.len())];
            match types::RecvMsgOut::parse(data, &self.recv_msg) {
                Ok(m) => {
                    let tracker = match leg {
                        None => Some(&mut self.overflow),
                        Some((slot, generation)) => {
                            self.legs.current(slot, generation).map(|s| &mut s.overflow)
                        }
                    };
                    let lost = tracker.map_or(0, |t| t.update(m.control_data()));
                    if lost > 0 {
                        self.core.relay.counters.drops
                            [crate::metrics::DropReason::SocketOverflow as usize] += lost;
                    }
                    let src = sockets::decode(m.name_data());
                    let ts = sockets::rx_timestamp_ns(m.control_data()).unwrap_or(now);
                    let off = m.payload_data().as_ptr() as usize - buf.as_ptr() as usize;
                    Some((
                        src,
                        ts,
                        off,
                        m.payload_data().len(),
                        m.is_payload_truncated(),
                    ))
                }
                Err(()) => None,
            }
        };
        match parsed {
            Some((Some(src), ts, off, len, false)) => {
                self.core.relay.on_udp(
                    &mut self.core.pool,
                    src,
                    Seg::new(bid, off, len),
                    ts,
                    &mut self.core.out,
                );
            }
            Some((_, _, _, _, true)) => {
                self.core.relay.counters.udp_in.add(0);
                self.core
                    .relay
                    .counters
                    .drop(crate::metrics::DropReason::Truncated);
            }
            _ => {}
        }
        self.core.pool.release_received(held);
    }

    fn on_accept(&mut self, res: i32, flags: u32, now: u64) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res < 0 {
            if matches!(
                -res,
                libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS
            ) {
                // Out of descriptors or memory: re-arming at once would fail at once (a spin).
                // Back off; the pending connections wait in the listen backlog.
                self.core
                    .relay
                    .counters
                    .drop(crate::metrics::DropReason::AcceptBackoff);
                self.accept_backoff_until = now + ACCEPT_BACKOFF_NS;
                if self.accept_armed {
                    let cancel = opcode::AsyncCancel::new(ud(K_ACCEPT, 0, 0))
                        .build()
                        .user_data(0);
                    let _ = self.push(cancel);
                }
            }
            return;
        }
        // SAFETY: a successful accept completion is a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        sockets::media_conn_options(&fd, self.tcp_sndbuf);
        let Some(peer) = sockets::peer_of(fd.as_raw_fd()) else {
            return;
        };
        if let Some(c) =
            self.core
                .relay
                .on_accept(&mut self.core.pool, fd, peer, now, &mut self.core.out)
        {
            self.arm_tcp_recv(c);
        }
    }

    fn on_tcp_recv(&mut self, idx: u32, generation: u32, res: i32, flags: u32, now: u64) {
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.core.relay.conn_id_at(idx, generation) else {
            // A late completion for a connection already reaped: only return its buffer.
            if let Some(b) = bid {
                if let Some(r) = self.core.pool.received(b) {
                    self.core.pool.release_received(r);
                }
            }
            return;
        };
        let more = cqueue::more(flags);
        if !more && let Some(conn) = self.core.relay.conn_mut(c) {
            conn.recv_armed = false;
        }
        if res > 0 {
            self.tcp_read = true;
            self.tcp_full.retain(|&x| x != c);
            if res as usize >= self.core.pool.buf_size() {
                self.tcp_full.push(c);
            }
            if let Some(b) = bid
                && let Some(held) = self.core.pool.received(b)
            {
                let seg = Seg::new(b, 0, res as usize);
                self.core
                    .relay
                    .on_tcp(&mut self.core.pool, c, seg, now, &mut self.core.out);
                self.core.pool.release_received(held);
            }
            if !more {
                self.tcp_rearm.push(c);
            }
        } else if res == -libc::ENOBUFS {
            self.starved = true;
            self.core.relay.counters.buf_ring_exhausted += 1;
            self.tcp_dry.push(c);
        } else {
            // EOF or an error: the connection is over.
            self.core
                .relay
                .close(&mut self.core.pool, c, &mut self.core.out);
        }
        self.try_reap(c);
    }

    fn on_tcp_send(&mut self, idx: u32, generation: u32, res: i32) {
        let Some(c) = self.core.relay.conn_id_at(idx, generation) else {
            return;
        };
        if res == -libc::EAGAIN {
            // The socket is full (a slow reader). Nothing was written; the frames are no
            // longer in flight, so the age and oldest-first drops can reach them while the
            // connection waits for POLLOUT (a send parked in the kernel would pin them until
            // TCP_USER_TIMEOUT). `send_inflight` stays set: the poll is the operation now.
            self.core.relay.tcp_sent(&mut self.core.pool, c, 0);
            if let Some(fd) = self.core.relay.raw_fd(c) {
                let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                    .build()
                    .user_data(ud(K_TCP_POLL, c.generation, c.idx));
                if self.push(e) {
                    return;
                }
            }
        }
        if let Some(conn) = self.core.relay.conn_mut(c) {
            conn.send_inflight = false;
            self.tcp_inflight -= 1;
        }
        if res == -libc::EAGAIN {
            // Could not wait for POLLOUT: try again next turn.
            self.tcp_deferred.push(c);
            self.try_reap(c);
            return;
        }
        if res >= 0 {
            self.core
                .relay
                .tcp_sent(&mut self.core.pool, c, res as usize);
            if self.core.relay.tcp_has_queued(c) {
                self.core.out.tcp_dirty.push(c);
            }
        } else {
            self.core
                .relay
                .counters
                .drop(crate::metrics::DropReason::SendError);
            self.core
                .relay
                .close(&mut self.core.pool, c, &mut self.core.out);
        }
        self.try_reap(c);
    }

    /// A connection that found its socket full can take more.
    fn on_tcp_writable(&mut self, idx: u32, generation: u32) {
        let Some(c) = self.core.relay.conn_id_at(idx, generation) else {
            return;
        };
        if let Some(conn) = self.core.relay.conn_mut(c) {
            conn.send_inflight = false;
            self.tcp_inflight -= 1;
        }
        if self.core.relay.tcp_has_queued(c) {
            self.core.out.tcp_dirty.push(c);
        }
        self.try_reap(c);
    }

    fn on_udp_send(&mut self, idx: u32, res: i32) {
        if self.skip_success {
            // Only failures complete; the slot was released after its submit.
            if res == -libc::EINVAL && self.send_to {
                // A kernel that takes no destination on IORING_OP_SEND (before 6.0): every
                // send from now on is a SENDMSG.
                self.send_to = false;
                tracing::warn!(
                    shard = self.core.ctx.index,
                    "io_uring refused a UDP send with a destination; using SENDMSG"
                );
            }
            if res < 0 {
                self.core
                    .relay
                    .counters
                    .drop(crate::metrics::DropReason::SendError);
            }
            return;
        }
        // Only a slot whose send holds a token is completed: a stray or repeated completion
        // has nothing to give back.
        let Some(t) = self.sending.get_mut(idx as usize).and_then(Option::take) else {
            return;
        };
        self.core.pool.sent(t);
        self.free_slots.push(idx);
        if res < 0 {
            self.core
                .relay
                .counters
                .drop(crate::metrics::DropReason::SendError);
        }
    }

    fn try_reap(&mut self, c: ConnId) {
        if let Some(fd) = self.core.relay.reap(&mut self.core.pool, c) {
            drop(fd);
        }
    }

    /// Turn the outbox into submissions.
    fn flush(&mut self) {
        self.core.publish_events();
        let mut out = std::mem::take(&mut self.core.out);
        for o in out.udp.drain(..) {
            self.submit_udp(o);
        }
        for c in out.close.drain(..) {
            if let Some(fd) = self.core.relay.raw_fd(c) {
                // SAFETY: shutting down a socket we own; wakes the armed receive and any send.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            self.try_reap(c);
        }
        out.tcp_dirty
            .sort_unstable_by_key(|c| (c.idx, c.generation));
        out.tcp_dirty.dedup();
        for c in out.tcp_dirty.drain(..) {
            self.submit_tcp(c);
        }
        // Nothing above feeds the outbox; keep the vectors' capacity for the next batch.
        debug_assert!(self.core.out.is_empty());
        self.core.out = out;
        for c in std::mem::take(&mut self.tcp_rearm) {
            let ok = self
                .core
                .relay
                .conn(c)
                .is_some_and(|x| !x.closing && !x.recv_armed);
            if ok {
                self.arm_tcp_recv(c);
            }
        }
    }

    fn submit_udp(&mut self, o: UdpOut) {
        // Media for a leg goes out on its connected socket (a one-segment, non-blocking send
        // with no destination), if it has one.
        let leg_file = match o.leg {
            Some(leg) if self.skip_success && o.data.segs().len() == 1 => self.leg_file(leg, o.dst),
            _ => None,
        };
        let Some(idx) = self.free_slots.pop() else {
            self.core.pool.sent(o.data);
            self.core
                .relay
                .counters
                .drop(crate::metrics::DropReason::SendBacklog);
            return;
        };
        let ipv6 = self.ipv6;
        let pool = &self.core.pool;
        let slot = &mut self.slots[idx as usize];
        // A leg socket is connected: its send names no destination, so none is encoded.
        let namelen = match leg_file {
            Some(_) => 0,
            None => sockets::encode(o.dst, ipv6, &mut slot.addr),
        };
        if namelen == 0 && leg_file.is_none() {
            self.core.pool.sent(o.data);
            self.free_slots.push(idx);
            self.core
                .relay
                .counters
                .drop(crate::metrics::DropReason::SendError);
            return;
        }
        let n = o.data.segs().len();
        for (i, s) in o.data.segs().iter().enumerate() {
            slot.iov[i] = libc::iovec {
                iov_base: pool.addr(s.buf).wrapping_add(usize::from(s.off)).cast(),
                iov_len: usize::from(s.len),
            };
        }
        slot.msg.msg_name = (&mut slot.addr as *mut RawAddr).cast();
        slot.msg.msg_namelen = namelen;
        slot.msg.msg_iov = slot.iov.as_mut_ptr();
        slot.msg.msg_iovlen = n as _;
        slot.msg.msg_control = std::ptr::null_mut();
        slot.msg.msg_controllen = 0;
        slot.msg.msg_flags = 0;
        let sent_before = self.udp_sent.len();
        let e = if self.skip_success {
            // Non-blocking, and no completion on success: the send finishes (or fails with
            // EAGAIN, which posts a completion) inside the io_uring_enter that submits it, so
            // the buffers are released right after that call (`release_sent`). Half the
            // completions of a relayed packet disappear.
            self.udp_sent.push(idx);
            if leg_file.is_some() || (n == 1 && self.send_to) {
                // One segment: `IORING_OP_SEND`, so the kernel neither copies a msghdr nor
                // imports an iovec for it; on the shard socket with the destination in the
                // entry, on a leg socket with none.
                let send = opcode::Send::new(
                    types::Fixed(leg_file.unwrap_or(FIXED_UDP)),
                    slot.iov[0].iov_base as *const u8,
                    slot.iov[0].iov_len as u32,
                );
                let send = match leg_file {
                    Some(_) => send,
                    None => send
                        .dest_addr((&slot.addr as *const RawAddr).cast())
                        .dest_addr_len(namelen),
                };
                send.flags(libc::MSG_DONTWAIT)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(ud(K_UDP_SEND, 0, idx))
            } else {
                opcode::SendMsg::new(types::Fixed(FIXED_UDP), &slot.msg)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(ud(K_UDP_SEND, 0, idx))
            }
        } else {
            opcode::SendMsg::new(types::Fixed(FIXED_UDP), &slot.msg)
                .build()
                .user_data(ud(K_UDP_SEND, 0, idx))
        };
        if self.push(e) {
            // Free slots hold no token: nothing is replaced.
            self.sending[idx as usize] = Some(o.data);
        } else {
            self.udp_sent.truncate(sent_before);
            self.core.pool.sent(o.data);
            self.free_slots.push(idx);
            self.core
                .relay
                .counters
                .drop(crate::metrics::DropReason::SendError);
        }
    }

    /// After a submit: the UDP sends it carried are done; give back their slots and buffers.
    fn release_sent(&mut self) {
        for i in 0..self.udp_sent.len() {
            let idx = self.udp_sent[i];
            if let Some(t) = self.sending[idx as usize].take() {
                self.core.pool.sent(t);
            }
            self.free_slots.push(idx);
        }
        self.udp_sent.clear();
    }

    fn submit_tcp(&mut self, c: ConnId) {
        let iov_free = self.tcp_iov.len() - self.tcp_iov_used;
        if self.tcp_msgs_used == self.tcp_msgs.len() || iov_free < 3 {
            self.tcp_deferred.push(c);
            return;
        }
        let room = iov_free.min(super::relay::TCP_IOV);
        let iov = &mut self.tcp_iov[self.tcp_iov_used..self.tcp_iov_used + room];
        let n = self
            .core
            .relay
            .prepare_tcp_send(&mut self.core.pool, c, iov);
        if n == 0 {
            return;
        }
        let Some(conn) = self.core.relay.conn_mut(c) else {
            return;
        };
        conn.send_inflight = true;
        self.tcp_inflight += 1;
        let fd = conn.fd.as_raw_fd();
        let msg = &mut self.tcp_msgs[self.tcp_msgs_used];
        // SAFETY: plain C struct.
        *msg = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // Non-blocking: a full socket completes with EAGAIN at once (then POLLOUT is awaited
        // without holding the frames in flight), instead of parking the send in the kernel.
        let e = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags((libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) as u32)
            .build()
            .user_data(ud(K_TCP_SEND, c.generation, c.idx));
        self.tcp_msgs_used += 1;
        self.tcp_iov_used += n;
        if !self.push(e) {
            if let Some(conn) = self.core.relay.conn_mut(c) {
                conn.send_inflight = false;
            }
            self.tcp_inflight -= 1;
            self.tcp_deferred.push(c);
        }
    }

    /// Give freed buffers back to their rings, and re-arm a UDP receive that stopped.
    fn recycle_buffers(&mut self) {
        let mut udp = false;
        let mut tcp = false;
        let mut freed = std::mem::take(&mut self.freed);
        self.core.pool.take_freed(&mut freed);
        for &id in &freed {
            match self.core.pool.group(id) {
                Group::Udp => self.udp_spare.push(id),
                Group::Tcp => {
                    self.tcp_ring.push(&self.core.pool, id);
                    tcp = true;
                }
                Group::Spare => {}
            }
        }
        freed.clear();
        self.freed = freed;
        // Top the ring up to what a turn takes, most recently used buffers first.
        let target = UDP_RING_LOW.max(2 * self.udp_used);
        self.udp_used = 0;
        while self.udp_in_ring < target {
            let Some(id) = self.udp_spare.pop() else {
                break;
            };
            self.udp_ring.push(&self.core.pool, id);
            self.udp_in_ring += 1;
            udp = true;
        }
        if udp {
            self.udp_ring.commit();
        }
        if tcp {
            self.tcp_ring.commit();
            // Buffers came back: receives that stopped on the dry ring can run again.
            self.tcp_rearm.append(&mut self.tcp_dry);
        }
        if udp {
            self.udp_dry = false;
        }
        if !self.udp_recv_armed && !self.udp_dry {
            self.arm_udp_recv();
        }
        if !self.udp_dry {
            for slot in std::mem::take(&mut self.legs.rearm) {
                if self.legs.get(slot).is_some_and(|s| !s.armed) {
                    self.arm_leg_recv(slot);
                }
            }
        }
    }

    fn shutdown(&mut self) {
        for c in self.core.relay.conn_ids() {
            self.core
                .relay
                .close(&mut self.core.pool, c, &mut self.core.out);
        }
        for c in std::mem::take(&mut self.core.out.close) {
            if let Some(fd) = self.core.relay.raw_fd(c) {
                // SAFETY: shutting down a socket we own.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        // Cancel everything still armed and let the kernel finish with our memory before the
        // buffers and msghdrs are freed.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(0);
        let _ = self.push(cancel);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            let inflight = self.slots.len() - self.free_slots.len();
            let conns_busy = self.core.relay.conn_ids().iter().any(|&c| {
                self.core
                    .relay
                    .conn(c)
                    .is_some_and(|x| x.recv_armed || x.send_inflight)
            });
            if inflight == 0
                && !conns_busy
                && !self.udp_recv_armed
                && !self.accept_armed
                && self.legs.armed() == 0
            {
                break;
            }
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap_completions_for_shutdown();
        }
        // Sends still without a completion at the deadline: their tokens are given back to
        // the pool (which is unmapped only after the ring is gone), not dropped.
        for t in self.sending.iter_mut().filter_map(Option::take) {
            self.core.pool.sent(t);
        }
    }

    fn reap_completions_for_shutdown(&mut self) {
        let now = sockets::realtime_ns();
        let mut list = Vec::new();
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for c in &mut cq {
                list.push((c.user_data(), c.result(), c.flags()));
            }
        }
        for (user_data, res, flags) in list {
            let (kind, generation, idx) = ud_split(user_data);
            match kind {
                K_UDP_RECV | K_LEG_RECV => {
                    if kind == K_UDP_RECV {
                        self.udp_recv_armed &= cqueue::more(flags);
                    } else if let Some(s) = self.legs.current(idx, generation) {
                        s.armed &= cqueue::more(flags);
                    }
                    if let Some(b) = cqueue::buffer_select(flags) {
                        if let Some(r) = self.core.pool.received(b) {
                            self.core.pool.release_received(r);
                        }
                    }
                }
                K_ACCEPT => {
                    self.accept_armed &= cqueue::more(flags);
                    if res >= 0 {
                        // SAFETY: a new descriptor we own; closing it right away.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                }
                K_TCP_RECV => {
                    let _ = now;
                    if let Some(c) = self.core.relay.conn_id_at(idx, generation) {
                        if !cqueue::more(flags)
                            && let Some(conn) = self.core.relay.conn_mut(c)
                        {
                            conn.recv_armed = false;
                        }
                        if let Some(b) = cqueue::buffer_select(flags) {
                            if let Some(r) = self.core.pool.received(b) {
                                self.core.pool.release_received(r);
                            }
                        }
                        self.try_reap(c);
                    }
                }
                K_TCP_SEND | K_TCP_POLL => {
                    if let Some(c) = self.core.relay.conn_id_at(idx, generation) {
                        if let Some(conn) = self.core.relay.conn_mut(c) {
                            conn.send_inflight = false;
                        }
                        self.try_reap(c);
                    }
                }
                K_UDP_SEND => self.on_udp_send(idx, res),
                _ => {}
            }
        }
    }
}
