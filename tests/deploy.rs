//! Deployment: configuration validation, the systemd unit and sysctl drop-in, SIGHUP reload
//! with a live call, SIGTERM drain with a call in progress, and `voxgate stats` on real dumps.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    BIN, Gateway, finish, run_with_stdin, spawn_phone, test_clip, ulaw_round_trip_padded,
};
use voxgate::client::wav;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("voxgate.toml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--config", f.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() {
    let example = std::fs::read_to_string(repo("systemd/voxgate.toml")).unwrap();
    let (code, out, err) = check_config(&example);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"), "{out}");

    let (code, _, err) = check_config("[server]\ncontrol_prot = 7400\n");
    assert_eq!(code, 2);
    assert!(err.contains("control_prot"), "names the unknown key: {err}");

    let (code, _, err) = check_config("[media]\nbuf_size = 1000\n[presence]\nmisses = 0\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("media.buf_size") && err.contains("presence.misses"),
        "{err}"
    );
    assert!(err.contains("multiple of 64"), "says what is wrong: {err}");

    let (code, _, err) = check_config("[server]\nlisten = \"nowhere\"\n");
    assert_eq!(code, 2);
    assert!(err.contains("listen"), "{err}");

    // Flags override the file, and are validated the same way.
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--coalesce-us", "50000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("media.coalesce_us"));
}

#[test]
fn systemd_unit_verifies() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!(
            "\n*** systemd-analyze is missing (apt-get install systemd): unit NOT verified ***\n"
        );
        assert!(!ci(), "CI=true: systemd-analyze must be available");
        return;
    }
    // `verify` checks that ExecStart's program exists: point it at the binary just built,
    // everything else as shipped.
    let unit = std::fs::read_to_string(repo("systemd/voxgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/voxgate serve"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("voxgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/voxgate", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "StateDirectory=voxgate",
        "LogsDirectory=voxgate",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=",
        "io_uring_setup io_uring_enter io_uring_register",
        "User=voxgate",
    ] {
        assert!(unit.contains(needed), "the unit sets {needed}");
    }
}

#[test]
fn sysctl_drop_in_names_real_keys() {
    let text = std::fs::read_to_string(repo("systemd/99-voxgate.conf")).unwrap();
    let mut n = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key = value");
        let proc = Path::new("/proc/sys").join(key.trim().replace('.', "/"));
        if key.trim() == "kernel.io_uring_disabled" && !proc.exists() {
            continue; // kernels before 6.6 have no switch: io_uring is simply on
        }
        assert!(
            proc.exists(),
            "{} is not a sysctl on this kernel",
            key.trim()
        );
        assert!(value.trim().parse::<u64>().is_ok(), "{line}");
        n += 1;
    }
    assert!(n >= 5);
}

/// A call that goes through the gateway (alice has no UDP at all), long enough to reload and
/// stop around it.
fn start_call(
    gw: &Gateway,
    secs: &str,
) -> (
    common::Proc,
    common::Proc,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "a-in.wav", 2.5);
    let b_rec = dir.join("b-rec.wav");
    let mark = gw.log_len();
    let callee = spawn_phone(
        gw,
        "bob",
        &[
            "--answer",
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone(
        gw,
        "alice",
        &[
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--duration",
            secs,
            "--firewall",
            "no-udp",
        ],
    );
    gw.wait_log(mark, "the call's media", |l| {
        l.contains("media instructions sent")
    });
    (caller, callee, a_in, b_rec)
}

fn assert_heard(sent: &Path, rec: &Path) {
    let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
    let got = wav::read(rec).unwrap();
    assert!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "the recording differs from what was sent"
    );
}

#[test]
fn sighup_reloads_without_dropping_a_call() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        "[server]\nlog_level = \"info\"\n[presence]\nheartbeat_ms = 10000\n",
    )
    .unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let (caller, callee, a_in, b_rec) = start_call(&gw, "4");
    // Change live settings and one that needs a restart, then SIGHUP mid-call.
    std::fs::write(
        &cfg,
        "[server]\nlog_level = \"debug\"\n[presence]\nheartbeat_ms = 5000\n[media]\ncoalesce_us = 0\n",
    )
    .unwrap();
    let mark = gw.log_len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the reload", |l| l.contains("configuration reloaded"));
    gw.wait_log(mark, "the restart-only key named", |l| {
        l.contains("media.coalesce_us needs a restart")
    });
    let (ra, rb) = (finish(caller), finish(callee));
    assert_eq!(ra.code, 0, "{}", ra.json);
    assert_eq!(rb.code, 0, "{}", rb.json);
    assert_eq!(rb.json["received"]["lost"], 0);
    assert_heard(&a_in, &b_rec);
    // A bad file is refused and the running configuration stays.
    std::fs::write(&cfg, "[presence]\nmisses = 0\n").unwrap();
    let mark = gw.log_len();
    // SAFETY: as above.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the refusal", |l| {
        l.contains("config not reloaded") && l.contains("presence.misses")
    });
    gw.stop();
}

#[test]
fn sigterm_drains_calls_then_exits_and_registrations_survive() {
    let mut gw = Gateway::start(&["--shutdown-grace-s", "20"]);
    let (caller, callee, a_in, b_rec) = start_call(&gw, "3");
    let mark = gw.log_len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    gw.wait_log(mark, "the drain", |l| l.contains("draining"));
    // No new log-ins while draining.
    let out = run_with_stdin(
        Command::new(BIN).args([
            "probe",
            "--server",
            &gw.control,
            "--user",
            "carol",
            "--password-stdin",
        ]),
        &format!("{}\n", common::password("carol")),
    );
    assert_ne!(out.status.code(), Some(0), "log-in refused while draining");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("unavailable"), "{:?}: {said}", out.status);
    // The call in progress finishes normally.
    let (ra, rb) = (finish(caller), finish(callee));
    assert_eq!(ra.code, 0, "{}", ra.json);
    assert_eq!(rb.code, 0, "{}", rb.json);
    assert_heard(&a_in, &b_rec);
    // Then the gateway exits by itself with status 0 (stop() asserts it).
    gw.wait_log(mark, "the end of the drain", |l| l.contains("drained"));
    let data = gw.dir.path().join("data");
    let stats = gw.stop();

    assert!(stats.contains("all"), "{stats}");
    // A restart on the same data keeps every registration.
    let out = Command::new(BIN)
        .args(["user", "list", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for u in ["alice", "bob", "carol"] {
        assert!(list.contains(u), "{list}");
    }
}

#[test]
fn stats_reads_real_dumps_and_draws_the_plot() {
    let mut gw = Gateway::start(&[]);
    let (caller, callee, _, _) = start_call(&gw, "2");
    let _ = (finish(caller), finish(callee));
    std::thread::sleep(Duration::from_millis(1200)); // one more 1 s dump interval
    let dumps = gw.dir.path().join("data/dumps");
    let plot = gw.dir.path().join("latency.svg");
    let out = Command::new(BIN)
        .args([
            "stats",
            dumps.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in ["shard=0", "shard=1", "all", "p99", "tcp in"] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let out = Command::new(BIN)
        .args(["stats", dumps.to_str().unwrap(), "--json", "--last", "60"])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(j.is_object(), "{j}");
    // The relayed media shows up in the merged counters.
    assert!(table.contains("tcp in"));
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["stats", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty(), "says why");
    gw.stop();
}

/// The unit grants exactly one capability, CAP_NET_BIND_SERVICE, and that is what lets an
/// unprivileged gateway serve its single port on 443: run as `nobody` with the unit's
/// capability sets it starts there; without the ambient capability it cannot bind.
#[test]
fn unit_capability_lets_an_unprivileged_gateway_bind_443() {
    let unit = std::fs::read_to_string(repo("systemd/voxgate.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    assert_eq!(value("AmbientCapabilities="), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(value("CapabilityBoundingSet="), ["CAP_NET_BIND_SERVICE"]);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !setpriv {
        eprintln!(
            "\n*** not root or no setpriv (util-linux): binding 443 without root NOT tested ***\n"
        );
        assert!(!ci(), "CI=true: this test runs as root with setpriv");
        return;
    }
    if std::net::TcpListener::bind("127.0.0.1:443").is_err() {
        eprintln!("\n*** 127.0.0.1:443 is taken on this machine: NOT tested ***\n");
        assert!(!ci(), "CI=true: port 443 must be free for this test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(&cfg, "[single_port]\nport = 443\nmedia = \"plain\"\n").unwrap();
    for p in [dir.path(), data.as_path(), cfg.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let serve = |caps: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(caps)
            .args([
                "--",
                BIN,
                "serve",
                "--config",
                cfg.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
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
                "--admin-listen",
                "127.0.0.1:0",
                "--log-level",
                "info",
            ])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("setpriv voxgate serve")
    };
    // Without the capability: no port 443.
    let out = serve(&[]).wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("443") && said.contains("ermission denied"),
        "{said}"
    );
    // With the unit's capability sets: ready on 443, as nobody.
    let mut child = serve(&[
        "--inh-caps=+net_bind_service",
        "--ambient-caps=+net_bind_service",
        "--bounding-set=-all,+net_bind_service",
    ]);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("voxgate is ready") => break l,
            Ok(_) => {}
            Err(_) if std::time::Instant::now() < deadline => {
                if let Ok(Some(s)) = child.try_wait() {
                    panic!("voxgate exited: {s}");
                }
            }
            Err(_) => panic!("no ready line"),
        }
    };
    assert!(ready.contains("single_port=127.0.0.1:443"), "{ready}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().nth(2) == Some("65534"), "{uid}");
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}
