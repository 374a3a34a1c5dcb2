//! The media-path vocabulary the control protocol carries: what a client's firewall lets
//! through ([`Capabilities`]), how media travels in one direction ([`Path`]) and in both
//! ([`Plan`]), and the two media transports. Plain data with its serde names; the planner
//! (`control::planner`, Table 1) decides with it, the shard counts by [`Transport`].
//!
//! Lives in `wire/` so that the control messages (`wire::control`) need nothing outside
//! `wire/`: the planner's rules are inherent methods added in `control::planner`.

use serde::{Deserialize, Serialize};

/// Media transports, as seen from the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

/// What one client's firewall lets through, as measured by the probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capabilities {
    /// The client can send UDP out through its firewall.
    pub send_udp: bool,
    /// The client can receive UDP from outside.
    pub recv_udp: bool,
    /// The client is behind NAT (the observed source address differs from the
    /// one it reports).
    pub nat: bool,
}

/// How media travels in one direction (from one client to the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// UDP straight from sender to receiver; no gateway.
    DirectUdp,
    /// UDP to the gateway, UDP from the gateway: both ends allow UDP, but the
    /// receiver is behind NAT.
    UdpViaGateway,
    /// The sender sends UDP to the gateway, which delivers over the receiver's
    /// TCP connection (receiver cannot receive UDP).
    UdpInTcpOut,
    /// The sender sends over its TCP connection to the gateway, which delivers
    /// UDP (sender cannot send UDP).
    TcpInUdpOut,
    /// TCP from the sender to the gateway and TCP from the gateway to the
    /// receiver (sender cannot send UDP, receiver cannot receive it).
    TcpBoth,
}

/// How media travels in both directions of one call (one leg pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Caller → callee.
    pub forward: Path,
    /// Callee → caller.
    pub backward: Path,
}
