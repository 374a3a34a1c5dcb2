//! Proven paths, the phone's half: connectivity checks before direct media, consent freshness
//! on every UDP path the phone sends on, and validation of a new media source before its
//! media is accepted. Sans-IO, in the manner of str0m's ICE agent and quinn's path validation:
//! no sockets, no clock, no threads. A machine is driven by [`DirectPath::handle_timeout`] and
//! [`DirectPath::handle_input`] (an incoming STUN datagram and its source); it hands out
//! datagrams through [`DirectPath::poll_transmit`], decisions through
//! [`DirectPath::poll_event`], and says when it next needs the clock through
//! [`DirectPath::poll_timeout`]. "Always use the values of the last emitted event to send."
//!
//! # One machine per direction
//!
//! A direction of a call that is a direct candidate (the gateway's `media.paths.*.direct`) has
//! one machine on each phone, keyed with that direction's check key (the key's lowercase hex
//! text is the STUN MESSAGE-INTEGRITY key, USERNAME is the direction's check username):
//!
//! - On the **sender** ([`Role::Sender`]) it sends keyed Binding requests (checks) from the
//!   call's media socket to the peer's candidate address: at once, then after 50, 100, 200,
//!   400, 400, 400 ms ([`CHECK_SCHEDULE`]); at most [`MAX_CHECKS`] in all, so a candidate that
//!   is a third party's address (a `dial` announcing a victim) gets at most that many small
//!   datagrams, at most one per 50 ms, and never media. A success response from exactly that
//!   address, with MESSAGE-INTEGRITY under the key and our transaction id, proves the 5-tuple:
//!   [`PathEvent::UseDirect`]. No success after the last check's time-out:
//!   [`PathEvent::Failed`]; the direction stays through the gateway.
//! - Once direct, **consent** (RFC 7675, with shorter times for voice): a check every
//!   [`CONSENT_INTERVAL`]; when none was answered for [`CONSENT_TIMEOUT`] the path lost consent:
//!   [`PathEvent::UseGateway`] (the direction falls back one step, to the gateway, which the
//!   phone kept bound) and the machine stops sending to that address.
//! - On the **receiver** ([`Role::Receiver`]) it answers valid checks (same socket, to the
//!   source, a response no larger than a request) and, for a source it has not validated yet,
//!   sends its own challenge (a keyed Binding request with a fresh transaction id, at most
//!   [`MAX_CHALLENGES`] per source, [`MAX_SOURCES`] sources). Only a source that answered a
//!   challenge is [`PathEvent::AcceptFrom`]: the phone then accepts media from it as well as
//!   from the gateway (quinn's path validation: a replayed check from another address cannot
//!   make the phone take media from there).
//!
//! Both roles answer valid requests, so the sender answers the receiver's challenges.
//!
//! [`Consent`] is the same freshness check towards the gateway: a keyed Binding request
//! (USERNAME = leg, key = leg key) every [`GATEWAY_CONSENT_INTERVAL`]; answers keep it fresh,
//! and they also keep the NAT mapping alive and make the gateway see (and, after its own
//! challenge, re-latch) a new mapping after a NAT rebinding. No answer for
//! [`GATEWAY_CONSENT_TIMEOUT`]: [`Consent::lost`].
//!
//! [`SeqWindow`] de-duplicates RTP by sequence number, so that the packets a sender sends on
//! both paths while it switches are not counted twice (nor as loss).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::stun;

/// Delays between successive checks of a candidate (the first goes at once).
pub const CHECK_SCHEDULE: [Duration; 6] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(400),
    Duration::from_millis(400),
];
/// Most checks sent to a candidate before it is proven.
pub const MAX_CHECKS: u32 = CHECK_SCHEDULE.len() as u32 + 1;
/// How long the last check waits for its answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Consent checks on a direct path.
pub const CONSENT_INTERVAL: Duration = Duration::from_millis(250);
/// A direct path with no answered consent check for this long is abandoned.
pub const CONSENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Consent checks towards the gateway.
pub const GATEWAY_CONSENT_INTERVAL: Duration = Duration::from_millis(500);
/// No answer from the gateway for this long: the UDP path to it lost consent.
pub const GATEWAY_CONSENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Challenges a receiver sends to one new source.
pub const MAX_CHALLENGES: u32 = 5;
/// Interval between challenges to one source.
pub const CHALLENGE_INTERVAL: Duration = Duration::from_millis(100);
/// New sources a receiver validates at a time.
pub const MAX_SOURCES: usize = 4;
/// Transactions of our own remembered (answers to older ones are ignored).
const MAX_PENDING: usize = 16;

/// Which end of the direction this phone is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// A decision for the media engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathEvent {
    /// Sender: the direct path to this address is proven; send media there.
    UseDirect(SocketAddr),
    /// Sender: the direct path lost consent; send through the gateway again.
    UseGateway,
    /// Sender: the candidate never answered; the direction stays through the gateway.
    Failed,
    /// Receiver: this source proved it holds the key; accept its media.
    AcceptFrom(SocketAddr),
}

/// A datagram to send from the call's media socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendState {
    /// `sent` checks so far; the next at `next`.
    Checking { sent: u32, next: Instant },
    /// Proven; consent last answered at `fresh`, next consent check at `next`.
    Direct { fresh: Instant, next: Instant },
    /// Never proven or consent lost: nothing more is sent to the candidate.
    Done,
}

#[derive(Clone, Debug)]
struct Source {
    addr: SocketAddr,
    sent: u32,
    next: Instant,
    validated: bool,
}

/// One direction's checks (see the module docs).
#[derive(Debug)]
pub struct DirectPath {
    role: Role,
    username: String,
    key: Vec<u8>,
    peer: SocketAddr,
    state: SendState,
    sources: Vec<Source>,
    /// Our transactions: id, destination.
    pending: VecDeque<([u8; 12], SocketAddr)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PathEvent>,
    /// Checks sent to the candidate (before and after it was proven).
    pub checks_sent: u32,
    /// Valid checks answered.
    pub answered: u32,
    txid_seed: u64,
}

fn txid(seed: &mut u64) -> [u8; 12] {
    // splitmix64 over a random seed: unpredictable enough for transaction ids whose answers
    // must also carry MESSAGE-INTEGRITY under the key.
    let mut out = [0u8; 12];
    for chunk in out.chunks_mut(6) {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_be_bytes()[..6]);
    }
    out
}

fn request(username: &str, key: &[u8], id: &[u8; 12]) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut w = stun::Writer::new(&mut buf, stun::Class::Request, stun::BINDING, id).ok()?;
    w.attr(stun::attr::USERNAME, username.as_bytes()).ok()?;
    w.message_integrity(key).ok()?;
    w.fingerprint().ok()?;
    let n = w.finish();
    buf.get(..n).map(<[u8]>::to_vec)
}

fn response(key: &[u8], id: &[u8; 12], src: SocketAddr) -> Option<Vec<u8>> {
    let mut buf = [0u8; 128];
    let mut w = stun::Writer::new(&mut buf, stun::Class::Success, stun::BINDING, id).ok()?;
    w.xor_address(stun::attr::XOR_MAPPED_ADDRESS, src).ok()?;
    w.message_integrity(key).ok()?;
    w.fingerprint().ok()?;
    let n = w.finish();
    buf.get(..n).map(<[u8]>::to_vec)
}

impl DirectPath {
    /// A machine for one direction. `key` is the STUN key (the check key's hex text), `peer`
    /// the peer's candidate address, `seed` random (transaction ids).
    pub fn new(
        role: Role,
        username: String,
        key: Vec<u8>,
        peer: SocketAddr,
        now: Instant,
        seed: u64,
    ) -> DirectPath {
        DirectPath {
            role,
            username,
            key,
            peer,
            state: match role {
                Role::Sender => SendState::Checking { sent: 0, next: now },
                Role::Receiver => SendState::Done,
            },
            sources: Vec::new(),
            pending: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            checks_sent: 0,
            answered: 0,
            txid_seed: seed,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The candidate address (sender) or the peer's announced address (receiver).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether media may go direct now (sender).
    pub fn is_direct(&self) -> bool {
        matches!(self.state, SendState::Direct { .. })
    }

    /// Whether the source `from` is validated (receiver).
    pub fn accepts(&self, from: SocketAddr) -> bool {
        self.sources.iter().any(|s| s.validated && s.addr == from)
    }

    fn send_request(&mut self, to: SocketAddr) {
        let id = txid(&mut self.txid_seed);
        if let Some(data) = request(&self.username, &self.key, &id) {
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
            }
            self.pending.push_back((id, to));
            self.transmits.push_back(Transmit { to, data });
        }
    }

    /// Time passes: checks, consent and challenges that are due go out; time-outs fire.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            SendState::Checking { sent, next } if now >= next => {
                if sent >= MAX_CHECKS {
                    self.state = SendState::Done;
                    self.events.push_back(PathEvent::Failed);
                } else {
                    let peer = self.peer;
                    self.send_request(peer);
                    self.checks_sent += 1;
                    let wait = CHECK_SCHEDULE
                        .get(sent as usize)
                        .copied()
                        .unwrap_or(CHECK_TIMEOUT);
                    self.state = SendState::Checking {
                        sent: sent + 1,
                        next: now + wait,
                    };
                }
            }
            SendState::Direct { fresh, next } => {
                if now.saturating_duration_since(fresh) >= CONSENT_TIMEOUT {
                    self.state = SendState::Done;
                    self.events.push_back(PathEvent::UseGateway);
                } else if now >= next {
                    let peer = self.peer;
                    self.send_request(peer);
                    self.checks_sent += 1;
                    self.state = SendState::Direct {
                        fresh,
                        next: now + CONSENT_INTERVAL,
                    };
                }
            }
            _ => {}
        }
        let mut due = Vec::new();
        for s in &mut self.sources {
            if !s.validated && s.sent < MAX_CHALLENGES && now >= s.next {
                s.sent += 1;
                s.next = now + CHALLENGE_INTERVAL;
                due.push(s.addr);
            }
        }
        for a in due {
            self.send_request(a);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let own = match self.state {
            SendState::Checking { next, .. } => Some(next),
            SendState::Direct { fresh, next } => Some(next.min(fresh + CONSENT_TIMEOUT)),
            SendState::Done => None,
        };
        let challenges = self
            .sources
            .iter()
            .filter(|s| !s.validated && s.sent < MAX_CHALLENGES)
            .map(|s| s.next)
            .min();
        match (own, challenges) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// A STUN datagram from `from`. Returns whether it was this direction's (consumed).
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        let Ok(m) = stun::Message::parse(data) else {
            return false;
        };
        if m.method() != stun::BINDING {
            return false;
        }
        match m.class() {
            stun::Class::Request => {
                if m.username() != Some(self.username.as_bytes())
                    || m.check_integrity(&self.key).is_err()
                {
                    return false;
                }
                self.answered += 1;
                if let Some(data) = response(&self.key, m.transaction_id(), from) {
                    self.transmits.push_back(Transmit { to: from, data });
                }
                if self.role == Role::Receiver && !self.sources.iter().any(|s| s.addr == from) {
                    if self.sources.len() >= MAX_SOURCES {
                        // Forget the oldest source that never validated.
                        if let Some(i) = self.sources.iter().position(|s| !s.validated) {
                            self.sources.remove(i);
                        } else {
                            return true;
                        }
                    }
                    self.sources.push(Source {
                        addr: from,
                        sent: 0,
                        next: now,
                        validated: false,
                    });
                    self.handle_timeout(now);
                }
                true
            }
            stun::Class::Success => {
                let id = *m.transaction_id();
                let Some(i) = self.pending.iter().position(|(t, _)| *t == id) else {
                    return false;
                };
                if m.check_integrity(&self.key).is_err() {
                    return false;
                }
                let (_, to) = self.pending[i];
                if to != from {
                    // An answer must come from where the request went (the same 5-tuple).
                    return true;
                }
                self.pending.remove(i);
                if from == self.peer && self.role == Role::Sender {
                    match self.state {
                        SendState::Checking { .. } => {
                            self.state = SendState::Direct {
                                fresh: now,
                                next: now + CONSENT_INTERVAL,
                            };
                            self.events.push_back(PathEvent::UseDirect(from));
                        }
                        SendState::Direct { next, .. } => {
                            self.state = SendState::Direct { fresh: now, next };
                        }
                        SendState::Done => {}
                    }
                }
                if let Some(s) = self.sources.iter_mut().find(|s| s.addr == from)
                    && !s.validated
                {
                    s.validated = true;
                    self.events.push_back(PathEvent::AcceptFrom(from));
                }
                true
            }
            _ => false,
        }
    }
}

/// Consent freshness towards the gateway (see the module docs).
#[derive(Debug)]
pub struct Consent {
    gateway: SocketAddr,
    username: String,
    key: Vec<u8>,
    fresh: Instant,
    next: Instant,
    pending: VecDeque<[u8; 12]>,
    lost: bool,
    seed: u64,
    /// Requests sent.
    pub sent: u32,
    /// The mapped address in the gateway's last answer (a change means a NAT rebinding).
    pub mapped: Option<SocketAddr>,
}

impl Consent {
    pub fn new(gateway: SocketAddr, leg: &str, key: Vec<u8>, now: Instant, seed: u64) -> Consent {
        Consent {
            gateway,
            username: leg.to_owned(),
            key,
            fresh: now,
            next: now + GATEWAY_CONSENT_INTERVAL,
            pending: VecDeque::new(),
            lost: false,
            seed,
            sent: 0,
            mapped: None,
        }
    }

    /// Whether the path to the gateway lost consent (no answer for
    /// [`GATEWAY_CONSENT_TIMEOUT`]).
    pub fn lost(&self) -> bool {
        self.lost
    }

    pub fn poll_timeout(&self) -> Instant {
        if self.lost {
            self.next
        } else {
            self.next.min(self.fresh + GATEWAY_CONSENT_TIMEOUT)
        }
    }

    /// Due work: a request to send, if any.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Transmit> {
        if now.saturating_duration_since(self.fresh) >= GATEWAY_CONSENT_TIMEOUT {
            self.lost = true;
        }
        if now < self.next {
            return None;
        }
        self.next = now + GATEWAY_CONSENT_INTERVAL;
        let id = txid(&mut self.seed);
        let data = request(&self.username, &self.key, &id)?;
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(id);
        self.sent += 1;
        Some(Transmit {
            to: self.gateway,
            data,
        })
    }

    /// A keyed Binding request from the gateway (USERNAME = leg, leg key): the gateway's
    /// challenge before it moves the leg to a new source of ours (validated latching). The
    /// answer to send back from the same socket; `None` for anything else.
    pub fn answer(&self, from: SocketAddr, data: &[u8]) -> Option<Transmit> {
        if from != self.gateway {
            return None;
        }
        let m = stun::Message::parse(data).ok()?;
        if m.class() != stun::Class::Request
            || m.method() != stun::BINDING
            || m.username() != Some(self.username.as_bytes())
            || m.check_integrity(&self.key).is_err()
        {
            return None;
        }
        Some(Transmit {
            to: from,
            data: response(&self.key, m.transaction_id(), from)?,
        })
    }

    /// A datagram from `from`: whether it was a valid answer to one of our requests.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        if from != self.gateway {
            return false;
        }
        let Ok(m) = stun::Message::parse(data) else {
            return false;
        };
        if m.class() != stun::Class::Success || m.method() != stun::BINDING {
            return false;
        }
        let Some(i) = self.pending.iter().position(|t| t == m.transaction_id()) else {
            return false;
        };
        if m.check_integrity(&self.key).is_err() {
            return false;
        }
        self.pending.remove(i);
        self.fresh = now;
        self.lost = false;
        if let Ok(Some(a)) = m.xor_address(stun::attr::XOR_MAPPED_ADDRESS) {
            self.mapped = Some(a);
        }
        true
    }
}

/// RTP de-duplication by sequence number over the last 64 sequence numbers of one stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqWindow {
    top: Option<u16>,
    /// Bit i: `top - i` was seen.
    seen: u64,
}

impl SeqWindow {
    /// Whether `seq` is new (and records it). Packets older than the window count as new.
    pub fn fresh(&mut self, seq: u16) -> bool {
        let Some(top) = self.top else {
            self.top = Some(seq);
            self.seen = 1;
            return true;
        };
        let ahead = seq.wrapping_sub(top);
        if ahead != 0 && ahead < 0x8000 {
            self.seen = if ahead >= 64 { 0 } else { self.seen << ahead };
            self.seen |= 1;
            self.top = Some(seq);
            return true;
        }
        let back = top.wrapping_sub(seq);
        if back >= 64 {
            return true;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const KEY: &[u8] = b"00112233445566778899aabbccddeeff";
    const USER: &str = "vxc:7:forward";

    fn a(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Two phones and the network between them, on a virtual clock (quinn's `Pair`).
    struct Net {
        now: Instant,
        sender: DirectPath,
        receiver: DirectPath,
        /// Where each phone's datagrams appear to come from (NAT mapping).
        s_src: SocketAddr,
        r_addr: SocketAddr,
        /// Does the network carry sender→receiver / receiver→sender datagrams?
        up: bool,
        /// Everything the sender sent, by destination.
        sent_to: Vec<SocketAddr>,
        events_s: Vec<(Duration, PathEvent)>,
        events_r: Vec<(Duration, PathEvent)>,
        t0: Instant,
    }

    impl Net {
        fn new(key_r: &[u8]) -> Net {
            let now = Instant::now();
            let r_addr = a("203.0.113.2:40000");
            Net {
                now,
                sender: DirectPath::new(Role::Sender, USER.into(), KEY.to_vec(), r_addr, now, 1),
                receiver: DirectPath::new(
                    Role::Receiver,
                    USER.into(),
                    key_r.to_vec(),
                    a("198.51.100.1:40000"),
                    now,
                    2,
                ),
                s_src: a("198.51.100.9:61000"),
                r_addr,
                up: true,
                sent_to: Vec::new(),
                events_s: Vec::new(),
                events_r: Vec::new(),
                t0: now,
            }
        }

        /// Runs until `until` (relative to the start), delivering datagrams instantly.
        fn run(&mut self, until: Duration) {
            let end = self.t0 + until;
            loop {
                self.sender.handle_timeout(self.now);
                self.receiver.handle_timeout(self.now);
                let mut moved = true;
                while moved {
                    moved = false;
                    while let Some(t) = self.sender.poll_transmit() {
                        moved = true;
                        self.sent_to.push(t.to);
                        if self.up && t.to == self.r_addr {
                            self.receiver.handle_input(self.now, self.s_src, &t.data);
                        }
                    }
                    while let Some(t) = self.receiver.poll_transmit() {
                        moved = true;
                        if self.up && t.to == self.s_src {
                            self.sender.handle_input(self.now, self.r_addr, &t.data);
                        }
                    }
                }
                let at = self.now - self.t0;
                while let Some(e) = self.sender.poll_event() {
                    self.events_s.push((at, e));
                }
                while let Some(e) = self.receiver.poll_event() {
                    self.events_r.push((at, e));
                }
                let next = [self.sender.poll_timeout(), self.receiver.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                match next {
                    Some(n) if n <= end => self.now = n.max(self.now + MS),
                    _ => {
                        self.now = end;
                        return;
                    }
                }
            }
        }
    }

    #[test]
    fn a_successful_check_makes_the_direction_direct_and_the_source_accepted() {
        let mut n = Net::new(KEY);
        n.run(Duration::from_secs(1));
        assert_eq!(
            n.events_s[0],
            (Duration::ZERO, PathEvent::UseDirect(n.r_addr))
        );
        // The receiver validated the sender's (NATed) source with its own challenge.
        assert_eq!(
            n.events_r,
            [(Duration::ZERO, PathEvent::AcceptFrom(n.s_src))]
        );
        assert!(n.sender.is_direct() && n.receiver.accepts(n.s_src));
        assert!(!n.receiver.accepts(a("192.0.2.66:5")));
        // Consent keeps it direct: about 4 checks a second, all answered.
        n.run(Duration::from_secs(10));
        assert!(n.sender.is_direct());
        assert_eq!(n.events_s.len(), 1);
        assert!(
            (38..=42).contains(&n.sender.checks_sent),
            "{}",
            n.sender.checks_sent
        );
    }

    #[test]
    fn a_failed_check_keeps_the_direction_via_the_gateway() {
        let mut n = Net::new(b"ffffffffffffffffffffffffffffffff");
        n.run(Duration::from_secs(5));
        assert_eq!(n.events_s.len(), 1);
        assert_eq!(n.events_s[0].1, PathEvent::Failed);
        assert!(n.events_s[0].0 <= Duration::from_millis(2100));
        assert!(!n.sender.is_direct());
        assert!(n.events_r.is_empty(), "a wrong key validates nothing");
        assert!(!n.receiver.accepts(n.s_src));
    }

    /// A `dial` that announces a third party's address: that address gets at most
    /// MAX_CHECKS small datagrams, never faster than one per 50 ms, and nothing after.
    #[test]
    fn a_third_party_candidate_gets_a_bounded_rate_limited_number_of_checks() {
        let mut n = Net::new(KEY);
        n.up = false; // the victim never answers (it has no key)
        let mut times = Vec::new();
        for ms in (0..60_000).step_by(10) {
            let before = n.sent_to.len();
            n.run(Duration::from_millis(ms));
            if n.sent_to.len() > before {
                times.push(ms);
            }
        }
        assert_eq!(n.sent_to.len() as u32, MAX_CHECKS);
        assert!(n.sent_to.iter().all(|t| *t == n.r_addr));
        assert!(times.windows(2).all(|w| w[1] - w[0] >= 50), "{times:?}");
        assert_eq!(MAX_CHECKS, 7);
    }

    /// Consent loss on a direct path: the sender falls back to the gateway within
    /// CONSENT_TIMEOUT (+ one consent interval) of the cut, well inside the 2 s target.
    #[test]
    fn consent_loss_falls_back_within_the_bound() {
        let mut n = Net::new(KEY);
        n.run(Duration::from_secs(3));
        assert!(n.sender.is_direct());
        n.up = false;
        let cut = n.now - n.t0;
        n.run(Duration::from_secs(10));
        let (at, e) = n.events_s[1];
        assert_eq!(e, PathEvent::UseGateway);
        let lost = at - cut;
        assert!(lost <= CONSENT_TIMEOUT, "{lost:?}");
        assert!(lost <= Duration::from_secs(2));
        assert!(!n.sender.is_direct());
        // Nothing more is sent to the dead path.
        let sent = n.sent_to.len();
        n.run(Duration::from_secs(30));
        assert_eq!(n.sent_to.len(), sent);
    }

    /// A check captured and replayed from another address is answered (to that address, no
    /// bigger than the request), but media from there is accepted only once a challenge sent
    /// there is answered with the key, which the attacker does not have.
    #[test]
    fn a_replayed_check_from_another_address_is_not_accepted() {
        let now = Instant::now();
        let mut r = DirectPath::new(
            Role::Receiver,
            USER.into(),
            KEY.to_vec(),
            a("198.51.100.1:40000"),
            now,
            3,
        );
        let check = request(USER, KEY, &[7; 12]).unwrap_or_default();
        let evil = a("192.0.2.66:9");
        assert!(r.handle_input(now, evil, &check));
        let mut out = Vec::new();
        let mut t = now;
        for _ in 0..100 {
            r.handle_timeout(t);
            while let Some(x) = r.poll_transmit() {
                assert_eq!(x.to, evil);
                assert!(x.data.len() <= check.len() + 12);
                out.push(x);
            }
            t += 10 * MS;
        }
        // One answer plus at most MAX_CHALLENGES challenges.
        assert!(out.len() as u32 <= 1 + MAX_CHALLENGES);
        assert!(!r.accepts(evil));
        assert_eq!(r.poll_event(), None);
        // A forged answer without the key does not validate it either.
        let forged = response(b"not the key", &[7; 12], evil).unwrap_or_default();
        assert!(!r.handle_input(t, evil, &forged));
        assert!(!r.accepts(evil));
    }

    #[test]
    fn gateway_consent_expires_and_recovers() {
        let t0 = Instant::now();
        let gw = a("192.0.2.1:7401");
        let mut c = Consent::new(gw, "leg1", KEY.to_vec(), t0, 9);
        let mut t = t0;
        let mut answered = 0;
        // Answered for 3 s.
        while t < t0 + Duration::from_secs(3) {
            if let Some(x) = c.handle_timeout(t) {
                let m = stun::Message::parse(&x.data).expect("a request");
                let resp =
                    response(KEY, m.transaction_id(), a("198.51.100.9:61000")).unwrap_or_default();
                assert!(c.handle_input(t, gw, &resp));
                answered += 1;
            }
            t = c.poll_timeout().max(t + MS);
        }
        assert!(!c.lost() && answered >= 5);
        assert_eq!(c.mapped, Some(a("198.51.100.9:61000")));
        // Silent from here: lost within GATEWAY_CONSENT_TIMEOUT.
        let silent = t;
        while !c.lost() {
            let _ = c.handle_timeout(t);
            t = c.poll_timeout().max(t + MS);
        }
        assert!(t - silent <= GATEWAY_CONSENT_TIMEOUT + GATEWAY_CONSENT_INTERVAL);
        // Answers from elsewhere or without the key do not count.
        let x = loop {
            if let Some(x) = c.handle_timeout(t) {
                break x;
            }
            t += 10 * MS;
        };
        let id = *stun::Message::parse(&x.data)
            .expect("request")
            .transaction_id();
        let resp = response(KEY, &id, a("198.51.100.9:61000")).unwrap_or_default();
        assert!(!c.handle_input(t, a("192.0.2.99:7401"), &resp));
        assert!(!c.handle_input(t, gw, &response(b"x", &id, gw).unwrap_or_default()));
        assert!(c.lost());
        assert!(c.handle_input(t, gw, &resp));
        assert!(!c.lost());
    }

    /// The gateway's challenge (before it re-latches a new source of ours) is answered with
    /// the leg key; a request without the key, or from elsewhere, is not.
    #[test]
    fn the_gateways_challenge_is_answered_with_the_leg_key() {
        let gw = a("192.0.2.1:7401");
        let c = Consent::new(gw, "leg1", KEY.to_vec(), Instant::now(), 1);
        let req = request("leg1", KEY, &[4; 12]).unwrap_or_default();
        let t = c.answer(gw, &req).expect("answered");
        assert_eq!(t.to, gw);
        assert_eq!(
            crate::client::binding::check_response(&t.data, KEY, &[4; 12]),
            Ok(gw)
        );
        assert!(c.answer(a("192.0.2.9:7401"), &req).is_none());
        let bad = request("leg1", b"wrong", &[4; 12]).unwrap_or_default();
        assert!(c.answer(gw, &bad).is_none());
        let other = request("leg2", KEY, &[4; 12]).unwrap_or_default();
        assert!(c.answer(gw, &other).is_none());
    }

    #[test]
    fn seq_window_drops_duplicates_only() {
        let mut w = SeqWindow::default();
        assert!(w.fresh(65530));
        assert!(w.fresh(65531));
        assert!(!w.fresh(65531));
        assert!(w.fresh(2)); // wraps
        assert!(w.fresh(65533)); // late, not seen
        assert!(!w.fresh(65533));
        assert!(!w.fresh(2));
        assert!(w.fresh(500));
        assert!(w.fresh(2)); // older than the window: counted as new
    }

    /// Two phones' [`CallPaths`], built from the gateway's instructions with sealed keys as the
    /// gateway seals them, on a virtual clock: the checks open the direct path both ways (with
    /// the overlap), a cut makes both fall back within the consent bound, and a key sealed for
    /// another phone opens nothing.
    #[test]
    fn call_paths_from_sealed_instructions_go_direct_and_fall_back() {
        use crate::control::auth::SessionKey;
        use crate::control::paths::{CheckKey, check_username, seal};
        use crate::wire::control::{
            DirectCandidate, MediaInstructions, MediaRecv, MediaSend, Path, PathOrder, PathOrders,
        };
        let (ka, kb) = (
            SessionKey::from_bytes([1; 32]),
            SessionKey::from_bytes([2; 32]),
        );
        let (aa, ab) = (a("198.51.100.1:4000"), a("203.0.113.2:4000"));
        let gw = a("192.0.2.1:7401");
        let keys = [CheckKey([5; 16]), CheckKey([6; 16])];
        let instr = |caller: bool, me: &SessionKey, peer: SocketAddr| {
            let cand = |forward: bool| DirectCandidate {
                peer,
                username: check_username(9, forward),
                key: seal(me, 9, forward, [3; 16], &keys[usize::from(!forward)]),
            };
            let order = vec![Path::DirectUdp, Path::UdpViaGateway, Path::TcpBoth];
            MediaInstructions {
                call_key: false,
                call: 9,
                plan: None,
                caller,
                send: MediaSend {
                    transport: crate::metrics::Transport::Udp,
                    to: Some(gw),
                    via_gateway: true,
                },
                recv: MediaRecv {
                    transport: crate::metrics::Transport::Udp,
                    via_gateway: true,
                    from: Some(gw),
                },
                leg: Some(format!("leg{caller}")),
                gateway_udp: Some(gw),
                gateway_tcp: None,
                gateway_tcp_tls: false,
                payload_type: 0,
                clock_rate: 8000,
                paths: Some(Box::new(PathOrders {
                    send: PathOrder {
                        now: Path::UdpViaGateway,
                        order: order.clone(),
                        direct: Some(cand(caller)),
                    },
                    recv: PathOrder {
                        now: Path::UdpViaGateway,
                        order,
                        direct: Some(cand(!caller)),
                    },
                })),
            }
        };
        let t0 = Instant::now();
        let mut pa = CallPaths::new(&instr(true, &ka, ab), &ka, None, None, t0, 11);
        let mut pb = CallPaths::new(&instr(false, &kb, aa), &kb, None, None, t0, 12);
        let mut now = t0;
        let mut up = true;
        let step = |pa: &mut CallPaths, pb: &mut CallPaths, now: Instant, up: bool| {
            let mut qa = pa.handle_timeout(now);
            let mut qb = pb.handle_timeout(now);
            while !qa.is_empty() || !qb.is_empty() {
                let mut na = Vec::new();
                let mut nb = Vec::new();
                for t in qa.drain(..) {
                    if up && t.to == ab {
                        nb.extend(pb.handle_input(now, aa, &t.data).1);
                    }
                }
                for t in qb.drain(..) {
                    if up && t.to == aa {
                        na.extend(pa.handle_input(now, ab, &t.data).1);
                    }
                }
                qa = na;
                qb = nb;
            }
        };
        while now < t0 + Duration::from_millis(100) {
            step(&mut pa, &mut pb, now, up);
            now += 10 * MS;
        }
        for (who, p, peer) in [("a", &pa, ab), ("b", &pb, aa)] {
            assert_eq!(p.send_targets(now).0, Some(peer), "{who} direct");
            assert!(p.send_targets(now).1, "{who}: still overlapping");
            assert!(
                p.accepts(if who == "a" { ab } else { aa }),
                "{who} validated its peer"
            );
        }
        while now < t0 + Duration::from_millis(500) {
            step(&mut pa, &mut pb, now, up);
            now += 10 * MS;
        }
        assert_eq!(pa.send_targets(now), (Some(ab), false), "overlap over");
        up = false;
        let cut = now;
        while pa.send_targets(now).0.is_some() || pb.send_targets(now).0.is_some() {
            step(&mut pa, &mut pb, now, up);
            now += 10 * MS;
            assert!(now - cut <= CONSENT_TIMEOUT + 20 * MS, "fell back in time");
        }
        assert_eq!(pa.send_targets(now), (None, true));
        assert_eq!((pa.report.fallbacks, pb.report.fallbacks), (1, 1));
        // A key sealed for b does not open for a: no candidate at all.
        let stolen = CallPaths::new(&instr(false, &kb, aa), &ka, None, None, t0, 13);
        assert!(!stolen.report.send_candidate);
        assert_eq!(stolen.poll_timeout(), None);
    }

    proptest::proptest! {
        /// Within any run of distinct sequence numbers spanning less than 64, a repeat is
        /// always recognised and a new one never dropped.
        #[test]
        fn seq_window_is_exact_within_its_span(start in proptest::num::u16::ANY, steps in proptest::collection::vec(0u16..60, 1..200)) {
            let mut w = SeqWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut top = start;
            proptest::prop_assert!(w.fresh(start));
            seen.insert(start);
            for d in steps {
                // Mostly forward, sometimes a late or repeated packet within the window.
                let seq = if d % 3 == 0 { top.wrapping_sub(d / 3) } else { top.wrapping_add(d % 5) };
                if seq.wrapping_sub(top) < 0x8000 { top = seq; }
                let fresh = w.fresh(seq);
                if top.wrapping_sub(seq) < 64 {
                    proptest::prop_assert_eq!(fresh, seen.insert(seq), "seq {}", seq);
                }
            }
        }
    }

    proptest::proptest! {
        /// Arbitrary datagrams never panic and never validate a source or make a path direct.
        #[test]
        fn garbage_is_harmless(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let now = Instant::now();
            let mut s = DirectPath::new(Role::Sender, USER.into(), KEY.to_vec(), a("203.0.113.2:4"), now, 1);
            let mut r = DirectPath::new(Role::Receiver, USER.into(), KEY.to_vec(), a("203.0.113.3:4"), now, 2);
            s.handle_input(now, a("203.0.113.2:4"), &data);
            r.handle_input(now, a("203.0.113.2:4"), &data);
            proptest::prop_assert!(!s.is_direct());
            proptest::prop_assert!(!r.accepts(a("203.0.113.2:4")));
            let gw = a("192.0.2.1:7401");
            let mut c = Consent::new(gw, "leg1", KEY.to_vec(), now, 3);
            proptest::prop_assert!(!c.handle_input(now, gw, &data));
            proptest::prop_assert!(c.answer(gw, &data).is_none());
            proptest::prop_assert_eq!(c.mapped, None);
        }
    }
}

// ---------------------------------------------------------------- one call's paths

/// How long a sender that just went direct keeps sending through the gateway as well (the
/// receiver de-duplicates), so that the switch loses nothing while the receiver validates the
/// new source.
pub const OVERLAP: Duration = Duration::from_millis(300);

/// What the phone's paths did, for the report (`voxgate phone --json`: `paths`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PathsReport {
    /// The sending direction was a direct candidate.
    pub send_candidate: bool,
    /// Sending direct at the end.
    pub send_direct: bool,
    /// When the sending direction first went direct, ms after the engine started.
    pub went_direct_ms: Option<f64>,
    /// Times a direct path lost consent and the direction fell back to the gateway.
    pub fallbacks: u32,
    /// The candidate never answered (the direction stayed through the gateway).
    pub direct_failed: bool,
    /// Checks sent to the candidate (proving and consent).
    pub checks_sent: u32,
    /// Media packets sent on the direct path.
    pub direct_packets: u64,
    /// The receiving direction's direct source, once validated.
    pub accepted_direct_from: Option<SocketAddr>,
    /// Consent requests to the gateway, and whether consent was lost at some point.
    pub gateway_checks: u32,
    pub gateway_consent_lost: bool,
    /// Times the gateway's answers showed a new mapped address for this phone (a NAT
    /// re-created its mapping): the consent request itself re-bound the leg there.
    pub nat_rebinds: u32,
}

/// A call's proven paths: the two directions' machines and gateway consent, with what the
/// media engine needs to know (where to send, whom to accept). Sans-IO.
#[derive(Debug)]
pub struct CallPaths {
    send: Option<DirectPath>,
    recv: Option<DirectPath>,
    consent: Option<Consent>,
    direct_to: Option<SocketAddr>,
    overlap_until: Option<Instant>,
    started: Instant,
    pub report: PathsReport,
}

impl CallPaths {
    /// From the gateway's instructions. `gateway_udp` is the gateway's UDP media address when
    /// this phone receives UDP from it (then consent towards it can be checked: the answers can
    /// arrive); `leg_key` the leg's STUN key. Sealed check keys that do not open are ignored
    /// (the direction stays through the gateway) with a warning.
    pub fn new(
        i: &crate::wire::control::MediaInstructions,
        session: &crate::control::auth::SessionKey,
        gateway_udp: Option<SocketAddr>,
        leg_key: Option<Vec<u8>>,
        now: Instant,
        seed: u64,
    ) -> CallPaths {
        use crate::control::paths::open;
        let mut seed = seed;
        let mut machine =
            |role: Role, forward: bool, c: &crate::wire::control::DirectCandidate| match open(
                session, i.call, forward, &c.key,
            ) {
                Ok(k) => {
                    seed = seed.wrapping_add(0x51_7CC1_B727_220A);
                    Some(DirectPath::new(
                        role,
                        c.username.clone(),
                        k.stun_key(),
                        crate::client::canonical(c.peer),
                        now,
                        seed,
                    ))
                }
                Err(e) => {
                    tracing::warn!(call = i.call, "ignoring a direct candidate: {e}");
                    None
                }
            };
        let (send, recv) = match &i.paths {
            Some(p) => (
                p.send
                    .direct
                    .as_ref()
                    .and_then(|c| machine(Role::Sender, i.caller, c)),
                p.recv
                    .direct
                    .as_ref()
                    .and_then(|c| machine(Role::Receiver, !i.caller, c)),
            ),
            None => (None, None),
        };
        let consent = match (gateway_udp, &i.leg, leg_key) {
            (Some(gw), Some(leg), Some(k)) => Some(Consent::new(gw, leg, k, now, seed ^ 0xC0)),
            _ => None,
        };
        CallPaths {
            report: PathsReport {
                send_candidate: send.is_some(),
                ..PathsReport::default()
            },
            send,
            recv,
            consent,
            direct_to: None,
            overlap_until: None,
            started: now,
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.send.as_ref().and_then(DirectPath::poll_timeout),
            self.recv.as_ref().and_then(DirectPath::poll_timeout),
            self.consent.as_ref().map(Consent::poll_timeout),
            self.overlap_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Due work; the datagrams to send now.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Transmit> {
        let mut out = Vec::new();
        if self.overlap_until.is_some_and(|t| now >= t) {
            self.overlap_until = None;
        }
        for m in [&mut self.send, &mut self.recv].into_iter().flatten() {
            m.handle_timeout(now);
        }
        if let Some(c) = &mut self.consent {
            let was = c.lost();
            if let Some(t) = c.handle_timeout(now) {
                out.push(t);
            }
            if c.lost() && !was {
                tracing::warn!("the UDP path to the gateway lost consent (no answer for 2 s)");
                self.report.gateway_consent_lost = true;
            }
            self.report.gateway_checks = c.sent;
        }
        self.collect(now, &mut out);
        out
    }

    /// A STUN datagram from `from`: whether it belonged to the paths; answers go out in the
    /// returned datagrams.
    pub fn handle_input(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> (bool, Vec<Transmit>) {
        let mut out = Vec::new();
        let before = self.consent.as_ref().and_then(|c| c.mapped);
        let mut used = self
            .consent
            .as_mut()
            .is_some_and(|c| c.handle_input(now, from, data));
        let after = self.consent.as_ref().and_then(|c| c.mapped);
        if let (Some(b), Some(a)) = (before, after)
            && a != b
        {
            tracing::info!(
                "the gateway now sees this phone at {a} (was {b}): NAT mapping changed, leg re-bound"
            );
            self.report.nat_rebinds += 1;
        }
        if !used && let Some(t) = self.consent.as_ref().and_then(|c| c.answer(from, data)) {
            out.push(t);
            used = true;
        }
        for m in [&mut self.send, &mut self.recv].into_iter().flatten() {
            if !used {
                used = m.handle_input(now, from, data);
            }
        }
        self.collect(now, &mut out);
        (used, out)
    }

    fn collect(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        if let Some(m) = &mut self.send {
            while let Some(t) = m.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = m.poll_event() {
                match e {
                    PathEvent::UseDirect(to) => {
                        tracing::info!("direct path to {to} proven: sending direct");
                        self.direct_to = Some(to);
                        self.overlap_until = Some(now + OVERLAP);
                        self.report.went_direct_ms.get_or_insert(
                            now.saturating_duration_since(self.started).as_secs_f64() * 1000.0,
                        );
                    }
                    PathEvent::UseGateway => {
                        tracing::warn!(
                            "the direct path lost consent: sending through the gateway again"
                        );
                        self.direct_to = None;
                        self.overlap_until = None;
                        self.report.fallbacks += 1;
                    }
                    PathEvent::Failed => {
                        tracing::info!(
                            "the direct candidate {} never answered: staying through the gateway",
                            m.peer()
                        );
                        self.report.direct_failed = true;
                    }
                    PathEvent::AcceptFrom(_) => {}
                }
            }
            self.report.checks_sent = m.checks_sent;
        }
        if let Some(m) = &mut self.recv {
            while let Some(t) = m.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = m.poll_event() {
                if let PathEvent::AcceptFrom(a) = e {
                    tracing::info!("direct media source {a} validated: accepting its media");
                    self.report.accepted_direct_from = Some(a);
                }
            }
        }
        self.report.send_direct = self.direct_to.is_some();
    }

    /// Where media goes now: the direct address (when proven) and whether the gateway route
    /// gets a copy too (during the switch's overlap, or when not direct).
    pub fn send_targets(&self, now: Instant) -> (Option<SocketAddr>, bool) {
        match self.direct_to {
            Some(d) => (Some(d), self.overlap_until.is_some_and(|t| now < t)),
            None => (None, true),
        }
    }

    /// Counts a media packet sent direct.
    pub fn sent_direct(&mut self) {
        self.report.direct_packets += 1;
    }

    /// Whether media from `from` is accepted as the peer's validated direct source.
    pub fn accepts(&self, from: SocketAddr) -> bool {
        self.recv.as_ref().is_some_and(|m| m.accepts(from))
    }

    /// Whether consent towards the gateway is lost now.
    pub fn gateway_lost(&self) -> bool {
        self.consent.as_ref().is_some_and(Consent::lost)
    }
}
