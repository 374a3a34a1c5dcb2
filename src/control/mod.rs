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
//!   or spawns a thread. Inputs arrive as values (a decoded message, a looked-up
//!   [`auth::Verifier`]); outputs leave as values (a reply to send, an action to
//!   take). `server/` and `client/` do the IO.
//! - **No clock.** Time is passed in (`now: std::time::Instant`) by the caller;
//!   tests drive a virtual clock and never sleep.
//! - **No ambient randomness.** Anything random is drawn from an RNG the caller
//!   passes in, so tests are deterministic.
//! - **No secrets in `Debug` or logs.** Types holding keys redact them.
//!
//! Modules still to come (owned by others): `presence`, `probe`, `calls`,
//! `conference`, `directory`.

pub mod auth;
pub mod planner;
