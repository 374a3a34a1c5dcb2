//! `voxgate phone` and `voxgate probe`: the softphone on the command line.
//!
//! `main.rs` owns the command tree; it embeds [`PhoneArgs`] / [`ProbeArgs`] and calls
//! [`run_phone`] / [`run_probe`], each of which builds its own (single-threaded) tokio runtime.
//!
//! The password is read from one line of standard input (`--password-stdin`) or prompted for
//! on the terminal; never taken from the command line and never logged.
//!
//! Several gateways (`--server A,B`, `--gateway`, SRV names: [`super::gateways`]): the phone
//! logs in to the first that takes it; when its gateway is gone it logs in to the next and
//! brings its call back (the caller dials the same number again, retrying while the callee is
//! `offline`; the callee waits for the call again), for at most `--failover-timeout`. The
//! password stays in memory for that. A session the gateway closed for this user (`replaced`,
//! `revoked`, `rate_limited`) ends the phone instead.
//!
//! Output: without `--json`, a short human summary on stdout; with `--json`, exactly one JSON
//! object on stdout. Logs go to stderr (whatever subscriber `main` installs). On failure a
//! one-line reason goes to stderr as well.
//!
//! Exit status: 0 when the call completed (or the probe gave a result); 1 when the call failed
//! (refused by the gateway: not found, busy, rejected, no answer, offline; media failed; the
//! gateway went away); 2 for a local problem before any call (unreadable or wrong-format WAV,
//! no password, runtime); 3 when the log-in failed (no gateway at that address, wrong user or
//! password, a gateway that could not prove itself).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Firewall;
use super::gateways::{Connected, Entry, GatewayList, Login, connect_any, unix_ms};
use super::media::{
    LatencyMs, MEDIA_READY_TIMEOUT, MediaCall, MediaOptions, MediaReport, SAMPLES_PER_PACKET,
    TransportUsed,
};
use super::session::{Event, Phone, PhoneOptions, ProbeOutcome};
use super::wav;
use crate::wire::control::{
    CallId, Capabilities, ErrorCode, HangupReason, MediaInstructions, Plan,
};

/// How long to wait for the probe result after log-in before placing a call anyway.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// Packets still in flight when playback ends.
const TAIL: Duration = Duration::from_millis(300);
/// No media for this long while a call is up: tell the gateway (once).
const MEDIA_SILENCE: Duration = Duration::from_secs(3);
/// How long a dialled call may take to be answered before the phone gives up (the gateway
/// normally ends it sooner with `no_answer`).
const RING_LIMIT: Duration = Duration::from_secs(120);

/// A simulated firewall class (see [`Firewall`]): what this softphone refuses to do itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FirewallClass {
    /// No simulated blocking.
    #[default]
    Open,
    /// Never send UDP.
    NoUdpOut,
    /// Discard every UDP datagram received.
    NoUdpIn,
    /// Both.
    NoUdp,
}

impl FirewallClass {
    pub fn firewall(self) -> Firewall {
        Firewall {
            block_udp_out: matches!(self, FirewallClass::NoUdpOut | FirewallClass::NoUdp),
            block_udp_in: matches!(self, FirewallClass::NoUdpIn | FirewallClass::NoUdp),
            simulate_nat: false,
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v < 1e7) {
        return Err(format!("{s} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `voxgate phone`: log in, dial or answer, play a WAV file as G.711 RTP, record what it
/// hears, and print loss, jitter, latency and the transports used.
#[derive(clap::Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("mode").required(true).args(["call", "answer", "conference"])
))]
pub struct PhoneArgs {
    /// The gateway's control address, HOST[:PORT] (default port 7400), or
    /// tls://HOST[:PORT] (TLS, default port 7443); a comma list or an SRV name too (see
    /// --gateway).
    #[arg(long, value_name = "HOST[:PORT]", required_unless_present = "gateway")]
    pub server: Option<String>,
    #[command(flatten)]
    pub failover: FailoverArgs,
    /// The user to log in as.
    #[arg(long)]
    pub user: String,
    /// Read the password from one line of standard input instead of prompting for it.
    #[arg(long)]
    pub password_stdin: bool,
    /// Call this number; hang up when the playback is done or at --duration.
    #[arg(long, value_name = "NUMBER")]
    pub call: Option<String>,
    /// Wait for a call, accept it, and record until the peer hangs up or --duration.
    #[arg(long)]
    pub answer: bool,
    /// Start a conference room with these numbers (everyone hears everyone).
    #[arg(long, value_name = "N1,N2,...", value_delimiter = ',')]
    pub conference: Option<Vec<String>>,
    /// Send this WAV file (8000 Hz mono 16-bit PCM); silence without it.
    #[arg(long, value_name = "IN.wav")]
    pub play: Option<PathBuf>,
    /// Record what is heard to this WAV file (8000 Hz mono 16-bit PCM).
    #[arg(long, value_name = "OUT.wav")]
    pub record: Option<PathBuf>,
    /// End the call after this many seconds of media.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// With --answer: give up if no call arrives within this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub wait: Option<Duration>,
    /// Print one JSON object on stdout instead of a human summary.
    #[arg(long)]
    pub json: bool,
    /// Simulate this client's own firewall (loopback tests and demos only: the softphone
    /// refuses to send and/or discards received UDP itself; it is not a real firewall).
    #[arg(long, value_enum, value_name = "CLASS", default_value_t = FirewallClass::Open)]
    pub firewall: FirewallClass,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Several gateways: where to log in, and where to go when the gateway is gone.
#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Another gateway to use (repeatable; each may be a comma list): HOST[:PORT],
    /// tls://HOST[:PORT], or a DNS SRV name such as _voxgate._tcp.example.net (its targets, by
    /// priority and weight). The phone logs in to the first that takes it (after --server's)
    /// and, when its gateway is gone (connection refused, reset or closed, heart-beats
    /// unanswered, `going_away`), to the next one; a call it was in is dialled again (caller)
    /// or awaited again (callee).
    #[arg(long, value_name = "HOST[:PORT]|SRV-NAME")]
    pub gateway: Vec<String>,
    /// The DNS server to resolve SRV names with, IP[:PORT] (default: /etc/resolv.conf's).
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_resolver)]
    pub resolver: Option<SocketAddr>,
    /// After losing its gateway, how long the phone keeps trying the others.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "30")]
    pub failover_timeout: Duration,
}

impl Default for FailoverArgs {
    fn default() -> Self {
        FailoverArgs {
            gateway: Vec::new(),
            resolver: None,
            failover_timeout: Duration::from_secs(30),
        }
    }
}

impl FailoverArgs {
    /// The list from `--server` (first) and every `--gateway`.
    pub fn list(&self, server: Option<&str>) -> Result<GatewayList, String> {
        GatewayList::parse(
            server
                .into_iter()
                .chain(self.gateway.iter().map(String::as_str)),
        )
        .map_err(|e| e.to_string())
    }
}

fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not IP[:PORT]"))
}

/// The entry a proxy decision is made for: the first gateway as written.
fn first_entry(list: &GatewayList) -> &str {
    match &list.entries[0] {
        Entry::Address(a) => a,
        Entry::Srv { name, .. } => name,
    }
}

/// An HTTP proxy to tunnel through (CONNECT).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProxyArgs {
    /// Tunnel the control connection and the TCP media connections through this HTTP proxy:
    /// http://[USER:PASS@]HOST[:PORT] (default port 8080). Default: the https_proxy /
    /// HTTPS_PROXY environment variables (not for loopback or no_proxy hosts). A phone behind
    /// a proxy sends and receives no UDP: its probe says so and its media goes over TCP.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// The proxy's user name, sent when the proxy asks (407); its password comes from
    /// --proxy-password-file or the VOXGATE_PROXY_PASSWORD environment variable.
    #[arg(long, value_name = "USER")]
    pub proxy_user: Option<String>,
    /// A file whose first line is the proxy password.
    #[arg(long, value_name = "FILE")]
    pub proxy_password_file: Option<PathBuf>,
}

impl ProxyArgs {
    /// The proxy to use for `server`, with credentials, or none.
    pub fn resolve(&self, server: &str) -> Result<Option<super::proxy::ProxyConfig>, String> {
        use super::proxy::ProxyConfig;
        let (rest, _) = super::tls::strip_scheme(server);
        let (host, _) = super::session::parse_server(rest).map_err(|e| e.to_string())?;
        let mut proxy = match &self.proxy {
            Some(url) => Some(ProxyConfig::parse(url)?),
            None => ProxyConfig::from_env(&host)?,
        };
        if let Some(user) = &self.proxy_user {
            let Some(p) = proxy.as_mut() else {
                return Err("--proxy-user without a proxy (--proxy or https_proxy)".into());
            };
            let password = match &self.proxy_password_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| format!("--proxy-password-file {}: {e}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                None => std::env::var("VOXGATE_PROXY_PASSWORD").map_err(|_| {
                    "--proxy-user needs --proxy-password-file or VOXGATE_PROXY_PASSWORD".to_string()
                })?,
            };
            p.credentials = Some((user.clone(), password));
        }
        Ok(proxy)
    }
}

/// TLS on the control connection (also `--server tls://HOST[:PORT]`, default port 7443).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Connect with TLS, verify the gateway's certificate, and bind the log-in to the TLS
    /// session (a TLS-terminating man in the middle cannot relay it).
    #[arg(long)]
    pub tls: bool,
    /// Trust only the CA certificates in this PEM file (implies --tls); default: the
    /// system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn options(&self) -> Option<super::tls::TlsOptions> {
        (self.tls || self.ca.is_some()).then(|| super::tls::TlsOptions {
            ca: self.ca.clone(),
        })
    }
}

/// `voxgate probe`: log in and print this client's capabilities (send UDP, receive UDP, NAT,
/// mapped address).
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// The gateway's control address, HOST[:PORT] (default port 7400), or
    /// tls://HOST[:PORT] (TLS, default port 7443); a comma list or an SRV name too (see
    /// --gateway).
    #[arg(long, value_name = "HOST[:PORT]", required_unless_present = "gateway")]
    pub server: Option<String>,
    #[command(flatten)]
    pub failover: FailoverArgs,
    /// The user to log in as.
    #[arg(long)]
    pub user: String,
    /// Read the password from one line of standard input instead of prompting for it.
    #[arg(long)]
    pub password_stdin: bool,
    /// Print one JSON object on stdout instead of a human summary.
    #[arg(long)]
    pub json: bool,
    /// Simulate this client's own firewall (see `voxgate phone --help`).
    #[arg(long, value_enum, value_name = "CLASS", default_value_t = FirewallClass::Open)]
    pub firewall: FirewallClass,
    /// How long to wait for the probe result.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "15")]
    pub wait: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Reads the password: one line of stdin, or a prompt on the terminal.
pub fn read_password(from_stdin: bool, user: &str) -> Result<String, String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
        let pw = line.trim_end_matches(['\n', '\r']).to_owned();
        if pw.is_empty() {
            return Err("no password on standard input".into());
        }
        Ok(pw)
    } else {
        rpassword::prompt_password(format!("Password for {user}: ")).map_err(|e| {
            format!("cannot prompt for a password ({e}); use --password-stdin to pipe it in")
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

// ---------------------------------------------------------------- output

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    Caller,
    Callee,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum CallResult {
    Completed,
    Failed,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Transports {
    send: Option<TransportUsed>,
    recv: Option<TransportUsed>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct SentOut {
    packets: u64,
    audio_packets: u64,
    blocked: u64,
    dropped: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct ReceivedOut {
    packets: u64,
    udp_packets: u64,
    tcp_packets: u64,
    lost: u64,
    jitter_ms: f64,
    /// One-way, from the sender's wall clock: only valid when both ends share a clock.
    latency_ms: Option<LatencyMs>,
    ssrcs: usize,
    /// ITU-T G.107 E-model estimate (1.0..=4.5, [`crate::metrics::mos`]) from the loss, the
    /// jitter and the latency p50 (0 when the latency is unknown); `null` without packets.
    mos: Option<f64>,
    /// When the first media packet arrived, ms after the media engine started.
    first_packet_ms: Option<f64>,
    /// Longest silence between two media packets, ms.
    max_gap_ms: f64,
    /// Duplicate RTP packets dropped (the copies of a switch to a direct path).
    duplicates: u64,
}

/// The one JSON object `voxgate phone --json` prints.
#[derive(Clone, Debug, Serialize)]
struct PhoneSummary {
    user: String,
    number: Option<String>,
    call: Option<CallId>,
    role: Role,
    conference: bool,
    result: CallResult,
    reason: Option<String>,
    /// The gateway's hang-up reason code (`peer_lost`, `busy`, `no_answer`, ...), when the
    /// gateway ended the call or refused it.
    hangup_reason: Option<HangupReason>,
    /// Who ended the call: "local" or the gateway's hang-up reason.
    ended_by: Option<String>,
    capabilities: Option<Capabilities>,
    mapped: Option<SocketAddr>,
    translated: Option<bool>,
    plan: Option<Plan>,
    transports: Transports,
    sent: SentOut,
    received: ReceivedOut,
    latency_clock: &'static str,
    udp_binding_confirmed: Option<bool>,
    /// How long the audio was held, once bound, for the gateway's `media_ready` (`null`: it
    /// was not held).
    media_ready_wait_ms: Option<f64>,
    /// No `media_ready` came in time: the audio went anyway (an older gateway).
    media_ready_timed_out: bool,
    replans: u32,
    media_trouble_sent: bool,
    /// Proven paths: direct candidate, checks, when it went direct, fallbacks, consent.
    paths: Option<crate::client::paths::PathsReport>,
    recording: Option<PathBuf>,
    duration_s: f64,
    /// The gateway the phone was logged in to last (its control address as listed).
    gateway: Option<String>,
    /// Each time the phone lost its gateway and logged in to another.
    failovers: Vec<FailoverOut>,
    /// Pieces of the call, one per gateway it ran on (the counts above add them up).
    media_segments: u32,
    #[serde(skip)]
    exit: u8,
}

/// One failover, with wall-clock times (Unix ms) that other processes can compare.
#[derive(Clone, Debug, Serialize)]
struct FailoverOut {
    from: String,
    to: Option<String>,
    reason: String,
    lost_at_ms: u64,
    logged_in_at_ms: Option<u64>,
    /// When the call's media was up again through the new gateway (`null`: there was no call
    /// to bring back, or it did not come back).
    call_restored_at_ms: Option<u64>,
}

impl FailoverOut {
    /// The gateway `from` was lost at `lost_at_ms` for `reason`; where to and when are filled
    /// in as the phone gets there.
    fn lost(from: String, reason: String, lost_at_ms: u64) -> Self {
        FailoverOut {
            from,
            to: None,
            reason,
            lost_at_ms,
            logged_in_at_ms: None,
            call_restored_at_ms: None,
        }
    }
}

impl PhoneSummary {
    fn new(args: &PhoneArgs) -> Self {
        PhoneSummary {
            user: args.user.clone(),
            number: None,
            call: None,
            role: if args.answer {
                Role::Callee
            } else {
                Role::Caller
            },
            conference: args.conference.is_some(),
            result: CallResult::Failed,
            reason: None,
            hangup_reason: None,
            ended_by: None,
            capabilities: None,
            mapped: None,
            translated: None,
            plan: None,
            transports: Transports::default(),
            sent: SentOut::default(),
            received: ReceivedOut::default(),
            latency_clock: "sender's wall clock: valid only when both phones share a clock (same host)",
            udp_binding_confirmed: None,
            media_ready_wait_ms: None,
            media_ready_timed_out: false,
            replans: 0,
            media_trouble_sent: false,
            paths: None,
            recording: None,
            duration_s: 0.0,
            gateway: None,
            failovers: Vec::new(),
            media_segments: 0,
            exit: 1,
        }
    }

    fn fail(mut self, exit: u8, reason: impl Into<String>) -> Self {
        self.result = CallResult::Failed;
        self.reason = Some(reason.into());
        self.exit = exit;
        self
    }

    fn probe(&mut self, o: &ProbeOutcome) {
        self.capabilities = Some(o.capabilities);
        self.mapped = o.mapped;
        self.translated = Some(o.translated);
    }

    fn media(&mut self, r: &MediaReport) {
        self.plan = r.plan;
        self.paths = Some(r.paths);
        self.transports = Transports {
            send: r.send,
            recv: Some(r.recv),
        };
        self.sent = SentOut {
            packets: r.sent.packets,
            audio_packets: r.sent.audio_packets,
            blocked: r.sent.blocked,
            dropped: r.sent.dropped,
        };
        self.received = ReceivedOut {
            packets: r.received.packets,
            udp_packets: r.received.udp_packets,
            tcp_packets: r.received.tcp_packets,
            lost: r.received.lost,
            jitter_ms: round3(r.received.jitter_ms),
            latency_ms: r.received.latency_ms.map(|l| LatencyMs {
                p50: round3(l.p50),
                p99: round3(l.p99),
                max: round3(l.max),
            }),
            ssrcs: r.received.ssrcs,
            mos: leg_mos(
                r.received.packets,
                r.received.lost,
                r.received.jitter_ms,
                r.received.latency_ms.map(|l| l.p50),
            ),
            first_packet_ms: r.received.first_packet_ms.map(round3),
            max_gap_ms: round3(r.received.max_gap_ms),
            duplicates: r.received.ignored.duplicate,
        };
        self.udp_binding_confirmed = r.udp_binding_confirmed;
        self.media_ready_wait_ms = r.media_ready_wait_ms.map(round3);
        self.media_ready_timed_out = r.media_ready_timed_out;
        self.replans = r.replans;
        self.duration_s = round3(r.duration_s);
    }

    /// [`Self::media`] for one more segment of the call: counts add up, the rest is the
    /// latest segment's.
    fn add_media(&mut self, r: &MediaReport) {
        let (sent, received, duration) =
            (self.sent.clone(), self.received.clone(), self.duration_s);
        self.media(r);
        if self.media_segments > 0 {
            self.sent.packets += sent.packets;
            self.sent.audio_packets += sent.audio_packets;
            self.sent.blocked += sent.blocked;
            self.sent.dropped += sent.dropped;
            self.received.packets += received.packets;
            self.received.udp_packets += received.udp_packets;
            self.received.tcp_packets += received.tcp_packets;
            self.received.lost += received.lost;
            self.received.duplicates += received.duplicates;
            self.received.max_gap_ms = self.received.max_gap_ms.max(received.max_gap_ms);
            self.received.first_packet_ms =
                received.first_packet_ms.or(self.received.first_packet_ms);
            self.duration_s = round3(self.duration_s + duration);
        }
        self.media_segments += 1;
    }

    fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let what = match (self.role, self.conference) {
            (Role::Callee, _) => "answered call",
            (Role::Caller, true) => "conference",
            (Role::Caller, false) => "call",
        };
        let call = self.call.map_or_else(|| "-".into(), |c| c.to_string());
        let result = match self.result {
            CallResult::Completed => "completed".to_string(),
            CallResult::Failed => format!(
                "failed: {}",
                self.reason.as_deref().unwrap_or("unknown reason")
            ),
        };
        let _ = writeln!(
            s,
            "{what} {call} as {} ({}): {result} after {:.1} s of media",
            self.user,
            self.number.as_deref().unwrap_or("?"),
            self.duration_s
        );
        if let Some(c) = self.capabilities {
            let _ = writeln!(
                s,
                "  capabilities: send UDP {}, receive UDP {}, NAT {}; mapped {}",
                yes(c.send_udp),
                yes(c.recv_udp),
                yes(c.nat),
                self.mapped.map_or_else(|| "-".into(), |m| m.to_string())
            );
        }
        if let Some(p) = self.plan {
            let _ = writeln!(
                s,
                "  plan: forward {}, backward {}",
                path_name(p.forward),
                path_name(p.backward)
            );
        }
        if self.transports.recv.is_some() {
            let _ = writeln!(
                s,
                "  send: {}; receive: {}",
                transport_text(self.transports.send),
                transport_text(self.transports.recv)
            );
            let r = &self.received;
            let latency = r.latency_ms.map_or_else(
                || "latency -".into(),
                |l| {
                    format!(
                        "latency p50 {:.2} / p99 {:.2} / max {:.2} ms (same-host clock only)",
                        l.p50, l.p99, l.max
                    )
                },
            );
            let _ = writeln!(
                s,
                "  sent {} packets; received {} packets from {} source(s), {} lost, jitter {:.2} ms, {latency}",
                self.sent.packets, r.packets, r.ssrcs, r.lost, r.jitter_ms
            );
            if let Some(m) = r.mos {
                let _ = writeln!(s, "  estimated MOS {m:.2} (ITU-T G.107 E-model, G.711)");
            }
            match (self.media_ready_wait_ms, self.media_ready_timed_out) {
                (Some(ms), false) => {
                    let _ = writeln!(
                        s,
                        "  audio started on the gateway's media_ready after {ms:.0} ms"
                    );
                }
                (_, true) => {
                    let _ = writeln!(
                        s,
                        "  no media_ready from the gateway: audio started after the time-out"
                    );
                }
                (None, false) => {}
            }
        }
        for f in &self.failovers {
            let back = match (f.call_restored_at_ms, f.logged_in_at_ms) {
                (Some(t), _) => format!(
                    ", the call back {:.1} s after",
                    t.saturating_sub(f.lost_at_ms) as f64 / 1000.0
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  lost gateway {} ({}); {}{back}",
                f.from,
                f.reason,
                match (&f.to, f.logged_in_at_ms) {
                    (Some(to), Some(t)) => format!(
                        "logged in to {to} {:.1} s later",
                        t.saturating_sub(f.lost_at_ms) as f64 / 1000.0
                    ),
                    _ => "no other gateway took the log-in".into(),
                }
            );
        }
        if let Some(p) = &self.recording {
            let _ = writeln!(s, "  recorded {}", p.display());
        }
        s
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn path_name(p: crate::control::planner::Path) -> &'static str {
    use crate::control::planner::Path;
    match p {
        Path::DirectUdp => "direct UDP",
        Path::UdpViaGateway => "UDP via gateway",
        Path::UdpInTcpOut => "UDP in, TCP out",
        Path::TcpInUdpOut => "TCP in, UDP out",
        Path::TcpBoth => "TCP both",
    }
}

fn transport_text(t: Option<TransportUsed>) -> String {
    match t {
        None => "nothing".into(),
        Some(t) => format!(
            "{} {}",
            match t.transport {
                crate::metrics::Transport::Udp => "UDP",
                crate::metrics::Transport::Tcp => "TCP",
            },
            if t.via_gateway {
                "via gateway"
            } else {
                "direct"
            }
        ),
    }
}

/// What a gateway hang-up reason means to the user.
fn hangup_text(r: HangupReason) -> &'static str {
    match r {
        HangupReason::Normal => "hung up",
        HangupReason::Rejected => "rejected",
        HangupReason::Busy => "busy",
        HangupReason::NoAnswer => "no answer",
        HangupReason::NotFound => "not found",
        HangupReason::Offline => "offline (the callee is not logged in)",
        HangupReason::PeerLost => "the other side was lost",
        HangupReason::MediaFailed => "media failed",
        HangupReason::Shutdown => "the gateway is shutting down",
        HangupReason::Error => "the gateway could not set up the call",
        HangupReason::PeerDenied => "the gateway refused a media address",
        HangupReason::BadMediaAddress => "a media address is missing or not unicast",
        HangupReason::RateLimited => "too many calls in a short time; try again later",
        HangupReason::TimeLimit => "the call reached the maximum call duration",
        HangupReason::NoMedia => "no audio arrived for too long",
        HangupReason::NotPermitted => "this account may not dial that number",
    }
}

/// What the user is told about a gateway hang-up: the gateway's own words when it gave them.
fn hangup_message(r: HangupReason, detail: Option<&str>) -> String {
    match detail {
        Some(d) if !d.is_empty() => format!("the gateway refused the call: {d}"),
        _ => hangup_text(r).into(),
    }
}

/// The received leg's MOS estimate: loss as a fraction of the packets expected.
fn leg_mos(packets: u64, lost: u64, jitter_ms: f64, delay_ms: Option<f64>) -> Option<f64> {
    let expected = packets.saturating_add(lost);
    if packets == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)] // packet counts far below 2^52
    let loss = lost as f64 / expected as f64;
    Some(round3(crate::metrics::mos::mos(
        loss,
        jitter_ms,
        delay_ms.unwrap_or(0.0),
    )))
}

fn emit_phone(s: &PhoneSummary, json: bool) -> ExitCode {
    if json {
        match serde_json::to_string(s) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("voxgate phone: cannot write JSON: {e}"),
        }
    } else {
        print!("{}", s.human());
    }
    if s.result == CallResult::Failed {
        eprintln!(
            "voxgate phone: {}",
            s.reason.as_deref().unwrap_or("call failed")
        );
    }
    ExitCode::from(s.exit)
}

// ---------------------------------------------------------------- voxgate phone

/// What the phone does.
enum Mode {
    Call(String),
    Conference(Vec<String>),
    Answer,
}

/// Runs `voxgate phone`.
pub fn run_phone(args: PhoneArgs) -> ExitCode {
    let summary = PhoneSummary::new(&args);
    let mode = match (&args.call, &args.conference, args.answer) {
        (Some(n), None, false) => Mode::Call(n.clone()),
        (None, Some(ns), false) if !ns.is_empty() && ns.iter().all(|n| !n.is_empty()) => {
            Mode::Conference(ns.clone())
        }
        (None, None, true) => Mode::Answer,
        _ => {
            return emit_phone(
                &summary.fail(
                    2,
                    "give exactly one of --call NUMBER, --answer, --conference N1,N2,...",
                ),
                args.json,
            );
        }
    };
    // Local problems first, before the gateway is bothered.
    let audio = match &args.play {
        Some(p) => match wav::read(p) {
            Ok(a) => Some(Arc::<[i16]>::from(a)),
            Err(e) => return emit_phone(&summary.fail(2, e.to_string()), args.json),
        },
        None => None,
    };
    let recording = match &args.record {
        Some(p) => match wav::WavOut::create(p) {
            Ok(w) => Some(w),
            Err(e) => return emit_phone(&summary.fail(2, e.to_string()), args.json),
        },
        None => None,
    };
    let password = match read_password(args.password_stdin, &args.user) {
        Ok(p) => p,
        Err(e) => return emit_phone(&summary.fail(2, e), args.json),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return emit_phone(&summary.fail(2, e), args.json),
    };
    let summary = rt.block_on(phone_session(
        &args, mode, password, audio, recording, summary,
    ));
    emit_phone(&summary, args.json)
}

/// Events until one for `call` matters. `Ok(instr)` when media arrives.
enum Waited {
    Media(MediaInstructions),
    Failed(String),
    /// The control session to the gateway ended (or it is going away): fail over.
    Lost(String, Vec<String>),
    Interrupted,
}

/// How long, after the phone lost its gateway during a call, the caller keeps dialling again
/// (the callee may still be logging in elsewhere) and the callee waits for the call again.
const REJOIN_WAIT: Duration = Duration::from_secs(15);
/// Between two dials again while the callee is not back yet (`hang_up{offline}`).
const REDIAL_PAUSE: Duration = Duration::from_millis(200);

/// Whether a failed command means the control session is gone (fail over) rather than a
/// refusal.
fn session_gone(e: &super::session::ClientError) -> bool {
    use super::session::ClientError;
    matches!(e, ClientError::Closed | ClientError::Io(_))
}

/// Whether a session that ended this way is worth logging in elsewhere: the gateway is gone
/// (closed, reset, silent) or unavailable (shutting down); not when it closed the session for
/// this user (replaced by another log-in, the account changed, rate limits), which another
/// gateway would repeat (two phones of one user would take the log-in from each other).
fn gone(refused: Option<ErrorCode>) -> bool {
    matches!(
        refused,
        None | Some(ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Internal)
    )
}

/// What stays the same across the segments of one call (one per gateway it ran on).
struct CallProgress {
    /// Set when media first starts: `--duration` counts from there, across failovers.
    deadline: Option<Instant>,
    /// Samples of `--play` sent: a call placed again goes on from there.
    audio_sent: usize,
    /// What was heard, segment after segment.
    recorded: Vec<i16>,
    /// Some media ran (there is a recording to write).
    media_ran: bool,
    /// The playback ended (the phone was only waiting for the tail).
    playback_over: bool,
}

/// Why one segment of the call ended.
enum SegmentEnd {
    /// The call is over: `Ok(who ended it)` or `Err((exit, why it failed))`.
    Over(Result<String, (u8, String)>),
    /// The control session to the gateway ended: fail over, then re-establish the call.
    Lost(String, Vec<String>),
    /// Logged in to another gateway, where the call could not be resumed: re-establish it
    /// from there.
    Moved(String),
}

/// The name TLS media verifies the gateway by: the host of `--server`.
fn media_tls_host(server: &str) -> String {
    let (rest, _) = super::tls::strip_scheme(server);
    super::session::parse_server_default(rest, 0)
        .map(|(h, _)| h)
        .unwrap_or_else(|_| rest.to_owned())
}

async fn phone_session(
    args: &PhoneArgs,
    mode: Mode,
    password: String,
    audio: Option<Arc<[i16]>>,
    recording: Option<wav::WavOut>,
    mut summary: PhoneSummary,
) -> PhoneSummary {
    let list = match args.failover.list(args.server.as_deref()) {
        Ok(l) => l,
        Err(e) => return summary.fail(2, e),
    };
    let proxy = match args.proxy.resolve(first_entry(&list)) {
        Ok(p) => p,
        Err(e) => return summary.fail(2, e),
    };
    // Behind a proxy there is no UDP at all: the probe must find it blocked both ways.
    let firewall = match proxy {
        Some(_) => FirewallClass::NoUdp.firewall(),
        None => args.firewall.firewall(),
    };
    let opts = PhoneOptions {
        firewall,
        tls: args.tls.options(),
        proxy: proxy.clone(),
        ..PhoneOptions::default()
    };
    // The password stays in memory for logging in again elsewhere.
    let login = Login {
        list: &list,
        resolver: args.failover.resolver,
        user: &args.user,
        password: &password,
        opts: &opts,
    };
    let mut link = match connect_any(&login, 0, &[], None).await {
        Ok(c) => c,
        Err(e) => return summary.fail(3, e.to_string()),
    };
    summary.number = Some(link.phone.welcome().number.clone());
    summary.gateway = Some(link.server.clone());
    if let Some(o) = link.phone.wait_capabilities(PROBE_WAIT).await {
        summary.probe(&o);
    } else {
        tracing::warn!("no probe result within {PROBE_WAIT:?}; going on");
    }
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let record_total = if recording.is_some() {
        let secs = args
            .duration
            .map_or(wav::MAX_SAMPLES as f64 / 8000.0, |d| d.as_secs_f64() + 5.0);
        (secs * 8000.0).min(wav::MAX_SAMPLES as f64) as usize
    } else {
        0
    };
    let hang_up_after_playback =
        matches!(mode, Mode::Call(_) | Mode::Conference(_)) && audio.is_some();
    let mut progress = CallProgress {
        deadline: None,
        audio_sent: 0,
        recorded: Vec::new(),
        media_ran: false,
        playback_over: false,
    };
    let wait_until = args.wait.map(|w| Instant::now() + w);
    // After a failover during a call: until when the call may come back.
    let mut rejoin: Option<Instant> = None;

    let outcome: Result<String, (u8, String)> = 'call: loop {
        let (lost, prefer) = 'segment: {
            let phone = &link.phone;
            let socket = match phone.media_socket().await {
                Ok(s) => s,
                Err(e) => break 'call Err((2, format!("media socket: {e}"))),
            };
            let media_addr = match phone.media_address(&socket) {
                Ok(a) => a,
                Err(e) => break 'call Err((2, format!("media socket: {e}"))),
            };

            // Place or take the call.
            let call = match &mode {
                Mode::Call(_) | Mode::Conference(_) => {
                    let placed = match &mode {
                        Mode::Call(n) => phone.dial(n, media_addr).await,
                        Mode::Conference(ns) => phone.conference(ns, media_addr).await,
                        Mode::Answer => unreachable!("matched above"),
                    };
                    match placed {
                        Ok(c) => c,
                        Err(e) if session_gone(&e) => break 'segment (e.to_string(), vec![]),
                        Err(e) => break 'call Err((1, e.to_string())),
                    }
                }
                Mode::Answer => {
                    let until = rejoin.or(wait_until);
                    match wait_incoming(&mut link.events, &mut summary, until, ctrl_c.as_mut())
                        .await
                    {
                        Ok(call) => match phone.accept(call, media_addr).await {
                            Ok(()) => call,
                            Err(e) if session_gone(&e) => {
                                break 'segment (e.to_string(), vec![]);
                            }
                            Err(e) => break 'call Err((1, e.to_string())),
                        },
                        Err(Waited::Lost(reason, prefer)) => break 'segment (reason, prefer),
                        Err(Waited::Failed(reason)) => {
                            let reason = match rejoin {
                                Some(_) => format!(
                                    "the call was lost with its gateway and did not come back \
                                     within {REJOIN_WAIT:?} ({reason})"
                                ),
                                None => reason,
                            };
                            break 'call Err((1, reason));
                        }
                        Err(_) => break 'call Err((1, "interrupted".into())),
                    }
                }
            };
            summary.call = Some(call);

            // Wait for the media instructions.
            let instr = match wait_media(
                phone,
                &mut link.events,
                &mut summary,
                call,
                ctrl_c.as_mut(),
            )
            .await
            {
                Waited::Media(i) => i,
                Waited::Failed(reason) => {
                    // Dialled again while the callee is still finding a gateway: again.
                    if rejoin.is_some_and(|t| Instant::now() + REDIAL_PAUSE < t)
                        && summary.hangup_reason == Some(HangupReason::Offline)
                    {
                        summary.hangup_reason = None;
                        tokio::time::sleep(REDIAL_PAUSE).await;
                        continue 'call;
                    }
                    break 'call Err((1, reason));
                }
                Waited::Lost(reason, prefer) => break 'segment (reason, prefer),
                Waited::Interrupted => {
                    let _ = phone.hang_up(call).await;
                    break 'call Err((1, "interrupted before the call was up".into()));
                }
            };
            summary.plan = instr.plan;
            let audio_now = audio
                .as_ref()
                .map(|a| Arc::<[i16]>::from(&a[progress.audio_sent.min(a.len())..]));
            // Bound, the phone receives at once but holds its audio until the gateway's
            // media_ready (the other side is bound too), so that the start of the call is not
            // clipped.
            let media_opts = MediaOptions {
                audio: audio_now,
                record_samples: record_total.saturating_sub(progress.recorded.len()),
                firewall,
                ready_timeout: Some(MEDIA_READY_TIMEOUT),
                proxy: proxy.clone(),
                tls: Some(super::tls::MediaTls {
                    opts: args.tls.options().unwrap_or_default(),
                    host: media_tls_host(&link.server),
                }),
                ..MediaOptions::default()
            };
            // A call relayed by another gateway of the fleet: its keys come from the call key.
            let call_key = instr
                .call_key
                .then(|| crate::control::fleet_call_key(phone.session_key(), instr.call));
            let key = call_key.as_ref().unwrap_or(phone.session_key());
            let mut media = match MediaCall::start(&instr, key, socket.clone(), media_opts).await {
                Ok(m) => m,
                Err(e) => {
                    let _ = phone.hang_up(call).await;
                    break 'call Err((1, format!("media failed: {e}")));
                }
            };
            tracing::info!(call, gateway = %link.server, "media is up");
            progress.media_ran = true;
            if rejoin.take().is_some()
                && let Some(f) = summary.failovers.last_mut()
            {
                f.call_restored_at_ms = Some(unix_ms());
                tracing::info!(call, gateway = %link.server, "the call is back after a failover");
            }
            let deadline = *progress
                .deadline
                .get_or_insert_with(|| Instant::now() + args.duration.unwrap_or(Duration::MAX / 4));
            let deadline = args.duration.map(|_| deadline);

            // The call.
            let mut playback_end: Option<Instant> = None;
            let mut watchdog = tokio::time::interval(Duration::from_millis(250));
            // When this phone last reported media trouble: it reports again (the gateway
            // re-binds, then demotes) if the trouble lasts another 2 × MEDIA_SILENCE.
            let mut last_trouble: Option<Instant> = None;
            // How to take the call back through another gateway (a call relayed by another
            // gateway of the fleet than this phone's).
            let mut resume_token: Option<String> = None;
            let end: SegmentEnd = loop {
                let hang_up_at = match (deadline, playback_end) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                tokio::select! {
                    _ = media.playback_done(), if hang_up_after_playback && playback_end.is_none() => {
                        playback_end = Some(Instant::now() + TAIL);
                        progress.playback_over = true;
                    }
                    _ = async {
                        match hang_up_at {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let _ = link.phone.hang_up(call).await;
                        break SegmentEnd::Over(Ok("local".into()));
                    }
                    _ = &mut ctrl_c => {
                        let _ = link.phone.hang_up(call).await;
                        break SegmentEnd::Over(Ok("local (interrupted)".into()));
                    }
                    ev = link.events.recv() => match ev {
                        Some(Event::HangUp { call: c, reason, detail }) if c == call => {
                            summary.hangup_reason = Some(reason);
                            break SegmentEnd::Over(if reason == HangupReason::Normal {
                                Ok("peer".into())
                            } else {
                                Err((1, hangup_message(reason, detail.as_deref())))
                            });
                        }
                        // It may have come while the phone was still binding: it waited in the
                        // queue.
                        Some(Event::MediaReady { call: c }) if c == call => media.media_ready().await,
                        Some(Event::Media(i)) if i.call == call => {
                            tracing::info!(call, "the gateway re-planned the media");
                            summary.plan = i.plan;
                            if let Err(e) = media.replan(i).await {
                                let _ = link.phone.hang_up(call).await;
                                break SegmentEnd::Over(Err((1, format!("media failed after re-planning: {e}"))));
                            }
                        }
                        Some(Event::Incoming { call: other, .. }) => {
                            let _ = link.phone.reject(other).await;
                        }
                        Some(Event::ProbeResult(o)) => summary.probe(&o),
                        Some(Event::GoingAway { message, .. }) => {
                            // The gateway keeps this call; it closes the session when it ends.
                            tracing::info!(call, "the gateway is going away after this call: {message}");
                        }
                        Some(Event::ResumeToken { call: c, token }) if c == call => {
                            resume_token = Some(token);
                        }
                        Some(Event::Disconnected { reason, refused }) if gone(refused) && resume_token.is_some() => {
                            // The call is relayed elsewhere: its media goes on while this
                            // phone takes its control back through another gateway.
                            let token = resume_token.clone().unwrap_or_default();
                            match resume_call(&login, &mut link, call, &token, reason, args.failover.failover_timeout, &mut summary).await {
                                Ok(()) => continue,
                                Err(Resume::NoGateway(e)) => break SegmentEnd::Over(Err((1, e))),
                                Err(Resume::Refused(e)) => break SegmentEnd::Moved(e),
                            }
                        }
                        Some(Event::Disconnected { reason, refused }) if gone(refused) => {
                            break SegmentEnd::Lost(reason, vec![]);
                        }
                        Some(Event::Disconnected { reason, .. }) => {
                            break SegmentEnd::Over(Err((1, format!("lost the gateway: {reason}"))));
                        }
                        Some(_) => {}
                        None if resume_token.is_some() => {
                            let token = resume_token.clone().unwrap_or_default();
                            let reason = "the control session ended".to_owned();
                            match resume_call(&login, &mut link, call, &token, reason, args.failover.failover_timeout, &mut summary).await {
                                Ok(()) => continue,
                                Err(Resume::NoGateway(e)) => break SegmentEnd::Over(Err((1, e))),
                                Err(Resume::Refused(e)) => break SegmentEnd::Moved(e),
                            }
                        }
                        None => break SegmentEnd::Lost("the control session ended".into(), vec![]),
                    },
                    _ = watchdog.tick() => {
                        let st = media.status();
                        let now = Instant::now();
                        let again = last_trouble.is_none_or(|t| now.duration_since(t) >= 2 * MEDIA_SILENCE);
                        let silent = st.idle_for(now) >= MEDIA_SILENCE;
                        if again && (silent || st.gateway_consent_lost) {
                            if silent {
                                tracing::warn!(call, "no media for {MEDIA_SILENCE:?}: telling the gateway");
                            } else {
                                tracing::warn!(call, "the UDP path to the gateway lost consent: telling the gateway");
                            }
                            let _ = link.phone.media_trouble(call).await;
                            summary.media_trouble_sent = true;
                            last_trouble = Some(now);
                        }
                    }
                }
            };
            let report = media.finish().await;
            summary.add_media(&report);
            progress.audio_sent += report.sent.audio_packets as usize * SAMPLES_PER_PACKET;
            progress.recorded.extend_from_slice(&report.recording);
            match end {
                SegmentEnd::Over(r) => break 'call r,
                // Lost while only the tail was left, or past the duration: the call is done.
                SegmentEnd::Lost(..)
                    if progress.playback_over || deadline.is_some_and(|d| Instant::now() >= d) =>
                {
                    break 'call Ok("local".into());
                }
                SegmentEnd::Lost(reason, prefer) => (reason, prefer),
                // Logged in elsewhere, but the call could not be resumed (its relaying
                // gateway is gone too): re-established as after any failover, from there.
                SegmentEnd::Moved(why) => {
                    tracing::warn!(call, "{why}: placing the call again / waiting for it");
                    summary.hangup_reason = None;
                    rejoin = Some(Instant::now() + REJOIN_WAIT);
                    continue 'call;
                }
            }
        };

        // The gateway is gone (or going away): log in to another one.
        let from = link.server.clone();
        let lost_at_ms = unix_ms();
        let in_call = summary.call.is_some() || !matches!(mode, Mode::Answer);
        tracing::warn!(gateway = %from, "lost the gateway ({lost}): logging in to another");
        let start = link.index + 1;
        let next = connect_any(
            &login,
            start,
            &prefer,
            Some(Instant::now() + args.failover.failover_timeout),
        )
        .await;
        let mut f = FailoverOut::lost(from, lost.clone(), lost_at_ms);
        match next {
            Ok(c) => {
                f.to = Some(c.server.clone());
                f.logged_in_at_ms = Some(unix_ms());
                summary.failovers.push(f);
                // The old session is over; dropping it logs out if it still can.
                drop(std::mem::replace(&mut link, c));
                summary.gateway = Some(link.server.clone());
                if in_call {
                    rejoin = Some(Instant::now() + REJOIN_WAIT);
                }
            }
            Err(e) => {
                summary.failovers.push(f);
                break 'call Err((
                    1,
                    format!("lost the gateway: {lost}; no other gateway took the log-in: {e}"),
                ));
            }
        }
    };
    if let Some(w) = recording
        && progress.media_ran
    {
        match w.finish(&progress.recorded) {
            Ok(()) => summary.recording = args.record.clone(),
            Err(e) => tracing::error!("{e}"),
        }
    }
    match outcome {
        Ok(by) => {
            summary.result = CallResult::Completed;
            summary.ended_by = Some(by);
            summary.exit = 0;
        }
        Err((exit, reason)) => summary = summary.fail(exit, reason),
    }
    let _ = link.phone.bye().await;
    summary
}

/// How long a phone waits for `resumed` after its `resume`.
const RESUME_WAIT: Duration = Duration::from_secs(3);

/// The control session was lost during a call of a fleet (which gave the call a resume
/// token): logs in to the next gateway of the list and resumes the call there (its media never
/// stopped). `Err`: no gateway took the log-in, or the resume was refused (then the call is
/// placed again / waited for from the new gateway, as after any failover).
async fn resume_call(
    login: &Login<'_>,
    link: &mut Connected,
    call: CallId,
    token: &str,
    lost: String,
    timeout: Duration,
    summary: &mut PhoneSummary,
) -> Result<(), Resume> {
    let from = link.server.clone();
    let lost_at_ms = unix_ms();
    tracing::warn!(call, gateway = %from, "lost the gateway ({lost}) during the call: resuming it elsewhere");
    let next = connect_any(login, link.index + 1, &[], Some(Instant::now() + timeout)).await;
    let mut f = FailoverOut::lost(from, lost.clone(), lost_at_ms);
    let c = match next {
        Ok(c) => c,
        Err(e) => {
            summary.failovers.push(f);
            return Err(Resume::NoGateway(format!(
                "lost the gateway: {lost}; no other gateway took the log-in: {e}"
            )));
        }
    };
    f.to = Some(c.server.clone());
    f.logged_in_at_ms = Some(unix_ms());
    drop(std::mem::replace(link, c));
    summary.gateway = Some(link.server.clone());
    let outcome = async {
        link.phone
            .resume(call, token)
            .await
            .map_err(|e| format!("resume: {e}"))?;
        let limit = tokio::time::sleep(RESUME_WAIT);
        tokio::pin!(limit);
        loop {
            tokio::select! {
                ev = link.events.recv() => match ev {
                    Some(Event::Resumed { call: c }) if c == call => return Ok(()),
                    Some(Event::HangUp { call: c, reason, detail }) if c == call => {
                        summary.hangup_reason = Some(reason);
                        return Err(format!(
                            "the call could not be resumed: {}",
                            hangup_message(reason, detail.as_deref())
                        ));
                    }
                    Some(Event::Incoming { call: other, .. }) => {
                        let _ = link.phone.reject(other).await;
                    }
                    Some(Event::ProbeResult(o)) => summary.probe(&o),
                    Some(Event::Disconnected { reason, .. }) => {
                        return Err(format!("lost the gateway while resuming the call: {reason}"));
                    }
                    Some(_) => {}
                    None => return Err("lost the gateway while resuming the call".into()),
                },
                _ = &mut limit => {
                    return Err(format!("the gateway did not resume the call within {RESUME_WAIT:?}"));
                }
            }
        }
    }
    .await;
    if outcome.is_ok() {
        f.call_restored_at_ms = Some(unix_ms());
        tracing::info!(call, gateway = %link.server, "the call is back after a failover (resumed; media never stopped)");
    }
    summary.failovers.push(f);
    outcome.map_err(Resume::Refused)
}

/// Why a call was not resumed.
enum Resume {
    /// No gateway took the log-in: the call is over.
    NoGateway(String),
    /// Logged in to another gateway, which did not resume the call.
    Refused(String),
}

async fn wait_incoming(
    events: &mut mpsc::Receiver<Event>,
    summary: &mut PhoneSummary,
    until: Option<Instant>,
    mut ctrl_c: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
) -> Result<CallId, Waited> {
    tracing::info!("waiting for a call");
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Incoming { call, from_number, from_user, conference }) => {
                    tracing::info!(call, %from_number, %from_user, conference, "incoming call");
                    summary.conference = conference;
                    return Ok(call);
                }
                Some(Event::ProbeResult(o)) => summary.probe(&o),
                Some(Event::GoingAway { message, gateways }) => {
                    return Err(Waited::Lost(format!("the gateway is going away: {message}"), gateways));
                }
                Some(Event::Disconnected { reason, refused }) if gone(refused) => {
                    return Err(Waited::Lost(reason, vec![]));
                }
                Some(Event::Disconnected { reason, .. }) => {
                    return Err(Waited::Failed(format!("lost the gateway: {reason}")));
                }
                Some(_) => {}
                None => return Err(Waited::Lost("the control session ended".into(), vec![])),
            },
            _ = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => return Err(Waited::Failed("no incoming call".into())),
            _ = &mut ctrl_c => return Err(Waited::Failed("interrupted while waiting for a call".into())),
        }
    }
}

async fn wait_media(
    phone: &Phone,
    events: &mut mpsc::Receiver<Event>,
    summary: &mut PhoneSummary,
    call: CallId,
    mut ctrl_c: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
) -> Waited {
    let limit = Instant::now() + RING_LIMIT;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Media(i)) if i.call == call => return Waited::Media(i),
                Some(Event::Ringing { call: c }) if c == call => tracing::info!(call, "ringing"),
                Some(Event::HangUp { call: c, reason, detail }) if c == call => {
                    summary.hangup_reason = Some(reason);
                    return Waited::Failed(hangup_message(reason, detail.as_deref()));
                }
                Some(Event::Incoming { call: other, .. }) => {
                    let _ = phone.reject(other).await;
                }
                Some(Event::ProbeResult(o)) => summary.probe(&o),
                Some(Event::Disconnected { reason, refused }) if gone(refused) => {
                    return Waited::Lost(reason, vec![]);
                }
                Some(Event::Disconnected { reason, .. }) => {
                    return Waited::Failed(format!("lost the gateway: {reason}"));
                }
                Some(_) => {}
                None => return Waited::Lost("the control session ended".into(), vec![]),
            },
            _ = tokio::time::sleep_until(limit) => {
                let _ = phone.hang_up(call).await;
                return Waited::Failed("no answer".into());
            }
            _ = &mut ctrl_c => return Waited::Interrupted,
        }
    }
}

// ---------------------------------------------------------------- voxgate probe

#[derive(Clone, Debug, Serialize)]
struct ProbeSummary {
    user: String,
    number: Option<String>,
    result: &'static str,
    reason: Option<String>,
    capabilities: Option<Capabilities>,
    mapped: Option<SocketAddr>,
    translated: Option<bool>,
    /// The control connection's address as the gateway saw it.
    observed: Option<SocketAddr>,
    /// The gateway that took the log-in (its control address as listed).
    gateway: Option<String>,
    #[serde(skip)]
    exit: u8,
}

fn emit_probe(s: &ProbeSummary, json: bool) -> ExitCode {
    if json {
        match serde_json::to_string(s) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("voxgate probe: cannot write JSON: {e}"),
        }
    } else if let Some(c) = s.capabilities {
        println!(
            "{} ({}): send UDP {}, receive UDP {}, NAT {}; mapped address {}",
            s.user,
            s.number.as_deref().unwrap_or("?"),
            yes(c.send_udp),
            yes(c.recv_udp),
            yes(c.nat),
            s.mapped.map_or_else(|| "-".into(), |m| m.to_string())
        );
    }
    if let Some(r) = &s.reason {
        eprintln!("voxgate probe: {r}");
    }
    ExitCode::from(s.exit)
}

/// Runs `voxgate probe`.
pub fn run_probe(args: ProbeArgs) -> ExitCode {
    let mut s = ProbeSummary {
        user: args.user.clone(),
        number: None,
        result: "failed",
        reason: None,
        capabilities: None,
        mapped: None,
        translated: None,
        observed: None,
        gateway: None,
        exit: 1,
    };
    let password = match read_password(args.password_stdin, &args.user) {
        Ok(p) => p,
        Err(e) => {
            s.reason = Some(e);
            s.exit = 2;
            return emit_probe(&s, args.json);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            s.reason = Some(e);
            s.exit = 2;
            return emit_probe(&s, args.json);
        }
    };
    let s = rt.block_on(async move {
        let list = match args.failover.list(args.server.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                s.reason = Some(e);
                s.exit = 2;
                return s;
            }
        };
        let proxy = match args.proxy.resolve(first_entry(&list)) {
            Ok(p) => p,
            Err(e) => {
                s.reason = Some(e);
                s.exit = 2;
                return s;
            }
        };
        let opts = PhoneOptions {
            firewall: match proxy {
                Some(_) => FirewallClass::NoUdp.firewall(),
                None => args.firewall.firewall(),
            },
            tls: args.tls.options(),
            proxy,
            ..PhoneOptions::default()
        };
        let login = Login {
            list: &list,
            resolver: args.failover.resolver,
            user: &args.user,
            password: &password,
            opts: &opts,
        };
        let Connected { phone, server, .. } = match connect_any(&login, 0, &[], None).await {
            Ok(x) => x,
            Err(e) => {
                s.reason = Some(e.to_string());
                s.exit = 3;
                return s;
            }
        };
        s.gateway = Some(server);
        s.number = Some(phone.welcome().number.clone());
        s.observed = Some(phone.welcome().observed);
        match phone.wait_capabilities(args.wait).await {
            Some(o) => {
                s.result = "ok";
                s.capabilities = Some(o.capabilities);
                s.mapped = o.mapped;
                s.translated = Some(o.translated);
                s.exit = 0;
            }
            None => {
                s.reason = Some(format!(
                    "the gateway sent no probe result within {:.0} s",
                    args.wait.as_secs_f64()
                ));
            }
        }
        let _ = phone.bye().await;
        s
    });
    emit_probe(&s, args.json)
}

/// Reads a WAV file the way `--play` does (for tools and tests).
pub fn load_play_file(path: &Path) -> Result<Arc<[i16]>, wav::WavError> {
    wav::read(path).map(Arc::from)
}

#[cfg(test)]
mod tests {
    use super::super::fake_gateway::{FakeGateway, Mode as GwMode, gateway_with, listener};
    use super::super::g711;
    use super::*;
    use crate::control::planner::Path;
    use crate::metrics::Transport;
    use crate::wire::control::{ClientMsg, MediaRecv, MediaSend, ServerMsg};
    use clap::Parser;
    use tokio::net::UdpSocket;

    /// A far end that sends every RTP packet back where it came from.
    async fn echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let a = s.local_addr().expect("addr");
        let t = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (a, t)
    }

    fn direct_to(call: CallId, caller: bool, peer: SocketAddr) -> MediaInstructions {
        MediaInstructions {
            call_key: false,
            call,
            plan: Some(Plan {
                forward: Path::DirectUdp,
                backward: Path::DirectUdp,
            }),
            caller,
            send: MediaSend {
                transport: Transport::Udp,
                to: Some(peer),
                via_gateway: false,
            },
            recv: MediaRecv {
                transport: Transport::Udp,
                via_gateway: false,
                from: Some(peer),
            },
            leg: None,
            gateway_udp: None,
            gateway_tcp: None,
            gateway_tcp_tls: false,
            payload_type: 0,
            clock_rate: 8000,
            paths: None,
        }
    }

    fn probe_result() -> ServerMsg {
        ServerMsg::ProbeResult {
            probe: 1,
            capabilities: Capabilities::new(true, true),
            mapped: Some("127.0.0.1:5000".parse().expect("addr")),
            translated: false,
        }
    }

    /// The real log-in (4096 iterations, which the phone's defaults require), then a probe
    /// result in the same write as `welcome`.
    async fn fake(l: tokio::net::TcpListener, extra: Vec<ServerMsg>) -> FakeGateway {
        let mut after = vec![probe_result()];
        after.extend(extra);
        gateway_with(l, "pw", GwMode::Honest, 10_000, 4096, after).await
    }

    fn phone_args(server: String) -> PhoneArgs {
        PhoneArgs {
            server: Some(server),
            failover: FailoverArgs::default(),
            user: "alice".into(),
            password_stdin: true,
            call: None,
            answer: false,
            conference: None,
            play: None,
            record: None,
            duration: None,
            wait: None,
            json: true,
            firewall: FirewallClass::Open,
            tls: TlsArgs::default(),
            proxy: ProxyArgs::default(),
        }
    }

    #[tokio::test]
    async fn a_call_end_to_end_against_a_fake_gateway() {
        let (l, addr) = listener().await;
        let (far, echo_task) = echo().await;
        let gw = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            let ClientMsg::Dial { tag, number, media } = g.recv_skip_heartbeats().await else {
                panic!("expected dial")
            };
            assert_eq!(number, "+15550002");
            g.send_all(&[
                ServerMsg::Calling { tag, call: 5 },
                ServerMsg::Ringing { call: 5 },
                ServerMsg::Media(direct_to(5, true, far)),
                ServerMsg::MediaReady { call: 5 },
            ])
            .await;
            assert_eq!(
                g.recv_skip_heartbeats().await,
                ClientMsg::HangUp { call: 5 }
            );
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
            media
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let speech = wav::read(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/speech-8k.wav"),
        )
        .expect("speech");
        let clip = &speech[8000..8000 + 4500]; // 0.56 s: 28 frames and a bit
        let input = dir.path().join("in.wav");
        let output = dir.path().join("out.wav");
        wav::write(&input, clip).expect("write clip");
        let mut args = phone_args(addr);
        args.call = Some("+15550002".into());
        args.play = Some(input.clone());
        args.record = Some(output.clone());
        let summary = phone_session(
            &args,
            Mode::Call("+15550002".into()),
            "pw".into(),
            Some(load_play_file(&input).expect("play")),
            Some(wav::WavOut::create(&output).expect("record")),
            PhoneSummary::new(&args),
        )
        .await;
        echo_task.abort();
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        assert_eq!(summary.exit, 0);
        assert_eq!(summary.ended_by.as_deref(), Some("local"));
        assert_eq!(summary.call, Some(5));
        assert_eq!(summary.sent.audio_packets, 29);
        assert_eq!(summary.received.lost, 0);
        assert!(summary.received.packets >= 29, "{:?}", summary.received);
        let media = gw
            .await
            .expect("gateway")
            .expect("dial carried the media address");
        assert_eq!(media.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
        // The far end echoed our own audio: the recording is its G.711 round trip.
        let rec = wav::read(&output).expect("recording");
        let expected: Vec<i16> = clip.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
        assert_eq!(&rec[..expected.len()], &expected[..]);
        assert!(rec[expected.len()..].iter().all(|&s| s == 0));
        let j = serde_json::to_value(&summary).expect("json");
        assert_eq!(j["result"], "completed");
        assert_eq!(j["role"], "caller");
        assert_eq!(j["capabilities"]["send_udp"], true);
        assert_eq!(j["mapped"], "127.0.0.1:5000");
        assert_eq!(j["plan"]["forward"], "direct_udp");
        assert_eq!(j["transports"]["send"]["transport"], "udp");
        assert_eq!(j["transports"]["recv"]["via_gateway"], false);
        assert_eq!(j["received"]["lost"], 0);
        assert!(j["received"]["latency_ms"]["p50"].is_number());
        // Loopback, no loss: toll quality.
        let mos = j["received"]["mos"].as_f64().expect("mos");
        assert!(mos > 4.3 && mos <= 4.5, "{j}");
        assert!(j["media_ready_wait_ms"].is_number(), "{j}");
        assert_eq!(j["media_ready_timed_out"], false);
    }

    /// A far end that echoes RTP and notes when the first packet came.
    async fn timed_echo() -> (
        SocketAddr,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::Mutex<Option<Instant>>>,
    ) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let a = s.local_addr().expect("addr");
        let first = Arc::new(std::sync::Mutex::new(None));
        let f = first.clone();
        let t = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                f.lock().expect("lock").get_or_insert_with(Instant::now);
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (a, t, first)
    }

    /// Places a call to the fake gateway's echo with a short clip; `ready_after` is when the
    /// gateway says media_ready after media (`None`: never, an older gateway). Returns the
    /// summary, when media_ready went out, when the echo heard the first packet, and whether
    /// the recording is the clip's G.711 round trip.
    async fn call_with_ready(
        ready_after: Option<Duration>,
    ) -> (PhoneSummary, Option<Instant>, Option<Instant>, bool) {
        let (l, addr) = listener().await;
        let (far, echo_task, first) = timed_echo().await;
        let gw = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            let ClientMsg::Dial { tag, .. } = g.recv_skip_heartbeats().await else {
                panic!("expected dial")
            };
            g.send_all(&[
                ServerMsg::Calling { tag, call: 5 },
                ServerMsg::Media(direct_to(5, true, far)),
            ])
            .await;
            let mut ready_at = None;
            if let Some(d) = ready_after {
                tokio::time::sleep(d).await;
                ready_at = Some(Instant::now());
                g.send(&ServerMsg::MediaReady { call: 5 }).await;
            }
            assert_eq!(
                g.recv_skip_heartbeats().await,
                ClientMsg::HangUp { call: 5 }
            );
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
            ready_at
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let speech = wav::read(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/speech-8k.wav"),
        )
        .expect("speech");
        let clip = &speech[16000..16000 + 3300];
        let input = dir.path().join("in.wav");
        let output = dir.path().join("out.wav");
        wav::write(&input, clip).expect("write clip");
        let mut args = phone_args(addr);
        args.call = Some("+15550002".into());
        let summary = phone_session(
            &args,
            Mode::Call("+15550002".into()),
            "pw".into(),
            Some(load_play_file(&input).expect("play")),
            Some(wav::WavOut::create(&output).expect("record")),
            PhoneSummary::new(&args),
        )
        .await;
        echo_task.abort();
        let ready_at = gw.await.expect("gateway");
        let rec = wav::read(&output).expect("recording");
        let expected: Vec<i16> = clip.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
        let exact = rec.len() >= expected.len() && rec[..expected.len()] == expected[..];
        let first = *first.lock().expect("lock");
        (summary, ready_at, first, exact)
    }

    #[tokio::test]
    async fn audio_waits_for_media_ready_and_nothing_is_lost() {
        let (summary, ready_at, first, exact) =
            call_with_ready(Some(Duration::from_millis(600))).await;
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        let (ready_at, first) = (ready_at.expect("sent"), first.expect("echoed"));
        assert!(
            first >= ready_at,
            "nothing was sent before media_ready ({:?} early)",
            ready_at - first
        );
        let waited = summary.media_ready_wait_ms.expect("the phone waited");
        assert!((400.0..3000.0).contains(&waited), "waited {waited} ms");
        assert!(!summary.media_ready_timed_out);
        assert_eq!(
            summary.sent.audio_packets, 21,
            "every frame went, none skipped"
        );
        assert!(
            exact,
            "the recording is the whole clip from its first sample"
        );
        let j = serde_json::to_value(&summary).expect("json");
        assert!(
            j["media_ready_wait_ms"]
                .as_f64()
                .is_some_and(|w| w >= 400.0)
        );
    }

    #[tokio::test]
    async fn without_media_ready_the_audio_goes_after_the_time_out() {
        let (summary, _, first, exact) = call_with_ready(None).await;
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        assert!(first.is_some());
        assert!(summary.media_ready_timed_out, "{summary:?}");
        let waited = summary
            .media_ready_wait_ms
            .expect("held until the time-out");
        assert!(
            (2900.0..4000.0).contains(&waited),
            "held about {MEDIA_READY_TIMEOUT:?}: {waited} ms"
        );
        assert_eq!(summary.sent.audio_packets, 21);
        assert!(exact);
        assert!(summary.human().contains("no media_ready"));
    }

    #[tokio::test]
    async fn answering_records_until_the_peer_hangs_up() {
        let (l, addr) = listener().await;
        let (far, echo_task) = echo().await;
        let gw = tokio::spawn(async move {
            let incoming = ServerMsg::Incoming {
                call: 9,
                from_number: "+15550002".into(),
                from_user: "bob".into(),
                conference: false,
            };
            let mut g = fake(l, vec![incoming]).await;
            let ClientMsg::Accept { call: 9, media } = g.recv_skip_heartbeats().await else {
                panic!("expected accept")
            };
            g.send_all(&[
                ServerMsg::Media(direct_to(9, false, far)),
                ServerMsg::MediaReady { call: 9 },
            ])
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            g.send(&ServerMsg::HangUp {
                call: 9,
                reason: HangupReason::Normal,
                detail: None,
            })
            .await;
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
            media
        });
        let mut args = phone_args(addr);
        args.answer = true;
        let summary = phone_session(
            &args,
            Mode::Answer,
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        echo_task.abort();
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        assert_eq!(summary.ended_by.as_deref(), Some("peer"));
        assert_eq!(summary.role, Role::Callee);
        assert!(
            summary.received.packets > 5,
            "silence echoed back: {:?}",
            summary.received
        );
        assert!(gw.await.expect("gateway").is_some());
    }

    #[tokio::test]
    async fn a_session_taken_by_another_log_in_is_not_taken_back() {
        // Two gateways listed; the first closes the session with `replaced` (the same user
        // logged in elsewhere). Logging in again anywhere would take it back: the phone must
        // stop, and the second gateway must see no connection.
        let (l, addr) = listener().await;
        let (second, second_addr) = listener().await;
        let gw = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            g.send(&ServerMsg::Refused {
                code: ErrorCode::Replaced,
                message: "logged in from another place".into(),
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let mut args = phone_args(format!("{addr},{second_addr}"));
        args.answer = true;
        let summary = phone_session(
            &args,
            Mode::Answer,
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        gw.await.unwrap();
        assert_eq!(summary.result, CallResult::Failed);
        assert!(
            summary
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("logged in elsewhere")),
            "{summary:?}"
        );
        assert!(summary.failovers.is_empty(), "{summary:?}");
        let tried = tokio::time::timeout(Duration::from_millis(200), second.accept()).await;
        assert!(tried.is_err(), "the phone logged in again elsewhere");
    }

    #[tokio::test]
    async fn a_closed_session_moves_to_the_next_gateway() {
        // The first gateway drops the connection while the phone waits for a call; the second
        // takes the log-in and rings it.
        let (l, addr) = listener().await;
        let (l2, addr2) = listener().await;
        let (far, echo_task) = echo().await;
        let first = tokio::spawn(async move {
            let g = fake(l, Vec::new()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(g);
        });
        let second = tokio::spawn(async move {
            let incoming = ServerMsg::Incoming {
                call: 5,
                from_number: "+15550002".into(),
                from_user: "+15550002".into(),
                conference: false,
            };
            let mut g = fake(l2, vec![incoming]).await;
            let ClientMsg::Accept { call: 5, .. } = g.recv_skip_heartbeats().await else {
                panic!("expected accept")
            };
            g.send_all(&[
                ServerMsg::Media(direct_to(5, false, far)),
                ServerMsg::MediaReady { call: 5 },
            ])
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            g.send(&ServerMsg::HangUp {
                call: 5,
                reason: HangupReason::Normal,
                detail: None,
            })
            .await;
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
        });
        let mut args = phone_args(addr.clone());
        args.failover.gateway = vec![addr2.clone()];
        args.answer = true;
        let summary = phone_session(
            &args,
            Mode::Answer,
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        echo_task.abort();
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        assert_eq!(summary.gateway.as_deref(), Some(addr2.as_str()));
        assert_eq!(summary.failovers.len(), 1, "{summary:?}");
        assert_eq!(summary.failovers[0].from, addr);
        assert_eq!(summary.failovers[0].to.as_deref(), Some(addr2.as_str()));
        // No call was lost: nothing to bring back.
        assert_eq!(summary.failovers[0].call_restored_at_ms, None);
    }

    #[tokio::test]
    async fn going_away_sends_the_phone_where_the_gateway_says_first() {
        // The list is [first, second]; the draining first gateway names third: the phone goes
        // there, not to second.
        let (l, addr) = listener().await;
        let (second, second_addr) = listener().await;
        let (l3, addr3) = listener().await;
        let (far, echo_task) = echo().await;
        let to = addr3.clone();
        let first = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            g.send(&ServerMsg::GoingAway {
                message: "draining".into(),
                gateways: vec![to],
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let third = tokio::spawn(async move {
            let incoming = ServerMsg::Incoming {
                call: 7,
                from_number: "+15550002".into(),
                from_user: "+15550002".into(),
                conference: false,
            };
            let mut g = fake(l3, vec![incoming]).await;
            let ClientMsg::Accept { call: 7, .. } = g.recv_skip_heartbeats().await else {
                panic!("expected accept")
            };
            g.send_all(&[
                ServerMsg::Media(direct_to(7, false, far)),
                ServerMsg::MediaReady { call: 7 },
                ServerMsg::HangUp {
                    call: 7,
                    reason: HangupReason::Normal,
                    detail: None,
                },
            ])
            .await;
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
        });
        let mut args = phone_args(format!("{addr},{second_addr}"));
        args.answer = true;
        let summary = phone_session(
            &args,
            Mode::Answer,
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        echo_task.abort();
        first.await.unwrap();
        third.await.unwrap();
        assert_eq!(summary.result, CallResult::Completed, "{summary:?}");
        assert_eq!(summary.gateway.as_deref(), Some(addr3.as_str()));
        assert!(
            summary.failovers[0].reason.contains("going away"),
            "{summary:?}"
        );
        let tried = tokio::time::timeout(Duration::from_millis(100), second.accept()).await;
        assert!(tried.is_err(), "the phone went to the second gateway first");
    }

    #[tokio::test]
    async fn a_busy_callee_fails_the_call_with_its_reason() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            let ClientMsg::Dial { tag, .. } = g.recv_skip_heartbeats().await else {
                panic!("expected dial")
            };
            g.send_all(&[
                ServerMsg::Calling { tag, call: 3 },
                ServerMsg::HangUp {
                    call: 3,
                    reason: HangupReason::Busy,
                    detail: None,
                },
            ])
            .await;
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
        });
        let mut args = phone_args(addr);
        args.call = Some("+15550003".into());
        let summary = phone_session(
            &args,
            Mode::Call("+15550003".into()),
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        assert_eq!(summary.result, CallResult::Failed);
        assert_eq!(summary.reason.as_deref(), Some("busy"));
        assert_eq!(summary.exit, 1);
        gw.await.expect("gateway");
        // A wrong password: exit status 3 and the gateway's words.
        let (l, addr) = listener().await;
        let gw = tokio::spawn(async move { fake(l, Vec::new()).await });
        let args = phone_args(addr);
        let summary = phone_session(
            &args,
            Mode::Call("1".into()),
            "wrong".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        assert_eq!(summary.exit, 3);
        assert_eq!(
            summary.reason.as_deref(),
            Some("log-in refused: wrong user or password")
        );
        gw.await.expect("gateway");
    }

    #[tokio::test]
    async fn a_refused_call_prints_the_gateways_words() {
        let detail = "media address 127.0.0.1 is in a denied range (loopback 127.0.0.0/8); \
                      set allow_private_peers or allowed_peers";
        let (l, addr) = listener().await;
        let gw = tokio::spawn(async move {
            let mut g = fake(l, Vec::new()).await;
            let ClientMsg::Dial { tag, .. } = g.recv_skip_heartbeats().await else {
                panic!("expected dial")
            };
            g.send_all(&[
                ServerMsg::Calling { tag, call: 4 },
                ServerMsg::HangUp {
                    call: 4,
                    reason: HangupReason::PeerDenied,
                    detail: Some(detail.into()),
                },
            ])
            .await;
            assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Bye);
        });
        let mut args = phone_args(addr);
        args.call = Some("+15550003".into());
        let summary = phone_session(
            &args,
            Mode::Call("+15550003".into()),
            "pw".into(),
            None,
            None,
            PhoneSummary::new(&args),
        )
        .await;
        gw.await.expect("gateway");
        let want = format!("the gateway refused the call: {detail}");
        assert_eq!(summary.reason.as_deref(), Some(want.as_str()));
        assert_eq!(summary.hangup_reason, Some(HangupReason::PeerDenied));
        assert!(
            summary.human().contains(&format!("failed: {want}")),
            "{}",
            summary.human()
        );
        let j = serde_json::to_value(&summary).expect("json");
        assert_eq!(j["hangup_reason"], "peer_denied");
        // Without words from the gateway, the reason's own text.
        assert_eq!(
            hangup_message(HangupReason::PeerDenied, None),
            "the gateway refused a media address"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Cmd {
        Phone(PhoneArgs),
        Probe(ProbeArgs),
    }

    fn parse(args: &[&str]) -> Result<Cmd, String> {
        Cli::try_parse_from(std::iter::once("voxgate").chain(args.iter().copied()))
            .map(|c| c.cmd)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn gateway_lists_parse_from_server_and_gateway_flags() {
        let Ok(Cmd::Phone(a)) = parse(&[
            "phone",
            "--gateway",
            "gw1:7400,gw2",
            "--gateway",
            "_voxgate._tcp.example.net",
            "--resolver",
            "192.0.2.53",
            "--failover-timeout",
            "5",
            "--user",
            "alice",
            "--answer",
        ]) else {
            panic!("phone parses without --server")
        };
        assert_eq!(a.server, None);
        assert_eq!(a.failover.resolver, Some("192.0.2.53:53".parse().unwrap()));
        assert_eq!(a.failover.failover_timeout, Duration::from_secs(5));
        let l = a.failover.list(a.server.as_deref()).unwrap();
        assert_eq!(l.entries.len(), 3);
        assert!(
            matches!(&l.entries[2], Entry::Srv { name, tls: false } if name == "_voxgate._tcp.example.net")
        );
        let Ok(Cmd::Probe(p)) =
            parse(&["probe", "--server", "a,b", "--gateway", "c", "--user", "x"])
        else {
            panic!("probe parses")
        };
        assert_eq!(
            p.failover.list(p.server.as_deref()).unwrap().entries.len(),
            3
        );
        // Some gateway is needed.
        let e = parse(&["phone", "--user", "alice", "--answer"]).unwrap_err();
        assert!(e.contains("--server"), "{e}");
        let e = parse(&[
            "probe",
            "--server",
            "gw",
            "--resolver",
            "nowhere",
            "--user",
            "x",
        ])
        .unwrap_err();
        assert!(e.contains("IP[:PORT]"), "{e}");
    }

    #[test]
    fn the_contracted_flags_parse() {
        let Ok(Cmd::Phone(a)) = parse(&[
            "phone",
            "--server",
            "gw:7400",
            "--user",
            "alice",
            "--password-stdin",
            "--call",
            "+15550002",
            "--play",
            "in.wav",
            "--record",
            "out.wav",
            "--duration",
            "2.5",
            "--json",
            "--firewall",
            "no-udp-in",
        ]) else {
            panic!("phone parses")
        };
        assert_eq!(a.call.as_deref(), Some("+15550002"));
        assert_eq!(a.duration, Some(Duration::from_millis(2500)));
        assert!(a.json && a.password_stdin && !a.answer);
        assert_eq!(
            a.firewall.firewall(),
            Firewall {
                block_udp_out: false,
                block_udp_in: true,
                simulate_nat: false,
            }
        );
        let Ok(Cmd::Phone(a)) = parse(&["phone", "--server", "gw", "--user", "bob", "--answer"])
        else {
            panic!("answer parses")
        };
        assert!(a.answer && a.firewall == FirewallClass::Open);
        let Ok(Cmd::Phone(a)) = parse(&[
            "phone",
            "--server",
            "gw",
            "--user",
            "bob",
            "--conference",
            "1,2,3",
        ]) else {
            panic!("conference parses")
        };
        assert_eq!(a.conference, Some(vec!["1".into(), "2".into(), "3".into()]));
        // Exactly one mode.
        assert!(parse(&["phone", "--server", "gw", "--user", "bob"]).is_err());
        assert!(
            parse(&[
                "phone", "--server", "gw", "--user", "b", "--answer", "--call", "1"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "phone",
                "--server",
                "gw",
                "--user",
                "b",
                "--answer",
                "--duration",
                "-1"
            ])
            .is_err()
        );
        // No password on the command line.
        assert!(
            parse(&[
                "phone",
                "--server",
                "gw",
                "--user",
                "b",
                "--answer",
                "--password",
                "x"
            ])
            .is_err()
        );
        let Ok(Cmd::Probe(p)) = parse(&[
            "probe",
            "--server",
            "[::1]:7400",
            "--user",
            "alice",
            "--json",
            "--firewall",
            "no-udp",
        ]) else {
            panic!("probe parses")
        };
        assert_eq!(p.wait, Duration::from_secs(15));
        assert_eq!(
            p.firewall.firewall(),
            Firewall {
                block_udp_out: true,
                block_udp_in: true,
                simulate_nat: false,
            }
        );
    }

    #[test]
    fn a_wrong_format_wav_fails_before_logging_in() {
        let a = PhoneArgs {
            server: Some("127.0.0.1:1".into()),
            failover: FailoverArgs::default(),
            user: "alice".into(),
            password_stdin: true,
            call: Some("1".into()),
            answer: false,
            conference: None,
            play: Some("tests/data/stereo-16k.wav".into()),
            record: None,
            duration: None,
            wait: None,
            json: true,
            firewall: FirewallClass::Open,
            tls: TlsArgs::default(),
            proxy: ProxyArgs::default(),
        };
        let s = PhoneSummary::new(&a).fail(2, "x");
        assert_eq!(s.exit, 2);
        let j = serde_json::to_value(&s).expect("json");
        assert_eq!(j["result"], "failed");
        assert_eq!(j["role"], "caller");
        assert!(j.get("exit").is_none());
        // run_phone itself: refused at the WAV, exit status 2, nothing read from stdin.
        assert_eq!(run_phone(a), ExitCode::from(2));
    }

    #[test]
    fn summaries_read_well() {
        let a = PhoneArgs {
            server: Some("gw".into()),
            failover: FailoverArgs::default(),
            user: "alice".into(),
            password_stdin: true,
            call: Some("1".into()),
            answer: false,
            conference: None,
            play: None,
            record: None,
            duration: None,
            wait: None,
            json: false,
            firewall: FirewallClass::Open,
            tls: TlsArgs::default(),
            proxy: ProxyArgs::default(),
        };
        let mut s = PhoneSummary::new(&a).fail(1, "busy");
        s.number = Some("+1555".into());
        let h = s.human();
        assert!(
            h.starts_with("call - as alice (+1555): failed: busy"),
            "{h}"
        );
        let j = serde_json::to_value(&s).expect("json");
        assert_eq!(j["reason"], "busy");
        assert_eq!(j["transports"]["send"], serde_json::Value::Null);
        s.failovers.push(FailoverOut {
            from: "gw1:7400".into(),
            to: Some("gw2:7400".into()),
            reason: "the gateway closed the control connection".into(),
            lost_at_ms: 10_000,
            logged_in_at_ms: Some(10_300),
            call_restored_at_ms: Some(11_250),
        });
        let h = s.human();
        assert!(
            h.contains(
                "lost gateway gw1:7400 (the gateway closed the control connection); logged in \
                 to gw2:7400 0.3 s later, the call back 1.2 s after"
            ),
            "{h}"
        );
        let j = serde_json::to_value(&s).expect("json");
        assert_eq!(j["failovers"][0]["call_restored_at_ms"], 11_250);
    }

    #[test]
    fn phone_mos_counts_loss_against_packets_expected() {
        assert_eq!(leg_mos(0, 0, 0.0, None), None);
        let clean = leg_mos(100, 0, 0.5, Some(1.0)).expect("mos");
        let lossy = leg_mos(99, 1, 0.5, Some(1.0)).expect("mos");
        // 1 % loss, G.711 without concealment: R falls by 95 · 1 / 5.3 = 17.9.
        let want = crate::metrics::mos::mos(0.01, 0.5, 1.0);
        assert!((lossy - want).abs() < 0.001, "{lossy} vs {want}");
        assert!(clean > 4.3 && lossy < 4.0, "{clean} {lossy}");
        // Unknown latency counts as 0 ms of network delay.
        assert_eq!(leg_mos(100, 0, 0.5, None), leg_mos(100, 0, 0.5, Some(0.0)));
    }
}
