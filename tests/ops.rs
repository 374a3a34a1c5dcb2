//! Operating voxgate: records a carrier can correlate (ids unique across restarts and
//! gateways, one log line per ended call), store errors that say which file and why.

mod common;

use std::process::Command;

use common::{BIN, Gateway, run_phone, run_with_stdin, spawn_phone};

const ID_LIMIT: u64 = 1 << 53;

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
