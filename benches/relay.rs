//! The per-packet path of a shard, without the kernel: look up the source among 20,000 bound
//! legs, parse the RTP header for loss/jitter, decide the destination, take a buffer reference;
//! and the same into a TCP leg (RFC 4571 framing into the connection's queue).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use voxgate::shard::pool::{Pool, PoolLayout, Seg};
use voxgate::shard::{Delivery, LegSpec, Outbox, Relay, RelayConfig, SessionSpec};

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000))
}

fn setup() -> (Relay, Pool) {
    let mut relay = Relay::new(RelayConfig::default());
    for s in 0..10_000u32 {
        let leg = |n: u32| LegSpec {
            name: format!("leg-{s}-{n}"),
            key: b"key".to_vec(),
            delivery: Delivery::UdpLatched,
            trusted_source: Some(addr(2 * s + n)),
            clock_rate: 8000,
        };
        relay
            .install(SessionSpec {
                id: u64::from(s),
                legs: vec![leg(0), leg(1)],
            })
            .unwrap();
    }
    let pool = Pool::new(PoolLayout {
        buf_size: 2048,
        udp: 64,
        tcp: 64,
        spare: 8,
    })
    .unwrap();
    (relay, pool)
}

fn per_packet(c: &mut Criterion) {
    let (mut relay, mut pool) = setup();
    let mut out = Outbox::default();
    let mut pkt = vec![0u8; 172];
    pkt[0] = 0x80;
    let r = pool.received(0).expect("the kernel's buffer");
    pool.buf_mut(&r).expect("ours alone")[..172].copy_from_slice(&pkt);
    pool.release_received(r);
    // The loop's recycling: freed buffers go back to the kernel (here: straight back).
    let mut freed = Vec::with_capacity(8);
    pool.take_freed(&mut freed);
    let src = addr(2 * 5_123);
    let mut seq = 0u16;
    c.bench_function(
        "relay udp->udp (lookup among 20k legs, RTP stats, forward)",
        |b| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let r = pool.received(0).expect("the kernel's buffer");
                pool.buf_mut(&r).expect("ours alone")[2..4].copy_from_slice(&seq.to_be_bytes());
                relay.on_udp(&mut pool, black_box(src), Seg::new(0, 0, 172), 1, &mut out);
                pool.release_received(r);
                for o in out.udp.drain(..) {
                    pool.sent(o.data);
                }
                pool.take_freed(&mut freed);
                relay.finish_batch(2);
            })
        },
    );
    let stranger = addr(999_999);
    c.bench_function("relay drop of an unbound source", |b| {
        b.iter(|| {
            let r = pool.received(0).expect("the kernel's buffer");
            relay.on_udp(
                &mut pool,
                black_box(stranger),
                Seg::new(0, 0, 172),
                1,
                &mut out,
            );
            pool.release_received(r);
            pool.take_freed(&mut freed);
        })
    });
}

criterion_group!(benches, per_packet);
criterion_main!(benches);
