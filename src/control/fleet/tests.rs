//! Two cores of a fleet on one virtual clock: each is a `sim::World`; a tiny in-memory stand-in
//! for Redis carries their `Action::Fleet`s (presence map, message delivery) the way
//! `server::fleet` does with the real one (tested against a real Redis in tests/fleet_calls.rs).

use std::collections::HashMap;

use super::super::sim::{self, Client, OPEN, World};
use super::*;
use crate::control::gateway::Input;
use crate::relay_spec::SessionSpec;

struct Pair {
    a: World,
    b: World,
    /// A third node (idle unless a test uses it).
    c: World,
    /// Nodes killed: their actions are lost, and a message to them reports them down to
    /// the sender (as a publish nobody receives does).
    dead: std::collections::HashSet<NodeId>,
    /// user -> node
    presence: HashMap<String, NodeId>,
    /// Redis answers look-ups with this error while set.
    redis_down: Option<String>,
    /// Every message that crossed "Redis", in order.
    wire: Vec<(NodeId, NodeId, FleetMsg)>,
}

fn pair() -> Pair {
    let mut a = World::new();
    let mut b = World::new();
    let mut c = World::new();
    a.gw.enable_fleet("a".into());
    b.gw.enable_fleet("b".into());
    c.gw.enable_fleet("c".into());
    Pair {
        a,
        b,
        c,
        dead: Default::default(),
        presence: HashMap::new(),
        redis_down: None,
        wire: Vec::new(),
    }
}

impl Pair {
    fn world(&mut self, node: &str) -> &mut World {
        match node {
            "a" => &mut self.a,
            "b" => &mut self.b,
            _ => &mut self.c,
        }
    }

    /// Carries the fleet actions of both cores until none is left.
    fn flow(&mut self) {
        loop {
            let mut moved = false;
            for node in ["a", "b", "c"] {
                if self.dead.contains(node) {
                    continue;
                }
                let w = self.world(node);
                w.pump();
                let (fleet, rest): (Vec<Action>, Vec<Action>) = std::mem::take(&mut w.shard_cmds)
                    .into_iter()
                    .partition(|a| matches!(a, Action::Fleet(_)));
                w.shard_cmds = rest;
                for a in fleet {
                    moved = true;
                    let Action::Fleet(a) = a else { unreachable!() };
                    match a {
                        FleetAction::Online { user } => {
                            // SET … GET: the node named before is told.
                            if let Some(before) = self.presence.insert(user.clone(), node.into())
                                && before != node
                            {
                                self.world(node).input(Input::Fleet(FleetInput::WasOnline {
                                    user,
                                    node: before,
                                }));
                            }
                        }
                        FleetAction::Offline { user } => {
                            if self.presence.get(&user).map(String::as_str) == Some(node) {
                                self.presence.remove(&user);
                            }
                        }
                        FleetAction::Locate { id, user } => {
                            let answer = match &self.redis_down {
                                Some(e) => Err(e.clone()),
                                None => Ok(self.presence.get(&user).cloned()),
                            };
                            self.world(node)
                                .input(Input::Fleet(FleetInput::Located { id, node: answer }));
                        }
                        FleetAction::Send { node: to, .. } if self.dead.contains(&to) => {
                            self.world(node)
                                .input(Input::Fleet(FleetInput::NodeDown { node: to }));
                        }
                        FleetAction::Send { node: to, msg } => {
                            self.wire.push((node.into(), to.clone(), msg.clone()));
                            let from = node.to_owned();
                            self.world(&to)
                                .input(Input::Fleet(FleetInput::Message { from, msg }));
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// alice logs in at a, bob at b (probes through open firewalls).
    fn logged_in(&mut self) -> (Client, Client) {
        let alice = self.a.login("alice", OPEN);
        let bob = self.b.login("bob", OPEN);
        self.flow();
        (alice, bob)
    }

    /// alice (a) dials bob (b); bob is rung and accepts. Returns the call id.
    fn call_up(&mut self, alice: &Client, bob: &Client) -> CallId {
        self.a.send(
            alice.conn,
            ClientMsg::Dial {
                tag: 1,
                number: bob.number.into(),
                media: Some(alice.media()),
            },
        );
        self.flow();
        let msgs = self.a.take(alice.conn);
        let call = msgs
            .iter()
            .find_map(|m| match m {
                ServerMsg::Calling { call, .. } => Some(*call),
                _ => None,
            })
            .expect("calling");
        assert!(
            msgs.iter().any(|m| matches!(m, ServerMsg::Ringing { .. })),
            "{msgs:?}"
        );
        let rung = self.b.take(bob.conn);
        assert!(
            rung.iter().any(|m| matches!(
                m,
                ServerMsg::Incoming { call: c, from_number, .. } if *c == call && from_number == alice.number
            )),
            "{rung:?}"
        );
        self.b.accept(bob, call, Some(bob.media()));
        self.flow();
        call
    }

    /// Node b dies and a learns it.
    fn b_dies(&mut self) {
        self.dead.insert("b".into());
        self.a
            .input(Input::Fleet(FleetInput::NodeDown { node: "b".into() }));
        self.flow();
    }

    /// `user` logs in (again) at `node`; what it is told on logging in is taken.
    fn log_in_again(&mut self, node: &str, user: &'static str) -> Client {
        let c = self.world(node).login(user, OPEN);
        self.flow();
        self.world(node).take(c.conn);
        c
    }

    /// `who`, at `node`, resumes `call` with `token`: what it is told.
    fn resume(&mut self, node: &str, who: &Client, call: CallId, token: String) -> Vec<ServerMsg> {
        self.world(node)
            .send(who.conn, ClientMsg::Resume { call, token });
        self.flow();
        self.world(node).take(who.conn)
    }

    /// `who`, at `node`, hangs up `call`: `to`, at `to_node`, is told it ended normally.
    fn hang_up_reaches(
        &mut self,
        (node, who): (&str, &Client),
        call: CallId,
        (to_node, to): (&str, &Client),
        what: &str,
    ) {
        self.world(node).send(who.conn, ClientMsg::HangUp { call });
        self.flow();
        assert_eq!(
            sim::hangups(&self.world(to_node).take(to.conn)),
            [(call, HangupReason::Normal)],
            "{what}"
        );
    }
}

/// alice (a) calls bob (b), who answers: the pair, both, the call and bob's resume token;
/// everything both phones were told so far is taken.
fn call_with_bobs_token() -> (Pair, Client, Client, CallId, String) {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    let token = token_of(&p.b.take(bob.conn), call);
    p.a.take(alice.conn);
    (p, alice, bob, call, token)
}

/// `call` ends for alice (at a) with `peer_lost` once the resume grace is over, not a
/// millisecond before.
fn peer_lost_after_the_grace(p: &mut Pair, alice: &Client, call: CallId) {
    let grace = p.a.gw.cfg.fleet_resume_grace;
    p.a.advance(grace - std::time::Duration::from_millis(1));
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
    p.a.advance(std::time::Duration::from_millis(2));
    p.flow();
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(call, HangupReason::PeerLost)]
    );
}

/// `msgs` hold the `refused{replaced}` that ends a session replaced by a newer log-in.
fn replaced(msgs: &[ServerMsg]) -> bool {
    msgs.iter().any(|m| {
        matches!(
            m,
            ServerMsg::Refused {
                code: crate::wire::control::ErrorCode::Replaced,
                ..
            }
        )
    })
}

fn installs(w: &World) -> Vec<SessionSpec> {
    w.shard_cmds
        .iter()
        .filter_map(|a| match a {
            Action::InstallSession { spec, .. } => Some(spec.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn presence_follows_log_in_and_log_out() {
    let mut p = pair();
    let (_alice, bob) = p.logged_in();
    assert_eq!(p.presence.get("alice").map(String::as_str), Some("a"));
    assert_eq!(p.presence.get("bob").map(String::as_str), Some("b"));
    p.b.send(bob.conn, ClientMsg::Bye);
    p.flow();
    assert!(!p.presence.contains_key("bob"));
}

#[test]
fn a_call_across_nodes_is_relayed_by_the_callers_node_with_the_call_key() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    // One relay session, on a; b installs nothing.
    let on_a = installs(&p.a);
    assert_eq!(on_a.len(), 1, "{:?}", p.a.shard_cmds);
    assert!(installs(&p.b).is_empty());
    // Both are told a's media addresses; bob's media says call_key, alice's does not.
    let am = sim::media_of(&p.a.take(alice.conn));
    let bm = sim::media_of(&p.b.take(bob.conn));
    assert_eq!((am.len(), bm.len()), (1, 1));
    assert!(!am[0].call_key && bm[0].call_key);
    let gw = sim::addr(sim::GW).ip();
    for m in [&am[0], &bm[0]] {
        if let Some(u) = m.gateway_udp {
            assert_eq!(u.ip(), gw);
        }
    }
    // bob's leg on a's relay is keyed by the call key bob's phone derives, not by anything
    // a could know otherwise; and that key never crossed "Redis" in a form bob's session
    // key could be recovered from (only the derived call key did).
    let leg = bm[0].leg.clone().expect("bob has a leg");
    let spec = on_a[0]
        .legs
        .iter()
        .find(|l| l.name == leg)
        .expect("bob's leg");
    let call_key = crate::control::fleet_call_key(&bob.key, call);
    assert_eq!(spec.key, crate::control::leg_key(&call_key, &leg));
    assert_ne!(spec.key, crate::control::leg_key(&bob.key, &leg));
    let session_hex = hex32(bob.key.as_bytes());
    for (_, _, m) in &p.wire {
        let text = serde_json::to_string(m).unwrap();
        assert!(
            !text.contains(&session_hex),
            "bob's session key crossed: {text}"
        );
    }
    // bob is busy for local calls at b meanwhile.
    let carol = p.b.login("carol", OPEN);
    let c2 = p.b.dial(&carol, bob.number, Some(carol.media()));
    p.flow();
    assert_eq!(
        sim::hangups(&p.b.take(carol.conn)),
        [(c2, HangupReason::Busy)]
    );
    // bob hangs up: alice is told, a forgets the stand-in, b forgets the call.
    p.hang_up_reaches(("b", &bob), call, ("a", &alice), "alice is told");
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    assert!(!p.a.gw.users.contains_key("bob"));
    assert!(p.b.gw.fleet.as_ref().unwrap().hosted.is_empty());
    assert!(p.a.gw.calls.is_empty());
}

#[test]
fn the_callers_hang_up_reaches_the_callee_and_a_second_call_works() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    p.b.take(bob.conn);
    p.hang_up_reaches(("a", &alice), call, ("b", &bob), "bob is told");
    assert!(p.b.gw.fleet.as_ref().unwrap().hosted.is_empty());
    let again = p.call_up(&alice, &bob);
    assert_ne!(again, call);
    assert_eq!(p.a.gw.calls.len(), 1);
}

#[test]
fn offline_busy_rejected_and_redis_down_are_told_clearly() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    // carol is registered but logged in nowhere.
    let c = p.a.dial(&alice, "+15550003", None);
    p.flow();
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(c, HangupReason::Offline)]
    );
    // Redis says b, but she is not there (stale): offline too.
    p.presence.insert("carol".into(), "b".into());
    let c = p.a.dial(&alice, "+15550003", None);
    p.flow();
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(c, HangupReason::Offline)]
    );
    assert!(p.b.gw.fleet.as_ref().unwrap().hosted.is_empty());
    // bob rejects.
    let c = p.a.dial(&alice, bob.number, None);
    p.flow();
    p.b.send(bob.conn, ClientMsg::Reject { call: c });
    p.flow();
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(c, HangupReason::Rejected)]
    );
    assert!(p.b.gw.fleet.as_ref().unwrap().hosted.is_empty());
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    // Redis down: an error the caller can read.
    p.redis_down = Some("connection refused".into());
    let c = p.a.dial(&alice, bob.number, None);
    p.flow();
    let msgs = p.a.take(alice.conn);
    assert_eq!(sim::hangups(&msgs), [(c, HangupReason::Error)]);
    assert!(
        msgs.iter().any(|m| matches!(m, ServerMsg::HangUp { detail: Some(d), .. } if d.contains("presence service is unavailable"))),
        "{msgs:?}"
    );
}

#[test]
fn a_node_that_goes_away_ends_the_calls_on_the_other_side() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    p.a.take(alice.conn);
    p.b.take(bob.conn);
    // b vanishes (kill -9): a learns it from Redis. The call waits for bob to resume it
    // elsewhere; nobody does: it ends once the grace is over.
    p.a.input(Input::Fleet(FleetInput::NodeDown { node: "b".into() }));
    p.a.pump();
    assert!(p.a.take(alice.conn).is_empty());
    p.a.advance(p.a.gw.cfg.fleet_resume_grace + std::time::Duration::from_millis(1));
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(call, HangupReason::PeerLost)]
    );
    assert!(p.a.gw.calls.is_empty());
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    // The other way round: a vanishes, b's callee is told.
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    p.b.take(bob.conn);
    p.b.input(Input::Fleet(FleetInput::NodeDown { node: "a".into() }));
    let msgs = p.b.take(bob.conn);
    assert_eq!(sim::hangups(&msgs), [(call, HangupReason::PeerLost)]);
    assert!(!p.b.gw.fleet_hosts(bob.conn));
}

#[test]
fn a_silent_callee_node_times_the_dial_out() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    // a locates bob on b, but b never answers (its messages are lost).
    p.a.send(
        alice.conn,
        ClientMsg::Dial {
            tag: 1,
            number: bob.number.into(),
            media: None,
        },
    );
    p.a.pump();
    let locate =
        p.a.shard_cmds
            .drain(..)
            .find_map(|a| match a {
                Action::Fleet(FleetAction::Locate { id, .. }) => Some(id),
                _ => None,
            })
            .expect("locate");
    p.a.input(Input::Fleet(FleetInput::Located {
        id: locate,
        node: Ok(Some("b".into())),
    }));
    p.a.shard_cmds.clear();
    p.a.take(alice.conn);
    p.a.advance(p.a.gw.cfg.ring_timeout + std::time::Duration::from_millis(1));
    let msgs = p.a.take(alice.conn);
    assert_eq!(sim::hangups(&msgs).len(), 1, "{msgs:?}");
    assert_eq!(sim::hangups(&msgs)[0].1, HangupReason::Offline);
    assert!(p.a.gw.fleet.as_ref().unwrap().dials.is_empty());
}

#[test]
fn messages_from_the_wrong_node_are_ignored() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.call_up(&alice, &bob);
    p.a.take(alice.conn);
    let vconn = *p.a.gw.fleet.as_ref().unwrap().remote.keys().next().unwrap();
    // A third node claims to speak for bob: nothing happens.
    p.a.input(Input::Fleet(FleetInput::Message {
        from: "c".into(),
        msg: FleetMsg::FromPhone {
            vconn,
            msg: ClientMsg::HangUp { call },
        },
    }));
    p.a.input(Input::Fleet(FleetInput::Message {
        from: "c".into(),
        msg: FleetMsg::PhoneGone { vconn },
    }));
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
    assert_eq!(p.a.gw.calls.len(), 1);
    // And b ignores a ToPhone for its callee from another node.
    p.b.take(bob.conn);
    p.b.input(Input::Fleet(FleetInput::Message {
        from: "c".into(),
        msg: FleetMsg::ToPhone {
            call,
            vconn: 1 << 62,
            msg: ServerMsg::HangUp {
                call,
                reason: HangupReason::Normal,
                detail: None,
            },
        },
    }));
    assert!(p.b.take(bob.conn).is_empty());
    assert!(p.b.gw.fleet_hosts(bob.conn));
}

#[test]
fn dials_waiting_for_the_fleet_count_against_the_callers_calls() {
    let mut p = pair();
    let (alice, _bob) = p.logged_in();
    let max = p.a.gw.cfg.max_calls_per_user;
    // Redis never answers: every dial waits, and counts; one more is refused.
    p.a.take(alice.conn);
    for _ in 0..=max {
        p.a.send(
            alice.conn,
            ClientMsg::Dial {
                tag: 1,
                number: "+15550002".into(),
                media: None,
            },
        );
    }
    let waiting = p.a.gw.fleet.as_ref().unwrap().dials.len();
    assert_eq!(waiting, max);
    assert_eq!(p.a.gw.session(alice.conn).unwrap().lookups, max);
    let refused = sim::hangups(&p.a.take(alice.conn));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, HangupReason::Error);
    // The caller hangs one up: it stops counting.
    let call = *p.a.gw.fleet.as_ref().unwrap().dials.keys().next().unwrap();
    p.a.send(alice.conn, ClientMsg::HangUp { call });
    assert_eq!(p.a.gw.session(alice.conn).unwrap().lookups, waiting - 1);
    assert!(!p.a.gw.fleet_dial_pending(call));
}

#[test]
fn a_conference_rings_members_on_other_nodes_and_relays_on_the_organizers() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let carol = p.a.login("carol", OPEN);
    // Two members on b: each is rung there, and the room waits for both answers.
    let erin = p.b.login("erin", OPEN);
    p.flow();
    p.a.send(
        alice.conn,
        ClientMsg::Conference {
            tag: 3,
            numbers: vec![
                bob.number.into(),
                carol.number.into(),
                "+15550004".into(),
                erin.number.into(),
            ],
            media: Some(alice.media()),
        },
    );
    p.flow();
    let msgs = p.a.take(alice.conn);
    let room = msgs
        .iter()
        .find_map(|m| match m {
            ServerMsg::Calling { call, .. } => Some(*call),
            _ => None,
        })
        .expect("calling");
    assert!(
        msgs.iter().any(|m| matches!(m, ServerMsg::Ringing { .. })),
        "{msgs:?}"
    );
    for (node, c) in [("b", &bob), ("a", &carol), ("b", &erin)] {
        let rung = p.world(node).take(c.conn);
        assert!(
            rung.iter().any(
                |m| matches!(m, ServerMsg::Incoming { call, conference: true, .. } if *call == room)
            ),
            "{rung:?}"
        );
    }
    p.b.accept(&bob, room, Some(bob.media()));
    p.a.accept(&carol, room, Some(carol.media()));
    p.flow();
    // One session on a, with bob's leg keyed by the call key; b installs nothing.
    assert!(installs(&p.b).is_empty());
    let bm = sim::media_of(&p.b.take(bob.conn));
    assert_eq!(bm.len(), 1, "bob's media");
    assert!(bm[0].call_key);
    let leg = bm[0].leg.clone().unwrap();
    let key = crate::control::leg_key(&crate::control::fleet_call_key(&bob.key, room), &leg);
    let has_leg = p.a.shard_cmds.iter().any(|a| match a {
        Action::InstallSession { spec, .. } => {
            spec.legs.iter().any(|l| l.name == leg && l.key == key)
        }
        Action::AddLeg { leg: l, .. } => l.name == leg && l.key == key,
        _ => false,
    });
    assert!(has_leg, "{:?}", p.a.shard_cmds);
    // bob leaves: the room goes on with alice and carol; b forgets it.
    p.b.send(bob.conn, ClientMsg::HangUp { call: room });
    p.flow();
    assert_eq!(p.b.gw.fleet.as_ref().unwrap().hosted.len(), 1, "erin's");
    assert_eq!(p.a.gw.fleet.as_ref().unwrap().remote.len(), 1, "erin's");
    assert_eq!(p.a.gw.calls.len(), 1, "the room goes on");
}

/// A ring for a subscriber whose probe is still running is answered once the probe is over,
/// with its result: the caller's node plans with the callee's real capabilities (here: it
/// receives UDP but cannot send it), as one gateway waits for a running probe before it plans.
/// Before, the ring was answered at once with "unknown" (TCP both ways).
#[test]
fn a_ring_waits_for_the_callees_running_probe() {
    let mut p = pair();
    let alice = p.a.login("alice", OPEN);
    let mut bob = p.b.login_only("bob");
    bob.fw = sim::RECV_ONLY;
    p.flow();
    p.a.send(
        alice.conn,
        ClientMsg::Dial {
            tag: 1,
            number: bob.number.into(),
            media: Some(alice.media()),
        },
    );
    p.flow();
    // b was rung but has not answered: bob's probe is running.
    let rung = |p: &Pair| {
        p.wire
            .iter()
            .filter(|(from, _, m)| from == "b" && matches!(m, FleetMsg::RingOk { .. }))
            .count()
    };
    assert_eq!(rung(&p), 0, "{:?}", p.wire);
    let out = p.b.probe(&bob);
    assert!(out.capabilities.recv_udp && !out.capabilities.send_udp);
    p.flow();
    let probe = p
        .wire
        .iter()
        .find_map(|(_, _, m)| match m {
            FleetMsg::RingOk { probe, .. } => Some(*probe),
            _ => None,
        })
        .expect("the ring is answered once the probe is over");
    assert!(probe.recv_udp && !probe.send_udp, "{probe:?}");
    let call = match p.b.take(bob.conn).iter().find_map(|m| match m {
        ServerMsg::Incoming { call, .. } => Some(*call),
        _ => None,
    }) {
        Some(c) => c,
        None => panic!("bob is rung"),
    };
    p.b.accept(&bob, call, Some(bob.media()));
    p.flow();
    // The plan is Table 1's for these capabilities, as on one gateway.
    let am = sim::media_of(&p.a.take(alice.conn));
    assert_eq!(am.len(), 1);
    let plan = am[0].plan.expect("plan");
    assert_eq!(
        plan,
        crate::control::planner::plan(
            crate::control::planner::Capabilities {
                send_udp: true,
                recv_udp: true,
                nat: false
            },
            out.capabilities
        )
    );
}

/// A subscriber that leaves while a ring waits for its probe: the caller's node is told at
/// once (offline), not left to its ring timer.
#[test]
fn a_ring_waiting_for_a_probe_is_refused_when_the_callee_leaves() {
    let mut p = pair();
    let alice = p.a.login("alice", OPEN);
    let bob = p.b.login_only("bob");
    p.flow();
    let call = p.a.dial(&alice, bob.number, Some(alice.media()));
    p.flow();
    p.b.input(Input::Disconnected { conn: bob.conn });
    p.flow();
    assert!(
        p.wire.iter().any(|(from, _, m)| from == "b"
            && matches!(
                m,
                FleetMsg::RingFailed {
                    reason: HangupReason::Offline,
                    ..
                }
            )),
        "{:?}",
        p.wire
    );
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(call, HangupReason::Offline)]
    );
}

/// bob's `resume_token` for `call`, as b delivered it after bob's `media`.
fn token_of(msgs: &[ServerMsg], call: CallId) -> String {
    msgs.iter()
        .find_map(|m| match m {
            ServerMsg::ResumeToken { call: c, token } if *c == call => Some(token.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no resume token: {msgs:?}"))
}

fn resumed(msgs: &[ServerMsg], call: CallId) -> bool {
    msgs.iter()
        .any(|m| matches!(m, ServerMsg::Resumed { call: c } if *c == call))
}

fn vconn_of(p: &Pair) -> (ConnId, bool, NodeId) {
    let f = p.a.gw.fleet.as_ref().unwrap();
    let (v, r) = f.remote.iter().next().expect("a stand-in");
    (*v, r.orphaned, r.node.clone())
}

/// The gap: b (hosting only bob's control connection) is killed; a notices; bob logs
/// in at c and resumes: the call (relay on a, untouched) goes on, its messages now through c.
#[test]
fn a_callee_whose_node_died_resumes_the_call_through_another_node() {
    let (mut p, alice, _bob, call, token) = call_with_bobs_token();
    let relay = installs(&p.a);
    assert_eq!(relay.len(), 1);
    p.a.shard_cmds.clear();
    // b dies; a learns it.
    p.b_dies();
    assert!(p.a.take(alice.conn).is_empty(), "alice's call goes on");
    assert_eq!(p.a.gw.calls.len(), 1);
    assert!(vconn_of(&p).1, "bob's stand-in waits for him");
    // Within the grace, bob is back on c and resumes.
    p.a.advance(p.a.gw.cfg.fleet_resume_grace / 2);
    let bob_c = p.log_in_again("c", "bob");
    assert!(resumed(&p.resume("c", &bob_c, call, token.clone()), call));
    assert_eq!(vconn_of(&p), (vconn_of(&p).0, false, "c".into()));
    // The relay was neither removed nor re-installed: media never stopped.
    assert!(
        !p.a.shard_cmds.iter().any(|a| matches!(
            a,
            Action::RemoveSession { .. } | Action::InstallSession { .. }
        )),
        "{:?}",
        p.a.shard_cmds
    );
    // The grace passing changes nothing now.
    p.a.advance(p.a.gw.cfg.fleet_resume_grace);
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
    // bob is busy at c for other calls meanwhile.
    assert!(p.c.gw.fleet_hosts(bob_c.conn));
    // Messages flow both ways through c: bob hangs up, alice is told; everything is forgotten.
    p.hang_up_reaches(("c", &bob_c), call, ("a", &alice), "alice is told");
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    assert!(p.c.gw.fleet.as_ref().unwrap().hosted.is_empty());
    assert!(p.a.gw.calls.is_empty());
}

/// The phone is back faster than a notices b is gone: the stand-in simply moves to c, and the
/// later node-down no longer concerns it. alice's hang-up reaches bob at c.
#[test]
fn a_resume_before_the_node_is_known_down_moves_the_call() {
    let (mut p, alice, _bob, call, token) = call_with_bobs_token();
    p.dead.insert("b".into());
    let bob_c = p.log_in_again("c", "bob");
    assert!(resumed(&p.resume("c", &bob_c, call, token), call));
    let (_, orphaned, node) = vconn_of(&p);
    assert!(!orphaned);
    assert_eq!(node, "c");
    // a told b to forget the call; b being dead, a learnt it is down (in the harness, as a
    // publish nobody receives): that ends nothing.
    p.a.input(Input::Fleet(FleetInput::NodeDown { node: "b".into() }));
    p.flow();
    p.a.advance(p.a.gw.cfg.fleet_resume_grace * 2);
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
    assert_eq!(p.a.gw.calls.len(), 1);
    p.hang_up_reaches(("a", &alice), call, ("c", &bob_c), "bob is told at c");
    assert!(p.c.gw.fleet.as_ref().unwrap().hosted.is_empty());
}

/// Someone else holding bob's token cannot take his call: carol's resume at c is refused
/// (`not_permitted`), the call stays bob's, and bob can still resume it.
#[test]
fn a_resume_by_another_user_is_refused() {
    let (mut p, alice, _bob, call, token) = call_with_bobs_token();
    p.b_dies();
    let carol = p.log_in_again("c", "carol");
    let msgs = p.resume("c", &carol, call, token.clone());
    assert_eq!(sim::hangups(&msgs), [(call, HangupReason::NotPermitted)]);
    assert!(!resumed(&msgs, call));
    assert!(!p.c.gw.fleet_hosts(carol.conn));
    assert!(vconn_of(&p).1, "still waiting for bob");
    assert!(p.a.take(alice.conn).is_empty());
    // A token naming another call, and garbage, are refused at c without asking anyone.
    let sent = p.wire.len();
    for bad in [token.clone(), "x".into(), "1.2.c".into(), "9".repeat(400)] {
        p.c.send(
            carol.conn,
            ClientMsg::Resume {
                call: call + 1,
                token: bad,
            },
        );
    }
    p.flow();
    assert_eq!(p.wire.len(), sent);
    let refused = sim::hangups(&p.c.take(carol.conn));
    assert_eq!(refused, [(call + 1, HangupReason::Error); 4]);
    // bob himself still can.
    let bob_c = p.c.login("bob", OPEN);
    p.flow();
    assert!(resumed(&p.resume("c", &bob_c, call, token), call));
}

/// Nobody resumes within the grace: the call ends with `peer_lost` as before, and a late
/// resume is refused clearly.
#[test]
fn a_call_not_resumed_within_the_grace_ends() {
    let (mut p, alice, _bob, call, token) = call_with_bobs_token();
    p.b_dies();
    peer_lost_after_the_grace(&mut p, &alice, call);
    assert!(p.a.gw.calls.is_empty());
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    let bob_c = p.log_in_again("c", "bob");
    let msgs = p.resume("c", &bob_c, call, token);
    assert_eq!(sim::hangups(&msgs), [(call, HangupReason::PeerLost)]);
    assert!(!p.c.gw.fleet_hosts(bob_c.conn));
    // A call that was still ringing is not kept: it ends at once, as before.
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let call = p.a.dial(&alice, bob.number, Some(alice.media()));
    p.flow();
    p.a.take(alice.conn);
    p.a.input(Input::Fleet(FleetInput::NodeDown { node: "b".into() }));
    assert_eq!(
        sim::hangups(&p.a.take(alice.conn)),
        [(call, HangupReason::PeerLost)]
    );
}

/// Only bob's control connection to b is lost (a reset; b is fine): b tells a the phone is
/// gone, a keeps the call, and bob resumes it after logging in again, at b itself or at a
/// (the relaying node: then it hosts bob's side itself, through its own channel).
#[test]
fn a_callee_that_lost_only_its_connection_resumes_on_the_same_or_the_relaying_node() {
    for again in ["b", "a"] {
        let (mut p, alice, bob, call, token) = call_with_bobs_token();
        p.b.input(Input::Disconnected { conn: bob.conn });
        p.flow();
        assert!(p.a.take(alice.conn).is_empty(), "{again}");
        assert!(vconn_of(&p).1, "{again}");
        let bob2 = p.log_in_again(again, "bob");
        assert!(
            resumed(&p.resume(again, &bob2, call, token), call),
            "{again}"
        );
        assert_eq!(vconn_of(&p).2, again);
        // alice hangs up: bob hears it on his new connection.
        p.hang_up_reaches(("a", &alice), call, (again, &bob2), again);
        assert!(p.a.gw.calls.is_empty());
        assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
        assert!(p.world(again).gw.fleet.as_ref().unwrap().hosted.is_empty());
    }
}

/// One session per subscriber fleet-wide: bob logs in at b while logged in at a; a's session
/// is replaced (`refused{replaced}`), presence names b, and a call to bob rings at b.
#[test]
fn a_log_in_on_another_node_replaces_the_older_session() {
    let mut p = pair();
    let alice = p.a.login("alice", OPEN);
    let bob_a = p.a.login("bob", OPEN);
    p.flow();
    p.a.take(bob_a.conn);
    let bob_b = p.b.login("bob", OPEN);
    p.flow();
    let msgs = p.a.take(bob_a.conn);
    assert!(replaced(&msgs), "{msgs:?}");
    assert!(!p.a.gw.users.contains_key("bob"));
    assert_eq!(p.presence.get("bob").map(String::as_str), Some("b"));
    assert!(
        !p.b.take(bob_b.conn)
            .iter()
            .any(|m| matches!(m, ServerMsg::Refused { .. }))
    );
    // A call to bob rings the new session.
    let call = p.a.dial(&alice, bob_b.number, Some(alice.media()));
    p.flow();
    assert!(
        p.b.take(bob_b.conn)
            .iter()
            .any(|m| matches!(m, ServerMsg::Incoming { call: c, .. } if *c == call))
    );
    // Logging in again on the same node is the local replacement, no message to anyone.
    let sent = p.wire.len();
    let _again = p.b.login("carol", OPEN);
    p.flow();
    assert!(
        p.wire[sent..]
            .iter()
            .all(|(_, _, m)| !matches!(m, FleetMsg::LoggedInElsewhere { .. })),
        "{:?}",
        &p.wire[sent..]
    );
}

/// A room member on another node resumes too: bob (b) is in alice's room (a); b dies; bob
/// resumes through c and stays in the room; his leaving through c reaches a.
#[test]
fn a_room_member_whose_node_died_resumes_through_another_node() {
    let mut p = pair();
    let (alice, bob) = p.logged_in();
    let carol = p.a.login("carol", OPEN);
    p.flow();
    p.a.send(
        alice.conn,
        ClientMsg::Conference {
            tag: 3,
            numbers: vec![bob.number.into(), carol.number.into()],
            media: Some(alice.media()),
        },
    );
    p.flow();
    let room =
        p.a.take(alice.conn)
            .iter()
            .find_map(|m| match m {
                ServerMsg::Calling { call, .. } => Some(*call),
                _ => None,
            })
            .expect("calling");
    p.b.take(bob.conn);
    p.b.accept(&bob, room, Some(bob.media()));
    p.a.accept(&carol, room, Some(carol.media()));
    p.flow();
    let token = token_of(&p.b.take(bob.conn), room);
    p.a.take(alice.conn);
    p.b_dies();
    assert!(vconn_of(&p).1, "bob's stand-in waits");
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
    let bob_c = p.c.login("bob", OPEN);
    p.flow();
    assert!(resumed(&p.resume("c", &bob_c, room, token), room));
    p.a.advance(p.a.gw.cfg.fleet_resume_grace * 2);
    p.flow();
    assert!(sim::hangups(&p.c.take(bob_c.conn)).is_empty());
    // bob leaves through c: a takes him out of the room, which goes on with alice and carol.
    p.c.send(bob_c.conn, ClientMsg::HangUp { call: room });
    p.flow();
    assert!(p.c.gw.fleet.as_ref().unwrap().hosted.is_empty());
    assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
    assert_eq!(p.a.gw.calls.len(), 1, "the room goes on");
    assert!(sim::hangups(&p.a.take(alice.conn)).is_empty());
}

proptest::proptest! {
    /// A `resume` token is client input: any text parses or is refused without panicking,
    /// tokens the gateways write parse back to what they say, and nothing longer than the
    /// limit is taken.
    #[test]
    fn resume_tokens_parse_or_are_refused(s in "\\PC{0,400}", call in proptest::prelude::any::<u64>(), k in 0u64..1 << 20, node in "[a-z0-9:.-]{1,40}") {
        if let Some((_, v, n)) = parse_resume_token(&s) {
            proptest::prop_assert!(s.len() <= crate::wire::control::MAX_RESUME_TOKEN);
            proptest::prop_assert!(v > 0 && !n.is_empty());
        }
        let vconn = VIRTUAL_BASE + k;
        let t = resume_token(&node, call, vconn);
        proptest::prop_assert_eq!(parse_resume_token(&t), Some((call, vconn, node.as_str())));
    }
}

/// The caller (a party local to the relaying node) loses only its control connection (a
/// reset; a is fine): the call goes on, and alice resumes it after logging in again, at a
/// itself or at c. The same for a call between two subscribers of a (the one-gateway case of
/// a fleet node).
#[test]
fn a_local_party_that_lost_its_connection_resumes_at_its_node_or_another() {
    // "a-half-open": a has not seen the old connection fail when alice logs in again there:
    // the new log-in replaces the old session (refused{replaced}, closed), the call is kept.
    for again in ["a", "c", "a-half-open"] {
        let half_open = again == "a-half-open";
        let again = if half_open { "a" } else { again };
        let mut p = pair();
        let (alice, bob) = p.logged_in();
        let call = p.call_up(&alice, &bob);
        let token = token_of(&p.a.take(alice.conn), call);
        p.b.take(bob.conn);
        p.a.shard_cmds.clear();
        if !half_open {
            p.a.input(Input::Disconnected { conn: alice.conn });
        }
        p.flow();
        assert!(sim::hangups(&p.b.take(bob.conn)).is_empty(), "{again}");
        assert_eq!(p.a.gw.calls.len(), 1);
        assert_eq!(
            p.presence.contains_key("alice"),
            half_open,
            "not reachable for new calls meanwhile"
        );
        let w = p.world(again);
        let alice2 = w.login("alice", OPEN);
        p.flow();
        if half_open {
            let old = p.a.take(alice.conn);
            assert!(replaced(&old), "{old:?}");
            assert!(sim::hangups(&old).is_empty(), "{old:?}");
            assert!(sim::hangups(&p.b.take(bob.conn)).is_empty());
        }
        p.world(again).take(alice2.conn);
        assert!(
            resumed(&p.resume(again, &alice2, call, token), call),
            "{again}"
        );
        assert!(
            !p.a.shard_cmds
                .iter()
                .any(|a| matches!(a, Action::RemoveSession { .. })),
            "{again}: the relay stays"
        );
        p.a.advance(p.a.gw.cfg.fleet_resume_grace * 2);
        p.flow();
        assert!(sim::hangups(&p.b.take(bob.conn)).is_empty(), "{again}");
        // bob hangs up: alice hears it on her new connection.
        p.hang_up_reaches(("b", &bob), call, (again, &alice2), again);
        assert!(p.a.gw.calls.is_empty());
        assert!(p.a.gw.fleet.as_ref().unwrap().remote.is_empty());
        assert!(!p.a.gw.conns.contains_key(&alice.conn));
    }
    // Two subscribers of a; carol's connection is lost; she is not back in time: bob... the
    // call ends with peer_lost once the grace is over, not before.
    let mut p = pair();
    let alice = p.a.login("alice", OPEN);
    let carol = p.a.login("carol", OPEN);
    p.flow();
    let call = p.a.dial(&alice, carol.number, Some(alice.media()));
    p.a.take(carol.conn);
    p.a.accept(&carol, call, Some(carol.media()));
    p.flow();
    assert_eq!(sim::media_of(&p.a.take(alice.conn)).len(), 1);
    let _ = token_of(&p.a.take(carol.conn), call);
    p.a.input(Input::Disconnected { conn: carol.conn });
    p.flow();
    peer_lost_after_the_grace(&mut p, &alice, call);
    assert!(p.a.gw.calls.is_empty() && !p.a.gw.conns.contains_key(&carol.conn));
}
