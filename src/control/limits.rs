//! A token bucket on a caller-supplied clock: `burst` events at once, then `rate` per second.
//! Sans-IO (the caller passes `now`), integer arithmetic (nanoseconds), no allocation, so it
//! can sit in every connection's reader and in the core's per-user tables.

use std::time::{Duration, Instant};

/// The bucket's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed at once.
    pub burst: u32,
    /// Events per second after the burst (at least 1).
    pub per_s: u32,
}

impl Rate {
    fn every(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.per_s.max(1)))
    }
}

/// One bucket. A full bucket holds `burst` tokens; each event takes one.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    rate: Rate,
    /// When the bucket is (or was) full again, if no more events came: tokens are
    /// `burst - (full_at - now) / every`.
    full_at: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket { rate, full_at: now }
    }

    /// Takes a token at `now`; when there is none, `Err(wait)` says how long until there is
    /// one (nothing is taken).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let every = self.rate.every();
        let span = every.saturating_mul(self.rate.burst.max(1));
        // The debt a full bucket may carry: burst - 1 tokens' worth after this one.
        let start = self.full_at.max(now);
        let next = start + every;
        let limit = now + span;
        if next > limit {
            return Err(next - limit);
        }
        self.full_at = next;
        Ok(())
    }

    /// Whether a token is available at `now` (nothing is taken).
    pub fn ready(&self, now: Instant) -> bool {
        let mut b = *self;
        b.take(now).is_ok()
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_on_a_virtual_clock() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                burst: 5,
                per_s: 10,
            },
            t0,
        );
        for i in 0..5 {
            assert!(b.take(t0).is_ok(), "burst token {i}");
        }
        assert_eq!(b.take(t0), Err(Duration::from_millis(100)));
        assert!(b.take(t0 + Duration::from_millis(99)).is_err());
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
        // Over 10 s at most burst + 10/s get through, however hard one pushes.
        let mut ok = 0;
        for ms in 0..10_000u64 {
            for _ in 0..10 {
                ok += u32::from(b.take(t0 + Duration::from_millis(100 + ms)).is_ok());
            }
        }
        assert!((99..=101).contains(&ok), "{ok}");
        // Idle for long: full again, not more.
        let later = t0 + Duration::from_secs(1000);
        assert!(b.ready(later));
        let n = (0..100).filter(|_| b.take(later).is_ok()).count();
        assert_eq!(n, 5);
    }

    proptest::proptest! {
        #[test]
        fn never_more_than_burst_plus_rate(
            steps in proptest::collection::vec(0u64..50_000_000, 1..500),
            burst in 1u32..50,
            per_s in 1u32..1000,
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(Rate { burst, per_s }, t0);
            let mut now = t0;
            let mut ok = 0u64;
            for s in steps {
                now += Duration::from_nanos(s);
                ok += u64::from(b.take(now).is_ok());
            }
            let secs = (now - t0).as_secs_f64();
            proptest::prop_assert!(ok as f64 <= f64::from(burst) + secs * f64::from(per_s) + 1.0);
        }
    }
}
