//! Address vocabulary shared by the control core and the data plane (neither owns it): the
//! canonical form of a socket address and the private-range test, and the peer-address policy
//! ([`policy`]).

pub mod policy;

use std::net::{IpAddr, SocketAddr};

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) as plain IPv4, so one client has one
/// key in every table whatever socket family saw it.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Loopback, RFC 1918, ULA (fc00::/7), link-local (169.254/16, fe80::/10) or unspecified;
/// v4-mapped IPv6 addresses are judged as IPv4.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(SocketAddr::new(ip, 0)).ip() {
        IpAddr::V4(a) => {
            a.is_loopback() || a.is_private() || a.is_link_local() || a.is_unspecified()
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || (s0 & 0xfe00) == 0xfc00
                || (s0 & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_ipv4_and_private_ranges_are_recognised() {
        let m: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        assert_eq!(canonical(m), "10.0.0.1:5".parse::<SocketAddr>().unwrap());
        for p in [
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.1.1",
        ] {
            assert!(is_private(p.parse().unwrap()), "{p}");
        }
        for p in ["8.8.8.8", "2001:db8::1", "::ffff:203.0.113.1"] {
            assert!(!is_private(p.parse().unwrap()), "{p}");
        }
    }
}
