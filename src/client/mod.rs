//! The softphone library: used by `voxgate phone`, the tests and the load generator.
//!
//! - [`session`]: the control connection (log-in, heart-beats, probes, call signalling).
//! - [`media`]: one call's media: STUN bindings with the gateway, G.711 RTP paced at 20 ms over
//!   UDP and/or RFC 4571 TCP, reception statistics and the recording.
//! - [`binding`]: the sans-IO STUN Binding that proves a leg key to the gateway.
//! - [`g711`], [`wav`]: audio.
//! - [`cli`]: `voxgate phone` and `voxgate probe`.
//! - [`gateways`]: a phone's list of gateways (addresses, DNS SRV names) and logging in to
//!   the next one when its gateway is gone.
//!
//! Everything that does IO here runs on tokio and on the client's own sockets; nothing is
//! shared with the gateway's code paths.

pub mod binding;
pub mod cli;
#[cfg(test)]
mod fake_gateway;
pub mod g711;
pub mod gateways;
pub mod media;
pub mod paths;
pub mod proxy;
pub mod session;
pub mod tls;
pub mod wav;

use serde::Serialize;

/// A **simulated** client firewall, for loopback tests and demos.
///
/// The softphone itself refuses to send UDP (probe datagrams, media and media bindings) and/or
/// discards every UDP datagram it receives, so that on one host the gateway's real probe
/// measures the class and the real planner picks the path. It only simulates *this client's
/// own* firewall, in user space, and only for the softphone's sockets: TCP is never touched,
/// and nothing else on the host is affected. It is not a firewall and proves nothing about
/// how real firewalls behave; the network-namespace lab tests do that with real nftables
/// rules.
///
/// `block_udp_in` discards *every* inbound datagram, answers to the client's own requests
/// included (a stateless "drop inbound UDP" rule). A stateful firewall would let those
/// answers through; the media engine copes with both (see [`media`]).
///
/// `simulate_nat` makes the client report, in `probe_local`, a local address whose port
/// differs from its probe socket's real one, so that the gateway's probe sees address
/// translation as behind a NAT and the planner relays UDP through the gateway
/// (`udp_via_gateway`) instead of planning direct UDP between two open clients on one host.
/// The load generator (`voxgate bench`) uses it to put the gateway on the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Firewall {
    pub block_udp_out: bool,
    pub block_udp_in: bool,
    pub simulate_nat: bool,
}

impl Firewall {
    /// No simulated blocking.
    pub const OPEN: Firewall = Firewall {
        block_udp_out: false,
        block_udp_in: false,
        simulate_nat: false,
    };

    /// Sends `datagram` to `to` unless outgoing UDP is blocked; `Ok(false)` when blocked.
    /// Never waits: a full socket buffer drops the datagram (late voice is useless).
    pub fn send_to(
        &self,
        socket: &tokio::net::UdpSocket,
        datagram: &[u8],
        to: std::net::SocketAddr,
    ) -> std::io::Result<bool> {
        if self.block_udp_out {
            return Ok(false);
        }
        match socket.try_send_to(datagram, to) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a received UDP datagram may be looked at.
    pub fn admits_udp_in(&self) -> bool {
        !self.block_udp_in
    }

    /// The local address to report for a socket whose real local address is `real`: `real`
    /// itself, or, with `simulate_nat`, the same IP with another port (what a client behind
    /// a NAT reports: its private address, not the one the gateway observes).
    pub fn reported_local(&self, real: std::net::SocketAddr) -> std::net::SocketAddr {
        if !self.simulate_nat {
            return real;
        }
        let port = if real.port() >= 65_000 {
            20_000
        } else {
            real.port() + 1
        };
        std::net::SocketAddr::new(real.ip(), port)
    }
}

/// An address as one canonical form: IPv4-mapped IPv6 (from a dual-stack socket) as IPv4.
pub(crate) fn canonical(a: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
}
