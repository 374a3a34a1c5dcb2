//! `voxgate stats DIR`: read the dumps [`super::dump`] writes, merge them per tag over a time
//! window and present percentiles (table, JSON, SVG percentile plot).
//!
//! The files may be damaged (a crash mid-write, a full disk, someone's editor) or not ours at
//! all, so reading is defensive: memory is bounded (lines are capped, the number of tags is
//! capped, encoded histograms are checked before they are decoded), nothing panics, and a bad
//! line is skipped and counted rather than failing the whole report.
//!
//! This module only reads the dump directory; the one thing it writes is the optional plot.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use serde::Serialize;

use super::counters::{Counters, DropReason};
use super::dump::{
    CountersRecord, IntervalRecordIn, TAG_ALL, format_human, format_rfc3339, new_latency_histogram,
    unix_ms,
};
use super::plot::{LatencyPoint, PacketPoint};

/// Longest line read from a dump; longer ones are skipped. A dense 1 ns..60 s histogram at 3
/// significant figures encodes to well under 400 KiB of base64.
const MAX_LINE: usize = 1 << 20;
/// Most distinct tags merged; lines with further tags are skipped.
const MAX_TAGS: usize = 512;
/// Most bytes an encoded histogram may inflate to (a dense 4-significant-figure histogram over
/// the whole u64 range needs less than 4.8 MB).
const MAX_INFLATED: usize = 5 << 20;
/// Histograms with more significant figures need too much memory to decode (5 digits can take
/// 50 MB per histogram); the shards use 3.
const MAX_SIGFIG: u32 = 4;
/// Merged counts stay below this, so summing counts can never overflow a u64.
const MAX_TOTAL_COUNT: u64 = 1 << 62;
/// Problems described in the report (all are counted).
const MAX_PROBLEM_EXAMPLES: usize = 8;
/// Most intervals drawn in the plot's time series (a year of 10-s intervals is 3.2 million).
const MAX_PLOT_POINTS: usize = 1 << 20;
/// Interval timestamps more than a year below StartTime are relative to it (Java reader rule).
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

const V2_COOKIE: u32 = 0x1c84_9313;
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9314;
const V2_HEADER_LEN: usize = 40;

/// What to read and how to present it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsQuery {
    pub dir: PathBuf,
    /// Only the last N of the newest data (intervals overlapping it are included whole);
    /// `None` = everything.
    pub window: Option<Duration>,
    /// Only intervals that end after this time.
    pub since: Option<SystemTime>,
    /// Also write an SVG latency-percentile plot of the merged rows here.
    pub plot: Option<PathBuf>,
    /// Present as JSON rather than as a table (used by [`run`]).
    pub json: bool,
}

impl StatsQuery {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StatsQuery {
            dir: dir.into(),
            ..StatsQuery::default()
        }
    }
}

/// Latency percentiles of one tag, merged over the window. Values in nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsRow {
    /// `shard=0`, `shard=1`, ..., `all`.
    pub tag: String,
    pub count: u64,
    pub min_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
}

impl StatsRow {
    fn from_histogram(tag: String, h: &Histogram<u64>) -> Self {
        let count = h.len();
        let q = |q: f64| {
            if count == 0 {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        StatsRow {
            tag,
            count,
            min_ns: if count == 0 { 0 } else { h.min() },
            p50_ns: q(0.5),
            p90_ns: q(0.9),
            p99_ns: q(0.99),
            p999_ns: q(0.999),
            max_ns: if count == 0 { 0 } else { h.max() },
            mean_ns: h.mean(),
        }
    }
}

/// What [`load`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsReport {
    /// Intervals in the window (an interval is all the lines with one start time in one file).
    pub intervals: usize,
    /// Start of the earliest interval in the window.
    pub from: Option<SystemTime>,
    /// End of the latest interval in the window.
    pub to: Option<SystemTime>,
    /// One row per tag: `shard=<i>` in shard order, other tags by name, `all` last.
    pub rows: Vec<StatsRow>,
    /// Counters summed over the window (the `all` record of each interval), from the
    /// `.counters.jsonl` files; `None` if none of them had an interval in the window.
    pub counters: Option<Counters>,
    /// `.hlog` files read.
    pub files: usize,
    /// Lines that could not be used (damaged, truncated, not a dump line), in all files.
    pub skipped_lines: usize,
    /// Files that could not be opened or read through.
    pub skipped_files: usize,
    /// The first few problems, as `file:line: what` (all of them are counted above).
    pub problems: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "no latency dumps (*.hlog) in {dir}: point `voxgate stats` at the gateway's dump \
         directory; dumps appear there one interval after the gateway starts"
    )]
    NoDumps { dir: PathBuf },
    #[error("cannot read the dump directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("cannot write the plot {path}: {source}")]
    WritePlot { path: PathBuf, source: io::Error },
}

/// Reads every `*.hlog` (and `*.counters.jsonl`) in `query.dir`, keeps the intervals in the
/// window and merges them per tag. Writes the plot if asked to.
pub fn load(query: &StatsQuery) -> Result<StatsReport, StatsError> {
    let (hlogs, jsonls) = list_dumps(&query.dir)?;
    if hlogs.is_empty() {
        return Err(StatsError::NoDumps {
            dir: query.dir.clone(),
        });
    }

    // The window is anchored at the newest data, which takes a first (parse-only) pass.
    let mut cutoff = None;
    if let Some(window) = query.window {
        let mut newest: Option<Duration> = None;
        let mut seen = |end: Duration| newest = Some(newest.map_or(end, |n| n.max(end)));
        for path in &hlogs {
            let _ = scan_hlog(path, |_, event| {
                if let HlogLine::Interval(i) = event {
                    seen(i.end);
                }
            });
        }
        for path in &jsonls {
            let _ = scan_jsonl(path, |_, r| {
                if let Ok(r) = r {
                    seen(Duration::from_millis(r.end_unix_ms));
                }
            });
        }
        cutoff = newest.map(|n| n.saturating_sub(window));
    }
    if let Some(since) = query.since {
        let since = since.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        cutoff = Some(cutoff.map_or(since, |c| c.max(since)));
    }
    let in_window = |start: Duration, end: Duration| match cutoff {
        None => true,
        Some(c) => end > c || start >= c,
    };

    let mut problems = Problems::default();
    let mut span = Span::default();
    let mut tags: HashMap<String, Histogram<u64>> = HashMap::new();
    let mut intervals = 0;
    // For the plot's time series: one point per interval (bounded).
    let mut latency_points: Vec<LatencyPoint> = Vec::new();
    let mut packet_points: Vec<PacketPoint> = Vec::new();
    for path in &hlogs {
        let name = file_name(path);
        let mut last_start = None;
        let result = scan_hlog(path, |line, event| {
            let i = match event {
                HlogLine::Interval(i) => i,
                HlogLine::Bad(what) => return problems.line(&name, line, what),
            };
            if !in_window(i.start, i.end) {
                return;
            }
            // The merged line is untagged (older dumps tagged it `all`).
            let tag = i.tag.unwrap_or(TAG_ALL);
            let h = match decode_line(i.encoded) {
                Ok(h) => h,
                Err(what) => return problems.line(&name, line, &what),
            };
            if !tags.contains_key(tag) && tags.len() >= MAX_TAGS {
                return problems.line(&name, line, "too many distinct tags");
            }
            let acc = tags.entry(tag.to_owned()).or_insert_with(|| {
                let mut h = new_latency_histogram();
                h.auto(true);
                h
            });
            if acc.len().saturating_add(h.len()) > MAX_TOTAL_COUNT {
                return problems.line(&name, line, "counts too large to merge");
            }
            if let Err(e) = acc.add(&h) {
                return problems.line(&name, line, &format!("cannot merge histogram: {e}"));
            }
            if tag == TAG_ALL && query.plot.is_some() && latency_points.len() < MAX_PLOT_POINTS {
                let q = |q: f64| {
                    if h.is_empty() {
                        0
                    } else {
                        h.value_at_quantile(q)
                    }
                };
                latency_points.push(LatencyPoint {
                    start: i.start,
                    end: i.end,
                    count: h.len(),
                    p50_ns: q(0.5),
                    p99_ns: q(0.99),
                    max_ns: if h.is_empty() { 0 } else { h.max() },
                });
            }
            if last_start != Some(i.start) {
                intervals += 1;
                last_start = Some(i.start);
            }
            span.add(i.start, i.end);
        });
        if let Err(e) = result {
            problems.file(&name, &e);
        }
    }

    let mut counters: Option<Counters> = None;
    for path in &jsonls {
        let name = file_name(path);
        let result = scan_jsonl(path, |line, record| match record {
            Err(what) => problems.line(&name, line, &what),
            Ok(r) => {
                let start = Duration::from_millis(r.start_unix_ms);
                let end = Duration::from_millis(r.end_unix_ms);
                if in_window(start, end) {
                    merge_saturating(counters.get_or_insert_with(Counters::default), &r.all);
                    span.add(start, end);
                    if query.plot.is_some() && packet_points.len() < MAX_PLOT_POINTS {
                        packet_points.push(PacketPoint {
                            start,
                            end,
                            packets: r.all.udp_in.packets.saturating_add(r.all.tcp_in.packets),
                        });
                    }
                }
            }
        });
        if let Err(e) = result {
            problems.file(&name, &e);
        }
    }

    let mut rows: Vec<(String, Histogram<u64>)> = tags.into_iter().collect();
    rows.sort_by(|a, b| tag_order(&a.0).cmp(&tag_order(&b.0)));
    let report = StatsReport {
        intervals,
        from: span.from.and_then(|d| UNIX_EPOCH.checked_add(d)),
        to: span.to.and_then(|d| UNIX_EPOCH.checked_add(d)),
        rows: rows
            .iter()
            .map(|(t, h)| StatsRow::from_histogram(t.clone(), h))
            .collect(),
        counters,
        files: hlogs.len(),
        skipped_lines: problems.lines,
        skipped_files: problems.files,
        problems: problems.examples,
    };

    if let Some(path) = &query.plot {
        let title = format!("voxgate relay latency, {}", report.window_text());
        latency_points.sort_by_key(|p| p.start);
        packet_points.sort_by_key(|p| p.start);
        let svg = super::plot::plot_svg(&rows, &latency_points, &packet_points, &title);
        fs::write(path, svg).map_err(|source| StatsError::WritePlot {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

/// `load`, then the table (or JSON if `query.json`) as the text to print.
pub fn run(query: &StatsQuery) -> Result<String, StatsError> {
    let report = load(query)?;
    Ok(if query.json {
        let mut s = report.to_json().to_string();
        s.push('\n');
        s
    } else {
        report.render_table()
    })
}

impl StatsReport {
    fn window_text(&self) -> String {
        let ends = self
            .from
            .zip(self.to)
            .and_then(|(f, t)| Some((since_epoch(f)?, since_epoch(t)?)));
        match ends {
            Some((f, t)) => format!(
                "{} .. {} ({:.3} s, {} interval{})",
                format_human(f),
                format_human(t),
                t.saturating_sub(f).as_secs_f64(),
                self.intervals,
                plural(self.intervals)
            ),
            None => "no intervals in the window".to_owned(),
        }
    }

    /// A fixed-width table for people: latencies in µs, then the merged counters.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        // Writes to a String cannot fail; results are ignored below.
        let _ = writeln!(s, "voxgate relay latency: {}", self.window_text());
        let _ = writeln!(
            s,
            "{} file{} read; latency in µs, kernel receive timestamp to send submission",
            self.files,
            plural(self.files)
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "tag", "count", "min", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for r in &self.rows {
            let us = |ns: u64| format!("{:.2}", ns as f64 / 1000.0);
            let _ = writeln!(
                s,
                "{:<12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10.2}",
                r.tag,
                r.count,
                us(r.min_ns),
                us(r.p50_ns),
                us(r.p90_ns),
                us(r.p99_ns),
                us(r.p999_ns),
                us(r.max_ns),
                r.mean_ns / 1000.0
            );
        }
        if self.rows.is_empty() {
            let _ = writeln!(s, "(no latency data in the window)");
        }
        let _ = writeln!(s);
        match &self.counters {
            None => {
                let _ = writeln!(s, "counters: no .counters.jsonl data in the window");
            }
            Some(c) => render_counters(&mut s, c),
        }
        if self.skipped_lines > 0 || self.skipped_files > 0 {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "warning: skipped {} unreadable line{} and {} unreadable file{}:",
                self.skipped_lines,
                plural(self.skipped_lines),
                self.skipped_files,
                plural(self.skipped_files)
            );
            for p in &self.problems {
                let _ = writeln!(s, "  {p}");
            }
            let shown = self.problems.len();
            let total = self.skipped_lines + self.skipped_files;
            if total > shown {
                let _ = writeln!(s, "  ... and {} more", total - shown);
            }
        }
        s
    }

    /// The report as one JSON object (times as RFC 3339 UTC strings and Unix milliseconds).
    pub fn to_json(&self) -> serde_json::Value {
        let time = |t: Option<SystemTime>| t.and_then(since_epoch);
        serde_json::json!({
            "intervals": self.intervals,
            "from": time(self.from).map(format_rfc3339),
            "to": time(self.to).map(format_rfc3339),
            "from_unix_ms": time(self.from).map(unix_ms),
            "to_unix_ms": time(self.to).map(unix_ms),
            "rows": self.rows,
            "counters": self.counters.as_ref().map(CountersRecord::from),
            "files": self.files,
            "skipped_lines": self.skipped_lines,
            "skipped_files": self.skipped_files,
            "problems": self.problems,
        })
    }
}

fn render_counters(s: &mut String, c: &Counters) {
    let _ = writeln!(s, "counters, summed over the window:");
    let _ = writeln!(s, "  {:<12} {:>16} {:>20}", "transport", "packets", "bytes");
    for (name, f) in [
        ("udp in", &c.udp_in),
        ("udp out", &c.udp_out),
        ("tcp in", &c.tcp_in),
        ("tcp out", &c.tcp_out),
    ] {
        let _ = writeln!(s, "  {:<12} {:>16} {:>20}", name, f.packets, f.bytes);
    }
    let packets_in = c.udp_in.packets.saturating_add(c.tcp_in.packets);
    let per_wakeup = if c.wakeups == 0 {
        String::from("-")
    } else {
        format!("{:.2}", packets_in as f64 / c.wakeups as f64)
    };
    let _ = writeln!(
        s,
        "  wake-ups {}  (packets in per wake-up: {})",
        c.wakeups, per_wakeup
    );
    let _ = writeln!(s, "  buffer-ring exhaustion {}", c.buf_ring_exhausted);
    let _ = writeln!(
        s,
        "  bindings {}  tcp accepted {}  tcp closed {}  reassembly copies {}",
        c.bindings, c.tcp_accepted, c.tcp_closed, c.reassembly_copies
    );
    let total = c.drops.iter().fold(0u64, |a, &d| a.saturating_add(d));
    let _ = writeln!(s, "  drops {total}");
    for r in DropReason::ALL {
        let _ = writeln!(s, "    {:<22} {:>16}", r.name(), c.dropped(r));
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn since_epoch(t: SystemTime) -> Option<Duration> {
    t.duration_since(UNIX_EPOCH).ok()
}

/// `shard=<i>` by number, then other tags by name, `all` last.
fn tag_order(tag: &str) -> (u8, u64, &str) {
    if tag == TAG_ALL {
        return (2, 0, tag);
    }
    match tag.strip_prefix("shard=").and_then(|n| n.parse().ok()) {
        Some(n) => (0, n, tag),
        None => (1, 0, tag),
    }
}

/// `Counters::merge` with saturating sums: loaded numbers are not to be trusted.
fn merge_saturating(acc: &mut Counters, r: &CountersRecord) {
    let o = Counters::from(r);
    // Destructured without `..`: a new field in `Counters` must be added here.
    let Counters {
        udp_in,
        udp_out,
        tcp_in,
        tcp_out,
        bindings,
        drops,
        buf_ring_exhausted,
        tcp_accepted,
        tcp_closed,
        reassembly_copies,
        wakeups,
    } = o;
    for (a, b) in [
        (&mut acc.udp_in, udp_in),
        (&mut acc.udp_out, udp_out),
        (&mut acc.tcp_in, tcp_in),
        (&mut acc.tcp_out, tcp_out),
    ] {
        a.packets = a.packets.saturating_add(b.packets);
        a.bytes = a.bytes.saturating_add(b.bytes);
    }
    for (a, b) in acc.drops.iter_mut().zip(drops) {
        *a = a.saturating_add(b);
    }
    for (a, b) in [
        (&mut acc.bindings, bindings),
        (&mut acc.buf_ring_exhausted, buf_ring_exhausted),
        (&mut acc.tcp_accepted, tcp_accepted),
        (&mut acc.tcp_closed, tcp_closed),
        (&mut acc.reassembly_copies, reassembly_copies),
        (&mut acc.wakeups, wakeups),
    ] {
        *a = a.saturating_add(b);
    }
}

#[derive(Default)]
struct Span {
    from: Option<Duration>,
    to: Option<Duration>,
}

impl Span {
    fn add(&mut self, start: Duration, end: Duration) {
        self.from = Some(self.from.map_or(start, |f| f.min(start)));
        self.to = Some(self.to.map_or(end, |t| t.max(end)));
    }
}

#[derive(Default)]
struct Problems {
    lines: usize,
    files: usize,
    examples: Vec<String>,
}

impl Problems {
    fn line(&mut self, file: &str, line: usize, what: &str) {
        self.lines += 1;
        self.example(format!("{file}:{line}: {what}"));
    }

    fn file(&mut self, file: &str, e: &io::Error) {
        self.files += 1;
        self.example(format!("{file}: {e}"));
    }

    fn example(&mut self, s: String) {
        tracing::debug!(problem = %s, "skipped part of a latency dump");
        if self.examples.len() < MAX_PROBLEM_EXAMPLES {
            self.examples.push(s);
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `*.hlog` and `*.counters.jsonl` files in `dir`, each sorted by name.
fn list_dumps(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), StatsError> {
    let read_err = |source| StatsError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut hlogs = Vec::new();
    let mut jsonls = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        // Follows symlinks; directories and the like are not dumps.
        if !fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".hlog") {
            hlogs.push(path);
        } else if name.ends_with(".counters.jsonl") {
            jsonls.push(path);
        }
    }
    hlogs.sort();
    jsonls.sort();
    Ok((hlogs, jsonls))
}

// ---- reading lines ----------------------------------------------------------------------------

enum LineRead {
    Eof,
    /// A whole line, with its `\n`, in the buffer.
    Line,
    /// A line without `\n` at the end of the file (a torn write).
    Unterminated,
    /// A line longer than `MAX_LINE`; it was consumed, not kept.
    TooLong,
}

/// Reads one line into `buf` (cleared first), keeping at most `MAX_LINE` bytes in memory.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(if too_long {
                LineRead::TooLong
            } else if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Unterminated
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// Calls `f(line_number, line)` for every whole line of a file; reports damaged ones as `Err`.
fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, Result<&[u8], &'static str>),
) -> io::Result<()> {
    let mut r = BufReader::new(File::open(path)?);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        n += 1;
        match read_line(&mut r, &mut buf)? {
            LineRead::Eof => return Ok(()),
            LineRead::Line => f(n, Ok(&buf)),
            LineRead::Unterminated => f(n, Err("truncated line (no newline at end of file)")),
            LineRead::TooLong => f(n, Err("line too long")),
        }
    }
}

/// One interval-log line, with times absolute (since the Unix epoch).
struct IntervalLine<'a> {
    tag: Option<&'a str>,
    start: Duration,
    end: Duration,
    encoded: &'a str,
}

enum HlogLine<'a, 'b> {
    Interval(IntervalLine<'a>),
    Bad(&'b str),
}

/// Parses an interval log line by line (so memory stays bounded), tracking its StartTime and
/// BaseTime headers; calls `f` for interval lines and bad lines (comments and headers are not
/// reported).
fn scan_hlog(path: &Path, mut f: impl FnMut(usize, HlogLine<'_, '_>)) -> io::Result<()> {
    let mut start_time = None;
    let mut base_time = None;
    for_each_line(path, |n, line| {
        let line = match line {
            Ok(l) => l,
            Err(what) => return f(n, HlogLine::Bad(what)),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match IntervalLogIterator::new(line).next() {
            None => {} // a comment or the legend
            Some(Ok(LogEntry::StartTime(t))) => start_time = Some(t),
            Some(Ok(LogEntry::BaseTime(t))) => base_time = Some(t),
            Some(Ok(LogEntry::Interval(i))) => {
                let ts = i.start_timestamp();
                // Same rules as the Java HistogramLogReader.
                let start = match (base_time, start_time) {
                    (Some(b), _) => b.checked_add(ts),
                    (None, Some(s)) if ts.saturating_add(YEAR) < s => s.checked_add(ts),
                    _ => Some(ts),
                };
                match start.and_then(|s| Some((s, s.checked_add(i.duration())?))) {
                    Some((start, end)) => f(
                        n,
                        HlogLine::Interval(IntervalLine {
                            tag: i.tag().map(|t| t.as_str()),
                            start,
                            end,
                            encoded: i.encoded_histogram(),
                        }),
                    ),
                    None => f(n, HlogLine::Bad("timestamp out of range")),
                }
            }
            Some(Err(_)) => f(n, HlogLine::Bad("not an interval-log line")),
        }
    })
}

fn scan_jsonl(
    path: &Path,
    mut f: impl FnMut(usize, Result<IntervalRecordIn, String>),
) -> io::Result<()> {
    for_each_line(path, |n, line| match line {
        Err(what) => f(n, Err(what.to_owned())),
        Ok(l) if l.iter().all(u8::is_ascii_whitespace) => {}
        Ok(l) => f(
            n,
            serde_json::from_slice(l).map_err(|e| format!("not a counters record: {e}")),
        ),
    })
}

// ---- decoding histograms ----------------------------------------------------------------------

fn decode_line(encoded: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_end())
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    decode_histogram(&bytes)
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

/// Decodes a V2 or V2-deflate encoded histogram, after checking what the hdrhistogram decoder
/// would trust: the payload length (it allocates that much before reading), the precision (it
/// allocates the counts array), and count values that overflow its zig-zag decoding.
fn decode_histogram(bytes: &[u8]) -> Result<Histogram<u64>, String> {
    let v2: Cow<'_, [u8]> = match be_u32(bytes, 0) {
        Some(V2_COOKIE) => Cow::Borrowed(bytes),
        Some(V2_COMPRESSED_COOKIE) => {
            let len = be_u32(bytes, 4).ok_or("truncated histogram header")? as usize;
            let body = bytes
                .get(8..)
                .and_then(|b| b.get(..len))
                .ok_or("histogram shorter than its header says")?;
            let inflated = inflate::zlib_decompress(body, MAX_INFLATED)
                .map_err(|e| format!("histogram does not inflate: {}", e.what()))?;
            Cow::Owned(inflated)
        }
        _ => return Err("not an HdrHistogram V2 encoding".to_owned()),
    };
    check_v2(&v2)?;
    Deserializer::new()
        .deserialize::<u64, _>(&mut &v2[..])
        .map_err(|e| format!("histogram does not decode: {e}"))
}

fn check_v2(b: &[u8]) -> Result<(), String> {
    if be_u32(b, 0) != Some(V2_COOKIE) {
        return Err("not an HdrHistogram V2 encoding".to_owned());
    }
    let header = b.get(..V2_HEADER_LEN).ok_or("truncated histogram header")?;
    let payload_len = be_u32(header, 4).ok_or("truncated histogram header")? as usize;
    let sigfig = be_u32(header, 12).ok_or("truncated histogram header")?;
    if sigfig > MAX_SIGFIG {
        return Err(format!(
            "histogram has {sigfig} significant figures; at most {MAX_SIGFIG} are read"
        ));
    }
    let payload = b
        .get(V2_HEADER_LEN..)
        .and_then(|p| p.get(..payload_len))
        .ok_or("histogram shorter than its header says")?;
    // LEB128-64b9B varints, read the way the decoder reads them: the one value whose zig-zag
    // decoding is i64::MIN overflows its negation.
    let mut rest = payload;
    while !rest.is_empty() {
        let (value, len) = read_varint(rest);
        if value == u64::MAX {
            return Err("histogram has an out-of-range count".to_owned());
        }
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(())
}

/// One LEB128-64b9B varint (the ninth byte counts whole) from non-empty `b`: its value and
/// length. A varint cut short by the end of `b` yields what was read.
fn read_varint(b: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (k, &byte) in b.iter().take(9).enumerate() {
        if k == 8 {
            return (value | u64::from(byte) << 56, 9);
        }
        value |= u64::from(byte & 0x7f) << (7 * k);
        if byte & 0x80 == 0 {
            return (value, k + 1);
        }
    }
    (value, b.len().min(9))
}

/// Bounded zlib inflation: flate2 does the decoding, and reading stops one byte past the cap,
/// so a hostile stream costs at most `max + 1` bytes of memory.
mod inflate {
    use std::io::Read;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum InflateError {
        Corrupt,
        TooLarge,
    }

    impl InflateError {
        pub fn what(self) -> &'static str {
            match self {
                InflateError::Corrupt => "corrupt zlib data",
                InflateError::TooLarge => "inflates to more than allowed",
            }
        }
    }

    pub fn zlib_decompress(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(data)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > max {
            return Err(InflateError::TooLarge);
        }
        Ok(out)
    }
}

pub use super::plot::plot_percentiles_svg;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::dump::{DumpConfig, DumpWriter, ShardSample};
    use hdrhistogram::serialization::{Serializer, V2DeflateSerializer, V2Serializer};
    use proptest::prelude::*;

    const T0: u64 = 1_717_243_200; // 2024-06-01 12:00:00 UTC

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_latency_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    fn counters(k: u64) -> Counters {
        let mut c = Counters::default();
        c.udp_in.packets = 10 * k;
        c.udp_in.bytes = 1720 * k;
        c.tcp_out.packets = 10 * k;
        c.tcp_out.bytes = 1740 * k;
        c.wakeups = 4 * k;
        c.drops[DropReason::TcpBackpressure as usize] = k;
        c
    }

    /// Writes `n` 10-second intervals from T0 for two shards; shard 0 sees 1..=1000 µs,
    /// shard 1 sees 5 ms values, interval i adds i * 100 µs. Returns the inputs per interval.
    fn write_dumps(
        dir: &Path,
        n: u64,
        intervals_per_file: usize,
        max_files: usize,
    ) -> Vec<[Histogram<u64>; 2]> {
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.to_owned(),
            max_files,
            intervals_per_file,
        })
        .unwrap();
        let mut inputs = Vec::new();
        for i in 0..n {
            let h0 = hist((1..=1000).map(|v| v * 1000 + i * 100_000));
            let h1 = hist((0..50).map(|v| 5_000_000 + v * 10_000 + i));
            let samples = [
                ShardSample {
                    shard: 0,
                    latency: h0.clone(),
                    counters: counters(1),
                },
                ShardSample {
                    shard: 1,
                    latency: h1.clone(),
                    counters: counters(2),
                },
            ];
            w.write_interval(at(T0 + 10 * i), at(T0 + 10 * (i + 1)), &samples)
                .unwrap();
            inputs.push([h0, h1]);
        }
        inputs
    }

    fn merged<'a>(hs: impl IntoIterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
        let mut m = new_latency_histogram();
        for h in hs {
            m.add(h).unwrap();
        }
        m
    }

    fn row<'a>(r: &'a StatsReport, tag: &str) -> &'a StatsRow {
        r.rows.iter().find(|r| r.tag == tag).unwrap()
    }

    fn assert_row_matches(r: &StatsRow, h: &Histogram<u64>) {
        assert_eq!(r.count, h.len(), "{}", r.tag);
        assert_eq!(r.min_ns, h.min(), "{}", r.tag);
        assert_eq!(r.p50_ns, h.value_at_quantile(0.5), "{}", r.tag);
        assert_eq!(r.p99_ns, h.value_at_quantile(0.99), "{}", r.tag);
        assert_eq!(r.p999_ns, h.value_at_quantile(0.999), "{}", r.tag);
        assert_eq!(r.max_ns, h.max(), "{}", r.tag);
        assert!((r.mean_ns - h.mean()).abs() < 1e-6 * h.mean(), "{}", r.tag);
    }

    #[test]
    fn round_trip_merges_per_tag_and_all_is_the_merge_of_shards() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = write_dumps(dir.path(), 6, 4, 10);
        let r = load(&StatsQuery::new(dir.path())).unwrap();
        assert_eq!(r.intervals, 6);
        assert_eq!(r.files, 2);
        assert_eq!(
            (r.skipped_lines, r.skipped_files),
            (0, 0),
            "{:?}",
            r.problems
        );
        assert_eq!(r.from, Some(at(T0)));
        assert_eq!(r.to, Some(at(T0 + 60)));
        let tags: Vec<&str> = r.rows.iter().map(|r| r.tag.as_str()).collect();
        assert_eq!(tags, ["shard=0", "shard=1", "all"]);

        let m0 = merged(inputs.iter().map(|i| &i[0]));
        let m1 = merged(inputs.iter().map(|i| &i[1]));
        let all = merged([&m0, &m1]);
        assert_row_matches(row(&r, "shard=0"), &m0);
        assert_row_matches(row(&r, "shard=1"), &m1);
        assert_row_matches(row(&r, "all"), &all);
        // Within hdr precision (3 significant figures) of the exact values.
        let p50 = row(&r, "shard=0").p50_ns as f64;
        assert!((p50 / 750_000.0 - 1.0).abs() < 0.01, "{p50}");
        assert_eq!(r.rows[2].count, 6 * 1050);

        let c = r.counters.unwrap();
        assert_eq!(c.udp_in.packets, 6 * 30);
        assert_eq!(c.tcp_out.bytes, 6 * 3 * 1740);
        assert_eq!(c.dropped(DropReason::TcpBackpressure), 6 * 3);
        assert_eq!(c.wakeups, 6 * 12);
    }

    #[test]
    fn window_keeps_the_newest_intervals_and_since_filters_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = write_dumps(dir.path(), 6, 4, 10);
        let q = StatsQuery {
            window: Some(Duration::from_secs(20)),
            ..StatsQuery::new(dir.path())
        };
        let r = load(&q).unwrap();
        assert_eq!(r.intervals, 2);
        assert_eq!(r.from, Some(at(T0 + 40)));
        assert_eq!(r.to, Some(at(T0 + 60)));
        assert_row_matches(row(&r, "shard=0"), &merged([&inputs[4][0], &inputs[5][0]]));
        assert_eq!(r.counters.unwrap().udp_in.packets, 2 * 30);

        // A window shorter than an interval still shows the newest interval whole.
        let q = StatsQuery {
            window: Some(Duration::from_secs(1)),
            ..StatsQuery::new(dir.path())
        };
        assert_eq!(load(&q).unwrap().intervals, 1);

        let q = StatsQuery {
            since: Some(at(T0 + 30)),
            ..StatsQuery::new(dir.path())
        };
        let r = load(&q).unwrap();
        assert_eq!(r.intervals, 3);
        assert_eq!(r.from, Some(at(T0 + 30)));

        let q = StatsQuery {
            since: Some(at(T0 + 1000)),
            ..StatsQuery::new(dir.path())
        };
        let r = load(&q).unwrap();
        assert_eq!((r.intervals, r.rows.len(), r.counters), (0, 0, None));
        assert!(r.render_table().contains("no intervals in the window"));
    }

    #[test]
    fn rotation_keeps_max_files_and_files_read_with_the_hdrhistogram_iterator() {
        let dir = tempfile::tempdir().unwrap();
        write_dumps(dir.path(), 10, 2, 3);
        let (hlogs, jsonls) = list_dumps(dir.path()).unwrap();
        assert_eq!((hlogs.len(), jsonls.len()), (3, 3));
        let mut intervals = 0;
        for path in &hlogs {
            let bytes = fs::read(path).unwrap();
            for e in IntervalLogIterator::new(&bytes) {
                if let LogEntry::Interval(i) = e.unwrap() {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(i.encoded_histogram())
                        .unwrap();
                    let h: Histogram<u64> = Deserializer::new().deserialize(&mut &raw[..]).unwrap();
                    // Interval_Max is in milliseconds, to 3 decimals.
                    assert!(
                        (i.max() - h.max() as f64 / 1e6).abs() <= 0.0005,
                        "{}",
                        i.max()
                    );
                    intervals += 1;
                }
            }
        }
        assert_eq!(intervals, 6 * 3, "3 files x 2 intervals x 3 tags");
        let r = load(&StatsQuery::new(dir.path())).unwrap();
        assert_eq!(r.intervals, 6);
        assert_eq!(r.from, Some(at(T0 + 40)));
    }

    #[test]
    fn damaged_lines_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = write_dumps(dir.path(), 3, 10, 10);
        let (hlogs, jsonls) = list_dumps(dir.path()).unwrap();
        let text = fs::read_to_string(&hlogs[0]).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        // Damage shard=1 of interval 0 (base64 body), add a garbage line and truncate the file
        // in the middle of the last line ("all" of interval 2).
        let first = lines.iter().position(|l| l.starts_with("Tag=")).unwrap();
        let victim = &mut lines[first + 1];
        assert!(victim.starts_with("Tag=shard=1,"), "{victim}");
        let cut = victim.len() - 20;
        victim.replace_range(cut.., "AAAAAAAAAAAAAAAAAAAA");
        let last = lines.pop().unwrap();
        let mut damaged = lines.join("\n");
        damaged.push('\n');
        damaged.push_str("garbage line\n");
        damaged.push_str(&last[..last.len() / 2]);
        fs::write(&hlogs[0], damaged).unwrap();
        let mut j = fs::read_to_string(&jsonls[0]).unwrap();
        j.push_str("{\"start_unix_ms\": \n");
        fs::write(&jsonls[0], j).unwrap();

        let r = load(&StatsQuery::new(dir.path())).unwrap();
        assert_eq!(r.skipped_lines, 4, "{:#?}", r.problems);
        assert_eq!(r.problems.len(), 4);
        let at = |n: usize, what: &str| format!(".hlog:{n}: {what}");
        let garbage = first + 9; // 1-based number of the line after the 8 kept interval lines
        assert!(
            r.problems[0].contains(&at(first + 2, "histogram")),
            "{}",
            r.problems[0]
        );
        let bad = at(garbage, "not an interval-log line");
        assert!(r.problems[1].contains(&bad), "{}", r.problems[1]);
        let cut = at(garbage + 1, "truncated line");
        assert!(r.problems[2].contains(&cut), "{}", r.problems[2]);
        assert!(r.problems[3].contains(".counters.jsonl:4: not a counters record"));
        assert_eq!(r.intervals, 3);
        let m1 = merged([&inputs[1][1], &inputs[2][1]]);
        assert_row_matches(row(&r, "shard=1"), &m1);
        assert_eq!(row(&r, "all").count, 2 * 1050);
        assert_eq!(r.counters.unwrap().udp_in.packets, 3 * 30);
        let table = r.render_table();
        assert!(table.contains("skipped 4 unreadable lines"), "{table}");
    }

    #[test]
    fn no_dumps_is_an_error_an_operator_understands() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&StatsQuery::new(dir.path())).unwrap_err();
        assert!(matches!(err, StatsError::NoDumps { .. }));
        let msg = err.to_string();
        assert!(msg.contains("no latency dumps") && msg.contains(&*dir.path().to_string_lossy()));

        fs::write(dir.path().join("readme.txt"), "x").unwrap();
        fs::create_dir(dir.path().join("sub.hlog")).unwrap();
        assert!(matches!(
            load(&StatsQuery::new(dir.path())),
            Err(StatsError::NoDumps { .. })
        ));

        let err = load(&StatsQuery::new(dir.path().join("missing"))).unwrap_err();
        assert!(matches!(err, StatsError::ReadDir { .. }), "{err}");
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn table_json_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        write_dumps(dir.path(), 3, 10, 10);
        let plot = dir.path().join("p99.svg");
        let q = StatsQuery {
            plot: Some(plot.clone()),
            json: true,
            ..StatsQuery::new(dir.path())
        };
        let json: serde_json::Value = serde_json::from_str(&run(&q).unwrap()).unwrap();
        assert_eq!(json["intervals"], 3);
        assert_eq!(json["from"], "2024-06-01T12:00:00.000Z");
        assert_eq!(json["to_unix_ms"], (T0 + 30) * 1000);
        assert_eq!(json["rows"][2]["tag"], "all");
        assert_eq!(json["rows"][2]["count"], 3 * 1050);
        assert_eq!(json["counters"]["drops"]["tcp_backpressure"], 9);
        let svg = fs::read_to_string(&plot).unwrap();
        // Percentiles: one line per tag; over time: p50, p99, max, and packets.
        assert_eq!(svg.matches("<polyline").count(), 3 + 4);
        let p50 = svg.find("data-series=\"p50\"").unwrap();
        let pts = &svg[p50..];
        let pts = &pts[pts.find("points=\"").unwrap() + 8..];
        let pts = &pts[..pts.find('"').unwrap()];
        assert_eq!(pts.split_whitespace().count(), 3, "one point per interval");

        let table = run(&StatsQuery::new(dir.path())).unwrap();
        println!("{table}");
        assert!(table.starts_with(
            "voxgate relay latency: 2024-06-01 12:00:00.000 UTC .. 2024-06-01 12:00:30.000 UTC (30.000 s, 3 intervals)"
        ));
        assert!(table.contains("shard=0"));
        assert!(table.contains("tcp_backpressure"));
        assert!(table.contains("buffer-ring exhaustion 0"));
        let all = table.lines().find(|l| l.starts_with("all ")).unwrap();
        // 3 x 1050 values; max of shard 1 is 5.490002 ms, to 3 significant figures.
        assert!(all.contains(" 3150 "), "{all}");
        assert!(all.contains(" 5492.73 "), "{all}");
    }

    #[test]
    fn svg_is_well_formed_with_one_polyline_per_series() {
        let series = vec![
            ("a <&> b".to_owned(), hist([1000, 2000, 3000, 1_000_000])),
            ("empty".to_owned(), new_latency_histogram()),
            ("big".to_owned(), hist((1..100_000).map(|v| v * 10))),
        ];
        let svg = plot_percentiles_svg(&series, "title \"x\"");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a &lt;&amp;&gt; b") && svg.contains("title &quot;x&quot;"));
        assert!(svg.contains(">99%<") && svg.contains(">99.999%<"));
        assert!(svg.contains("latency (log scale)"));
        // Tags balance (a rough well-formedness check without an XML parser).
        let opens = svg.matches('<').count();
        let closes = svg.matches('>').count();
        assert_eq!(opens, closes);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let none = plot_percentiles_svg(&[], "nothing");
        assert!(none.starts_with("<svg") && !none.contains("<polyline"));
    }

    // ---- decoding defences -------------------------------------------------------------------

    fn zlib_stored(data: &[u8]) -> Vec<u8> {
        let mut z = vec![0x78, 0x01, 0x01];
        let len = data.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(data);
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        z
    }

    fn v2_header(payload_len: u32, sigfig: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&V2_COOKIE.to_be_bytes());
        v.extend_from_slice(&payload_len.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&sigfig.to_be_bytes());
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&60_000_000_000u64.to_be_bytes());
        v.extend_from_slice(&1.0f64.to_be_bytes());
        v
    }

    fn compressed(inner: &[u8]) -> Vec<u8> {
        let z = zlib_stored(inner);
        let mut v = V2_COMPRESSED_COOKIE.to_be_bytes().to_vec();
        v.extend_from_slice(&(z.len() as u32).to_be_bytes());
        v.extend_from_slice(&z);
        v
    }

    #[test]
    fn inflate_matches_the_real_encoder() {
        let mut ser = V2DeflateSerializer::new();
        let mut plain = V2Serializer::new();
        for h in [
            new_latency_histogram(),
            hist([1]),
            hist((1..5000).map(|v| v * v)),
            hist((0..20_000).map(|v| (v * 7919) % 59_000_000_000 + 1)),
        ] {
            let mut z = Vec::new();
            ser.serialize(&h, &mut z).unwrap();
            let mut expect = Vec::new();
            plain.serialize(&h, &mut expect).unwrap();
            let out = inflate::zlib_decompress(&z[8..], MAX_INFLATED).unwrap();
            assert_eq!(out, expect);
            assert_eq!(decode_histogram(&z).unwrap(), h);
            assert_eq!(decode_histogram(&expect).unwrap(), h);
            assert_eq!(
                inflate::zlib_decompress(&z[8..], out.len() - 1),
                Err(inflate::InflateError::TooLarge)
            );
        }
        assert_eq!(
            inflate::zlib_decompress(&zlib_stored(b"hello"), 100).unwrap(),
            b"hello"
        );
    }

    #[test]
    fn hostile_headers_are_refused_before_decoding() {
        // Claims a 4 GiB payload: the hdrhistogram decoder would allocate it up front.
        let huge = v2_header(u32::MAX, 3);
        let e = decode_histogram(&compressed(&huge)).unwrap_err();
        assert!(e.contains("shorter than its header"), "{e}");
        assert!(decode_histogram(&huge).is_err());
        // 5 significant figures: a 50 MB counts array.
        let mut precise = v2_header(1, 5);
        precise.push(2);
        let e = decode_histogram(&compressed(&precise)).unwrap_err();
        assert!(e.contains("significant figures"), "{e}");
        // A count whose zig-zag decoding overflows the decoder's negation (debug builds panic).
        let mut ovf = v2_header(9, 3);
        ovf.extend_from_slice(&[0xff; 9]);
        let e = decode_histogram(&compressed(&ovf)).unwrap_err();
        assert!(e.contains("out-of-range count"), "{e}");
        // A sane one passes.
        let mut ok = v2_header(1, 3);
        ok.push(2); // zig-zag 1: one count at index 0
        assert_eq!(decode_histogram(&compressed(&ok)).unwrap().len(), 1);
    }

    #[test]
    fn varints_are_read_like_the_decoder_reads_them() {
        assert_eq!(read_varint(&[0x05, 0xff]), (5, 1));
        assert_eq!(read_varint(&[0x80 | 0x01, 0x02]), (1 | 2 << 7, 2));
        assert_eq!(read_varint(&[0xff; 9]), (u64::MAX, 9));
        assert_eq!(read_varint(&[0xff; 12]), (u64::MAX, 9));
        assert_eq!(read_varint(&[0x80, 0x80]), (0, 2)); // cut short
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn loading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("x.hlog"), &bytes).unwrap();
            fs::write(dir.path().join("x.counters.jsonl"), &bytes).unwrap();
            let q = StatsQuery { window: Some(Duration::from_secs(5)), ..StatsQuery::new(dir.path()) };
            let r = load(&q).unwrap();
            let _ = r.render_table();
            let _ = r.to_json();
        }

        #[test]
        fn loading_damaged_dumps_never_panics(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            write_dumps(dir.path(), 2, 10, 10);
            let (hlogs, _) = list_dumps(dir.path()).unwrap();
            let mut bytes = fs::read(&hlogs[0]).unwrap();
            for (i, b) in edits {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            fs::write(&hlogs[0], &bytes).unwrap();
            let r = load(&StatsQuery::new(dir.path())).unwrap();
            let _ = r.render_table();
        }

        #[test]
        fn inflate_and_decode_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = inflate::zlib_decompress(&bytes, 4096);
            let _ = decode_histogram(&bytes);
            let mut framed = V2_COMPRESSED_COOKIE.to_be_bytes().to_vec();
            framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            framed.extend_from_slice(&[0x78, 0x9c]);
            framed.extend_from_slice(&bytes);
            let _ = decode_histogram(&framed);
        }

        #[test]
        fn inflate_of_damaged_real_streams_never_panics(
            values in proptest::collection::vec(1u64..60_000_000_000, 1..300),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut z = Vec::new();
            V2DeflateSerializer::new().serialize(&hist(values.iter().copied()), &mut z).unwrap();
            for (i, b) in flips {
                let i = i.index(z.len() - 8) + 8;
                z[i] ^= b;
            }
            let _ = decode_histogram(&z);
        }
    }
}
