//! Test harness: a `World` that plays the server and any number of clients against one
//! [`Gateway`], on a virtual clock (like `quinn-proto`'s `tests/util.rs` `Pair`). Clients log
//! in with real SCRAM ([`auth::ClientFirst`]), answer probes through a simulated firewall, and
//! the shard is simulated by answering installs. After every input the gateway's internal
//! invariants are checked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::auth::{self, SessionKey, Verifier};
use super::calls::{Call, Far, MemberState};
use super::gateway::{
    Action, ConnId, Gateway, GatewayConfig, Input, Phase, ProbePort, ShardInfo, Timer,
};
use super::planner::Capabilities;
use super::probe::ProbeOutcome;
use crate::net::canonical;
use crate::store::{Route, SqliteStore, Store, Subscriber};
use crate::wire::control::{
    CallId, ClientMsg, HangupReason, MediaInstructions, ServerMsg, VERSION,
};
use crate::wire::stun;

pub const PASSWORD: &str = "correct horse";
/// The gateway address clients connect to.
pub const GW: &str = "192.0.2.1:7400";
/// Registered users, their numbers, and the public IP each connects from.
pub const USERS: [(&str, &str, &str); 8] = [
    ("alice", "+15550001", "198.51.100.1"),
    ("bob", "+15550002", "198.51.100.2"),
    ("carol", "+15550003", "198.51.100.3"),
    ("dave", "+15550004", "198.51.100.4"),
    ("erin", "+15550005", "198.51.100.5"),
    ("frank", "+15550006", "198.51.100.6"),
    ("grace", "+15550007", "198.51.100.7"),
    ("heidi", "+15550008", "198.51.100.8"),
];
/// A telephone route: `+49…` to an IP voice gateway.
pub const ROUTE_PREFIX: &str = "+49";
pub const ROUTE_MEDIA: &str = "203.0.113.50:5004";
/// Local UDP port of every client's probe and media sockets.
pub const PROBE_PORT: u16 = 40000;
pub const MEDIA_PORT: u16 = 41000;

pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

pub fn shards() -> Vec<ShardInfo> {
    vec![
        ShardInfo {
            index: 0,
            udp_port: 7401,
            tcp_port: 7401,
        },
        ShardInfo {
            index: 1,
            udp_port: 7402,
            tcp_port: 7402,
        },
    ]
}

/// The config tests use: 1 SCRAM iteration (fast), otherwise the defaults.
/// Call limits are generous (tests of other things dial in quick loops); the tests of the
/// limits set their own.
pub fn config() -> GatewayConfig {
    let pace = super::limits::Pace {
        burst: 1000,
        every: Duration::from_millis(1),
    };
    GatewayConfig {
        scram_iterations: 1,
        call_limits: super::limits::CallLimitConfig {
            dials: pace,
            rings_per_pair: pace,
            rings_per_callee: pace,
            invites: pace,
        },
        ..GatewayConfig::with_secret([7; 32])
    }
}

/// What a client's firewall (and NAT) lets through, for the probe simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Firewall {
    pub send_udp: bool,
    /// Admits datagrams from probe port A (replies to the client's Binding, or unsolicited if
    /// the client sent nothing).
    pub from_a: bool,
    /// Admits datagrams from probe port B (never a reply: the client did not send to it).
    pub from_b: bool,
    pub nat: bool,
}

pub const OPEN: Firewall = Firewall {
    send_udp: true,
    from_a: true,
    from_b: true,
    nat: false,
};
pub const SEND_ONLY: Firewall = Firewall {
    send_udp: true,
    from_a: false,
    from_b: false,
    nat: false,
};
pub const RECV_ONLY: Firewall = Firewall {
    send_udp: false,
    from_a: true,
    from_b: true,
    nat: false,
};
pub const BLOCKED: Firewall = Firewall {
    send_udp: false,
    from_a: false,
    from_b: false,
    nat: false,
};
/// Port-restricted NAT: replies to the Binding come back, nothing else.
pub const NAT: Firewall = Firewall {
    send_udp: true,
    from_a: true,
    from_b: false,
    nat: true,
};
/// Full-cone NAT.
pub const NAT_OPEN: Firewall = Firewall {
    send_udp: true,
    from_a: true,
    from_b: true,
    nat: true,
};
/// A stateful firewall without translation: only replies come in.
pub const REPLY_ONLY: Firewall = Firewall {
    send_udp: true,
    from_a: true,
    from_b: false,
    nat: false,
};

/// A logged-in simulated client.
#[derive(Clone, Debug)]
pub struct Client {
    pub conn: ConnId,
    pub number: &'static str,
    /// The control connection as the gateway sees it.
    pub peer: SocketAddr,
    pub key: SessionKey,
    pub fw: Firewall,
}

impl Client {
    /// The client's local UDP address for `port` (private behind NAT).
    pub fn local(&self, port: u16) -> SocketAddr {
        if self.fw.nat {
            let last = match self.peer.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 9,
            };
            SocketAddr::from(([10, 0, 0, last], port))
        } else {
            SocketAddr::new(self.peer.ip(), port)
        }
    }

    /// Where the client's UDP socket on `port` appears from outside.
    pub fn mapped(&self, port: u16) -> SocketAddr {
        if self.fw.nat {
            SocketAddr::new(self.peer.ip(), port + 20000)
        } else {
            self.local(port)
        }
    }

    pub fn media(&self) -> SocketAddr {
        self.local(MEDIA_PORT)
    }
}

pub struct World {
    pub gw: Gateway,
    pub now: Instant,
    pub rng: StdRng,
    next_conn: ConnId,
    pub inbox: HashMap<ConnId, VecDeque<ServerMsg>>,
    pub closed: HashSet<ConnId>,
    pub probe_out: Vec<(ProbePort, SocketAddr, Vec<u8>)>,
    pub shard_cmds: Vec<Action>,
    /// Records of ended calls, each with the number of shard commands before it (so a test
    /// can check what came first).
    pub ended: Vec<(usize, crate::control::records::CallRecord)>,
    /// Legs retired by re-plans (`Action::RetireLegs`), with the number of shard commands
    /// before each.
    pub retired: Vec<(usize, Vec<String>)>,
    /// Answer every install at once with this (None: leave installs pending).
    pub auto_install: Option<Result<(), String>>,
    pub pending_installs: Vec<u64>,
    /// Check internal invariants after each input.
    pub check: bool,
    /// The directory the gateway's look-ups are answered from.
    pub store: SqliteStore,
    /// Leave look-ups unanswered (in `held_lookups`) instead of answering them at once.
    pub hold_lookups: bool,
    pub held_lookups: Vec<(u64, crate::directory::Query)>,
}

impl World {
    pub fn new() -> World {
        Self::with_config(config())
    }

    pub fn with_config(cfg: GatewayConfig) -> World {
        Self::build(cfg, shards())
    }

    pub fn build(cfg: GatewayConfig, shards: Vec<ShardInfo>) -> World {
        let mut rng = StdRng::seed_from_u64(42);
        let mut store = SqliteStore::open_in_memory().expect("in-memory store");
        for (user, number, _) in USERS {
            store
                .add_user(&Subscriber {
                    user: user.into(),
                    number: number.into(),
                    verifier: Verifier::new(PASSWORD, 1, &mut rng),
                    allow_prefixes: None,
                })
                .expect("add user");
        }
        store
            .add_route(&Route {
                prefix: ROUTE_PREFIX.into(),
                media_addr: addr(ROUTE_MEDIA),
                description: "PSTN".into(),
                ports: 1,
            })
            .expect("add route");
        let t0 = Instant::now();
        World {
            gw: Gateway::new(cfg, shards, StdRng::seed_from_u64(7)),
            store,
            hold_lookups: false,
            held_lookups: Vec::new(),
            now: t0,
            rng,
            next_conn: 1,
            inbox: HashMap::new(),
            closed: HashSet::new(),
            probe_out: Vec::new(),
            shard_cmds: Vec::new(),
            ended: Vec::new(),
            retired: Vec::new(),
            auto_install: Some(Ok(())),
            pending_installs: Vec::new(),
            check: true,
        }
    }

    /// Carries out the gateway's actions.
    pub fn pump(&mut self) {
        loop {
            let mut installs = Vec::new();
            let mut answers = Vec::new();
            while let Some(a) = self.gw.poll_action() {
                match a {
                    Action::Send { conn, msg } => {
                        self.inbox.entry(conn).or_default().push_back(msg);
                    }
                    Action::Close { conn } => {
                        self.closed.insert(conn);
                    }
                    Action::ProbeSend { port, dst, data } => self.probe_out.push((port, dst, data)),
                    Action::InstallSession { op, .. } => {
                        installs.push(op);
                        self.shard_cmds.push(a);
                    }
                    Action::CallEnded(r) => self.ended.push((self.shard_cmds.len(), *r)),
                    Action::Lookup { id, query } => {
                        if self.hold_lookups {
                            self.held_lookups.push((id, query));
                        } else {
                            answers.push(self.answer(id, &query));
                        }
                    }
                    Action::RetireLegs { legs, .. } => {
                        self.retired.push((self.shard_cmds.len(), legs));
                    }
                    other => self.shard_cmds.push(other),
                }
            }
            if self.check {
                check_invariants(&self.gw);
            }
            let answered = !answers.is_empty();
            for a in answers {
                self.gw.handle(self.now, a);
            }
            if installs.is_empty() {
                if answered {
                    continue;
                }
                return;
            }
            match self.auto_install.clone() {
                Some(result) => {
                    for op in installs {
                        self.gw.handle(
                            self.now,
                            Input::ShardInstalled {
                                op,
                                result: result.clone(),
                            },
                        );
                    }
                }
                None => {
                    self.pending_installs.extend(installs);
                    return;
                }
            }
        }
    }

    /// The directory's answer to a look-up, as the server would give it.
    pub fn answer(&self, id: u64, query: &crate::directory::Query) -> Input {
        let result = crate::store::answer(&self.store, query)
            .map_err(|e| crate::directory::LookupError(e.to_string()));
        Input::LookupDone { id, result }
    }

    /// Answers the held look-ups now (in the order they were asked).
    pub fn release_lookups(&mut self) {
        let held = std::mem::take(&mut self.held_lookups);
        for (id, q) in held {
            let a = self.answer(id, &q);
            self.input(a);
        }
    }

    pub fn input(&mut self, input: Input) {
        self.gw.handle(self.now, input);
        self.pump();
    }

    pub fn send(&mut self, conn: ConnId, msg: ClientMsg) {
        self.input(Input::Message { conn, msg });
    }

    /// Moves the clock forward by `d`, firing every timer due on the way.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        let mut guard = 0;
        while let Some(t) = self.gw.poll_timeout() {
            if t > target {
                break;
            }
            guard += 1;
            assert!(guard < 100_000, "timer loop");
            self.now = self.now.max(t);
            self.gw.handle_timeout(self.now);
            self.pump();
        }
        self.now = target;
    }

    pub fn advance_ms(&mut self, ms: u64) {
        self.advance(Duration::from_millis(ms));
    }

    pub fn connect(&mut self, peer: SocketAddr) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.input(Input::Connected {
            conn,
            peer,
            local: addr(GW),
        });
        conn
    }

    pub fn take(&mut self, conn: ConnId) -> Vec<ServerMsg> {
        self.inbox
            .get_mut(&conn)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    pub fn take_probe_out(&mut self) -> Vec<(ProbePort, SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.probe_out)
    }

    pub fn take_shard(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.shard_cmds)
    }

    /// Starts a SCRAM log-in: returns the connection and the client's state after `hello`.
    pub fn hello(
        &mut self,
        user: &str,
        peer: SocketAddr,
    ) -> (ConnId, auth::ClientAwaitingChallenge) {
        let conn = self.connect(peer);
        let (state, hello) = auth::ClientFirst::with_config(
            user,
            auth::ClientConfig {
                min_iterations: 1,
                max_iterations: 10_000,
            },
            &mut self.rng,
        )
        .expect("valid user name");
        self.send(
            conn,
            ClientMsg::Hello {
                version: VERSION,
                user: user.into(),
                nonce: hello.client_nonce,
                software: None,
            },
        );
        (conn, state)
    }

    /// Answers the challenge in `conn`'s inbox with `password`; returns the proof message and
    /// the client's state.
    pub fn prove(
        &mut self,
        conn: ConnId,
        state: auth::ClientAwaitingChallenge,
        password: &str,
    ) -> (ClientMsg, auth::ClientAwaitingSignature) {
        let msgs = self.take(conn);
        let Some(ServerMsg::Challenge {
            nonce,
            salt,
            iterations,
        }) = msgs.into_iter().next()
        else {
            panic!("expected a challenge");
        };
        let challenge = auth::Challenge {
            server_nonce: nonce,
            salt: BASE64.decode(salt).expect("base64 salt"),
            iterations,
        };
        let (state, proof) = state
            .respond(password, &challenge)
            .expect("valid challenge");
        let msg = ClientMsg::Proof {
            channel_binding: proof.channel_binding.clone(),
            nonce: proof.nonce.clone(),
            proof: BASE64.encode(&proof.proof),
        };
        (msg, state)
    }

    /// Logs `user` in with the right password, from its usual IP; checks the gateway's
    /// signature. The probe that follows is left running (see [`World::probe`]).
    pub fn login_only(&mut self, user: &'static str) -> Client {
        let (_, number, ip) = USERS
            .iter()
            .copied()
            .find(|(u, ..)| *u == user)
            .expect("known user");
        let peer = SocketAddr::new(addr(&format!("{ip}:0")).ip(), 50000);
        let (conn, state) = self.hello(user, peer);
        let (proof, state) = self.prove(conn, state, PASSWORD);
        self.send(conn, proof);
        let mut msgs = self.take(conn).into_iter();
        let Some(ServerMsg::Welcome { signature, .. }) = msgs.next() else {
            panic!("expected welcome");
        };
        let key = state
            .verify_server(&auth::ServerSignature {
                signature: BASE64.decode(signature).expect("base64"),
            })
            .expect("the gateway proves itself");
        // Put the rest (probe_begin) back.
        let rest: Vec<ServerMsg> = msgs.collect();
        self.inbox.entry(conn).or_default().extend(rest);
        Client {
            conn,
            number,
            peer,
            key,
            fw: OPEN,
        }
    }

    /// Logs in and runs the first probe through `fw`.
    pub fn login(&mut self, user: &'static str, fw: Firewall) -> Client {
        let mut c = self.login_only(user);
        c.fw = fw;
        let out = self.probe(&c);
        assert!(out.reported);
        c
    }

    /// Logs in and sets the capabilities directly (skipping the probe).
    pub fn login_with(&mut self, user: &'static str, caps: Capabilities) -> Client {
        let mut c = self.login_only(user);
        c.fw = Firewall {
            send_udp: caps.send_udp,
            from_a: caps.recv_udp,
            from_b: caps.recv_udp,
            nat: caps.nat,
        };
        self.force_caps(c.conn, caps);
        self.take(c.conn);
        c
    }

    /// Replaces a client's probe result (ending any running probe silently).
    pub fn force_caps(&mut self, conn: ConnId, caps: Capabilities) {
        let gw = &mut self.gw;
        if let Some(c) = gw.conns.get_mut(&conn)
            && let Phase::LoggedIn(s) = &mut c.phase
        {
            if let Some(p) = s.probe.take() {
                gw.tokens.remove(&p.token);
                gw.timers.cancel(Timer::Probe(conn));
            }
            s.result = Some(ProbeOutcome {
                probe: s.last_probe_id,
                capabilities: caps,
                mapped: None,
                translated: caps.nat,
                reported: true,
            });
        }
    }

    /// The `probe_begin` in the client's inbox: (probe id, token). Other messages stay.
    pub fn probe_begin(&mut self, conn: ConnId) -> (u32, String) {
        let q = self.inbox.entry(conn).or_default();
        let i = q
            .iter()
            .position(|m| matches!(m, ServerMsg::ProbeBegin { .. }))
            .expect("probe_begin");
        match q.remove(i) {
            Some(ServerMsg::ProbeBegin { probe, token, .. }) => (probe, token),
            _ => unreachable!(),
        }
    }

    /// Sends the client's Binding request with `token` (if its firewall lets it out) and
    /// checks the gateway's answer.
    pub fn send_binding(&mut self, c: &Client, token: &str) {
        if !c.fw.send_udp {
            return;
        }
        let mut buf = [0u8; 256];
        let txid = [9u8; 12];
        let n = stun::write_binding_request(&mut buf, token.as_bytes(), token.as_bytes(), &txid)
            .expect("fits");
        let src = c.mapped(PROBE_PORT);
        self.input(Input::ProbeDatagram {
            port: ProbePort::A,
            src,
            data: buf[..n].to_vec(),
        });
        let out = self.take_probe_out();
        let resp = out
            .iter()
            .find(|(p, dst, d)| {
                *p == ProbePort::A
                    && *dst == src
                    && stun::Message::parse(d).is_ok_and(|m| m.class() == stun::Class::Success)
            })
            .cloned()
            .expect("a Binding response");
        assert_eq!(
            stun::check_binding_success(&resp.2, token.as_bytes(), &txid),
            Some(src),
            "response carries MI keyed by the token and the mapped address"
        );
        // Indications may already have gone out: keep them.
        self.probe_out
            .extend(out.into_iter().filter(|(_, _, d)| d != &resp.2));
    }

    /// Which of the probe's indications reached the client through its firewall.
    fn received(
        &self,
        c: &Client,
        token: &str,
        sent: &[(ProbePort, SocketAddr, Vec<u8>)],
    ) -> (bool, bool) {
        let (mut got_a, mut got_b) = (false, false);
        for (port, dst, data) in sent {
            let Ok(m) = stun::Message::parse(data) else {
                continue;
            };
            if m.class() != stun::Class::Indication
                || m.username() != Some(token.as_bytes())
                || m.check_integrity(token.as_bytes()).is_err()
                || m.check_fingerprint().is_err()
            {
                continue;
            }
            // A NAT without a mapping (the client sent nothing) drops everything; otherwise
            // the datagram must be aimed at the client's outside address.
            let reachable = *dst == c.mapped(PROBE_PORT) && (!c.fw.nat || c.fw.send_udp);
            match port {
                ProbePort::A if reachable && c.fw.from_a => got_a = true,
                ProbePort::B if reachable && c.fw.from_b => got_b = true,
                _ => {}
            }
        }
        (got_a, got_b)
    }

    /// Runs the client's pending probe through its firewall; returns the result.
    pub fn probe(&mut self, c: &Client) -> ProbeOutcome {
        let (probe, token) = self.probe_begin(c.conn);
        self.send_binding(c, &token);
        self.send(
            c.conn,
            ClientMsg::ProbeLocal {
                probe,
                local: c.local(PROBE_PORT),
            },
        );
        // Long enough for the bind wait and every round, short of the probe timeout.
        self.advance_ms(900);
        let sent = self.take_probe_out();
        let (got_a, got_b) = self.received(c, &token, &sent);
        let msgs = self.take(c.conn);
        assert!(
            msgs.iter()
                .any(|m| matches!(m, ServerMsg::ProbeCheck { probe: p, .. } if *p == probe)),
            "probe_check: {msgs:?}"
        );
        self.send(
            c.conn,
            ClientMsg::ProbeReport {
                probe,
                got_a,
                got_b,
            },
        );
        let mut result = None;
        let mut rest = Vec::new();
        for m in self.take(c.conn) {
            match m {
                ServerMsg::ProbeResult {
                    probe: p,
                    capabilities,
                    mapped,
                    translated,
                } if p == probe => {
                    result = Some(ProbeOutcome {
                        probe,
                        capabilities,
                        mapped,
                        translated,
                        reported: true,
                    });
                }
                other => rest.push(other),
            }
        }
        self.inbox.entry(c.conn).or_default().extend(rest);
        result.expect("probe_result")
    }

    /// Dials: returns the call id from `calling`.
    pub fn dial(&mut self, c: &Client, number: &str, media: Option<SocketAddr>) -> CallId {
        self.send(
            c.conn,
            ClientMsg::Dial {
                tag: 77,
                number: number.into(),
                media,
            },
        );
        let q = self.inbox.entry(c.conn).or_default();
        let i = q
            .iter()
            .position(|m| matches!(m, ServerMsg::Calling { tag: 77, .. }))
            .expect("calling");
        match q.remove(i) {
            Some(ServerMsg::Calling { call, .. }) => call,
            _ => unreachable!(),
        }
    }

    pub fn accept(&mut self, c: &Client, call: CallId, media: Option<SocketAddr>) {
        self.send(c.conn, ClientMsg::Accept { call, media });
    }
}

/// The media instructions in a list of messages.
pub fn media_of(msgs: &[ServerMsg]) -> Vec<MediaInstructions> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::Media(i) => Some(i.clone()),
            _ => None,
        })
        .collect()
}

pub fn hangups(msgs: &[ServerMsg]) -> Vec<(CallId, HangupReason)> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::HangUp { call, reason, .. } => Some((*call, *reason)),
            _ => None,
        })
        .collect()
}

/// Internal consistency of the gateway's tables (checked after every input in tests).
pub fn check_invariants(gw: &Gateway) {
    let mut live_legs = HashSet::new();
    let mut load = vec![0usize; gw.shard_load.len()];
    assert!(gw.conns.len() <= gw.cfg.max_connections);
    assert!(gw.lookups.len() <= gw.cfg.max_pending_lookups);
    for call in gw.route_watch.keys() {
        assert!(
            matches!(gw.calls.get(call), Some(Call::Pair(p)) if matches!(p.callee, Far::Route(_))),
            "route watch for call {call} that is not a route call"
        );
    }
    for (call, id) in &gw.pending_calls {
        use super::lookup::Pending;
        match gw.lookups.get(id) {
            Some(Pending::Dial { call: c, .. } | Pending::Invite { call: c, .. }) => {
                assert_eq!(c, call)
            }
            _ => panic!("pending call {call} without its look-up"),
        }
        assert!(
            !gw.calls.contains_key(call),
            "call {call} both pending and placed"
        );
    }
    // Every open call record belongs to a call in progress (none leaks).
    for call in gw.records.keys() {
        assert!(
            gw.calls.contains_key(call)
                || gw.pending_calls.contains_key(call)
                || gw.fleet_dial_pending(*call),
            "record of call {call} left open"
        );
    }
    for (user, conn) in &gw.users {
        match gw.conns.get(conn).map(|c| &c.phase) {
            Some(Phase::LoggedIn(s)) => assert_eq!(&s.user, user),
            _ => panic!("users[{user}] -> {conn} is not logged in"),
        }
    }
    for (conn, c) in &gw.conns {
        assert!(
            gw.timers.contains(Timer::Conn(*conn)) || gw.is_virtual(*conn),
            "conn {conn} has no timer"
        );
        if let Phase::LoggedIn(s) = &c.phase {
            // A stand-in for a user who logged in here since (to resume its call) is not
            // the user's entry any more.
            if !gw.is_virtual(*conn) {
                assert_eq!(gw.users.get(&s.user), Some(conn));
            }
            if let Some(p) = &s.probe {
                assert_eq!(gw.tokens.get(&p.token), Some(conn));
                assert!(gw.timers.contains(Timer::Probe(*conn)));
            }
            assert!(s.calls.len() + s.lookups <= gw.cfg.max_calls_per_user);
            for id in &s.calls {
                let party = match gw.calls.get(id) {
                    Some(Call::Pair(p)) => {
                        p.caller == *conn || matches!(p.callee, Far::User(c) if c == *conn)
                    }
                    Some(Call::Room(r)) => r.members.contains_key(conn),
                    None => false,
                };
                assert!(party, "session {conn} lists call {id} it is not in");
            }
        }
    }
    for (token, conn) in &gw.tokens {
        let ok = gw
            .session(*conn)
            .and_then(|s| s.probe.as_ref())
            .is_some_and(|p| &p.token == token);
        assert!(ok, "stale token");
    }
    let in_call =
        |conn: ConnId, id: CallId| gw.session(conn).is_some_and(|s| s.calls.contains(&id));
    for (id, call) in &gw.calls {
        match call {
            Call::Pair(p) => {
                assert!(in_call(p.caller, *id), "call {id}: caller gone");
                match &p.callee {
                    Far::User(c) => assert!(in_call(*c, *id), "call {id}: callee gone"),
                    Far::Route(r) => {
                        assert_eq!(gw.route_busy.get(&canonical(r.media_addr)), Some(id));
                    }
                }
                // Readiness only awaits legs of the session in force, and is done only after
                // media went out.
                assert!(
                    !p.ready.done || p.ready.media_sent,
                    "call {id}: ready before media"
                );
                for (leg, ..) in &p.ready.awaited {
                    assert!(
                        p.relay.as_ref().is_some_and(|r| r.legs.contains(leg)),
                        "call {id}: awaits leg {leg} it does not have"
                    );
                }
                if let Some(relay) = &p.relay {
                    load[relay.shard] += 1;
                    for l in &relay.legs {
                        assert!(live_legs.insert(l.clone()), "duplicate leg");
                    }
                    if let Some(op) = relay.op {
                        assert_eq!(gw.ops.get(&op), Some(id));
                    }
                }
            }
            Call::Room(r) => {
                assert!(r.members.len() >= 2, "room {id} with fewer than 2 members");
                assert!(r.members.len() <= gw.cfg.max_room_size);
                for (conn, m) in &r.members {
                    assert!(in_call(*conn, *id), "room {id}: member {conn} gone");
                    assert!(m.ready.awaited.len() <= 1, "room {id}: one leg per member");
                    assert!(!m.ready.done || m.ready.media_sent);
                    for (leg, ..) in &m.ready.awaited {
                        assert_eq!(m.leg.as_ref(), Some(leg), "room {id}: member {conn}");
                    }
                    if let Some(l) = &m.leg {
                        assert!(r.relay.is_some(), "room leg without a session");
                        assert!(live_legs.insert(l.clone()), "duplicate leg");
                        assert!(matches!(
                            m.state,
                            MemberState::Joining | MemberState::Joined | MemberState::Reprobing
                        ));
                    }
                }
                if let Some(relay) = &r.relay {
                    load[relay.shard] += 1;
                    assert!(
                        r.members.values().any(|m| m.leg.is_some()),
                        "empty room session"
                    );
                    if let Some(op) = relay.op {
                        assert_eq!(gw.ops.get(&op), Some(id));
                    }
                }
            }
        }
    }
    for (op, id) in &gw.ops {
        let relay_op = match gw.calls.get(id) {
            Some(Call::Pair(p)) => p.relay.as_ref().and_then(|r| r.op),
            Some(Call::Room(r)) => r.relay.as_ref().and_then(|r| r.op),
            None => None,
        };
        assert_eq!(relay_op, Some(*op), "stale op");
    }
    for id in gw.route_busy.values() {
        assert!(gw.calls.contains_key(id));
    }
    assert_eq!(live_legs, gw.leg_names(), "leg names");
    assert_eq!(load, gw.shard_load, "shard load");
}
