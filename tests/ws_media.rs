//! The WebSocket media leg (the browser phone's) at a real shard's TCP port, for both event
//! loops: a client that speaks RFC 6455 gets its 101, binds its leg with the keyed STUN Binding
//! in a binary frame, and RTP flows both ways to a UDP leg; a ping is answered. Attacks: an
//! opening handshake over the limit, an unmasked frame, a text frame, a frame over `max_frame`
//! and media before the Binding each close the connection, and the shard says why in its
//! counters, while a good leg keeps flowing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use voxgate::client::binding;
use voxgate::metrics::DropReason;
use voxgate::shard::{Backend, Delivery, SessionSpec, ShardConfig, ShardHandle, Shards};
use voxgate::wire::ws;

mod common;

use common::shard::{key, leg, wait_until};

const WAIT: Duration = Duration::from_secs(5);

fn spawn(backend: Backend) -> Shards {
    let cfg = ShardConfig {
        listen: "::".parse().unwrap(),
        media_port_base: 0,
        shards: 1,
        backend,
        pin: false,
        udp_bufs: 256,
        tcp_bufs: 256,
        spare_bufs: 64,
        ring_entries: 256,
        send_slots: 256,
        ..ShardConfig::default()
    };
    let shards = Shards::spawn(&cfg).expect("shards start");
    assert_eq!(shards.handles[0].backend, backend, "the loop we asked for");
    shards
}

fn gw(h: &ShardHandle, tcp: bool) -> SocketAddr {
    let port = if tcp {
        h.tcp_addr.port()
    } else {
        h.udp_addr.port()
    };
    SocketAddr::new("127.0.0.1".parse().unwrap(), port)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Connects and upgrades; returns the stream after the 101 answer (checked).
fn upgrade(h: &ShardHandle) -> TcpStream {
    let mut t = TcpStream::connect(gw(h, true)).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    t.set_nodelay(true).unwrap();
    write!(
        t,
        "GET /media HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
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
    t
}

fn send(t: &mut TcpStream, opcode: u8, payload: &[u8]) {
    t.write_all(&ws::client_frame(opcode, rand::random(), payload))
        .unwrap();
}

/// One server frame: (opcode, payload).
fn recv(t: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some((op, range, _)) = ws::parse_server_frame(&buf).expect("a valid server frame") {
            return (op, buf[range].to_vec());
        }
        let n = t.read(&mut chunk).expect("a server frame");
        assert!(n > 0, "the connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// True once the gateway closed `t` (end of stream or reset) without sending anything.
fn closed(t: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(t.read(&mut b), Ok(0) | Err(_))
}

fn bind(t: &mut TcpStream, name: &str) {
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, name, &key(name), &txid).unwrap();
    send(t, ws::OP_BINARY, &req[..n]);
    let (op, resp) = recv(t);
    assert_eq!(op, ws::OP_BINARY);
    binding::check_response(&resp, &key(name), &txid).expect("the gateway proves the key");
}

fn rtp(seq: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&[1, 2, 3, 4]);
    p.extend((0..len - 12).map(|i| (i as u16 ^ seq) as u8));
    p
}

fn websocket_leg_carries_rtp_both_ways(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 1,
        legs: vec![leg("u", Delivery::UdpLatched), leg("w", Delivery::Tcp)],
    })
    .unwrap();
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(WAIT)).unwrap();
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, "u", &key("u"), &txid).unwrap();
    u.send_to(&req[..n], gw(h, false)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    binding::check_response(&buf[..n], &key("u"), &txid).unwrap();
    let mut t = upgrade(h);
    bind(&mut t, "w");
    // UDP → WebSocket: one binary frame per datagram, payload unchanged.
    for seq in 0..20u16 {
        let p = rtp(seq, if seq % 2 == 0 { 172 } else { 60 });
        u.send_to(&p, gw(h, false)).unwrap();
        assert_eq!(recv(&mut t), (ws::OP_BINARY, p));
    }
    // WebSocket → UDP: masked frames arrive unmasked, one datagram each; two frames written
    // at once are two datagrams.
    for seq in 0..20u16 {
        let p = rtp(seq, 172);
        let mut two = ws::client_frame(ws::OP_BINARY, rand::random(), &p);
        two.extend(ws::client_frame(ws::OP_BINARY, rand::random(), &p[..100]));
        t.write_all(&two).unwrap();
        let (n, _) = u.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &p[..]);
        let (n, _) = u.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &p[..100]);
    }
    // A ping is answered with its payload.
    send(&mut t, ws::OP_PING, b"are you there");
    assert_eq!(recv(&mut t), (ws::OP_PONG, b"are you there".to_vec()));
}

fn bad_websocket_input_closes_the_connection(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 1,
        legs: vec![leg("w", Delivery::Tcp), leg("x", Delivery::Tcp)],
    })
    .unwrap();
    // Headers that never end: closed once they pass 2048 bytes, no answer.
    let mut t = TcpStream::connect(gw(h, true)).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let mut long = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    long.resize(ws::MAX_HANDSHAKE + 100, b'a');
    let _ = t.write_all(&long);
    assert!(
        closed(&mut t),
        "an over-long handshake closes the connection"
    );
    // Unmasked, text, oversize (max_frame 1500) and media-before-Binding: each closes.
    let frames: [(&str, Vec<u8>); 4] = [
        ("unmasked", {
            let mut f = ws::client_frame(ws::OP_BINARY, [1; 4], &rtp(1, 60));
            f[1] &= 0x7f;
            f
        }),
        ("text", ws::client_frame(ws::OP_TEXT, [1; 4], b"{}")),
        (
            "oversize",
            ws::client_frame(ws::OP_BINARY, [1; 4], &rtp(1, 1501)),
        ),
        (
            "media first",
            ws::client_frame(ws::OP_BINARY, [1; 4], &rtp(1, 60)),
        ),
    ];
    for (what, f) in &frames {
        let mut t = upgrade(h);
        if *what != "media first" {
            bind(&mut t, "x");
        }
        t.write_all(f).unwrap();
        assert!(closed(&mut t), "{what}: the connection closes");
    }
    wait_until(h, "the bad frames counted", |s| {
        s.counters.dropped(DropReason::BadFrame) >= 5
    });
    // The leg still binds and answers afterwards.
    let mut t = upgrade(h);
    bind(&mut t, "w");
}

macro_rules! both_backends {
    ($($name:ident),*) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name(voxgate::shard::Backend::IoUring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name(voxgate::shard::Backend::Epoll) } )*
        }
    };
}

both_backends!(
    websocket_leg_carries_rtp_both_ways,
    bad_websocket_input_closes_the_connection
);
