//! Failover with real processes on loopback: phones configured with several gateways.
//! - `kill -9` of the gateway a call runs on (three gateways on one PostgreSQL directory): both
//!   phones are logged in on another within 5 s, the call is back within 3 s of the kill (the
//!   caller dials again), a new log-in works at once, and a call on a surviving gateway loses
//!   nothing (byte-exact both ways);
//! - SIGTERM drains a gateway: its call completes intact, its idle client is told `going_away`
//!   and logs in to the other gateway, a new log-in meanwhile lands on the other gateway, and
//!   the drained gateway exits once its call is over;
//! - a gateway that stops answering (SIGSTOP: heart-beats unanswered) is left for the next;
//! - PostgreSQL down while a phone's gateway dies: the other gateway refuses it `unavailable`
//!   (the directory), and it gets in by itself once PostgreSQL is back;
//! - a DNS SRV name (served by a DNS responder this test runs) orders the gateways by priority.
//!
//! Gateways listen on ports the kernel picks (port 0, named on their ready line); a dead
//! gateway's address is a port that was free a moment ago. Every process is killed when its
//! handle drops.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::pg::PgServer;
use common::{
    BIN, Gateway, PhoneResult, Proc, finish, run_with_stdin, spawn_phone_at, test_clip,
    ulaw_round_trip_padded,
};
use voxgate::client::wav;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `voxgate phone --json` as `user`, logging in to the first of `servers` that takes it.
fn phone(gw: &Gateway, servers: &[&Gateway], user: &str, args: &[&str]) -> Proc {
    let list: Vec<&str> = servers.iter().map(|g| g.control.as_str()).collect();
    spawn_phone_at(&[], gw, &list.join(","), user, args)
}

/// `voxgate probe --json` as `user` over `list` (a comma list): its JSON, stderr and how long
/// it took.
fn probe(list: &str, user: &str, extra: &[&str]) -> (serde_json::Value, String, Duration) {
    let t = Instant::now();
    let out = run_with_stdin(
        common::command(&[], BIN)
            .args([
                "probe",
                "--server",
                list,
                "--user",
                user,
                "--password-stdin",
                "--json",
            ])
            .args(extra),
        &format!("{}\n", common::password(user)),
    );
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    )
}

/// Adds a subscriber to the shared PostgreSQL directory.
fn add_user(pg: &PgServer, url: &str, user: &str, number: &str) {
    let out = run_with_stdin(
        Command::new(BIN)
            .args([
                "user",
                "add",
                user,
                "--number",
                number,
                "--password-stdin",
                "--directory",
                url,
            ])
            .env("PGPASSWORD", &pg.password)
            .env_remove("VOXGATE_DIRECTORY"),
        &format!("{}\n", common::password(user)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn completed(who: &str, r: &PhoneResult) {
    assert_eq!(r.code, 0, "{who}: {}\n{}", r.json, r.stderr);
    assert_eq!(r.json["result"], "completed", "{who}: {}", r.json);
}

/// `recorded` holds `sent` (after µ-law) exactly, from the start.
fn byte_exact(sent: &std::path::Path, recorded: &std::path::Path, who: &str) {
    let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
    let got = wav::read(recorded).unwrap();
    assert!(got.len() >= want.len(), "{who}: recording too short");
    assert!(got[..want.len()] == want[..], "{who}: audio differs");
}

/// A port on 127.0.0.1 with nothing listening (a gateway that is down).
fn dead_gateway() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

#[test]
fn kill_9_moves_phones_to_another_gateway_and_the_call_comes_back() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("dir");
    let url = pg.url("dir");
    let env = [("PGPASSWORD", pg.password.as_str())];
    let extra = ["--heartbeat-ms", "1000"];
    let a = Gateway::start_with_directory(&["--directory", &url], &env, &extra);
    let b = Gateway::start_with_directory(&["--directory", &url], &env, &extra);
    let c = Gateway::start_with_directory(&["--directory", &url], &env, &extra);
    add_user(&pg, &url, "dave", "+15550004");
    add_user(&pg, &url, "erin", "+15550005");

    let dir = a.dir.path().to_path_buf();
    let a_in = test_clip(&dir, "speech-8k.wav", "a-in.wav", 7.0);
    let b_in = test_clip(&dir, "reply-8k.wav", "b-in.wav", 6.0);
    let c_in = test_clip(&dir, "speech-8k.wav", "c-in.wav", 6.0);
    let d_in = test_clip(&dir, "reply-8k.wav", "d-in.wav", 5.0);
    let rec = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // On the surviving gateway B: carol calls dave.
    let mark_b = b.log_len();
    let dave = phone(
        &b,
        &[&b, &c],
        "dave",
        &[
            "--answer",
            "--play",
            &s(&d_in),
            "--record",
            &rec("d-rec.wav"),
            "--wait",
            "30",
        ],
    );
    b.wait_online(mark_b, "dave");
    // On A (the one to be killed): alice calls bob; both list A, B, C.
    let mark_a = a.log_len();
    let bob = phone(
        &a,
        &[&a, &b, &c],
        "bob",
        &[
            "--answer",
            "--play",
            &s(&b_in),
            "--record",
            &rec("b-rec.wav"),
            "--wait",
            "30",
        ],
    );
    a.wait_online(mark_a, "bob");
    let mark_b = b.log_len();
    let carol = phone(
        &b,
        &[&b, &c],
        "carol",
        &[
            "--call",
            "+15550004",
            "--play",
            &s(&c_in),
            "--record",
            &rec("c-rec.wav"),
        ],
    );
    let mark_a = a.log_len();
    let alice = phone(
        &a,
        &[&a, &b, &c],
        "alice",
        &[
            "--call",
            "+15550002",
            "--play",
            &s(&a_in),
            "--record",
            &rec("a-rec.wav"),
            "--firewall",
            "no-udp",
        ],
    );
    a.wait_log(mark_a, "alice's call on A", |l| {
        l.contains("media instructions sent")
    });
    b.wait_log(mark_b, "carol's call on B", |l| {
        l.contains("media instructions sent")
    });
    // Two seconds of the call, then A dies without a word.
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = unix_ms();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(a.pid(), libc::SIGKILL) }, 0);

    // A new log-in works at once, on the next gateway of the list (A is dead).
    let (j, err, took) = probe(&format!("{},{}", a.control, b.control), "erin", &[]);
    assert_eq!(j["result"], "ok", "{j}\n{err}");
    assert_eq!(j["gateway"], b.control.as_str(), "{j}");
    assert!(took < Duration::from_secs(5), "log-in took {took:?}");
    eprintln!("a new log-in with the dead gateway first in its list took {took:?}");

    let alice = finish(alice);
    let bob = finish(bob);
    let carol = finish(carol);
    let dave = finish(dave);

    // The survivors' call lost nothing.
    for (who, r) in [("carol", &carol), ("dave", &dave)] {
        completed(who, r);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
        assert_eq!(
            r.json["failovers"].as_array().map(Vec::len),
            Some(0),
            "{who}"
        );
        assert_eq!(r.json["gateway"], b.control.as_str(), "{who}");
    }
    byte_exact(&c_in, &dir.join("d-rec.wav"), "dave hears carol");
    byte_exact(&d_in, &dir.join("c-rec.wav"), "carol hears dave");

    // The killed gateway's phones moved on and the call came back.
    for (who, r) in [("alice", &alice), ("bob", &bob)] {
        completed(who, r);
        let f = &r.json["failovers"];
        assert_eq!(f.as_array().map(Vec::len), Some(1), "{who}: {}", r.json);
        let f = &f[0];
        assert_eq!(f["from"], a.control.as_str(), "{who}: {f}");
        assert_eq!(f["to"], b.control.as_str(), "{who}: {f}");
        let logged_in = f["logged_in_at_ms"].as_u64().expect("logged in again") - killed_at;
        let restored = f["call_restored_at_ms"]
            .as_u64()
            .expect("the call came back")
            - killed_at;
        eprintln!(
            "{who}: logged in on B {logged_in} ms after the kill, call back after {restored} ms \
             ({})",
            f["reason"]
        );
        assert!(logged_in < 5000, "{who}: {logged_in} ms");
        assert!(restored < 3000, "{who}: {restored} ms");
        assert_eq!(r.json["media_segments"], 2, "{who}: {}", r.json);
        assert_eq!(r.json["gateway"], b.control.as_str(), "{who}");
    }
    // B's log has the call placed again, by alice.
    assert!(
        b.log_text().contains("user=alice"),
        "alice never logged in on B:\n{}",
        b.log_text()
    );
    // Bob heard the end of alice's clip through B, exactly (the part sent after the call
    // came back).
    let want = ulaw_round_trip_padded(&wav::read(&a_in).unwrap());
    let got = wav::read(&dir.join("b-rec.wav")).unwrap();
    let tail = &want[want.len() - 8000..want.len() - 160];
    assert!(
        got.windows(tail.len()).any(|w| w == tail),
        "the last second of alice's clip is not in bob's recording"
    );
    // Bob heard most of the call: at most the outage is missing.
    let heard = bob.json["received"]["packets"].as_u64().unwrap();
    assert!(heard > 250, "bob heard {heard} packets: {}", bob.json);
}

#[test]
fn sigterm_drains_a_gateway_keeping_its_call_and_moving_log_ins() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("dir");
    let url = pg.url("dir");
    let env = [("PGPASSWORD", pg.password.as_str())];
    let mut a =
        Gateway::start_with_directory(&["--directory", &url], &env, &["--shutdown-grace-s", "30"]);
    let b = Gateway::start_with_directory(&["--directory", &url], &env, &[]);
    add_user(&pg, &url, "dave", "+15550004");
    let dir = b.dir.path().to_path_buf();
    let a_in = test_clip(&dir, "speech-8k.wav", "a-in.wav", 5.0);
    let b_in = test_clip(&dir, "reply-8k.wav", "b-in.wav", 4.0);
    let rec = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // carol waits on A for a call that will come to her on B.
    let mark = a.log_len();
    let carol = phone(&a, &[&a, &b], "carol", &["--answer", "--wait", "30"]);
    a.wait_online(mark, "carol");
    let mark = a.log_len();
    let bob = phone(
        &a,
        &[&a, &b],
        "bob",
        &[
            "--answer",
            "--play",
            &s(&b_in),
            "--record",
            &rec("b-rec.wav"),
            "--wait",
            "30",
        ],
    );
    a.wait_online(mark, "bob");
    let mark = a.log_len();
    let alice = phone(
        &a,
        &[&a, &b],
        "alice",
        &[
            "--call",
            "+15550002",
            "--play",
            &s(&a_in),
            "--record",
            &rec("a-rec.wav"),
        ],
    );
    a.wait_log(mark, "the call on A", |l| {
        l.contains("media instructions sent")
    });
    std::thread::sleep(Duration::from_millis(500));

    // SIGTERM A (stop() waits for it to exit, and for its stats).
    let a_control = a.control.clone();
    let mark_b = b.log_len();
    let termed = Instant::now();
    let stopper = std::thread::spawn(move || {
        let stats = a.stop();
        (a, stats, termed.elapsed())
    });
    // carol, idle, is told to go and logs in to B.
    b.wait_online(mark_b, "carol");
    eprintln!("carol was on B {:?} after the SIGTERM", termed.elapsed());
    // A new log-in meanwhile, A first in its list: B takes it.
    let (j, err, took) = probe(&format!("{a_control},{}", b.control), "dave", &[]);
    assert_eq!(j["result"], "ok", "{j}\n{err}");
    assert_eq!(j["gateway"], b.control.as_str(), "{j}");
    assert!(
        !stopper.is_finished(),
        "A finished draining before the log-in was tried: the test proves nothing"
    );
    eprintln!("a log-in during the drain took {took:?}");
    // And carol can be called on B.
    let dave = phone(
        &b,
        &[&b],
        "dave",
        &["--call", "+15550003", "--duration", "1"],
    );

    let (a, _stats, exited) = stopper.join().unwrap();
    let alice = finish(alice);
    let bob = finish(bob);
    for (who, r) in [("alice", &alice), ("bob", &bob)] {
        completed(who, r);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
        assert_eq!(
            r.json["failovers"].as_array().map(Vec::len),
            Some(0),
            "{who}: the call stayed on A"
        );
    }
    byte_exact(&a_in, &dir.join("b-rec.wav"), "bob hears alice");
    byte_exact(&b_in, &dir.join("a-rec.wav"), "alice hears bob");
    // A waited for its call (5 s of audio), then exited.
    assert!(exited > Duration::from_secs(3), "A exited after {exited:?}");
    eprintln!("A exited {exited:?} after the SIGTERM, once its call was over");
    assert!(
        a.log_text().contains("drained: no calls left"),
        "{}",
        a.log_text()
    );
    let carol = finish(carol);
    let dave = finish(dave);
    completed("dave", &dave);
    completed("carol", &carol);
    let f = &carol.json["failovers"];
    assert_eq!(f.as_array().map(Vec::len), Some(1), "{}", carol.json);
    assert_eq!(f[0]["from"], a.control.as_str());
    assert_eq!(f[0]["to"], b.control.as_str());
    assert!(
        f[0]["reason"].as_str().unwrap().contains("going away"),
        "{}",
        f[0]
    );
}

#[test]
fn a_gateway_that_stops_answering_is_left_for_the_next() {
    let a = Gateway::start(&["--heartbeat-ms", "1000"]);
    let b = Gateway::start(&["--heartbeat-ms", "1000"]);
    let mark = a.log_len();
    let carol = phone(&a, &[&a, &b], "carol", &["--answer", "--wait", "30"]);
    a.wait_online(mark, "carol");
    let mark_b = b.log_len();
    let stopped = Instant::now();
    // SAFETY: signalling our own child (it is killed on drop, stopped or not).
    assert_eq!(unsafe { libc::kill(a.pid(), libc::SIGSTOP) }, 0);
    b.wait_online(mark_b, "carol");
    let took = stopped.elapsed();
    eprintln!("carol was on B {took:?} after A stopped answering");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // She is reachable there.
    let bob = phone(
        &b,
        &[&b],
        "bob",
        &["--call", "+15550003", "--duration", "1"],
    );
    let bob = finish(bob);
    let carol = finish(carol);
    completed("bob", &bob);
    completed("carol", &carol);
    let f = &carol.json["failovers"][0];
    assert_eq!(f["from"], a.control.as_str(), "{}", carol.json);
    assert_eq!(f["to"], b.control.as_str());
    assert!(
        f["reason"].as_str().unwrap().contains("said nothing"),
        "{f}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(a.pid(), libc::SIGCONT) };
}

/// A DNS responder on 127.0.0.1 that answers SRV queries for `name` with `records`
/// (priority, weight, port, target) and NXDOMAIN for anything else; counts the SRV queries.
fn dns_responder(
    name: &'static str,
    records: Vec<(u16, u16, u16, &'static str)>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::rdata::SRV;
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_op_code(q.op_code())
                .set_recursion_desired(q.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            r.add_queries(q.queries().to_vec());
            let want = Name::from_ascii(name).unwrap();
            match q.queries().first() {
                Some(query) if query.name() == &want && query.query_type() == RecordType::SRV => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    for (p, w, port, target) in &records {
                        let t = Name::from_ascii(target).unwrap();
                        r.add_answer(Record::from_rdata(
                            want.clone(),
                            60,
                            RData::SRV(SRV::new(*p, *w, *port, t)),
                        ));
                    }
                }
                _ => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, from);
            }
        }
    });
    (addr, asked)
}

#[test]
fn an_srv_name_lists_the_gateways_by_priority() {
    let b = Gateway::start(&[]);
    let b_port: u16 = b.control.rsplit(':').next().unwrap().parse().unwrap();
    let dead_port: u16 = dead_gateway().rsplit(':').next().unwrap().parse().unwrap();
    let (dns, asked) = dns_responder(
        "_voxgate._tcp.voxgate.test.",
        vec![
            (20, 5, b_port, "localhost."),
            (10, 5, dead_port, "localhost."),
        ],
    );
    let dns = dns.to_string();
    let out = run_with_stdin(
        common::command(&[], BIN).args([
            "probe",
            "--gateway",
            "_voxgate._tcp.voxgate.test",
            "--resolver",
            &dns,
            "--user",
            "alice",
            "--password-stdin",
            "--json",
        ]),
        &format!("{}\n", common::password("alice")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    assert_eq!(j["result"], "ok", "{j}\n{err}");
    // The priority-10 target was tried first (and was down), then B.
    assert_eq!(j["gateway"], format!("localhost:{b_port}"), "{j}");
    assert!(err.contains(&format!("localhost:{dead_port}")), "{err}");
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // A name that does not exist: a clear failure naming it.
    let out = run_with_stdin(
        common::command(&[], BIN).args([
            "probe",
            "--gateway",
            "_nothing._tcp.voxgate.test",
            "--resolver",
            &dns,
            "--user",
            "alice",
            "--password-stdin",
        ]),
        &format!("{}\n", common::password("alice")),
    );
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("_nothing._tcp.voxgate.test") && err.contains("resolve"),
        "{err}"
    );
}

#[test]
fn a_phone_that_lost_its_gateway_while_postgres_is_down_gets_in_when_it_returns() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    pg.create_db("dir");
    let url = pg.url("dir");
    let env = [("PGPASSWORD", pg.password.as_str())];
    let a = Gateway::start_with_directory(&["--directory", &url], &env, &[]);
    let b = Gateway::start_with_directory(&["--directory", &url], &env, &[]);
    let mark = a.log_len();
    let carol = phone(&a, &[&a, &b], "carol", &["--answer", "--wait", "40"]);
    a.wait_online(mark, "carol");

    // The directory goes down, then carol's gateway dies: B cannot check her password.
    pg.stop();
    let mark_b = b.log_len();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(a.pid(), libc::SIGKILL) }, 0);
    b.wait_log(mark_b, "carol's log-in refused for the directory", |l| {
        l.contains("directory look-up failed") && l.contains(&url)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !b.log_text()
            .lines()
            .any(|l| l.contains("logged in") && l.contains("user=carol")),
        "carol logged in without a directory"
    );

    // It comes back: carol gets in by herself, and can be called.
    pg.restart();
    let back_ms = unix_ms();
    let back = Instant::now();
    b.wait_online(mark_b, "carol");
    eprintln!(
        "carol logged in on B {:?} after PostgreSQL was back",
        back.elapsed()
    );
    let bob = phone(
        &b,
        &[&b],
        "bob",
        &["--call", "+15550003", "--duration", "1"],
    );
    let bob = finish(bob);
    let carol = finish(carol);
    completed("bob", &bob);
    completed("carol", &carol);
    let f = &carol.json["failovers"][0];
    assert_eq!(f["to"], b.control.as_str(), "{}", carol.json);
    assert!(f["logged_in_at_ms"].as_u64().unwrap() >= back_ms, "{f}");
    // What she was told meanwhile, in words.
    assert!(
        carol.stderr.contains("the directory is unavailable"),
        "{}",
        carol.stderr
    );
}
