//! Proven paths, the gateway's half: which path each direction of a call *starts* on, the
//! explicit fallback order it may move along, and the per-direction check keys the two phones
//! use to prove a direct path (sealed for each phone under its own session key, so no key ever
//! crosses the control channel in clear text).
//!
//! Pure functions, no state, no IO; [`super::calls`] applies them and [`crate::client::paths`]
//! is the phone's half (the connectivity checks and consent).
//!
//! # Where a direction starts
//!
//! Table 1 ([`super::planner`]) says where a direction *may* go. A direct path is an
//! assumption until the two phones have proven it, and an address a client merely reported
//! is never a destination. So ([`start_path`]):
//!
//! - a direction Table 1 gives [`Path::DirectUdp`] starts **through the gateway** over UDP
//!   ([`Path::UdpViaGateway`]) and is marked a *direct candidate*: the phones run keyed STUN
//!   checks on exactly that 5-tuple and switch to direct only once they succeed;
//! - the gateway delivers UDP to a receiver only at the source of that receiver's own keyed
//!   Binding ([`crate::relay_spec::Delivery::UdpLatched`]). A receiver that cannot send UDP (the
//!   probe saw none of its UDP) can neither bind nor answer a check, so its receiving segment
//!   is TCP: [`Path::TcpInUdpOut`] becomes [`Path::TcpBoth`], a UDP delivery towards it becomes
//!   [`Path::UdpInTcpOut`]. The gateway never sends to a reported address.
//!
//! # Fallback order
//!
//! Each direction moves one step at a time ([`fallback`]): direct → UDP via the gateway → TCP
//! through the gateway ([`Path::TcpBoth`]); a mixed path (one TCP segment) → [`Path::TcpBoth`].
//! The phone itself leaves a direct path whose consent expired (back to the gateway, which it
//! kept bound); `media_trouble` makes the gateway demote a direction one step. Nothing is
//! below [`Path::TcpBoth`]: when TCP through the gateway fails both ways too, the call ends.
//!
//! # Check keys
//!
//! Per direction of a two-party call that is a direct candidate, the gateway draws a random
//! 16-byte **check key** `K`. The STUN MESSAGE-INTEGRITY key of the checks is `K`'s lowercase
//! hex text (32 ASCII bytes, like a leg key); USERNAME is [`check_username`]. Each phone gets
//! `K` sealed under its own session key `S` ([`seal`]), with a fresh random 16-byte nonce `N`
//! and the context `C = "<call>:<forward|backward>"` (decimal call id):
//!
//! ```text
//! E   = HMAC-SHA256(S, "voxgate check key enc" ‖ 0x00 ‖ N ‖ C)[0..16]
//! ct  = K XOR E
//! tag = HMAC-SHA256(S, "voxgate check key mac" ‖ 0x00 ‖ C ‖ N ‖ ct)[0..16]
//! sealed = base64(N ‖ ct ‖ tag)          (48 bytes, 64 characters, standard alphabet, padded)
//! ```
//!
//! A phone [`open`]s it with its session key, checking the tag (constant time) first; a key
//! sealed for another call, another direction or another phone does not open.

use std::fmt;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::auth::SessionKey;
use super::planner::{Capabilities, Path};
use crate::wire::control::CallId;

/// Bytes of a check key.
pub const CHECK_KEY_LEN: usize = 16;
/// Bytes of a sealed check key before base64: nonce, ciphertext, tag.
pub const SEALED_LEN: usize = 48;

/// A direction's check key (random; the STUN key is its hex text, [`CheckKey::stun_key`]).
#[derive(Clone, PartialEq, Eq)]
pub struct CheckKey(pub [u8; CHECK_KEY_LEN]);

impl fmt::Debug for CheckKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckKey(<redacted>)")
    }
}

impl CheckKey {
    /// The STUN MESSAGE-INTEGRITY key: the key's lowercase hex text.
    pub fn stun_key(&self) -> Vec<u8> {
        hex(&self.0).into_bytes()
    }
}

fn hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    b.iter()
        .flat_map(|x| [HEX[usize::from(x >> 4)], HEX[usize::from(x & 15)]])
        .map(char::from)
        .collect()
}

/// The context a key is sealed for.
fn context(call: CallId, forward: bool) -> String {
    format!("{call}:{}", if forward { "forward" } else { "backward" })
}

/// The STUN USERNAME of the checks of one direction: `vxc:<call>:<forward|backward>`.
pub fn check_username(call: CallId, forward: bool) -> String {
    format!("vxc:{}", context(call, forward))
}

/// Seals `key` for the phone with session key `session` (see the module docs).
pub fn seal(
    session: &SessionKey,
    call: CallId,
    forward: bool,
    nonce: [u8; 16],
    key: &CheckKey,
) -> String {
    let c = context(call, forward);
    let e = session.derive("check key enc", &[&nonce[..], c.as_bytes()].concat());
    let mut out = [0u8; SEALED_LEN];
    out[..16].copy_from_slice(&nonce);
    for i in 0..CHECK_KEY_LEN {
        out[16 + i] = key.0[i] ^ e.as_bytes()[i];
    }
    let tag = session.derive("check key mac", &[c.as_bytes(), &out[..32]].concat());
    out[32..].copy_from_slice(&tag.as_bytes()[..16]);
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Why a sealed check key did not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the sealed check key is not base64 of {SEALED_LEN} bytes")]
    Malformed,
    #[error(
        "the sealed check key's tag does not match: not sealed for this session, call and direction"
    )]
    Tag,
}

/// Opens a sealed check key (see the module docs).
pub fn open(
    session: &SessionKey,
    call: CallId,
    forward: bool,
    sealed: &str,
) -> Result<CheckKey, SealError> {
    if sealed.len() > 2 * SEALED_LEN {
        return Err(SealError::Malformed);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_err(|_| SealError::Malformed)?;
    let raw: [u8; SEALED_LEN] = raw.try_into().map_err(|_| SealError::Malformed)?;
    let c = context(call, forward);
    let tag = session.derive("check key mac", &[c.as_bytes(), &raw[..32]].concat());
    if !bool::from(tag.as_bytes()[..16].ct_eq(&raw[32..])) {
        return Err(SealError::Tag);
    }
    let e = session.derive("check key enc", &[&raw[..16], c.as_bytes()].concat());
    let mut k = [0u8; CHECK_KEY_LEN];
    for (i, b) in k.iter_mut().enumerate() {
        *b = raw[16 + i] ^ e.as_bytes()[i];
    }
    Ok(CheckKey(k))
}

/// The path a direction starts on, given Table 1's `target` and the receiver's capabilities
/// (see the module docs).
pub const fn start_path(target: Path, receiver: Capabilities) -> Path {
    match target {
        Path::DirectUdp | Path::UdpViaGateway if receiver.send_udp => Path::UdpViaGateway,
        Path::DirectUdp | Path::UdpViaGateway => Path::UdpInTcpOut,
        Path::TcpInUdpOut if receiver.send_udp => Path::TcpInUdpOut,
        Path::TcpInUdpOut => Path::TcpBoth,
        p => p,
    }
}

/// Whether a direction with Table 1's `target` is a direct candidate: Table 1 gives it direct
/// UDP, the receiver can answer the sender's checks (it sends UDP) and the sender can hear the
/// answers (it receives UDP, if only as replies).
pub const fn is_direct_candidate(
    target: Path,
    sender: Capabilities,
    receiver: Capabilities,
) -> bool {
    matches!(target, Path::DirectUdp) && receiver.send_udp && sender.recv_udp
}

/// The next step down from `p` (see the module docs); `None` below TCP both ways.
pub const fn fallback(p: Path) -> Option<Path> {
    match p {
        Path::DirectUdp => Some(Path::UdpViaGateway),
        Path::UdpViaGateway | Path::UdpInTcpOut | Path::TcpInUdpOut => Some(Path::TcpBoth),
        Path::TcpBoth => None,
    }
}

/// How far down the fallback order a path is (0 = direct, 3 = TCP both ways).
pub const fn rank(p: Path) -> u8 {
    match p {
        Path::DirectUdp => 0,
        Path::UdpViaGateway => 1,
        Path::UdpInTcpOut | Path::TcpInUdpOut => 2,
        Path::TcpBoth => 3,
    }
}

/// The worse of two paths (the one further down the fallback order; two different mixed paths
/// give TCP both ways).
pub const fn worse(a: Path, b: Path) -> Path {
    let (ra, rb) = (rank(a), rank(b));
    if ra > rb {
        a
    } else if rb > ra {
        b
    } else if ra == 2
        && !matches!(
            (a, b),
            (Path::UdpInTcpOut, Path::UdpInTcpOut) | (Path::TcpInUdpOut, Path::TcpInUdpOut)
        )
    {
        Path::TcpBoth
    } else {
        a
    }
}

/// The full fallback order of a direction, best first: the direct candidate (when there is
/// one), the path it starts on, and each step below it.
pub fn order(start: Path, candidate: bool) -> Vec<Path> {
    let mut v = Vec::with_capacity(4);
    if candidate {
        v.push(Path::DirectUdp);
    }
    let mut p = Some(start);
    while let Some(x) = p {
        if !v.contains(&x) {
            v.push(x);
        }
        p = fallback(x);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_caps() -> impl Iterator<Item = Capabilities> {
        (0..8u8).map(|b| Capabilities {
            send_udp: b & 1 != 0,
            recv_udp: b & 2 != 0,
            nat: b & 4 != 0,
        })
    }

    const PATHS: [Path; 5] = [
        Path::DirectUdp,
        Path::UdpViaGateway,
        Path::UdpInTcpOut,
        Path::TcpInUdpOut,
        Path::TcpBoth,
    ];

    /// Every direction of every Table 1 combination starts through the gateway, never at a
    /// reported address, keeps the sender's transport, and a direct candidate is exactly a
    /// Table 1 direct direction whose receiver can answer checks.
    #[test]
    fn every_direction_starts_through_the_gateway() {
        for sender in all_caps() {
            for receiver in all_caps() {
                let target = Path::between(sender, receiver);
                let s = start_path(target, receiver);
                assert!(s.uses_gateway(), "{sender:?} {receiver:?}");
                assert_eq!(s.sender_transport(), target.sender_transport());
                // UDP from the gateway only to a receiver that binds (sends UDP) itself.
                if s.receiver_transport() == crate::metrics::Transport::Udp {
                    assert!(receiver.send_udp && receiver.recv_udp);
                }
                assert!(rank(s) >= rank(target));
                assert_eq!(
                    is_direct_candidate(target, sender, receiver),
                    target == Path::DirectUdp && receiver.send_udp && sender.recv_udp
                );
                let o = order(s, is_direct_candidate(target, sender, receiver));
                assert_eq!(o.last(), Some(&Path::TcpBoth));
                assert!(o.windows(2).all(|w| rank(w[0]) < rank(w[1])));
                assert!(o.contains(&s));
            }
        }
    }

    #[test]
    fn fallback_steps_down_to_tcp_and_stops() {
        assert_eq!(
            order(Path::UdpViaGateway, true),
            [Path::DirectUdp, Path::UdpViaGateway, Path::TcpBoth]
        );
        assert_eq!(order(Path::TcpBoth, false), [Path::TcpBoth]);
        assert_eq!(
            order(Path::UdpInTcpOut, false),
            [Path::UdpInTcpOut, Path::TcpBoth]
        );
        for p in PATHS {
            if let Some(q) = fallback(p) {
                assert!(rank(q) > rank(p));
            } else {
                assert_eq!(p, Path::TcpBoth);
            }
            for q in PATHS {
                let w = worse(p, q);
                assert_eq!(w, worse(q, p));
                assert!(rank(w) >= rank(p).max(rank(q)));
            }
        }
        assert_eq!(worse(Path::UdpInTcpOut, Path::TcpInUdpOut), Path::TcpBoth);
    }

    fn session(b: u8) -> SessionKey {
        SessionKey::from_bytes([b; 32])
    }

    #[test]
    fn sealed_keys_open_only_for_their_session_call_and_direction() {
        let k = CheckKey([7; 16]);
        let s = seal(&session(1), 42, true, [9; 16], &k);
        assert_eq!(s.len(), 64);
        assert_eq!(open(&session(1), 42, true, &s), Ok(k.clone()));
        // The key itself is not in the sealed text.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&s)
            .unwrap_or_default();
        assert!(!raw.windows(16).any(|w| w == k.0));
        assert_eq!(open(&session(2), 42, true, &s), Err(SealError::Tag));
        assert_eq!(open(&session(1), 43, true, &s), Err(SealError::Tag));
        assert_eq!(open(&session(1), 42, false, &s), Err(SealError::Tag));
        assert_eq!(
            open(&session(1), 42, true, "abc"),
            Err(SealError::Malformed)
        );
        // Another nonce: another ciphertext, same key.
        let t = seal(&session(1), 42, true, [10; 16], &k);
        assert_ne!(s, t);
        assert_eq!(open(&session(1), 42, true, &t), Ok(k.clone()));
        assert_eq!(k.stun_key(), b"07070707070707070707070707070707".to_vec());
        assert_eq!(check_username(42, false), "vxc:42:backward");
    }

    proptest::proptest! {
        /// Any flipped bit of a sealed key is refused, and arbitrary text never panics.
        #[test]
        fn tampering_is_refused(bit in 0usize..(SEALED_LEN * 8), junk in ".{0,200}") {
            let k = CheckKey([3; 16]);
            let s = seal(&session(5), 1, false, [1; 16], &k);
            let mut raw = base64::engine::general_purpose::STANDARD.decode(&s).unwrap_or_default();
            raw[bit / 8] ^= 1 << (bit % 8);
            let t = base64::engine::general_purpose::STANDARD.encode(&raw);
            proptest::prop_assert!(open(&session(5), 1, false, &t).is_err());
            let _ = open(&session(5), 1, false, &junk);
        }
    }
}
