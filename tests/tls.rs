//! TLS on the control channel: the phone verifies the gateway's certificate (a wrong CA is
//! refused with a clear error), the SCRAM log-in is bound to the TLS session (a relay through a
//! TLS-terminating man in the middle fails), and a new certificate is picked up on SIGHUP while
//! a call goes on. Certificates are made here with rcgen; everything runs on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, Gateway, finish, spawn_phone_at, test_clip, ulaw_round_trip_padded};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use voxgate::client::wav;

/// A test CA and one server certificate it signed (for `localhost` and 127.0.0.1), as PEM
/// files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, name: &str) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("voxgate test CA {name}"));
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let p = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&p.ca, ca.pem()).unwrap();
    std::fs::write(&p.cert, leaf.pem()).unwrap();
    std::fs::write(&p.key, leaf_key.serialize_pem()).unwrap();
    p
}

fn tls_config(pki: &Pki) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 0\n",
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap()
    )
}

/// The TLS control listener's port, from the ready line.
fn tls_port(gw: &Gateway) -> u16 {
    // The ready line reaches the log right after the start-up saw it.
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let log = gw.log_text();
    let ready = log
        .lines()
        .find(|l| l.contains("voxgate is ready"))
        .expect("ready line");
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("control_tls="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no TLS listener in {ready}"))
}

/// `voxgate probe` as `user` against `server` with `extra` flags: (exit code, stdout+stderr).
fn probe(server: &str, user: &str, extra: &[&str]) -> (i32, String) {
    let out = common::run_with_stdin(
        Command::new(BIN)
            .args([
                "probe",
                "--server",
                server,
                "--user",
                user,
                "--password-stdin",
                "--wait",
                "10",
            ])
            .args(extra),
        &format!("{}\n", common::password(user)),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}

/// A man in the middle on loopback: accepts TLS with its own certificate (`front`), and opens
/// its own connection to the gateway at `upstream` (TLS trusting `upstream_ca`, or plain TCP
/// when `None`), relaying the bytes between the two. Returns its port.
fn man_in_the_middle(front: &Pki, upstream: u16, upstream_ca: Option<&Path>) -> u16 {
    let server = voxgate::server::tls_server_config(&front.cert, &front.key).unwrap();
    let client = upstream_ca.map(|ca| {
        voxgate::client::tls::client_config(&voxgate::client::tls::TlsOptions {
            ca: Some(ca.to_owned()),
        })
        .unwrap()
    });
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (server, client) = (server.clone(), client.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(server);
                    let Ok(mut down) = acceptor.accept(s).await else {
                        return;
                    };
                    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    match client {
                        Some(c) => {
                            let mut up =
                                voxgate::client::tls::handshake(tcp, "127.0.0.1", c.clone())
                                    .await
                                    .unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                        None => {
                            let mut up = tcp;
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    }
                });
            }
        });
    });
    port
}

#[test]
fn the_phone_verifies_the_gateway_and_binds_its_log_in_to_tls() {
    let dir = tempfile::tempdir().unwrap();
    let real = pki(dir.path(), "real");
    let other = pki(dir.path(), "other");
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(&cfg, tls_config(&real)).unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let port = tls_port(&gw);
    let tls_server = format!("tls://127.0.0.1:{port}");
    let ca = |p: &Pki| p.ca.to_str().unwrap().to_owned();

    // The right CA: logged in, over TLS, with the binding checked.
    let (code, said) = probe(&tls_server, "alice", &["--ca", &ca(&real), "--json"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("\"result\":\"ok\""), "{said}");
    // `--tls` with HOST:PORT is the same thing.
    let (code, said) = probe(
        &format!("127.0.0.1:{port}"),
        "bob",
        &["--tls", "--ca", &ca(&real)],
    );
    assert_eq!(code, 0, "{said}");

    // A CA that did not sign the gateway's certificate: refused before any log-in.
    let (code, said) = probe(&tls_server, "alice", &["--ca", &ca(&other)]);
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("certificate is not trusted") && said.contains("UnknownIssuer"),
        "{said}"
    );
    // The name checked is the server's host name: "localhost" is in the certificate too.
    let (code, said) = probe(
        &format!("tls://localhost:{port}"),
        "alice",
        &["--ca", &ca(&real)],
    );
    assert_eq!(code, 0, "{said}");

    // A TLS-terminating man in the middle whose certificate the phone trusts, relaying to the
    // gateway over its own TLS session: the password is right, the binding is not.
    let mitm = man_in_the_middle(&other, port, Some(&real.ca));
    let (code, said) = probe(
        &format!("tls://127.0.0.1:{mitm}"),
        "alice",
        &["--ca", &ca(&other)],
    );
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("auth_failed") && said.contains("channel binding does not match"),
        "{said}"
    );
    // ... and one that talks plain TCP to the gateway's plaintext listener.
    let plain_port: u16 = gw.control.rsplit(':').next().unwrap().parse().unwrap();
    let mitm = man_in_the_middle(&other, plain_port, None);
    let (code, said) = probe(
        &format!("tls://127.0.0.1:{mitm}"),
        "alice",
        &["--ca", &ca(&other)],
    );
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("auth_failed") && said.contains("connection to the gateway is not TLS"),
        "{said}"
    );
    // Plain TCP stays possible where the operator leaves it on (`plain_control`).
    let (code, said) = probe(&gw.control, "carol", &[]);
    assert_eq!(code, 0, "{said}");
    gw.stop();
}

#[test]
fn sighup_loads_a_new_certificate_without_dropping_a_tls_call() {
    let dir = tempfile::tempdir().unwrap();
    let first = pki(dir.path(), "first");
    let second = pki(dir.path(), "second");
    let live = Pki {
        ca: first.ca.clone(),
        cert: dir.path().join("live-cert.pem"),
        key: dir.path().join("live-key.pem"),
    };
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(&cfg, tls_config(&live)).unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let port = tls_port(&gw);
    let server = format!("tls://127.0.0.1:{port}");
    let first_ca = first.ca.to_str().unwrap();

    // A call between two TLS phones (the caller on TCP media), 4 s of speech.
    let a_in = test_clip(gw.dir.path(), "speech-8k.wav", "a-in.wav", 2.5);
    let b_rec = gw.dir.path().join("b-rec.wav");
    let mark = gw.log_len();
    let callee = spawn_phone_at(
        &[],
        &gw,
        &server,
        "bob",
        &[
            "--ca",
            first_ca,
            "--answer",
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone_at(
        &[],
        &gw,
        &server,
        "alice",
        &[
            "--ca",
            first_ca,
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--duration",
            "4",
            "--firewall",
            "no-udp",
        ],
    );
    gw.wait_log(mark, "the call's media", |l| {
        l.contains("media instructions sent")
    });

    // Mid-call: the second certificate (another CA) replaces the first, SIGHUP.
    std::fs::copy(&second.cert, &live.cert).unwrap();
    std::fs::copy(&second.key, &live.key).unwrap();
    let mark = gw.log_len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the certificate reload", |l| {
        l.contains("TLS certificate reloaded")
    });
    // New log-ins see the new certificate: the old CA is refused, the new one accepted.
    let (code, said) = probe(&server, "carol", &["--ca", first_ca]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("certificate is not trusted"), "{said}");
    let (code, said) = probe(&server, "carol", &["--ca", second.ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{said}");

    // The call went on: both ends finish normally, the audio byte-exact.
    let (ra, rb) = (finish(caller), finish(callee));
    assert_eq!(ra.code, 0, "{}", ra.json);
    assert_eq!(rb.code, 0, "{}", rb.json);
    assert_eq!(rb.json["received"]["lost"], 0, "{}", rb.json);
    let want = ulaw_round_trip_padded(&wav::read(&a_in).unwrap());
    let got = wav::read(&b_rec).unwrap();
    assert!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "the recording differs from what was sent"
    );

    // A certificate file that does not load keeps the running one.
    std::fs::write(&live.cert, "not a certificate").unwrap();
    let mark = gw.log_len();
    // SAFETY: as above.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the refusal", |l| {
        l.contains("TLS certificate not reloaded")
    });
    let (code, said) = probe(&server, "carol", &["--ca", second.ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{said}");
    gw.stop();
}

#[test]
fn plain_and_tls_control_can_share_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let real = pki(dir.path(), "real");
    let port = common::free_port();
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        tls_config(&real).replace("control_port = 0", &format!("control_port = {port}")),
    )
    .unwrap();
    let p = port.to_string();
    let mut gw = Gateway::start_on(
        &[],
        &[
            "--listen",
            "::",
            "--control-port",
            &p,
            "--media-port-base",
            "0",
            "--probe-ports",
            "0,0",
        ],
        "127.0.0.1",
        &["--config", cfg.to_str().unwrap(), "--shutdown-grace-s", "5"],
    );
    assert_eq!(tls_port(&gw), port);
    assert!(
        gw.log_text()
            .contains("plain and TLS control share this port")
    );
    // The same port answers TLS (log-in bound to it) and plain control.
    let (code, said) = probe(
        &format!("tls://127.0.0.1:{port}"),
        "alice",
        &["--ca", real.ca.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{said}");
    let (code, said) = probe(&format!("127.0.0.1:{port}"), "bob", &[]);
    assert_eq!(code, 0, "{said}");
    gw.stop();
}

#[test]
fn tls_only_gateways_answer_no_plain_control() {
    let dir = tempfile::tempdir().unwrap();
    let real = pki(dir.path(), "real");
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        format!("{}plain_control = false\n", tls_config(&real)),
    )
    .unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let port = tls_port(&gw);
    // The only control listener is the TLS one.
    assert!(gw.control.ends_with(&format!(":{port}")), "{}", gw.control);
    let (code, said) = probe(
        &format!("tls://127.0.0.1:{port}"),
        "alice",
        &["--ca", real.ca.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{said}");
    // A plain client gets no log-in there.
    let (code, said) = probe(&format!("127.0.0.1:{port}"), "bob", &[]);
    assert_ne!(code, 0, "{said}");
    assert!(!said.contains("\"result\":\"ok\""), "{said}");
    gw.stop();
}

/// Connections on the TLS port are counted by the connection limits before their handshake:
/// idle connections that never say ClientHello use up their source's slots (and no more), and
/// give them back when they go.
#[test]
fn pending_handshakes_count_against_the_connection_limits() {
    let dir = tempfile::tempdir().unwrap();
    let real = pki(dir.path(), "real");
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[limits]\nconnections_per_source = 2\n# Loopback is exempt by default.\nexempt_sources = []\n",
            tls_config(&real)
        ),
    )
    .unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let port = tls_port(&gw);
    let server = format!("tls://127.0.0.1:{port}");
    let ca = real.ca.to_str().unwrap().to_owned();
    let idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mark = gw.log_len();
    let (code, said) = probe(&server, "alice", &["--ca", &ca]);
    assert_ne!(
        code, 0,
        "a third connection from the source is refused: {said}"
    );
    gw.wait_log(mark, "the refusal", |l| {
        l.contains("TLS control connections refused at accept")
    });
    drop(idle);
    // The slots come back once the idle connections are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, said) = probe(&server, "alice", &["--ca", &ca]);
        if code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slots not given back: {said}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    gw.stop();
}

/// A plain CONNECT relay (no authentication) on loopback; returns its port and the targets it
/// tunnelled to.
fn connect_proxy() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if c.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                let Ok(mut up) = std::net::TcpStream::connect(&target) else {
                    return;
                };
                s.lock().unwrap().push(target);
                c.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut up2, &mut c2));
                let _ = std::io::copy(&mut c, &mut up);
            });
        }
    });
    (port, seen)
}

/// TLS runs end to end inside an HTTP proxy's tunnel: the proxy sees only ciphertext, and the
/// log-in's channel binding holds.
#[test]
fn tls_through_an_http_proxy_keeps_the_channel_binding() {
    let dir = tempfile::tempdir().unwrap();
    let real = pki(dir.path(), "real");
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(&cfg, tls_config(&real)).unwrap();
    let mut gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let port = tls_port(&gw);
    let (proxy, seen) = connect_proxy();
    let (code, said) = probe(
        &format!("tls://127.0.0.1:{port}"),
        "alice",
        &[
            "--ca",
            real.ca.to_str().unwrap(),
            "--proxy",
            &format!("http://127.0.0.1:{proxy}"),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("\"send_udp\":false"), "{said}");
    assert_eq!(*seen.lock().unwrap(), [format!("127.0.0.1:{port}")]);
    gw.stop();
}
