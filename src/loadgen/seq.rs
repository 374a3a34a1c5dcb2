//! Per-flow sequence tracking: unique packets, duplicates, reordering; and the summary
//! arithmetic (loss, fairness across flows). Pure.

/// Sequence numbers remembered behind the highest one, to tell duplicates from late packets.
pub const WINDOW: u64 = 1024;

/// One flow (one stream as seen on one receive socket).
#[derive(Clone, Debug)]
pub struct SeqTracker {
    highest: u64,
    started: bool,
    bits: [u64; (WINDOW / 64) as usize],
    /// Distinct packets received.
    pub unique: u64,
    pub duplicates: u64,
    /// Arrived after a higher sequence number (within the window).
    pub reordered: u64,
    /// Arrived more than [`WINDOW`] behind the highest (counted as unique and reordered).
    pub late: u64,
}

impl Default for SeqTracker {
    fn default() -> Self {
        SeqTracker {
            highest: 0,
            started: false,
            bits: [0; (WINDOW / 64) as usize],
            unique: 0,
            duplicates: 0,
            reordered: 0,
            late: 0,
        }
    }
}

impl SeqTracker {
    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn test_and_set(&mut self, seq: u64) -> bool {
        let (w, m) = Self::slot(seq);
        let was = self.bits[w] & m != 0;
        self.bits[w] |= m;
        was
    }

    fn clear(&mut self, seq: u64) {
        let (w, m) = Self::slot(seq);
        self.bits[w] &= !m;
    }

    pub fn on_packet(&mut self, seq: u64) {
        if !self.started {
            self.started = true;
            self.highest = seq;
            self.test_and_set(seq);
            self.unique += 1;
            return;
        }
        if seq > self.highest {
            let gap = seq - self.highest;
            if gap >= WINDOW {
                self.bits = [0; (WINDOW / 64) as usize];
            } else {
                for s in self.highest + 1..seq {
                    self.clear(s);
                }
                self.clear(seq);
            }
            self.highest = seq;
            self.test_and_set(seq);
            self.unique += 1;
        } else if self.highest - seq >= WINDOW {
            self.late += 1;
            self.reordered += 1;
            self.unique += 1;
        } else if self.test_and_set(seq) {
            self.duplicates += 1;
        } else {
            self.unique += 1;
            self.reordered += 1;
        }
    }
}

/// Loss as a fraction of what was expected (0 when nothing was expected).
pub fn loss_fraction(expected: u64, received: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        expected.saturating_sub(received) as f64 / expected as f64
    }
}

/// How evenly loss fell on flows: (smallest, largest) delivered fraction and the number of
/// flows that got nothing at all. `flows`: (expected, received) per flow.
pub fn fairness(flows: &[(u64, u64)]) -> (f64, f64, usize) {
    let mut min = f64::INFINITY;
    let mut max: f64 = 0.0;
    let mut starved = 0;
    for &(e, r) in flows {
        if e == 0 {
            continue;
        }
        let d = (r.min(e)) as f64 / e as f64;
        min = min.min(d);
        max = max.max(d);
        if r == 0 {
            starved += 1;
        }
    }
    if min.is_infinite() {
        (1.0, 1.0, 0)
    } else {
        (min, max, starved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_lossy_duplicated_reordered() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 2, 4, 3, 3, 7, 7, 5] {
            t.on_packet(s);
        }
        assert_eq!(t.unique, 7);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.reordered, 2);
        assert_eq!(t.late, 0);
    }

    #[test]
    fn window_slides_and_old_slots_are_reused() {
        let mut t = SeqTracker::default();
        for s in 0..5000 {
            t.on_packet(s);
        }
        assert_eq!((t.unique, t.duplicates, t.reordered), (5000, 0, 0));
        t.on_packet(4999);
        assert_eq!(t.duplicates, 1);
        // Far behind: late, not a duplicate (we cannot tell).
        t.on_packet(10);
        assert_eq!(t.late, 1);
        // A big jump clears the window.
        t.on_packet(100_000);
        t.on_packet(100_000 - 1);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.unique, 5003);
    }

    #[test]
    fn loss_and_fairness() {
        assert_eq!(loss_fraction(0, 0), 0.0);
        assert_eq!(loss_fraction(1000, 990), 0.01);
        assert_eq!(loss_fraction(10, 12), 0.0);
        let (min, max, starved) = fairness(&[(100, 90), (100, 100), (100, 0), (0, 0)]);
        assert_eq!((min, max, starved), (0.0, 1.0, 1));
        assert_eq!(fairness(&[]), (1.0, 1.0, 0));
    }
}
