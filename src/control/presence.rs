//! Presence: is a logged-in client still there? (Design: "A logged-in client sends periodic
//! heart-beats over its control connection; the gateway also polls idle clients. A client that
//! misses them is marked offline and its calls are torn down.")
//!
//! Any message from the client counts as life. With `H` the heart-beat interval, `m` the misses
//! allowed and `s` the jitter slack, a client last heard at `t` is
//! - polled (`poll{seq}`) at `t + k·H + s` for `k = 1 .. m-1` (the poll asks for a heartbeat;
//!   a client that missed one beat answers and is fine),
//! - offline at `t + m·H + s`.
//!
//! The slack is a deliberate reading of "silent for one interval": a client beating exactly
//! every `H` has its beats arrive at `H ± jitter`, and polling at exactly `H` would poll it
//! after about half its beats. With the defaults (10 s, 3, 2.5 s) a silent client is polled at
//! 12.5 s and 22.5 s and offline at 32.5 s.
//!
//! Pure state: the caller passes `now` and re-arms one timer per client at
//! [`Presence::next_deadline`]. Hearing from a client does not touch the timer; when it fires
//! early it is simply re-armed (cheaper than re-arming on every message).

use std::time::{Duration, Instant};

use super::gateway::later;

/// The presence settings (from the gateway config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    pub heartbeat: Duration,
    pub misses: u32,
    pub slack: Duration,
}

/// One client's presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    pub last_heard: Instant,
    /// Polls sent since the client was last heard.
    pub polls: u32,
    /// Sequence number of the last poll sent (the client may echo it in its heartbeat).
    pub poll_seq: u64,
}

/// What a presence deadline brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// Send `poll{seq}`.
    Poll(u64),
    /// Missed `misses` intervals: the client is offline.
    Offline,
}

impl Presence {
    pub fn new(now: Instant) -> Self {
        Presence {
            last_heard: now,
            polls: 0,
            poll_seq: 0,
        }
    }

    /// The client said something.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        self.polls = 0;
    }

    /// `last_heard + k·H + slack`.
    fn deadline(&self, k: u32, c: Cadence) -> Instant {
        later(
            self.last_heard,
            c.heartbeat.saturating_mul(k).saturating_add(c.slack),
        )
    }

    /// When the next poll or the offline verdict is due.
    pub fn next_deadline(&self, c: Cadence) -> Instant {
        self.deadline(self.polls.saturating_add(1).min(c.misses), c)
    }

    /// What is due at `now` (call when the timer fires, then re-arm at `next_deadline`).
    pub fn due(&mut self, now: Instant, c: Cadence) -> Due {
        if now >= self.deadline(c.misses, c) {
            return Due::Offline;
        }
        let next = self.polls.saturating_add(1);
        if next < c.misses && now >= self.deadline(next, c) {
            self.polls = next;
            self.poll_seq = self.poll_seq.wrapping_add(1);
            return Due::Poll(self.poll_seq);
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Cadence = Cadence {
        heartbeat: Duration::from_secs(10),
        misses: 3,
        slack: Duration::from_millis(2500),
    };

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn silent_client_is_polled_then_offline() {
        let t0 = Instant::now();
        let mut p = Presence::new(t0);
        assert_eq!(p.next_deadline(C), ms(t0, 12_500));
        assert_eq!(p.due(ms(t0, 12_499), C), Due::Nothing);
        assert_eq!(p.due(ms(t0, 12_500), C), Due::Poll(1));
        assert_eq!(p.next_deadline(C), ms(t0, 22_500));
        assert_eq!(p.due(ms(t0, 12_600), C), Due::Nothing);
        assert_eq!(p.due(ms(t0, 22_500), C), Due::Poll(2));
        assert_eq!(p.next_deadline(C), ms(t0, 32_500));
        assert_eq!(p.due(ms(t0, 30_000), C), Due::Nothing);
        assert_eq!(p.due(ms(t0, 32_500), C), Due::Offline);
    }

    #[test]
    fn hearing_resets_and_a_late_timer_is_just_rearmed() {
        let t0 = Instant::now();
        let mut p = Presence::new(t0);
        assert_eq!(p.due(ms(t0, 12_500), C), Due::Poll(1));
        p.heard(ms(t0, 13_000));
        assert_eq!(p.polls, 0);
        // The timer armed for 22.5 s fires: nothing is due; the next deadline moved.
        assert_eq!(p.due(ms(t0, 22_500), C), Due::Nothing);
        assert_eq!(p.next_deadline(C), ms(t0, 25_500));
        assert_eq!(p.due(ms(t0, 25_500), C), Due::Poll(2));
        // Time going backwards changes nothing.
        p.heard(t0);
        assert_eq!(p.last_heard, ms(t0, 13_000));
    }

    #[test]
    fn one_miss_allowed_means_no_poll() {
        let t0 = Instant::now();
        let c = Cadence { misses: 1, ..C };
        let mut p = Presence::new(t0);
        assert_eq!(p.next_deadline(c), ms(t0, 12_500));
        assert_eq!(p.due(ms(t0, 12_500), c), Due::Offline);
    }
}
