//! The smaller items of the control-plane attack review (issue 12, item 7): what a room member
//! hears when its leg cannot be added, and what a callee learns about the caller.

use super::{Action, Input};
use crate::control::sim::{self, World};
use crate::wire::control::{ClientMsg, HangupReason, ServerMsg};

#[test]
fn a_room_member_whose_leg_the_shard_refused_is_told_and_leaves() {
    let mut w = World::new();
    let alice = w.login("alice", sim::OPEN);
    let bob = w.login("bob", sim::OPEN);
    let carol = w.login("carol", sim::OPEN);
    w.send(
        alice.conn,
        ClientMsg::Conference {
            tag: 1,
            numbers: vec![bob.number.into(), carol.number.into()],
            media: Some(alice.media()),
        },
    );
    let room = w
        .take(alice.conn)
        .iter()
        .find_map(|m| match m {
            ServerMsg::Calling { call, .. } => Some(*call),
            _ => None,
        })
        .expect("calling");
    // Bob accepts: the session is installed with alice and bob.
    w.accept(&bob, room, Some(bob.media()));
    w.take_shard();
    // Carol joins later, with AddLeg, which the shard refuses.
    w.accept(&carol, room, Some(carol.media()));
    let (session, leg) = w
        .take_shard()
        .into_iter()
        .find_map(|a| match a {
            Action::AddLeg { session, leg, .. } => Some((session, leg.name)),
            _ => None,
        })
        .expect("AddLeg for carol");
    w.take(carol.conn);
    w.input(Input::LegAddFailed {
        session,
        leg,
        error: "leg table full".into(),
    });
    // Carol is told, not left believing she joined; the room goes on for the two others.
    assert_eq!(
        sim::hangups(&w.take(carol.conn)),
        [(room, HangupReason::Error)]
    );
    assert!(sim::hangups(&w.take(alice.conn)).is_empty());
    assert!(sim::hangups(&w.take(bob.conn)).is_empty());
    assert_eq!(w.gw.stats().room_members, 2);
    // A failure for a leg nobody has changes nothing.
    w.input(Input::LegAddFailed {
        session,
        leg: "0".repeat(32),
        error: "x".into(),
    });
    assert_eq!(w.gw.stats().room_members, 2);
}

#[test]
fn the_callee_learns_the_callers_number_never_its_log_in_name() {
    let mut w = World::new();
    let alice = w.login("alice", sim::OPEN);
    let bob = w.login("bob", sim::OPEN);
    w.take(bob.conn);
    w.dial(&alice, bob.number, None);
    let msgs = w.take(bob.conn);
    let Some(ServerMsg::Incoming {
        from_number,
        from_user,
        ..
    }) = msgs
        .into_iter()
        .find(|m| matches!(m, ServerMsg::Incoming { .. }))
    else {
        panic!("no incoming");
    };
    assert_eq!(from_number, alice.number);
    assert_eq!(from_user, alice.number);
    assert!(!from_user.contains("alice"));
}
