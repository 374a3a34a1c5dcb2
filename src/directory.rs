//! What the directory holds and what the control core asks of it: the types both sides use,
//! and nothing that does IO.
//!
//! The seed's "database 82": registered users (user id, telephone number, log-in verifier) and
//! routes from number prefixes to IP voice gateways. `store/` keeps these on disk (SQLite, or a
//! fleet backend) and `control/` decides with them; neither depends on the other. The core never
//! calls the store: it emits a [`Query`] (as `Action::Lookup`), the server answers it off the
//! control thread, and the [`Answer`] comes back as `Input::LookupDone`.
//!
//! A [`Verifier`] holds no password: only the SCRAM-SHA-256 salt, iteration count, StoredKey and
//! ServerKey (RFC 5802 §3). Its `Debug` redacts the keys and its equality is constant-time.

use std::fmt;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 64;
/// Salt length of new verifiers and decoys, in bytes.
pub const SALT_LEN: usize = 16;
/// Most digits after `+` in an E.164 number (ITU-T E.164 §6).
pub const MAX_E164_DIGITS: usize = 15;
/// Most digits in a local identifier (an extension or a short code).
pub const MAX_LOCAL_DIGITS: usize = 20;
/// Most numbers one [`Query::Invite`] may carry.
pub const MAX_INVITE_NUMBERS: usize = 256;

/// A user name that cannot be used, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid user name: {reason}")]
pub struct InvalidUser {
    pub reason: &'static str,
}

/// Checks a user name: 1 to [`MAX_USER_LEN`] bytes of printable characters, no
/// white space. Shared by the store (registration) and the log-in.
pub fn validate_user(user: &str) -> Result<(), InvalidUser> {
    if user.is_empty() {
        return Err(InvalidUser { reason: "empty" });
    }
    if user.len() > MAX_USER_LEN {
        return Err(InvalidUser {
            reason: "longer than 64 bytes",
        });
    }
    if user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(InvalidUser {
            reason: "contains a control character or white space",
        });
    }
    Ok(())
}

pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Invariant: HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// RFC 5802 §3: SaltedPassword := Hi(password, salt, i) (PBKDF2-HMAC-SHA-256).
pub(crate) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations.max(1), &mut out);
    out
}

/// RFC 5802 §3: ClientKey := HMAC(SaltedPassword, "Client Key").
pub(crate) fn client_key(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Client Key"])
}

/// RFC 5802 §3: ServerKey := HMAC(SaltedPassword, "Server Key").
pub(crate) fn server_key(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Server Key"])
}

/// What the gateway stores instead of a password (RFC 5802 §3 StoredKey and
/// ServerKey, with the salt and iteration count). `Debug` redacts the keys.
#[derive(Clone)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Verifier {
    /// A verifier for `password` with a fresh random salt of [`SALT_LEN`]
    /// bytes. `iterations` below 1 is taken as 1; use at least 4096
    /// (`control::auth::DEFAULT_ITERATIONS`) outside tests.
    pub fn new<R: CryptoRng + ?Sized>(password: &str, iterations: u32, rng: &mut R) -> Self {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        Self::with_salt(password, &salt, iterations)
    }

    /// A verifier for `password` with the given salt (import, test vectors).
    pub fn with_salt(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let salted = salted_password(password, salt, iterations);
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: sha256(&client_key(&salted)),
            server_key: server_key(&salted),
        }
    }
}

impl Verifier {
    /// A digest of everything in the verifier: equal fingerprints, same verifier. Kept by a
    /// session to notice a password change without holding the keys.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(self.iterations.to_be_bytes());
        h.update(self.stored_key);
        h.update(self.server_key);
        h.finalize().into()
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("salt_len", &self.salt.len())
            .field("iterations", &self.iterations)
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// Compares in constant time (the keys are secrets).
impl PartialEq for Verifier {
    fn eq(&self, other: &Self) -> bool {
        let same = self.salt.ct_eq(&other.salt)
            & self.iterations.ct_eq(&other.iterations)
            & self.stored_key.ct_eq(&other.stored_key)
            & self.server_key.ct_eq(&other.server_key);
        same.into()
    }
}

impl Eq for Verifier {}

/// A registered user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    /// The log-in name (see [`validate_user`]).
    pub user: String,
    /// The number others dial: E.164 (`+4930123456`) or a local identifier of
    /// digits (`4711`).
    pub number: String,
    pub verifier: Verifier,
    /// Class of service: the number prefixes this user may dial on telephone routes (`None`:
    /// any; an empty list: no telephone numbers). Calls to registered users are not affected.
    pub allow_prefixes: Option<Vec<String>>,
}

/// Most prefixes in one user's class of service.
pub const MAX_ALLOW_PREFIXES: usize = 64;

/// Whether a class of service lets its user dial `number` on a telephone route.
pub fn may_dial(allow: Option<&[String]>, number: &str) -> bool {
    allow.is_none_or(|prefixes| prefixes.iter().any(|p| number.starts_with(p.as_str())))
}

/// Where calls to numbers starting with `prefix` go: the media address of an
/// IP voice gateway that reaches telephones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `+` alone (every E.164 number), `+` and up to 15 digits, or up to 20
    /// digits (local identifiers).
    pub prefix: String,
    pub media_addr: SocketAddr,
    pub description: String,
    /// Consecutive media ports from `media_addr`'s, one call each: the route carries this many
    /// calls at once (1: one at a time). The relay tells the calls apart by the voice gateway's
    /// address, so each call needs its own port there.
    pub ports: u16,
}

/// What is wrong with `s` as a number (or, with `bare_plus`, as a route prefix): `None` when it
/// is a valid E.164 number (`+` and 1–15 digits, no leading 0) or local identifier (1–20
/// digits).
pub fn number_problem(s: &str, bare_plus: bool) -> Option<&'static str> {
    if s.is_empty() {
        return Some("empty");
    }
    match s.strip_prefix('+') {
        Some("") if bare_plus => None,
        Some("") => Some("'+' must be followed by digits"),
        Some(digits) => {
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                Some("only digits may follow '+' (no spaces or separators)")
            } else if digits.starts_with('0') {
                Some("an E.164 number starts with a country code, which never starts with 0")
            } else if digits.len() > MAX_E164_DIGITS {
                Some("an E.164 number has at most 15 digits")
            } else {
                None
            }
        }
        None => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                Some("expected '+' and digits (E.164) or digits only (local identifier)")
            } else if s.len() > MAX_LOCAL_DIGITS {
                Some("a local identifier has at most 20 digits")
            } else {
                None
            }
        }
    }
}

/// A question the control core asks the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// At `hello`: the user's subscriber record (verifier and number).
    Login { user: String },
    /// At `dial`: who or what answers this number (a registered user first, else the route
    /// with the longest prefix).
    Dial { number: String },
    /// At `conference`: the same for each number, in order (at most [`MAX_INVITE_NUMBERS`]).
    Invite { numbers: Vec<String> },
    /// The iteration count most stored verifiers have (the decoy challenge for unknown
    /// users advertises it, so that unknown users do not stand out).
    TypicalIterations,
    /// Users whose record changed after change `since` (`None`: just the current position).
    /// Asked about once a second, so that a deleted user, a new password or a new number ends
    /// the live session even when another process (the CLI) made the change.
    Changes { since: Option<u64> },
}

/// Who or what a number reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A registered user.
    User { user: String, number: String },
    /// A telephone, through an IP voice gateway.
    Route(Route),
}

/// The directory's answer to a [`Query`] (same variant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Login(Option<Subscriber>),
    Dial(Option<Destination>),
    Invite(Vec<Option<Destination>>),
    TypicalIterations(Option<u32>),
    Changes { next: u64, users: Vec<String> },
}

/// Why a look-up could not be answered (the directory is down, slow or overloaded). The text
/// is for the log; clients only learn that the directory is unavailable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("directory look-up failed: {0}")]
pub struct LookupError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_prefixes() {
        assert_eq!(number_problem("+4930123456", false), None);
        assert_eq!(number_problem("4711", false), None);
        assert_eq!(
            number_problem("+", false),
            Some("'+' must be followed by digits")
        );
        assert_eq!(number_problem("+", true), None);
        assert!(number_problem("+0123", false).is_some());
        assert!(number_problem("alice", false).is_some());
    }

    #[test]
    fn user_names() {
        assert!(validate_user("alice").is_ok());
        assert!(validate_user("").is_err());
        assert!(validate_user(&"a".repeat(65)).is_err());
        assert!(validate_user("a b").is_err());
    }

    #[test]
    fn verifier_debug_redacts_and_equality_compares_everything() {
        let v = Verifier::with_salt("pw", b"saltsalt", 2);
        let text = format!("{v:?}");
        assert!(text.contains("redacted") && !text.contains(&format!("{:?}", v.stored_key)));
        let mut w = v.clone();
        assert_eq!(v, w);
        w.iterations = 3;
        assert_ne!(v, w);
    }
}
