//! Counts of the control core's outcomes since start, for the operator's metrics: probe
//! verdicts, the path planned for each direction of each two-party call, and why calls ended.
//!
//! Every count is indexed by a small fixed set (booleans, [`Path`], [`HangupReason`]), never by
//! a user or a call, so that the metrics built from it have bounded cardinality. Plain
//! integers owned by the core; the server reads copies through `Gateway::stats`.

use super::planner::{Path, Plan};
use super::probe::ProbeOutcome;
use crate::wire::control::HangupReason;

/// Every [`Path`], in the order [`Tally::paths`] indexes them.
pub const PATHS: [Path; 5] = [
    Path::DirectUdp,
    Path::UdpViaGateway,
    Path::UdpInTcpOut,
    Path::TcpInUdpOut,
    Path::TcpBoth,
];

/// Every [`HangupReason`], in the order [`Tally::ended`] indexes them (declaration order).
pub const HANGUP_REASONS: [HangupReason; HangupReason::ALL.len()] = HangupReason::ALL;

/// The snake_case name of a path, as in the protocol and `phone --json`.
pub fn path_name(p: Path) -> &'static str {
    match p {
        Path::DirectUdp => "direct_udp",
        Path::UdpViaGateway => "udp_via_gateway",
        Path::UdpInTcpOut => "udp_in_tcp_out",
        Path::TcpInUdpOut => "tcp_in_udp_out",
        Path::TcpBoth => "tcp_both",
    }
}

fn path_index(p: Path) -> usize {
    match p {
        Path::DirectUdp => 0,
        Path::UdpViaGateway => 1,
        Path::UdpInTcpOut => 2,
        Path::TcpInUdpOut => 3,
        Path::TcpBoth => 4,
    }
}

fn reason_index(r: HangupReason) -> usize {
    // A fieldless enum's discriminant is its declaration index, which is `ALL`'s order.
    r as usize
}

/// Outcome counts since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Finished probes by verdict, indexed by [`Tally::probe_index`].
    pub probes: [u64; 8],
    /// Directions planned: `[forward (caller to callee), backward]` by [`PATHS`] index. Every
    /// plan counts, re-plans (fallbacks) included.
    pub paths: [[u64; 5]; 2],
    /// Two-party calls and rooms ended, by [`HANGUP_REASONS`] index.
    pub ended: [u64; HANGUP_REASONS.len()],
}

impl Tally {
    /// Index of a verdict in [`Tally::probes`]: bit 2 send UDP, bit 1 receive UDP, bit 0 NAT.
    pub const fn probe_index(send_udp: bool, recv_udp: bool, nat: bool) -> usize {
        (send_udp as usize) << 2 | (recv_udp as usize) << 1 | nat as usize
    }

    pub fn probe(&mut self, o: &ProbeOutcome) {
        let c = o.capabilities;
        self.probes[Self::probe_index(c.send_udp, c.recv_udp, c.nat)] += 1;
    }

    pub fn plan(&mut self, plan: &Plan) {
        self.paths[0][path_index(plan.forward)] += 1;
        self.paths[1][path_index(plan.backward)] += 1;
    }

    pub fn ended(&mut self, reason: HangupReason) {
        if let Some(n) = self.ended.get_mut(reason_index(reason)) {
            *n += 1;
        }
    }

    /// Directions planned on `path` (`forward`: caller to callee).
    pub fn planned(&self, forward: bool, path: Path) -> u64 {
        self.paths[usize::from(!forward)][path_index(path)]
    }

    /// Calls ended with `reason`.
    pub fn ended_with(&self, reason: HangupReason) -> u64 {
        self.ended.get(reason_index(reason)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_slots_follow_the_declaration_order() {
        for (i, r) in HANGUP_REASONS.iter().enumerate() {
            assert_eq!(reason_index(*r), i, "{r:?}");
        }
        // The last variant closes the list: a reason added after it without a place in
        // `HangupReason::ALL` fails here.
        assert_eq!(
            HangupReason::NotPermitted as usize + 1,
            HANGUP_REASONS.len(),
            "HangupReason::ALL must list every reason, in declaration order"
        );
    }

    #[test]
    fn each_reason_and_path_has_its_own_slot() {
        let mut t = Tally::default();
        for (i, r) in HANGUP_REASONS.iter().enumerate() {
            for _ in 0..=i {
                t.ended(*r);
            }
        }
        for (i, r) in HANGUP_REASONS.iter().enumerate() {
            assert_eq!(t.ended_with(*r), i as u64 + 1, "{}", r.as_str());
        }
        for (i, p) in PATHS.iter().enumerate() {
            assert_eq!(path_index(*p), i);
            t.plan(&Plan {
                forward: *p,
                backward: Path::TcpBoth,
            });
            assert_eq!(t.planned(true, *p), 1, "{}", path_name(*p));
        }
        assert_eq!(t.planned(false, Path::TcpBoth), 5);
        assert_eq!(t.planned(false, Path::DirectUdp), 0);
        let idx: std::collections::HashSet<usize> = (0..8)
            .map(|b| Tally::probe_index(b & 4 != 0, b & 2 != 0, b & 1 != 0))
            .collect();
        assert_eq!(idx.len(), 8);
    }
}
