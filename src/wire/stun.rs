//! STUN (RFC 8489) message codec, with the TURN (RFC 8656) methods and attributes the perf
//! harness uses.
//!
//! This module owns the STUN byte format: [`looks_like_stun`] is the per-datagram demultiplexing
//! test, [`Message`] a checked view over received bytes (after [`Message::parse`] no accessor
//! can panic), [`Writer`] an encoder into a caller-owned buffer. MESSAGE-INTEGRITY (HMAC-SHA1)
//! and FINGERPRINT (CRC-32) are computed and verified here. Nothing on the parse or write path
//! allocates. It does not run transactions, retransmit, or decide which attributes a method
//! requires: that is `control/` (probing, bindings) and `client/`.
//!
//! RFC 8489 §5:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |0 0|     STUN Message Type     |         Message Length        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         Magic Cookie                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! |                     Transaction ID (96 bits)                  |
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// RFC 8489 §5: "The Magic Cookie field MUST contain the fixed value 0x2112A442".
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// At most this many attributes are walked by [`Message::parse`] (bounds the work per datagram).
pub const MAX_ATTRIBUTES: usize = 64;

/// Binding (RFC 8489 §18.2).
pub const BINDING: u16 = 0x0001;
/// TURN Allocate (RFC 8656 §17).
pub const ALLOCATE: u16 = 0x0003;
/// TURN Refresh.
pub const REFRESH: u16 = 0x0004;
/// TURN Send (indication).
pub const SEND: u16 = 0x0006;
/// TURN Data (indication).
pub const DATA: u16 = 0x0007;
/// TURN CreatePermission.
pub const CREATE_PERMISSION: u16 = 0x0008;
/// TURN ChannelBind.
pub const CHANNEL_BIND: u16 = 0x0009;

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
}

use attr::{FINGERPRINT, MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256};

/// RFC 8489 §14.1: "0x01:IPv4, 0x02:IPv6".
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;
/// RFC 8489 §14.7: "XOR'ed with the 32-bit value 0x5354554e".
const FINGERPRINT_XOR: u32 = 0x5354_554e;
const MI_LEN: usize = 20;
/// Largest message length field (the 16-bit Message Length excludes the header).
const MAX_BODY: usize = u16::MAX as usize;

/// Errors of the STUN layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum StunError {
    #[error("STUN message truncated: shorter than its header or its length field")]
    Truncated,
    #[error("not a STUN message (top bits of the type or magic cookie wrong)")]
    NotStun,
    #[error("STUN message length is not a multiple of 4")]
    BadLength,
    #[error("STUN attribute runs past the end of the message, or has a malformed value")]
    BadAttribute,
    #[error("STUN message has more than 64 attributes")]
    TooManyAttributes,
    #[error("STUN address attribute has an unknown address family")]
    BadAddressFamily,
    #[error("STUN message has no MESSAGE-INTEGRITY")]
    MissingIntegrity,
    #[error("STUN MESSAGE-INTEGRITY does not match")]
    IntegrityMismatch,
    #[error("STUN FINGERPRINT does not match")]
    BadFingerprint,
    #[error("buffer too small for the STUN message")]
    BufferTooSmall,
    #[error("STUN method does not fit in 12 bits")]
    BadMethod,
    #[error("STUN error code outside 300..=699")]
    BadErrorCode,
    #[error("STUN message would exceed the 65535-byte length field")]
    MessageTooLong,
    #[error("STUN attribute after MESSAGE-INTEGRITY or FINGERPRINT")]
    AttributeOrder,
}

/// The class of a message (RFC 8489 §5: C1 C0 bits of the type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// RFC 8489 §5: the type interleaves the class bits into the method:
///
/// ```text
///  0                 1
///  2  3  4 5 6 7 8 9 0 1 2 3 4 5
/// +--+--+-+-+-+-+-+-+-+-+-+-+-+-+
/// |M |M |M|M|M|C|M|M|M|C|M|M|M|M|
/// |11|10|9|8|7|1|6|5|4|0|3|2|1|0|
/// +--+--+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
fn message_type(class: Class, method: u16) -> u16 {
    let c = class.bits();
    ((method & 0x0f80) << 2)
        | ((method & 0x0070) << 1)
        | (method & 0x000f)
        | ((c & 0b10) << 7)
        | ((c & 0b01) << 4)
}

/// RFC 7983 §7 demultiplexing ("If the value of the first byte is in the range 0 to 3, then
/// the packet is STUN") plus header sanity: at least 20 bytes, the magic cookie, and a
/// message length that is a multiple of 4. Cheap: called on every datagram by the shard.
///
/// The first-byte rule recognises methods below 0x100, which covers every method IANA has
/// assigned (Binding and the TURN methods are all below 0x010).
pub fn looks_like_stun(b: &[u8]) -> bool {
    match b.first_chunk::<8>() {
        Some(&[t0, _, l0, l1, c0, c1, c2, c3]) => {
            b.len() >= HEADER_LEN
                && t0 <= 3
                && u32::from_be_bytes([c0, c1, c2, c3]) == MAGIC_COOKIE
                && u16::from_be_bytes([l0, l1]) % 4 == 0
        }
        None => false,
    }
}

/// One attribute as found in a message: where its TLV starts, its type, its value without
/// padding.
#[derive(Clone, Copy, Debug)]
struct RawAttr<'a> {
    at: usize,
    t: u16,
    value: &'a [u8],
}

/// Reads the TLV at `at`; returns it and the offset of the next one.
///
/// RFC 8489 §14: "The value in the length field MUST contain the length of the Value part of
/// the attribute, prior to padding, measured in bytes. Since STUN aligns attributes on 32-bit
/// boundaries, attributes whose content is not a multiple of 4 bytes are padded with 1, 2, or
/// 3 bytes of padding so that its value contains a multiple of 4 bytes. The padding bits MUST
/// be set to zero on sending and MUST be ignored by the receiver."
fn tlv_at(msg: &[u8], at: usize) -> Result<(RawAttr<'_>, usize), StunError> {
    let rest = msg.get(at..).ok_or(StunError::BadAttribute)?;
    let (&[t0, t1, l0, l1], after) = rest
        .split_first_chunk::<4>()
        .ok_or(StunError::BadAttribute)?;
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    let padded = len.next_multiple_of(4);
    if after.len() < padded {
        return Err(StunError::BadAttribute);
    }
    let value = after.get(..len).ok_or(StunError::BadAttribute)?;
    let attr = RawAttr {
        at,
        t: u16::from_be_bytes([t0, t1]),
        value,
    };
    Ok((attr, at + 4 + padded))
}

/// Every attribute of an already validated message, in order.
#[derive(Clone, Debug)]
struct RawAttrs<'a> {
    msg: &'a [u8],
    at: usize,
}

impl<'a> Iterator for RawAttrs<'a> {
    type Item = RawAttr<'a>;

    fn next(&mut self) -> Option<RawAttr<'a>> {
        if self.at >= self.msg.len() {
            return None;
        }
        match tlv_at(self.msg, self.at) {
            Ok((a, next)) => {
                self.at = next;
                Some(a)
            }
            Err(_) => {
                self.at = self.msg.len();
                None
            }
        }
    }
}

/// What the attributes seen so far allow to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Nothing,
    Integrity,
    IntegritySha256,
    Fingerprint,
}

impl After {
    /// Applies the ordering rules to attribute `t`: `Some(next state)` if `t` counts,
    /// `None` if it must be ignored.
    ///
    /// RFC 8489 §14.5: "With the exception of the MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
    /// attributes, which appear after MESSAGE-INTEGRITY, agents MUST ignore all other
    /// attributes that follow MESSAGE-INTEGRITY." §14.6: "With the exception of the
    /// FINGERPRINT attribute, which appears after MESSAGE-INTEGRITY-SHA256, agents MUST
    /// ignore all other attributes that follow MESSAGE-INTEGRITY-SHA256." §14.7: "When
    /// present, the FINGERPRINT attribute MUST be the last attribute in the message".
    fn accept(self, t: u16) -> Option<After> {
        match (self, t) {
            (After::Fingerprint, _) => None,
            (_, FINGERPRINT) => Some(After::Fingerprint),
            (After::Nothing, MESSAGE_INTEGRITY) => Some(After::Integrity),
            (After::Nothing | After::Integrity, MESSAGE_INTEGRITY_SHA256) => {
                Some(After::IntegritySha256)
            }
            (After::Nothing, _) => Some(After::Nothing),
            _ => None,
        }
    }
}

/// The attributes that count, per the ordering rules of [`After::accept`].
#[derive(Clone, Debug)]
struct Visible<'a> {
    raw: RawAttrs<'a>,
    after: After,
}

impl<'a> Iterator for Visible<'a> {
    type Item = RawAttr<'a>;

    fn next(&mut self) -> Option<RawAttr<'a>> {
        loop {
            if self.after == After::Fingerprint {
                return None;
            }
            let a = self.raw.next()?;
            if let Some(next) = self.after.accept(a.t) {
                self.after = next;
                return Some(a);
            }
        }
    }
}

/// HMAC-SHA1 over `prefix` (a message up to the MESSAGE-INTEGRITY attribute, header
/// included) with the header's length field replaced by `length_field`.
fn integrity_hmac(key: &[u8], prefix: &[u8], length_field: u16) -> Result<[u8; MI_LEN], StunError> {
    let (Some(msg_type), Some(rest)) = (prefix.get(..2), prefix.get(4..)) else {
        return Err(StunError::Truncated);
    };
    // HMAC takes keys of any length (RFC 2104 §2), so this error cannot happen.
    let mut mac = Hmac::<Sha1>::new_from_slice(key).map_err(|_| StunError::IntegrityMismatch)?;
    mac.update(msg_type);
    mac.update(&length_field.to_be_bytes());
    mac.update(rest);
    Ok(mac.finalize().into_bytes().into())
}

/// CRC-32 (ISO-HDLC, the one of ITU-T V.42 / Ethernet), reflected polynomial 0xEDB88320.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[usize::from(c.to_le_bytes()[0] ^ b)] ^ (c >> 8);
        }
    }
    !c
}

/// RFC 8489 §14.7: "The value of the attribute is computed as the CRC-32 of the STUN message
/// up to (but excluding) the FINGERPRINT attribute itself, XOR'ed with the 32-bit value
/// 0x5354554e." The length field counts the FINGERPRINT attribute: `length_field`.
fn fingerprint_value(prefix: &[u8], length_field: u16) -> Result<u32, StunError> {
    let (Some(msg_type), Some(rest)) = (prefix.get(..2), prefix.get(4..)) else {
        return Err(StunError::Truncated);
    };
    Ok(crc32(&[msg_type, &length_field.to_be_bytes(), rest]) ^ FINGERPRINT_XOR)
}

/// The header length field for a message whose attributes end at `end` (header included).
fn length_field(end: usize) -> Result<u16, StunError> {
    end.checked_sub(HEADER_LEN)
        .and_then(|l| u16::try_from(l).ok())
        .ok_or(StunError::MessageTooLong)
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `xor_key` is the transaction ID for the XOR forms.
///
/// RFC 8489 §14.2: "X-Port is computed by XOR'ing the mapped port with the most significant
/// 16 bits of the magic cookie. If the IP address family is IPv4, X-Address is computed by
/// XOR'ing the mapped IP address with the magic cookie. If the IP address family is IPv6,
/// X-Address is computed by XOR'ing the mapped IP address with the concatenation of the
/// magic cookie and the 96-bit transaction ID."
fn decode_address(value: &[u8], xor_key: Option<&[u8; 12]>) -> Result<SocketAddr, StunError> {
    let [_, family, p0, p1, addr @ ..] = value else {
        return Err(StunError::BadAttribute);
    };
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([*p0, *p1]);
    let ip = match *family {
        FAMILY_IPV4 => {
            let mut a: [u8; 4] = addr.try_into().map_err(|_| StunError::BadAttribute)?;
            if xor_key.is_some() {
                a.iter_mut().zip(cookie).for_each(|(x, k)| *x ^= k);
            }
            IpAddr::from(a)
        }
        FAMILY_IPV6 => {
            let mut a: [u8; 16] = addr.try_into().map_err(|_| StunError::BadAttribute)?;
            if let Some(txid) = xor_key {
                let key = cookie.iter().chain(txid.iter());
                a.iter_mut().zip(key).for_each(|(x, k)| *x ^= k);
            }
            IpAddr::from(a)
        }
        _ => return Err(StunError::BadAddressFamily),
    };
    if xor_key.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    Ok(SocketAddr::new(ip, port))
}

/// Encodes an XOR-address value; returns the bytes and how many of them are used (8 or 20).
fn encode_xor_address(addr: SocketAddr, txid: &[u8; 12]) -> ([u8; 20], usize) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut v = [0u8; 20];
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let [x0, x1] = port.to_be_bytes();
    let (family, octets, len): (u8, [u8; 16], usize) = match addr.ip() {
        IpAddr::V4(ip) => {
            let mut o = [0u8; 16];
            for ((dst, a), k) in o.iter_mut().zip(ip.octets()).zip(cookie) {
                *dst = a ^ k;
            }
            (FAMILY_IPV4, o, 8)
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            let key = cookie.iter().chain(txid.iter());
            o.iter_mut().zip(key).for_each(|(x, k)| *x ^= k);
            (FAMILY_IPV6, o, 20)
        }
    };
    let (head, tail) = v.split_at_mut(4);
    head.copy_from_slice(&[0, family, x0, x1]);
    tail.copy_from_slice(&octets);
    (v, len)
}

/// A checked view of one STUN message.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// Exactly the message: header + `length` bytes.
    bytes: &'a [u8],
    msg_type: u16,
    txid: &'a [u8; 12],
}

impl<'a> Message<'a> {
    /// Validates the header (top two bits zero, magic cookie, length a multiple of 4,
    /// 20 + length <= `b.len()`) and walks every attribute (TLV within bounds, padded to 4),
    /// at most [`MAX_ATTRIBUTES`]. Bytes after 20 + length are ignored.
    pub fn parse(b: &'a [u8]) -> Result<Self, StunError> {
        let (header, _) = b
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(StunError::Truncated)?;
        let [t0, t1, l0, l1, c0, c1, c2, c3, txid @ ..] = header;
        // RFC 8489 §5: "The most significant 2 bits of every STUN message MUST be zeroes."
        if t0 & 0xc0 != 0 || u32::from_be_bytes([*c0, *c1, *c2, *c3]) != MAGIC_COOKIE {
            return Err(StunError::NotStun);
        }
        // RFC 8489 §5: "the message length MUST contain the size of the message in bytes,
        // not including the 20-byte STUN header. Since all STUN attributes are padded to a
        // multiple of 4 bytes, the last 2 bits of this field are always zero."
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        if len % 4 != 0 {
            return Err(StunError::BadLength);
        }
        let bytes = b.get(..HEADER_LEN + len).ok_or(StunError::Truncated)?;
        let mut at = HEADER_LEN;
        let mut count = 0;
        while at < bytes.len() {
            count += 1;
            if count > MAX_ATTRIBUTES {
                return Err(StunError::TooManyAttributes);
            }
            at = tlv_at(bytes, at)?.1;
        }
        Ok(Message {
            bytes,
            msg_type: u16::from_be_bytes([*t0, *t1]),
            txid,
        })
    }

    pub fn class(&self) -> Class {
        match ((self.msg_type >> 7) & 0b10) | ((self.msg_type >> 4) & 0b01) {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }

    /// The 12-bit method (see [`message_type`] for the bit layout).
    pub fn method(&self) -> u16 {
        let t = self.msg_type;
        ((t & 0x3e00) >> 2) | ((t & 0x00e0) >> 1) | (t & 0x000f)
    }

    pub fn transaction_id(&self) -> &'a [u8; 12] {
        self.txid
    }

    /// 20 + the message length field.
    #[allow(clippy::len_without_is_empty)] // a message is never empty: it has a header
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The message bytes (header and attributes, without what followed in the datagram).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn raw(&self) -> RawAttrs<'a> {
        RawAttrs {
            msg: self.bytes,
            at: HEADER_LEN,
        }
    }

    fn visible(&self) -> Visible<'a> {
        Visible {
            raw: self.raw(),
            after: After::Nothing,
        }
    }

    /// Attributes in order, as (type, value without padding). Per RFC 8489 §14.5–§14.7,
    /// attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
    /// are skipped, and nothing after FINGERPRINT is returned.
    pub fn attributes(&self) -> impl Iterator<Item = (u16, &'a [u8])> + use<'a> {
        self.visible().map(|a| (a.t, a.value))
    }

    /// Value of the first attribute of type `t`.
    pub fn attr(&self, t: u16) -> Option<&'a [u8]> {
        self.visible().find(|a| a.t == t).map(|a| a.value)
    }

    pub fn username(&self) -> Option<&'a [u8]> {
        self.attr(attr::USERNAME)
    }

    /// Decodes XOR-MAPPED-ADDRESS / XOR-PEER-ADDRESS / XOR-RELAYED-ADDRESS (pass the type);
    /// `Ok(None)` if absent.
    pub fn xor_address(&self, t: u16) -> Result<Option<SocketAddr>, StunError> {
        self.attr(t)
            .map(|v| decode_address(v, Some(self.txid)))
            .transpose()
    }

    /// Decodes the plain MAPPED-ADDRESS (RFC 8489 §14.1); `Ok(None)` if absent.
    pub fn mapped_address(&self) -> Result<Option<SocketAddr>, StunError> {
        self.attr(attr::MAPPED_ADDRESS)
            .map(|v| decode_address(v, None))
            .transpose()
    }

    /// ERROR-CODE as (class * 100 + number, reason phrase); `None` if absent or malformed.
    ///
    /// RFC 8489 §14.8: "The Class represents the hundreds digit of the error code. The value
    /// MUST be between 3 and 6. The Number represents the binary encoding of the error code
    /// modulo 100, and its value MUST be between 0 and 99."
    pub fn error_code(&self) -> Option<(u16, &'a [u8])> {
        match self.attr(attr::ERROR_CODE)? {
            [_, _, class, number, reason @ ..] if *number < 100 => {
                Some((u16::from(class & 0x07) * 100 + u16::from(*number), reason))
            }
            _ => None,
        }
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) with `key`: the password bytes
    /// for short-term credentials, [`long_term_key`] for long-term ones. The comparison is
    /// constant-time. `MissingIntegrity` if absent, `IntegrityMismatch` if wrong (also when
    /// its value is not 20 bytes).
    ///
    /// RFC 8489 §14.5: "The text used as input to HMAC is the STUN message, up to and
    /// including the attribute preceding the MESSAGE-INTEGRITY attribute. The Length field of
    /// the STUN message header is adjusted to point to the end of the MESSAGE-INTEGRITY
    /// attribute."
    pub fn check_integrity(&self, key: &[u8]) -> Result<(), StunError> {
        let mi = self
            .visible()
            .find(|a| a.t == MESSAGE_INTEGRITY)
            .ok_or(StunError::MissingIntegrity)?;
        let prefix = self.bytes.get(..mi.at).ok_or(StunError::Truncated)?;
        let computed = integrity_hmac(key, prefix, length_field(mi.at + 4 + MI_LEN)?)?;
        if bool::from(computed[..].ct_eq(mi.value)) {
            Ok(())
        } else {
            Err(StunError::IntegrityMismatch)
        }
    }

    /// Verifies FINGERPRINT (RFC 8489 §14.7) if present; `Ok(())` if absent.
    pub fn check_fingerprint(&self) -> Result<(), StunError> {
        let Some(fp) = self.visible().find(|a| a.t == FINGERPRINT) else {
            return Ok(());
        };
        let want: [u8; 4] = fp.value.try_into().map_err(|_| StunError::BadFingerprint)?;
        let prefix = self.bytes.get(..fp.at).ok_or(StunError::Truncated)?;
        // The length field is taken to end at FINGERPRINT, which the RFC requires to be last.
        let got = fingerprint_value(prefix, length_field(fp.at + 8)?)?;
        if got == u32::from_be_bytes(want) {
            Ok(())
        } else {
            Err(StunError::BadFingerprint)
        }
    }
}

/// Long-term credential key (RFC 8489 §9.2.2, MD5 variant):
/// `key = MD5(username ":" OpaqueString(realm) ":" OpaqueString(password))`.
///
/// The strings are used as given: SASLprep/OpaqueString preparation is the caller's.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Encoder of one STUN message into a caller-owned buffer. Never allocates; every method
/// fails with `BufferTooSmall` (or another error) instead of panicking, leaving what was
/// written so far intact. The header length field is kept up to date after every attribute.
///
/// Attributes cannot follow FINGERPRINT, and only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
/// can follow MESSAGE-INTEGRITY (`AttributeOrder`), since a receiver would ignore them.
#[derive(Debug)]
pub struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
    txid: [u8; 12],
    after: After,
}

impl<'b> Writer<'b> {
    /// Writes the header of a message of `class` and `method` (12 bits) into `buf`.
    pub fn new(
        buf: &'b mut [u8],
        class: Class,
        method: u16,
        txid: &[u8; 12],
    ) -> Result<Self, StunError> {
        if method > 0x0fff {
            return Err(StunError::BadMethod);
        }
        let header = buf
            .first_chunk_mut::<HEADER_LEN>()
            .ok_or(StunError::BufferTooSmall)?;
        let [t0, t1] = message_type(class, method).to_be_bytes();
        let [c0, c1, c2, c3] = MAGIC_COOKIE.to_be_bytes();
        let (head, id) = header.split_at_mut(8);
        head.copy_from_slice(&[t0, t1, 0, 0, c0, c1, c2, c3]);
        id.copy_from_slice(txid);
        Ok(Writer {
            buf,
            len: HEADER_LEN,
            txid: *txid,
            after: After::Nothing,
        })
    }

    fn set_length_field(&mut self, field: u16) {
        if let Some(l) = self.buf.get_mut(2..4) {
            l.copy_from_slice(&field.to_be_bytes());
        }
    }

    /// Checks that an attribute of type `t` with a `value_len`-byte value may be appended;
    /// returns the message end after it.
    fn reserve(&self, t: u16, value_len: usize) -> Result<usize, StunError> {
        if self.after.accept(t).is_none() {
            return Err(StunError::AttributeOrder);
        }
        if value_len > MAX_BODY {
            return Err(StunError::MessageTooLong);
        }
        let end = self.len + 4 + value_len.next_multiple_of(4);
        length_field(end)?;
        if end > self.buf.len() {
            return Err(StunError::BufferTooSmall);
        }
        Ok(end)
    }

    /// Appends a TLV whose value is the concatenation of `parts`, zero-padded to 4.
    fn attr_parts(&mut self, t: u16, parts: &[&[u8]]) -> Result<&mut Self, StunError> {
        let value_len: usize = parts.iter().map(|p| p.len()).sum();
        let end = self.reserve(t, value_len)?;
        let field = length_field(end)?;
        let dst = self
            .buf
            .get_mut(self.len..end)
            .ok_or(StunError::BufferTooSmall)?;
        let (head, mut rest) = dst
            .split_first_chunk_mut::<4>()
            .ok_or(StunError::BufferTooSmall)?;
        let [t0, t1] = t.to_be_bytes();
        let [l0, l1] = u16::try_from(value_len)
            .map_err(|_| StunError::MessageTooLong)?
            .to_be_bytes();
        *head = [t0, t1, l0, l1];
        for part in parts {
            let (d, tail) = rest
                .split_at_mut_checked(part.len())
                .ok_or(StunError::BufferTooSmall)?;
            d.copy_from_slice(part);
            rest = tail;
        }
        rest.fill(0);
        self.len = end;
        self.set_length_field(field);
        if let Some(next) = self.after.accept(t) {
            self.after = next;
        }
        Ok(self)
    }

    /// Appends attribute `t` with `value`, zero-padded to a multiple of 4.
    pub fn attr(&mut self, t: u16, value: &[u8]) -> Result<&mut Self, StunError> {
        self.attr_parts(t, &[value])
    }

    /// Appends an XOR-address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS,
    /// XOR-RELAYED-ADDRESS) of type `t`.
    pub fn xor_address(&mut self, t: u16, addr: SocketAddr) -> Result<&mut Self, StunError> {
        let (value, len) = encode_xor_address(addr, &self.txid);
        let value = value.get(..len).ok_or(StunError::BadAttribute)?;
        self.attr_parts(t, &[value])
    }

    /// Appends ERROR-CODE with `code` in 300..=699 and a reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<&mut Self, StunError> {
        if !(300..=699).contains(&code) {
            return Err(StunError::BadErrorCode);
        }
        let class = u8::try_from(code / 100).map_err(|_| StunError::BadErrorCode)?;
        let number = u8::try_from(code % 100).map_err(|_| StunError::BadErrorCode)?;
        self.attr_parts(
            attr::ERROR_CODE,
            &[&[0, 0, class, number], reason.as_bytes()],
        )
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 with `key` over the message so far, with the
    /// length field already counting this attribute (RFC 8489 §14.5).
    pub fn message_integrity(&mut self, key: &[u8]) -> Result<&mut Self, StunError> {
        let end = self.reserve(MESSAGE_INTEGRITY, MI_LEN)?;
        let prefix = self.buf.get(..self.len).ok_or(StunError::BufferTooSmall)?;
        let mac = integrity_hmac(key, prefix, length_field(end)?)?;
        self.attr_parts(MESSAGE_INTEGRITY, &[&mac])
    }

    /// Appends FINGERPRINT: CRC-32 of the message so far XOR 0x5354554e (RFC 8489 §14.7).
    pub fn fingerprint(&mut self) -> Result<&mut Self, StunError> {
        let end = self.reserve(FINGERPRINT, 4)?;
        let prefix = self.buf.get(..self.len).ok_or(StunError::BufferTooSmall)?;
        let value = fingerprint_value(prefix, length_field(end)?)?;
        self.attr_parts(FINGERPRINT, &[&value.to_be_bytes()])
    }

    /// Bytes written so far (header included).
    #[allow(clippy::len_without_is_empty)] // never empty: the header is written by `new`
    pub fn len(&self) -> usize {
        self.len
    }

    /// The message written so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Total bytes written; the message is `buf[..n]`.
    pub fn finish(self) -> usize {
        self.len
    }
}

/// A Binding request keyed with a short-term credential (RFC 8489 §9.1): USERNAME,
/// MESSAGE-INTEGRITY with `key`, FINGERPRINT. Returns its length. Used by clients binding a leg
/// and by the gateway when it checks a new source of a leg before moving media to it.
pub fn write_binding_request(
    buf: &mut [u8],
    username: &[u8],
    key: &[u8],
    txid: &[u8; 12],
) -> Result<usize, StunError> {
    let mut w = Writer::new(buf, Class::Request, BINDING, txid)?;
    w.attr(attr::USERNAME, username)?;
    w.message_integrity(key)?;
    w.fingerprint()?;
    Ok(w.finish())
}

/// A Binding success response (RFC 8489 §7.3.1.1): XOR-MAPPED-ADDRESS `mapped`,
/// MESSAGE-INTEGRITY with `key`, FINGERPRINT. Returns its length.
pub fn write_binding_success(
    buf: &mut [u8],
    txid: &[u8; 12],
    mapped: SocketAddr,
    key: &[u8],
) -> Result<usize, StunError> {
    let mut w = Writer::new(buf, Class::Success, BINDING, txid)?;
    w.xor_address(attr::XOR_MAPPED_ADDRESS, mapped)?;
    w.message_integrity(key)?;
    w.fingerprint()?;
    Ok(w.finish())
}

/// Checks a Binding success response to the request `txid` keyed with `key` (transaction id,
/// MESSAGE-INTEGRITY, FINGERPRINT); returns its XOR-MAPPED-ADDRESS.
pub fn check_binding_success(msg: &[u8], key: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    let m = Message::parse(msg).ok()?;
    let ok = m.transaction_id() == txid
        && m.method() == BINDING
        && m.class() == Class::Success
        && m.check_integrity(key).is_ok()
        && m.check_fingerprint().is_ok();
    if !ok {
        return None;
    }
    m.xor_address(attr::XOR_MAPPED_ADDRESS).ok()?
}

/// A classic RFC 3489 Binding response (no magic cookie: the 16-byte transaction id of the
/// request is echoed whole) with MAPPED-ADDRESS `mapped` (RFC 3489 §11.2.1). `request` is the
/// request's 20-byte header. Returns its length.
pub fn write_rfc3489_binding_response(
    buf: &mut [u8],
    request: &[u8],
    mapped: SocketAddr,
) -> Result<usize, StunError> {
    let hdr = request
        .first_chunk::<HEADER_LEN>()
        .ok_or(StunError::Truncated)?;
    let (family, ip): (u8, Vec<u8>) = match mapped.ip() {
        IpAddr::V4(a) => (1, a.octets().to_vec()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (1, v4.octets().to_vec()),
            // RFC 3489 knows only IPv4; an IPv6 client gets the RFC 8489 family.
            None => (2, a.octets().to_vec()),
        },
    };
    let value_len = 4 + ip.len();
    let total = HEADER_LEN + 4 + value_len;
    let out = buf.get_mut(..total).ok_or(StunError::BufferTooSmall)?;
    out[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
    out[2..4].copy_from_slice(&((4 + value_len) as u16).to_be_bytes());
    out[4..20].copy_from_slice(&hdr[4..20]);
    out[20..22].copy_from_slice(&attr::MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(value_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    out[26..28].copy_from_slice(&mapped.port().to_be_bytes());
    out[28..28 + ip.len()].copy_from_slice(&ip);
    Ok(total)
}

/// Whether `b` is a classic RFC 3489 Binding request: type 0x0001, a length that is a multiple
/// of 4 and matches the datagram, and no RFC 5389 magic cookie.
pub fn is_rfc3489_binding_request(b: &[u8]) -> bool {
    let Some(h) = b.first_chunk::<HEADER_LEN>() else {
        return false;
    };
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    u16::from_be_bytes([h[0], h[1]]) == BINDING
        && len % 4 == 0
        && HEADER_LEN + len == b.len()
        && u32::from_be_bytes([h[4], h[5], h[6], h[7]]) != MAGIC_COOKIE
}

#[cfg(test)]
mod tests {
    use super::attr::*;
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn keyed_binding_request_and_success_round_trip() {
        let mut b = [0u8; 256];
        let n = write_binding_request(&mut b, b"leg-1", b"key", &[4; 12]).unwrap();
        let m = Message::parse(&b[..n]).unwrap();
        assert_eq!((m.class(), m.method()), (Class::Request, BINDING));
        assert_eq!(m.username(), Some(&b"leg-1"[..]));
        assert!(m.check_integrity(b"key").is_ok() && m.check_fingerprint().is_ok());
        let to: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let n = write_binding_success(&mut b, &[4; 12], to, b"key").unwrap();
        let m = Message::parse(&b[..n]).unwrap();
        assert_eq!(m.xor_address(XOR_MAPPED_ADDRESS), Ok(Some(to)));
        assert!(write_binding_success(&mut b[..30], &[4; 12], to, b"key").is_err());
    }

    #[test]
    fn classic_rfc3489_binding_is_recognised_and_answered() {
        let mut req = vec![0x00, 0x01, 0x00, 0x08];
        req.extend_from_slice(&[0xab; 16]);
        req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0]); // CHANGE-REQUEST
        assert!(is_rfc3489_binding_request(&req));
        assert!(!looks_like_stun(&req), "no magic cookie");
        let mut b = [0u8; 64];
        let n =
            write_rfc3489_binding_response(&mut b, &req, "10.1.2.3:4660".parse().unwrap()).unwrap();
        assert_eq!(
            &b[..n],
            &[
                1, 1, 0, 12, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
                0xab, 0xab, 0xab, 0xab, 0xab, 0, 1, 0, 8, 0, 1, 0x12, 0x34, 10, 1, 2, 3
            ][..]
        );
        // An RFC 5389 request (cookie) and a wrong length are not classic requests.
        let mut cookie = [0u8; 20];
        let m = Writer::new(&mut cookie, Class::Request, BINDING, &[1; 12])
            .unwrap()
            .finish();
        assert!(!is_rfc3489_binding_request(&cookie[..m]));
        assert!(!is_rfc3489_binding_request(&req[..24]));
    }

    proptest! {
        #[test]
        fn classic_answers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = [0u8; 64];
            if is_rfc3489_binding_request(&data) {
                let n = write_rfc3489_binding_response(&mut b, &data, "[2001:db8::1]:7".parse().unwrap()).unwrap();
                prop_assert_eq!(&b[4..20], &data[4..20]);
                prop_assert!(n <= 44);
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// RFC 5769 §2.1, "Sample Request".
    const SAMPLE_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    /// RFC 5769 §2.2, "Sample IPv4 Response".
    const SAMPLE_IPV4_RESPONSE: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 08 00 01 a1 47 e1 12 a6 43
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
        80 28 00 04 c0 7d 4c 96";

    /// RFC 5769 §2.3, "Sample IPv6 Response".
    const SAMPLE_IPV6_RESPONSE: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
        80 28 00 04 c8 fb 0b 4c";

    /// RFC 5769 §2.4, "Sample Request with Long-Term Authentication".
    const SAMPLE_LONG_TERM_REQUEST: &str = "
        00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
        00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
                    53 54 76 79 36 34 73 41
        00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
        00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

    const PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
    const TXID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];
    const LT_TXID: [u8; 12] = [
        0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0, 0x29, 0xda, 0x41, 0x2e,
    ];
    const LT_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    const LT_NONCE: &[u8] = b"f//499k954d6OL34oL9FSTvy64sA";
    const PRIORITY: u16 = 0x0024;
    const ICE_CONTROLLED: u16 = 0x8029;

    fn mapped_v4() -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 32853)
    }

    fn mapped_v6() -> SocketAddr {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0x1234, 0x5678, 0x11, 0x2233, 0x4455, 0x6677);
        SocketAddr::new(ip.into(), 32853)
    }

    #[test]
    fn crc32_check_value() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
        assert_eq!(crc32(&[]), 0);
    }

    #[test]
    fn message_type_bits() {
        let t = |c, m| message_type(c, m);
        assert_eq!(t(Class::Request, BINDING), 0x0001);
        assert_eq!(t(Class::Indication, BINDING), 0x0011);
        assert_eq!(t(Class::Success, BINDING), 0x0101);
        assert_eq!(t(Class::Error, BINDING), 0x0111);
        assert_eq!(t(Class::Request, ALLOCATE), 0x0003);
        assert_eq!(t(Class::Success, ALLOCATE), 0x0103);
        assert_eq!(t(Class::Error, ALLOCATE), 0x0113);
        assert_eq!(t(Class::Request, REFRESH), 0x0004);
        assert_eq!(t(Class::Indication, SEND), 0x0016);
        assert_eq!(t(Class::Indication, super::DATA), 0x0017);
        assert_eq!(t(Class::Request, CREATE_PERMISSION), 0x0008);
        assert_eq!(t(Class::Success, CHANNEL_BIND), 0x0109);
        assert_eq!(t(Class::Error, 0x0fff), 0x3fff);
        for class in [
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ] {
            for method in [0, 1, 0x0f, 0x10, 0x70, 0x80, 0xf80, 0xabc, 0xfff] {
                let mut buf = [0u8; 20];
                let n = Writer::new(&mut buf, class, method, &TXID)
                    .unwrap()
                    .finish();
                let m = Message::parse(&buf[..n]).unwrap();
                assert_eq!((m.class(), m.method()), (class, method));
            }
        }
    }

    #[test]
    fn rfc5769_sample_request() {
        let b = hex(SAMPLE_REQUEST);
        assert!(looks_like_stun(&b));
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.method(), BINDING);
        assert_eq!(m.transaction_id(), &TXID);
        assert_eq!(m.len(), 108);
        assert_eq!(m.as_bytes(), &b[..]);
        let attrs: Vec<(u16, &[u8])> = m.attributes().collect();
        assert_eq!(attrs.len(), 6);
        assert_eq!(attrs[0], (SOFTWARE, &b"STUN test client"[..]));
        assert_eq!(attrs[1], (PRIORITY, &[0x6e, 0x00, 0x01, 0xff][..]));
        assert_eq!(
            attrs[2],
            (
                ICE_CONTROLLED,
                &[0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36][..]
            )
        );
        assert_eq!(attrs[3], (USERNAME, &b"evtj:h6vY"[..]));
        assert_eq!((attrs[4].0, attrs[4].1.len()), (MESSAGE_INTEGRITY, 20));
        assert_eq!(attrs[5], (FINGERPRINT, &[0xe5, 0x7a, 0x3b, 0xcf][..]));
        assert_eq!(m.username(), Some(&b"evtj:h6vY"[..]));
        assert_eq!(m.attr(SOFTWARE), Some(&b"STUN test client"[..]));
        assert_eq!(m.check_integrity(PASSWORD), Ok(()));
        assert_eq!(m.check_fingerprint(), Ok(()));
        assert_eq!(
            m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"),
            Err(StunError::IntegrityMismatch)
        );
        assert_eq!(m.xor_address(XOR_MAPPED_ADDRESS), Ok(None));
        assert_eq!(m.mapped_address(), Ok(None));
        assert_eq!(m.error_code(), None);
    }

    fn check_response(vector: &str, addr: SocketAddr) {
        let b = hex(vector);
        assert!(looks_like_stun(&b));
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.class(), Class::Success);
        assert_eq!(m.method(), BINDING);
        assert_eq!(m.transaction_id(), &TXID);
        assert_eq!(m.attr(SOFTWARE), Some(&b"test vector"[..]));
        assert_eq!(m.xor_address(XOR_MAPPED_ADDRESS), Ok(Some(addr)));
        assert_eq!(m.check_integrity(PASSWORD), Ok(()));
        assert_eq!(m.check_fingerprint(), Ok(()));
    }

    #[test]
    fn rfc5769_ipv4_response() {
        check_response(SAMPLE_IPV4_RESPONSE, mapped_v4());
    }

    #[test]
    fn rfc5769_ipv6_response() {
        check_response(SAMPLE_IPV6_RESPONSE, mapped_v6());
    }

    #[test]
    fn rfc5769_long_term_request() {
        let b = hex(SAMPLE_LONG_TERM_REQUEST);
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.transaction_id(), &LT_TXID);
        assert_eq!(m.username(), Some(LT_USERNAME.as_bytes()));
        assert_eq!(m.attr(NONCE), Some(LT_NONCE));
        assert_eq!(m.attr(REALM), Some(&b"example.org"[..]));
        let key = long_term_key(LT_USERNAME, "example.org", "TheMatrIX");
        assert_eq!(m.check_integrity(&key), Ok(()));
        assert_eq!(m.check_fingerprint(), Ok(()), "absent FINGERPRINT is fine");
        // The short-term use of the password is not the long-term key.
        assert_eq!(
            m.check_integrity(b"TheMatrIX"),
            Err(StunError::IntegrityMismatch)
        );
        let wrong = long_term_key(LT_USERNAME, "example.org", "TheMatrix");
        assert_eq!(m.check_integrity(&wrong), Err(StunError::IntegrityMismatch));
    }

    #[test]
    fn writer_reproduces_long_term_request() {
        let mut buf = [0u8; 200];
        let key = long_term_key(LT_USERNAME, "example.org", "TheMatrIX");
        let mut w = Writer::new(&mut buf, Class::Request, BINDING, &LT_TXID).unwrap();
        w.attr(USERNAME, LT_USERNAME.as_bytes())
            .unwrap()
            .attr(NONCE, LT_NONCE)
            .unwrap()
            .attr(REALM, b"example.org")
            .unwrap()
            .message_integrity(&key)
            .unwrap();
        let n = w.finish();
        assert_eq!(&buf[..n], &hex(SAMPLE_LONG_TERM_REQUEST)[..]);
    }

    /// RFC 5769 pads with spaces where the Writer pads with zeros (RFC 8489 §14: "The padding
    /// bits MUST be set to zero on sending"), so these tests overwrite the padding with
    /// spaces before MESSAGE-INTEGRITY, to show the HMAC and CRC are computed the same way.
    fn space_padding(w: &mut Writer<'_>, n: usize) {
        let end = w.len;
        w.buf[end - n..end].fill(b' ');
    }

    #[test]
    fn writer_reproduces_sample_request() {
        let mut buf = [0u8; 200];
        let mut w = Writer::new(&mut buf, Class::Request, BINDING, &TXID).unwrap();
        w.attr(SOFTWARE, b"STUN test client").unwrap();
        w.attr(PRIORITY, &[0x6e, 0x00, 0x01, 0xff]).unwrap();
        w.attr(
            ICE_CONTROLLED,
            &[0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36],
        )
        .unwrap();
        w.attr(USERNAME, b"evtj:h6vY").unwrap();
        space_padding(&mut w, 3);
        w.message_integrity(PASSWORD)
            .unwrap()
            .fingerprint()
            .unwrap();
        let n = w.finish();
        assert_eq!(&buf[..n], &hex(SAMPLE_REQUEST)[..]);
    }

    fn write_response(buf: &mut [u8], addr: SocketAddr, spaces: bool) -> usize {
        let mut w = Writer::new(buf, Class::Success, BINDING, &TXID).unwrap();
        w.attr(SOFTWARE, b"test vector").unwrap();
        if spaces {
            space_padding(&mut w, 1);
        }
        w.xor_address(XOR_MAPPED_ADDRESS, addr)
            .unwrap()
            .message_integrity(PASSWORD)
            .unwrap()
            .fingerprint()
            .unwrap();
        w.finish()
    }

    #[test]
    fn writer_reproduces_responses() {
        for (vector, addr) in [
            (SAMPLE_IPV4_RESPONSE, mapped_v4()),
            (SAMPLE_IPV6_RESPONSE, mapped_v6()),
        ] {
            let want = hex(vector);
            let mut buf = [0u8; 200];
            let n = write_response(&mut buf, addr, true);
            assert_eq!(&buf[..n], &want[..]);
            // With the zero padding a Writer sends: same bytes up to the padding octet, and a
            // message that verifies.
            let n = write_response(&mut buf, addr, false);
            assert_eq!(n, want.len());
            assert_eq!(buf[..35], want[..35]);
            assert_eq!(buf[35], 0);
            assert_eq!(buf[36..n - 32], want[36..n - 32]);
            let m = Message::parse(&buf[..n]).unwrap();
            assert_eq!(m.check_integrity(PASSWORD), Ok(()));
            assert_eq!(m.check_fingerprint(), Ok(()));
            assert_eq!(m.xor_address(XOR_MAPPED_ADDRESS), Ok(Some(addr)));
        }
    }

    #[test]
    fn tampering_any_byte_is_detected() {
        let b = hex(SAMPLE_REQUEST);
        let mi_end = b.len() - 8;
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x01;
            let verdict = Message::parse(&t).and_then(|m| {
                m.check_integrity(PASSWORD)?;
                m.check_fingerprint()
            });
            if i < mi_end {
                assert!(verdict.is_err(), "byte {i}: {verdict:?}");
            } else if i >= b.len() - 4 {
                assert_eq!(verdict, Err(StunError::BadFingerprint), "byte {i}");
            }
        }
        // The HMAC covers the padding octets too.
        let mut t = b.clone();
        t[75] = 0;
        let m = Message::parse(&t).unwrap();
        assert_eq!(m.username(), Some(&b"evtj:h6vY"[..]));
        assert_eq!(
            m.check_integrity(PASSWORD),
            Err(StunError::IntegrityMismatch)
        );
    }

    #[test]
    fn looks_like_stun_rejects_others() {
        let b = hex(SAMPLE_IPV4_RESPONSE);
        assert!(looks_like_stun(&b[..20]), "header only is enough");
        assert!(!looks_like_stun(&b[..19]));
        assert!(!looks_like_stun(&[]));
        // RTP (first byte 0x80), RTCP, DTLS (20..=63).
        let mut rtp = [0u8; 172];
        rtp[0] = 0x80;
        rtp[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(!looks_like_stun(&rtp));
        let mut dtls = b.clone();
        dtls[0] = 22;
        assert!(!looks_like_stun(&dtls));
        let mut cookie = b.clone();
        cookie[7] ^= 1;
        assert!(!looks_like_stun(&cookie));
        let mut len = b.clone();
        len[3] = 0x3d;
        assert!(!looks_like_stun(&len));
    }

    #[test]
    fn parse_errors() {
        let b = hex(SAMPLE_REQUEST);
        assert_eq!(Message::parse(&b[..19]).err(), Some(StunError::Truncated));
        assert_eq!(Message::parse(&b[..107]).err(), Some(StunError::Truncated));
        let mut top = b.clone();
        top[0] = 0x40;
        assert_eq!(Message::parse(&top).err(), Some(StunError::NotStun));
        let mut cookie = b.clone();
        cookie[4] = 0;
        assert_eq!(Message::parse(&cookie).err(), Some(StunError::NotStun));
        let mut len = b.clone();
        len[3] = 0x56;
        assert_eq!(Message::parse(&len).err(), Some(StunError::BadLength));
        // SOFTWARE claims 255 bytes, past the end of the message.
        let mut attr_len = b.clone();
        attr_len[23] = 0xff;
        assert_eq!(
            Message::parse(&attr_len).err(),
            Some(StunError::BadAttribute)
        );
        // A 4-byte message body holding a TLV header claiming 1 byte of value.
        let mut short = hex("00 01 00 04 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 00");
        short.extend_from_slice(&[0x80, 0x22, 0x00, 0x01]);
        assert_eq!(Message::parse(&short).err(), Some(StunError::BadAttribute));
        // 64 empty attributes are fine, 65 are not.
        for (n, ok) in [(64usize, true), (65, false)] {
            let mut m = hex("00 01 00 00 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 00");
            m[2..4].copy_from_slice(&u16::try_from(4 * n).unwrap().to_be_bytes());
            for _ in 0..n {
                m.extend_from_slice(&[0x80, 0x22, 0, 0]);
            }
            let r = Message::parse(&m);
            assert_eq!(r.is_ok(), ok, "{n}");
            if !ok {
                assert_eq!(r.err(), Some(StunError::TooManyAttributes));
            }
        }
    }

    #[test]
    fn bytes_after_the_message_are_ignored() {
        let mut b = hex(SAMPLE_IPV4_RESPONSE);
        let len = b.len();
        b.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.len(), len);
        assert_eq!(m.as_bytes(), &b[..len]);
        assert_eq!(m.check_integrity(PASSWORD), Ok(()));
        assert_eq!(m.check_fingerprint(), Ok(()));
    }

    #[test]
    fn attributes_after_integrity_and_fingerprint_are_ignored() {
        // USERNAME, MESSAGE-INTEGRITY, SOFTWARE (ignored), MI-SHA256, XOR-MAPPED-ADDRESS
        // (ignored), FINGERPRINT, SOFTWARE (ignored: after FINGERPRINT).
        let mut b = hex("00 01 00 00 21 12 a4 42 00 00 00 00 00 00 00 00 00 00 00 00");
        b.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, b'u', b's', b'e', b'r']);
        b.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
        b.extend_from_slice(&[0x11; 20]);
        b.extend_from_slice(&[0x80, 0x22, 0x00, 0x01, b'x', 0, 0, 0]);
        b.extend_from_slice(&[0x00, 0x1c, 0x00, 0x20]);
        b.extend_from_slice(&[0x22; 32]);
        b.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x80, 0x28, 0x00, 0x04, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x80, 0x22, 0x00, 0x01, b'y', 0, 0, 0]);
        let body = u16::try_from(b.len() - 20).unwrap();
        b[2..4].copy_from_slice(&body.to_be_bytes());
        let m = Message::parse(&b).unwrap();
        let types: Vec<u16> = m.attributes().map(|(t, _)| t).collect();
        assert_eq!(
            types,
            [
                USERNAME,
                MESSAGE_INTEGRITY,
                MESSAGE_INTEGRITY_SHA256,
                FINGERPRINT
            ]
        );
        assert_eq!(m.attr(SOFTWARE), None);
        assert_eq!(m.xor_address(XOR_MAPPED_ADDRESS), Ok(None));
        assert_eq!(m.check_integrity(b"k"), Err(StunError::IntegrityMismatch));
        assert_eq!(m.check_fingerprint(), Err(StunError::BadFingerprint));
    }

    #[test]
    fn missing_integrity() {
        let b = hex(SAMPLE_REQUEST);
        // The first 60 bytes minus MI and FP: SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME.
        let mut t = b[..76].to_vec();
        t[2..4].copy_from_slice(&56u16.to_be_bytes());
        let m = Message::parse(&t).unwrap();
        assert_eq!(
            m.check_integrity(PASSWORD),
            Err(StunError::MissingIntegrity)
        );
        assert_eq!(m.check_fingerprint(), Ok(()));
    }

    #[test]
    fn addresses_and_error_codes() {
        let mut buf = [0u8; 300];
        let peer: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let relayed: SocketAddr = "203.0.113.9:49152".parse().unwrap();
        let mut w = Writer::new(&mut buf, Class::Error, ALLOCATE, &TXID).unwrap();
        w.error_code(401, "Unauthorized")
            .unwrap()
            .xor_address(XOR_PEER_ADDRESS, peer)
            .unwrap()
            .xor_address(XOR_RELAYED_ADDRESS, relayed)
            .unwrap()
            .attr(MAPPED_ADDRESS, &[0, 1, 0x0d, 0x96, 198, 51, 100, 7])
            .unwrap()
            .attr(LIFETIME, &600u32.to_be_bytes())
            .unwrap()
            .fingerprint()
            .unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.class(), Class::Error);
        assert_eq!(m.method(), ALLOCATE);
        assert_eq!(m.error_code(), Some((401, &b"Unauthorized"[..])));
        assert_eq!(m.xor_address(XOR_PEER_ADDRESS), Ok(Some(peer)));
        assert_eq!(m.xor_address(XOR_RELAYED_ADDRESS), Ok(Some(relayed)));
        assert_eq!(
            m.mapped_address(),
            Ok(Some("198.51.100.7:3478".parse().unwrap()))
        );
        assert_eq!(m.attr(LIFETIME), Some(&600u32.to_be_bytes()[..]));
        assert_eq!(m.check_fingerprint(), Ok(()));
        assert_eq!(m.check_integrity(b"x"), Err(StunError::MissingIntegrity));
        // Reference bytes of ERROR-CODE 401 "Unauthorized": class 4, number 1.
        assert_eq!(
            buf[20..40],
            [
                0x00, 0x09, 0x00, 0x10, 0x00, 0x00, 0x04, 0x01, b'U', b'n', b'a', b'u', b't', b'h',
                b'o', b'r', b'i', b'z', b'e', b'd'
            ]
        );
    }

    #[test]
    fn malformed_addresses() {
        let build = |t: u16, v: &[u8]| {
            let mut buf = vec![0u8; 64];
            let mut w = Writer::new(&mut buf, Class::Success, BINDING, &TXID).unwrap();
            w.attr(t, v).unwrap();
            let n = w.finish();
            buf.truncate(n);
            buf
        };
        let b = build(XOR_MAPPED_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(
            m.xor_address(XOR_MAPPED_ADDRESS),
            Err(StunError::BadAddressFamily)
        );
        let b = build(XOR_MAPPED_ADDRESS, &[0, 2, 0, 0, 1, 2, 3, 4]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(
            m.xor_address(XOR_MAPPED_ADDRESS),
            Err(StunError::BadAttribute)
        );
        let b = build(MAPPED_ADDRESS, &[0, 1, 0]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.mapped_address(), Err(StunError::BadAttribute));
        let b = build(ERROR_CODE, &[0, 0, 4, 100]);
        assert_eq!(Message::parse(&b).unwrap().error_code(), None);
        let b = build(ERROR_CODE, &[0, 0, 4]);
        assert_eq!(Message::parse(&b).unwrap().error_code(), None);
    }

    #[test]
    fn writer_errors() {
        assert!(matches!(
            Writer::new(&mut [0u8; 19], Class::Request, BINDING, &TXID),
            Err(StunError::BufferTooSmall)
        ));
        assert!(matches!(
            Writer::new(&mut [0u8; 20], Class::Request, 0x1000, &TXID),
            Err(StunError::BadMethod)
        ));
        let mut buf = [0u8; 32];
        let mut w = Writer::new(&mut buf, Class::Request, BINDING, &TXID).unwrap();
        assert_eq!(
            w.attr(USERNAME, &[1; 9]).err(),
            Some(StunError::BufferTooSmall)
        );
        assert_eq!(w.len(), 20, "a failed attribute writes nothing");
        assert_eq!(
            w.message_integrity(b"k").err(),
            Some(StunError::BufferTooSmall)
        );
        assert_eq!(w.error_code(200, "OK").err(), Some(StunError::BadErrorCode));
        assert_eq!(w.error_code(700, "").err(), Some(StunError::BadErrorCode));
        w.attr(USERNAME, &[1; 8]).unwrap();
        assert_eq!(w.fingerprint().err(), Some(StunError::BufferTooSmall));
        assert_eq!(w.as_bytes().len(), 32);
        assert_eq!(Message::parse(w.as_bytes()).unwrap().len(), 32);

        let mut big = vec![0u8; 70_000];
        let mut w = Writer::new(&mut big, Class::Request, BINDING, &TXID).unwrap();
        assert_eq!(
            w.attr(attr::DATA, &vec![0; 65_536]).err(),
            Some(StunError::MessageTooLong)
        );
        assert_eq!(
            w.attr(attr::DATA, &vec![0; 65_529]).err(),
            Some(StunError::MessageTooLong),
            "4 + 65532 > 65535"
        );
        w.attr(attr::DATA, &vec![0; 65_527]).unwrap();
        assert_eq!(w.len(), 20 + 4 + 65_528);
        assert_eq!(w.fingerprint().err(), Some(StunError::MessageTooLong));

        let mut buf = [0u8; 200];
        let mut w = Writer::new(&mut buf, Class::Request, BINDING, &TXID).unwrap();
        w.message_integrity(b"k").unwrap();
        assert_eq!(
            w.attr(SOFTWARE, b"x").err(),
            Some(StunError::AttributeOrder)
        );
        assert_eq!(
            w.message_integrity(b"k").err(),
            Some(StunError::AttributeOrder)
        );
        w.attr(MESSAGE_INTEGRITY_SHA256, &[0; 32]).unwrap();
        w.fingerprint().unwrap();
        assert_eq!(w.fingerprint().err(), Some(StunError::AttributeOrder));
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.check_integrity(b"k"), Ok(()));
        assert_eq!(m.check_fingerprint(), Ok(()));
    }

    /// A header with the magic cookie and a length field of `body.len()` rounded down to 4.
    fn with_header(first: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len() & !3).unwrap();
        let mut b = vec![first & 0x3f, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        b[2..4].copy_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&TXID);
        b.extend_from_slice(body);
        b
    }

    /// Calls every accessor; none may panic.
    fn exercise(m: &Message<'_>) {
        let n = m.attributes().count();
        assert!(n <= MAX_ATTRIBUTES);
        for t in [XOR_MAPPED_ADDRESS, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS] {
            let _ = m.xor_address(t);
        }
        let _ = (m.mapped_address(), m.error_code(), m.username());
        let _ = (m.check_integrity(b"key"), m.check_fingerprint());
        let _ = (m.class(), m.method(), m.transaction_id(), m.len());
    }

    fn attr_strategy() -> impl Strategy<Value = (u16, Vec<u8>)> {
        (
            any::<u16>().prop_filter("not an integrity or fingerprint type", |t| {
                ![MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256, FINGERPRINT].contains(t)
            }),
            prop::collection::vec(any::<u8>(), 0..40),
        )
    }

    fn addr_strategy() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Message::parse(&b) {
                exercise(&m);
            }
            let _ = looks_like_stun(&b);
        }

        #[test]
        fn parse_never_panics_after_valid_header(
            first in 0u8..4,
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let b = with_header(first, &body);
            prop_assert!(looks_like_stun(&b));
            if let Ok(m) = Message::parse(&b) {
                exercise(&m);
            }
        }

        #[test]
        fn parse_never_panics_on_tlv_soup(
            attrs in prop::collection::vec(
                (
                    prop_oneof![
                        Just(MESSAGE_INTEGRITY), Just(FINGERPRINT), Just(XOR_MAPPED_ADDRESS),
                        Just(MAPPED_ADDRESS), Just(ERROR_CODE), any::<u16>(),
                    ],
                    0u16..48,
                    prop::collection::vec(any::<u8>(), 0..48),
                ),
                0..12,
            ),
        ) {
            // TLVs whose length fields need not match their values.
            let mut body = Vec::new();
            for (t, l, v) in &attrs {
                body.extend_from_slice(&t.to_be_bytes());
                body.extend_from_slice(&l.to_be_bytes());
                body.extend_from_slice(v);
            }
            let b = with_header(0, &body);
            if let Ok(m) = Message::parse(&b) {
                exercise(&m);
            }
        }

        #[test]
        fn writer_parse_round_trip(
            class in prop_oneof![
                Just(Class::Request), Just(Class::Indication),
                Just(Class::Success), Just(Class::Error),
            ],
            method in 0u16..0x1000,
            txid in any::<[u8; 12]>(),
            attrs in prop::collection::vec(attr_strategy(), 0..10),
            addr in addr_strategy(),
            key in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
            fingerprint in any::<bool>(),
        ) {
            let mut buf = [0u8; 1024];
            let mut w = Writer::new(&mut buf, class, method, &txid).unwrap();
            for (t, v) in &attrs {
                w.attr(*t, v).unwrap();
            }
            w.xor_address(XOR_PEER_ADDRESS, addr).unwrap();
            if let Some(k) = &key {
                w.message_integrity(k).unwrap();
            }
            if fingerprint {
                w.fingerprint().unwrap();
            }
            let n = w.finish();
            let m = Message::parse(&buf[..n]).unwrap();
            // RFC 7983's first-byte rule covers methods below 0x100 (all assigned ones).
            prop_assert_eq!(looks_like_stun(&buf[..n]), method < 0x100);
            prop_assert_eq!(m.len(), n);
            prop_assert_eq!((m.class(), m.method()), (class, method));
            prop_assert_eq!(m.transaction_id(), &txid);
            let got: Vec<(u16, Vec<u8>)> = m
                .attributes()
                .take(attrs.len())
                .map(|(t, v)| (t, v.to_vec()))
                .collect();
            prop_assert_eq!(&got, &attrs);
            // The first XOR-PEER-ADDRESS may be one of the arbitrary attributes.
            if !attrs.iter().any(|(t, _)| *t == XOR_PEER_ADDRESS) {
                prop_assert_eq!(m.xor_address(XOR_PEER_ADDRESS), Ok(Some(addr)));
            }
            match &key {
                Some(k) => {
                    prop_assert_eq!(m.check_integrity(k), Ok(()));
                    // Not `k || 0`: HMAC pads short keys with zeros, so that is the same key.
                    let mut other = k.clone();
                    other.push(1);
                    prop_assert_eq!(m.check_integrity(&other), Err(StunError::IntegrityMismatch));
                }
                None => prop_assert_eq!(m.check_integrity(b"k"), Err(StunError::MissingIntegrity)),
            }
            prop_assert_eq!(m.check_fingerprint(), Ok(()));
            prop_assert_eq!(m.attr(FINGERPRINT).is_some(), fingerprint);
        }
    }
}
