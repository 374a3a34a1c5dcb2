//! Who may hold a control connection: per-source caps and a descriptor budget, checked when a
//! connection is accepted and before anything is spent on it (no task, no buffer, no input to
//! the core). A refused connection gets one `refused` frame, written without waiting, and its
//! socket is closed at once.
//!
//! - **Per source**: one IPv4 address, or one IPv6 /64 (a host usually owns a whole /64), holds
//!   at most `limits.connections_per_source` connections, so one host cannot keep everybody
//!   else out by holding connections open.
//! - **Descriptor budget**: the gateway raises its soft `RLIMIT_NOFILE` to the hard limit at
//!   start and lets control connections use at most half of the descriptors then free; the
//!   other half stays for the shards' TCP media connections (they live in the same process),
//!   the store and the dumps, so a flood on the control port can never make the media
//!   listeners fail with `EMFILE`. `server.max_connections` caps it further.
//!
//! Refusals are logged at most once per [`LOG_INTERVAL`], with counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::control::auth::source_key;
use crate::control::limits::Cidr;

/// At most one log line per this interval about refused connections.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Descriptors kept free for everything else, whatever the budget says.
const RESERVE: usize = 64;

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source holds its maximum.
    Source,
    /// The gateway holds its maximum (configured, or the descriptor budget).
    Capacity,
}

/// Connections held, per source and in all.
#[derive(Debug)]
pub struct ConnLimits {
    per_source: HashMap<IpAddr, u32>,
    max_per_source: u32,
    total: usize,
    budget: usize,
    refused: [u64; 2],
    last_log: Option<Instant>,
    /// Sources the per-source cap does not apply to (they still count in all).
    exempt: Vec<Cidr>,
}

impl ConnLimits {
    /// `budget`: connections held in all, at most (see [`descriptor_budget`]).
    pub fn new(max_per_source: u32, budget: usize, exempt: Vec<Cidr>) -> Self {
        ConnLimits {
            per_source: HashMap::new(),
            max_per_source: max_per_source.max(1),
            total: 0,
            budget: budget.max(1),
            refused: [0; 2],
            last_log: None,
            exempt,
        }
    }

    /// Counts a new connection from `peer`, or says why not. The key returned is what
    /// [`release`](Self::release) takes back.
    pub fn admit(&mut self, peer: IpAddr) -> Result<IpAddr, Refusal> {
        let key = source_key(peer, 64);
        if self.total >= self.budget {
            return Err(Refusal::Capacity);
        }
        let exempt = crate::control::limits::exempt(&self.exempt, peer);
        let n = self.per_source.entry(key).or_insert(0);
        if *n >= self.max_per_source && !exempt {
            return Err(Refusal::Source);
        }
        *n += 1;
        self.total += 1;
        Ok(key)
    }

    /// A connection counted by [`admit`](Self::admit) is gone.
    pub fn release(&mut self, key: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&key);
            }
            self.total -= 1;
        }
    }

    /// Counts a refusal; `Some((by_source, at_capacity))` when a log line is due.
    pub fn note_refusal(&mut self, now: Instant, why: Refusal) -> Option<(u64, u64)> {
        self.refused[usize::from(why == Refusal::Capacity)] += 1;
        if self
            .last_log
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_INTERVAL)
        {
            return None;
        }
        self.last_log = Some(now);
        let [s, c] = std::mem::take(&mut self.refused);
        Some((s, c))
    }

    pub fn set_max_per_source(&mut self, max: u32, exempt: Vec<Cidr>) {
        self.max_per_source = max.max(1);
        self.exempt = exempt;
    }

    pub fn held(&self) -> usize {
        self.total
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.per_source.len()
    }
}

/// Raises the soft descriptor limit to the hard one and returns how many control connections
/// may be held: half of the descriptors free now (less a reserve), at most `max_connections`.
pub fn descriptor_budget(max_connections: usize) -> (usize, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (max_connections, 0);
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let soft = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(RESERVE, |d| d.count());
    let free = soft.saturating_sub(open + RESERVE);
    ((free / 2).clamp(1, max_connections.max(1)), lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let mut l = ConnLimits::new(3, 10, vec!["198.51.100.0/24".parse().unwrap()]);
        let keys: Vec<_> = (0..3).map(|_| l.admit(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(l.admit(ip("192.0.2.1")), Err(Refusal::Source));
        // The same /64 is one source; another /64 is not; v4-mapped is v4.
        l.admit(ip("2001:db8:0:1::1")).unwrap();
        l.admit(ip("2001:db8:0:1::2")).unwrap();
        l.admit(ip("2001:db8:0:1:ffff::3")).unwrap();
        assert_eq!(l.admit(ip("2001:db8:0:1::4")), Err(Refusal::Source));
        assert!(l.admit(ip("2001:db8:0:2::1")).is_ok());
        assert_eq!(l.admit(ip("::ffff:192.0.2.1")), Err(Refusal::Source));
        assert!(l.admit(ip("192.0.2.2")).is_ok());
        // Released slots come back.
        l.release(keys[0]);
        assert!(l.admit(ip("192.0.2.1")).is_ok());
        // An exempt source is not capped per source, but the global budget holds for it too.
        assert_eq!(l.held(), 8);
        l.admit(ip("198.51.100.1")).unwrap();
        l.admit(ip("198.51.100.1")).unwrap();
        assert_eq!(l.admit(ip("198.51.100.1")), Err(Refusal::Capacity));
        // Releasing everything leaves no state behind.
        let mut l = ConnLimits::new(2, 100, Vec::new());
        let a = l.admit(ip("192.0.2.9")).unwrap();
        let b = l.admit(ip("192.0.2.9")).unwrap();
        l.release(a);
        l.release(b);
        l.release(b);
        assert_eq!((l.held(), l.sources()), (0, 0));
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let t0 = Instant::now();
        let mut l = ConnLimits::new(1, 1, Vec::new());
        assert_eq!(l.note_refusal(t0, Refusal::Source), Some((1, 0)));
        let lines = (0..10_000u64)
            .filter(|i| {
                l.note_refusal(t0 + Duration::from_micros(*i), Refusal::Capacity)
                    .is_some()
            })
            .count();
        assert_eq!(lines, 0);
        assert_eq!(
            l.note_refusal(t0 + LOG_INTERVAL, Refusal::Source),
            Some((1, 10_000))
        );
    }

    #[test]
    fn the_budget_leaves_half_the_descriptors_free() {
        let (budget, soft) = descriptor_budget(usize::MAX);
        assert!(soft > 0);
        let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        assert!(budget as u64 <= (soft - open) / 2, "{budget} of {soft}");
        assert!(budget >= 1);
        assert_eq!(descriptor_budget(7).0, 7.min(budget));
    }
}
