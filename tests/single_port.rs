//! One port for everything (`[single_port]`): control and TCP media share one TCP port, told
//! apart by their first bytes, and media connections are handed to the shard that holds their
//! leg. Calls whose both directions are TCP through the gateway carry audio byte-exact over
//! that one port: plain RFC 4571, TLS media relayed in userspace, and TLS media on kernel TLS
//! where the kernel has it (where it does not, the gateway refuses to start and says why).
//! Everything runs on loopback; certificates are made here with rcgen.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{BIN, Gateway, finish, spawn_phone_at, test_clip, ulaw_round_trip_padded};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use voxgate::client::{binding, wav};

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "voxgate single-port test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let p = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&p.ca, ca.pem()).unwrap();
    std::fs::write(&p.cert, leaf.pem()).unwrap();
    std::fs::write(&p.key, leaf_key.serialize_pem()).unwrap();
    p
}

/// The shared port, from the ready line.
fn single_port(gw: &Gateway) -> u16 {
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let log = gw.log_text();
    let ready = log
        .lines()
        .find(|l| l.contains("voxgate is ready"))
        .expect("ready line");
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("single_port="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no single port in {ready}"))
}

/// A call from alice to bob, both phones refusing UDP (TCP both ways through the gateway),
/// control and media over `server`; alice's audio must arrive byte-exact at bob. Returns the
/// gateway's log lines about media connections handed to shards.
fn call_over(gw: &Gateway, server: &str, extra: &[&str]) -> Vec<String> {
    let a_in = test_clip(gw.dir.path(), "speech-8k.wav", "a-in.wav", 2.0);
    let b_rec = gw.dir.path().join("b-rec.wav");
    let mark = gw.log_len();
    let mut callee_args = extra.to_vec();
    let rec = b_rec.to_str().unwrap().to_owned();
    callee_args.extend([
        "--answer",
        "--record",
        &rec,
        "--wait",
        "20",
        "--firewall",
        "no-udp",
    ]);
    let callee = spawn_phone_at(&[], gw, server, "bob", &callee_args);
    gw.wait_online(mark, "bob");
    let mut caller_args = extra.to_vec();
    let play = a_in.to_str().unwrap().to_owned();
    caller_args.extend([
        "--call",
        "+15550002",
        "--play",
        &play,
        "--duration",
        "3",
        "--firewall",
        "no-udp",
    ]);
    let caller = spawn_phone_at(&[], gw, server, "alice", &caller_args);
    let (ra, rb) = (finish(caller), finish(callee));
    assert_eq!(ra.code, 0, "{}\n{}", ra.json, ra.stderr);
    assert_eq!(rb.code, 0, "{}\n{}", rb.json, rb.stderr);
    assert_eq!(rb.json["received"]["lost"], 0, "{}", rb.json);
    let want = ulaw_round_trip_padded(&wav::read(&a_in).unwrap());
    let got = wav::read(&b_rec).unwrap();
    assert!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "the recording differs from what was sent"
    );
    gw.log_text()
        .lines()
        .skip(mark)
        .filter(|l| l.contains("media connection handed to its shard"))
        .map(str::to_owned)
        .collect()
}

fn start(cfg: &str, dir: &Path) -> Gateway {
    let path = dir.join("voxgate.toml");
    std::fs::write(&path, cfg).unwrap();
    // Two shards: the shared port must find the one that holds each leg.
    Gateway::start(&["--config", path.to_str().unwrap()])
}

/// A plain RFC 4571 Binding request for a leg nobody has: the port must close the connection
/// (plain media off, or no such leg) without answering.
fn stranger_media_is_closed(port: u16) {
    let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 512];
    let n = binding::request(&mut buf, "0123456789abcdef0123456789abcdef", b"k", &[1; 12]).unwrap();
    let mut f = (n as u16).to_be_bytes().to_vec();
    f.extend_from_slice(&buf[..n]);
    t.write_all(&f).unwrap();
    assert_closed(&mut t);
}

/// The gateway closed the connection without a word (EOF, or a reset since our bytes were
/// left unread); a time-out fails.
fn assert_closed(t: &mut std::net::TcpStream) {
    let mut got = [0u8; 16];
    match t.read(&mut got) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed unanswered, got {other:?}"),
    }
}

#[test]
fn plain_control_and_plain_tcp_media_share_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start("[single_port]\nport = 0\nmedia = \"plain\"\n", dir.path());
    let port = single_port(&gw);
    let handed = call_over(&gw, &format!("127.0.0.1:{port}"), &[]);
    // Both phones' TCP media came in on the shared port (they were told it) as plain media.
    assert_eq!(handed.len(), 2, "{handed:?}");
    assert!(
        handed
            .iter()
            .all(|l| l.contains("how=\"plain\"") || l.contains("how=plain")),
        "{handed:?}"
    );
    stranger_media_is_closed(port);
    // Neither TLS nor HTTP is served on a plain single port.
    let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut t);
    gw.stop();
}

#[test]
fn tls_control_and_tls_media_share_one_port_userspace() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut gw = start(
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 0\nplain_control = false\n\
             [single_port]\nport = 0\nmedia = \"tls\"\ntls_engine = \"userspace\"\n",
            p.cert.to_str().unwrap(),
            p.key.to_str().unwrap()
        ),
        dir.path(),
    );
    let port = single_port(&gw);
    let handed = call_over(
        &gw,
        &format!("tls://127.0.0.1:{port}"),
        &["--ca", p.ca.to_str().unwrap()],
    );
    assert_eq!(handed.len(), 2, "{handed:?}");
    assert!(handed.iter().all(|l| l.contains("tls")), "{handed:?}");
    // Plain media is not taken where TLS media is configured: nothing in the clear.
    stranger_media_is_closed(port);
    gw.stop();
}

#[test]
fn kernel_tls_media_or_a_clear_refusal_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let cfg = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 0\n\
         [single_port]\nport = 0\nmedia = \"tls\"\ntls_engine = \"kernel\"\n",
        p.cert.to_str().unwrap(),
        p.key.to_str().unwrap()
    );
    match voxgate::server::ktls::available() {
        Ok(()) => {
            let mut gw = start(&cfg, dir.path());
            let port = single_port(&gw);
            let handed = call_over(
                &gw,
                &format!("tls://127.0.0.1:{port}"),
                &["--ca", p.ca.to_str().unwrap()],
            );
            assert_eq!(handed.len(), 2, "{handed:?}");
            assert!(handed.iter().all(|l| l.contains("ktls")), "{handed:?}");
            gw.stop();
        }
        Err(why) => {
            eprintln!(
                "NOTE: this kernel has no kernel TLS ({why}); checking that the gateway refuses \
                 to start instead of carrying media in the clear"
            );
            let path = dir.path().join("voxgate.toml");
            std::fs::write(&path, &cfg).unwrap();
            let data = dir.path().join("data");
            let out = Command::new(BIN)
                .args([
                    "serve",
                    "--config",
                    path.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1",
                    "--control-port",
                    "0",
                    "--media-port-base",
                    "0",
                    "--probe-ports",
                    "0,0",
                    "--shards",
                    "1",
                ])
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{said}");
            assert!(said.contains("kernel TLS is not available"), "{said}");
            assert!(said.contains("modprobe tls"), "{said}");
            assert!(
                said.contains("tls_engine = \\\"userspace\\\"")
                    || said.contains("tls_engine = \"userspace\""),
                "{said}"
            );
        }
    }
}

/// Connections on the shared port count against the control connection limits from accept
/// until they are sorted (the first bytes and the TLS handshake are work those limits bound):
/// idle connections that never say a byte use up their source's slots, a further connection
/// from that source is closed at once, and the slots come back when the idle ones go. A media
/// connection stops counting once it is handed to its shard.
#[test]
fn silent_connections_count_against_the_limits_until_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start(
        "[single_port]\nport = 0\nmedia = \"plain\"\n\
         [limits]\nconnections_per_source = 2\n# Loopback is exempt by default.\nexempt_sources = []\n",
        dir.path(),
    );
    let port = single_port(&gw);
    let idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mark = gw.log_len();
    let mut third = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    assert_closed(&mut third);
    gw.wait_log(mark, "the refusal", |l| {
        l.contains("shared-port connections refused at accept")
    });
    drop(idle);
    // The slots come back: a log-in over the shared port works again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = common::run_with_stdin(
            Command::new(BIN).args([
                "probe",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--user",
                "alice",
                "--password-stdin",
                "--wait",
                "10",
            ]),
            &format!("{}\n", common::password("alice")),
        );
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slots not given back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    gw.stop();
}
