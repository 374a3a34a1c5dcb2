//! The probe ports at real sockets (issue 11, item 8): any STUN client learns its mapped
//! address, including classic RFC 3489 clients (Debian's `stun`, no magic cookie), and the
//! answers to one source prefix are rate-limited, so the ports cannot reflect a flood.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::Gateway;
use voxgate::wire::stun;

fn probe_port(gw: &Gateway) -> u16 {
    gw.wait_log(0, "the ready line", |l| l.contains("probe_a="));
    let log = gw.log_text();
    let w = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("probe_a="))
        .expect("the ready line names probe port A");
    let addr: SocketAddr = w
        .trim_matches(|c: char| c == ',' || c == '"')
        .parse()
        .unwrap();
    addr.port()
}

fn classic_request(id: &[u8; 16]) -> Vec<u8> {
    let mut r = vec![0x00, 0x01, 0x00, 0x00];
    r.extend_from_slice(id);
    r
}

#[test]
fn a_classic_rfc3489_request_gets_its_mapped_address() {
    let gw = Gateway::start(&[]);
    let port = probe_port(&gw);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let id = [0x5a; 16];
    s.send_to(&classic_request(&id), ("127.0.0.1", port))
        .unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = s
        .recv_from(&mut buf)
        .expect("an RFC 3489 request is answered");
    assert_eq!(from.port(), port, "from the probe port");
    let r = &buf[..n];
    assert_eq!(&r[0..2], &[0x01, 0x01], "Binding response");
    assert_eq!(&r[4..20], &id, "the whole 16-byte transaction id echoed");
    assert_eq!(usize::from(u16::from_be_bytes([r[2], r[3]])), n - 20);
    // MAPPED-ADDRESS (0x0001), IPv4: our own address.
    assert_eq!(&r[20..22], &[0x00, 0x01]);
    let port_seen = u16::from_be_bytes([r[26], r[27]]);
    let ip_seen = std::net::Ipv4Addr::new(r[28], r[29], r[30], r[31]);
    assert_eq!(
        SocketAddr::new(ip_seen.into(), port_seen),
        s.local_addr().unwrap()
    );
}

#[test]
fn debians_stun_client_gets_its_mapped_address() {
    if Command::new("stun").arg("-h").output().is_err() {
        let msg = "the `stun` client (Debian package stun-client) is not installed: \
                   scripts/test-all installs it as root";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let gw = Gateway::start(&[]);
    let port = probe_port(&gw);
    // Test 1 of RFC 3489 §10.1: a plain Binding request; -v prints the mapped address.
    let out = Command::new("timeout")
        .args(["10", "stun", &format!("127.0.0.1:{port}"), "1", "-v"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("MappedAddress = 127.0.0.1:"),
        "the stun client saw no mapped address:\n{text}"
    );
}

#[test]
fn answers_to_one_source_prefix_are_rate_limited() {
    let gw = Gateway::start(&[]);
    let port = probe_port(&gw);
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut req = [0u8; 64];
    let n = stun::Writer::new(&mut req, stun::Class::Request, stun::BINDING, &[7; 12])
        .map(|w| w.finish())
        .unwrap();
    for _ in 0..200 {
        flood.send_to(&req[..n], ("127.0.0.1", port)).unwrap();
    }
    flood
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answers = 0;
    let mut buf = [0u8; 256];
    while flood.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    assert!(
        (10..=40).contains(&answers),
        "{answers} answers to 200 requests from one source"
    );
    // Another /24 (127.0.1.0/24) is not affected.
    let other = UdpSocket::bind("127.0.1.1:0").unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    other.send_to(&req[..n], ("127.0.0.1", port)).unwrap();
    other
        .recv_from(&mut buf)
        .expect("another prefix is answered");
}
