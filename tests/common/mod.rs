//! Test support: a `voxgate serve` process with users, softphone processes, audio helpers.
//! Every process started here is killed when its handle drops (a failing test leaves nothing
//! running).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use voxgate::client::{g711, wav};

pub mod pg;
pub mod redis;
pub mod shard;

pub const BIN: &str = env!("CARGO_BIN_EXE_voxgate");

pub fn password(user: &str) -> String {
    format!("{user}-password")
}

/// A single-threaded runtime for a phone the test drives itself (`voxgate::client::session`).
pub fn phone_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `user` logs in on `gw`'s control port with default phone options and waits (5 s at the
/// most) for its probe: its phone and the phone's events.
pub async fn log_in(
    gw: &Gateway,
    user: &str,
) -> (
    voxgate::client::session::Phone,
    tokio::sync::mpsc::Receiver<voxgate::client::session::Event>,
) {
    use voxgate::client::session::{Phone, PhoneOptions};
    let (phone, events) =
        Phone::connect(&gw.control, user, &password(user), PhoneOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{user} logs in: {e:?}"));
    phone.wait_capabilities(Duration::from_secs(5)).await;
    (phone, events)
}

/// Runs `cmd` with `text` on its standard input and returns its output.
pub fn run_with_stdin(cmd: &mut Command, text: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn voxgate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd` to the end; it must succeed (its standard error is the failure message).
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed on drop; its output goes to files (a pipe nobody reads would
/// block it).
pub struct Proc {
    pub child: Child,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub control: String,
    /// The admin listener (`/metrics`, `/health`) as the ready line names it, if enabled.
    pub admin: Option<String>,
    /// Command prefix that runs a program on the gateway's host (empty: this host).
    pub host: Vec<String>,
    proc: Option<Proc>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts `voxgate serve` on ephemeral loopback ports with users alice (+15550001), bob
    /// (+15550002) and carol (+15550003).
    pub fn start(extra: &[&str]) -> Gateway {
        Gateway::start_on(
            &[],
            &[
                "--listen",
                "::",
                "--control-port",
                "0",
                "--media-port-base",
                "0",
                "--probe-ports",
                "0,0",
                "--dump-interval",
                "1",
            ],
            "127.0.0.1",
            &if extra.contains(&"--shutdown-grace-s") {
                extra.to_vec()
            } else {
                [extra, &["--shutdown-grace-s", "5"]].concat()
            },
        )
    }

    /// [`Gateway::start`] with its directory elsewhere: `directory` (e.g. `--directory URL`)
    /// and `env` (e.g. `PGPASSWORD`) are given to `voxgate user add` and `voxgate serve`.
    pub fn start_with_directory(
        directory: &[&str],
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Gateway {
        Gateway::start_on_directory(
            &[],
            &[
                "--listen",
                "::",
                "--control-port",
                "0",
                "--media-port-base",
                "0",
                "--probe-ports",
                "0,0",
                "--dump-interval",
                "1",
            ],
            "127.0.0.1",
            &if extra.contains(&"--shutdown-grace-s") {
                extra.to_vec()
            } else {
                [extra, &["--shutdown-grace-s", "5"]].concat()
            },
            directory,
            env,
        )
    }

    /// Starts `voxgate serve` through `host` (e.g. `ip netns exec NS`), with `net` giving its
    /// addresses and ports; clients reach it at `reach_ip`.
    pub fn start_on(host: &[&str], net: &[&str], reach_ip: &str, extra: &[&str]) -> Gateway {
        Gateway::start_on_directory(host, net, reach_ip, extra, &[], &[])
    }

    fn start_on_directory(
        host: &[&str],
        net: &[&str],
        reach_ip: &str,
        extra: &[&str],
        directory: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        for (user, number) in [
            ("alice", "+15550001"),
            ("bob", "+15550002"),
            ("carol", "+15550003"),
        ] {
            let out = run_with_stdin(
                Command::new(BIN)
                    .args([
                        "user",
                        "add",
                        user,
                        "--number",
                        number,
                        "--password-stdin",
                        "--data-dir",
                        data.to_str().unwrap(),
                    ])
                    .args(directory)
                    .envs(env.iter().copied()),
                &format!("{}\n", password(user)),
            );
            // A directory shared with another gateway (PostgreSQL) may have them already.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || (!directory.is_empty() && err.contains("already exists")),
                "user add: {err}"
            );
        }
        let mut child = command(host, BIN)
            .args([
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--shards",
                "2",
                "--no-pin",
                "--allow-private-peers",
                "--log-level",
                "info",
            ])
            .args(
                if extra.contains(&"--admin-listen") || extra.contains(&"--no-admin") {
                    &[][..]
                } else {
                    // Many gateways run at once: never the fixed default admin port.
                    &["--admin-listen", "127.0.0.1:0"][..]
                },
            )
            .args(net)
            .args(extra)
            .args(directory)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn voxgate serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("voxgate is ready") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let proc = Proc {
            child,
            stdout: None,
            stderr: None,
        };
        let ready = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!("gateway did not start:\n{}", log.lock().unwrap().join("\n"))
            });
        let port = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("control="))
            .and_then(|a| a.rsplit(':').next())
            .expect("ready line names the control address")
            .to_owned();
        let admin = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .filter(|a| *a != "off")
            .map(str::to_owned);
        Gateway {
            dir,
            control: format!("{reach_ip}:{port}"),
            admin,
            host: host.iter().map(|s| s.to_string()).collect(),
            proc: Some(proc),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().map_or(0, |p| p.child.id() as i32)
    }

    /// SIGUSR1: write a dump interval now; returns the counters of the newest interval
    /// (merged over shards, as written to the `.counters.jsonl` dump).
    pub fn dump_counters(&self) -> serde_json::Value {
        let dir = self.dir.path().join("data/dumps");
        let lines_before = count_lines(&dir);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while count_lines(&dir) <= lines_before {
            assert!(Instant::now() < deadline, "no dump after SIGUSR1");
            std::thread::sleep(Duration::from_millis(10));
        }
        let newest = newest_jsonl(&dir).unwrap();
        let text = std::fs::read_to_string(newest).unwrap();
        let last = text.lines().last().unwrap();
        serde_json::from_str::<serde_json::Value>(last).unwrap()["all"].clone()
    }

    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line after `mark` satisfies `f`.
    pub fn wait_log(&self, mark: usize, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let log = self.log.lock().unwrap();
                if log[mark.min(log.len())..].iter().any(|l| f(l)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `user`'s next log-in (after `mark`) and its probe.
    pub fn wait_online(&self, mark: usize, user: &str) {
        let u = format!("user={user}");
        self.wait_log(mark, &format!("{user} to log in"), |l| {
            l.contains("logged in") && l.contains(&u)
        });
    }

    /// SIGTERM: the gateway drains and exits 0. Returns `voxgate stats` over its dumps.
    pub fn stop(&mut self) -> String {
        let mut p = self.proc.take().unwrap();
        let pid = p.child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "gateway exit: {status}\n{}",
            self.log_text()
        );
        let out = run_ok(
            Command::new(BIN)
                .arg("stats")
                .arg(self.dir.path().join("data/dumps")),
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// `GET path` from `addr` over HTTP/1.0 (no chunking): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// A system tool a test needs (e.g. `promtool`). Missing: says so loudly, and under CI=true
/// fails the test (scripts/test-all installs it); else the caller skips.
pub fn need_tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!(
            "{name} not found: install the Debian package {package} (scripts/test-all does, as root)"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {msg}");
        }
        eprintln!("\n*** SKIPPED: {msg} ***\n");
    }
    found
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot take port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn newest_jsonl(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".counters.jsonl"))
        .collect();
    v.sort();
    v.pop()
}

fn count_lines(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".counters.jsonl"))
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        })
        .sum()
}

/// `program` run through a host prefix such as `ip netns exec NS`.
pub fn command(host: &[&str], program: &str) -> Command {
    let mut c = match host.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    };
    // Phones honour https_proxy: tests name their proxies themselves.
    for v in ["https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"] {
        c.env_remove(v);
    }
    c
}

pub struct PhoneResult {
    pub code: i32,
    pub json: serde_json::Value,
    pub stderr: String,
}

/// Starts `voxgate phone --json` as `user` (password on stdin).
pub fn spawn_phone(gw: &Gateway, user: &str, args: &[&str]) -> Proc {
    spawn_phone_on(&[], gw, user, args)
}

/// `voxgate phone` on another host (`host`: a command prefix such as `ip netns exec NS`).
pub fn spawn_phone_on(host: &[&str], gw: &Gateway, user: &str, args: &[&str]) -> Proc {
    spawn_phone_at(host, gw, &gw.control, user, args)
}

/// [`spawn_phone_on`], reaching the gateway at `server` (e.g. its IPv6 address).
#[allow(dead_code)] // used by some test crates only
pub fn spawn_phone_at(
    host: &[&str],
    gw: &Gateway,
    server: &str,
    user: &str,
    args: &[&str],
) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = gw.dir.path().join(format!("phone-{user}-{n}.out"));
    let err = gw.dir.path().join(format!("phone-{user}-{n}.err"));
    let mut child = command(host, BIN)
        .args([
            "phone",
            "--server",
            server,
            "--user",
            user,
            "--password-stdin",
            "--json",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn voxgate phone");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{}\n", password(user)).as_bytes())
        .unwrap();
    Proc {
        child,
        stdout: Some(out),
        stderr: Some(err),
    }
}

pub fn finish(mut p: Proc) -> PhoneResult {
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let err = std::fs::read_to_string(p.stderr.as_ref().unwrap()).unwrap_or_default();
            panic!("phone did not finish:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(p.stdout.as_ref().unwrap()).unwrap_or_default();
    let err = std::fs::read_to_string(p.stderr.as_ref().unwrap()).unwrap_or_default();
    let json = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("phone printed no JSON ({e}): stdout={out:?}\nstderr={err}"));
    PhoneResult {
        code: status.code().unwrap_or(-1),
        json,
        stderr: err,
    }
}

pub fn run_phone(gw: &Gateway, user: &str, args: &[&str]) -> PhoneResult {
    finish(spawn_phone(gw, user, args))
}

/// The first `secs` seconds of a test recording, written to `dir/out`.
pub fn test_clip(dir: &Path, name: &str, out: &str, secs: f64) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let samples = wav::read(&src).unwrap();
    let n = ((secs * 8000.0) as usize).min(samples.len());
    let path = dir.join(out);
    wav::write(&path, &samples[..n]).unwrap();
    path
}

/// What a receiver must record: the samples after one G.711 µ-law round trip, the last
/// 20 ms frame padded with silence.
pub fn ulaw_round_trip_padded(samples: &[i16]) -> Vec<i16> {
    let mut v: Vec<i16> = samples.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
    v.resize(samples.len().div_ceil(160) * 160, 0);
    v
}

/// Signals a server the test started and waits up to `grace` for it to exit, then kills it.
pub fn stop_child(mut child: std::process::Child, signal: i32, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
