//! Calls between subscribers on different gateways of a fleet, as actions and inputs of the
//! sans-IO core: the core never talks to Redis; it emits [`Action::Fleet`] and is told what
//! happened with [`Input::Fleet`](super::gateway::Input::Fleet) (`server::fleet` does the IO).
//!
//! # Presence and location
//! After a log-in the core emits [`FleetAction::Online`]; when the client is gone,
//! [`FleetAction::Offline`]. The server keeps `subscriber -> node` in Redis with a TTL it
//! refreshes while the node runs (see `server::fleet`): a node that dies stops refreshing and
//! its subscribers' presence expires by itself.
//!
//! # A call to a subscriber on another node
//! ```text
//!  caller ─dial─▶ node A (caller's)                    node B (callee's)        callee
//!                 directory: user; not logged in here
//!                 Locate{user} ─▶ Redis ─▶ Located{B}
//!                 Ring ────────────── Redis ─────────▶ callee logged in, not busy:
//!                                                     the call key = derive(session key, call)
//!                 ◀──────────── RingOk{call key, probe result, addresses}
//!                 a virtual connection stands for the callee; the call runs as a local one
//!                 incoming/media/media_ready/hang_up ─▶ ToPhone ─▶ delivered ────▶
//!                 ◀── FromPhone ◀── accept/reject/hang_up/media_trouble ◀────────
//! ```
//!
//! **The relay lives on the caller's node** (A): that node authorised the dial (class of
//! service, call limits), holds the call's record (CDR, toll) and already has the caller's
//! session key; putting the relay there keeps every decision of the call in one core, with
//! the callee standing in as a *virtual connection* whose messages travel through Redis. Both
//! phones are told node A's media addresses.
//!
//! The callee's leg keys and check-key sealing come from a **call key**
//! (`fleet_call_key(session key, call)`, see [`super::fleet_call_key`]) that node B derives
//! and hands to node A, sealed with the fleet key (the whole message is sealed with
//! ChaCha20-Poly1305 by the server). The callee's session key never leaves node B; a
//! disclosed call key opens that one call only. The callee's phone is told to derive its keys
//! from the call key by `media{call_key: true}` (docs/PROTOCOL.md).
//!
//! # Conferences
//! A `conference` whose numbers include subscribers on other nodes locates and rings each of
//! them the same way first (one virtual connection each); once every one answered (or the
//! ring timeout passed) the room opens as a local one, on the organizer's node, with the
//! members found. Messages name the call *and* the virtual connection, so several members of
//! one room may be on one node.
//!
//! # Failures
//! - Not in Redis (or Redis says this node while the user is not here): `hang_up{offline}`.
//! - Redis unreachable: `hang_up{error}` with the reason in the detail.
//! - The callee's node does not answer within the ring timeout, or is gone: `hang_up{offline}`.
//! - A node that relays a call for a local callee disappears from Redis
//!   ([`FleetInput::NodeDown`]): the callee is told `hang_up{peer_lost}`.
//! - A node that hosts a party of a call relayed here disappears, or tells that the party's
//!   connection is gone ([`FleetMsg::PhoneGone`]): an established call goes on (its relay and
//!   media are here) and its stand-in waits, *orphaned*, for `fleet_resume_grace`; a call not
//!   yet established ends with `hang_up{peer_lost}` at once, as does an orphaned one at the
//!   end of the grace (the `FleetOrphan` timer).
//!
//! # Resumption
//! Each `media` for a party of a call relayed here is followed by `resume_token{call, token}`,
//! the token `CALL.PARTY.NODE` naming this node and the party's stand-in (or, for a local
//! party, its connection). A local party whose connection is lost during its one established
//! call becomes an orphaned stand-in itself (`Gateway::fleet_keep_local`), and resumes the
//! same way. The party, logged in again on any node
//! C (this one included), sends `resume{call, token}`; C hosts the party's side at once and
//! asks the token's node ([`FleetMsg::Resume`], with the user C authenticated); the relaying
//! node accepts only when the stand-in is that call's and that user's, re-routes the stand-in
//! to C (telling the old node to `Release` it when it was not known gone: a resume may
//! overtake the node-down) and answers [`FleetMsg::Resumed`] (C sends `resumed`), else
//! [`FleetMsg::ResumeFailed`] (C sends `hang_up` with its reason). When C is the relaying node
//! itself, the messages go through its own channel, like any other node's. No new state is
//! bounded separately: orphans are stand-ins of calls that exist, and a connection hosts at
//! most `max_calls_per_user` resumed calls.
//!
//! Bounded: fleet dials and conferences waiting at once by `max_pending_lookups` (and each
//! counts against the caller's `max_calls_per_user`); virtual connections by the calls they
//! stand in for (each is removed once its call ended, after its last message was routed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::auth::SessionKey;
use super::gateway::{Action, ConnId, Gateway, Phase, Session, Timer, later};
use super::planner::Capabilities;
use super::presence::Presence;
use super::probe::ProbeOutcome;
use crate::directory::{Destination, LookupError};
use crate::wire::control::{CallId, ClientMsg, HangupReason, ServerMsg};

/// A gateway's name in the fleet.
pub type NodeId = String;

/// Virtual connection ids: above every id the server issues (those stay below 2^53).
const VIRTUAL_BASE: ConnId = 1 << 62;

/// What one node tells another through Redis (the server seals it whole).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FleetMsg {
    /// Caller's node → callee's node: is `user` here and free? `vconn` names the callee on
    /// the caller's node.
    Ring {
        call: CallId,
        vconn: ConnId,
        user: String,
    },
    /// Callee's node → caller's node: yes, ringing may start.
    RingOk {
        call: CallId,
        vconn: ConnId,
        /// The call key (hex, 32 bytes).
        key: String,
        /// The callee's control address as its node sees it.
        peer: SocketAddr,
        number: String,
        probe: RemoteProbe,
    },
    /// Callee's node → caller's node: no (offline, busy, draining).
    RingFailed {
        call: CallId,
        vconn: ConnId,
        reason: HangupReason,
    },
    /// Caller's node → callee's node: deliver this to the callee of `call`.
    ToPhone {
        call: CallId,
        vconn: ConnId,
        msg: ServerMsg,
    },
    /// Callee's node → caller's node: the callee sent this about the call.
    FromPhone { vconn: ConnId, msg: ClientMsg },
    /// Callee's node → caller's node: the callee's connection is gone.
    PhoneGone { vconn: ConnId },
    /// Caller's node → callee's node: forget `call` (it never rang, or it is over).
    Release { call: CallId, vconn: ConnId },
    /// A node where `user` logged in (again) → the relaying node: `user` asks to resume
    /// `call` (its `resume` token named this node and `vconn`); route the callee's side here.
    Resume {
        call: CallId,
        vconn: ConnId,
        user: String,
    },
    /// Relaying node → the node that asked: the call's control messages go there now.
    Resumed { call: CallId, vconn: ConnId },
    /// A node where `user` just logged in → the node Redis named for `user` before: one
    /// session per subscriber fleet-wide, the older one is replaced.
    LoggedInElsewhere { user: String },
    /// Relaying node → the node that asked: no (the call is over, or not that user's).
    ResumeFailed {
        call: CallId,
        vconn: ConnId,
        reason: HangupReason,
        detail: String,
    },
}

/// The callee's latest probe result, as its node has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteProbe {
    pub send_udp: bool,
    pub recv_udp: bool,
    pub nat: bool,
    pub mapped: Option<SocketAddr>,
    pub translated: bool,
    pub reported: bool,
}

impl RemoteProbe {
    fn of(o: &ProbeOutcome) -> Self {
        RemoteProbe {
            send_udp: o.capabilities.send_udp,
            recv_udp: o.capabilities.recv_udp,
            nat: o.capabilities.nat,
            mapped: o.mapped,
            translated: o.translated,
            reported: o.reported,
        }
    }

    /// No probe result yet: TCP both ways through the gateway (works through any firewall
    /// that lets the control connection through).
    fn unknown() -> Self {
        RemoteProbe {
            send_udp: false,
            recv_udp: false,
            nat: false,
            mapped: None,
            translated: false,
            reported: false,
        }
    }

    fn outcome(&self) -> ProbeOutcome {
        ProbeOutcome {
            probe: 0,
            capabilities: Capabilities {
                send_udp: self.send_udp,
                recv_udp: self.recv_udp,
                nat: self.nat,
            },
            mapped: self.mapped,
            translated: self.translated,
            reported: self.reported,
        }
    }
}

/// What the server is to do in Redis.
#[derive(Clone, Debug)]
pub enum FleetAction {
    /// `user` logged in here: `presence:{user} = node` (TTL, refreshed while the node runs).
    Online { user: String },
    /// `user` left here: its presence goes, unless another node holds it now.
    Offline { user: String },
    /// Where is `user`? Answer with [`FleetInput::Located`].
    Locate { id: u64, user: String },
    /// Publish `msg` to `node`.
    Send { node: NodeId, msg: FleetMsg },
}

/// What the server learnt from Redis.
#[derive(Debug)]
pub enum FleetInput {
    /// The answer to [`FleetAction::Locate`]: the node holding the user, if any.
    Located {
        id: u64,
        node: Result<Option<NodeId>, String>,
    },
    /// A message another node sent to this one (the seal checked).
    Message { from: NodeId, msg: FleetMsg },
    /// `node` is gone from Redis (its liveness key expired, or nobody listens on its channel).
    NodeDown { node: NodeId },
    /// Writing `user`'s presence at log-in ([`FleetAction::Online`]) replaced `node`'s.
    WasOnline { user: String, node: NodeId },
}

/// A dial waiting for Redis or for the callee's node.
#[derive(Debug)]
struct FleetDial {
    conn: ConnId,
    media: Option<SocketAddr>,
    number: String,
    found: Destination,
    user: String,
    vconn: ConnId,
    /// The node rung, once located.
    node: Option<NodeId>,
}

/// A callee on another node, standing in here as a virtual connection.
#[derive(Debug)]
struct Remote {
    node: NodeId,
    call: CallId,
    /// The party's gateway (or its control connection there) is gone during the established
    /// call: the relay goes on, messages for it are dropped, and a `resume` through any node
    /// re-routes it, until [`Timer::FleetOrphan`] ends the call.
    orphaned: bool,
}

/// A local callee of a call another node relays.
#[derive(Debug)]
struct Hosted {
    conn: ConnId,
    node: NodeId,
    vconn: ConnId,
}

/// The fleet state of one core.
#[derive(Debug)]
pub(crate) struct Fleet {
    node: NodeId,
    next_vconn: ConnId,
    next_locate: u64,
    /// Redis look-ups: id -> (call, virtual connection to be).
    locates: HashMap<u64, (CallId, ConnId)>,
    dials: HashMap<CallId, FleetDial>,
    /// Conferences waiting for their members on other nodes.
    rooms: HashMap<CallId, FleetRoom>,
    /// Conferences whose remote members were asked already (the second resolution).
    asked: std::collections::HashSet<CallId>,
    remote: HashMap<ConnId, Remote>,
    /// By (call, the caller's node's virtual connection for the callee).
    hosted: HashMap<(CallId, ConnId), Hosted>,
    /// Rings for a subscriber here whose probe is still running: answered when it finishes
    /// (or when the subscriber leaves), so that the caller's node plans with the callee's
    /// real capabilities, as one gateway waits for a running probe before it plans.
    deferred: Vec<DeferredRing>,
}

/// A ring answered once the callee's running probe is over.
#[derive(Debug)]
struct DeferredRing {
    conn: ConnId,
    from: NodeId,
    call: CallId,
    vconn: ConnId,
    user: String,
}

/// A conference whose members on other nodes are being located and rung.
#[derive(Debug)]
struct FleetRoom {
    conn: ConnId,
    media: Option<SocketAddr>,
    numbers: Vec<String>,
    found: Vec<Option<Destination>>,
    /// vconn -> (user, node rung)
    waiting: HashMap<ConnId, (String, Option<NodeId>)>,
}

impl Fleet {
    pub(crate) fn new(node: NodeId) -> Self {
        Fleet {
            node,
            next_vconn: VIRTUAL_BASE,
            next_locate: 1,
            locates: HashMap::new(),
            dials: HashMap::new(),
            rooms: HashMap::new(),
            asked: Default::default(),
            remote: HashMap::new(),
            hosted: HashMap::new(),
            deferred: Vec::new(),
        }
    }
}

fn hex32(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Gateway {
    /// Joins a fleet as `node`: presence goes to Redis and calls to subscribers on other
    /// nodes are signalled there. Before any input.
    pub fn enable_fleet(&mut self, node: NodeId) {
        self.fleet = Some(Box::new(Fleet::new(node)));
    }

    /// This node's name in the fleet, when it is in one.
    pub fn fleet_node(&self) -> Option<&str> {
        self.fleet.as_deref().map(|f| f.node.as_str())
    }

    /// Whether `conn` is a virtual connection (a callee on another node).
    pub(crate) fn is_virtual(&self, conn: ConnId) -> bool {
        self.fleet
            .as_deref()
            .is_some_and(|f| f.remote.contains_key(&conn))
    }

    /// Whether a local client takes part in a call another node relays.
    pub(crate) fn fleet_hosts(&self, conn: ConnId) -> bool {
        self.fleet
            .as_deref()
            .is_some_and(|f| f.hosted.values().any(|h| h.conn == conn))
    }

    /// Whether `call` is a dial waiting for Redis or for the callee's node.
    #[cfg(test)]
    pub(crate) fn fleet_dial_pending(&self, call: CallId) -> bool {
        self.fleet
            .as_deref()
            .is_some_and(|f| f.dials.contains_key(&call) || f.rooms.contains_key(&call))
    }

    fn fleet_act(&mut self, a: FleetAction) {
        self.actions.push_back(Action::Fleet(a));
    }

    /// After a log-in.
    pub(crate) fn fleet_online(&mut self, user: &str) {
        if self.fleet.is_some() {
            self.fleet_act(FleetAction::Online {
                user: user.to_owned(),
            });
        }
    }

    /// A connection is being forgotten: its presence goes, its hosted calls are told.
    pub(crate) fn fleet_conn_gone(&mut self, conn: ConnId, user: Option<&str>) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        if f.remote.contains_key(&conn) {
            return;
        }
        let gone: Vec<(CallId, ConnId)> = f
            .hosted
            .iter()
            .filter(|(_, h)| h.conn == conn)
            .map(|(c, _)| *c)
            .collect();
        let mut out = Vec::new();
        for call in gone {
            if let Some(h) = f.hosted.remove(&call) {
                out.push(FleetAction::Send {
                    node: h.node,
                    msg: FleetMsg::PhoneGone { vconn: h.vconn },
                });
            }
        }
        if let Some(user) = user {
            out.push(FleetAction::Offline {
                user: user.to_owned(),
            });
        }
        for a in out {
            self.fleet_act(a);
        }
    }

    /// A dial's directory answer names a user that is not logged in here: find it in the
    /// fleet. `true` when the dial went that way.
    pub(crate) fn fleet_divert_dial(
        &mut self,
        now: Instant,
        conn: ConnId,
        call: CallId,
        media: Option<SocketAddr>,
        number: &str,
        found: &Result<Option<Destination>, LookupError>,
    ) -> bool {
        let Ok(Some(dest @ Destination::User { user, .. })) = found else {
            return false;
        };
        let me = self.session(conn).map(|s| s.user.clone());
        if self.fleet.is_none() || self.users.contains_key(user) || me.as_deref() == Some(user) {
            return false;
        }
        let max = self.cfg.max_pending_lookups;
        let ring_timeout = self.cfg.ring_timeout;
        let Some(f) = self.fleet.as_deref_mut() else {
            return false;
        };
        if f.dials.len() >= max {
            tracing::warn!(pending = f.dials.len(), "too many fleet dials waiting");
            self.refuse_dial(conn, call, HangupReason::Error);
            return true;
        }
        let vconn = f.next_vconn;
        f.next_vconn += 1;
        let id = f.next_locate;
        f.next_locate += 1;
        f.locates.insert(id, (call, vconn));
        f.dials.insert(
            call,
            FleetDial {
                conn,
                media,
                number: number.to_owned(),
                found: dest.clone(),
                user: user.clone(),
                vconn,
                node: None,
            },
        );
        let user = user.clone();
        // It counts against the caller's calls at once, like a directory look-up.
        if let Some(s) = self.session_mut(conn) {
            s.lookups += 1;
        }
        self.timers
            .set(Timer::FleetRing(call), later(now, ring_timeout));
        self.fleet_act(FleetAction::Locate { id, user });
        true
    }

    /// The caller hung up a dial that waits for the fleet: `true` if it was one.
    pub(crate) fn fleet_cancel_dial(&mut self, conn: ConnId, call: CallId) -> bool {
        let Some(f) = self.fleet.as_deref_mut() else {
            return false;
        };
        if f.rooms.get(&call).is_some_and(|r| r.conn == conn) {
            let Some(r) = f.rooms.remove(&call) else {
                return false;
            };
            f.asked.remove(&call);
            self.timers.cancel(Timer::FleetRing(call));
            self.fleet_dial_done(conn);
            for (vconn, (_, node)) in r.waiting {
                if let Some(node) = node {
                    self.fleet_act(FleetAction::Send {
                        node,
                        msg: FleetMsg::Release { call, vconn },
                    });
                }
            }
            self.close_record(call, None, Some(HangupReason::Normal));
            return true;
        }
        if f.dials.get(&call).is_none_or(|d| d.conn != conn) {
            return false;
        }
        let d = f.dials.remove(&call);
        self.timers.cancel(Timer::FleetRing(call));
        self.fleet_dial_done(conn);
        if let Some((node, vconn)) = d.and_then(|d| Some((d.node?, d.vconn))) {
            self.fleet_act(FleetAction::Send {
                node,
                msg: FleetMsg::Release { call, vconn },
            });
        }
        self.close_record(call, None, Some(HangupReason::Normal));
        true
    }

    fn fleet_dial_failed(&mut self, call: CallId, reason: HangupReason, why: Option<&str>) {
        let Some(d) = self
            .fleet
            .as_deref_mut()
            .and_then(|f| f.dials.remove(&call))
        else {
            return;
        };
        self.timers.cancel(Timer::FleetRing(call));
        self.fleet_dial_done(d.conn);
        if let Some(node) = d.node {
            self.fleet_act(FleetAction::Send {
                node,
                msg: FleetMsg::Release {
                    call,
                    vconn: d.vconn,
                },
            });
        }
        if self.session(d.conn).is_none() {
            return self.close_record(call, None, Some(HangupReason::PeerLost));
        }
        match why {
            Some(w) => self.refuse_dial_why(d.conn, call, reason, w),
            None => self.refuse_dial(d.conn, call, reason),
        }
    }

    /// The callee's node did not answer in time.
    pub(crate) fn on_fleet_ring_timer(&mut self, now: Instant, call: CallId) {
        if self
            .fleet
            .as_deref()
            .is_some_and(|f| f.rooms.contains_key(&call))
        {
            return self.fleet_room_finish(now, call);
        }
        tracing::info!(call, "the callee's gateway did not answer the ring");
        self.fleet_dial_failed(
            call,
            HangupReason::Offline,
            Some("the callee's gateway did not answer"),
        );
    }

    pub(crate) fn on_fleet(&mut self, now: Instant, input: FleetInput) {
        if self.fleet.is_none() {
            return;
        }
        match input {
            FleetInput::Located { id, node } => self.on_located(now, id, node),
            FleetInput::Message { from, msg } => self.on_fleet_msg(now, from, msg),
            FleetInput::NodeDown { node } => self.on_node_down(now, &node),
            FleetInput::WasOnline { user, node } => {
                // One session per subscriber in the whole fleet: the other node's goes.
                let here = self.users.get(&user).is_some_and(|c| !self.is_virtual(*c));
                if node != self.fleet_node().unwrap_or_default() && here {
                    tracing::info!(%user, %node, "logged in here: its session there is replaced");
                    self.fleet_act(FleetAction::Send {
                        node,
                        msg: FleetMsg::LoggedInElsewhere { user },
                    });
                }
            }
        }
    }

    fn on_located(&mut self, now: Instant, id: u64, node: Result<Option<NodeId>, String>) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        let Some((call, vconn)) = f.locates.remove(&id) else {
            return;
        };
        let me = f.node.clone();
        if let Some(r) = f.rooms.get_mut(&call) {
            let Some((user, rung)) = r.waiting.get_mut(&vconn) else {
                return;
            };
            match node {
                Ok(Some(n)) if n != me => {
                    *rung = Some(n.clone());
                    let msg = FleetMsg::Ring {
                        call,
                        vconn,
                        user: user.clone(),
                    };
                    self.fleet_act(FleetAction::Send { node: n, msg });
                }
                other => {
                    if let Err(e) = other {
                        tracing::error!(call, error = %e, "presence look-up in Redis failed");
                    }
                    r.waiting.remove(&vconn);
                    self.fleet_room_progress(now, call);
                }
            }
            return;
        }
        match node {
            Err(e) => {
                tracing::error!(call, error = %e, "presence look-up in Redis failed");
                self.fleet_dial_failed(
                    call,
                    HangupReason::Error,
                    Some("the fleet's presence service is unavailable"),
                )
            }
            Ok(None) => self.fleet_dial_failed(call, HangupReason::Offline, None),
            Ok(Some(n)) if n == me => self.fleet_dial_failed(call, HangupReason::Offline, None),
            Ok(Some(n)) => {
                let Some(d) = f.dials.get_mut(&call) else {
                    return;
                };
                d.node = Some(n.clone());
                let msg = FleetMsg::Ring {
                    call,
                    vconn: d.vconn,
                    user: d.user.clone(),
                };
                tracing::debug!(call, node = %n, "ringing a subscriber on another gateway");
                self.fleet_act(FleetAction::Send { node: n, msg });
            }
        }
    }

    fn on_fleet_msg(&mut self, now: Instant, from: NodeId, msg: FleetMsg) {
        match msg {
            FleetMsg::Ring { call, vconn, user } => self.on_ring(from, call, vconn, &user),
            FleetMsg::RingOk {
                call,
                vconn,
                key,
                peer,
                number,
                probe,
            } => self.on_ring_ok(now, &from, call, vconn, &key, peer, number, probe),
            FleetMsg::RingFailed { call, vconn, .. }
                if self.fleet_room_member(call, vconn, &from) =>
            {
                if let Some(r) = self
                    .fleet
                    .as_deref_mut()
                    .and_then(|f| f.rooms.get_mut(&call))
                {
                    r.waiting.remove(&vconn);
                }
                self.fleet_room_progress(now, call);
            }
            FleetMsg::RingFailed { call, reason, .. } => {
                let ours = self
                    .fleet
                    .as_deref()
                    .and_then(|f| f.dials.get(&call))
                    .is_some_and(|d| d.node.as_deref() == Some(from.as_str()));
                if ours {
                    if let Some(d) = self
                        .fleet
                        .as_deref_mut()
                        .and_then(|f| f.dials.get_mut(&call))
                    {
                        d.node = None; // nothing to release there
                    }
                    self.fleet_dial_failed(call, reason, None);
                }
            }
            FleetMsg::ToPhone { call, vconn, msg } => self.on_to_phone(&from, call, vconn, msg),
            FleetMsg::FromPhone { vconn, msg } => {
                if self.remote_of(vconn, &from) {
                    self.handle(now, super::gateway::Input::Message { conn: vconn, msg });
                }
            }
            FleetMsg::PhoneGone { vconn } => {
                if self.remote_of(vconn, &from) {
                    self.fleet_orphan_or_forget(now, vconn);
                }
            }
            FleetMsg::LoggedInElsewhere { user } => {
                if let Some(&conn) = self.users.get(&user)
                    && !self.is_virtual(conn)
                {
                    tracing::info!(conn, %user, node = %from, "the same user logged in on another gateway: its session here is replaced");
                    self.replace_session(now, conn, "the same user logged in on another gateway");
                }
            }
            FleetMsg::Resume { call, vconn, user } => {
                self.on_fleet_resume(&from, call, vconn, &user)
            }
            FleetMsg::Resumed { call, vconn } => {
                let conn = self
                    .fleet
                    .as_deref()
                    .and_then(|f| f.hosted.get(&(call, vconn)))
                    .filter(|h| h.node == from)
                    .map(|h| h.conn);
                if let Some(conn) = conn {
                    tracing::info!(call, conn, node = %from, "the call is resumed here");
                    self.send(conn, ServerMsg::Resumed { call });
                }
            }
            FleetMsg::ResumeFailed {
                call,
                vconn,
                reason,
                detail,
            } => {
                let Some(f) = self.fleet.as_deref_mut() else {
                    return;
                };
                if f.hosted.get(&(call, vconn)).is_some_and(|h| h.node == from)
                    && let Some(h) = f.hosted.remove(&(call, vconn))
                {
                    tracing::info!(call, conn = h.conn, node = %from, %detail, "resume refused");
                    self.send(
                        h.conn,
                        ServerMsg::HangUp {
                            call,
                            reason,
                            detail: Some(crate::wire::control::bounded_detail(&detail)),
                        },
                    );
                }
            }
            FleetMsg::Release { call, vconn } => {
                if let Some(f) = self.fleet.as_deref_mut()
                    && f.hosted.get(&(call, vconn)).is_some_and(|h| h.node == from)
                {
                    f.hosted.remove(&(call, vconn));
                }
            }
        }
    }

    /// `conn`'s probe is over, or `conn` is gone: the rings that waited for it are answered
    /// now (with its probe result, or refused as offline).
    pub(crate) fn fleet_probe_done(&mut self, conn: ConnId) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        if !f.deferred.iter().any(|d| d.conn == conn) {
            return;
        }
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut f.deferred)
            .into_iter()
            .partition(|d| d.conn == conn);
        f.deferred = rest;
        for d in ready {
            self.on_ring(d.from, d.call, d.vconn, &d.user);
        }
    }

    fn remote_of(&self, vconn: ConnId, node: &str) -> bool {
        self.fleet
            .as_deref()
            .and_then(|f| f.remote.get(&vconn))
            .is_some_and(|r| r.node == node && !r.orphaned)
    }

    /// Callee's side: another node rings `user` here.
    fn on_ring(&mut self, from: NodeId, call: CallId, vconn: ConnId, user: &str) {
        let reply = |msg| FleetAction::Send {
            node: from.clone(),
            msg,
        };
        let conn = self
            .users
            .get(user)
            .copied()
            .filter(|c| !self.is_virtual(*c));
        let refuse = |reason| {
            reply(FleetMsg::RingFailed {
                call,
                vconn,
                reason,
            })
        };
        let Some(conn) = conn else {
            return self.fleet_act(refuse(HangupReason::Offline));
        };
        if self.draining {
            return self.fleet_act(refuse(HangupReason::Shutdown));
        }
        if self.is_busy_fleet(conn) {
            return self.fleet_act(refuse(HangupReason::Busy));
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Phase::LoggedIn(s) = &c.phase else {
            return;
        };
        if s.probe.is_some() {
            // Its probe is running: answer when it is over (`fleet_probe_done`), bounded by
            // the probe's time-out, as a call on one gateway waits for it before planning.
            if let Some(f) = self.fleet.as_deref_mut() {
                f.deferred.push(DeferredRing {
                    conn,
                    from,
                    call,
                    vconn,
                    user: user.to_owned(),
                });
            }
            return;
        }
        let key = super::fleet_call_key(&s.key, call);
        let probe = match (&s.probe, &s.result) {
            (None, Some(r)) => RemoteProbe::of(r),
            (_, Some(r)) => RemoteProbe::of(r),
            _ => RemoteProbe::unknown(),
        };
        let ok = FleetMsg::RingOk {
            call,
            vconn,
            key: hex32(key.as_bytes()),
            peer: c.peer,
            number: s.number.clone(),
            probe,
        };
        if let Some(f) = self.fleet.as_deref_mut() {
            f.hosted.insert(
                (call, vconn),
                Hosted {
                    conn,
                    node: from.clone(),
                    vconn,
                },
            );
        }
        tracing::info!(call, conn, node = %from, "a call relayed by another gateway rings here");
        self.fleet_act(reply(ok));
    }

    /// Busy as for a local call: in any call, or in one another node relays.
    fn is_busy_fleet(&self, conn: ConnId) -> bool {
        self.session(conn).is_none_or(|s| !s.calls.is_empty()) || self.fleet_hosts(conn)
    }

    /// A fleet dial of `conn` is no longer waiting.
    fn fleet_dial_done(&mut self, conn: ConnId) {
        if let Some(s) = self.session_mut(conn) {
            s.lookups = s.lookups.saturating_sub(1);
        }
    }

    /// Caller's side: the callee's node said yes: the callee becomes a virtual connection
    /// and the dial (or the conference) goes on as a local one.
    #[allow(clippy::too_many_arguments)]
    fn on_ring_ok(
        &mut self,
        now: Instant,
        from: &str,
        call: CallId,
        vconn: ConnId,
        key: &str,
        peer: SocketAddr,
        number: String,
        probe: RemoteProbe,
    ) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        let release = FleetAction::Send {
            node: from.to_owned(),
            msg: FleetMsg::Release { call, vconn },
        };
        let key = unhex32(key);
        // A conference member.
        if let Some(r) = f.rooms.get_mut(&call) {
            let waited = r
                .waiting
                .get(&vconn)
                .is_some_and(|(_, n)| n.as_deref() == Some(from));
            let (Some(key), true) = (key, waited) else {
                return self.fleet_act(release);
            };
            let Some((user, _)) = r.waiting.remove(&vconn) else {
                return;
            };
            let organizer = r.conn;
            if !self.make_vconn(
                now, organizer, from, call, vconn, user, key, peer, number, probe,
            ) {
                self.fleet_act(release);
            }
            return self.fleet_room_progress(now, call);
        }
        let matches = f
            .dials
            .get(&call)
            .is_some_and(|d| d.vconn == vconn && d.node.as_deref() == Some(from));
        let Some(key) = key.filter(|_| matches) else {
            return self.fleet_act(release);
        };
        let Some(d) = f.dials.remove(&call) else {
            return;
        };
        self.timers.cancel(Timer::FleetRing(call));
        self.fleet_dial_done(d.conn);
        if self.session(d.conn).is_none() {
            self.fleet_act(release);
            return self.close_record(call, None, Some(HangupReason::PeerLost));
        }
        let user = d.user.clone();
        if !self.make_vconn(
            now, d.conn, from, call, vconn, user, key, peer, number, probe,
        ) {
            // The callee logged in here meanwhile: ring it here.
            self.fleet_act(release);
        }
        self.dial_resolved(now, d.conn, call, d.media, &d.number, Ok(Some(d.found)));
    }

    /// The stand-in for `user` on node `from`; `false` when the user is logged in here now
    /// (or the caller is gone).
    #[allow(clippy::too_many_arguments)]
    fn make_vconn(
        &mut self,
        now: Instant,
        caller: ConnId,
        from: &str,
        call: CallId,
        vconn: ConnId,
        user: String,
        key: [u8; 32],
        peer: SocketAddr,
        number: String,
        probe: RemoteProbe,
    ) -> bool {
        let Some(local) = self.conns.get(&caller).map(|c| c.local) else {
            return false;
        };
        if self.users.contains_key(&user) {
            return false;
        }
        let session = Session {
            user: user.clone(),
            number,
            key: SessionKey::from_bytes(key),
            presence: Presence::new(now),
            probe: None,
            last_probe_id: 0,
            result: Some(probe.outcome()),
            calls: Default::default(),
            lookups: 0,
            verifier_tag: [0; 32],
            allow_prefixes: None,
        };
        self.conns.insert(
            vconn,
            super::gateway::Conn {
                peer: crate::net::canonical(peer),
                local,
                opened: now,
                phase: Phase::LoggedIn(Box::new(session)),
                tls_exporter: None,
            },
        );
        self.users.insert(user, vconn);
        if let Some(f) = self.fleet.as_deref_mut() {
            f.remote.insert(
                vconn,
                Remote {
                    node: from.to_owned(),
                    call,
                    orphaned: false,
                },
            );
        }
        true
    }

    /// A conference's directory answer names members not logged in here: locate and ring
    /// them in the fleet first; the room opens once they answered. `true` when it went so.
    pub(crate) fn fleet_divert_conference(
        &mut self,
        now: Instant,
        conn: ConnId,
        call: CallId,
        media: Option<SocketAddr>,
        numbers: &[String],
        found: &Result<Vec<Option<Destination>>, LookupError>,
    ) -> bool {
        let Ok(found) = found else { return false };
        let me = self.session(conn).map(|s| s.user.clone());
        let Some(f) = self.fleet.as_deref() else {
            return false;
        };
        if f.asked.contains(&call) {
            return false;
        }
        let mut remote: Vec<String> = Vec::new();
        for d in found.iter().flatten() {
            if let Destination::User { user, .. } = d
                && !self.users.contains_key(user)
                && me.as_deref() != Some(user)
                && !remote.contains(user)
            {
                remote.push(user.clone());
            }
        }
        if remote.is_empty() {
            return false;
        }
        let max = self.cfg.max_pending_lookups;
        let ring_timeout = self.cfg.ring_timeout;
        let Some(f) = self.fleet.as_deref_mut() else {
            return false;
        };
        if f.rooms.len() + f.dials.len() >= max {
            self.refuse_dial(conn, call, HangupReason::Error);
            return true;
        }
        f.asked.insert(call);
        let mut waiting = HashMap::new();
        let mut asks = Vec::new();
        for user in remote {
            let vconn = f.next_vconn;
            f.next_vconn += 1;
            let id = f.next_locate;
            f.next_locate += 1;
            f.locates.insert(id, (call, vconn));
            waiting.insert(vconn, (user.clone(), None));
            asks.push(FleetAction::Locate { id, user });
        }
        f.rooms.insert(
            call,
            FleetRoom {
                conn,
                media,
                numbers: numbers.to_vec(),
                found: found.clone(),
                waiting,
            },
        );
        if let Some(s) = self.session_mut(conn) {
            s.lookups += 1;
        }
        self.timers
            .set(Timer::FleetRing(call), later(now, ring_timeout));
        for a in asks {
            self.fleet_act(a);
        }
        true
    }

    /// The node `from` rang for a waiting member of conference `call`.
    fn fleet_room_member(&self, call: CallId, vconn: ConnId, from: &str) -> bool {
        self.fleet
            .as_deref()
            .and_then(|f| f.rooms.get(&call))
            .and_then(|r| r.waiting.get(&vconn))
            .is_some_and(|(_, n)| n.as_deref() == Some(from))
    }

    /// Opens the room once no member is awaited any more.
    fn fleet_room_progress(&mut self, now: Instant, call: CallId) {
        let done = self
            .fleet
            .as_deref()
            .and_then(|f| f.rooms.get(&call))
            .is_some_and(|r| r.waiting.is_empty());
        if done {
            self.fleet_room_finish(now, call);
        }
    }

    /// Opens the room with the members found (those still awaited are given up).
    fn fleet_room_finish(&mut self, now: Instant, call: CallId) {
        let Some(r) = self
            .fleet
            .as_deref_mut()
            .and_then(|f| f.rooms.remove(&call))
        else {
            return;
        };
        self.timers.cancel(Timer::FleetRing(call));
        self.fleet_dial_done(r.conn);
        for (vconn, (_, node)) in &r.waiting {
            if let Some(node) = node {
                self.fleet_act(FleetAction::Send {
                    node: node.clone(),
                    msg: FleetMsg::Release {
                        call,
                        vconn: *vconn,
                    },
                });
            }
        }
        if self.session(r.conn).is_none() {
            if let Some(f) = self.fleet.as_deref_mut() {
                f.asked.remove(&call);
            }
            return self.close_record(call, None, Some(HangupReason::PeerLost));
        }
        self.conference_resolved(now, r.conn, call, r.media, &r.numbers, Ok(r.found));
        if let Some(f) = self.fleet.as_deref_mut() {
            f.asked.remove(&call);
        }
    }

    /// Callee's side: the relaying node sends the callee a message about `call`.
    fn on_to_phone(&mut self, from: &str, call: CallId, vconn: ConnId, msg: ServerMsg) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        let Some(h) = f.hosted.get(&(call, vconn)).filter(|h| h.node == from) else {
            tracing::debug!(call, node = %from, "message for a call not hosted here: dropped");
            return;
        };
        let conn = h.conn;
        let msg = match msg {
            ServerMsg::Media(mut m) => {
                m.call_key = true;
                ServerMsg::Media(m)
            }
            ServerMsg::HangUp { .. } => {
                f.hosted.remove(&(call, vconn));
                msg
            }
            ServerMsg::Incoming { .. }
            | ServerMsg::MediaReady { .. }
            | ServerMsg::Error { .. }
            | ServerMsg::ResumeToken { .. } => msg,
            // Log-in, presence and probe traffic of the virtual connection stays there.
            _ => return,
        };
        self.send(conn, msg);
    }

    /// Callee's side: a message of a local client about a call another node relays goes
    /// there. `true` when it did.
    pub(crate) fn fleet_from_phone(&mut self, conn: ConnId, msg: &ClientMsg) -> bool {
        let call = match msg {
            ClientMsg::Accept { call, .. }
            | ClientMsg::Reject { call }
            | ClientMsg::HangUp { call }
            | ClientMsg::MediaTrouble { call } => *call,
            _ => return false,
        };
        let Some(f) = self.fleet.as_deref_mut() else {
            return false;
        };
        let Some((key, h)) = f.hosted.iter().find(|(k, h)| k.0 == call && h.conn == conn) else {
            return false;
        };
        let (key, node, vconn) = (*key, h.node.clone(), h.vconn);
        if matches!(msg, ClientMsg::Reject { .. } | ClientMsg::HangUp { .. }) {
            f.hosted.remove(&key);
        }
        self.fleet_act(FleetAction::Send {
            node,
            msg: FleetMsg::FromPhone {
                vconn,
                msg: msg.clone(),
            },
        });
        true
    }

    fn on_node_down(&mut self, now: Instant, node: &str) {
        let Some(f) = self.fleet.as_deref_mut() else {
            return;
        };
        tracing::warn!(
            node,
            "a fleet node is gone: ending the calls it took part in"
        );
        let vconns: Vec<ConnId> = f
            .remote
            .iter()
            .filter(|(_, r)| r.node == node && !r.orphaned)
            .map(|(c, _)| *c)
            .collect();
        let hosted: Vec<((CallId, ConnId), ConnId)> = f
            .hosted
            .iter()
            .filter(|(_, h)| h.node == node)
            .map(|(k, h)| (*k, h.conn))
            .collect();
        // Conferences waiting for members there: those members are given up.
        let rooms: Vec<CallId> = f
            .rooms
            .iter_mut()
            .filter_map(|(call, r)| {
                let before = r.waiting.len();
                r.waiting.retain(|_, (_, n)| n.as_deref() != Some(node));
                (r.waiting.len() != before).then_some(*call)
            })
            .collect();
        let dials: Vec<CallId> = f
            .dials
            .iter()
            .filter(|(_, d)| d.node.as_deref() == Some(node))
            .map(|(c, _)| *c)
            .collect();
        for (call, _) in &hosted {
            f.hosted.remove(call);
        }
        for call in dials {
            if let Some(d) = self
                .fleet
                .as_deref_mut()
                .and_then(|f| f.dials.get_mut(&call))
            {
                d.node = None;
            }
            self.fleet_dial_failed(
                call,
                HangupReason::Offline,
                Some("the callee's gateway is gone"),
            );
        }
        for vconn in vconns {
            self.fleet_orphan_or_forget(now, vconn);
        }
        for call in rooms {
            self.fleet_room_progress(now, call);
        }
        for ((call, _), conn) in hosted {
            self.send(
                conn,
                ServerMsg::HangUp {
                    call,
                    reason: HangupReason::PeerLost,
                    detail: Some("the gateway relaying this call is gone".into()),
                },
            );
        }
    }

    /// An action about to leave the core: messages for a virtual connection travel to the
    /// callee's node; its closing is local. `None`: nothing for the server.
    pub(crate) fn fleet_route(&mut self, a: Action) -> Option<Action> {
        let Some(f) = self.fleet.as_deref() else {
            return Some(a);
        };
        match a {
            Action::Send { conn, msg } if f.remote.contains_key(&conn) => {
                let r = &f.remote[&conn];
                if r.orphaned {
                    if conn < VIRTUAL_BASE {
                        // A local party's connection: the server drops it if it is closed.
                        return Some(Action::Send { conn, msg });
                    }
                    tracing::debug!(call = r.call, "a message for a party that is away: dropped");
                    return None;
                }
                let (node, call) = (r.node.clone(), r.call);
                if let ServerMsg::Media(m) = &msg {
                    // Right after it: how to take the call back should its gateway go.
                    let token = resume_token(&f.node, m.call, conn);
                    self.actions.push_front(Action::Fleet(FleetAction::Send {
                        node: node.clone(),
                        msg: FleetMsg::ToPhone {
                            call,
                            vconn: conn,
                            msg: ServerMsg::ResumeToken {
                                call: m.call,
                                token,
                            },
                        },
                    }));
                }
                Some(Action::Fleet(FleetAction::Send {
                    node,
                    msg: FleetMsg::ToPhone {
                        call,
                        vconn: conn,
                        msg,
                    },
                }))
            }
            // A local party kept for a resume: its connection is closed all the same.
            Action::Close { conn } if f.remote.contains_key(&conn) && conn >= VIRTUAL_BASE => None,
            Action::Send {
                conn,
                msg: ServerMsg::Media(m),
            } if conn < VIRTUAL_BASE && !m.call_key => {
                // A local party of a call relayed here may resume too, should only its
                // connection be lost (`call_key`: relayed by another node, which sends its own).
                let token = resume_token(&f.node, m.call, conn);
                self.actions.push_front(Action::Send {
                    conn,
                    msg: ServerMsg::ResumeToken {
                        call: m.call,
                        token,
                    },
                });
                Some(Action::Send {
                    conn,
                    msg: ServerMsg::Media(m),
                })
            }
            a => Some(a),
        }
    }

    /// Forgets virtual connections whose call is over (the queue of actions is empty, so
    /// nothing for them waits to be routed). The callee's node is told to forget the call.
    pub(crate) fn fleet_sweep(&mut self) {
        let Some(f) = self.fleet.as_deref() else {
            return;
        };
        if f.remote.is_empty() {
            return;
        }
        let done: Vec<ConnId> = f
            .remote
            .iter()
            // A conference still ringing its other remote members keeps its stand-ins.
            .filter(|(_, r)| !f.rooms.contains_key(&r.call))
            .map(|(c, _)| *c)
            .filter(|c| match self.conns.get(c).map(|c| &c.phase) {
                Some(Phase::LoggedIn(s)) => s.calls.is_empty(),
                _ => true,
            })
            .collect();
        for vconn in done {
            let Some(r) = self
                .fleet
                .as_deref_mut()
                .and_then(|f| f.remote.remove(&vconn))
            else {
                continue;
            };
            if let Some(c) = self.conns.remove(&vconn)
                && let Phase::LoggedIn(s) = c.phase
                && self.users.get(&s.user) == Some(&vconn)
            {
                self.users.remove(&s.user);
            }
            self.timers.cancel(Timer::Conn(vconn));
            self.timers.cancel(Timer::Probe(vconn));
            self.timers.cancel(Timer::FleetOrphan(vconn));
            if r.orphaned {
                continue; // nobody hosts it
            }
            self.fleet_act(FleetAction::Send {
                node: r.node,
                msg: FleetMsg::Release {
                    call: r.call,
                    vconn,
                },
            });
        }
    }
}

/// The `resume_token` of the party `vconn` of `call` relayed by `node`: `{call}.{vconn}.{node}`.
/// It only says where the call is relayed: the relaying node accepts a `resume` only from
/// the call's own party (its user name, authenticated by the node it comes through).
fn resume_token(node: &str, call: CallId, vconn: ConnId) -> String {
    format!("{call}.{vconn}.{node}")
}

/// `(call, vconn, node)` of a token; `None` when it is not one.
fn parse_resume_token(token: &str) -> Option<(CallId, ConnId, &str)> {
    if token.len() > crate::wire::control::MAX_RESUME_TOKEN {
        return None;
    }
    let mut parts = token.splitn(3, '.');
    let call = parts.next()?.parse().ok()?;
    let vconn: ConnId = parts.next()?.parse().ok()?;
    let node = parts.next()?;
    let ok = vconn > 0
        && !node.is_empty()
        && node.len() <= 200
        && !node
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/');
    ok.then_some((call, vconn, node))
}

impl Gateway {
    /// A client asks to take back `call` with its `token` (its control connection to the
    /// gateway hosting its side was lost). This node hosts its side from now on, once the
    /// relaying node (the token's) agrees; a refusal is a `hang_up`.
    pub(crate) fn on_resume(&mut self, conn: ConnId, call: CallId, token: &str) {
        let refuse = |gw: &mut Gateway, reason, detail: &str| {
            gw.send(
                conn,
                ServerMsg::HangUp {
                    call,
                    reason,
                    detail: Some(detail.into()),
                },
            )
        };
        let Some(user) = self.session(conn).map(|s| s.user.clone()) else {
            return;
        };
        let max = self.cfg.max_calls_per_user;
        let Some(f) = self.fleet.as_deref_mut() else {
            return refuse(
                self,
                HangupReason::Error,
                "this gateway is not in a fleet: the call cannot be resumed here",
            );
        };
        let Some((c, vconn, node)) = parse_resume_token(token).filter(|t| t.0 == call) else {
            return refuse(
                self,
                HangupReason::Error,
                "the resume token is not this call's: the call cannot be resumed",
            );
        };
        debug_assert_eq!(c, call);
        let node = node.to_owned();
        if f.hosted.get(&(call, vconn)).is_some_and(|h| h.conn == conn) {
            return; // asked twice: the first answer comes
        }
        // Bounded like the calls this client may be in.
        if f.hosted.values().filter(|h| h.conn == conn).count() >= max {
            return refuse(
                self,
                HangupReason::Error,
                "too many calls on this connection: the call cannot be resumed",
            );
        }
        f.hosted.insert(
            (call, vconn),
            Hosted {
                conn,
                node: node.clone(),
                vconn,
            },
        );
        tracing::info!(call, conn, %user, node = %node, "asking the relaying gateway to resume a call");
        self.fleet_act(FleetAction::Send {
            node,
            msg: FleetMsg::Resume { call, vconn, user },
        });
    }

    /// Relaying node: `from` hosts `user` now, who asks to resume `call`.
    fn on_fleet_resume(&mut self, from: &str, call: CallId, vconn: ConnId, user: &str) {
        let party = self
            .session(vconn)
            .filter(|s| s.calls.iter().any(|c| *c == call))
            .map(|s| s.user.clone());
        let known = self
            .fleet
            .as_deref()
            .and_then(|f| f.remote.get(&vconn))
            .is_some_and(|r| r.call == call);
        let refusal = match party {
            _ if !known => Some((
                HangupReason::PeerLost,
                "the call is over (it was not resumed in time, or the other side left)",
            )),
            None => Some((HangupReason::PeerLost, "the call is over")),
            Some(p) if p != user => Some((
                HangupReason::NotPermitted,
                "this call is not the resuming user's",
            )),
            Some(_) => None,
        };
        if let Some((reason, detail)) = refusal {
            tracing::warn!(call, node = %from, user, %detail, "resume refused");
            return self.fleet_act(FleetAction::Send {
                node: from.to_owned(),
                msg: FleetMsg::ResumeFailed {
                    call,
                    vconn,
                    reason,
                    detail: detail.into(),
                },
            });
        }
        let Some(r) = self
            .fleet
            .as_deref_mut()
            .and_then(|f| f.remote.get_mut(&vconn))
        else {
            return;
        };
        let old = std::mem::replace(&mut r.node, from.to_owned());
        let was_orphaned = std::mem::replace(&mut r.orphaned, false);
        self.timers.cancel(Timer::FleetOrphan(vconn));
        tracing::info!(call, user, from = %old, to = %from, was_orphaned, "a call's party resumed through another gateway");
        if !was_orphaned && old != from {
            // Its old node may not know yet that the party is gone (or may be gone itself:
            // then it is reported down, which no longer concerns this call).
            self.fleet_act(FleetAction::Send {
                node: old,
                msg: FleetMsg::Release { call, vconn },
            });
        }
        self.fleet_act(FleetAction::Send {
            node: from.to_owned(),
            msg: FleetMsg::Resumed { call, vconn },
        });
    }

    /// Whether every call of the stand-in `vconn` is established (media instructions out):
    /// the calls worth keeping while its party finds another gateway.
    fn fleet_established(&self, vconn: ConnId) -> bool {
        let Some(s) = self.session(vconn) else {
            return false;
        };
        !s.calls.is_empty()
            && s.calls.iter().all(|c| match self.calls.get(c) {
                Some(super::calls::Call::Pair(p)) => p.is_up(),
                Some(super::calls::Call::Room(r)) => r.members.get(&vconn).is_some_and(|m| {
                    matches!(
                        m.state,
                        super::calls::MemberState::Joined | super::calls::MemberState::Reprobing
                    )
                }),
                None => false,
            })
    }

    /// The party of `vconn` is gone with its gateway or its control connection: an
    /// established call goes on for `fleet_resume_grace`, waiting for a `resume`; any other
    /// ends now.
    fn fleet_orphan_or_forget(&mut self, now: Instant, vconn: ConnId) {
        let grace = self.cfg.fleet_resume_grace;
        if grace.is_zero() || !self.fleet_established(vconn) {
            return self.forget_conn(now, vconn, super::calls::Lost::PeerLost);
        }
        let Some(r) = self
            .fleet
            .as_deref_mut()
            .and_then(|f| f.remote.get_mut(&vconn))
        else {
            return;
        };
        r.orphaned = true;
        tracing::info!(call = r.call, node = %r.node, grace_ms = grace.as_millis() as u64,
            "a call's party lost its gateway: the call waits for it to resume");
        self.timers
            .set(Timer::FleetOrphan(vconn), later(now, grace));
    }

    /// A local client's connection is lost (closed, reset, silent) during its one established
    /// call: the call goes on, the client's session stays as a stand-in waiting for a
    /// `resume` (through this node or any other) for `fleet_resume_grace`, as for a party
    /// on another node. `false`: nothing kept (not in a fleet, no such call); forget it.
    pub(crate) fn fleet_keep_local(&mut self, now: Instant, conn: ConnId) -> bool {
        let grace = self.cfg.fleet_resume_grace;
        if grace.is_zero()
            || conn >= VIRTUAL_BASE
            || self
                .fleet
                .as_deref()
                .is_none_or(|f| f.remote.contains_key(&conn))
            || self.fleet_hosts(conn)
            || !self.fleet_established(conn)
        {
            return false;
        }
        let Some((call, user, number)) = self.session(conn).and_then(|s| {
            let mut calls = s.calls.iter();
            let call = *calls.next()?;
            calls
                .next()
                .is_none()
                .then(|| (call, s.user.clone(), s.number.clone()))
        }) else {
            return false;
        };
        let probe = self.session_mut(conn).and_then(|s| s.probe.take());
        if let Some(p) = probe {
            self.tokens.remove(&p.token);
        }
        self.timers.cancel(Timer::Conn(conn));
        self.timers.cancel(Timer::Probe(conn));
        self.timers.set(Timer::FleetOrphan(conn), later(now, grace));
        if self.online_numbers.get(&number) == Some(&conn) {
            self.online_numbers.remove(&number);
        }
        self.recheck_after_login.remove(&conn);
        let Some(f) = self.fleet.as_deref_mut() else {
            return false;
        };
        let node = f.node.clone();
        f.remote.insert(
            conn,
            Remote {
                node,
                call,
                orphaned: true,
            },
        );
        tracing::info!(conn, call, %user, grace_ms = grace.as_millis() as u64,
            "a party's connection is lost during its call: the call waits for it to resume");
        if self.users.get(&user) == Some(&conn) {
            // Not reachable for new calls meanwhile.
            self.fleet_act(FleetAction::Offline { user });
        }
        self.fleet_probe_done(conn);
        true
    }

    /// `old`'s session is replaced by a newer log-in of its user (`refused{replaced}`). Its
    /// one established call is kept for a resume all the same (in a fleet): the newer log-in
    /// may be the same phone, whose old connection the gateway has not seen fail yet.
    pub(crate) fn replace_session(&mut self, now: Instant, old: ConnId, why: &str) {
        if self.fleet_keep_local(now, old) {
            self.send(
                old,
                ServerMsg::Refused {
                    code: crate::wire::control::ErrorCode::Replaced,
                    message: why.into(),
                },
            );
            self.actions.push_back(Action::Close { conn: old });
            return;
        }
        self.refuse(
            now,
            old,
            crate::wire::control::ErrorCode::Replaced,
            why,
            super::calls::Lost::PeerLost,
        );
    }

    /// Nobody resumed the call of `vconn` in time: it ends as its party is lost.
    pub(crate) fn on_fleet_orphan_timer(&mut self, now: Instant, vconn: ConnId) {
        let orphaned = self
            .fleet
            .as_deref()
            .and_then(|f| f.remote.get(&vconn))
            .is_some_and(|r| r.orphaned);
        if orphaned {
            tracing::info!(vconn, "nobody resumed the call in time: it ends");
            self.forget_conn(now, vconn, super::calls::Lost::PeerLost);
        }
    }
}

#[cfg(test)]
mod tests;
