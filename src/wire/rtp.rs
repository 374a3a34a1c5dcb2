//! RTP header view (RFC 3550 §5.1) and RTP/RTCP demultiplexing (RFC 5761 §4).
//!
//! This module owns the RTP header format: [`RtpPacket`] is a checked view over received
//! bytes (after [`RtpPacket::new_checked`] no accessor can panic, and nothing allocates),
//! [`RtpRepr`] is an owned description used to emit headers, [`write_fixed_header`] is the
//! senders' fast path. It does not interpret payloads, track sequence numbers (that is
//! `metrics::rtpstats`) or do IO.
//!
//! RFC 3550 §5.1:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |V=2|P|X|  CC   |M|     PT      |       sequence number         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           timestamp                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           synchronization source (SSRC) identifier            |
//! +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
//! |            contributing source (CSRC) identifiers             |
//! |                             ....                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use zerocopy::byteorder::network_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the fixed RTP header (without CSRCs or extension).
pub const HEADER_LEN: usize = 12;

/// The only RTP version (RFC 3550 §5.1: "The version defined by this specification is two").
pub const VERSION: u8 = 2;

/// At most 15 CSRCs: the CC field has 4 bits.
pub const MAX_CSRCS: usize = 15;

/// Errors of the RTP layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum RtpError {
    #[error("RTP packet shorter than the 12-byte fixed header")]
    Truncated,
    #[error("RTP version is not 2")]
    BadVersion,
    #[error("RTP CSRC list runs past the end of the packet")]
    CsrcTruncated,
    #[error("RTP header extension runs past the end of the packet")]
    ExtensionTruncated,
    #[error("RTP padding bit set but the padding count is 0")]
    ZeroPadding,
    #[error("RTP padding count is longer than the space after the header")]
    PaddingTooLong,
    #[error("buffer too small for the RTP header")]
    BufferTooSmall,
    #[error("more than 15 CSRCs")]
    TooManyCsrcs,
    #[error("RTP payload type above 127")]
    BadPayloadType,
    #[error("RTP header extension data is not a whole number of 32-bit words (at most 65535)")]
    BadExtensionLength,
}

/// The fixed 12-byte header, as it lies on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
pub struct FixedHeader {
    /// V (2 bits), P, X, CC (4 bits).
    pub vpxcc: u8,
    /// M, PT (7 bits).
    pub mpt: u8,
    pub seq: U16,
    pub ts: U32,
    pub ssrc: U32,
}

/// Returned by the accessors of a view whose buffer is shorter than a fixed header, which
/// [`RtpPacket::new_checked`] rules out; it keeps the accessors free of panics.
static EMPTY_HEADER: FixedHeader = FixedHeader {
    vpxcc: 0,
    mpt: 0,
    seq: U16::ZERO,
    ts: U32::ZERO,
    ssrc: U32::ZERO,
};

const P_BIT: u8 = 0x20;
const X_BIT: u8 = 0x10;
const CC_MASK: u8 = 0x0f;
const M_BIT: u8 = 0x80;
const PT_MASK: u8 = 0x7f;

/// Offsets derived from a header: where the payload starts and how much padding ends it.
struct Layout {
    header_len: usize,
    padding_len: usize,
}

/// Validates `b` as an RTP packet and returns its layout. Never panics.
fn layout(b: &[u8]) -> Result<Layout, RtpError> {
    let (h, _) = FixedHeader::ref_from_prefix(b).map_err(|_| RtpError::Truncated)?;
    if h.vpxcc >> 6 != VERSION {
        return Err(RtpError::BadVersion);
    }
    let mut header_len = HEADER_LEN + 4 * usize::from(h.vpxcc & CC_MASK);
    if header_len > b.len() {
        return Err(RtpError::CsrcTruncated);
    }
    if h.vpxcc & X_BIT != 0 {
        // RFC 3550 §5.3.1: "a 16-bit length field that counts the number of 32-bit words in
        // the extension, excluding the four-octet extension header (therefore zero is a
        // valid length)".
        let words = match b.get(header_len + 2..header_len + 4) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return Err(RtpError::ExtensionTruncated),
        };
        header_len += 4 + 4 * words;
        if header_len > b.len() {
            return Err(RtpError::ExtensionTruncated);
        }
    }
    let padding_len = if h.vpxcc & P_BIT != 0 {
        // RFC 3550 §5.1: "The last octet of the padding contains a count of how many
        // padding octets should be ignored, including itself."
        let count = usize::from(b.last().copied().unwrap_or(0));
        if count == 0 {
            return Err(RtpError::ZeroPadding);
        }
        if header_len + count > b.len() {
            return Err(RtpError::PaddingTooLong);
        }
        count
    } else {
        0
    };
    Ok(Layout {
        header_len,
        padding_len,
    })
}

/// A checked view of an RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RtpPacket<T> {
    /// Checks: length >= 12, version 2, the CSRC list fits, the extension header and its
    /// `4 * length` bytes fit, and with the P bit the last byte is a count > 0 that fits
    /// after the header. After this no accessor panics.
    pub fn new_checked(buffer: T) -> Result<Self, RtpError> {
        layout(buffer.as_ref())?;
        Ok(RtpPacket { buffer })
    }

    /// The fixed header as a zerocopy view.
    pub fn fixed_header(&self) -> &FixedHeader {
        FixedHeader::ref_from_prefix(self.buffer.as_ref()).map_or(&EMPTY_HEADER, |(h, _)| h)
    }

    fn layout(&self) -> Layout {
        layout(self.buffer.as_ref()).unwrap_or(Layout {
            header_len: HEADER_LEN,
            padding_len: 0,
        })
    }

    pub fn version(&self) -> u8 {
        self.fixed_header().vpxcc >> 6
    }

    pub fn padding(&self) -> bool {
        self.fixed_header().vpxcc & P_BIT != 0
    }

    pub fn has_extension(&self) -> bool {
        self.fixed_header().vpxcc & X_BIT != 0
    }

    pub fn csrc_count(&self) -> u8 {
        self.fixed_header().vpxcc & CC_MASK
    }

    pub fn marker(&self) -> bool {
        self.fixed_header().mpt & M_BIT != 0
    }

    pub fn payload_type(&self) -> u8 {
        self.fixed_header().mpt & PT_MASK
    }

    pub fn sequence(&self) -> u16 {
        self.fixed_header().seq.get()
    }

    pub fn timestamp(&self) -> u32 {
        self.fixed_header().ts.get()
    }

    pub fn ssrc(&self) -> u32 {
        self.fixed_header().ssrc.get()
    }

    /// The CSRC identifiers, in order.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + '_ {
        let end = HEADER_LEN + 4 * usize::from(self.csrc_count());
        let bytes = self.buffer.as_ref().get(HEADER_LEN..end).unwrap_or(&[]);
        <[U32]>::ref_from_bytes(bytes)
            .map_or(&[][..], |s| s)
            .iter()
            .map(|v| v.get())
    }

    /// The header extension: (16 bits defined by profile, extension data), if X is set.
    pub fn extension(&self) -> Option<(u16, &[u8])> {
        if !self.has_extension() {
            return None;
        }
        let b = self.buffer.as_ref();
        let at = HEADER_LEN + 4 * usize::from(self.csrc_count());
        let (profile, words) = match b.get(at..at + 4) {
            Some(&[p0, p1, l0, l1]) => (
                u16::from_be_bytes([p0, p1]),
                usize::from(u16::from_be_bytes([l0, l1])),
            ),
            _ => return None,
        };
        let data = b.get(at + 4..at + 4 + 4 * words)?;
        Some((profile, data))
    }

    /// Fixed header + CSRCs + extension.
    pub fn header_len(&self) -> usize {
        self.layout().header_len
    }

    /// Padding bytes at the end (including the count byte); 0 without the P bit.
    pub fn padding_len(&self) -> usize {
        self.layout().padding_len
    }

    /// The payload, without padding.
    pub fn payload(&self) -> &[u8] {
        let l = self.layout();
        let b = self.buffer.as_ref();
        let end = b.len().saturating_sub(l.padding_len);
        b.get(l.header_len..end).unwrap_or(&[])
    }

    /// The whole packet.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// RFC 5761 §4: with version 2, a packet is RTCP when its second byte is in 192..=223, i.e.
/// RTCP packet types 192..=223 (SR 200, RR 201, SDES, BYE, APP, RTPFB, PSFB, XR ...), which
/// an RTP packet would show only with payload type 64..=95 and the marker bit; RFC 5761
/// §4 tells RTP senders to avoid those payload types when multiplexing.
pub fn is_rtcp(b: &[u8]) -> bool {
    match b {
        [first, second, ..] => first >> 6 == VERSION && (192..=223).contains(second),
        _ => false,
    }
}

/// Owned description of an RTP header, used to emit packets (clients, tests, load generator).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RtpRepr {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub csrcs: Vec<u32>,
    /// (16 bits defined by profile, data); the data must be a whole number of 32-bit words.
    pub extension: Option<(u16, Vec<u8>)>,
}

impl RtpRepr {
    /// Describes the header of a checked packet (padding is not part of the header).
    pub fn parse<T: AsRef<[u8]>>(p: &RtpPacket<T>) -> Self {
        RtpRepr {
            marker: p.marker(),
            payload_type: p.payload_type(),
            sequence: p.sequence(),
            timestamp: p.timestamp(),
            ssrc: p.ssrc(),
            csrcs: p.csrcs().collect(),
            extension: p
                .extension()
                .map(|(profile, data)| (profile, data.to_vec())),
        }
    }

    /// Header length this description emits (extension data rounded up to whole words).
    pub fn header_len(&self) -> usize {
        let ext = self
            .extension
            .as_ref()
            .map_or(0, |(_, data)| 4 + data.len().div_ceil(4) * 4);
        HEADER_LEN + 4 * self.csrcs.len() + ext
    }

    /// Writes the header (no padding, P bit clear) into `buf`; returns the header length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, RtpError> {
        let cc = u8::try_from(self.csrcs.len())
            .ok()
            .filter(|&n| usize::from(n) <= MAX_CSRCS)
            .ok_or(RtpError::TooManyCsrcs)?;
        let ext_words = match &self.extension {
            None => None,
            Some((profile, data)) => {
                if data.len() % 4 != 0 {
                    return Err(RtpError::BadExtensionLength);
                }
                let words =
                    u16::try_from(data.len() / 4).map_err(|_| RtpError::BadExtensionLength)?;
                Some((*profile, words, data))
            }
        };
        let len = self.header_len();
        let out = buf.get_mut(..len).ok_or(RtpError::BufferTooSmall)?;
        let x = if ext_words.is_some() { X_BIT } else { 0 };
        let head = fixed_header(
            (VERSION << 6) | x | cc,
            self.marker,
            self.payload_type,
            self.sequence,
            self.timestamp,
            self.ssrc,
        )?;
        let (fixed, rest) = out
            .split_first_chunk_mut::<HEADER_LEN>()
            .ok_or(RtpError::BufferTooSmall)?;
        *fixed = head;
        // `rest` holds exactly the CSRC words, then the extension header and data words.
        let mut words = rest.chunks_exact_mut(4);
        // `zip` pulls from its first iterator first: the CSRC list must lead so that no word
        // is taken (and skipped) once the list is exhausted.
        for (csrc, word) in self.csrcs.iter().zip(words.by_ref()) {
            word.copy_from_slice(&csrc.to_be_bytes());
        }
        if let Some((profile, count, data)) = ext_words {
            if let Some(word) = words.next() {
                let [p0, p1] = profile.to_be_bytes();
                let [c0, c1] = count.to_be_bytes();
                word.copy_from_slice(&[p0, p1, c0, c1]);
            }
            for (d, word) in data.chunks_exact(4).zip(words) {
                word.copy_from_slice(d);
            }
        }
        Ok(len)
    }
}

/// The 12 bytes of a fixed header with the given first byte.
fn fixed_header(
    vpxcc: u8,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
) -> Result<[u8; HEADER_LEN], RtpError> {
    if payload_type > PT_MASK {
        return Err(RtpError::BadPayloadType);
    }
    let h = FixedHeader {
        vpxcc,
        mpt: if marker { M_BIT } else { 0 } | payload_type,
        seq: U16::new(sequence),
        ts: U32::new(timestamp),
        ssrc: U32::new(ssrc),
    };
    let mut out = [0; HEADER_LEN];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

/// Fast path for senders: writes a plain 12-byte header (version 2, no padding, no CSRC, no
/// extension) at the start of `buf`.
pub fn write_fixed_header(
    buf: &mut [u8],
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
) -> Result<(), RtpError> {
    let out = buf
        .first_chunk_mut::<HEADER_LEN>()
        .ok_or(RtpError::BufferTooSmall)?;
    *out = fixed_header(
        VERSION << 6,
        marker,
        payload_type,
        sequence,
        timestamp,
        ssrc,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// V=2 P=1 X=1 CC=2, M=1 PT=96, seq 0x1234, ts 0xdeadbeef, SSRC 0x01020304,
    /// CSRCs 0x11111111 and 0x22222222, extension profile 0xbede with one word aabbccdd,
    /// payload 01 02 03, padding 00 00 03.
    const REFERENCE: [u8; 34] = [
        0xb2, 0xe0, 0x12, 0x34, // V P X CC | M PT | sequence
        0xde, 0xad, 0xbe, 0xef, // timestamp
        0x01, 0x02, 0x03, 0x04, // SSRC
        0x11, 0x11, 0x11, 0x11, // CSRC 1
        0x22, 0x22, 0x22, 0x22, // CSRC 2
        0xbe, 0xde, 0x00, 0x01, // extension: profile | length in words
        0xaa, 0xbb, 0xcc, 0xdd, // extension data
        0x01, 0x02, 0x03, // payload
        0x00, 0x00, 0x03, // padding, last octet counts itself
    ];

    #[test]
    fn reference_packet_accessors() {
        let p = RtpPacket::new_checked(&REFERENCE[..]).unwrap();
        assert_eq!(p.version(), 2);
        assert!(p.padding());
        assert!(p.has_extension());
        assert_eq!(p.csrc_count(), 2);
        assert!(p.marker());
        assert_eq!(p.payload_type(), 96);
        assert_eq!(p.sequence(), 0x1234);
        assert_eq!(p.timestamp(), 0xdead_beef);
        assert_eq!(p.ssrc(), 0x0102_0304);
        assert_eq!(p.csrcs().collect::<Vec<_>>(), [0x1111_1111, 0x2222_2222]);
        assert_eq!(p.extension(), Some((0xbede, &[0xaa, 0xbb, 0xcc, 0xdd][..])));
        assert_eq!(p.header_len(), 28);
        assert_eq!(p.padding_len(), 3);
        assert_eq!(p.payload(), [1, 2, 3]);
        assert_eq!(p.as_bytes(), REFERENCE);
        assert_eq!(p.into_inner(), REFERENCE);
    }

    #[test]
    fn reference_repr_emits_the_header() {
        let p = RtpPacket::new_checked(REFERENCE).unwrap();
        let repr = RtpRepr::parse(&p);
        assert_eq!(
            repr,
            RtpRepr {
                marker: true,
                payload_type: 96,
                sequence: 0x1234,
                timestamp: 0xdead_beef,
                ssrc: 0x0102_0304,
                csrcs: vec![0x1111_1111, 0x2222_2222],
                extension: Some((0xbede, vec![0xaa, 0xbb, 0xcc, 0xdd])),
            }
        );
        let mut buf = [0u8; 28];
        assert_eq!(repr.emit(&mut buf), Ok(28));
        // Same bytes except the P bit, which emit leaves clear.
        assert_eq!(buf[0], REFERENCE[0] & !P_BIT);
        assert_eq!(buf[1..], REFERENCE[1..28]);
        assert_eq!(repr.emit(&mut [0u8; 27]), Err(RtpError::BufferTooSmall));
    }

    #[test]
    fn plain_g711_header() {
        // PCMU (PT 0), no marker: 80 00 | seq | ts | ssrc.
        let mut pkt = [0u8; 172];
        write_fixed_header(&mut pkt, false, 0, 7, 160, 0xcafe_f00d).unwrap();
        assert_eq!(
            pkt[..12],
            [
                0x80, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0xa0, 0xca, 0xfe, 0xf0, 0x0d
            ]
        );
        let p = RtpPacket::new_checked(&pkt[..]).unwrap();
        assert_eq!(
            (p.sequence(), p.timestamp(), p.ssrc()),
            (7, 160, 0xcafe_f00d)
        );
        assert_eq!(p.payload().len(), 160);
        assert_eq!(p.csrcs().count(), 0);
        assert_eq!(p.extension(), None);
        assert_eq!(p.padding_len(), 0);
        // Marker + PT 8 (PCMA).
        write_fixed_header(&mut pkt, true, 8, 0, 0, 0).unwrap();
        assert_eq!(pkt[..2], [0x80, 0x88]);
        assert_eq!(
            write_fixed_header(&mut pkt[..11], false, 0, 0, 0, 0),
            Err(RtpError::BufferTooSmall)
        );
        assert_eq!(
            write_fixed_header(&mut pkt, false, 128, 0, 0, 0),
            Err(RtpError::BadPayloadType)
        );
    }

    #[test]
    fn error_cases() {
        let check = |b: &[u8]| RtpPacket::new_checked(b).map(|_| ());
        assert_eq!(check(&REFERENCE[..11]), Err(RtpError::Truncated));
        assert_eq!(check(&[]), Err(RtpError::Truncated));
        let mut v1 = REFERENCE;
        v1[0] = (v1[0] & 0x3f) | 0x40;
        assert_eq!(check(&v1), Err(RtpError::BadVersion));
        let mut v0 = REFERENCE;
        v0[0] &= 0x3f;
        assert_eq!(check(&v0), Err(RtpError::BadVersion));
        // CC = 2 but only one CSRC present.
        assert_eq!(check(&REFERENCE[..16]), Err(RtpError::CsrcTruncated));
        // CC = 15 with 34 bytes: needs 72.
        let mut cc15 = REFERENCE;
        cc15[0] |= 0x0f;
        assert_eq!(check(&cc15), Err(RtpError::CsrcTruncated));
        // Extension header cut.
        let mut no_pad = REFERENCE;
        no_pad[0] &= !P_BIT;
        assert_eq!(check(&no_pad[..22]), Err(RtpError::ExtensionTruncated));
        // Extension length past the end: 0x0100 words.
        let mut long_ext = REFERENCE;
        long_ext[22] = 0x01;
        assert_eq!(check(&long_ext), Err(RtpError::ExtensionTruncated));
        // Extension that exactly fills the packet is fine (P clear, no payload).
        assert_eq!(check(&no_pad[..28]), Ok(()));
        // Padding count 0.
        let mut zero_pad = REFERENCE;
        zero_pad[33] = 0;
        assert_eq!(check(&zero_pad), Err(RtpError::ZeroPadding));
        // Padding count longer than what follows the header (6 bytes).
        let mut long_pad = REFERENCE;
        long_pad[33] = 7;
        assert_eq!(check(&long_pad), Err(RtpError::PaddingTooLong));
        long_pad[33] = 6;
        let p = RtpPacket::new_checked(&long_pad[..]).unwrap();
        assert!(p.payload().is_empty());
        assert_eq!(p.padding_len(), 6);
    }

    #[test]
    fn repr_errors() {
        let too_many = RtpRepr {
            csrcs: vec![0; 16],
            ..RtpRepr::default()
        };
        assert_eq!(too_many.emit(&mut [0; 200]), Err(RtpError::TooManyCsrcs));
        let odd_ext = RtpRepr {
            extension: Some((1, vec![1, 2, 3])),
            ..RtpRepr::default()
        };
        assert_eq!(odd_ext.header_len(), 20);
        assert_eq!(
            odd_ext.emit(&mut [0; 200]),
            Err(RtpError::BadExtensionLength)
        );
        let bad_pt = RtpRepr {
            payload_type: 200,
            ..RtpRepr::default()
        };
        assert_eq!(bad_pt.emit(&mut [0; 12]), Err(RtpError::BadPayloadType));
    }

    #[test]
    fn rtcp_demultiplexing() {
        // RTCP SR (200) and RR (201): V=2, RC=0/1.
        assert!(is_rtcp(&[0x80, 200, 0x00, 0x06]));
        assert!(is_rtcp(&[0x81, 201, 0x00, 0x07]));
        assert!(is_rtcp(&[0x80, 192]));
        assert!(is_rtcp(&[0x80, 223]));
        // RTP PT 0, 8, 96, 127 with and without the marker bit.
        for pt in [0u8, 8, 96, 127] {
            for marker in [0u8, 0x80] {
                let mut b = [0u8; 12];
                write_fixed_header(&mut b, marker != 0, pt, 1, 2, 3).unwrap();
                assert_eq!(b[1], marker | pt);
                assert!(!is_rtcp(&b), "PT {pt} marker {marker}");
            }
        }
        assert!(!is_rtcp(&[0x80, 191]));
        assert!(!is_rtcp(&[0x80, 224]));
        // Not version 2, or too short.
        assert!(!is_rtcp(&[0x40, 200]));
        assert!(!is_rtcp(&[0x80]));
        assert!(!is_rtcp(&[]));
    }

    fn repr_strategy() -> impl Strategy<Value = RtpRepr> {
        (
            any::<bool>(),
            0u8..128,
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<u32>(), 0..=MAX_CSRCS),
            prop::option::of((any::<u16>(), prop::collection::vec(any::<[u8; 4]>(), 0..8))),
        )
            .prop_map(
                |(marker, payload_type, sequence, timestamp, ssrc, csrcs, ext)| RtpRepr {
                    marker,
                    payload_type,
                    sequence,
                    timestamp,
                    ssrc,
                    csrcs,
                    extension: ext.map(|(p, words)| (p, words.concat())),
                },
            )
    }

    proptest! {
        #[test]
        fn new_checked_never_panics(b in prop::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(p) = RtpPacket::new_checked(&b[..]) {
                let hl = p.header_len();
                prop_assert!(hl + p.padding_len() <= b.len());
                prop_assert_eq!(p.payload().len(), b.len() - hl - p.padding_len());
                prop_assert_eq!(p.csrcs().count(), usize::from(p.csrc_count()));
                let _ = (p.extension(), p.sequence(), p.timestamp(), p.ssrc(), p.marker());
                let _ = RtpRepr::parse(&p);
            }
        }

        #[test]
        fn new_checked_never_panics_version2(
            first in 0x80u8..0xc0,
            rest in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut b = vec![first];
            b.extend_from_slice(&rest);
            if let Ok(p) = RtpPacket::new_checked(&b[..]) {
                prop_assert!(p.header_len() + p.padding_len() <= b.len());
                let _ = (p.payload(), p.extension(), p.csrcs().count());
            }
        }

        #[test]
        fn repr_round_trip(
            repr in repr_strategy(),
            payload in prop::collection::vec(any::<u8>(), 0..64),
            pad in 0u8..8,
        ) {
            let hl = repr.header_len();
            let mut buf = vec![0u8; hl + payload.len() + usize::from(pad)];
            prop_assert_eq!(repr.emit(&mut buf), Ok(hl));
            buf[hl..hl + payload.len()].copy_from_slice(&payload);
            if pad > 0 {
                buf[0] |= P_BIT;
                *buf.last_mut().unwrap() = pad;
            }
            let p = RtpPacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(RtpRepr::parse(&p), repr);
            prop_assert_eq!(p.header_len(), hl);
            prop_assert_eq!(p.payload(), &payload[..]);
            prop_assert_eq!(p.padding_len(), usize::from(pad));
        }
    }
}
