//! G.711 (ITU-T Recommendation G.711, 1988) µ-law and A-law companding, written out by hand.
//!
//! This module owns the sample conversions only: 16-bit linear PCM to one 8-bit code and back.
//! It does no IO and allocates nothing. The softphone sends µ-law (RTP payload type 0, RFC 3551
//! §4.5.14); A-law (payload type 8) is here for completeness and for IP voice gateways that
//! use it.
//!
//! G.711 works on 14-bit (µ-law) and 13-bit (A-law) magnitudes; 16-bit samples are scaled down
//! by 2 and 3 bits first and the decoders return values scaled back up, the common convention
//! (the same as the reference `g711.c` that accompanies ITU-T G.191). Encoding is a
//! segment search: G.711 Table 1 (A-law) and Table 2 (µ-law) divide the magnitude range into 8
//! segments of 16 equal steps; a code is `sign | segment (3 bits) | step (4 bits)`, with the
//! bits inverted (µ-law) or even bits toggled (A-law, `0x55`) for transmission.

/// µ-law bias: G.711 adds 33 to the 14-bit magnitude (132 = 33 << 2 on the 16-bit scale) so
/// that segment ends fall on powers of two.
const ULAW_BIAS: i32 = 0x84;
/// Largest 16-bit magnitude µ-law represents (8159 on the 14-bit scale, before the bias).
const ULAW_CLIP: i32 = 32635;
/// Segment ends on the biased 16-bit scale for µ-law: segment `s` holds magnitudes below
/// `ULAW_SEG_END[s]`.
const ULAW_SEG_END: [i32; 8] = [0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF];
/// Segment ends on the 13-bit scale for A-law.
const ALAW_SEG_END: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];

/// The µ-law code of silence: `encode_ulaw(0)`.
pub const ULAW_SILENCE: u8 = 0xFF;
/// The A-law code of silence: `encode_alaw(0)`.
pub const ALAW_SILENCE: u8 = 0xD5;

fn segment(value: i32, ends: &[i32; 8]) -> u8 {
    // `ends` is increasing; a value beyond the last end is clipped by the caller.
    ends.iter().position(|&end| value <= end).unwrap_or(7) as u8
}

/// Encodes one 16-bit linear sample as a µ-law code.
pub fn encode_ulaw(sample: i16) -> u8 {
    let mut magnitude = i32::from(sample);
    // Sign: µ-law codes are transmitted inverted, so "positive" ends up with the top bit set.
    let mask: u8 = if magnitude < 0 {
        // One's complement, as the G.191 reference does: -1 is a negative zero.
        magnitude = -magnitude - 1;
        0x7F
    } else {
        0xFF
    };
    let biased = magnitude.min(ULAW_CLIP) + ULAW_BIAS;
    let seg = segment(biased, &ULAW_SEG_END);
    let step = ((biased >> (seg + 3)) & 0x0F) as u8;
    ((seg << 4) | step) ^ mask
}

/// Decodes one µ-law code to a 16-bit linear sample.
pub fn decode_ulaw(code: u8) -> i16 {
    let u = !code;
    let seg = (u >> 4) & 0x07;
    let step = i32::from(u & 0x0F);
    let magnitude = (((step << 3) + ULAW_BIAS) << seg) - ULAW_BIAS;
    // At most ((15 << 3) + 132) << 7 - 132 = 32124: fits in i16.
    let v = if u & 0x80 != 0 { -magnitude } else { magnitude };
    v as i16
}

/// Encodes one 16-bit linear sample as an A-law code.
pub fn encode_alaw(sample: i16) -> u8 {
    // A-law works on 13 bits.
    let mut value = i32::from(sample) >> 3;
    let mask: u8 = if value >= 0 {
        0xD5
    } else {
        // One's complement keeps -1 and 0 symmetric, as G.711 Table 1 does.
        value = -value - 1;
        0x55
    };
    let seg = segment(value, &ALAW_SEG_END);
    if value > ALAW_SEG_END[7] {
        return 0x7F ^ mask;
    }
    let step = if seg < 2 {
        (value >> 1) & 0x0F
    } else {
        (value >> seg) & 0x0F
    } as u8;
    ((seg << 4) | step) ^ mask
}

/// Decodes one A-law code to a 16-bit linear sample.
pub fn decode_alaw(code: u8) -> i16 {
    let a = code ^ 0x55;
    let step = i32::from(a & 0x0F) << 4;
    let seg = (a >> 4) & 0x07;
    let magnitude = match seg {
        0 => step + 8,
        1 => step + 0x108,
        s => (step + 0x108) << (s - 1),
    };
    // At most (0xF0 + 0x108) << 6 = 32256: fits in i16.
    let v = if a & 0x80 != 0 { magnitude } else { -magnitude };
    v as i16
}

/// Encodes `pcm` into `out` (µ-law), pairwise; returns how many samples were encoded.
pub fn encode_ulaw_into(pcm: &[i16], out: &mut [u8]) -> usize {
    let n = pcm.len().min(out.len());
    for (o, s) in out.iter_mut().zip(pcm) {
        *o = encode_ulaw(*s);
    }
    n
}

/// What a sample sounds like after one µ-law encode/decode: what a receiver of it records.
pub fn ulaw_round_trip(sample: i16) -> i16 {
    decode_ulaw(encode_ulaw(sample))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_reference_values() {
        // Silence, and the two zeros.
        assert_eq!(encode_ulaw(0), 0xFF);
        assert_eq!(decode_ulaw(0xFF), 0);
        assert_eq!(decode_ulaw(0x7F), 0, "negative zero");
        // Full scale: the largest code magnitude is 32124 on the 16-bit scale (8031 << 2 ...).
        assert_eq!(encode_ulaw(i16::MAX), 0x80);
        assert_eq!(encode_ulaw(i16::MIN), 0x00);
        assert_eq!(decode_ulaw(0x80), 32124);
        assert_eq!(decode_ulaw(0x00), -32124);
        // Segment ends (G.711 Table 2 on the 16-bit scale): the first code of each segment
        // decodes to 0, 132, 396, 924, 1980, 4092, 8316, 16764 (positive side).
        let firsts: Vec<i16> = (0..8u8).map(|s| decode_ulaw(!(s << 4))).collect();
        assert_eq!(firsts, [0, 132, 396, 924, 1980, 4092, 8316, 16764]);
        // ... and the step inside each segment doubles: 8, 16, 32, ..., 1024.
        let steps: Vec<i16> = (0..8u8)
            .map(|s| decode_ulaw(!((s << 4) | 1)) - decode_ulaw(!(s << 4)))
            .collect();
        assert_eq!(steps, [8, 16, 32, 64, 128, 256, 512, 1024]);
        // Values around the first segment boundary.
        assert_eq!(encode_ulaw(123), 0xF0);
        assert_eq!(encode_ulaw(124), 0xEF);
        assert_eq!(encode_ulaw(-1), 0x7F);
        assert_eq!(encode_ulaw(-9), 0x7E);
        assert_eq!(decode_ulaw(0x7E), -8);
        // Symmetry (one's complement: -v - 1 mirrors v).
        for v in [0i16, 1, 100, 1000, 10_000, 32_000, i16::MAX] {
            assert_eq!(encode_ulaw(-v - 1) ^ 0x80, encode_ulaw(v), "{v}");
        }
    }

    #[test]
    fn alaw_reference_values() {
        assert_eq!(encode_alaw(0), 0xD5);
        assert_eq!(decode_alaw(0xD5), 8);
        assert_eq!(decode_alaw(0x55), -8);
        assert_eq!(encode_alaw(i16::MAX), 0xAA);
        assert_eq!(encode_alaw(i16::MIN), 0x2A);
        assert_eq!(decode_alaw(0xAA), 32256);
        assert_eq!(decode_alaw(0x2A), -32256);
        // First code of each positive segment: 8, 264, 528, 1056, 2112, 4224, 8448, 16896.
        let firsts: Vec<i16> = (0..8u8)
            .map(|s| decode_alaw((0x80 | (s << 4)) ^ 0x55))
            .collect();
        assert_eq!(firsts, [8, 264, 528, 1056, 2112, 4224, 8448, 16896]);
    }

    #[test]
    fn decode_encode_decode_is_stable_for_every_code() {
        for code in 0..=255u8 {
            let u = decode_ulaw(code);
            assert_eq!(decode_ulaw(encode_ulaw(u)), u, "µ-law code {code:#04x}");
            let a = decode_alaw(code);
            assert_eq!(decode_alaw(encode_alaw(a)), a, "A-law code {code:#04x}");
        }
        // Every code but µ-law's negative zero is its own encoding.
        for code in 0..=255u8 {
            if code != 0x7F {
                assert_eq!(encode_ulaw(decode_ulaw(code)), code);
            }
            assert_eq!(encode_alaw(decode_alaw(code)), code);
        }
    }

    #[test]
    fn encoding_is_monotonic_and_close() {
        let mut prev = decode_ulaw(encode_ulaw(i16::MIN));
        for s in i16::MIN..=i16::MAX {
            let u = ulaw_round_trip(s);
            assert!(u >= prev, "monotonic at {s}");
            prev = u;
            // Quantisation error at most half a step of the top segment (plus clipping).
            let err = (i32::from(u) - i32::from(s)).abs();
            assert!(err <= 644, "µ-law error {err} at {s}");
            let a = decode_alaw(encode_alaw(s));
            let err = (i32::from(a) - i32::from(s)).abs();
            assert!(err <= 512, "A-law error {err} at {s}");
        }
    }
}
