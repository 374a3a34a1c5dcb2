//! Set-up shared by the tests that drive a shard directly (no `voxgate serve`): leg specs with
//! test keys, the shard's loopback addresses, waiting on its counters, the process's CPU time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use voxgate::shard::{Delivery, LegSpec, ShardHandle, ShardSnapshot};

/// How long [`wait_until`] waits for a shard's state: generous, it is only reached when the
/// state never comes (a loaded 2-core machine may take seconds).
pub const STATE_WAIT: Duration = Duration::from_secs(20);

/// The test key of leg `name`.
pub fn key(name: &str) -> Vec<u8> {
    format!("key-of-{name}").into_bytes()
}

/// A leg named `name` with its test key, delivering by `delivery`.
pub fn leg(name: &str, delivery: Delivery) -> LegSpec {
    LegSpec {
        name: name.into(),
        key: key(name),
        delivery,
        trusted_source: None,
        clock_rate: 8000,
    }
}

/// The shard's TCP media port on 127.0.0.1.
pub fn gw_tcp(h: &ShardHandle) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().unwrap(), h.tcp_addr.port())
}

/// Polls the shard until its snapshot satisfies `f` (and returns that snapshot); fails after
/// [`STATE_WAIT`] naming `what` and the counters.
pub fn wait_until(
    h: &ShardHandle,
    what: &str,
    f: impl Fn(&ShardSnapshot) -> bool,
) -> ShardSnapshot {
    let deadline = Instant::now() + STATE_WAIT;
    loop {
        let s = h.snapshot_blocking().unwrap();
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            s.counters
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system) of this process so far: the shard is one of its threads.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage fills a plain struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}
