//! Set-up shared by the relay's unit tests (`mod.rs`, `tls.rs`, `ws.rs`): a small pool, a
//! socket to hand to `on_accept`, leg specs, received buffers, a TCP leg bound by hand.

use std::os::fd::OwnedFd;

use super::{ConnId, Delivery, LegSpec, Relay};
use crate::shard::pool::{BufId, InFlight, Pool, PoolLayout, Seg};

/// A pool of 2048-byte buffers: 64 for UDP, `tcp` for TCP, 8 spare.
pub(super) fn pool(tcp: usize) -> Pool {
    Pool::new(PoolLayout {
        buf_size: 2048,
        udp: 64,
        tcp,
        spare: 8,
    })
    .unwrap()
}

/// A connected socket (its peer already gone) standing in for an accepted connection.
pub(super) fn fd() -> OwnedFd {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.into()
}

/// Leg `name` with key `k`, delivering by `delivery`, its source trusted when `trusted` names one.
pub(super) fn leg(name: &str, delivery: Delivery, trusted: Option<&str>) -> LegSpec {
    LegSpec {
        name: name.into(),
        key: b"k".to_vec(),
        delivery,
        trusted_source: trusted.map(|a| a.parse().unwrap()),
        clock_rate: 8000,
    }
}

/// A received buffer holding `data` (one reference, as the loop holds it). The tests give
/// that reference back with `pool.release(id)` where the loops use `release_received`.
pub(super) fn recv(pool: &mut Pool, id: BufId, data: &[u8]) -> Seg {
    // The driver puts every freed buffer back on its ring first (it is the kernel's again).
    pool.take_freed(&mut Vec::new());
    let id = pool.received(id).expect("the kernel's buffer").into_ref();
    pool.buf_mut_id(id).unwrap()[..data.len()].copy_from_slice(data);
    Seg::new(id, 0, data.len())
}

/// Binds leg `t` to connection `c` by hand, as `tcp_stun` does after a valid Binding (tests
/// only), its send queue grown to the configured size.
pub(super) fn bind_t_by_hand(relay: &mut Relay, c: ConnId) {
    let t = relay.leg_by_name[&b"t"[..]];
    relay.leg_mut(t).tcp = Some(c);
    relay.forget_unbound(c);
    let cap = relay.cfg.tcp_queue_frames;
    let conn = relay.conn_mut(c).unwrap();
    conn.leg = Some(t);
    conn.queue.grow(cap);
}

/// The bytes a send carries, as the socket would see them.
pub(super) fn sent_bytes(pool: &Pool, data: &InFlight) -> Vec<u8> {
    data.segs()
        .iter()
        .flat_map(|s| pool.seg(*s).to_vec())
        .collect()
}
