//! The fleet's directory: subscribers and routes on a PostgreSQL server shared by several
//! gateways.
//!
//! Driver: the synchronous `postgres` crate (`tokio-postgres` underneath, driven on the
//! calling thread by its own small runtime). A store is one connection, used by one directory
//! worker (`server::lookup`) or by the CLI, so the workers together are the connection pool:
//! no pool crate is needed, and a slow query holds up only its own worker's queue. Every
//! statement the workers use is prepared once per connection ([`Statements`]).
//!
//! Same contract as [`super::sqlite`]: the same validation before any IO, the same
//! `StoreError` variants for duplicates and bad input, the same byte-wise ordering and
//! comparison of names (`COLLATE "C"`, as SQLite's BINARY). Errors name the server as
//! `postgres://USER@HOST:PORT/DB` and never the password.
//!
//! The server going away: a failed read on a broken connection is retried once on a new one
//! (a restarted server costs nobody anything); otherwise the operation fails with
//! [`StoreError::Unavailable`], and further attempts to connect are spaced by a back-off
//! (from [`RETRY_MIN`] doubling to [`RETRY_MAX`]) during which operations fail at once
//! without touching the network. The store connects again by itself on the first operation
//! after the back-off; nobody has to restart anything. A write is never retried (it may
//! have been committed before the connection broke).
//!
//! Schema: versioned in the table `voxgate_schema`; [`MIGRATIONS`] are applied in order in
//! one transaction under an advisory lock, so gateways starting at once migrate one after the
//! other and the later ones find nothing to do. A database newer than this code is refused.
//! TLS to the server is not supported yet: keep the server on a trusted network (or a
//! loopback/unix socket).

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};

use super::{
    Route, Store, StoreError, Subscriber, validate_number, validate_prefix, validate_route,
    validate_subscriber, validate_user, validate_verifier,
};
use crate::directory::Verifier;

/// Schema migrations; `MIGRATIONS[i]` takes version `i` to `i + 1`. Append only. Kept
/// column for column like `sqlite::MIGRATIONS` (bytea for BLOB, bigint for INTEGER, text
/// compared byte-wise).
pub const MIGRATIONS: &[&str] = &[
    // 1: subscribers and telephone routes.
    r#"CREATE TABLE subscribers (
         username   text COLLATE "C" PRIMARY KEY,
         number     text COLLATE "C" NOT NULL UNIQUE,
         salt       bytea NOT NULL,
         iterations bigint NOT NULL CHECK (iterations > 0 AND iterations <= 4294967295),
         stored_key bytea NOT NULL CHECK (octet_length(stored_key) = 32),
         server_key bytea NOT NULL CHECK (octet_length(server_key) = 32)
     );
     CREATE TABLE routes (
         prefix      text COLLATE "C" PRIMARY KEY,
         media_addr  text NOT NULL,
         description text NOT NULL
     );"#,
];

/// The advisory lock migrations run under (an arbitrary constant: "voxgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x0076_6f78_6761_7465;

/// First pause before connecting again after a failure.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts to connect.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

const SUBSCRIBER_COLUMNS: &str = "username, number, salt, iterations, stored_key, server_key";
const ROUTE_COLUMNS: &str = "prefix, media_addr, description";

/// Where the directory is, with the password, and how it is shown (without it).
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    shown: String,
}

impl PgTarget {
    /// `config` as given (host, port, user, database, password); `timeout` bounds connecting,
    /// unacknowledged writes on the socket, and each statement.
    pub fn new(mut config: postgres::Config, timeout: Duration) -> Self {
        if config.get_application_name().is_none() {
            config.application_name("voxgate");
        }
        let options = format!(
            "{} -c statement_timeout={} -c client_min_messages=warning",
            config.get_options().unwrap_or(""),
            timeout.as_millis().max(1)
        );
        config
            .connect_timeout(timeout)
            .tcp_user_timeout(timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .options(options.trim_start());
        let shown = show(&config);
        PgTarget { config, shown }
    }

    /// The password, if one was given.
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    pub fn set_password(&mut self, password: &[u8]) {
        self.config.password(password);
    }
}

/// `postgres://USER@HOST:PORT/DB`, never the password.
fn show(c: &postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) if h.contains(':') => format!("[{h}]"),
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    let host = if hosts.is_empty() {
        "localhost".to_owned()
    } else {
        hosts.join(",")
    };
    let port = if ports.is_empty() {
        "5432".to_owned()
    } else {
        ports.join(",")
    };
    let user = c.get_user().unwrap_or("");
    let at = if user.is_empty() { "" } else { "@" };
    format!(
        "postgres://{user}{at}{host}:{port}/{}",
        c.get_dbname().unwrap_or(user)
    )
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PgTarget({}, password: {})",
            self.shown,
            if self.has_password() {
                "<redacted>"
            } else {
                "none"
            }
        )
    }
}

/// The statements the look-ups run, prepared once per connection.
struct Statements {
    user: Statement,
    user_by_number: Statement,
    route_for: Statement,
    typical_iterations: Statement,
}

struct Conn {
    client: Client,
    stmts: Statements,
}

/// When to try connecting again, and what went wrong last.
struct Retry {
    next: Instant,
    pause: Duration,
    cause: String,
}

/// The PostgreSQL-backed [`Store`]: one connection, re-established by itself.
pub struct PostgresStore {
    target: PgTarget,
    conn: RefCell<Option<Conn>>,
    retry: RefCell<Option<Retry>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("connected", &self.conn.borrow().is_some())
            .finish()
    }
}

/// The driver blocks on its own runtime to close the connection, which panics inside another
/// runtime (a store dropped on the control thread, e.g. when a later worker fails to start):
/// there, the connection is closed on a thread of its own.
impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("voxgate-dir-close".into())
                    .spawn(move || drop(conn));
            } else {
                drop(conn);
            }
        }
    }
}

/// Whether `e` means the server cannot be used now (as opposed to an error in a statement).
fn is_unavailable(e: &postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        // Not reported by the server: the socket, a time-out, a closed connection.
        return true;
    };
    let code = db.code().code();
    // 08: connection exception; 57P: operator intervention (shutdown, not accepting
    // connections yet); 53: insufficient resources (too many connections); 28: invalid
    // authorization (a wrong password is the operator's to fix, but the directory is
    // unavailable until then); 3D000: no such database.
    code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || code.starts_with("28")
        || code == "3D000"
}

/// The error's text with its server detail (tokio-postgres's `Display` says only "db error").
fn cause(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                let t = inner.to_string();
                if !s.contains(&t) {
                    s = format!("{s}: {t}");
                }
                src = inner.source();
            }
            s
        }
    }
}

impl PostgresStore {
    /// Connects and brings the schema up to date. Fails with [`StoreError::Unavailable`]
    /// when the server cannot be reached or refuses the credentials.
    pub fn connect(target: PgTarget) -> Result<Self, StoreError> {
        let store = PostgresStore {
            target,
            conn: RefCell::new(None),
            retry: RefCell::new(None),
        };
        let mut client = store.new_client()?;
        migrate(&mut client).map_err(|e| store.error(e))?;
        let stmts = prepare(&mut client).map_err(|e| store.error(e))?;
        *store.conn.borrow_mut() = Some(Conn { client, stmts });
        Ok(store)
    }

    /// Where this store connects (no password).
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    fn new_client(&self) -> Result<Client, StoreError> {
        self.target
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::Unavailable {
                target: self.target.shown.clone(),
                cause: cause(&e),
            })
    }

    fn error(&self, e: PgOrStore) -> StoreError {
        match e {
            PgOrStore::Store(e) => e,
            PgOrStore::Pg(e) if is_unavailable(&e) => StoreError::Unavailable {
                target: self.target.shown.clone(),
                cause: cause(&e),
            },
            PgOrStore::Pg(e) => StoreError::Postgres {
                target: self.target.shown.clone(),
                cause: cause(&e),
            },
        }
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.with_conn(true, |c| {
            let row = c
                .client
                .query_one("SELECT version FROM voxgate_schema", &[])?;
            Ok(row.get(0))
        })
    }

    /// Runs `f` on the connection, connecting first if there is none (and the back-off has
    /// passed). A broken connection is dropped; a read (`retry`) is then tried once more on a
    /// new one.
    fn with_conn<T>(
        &self,
        retry: bool,
        mut f: impl FnMut(&mut Conn) -> Result<T, PgOrStore>,
    ) -> Result<T, StoreError> {
        let mut tries = if retry { 2 } else { 1 };
        loop {
            tries -= 1;
            let mut slot = self.conn.borrow_mut();
            if slot.is_none() {
                *slot = Some(self.reconnect()?);
            }
            let Some(conn) = slot.as_mut() else {
                unreachable!("the connection was just set");
            };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let broken = conn.client.is_closed()
                        || matches!(&e, PgOrStore::Pg(pg) if is_unavailable(pg));
                    if !broken {
                        return Err(self.error(e));
                    }
                    *slot = None;
                    let err = self.error(e);
                    tracing::warn!(
                        directory = %self.target,
                        error = %err,
                        "directory connection lost; connecting again"
                    );
                    if tries == 0 {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// A new connection, unless the last attempt failed less than its back-off ago.
    fn reconnect(&self) -> Result<Conn, StoreError> {
        let now = Instant::now();
        if let Some(r) = &*self.retry.borrow() {
            if now < r.next {
                return Err(StoreError::Unavailable {
                    target: self.target.shown.clone(),
                    cause: format!(
                        "{} (next attempt to connect in {} ms)",
                        r.cause,
                        (r.next - now).as_millis()
                    ),
                });
            }
        }
        let attempt = self.new_client().and_then(|mut client| {
            let stmts = prepare(&mut client).map_err(|e| self.error(e))?;
            Ok(Conn { client, stmts })
        });
        let mut retry = self.retry.borrow_mut();
        match attempt {
            Ok(conn) => {
                if retry.take().is_some() {
                    tracing::info!(directory = %self.target, "directory connection restored");
                }
                Ok(conn)
            }
            Err(e) => {
                let pause = retry
                    .as_ref()
                    .map_or(RETRY_MIN, |r| (r.pause * 2).min(RETRY_MAX));
                let cause = match &e {
                    StoreError::Unavailable { cause, .. } => cause.clone(),
                    other => other.to_string(),
                };
                *retry = Some(Retry {
                    next: Instant::now() + pause,
                    pause,
                    cause,
                });
                Err(e)
            }
        }
    }
}

/// A driver error, or one of ours raised inside a connection's closure.
enum PgOrStore {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for PgOrStore {
    fn from(e: postgres::Error) -> Self {
        PgOrStore::Pg(e)
    }
}

impl From<StoreError> for PgOrStore {
    fn from(e: StoreError) -> Self {
        PgOrStore::Store(e)
    }
}

fn migrate(client: &mut Client) -> Result<(), PgOrStore> {
    let supported = MIGRATIONS.len() as i64;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS voxgate_schema (
             one     boolean PRIMARY KEY DEFAULT true CHECK (one),
             version bigint NOT NULL
         );
         INSERT INTO voxgate_schema (version) VALUES (0) ON CONFLICT DO NOTHING;",
    )?;
    let found: i64 = tx
        .query_one("SELECT version FROM voxgate_schema", &[])?
        .get(0);
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported }.into());
    }
    let from = usize::try_from(found).map_err(|_| StoreError::Corrupt {
        what: format!("negative schema version {found}"),
    })?;
    if from == MIGRATIONS.len() {
        return Ok(());
    }
    for sql in &MIGRATIONS[from..] {
        tx.batch_execute(sql)?;
    }
    tx.execute("UPDATE voxgate_schema SET version = $1", &[&supported])?;
    tx.commit()?;
    tracing::info!(from = found, to = supported, "directory schema migrated");
    Ok(())
}

fn prepare(client: &mut Client) -> Result<Statements, PgOrStore> {
    Ok(Statements {
        user: client.prepare(&format!(
            "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE username = $1"
        ))?,
        user_by_number: client.prepare(&format!(
            "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE number = $1"
        ))?,
        // Every prefix of the number, looked up by primary key; the longest match wins.
        route_for: client.prepare(&format!(
            "SELECT {ROUTE_COLUMNS} FROM routes WHERE prefix = ANY($1::text[])
             ORDER BY length(prefix) DESC LIMIT 1"
        ))?,
        typical_iterations: client.prepare(
            "SELECT iterations FROM subscribers GROUP BY iterations
             ORDER BY count(*) DESC, iterations DESC LIMIT 1",
        )?,
    })
}

fn subscriber(row: &Row) -> Result<Subscriber, PgOrStore> {
    let user: String = row.try_get(0)?;
    let corrupt = |what: &str| StoreError::Corrupt {
        what: format!("subscriber {user:?}: {what}"),
    };
    let iterations: i64 = row.try_get(3)?;
    let iterations = u32::try_from(iterations).map_err(|_| corrupt("iteration count"))?;
    let stored_key: Vec<u8> = row.try_get(4)?;
    let server_key: Vec<u8> = row.try_get(5)?;
    let stored_key = <[u8; 32]>::try_from(stored_key).map_err(|_| corrupt("stored key length"))?;
    let server_key = <[u8; 32]>::try_from(server_key).map_err(|_| corrupt("server key length"))?;
    Ok(Subscriber {
        number: row.try_get(1)?,
        verifier: Verifier {
            salt: row.try_get(2)?,
            iterations,
            stored_key,
            server_key,
        },
        user,
        // Not kept on PostgreSQL yet (schema 1): any route.
        allow_prefixes: None,
    })
}

fn route(row: &Row) -> Result<Route, PgOrStore> {
    let prefix: String = row.try_get(0)?;
    let addr: String = row.try_get(1)?;
    let media_addr = addr.parse().map_err(|_| StoreError::Corrupt {
        what: format!("route {prefix:?}: media address {addr:?}"),
    })?;
    Ok(Route {
        prefix,
        media_addr,
        description: row.try_get(2)?,
        // Not kept on PostgreSQL yet (schema 1): one call at a time.
        ports: 1,
    })
}

impl Store for PostgresStore {
    fn add_user(&mut self, s: &Subscriber) -> Result<(), StoreError> {
        validate_subscriber(s)?;
        let v = &s.verifier;
        let iterations = i64::from(v.iterations);
        let params: [&(dyn ToSql + Sync); 6] = [
            &s.user,
            &s.number,
            &v.salt,
            &iterations,
            &v.stored_key.as_slice(),
            &v.server_key.as_slice(),
        ];
        self.with_conn(false, |c| {
            // Both unique columns at once; which one was taken is asked afterwards (a user
            // name taken wins, as in SQLite). A row deleted in between: insert again.
            for _ in 0..3 {
                let n = c.client.execute(
                    &format!(
                        "INSERT INTO subscribers ({SUBSCRIBER_COLUMNS})
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
                    ),
                    &params,
                )?;
                if n == 1 {
                    return Ok(());
                }
                if c.client.query_opt(&c.stmts.user, &[&s.user])?.is_some() {
                    return Err(StoreError::DuplicateUser {
                        user: s.user.clone(),
                    }
                    .into());
                }
                if c.client
                    .query_opt(&c.stmts.user_by_number, &[&s.number])?
                    .is_some()
                {
                    return Err(StoreError::DuplicateNumber {
                        number: s.number.clone(),
                    }
                    .into());
                }
            }
            Err(StoreError::Corrupt {
                what: format!("subscriber {:?}: insert keeps conflicting", s.user),
            }
            .into())
        })
    }

    fn del_user(&mut self, user: &str) -> Result<bool, StoreError> {
        validate_user(user)?;
        self.with_conn(false, |c| {
            Ok(c.client
                .execute("DELETE FROM subscribers WHERE username = $1", &[&user])?
                > 0)
        })
    }

    fn set_verifier(&mut self, user: &str, v: &Verifier) -> Result<bool, StoreError> {
        validate_user(user)?;
        validate_verifier(v)?;
        let iterations = i64::from(v.iterations);
        self.with_conn(false, |c| {
            Ok(c.client.execute(
                "UPDATE subscribers SET salt = $2, iterations = $3, stored_key = $4, server_key = $5
                 WHERE username = $1",
                &[
                    &user,
                    &v.salt,
                    &iterations,
                    &v.stored_key.as_slice(),
                    &v.server_key.as_slice(),
                ],
            )? > 0)
        })
    }

    fn user(&self, user: &str) -> Result<Option<Subscriber>, StoreError> {
        validate_user(user)?;
        self.with_conn(true, |c| {
            c.client
                .query_opt(&c.stmts.user, &[&user])?
                .map(|r| subscriber(&r))
                .transpose()
        })
    }

    fn user_by_number(&self, number: &str) -> Result<Option<Subscriber>, StoreError> {
        validate_number(number)?;
        self.with_conn(true, |c| {
            c.client
                .query_opt(&c.stmts.user_by_number, &[&number])?
                .map(|r| subscriber(&r))
                .transpose()
        })
    }

    fn list_users(&self) -> Result<Vec<Subscriber>, StoreError> {
        self.with_conn(true, |c| {
            c.client
                .query(
                    &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers ORDER BY username"),
                    &[],
                )?
                .iter()
                .map(subscriber)
                .collect()
        })
    }

    fn add_route(&mut self, r: &Route) -> Result<(), StoreError> {
        validate_route(r)?;
        let addr = r.media_addr.to_string();
        let n = self.with_conn(false, |c| {
            Ok(c.client.execute(
                &format!(
                    "INSERT INTO routes ({ROUTE_COLUMNS}) VALUES ($1, $2, $3)
                     ON CONFLICT (prefix) DO NOTHING"
                ),
                &[&r.prefix, &addr, &r.description],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::DuplicateRoute {
                prefix: r.prefix.clone(),
            });
        }
        Ok(())
    }

    fn del_route(&mut self, prefix: &str) -> Result<bool, StoreError> {
        validate_prefix(prefix)?;
        self.with_conn(false, |c| {
            Ok(c.client
                .execute("DELETE FROM routes WHERE prefix = $1", &[&prefix])?
                > 0)
        })
    }

    fn list_routes(&self) -> Result<Vec<Route>, StoreError> {
        self.with_conn(true, |c| {
            c.client
                .query(
                    &format!("SELECT {ROUTE_COLUMNS} FROM routes ORDER BY prefix"),
                    &[],
                )?
                .iter()
                .map(route)
                .collect()
        })
    }

    fn route_for(&self, number: &str) -> Result<Option<Route>, StoreError> {
        validate_number(number)?;
        // ASCII (validated), so every byte index is a char boundary.
        let prefixes: Vec<&str> = (1..=number.len()).map(|end| &number[..end]).collect();
        self.with_conn(true, |c| {
            c.client
                .query_opt(&c.stmts.route_for, &[&prefixes])?
                .map(|r| route(&r))
                .transpose()
        })
    }

    fn typical_iterations(&self) -> Result<Option<u32>, StoreError> {
        self.with_conn(true, |c| {
            let n: Option<i64> = c
                .client
                .query_opt(&c.stmts.typical_iterations, &[])?
                .map(|r| r.try_get(0))
                .transpose()?;
            Ok(n.and_then(|n| u32::try_from(n).ok()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn the_target_is_shown_without_its_password() {
        let c = postgres::Config::from_str(
            "postgres://voxgate:s3cret-pw@db.example.net:6432/directory",
        )
        .unwrap();
        let t = PgTarget::new(c, Duration::from_secs(5));
        assert_eq!(
            t.to_string(),
            "postgres://voxgate@db.example.net:6432/directory"
        );
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("s3cret") && dbg.contains("redacted"), "{dbg}");
        assert!(t.has_password());
        let c = postgres::Config::from_str("postgres://u@[::1]/d").unwrap();
        assert_eq!(
            PgTarget::new(c, Duration::from_secs(1)).to_string(),
            "postgres://u@[::1]:5432/d"
        );
    }

    #[test]
    fn a_server_that_is_not_there_is_unavailable_and_named() {
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user("voxgate")
            .dbname("dir")
            .password("hunter2-secret");
        let e = PostgresStore::connect(PgTarget::new(c, Duration::from_secs(2))).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
        assert!(
            text.starts_with(&format!(
                "directory postgres://voxgate@127.0.0.1:{port}/dir is unavailable: "
            )),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
}
