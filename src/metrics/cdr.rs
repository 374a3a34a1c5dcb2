//! Call detail records: one JSON line per ended call (answered, unanswered or refused), what a
//! carrier bills and troubleshoots from. The control core closes a
//! [`CallRecord`](crate::control::records::CallRecord); `server/` asks the shard for the relay
//! session's legs (just before removing it) and hands both to [`build`]; [`CdrWriter`]
//! appends the line. `voxgate cdr FILE` reads and filters the file ([`run`]).
//!
//! The file is opened for appending and reopened on SIGHUP, so logrotate can rename it and
//! signal (or use `copytruncate`). Each record is written with one `write` of a whole line.
//!
//! Times are RFC 3339 UTC with milliseconds. Per direction: the path and transports, and the
//! packets and bytes the gateway relayed (0 for direct UDP: the gateway carried none). Per
//! relay leg: what the gateway received from it and sent to it, RTP loss and interarrival
//! jitter of the media it sent, and a MOS estimate ([`super::mos`]); the gateway does not
//! know the one-way delay, so the estimate assumes none (an upper bound).

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::control::planner::Path as MediaPath;
use crate::control::records::{CallRecord, DirectionRecord, Party};
use crate::metrics::Transport;
use crate::shard::relay::LegSnapshot;

/// RTP clock of G.711: jitter in timestamp units / 8 = milliseconds.
const CLOCK_KHZ: f64 = 8.0;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cdr {
    pub call: u64,
    pub conference: bool,
    pub caller: PartyOut,
    pub callee: PartyOut,
    pub set_up: String,
    pub answered: Option<String>,
    pub ended: String,
    pub duration_s: f64,
    pub talk_s: f64,
    pub reason: &'static str,
    /// "caller", "callee" or "gateway".
    pub ended_by: &'static str,
    /// Caller → callee, and callee → caller (absent when the call never got media, and in
    /// conferences, where every member's leg is listed instead).
    pub forward: Option<DirectionOut>,
    pub backward: Option<DirectionOut>,
    pub legs: Vec<LegOut>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartyOut {
    /// The caller's own number; for the callee, the number dialled (conferences: the numbers
    /// invited, comma-separated).
    pub number: String,
    pub user: Option<String>,
    pub conn: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DirectionOut {
    pub path: MediaPath,
    pub send: Transport,
    pub recv: Transport,
    pub via_gateway: bool,
    /// Relayed by the gateway to the receiver.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LegOut {
    pub party: Party,
    pub leg: String,
    /// From the party to the gateway.
    pub received_packets: u64,
    pub received_bytes: u64,
    /// From the gateway to the party.
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// RTP of the media the party sent: packets expected and lost (RFC 3550 A.3), loss as a
    /// fraction, interarrival jitter.
    pub expected: u64,
    pub lost: u64,
    pub loss: f64,
    pub jitter_ms: f64,
    /// G.107 E-model estimate for the media the party sent (no delay known: an upper bound);
    /// absent without RTP.
    pub mos: Option<f64>,
}

/// The record's line. `wall` turns the core's `Instant`s into wall-clock times.
pub fn build(rec: &CallRecord, legs: &[LegSnapshot], wall: impl Fn(Instant) -> SystemTime) -> Cdr {
    // Everything the gateway sent the receiving party, over all its legs (a re-plan gives it
    // a new one); a direction the gateway never carried has none, or none sent to.
    let direction = |d: Option<DirectionRecord>, to: &[Party]| {
        d.map(|d| {
            let (packets, bytes) = rec
                .legs
                .iter()
                .filter(|(_, p)| to.contains(p))
                .filter_map(|(name, _)| legs.iter().find(|l| &l.name == name))
                .fold((0, 0), |(n, b), l| (n + l.tx.packets, b + l.tx.bytes));
            DirectionOut {
                path: d.path,
                send: d.send,
                recv: d.recv,
                via_gateway: d.via_gateway,
                packets,
                bytes,
            }
        })
    };
    let legs_out = rec
        .legs
        .iter()
        .filter_map(|(name, party)| {
            let l = legs.iter().find(|l| &l.name == name)?;
            let r = &l.rtp;
            #[allow(clippy::cast_precision_loss)] // packet counts far below 2^52
            let loss = if r.expected == 0 {
                0.0
            } else {
                r.lost as f64 / r.expected as f64
            };
            let jitter_ms = f64::from(r.jitter) / CLOCK_KHZ;
            Some(LegOut {
                party: *party,
                leg: name.clone(),
                received_packets: l.rx.packets,
                received_bytes: l.rx.bytes,
                sent_packets: l.tx.packets,
                sent_bytes: l.tx.bytes,
                expected: r.expected,
                lost: r.lost,
                loss: round(loss, 6),
                jitter_ms: round(jitter_ms, 3),
                mos: (r.received > 0).then(|| round(super::mos::mos(loss, jitter_ms, 0.0), 3)),
            })
        })
        .collect();
    Cdr {
        call: rec.call,
        conference: rec.conference,
        caller: PartyOut {
            number: rec.caller_number.clone(),
            user: Some(rec.caller_user.clone()),
            conn: Some(rec.caller_conn),
        },
        callee: PartyOut {
            number: rec.callee_number.clone(),
            user: rec.callee_user.clone(),
            conn: rec.callee_conn,
        },
        set_up: rfc3339(wall(rec.set_up)),
        answered: rec.answered.map(|a| rfc3339(wall(a))),
        ended: rfc3339(wall(rec.ended)),
        duration_s: round(rec.duration_s(), 3),
        talk_s: round(rec.talk_s(), 3),
        reason: rec.reason.as_str(),
        ended_by: rec.ended_by,
        forward: direction(rec.forward(), &[Party::Callee, Party::Route]),
        backward: direction(rec.backward(), &[Party::Caller]),
        legs: legs_out,
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// A wall-clock converter for `Instant`s in the past: `now_wall - (now - t)`.
pub fn wall_clock() -> impl Fn(Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    move |t| {
        wall.checked_sub(now.saturating_duration_since(t))
            .unwrap_or(UNIX_EPOCH)
    }
}

// ------------------------------------------------------------------ RFC 3339 times

/// `2026-12-01T19:52:01.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX / 2));
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
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

/// (year, month, day) → days since 1970-01-01 (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 time (`2026-12-01T19:52:01Z`, `…T20:52:01.5+01:00`) or a UTC date
/// (`2026-12-01`, its midnight).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("{s:?} is not a time like 2026-12-01T19:52:01Z or a date like 2026-12-01");
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<u32, String> {
        let t = b.get(r).ok_or_else(bad)?;
        if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        std::str::from_utf8(t)
            .map_err(|_| bad())?
            .parse()
            .map_err(|_| bad())
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let days_in = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if d == 0 || d > days_in {
        return Err(bad());
    }
    let mut secs = days_from_civil(i64::from(y), mo, d) * 86_400;
    let mut nanos = 0u32;
    if b.len() > 10 {
        if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        secs += i64::from(h * 3600 + mi * 60 + se.min(59));
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start || i - start > 9 {
                return Err(bad());
            }
            let frac = num(start..i)?;
            nanos = frac * 10u32.pow(9 - u32::try_from(i - start).map_err(|_| bad())?);
        }
        match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => {}
            Some(&sign @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
                let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
                if oh > 23 || om > 59 {
                    return Err(bad());
                }
                let off = i64::from(oh * 3600 + om * 60);
                secs += if sign == b'+' { -off } else { off };
            }
            _ => return Err(bad()),
        }
    }
    let secs = u64::try_from(secs).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

// ------------------------------------------------------------------ the file

/// Appends records to a file; [`CdrWriter::reopen`] after a rotation.
pub struct CdrWriter {
    path: PathBuf,
    file: Option<std::fs::File>,
    line: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("call detail records {}: {source}", .path.display())]
pub struct CdrError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl CdrWriter {
    /// Opens (creating the file and its directory) for appending.
    pub fn open(path: &Path) -> Result<Self, CdrError> {
        let mut w = CdrWriter {
            path: path.to_owned(),
            file: None,
            line: Vec::with_capacity(2048),
        };
        w.reopen()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and opens `path` again (a new file if logrotate renamed it).
    pub fn reopen(&mut self) -> Result<(), CdrError> {
        use std::os::unix::fs::OpenOptionsExt;
        self.file = None;
        let err = |source| CdrError {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.path)
            .map_err(err)?;
        self.file = Some(f);
        Ok(())
    }

    /// Appends one line. After a failure the next record tries to reopen the file.
    pub fn write(&mut self, cdr: &Cdr) -> Result<(), CdrError> {
        if self.file.is_none() {
            self.reopen()?;
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, cdr).map_err(|e| CdrError {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.line.push(b'\n');
        let r = match self.file.as_mut() {
            Some(f) => f.write_all(&self.line),
            None => Ok(()),
        };
        r.map_err(|source| {
            self.file = None;
            CdrError {
                path: self.path.clone(),
                source,
            }
        })
    }
}

// ------------------------------------------------------------------ `voxgate cdr`

/// `voxgate cdr FILE`: print call detail records, filtered.
#[derive(clap::Args, Debug)]
pub struct CdrArgs {
    /// The CDR file (the gateway's cdr.path; default <data_dir>/cdr.jsonl).
    pub file: PathBuf,
    /// Only calls from or to this number (conferences: among the numbers invited).
    #[arg(long)]
    pub number: Option<String>,
    /// Only calls that ended at or after this time (RFC 3339, or a UTC date).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// Only calls set up before this time (RFC 3339, or a UTC date).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// Only calls that ended for this reason (normal, busy, no_answer, peer_denied, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Print the matching records as they are stored (JSON lines) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A stored record as read back (any JSON object; fields missing are simply not matched).
pub struct Filter<'a> {
    pub number: Option<&'a str>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub reason: Option<&'a str>,
}

impl Filter<'_> {
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        let s = |p: &str| v.pointer(p).and_then(serde_json::Value::as_str);
        let t = |p: &str| s(p).and_then(|x| parse_time(x).ok());
        if let Some(n) = self.number {
            let caller = s("/caller/number") == Some(n);
            let callee = s("/callee/number").is_some_and(|c| c.split(',').any(|x| x == n));
            if !caller && !callee {
                return false;
            }
        }
        if let Some(r) = self.reason
            && s("/reason") != Some(r)
        {
            return false;
        }
        if let Some(since) = self.since
            && t("/ended").is_none_or(|e| e < since)
        {
            return false;
        }
        if let Some(until) = self.until
            && t("/set_up").is_none_or(|b| b >= until)
        {
            return false;
        }
        true
    }
}

/// One human line per record.
pub fn human(v: &serde_json::Value) -> String {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("-")
    };
    let f = |p: &str| v.pointer(p).and_then(serde_json::Value::as_f64);
    let u = |p: &str| v.pointer(p).and_then(serde_json::Value::as_u64);
    let dir = |p: &str| match (s(&format!("{p}/path")), u(&format!("{p}/packets"))) {
        ("-", _) => "-".to_string(),
        (path, Some(n)) => format!("{path} {n} pkts"),
        (path, None) => path.to_string(),
    };
    let mos: Vec<String> = v
        .get("legs")
        .and_then(serde_json::Value::as_array)
        .map(|legs| {
            legs.iter()
                .filter_map(|l| {
                    let party = l.get("party")?.as_str()?;
                    let m = l.get("mos")?.as_f64()?;
                    Some(format!("{party} {m:.2}"))
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}  call {}  {} -> {}  {} ({})  {:.1} s (talk {:.1} s)  fwd {}  bwd {}  MOS {}",
        s("/set_up"),
        u("/call").map_or_else(|| "-".into(), |c| c.to_string()),
        s("/caller/number"),
        s("/callee/number"),
        s("/reason"),
        s("/ended_by"),
        f("/duration_s").unwrap_or(0.0),
        f("/talk_s").unwrap_or(0.0),
        dir("/forward"),
        dir("/backward"),
        if mos.is_empty() {
            "-".into()
        } else {
            mos.join(", ")
        }
    )
}

/// `voxgate cdr`: exit 0 when at least one record matched, 1 when none did, 2 on an
/// unreadable file. Lines that are not JSON objects are reported on stderr and skipped.
pub fn run(a: &CdrArgs) -> ExitCode {
    let file = match std::fs::File::open(&a.file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("voxgate cdr: {}: {e}", a.file.display());
            return ExitCode::from(2);
        }
    };
    let filter = Filter {
        number: a.number.as_deref(),
        since: a.since,
        until: a.until,
        reason: a.reason.as_deref(),
    };
    let name = a.file.display().to_string();
    let stdout = std::io::stdout();
    let mut warn = |m: String| eprintln!("voxgate cdr: {name}:{m}");
    match scan(
        std::io::BufReader::new(file),
        &filter,
        a.json,
        &mut stdout.lock(),
        &mut warn,
    ) {
        Ok(0) => {
            eprintln!("voxgate cdr: no record matched");
            ExitCode::from(1)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxgate cdr: {}: {e}", a.file.display());
            ExitCode::from(2)
        }
    }
}

/// Longest line read: a record is a few KB; a longer line is not one of ours.
pub const MAX_LINE: usize = 1 << 20;

/// Prints the records of `reader` that `filter` keeps (as stored with `json`, else one human
/// line each); returns how many. Lines over [`MAX_LINE`] bytes, not UTF-8 or not JSON objects
/// are skipped and reported through `warn` ("LINE: why"). Memory stays bounded by
/// [`MAX_LINE`] whatever the input.
pub fn scan<R: std::io::BufRead, W: Write>(
    mut reader: R,
    filter: &Filter<'_>,
    json: bool,
    out: &mut W,
    warn: &mut impl FnMut(String),
) -> std::io::Result<u64> {
    let mut matched = 0u64;
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        let got = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if got == 0 {
            break;
        }
        n += 1;
        if got > MAX_LINE {
            warn(format!("{n}: line longer than {MAX_LINE} bytes, skipped"));
            // Skip the rest of the line, a buffer at a time.
            loop {
                let (used, done) = match reader.fill_buf()? {
                    [] => break,
                    buf => match buf.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (buf.len(), false),
                    },
                };
                reader.consume(used);
                if done {
                    break;
                }
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            warn(format!("{n}: not UTF-8, skipped"));
            continue;
        };
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => {
                warn(format!("{n}: not a JSON object, skipped"));
                continue;
            }
        };
        if !filter.matches(&v) {
            continue;
        }
        matched += 1;
        let r = if json {
            writeln!(out, "{text}")
        } else {
            writeln!(out, "{}", human(&v))
        };
        if r.is_err() {
            break; // stdout closed (e.g. `| head`)
        }
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::planner::Plan;
    use crate::metrics::Flow;
    use crate::metrics::rtpstats::RtpReport;
    use crate::wire::control::HangupReason;
    use proptest::prelude::*;

    #[test]
    fn rfc3339_reference_times() {
        let t = |s: u64, ms: u32| UNIX_EPOCH + Duration::new(s, ms * 1_000_000);
        assert_eq!(rfc3339(t(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(t(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(t(1_796_161_921, 123)), "2026-12-01T21:52:01.123Z");
        assert_eq!(
            parse_time("2026-12-01T21:52:01.123Z").unwrap(),
            t(1_796_161_921, 123)
        );
        assert_eq!(
            parse_time("2026-12-01T22:52:01.123+01:00").unwrap(),
            t(1_796_161_921, 123)
        );
        assert_eq!(
            parse_time("2026-12-01T20:52:01.123-01:00").unwrap(),
            t(1_796_161_921, 123)
        );
        assert_eq!(parse_time("2026-12-01").unwrap(), t(1_796_083_200, 0));
        assert_eq!(
            parse_time("2000-02-29T00:00:00Z").unwrap(),
            t(951_782_400, 0)
        );
        for bad in [
            "",
            "2026",
            "2026-13-01",
            "2026-02-30",
            "2025-02-29",
            "2026-12-01T25:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00+1:00",
            "yesterday",
            "2026-12-01T10:00:00.1234567890Z",
            "+026-12-01",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("is not a time like"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn times_round_trip(secs in 0u64..8_000_000_000, ms in 0u32..1000) {
            let t = UNIX_EPOCH + Duration::new(secs, ms * 1_000_000);
            prop_assert_eq!(parse_time(&rfc3339(t)).unwrap(), t);
        }

        #[test]
        fn the_time_parser_never_panics(s in "\\PC{0,40}") {
            let _ = parse_time(&s);
        }

        #[test]
        fn the_filter_never_panics_on_odd_records(s in "\\PC{0,80}") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
                let f = Filter { number: Some("1"), since: Some(UNIX_EPOCH), until: Some(SystemTime::now()), reason: Some("x") };
                let _ = f.matches(&v);
                let _ = human(&v);
            }
        }
    }

    fn leg(name: &str, rx: (u64, u64), tx: (u64, u64), rtp: RtpReport) -> LegSnapshot {
        LegSnapshot {
            session: 7,
            name: name.into(),
            udp_source: None,
            tcp_peer: None,
            rx: Flow {
                packets: rx.0,
                bytes: rx.1,
            },
            tx: Flow {
                packets: tx.0,
                bytes: tx.1,
            },
            rtp,
            last_rx_ns: 0,
            backpressure_drops: 0,
        }
    }

    #[test]
    fn a_relayed_call_record() {
        let t0 = Instant::now();
        let mut rec = CallRecord::new(7, t0, 11, "alice", "+15550001");
        rec.callee_number = "+15550002".into();
        rec.callee_user = Some("bob".into());
        rec.callee_conn = Some(12);
        rec.answered = Some(t0 + Duration::from_secs(2));
        rec.ended = t0 + Duration::from_secs(12);
        rec.reason = HangupReason::Normal;
        rec.ended_by = "callee";
        rec.plan = Some(Plan {
            forward: MediaPath::TcpInUdpOut,
            backward: MediaPath::UdpInTcpOut,
        });
        rec.relay = Some((0, 7));
        rec.legs = vec![("a".into(), Party::Caller), ("b".into(), Party::Callee)];
        let rtp = |expected, lost, jitter| RtpReport {
            ssrc: 1,
            received: expected - lost,
            expected,
            lost,
            reordered: 0,
            jitter,
        };
        let legs = [
            leg("a", (500, 86_000), (490, 84_280), rtp(500, 0, 8)),
            leg("b", (495, 85_140), (500, 86_000), rtp(500, 5, 40)),
        ];
        let base = UNIX_EPOCH + Duration::from_secs(1_796_161_921);
        let c = build(&rec, &legs, |t| base + t.duration_since(t0));
        assert_eq!(c.set_up, "2026-12-01T21:52:01.000Z");
        assert_eq!(c.answered.as_deref(), Some("2026-12-01T21:52:03.000Z"));
        assert_eq!(c.ended, "2026-12-01T21:52:13.000Z");
        assert_eq!((c.duration_s, c.talk_s), (12.0, 10.0));
        // Forward (caller → callee) is what the gateway sent to bob's leg.
        let f = c.forward.unwrap();
        assert_eq!(
            (f.packets, f.bytes, f.send, f.recv),
            (500, 86_000, Transport::Tcp, Transport::Udp)
        );
        let b = c.backward.unwrap();
        assert_eq!((b.packets, b.bytes), (490, 84_280));
        assert_eq!(c.legs.len(), 2);
        assert_eq!(c.legs[1].loss, 0.01);
        assert_eq!(c.legs[1].jitter_ms, 5.0);
        let m = c.legs[1].mos.unwrap();
        assert!(
            (m - (super::super::mos::mos(0.01, 5.0, 0.0) * 1000.0).round() / 1000.0).abs() < 1e-9
        );
        assert!(c.legs[0].mos.unwrap() > m);
        let line = serde_json::to_string(&c).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["caller"]["number"], "+15550001");
        assert_eq!(v["forward"]["path"], "tcp_in_udp_out");
        assert_eq!(v["legs"][0]["party"], "caller");
        // Direct directions carry nothing through the gateway: no legs.
        rec.plan = Some(Plan {
            forward: MediaPath::DirectUdp,
            backward: MediaPath::DirectUdp,
        });
        rec.relay = None;
        rec.legs.clear();
        let c = build(&rec, &legs, |t| base + t.duration_since(t0));
        assert_eq!(c.forward.unwrap().packets, 0);
    }

    #[test]
    fn a_direction_counts_every_leg_of_its_receiver() {
        // A re-plan gave bob a second leg: forward counts what both carried to him.
        let t0 = Instant::now();
        let mut rec = CallRecord::new(7, t0, 11, "alice", "+15550001");
        rec.plan = Some(Plan {
            forward: MediaPath::UdpViaGateway,
            backward: MediaPath::UdpViaGateway,
        });
        rec.legs = vec![
            ("a1".into(), Party::Caller),
            ("b1".into(), Party::Callee),
            ("a2".into(), Party::Caller),
            ("b2".into(), Party::Callee),
        ];
        let rtp = RtpReport::default();
        let legs = [
            leg("a1", (10, 1720), (9, 1548), rtp),
            leg("b1", (9, 1548), (10, 1720), rtp),
            leg("a2", (30, 5160), (31, 5332), rtp),
            leg("b2", (31, 5332), (30, 5160), rtp),
        ];
        let c = build(&rec, &legs, |_| UNIX_EPOCH);
        assert_eq!(c.forward.map(|d| (d.packets, d.bytes)), Some((40, 6880)));
        assert_eq!(c.backward.map(|d| (d.packets, d.bytes)), Some((40, 6880)));
        assert_eq!(c.legs.len(), 4);
        // No RTP: no MOS.
        assert!(c.legs.iter().all(|l| l.mos.is_none()));
    }

    #[test]
    fn filters_select_by_number_time_and_reason() {
        let rec = |call: u64, from: &str, to: &str, set_up: &str, ended: &str, reason: &str| {
            serde_json::json!({"call": call, "caller": {"number": from}, "callee": {"number": to},
                "set_up": set_up, "ended": ended, "reason": reason})
        };
        let recs = [
            rec(
                1,
                "+1",
                "+2",
                "2026-12-01T10:00:00.000Z",
                "2026-12-01T10:05:00.000Z",
                "normal",
            ),
            rec(
                2,
                "+3",
                "+1,+4",
                "2026-12-01T11:00:00.000Z",
                "2026-12-01T11:01:00.000Z",
                "normal",
            ),
            rec(
                3,
                "+2",
                "+3",
                "2026-12-02T09:00:00.000Z",
                "2026-12-02T09:00:01.000Z",
                "busy",
            ),
        ];
        let pick = |f: Filter| -> Vec<u64> {
            recs.iter()
                .filter(|r| f.matches(r))
                .map(|r| r["call"].as_u64().unwrap())
                .collect()
        };
        let all = Filter {
            number: None,
            since: None,
            until: None,
            reason: None,
        };
        assert_eq!(pick(all), [1, 2, 3]);
        assert_eq!(
            pick(Filter {
                number: Some("+1"),
                ..Filter {
                    number: None,
                    since: None,
                    until: None,
                    reason: None
                }
            }),
            [1, 2]
        );
        assert_eq!(
            pick(Filter {
                number: Some("+4"),
                since: None,
                until: None,
                reason: None
            }),
            [2]
        );
        assert_eq!(
            pick(Filter {
                number: None,
                since: None,
                until: None,
                reason: Some("busy")
            }),
            [3]
        );
        let t = |s| parse_time(s).ok();
        // A call that was still going at `since` counts.
        assert_eq!(
            pick(Filter {
                number: None,
                since: t("2026-12-01T10:03:00Z"),
                until: t("2026-12-02"),
                reason: None
            }),
            [1, 2]
        );
        assert_eq!(
            pick(Filter {
                number: None,
                since: t("2026-12-02"),
                until: None,
                reason: None
            }),
            [3]
        );
    }

    #[test]
    fn scanning_skips_what_is_not_a_record_in_bounded_memory() {
        let rec = r#"{"call":5,"caller":{"number":"+1"},"callee":{"number":"+2"},"reason":"busy"}"#;
        let mut input = Vec::new();
        input.extend_from_slice(rec.as_bytes());
        input.push(b'\n');
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        input.extend_from_slice(b"\nnot json\n\xff\xfe\n[1,2]\n\n");
        input.extend_from_slice(rec.as_bytes()); // last line without a newline
        let all = Filter {
            number: None,
            since: None,
            until: None,
            reason: None,
        };
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        let n = scan(&input[..], &all, true, &mut out, &mut |w| warnings.push(w)).unwrap();
        assert_eq!(n, 2);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{rec}\n{rec}\n"));
        assert_eq!(
            warnings,
            [
                format!("2: line longer than {MAX_LINE} bytes, skipped"),
                "3: not a JSON object, skipped".to_string(),
                "4: not UTF-8, skipped".to_string(),
                "5: not a JSON object, skipped".to_string(),
            ]
        );
        let busy = Filter {
            number: Some("+2"),
            since: None,
            until: None,
            reason: Some("normal"),
        };
        let mut out = Vec::new();
        assert_eq!(
            scan(&input[..], &busy, false, &mut out, &mut |_| {}).unwrap(),
            0
        );
        assert!(out.is_empty());
    }

    #[test]
    fn the_writer_appends_lines_and_reopens_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cdr.jsonl");
        let mut w = CdrWriter::open(&path).unwrap();
        let t0 = Instant::now();
        let c = build(&CallRecord::new(1, t0, 1, "a", "+1"), &[], |_| UNIX_EPOCH);
        w.write(&c).unwrap();
        w.write(&c).unwrap();
        let rotated = dir.path().join("sub/cdr.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        w.write(&c).unwrap(); // still the renamed file, as logrotate expects before the signal
        w.reopen().unwrap();
        w.write(&c).unwrap();
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!((lines(&rotated), lines(&path)), (3, 1));
        let e = CdrWriter::open(Path::new("/proc/voxgate-no/cdr.jsonl"))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("call detail records /proc/voxgate-no/cdr.jsonl: "),
            "{e}"
        );
    }
}
