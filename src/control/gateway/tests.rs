//! Log-in, presence, connection handling, drain and shutdown, and a property test over random
//! input sequences. Probing and calls are tested in `probe.rs` and `calls.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::control::auth::{Bucket, RateLimitConfig};
use crate::control::sim::{self, World, addr};
use crate::wire::control::{ErrorCode, HangupReason, ServerMsg};

fn refused(msgs: &[ServerMsg]) -> Option<ErrorCode> {
    msgs.iter().find_map(|m| match m {
        ServerMsg::Refused { code, .. } => Some(*code),
        _ => None,
    })
}

fn peer(ip: &str) -> SocketAddr {
    addr(&format!("{ip}:50000"))
}

#[test]
fn login_succeeds_with_welcome_and_probe() {
    let mut w = World::new();
    let (conn, state) = w.hello("alice", peer("198.51.100.1"));
    let (proof, state) = w.prove(conn, state, sim::PASSWORD);
    w.send(conn, proof);
    let msgs = w.take(conn);
    let ServerMsg::Welcome {
        signature,
        user,
        number,
        heartbeat_ms,
        misses,
        observed,
        ..
    } = &msgs[0]
    else {
        panic!("{msgs:?}");
    };
    assert_eq!(
        (user.as_str(), number.as_str(), *heartbeat_ms, *misses),
        ("alice", "+15550001", 10_000, 3)
    );
    assert_eq!(*observed, peer("198.51.100.1"));
    let sig = BASE64.decode(signature).unwrap_or_default();
    assert!(
        state
            .verify_server(&auth::ServerSignature { signature: sig })
            .is_ok()
    );
    assert!(
        matches!(&msgs[1], ServerMsg::ProbeBegin { port_a: 7390, port_b: 7391, token, timeout_ms: 2000, .. } if token.len() == 32)
    );
    let s = w.gw.stats();
    assert_eq!(
        (s.connections, s.logged_in, s.logins, s.probes_running),
        (1, 1, 1, 1)
    );
}

#[test]
fn v4_mapped_peers_are_reported_as_ipv4() {
    let mut w = World::new();
    let (conn, state) = w.hello("alice", addr("[::ffff:198.51.100.1]:50000"));
    let (proof, _) = w.prove(conn, state, sim::PASSWORD);
    w.send(conn, proof);
    let msgs = w.take(conn);
    assert!(
        matches!(&msgs[0], ServerMsg::Welcome { observed, .. } if *observed == peer("198.51.100.1"))
    );
}

#[test]
fn wrong_password_and_unknown_user_are_refused_alike() {
    let mut w = World::new();
    let mut answers = Vec::new();
    for (user, password) in [("alice", "wrong"), ("mallory", sim::PASSWORD)] {
        let (conn, state) = w.hello(user, peer("198.51.100.9"));
        let challenge = w.inbox.get(&conn).and_then(|q| q.front().cloned());
        let Some(ServerMsg::Challenge {
            iterations, salt, ..
        }) = challenge
        else {
            panic!("a challenge for {user}");
        };
        assert_eq!(
            iterations, 1,
            "the decoy advertises the real iteration count"
        );
        assert_eq!(BASE64.decode(salt).map(|s| s.len()).unwrap_or(0), 16);
        let (proof, _) = w.prove(conn, state, password);
        w.send(conn, proof);
        let msgs = w.take(conn);
        assert!(w.closed.contains(&conn));
        answers.push(msgs);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(refused(&answers[0]), Some(ErrorCode::AuthFailed));
    let s = w.gw.stats();
    assert_eq!((s.failed_logins, s.logged_in, s.connections), (2, 0, 0));
}

#[test]
fn replayed_proof_fails() {
    let mut w = World::new();
    let (conn, state) = w.hello("alice", peer("198.51.100.1"));
    let (proof, _) = w.prove(conn, state, sim::PASSWORD);
    w.send(conn, proof.clone());
    assert!(matches!(
        w.take(conn).first(),
        Some(ServerMsg::Welcome { .. })
    ));
    // The same proof again on the logged-in connection: out of order.
    w.send(conn, proof.clone());
    assert!(matches!(
        w.take(conn).as_slice(),
        [ServerMsg::Error {
            code: ErrorCode::BadMessage,
            ..
        }]
    ));
    // An eavesdropper replays it on a new connection after its own hello: new server nonce.
    let (conn2, _) = w.hello("alice", peer("203.0.113.66"));
    w.take(conn2);
    w.send(conn2, proof);
    assert_eq!(refused(&w.take(conn2)), Some(ErrorCode::AuthFailed));
    assert!(w.closed.contains(&conn2));
    // Alice's session is untouched.
    assert_eq!(w.gw.stats().logged_in, 1);
    assert!(!w.closed.contains(&conn));
}

#[test]
fn rate_limiting_per_user_and_per_address() {
    let cfg = GatewayConfig {
        rate_limit: RateLimitConfig {
            per_ip: Some(Bucket {
                burst: 3,
                refill_every: Duration::from_secs(10),
            }),
            per_user_source: Some(Bucket {
                burst: 2,
                refill_every: Duration::from_secs(60),
            }),
            per_user: Some(Bucket {
                burst: 2,
                refill_every: Duration::from_secs(60),
            }),
            max_entries: 100,
            ..RateLimitConfig::default()
        },
        ..sim::config()
    };
    let mut w = World::with_config(cfg);
    // Two guesses at bob from one address: that address is locked out for bob, even with
    // the right password, before any work (no challenge).
    for _ in 0..2 {
        let (conn, state) = w.hello("bob", peer("198.51.100.20"));
        let (proof, _) = w.prove(conn, state, "guess");
        w.send(conn, proof);
        assert_eq!(refused(&w.take(conn)), Some(ErrorCode::AuthFailed));
    }
    let (conn, _) = w.hello("bob", peer("198.51.100.20"));
    let msgs = w.take(conn);
    assert!(
        !msgs
            .iter()
            .any(|m| matches!(m, ServerMsg::Challenge { .. }))
    );
    assert_eq!(refused(&msgs), Some(ErrorCode::RateLimited));
    assert!(w.closed.contains(&conn));
    // Bob's own address has not failed: he logs in, at once.
    let bob = w.login_only("bob");
    assert!(!w.closed.contains(&bob.conn));
    // Others are not touched.
    let alice = w.login_only("alice");
    assert!(!w.closed.contains(&alice.conn));
    // Per address: three attempts for different users from one address, two of them left
    // pending (a pending attempt counts).
    for (i, user) in ["carol", "dave", "erin"].iter().enumerate() {
        let (conn, state) = w.hello(user, peer("203.0.113.7"));
        if i == 0 {
            let (proof, _) = w.prove(conn, state, "guess");
            w.send(conn, proof);
        }
    }
    let (conn, _) = w.hello("frank", peer("203.0.113.7"));
    assert_eq!(refused(&w.take(conn)), Some(ErrorCode::RateLimited));
    assert_eq!(w.gw.stats().rate_limited, 2);
    // Attempts abandoned at the log-in time-out stay charged: 10 s later the address has
    // the one token the bucket refilled, not the two the timed-out attempts held.
    w.advance(Duration::from_secs(10));
    let (conn, _) = w.hello("frank", peer("203.0.113.7"));
    assert!(matches!(
        w.take(conn).first(),
        Some(ServerMsg::Challenge { .. })
    ));
    let (conn, _) = w.hello("grace", peer("203.0.113.7"));
    assert_eq!(refused(&w.take(conn)), Some(ErrorCode::RateLimited));
    // A minute later the guessing address may try bob again.
    w.advance(Duration::from_secs(51));
    let (conn, state) = w.hello("bob", peer("198.51.100.20"));
    let (proof, _) = w.prove(conn, state, sim::PASSWORD);
    w.send(conn, proof);
    assert!(
        w.take(conn)
            .iter()
            .any(|m| matches!(m, ServerMsg::Welcome { .. }))
    );
}

#[test]
fn version_mismatch_and_malformed_hello() {
    let mut w = World::new();
    let conn = w.connect(peer("198.51.100.1"));
    w.send(
        conn,
        ClientMsg::Hello {
            version: VERSION + 1,
            user: "alice".into(),
            nonce: "0123456789abcdef".into(),
            software: None,
        },
    );
    assert_eq!(refused(&w.take(conn)), Some(ErrorCode::Version));
    assert!(w.closed.contains(&conn));
    for (user, nonce) in [("a b", "0123456789abcdef"), ("alice", "short")] {
        let conn = w.connect(peer("198.51.100.1"));
        w.send(
            conn,
            ClientMsg::Hello {
                version: VERSION,
                user: user.into(),
                nonce: nonce.into(),
                software: None,
            },
        );
        assert_eq!(refused(&w.take(conn)), Some(ErrorCode::BadMessage));
        assert!(w.closed.contains(&conn));
    }
    assert_eq!(w.gw.stats().connections, 0);
}

#[test]
fn out_of_order_messages() {
    let mut w = World::new();
    // Before log-in: error and close.
    let conn = w.connect(peer("198.51.100.1"));
    w.send(conn, ClientMsg::Heartbeat { seq: 1 });
    assert!(matches!(
        w.take(conn).as_slice(),
        [ServerMsg::Error {
            code: ErrorCode::BadMessage,
            ..
        }]
    ));
    assert!(w.closed.contains(&conn));
    // A proof before hello.
    let conn = w.connect(peer("198.51.100.1"));
    w.send(
        conn,
        ClientMsg::Proof {
            channel_binding: "biws".into(),
            nonce: "x".into(),
            proof: "x".into(),
        },
    );
    assert!(w.closed.contains(&conn));
    // Hello twice.
    let (conn, _) = w.hello("alice", peer("198.51.100.1"));
    w.take(conn);
    w.send(
        conn,
        ClientMsg::Hello {
            version: VERSION,
            user: "alice".into(),
            nonce: "0123456789abcdef".into(),
            software: None,
        },
    );
    assert!(w.closed.contains(&conn));
    // After log-in: error, connection stays.
    let a = w.login("alice", sim::OPEN);
    for msg in [
        ClientMsg::Accept {
            call: 999,
            media: None,
        },
        ClientMsg::HangUp { call: 999 },
        ClientMsg::Reject { call: 999 },
        ClientMsg::MediaTrouble { call: 999 },
    ] {
        w.send(a.conn, msg);
        assert!(matches!(
            w.take(a.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::UnknownCall,
                ..
            }]
        ));
    }
    w.send(
        a.conn,
        ClientMsg::ProbeReport {
            probe: 99,
            got_a: true,
            got_b: true,
        },
    );
    assert!(matches!(
        w.take(a.conn).as_slice(),
        [ServerMsg::Error {
            code: ErrorCode::BadMessage,
            ..
        }]
    ));
    assert!(!w.closed.contains(&a.conn));
    // Undecodable input: error and close.
    w.input(Input::BadMessage {
        conn: a.conn,
        error: "not JSON\u{7}".into(),
    });
    let msgs = w.take(a.conn);
    assert!(
        matches!(msgs.as_slice(), [ServerMsg::Error { code: ErrorCode::BadMessage, message }] if !message.contains('\u{7}'))
    );
    assert!(w.closed.contains(&a.conn));
    assert_eq!(w.gw.stats().logged_in, 0);
}

#[test]
fn bye_logs_out_and_peers_hear_normal() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    let b = w.login("bob", sim::OPEN);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    w.take(a.conn);
    w.send(b.conn, ClientMsg::Bye);
    assert!(w.closed.contains(&b.conn));
    assert_eq!(
        sim::hangups(&w.take(a.conn)),
        [(call, HangupReason::Normal)]
    );
    assert_eq!(w.gw.active_calls(), 0);
}

#[test]
fn presence_query_tells_who_is_online_by_heart_beats() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    let b = w.login("bob", sim::OPEN);
    let ask = |w: &mut World, numbers: &[&str]| {
        w.send(
            a.conn,
            ClientMsg::PresenceQuery {
                numbers: numbers.iter().map(|n| n.to_string()).collect(),
            },
        );
        w.take(a.conn)
    };
    // bob online, carol never logged in, an unknown number: only bob.
    assert_eq!(
        ask(&mut w, &[b.number, "+15550003", "+19999999"]),
        [ServerMsg::Presence {
            online: vec![b.number.to_string()]
        }]
    );
    // bob stops heart-beating: offline once his misses are up (alice keeps beating).
    for _ in 0..40 {
        w.advance(Duration::from_secs(1));
        w.send(a.conn, ClientMsg::Heartbeat { seq: 1 });
        w.take(a.conn);
    }
    assert!(w.closed.contains(&b.conn), "bob timed out");
    assert_eq!(
        ask(&mut w, &[b.number]),
        [ServerMsg::Presence { online: vec![] }]
    );
    // Too many numbers: refused before any look-up, and the session goes on.
    let many: Vec<String> = (0..33).map(|i| format!("+1555000{i:02}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(matches!(
        ask(&mut w, &many).as_slice(),
        [ServerMsg::Error {
            code: ErrorCode::BadMessage,
            ..
        }]
    ));
    assert!(!w.closed.contains(&a.conn));
}

#[test]
fn new_login_replaces_the_old_session() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    let b = w.login("bob", sim::NAT);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    w.take(b.conn);
    w.take_shard();
    let a2 = w.login_only("alice");
    assert_eq!(refused(&w.take(a.conn)), Some(ErrorCode::Replaced));
    assert!(w.closed.contains(&a.conn));
    assert!(!w.closed.contains(&a2.conn));
    assert_eq!(
        sim::hangups(&w.take(b.conn)),
        [(call, HangupReason::PeerLost)]
    );
    assert!(
        w.take_shard()
            .iter()
            .any(|c| matches!(c, Action::RemoveSession { session, .. } if *session == call))
    );
    assert_eq!(w.gw.stats().logged_in, 2);
}

#[test]
fn login_must_complete_in_time_and_connections_are_bounded() {
    let mut w = World::with_config(GatewayConfig {
        max_connections: 2,
        ..sim::config()
    });
    let c1 = w.connect(peer("198.51.100.1"));
    let c2 = w.connect(peer("198.51.100.2"));
    let c3 = w.connect(peer("198.51.100.3"));
    assert_eq!(refused(&w.take(c3)), Some(ErrorCode::Unavailable));
    assert!(w.closed.contains(&c3));
    assert_eq!(w.gw.stats().connections, 2);
    w.advance(Duration::from_secs(9));
    assert!(!w.closed.contains(&c1));
    w.advance(Duration::from_secs(1));
    assert_eq!(refused(&w.take(c1)), Some(ErrorCode::Timeout));
    assert!(w.closed.contains(&c1) && w.closed.contains(&c2));
    assert_eq!(w.gw.stats().connections, 0);
    assert_eq!(w.gw.poll_timeout(), None);
    // Messages and disconnects for forgotten connections are ignored.
    w.send(c1, ClientMsg::Heartbeat { seq: 1 });
    w.input(Input::Disconnected { conn: c1 });
    assert!(w.take(c1).is_empty());
}

#[test]
fn heartbeats_are_acked_and_silence_is_polled() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    w.take(a.conn);
    w.send(a.conn, ClientMsg::Heartbeat { seq: 5 });
    assert_eq!(w.take(a.conn), [ServerMsg::HeartbeatAck { seq: 5 }]);
    // A client beating every 10 s, a little late each time, is never polled.
    for _ in 0..5 {
        w.advance(Duration::from_millis(10_400));
        w.send(a.conn, ClientMsg::Heartbeat { seq: 6 });
        assert_eq!(w.take(a.conn), [ServerMsg::HeartbeatAck { seq: 6 }]);
    }
    // Silent for one interval (and the jitter slack): polled.
    w.advance(Duration::from_millis(12_499));
    assert!(w.take(a.conn).is_empty());
    w.advance(Duration::from_millis(1));
    assert_eq!(w.take(a.conn), [ServerMsg::Poll { seq: 1 }]);
    // Any message answers the poll.
    w.send(a.conn, ClientMsg::Reprobe);
    w.advance(Duration::from_secs(12));
    assert!(!w.closed.contains(&a.conn));
}

#[test]
fn offline_after_misses_tears_calls_down() {
    let mut w = World::new();
    let a = w.login("alice", sim::SEND_ONLY);
    let b = w.login("bob", sim::SEND_ONLY);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    let installed = w.take_shard();
    assert!(matches!(
        installed.as_slice(),
        [Action::InstallSession { .. }]
    ));
    assert_eq!(w.gw.stats().calls_up, 1);
    w.take(a.conn);
    w.take(b.conn);
    // Bob keeps beating; alice goes silent (last heard when she dialled).
    let mut polls = Vec::new();
    for _ in 0..6 {
        w.advance(Duration::from_secs(5));
        w.send(b.conn, ClientMsg::Heartbeat { seq: 1 });
        w.take(b.conn);
        polls.extend(w.take(a.conn));
    }
    assert_eq!(
        polls,
        [ServerMsg::Poll { seq: 1 }, ServerMsg::Poll { seq: 2 }]
    );
    assert!(!w.closed.contains(&a.conn));
    w.advance(Duration::from_millis(2_500));
    assert_eq!(refused(&w.take(a.conn)), Some(ErrorCode::Timeout));
    assert!(w.closed.contains(&a.conn));
    assert_eq!(
        sim::hangups(&w.take(b.conn)),
        [(call, HangupReason::PeerLost)]
    );
    assert!(matches!(
        w.take_shard().as_slice(),
        [Action::RemoveSession { session, .. }] if *session == call
    ));
    let s = w.gw.stats();
    assert_eq!(
        (s.logged_in, s.calls, s.shard_sessions.iter().sum::<usize>()),
        (1, 0, 0)
    );
}

#[test]
fn disconnect_tears_calls_down() {
    let mut w = World::new();
    let a = w.login("alice", sim::BLOCKED);
    let b = w.login("bob", sim::BLOCKED);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    w.take(a.conn);
    w.take_shard();
    w.input(Input::Disconnected { conn: b.conn });
    assert!(
        !w.closed.contains(&b.conn),
        "the server closed it; no Close action"
    );
    assert_eq!(
        sim::hangups(&w.take(a.conn)),
        [(call, HangupReason::PeerLost)]
    );
    assert_eq!(w.take_shard().len(), 1);
}

#[test]
fn drain_refuses_new_logins_and_calls_but_keeps_calls() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    let b = w.login("bob", sim::OPEN);
    let c = w.login("carol", sim::OPEN);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    w.take(a.conn);
    w.take(b.conn);
    w.input(Input::Drain);
    assert!(w.gw.is_draining() && w.gw.stats().draining);
    // New log-in.
    let (conn, _) = w.hello("dave", peer("198.51.100.4"));
    assert_eq!(refused(&w.take(conn)), Some(ErrorCode::Unavailable));
    // The idle client is told to go elsewhere and closed; those in the call stay.
    let going_away = |msgs: &[ServerMsg]| {
        msgs.iter()
            .filter(|m| matches!(m, ServerMsg::GoingAway { .. }))
            .count()
    };
    assert_eq!(going_away(&w.take(c.conn)), 1);
    assert!(w.closed.contains(&c.conn));
    assert!(!w.closed.contains(&a.conn) && !w.closed.contains(&b.conn));
    // New call (from a client still here for its call in progress).
    let call2 = w.dial(&a, "+15550003", Some(a.media()));
    let msgs = w.take(a.conn);
    assert_eq!(sim::hangups(&msgs), [(call2, HangupReason::Shutdown)]);
    assert_eq!(going_away(&msgs), 0, "a is still in a call");
    // The call in progress continues until hung up; then both go.
    assert_eq!(w.gw.active_calls(), 1);
    w.send(a.conn, ClientMsg::Heartbeat { seq: 1 });
    assert_eq!(going_away(&w.take(a.conn)), 0);
    w.send(a.conn, ClientMsg::HangUp { call });
    let msgs = w.take(b.conn);
    assert_eq!(sim::hangups(&msgs), [(call, HangupReason::Normal)]);
    // `going_away` comes after the `hang_up`, and names the configured gateways (none).
    assert!(matches!(
        msgs.last(),
        Some(ServerMsg::GoingAway { gateways, .. }) if gateways.is_empty()
    ));
    assert_eq!(going_away(&w.take(a.conn)), 1);
    assert!(w.closed.contains(&a.conn) && w.closed.contains(&b.conn));
    assert_eq!(w.gw.active_calls(), 0);
    assert_eq!(w.gw.stats().connections, 0);
}

#[test]
fn draining_names_the_configured_gateways() {
    let mut w = World::with_config(GatewayConfig {
        drain_redirect: vec!["gw2.example:7400".into(), "gw3.example:7400".into()],
        ..GatewayConfig::default()
    });
    let a = w.login("alice", sim::OPEN);
    w.take(a.conn);
    w.input(Input::Drain);
    let msgs = w.take(a.conn);
    assert!(
        matches!(
            msgs.as_slice(),
            [ServerMsg::GoingAway { gateways, message }]
                if gateways == &["gw2.example:7400", "gw3.example:7400"]
                    && message.contains("draining")
        ),
        "{msgs:?}"
    );
    assert!(w.closed.contains(&a.conn));
}

#[test]
fn shutdown_ends_everything() {
    let mut w = World::new();
    let a = w.login("alice", sim::SEND_ONLY);
    let b = w.login("bob", sim::SEND_ONLY);
    let c = w.login("carol", sim::OPEN);
    let call = w.dial(&a, b.number, Some(a.media()));
    w.accept(&b, call, Some(b.media()));
    let ringing = w.dial(&c, "+15550004", Some(c.media()));
    let _ = ringing;
    w.take(a.conn);
    w.take(b.conn);
    w.take(c.conn);
    w.take_shard();
    let pending = w.connect(peer("198.51.100.9"));
    w.input(Input::Shutdown);
    for conn in [a.conn, b.conn] {
        let msgs = w.take(conn);
        assert_eq!(sim::hangups(&msgs), [(call, HangupReason::Shutdown)]);
        assert_eq!(refused(&msgs), Some(ErrorCode::Unavailable));
        assert!(w.closed.contains(&conn));
    }
    assert!(w.closed.contains(&c.conn) && w.closed.contains(&pending));
    assert!(matches!(
        w.take_shard().as_slice(),
        [Action::RemoveSession { .. }]
    ));
    let s = w.gw.stats();
    assert_eq!((s.connections, s.calls, s.probes_running), (0, 0, 0));
    assert_eq!(s.shard_sessions, [0, 0]);
    assert_eq!(w.gw.poll_timeout(), None);
    let late = w.connect(peer("198.51.100.9"));
    assert_eq!(refused(&w.take(late)), Some(ErrorCode::Unavailable));
    assert!(w.closed.contains(&late));
}

#[test]
fn set_config_reloads_presence_and_limits() {
    let mut w = World::new();
    let a = w.login("alice", sim::OPEN);
    w.take(a.conn);
    let cfg = GatewayConfig {
        heartbeat: Duration::from_secs(2),
        heartbeat_slack: Duration::ZERO,
        misses: 2,
        max_connections: 1,
        ..sim::config()
    };
    w.gw.set_config(cfg);
    assert_eq!(w.gw.config().heartbeat, Duration::from_secs(2));
    let c = w.connect(peer("198.51.100.9"));
    assert_eq!(refused(&w.take(c)), Some(ErrorCode::Unavailable));
    w.advance(Duration::from_secs(2));
    assert_eq!(w.take(a.conn), [ServerMsg::Poll { seq: 1 }]);
    w.advance(Duration::from_secs(2));
    assert_eq!(refused(&w.take(a.conn)), Some(ErrorCode::Timeout));
}

#[test]
fn config_is_sanitized() {
    let cfg = GatewayConfig {
        heartbeat: Duration::MAX,
        misses: 0,
        heartbeat_slack: Duration::MAX,
        ring_timeout: Duration::MAX,
        probe_timeout: Duration::ZERO,
        probe_bind_wait: Duration::MAX,
        max_room_size: 1000,
        max_calls_per_user: 0,
        scram_iterations: 0,
        ..sim::config()
    }
    .sanitized();
    assert_eq!(cfg.heartbeat, Duration::from_secs(86_400));
    assert_eq!(cfg.misses, 1);
    assert_eq!(cfg.heartbeat_slack, cfg.heartbeat / 2);
    assert!(cfg.probe_bind_wait <= cfg.probe_timeout);
    assert_eq!((cfg.max_room_size, cfg.max_calls_per_user), (64, 1));
    assert_eq!((cfg.scram_iterations, cfg.auth.decoy_iterations), (1, 1));
    // A gateway with such a config runs without overflow.
    let mut w = World::with_config(GatewayConfig {
        heartbeat: Duration::MAX,
        ring_timeout: Duration::MAX,
        ..sim::config()
    });
    let a = w.login("alice", sim::OPEN);
    w.advance(Duration::from_secs(3600));
    assert!(!w.closed.contains(&a.conn));
}

#[test]
fn debug_output_has_no_secrets() {
    let cfg = GatewayConfig::with_secret([0xab; 32]);
    let text = format!("{cfg:?}");
    assert!(text.contains("redacted"));
    assert!(!text.contains("171, 171"));
}

// ------------------------------------------------------------------ property

/// One random step of the property test. Client indices pick among the clients logged in so
/// far (large ones name connections that do not exist); call indices pick among live calls.
#[derive(Clone, Debug)]
enum Step {
    Connect(u8),
    Msg(u8, ClientMsg),
    /// Accept / reject / hang up / media trouble of a live call.
    CallMsg(u8, u8, u8, Option<SocketAddr>),
    /// Dial (or open a room with) registered numbers.
    Dial(u8, u8, Option<u8>, Option<SocketAddr>),
    /// The client answers its running probe (probe_local, a Binding, and a report).
    ProbeAnswer(u8, bool, bool, bool),
    ForceCaps(u8, u8),
    Bad(u8),
    Disconnect(u8),
    Datagram(bool, Vec<u8>),
    Installed(u8, bool),
    /// A shard reports a binding: of a live call's leg (`kind` 0: over the transport its
    /// delivery awaits, 1: over the other one), a leg of no call (2), or an unknown session (3).
    LegBound(u8, u8, u8, bool),
    /// A call set up in one go (so that many runs have calls with media): a client dials
    /// another (or opens a room with two others), the invitees accept, installs succeed.
    CallUp(u8, u8, Option<u8>, Option<SocketAddr>),
    /// Everybody heart-beats, then time passes (up to 3 s).
    Advance(u16),
    /// Time passes with nobody heart-beating (up to 40 s).
    Silence(u16),
    Login(u8),
    Drain,
}

fn media_addr() -> impl Strategy<Value = Option<SocketAddr>> {
    prop_oneof![
        Just(None),
        Just(Some(addr("192.0.2.77:4000"))),
        Just(Some(addr("0.0.0.0:4000"))),
        Just(Some(addr("10.0.0.1:4000"))),
        Just(Some(addr("[2001:db8::5]:4000"))),
    ]
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    let call = 0u64..12;
    let number = prop_oneof![
        Just("+15550001".to_string()),
        Just("+4930123".to_string()),
        Just("999".to_string()),
        "\\PC{0,12}",
    ];
    prop_oneof![
        (any::<u16>(), "[a-z]{0,6}", "[ -~]{0,20}").prop_map(|(v, user, nonce)| ClientMsg::Hello {
            version: v % 3,
            user,
            nonce,
            software: None
        }),
        ("[ -~]{0,8}", "[ -~]{0,40}", "[ -~]{0,50}").prop_map(|(c, n, p)| ClientMsg::Proof {
            channel_binding: c,
            nonce: n,
            proof: p
        }),
        any::<u64>().prop_map(|seq| ClientMsg::Heartbeat { seq }),
        (0u32..4).prop_map(|probe| ClientMsg::ProbeLocal {
            probe,
            local: addr("192.0.2.9:40000")
        }),
        (0u32..4, any::<bool>(), any::<bool>()).prop_map(|(probe, got_a, got_b)| {
            ClientMsg::ProbeReport {
                probe,
                got_a,
                got_b,
            }
        }),
        Just(ClientMsg::Reprobe),
        (any::<u32>(), number.clone(), media_addr())
            .prop_map(|(tag, number, media)| ClientMsg::Dial { tag, number, media }),
        (
            any::<u32>(),
            proptest::collection::vec(number, 0..20),
            media_addr()
        )
            .prop_map(|(tag, numbers, media)| ClientMsg::Conference {
                tag,
                numbers,
                media
            }),
        (call.clone(), media_addr()).prop_map(|(call, media)| ClientMsg::Accept { call, media }),
        call.clone().prop_map(|call| ClientMsg::Reject { call }),
        call.clone().prop_map(|call| ClientMsg::HangUp { call }),
        call.prop_map(|call| ClientMsg::MediaTrouble { call }),
        Just(ClientMsg::Bye),
        proptest::collection::vec("\\+1555000[0-9]{2}", 0..40)
            .prop_map(|numbers| ClientMsg::PresenceQuery { numbers }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let client = prop_oneof![9 => 0u8..16, 1 => 200u8..=255];
    prop_oneof![
        1 => client.clone().prop_map(Step::Connect),
        4 => (client.clone(), client_msg()).prop_map(|(c, m)| Step::Msg(c, m)),
        10 => (client.clone(), 0u8..4, any::<u8>(), media_addr()).prop_map(|(c, k, i, m)| Step::CallMsg(c, k, i, m)),
        5 => (client.clone(), 0u8..8, proptest::option::of(0u8..8), media_addr()).prop_map(|(c, t, u, m)| Step::Dial(c, t, u, m)),
        3 => (client.clone(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(c, b, ga, gb)| Step::ProbeAnswer(c, b, ga, gb)),
        2 => (client.clone(), 0u8..8).prop_map(|(c, k)| Step::ForceCaps(c, k)),
        1 => client.clone().prop_map(Step::Bad),
        1 => client.clone().prop_map(Step::Disconnect),
        1 => (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(a, d)| Step::Datagram(a, d)),
        4 => (any::<u8>(), prop_oneof![5 => Just(true), 1 => Just(false)]).prop_map(|(o, ok)| Step::Installed(o, ok)),
        3 => (0u8..16, 0u8..16, proptest::option::of(0u8..16), media_addr()).prop_map(|(a, b, c, m)| Step::CallUp(a, b, c, m)),
        6 => (any::<u8>(), any::<u8>(), prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)], any::<bool>())
            .prop_map(|(c, l, k, t)| Step::LegBound(c, l, k, t)),
        4 => (0u16..3000).prop_map(Step::Advance),
        1 => (0u16..40_000).prop_map(Step::Silence),
        2 => (0u8..8).prop_map(Step::Login),
        1 => Just(Step::Drain),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random inputs from random connections, random datagrams, random install results and
    /// random time steps: no panic, the internal invariants hold after every step (checked
    /// by the World), and state stays bounded.
    #[test]
    fn random_inputs_never_panic_and_state_stays_bounded(
        steps in proptest::collection::vec(step(), 1..150),
        shutdown_at in proptest::option::of(0usize..300),
    ) {
        use crate::control::planner::Capabilities;
        let mut w = World::with_config(GatewayConfig {
            max_connections: 10,
            max_calls_per_user: 3,
            max_room_size: 4,
            rate_limit: RateLimitConfig { per_ip: None, per_user: None, per_user_source: None, ..RateLimitConfig::default() },
            ..sim::config()
        });
        w.auto_install = None;
        let mut clients = vec![
            w.login("alice", sim::OPEN),
            w.login("bob", sim::NAT),
            w.login_with("carol", Capabilities::new(false, true)),
        ];
        let conn_of = |clients: &[sim::Client], i: u8| -> ConnId {
            if i >= 200 || clients.is_empty() {
                u64::from(i) + 1000
            } else {
                clients[usize::from(i) % clients.len()].conn
            }
        };
        // Per (connection, call): whether the plan in force there already got its media_ready.
        let mut ready_sent: std::collections::HashMap<(ConnId, u64), bool> = std::collections::HashMap::new();
        for (i, s) in steps.into_iter().enumerate() {
            if shutdown_at == Some(i) {
                w.input(Input::Shutdown);
            }
            match s {
                Step::Connect(i) => {
                    w.connect(peer(&format!("198.51.100.{}", 100 + i % 100)));
                }
                Step::Msg(i, m) => {
                    let conn = conn_of(&clients, i);
                    w.send(conn, m);
                }
                Step::CallMsg(i, kind, pick, media) => {
                    let mut ids: Vec<u64> = w.gw.calls.keys().copied().collect();
                    ids.sort_unstable();
                    let call = ids.get(usize::from(pick) % ids.len().max(1)).copied().unwrap_or(u64::from(pick));
                    // Mostly a party of the call; sometimes anybody.
                    let parties: Vec<ConnId> = match w.gw.calls.get(&call) {
                        Some(crate::control::calls::Call::Pair(p)) => {
                            let mut v = vec![p.caller];
                            if let crate::control::calls::Far::User(c) = p.callee {
                                v.push(c);
                            }
                            v
                        }
                        Some(crate::control::calls::Call::Room(r)) => r.members.keys().copied().collect(),
                        None => Vec::new(),
                    };
                    let conn = if i % 4 != 0 && !parties.is_empty() {
                        parties[usize::from(i) % parties.len()]
                    } else {
                        conn_of(&clients, i)
                    };
                    let msg = match kind {
                        0 => ClientMsg::Accept { call, media },
                        1 => ClientMsg::Reject { call },
                        2 => ClientMsg::HangUp { call },
                        _ => ClientMsg::MediaTrouble { call },
                    };
                    w.send(conn, msg);
                }
                Step::Dial(i, to, also, media) => {
                    let conn = conn_of(&clients, i);
                    let number = |u: u8| sim::USERS[usize::from(u) % sim::USERS.len()].1.to_string();
                    let msg = match also {
                        None => ClientMsg::Dial { tag: 1, number: number(to), media },
                        Some(u) => ClientMsg::Conference { tag: 2, numbers: vec![number(to), number(u)], media },
                    };
                    w.send(conn, msg);
                }
                Step::ProbeAnswer(i, binding, got_a, got_b) => {
                    let conn = conn_of(&clients, i);
                    let running = w.gw.session(conn).and_then(|s| s.probe.as_ref()).map(|p| (p.id, p.token.clone(), p.stage));
                    if let Some((probe, token, stage)) = running {
                        if binding {
                            let mut buf = [0u8; 256];
                            if let Ok(n) = crate::wire::stun::write_binding_request(&mut buf, token.as_bytes(), token.as_bytes(), &[1; 12]) {
                                w.input(Input::ProbeDatagram {
                                    port: ProbePort::A,
                                    src: addr("198.51.100.1:40000"),
                                    data: buf[..n].to_vec(),
                                });
                            }
                        }
                        if stage == crate::control::probe::Stage::Binding {
                            w.send(conn, ClientMsg::ProbeLocal { probe, local: addr("10.1.1.1:40000") });
                        }
                        w.advance(Duration::from_millis(700));
                        w.send(conn, ClientMsg::ProbeReport { probe, got_a, got_b });
                    }
                }
                Step::ForceCaps(i, k) => {
                    let conn = conn_of(&clients, i);
                    w.force_caps(conn, Capabilities::new(k & 1 != 0, k & 2 != 0).with_nat(k & 4 != 0));
                }
                Step::Bad(i) => {
                    let conn = conn_of(&clients, i);
                    w.input(Input::BadMessage { conn, error: "x".into() });
                }
                Step::Disconnect(i) => {
                    let conn = conn_of(&clients, i);
                    w.input(Input::Disconnected { conn });
                }
                Step::Datagram(a, data) => w.input(Input::ProbeDatagram {
                    port: if a { ProbePort::A } else { ProbePort::B },
                    src: addr("203.0.113.9:1234"),
                    data,
                }),
                Step::Installed(o, ok) => {
                    let op = if w.pending_installs.is_empty() {
                        u64::from(o)
                    } else {
                        w.pending_installs.remove(usize::from(o) % w.pending_installs.len())
                    };
                    let result = if ok { Ok(()) } else { Err("full".into()) };
                    w.input(Input::ShardInstalled { op, result });
                }
                Step::Advance(ms) => {
                    for c in clients.clone() {
                        w.send(c.conn, ClientMsg::Heartbeat { seq: 0 });
                    }
                    w.advance(Duration::from_millis(u64::from(ms)));
                }
                Step::Silence(ms) => w.advance(Duration::from_millis(u64::from(ms))),
                Step::Login(u) => {
                    let user = sim::USERS[usize::from(u) % sim::USERS.len()].0;
                    if !w.gw.is_draining() && w.gw.stats().connections < 10 {
                        let c = w.login_only(user);
                        clients.retain(|x| x.number != c.number);
                        clients.push(c);
                    }
                }
                Step::LegBound(c, l, kind, udp) => {
                    use crate::control::calls::Call;
                    use crate::metrics::Transport;
                    // Mostly calls that await a binding.
                    let awaiting = |call: &Call| match call {
                        Call::Pair(p) => !p.ready.awaited.is_empty(),
                        Call::Room(r) => r.members.values().any(|m| !m.ready.awaited.is_empty()),
                    };
                    let mut ids: Vec<u64> = w.gw.calls.iter().filter(|(_, x)| kind != 0 || awaiting(x)).map(|(id, _)| *id).collect();
                    ids.sort_unstable();
                    let call = ids.get(usize::from(c) % ids.len().max(1)).copied().unwrap_or(u64::from(c));
                    // The call's legs, each with the binding it awaits (if any).
                    let legs: Vec<(String, Option<Transport>)> = match w.gw.calls.get(&call) {
                        Some(Call::Pair(p)) => p.relay.iter().flat_map(|r| r.legs.iter()).map(|leg| {
                            let t = p.ready.awaited.iter().find(|a| &a.0 == leg).map(|a| a.1);
                            (leg.clone(), t)
                        }).collect(),
                        Some(Call::Room(r)) => r.members.values().filter_map(|m| {
                            let leg = m.leg.clone()?;
                            Some((leg, m.ready.awaited.first().map(|a| a.1)))
                        }).collect(),
                        None => Vec::new(),
                    };
                    let random_t = if udp { Transport::Udp } else { Transport::Tcp };
                    let other = |t: Transport| if t == Transport::Udp { Transport::Tcp } else { Transport::Udp };
                    let (session, leg, transport) = match (kind, legs.get(usize::from(l) % legs.len().max(1))) {
                        (0, Some((leg, t))) => (call, leg.clone(), t.unwrap_or(random_t)),
                        (1, Some((leg, t))) => (call, leg.clone(), t.map_or(random_t, other)),
                        (3, Some((leg, _))) => (call + 500, leg.clone(), random_t),
                        _ => (call, format!("stray-{l}"), random_t),
                    };
                    w.input(Input::LegBound { session, leg, transport });
                }
                Step::CallUp(from, to, also, media) => {
                    let conn = conn_of(&clients, from);
                    let callee = clients[usize::from(to) % clients.len()].clone();
                    let third = also.map(|u| clients[usize::from(u) % clients.len()].clone());
                    let msg = match &third {
                        None => ClientMsg::Dial { tag: 3, number: callee.number.into(), media },
                        Some(t) => ClientMsg::Conference { tag: 3, numbers: vec![callee.number.into(), t.number.into()], media },
                    };
                    w.send(conn, msg);
                    let call = w.inbox.get(&conn).and_then(|q| q.iter().rev().find_map(|m| match m {
                        ServerMsg::Calling { tag: 3, call } => Some(*call),
                        _ => None,
                    }));
                    if let Some(call) = call {
                        for x in std::iter::once(&callee).chain(third.iter()) {
                            w.send(x.conn, ClientMsg::Accept { call, media });
                        }
                        while let Some(op) = w.pending_installs.pop() {
                            w.input(Input::ShardInstalled { op, result: Ok(()) });
                        }
                    }
                }
                Step::Drain => w.input(Input::Drain),
            }
            // media_ready comes only after media, at most once per plan and party.
            for (conn, q) in w.inbox.iter_mut() {
                for m in q.drain(..) {
                    match m {
                        ServerMsg::Media(i) => {
                            ready_sent.insert((*conn, i.call), false);
                        }
                        ServerMsg::MediaReady { call } => {
                            let sent = ready_sent.get_mut(&(*conn, call));
                            prop_assert_eq!(sent.as_deref(), Some(&false), "media_ready for call {} to {}", call, conn);
                            if let Some(s) = sent {
                                *s = true;
                            }
                        }
                        _ => {}
                    }
                }
            }
            let s = w.gw.stats();
            prop_assert!(s.connections <= 10);
            prop_assert!(s.probes_running <= s.logged_in);
            prop_assert!(s.calls + s.rooms <= 10 * 3);
            prop_assert!(w.gw.timers.len() <= 2 * s.connections + s.calls + s.rooms + 1);
            prop_assert!(w.gw.legs.len() <= 2 * (s.calls) + s.room_members);
        }
        // Everything winds down at shutdown.
        w.input(Input::Shutdown);
        let s = w.gw.stats();
        prop_assert_eq!((s.connections, s.calls, s.rooms, s.probes_running), (0, 0, 0, 0));
        prop_assert_eq!(s.shard_sessions, vec![0, 0]);
        prop_assert!(w.gw.legs.is_empty() && w.gw.ops.is_empty() && w.gw.route_busy.is_empty());
    }
}

/// A log-in bound to TLS (`p=tls-exporter`) succeeds on the connection whose exporter it carries,
/// and is refused, with a reason that names the channel binding, on a connection with another
/// exporter (a TLS-terminating man in the middle) or without TLS.
#[test]
fn tls_channel_binding_is_checked_against_the_connection() {
    let client_side: Vec<u8> = vec![7; 32];
    let login = |w: &mut World, gateway_side: Option<Vec<u8>>| {
        let (conn, state) = w.hello("alice", peer("198.51.100.1"));
        if let Some(exporter) = gateway_side {
            w.input(Input::TlsChannel { conn, exporter });
        }
        let msgs = w.take(conn);
        let Some(ServerMsg::Challenge {
            nonce,
            salt,
            iterations,
        }) = msgs.into_iter().next()
        else {
            panic!("expected a challenge");
        };
        let challenge = auth::Challenge {
            server_nonce: nonce,
            salt: BASE64.decode(salt).unwrap_or_default(),
            iterations,
        };
        let (_, proof) = state
            .respond_bound(sim::PASSWORD, &challenge, Some(&client_side))
            .expect("valid challenge");
        w.send(
            conn,
            ClientMsg::Proof {
                channel_binding: proof.channel_binding,
                nonce: proof.nonce,
                proof: BASE64.encode(&proof.proof),
            },
        );
        (conn, w.take(conn))
    };
    let mut w = World::new();
    let (_, msgs) = login(&mut w, Some(client_side.clone()));
    assert!(
        matches!(msgs.first(), Some(ServerMsg::Welcome { .. })),
        "{msgs:?}"
    );
    for (gateway_side, says) in [
        (Some(vec![8; 32]), "does not match this TLS connection"),
        (None, "this connection to the gateway is not TLS"),
    ] {
        let mut w = World::new();
        let (conn, msgs) = login(&mut w, gateway_side);
        let Some(ServerMsg::Refused { code, message }) = msgs.first() else {
            panic!("{msgs:?}");
        };
        assert_eq!(*code, ErrorCode::AuthFailed);
        assert!(message.contains(says), "{message}");
        assert!(w.closed.contains(&conn));
        assert_eq!(w.gw.stats().logged_in, 0);
    }
}
