//! The SVG that `voxgate stats --plot FILE` writes: hand-written SVG 1.1, no dependencies.
//!
//! One file, three panels, each a `<g id=...>`:
//! - `percentiles`: latency against percentile (the classic HdrHistogram plot, percentile on a
//!   log-scaled `1/(1-p)` axis), one line per tag;
//! - `latency-over-time`: p50, p99 and max of the merged histogram per interval, so an operator
//!   sees *when* something happened, not only that it did;
//! - `packets-over-time`: packets received per interval (from the counters dumps).
//!
//! Latency axes are logarithmic (one grid line per decade, 1 ns .. 10 s): a single 3-s outlier
//! (a paused VM) would flatten everything below p99.9 to zero on a linear axis.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::dump::format_human;

/// The merged histogram of one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyPoint {
    pub start: Duration,
    pub end: Duration,
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// Packets received in one interval (all shards).
#[derive(Clone, Debug, PartialEq)]
pub struct PacketPoint {
    pub start: Duration,
    pub end: Duration,
    pub packets: u64,
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

const W: f64 = 960.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 200.0;
const PERCENTILE_H: f64 = 540.0;
const TIMELINE_H: f64 = 360.0;
const PACKETS_H: f64 = 300.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

pub(crate) fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if c.is_control() => {}
            c => o.push(c),
        }
    }
    o
}

/// A "nice" step (1, 2 or 5 times a power of ten) giving about `ticks` ticks up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let f = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * mag
}

/// A logarithmic latency axis over whole decades of nanoseconds.
struct LogAxis {
    lo_exp: i32,
    hi_exp: i32,
    top: f64,
    height: f64,
}

impl LogAxis {
    /// Covers `min_ns..=max_ns` (at least one decade).
    fn new(min_ns: f64, max_ns: f64, top: f64, height: f64) -> Self {
        let lo_exp = min_ns.max(1.0).log10().floor() as i32;
        let hi_exp = (max_ns.max(1.0).log10().ceil() as i32).max(lo_exp + 1);
        LogAxis {
            lo_exp,
            hi_exp,
            top,
            height,
        }
    }

    fn y(&self, ns: f64) -> f64 {
        let l = ns.max(1.0).log10();
        let f = (l - f64::from(self.lo_exp)) / f64::from(self.hi_exp - self.lo_exp);
        self.top + self.height * (1.0 - f.clamp(0.0, 1.0))
    }

    /// Grid lines and labels, one per decade.
    fn draw(&self, s: &mut String, left: f64, width: f64) {
        for e in self.lo_exp..=self.hi_exp {
            let ns = 10f64.powi(e);
            let y = self.y(ns);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text class="ytick" data-ns="{ns}" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + width,
                left - 6.0,
                y + 4.0,
                decade_label(e)
            );
        }
    }
}

/// `1 ns`, `10 µs`, `100 ms`, `1 s`...
fn decade_label(exp: i32) -> String {
    let (unit, base) = match exp {
        i32::MIN..=2 => ("ns", 0),
        3..=5 => ("µs", 3),
        6..=8 => ("ms", 6),
        _ => ("s", 9),
    };
    let v = 10u64.pow((exp - base).max(0) as u32);
    format!("{v} {unit}")
}

fn frame(s: &mut String, id: &str, y0: f64, h: f64, title: &str, x_label: &str, y_label: &str) {
    let pw = W - LEFT - RIGHT;
    let ph = h - TOP - BOTTOM;
    let _ = writeln!(s, r#"<g id="{id}" transform="translate(0,{y0})">"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        h - 14.0,
        xml_escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        xml_escape(y_label)
    );
}

fn legend(s: &mut String, i: usize, name: &str, color: &str) {
    let ly = TOP + 10.0 + 18.0 * i as f64;
    let lx = W - RIGHT + 16.0;
    let _ = writeln!(
        s,
        r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        lx + 20.0,
        lx + 26.0,
        ly + 4.0,
        xml_escape(name)
    );
}

fn polyline(s: &mut String, series: &str, color: &str, points: &[(f64, f64)]) {
    let mut p = String::new();
    for (x, y) in points {
        let _ = write!(p, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        s,
        r#"<polyline data-series="{}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
        xml_escape(series),
        p.trim_end()
    );
}

/// The percentile panel alone, as a whole SVG document (see the module docs).
pub fn plot_percentiles_svg(series: &[(String, Histogram<u64>)], title: &str) -> String {
    plot_svg(series, &[], &[], title)
}

/// The whole plot: percentiles per tag, then latency and packets per interval (those two panels
/// only when there are points).
pub fn plot_svg(
    series: &[(String, Histogram<u64>)],
    latency: &[LatencyPoint],
    packets: &[PacketPoint],
    title: &str,
) -> String {
    let with_timeline = !latency.is_empty() || !packets.is_empty();
    let total_h = if with_timeline {
        PERCENTILE_H + TIMELINE_H + PACKETS_H
    } else {
        PERCENTILE_H
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{total_h}" fill="white"/>"#);
    percentiles(&mut s, series, title);
    if with_timeline {
        let span = time_span(latency, packets);
        latency_over_time(&mut s, latency, span, PERCENTILE_H);
        packets_over_time(&mut s, packets, span, PERCENTILE_H + TIMELINE_H);
    }
    s.push_str("</svg>\n");
    s
}

fn percentiles(s: &mut String, series: &[(String, Histogram<u64>)], title: &str) {
    const POINTS_PER_DECADE: u32 = 40;
    let pw = W - LEFT - RIGHT;
    let ph = PERCENTILE_H - TOP - BOTTOM;
    // Decades of 1/(1-p) worth showing: up to 1/count (the last sample), 2..=6.
    let max_count = series.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    let decades = ((max_count.max(1) as f64).log10().ceil() as u32).clamp(2, 6);
    let filled = || series.iter().filter(|(_, h)| !h.is_empty());
    let min_ns = filled()
        .map(|(_, h)| h.min() as f64)
        .fold(f64::MAX, f64::min);
    let max_ns = filled().map(|(_, h)| h.max() as f64).fold(0.0, f64::max);
    let axis = if max_ns > 0.0 {
        LogAxis::new(min_ns, max_ns, TOP, ph)
    } else {
        LogAxis::new(1_000.0, 1_000_000.0, TOP, ph)
    };
    frame(
        s,
        "percentiles",
        0.0,
        PERCENTILE_H,
        title,
        "percentile",
        "latency (log scale)",
    );
    let x_of = |d: f64| LEFT + pw * d / f64::from(decades);
    for d in 0..=decades {
        let x = x_of(f64::from(d));
        let label = match d {
            0 => "0%".to_owned(),
            1 => "90%".to_owned(),
            2 => "99%".to_owned(),
            _ => format!("99.{}%", "9".repeat(d as usize - 2)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    axis.draw(s, LEFT, pw);
    for (i, (name, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut points = Vec::new();
        if !h.is_empty() {
            let n = decades * POINTS_PER_DECADE;
            for k in 0..=n {
                let d = f64::from(decades) * f64::from(k) / f64::from(n);
                let q = 1.0 - 10f64.powf(-d);
                points.push((x_of(d), axis.y(h.value_at_quantile(q) as f64)));
            }
        }
        polyline(s, name, color, &points);
        legend(s, i, name, color);
    }
    s.push_str("</g>\n");
}

/// First start and last end over both series.
fn time_span(latency: &[LatencyPoint], packets: &[PacketPoint]) -> (Duration, Duration) {
    let starts = latency
        .iter()
        .map(|p| p.start)
        .chain(packets.iter().map(|p| p.start));
    let ends = latency
        .iter()
        .map(|p| p.end)
        .chain(packets.iter().map(|p| p.end));
    let from = starts.min().unwrap_or_default();
    let to = ends
        .max()
        .unwrap_or_default()
        .max(from + Duration::from_millis(1));
    (from, to)
}

fn time_axis(
    s: &mut String,
    span: (Duration, Duration),
    ph: f64,
) -> impl Fn(Duration) -> f64 + use<> {
    let pw = W - LEFT - RIGHT;
    let (from, to) = span;
    let len = (to - from).as_secs_f64();
    let x_of = move |t: Duration| LEFT + pw * (t.saturating_sub(from).as_secs_f64() / len);
    for k in 0..=4 {
        let t = from + Duration::from_secs_f64(len * f64::from(k) / 4.0);
        let x = x_of(t);
        // hh:mm:ss of the UTC time.
        let human = format_human(t);
        let label = human.get(11..19).unwrap_or(&human);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    x_of
}

type PickNs = fn(&LatencyPoint) -> u64;

fn latency_over_time(s: &mut String, points: &[LatencyPoint], span: (Duration, Duration), y0: f64) {
    let pw = W - LEFT - RIGHT;
    let ph = TIMELINE_H - TOP - BOTTOM;
    let filled: Vec<&LatencyPoint> = points.iter().filter(|p| p.count > 0).collect();
    let min_ns = filled
        .iter()
        .map(|p| p.p50_ns as f64)
        .fold(f64::MAX, f64::min);
    let max_ns = filled.iter().map(|p| p.max_ns as f64).fold(0.0, f64::max);
    let axis = if filled.is_empty() {
        LogAxis::new(1_000.0, 1_000_000.0, TOP, ph)
    } else {
        LogAxis::new(min_ns, max_ns, TOP, ph)
    };
    let title = format!(
        "relay latency per interval, all shards (from {} UTC)",
        format_human(span.0).get(..19).unwrap_or_default()
    );
    frame(
        s,
        "latency-over-time",
        y0,
        TIMELINE_H,
        &title,
        "time (UTC)",
        "latency (log scale)",
    );
    let x_of = time_axis(s, span, ph);
    axis.draw(s, LEFT, pw);
    let mid = |p: &LatencyPoint| p.start + (p.end.saturating_sub(p.start)) / 2;
    let series: [(&str, PickNs); 3] = [
        ("p50", |p| p.p50_ns),
        ("p99", |p| p.p99_ns),
        ("max", |p| p.max_ns),
    ];
    for (i, (name, f)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = filled
            .iter()
            .map(|p| (x_of(mid(p)), axis.y(f(p) as f64)))
            .collect();
        polyline(s, name, color, &pts);
        legend(s, i, name, color);
    }
    s.push_str("</g>\n");
}

fn packets_over_time(s: &mut String, points: &[PacketPoint], span: (Duration, Duration), y0: f64) {
    let pw = W - LEFT - RIGHT;
    let ph = PACKETS_H - TOP - BOTTOM;
    frame(
        s,
        "packets-over-time",
        y0,
        PACKETS_H,
        "media packets received per interval, all shards",
        "time (UTC)",
        "packets",
    );
    let x_of = time_axis(s, span, ph);
    let max = points.iter().map(|p| p.packets).max().unwrap_or(0) as f64;
    let step = nice_step(if max > 0.0 { max } else { 1.0 }, 4.0);
    let y_max = ((max / step).ceil() * step).max(step);
    let y_of = |v: f64| TOP + ph * (1.0 - v / y_max);
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0
        );
        v += step;
    }
    let pts: Vec<(f64, f64)> = points
        .iter()
        .map(|p| {
            let mid = p.start + p.end.saturating_sub(p.start) / 2;
            (x_of(mid), y_of(p.packets as f64))
        })
        .collect();
    polyline(s, "packets", COLORS[0], &pts);
    legend(s, 0, "packets in", COLORS[0]);
    s.push_str("</g>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::dump::new_latency_histogram;

    /// `(data-ns, y)` of every latency tick in the panel with this id.
    fn ticks(svg: &str, panel: &str) -> Vec<(f64, f64)> {
        let start = svg.find(&format!("<g id=\"{panel}\"")).unwrap();
        let end = start + svg[start..].find("</g>").unwrap();
        svg[start..end]
            .split("<text class=\"ytick\" ")
            .skip(1)
            .map(|t| {
                let attr = |name: &str| -> f64 {
                    let i = t.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                    t[i..i + t[i..].find('"').unwrap()].parse().unwrap()
                };
                (attr("data-ns"), attr("y"))
            })
            .collect()
    }

    fn points(svg: &str, panel: &str, series: &str) -> Vec<(f64, f64)> {
        let start = svg.find(&format!("<g id=\"{panel}\"")).unwrap();
        let end = start + svg[start..].find("</g>").unwrap();
        let tag = format!("data-series=\"{series}\"");
        let p = &svg[start..end][svg[start..end].find(&tag).unwrap()..];
        let i = p.find("points=\"").unwrap() + 8;
        p[i..i + p[i..].find('"').unwrap()]
            .split_whitespace()
            .map(|xy| {
                let (x, y) = xy.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn latency_axes_are_logarithmic_so_an_outlier_does_not_flatten_the_rest() {
        // 10,000 samples around 200 µs and one 3-s pause.
        let mut h = new_latency_histogram();
        for i in 0..10_000u64 {
            h.record(150_000 + i * 10).unwrap();
        }
        h.record(3_000_000_000).unwrap();
        let svg = plot_percentiles_svg(&[("all".into(), h.clone())], "t");
        let t = ticks(&svg, "percentiles");
        // Decade ticks from 100 µs to 10 s, equally spaced.
        let ns: Vec<f64> = t.iter().map(|x| x.0).collect();
        assert_eq!(ns, [1e5, 1e6, 1e7, 1e8, 1e9, 1e10]);
        let gaps: Vec<f64> = t.windows(2).map(|w| w[0].1 - w[1].1).collect();
        assert!(gaps.iter().all(|g| (g - gaps[0]).abs() < 0.2), "{gaps:?}");
        assert!(svg.contains(">100 µs<") && svg.contains(">1 s<") && svg.contains(">10 s<"));
        // The fastest sample (150 µs, the line's first point) sits log10(1.5)/5 = 3.5 % of the
        // height above the 100 µs line, where a linear axis up to 3 s would put it at 0.005 %.
        let line = points(&svg, "percentiles", "all");
        // Tick labels sit 4 px below their grid line.
        let bottom = t[0].1 - 4.0;
        let top = t[t.len() - 1].1 - 4.0;
        let min_y = line[0].1;
        let f = (bottom - min_y) / (bottom - top);
        assert!(
            (0.03..0.04).contains(&f),
            "min at {min_y} between {bottom} and {top}"
        );
    }

    #[test]
    fn the_time_series_has_one_point_per_interval() {
        let s = Duration::from_secs(1_717_243_200);
        let lat: Vec<LatencyPoint> = (0..7u64)
            .map(|i| LatencyPoint {
                start: s + Duration::from_secs(10 * i),
                end: s + Duration::from_secs(10 * i + 10),
                count: 100,
                p50_ns: 200_000,
                p99_ns: 900_000,
                max_ns: if i == 4 { 3_000_000_000 } else { 1_500_000 },
            })
            .collect();
        let pk: Vec<PacketPoint> = (0..7u64)
            .map(|i| PacketPoint {
                start: s + Duration::from_secs(10 * i),
                end: s + Duration::from_secs(10 * i + 10),
                packets: 1000 * (i + 1),
            })
            .collect();
        let svg = plot_svg(&[], &lat, &pk, "t");
        for series in ["p50", "p99", "max"] {
            let p = points(&svg, "latency-over-time", series);
            assert_eq!(p.len(), 7, "{series}");
            assert!(p.windows(2).all(|w| w[1].0 > w[0].0), "time goes right");
        }
        // The pause shows in interval 4's max, and only there.
        let max = points(&svg, "latency-over-time", "max");
        let highest = max
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
            .unwrap()
            .0;
        assert_eq!(highest, 4);
        let p50 = points(&svg, "latency-over-time", "p50");
        let p99 = points(&svg, "latency-over-time", "p99");
        assert!(
            p50.iter().zip(&p99).all(|(a, b)| a.1 > b.1),
            "p99 above p50"
        );
        let pk = points(&svg, "packets-over-time", "packets");
        assert_eq!(pk.len(), 7);
        assert!(pk.windows(2).all(|w| w[1].1 < w[0].1), "packets rise");
        assert!(svg.contains(">12:00:00<"), "UTC time labels");
    }

    #[test]
    fn decade_labels() {
        let l: Vec<String> = (0..=10).map(decade_label).collect();
        assert_eq!(
            l,
            [
                "1 ns", "10 ns", "100 ns", "1 µs", "10 µs", "100 µs", "1 ms", "10 ms", "100 ms",
                "1 s", "10 s"
            ]
        );
    }
}
