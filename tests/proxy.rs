//! A phone whose only way out is an HTTP proxy: its control connection and its TCP media
//! connections go through CONNECT (credentials sent after the proxy's 407), its probe reports
//! UDP blocked both ways, and a call with a peer on UDP carries audio byte-exact both ways.
//! The proxy is a small CONNECT relay written here, on loopback, that records what it was asked.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::{
    BIN, Gateway, finish, spawn_phone, spawn_phone_at, test_clip, ulaw_round_trip_padded,
};
use voxgate::client::wav;

#[derive(Default)]
struct Seen {
    /// CONNECT targets tunnelled.
    tunnels: Vec<String>,
    /// 407 answers given.
    challenges: usize,
    /// Anything that was not a CONNECT.
    other: usize,
}

/// A CONNECT proxy on loopback that wants `user:pass` (Basic).
fn proxy(user: &str, pass: &str) -> (u16, Arc<Mutex<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (s, want) = (s.clone(), want.clone());
            std::thread::spawn(move || serve(c, &s, &want));
        }
    });
    (port, seen)
}

fn serve(mut c: TcpStream, seen: &Mutex<Seen>, want: &str) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if c.read(&mut b).unwrap_or(0) == 0 {
            return;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let [method, target, _] = first[..] else {
        seen.lock().unwrap().other += 1;
        return;
    };
    if method != "CONNECT" {
        seen.lock().unwrap().other += 1;
        let _ = c.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
        return;
    }
    let authorized = lines.any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.eq_ignore_ascii_case("proxy-authorization") && v.trim() == want)
    });
    if !authorized {
        seen.lock().unwrap().challenges += 1;
        let _ = c.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n\r\n",
        );
        return;
    }
    let Ok(up) = TcpStream::connect(target) else {
        let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    seen.lock().unwrap().tunnels.push(target.to_owned());
    let _ = c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
    let mut up = up;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut c, &mut up);
    let _ = up.shutdown(Shutdown::Write);
}

fn probe(gw: &Gateway, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "probe",
        "--server",
        &gw.control,
        "--user",
        "carol",
        "--password-stdin",
        "--json",
        "--wait",
        "10",
    ])
    .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::run_with_stdin(&mut cmd, &format!("{}\n", common::password("carol")));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}

#[test]
fn a_phone_behind_an_http_proxy_calls_over_tcp_through_it() {
    let mut gw = Gateway::start(&[]);
    let (port, seen) = proxy("px", "s3cret");
    let url = format!("http://px:s3cret@127.0.0.1:{port}");
    let control_port = gw.control.rsplit(':').next().unwrap().to_owned();

    // Probe through the proxy: logged in, and UDP reported blocked both ways.
    let (code, said) = probe(&gw, &["--proxy", &url], &[]);
    assert_eq!(code, 0, "{said}");
    let j: serde_json::Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    assert_eq!(j["capabilities"]["send_udp"], false, "{j}");
    assert_eq!(j["capabilities"]["recv_udp"], false, "{j}");
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.tunnels, [format!("127.0.0.1:{control_port}")]);
        assert_eq!(s.challenges, 1, "credentials only after the 407");
    }
    // --proxy-user with the password from a file; the https_proxy variable names the proxy
    // (loopback destinations bypass it, so the explicit --proxy form is what carries it here:
    // a URL without credentials plus --proxy-user).
    let pw = gw.dir.path().join("proxy-pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let plain_url = format!("http://127.0.0.1:{port}");
    let (code, said) = probe(
        &gw,
        &[
            "--proxy",
            &plain_url,
            "--proxy-user",
            "px",
            "--proxy-password-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{said}");
    // ... or from VOXGATE_PROXY_PASSWORD; a wrong one is refused with a clear reason.
    let (code, said) = probe(
        &gw,
        &["--proxy", &plain_url, "--proxy-user", "px"],
        &[("VOXGATE_PROXY_PASSWORD", "wrong")],
    );
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("refused the credentials"), "{said}");
    // No credentials at all: the 407 is reported as such.
    let (code, said) = probe(&gw, &["--proxy", &plain_url], &[]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("requires authentication (407)"), "{said}");
    // The environment variable applies, but never to loopback destinations.
    let (code, said) = probe(&gw, &[], &[("https_proxy", "http://127.0.0.1:1")]);
    assert_eq!(code, 0, "loopback bypasses https_proxy: {said}");

    // A call: alice behind the proxy calls bob, who is on open UDP.
    let before = seen.lock().unwrap().tunnels.len();
    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "a-in.wav", 1.6);
    let b_in = test_clip(dir, "reply-8k.wav", "b-in.wav", 1.2);
    let (a_rec, b_rec) = (dir.join("a-rec.wav"), dir.join("b-rec.wav"));
    let mark = gw.log_len();
    let callee = spawn_phone(
        &gw,
        "bob",
        &[
            "--answer",
            "--play",
            b_in.to_str().unwrap(),
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    let caller = spawn_phone_at(
        &[],
        &gw,
        &gw.control,
        "alice",
        &[
            "--proxy",
            &url,
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--record",
            a_rec.to_str().unwrap(),
        ],
    );
    let (caller, callee) = (finish(caller), finish(callee));
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        assert_eq!(r.code, 0, "{who}: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
    // The proxied phone: TCP both ways; its peer: UDP both ways.
    assert_eq!(
        caller.json["plan"]["forward"], "tcp_in_udp_out",
        "{}",
        caller.json
    );
    assert_eq!(
        caller.json["plan"]["backward"], "udp_in_tcp_out",
        "{}",
        caller.json
    );
    assert_eq!(caller.json["transports"]["send"]["transport"], "tcp");
    assert_eq!(caller.json["transports"]["recv"]["transport"], "tcp");
    assert_eq!(callee.json["transports"]["send"]["transport"], "udp");
    assert_eq!(callee.json["transports"]["recv"]["transport"], "udp");
    // Both through the proxy: the control connection and a shard's TCP media port.
    let tunnels = seen.lock().unwrap().tunnels[before..].to_vec();
    assert!(
        tunnels.contains(&format!("127.0.0.1:{control_port}")),
        "{tunnels:?}"
    );
    assert!(
        tunnels
            .iter()
            .any(|t| *t != format!("127.0.0.1:{control_port}")),
        "TCP media went through the proxy too: {tunnels:?}"
    );
    assert_eq!(seen.lock().unwrap().other, 0);
    // Audio byte-exact both ways.
    for (who, sent, rec) in [("bob", &a_in, &b_rec), ("alice", &b_in, &a_rec)] {
        let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
        let got = wav::read(rec).unwrap();
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "{who} heard something else than was sent"
        );
    }
    gw.stop();
}

/// A real Squid (Debian package `squid`) on loopback, run by this test in the foreground: it
/// wants Basic credentials (`basic_ncsa_auth`) and allows CONNECT only to the gateway's control
/// port and its shards' TCP media ports. Killed on drop.
struct Squid {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Squid {
    fn start(squid: &Path, allowed: &[u16], user: &str, pass: &str) -> Squid {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Squid started as root works as the `proxy` user: it must write here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let hash = Command::new("openssl")
            .args(["passwd", "-apr1", pass])
            .output()
            .expect("openssl passwd");
        assert!(hash.status.success());
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            format!("{user}:{}\n", String::from_utf8_lossy(&hash.stdout).trim()),
        )
        .unwrap();
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
        let port = common::free_port();
        let d = dir.path().display();
        let ports: Vec<String> = allowed.iter().map(u16::to_string).collect();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             visible_hostname voxgate-test\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             coredump_dir {d}\n\
             cache deny all\n\
             shutdown_lifetime 0 seconds\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n\
             auth_param basic realm voxgate-test\n\
             acl gateway port {ports}\n\
             acl authed proxy_auth REQUIRED\n\
             http_access deny !authed\n\
             http_access allow CONNECT gateway\n\
             http_access deny all\n",
            passwd = passwd.display(),
            ports = ports.join(" "),
        );
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(squid)
            .args(["-N", "-f", conf_path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn squid");
        let s = Squid { child, port, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(s.dir.path().join("cache.log")).unwrap_or_default();
            assert!(
                std::time::Instant::now() < deadline,
                "squid did not start:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        s
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// The TCP media ports of the gateway's shards, from its log.
fn shard_tcp_ports(gw: &Gateway) -> Vec<u16> {
    gw.log_text()
        .lines()
        .filter(|l| l.contains("shard running"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tcp="))
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

#[test]
fn a_phone_behind_a_real_squid_calls_through_it() {
    let Some(squid) = common::need_tool("squid", "squid") else {
        return;
    };
    if common::need_tool("openssl", "openssl").is_none() {
        return;
    }
    let mut gw = Gateway::start(&[]);
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let control: u16 = gw.control.rsplit(':').next().unwrap().parse().unwrap();
    let media = shard_tcp_ports(&gw);
    assert_eq!(media.len(), 2, "{}", gw.log_text());
    let sq = Squid::start(&squid, &[&[control][..], &media].concat(), "px", "s3cret");
    let url = format!("http://px:s3cret@127.0.0.1:{}", sq.port);

    // Wrong credentials, and a port the proxy does not allow: refused by Squid, said clearly.
    let (code, said) = probe(
        &gw,
        &["--proxy", &format!("http://px:wrong@127.0.0.1:{}", sq.port)],
        &[],
    );
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("refused the credentials"), "{said}");

    // A call from behind Squid to bob on open UDP: TCP both ways for alice, audio exact.
    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "sq-a-in.wav", 1.6);
    let b_in = test_clip(dir, "reply-8k.wav", "sq-b-in.wav", 1.2);
    let (a_rec, b_rec) = (dir.join("sq-a-rec.wav"), dir.join("sq-b-rec.wav"));
    let mark = gw.log_len();
    let callee = spawn_phone(
        &gw,
        "bob",
        &[
            "--answer",
            "--play",
            b_in.to_str().unwrap(),
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    let caller = spawn_phone_at(
        &[],
        &gw,
        &gw.control,
        "alice",
        &[
            "--proxy",
            &url,
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--record",
            a_rec.to_str().unwrap(),
        ],
    );
    let (caller, callee) = (finish(caller), finish(callee));
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        assert_eq!(r.code, 0, "{who}: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
    }
    assert_eq!(caller.json["transports"]["send"]["transport"], "tcp");
    assert_eq!(caller.json["transports"]["recv"]["transport"], "tcp");
    assert_eq!(callee.json["transports"]["send"]["transport"], "udp");
    for (who, sent, rec) in [("bob", &a_in, &b_rec), ("alice", &b_in, &a_rec)] {
        let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
        let got = wav::read(rec).unwrap();
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "{who} heard something else than was sent"
        );
    }
    // Squid's own log: tunnels to the control port and to a media port, for user px.
    let log = sq.access_log();
    assert!(
        log.lines().any(|l| l.contains("CONNECT")
            && l.contains(&format!(":{control}"))
            && l.contains(" px ")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("CONNECT") && media.iter().any(|p| l.contains(&format!(":{p}")))),
        "TCP media through Squid:\n{log}"
    );
    gw.stop();
}
