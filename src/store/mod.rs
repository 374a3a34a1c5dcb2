//! The subscriber directory and telephone routes, behind one trait.
//!
//! The seed's "database 82": registered users (user id, telephone number,
//! log-in verifier) and, for destinations that are telephones, routes from a
//! number prefix to the media address of an IP voice gateway.
//!
//! This module owns persistence and the validation of what is persisted. It
//! does IO (disk), so `control/` never calls it: the core asks
//! [`crate::directory::Query`]s as actions, `server/` answers them with
//! [`answer`] on directory threads, and the CLI (`voxgate user …`, `voxgate
//! route …`) edits through the same trait.
//!
//! It must not store passwords: a [`Subscriber`] carries only the SCRAM
//! [`Verifier`] (salt, iteration count, StoredKey, ServerKey), whose `Debug`
//! redacts the keys.
//!
//! Backends: [`SqliteStore`] (embedded default) and [`PostgresStore`] (a directory shared by a
//! fleet of gateways); [`Location`] says which one a configuration names. Both pass the same
//! [`contract`] tests.

use std::net::SocketAddr;

use crate::directory::{self, Answer, Destination, MAX_INVITE_NUMBERS, Query};
pub use crate::directory::{MAX_E164_DIGITS, MAX_LOCAL_DIGITS, Route, Subscriber, Verifier};

pub mod contract;
pub mod location;
pub mod postgres;
pub mod sqlite;

pub use location::Location;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Longest route description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 200;
/// Longest salt a verifier may carry, in bytes.
pub const MAX_SALT_LEN: usize = 128;

/// Errors of the store. The `Invalid*` variants say what is wrong with the
/// input; user-supplied strings are quoted with escapes and clipped.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid user name {user:?}: {reason}")]
    InvalidUser { user: String, reason: &'static str },
    #[error("invalid number {number:?}: {reason}")]
    InvalidNumber {
        number: String,
        reason: &'static str,
    },
    #[error("invalid route prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("invalid media address {addr}: {reason}")]
    InvalidMediaAddr {
        addr: SocketAddr,
        reason: &'static str,
    },
    #[error("invalid route description: {reason}")]
    InvalidDescription { reason: &'static str },
    #[error("invalid verifier: {reason}")]
    InvalidVerifier { reason: &'static str },
    #[error("user {user:?} already exists")]
    DuplicateUser { user: String },
    #[error("number {number:?} is already registered to another user")]
    DuplicateNumber { number: String },
    #[error("a route for prefix {prefix:?} already exists")]
    DuplicateRoute { prefix: String },
    #[error(
        "the database has schema version {found}, newer than the {supported} this voxgate knows; upgrade voxgate"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the database is corrupt: {what}")]
    Corrupt { what: String },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A database error on a file: which file, and why (the OS's words where it has them,
    /// e.g. "Read-only file system").
    #[error("store {}: {cause}", .path.display())]
    File {
        path: std::path::PathBuf,
        cause: String,
    },
    /// The directory server cannot be used now (down, restarting, unreachable, or refusing
    /// the credentials); `target` names it without the password. Look-ups answer
    /// `unavailable` meanwhile, and the store connects again by itself.
    #[error("directory {target} is unavailable: {cause}")]
    Unavailable { target: String, cause: String },
    /// An error the directory server reported for a statement.
    #[error("directory {target}: {cause}")]
    Postgres { target: String, cause: String },
    /// Where the directory is, or its credentials, are misconfigured.
    #[error("{0}")]
    Config(String),
}

/// The directory. Every method validates its input first; lookups of names
/// that could never have been stored are errors, not `None`.
pub trait Store: Send {
    /// Registers a subscriber. Fails with [`StoreError::DuplicateUser`] or
    /// [`StoreError::DuplicateNumber`] if either is taken.
    fn add_user(&mut self, subscriber: &Subscriber) -> Result<(), StoreError>;
    /// Removes a subscriber; `false` if there was none.
    fn del_user(&mut self, user: &str) -> Result<bool, StoreError>;
    /// Replaces a subscriber's verifier (password change); `false` if there is
    /// no such user.
    fn set_verifier(&mut self, user: &str, verifier: &Verifier) -> Result<bool, StoreError>;
    /// Replaces a subscriber's class of service (`None`: any route); `false` if there is no
    /// such user. Backends without classes of service refuse.
    fn set_allow_prefixes(
        &mut self,
        user: &str,
        allow: Option<&[String]>,
    ) -> Result<bool, StoreError> {
        let _ = (user, allow);
        Err(StoreError::Corrupt {
            what: "this directory does not keep classes of service".into(),
        })
    }
    fn user(&self, user: &str) -> Result<Option<Subscriber>, StoreError>;
    fn user_by_number(&self, number: &str) -> Result<Option<Subscriber>, StoreError>;
    /// All subscribers, by user name.
    fn list_users(&self) -> Result<Vec<Subscriber>, StoreError>;
    /// Adds a route. Fails with [`StoreError::DuplicateRoute`] if the prefix
    /// has one.
    fn add_route(&mut self, route: &Route) -> Result<(), StoreError>;
    /// Removes the route for exactly this prefix; `false` if there was none.
    fn del_route(&mut self, prefix: &str) -> Result<bool, StoreError>;
    /// All routes, by prefix.
    fn list_routes(&self) -> Result<Vec<Route>, StoreError>;
    /// The route with the longest prefix of `number`, if any.
    fn route_for(&self, number: &str) -> Result<Option<Route>, StoreError>;
    /// Users whose record changed (added, deleted, new password or number) after change
    /// `since`, and the position to ask from next time; `since = None` gives the current
    /// position and no users. Backends without a change log return `(0, [])` (the gateway then
    /// notices no changes).
    fn changes_since(&self, since: Option<u64>) -> Result<(u64, Vec<String>), StoreError> {
        let _ = since;
        Ok((0, Vec::new()))
    }
    /// The iteration count most stored verifiers have (`None`: no users). Backends should
    /// answer this without reading every verifier.
    fn typical_iterations(&self) -> Result<Option<u32>, StoreError> {
        let mut counts = std::collections::BTreeMap::<u32, usize>::new();
        for s in self.list_users()? {
            *counts.entry(s.verifier.iterations).or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .max_by_key(|&(i, n)| (n, i))
            .map(|(i, _)| i))
    }
}

/// Answers one of the control core's questions (see [`crate::directory`]). Invalid input
/// (a malformed user name or number) is answered "nobody", not an error: the core decides what
/// to tell the client.
pub fn answer(store: &dyn Store, query: &Query) -> Result<Answer, StoreError> {
    Ok(match query {
        Query::Login { user } => Answer::Login(if directory::validate_user(user).is_ok() {
            store.user(user)?
        } else {
            None
        }),
        Query::Dial { number } => Answer::Dial(destination(store, number)?),
        Query::Invite { numbers } => Answer::Invite(
            numbers
                .iter()
                .take(MAX_INVITE_NUMBERS)
                .map(|n| destination(store, n))
                .collect::<Result<_, _>>()?,
        ),
        Query::TypicalIterations => Answer::TypicalIterations(store.typical_iterations()?),
        Query::Changes { since } => {
            let (next, users) = store.changes_since(*since)?;
            Answer::Changes { next, users }
        }
    })
}

/// A registered user first, else the longest-prefix route.
fn destination(store: &dyn Store, number: &str) -> Result<Option<Destination>, StoreError> {
    if directory::number_problem(number, false).is_some() {
        return Ok(None);
    }
    if let Some(s) = store.user_by_number(number)? {
        return Ok(Some(Destination::User {
            user: s.user,
            number: s.number,
        }));
    }
    Ok(store.route_for(number)?.map(Destination::Route))
}

/// Keeps user-supplied text in error messages short.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

pub fn validate_user(user: &str) -> Result<(), StoreError> {
    directory::validate_user(user).map_err(|e| StoreError::InvalidUser {
        user: clip(user),
        reason: e.reason,
    })
}

/// A number: E.164 (`+` and 1–15 digits, no leading 0) or a local identifier
/// (1–20 digits).
pub fn validate_number(number: &str) -> Result<(), StoreError> {
    match directory::number_problem(number, false) {
        None => Ok(()),
        Some(reason) => Err(StoreError::InvalidNumber {
            number: clip(number),
            reason,
        }),
    }
}

/// A route prefix: as a number, or `+` alone.
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    match directory::number_problem(prefix, true) {
        None => Ok(()),
        Some(reason) => Err(StoreError::InvalidPrefix {
            prefix: clip(prefix),
            reason,
        }),
    }
}

fn validate_verifier(v: &Verifier) -> Result<(), StoreError> {
    let reason = if v.salt.is_empty() {
        "empty salt"
    } else if v.salt.len() > MAX_SALT_LEN {
        "salt longer than 128 bytes"
    } else if v.iterations == 0 {
        "zero iterations"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidVerifier { reason })
}

fn validate_route(route: &Route) -> Result<(), StoreError> {
    validate_prefix(&route.prefix)?;
    let addr = route.media_addr;
    let addr_problem = if addr.port() == 0 {
        Some("port 0")
    } else if addr.ip().is_unspecified() {
        Some("unspecified address")
    } else if addr.ip().is_multicast() {
        Some("multicast address")
    } else {
        None
    };
    if let Some(reason) = addr_problem {
        return Err(StoreError::InvalidMediaAddr { addr, reason });
    }
    if !(1..=1024).contains(&route.ports) {
        return Err(StoreError::InvalidMediaAddr {
            addr,
            reason: "a route has 1 to 1024 media ports",
        });
    }
    if u32::from(addr.port()) + u32::from(route.ports) - 1 > 65_535 {
        return Err(StoreError::InvalidMediaAddr {
            addr,
            reason: "the route's media ports run past 65535",
        });
    }
    if route.description.len() > MAX_DESCRIPTION_LEN {
        return Err(StoreError::InvalidDescription {
            reason: "longer than 200 bytes",
        });
    }
    if route.description.chars().any(char::is_control) {
        return Err(StoreError::InvalidDescription {
            reason: "contains a control character",
        });
    }
    Ok(())
}

fn validate_subscriber(s: &Subscriber) -> Result<(), StoreError> {
    validate_user(&s.user)?;
    validate_number(&s.number)?;
    validate_allow_prefixes(s.allow_prefixes.as_deref())?;
    validate_verifier(&s.verifier)
}

/// A class of service: at most 64 prefixes, each a valid route prefix.
pub fn validate_allow_prefixes(allow: Option<&[String]>) -> Result<(), StoreError> {
    let Some(prefixes) = allow else {
        return Ok(());
    };
    if prefixes.len() > directory::MAX_ALLOW_PREFIXES {
        return Err(StoreError::InvalidPrefix {
            prefix: format!("{} prefixes", prefixes.len()),
            reason: "a user may have at most 64 allowed prefixes",
        });
    }
    prefixes.iter().try_for_each(|p| validate_prefix(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number_reason(n: &str) -> Option<&'static str> {
        match validate_number(n) {
            Err(StoreError::InvalidNumber { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn numbers() {
        for ok in [
            "+4930123456",
            "+1",
            "+123456789012345",
            "4711",
            "0",
            "00491234",
        ] {
            assert!(validate_number(ok).is_ok(), "{ok}");
        }
        assert_eq!(number_reason(""), Some("empty"));
        assert_eq!(number_reason("+"), Some("'+' must be followed by digits"));
        assert_eq!(
            number_reason("+49 30 123"),
            Some("only digits may follow '+' (no spaces or separators)")
        );
        assert_eq!(
            number_reason("+0123"),
            Some("an E.164 number starts with a country code, which never starts with 0")
        );
        assert_eq!(
            number_reason("+1234567890123456"),
            Some("an E.164 number has at most 15 digits")
        );
        assert_eq!(
            number_reason("alice"),
            Some("expected '+' and digits (E.164) or digits only (local identifier)")
        );
        assert_eq!(
            number_reason(&"1".repeat(21)),
            Some("a local identifier has at most 20 digits")
        );
        assert_eq!(
            number_reason("٣"),
            Some("expected '+' and digits (E.164) or digits only (local identifier)")
        );
    }

    #[test]
    fn prefixes_allow_a_bare_plus() {
        assert!(validate_prefix("+").is_ok());
        assert!(validate_prefix("+49").is_ok());
        assert!(validate_prefix("47").is_ok());
        assert!(matches!(
            validate_prefix(""),
            Err(StoreError::InvalidPrefix {
                reason: "empty",
                ..
            })
        ));
        assert!(validate_prefix("++").is_err());
    }

    #[test]
    fn errors_say_what_is_wrong_and_clip_input() {
        let long = "x".repeat(1000);
        let msg = validate_number(&long)
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(msg.starts_with("invalid number \"xxxx"), "{msg}");
        assert!(msg.len() < 250, "{msg}");
        let msg = validate_user("a\nb")
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert_eq!(
            msg,
            "invalid user name \"a\\nb\": contains a control character or white space"
        );
    }

    #[test]
    fn routes_and_verifiers() {
        let route = |addr: &str, description: &str| Route {
            prefix: "+49".into(),
            media_addr: addr
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            description: description.into(),
            ports: 1,
        };
        assert!(validate_route(&route("192.0.2.1:5004", "Berlin PSTN")).is_ok());
        let many = |port: &str, ports| Route {
            ports,
            ..route(port, "")
        };
        assert!(validate_route(&many("192.0.2.1:5004", 100)).is_ok());
        assert!(validate_route(&many("192.0.2.1:5004", 0)).is_err());
        assert!(validate_route(&many("192.0.2.1:5004", 1025)).is_err());
        assert!(validate_route(&many("192.0.2.1:65535", 2)).is_err());
        for (bad, reason) in [
            ("192.0.2.1:0", "port 0"),
            ("0.0.0.0:5004", "unspecified address"),
            ("[ff02::1]:5004", "multicast address"),
        ] {
            assert!(matches!(
                validate_route(&route(bad, "")),
                Err(StoreError::InvalidMediaAddr { reason: r, .. }) if r == reason
            ));
        }
        assert!(matches!(
            validate_route(&route("192.0.2.1:5004", "a\u{7}")),
            Err(StoreError::InvalidDescription { .. })
        ));
        assert!(matches!(
            validate_route(&route("192.0.2.1:5004", &"d".repeat(201))),
            Err(StoreError::InvalidDescription { .. })
        ));
        let mut v = Verifier::with_salt("pw", b"saltsalt", 1);
        assert!(validate_verifier(&v).is_ok());
        v.salt.clear();
        assert!(validate_verifier(&v).is_err());
        v.salt = vec![0; 129];
        assert!(validate_verifier(&v).is_err());
        v.salt = vec![0; 16];
        v.iterations = 0;
        assert!(validate_verifier(&v).is_err());
    }
}
