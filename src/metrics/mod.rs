//! Numbers an operator can see: per-shard counters, per-leg RTP quality, the relay-latency
//! histogram, and the interval-log dumps the control thread writes from them.

pub mod counters;
pub mod dump;
pub mod mos;
pub mod plot;
pub mod prom;
pub mod rtpstats;
pub mod stats;

pub use counters::{Counters, DropReason, Flow, Transport};
