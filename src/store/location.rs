//! Where the directory is: the `[store] directory` setting (or `--directory`, or
//! `VOXGATE_DIRECTORY`) turned into a store that can be opened, with its credentials.
//!
//! - `""` (the default): the SQLite file `voxgate.db` in the data directory;
//! - `sqlite:PATH`: that SQLite file;
//! - `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]` (or `postgresql://`): a
//!   PostgreSQL server shared by a fleet.
//!
//! The PostgreSQL password comes from, in this order: the URL (only from the config file or
//! the environment), the `password_file` (its first line; refused when group or others may
//! read it, as libpq does with `.pgpass`), or `PGPASSWORD`. A password inside a URL given on
//! the command line is refused: every user of the machine can read a process's arguments.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::postgres::{PgTarget, PostgresStore};
use super::sqlite::SqliteStore;
use super::{Store, StoreError};

/// Opens one store connection (one per directory worker); the type of
/// `server::lookup::StoreFactory`.
pub type Factory = Arc<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send + Sync>;

/// The environment variable that names the directory (overrides the config file; a flag
/// overrides it).
pub const DIRECTORY_ENV: &str = "VOXGATE_DIRECTORY";
/// libpq's environment variable for the password, honoured as libpq does.
pub const PASSWORD_ENV: &str = "PGPASSWORD";

/// A directory that can be opened.
#[derive(Clone, Debug)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(Box<PgTarget>),
}

/// What kind of directory a setting names, before any credential is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite(PathBuf),
    /// The URL parsed; whether it carries a password.
    Postgres {
        has_password: bool,
    },
}

/// Parses a directory setting without reading any file or variable (configuration checks).
pub fn kind(spec: &str, data_dir: &Path) -> Result<Kind, StoreError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Kind::Sqlite(data_dir.join("voxgate.db")));
    }
    if let Some(path) = spec.strip_prefix("sqlite:") {
        if path.is_empty() {
            return Err(StoreError::Config(
                "directory \"sqlite:\" names no file: sqlite:PATH".into(),
            ));
        }
        return Ok(Kind::Sqlite(PathBuf::from(path)));
    }
    let c = pg_config(spec)?;
    Ok(Kind::Postgres {
        has_password: c.get_password().is_some(),
    })
}

fn pg_config(spec: &str) -> Result<postgres::Config, StoreError> {
    if !(spec.starts_with("postgres://") || spec.starts_with("postgresql://")) {
        // Only what comes before the first ':' (a scheme, or a bare path): a password
        // always follows a ':'.
        let head = spec.split(':').next().unwrap_or("");
        return Err(StoreError::Config(format!(
            "directory {:?}…: expected \"\" (SQLite in the data directory), sqlite:PATH or \
             postgres://USER@HOST:PORT/DB",
            super::clip(head)
        )));
    }
    // The driver's parse errors do not repeat the URL (which may hold a password).
    let c = postgres::Config::from_str(spec)
        .map_err(|e| StoreError::Config(format!("directory URL postgres://…: {e}")))?;
    if c.get_hosts().is_empty() {
        return Err(StoreError::Config(
            "directory URL postgres://…: no host (postgres://USER@HOST:PORT/DB)".into(),
        ));
    }
    if c.get_user().is_none_or(str::is_empty) {
        return Err(StoreError::Config(
            "directory URL postgres://…: no user (postgres://USER@HOST:PORT/DB)".into(),
        ));
    }
    Ok(c)
}

/// Refuses a directory URL given on the command line that carries a password, saying where
/// the password belongs instead.
pub fn check_command_line(spec: &str) -> Result<(), StoreError> {
    if let Kind::Postgres { has_password: true } = kind(spec, Path::new("."))? {
        return Err(StoreError::Config(
            "--directory: refusing a password on the command line (any user of this machine \
             can read a process's arguments); put it in the config file ([store] directory or \
             password_file), in the environment (VOXGATE_DIRECTORY or PGPASSWORD), or in a \
             file named by --directory-password-file (mode 0600)"
                .into(),
        ));
    }
    Ok(())
}

/// A warning when the config file at `path` holds a directory URL with a password and
/// group or others may read the file.
pub fn exposed_password_warning(path: &Path, spec: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(Kind::Postgres { has_password: true }) = kind(spec, Path::new(".")) else {
        return None;
    };
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "warning: {} holds the directory's password and group or others may read it \
             (mode {mode:04o}); chmod 600 it, or move the password to [store] password_file",
            path.display()
        )
    })
}

/// Reads a password file: its first line, without the line end. Refused when group or others
/// may read it, when it is empty, or longer than 1 KiB.
pub fn read_password_file(path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let err =
        |what: String| StoreError::Config(format!("password file {}: {what}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "group or others may access it (mode {mode:04o}); chmod 600 it"
        )));
    }
    if meta.len() > 1024 {
        return Err(err("longer than 1 KiB".into()));
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(line.to_vec())
}

impl Location {
    /// The directory `spec` names, with its credentials: the URL's password, else the
    /// `password_file`'s, else `$PGPASSWORD`.
    pub fn resolve(
        spec: &str,
        password_file: Option<&Path>,
        timeout: Duration,
        data_dir: &Path,
    ) -> Result<Location, StoreError> {
        match kind(spec, data_dir)? {
            Kind::Sqlite(path) => Ok(Location::Sqlite(path)),
            Kind::Postgres { has_password } => {
                let mut target = PgTarget::new(pg_config(spec.trim())?, timeout);
                if !has_password {
                    if let Some(file) = password_file {
                        target.set_password(&read_password_file(file)?);
                    } else if let Some(pw) = std::env::var_os(PASSWORD_ENV) {
                        use std::os::unix::ffi::OsStrExt;
                        target.set_password(pw.as_bytes());
                    }
                }
                Ok(Location::Postgres(Box::new(target)))
            }
        }
    }

    /// Opens a store (connects, creating the SQLite file and its directory if needed) and
    /// brings its schema up to date.
    pub fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        match self {
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::File {
                        path: dir.to_owned(),
                        cause: e.to_string(),
                    })?;
                }
                Ok(Box::new(SqliteStore::open(path)?))
            }
            Location::Postgres(t) => Ok(Box::new(PostgresStore::connect((**t).clone())?)),
        }
    }

    /// Opens the store once and closes it again, on a thread of its own (so this may be
    /// called inside an async runtime): the schema is migrated and the server or file found.
    pub fn check(&self) -> Result<(), StoreError> {
        std::thread::scope(|s| {
            s.spawn(|| self.open().map(drop))
                .join()
                .unwrap_or_else(|_| {
                    Err(StoreError::Config("opening the directory panicked".into()))
                })
        })
    }

    /// Opens a new store each time it is called (one per directory worker). May be called
    /// from inside an async runtime (the control thread's): the PostgreSQL driver runs its
    /// own runtime, so the store is opened on a short-lived thread of its own.
    pub fn factory(&self) -> Factory {
        let me = self.clone();
        Arc::new(move || {
            std::thread::scope(|s| {
                s.spawn(|| me.open()).join().unwrap_or_else(|_| {
                    Err(StoreError::Config("opening the directory panicked".into()))
                })
            })
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Location::Postgres(t) => t.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_their_kind() {
        let d = Path::new("/var/lib/voxgate");
        assert_eq!(kind("", d).unwrap(), Kind::Sqlite(d.join("voxgate.db")));
        assert_eq!(
            kind("sqlite:/tmp/x.db", d).unwrap(),
            Kind::Sqlite("/tmp/x.db".into())
        );
        assert_eq!(
            kind("postgres://vox@db:5432/dir", d).unwrap(),
            Kind::Postgres {
                has_password: false
            }
        );
        assert_eq!(
            kind("postgresql://vox:pw@db/dir", d).unwrap(),
            Kind::Postgres { has_password: true }
        );
        for bad in [
            "mysql://x@y/z",
            "sqlite:",
            "postgres://",
            "postgres://db.example/x",
        ] {
            let e = kind(bad, d).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = kind("redis://user:secret-pw@host/0", d)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-pw"), "{e}");
        let e = kind("postgres://u:secret-pw@h:notaport/d", d)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-pw"), "{e}");
    }

    proptest::proptest! {
        /// Any setting parses or fails without panicking, and a password in it is never
        /// repeated in the error.
        #[test]
        fn settings_never_panic_nor_echo_a_password(
            scheme in "(postgres|postgresql|sqlite|redis|)(://|:|)",
            user in "[a-z%:@/]{0,8}",
            rest in "(@|/|:|)[ -~]{0,40}",
        ) {
            let spec = format!("{scheme}{user}:Pw-7d1e0c{rest}");
            if let Err(e) = kind(&spec, Path::new("/d")) {
                proptest::prop_assert!(!e.to_string().contains("Pw-7d1e0c"), "{}", e);
            }
            let _ = check_command_line(&spec).map_err(|e| {
                assert!(!e.to_string().contains("Pw-7d1e0c"), "{e}");
            });
        }
    }

    #[test]
    fn a_password_on_the_command_line_is_refused_with_where_to_put_it() {
        assert!(check_command_line("postgres://vox@db/dir").is_ok());
        assert!(check_command_line("sqlite:/x.db").is_ok());
        let e = check_command_line("postgres://vox:hunter2@db/dir")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        for place in [
            "password_file",
            "PGPASSWORD",
            "VOXGATE_DIRECTORY",
            "config file",
        ] {
            assert!(e.contains(place), "{place} not in {e}");
        }
        let e = check_command_line("postgres://vox@db/dir?password=hunter2")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_readable_config_file_with_a_password_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("voxgate.toml");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = exposed_password_warning(&p, "postgres://u:pw@h/d").unwrap();
        assert!(w.contains("mode 0644") && !w.contains(":pw@"), "{w}");
        assert_eq!(exposed_password_warning(&p, "postgres://u@h/d"), None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_password_warning(&p, "postgres://u:pw@h/d"), None);
    }

    #[test]
    fn password_files_must_be_private_and_give_their_first_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\r\nignored\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_password_file(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&p).unwrap(), b"s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_password_file(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let e = read_password_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn the_password_file_wins_over_the_environment_and_the_url_over_both() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "from-file\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = |spec: &str, file: Option<&Path>| match Location::resolve(
            spec,
            file,
            Duration::from_secs(1),
            dir.path(),
        )
        .unwrap()
        {
            Location::Postgres(t) => *t,
            other => panic!("{other:?}"),
        };
        let with_file = t("postgres://vox@db/dir", Some(&p));
        assert!(with_file.has_password());
        assert_eq!(with_file.to_string(), "postgres://vox@db:5432/dir");
        assert!(!format!("{with_file:?}").contains("from-file"));
        assert!(t("postgres://vox:url@db/dir", Some(&p)).has_password());
    }
}
