//! Token buckets on a caller-supplied clock: `burst` events at once, then one per interval.
//! Sans-IO (the caller passes `now`), integer arithmetic, no allocation, so one can sit in
//! every connection's reader; [`RateTable`] keeps one per key (a user, a pair of users) for the
//! core's dial, ring and invitation limits, bounded in size.

use std::collections::HashMap;
use std::hash::Hash;
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

/// `burst` events at once, then one per `every` (for limits counted per minute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    pub burst: u32,
    pub every: Duration,
}

impl From<Rate> for Pace {
    fn from(r: Rate) -> Pace {
        Pace {
            burst: r.burst,
            every: r.every(),
        }
    }
}

/// One bucket. A full bucket holds `burst` tokens; each event takes one.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    rate: Pace,
    /// When the bucket is (or was) full again, if no more events came: tokens are
    /// `burst - (full_at - now) / every`.
    full_at: Instant,
}

impl TokenBucket {
    pub fn new(rate: impl Into<Pace>, now: Instant) -> Self {
        TokenBucket {
            rate: rate.into(),
            full_at: now,
        }
    }

    /// Takes a token at `now`; when there is none, `Err(wait)` says how long until there is
    /// one (nothing is taken).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let every = self.rate.every;
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

    pub fn pace(&self) -> Pace {
        self.rate
    }

    /// Gives back a token taken earlier (the event turned out legitimate).
    pub fn refund(&mut self, now: Instant) {
        if self.full_at > now {
            self.full_at = self
                .full_at
                .checked_sub(self.rate.every)
                .unwrap_or(now)
                .max(now);
        }
    }

    /// Whether the bucket is full at `now` (it may be forgotten: a new one is the same).
    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at <= now
    }
}

/// One bucket per key, all with the same pace; at most `max` keys. A key whose bucket is full
/// again is dropped when room is needed (a new bucket is a full one); when every bucket is in
/// use the table refuses new keys, so its size never depends on the attacker.
#[derive(Debug)]
pub struct RateTable<K> {
    pace: Pace,
    max: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> RateTable<K> {
    pub fn new(pace: Pace, max: usize) -> Self {
        RateTable {
            pace,
            max: max.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether `key` has a token at `now` (nothing is taken).
    pub fn ready(&self, key: &K, now: Instant) -> bool {
        match self.buckets.get(key) {
            Some(b) => b.ready(now),
            None => self.buckets.len() < self.max || self.buckets.values().any(|b| b.is_full(now)),
        }
    }

    /// Takes a token for `key`; `false` when there is none (nothing is taken).
    pub fn take(&mut self, key: &K, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(key) {
            return b.take(now).is_ok();
        }
        if self.buckets.len() >= self.max {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max {
                return false;
            }
        }
        let mut b = TokenBucket::new(self.pace, now);
        let ok = b.take(now).is_ok();
        self.buckets.insert(key.clone(), b);
        ok
    }

    /// Gives back a token of `key` (nothing if it has no bucket).
    pub fn refund(&mut self, key: &K, now: Instant) {
        if let Some(b) = self.buckets.get_mut(key) {
            b.refund(now);
        }
    }

    /// A new pace (reload): buckets start over.
    pub fn set_pace(&mut self, pace: Pace) {
        if pace != self.pace {
            self.pace = pace;
            self.buckets.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// An address block (`192.0.2.0/24`, `2001:db8::/32`, or a bare address): sources exempt from
/// the per-source limits (a local load generator, a trusted proxy that all clients come through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix-length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether `ip` is in any of `blocks`.
pub fn exempt(blocks: &[Cidr], ip: std::net::IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

/// Limits against ring-bombing (a dial-and-hang-up loop keeps a victim's phone ringing, and a
/// ringing callee is busy to everyone) and invitation floods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimitConfig {
    /// Dials and conferences one caller places.
    pub dials: Pace,
    /// Rings of one callee by one caller (calls and room invitations).
    pub rings_per_pair: Pace,
    /// Rings of one callee by everybody.
    pub rings_per_callee: Pace,
    /// Room invitations one organizer sends (one per invited number).
    pub invites: Pace,
}

impl Default for CallLimitConfig {
    /// 10 dials at once, then 10 a minute; 3 rings of one callee by one caller, then 3 a
    /// minute; 20 rings of one callee in all, then 20 a minute; 30 invitations, then 30 a
    /// minute.
    fn default() -> Self {
        let per_min = |burst: u32, n: u64| Pace {
            burst,
            every: Duration::from_secs(60) / u32::try_from(n.max(1)).unwrap_or(1),
        };
        CallLimitConfig {
            dials: per_min(10, 10),
            rings_per_pair: per_min(3, 3),
            rings_per_callee: per_min(20, 20),
            invites: per_min(30, 30),
        }
    }
}

/// Keys in each table at most (all are keyed by logged-in users, so this only bounds what a
/// very large gateway could ever hold).
const CALL_TABLE_MAX: usize = 200_000;

/// The core's per-user call limits, by user name (a re-log-in does not reset them).
#[derive(Debug)]
pub struct CallLimits {
    dials: RateTable<String>,
    pairs: RateTable<(String, String)>,
    callees: RateTable<String>,
    invites: RateTable<String>,
}

impl CallLimits {
    pub fn new(c: CallLimitConfig) -> Self {
        CallLimits {
            dials: RateTable::new(c.dials, CALL_TABLE_MAX),
            pairs: RateTable::new(c.rings_per_pair, CALL_TABLE_MAX),
            callees: RateTable::new(c.rings_per_callee, CALL_TABLE_MAX),
            invites: RateTable::new(c.invites, CALL_TABLE_MAX),
        }
    }

    pub fn set_config(&mut self, c: CallLimitConfig) {
        self.dials.set_pace(c.dials);
        self.pairs.set_pace(c.rings_per_pair);
        self.callees.set_pace(c.rings_per_callee);
        self.invites.set_pace(c.invites);
    }

    /// `caller` places a call or room.
    pub fn dial(&mut self, caller: &str, now: Instant) -> bool {
        self.dials.take(&caller.to_owned(), now)
    }

    /// `caller` may ring `callee` now: both the pair's and the callee's bucket have a token
    /// (both are taken, or neither).
    pub fn ring(&mut self, caller: &str, callee: &str, now: Instant) -> bool {
        let pair = (caller.to_owned(), callee.to_owned());
        let callee = callee.to_owned();
        if !(self.pairs.ready(&pair, now) && self.callees.ready(&callee, now)) {
            return false;
        }
        self.pairs.take(&pair, now) && self.callees.take(&callee, now)
    }

    /// `organizer` invites one more number.
    pub fn invite(&mut self, organizer: &str, now: Instant) -> bool {
        self.invites.take(&organizer.to_owned(), now)
    }

    /// `callee` answered a call from `caller`: an answered call is not ring-bombing, so the
    /// dial and the ring are given back (a conversation is never what these limits stop).
    pub fn answered(&mut self, caller: &str, callee: &str, now: Instant) {
        self.dials.refund(&caller.to_owned(), now);
        self.pairs
            .refund(&(caller.to_owned(), callee.to_owned()), now);
        self.callees.refund(&callee.to_owned(), now);
    }

    /// `member` accepted `organizer`'s room invitation.
    pub fn joined(&mut self, organizer: &str, member: &str, now: Instant) {
        self.invites.refund(&organizer.to_owned(), now);
        self.pairs
            .refund(&(organizer.to_owned(), member.to_owned()), now);
        self.callees.refund(&member.to_owned(), now);
    }
}

impl super::gateway::Gateway {
    /// Before `accept{call}` by `conn` is handled: if it answers a ringing call or invitation,
    /// the call limits give their tokens back.
    pub(crate) fn note_answer(&mut self, now: Instant, conn: super::gateway::ConnId, call: u64) {
        use super::calls::{Call, Far, MemberState, PairState};
        let (caller, room) = match self.calls.get(&call) {
            Some(Call::Pair(p))
                if matches!(p.state, PairState::Ringing)
                    && matches!(p.callee, Far::User(c) if c == conn) =>
            {
                (p.caller, false)
            }
            Some(Call::Room(r))
                if r.members.get(&conn).map(|m| m.state) == Some(MemberState::Invited) =>
            {
                (r.organizer, true)
            }
            _ => return,
        };
        let (Some(caller), Some(me)) = (
            self.session(caller).map(|s| s.user.clone()),
            self.session(conn).map(|s| s.user.clone()),
        ) else {
            return;
        };
        if room {
            self.call_limits.joined(&caller, &me, now);
        } else {
            self.call_limits.answered(&caller, &me, now);
        }
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

    #[test]
    fn rate_tables_are_bounded_and_forget_full_buckets() {
        let t0 = Instant::now();
        let pace = Pace {
            burst: 2,
            every: Duration::from_secs(10),
        };
        let mut t = RateTable::new(pace, 3);
        assert!(t.take(&"a", t0) && t.take(&"a", t0));
        assert!(!t.take(&"a", t0));
        assert!(!t.ready(&"a", t0));
        assert!(t.take(&"b", t0) && t.take(&"c", t0));
        // Full of buckets in use: a new key is refused rather than growing the table.
        assert!(!t.ready(&"d", t0));
        assert!(!t.take(&"d", t0));
        assert_eq!(t.len(), 3);
        // 20 s later every bucket is full again: room for new keys.
        let later = t0 + Duration::from_secs(20);
        assert!(t.take(&"d", later));
        assert!(t.len() <= 3);
        assert!(t.take(&"a", later), "a's bucket refilled");
    }

    #[test]
    fn cidr_blocks() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let b: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(b.contains(ip("127.0.0.2")) && b.contains(ip("::ffff:127.1.2.3")));
        assert!(!b.contains(ip("128.0.0.1")) && !b.contains(ip("::1")));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains(ip("::1")) && !one.contains(ip("::2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        for bad in ["", "1.2.3.4/33", "::/129", "example.org", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    mod core {
        use super::super::super::gateway::GatewayConfig;
        use super::super::super::sim::{self, World};
        use super::super::*;
        use crate::wire::control::{ClientMsg, HangupReason, ServerMsg};

        fn incoming(msgs: &[ServerMsg]) -> usize {
            msgs.iter()
                .filter(|m| matches!(m, ServerMsg::Incoming { .. }))
                .count()
        }

        fn world(c: CallLimitConfig) -> World {
            World::with_config(GatewayConfig {
                call_limits: c,
                ..sim::config()
            })
        }

        #[test]
        fn a_dial_and_hang_up_loop_stops_ringing_the_callee() {
            let mut w = world(CallLimitConfig::default());
            let alice = w.login("alice", sim::OPEN);
            let bob = w.login("bob", sim::OPEN);
            let carol = w.login("carol", sim::OPEN);
            w.take(bob.conn);
            let mut limited = 0;
            for _ in 0..10 {
                let call = w.dial(&alice, bob.number, None);
                let msgs = w.take(alice.conn);
                if sim::hangups(&msgs) == [(call, HangupReason::RateLimited)] {
                    limited += 1;
                } else {
                    w.send(alice.conn, ClientMsg::HangUp { call });
                }
                w.advance_ms(100);
            }
            // Three rings per minute from one caller; the rest were refused with a reason.
            assert_eq!(incoming(&w.take(bob.conn)), 3);
            assert_eq!(limited, 7);
            // Somebody else still reaches bob.
            let call = w.dial(&carol, bob.number, None);
            assert_eq!(incoming(&w.take(bob.conn)), 1);
            w.send(carol.conn, ClientMsg::HangUp { call });
            // A minute later alice may ring once more.
            w.advance(Duration::from_secs(20));
            w.dial(&alice, bob.number, None);
            assert_eq!(incoming(&w.take(bob.conn)), 1);
            assert_eq!(w.gw.stats().calls_limited, 7);
        }

        #[test]
        fn answered_calls_do_not_count_as_ring_bombing() {
            let mut w = world(CallLimitConfig::default());
            let alice = w.login("alice", sim::OPEN);
            let bob = w.login("bob", sim::OPEN);
            // Twenty calls in a row, each answered and hung up: none is limited.
            for _ in 0..20 {
                let call = w.dial(&alice, bob.number, Some(alice.media()));
                assert_eq!(incoming(&w.take(bob.conn)), 1);
                w.accept(&bob, call, Some(bob.media()));
                w.send(alice.conn, ClientMsg::HangUp { call });
                w.take(alice.conn);
                w.advance_ms(500);
            }
            assert_eq!(w.gw.stats().calls_limited, 0);
        }

        #[test]
        fn many_callers_cannot_keep_one_callee_ringing() {
            let mut w = world(CallLimitConfig {
                rings_per_callee: Pace {
                    burst: 4,
                    every: Duration::from_secs(15),
                },
                ..CallLimitConfig::default()
            });
            let bob = w.login("bob", sim::OPEN);
            let callers: Vec<_> = ["alice", "carol", "dave", "erin", "frank", "grace"]
                .into_iter()
                .map(|u| w.login(u, sim::OPEN))
                .collect();
            w.take(bob.conn);
            let mut rung = 0;
            for c in &callers {
                let call = w.dial(c, bob.number, None);
                rung += incoming(&w.take(bob.conn));
                w.send(c.conn, ClientMsg::HangUp { call });
            }
            assert_eq!(rung, 4);
        }

        #[test]
        fn dials_are_limited_per_caller_before_any_lookup() {
            let mut w = world(CallLimitConfig {
                dials: Pace {
                    burst: 3,
                    every: Duration::from_secs(6),
                },
                ..CallLimitConfig::default()
            });
            let alice = w.login("alice", sim::OPEN);
            w.take(alice.conn);
            w.hold_lookups = true;
            for i in 0..3 {
                w.dial(&alice, &format!("+1555000{}", 5 + i), None);
            }
            let call = w.dial(&alice, "+15550009", None);
            assert_eq!(w.held_lookups.len(), 3, "the 4th dial asked nothing");
            assert_eq!(
                sim::hangups(&w.take(alice.conn)),
                [(call, HangupReason::RateLimited)]
            );
        }

        #[test]
        fn room_invitations_are_bounded_per_organizer() {
            let mut w = world(CallLimitConfig {
                invites: Pace {
                    burst: 4,
                    every: Duration::from_secs(15),
                },
                ..CallLimitConfig::default()
            });
            let alice = w.login("alice", sim::OPEN);
            let others: Vec<_> = ["bob", "carol", "dave", "erin", "frank", "grace"]
                .into_iter()
                .map(|u| w.login(u, sim::OPEN))
                .collect();
            for o in &others {
                w.take(o.conn);
            }
            let numbers: Vec<String> = others.iter().map(|o| o.number.to_string()).collect();
            w.send(
                alice.conn,
                ClientMsg::Conference {
                    tag: 1,
                    numbers: numbers.clone(),
                    media: None,
                },
            );
            let invited: usize = others.iter().map(|o| incoming(&w.take(o.conn))).sum();
            assert_eq!(invited, 4);
            // A room for the two left out invites nobody: rate_limited.
            w.send(
                alice.conn,
                ClientMsg::Conference {
                    tag: 2,
                    numbers: numbers[4..].to_vec(),
                    media: None,
                },
            );
            let msgs = w.take(alice.conn);
            let last = sim::hangups(&msgs).last().copied();
            assert!(
                matches!(last, Some((_, HangupReason::RateLimited))),
                "{msgs:?}"
            );
        }
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
