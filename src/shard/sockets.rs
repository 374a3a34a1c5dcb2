//! The shard's sockets and raw socket-address conversions (the per-packet path works with
//! `sockaddr` bytes directly; `std`'s conversions would allocate nothing but are not exposed for
//! raw `msghdr` use).

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Sockets one shard owns. `ipv6` is true for a dual-stack IPv6 socket (IPv4 peers appear as
/// v4-mapped addresses), false for an IPv4-only socket.
pub struct ShardSockets {
    pub udp: Socket,
    pub tcp: Socket,
    pub ipv6: bool,
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
}

#[derive(Clone, Copy, Debug)]
pub struct SocketOptions {
    pub udp_rcvbuf: usize,
    pub udp_sndbuf: usize,
    pub backlog: i32,
}

/// Binds the UDP socket and TCP listener of one shard on `ip:port` (port 0: any free port, the
/// TCP listener then takes the UDP socket's port when it can). On the unspecified IPv6 address
/// the sockets are dual-stack; if the host has IPv6 disabled they fall back to 0.0.0.0.
///
/// A fixed port still held by sockets that are closing (the previous gateway's io_uring
/// instance releases its files in the kernel a moment after the process exits, so a restart
/// can find its own old listener there) is retried every 50 ms for up to `patience` before
/// the error is returned; any other error is returned at once.
pub fn bind_shard(
    ip: IpAddr,
    port: u16,
    opts: SocketOptions,
    patience: std::time::Duration,
) -> io::Result<ShardSockets> {
    let deadline = std::time::Instant::now() + patience;
    let mut warned = false;
    loop {
        match bind_shard_once(ip, port, opts) {
            Err(e)
                if port != 0
                    && e.raw_os_error() == Some(libc::EADDRINUSE)
                    && std::time::Instant::now() < deadline =>
            {
                if !warned {
                    tracing::warn!(
                        "media port {ip}:{port} is in use ({e}); retrying for up to {} ms \
                         (a previous gateway's sockets may still be closing)",
                        patience.as_millis()
                    );
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

fn bind_shard_once(ip: IpAddr, port: u16, opts: SocketOptions) -> io::Result<ShardSockets> {
    match bind_pair(ip, port, opts) {
        Err(e) if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && is_v6_unavailable(&e) => {
            tracing::warn!("IPv6 is not available on this host ({e}); media sockets are IPv4-only");
            bind_pair(IpAddr::from([0, 0, 0, 0]), port, opts)
        }
        r => r,
    }
}

fn is_v6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn bind_pair(ip: IpAddr, port: u16, opts: SocketOptions) -> io::Result<ShardSockets> {
    let ipv6 = ip.is_ipv6();
    let udp = media_udp_socket(ipv6, opts)?;
    udp.bind(&SockAddr::from(SocketAddr::new(ip, port)))?;
    let udp_addr = udp
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("UDP socket has no IP address"))?;

    let tcp = shareable_socket(ipv6, Type::STREAM, Protocol::TCP)?;
    tcp.set_tcp_nodelay(true)?;
    let tcp_port = if port == 0 { udp_addr.port() } else { port };
    match tcp.bind(&SockAddr::from(SocketAddr::new(ip, tcp_port))) {
        Ok(()) => {}
        // An ephemeral UDP port may be taken for TCP: any free TCP port will do.
        Err(_) if port == 0 => tcp.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?,
        Err(e) => return Err(e),
    }
    tcp.listen(opts.backlog)?;
    let tcp_addr = tcp
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("TCP listener has no IP address"))?;
    Ok(ShardSockets {
        udp,
        tcp,
        ipv6,
        udp_addr,
        tcp_addr,
    })
}

/// A non-blocking, close-on-exec socket with `SO_REUSEADDR`, dual-stack on IPv6.
fn shareable_socket(ipv6: bool, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))?;
    if ipv6 {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    Ok(s)
}

/// An unbound media UDP socket: dual-stack on IPv6, shareable (`SO_REUSEADDR`: the shard's
/// socket and its connected leg sockets share one address and port), with the configured
/// buffers, kernel receive timestamps and the socket-overflow counter.
fn media_udp_socket(ipv6: bool, opts: SocketOptions) -> io::Result<Socket> {
    let udp = shareable_socket(ipv6, Type::DGRAM, Protocol::UDP)?;
    // Kernels cap these at net.core.{r,w}mem_max; the sysctl drop-in raises the caps.
    let _ = udp.set_recv_buffer_size(opts.udp_rcvbuf);
    let _ = udp.set_send_buffer_size(opts.udp_sndbuf);
    set_int_opt(&udp, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // Count datagrams the kernel dropped because the socket buffer was full.
    let _ = set_int_opt(&udp, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1);
    Ok(udp)
}

/// A media UDP socket on the shard's own address and port (`local`, the shard socket's bound
/// address), connected to `peer`: it sends without naming a destination, on the route cached
/// at connect, and the kernel hands it `peer`'s datagrams (an exact four-tuple match outranks
/// the shard socket's wildcard one).
pub fn connected_udp(
    local: SocketAddr,
    ipv6: bool,
    opts: SocketOptions,
    peer: SocketAddr,
) -> io::Result<Socket> {
    let s = media_udp_socket(ipv6, opts)?;
    s.bind(&SockAddr::from(local))?;
    connect_udp(&s, ipv6, peer)?;
    Ok(s)
}

/// Connects (or re-connects) a UDP socket to `peer`, v4-mapped on a dual-stack socket.
pub fn connect_udp(s: &Socket, ipv6: bool, peer: SocketAddr) -> io::Result<()> {
    let peer = match (ipv6, peer) {
        (true, SocketAddr::V4(a)) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        (false, SocketAddr::V6(a)) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        },
        (_, p) => p,
    };
    s.connect(&SockAddr::from(peer))
}

pub fn set_int_opt(s: &impl std::os::fd::AsRawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: passing a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for either address family, laid out as the kernel expects.
#[derive(Clone, Copy)]
#[repr(C)]
pub union RawAddr {
    pub v4: libc::sockaddr_in,
    pub v6: libc::sockaddr_in6,
}

impl Default for RawAddr {
    fn default() -> Self {
        // SAFETY: all-zero is a valid sockaddr.
        unsafe { std::mem::zeroed() }
    }
}

/// Encodes `a` for a socket of the given family: IPv4 destinations become v4-mapped on a
/// dual-stack socket. Returns the length to pass as `msg_namelen`; 0 if `a` cannot be reached
/// from this socket (IPv6 on an IPv4-only socket).
pub fn encode(a: SocketAddr, ipv6_socket: bool, out: &mut RawAddr) -> libc::socklen_t {
    match (a, ipv6_socket) {
        (SocketAddr::V4(v4), false) => {
            out.v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        (SocketAddr::V6(_), false) => 0,
        (a, true) => {
            let v6 = match a {
                SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                SocketAddr::V6(v6) => v6,
            };
            out.v6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Decodes a kernel-written `sockaddr` (as found in a `recvmsg` name field). Total: returns None
/// for anything that is not a well-formed IPv4/IPv6 address.
pub fn decode(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    match i32::from(family) {
        libc::AF_INET if name.len() >= size_of::<libc::sockaddr_in>() => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let ip = [name[4], name[5], name[6], name[7]];
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
        }
        libc::AF_INET6 if name.len() >= size_of::<libc::sockaddr_in6>() => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let flow = u32::from_be_bytes([name[4], name[5], name[6], name[7]]);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&name[8..24]);
            let scope = u32::from_ne_bytes([name[24], name[25], name[26], name[27]]);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Finds an `SCM_TIMESTAMPNS` control message in `control` (a `recvmsg` control buffer) and
/// returns it as nanoseconds since the epoch (CLOCK_REALTIME).
pub fn rx_timestamp_ns(control: &[u8]) -> Option<u64> {
    let hdr = size_of::<libc::cmsghdr>();
    let mut off = 0usize;
    while off + hdr <= control.len() {
        // SAFETY: bounds checked above; read_unaligned tolerates any alignment.
        let c: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control.as_ptr().add(off).cast()) };
        let len = c.cmsg_len as usize;
        if len < hdr || off + len > control.len() {
            return None;
        }
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
            let data = off + cmsg_align(hdr);
            if data + size_of::<libc::timespec>() > control.len() {
                return None;
            }
            // SAFETY: bounds checked just above.
            let ts: libc::timespec =
                unsafe { std::ptr::read_unaligned(control.as_ptr().add(data).cast()) };
            return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        }
        off += cmsg_align(len);
    }
    None
}

/// Finds the `SO_RXQ_OVFL` control message (`SOL_SOCKET`/`SO_RXQ_OVFL`, a `u32`): the number
/// of datagrams the socket dropped for lack of receive-buffer space so far (it wraps).
pub fn rx_overflow(control: &[u8]) -> Option<u32> {
    let hdr = size_of::<libc::cmsghdr>();
    let mut off = 0usize;
    while off + hdr <= control.len() {
        // SAFETY: bounds checked above; read_unaligned tolerates any alignment.
        let c: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control.as_ptr().add(off).cast()) };
        let len = c.cmsg_len as usize;
        if len < hdr || off + len > control.len() {
            return None;
        }
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SO_RXQ_OVFL {
            let data = off + cmsg_align(hdr);
            let bytes = control.get(data..data + 4)?;
            return Some(u32::from_ne_bytes(bytes.try_into().ok()?));
        }
        off += cmsg_align(len);
    }
    None
}

/// Tracks the socket's cumulative overflow count and says how many drops are new.
#[derive(Default)]
pub struct OverflowTracker {
    last: Option<u32>,
}

impl OverflowTracker {
    /// New drops since the last control message that carried the counter.
    pub fn update(&mut self, control: &[u8]) -> u64 {
        let Some(now) = rx_overflow(control) else {
            return 0;
        };
        let new = match self.last {
            Some(prev) => now.wrapping_sub(prev),
            None => now,
        };
        self.last = Some(now);
        u64::from(new)
    }
}

/// How long a TCP media connection may leave sent data unacknowledged before the kernel
/// gives up on it (TCP_USER_TIMEOUT): a reader that stopped reading stops pinning buffers.
pub const MEDIA_TCP_USER_TIMEOUT_MS: i32 = 5_000;

/// Options of an accepted TCP media connection: no Nagle delay, a small send buffer (late
/// voice is useless), and a user timeout.
pub fn media_conn_options(fd: &OwnedFd, sndbuf: i32) {
    let _ = set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    let _ = set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, sndbuf);
    let _ = set_int_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        MEDIA_TCP_USER_TIMEOUT_MS,
    );
}

fn cmsg_align(n: usize) -> usize {
    let a = size_of::<usize>();
    (n + a - 1) & !(a - 1)
}

/// Space for the control messages a shard asks for (a timestamp and a drop counter).
pub const CONTROL_LEN: usize = 64;

/// CLOCK_REALTIME now, in nanoseconds (the clock of SO_TIMESTAMPNS).
#[inline]
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// `clock` now, in nanoseconds (a vDSO call for the realtime and monotonic clocks).
#[inline]
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; an unknown clock leaves it zero.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The peer of a connected socket.
pub fn peer_of(fd: i32) -> Option<SocketAddr> {
    let mut raw = RawAddr::default();
    let mut len = size_of::<RawAddr>() as libc::socklen_t;
    // SAFETY: raw has room for `len` bytes.
    let r = unsafe { libc::getpeername(fd, (&mut raw as *mut RawAddr).cast(), &mut len) };
    if r != 0 {
        return None;
    }
    // SAFETY: RawAddr is plain bytes of at least `len`.
    let bytes =
        unsafe { std::slice::from_raw_parts((&raw as *const RawAddr).cast::<u8>(), len as usize) };
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A control buffer with a timestamp and an SO_RXQ_OVFL counter, laid out as the kernel
    /// does (cmsghdr, data, padding to the alignment).
    fn control(ovfl: u32) -> Vec<u8> {
        let hdr = size_of::<libc::cmsghdr>();
        let mut v = Vec::new();
        let mut push = |level: i32, ty: i32, data: &[u8]| {
            let len = hdr + data.len();
            // SAFETY: plain C struct.
            let mut c: libc::cmsghdr = unsafe { std::mem::zeroed() };
            c.cmsg_len = len as _;
            c.cmsg_level = level;
            c.cmsg_type = ty;
            // SAFETY: reading the bytes of a plain C struct.
            v.extend_from_slice(unsafe {
                std::slice::from_raw_parts((&c as *const libc::cmsghdr).cast::<u8>(), hdr)
            });
            v.extend_from_slice(data);
            v.resize(cmsg_align(v.len()), 0);
        };
        let ts = [7u8; 16];
        push(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &ts);
        push(libc::SOL_SOCKET, libc::SO_RXQ_OVFL, &ovfl.to_ne_bytes());
        v
    }

    const OPTS: SocketOptions = SocketOptions {
        udp_rcvbuf: 1 << 16,
        udp_sndbuf: 1 << 16,
        backlog: 16,
    };

    /// A listener on the port, as the previous gateway's closing ring leaves it.
    fn squatter() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[test]
    fn a_media_port_that_frees_up_within_the_patience_is_bound() {
        let (l, port) = squatter();
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(
            bind_shard_once(ip, port, OPTS)
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EADDRINUSE),
            "the squatter must hold the port for this test to mean anything"
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(l);
        });
        let s = bind_shard(ip, port, OPTS, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(s.tcp_addr.port(), port);
        assert_eq!(s.udp_addr.port(), port);
        release.join().unwrap();
    }

    #[test]
    fn a_media_port_held_past_the_patience_is_an_address_in_use_error() {
        let (_l, port) = squatter();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let t0 = std::time::Instant::now();
        let e = bind_shard(ip, port, OPTS, std::time::Duration::from_millis(150))
            .err()
            .expect("the port stays taken");
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        assert!(t0.elapsed() >= std::time::Duration::from_millis(150));
    }

    #[test]
    fn socket_overflow_counts_are_parsed_and_turned_into_new_drops() {
        assert_eq!(rx_overflow(&control(5)), Some(5));
        assert_eq!(rx_overflow(&control(5)[..20]), None, "truncated: nothing");
        let mut t = OverflowTracker::default();
        assert_eq!(t.update(&control(3)), 3);
        assert_eq!(t.update(&control(3)), 0);
        assert_eq!(t.update(&control(10)), 7);
        assert_eq!(
            t.update(&control(2)),
            u64::from(2u32.wrapping_sub(10)),
            "wraps"
        );
        assert_eq!(t.update(&[]), 0, "no counter in this message");
    }

    proptest! {
        #[test]
        fn control_parsing_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = rx_overflow(&data);
            let _ = rx_timestamp_ns(&data);
        }
    }

    fn bytes(raw: &RawAddr, len: libc::socklen_t) -> Vec<u8> {
        // SAFETY: reading initialized plain bytes of the union.
        unsafe { std::slice::from_raw_parts((raw as *const RawAddr).cast::<u8>(), len as usize) }
            .to_vec()
    }

    #[test]
    fn v4_destinations_are_mapped_on_dual_stack_sockets() {
        let mut raw = RawAddr::default();
        let a: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let n = encode(a, true, &mut raw);
        let back = decode(&bytes(&raw, n)).unwrap();
        assert_eq!(
            back,
            "[::ffff:192.0.2.7]:4000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(crate::shard::relay::canonical(back), a);
        let n = encode(a, false, &mut raw);
        assert_eq!(decode(&bytes(&raw, n)).unwrap(), a);
        assert_eq!(
            encode("[2001:db8::1]:5".parse().unwrap(), false, &mut raw),
            0
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&b);
            let _ = rx_timestamp_ns(&b);
        }

        #[test]
        fn encode_decode_round_trip(ip in any::<[u8; 16]>(), port in any::<u16>()) {
            let a = SocketAddr::new(IpAddr::from(ip), port);
            let mut raw = RawAddr::default();
            let n = encode(a, true, &mut raw);
            prop_assert_eq!(decode(&bytes(&raw, n)), Some(a));
        }
    }
}
