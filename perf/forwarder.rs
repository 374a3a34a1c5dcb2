//! The bare kernel-bound forwarder: the practical limit of a userspace UDP relay on this
//! machine, for `perf/run` to compare voxgate with. A `recvmmsg` batch (blocking for the
//! first datagram, `MSG_WAITFORONE`), then one `sendmmsg` of every datagram to one fixed
//! destination: no lookups, no checks, no parsing, no timestamps.
//!
//! ```text
//! cargo run --release --example forwarder -- --listen 127.0.0.1:7600 --to 127.0.0.1:7601 [--duration SECS]
//! ```
//!
//! Stops after `--duration` seconds (default 3600) or on SIGTERM/SIGINT (default action).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const BUF: usize = 2048;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = arg(&args, "--listen")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:7600".parse().expect("constant address"));
    let to: SocketAddr = arg(&args, "--to")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:7601".parse().expect("constant address"));
    let duration = Duration::from_secs(
        arg(&args, "--duration")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3600),
    );
    let sock = UdpSocket::bind(listen)?;
    let s2 = socket2::SockRef::from(&sock);
    let _ = s2.set_recv_buffer_size(4 << 20);
    let _ = s2.set_send_buffer_size(4 << 20);
    // Wake at least once a second to honour --duration.
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let fd = sock.as_raw_fd();
    eprintln!("forwarder: {listen} -> {to}, pid {}", std::process::id());

    let dest = socket2::SockAddr::from(to);
    let mut bufs = vec![[0u8; BUF]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: BUF,
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zero is a valid value.
    let mut rx: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    // SAFETY: as above.
    let mut tx: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut txiov: Vec<libc::iovec> = iov.clone();
    let end = Instant::now() + duration;
    let mut forwarded: u64 = 0;
    while Instant::now() < end {
        for (m, v) in rx.iter_mut().zip(iov.iter_mut()) {
            v.iov_len = BUF;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                rx.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            txiov[i].iov_base = iov[i].iov_base;
            txiov[i].iov_len = rx[i].msg_len as usize;
            tx[i].msg_hdr.msg_name = dest.as_ptr() as *mut libc::c_void;
            tx[i].msg_hdr.msg_namelen = dest.len();
            tx[i].msg_hdr.msg_iov = &mut txiov[i];
            tx[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: as above.
        let sent = unsafe { libc::sendmmsg(fd, tx.as_mut_ptr(), n as u32, 0) };
        if sent > 0 {
            forwarded += sent as u64;
        }
    }
    eprintln!("forwarder: {forwarded} datagrams forwarded");
    Ok(())
}
