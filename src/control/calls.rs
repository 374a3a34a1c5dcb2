//! Calls by number, telephone routes and conference rooms: the seed's "Initiating Telephony
//! Connection" and "Conference Calls", with Table 1 made real through [`super::media`].
//!
//! # Two-party calls
//!
//! ```text
//!  caller                 gateway                         callee
//!  dial{tag,number,media} ──▶ calling{tag,call} ◀──
//!                           incoming{call,from…} ──────────▶
//!         ◀── ringing{call}
//!                           ◀────────────────── accept{call,media}
//!                   plan (both probe results) → InstallSession{op} → ShardInstalled{op,Ok}
//!         ◀── media{…}      media{…} ──────────────────────▶
//! ```
//!
//! - Every `dial` gets `calling{tag, call}` first, so that a `hang_up` that follows at once
//!   (busy, offline, not found, draining…) names a call the client can match to its tag.
//! - No call waiting: a client that takes part in any call (ringing, up, or a room) is busy to
//!   new incoming calls. A client may itself place up to `max_calls_per_user` calls (the seed's
//!   conference as "each connection from one client to another acts as a separate call").
//!   Dialling one's own number is busy.
//! - The callee is alerted at once; planning needs both parties' probe results and waits for
//!   a probe that is still running (bounded by the probe timeout).
//! - A plan that needs no gateway in either direction (case 16 without NAT) installs nothing:
//!   both sides get `media` at once.
//! - A callee's `hang_up` while ringing is a rejection (`hang_up{rejected}` to the caller); the
//!   caller's `hang_up` while ringing withdraws the call (`hang_up{normal}` to the callee).
//! - A client with no (usable) media address for a call has no UDP socket for it: it is planned
//!   as TCP-only ([`super::media::effective_caps`]).
//!
//! # Telephone routes
//!
//! A number that is not a registered user's but has a route (longest prefix) is answered at
//! once (no ringing). The caller's side always goes through the gateway
//! ([`super::media::route_plan`]); the route's leg delivers UDP to the IP voice gateway's media
//! address and trusts it as its source. Because the relay binds that address to one leg, a
//! route media address carries **one call at a time**: a second call to it gets
//! `hang_up{busy}` (an IP voice gateway that gives each call its own media port needs a richer
//! route model).
//!
//! # Conference rooms
//!
//! `conference{tag, numbers, media}` opens a room: one call id, one relay session that fans
//! each member's media out to all others. Invitees get `incoming{conference: true}`; the
//! organizer gets `calling` and `ringing` (or `hang_up` with the first failure's reason when
//! nobody could be invited: per-number failures are otherwise not reported, the protocol has no
//! message for them). Numbers must be registered users; telephone numbers are not invited
//! (dial them as separate calls). The session is installed once two members are ready (accepted
//! and probed); later members join with [`Action::AddLeg`]. Everybody goes through the gateway
//! ([`super::media::room_directions`]). A member's hang-up, rejection, disconnection or
//! unanswered invitation removes it ([`Action::RemoveLeg`]); the room ends when fewer than two
//! members (invited or joined) remain.
//!
//! # Media trouble
//!
//! `media_trouble{call}` re-probes the parties (both, or the one member in a room). When the
//! results are in: a failed probe (no report) or an unchanged plan ends the call with
//! `hang_up{media_failed}` to both, never leaving one side believing the call is up; a changed
//! plan replaces the relay session (new legs) and sends fresh `media` to both.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::auth::SessionKey;
use super::gateway::{Action, ConnId, Gateway, Phase, Timer, later};
use super::media::{
    self, GatewayAddrs, PeerRefused, check_peer, delivery_for, directions, effective_caps,
    needs_leg, recv_for, resolve_media, room_directions, route_plan, send_for,
};
use super::planner::{self, Capabilities, Path, Plan};
use super::probe::ProbeOutcome;
use crate::shard::relay::canonical;
use crate::shard::{Delivery, LegSpec, SessionSpec};
use crate::store::{self, Route};
use crate::wire::control::{CallId, ErrorCode, HangupReason, MediaInstructions, ServerMsg};

/// Why a client's calls end when it goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Disconnected, timed out, replaced: the peers get `hang_up{peer_lost}`.
    PeerLost,
    /// Logged out (`bye`) or gateway shutdown: `hang_up{normal}`.
    Normal,
}

impl Lost {
    fn reason(self) -> HangupReason {
        match self {
            Lost::PeerLost => HangupReason::PeerLost,
            Lost::Normal => HangupReason::Normal,
        }
    }
}

pub(crate) enum Call {
    Pair(Pair),
    Room(Room),
}

/// The far end of a two-party call.
#[derive(Clone, Debug)]
pub(crate) enum Far {
    User(ConnId),
    Route(Route),
}

/// A relay session on a shard.
#[derive(Clone, Debug)]
pub(crate) struct Relay {
    pub shard: usize,
    /// Leg names (two-party calls; a room keeps them per member).
    pub legs: Vec<String>,
    /// The install not yet confirmed.
    pub op: Option<u64>,
}

pub(crate) enum PairState {
    Ringing,
    /// Answered; waiting for probe results.
    Planning,
    /// Waiting for the shard; this media goes out when it confirms.
    Installing {
        media: Vec<(ConnId, MediaInstructions)>,
    },
    Up,
    /// After `media_trouble`: waiting for the (caller's, callee's) probe.
    Replanning {
        waiting: [bool; 2],
    },
}

pub(crate) struct Pair {
    pub caller: ConnId,
    pub callee: Far,
    /// Media addresses as reported (from `dial` and `accept`).
    pub caller_media: Option<SocketAddr>,
    pub callee_media: Option<SocketAddr>,
    pub state: PairState,
    pub relay: Option<Relay>,
    /// The plan in force.
    pub plan: Option<Plan>,
}

impl Pair {
    pub fn is_up(&self) -> bool {
        matches!(self.state, PairState::Up | PairState::Replanning { .. })
    }

    fn callee_conn(&self) -> Option<ConnId> {
        match self.callee {
            Far::User(c) => Some(c),
            Far::Route(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemberState {
    Invited,
    /// Accepted (or the organizer): joins once probed and once there is someone to talk to.
    Ready,
    /// Its leg is being installed with the session; media goes out when the shard confirms.
    Joining,
    Joined,
    /// After `media_trouble`: waiting for its probe.
    Reprobing,
}

pub(crate) struct Member {
    pub media: Option<SocketAddr>,
    pub state: MemberState,
    pub leg: Option<String>,
    /// The media instructions sent (or to send) and the leg's delivery.
    pub joined: Option<(MediaInstructions, Delivery)>,
}

pub(crate) struct Room {
    pub organizer: ConnId,
    pub members: BTreeMap<ConnId, Member>,
    pub relay: Option<Relay>,
}

/// What planning needs about one client.
struct PartyInfo {
    caps: Capabilities,
    reported: bool,
    observed: IpAddr,
    gateway_ip: IpAddr,
    key: SessionKey,
}

/// Where a dialled number leads.
enum Dest {
    User(ConnId),
    Route(Route),
}

/// One side of a two-party call, ready to be named and built.
struct SidePlan {
    conn: ConnId,
    caller: bool,
    out: Path,
    inn: Path,
    peer: Option<SocketAddr>,
    gateway_ip: IpAddr,
    key: SessionKey,
    /// `Some` iff the side has a leg.
    delivery: Option<Delivery>,
}

/// Why a call's media cannot be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum SetupError {
    #[error("{0}")]
    Peer(#[from] PeerRefused),
    #[error("no shard to relay media")]
    NoShard,
}

struct PairInputs {
    plan: Plan,
    caller: (ConnId, PartyInfo, Option<SocketAddr>),
    callee: Option<(ConnId, PartyInfo, Option<SocketAddr>)>,
    far: Far,
}

struct PairSetup {
    plan: Plan,
    relay: Option<(usize, Vec<LegSpec>)>,
    media: Vec<(ConnId, MediaInstructions)>,
}

fn instructions(
    call: CallId,
    plan: Option<Plan>,
    caller: bool,
    out: Path,
    inn: Path,
    peer: Option<SocketAddr>,
    gw: Option<GatewayAddrs>,
    leg: Option<String>,
) -> MediaInstructions {
    let gw = leg.as_ref().and(gw);
    MediaInstructions {
        call,
        plan,
        caller,
        send: send_for(out, peer, gw),
        recv: recv_for(inn, peer, gw),
        leg,
        gateway_udp: gw.map(|g| g.udp),
        gateway_tcp: gw.map(|g| g.tcp),
        payload_type: media::PAYLOAD_TYPE,
        clock_rate: media::CLOCK_RATE,
    }
}

impl Gateway {
    // ------------------------------------------------------------------ lookups

    /// A logged-in client's probe result, unless a probe is running (or none has finished).
    fn party_info(&self, conn: ConnId) -> Option<PartyInfo> {
        let c = self.conns.get(&conn)?;
        let Phase::LoggedIn(s) = &c.phase else {
            return None;
        };
        if s.probe.is_some() {
            return None;
        }
        let r = s.result?;
        Some(PartyInfo {
            caps: r.capabilities,
            reported: r.reported,
            observed: c.peer.ip(),
            gateway_ip: c.local.ip(),
            key: s.key.clone(),
        })
    }

    fn is_busy(&self, conn: ConnId) -> bool {
        self.session(conn).is_none_or(|s| !s.calls.is_empty())
    }

    fn lookup(&self, me: &str, number: &str) -> Result<Dest, HangupReason> {
        if store::validate_number(number).is_err() {
            return Err(HangupReason::NotFound);
        }
        match self.store.user_by_number(number) {
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                Err(HangupReason::Error)
            }
            Ok(Some(sub)) => {
                if sub.user == me {
                    return Err(HangupReason::Busy);
                }
                let Some(&conn) = self.users.get(&sub.user) else {
                    return Err(HangupReason::Offline);
                };
                if self.is_busy(conn) {
                    return Err(HangupReason::Busy);
                }
                Ok(Dest::User(conn))
            }
            Ok(None) => match self.store.route_for(number) {
                Err(e) => {
                    tracing::error!(error = %e, "store route lookup failed");
                    Err(HangupReason::Error)
                }
                Ok(None) => Err(HangupReason::NotFound),
                Ok(Some(route)) => Ok(Dest::Route(route)),
            },
        }
    }

    fn hang_up_msg(&mut self, conn: ConnId, call: CallId, reason: HangupReason) {
        self.send(conn, ServerMsg::HangUp { call, reason });
    }

    /// Takes a call off a client's list and tells it why (when it is still logged in).
    fn detach(&mut self, conn: ConnId, call: CallId, reason: Option<HangupReason>) {
        if let Some(s) = self.session_mut(conn) {
            s.calls.remove(&call);
            if let Some(reason) = reason {
                self.hang_up_msg(conn, call, reason);
            }
        }
    }

    /// Removes a relay session from its shard.
    fn drop_relay(&mut self, call: CallId, relay: Relay) {
        self.actions.push_back(Action::RemoveSession {
            shard: relay.shard,
            session: call,
        });
        self.forget_relay(relay);
    }

    /// Forgets a relay session the shard does not hold (its install failed).
    fn forget_relay(&mut self, relay: Relay) {
        if let Some(op) = relay.op {
            self.ops.remove(&op);
        }
        if let Some(load) = self.shard_load.get_mut(relay.shard) {
            *load = load.saturating_sub(1);
        }
        for leg in &relay.legs {
            self.release_leg(leg);
        }
    }

    /// Registers an install: the op, the shard's load.
    fn start_install(&mut self, call: CallId, shard: usize, legs: Vec<LegSpec>) -> Relay {
        let op = self.new_op();
        self.ops.insert(op, call);
        if let Some(load) = self.shard_load.get_mut(shard) {
            *load += 1;
        }
        let names = legs.iter().map(|l| l.name.clone()).collect();
        self.actions.push_back(Action::InstallSession {
            op,
            shard,
            spec: SessionSpec { id: call, legs },
        });
        Relay {
            shard,
            legs: names,
            op: Some(op),
        }
    }

    fn gateway_addrs(&self, shard: usize, ip: IpAddr) -> Option<GatewayAddrs> {
        let s = self.shards.get(shard)?;
        Some(GatewayAddrs::new(ip, s.udp_port, s.tcp_port))
    }

    // ---------------------------------------------------------------- messages

    pub(crate) fn on_dial(
        &mut self,
        now: Instant,
        conn: ConnId,
        tag: u32,
        number: &str,
        media: Option<SocketAddr>,
    ) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let (me, ncalls) = (s.user.clone(), s.calls.len());
        let id = self.new_call_id();
        self.send(conn, ServerMsg::Calling { tag, call: id });
        if self.draining {
            return self.hang_up_msg(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            tracing::info!(conn, user = %me, "dial refused: too many calls at once");
            return self.hang_up_msg(conn, id, HangupReason::Error);
        }
        let dest = match self.lookup(&me, number) {
            Ok(d) => d,
            Err(reason) => return self.hang_up_msg(conn, id, reason),
        };
        self.counters.calls_placed += 1;
        match dest {
            Dest::User(callee) => {
                let (from_number, from_user) = match self.session(conn) {
                    Some(s) => (s.number.clone(), s.user.clone()),
                    None => return,
                };
                self.calls.insert(
                    id,
                    Call::Pair(Pair {
                        caller: conn,
                        callee: Far::User(callee),
                        caller_media: media,
                        callee_media: None,
                        state: PairState::Ringing,
                        relay: None,
                        plan: None,
                    }),
                );
                for c in [conn, callee] {
                    if let Some(s) = self.session_mut(c) {
                        s.calls.insert(id);
                    }
                }
                self.timers
                    .set(Timer::Call(id), later(now, self.cfg.ring_timeout));
                self.send(
                    callee,
                    ServerMsg::Incoming {
                        call: id,
                        from_number,
                        from_user,
                        conference: false,
                    },
                );
                self.send(conn, ServerMsg::Ringing { call: id });
            }
            Dest::Route(route) => {
                let addr = canonical(route.media_addr);
                if self.route_busy.contains_key(&addr) {
                    return self.hang_up_msg(conn, id, HangupReason::Busy);
                }
                self.route_busy.insert(addr, id);
                self.calls.insert(
                    id,
                    Call::Pair(Pair {
                        caller: conn,
                        callee: Far::Route(route),
                        caller_media: media,
                        callee_media: None,
                        state: PairState::Planning,
                        relay: None,
                        plan: None,
                    }),
                );
                if let Some(s) = self.session_mut(conn) {
                    s.calls.insert(id);
                }
                self.try_plan(now, id);
            }
        }
    }

    pub(crate) fn on_accept(
        &mut self,
        now: Instant,
        conn: ConnId,
        call: CallId,
        media: Option<SocketAddr>,
    ) {
        match self.calls.get_mut(&call) {
            Some(Call::Pair(p)) if p.callee_conn() == Some(conn) => {
                if !matches!(p.state, PairState::Ringing) {
                    let msg = format!("call {call} is not ringing");
                    return self.error(conn, ErrorCode::BadMessage, msg);
                }
                p.callee_media = media;
                p.state = PairState::Planning;
                self.timers.cancel(Timer::Call(call));
                self.try_plan(now, call);
            }
            Some(Call::Room(r)) if r.members.contains_key(&conn) => {
                let Some(m) = r.members.get_mut(&conn) else {
                    return;
                };
                if m.state != MemberState::Invited {
                    let msg = format!("room {call} is not ringing for this client");
                    return self.error(conn, ErrorCode::BadMessage, msg);
                }
                m.media = media;
                m.state = MemberState::Ready;
                if !r.members.values().any(|m| m.state == MemberState::Invited) {
                    self.timers.cancel(Timer::Call(call));
                }
                self.room_progress(now, call);
            }
            _ => self.error(
                conn,
                ErrorCode::UnknownCall,
                format!("no call {call} for this client"),
            ),
        }
    }

    pub(crate) fn on_reject(&mut self, now: Instant, conn: ConnId, call: CallId) {
        match self.calls.get(&call) {
            Some(Call::Pair(p)) if p.callee_conn() == Some(conn) => {
                if matches!(p.state, PairState::Ringing) {
                    self.end_pair(call, Some(HangupReason::Rejected), None);
                } else {
                    let msg = format!("call {call} is not ringing; hang up instead");
                    self.error(conn, ErrorCode::BadMessage, msg);
                }
            }
            Some(Call::Room(r))
                if r.members
                    .get(&conn)
                    .is_some_and(|m| m.state == MemberState::Invited) =>
            {
                self.room_leave(now, call, conn, None, HangupReason::Rejected);
            }
            Some(Call::Room(r)) if r.members.contains_key(&conn) => {
                let msg = format!("room {call} is not ringing for this client; hang up instead");
                self.error(conn, ErrorCode::BadMessage, msg);
            }
            _ => self.error(
                conn,
                ErrorCode::UnknownCall,
                format!("no call {call} for this client"),
            ),
        }
    }

    pub(crate) fn on_hang_up(&mut self, now: Instant, conn: ConnId, call: CallId) {
        match self.calls.get(&call) {
            Some(Call::Pair(p)) if p.caller == conn => {
                self.end_pair(call, None, Some(HangupReason::Normal));
            }
            Some(Call::Pair(p)) if p.callee_conn() == Some(conn) => {
                let reason = if matches!(p.state, PairState::Ringing) {
                    HangupReason::Rejected
                } else {
                    HangupReason::Normal
                };
                self.end_pair(call, Some(reason), None);
            }
            Some(Call::Room(r)) if r.members.contains_key(&conn) => {
                self.room_leave(now, call, conn, None, HangupReason::Normal);
            }
            _ => self.error(
                conn,
                ErrorCode::UnknownCall,
                format!("no call {call} for this client"),
            ),
        }
    }

    pub(crate) fn on_media_trouble(&mut self, now: Instant, conn: ConnId, call: CallId) {
        match self.calls.get(&call) {
            Some(Call::Pair(p)) if p.caller == conn || p.callee_conn() == Some(conn) => {
                match p.state {
                    PairState::Up => {}
                    PairState::Replanning { .. } => return,
                    _ => {
                        let msg = format!("call {call} has no media yet");
                        return self.error(conn, ErrorCode::BadMessage, msg);
                    }
                }
                let (caller, callee) = (p.caller, p.callee_conn());
                tracing::info!(call, conn, "media trouble: re-probing");
                let waiting = [
                    self.ensure_probe(now, caller).is_some(),
                    callee.is_some_and(|c| self.ensure_probe(now, c).is_some()),
                ];
                if let Some(Call::Pair(p)) = self.calls.get_mut(&call) {
                    p.state = PairState::Replanning { waiting };
                }
                if waiting == [false, false] {
                    self.replan(now, call);
                }
            }
            Some(Call::Room(r)) if r.members.contains_key(&conn) => {
                match r.members.get(&conn).map(|m| m.state) {
                    Some(MemberState::Joined) => {}
                    Some(MemberState::Reprobing) => return,
                    _ => {
                        let msg = format!("room {call} has no media for this client yet");
                        return self.error(conn, ErrorCode::BadMessage, msg);
                    }
                }
                tracing::info!(call, conn, "media trouble in a room: re-probing the member");
                if let Some(Call::Room(r)) = self.calls.get_mut(&call)
                    && let Some(m) = r.members.get_mut(&conn)
                {
                    m.state = MemberState::Reprobing;
                }
                if self.ensure_probe(now, conn).is_none() {
                    self.room_leave(
                        now,
                        call,
                        conn,
                        Some(HangupReason::MediaFailed),
                        HangupReason::Normal,
                    );
                }
            }
            _ => self.error(
                conn,
                ErrorCode::UnknownCall,
                format!("no call {call} for this client"),
            ),
        }
    }

    // ------------------------------------------------------------------ events

    pub(crate) fn on_call_timer(&mut self, now: Instant, call: CallId) {
        match self.calls.get(&call) {
            Some(Call::Pair(p)) if matches!(p.state, PairState::Ringing) => {
                self.end_pair(
                    call,
                    Some(HangupReason::NoAnswer),
                    Some(HangupReason::NoAnswer),
                );
            }
            Some(Call::Room(r)) => {
                let invited: Vec<ConnId> = r
                    .members
                    .iter()
                    .filter(|(_, m)| m.state == MemberState::Invited)
                    .map(|(c, _)| *c)
                    .collect();
                for conn in invited {
                    self.room_leave(
                        now,
                        call,
                        conn,
                        Some(HangupReason::NoAnswer),
                        HangupReason::NoAnswer,
                    );
                }
            }
            _ => {}
        }
    }

    pub(crate) fn on_shard_installed(&mut self, now: Instant, op: u64, result: Result<(), String>) {
        let Some(call) = self.ops.remove(&op) else {
            tracing::debug!(op, "install result for a session no longer wanted");
            return;
        };
        let mut media = Vec::new();
        let failed = match self.calls.get_mut(&call) {
            Some(Call::Pair(p)) => {
                let Some(relay) = p.relay.as_mut().filter(|r| r.op == Some(op)) else {
                    return;
                };
                relay.op = None;
                match &result {
                    Ok(()) => {
                        if let PairState::Installing { media: m } =
                            std::mem::replace(&mut p.state, PairState::Up)
                        {
                            media = m;
                        }
                        None
                    }
                    Err(_) => p.relay.take().map(|r| (r, false)),
                }
            }
            Some(Call::Room(r)) => {
                let Some(relay) = r.relay.as_mut().filter(|r| r.op == Some(op)) else {
                    return;
                };
                relay.op = None;
                match &result {
                    Ok(()) => {
                        for (conn, m) in &mut r.members {
                            if m.state == MemberState::Joining {
                                m.state = MemberState::Joined;
                                if let Some((instr, _)) = &m.joined {
                                    media.push((*conn, instr.clone()));
                                }
                            }
                        }
                        None
                    }
                    Err(_) => r.relay.take().map(|r| (r, true)),
                }
            }
            None => None,
        };
        for (conn, m) in media {
            self.send(conn, ServerMsg::Media(m));
        }
        if let (Some((relay, room)), Err(e)) = (failed, result) {
            tracing::warn!(call, op, error = %e, "shard refused the session: ending the call");
            self.forget_relay(relay);
            if room {
                self.end_room(now, call, HangupReason::Error);
            } else {
                self.end_pair(call, Some(HangupReason::Error), Some(HangupReason::Error));
            }
        }
    }

    /// A client's probe finished: calls waiting for it move on.
    pub(crate) fn on_probe_done(&mut self, now: Instant, conn: ConnId, _out: ProbeOutcome) {
        let Some(ids) = self
            .session(conn)
            .map(|s| s.calls.iter().copied().collect::<Vec<_>>())
        else {
            return;
        };
        for id in ids {
            match self.calls.get_mut(&id) {
                Some(Call::Pair(p)) => {
                    let callee = p.callee_conn();
                    match &mut p.state {
                        PairState::Planning => self.try_plan(now, id),
                        PairState::Replanning { waiting } => {
                            if p.caller == conn {
                                waiting[0] = false;
                            }
                            if callee == Some(conn) {
                                waiting[1] = false;
                            }
                            if *waiting == [false, false] {
                                self.replan(now, id);
                            }
                        }
                        _ => {}
                    }
                }
                Some(Call::Room(r)) => match r.members.get(&conn).map(|m| m.state) {
                    Some(MemberState::Ready) => self.room_progress(now, id),
                    Some(MemberState::Reprobing) => self.room_replan(now, id, conn),
                    _ => {}
                },
                None => {}
            }
        }
    }

    /// A client went away: its calls end (`lost` says what its peers are told).
    pub(crate) fn party_lost(&mut self, now: Instant, conn: ConnId, lost: Lost) {
        let Some(ids) = self
            .session(conn)
            .map(|s| s.calls.iter().copied().collect::<Vec<_>>())
        else {
            return;
        };
        let reason = lost.reason();
        for id in ids {
            match self.calls.get(&id) {
                Some(Call::Pair(p)) if p.caller == conn => self.end_pair(id, None, Some(reason)),
                Some(Call::Pair(_)) => self.end_pair(id, Some(reason), None),
                Some(Call::Room(_)) => self.room_leave(now, id, conn, None, reason),
                None => {}
            }
            self.detach(conn, id, None);
        }
    }

    /// Ends any call, telling everyone in it `reason`.
    pub(crate) fn end_call(&mut self, now: Instant, call: CallId, reason: HangupReason) {
        match self.calls.get(&call) {
            Some(Call::Pair(_)) => self.end_pair(call, Some(reason), Some(reason)),
            Some(Call::Room(_)) => self.end_room(now, call, reason),
            None => {}
        }
    }

    // -------------------------------------------------------- two-party calls

    /// Ends a two-party call; each side still logged in is told its reason (`None`: nothing).
    fn end_pair(
        &mut self,
        call: CallId,
        to_caller: Option<HangupReason>,
        to_callee: Option<HangupReason>,
    ) {
        let Some(Call::Pair(p)) = self.calls.remove(&call) else {
            return;
        };
        self.timers.cancel(Timer::Call(call));
        if let Some(relay) = p.relay {
            self.drop_relay(call, relay);
        }
        if let Far::Route(r) = &p.callee {
            let addr = canonical(r.media_addr);
            if self.route_busy.get(&addr) == Some(&call) {
                self.route_busy.remove(&addr);
            }
        }
        if [to_caller, to_callee]
            .iter()
            .any(|r| matches!(r, Some(HangupReason::MediaFailed | HangupReason::Error)))
        {
            self.counters.calls_failed += 1;
        }
        self.detach(p.caller, call, to_caller);
        if let Far::User(c) = p.callee {
            self.detach(c, call, to_callee);
        }
    }

    /// The plan of a two-party call from the parties' current results; `None` while a probe
    /// is pending.
    fn pair_inputs(&self, call: CallId) -> Option<PairInputs> {
        let Some(Call::Pair(p)) = self.calls.get(&call) else {
            return None;
        };
        let a = self.party_info(p.caller)?;
        let a_media = resolve_media(p.caller_media, a.observed);
        let a = PartyInfo {
            caps: effective_caps(a.caps, a_media),
            ..a
        };
        match &p.callee {
            Far::User(c) => {
                let b = self.party_info(*c)?;
                let b_media = resolve_media(p.callee_media, b.observed);
                let b = PartyInfo {
                    caps: effective_caps(b.caps, b_media),
                    ..b
                };
                Some(PairInputs {
                    plan: planner::plan(a.caps, b.caps),
                    caller: (p.caller, a, a_media),
                    callee: Some((*c, b, b_media)),
                    far: p.callee.clone(),
                })
            }
            Far::Route(_) => Some(PairInputs {
                plan: route_plan(a.caps),
                caller: (p.caller, a, a_media),
                callee: None,
                far: p.callee.clone(),
            }),
        }
    }

    /// Builds media and legs for a call in `Planning`; `Ok(None)` while a probe is pending.
    fn build_pair(&mut self, call: CallId) -> Result<Option<PairSetup>, SetupError> {
        let Some(PairInputs {
            plan,
            caller: (a_conn, a, a_media),
            callee: b,
            far,
        }) = self.pair_inputs(call)
        else {
            return Ok(None);
        };
        let allow = self.cfg.allow_private_peers;
        let mut sides = Vec::with_capacity(2);
        match (&far, b) {
            (Far::User(_), Some((b_conn, b, b_media))) => {
                for (conn, caller, me, my_media, peer) in [
                    (a_conn, true, a, a_media, b_media),
                    (b_conn, false, b, b_media, a_media),
                ] {
                    let (out, inn) = directions(plan, caller);
                    if out == Path::DirectUdp {
                        check_peer(peer.ok_or(PeerRefused::NoAddress)?, allow)?;
                    }
                    let delivery = if needs_leg(out, inn) {
                        Some(delivery_for(inn, me.caps, my_media, allow)?)
                    } else {
                        None
                    };
                    sides.push(SidePlan {
                        conn,
                        caller,
                        out,
                        inn,
                        peer,
                        gateway_ip: me.gateway_ip,
                        key: me.key,
                        delivery,
                    });
                }
            }
            _ => {
                let (out, inn) = directions(plan, true);
                sides.push(SidePlan {
                    conn: a_conn,
                    caller: true,
                    out,
                    inn,
                    peer: None,
                    gateway_ip: a.gateway_ip,
                    delivery: Some(delivery_for(inn, a.caps, a_media, allow)?),
                    key: a.key,
                });
            }
        }
        let shard = if plan.uses_gateway() {
            Some(self.pick_shard().ok_or(SetupError::NoShard)?)
        } else {
            None
        };
        let mut legs = Vec::new();
        let mut out = Vec::new();
        for side in sides {
            let gw = shard.and_then(|s| self.gateway_addrs(s, side.gateway_ip));
            let leg = match side.delivery {
                Some(delivery) => {
                    let name = self.new_leg_name();
                    legs.push(Gateway::leg_spec(&side.key, &name, delivery));
                    Some(name)
                }
                None => None,
            };
            out.push((
                side.conn,
                instructions(
                    call,
                    Some(plan),
                    side.caller,
                    side.out,
                    side.inn,
                    side.peer,
                    gw,
                    leg,
                ),
            ));
        }
        if let Far::Route(r) = &far {
            // The IP voice gateway's leg: operator configuration, trusted as its source.
            let name = self.new_leg_name();
            let key = super::gateway::random_hex(&mut self.rng, 16).into_bytes();
            legs.push(LegSpec {
                name,
                key,
                delivery: Delivery::Udp(canonical(r.media_addr)),
                trusted_source: Some(canonical(r.media_addr)),
                clock_rate: media::CLOCK_RATE,
            });
        }
        Ok(Some(PairSetup {
            plan,
            relay: shard.map(|s| (s, legs)),
            media: out,
        }))
    }

    /// Plans and sets up a call in `Planning`, if both probe results are in.
    fn try_plan(&mut self, _now: Instant, call: CallId) {
        match self.calls.get(&call) {
            Some(Call::Pair(p)) if matches!(p.state, PairState::Planning) => {}
            _ => return,
        }
        let setup = match self.build_pair(call) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(call, reason = %e, "cannot set up media: ending the call");
                return self.end_pair(call, Some(HangupReason::Error), Some(HangupReason::Error));
            }
        };
        let relay = setup
            .relay
            .map(|(shard, legs)| self.start_install(call, shard, legs));
        let Some(Call::Pair(p)) = self.calls.get_mut(&call) else {
            return;
        };
        p.plan = Some(setup.plan);
        match relay {
            Some(relay) => {
                p.relay = Some(relay);
                p.state = PairState::Installing { media: setup.media };
            }
            None => {
                p.state = PairState::Up;
                for (conn, m) in setup.media {
                    self.send(conn, ServerMsg::Media(m));
                }
            }
        }
    }

    /// After `media_trouble`, with both probes done: a new plan, or `media_failed`.
    fn replan(&mut self, now: Instant, call: CallId) {
        let Some(Call::Pair(p)) = self.calls.get(&call) else {
            return;
        };
        let old = p.plan;
        let (caller, callee) = (p.caller, p.callee_conn());
        // A party that started yet another probe meanwhile: wait for that one too.
        let waiting = [
            self.party_info(caller).is_none(),
            callee.is_some_and(|c| self.party_info(c).is_none()),
        ];
        if waiting != [false, false] {
            if let Some(Call::Pair(p)) = self.calls.get_mut(&call) {
                p.state = PairState::Replanning { waiting };
            }
            return;
        }
        let failed = |c: Option<ConnId>| {
            c.and_then(|c| self.party_info(c))
                .is_some_and(|i| !i.reported)
        };
        let probe_failed = failed(Some(caller)) || failed(callee);
        let new = self.pair_inputs(call).map(|i| i.plan);
        if probe_failed || new.is_none() || new == old {
            tracing::info!(call, probe_failed, plan = ?old, "media trouble: no better plan; ending the call");
            return self.end_pair(
                call,
                Some(HangupReason::MediaFailed),
                Some(HangupReason::MediaFailed),
            );
        }
        tracing::info!(call, old = ?old, new = ?new, "media trouble: re-planned");
        let relay = match self.calls.get_mut(&call) {
            Some(Call::Pair(p)) => {
                p.state = PairState::Planning;
                p.relay.take()
            }
            _ => None,
        };
        if let Some(relay) = relay {
            self.drop_relay(call, relay);
        }
        self.try_plan(now, call);
    }

    // ------------------------------------------------------------------- rooms

    pub(crate) fn on_conference(
        &mut self,
        now: Instant,
        conn: ConnId,
        tag: u32,
        numbers: &[String],
        media: Option<SocketAddr>,
    ) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let (me, from_number, ncalls) = (s.user.clone(), s.number.clone(), s.calls.len());
        let id = self.new_call_id();
        self.send(conn, ServerMsg::Calling { tag, call: id });
        if self.draining {
            return self.hang_up_msg(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            tracing::info!(conn, user = %me, "conference refused: too many calls at once");
            return self.hang_up_msg(conn, id, HangupReason::Error);
        }
        let mut unique: Vec<&str> = Vec::new();
        for n in numbers {
            if !unique.contains(&n.as_str()) {
                unique.push(n);
            }
        }
        if unique.is_empty() || unique.len() >= self.cfg.max_room_size {
            let msg = format!(
                "a room takes 1 to {} numbers, got {}",
                self.cfg.max_room_size - 1,
                unique.len()
            );
            self.error(conn, ErrorCode::BadMessage, msg);
            return self.hang_up_msg(conn, id, HangupReason::Error);
        }
        let mut invitees = Vec::new();
        let mut first_failure = None;
        for number in unique {
            match self.lookup(&me, number) {
                Ok(Dest::User(c)) if !invitees.contains(&c) => invitees.push(c),
                Ok(Dest::User(_)) => {}
                Ok(Dest::Route(_)) => {
                    tracing::info!(conn, %number, "telephone numbers are not invited to rooms");
                    first_failure.get_or_insert(HangupReason::NotFound);
                }
                Err(reason) => {
                    first_failure.get_or_insert(reason);
                }
            }
        }
        if invitees.is_empty() {
            return self.hang_up_msg(conn, id, first_failure.unwrap_or(HangupReason::NotFound));
        }
        self.counters.calls_placed += 1;
        let mut members = BTreeMap::new();
        members.insert(
            conn,
            Member {
                media,
                state: MemberState::Ready,
                leg: None,
                joined: None,
            },
        );
        for &c in &invitees {
            members.insert(
                c,
                Member {
                    media: None,
                    state: MemberState::Invited,
                    leg: None,
                    joined: None,
                },
            );
        }
        self.calls.insert(
            id,
            Call::Room(Room {
                organizer: conn,
                members,
                relay: None,
            }),
        );
        for c in std::iter::once(conn).chain(invitees.iter().copied()) {
            if let Some(s) = self.session_mut(c) {
                s.calls.insert(id);
            }
        }
        self.timers
            .set(Timer::Call(id), later(now, self.cfg.ring_timeout));
        for c in invitees {
            self.send(
                c,
                ServerMsg::Incoming {
                    call: id,
                    from_number: from_number.clone(),
                    from_user: me.clone(),
                    conference: true,
                },
            );
        }
        self.send(conn, ServerMsg::Ringing { call: id });
    }

    /// Builds a room member's leg and media instructions.
    fn room_leg(
        &mut self,
        call: CallId,
        conn: ConnId,
        shard: usize,
    ) -> Result<(LegSpec, MediaInstructions, Delivery), PeerRefused> {
        let (organizer, reported) = match self.calls.get(&call) {
            Some(Call::Room(r)) => (r.organizer, r.members.get(&conn).and_then(|m| m.media)),
            _ => return Err(PeerRefused::NoAddress),
        };
        let info = self.party_info(conn).ok_or(PeerRefused::NoAddress)?;
        let my_media = resolve_media(reported, info.observed);
        let caps = effective_caps(info.caps, my_media);
        let (out, inn) = room_directions(caps);
        let delivery = delivery_for(inn, caps, my_media, self.cfg.allow_private_peers)?;
        let gw = self.gateway_addrs(shard, info.gateway_ip);
        let name = self.new_leg_name();
        let leg = Gateway::leg_spec(&info.key, &name, delivery);
        let instr = instructions(
            call,
            None,
            conn == organizer,
            out,
            inn,
            None,
            gw,
            Some(name),
        );
        Ok((leg, instr, delivery))
    }

    /// Lets ready members join: installs the session once two are ready, then adds legs.
    fn room_progress(&mut self, now: Instant, call: CallId) {
        let Some(Call::Room(r)) = self.calls.get(&call) else {
            return;
        };
        let ready: Vec<ConnId> = r
            .members
            .iter()
            .filter(|(_, m)| m.state == MemberState::Ready)
            .map(|(c, _)| *c)
            .filter(|c| self.party_info(*c).is_some())
            .collect();
        let existing = r.relay.as_ref().map(|x| (x.shard, x.op.is_some()));
        let shard = match existing {
            Some((shard, _)) => shard,
            None if ready.len() < 2 => return,
            None => match self.pick_shard() {
                Some(s) => s,
                None => {
                    tracing::warn!(call, "no shard to relay a room");
                    return self.end_room(now, call, HangupReason::Error);
                }
            },
        };
        let mut built = Vec::new();
        let mut failed = Vec::new();
        for conn in ready {
            match self.room_leg(call, conn, shard) {
                Ok(b) => built.push((conn, b)),
                Err(e) => {
                    tracing::warn!(call, conn, reason = %e, "room member cannot join");
                    failed.push(conn);
                }
            }
        }
        let installing = match existing {
            Some((_, installing)) => {
                for (_, (leg, ..)) in &built {
                    self.actions.push_back(Action::AddLeg {
                        shard,
                        session: call,
                        leg: leg.clone(),
                    });
                }
                installing
            }
            None if built.len() >= 2 => {
                let legs = built.iter().map(|(_, (leg, ..))| leg.clone()).collect();
                let mut relay = self.start_install(call, shard, legs);
                // Leg names are kept per member in rooms.
                relay.legs.clear();
                if let Some(Call::Room(r)) = self.calls.get_mut(&call) {
                    r.relay = Some(relay);
                }
                true
            }
            None => {
                // Not enough to install yet: give the names back and wait.
                for (_, (leg, ..)) in &built {
                    self.release_leg(&leg.name);
                }
                built.clear();
                false
            }
        };
        let mut media = Vec::new();
        if let Some(Call::Room(r)) = self.calls.get_mut(&call) {
            for (conn, (leg, instr, delivery)) in built {
                if let Some(m) = r.members.get_mut(&conn) {
                    m.leg = Some(leg.name);
                    m.state = if installing {
                        MemberState::Joining
                    } else {
                        media.push((conn, instr.clone()));
                        MemberState::Joined
                    };
                    m.joined = Some((instr, delivery));
                }
            }
        }
        for (conn, m) in media {
            self.send(conn, ServerMsg::Media(m));
        }
        for conn in failed {
            self.room_leave(
                now,
                call,
                conn,
                Some(HangupReason::Error),
                HangupReason::Normal,
            );
        }
    }

    /// After a member's `media_trouble`, its probe done: a new leg if its path changed, else
    /// it leaves with `media_failed`.
    fn room_replan(&mut self, now: Instant, call: CallId, conn: ConnId) {
        let Some(info) = self.party_info(conn) else {
            return; // yet another probe running: wait for it
        };
        let Some(Call::Room(r)) = self.calls.get(&call) else {
            return;
        };
        let (Some(m), Some(relay)) = (r.members.get(&conn), r.relay.as_ref()) else {
            return;
        };
        let shard = relay.shard;
        let old = m
            .joined
            .as_ref()
            .map(|(i, d)| (i.send.transport, i.recv.transport, *d));
        let old_leg = m.leg.clone();
        if !info.reported {
            return self.room_leave(
                now,
                call,
                conn,
                Some(HangupReason::MediaFailed),
                HangupReason::Normal,
            );
        }
        let (leg, instr, delivery) = match self.room_leg(call, conn, shard) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(call, conn, reason = %e, "room member cannot rejoin");
                return self.room_leave(
                    now,
                    call,
                    conn,
                    Some(HangupReason::Error),
                    HangupReason::Normal,
                );
            }
        };
        if old == Some((instr.send.transport, instr.recv.transport, delivery)) {
            self.release_leg(&leg.name);
            return self.room_leave(
                now,
                call,
                conn,
                Some(HangupReason::MediaFailed),
                HangupReason::Normal,
            );
        }
        if let Some(old_leg) = old_leg {
            self.actions.push_back(Action::RemoveLeg {
                shard,
                session: call,
                leg: old_leg.clone(),
            });
            self.release_leg(&old_leg);
        }
        self.actions.push_back(Action::AddLeg {
            shard,
            session: call,
            leg: leg.clone(),
        });
        if let Some(Call::Room(r)) = self.calls.get_mut(&call)
            && let Some(m) = r.members.get_mut(&conn)
        {
            m.leg = Some(leg.name);
            m.state = MemberState::Joined;
            m.joined = Some((instr.clone(), delivery));
        }
        self.send(conn, ServerMsg::Media(instr));
    }

    /// A member leaves (told `notify` if given); the room ends with `others` as the reason if
    /// fewer than two remain.
    fn room_leave(
        &mut self,
        now: Instant,
        call: CallId,
        conn: ConnId,
        notify: Option<HangupReason>,
        others: HangupReason,
    ) {
        let Some(Call::Room(r)) = self.calls.get_mut(&call) else {
            return;
        };
        let Some(m) = r.members.remove(&conn) else {
            return;
        };
        let shard = r.relay.as_ref().map(|x| x.shard);
        let remaining = r.members.len();
        let legs_left = r.members.values().any(|m| m.leg.is_some());
        if let Some(leg) = m.leg {
            if let Some(shard) = shard {
                self.actions.push_back(Action::RemoveLeg {
                    shard,
                    session: call,
                    leg: leg.clone(),
                });
            }
            self.release_leg(&leg);
        }
        if notify == Some(HangupReason::MediaFailed) || notify == Some(HangupReason::Error) {
            self.counters.calls_failed += 1;
        }
        self.detach(conn, call, notify);
        if remaining < 2 {
            return self.end_room(now, call, others);
        }
        if !legs_left
            && let Some(Call::Room(r)) = self.calls.get_mut(&call)
            && let Some(relay) = r.relay.take()
        {
            // Nobody left in the session (only invitees and ready members remain): drop it;
            // the next two to be ready install a new one.
            self.drop_relay(call, relay);
        }
    }

    fn end_room(&mut self, _now: Instant, call: CallId, reason: HangupReason) {
        let Some(Call::Room(r)) = self.calls.remove(&call) else {
            return;
        };
        self.timers.cancel(Timer::Call(call));
        if let Some(relay) = r.relay {
            self.drop_relay(call, relay);
        }
        for (conn, m) in r.members {
            if let Some(leg) = m.leg {
                self.release_leg(&leg);
            }
            self.detach(conn, call, Some(reason));
        }
    }
}
