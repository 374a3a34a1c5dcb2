//! The shard data plane on real loopback sockets, for both event loops: sessions installed
//! through the shard API, media bound with STUN, then every transport pair delivering every
//! packet byte-exact and in order; unbound and wrongly keyed sources dropped; a TCP reader that
//! stops reading costs counted drops, not memory; a malformed frame closes only its own
//! connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use voxgate::client::binding;
use voxgate::metrics::DropReason;
use voxgate::shard::{Backend, Delivery, SessionSpec, ShardConfig, ShardHandle, Shards};

mod common;

use common::shard::{gw_tcp, key, leg, wait_until};

const WAIT: Duration = Duration::from_secs(5);

fn spawn(backend: Backend) -> Shards {
    let cfg = ShardConfig {
        listen: "::".parse().unwrap(),
        media_port_base: 0,
        shards: 1,
        backend,
        pin: false,
        udp_bufs: 512,
        tcp_bufs: 256,
        spare_bufs: 64,
        ring_entries: 256,
        send_slots: 512,
        ..ShardConfig::default()
    };
    // The adoption test counts to the ninth connection of one source; with no grace, its
    // silent connections are evicted oldest first at once.
    let mut cfg = cfg;
    cfg.relay.max_unbound_tcp_per_source = 8;
    cfg.relay.unbound_tcp_grace_ns = 0;
    let shards = Shards::spawn(&cfg).expect("shards start");
    assert_eq!(
        shards.handles[0].backend, backend,
        "the loop we asked for runs"
    );
    shards
}

/// Installs session `id` with two UDP legs, "a" and "b", latched by their Bindings.
fn install_ab(h: &ShardHandle, id: u64) {
    h.install_blocking(SessionSpec {
        id,
        legs: vec![
            leg("a", Delivery::UdpLatched),
            leg("b", Delivery::UdpLatched),
        ],
    })
    .unwrap();
}

fn udp_client(v6: bool) -> UdpSocket {
    let s = UdpSocket::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn gw_udp(h: &ShardHandle, v6: bool) -> SocketAddr {
    let ip = if v6 { "::1" } else { "127.0.0.1" };
    SocketAddr::new(ip.parse().unwrap(), h.udp_addr.port())
}

/// STUN-binds a UDP socket to `leg`; returns the mapped address the gateway reports.
fn bind_udp(s: &UdpSocket, gw: SocketAddr, leg: &str) -> SocketAddr {
    let txid = binding::new_txid();
    let mut buf = [0u8; 512];
    let n = binding::request(&mut buf, leg, &key(leg), &txid).unwrap();
    s.send_to(&buf[..n], gw).unwrap();
    let mut resp = [0u8; 512];
    let (m, from) = s.recv_from(&mut resp).expect("binding answered");
    assert_eq!(from.port(), gw.port());
    binding::check_response(&resp[..m], &key(leg), &txid).expect("a valid binding response")
}

fn write_frame(t: &mut TcpStream, payload: &[u8]) {
    let mut f = (payload.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    t.write_all(&f).unwrap();
}

fn read_frame(t: &mut TcpStream) -> Vec<u8> {
    let mut h = [0u8; 2];
    if let Err(e) = t.read_exact(&mut h) {
        panic!("frame header: {e}");
    }
    let mut p = vec![0u8; usize::from(u16::from_be_bytes(h))];
    t.read_exact(&mut p).expect("frame body");
    p
}

fn bind_tcp(h: &ShardHandle, leg: &str) -> TcpStream {
    let mut t = TcpStream::connect(gw_tcp(h)).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    t.set_nodelay(true).unwrap();
    let txid = binding::new_txid();
    let mut buf = [0u8; 512];
    let n = binding::request(&mut buf, leg, &key(leg), &txid).unwrap();
    write_frame(&mut t, &buf[..n]);
    let resp = read_frame(&mut t);
    let mapped = binding::check_response(&resp, &key(leg), &txid).expect("binding over TCP");
    assert_eq!(
        mapped,
        t.local_addr().unwrap(),
        "XOR-MAPPED-ADDRESS is our TCP source"
    );
    t
}

/// An RTP packet (PT 0, G.711-sized) whose payload encodes who sent it and its number.
fn rtp(ssrc: u32, seq: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..len - 12).map(|i| (i as u32 ^ ssrc ^ u32::from(seq)) as u8));
    p
}

fn udp_to_udp(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    install_ab(h, 1);
    let (a, b) = (udp_client(false), udp_client(false));
    assert_eq!(bind_udp(&a, gw_udp(h, false), "a"), a.local_addr().unwrap());
    bind_udp(&b, gw_udp(h, false), "b");
    for (tx, rx, ssrc) in [(&a, &b, 1u32), (&b, &a, 2)] {
        let sent: Vec<Vec<u8>> = (0..300).map(|i| rtp(ssrc, i, 172)).collect();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for p in &sent {
            tx.send_to(p, gw_udp(h, false)).unwrap();
            let (n, from) = rx.recv_from(&mut buf).expect("relayed");
            assert_eq!(
                from.port(),
                h.udp_addr.port(),
                "media comes from the gateway"
            );
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, sent, "every packet byte-exact and in order");
    }
    // A liveness ping (the watchdog's) takes nothing that the next snapshot (a dump) is owed.
    h.ping_blocking().unwrap();
    let s = h.snapshot_blocking().unwrap();
    assert_eq!(
        s.counters.udp_out.packets,
        600 + 2,
        "600 relayed + 2 binding answers"
    );
    let la = s.legs.iter().find(|l| l.name == "a").unwrap();
    assert_eq!((la.rtp.received, la.rtp.lost), (300, 0));
    assert!(s.latency.len() >= 600, "relay latency recorded per packet");
    let again = h.snapshot_blocking().unwrap();
    assert_eq!(
        again.latency.len(),
        0,
        "a snapshot hands over its histogram"
    );
    assert_eq!(
        again.counters.udp_out.packets, 602,
        "counters are cumulative"
    );
}

fn udp_to_tcp_and_back(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 7,
        legs: vec![leg("u", Delivery::UdpLatched), leg("t", Delivery::Tcp)],
    })
    .unwrap();
    let u = udp_client(false);
    bind_udp(&u, gw_udp(h, false), "u");
    let mut t = bind_tcp(h, "t");
    // UDP -> TCP, in bursts of 32 packets (0.64 s of 20 ms voice) as a jittery source sends.
    let sent: Vec<Vec<u8>> = (0..512).map(|i| rtp(3, i, 172)).collect();
    let mut got = Vec::new();
    for burst in sent.chunks(32) {
        for p in burst {
            u.send_to(p, gw_udp(h, false)).unwrap();
        }
        got.extend(burst.iter().map(|_| read_frame(&mut t)));
    }
    assert_eq!(got, sent, "UDP->TCP: every frame byte-exact and in order");
    // TCP -> UDP, written in awkward pieces: frames split across reads, headers split in two,
    // single bytes, several frames in one write.
    let sent: Vec<Vec<u8>> = (0..400)
        .map(|i| rtp(4, i, 60 + (i as usize * 7) % 1200))
        .collect();
    let mut stream = Vec::new();
    for p in &sent {
        stream.extend_from_slice(&(p.len() as u16).to_be_bytes());
        stream.extend_from_slice(p);
    }
    let cuts = [1usize, 2, 3, 1, 700, 5000, 13, 1, 1, 2900, 171, 2];
    let reader = {
        let u = u.try_clone().unwrap();
        let count = sent.len();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            (0..count)
                .map(|_| {
                    let (n, _) = u.recv_from(&mut buf).expect("TCP->UDP relayed");
                    buf[..n].to_vec()
                })
                .collect::<Vec<_>>()
        })
    };
    let mut at = 0;
    let mut k = 0;
    while at < stream.len() {
        let n = cuts[k % cuts.len()].min(stream.len() - at);
        t.write_all(&stream[at..at + n]).unwrap();
        at += n;
        k += 1;
        if k % 4 == 0 {
            // Let the gateway see the pieces as separate reads.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let got = reader.join().unwrap();
    assert_eq!(
        got, sent,
        "TCP->UDP: every frame reassembled byte-exact and in order"
    );
}

fn tcp_to_tcp(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 9,
        legs: vec![leg("x", Delivery::Tcp), leg("y", Delivery::Tcp)],
    })
    .unwrap();
    let mut x = bind_tcp(h, "x");
    let mut y = bind_tcp(h, "y");
    let sent: Vec<Vec<u8>> = (0..320).map(|i| rtp(5, i, 172)).collect();
    let mut got = Vec::new();
    for burst in sent.chunks(32) {
        for p in burst {
            write_frame(&mut x, p);
        }
        got.extend(burst.iter().map(|_| read_frame(&mut y)));
    }
    assert_eq!(got, sent, "TCP->TCP: every frame byte-exact and in order");
    let back = rtp(6, 1, 200);
    write_frame(&mut y, &back);
    assert_eq!(read_frame(&mut x), back);
}

fn fan_out_room(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 11,
        legs: vec![
            leg("p1", Delivery::UdpLatched),
            leg("p2", Delivery::UdpLatched),
            leg("p3", Delivery::Tcp),
        ],
    })
    .unwrap();
    let p1 = udp_client(false);
    let p2 = udp_client(true);
    bind_udp(&p1, gw_udp(h, false), "p1");
    bind_udp(&p2, gw_udp(h, true), "p2");
    let mut p3 = bind_tcp(h, "p3");
    let mut buf = [0u8; 2048];
    for i in 0..100u16 {
        let from1 = rtp(1, i, 172);
        p1.send_to(&from1, gw_udp(h, false)).unwrap();
        let (n, _) = p2.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &from1[..], "p1 -> p2 (IPv4 to IPv6)");
        assert_eq!(read_frame(&mut p3), from1, "p1 -> p3 (UDP to TCP)");
        let from3 = rtp(3, i, 100);
        write_frame(&mut p3, &from3);
        let (n, _) = p1.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &from3[..], "p3 -> p1");
        let (n, _) = p2.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &from3[..], "p3 -> p2");
    }
}

fn unbound_and_wrong_key_dropped(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    install_ab(h, 2);
    let (a, b) = (udp_client(false), udp_client(false));
    bind_udp(&b, gw_udp(h, false), "b");
    // Unbound source: dropped, nothing comes back to it, nothing reaches b.
    let stranger = udp_client(false);
    stranger.send_to(&rtp(9, 1, 172), gw_udp(h, false)).unwrap();
    wait_until(h, "an unbound drop", |s| {
        s.counters.dropped(DropReason::Unbound) == 1
    });
    // Wrong key: no answer, counted.
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, "a", b"not-the-key", &txid).unwrap();
    a.send_to(&req[..n], gw_udp(h, false)).unwrap();
    wait_until(h, "a bad-auth drop", |s| {
        s.counters.dropped(DropReason::BadAuth) == 1
    });
    // Unknown leg name: same.
    let n = binding::request(&mut req, "nobody", b"k", &txid).unwrap();
    a.send_to(&req[..n], gw_udp(h, false)).unwrap();
    wait_until(h, "a second bad-auth drop", |s| {
        s.counters.dropped(DropReason::BadAuth) == 2
    });
    // a's media is still unbound.
    a.send_to(&rtp(1, 1, 172), gw_udp(h, false)).unwrap();
    wait_until(h, "a second unbound drop", |s| {
        s.counters.dropped(DropReason::Unbound) == 2
    });
    let s = h.snapshot_blocking().unwrap();
    assert_eq!(
        s.counters.udp_out.packets, 1,
        "only b's binding was ever answered"
    );
    stranger
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    assert!(
        stranger.recv_from(&mut req).is_err(),
        "no answer to the stranger"
    );
    b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    assert!(b.recv_from(&mut req).is_err(), "nothing reached b");
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn slow_tcp_reader_is_bounded(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 3,
        legs: vec![leg("src", Delivery::UdpLatched), leg("sink", Delivery::Tcp)],
    })
    .unwrap();
    let src = udp_client(false);
    bind_udp(&src, gw_udp(h, false), "src");
    let sink = bind_tcp(h, "sink"); // never read from again
    let before = rss_bytes();
    let pkt = rtp(8, 0, 1000);
    let n = 30_000;
    for _ in 0..n {
        src.send_to(&pkt, gw_udp(h, false)).unwrap();
    }
    wait_until(h, "backpressure drops", |s| {
        s.counters.dropped(DropReason::TcpBackpressure) > 0
    });
    let s = h.snapshot_blocking().unwrap();
    let cap = voxgate::shard::RelayConfig::default().tcp_queue_frames;
    assert!(
        s.tcp_queued <= cap,
        "queue bounded: {} > {cap}",
        s.tcp_queued
    );
    assert!(
        s.buffers_in_use <= cap + 4,
        "buffers pinned: {}",
        s.buffers_in_use
    );
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 32 << 20, "memory grew by {grown} bytes");
    let sink_leg = s.legs.iter().find(|l| l.name == "sink").unwrap();
    assert!(sink_leg.backpressure_drops > 0);
    drop(sink);
}

fn malformed_frame_closes_only_its_connection(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 4,
        legs: vec![leg("good", Delivery::Tcp), leg("peer", Delivery::Tcp)],
    })
    .unwrap();
    let mut good = bind_tcp(h, "good");
    let mut peer = bind_tcp(h, "peer");
    // A connection whose first frame is garbage, and one that announces an oversize frame.
    let mut garbage = TcpStream::connect(gw_tcp(h)).unwrap();
    garbage.set_read_timeout(Some(WAIT)).unwrap();
    write_frame(&mut garbage, &[0x80; 50]);
    let mut oversize = TcpStream::connect(gw_tcp(h)).unwrap();
    oversize.set_read_timeout(Some(WAIT)).unwrap();
    oversize.write_all(&[0xff, 0xff, 1, 2, 3]).unwrap();
    let mut one = [0u8; 1];
    assert_eq!(
        garbage.read(&mut one).unwrap_or(0),
        0,
        "garbage connection closed"
    );
    assert_eq!(
        oversize.read(&mut one).unwrap_or(0),
        0,
        "oversize connection closed"
    );
    // A bound leg that sends an oversize frame loses its own connection only.
    write_frame(&mut good, &rtp(1, 1, 100));
    assert_eq!(read_frame(&mut peer), rtp(1, 1, 100));
    peer.write_all(&[0x7f, 0xff]).unwrap();
    assert_eq!(
        peer.read(&mut one).unwrap_or(0),
        0,
        "peer closed after its bad frame"
    );
    wait_until(h, "bad frames counted", |s| {
        s.counters.dropped(DropReason::BadFrame) == 3
    });
    // The good connection is still up: it can bind again... and still reads.
    write_frame(&mut good, &rtp(1, 2, 100));
    let s = h.snapshot_blocking().unwrap();
    assert_eq!(s.tcp_conns, 1, "only the good connection remains");
}

/// Binds an already-connected stream (ours is the client end) to `leg`.
fn bind_stream<S: Read + Write>(t: &mut S, leg: &str) -> SocketAddr {
    let txid = binding::new_txid();
    let mut buf = [0u8; 512];
    let n = binding::request(&mut buf, leg, &key(leg), &txid).unwrap();
    let mut f = (n as u16).to_be_bytes().to_vec();
    f.extend_from_slice(&buf[..n]);
    t.write_all(&f).unwrap();
    let mut h = [0u8; 2];
    t.read_exact(&mut h).expect("binding answer header");
    let mut p = vec![0u8; usize::from(u16::from_be_bytes(h))];
    t.read_exact(&mut p).expect("binding answer");
    binding::check_response(&p, &key(leg), &txid).expect("binding over the adopted connection")
}

/// Connections accepted elsewhere (the shared port) and handed to the shard: a TCP socket and
/// one end of a socket pair (the userspace TLS relay's) both carry media like the shard's own,
/// and they count against the same unbound-connection budget.
fn adopted_connections_carry_media(backend: Backend) {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    let shards = spawn(backend);
    let h = &shards.handles[0];
    h.install_blocking(SessionSpec {
        id: 11,
        legs: vec![leg("a", Delivery::Tcp), leg("b", Delivery::Tcp)],
    })
    .unwrap();
    // A TCP connection accepted by "another listener" (ours), handed over.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut a = TcpStream::connect(elsewhere.local_addr().unwrap()).unwrap();
    a.set_read_timeout(Some(WAIT)).unwrap();
    let (accepted, peer) = elsewhere.accept().unwrap();
    h.adopt_tcp(OwnedFd::from(accepted), peer).unwrap();
    let mapped = bind_stream(&mut a, "a");
    assert_eq!(mapped, a.local_addr().unwrap(), "the client's own address");
    // A socket pair end, with the address the relay vouches for.
    let (mut b, theirs) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(WAIT)).unwrap();
    let relay_peer: SocketAddr = "192.0.2.9:4444".parse().unwrap();
    h.adopt_tcp(OwnedFd::from(theirs), relay_peer).unwrap();
    assert_eq!(
        bind_stream(&mut b, "b"),
        relay_peer,
        "the peer it was given"
    );
    let sent: Vec<Vec<u8>> = (0..64).map(|i| rtp(8, i, 172)).collect();
    for p in &sent {
        write_frame(&mut a, p);
    }
    let got: Vec<Vec<u8>> = sent
        .iter()
        .map(|_| {
            let mut h = [0u8; 2];
            b.read_exact(&mut h).unwrap();
            let mut p = vec![0u8; usize::from(u16::from_be_bytes(h))];
            b.read_exact(&mut p).unwrap();
            p
        })
        .collect();
    assert_eq!(got, sent, "adopted -> adopted: byte-exact, in order");
    // The budget: unbound adopted connections from one source are held to the per-source
    // limit (8 here) like accepted ones: the ninth evicts the one that made the least
    // progress, here (all silent, no grace) the oldest, which sees EOF.
    let before = h.snapshot_blocking().unwrap().counters.tcp_accepted;
    let mut ours = Vec::new();
    for i in 0..9u16 {
        let (mine, theirs) = UnixStream::pair().unwrap();
        mine.set_read_timeout(Some(WAIT)).unwrap();
        let peer = SocketAddr::from(([198, 51, 100, 1], 5000 + i));
        h.adopt_tcp(OwnedFd::from(theirs), peer).unwrap();
        ours.push(mine);
        if i == 0 {
            // The first must be the oldest by the shard's clock.
            wait_until(h, "the first adoption", |s| {
                s.counters.tcp_accepted == before + 1
            });
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut byte = [0u8; 1];
    assert_eq!(
        ours[0].read(&mut byte).expect("EOF, not a timeout"),
        0,
        "the oldest unbound connection of that source was closed"
    );
    wait_until(h, "nine adoptions", |s| {
        s.counters.tcp_accepted == before + 9
    });
    assert_eq!(h.snapshot_blocking().unwrap().tcp_conns, 2 + 8);
}

/// Remote ports of the connected UDP sockets on `port` (from /proc/net/udp and udp6: state 01).
fn connected_udp_peers(port: u16) -> Vec<u16> {
    let mut peers = Vec::new();
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if f.len() > 3 && port_of(f[1]) == Some(port) && f[3] == "01" {
                peers.extend(port_of(f[2]));
            }
        }
    }
    peers
}

/// Media keeps flowing to and from a phone whose socket went away and came back on the same
/// address (its gateway-side socket saw ICMP port-unreachable errors meanwhile), and the
/// io_uring loop sends each leg's media from a socket connected to that leg.
fn a_peer_that_vanishes_and_comes_back_gets_media_again(backend: Backend) {
    let shards = spawn(backend);
    let h = &shards.handles[0];
    install_ab(h, 1);
    let (a, b) = (udp_client(false), udp_client(false));
    bind_udp(&a, gw_udp(h, false), "a");
    bind_udp(&b, gw_udp(h, false), "b");
    let gw = gw_udp(h, false);
    let relay = |tx: &UdpSocket, rx: &UdpSocket, ssrc: u32, seqs: std::ops::Range<u16>| {
        let mut buf = [0u8; 2048];
        for i in seqs {
            let p = rtp(ssrc, i, 172);
            tx.send_to(&p, gw).unwrap();
            let (n, from) = rx.recv_from(&mut buf).expect("relayed");
            assert_eq!((&buf[..n], from.port()), (&p[..], gw.port()));
        }
    };
    relay(&a, &b, 1, 0..10);
    relay(&b, &a, 2, 0..10);
    let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let connected = connected_udp_peers(gw.port());
    let legs = h.snapshot_blocking().unwrap().leg_sockets;
    if backend == Backend::IoUring {
        assert_eq!(legs, 2, "a connected socket per leg");
        assert!(
            connected.contains(&pa.port()) && connected.contains(&pb.port()),
            "sockets on the gateway's port connected to both phones: {connected:?}"
        );
    } else {
        assert_eq!(
            (legs, connected.len()),
            (0, 0),
            "epoll sends on the shard socket"
        );
    }
    // b's phone goes away: what a sends toward it draws a port-unreachable error, which
    // the gateway's socket for b reports on its next send or receive (here, with nothing
    // more sent to b, the receive).
    drop(b);
    let before = h.snapshot_blocking().unwrap().counters.udp_in.packets;
    a.send_to(&rtp(1, 10, 172), gw).unwrap();
    wait_until(h, "a's media toward the vanished phone handled", |s| {
        s.counters.udp_in.packets > before
    });
    // A shard answers a command in the turn that received the packet, before that turn's
    // sends: the next command is answered once they have gone out.
    h.ping_blocking().unwrap();
    // It comes back on the same address: both directions work again.
    let b = UdpSocket::bind(pb).expect("b's address is free again");
    b.set_read_timeout(Some(WAIT)).unwrap();
    relay(&b, &a, 2, 10..20);
    // Under load the loopback may deliver the packet sent while b was gone only now (it was
    // queued behind the kernel's deferred receive work): that one, and nothing else, may be
    // waiting.
    b.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while let Ok(n) = b.recv(&mut buf) {
        assert_eq!(
            &buf[..n],
            &rtp(1, 10, 172)[..],
            "only the packet sent meanwhile"
        );
    }
    b.set_read_timeout(Some(WAIT)).unwrap();
    relay(&a, &b, 1, 11..20);
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
    a_peer_that_vanishes_and_comes_back_gets_media_again,
    adopted_connections_carry_media,
    udp_to_udp,
    udp_to_tcp_and_back,
    tcp_to_tcp,
    fan_out_room,
    unbound_and_wrong_key_dropped,
    slow_tcp_reader_is_bounded,
    malformed_frame_closes_only_its_connection
);
