//! A fleet on loopback: three gateways sharing one PostgreSQL directory and one Redis (both
//! private servers the test starts, `common::pg` and `common::redis`).
//! - subscribers logged in on different gateways call each other: the call is signalled
//!   through Redis, relayed by the caller's gateway, audio byte-exact both ways (UDP and TCP);
//! - presence is in Redis, sealed messages only: what crosses Redis has no call key in clear;
//! - a gateway killed with -9: its subscribers' presence expires within the TTL and a call to
//!   them gets `hang_up{offline}`;
//! - the callee's gateway killed with -9 mid-call: the callee's phone resumes the call through
//!   a third gateway and no audio is lost; a callee that cannot resume loses the call once the
//!   grace is over; a caller whose connection to its (relaying) gateway is cut resumes too;
//! - one session per subscriber across the fleet.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::redis::{RedisServer, Reply, USER};
use common::{Gateway, spawn_phone, test_clip, ulaw_round_trip_padded};
use voxgate::client::wav;

/// `[fleet] resume_grace_ms` of the test fleets: how long a call waits for a party whose
/// gateway died to resume it elsewhere.
const RESUME_GRACE_MS: u64 = 8000;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

struct Fleet {
    _cfg: tempfile::TempDir,
    pg: PgServer,
    redis: RedisServer,
    gws: Vec<Gateway>,
    /// One fleet at a time (each is PostgreSQL, Redis and up to three gateways: on a 2-core
    /// machine several at once only make each other time out). Dropped last.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` gateways `gw1`…, heart-beat 1 s (presence TTL 3 s).
fn fleet(n: usize) -> Option<Fleet> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pg = PgServer::start()?;
    let redis = RedisServer::start()?;
    pg.create_db("dir");
    let cfg = tempfile::tempdir().unwrap();
    let pw = private_file(cfg.path(), "redis.pass", &format!("{}\n", redis.password));
    let key = private_file(cfg.path(), "fleet.key", &format!("{KEY}\n"));
    let mut gws = Vec::new();
    for i in 1..=n {
        let conf = cfg.path().join(format!("gw{i}.toml"));
        std::fs::write(
            &conf,
            format!(
                "[fleet]\nredis = \"redis://{USER}@127.0.0.1:{port}/\"\npassword_file = \"{pw}\"\n\
                 key_file = \"{key}\"\nnode = \"gw{i}\"\nresume_grace_ms = {RESUME_GRACE_MS}\n",
                port = redis.port,
                pw = pw.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        let url = pg.url("dir");
        gws.push(Gateway::start_with_directory(
            &["--directory", &url],
            &[("PGPASSWORD", &pg.password)],
            &["--config", conf.to_str().unwrap(), "--heartbeat-ms", "1000"],
        ));
        let log = gws[i - 1].log_text();
        assert!(
            log.contains("fleet: joined") && log.contains(&format!("node=gw{i}")),
            "{log}"
        );
    }
    Some(Fleet {
        _cfg: cfg,
        pg,
        redis,
        gws,
        _serial: serial,
    })
}

/// The sum of `name`'s samples whose labels contain `label` in the gateway's `/metrics`.
fn metric(gw: &Gateway, name: &str, label: &str) -> f64 {
    let (code, body) = common::http_get(gw.admin.as_ref().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn presence(redis: &RedisServer, user: &str) -> Option<String> {
    match redis
        .command(&["GET", &format!("voxgate:presence:{user}")])
        .unwrap()
    {
        Reply::Bulk(Some(b)) => Some(String::from_utf8(b).unwrap()),
        Reply::Bulk(None) => None,
        other => panic!("GET: {other:?}"),
    }
}

/// `caller` on `gc` calls `callee` (number `number`) on `ge`; audio must arrive byte-exact
/// both ways. `firewall`: the caller's `--firewall`.
/// A call's audio files in a gateway's folder, named `{tag}-…`: what the caller plays
/// (`a_in`, speech) and records (`a_rec`), what the callee plays (`b_in`, a reply) and records
/// (`b_rec`).
struct Clips {
    a_in: PathBuf,
    b_in: PathBuf,
    a_rec: PathBuf,
    b_rec: PathBuf,
}

impl Clips {
    fn new(dir: &Path, tag: &str, a_secs: f64, b_secs: f64) -> Clips {
        Clips {
            a_in: test_clip(dir, "speech-8k.wav", &format!("{tag}-a-in.wav"), a_secs),
            b_in: test_clip(dir, "reply-8k.wav", &format!("{tag}-b-in.wav"), b_secs),
            a_rec: dir.join(format!("{tag}-a-rec.wav")),
            b_rec: dir.join(format!("{tag}-b-rec.wav")),
        }
    }

    /// The callee's phone arguments: answer, play `b_in`, record `b_rec`, wait `wait` s.
    fn answering<'a>(&'a self, wait: &'a str) -> Vec<&'a str> {
        vec![
            "--answer",
            "--play",
            self.b_in.to_str().unwrap(),
            "--record",
            self.b_rec.to_str().unwrap(),
            "--wait",
            wait,
        ]
    }

    /// The caller's phone arguments: call `number`, play `a_in`, record `a_rec`.
    fn calling<'a>(&'a self, number: &'a str) -> Vec<&'a str> {
        vec![
            "--call",
            number,
            "--play",
            self.a_in.to_str().unwrap(),
            "--record",
            self.a_rec.to_str().unwrap(),
        ]
    }

    /// Each recording begins with what the other side played, byte-exact.
    fn assert_heard(&self, (caller, callee): (&str, &str)) {
        for (sent, rec, who) in [
            (&self.a_in, &self.b_rec, format!("{callee} hears {caller}")),
            (&self.b_in, &self.a_rec, format!("{caller} hears {callee}")),
        ] {
            let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
            let got = wav::read(rec).unwrap();
            assert!(got.len() >= want.len(), "{who}: recording too short");
            assert!(got[..want.len()] == want[..], "{who}: audio differs");
        }
    }
}

fn call_across(gc: &Gateway, caller: &str, ge: &Gateway, callee: &str, number: &str, fw: &str) {
    call_across_planned(gc, caller, ge, callee, number, (fw, ""), None);
}

/// [`call_across`] with both phones' `--firewall` (`""`: none) and, when given, the plan
/// (forward, backward) both phones must report.
fn call_across_planned(
    gc: &Gateway,
    caller: &str,
    ge: &Gateway,
    callee: &str,
    number: &str,
    (fw, fw_callee): (&str, &str),
    plan: Option<(&str, &str)>,
) {
    let tag = format!("{caller}-{callee}-{fw}-{fw_callee}");
    let clips = Clips::new(gc.dir.path(), &tag, 1.6, 1.2);
    let mark = ge.log_len();
    let mut answer = clips.answering("20");
    if !fw_callee.is_empty() {
        answer.extend(["--firewall", fw_callee]);
    }
    let answerer = spawn_phone(ge, callee, &answer);
    ge.wait_online(mark, callee);
    let mut args = clips.calling(number);
    if !fw.is_empty() {
        args.extend(["--firewall", fw]);
    }
    let dialler = spawn_phone(gc, caller, &args);
    let caller_r = common::finish(dialler);
    let callee_r = common::finish(answerer);
    for (who, r) in [("caller", &caller_r), ("callee", &callee_r)] {
        assert_eq!(
            r.code,
            0,
            "{who}: {}\n{}\ncaller's gateway:\n{}\ncallee's gateway:\n{}",
            r.json,
            r.stderr,
            gc.log_text(),
            ge.log_text()
        );
        assert_eq!(r.json["result"], "completed", "{who}: {}", r.json);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
        if let Some(want) = plan {
            assert_eq!(
                (
                    r.json["plan"]["forward"].as_str().unwrap_or("?"),
                    r.json["plan"]["backward"].as_str().unwrap_or("?")
                ),
                want,
                "{who} ({fw:?} on {} calls {fw_callee:?} on {}): the plan",
                gc.control,
                ge.control
            );
        }
    }
    clips.assert_heard(("caller", "callee"));
}

#[test]
fn subscribers_on_different_gateways_call_each_other_byte_exact() {
    let Some(f) = fleet(3) else { return };
    let (g1, g2, g3) = (&f.gws[0], &f.gws[1], &f.gws[2]);
    // alice on gw1 calls bob on gw2 (UDP where it can), then carol on gw3 calls alice on gw1
    // with UDP blocked at the caller (TCP through the relaying gateway).
    call_across(g1, "alice", g2, "bob", "+15550002", "");
    // The relay was the caller's gateway's: gw2 (the callee's) relayed nothing.
    let relayed = metric(g1, "voxgate_shard_packets_total", "direction=\"in\"");
    assert!(relayed > 0.0, "{relayed}");
    assert_eq!(
        metric(g2, "voxgate_shard_packets_total", "direction=\"in\""),
        0.0
    );
    assert_eq!(metric(g1, "voxgate_calls_placed_total", ""), 1.0);
    assert_eq!(metric(g2, "voxgate_calls_placed_total", ""), 0.0);
    let before = metric(g1, "voxgate_shard_packets_total", "direction=\"in\"");
    call_across(g3, "carol", g1, "alice", "+15550001", "no-udp");
    // UDP blocked at the caller: every packet of its TCP leg went through gw3.
    let relayed = metric(g3, "voxgate_shard_packets_total", "direction=\"in\"");
    assert!(relayed > 100.0, "{relayed}");
    assert_eq!(
        metric(g1, "voxgate_shard_packets_total", "direction=\"in\""),
        before,
        "the callee's gateway relayed the second call"
    );
    // Nothing in Redis holds a key in clear: only presence, liveness and sealed messages.
    let Reply::Array(Some(keys)) = f.redis.command(&["KEYS", "*"]).unwrap() else {
        panic!("KEYS")
    };
    for k in keys {
        let Reply::Bulk(Some(k)) = k else { panic!() };
        let k = String::from_utf8(k).unwrap();
        assert!(
            k.starts_with("voxgate:presence:") || k.starts_with("voxgate:node:"),
            "{k}"
        );
    }
    let _ = &f.pg;
}

#[test]
fn a_killed_gateways_subscribers_go_offline_within_the_ttl() {
    let Some(mut f) = fleet(2) else { return };
    let g2 = &f.gws[1];
    // While gw2 runs, alice (gw1) reaches carol (gw2).
    call_across(&f.gws[0], "alice", g2, "carol", "+15550003", "");
    let mark = g2.log_len();
    let carol = spawn_phone(g2, "carol", &["--answer", "--wait", "60"]);
    g2.wait_online(mark, "carol");
    let deadline = Instant::now() + Duration::from_secs(5);
    while presence(&f.redis, "carol").as_deref() != Some("gw2") {
        assert!(
            Instant::now() < deadline,
            "carol's presence never reached Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The TTL is refreshed: still there after twice the TTL.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(presence(&f.redis, "carol").as_deref(), Some("gw2"));
    // kill -9: no log-out, no clean-up. The presence key expires by itself (TTL 3 s).
    let killed = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(f.gws[1].pid(), libc::SIGKILL) };
    while presence(&f.redis, "carol").is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "carol's presence outlived the TTL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone_after = killed.elapsed();
    eprintln!("presence expired {gone_after:?} after kill -9 (TTL 3 s)");
    drop(carol);
    // A call to her now gets a clear answer: offline.
    let r = common::run_phone(&f.gws[0], "alice", &["--call", "+15550003"]);
    assert_eq!(r.json["result"], "failed", "{}", r.json);
    assert_eq!(r.json["hangup_reason"], "offline", "{}", r.json);
    f.gws.truncate(1);
}

/// Publishes raw bytes on a Redis channel as the ACL user (the test's own RESP writer: the
/// payload is binary).
fn publish_bytes(redis: &RedisServer, channel: &str, payload: &[u8]) -> i64 {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(redis.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = Vec::new();
    let mut arg = |a: &[u8]| {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    };
    let mut cmd = b"*3\r\n".to_vec();
    arg(b"AUTH");
    arg(USER.as_bytes());
    arg(redis.password.as_bytes());
    cmd.extend_from_slice(&req);
    req.clear();
    let mut arg = |a: &[u8]| {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    };
    arg(b"PUBLISH");
    arg(channel.as_bytes());
    arg(payload);
    cmd.extend_from_slice(b"*3\r\n");
    cmd.extend_from_slice(&req);
    s.write_all(&cmd).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "+OK\r\n", "AUTH");
    line.clear();
    r.read_line(&mut line).unwrap();
    line.trim_start_matches(':').trim().parse().unwrap()
}

#[test]
fn only_messages_sealed_with_the_fleet_key_are_taken() {
    let Some(f) = fleet(1) else { return };
    let g1 = &f.gws[0];
    let mark = g1.log_len();
    let _bob = spawn_phone(g1, "bob", &["--answer", "--wait", "30"]);
    g1.wait_online(mark, "bob");
    // A forged ring for bob from a node that does not exist, as anybody holding the Redis
    // ACL password could publish it.
    let ring = br#"{"from":"evil","msg":{"t":"ring","call":4242,"vconn":7,"user":"bob"}}"#;
    let ch = "voxgate:node:gw1";
    let mark = g1.log_len();
    assert_eq!(publish_bytes(&f.redis, ch, ring), 1, "gw1 listens");
    let wrong = voxgate::server::fleet::Seal::new(&[9; 32]).seal(ch, ring);
    assert_eq!(publish_bytes(&f.redis, ch, &wrong), 1);
    let refusals = || {
        g1.log_text()
            .matches("not sealed with the fleet key")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refusals() < 2 {
        assert!(Instant::now() < deadline, "{}", g1.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!g1.log_text().contains("rings here"), "{}", g1.log_text());
    // The same ring sealed with the fleet key is taken: the seal is what stopped it.
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap();
    }
    let right = voxgate::server::fleet::Seal::new(&key).seal(ch, ring);
    // ... but not on another node's channel (the channel is bound into the seal).
    assert_eq!(
        publish_bytes(
            &f.redis,
            ch,
            &voxgate::server::fleet::Seal::new(&key).seal("voxgate:node:gw2", ring)
        ),
        1
    );
    assert_eq!(publish_bytes(&f.redis, ch, &right), 1);
    g1.wait_log(mark, "the sealed ring", |l| l.contains("rings here"));
    assert_eq!(refusals(), 3, "{}", g1.log_text());
}

#[test]
fn redis_down_fails_calls_across_gateways_clearly_and_service_resumes() {
    let Some(mut f) = fleet(2) else { return };
    let mark = f.gws[1].log_len();
    let bob = spawn_phone(&f.gws[1], "bob", &["--answer", "--wait", "60"]);
    f.gws[1].wait_online(mark, "bob");
    f.redis.stop();
    let r = common::run_phone(&f.gws[0], "alice", &["--call", "+15550002"]);
    assert_eq!(r.json["result"], "failed", "{}", r.json);
    assert_eq!(r.json["hangup_reason"], "error", "{}", r.json);
    assert!(
        r.json
            .to_string()
            .contains("presence service is unavailable"),
        "{}",
        r.json
    );
    assert!(
        f.gws[0]
            .log_text()
            .contains("presence look-up in Redis failed"),
        "the reason is in the log"
    );
    // Redis back (empty: no persistence): the gateways write presence again by themselves.
    f.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while presence(&f.redis, "bob").as_deref() != Some("gw2") {
        assert!(
            Instant::now() < deadline,
            "bob's presence was not written again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(bob);
    // And calls across gateways work again (gw2 subscribed again).
    call_across(&f.gws[0], "alice", &f.gws[1], "bob", "+15550002", "");
}

/// The issue's failover gap: `kill -9` of the gateway holding only the callee's control
/// connection (the relay is on the caller's gateway). The callee's phone lists a third
/// gateway: it logs in there and resumes the call, whose media (phone <-> the caller's
/// gateway, never through the killed one) goes on: both recordings hold every sample played,
/// before and after the kill.
#[test]
fn a_callee_gateway_killed_mid_call_is_resumed_through_another_gateway() {
    let Some(f) = fleet(3) else { return };
    let (g1, g2, g3) = (&f.gws[0], &f.gws[1], &f.gws[2]);
    let clips = Clips::new(g1.dir.path(), "resume", 6.0, 6.0);
    let mark = g2.log_len();
    let bob = common::spawn_phone_at(
        &[],
        g2,
        &format!("{},{}", g2.control, g3.control),
        "bob",
        &clips.answering("30"),
    );
    g2.wait_online(mark, "bob");
    let mark = g1.log_len();
    let alice = spawn_phone(g1, "alice", &clips.calling("+15550002"));
    g1.wait_log(mark, "alice's call on gw1", |l| {
        l.contains("media instructions sent")
    });
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = unix_ms();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(g2.pid(), libc::SIGKILL) }, 0);
    let alice = common::finish(alice);
    let bob = common::finish(bob);
    for (who, r) in [("alice", &alice), ("bob", &bob)] {
        assert_eq!(
            r.code,
            0,
            "{who}: {}\n{}\ngw1:\n{}\ngw3:\n{}",
            r.json,
            r.stderr,
            g1.log_text(),
            g3.log_text()
        );
        assert_eq!(r.json["result"], "completed", "{who}: {}", r.json);
        // One media session from start to end: the call was never placed again.
        assert_eq!(r.json["media_segments"], 1, "{who}: {}", r.json);
    }
    assert_eq!(alice.json["failovers"].as_array().map(Vec::len), Some(0));
    let fo = &bob.json["failovers"];
    assert_eq!(fo.as_array().map(Vec::len), Some(1), "{}", bob.json);
    let fo = &fo[0];
    assert_eq!(fo["from"], g2.control.as_str(), "{fo}");
    assert_eq!(fo["to"], g3.control.as_str(), "{fo}");
    let online = fo["logged_in_at_ms"].as_u64().expect("logged in again") - killed_at;
    let resumed = fo["call_restored_at_ms"].as_u64().expect("resumed") - killed_at;
    // The media gap: packets the phones saw missing (sequence gaps) across the whole call.
    let lost = |r: &common::PhoneResult| r.json["received"]["lost"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "kill -9 of the callee's gateway: bob online on gw3 after {online} ms, call resumed \
         after {resumed} ms; packets lost: alice {}, bob {}",
        lost(&alice),
        lost(&bob)
    );
    assert!(online < 5000, "{online} ms");
    assert!(resumed < 5000, "{resumed} ms");
    assert!(
        g1.log_text().contains("resumed through another gateway"),
        "{}",
        g1.log_text()
    );
    // No gap at all: the media never went through gw2, every sample arrived both ways.
    for (r, who) in [(&alice, "alice"), (&bob, "bob")] {
        assert_eq!(lost(r), 0, "{who}: {}", r.json);
    }
    clips.assert_heard(("alice", "bob"));
    // gw3 hosted bob's side until the end: alice's hang-up reached bob through it.
    assert_eq!(bob.json["ended_by"], "peer", "{}", bob.json);
    assert!(
        g3.log_text().contains("the call is resumed here"),
        "{}",
        g3.log_text()
    );
}

/// A TCP forwarder on loopback to `to`; `cut()` resets every connection it carries (a
/// phone's control connection lost on the way while both ends live).
struct Forwarder {
    addr: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Forwarder {
    fn start(to: &str) -> Forwarder {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to, held) = (to.to_owned(), conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(a) = c else { return };
                let Ok(b) = std::net::TcpStream::connect(&to) else {
                    continue;
                };
                let mut g = held.lock().unwrap();
                g.push(a.try_clone().unwrap());
                g.push(b.try_clone().unwrap());
                for (mut r, mut w) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Forwarder { addr, conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The caller's control connection to its own gateway (which relays the call) is cut mid-call
/// while both live: the caller logs in again (the next entry of its list: the same gateway,
/// directly) and resumes; the call never stops, audio byte-exact both ways.
#[test]
fn a_caller_that_lost_only_its_connection_resumes_the_call() {
    let Some(f) = fleet(2) else { return };
    let (g1, g2) = (&f.gws[0], &f.gws[1]);
    let clips = Clips::new(g1.dir.path(), "cut", 5.0, 5.0);
    let mark = g2.log_len();
    let bob = spawn_phone(g2, "bob", &clips.answering("30"));
    g2.wait_online(mark, "bob");
    let fwd = Forwarder::start(&g1.control);
    let mark = g1.log_len();
    let alice = common::spawn_phone_at(
        &[],
        g1,
        &format!("{},{}", fwd.addr, g1.control),
        "alice",
        &clips.calling("+15550002"),
    );
    g1.wait_log(mark, "alice's call on gw1", |l| {
        l.contains("media instructions sent")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let cut_at = unix_ms();
    fwd.cut();
    let alice = common::finish(alice);
    let bob = common::finish(bob);
    for (who, r) in [("alice", &alice), ("bob", &bob)] {
        assert_eq!(
            r.code,
            0,
            "{who}: {}\n{}\ngw1:\n{}",
            r.json,
            r.stderr,
            g1.log_text()
        );
        assert_eq!(r.json["media_segments"], 1, "{who}: {}", r.json);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
    let fo = &alice.json["failovers"][0];
    assert_eq!(fo["to"], g1.control.as_str(), "{}", alice.json);
    let resumed = fo["call_restored_at_ms"].as_u64().expect("resumed") - cut_at;
    eprintln!("the caller's connection cut: call resumed through gw1 after {resumed} ms");
    assert!(resumed < 5000, "{resumed} ms");
    clips.assert_heard(("alice", "bob"));
}

/// One session per subscriber across the fleet: bob waits for calls on gw1; a log-in as bob
/// on gw2 replaces that session (`refused{replaced}`, said in words), as on one gateway.
#[test]
fn a_log_in_on_another_gateway_replaces_the_older_session() {
    let Some(f) = fleet(2) else { return };
    let (g1, g2) = (&f.gws[0], &f.gws[1]);
    let mark = g1.log_len();
    let bob = spawn_phone(g1, "bob", &["--answer", "--wait", "30"]);
    g1.wait_online(mark, "bob");
    assert_eq!(presence(&f.redis, "bob").as_deref(), Some("gw1"));
    let t = Instant::now();
    let out = common::run_with_stdin(
        common::command(&[], common::BIN).args([
            "probe",
            "--server",
            &g2.control,
            "--user",
            "bob",
            "--password-stdin",
            "--json",
        ]),
        &format!("{}\n", common::password("bob")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = common::finish(bob);
    eprintln!(
        "the older session ended {:?} after the second log-in began",
        t.elapsed()
    );
    assert_ne!(r.code, 0, "{}", r.json);
    let text = format!("{}{}", r.json, r.stderr);
    assert!(
        text.contains("logged in on another gateway"),
        "{text}\ngw1:\n{}",
        g1.log_text()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_callee_gateway_killed_mid_call_ends_the_call_with_peer_lost() {
    let Some(mut f) = fleet(2) else { return };
    let mark = f.gws[1].log_len();
    let _carol = spawn_phone(&f.gws[1], "carol", &["--answer", "--wait", "60"]);
    f.gws[1].wait_online(mark, "carol");
    let alice = spawn_phone(
        &f.gws[0],
        "alice",
        &["--call", "+15550003", "--duration", "30"],
    );
    let err = alice.stderr.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("media is up")
    {
        assert!(Instant::now() < deadline, "the call did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(f.gws[1].pid(), libc::SIGKILL) };
    let r = common::finish(alice);
    let took = killed.elapsed();
    eprintln!("the caller was told {took:?} after kill -9 of the callee's gateway");
    assert_eq!(r.json["hangup_reason"], "peer_lost", "{}", r.json);
    // carol lists no other gateway: nobody resumes the call, which ends once the grace is
    // over (not before: the call waited for her).
    let grace = Duration::from_millis(RESUME_GRACE_MS);
    assert!(
        took >= grace && took < grace + Duration::from_secs(8),
        "{took:?}"
    );
    assert!(
        f.gws[0].log_text().contains("a fleet node is gone"),
        "{}",
        f.gws[0].log_text()
    );
    f.gws.truncate(1);
}

#[test]
fn a_wrong_redis_password_stops_the_start_without_showing_it() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pw = private_file(dir.path(), "redis.pass", "not-the-Password-42\n");
    let key = private_file(dir.path(), "fleet.key", KEY);
    let conf = dir.path().join("gw.toml");
    std::fs::write(
        &conf,
        format!(
            "[fleet]\nredis = \"redis://{USER}@127.0.0.1:{}/\"\npassword_file = \"{}\"\nkey_file = \"{}\"\n",
            redis.port,
            pw.display(),
            key.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--config", conf.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1",
            "--control-port",
            "0",
            "--media-port-base",
            "0",
            "--probe-ports",
            "0,0",
            "--shards",
            "1",
            "--no-pin",
            "--no-admin",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "fleet: Redis at redis://{USER}@127.0.0.1:{}/ is unavailable",
            redis.port
        )),
        "{err}"
    );
    assert!(!err.contains("not-the-Password-42"), "{err}");
}

#[test]
fn a_conference_with_members_on_three_gateways() {
    let Some(f) = fleet(3) else { return };
    let (g1, g2, g3) = (&f.gws[0], &f.gws[1], &f.gws[2]);
    let clip = test_clip(g1.dir.path(), "speech-8k.wav", "conf.wav", 1.0);
    let mut members = Vec::new();
    for (gw, user) in [(g2, "bob"), (g3, "carol")] {
        let mark = gw.log_len();
        members.push(spawn_phone(
            gw,
            user,
            &[
                "--answer",
                "--play",
                clip.to_str().unwrap(),
                "--duration",
                "3",
                "--wait",
                "20",
            ],
        ));
        gw.wait_online(mark, user);
    }
    let alice = common::run_phone(
        g1,
        "alice",
        &[
            "--conference",
            "+15550002,+15550003",
            "--play",
            clip.to_str().unwrap(),
            "--duration",
            "3",
        ],
    );
    let results: Vec<common::PhoneResult> = members.into_iter().map(common::finish).collect();
    assert_eq!(alice.code, 0, "{}\n{}", alice.json, alice.stderr);
    for (who, r) in [
        ("alice", &alice),
        ("bob", &results[0]),
        ("carol", &results[1]),
    ] {
        assert_eq!(
            r.code,
            0,
            "{who}: {}\n{}\ngw1:\n{}\ngw2:\n{}",
            r.json,
            r.stderr,
            g1.log_text(),
            g2.log_text()
        );
        // Each hears both others (two sources), through gw1.
        assert_eq!(r.json["result"], "completed", "{who}: {}", r.json);
        let got = r.json["received"]["packets"].as_u64().unwrap();
        eprintln!(
            "{who} received {got} packets from {} sources",
            r.json["received"]["ssrcs"]
        );
        assert!(got >= 100, "{who} received {got}: {}", r.json);
        assert_eq!(
            r.json["received"]["ssrcs"], 2,
            "{who} hears both others: {}",
            r.json
        );
    }
    // The organizer's gateway relayed the room; the members' gateways relayed nothing.
    let into = |g: &Gateway| metric(g, "voxgate_shard_packets_total", "direction=\"in\"");
    assert!(into(g1) >= 100.0, "{}", into(g1));
    assert_eq!(into(g2), 0.0);
    assert_eq!(into(g3), 0.0);
}

/// Checks a finished call's two phones: completed, nothing lost, audio byte-exact both ways.
fn check_call(
    (caller, callee): (common::PhoneResult, common::PhoneResult),
    clips: &Clips,
    logs: &str,
) {
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        assert_eq!(r.code, 0, "{who}: {}\n{}\n{logs}", r.json, r.stderr);
        assert_eq!(r.json["result"], "completed", "{who}: {}\n{logs}", r.json);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
    clips.assert_heard(("caller", "callee"));
}

/// A Redis restart (stop, outage, start empty) while a call across gateways is in progress:
/// the call goes on to its end with every packet and the audio byte-exact; a new call across
/// gateways during the outage gets a clear refusal (`hang_up{error}`) and the gateway logs
/// why; once Redis is back, the gateways write the presence of their logged-in subscribers
/// again (measured, asserted within 5 s with 1 s heart-beats) and a new call across gateways
/// reaches a subscriber who logged in before the restart.
#[test]
fn a_redis_restart_keeps_calls_and_presence_comes_back() {
    let Some(mut f) = fleet(2) else { return };
    // dave (gw2) places the call during the outage.
    let out = common::run_with_stdin(
        std::process::Command::new(common::BIN)
            .args([
                "user",
                "add",
                "dave",
                "--number",
                "+15550004",
                "--password-stdin",
            ])
            .args(["--directory", &f.pg.url("dir"), "--data-dir"])
            .arg(f._cfg.path().join("cli-data"))
            .env("PGPASSWORD", &f.pg.password),
        &format!("{}\n", common::password("dave")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (g1, g2) = (&f.gws[0], &f.gws[1]);
    let dir = g1.dir.path().to_owned();
    // The call in progress: alice (gw1) → bob (gw2), 12 s of audio each way.
    let first = Clips::new(&dir, "r", 12.0, 12.0);
    let mark = g2.log_len();
    let bob = spawn_phone(g2, "bob", &first.answering("30"));
    g2.wait_online(mark, "bob");
    // carol (gw2) logs in before the restart and answers a call after it.
    let second = Clips::new(&dir, "r2", 1.6, 1.2);
    let mark = g2.log_len();
    let carol = spawn_phone(g2, "carol", &second.answering("60"));
    g2.wait_online(mark, "carol");
    let alice = spawn_phone(g1, "alice", &first.calling("+15550002"));
    // Media flows through gw1 (the caller's gateway relays).
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(g1, "voxgate_shard_packets_total", "direction=\"in\"") < 50.0 {
        assert!(Instant::now() < deadline, "the call never carried media");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Redis goes away.
    f.redis.stop();
    let r = common::run_phone(g2, "dave", &["--call", "+15550001"]);
    assert_eq!(r.json["result"], "failed", "{}", r.json);
    assert_eq!(r.json["hangup_reason"], "error", "{}", r.json);
    let log2 = g2.log_text();
    assert!(
        log2[..].contains("fleet: Redis"),
        "gw2 does not say Redis failed:\n{log2}"
    );
    // Redis is back, empty (no persistence): presence is written again by the refreshes.
    f.redis.restart();
    let back = Instant::now();
    for (user, node) in [("alice", "gw1"), ("bob", "gw2"), ("carol", "gw2")] {
        while presence(&f.redis, user).as_deref() != Some(node) {
            assert!(
                back.elapsed() < Duration::from_secs(5),
                "{user}'s presence was not written again within 5 s\ngw1:\n{}\ngw2:\n{}",
                f.gws[0].log_text(),
                f.gws[1].log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let rewritten = back.elapsed();
    // The call in progress runs to its end, whole.
    let logs = || {
        format!(
            "gw1:\n{}\ngw2:\n{}",
            f.gws[0].log_text(),
            f.gws[1].log_text()
        )
    };
    check_call(
        (common::finish(alice), common::finish(bob)),
        &first,
        &logs(),
    );
    // A new call across gateways reaches carol, logged in before the restart.
    let dialled = Instant::now();
    let alice = spawn_phone(&f.gws[0], "alice", &second.calling("+15550003"));
    check_call(
        (common::finish(alice), common::finish(carol)),
        &second,
        &logs(),
    );
    eprintln!(
        "Redis restart: presence written again {rewritten:?} after Redis was back; a new call \
         across gateways completed {:?} after it ({:?} for the call itself)",
        back.elapsed(),
        dialled.elapsed()
    );
}

/// Every transport plan of Table 1 across two gateways (the caller's relays), forced by the
/// phones' simulated firewalls as `e2e_loopback` does on one gateway: each plan both phones
/// report is the planner's, and the audio is byte-exact both ways.
#[test]
fn every_plan_carries_audio_across_gateways() {
    let Some(f) = fleet(2) else { return };
    let (g1, g2) = (&f.gws[0], &f.gws[1]);
    let direct = ("direct_udp", "direct_udp");
    let (t, u) = ("tcp_in_udp_out", "udp_in_tcp_out");
    for (fw, plan) in [
        (("open", "open"), direct),
        (("no-udp", "open"), (t, u)),
        (("open", "no-udp"), (u, t)),
        (("no-udp", "no-udp"), ("tcp_both", "tcp_both")),
        (("no-udp-out", "no-udp-in"), ("tcp_both", "direct_udp")),
        (("open", "no-udp-out"), ("direct_udp", "tcp_in_udp_out")),
    ] {
        call_across_planned(g1, "alice", g2, "bob", "+15550002", fw, Some(plan));
    }
}
