//! Toll abuse on telephone routes: a call to an IP voice gateway costs the carrier money per
//! minute and holds the route, so it is bounded in time and must carry media.
//!
//! - **Maximum duration** ([`GatewayConfig::route_max_duration`], default 4 h): the call ends
//!   with `hang_up{time_limit}`.
//! - **Media inactivity** ([`GatewayConfig::route_inactivity`], default 60 s): the server
//!   reports, at a low rate and only while route calls exist, how long each of their relay
//!   legs has received nothing ([`Input::MediaActivity`], read from the shards' snapshots, off
//!   the packet path). A route call whose caller or voice gateway has sent nothing for that
//!   long (counted from the call's start when nothing ever came) ends with `hang_up{no_media}`.
//!
//! [`GatewayConfig::route_max_duration`]: super::gateway::GatewayConfig::route_max_duration
//! [`GatewayConfig::route_inactivity`]: super::gateway::GatewayConfig::route_inactivity
//! [`Input::MediaActivity`]: super::gateway::Input::MediaActivity

use std::time::{Duration, Instant};

use super::calls::{Call, Far};
use super::gateway::{Gateway, Timer, later};
use crate::relay_spec::SessionId;
use crate::wire::control::{CallId, HangupReason};

impl Gateway {
    /// A route call was placed at `now`: its limits start.
    pub(crate) fn watch_route_call(&mut self, now: Instant, call: CallId) {
        self.route_watch.insert(call, now);
        if !self.cfg.route_max_duration.is_zero() {
            self.timers.set(
                Timer::CallLimit(call),
                later(now, self.cfg.route_max_duration),
            );
        }
    }

    /// The call ended: forget its limits.
    pub(crate) fn unwatch_route_call(&mut self, call: CallId) {
        if self.route_watch.remove(&call).is_some() {
            self.timers.cancel(Timer::CallLimit(call));
        }
    }

    pub(crate) fn on_call_limit(&mut self, call: CallId) {
        if self.route_watch.contains_key(&call) {
            tracing::info!(call, "route call reached the maximum duration");
            self.end_pair(call, Some(HangupReason::TimeLimit), None);
        }
    }

    /// The relay sessions whose legs' activity the core wants (shard, session), when media
    /// inactivity is checked at all.
    pub fn watched_sessions(&self) -> Vec<(usize, SessionId)> {
        if self.cfg.route_inactivity.is_zero() {
            return Vec::new();
        }
        self.route_watch
            .keys()
            .filter_map(|call| match self.calls.get(call) {
                Some(Call::Pair(p)) => p.relay.as_ref().map(|r| (self.shard_id(r.shard), *call)),
                _ => None,
            })
            .collect()
    }

    /// How often the server should report activity (a quarter of the time-out, at least 1 s).
    pub fn activity_interval(&self) -> Option<Duration> {
        (!self.cfg.route_inactivity.is_zero())
            .then(|| (self.cfg.route_inactivity / 4).max(Duration::from_secs(1)))
    }

    /// Each leg's time since its last media packet (`None`: none yet), as the shards saw it.
    pub(crate) fn on_media_activity(
        &mut self,
        now: Instant,
        legs: &[(SessionId, String, Option<Duration>)],
    ) {
        let limit = self.cfg.route_inactivity;
        if limit.is_zero() {
            return;
        }
        let mut idle_calls = Vec::new();
        for (session, leg, idle) in legs {
            let Some(&placed) = self.route_watch.get(session) else {
                continue;
            };
            let Some(Call::Pair(p)) = self.calls.get(session) else {
                continue;
            };
            if !matches!(p.callee, Far::Route(_))
                || !p.relay.as_ref().is_some_and(|r| r.legs.contains(leg))
            {
                continue;
            }
            let age = now.saturating_duration_since(placed);
            let idle = idle.unwrap_or(age).min(age);
            if idle >= limit && !idle_calls.contains(session) {
                idle_calls.push(*session);
            }
        }
        for call in idle_calls {
            tracing::info!(
                call,
                idle_s = limit.as_secs(),
                "route call without media: ending it"
            );
            self.end_pair(call, Some(HangupReason::NoMedia), None);
        }
    }

    /// Route calls with limits running.
    pub fn route_calls(&self) -> usize {
        self.route_watch.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::gateway::{Action, GatewayConfig, Input};
    use super::super::sim::{self, World};
    use crate::wire::control::HangupReason;

    /// Advances the clock by `secs`, alice heart-beating every 5 s.
    fn keep_alive(w: &mut World, alice: &sim::Client, secs: u64) {
        for i in 0..secs {
            w.advance(Duration::from_secs(1));
            if i % 5 == 0 {
                w.send(
                    alice.conn,
                    crate::wire::control::ClientMsg::Heartbeat { seq: i },
                );
            }
        }
    }

    /// Alice dials the `+49` route; returns the call and its relay legs.
    fn route_call(w: &mut World) -> (sim::Client, u64, Vec<String>) {
        let alice = w.login("alice", sim::OPEN);
        w.take_shard();
        let call = w.dial(&alice, "+4930123456", Some(alice.media()));
        let legs = w
            .take_shard()
            .into_iter()
            .find_map(|a| match a {
                Action::InstallSession { spec, .. } => {
                    Some(spec.legs.into_iter().map(|l| l.name).collect::<Vec<_>>())
                }
                _ => None,
            })
            .expect("a relay session for the route call");
        w.take(alice.conn);
        (alice, call, legs)
    }

    #[test]
    fn a_route_call_without_media_ends_at_the_inactivity_timeout() {
        let mut w = World::new();
        let (alice, call, legs) = route_call(&mut w);
        assert_eq!(w.gw.watched_sessions().len(), 1);
        assert_eq!(w.gw.activity_interval(), Some(Duration::from_secs(15)));
        // 30 s in, nothing received on either leg: not yet.
        keep_alive(&mut w, &alice, 30);
        let nothing = legs.iter().map(|l| (call, l.clone(), None)).collect();
        w.input(Input::MediaActivity { legs: nothing });
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        // 61 s in: the voice gateway talks, the caller never sent anything.
        keep_alive(&mut w, &alice, 31);
        let report = vec![
            (call, legs[0].clone(), None),
            (
                call,
                legs[legs.len() - 1].clone(),
                Some(Duration::from_millis(20)),
            ),
        ];
        w.input(Input::MediaActivity { legs: report });
        assert_eq!(
            sim::hangups(&w.take(alice.conn)),
            [(call, HangupReason::NoMedia)]
        );
        assert!(
            w.take_shard()
                .iter()
                .any(|a| matches!(a, Action::RemoveSession { session, .. } if *session == call))
        );
        assert!(w.gw.watched_sessions().is_empty());
        assert_eq!(w.gw.route_calls(), 0);
    }

    #[test]
    fn a_route_call_with_media_both_ways_goes_on() {
        let mut w = World::new();
        let (alice, call, legs) = route_call(&mut w);
        keep_alive(&mut w, &alice, 300);
        let talking = legs
            .iter()
            .map(|l| (call, l.clone(), Some(Duration::from_millis(40))))
            .collect();
        w.input(Input::MediaActivity { legs: talking });
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        // Reports about other sessions or unknown legs change nothing.
        w.input(Input::MediaActivity {
            legs: vec![(call + 1000, "x".into(), None), (call, "nope".into(), None)],
        });
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        assert_eq!(w.gw.route_calls(), 1);
    }

    #[test]
    fn a_route_call_ends_at_the_maximum_duration() {
        let mut w = World::with_config(GatewayConfig {
            route_max_duration: Duration::from_secs(600),
            route_inactivity: Duration::ZERO,
            ..sim::config()
        });
        let (alice, call, _) = route_call(&mut w);
        assert!(w.gw.watched_sessions().is_empty(), "inactivity is off");
        assert_eq!(w.gw.activity_interval(), None);
        keep_alive(&mut w, &alice, 599);
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        keep_alive(&mut w, &alice, 2);
        let h = sim::hangups(&w.take(alice.conn));
        assert_eq!(h, [(call, HangupReason::TimeLimit)]);
        assert_eq!(w.gw.route_calls(), 0);
    }

    #[test]
    fn a_route_with_several_ports_carries_that_many_calls_at_once() {
        use crate::store::Store as _;
        let mut w = World::new();
        w.store.del_route("+49").unwrap();
        w.store
            .add_route(&crate::directory::Route {
                prefix: "+49".into(),
                media_addr: sim::addr("203.0.113.50:5004"),
                description: "PSTN, 3 ports".into(),
                ports: 3,
            })
            .unwrap();
        let callers: Vec<_> = ["alice", "bob", "carol", "dave"]
            .into_iter()
            .map(|u| w.login(u, sim::OPEN))
            .collect();
        w.take_shard();
        let route_port = |w: &mut World| {
            w.take_shard().into_iter().find_map(|a| match a {
                Action::InstallSession { spec, .. } => spec
                    .legs
                    .iter()
                    .find_map(|l| l.trusted_source.map(|t| t.port())),
                _ => None,
            })
        };
        let mut calls = Vec::new();
        for c in &callers[..3] {
            calls.push(w.dial(c, "+4930123456", Some(c.media())));
            w.take(c.conn);
        }
        // The fourth caller finds every port taken.
        let fourth = w.dial(&callers[3], "+4930123456", Some(callers[3].media()));
        assert_eq!(
            sim::hangups(&w.take(callers[3].conn)),
            [(fourth, HangupReason::Busy)]
        );
        assert_eq!(w.gw.route_calls(), 3);
        let mut used: Vec<u16> = w.gw.route_busy.keys().map(|a| a.port()).collect();
        used.sort_unstable();
        assert_eq!(used, [5004, 5005, 5006]);
        // One ends: its port is free for the next call.
        w.send(
            callers[1].conn,
            crate::wire::control::ClientMsg::HangUp { call: calls[1] },
        );
        w.take_shard();
        w.dial(&callers[3], "+4930123456", Some(callers[3].media()));
        assert_eq!(route_port(&mut w), Some(5005));
        assert_eq!(w.gw.route_calls(), 3);
    }

    #[test]
    fn a_class_of_service_limits_route_numbers_and_is_refreshed_live() {
        use crate::store::Store as _;
        let mut w = World::new();
        w.store
            .set_allow_prefixes("alice", Some(&["+4930".to_owned()]))
            .unwrap();
        let alice = w.login("alice", sim::OPEN);
        let bob = w.login("bob", sim::OPEN);
        w.take(alice.conn);
        w.take(bob.conn);
        // Berlin yes, Hamburg no; registered users always.
        let berlin = w.dial(&alice, "+4930123456", Some(alice.media()));
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        w.send(
            alice.conn,
            crate::wire::control::ClientMsg::HangUp { call: berlin },
        );
        let hamburg = w.dial(&alice, "+4940123456", Some(alice.media()));
        assert_eq!(
            sim::hangups(&w.take(alice.conn)),
            [(hamburg, HangupReason::NotPermitted)]
        );
        w.dial(&alice, bob.number, None);
        assert!(sim::hangups(&w.take(alice.conn)).is_empty());
        // The operator widens it while alice is logged in: refreshed, not revoked.
        w.store.set_allow_prefixes("alice", None).unwrap();
        keep_alive(&mut w, &alice, 2);
        assert!(!w.closed.contains(&alice.conn));
        let hamburg = w.dial(&alice, "+4940123456", Some(alice.media()));
        let h = sim::hangups(&w.take(alice.conn));
        assert!(!h.contains(&(hamburg, HangupReason::NotPermitted)), "{h:?}");
    }
}
