//! Accepting TCP media connections when the process is out of descriptors (issue 11, item 6):
//! the shard backs off instead of spinning, counts `accept_backoff`, and accepts the waiting
//! connection once descriptors are free. This lowers the process's descriptor limit, so it is
//! its own test binary with one test that runs both event loops one after the other.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use voxgate::client::binding;
use voxgate::metrics::DropReason;
use voxgate::shard::{Backend, Delivery, SessionSpec, ShardConfig, ShardHandle, Shards};

mod common;

use common::shard::{cpu_time, key, leg, wait_until};

const WAIT: Duration = Duration::from_secs(5);

fn gw(h: &ShardHandle, port: u16) -> SocketAddr {
    let _ = h;
    SocketAddr::new("127.0.0.1".parse().unwrap(), port)
}

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a plain struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: &libc::rlimit) {
    // SAFETY: setrlimit reads a plain struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, r) }, 0);
}

/// Uses up every descriptor the (lowered) limit leaves; returns them.
fn exhaust_descriptors(base: &OwnedFd) -> Vec<OwnedFd> {
    let mut held = Vec::new();
    loop {
        // SAFETY: dup of a descriptor we own; a new descriptor or -1.
        let fd = unsafe { libc::dup(base.as_raw_fd()) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
            return held;
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(held.len() < 10_000, "the lowered limit did not take");
    }
}

#[test]
fn accept_backs_off_when_out_of_descriptors_on_either_loop() {
    accept_backs_off_when_out_of_descriptors(Backend::IoUring);
    accept_backs_off_when_out_of_descriptors(Backend::Epoll);
}

/// Before: multishot accept under EMFILE failed, was re-armed at once and failed again (100 %
/// CPU), and the epoll loop spun the same way on a level-triggered listener.
fn accept_backs_off_when_out_of_descriptors(backend: Backend) {
    let cfg = ShardConfig {
        listen: "::".parse().unwrap(),
        media_port_base: 0,
        shards: 1,
        backend,
        pin: false,
        udp_bufs: 256,
        tcp_bufs: 64,
        spare_bufs: 32,
        ring_entries: 256,
        send_slots: 256,
        ..ShardConfig::default()
    };
    // Every descriptor the test needs exists before the limit is lowered.
    let client = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    let base: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    // Lowered before the shard starts: io_uring's accept takes the limit when it is armed.
    let saved = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: open + 64,
        rlim_max: saved.rlim_max,
    });
    let shards = Shards::spawn(&cfg).expect("shards start");
    let h = &shards.handles[0];
    assert_eq!(h.backend, backend);
    h.install_blocking(SessionSpec {
        id: 1,
        legs: vec![leg("t", Delivery::Tcp), leg("u", Delivery::UdpLatched)],
    })
    .unwrap();
    let held = exhaust_descriptors(&base);

    // The handshake completes in the kernel (listen backlog); the shard cannot accept it.
    client
        .connect(&gw(h, h.tcp_addr.port()).into())
        .expect("connect into the backlog");
    wait_until(h, &format!("{backend}: accept backed off"), |s| {
        s.counters.dropped(DropReason::AcceptBackoff) >= 1
    });
    let before = h.snapshot_blocking().unwrap().counters;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let cpu = cpu_time() - cpu0;
    let wall = t0.elapsed();
    let after = h.snapshot_blocking().unwrap().counters;
    let pauses =
        after.dropped(DropReason::AcceptBackoff) - before.dropped(DropReason::AcceptBackoff);
    let wakeups = after.wakeups - before.wakeups;

    // Descriptors back before anything can fail, so a failure below leaves the process usable.
    drop(held);
    assert!(
        cpu < wall / 4,
        "{backend}: the process used {cpu:?} of CPU in {wall:?} out of descriptors"
    );
    assert!(
        (1..=12).contains(&pauses),
        "{backend}: {pauses} accept pauses in {wall:?} (one per 100 ms expected)"
    );
    assert!(wakeups < 200, "{backend}: {wakeups} wake-ups in {wall:?}");

    // The connection that waited is accepted now and carries media.
    let mut t: TcpStream = client.into();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let txid = binding::new_txid();
    let mut buf = [0u8; 512];
    let n = binding::request(&mut buf, "t", &key("t"), &txid).unwrap();
    let mut frame = (n as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&buf[..n]);
    t.write_all(&frame).unwrap();
    let mut hdr = [0u8; 2];
    t.read_exact(&mut hdr)
        .expect("the waiting connection is accepted and answered");
    let mut resp = vec![0u8; usize::from(u16::from_be_bytes(hdr))];
    t.read_exact(&mut resp).unwrap();
    binding::check_response(&resp, &key("t"), &txid).expect("a valid binding response");

    let txid = binding::new_txid();
    let n = binding::request(&mut buf, "u", &key("u"), &txid).unwrap();
    let udp_gw = gw(h, h.udp_addr.port());
    udp.send_to(&buf[..n], udp_gw).unwrap();
    let (m, _) = udp.recv_from(&mut buf).expect("UDP leg bound");
    binding::check_response(&buf[..m], &key("u"), &txid).unwrap();
    let mut rtp = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7];
    rtp.extend_from_slice(&[0x55; 160]);
    udp.send_to(&rtp, udp_gw).unwrap();
    t.read_exact(&mut hdr)
        .expect("media over the accepted connection");
    let mut got = vec![0u8; usize::from(u16::from_be_bytes(hdr))];
    t.read_exact(&mut got).unwrap();
    assert_eq!(got, rtp, "{backend}: the RTP packet, framed");
    drop(shards);
    set_nofile(&saved);
}
