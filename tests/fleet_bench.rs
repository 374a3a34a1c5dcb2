//! The fleet bench's smoke version (`perf/fleet`, `voxgate bench calls`) so that neither can
//! rot: 200 subscribers, 50 logged in, 20 calls, against one gateway on SQLite and against two
//! gateways on a private PostgreSQL and Redis (which the script starts and stops itself). Every
//! call must come up; in the fleet every call must cross gateways. The full-size numbers are
//! in perf/README.md ("Fleet").

use std::process::Command;

fn result(dir: &std::path::Path, label: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("{label}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn fleet_bench_smoke() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/perf/fleet"))
        .env("VOXGATE", env!("CARGO_BIN_EXE_voxgate"))
        .env("SUBSCRIBERS", "200")
        .env("LOGGED_IN", "50")
        .env("CALLS", "20")
        .env("CONCURRENCY", "8")
        .env("GATEWAYS", "2")
        .env("MAX_SECONDS", "120")
        .env("OUT", out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.status.code() == Some(2) {
        // PostgreSQL or Redis is not installed: the script said which.
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and perf/fleet cannot run: {stderr}");
        }
        eprintln!("\n*** SKIPPED: {stderr} ***\n");
        return;
    }
    let logs = || {
        std::fs::read_dir(out.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| {
                format!(
                    "--- {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(
        run.status.success(),
        "perf/fleet failed:\n{stderr}\n{}",
        logs()
    );
    for (label, gateways, cross) in [("single", 1, 0), ("fleet", 2, 20)] {
        let r = result(out.path(), label);
        assert_eq!(r["gateways"], gateways, "{r}");
        assert_eq!(r["logged_in"], 50, "{r}");
        assert_eq!(r["calls_set_up"], 20, "{r}\n{}", logs());
        assert_eq!(r["calls_failed"], 0, "{r}");
        assert_eq!(r["cross_gateway"], cross, "{r}");
        let (p50, p99) = (r["p50_ms"].as_f64().unwrap(), r["p99_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99, "{r}");
        assert!(r["setups_per_second"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The table the script prints names both configurations.
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        table.contains("1 gateway, SQLite") && table.contains("fleet, PostgreSQL + Redis"),
        "{table}"
    );
}
