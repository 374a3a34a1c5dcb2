//! The directory on PostgreSQL, against a private server each test starts
//! (`common::pg::PgServer`: own port, data directory and socket; as `nobody` when run as root).
//! - the shared Store contract (`voxgate::store::contract`), the same cases SQLite passes;
//! - migrations: idempotent, concurrent openers, a newer schema refused;
//! - `voxgate user add` / `route add` against PostgreSQL (password from `PGPASSWORD`, a
//!   password file or `VOXGATE_DIRECTORY`), then `voxgate serve` on it: log-in and a call with
//!   byte-exact audio;
//! - PostgreSQL stopped during a call: log-ins are refused `unavailable` with the reason in
//!   the log, the call goes on, and log-ins work again by themselves once it is back.
//! - a password on the command line is refused and never echoed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::{BIN, Gateway, run_with_stdin, spawn_phone, test_clip, ulaw_round_trip_padded};
use voxgate::client::wav;
use voxgate::store::{Location, PostgresStore, Store, StoreError, contract};

fn store_on(pg: &PgServer, db: &str) -> Result<PostgresStore, StoreError> {
    match Location::resolve(
        &pg.url_with_password(db),
        None,
        Duration::from_secs(5),
        std::path::Path::new("."),
    )? {
        Location::Postgres(t) => PostgresStore::connect(*t),
        other => panic!("not PostgreSQL: {other}"),
    }
}

#[test]
fn postgres_keeps_the_store_contract_and_migrates_once() {
    let Some(pg) = PgServer::start() else { return };
    let mut n = 0;
    contract::run_all("PostgreSQL", &mut || {
        n += 1;
        let db = format!("contract{n}");
        pg.create_db(&db);
        Box::new(store_on(&pg, &db).expect("connect")) as Box<dyn Store>
    });
    assert_eq!(n, contract::CASES.len());

    // Gateways starting at once: each migrates or finds it done; one schema results.
    pg.create_db("migrate");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = pg.url_with_password("migrate");
            std::thread::spawn(move || {
                let loc = Location::resolve(&url, None, Duration::from_secs(5), ".".as_ref())
                    .expect("location");
                loc.open().map(|_| ()).map_err(|e| e.to_string())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().expect("concurrent open");
    }
    let s = store_on(&pg, "migrate").unwrap();
    assert_eq!(
        s.schema_version().unwrap(),
        voxgate::store::postgres::MIGRATIONS.len() as i64
    );
    drop(s);
    // A database from a newer voxgate is refused, not misread.
    pg.client("migrate")
        .batch_execute("UPDATE voxgate_schema SET version = 99")
        .unwrap();
    assert!(matches!(
        store_on(&pg, "migrate"),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn a_wrong_password_is_named_without_the_password() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("dir");
    let out = Command::new(BIN)
        .args(["user", "list", "--directory", &pg.url("dir")])
        .env("PGPASSWORD", "not-the-Password-42")
        .env_remove("VOXGATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("directory {} is unavailable", pg.url("dir")))
            && err.contains("password authentication failed"),
        "{err}"
    );
    assert!(!err.contains("not-the-Password-42"), "{err}");
}

#[test]
fn a_password_on_the_command_line_is_refused() {
    for cmd in [
        &["user", "list"][..],
        &["route", "list"][..],
        &["serve", "--check-config"][..],
    ] {
        let out = Command::new(BIN)
            .args(cmd)
            .args([
                "--directory",
                "postgres://vox:Hunter2-secret@127.0.0.1:1/dir",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refusing a password on the command line") && err.contains("PGPASSWORD"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("Hunter2"), "{cmd:?}: {err}");
    }
}

/// The number of subscribers in the PostgreSQL directory.
fn pg_users(pg: &PgServer, db: &str) -> i64 {
    pg.client(db)
        .query_one("SELECT count(*) FROM subscribers", &[])
        .unwrap()
        .get(0)
}

#[test]
fn serve_on_postgres_logs_in_and_carries_a_call_byte_exact() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("dir");
    let url = pg.url("dir");
    let gw =
        Gateway::start_with_directory(&["--directory", &url], &[("PGPASSWORD", &pg.password)], &[]);
    // The users went to PostgreSQL, not to the SQLite file in the data directory.
    assert_eq!(pg_users(&pg, "dir"), 3);
    let local = common::run_ok(Command::new(BIN).args([
        "user",
        "list",
        "--data-dir",
        gw.dir.path().join("data").to_str().unwrap(),
    ]));
    assert!(local.stdout.is_empty(), "SQLite in the data dir has users");
    assert!(
        gw.log_text().contains(&format!("directory={url}")),
        "{}",
        gw.log_text()
    );

    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "a-in.wav", 1.6);
    let b_in = test_clip(dir, "reply-8k.wav", "b-in.wav", 1.2);
    let (a_rec, b_rec) = (dir.join("a-rec.wav"), dir.join("b-rec.wav"));
    let mark = gw.log_len();
    let callee = spawn_phone(
        &gw,
        "bob",
        &[
            "--answer",
            "--play",
            b_in.to_str().unwrap(),
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    let caller = common::run_phone(
        &gw,
        "alice",
        &[
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--record",
            a_rec.to_str().unwrap(),
            "--firewall",
            "no-udp",
        ],
    );
    let callee = common::finish(callee);
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        assert_eq!(r.code, 0, "{who}: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["result"], "completed", "{who}: {}", r.json);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
    for (sent, rec, who) in [
        (&a_in, &b_rec, "bob hears alice"),
        (&b_in, &a_rec, "alice hears bob"),
    ] {
        let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
        let got = wav::read(rec).unwrap();
        assert!(got.len() >= want.len(), "{who}: recording too short");
        assert!(got[..want.len()] == want[..], "{who}: audio differs");
    }
}

/// `voxgate probe` as `user`: its exit code and standard error.
fn probe(gw: &Gateway, user: &str, password: &str) -> (Option<i32>, String) {
    let out = run_with_stdin(
        Command::new(BIN).args([
            "probe",
            "--server",
            &gw.control,
            "--user",
            user,
            "--password-stdin",
        ]),
        &format!("{password}\n"),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn postgres_down_refuses_log_ins_keeps_calls_and_comes_back_by_itself() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    pg.create_db("dir");
    // The gateway's credentials from VOXGATE_DIRECTORY (the URL with its password).
    let gw = Gateway::start_with_directory(
        &[],
        &[("VOXGATE_DIRECTORY", &pg.url_with_password("dir"))],
        &["--heartbeat-ms", "1000"],
    );
    // Another subscriber added with a password file (mode 0600).
    let pwfile = pg.password_file(gw.dir.path());
    let out = run_with_stdin(
        Command::new(BIN)
            .args([
                "user",
                "add",
                "dave",
                "--number",
                "+15550004",
                "--password-stdin",
            ])
            .args(["--directory", &pg.url("dir"), "--directory-password-file"])
            .arg(&pwfile)
            .env_remove("VOXGATE_DIRECTORY")
            .env_remove("PGPASSWORD"),
        "dave-password\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(probe(&gw, "dave", "dave-password").0, Some(0));

    // A call through the gateway (alice has no UDP: relayed over TCP), 8 s long.
    let mark = gw.log_len();
    let callee = spawn_phone(
        &gw,
        "bob",
        &["--answer", "--wait", "20", "--duration", "30"],
    );
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone(
        &gw,
        "alice",
        &[
            "--call",
            "+15550002",
            "--duration",
            "8",
            "--firewall",
            "no-udp",
        ],
    );
    gw.wait_log(mark, "the call's media", |l| {
        l.contains("media instructions sent")
    });

    pg.stop();
    let mark = gw.log_len();
    let (code, err) = probe(&gw, "carol", &common::password("carol"));
    assert_ne!(code, Some(0), "log-in without a directory: {err}");
    assert!(
        err.contains("unavailable") && err.contains("the directory is unavailable"),
        "{err}"
    );
    // The reason is in the gateway's log, naming the server (never its password).
    gw.wait_log(mark, "the reason of the refusal", |l| {
        l.contains("directory look-up failed") && l.contains(&pg.url("dir"))
    });
    assert!(!gw.log_text().contains(&pg.password));

    pg.restart();
    let back = Instant::now();
    loop {
        let (code, err) = probe(&gw, "carol", &common::password("carol"));
        if code == Some(0) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "log-ins still fail 10 s after PostgreSQL is back: {err}\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "log-ins work again {:?} after PostgreSQL is back",
        back.elapsed()
    );
    assert!(
        gw.log_text().contains("directory connection restored")
            || gw.log_text().contains("directory connection lost"),
        "{}",
        gw.log_text()
    );

    // The call went on through the outage and ended normally.
    let caller = common::finish(caller);
    let callee = common::finish(callee);
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        assert_eq!(
            r.json["result"], "completed",
            "{who}: {}\n{}",
            r.json, r.stderr
        );
        let packets = r.json["received"]["packets"].as_u64().unwrap_or(0);
        assert!(
            packets > 300,
            "{who} heard {packets} packets in 8 s: {}",
            r.json
        );
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
}

#[test]
fn a_store_reconnects_by_itself_with_back_off() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    pg.create_db("dir");
    let mut s = store_on(&pg, "dir").unwrap();
    s.add_user(&voxgate::store::Subscriber {
        user: "alice".into(),
        number: "+15550001".into(),
        verifier: voxgate::control::auth::Verifier::with_salt("pw", b"salt", 1),
        allow_prefixes: None,
    })
    .unwrap();

    // Restarted while the store was idle: the broken connection is replaced at once and
    // the read succeeds (nobody sees the restart).
    pg.stop();
    pg.restart();
    assert!(s.user("alice").unwrap().is_some());

    // Down: reads fail as Unavailable, naming the server; while the back-off runs, at once
    // and without trying the network.
    pg.stop();
    let e = s.user("alice").unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&pg.url("dir")), "{e}");
    // (A slow machine may pass a short back-off between two calls: the pauses double, so
    // one of a few calls in a row falls inside one.)
    let fast_refusal = (0..6).find_map(|_| {
        let t = Instant::now();
        let e = s.user("alice").unwrap_err().to_string();
        e.contains("next attempt to connect in")
            .then(|| t.elapsed())
    });
    let took = fast_refusal.expect("no call fell inside the back-off");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Writes fail the same way (and are never retried).
    assert!(matches!(
        s.del_user("alice"),
        Err(StoreError::Unavailable { .. })
    ));

    // Back: within the longest back-off, reads work again by themselves.
    pg.restart();
    let back = Instant::now();
    loop {
        match s.user("alice") {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) => assert!(
                back.elapsed() < voxgate::store::postgres::RETRY_MAX + Duration::from_secs(2),
                "still failing {:?} after the server came back: {e}",
                back.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "the store reconnected {:?} after the server came back",
        back.elapsed()
    );
}

#[test]
fn two_gateways_share_one_directory_and_edits_count_at_once() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("dir");
    let url = pg.url("dir");
    let env = [("PGPASSWORD", pg.password.as_str())];
    let a = Gateway::start_with_directory(&["--directory", &url], &env, &[]);
    let b = Gateway::start_with_directory(&["--directory", &url], &env, &[]);
    assert_eq!(pg_users(&pg, "dir"), 3, "one set of users for both");
    for gw in [&a, &b] {
        assert_eq!(probe(gw, "alice", &common::password("alice")).0, Some(0));
    }
    // A subscriber added next to gateway B logs in at gateway A at once.
    let out = run_with_stdin(
        Command::new(BIN)
            .args([
                "user",
                "add",
                "erin",
                "--number",
                "+15550005",
                "--password-stdin",
            ])
            .args(["--directory", &url])
            .env("PGPASSWORD", &pg.password),
        "erin-password\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(probe(&a, "erin", "erin-password").0, Some(0));
    // A password changed anywhere: the old one is refused everywhere at once.
    let out = run_with_stdin(
        Command::new(BIN)
            .args([
                "user",
                "passwd",
                "alice",
                "--password-stdin",
                "--directory",
                &url,
            ])
            .env("PGPASSWORD", &pg.password),
        "alice-new-password\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gw in [&a, &b] {
        let (code, err) = probe(gw, "alice", &common::password("alice"));
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("wrong user or password"), "{err}");
        assert_eq!(probe(gw, "alice", "alice-new-password").0, Some(0));
    }
}

#[test]
fn a_gateway_does_not_start_without_its_directory_and_says_why() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    pg.create_db("dir");
    let url = pg.url("dir");
    pg.stop();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--directory", &url, "--control-port", "0"])
        .args([
            "--media-port-base",
            "0",
            "--probe-ports",
            "0,0",
            "--no-admin",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .env("PGPASSWORD", &pg.password)
        .env_remove("VOXGATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("directory {url} is unavailable")),
        "{err}"
    );
    assert!(!err.contains(&pg.password), "{err}");
}

/// Look-up latency of the two backends, as a directory worker sees it (a log-in's `user` and a
/// dial's `route_for`), 2,000 each on 1,000 subscribers and 100 routes. A measurement, not a
/// gate: `cargo test --release --test fleet_pg lookup_latency -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run by hand"]
fn lookup_latency() {
    let Some(pg) = PgServer::start() else { return };
    pg.create_db("bench");
    let dir = tempfile::tempdir().unwrap();
    let mut backends: Vec<(&str, Box<dyn Store>)> = vec![
        (
            "SQLite (file, WAL)",
            Box::new(voxgate::store::SqliteStore::open(&dir.path().join("v.db")).unwrap()),
        ),
        (
            "PostgreSQL (loopback TCP)",
            Box::new(store_on(&pg, "bench").unwrap()),
        ),
    ];
    for (name, s) in &mut backends {
        let v = voxgate::control::auth::Verifier::with_salt("pw", b"0123456789abcdef", 4096);
        for i in 0..1000 {
            s.add_user(&voxgate::store::Subscriber {
                user: format!("user{i}"),
                number: format!("+1555{i:07}"),
                verifier: v.clone(),
                allow_prefixes: None,
            })
            .unwrap();
        }
        for i in 0..100 {
            s.add_route(&voxgate::store::Route {
                prefix: format!("+49{i}"),
                media_addr: "192.0.2.1:5004".parse().unwrap(),
                description: String::new(),
                ports: 1,
            })
            .unwrap();
        }
        let lat = |f: &mut dyn FnMut(usize)| {
            let mut v: Vec<Duration> = (0..2000)
                .map(|i| {
                    let t = Instant::now();
                    f(i);
                    t.elapsed()
                })
                .collect();
            v.sort();
            (v[v.len() / 2], v[v.len() * 99 / 100])
        };
        let (u50, u99) = lat(&mut |i| {
            assert!(s.user(&format!("user{}", i % 1000)).unwrap().is_some());
        });
        let (r50, r99) = lat(&mut |i| {
            assert!(
                s.route_for(&format!("+49{}12345", i % 100))
                    .unwrap()
                    .is_some()
            );
        });
        eprintln!("{name}: user() p50 {u50:?} p99 {u99:?}; route_for() p50 {r50:?} p99 {r99:?}");
    }
}
