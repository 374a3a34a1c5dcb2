//! A private Redis server for one test: its own port on 127.0.0.1 (checked free), its own
//! directory and unix socket under a temporary directory, the `default` user switched off and
//! an ACL user `voxgate` with a random password. The configuration (with the password) is a
//! file of mode 0600, never a command-line argument. As root it runs as `nobody`. Before it
//! is used, the test checks that the server answering is the one it started (`CONFIG GET dir`
//! is ours). Dropping it stops the server, also when the test fails; if the test process
//! dies, the server gets SIGTERM (parent-death signal).
//!
//! Without `redis-server` (Debian package `redis-server`, which scripts/test-all installs as
//! root) [`RedisServer::start`] says so loudly and returns `None`; under `CI=true` it panics.
//!
//! [`RedisServer::command`] is a minimal RESP client for the tests' own checks; the gateway
//! will use a Redis crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pg::{run_as_unprivileged, skip_or_fail};

pub const USER: &str = "voxgate";

/// A RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub struct RedisServer {
    root: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    pub port: u16,
    pub password: String,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server; `None` (said loudly) when Redis is not installed.
    pub fn start() -> Option<RedisServer> {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        let Some(bin) = bin else {
            skip_or_fail(
                "redis-server not found: install the Debian package redis-server \
                 (scripts/test-all does, as root)",
            );
            return None;
        };
        let root = tempfile::Builder::new()
            .prefix("voxgate-redis-")
            .tempdir()
            .expect("temp dir");
        let run_as = run_as_unprivileged();
        std::fs::create_dir(root.path().join("data")).unwrap();
        if let Some((uid, gid)) = run_as {
            for p in [root.path().to_owned(), root.path().join("data")] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut s = RedisServer {
            root,
            bin,
            run_as,
            port: 0,
            password: format!("pw-{:016x}", rand::random::<u64>()),
            child: None,
        };
        for attempt in 0.. {
            s.port = super::free_port();
            match s.spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {}
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        Some(s)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("redis.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn write_config(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.root.path().join("redis.conf");
        let conf = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {dir}\n\
             unixsocket {root}/redis.sock\nunixsocketperm 700\nsave \"\"\nappendonly no\n\
             daemonize no\nlogfile \"\"\nuser default off\n\
             user {USER} on >{pw} ~* &* +@all\n",
            port = self.port,
            dir = self.data_dir().display(),
            root = self.root.path().display(),
            pw = self.password,
        );
        std::fs::write(&path, conf).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
        path
    }

    fn spawn(&mut self) -> Result<(), String> {
        let conf = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut c = Command::new(&self.bin);
        c.arg(&conf)
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        // SAFETY: prctl is async-signal-safe; it runs after the uid change.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(c.spawn().expect("spawn redis-server"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if let Ok(Reply::Array(Some(v))) = self.command(&["CONFIG", "GET", "dir"]) {
                let dir = match v.get(1) {
                    Some(Reply::Bulk(Some(d))) => String::from_utf8_lossy(d).into_owned(),
                    other => panic!("CONFIG GET dir: {other:?}"),
                };
                assert_eq!(
                    std::path::Path::new(&dir).canonicalize().ok(),
                    self.data_dir().canonicalize().ok(),
                    "the Redis on port {} is not the one this test started",
                    self.port
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 20 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs one command as user `voxgate` on a new connection: the reply to it (an `AUTH`
    /// refusal is returned as that error).
    pub fn command(&self, args: &[&str]) -> std::io::Result<Reply> {
        let mut conn = RespConn::connect(&self.addr())?;
        match conn.call(&["AUTH", USER, &self.password])? {
            Reply::Simple(ok) if ok == "OK" => conn.call(args),
            other => Ok(other),
        }
    }

    /// Stops the server (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        super::stop_child(child, libc::SIGTERM, Duration::from_secs(10));
    }

    /// Starts the stopped server again on the same port (its data is gone: no persistence).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        if let Err(log) = self.spawn() {
            panic!("redis-server did not start again:\n{log}");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One RESP connection (tests only).
pub struct RespConn {
    r: BufReader<TcpStream>,
}

impl RespConn {
    pub fn connect(addr: &str) -> std::io::Result<RespConn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(RespConn {
            r: BufReader::new(s),
        })
    }

    pub fn call(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        self.r.get_mut().write_all(&req)?;
        self.read()
    }

    fn read(&mut self) -> std::io::Result<Reply> {
        let bad = |what: &str| std::io::Error::other(format!("bad RESP: {what}"));
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad(line))?;
        let num = || rest.parse::<i64>().map_err(|_| bad(line));
        Ok(match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Integer(num()?),
            "$" => match num()? {
                -1 => Reply::Bulk(None),
                n if (0..=1 << 20).contains(&n) => {
                    let mut b = vec![0; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
                _ => return Err(bad(line)),
            },
            "*" => match num()? {
                -1 => Reply::Array(None),
                n if (0..=1024).contains(&n) => {
                    Reply::Array(Some((0..n).map(|_| self.read()).collect::<Result<_, _>>()?))
                }
                _ => return Err(bad(line)),
            },
            _ => return Err(bad(line)),
        })
    }
}
