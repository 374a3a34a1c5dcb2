//! voxgate: a firewall-traversal gateway for voice over IP.
//!
//! Layers (see `README.md` for the picture):
//! - [`wire`]: byte formats (RTP view, RFC 4571 framing, STUN, control messages). No IO.
//! - [`control`]: sans-IO state machines driven by `(now, input)`. No IO.
//! - [`store`]: subscriber directory and telephone routes behind one trait.
//! - [`shard`]: the per-core data plane (io_uring, epoll fallback), session table, forwarding.
//! - `server`: the control thread: sockets, timers, driving `control`, commanding shards.
//! - [`client`]: the softphone library used by `voxgate phone`, tests and the load generator.
//! - [`metrics`]: counters, histograms and interval-log dumps.
//! - [`loadgen`]: `voxgate bench`, the load generator and report of the perf harness.
//! - Neutral vocabulary several layers share: [`directory`] (subscribers, routes, look-ups),
//!   [`relay_spec`] (relay sessions and legs), [`net`] (address canonicalisation and ranges).

pub mod client;
pub mod config;
pub mod control;
pub mod directory;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod relay_spec;
pub mod server;
pub mod shard;
pub mod store;
pub mod wire;
