//! The gateway's control core, sans-IO in the style of `quinn-proto`: no sockets, no clock, no
//! threads. `server/` feeds it [`Input`]s with the current time ([`Gateway::handle`]), calls
//! [`Gateway::handle_timeout`] when [`Gateway::poll_timeout`] says so, and carries out the
//! [`Action`]s it takes from [`Gateway::poll_action`]: messages to send on control connections,
//! connections to close, probe datagrams, and shard commands.
//!
//! It owns every per-client and per-call decision: log-in ([`super::auth`]), presence
//! ([`super::presence`]), probing ([`super::probe`]), calls and conference rooms
//! ([`super::calls`]), and the Table 1 plan ([`super::planner`], [`super::media`]). It owns
//! no socket and no shard: a shard session exists because this core emitted
//! [`Action::InstallSession`], and is gone once it emitted [`Action::RemoveSession`].
//!
//! The store is never called: a directory look-up (the verifier at `hello`, the number at
//! `dial` and `conference`) is an [`Action::Lookup`] that the server carries out off the
//! control thread and answers with [`Input::LookupDone`] ([`super::lookup`]), so a slow
//! directory delays only the log-ins and dials waiting for it. Randomness (nonces, tokens, leg names) comes from the
//! [`StdRng`] the caller seeds; in production seed it from the OS (`StdRng::from_os_rng()`).
//!
//! # Contract with the server
//! - Shard commands ([`Action::InstallSession`], [`Action::AddLeg`], [`Action::RemoveLeg`],
//!   [`Action::RemoveSession`]) must reach each shard **in the order they were polled**: a
//!   session may be removed right after its install was asked for (the call ended meanwhile),
//!   and a room's `AddLeg` may follow its `InstallSession` before the install is confirmed.
//! - Every [`Action::InstallSession`] is answered with exactly one
//!   [`Input::ShardInstalled`] carrying the same `op`.
//! - Every [`Action::Lookup`] is answered with exactly one [`Input::LookupDone`] carrying the
//!   same `id`, in any order and at any later time (the connection may be gone by then).
//! - After [`Action::Close`] the core has forgotten the connection; what arrives for it later
//!   is ignored. [`Input::Disconnected`] for a connection it already closed is harmless.
//! - `ConnId`s are never reused.
//!
//! - Actions print with `{:?}`, and [`Input`] too: a `LegSpec` carries its key and a
//!   `ClientMsg::Proof` its proof, so do not log them whole.
//!
//! # Decisions where the brief was silent (details in each module)
//! - Log-in: `hello` is refused with `refused{unavailable}` while draining (the connection is
//!   accepted so that the refusal is read, not lost to a reset); with `refused{bad_message}`
//!   for a malformed user name or nonce; `refused{internal}` when the store fails. A
//!   connection that has not logged in within [`GatewayConfig::login_timeout`] gets
//!   `refused{timeout}`. `bye` ends the client's calls with `hang_up{normal}` to its peers.
//! - Presence deadlines carry a jitter allowance ([`super::presence`]).
//! - Probe verdicts, timeouts and the NAT reading: [`super::probe`].
//! - Calls (busy rules, `calling` before any `hang_up`, new calls while draining get
//!   `hang_up{shutdown}`, one call per voice-gateway port of a telephone route, no media address means TCP):
//!   [`super::calls`]. Private-address refusal: [`super::media`].
//! - `Shutdown` sends `hang_up{shutdown}` for every call, then `refused{unavailable}` and a
//!   close to every connection, and refuses every later connection.
//!
//! Nothing here panics on any input sequence, and every table is bounded: connections by
//! [`GatewayConfig::max_connections`], probes by one per logged-in client, calls by
//! [`GatewayConfig::max_calls_per_user`] per client, rooms by
//! [`GatewayConfig::max_room_size`], log-in attempt records by the rate limiter's table size,
//! directory look-ups by [`GatewayConfig::max_pending_lookups`], dial/ring/invitation buckets
//! by [`super::limits::RateTable`]'s bound, route-call watches by the calls.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::rngs::StdRng;
use rand::{CryptoRng, RngCore};

use super::auth::{
    self, AuthConfig, RateLimitConfig, RateLimiter, ServerAwaitingProof, ServerFirst, SessionKey,
};
use super::calls::Call;
use super::presence::Presence;
use super::probe::{Probe, ProbeOutcome};
use crate::directory::{Answer, LookupError, Query};
use crate::net::canonical;
use crate::relay_spec::{LegSpec, SessionId, SessionSpec};
use crate::wire::control::{CallId, ClientMsg, ErrorCode, ServerMsg, VERSION};

/// At most one log line per this interval about log-ins the rate limiter refused.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The server's name for one control connection. Never reused.
pub type ConnId = u64;

/// The two probe ports: A receives the client's Binding requests; B only sends (an unsolicited
/// source, to tell a firewall that admits only replies from one that admits anything).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbePort {
    A,
    B,
}

/// One shard as clients reach it: its index and its UDP and TCP media ports.
#[derive(Clone, Debug)]
pub struct ShardInfo {
    pub index: usize,
    pub udp_port: u16,
    pub tcp_port: u16,
}

/// Everything the control core can be told to do differently; reloadable with
/// [`Gateway::set_config`].
///
/// The [`AuthConfig`] secret keys the decoy challenges for unknown users. It must be stable
/// across restarts (or a prober sees an unknown user's salt change) and secret: the server
/// should create it once, persist it next to the store, and build the config with
/// [`GatewayConfig::with_secret`]. [`GatewayConfig::generate`] draws a fresh one (fine for a
/// one-off run), and `Default` uses an all-zero secret, which is for tests only:
/// [`Gateway::new`] logs a warning when it sees one.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Heart-beat interval told to clients (`welcome.heartbeat_ms`). Default 10 s.
    pub heartbeat: Duration,
    /// Heart-beat intervals a client may stay silent before it is offline. Default 3.
    pub misses: u32,
    /// Allowance for network jitter on every presence deadline, so that a client heart-beating
    /// exactly every `heartbeat` is not polled each time one arrives a little late. Default
    /// 2.5 s; at most half the heart-beat.
    pub heartbeat_slack: Duration,
    /// A connection must complete its log-in within this. Default 10 s.
    pub login_timeout: Duration,
    /// An unanswered call (or room invitation) ends after this. Default 30 s.
    pub ring_timeout: Duration,
    /// UDP ports of probe sockets A and B (told to clients in `probe_begin`). Default 7390, 7391.
    pub probe_ports: (u16, u16),
    /// A probe that has no `probe_report` after this ends with `recv_udp = false`. Default 2 s.
    pub probe_timeout: Duration,
    /// How long to wait for the client's Binding request before sending the probe datagrams
    /// anyway (after `probe_local`). Default 600 ms.
    pub probe_bind_wait: Duration,
    /// Told to the client in `probe_check`: how long to wait for stragglers. Default 300 ms.
    pub probe_grace: Duration,
    /// Binding indications sent from each probe port. Default 3.
    pub probe_repeats: u32,
    /// Spacing of those indications. Default 50 ms.
    pub probe_spacing: Duration,
    /// `false` (default): UDP media destinations (a client's `Delivery::Udp` address, or the
    /// peer address of a direct UDP direction) in loopback, RFC 1918, ULA or link-local ranges
    /// are refused: the call ends with `hang_up{error}` and the reason is logged. Telephone
    /// routes are operator configuration and are exempt.
    pub allow_private_peers: bool,
    /// Operator prefixes that open (`allowed_peers`) or close (`denied_peers`) media
    /// destinations; the most specific prefix wins (see [`super::peer_policy`]).
    pub allowed_peers: Vec<super::peer_policy::Cidr>,
    pub denied_peers: Vec<super::peer_policy::Cidr>,
    /// SCRAM iteration count of verifiers; unknown users' decoy challenges advertise it too
    /// (it overrides `auth.decoy_iterations`, so the two cannot drift apart).
    pub scram_iterations: u32,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    /// Control connections held at once (logged in or not); more are refused at connect.
    pub max_connections: usize,
    /// Calls a client may take part in at once (each two-party call and each room counts one).
    pub max_calls_per_user: usize,
    /// Largest room, organizer included (2..=64). Default 16.
    pub max_room_size: usize,
    /// The addresses clients are told per family (behind 1:1 NAT); default: the address each
    /// control connection arrived at. See [`super::advertise`].
    pub advertised: super::advertise::Advertised,
    /// Directory look-ups waiting for their answer, at most (beyond: `hello` is refused with
    /// `unavailable`, a dial ends with `hang_up{error}`). Default 10 000.
    pub max_pending_lookups: usize,
    /// Dial, ring and invitation rates ([`super::limits::CallLimitConfig`]).
    pub call_limits: super::limits::CallLimitConfig,
    /// Telephone route calls end after this (`hang_up{time_limit}`); zero: never. Default 4 h.
    pub route_max_duration: Duration,
    /// A route call whose caller or voice gateway sent no media for this long ends
    /// (`hang_up{no_media}`); zero: not checked. Default 60 s.
    pub route_inactivity: Duration,
    /// How often the directory is asked what changed (deleted users, new passwords or
    /// numbers end live sessions). Default 1 s.
    pub directory_poll: Duration,
    /// Sources the log-in limiter does not count (a local load generator, a trusted proxy all
    /// clients come through). Default: none (the server's config adds loopback).
    pub exempt_sources: Vec<super::limits::Cidr>,
    /// While draining, told to clients in `going_away` (other gateways' control addresses,
    /// best first). Default: none (clients use their own lists).
    pub drain_redirect: Vec<String>,
    /// In a fleet: how long an established call waits for a party whose gateway (or control
    /// connection) is gone to `resume` it elsewhere before it ends with `peer_lost`.
    /// Default 10 s.
    pub fleet_resume_grace: Duration,
}

impl Default for GatewayConfig {
    /// Defaults with an all-zero auth secret: for tests. See the type's docs.
    fn default() -> Self {
        Self::with_secret([0; 32])
    }
}

impl GatewayConfig {
    /// Defaults, with the decoy secret the server persisted.
    pub fn with_secret(secret: [u8; 32]) -> Self {
        GatewayConfig {
            heartbeat: Duration::from_secs(10),
            misses: 3,
            heartbeat_slack: Duration::from_millis(2500),
            login_timeout: Duration::from_secs(10),
            ring_timeout: Duration::from_secs(30),
            probe_ports: (7390, 7391),
            probe_timeout: Duration::from_secs(2),
            probe_bind_wait: Duration::from_millis(600),
            probe_grace: Duration::from_millis(300),
            probe_repeats: 3,
            probe_spacing: Duration::from_millis(50),
            allow_private_peers: false,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            scram_iterations: auth::DEFAULT_ITERATIONS,
            auth: AuthConfig::new(secret, auth::DEFAULT_ITERATIONS),
            rate_limit: RateLimitConfig::default(),
            max_connections: 100_000,
            max_calls_per_user: 8,
            max_room_size: 16,
            advertised: super::advertise::Advertised::default(),
            max_pending_lookups: 10_000,
            call_limits: super::limits::CallLimitConfig::default(),
            directory_poll: Duration::from_secs(1),
            route_max_duration: Duration::from_secs(4 * 3600),
            route_inactivity: Duration::from_secs(60),
            exempt_sources: Vec::new(),
            drain_redirect: Vec::new(),
            fleet_resume_grace: Duration::from_secs(10),
        }
    }

    /// Defaults with a fresh random decoy secret (unknown users' salts change at restart).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::with_secret(secret)
    }

    /// The policy every media destination is checked against.
    pub fn peer_policy(&self) -> super::peer_policy::PeerPolicy {
        super::peer_policy::PeerPolicy::new(
            self.allow_private_peers,
            &self.allowed_peers,
            &self.denied_peers,
        )
    }

    pub(crate) fn cadence(&self) -> super::presence::Cadence {
        super::presence::Cadence {
            heartbeat: self.heartbeat,
            misses: self.misses,
            slack: self.heartbeat_slack,
        }
    }

    /// The config with every value brought into a range where no deadline can overflow and no
    /// table is unbounded.
    fn sanitized(mut self) -> Self {
        const DAY: Duration = Duration::from_secs(86_400);
        let clamp = |d: Duration, lo: Duration, hi: Duration| d.max(lo).min(hi);
        self.heartbeat = clamp(self.heartbeat, Duration::from_millis(100), DAY);
        self.misses = self.misses.clamp(1, 1000);
        self.heartbeat_slack = self.heartbeat_slack.min(self.heartbeat / 2);
        self.login_timeout = clamp(self.login_timeout, Duration::from_millis(100), DAY);
        self.ring_timeout = self.ring_timeout.min(DAY);
        self.fleet_resume_grace = self.fleet_resume_grace.min(Duration::from_secs(600));
        self.probe_timeout = clamp(self.probe_timeout, Duration::from_millis(10), DAY);
        self.probe_bind_wait = self.probe_bind_wait.min(self.probe_timeout);
        self.probe_grace = self.probe_grace.min(self.probe_timeout);
        self.probe_repeats = self.probe_repeats.min(16);
        self.probe_spacing = self.probe_spacing.min(Duration::from_secs(1));
        self.scram_iterations = self.scram_iterations.max(1);
        self.auth.decoy_iterations = self.scram_iterations;
        self.max_calls_per_user = self.max_calls_per_user.clamp(1, 64);
        self.max_room_size = self.max_room_size.clamp(2, 64);
        self.max_pending_lookups = self.max_pending_lookups.clamp(1, 1_000_000);
        self.directory_poll = clamp(self.directory_poll, Duration::from_millis(100), DAY);
        self
    }
}

/// What happened, as told by the server.
#[derive(Debug)]
pub enum Input {
    /// A control connection was accepted: `peer` is the client as seen, `local` the gateway
    /// address it connected to (clients are told media addresses on that IP).
    Connected {
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    },
    Message {
        conn: ConnId,
        msg: ClientMsg,
    },
    /// A frame that did not decode (or broke the framing): answered with `error` and a close.
    BadMessage {
        conn: ConnId,
        error: String,
    },
    Disconnected {
        conn: ConnId,
    },
    /// Right after `Connected`: the connection runs over TLS and its exporter value (RFC 9266
    /// `tls-exporter`, 32 bytes) is `exporter`. The SCRAM log-in checks the channel binding
    /// against it.
    TlsChannel {
        conn: ConnId,
        exporter: Vec<u8>,
    },
    /// How long each leg of the sessions in [`Gateway::watched_sessions`] has received no media
    /// (`None`: nothing yet), from the shards' snapshots.
    MediaActivity {
        legs: Vec<(SessionId, String, Option<Duration>)>,
    },
    /// The shard refused an [`Action::AddLeg`] (its session is gone, the leg table is full…):
    /// the room member is told and leaves the room.
    LegAddFailed {
        session: SessionId,
        leg: String,
        error: String,
    },
    /// The client kept sending faster than `per_s` messages per second for too long (the server
    /// throttled it meanwhile): refused with `rate_limited` and closed.
    Flooding {
        conn: ConnId,
        per_s: u32,
    },
    /// A datagram on probe port A or B.
    ProbeDatagram {
        port: ProbePort,
        src: SocketAddr,
        data: Vec<u8>,
    },
    /// The answer to [`Action::InstallSession`] with this `op`.
    ShardInstalled {
        op: u64,
        result: Result<(), String>,
    },
    /// A shard reports that a leg proved its key over `transport`: media can now be
    /// delivered to it that way.
    LegBound {
        session: SessionId,
        leg: String,
        transport: crate::metrics::Transport,
    },
    /// The answer to [`Action::Lookup`] with this `id`.
    LookupDone {
        id: u64,
        result: Result<Answer, LookupError>,
    },
    /// Redis answered, or another node of the fleet said something ([`super::fleet`]).
    Fleet(super::fleet::FleetInput),
    /// SIGTERM: refuse new log-ins and calls; calls in progress continue.
    Drain,
    /// End every call (HangUp Shutdown) and close every connection.
    Shutdown,
}

/// What the server is to do.
#[derive(Clone, Debug)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: ServerMsg,
    },
    /// Close the connection (after sending what was queued for it).
    Close {
        conn: ConnId,
    },
    /// Send a datagram from probe port `port`.
    ProbeSend {
        port: ProbePort,
        dst: SocketAddr,
        data: Vec<u8>,
    },
    InstallSession {
        op: u64,
        shard: usize,
        spec: SessionSpec,
    },
    RemoveSession {
        shard: usize,
        session: SessionId,
    },
    /// A participant joins a room's session.
    AddLeg {
        shard: usize,
        session: SessionId,
        leg: LegSpec,
    },
    /// A participant leaves a room's session.
    RemoveLeg {
        shard: usize,
        session: SessionId,
        leg: String,
    },
    /// A call ended (answered, unanswered or refused): its record, for the call detail
    /// records. Emitted before the `RemoveSession` of its relay, so a shard asked for the
    /// session's legs in this order still has them.
    CallEnded(Box<super::records::CallRecord>),
    /// Ask the directory, off the control thread; answer with [`Input::LookupDone`].
    Lookup {
        id: u64,
        query: Query,
    },
    /// A relay session is about to be removed while its call goes on (a re-plan): these legs'
    /// numbers belong in the call's record. Emitted before that `RemoveSession`.
    RetireLegs {
        shard: usize,
        session: SessionId,
        legs: Vec<String>,
    },
    /// Presence, location and messages to other nodes, in Redis ([`super::fleet`]); answered
    /// (where an answer is due) with [`Input::Fleet`].
    Fleet(super::fleet::FleetAction),
}

/// A snapshot of the core's tables and counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Control connections held (logged in or not).
    pub connections: usize,
    pub logged_in: usize,
    /// Two-party calls in any state (ringing, setting up, up).
    pub calls: usize,
    /// Two-party calls whose media is up.
    pub calls_up: usize,
    pub rooms: usize,
    /// Members of all rooms (invited or joined).
    pub room_members: usize,
    pub probes_running: usize,
    /// Directory look-ups waiting for their answer.
    pub lookups_pending: usize,
    /// Relay sessions installed (or being installed), per shard.
    pub shard_sessions: Vec<usize>,
    pub draining: bool,
    /// Since start: successful log-ins.
    pub logins: u64,
    /// Since start: failed log-ins (wrong password, unknown user, bad proof).
    pub failed_logins: u64,
    /// Since start: log-ins refused by the rate limiter (at `hello`, before any work).
    pub rate_limited: u64,
    /// Since start: calls and rooms placed.
    pub calls_placed: u64,
    /// Since start: calls ended by media failure or a set-up error.
    pub calls_failed: u64,
    /// Since start: probe verdicts, planned paths, end reasons.
    pub tally: super::tally::Tally,
    /// Since start: dials, rings and invitations refused by the call limits.
    pub calls_limited: u64,
}

/// A logged-in client.
pub(crate) struct Session {
    pub user: String,
    pub number: String,
    pub key: SessionKey,
    pub presence: Presence,
    /// The probe running now, if any.
    pub probe: Option<Probe>,
    pub last_probe_id: u32,
    /// The latest completed probe.
    pub result: Option<ProbeOutcome>,
    /// Calls and rooms this client takes part in.
    pub calls: CallSet,
    /// Its dials and conferences waiting for a directory answer (they count as calls).
    pub lookups: usize,
    /// [`crate::directory::Verifier::fingerprint`] of the verifier it logged in with: a
    /// password change ends the session.
    pub verifier_tag: [u8; 32],
    /// Its class of service: number prefixes it may dial on telephone routes (`None`: any).
    pub allow_prefixes: Option<Vec<String>>,
}

/// The calls of one client: a handful at most (`max_calls_per_user`), so a sorted `Vec`
/// (8 bytes a call) rather than a tree (a 100-byte node for the first one).
#[derive(Debug, Default)]
pub(crate) struct CallSet(Vec<CallId>);

impl CallSet {
    pub fn insert(&mut self, id: CallId) {
        if let Err(i) = self.0.binary_search(&id) {
            self.0.insert(i, id);
        }
    }
    pub fn remove(&mut self, id: &CallId) {
        if let Ok(i) = self.0.binary_search(id) {
            self.0.remove(i);
        }
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
    }
    #[cfg(test)]
    pub fn contains(&self, id: &CallId) -> bool {
        self.0.binary_search(id).is_ok()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> std::slice::Iter<'_, CallId> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a CallSet {
    type Item = &'a CallId;
    type IntoIter = std::slice::Iter<'a, CallId>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

pub(crate) enum Phase {
    AwaitingHello,
    /// `hello` taken; the directory is being asked for the user's verifier.
    AwaitingLookup {
        user: String,
        nonce: String,
    },
    AwaitingProof {
        attempt: Box<ServerAwaitingProof>,
        /// The subscriber's number, when the user exists.
        number: Option<String>,
        /// Its verifier's fingerprint, when the user exists.
        verifier_tag: Option<[u8; 32]>,
        /// Its class of service (`None`: any route, or no such user).
        allow_prefixes: Option<Vec<String>>,
    },
    LoggedIn(Box<Session>),
}

pub(crate) struct Conn {
    /// The client as seen (canonical: v4-mapped addresses as IPv4).
    pub peer: SocketAddr,
    /// The gateway address the client connected to (canonical).
    pub local: SocketAddr,
    pub opened: Instant,
    pub phase: Phase,
    /// The connection's TLS exporter value (RFC 9266), when it runs over TLS: a log-in bound
    /// to TLS must carry it ([`Input::TlsChannel`]).
    pub tls_exporter: Option<Vec<u8>>,
}

/// Timers; each entity has at most one of each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Log-in deadline, then presence.
    Conn(ConnId),
    /// The next step of the connection's probe.
    Probe(ConnId),
    /// Ring timeout of a call or room.
    Call(CallId),
    /// Ask the directory what changed.
    DirectoryPoll,
    /// A route call's maximum duration.
    CallLimit(CallId),
    /// A dial to a subscriber on another node waits for that node's answer until then.
    FleetRing(CallId),
    /// A virtual connection whose party's gateway is gone waits for a `resume` until then.
    FleetOrphan(ConnId),
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    by_time: BTreeSet<(Instant, Timer)>,
    by_key: HashMap<Timer, Instant>,
}

impl Timers {
    pub fn set(&mut self, t: Timer, at: Instant) {
        if let Some(old) = self.by_key.insert(t, at) {
            self.by_time.remove(&(old, t));
        }
        self.by_time.insert((at, t));
    }

    pub fn cancel(&mut self, t: Timer) {
        if let Some(old) = self.by_key.remove(&t) {
            self.by_time.remove(&(old, t));
        }
    }

    fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns the timers due at `now`.
    fn take_due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while let Some(&(at, t)) = self.by_time.first() {
            if at > now {
                break;
            }
            self.by_time.pop_first();
            self.by_key.remove(&t);
            due.push(t);
        }
        due
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    #[cfg(test)]
    pub fn contains(&self, t: Timer) -> bool {
        self.by_key.contains_key(&t)
    }
}

/// `t + d`, saturating (the config is sanitized, so this never saturates in practice).
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

pub(crate) fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Lower-case hex of `n` random bytes.
pub(crate) fn random_hex(rng: &mut StdRng, n: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = vec![0u8; n];
    rng.fill_bytes(&mut bytes);
    let mut s = String::with_capacity(2 * n);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub logins: u64,
    pub failed_logins: u64,
    pub rate_limited: u64,
    pub calls_placed: u64,
    pub calls_failed: u64,
    pub tally: super::tally::Tally,
    pub calls_limited: u64,
    /// Anonymous STUN Bindings on the probe ports left unanswered by the per-prefix limit.
    pub probe_rate_limited: u64,
}

/// The control core. See the module docs.
pub struct Gateway {
    pub(crate) cfg: GatewayConfig,
    /// Directory look-ups waiting for their answer, by id.
    pub(crate) lookups: HashMap<u64, super::lookup::Pending>,
    /// Dials and conferences waiting for a look-up: call id → look-up id.
    pub(crate) pending_calls: HashMap<CallId, u64>,
    pub(crate) next_lookup: u64,
    /// The iteration count most stored verifiers have, once the directory said.
    pub(crate) typical_iterations: Option<u32>,
    /// Route calls with their limits running, and when each was placed.
    pub(crate) route_watch: HashMap<CallId, Instant>,
    /// The directory's change-log position seen last (`None` until it answered once).
    pub(crate) directory_seq: Option<u64>,
    /// A change poll is asked or timed (false: the next `handle_timeout` asks again).
    pub(crate) directory_poll_armed: bool,
    /// Log-ins in progress whose user changed in the directory meanwhile: checked against the
    /// directory again as soon as they complete (their record may or may not predate the change).
    pub(crate) recheck_after_login: HashSet<ConnId>,
    pub(crate) shards: Vec<ShardInfo>,
    /// Sessions installed (or being installed) per shard, by position in `shards`.
    pub(crate) shard_load: Vec<usize>,
    pub(crate) rng: StdRng,
    pub(crate) limiter: RateLimiter,
    /// Dial, ring and invitation limits.
    pub(crate) call_limits: super::limits::CallLimits,
    /// Rate-limit refusals, logged at a bounded rate.
    pub(crate) refusals: auth::RefusalLog,
    pub(crate) conns: HashMap<ConnId, Conn>,
    /// Logged-in users and their connection.
    pub(crate) users: HashMap<String, ConnId>,
    /// Logged-in users' numbers and their connection (`presence_query`).
    pub(crate) online_numbers: HashMap<String, ConnId>,
    /// Tokens of running probes.
    pub(crate) tokens: HashMap<String, ConnId>,
    /// Answers to anonymous STUN Bindings on the probe ports, limited per source prefix.
    pub(crate) probe_limiter: super::probe::ProbeLimiter,
    pub(crate) calls: HashMap<CallId, Call>,
    /// Installs waiting for [`Input::ShardInstalled`].
    pub(crate) ops: HashMap<u64, CallId>,
    /// Leg names in use.
    pub(crate) legs: HashSet<u128>,
    /// Telephone route media addresses in use, and by which call (one call at a time each:
    /// the relay binds a route's media address as the trusted source of one leg).
    pub(crate) route_busy: HashMap<SocketAddr, CallId>,
    pub(crate) timers: Timers,
    pub(crate) actions: VecDeque<Action>,
    pub(crate) next_call: CallId,
    pub(crate) next_op: u64,
    pub(crate) next_session: u64,
    pub(crate) draining: bool,
    /// After [`Input::Shutdown`]: every new connection is refused.
    pub(crate) shut: bool,
    pub(crate) counters: Counters,
    /// The words for the next `hang_up` of this call (why the gateway refused it).
    pub(crate) hangup_detail: Option<(CallId, String)>,
    /// Open call records (see [`super::records`]).
    pub(crate) records: HashMap<CallId, super::records::CallRecord>,
    /// The `now` of the latest input: when a call that ends without a `now` at hand ended.
    pub(crate) last_now: Option<Instant>,
    /// In a fleet: presence in Redis, calls across nodes ([`super::fleet`]).
    pub(crate) fleet: Option<Box<super::fleet::Fleet>>,
}

impl Gateway {
    /// A core with no connections. Its first action asks the directory for the typical
    /// verifier iteration count (for decoy challenges).
    pub fn new(cfg: GatewayConfig, mut shards: Vec<ShardInfo>, rng: StdRng) -> Self {
        let cfg = cfg.sanitized();
        shards.sort_by_key(|s| s.index);
        if cfg.auth.secret() == &[0u8; 32] {
            tracing::warn!(
                "the log-in decoy secret is all zeros: unknown users can be told from known ones; \
                 build the config with GatewayConfig::with_secret"
            );
        }
        let mut gw = Gateway {
            lookups: HashMap::new(),
            pending_calls: HashMap::new(),
            next_lookup: 1,
            typical_iterations: None,
            directory_seq: None,
            route_watch: HashMap::new(),
            directory_poll_armed: true,
            recheck_after_login: HashSet::new(),
            limiter: RateLimiter::new(cfg.rate_limit),
            refusals: auth::RefusalLog::new(REFUSAL_LOG_INTERVAL),
            call_limits: super::limits::CallLimits::new(cfg.call_limits),
            shard_load: vec![0; shards.len()],
            cfg,
            shards,
            rng,
            conns: HashMap::new(),
            users: HashMap::new(),
            online_numbers: HashMap::new(),
            tokens: HashMap::new(),
            probe_limiter: super::probe::ProbeLimiter::default(),
            calls: HashMap::new(),
            ops: HashMap::new(),
            legs: HashSet::new(),
            route_busy: HashMap::new(),
            timers: Timers::default(),
            actions: VecDeque::new(),
            next_call: 1,
            next_op: 1,
            next_session: 1,
            draining: false,
            shut: false,
            counters: Counters::default(),
            hangup_detail: None,
            records: HashMap::new(),
            last_now: None,
            fleet: None,
        };
        gw.ask(Query::TypicalIterations, super::lookup::Pending::Iterations);
        gw.ask(
            Query::Changes { since: None },
            super::lookup::Pending::Changes,
        );
        gw
    }

    /// Where call ids start (server: [`super::records::id_base`] of the start time, so ids
    /// are unique across restarts and gateways). Before any call; tests keep the default 1.
    pub fn set_id_base(&mut self, base: CallId) {
        self.next_call = base.clamp(1, super::records::ID_LIMIT - 1);
    }

    pub fn handle(&mut self, now: Instant, input: Input) {
        self.last_now = Some(now);
        match input {
            Input::Connected { conn, peer, local } => self.on_connected(now, conn, peer, local),
            Input::Message { conn, msg } => self.on_message(now, conn, msg),
            Input::BadMessage { conn, error } => {
                if self.conns.contains_key(&conn) {
                    tracing::debug!(conn, %error, "undecodable control message");
                    self.send(
                        conn,
                        ServerMsg::Error {
                            code: ErrorCode::BadMessage,
                            message: clip(&error),
                        },
                    );
                    self.drop_conn(now, conn, super::calls::Lost::PeerLost);
                }
            }
            Input::TlsChannel { conn, exporter } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.tls_exporter = Some(exporter);
                }
            }
            Input::Disconnected { conn } => {
                if self.conns.contains_key(&conn) && !self.fleet_keep_local(now, conn) {
                    self.forget_conn(now, conn, super::calls::Lost::PeerLost);
                }
            }
            Input::LegAddFailed {
                session,
                leg,
                error,
            } => self.on_leg_add_failed(now, session, &leg, &error),
            Input::MediaActivity { legs } => self.on_media_activity(now, &legs),
            Input::Flooding { conn, per_s } => {
                if self.conns.contains_key(&conn) {
                    tracing::info!(conn, per_s, "client sends too many messages: closing");
                    self.refuse(
                        now,
                        conn,
                        ErrorCode::RateLimited,
                        format!("more than {per_s} messages per second for too long"),
                        super::calls::Lost::PeerLost,
                    );
                }
            }
            Input::ProbeDatagram { port, src, data } => {
                self.on_probe_datagram(now, port, src, &data)
            }
            Input::ShardInstalled { op, result } => self.on_shard_installed(now, op, result),
            Input::LookupDone { id, result } => self.on_lookup_done(now, id, result),
            Input::Fleet(f) => self.on_fleet(now, f),
            Input::LegBound {
                session,
                leg,
                transport,
            } => self.on_leg_bound(now, session, &leg, transport),
            Input::Drain => {
                if !self.draining {
                    tracing::info!(
                        calls = self.calls.len(),
                        "draining: refusing new log-ins and calls"
                    );
                }
                self.draining = true;
            }
            Input::Shutdown => self.shutdown(now),
        }
        if self.draining && !self.shut {
            self.move_idle_clients(now);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        if !self.directory_poll_armed && !self.conns.is_empty() {
            self.directory_poll_armed = true;
            self.poll_directory();
        }
        for t in self.timers.take_due(now) {
            match t {
                Timer::Conn(conn) => self.on_conn_timer(now, conn),
                Timer::Probe(conn) => self.advance_probe(now, conn),
                Timer::Call(call) => self.on_call_timer(now, call),
                Timer::DirectoryPoll => self.poll_directory(),
                Timer::CallLimit(call) => self.on_call_limit(call),
                Timer::FleetRing(call) => self.on_fleet_ring_timer(now, call),
                Timer::FleetOrphan(vconn) => self.on_fleet_orphan_timer(now, vconn),
            }
        }
        if self.draining && !self.shut {
            self.move_idle_clients(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        loop {
            let Some(a) = self.actions.pop_front() else {
                // Nothing waits to be routed: virtual connections whose call ended can go.
                self.fleet_sweep();
                return self.actions.pop_front().and_then(|a| self.fleet_route(a));
            };
            if let Some(a) = self.fleet_route(a) {
                return Some(a);
            }
        }
    }

    /// Live reload. Takes effect at once for limits, the peer policy (`allow_private_peers`,
    /// `allowed_peers`, `denied_peers`), probe settings of
    /// probes started later, and presence deadlines (every connection's timer is re-armed);
    /// ring timers of calls already ringing keep their deadline. A changed rate-limit config
    /// starts from empty buckets.
    pub fn set_config(&mut self, cfg: GatewayConfig) {
        let cfg = cfg.sanitized();
        if cfg.rate_limit != self.cfg.rate_limit {
            self.limiter = RateLimiter::new(cfg.rate_limit);
        }
        self.call_limits.set_config(cfg.call_limits);
        self.cfg = cfg;
        self.apply_typical_iterations();
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.arm_conn_timer(conn);
        }
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.cfg
    }

    pub fn stats(&self) -> GatewayStats {
        let mut s = GatewayStats {
            connections: self.conns.len(),
            logged_in: self.users.len(),
            probes_running: self.tokens.len(),
            lookups_pending: self.lookups.len(),
            shard_sessions: self.shard_load.clone(),
            draining: self.draining,
            logins: self.counters.logins,
            failed_logins: self.counters.failed_logins,
            rate_limited: self.counters.rate_limited,
            calls_placed: self.counters.calls_placed,
            calls_failed: self.counters.calls_failed,
            tally: self.counters.tally.clone(),
            calls_limited: self.counters.calls_limited,
            ..GatewayStats::default()
        };
        for call in self.calls.values() {
            match call {
                Call::Pair(p) => {
                    s.calls += 1;
                    s.calls_up += usize::from(p.is_up());
                }
                Call::Room(r) => {
                    s.rooms += 1;
                    s.room_members += r.members.len();
                }
            }
        }
        s
    }

    /// Calls and rooms in any state (the server drains until this is zero).
    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    // ------------------------------------------------------------------ helpers

    pub(crate) fn send(&mut self, conn: ConnId, msg: ServerMsg) {
        self.actions.push_back(Action::Send { conn, msg });
    }

    pub(crate) fn error(&mut self, conn: ConnId, code: ErrorCode, message: impl Into<String>) {
        self.send(
            conn,
            ServerMsg::Error {
                code,
                message: message.into(),
            },
        );
    }

    pub(crate) fn session(&self, conn: ConnId) -> Option<&Session> {
        match &self.conns.get(&conn)?.phase {
            Phase::LoggedIn(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        match &mut self.conns.get_mut(&conn)?.phase {
            Phase::LoggedIn(s) => Some(s),
            _ => None,
        }
    }

    /// A leg name no live leg has: 32 hex characters.
    /// A fresh leg name: 128 random bits as 32 hex digits (the set holds the bits, not text).
    pub(crate) fn new_leg_name(&mut self) -> String {
        loop {
            let mut b = [0u8; 16];
            self.rng.fill_bytes(&mut b);
            let bits = u128::from_be_bytes(b);
            if self.legs.insert(bits) {
                return format!("{bits:032x}");
            }
        }
    }

    /// The leg names in use, as text.
    #[cfg(test)]
    pub(crate) fn leg_names(&self) -> HashSet<String> {
        self.legs.iter().map(|b| format!("{b:032x}")).collect()
    }

    pub(crate) fn release_leg(&mut self, name: &str) {
        if let Ok(bits) = u128::from_str_radix(name, 16) {
            self.legs.remove(&bits);
        }
    }

    pub(crate) fn new_call_id(&mut self) -> CallId {
        let id = self.next_call;
        self.next_call = super::records::next_id(id);
        id
    }

    pub(crate) fn new_op(&mut self) -> u64 {
        let op = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        op
    }

    /// The shard index the server knows a shard by (`ShardInfo::index`), from its position.
    pub(crate) fn shard_id(&self, pos: usize) -> usize {
        self.shards.get(pos).map_or(pos, |s| s.index)
    }

    /// The least loaded shard's position (ties: lowest index; `shards` is sorted by index).
    pub(crate) fn pick_shard(&self) -> Option<usize> {
        self.shard_load
            .iter()
            .enumerate()
            .min_by_key(|&(i, load)| (*load, i))
            .map(|(i, _)| i)
    }

    // ------------------------------------------------------------ connections

    fn on_connected(&mut self, now: Instant, conn: ConnId, peer: SocketAddr, local: SocketAddr) {
        if self.conns.contains_key(&conn) {
            tracing::warn!(conn, "duplicate connection id from the server: ignored");
            return;
        }
        if self.shut || self.conns.len() >= self.cfg.max_connections {
            self.send(
                conn,
                ServerMsg::Refused {
                    code: ErrorCode::Unavailable,
                    message: if self.shut {
                        "the gateway is shutting down".into()
                    } else {
                        "the gateway is at capacity".into()
                    },
                },
            );
            self.actions.push_back(Action::Close { conn });
            return;
        }
        self.conns.insert(
            conn,
            Conn {
                peer: canonical(peer),
                local: canonical(local),
                opened: now,
                phase: Phase::AwaitingHello,
                tls_exporter: None,
            },
        );
        if !self.directory_poll_armed {
            self.directory_poll_armed = true;
            self.poll_directory();
        }
        self.arm_conn_timer(conn);
    }

    /// Sends `refused` and closes, ending the client's calls (`lost` tells its peers why).
    pub(crate) fn refuse(
        &mut self,
        now: Instant,
        conn: ConnId,
        code: ErrorCode,
        message: impl Into<String>,
        lost: super::calls::Lost,
    ) {
        self.send(
            conn,
            ServerMsg::Refused {
                code,
                message: message.into(),
            },
        );
        self.drop_conn(now, conn, lost);
    }

    /// Closes a connection and forgets it.
    pub(crate) fn drop_conn(&mut self, now: Instant, conn: ConnId, lost: super::calls::Lost) {
        self.actions.push_back(Action::Close { conn });
        self.forget_conn(now, conn, lost);
    }

    /// Forgets a connection: ends its calls, stops its probe and timers.
    pub(crate) fn forget_conn(&mut self, now: Instant, conn: ConnId, lost: super::calls::Lost) {
        if self.fleet.is_some() {
            let user = self
                .session(conn)
                .filter(|s| self.users.get(&s.user) == Some(&conn))
                .map(|s| s.user.clone());
            self.fleet_conn_gone(conn, user.as_deref());
        }
        if self.session(conn).is_some() {
            self.party_lost(now, conn, lost);
        }
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.recheck_after_login.remove(&conn);
        if self.conns.is_empty() {
            // Nobody left to revoke: the next connection polls the directory again.
            self.timers.cancel(Timer::DirectoryPoll);
            self.directory_poll_armed = false;
        }
        self.timers.cancel(Timer::Conn(conn));
        self.timers.cancel(Timer::Probe(conn));
        if let Phase::LoggedIn(s) = c.phase {
            if let Some(p) = &s.probe {
                self.tokens.remove(&p.token);
            }
            if self.users.get(&s.user) == Some(&conn) {
                self.users.remove(&s.user);
            }
            if self.online_numbers.get(&s.number) == Some(&conn) {
                self.online_numbers.remove(&s.number);
            }
            tracing::info!(conn, user = %s.user, "logged out");
        }
        // Rings that waited for its probe are answered now: it is gone (offline), or the
        // subscriber is logged in again on another connection (rung there).
        self.fleet_probe_done(conn);
    }

    /// Arms the connection's timer: its log-in deadline, or its next presence deadline (a
    /// deadline already past fires on the next `handle_timeout`).
    pub(crate) fn arm_conn_timer(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if self.is_virtual(conn) {
            return; // its presence is its own node's business
        }
        let at = match &c.phase {
            Phase::LoggedIn(s) => s.presence.next_deadline(self.cfg.cadence()),
            _ => later(c.opened, self.cfg.login_timeout),
        };
        self.timers.set(Timer::Conn(conn), at);
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) {
        let Some(c) = self.conns.get_mut(&conn) else {
            tracing::debug!(conn, "message for an unknown connection: ignored");
            return;
        };
        let logged_in = match &mut c.phase {
            Phase::LoggedIn(s) => {
                // Any message counts as life.
                s.presence.heard(now);
                true
            }
            _ => false,
        };
        if !logged_in {
            return self.on_login_message(now, conn, msg);
        }
        if self.fleet.is_some() {
            if self.fleet_from_phone(conn, &msg) {
                return;
            }
            if let ClientMsg::HangUp { call } = msg
                && self.fleet_cancel_dial(conn, call)
            {
                return;
            }
        }
        match msg {
            ClientMsg::Hello { .. } | ClientMsg::Proof { .. } => {
                self.error(conn, ErrorCode::BadMessage, "already logged in");
            }
            ClientMsg::Heartbeat { seq } => self.send(conn, ServerMsg::HeartbeatAck { seq }),
            ClientMsg::ProbeLocal { probe, local } => self.on_probe_local(now, conn, probe, local),
            ClientMsg::ProbeReport {
                probe,
                got_a,
                got_b,
            } => self.on_probe_report(now, conn, probe, got_a, got_b),
            ClientMsg::Reprobe => self.start_probe(now, conn),
            ClientMsg::Dial { tag, number, media } => self.on_dial(now, conn, tag, &number, media),
            ClientMsg::Conference {
                tag,
                numbers,
                media,
            } => self.on_conference(now, conn, tag, &numbers, media),
            ClientMsg::Accept { call, media } => {
                self.note_answer(now, conn, call);
                self.on_accept(now, conn, call, media)
            }
            ClientMsg::Reject { call } => self.on_reject(now, conn, call),
            ClientMsg::HangUp { call } if self.cancel_pending_call(conn, call) => {}
            ClientMsg::HangUp { call } => self.on_hang_up(now, conn, call),
            ClientMsg::MediaTrouble { call } => self.on_media_trouble(now, conn, call),
            ClientMsg::Bye => self.drop_conn(now, conn, super::calls::Lost::Normal),
            ClientMsg::PresenceQuery { numbers } => self.on_presence_query(conn, &numbers),
            ClientMsg::Resume { call, token } => self.on_resume(conn, call, &token),
        }
    }

    /// `presence_query`: which of these numbers are logged in here now (heart-beats keep a
    /// session; a silent one is dropped, see `presence`). At most
    /// [`crate::wire::control::MAX_PRESENCE_NUMBERS`] numbers, checked before any look-up.
    fn on_presence_query(&mut self, conn: ConnId, numbers: &[String]) {
        let max = crate::wire::control::MAX_PRESENCE_NUMBERS;
        if numbers.len() > max {
            let msg = format!("a presence_query asks about at most {max} numbers");
            return self.error(conn, ErrorCode::BadMessage, &msg);
        }
        let online = numbers
            .iter()
            .filter(|n| self.online_numbers.contains_key(n.as_str()))
            .cloned()
            .collect();
        self.send(conn, ServerMsg::Presence { online });
    }

    // ------------------------------------------------------------------ log-in

    fn on_login_message(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) {
        let phase = self.conns.get(&conn).map(|c| &c.phase);
        let awaiting_hello = matches!(phase, Some(Phase::AwaitingHello));
        let awaiting_proof = matches!(phase, Some(Phase::AwaitingProof { .. }));
        match msg {
            ClientMsg::Hello {
                version,
                user,
                nonce,
                ..
            } if awaiting_hello => self.on_hello(now, conn, version, user, nonce),
            ClientMsg::Proof {
                channel_binding,
                nonce,
                proof,
            } if awaiting_proof => self.on_proof(now, conn, channel_binding, nonce, &proof),
            ClientMsg::Bye => self.drop_conn(now, conn, super::calls::Lost::Normal),
            other => {
                let what = client_msg_name(&other);
                self.error(
                    conn,
                    ErrorCode::BadMessage,
                    format!("{what} is not valid before log-in completes"),
                );
                self.drop_conn(now, conn, super::calls::Lost::PeerLost);
            }
        }
    }

    fn on_hello(&mut self, now: Instant, conn: ConnId, version: u16, user: String, nonce: String) {
        use super::calls::Lost;
        let Some(peer) = self.conns.get(&conn).map(|c| c.peer) else {
            return;
        };
        if version != VERSION {
            let msg = format!("this gateway speaks protocol version {VERSION}, not {version}");
            return self.refuse(now, conn, ErrorCode::Version, msg, Lost::PeerLost);
        }
        if self.draining {
            let msg = "the gateway is draining; log in elsewhere";
            return self.refuse(now, conn, ErrorCode::Unavailable, msg, Lost::PeerLost);
        }
        if let Err(e) = auth::validate_user(&user) {
            return self.refuse(
                now,
                conn,
                ErrorCode::BadMessage,
                e.to_string(),
                Lost::PeerLost,
            );
        }
        // Charged now, before the store or any key derivation: a pending attempt counts.
        let exempt = super::limits::exempt(&self.cfg.exempt_sources, peer.ip());
        let charged = if exempt {
            Ok(())
        } else {
            self.limiter.begin(now, peer.ip(), &user)
        };
        if let Err(limited) = charged {
            self.counters.rate_limited += 1;
            if let Some(n) = self.refusals.note(now, limited.scope) {
                tracing::info!(
                    source = n.source,
                    user_at_source = n.user_at_source,
                    user = n.user,
                    last_peer = %peer,
                    last_scope = %limited.scope,
                    "log-ins refused by the rate limiter (counts since the last such line)"
                );
            }
            return self.refuse(
                now,
                conn,
                ErrorCode::RateLimited,
                limited.to_string(),
                Lost::PeerLost,
            );
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = Phase::AwaitingLookup {
                user: user.clone(),
                nonce,
            };
        }
        let pending = super::lookup::Pending::Login { conn };
        if self.ask(Query::Login { user }, pending).is_none() {
            let msg = "the directory is busy; try again shortly";
            self.refuse(now, conn, ErrorCode::Unavailable, msg, Lost::PeerLost);
        }
    }

    /// The directory answered the look-up of a `hello`: challenge the client (a decoy
    /// challenge for an unknown user).
    pub(crate) fn hello_answered(
        &mut self,
        now: Instant,
        conn: ConnId,
        subscriber: Result<Option<crate::directory::Subscriber>, LookupError>,
    ) {
        use super::calls::Lost;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Phase::AwaitingLookup { user, nonce } =
            std::mem::replace(&mut c.phase, Phase::AwaitingHello)
        else {
            return;
        };
        let subscriber = match subscriber {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(conn, error = %e, "directory look-up failed during log-in");
                // `unavailable`, like a gateway at capacity: the client may retry, here or at
                // another gateway of the fleet; the reason is in the log line above.
                let msg = "the directory is unavailable";
                return self.refuse(now, conn, ErrorCode::Unavailable, msg, Lost::PeerLost);
            }
        };
        // Defence in depth: the answer must be for the user asked about.
        let subscriber = subscriber.filter(|s| s.user == user);
        let hello = auth::Hello {
            user,
            client_nonce: nonce,
        };
        let started = ServerFirst::new(
            &self.cfg.auth,
            &hello,
            subscriber.as_ref().map(|s| &s.verifier),
            &mut self.rng,
        );
        match started {
            Ok((attempt, challenge)) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.phase = Phase::AwaitingProof {
                        attempt: Box::new(attempt),
                        verifier_tag: subscriber.as_ref().map(|s| s.verifier.fingerprint()),
                        allow_prefixes: subscriber.as_ref().and_then(|s| s.allow_prefixes.clone()),
                        number: subscriber.map(|s| s.number),
                    };
                }
                self.send(
                    conn,
                    ServerMsg::Challenge {
                        nonce: challenge.server_nonce,
                        salt: BASE64.encode(&challenge.salt),
                        iterations: challenge.iterations,
                    },
                );
            }
            // Malformed nonce (the user name was checked above): nothing secret to hide.
            Err(e) => self.refuse(
                now,
                conn,
                ErrorCode::BadMessage,
                e.to_string(),
                Lost::PeerLost,
            ),
        }
    }

    fn on_proof(
        &mut self,
        now: Instant,
        conn: ConnId,
        channel_binding: String,
        nonce: String,
        proof: &str,
    ) {
        use super::calls::Lost;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let (peer, local) = (c.peer, c.local);
        let tls_exporter = c.tls_exporter.clone();
        let Phase::AwaitingProof {
            attempt,
            number,
            verifier_tag,
            allow_prefixes,
        } = std::mem::replace(&mut c.phase, Phase::AwaitingHello)
        else {
            return;
        };
        let user = attempt.user().to_owned();
        // A proof that is not base64 is checked like a wrong one (same work, same answer).
        let proof = BASE64.decode(proof.as_bytes()).unwrap_or_default();
        let verdict = attempt.verify_bound(
            &auth::ClientProof {
                channel_binding,
                nonce,
                proof,
            },
            tls_exporter.as_deref(),
        );
        let (signature, key, number, verifier_tag) = match (verdict, number, verifier_tag) {
            (Ok((sig, key)), Some(number), Some(tag)) => (sig, key, number, tag),
            (verdict, _, _) => {
                // A channel-binding failure says nothing about the password: say what it is.
                let binding = matches!(
                    verdict,
                    Err(auth::AuthError::ChannelBindingMismatch
                        | auth::AuthError::ChannelBindingUnavailable)
                );
                let msg = match &verdict {
                    Err(e) if binding => e.to_string(),
                    _ => "wrong user or password".to_owned(),
                };
                if let Err(e) = verdict {
                    tracing::info!(conn, %peer, %user, reason = %e, "log-in failed");
                }
                // The attempt was charged at `hello`; the charge stays.
                self.counters.failed_logins += 1;
                return self.refuse(now, conn, ErrorCode::AuthFailed, msg, Lost::PeerLost);
            }
        };
        if self.draining {
            let msg = "the gateway is draining; log in elsewhere";
            return self.refuse(now, conn, ErrorCode::Unavailable, msg, Lost::PeerLost);
        }
        // One session per user: the new log-in replaces the old one (a stand-in for the user
        // in a call another node hosted stays: the user may `resume` that call here).
        if let Some(&old) = self.users.get(&user)
            && old != conn
            && !self.is_virtual(old)
        {
            tracing::info!(conn, old, %user, "log-in replaces an older session");
            self.replace_session(now, old, "the same user logged in elsewhere");
        }
        let session_id = self.next_session;
        self.next_session += 1;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.phase = Phase::LoggedIn(Box::new(Session {
            user: user.clone(),
            number: number.clone(),
            key,
            presence: Presence::new(now),
            probe: None,
            last_probe_id: 0,
            result: None,
            calls: CallSet::default(),
            lookups: 0,
            verifier_tag,
            allow_prefixes,
        }));
        self.users.insert(user.clone(), conn);
        self.fleet_online(&user);
        self.online_numbers.insert(number.clone(), conn);
        let user_for_recheck = user.clone();
        self.limiter.succeeded(now, peer.ip(), &user);
        self.counters.logins += 1;
        tracing::info!(conn, %peer, %local, %user, "logged in");
        self.send(
            conn,
            ServerMsg::Welcome {
                session: session_id,
                signature: BASE64.encode(&signature.signature),
                user,
                number,
                heartbeat_ms: millis(self.cfg.heartbeat),
                misses: self.cfg.misses,
                observed: peer,
            },
        );
        if self.recheck_after_login.remove(&conn) {
            self.recheck_session(now, conn, user_for_recheck);
        }
        self.arm_conn_timer(conn);
        self.start_probe(now, conn);
    }

    // ------------------------------------------------------------------ timers

    fn on_conn_timer(&mut self, now: Instant, conn: ConnId) {
        use super::presence::Due;
        let cadence = self.cfg.cadence();
        let login_timeout = self.cfg.login_timeout;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match &mut c.phase {
            Phase::LoggedIn(s) => match s.presence.due(now, cadence) {
                Due::Nothing => {}
                Due::Poll(seq) => self.send(conn, ServerMsg::Poll { seq }),
                Due::Offline => {
                    tracing::info!(conn, user = %s.user, "missed heart-beats: offline");
                    if self.fleet_keep_local(now, conn) {
                        return self.actions.push_back(Action::Close { conn });
                    }
                    return self.refuse(
                        now,
                        conn,
                        ErrorCode::Timeout,
                        "no heart-beat: the gateway considers this client offline",
                        super::calls::Lost::PeerLost,
                    );
                }
            },
            _ => {
                if now >= later(c.opened, login_timeout) {
                    return self.refuse(
                        now,
                        conn,
                        ErrorCode::Timeout,
                        "log-in not completed in time",
                        super::calls::Lost::PeerLost,
                    );
                }
            }
        }
        self.arm_conn_timer(conn);
    }

    // ---------------------------------------------------------------- shutdown

    /// While draining: every logged-in client with no call (and no dial waiting for the
    /// directory) is sent `going_away` and closed, so that it logs in to another gateway; a
    /// client in a call gets it when its last call ends. Scans the connections: while draining
    /// only clients in calls remain after the first pass.
    fn move_idle_clients(&mut self, now: Instant) {
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match &c.phase {
                // A remote callee's virtual connection (the fleet) is not a phone of ours.
                Phase::LoggedIn(s)
                    if s.calls.is_empty() && s.lookups == 0 && !self.is_virtual(*id) =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for conn in idle {
            tracing::debug!(conn, "draining: moving the client to another gateway");
            self.send(
                conn,
                ServerMsg::GoingAway {
                    message: "the gateway is draining for a restart; log in to another gateway"
                        .into(),
                    gateways: self.cfg.drain_redirect.clone(),
                },
            );
            self.drop_conn(now, conn, super::calls::Lost::Normal);
        }
    }

    fn shutdown(&mut self, now: Instant) {
        tracing::info!(
            connections = self.conns.len(),
            calls = self.calls.len(),
            "shutting down: ending every call"
        );
        self.draining = true;
        self.shut = true;
        let calls: Vec<CallId> = self.calls.keys().copied().collect();
        for id in calls {
            self.end_call(now, id, crate::wire::control::HangupReason::Shutdown);
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.refuse(
                now,
                conn,
                ErrorCode::Unavailable,
                "the gateway is shutting down",
                super::calls::Lost::Normal,
            );
        }
    }

    /// Builds a [`LegSpec`] keyed for a client's session.
    pub(crate) fn leg_spec(
        key: &SessionKey,
        name: &str,
        delivery: crate::relay_spec::Delivery,
    ) -> LegSpec {
        LegSpec {
            name: name.to_owned(),
            key: super::leg_key(key, name),
            delivery,
            trusted_source: None,
            clock_rate: super::media::CLOCK_RATE,
        }
    }
}

/// The message's `type`, for error texts.
fn client_msg_name(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Hello { .. } => "hello",
        ClientMsg::Proof { .. } => "proof",
        ClientMsg::Heartbeat { .. } => "heartbeat",
        ClientMsg::ProbeLocal { .. } => "probe_local",
        ClientMsg::ProbeReport { .. } => "probe_report",
        ClientMsg::Reprobe => "reprobe",
        ClientMsg::Dial { .. } => "dial",
        ClientMsg::Conference { .. } => "conference",
        ClientMsg::Accept { .. } => "accept",
        ClientMsg::Reject { .. } => "reject",
        ClientMsg::HangUp { .. } => "hang_up",
        ClientMsg::MediaTrouble { .. } => "media_trouble",
        ClientMsg::Bye => "bye",
        ClientMsg::PresenceQuery { .. } => "presence_query",
        ClientMsg::Resume { .. } => "resume",
    }
}

/// Keeps peer-supplied text in error messages short and printable.
fn clip(s: &str) -> String {
    let mut s: String = s.chars().take(400).collect();
    s.retain(|c| !c.is_control());
    s
}

#[cfg(test)]
mod abuse_tests;
#[cfg(test)]
mod tests;
