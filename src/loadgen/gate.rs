//! `voxgate bench gate DIR`: the perf harness as a pass/fail check (`perf/run` runs it last,
//! so `perf/run --quick` in CI fails on a regression).
//!
//! Two rules, over the step results of one run (so both sides saw the same machine):
//! - **CPU**: at every step measured for both, voxgate (default coalescing budget, udp→udp)
//!   may spend at most `max_cpu_ratio` times the bare forwarder's CPU per relayed packet. The
//!   default, 1.5×, is generous on purpose: in perf/README.md's runs voxgate takes 0.56× the
//!   forwarder's CPU at smooth 20k, 0.57× at 50k and 0.97× at flood, and the shared VM moves
//!   single steps by up to ±30 %; a gate that fails on noise gets ignored.
//! - **Loss**: every voxgate step at a paced rate (not `flood`, and not the ramp's `max`,
//!   which is saturation by definition) delivers all but at most `max_loss` (1 %).
//!
//! A run with nothing to compare fails too: a gate that passes because nothing ran is no gate.

use super::StepResult;

/// The limits, as stated in the module docs and perf/README.md.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_cpu_ratio: f64,
    pub max_loss: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_cpu_ratio: 1.5,
            max_loss: 0.01,
        }
    }
}

/// What the gate checked: one line per check, and whether all passed.
#[derive(Debug, Default)]
pub struct Verdict {
    pub lines: Vec<String>,
    pub failures: usize,
}

impl Verdict {
    fn check(&mut self, ok: bool, line: String) {
        self.failures += usize::from(!ok);
        self.lines
            .push(format!("{} {line}", if ok { "pass:" } else { "FAIL:" }));
    }

    pub fn passed(&self) -> bool {
        self.failures == 0
    }
}

fn paced(r: &StepResult) -> bool {
    r.pacing != "flood" && r.step != "max" && r.step != "flood"
}

/// Applies the rules to one run's results.
pub fn check(all: &[StepResult], limits: Limits) -> Verdict {
    let mut v = Verdict::default();
    let mut compared = 0;
    for vg in all
        .iter()
        .filter(|r| r.label == "voxgate" && r.scenario == "udp-udp")
    {
        let Some(fwd) = all
            .iter()
            .find(|f| f.label == "forwarder" && f.step == vg.step && f.streams == vg.streams)
        else {
            continue;
        };
        match (vg.cpu_us_per_pkt, fwd.cpu_us_per_pkt) {
            (Some(a), Some(b)) if b > 0.0 => {
                compared += 1;
                let ratio = a / b;
                v.check(
                    ratio <= limits.max_cpu_ratio,
                    format!(
                        "CPU/pkt, udp→udp {} ({} stream(s)): voxgate {a:.2} µs vs forwarder {b:.2} µs = {ratio:.2}× (limit {:.2}×){}",
                        vg.step,
                        vg.streams,
                        limits.max_cpu_ratio,
                        disturbed(vg).or(disturbed(fwd)).unwrap_or_default()
                    ),
                );
            }
            _ => v.check(
                false,
                format!(
                    "CPU/pkt, udp→udp {} ({} stream(s)): not measured (voxgate {:?}, forwarder {:?})",
                    vg.step, vg.streams, vg.cpu_us_per_pkt, fwd.cpu_us_per_pkt
                ),
            ),
        }
    }
    if compared == 0 {
        v.check(
            false,
            "no step measured both voxgate (udp→udp) and the forwarder: nothing to compare".into(),
        );
    }
    let mut paced_steps = 0;
    for r in all.iter().filter(|r| r.system == "voxgate" && paced(r)) {
        paced_steps += 1;
        v.check(
            r.loss <= limits.max_loss,
            format!(
                "loss, {} {} {} ({} stream(s), {:.0} pkt/s): {:.3} % (limit {:.1} %)",
                r.label,
                r.scenario,
                r.step,
                r.streams,
                r.pps,
                r.loss * 100.0,
                limits.max_loss * 100.0
            ),
        );
    }
    if paced_steps == 0 {
        v.check(false, "no paced voxgate step was measured".into());
    }
    v
}

fn disturbed(r: &StepResult) -> Option<String> {
    let d = super::disturbance(r);
    (d > super::DISTURBED).then(|| {
        format!(
            " (other processes took {:.2} of a core during {}'s step)",
            d, r.label
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::report::tests::res;

    #[test]
    fn a_slow_voxgate_or_a_lossy_paced_step_fails() {
        let mut all = vec![
            res("voxgate", "udp-udp", "smooth-20k", 8.0, 900.0),
            res("forwarder", "udp-udp", "smooth-20k", 14.0, 40.0),
            res("voxgate", "udp-udp", "flood", 5.3, 0.0),
            res("forwarder", "udp-udp", "flood", 5.4, 0.0),
            res("voxgate", "tcp-udp", "smooth-20k", 9.0, 900.0),
        ];
        let v = check(&all, Limits::default());
        assert!(v.passed(), "{:#?}", v.lines);
        assert_eq!(
            v.lines.len(),
            2 + 2,
            "two CPU comparisons, two paced voxgate steps"
        );

        // voxgate at 1.6x the forwarder's CPU at flood.
        all[2].cpu_us_per_pkt = Some(5.4 * 1.6);
        let v = check(&all, Limits::default());
        assert_eq!(v.failures, 1);
        assert!(
            v.lines
                .iter()
                .any(|l| l.starts_with("FAIL: CPU/pkt, udp→udp flood"))
        );
        all[2].cpu_us_per_pkt = Some(5.3);

        // 2 % loss at a paced step fails; the same loss at flood does not.
        all[4].loss = 0.02;
        all[2].loss = 0.4;
        let v = check(&all, Limits::default());
        assert_eq!(v.failures, 1, "{:#?}", v.lines);
        assert!(
            v.lines
                .iter()
                .any(|l| l.starts_with("FAIL: loss, voxgate tcp-udp"))
        );
    }

    #[test]
    fn nothing_to_compare_fails() {
        let v = check(
            &[res("voxgate", "udp-udp", "smooth-20k", 8.0, 900.0)],
            Limits::default(),
        );
        assert!(!v.passed());
        assert!(v.lines.iter().any(|l| l.contains("nothing to compare")));
        assert!(!check(&[], Limits::default()).passed());
    }
}
