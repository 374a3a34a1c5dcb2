//! What the web pages keep beside the directory: invitation codes and the personal information
//! of the registration page (display name, e-mail), in their own SQLite file `web.db` in the
//! data directory. The directory's [`crate::store::Store`] has no field for personal
//! information; keeping it here leaves the directory's schema (and every backend) untouched.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::sqlite::BUSY_TIMEOUT;

/// Longest invitation code, in bytes.
pub const MAX_CODE_LEN: usize = 64;
/// Most uses one invitation code may have.
pub const MAX_USES: u32 = 100_000;
/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 64;
/// Longest e-mail address, in bytes (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS invites (
         code      TEXT PRIMARY KEY NOT NULL,
         uses_left INTEGER NOT NULL CHECK (uses_left >= 0)
     ) STRICT;
     CREATE TABLE IF NOT EXISTS profiles (
         username     TEXT PRIMARY KEY NOT NULL,
         display_name TEXT NOT NULL,
         email        TEXT NOT NULL
     ) STRICT;";

/// The web pages' own file.
pub struct WebDb {
    conn: Connection,
}

/// Personal information from the registration page.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Profile {
    pub display_name: String,
    pub email: String,
}

/// What is wrong with an invitation code as typed by an operator.
pub fn code_problem(code: &str) -> Option<&'static str> {
    if code.is_empty() {
        Some("empty")
    } else if code.len() > MAX_CODE_LEN {
        Some("longer than 64 bytes")
    } else if !code
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Some("only letters, digits, '-' and '_'")
    } else {
        None
    }
}

/// What is wrong with a display name (`None`: fine; empty is fine).
pub fn display_name_problem(name: &str) -> Option<&'static str> {
    if name.chars().count() > MAX_DISPLAY_NAME {
        Some("longer than 64 characters")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

/// What is wrong with an e-mail address (`None`: fine; empty is fine). Only the shape is
/// checked: one `@` with something on each side, no white space.
pub fn email_problem(email: &str) -> Option<&'static str> {
    if email.is_empty() {
        return None;
    }
    if email.len() > MAX_EMAIL_LEN {
        return Some("longer than 254 bytes");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains white space or a control character");
    }
    match email.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() && !d.contains('@') => None,
        _ => Some("expected name@domain"),
    }
}

impl WebDb {
    pub fn open(path: &Path) -> Result<Self, String> {
        let e = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let conn = Connection::open(path).map_err(e)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(e)?;
        conn.execute_batch(SCHEMA).map_err(e)?;
        Ok(WebDb { conn })
    }

    /// Adds an invitation code good for `uses` registrations.
    pub fn add_invite(&self, code: &str, uses: u32) -> Result<(), String> {
        if let Some(p) = code_problem(code) {
            return Err(format!("invalid invitation code: {p}"));
        }
        if uses == 0 || uses > MAX_USES {
            return Err(format!("uses must be 1..={MAX_USES}"));
        }
        match self.conn.execute(
            "INSERT INTO invites (code, uses_left) VALUES (?1, ?2)",
            params![code, uses],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(format!("invitation code {code:?} already exists"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Codes with their uses left, by code.
    pub fn list_invites(&self) -> Result<Vec<(String, u32)>, String> {
        let mut st = self
            .conn
            .prepare("SELECT code, uses_left FROM invites ORDER BY code")
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }

    pub fn del_invite(&self, code: &str) -> Result<bool, String> {
        self.conn
            .execute("DELETE FROM invites WHERE code = ?1", params![code])
            .map(|n| n > 0)
            .map_err(|e| e.to_string())
    }

    /// Uses the code once: `false` when it does not exist or is used up. A code that reaches
    /// zero uses is removed.
    pub fn take_invite(&self, code: &str) -> Result<bool, String> {
        if code_problem(code).is_some() {
            return Ok(false);
        }
        let n = self
            .conn
            .execute(
                "UPDATE invites SET uses_left = uses_left - 1 WHERE code = ?1 AND uses_left > 0",
                params![code],
            )
            .map_err(|e| e.to_string())?;
        Ok(n == 1)
    }

    /// Gives back a use taken by [`WebDb::take_invite`] for a registration that failed.
    pub fn give_back_invite(&self, code: &str) -> Result<(), String> {
        self.conn
            .execute(
                "UPDATE invites SET uses_left = uses_left + 1 WHERE code = ?1",
                params![code],
            )
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub fn set_profile(&self, user: &str, p: &Profile) -> Result<(), String> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO profiles (username, display_name, email) VALUES (?1, ?2, ?3)",
                params![user, p.display_name, p.email],
            )
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub fn profile(&self, user: &str) -> Result<Option<Profile>, String> {
        self.conn
            .query_row(
                "SELECT display_name, email FROM profiles WHERE username = ?1",
                params![user],
                |r| {
                    Ok(Profile {
                        display_name: r.get(0)?,
                        email: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| e.to_string())
    }

    pub fn del_profile(&self, user: &str) -> Result<(), String> {
        self.conn
            .execute("DELETE FROM profiles WHERE username = ?1", params![user])
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invitation_codes_are_counted_and_single_use_codes_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = WebDb::open(&dir.path().join("web.db")).unwrap();
        db.add_invite("one-shot", 1).unwrap();
        db.add_invite("twice", 2).unwrap();
        assert!(
            db.add_invite("twice", 1)
                .unwrap_err()
                .contains("already exists")
        );
        assert!(
            db.add_invite("bad code", 1)
                .unwrap_err()
                .contains("letters")
        );
        assert!(db.add_invite("zero", 0).is_err());
        assert!(db.take_invite("one-shot").unwrap());
        assert!(!db.take_invite("one-shot").unwrap());
        assert!(db.take_invite("twice").unwrap());
        db.give_back_invite("twice").unwrap();
        assert!(db.take_invite("twice").unwrap());
        assert!(db.take_invite("twice").unwrap());
        assert!(!db.take_invite("twice").unwrap());
        assert!(!db.take_invite("nope").unwrap());
        assert_eq!(
            db.list_invites().unwrap(),
            vec![("one-shot".into(), 0), ("twice".into(), 0)]
        );
        assert!(db.del_invite("twice").unwrap());
        assert!(!db.del_invite("twice").unwrap());
    }

    #[test]
    fn personal_information_checks() {
        assert_eq!(email_problem(""), None);
        assert_eq!(email_problem("a@b.example"), None);
        assert!(email_problem("ab.example").is_some());
        assert!(email_problem("a@@b").is_some());
        assert!(email_problem("a b@c").is_some());
        assert_eq!(display_name_problem("Alice Liddell"), None);
        assert!(display_name_problem(&"x".repeat(65)).is_some());
        assert!(display_name_problem("a\nb").is_some());
    }
}
