//! The operator's view of a running gateway: the admin listener's Prometheus metrics (checked
//! by `promtool check metrics` and scraped by a real Prometheus during a call), and `/health`
//! (ready, then 503 while draining), and stale media dropped after a paused gateway.
//!
//! Needs the Debian package `prometheus` (promtool and the server); scripts/test-all installs
//! it. Without it these tests say so loudly, and fail under CI=true.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, Proc, finish, http_get, need_tool, spawn_phone};

/// Sum of the samples of `family` whose labels include every `labels` pair.
fn sum(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    let mut seen = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let (lab, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels
            .iter()
            .all(|(k, v)| lab.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            total += value.trim().parse::<f64>().unwrap();
            seen = true;
        }
    }
    assert!(seen, "no {family} {labels:?} in:\n{text}");
    total
}

fn metrics(gw: &Gateway) -> String {
    let (code, body) = http_get(gw.admin.as_deref().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// bob answers; alice calls him with no UDP at all, so media goes through the gateway's shards
/// (alice's side over TCP, bob's over UDP); the call lasts `secs`. Returns once both sides
/// were told media is ready.
fn call_through_the_gateway(gw: &Gateway, secs: u32) -> (Proc, Proc) {
    let mark = gw.log_len();
    let callee = spawn_phone(gw, "bob", &["--answer", "--wait", "30"]);
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone(
        gw,
        "alice",
        &[
            "--call",
            "+15550002",
            "--duration",
            &secs.to_string(),
            "--firewall",
            "no-udp",
        ],
    );
    gw.wait_log(mark, "the call's media", |l| l.contains("media ready sent"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw
        .log_text()
        .lines()
        .skip(mark)
        .filter(|l| l.contains("media ready sent"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "media ready for both sides");
        std::thread::sleep(Duration::from_millis(20));
    }
    (caller, callee)
}

fn promtool_check(promtool: &Path, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

#[test]
fn metrics_pass_promtool_and_count_a_call() {
    let Some(promtool) = need_tool("promtool", "prometheus") else {
        return;
    };
    let gw = Gateway::start(&[]);
    let idle = metrics(&gw);
    promtool_check(&promtool, &idle);
    assert_eq!(sum(&idle, "voxgate_shard_up", &[]), 2.0, "two shards");
    assert_eq!(sum(&idle, "voxgate_shard_packets_total", &[]), 0.0);

    let (caller, callee) = call_through_the_gateway(&gw, 3);
    std::thread::sleep(Duration::from_millis(700));
    let during = metrics(&gw);
    promtool_check(&promtool, &during);
    assert_eq!(sum(&during, "voxgate_subscribers_logged_in", &[]), 2.0);
    assert_eq!(sum(&during, "voxgate_calls", &[("state", "up")]), 1.0);
    assert_eq!(sum(&during, "voxgate_sessions", &[]), 1.0);
    // alice sends and receives over TCP; bob (no firewall) over UDP.
    assert_eq!(sum(&during, "voxgate_legs", &[("transport", "tcp")]), 1.0);
    assert_eq!(sum(&during, "voxgate_legs", &[("transport", "udp")]), 1.0);
    assert_eq!(
        sum(&during, "voxgate_logins_total", &[("outcome", "success")]),
        2.0
    );
    assert!(
        sum(
            &during,
            "voxgate_shard_packets_total",
            &[("transport", "tcp"), ("direction", "in")]
        ) > 10.0,
        "{during}"
    );
    // alice cannot send or receive UDP; bob (no firewall) can do both.
    assert_eq!(
        sum(
            &during,
            "voxgate_probes_total",
            &[("send_udp", "false"), ("recv_udp", "false")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &during,
            "voxgate_call_paths_total",
            &[("direction", "forward"), ("path", "tcp_in_udp_out")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &during,
            "voxgate_call_paths_total",
            &[("direction", "backward"), ("path", "udp_in_tcp_out")]
        ),
        1.0
    );
    assert_eq!(sum(&during, "voxgate_call_paths_total", &[]), 2.0);
    assert!(
        sum(&during, "voxgate_relay_latency_seconds_count", &[]) > 10.0,
        "the latency histogram fills during the call"
    );

    let r = finish(caller);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    finish(callee);
    // The relay session is removed once the call ends; the legs' quality is observed then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let m = metrics(&gw);
        if sum(&m, "voxgate_leg_loss_ratio_count", &[]) >= 2.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no leg quality observed:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&promtool, &after);
    assert_eq!(
        sum(&after, "voxgate_calls_ended_total", &[("reason", "normal")]),
        1.0
    );
    assert_eq!(sum(&after, "voxgate_legs", &[]), 0.0);
    // Nothing was lost on loopback: every observation is in the 0 bucket.
    assert_eq!(
        sum(&after, "voxgate_leg_loss_ratio_bucket", &[("le", "0")]),
        2.0
    );
    // ... and both legs' estimated MOS is G.711's best (no loss, jitter well under 1 ms).
    let best = voxgate::metrics::mos::mos(0.0, 0.0, 0.0);
    assert_eq!(sum(&after, "voxgate_leg_mos_count", &[]), 2.0);
    let mos_sum = sum(&after, "voxgate_leg_mos_sum", &[]);
    assert!(
        (mos_sum / 2.0 - best).abs() < 0.01,
        "{mos_sum} vs 2 x {best}"
    );
    assert_eq!(sum(&after, "voxgate_leg_mos_bucket", &[("le", "4.3")]), 0.0);
    // Scrapes and the 1-s interval dumps both take the shards' latency histograms; neither
    // steals from the other: once the call is over, the dumps hold exactly what Prometheus
    // counted (the last scrape took everything there was; the dump on exit gets it too).
    let scraped = sum(&after, "voxgate_relay_latency_seconds_count", &[]);
    let mut gw = gw;
    gw.stop();
    let report = voxgate::metrics::stats::load(&voxgate::metrics::stats::StatsQuery::new(
        gw.dir.path().join("data/dumps"),
    ))
    .unwrap();
    let all = report.rows.iter().find(|r| r.tag == "all").unwrap();
    assert_eq!(
        all.count as f64, scraped,
        "dumped vs scraped latency samples"
    );
}

/// Runs a real Prometheus on a free port with its own config and data directory, scraping the
/// gateway's admin listener every 500 ms. Killed on drop.
struct Prometheus {
    _proc: Proc,
    addr: String,
}

fn start_prometheus(bin: &Path, dir: &Path, target: &str) -> Prometheus {
    let data = dir.join("prometheus-data");
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n\
             scrape_configs:\n  - job_name: voxgate\n    scrape_interval: 500ms\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join("prometheus.log");
    let child = Command::new(bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        _proc: Proc {
            child,
            stdout: None,
            stderr: Some(log.clone()),
        },
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(&p.addr, "/-/ready") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not become ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The server on that port is the one started here: it runs on this data directory.
    let (_, flags) = http_get(&p.addr, "/api/v1/status/flags").unwrap();
    let flags: serde_json::Value = serde_json::from_str(&flags).unwrap();
    assert_eq!(
        flags["data"]["storage.tsdb.path"].as_str(),
        Some(data.to_str().unwrap()),
        "another server answers on {}",
        p.addr
    );
    p
}

/// The value of an instant query that returns one sample, if any.
fn query(p: &Prometheus, q: &str) -> Option<f64> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = http_get(&p.addr, &format!("/api/v1/query?query={enc}")).ok()?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_sees_the_packet_counters_move_during_a_call() {
    let Some(bin) = need_tool("prometheus", "prometheus") else {
        return;
    };
    let gw = Gateway::start(&[]);
    let prom = start_prometheus(&bin, gw.dir.path(), gw.admin.as_deref().unwrap());
    // Prometheus scrapes the gateway it was pointed at.
    let deadline = Instant::now() + Duration::from_secs(20);
    while query(&prom, "up{job=\"voxgate\"}") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped voxgate"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (caller, callee) = call_through_the_gateway(&gw, 6);
    let q = "sum(voxgate_shard_packets_total{direction=\"in\"})";
    let mut seen: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(seen.len() >= 2 && seen[0] > 0.0 && seen[seen.len() - 1] > seen[0]) {
        assert!(
            Instant::now() < deadline,
            "the packet counters did not move in Prometheus: {seen:?}"
        );
        if let Some(v) = query(&prom, q)
            && v > 0.0
            && seen.last() != Some(&v)
        {
            seen.push(v);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("Prometheus saw {q} = {seen:?}");
    assert!(
        query(&prom, "sum(rate(voxgate_shard_packets_total[5s]))").is_some_and(|r| r > 0.0),
        "a packet rate during the call"
    );
    finish(caller);
    finish(callee);
}

#[test]
fn health_is_ready_then_503_while_draining() {
    let mut gw = Gateway::start(&["--shutdown-grace-s", "30"]);
    let admin = gw.admin.clone().unwrap();
    assert_eq!(
        http_get(&admin, "/health").unwrap(),
        (200, "ready\n".into())
    );
    let (caller, callee) = call_through_the_gateway(&gw, 30);
    // SIGTERM: the gateway drains while the call goes on.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(&admin, "/health").unwrap();
        if code == 503 {
            assert_eq!(body, "not ready: draining\n");
            break;
        }
        assert_eq!(code, 200);
        assert!(
            Instant::now() < deadline,
            "/health stayed ready while draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = metrics(&gw);
    assert_eq!(sum(&m, "voxgate_draining", &[]), 1.0);
    assert_eq!(sum(&m, "voxgate_calls", &[("state", "up")]), 1.0);
    drop(caller);
    drop(callee);
    // Both phones gone: the call ends and the drain completes.
    gw.stop();
}

/// A gateway paused mid-call (a VM stall: SIGSTOP for 2 s) does not deliver the stalled audio
/// late in a burst: datagrams that waited longer than `media.stale_ms` (300 ms) when the shard
/// gets to them are dropped and counted as `stale`, and the call goes on.
#[test]
fn audio_held_up_by_a_paused_gateway_is_dropped_as_stale_not_delivered_late() {
    let gw = Gateway::start(&[]);
    let (caller, callee) = call_through_the_gateway(&gw, 8);
    let stale = |gw: &Gateway| {
        sum(
            &metrics(gw),
            "voxgate_shard_drops_total",
            &[("reason", "stale")],
        )
    };
    let before = stale(&gw);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling the gateway this test started.
    unsafe { libc::kill(gw.pid(), libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: as above.
    unsafe { libc::kill(gw.pid(), libc::SIGCONT) };
    // bob's 2 s of UDP (about 100 datagrams) waited in the socket: all but the last 300 ms of
    // them are stale.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut dropped = stale(&gw) - before;
    while dropped < 60.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        dropped = stale(&gw) - before;
    }
    let (caller, callee) = (finish(caller), finish(callee));
    eprintln!("stale datagrams dropped after a 2 s pause: {dropped}");
    assert!(
        dropped >= 60.0,
        "stale datagrams dropped after a 2 s pause: {dropped}"
    );
    assert!(dropped <= 200.0, "only what the pause held up: {dropped}");
    for (who, r) in [("alice", &caller), ("bob", &callee)] {
        assert_eq!(
            r.json["result"], "completed",
            "{who}: {} {}",
            r.json, r.stderr
        );
    }
}
