//! `voxgate bench report DIR`: the step results (`*.json`) of one `perf/run` as `report.md`:
//! scenario × system tables (rate, CPU µs per relayed packet, added latency percentiles, loss,
//! memory per 1,000 calls) with the voxgate/coturn and voxgate/forwarder ratios, the highest
//! rates, the targets of the perf issue checked against the numbers, a latency-percentile plot
//! (`latency.svg`, from the histogram logs) and the profile summary. Rendering is pure
//! ([`render`]); [`write`] reads and writes the files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use super::StepResult;

/// Rows of the main table, grouped: (scenario, streams, step order, step).
type GroupKey = (String, usize, (u8, String), String);

/// Reads every step result in `dir`.
pub fn load(dir: &Path) -> Result<Vec<StepResult>, String> {
    let mut v = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        if let Ok(r) = serde_json::from_str::<StepResult>(&text) {
            v.push(r);
        }
    }
    Ok(v)
}

/// Reads the one histogram of a step's interval log.
pub fn load_hlog(path: &Path) -> Option<Histogram<u64>> {
    use base64::Engine as _;
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let text = std::fs::read(path).ok()?;
    let mut out: Option<Histogram<u64>> = None;
    for e in IntervalLogIterator::new(&text).flatten() {
        if let LogEntry::Interval(i) = e {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(i.encoded_histogram())
                .ok()?;
            let h: Histogram<u64> = Deserializer::new()
                .deserialize(&mut std::io::Cursor::new(bytes))
                .ok()?;
            match out.as_mut() {
                Some(o) => {
                    let _ = o.add(&h);
                }
                None => out = Some(h),
            }
        }
    }
    out
}

/// Writes `dir/report.md` and `dir/latency.svg`.
pub fn write(dir: &Path, profile: Option<&Path>, notes: Option<&Path>) -> Result<PathBuf, String> {
    let results = load(dir)?;
    if results.is_empty() {
        return Err(format!("no step results (*.json) in {}", dir.display()));
    }
    let profile = profile.and_then(|p| std::fs::read_to_string(p).ok());
    let notes = notes.and_then(|p| std::fs::read_to_string(p).ok());
    // The plot: smooth 20k (1 stream) and half of max load, every system, udp-udp.
    let mut series = Vec::new();
    for r in &results {
        let pick = (r.step == "smooth-20k" || r.step == "half-max")
            && r.streams == 1
            && r.scenario == "udp-udp";
        if pick && let Some(h) = load_hlog(&dir.join(&r.hlog)) {
            series.push((format!("{} {}", r.label, r.step), h));
        }
    }
    let plot = if series.is_empty() {
        None
    } else {
        let svg = crate::metrics::stats::plot_percentiles_svg(
            &series,
            "one-way latency through the relay (udp→udp, 1 stream)",
        );
        std::fs::write(dir.join("latency.svg"), svg).map_err(|e| e.to_string())?;
        Some("latency.svg")
    };
    let md = render(&results, profile.as_deref(), notes.as_deref(), plot);
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn step_order(step: &str) -> (u8, String) {
    let rank = match step {
        s if s.starts_with("smooth-") => 0,
        s if s.starts_with("burst-") => 1,
        "half-max" => 2,
        "max" => 3,
        "flood" => 4,
        "g711" => 5,
        _ => 6,
    };
    // Numeric order of rates within a kind.
    let num: u64 = step
        .rsplit('-')
        .next()
        .and_then(|s| s.trim_end_matches('k').parse().ok())
        .unwrap_or(0);
    (rank, format!("{num:08}"))
}

fn label_order(label: &str) -> u8 {
    match label {
        "voxgate" => 0,
        "voxgate-nocoalesce" => 1,
        "voxgate-epoll" => 2,
        "forwarder" => 3,
        "coturn-udp" => 4,
        "coturn-tcp" => 5,
        "loopback" => 6,
        _ => 7,
    }
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

/// The result of `label` for the same scenario, step and streams as `r`.
fn peer<'a>(
    all: &'a [StepResult],
    r: &StepResult,
    label: &str,
    scenario: &str,
) -> Option<&'a StepResult> {
    all.iter().find(|o| {
        o.label == label && o.scenario == scenario && o.step == r.step && o.streams == r.streams
    })
}

/// " ⚠" when other processes took more than [`super::DISTURBED`] of the relay's or the load
/// generator's core during the step (after the retries).
fn mark(r: &StepResult) -> &'static str {
    if super::disturbance(r) > super::DISTURBED {
        " ⚠"
    } else {
        ""
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The report's Markdown.
pub fn render(
    all: &[StepResult],
    profile: Option<&str>,
    notes: Option<&str>,
    plot: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# voxgate perf report\n");
    if let Some(n) = notes {
        let _ = writeln!(s, "{}\n", n.trim_end());
    }
    let _ = writeln!(
        s,
        "CPU µs/pkt: the relay's CPU time over the measured window (sum of \
         `/proc/<pid>/task/*/schedstat`; `stat`: utime+stime of `/proc/<pid>/stat`, tick \
         precision) divided by the packets the load generator received in that window. \
         Latency: one-way, load generator send → receive (same clock), µs; it includes the \
         load generator's own loopback cost (compare `loopback` where present). Loss: packets \
         sent and never received (after a drain). \"vs coturn\", \"vs fwd\": voxgate's CPU/pkt \
         over coturn's (same scenario: udp-udp ↔ coturn UDP, tcp-udp ↔ coturn TCP) and over \
         the bare forwarder's, same step and streams.\n"
    );

    // Main table.
    let mut groups: BTreeMap<GroupKey, Vec<&StepResult>> = BTreeMap::new();
    for r in all {
        groups
            .entry((
                r.scenario.clone(),
                r.streams,
                step_order(&r.step),
                r.step.clone(),
            ))
            .or_default()
            .push(r);
    }
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(
        s,
        "| scenario | streams | step | system | rate pps | CPU µs/pkt | (stat) | p50 µs | p99 µs | p99.9 µs | loss % | worst flow delivered | mem KiB/1000 calls | vs coturn | vs fwd | other load relay/load core |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for ((scenario, streams, _, step), mut rs) in groups {
        rs.sort_by_key(|r| label_order(&r.label));
        for r in rs {
            let coturn_label = if scenario == "tcp-udp" {
                "coturn-tcp"
            } else {
                "coturn-udp"
            };
            let vs_coturn = if r.system == "voxgate" {
                ratio(
                    r.cpu_us_per_pkt,
                    peer(all, r, coturn_label, &scenario).and_then(|p| p.cpu_us_per_pkt),
                )
            } else {
                None
            };
            let vs_fwd = if r.system == "voxgate" {
                ratio(
                    r.cpu_us_per_pkt,
                    peer(all, r, "forwarder", "udp-udp").and_then(|p| p.cpu_us_per_pkt),
                )
            } else {
                None
            };
            let streams_txt = if scenario == "room" {
                format!("1→{}", r.fanout)
            } else {
                streams.to_string()
            };
            let step_txt = if step == "max" || step == "half-max" {
                format!("{step} ({:.0}k)", r.rate_target / 1000.0)
            } else {
                step.clone()
            };
            let _ = writeln!(
                s,
                "| {scenario} | {streams_txt} | {step_txt} | {}{} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} | {} | {} | {} | {} |",
                r.label,
                mark(r),
                r.pps,
                f(r.cpu_us_per_pkt, 2),
                f(r.cpu_us_per_pkt_stat, 1),
                r.latency_us.p50,
                r.latency_us.p99,
                r.latency_us.p999,
                r.loss * 100.0,
                r.flow_delivery_min,
                f(r.mem_kib_per_1000_calls, 0),
                f(vs_coturn, 2),
                f(vs_fwd, 2),
                match (r.relay_core_other, r.load_core_other) {
                    (None, None) => "–".to_string(),
                    (a, b) => format!("{}/{}", f(a, 2), f(b, 2)),
                },
            );
        }
    }

    // Highest rates.
    let _ = writeln!(s, "\n## Highest rates\n");
    let _ = writeln!(
        s,
        "`max`: the highest smooth rate delivered with < 1 % loss (ramp, +25 % a step); `flood`: \
         what arrived with the sender flat out (sendmmsg batches), and the relay's CPU per packet \
         there.\n"
    );
    let _ = writeln!(
        s,
        "| scenario | streams | system | max pps (< 1 % loss) | flood pps | flood loss % | CPU µs/pkt at flood | relay cores at flood | flood: worst/best flow delivered, starved flows |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|---|");
    let mut keys: Vec<(String, usize, u8, String)> = all
        .iter()
        .filter(|r| r.step == "max" || r.step == "flood")
        .map(|r| {
            (
                r.scenario.clone(),
                r.streams,
                label_order(&r.label),
                r.label.clone(),
            )
        })
        .collect();
    keys.sort();
    keys.dedup();
    for (scenario, streams, _, label) in keys {
        let find = |step: &str| {
            all.iter().find(|r| {
                r.label == label && r.scenario == scenario && r.streams == streams && r.step == step
            })
        };
        let max = find("max");
        let flood = find("flood");
        let _ = writeln!(
            s,
            "| {scenario} | {streams} | {label} | {} | {} | {} | {} | {} | {} |",
            f(max.map(|m| m.rate_target), 0),
            f(flood.map(|m| m.pps), 0),
            f(flood.map(|m| m.loss * 100.0), 2),
            f(flood.and_then(|m| m.cpu_us_per_pkt), 2),
            f(flood.and_then(|m| m.relay_cpu_cores), 2),
            flood
                .map(|m| format!(
                    "{:.3} / {:.3}, {}",
                    m.flow_delivery_min, m.flow_delivery_max, m.flows_starved
                ))
                .unwrap_or_else(|| "–".into()),
        );
    }

    let _ = writeln!(
        s,
        "\n⚠: other processes took more than {:.2} of the relay's or the load generator's core during \
         the step, after up to {} tries (`--attempts`; the machine is shared); read those numbers \
         with care.",
        super::DISTURBED,
        super::ATTEMPTS
    );
    let _ = writeln!(s, "\n## Targets\n");
    for line in targets(all) {
        let _ = writeln!(s, "- {line}");
    }

    if let Some(p) = plot {
        let _ = writeln!(
            s,
            "\n## Latency percentiles\n\n![latency percentiles]({p})\n"
        );
    }
    let loadgen: Vec<&StepResult> = all.iter().filter(|r| r.label == "loopback").collect();
    if !loadgen.is_empty() {
        let _ = writeln!(s, "\n## The load generator alone\n");
        for r in loadgen {
            let _ = writeln!(
                s,
                "- `loopback` {} streams, {}: {:.0} packets/s sent and received by one thread ({:.2} cores used)",
                r.streams, r.step, r.pps, r.loadgen_cpu_cores
            );
        }
    }
    if let Some(p) = profile {
        let _ = writeln!(
            s,
            "\n## Where the time goes (profile of the shard at load)\n\n```text\n{}\n```",
            p.trim_end()
        );
    }
    let _ = writeln!(s, "\n## Commands\n");
    let mut cmds: Vec<&str> = all.iter().map(|r| r.command.as_str()).collect();
    cmds.sort();
    cmds.dedup();
    for c in cmds {
        let _ = writeln!(s, "- `{c}`");
    }
    s
}

fn get<'a>(
    all: &'a [StepResult],
    label: &str,
    scenario: &str,
    step: &str,
    streams: usize,
) -> Option<&'a StepResult> {
    all.iter().find(|r| {
        r.label == label && r.scenario == scenario && r.step == step && r.streams == streams
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

/// The perf issue's targets, each checked where the run measured it.
pub fn targets(all: &[StepResult]) -> Vec<String> {
    let mut out = Vec::new();
    let cpu = |r: Option<&StepResult>| r.and_then(|r| r.cpu_us_per_pkt);
    for (step, limit) in [("smooth-20k", 1.0 / 3.0), ("smooth-50k", 0.5)] {
        for streams in [1, 20] {
            let v = cpu(get(all, "voxgate", "udp-udp", step, streams));
            let c = cpu(get(all, "coturn-udp", "udp-udp", step, streams));
            if let Some(r) = ratio(v, c) {
                out.push(format!(
                    "{}: voxgate CPU/pkt ≤ {:.2}× coturn's, udp→udp {step}, {streams} stream(s): {:.2} vs {:.2} µs = {:.2}×",
                    verdict(r <= limit),
                    limit,
                    v.unwrap_or(0.0),
                    c.unwrap_or(0.0),
                    r
                ));
            }
        }
    }
    // Translations within 1.5× of voxgate's own udp→udp, at the same paced rates (a flood
    // delivers different rates on TCP and UDP, so its CPU/pkt is not comparable).
    for r in all.iter().filter(|r| {
        r.label == "voxgate"
            && r.scenario != "udp-udp"
            && r.scenario != "room"
            && r.pacing != "flood"
    }) {
        if let Some(x) = ratio(
            r.cpu_us_per_pkt,
            cpu(get(all, "voxgate", "udp-udp", &r.step, r.streams)),
        ) {
            out.push(format!(
                "{}: {} within 1.5× of udp→udp CPU/pkt ({}, {} streams): {:.2}×",
                verdict(x <= 1.5),
                r.scenario,
                r.step,
                r.streams,
                x
            ));
        }
    }
    // io_uring must earn its place: no more CPU per packet than the epoll fallback (same
    // budget) at every step measured for both.
    for r in all
        .iter()
        .filter(|r| r.label == "voxgate-epoll" && r.scenario == "udp-udp")
    {
        if let Some(x) = ratio(
            cpu(get(all, "voxgate", "udp-udp", &r.step, r.streams)),
            r.cpu_us_per_pkt,
        ) {
            out.push(format!(
                "{}: io_uring CPU/pkt ≤ the epoll fallback's ({}, {} streams): {:.2}×",
                verdict(x <= 1.0),
                r.step,
                r.streams,
                x
            ));
        }
    }
    // Coalescing off: within 10 % of the forwarder at every rate.
    for r in all
        .iter()
        .filter(|r| r.label == "voxgate-nocoalesce" && r.scenario == "udp-udp")
    {
        if let Some(x) = ratio(
            r.cpu_us_per_pkt,
            cpu(get(all, "forwarder", "udp-udp", &r.step, r.streams)),
        ) {
            out.push(format!(
                "{}: coalescing off, CPU/pkt within 10 % of the bare forwarder ({}, {} streams): {:.2}×",
                verdict(x <= 1.10),
                r.step,
                r.streams,
                x
            ));
        }
        if r.step == "half-max" {
            out.push(format!(
                "{}: coalescing off, p99 ≤ 100 µs at half of max load ({:.0} pps, {} streams): {:.1} µs",
                verdict(r.latency_us.p99 <= 100.0),
                r.rate_target,
                r.streams,
                r.latency_us.p99
            ));
        }
    }
    for r in all
        .iter()
        .filter(|r| r.label == "voxgate" && r.scenario == "udp-udp" && r.pacing != "flood")
    {
        out.push(format!(
            "{}: default budget p99 ≤ 1.2 ms ({}, {} streams): {:.1} µs",
            verdict(r.latency_us.p99 <= 1200.0),
            r.step,
            r.streams,
            r.latency_us.p99
        ));
    }
    // Saturation.
    for streams in [1, 20] {
        for label in ["voxgate", "voxgate-nocoalesce"] {
            let v = get(all, label, "udp-udp", "flood", streams);
            if let Some(x) = ratio(
                cpu(v),
                cpu(get(all, "forwarder", "udp-udp", "flood", streams)),
            ) {
                out.push(format!(
                    "{}: {label} at saturation CPU/pkt ≤ forwarder + 10 % ({streams} streams): {:.2}×",
                    verdict(x <= 1.10),
                    x
                ));
            }
            let c = get(all, "coturn-udp", "udp-udp", "flood", streams);
            if let (Some(v), Some(c)) = (v, c) {
                let per_core = |r: &StepResult| r.pps / r.relay_cpu_cores.unwrap_or(1.0).max(0.05);
                let x = per_core(v) / per_core(c);
                out.push(format!(
                    "{}: {label} ≥ 1.4× coturn's packets/s per core at saturation ({streams} streams): {:.0} vs {:.0} = {:.2}×",
                    verdict(x >= 1.4),
                    per_core(v),
                    per_core(c),
                    x
                ));
            }
            if let Some(v) = v
                && v.flows > 1
            {
                out.push(format!(
                    "{}: {label} under overload sheds fairly, never a whole stream ({streams} streams): worst flow {:.3}, best {:.3}, starved {}",
                    verdict(v.flows_starved == 0 && v.flow_delivery_min >= 0.5 * v.flow_delivery_max),
                    v.flow_delivery_min,
                    v.flow_delivery_max,
                    v.flows_starved
                ));
            }
        }
    }
    for r in all
        .iter()
        .filter(|r| r.system == "voxgate" && r.step == "g711")
    {
        if r.calls < 1000 {
            out.push(format!(
                "not checked (only {} calls in this run; the target is ≥ 1,000): G.711 loss {:.4} % ({})",
                r.calls,
                r.loss * 100.0,
                r.label
            ));
            continue;
        }
        out.push(format!(
            "{}: {} concurrent G.711 calls ({}) with < 0.1 % loss: {:.4} %",
            verdict(r.loss < 0.001),
            r.calls,
            r.label,
            r.loss * 100.0
        ));
        if let Some(m) = r.mem_kib_per_1000_calls {
            // What the calls add to subscribers who are online anyway (their log-ins scale with
            // subscribers, not calls) is judged; the log-ins are shown beside it.
            match (
                r.mem_kib_per_1000_calls_logins,
                r.mem_kib_per_1000_calls_calls,
            ) {
                (Some(l), Some(c)) => out.push(format!(
                    "{}: ≤ 2 MiB resident per 1,000 calls ({}): {c:.0} KiB for the calls (call \
                     state, relay sessions and legs); with the log-ins of their 2,000 subscribers \
                     ({l:.0} KiB, {:.2} KiB each) {m:.0} KiB",
                    verdict(c <= 2048.0),
                    r.label,
                    l / 2000.0,
                )),
                _ => out.push(format!(
                    "{}: ≤ 2 MiB resident per 1,000 calls ({}), log-ins included: {m:.0} KiB",
                    verdict(m <= 2048.0),
                    r.label,
                )),
            }
        }
    }
    if out.is_empty() {
        out.push("no target could be checked: the run measured none of the comparisons".into());
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::loadgen::Latency;

    pub(crate) fn res(label: &str, scenario: &str, step: &str, cpu: f64, p99: f64) -> StepResult {
        StepResult {
            system: label.split('-').next().unwrap_or(label).into(),
            label: label.into(),
            scenario: scenario.into(),
            streams: 1,
            calls: 1,
            fanout: 1,
            plan: String::new(),
            step: step.into(),
            pacing: if step == "flood" { "flood" } else { "smooth" }.into(),
            rate_target: 20_000.0,
            window_s: 1.0,
            sent: 20_000,
            send_dropped: 0,
            sender_skipped: 0,
            expected: 20_000,
            received: 20_000,
            loss: 0.0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
            flow_delivery_min: 1.0,
            flow_delivery_max: 1.0,
            flows_starved: 0,
            flows: 1,
            pps: 20_000.0,
            sent_pps: 20_000.0,
            cpu_us_per_pkt: Some(cpu),
            cpu_us_per_pkt_stat: Some(cpu),
            relay_cpu_cores: Some(cpu * 0.02),
            loadgen_cpu_cores: 0.5,
            relay_core_other: Some(0.01),
            load_core_other: Some(0.0),
            latency_us: Latency {
                count: 20_000,
                p50: p99 / 2.0,
                p90: p99 * 0.8,
                p99,
                p999: p99 * 2.0,
                max: p99 * 3.0,
                mean: p99 / 2.0,
            },
            rss_idle_kib: None,
            rss_loaded_kib: None,
            mem_kib_per_1000_calls: None,
            mem_kib_per_1000_calls_logins: None,
            mem_kib_per_1000_calls_calls: None,
            hangups: 0,
            hlog: String::new(),
            ramp: Vec::new(),
            command: "voxgate bench run".into(),
        }
    }

    #[test]
    fn renders_ratios_and_targets() {
        let all = vec![
            res("voxgate", "udp-udp", "smooth-20k", 4.0, 900.0),
            res("coturn-udp", "udp-udp", "smooth-20k", 16.0, 60.0),
            res("forwarder", "udp-udp", "smooth-20k", 15.0, 40.0),
            res("voxgate-nocoalesce", "udp-udp", "smooth-20k", 16.0, 50.0),
            res("voxgate", "tcp-udp", "smooth-20k", 8.0, 900.0),
        ];
        let md = render(
            &all,
            Some("top: recvmsg"),
            Some("machine: test"),
            Some("latency.svg"),
        );
        assert!(
            md.contains("| udp-udp | 1 | smooth-20k | voxgate | 20000 | 4.00 |"),
            "{md}"
        );
        // voxgate / coturn = 0.25, voxgate / forwarder = 0.27
        assert!(md.contains("| 0.25 | 0.27 |"), "{md}");
        assert!(
            md.contains("**met**: voxgate CPU/pkt ≤ 0.33× coturn's"),
            "{md}"
        );
        assert!(
            md.contains("**missed**: tcp-udp within 1.5× of udp→udp CPU/pkt"),
            "{md}"
        );
        // 16 / 15 = 1.07
        assert!(md.contains("**met**: coalescing off, CPU/pkt within 10 % of the bare forwarder"));
        assert!(md.contains("**met**: default budget p99 ≤ 1.2 ms"));
        assert!(md.contains("top: recvmsg"));
        assert!(md.contains("machine: test"));
        assert!(md.contains("![latency percentiles](latency.svg)"));
    }

    #[test]
    fn nothing_measured_says_so() {
        assert_eq!(targets(&[]).len(), 1);
        assert_eq!(step_order("smooth-20k").0, 0);
        assert!(step_order("smooth-20k") < step_order("smooth-50k"));
        assert!(step_order("smooth-50k") < step_order("flood"));
    }
}
