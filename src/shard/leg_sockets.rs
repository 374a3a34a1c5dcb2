//! Connected UDP sockets per leg, for the io_uring loop.
//!
//! The shard's UDP socket is unconnected: every send names its destination, so for every
//! datagram the kernel copies the address in and looks its route up (`ip_route_output_flow`,
//! a few per cent of the relay's time at flood). A leg that media is sent to gets a socket of
//! its own instead, bound to the shard socket's address and port (`SO_REUSEADDR`) and connected
//! to the leg's address: its sends name nothing and take the route cached at connect.
//!
//! The kernel then hands that peer's datagrams to the leg socket (an exact four-tuple match
//! outranks the shard socket's wildcard one), so each leg socket has its own multishot receive
//! on the same buffer ring. Its completions carry the source address like the shard socket's
//! and are handled by the same code: a datagram means the same thing whichever of the two
//! sockets it reached (a socket bound but not yet connected may catch a stranger's datagram;
//! it is handled as if the shard socket had). Nothing about admission, binding or latching
//! depends on which socket a datagram came in on.
//!
//! - A leg's address moves (NAT re-mapping, re-latching): the next send to it connects its
//!   socket again (one `connect`, no new socket).
//! - A leg socket carries one peer: its receive buffer is a quarter of the shard socket's (at
//!   least 256 KiB, 1 MiB by default), so a thousand of them cannot queue a thousand shard
//!   sockets' worth of datagrams in the kernel.
//! - At most `max` per shard (`media.leg_sockets`); beyond it, and for a second after a socket
//!   could not be made (descriptors exhausted), sends go out on the shard socket as before.
//! - A socket no media was sent on for `IDLE_NS` is closed (the leg has ended, or moved to
//!   TCP): its receive is cancelled and its registered-file slot emptied before the slot is
//!   used again.
//! - Only the io_uring loop uses them. There, another socket is one more receive armed once
//!   and its sends are submissions like any other; under epoll each active socket would cost a
//!   readiness event and a `recvmmsg` per wake-up, and `sendmmsg` could no longer batch the
//!   sends of a turn.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use super::sockets::{self, OverflowTracker, SocketOptions};

/// A leg socket no media was sent on for this long is closed.
pub const IDLE_NS: u64 = 30_000_000_000;
/// After a socket could not be made, none is tried for this long.
const RETRY_NS: u64 = 1_000_000_000;
/// Idle sockets are looked for this often.
const SWEEP_NS: u64 = 1_000_000_000;
const NONE: u32 = u32::MAX;

/// Leg sockets one shard may open: `want` (`media.leg_sockets`), but all `shards` together at
/// most a quarter of the descriptor limit `nofile` (the control plane takes up to half of the
/// descriptors free when it starts).
pub fn cap(want: usize, shards: usize, nofile: u64) -> usize {
    want.min(usize::try_from(nofile / 4).unwrap_or(usize::MAX) / shards.max(1))
}

/// A leg socket's receive buffer, for a shard socket's `shard_rcvbuf`.
fn leg_rcvbuf(shard_rcvbuf: usize) -> usize {
    (shard_rcvbuf / 4).max(256 << 10).min(shard_rcvbuf)
}

/// The process's soft descriptor limit (`RLIMIT_NOFILE`).
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

pub struct LegSocket {
    pub sock: Socket,
    /// Where it is connected.
    pub peer: SocketAddr,
    /// Tells this socket's completions from those of an earlier socket in the same slot.
    pub generation: u32,
    /// Its multishot receive is armed.
    pub armed: bool,
    /// Its own `SO_RXQ_OVFL` count (the counter is per socket).
    pub overflow: OverflowTracker,
    leg: u32,
    last_send_ns: u64,
}

/// Which socket a send goes out on.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    /// The shard socket, with the destination in the send.
    Shard,
    /// The leg socket in this slot.
    Leg(u32),
    /// A leg socket just made in this slot: register it and arm its receive first.
    Opened(u32),
}

/// A closed socket whose slot is not free yet: the loop cancels its receive (`generation`)
/// and empties its registered-file slot, then calls [`LegSockets::release`].
pub struct Closing {
    pub slot: u32,
    pub generation: u32,
    pub sock: Socket,
}

pub struct LegSockets {
    local: SocketAddr,
    ipv6: bool,
    opts: SocketOptions,
    max: usize,
    slots: Vec<Option<LegSocket>>,
    free: Vec<u32>,
    /// Leg index to slot (`NONE`: none).
    by_leg: Vec<u32>,
    generation: u32,
    retry_after_ns: u64,
    next_sweep_ns: u64,
    closing: Vec<Closing>,
    open: usize,
    /// Slots whose receive stopped and must be armed again (once buffers are there).
    pub rearm: Vec<u32>,
}

impl LegSockets {
    /// `local`: the shard socket's bound address, `opts` its options; `max` 0 turns leg
    /// sockets off.
    pub fn new(local: SocketAddr, ipv6: bool, opts: SocketOptions, max: usize) -> LegSockets {
        let opts = SocketOptions {
            udp_rcvbuf: leg_rcvbuf(opts.udp_rcvbuf),
            ..opts
        };
        LegSockets {
            local,
            ipv6,
            opts,
            max,
            slots: Vec::new(),
            free: Vec::new(),
            by_leg: Vec::new(),
            generation: 0,
            retry_after_ns: 0,
            next_sweep_ns: 0,
            closing: Vec::new(),
            open: 0,
            rearm: Vec::new(),
        }
    }

    /// Sockets open.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Receives armed (shut-down waits for them).
    pub fn armed(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.armed).count()
    }

    pub fn get(&self, slot: u32) -> Option<&LegSocket> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// The socket in `slot` if it is still the one of `generation`.
    pub fn current(&mut self, slot: u32, generation: u32) -> Option<&mut LegSocket> {
        self.slots
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == generation)
    }

    /// The socket media for `leg`, now at `dst`, goes out on.
    pub fn pick(&mut self, leg: u32, dst: SocketAddr, now_ns: u64) -> Pick {
        if self.max == 0 {
            return Pick::Shard;
        }
        let slot = self.by_leg.get(leg as usize).copied().unwrap_or(NONE);
        if slot != NONE {
            let ipv6 = self.ipv6;
            let Some(s) = self.slots[slot as usize].as_mut() else {
                return Pick::Shard;
            };
            s.last_send_ns = now_ns;
            if s.peer == dst {
                return Pick::Leg(slot);
            }
            // The leg's address moved: connect the same socket again.
            match sockets::connect_udp(&s.sock, ipv6, dst) {
                Ok(()) => {
                    s.peer = dst;
                    return Pick::Leg(slot);
                }
                Err(e) => {
                    tracing::debug!("leg socket: connect to {dst}: {e}");
                    self.close(slot);
                    return Pick::Shard;
                }
            }
        }
        if now_ns < self.retry_after_ns || (self.free.is_empty() && self.slots.len() >= self.max) {
            return Pick::Shard;
        }
        let sock = match sockets::connected_udp(self.local, self.ipv6, self.opts, dst) {
            Ok(s) => s,
            Err(e) => {
                self.failed(now_ns, &e);
                return Pick::Shard;
            }
        };
        self.generation = self.generation.wrapping_add(1) & 0x00ff_ffff;
        let s = LegSocket {
            sock,
            peer: dst,
            generation: self.generation,
            armed: false,
            overflow: OverflowTracker::default(),
            leg,
            last_send_ns: now_ns,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u32
            }
        };
        if self.by_leg.len() <= leg as usize {
            self.by_leg.resize(leg as usize + 1, NONE);
        }
        self.by_leg[leg as usize] = slot;
        self.open += 1;
        Pick::Opened(slot)
    }

    /// A socket could not be made or registered: none is tried for a while (each try costs
    /// system calls on the packet path).
    pub fn failed(&mut self, now_ns: u64, e: &io::Error) {
        if now_ns >= self.retry_after_ns {
            tracing::warn!("cannot open a leg socket ({e}); sending on the shard socket");
        }
        self.retry_after_ns = now_ns + RETRY_NS;
    }

    /// Closes the socket in `slot`; its slot is free once the loop has let go of it.
    pub fn close(&mut self, slot: u32) {
        let Some(s) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.open -= 1;
        if self.by_leg.get(s.leg as usize) == Some(&slot) {
            self.by_leg[s.leg as usize] = NONE;
        }
        self.closing.push(Closing {
            slot,
            generation: s.generation,
            sock: s.sock,
        });
    }

    /// Closes, once a second, the sockets no media was sent on for `IDLE_NS`.
    pub fn sweep(&mut self, now_ns: u64) {
        if now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = now_ns + SWEEP_NS;
        for slot in 0..self.slots.len() as u32 {
            let idle = self.slots[slot as usize]
                .as_ref()
                .is_some_and(|s| now_ns.saturating_sub(s.last_send_ns) >= IDLE_NS);
            if idle {
                self.close(slot);
            }
        }
    }

    /// A closed socket the loop could not let go of this turn.
    pub fn close_later(&mut self, c: Closing) {
        self.closing.push(c);
    }

    /// Sockets closed since the last call, for the loop to let go of.
    pub fn take_closing(&mut self) -> Vec<Closing> {
        std::mem::take(&mut self.closing)
    }

    /// The loop has cancelled the receive and emptied the registered file of `slot`.
    pub fn release(&mut self, slot: u32) {
        if self.slots.get(slot as usize).is_some_and(Option::is_none) {
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn opts() -> SocketOptions {
        SocketOptions {
            udp_rcvbuf: 1 << 16,
            udp_sndbuf: 1 << 16,
            backlog: 8,
        }
    }

    /// A shard socket on loopback, as `bind_shard` makes it, and leg sockets beside it.
    fn shard(max: usize) -> (UdpSocket, LegSockets) {
        let s = sockets::bind_shard(
            "127.0.0.1".parse().unwrap(),
            0,
            opts(),
            std::time::Duration::ZERO,
        )
        .expect("bind");
        let local = s.udp_addr;
        let udp: UdpSocket = s.udp.into();
        (udp, LegSockets::new(local, false, opts(), max))
    }

    fn peer() -> UdpSocket {
        let p = UdpSocket::bind("127.0.0.1:0").unwrap();
        p.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        p
    }

    fn recv_from(s: &Socket) -> (Vec<u8>, SocketAddr) {
        let u: &UdpSocket = &s.try_clone().unwrap().into();
        u.set_nonblocking(false).unwrap();
        u.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 64];
        let (n, from) = u.recv_from(&mut b).expect("the leg socket got it");
        (b[..n].to_vec(), from)
    }

    #[test]
    fn a_leg_socket_sends_from_the_shard_port_and_takes_its_peers_datagrams() {
        let (shard_sock, mut legs) = shard(4);
        let p = peer();
        let dst = p.local_addr().unwrap();
        let Pick::Opened(slot) = legs.pick(7, dst, 1) else {
            panic!("no socket opened")
        };
        assert_eq!(legs.pick(7, dst, 2), Pick::Leg(slot));
        let s = &legs.get(slot).unwrap().sock;
        s.send(b"to the peer").unwrap();
        let mut b = [0u8; 64];
        let (n, from) = p.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], b"to the peer");
        assert_eq!(
            from,
            shard_sock.local_addr().unwrap(),
            "same address and port"
        );
        // The peer answers to the shard port: the connected socket gets it.
        p.send_to(b"answer", from).unwrap();
        assert_eq!(recv_from(s), (b"answer".to_vec(), dst));
        // Anyone else still reaches the shard socket.
        let other = peer();
        other.send_to(b"stranger", from).unwrap();
        shard_sock
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, f) = shard_sock.recv_from(&mut b).unwrap();
        assert_eq!(
            (&b[..n], f),
            (&b"stranger"[..], other.local_addr().unwrap())
        );
    }

    #[test]
    fn a_leg_that_moves_is_connected_again_to_its_new_address() {
        let (shard_sock, mut legs) = shard(4);
        let (p1, p2) = (peer(), peer());
        let Pick::Opened(slot) = legs.pick(0, p1.local_addr().unwrap(), 1) else {
            panic!("no socket opened")
        };
        assert_eq!(legs.pick(0, p2.local_addr().unwrap(), 2), Pick::Leg(slot));
        legs.get(slot).unwrap().sock.send(b"moved").unwrap();
        let mut b = [0u8; 16];
        let (n, from) = p2.recv_from(&mut b).unwrap();
        assert_eq!(
            (&b[..n], from),
            (&b"moved"[..], shard_sock.local_addr().unwrap())
        );
        assert_eq!(legs.open(), 1, "the same socket");
    }

    #[test]
    fn the_cap_holds_and_idle_sockets_are_closed_and_their_slots_reused_after_release() {
        let (_shard, mut legs) = shard(2);
        let peers: Vec<UdpSocket> = (0..3).map(|_| peer()).collect();
        let a = |i: usize| peers[i].local_addr().unwrap();
        assert!(matches!(legs.pick(0, a(0), 0), Pick::Opened(0)));
        assert!(matches!(legs.pick(1, a(1), 0), Pick::Opened(1)));
        assert_eq!(legs.pick(2, a(2), 0), Pick::Shard, "over the cap");
        // Leg 0 keeps sending, leg 1 stops.
        legs.pick(0, a(0), IDLE_NS);
        legs.sweep(IDLE_NS);
        assert_eq!(legs.open(), 1);
        let closing = legs.take_closing();
        assert_eq!(closing.len(), 1);
        assert_eq!(closing[0].slot, 1);
        // Not free before the loop let go of it.
        assert_eq!(legs.pick(2, a(2), IDLE_NS), Pick::Shard);
        legs.release(1);
        let Pick::Opened(slot) = legs.pick(2, a(2), IDLE_NS) else {
            panic!("the freed slot is used")
        };
        assert_eq!(slot, 1);
        assert_ne!(
            legs.get(1).unwrap().generation,
            closing[0].generation,
            "a new generation: the old receive's completions are told apart"
        );
        // Leg 1 sends again: over the cap, so the shard socket.
        assert_eq!(legs.pick(1, a(1), IDLE_NS), Pick::Shard);
    }

    #[test]
    fn a_socket_that_cannot_be_made_stops_tries_for_a_while() {
        // An IPv6 peer on an IPv4 shard cannot be connected: the leg goes out on the shard
        // socket (where the send fails and is counted, as before), and no socket is tried
        // for the next second.
        let (_shard, mut legs) = shard(4);
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(legs.pick(0, v6, 0), Pick::Shard);
        let p = peer();
        assert_eq!(
            legs.pick(1, p.local_addr().unwrap(), 1),
            Pick::Shard,
            "backing off"
        );
        assert!(matches!(
            legs.pick(1, p.local_addr().unwrap(), RETRY_NS),
            Pick::Opened(_)
        ));
    }

    #[test]
    fn all_shards_together_take_at_most_a_quarter_of_the_descriptors() {
        assert_eq!(cap(1024, 2, 1 << 20), 1024, "the configured number");
        assert_eq!(cap(1024, 2, 1024), 128, "a default soft limit of 1,024");
        assert_eq!(cap(1024, 64, 1024), 4);
        assert_eq!(cap(1024, 2, 0), 0, "no limit known: none");
        assert_eq!(cap(0, 2, 1 << 20), 0, "off");
    }

    #[test]
    fn a_leg_socket_has_a_quarter_of_the_shard_sockets_receive_buffer() {
        assert_eq!(leg_rcvbuf(4 << 20), 1 << 20, "the default");
        assert_eq!(leg_rcvbuf(512 << 10), 256 << 10, "at least 256 KiB");
        assert_eq!(
            leg_rcvbuf(64 << 10),
            64 << 10,
            "never more than the shard socket's"
        );
        // And the socket gets it: no more (the kernel doubles what it is asked for, and caps
        // it at net.core.rmem_max).
        let (_shard, mut legs) = shard(1);
        legs.opts.udp_rcvbuf = 256 << 10;
        let p = peer();
        let Pick::Opened(slot) = legs.pick(0, p.local_addr().unwrap(), 0) else {
            panic!("no socket opened")
        };
        let got = legs.get(slot).unwrap().sock.recv_buffer_size().unwrap();
        assert!(got > 0 && got <= 2 * (256 << 10), "{got}");
    }

    #[test]
    fn off_means_the_shard_socket() {
        let (_shard, mut legs) = shard(0);
        let p = peer();
        assert_eq!(legs.pick(0, p.local_addr().unwrap(), 0), Pick::Shard);
        assert_eq!(legs.open(), 0);
    }
}
