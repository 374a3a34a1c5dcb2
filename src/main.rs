//! `voxgate`: the gateway, its administration, the softphone and the tools, in one binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use voxgate::config::Config;
use voxgate::control::auth::Verifier;
use voxgate::shard::Backend;
use voxgate::store::{Route, Store, Subscriber};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "voxgate",
    version,
    about = "Firewall-traversal gateway for voice over IP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (embedded defaults without --config).
    Serve(ServeArgs),
    /// Manage subscribers.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage telephone routes (number prefix -> IP voice gateway media address).
    #[command(subcommand)]
    Route(RouteCmd),
    /// Manage invitation codes of the web registration page (`[web] registration = "invite"`).
    #[command(subcommand)]
    Invite(InviteCmd),
    /// A softphone: log in, call or answer, play and record WAV, report what happened.
    Phone(voxgate::client::cli::PhoneArgs),
    /// Log in and print this client's firewall capabilities.
    Probe(voxgate::client::cli::ProbeArgs),
    /// Print percentile tables from histogram dumps.
    Stats(StatsArgs),
    /// Print call detail records, filtered by number, time and end reason.
    Cdr(voxgate::metrics::cdr::CdrArgs),
    /// The load generator and report of the perf harness (perf/run).
    Bench(voxgate::loadgen::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see systemd/voxgate.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Directory of the store and the auth secret [default: $STATE_DIRECTORY under systemd,
    /// else ./voxgate-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address every socket binds to; "::" is dual-stack [default: ::].
    #[arg(long)]
    listen: Option<IpAddr>,
    /// TCP port of the control protocol; 0 = any free port, logged at start [default: 7400].
    #[arg(long)]
    control_port: Option<u16>,
    /// Shard i takes UDP and TCP port BASE + i for media; 0 = any free ports [default: 7401].
    #[arg(long, value_name = "BASE")]
    media_port_base: Option<u16>,
    /// Probe ports A,B.
    #[arg(long, value_name = "A,B", value_parser = parse_port_pair)]
    probe_ports: Option<[u16; 2]>,
    /// Media shards (0: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Shard IO: io_uring, epoll, or auto (io_uring where available) [default: auto].
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Wake-up coalescing budget in µs (0 = off).
    #[arg(long)]
    coalesce_us: Option<u64>,
    /// Allow media destinations in private, loopback and link-local ranges (labs, one
    /// machine, private networks); special ranges stay denied.
    #[arg(long)]
    allow_private_peers: bool,
    /// Do not pin shard threads to CPUs (shared machines, containers).
    #[arg(long)]
    no_pin: bool,
    /// error | warn | info | debug | trace, or a tracing filter such as "voxgate=debug"
    /// [default: info].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Directory for histogram dumps.
    #[arg(long)]
    dump_dir: Option<PathBuf>,
    /// Seconds per dump interval (0: off).
    #[arg(long)]
    dump_interval: Option<u64>,
    /// Heart-beat interval told to clients, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,
    /// An unanswered call ends after this many seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    ring_timeout_s: Option<u64>,
    /// On SIGTERM, calls in progress get this many seconds to finish [default: 30].
    #[arg(long, value_name = "SECS")]
    shutdown_grace_s: Option<u64>,
    /// Address of the HTTP admin listener (/metrics for Prometheus, /health); port 0 picks a
    /// free port (named in the "ready" log line).
    #[arg(long, value_name = "ADDR:PORT")]
    admin_listen: Option<std::net::SocketAddr>,
    /// The public IPv4 address to tell clients behind 1:1 NAT (media addresses); default:
    /// the address each client's control connection arrived at.
    #[arg(long, value_name = "IPV4")]
    advertised_ipv4: Option<std::net::Ipv4Addr>,
    /// The same for IPv6 clients.
    #[arg(long, value_name = "IPV6")]
    advertised_ipv6: Option<std::net::Ipv6Addr>,
    /// Do not start the HTTP admin listener.
    #[arg(long, conflicts_with = "admin_listen")]
    no_admin: bool,
    #[command(flatten)]
    directory: DirectoryArgs,
}

/// Where the directory is (`[store]` in the config file).
#[derive(clap::Args)]
struct DirectoryArgs {
    /// The directory: sqlite:PATH or postgres://USER@HOST:PORT/DB, never with a password
    /// (the config file, $VOXGATE_DIRECTORY, $PGPASSWORD or --directory-password-file hold
    /// it) [default: $VOXGATE_DIRECTORY, else the config file's, else SQLite in the data
    /// directory].
    #[arg(long, value_name = "URL")]
    directory: Option<String>,
    /// A file (mode 0600) whose first line is the directory's PostgreSQL password.
    #[arg(long, value_name = "FILE")]
    directory_password_file: Option<PathBuf>,
}

impl DirectoryArgs {
    /// Refuses a password on the command line.
    fn check(&self) -> Result<(), String> {
        match &self.directory {
            Some(d) => voxgate::store::location::check_command_line(d).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// `$VOXGATE_DIRECTORY` over the file, the flags over both.
    fn apply(&self, cfg: &mut Config) {
        if let Some(d) = std::env::var_os(voxgate::store::location::DIRECTORY_ENV) {
            cfg.store.directory = d.to_string_lossy().into_owned();
        }
        if let Some(d) = &self.directory {
            cfg.store.directory = d.clone();
        }
        if let Some(f) = &self.directory_password_file {
            cfg.store.password_file = Some(f.clone());
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Auto,
    IoUring,
    Epoll,
}

/// Which telephone numbers (through routes) a subscriber may dial; calls to registered users
/// are always allowed. Without any of these flags: any route (on `add`), unchanged (on `mod`).
#[derive(clap::Args)]
struct ClassOfService {
    /// A number prefix the user may dial on telephone routes (repeat for several).
    #[arg(long = "allow-prefix", value_name = "PREFIX")]
    allow_prefix: Vec<String>,
    /// The user may dial any telephone number.
    #[arg(long, conflicts_with_all = ["allow_prefix", "no_routes"])]
    any_route: bool,
    /// The user may dial no telephone number.
    #[arg(long, conflicts_with = "allow_prefix")]
    no_routes: bool,
}

impl ClassOfService {
    /// `None`: not given; `Some(None)`: any route; `Some(Some(list))`: these prefixes.
    fn get(&self) -> Option<Option<Vec<String>>> {
        if self.any_route {
            Some(None)
        } else if self.no_routes {
            Some(Some(Vec::new()))
        } else if !self.allow_prefix.is_empty() {
            Some(Some(self.allow_prefix.clone()))
        } else {
            None
        }
    }
}

fn cos_text(allow: Option<&[String]>) -> String {
    match allow {
        None => "any route".into(),
        Some([]) => "no routes".into(),
        Some(p) => format!("routes {}", p.join(",")),
    }
}

#[derive(Subcommand)]
enum UserCmd {
    /// Register a subscriber; the password is prompted for (or read with --password-stdin).
    Add {
        /// Log-in name.
        user: String,
        /// The subscriber's telephone number (others dial it).
        #[arg(long)]
        number: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        cos: ClassOfService,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a subscriber's class of service (which telephone numbers it may dial).
    Mod {
        /// Log-in name.
        user: String,
        #[command(flatten)]
        cos: ClassOfService,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a subscriber.
    Del {
        /// Log-in name.
        user: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List subscribers and their numbers.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Register subscribers from a CSV file (user,number,password; a header line allowed).
    Import {
        /// CSV file: user,number,password per line.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a subscriber's password.
    Passwd {
        /// Log-in name.
        user: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Route numbers starting with PREFIX to an IP voice gateway's RTP address.
    Add {
        /// Number prefix, e.g. +4930 (the longest matching prefix wins).
        prefix: String,
        /// The IP voice gateway's RTP address, e.g. 192.0.2.10:20000.
        media_addr: SocketAddr,
        /// Free text shown by `route list`.
        #[arg(long, default_value = "")]
        description: String,
        /// Calls the route carries at once, each on its own port: MEDIA_ADDR's port and the
        /// next PORTS - 1 ones (the voice gateway must answer each call on its port).
        #[arg(long, default_value_t = 1)]
        ports: u16,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove the route of a prefix.
    Del {
        /// Number prefix, as given to `route add`.
        prefix: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List routes.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum InviteCmd {
    /// Add an invitation code good for USES registrations.
    Add {
        /// Letters, digits, '-' and '_', at most 64.
        code: String,
        /// How many registrations the code is good for.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove an invitation code.
    Del {
        /// The invitation code to remove.
        code: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List invitation codes with their uses left.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The gateway's data directory (where its store is) [default: as `serve`].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Read data_dir, [store] and SCRAM iterations from this config file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    directory: DirectoryArgs,
}

#[derive(clap::Args)]
struct StatsArgs {
    /// Directory of dumps (the gateway's dumps.dir, by default <data_dir>/dumps).
    dir: PathBuf,
    /// Only the newest SECS seconds.
    #[arg(long, value_name = "SECS")]
    last: Option<u64>,
    /// Only intervals ending after this many seconds since the Unix epoch.
    #[arg(long, value_name = "UNIX_SECS")]
    since: Option<u64>,
    /// Also draw the latency plots (one SVG) to this file: percentiles per shard on a
    /// logarithmic latency axis, then p50/p99/max and packets received per interval.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Cdr(a) => voxgate::metrics::cdr::run(&a),
        Cmd::User(c) => admin(|| user(c)),
        Cmd::Route(c) => admin(|| route(c)),
        Cmd::Invite(c) => admin(|| invite(c)),
        Cmd::Phone(a) => {
            voxgate::logging::init("warn");
            voxgate::client::cli::run_phone(a)
        }
        Cmd::Probe(a) => {
            voxgate::logging::init("warn");
            voxgate::client::cli::run_probe(a)
        }
        Cmd::Stats(a) => admin(|| stats(a)),
        Cmd::Bench(a) => voxgate::loadgen::run(a),
    }
}

fn admin(f: impl FnOnce() -> Result<(), String>) -> ExitCode {
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> ExitCode {
    // The allocator asks for transparent huge pages on its arenas (MADV_HUGEPAGE), so one small
    // control-plane allocation can make a whole 2 MiB page resident. The gateway's heap is sparse
    // and long-lived (sessions, legs, connections), so that is resident memory for nothing: turn
    // THP off for this process. The packet buffers are mmap'd by the shards and never used THP.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let mut cfg = match &a.config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("voxgate: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Err(e) = a.directory.check() {
        eprintln!("voxgate: {e}");
        return ExitCode::from(2);
    }
    if let Some(w) = a
        .config
        .as_deref()
        .and_then(|p| voxgate::store::location::exposed_password_warning(p, &cfg.store.directory))
    {
        eprintln!("voxgate: {w}");
    }
    let config_path = a.config.clone();
    let check = a.check_config;
    apply_flags(&mut cfg, &a);
    if let Err(e) = cfg.validate() {
        eprintln!("voxgate: {e}");
        return ExitCode::from(2);
    }
    if check {
        // Reads the password file, if any (a check of its permissions); does not connect.
        let directory = match cfg.directory() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("voxgate: {e}");
                return ExitCode::from(2);
            }
        };
        println!(
            "configuration OK: control port {}, {} shard(s) on media ports from {}, probe ports {:?}, data in {}, directory {directory}",
            cfg.server.control_port,
            cfg.shard_count(),
            cfg.server.media_port_base,
            cfg.server.probe_ports,
            cfg.data_dir().display()
        );
        return ExitCode::SUCCESS;
    }
    voxgate::logging::init(&cfg.server.log_level);
    let overrides: voxgate::server::Overrides = Box::new(move |c| apply_flags(c, &a));
    match voxgate::server::serve(cfg, config_path, overrides) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("voxgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_port_pair(s: &str) -> Result<[u16; 2], String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected two ports, A,B"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{p:?} is not a port: {e}"))
    };
    Ok([port(a)?, port(b)?])
}

fn apply_flags(cfg: &mut Config, a: &ServeArgs) {
    a.directory.apply(cfg);
    let s = &mut cfg.server;
    if let Some(v) = &a.data_dir {
        s.data_dir = Some(v.clone());
    }
    if let Some(v) = a.listen {
        s.listen = v;
    }
    if let Some(v) = a.control_port {
        s.control_port = v;
    }
    if let Some(v) = a.media_port_base {
        s.media_port_base = v;
    }
    if let Some(v) = a.probe_ports {
        s.probe_ports = v;
    }
    if let Some(v) = a.shards {
        s.shards = v;
    }
    if let Some(b) = a.backend {
        s.backend = match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::IoUring => Backend::IoUring,
            BackendArg::Epoll => Backend::Epoll,
        };
    }
    if a.allow_private_peers {
        s.allow_private_peers = true;
    }
    if a.no_pin {
        s.pin_shards = false;
    }
    if let Some(v) = &a.log_level {
        s.log_level = v.clone();
    }
    if let Some(v) = a.shutdown_grace_s {
        s.shutdown_grace_s = v;
    }
    if let Some(v) = a.coalesce_us {
        cfg.media.coalesce_us = v;
    }
    if let Some(v) = &a.dump_dir {
        cfg.dumps.dir = Some(v.clone());
    }
    if let Some(v) = a.dump_interval {
        cfg.dumps.interval_s = v;
    }
    if let Some(v) = a.heartbeat_ms {
        cfg.presence.heartbeat_ms = v;
    }
    if let Some(v) = a.ring_timeout_s {
        cfg.calls.ring_timeout_s = v;
    }
    if let Some(v) = a.admin_listen {
        cfg.admin.enabled = true;
        cfg.admin.listen = v;
    }
    if a.no_admin {
        cfg.admin.enabled = false;
    }
    if let Some(v) = a.advertised_ipv4 {
        cfg.server.advertised_ipv4 = Some(v);
    }
    if let Some(v) = a.advertised_ipv6 {
        cfg.server.advertised_ipv6 = Some(v);
    }
}

fn open_store(s: &StoreArgs) -> Result<(Box<dyn Store>, Config), String> {
    s.directory.check()?;
    let mut cfg = match &s.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(d) = &s.data_dir {
        cfg.server.data_dir = Some(d.clone());
    }
    if let Some(w) = s
        .config
        .as_deref()
        .and_then(|p| voxgate::store::location::exposed_password_warning(p, &cfg.store.directory))
    {
        eprintln!("voxgate: {w}");
    }
    s.directory.apply(&mut cfg);
    let store = cfg
        .directory()
        .and_then(|location| location.open())
        .map_err(|e| e.to_string())?;
    Ok((store, cfg))
}

fn new_verifier(user: &str, from_stdin: bool, cfg: &Config) -> Result<Verifier, String> {
    let pw = voxgate::client::cli::read_password(from_stdin, user)?;
    if pw.chars().count() < 8 {
        return Err("the password must have at least 8 characters".into());
    }
    Ok(Verifier::new(
        &pw,
        cfg.auth.scram_iterations,
        &mut rand::rng(),
    ))
}

fn user(c: UserCmd) -> Result<(), String> {
    match c {
        UserCmd::Add {
            user,
            number,
            password_stdin,
            cos,
            store,
        } => {
            let allow_prefixes = cos.get().flatten();
            voxgate::store::validate_allow_prefixes(allow_prefixes.as_deref())
                .map_err(|e| e.to_string())?;
            let (mut st, cfg) = open_store(&store)?;
            voxgate::store::validate_user(&user).map_err(|e| e.to_string())?;
            voxgate::store::validate_number(&number).map_err(|e| e.to_string())?;
            let verifier = new_verifier(&user, password_stdin, &cfg)?;
            st.add_user(&Subscriber {
                user: user.clone(),
                number: number.clone(),
                verifier,
                allow_prefixes: allow_prefixes.clone(),
            })
            .map_err(|e| e.to_string())?;
            println!(
                "added {user} with number {number} ({})",
                cos_text(allow_prefixes.as_deref())
            );
        }
        UserCmd::Mod { user, cos, store } => {
            let Some(allow) = cos.get() else {
                return Err(
                    "nothing to change: give --allow-prefix, --any-route or --no-routes".into(),
                );
            };
            let (mut st, _) = open_store(&store)?;
            if !st
                .set_allow_prefixes(&user, allow.as_deref())
                .map_err(|e| e.to_string())?
            {
                return Err(format!("no user {user:?}"));
            }
            println!("{user} may dial {}", cos_text(allow.as_deref()));
        }
        UserCmd::Del { user, store } => {
            let (mut st, _) = open_store(&store)?;
            if !st.del_user(&user).map_err(|e| e.to_string())? {
                return Err(format!("no user {user:?}"));
            }
            println!("removed {user}");
        }
        UserCmd::List { store } => {
            let (st, _) = open_store(&store)?;
            for s in st.list_users().map_err(|e| e.to_string())? {
                println!(
                    "{}\t{}\t{}",
                    s.user,
                    s.number,
                    cos_text(s.allow_prefixes.as_deref())
                );
            }
        }
        UserCmd::Import { file, store } => {
            let (mut st, cfg) = open_store(&store)?;
            let csv =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let n = voxgate::loadgen::import_users(&mut *st, &csv, cfg.auth.scram_iterations)?;
            println!("imported {n} subscribers");
        }
        UserCmd::Passwd {
            user,
            password_stdin,
            store,
        } => {
            let (mut st, cfg) = open_store(&store)?;
            if st.user(&user).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("no user {user:?}"));
            }
            let v = new_verifier(&user, password_stdin, &cfg)?;
            st.set_verifier(&user, &v).map_err(|e| e.to_string())?;
            println!("password of {user} changed");
        }
    }
    Ok(())
}

fn invite(c: InviteCmd) -> Result<(), String> {
    use voxgate::server::web::db::WebDb;
    let open = |s: &StoreArgs| -> Result<WebDb, String> {
        let (_, cfg) = open_store(s)?;
        WebDb::open(&cfg.data_dir().join("web.db"))
    };
    match c {
        InviteCmd::Add { code, uses, store } => {
            open(&store)?.add_invite(&code, uses)?;
            println!("added invitation code {code} for {uses} registration(s)");
        }
        InviteCmd::Del { code, store } => {
            if !open(&store)?.del_invite(&code)? {
                return Err(format!("no invitation code {code:?}"));
            }
            println!("removed invitation code {code}");
        }
        InviteCmd::List { store } => {
            for (code, uses) in open(&store)?.list_invites()? {
                println!("{code}\t{uses}");
            }
        }
    }
    Ok(())
}

fn route(c: RouteCmd) -> Result<(), String> {
    match c {
        RouteCmd::Add {
            prefix,
            media_addr,
            description,
            ports,
            store,
        } => {
            let (mut st, _) = open_store(&store)?;
            st.add_route(&Route {
                prefix: prefix.clone(),
                media_addr,
                description,
                ports,
            })
            .map_err(|e| e.to_string())?;
            println!("numbers starting {prefix} go to {media_addr} ({ports} call(s) at once)");
        }
        RouteCmd::Del { prefix, store } => {
            let (mut st, _) = open_store(&store)?;
            if !st.del_route(&prefix).map_err(|e| e.to_string())? {
                return Err(format!("no route for prefix {prefix:?}"));
            }
            println!("removed route {prefix}");
        }
        RouteCmd::List { store } => {
            let (st, _) = open_store(&store)?;
            for r in st.list_routes().map_err(|e| e.to_string())? {
                println!(
                    "{}\t{}\t{}\t{}",
                    r.prefix, r.media_addr, r.ports, r.description
                );
            }
        }
    }
    Ok(())
}

fn stats(a: StatsArgs) -> Result<(), String> {
    let mut q = voxgate::metrics::stats::StatsQuery::new(a.dir);
    q.window = a.last.map(Duration::from_secs);
    q.since = a
        .since
        .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s));
    q.plot = a.plot;
    q.json = a.json;
    let out = voxgate::metrics::stats::run(&q).map_err(|e| e.to_string())?;
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "voxgate", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn serve_help_explains_the_flags() {
        let help = Cli::command()
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string();
        for want in [
            "--data-dir <DATA_DIR>\n          Directory of the store",
            "--control-port <CONTROL_PORT>\n          TCP port of the control protocol",
            "--no-pin\n          Do not pin shard threads",
            "--allow-private-peers\n          Allow media destinations",
        ] {
            assert!(help.contains(want), "{want:?} not in:\n{help}");
        }
    }
}
