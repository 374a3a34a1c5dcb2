//! What every [`Store`] must do, as tests run against each backend: SQLite here (unit
//! tests), PostgreSQL in `tests/fleet_pg.rs` on a private server. One set of checks, so
//! the backends cannot drift apart: same answers, same ordering, same error variants.
//!
//! Test support, compiled into the library so that integration tests can use it; it panics
//! on a broken contract, naming the case and the backend.

use std::net::SocketAddr;

use super::{Route, Store, StoreError, Subscriber, answer};
use crate::directory::{Answer, Destination, Query, Verifier};

/// A contract case: a name and a check run on a new, empty store.
pub type Case = (&'static str, fn(&mut dyn Store) -> Result<(), StoreError>);

/// Every case.
pub const CASES: &[Case] = &[
    ("user_crud", user_crud),
    ("duplicates_and_invalid_input", duplicates_and_invalid_input),
    ("names_are_exact_bytes", names_are_exact_bytes),
    ("routes_longest_prefix", routes_longest_prefix),
    ("verifiers_round_trip", verifiers_round_trip),
    ("typical_iterations", typical_iterations),
    ("classes_of_service", classes_of_service),
    ("route_ports", route_ports),
    ("change_log", change_log),
    ("answers_to_the_core", answers_to_the_core),
];

/// Runs every case, each on a store from `new_store` (which must be empty).
#[track_caller]
pub fn run_all(backend: &str, new_store: &mut dyn FnMut() -> Box<dyn Store>) {
    for (name, case) in CASES {
        let mut store = new_store();
        if let Err(e) = case(&mut *store) {
            panic!("store contract {name} on {backend}: {e}");
        }
    }
}

/// Fixtures, shared with the backends' own tests.
pub(crate) fn verifier(password: &str) -> Verifier {
    Verifier::with_salt(password, b"0123456789abcdef", 1)
}

pub(crate) fn sub(user: &str, number: &str) -> Subscriber {
    Subscriber {
        user: user.into(),
        number: number.into(),
        verifier: verifier(user),
        allow_prefixes: None,
    }
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([192, 0, 2, 1], 9)))
}

pub(crate) fn rt(prefix: &str, media_addr: &str, description: &str) -> Route {
    Route {
        prefix: prefix.into(),
        media_addr: addr(media_addr),
        description: description.into(),
        ports: 1,
    }
}

fn user_crud(s: &mut dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.user("alice")?, None);
    assert!(s.list_users()?.is_empty());
    s.add_user(&sub("alice", "+4930111"))?;
    s.add_user(&sub("bob", "4711"))?;
    assert_eq!(s.user("alice")?, Some(sub("alice", "+4930111")));
    assert_eq!(s.user_by_number("4711")?, Some(sub("bob", "4711")));
    assert_eq!(s.user_by_number("+4930112")?, None);
    let users: Vec<String> = s.list_users()?.into_iter().map(|u| u.user).collect();
    assert_eq!(users, ["alice", "bob"]);
    // A password change replaces the verifier only.
    assert!(s.set_verifier("alice", &verifier("new"))?);
    let alice = s.user("alice")?.expect("alice exists");
    assert_eq!(alice.verifier, verifier("new"));
    assert_eq!(alice.number, "+4930111");
    assert!(!s.set_verifier("nobody", &verifier("x"))?);
    assert!(s.del_user("alice")?);
    assert!(!s.del_user("alice")?);
    assert_eq!(s.user("alice")?, None);
    // The number is free again.
    s.add_user(&sub("carol", "+4930111"))?;
    assert_eq!(
        s.user_by_number("+4930111")?.map(|u| u.user).as_deref(),
        Some("carol")
    );
    Ok(())
}

fn duplicates_and_invalid_input(s: &mut dyn Store) -> Result<(), StoreError> {
    s.add_user(&sub("alice", "+4930111"))?;
    assert!(matches!(
        s.add_user(&sub("alice", "+4930999")),
        Err(StoreError::DuplicateUser { user }) if user == "alice"
    ));
    assert!(matches!(
        s.add_user(&sub("bob", "+4930111")),
        Err(StoreError::DuplicateNumber { number }) if number == "+4930111"
    ));
    // Both taken: the user name is reported.
    assert!(matches!(
        s.add_user(&sub("alice", "+4930111")),
        Err(StoreError::DuplicateUser { .. })
    ));
    assert!(matches!(
        s.add_user(&sub("dave", "030 111")),
        Err(StoreError::InvalidNumber { .. })
    ));
    assert!(matches!(
        s.add_user(&sub("da ve", "+4930333")),
        Err(StoreError::InvalidUser { .. })
    ));
    let mut bad = sub("erin", "+4930444");
    bad.verifier.iterations = 0;
    assert!(matches!(
        s.add_user(&bad),
        Err(StoreError::InvalidVerifier { .. })
    ));
    bad.verifier.iterations = 1;
    bad.verifier.salt = vec![1; 129];
    assert!(matches!(
        s.add_user(&bad),
        Err(StoreError::InvalidVerifier { .. })
    ));
    assert!(matches!(s.user(""), Err(StoreError::InvalidUser { .. })));
    assert!(matches!(
        s.user_by_number("abc"),
        Err(StoreError::InvalidNumber { .. })
    ));
    assert!(matches!(
        s.del_user("a\u{0}b"),
        Err(StoreError::InvalidUser { .. })
    ));
    assert!(matches!(
        s.set_verifier(
            "alice",
            &Verifier {
                iterations: 0,
                ..verifier("x")
            }
        ),
        Err(StoreError::InvalidVerifier { .. })
    ));
    s.add_route(&rt("+49", "192.0.2.2:5004", "Germany"))?;
    assert!(matches!(
        s.add_route(&rt("+49", "192.0.2.9:5004", "again")),
        Err(StoreError::DuplicateRoute { prefix }) if prefix == "+49"
    ));
    assert!(matches!(
        s.add_route(&rt("+49x", "192.0.2.9:5004", "")),
        Err(StoreError::InvalidPrefix { .. })
    ));
    assert!(matches!(
        s.add_route(&rt("+1", "0.0.0.0:5004", "")),
        Err(StoreError::InvalidMediaAddr { .. })
    ));
    assert!(matches!(
        s.add_route(&rt("+1", "192.0.2.1:5004", "bell\u{7}")),
        Err(StoreError::InvalidDescription { .. })
    ));
    assert!(matches!(
        s.del_route("+ 49"),
        Err(StoreError::InvalidPrefix { .. })
    ));
    assert!(matches!(
        s.route_for("+49 30"),
        Err(StoreError::InvalidNumber { .. })
    ));
    // Nothing half-written by the refusals.
    assert_eq!(s.list_users()?, [sub("alice", "+4930111")]);
    assert_eq!(s.list_routes()?, [rt("+49", "192.0.2.2:5004", "Germany")]);
    Ok(())
}

fn names_are_exact_bytes(s: &mut dyn Store) -> Result<(), StoreError> {
    // SCRAM compares bytes: "Alice" is another user, and listings sort byte-wise.
    s.add_user(&sub("alice", "+4930111"))?;
    s.add_user(&sub("Alice", "+4930222"))?;
    s.add_user(&sub("émile", "+4930333"))?;
    let longest = "x".repeat(crate::directory::MAX_USER_LEN);
    s.add_user(&sub(&longest, "12345678901234567890"))?;
    s.add_user(&sub("zoë-o'brien;--", "+123456789012345"))?;
    let users: Vec<String> = s.list_users()?.into_iter().map(|u| u.user).collect();
    let mut sorted = users.clone();
    sorted.sort();
    assert_eq!(users, sorted, "byte-wise order");
    assert_eq!(users[0], "Alice");
    assert_eq!(s.user("ALICE")?, None);
    assert_eq!(
        s.user("émile")?.map(|u| u.number).as_deref(),
        Some("+4930333")
    );
    assert_eq!(
        s.user(&longest)?.map(|u| u.number).as_deref(),
        Some("12345678901234567890")
    );
    assert_eq!(
        s.user_by_number("+123456789012345")?
            .map(|u| u.user)
            .as_deref(),
        Some("zoë-o'brien;--")
    );
    Ok(())
}

fn routes_longest_prefix(s: &mut dyn Store) -> Result<(), StoreError> {
    s.add_route(&rt("+", "192.0.2.1:5004", "world"))?;
    s.add_route(&rt("+49", "192.0.2.2:5004", "Germany"))?;
    s.add_route(&rt("+4930", "[2001:db8::3]:5004", "Berlin"))?;
    s.add_route(&rt("0", "192.0.2.4:5004", "local trunk"))?;
    s.add_route(&rt("12345678901234567890", "192.0.2.5:5004", "one long"))?;
    let via = |s: &dyn Store, n: &str| -> Result<Option<String>, StoreError> {
        Ok(s.route_for(n)?.map(|r| r.description))
    };
    assert_eq!(via(s, "+493012345")?.as_deref(), Some("Berlin"));
    assert_eq!(via(s, "+4930")?.as_deref(), Some("Berlin"));
    assert_eq!(via(s, "+4989123")?.as_deref(), Some("Germany"));
    assert_eq!(via(s, "+1555")?.as_deref(), Some("world"));
    assert_eq!(via(s, "0301234")?.as_deref(), Some("local trunk"));
    assert_eq!(via(s, "4711")?, None);
    assert_eq!(via(s, "12345678901234567890")?.as_deref(), Some("one long"));
    assert_eq!(via(s, "1234567890123456789")?, None);
    assert_eq!(
        s.route_for("+493012345")?.map(|r| r.media_addr),
        Some(addr("[2001:db8::3]:5004"))
    );
    let prefixes: Vec<String> = s.list_routes()?.into_iter().map(|r| r.prefix).collect();
    assert_eq!(prefixes, ["+", "+49", "+4930", "0", "12345678901234567890"]);
    assert!(s.del_route("+4930")?);
    assert!(!s.del_route("+4930")?);
    assert_eq!(via(s, "+493012345")?.as_deref(), Some("Germany"));
    // A description of the longest length, with quotes and non-ASCII text, comes back as is.
    let mut d = String::from("Zürich 'O\"Brien' ");
    d.push_str(&"d".repeat(super::MAX_DESCRIPTION_LEN - d.len()));
    s.add_route(&rt("+41", "192.0.2.6:5004", &d))?;
    assert_eq!(s.route_for("+4144")?.map(|r| r.description), Some(d));
    Ok(())
}

fn verifiers_round_trip(s: &mut dyn Store) -> Result<(), StoreError> {
    // Binary salts (NUL and high bytes), the longest salt, the largest iteration count.
    let mut v = verifier("pw");
    v.salt = (0..=127u8).map(|b| b.wrapping_mul(2)).collect();
    v.iterations = u32::MAX;
    let a = Subscriber {
        user: "alice".into(),
        number: "+4930111".into(),
        verifier: v.clone(),
        allow_prefixes: None,
    };
    s.add_user(&a)?;
    assert_eq!(s.user("alice")?, Some(a.clone()));
    let mut w = verifier("other");
    w.salt = vec![0];
    w.iterations = 1;
    assert!(s.set_verifier("alice", &w)?);
    assert_eq!(s.user("alice")?.map(|u| u.verifier), Some(w));
    Ok(())
}

fn typical_iterations(s: &mut dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.typical_iterations()?, None);
    for (i, (user, iters)) in [
        ("a", 4096),
        ("b", 4096),
        ("c", 10_000),
        ("d", 10_000),
        ("e", 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let mut u = sub(user, &format!("{}", 100 + i));
        u.verifier.iterations = iters;
        s.add_user(&u)?;
    }
    // A tie goes to the larger count.
    assert_eq!(s.typical_iterations()?, Some(10_000));
    assert!(s.del_user("d")?);
    assert_eq!(s.typical_iterations()?, Some(4096));
    Ok(())
}

fn classes_of_service(s: &mut dyn Store) -> Result<(), StoreError> {
    // Stored with the user, in the order given; None (any route) and empty (none) differ.
    let mut a = sub("alice", "+4930111");
    a.allow_prefixes = Some(vec!["+4930".into(), "+1".into(), "4711".into()]);
    s.add_user(&a)?;
    s.add_user(&sub("bob", "+4930222"))?;
    let mut c = sub("carol", "+4930333");
    c.allow_prefixes = Some(vec![]);
    s.add_user(&c)?;
    assert_eq!(s.user("alice")?, Some(a.clone()));
    assert_eq!(s.user_by_number("+4930111")?, Some(a.clone()));
    assert_eq!(s.user("bob")?.map(|u| u.allow_prefixes), Some(None));
    assert_eq!(s.user("carol")?, Some(c.clone()));
    assert_eq!(s.list_users()?, [a.clone(), sub("bob", "+4930222"), c]);
    // Replaced alone: the verifier and number stay.
    let p = vec!["+".to_owned()];
    assert!(s.set_allow_prefixes("bob", Some(&p))?);
    let bob = s.user("bob")?.expect("bob exists");
    assert_eq!(bob.allow_prefixes, Some(p));
    assert_eq!(bob.verifier, verifier("bob"));
    assert_eq!(bob.number, "+4930222");
    assert!(s.set_allow_prefixes("bob", Some(&[]))?);
    assert_eq!(s.user("bob")?.and_then(|u| u.allow_prefixes), Some(vec![]));
    assert!(s.set_allow_prefixes("alice", None)?);
    assert_eq!(s.user("alice")?.map(|u| u.allow_prefixes), Some(None));
    assert!(!s.set_allow_prefixes("nobody", None)?);
    assert_eq!(s.user("nobody")?, None);
    // Bad classes are refused before they are stored: a comma would split a prefix.
    assert!(matches!(
        s.set_allow_prefixes("bob", Some(&["+49,1".to_owned()])),
        Err(StoreError::InvalidPrefix { .. })
    ));
    assert!(matches!(
        s.set_allow_prefixes("bob", Some(&vec!["+1".to_owned(); 65])),
        Err(StoreError::InvalidPrefix { .. })
    ));
    let mut bad = sub("dave", "+4930444");
    bad.allow_prefixes = Some(vec!["".into()]);
    assert!(matches!(
        s.add_user(&bad),
        Err(StoreError::InvalidPrefix { .. })
    ));
    assert_eq!(s.user("dave")?, None);
    assert_eq!(s.user("bob")?.and_then(|u| u.allow_prefixes), Some(vec![]));
    Ok(())
}

fn route_ports(s: &mut dyn Store) -> Result<(), StoreError> {
    let mut wide = rt("+49", "192.0.2.2:5004", "Germany, 30 lines");
    wide.ports = 30;
    let mut most = rt("+1", "192.0.2.3:64512", "the most");
    most.ports = 1024;
    s.add_route(&wide)?;
    s.add_route(&most)?;
    s.add_route(&rt("4711", "192.0.2.4:5004", "one"))?;
    assert_eq!(
        s.list_routes()?,
        [
            most.clone(),
            wide.clone(),
            rt("4711", "192.0.2.4:5004", "one")
        ]
    );
    assert_eq!(s.route_for("+4930123")?, Some(wide));
    assert_eq!(s.route_for("+15550001")?, Some(most));
    // Out of range, or running past port 65535: refused, nothing stored.
    for (ports, port) in [(0, 5004), (1025, 5004), (2, 65_535)] {
        let mut bad = rt("+33", "192.0.2.5:5004", "bad");
        bad.ports = ports;
        bad.media_addr.set_port(port);
        assert!(matches!(
            s.add_route(&bad),
            Err(StoreError::InvalidMediaAddr { .. })
        ));
    }
    assert_eq!(s.route_for("+3312345")?, None);
    Ok(())
}

fn change_log(s: &mut dyn Store) -> Result<(), StoreError> {
    // None: the current position, and no users (a gateway starting up ends nobody).
    let (start, none) = s.changes_since(None)?;
    assert!(none.is_empty());
    assert_eq!(s.changes_since(Some(start))?, (start, vec![]));
    s.add_user(&sub("alice", "+4930111"))?;
    s.add_user(&sub("bob", "+4930222"))?;
    let (p1, users) = s.changes_since(Some(start))?;
    assert_eq!(users, ["alice", "bob"]);
    assert!(p1 > start);
    assert_eq!(s.changes_since(None)?, (p1, vec![]));
    assert_eq!(s.changes_since(Some(p1))?, (p1, vec![]));
    // Each kind of write, each user once however often it changed.
    assert!(s.set_verifier("bob", &verifier("new"))?);
    assert!(s.set_verifier("bob", &verifier("newer"))?);
    assert!(s.set_allow_prefixes("alice", Some(&["+49".to_owned()]))?);
    let (p2, users) = s.changes_since(Some(p1))?;
    assert_eq!(users, ["bob", "alice"]);
    assert!(p2 > p1);
    assert!(s.del_user("alice")?);
    let (p3, users) = s.changes_since(Some(p2))?;
    assert_eq!(users, ["alice"]);
    assert!(p3 > p2);
    // Writes that change nobody, and routes, are not subscribers' changes.
    assert!(!s.del_user("alice")?);
    assert!(!s.set_verifier("nobody", &verifier("x"))?);
    assert!(!s.set_allow_prefixes("nobody", None)?);
    s.add_route(&rt("+49", "192.0.2.2:5004", "Germany"))?;
    assert!(s.add_user(&sub("bob", "+4930999")).is_err());
    assert_eq!(s.changes_since(Some(p3))?, (p3, vec![]));
    // An old position still sees everything after it.
    let (p, users) = s.changes_since(Some(start))?;
    assert_eq!(p, p3);
    assert_eq!(users, ["alice", "bob"]);
    // At most 1000 rows per call; the position says where to go on.
    for i in 0..1100 {
        assert!(s.set_verifier("bob", &verifier(&format!("p{i}")))?);
    }
    let (end, _) = s.changes_since(None)?;
    let (p4, users) = s.changes_since(Some(p3))?;
    assert_eq!(users, ["bob"]);
    assert!(p3 < p4 && p4 < end, "{p3} < {p4} < {end}");
    assert_eq!(s.changes_since(Some(p4))?, (end, vec!["bob".to_owned()]));
    assert_eq!(s.changes_since(Some(end))?, (end, vec![]));
    Ok(())
}

fn answers_to_the_core(s: &mut dyn Store) -> Result<(), StoreError> {
    s.add_user(&sub("alice", "+4930111"))?;
    s.add_route(&rt("+49", "192.0.2.2:5004", "Germany"))?;
    let ask = |q: Query| answer(&*s, &q);
    assert_eq!(
        ask(Query::Login {
            user: "alice".into()
        })?,
        Answer::Login(Some(sub("alice", "+4930111")))
    );
    // Malformed input is "nobody", not an error.
    assert_eq!(
        ask(Query::Login {
            user: "bad name".into()
        })?,
        Answer::Login(None)
    );
    assert_eq!(
        ask(Query::Dial {
            number: "+4930111".into()
        })?,
        Answer::Dial(Some(Destination::User {
            user: "alice".into(),
            number: "+4930111".into()
        }))
    );
    assert_eq!(
        ask(Query::Invite {
            numbers: vec!["+4930112".into(), "nonsense".into(), "4711".into()]
        })?,
        Answer::Invite(vec![
            Some(Destination::Route(rt("+49", "192.0.2.2:5004", "Germany"))),
            None,
            None
        ])
    );
    assert_eq!(
        ask(Query::TypicalIterations)?,
        Answer::TypicalIterations(Some(1))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_keeps_the_contract() {
        run_all("SQLite", &mut || {
            Box::new(super::super::SqliteStore::open_in_memory().expect("in-memory database"))
        });
    }

    /// The contract can fail: a store that forgets the longest prefix is caught.
    #[test]
    fn the_contract_catches_a_store_that_breaks_it() {
        struct ShortestPrefix(super::super::SqliteStore);
        impl Store for ShortestPrefix {
            fn add_user(&mut self, s: &Subscriber) -> Result<(), StoreError> {
                self.0.add_user(s)
            }
            fn del_user(&mut self, u: &str) -> Result<bool, StoreError> {
                self.0.del_user(u)
            }
            fn set_verifier(&mut self, u: &str, v: &Verifier) -> Result<bool, StoreError> {
                self.0.set_verifier(u, v)
            }
            fn user(&self, u: &str) -> Result<Option<Subscriber>, StoreError> {
                self.0.user(u)
            }
            fn user_by_number(&self, n: &str) -> Result<Option<Subscriber>, StoreError> {
                self.0.user_by_number(n)
            }
            fn list_users(&self) -> Result<Vec<Subscriber>, StoreError> {
                self.0.list_users()
            }
            fn add_route(&mut self, r: &Route) -> Result<(), StoreError> {
                self.0.add_route(r)
            }
            fn del_route(&mut self, p: &str) -> Result<bool, StoreError> {
                self.0.del_route(p)
            }
            fn list_routes(&self) -> Result<Vec<Route>, StoreError> {
                self.0.list_routes()
            }
            fn route_for(&self, n: &str) -> Result<Option<Route>, StoreError> {
                super::super::validate_number(n)?;
                Ok(self
                    .0
                    .list_routes()?
                    .into_iter()
                    .find(|r| n.starts_with(&r.prefix)))
            }
        }
        let (name, case) = CASES
            .iter()
            .find(|(n, _)| *n == "routes_longest_prefix")
            .expect("case");
        let mut s = ShortestPrefix(super::super::SqliteStore::open_in_memory().unwrap());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut s)));
        assert!(
            r.is_err(),
            "{name} passed a store that picks the shortest prefix"
        );
    }
}
