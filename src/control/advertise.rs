//! Advertised addresses: what the gateway tells clients its address is.
//!
//! By default a client is told media addresses on the IP its control connection arrived at.
//! Behind 1:1 NAT (a cloud instance, a DNAT router in front of the box) that is the gateway's
//! private address, which nobody outside can reach. Like coturn's `external-ip`, an operator
//! sets the public address per family (`server.advertised_ipv4` / `advertised_ipv6`), and
//! every address the gateway hands to a client of that family uses it (today: the media
//! addresses in `media` instructions, for calls and rooms; probe ports are sent as ports and
//! reached at the address the client connected to). A client that reaches the gateway at its
//! private address is also told the public one, so such clients need the router to hairpin.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The public address per family; `None`: the address the connection arrived at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Advertised {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl Advertised {
    /// The address to hand a client whose control connection arrived at `local` (already
    /// canonical: IPv4-mapped IPv6 is IPv4).
    pub fn for_local(&self, local: IpAddr) -> IpAddr {
        match local {
            IpAddr::V4(l) => IpAddr::V4(self.ipv4.unwrap_or(l)),
            IpAddr::V6(l) => IpAddr::V6(self.ipv6.unwrap_or(l)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_gets_its_own_advertised_address_or_the_local_one() {
        let a = Advertised {
            ipv4: Some(Ipv4Addr::new(203, 0, 113, 7)),
            ipv6: None,
        };
        let l4: IpAddr = "10.0.0.5".parse().unwrap();
        let l6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(a.for_local(l4), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            a.for_local(l6),
            l6,
            "no IPv6 address advertised: the local one"
        );
        let b = Advertised {
            ipv4: None,
            ipv6: Some("2001:db8::7".parse().unwrap()),
        };
        assert_eq!(b.for_local(l4), l4);
        assert_eq!(b.for_local(l6), "2001:db8::7".parse::<IpAddr>().unwrap());
        assert_eq!(Advertised::default().for_local(l6), l6);
    }
}
