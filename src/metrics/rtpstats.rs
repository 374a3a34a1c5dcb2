//! Per-stream RTP reception quality: sequence tracking with loss (RFC 3550 A.1/A.3) and
//! interarrival jitter (RFC 3550 A.8). Fed with `(sequence, rtp_timestamp, arrival)` per
//! packet; allocation-free and panic-free for any input.

use serde::{Deserialize, Serialize};

const RTP_SEQ_MOD: u32 = 1 << 16;
const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;

/// Reception statistics for one RTP stream (one SSRC; a new SSRC restarts them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RtpStats {
    ssrc: u32,
    started: bool,
    max_seq: u16,
    /// Shifted count of sequence-number cycles (RFC 3550 `cycles`).
    cycles: u32,
    base_seq: u32,
    bad_seq: u32,
    received: u64,
    /// Packets that arrived with a sequence number lower than one already seen.
    reordered: u64,
    /// Last transit time (arrival - rtp timestamp), in RTP clock units.
    transit: i64,
    has_transit: bool,
    /// Jitter estimate, in RTP timestamp units, scaled by 16 (RFC 3550 A.8 integer form).
    jitter_q4: u64,
}

/// A copy of the numbers an operator reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtpReport {
    pub ssrc: u32,
    pub received: u64,
    pub expected: u64,
    /// `expected - received`, never negative (duplicates can make received exceed expected).
    pub lost: u64,
    pub reordered: u64,
    /// Interarrival jitter in RTP timestamp units.
    pub jitter: u32,
}

impl RtpStats {
    /// Account one packet. `arrival` is the arrival time already converted to the stream's RTP
    /// clock units (e.g. nanoseconds * clock_rate / 1e9); only its differences matter.
    pub fn on_packet(&mut self, ssrc: u32, seq: u16, rtp_ts: u32, arrival: u64) {
        if !self.started || ssrc != self.ssrc {
            // A new stream is accepted from its first packet (RFC 3550 A.1 without the
            // probation period: the gateway only sees media of authenticated legs).
            *self = RtpStats {
                ssrc,
                started: true,
                ..RtpStats::default()
            };
            self.init_seq(seq);
        } else if !self.update_seq(seq) {
            return;
        }
        self.received += 1;
        self.update_jitter(rtp_ts, arrival);
    }

    fn init_seq(&mut self, seq: u16) {
        self.base_seq = u32::from(seq);
        self.max_seq = seq;
        self.bad_seq = RTP_SEQ_MOD + 1;
        self.cycles = 0;
        self.received = 0;
    }

    /// RFC 3550 A.1 `update_seq`; returns whether the packet counts as valid.
    fn update_seq(&mut self, seq: u16) -> bool {
        let udelta = seq.wrapping_sub(self.max_seq);
        if udelta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles = self.cycles.wrapping_add(RTP_SEQ_MOD);
            }
            self.max_seq = seq;
        } else if u32::from(udelta) <= RTP_SEQ_MOD - u32::from(MAX_MISORDER) {
            // A very large jump: accept it only if the next packet confirms it.
            if u32::from(seq) == self.bad_seq {
                self.init_seq(seq);
            } else {
                self.bad_seq = (u32::from(seq) + 1) & (RTP_SEQ_MOD - 1);
                return false;
            }
        } else {
            // Duplicate or reordered packet.
            self.reordered += 1;
        }
        true
    }

    fn update_jitter(&mut self, rtp_ts: u32, arrival: u64) {
        // RFC 3550 A.8 works modulo 2^32: transit = arrival - timestamp, D = transit -
        // last transit, all as wrapping 32-bit values, D read as signed. With 64-bit
        // arithmetic a timestamp wrap (every ~6 days at 8 kHz, at once for a random start
        // near 2^32) looked like a 2^32-unit jump.
        let transit = (arrival as u32).wrapping_sub(rtp_ts) as i32;
        if self.has_transit {
            let d = u64::from(transit.wrapping_sub(self.transit as i32).unsigned_abs());
            // J += (|D| - J/16) with J kept scaled by 16 (RFC 3550 A.8).
            let d = d.min(u64::from(u32::MAX));
            self.jitter_q4 = self.jitter_q4 + d - ((self.jitter_q4 + 8) >> 4);
        }
        self.transit = i64::from(transit);
        self.has_transit = true;
    }

    pub fn report(&self) -> RtpReport {
        if !self.started {
            return RtpReport::default();
        }
        let extended_max = u64::from(self.cycles) + u64::from(self.max_seq);
        let expected = (extended_max + 1).saturating_sub(u64::from(self.base_seq));
        RtpReport {
            ssrc: self.ssrc,
            received: self.received,
            expected,
            lost: expected.saturating_sub(self.received),
            reordered: self.reordered,
            jitter: u32::try_from(self.jitter_q4 >> 4).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_does_not_jump_when_the_timestamp_wraps() {
        let mut st = RtpStats::default();
        // 20 ms packets at 8 kHz with 1 unit of alternating jitter, crossing 2^32.
        let start = u32::MAX - 160 * 50;
        let mut arrival = 1_000_000u64;
        for i in 0..100u32 {
            let ts = start.wrapping_add(i * 160);
            arrival += 160 + u64::from(i % 2);
            st.on_packet(1, i as u16, ts, arrival);
        }
        assert!(
            st.report().jitter <= 2,
            "jitter {} after the wrap",
            st.report().jitter
        );
    }
    use proptest::prelude::*;

    fn feed(stats: &mut RtpStats, seqs: impl IntoIterator<Item = u16>) {
        for s in seqs {
            let ts = u32::from(s).wrapping_mul(160);
            stats.on_packet(7, s, ts, u64::from(ts));
        }
    }

    #[test]
    fn clean_stream_has_no_loss_and_no_jitter() {
        let mut s = RtpStats::default();
        feed(&mut s, 100..400);
        let r = s.report();
        assert_eq!((r.received, r.expected, r.lost, r.jitter), (300, 300, 0, 0));
    }

    #[test]
    fn gaps_are_counted_as_loss_across_wraparound() {
        let mut s = RtpStats::default();
        // 600 packets from 65300, wrapping past 65535; every 10th after the first is lost.
        let seqs: Vec<u16> = (0..600u32)
            .filter(|i| i % 10 != 5)
            .map(|i| (65_300 + i) as u16)
            .collect();
        feed(&mut s, seqs);
        let r = s.report();
        assert_eq!((r.expected, r.received, r.lost), (600, 540, 60), "{r:?}");
    }

    #[test]
    fn jitter_follows_a8_for_a_constant_offset() {
        let mut s = RtpStats::default();
        // Every other packet arrives 80 units late: |D| alternates 80, 80, ...
        for i in 0..2000u32 {
            let ts = i * 160;
            let late = if i % 2 == 1 { 80 } else { 0 };
            s.on_packet(1, i as u16, ts, u64::from(ts + late));
        }
        let j = s.report().jitter;
        assert!((78..=80).contains(&j), "jitter {j}");
    }

    #[test]
    fn new_ssrc_restarts_the_stream() {
        let mut s = RtpStats::default();
        feed(&mut s, 0..50);
        s.on_packet(99, 5000, 0, 0);
        s.on_packet(99, 5001, 160, 160);
        assert_eq!(s.report().ssrc, 99);
        assert_eq!(s.report().received, 2);
    }

    proptest! {
        #[test]
        fn never_panics_and_loss_is_bounded(pkts in proptest::collection::vec(any::<(u16, u32, u64)>(), 0..500)) {
            let mut s = RtpStats::default();
            for (seq, ts, at) in pkts {
                s.on_packet(1, seq, ts, at);
            }
            let r = s.report();
            prop_assert!(r.lost <= r.expected);
        }
    }
}
