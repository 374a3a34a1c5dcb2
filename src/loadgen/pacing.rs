//! When packets are due: the pacing schedule as a pure function of elapsed time.
//!
//! Packets are numbered 0, 1, 2, … over all streams; packet `k` belongs to stream
//! `k % streams` (streams are served round-robin, so each gets `rate / streams` packets per
//! second at an even spacing). [`Schedule::due`] says how many packets should have been sent
//! `elapsed` ns after the start:
//! - `Smooth`: each packet at its own time, `k / rate`.
//! - `Burst`: every `period` (1 ms by default) the packets of that period at once: the same
//!   average rate, arriving in bursts (what a coalescing relay would see anyway).
//! - `Flood`: no schedule; the sender sends batches as fast as it can.

/// How packets are spread in time.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    Smooth,
    Burst { period_ns: u64 },
    Flood,
}

impl Pacing {
    pub fn name(&self) -> &'static str {
        match self {
            Pacing::Smooth => "smooth",
            Pacing::Burst { .. } => "burst",
            Pacing::Flood => "flood",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Packets per second over all streams (ignored by `Flood`).
    pub rate: f64,
    pub pacing: Pacing,
    pub streams: u32,
}

impl Schedule {
    /// Packets due by `elapsed_ns` after the start (packet 0 is due at 0).
    pub fn due(&self, elapsed_ns: u64) -> u64 {
        let rate = self.rate.max(0.0);
        match self.pacing {
            Pacing::Smooth => (elapsed_ns as f64 * rate / 1e9).floor() as u64 + 1,
            Pacing::Burst { period_ns } => {
                let period = period_ns.max(1);
                let bursts = elapsed_ns / period + 1;
                ((bursts * period) as f64 * rate / 1e9).round() as u64
            }
            Pacing::Flood => u64::MAX,
        }
    }

    /// The stream of packet `k`.
    pub fn stream_of(&self, k: u64) -> u32 {
        (k % u64::from(self.streams.max(1))) as u32
    }

    /// When packet `k` is due, in ns after the start (`Smooth` and `Burst`).
    pub fn due_at(&self, k: u64) -> u64 {
        let rate = self.rate.max(1e-9);
        match self.pacing {
            Pacing::Smooth => (k as f64 * 1e9 / rate).ceil() as u64,
            Pacing::Burst { period_ns } => {
                let period = period_ns.max(1);
                let per_burst = period as f64 * rate / 1e9;
                // The first burst b whose cumulative count round((b + 1) * per_burst) exceeds k.
                let b = ((k as f64 + 0.5) / per_burst).ceil() as u64;
                b.saturating_sub(1) * period
            }
            Pacing::Flood => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_spreads_packets_evenly_and_round_robin() {
        let s = Schedule {
            rate: 20_000.0,
            pacing: Pacing::Smooth,
            streams: 20,
        };
        assert_eq!(s.due(0), 1);
        assert_eq!(s.due(49_999), 1);
        assert_eq!(s.due(50_000), 2);
        assert_eq!(s.due(1_000_000_000), 20_001);
        assert_eq!(s.due_at(1), 50_000);
        assert_eq!(s.due_at(20_000), 1_000_000_000);
        // Each stream every 20 streams × 50 µs = 1 ms: 1000 packets/s each.
        assert_eq!(s.stream_of(0), 0);
        assert_eq!(s.stream_of(21), 1);
        assert_eq!((0..20_000).filter(|&k| s.stream_of(k) == 3).count(), 1000);
    }

    #[test]
    fn g711_is_50_packets_per_second_per_stream() {
        // 1000 calls × 2 directions × 50 pps.
        let s = Schedule {
            rate: 100_000.0,
            pacing: Pacing::Smooth,
            streams: 2000,
        };
        let first_of_7 = (0..).find(|&k| s.stream_of(k) == 7).unwrap();
        let second_of_7 = (first_of_7 + 1..).find(|&k| s.stream_of(k) == 7).unwrap();
        assert_eq!(s.due_at(second_of_7) - s.due_at(first_of_7), 20_000_000);
    }

    #[test]
    fn bursts_deliver_the_same_rate_once_per_period() {
        let s = Schedule {
            rate: 20_000.0,
            pacing: Pacing::Burst {
                period_ns: 1_000_000,
            },
            streams: 1,
        };
        assert_eq!(s.due(0), 20);
        assert_eq!(s.due(999_999), 20);
        assert_eq!(s.due(1_000_000), 40);
        assert_eq!(s.due(999_999_999), 20_000);
        assert_eq!(s.due_at(19), 0);
        assert_eq!(s.due_at(20), 1_000_000);
        // Fractional bursts (2.5 packets per period) still average out.
        let s = Schedule { rate: 2_500.0, ..s };
        assert_eq!(s.due(9_999_999), 25);
    }

    #[test]
    fn flood_has_no_schedule() {
        let s = Schedule {
            rate: 0.0,
            pacing: Pacing::Flood,
            streams: 3,
        };
        assert_eq!(s.due(5), u64::MAX);
    }
}
