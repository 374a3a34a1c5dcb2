//! What the control core remembers about each call for the records a carrier keeps: ids that
//! stay unique across restarts and gateways, and one [`CallRecord`] per call, opened when the
//! call gets its id and closed when it ends — answered, unanswered or refused. Closing a
//! record logs one INFO line (ids, numbers, reason, duration) and emits
//! [`Action::CallEnded`](super::gateway::Action::CallEnded), from which `server/` writes the
//! call detail record once the shard has reported the legs' numbers.
//!
//! Sans-IO like the rest of `control/`: times are the core's `Instant`s; `server/` turns them
//! into wall-clock times when it writes.

use std::time::Instant;

use serde::Serialize;

use super::planner::{Path, Plan};
use crate::metrics::Transport;
use crate::relay_spec::SessionId;
use crate::wire::control::{CallId, HangupReason};

/// Ids (call ids, connection ids) are below 2^53, so JSON and JavaScript clients hold them
/// exactly.
pub const ID_LIMIT: u64 = 1 << 53;
/// Bits of an id below its time part.
pub const ID_LOW_BITS: u32 = 22;

/// The first id of a run: the run's start time in seconds since 2025-01-01 UTC in the high 31
/// bits, a random 22-bit start in the low bits; ids then count up from it (a carry runs into
/// the time part). So a restarted gateway's ids are all larger than any its previous run
/// issued — unless that run issued more than 4 million ids (2^22) per second of its uptime,
/// or the clock went back — and two gateways' ids can only meet if they started within the
/// same second and their random starts lie closer than the number of ids they issued
/// (probability about ids issued / 2^21).
pub fn id_base(unix_secs: u64, random: u32) -> u64 {
    const EPOCH_2025: u64 = 1_735_689_600;
    let secs = unix_secs.saturating_sub(EPOCH_2025) % (ID_LIMIT >> ID_LOW_BITS);
    ((secs << ID_LOW_BITS) | u64::from(random & ((1 << ID_LOW_BITS) - 1))).max(1)
}

/// The id after `id`: one more, below [`ID_LIMIT`], never 0.
pub fn next_id(id: u64) -> u64 {
    let n = id.wrapping_add(1) % ID_LIMIT;
    n.max(1)
}

/// How media went in one direction of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionRecord {
    pub path: Path,
    /// What the sender sends on and the receiver receives on.
    pub send: Transport,
    pub recv: Transport,
    pub via_gateway: bool,
}

impl DirectionRecord {
    pub fn of(path: Path) -> Self {
        DirectionRecord {
            path,
            send: path.sender_transport(),
            recv: path.receiver_transport(),
            via_gateway: path.uses_gateway(),
        }
    }
}

/// Which party a relay leg belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    Caller,
    Callee,
    /// A telephone route's IP voice gateway.
    Route,
    /// A conference member other than the organizer.
    Member,
}

/// Everything the core knows about one call when it ends.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    pub call: CallId,
    pub conference: bool,
    pub caller_conn: u64,
    pub caller_user: String,
    pub caller_number: String,
    /// The number dialled (conferences: the numbers invited, comma-separated).
    pub callee_number: String,
    /// The subscriber who was called, when the number is one.
    pub callee_user: Option<String>,
    pub callee_conn: Option<u64>,
    pub set_up: Instant,
    pub answered: Option<Instant>,
    pub ended: Instant,
    /// The reason the call ended, as the caller was told it (for a hang-up, `normal`).
    pub reason: HangupReason,
    /// Who ended it: "caller", "callee", or "gateway".
    pub ended_by: &'static str,
    pub plan: Option<Plan>,
    /// The relay session, when media went through the gateway: `(shard, session)`.
    pub relay: Option<(usize, SessionId)>,
    /// The relay's legs and whose they are.
    pub legs: Vec<(String, Party)>,
}

impl CallRecord {
    pub fn new(call: CallId, now: Instant, caller_conn: u64, user: &str, number: &str) -> Self {
        CallRecord {
            call,
            conference: false,
            caller_conn,
            caller_user: user.into(),
            caller_number: number.into(),
            callee_number: String::new(),
            callee_user: None,
            callee_conn: None,
            set_up: now,
            answered: None,
            ended: now,
            reason: HangupReason::Normal,
            ended_by: "gateway",
            plan: None,
            relay: None,
            legs: Vec::new(),
        }
    }

    pub fn forward(&self) -> Option<DirectionRecord> {
        self.plan.map(|p| DirectionRecord::of(p.forward))
    }

    pub fn backward(&self) -> Option<DirectionRecord> {
        self.plan.map(|p| DirectionRecord::of(p.backward))
    }

    /// Seconds from set-up to end.
    pub fn duration_s(&self) -> f64 {
        self.ended
            .saturating_duration_since(self.set_up)
            .as_secs_f64()
    }

    /// Seconds from answer to end (0 when never answered).
    pub fn talk_s(&self) -> f64 {
        self.answered.map_or(0.0, |a| {
            self.ended.saturating_duration_since(a).as_secs_f64()
        })
    }

    /// The INFO line every ended call gets.
    pub fn log(&self) {
        tracing::info!(
            call = self.call,
            conn = self.caller_conn,
            callee_conn = self.callee_conn,
            from = %self.caller_number,
            to = %self.callee_number,
            reason = self.reason.as_str(),
            ended_by = self.ended_by,
            answered = self.answered.is_some(),
            duration_s = format_args!("{:.3}", self.duration_s()),
            talk_s = format_args!("{:.3}", self.talk_s()),
            conference = self.conference,
            "call ended"
        );
    }
}

/// The core's side: opening, filling and closing records (called from `calls`).
impl super::gateway::Gateway {
    /// A call got its id: its record opens (caller from the session of `conn`).
    pub(crate) fn open_record(&mut self, call: CallId, now: Instant, conn: u64, dialled: &str) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let mut r = CallRecord::new(call, now, conn, &s.user, &s.number);
        r.callee_number = dialled.into();
        self.records.insert(call, r);
    }

    pub(crate) fn record_mut(&mut self, call: CallId) -> Option<&mut CallRecord> {
        self.records.get_mut(&call)
    }

    /// The called party is the subscriber on `conn`.
    pub(crate) fn record_callee(&mut self, call: CallId, conn: u64) {
        let user = self.session(conn).map(|s| s.user.clone());
        if let Some(r) = self.records.get_mut(&call) {
            r.callee_conn = Some(conn);
            r.callee_user = user;
        }
    }

    pub(crate) fn record_answered(&mut self, call: CallId, now: Instant) {
        if let Some(r) = self.records.get_mut(&call) {
            r.answered.get_or_insert(now);
        }
    }

    /// The plan in force and the relay legs, by party.
    pub(crate) fn record_media(
        &mut self,
        call: CallId,
        plan: Option<Plan>,
        relay: Option<usize>,
        legs: Vec<(String, Party)>,
    ) {
        let shard = relay.map(|s| self.shard_id(s));
        if let Some(r) = self.records.get_mut(&call) {
            if plan.is_some() {
                r.plan = plan;
            }
            // The relay in force (none after a re-plan to direct UDP); legs of an earlier
            // relay stay listed (their numbers were gathered when it was retired).
            r.relay = shard.map(|s| (s, call));
            for l in legs {
                if !r.legs.contains(&l) {
                    r.legs.push(l);
                }
            }
        }
    }

    /// A call's relay session goes while the call goes on (a re-plan): `server/` gathers its
    /// legs' numbers for the record before the `RemoveSession` that follows.
    pub(crate) fn retire_relay_legs(&mut self, call: CallId, shard: usize, legs: &[String]) {
        if legs.is_empty() || !self.records.contains_key(&call) {
            return;
        }
        self.actions.push_back(super::gateway::Action::RetireLegs {
            shard: self.shard_id(shard),
            session: call,
            legs: legs.to_vec(),
        });
    }

    /// Room legs: added to the record's (members that left keep theirs: the server gathered
    /// their numbers when it removed them); `shard`, when given, is the room's relay now.
    pub(crate) fn record_room_legs(
        &mut self,
        call: CallId,
        shard: Option<usize>,
        legs: impl IntoIterator<Item = (String, Party)>,
    ) {
        let shard = shard.map(|s| self.shard_id(s));
        if let Some(r) = self.records.get_mut(&call) {
            if let Some(shard) = shard {
                r.relay = Some((shard, call));
            }
            for l in legs {
                if !r.legs.contains(&l) {
                    r.legs.push(l);
                }
            }
        }
    }

    /// The call is over: log it and hand the record to `server/`. `to_caller` / `to_callee`
    /// are what each side was told (`None`: that side ended it, or was not told).
    pub(crate) fn close_record(
        &mut self,
        call: CallId,
        to_caller: Option<HangupReason>,
        to_callee: Option<HangupReason>,
    ) {
        let Some(mut r) = self.records.remove(&call) else {
            return;
        };
        r.ended = self.last_now.unwrap_or(r.set_up).max(r.set_up);
        r.reason = to_caller.or(to_callee).unwrap_or(HangupReason::Normal);
        r.ended_by = match (to_caller, to_callee) {
            (None, Some(_)) => "caller",
            (Some(_), None) => "callee",
            _ => "gateway",
        };
        r.log();
        self.actions
            .push_back(super::gateway::Action::CallEnded(Box::new(r)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fit_javascript_numbers_and_grow_across_restarts() {
        // 2026-12-01T00:00:00Z and one second later.
        let t = 1_796_083_200;
        let a = id_base(t, u32::MAX);
        let b = id_base(t + 1, 0);
        assert!(a < ID_LIMIT && b < ID_LIMIT);
        assert!(b > a, "a run started a second later starts above: {a} {b}");
        // ... even after the first run issued 1000 ids.
        let mut x = a;
        for _ in 0..1000 {
            x = next_id(x);
        }
        assert!(x < b + 1000 && x > a);
        // The random low part spreads gateways started in the same second.
        assert_ne!(id_base(t, 1), id_base(t, 2));
        assert_eq!(id_base(t, 5) >> ID_LOW_BITS, t - 1_735_689_600);
        // The time part lasts until 2093 and wraps rather than overflowing; never 0.
        assert!(id_base(u64::MAX, u32::MAX) < ID_LIMIT);
        assert_eq!(id_base(0, 0), 1);
        assert_eq!(next_id(ID_LIMIT - 1), 1);
        // f64 holds them exactly (what a JavaScript client parses).
        let big = id_base(4_000_000_000, u32::MAX);
        assert_eq!(big as f64 as u64, big);
    }

    use crate::control::gateway::{Action, GatewayConfig};
    use crate::control::planner::Capabilities;
    use crate::control::sim::{self, World};
    use std::time::Duration;

    fn ended(w: &mut World) -> Vec<CallRecord> {
        w.ended.drain(..).map(|(_, r)| r).collect()
    }

    fn caps(send_udp: bool, recv_udp: bool) -> Capabilities {
        Capabilities::new(send_udp, recv_udp)
    }

    #[test]
    fn every_ended_call_closes_one_record() {
        let mut w = World::with_config(GatewayConfig {
            ring_timeout: Duration::from_secs(5),
            ..sim::config()
        });
        let a = w.login_with("alice", caps(false, false));
        let b = w.login_with("bob", caps(true, true));
        // Refused: nobody has the number.
        let refused = w.dial(&a, "+19999", Some(a.media()));
        let r = ended(&mut w);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].call, refused);
        assert_eq!(r[0].reason, HangupReason::NotFound);
        assert_eq!((r[0].ended_by, r[0].answered), ("gateway", None));
        assert_eq!(r[0].callee_number, "+19999");
        assert_eq!(r[0].caller_number, a.number);
        // Unanswered: the ring time-out.
        let unanswered = w.dial(&a, b.number, Some(a.media()));
        w.advance(Duration::from_secs(6));
        let r = ended(&mut w);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].call, r[0].reason),
            (unanswered, HangupReason::NoAnswer)
        );
        assert_eq!(r[0].callee_user.as_deref(), Some("bob"));
        assert!(r[0].answered.is_none());
        // Ended by the time-out itself, not when the clock was next read.
        assert_eq!(r[0].duration_s(), 5.0);
        // Answered after 1 s, talked 2 s, the caller hangs up: relayed (alice has no UDP).
        let call = w.dial(&a, b.number, Some(a.media()));
        w.advance(Duration::from_secs(1));
        w.accept(&b, call, Some(b.media()));
        w.advance(Duration::from_secs(2));
        w.send(a.conn, crate::wire::control::ClientMsg::HangUp { call });
        let r = ended(&mut w);
        assert_eq!(r.len(), 1, "{r:?}");
        let r = &r[0];
        assert_eq!((r.reason, r.ended_by), (HangupReason::Normal, "caller"));
        assert_eq!((r.duration_s(), r.talk_s()), (3.0, 2.0));
        let plan = r.plan.expect("plan");
        assert_eq!(r.forward().unwrap().path, plan.forward);
        assert_eq!(r.forward().unwrap().send, Transport::Tcp);
        assert_eq!(r.relay.map(|(_, s)| s), Some(call));
        let parties: Vec<Party> = r.legs.iter().map(|(_, p)| *p).collect();
        assert!(parties.contains(&Party::Caller), "{:?}", r.legs);
        // No record is left open.
        assert!(w.gw.records.is_empty());
    }

    #[test]
    fn the_record_comes_before_its_relay_session_goes() {
        let mut w = World::new();
        let a = w.login_with("alice", caps(false, false));
        let b = w.login_with("bob", caps(true, true));
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        w.take_shard();
        w.send(b.conn, crate::wire::control::ClientMsg::HangUp { call });
        let acts = w.take_shard();
        let [(before, r)] = &w.ended[..] else {
            panic!("one record: {:?}", w.ended)
        };
        assert_eq!(r.call, call);
        let removed = acts
            .iter()
            .position(|a| matches!(a, Action::RemoveSession { session, .. } if *session == call));
        assert_eq!(removed, Some(*before), "{acts:?}");
    }

    #[test]
    fn a_room_record_keeps_the_legs_of_members_who_left() {
        use crate::wire::control::{ClientMsg, ServerMsg};
        let mut w = World::new();
        let a = w.login_with("alice", caps(true, true));
        let b = w.login_with("bob", caps(true, true));
        let c = w.login_with("carol", caps(true, true));
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 5,
                numbers: vec![b.number.into(), c.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn).first() {
            Some(ServerMsg::Calling { call, .. }) => *call,
            other => panic!("{other:?}"),
        };
        w.accept(&b, room, Some(b.media()));
        w.accept(&c, room, Some(c.media()));
        let carol_leg = crate::control::sim::media_of(&w.take(c.conn))[0]
            .leg
            .clone()
            .expect("carol's leg");
        // Carol leaves first; later alice ends the room.
        w.send(c.conn, ClientMsg::HangUp { call: room });
        assert!(w.ended.is_empty(), "the room goes on");
        w.send(a.conn, ClientMsg::HangUp { call: room });
        w.send(b.conn, ClientMsg::HangUp { call: room });
        let r = ended(&mut w);
        assert_eq!(r.len(), 1, "{r:?}");
        let r = &r[0];
        assert!(r.conference);
        assert_eq!(r.callee_number, format!("{},{}", b.number, c.number));
        assert_eq!(r.legs.len(), 3, "{:?}", r.legs);
        assert!(r.legs.contains(&(carol_leg, Party::Member)), "{:?}", r.legs);
        assert_eq!(
            r.legs.iter().filter(|(_, p)| *p == Party::Caller).count(),
            1
        );
    }

    #[test]
    fn a_replan_keeps_the_retired_legs_in_the_record() {
        use crate::wire::control::ClientMsg;
        let mut w = World::new();
        let mut a = w.login("alice", sim::SEND_ONLY);
        let b = w.login("bob", sim::SEND_ONLY);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        w.take_shard();
        let first: Vec<String> = w.gw.records[&call]
            .legs
            .iter()
            .map(|(l, _)| l.clone())
            .collect();
        assert_eq!(first.len(), 2);
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        a.fw = sim::OPEN;
        w.probe(&a);
        w.probe(&b);
        let cmds = w.take_shard();
        // The old legs are retired (numbers gathered) before their session is removed.
        let [(before, retired)] = &w.retired[..] else {
            panic!("{:?}", w.retired)
        };
        assert_eq!(retired, &first);
        let removed = cmds
            .iter()
            .position(|c| matches!(c, Action::RemoveSession { session, .. } if *session == call));
        assert_eq!(removed, Some(*before), "{cmds:?}");
        w.send(a.conn, ClientMsg::HangUp { call });
        let r = ended(&mut w);
        let names: Vec<&String> = r[0].legs.iter().map(|(l, _)| l).collect();
        for l in &first {
            assert!(names.contains(&l), "{names:?}");
        }
        assert!(
            names.len() > first.len(),
            "the new plan's legs too: {names:?}"
        );
    }

    #[test]
    fn direction_records_follow_the_path() {
        let d = DirectionRecord::of(Path::TcpInUdpOut);
        assert_eq!(
            (d.send, d.recv, d.via_gateway),
            (Transport::Tcp, Transport::Udp, true)
        );
        let d = DirectionRecord::of(Path::DirectUdp);
        assert_eq!(
            (d.send, d.recv, d.via_gateway),
            (Transport::Udp, Transport::Udp, false)
        );
    }
}
