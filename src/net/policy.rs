//! Which media destinations the gateway may send to, or tell a client to send to: the one
//! policy every peer-address check goes through (a client's UDP delivery address, the peer of
//! a direct UDP direction, checked by the control core; a UDP source a leg latches onto, checked
//! by the shard before the leg binds or moves there). Telephone routes are operator
//! configuration and are not checked. Plain data shared by both layers: the control core
//! re-exports it as `control::peer_policy`, the shards get a copy at start and on every reload.
//!
//! A client chooses the address it reports, so an unchecked address turns the gateway into a
//! packet cannon aimed at its own network (coturn's CVE-2020-26262 family: `0.0.0.0` and
//! `[::]` reached the relay's loopback services, and IPv6 addresses that embed an IPv4 one
//! reached private IPv4 hosts through NAT64 or 6to4 paths). The policy is a table of prefixes:
//!
//! - **Special** ranges are always denied: "this network" 0.0.0.0/8, IETF protocol
//!   assignments 192.0.0.0/24, benchmarking 198.18.0.0/15, reserved 240.0.0.0/4,
//!   deprecated IPv4-compatible IPv6 ::/96, discard-only 100::/64.
//! - **Private** ranges are denied unless `allow_private_peers` is on: loopback (127.0.0.0/8,
//!   ::1), RFC 1918, shared address space 100.64.0.0/10, link-local (169.254.0.0/16,
//!   fe80::/10), unique-local fc00::/7 and site-local fec0::/10.
//! - The operator's `denied_peers` and `allowed_peers` prefixes.
//!
//! **The most specific prefix that contains the address decides**; at equal length the
//! operator's denial beats the operator's allowance, which beats a built-in range. An address
//! no prefix contains is allowed. So `allowed_peers = ["10.20.0.0/16"]` opens one lab network
//! with `allow_private_peers` off, and `denied_peers = ["10.20.5.0/24"]` closes part of it
//! again.
//!
//! IPv4-mapped IPv6 (::ffff:0:0/96) is judged as the IPv4 address it maps. An IPv6 address
//! that embeds an IPv4 destination — NAT64 64:ff9b::/96 (last 32 bits), 6to4 2002::/16 (bits
//! 16..48), Teredo 2001::/32 (the client, the inverted last 32 bits) — must pass as itself
//! *and* its embedded IPv4 address must pass.
//!
//! Unspecified, multicast and broadcast addresses and port 0 are not unicast destinations at
//! all; the control core's `check_peer` refuses those before the policy is asked.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP prefix, `192.0.2.0/24` or `2001:db8::/32`; a bare address is a host prefix.
/// Host bits must be zero (`10.0.0.1/8` is refused: it is almost always a typo).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// `None` when `len` exceeds the family's width or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let c = Cidr { addr, len };
        (len <= c.width() && c.network_bits() == bits(addr)).then_some(c)
    }

    const fn v4(a: [u8; 4], len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            len,
        }
    }

    const fn v6(segs: [u16; 8], len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(
                segs[0], segs[1], segs[2], segs[3], segs[4], segs[5], segs[6], segs[7],
            )),
            len,
        }
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    fn width(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn mask(&self) -> u128 {
        let w = u32::from(self.width());
        if self.len == 0 {
            0
        } else {
            let ones = u128::MAX << (128 - u32::from(self.len));
            ones >> (128 - w)
        }
    }

    fn network_bits(&self) -> u128 {
        bits(self.addr) & self.mask()
    }

    /// Whether `ip` (same family) lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == self.network_bits()
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a prefix string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("\"{0}\" is not an IP address or prefix (e.g. 10.20.0.0/16, 2001:db8::/32)")]
    Syntax(String),
    #[error("\"{0}\": prefix length longer than the address")]
    Length(String),
    #[error("\"{0}\": bits set after the prefix length (did you mean {1}?)")]
    HostBits(String, Cidr),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let t = s.trim();
        let (a, l) = match t.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| CidrError::Syntax(s.into()))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => width,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().map_err(|_| CidrError::Length(s.into()))?
            }
            Some(_) => return Err(CidrError::Syntax(s.into())),
        };
        if len > width {
            return Err(CidrError::Length(s.into()));
        }
        let c = Cidr { addr, len };
        if c.network_bits() != bits(addr) {
            let net = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(
                    u32::try_from(c.network_bits()).expect("IPv4 bits fit in u32"),
                )),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(c.network_bits())),
            };
            return Err(CidrError::HostBits(s.into(), Cidr { addr: net, len }));
        }
        Ok(c)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a deciding prefix came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Always denied unless `allowed_peers` opens it.
    Special,
    /// Denied unless `allow_private_peers` (or `allowed_peers`) opens it.
    Private,
    /// The operator's `denied_peers`.
    DeniedPeers,
}

/// A refused destination: the address judged (the embedded IPv4 one when that decided), the
/// prefix that decided and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    pub ip: IpAddr,
    /// The IPv6 address that embedded `ip` (NAT64, 6to4, Teredo), when it did.
    pub via: Option<IpAddr>,
    pub range: Cidr,
    /// What the range is: "loopback", "private (RFC 1918)", "denied_peers", ...
    pub what: &'static str,
    pub source: Source,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            Some(v) => write!(f, "{v} embeds {} which", self.ip)?,
            None => write!(f, "{}", self.ip)?,
        }
        write!(f, " is in a denied range ({} {})", self.what, self.range)?;
        match self.source {
            Source::Private => f.write_str("; set allow_private_peers or allowed_peers"),
            Source::Special => f.write_str("; only allowed_peers can open it"),
            Source::DeniedPeers => Ok(()),
        }
    }
}

struct Builtin {
    net: Cidr,
    what: &'static str,
    source: Source,
}

const fn special(net: Cidr, what: &'static str) -> Builtin {
    Builtin {
        net,
        what,
        source: Source::Special,
    }
}

const fn private(net: Cidr, what: &'static str) -> Builtin {
    Builtin {
        net,
        what,
        source: Source::Private,
    }
}

/// The built-in table (IANA special-purpose registries, RFC 6890 and successors).
const BUILTIN: &[Builtin] = &[
    special(Cidr::v4([0, 0, 0, 0], 8), "\"this network\""),
    special(Cidr::v4([192, 0, 0, 0], 24), "IETF protocol assignments"),
    special(Cidr::v4([198, 18, 0, 0], 15), "benchmarking"),
    special(Cidr::v4([240, 0, 0, 0], 4), "reserved"),
    special(Cidr::v6([0; 8], 96), "IPv4-compatible IPv6 (deprecated)"),
    special(Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    private(Cidr::v4([127, 0, 0, 0], 8), "loopback"),
    private(Cidr::v4([10, 0, 0, 0], 8), "private (RFC 1918)"),
    private(Cidr::v4([172, 16, 0, 0], 12), "private (RFC 1918)"),
    private(Cidr::v4([192, 168, 0, 0], 16), "private (RFC 1918)"),
    private(
        Cidr::v4([100, 64, 0, 0], 10),
        "shared address space (RFC 6598)",
    ),
    private(Cidr::v4([169, 254, 0, 0], 16), "link-local"),
    private(Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    private(Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local"),
    private(Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    private(Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
];

/// The peer-address policy: built-in ranges, `allow_private_peers`, and the operator's lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub allow_private: bool,
    pub allowed: Vec<Cidr>,
    pub denied: Vec<Cidr>,
}

/// Precedence at equal prefix length: higher wins.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Builtin,
    Allowed,
    Denied,
}

impl PeerPolicy {
    pub fn new(allow_private: bool, allowed: &[Cidr], denied: &[Cidr]) -> Self {
        PeerPolicy {
            allow_private,
            allowed: allowed.to_vec(),
            denied: denied.to_vec(),
        }
    }

    /// Whether `ip` may be a media destination; IPv4-mapped IPv6 is judged as IPv4.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denial> {
        let ip = unmap(ip);
        self.check_one(ip, None)?;
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = embedded_v4(v6)
        {
            self.check_one(IpAddr::V4(v4), Some(ip))?;
        }
        Ok(())
    }

    fn check_one(&self, ip: IpAddr, via: Option<IpAddr>) -> Result<(), Denial> {
        // (prefix length, rank) of the best match so far, and its verdict.
        let mut best: Option<((u8, Rank), Option<Denial>)> = None;
        let mut consider = |key: (u8, Rank), verdict: Option<Denial>| {
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, verdict));
            }
        };
        for b in BUILTIN.iter().filter(|b| b.net.contains(ip)) {
            // With allow_private_peers a private range allows (so ::1/128 still beats the
            // special ::/96 around it).
            let verdict = (b.source != Source::Private || !self.allow_private).then_some(Denial {
                ip,
                via,
                range: b.net,
                what: b.what,
                source: b.source,
            });
            consider((b.net.len, Rank::Builtin), verdict);
        }
        for n in self.allowed.iter().filter(|n| n.contains(ip)) {
            consider((n.len, Rank::Allowed), None);
        }
        for n in self.denied.iter().filter(|n| n.contains(ip)) {
            let d = Denial {
                ip,
                via,
                range: *n,
                what: "denied_peers",
                source: Source::DeniedPeers,
            };
            consider((n.len, Rank::Denied), Some(d));
        }
        match best {
            Some((_, Some(d))) => Err(d),
            _ => Ok(()),
        }
    }
}

/// ::ffff:a.b.c.d → a.b.c.d; anything else unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 destination an IPv6 address carries: NAT64 well-known prefix 64:ff9b::/96
/// (RFC 6052), 6to4 2002::/16 (RFC 3056), Teredo 2001::/32 (RFC 4380: the client's address,
/// bit-inverted, in the last 32 bits).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(last)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some(Ipv4Addr::from(!u32::from(last)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// (address, denied with the defaults?, the range named when denied)
    const DEFAULTS: &[(&str, bool, &str)] = &[
        // Public unicast, including documentation ranges.
        ("8.8.8.8", false, ""),
        ("192.0.2.1", false, ""),
        ("198.51.100.7", false, ""),
        ("172.32.0.1", false, ""),
        ("100.128.0.1", false, ""),
        ("2001:db8::1", false, ""),
        ("2a00:1450::1", false, ""),
        // Today's private ranges.
        ("127.0.0.1", true, "127.0.0.0/8"),
        ("127.255.255.254", true, "127.0.0.0/8"),
        ("10.1.2.3", true, "10.0.0.0/8"),
        ("172.16.0.1", true, "172.16.0.0/12"),
        ("172.31.255.255", true, "172.16.0.0/12"),
        ("192.168.1.1", true, "192.168.0.0/16"),
        ("169.254.0.1", true, "169.254.0.0/16"),
        ("::1", true, "::1/128"),
        ("fd00::1", true, "fc00::/7"),
        ("fc00::1", true, "fc00::/7"),
        ("fe80::1", true, "fe80::/10"),
        ("fec0::1", true, "fec0::/10"),
        // The rest of the coturn denied-peer-ip family.
        ("0.1.2.3", true, "0.0.0.0/8"),
        ("100.64.0.1", true, "100.64.0.0/10"),
        ("100.127.255.255", true, "100.64.0.0/10"),
        ("192.0.0.9", true, "192.0.0.0/24"),
        ("198.18.0.1", true, "198.18.0.0/15"),
        ("198.19.255.255", true, "198.18.0.0/15"),
        ("240.0.0.1", true, "240.0.0.0/4"),
        ("::7f00:1", true, "::/96"),
        ("100::1", true, "100::/64"),
        // IPv4-mapped: judged as IPv4.
        ("::ffff:10.0.0.1", true, "10.0.0.0/8"),
        ("::ffff:127.0.0.1", true, "127.0.0.0/8"),
        ("::ffff:8.8.8.8", false, ""),
        // NAT64 well-known prefix.
        ("64:ff9b::127.0.0.1", true, "127.0.0.0/8"),
        ("64:ff9b::10.0.0.1", true, "10.0.0.0/8"),
        ("64:ff9b::8.8.8.8", false, ""),
        // 6to4: 2002:AABB:CCDD:: carries AA.BB.CC.DD.
        ("2002:7f00:1::1", true, "127.0.0.0/8"),
        ("2002:c0a8:101::", true, "192.168.0.0/16"),
        ("2002:0808:0808::1", false, ""),
        // Teredo: client 127.0.0.1 inverted is 80ff:fffe; 10.0.0.1 is f5ff:fffe.
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", true, "127.0.0.0/8"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", true, "10.0.0.0/8"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", false, ""),
    ];

    #[test]
    fn default_policy_table() {
        let p = PeerPolicy::default();
        for &(a, denied, range) in DEFAULTS {
            match p.check(ip(a)) {
                Ok(()) => assert!(!denied, "{a} was allowed"),
                Err(d) => {
                    assert!(denied, "{a} was denied: {d}");
                    assert_eq!(d.range.to_string(), range, "{a}: {d}");
                }
            }
        }
    }

    #[test]
    fn allow_private_opens_private_ranges_only() {
        let p = PeerPolicy::new(true, &[], &[]);
        for &(a, denied, range) in DEFAULTS {
            let private = BUILTIN
                .iter()
                .any(|b| b.source == Source::Private && b.net.to_string() == range);
            let got = p.check(ip(a));
            assert_eq!(got.is_err(), denied && !private, "{a}: {got:?}");
        }
    }

    #[test]
    fn operator_lists_most_specific_wins() {
        // (allowed, denied, address, denied?)
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            // A lab's 10.20/16 opens with allow_private_peers off; the rest of 10/8 stays shut.
            (&["10.20.0.0/16"], &[], "10.20.1.1", false),
            (&["10.20.0.0/16"], &[], "10.21.1.1", true),
            // A more specific denial closes part of it again.
            (&["10.20.0.0/16"], &["10.20.5.0/24"], "10.20.5.9", true),
            (&["10.20.0.0/16"], &["10.20.5.0/24"], "10.20.6.9", false),
            // ... and a more specific allowance inside a denial opens one host.
            (&["10.20.5.7"], &["10.20.0.0/16"], "10.20.5.7", false),
            (&["10.20.5.7"], &["10.20.0.0/16"], "10.20.5.8", true),
            // Equal length: the denial wins.
            (&["10.20.0.0/16"], &["10.20.0.0/16"], "10.20.0.1", true),
            // Denying public space.
            (&[], &["203.0.113.0/24"], "203.0.113.5", true),
            (&[], &["2001:db8::/32"], "2001:db8::5", true),
            // A broad allowance does not open the more specific built-in ranges ...
            (&["0.0.0.0/0"], &[], "127.0.0.1", true),
            // ... but one as specific as the built-in range does.
            (&["127.0.0.0/8"], &[], "127.0.0.1", false),
            (&["240.0.0.0/4"], &[], "240.1.1.1", false),
            // Embedded IPv4 follows the IPv4 lists.
            (&["10.20.0.0/16"], &[], "64:ff9b::10.20.0.1", false),
            (&[], &["8.8.8.0/24"], "64:ff9b::8.8.8.8", true),
            (&[], &["8.8.8.0/24"], "2002:808:808::1", true),
            (&[], &["8.8.8.0/24"], "::ffff:8.8.8.8", true),
        ];
        for &(allowed, denied, a, want) in cases {
            let p = PeerPolicy::new(false, &cidrs(allowed), &cidrs(denied));
            let got = p.check(ip(a));
            assert_eq!(got.is_err(), want, "{allowed:?} {denied:?} {a}: {got:?}");
        }
    }

    #[test]
    fn denials_say_what_and_how_to_open() {
        let p = PeerPolicy::default();
        let d = p.check(ip("127.0.0.1")).unwrap_err();
        assert_eq!(
            d.to_string(),
            "127.0.0.1 is in a denied range (loopback 127.0.0.0/8); set allow_private_peers or allowed_peers"
        );
        let d = p.check(ip("64:ff9b::a00:1")).unwrap_err();
        assert_eq!(
            d.to_string(),
            "64:ff9b::a00:1 embeds 10.0.0.1 which is in a denied range (private (RFC 1918) 10.0.0.0/8); set allow_private_peers or allowed_peers"
        );
        let d = p.check(ip("198.18.0.1")).unwrap_err();
        assert!(
            d.to_string().ends_with("only allowed_peers can open it"),
            "{d}"
        );
        let p = PeerPolicy::new(false, &[], &cidrs(&["203.0.113.0/24"]));
        let d = p.check(ip("203.0.113.5")).unwrap_err();
        assert_eq!(
            d.to_string(),
            "203.0.113.5 is in a denied range (denied_peers 203.0.113.0/24)"
        );
    }

    #[test]
    fn cidr_parsing() {
        for (s, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3/32"),
            (" 2001:db8::/32 ", "2001:db8::/32"),
            ("::/0", "::/0"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::1", "::1/128"),
        ] {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), want);
        }
        for s in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "x/8",
            "10.0.0.0/8/8",
        ] {
            assert!(s.parse::<Cidr>().is_err(), "{s}");
        }
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.1/8\": bits set after the prefix length (did you mean 10.0.0.0/8?)"
        );
        let v: Vec<Cidr> = serde_json::from_str(r#"["10.0.0.0/8", "fd00::/8"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"["10.0.0.0/8","fd00::/8"]"#
        );
    }

    proptest! {
        #[test]
        fn cidr_parser_never_panics_and_round_trips(s in "\\PC{0,48}") {
            if let Ok(c) = s.parse::<Cidr>() {
                prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
            }
        }

        #[test]
        fn prefix_contains_exactly_what_its_mask_says(a in any::<u32>(), b in any::<u32>(), len in 0u8..=32) {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            let net = Cidr::new(IpAddr::V4(Ipv4Addr::from(a & mask)), len).unwrap();
            prop_assert_eq!(net.contains(IpAddr::V4(Ipv4Addr::from(b))), (a & mask) == (b & mask));
            prop_assert!(net.contains(IpAddr::V4(Ipv4Addr::from(a))));
        }

        #[test]
        fn policy_never_panics(bytes in any::<[u8; 16]>(), allow in any::<bool>()) {
            let p = PeerPolicy::new(allow, &cidrs(&["10.0.0.0/8"]), &cidrs(&["2001:db8::/32"]));
            let _ = p.check(IpAddr::V6(Ipv6Addr::from(bytes)));
            let _ = p.check(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])));
        }
    }
}
