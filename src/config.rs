//! The gateway's configuration: a TOML file (every key optional, every key documented in
//! `systemd/voxgate.toml`), overridden by command-line flags, validated as a whole at start with
//! errors that name the key and the problem. Unknown keys are errors too: a misspelt key that is
//! silently ignored is how an edge box ends up running on defaults nobody chose.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::auth::{Bucket, RateLimitConfig};
use crate::control::gateway::GatewayConfig;
use crate::control::peer_policy::Cidr;
use crate::shard::{Backend, RelayConfig, ShardConfig};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub presence: PresenceSection,
    pub probe: ProbeSection,
    pub calls: CallsSection,
    pub auth: AuthSection,
    pub media: MediaSection,
    pub dumps: DumpsSection,
    pub admin: AdminSection,
    pub limits: LimitsSection,
    pub cdr: CdrSection,
    pub store: StoreSection,
    pub web: WebSection,
    pub tls: TlsSection,
    /// `[fleet]`: presence and calls across gateways in Redis (`server::fleet`).
    pub fleet: crate::server::fleet::FleetSection,
    pub single_port: SinglePortSection,
}

/// One port for everything (`[single_port]`; see `server::single_port`): control (plain and/or
/// TLS, as `[tls]` allows) and TCP media on one TCP port such as 443, told apart by their
/// first bytes; clients are told this port for TCP media.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinglePortSection {
    /// The port; `None` (default): no shared port. 0: any free port (tests).
    pub port: Option<u16>,
    /// TCP media on this port: `tls` (RFC 4571 inside TLS, ALPN `voxgate-media`; needs
    /// `[tls]` cert and key) or `plain` (RFC 4571 as on the shards' ports). Only that kind is
    /// accepted; clients are told which.
    pub media: SharedMedia,
    /// Who runs TLS on media connections once the handshake is done: `kernel` (kTLS: the
    /// shard reads and writes plain bytes, zero-copy) or `userspace` (a relay task on the
    /// control thread, one copy per packet each way) or `shard` (the shard runs the TLS 1.3
    /// record layer itself on the handshake's keys: received records opened in place in its
    /// buffers, sent frames copied once into a record). With `kernel` and no kTLS in the
    /// kernel (the `tls` module), the gateway does not start: it never falls back silently.
    pub tls_engine: TlsEngine,
}

impl Default for SinglePortSection {
    fn default() -> Self {
        SinglePortSection {
            port: None,
            media: SharedMedia::Tls,
            tls_engine: TlsEngine::Kernel,
        }
    }
}

/// What TCP media looks like on the shared port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedMedia {
    Tls,
    Plain,
}

/// Where TLS on media connections runs after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsEngine {
    Kernel,
    Userspace,
    Shard,
}

/// TLS on the control channel (`[tls]`; see `server::tls`). With `cert` and `key` set, the
/// gateway also listens for TLS control connections on `control_port`; `plain_control`
/// decides whether the plaintext listener on `server.control_port` stays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain (leaf first). Re-read on SIGHUP.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    pub key: Option<PathBuf>,
    /// The TLS control listener's port; 0: any free port (tests).
    pub control_port: u16,
    /// Keep the plaintext control listener on `server.control_port` as well.
    pub plain_control: bool,
}

impl TlsSection {
    /// Plain and TLS control on one port (told apart by the first byte).
    pub fn shared_port(&self, server: &ServerSection) -> bool {
        self.cert.is_some()
            && self.plain_control
            && self.control_port != 0
            && self.control_port == server.control_port
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            control_port: 7443,
            plain_control: true,
        }
    }
}

/// Call detail records (see `metrics::cdr`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdrSection {
    /// Write one JSON line per ended call.
    pub enabled: bool,
    /// The file; unset: `<data_dir>/cdr.jsonl`. Reopened on SIGHUP (logrotate).
    pub path: Option<PathBuf>,
}

impl Default for CdrSection {
    fn default() -> Self {
        CdrSection {
            enabled: true,
            path: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address every socket binds to; `::` is dual-stack.
    pub listen: IpAddr,
    /// 0: any free port (tests); the log says which.
    pub control_port: u16,
    /// Shard i uses UDP and TCP port `media_port_base + i`.
    pub media_port_base: u16,
    pub probe_ports: [u16; 2],
    /// 0: one shard per available core.
    pub shards: usize,
    /// Store, auth secret. Default: `$STATE_DIRECTORY` under systemd, else `./voxgate-data`.
    pub data_dir: Option<PathBuf>,
    pub backend: Backend,
    pub pin_shards: bool,
    /// Allow media destinations in private, loopback and link-local ranges.
    pub allow_private_peers: bool,
    /// Prefixes that open media destinations (most specific prefix wins).
    pub allowed_peers: Vec<Cidr>,
    /// Prefixes that close media destinations (most specific prefix wins).
    pub denied_peers: Vec<Cidr>,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
    pub log_level: String,
    pub max_connections: usize,
    /// On SIGTERM, calls in progress get this long to finish.
    pub shutdown_grace_s: u64,
    /// While draining, told to clients in `going_away`: other gateways' control addresses
    /// (`HOST[:PORT]` or `tls://HOST[:PORT]`), best first. Empty: clients use their own lists.
    pub drain_redirect: Vec<String>,
    /// The public addresses clients are told behind 1:1 NAT (coturn's `external-ip`); unset:
    /// the address each client's control connection arrived at.
    pub advertised_ipv4: Option<std::net::Ipv4Addr>,
    pub advertised_ipv6: Option<std::net::Ipv6Addr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSection {
    pub heartbeat_ms: u64,
    pub misses: u32,
    pub login_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeSection {
    pub timeout_ms: u64,
    pub bind_wait_ms: u64,
    pub grace_ms: u64,
    pub repeats: u32,
    pub spacing_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsSection {
    pub ring_timeout_s: u64,
    pub max_calls_per_user: usize,
    pub max_room_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// PBKDF2 iterations for new verifiers (RFC 7677 recommends at least 4096).
    pub scram_iterations: u32,
    /// Log-in attempts (charged at `hello`, given back on success) allowed at once per source
    /// address, then one per `ip_refill_s`.
    pub ip_burst: u32,
    pub ip_refill_s: u64,
    /// Per user name from sources with unsuccessful attempts (a slow-down: a source that has
    /// not failed for the user is always let through).
    pub user_burst: u32,
    pub user_refill_s: u64,
    /// Per user name at one source address: the lock-out a guesser runs into.
    pub user_source_burst: u32,
    pub user_source_refill_s: u64,
    /// A bucket emptied again before it refilled doubles its refill period, up to this.
    pub backoff_max_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaSection {
    /// Wake-up coalescing budget in µs (0 = off).
    pub coalesce_us: u64,
    pub buf_size: usize,
    pub udp_bufs: usize,
    pub tcp_bufs: usize,
    pub spare_bufs: usize,
    pub ring_entries: u32,
    pub send_slots: usize,
    /// Connected UDP sockets per shard, one per leg media is sent to (io_uring loop only;
    /// 0: every send goes out on the shard socket). 0..=65536; all shards together take at
    /// most a quarter of the descriptor limit.
    pub leg_sockets: usize,
    pub max_frame: u16,
    pub tcp_queue_frames: usize,
    pub tcp_sndbuf: usize,
    pub udp_rcvbuf: usize,
    pub udp_sndbuf: usize,
    pub max_unbound_tcp: usize,
    pub unbound_tcp_timeout_ms: u64,
    /// Unbound TCP media connections one source (IPv4 address, IPv6 /64) may hold; over it,
    /// the one of that source that made the least progress is closed. 1..=`max_unbound_tcp`.
    pub max_unbound_tcp_per_source: usize,
    /// Media older than this is dropped, in ms (kernel receive time to handling, or waiting in
    /// a TCP queue); 0: never.
    pub stale_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DumpsSection {
    /// Directory for histogram dumps; unset: `<data_dir>/dumps`.
    pub dir: Option<PathBuf>,
    /// Seconds per interval; 0 turns dumps off.
    pub interval_s: u64,
    pub max_files: usize,
    pub intervals_per_file: usize,
}

/// The HTTP admin listener (`/metrics`, `/health`); see `server::admin`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    pub enabled: bool,
    /// Loopback by default: metrics are for the operator's scraper, not the Internet.
    pub listen: std::net::SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            enabled: true,
            listen: "127.0.0.1:7480".parse().expect("constant address"),
        }
    }
}

/// Who may register through the web page (`[web] registration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone who reaches the page.
    Open,
    /// Only with an invitation code (`voxgate invite add`).
    Invite,
    /// Nobody: the page says registration is closed.
    Closed,
}

/// The web listener: registration page and admin REST API (`[web]`); see `server::web`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSection {
    pub enabled: bool,
    /// Plain HTTP: keep it on loopback (or behind a TLS-terminating proxy) until HTTPS lands.
    pub listen: std::net::SocketAddr,
    pub registration: Registration,
    /// Numbers the page assigns on request: `"+1555010000-+1555019999"`; empty: none.
    pub number_range: String,
    /// Bearer tokens of the admin REST API (at least 16 characters each).
    pub admin_tokens: Vec<String>,
    /// A file with more tokens, one per line (`#` comments); read at start.
    pub admin_token_file: Option<PathBuf>,
    /// Connections held at once (WebSocket control connections included).
    pub max_connections: usize,
    /// A connection without a byte either way for this long is closed.
    pub idle_timeout_s: u64,
    /// Serve HTTPS (TLS 1.3) with the `[tls]` certificate and key instead of plain HTTP
    /// (reloaded on SIGHUP with the control listener's).
    pub https: bool,
}

impl Default for WebSection {
    fn default() -> Self {
        WebSection {
            enabled: false,
            listen: "127.0.0.1:7481".parse().expect("constant address"),
            registration: Registration::Closed,
            number_range: String::new(),
            admin_tokens: Vec::new(),
            admin_token_file: None,
            max_connections: 1024,
            idle_timeout_s: 60,
            https: false,
        }
    }
}

/// Limits against floods and abuse on the control port (`[limits]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Control connections held at once from one IPv4 address or IPv6 /64.
    pub connections_per_source: u32,
    /// Messages a control connection may send per second after a burst; faster clients are
    /// throttled (their messages are read more slowly).
    pub messages_per_s: u32,
    pub message_burst: u32,
    /// A client throttled without a break for this long is refused (`rate_limited`) and closed.
    pub flood_close_s: u64,
    /// Dials and conferences one subscriber may place at once, then per minute.
    pub dials_burst: u32,
    pub dials_per_min: u32,
    /// Rings of one callee by one caller at once, then per minute (calls and invitations).
    pub rings_per_pair_burst: u32,
    pub rings_per_pair_per_min: u32,
    /// Rings of one callee by all callers at once, then per minute.
    pub rings_per_callee_burst: u32,
    pub rings_per_callee_per_min: u32,
    /// Room invitations one organizer may send at once, then per minute.
    pub invites_burst: u32,
    pub invites_per_min: u32,
    /// Telephone route calls end after this many seconds (`hang_up{time_limit}`); 0 = never.
    pub route_max_duration_s: u64,
    /// A route call whose caller or voice gateway sent no media for this many seconds ends
    /// (`hang_up{no_media}`); 0 = not checked.
    pub route_inactivity_s: u64,
    /// Sources (addresses or blocks) the per-source limits do not apply to: the log-in limiter
    /// and `connections_per_source`. Loopback by default (local tools and load generators).
    pub exempt_sources: Vec<String>,
}

impl LimitsSection {
    /// The exempt blocks that parse (validation reports the others).
    pub fn exempt(&self) -> Vec<crate::control::limits::Cidr> {
        self.exempt_sources
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// The core's dial, ring and invitation limits.
    pub fn call_limits(&self) -> crate::control::limits::CallLimitConfig {
        let pace = |burst: u32, per_min: u32| crate::control::limits::Pace {
            burst: burst.max(1),
            every: Duration::from_secs(60) / per_min.max(1),
        };
        crate::control::limits::CallLimitConfig {
            dials: pace(self.dials_burst, self.dials_per_min),
            rings_per_pair: pace(self.rings_per_pair_burst, self.rings_per_pair_per_min),
            rings_per_callee: pace(self.rings_per_callee_burst, self.rings_per_callee_per_min),
            invites: pace(self.invites_burst, self.invites_per_min),
        }
    }
}

/// Where the directory (subscribers, routes) is (`[store]`); see `store::location`. `Debug`
/// leaves out the directory URL, which may hold a password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `""`: SQLite `voxgate.db` in the data directory; `sqlite:PATH`; or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (a fleet's shared directory).
    /// `$VOXGATE_DIRECTORY` overrides it, `--directory` overrides both.
    pub directory: String,
    /// A file (mode 0600) whose first line is the PostgreSQL password, when the URL has none;
    /// unset: `$PGPASSWORD`, if set.
    pub password_file: Option<PathBuf>,
    /// Bounds connecting to PostgreSQL, each statement, and unacknowledged writes.
    pub timeout_ms: u64,
    /// Directory worker threads, each with its own connection.
    pub workers: usize,
}

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field("directory", &"<not shown: may hold a password>")
            .field("password_file", &self.password_file)
            .field("timeout_ms", &self.timeout_ms)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            directory: String::new(),
            password_file: None,
            timeout_ms: 5_000,
            workers: 2,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            connections_per_source: 256,
            messages_per_s: 20,
            message_burst: 50,
            flood_close_s: 5,
            dials_burst: 10,
            dials_per_min: 10,
            rings_per_pair_burst: 3,
            rings_per_pair_per_min: 3,
            rings_per_callee_burst: 20,
            rings_per_callee_per_min: 20,
            invites_burst: 30,
            invites_per_min: 30,
            route_max_duration_s: 4 * 3600,
            route_inactivity_s: 60,
            exempt_sources: vec!["127.0.0.0/8".into(), "::1".into()],
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "::".parse().expect("constant address"),
            control_port: 7400,
            media_port_base: 7401,
            probe_ports: [7390, 7391],
            shards: 0,
            data_dir: None,
            backend: Backend::Auto,
            pin_shards: true,
            allow_private_peers: false,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            log_level: "info".into(),
            max_connections: 10_000,
            shutdown_grace_s: 30,
            drain_redirect: Vec::new(),
            advertised_ipv4: None,
            advertised_ipv6: None,
        }
    }
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection {
            heartbeat_ms: 10_000,
            misses: 3,
            login_timeout_ms: 10_000,
        }
    }
}

impl Default for ProbeSection {
    fn default() -> Self {
        ProbeSection {
            timeout_ms: 2_000,
            bind_wait_ms: 600,
            grace_ms: 300,
            repeats: 3,
            spacing_ms: 50,
        }
    }
}

impl Default for CallsSection {
    fn default() -> Self {
        CallsSection {
            ring_timeout_s: 30,
            max_calls_per_user: 8,
            max_room_size: 16,
        }
    }
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            scram_iterations: 4096,
            ip_burst: 20,
            ip_refill_s: 3,
            user_burst: 30,
            user_refill_s: 2,
            user_source_burst: 5,
            user_source_refill_s: 12,
            backoff_max_s: 300,
        }
    }
}

impl Default for MediaSection {
    fn default() -> Self {
        let s = ShardConfig::default();
        let r = RelayConfig::default();
        MediaSection {
            coalesce_us: s.coalesce.as_micros() as u64,
            buf_size: s.buf_size,
            udp_bufs: s.udp_bufs,
            tcp_bufs: s.tcp_bufs,
            spare_bufs: s.spare_bufs,
            ring_entries: s.ring_entries,
            send_slots: s.send_slots,
            leg_sockets: s.leg_sockets,
            max_frame: r.max_frame,
            tcp_queue_frames: r.tcp_queue_frames,
            tcp_sndbuf: s.tcp_sndbuf,
            udp_rcvbuf: s.udp_rcvbuf,
            udp_sndbuf: s.udp_sndbuf,
            max_unbound_tcp: r.max_unbound_tcp,
            unbound_tcp_timeout_ms: r.unbound_tcp_timeout_ns / 1_000_000,
            max_unbound_tcp_per_source: r.max_unbound_tcp_per_source,
            stale_ms: r.stale_ns / 1_000_000,
        }
    }
}

impl Default for DumpsSection {
    fn default() -> Self {
        DumpsSection {
            dir: None,
            interval_s: 10,
            max_files: 24,
            intervals_per_file: 360,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// Longest `allowed_peers` / `denied_peers` list: each call set-up scans them.
pub const MAX_PEER_PREFIXES: usize = 1024;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// The directory this configuration names, with its credentials (`store::location`).
    pub fn directory(&self) -> Result<crate::store::Location, crate::store::StoreError> {
        crate::store::Location::resolve(
            &self.store.directory,
            self.store.password_file.as_deref(),
            Duration::from_millis(self.store.timeout_ms),
            &self.data_dir(),
        )
    }

    /// Parses TOML; the error names the key (toml reports the offending key and line).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', "\n  "))
    }

    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let s = &self.server;
        let m = &self.media;
        let mut check = |ok: bool, key: &str, what: String| {
            if !ok {
                p.push(format!("{key}: {what}"));
            }
        };
        check(
            self.tls.cert.is_some() == self.tls.key.is_some(),
            "tls.cert",
            "tls.cert and tls.key go together: set both or neither".into(),
        );
        check(
            self.tls.plain_control || self.tls.cert.is_some(),
            "tls.plain_control",
            "false needs tls.cert and tls.key (there would be no control listener)".into(),
        );
        if let Some(port) = self.single_port.port.filter(|p| *p != 0) {
            check(
                self.single_port.media == SharedMedia::Plain || self.tls.cert.is_some(),
                "single_port.media",
                "\"tls\" needs tls.cert and tls.key; set media = \"plain\" for plaintext TCP media"
                    .into(),
            );
            let s = &self.server;
            let taken = [
                ("server.control_port", s.control_port),
                ("tls.control_port", self.tls.control_port),
                ("server.probe_ports[0]", s.probe_ports[0]),
                ("server.probe_ports[1]", s.probe_ports[1]),
            ];
            for (key, other) in taken {
                check(
                    other != port,
                    "single_port.port",
                    format!("{port} is also {key}"),
                );
            }
            let media =
                usize::from(s.media_port_base)..usize::from(s.media_port_base) + self.shard_count();
            check(
                s.media_port_base == 0 || !media.contains(&usize::from(port)),
                "single_port.port",
                format!("{port} collides with the media ports {media:?}"),
            );
        }
        for (key, list) in [
            ("server.allowed_peers", &s.allowed_peers),
            ("server.denied_peers", &s.denied_peers),
        ] {
            check(
                list.len() <= MAX_PEER_PREFIXES,
                key,
                format!("{} prefixes; at most {MAX_PEER_PREFIXES}", list.len()),
            );
        }
        check(
            s.drain_redirect.len() <= crate::client::gateways::MAX_GATEWAYS
                && s.drain_redirect.iter().all(|g| {
                    matches!(
                        crate::client::gateways::GatewayList::parse([g.as_str()])
                            .map(|l| l.entries),
                        Ok(e) if e.len() == 1
                            && matches!(e[0], crate::client::gateways::Entry::Address(_))
                    )
                }),
            "server.drain_redirect",
            format!(
                "at most {} control addresses, each HOST[:PORT] or tls://HOST[:PORT]",
                crate::client::gateways::MAX_GATEWAYS
            ),
        );
        check(
            s.shards <= 1024,
            "server.shards",
            format!("{} is more than 1024", s.shards),
        );
        let shards = self.shard_count();
        check(
            s.media_port_base == 0 || usize::from(s.media_port_base) + shards <= 65_536,
            "server.media_port_base",
            format!(
                "{} + {shards} shards runs past port 65535",
                s.media_port_base
            ),
        );
        let media = usize::from(s.media_port_base)..usize::from(s.media_port_base) + shards;
        for (i, port) in s.probe_ports.iter().enumerate() {
            check(
                s.media_port_base == 0 || !media.contains(&usize::from(*port)),
                &format!("server.probe_ports[{i}]"),
                format!("{port} collides with the media ports {media:?}"),
            );
        }
        check(
            s.probe_ports[0] != s.probe_ports[1] || s.probe_ports[0] == 0,
            "server.probe_ports",
            "the two probe ports must differ".into(),
        );
        check(
            s.media_port_base == 0 || !media.contains(&usize::from(s.control_port)),
            "server.control_port",
            format!("{} collides with the media ports {media:?}", s.control_port),
        );
        check(
            tracing_subscriber::EnvFilter::try_new(&s.log_level).is_ok(),
            "server.log_level",
            format!("{:?} is not a log level or filter", s.log_level),
        );
        check(
            s.max_connections > 0,
            "server.max_connections",
            "must be at least 1".into(),
        );
        if let Err(e) = crate::server::web::NumberRange::parse(&self.web.number_range) {
            check(false, "web.number_range", e);
        }
        for (i, t) in self.web.admin_tokens.iter().enumerate() {
            check(
                t.len() >= crate::server::web::MIN_TOKEN_LEN,
                &format!("web.admin_tokens[{i}]"),
                format!(
                    "shorter than {} characters",
                    crate::server::web::MIN_TOKEN_LEN
                ),
            );
        }
        check(
            self.web.max_connections > 0,
            "web.max_connections",
            "must be at least 1".into(),
        );
        check(
            self.web.idle_timeout_s > 0,
            "web.idle_timeout_s",
            "must be at least 1".into(),
        );
        let pr = &self.presence;
        check(
            (1_000..=300_000).contains(&pr.heartbeat_ms),
            "presence.heartbeat_ms",
            format!("{} is outside 1000..=300000", pr.heartbeat_ms),
        );
        check(
            (1..=20).contains(&pr.misses),
            "presence.misses",
            format!("{} is outside 1..=20", pr.misses),
        );
        let pb = &self.probe;
        check(
            pb.timeout_ms >= pb.bind_wait_ms + pb.grace_ms,
            "probe.timeout_ms",
            format!(
                "{} must cover bind_wait_ms + grace_ms ({})",
                pb.timeout_ms,
                pb.bind_wait_ms + pb.grace_ms
            ),
        );
        check(
            (1..=10).contains(&pb.repeats),
            "probe.repeats",
            format!("{} is outside 1..=10", pb.repeats),
        );
        check(
            (2..=64).contains(&self.calls.max_room_size),
            "calls.max_room_size",
            format!("{} is outside 2..=64", self.calls.max_room_size),
        );
        check(
            self.calls.ring_timeout_s >= 1,
            "calls.ring_timeout_s",
            "must be at least 1".into(),
        );
        check(
            self.auth.scram_iterations >= 4096,
            "auth.scram_iterations",
            format!(
                "{} is below 4096 (RFC 7677's minimum)",
                self.auth.scram_iterations
            ),
        );
        check(
            m.coalesce_us <= 20_000,
            "media.coalesce_us",
            format!("{} µs is longer than a 20 ms voice frame", m.coalesce_us),
        );
        check(
            (512..=crate::shard::pool::MAX_BUF_SIZE).contains(&m.buf_size) && m.buf_size % 64 == 0,
            "media.buf_size",
            format!(
                "{} must be a multiple of 64 in 512..={} (packet segment lengths are 16-bit)",
                m.buf_size,
                crate::shard::pool::MAX_BUF_SIZE
            ),
        );
        check(
            usize::from(m.max_frame) + 2 <= m.buf_size,
            "media.max_frame",
            format!("{} does not fit a {}-byte buffer", m.max_frame, m.buf_size),
        );
        check(
            m.max_frame >= 172,
            "media.max_frame",
            format!("{} is too small for a G.711 packet", m.max_frame),
        );
        let total = m.udp_bufs + m.tcp_bufs + m.spare_bufs;
        check(
            total <= 65_535,
            "media.udp_bufs",
            format!("udp_bufs + tcp_bufs + spare_bufs = {total} is more than 65535"),
        );
        check(
            (16..=32_768).contains(&m.udp_bufs),
            "media.udp_bufs",
            format!("{} is outside 16..=32768", m.udp_bufs),
        );
        check(
            (16..=32_768).contains(&m.tcp_bufs),
            "media.tcp_bufs",
            format!("{} is outside 16..=32768", m.tcp_bufs),
        );
        check(
            m.spare_bufs >= 8,
            "media.spare_bufs",
            "must be at least 8".into(),
        );
        check(
            (64..=32_768).contains(&m.ring_entries),
            "media.ring_entries",
            format!("{} is outside 64..=32768", m.ring_entries),
        );
        check(
            (1..=4096).contains(&m.tcp_queue_frames),
            "media.tcp_queue_frames",
            format!("{} is outside 1..=4096", m.tcp_queue_frames),
        );
        check(
            m.tcp_queue_frames < m.udp_bufs,
            "media.tcp_queue_frames",
            "must be smaller than media.udp_bufs (queued frames pin receive buffers)".into(),
        );
        if let Some(a) = s.advertised_ipv4 {
            check(
                !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
                "server.advertised_ipv4",
                format!("{a} is not a unicast address clients can reach"),
            );
        }
        if let Some(a) = s.advertised_ipv6 {
            check(
                !(a.is_unspecified() || a.is_multicast() || a.to_ipv4_mapped().is_some()),
                "server.advertised_ipv6",
                format!("{a} is not a unicast IPv6 address (set IPv4 in advertised_ipv4)"),
            );
        }
        let l = &self.limits;
        check(
            l.connections_per_source >= 1,
            "limits.connections_per_source",
            "must be at least 1".into(),
        );
        check(
            (1..=100_000).contains(&l.messages_per_s),
            "limits.messages_per_s",
            format!("{} is outside 1..=100000", l.messages_per_s),
        );
        check(
            (1..=100_000).contains(&l.message_burst),
            "limits.message_burst",
            format!("{} is outside 1..=100000", l.message_burst),
        );
        for (i, src) in l.exempt_sources.iter().enumerate() {
            let r = src.parse::<crate::control::limits::Cidr>();
            check(
                r.is_ok(),
                &format!("limits.exempt_sources[{i}]"),
                r.err().unwrap_or_default(),
            );
        }
        for (key, v) in [
            ("limits.dials_burst", l.dials_burst),
            ("limits.dials_per_min", l.dials_per_min),
            ("limits.rings_per_pair_burst", l.rings_per_pair_burst),
            ("limits.rings_per_pair_per_min", l.rings_per_pair_per_min),
            ("limits.rings_per_callee_burst", l.rings_per_callee_burst),
            (
                "limits.rings_per_callee_per_min",
                l.rings_per_callee_per_min,
            ),
            ("limits.invites_burst", l.invites_burst),
            ("limits.invites_per_min", l.invites_per_min),
        ] {
            check(
                (1..=60_000).contains(&v),
                key,
                format!("{v} is outside 1..=60000"),
            );
        }
        check(
            m.stale_ms <= 10_000,
            "media.stale_ms",
            format!("{} ms is outside 0..=10000", m.stale_ms),
        );
        check(
            (1..=65_535).contains(&m.max_unbound_tcp),
            "media.max_unbound_tcp",
            format!("{} is outside 1..=65535", m.max_unbound_tcp),
        );
        check(
            (1..=m.max_unbound_tcp).contains(&m.max_unbound_tcp_per_source),
            "media.max_unbound_tcp_per_source",
            format!(
                "{} is outside 1..={} (media.max_unbound_tcp)",
                m.max_unbound_tcp_per_source, m.max_unbound_tcp
            ),
        );
        check(
            m.unbound_tcp_timeout_ms <= 600_000,
            "media.unbound_tcp_timeout_ms",
            format!("{} ms is outside 0..=600000", m.unbound_tcp_timeout_ms),
        );
        check(
            (16..=1 << 20).contains(&m.send_slots),
            "media.send_slots",
            format!("{} is outside 16..=1048576", m.send_slots),
        );
        check(
            m.leg_sockets <= 65536,
            "media.leg_sockets",
            format!("{} is outside 0..=65536", m.leg_sockets),
        );
        check(
            m.tcp_sndbuf <= i32::MAX as usize
                && m.udp_rcvbuf <= i32::MAX as usize
                && m.udp_sndbuf <= i32::MAX as usize,
            "media.tcp_sndbuf",
            "socket buffer sizes (tcp_sndbuf, udp_rcvbuf, udp_sndbuf) must fit an i32".into(),
        );
        let st = &self.store;
        if let Err(e) = crate::store::location::kind(&st.directory, Path::new(".")) {
            check(false, "store.directory", e.to_string());
        }
        check(
            (100..=60_000).contains(&st.timeout_ms),
            "store.timeout_ms",
            format!("{} is outside 100..=60000", st.timeout_ms),
        );
        check(
            (1..=64).contains(&st.workers),
            "store.workers",
            format!("{} is outside 1..=64", st.workers),
        );
        check(
            self.dumps.max_files >= 1,
            "dumps.max_files",
            "must be at least 1".into(),
        );
        check(
            self.dumps.intervals_per_file >= 1,
            "dumps.intervals_per_file",
            "must be at least 1".into(),
        );
        p.extend(self.fleet.problems());
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    pub fn shard_count(&self) -> usize {
        if self.server.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.server.shards
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.server.data_dir.clone().unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .map(|d| PathBuf::from(d.to_string_lossy().split(':').next().unwrap_or(".")))
                .unwrap_or_else(|| PathBuf::from("voxgate-data"))
        })
    }

    /// Where call detail records go, or `None` when they are off.
    pub fn cdr_path(&self) -> Option<PathBuf> {
        self.cdr.enabled.then(|| {
            self.cdr
                .path
                .clone()
                .unwrap_or_else(|| self.data_dir().join("cdr.jsonl"))
        })
    }

    pub fn dump_dir(&self) -> PathBuf {
        self.dumps
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("dumps"))
    }

    pub fn shard_config(&self) -> ShardConfig {
        let m = &self.media;
        ShardConfig {
            listen: self.server.listen,
            media_port_base: self.server.media_port_base,
            shards: self.shard_count(),
            backend: self.server.backend,
            pin: self.server.pin_shards,
            buf_size: m.buf_size,
            udp_bufs: m.udp_bufs,
            tcp_bufs: m.tcp_bufs,
            spare_bufs: m.spare_bufs,
            ring_entries: m.ring_entries,
            send_slots: m.send_slots,
            leg_sockets: m.leg_sockets,
            coalesce: Duration::from_micros(m.coalesce_us),
            udp_rcvbuf: m.udp_rcvbuf,
            udp_sndbuf: m.udp_sndbuf,
            tcp_sndbuf: m.tcp_sndbuf,
            relay: RelayConfig {
                max_frame: m.max_frame,
                tcp_queue_frames: m.tcp_queue_frames,
                // Queued frames pin receive buffers: at most half of what the rings hold.
                tcp_queued_total: ((m.udp_bufs + m.tcp_bufs) / 2).max(m.tcp_queue_frames),
                max_unbound_tcp: m.max_unbound_tcp,
                unbound_tcp_timeout_ns: m.unbound_tcp_timeout_ms * 1_000_000,
                max_unbound_tcp_per_source: m.max_unbound_tcp_per_source,
                stale_ns: m.stale_ms * 1_000_000,
                peer_policy: self.peer_policy(),
                ..RelayConfig::default()
            },
            events: None,
        }
    }

    /// The peer-address policy (`allow_private_peers`, `allowed_peers`, `denied_peers`): the
    /// control core checks media destinations against it, the shards latching sources.
    pub fn peer_policy(&self) -> crate::net::policy::PeerPolicy {
        crate::net::policy::PeerPolicy::new(
            self.server.allow_private_peers,
            &self.server.allowed_peers,
            &self.server.denied_peers,
        )
    }

    /// The control core's settings; `secret` is the persisted decoy secret.
    pub fn gateway_config(&self, secret: [u8; 32], probe_ports: (u16, u16)) -> GatewayConfig {
        let bucket = |burst: u32, every: u64| {
            (burst > 0).then_some(Bucket {
                burst,
                refill_every: Duration::from_secs(every.max(1)),
            })
        };
        GatewayConfig {
            heartbeat: Duration::from_millis(self.presence.heartbeat_ms),
            misses: self.presence.misses,
            login_timeout: Duration::from_millis(self.presence.login_timeout_ms),
            ring_timeout: Duration::from_secs(self.calls.ring_timeout_s),
            probe_ports,
            probe_timeout: Duration::from_millis(self.probe.timeout_ms),
            probe_bind_wait: Duration::from_millis(self.probe.bind_wait_ms),
            probe_grace: Duration::from_millis(self.probe.grace_ms),
            probe_repeats: self.probe.repeats,
            probe_spacing: Duration::from_millis(self.probe.spacing_ms),
            allow_private_peers: self.server.allow_private_peers,
            allowed_peers: self.server.allowed_peers.clone(),
            denied_peers: self.server.denied_peers.clone(),
            scram_iterations: self.auth.scram_iterations,
            rate_limit: RateLimitConfig {
                per_ip: bucket(self.auth.ip_burst, self.auth.ip_refill_s),
                per_user: bucket(self.auth.user_burst, self.auth.user_refill_s),
                per_user_source: bucket(
                    self.auth.user_source_burst,
                    self.auth.user_source_refill_s,
                ),
                max_backoff: Duration::from_secs(self.auth.backoff_max_s.max(1)),
                ..RateLimitConfig::default()
            },
            max_connections: self.server.max_connections,
            max_calls_per_user: self.calls.max_calls_per_user,
            max_room_size: self.calls.max_room_size,
            call_limits: self.limits.call_limits(),
            exempt_sources: self.limits.exempt(),
            route_max_duration: Duration::from_secs(self.limits.route_max_duration_s),
            route_inactivity: Duration::from_secs(self.limits.route_inactivity_s),
            advertised: crate::control::advertise::Advertised {
                ipv4: self.server.advertised_ipv4,
                ipv6: self.server.advertised_ipv6,
            },
            drain_redirect: self.server.drain_redirect.clone(),
            fleet_resume_grace: Duration::from_millis(self.fleet.resume_grace_ms),
            ..GatewayConfig::with_secret(secret)
        }
    }

    /// What differs between two configurations that a running gateway cannot apply live
    /// (named in the log on reload).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let (a, b) = (&self.server, &new.server);
        let mut v = Vec::new();
        if a.listen != b.listen {
            v.push("server.listen");
        }
        if a.control_port != b.control_port {
            v.push("server.control_port");
        }
        if a.media_port_base != b.media_port_base {
            v.push("server.media_port_base");
        }
        if a.probe_ports != b.probe_ports {
            v.push("server.probe_ports");
        }
        if a.shards != b.shards {
            v.push("server.shards");
        }
        if a.data_dir != b.data_dir {
            v.push("server.data_dir");
        }
        if a.backend != b.backend {
            v.push("server.backend");
        }
        if a.pin_shards != b.pin_shards {
            v.push("server.pin_shards");
        }
        let mut v: Vec<String> = v.into_iter().map(String::from).collect();
        // Every [media] key needs a restart: name each one that changed.
        v.extend(changed_keys("media", &self.media, &new.media));
        if self.dumps.dir != new.dumps.dir {
            v.push("dumps.dir".into());
        }
        v.extend(changed_keys("admin", &self.admin, &new.admin));
        if self.tls.control_port != new.tls.control_port {
            v.push("tls.control_port".into());
        }
        if self.tls.plain_control != new.tls.plain_control {
            v.push("tls.plain_control".into());
        }
        if self.tls.cert.is_some() != new.tls.cert.is_some() {
            v.push("tls.cert (turning TLS on or off)".into());
        }
        v.extend(changed_keys("store", &self.store, &new.store));
        v.extend(changed_keys("web", &self.web, &new.web));
        v.extend(changed_keys(
            "single_port",
            &self.single_port,
            &new.single_port,
        ));
        v
    }
}

/// `section.key` for each key whose value differs between `a` and `b` (as TOML values).
fn changed_keys<T: Serialize>(section: &str, a: &T, b: &T) -> Vec<String> {
    let table = |x: &T| match toml::Value::try_from(x) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    let (ta, tb) = (table(a), table(b));
    let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| ta.get(*k) != tb.get(*k))
        .map(|k| format!("{section}.{k}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_an_empty_file_means_defaults() {
        Config::default().validate().unwrap();
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_config_in_systemd_parses_to_the_defaults() {
        let text = include_str!("../systemd/voxgate.toml");
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c, Config::default(), "the example documents the defaults");
    }

    #[test]
    fn values_the_types_cannot_hold_are_refused_by_name() {
        for (text, key) in [
            ("[media]\nbuf_size = 65536\n", "media.buf_size"),
            ("[media]\nstale_ms = 60000\n", "media.stale_ms"),
            ("[media]\nmax_unbound_tcp = 0\n", "media.max_unbound_tcp"),
            (
                "[media]\nmax_unbound_tcp_per_source = 0\n",
                "media.max_unbound_tcp_per_source",
            ),
            (
                "[media]\nmax_unbound_tcp = 16\nmax_unbound_tcp_per_source = 17\n",
                "media.max_unbound_tcp_per_source: 17 is outside 1..=16",
            ),
            ("[media]\nsend_slots = 8\n", "media.send_slots"),
            ("[media]\nleg_sockets = 65537\n", "media.leg_sockets"),
            ("[media]\ntcp_sndbuf = 4294967296\n", "media.tcp_sndbuf"),
        ] {
            let e = Config::parse(text)
                .unwrap()
                .validate()
                .expect_err(text)
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        // The per-source limit reaches the shards, and may equal the shard's limit.
        let c = Config::parse("[media]\nmax_unbound_tcp = 16\nmax_unbound_tcp_per_source = 16\n")
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shard_config().relay.max_unbound_tcp_per_source, 16);
        assert_eq!(
            Config::default()
                .shard_config()
                .relay
                .max_unbound_tcp_per_source,
            64
        );
        // The largest buffer the 16-bit segment lengths can describe is accepted.
        let c = Config::parse("[media]\nbuf_size = 65472\nmax_frame = 1500\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let e = Config::parse("[server]\ncontrol_prot = 7400\n").unwrap_err();
        assert!(e.contains("control_prot"), "{e}");
        let e = Config::parse("[media]\ncoalesce_us = \"fast\"\n").unwrap_err();
        assert!(e.contains("coalesce_us"), "{e}");
        let e = Config::parse("[medai]\n").unwrap_err();
        assert!(e.contains("medai"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let c = Config::parse(
            "[server]\nprobe_ports = [7402, 7402]\n[media]\nbuf_size = 1000\nmax_frame = 100\n\
             [auth]\nscram_iterations = 10\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        for key in [
            "server.probe_ports[0]",
            "server.probe_ports:",
            "media.buf_size",
            "media.max_frame",
            "auth.scram_iterations",
        ] {
            assert!(e.contains(key), "{key} missing in:\n{e}");
        }
    }

    #[test]
    fn drain_redirect_takes_control_addresses_only() {
        let c = Config::parse(
            "[server]\ndrain_redirect = [\"gw2.example.net:7400\", \"tls://gw3.example.net\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.gateway_config([1; 32], (1, 2)).drain_redirect,
            ["gw2.example.net:7400", "tls://gw3.example.net"]
        );
        for bad in [
            "\"\"",
            "\"a b\"",
            "\"_voxgate._tcp.example.net\"",
            "\"h:notaport\"",
        ] {
            let text = format!("[server]\ndrain_redirect = [{bad}]\n");
            let e = Config::parse(&text)
                .unwrap()
                .validate()
                .expect_err(&text)
                .to_string();
            assert!(e.contains("server.drain_redirect"), "{text}: {e}");
        }
    }

    #[test]
    fn advertised_addresses_parse_and_bad_ones_are_named() {
        let c = Config::parse(
            "[server]\nadvertised_ipv4 = \"203.0.113.5\"\nadvertised_ipv6 = \"2001:db8::5\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let g = c.gateway_config([1; 32], (1, 2));
        assert_eq!(
            g.advertised.for_local("10.0.0.1".parse().unwrap()),
            "203.0.113.5".parse::<std::net::IpAddr>().unwrap()
        );
        let e = Config::parse("[server]\nadvertised_ipv4 = \"2001:db8::5\"\n").unwrap_err();
        assert!(e.contains("advertised_ipv4"), "{e}");
        let c = Config::parse(
            "[server]\nadvertised_ipv4 = \"0.0.0.0\"\nadvertised_ipv6 = \"::ffff:1.2.3.4\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.advertised_ipv4: 0.0.0.0"), "{e}");
        assert!(e.contains("server.advertised_ipv6: ::ffff:1.2.3.4"), "{e}");
    }

    #[test]
    fn peer_lists_parse_and_bad_prefixes_are_named() {
        let c = Config::parse(
            "[server]\nallowed_peers = [\"10.20.0.0/16\", \"fd00:1::/32\"]\n\
             denied_peers = [\"10.20.5.0/24\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.gateway_config([0; 32], (1, 2)).peer_policy();
        assert!(p.check("10.20.1.1".parse().unwrap()).is_ok());
        assert!(p.check("10.20.5.1".parse().unwrap()).is_err());
        assert!(p.check("10.21.1.1".parse().unwrap()).is_err());
        let e = Config::parse("[server]\ndenied_peers = [\"10.0.0.1/8\"]\n").unwrap_err();
        assert!(
            e.contains("denied_peers") && e.contains("did you mean 10.0.0.0/8"),
            "{e}"
        );
        let e = Config::parse("[server]\nallowed_peers = [\"lab\"]\n").unwrap_err();
        assert!(
            e.contains("allowed_peers") && e.contains("\"lab\" is not an IP"),
            "{e}"
        );
        let mut c = Config::default();
        c.server.denied_peers = vec!["10.0.0.0/8".parse().unwrap(); MAX_PEER_PREFIXES + 1];
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("server.denied_peers: 1025 prefixes; at most 1024"),
            "{e}"
        );
    }

    #[test]
    fn store_keys_are_checked_and_need_a_restart() {
        let c = Config::parse(
            "[store]\ndirectory = \"mysql://u:Secret-pw@db/x\"\ntimeout_ms = 10\nworkers = 0\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        for key in ["store.directory", "store.timeout_ms", "store.workers"] {
            assert!(e.contains(key), "{key} missing in:\n{e}");
        }
        assert!(!e.contains("Secret-pw"), "{e}");
        assert!(!format!("{c:?}").contains("Secret-pw"));
        let c = Config::parse("[store]\ndirectory = \"postgres://vox@db.example/dir\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(
            Config::default().restart_only_changes(&c),
            vec!["store.directory"]
        );
        assert_eq!(
            c.directory().unwrap().to_string(),
            "postgres://vox@db.example:5432/dir"
        );
        let mut d = Config::default();
        d.server.data_dir = Some("/srv/vox".into());
        assert_eq!(
            d.directory().unwrap().to_string(),
            "sqlite:/srv/vox/voxgate.db"
        );
    }

    #[test]
    fn restart_only_keys_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.server.control_port = 9000;
        b.presence.heartbeat_ms = 5000;
        b.media.coalesce_us = 0;
        b.media.udp_bufs = 8;
        assert_eq!(
            a.restart_only_changes(&b),
            vec!["server.control_port", "media.coalesce_us", "media.udp_bufs"]
        );
        let mut c = a.clone();
        c.server.denied_peers = vec!["10.0.0.0/8".parse().unwrap()];
        c.calls.ring_timeout_s = 5;
        assert!(a.restart_only_changes(&c).is_empty(), "live keys");
    }

    #[test]
    fn tls_keys_are_checked_together() {
        let c = Config::parse("[tls]\ncert = \"/c.pem\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("tls.cert") && e.contains("set both or neither"),
            "{e}"
        );
        let c = Config::parse("[tls]\nplain_control = false\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tls.plain_control"), "{e}");
        let c =
            Config::parse("[tls]\ncert = \"/c\"\nkey = \"/k\"\nplain_control = false\n").unwrap();
        c.validate().unwrap();
        assert!(!c.tls.shared_port(&c.server));
        let mut shared = c.clone();
        shared.tls.plain_control = true;
        shared.tls.control_port = shared.server.control_port;
        assert!(shared.tls.shared_port(&shared.server));
        let keys = c.restart_only_changes(&Config::default());
        assert!(keys.iter().any(|k| k == "tls.plain_control"), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("tls.cert")), "{keys:?}");
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    #[test]
    fn default_call_limits_match_the_core_defaults() {
        assert_eq!(
            Config::default().limits.call_limits(),
            crate::control::limits::CallLimitConfig::default()
        );
    }

    #[test]
    fn single_port_settings_are_checked() {
        // Off unless a port is named.
        let c = Config::parse("").unwrap();
        assert_eq!(c.single_port.port, None);
        // TLS media (the default) needs a certificate.
        let c = Config::parse("[single_port]\nport = 443\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("single_port.media") && e.contains("tls.cert"),
            "{e}"
        );
        let c = Config::parse("[single_port]\nport = 443\nmedia = \"plain\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.single_port.tls_engine, TlsEngine::Kernel);
        // It may not take another listener's port.
        let c = Config::parse(
            "[server]\ncontrol_port = 443\n[single_port]\nport = 443\nmedia = \"plain\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("single_port.port") && e.contains("server.control_port"),
            "{e}"
        );
        let c = Config::parse(
            "[server]\nmedia_port_base = 440\nshards = 4\n[single_port]\nport = 443\nmedia = \"plain\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("collides with the media ports"), "{e}");
        // Unknown values are refused by name.
        let c = Config::parse("[single_port]\ntls_engine = \"shard\"\n").unwrap();
        assert_eq!(c.single_port.tls_engine, TlsEngine::Shard);
        let e = Config::parse("[single_port]\ntls_engine = \"magic\"\n").unwrap_err();
        assert!(e.contains("tls_engine") || e.contains("magic"), "{e}");
        // A change needs a restart, and is named.
        let a = Config::parse("[single_port]\nport = 443\nmedia = \"plain\"\n").unwrap();
        let b = Config::parse("[single_port]\nport = 8443\nmedia = \"plain\"\n").unwrap();
        assert!(
            a.restart_only_changes(&b)
                .iter()
                .any(|k| k.contains("single_port")),
            "{:?}",
            a.restart_only_changes(&b)
        );
    }
}
