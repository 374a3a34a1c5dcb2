//! One port for everything (`[single_port]`): control and TCP media share one TCP port, told
//! apart by their first bytes, and media connections are handed to the shard that holds their
//! leg. Calls whose both directions are TCP through the gateway carry audio byte-exact over
//! that one port: plain RFC 4571, TLS media relayed in userspace, TLS media whose records the
//! shard runs itself, and TLS media on kernel TLS where the kernel has it (where it does not,
//! the gateway refuses to start and says why).
//! Everything runs on loopback; certificates are made here with rcgen.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{BIN, Gateway, Proc, finish, spawn_phone_at, test_clip, ulaw_round_trip_padded};
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

/// A gateway serving TLS control and TLS media on the shared port, its TLS run by `engine`;
/// `before` (further sections) comes first.
fn tls_port_cfg(p: &Pki, before: &str, engine: &str) -> String {
    format!(
        "{before}[tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 0\nplain_control = false\n\
         [single_port]\nport = 0\nmedia = \"tls\"\ntls_engine = \"{engine}\"\n",
        p.cert.to_str().unwrap(),
        p.key.to_str().unwrap()
    )
}

/// A TLS-both-ways call over the shared port (see [`call_over`]): both media connections were
/// handed to their shard, each logged with `how`.
fn tls_call_handed(gw: &Gateway, port: u16, p: &Pki, how: &str) {
    let handed = call_over(
        gw,
        &format!("tls://127.0.0.1:{port}"),
        &["--ca", p.ca.to_str().unwrap()],
    );
    assert_eq!(handed.len(), 2, "{handed:?}");
    assert!(handed.iter().all(|l| l.contains(how)), "{handed:?}");
}

/// A plain TCP connection to the shared port, its reads timing out after 15 s.
fn connect_plain(port: u16) -> std::net::TcpStream {
    let t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    t
}

/// A plain RFC 4571 Binding request for a leg nobody has: the port must close the connection
/// (plain media off, or no such leg) without answering.
fn stranger_media_is_closed(port: u16) {
    let mut t = connect_plain(port);
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
    // TLS is not served on a plain single port, and HTTP only as a WebSocket media leg
    // (`GET /media/<leg>`).
    let mut t = connect_plain(port);
    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut t);
    gw.stop();
}

#[test]
fn tls_control_and_tls_media_share_one_port_userspace() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut gw = start(&tls_port_cfg(&p, "", "userspace"), dir.path());
    let port = single_port(&gw);
    tls_call_handed(&gw, port, &p, "tls");
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
            tls_call_handed(&gw, port, &p, "ktls");
            // And the browser phone's wss:// leg on kernel TLS.
            ws_leg_call(&gw, port, Some(&p.ca), "wss-ktls");
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
    let mut third = connect_plain(port);
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

/// The test CA in `ca`, as the only root a client trusts.
fn ca_roots(ca: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// A TLS connection to the shared port offering ALPN `http/1.1`, as a browser does for `wss://`.
fn wss_connect(
    port: u16,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let roots = ca_roots(ca);
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.set_nodelay(true).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// The opening request a browser sends for `path` (RFC 6455's sample key).
fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// One server frame: (opcode, payload), `buf` keeping what follows it.
fn ws_recv(t: &mut impl Read, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    use voxgate::wire::ws;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((op, range, used)) = ws::parse_server_frame(buf).expect("a valid server frame")
        {
            let payload = buf[range].to_vec();
            buf.drain(..used);
            return (op, payload);
        }
        let n = t.read(&mut chunk).expect("a server frame");
        assert!(n > 0, "the connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The gateway closed the TLS connection without answering the request.
fn assert_tls_closed(t: &mut impl Read) {
    let mut got = [0u8; 64];
    match t.read(&mut got) {
        Ok(0) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) => {}
        other => panic!("expected the connection closed unanswered, got {other:?}"),
    }
}

/// A test clip of `secs` seconds written as `out` in the gateway's folder: its path, its
/// samples and their µ-law bytes.
fn ulaw_clip(gw: &Gateway, out: &str, secs: f64) -> (PathBuf, Vec<i16>, Vec<u8>) {
    use voxgate::client::g711;
    let clip = test_clip(gw.dir.path(), "speech-8k.wav", out, secs);
    let samples = wav::read(&clip).unwrap();
    let mut encoded = vec![0u8; samples.len()];
    g711::encode_ulaw_into(&samples, &mut encoded);
    (clip, samples, encoded)
}

/// alice, in this process behind a firewall with no UDP, in a call to bob.
struct Alice {
    rt: tokio::runtime::Runtime,
    phone: voxgate::client::session::Phone,
    events: tokio::sync::mpsc::Receiver<voxgate::client::session::Event>,
    call: voxgate::wire::control::CallId,
    /// The media instructions the gateway gave her for the call.
    m: voxgate::wire::control::MediaInstructions,
}

/// alice logs in over `server` (TLS trusting `ca` when given), waits for her probe and dials
/// bob; returns once her media instructions came (a hang-up before them fails).
fn alice_calls_bob(server: &str, ca: Option<&Path>) -> Alice {
    use voxgate::client::session::{Event, Phone, PhoneOptions};
    use voxgate::client::tls::TlsOptions;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let opts = PhoneOptions {
        firewall: voxgate::client::Firewall {
            block_udp_out: true,
            block_udp_in: true,
            simulate_nat: false,
        },
        tls: ca.map(|c| TlsOptions {
            ca: Some(c.to_path_buf()),
        }),
        ..PhoneOptions::default()
    };
    let (phone, mut events) = rt
        .block_on(Phone::connect(
            server,
            "alice",
            &common::password("alice"),
            opts,
        ))
        .expect("alice logs in on the shared port");
    let caps = rt.block_on(phone.wait_capabilities(Duration::from_secs(15)));
    assert!(caps.is_some(), "alice's probe finished");
    let call = rt.block_on(async {
        let sock = phone.media_socket().await.unwrap();
        let addr = phone.media_address(&sock).unwrap();
        phone.dial("+15550002", addr).await.unwrap()
    });
    let m = loop {
        match next_event(&rt, &mut events) {
            Event::Media(m) => break m,
            Event::HangUp { reason, detail, .. } => panic!("hung up: {reason:?} {detail:?}"),
            _ => {}
        }
    };
    Alice {
        rt,
        phone,
        events,
        call,
        m,
    }
}

/// The phone's next event, within 20 s.
fn next_event(
    rt: &tokio::runtime::Runtime,
    events: &mut tokio::sync::mpsc::Receiver<voxgate::client::session::Event>,
) -> voxgate::client::session::Event {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("an event in time")
            .expect("the phone is up")
    })
}

/// RTP packet `i` of `ssrc` (PT 0, 8 kHz): `frame` padded to 160 bytes with µ-law silence.
fn rtp_packet(i: usize, ssrc: u32, frame: &[u8]) -> Vec<u8> {
    let mut pkt = vec![0x80, 0x00];
    pkt.extend_from_slice(&(i as u16).to_be_bytes());
    pkt.extend_from_slice(&((i * 160) as u32).to_be_bytes());
    pkt.extend_from_slice(&ssrc.to_be_bytes());
    pkt.extend_from_slice(frame);
    pkt.resize(12 + 160, 0xff);
    pkt
}

/// After 300 ms alice hangs up; bob's phone ends cleanly and his recording begins with
/// `samples` (what `via` sent), byte-exact.
fn hang_up_and_check_bob(alice: &Alice, callee: Proc, b_rec: &Path, samples: &[i16], via: &str) {
    std::thread::sleep(Duration::from_millis(300));
    alice.rt.block_on(alice.phone.hang_up(alice.call)).unwrap();
    let rb = finish(callee);
    assert_eq!(rb.code, 0, "{}\n{}", rb.json, rb.stderr);
    let want = ulaw_round_trip_padded(samples);
    let rec = wav::read(b_rec).unwrap();
    assert!(
        rec.len() >= want.len() && rec[..want.len()] == want[..],
        "bob's recording differs from what {via} sent ({} samples recorded)",
        rec.len()
    );
}

/// Anything a WebSocket leg runs over: TLS or plain TCP.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// A WebSocket media leg (the browser phone's) through the shared port: alice, behind a
/// firewall with no UDP, logs in on the shared port (over TLS when `ca` is given) and calls
/// bob, an open `voxgate phone` (UDP through the gateway). Her media instructions name the
/// shared port (with TLS when `ca` is given); a WebSocket client (over TLS with ALPN http/1.1,
/// or plain), path `/media/<leg>`, is handed to the shard holding her leg (`how` in the log),
/// gets the shard's 101, binds with the keyed STUN Binding and exchanges RTP with bob's UDP leg
/// byte-exact both ways. Returns alice's leg.
fn ws_leg_call(gw: &Gateway, port: u16, ca: Option<&Path>, how: &str) -> String {
    use voxgate::client::session::Event;
    use voxgate::wire::ws;
    let server = match ca {
        Some(_) => format!("tls://127.0.0.1:{port}"),
        None => format!("127.0.0.1:{port}"),
    };
    let (clip, samples, encoded) = ulaw_clip(gw, "clip.wav", 2.0);
    let b_rec = gw.dir.path().join("b-rec.wav");

    let mark = gw.log_len();
    let mut bob_args = match ca {
        Some(c) => vec!["--ca", c.to_str().unwrap()],
        None => vec![],
    };
    bob_args.extend([
        "--answer",
        "--play",
        clip.to_str().unwrap(),
        "--record",
        b_rec.to_str().unwrap(),
        "--wait",
        "30",
    ]);
    let callee = spawn_phone_at(&[], gw, &server, "bob", &bob_args);
    gw.wait_online(mark, "bob");

    let mut alice = alice_calls_bob(&server, ca);
    let m = &alice.m;
    assert_eq!(
        m.gateway_tcp_tls,
        ca.is_some(),
        "TLS media on the shared port: {m:?}"
    );
    assert_eq!(m.gateway_tcp.map(|a| a.port()), Some(port), "{m:?}");
    let leg = m.leg.clone().expect("alice's leg goes through the gateway");
    let key = voxgate::control::leg_key(alice.phone.session_key(), &leg);

    // The page's connection: wss://HOST:PORT/media/<leg>.
    let mark = gw.log_len();
    let mut t: Box<dyn Conn> = match ca {
        Some(ca) => Box::new(wss_connect(port, ca)),
        None => Box::new(connect_plain(port)),
    };
    t.write_all(upgrade_request(&format!("/media/{leg}")).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        t.read_exact(&mut b).expect("the 101 answer");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    gw.wait_log(mark, "the hand-over", |l| {
        l.contains("media connection handed to its shard")
            && l.split_whitespace()
                .any(|w| w == format!("how={how}") || w == format!("how=\"{how}\""))
    });
    let mut inbuf = Vec::new();
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, &leg, &key, &txid).unwrap();
    t.write_all(&ws::client_frame(ws::OP_BINARY, rand::random(), &req[..n]))
        .unwrap();
    let bound = loop {
        let (op, msg) = ws_recv(&mut t, &mut inbuf);
        assert_eq!(op, ws::OP_BINARY);
        if let Ok(a) = binding::check_response(&msg, &key, &txid) {
            break a;
        }
    };
    assert!(bound.ip().is_loopback(), "{bound}");
    loop {
        match next_event(&alice.rt, &mut alice.events) {
            Event::MediaReady { call: c } if c == alice.call => break,
            Event::HangUp { reason, detail, .. } => panic!("hung up: {reason:?} {detail:?}"),
            _ => {}
        }
    }

    // alice → bob: the clip, 20 ms per packet, as the page sends it.
    let ssrc: u32 = rand::random();
    for (i, frame) in encoded.chunks(160).enumerate() {
        let pkt = rtp_packet(i, ssrc, frame);
        t.write_all(&ws::client_frame(ws::OP_BINARY, rand::random(), &pkt))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    // bob → alice: what arrived of his clip (he began before alice bound) is a run of it,
    // byte-exact.
    let mut got = Vec::new();
    while got.len() < 40 * 160 {
        let (op, pkt) = ws_recv(&mut t, &mut inbuf);
        assert_eq!(op, ws::OP_BINARY);
        if pkt.len() > 12 && pkt[0] >> 6 == 2 && pkt[1] & 0x7f == 0 {
            let mut start = 12 + 4 * usize::from(pkt[0] & 0x0f);
            if pkt[0] & 0x10 != 0 {
                // A header extension (the phone's send time): 4 bytes, then its words.
                let words = u16::from_be_bytes([pkt[start + 2], pkt[start + 3]]);
                start += 4 + 4 * usize::from(words);
            }
            got.extend_from_slice(&pkt[start..]);
        }
    }
    let padded = {
        let mut e = encoded.clone();
        e.resize(encoded.len().div_ceil(160) * 160 + 160, 0xff);
        e
    };
    assert!(
        padded.windows(got.len()).any(|w| w == got),
        "bob's clip did not arrive byte-exact in the wss leg: {} bytes, first frame at {:?} of the clip, {:02x?}",
        got.len(),
        padded.windows(160).position(|w| w == &got[..160]),
        &got[..32]
    );
    hang_up_and_check_bob(&alice, callee, &b_rec, &samples, "the wss leg");
    drop(t);
    drop(alice);
    leg
}

/// `wss://` (the browser phone's media over TLS on the one port firewalls allow), TLS run by
/// the shard (`tls_engine = "shard"`: the WebSocket framing rides on the shard's record
/// layer). A request for another path, one over the size limit, one for a leg nobody has, and
/// plain ws:// on this TLS-media port are all closed unanswered.
#[test]
fn wss_media_leg_through_the_shared_port_on_the_shard_engine() {
    use voxgate::wire::ws;
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut gw = start(&tls_port_cfg(&p, "", "shard"), dir.path());
    let port = single_port(&gw);
    let leg = ws_leg_call(&gw, port, Some(&p.ca), "wss-shard");

    // Attacks: each closed unanswered, the port still serving afterwards.
    let mut wrong = wss_connect(port, &p.ca);
    wrong
        .write_all(upgrade_request("/media").as_bytes())
        .unwrap();
    assert_tls_closed(&mut wrong);
    let mut stranger = wss_connect(port, &p.ca);
    stranger
        .write_all(upgrade_request("/media/0123456789abcdef0123456789abcdef").as_bytes())
        .unwrap();
    assert_tls_closed(&mut stranger);
    let mut big = wss_connect(port, &p.ca);
    let mut long = format!("GET /media/{leg} HTTP/1.1\r\nX-Pad: ").into_bytes();
    long.resize(ws::MAX_HANDSHAKE + 100, b'a');
    // The gateway may close while the rest is still being written.
    let _ = big.write_all(&long);
    assert_tls_closed(&mut big);
    let mut plain = connect_plain(port);
    plain
        .write_all(upgrade_request(&format!("/media/{leg}")).as_bytes())
        .unwrap();
    assert_closed(&mut plain);
    gw.stop();
}

/// `ws://` through a shared port that takes plain media: the same call, the leg handed over as
/// plain WebSocket media; a request for another path is closed unanswered.
#[test]
fn ws_media_leg_through_a_plain_shared_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start("[single_port]\nport = 0\nmedia = \"plain\"\n", dir.path());
    let port = single_port(&gw);
    ws_leg_call(&gw, port, None, "ws");
    let mut t = connect_plain(port);
    t.write_all(upgrade_request("/control").as_bytes()).unwrap();
    assert_closed(&mut t);
    gw.stop();
}

/// A TLS connection to the shared port offering ALPN `voxgate-media`, as a phone's media leg.
fn tls_media_connect(
    port: u16,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut s = wss_connect(port, ca);
    let mut cfg = (*wss_client_config(ca)).clone();
    cfg.alpn_protocols = vec![b"voxgate-media".to_vec()];
    s.conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("the TLS handshake");
    }
    s
}

fn wss_client_config(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let roots = ca_roots(ca);
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The TLS records rustls makes of `plain` (one write), not yet sent.
fn records(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    plain: &[u8],
) -> Vec<u8> {
    s.conn.writer().write_all(plain).unwrap();
    let mut out = Vec::new();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The close_notify alert rustls makes, not yet sent.
fn close_notify(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
) -> Vec<u8> {
    s.conn.send_close_notify();
    let mut r = Vec::new();
    s.conn.write_tls(&mut r).unwrap();
    r
}

/// Sends the raw `bytes` (an attack) under the TLS layer; the gateway must close the
/// connection unanswered (it may close while the bytes are still being written).
fn send_and_assert_closed(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    bytes: &[u8],
) {
    let _ = s.sock.write_all(bytes);
    assert_closed(&mut s.sock);
}

/// As `send_and_assert_closed`, on a connection bound to a live call's leg: the callee's
/// media (silence) is forwarded to it until the attack lands, so bytes may come before the
/// close. Every one of them must open, under this connection's TLS keys, to RFC 4571 frames of
/// RTP (the leg's media); an answer to the attack (an alert, a STUN message, anything
/// unsealed) fails.
fn send_to_bound_leg_and_assert_closed(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    bytes: &[u8],
) {
    let _ = s.sock.write_all(bytes);
    s.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "expected the connection closed, got {e:?} after {} bytes",
                raw.len()
            ),
        }
        assert!(raw.len() < 1 << 20, "the connection was not closed");
    }
    let mut rd = &raw[..];
    let mut plain = Vec::new();
    while !rd.is_empty() {
        s.conn.read_tls(&mut rd).unwrap();
        let st = s
            .conn
            .process_new_packets()
            .expect("only the leg's sealed media came before the close");
        let mut p = vec![0u8; st.plaintext_bytes_to_read()];
        s.conn.reader().read_exact(&mut p).unwrap();
        plain.extend_from_slice(&p);
    }
    // Whole frames of RTP; the close may cut the last one.
    let mut f = &plain[..];
    while f.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([f[0], f[1]]));
        if f.len() < 2 + n {
            break;
        }
        let pkt = &f[2..2 + n];
        assert!(
            n >= 12 && pkt[0] >> 6 == 2,
            "not RTP before the close: {pkt:02x?}"
        );
        f = &f[2 + n..];
    }
}

fn rfc4571(pkt: &[u8]) -> Vec<u8> {
    let mut f = (pkt.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(pkt);
    f
}

/// Binds `leg` on a TLS media connection (its Binding request in the first record, sent
/// `bytewise` one byte per TCP segment or whole) and waits for the shard's answer.
fn bind_tls_leg(
    port: u16,
    ca: &Path,
    leg: &str,
    key: &[u8],
    bytewise: bool,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut s = tls_media_connect(port, ca);
    s.sock.set_nodelay(true).unwrap();
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, leg, key, &txid).unwrap();
    let rec = records(&mut s, &rfc4571(&req[..n]));
    if bytewise {
        for b in &rec {
            s.sock.write_all(std::slice::from_ref(b)).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
    } else {
        s.sock.write_all(&rec).unwrap();
    }
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("the Binding's answer");
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).unwrap();
    binding::check_response(&msg, key, &txid).expect("a keyed answer from the shard");
    s
}

/// TLS media on the shard's own record layer (`tls_engine = "shard"`), at the real port:
/// - a call whose both directions are TCP over TLS through the port, byte-exact, handed over
///   as `tls-shard` (the browser's `wss://` leg on this engine: the test above);
/// - then, on a leg of a live call (alice in this process calls bob, an open phone): after a
///   valid Binding, garbage, a bit-flipped record, an oversize record length and a close_notify
///   alert each close their own connection (the shard's record layer refuses them), while a
///   stranger's connections (no leg) with the same attacks are closed by the port, and the
///   connection that finally carries alice's audio — its Binding and first packets sent one
///   byte per TCP segment — delivers the clip to bob byte-exact.
#[test]
fn tls_media_on_the_shard_engine_and_attacks_close_only_their_connection() {
    use voxgate::client::session::Event;
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut gw = start(&tls_port_cfg(&p, "", "shard"), dir.path());
    let port = single_port(&gw);
    let server = format!("tls://127.0.0.1:{port}");
    tls_call_handed(&gw, port, &p, "tls-shard");
    stranger_media_is_closed(port);

    // A live call: alice (here, no UDP) calls bob (open, recording).
    let (_, samples, encoded) = ulaw_clip(&gw, "clip2.wav", 1.5);
    let b_rec = gw.dir.path().join("b-rec2.wav");
    let mark = gw.log_len();
    let callee = spawn_phone_at(
        &[],
        &gw,
        &server,
        "bob",
        &[
            "--ca",
            p.ca.to_str().unwrap(),
            "--answer",
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "40",
        ],
    );
    gw.wait_online(mark, "bob");
    let mut alice = alice_calls_bob(&server, Some(&p.ca));
    let m = &alice.m;
    assert!(m.gateway_tcp_tls, "{m:?}");
    let leg = m.leg.clone().expect("alice's leg goes through the gateway");
    let key = voxgate::control::leg_key(alice.phone.session_key(), &leg);

    // Strangers (no leg): the same attacks, refused by the port before any shard sees them.
    let ca = p.ca.clone();
    let strangers = std::thread::spawn(move || {
        for attack in 0..4 {
            let mut s = tls_media_connect(port, &ca);
            let bytes = match attack {
                0 => b"\x17\x03\x03\x00\x20garbage, not a sealed record......".to_vec(),
                1 => {
                    let mut r = records(&mut s, &rfc4571(&[0u8; 40]));
                    r[10] ^= 4;
                    r
                }
                2 => vec![23, 3, 3, 0x41, 0x01, 0, 0, 0],
                _ => close_notify(&mut s),
            };
            send_and_assert_closed(&mut s, &bytes);
        }
    });

    // The leg's owner turned attacker: each attack after a valid Binding ends its connection
    // in the shard.
    for attack in 0..4 {
        let mark = gw.log_len();
        let mut s = bind_tls_leg(port, &p.ca, &leg, &key, false);
        // The log reaches the test through a reader thread: wait for the line, do not race it.
        gw.wait_log(mark, "the hand-over to the shard", |l| {
            l.contains("media connection handed")
        });
        let bytes = match attack {
            0 => vec![
                0x17, 3, 3, 0, 40, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                0x55, 0x55,
            ],
            1 => {
                let mut r = records(&mut s, &rfc4571(&[0x80; 172]));
                let n = r.len();
                r[n - 3] ^= 0x20;
                r
            }
            2 => vec![23, 3, 3, 0xff, 0xff, 1, 2, 3],
            _ => close_notify(&mut s),
        };
        send_to_bound_leg_and_assert_closed(&mut s, &bytes);
    }
    strangers
        .join()
        .expect("the strangers' connections were closed");

    // The connection that carries the call: bound one byte per segment, its first packets
    // too; then the clip, 20 ms per packet.
    let mut s = bind_tls_leg(port, &p.ca, &leg, &key, true);
    // Media is ready once the leg bound (the first attack's Binding may have told it already).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut ready = false;
    while !ready {
        match alice.events.try_recv() {
            Ok(Event::MediaReady { call: c }) if c == alice.call => ready = true,
            Ok(Event::HangUp { reason, detail, .. }) => panic!("hung up: {reason:?} {detail:?}"),
            Ok(_) => {}
            Err(_) => {
                assert!(std::time::Instant::now() < deadline, "media never ready");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let ssrc: u32 = rand::random();
    for (i, frame) in encoded.chunks(160).enumerate() {
        let pkt = rtp_packet(i, ssrc, frame);
        let rec = records(&mut s, &rfc4571(&pkt));
        if i < 3 {
            for b in &rec {
                s.sock.write_all(std::slice::from_ref(b)).unwrap();
            }
        } else {
            s.sock.write_all(&rec).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    hang_up_and_check_bob(&alice, callee, &b_rec, &samples, "alice's TLS leg");
    drop(s);
    drop(alice);
    gw.stop();
}

/// The shard engine on the epoll fallback loop (the same record layer, sent and received with
/// sendmsg/read instead of io_uring): a TLS-both-ways call, byte-exact.
#[test]
fn tls_media_on_the_shard_engine_over_the_epoll_loop() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let mut gw = start(
        &tls_port_cfg(&p, "[server]\nbackend = \"epoll\"\n", "shard"),
        dir.path(),
    );
    let port = single_port(&gw);
    tls_call_handed(&gw, port, &p, "tls-shard");
    assert!(
        gw.log_text().contains("epoll"),
        "the shards ran on epoll: {}",
        gw.log_text()
    );
    gw.stop();
}
