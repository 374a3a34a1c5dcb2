//! Attacks at the real control port of a `voxgate serve` process (issue 12): log-in guessing
//! with parallel `hello`s, connection floods from one source, a client flooding messages, and a
//! slow directory. Other sources are other loopback addresses (127.0.0.2, …), so every test
//! checks that the attack from 127.0.0.1 does not reach the subscriber elsewhere.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::Gateway;
use voxgate::control::auth::{self, ClientFirst};
use voxgate::wire::control::{self as proto, ClientMsg, ErrorCode, ServerMsg, VERSION};

/// A raw control connection from a chosen source address.
struct Ctl {
    s: TcpStream,
}

impl Ctl {
    fn connect_from(src: &str, gw: &str) -> std::io::Result<Ctl> {
        let gw: SocketAddr = gw.parse().expect("gateway address");
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let src: IpAddr = src.parse().expect("source address");
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&gw.into(), Duration::from_secs(5))?;
        let s: TcpStream = sock.into();
        s.set_nodelay(true)?;
        Ok(Ctl { s })
    }

    fn send(&mut self, m: &ClientMsg) -> std::io::Result<()> {
        let mut buf = Vec::new();
        proto::encode(m, &mut buf).expect("encodable");
        self.s.write_all(&buf)
    }

    /// The next message, or `None` at a time-out or when the gateway closed the connection.
    fn recv(&mut self, wait: Duration) -> Option<ServerMsg> {
        self.s.set_read_timeout(Some(wait)).ok()?;
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).ok()?;
        let len = proto::body_len(h).ok()?;
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).ok()?;
        proto::decode(&body).ok()
    }

    /// The next message that is not a probe, poll or ack (which arrive unasked).
    fn recv_skipping(&mut self, wait: Duration) -> Option<ServerMsg> {
        let end = Instant::now() + wait;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.recv(left)? {
                ServerMsg::ProbeBegin { .. }
                | ServerMsg::ProbeCheck { .. }
                | ServerMsg::ProbeResult { .. }
                | ServerMsg::Poll { .. } => {}
                m => return Some(m),
            }
        }
    }

    fn hello(&mut self, user: &str) -> auth::ClientAwaitingChallenge {
        let (state, hello) = ClientFirst::new(user, &mut rand::rng()).expect("user name");
        self.send(&ClientMsg::Hello {
            version: VERSION,
            user: user.into(),
            nonce: hello.client_nonce,
            software: None,
        })
        .expect("send hello");
        state
    }

    /// Answers a challenge with `password`.
    fn prove(
        &mut self,
        state: auth::ClientAwaitingChallenge,
        challenge: ServerMsg,
        password: &str,
    ) {
        let ServerMsg::Challenge {
            nonce,
            salt,
            iterations,
        } = challenge
        else {
            panic!("expected a challenge, got {challenge:?}");
        };
        let c = auth::Challenge {
            server_nonce: nonce,
            salt: BASE64.decode(salt).expect("base64 salt"),
            iterations,
        };
        let (_, proof) = state.respond(password, &c).expect("valid challenge");
        self.send(&ClientMsg::Proof {
            channel_binding: proof.channel_binding.clone(),
            nonce: proof.nonce.clone(),
            proof: BASE64.encode(&proof.proof),
        })
        .expect("send proof");
    }

    /// A full log-in; `Err` carries the gateway's answer when it is not `welcome`.
    fn login(src: &str, gw: &str, user: &str) -> Result<Ctl, String> {
        let mut c = Ctl::connect_from(src, gw).map_err(|e| e.to_string())?;
        let state = c.hello(user);
        let challenge = c.recv(Duration::from_secs(10));
        match challenge {
            Some(ch @ ServerMsg::Challenge { .. }) => c.prove(state, ch, &common::password(user)),
            other => return Err(format!("{other:?}")),
        }
        match c.recv(Duration::from_secs(10)) {
            Some(ServerMsg::Welcome { .. }) => Ok(c),
            other => Err(format!("{other:?}")),
        }
    }

    /// Sends a heart-beat and waits for its ack: the round-trip time.
    fn heartbeat_rtt(&mut self, seq: u64) -> Duration {
        let t = Instant::now();
        self.send(&ClientMsg::Heartbeat { seq })
            .expect("send heartbeat");
        loop {
            match self.recv_skipping(Duration::from_secs(5)) {
                Some(ServerMsg::HeartbeatAck { seq: s }) if s == seq => return t.elapsed(),
                Some(_) => {}
                None => panic!("no heartbeat_ack for {seq}"),
            }
        }
    }
}

/// A gateway with the per-source limits applied to loopback too (they exempt it by default),
/// plus `extra` config lines under `[limits]`. The config file lives in the returned directory.
fn start_gateway(extra_limits: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("voxgate.toml");
    std::fs::write(
        &path,
        format!("[limits]\nexempt_sources = []\n{extra_limits}\n"),
    )
    .expect("write config");
    let gw = Gateway::start(&["--config", path.to_str().expect("utf-8 path")]);
    (gw, dir)
}

/// Lets the test process hold a few thousand sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn refusal(m: &Option<ServerMsg>) -> Option<ErrorCode> {
    match m {
        Some(ServerMsg::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

#[test]
fn parallel_hellos_get_no_more_challenges_than_the_limit_and_the_user_logs_in_elsewhere() {
    raise_nofile();
    let (gw, _cfg) = start_gateway("");
    // 200 connections from one source all send `hello` for alice before any proof.
    let mut conns: Vec<(Ctl, auth::ClientAwaitingChallenge)> = (0..200)
        .map(|_| {
            let mut c = Ctl::connect_from("127.0.0.1", &gw.control).expect("connect");
            let st = c.hello("alice");
            (c, st)
        })
        .collect();
    let mut challenged = Vec::new();
    let mut limited = 0;
    for (mut c, st) in conns.drain(..) {
        match c.recv(Duration::from_secs(10)) {
            Some(ch @ ServerMsg::Challenge { .. }) => challenged.push((c, st, ch)),
            Some(ServerMsg::Refused {
                code: ErrorCode::RateLimited,
                message,
            }) => {
                assert!(message.contains("retry in"), "{message}");
                limited += 1;
            }
            other => panic!("unexpected answer to hello: {other:?}"),
        }
    }
    eprintln!(
        "200 parallel hellos from one source: {} challenged, {limited} refused rate_limited",
        challenged.len()
    );
    // The default per-user-at-a-source bucket is 5: at most 5 proofs can ever be checked.
    assert!(
        challenged.len() <= 5,
        "{} challenges for one user from one source",
        challenged.len()
    );
    assert_eq!(challenged.len() + limited, 200);
    // Meanwhile (the attempts still pending) the real alice logs in from another source.
    let alice = Ctl::login("127.0.0.2", &gw.control, "alice");
    assert!(
        alice.is_ok(),
        "alice from a clean source: {:?}",
        alice.err()
    );
    // The guesses fail like any wrong password.
    for (mut c, st, ch) in challenged {
        c.prove(st, ch, "not-the-password");
        assert_eq!(
            refusal(&c.recv(Duration::from_secs(10))),
            Some(ErrorCode::AuthFailed)
        );
    }
    // Refusals are logged at a bounded rate, not one line each.
    let lines = gw
        .log_text()
        .lines()
        .filter(|l| l.contains("refused by the rate limiter"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for 195 refusals"
    );
}

#[test]
fn a_connection_flood_from_one_source_keeps_nobody_out_and_gives_back_its_descriptors() {
    raise_nofile();
    let (gw, _cfg) = start_gateway("");
    let pid = gw.pid();
    // After the first histogram dump (1 s), whose files stay open.
    std::thread::sleep(Duration::from_millis(1500));
    let baseline = fd_count(pid);
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.push(Ctl::connect_from("127.0.0.1", &gw.control).expect("connect"));
    }
    // The second source gets in at once.
    let t = Instant::now();
    let mut bob = Ctl::login("127.0.0.2", &gw.control, "bob").expect("bob logs in");
    assert!(t.elapsed() < Duration::from_secs(5));
    bob.heartbeat_rtt(1);
    // Those over the per-source cap (256) were told why and closed at once.
    let mut refused = 0;
    for c in flood.iter_mut().rev().take(700) {
        match c.recv(Duration::from_millis(200)) {
            Some(ServerMsg::Refused {
                code: ErrorCode::RateLimited,
                message,
            }) => {
                assert!(message.contains("too many connections"), "{message}");
                refused += 1;
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(refused, 700);
    let held = fd_count(pid);
    assert!(
        held <= baseline + 256 + 8,
        "the gateway holds {held} descriptors (baseline {baseline})"
    );
    // Everything closes: within a second the gateway is back at its baseline.
    drop(flood);
    drop(bob);
    let t = Instant::now();
    let mut last = fd_count(pid);
    while last > baseline {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{last} descriptors a second after the flood closed (baseline {baseline})"
        );
        std::thread::sleep(Duration::from_millis(20));
        last = fd_count(pid);
    }
}

#[test]
fn a_client_flooding_messages_is_throttled_then_refused_and_heartbeats_keep_their_timing() {
    let (gw, _cfg) = start_gateway("");
    let mut alice = Ctl::login("127.0.0.1", &gw.control, "alice").expect("alice");
    let mut bob = Ctl::login("127.0.0.2", &gw.control, "bob").expect("bob");
    let baseline: Vec<Duration> = (0..10).map(|i| bob.heartbeat_rtt(i)).collect();
    // Alice sends heart-beats as fast as the socket takes them (10 000/s is far below that).
    // Blocking writes: a write cut short by a time-out would break the framing.
    let mut w = alice.s.try_clone().expect("clone");
    let flooder = std::thread::spawn(move || {
        let mut frame = Vec::new();
        proto::encode(&ClientMsg::Heartbeat { seq: 7 }, &mut frame).expect("encode");
        let frames: Vec<u8> = frame.repeat(100);
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed() < Duration::from_secs(12) {
            // 100 messages per 10 ms: 10 000 per second.
            if w.write_all(&frames).is_err() {
                break;
            }
            sent += 100;
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    });
    // Alice's acks: counted over the first 3 s.
    let counter = std::thread::spawn(move || {
        let t = Instant::now();
        let (mut acks_3s, mut refused) = (0u32, None);
        while t.elapsed() < Duration::from_secs(12) {
            match alice.recv(Duration::from_secs(12)) {
                Some(ServerMsg::HeartbeatAck { .. }) if t.elapsed() < Duration::from_secs(3) => {
                    acks_3s += 1
                }
                Some(ServerMsg::Refused { code, message }) => {
                    refused = Some((code, message, t.elapsed()));
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        (acks_3s, refused)
    });
    // Bob heart-beats every 100 ms meanwhile.
    let mut during = Vec::new();
    for i in 0..30 {
        during.push(bob.heartbeat_rtt(100 + i));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (acks_3s, refused) = counter.join().expect("counter");
    let sent = flooder.join().expect("flooder");
    during.sort();
    let worst = *during.last().expect("samples");
    let median = during[during.len() / 2];
    eprintln!(
        "bob's heart-beat RTT: baseline max {:?}; during the flood median {median:?}, max {worst:?}; \
         alice sent {sent} messages, got {acks_3s} acks in 3 s",
        baseline.iter().max()
    );
    // Throttled: 50 at once, then 20 per second (plus the log-in's slack).
    assert!(acks_3s <= 50 + 3 * 20 + 5, "{acks_3s} acks in 3 s");
    assert!(
        sent > 3 * acks_3s as u64,
        "the flood was not faster than the limit"
    );
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(worst < Duration::from_millis(300), "worst {worst:?}");
    // Throttled without a break for 5 s: refused with a reason, and closed.
    let (code, message, at) = refused.expect("alice was refused");
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(message.contains("messages per second"), "{message}");
    assert!(
        at >= Duration::from_secs(4) && at < Duration::from_secs(10),
        "{at:?}"
    );
}

/// A directory that takes `delay` for every look-up of a user (a locked SQLite file, a slow
/// remote database).
struct SlowStore(voxgate::store::SqliteStore, Duration);

impl voxgate::store::Store for SlowStore {
    fn add_user(&mut self, s: &voxgate::store::Subscriber) -> Result<(), StoreError> {
        self.0.add_user(s)
    }
    fn del_user(&mut self, u: &str) -> Result<bool, StoreError> {
        self.0.del_user(u)
    }
    fn set_verifier(&mut self, u: &str, v: &auth::Verifier) -> Result<bool, StoreError> {
        self.0.set_verifier(u, v)
    }
    fn user(&self, u: &str) -> Result<Option<voxgate::store::Subscriber>, StoreError> {
        std::thread::sleep(self.1);
        self.0.user(u)
    }
    fn user_by_number(&self, n: &str) -> Result<Option<voxgate::store::Subscriber>, StoreError> {
        std::thread::sleep(self.1);
        self.0.user_by_number(n)
    }
    fn list_users(&self) -> Result<Vec<voxgate::store::Subscriber>, StoreError> {
        self.0.list_users()
    }
    fn add_route(&mut self, r: &voxgate::store::Route) -> Result<(), StoreError> {
        self.0.add_route(r)
    }
    fn del_route(&mut self, p: &str) -> Result<bool, StoreError> {
        self.0.del_route(p)
    }
    fn list_routes(&self) -> Result<Vec<voxgate::store::Route>, StoreError> {
        self.0.list_routes()
    }
    fn route_for(&self, n: &str) -> Result<Option<voxgate::store::Route>, StoreError> {
        self.0.route_for(n)
    }
}

use voxgate::store::{Store as _, StoreError};

#[test]
fn a_slow_directory_delays_only_its_lookups_never_other_clients_heartbeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let db = data.join("voxgate.db");
    {
        let mut s = voxgate::store::SqliteStore::open(&db).expect("store");
        for (user, number) in [("alice", "+15550001"), ("bob", "+15550002")] {
            s.add_user(&voxgate::store::Subscriber {
                user: user.into(),
                number: number.into(),
                verifier: auth::Verifier::new(&common::password(user), 4096, &mut rand::rng()),
                allow_prefixes: None,
            })
            .expect("add user");
        }
    }
    let mut cfg = voxgate::config::Config::default();
    cfg.server.listen = "127.0.0.1".parse().expect("ip");
    cfg.server.control_port = 0;
    cfg.server.media_port_base = 0;
    cfg.server.probe_ports = [0, 0];
    cfg.server.shards = 1;
    cfg.server.pin_shards = false;
    cfg.server.data_dir = Some(data.clone());
    cfg.server.allow_private_peers = true;
    cfg.dumps.interval_s = 0;
    let delay = Duration::from_millis(1500);
    let factory: voxgate::server::lookup::StoreFactory = std::sync::Arc::new(move || {
        Ok(
            Box::new(SlowStore(voxgate::store::SqliteStore::open(&db)?, delay))
                as Box<dyn voxgate::store::Store>,
        )
    });
    let gw = voxgate::server::start_with_directory(cfg, None, Some(factory)).expect("start");
    let control = gw.bound.control.to_string();
    let t = Instant::now();
    let mut bob = Ctl::login("127.0.0.2", &control, "bob").expect("bob");
    assert!(t.elapsed() >= delay, "the slow directory was asked");
    let mut alice = Ctl::login("127.0.0.1", &control, "alice").expect("alice");
    // Alice dials six times at once: six look-ups of 1.5 s each queue up at the directory.
    for tag in 0..6 {
        alice
            .send(&ClientMsg::Dial {
                tag,
                number: "+15550003".into(),
                media: None,
            })
            .expect("dial");
    }
    // Bob's heart-beats are answered at once all the while.
    let mut rtts = Vec::new();
    let t = Instant::now();
    let mut seq = 0;
    while t.elapsed() < Duration::from_secs(3) {
        seq += 1;
        rtts.push(bob.heartbeat_rtt(seq));
        std::thread::sleep(Duration::from_millis(50));
    }
    let worst = rtts.iter().max().copied().unwrap_or_default();
    eprintln!("bob's worst heart-beat RTT while the directory was slow: {worst:?}");
    assert!(worst < Duration::from_millis(250), "worst {worst:?}");
    // The dials are answered as the directory gets to them (an unregistered number).
    let mut hangups = 0;
    while hangups < 6 {
        match alice.recv_skipping(Duration::from_secs(10)) {
            Some(ServerMsg::HangUp { reason, .. }) => {
                assert_eq!(reason.as_str(), "not_found");
                hangups += 1;
            }
            Some(_) => {}
            None => panic!("no answer to the dials"),
        }
    }
    gw.stop().expect("stop");
}

#[test]
fn a_dial_and_hang_up_loop_stops_ringing_the_callee() {
    let (gw, _cfg) = start_gateway("");
    let mut alice = Ctl::login("127.0.0.1", &gw.control, "alice").expect("alice");
    let mut bob = Ctl::login("127.0.0.2", &gw.control, "bob").expect("bob");
    let mut limited = 0;
    for tag in 0..10 {
        alice
            .send(&ClientMsg::Dial {
                tag,
                number: "+15550002".into(),
                media: None,
            })
            .expect("dial");
        let call = match alice.recv_skipping(Duration::from_secs(10)) {
            Some(ServerMsg::Calling { call, .. }) => call,
            other => panic!("expected calling, got {other:?}"),
        };
        match alice.recv_skipping(Duration::from_secs(10)) {
            Some(ServerMsg::Ringing { .. }) => {
                alice.send(&ClientMsg::HangUp { call }).expect("hang up")
            }
            Some(ServerMsg::HangUp { reason, .. }) => {
                assert_eq!(reason.as_str(), "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Bob's phone rang three times, not ten.
    let mut rings = 0;
    while let Some(m) = bob.recv_skipping(Duration::from_millis(500)) {
        if matches!(m, ServerMsg::Incoming { .. }) {
            rings += 1;
        }
    }
    assert_eq!(rings, 3);
    assert_eq!(limited, 7);
}

#[test]
fn exempt_sources_are_not_capped_per_source() {
    raise_nofile();
    // Loopback is exempt by default: a local load generator may hold many connections and log
    // in many subscribers at once.
    let gw = Gateway::start(&[]);
    let held: Vec<Ctl> = (0..300)
        .map(|_| Ctl::connect_from("127.0.0.1", &gw.control).expect("connect"))
        .collect();
    let mut bob = Ctl::login("127.0.0.1", &gw.control, "bob").expect("bob");
    bob.heartbeat_rtt(1);
    for mut c in held.into_iter().take(20) {
        assert!(c.recv(Duration::from_millis(100)).is_none(), "not refused");
    }
}

#[test]
fn deleting_a_user_with_the_cli_ends_its_live_session_within_seconds() {
    let gw = Gateway::start(&[]);
    let mut alice = Ctl::login("127.0.0.1", &gw.control, "alice").expect("alice");
    let mut bob = Ctl::login("127.0.0.2", &gw.control, "bob").expect("bob");
    let data = gw.dir.path().join("data");
    let t = Instant::now();
    common::run_ok(std::process::Command::new(common::BIN).args([
        "user",
        "del",
        "alice",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ]));
    // The CLI is another process writing the SQLite file; the gateway notices on its own.
    match alice.recv_skipping(Duration::from_secs(5)) {
        Some(ServerMsg::Refused {
            code: ErrorCode::Revoked,
            message,
        }) => assert!(message.contains("deleted"), "{message}"),
        other => panic!("expected refused{{revoked}}, got {other:?}"),
    }
    let took = t.elapsed();
    eprintln!("alice's session ended {took:?} after `user del`");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The connection is closed, and alice cannot log in again.
    assert!(alice.recv(Duration::from_secs(2)).is_none());
    let again = Ctl::login("127.0.0.3", &gw.control, "alice");
    assert!(again.is_err());
    // Bob is untouched.
    bob.heartbeat_rtt(1);
}

#[test]
fn a_route_call_that_sends_no_media_ends_at_the_inactivity_timeout() {
    // A voice gateway stand-in that never sends anything.
    let voice = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let (gw, _cfg) = start_gateway("route_inactivity_s = 3");
    let data = gw.dir.path().join("data");
    common::run_ok(std::process::Command::new(common::BIN).args([
        "route",
        "add",
        "+49",
        &voice.local_addr().expect("addr").to_string(),
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ]));
    let mut alice = Ctl::login("127.0.0.1", &gw.control, "alice").expect("alice");
    let t = Instant::now();
    alice
        .send(&ClientMsg::Dial {
            tag: 1,
            number: "+4930123456".into(),
            media: None,
        })
        .expect("dial");
    let reason = loop {
        match alice.recv_skipping(Duration::from_secs(15)) {
            Some(ServerMsg::HangUp { reason, .. }) => break reason,
            Some(_) => {}
            None => panic!("the route call never ended"),
        }
    };
    let took = t.elapsed();
    eprintln!("route call without media ended after {took:?}");
    assert_eq!(reason.as_str(), "no_media");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[test]
fn a_user_without_routes_in_its_class_of_service_cannot_dial_telephone_numbers() {
    let voice = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let gw = Gateway::start(&[]);
    let data = gw.dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let addr = voice.local_addr().expect("addr").to_string();
    common::run_ok(std::process::Command::new(common::BIN).args([
        "route",
        "add",
        "+49",
        &addr,
        "--data-dir",
        data,
    ]));
    let mut alice = Ctl::login("127.0.0.1", &gw.control, "alice").expect("alice");
    // Set while alice is logged in: the gateway refreshes her session from the change log.
    let out = common::run_ok(std::process::Command::new(common::BIN).args([
        "user",
        "mod",
        "alice",
        "--allow-prefix",
        "+4930",
        "--data-dir",
        data,
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("routes +4930"));
    std::thread::sleep(Duration::from_millis(1500));
    alice
        .send(&ClientMsg::Dial {
            tag: 1,
            number: "+4940123456".into(),
            media: None,
        })
        .expect("dial");
    let reason = loop {
        match alice.recv_skipping(Duration::from_secs(10)) {
            Some(ServerMsg::HangUp { reason, .. }) => break reason,
            Some(ServerMsg::Refused { code, message }) => panic!("refused {code:?}: {message}"),
            Some(_) => {}
            None => panic!("no answer to the dial"),
        }
    };
    assert_eq!(reason.as_str(), "not_permitted");
    let list = common::run_ok(std::process::Command::new(common::BIN).args([
        "user",
        "list",
        "--data-dir",
        data,
    ]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("alice\t+15550001\troutes +4930"));
}
