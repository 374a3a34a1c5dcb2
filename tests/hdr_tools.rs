//! voxgate's latency dumps are read by stock HdrHistogram tools: the Java
//! `HistogramLogProcessor` (Debian's `libhdrhistogram-java`) reads a dump as written, picks the
//! untagged (all shards merged) lines by default and `-tag shard=<i>` on request, and the
//! percentiles it computes equal `voxgate stats`'.
//!
//! Needs `java` and `/usr/share/java/hdrhistogram.jar`; scripts/test-all installs them. Without
//! them this test says so loudly, and fails under CI=true.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use voxgate::metrics::Counters;
use voxgate::metrics::dump::{DumpConfig, DumpWriter, ShardSample, new_latency_histogram};
use voxgate::metrics::stats::{StatsQuery, StatsRow, load};

const JAR: &str = "/usr/share/java/hdrhistogram.jar";

/// Writes 6 intervals of 2 shards: shard 0 around 80-300 µs, shard 1 around 1-2 ms, and in
/// interval 3 one 3-s pause on shard 1.
fn write_dumps(dir: &Path) -> std::path::PathBuf {
    let mut w = DumpWriter::new(DumpConfig {
        dir: dir.to_owned(),
        max_files: 4,
        intervals_per_file: 100,
    })
    .unwrap();
    let t0 = UNIX_EPOCH + Duration::from_secs(1_717_243_200);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..6u64 {
        let mut a = new_latency_histogram();
        let mut b = new_latency_histogram();
        for _ in 0..5_000 {
            a.record(80_000 + rnd() % 220_000).unwrap();
            b.record(1_000_000 + rnd() % 1_000_000).unwrap();
        }
        if i == 3 {
            b.record(3_000_000_000).unwrap();
        }
        let s = [
            ShardSample {
                shard: 0,
                latency: a,
                counters: Counters::default(),
            },
            ShardSample {
                shard: 1,
                latency: b,
                counters: Counters::default(),
            },
        ];
        let start: SystemTime = t0 + Duration::from_secs(10 * i);
        w.write_interval(start, start + Duration::from_secs(10), &s)
            .unwrap();
    }
    w.current_hlog().unwrap().to_owned()
}

/// Runs the Java processor on `hlog` (values printed in ns) and returns its CSV output:
/// one row per interval, the last holding the totals over the whole log.
fn java_processor(java: &Path, hlog: &Path, out: &Path, tag: Option<&str>) -> Vec<Vec<String>> {
    let mut cmd = Command::new(java);
    cmd.args(["-cp", JAR, "org.HdrHistogram.HistogramLogProcessor", "-csv"])
        .args(["-outputValueUnitRatio", "1"])
        .arg("-i")
        .arg(hlog)
        .arg("-o")
        .arg(out);
    if let Some(t) = tag {
        cmd.args(["-tag", t]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "HistogramLogProcessor: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.split(',')
                .map(|c| c.trim_matches('"').to_owned())
                .collect()
        })
        .collect()
}

/// The processor's percentile distribution file (`OUT.hgrm`, CSV): `(value, percentile,
/// total count)` rows; the last row is the max with the total count.
fn hgrm(out: &Path) -> Vec<(f64, f64, u64)> {
    let text = std::fs::read_to_string(format!("{}.hgrm", out.display())).unwrap();
    text.lines()
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Some((
                c.first()?.parse().ok()?,
                c.get(1)?.parse().ok()?,
                c.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

fn close(stock: f64, ours: u64, what: &str) {
    // Same algorithm, same histogram; allow one unit of HdrHistogram resolution (0.1 %).
    let ours = ours as f64;
    assert!(
        (stock - ours).abs() <= ours * 0.001 + 1.0,
        "{what}: HistogramLogProcessor says {stock}, voxgate {ours}"
    );
}

#[test]
fn the_java_histogram_log_processor_reads_dumps_and_agrees_with_voxgate_stats() {
    let Some(java) = common::need_tool("java", "default-jre-headless") else {
        return;
    };
    if !Path::new(JAR).is_file() {
        let msg = format!("{JAR} not found: install the Debian package libhdrhistogram-java");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {msg}"
        );
        eprintln!("\n*** SKIPPED: {msg} ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hlog = write_dumps(&dir.path().join("dumps"));
    let report = load(&StatsQuery::new(dir.path().join("dumps"))).unwrap();
    let row =
        |tag: &str| -> StatsRow { report.rows.iter().find(|r| r.tag == tag).unwrap().clone() };

    for (tag, ours) in [(None, row("all")), (Some("shard=1"), row("shard=1"))] {
        let out = dir
            .path()
            .join(format!("java-{}", tag.unwrap_or("untagged")));
        let csv = java_processor(&java, &hlog, &out, tag);
        let header = &csv[0];
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let intervals = &csv[1..];
        assert_eq!(intervals.len(), 6, "{tag:?}: one row per interval");
        let last = &intervals[5];
        let total_count: u64 = last[col("Total_Count")].parse().unwrap();
        assert_eq!(total_count, ours.count, "{tag:?}: samples");
        let f = |name: &str| last[col(name)].parse::<f64>().unwrap();
        close(f("Total_50%"), ours.p50_ns, "p50");
        close(f("Total_90%"), ours.p90_ns, "p90");
        close(f("Total_99%"), ours.p99_ns, "p99");
        close(f("Total_99.9%"), ours.p999_ns, "p99.9");
        close(f("Total_Max"), ours.max_ns, "max");
        // The pause is in interval 3 of the merged and shard-1 lines.
        let int_max: Vec<f64> = intervals
            .iter()
            .map(|r| r[col("Int_Max")].parse().unwrap())
            .collect();
        assert!(int_max[3] > 2.9e9, "{tag:?}: {int_max:?}");
        assert!(
            int_max
                .iter()
                .enumerate()
                .all(|(i, m)| i == 3 || *m < 2.1e6)
        );

        let dist = hgrm(&out);
        let &(max, _, total) = dist.last().unwrap();
        assert_eq!(total, ours.count, "{tag:?}: hgrm total");
        close(max, ours.max_ns, "hgrm max");
        // The distribution's median row.
        let (v50, _, _) = dist.iter().find(|(_, p, _)| *p >= 0.5).unwrap();
        close(*v50, ours.p50_ns, "hgrm p50");
    }
    // The merged line holds both shards: 2 x 5000 samples per interval, plus the pause.
    assert_eq!(row("all").count, 6 * 10_000 + 1);
    assert_eq!(
        row("all").count,
        row("shard=0").count + row("shard=1").count
    );
}
