//! The relay vocabulary the control core and the shards share: what a relay session is (its
//! legs, each with its STUN credentials and how the gateway delivers media to it). Plain data:
//! the control core (`control/`) builds these, the shard (`shard/`) installs them; neither
//! needs the other's internals for it.

use std::net::SocketAddr;

/// A relay session's id, unique on its shard (the control core uses the call id).
pub type SessionId = u64;

/// How the gateway delivers media *to* a leg's participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The participant gets this leg's peers' media some other way (directly from its peer).
    None,
    /// UDP to the source address the participant bound with its STUN Binding (symmetric RTP:
    /// the reply path its NAT or firewall opened).
    UdpLatched,
    /// UDP to an address the control plane set (a participant that can receive unsolicited UDP,
    /// or an IP voice gateway).
    Udp(SocketAddr),
    /// RFC 4571 frames on the TCP media connection the participant bound.
    Tcp,
}

#[derive(Clone, Debug)]
pub struct LegSpec {
    /// Leg id: the STUN USERNAME the participant binds with. Unique on the shard.
    pub name: String,
    /// Leg key: the STUN short-term password (MESSAGE-INTEGRITY key).
    pub key: Vec<u8>,
    pub delivery: Delivery,
    /// A UDP source the control plane vouches for (an IP voice gateway), bound without STUN.
    pub trusted_source: Option<SocketAddr>,
    /// RTP clock rate, for interarrival jitter (8000 for G.711).
    pub clock_rate: u32,
}

#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub id: SessionId,
    /// Two legs for a call, more for a room: media from each leg goes to every other leg.
    pub legs: Vec<LegSpec>,
}
