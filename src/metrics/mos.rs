//! Per-leg listening-quality estimate: the ITU-T G.107 E-model (06/2015), reduced to what a
//! relay can measure on a G.711 leg — packet loss, interarrival jitter and one-way delay.
//!
//! Every other E-model input stays at its G.107 default (Table 3: SLR 8, RLR 2, STMR 15,
//! LSTR 18, Ds = Dr = 3, TELR 65 dB, WEPL 110 dB, qdu 1, Nc −70 dBm0p, Nfor −64 dBmp,
//! Ps = Pr = 35 dB(A), A 0), so the model collapses to
//!
//! ```text
//! R = Ro − Is − Id(T, Ta, Tr) − Ie,eff(Ppl)        (G.107 §7.1, A = 0)
//! ```
//!
//! with `Ro − Is` computed once from those defaults (≈ 93.36) and:
//!
//! - **Delay.** The one-way delay a listener sees is the network delay plus the jitter buffer
//!   the receiver needs plus one packetization frame: `Ta = delay + 2·jitter + 20 ms`
//!   (a playout buffer of twice the RFC 3550 interarrival jitter, G.711 at 20 ms per packet).
//!   The echo path and the listener-echo round trip follow it: `T = Ta`, `Tr = 2·Ta`
//!   (G.107's own planning convention for an echo-cancelled connection).
//! - **Loss.** G.711's equipment impairment Ie is 0; its packet-loss robustness is taken
//!   from ITU-T G.113 Appendix I, Table I.3, for random loss (`BurstR = 1`): **Bpl = 4.3,
//!   G.711 without packet-loss concealment** ([`BPL_G711`]) — voxgate's own phone plays
//!   silence for a lost packet, and the gateway cannot know whether the far end conceals.
//!   G.711 with its Appendix I concealment has Bpl = 25.1 ([`BPL_G711_PLC`]); use
//!   [`r_factor_with_bpl`] for an endpoint known to conceal.
//! - **R → MOS** per G.107 Annex B (B-4).
//!
//! Pure functions; no IO, no state. Inputs that are NaN, negative or infinite are clamped to
//! the nearest meaningful value, so any measured numbers give a MOS in 1.0..=4.5.

/// Packet-loss robustness of G.711 without concealment (G.113 Table I.3, random loss).
pub const BPL_G711: f64 = 4.3;
/// Packet-loss robustness of G.711 with its Appendix I concealment (G.113 Table I.3).
pub const BPL_G711_PLC: f64 = 25.1;
/// Packetization delay added to the network delay: one 20-ms G.711 frame.
pub const FRAME_MS: f64 = 20.0;
/// The playout buffer is this many times the interarrival jitter.
pub const JITTER_BUFFER_FACTOR: f64 = 2.0;

// G.107 Table 3 default values.
const SLR: f64 = 8.0;
const RLR: f64 = 2.0;
const STMR: f64 = 15.0;
const LSTR: f64 = 18.0;
const DS: f64 = 3.0;
const TELR: f64 = 65.0;
const WEPL: f64 = 110.0;
const QDU: f64 = 1.0;
const NC: f64 = -70.0;
const NFOR: f64 = -64.0;
const PS: f64 = 35.0;
const PR: f64 = 35.0;
/// G.711's equipment impairment factor (G.113 Table I.1).
const IE_G711: f64 = 0.0;

/// Total noise power No (G.107 eq. 7-3 to 7-7), in dBm0p.
fn noise_no() -> f64 {
    let olr = SLR + RLR;
    let nos = PS - SLR - DS - 100.0 + 0.004 * (PS - olr - DS - 14.0).powi(2);
    let pre = PR + 10.0 * (1.0 + 10f64.powf((10.0 - LSTR) / 10.0)).log10();
    let nor = RLR - 121.0 + pre + 0.008 * (pre - 35.0).powi(2);
    let nfo = NFOR + RLR;
    let p = |x: f64| 10f64.powf(x / 10.0);
    10.0 * (p(NC) + p(nos) + p(nor) + p(nfo)).log10()
}

/// Basic signal-to-noise ratio Ro (G.107 eq. 7-2).
fn ro() -> f64 {
    15.0 - 1.5 * (SLR + noise_no())
}

/// Side-tone masking rating STMRo (G.107 eq. 7-13), which depends on the echo delay `t`.
fn stmr_o(t: f64) -> f64 {
    -10.0 * (10f64.powf(-STMR / 10.0) + (-t / 4.0).exp() * 10f64.powf(-TELR / 10.0)).log10()
}

/// Simultaneous impairment Is = Iolr + Ist + Iq (G.107 §7.3).
fn is(t: f64) -> f64 {
    let no = noise_no();
    let olr = SLR + RLR;
    let xolr = olr + 0.2 * (64.0 + no - RLR);
    let iolr = 20.0 * ((1.0 + (xolr / 8.0).powi(8)).powf(1.0 / 8.0) - xolr / 8.0);
    let ist = ist(stmr_o(t));
    let q = 37.0 - 15.0 * QDU.log10();
    let g = 1.07 + 0.258 * q + 0.0602 * q * q;
    let y = (ro() - 100.0) / 15.0 + 46.0 / 8.4 - g / 9.0;
    let z = 46.0 / 30.0 - g / 40.0;
    let iq = 15.0 * (1.0 + 10f64.powf(y) + 10f64.powf(z)).log10();
    iolr + ist + iq
}

fn ist(stmr_o: f64) -> f64 {
    let term = |a: f64, b: f64, c: f64| (1.0 + ((stmr_o + a) / b).powf(c)).powf(1.0 / c);
    12.0 * term(-13.0, 6.0, 8.0) - 28.0 * term(1.0, 19.4, 35.0) - 13.0 * term(-3.0, 33.0, 13.0)
        + 29.0
}

/// Talker-echo impairment Idte for echo-path delay `t` ms (G.107 eq. 7-21 to 7-24).
fn idte(t: f64) -> f64 {
    let roe = -1.5 * (noise_no() - RLR);
    let terv =
        TELR - 40.0 * ((1.0 + t / 10.0) / (1.0 + t / 150.0)).log10() + 6.0 * (-0.3 * t * t).exp();
    let re = 80.0 + 2.5 * (terv - 14.0);
    let d = roe - re;
    (d / 2.0 + (d * d / 4.0 + 100.0).sqrt() - 1.0) * (1.0 - (-t).exp())
}

/// Listener-echo impairment Idle for round-trip delay `tr` ms (G.107 eq. 7-26, 7-27).
fn idle(tr: f64) -> f64 {
    let rle = 10.5 * (WEPL + 7.0) * (tr + 1.0).powf(-0.25);
    let d = ro() - rle;
    d / 2.0 + (d * d / 4.0 + 169.0).sqrt()
}

/// Impairment from absolute delay Idd for one-way delay `ta` ms (G.107 eq. 7-28, 7-29,
/// default sT = 1, mT = 100 ms).
pub fn idd(ta: f64) -> f64 {
    if ta <= 100.0 {
        return 0.0;
    }
    let x = (ta / 100.0).log2();
    25.0 * ((1.0 + x.powi(6)).powf(1.0 / 6.0) - 3.0 * (1.0 + (x / 3.0).powi(6)).powf(1.0 / 6.0)
        + 2.0)
}

/// The delay impairment Id = Idte + Idle + Idd for a mouth-to-ear delay `ta` ms, with the
/// echo delays `T = ta`, `Tr = 2·ta`.
pub fn id(ta: f64) -> f64 {
    let ta = clamp_nonneg(ta);
    idte(ta) + idle(2.0 * ta) + idd(ta)
}

/// Effective equipment impairment Ie,eff for `ppl` percent random packet loss (G.107 eq. 7-30).
pub fn ie_eff(ppl_percent: f64, bpl: f64) -> f64 {
    let ppl = clamp_nonneg(ppl_percent).min(100.0);
    IE_G711 + (95.0 - IE_G711) * ppl / (ppl + bpl)
}

/// The transmission rating R for a G.711 leg without concealment; see the module docs.
/// `loss_fraction` in 0..=1, `jitter_ms` the RFC 3550 interarrival jitter, `one_way_delay_ms`
/// the network's one-way delay (without jitter buffer or packetization, which this adds).
pub fn r_factor(loss_fraction: f64, jitter_ms: f64, one_way_delay_ms: f64) -> f64 {
    r_factor_with_bpl(loss_fraction, jitter_ms, one_way_delay_ms, BPL_G711)
}

/// [`r_factor`] with an explicit packet-loss robustness factor Bpl.
pub fn r_factor_with_bpl(
    loss_fraction: f64,
    jitter_ms: f64,
    one_way_delay_ms: f64,
    bpl: f64,
) -> f64 {
    let ta = mouth_to_ear_ms(jitter_ms, one_way_delay_ms);
    let loss = clamp_nonneg(loss_fraction).min(1.0);
    ro() - is(ta) - id(ta) - ie_eff(loss * 100.0, bpl)
}

/// The delay the E-model is fed: network delay + jitter buffer + one frame.
pub fn mouth_to_ear_ms(jitter_ms: f64, one_way_delay_ms: f64) -> f64 {
    clamp_nonneg(one_way_delay_ms) + JITTER_BUFFER_FACTOR * clamp_nonneg(jitter_ms) + FRAME_MS
}

/// R → MOS (conversational quality, CQE), G.107 Annex B eq. B-4.
pub fn r_to_mos(r: f64) -> f64 {
    if r.is_nan() || r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        // Below R ≈ 6.5 the cubic dips under 1; G.107 Figure B.1 floors it at 1.
        (1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6).max(1.0)
    }
}

/// The MOS estimate (1.0..=4.5) of a G.711 leg; see [`r_factor`] for the inputs.
pub fn mos(loss_fraction: f64, jitter_ms: f64, one_way_delay_ms: f64) -> f64 {
    r_to_mos(r_factor(loss_fraction, jitter_ms, one_way_delay_ms))
}

/// NaN and negatives become 0; +∞ stays (and saturates the model); finite values pass.
fn clamp_nonneg(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        0.0
    } else {
        x.min(1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn defaults_give_the_published_r_of_93_2() {
        // G.107 §7.7: all parameters at their defaults (T = Ta = Tr = 0) give R = 93.2.
        let r0 = ro() - is(0.0) - id(0.0) - ie_eff(0.0, BPL_G711);
        assert!(close(r0, 93.2, 0.05), "R = {r0}");
        assert!(close(ro(), 94.77, 0.01), "Ro = {}", ro());
        assert!(close(is(0.0), 1.41, 0.01), "Is = {}", is(0.0));
        // ... and Annex B maps R = 93.2 to MOS 4.41.
        assert!(close(r_to_mos(93.2), 4.41, 0.005), "{}", r_to_mos(93.2));
    }

    #[test]
    fn r_to_mos_matches_g107_annex_b_and_g109_table() {
        // G.109 Table 1: R 90 / 80 / 70 / 60 / 50 ↔ MOS 4.34 / 4.03 / 3.60 / 3.10 / 2.58.
        for (r, m) in [
            (90.0, 4.34),
            (80.0, 4.03),
            (70.0, 3.60),
            (60.0, 3.10),
            (50.0, 2.58),
        ] {
            assert!(close(r_to_mos(r), m, 0.01), "R {r}: {}", r_to_mos(r));
        }
        assert_eq!(r_to_mos(0.0), 1.0);
        assert_eq!(r_to_mos(-5.0), 1.0);
        assert_eq!(r_to_mos(100.0), 4.5);
        assert_eq!(r_to_mos(120.0), 4.5);
        assert_eq!(r_to_mos(f64::NAN), 1.0);
        // Monotone over 0..100.
        let mut last = 1.0;
        for i in 0..=1000 {
            let m = r_to_mos(f64::from(i) / 10.0);
            assert!(m >= last - 1e-12, "R {}: {m} < {last}", f64::from(i) / 10.0);
            last = m;
        }
    }

    #[test]
    fn absolute_delay_impairment_matches_g107() {
        // Idd is 0 up to mT = 100 ms; at Ta = 200 ms X = 1:
        // 25 · ((2)^(1/6) − 3·(1 + 3^−6)^(1/6) + 2) = 3.044; at 400 ms X = 2: 24.08.
        assert_eq!(idd(0.0), 0.0);
        assert_eq!(idd(100.0), 0.0);
        assert!(close(idd(200.0), 3.044, 0.001), "{}", idd(200.0));
        assert!(close(idd(400.0), 24.08, 0.01), "{}", idd(400.0));
        // Id with the default TELR of 65 dB: 0.15 at zero delay (Idle only); at 400 ms the
        // echo terms add Idte ≈ 5.8 and Idle ≈ 1.2 to Idd.
        assert!(close(id(0.0), 0.15, 0.01), "{}", id(0.0));
        assert!(close(id(400.0), 24.08 + 5.81 + 1.22, 0.05), "{}", id(400.0));
    }

    #[test]
    fn loss_follows_g113_bpl() {
        // Ie,eff = 95 · Ppl / (Ppl + Bpl): 1 % loss costs 17.9 without concealment, 3.6 with.
        assert!(close(ie_eff(1.0, BPL_G711), 95.0 / 5.3, 1e-9));
        assert!(close(ie_eff(1.0, BPL_G711_PLC), 95.0 / 26.1, 1e-9));
        assert_eq!(ie_eff(0.0, BPL_G711), 0.0);
        assert!(close(ie_eff(100.0, BPL_G711), 95.0 * 100.0 / 104.3, 1e-9));
    }

    #[test]
    fn mos_of_measured_legs() {
        // A clean LAN leg: 1 ms delay, 0.5 ms jitter, no loss → toll quality (R ≈ 92.5:
        // the 22-ms mouth-to-ear delay costs a little talker and listener echo).
        let clean = mos(0.0, 0.5, 1.0);
        assert!(close(clean, 4.39, 0.02), "{clean}");
        // 1 % loss without concealment drops R by ~18: MOS ≈ 3.9 ("some users dissatisfied").
        let lossy = mos(0.01, 0.5, 1.0);
        assert!(close(
            r_factor(0.0, 0.5, 1.0) - r_factor(0.01, 0.5, 1.0),
            17.92,
            0.01
        ));
        assert!(lossy < 4.0 && lossy > 3.8, "{lossy}");
        // Half the packets lost: poor.
        assert!(mos(0.5, 0.5, 1.0) < 1.6);
        // Satellite delay alone (300 ms + 2·20 ms jitter): well below toll quality.
        let far = mos(0.0, 20.0, 300.0);
        assert!(far < 4.0 && far > 3.0, "{far}");
        // Worse inputs never raise the score.
        assert!(mos(0.02, 1.0, 50.0) < mos(0.01, 1.0, 50.0));
        assert!(mos(0.0, 1.0, 250.0) < mos(0.0, 1.0, 50.0));
        assert!(mos(0.0, 40.0, 50.0) < mos(0.0, 1.0, 50.0));
    }

    #[test]
    fn any_input_gives_a_mos_in_range() {
        for &l in &[f64::NAN, -1.0, 0.0, 0.3, 1.0, 7.0, f64::INFINITY] {
            for &j in &[f64::NAN, -3.0, 0.0, 10.0, 1e12, f64::INFINITY] {
                for &d in &[f64::NAN, -3.0, 0.0, 150.0, 1e12, f64::INFINITY] {
                    let m = mos(l, j, d);
                    assert!((1.0..=4.5).contains(&m), "mos({l}, {j}, {d}) = {m}");
                }
            }
        }
    }
}
