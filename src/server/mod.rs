//! The control thread: the IO around the sans-IO [`Gateway`](crate::control::gateway::Gateway).
//!
//! One thread runs a single-threaded tokio runtime (epoll). It owns the control listener, one
//! reader and one writer task per client connection, the two probe sockets, the timers, the
//! signals and the histogram dumps, and it commands the shards over their channels. Every
//! decision is the gateway core's: this module turns socket events into `Input`s, and
//! `Action`s into socket writes and shard commands, in the order the core emits them.
//!
//! Before the core sees a connection, [`conn_limits`] decides whether it may exist at all
//! (per-source caps, descriptor budget); each reader reads through a message token bucket; the
//! core's directory look-ups run on [`lookup`]'s threads; route calls' media activity is read
//! from the shards at a low rate for the core's inactivity check.

pub mod admin;
mod conn_limits;
pub mod demux;
pub mod fleet;
pub mod ktls;
pub mod lookup;
mod notify;
pub mod single_port;
mod tls;
pub mod web;

pub use tls::{provider as tls_provider, server_config as tls_server_config};
mod writer;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::control::gateway::{Action, ConnId, Gateway, Input, ProbePort, ShardInfo};
use crate::metrics::dump::{DumpConfig, DumpWriter, ShardSample};
use crate::net::canonical;
use crate::shard::{Command, ShardHandle, Shards};
use crate::store::sqlite::SqliteStore;
use crate::wire::control::{self as proto, ClientMsg, ServerMsg};

/// Bytes that may wait for one client (8 maximum-size messages); a client that leaves more
/// unread is disconnected.
const WRITE_BACKLOG: usize = 8 * proto::MAX_MESSAGE;

/// A client that does not take a backlog of control messages within this is cut off (its
/// descriptor and task come back).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// A room leg removed before its room ended, and the shard's answer with its numbers.
type DepartedLeg = (
    String,
    oneshot::Receiver<Vec<crate::shard::relay::LegSnapshot>>,
);

type FlushSpawner = Box<dyn FnMut(ConnId, writer::ControlWrite, Vec<u8>) + Send>;

/// What the control loop holds for one admitted connection besides its write half.
struct ConnIo {
    /// Its source, as counted by the connection limits.
    source: IpAddr,
    /// The reader task: aborted when the core closes the connection, so that the socket and
    /// the task come back at once and nothing more it sends is decoded.
    reader: tokio::task::AbortHandle,
}

/// How fast one connection's messages are read.
#[derive(Clone, Copy)]
struct ReadRate {
    rate: crate::control::limits::Rate,
    /// Throttled without a break for this long: the core is told ([`Input::Flooding`]).
    close_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Shards(#[from] crate::shard::ShardError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("histogram dumps: {0}")]
    Dump(#[from] crate::metrics::dump::DumpError),
    #[error(transparent)]
    Cdr(#[from] crate::metrics::cdr::CdrError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("web listener: {0}")]
    Web(String),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
}

/// Command-line overrides, re-applied over the file on every reload (flags keep winning).
pub type Overrides = Box<dyn Fn(&mut Config) + Send>;

/// Where a running gateway can be reached (tests bind port 0 and read these).
#[derive(Clone, Debug)]
pub struct Bound {
    pub control: SocketAddr,
    pub probe: (SocketAddr, SocketAddr),
    pub shards: Vec<(SocketAddr, SocketAddr)>,
    /// The HTTP admin listener (`/metrics`, `/health`), if enabled.
    pub admin: Option<SocketAddr>,
    /// The web listener (registration page, admin REST API), if enabled.
    pub web: Option<SocketAddr>,
    /// The TLS control listener (`[tls]`), if enabled.
    pub control_tls: Option<SocketAddr>,
    /// The shared port (`[single_port]`): control and TCP media on one port, if enabled.
    pub single_port: Option<SocketAddr>,
}

/// The first call or connection id of this run: its start time and a random part
/// ([`crate::control::records::id_base`]).
fn boot_id_base() -> u64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::control::records::id_base(secs, rand::random())
}

/// Opens (creating if needed) the data directory and the store in it.
pub fn open_store(data_dir: &Path) -> Result<SqliteStore, ServeError> {
    std::fs::create_dir_all(data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(SqliteStore::open(&data_dir.join("voxgate.db"))?)
}

/// Binds and starts the web listener (`[web]`); see [`web`].
async fn start_web(
    cfg: &Config,
    data_dir: &Path,
    store: lookup::StoreFactory,
    bridge: web::control::Bridge,
    tls: Option<&mut tls::TlsState>,
) -> Result<SocketAddr, ServeError> {
    let w = &cfg.web;
    let tokens = web::load_tokens(w).map_err(|e| ServeError::Web(e.to_string()))?;
    let number_range = web::NumberRange::parse(&w.number_range).map_err(ServeError::Web)?;
    let web_db = data_dir.join("web.db");
    // Created (and a bad file reported) before anything listens.
    web::db::WebDb::open(&web_db).map_err(ServeError::Web)?;
    let listener = web::bind(w.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: w.listen,
            what: "web (registration page, admin API)",
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Runtime)?;
    if !addr.ip().is_loopback() && !w.https {
        tracing::warn!(%addr, "the web listener speaks plain HTTP on a non-loopback address: set web.https or put a TLS proxy in front");
    }
    // The control listener's certificate (`[tls]`), and its reload on SIGHUP
    // (`Server::reload_tls` sends each new configuration here).
    let https = match (w.https, tls) {
        (false, _) => None,
        (true, Some(state)) => {
            let (tx, rx) = tokio::sync::watch::channel(web::https::for_http(&state.config));
            state.web = Some(tx);
            Some(rx)
        }
        (true, None) => {
            return Err(ServeError::Web("web.https needs [tls] cert and key".into()));
        }
    };
    let state = web::WebState {
        store,
        web_db,
        registration: w.registration,
        number_range,
        iterations: cfg.auth.scram_iterations,
        token_hashes: Arc::new(tokens),
        attempts: Default::default(),
        bridge: Some(bridge),
    };
    let idle = Duration::from_secs(w.idle_timeout_s);
    match https {
        Some(config) => {
            tracing::info!(%addr, "the web listener speaks HTTPS (the [tls] certificate)");
            web::spawn_https(listener, w.max_connections, idle, state, config)
                .map_err(ServeError::Runtime)?;
        }
        None => web::spawn(listener, w.max_connections, idle, state),
    }
    Ok(addr)
}

/// The decoy secret for unknown users' challenges: random once, then kept in the data
/// directory (mode 0600) so that a restart does not reveal which users exist.
pub fn load_secret(data_dir: &Path) -> Result<[u8; 32], ServeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("auth-secret");
    let err = |source| ServeError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&b);
            return Ok(s);
        }
        Ok(_) => {
            return Err(err(std::io::Error::other(
                "auth-secret is not 32 bytes; remove it to make a new one",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let secret: [u8; 32] = rand::random();
    let tmp = data_dir.join("auth-secret.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&secret).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(secret)
}

enum Event {
    Accepted(TcpStream, SocketAddr),
    Input(Input),
    Installed {
        op: u64,
        result: Result<(), String>,
    },
    Flushed(writer::Flushed),
    /// A call detail record, its legs' numbers gathered: to be written.
    Cdr(Box<crate::metrics::cdr::Cdr>),
    /// A connection on the TLS control listener, before its handshake.
    AcceptedTls(TcpStream, SocketAddr),
    /// The TLS handshake of an admitted connection ended.
    TlsReady {
        conn: ConnId,
        result: Result<Box<tls::ServerStream>, String>,
    },
    /// A connection on a shared port whose first byte is not a TLS handshake: plain control.
    PlainOnShared {
        conn: ConnId,
        stream: TcpStream,
    },
    /// A connection on the single port (`[single_port]`), before anything is known of it.
    AcceptedShared(TcpStream, SocketAddr),
    /// What a single-port connection turned out to be.
    Sorted {
        conn: ConnId,
        sorted: single_port::Sorted,
    },
}

/// A running gateway's handle for tests and embedding: stop it with [`Running::stop`].
pub struct Running {
    pub bound: Bound,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Running {
    /// SIGTERM-like: drain, wait for calls up to the grace period, stop.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the gateway thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Starts a gateway on its own thread (tests, embedding). `config_path` enables SIGHUP-style
/// reloads; `serve` below is what `voxgate serve` runs.
pub fn start(cfg: Config, config_path: Option<PathBuf>) -> Result<Running, ServeError> {
    start_with_directory(cfg, config_path, None)
}

/// [`start`], with the directory's store connections opened by `directory` instead of the
/// SQLite file in the data directory (tests: a store that is slow or fails).
pub fn start_with_directory(
    cfg: Config,
    config_path: Option<PathBuf>,
    directory: Option<lookup::StoreFactory>,
) -> Result<Running, ServeError> {
    let overrides: Overrides = Box::new(|_| {});
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("voxgate-control".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let r = run(cfg, config_path, overrides, Some(stop_rx), directory, |b| {
                    let _ = bound_tx.send(Ok(b.clone()));
                })
                .await;
                if let Err(e) = &r {
                    let _ = bound_tx.send(Err(e.to_string()));
                }
                r.map_err(|e| e.to_string())
            })
        })
        .map_err(ServeError::Runtime)?;
    match bound_rx.recv() {
        Ok(Ok(bound)) => Ok(Running {
            bound,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(ServeError::Runtime(std::io::Error::other(e)))
        }
        Err(_) => Err(ServeError::Runtime(std::io::Error::other(
            "the gateway thread ended during start-up",
        ))),
    }
}

/// `voxgate serve`: runs until SIGTERM/SIGINT and a drain.
pub fn serve(
    cfg: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(run(cfg, config_path, overrides, None, None, |b| {
        tracing::info!(
            control = %b.control,
            probe_a = %b.probe.0,
            probe_b = %b.probe.1,
            shards = b.shards.len(),
            admin = %b.admin.map_or("off".to_string(), |a| a.to_string()),
            web = %b.web.map_or("off".to_string(), |a| a.to_string()),
            control_tls = %b.control_tls.map_or("off".to_string(), |a| a.to_string()),
            single_port = %b.single_port.map_or("off".to_string(), |a| a.to_string()),
            "voxgate is ready"
        );
    }))
}

struct Server {
    cfg: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    gateway: Gateway,
    /// Per-source caps and the descriptor budget of control connections.
    limits: conn_limits::ConnLimits,
    /// Admitted connections' sources and reader tasks.
    io: HashMap<ConnId, ConnIo>,
    /// Directory look-ups, off this thread.
    directory: lookup::Directory,
    shards: Shards,
    /// Each connection's write side.
    writers: writer::Writers<FlushSpawner>,
    /// Where each message is encoded before it is written.
    scratch: Vec<u8>,
    probe: [Arc<UdpSocket>; 2],
    events: mpsc::Sender<Event>,
    next_conn: ConnId,
    dumps: Option<DumpWriter>,
    last_dump: SystemTime,
    /// Each shard's cumulative counters at the last dump: dumps hold per-interval counts.
    last_counters: HashMap<usize, crate::metrics::Counters>,
    started: Instant,
    /// Latency histograms taken from the shards by scrapes and dumps, legs, leg quality.
    ledger: Arc<std::sync::Mutex<crate::metrics::prom::Ledger>>,
    /// Call detail records (`None`: off).
    cdr: Option<crate::metrics::cdr::CdrWriter>,
    /// Records waiting for their shard's leg numbers.
    cdr_pending: usize,
    /// Room legs removed before their room ended: the shard's answers with their numbers,
    /// by session (= call id), for the room's record.
    departed: HashMap<u64, Vec<DepartedLeg>>,
    /// The TLS control listener's certificate and key (`[tls]`), reloaded on SIGHUP.
    tls: Option<tls::TlsState>,
    /// `[fleet]`: presence and calls across gateways in Redis.
    fleet: Option<fleet::FleetIo>,
    /// What the single port accepts (`[single_port]`), if there is one.
    shared: Option<single_port::SharedState>,
    /// Which shard holds each live leg (the single port's media connections go there).
    leg_shards: single_port::LegShards,
}

async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    stop: Option<oneshot::Receiver<()>>,
    directory: Option<lookup::StoreFactory>,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), ServeError> {
    cfg.validate()?;
    let data_dir = cfg.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let directory = match directory {
        Some(factory) => factory,
        None => {
            // `[store] directory`: the SQLite file in the data directory, or PostgreSQL.
            // Opened here once so that the schema is migrated (and a bad file or an
            // unreachable server reported) before anything listens; the look-up workers
            // open their own connections.
            let location = cfg.directory()?;
            location.check()?;
            tracing::info!(directory = %location, "directory opened");
            location.factory()
        }
    };
    let secret = load_secret(&data_dir)?;
    let (shard_events_tx, mut shard_events) = mpsc::channel(crate::shard::SHARD_EVENTS);
    let mut shard_cfg = cfg.shard_config();
    shard_cfg.events = Some(shard_events_tx);
    let shards = Shards::spawn(&shard_cfg)?;
    for h in &shards.handles {
        tracing::info!(
            shard = h.index,
            udp = %h.udp_addr,
            tcp = %h.tcp_addr,
            backend = %h.backend,
            "shard running"
        );
    }
    let listen = cfg.server.listen;
    // `[tls]`: the TLS control listener, and whether the plaintext one stays.
    let (tls_listener, mut tls_state) = tls::listen(&cfg).await?;
    // One port for both (`tls.control_port == server.control_port`): the TLS listener tells
    // them apart by the first byte.
    let control = match tls_listener.is_none()
        || (cfg.tls.plain_control && !cfg.tls.shared_port(&cfg.server))
    {
        true => Some(bind_tcp(SocketAddr::new(listen, cfg.server.control_port)).await?),
        false => None,
    };
    let control_tls = match &tls_listener {
        Some(l) => Some(l.local_addr().map_err(ServeError::Runtime)?),
        None => None,
    };
    // `[single_port]`: control and TCP media on one port.
    let (shared_listener, shared_state) = single_port::listen(&cfg).await?;
    let probe_a = bind_udp(
        SocketAddr::new(listen, cfg.server.probe_ports[0]),
        "probe port A",
    )?;
    let probe_b = bind_udp(
        SocketAddr::new(listen, cfg.server.probe_ports[1]),
        "probe port B",
    )?;
    let bound = Bound {
        control: match &control {
            Some(l) => l.local_addr().map_err(ServeError::Runtime)?,
            None => control_tls.expect("a TLS listener when the plain one is off"),
        },
        control_tls,
        single_port: match &shared_listener {
            Some(l) => Some(l.local_addr().map_err(ServeError::Runtime)?),
            None => None,
        },
        probe: (
            probe_a.local_addr().map_err(ServeError::Runtime)?,
            probe_b.local_addr().map_err(ServeError::Runtime)?,
        ),
        shards: shards
            .handles
            .iter()
            .map(|h| (h.udp_addr, h.tcp_addr))
            .collect(),
        admin: None,
        web: None,
    };
    let mut bound = bound;
    let ledger = Arc::new(std::sync::Mutex::new(crate::metrics::prom::Ledger::new(
        shards.handles.len(),
    )));
    let (stats_tx, mut stats_rx) =
        mpsc::channel::<oneshot::Sender<crate::control::gateway::GatewayStats>>(16);
    if cfg.admin.enabled {
        let listener = admin::bind(cfg.admin.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.admin.listen,
                what: "admin (metrics and health)",
                source,
            })?;
        bound.admin = Some(listener.local_addr().map_err(ServeError::Runtime)?);
        admin::spawn(
            listener,
            admin::AdminState {
                shards: shards.handles.clone(),
                ledger: ledger.clone(),
                stats: stats_tx,
                start_time_unix_s: SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            },
        );
    }
    // WebSocket control connections of the web pages, handed to the control loop below.
    let (bridge, mut bridged) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
    if cfg.web.enabled {
        bound.web = Some(
            start_web(
                &cfg,
                &data_dir,
                directory.clone(),
                bridge,
                tls_state.as_mut(),
            )
            .await?,
        );
    }
    let infos = shards
        .handles
        .iter()
        .map(|h| ShardInfo {
            index: h.index,
            udp_port: h.udp_addr.port(),
            // With a single port, phones are told it for TCP media (it hands each connection
            // to the shard holding its leg).
            tcp_port: bound.single_port.map_or(h.tcp_addr.port(), |a| a.port()),
        })
        .collect();
    let gw_cfg = cfg.gateway_config(secret, (bound.probe.0.port(), bound.probe.1.port()));
    let mut gateway = Gateway::new(gw_cfg, infos, rand::rngs::StdRng::from_os_rng());
    gateway.set_id_base(boot_id_base());
    let (budget, nofile) = conn_limits::descriptor_budget(cfg.server.max_connections);
    tracing::info!(
        max_connections = budget,
        per_source = cfg.limits.connections_per_source,
        nofile,
        "control connections: at most max_connections (half the free descriptors at most)"
    );
    let limits = conn_limits::ConnLimits::new(
        cfg.limits.connections_per_source,
        budget,
        cfg.limits.exempt(),
    );
    let dumps = open_dumps(&cfg)?;
    let cdr = match cfg.cdr_path() {
        Some(p) => {
            let w = crate::metrics::cdr::CdrWriter::open(&p)?;
            tracing::info!(path = %p.display(), "call detail records");
            Some(w)
        }
        None => None,
    };
    let (events, mut rx) = mpsc::channel::<Event>(4096);
    let answers = events.clone();
    let directory = lookup::Directory::spawn(&directory, cfg.store.workers, move |id, result| {
        let _ = answers.blocking_send(Event::Input(Input::LookupDone { id, result }));
    })?;
    // `[fleet]`: Redis reachable and this node subscribed before anything listens.
    let fleet = match cfg.fleet.enabled() {
        true => {
            let heartbeat = gateway.config().heartbeat;
            let f =
                fleet::FleetIo::start(&cfg.fleet, bound.control.port(), heartbeat, events.clone())
                    .await?;
            gateway.enable_fleet(f.node.clone());
            Some(f)
        }
        false => None,
    };
    let probe = [Arc::new(probe_a), Arc::new(probe_b)];
    for (i, sock) in probe.iter().enumerate() {
        let port = if i == 0 { ProbePort::A } else { ProbePort::B };
        tokio::spawn(probe_reader(sock.clone(), port, events.clone()));
    }
    if let Some(control) = control {
        tokio::spawn(acceptor(control, events.clone()));
    }
    if let Some(l) = tls_listener {
        tokio::spawn(tls::acceptor(l, events.clone()));
    }
    if let Some(l) = shared_listener {
        tokio::spawn(single_port::acceptor(l, events.clone()));
    }
    {
        let events = events.clone();
        tokio::spawn(async move {
            while let Some((stream, peer)) = bridged.recv().await {
                if events.send(Event::Accepted(stream, peer)).await.is_err() {
                    return;
                }
            }
        });
    }

    let mut server = Server {
        cfg,
        config_path,
        overrides,
        gateway,
        limits,
        io: HashMap::new(),
        directory,
        shards,
        writers: writer::Writers::new(WRITE_BACKLOG, flush_spawner(events.clone())),
        scratch: Vec::with_capacity(proto::MAX_MESSAGE),
        probe,
        events,
        // Connection ids, like call ids, are unique across restarts and gateways.
        next_conn: boot_id_base(),
        dumps,
        last_dump: SystemTime::now(),
        last_counters: HashMap::new(),
        started: Instant::now(),
        ledger,
        cdr,
        cdr_pending: 0,
        departed: HashMap::new(),
        tls: tls_state,
        fleet,
        shared: shared_state,
        leg_shards: single_port::LegShards::default(),
    };
    on_ready(&bound);
    notify::ready();

    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k| signal(k).map_err(ServeError::Runtime);
    let (mut term, mut int, mut hup, mut usr1) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
        sig(SignalKind::user_defined1())?,
    );
    let mut stop = stop;
    let mut watchdog = tokio::time::interval(notify::watchdog_interval());
    let mut dump_tick = dump_interval(&server.cfg);
    let mut activity_tick = activity_interval(&server.gateway);
    let mut drain_deadline: Option<tokio::time::Instant> = None;

    loop {
        let timeout = server
            .gateway
            .poll_timeout()
            .map(tokio::time::Instant::from_std);
        let drain_timer = async {
            match drain_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let stop_requested = async {
            match stop.as_mut() {
                Some(s) => {
                    let _ = s.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(ev) = rx.recv() => server.on_event(ev),
            Some(ev) = shard_events.recv() => match ev {
                crate::shard::ShardEvent::LegBound { session, leg, transport, source } => {
                    tracing::debug!(session, %leg, ?transport, %source, "leg bound");
                    server.ledger().leg_bound(session, &leg, transport);
                    server.gateway.handle(Instant::now(), Input::LegBound { session, leg: leg.to_string(), transport });
                }
                crate::shard::ShardEvent::LegEnded { session, leg, rtp, clock_rate, .. } => {
                    server.ledger().leg_ended(session, &leg, &rtp, clock_rate);
                }
            },
            Some(reply) = stats_rx.recv() => {
                let _ = reply.send(server.gateway.stats());
            }
            _ = async { match timeout { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                server.gateway.handle_timeout(Instant::now());
            }
            _ = dump_tick.tick() => server.dump().await,
            _ = activity_tick.tick() => server.media_activity().await,
            _ = watchdog.tick() => {
                if server.shards_alive().await { notify::watchdog(); }
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: writing histogram dumps now");
                server.dump().await;
            }
            _ = hup.recv() => {
                if let Some(t) = server.reload() { dump_tick = t; }
                activity_tick = activity_interval(&server.gateway);
            }
            _ = term.recv(), if drain_deadline.is_none() => {
                drain_deadline = Some(server.start_drain());
                stop = None;
            }
            _ = int.recv(), if drain_deadline.is_none() => {
                drain_deadline = Some(server.start_drain());
                stop = None;
            }
            _ = stop_requested, if drain_deadline.is_none() => {
                drain_deadline = Some(server.start_drain());
                stop = None;
            }
            _ = drain_timer => {
                tracing::warn!(calls = server.gateway.active_calls(), "drain grace period over: ending the remaining calls");
                break;
            }
        }
        server.execute().await;
        if drain_deadline.is_some() && server.gateway.active_calls() == 0 {
            tracing::info!("drained: no calls left");
            break;
        }
    }
    server.gateway.handle(Instant::now(), Input::Shutdown);
    server.execute().await;
    if let Some(f) = server.fleet.take() {
        f.finish().await;
    }
    server.finish_cdrs(&mut rx).await;
    server.dump().await;
    notify::stopping();
    // Let flush tasks send the last messages (bounded).
    server.writers.clear();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.shards.shutdown();
    tracing::info!(
        uptime_s = server.started.elapsed().as_secs(),
        "voxgate stopped"
    );
    Ok(())
}

/// How often route calls' media activity is read (hourly, doing nothing, when it is off).
fn activity_interval(gateway: &Gateway) -> tokio::time::Interval {
    let period = gateway
        .activity_interval()
        .unwrap_or(Duration::from_secs(3600));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn dump_interval(cfg: &Config) -> tokio::time::Interval {
    let secs = if cfg.dumps.interval_s == 0 {
        // Dumps off: tick rarely; `dump()` checks the setting.
        86_400
    } else {
        cfg.dumps.interval_s
    };
    let period = Duration::from_secs(secs);
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn open_dumps(cfg: &Config) -> Result<Option<DumpWriter>, ServeError> {
    Ok(Some(DumpWriter::new(DumpConfig {
        dir: cfg.dump_dir(),
        max_files: cfg.dumps.max_files,
        intervals_per_file: cfg.dumps.intervals_per_file,
    })?))
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(ServeError::Runtime)?;
    let bind = |e| ServeError::Bind {
        addr,
        what: "control port",
        source: e,
    };
    if addr.is_ipv6() {
        sock.set_only_v6(false).map_err(bind)?;
    }
    sock.set_reuse_address(true).map_err(bind)?;
    sock.set_nonblocking(true).map_err(bind)?;
    sock.bind(&addr.into()).map_err(bind)?;
    sock.listen(1024).map_err(bind)?;
    TcpListener::from_std(sock.into()).map_err(ServeError::Runtime)
}

fn bind_udp(addr: SocketAddr, what: &'static str) -> Result<UdpSocket, ServeError> {
    let err = |e| ServeError::Bind {
        addr,
        what,
        source: e,
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )
    .map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(ServeError::Runtime)
}

async fn acceptor(listener: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if events.send(Event::Accepted(stream, peer)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept on the control port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn probe_reader(sock: Arc<UdpSocket>, port: ProbePort, events: mpsc::Sender<Event>) {
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, src)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        // Only STUN is of interest; anything else costs nothing more.
        if !crate::wire::stun::looks_like_stun(&buf[..n])
            && !crate::wire::stun::is_rfc3489_binding_request(&buf[..n])
        {
            continue;
        }
        let input = Input::ProbeDatagram {
            port,
            src: canonical(src),
            data: buf[..n].to_vec(),
        };
        // Under a flood, drop rather than queue without bound.
        if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(Event::Input(input)) {
            return;
        }
    }
}

async fn conn_reader(
    conn: ConnId,
    mut rd: impl tokio::io::AsyncRead + Unpin,
    events: mpsc::Sender<Event>,
    rate: ReadRate,
) {
    // Grows to the largest message this client sent (a few hundred bytes), not the limit.
    let mut body = Vec::new();
    let mut bucket = crate::control::limits::TokenBucket::new(rate.rate, Instant::now());
    let mut throttled_since: Option<Instant> = None;
    loop {
        // A message is read only when the connection has a token for it: a client sending
        // faster than the rate is slowed down by TCP, at no cost to the control loop.
        let now = Instant::now();
        match bucket.take(now) {
            Ok(()) => throttled_since = None,
            Err(wait) => {
                let since = *throttled_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= rate.close_after {
                    let per_s = rate.rate.per_s;
                    let _ = events
                        .send(Event::Input(Input::Flooding { conn, per_s }))
                        .await;
                    break;
                }
                tokio::time::sleep(wait).await;
                let _ = bucket.take(Instant::now());
            }
        }
        let mut h = [0u8; 2];
        if rd.read_exact(&mut h).await.is_err() {
            break;
        }
        let len = match proto::body_len(h) {
            Ok(l) => l,
            Err(e) => {
                let _ = events
                    .send(Event::Input(Input::BadMessage {
                        conn,
                        error: e.to_string(),
                    }))
                    .await;
                break;
            }
        };
        body.resize(len, 0);
        if rd.read_exact(&mut body).await.is_err() {
            break;
        }
        let input = match proto::decode::<ClientMsg>(&body[..len]) {
            Ok(msg) => Input::Message { conn, msg },
            Err(e) => Input::BadMessage {
                conn,
                error: e.to_string(),
            },
        };
        if events.send(Event::Input(input)).await.is_err() {
            return;
        }
    }
    let _ = events
        .send(Event::Input(Input::Disconnected { conn }))
        .await;
}

/// Flush tasks report back to the control loop with the write half.
fn flush_spawner(events: mpsc::Sender<Event>) -> FlushSpawner {
    Box::new(move |conn, wr, bytes| {
        let events = events.clone();
        tokio::spawn(async move {
            let done = tokio::time::timeout(FLUSH_TIMEOUT, writer::flush(conn, wr, bytes))
                .await
                .unwrap_or(writer::Flushed { conn, wr: None });
            let _ = events.send(Event::Flushed(done)).await;
        });
    })
}

impl Server {
    fn on_event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Accepted(stream, peer) => {
                // Checked before anything is spent on the connection.
                let source = match self.limits.admit(canonical(peer).ip()) {
                    Ok(s) => s,
                    Err(why) => return self.refuse_at_accept(now, stream, peer, why),
                };
                let conn = self.next_conn;
                self.next_conn = crate::control::records::next_id(conn);
                let _ = stream.set_nodelay(true);
                let local = stream
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
                let (rd, wr) = stream.into_split();
                self.writers.insert(conn, wr);
                let rate = ReadRate {
                    rate: crate::control::limits::Rate {
                        burst: self.cfg.limits.message_burst,
                        per_s: self.cfg.limits.messages_per_s,
                    },
                    close_after: Duration::from_secs(self.cfg.limits.flood_close_s),
                };
                let reader = tokio::spawn(conn_reader(conn, rd, self.events.clone(), rate));
                self.io.insert(
                    conn,
                    ConnIo {
                        source,
                        reader: reader.abort_handle(),
                    },
                );
                self.gateway.handle(
                    now,
                    Input::Connected {
                        conn,
                        peer: canonical(peer),
                        local: canonical(local),
                    },
                );
            }
            Event::Flushed(done) => self.writers.flushed(done),
            Event::Input(input) => {
                if let Input::Disconnected { conn } = input {
                    self.writers.remove(conn);
                    self.release(conn);
                }
                if let Input::LegAddFailed { session, leg, .. } = &input {
                    self.leg_shards.remove_leg(*session, leg);
                }
                self.gateway.handle(now, input);
            }
            Event::Cdr(c) => {
                self.cdr_pending = self.cdr_pending.saturating_sub(1);
                self.write_cdr(&c);
            }
            Event::Installed { op, result } => {
                self.leg_shards.installed(op, result.is_ok());
                self.gateway
                    .handle(now, Input::ShardInstalled { op, result });
            }
            Event::AcceptedTls(stream, peer) => self.on_tls_accepted(now, stream, peer),
            Event::TlsReady { conn, result } => self.on_tls_ready(now, conn, result),
            Event::PlainOnShared { conn, stream } => self.on_plain_on_shared(now, conn, stream),
            Event::AcceptedShared(stream, peer) => self.on_shared_accepted(now, stream, peer),
            Event::Sorted { conn, sorted } => self.on_sorted(now, conn, sorted),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, crate::metrics::prom::Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection refused at accept: one `refused` frame if the socket takes it at once,
    /// then the socket is closed. No task, no input to the core, nothing decoded.
    fn refuse_at_accept(
        &mut self,
        now: Instant,
        stream: TcpStream,
        peer: SocketAddr,
        why: conn_limits::Refusal,
    ) {
        let (code, message) = match why {
            conn_limits::Refusal::Source => (
                proto::ErrorCode::RateLimited,
                format!(
                    "too many connections from this address (at most {})",
                    self.cfg.limits.connections_per_source
                ),
            ),
            conn_limits::Refusal::Capacity => (
                proto::ErrorCode::Unavailable,
                "the gateway is at capacity".to_owned(),
            ),
        };
        self.scratch.clear();
        if proto::encode(&ServerMsg::Refused { code, message }, &mut self.scratch).is_ok() {
            let _ = stream.try_write(&self.scratch);
        }
        drop(stream);
        if let Some((by_source, at_capacity)) = self.limits.note_refusal(now, why) {
            tracing::warn!(
                by_source,
                at_capacity,
                last_peer = %canonical(peer),
                held = self.limits.held(),
                budget = self.limits.budget(),
                "control connections refused at accept (counts since the last such line)"
            );
        }
    }

    /// The connection is gone for the core: its reader stops now and its slot comes back.
    fn release(&mut self, conn: ConnId) {
        if let Some(io) = self.io.remove(&conn) {
            io.reader.abort();
            self.limits.release(io.source);
        }
    }

    fn shard(&self, index: usize) -> Option<&ShardHandle> {
        self.shards.handles.iter().find(|h| h.index == index)
    }

    /// Carry out everything the core decided, in its order (shard commands go out in that
    /// order; only their answers are awaited concurrently).
    async fn execute(&mut self) {
        while let Some(action) = self.gateway.poll_action() {
            match action {
                Action::Send { conn, mut msg } => {
                    if !self.writers.contains(conn) {
                        continue;
                    }
                    if let ServerMsg::Media(m) = &mut msg {
                        single_port::mark_tls_media(self.shared, m);
                    }
                    if let ServerMsg::Media(m) = &msg {
                        tracing::info!(
                            conn,
                            call = m.call,
                            send = ?m.send.transport,
                            send_via_gateway = m.send.via_gateway,
                            recv = ?m.recv.transport,
                            recv_via_gateway = m.recv.via_gateway,
                            "media instructions sent"
                        );
                    }
                    if let ServerMsg::MediaReady { call } = &msg {
                        tracing::info!(conn, call, "media ready sent");
                    }
                    self.scratch.clear();
                    if let Err(e) = proto::encode(&msg, &mut self.scratch) {
                        tracing::error!(conn, "cannot encode a control message: {e}");
                        continue;
                    }
                    if self.writers.send(conn, &self.scratch) == Err(writer::SendError::Backlog) {
                        // The client does not read its messages: it is gone for our purposes.
                        tracing::warn!(conn, "control connection not reading: closing it");
                        self.release(conn);
                        self.gateway
                            .handle(Instant::now(), Input::Disconnected { conn });
                    }
                }
                Action::Close { conn } => {
                    self.writers.close(conn);
                    self.release(conn);
                }
                Action::Lookup { id, query } => {
                    if let Err(e) = self.directory.ask(id, query) {
                        self.gateway
                            .handle(Instant::now(), Input::LookupDone { id, result: Err(e) });
                    }
                }
                Action::ProbeSend { port, dst, data } => {
                    let sock = &self.probe[match port {
                        ProbePort::A => 0,
                        ProbePort::B => 1,
                    }];
                    let _ = sock.try_send_to(&data, dst);
                }
                Action::InstallSession { op, shard, spec } => {
                    let session = spec.id;
                    // Known to the shared port once the shard has it (media instructions go
                    // out only then).
                    self.leg_shards.pending(
                        op,
                        shard,
                        session,
                        spec.legs.iter().map(|l| l.name.clone()).collect(),
                    );
                    let result = match self.shard(shard) {
                        Some(h) => {
                            let (reply, rx) = oneshot::channel();
                            match h.send(Command::Install { spec, reply }) {
                                Ok(()) => {
                                    let events = self.events.clone();
                                    tokio::spawn(async move {
                                        let result = match rx.await {
                                            Ok(r) => r.map_err(|e| e.to_string()),
                                            Err(_) => Err("shard stopped".into()),
                                        };
                                        let _ = events.send(Event::Installed { op, result }).await;
                                    });
                                    continue;
                                }
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        None => Err(format!("no shard {shard}")),
                    };
                    tracing::error!(session, "cannot install a session: {result:?}");
                    self.leg_shards.installed(op, false);
                    self.gateway
                        .handle(Instant::now(), Input::ShardInstalled { op, result });
                }
                Action::RemoveSession { shard, session } => {
                    self.leg_shards.remove_session(session);
                    if let Some(h) = self.shard(shard) {
                        let _ = h.send(Command::Remove {
                            session,
                            reply: None,
                        });
                    }
                }
                Action::AddLeg {
                    shard,
                    session,
                    leg,
                } => {
                    // A failure is told to the core, which tells the member.
                    let name = leg.name.clone();
                    self.leg_shards.add(shard, session, &name);
                    let sent = match self.shard(shard) {
                        Some(h) => {
                            let (reply, rx) = oneshot::channel();
                            match h.send(Command::AddLeg {
                                session,
                                leg,
                                reply,
                            }) {
                                Ok(()) => {
                                    let events = self.events.clone();
                                    let name = name.clone();
                                    tokio::spawn(async move {
                                        let error = match rx.await {
                                            Ok(Ok(())) => return,
                                            Ok(Err(e)) => e.to_string(),
                                            Err(_) => "shard stopped".to_owned(),
                                        };
                                        let input = Input::LegAddFailed {
                                            session,
                                            leg: name,
                                            error,
                                        };
                                        let _ = events.send(Event::Input(input)).await;
                                    });
                                    Ok(())
                                }
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        None => Err(format!("no shard {shard}")),
                    };
                    if let Err(error) = sent {
                        self.leg_shards.remove_leg(session, &name);
                        self.gateway.handle(
                            Instant::now(),
                            Input::LegAddFailed {
                                session,
                                leg: name,
                                error,
                            },
                        );
                    }
                }
                Action::RemoveLeg {
                    shard,
                    session,
                    leg,
                } => {
                    self.leg_shards.remove_leg(session, &leg);
                    if let Some(h) = self.shard(shard) {
                        if self.cdr.is_some() {
                            // The leg's numbers for the room's record, asked before it goes.
                            let (reply, rx) = oneshot::channel();
                            if h.send(Command::SessionLegs { session, reply }).is_ok() {
                                let h = h.clone();
                                self.departed
                                    .entry(session)
                                    .or_default()
                                    .push((leg.clone(), rx));
                                let _ = h.send(Command::RemoveLeg {
                                    session,
                                    leg,
                                    reply: None,
                                });
                                continue;
                            }
                        }
                        let _ = h.send(Command::RemoveLeg {
                            session,
                            leg,
                            reply: None,
                        });
                    }
                }
                Action::CallEnded(rec) => self.call_ended(*rec),
                Action::Fleet(a) => {
                    if let Some(f) = &self.fleet {
                        f.act(a);
                    }
                }
                Action::RetireLegs {
                    shard,
                    session,
                    legs,
                } => {
                    if self.cdr.is_some()
                        && let Some(h) = self.shard(shard).cloned()
                    {
                        for leg in legs {
                            let (reply, rx) = oneshot::channel();
                            if h.send(Command::SessionLegs { session, reply }).is_ok() {
                                self.departed.entry(session).or_default().push((leg, rx));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Counters and latency of every shard (no per-leg numbers: the dumps do not hold them,
    /// and gathering them would stall a shard in proportion to its legs).
    async fn snapshots(&self) -> Vec<crate::shard::ShardSnapshot> {
        let mut out = Vec::new();
        for h in &self.shards.handles {
            match tokio::time::timeout(Duration::from_secs(2), h.snapshot(false)).await {
                Ok(Ok(s)) => out.push(s),
                _ => tracing::error!(shard = h.index, "shard did not answer a snapshot"),
            }
        }
        out
    }

    /// Every shard answers a ping. (A snapshot would also take the latency histogram that the
    /// next dump is owed.)
    async fn shards_alive(&self) -> bool {
        for h in &self.shards.handles {
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), h.ping()).await,
                Ok(Ok(()))
            ) {
                tracing::error!(shard = h.index, "shard did not answer a ping");
                return false;
            }
        }
        true
    }

    /// Route calls' media activity, for the core's inactivity check (toll abuse): a snapshot
    /// with per-leg numbers of each shard that holds a watched session, at a low rate and only
    /// while there are such calls. The latency histogram each snapshot takes is kept for the
    /// next dump.
    async fn media_activity(&mut self) {
        let watched = self.gateway.watched_sessions();
        if watched.is_empty() {
            return;
        }
        let mut shards: Vec<usize> = watched.iter().map(|&(s, _)| s).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut legs = Vec::new();
        for index in shards {
            let Some(h) = self.shard(index) else {
                continue;
            };
            let snap = match tokio::time::timeout(Duration::from_secs(2), h.snapshot(true)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::warn!(shard = index, "no activity snapshot from the shard");
                    continue;
                }
            };
            let now_ns = crate::shard::sockets::realtime_ns();
            for l in snap.legs {
                if watched.contains(&(index, l.session)) {
                    let idle = (l.last_rx_ns != 0)
                        .then(|| Duration::from_nanos(now_ns.saturating_sub(l.last_rx_ns)));
                    legs.push((l.session, l.name, idle));
                }
            }
            // The latency this snapshot took belongs to the next dump and to Prometheus.
            self.ledger().take_latency(snap.shard, &snap.latency);
        }
        self.gateway
            .handle(Instant::now(), Input::MediaActivity { legs });
    }

    async fn dump(&mut self) {
        let snaps = self.snapshots().await;
        let end = SystemTime::now();
        let start = std::mem::replace(&mut self.last_dump, end);
        let Some(w) = self.dumps.as_mut() else {
            return;
        };
        let mut samples = Vec::with_capacity(snaps.len());
        for s in snaps {
            let before = self
                .last_counters
                .insert(s.shard, s.counters)
                .unwrap_or_default();
            // With what scrapes took from this shard since the last dump.
            let latency = self
                .ledger
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .owed_to_dump(s.shard, &s.latency);
            samples.push(ShardSample {
                shard: s.shard,
                latency,
                counters: s.counters.since(&before),
            });
        }
        if let Err(e) = w.write_interval(start, end, &samples) {
            tracing::error!("histogram dump: {e}");
        }
    }

    fn start_drain(&mut self) -> tokio::time::Instant {
        let grace = Duration::from_secs(self.cfg.server.shutdown_grace_s);
        tracing::info!(
            calls = self.gateway.active_calls(),
            grace_s = grace.as_secs(),
            "draining: no new log-ins or calls; calls in progress may finish"
        );
        notify::stopping();
        self.gateway.handle(Instant::now(), Input::Drain);
        tokio::time::Instant::now() + grace
    }

    /// SIGHUP: re-read the config file and apply what can change live, and reopen the call
    /// detail records (logrotate). Returns a new dump timer when the interval changed.
    fn reload(&mut self) -> Option<tokio::time::Interval> {
        notify::reloading();
        let r = self.reload_inner();
        self.reload_tls();
        self.reopen_cdr();
        notify::ready();
        r
    }

    /// Opens the CDR file again, at the path the (possibly reloaded) configuration names.
    fn reopen_cdr(&mut self) {
        use crate::metrics::cdr::CdrWriter;
        let want = self.cfg.cdr_path();
        let result = match (&mut self.cdr, want) {
            (_, None) => {
                self.cdr = None;
                return;
            }
            (Some(w), Some(p)) if w.path() == p => w.reopen(),
            (_, Some(p)) => CdrWriter::open(&p).map(|w| self.cdr = Some(w)),
        };
        match result {
            Ok(()) => tracing::info!("SIGHUP: call detail records reopened"),
            Err(e) => tracing::error!("SIGHUP: {e}"),
        }
    }

    /// A call ended: its detail record, once the shard has told its legs' numbers. The legs
    /// are asked for before the session's removal (the core emits this first, and a shard
    /// runs its commands in order); the answer is awaited off the control loop.
    fn call_ended(&mut self, rec: crate::control::records::CallRecord) {
        use crate::metrics::cdr;
        let departed = self.departed.remove(&rec.call).unwrap_or_default();
        if self.cdr.is_none() {
            return;
        }
        let wall = cdr::wall_clock();
        let ask = rec.relay.and_then(|(shard, session)| {
            let h = self.shard(shard)?;
            let (reply, rx) = oneshot::channel();
            h.send(Command::SessionLegs { session, reply }).ok()?;
            Some(rx)
        });
        if ask.is_none() && departed.is_empty() {
            return self.write_cdr(&cdr::build(&rec, &[], wall));
        }
        self.cdr_pending += 1;
        let events = self.events.clone();
        tokio::spawn(async move {
            let call = rec.call;
            let answer = |rx: oneshot::Receiver<Vec<crate::shard::relay::LegSnapshot>>| async move {
                match tokio::time::timeout(Duration::from_secs(2), rx).await {
                    Ok(Ok(legs)) => legs,
                    _ => {
                        tracing::warn!(call, "no leg numbers from the shard for the call's record");
                        Vec::new()
                    }
                }
            };
            let mut legs = Vec::new();
            // A departed leg: from the answer given just before its removal.
            for (name, rx) in departed {
                legs.extend(answer(rx).await.into_iter().filter(|l| l.name == name));
            }
            if let Some(rx) = ask {
                legs.extend(answer(rx).await);
            }
            let c = cdr::build(&rec, &legs, wall);
            let _ = events.send(Event::Cdr(Box::new(c))).await;
        });
    }

    fn write_cdr(&mut self, c: &crate::metrics::cdr::Cdr) {
        if let Some(w) = &mut self.cdr
            && let Err(e) = w.write(c)
        {
            tracing::error!(call = c.call, "{e}");
        }
    }

    /// At shutdown: write the records still waiting for their legs (bounded wait).
    async fn finish_cdrs(&mut self, rx: &mut mpsc::Receiver<Event>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.cdr_pending > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Cdr(c))) => {
                    self.cdr_pending -= 1;
                    self.write_cdr(&c);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        records = self.cdr_pending,
                        "call detail records lost at shutdown"
                    );
                    break;
                }
            }
        }
    }

    fn reload_inner(&mut self) -> Option<tokio::time::Interval> {
        let Some(path) = self.config_path.clone() else {
            tracing::info!("SIGHUP: no config file to reload (started on defaults and flags)");
            return None;
        };
        let one_line = |e: &dyn std::fmt::Display| e.to_string().replace('\n', " ");
        let mut new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: config not reloaded: {}", one_line(&e));
                return None;
            }
        };
        (self.overrides)(&mut new);
        for key in self.cfg.restart_only_changes(&new) {
            tracing::warn!("SIGHUP: {key} needs a restart; keeping the running value");
        }
        new.server.listen = self.cfg.server.listen;
        new.server.control_port = self.cfg.server.control_port;
        new.server.media_port_base = self.cfg.server.media_port_base;
        new.server.probe_ports = self.cfg.server.probe_ports;
        new.server.shards = self.cfg.server.shards;
        new.server.data_dir = self.cfg.server.data_dir.clone();
        new.server.backend = self.cfg.server.backend;
        new.server.pin_shards = self.cfg.server.pin_shards;
        new.tls.control_port = self.cfg.tls.control_port;
        new.tls.plain_control = self.cfg.tls.plain_control;
        if new.tls.cert.is_some() != self.cfg.tls.cert.is_some() {
            new.tls.cert = self.cfg.tls.cert.clone();
            new.tls.key = self.cfg.tls.key.clone();
        }
        new.media = self.cfg.media.clone();
        new.dumps.dir = self.cfg.dumps.dir.clone();
        if let Err(e) = new.validate() {
            tracing::error!("SIGHUP: config not reloaded: {}", one_line(&e));
            return None;
        }
        crate::logging::set_level(&new.server.log_level);
        self.limits
            .set_max_per_source(new.limits.connections_per_source, new.limits.exempt());
        let secret = *self.gateway.config().auth.secret();
        let ports = self.gateway.config().probe_ports;
        self.gateway.set_config(new.gateway_config(secret, ports));
        // The shards latch UDP sources under the same policy (legs already bound stay).
        let policy = new.peer_policy();
        if policy != self.cfg.peer_policy() {
            for h in &self.shards.handles {
                if let Err(e) = h.set_peer_policy(policy.clone()) {
                    tracing::error!("SIGHUP: peer policy not given to the shard: {e}");
                }
            }
        }
        let new_interval =
            (new.dumps.interval_s != self.cfg.dumps.interval_s).then(|| dump_interval(&new));
        if let Some(w) = &self.dumps
            && (new.dumps.max_files != self.cfg.dumps.max_files
                || new.dumps.intervals_per_file != self.cfg.dumps.intervals_per_file)
        {
            let dir = w.config().dir.clone();
            match DumpWriter::new(DumpConfig {
                dir,
                max_files: new.dumps.max_files,
                intervals_per_file: new.dumps.intervals_per_file,
            }) {
                Ok(w) => self.dumps = Some(w),
                Err(e) => tracing::error!("SIGHUP: dump settings not applied: {e}"),
            }
        }
        self.cfg = new;
        tracing::info!(config = %path.display(), "SIGHUP: configuration reloaded; calls in progress are untouched");
        new_interval
    }
}
