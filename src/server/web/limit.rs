//! How many registration attempts one source may make: at most [`ATTEMPTS`] per
//! [`WINDOW`] from one IPv4 address or IPv6 /64, counted before the request is read, valid or
//! not (so invitation codes cannot be guessed at speed, and an open page cannot be used to
//! fill the directory from one host). Sans-IO: the caller passes `now`.
//!
//! Bounded memory: at most [`MAX_SOURCES`] sources are tracked; when the table is full,
//! sources whose window has passed are forgotten, and if none has, the attempt is refused.
//! Behind a reverse proxy every attempt comes from the proxy's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Attempts per source and window.
pub const ATTEMPTS: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Sources tracked at once.
pub const MAX_SOURCES: usize = 4096;

/// One IPv4 address (v4-mapped IPv6 included), or the /64 of an IPv6 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

#[derive(Default)]
pub struct AttemptLimit {
    /// Per source: when its window started, and attempts in it.
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl AttemptLimit {
    /// Counts an attempt from `ip`; `Err(wait)` when the source must wait.
    pub fn attempt(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = source_key(ip);
        if !self.seen.contains_key(&key) && self.seen.len() >= MAX_SOURCES {
            self.seen
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < WINDOW);
            if self.seen.len() >= MAX_SOURCES {
                return Err(WINDOW);
            }
        }
        let (start, n) = self.seen.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= WINDOW {
            (*start, *n) = (now, 0);
        }
        if *n >= ATTEMPTS {
            return Err(WINDOW.saturating_sub(now.saturating_duration_since(*start)));
        }
        *n += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_attempts_per_window_and_others_are_not_affected() {
        let mut l = AttemptLimit::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..ATTEMPTS {
            l.attempt(a, t0).unwrap();
        }
        let wait = l.attempt(a, t0 + Duration::from_secs(60)).unwrap_err();
        assert_eq!(wait, WINDOW - Duration::from_secs(60));
        // The same host as v4-mapped IPv6 is the same source.
        assert!(l.attempt("::ffff:192.0.2.1".parse().unwrap(), t0).is_err());
        l.attempt("192.0.2.2".parse().unwrap(), t0).unwrap();
        // One /64 is one source.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for i in 0..ATTEMPTS {
            l.attempt(v6(&format!("2001:db8::{i:x}")), t0).unwrap();
        }
        assert!(l.attempt(v6("2001:db8::ffff"), t0).is_err());
        l.attempt(v6("2001:db8:0:1::1"), t0).unwrap();
        // After the window, a fresh allowance.
        l.attempt(a, t0 + WINDOW).unwrap();
    }

    #[test]
    fn the_table_is_bounded() {
        let mut l = AttemptLimit::default();
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            l.attempt(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), t0)
                .unwrap();
        }
        assert!(l.attempt("192.0.2.9".parse().unwrap(), t0).is_err());
        assert_eq!(l.seen.len(), MAX_SOURCES);
        // Once the windows have passed, old sources make room.
        l.attempt("192.0.2.9".parse().unwrap(), t0 + WINDOW)
            .unwrap();
        assert_eq!(l.seen.len(), 1);
    }
}
