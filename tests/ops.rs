//! Operating voxgate: records a carrier can correlate (ids unique across restarts and
//! gateways, one log line per ended call), store errors that say which file and why.

mod common;

use std::process::Command;

use common::{BIN, Gateway, run_phone, run_with_stdin, spawn_phone};

const ID_LIMIT: u64 = 1 << 53;
/// Packets a gateway may relay to a phone that the gateway hung up, beyond what the phone
/// received: the phone takes what had arrived before it stops, so only a send the shard had
/// not yet handed to the kernel when the record was taken.
const IN_FLIGHT: u64 = 5;
/// How long a loaded machine's gateway may take to act on a phone's own hang-up. Nothing
/// acknowledges a client's `hang_up`: the phone stops receiving when it sends it, and the
/// gateway relays to it until it handles it (on a loaded 2-core machine, hundreds of ms; the
/// old bound of 5 packets, 100 ms, failed there).
const HANG_UP_LATENCY_S: u64 = 1;

/// What the gateway may have relayed to `phone` beyond what it received, `streams` RTP
/// streams of 50 packets a second coming its way: a phone that hung up itself gets the
/// gateway's reaction time.
fn allowance(phone: &serde_json::Value, streams: u64) -> u64 {
    if phone["ended_by"] == "local" {
        IN_FLIGHT + 50 * streams * HANG_UP_LATENCY_S
    } else {
        IN_FLIGHT
    }
}

/// The start second encoded in an id (see `control::records::id_base`).
fn id_second(id: u64) -> u64 {
    (id >> 22) + 1_735_689_600
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `key=value` of a log line (values may be quoted).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"'))
}

#[test]
fn call_ids_are_unique_across_restarts_and_every_ended_call_is_logged() {
    let before = unix_now();
    let mut ids = Vec::new();
    for _ in 0..2 {
        // A new gateway each time: a restart, or another gateway.
        let mut gw = Gateway::start(&[]);
        let mark = gw.log_len();
        // Refused: nobody has the number.
        let r = run_phone(&gw, "alice", &["--call", "+15559999"]);
        assert_eq!(r.json["hangup_reason"], "not_found", "{}", r.json);
        let refused = r.json["call"].as_u64().expect("call id");
        // Answered (unanswered calls: the sim test `every_ended_call_closes_one_record`).
        let callee = spawn_phone(&gw, "bob", &["--answer", "--wait", "20", "--duration", "1"]);
        gw.wait_online(mark, "bob");
        let r = run_phone(&gw, "alice", &["--call", "+15550002", "--duration", "1"]);
        assert_eq!(r.json["result"], "completed", "{}", r.json);
        let answered = r.json["call"].as_u64().expect("call id");
        let _ = common::finish(callee);
        gw.stop();
        let log = gw.log_text();
        for id in [refused, answered] {
            assert!(id < ID_LIMIT, "{id} does not fit a JavaScript number");
            let s = id_second(id);
            assert!(s >= before && s <= unix_now(), "id {id} encodes second {s}");
            // One INFO line for the call, with both numbers, the reason and the duration.
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("call ended") && field(l, "call") == Some(&id.to_string()))
                .collect();
            assert_eq!(lines.len(), 1, "call {id}:\n{log}");
            let l = lines[0];
            assert!(l.contains("INFO"), "{l}");
            assert_eq!(field(l, "from"), Some("+15550001"), "{l}");
            let conn: u64 = field(l, "conn").and_then(|c| c.parse().ok()).expect(l);
            assert!(
                conn < ID_LIMIT && id_second(conn) >= before,
                "conn id {conn}: {l}"
            );
            assert!(field(l, "duration_s").is_some(), "{l}");
            if id == refused {
                assert_eq!(field(l, "to"), Some("+15559999"), "{l}");
                assert_eq!(field(l, "reason"), Some("not_found"), "{l}");
                assert_eq!(field(l, "answered"), Some("false"), "{l}");
            } else {
                assert_eq!(field(l, "to"), Some("+15550002"), "{l}");
                assert_eq!(field(l, "reason"), Some("normal"), "{l}");
                assert_eq!(field(l, "answered"), Some("true"), "{l}");
            }
        }
        ids.extend([refused, answered]);
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat across runs: {ids:?}");
}

#[test]
fn store_errors_name_the_file_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let add = |user: &str, number: &str, prefix: &[&str]| {
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args([
            "user",
            "add",
            user,
            "--number",
            number,
            "--password-stdin",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        run_with_stdin(&mut cmd, "a-good-password\n")
    };
    let out = add("alice", "+15550001", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The data directory on a read-only file system: a read-only bind mount in a private
    // mount namespace (nothing outside the test sees it).
    let d = data.to_str().unwrap();
    let script = format!("mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec \"$@\"",);
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script, "sh", "true"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            let msg = format!("cannot make a read-only mount (unshare -rm): {other:?}");
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return;
        }
    }
    let out = add(
        "bob",
        "+15550002",
        &["unshare", "-rm", "sh", "-c", &script, "sh"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let db = data.join("voxgate.db");
    assert!(
        err.contains(&format!("store {}:", db.display())),
        "names the file: {err}"
    );
    assert!(
        err.contains("Read-only file system"),
        "names the cause: {err}"
    );
}

/// The lines of a CDR file once it has `n` of them (records are written once the shard
/// reported the legs: shortly after the call ends).
fn cdr_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a CDR line is JSON"))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} has {} lines, want {n}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn calls_write_detail_records_that_rotate_on_sighup_and_voxgate_cdr_filters() {
    let gw = Gateway::start(&[]);
    let cdr = gw.dir.path().join("data/cdr.jsonl");
    let dir = gw.dir.path();
    let clip = common::test_clip(dir, "speech-8k.wav", "a-in.wav", 1.0);
    let mark = gw.log_len();
    let callee = spawn_phone(&gw, "bob", &["--answer", "--wait", "20", "--duration", "3"]);
    gw.wait_online(mark, "bob");
    // Alice cannot use UDP: both directions go through the gateway.
    let caller = run_phone(
        &gw,
        "alice",
        &[
            "--call",
            "+15550002",
            "--play",
            clip.to_str().unwrap(),
            "--firewall",
            "no-udp",
        ],
    );
    let callee = common::finish(callee);
    assert_eq!(caller.code, 0, "{}\n{}", caller.json, caller.stderr);
    assert_eq!(callee.code, 0, "{}\n{}", callee.json, callee.stderr);
    let call = caller.json["call"].as_u64().unwrap();
    let lines = cdr_lines(&cdr, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let r = &lines[0];
    assert_eq!(r["call"].as_u64(), Some(call), "{r}");
    assert_eq!(r["caller"]["number"], "+15550001", "{r}");
    assert_eq!(r["callee"]["number"], "+15550002", "{r}");
    assert_eq!(r["callee"]["user"], "bob", "{r}");
    assert_eq!(r["reason"], "normal", "{r}");
    assert!(r["answered"].is_string(), "{r}");
    for k in ["set_up", "answered", "ended"] {
        let t = r[k].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{k}: {t}"
        );
    }
    assert!(r["talk_s"].as_f64().unwrap() > 0.5, "{r}");
    // What the gateway relayed each way is what each phone received.
    assert_eq!(r["forward"]["via_gateway"], true, "{r}");
    assert_eq!(r["forward"]["send"], "tcp", "{r}");
    // (A packet relayed just as the receiver hung up was sent but not received.)
    for (dir, phone) in [("forward", &callee), ("backward", &caller)] {
        let relayed = r[dir]["packets"].as_u64().unwrap();
        let received = phone.json["received"]["packets"].as_u64().unwrap();
        assert!(
            (received..=received + allowance(&phone.json, 1)).contains(&relayed),
            "{dir}: relayed {relayed}, received {received}: {r}\n{}",
            phone.json
        );
    }
    let fwd = r["forward"]["packets"].as_u64().unwrap();
    assert!(
        fwd >= 50 && fwd <= caller.json["sent"]["packets"].as_u64().unwrap(),
        "{r}"
    );
    // Per-leg quality: loopback loses nothing; the MOS is toll quality.
    let legs = r["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 2, "{r}");
    for l in legs {
        assert_eq!(l["lost"], 0, "{l}");
        assert!(l["mos"].as_f64().unwrap() > 4.3, "{l}");
    }

    // logrotate: rename, SIGHUP; the next record goes to a new file.
    let rotated = dir.join("cdr.jsonl.1");
    std::fs::rename(&cdr, &rotated).unwrap();
    let mark = gw.log_len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the reopen", |l| {
        l.contains("call detail records reopened")
    });
    let r = run_phone(&gw, "alice", &["--call", "+15559999"]);
    assert_eq!(r.json["hangup_reason"], "not_found");
    let new = cdr_lines(&cdr, 1);
    assert_eq!(new[0]["reason"], "not_found", "{:?}", new);
    assert!(new[0]["answered"].is_null());
    assert_eq!(
        cdr_lines(&rotated, 1).len(),
        1,
        "the old file is left alone"
    );

    // `voxgate cdr` prints and filters.
    let cdr_cmd = |file: &std::path::Path, args: &[&str]| {
        Command::new(BIN)
            .arg("cdr")
            .arg(file)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cdr_cmd(&rotated, &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("call {call}  +15550001 -> +15550002  normal (")),
        "{text}"
    );
    let out = cdr_cmd(&rotated, &["--number", "+15550002", "--json"]);
    let got: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints the stored line");
    assert_eq!(got["call"].as_u64(), Some(call));
    let out = cdr_cmd(&rotated, &["--reason", "busy"]);
    assert_eq!(out.status.code(), Some(1), "nothing matched");
    assert!(out.stdout.is_empty());
    let out = cdr_cmd(&cdr, &["--reason", "not_found", "--since", "2020-01-01"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("+15559999"));
    let out = cdr_cmd(&cdr, &["--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(out.status.code(), Some(1));
    let out = cdr_cmd(&cdr, &["--until", "last tuesday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a time like 2026-12-01T19:52:01Z"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_conference_record_lists_every_members_leg_even_after_it_left() {
    // Late media is delivered late, not dropped (stale age 5 s, not 300 ms): a shard starved
    // of CPU for a moment must not make two legs' counts alike.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("late.toml");
    std::fs::write(&cfg, "[media]\nstale_ms = 5000\n").unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let cdr = gw.dir.path().join("data/cdr.jsonl");
    let clip = common::test_clip(gw.dir.path(), "speech-8k.wav", "conf.wav", 1.0);
    let mark = gw.log_len();
    // Carol leaves after 1 s, bob and alice stay 4 s (alice sends silence: a caller with
    // --play would hang up when the clip is over, at about the time carol leaves).
    let mut members = Vec::new();
    for (user, secs) in [("bob", "4"), ("carol", "1")] {
        members.push(spawn_phone(
            &gw,
            user,
            &[
                "--answer",
                "--play",
                clip.to_str().unwrap(),
                "--duration",
                secs,
                "--wait",
                "20",
            ],
        ));
        gw.wait_online(mark, user);
    }
    let alice = run_phone(
        &gw,
        "alice",
        &["--conference", "+15550002,+15550003", "--duration", "4"],
    );
    let results: Vec<common::PhoneResult> = members.into_iter().map(common::finish).collect();
    assert_eq!(alice.code, 0, "{}\n{}", alice.json, alice.stderr);
    let r = &cdr_lines(&cdr, 1)[0];
    assert_eq!(r["conference"], true, "{r}");
    assert_eq!(r["call"], alice.json["call"], "{r}");
    assert_eq!(r["callee"]["number"], "+15550002,+15550003", "{r}");
    let legs = r["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 3, "{r}");
    // What the gateway sent each member's leg is what the member received, carol's too,
    // counted when she left (plus what it relayed while a phone's own hang-up was on its
    // way). Each phone matches its own leg: carol's 1 s (two streams: 100 packets) is far
    // from bob's 4 s (100, then 150 from alice alone).
    let phones = [
        ("caller", &alice),
        ("member", &results[0]),
        ("member", &results[1]),
    ];
    let mut matched = Vec::new();
    for (party, p) in phones {
        let received = p.json["received"]["packets"].as_u64().unwrap();
        assert!(received >= 50, "{}", p.json);
        let most = received + allowance(&p.json, 2);
        let mine: Vec<usize> = (0..legs.len())
            .filter(|&i| {
                legs[i]["party"] == party
                    && legs[i]["sent_packets"]
                        .as_u64()
                        .is_some_and(|s| (received..=most).contains(&s))
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "one {party} leg sent {received}..={most} packets: {r}\n{}",
            p.json
        );
        matched.push(mine[0]);
    }
    matched.sort_unstable();
    matched.dedup();
    assert_eq!(matched.len(), 3, "each phone has its own leg: {r}");
}
