//! Directory look-ups as actions and inputs: the core asks ([`Action::Lookup`]), the server
//! answers off the control thread ([`Input::LookupDone`]), and the core goes on where it left
//! off. The core never calls a store, so a slow or remote directory (PostgreSQL in a fleet)
//! delays only the log-ins and dials that wait for it, never another client's heart-beat.
//!
//! What waits, and what happens when the answer comes late:
//! - `hello`: the connection is in `Phase::AwaitingLookup` (the log-in time-out runs); any
//!   message but `bye` meanwhile is a protocol error. An answer for a connection that is gone
//!   or no longer waiting is dropped.
//! - `dial` / `conference`: the client already has `calling{tag, call}`; the pending call
//!   counts against `max_calls_per_user`. A `hang_up` for it cancels it (the answer is then
//!   dropped). An answer for a client that logged out is dropped.
//! - The typical iteration count (decoy challenges, see [`super::auth`]): asked at start and
//!   whenever the directory changes.
//!
//! Bounded: at most [`GatewayConfig::max_pending_lookups`] look-ups wait at once; beyond, a
//! `hello` is refused with `unavailable` and a dial ends with `hang_up{error}`. The server
//! answers every look-up exactly once, so the table empties as answers come.
//!
//! [`Action::Lookup`]: super::gateway::Action::Lookup
//! [`Input::LookupDone`]: super::gateway::Input::LookupDone
//! [`GatewayConfig::max_pending_lookups`]: super::gateway::GatewayConfig::max_pending_lookups

use std::net::SocketAddr;
use std::time::Instant;

use super::gateway::{Action, ConnId, Gateway, Phase, Timer};
use crate::directory::{Answer, LookupError, Query};
use crate::wire::control::{CallId, HangupReason};

/// What a look-up was for.
#[derive(Debug)]
pub(crate) enum Pending {
    /// A `hello`: the connection is in `Phase::AwaitingLookup`.
    Login { conn: ConnId },
    /// A `dial`: `calling{call}` went out.
    Dial {
        conn: ConnId,
        call: CallId,
        media: Option<SocketAddr>,
        number: String,
    },
    /// A `conference` to these (distinct) numbers.
    Invite {
        conn: ConnId,
        call: CallId,
        media: Option<SocketAddr>,
        numbers: Vec<String>,
    },
    /// The typical verifier iteration count.
    Iterations,
    /// What changed in the directory since `Gateway::directory_seq`.
    Changes,
    /// A logged-in user's record, after it changed.
    Recheck { conn: ConnId },
}

impl Gateway {
    /// Asks the directory; `None` when too many look-ups wait already (nothing was asked).
    pub(crate) fn ask(&mut self, query: Query, pending: Pending) -> Option<u64> {
        if self.lookups.len() >= self.cfg.max_pending_lookups {
            tracing::warn!(
                pending = self.lookups.len(),
                "too many directory look-ups waiting: refusing another"
            );
            return None;
        }
        let id = self.next_lookup;
        self.next_lookup += 1;
        if let Pending::Dial { conn, call, .. } | Pending::Invite { conn, call, .. } = &pending {
            self.pending_calls.insert(*call, id);
            if let Some(s) = self.session_mut(*conn) {
                s.lookups += 1;
            }
        }
        self.lookups.insert(id, pending);
        self.actions.push_back(Action::Lookup { id, query });
        Some(id)
    }

    /// A dial or conference of `conn` that waits for the directory is `call`: cancel it (its
    /// answer will be dropped). `false` if there is no such pending call.
    pub(crate) fn cancel_pending_call(&mut self, conn: ConnId, call: CallId) -> bool {
        let Some(&id) = self.pending_calls.get(&call) else {
            return false;
        };
        let mine = matches!(
            self.lookups.get(&id),
            Some(Pending::Dial { conn: c, .. } | Pending::Invite { conn: c, .. }) if *c == conn
        );
        if !mine {
            return false;
        }
        self.pending_calls.remove(&call);
        self.lookups.remove(&id);
        if let Some(s) = self.session_mut(conn) {
            s.lookups = s.lookups.saturating_sub(1);
        }
        tracing::debug!(conn, call, "call withdrawn while its number was looked up");
        // The caller ended it before it rang anyone.
        self.close_record(call, None, Some(HangupReason::Normal));
        true
    }

    pub(crate) fn on_lookup_done(
        &mut self,
        now: Instant,
        id: u64,
        result: Result<Answer, LookupError>,
    ) {
        let Some(pending) = self.lookups.remove(&id) else {
            tracing::debug!(id, "answer to a look-up nobody waits for: dropped");
            return;
        };
        let mismatch = |a: &Answer| LookupError(format!("answer of the wrong kind: {a:?}"));
        match pending {
            Pending::Login { conn } => {
                let r = result.and_then(|a| match a {
                    Answer::Login(s) => Ok(s),
                    other => Err(mismatch(&other)),
                });
                self.hello_answered(now, conn, r);
            }
            Pending::Dial {
                conn,
                call,
                media,
                number,
            } => {
                if !self.call_lookup_done(conn, call) {
                    return;
                }
                let r = result.and_then(|a| match a {
                    Answer::Dial(d) => Ok(d),
                    other => Err(mismatch(&other)),
                });
                self.dial_resolved(now, conn, call, media, &number, r);
            }
            Pending::Invite {
                conn,
                call,
                media,
                numbers,
            } => {
                if !self.call_lookup_done(conn, call) {
                    return;
                }
                let r = result.and_then(|a| match a {
                    Answer::Invite(d) if d.len() == numbers.len() => Ok(d),
                    other => Err(mismatch(&other)),
                });
                self.conference_resolved(now, conn, call, media, &numbers, r);
            }
            Pending::Changes => self.directory_changed(now, result),
            Pending::Recheck { conn } => {
                let r = result.and_then(|a| match a {
                    Answer::Login(s) => Ok(s),
                    other => Err(mismatch(&other)),
                });
                self.rechecked(now, conn, r);
            }
            Pending::Iterations => match result {
                Ok(Answer::TypicalIterations(n)) => {
                    self.typical_iterations = n;
                    self.apply_typical_iterations();
                }
                Ok(other) => tracing::error!(answer = ?other, "answer of the wrong kind"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "typical verifier iteration count unknown: decoys use auth.scram_iterations"
                ),
            },
        }
    }

    /// Book-keeping when a call's look-up is answered; `false` when the caller is gone.
    fn call_lookup_done(&mut self, conn: ConnId, call: CallId) -> bool {
        self.pending_calls.remove(&call);
        match self.session_mut(conn) {
            Some(s) => {
                s.lookups = s.lookups.saturating_sub(1);
                true
            }
            None => {
                tracing::debug!(
                    conn,
                    call,
                    "look-up answered after the caller left: dropped"
                );
                self.close_record(call, None, Some(HangupReason::PeerLost));
                false
            }
        }
    }

    /// Asks the directory what changed (the poll timer).
    pub(crate) fn poll_directory(&mut self) {
        let since = self.directory_seq;
        if self
            .ask(Query::Changes { since }, Pending::Changes)
            .is_none()
        {
            // The table is full: try again at the next poll.
            self.directory_poll_armed = false;
        }
    }

    /// The directory's change log answered: users whose record changed are looked up again
    /// (logged in) or made to start over (logging in). Then the next poll is armed.
    fn directory_changed(&mut self, now: Instant, result: Result<Answer, LookupError>) {
        // Polled while anybody is connected (an idle gateway has nobody to revoke; the first
        // connection asks again).
        if self.conns.is_empty() || self.shut {
            self.directory_poll_armed = false;
        } else {
            self.directory_poll_armed = true;
            let poll = now.checked_add(self.cfg.directory_poll).unwrap_or(now);
            self.timers.set(Timer::DirectoryPoll, poll);
        }
        let users = match result {
            Ok(Answer::Changes { next, users }) => {
                let first = self.directory_seq.is_none();
                self.directory_seq = Some(next);
                if first {
                    return;
                }
                users
            }
            Ok(other) => {
                return tracing::error!(answer = ?other, "answer of the wrong kind");
            }
            Err(e) => return tracing::warn!(error = %e, "directory change log unreadable"),
        };
        if users.is_empty() {
            return;
        }
        tracing::info!(
            users = users.len(),
            "directory changed: re-checking sessions"
        );
        self.ask(Query::TypicalIterations, Pending::Iterations);
        for user in users {
            if let Some(&conn) = self.users.get(&user) {
                let q = Query::Login { user: user.clone() };
                if self.ask(q, Pending::Recheck { conn }).is_none() {
                    // No room to ask: end the session rather than keep one that may be revoked.
                    self.revoke(now, conn, "the account changed; log in again");
                }
            }
            // Log-ins in progress for the user started from the old record: start over.
            let starting: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| match &c.phase {
                    Phase::AwaitingLookup { user: u, .. } => *u == user,
                    Phase::AwaitingProof { attempt, .. } => attempt.user() == user,
                    _ => false,
                })
                .map(|(&k, _)| k)
                .collect();
            for conn in starting {
                self.revoke(now, conn, "the account changed during log-in; log in again");
            }
        }
    }

    /// A changed user's record, as it is now, against the session's.
    fn rechecked(
        &mut self,
        now: Instant,
        conn: ConnId,
        found: Result<Option<crate::directory::Subscriber>, LookupError>,
    ) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let why = match found {
            Err(e) => {
                tracing::warn!(conn, error = %e, "re-check of a changed user failed: next poll");
                // Asked again at the next change; the session stays meanwhile.
                return;
            }
            Ok(None) => "the account was deleted".to_owned(),
            Ok(Some(sub)) if sub.user != s.user => "the account changed".to_owned(),
            Ok(Some(sub)) if sub.verifier.fingerprint() != s.verifier_tag => {
                "the password was changed; log in again".to_owned()
            }
            Ok(Some(sub)) if sub.number != s.number => {
                format!("the number changed to {}; log in again", sub.number)
            }
            Ok(Some(sub)) => {
                // Only the class of service changed: refreshed, the session goes on.
                if sub.allow_prefixes != s.allow_prefixes {
                    tracing::info!(conn, user = %s.user, "class of service refreshed");
                    if let Some(s) = self.session_mut(conn) {
                        s.allow_prefixes = sub.allow_prefixes;
                    }
                }
                return;
            }
        };
        tracing::info!(conn, user = %s.user, reason = %why, "session revoked");
        self.revoke(now, conn, &why);
    }

    /// Ends a session (or a log-in) because its account changed: `refused{revoked}`, its calls
    /// end with `hang_up{peer_lost}` to the others.
    fn revoke(&mut self, now: Instant, conn: ConnId, why: &str) {
        self.refuse(
            now,
            conn,
            crate::wire::control::ErrorCode::Revoked,
            why.to_owned(),
            super::calls::Lost::PeerLost,
        );
    }

    /// Decoy challenges advertise the count most stored verifiers have (item: a verifier keeps
    /// the count it was made with, so after `scram_iterations` changes, advertising the new
    /// count would single out unknown users). Until the directory answered: the configured
    /// count.
    pub(crate) fn apply_typical_iterations(&mut self) {
        self.cfg.auth.decoy_iterations = self
            .typical_iterations
            .filter(|&n| n > 0)
            .unwrap_or(self.cfg.scram_iterations);
    }
}

#[cfg(test)]
mod tests {
    use super::super::gateway::{GatewayConfig, Input};
    use super::super::sim::{self, World};
    use crate::directory::{Answer, LookupError, Query};
    use crate::wire::control::{ClientMsg, ErrorCode, HangupReason, ServerMsg};

    fn refused(msgs: &[ServerMsg]) -> Option<ErrorCode> {
        msgs.iter().find_map(|m| match m {
            ServerMsg::Refused { code, .. } => Some(*code),
            _ => None,
        })
    }

    fn peer() -> std::net::SocketAddr {
        sim::addr("198.51.100.77:40000")
    }

    #[test]
    fn hello_waits_for_the_directory_and_late_answers_are_dropped() {
        let mut w = World::new();
        w.hold_lookups = true;
        let (conn, state) = w.hello("alice", peer());
        // Nothing yet: the directory has not answered.
        assert!(w.take(conn).is_empty());
        assert!(matches!(
            w.held_lookups.last(),
            Some((_, Query::Login { user })) if user == "alice"
        ));
        assert_eq!(
            w.gw.stats().lookups_pending,
            3,
            "log-in, iteration count, change log"
        );
        w.release_lookups();
        let (proof, _) = w.prove(conn, state, sim::PASSWORD);
        w.send(conn, proof);
        assert!(
            w.take(conn)
                .iter()
                .any(|m| matches!(m, ServerMsg::Welcome { .. }))
        );

        // A proof before the challenge is a protocol error, not a crash or a log-in.
        let (conn, _) = w.hello("bob", peer());
        w.send(
            conn,
            ClientMsg::Proof {
                channel_binding: "biws".into(),
                nonce: "x".repeat(40),
                proof: "AAAA".into(),
            },
        );
        assert!(w.closed.contains(&conn));
        // The connection is gone when the answer comes: dropped, nothing sent.
        let (conn2, _) = w.hello("carol", peer());
        w.input(Input::Disconnected { conn: conn2 });
        w.inbox.clear();
        w.release_lookups();
        assert!(w.inbox.values().all(|q| q.is_empty()), "{:?}", w.inbox);
        assert_eq!(w.gw.stats().lookups_pending, 0);
        // An answer nobody asked for changes nothing.
        w.input(Input::LookupDone {
            id: 999_999,
            result: Ok(Answer::Login(None)),
        });
        assert!(w.inbox.values().all(|q| q.is_empty()));
    }

    #[test]
    fn a_failing_directory_refuses_clearly() {
        let mut w = World::new();
        let alice = w.login_only("alice");
        w.hold_lookups = true;
        let call = w.dial(&alice, "+15550002", None);
        let (id, _) = w.held_lookups.pop().expect("dial look-up");
        w.input(Input::LookupDone {
            id,
            result: Err(LookupError("disk on fire".into())),
        });
        assert_eq!(
            sim::hangups(&w.take(alice.conn)),
            [(call, HangupReason::Error)]
        );
        let (conn, _) = w.hello("bob", peer());
        let (id, _) = w.held_lookups.pop().expect("log-in look-up");
        w.input(Input::LookupDone {
            id,
            result: Err(LookupError("disk on fire".into())),
        });
        assert_eq!(refused(&w.take(conn)), Some(ErrorCode::Unavailable));
        // An answer of the wrong kind is an error too, never a log-in.
        let (conn, _) = w.hello("carol", peer());
        let (id, _) = w.held_lookups.pop().expect("log-in look-up");
        w.input(Input::LookupDone {
            id,
            result: Ok(Answer::Dial(None)),
        });
        assert_eq!(refused(&w.take(conn)), Some(ErrorCode::Unavailable));
    }

    #[test]
    fn pending_dials_count_as_calls_can_be_withdrawn_and_are_bounded() {
        let mut w = World::with_config(GatewayConfig {
            max_calls_per_user: 2,
            max_pending_lookups: 2,
            ..sim::config()
        });
        let alice = w.login("alice", sim::OPEN);
        let bob = w.login("bob", sim::OPEN);
        w.take(alice.conn);
        w.take(bob.conn);
        w.hold_lookups = true;
        let c1 = w.dial(&alice, "+15550002", None);
        let c2 = w.dial(&alice, "+15550003", None);
        // Two pending dials: the third is one call too many.
        let c3 = w.dial(&alice, "+15550004", None);
        assert_eq!(
            sim::hangups(&w.take(alice.conn)),
            [(c3, HangupReason::Error)]
        );
        // Withdrawn while pending: its answer is dropped, bob is never rung.
        w.send(alice.conn, ClientMsg::HangUp { call: c1 });
        assert!(w.take(alice.conn).is_empty(), "no unknown_call error");
        // The look-up table is bounded (2): alice's c2 and bob's first dial fill it, bob's
        // second is refused.
        w.dial(&bob, "+15550004", None);
        let b2 = w.dial(&bob, "+15550005", None);
        assert_eq!(sim::hangups(&w.take(bob.conn)), [(b2, HangupReason::Error)]);
        w.release_lookups();
        // c2 reached carol (offline: not logged in), bob's first dial reached dave (offline).
        let a = sim::hangups(&w.take(alice.conn));
        assert_eq!(a, [(c2, HangupReason::Offline)]);
        assert!(
            w.take(bob.conn)
                .iter()
                .all(|m| !matches!(m, ServerMsg::Incoming { .. }))
        );
        assert_eq!(w.gw.stats().lookups_pending, 0);
        assert_eq!(w.gw.stats().calls, 0);
    }

    #[test]
    fn a_dial_answered_after_the_caller_left_is_dropped() {
        let mut w = World::new();
        let alice = w.login("alice", sim::OPEN);
        let bob = w.login("bob", sim::OPEN);
        w.take(bob.conn);
        w.hold_lookups = true;
        w.dial(&alice, "+15550002", None);
        w.input(Input::Disconnected { conn: alice.conn });
        w.release_lookups();
        assert!(
            w.take(bob.conn)
                .iter()
                .all(|m| !matches!(m, ServerMsg::Incoming { .. }))
        );
        assert_eq!(w.gw.stats().calls, 0);
    }

    #[test]
    fn decoys_advertise_the_iteration_count_stored_verifiers_have() {
        // The gateway makes new verifiers with 5000 iterations, but the directory's were made
        // with 1 (the sim's users): an unknown user's challenge must say 1, like theirs.
        let mut w = World::with_config(GatewayConfig {
            scram_iterations: 5000,
            ..sim::config()
        });
        let challenge_iterations = |w: &mut World, user: &str| {
            let (conn, _) = w.hello(user, peer());
            w.take(conn).into_iter().find_map(|m| match m {
                ServerMsg::Challenge { iterations, .. } => Some(iterations),
                _ => None,
            })
        };
        assert_eq!(challenge_iterations(&mut w, "alice"), Some(1));
        assert_eq!(challenge_iterations(&mut w, "mallory"), Some(1));
        // A reload keeps it.
        w.gw.set_config(GatewayConfig {
            scram_iterations: 6000,
            ..sim::config()
        });
        assert_eq!(challenge_iterations(&mut w, "nobody"), Some(1));
    }

    #[test]
    fn conference_invitations_are_looked_up_in_one_go() {
        let mut w = World::new();
        let alice = w.login("alice", sim::OPEN);
        let bob = w.login("bob", sim::OPEN);
        let carol = w.login("carol", sim::OPEN);
        w.hold_lookups = true;
        w.send(
            alice.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec!["+15550002".into(), "+15550003".into(), "+4930111".into()],
                media: None,
            },
        );
        assert_eq!(w.held_lookups.len(), 1);
        assert!(matches!(&w.held_lookups[0].1, Query::Invite { numbers } if numbers.len() == 3));
        w.release_lookups();
        for c in [&bob, &carol] {
            assert!(w.take(c.conn).iter().any(|m| matches!(
                m,
                ServerMsg::Incoming {
                    conference: true,
                    ..
                }
            )));
        }
    }

    fn revoked(msgs: &[ServerMsg]) -> Option<String> {
        msgs.iter().find_map(|m| match m {
            ServerMsg::Refused {
                code: ErrorCode::Revoked,
                message,
            } => Some(message.clone()),
            _ => None,
        })
    }

    #[test]
    fn directory_changes_end_the_affected_sessions_within_a_poll() {
        use crate::store::Store as _;
        let mut w = World::new();
        let alice = w.login("alice", sim::OPEN);
        let bob = w.login("bob", sim::OPEN);
        let carol = w.login("carol", sim::OPEN);
        let dave = w.login("dave", sim::OPEN);
        let call = w.dial(&alice, bob.number, None);
        w.accept(&bob, call, None);
        for c in [&alice, &bob, &carol, &dave] {
            w.take(c.conn);
        }
        // Another user added: nobody is touched.
        let v = crate::directory::Verifier::with_salt("pw", b"0123456789abcdef", 1);
        w.store
            .add_user(&crate::directory::Subscriber {
                user: "zed".into(),
                number: "+15550099".into(),
                verifier: v.clone(),
                allow_prefixes: None,
            })
            .unwrap();
        w.advance_ms(1100);
        assert!(w.closed.is_empty());
        // Bob deleted mid-call: his session ends, alice hears the call end.
        assert!(w.store.del_user("bob").unwrap());
        w.advance_ms(1100);
        let msg = revoked(&w.take(bob.conn)).expect("bob revoked");
        assert!(msg.contains("deleted"), "{msg}");
        assert!(w.closed.contains(&bob.conn));
        assert_eq!(
            sim::hangups(&w.take(alice.conn)),
            [(call, HangupReason::PeerLost)]
        );
        // Carol's password changed; dave's number reassigned (deleted and added again).
        w.store.set_verifier("carol", &v).unwrap();
        let dave_v = w.store.user("dave").unwrap().unwrap().verifier;
        w.store.del_user("dave").unwrap();
        w.store
            .add_user(&crate::directory::Subscriber {
                user: "dave".into(),
                number: "+15550444".into(),
                verifier: dave_v,
                allow_prefixes: None,
            })
            .unwrap();
        w.advance_ms(1100);
        let msg = revoked(&w.take(carol.conn)).expect("carol revoked");
        assert!(msg.contains("password"), "{msg}");
        let msg = revoked(&w.take(dave.conn)).expect("dave revoked");
        assert!(msg.contains("+15550444"), "{msg}");
        // Alice is untouched.
        assert!(!w.closed.contains(&alice.conn));
    }

    #[test]
    fn a_log_in_in_progress_starts_over_when_its_account_changes() {
        use crate::store::Store as _;
        let mut w = World::new();
        let alice = w.login("alice", sim::OPEN);
        let (conn, state) = w.hello("bob", peer());
        w.store
            .set_verifier(
                "bob",
                &crate::directory::Verifier::with_salt("new", b"0123456789abcdef", 1),
            )
            .unwrap();
        w.advance_ms(1100);
        assert!(revoked(&w.take(conn)).is_some());
        let _ = state;
        assert!(!w.closed.contains(&alice.conn));
        // Polling stops when nobody is connected, and starts again with the next connection.
        w.input(Input::Disconnected { conn: alice.conn });
        assert_eq!(w.gw.poll_timeout(), None);
        let (c, _) = w.hello("carol", peer());
        assert!(w.gw.poll_timeout().is_some());
        let _ = c;
    }
}
