//! The gateway's decisions, as sans-IO state machines and pure functions.
//!
//! `control` owns *what* the gateway decides: who a client is (log-in by
//! challenge/response, [`auth`]), how media travels between two clients
//! ([`planner`], the 16 cases of the seed's Table 1), and, as they are added,
//! presence (heart-beats), probing (can a client send/receive UDP, is it behind
//! NAT), call set-up and conferences.
//!
//! What it must not do:
//! - **No IO.** Nothing here opens a socket, reads a file, touches the store
//!   or spawns a thread. Inputs arrive as values (a decoded message, a directory
//!   answer: look-ups are actions, see [`lookup`]); outputs leave as values (a reply to send, an action to
//!   take). `server/` and `client/` do the IO.
//! - **No clock.** Time is passed in (`now: std::time::Instant`) by the caller;
//!   tests drive a virtual clock and never sleep.
//! - **No ambient randomness.** Anything random is drawn from an RNG the caller
//!   passes in, so tests are deterministic.
//! - **No secrets in `Debug` or logs.** Types holding keys redact them.
//!
//! Modules: [`auth`] (SCRAM-SHA-256 log-in, rate limiting), [`planner`] (Table 1),
//! [`presence`] (heart-beats and polls), [`probe`] (firewall probing on ports A and B), [`calls`]
//! (dialling, ringing, media set-up, rooms, re-planning), [`media`] (turning a plan into
//! per-client instructions and relay legs), [`fleet`] (presence in Redis and calls across the
//! gateways of a fleet, as actions and inputs), and [`gateway`], which ties them together behind
//! one `handle(now, input)` / `poll_action()` interface for `server/`.

pub mod advertise;
pub mod auth;
pub mod calls;
pub mod fleet;
pub mod gateway;
pub mod limits;
pub mod lookup;
pub mod media;
pub mod paths;
pub mod peer_policy;
pub mod planner;
pub mod presence;
pub mod probe;
pub mod records;
#[cfg(test)]
mod sim;
pub mod tally;
pub mod toll;

/// The STUN short-term password for a media leg: derived from the client's session key (the
/// seed's "additional password"), so the gateway never sends it and nobody without the session
/// key can bind a media source to the leg. Hex, so it is printable like an ICE password.
pub fn leg_key(session: &auth::SessionKey, leg: &str) -> Vec<u8> {
    let k = session.derive("leg key", leg.as_bytes());
    k.as_bytes()
        .iter()
        .flat_map(|b| {
            let hex = b"0123456789abcdef";
            [hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]
        })
        .collect()
}

/// The key of one call relayed by another gateway of the fleet (`media{call_key: true}`):
/// the callee's phone derives that call's leg keys and opens its check keys with it instead of
/// its session key, so the session key never leaves the gateway it logged in to.
pub fn fleet_call_key(session: &auth::SessionKey, call: u64) -> auth::SessionKey {
    session.derive("fleet call", &call.to_be_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn leg_keys_differ_per_leg_and_per_session() {
        use super::auth::SessionKey;
        let a = SessionKey::from_bytes([1; 32]);
        let b = SessionKey::from_bytes([2; 32]);
        let k = super::leg_key(&a, "leg-1");
        assert_eq!(k.len(), 64);
        assert!(k.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(k, super::leg_key(&a, "leg-1"));
        assert_ne!(k, super::leg_key(&a, "leg-2"));
        assert_ne!(k, super::leg_key(&b, "leg-1"));
    }
}
