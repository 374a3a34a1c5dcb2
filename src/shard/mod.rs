//! The data plane: one shard per core, each a pinned thread that owns one UDP socket and one TCP
//! listener (`media_port_base + i`), its session table and its buffers. Nothing on the packet
//! path is shared between shards: no locks, no cross-shard traffic. The control thread talks to a
//! shard only through [`Command`]s on a channel plus an eventfd wake-up that is written once per
//! command burst, never per packet.
//!
//! Each shard runs an io_uring loop (`uring`): multishot `RecvMsgMulti` over a provided buffer
//! ring for UDP, multishot accept, buffer-selected multishot receives on TCP connections, many
//! `SendMsg` entries per `io_uring_enter`, `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`. Where
//! io_uring cannot be set up (`kernel.io_uring_disabled`, seccomp) the same forwarding core runs
//! under epoll with `recvmmsg`/`sendmmsg` (`epoll`), said once in the log.

pub mod pool;
pub mod relay;
pub mod sockets;

mod epoll;
mod leg_sockets;
mod uring;
mod waker;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::metrics::Counters;
use pool::{Pool, PoolLayout};
pub use relay::{
    Delivery, InstallError, LegSnapshot, LegSpec, Outbox, Relay, RelayConfig, SessionId,
    SessionSpec, ShardEvent,
};
use waker::Waker;

/// A good capacity for the shard→control event channel: far more bind changes than a
/// shard's legs make in the time the control thread takes to read them.
pub const SHARD_EVENTS: usize = 65_536;

/// How long a shard waits for a fixed media port that is still held (a restarted gateway's
/// previous io_uring instance closes its sockets in the kernel a moment after it exits).
const BIND_PATIENCE: Duration = Duration::from_secs(5);

/// Which event loop a shard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// io_uring where the kernel allows it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        })
    }
}

#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Address the media sockets bind to; `::` is dual-stack (IPv4 and IPv6 on every socket).
    pub listen: IpAddr,
    /// Shard i binds UDP and TCP on `media_port_base + i`; 0 binds ephemeral ports (tests).
    pub media_port_base: u16,
    pub shards: usize,
    pub backend: Backend,
    /// Pin shard i to the i-th allowed core.
    pub pin: bool,
    pub buf_size: usize,
    pub udp_bufs: usize,
    pub tcp_bufs: usize,
    pub spare_bufs: usize,
    /// Submission queue entries of each shard's ring.
    pub ring_entries: u32,
    /// UDP sends that may be in flight per shard.
    pub send_slots: usize,
    /// Connected UDP sockets per shard for the legs media is sent to (io_uring loop); 0: none,
    /// every send goes out on the shard socket.
    pub leg_sockets: usize,
    /// Wake-up coalescing budget: a lightly loaded shard gathers packets for up to this long
    /// before it wakes to forward them. Zero turns coalescing off.
    pub coalesce: Duration,
    pub udp_rcvbuf: usize,
    pub udp_sndbuf: usize,
    /// SO_SNDBUF of TCP media connections: small, because late voice is useless.
    pub tcp_sndbuf: usize,
    pub relay: RelayConfig,
    /// Where shards report [`ShardEvent`]s (bindings); None: nobody listens. Bounded
    /// ([`SHARD_EVENTS`] is a good capacity): a shard never blocks on it; when it is full the
    /// event is dropped and counted (`DropReason::EventOverflow`).
    pub events: Option<tokio::sync::mpsc::Sender<ShardEvent>>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            listen: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            media_port_base: 7401,
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: Backend::Auto,
            pin: true,
            buf_size: 2048,
            udp_bufs: 4096,
            tcp_bufs: 1024,
            spare_bufs: 256,
            ring_entries: 4096,
            send_slots: 4096,
            leg_sockets: 1024,
            coalesce: Duration::from_micros(1000),
            udp_rcvbuf: 4 << 20,
            udp_sndbuf: 4 << 20,
            tcp_sndbuf: 64 << 10,
            relay: RelayConfig::default(),
            events: None,
        }
    }
}

/// What the control thread asks of a shard.
pub enum Command {
    Install {
        spec: SessionSpec,
        reply: oneshot::Sender<Result<(), InstallError>>,
    },
    Remove {
        session: SessionId,
        reply: Option<oneshot::Sender<bool>>,
    },
    /// A participant joins a session (a conference room).
    AddLeg {
        session: SessionId,
        leg: LegSpec,
        reply: oneshot::Sender<Result<(), InstallError>>,
    },
    /// A participant leaves a session.
    RemoveLeg {
        session: SessionId,
        leg: String,
        reply: Option<oneshot::Sender<bool>>,
    },
    /// Counters, the latency histogram since the last snapshot (the shard resets its
    /// histogram when it answers), and with `legs` each leg's numbers (that costs the shard
    /// time in proportion to its legs).
    Snapshot {
        legs: bool,
        reply: oneshot::Sender<ShardSnapshot>,
    },
    /// One session's legs and their numbers (for its call detail record, asked just before
    /// the session's `Remove`): work in proportion to that session's legs only.
    SessionLegs {
        session: SessionId,
        reply: oneshot::Sender<Vec<LegSnapshot>>,
    },
    /// The peer policy changed (SIGHUP): sources that latch from now on must pass the new one
    /// ([`Relay::set_peer_policy`]). Commands run in order, so a session installed after this
    /// command is under the new policy.
    SetPeerPolicy {
        policy: relay::PeerPolicy,
    },
    /// A TCP media connection accepted elsewhere (the shared port, `server::single_port`):
    /// the shard takes it into its connection table as if its own listener had accepted it,
    /// unbound and under the same unbound-connection budgets. `fd` is a connected stream
    /// socket (TCP, possibly with kernel TLS on it, or one end of a socket pair to a userspace
    /// TLS relay); `peer` is the client's address, which the per-source budget counts.
    AdoptTcp {
        fd: std::os::fd::OwnedFd,
        peer: SocketAddr,
    },
    /// [`Command::AdoptTcp`] for a TCP socket whose TLS 1.3 handshake is finished and whose
    /// records the shard runs itself (`tls_engine = "shard"`) with these keys; nothing has
    /// been read from the socket after the handshake.
    AdoptTls {
        fd: std::os::fd::OwnedFd,
        peer: SocketAddr,
        keys: Box<crate::wire::tls_records::RecordKeys>,
    },
    /// Answer at once: the shard's loop is turning (the watchdog's question).
    Ping {
        reply: oneshot::Sender<()>,
    },
    Shutdown,
}

#[derive(Clone, Debug)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub backend: Backend,
    pub counters: Counters,
    pub latency: Histogram<u64>,
    pub legs: Vec<LegSnapshot>,
    pub sessions: usize,
    pub tcp_conns: usize,
    /// Frames waiting in TCP send queues (each pins a receive buffer).
    pub tcp_queued: usize,
    pub buffers_in_use: usize,
    /// Connected UDP sockets open for legs (`leg_sockets`).
    pub leg_sockets: usize,
    pub buffer_bytes: usize,
    /// Buffer state transitions the pool refused (a second release, a hold on a buffer the
    /// kernel owns, a completion for a buffer in use): 0 unless the shard has a bug, which then
    /// costs packets instead of handing one call's buffer to another.
    pub buffer_refusals: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {0} has stopped")]
    Gone(usize),
    #[error("shard {shard}: cannot bind media sockets on {addr}: {source}")]
    Bind {
        shard: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("shard {shard}: {what}: {source}")]
    Setup {
        shard: usize,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("shard configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Install(#[from] InstallError),
}

/// The control thread's end of one shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub backend: Backend,
    tx: Sender<Command>,
    waker: Arc<Waker>,
    sessions: Arc<AtomicUsize>,
}

impl ShardHandle {
    pub fn send(&self, cmd: Command) -> Result<(), ShardError> {
        self.tx
            .send(cmd)
            .map_err(|_| ShardError::Gone(self.index))?;
        self.waker.wake();
        Ok(())
    }

    /// Sessions installed on this shard (the control thread's load measure).
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub async fn install(&self, spec: SessionSpec) -> Result<(), ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Install { spec, reply })?;
        Ok(rx.await.map_err(|_| ShardError::Gone(self.index))??)
    }

    /// Sends the shard a new peer policy ([`Command::SetPeerPolicy`]); it applies it before any
    /// command sent after this one.
    pub fn set_peer_policy(&self, policy: relay::PeerPolicy) -> Result<(), ShardError> {
        self.send(Command::SetPeerPolicy { policy })
    }

    pub async fn remove(&self, session: SessionId) -> Result<bool, ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Remove {
            session,
            reply: Some(reply),
        })?;
        rx.await.map_err(|_| ShardError::Gone(self.index))
    }

    pub async fn add_leg(&self, session: SessionId, leg: LegSpec) -> Result<(), ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::AddLeg {
            session,
            leg,
            reply,
        })?;
        Ok(rx.await.map_err(|_| ShardError::Gone(self.index))??)
    }

    pub async fn remove_leg(&self, session: SessionId, leg: String) -> Result<bool, ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::RemoveLeg {
            session,
            leg,
            reply: Some(reply),
        })?;
        rx.await.map_err(|_| ShardError::Gone(self.index))
    }

    /// Counters and the latency histogram since the last snapshot; per-leg numbers only with
    /// `legs`.
    pub async fn snapshot(&self, legs: bool) -> Result<ShardSnapshot, ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Snapshot { legs, reply })?;
        rx.await.map_err(|_| ShardError::Gone(self.index))
    }

    /// Hands an accepted TCP media connection to this shard (see [`Command::AdoptTcp`]).
    pub fn adopt_tcp(&self, fd: std::os::fd::OwnedFd, peer: SocketAddr) -> Result<(), ShardError> {
        self.send(Command::AdoptTcp { fd, peer })
    }

    /// Hands a TLS media connection to this shard, which runs its records (see
    /// [`Command::AdoptTls`]).
    pub fn adopt_tls(
        &self,
        fd: std::os::fd::OwnedFd,
        peer: SocketAddr,
        keys: crate::wire::tls_records::RecordKeys,
    ) -> Result<(), ShardError> {
        self.send(Command::AdoptTls {
            fd,
            peer,
            keys: Box::new(keys),
        })
    }

    /// Whether the shard's loop answers (takes nothing from it).
    pub async fn ping(&self) -> Result<(), ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping { reply })?;
        rx.await.map_err(|_| ShardError::Gone(self.index))
    }

    /// Blocking forms, for threads outside an async runtime (tests, tools).
    pub fn install_blocking(&self, spec: SessionSpec) -> Result<(), ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Install { spec, reply })?;
        Ok(rx
            .blocking_recv()
            .map_err(|_| ShardError::Gone(self.index))??)
    }

    pub fn remove_blocking(&self, session: SessionId) -> Result<bool, ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Remove {
            session,
            reply: Some(reply),
        })?;
        rx.blocking_recv().map_err(|_| ShardError::Gone(self.index))
    }

    pub fn ping_blocking(&self) -> Result<(), ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping { reply })?;
        rx.blocking_recv().map_err(|_| ShardError::Gone(self.index))
    }

    pub fn snapshot_blocking(&self) -> Result<ShardSnapshot, ShardError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Snapshot { legs: true, reply })?;
        rx.blocking_recv().map_err(|_| ShardError::Gone(self.index))
    }

    /// A handle whose shard never answers (a stuck shard, for tests of the control thread):
    /// commands queue on the returned receiver and nobody replies while it is held.
    #[cfg(test)]
    pub(crate) fn stuck(index: usize) -> (ShardHandle, Receiver<Command>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let handle = ShardHandle {
            index,
            udp_addr: any,
            tcp_addr: any,
            backend: Backend::Epoll,
            tx,
            waker: Arc::new(Waker::new().expect("eventfd")),
            sessions: Arc::new(AtomicUsize::new(0)),
        };
        (handle, rx)
    }
}

/// All shards of a gateway. Dropping it shuts them down and joins their threads.
pub struct Shards {
    pub handles: Vec<ShardHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Binds every shard's sockets and starts its thread; returns once every shard is running
    /// (its ring, buffer rings and receives are armed), so that readiness can be reported.
    pub fn spawn(cfg: &ShardConfig) -> Result<Shards, ShardError> {
        if cfg.shards == 0 || cfg.shards > 1024 {
            return Err(ShardError::Config(format!(
                "shards must be 1..=1024, got {}",
                cfg.shards
            )));
        }
        let cores = if cfg.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut shards = Shards {
            handles: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..cfg.shards {
            let port = if cfg.media_port_base == 0 {
                0
            } else {
                u16::try_from(usize::from(cfg.media_port_base) + i).map_err(|_| {
                    ShardError::Config(format!(
                        "media_port_base {} + {} shards passes port 65535",
                        cfg.media_port_base, cfg.shards
                    ))
                })?
            };
            let sockets = sockets::bind_shard(
                cfg.listen,
                port,
                sockets::SocketOptions {
                    udp_rcvbuf: cfg.udp_rcvbuf,
                    udp_sndbuf: cfg.udp_sndbuf,
                    backlog: 1024,
                },
                BIND_PATIENCE,
            )
            .map_err(|source| ShardError::Bind {
                shard: i,
                addr: SocketAddr::new(cfg.listen, port),
                source,
            })?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let waker = Arc::new(Waker::new().map_err(|source| ShardError::Setup {
                shard: i,
                what: "eventfd",
                source,
            })?);
            let sessions = Arc::new(AtomicUsize::new(0));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let core = cores.get(i % cores.len().max(1)).copied();
            let mut shard_cfg = cfg.clone();
            shard_cfg.relay.ipv6 = sockets.ipv6;
            let (udp_addr, tcp_addr) = (sockets.udp_addr, sockets.tcp_addr);
            let ctx = ShardContext {
                index: i,
                rx,
                waker: waker.clone(),
                sessions: sessions.clone(),
                cfg: shard_cfg,
            };
            let thread = std::thread::Builder::new()
                .name(format!("voxgate-shard-{i}"))
                .spawn(move || {
                    if let Some(core) = core
                        && !core_affinity::set_for_current(core)
                    {
                        tracing::warn!(shard = i, "could not pin to core {}", core.id);
                    }
                    // The coalescing wait is the shard's latency budget: the kernel's default
                    // 50 µs timer slack would add to it on every wake-up.
                    let _ = nix::sys::prctl::set_timerslack(1_000);
                    run_shard(ctx, sockets, ready_tx);
                })
                .map_err(|source| ShardError::Setup {
                    shard: i,
                    what: "thread",
                    source,
                })?;
            shards.threads.push(thread);
            let backend =
                ready_rx
                    .recv()
                    .map_err(|_| ShardError::Gone(i))?
                    .map_err(|(what, source)| ShardError::Setup {
                        shard: i,
                        what,
                        source,
                    })?;
            shards.handles.push(ShardHandle {
                index: i,
                udp_addr,
                tcp_addr,
                backend,
                tx,
                waker,
                sessions,
            });
        }
        Ok(shards)
    }

    /// The shard with the fewest sessions (ties: the lowest index).
    pub fn least_loaded(&self) -> &ShardHandle {
        self.handles
            .iter()
            .min_by_key(|h| (h.sessions(), h.index))
            .expect("Shards always holds at least one shard")
    }

    pub fn shutdown(&mut self) {
        for h in &self.handles {
            let _ = h.send(Command::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Everything a shard thread needs besides its sockets.
pub(crate) struct ShardContext {
    pub index: usize,
    pub rx: Receiver<Command>,
    pub waker: Arc<Waker>,
    pub sessions: Arc<AtomicUsize>,
    pub cfg: ShardConfig,
}

type Ready = std::sync::mpsc::Sender<Result<Backend, (&'static str, std::io::Error)>>;

fn run_shard(ctx: ShardContext, sockets: sockets::ShardSockets, ready: Ready) {
    let layout = PoolLayout {
        buf_size: ctx.cfg.buf_size,
        udp: ctx.cfg.udp_bufs,
        tcp: ctx.cfg.tcp_bufs,
        spare: ctx.cfg.spare_bufs,
    };
    let pool = match Pool::new(layout) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err((
                "packet buffers",
                std::io::Error::other(e.to_string()),
            )));
            return;
        }
    };
    let core = ShardCore {
        relay: Relay::new(ctx.cfg.relay.clone()),
        pool,
        out: Outbox::default(),
        ctx,
        rate: 0.0,
        last_wake_ns: sockets::realtime_ns(),
        next_housekeeping_ns: 0,
        adopted: Vec::new(),
        leg_sockets: 0,
    };
    let backend = core.ctx.cfg.backend;
    let index = core.ctx.index;
    if backend != Backend::Epoll {
        match uring::UringShard::prepare(&core, &sockets) {
            Ok(rings) => {
                match uring::UringShard::new(core, rings, &sockets) {
                    Ok(mut u) => {
                        let _ = ready.send(Ok(Backend::IoUring));
                        u.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(("io_uring", e)));
                    }
                }
                return;
            }
            Err(e) if backend == Backend::IoUring => {
                let _ = ready.send(Err(("io_uring", e)));
                return;
            }
            Err(e) => log_fallback_once(index, &e),
        }
    }
    match epoll::EpollShard::new(core, &sockets) {
        Ok(mut e) => {
            let _ = ready.send(Ok(Backend::Epoll));
            e.run();
        }
        Err(e) => {
            let _ = ready.send(Err(("epoll", e)));
        }
    }
}

fn log_fallback_once(index: usize, e: &std::io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            shard = index,
            "io_uring is not available ({e}); shards run on epoll with recvmmsg/sendmmsg"
        );
    });
}

/// The wake-up coalescing rule, one for both loops: at `rate` packets per second, with a
/// budget of `budget_us` and a batch of at most `batch` packets, how long after a turn's
/// wake-up (its wait ended) the next wait may end. None: do not coalesce (no budget, or under
/// two packets per budget expected). At high rates a batch of `batch` packets costs little more
/// per packet than a whole budget's worth, and a bigger one would outrun the receive, so the
/// target is the shorter of the budget and a batch's worth of arrivals. The target counts from
/// the wake-up, not from the end of the turn's work: the budget bounds the wait any packet sees
/// (README, "Wake-ups are the cost"), and a busy shard, whose work took the target, does not
/// sleep.
pub(crate) fn coalesce_target_us(rate: f64, budget_us: u64, batch: usize) -> Option<u64> {
    if budget_us == 0 || rate * (budget_us as f64) < 2e6 {
        return None;
    }
    let batch_us = (batch as f64 * 1e6 / rate) as u64;
    Some(budget_us.min(batch_us))
}

/// State both event loops share: the forwarding core, its buffers and the command channel.
pub(crate) struct ShardCore {
    pub relay: Relay,
    pub pool: Pool,
    pub out: Outbox,
    pub ctx: ShardContext,
    /// Work items (completions, packets) per second, smoothed: sizes the batch a wake-up
    /// gathers under coalescing.
    pub rate: f64,
    last_wake_ns: u64,
    next_housekeeping_ns: u64,
    /// Connections taken in by [`Command::AdoptTcp`] this turn: the loop arms their receives.
    pub adopted: Vec<relay::ConnId>,
    /// Connected leg sockets open (the io_uring loop keeps it up to date).
    pub leg_sockets: usize,
}

impl ShardCore {
    /// A wake-up handled `work` items at `now`: count it and update the rate estimate.
    pub fn note_wake(&mut self, work: usize, now: u64) {
        if work == 0 {
            self.rate *= 0.5;
            return;
        }
        self.relay.counters.wakeups += 1;
        let dt = now.saturating_sub(self.last_wake_ns).max(1_000) as f64;
        self.rate = 0.8 * self.rate + 0.2 * (work as f64 * 1e9 / dt);
        self.last_wake_ns = now;
    }

    /// [`coalesce_target_us`] at this shard's rate.
    pub fn coalesce_target_us(&self, budget_us: u64, batch: usize) -> Option<u64> {
        coalesce_target_us(self.rate, budget_us, batch)
    }

    /// Once per turn of either loop: commands, then time-based duties. False: stop.
    pub fn turn(&mut self, backend: Backend, now: u64) -> bool {
        if !self.drain_commands(backend) {
            return false;
        }
        if now >= self.next_housekeeping_ns {
            self.relay.housekeeping(&mut self.pool, now, &mut self.out);
            self.next_housekeeping_ns = now + 100_000_000;
        }
        true
    }

    /// Runs queued commands; returns false when the shard must stop.
    pub fn drain_commands(&mut self, backend: Backend) -> bool {
        self.ctx.waker.clear_pending();
        while let Ok(cmd) = self.ctx.rx.try_recv() {
            match cmd {
                Command::Install { spec, reply } => {
                    let r = self.relay.install(spec);
                    self.publish_load();
                    let _ = reply.send(r);
                }
                Command::Remove { session, reply } => {
                    let existed = self.relay.remove(&mut self.pool, session, &mut self.out);
                    self.publish_load();
                    if let Some(reply) = reply {
                        let _ = reply.send(existed);
                    }
                }
                Command::AddLeg {
                    session,
                    leg,
                    reply,
                } => {
                    let _ = reply.send(self.relay.add_leg(session, leg));
                }
                Command::RemoveLeg {
                    session,
                    leg,
                    reply,
                } => {
                    let gone = self
                        .relay
                        .remove_leg(&mut self.pool, session, &leg, &mut self.out);
                    if let Some(reply) = reply {
                        let _ = reply.send(gone);
                    }
                }
                Command::Snapshot { legs, reply } => {
                    let _ = reply.send(self.snapshot(backend, legs));
                }
                Command::Ping { reply } => {
                    let _ = reply.send(());
                }
                Command::SetPeerPolicy { policy } => self.relay.set_peer_policy(policy),
                Command::SessionLegs { session, reply } => {
                    let _ = reply.send(self.relay.session_legs(session));
                }
                Command::AdoptTcp { fd, peer } => self.adopt_tcp(fd, peer, None),
                Command::AdoptTls { fd, peer, keys } => self.adopt_tcp(fd, peer, Some(*keys)),
                Command::Shutdown => return false,
            }
        }
        true
    }

    /// Takes in a connection accepted elsewhere: as an accept by the shard's own listener
    /// (the same budgets; over them it is closed and counted).
    fn adopt_tcp(
        &mut self,
        fd: std::os::fd::OwnedFd,
        peer: SocketAddr,
        tls: Option<crate::wire::tls_records::RecordKeys>,
    ) {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let sndbuf = i32::try_from(self.ctx.cfg.tcp_sndbuf).unwrap_or(i32::MAX);
        sockets::media_conn_options(&fd, sndbuf);
        let now = sockets::realtime_ns();
        if let Some(c) = self
            .relay
            .on_accept(&mut self.pool, fd, peer, now, &mut self.out)
        {
            if let Some(keys) = tls {
                self.relay.set_tls(c, keys);
            }
            self.adopted.push(c);
        }
    }

    /// Hands the relay's notifications to the control thread (a non-blocking send).
    pub fn publish_events(&mut self) {
        if self.out.events.is_empty() {
            return;
        }
        match &self.ctx.cfg.events {
            Some(tx) => {
                for e in self.out.events.drain(..) {
                    if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(e) {
                        self.relay
                            .counters
                            .drop(crate::metrics::DropReason::EventOverflow);
                    }
                }
            }
            None => self.out.events.clear(),
        }
    }

    fn publish_load(&self) {
        self.ctx
            .sessions
            .store(self.relay.session_count(), Ordering::Relaxed);
    }

    fn snapshot(&mut self, backend: Backend, legs: bool) -> ShardSnapshot {
        ShardSnapshot {
            shard: self.ctx.index,
            backend,
            counters: self.relay.counters,
            latency: self.relay.take_latency(),
            legs: if legs {
                self.relay.snapshot_legs()
            } else {
                Vec::new()
            },
            sessions: self.relay.session_count(),
            tcp_conns: self.relay.conn_count(),
            tcp_queued: self.relay.tcp_queued_total(),
            buffers_in_use: self.pool.in_use(),
            leg_sockets: self.leg_sockets,
            buffer_bytes: self.pool.mapped_bytes(),
            buffer_refusals: self.pool.refused(),
        }
    }
}

#[cfg(test)]
mod coalesce_tests {
    use super::coalesce_target_us;

    #[test]
    fn the_budget_bounds_the_wait_and_a_batch_bounds_it_at_high_rates() {
        // Off: no budget, or fewer than two packets expected in one.
        assert_eq!(coalesce_target_us(1e6, 0, 64), None);
        assert_eq!(coalesce_target_us(1_999.0, 1_000, 64), None);
        // Light load: the whole budget.
        assert_eq!(coalesce_target_us(2_000.0, 1_000, 64), Some(1_000));
        assert_eq!(coalesce_target_us(20_000.0, 1_000, 64), Some(1_000));
        // Above `batch` per budget (64k/s here), a batch's worth of arrivals: the epoll loop
        // once stopped coalescing there altogether and woke once per few packets.
        assert_eq!(coalesce_target_us(75_000.0, 1_000, 64), Some(853));
        assert_eq!(coalesce_target_us(150_000.0, 1_000, 60), Some(400));
        // Never longer than the budget, at any rate.
        for rate in [2e3, 1e4, 5e4, 1e5, 1e6, 1e7] {
            assert!(coalesce_target_us(rate, 1_000, 64).is_some_and(|t| t <= 1_000));
        }
    }
}
