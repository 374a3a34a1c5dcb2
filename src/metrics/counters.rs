//! Per-shard counters. A shard owns its `Counters` outright (plain integers, no atomics):
//! the control thread only ever sees copies taken through a shard command and merges them.

use serde::{Deserialize, Serialize};

pub use crate::wire::path::Transport;

/// Packets and bytes in one direction on one transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
}

impl Flow {
    #[inline]
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    pub fn merge(&mut self, other: &Flow) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Why a packet (or a connection) was dropped. The discriminant indexes `Counters::drops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Datagram from a source address not bound to any leg.
    Unbound,
    /// STUN Binding whose USERNAME names no leg on this shard, or whose MESSAGE-INTEGRITY fails.
    BadAuth,
    /// STUN message we do not handle (not a Binding request) or that does not parse.
    BadStun,
    /// The leg has no other leg that can take media (peer not bound yet, or receive-only).
    NoEgress,
    /// A TCP connection's bounded send queue was full: RTP for that leg dropped.
    TcpBackpressure,
    /// Datagram larger than a receive buffer (truncated by the kernel).
    Truncated,
    /// No free send slot (the ring's in-flight send budget is exhausted).
    SendBacklog,
    /// A send completed with an error.
    SendError,
    /// A TCP frame over the maximum size, or a first frame that is not a valid Binding:
    /// the connection is closed.
    BadFrame,
    /// A frame that could not be reassembled because no spare buffer was free.
    NoReassemblyBuffer,
    /// Unbound TCP connections over the limit, or idle past the binding timeout.
    TcpConnLimit,
    /// Media older than the stale age (kernel receive time to handling, or waiting in a TCP
    /// queue): late voice is useless, so it is dropped rather than delivered late.
    Stale,
    /// Datagrams the kernel dropped because the UDP socket's receive buffer was full
    /// (`SO_RXQ_OVFL`).
    SocketOverflow,
    /// A datagram toward a TCP leg larger than `max_frame` (the client would treat the frame as
    /// fatal).
    OversizeForTcp,
    /// A leg's media source changed: the new source's Binding was answered with a keyed check
    /// of the gateway's own, and media is not sent there until that check is answered. Counts
    /// replayed Bindings (a transaction id already seen, from another address), and answers
    /// held back by the anti-amplification limit.
    LatchPending,
    /// A leg's source is in a built-in denied range of the peer policy: loopback, private or
    /// link-local with `allow_private_peers` off, or a special-purpose range.
    PrivateLatch,
    /// A TCP media frame that is neither RTP/RTCP (version 2, at least 12 bytes) nor STUN: the
    /// connection is closed.
    NotMedia,
    /// Accepting TCP media connections paused (counted once per pause): the process ran out of
    /// descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS).
    AcceptBackoff,
    /// A shard→control event (a leg bound) dropped because the bounded channel was full.
    EventOverflow,
    /// A leg's new UDP source is in the operator's `denied_peers`: the leg does not latch there
    /// (even with the right key).
    DeniedLatch,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Unbound,
        DropReason::BadAuth,
        DropReason::BadStun,
        DropReason::NoEgress,
        DropReason::TcpBackpressure,
        DropReason::Truncated,
        DropReason::SendBacklog,
        DropReason::SendError,
        DropReason::BadFrame,
        DropReason::NoReassemblyBuffer,
        DropReason::TcpConnLimit,
        DropReason::Stale,
        DropReason::SocketOverflow,
        DropReason::OversizeForTcp,
        DropReason::LatchPending,
        DropReason::PrivateLatch,
        DropReason::NotMedia,
        DropReason::AcceptBackoff,
        DropReason::EventOverflow,
        DropReason::DeniedLatch,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Unbound => "unbound",
            DropReason::BadAuth => "bad_auth",
            DropReason::BadStun => "bad_stun",
            DropReason::NoEgress => "no_egress",
            DropReason::TcpBackpressure => "tcp_backpressure",
            DropReason::Truncated => "truncated",
            DropReason::SendBacklog => "send_backlog",
            DropReason::SendError => "send_error",
            DropReason::BadFrame => "bad_frame",
            DropReason::NoReassemblyBuffer => "no_reassembly_buffer",
            DropReason::TcpConnLimit => "tcp_conn_limit",
            DropReason::Stale => "stale",
            DropReason::SocketOverflow => "socket_overflow",
            DropReason::OversizeForTcp => "oversize_for_tcp",
            DropReason::LatchPending => "latch_pending",
            DropReason::PrivateLatch => "private_latch",
            DropReason::NotMedia => "not_media",
            DropReason::AcceptBackoff => "accept_backoff",
            DropReason::EventOverflow => "event_overflow",
            DropReason::DeniedLatch => "denied_latch",
        }
    }
}

/// Everything a shard counts. Cheap to copy; merged by the control thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub udp_in: Flow,
    pub udp_out: Flow,
    pub tcp_in: Flow,
    pub tcp_out: Flow,
    /// STUN Binding requests answered (bindings made or refreshed).
    pub bindings: u64,
    pub drops: [u64; DropReason::COUNT],
    /// Times a multishot receive ended because its buffer ring ran dry (ENOBUFS) and was
    /// re-armed.
    pub buf_ring_exhausted: u64,
    /// TCP media connections accepted / closed (any reason).
    pub tcp_accepted: u64,
    pub tcp_closed: u64,
    /// Frames that spanned more than two receive buffers and were copied into a spare
    /// buffer to be reassembled (the only copy of payload bytes in the gateway).
    pub reassembly_copies: u64,
    /// `io_uring_enter` (or epoll_wait) calls that returned with work: wake-ups.
    pub wakeups: u64,
}

impl Counters {
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn flow(&self, transport: Transport, inbound: bool) -> &Flow {
        match (transport, inbound) {
            (Transport::Udp, true) => &self.udp_in,
            (Transport::Udp, false) => &self.udp_out,
            (Transport::Tcp, true) => &self.tcp_in,
            (Transport::Tcp, false) => &self.tcp_out,
        }
    }

    /// What was counted since `earlier` (a previous copy of the same shard's counters).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let f = |a: &Flow, b: &Flow| Flow {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        };
        let mut drops = [0; DropReason::COUNT];
        for (d, (a, b)) in drops
            .iter_mut()
            .zip(self.drops.iter().zip(earlier.drops.iter()))
        {
            *d = a.saturating_sub(*b);
        }
        Counters {
            udp_in: f(&self.udp_in, &earlier.udp_in),
            udp_out: f(&self.udp_out, &earlier.udp_out),
            tcp_in: f(&self.tcp_in, &earlier.tcp_in),
            tcp_out: f(&self.tcp_out, &earlier.tcp_out),
            bindings: self.bindings.saturating_sub(earlier.bindings),
            drops,
            buf_ring_exhausted: self
                .buf_ring_exhausted
                .saturating_sub(earlier.buf_ring_exhausted),
            tcp_accepted: self.tcp_accepted.saturating_sub(earlier.tcp_accepted),
            tcp_closed: self.tcp_closed.saturating_sub(earlier.tcp_closed),
            reassembly_copies: self
                .reassembly_copies
                .saturating_sub(earlier.reassembly_copies),
            wakeups: self.wakeups.saturating_sub(earlier.wakeups),
        }
    }

    pub fn merge(&mut self, o: &Counters) {
        self.udp_in.merge(&o.udp_in);
        self.udp_out.merge(&o.udp_out);
        self.tcp_in.merge(&o.tcp_in);
        self.tcp_out.merge(&o.tcp_out);
        self.bindings += o.bindings;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += *b;
        }
        self.buf_ring_exhausted += o.buf_ring_exhausted;
        self.tcp_accepted += o.tcp_accepted;
        self.tcp_closed += o.tcp_closed;
        self.reassembly_copies += o.reassembly_copies;
        self.wakeups += o.wakeups;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_own_slot() {
        let mut c = Counters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} is out of order", r.name());
            c.drop(*r);
        }
        assert!(c.drops.iter().all(|&d| d == 1));
        let mut m = Counters::default();
        m.merge(&c);
        m.merge(&c);
        assert_eq!(m.total_drops(), 2 * DropReason::COUNT as u64);
        assert_eq!(
            m.since(&c),
            c,
            "the second merge is what happened since the first"
        );
        assert_eq!(c.since(&m).total_drops(), 0, "never negative");
    }
}
