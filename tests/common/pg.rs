//! A private PostgreSQL server for one test: its own data directory and unix socket under a
//! temporary directory, its own TCP port on 127.0.0.1 (checked free), a superuser `voxgate`
//! with a random password (SCRAM over TCP). As root it runs as `nobody` (PostgreSQL refuses
//! to run as root); otherwise as the current user. Before it is used, the test checks that
//! the server answering on the port is the one it started (its `data_directory` is ours).
//! Dropping it stops the server (fast shutdown), also when the test fails; if the test
//! process dies, the server gets SIGQUIT (parent-death signal) and exits.
//!
//! Without the binaries (Debian package `postgresql`, which scripts/test-all installs as
//! root) [`PgServer::start`] says so loudly and returns `None`; under `CI=true` it panics.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "voxgate";

pub struct PgServer {
    root: tempfile::TempDir,
    bin: PathBuf,
    /// The unprivileged user the server runs as (`None`: this process's user).
    run_as: Option<(u32, u32)>,
    pub port: u16,
    pub password: String,
    child: Option<Child>,
}

/// `/usr/lib/postgresql/<newest>/bin`, if the server binaries are installed.
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

/// The user and group a private server runs as: `nobody` when this process is root (the
/// servers refuse root, and need not have it), else this process's own (`None`).
pub fn run_as_unprivileged() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("running as root, and there is no user `nobody` to run test servers as");
    Some((nobody.uid.as_raw(), nobody.gid.as_raw()))
}

/// A missing server: said loudly, and a failure under `CI=true`.
pub fn skip_or_fail(msg: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
}

impl PgServer {
    /// Initialises and starts a server; `None` (said loudly) when PostgreSQL is not installed.
    pub fn start() -> Option<PgServer> {
        let Some(bin) = pg_bin() else {
            skip_or_fail(
                "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: install the \
                 Debian package postgresql (scripts/test-all does, as root)",
            );
            return None;
        };
        let root = tempfile::Builder::new()
            .prefix("voxgate-pg-")
            .tempdir()
            .expect("temp dir");
        let run_as = run_as_unprivileged();
        let password = format!("pw-{:016x}", rand::random::<u64>());
        let pwfile = root.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        std::fs::create_dir(root.path().join("sock")).unwrap();
        if let Some((uid, gid)) = run_as {
            for p in [root.path(), &pwfile, &root.path().join("sock")] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut s = PgServer {
            bin,
            run_as,
            port: 0,
            password,
            child: None,
            root,
        };
        let out = s
            .command("initdb")
            .args(["-D"])
            .arg(s.data_dir())
            .args(["-U", USER, "--pwfile"])
            .arg(&pwfile)
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&pwfile);
        // A port free a moment ago may be taken by the time the server binds it: try again.
        for attempt in 0.. {
            s.port = super::free_port();
            match s.spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("could not") && log.contains("bind") => {}
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        Some(s)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(self.root.path()).env_remove("PGPASSWORD");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("postgres.log")
    }

    /// Starts the server on `self.port` and waits until it answers as itself; the error is
    /// its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut c = self.command("postgres");
        c.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.root.path().join("sock").display()
            ))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=60"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it runs in the child after the uid change, so
        // the parent-death signal survives it.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(c.spawn().expect("spawn postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if let Ok(mut client) = self.try_client("postgres") {
                let dir: String = client
                    .query_one("SELECT current_setting('data_directory')", &[])
                    .unwrap()
                    .get(0);
                assert_eq!(
                    Path::new(&dir).canonicalize().ok(),
                    self.data_dir().canonicalize().ok(),
                    "the server on port {} is not the one this test started",
                    self.port
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 30 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn try_client(&self, db: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .password(&self.password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(2))
            .connect(postgres::NoTls)
    }

    /// A superuser connection to database `db`.
    pub fn client(&self, db: &str) -> postgres::Client {
        self.try_client(db)
            .expect("connect to the private PostgreSQL")
    }

    /// Creates an empty database.
    pub fn create_db(&self, name: &str) {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
    }

    /// The URL of database `db`, without the password.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of database `db`, with the password (for the config file or the environment).
    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// A file (mode 0600) holding the password, in `dir`.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("directory-password");
        std::fs::write(&p, format!("{}\n", self.password)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Fast shutdown (clients are disconnected); waits for the server to exit.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        super::stop_child(child, libc::SIGINT, Duration::from_secs(20));
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        if let Err(log) = self.spawn() {
            panic!("PostgreSQL did not start again:\n{log}");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
