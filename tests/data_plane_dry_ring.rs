//! A dry receive ring must not spin the shard (issue 11, item 6). This measures the CPU time
//! of the whole test process, so it is its own test binary with one test that runs both event
//! loops one after the other: nothing else runs while it measures.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use voxgate::shard::{Backend, ShardConfig, Shards};

mod common;

use common::shard::{cpu_time, gw_tcp, wait_until};

#[test]
fn a_dry_ring_does_not_spin_on_either_loop() {
    a_dry_ring_does_not_spin(Backend::IoUring);
    a_dry_ring_does_not_spin(Backend::Epoll);
}

/// The TCP receive ring is emptied (16 unbound connections each hold the first part of a
/// frame), then a connection sends. Before: the receive failed with ENOBUFS, was re-armed at
/// once, failed again... 100 % CPU until buffers came back. Now it waits for buffers.
fn a_dry_ring_does_not_spin(backend: Backend) {
    let mut cfg = ShardConfig {
        listen: "::".parse().unwrap(),
        media_port_base: 0,
        shards: 1,
        backend,
        pin: false,
        spare_bufs: 64,
        ring_entries: 256,
        send_slots: 512,
        ..ShardConfig::default()
    };
    cfg.tcp_bufs = 16;
    cfg.udp_bufs = 16;
    cfg.relay.max_unbound_tcp_per_source = 64;
    cfg.relay.unbound_tcp_idle_ns = 20_000_000_000;
    cfg.relay.unbound_tcp_timeout_ns = 20_000_000_000;
    let shards = Shards::spawn(&cfg).expect("shards start");
    assert_eq!(shards.handles[0].backend, backend);
    let h = &shards.handles[0];
    let mut holders = Vec::new();
    for _ in 0..16 {
        let mut c = TcpStream::connect(gw_tcp(h)).unwrap();
        // A 100-byte frame of which 10 bytes come: its receive buffer stays held.
        c.write_all(&[0x00, 100, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        holders.push(c);
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut extra = TcpStream::connect(gw_tcp(h)).unwrap();
    extra.write_all(&[0x00, 100, 0x00, 0x01]).unwrap();
    wait_until(h, "the TCP ring ran dry", |s| {
        s.counters.buf_ring_exhausted > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let before = h.snapshot_blocking().unwrap().counters;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let cpu = cpu_time() - cpu0;
    let wall = t0.elapsed();
    assert!(
        cpu < wall / 4,
        "{backend}: the process used {cpu:?} of CPU in {wall:?} while the ring was dry"
    );
    let after = h.snapshot_blocking().unwrap().counters;
    assert!(
        after.wakeups - before.wakeups < 200,
        "{backend}: {} wake-ups in a second of dry ring",
        after.wakeups - before.wakeups
    );
    assert!(
        after.buf_ring_exhausted - before.buf_ring_exhausted < 200,
        "{backend}: the dry ring was retried {} times in a second",
        after.buf_ring_exhausted - before.buf_ring_exhausted
    );
    // The shard still answers.
    h.ping_blocking().unwrap();
    drop(holders);
    drop(extra);
}
