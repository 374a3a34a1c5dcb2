//! The load generator's packet: a G.711-sized RTP packet (172 bytes: 12-byte RTP header,
//! payload type 0, + 160 payload bytes) whose payload starts with what the receiver needs to
//! measure the relay: a magic, the stream id, a 64-bit sequence number and the send time
//! (`CLOCK_MONOTONIC`, ns; sender and receiver live in one process, so one clock). The rest
//! of the payload is µ-law silence (0xFF).
//!
//! ```text
//!  0      1      2..4    4..8       8..12   12..16  16..20  20..28  28..36   36..172
//!  0x80   PT 0   seq16   ts=seq*160 SSRC    "VXBN"  stream  seq64   send_ns  0xFF...
//! ```
//!
//! Pure: no IO, no clock.

/// Bytes on the wire (without any transport framing): a 20 ms G.711 packet.
pub const PACKET_LEN: usize = 172;
/// Marks a load-generator payload.
pub const MAGIC: [u8; 4] = *b"VXBN";
/// SSRC = this + stream id (so that every stream is its own RTP source).
const SSRC_BASE: u32 = 0x5642_0000;

/// What the receiver reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub stream: u32,
    pub seq: u64,
    pub send_ns: u64,
}

/// Writes packet `seq` of `stream` sent at `send_ns` into `buf[..PACKET_LEN]`.
/// Returns `None` when `buf` is shorter than [`PACKET_LEN`].
pub fn write(buf: &mut [u8], stream: u32, seq: u64, send_ns: u64) -> Option<usize> {
    let b = buf.get_mut(..PACKET_LEN)?;
    b[0] = 0x80;
    b[1] = 0;
    b[8..12].copy_from_slice(&SSRC_BASE.wrapping_add(stream).to_be_bytes());
    b[12..16].copy_from_slice(&MAGIC);
    b[16..20].copy_from_slice(&stream.to_be_bytes());
    b[36..].fill(0xFF);
    restamp(b, seq, send_ns)?;
    Some(PACKET_LEN)
}

/// Rewrites only the per-packet fields of a packet already written by [`write`] for the same
/// stream (the sender's hot path: 3 stores instead of 172 bytes).
pub fn restamp(buf: &mut [u8], seq: u64, send_ns: u64) -> Option<()> {
    let b = buf.get_mut(..PACKET_LEN)?;
    b[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
    b[4..8].copy_from_slice(&((seq as u32).wrapping_mul(160)).to_be_bytes());
    b[20..28].copy_from_slice(&seq.to_be_bytes());
    b[28..36].copy_from_slice(&send_ns.to_be_bytes());
    Some(())
}

/// Reads the stamp of a received packet; `None` for anything that is not ours.
pub fn read(b: &[u8]) -> Option<Stamp> {
    if b.len() < 36 || b[0] & 0xC0 != 0x80 || b[12..16] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    Some(Stamp {
        stream: u32_at(16),
        seq: u64_at(20),
        send_ns: u64_at(28),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::rtp::RtpPacket;

    #[test]
    fn is_a_valid_g711_rtp_packet_of_172_bytes() {
        let mut b = [0u8; 200];
        assert_eq!(write(&mut b, 7, 0x1_0002, 99), Some(172));
        let p = RtpPacket::new_checked(&b[..172]).expect("valid RTP");
        assert_eq!(p.version(), 2);
        assert_eq!(p.payload_type(), 0);
        assert_eq!(p.sequence(), 2);
        assert_eq!(p.timestamp(), 0x1_0002u32.wrapping_mul(160));
        assert_eq!(p.ssrc(), 0x5642_0007);
        assert_eq!(p.payload().len(), 160);
        assert!(b[36..172].iter().all(|&x| x == 0xFF));
    }

    #[test]
    fn reference_bytes_and_round_trip() {
        let mut b = [0u8; 172];
        write(&mut b, 1, 2, 3).unwrap();
        assert_eq!(
            &b[..36],
            &[
                0x80, 0, 0, 2, 0, 0, 1, 64, 0x56, 0x42, 0, 1, b'V', b'X', b'B', b'N', 0, 0, 0, 1,
                0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3
            ]
        );
        assert_eq!(
            read(&b),
            Some(Stamp {
                stream: 1,
                seq: 2,
                send_ns: 3
            })
        );
        restamp(&mut b, u64::MAX, 1 << 40).unwrap();
        assert_eq!(
            read(&b),
            Some(Stamp {
                stream: 1,
                seq: u64::MAX,
                send_ns: 1 << 40
            })
        );
    }

    #[test]
    fn foreign_and_short_input_is_refused() {
        assert_eq!(read(&[]), None);
        assert_eq!(read(&[0x80; 35]), None);
        let mut b = [0u8; 172];
        write(&mut b, 1, 2, 3).unwrap();
        b[13] = b'Y';
        assert_eq!(read(&b), None);
        assert_eq!(write(&mut [0u8; 171], 0, 0, 0), None);
    }
}
