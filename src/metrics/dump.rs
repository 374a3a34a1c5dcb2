//! Interval dumps of relay latency and counters, written by the control thread.
//!
//! Every interval the control thread collects one [`ShardSample`] per shard (the shard's
//! latency histogram since the previous sample, plus a copy of its counters) and hands them to
//! [`DumpWriter::write_interval`]. The writer appends to a pair of files named after the UTC
//! start of their first interval, so that names sort chronologically:
//!
//! - `voxgate-20240601T120000.000Z.hlog`: an HdrHistogram interval log (format version 1.3,
//!   as written by the Java `HistogramLogWriter`: header comments, `#[StartTime: ..]`,
//!   `#[BaseTime: ..]`, the CSV legend, then one line per histogram). Each interval has one
//!   line per shard tagged `shard=<i>` and one untagged line with all shards merged, which is
//!   what stock tools read by default; histograms are V2-deflate encoded and hold
//!   nanoseconds. The informational `Interval_Max` column is in milliseconds (the histogram's
//!   max divided by 10^6), as the Java `HistogramLogWriter` writes it by default for
//!   nanosecond histograms. Standard readers take it as is: `tests/hdr_tools.rs` runs the
//!   Java `HistogramLogProcessor` (Debian's `libhdrhistogram-java`) on a dump and compares its
//!   percentiles with voxgate's; `hdrhistogram::serialization::interval_log::IntervalLogIterator`
//!   reads it too. (Dumps written before this change tagged the merged line `all`;
//!   `voxgate stats` reads both.)
//! - `voxgate-20240601T120000.000Z.counters.jsonl`: one JSON object per interval with the
//!   merged and per-shard counters (drops keyed by [`DropReason::name`]).
//!
//! After `intervals_per_file` intervals the writer starts a new pair and deletes the oldest
//! pairs so that at most `max_files` remain. Each interval is formatted in memory and written
//! with one `write_all` per file, so a concurrent reader sees whole lines.
//!
//! This module owns the dump directory's `voxgate-*` files. It does no reading (see
//! [`super::stats`]) and never panics on IO errors: they come back as [`DumpError`].

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

use super::counters::{Counters, DropReason, Flow};

/// Lowest latency the shards' histograms can tell apart, in nanoseconds.
pub const LATENCY_LOWEST_NS: u64 = 1;
/// Highest latency the shards' histograms track, in nanoseconds (60 s).
pub const LATENCY_HIGHEST_NS: u64 = 60_000_000_000;
/// Significant decimal digits the shards' histograms keep.
pub const LATENCY_SIGFIG: u8 = 3;

/// Name of the merged (all shards) histogram in reports. The merged line itself is untagged
/// in the dumps (older dumps tagged it `all`).
pub const TAG_ALL: &str = "all";
/// `Interval_Max` is the histogram's max (ns) divided by this: milliseconds, the Java
/// `HistogramLogWriter`'s default unit ratio.
pub const MAX_VALUE_DIVISOR: f64 = 1_000_000.0;

const FILE_PREFIX: &str = "voxgate-";
const HLOG_SUFFIX: &str = ".hlog";
const COUNTERS_SUFFIX: &str = ".counters.jsonl";
/// How many `~N` suffixes to try when a file name is taken (same start millisecond).
const MAX_NAME_COLLISIONS: u32 = 99;

/// The relay-latency histogram every shard keeps: 1 ns .. 60 s, 3 significant figures.
/// Values above 60 s do not fit; shards record them saturated (`saturating_record`).
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LATENCY_LOWEST_NS, LATENCY_HIGHEST_NS, LATENCY_SIGFIG)
        .expect("constant bounds are valid: low >= 1, high >= 2 * low, sigfig <= 5")
}

/// What one shard reports for one interval.
#[derive(Clone, Debug)]
pub struct ShardSample {
    pub shard: usize,
    /// Relay latency in nanoseconds recorded since the previous sample.
    pub latency: Histogram<u64>,
    pub counters: Counters,
}

/// Where and how much to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpConfig {
    pub dir: PathBuf,
    /// Pairs of files (`.hlog` + `.counters.jsonl`) to keep; at least 1.
    pub max_files: usize,
    /// Intervals per file before rotating to a new pair; at least 1.
    pub intervals_per_file: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("invalid dump configuration for {dir}: {problem}")]
    InvalidConfig { dir: PathBuf, problem: &'static str },
    #[error("cannot create dump directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot create dump file {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot write dump file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot dump interval into {dir}: {problem}")]
    InvalidInterval { dir: PathBuf, problem: &'static str },
    #[error("cannot merge the latency histogram of shard {shard} into the total: {problem}")]
    Merge { shard: usize, problem: String },
    #[error("cannot encode the histogram tagged {tag} for {path}: {problem}")]
    Encode {
        path: PathBuf,
        tag: String,
        problem: String,
    },
}

/// The pair of files being appended to.
struct OpenPair {
    stem: String,
    hlog_path: PathBuf,
    hlog: File,
    counters_path: PathBuf,
    counters: File,
    /// `#[BaseTime]` of the hlog: interval timestamps are relative to it.
    base: Duration,
    intervals: usize,
}

/// Writes interval dumps; owned by the control thread.
pub struct DumpWriter {
    cfg: DumpConfig,
    current: Option<OpenPair>,
    serializer: V2DeflateSerializer,
    hlog_buf: Vec<u8>,
    /// One histogram's V2-deflate encoding.
    encode_buf: Vec<u8>,
    counters_buf: Vec<u8>,
}

impl std::fmt::Debug for DumpWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpWriter")
            .field("cfg", &self.cfg)
            .field("current", &self.current.as_ref().map(|p| &p.stem))
            .finish_non_exhaustive()
    }
}

impl DumpWriter {
    /// Checks the configuration and creates the directory (and its parents). Files are created
    /// on the first interval, named after its start.
    pub fn new(cfg: DumpConfig) -> Result<Self, DumpError> {
        if cfg.max_files == 0 {
            return Err(DumpError::InvalidConfig {
                dir: cfg.dir,
                problem: "max_files must be at least 1",
            });
        }
        if cfg.intervals_per_file == 0 {
            return Err(DumpError::InvalidConfig {
                dir: cfg.dir,
                problem: "intervals_per_file must be at least 1",
            });
        }
        fs::create_dir_all(&cfg.dir).map_err(|source| DumpError::CreateDir {
            path: cfg.dir.clone(),
            source,
        })?;
        Ok(DumpWriter {
            cfg,
            current: None,
            serializer: V2DeflateSerializer::new(),
            hlog_buf: Vec::new(),
            encode_buf: Vec::new(),
            counters_buf: Vec::new(),
        })
    }

    pub fn config(&self) -> &DumpConfig {
        &self.cfg
    }

    /// The `.hlog` file currently appended to, if any interval was written yet.
    pub fn current_hlog(&self) -> Option<&Path> {
        self.current.as_ref().map(|p| p.hlog_path.as_path())
    }

    /// Writes one interval [start, end) (wall-clock): one interval-log line per shard tagged
    /// `shard=<i>` plus an untagged merged line, and one JSON line of counters. Rotates after
    /// `intervals_per_file` intervals (or when the clock went back before the file's base time)
    /// and deletes the oldest pairs beyond `max_files`.
    pub fn write_interval(
        &mut self,
        start: SystemTime,
        end: SystemTime,
        samples: &[ShardSample],
    ) -> Result<(), DumpError> {
        let start = start
            .duration_since(UNIX_EPOCH)
            .map_err(|_| self.invalid("interval starts before 1970"))?;
        let end = end
            .duration_since(UNIX_EPOCH)
            .map_err(|_| self.invalid("interval ends before 1970"))?;
        let length = end
            .checked_sub(start)
            .ok_or_else(|| self.invalid("interval ends before it starts"))?;

        let mut all = new_latency_histogram();
        all.auto(true);
        let mut all_counters = Counters::default();
        for s in samples {
            all.add(&s.latency).map_err(|e| DumpError::Merge {
                shard: s.shard,
                problem: e.to_string(),
            })?;
            all_counters.merge(&s.counters);
        }

        let rotate = match &self.current {
            None => true,
            Some(p) => p.intervals >= self.cfg.intervals_per_file || start < p.base,
        };
        if rotate {
            // Drop the old pair first so a failure to open the new one leaves no stale state;
            // the next interval tries again.
            self.current = None;
            let pair = self.open_pair(start)?;
            self.prune(&pair.stem);
            self.current = Some(pair);
        }
        let Some(pair) = self.current.as_mut() else {
            return Err(DumpError::InvalidInterval {
                dir: self.cfg.dir.clone(),
                problem: "no dump file is open",
            });
        };

        // The hlog lines, formatted in memory and written at once, as the Java
        // `HistogramLogWriter` writes them: `[Tag=<tag>,]start,length,max,histogram` with
        // start and length in seconds (3 decimals) and max in milliseconds.
        self.hlog_buf.clear();
        // `start >= base` was ensured by the rotation rule.
        let offset = start.saturating_sub(pair.base);
        let tagged = samples
            .iter()
            .map(|s| (Some(format!("shard={}", s.shard)), &s.latency))
            .chain(std::iter::once((None, &all)));
        for (tag, h) in tagged {
            self.encode_buf.clear();
            self.serializer
                .serialize(h, &mut self.encode_buf)
                .map_err(|e| DumpError::Encode {
                    path: pair.hlog_path.clone(),
                    tag: tag.clone().unwrap_or_else(|| TAG_ALL.to_owned()),
                    problem: format!("{e:?}"),
                })?;
            let mut line = String::new();
            if let Some(t) = &tag {
                let _ = write!(line, "Tag={t},");
            }
            let _ = write!(
                line,
                "{:.3},{:.3},{:.3},",
                offset.as_secs_f64(),
                length.as_secs_f64(),
                h.max() as f64 / MAX_VALUE_DIVISOR
            );
            base64::Engine::encode_string(
                &base64::engine::general_purpose::STANDARD,
                &self.encode_buf,
                &mut line,
            );
            line.push('\n');
            self.hlog_buf.extend_from_slice(line.as_bytes());
        }

        self.counters_buf.clear();
        let record = IntervalRecordOut {
            start: format_rfc3339(start),
            end: format_rfc3339(end),
            start_unix_ms: unix_ms(start),
            end_unix_ms: unix_ms(end),
            all: CountersRecord::from(&all_counters),
            shards: samples
                .iter()
                .map(|s| ShardCountersRecord {
                    shard: s.shard,
                    counters: CountersRecord::from(&s.counters),
                })
                .collect(),
        };
        serde_json::to_writer(&mut self.counters_buf, &record).map_err(|e| DumpError::Encode {
            path: pair.counters_path.clone(),
            tag: TAG_ALL.to_owned(),
            problem: e.to_string(),
        })?;
        self.counters_buf.push(b'\n');

        // Count the interval even if a write fails below, so a broken file is rotated away.
        pair.intervals += 1;
        write_whole(&mut pair.hlog, &pair.hlog_path, &self.hlog_buf)?;
        write_whole(&mut pair.counters, &pair.counters_path, &self.counters_buf)?;
        Ok(())
    }

    fn invalid(&self, problem: &'static str) -> DumpError {
        DumpError::InvalidInterval {
            dir: self.cfg.dir.clone(),
            problem,
        }
    }

    /// Creates a new pair named after `start` (with a `~N` suffix if the name is taken) and
    /// writes the interval-log header.
    fn open_pair(&self, start: Duration) -> Result<OpenPair, DumpError> {
        // Millisecond resolution, like the timestamps in the log.
        let base = Duration::from_millis(unix_ms(start));
        let name = format_compact(base);
        for n in 0..=MAX_NAME_COLLISIONS {
            let stem = if n == 0 {
                format!("{FILE_PREFIX}{name}")
            } else {
                format!("{FILE_PREFIX}{name}~{n:02}")
            };
            let hlog_path = self.cfg.dir.join(format!("{stem}{HLOG_SUFFIX}"));
            let counters_path = self.cfg.dir.join(format!("{stem}{COUNTERS_SUFFIX}"));
            let mut hlog = match create_new(&hlog_path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(DumpError::CreateFile {
                        path: hlog_path,
                        source,
                    });
                }
            };
            // A counters file without its hlog is a leftover; replace it.
            let counters = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&counters_path)
                .map_err(|source| DumpError::CreateFile {
                    path: counters_path.clone(),
                    source,
                })?;
            let header = hlog_header(base);
            write_whole(&mut hlog, &hlog_path, header.as_bytes())?;
            tracing::debug!(file = %hlog_path.display(), "started a new latency dump");
            return Ok(OpenPair {
                stem,
                hlog_path,
                hlog,
                counters_path,
                counters,
                base,
                intervals: 0,
            });
        }
        Err(DumpError::CreateFile {
            path: self
                .cfg
                .dir
                .join(format!("{FILE_PREFIX}{name}{HLOG_SUFFIX}")),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this name and all its ~NN variants are taken",
            ),
        })
    }

    /// Deletes the oldest pairs so that at most `max_files` remain, never the current one.
    /// Failures are logged, not returned: the interval itself was fine, and the next rotation
    /// tries again.
    fn prune(&self, current: &str) {
        let entries = match fs::read_dir(&self.cfg.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.cfg.dir.display(), error = %e,
                    "cannot list the dump directory to delete old dumps");
                return;
            }
        };
        let mut stems = BTreeSet::new();
        for entry in entries.flatten() {
            if let Some(stem) = entry.file_name().to_str().and_then(dump_stem) {
                stems.insert(stem.to_owned());
            }
        }
        stems.remove(current);
        // The current pair counts towards max_files.
        let excess = (stems.len() + 1).saturating_sub(self.cfg.max_files);
        for stem in stems.iter().take(excess) {
            for suffix in [HLOG_SUFFIX, COUNTERS_SUFFIX] {
                let path = self.cfg.dir.join(format!("{stem}{suffix}"));
                match fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(file = %path.display(), "deleted an old dump"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "cannot delete an old dump"),
                }
            }
        }
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn write_whole(file: &mut File, path: &Path, bytes: &[u8]) -> Result<(), DumpError> {
    file.write_all(bytes)
        .and_then(|()| file.flush())
        .map_err(|source| DumpError::Write {
            path: path.to_owned(),
            source,
        })
}

/// The stem (`voxgate-<time>[~NN]`) of a file this writer creates, or `None` for any other
/// file, which is never deleted.
fn dump_stem(file_name: &str) -> Option<&str> {
    let stem = file_name
        .strip_suffix(HLOG_SUFFIX)
        .or_else(|| file_name.strip_suffix(COUNTERS_SUFFIX))?;
    let time = stem.strip_prefix(FILE_PREFIX)?;
    let (time, collision) = match time.split_once('~') {
        Some((t, n)) => (t, Some(n)),
        None => (time, None),
    };
    let well_formed = time.len() == COMPACT_LEN
        && time.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'.',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
        && collision.is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    well_formed.then_some(stem)
}

/// Header of an interval log, as the Java `HistogramLogWriter` writes it (format 1.3).
fn hlog_header(base: Duration) -> String {
    let secs = format!("{}.{:03}", base.as_secs(), base.subsec_millis());
    let mut h = String::new();
    // Writes to a String cannot fail.
    let _ = writeln!(
        h,
        "#[voxgate relay latency in nanoseconds, kernel receive timestamp to send submission]"
    );
    let _ = writeln!(
        h,
        "#[Untagged lines: all shards merged; Tag=shard=<i>: one shard; counters in the sibling {COUNTERS_SUFFIX}]"
    );
    let _ = writeln!(
        h,
        "#[Interval_Max in milliseconds; e.g. HistogramLogProcessor -i FILE -outputValueUnitRatio 1000 (µs), -tag shard=0]"
    );
    let _ = writeln!(h, "#[Logged with voxgate {}]", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(h, "#[Histogram log format version 1.3]");
    let _ = writeln!(
        h,
        "#[StartTime: {secs} (seconds since epoch), {}]",
        format_rfc3339(base)
    );
    let _ = writeln!(h, "#[BaseTime: {secs} (seconds since epoch)]");
    let _ = writeln!(
        h,
        "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
    );
    h
}

// ---- counters as JSON -------------------------------------------------------------------------

/// `Counters` as written to `.counters.jsonl`: the same fields, but drops keyed by reason name
/// (readable with `jq`, and old files stay readable when reasons are added).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct CountersRecord {
    pub udp_in: Flow,
    pub udp_out: Flow,
    pub tcp_in: Flow,
    pub tcp_out: Flow,
    pub bindings: u64,
    pub drops: DropsByName,
    pub buf_ring_exhausted: u64,
    pub tcp_accepted: u64,
    pub tcp_closed: u64,
    pub reassembly_copies: u64,
    pub wakeups: u64,
}

impl From<&Counters> for CountersRecord {
    fn from(c: &Counters) -> Self {
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
        } = *c;
        CountersRecord {
            udp_in,
            udp_out,
            tcp_in,
            tcp_out,
            bindings,
            drops: DropsByName(drops),
            buf_ring_exhausted,
            tcp_accepted,
            tcp_closed,
            reassembly_copies,
            wakeups,
        }
    }
}

impl From<&CountersRecord> for Counters {
    fn from(r: &CountersRecord) -> Self {
        Counters {
            udp_in: r.udp_in,
            udp_out: r.udp_out,
            tcp_in: r.tcp_in,
            tcp_out: r.tcp_out,
            bindings: r.bindings,
            drops: r.drops.0,
            buf_ring_exhausted: r.buf_ring_exhausted,
            tcp_accepted: r.tcp_accepted,
            tcp_closed: r.tcp_closed,
            reassembly_copies: r.reassembly_copies,
            wakeups: r.wakeups,
        }
    }
}

/// Drop counts, serialized as `{"unbound": n, ...}` in `DropReason::ALL` order. Unknown names
/// are ignored when reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "std::collections::BTreeMap<String, u64>")]
pub(crate) struct DropsByName(pub [u64; DropReason::COUNT]);

impl Serialize for DropsByName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(DropReason::COUNT))?;
        for (r, n) in DropReason::ALL.iter().zip(self.0.iter()) {
            m.serialize_entry(r.name(), n)?;
        }
        m.end()
    }
}

impl From<std::collections::BTreeMap<String, u64>> for DropsByName {
    fn from(m: std::collections::BTreeMap<String, u64>) -> Self {
        let mut d = [0; DropReason::COUNT];
        for (slot, r) in d.iter_mut().zip(DropReason::ALL.iter()) {
            *slot = m.get(r.name()).copied().unwrap_or(0);
        }
        DropsByName(d)
    }
}

#[derive(Serialize)]
struct ShardCountersRecord {
    shard: usize,
    #[serde(flatten)]
    counters: CountersRecord,
}

/// One line of `.counters.jsonl`.
#[derive(Serialize)]
struct IntervalRecordOut {
    start: String,
    end: String,
    start_unix_ms: u64,
    end_unix_ms: u64,
    all: CountersRecord,
    shards: Vec<ShardCountersRecord>,
}

/// The part of a `.counters.jsonl` line that `voxgate stats` reads.
#[derive(Deserialize)]
pub(crate) struct IntervalRecordIn {
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    pub all: CountersRecord,
}

// ---- UTC time formatting (no date crate) ------------------------------------------------------

const COMPACT_LEN: usize = "20240601T120000.000Z".len();

pub(crate) fn unix_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Proleptic Gregorian date from days since 1970-01-01 (H. Hinnant, `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    milli: u32,
}

fn utc(d: Duration) -> Utc {
    let secs = d.as_secs();
    // secs / 86400 < 2^47 fits in i64.
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    Utc {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: sod % 3600 / 60,
        second: sod % 60,
        milli: d.subsec_millis(),
    }
}

/// `2024-06-01T12:00:00.000Z`
pub(crate) fn format_rfc3339(d: Duration) -> String {
    let t = utc(d);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli
    )
}

/// `2024-06-01 12:00:00.000 UTC`, for people.
pub(crate) fn format_human(d: Duration) -> String {
    let t = utc(d);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli
    )
}

/// `20240601T120000.000Z`: fixed width for years 1970..=9999, so names sort by time.
fn format_compact(d: Duration) -> String {
    let t = utc(d);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.milli
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    pub(crate) fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample(shard: usize, values: &[u64]) -> ShardSample {
        let mut latency = new_latency_histogram();
        for &v in values {
            latency.record(v).unwrap();
        }
        let mut counters = Counters::default();
        counters.udp_in.add(100 * values.len());
        counters.drop(DropReason::Unbound);
        counters.wakeups = 3;
        ShardSample {
            shard,
            latency,
            counters,
        }
    }

    fn files(dir: &Path, suffix: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(suffix))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(format_rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 23:59:59.999
        let d = Duration::from_millis(951_868_799_999);
        assert_eq!(format_rfc3339(d), "2000-02-29T23:59:59.999Z");
        assert_eq!(format_compact(d), "20000229T235959.999Z");
        assert_eq!(format_human(d), "2000-02-29 23:59:59.999 UTC");
        let d = Duration::from_secs(1_717_243_200);
        assert_eq!(format_rfc3339(d), "2024-06-01T12:00:00.000Z");
    }

    #[test]
    fn only_our_file_names_are_dump_stems() {
        assert_eq!(
            dump_stem("voxgate-20240601T120000.000Z.hlog"),
            Some("voxgate-20240601T120000.000Z")
        );
        assert_eq!(
            dump_stem("voxgate-20240601T120000.000Z~03.counters.jsonl"),
            Some("voxgate-20240601T120000.000Z~03")
        );
        for other in [
            "notes.hlog",
            "voxgate-latest.hlog",
            "voxgate-20240601T120000.000Z.txt",
            "voxgate-20240601T120000.000Z~.hlog",
            "voxgate-20240601X120000.000Z.hlog",
        ] {
            assert_eq!(dump_stem(other), None, "{other}");
        }
    }

    #[test]
    fn rejects_bad_config_naming_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let err = DumpWriter::new(DumpConfig {
            dir: dir.path().to_owned(),
            max_files: 0,
            intervals_per_file: 1,
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_files") && msg.contains(&*dir.path().to_string_lossy()));

        // A file where the directory should be.
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = DumpWriter::new(DumpConfig {
            dir: file.join("dumps"),
            max_files: 1,
            intervals_per_file: 1,
        })
        .unwrap_err();
        assert!(matches!(err, DumpError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("plain-file/dumps"), "{err}");
    }

    #[test]
    fn writes_a_standard_interval_log_and_a_counters_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.path().join("dumps"),
            max_files: 4,
            intervals_per_file: 10,
        })
        .unwrap();
        let t0 = 1_717_243_200;
        let s = [sample(0, &[1_000, 2_000, 3_000]), sample(1, &[50_000])];
        w.write_interval(at(t0), at(t0 + 10), &s).unwrap();
        w.write_interval(at(t0 + 10), at(t0 + 20), &s).unwrap();
        let ddir = dir.path().join("dumps");
        assert_eq!(files(&ddir, ".hlog"), ["voxgate-20240601T120000.000Z.hlog"]);

        let text = fs::read_to_string(ddir.join("voxgate-20240601T120000.000Z.hlog")).unwrap();
        assert!(
            text.contains("#[Histogram log format version 1.3]\n"),
            "{text}"
        );
        assert!(text.contains(
            "#[StartTime: 1717243200.000 (seconds since epoch), 2024-06-01T12:00:00.000Z]\n"
        ));
        assert!(text.contains("#[BaseTime: 1717243200.000 (seconds since epoch)]\n"));
        assert!(text.contains("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n"));

        let mut entries = Vec::new();
        for e in IntervalLogIterator::new(text.as_bytes()) {
            match e.unwrap() {
                LogEntry::Interval(ilh) => {
                    let bytes = base64::Engine::decode(
                        &base64::engine::general_purpose::STANDARD,
                        ilh.encoded_histogram(),
                    )
                    .unwrap();
                    let h: Histogram<u64> =
                        Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
                    entries.push((
                        ilh.tag().map(|t| t.as_str().to_owned()),
                        ilh.start_timestamp(),
                        ilh.duration(),
                        h.len(),
                        h.max(),
                    ));
                }
                LogEntry::BaseTime(b) => assert_eq!(b, Duration::from_secs(t0)),
                LogEntry::StartTime(b) => assert_eq!(b, Duration::from_secs(t0)),
            }
        }
        let tags: Vec<_> = entries.iter().map(|e| e.0.clone()).collect();
        let t = |s: &str| Some(s.to_owned());
        assert_eq!(
            tags,
            [
                t("shard=0"),
                t("shard=1"),
                None,
                t("shard=0"),
                t("shard=1"),
                None
            ],
            "the merged line is untagged"
        );
        // Interval_Max in milliseconds: shard 1's 50 µs.
        assert!(
            text.lines().any(|l| l.starts_with("0.000,10.000,0.050,")),
            "{text}"
        );
        assert_eq!(entries[2].3, 4, "all merges both shards");
        assert!(entries[2].4 >= 50_000 && entries[2].4 < 50_100);
        assert_eq!(
            entries[3].1,
            Duration::from_secs(10),
            "relative to BaseTime"
        );
        assert_eq!(entries[3].2, Duration::from_secs(10));

        let jsonl =
            fs::read_to_string(ddir.join("voxgate-20240601T120000.000Z.counters.jsonl")).unwrap();
        let lines: Vec<&str> = jsonl.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["start"], "2024-06-01T12:00:00.000Z");
        assert_eq!(v["end_unix_ms"], 1_717_243_210_000u64);
        assert_eq!(v["all"]["udp_in"]["packets"], 2);
        assert_eq!(v["all"]["udp_in"]["bytes"], 400);
        assert_eq!(v["all"]["drops"]["unbound"], 2);
        assert_eq!(v["shards"][1]["shard"], 1);
        assert_eq!(v["shards"][1]["wakeups"], 3);
        let back: IntervalRecordIn = serde_json::from_str(lines[1]).unwrap();
        let mut expect = s[0].counters;
        expect.merge(&s[1].counters);
        assert_eq!(Counters::from(&back.all), expect);
    }

    #[test]
    fn empty_histograms_and_no_shards_still_record_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.path().to_owned(),
            max_files: 1,
            intervals_per_file: 5,
        })
        .unwrap();
        w.write_interval(at(100), at(101), &[sample(0, &[])])
            .unwrap();
        w.write_interval(at(101), at(102), &[]).unwrap();
        let text = fs::read_to_string(w.current_hlog().unwrap()).unwrap();
        let n = IntervalLogIterator::new(text.as_bytes())
            .filter(|e| matches!(e, Ok(LogEntry::Interval(_))))
            .count();
        assert_eq!(n, 3);
    }

    #[test]
    fn rotates_and_keeps_at_most_max_files_pairs() {
        let dir = tempfile::tempdir().unwrap();
        // Someone else's file in the directory is left alone.
        fs::write(dir.path().join("notes.hlog"), b"#mine\n").unwrap();
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.path().to_owned(),
            max_files: 3,
            intervals_per_file: 2,
        })
        .unwrap();
        for i in 0..11u64 {
            w.write_interval(at(1000 + i), at(1001 + i), &[sample(0, &[i + 1])])
                .unwrap();
        }
        let hlogs = files(dir.path(), ".hlog");
        let jsonls = files(dir.path(), ".counters.jsonl");
        // 11 intervals / 2 per file = 6 pairs written, the newest 3 kept.
        assert_eq!(
            hlogs,
            [
                "notes.hlog",
                "voxgate-19700101T001646.000Z.hlog",
                "voxgate-19700101T001648.000Z.hlog",
                "voxgate-19700101T001650.000Z.hlog"
            ]
        );
        assert_eq!(jsonls.len(), 3);
        for h in &hlogs[1..] {
            let text = fs::read(dir.path().join(h)).unwrap();
            let n = IntervalLogIterator::new(&text)
                .map(|e| e.unwrap())
                .filter(|e| matches!(e, LogEntry::Interval(_)))
                .count();
            assert!(n == 4 || n == 2, "{h}: {n}"); // 2 intervals x (shard + all), last has 1
        }
    }

    #[test]
    fn same_start_millisecond_gets_a_later_sorting_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.path().to_owned(),
            max_files: 10,
            intervals_per_file: 1,
        })
        .unwrap();
        w.write_interval(at(5), at(5), &[]).unwrap();
        w.write_interval(at(5), at(6), &[]).unwrap();
        assert_eq!(
            files(dir.path(), ".hlog"),
            [
                "voxgate-19700101T000005.000Z.hlog",
                "voxgate-19700101T000005.000Z~01.hlog"
            ]
        );
    }

    #[test]
    fn clock_going_back_starts_a_new_file_and_bad_intervals_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::new(DumpConfig {
            dir: dir.path().to_owned(),
            max_files: 10,
            intervals_per_file: 100,
        })
        .unwrap();
        w.write_interval(at(50), at(60), &[]).unwrap();
        w.write_interval(at(40), at(50), &[]).unwrap();
        assert_eq!(files(dir.path(), ".hlog").len(), 2);
        let err = w.write_interval(at(70), at(60), &[]).unwrap_err();
        assert!(matches!(err, DumpError::InvalidInterval { .. }), "{err}");
    }

    #[test]
    fn io_errors_are_returned_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let ddir = dir.path().join("gone");
        let mut w = DumpWriter::new(DumpConfig {
            dir: ddir.clone(),
            max_files: 2,
            intervals_per_file: 1,
        })
        .unwrap();
        fs::remove_dir(&ddir).unwrap();
        let err = w.write_interval(at(1), at(2), &[]).unwrap_err();
        assert!(matches!(err, DumpError::CreateFile { .. }), "{err}");
        assert!(err.to_string().contains("gone/voxgate-"), "{err}");
        // Recovers once the directory is back.
        fs::create_dir(&ddir).unwrap();
        w.write_interval(at(2), at(3), &[]).unwrap();
    }
}
