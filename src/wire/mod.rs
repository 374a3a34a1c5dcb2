//! Byte formats. Every parser is a checked view over untrusted bytes: after the length
//! check no accessor can panic, and every error is a typed value. Nothing here does IO
//! or allocates on the per-packet path.

pub mod control;
pub mod framing;
pub mod fuzz;
pub mod path;
pub mod rtp;
pub mod stun;
pub mod tls_records;
pub mod ws;
