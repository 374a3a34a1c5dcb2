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

fn verifier(password: &str) -> Verifier {
    Verifier::with_salt(password, b"0123456789abcdef", 1)
}

fn sub(user: &str, number: &str) -> Subscriber {
    Subscriber {
        user: user.into(),
        number: number.into(),
        verifier: verifier(user),
        allow_prefixes: None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([192, 0, 2, 1], 9)))
}

fn rt(prefix: &str, media_addr: &str, description: &str) -> Route {
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
