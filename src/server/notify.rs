//! systemd notifications (`sd_notify(3)`): a datagram to `$NOTIFY_SOCKET`. Written by hand: it
//! is one `sendto`, and the crates that wrap it pull in more than they save. Without systemd
//! (no `NOTIFY_SOCKET`) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        // Abstract socket namespace.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        tracing::debug!("sd_notify {state:?}: {e}");
    }
}

/// Every shard and listener is up.
pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

pub fn reloading() {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    send(&format!("RELOADING=1\nMONOTONIC_USEC={mono}"));
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining");
}

/// The shards answered: feed the watchdog.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// Half the watchdog period systemd asked for (`WATCHDOG_USEC`), or 10 s without one.
pub fn watchdog_interval() -> Duration {
    std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| Duration::from_micros(us / 2).max(Duration::from_millis(100)))
        .unwrap_or(Duration::from_secs(10))
}
