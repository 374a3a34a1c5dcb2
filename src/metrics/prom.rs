//! Prometheus metrics: the text exposition format (version 0.0.4), written by hand, and the
//! ledger the control thread keeps so that scrapes and interval dumps share the shards'
//! latency histograms without stealing from each other.
//!
//! Why by hand rather than with a client library: every number here already exists as a
//! snapshot (shard counters, the core's tallies, histograms merged on the control thread), so
//! a scrape is a pure function from snapshots to text. A registry of live metric objects would
//! only copy those numbers once more. [`Exposition`] writes `# HELP` and `# TYPE` for every
//! family, escapes label values, and emits histograms as cumulative `_bucket{le}` series with
//! `_sum` and `_count`; the output is checked by `promtool check metrics` in
//! `tests/monitoring.rs`.
//!
//! Cardinality is bounded by construction: label values come only from small fixed sets
//! (shard index, transport, direction, drop reason, path, hang-up reason, booleans), never from
//! users, numbers or call ids.
//!
//! The ledger ([`Ledger`]): a shard hands over its latency histogram when asked for a snapshot
//! and starts a fresh one. Every snapshot's histogram, whoever asked, goes into the ledger:
//! added to a cumulative histogram per shard (what Prometheus reads) and to what the next
//! interval dump is owed ([`Ledger::owed_to_dump`]). So a scrape between two dumps takes
//! nothing from the dump, and the dump takes nothing from the scrape.

use std::collections::HashMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::counters::{Counters, DropReason, Flow, Transport};
use super::dump::new_latency_histogram;
use super::rtpstats::RtpReport;
use crate::control::gateway::GatewayStats;
use crate::control::tally::{HANGUP_REASONS, PATHS, Tally, path_name};

/// Upper bounds (seconds) of the relay-latency buckets: the coalescing budget is 1 ms by
/// default, so resolution is finest below a few milliseconds; a paused VM shows in the last.
pub const LATENCY_BUCKETS_S: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0,
];
/// Upper bounds (seconds) of the per-leg interarrival jitter buckets (G.711 at 20 ms).
pub const JITTER_BUCKETS_S: [f64; 10] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5];
/// Upper bounds of the per-leg loss-fraction buckets (0 = nothing lost, 1 = everything).
pub const LOSS_BUCKETS: [f64; 10] = [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];
/// Upper bounds of the per-leg MOS buckets (1 bad .. 4.5, G.711's best E-model score is 4.41).
pub const MOS_BUCKETS: [f64; 12] = [1.5, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5];

/// A Prometheus histogram with fixed bucket bounds, filled one observation at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Buckets {
    pub fn new(bounds: &'static [f64]) -> Self {
        Buckets {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(le, cumulative count)` for every bound, then +Inf.
    fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(b, c)| {
                acc += c;
                (b, acc)
            })
            .collect()
    }
}

/// Converts an HdrHistogram of nanoseconds into Prometheus buckets in seconds. Each recorded
/// value is placed by the highest value equivalent to it (so a bucket never claims a value
/// that may exceed its bound); the sum uses each value's median equivalent.
pub fn buckets_from_hdr(h: &Histogram<u64>, bounds: &'static [f64]) -> Buckets {
    let mut b = Buckets::new(bounds);
    for v in h.iter_recorded() {
        let hi = h.highest_equivalent(v.value_iterated_to()) as f64 / 1e9;
        let n = v.count_at_value();
        let i = bounds.iter().position(|&x| hi <= x).unwrap_or(bounds.len());
        b.counts[i] += n;
        b.sum += h.median_equivalent(v.value_iterated_to()) as f64 / 1e9 * n as f64;
    }
    b
}

/// What the control thread keeps between scrapes and dumps.
#[derive(Debug)]
pub struct Ledger {
    /// Per shard: everything recorded since start (Prometheus histograms are cumulative).
    latency_total: Vec<Histogram<u64>>,
    /// Per shard: what was taken from the shard since the last dump.
    latency_owed: Vec<Histogram<u64>>,
    /// Legs bound now, and on which transports (from the shards' bind and end events).
    legs: HashMap<(u64, String), (bool, bool)>,
    pub jitter: Buckets,
    pub loss: Buckets,
    pub mos: Buckets,
}

impl Ledger {
    pub fn new(shards: usize) -> Self {
        let h = || {
            let mut h = new_latency_histogram();
            h.auto(true);
            h
        };
        Ledger {
            latency_total: (0..shards).map(|_| h()).collect(),
            latency_owed: (0..shards).map(|_| h()).collect(),
            legs: HashMap::new(),
            jitter: Buckets::new(&JITTER_BUCKETS_S),
            loss: Buckets::new(&LOSS_BUCKETS),
            mos: Buckets::new(&MOS_BUCKETS),
        }
    }

    /// Every histogram a shard hands over goes through here.
    pub fn take_latency(&mut self, shard: usize, h: &Histogram<u64>) {
        if let Some(t) = self.latency_total.get_mut(shard) {
            let _ = t.add(h);
        }
        if let Some(o) = self.latency_owed.get_mut(shard) {
            let _ = o.add(h);
        }
    }

    /// The dump's share for `shard`: `latest` (just taken from the shard) plus what scrapes
    /// took since the last dump. Resets the owed histogram.
    pub fn owed_to_dump(&mut self, shard: usize, latest: &Histogram<u64>) -> Histogram<u64> {
        self.take_latency(shard, latest);
        match self.latency_owed.get_mut(shard) {
            Some(o) => {
                let out = o.clone();
                o.reset();
                out
            }
            None => latest.clone(),
        }
    }

    pub fn latency_total(&self, shard: usize) -> Option<&Histogram<u64>> {
        self.latency_total.get(shard)
    }

    /// A leg proved its key on `transport`.
    pub fn leg_bound(&mut self, session: u64, leg: &str, transport: Transport) {
        // Bounded by the legs the shards hold: every entry leaves with the leg's end event.
        let e = self
            .legs
            .entry((session, leg.to_owned()))
            .or_insert((false, false));
        match transport {
            Transport::Udp => e.0 = true,
            Transport::Tcp => e.1 = true,
        }
    }

    /// A leg ended: forget it and observe its quality (only legs that received RTP). The MOS
    /// estimate ([`super::mos`]) takes the leg's loss and jitter and no network delay: the
    /// gateway does not see the delay from the sender to it.
    pub fn leg_ended(&mut self, session: u64, leg: &str, rtp: &RtpReport, clock_rate: u32) {
        self.legs.remove(&(session, leg.to_owned()));
        if rtp.expected == 0 {
            return;
        }
        let loss = (rtp.lost as f64 / rtp.expected as f64).min(1.0);
        self.loss.observe(loss);
        let jitter_s = if clock_rate > 0 {
            let j = f64::from(rtp.jitter) / f64::from(clock_rate);
            self.jitter.observe(j);
            j
        } else {
            0.0
        };
        self.mos.observe(super::mos::mos(loss, jitter_s * 1e3, 0.0));
    }

    /// Legs bound now on (UDP, TCP); a leg bound on both counts in both.
    pub fn legs_by_transport(&self) -> (u64, u64) {
        self.legs.values().fold((0, 0), |(u, t), &(a, b)| {
            (u + u64::from(a), t + u64::from(b))
        })
    }
}

/// One shard's numbers at a scrape (`None`: it did not answer in time).
#[derive(Clone, Debug)]
pub struct ShardReading {
    pub shard: usize,
    pub answered: Option<ShardNumbers>,
}

#[derive(Clone, Debug)]
pub struct ShardNumbers {
    pub counters: Counters,
    pub sessions: usize,
    pub tcp_conns: usize,
    pub tcp_queued: usize,
    pub buffers_in_use: usize,
    pub leg_sockets: usize,
}

/// Everything one scrape shows.
pub struct Scrape<'a> {
    pub shards: &'a [ShardReading],
    pub gateway: &'a GatewayStats,
    pub ledger: &'a Ledger,
    pub start_time_unix_s: f64,
}

/// A text exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn into_string(self) -> String {
        self.out
    }

    /// `# HELP` and `# TYPE` of a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(value));
    }

    /// A whole histogram family's samples (cumulative buckets, `_sum`, `_count`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], b: &Buckets) {
        let cum = b.cumulative();
        for (le, c) in &cum {
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(*le));
            let _ = writeln!(self.out, " {c}");
        }
        let total = cum.last().map_or(0, |x| x.1);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(b.sum));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {total}");
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<f64>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{}\"", fmt_value(le));
    }
    out.push('}');
}

fn fmt_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

type FlowOf = fn(&Counters) -> Flow;
type CountOf = fn(&Counters) -> u64;
type GaugeOf = fn(&ShardNumbers) -> usize;

/// Renders one scrape.
pub fn render(s: &Scrape<'_>) -> String {
    let mut e = Exposition::default();
    let g = s.gateway;
    let answered: Vec<(String, &ShardNumbers)> = s
        .shards
        .iter()
        .filter_map(|r| r.answered.as_ref().map(|n| (r.shard.to_string(), n)))
        .collect();

    e.family(
        "voxgate_build_info",
        "gauge",
        "Always 1; the version label names the running build.",
    );
    e.sample(
        "voxgate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.family(
        "voxgate_start_time_seconds",
        "gauge",
        "When the gateway started, in seconds since the Unix epoch.",
    );
    e.sample("voxgate_start_time_seconds", &[], s.start_time_unix_s);
    e.family(
        "voxgate_draining",
        "gauge",
        "1 while the gateway drains (SIGTERM): no new log-ins or calls.",
    );
    e.sample("voxgate_draining", &[], f64::from(u8::from(g.draining)));

    // Shards.
    e.family(
        "voxgate_shard_up",
        "gauge",
        "1 if the shard answered this scrape in time, else 0 (its other series are missing).",
    );
    for r in s.shards {
        let up = f64::from(u8::from(r.answered.is_some()));
        e.sample("voxgate_shard_up", &[("shard", &r.shard.to_string())], up);
    }
    let flows: [(Transport, &str, FlowOf); 4] = [
        (Transport::Udp, "in", |c| c.udp_in),
        (Transport::Udp, "out", |c| c.udp_out),
        (Transport::Tcp, "in", |c| c.tcp_in),
        (Transport::Tcp, "out", |c| c.tcp_out),
    ];
    e.family(
        "voxgate_shard_packets_total",
        "counter",
        "Media packets received (in) and sent (out) by a shard, per transport.",
    );
    for (shard, n) in &answered {
        for (t, dir, f) in &flows {
            let l = [
                ("shard", shard.as_str()),
                ("transport", transport_name(*t)),
                ("direction", *dir),
            ];
            e.sample(
                "voxgate_shard_packets_total",
                &l,
                f(&n.counters).packets as f64,
            );
        }
    }
    e.family(
        "voxgate_shard_bytes_total",
        "counter",
        "Media bytes received and sent by a shard, per transport.",
    );
    for (shard, n) in &answered {
        for (t, dir, f) in &flows {
            let l = [
                ("shard", shard.as_str()),
                ("transport", transport_name(*t)),
                ("direction", *dir),
            ];
            e.sample("voxgate_shard_bytes_total", &l, f(&n.counters).bytes as f64);
        }
    }
    e.family(
        "voxgate_shard_drops_total",
        "counter",
        "Packets (or TCP connections) a shard dropped, by reason.",
    );
    for (shard, n) in &answered {
        for r in DropReason::ALL {
            e.sample(
                "voxgate_shard_drops_total",
                &[("shard", shard), ("reason", r.name())],
                n.counters.dropped(r) as f64,
            );
        }
    }
    let simple: [(&str, &str, CountOf); 6] = [
        (
            "voxgate_shard_bindings_total",
            "STUN Binding requests a shard answered (media bindings made or refreshed).",
            |c| c.bindings,
        ),
        (
            "voxgate_shard_wakeups_total",
            "Times a shard's event loop woke with work.",
            |c| c.wakeups,
        ),
        (
            "voxgate_shard_tcp_accepted_total",
            "TCP media connections a shard accepted.",
            |c| c.tcp_accepted,
        ),
        (
            "voxgate_shard_tcp_closed_total",
            "TCP media connections a shard closed (any reason).",
            |c| c.tcp_closed,
        ),
        (
            "voxgate_shard_buffer_ring_exhausted_total",
            "Times a shard's receive buffer ring ran dry and the receive was re-armed.",
            |c| c.buf_ring_exhausted,
        ),
        (
            "voxgate_shard_reassembly_copies_total",
            "TCP frames copied into a spare buffer to be reassembled.",
            |c| c.reassembly_copies,
        ),
    ];
    for (name, help, f) in simple {
        e.family(name, "counter", help);
        for (shard, n) in &answered {
            e.sample(name, &[("shard", shard)], f(&n.counters) as f64);
        }
    }
    let gauges: [(&str, &str, GaugeOf); 5] = [
        (
            "voxgate_shard_sessions",
            "Relay sessions (calls and rooms through the gateway) installed on a shard.",
            |n| n.sessions,
        ),
        (
            "voxgate_shard_tcp_connections",
            "TCP media connections open on a shard.",
            |n| n.tcp_conns,
        ),
        (
            "voxgate_shard_tcp_queued_frames",
            "Frames waiting in a shard's TCP send queues.",
            |n| n.tcp_queued,
        ),
        (
            "voxgate_shard_buffers_in_use",
            "Packet buffers a shard holds (receives in flight, queued frames).",
            |n| n.buffers_in_use,
        ),
        (
            "voxgate_shard_leg_sockets",
            "Connected UDP sockets a shard holds for the legs it sends media to.",
            |n| n.leg_sockets,
        ),
    ];
    for (name, help, f) in gauges {
        e.family(name, "gauge", help);
        for (shard, n) in &answered {
            e.sample(name, &[("shard", shard)], f(n) as f64);
        }
    }
    e.family(
        "voxgate_relay_latency_seconds",
        "histogram",
        "Relay latency per shard, from the kernel's receive timestamp to the send submission.",
    );
    for r in s.shards {
        if let Some(h) = s.ledger.latency_total(r.shard) {
            let b = buckets_from_hdr(h, &LATENCY_BUCKETS_S);
            e.histogram(
                "voxgate_relay_latency_seconds",
                &[("shard", &r.shard.to_string())],
                &b,
            );
        }
    }

    // Legs.
    let (udp, tcp) = s.ledger.legs_by_transport();
    e.family(
        "voxgate_legs",
        "gauge",
        "Media legs bound now (a client proved its leg key), per transport; a leg bound on both counts in both.",
    );
    e.sample("voxgate_legs", &[("transport", "udp")], udp as f64);
    e.sample("voxgate_legs", &[("transport", "tcp")], tcp as f64);
    e.family(
        "voxgate_leg_jitter_seconds",
        "histogram",
        "RTP interarrival jitter (RFC 3550) of what each leg sent, observed when the leg ends.",
    );
    e.histogram("voxgate_leg_jitter_seconds", &[], &s.ledger.jitter);
    e.family(
        "voxgate_leg_loss_ratio",
        "histogram",
        "Fraction of RTP packets lost from each leg (0..1), observed when the leg ends.",
    );
    e.histogram("voxgate_leg_loss_ratio", &[], &s.ledger.loss);
    e.family(
        "voxgate_leg_mos",
        "histogram",
        "Estimated MOS (ITU-T G.107 E-model for G.711 without concealment, 1..4.5) of what each leg sent, from its loss and jitter, no network delay; observed when the leg ends.",
    );
    e.histogram("voxgate_leg_mos", &[], &s.ledger.mos);

    // The control core.
    let core_gauges: [(&str, &str, usize); 6] = [
        (
            "voxgate_control_connections",
            "Control connections held (logged in or not).",
            g.connections,
        ),
        (
            "voxgate_subscribers_logged_in",
            "Subscribers logged in now.",
            g.logged_in,
        ),
        (
            "voxgate_probes_running",
            "Firewall probes running now.",
            g.probes_running,
        ),
        ("voxgate_rooms", "Conference rooms in any state.", g.rooms),
        (
            "voxgate_room_members",
            "Members of all conference rooms (invited or joined).",
            g.room_members,
        ),
        (
            "voxgate_sessions",
            "Relay sessions installed (or being installed) on all shards.",
            g.shard_sessions.iter().sum(),
        ),
    ];
    for (name, help, v) in core_gauges {
        e.family(name, "gauge", help);
        e.sample(name, &[], v as f64);
    }
    e.family(
        "voxgate_calls",
        "gauge",
        "Two-party calls now, by state (setup: ringing or setting up media; up: media flowing).",
    );
    e.sample(
        "voxgate_calls",
        &[("state", "setup")],
        g.calls.saturating_sub(g.calls_up) as f64,
    );
    e.sample("voxgate_calls", &[("state", "up")], g.calls_up as f64);
    e.family(
        "voxgate_logins_total",
        "counter",
        "Log-in attempts by outcome (failure: wrong password, unknown user or bad proof; rate_limited: refused before checking).",
    );
    for (outcome, v) in [
        ("success", g.logins),
        ("failure", g.failed_logins),
        ("rate_limited", g.rate_limited),
    ] {
        e.sample("voxgate_logins_total", &[("outcome", outcome)], v as f64);
    }
    write_tally(&mut e, &g.tally);
    e.family(
        "voxgate_calls_placed_total",
        "counter",
        "Calls and rooms placed since start.",
    );
    e.sample("voxgate_calls_placed_total", &[], g.calls_placed as f64);
    e.into_string()
}

fn write_tally(e: &mut Exposition, t: &Tally) {
    let b = |x: bool| if x { "true" } else { "false" };
    e.family(
        "voxgate_probes_total",
        "counter",
        "Finished firewall probes by verdict: can the client send UDP, receive UDP, is it behind NAT.",
    );
    for send in [false, true] {
        for recv in [false, true] {
            for nat in [false, true] {
                e.sample(
                    "voxgate_probes_total",
                    &[
                        ("send_udp", b(send)),
                        ("recv_udp", b(recv)),
                        ("nat", b(nat)),
                    ],
                    t.probes[Tally::probe_index(send, recv, nat)] as f64,
                );
            }
        }
    }
    e.family(
        "voxgate_call_paths_total",
        "counter",
        "Directions of two-party calls planned, by path (Table 1) and direction (forward: caller to callee); re-plans count again.",
    );
    for (dir, fwd) in [("forward", true), ("backward", false)] {
        for p in PATHS {
            e.sample(
                "voxgate_call_paths_total",
                &[("direction", dir), ("path", path_name(p))],
                t.planned(fwd, p) as f64,
            );
        }
    }
    e.family(
        "voxgate_calls_ended_total",
        "counter",
        "Calls and rooms ended, by hang-up reason.",
    );
    for r in HANGUP_REASONS {
        e.sample(
            "voxgate_calls_ended_total",
            &[("reason", r.as_str())],
            t.ended_with(r) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_inf() {
        let mut b = Buckets::new(&LOSS_BUCKETS);
        for v in [0.0, 0.0, 0.03, 0.7, 2.0, f64::NAN] {
            b.observe(v);
        }
        let c = b.cumulative();
        assert_eq!(c[0], (0.0, 2));
        assert_eq!(c[5], (0.05, 3));
        assert_eq!(c[9], (1.0, 4));
        assert_eq!(c[10], (f64::INFINITY, 5), "NaN is not observed");
        assert!((b.sum - 2.73).abs() < 1e-9);
    }

    #[test]
    fn hdr_histogram_lands_in_the_right_buckets() {
        let mut h = new_latency_histogram();
        h.record(40_000).unwrap(); // 40 µs
        h.record(900_000).unwrap(); // 0.9 ms
        h.record(3_000_000_000).unwrap(); // a 3-s pause
        let b = buckets_from_hdr(&h, &LATENCY_BUCKETS_S);
        let c = b.cumulative();
        assert_eq!(c[0], (0.000_05, 1));
        assert_eq!(c[4], (0.001, 2));
        assert_eq!(c[13], (1.0, 2));
        assert_eq!(c[14], (5.0, 3));
        assert!((b.sum - 3.000_94).abs() < 0.01, "{}", b.sum);
    }

    #[test]
    fn scrapes_do_not_steal_what_the_dump_is_owed() {
        let mut l = Ledger::new(2);
        let mut a = new_latency_histogram();
        a.record(1000).unwrap();
        // A scrape takes a histogram from shard 1, then the dump takes the next one.
        l.take_latency(1, &a);
        let mut b = new_latency_histogram();
        b.record(2000).unwrap();
        b.record(3000).unwrap();
        let owed = l.owed_to_dump(1, &b);
        assert_eq!(owed.len(), 3, "the dump sees the scrape's sample too");
        assert_eq!(l.latency_total(1).unwrap().len(), 3);
        // The next dump is owed only what came after.
        let owed = l.owed_to_dump(1, &new_latency_histogram());
        assert_eq!(owed.len(), 0);
        assert_eq!(l.latency_total(1).unwrap().len(), 3, "Prometheus keeps all");
        assert_eq!(l.latency_total(0).unwrap().len(), 0);
    }

    #[test]
    fn legs_are_counted_by_transport_until_they_end() {
        let mut l = Ledger::new(1);
        l.leg_bound(1, "a", Transport::Udp);
        l.leg_bound(1, "a", Transport::Tcp);
        l.leg_bound(1, "b", Transport::Udp);
        assert_eq!(l.legs_by_transport(), (2, 1));
        let rtp = RtpReport {
            expected: 100,
            received: 98,
            lost: 2,
            jitter: 80,
            ..RtpReport::default()
        };
        l.leg_ended(1, "a", &rtp, 8000);
        assert_eq!(l.legs_by_transport(), (1, 0));
        assert_eq!(l.loss.count(), 1);
        assert!((l.jitter.sum - 0.01).abs() < 1e-12);
        assert!((l.loss.sum - 0.02).abs() < 1e-12);
        let want = crate::metrics::mos::mos(0.02, 10.0, 0.0);
        assert!((l.mos.sum - want).abs() < 1e-9, "{} vs {want}", l.mos.sum);
        assert!(
            want < crate::metrics::mos::mos(0.0, 0.0, 0.0),
            "loss costs MOS"
        );
        // A leg that never received RTP counts no quality.
        l.leg_ended(1, "b", &RtpReport::default(), 8000);
        assert_eq!(l.legs_by_transport(), (0, 0));
        assert_eq!(l.loss.count(), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "a \\ help\nline");
        e.sample("x_total", &[("k", "a\"b\\c\nd")], 1.0);
        let s = e.into_string();
        assert!(s.contains("# HELP x_total a \\\\ help\\nline\n"), "{s}");
        assert!(s.contains("x_total{k=\"a\\\"b\\\\c\\nd\"} 1\n"), "{s}");
    }
}
