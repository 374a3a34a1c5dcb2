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
//!   binds ──▶ shard ─ LegBound ─▶ (each delivery leg bound) ◀─ shard ◀── binds
//!         ◀── media_ready{call}  media_ready{call} ─────────▶
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
//! - Every call installs a relay session: media starts through the gateway (see "Proven
//!   paths" below), even where Table 1 allows direct UDP both ways.
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
//! address and trusts it as its source. Because the relay tells legs apart by that source
//! address, one voice-gateway address carries one call at a time; a route has `ports`
//! consecutive ports (from its media address's), each call takes the first free one, and a
//! call to a route whose ports are all taken gets `hang_up{busy}`.
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
//! # Media readiness (`media_ready`)
//!
//! The relay drops media for a leg it cannot deliver to yet (`DropReason::NoEgress`): a leg
//! with [`Delivery::UdpLatched`] needs its UDP binding (the gateway delivers to the source that
//! bound), a leg with [`Delivery::Tcp`] its TCP binding (the gateway delivers on that
//! connection). [`Delivery::Udp`] (a fixed address, telephone routes included) and
//! [`Delivery::None`] need nothing ([`super::media::awaited_binding`]). So that the first
//! words of a call are not clipped, clients bind at once on `media` but start sending audio on
//! `media_ready`:
//!
//! - Two-party calls: when `media` goes out (and again after a re-plan, for the new legs) the
//!   call records the delivery legs it awaits (`Readiness`); each [`Input::LegBound`] for one
//!   of them over the right transport marks it; once all are bound, every party of the call
//!   gets `media_ready{call}`. With nothing to await (both directions direct, or fixed UDP
//!   deliveries only) `media_ready` follows `media` at once.
//! - Rooms: a member gets `media_ready` once its *own* delivery leg is bound (the others are
//!   already talking). A re-planned member waits for its new leg.
//! - At most one `media_ready` per party per plan. LegBound for unknown sessions, unknown or
//!   old legs, the wrong transport, or a leg already bound (a UDP re-binding from a new
//!   address) changes nothing. A LegBound that comes before `media` went out (it cannot in
//!   practice: clients bind on `media`) is remembered and `media_ready` follows `media`.
//! - The state lives in the call (`Pair::ready`, `Member::ready`), so it ends with it.
//!
//! [`Input::LegBound`]: super::gateway::Input::LegBound
//!
//! # Media trouble
//!
//! `media_trouble{call}` re-probes the parties (both, or the one member in a room). When the
//! results are in, a two-party call always changes something: a changed plan replaces the
//! relay session (new legs) and sends fresh `media` to both; an unchanged plan (or a probe
//! without report) first **re-binds** (the same paths with new legs and fresh direct checks),
//! and the next time **demotes** one direction one step down its fallback order
//! ([`super::paths::fallback`]: the complainer's receiving direction first, else its sending
//! one), then re-binds again, and so on. Only when both directions already run TCP through
//! the gateway, were re-bound there, and trouble comes again does the call end with
//! `hang_up{media_failed}` to both (logged as "TCP through the gateway both ways also failed").
//! A room member in trouble goes the same way on its own: re-bind, then TCP both ways, re-bind,
//! and only then it leaves the room with `media_failed`.
//!
//! # Proven paths
//!
//! Every direction of a two-party call starts through the gateway ([`super::paths`]); Table 1's
//! direct directions are *candidates* the phones prove with keyed checks (the check key of each
//! direction sealed for each phone under its own session key) before they go direct, and leave
//! again when consent expires. The gateway delivers UDP only to a source that bound with a
//! keyed Binding, never to an address a client reported.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand::RngCore;

use super::auth::SessionKey;
use super::gateway::{Action, ConnId, Gateway, Phase, Timer, later};
use super::media::{
    self, GatewayAddrs, PeerRefused, awaited_binding, check_peer, delivery_for, directions,
    effective_caps, recv_for, resolve_media, room_directions, route_plan, send_for,
};
use super::paths;
use super::planner::{self, Capabilities, Family, Path, Plan};
use super::probe::ProbeOutcome;
use crate::directory::{self, Destination, LookupError, Query, Route};
use crate::metrics::Transport;
use crate::net::canonical;
use crate::relay_spec::{Delivery, LegSpec, SessionId, SessionSpec};
use crate::wire::control::{
    CallId, DirectCandidate, ErrorCode, HangupReason, MediaInstructions, PathOrder, PathOrders,
    ServerMsg, bounded_detail,
};

/// The words of `hang_up{media_failed}` once every fallback was tried.
const TCP_BOTH_FAILED: &str = "no audio arrived even over TCP through the gateway in both \
    directions, after re-binding and falling back from every better path";

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

/// Boxed, so that the table of calls holds a pointer per call rather than the largest variant.
pub(crate) enum Call {
    Pair(Box<Pair>),
    Room(Box<Room>),
}

/// Which delivery legs of one plan must be bound before its parties get `media_ready` (see
/// the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// Leg, the transport the gateway delivers to it over, and whether that binding is in.
    pub awaited: Vec<(String, Transport, bool)>,
    /// The `media` instructions of this plan are out: `media_ready` may follow.
    pub media_sent: bool,
    /// `media_ready` went out for this plan.
    pub done: bool,
}

impl Readiness {
    /// A plan whose legs have these deliveries (legs that need no binding are left out).
    fn of<'a>(legs: impl IntoIterator<Item = (&'a str, Delivery)>) -> Readiness {
        Readiness {
            awaited: legs
                .into_iter()
                .filter_map(|(name, d)| awaited_binding(d).map(|t| (name.to_owned(), t, false)))
                .collect(),
            media_sent: false,
            done: false,
        }
    }

    /// Marks `leg` bound over `transport`; whether that was awaited and new.
    fn bound(&mut self, leg: &str, transport: Transport) -> bool {
        match self
            .awaited
            .iter_mut()
            .find(|(name, t, bound)| name == leg && *t == transport && !*bound)
        {
            Some(a) => {
                a.2 = true;
                true
            }
            None => false,
        }
    }

    /// Whether `media_ready` is due now; if so it counts as sent.
    fn take_due(&mut self) -> bool {
        let due = self.media_sent && !self.done && self.awaited.iter().all(|a| a.2);
        if due {
            self.done = true;
        }
        due
    }
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
    /// The plan's delivery legs awaited before `media_ready`.
    pub ready: Readiness,
    /// Demotions after `media_trouble`: no direction starts better than this.
    pub floor: Option<Plan>,
    /// The paths in force (what the gateway relays), per direction.
    pub in_force: Option<Plan>,
    /// `media_trouble` already re-bound the paths in force once (the next one demotes).
    pub rebound: bool,
    /// Who sent the `media_trouble` being handled (its receiving direction is demoted first).
    pub trouble_from: Option<ConnId>,
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
    /// Its own delivery leg, awaited before its `media_ready`.
    pub ready: Readiness,
    /// `media_trouble` with nothing new: re-bound once already (the next one demotes).
    pub rebound: bool,
    /// Demoted to TCP through the gateway both ways (the bottom of its fallback order).
    pub tcp_only: bool,
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
    /// Where the peer's direct media comes from, when known.
    peer_source: Option<SocketAddr>,
    gateway_ip: IpAddr,
    key: SessionKey,
    /// `Some` iff the side has a leg.
    delivery: Option<Delivery>,
    /// Its directions' fallback orders and direct candidates (two-party calls).
    orders: Option<PathOrders>,
}

/// Why a call's media cannot be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum SetupError {
    #[error("{0}")]
    Peer(#[from] PeerRefused),
    #[error("no shard to relay media")]
    NoShard,
}

impl SetupError {
    fn hangup_reason(&self) -> HangupReason {
        match self {
            SetupError::Peer(PeerRefused::Denied(..)) => HangupReason::PeerDenied,
            SetupError::Peer(
                PeerRefused::NotUnicast(_) | PeerRefused::NoAddress | PeerRefused::Unproven,
            ) => HangupReason::BadMediaAddress,
            SetupError::NoShard => HangupReason::Error,
        }
    }
}

struct PairInputs {
    plan: Plan,
    caller: (ConnId, PartyInfo, Option<SocketAddr>),
    callee: Option<(ConnId, PartyInfo, Option<SocketAddr>)>,
    far: Far,
}

struct PairSetup {
    plan: Plan,
    /// The paths the gateway relays now (every direction through it, see `super::paths`).
    in_force: Plan,
    relay: Option<(usize, Vec<LegSpec>)>,
    media: Vec<(ConnId, MediaInstructions)>,
    ready: Readiness,
}

/// What one client is told: `(out, inn)` are its sending and receiving paths.
fn instructions(
    call: CallId,
    plan: Option<Plan>,
    caller: bool,
    (out, inn): (Path, Path),
    (peer, peer_source): (Option<SocketAddr>, Option<SocketAddr>),
    gw: Option<GatewayAddrs>,
    leg: Option<String>,
) -> MediaInstructions {
    let gw = leg.as_ref().and(gw);
    MediaInstructions {
        call,
        plan,
        caller,
        send: send_for(out, peer, gw),
        recv: recv_for(inn, peer_source, gw),
        leg,
        gateway_udp: gw.map(|g| g.udp),
        gateway_tcp: gw.map(|g| g.tcp),
        gateway_tcp_tls: false,
        payload_type: media::PAYLOAD_TYPE,
        clock_rate: media::CLOCK_RATE,
        paths: None,
        call_key: false,
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
            gateway_ip: self.cfg.advertised.for_local(c.local.ip()),
            key: s.key.clone(),
        })
    }

    fn is_busy(&self, conn: ConnId) -> bool {
        self.session(conn).is_none_or(|s| !s.calls.is_empty()) || self.fleet_hosts(conn)
    }

    /// What the directory said a number reaches, as of now (online, busy).
    fn resolve(
        &self,
        me: &str,
        found: &Result<Option<Destination>, LookupError>,
    ) -> Result<Dest, HangupReason> {
        match found {
            Err(e) => {
                tracing::error!(error = %e, "directory look-up failed");
                Err(HangupReason::Error)
            }
            Ok(Some(Destination::User { user, .. })) => {
                if user == me {
                    return Err(HangupReason::Busy);
                }
                let Some(&conn) = self.users.get(user) else {
                    return Err(HangupReason::Offline);
                };
                if self.is_busy(conn) {
                    return Err(HangupReason::Busy);
                }
                Ok(Dest::User(conn))
            }
            Ok(Some(Destination::Route(route))) => Ok(Dest::Route(route.clone())),
            Ok(None) => Err(HangupReason::NotFound),
        }
    }

    fn hang_up_msg(&mut self, conn: ConnId, call: CallId, reason: HangupReason) {
        let detail = match &self.hangup_detail {
            Some((c, d)) if *c == call => Some(d.clone()),
            _ => None,
        };
        self.send(
            conn,
            ServerMsg::HangUp {
                call,
                reason,
                detail,
            },
        );
    }

    /// A pair's plan and relay legs go into its record (each leg is the party whose media
    /// instructions name it; the one no client binds is the telephone route's).
    fn record_pair_media(
        &mut self,
        call: CallId,
        media: &[(ConnId, MediaInstructions)],
        relay: Option<&Relay>,
    ) {
        let (caller, plan) = match self.calls.get(&call) {
            Some(Call::Pair(p)) => (p.caller, media.first().and_then(|(_, m)| m.plan)),
            _ => return,
        };
        let legs = relay.map_or_else(Vec::new, |r| {
            r.legs
                .iter()
                .map(|leg| {
                    let owner = media.iter().find(|(_, m)| m.leg.as_deref() == Some(leg));
                    let party = match owner {
                        Some((c, _)) if *c == caller => super::records::Party::Caller,
                        Some(_) => super::records::Party::Callee,
                        None => super::records::Party::Route,
                    };
                    (leg.clone(), party)
                })
                .collect()
        });
        self.record_media(call, plan, relay.map(|r| r.shard), legs);
    }

    /// A dial or conference refused before it became a call: the caller is told, the record
    /// closes.
    pub(crate) fn refuse_dial(&mut self, conn: ConnId, call: CallId, reason: HangupReason) {
        self.hang_up_msg(conn, call, reason);
        self.close_record(call, Some(reason), Some(reason));
    }

    /// [`Self::refuse_dial`] with words for the caller.
    pub(crate) fn refuse_dial_why(
        &mut self,
        conn: ConnId,
        call: CallId,
        reason: HangupReason,
        why: &str,
    ) {
        self.hangup_detail = Some((call, crate::wire::control::bounded_detail(why)));
        self.refuse_dial(conn, call, reason);
        self.hangup_detail = None;
    }

    fn too_many_calls(&self, ncalls: usize) -> String {
        format!(
            "you are in {ncalls} calls already, the most the gateway allows at once \
             (max_calls_per_user = {})",
            self.cfg.max_calls_per_user
        )
    }

    /// Ends a two-party call the gateway cannot set up, telling both sides why in words.
    fn refuse_pair(&mut self, call: CallId, e: &SetupError) {
        let reason = e.hangup_reason();
        self.hangup_detail = Some((call, crate::wire::control::bounded_detail(&e.to_string())));
        self.end_pair(call, Some(reason), Some(reason));
        self.hangup_detail = None;
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
            shard: self.shard_id(relay.shard),
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
            shard: self.shard_id(shard),
            spec: SessionSpec { id: call, legs },
        });
        Relay {
            shard,
            legs: names,
            op: Some(op),
        }
    }

    /// A fresh random check key for one direction (see `super::paths`).
    fn new_check_key(&mut self) -> paths::CheckKey {
        let mut k = [0u8; paths::CHECK_KEY_LEN];
        self.rng.fill_bytes(&mut k);
        paths::CheckKey(k)
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
        let (me, ncalls) = (s.user.clone(), s.calls.len() + s.lookups);
        let id = self.new_call_id();
        self.open_record(id, now, conn, number);
        self.send(conn, ServerMsg::Calling { tag, call: id });
        if self.draining {
            return self.refuse_dial(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            tracing::info!(conn, user = %me, "dial refused: too many calls at once");
            return self.refuse_dial_why(
                conn,
                id,
                HangupReason::Error,
                &self.too_many_calls(ncalls),
            );
        }
        if !self.call_limits.dial(&me, now) {
            self.counters.calls_limited += 1;
            tracing::debug!(conn, user = %me, "dial refused: too many dials per minute");
            return self.refuse_dial(conn, id, HangupReason::RateLimited);
        }
        if directory::number_problem(number, false).is_some() {
            return self.refuse_dial(conn, id, HangupReason::NotFound);
        }
        let pending = super::lookup::Pending::Dial {
            conn,
            call: id,
            media,
            number: number.to_owned(),
        };
        let query = Query::Dial {
            number: number.to_owned(),
        };
        if self.ask(query, pending).is_none() {
            self.refuse_dial(conn, id, HangupReason::Error);
        }
    }

    /// The directory answered a `dial`'s look-up: ring the callee or plan the route call.
    pub(crate) fn dial_resolved(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: CallId,
        media: Option<SocketAddr>,
        number: &str,
        found: Result<Option<Destination>, LookupError>,
    ) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let (me, ncalls) = (s.user.clone(), s.calls.len());
        // Class of service: telephone routes only for the prefixes the user may dial.
        if matches!(found, Ok(Some(Destination::Route(_))))
            && !directory::may_dial(s.allow_prefixes.as_deref(), number)
        {
            tracing::info!(conn, user = %me, %number, "dial refused: not in the class of service");
            return self.refuse_dial(conn, id, HangupReason::NotPermitted);
        }
        if self.draining {
            return self.refuse_dial(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            return self.refuse_dial(conn, id, HangupReason::Error);
        }
        // A subscriber logged in on another gateway of the fleet (`super::fleet`).
        if self.fleet_divert_dial(now, conn, id, media, number, &found) {
            return;
        }
        let dest = match self.resolve(&me, &found) {
            Ok(d) => d,
            Err(reason) => return self.refuse_dial(conn, id, reason),
        };
        // Ring-bombing: a callee is rung only so often, by this caller and by everybody.
        if let Dest::User(callee) = &dest {
            let callee_user = self.session(*callee).map(|s| s.user.clone());
            if callee_user.is_some_and(|u| !self.call_limits.ring(&me, &u, now)) {
                self.counters.calls_limited += 1;
                tracing::debug!(conn, user = %me, "dial refused: callee rung too often");
                return self.refuse_dial(conn, id, HangupReason::RateLimited);
            }
        }
        self.counters.calls_placed += 1;
        match dest {
            Dest::User(callee) => {
                // The callee learns the caller's number, never its log-in name (half of a
                // credential, and a name to guess passwords for): `from_user` carries the
                // number too, as the display name the directory does not have.
                let (from_number, from_user) = match self.session(conn) {
                    Some(s) => (s.number.clone(), s.number.clone()),
                    None => return,
                };
                self.record_callee(id, callee);
                self.calls.insert(
                    id,
                    Call::Pair(Box::new(Pair {
                        caller: conn,
                        callee: Far::User(callee),
                        caller_media: media,
                        callee_media: None,
                        state: PairState::Ringing,
                        relay: None,
                        plan: None,
                        ready: Readiness::default(),
                        floor: None,
                        in_force: None,
                        rebound: false,
                        trouble_from: None,
                    })),
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
            Dest::Route(mut route) => {
                // One call per voice-gateway port: the first free one of the route's ports.
                let base = canonical(route.media_addr);
                let free = (0..route.ports.max(1))
                    .filter_map(|i| base.port().checked_add(i))
                    .map(|p| std::net::SocketAddr::new(base.ip(), p))
                    .find(|a| !self.route_busy.contains_key(a));
                let Some(addr) = free else {
                    return self.refuse_dial(conn, id, HangupReason::Busy);
                };
                route.media_addr = addr;
                self.route_busy.insert(addr, id);
                // A telephone route answers at once.
                self.record_answered(id, now);
                self.calls.insert(
                    id,
                    Call::Pair(Box::new(Pair {
                        caller: conn,
                        callee: Far::Route(route),
                        caller_media: media,
                        callee_media: None,
                        state: PairState::Planning,
                        relay: None,
                        plan: None,
                        ready: Readiness::default(),
                        floor: None,
                        in_force: None,
                        rebound: false,
                        trouble_from: None,
                    })),
                );
                if let Some(s) = self.session_mut(conn) {
                    s.calls.insert(id);
                }
                self.watch_route_call(now, id);
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
                self.record_answered(call, now);
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
                self.record_answered(call, now);
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
                    p.trouble_from = Some(conn);
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

    /// A shard reports a bound leg: `media_ready` goes out once every awaited delivery leg of
    /// the plan (for a room member: its own) is bound. Anything else is ignored.
    pub(crate) fn on_leg_bound(
        &mut self,
        _now: Instant,
        session: SessionId,
        leg: &str,
        transport: Transport,
    ) {
        match self.calls.get_mut(&session) {
            Some(Call::Pair(p)) => {
                if p.ready.bound(leg, transport) {
                    self.pair_ready_check(session);
                } else {
                    tracing::debug!(call = session, %leg, ?transport, "binding not awaited");
                }
            }
            Some(Call::Room(r)) => {
                let member = r
                    .members
                    .iter_mut()
                    .find(|(_, m)| m.leg.as_deref() == Some(leg))
                    .and_then(|(&conn, m)| m.ready.bound(leg, transport).then_some(conn));
                match member {
                    Some(conn) => self.member_ready_check(session, conn),
                    None => {
                        tracing::debug!(call = session, %leg, ?transport, "binding not awaited");
                    }
                }
            }
            None => tracing::debug!(session, %leg, "binding for a session no longer known"),
        }
    }

    pub(crate) fn on_shard_installed(&mut self, now: Instant, op: u64, result: Result<(), String>) {
        let Some(call) = self.ops.remove(&op) else {
            tracing::debug!(op, "install result for a session no longer wanted");
            return;
        };
        let mut media = Vec::new();
        let mut room = false;
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
                room = true;
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
        let joined: Vec<ConnId> = media.iter().map(|(c, _)| *c).collect();
        for (conn, m) in media {
            self.send(conn, ServerMsg::Media(m));
        }
        if result.is_ok() {
            if room {
                for conn in joined {
                    self.member_media_sent(call, conn);
                }
            } else {
                self.pair_media_sent(call);
            }
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
    pub(crate) fn end_pair(
        &mut self,
        call: CallId,
        to_caller: Option<HangupReason>,
        to_callee: Option<HangupReason>,
    ) {
        let Some(Call::Pair(p)) = self.calls.remove(&call) else {
            return;
        };
        self.close_record(call, to_caller, to_callee);
        self.timers.cancel(Timer::Call(call));
        if let Some(reason) = to_callee.or(to_caller) {
            self.counters.tally.ended(reason);
        }
        self.unwatch_route_call(call);
        if let Some(relay) = p.relay {
            self.drop_relay(call, relay);
        }
        if let Far::Route(r) = &p.callee {
            let addr = canonical(r.media_addr);
            if self.route_busy.get(&addr) == Some(&call) {
                self.route_busy.remove(&addr);
            }
        }
        if [to_caller, to_callee].iter().any(|r| {
            matches!(
                r,
                Some(
                    HangupReason::MediaFailed
                        | HangupReason::Error
                        | HangupReason::PeerDenied
                        | HangupReason::BadMediaAddress
                )
            )
        }) {
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
                    plan: planner::plan_across(
                        a.caps,
                        b.caps,
                        (a_media.map(Family::of), b_media.map(Family::of)),
                    ),
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
        let policy = self.cfg.peer_policy();
        let floor = match self.calls.get(&call) {
            Some(Call::Pair(p)) => p.floor,
            _ => None,
        };
        let mut sides = Vec::with_capacity(2);
        match (&far, b) {
            (Far::User(_), Some((b_conn, b, b_media))) => {
                // Proven paths: every direction starts through the gateway; Table 1's direct
                // directions are candidates the phones check (`super::paths`).
                let start = Plan {
                    forward: paths::start_path(plan.forward, b.caps),
                    backward: paths::start_path(plan.backward, a.caps),
                };
                let start = match floor {
                    Some(f) => Plan {
                        forward: paths::worse(start.forward, f.forward),
                        backward: paths::worse(start.backward, f.backward),
                    },
                    None => start,
                };
                // A candidate needs a peer address the gateway may point a phone at, and no
                // demotion below direct.
                let candidate = |target: Path,
                                 (sender, receiver): (Capabilities, Capabilities),
                                 peer: Option<SocketAddr>,
                                 demoted: bool| {
                    (paths::is_direct_candidate(target, sender, receiver) && !demoted)
                        .then_some(peer)
                        .flatten()
                        .and_then(|p| check_peer(p, &policy).ok())
                };
                let cands = [
                    candidate(
                        plan.forward,
                        (a.caps, b.caps),
                        b_media,
                        floor.is_some_and(|f| f.forward != Path::DirectUdp),
                    ),
                    candidate(
                        plan.backward,
                        (b.caps, a.caps),
                        a_media,
                        floor.is_some_and(|f| f.backward != Path::DirectUdp),
                    ),
                ];
                let keys = [
                    cands[0].map(|_| self.new_check_key()),
                    cands[1].map(|_| self.new_check_key()),
                ];
                for (conn, caller, me, my_media, peer_media) in [
                    (a_conn, true, a, a_media, b_media),
                    (b_conn, false, b, b_media, a_media),
                ] {
                    let (out, inn) = directions(start, caller);
                    // [forward, backward] → (mine out, mine in).
                    let (c_out, c_in) = if caller { (0, 1) } else { (1, 0) };
                    let mut direct = |i: usize| -> Option<DirectCandidate> {
                        // The receiver's address is the candidate; each phone is told its peer's.
                        cands[i]?;
                        let peer = peer_media?;
                        let key = keys[i].as_ref()?;
                        let forward = i == 0;
                        let mut nonce = [0u8; 16];
                        self.rng.fill_bytes(&mut nonce);
                        Some(DirectCandidate {
                            peer,
                            username: paths::check_username(call, forward),
                            key: paths::seal(&me.key, call, forward, nonce, key),
                        })
                    };
                    let send_direct = direct(c_out);
                    let recv_direct = direct(c_in);
                    let orders = PathOrders {
                        send: PathOrder {
                            now: out,
                            order: paths::order(out, send_direct.is_some()),
                            direct: send_direct,
                        },
                        recv: PathOrder {
                            now: inn,
                            order: paths::order(inn, recv_direct.is_some()),
                            direct: recv_direct,
                        },
                    };
                    let delivery = delivery_for(inn, me.caps, my_media, &policy)?;
                    media::check_latched(delivery, me.observed, &policy)?;
                    let delivery = Some(delivery);
                    sides.push(SidePlan {
                        conn,
                        caller,
                        out,
                        inn,
                        peer: None,
                        peer_source: None,
                        gateway_ip: me.gateway_ip,
                        key: me.key,
                        delivery,
                        orders: Some(orders),
                    });
                }
            }
            _ => {
                let (out, inn) = directions(plan, true);
                // Demotions after media_trouble hold for route calls too.
                let (out, inn) = match floor {
                    Some(f) => (paths::worse(out, f.forward), paths::worse(inn, f.backward)),
                    None => (out, inn),
                };
                sides.push(SidePlan {
                    conn: a_conn,
                    caller: true,
                    out,
                    inn,
                    peer: None,
                    peer_source: None,
                    gateway_ip: a.gateway_ip,
                    delivery: Some(delivery_for(inn, a.caps, a_media, &policy)?),
                    key: a.key,
                    orders: None,
                });
            }
        }
        let plan_in_force = match &sides[..] {
            [x, ..] if x.caller => Plan {
                forward: x.out,
                backward: x.inn,
            },
            _ => plan,
        };
        let shard = if plan_in_force.uses_gateway() {
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
            let mut m = instructions(
                call,
                Some(plan),
                side.caller,
                (side.out, side.inn),
                (side.peer, side.peer_source),
                gw,
                leg,
            );
            m.paths = side.orders.map(Box::new);
            out.push((side.conn, m));
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
        let ready = Readiness::of(legs.iter().map(|l| (l.name.as_str(), l.delivery)));
        Ok(Some(PairSetup {
            plan,
            in_force: plan_in_force,
            relay: shard.map(|s| (s, legs)),
            media: out,
            ready,
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
                return self.refuse_pair(call, &e);
            }
        };
        self.counters.tally.plan(&setup.plan);
        let relay = setup
            .relay
            .map(|(shard, legs)| self.start_install(call, shard, legs));
        self.record_pair_media(call, &setup.media, relay.as_ref());
        let Some(Call::Pair(p)) = self.calls.get_mut(&call) else {
            return;
        };
        p.plan = Some(setup.plan);
        p.in_force = Some(setup.in_force);
        p.ready = setup.ready;
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
                self.pair_media_sent(call);
            }
        }
    }

    /// A pair's `media` went out: `media_ready` follows if nothing is awaited (or everything
    /// awaited is already bound).
    fn pair_media_sent(&mut self, call: CallId) {
        if let Some(Call::Pair(p)) = self.calls.get_mut(&call) {
            p.ready.media_sent = true;
        }
        self.pair_ready_check(call);
    }

    /// Sends `media_ready` to every party of a two-party call if it is due.
    fn pair_ready_check(&mut self, call: CallId) {
        let Some(Call::Pair(p)) = self.calls.get_mut(&call) else {
            return;
        };
        if !p.ready.take_due() {
            return;
        }
        let parties = [Some(p.caller), p.callee_conn()];
        tracing::debug!(call, "media ready: every delivery leg is bound");
        for conn in parties.into_iter().flatten() {
            self.send(conn, ServerMsg::MediaReady { call });
        }
    }

    /// A room member's `media` went out: its `media_ready` follows if due.
    fn member_media_sent(&mut self, call: CallId, conn: ConnId) {
        if let Some(Call::Room(r)) = self.calls.get_mut(&call)
            && let Some(m) = r.members.get_mut(&conn)
        {
            m.ready.media_sent = true;
        }
        self.member_ready_check(call, conn);
    }

    /// Sends a room member its `media_ready` if it is due.
    fn member_ready_check(&mut self, call: CallId, conn: ConnId) {
        let due = match self.calls.get_mut(&call) {
            Some(Call::Room(r)) => r.members.get_mut(&conn).is_some_and(|m| m.ready.take_due()),
            _ => false,
        };
        if due {
            tracing::debug!(
                call,
                conn,
                "media ready: the member's delivery leg is bound"
            );
            self.send(conn, ServerMsg::MediaReady { call });
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
        if new.is_some() && new != old && !probe_failed {
            // The firewalls changed: a new plan (demotions so far still hold).
            if let Some(Call::Pair(p)) = self.calls.get_mut(&call) {
                p.rebound = false;
            }
        } else {
            // The same plan (or no usable probe): media_trouble still changes something —
            // re-bind first, then demote one step (see `media_trouble_step`).
            match self.media_trouble_step(call) {
                Some(what) => {
                    tracing::info!(call, probe_failed, plan = ?old, "media trouble: same plan; {what}");
                }
                None => {
                    tracing::warn!(
                        call,
                        plan = ?old,
                        "media trouble: TCP through the gateway both ways also failed; ending the call"
                    );
                    self.hangup_detail = Some((call, bounded_detail(TCP_BOTH_FAILED)));
                    self.end_pair(
                        call,
                        Some(HangupReason::MediaFailed),
                        Some(HangupReason::MediaFailed),
                    );
                    self.hangup_detail = None;
                    return;
                }
            }
        }
        tracing::info!(call, old = ?old, new = ?new, "media trouble: re-planned");
        let relay = match self.calls.get_mut(&call) {
            Some(Call::Pair(p)) => {
                p.state = PairState::Planning;
                p.ready = Readiness::default();
                p.relay.take()
            }
            _ => None,
        };
        if let Some(relay) = relay {
            self.retire_relay_legs(call, relay.shard, &relay.legs);
            self.drop_relay(call, relay);
        }
        self.try_plan(now, call);
    }

    /// `media_trouble` with nothing new from the probes: the first time re-binds (the same
    /// paths with fresh legs and fresh checks), the next demotes one direction one step
    /// (`super::paths::fallback`; the complainer's receiving direction first, else its sending
    /// one) and re-binds that. `None` when both directions already run over TCP through the
    /// gateway and were re-bound there: nothing is left to try. Returns what it did.
    fn media_trouble_step(&mut self, call: CallId) -> Option<&'static str> {
        let Some(Call::Pair(p)) = self.calls.get_mut(&call) else {
            return None;
        };
        if !p.rebound {
            p.rebound = true;
            return Some("re-binding the paths in force");
        }
        let in_force = p.in_force?;
        let complainer_is_caller = p.trouble_from == Some(p.caller);
        let mut floor = p.floor.unwrap_or(Plan {
            forward: Path::DirectUdp,
            backward: Path::DirectUdp,
        });
        // [receiving direction of the complainer, its sending direction].
        let order = if complainer_is_caller {
            [false, true]
        } else {
            [true, false]
        };
        for forward in order {
            let (now, slot) = if forward {
                (in_force.forward, &mut floor.forward)
            } else {
                (in_force.backward, &mut floor.backward)
            };
            if let Some(next) = paths::fallback(now) {
                *slot = paths::worse(*slot, next);
                p.floor = Some(floor);
                p.rebound = false;
                return Some(if forward {
                    "demoting the forward direction one step"
                } else {
                    "demoting the backward direction one step"
                });
            }
        }
        None
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
        let (me, ncalls) = (s.user.clone(), s.calls.len() + s.lookups);
        let id = self.new_call_id();
        self.open_record(id, now, conn, &numbers.join(","));
        if let Some(r) = self.record_mut(id) {
            r.conference = true;
            r.callee_number = crate::wire::control::bounded_detail(&r.callee_number);
        }
        self.send(conn, ServerMsg::Calling { tag, call: id });
        if self.draining {
            return self.refuse_dial(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            tracing::info!(conn, user = %me, "conference refused: too many calls at once");
            return self.refuse_dial_why(
                conn,
                id,
                HangupReason::Error,
                &self.too_many_calls(ncalls),
            );
        }
        if !self.call_limits.dial(&me, now) {
            self.counters.calls_limited += 1;
            return self.refuse_dial(conn, id, HangupReason::RateLimited);
        }
        // A message may hold thousands of numbers: bound the work before de-duplicating.
        let mut unique: Vec<&str> = Vec::new();
        if numbers.len() <= 4 * self.cfg.max_room_size {
            for n in numbers {
                if !unique.contains(&n.as_str()) {
                    unique.push(n);
                }
            }
        }
        if unique.is_empty() || unique.len() >= self.cfg.max_room_size {
            let msg = format!(
                "a room takes 1 to {} different numbers, got {}",
                self.cfg.max_room_size - 1,
                numbers.len()
            );
            self.error(conn, ErrorCode::BadMessage, msg);
            return self.refuse_dial(conn, id, HangupReason::Error);
        }
        let pending = super::lookup::Pending::Invite {
            conn,
            call: id,
            media,
            numbers: unique.iter().map(|n| n.to_string()).collect(),
        };
        let query = Query::Invite {
            numbers: unique.iter().map(|n| n.to_string()).collect(),
        };
        if self.ask(query, pending).is_none() {
            self.refuse_dial(conn, id, HangupReason::Error);
        }
    }

    /// The directory answered a `conference`'s look-ups (one per number, in order): invite
    /// those online and free.
    pub(crate) fn conference_resolved(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: CallId,
        media: Option<SocketAddr>,
        numbers: &[String],
        found: Result<Vec<Option<Destination>>, LookupError>,
    ) {
        let Some(s) = self.session(conn) else {
            return;
        };
        let (me, from_number, ncalls) = (s.user.clone(), s.number.clone(), s.calls.len());
        if self.draining {
            return self.refuse_dial(conn, id, HangupReason::Shutdown);
        }
        if ncalls >= self.cfg.max_calls_per_user {
            return self.refuse_dial(conn, id, HangupReason::Error);
        }
        // Members logged in on other gateways of the fleet are rung there first.
        if self.fleet_divert_conference(now, conn, id, media, numbers, &found) {
            return;
        }
        let found: Vec<Result<Option<Destination>, LookupError>> = match found {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        let mut invitees = Vec::new();
        let mut first_failure = None;
        for (number, found) in numbers
            .iter()
            .zip(found.iter().chain(std::iter::repeat(&Ok(None))))
        {
            match self.resolve(&me, found) {
                Ok(Dest::User(c)) if !invitees.contains(&c) => {
                    let callee = self.session(c).map(|s| s.user.clone()).unwrap_or_default();
                    if self.call_limits.invite(&me, now) && self.call_limits.ring(&me, &callee, now)
                    {
                        invitees.push(c);
                    } else {
                        self.counters.calls_limited += 1;
                        first_failure.get_or_insert(HangupReason::RateLimited);
                    }
                }
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
            return self.refuse_dial(conn, id, first_failure.unwrap_or(HangupReason::NotFound));
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
                ready: Readiness::default(),
                rebound: false,
                tcp_only: false,
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
                    ready: Readiness::default(),
                    rebound: false,
                    tcp_only: false,
                },
            );
        }
        self.calls.insert(
            id,
            Call::Room(Box::new(Room {
                organizer: conn,
                members,
                relay: None,
            })),
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
                    from_user: from_number.clone(),
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
        let (organizer, reported, tcp_only) = match self.calls.get(&call) {
            Some(Call::Room(r)) => (
                r.organizer,
                r.members.get(&conn).and_then(|m| m.media),
                r.members.get(&conn).is_some_and(|m| m.tcp_only),
            ),
            _ => return Err(PeerRefused::NoAddress),
        };
        let info = self.party_info(conn).ok_or(PeerRefused::NoAddress)?;
        let my_media = resolve_media(reported, info.observed);
        // A member demoted after media trouble is planned as having no UDP: TCP both ways.
        let caps = effective_caps(info.caps, my_media.filter(|_| !tcp_only));
        let (out, inn) = room_directions(caps);
        let policy = self.cfg.peer_policy();
        let delivery = delivery_for(inn, caps, my_media, &policy)?;
        media::check_latched(delivery, info.observed, &policy)?;
        let gw = self.gateway_addrs(shard, info.gateway_ip);
        let name = self.new_leg_name();
        let leg = Gateway::leg_spec(&info.key, &name, delivery);
        let instr = instructions(
            call,
            None,
            conn == organizer,
            (out, inn),
            (None, None),
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
                    failed.push((conn, SetupError::Peer(e)));
                }
            }
        }
        let installing = match existing {
            Some((_, installing)) => {
                for (_, (leg, ..)) in &built {
                    self.actions.push_back(Action::AddLeg {
                        shard: self.shard_id(shard),
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
                    m.ready = Readiness::of([(leg.name.as_str(), delivery)]);
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
        let sent: Vec<ConnId> = media.iter().map(|(c, _)| *c).collect();
        for (conn, m) in media {
            self.send(conn, ServerMsg::Media(m));
        }
        for conn in sent {
            self.member_media_sent(call, conn);
        }
        for (conn, e) in failed {
            self.hangup_detail = Some((call, crate::wire::control::bounded_detail(&e.to_string())));
            self.room_leave(
                now,
                call,
                conn,
                Some(e.hangup_reason()),
                HangupReason::Normal,
            );
            self.hangup_detail = None;
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
        let (mut leg, mut instr, mut delivery) = match self.room_leg(call, conn, shard) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(call, conn, reason = %e, "room member cannot rejoin");
                let e = SetupError::Peer(e);
                self.hangup_detail =
                    Some((call, crate::wire::control::bounded_detail(&e.to_string())));
                self.room_leave(
                    now,
                    call,
                    conn,
                    Some(e.hangup_reason()),
                    HangupReason::Normal,
                );
                self.hangup_detail = None;
                return;
            }
        };
        if old == Some((instr.send.transport, instr.recv.transport, delivery)) {
            // Nothing new from the probe: media_trouble still changes something. Re-bind
            // first (a new leg, the same transports), then demote to TCP both ways, and only
            // when TCP both ways was re-bound and still fails does the member leave.
            let (rebound, tcp_only) = match self.calls.get(&call) {
                Some(Call::Room(r)) => r
                    .members
                    .get(&conn)
                    .map_or((true, true), |m| (m.rebound, m.tcp_only)),
                _ => (true, true),
            };
            let all_tcp =
                instr.send.transport == Transport::Tcp && instr.recv.transport == Transport::Tcp;
            let set = |w: &mut Self, rebound: bool, tcp_only: bool| {
                if let Some(Call::Room(r)) = w.calls.get_mut(&call)
                    && let Some(m) = r.members.get_mut(&conn)
                {
                    m.rebound = rebound;
                    m.tcp_only = tcp_only;
                }
            };
            if !rebound {
                tracing::info!(
                    call,
                    conn,
                    "media trouble in a room: same paths; re-binding"
                );
                set(self, true, tcp_only);
            } else if !tcp_only && !all_tcp {
                tracing::info!(
                    call,
                    conn,
                    "media trouble in a room: demoting the member to TCP"
                );
                set(self, false, true);
                self.release_leg(&leg.name);
                (leg, instr, delivery) = match self.room_leg(call, conn, shard) {
                    Ok(b) => b,
                    Err(_) => {
                        return self.room_leave(
                            now,
                            call,
                            conn,
                            Some(HangupReason::Error),
                            HangupReason::Normal,
                        );
                    }
                };
            } else {
                tracing::warn!(
                    call,
                    conn,
                    "media trouble in a room: TCP through the gateway both ways also failed; \
                     the member leaves"
                );
                self.release_leg(&leg.name);
                self.hangup_detail = Some((call, bounded_detail(TCP_BOTH_FAILED)));
                self.room_leave(
                    now,
                    call,
                    conn,
                    Some(HangupReason::MediaFailed),
                    HangupReason::Normal,
                );
                self.hangup_detail = None;
                return;
            }
        }
        if let Some(old_leg) = old_leg {
            let party = match self.calls.get(&call) {
                Some(Call::Room(r)) if r.organizer == conn => super::records::Party::Caller,
                _ => super::records::Party::Member,
            };
            self.record_room_legs(call, Some(shard), [(old_leg.clone(), party)]);
            self.actions.push_back(Action::RemoveLeg {
                shard: self.shard_id(shard),
                session: call,
                leg: old_leg.clone(),
            });
            self.release_leg(&old_leg);
        }
        self.actions.push_back(Action::AddLeg {
            shard: self.shard_id(shard),
            session: call,
            leg: leg.clone(),
        });
        if let Some(Call::Room(r)) = self.calls.get_mut(&call)
            && let Some(m) = r.members.get_mut(&conn)
        {
            m.ready = Readiness::of([(leg.name.as_str(), delivery)]);
            m.leg = Some(leg.name);
            m.state = MemberState::Joined;
            m.joined = Some((instr.clone(), delivery));
        }
        self.send(conn, ServerMsg::Media(instr));
        self.member_media_sent(call, conn);
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
        let party = if conn == r.organizer {
            super::records::Party::Caller
        } else {
            super::records::Party::Member
        };
        if let Some(leg) = m.leg {
            self.record_room_legs(call, shard, [(leg.clone(), party)]);
            if let Some(shard) = shard {
                self.actions.push_back(Action::RemoveLeg {
                    shard: self.shard_id(shard),
                    session: call,
                    leg: leg.clone(),
                });
            }
            self.release_leg(&leg);
        }
        if matches!(
            notify,
            Some(
                HangupReason::MediaFailed
                    | HangupReason::Error
                    | HangupReason::PeerDenied
                    | HangupReason::BadMediaAddress
            )
        ) {
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
        let legs: Vec<(String, super::records::Party)> = r
            .members
            .iter()
            .filter_map(|(c, m)| {
                let party = if *c == r.organizer {
                    super::records::Party::Caller
                } else {
                    super::records::Party::Member
                };
                m.leg.clone().map(|l| (l, party))
            })
            .collect();
        let shard = r.relay.as_ref().map(|x| x.shard);
        self.record_room_legs(call, shard, legs);
        self.close_record(call, Some(reason), Some(reason));
        self.timers.cancel(Timer::Call(call));
        self.counters.tally.ended(reason);
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

    /// The shard could not add a room member's leg: the member is told (`hang_up{error}`) and
    /// leaves the room, rather than believing it joined. If fewer than two remain, the room
    /// ends with `hang_up{error}`.
    pub(crate) fn on_leg_add_failed(
        &mut self,
        now: Instant,
        session: SessionId,
        leg: &str,
        error: &str,
    ) {
        let Some(Call::Room(r)) = self.calls.get(&session) else {
            return;
        };
        let Some((&conn, _)) = r
            .members
            .iter()
            .find(|(_, m)| m.leg.as_deref() == Some(leg))
        else {
            return;
        };
        tracing::warn!(room = session, conn, %leg, %error, "room leg not added: member told");
        self.room_leave(
            now,
            session,
            conn,
            Some(HangupReason::Error),
            HangupReason::Error,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::control::gateway::{GatewayConfig, Input};
    use crate::control::leg_key;
    use crate::control::sim::{self, Client, World, addr, hangups, media_of};
    use crate::metrics::Transport;
    use crate::wire::control::{ClientMsg, MediaRecv, MediaSend};

    const GW_UDP: &str = "192.0.2.1:7401";

    fn caps(send_udp: bool, recv_udp: bool, nat: bool) -> Capabilities {
        Capabilities {
            send_udp,
            recv_udp,
            nat,
        }
    }

    /// A public media address for a client, NAT or not (as if port-forwarded).
    fn public_media(c: &Client) -> SocketAddr {
        SocketAddr::new(c.peer.ip(), sim::MEDIA_PORT)
    }

    fn installs(cmds: &[Action]) -> Vec<(u64, usize, SessionSpec)> {
        cmds.iter()
            .filter_map(|a| match a {
                Action::InstallSession { op, shard, spec } => Some((*op, *shard, spec.clone())),
                _ => None,
            })
            .collect()
    }

    fn removes(cmds: &[Action]) -> Vec<(usize, u64)> {
        cmds.iter()
            .filter_map(|a| match a {
                Action::RemoveSession { shard, session } => Some((*shard, *session)),
                _ => None,
            })
            .collect()
    }

    /// The brief's table, written out independently of `media.rs`.
    fn expected_send(out: Path, peer: SocketAddr) -> MediaSend {
        let gw = addr(GW_UDP);
        match out {
            Path::DirectUdp => MediaSend {
                transport: Transport::Udp,
                to: Some(peer),
                via_gateway: false,
            },
            Path::UdpViaGateway | Path::UdpInTcpOut => MediaSend {
                transport: Transport::Udp,
                to: Some(gw),
                via_gateway: true,
            },
            Path::TcpInUdpOut | Path::TcpBoth => MediaSend {
                transport: Transport::Tcp,
                to: Some(gw),
                via_gateway: true,
            },
        }
    }

    fn expected_recv(inn: Path, peer: Option<SocketAddr>) -> MediaRecv {
        match inn {
            Path::DirectUdp => MediaRecv {
                transport: Transport::Udp,
                via_gateway: false,
                from: peer,
            },
            Path::UdpViaGateway | Path::TcpInUdpOut => MediaRecv {
                transport: Transport::Udp,
                via_gateway: true,
                from: Some(addr(GW_UDP)),
            },
            Path::UdpInTcpOut | Path::TcpBoth => MediaRecv {
                transport: Transport::Tcp,
                via_gateway: true,
                from: None,
            },
        }
    }

    /// Never a reported address: UDP only to the source the client's own Binding latched.
    fn expected_delivery(inn: Path, me: Capabilities) -> Delivery {
        if inn == Path::DirectUdp {
            Delivery::None
        } else if inn.receiver_transport() == Transport::Tcp {
            Delivery::Tcp
        } else {
            assert!(me.send_udp, "UDP delivery only to a client that binds");
            Delivery::UdpLatched
        }
    }

    /// Sets up a call alice → bob with these capabilities; returns the clients, the call, what
    /// each was told, and the shard commands.
    fn call_with(
        ca: Capabilities,
        cb: Capabilities,
    ) -> (
        World,
        Client,
        Client,
        CallId,
        Vec<MediaInstructions>,
        Vec<MediaInstructions>,
        Vec<Action>,
    ) {
        let (w, a, b, call, ma, mb, cmds) = call_with_msgs(ca, cb);
        (w, a, b, call, media_of(&ma), media_of(&mb), cmds)
    }

    /// [`call_with`], with every message each side got after answering.
    fn call_with_msgs(
        ca: Capabilities,
        cb: Capabilities,
    ) -> (
        World,
        Client,
        Client,
        CallId,
        Vec<ServerMsg>,
        Vec<ServerMsg>,
        Vec<Action>,
    ) {
        let mut w = World::new();
        let a = w.login_with("alice", ca);
        let b = w.login_with("bob", cb);
        let call = w.dial(&a, b.number, Some(public_media(&a)));
        assert_eq!(w.take(a.conn), [ServerMsg::Ringing { call }]);
        assert_eq!(
            w.take(b.conn),
            [ServerMsg::Incoming {
                call,
                from_number: a.number.into(),
                from_user: a.number.into(),
                conference: false
            }]
        );
        w.accept(&b, call, Some(public_media(&b)));
        let (ma, mb) = (w.take(a.conn), w.take(b.conn));
        let cmds = w.take_shard();
        (w, a, b, call, ma, mb, cmds)
    }

    /// All 16 cases of Table 1, each with the four NAT combinations: every direction starts
    /// through the gateway on the path `paths::start_path` gives; the media instructions and
    /// the legs' deliveries follow those paths, keys are derived from each client's own session
    /// key, and exactly Table 1's direct directions towards a client that can answer checks are
    /// direct candidates, with one check key per direction that both phones (and only they)
    /// can open.
    #[test]
    fn table1_all_cases_and_nat() {
        let mut candidates = 0;
        for case in 0..16u8 {
            let (ia, ib) = (case / 4, case % 4);
            // Table 1's per-client order: (UDP out, TCP in), (TCP out, UDP in), TCP both, UDP both.
            let row = |i: u8| match i {
                0 => (true, false),
                1 => (false, true),
                2 => (false, false),
                _ => (true, true),
            };
            for nat in 0..4u8 {
                let ca = caps(row(ia).0, row(ia).1, nat & 1 != 0);
                let cb = caps(row(ib).0, row(ib).1, nat & 2 != 0);
                let what = format!("case {} caller {ca:?} callee {cb:?}", case + 1);
                assert_eq!(Plan::table1_case(ca, cb), Some(case + 1));
                let plan = planner::plan(ca, cb);
                let start = Plan {
                    forward: paths::start_path(plan.forward, cb),
                    backward: paths::start_path(plan.backward, ca),
                };
                let (w, a, b, call, ma, mb, cmds) = call_with(ca, cb);
                let (ma, mb) = (&ma[..], &mb[..]);
                // Each direction's check key, as both ends open it.
                for (forward, target, sender, receiver) in
                    [(true, plan.forward, ca, cb), (false, plan.backward, cb, ca)]
                {
                    let (snd, rcv) = if forward {
                        ((&a, &ma[0]), (&b, &mb[0]))
                    } else {
                        ((&b, &mb[0]), (&a, &ma[0]))
                    };
                    let (sp, rp) = (
                        snd.1.paths.as_ref().expect("paths"),
                        rcv.1.paths.as_ref().expect("paths"),
                    );
                    let cand = paths::is_direct_candidate(target, sender, receiver);
                    assert_eq!(sp.send.direct.is_some(), cand, "{what} forward={forward}");
                    assert_eq!(rp.recv.direct.is_some(), cand, "{what} forward={forward}");
                    if let (Some(sd), Some(rd)) = (&sp.send.direct, &rp.recv.direct) {
                        candidates += 1;
                        assert_eq!(sd.peer, public_media(rcv.0));
                        assert_eq!(rd.peer, public_media(snd.0));
                        assert_eq!(sd.username, paths::check_username(call, forward));
                        assert_eq!(sd.username, rd.username);
                        let ks = paths::open(&snd.0.key, call, forward, &sd.key);
                        let kr = paths::open(&rcv.0.key, call, forward, &rd.key);
                        assert!(
                            ks.is_ok() && ks == kr,
                            "{what}: both ends open the same key"
                        );
                        // Neither phone can open the other's copy, and it differs on the wire.
                        assert_ne!(sd.key, rd.key);
                        assert!(paths::open(&rcv.0.key, call, forward, &sd.key).is_err());
                    }
                }
                assert_eq!((ma.len(), mb.len()), (1, 1), "{what}");
                let specs = installs(&cmds);
                let mut legs_seen = 0;
                for (c, m, caller, my_caps, peer_media, peer_nat) in [
                    (&a, &ma[0], true, ca, public_media(&b), cb.nat),
                    (&b, &mb[0], false, cb, public_media(&a), ca.nat),
                ] {
                    let (out, inn) = if caller {
                        (start.forward, start.backward)
                    } else {
                        (start.backward, start.forward)
                    };
                    let orders = m.paths.as_ref().expect("two-party calls carry paths");
                    assert_eq!((orders.send.now, orders.recv.now), (out, inn), "{what}");
                    assert_eq!(
                        orders.send.order,
                        paths::order(out, orders.send.direct.is_some())
                    );
                    assert_eq!(
                        orders.recv.order,
                        paths::order(inn, orders.recv.direct.is_some())
                    );
                    assert_eq!(m.call, call);
                    assert_eq!(m.plan, Some(plan), "{what}");
                    assert_eq!(m.caller, caller);
                    assert_eq!(m.send, expected_send(out, peer_media), "{what} send");
                    // A peer behind NAT sends direct media from an address nobody knows.
                    let peer_source = (!peer_nat).then_some(peer_media);
                    assert_eq!(m.recv, expected_recv(inn, peer_source), "{what} recv");
                    assert_eq!((m.payload_type, m.clock_rate), (0, 8000));
                    let has_leg = out.uses_gateway() || inn.uses_gateway();
                    assert_eq!(m.leg.is_some(), has_leg, "{what} leg");
                    if let Some(leg) = &m.leg {
                        legs_seen += 1;
                        assert!(leg.len() >= 24 && leg.bytes().all(|b| b.is_ascii_graphic()));
                        assert_eq!(m.gateway_udp, Some(addr(GW_UDP)));
                        assert_eq!(m.gateway_tcp, Some(addr(GW_UDP)));
                        let spec = &specs[0].2;
                        let l = spec
                            .legs
                            .iter()
                            .find(|l| &l.name == leg)
                            .expect("the leg is installed");
                        assert_eq!(
                            l.key,
                            leg_key(&c.key, leg),
                            "{what}: key from the client's session key"
                        );
                        assert_eq!(
                            l.delivery,
                            expected_delivery(inn, my_caps),
                            "{what} delivery"
                        );
                        assert_eq!((l.trusted_source, l.clock_rate), (None, 8000));
                    } else {
                        assert_eq!((m.gateway_udp, m.gateway_tcp), (None, None));
                    }
                }
                // Media starts through the gateway, always.
                assert_eq!(specs.len(), 1, "{what}");
                assert_eq!((specs[0].1, specs[0].2.id), (0, call));
                assert_eq!(specs[0].2.legs.len(), legs_seen);
                assert_eq!(legs_seen, 2);
                assert_eq!(w.gw.stats().shard_sessions, [1, 0]);
                assert_eq!(w.gw.stats().calls_up, 1);
            }
        }
        // Direct directions towards a client that sends UDP: cases 4 (fwd), 13 (bwd), 14
        // (fwd), 16 (both), each without NAT on the receiver's side.
        // Case 16, each direction in the 2 variants with the receiver not behind NAT. Case 14's
        // direct forward direction is no candidate (its receiver cannot send UDP, so it can
        // answer no check), nor are case 4's forward and 13's backward (their sender cannot
        // receive UDP, so it would never hear the answers).
        assert_eq!(candidates, 4);
    }

    /// Case 16 without NAT: Table 1 says direct both ways, but nobody is told to send to an
    /// announced address: media starts through the gateway and each phone gets its peer's
    /// address as a direct candidate to check.
    #[test]
    fn case16_without_nat_starts_via_the_gateway_with_direct_candidates() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        let ma = media_of(&w.take(a.conn));
        let mb = media_of(&w.take(b.conn));
        assert_eq!(
            ma[0].plan,
            Some(Plan {
                forward: Path::DirectUdp,
                backward: Path::DirectUdp
            })
        );
        for (m, peer) in [(&ma[0], b.media()), (&mb[0], a.media())] {
            assert_eq!(m.send.to, Some(addr(GW_UDP)));
            assert_eq!(m.recv.from, Some(addr(GW_UDP)));
            let p = m.paths.as_ref().expect("paths");
            assert_eq!(p.send.direct.as_ref().map(|d| d.peer), Some(peer));
            assert_eq!(p.recv.direct.as_ref().map(|d| d.peer), Some(peer));
            assert_eq!(
                p.send.order,
                [Path::DirectUdp, Path::UdpViaGateway, Path::TcpBoth]
            );
        }
        let spec = &installs(&w.take_shard())[0].2;
        assert!(spec.legs.iter().all(|l| l.delivery == Delivery::UdpLatched));
        w.send(b.conn, ClientMsg::HangUp { call });
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Normal)]);
        assert_eq!(removes(&w.take_shard()).len(), 1);
    }

    /// An IPv6-only phone calls an IPv4-only one: no direct candidate (the families cannot
    /// reach each other), the gateway bridges both ways.
    #[test]
    fn ipv6_only_and_ipv4_only_phones_are_bridged_by_the_gateway() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let v6: SocketAddr = addr("[2001:db8::7]:41000");
        let call = w.dial(&a, b.number, Some(v6));
        w.accept(&b, call, Some(b.media()));
        let ma = media_of(&w.take(a.conn));
        let mb = media_of(&w.take(b.conn));
        let bridged = Some(Plan {
            forward: Path::UdpViaGateway,
            backward: Path::UdpViaGateway,
        });
        for m in [&ma[0], &mb[0]] {
            assert_eq!(m.plan, bridged);
            let p = m.paths.as_ref().expect("paths");
            assert!(p.send.direct.is_none() && p.recv.direct.is_none());
            assert_eq!(m.send.to, Some(addr(GW_UDP)));
        }
        assert_eq!(installs(&w.take_shard())[0].2.legs.len(), 2);
    }

    #[test]
    fn behind_1to1_nat_clients_are_told_the_advertised_address() {
        let mut w = World::with_config(GatewayConfig {
            advertised: crate::control::advertise::Advertised {
                ipv4: Some("198.51.100.9".parse().unwrap()),
                ipv6: None,
            },
            ..sim::config()
        });
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::NAT);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        let mb = media_of(&w.take(b.conn));
        let public = Some(addr("198.51.100.9:7401"));
        assert_eq!(mb[0].recv.from, public, "not the private {GW_UDP}");
        assert_eq!(mb[0].gateway_udp, public);
        // The operator's counts: one call, planned forward via the gateway, ended normally.
        w.send(a.conn, ClientMsg::HangUp { call });
        let t = w.gw.stats().tally;
        assert_eq!(t.planned(true, Path::UdpViaGateway), 1);
        assert_eq!(t.planned(false, Path::DirectUdp), 1);
        assert_eq!(t.ended_with(HangupReason::Normal), 1);
        assert_eq!(t.probes.iter().sum::<u64>(), 2, "two probes finished");
    }

    #[test]
    fn probed_nat_client_is_reached_through_the_gateway_by_latching() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::NAT);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        let mb = media_of(&w.take(b.conn));
        let ma = media_of(&w.take(a.conn));
        // Forward (to the NATed bob) via the gateway; backward direct to alice.
        assert_eq!(
            ma[0].plan,
            Some(Plan {
                forward: Path::UdpViaGateway,
                backward: Path::DirectUdp
            })
        );
        // Bob's direct direction to alice starts via the gateway, a candidate.
        assert_eq!(mb[0].send.to, Some(addr(GW_UDP)));
        let p = mb[0].paths.as_ref().expect("paths");
        assert_eq!(p.send.direct.as_ref().map(|d| d.peer), Some(a.media()));
        assert_eq!(mb[0].recv.from, Some(addr(GW_UDP)));
        let spec = &installs(&w.take_shard())[0].2;
        let bob_leg = spec
            .legs
            .iter()
            .find(|l| Some(&l.name) == mb[0].leg.as_ref())
            .expect("bob's leg");
        assert_eq!(bob_leg.delivery, Delivery::UdpLatched);
        let alice_leg = spec
            .legs
            .iter()
            .find(|l| Some(&l.name) == ma[0].leg.as_ref())
            .expect("alice's leg");
        assert_eq!(alice_leg.delivery, Delivery::UdpLatched);
    }

    #[test]
    fn reject_no_answer_busy_not_found_offline() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let c = w.login("carol", sim::OPEN);
        // Reject.
        let call = w.dial(&a, b.number, None);
        w.take(a.conn);
        w.send(b.conn, ClientMsg::Reject { call });
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Rejected)]);
        assert!(hangups(&w.take(b.conn)).is_empty());
        // No answer.
        let call = w.dial(&a, b.number, None);
        w.take(a.conn);
        w.take(b.conn);
        w.advance(Duration::from_secs(29));
        w.send(a.conn, ClientMsg::Heartbeat { seq: 1 });
        w.send(b.conn, ClientMsg::Heartbeat { seq: 1 });
        assert!(hangups(&w.take(a.conn)).is_empty());
        w.advance(Duration::from_secs(1));
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::NoAnswer)]);
        assert_eq!(hangups(&w.take(b.conn)), [(call, HangupReason::NoAnswer)]);
        // Accepting after that: unknown call.
        w.accept(&b, call, None);
        assert!(matches!(
            w.take(b.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::UnknownCall,
                ..
            }]
        ));
        // Busy: bob is ringing for carol's call, then in it.
        let call_cb = w.dial(&c, b.number, None);
        let call = w.dial(&a, b.number, None);
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Busy)]);
        w.accept(&b, call_cb, None);
        let call = w.dial(&a, b.number, None);
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Busy)]);
        // Not found, invalid numbers, offline, and oneself.
        for (number, reason) in [
            ("+15559999", HangupReason::NotFound),
            ("not a number", HangupReason::NotFound),
            ("", HangupReason::NotFound),
            ("+15550004", HangupReason::Offline),
            ("+15550001", HangupReason::Busy),
        ] {
            let call = w.dial(&a, number, None);
            assert_eq!(hangups(&w.take(a.conn)), [(call, reason)], "{number:?}");
        }
        assert_eq!(w.gw.active_calls(), 1);
    }

    #[test]
    fn hang_up_from_either_side() {
        let mut w = World::new();
        let a = w.login("alice", sim::SEND_ONLY);
        let b = w.login("bob", sim::SEND_ONLY);
        for caller_hangs_up in [true, false] {
            let call = w.dial(&a, b.number, Some(a.media()));
            w.accept(&b, call, Some(b.media()));
            w.take(a.conn);
            w.take(b.conn);
            let (op, shard, _) = installs(&w.take_shard())[0].clone();
            let _ = op;
            let (me, other) = if caller_hangs_up { (&a, &b) } else { (&b, &a) };
            w.send(me.conn, ClientMsg::HangUp { call });
            assert_eq!(hangups(&w.take(other.conn)), [(call, HangupReason::Normal)]);
            assert!(w.take(me.conn).is_empty());
            assert_eq!(removes(&w.take_shard()), [(shard, call)]);
        }
        // While ringing: the caller withdraws (callee told normal); the callee's hang-up is a
        // rejection.
        let call = w.dial(&a, b.number, None);
        w.take(b.conn);
        w.send(a.conn, ClientMsg::HangUp { call });
        assert_eq!(hangups(&w.take(b.conn)), [(call, HangupReason::Normal)]);
        let call = w.dial(&a, b.number, None);
        w.take(a.conn);
        w.send(b.conn, ClientMsg::HangUp { call });
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Rejected)]);
        // Accept or reject when it is not ringing.
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        w.take(b.conn);
        w.accept(&b, call, None);
        w.send(b.conn, ClientMsg::Reject { call });
        let errs = w.take(b.conn);
        assert_eq!(errs.len(), 2);
        assert!(errs.iter().all(|m| matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }
        )));
        // The caller cannot accept its own call.
        w.take(a.conn);
        w.accept(&a, call, None);
        assert!(matches!(
            w.take(a.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::UnknownCall,
                ..
            }]
        ));
        assert_eq!(w.gw.stats().shard_sessions, [1, 0]);
    }

    #[test]
    fn telephone_route_is_answered_at_once_through_the_gateway() {
        for (fw, forward, backward, delivery) in [
            (
                sim::OPEN,
                Path::UdpViaGateway,
                Path::UdpViaGateway,
                Delivery::UdpLatched,
            ),
            (
                sim::BLOCKED,
                Path::TcpInUdpOut,
                Path::UdpInTcpOut,
                Delivery::Tcp,
            ),
            (
                sim::SEND_ONLY,
                Path::UdpViaGateway,
                Path::UdpInTcpOut,
                Delivery::Tcp,
            ),
        ] {
            let mut w = World::new();
            let a = w.login("alice", fw);
            let call = w.dial(&a, "+4930123456", Some(a.media()));
            let msgs = w.take(a.conn);
            assert!(!msgs.iter().any(|m| matches!(m, ServerMsg::Ringing { .. })));
            let m = &media_of(&msgs)[0];
            assert_eq!(m.plan, Some(Plan { forward, backward }));
            assert!(m.send.via_gateway && m.recv.via_gateway);
            let spec = &installs(&w.take_shard())[0].2;
            assert_eq!(spec.legs.len(), 2);
            let mine = spec
                .legs
                .iter()
                .find(|l| Some(&l.name) == m.leg.as_ref())
                .expect("caller leg");
            assert_eq!(mine.delivery, delivery, "{fw:?}");
            let route = spec
                .legs
                .iter()
                .find(|l| Some(&l.name) != m.leg.as_ref())
                .expect("route leg");
            assert_eq!(route.delivery, Delivery::Udp(addr(sim::ROUTE_MEDIA)));
            assert_eq!(route.trusted_source, Some(addr(sim::ROUTE_MEDIA)));
            assert!(!route.key.is_empty());
            // The route's media address carries one call at a time.
            let b = w.login("bob", sim::OPEN);
            let call2 = w.dial(&b, "+4989000", Some(b.media()));
            assert_eq!(hangups(&w.take(b.conn)), [(call2, HangupReason::Busy)]);
            w.send(a.conn, ClientMsg::HangUp { call });
            assert_eq!(removes(&w.take_shard()).len(), 1);
            let call3 = w.dial(&b, "+4989000", Some(b.media()));
            assert_eq!(media_of(&w.take(b.conn))[0].call, call3);
        }
    }

    #[test]
    fn telephone_route_waits_for_the_callers_probe() {
        let mut w = World::new();
        let mut a = w.login_only("alice");
        a.fw = sim::SEND_ONLY;
        let call = w.dial(&a, "+4930123456", Some(a.media()));
        assert!(
            media_of(
                &w.inbox
                    .get(&a.conn)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect::<Vec<_>>()
            )
            .is_empty()
        );
        assert!(w.take_shard().is_empty());
        w.probe(&a);
        let m = media_of(&w.take(a.conn));
        assert_eq!(m[0].call, call);
        assert_eq!(installs(&w.take_shard()).len(), 1);
    }

    #[test]
    fn a_dial_before_the_probe_result_waits_for_it() {
        let mut w = World::new();
        let b = w.login("bob", sim::OPEN);
        let mut a = w.login_only("alice");
        a.fw = sim::NAT;
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        assert!(
            media_of(&w.take(b.conn)).is_empty(),
            "waits for alice's probe"
        );
        w.probe(&a);
        let mb = media_of(&w.take(b.conn));
        assert_eq!(
            mb[0].plan,
            Some(Plan {
                forward: Path::DirectUdp,
                backward: Path::UdpViaGateway
            })
        );
        // Bounded: a client that never answers its probe is planned at the probe timeout.
        let c = w.login_only("carol");
        let d = w.login("dave", sim::OPEN);
        let call = w.dial(&d, c.number, Some(d.media()));
        w.accept(&c, call, Some(c.media()));
        w.advance(Duration::from_secs(2));
        let mc = media_of(&w.take(c.conn));
        assert_eq!(mc.len(), 1);
        assert_eq!(mc[0].recv.transport, Transport::Tcp, "unprobed: no UDP in");
    }

    #[test]
    fn install_failure_and_hang_up_while_installing() {
        let mut w = World::new();
        w.auto_install = None;
        let a = w.login("alice", sim::BLOCKED);
        let b = w.login("bob", sim::BLOCKED);
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        assert!(
            media_of(&w.take(a.conn)).is_empty(),
            "media waits for the shard"
        );
        let op = w.pending_installs.remove(0);
        w.input(Input::ShardInstalled {
            op,
            result: Err("shard full".into()),
        });
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Error)]);
        assert_eq!(hangups(&w.take(b.conn)), [(call, HangupReason::Error)]);
        assert!(
            removes(&w.take_shard()).is_empty(),
            "nothing to remove: it was never installed"
        );
        assert_eq!(w.gw.stats().shard_sessions, [0, 0]);
        assert_eq!(w.gw.stats().calls_failed, 1);
        // Hang up while installing: removed at once; the late confirmation is ignored.
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        w.take(a.conn);
        let op = w.pending_installs.remove(0);
        w.send(a.conn, ClientMsg::HangUp { call });
        assert_eq!(removes(&w.take_shard()), [(0, call)]);
        w.input(Input::ShardInstalled { op, result: Ok(()) });
        assert!(media_of(&w.take(b.conn)).is_empty());
        assert!(w.gw.legs.is_empty());
        // Results for ops never issued are ignored.
        w.input(Input::ShardInstalled {
            op: 9999,
            result: Ok(()),
        });
    }

    #[test]
    fn private_media_destinations_are_refused_unless_allowed() {
        for allow in [false, true] {
            let mut w = World::with_config(GatewayConfig {
                allow_private_peers: allow,
                ..sim::config()
            });
            // Receive-only bob reports a private address: the gateway never delivers to a
            // reported address, so bob receives over TCP whatever the policy.
            let a = w.login_with("alice", caps(false, false, false));
            let b = w.login_with("bob", caps(false, true, false));
            let call = w.dial(&a, b.number, Some(a.media()));
            w.accept(&b, call, Some(addr("10.0.0.5:41000")));
            assert!(hangups(&w.take(b.conn)).is_empty());
            let spec = &installs(&w.take_shard())[0].2;
            assert!(
                spec.legs
                    .iter()
                    .all(|l| !matches!(l.delivery, Delivery::Udp(_))),
                "{spec:?}"
            );
            // A direct candidate at a private peer address: offered only when allowed; the
            // call goes through the gateway either way.
            let c = w.login_with("carol", caps(true, true, false));
            let d = w.login_with("dave", caps(true, true, false));
            let call = w.dial(&c, d.number, Some(c.media()));
            w.accept(&d, call, Some(addr("192.168.1.9:41000")));
            let mc = media_of(&w.take(c.conn));
            assert_eq!(mc.len(), 1, "allow={allow}");
            let p = mc[0].paths.as_ref().expect("paths");
            assert_eq!(p.send.direct.is_some(), allow, "allow={allow}");
            assert!(mc[0].send.via_gateway && mc[0].send.transport == Transport::Udp);
        }
    }

    #[test]
    fn operator_peer_lists_open_and_close_media_destinations() {
        // (allowed_peers, denied_peers, bob's announced media address, denied?). An announced
        // address is only ever a direct candidate: the policy decides whether alice is offered
        // it; the call goes through the gateway either way.
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&["10.20.0.0/16"], &[], "10.20.0.5:41000", false),
            (&["10.20.0.0/16"], &[], "10.21.0.5:41000", true),
            (
                &["10.20.0.0/16"],
                &["10.20.0.0/24"],
                "10.20.0.5:41000",
                true,
            ),
            (&[], &["203.0.113.0/24"], "203.0.113.9:41000", true),
            (&[], &[], "[64:ff9b::7f00:1]:41000", true),
            (&[], &[], "[2002:a00:1::1]:41000", true),
            (&[], &[], "198.18.0.1:41000", true),
            (&[], &[], "203.0.113.9:41000", false),
        ];
        for &(allowed, denied, media, refused) in cases {
            let parse = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
            let mut w = World::with_config(GatewayConfig {
                allowed_peers: parse(allowed),
                denied_peers: parse(denied),
                ..sim::config()
            });
            let a = w.login_with("alice", caps(true, true, false));
            let b = w.login_with("bob", caps(true, true, false));
            let call = w.dial(&a, b.number, Some(a.media()));
            w.accept(&b, call, Some(addr(media)));
            assert!(hangups(&w.take(b.conn)).is_empty(), "{media}");
            let ma = media_of(&w.take(a.conn));
            assert_eq!(ma.len(), 1, "{allowed:?} {denied:?} {media}");
            let direct = ma[0].paths.as_ref().and_then(|p| p.send.direct.as_ref());
            assert_eq!(
                direct.is_none(),
                refused,
                "{allowed:?} {denied:?} {media}: {direct:?}"
            );
            if let Some(d) = direct {
                assert_eq!(d.peer, canonical(addr(media)));
            }
            assert!(ma[0].send.via_gateway, "media starts through the gateway");
        }
    }

    /// A receive-only client that reports an unspecified address receives over TCP (never at a
    /// reported address); a client with no media address is TCP-only.
    #[test]
    fn unspecified_and_missing_media_addresses() {
        let mut w = World::new();
        let a = w.login_with("alice", caps(false, false, false));
        let b = w.login_with("bob", caps(false, true, false));
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(addr("0.0.0.0:41000")));
        let spec = &installs(&w.take_shard())[0].2;
        assert!(
            spec.legs.iter().all(|l| l.delivery == Delivery::Tcp),
            "{spec:?}"
        );
        let mb = media_of(&w.take(b.conn));
        assert_eq!(mb[0].recv.transport, Transport::Tcp);
        // No media address: TCP both ways for that client, whatever its firewall allows.
        let c = w.login_with("carol", caps(true, true, false));
        let d = w.login_with("dave", caps(true, true, false));
        let call = w.dial(&c, d.number, None);
        w.accept(&d, call, Some(d.media()));
        let mc = media_of(&w.take(c.conn));
        assert_eq!(
            (mc[0].send.transport, mc[0].recv.transport),
            (Transport::Tcp, Transport::Tcp)
        );
        let md = media_of(&w.take(d.conn));
        assert_eq!(
            md[0].plan,
            Some(Plan {
                forward: Path::TcpInUdpOut,
                backward: Path::UdpInTcpOut
            })
        );
    }

    #[test]
    fn shards_are_picked_by_load_then_index() {
        let mut w = World::new();
        let users = ["alice", "bob", "carol", "dave", "erin", "frank"];
        let cs: Vec<Client> = users
            .iter()
            .map(|u| w.login_with(u, caps(false, false, false)))
            .collect();
        let mut calls = Vec::new();
        for pair in cs.chunks(2) {
            let call = w.dial(&pair[0], pair[1].number, None);
            w.accept(&pair[1], call, None);
            calls.push((call, installs(&w.take_shard())[0].1));
        }
        assert_eq!(calls.iter().map(|c| c.1).collect::<Vec<_>>(), [0, 1, 0]);
        assert_eq!(w.gw.stats().shard_sessions, [2, 1]);
        // Shard 0's first call ends: the next call goes to shard 0 again (1 vs 1: lowest index).
        w.send(cs[0].conn, ClientMsg::HangUp { call: calls[0].0 });
        let call = w.dial(&cs[0], cs[1].number, None);
        w.accept(&cs[1], call, None);
        assert_eq!(installs(&w.take_shard())[0].1, 0);
        // Media addresses name the chosen shard's ports.
        w.send(cs[2].conn, ClientMsg::HangUp { call: calls[1].0 });
        w.take(cs[3].conn);
        let call = w.dial(&cs[2], cs[3].number, None);
        w.accept(&cs[2 + 1], call, None);
        let m = media_of(&w.take(cs[3].conn));
        assert_eq!(m[0].gateway_tcp, Some(addr("192.0.2.1:7402")));
    }

    #[test]
    fn shard_commands_use_the_servers_shard_indexes() {
        use crate::control::gateway::ShardInfo;
        let shards = vec![
            ShardInfo {
                index: 5,
                udp_port: 9005,
                tcp_port: 9105,
            },
            ShardInfo {
                index: 3,
                udp_port: 9003,
                tcp_port: 9103,
            },
        ];
        let mut w = World::build(sim::config(), shards);
        let a = w.login_with("alice", caps(false, false, false));
        let b = w.login_with("bob", caps(false, false, false));
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        assert_eq!(installs(&w.take_shard())[0].1, 3);
        let m = media_of(&w.take(a.conn));
        assert_eq!(m[0].gateway_tcp, Some(addr("192.0.2.1:9103")));
        w.send(a.conn, ClientMsg::HangUp { call });
        assert_eq!(removes(&w.take_shard()), [(3, call)]);
    }

    #[test]
    fn without_shards_calls_through_the_gateway_fail_cleanly() {
        let mut w = World::build(sim::config(), Vec::new());
        let a = w.login_with("alice", caps(false, false, false));
        let b = w.login_with("bob", caps(false, false, false));
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        assert_eq!(hangups(&w.take(a.conn)), [(call, HangupReason::Error)]);
        // Calls Table 1 gives direct start through the gateway too: they fail the same way.
        let c = w.login("carol", sim::OPEN);
        let d = w.login("dave", sim::OPEN);
        let call = w.dial(&c, d.number, Some(c.media()));
        w.accept(&d, call, Some(d.media()));
        assert_eq!(hangups(&w.take(c.conn)), [(call, HangupReason::Error)]);
    }

    #[test]
    fn several_calls_at_once_up_to_the_limit() {
        let mut w = World::with_config(GatewayConfig {
            max_calls_per_user: 2,
            ..sim::config()
        });
        let a = w.login("alice", sim::SEND_ONLY);
        let b = w.login("bob", sim::SEND_ONLY);
        let c = w.login("carol", sim::SEND_ONLY);
        let d = w.login("dave", sim::SEND_ONLY);
        let c1 = w.dial(&a, b.number, Some(a.media()));
        let c2 = w.dial(&a, c.number, Some(a.media()));
        w.accept(&b, c1, Some(b.media()));
        w.accept(&c, c2, Some(c.media()));
        let ma = media_of(&w.take(a.conn));
        assert_eq!(ma.iter().map(|m| m.call).collect::<Vec<_>>(), [c1, c2]);
        assert_ne!(ma[0].leg, ma[1].leg, "each call has its own leg");
        let c3 = w.dial(&a, d.number, Some(a.media()));
        let msgs = w.take(a.conn);
        assert_eq!(hangups(&msgs), [(c3, HangupReason::Error)]);
        // ... and says why.
        assert!(
            msgs.iter()
                .any(|m| matches!(m, ServerMsg::HangUp { detail: Some(d), .. }
            if d == "you are in 2 calls already, the most the gateway allows at once \
                    (max_calls_per_user = 2)")),
            "{msgs:?}"
        );
        // Alice is busy for incoming calls while in calls.
        let c4 = w.dial(&d, a.number, None);
        assert_eq!(hangups(&w.take(d.conn)), [(c4, HangupReason::Busy)]);
        assert_eq!(w.gw.stats().calls_up, 2);
    }

    // ---- media trouble ----

    fn trouble_setup(fa: sim::Firewall, fb: sim::Firewall) -> (World, Client, Client, CallId) {
        let mut w = World::new();
        let a = w.login("alice", fa);
        let b = w.login("bob", fb);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        w.take(a.conn);
        w.take(b.conn);
        (w, a, b, call)
    }

    #[test]
    fn media_trouble_replans_when_the_path_changed() {
        let (mut w, mut a, b, call) = trouble_setup(sim::SEND_ONLY, sim::SEND_ONLY);
        let old = installs(&w.take_shard());
        let old_legs: Vec<String> = old[0].2.legs.iter().map(|l| l.name.clone()).collect();
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        // Twice is once.
        w.send(b.conn, ClientMsg::MediaTrouble { call });
        // Alice's firewall opened meanwhile.
        a.fw = sim::OPEN;
        w.probe(&a);
        assert!(
            media_of(&w.take(a.conn)).is_empty(),
            "waits for bob's probe too"
        );
        w.probe(&b);
        let cmds = w.take_shard();
        assert_eq!(removes(&cmds), [(0, call)]);
        let new = installs(&cmds);
        assert_eq!(new.len(), 1);
        assert!(
            new[0].2.legs.iter().all(|l| !old_legs.contains(&l.name)),
            "new legs"
        );
        let (ma, mb) = (media_of(&w.take(a.conn)), media_of(&w.take(b.conn)));
        assert_eq!(
            ma[0].plan,
            Some(Plan {
                forward: Path::UdpInTcpOut,
                backward: Path::DirectUdp
            })
        );
        assert_eq!(mb[0].plan, ma[0].plan);
        assert_eq!(w.gw.stats().shard_sessions.iter().sum::<usize>(), 1);
        assert!(w.gw.leg_names().iter().all(|l| !old_legs.contains(l)));
    }

    /// `media_trouble` always changes something. Same plan: re-bind (fresh legs, same paths,
    /// fresh checks), then demote the complainer's receiving direction one step, re-bind,
    /// demote the other direction, re-bind; only when TCP through the gateway both ways was
    /// re-bound and still fails does the call end (`media_failed` to both).
    #[test]
    fn media_trouble_rebinds_then_demotes_and_ends_only_after_tcp_both_ways() {
        let (mut w, a, b, call) = trouble_setup(sim::OPEN, sim::OPEN);
        let mut legs: Vec<String> = installs(&w.take_shard())[0]
            .2
            .legs
            .iter()
            .map(|l| l.name.clone())
            .collect();
        let (u, t) = (Path::UdpViaGateway, Path::TcpBoth);
        // (forward, backward) in force after each trouble from bob, and whether each
        // direction is still a direct candidate.
        let steps = [
            ((u, u), (true, true)),   // re-bind
            ((t, u), (false, true)),  // bob's receiving (forward) demoted
            ((t, u), (false, true)),  // re-bind
            ((t, t), (false, false)), // forward is at the bottom: backward demoted
            ((t, t), (false, false)), // re-bind
        ];
        for (k, ((fwd, bwd), (cf, cb))) in steps.into_iter().enumerate() {
            w.send(b.conn, ClientMsg::MediaTrouble { call });
            w.probe(&a);
            w.probe(&b);
            let (ma, mb) = (media_of(&w.take(a.conn)), media_of(&w.take(b.conn)));
            assert_eq!(
                (ma.len(), mb.len()),
                (1, 1),
                "step {k}: fresh media to both"
            );
            let (pa, pb) = (
                ma[0].paths.as_ref().expect("paths"),
                mb[0].paths.as_ref().expect("paths"),
            );
            assert_eq!((pa.send.now, pa.recv.now), (fwd, bwd), "step {k}");
            assert_eq!((pb.send.now, pb.recv.now), (bwd, fwd), "step {k}");
            assert_eq!(pa.send.direct.is_some(), cf, "step {k}");
            assert_eq!(pb.send.direct.is_some(), cb, "step {k}");
            // The Table 1 decision itself is unchanged.
            assert_eq!(ma[0].plan.map(|p| p.forward), Some(Path::DirectUdp));
            let cmds = w.take_shard();
            assert_eq!(removes(&cmds), [(0, call)], "step {k}");
            let new: Vec<String> = installs(&cmds)[0]
                .2
                .legs
                .iter()
                .map(|l| l.name.clone())
                .collect();
            assert!(new.iter().all(|l| !legs.contains(l)), "step {k}: new legs");
            legs = new;
        }
        // TCP both ways, re-bound, still in trouble: the call ends, and says why.
        w.send(b.conn, ClientMsg::MediaTrouble { call });
        w.probe(&a);
        w.probe(&b);
        for c in [a.conn, b.conn] {
            let msgs = w.take(c);
            assert_eq!(hangups(&msgs), [(call, HangupReason::MediaFailed)]);
            let detail = msgs.iter().find_map(|m| match m {
                ServerMsg::HangUp { detail, .. } => detail.clone(),
                _ => None,
            });
            assert_eq!(
                detail.as_deref(),
                Some(TCP_BOTH_FAILED),
                "the reason says so"
            );
        }
        assert_eq!(removes(&w.take_shard()), [(0, call)]);
        assert_eq!(w.gw.stats().calls_failed, 1);
    }

    /// A re-probe that gets no report does not end the call: it re-binds like any trouble.
    #[test]
    fn media_trouble_with_a_failed_probe_rebinds_instead_of_ending() {
        let (mut w, a, b, call) = trouble_setup(sim::OPEN, sim::OPEN);
        w.take_shard();
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        w.probe(&a);
        w.advance(Duration::from_secs(2));
        assert!(hangups(&w.take(a.conn)).is_empty());
        assert!(hangups(&w.take(b.conn)).is_empty());
        let cmds = w.take_shard();
        assert_eq!(removes(&cmds), [(0, call)]);
        assert_eq!(installs(&cmds).len(), 1);
        assert_eq!(w.gw.stats().calls_failed, 0);
    }

    #[test]
    fn media_trouble_before_media_is_refused() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let call = w.dial(&a, b.number, None);
        w.take(a.conn);
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        assert!(matches!(
            w.take(a.conn).as_slice(),
            [ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }]
        ));
    }

    #[test]
    fn media_trouble_on_a_route_call_reprobes_the_caller_only() {
        let mut w = World::new();
        let mut a = w.login("alice", sim::SEND_ONLY);
        let call = w.dial(&a, "+4930123", Some(a.media()));
        w.take(a.conn);
        w.take_shard();
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        a.fw = sim::OPEN;
        w.probe(&a);
        let m = media_of(&w.take(a.conn));
        assert_eq!(
            m[0].plan,
            Some(Plan {
                forward: Path::UdpViaGateway,
                backward: Path::UdpViaGateway
            })
        );
        let cmds = w.take_shard();
        assert_eq!(removes(&cmds).len(), 1);
        assert_eq!(installs(&cmds)[0].2.legs.len(), 2);
    }

    // ---- rooms ----

    fn incoming(msgs: &[ServerMsg]) -> Option<(CallId, bool)> {
        msgs.iter().find_map(|m| match m {
            ServerMsg::Incoming {
                call, conference, ..
            } => Some((*call, *conference)),
            _ => None,
        })
    }

    fn add_legs(cmds: &[Action]) -> Vec<LegSpec> {
        cmds.iter()
            .filter_map(|a| match a {
                Action::AddLeg { leg, .. } => Some(leg.clone()),
                _ => None,
            })
            .collect()
    }

    fn remove_legs(cmds: &[Action]) -> Vec<String> {
        cmds.iter()
            .filter_map(|a| match a {
                Action::RemoveLeg { leg, .. } => Some(leg.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn room_join_and_leave() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::NAT);
        let c = w.login("carol", sim::BLOCKED);
        let d = w.login("dave", sim::RECV_ONLY);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 5,
                numbers: vec![
                    b.number.into(),
                    c.number.into(),
                    d.number.into(),
                    c.number.into(),
                ],
                media: Some(a.media()),
            },
        );
        let msgs = w.take(a.conn);
        let ServerMsg::Calling { tag: 5, call: room } = msgs[0] else {
            panic!("{msgs:?}");
        };
        assert_eq!(msgs[1], ServerMsg::Ringing { call: room });
        for x in [&b, &c, &d] {
            assert_eq!(incoming(&w.take(x.conn)), Some((room, true)));
        }
        // Bob accepts: the session is installed with alice's and bob's legs.
        w.accept(&b, room, Some(b.media()));
        let cmds = w.take_shard();
        let spec = &installs(&cmds)[0].2;
        assert_eq!(spec.id, room);
        assert_eq!(spec.legs.len(), 2);
        let (ma, mb) = (media_of(&w.take(a.conn)), media_of(&w.take(b.conn)));
        assert_eq!(ma[0].plan, None);
        assert!(ma[0].caller && !mb[0].caller);
        for m in [&ma[0], &mb[0]] {
            assert_eq!(
                m.send,
                MediaSend {
                    transport: Transport::Udp,
                    to: Some(addr(GW_UDP)),
                    via_gateway: true
                }
            );
            assert_eq!(
                m.recv,
                MediaRecv {
                    transport: Transport::Udp,
                    via_gateway: true,
                    from: Some(addr(GW_UDP))
                }
            );
        }
        assert!(spec.legs.iter().all(|l| l.delivery == Delivery::UdpLatched));
        let bob_leg = mb[0].leg.clone().unwrap_or_default();
        assert_eq!(
            spec.legs
                .iter()
                .find(|l| l.name == bob_leg)
                .map(|l| l.key.clone()),
            Some(leg_key(&b.key, &bob_leg))
        );
        // Carol (TCP only) and dave (receive only) join with AddLeg.
        w.accept(&c, room, Some(c.media()));
        w.accept(&d, room, Some(d.media()));
        let added = add_legs(&w.take_shard());
        assert_eq!(added.len(), 2);
        assert_eq!(added[0].delivery, Delivery::Tcp);
        // Dave cannot send UDP, so cannot bind a UDP source: TCP, never his reported address.
        assert_eq!(added[1].delivery, Delivery::Tcp);
        let mc = media_of(&w.take(c.conn));
        assert_eq!(
            (mc[0].send.transport, mc[0].recv.transport),
            (Transport::Tcp, Transport::Tcp)
        );
        assert_eq!(mc[0].send.to, Some(addr(GW_UDP)));
        let md = media_of(&w.take(d.conn));
        assert_eq!(
            (md[0].send.transport, md[0].recv.transport),
            (Transport::Tcp, Transport::Tcp)
        );
        assert!(
            media_of(&w.take(a.conn)).is_empty(),
            "existing members are not re-told"
        );
        let s = w.gw.stats();
        assert_eq!((s.rooms, s.room_members, s.shard_sessions[0]), (1, 4, 1));
        // Members are busy.
        let e = w.login("erin", sim::OPEN);
        let x = w.dial(&e, b.number, None);
        assert_eq!(hangups(&w.take(e.conn)), [(x, HangupReason::Busy)]);
        // The organizer leaves: the room goes on.
        w.send(a.conn, ClientMsg::HangUp { call: room });
        assert_eq!(
            remove_legs(&w.take_shard()),
            [ma[0].leg.clone().unwrap_or_default()]
        );
        assert!(hangups(&w.take(b.conn)).is_empty());
        // Bob drops off; then carol hangs up: dave alone, the room ends.
        w.input(Input::Disconnected { conn: b.conn });
        assert_eq!(remove_legs(&w.take_shard()), [bob_leg]);
        w.send(c.conn, ClientMsg::HangUp { call: room });
        let cmds = w.take_shard();
        assert_eq!(remove_legs(&cmds).len(), 1);
        assert_eq!(removes(&cmds), [(0, room)]);
        assert_eq!(hangups(&w.take(d.conn)), [(room, HangupReason::Normal)]);
        assert_eq!(w.gw.stats().rooms, 0);
    }

    #[test]
    fn room_invitations_reject_and_no_answer() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let c = w.login("carol", sim::OPEN);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![b.number.into(), c.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.send(b.conn, ClientMsg::Reject { call: room });
        assert!(
            hangups(&w.take(a.conn)).is_empty(),
            "alice and carol remain"
        );
        w.take(c.conn);
        w.advance(Duration::from_secs(30));
        assert_eq!(hangups(&w.take(c.conn)), [(room, HangupReason::NoAnswer)]);
        assert_eq!(hangups(&w.take(a.conn)), [(room, HangupReason::NoAnswer)]);
        assert!(w.take_shard().is_empty());
        // Nobody invitable: the first failure's reason.
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 2,
                numbers: vec!["+15550008".into(), "+15559999".into()],
                media: None,
            },
        );
        let msgs = w.take(a.conn);
        let room = match msgs[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        assert_eq!(hangups(&msgs), [(room, HangupReason::Offline)]);
        // Telephone numbers and too many numbers.
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 3,
                numbers: vec!["+4930111".into()],
                media: None,
            },
        );
        assert_eq!(
            hangups(&w.take(a.conn)).first().map(|h| h.1),
            Some(HangupReason::NotFound)
        );
        let many: Vec<String> = (0..16).map(|i| format!("+1555010{i:02}")).collect();
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 4,
                numbers: many,
                media: None,
            },
        );
        let msgs = w.take(a.conn);
        assert!(msgs.iter().any(|m| matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }
        )));
        assert_eq!(
            hangups(&msgs).first().map(|h| h.1),
            Some(HangupReason::Error)
        );
        assert_eq!(w.gw.active_calls(), 0);
    }

    #[test]
    fn room_install_waits_for_probes_and_failure_ends_it() {
        let mut w = World::new();
        w.auto_install = None;
        let a = w.login("alice", sim::OPEN);
        let mut b = w.login_only("bob");
        b.fw = sim::SEND_ONLY;
        let c = w.login("carol", sim::OPEN);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![b.number.into(), c.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.accept(&b, room, Some(b.media()));
        assert!(w.take_shard().is_empty(), "bob's probe is still running");
        w.probe(&b);
        assert_eq!(installs(&w.take_shard()).len(), 1);
        // Carol accepts while the install is pending: AddLeg now, media when it is confirmed.
        w.accept(&c, room, Some(c.media()));
        assert_eq!(add_legs(&w.take_shard()).len(), 1);
        assert!(media_of(&w.take(c.conn)).is_empty());
        let op = w.pending_installs.remove(0);
        w.input(Input::ShardInstalled { op, result: Ok(()) });
        for x in [&a, &b, &c] {
            assert_eq!(media_of(&w.take(x.conn)).len(), 1);
        }
        // A second room whose install fails ends with an error for everyone in it.
        let d = w.login("dave", sim::OPEN);
        let e = w.login("erin", sim::OPEN);
        w.send(
            d.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![e.number.into()],
                media: Some(d.media()),
            },
        );
        let room2 = match w.take(d.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.accept(&e, room2, Some(e.media()));
        let op = w.pending_installs.remove(0);
        w.input(Input::ShardInstalled {
            op,
            result: Err("no".into()),
        });
        assert_eq!(hangups(&w.take(d.conn)), [(room2, HangupReason::Error)]);
        assert_eq!(hangups(&w.take(e.conn)), [(room2, HangupReason::Error)]);
        assert_eq!(w.gw.stats().shard_sessions, [1, 0]);
    }

    #[test]
    fn room_media_trouble_rejoins_or_drops_the_member() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let mut b = w.login("bob", sim::SEND_ONLY);
        let c = w.login("carol", sim::OPEN);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![b.number.into(), c.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.accept(&b, room, Some(b.media()));
        w.accept(&c, room, Some(c.media()));
        let old_b = media_of(&w.take(b.conn))[0].leg.clone().unwrap_or_default();
        w.take_shard();
        // Bob's path changed (now he receives UDP): new leg.
        w.send(b.conn, ClientMsg::MediaTrouble { call: room });
        b.fw = sim::OPEN;
        w.probe(&b);
        let cmds = w.take_shard();
        assert_eq!(remove_legs(&cmds), [old_b]);
        assert_eq!(add_legs(&cmds).len(), 1);
        let mb = media_of(&w.take(b.conn));
        assert_eq!(mb[0].recv.transport, Transport::Udp);
        // Nothing changes any more: re-bind (UDP, new leg), demote (TCP both ways), re-bind
        // (TCP), and only then does bob leave with media_failed; the room goes on.
        for (k, want) in [
            (Transport::Udp, Transport::Udp),
            (Transport::Tcp, Transport::Tcp),
            (Transport::Tcp, Transport::Tcp),
        ]
        .into_iter()
        .enumerate()
        {
            w.send(b.conn, ClientMsg::MediaTrouble { call: room });
            w.probe(&b);
            let cmds = w.take_shard();
            assert_eq!(remove_legs(&cmds).len(), 1, "step {k}");
            assert_eq!(add_legs(&cmds).len(), 1, "step {k}");
            let mb = media_of(&w.take(b.conn));
            assert_eq!(
                (mb[0].send.transport, mb[0].recv.transport),
                want,
                "step {k}"
            );
        }
        w.send(b.conn, ClientMsg::MediaTrouble { call: room });
        w.probe(&b);
        assert_eq!(
            hangups(&w.take(b.conn)),
            [(room, HangupReason::MediaFailed)]
        );
        assert_eq!(remove_legs(&w.take_shard()).len(), 1);
        assert!(hangups(&w.take(a.conn)).is_empty());
        assert_eq!(w.gw.stats().room_members, 2);
    }

    #[test]
    fn members_that_leave_empty_the_session_and_late_joiners_reinstall() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::OPEN);
        let c = w.login("carol", sim::OPEN);
        let d = w.login("dave", sim::OPEN);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![b.number.into(), c.number.into(), d.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.accept(&b, room, Some(b.media()));
        assert_eq!(installs(&w.take_shard()).len(), 1);
        // Alice and bob leave before carol and dave answer: the session goes, the room stays.
        w.send(a.conn, ClientMsg::HangUp { call: room });
        w.send(b.conn, ClientMsg::HangUp { call: room });
        let cmds = w.take_shard();
        assert_eq!(remove_legs(&cmds).len(), 2);
        assert_eq!(removes(&cmds), [(0, room)]);
        w.accept(&c, room, Some(c.media()));
        assert!(
            w.take_shard().is_empty(),
            "carol alone: nothing to install yet"
        );
        w.accept(&d, room, Some(d.media()));
        let spec = &installs(&w.take_shard())[0].2;
        assert_eq!(spec.legs.len(), 2);
        assert_eq!(media_of(&w.take(c.conn)).len(), 1);
    }

    // ---- media_ready ----

    fn readies(msgs: &[ServerMsg]) -> Vec<CallId> {
        msgs.iter()
            .filter_map(|m| match m {
                ServerMsg::MediaReady { call } => Some(*call),
                _ => None,
            })
            .collect()
    }

    fn other_transport(t: Transport) -> Transport {
        match t {
            Transport::Udp => Transport::Tcp,
            Transport::Tcp => Transport::Udp,
        }
    }

    fn bound(w: &mut World, session: CallId, leg: &str, transport: Transport) {
        w.input(Input::LegBound {
            session,
            leg: leg.into(),
            transport,
        });
    }

    /// The binding `media_ready` waits for on a client's leg, from the brief and independently
    /// of `media.rs`: none when it receives directly; TCP when it receives over TCP; UDP when
    /// it receives UDP via the gateway and can send UDP (the gateway latches its binding);
    /// none when it cannot (the gateway sends to its fixed media address).
    fn expected_awaited(inn: Path, me: Capabilities) -> Option<Transport> {
        if inn == Path::DirectUdp {
            None
        } else if inn.receiver_transport() == Transport::Tcp {
            Some(Transport::Tcp)
        } else {
            assert!(me.send_udp, "UDP delivery only to a client that binds");
            Some(Transport::Udp)
        }
    }

    /// All 16 cases of Table 1 with the four NAT combinations: exactly the delivery legs that
    /// need a binding are awaited; `media_ready` goes to both parties once, right after the
    /// last of them is bound (and right after `media` when none is needed); wrong transports,
    /// legs that need nothing, other sessions and repeats change nothing.
    #[test]
    fn table1_media_ready_waits_for_exactly_the_delivery_legs() {
        let row = |i: u8| match i {
            0 => (true, false),
            1 => (false, true),
            2 => (false, false),
            _ => (true, true),
        };
        let mut immediate = Vec::new();
        for case in 0..16u8 {
            for nat in 0..4u8 {
                let ca = caps(row(case / 4).0, row(case / 4).1, nat & 1 != 0);
                let cb = caps(row(case % 4).0, row(case % 4).1, nat & 2 != 0);
                let what = format!("case {} caller {ca:?} callee {cb:?}", case + 1);
                let target = planner::plan(ca, cb);
                let plan = Plan {
                    forward: paths::start_path(target.forward, cb),
                    backward: paths::start_path(target.backward, ca),
                };
                let (mut w, a, b, call, msgs_a, msgs_b, _) = call_with_msgs(ca, cb);
                let (ma, mb) = (media_of(&msgs_a), media_of(&msgs_b));
                let mut awaited = Vec::new();
                let mut free = Vec::new();
                for (m, caller, me) in [(&ma[0], true, ca), (&mb[0], false, cb)] {
                    let (_, inn) = directions(plan, caller);
                    match (&m.leg, expected_awaited(inn, me)) {
                        (Some(leg), Some(t)) => awaited.push((leg.clone(), t)),
                        (Some(leg), None) => free.push(leg.clone()),
                        (None, t) => assert_eq!(t, None, "{what}: a leg-less side awaits nothing"),
                    }
                }
                let Some(Call::Pair(p)) = w.gw.calls.get(&call) else {
                    panic!("{what}: the call is up")
                };
                let mut recorded: Vec<(String, Transport)> = p
                    .ready
                    .awaited
                    .iter()
                    .map(|(l, t, _)| (l.clone(), *t))
                    .collect();
                recorded.sort_by_key(|(l, t)| (l.clone(), *t == Transport::Tcp));
                let mut want = awaited.clone();
                want.sort_by_key(|(l, t)| (l.clone(), *t == Transport::Tcp));
                assert_eq!(recorded, want, "{what}: the awaited legs");
                if awaited.is_empty() {
                    immediate.push((case + 1, nat));
                    for msgs in [&msgs_a, &msgs_b] {
                        assert!(
                            matches!(
                                msgs.as_slice(),
                                [ServerMsg::Media(_), ServerMsg::MediaReady { call: c }] if *c == call
                            ),
                            "{what}: media_ready right after media: {msgs:?}"
                        );
                    }
                    // Bindings of legs that need none change nothing.
                    for leg in &free {
                        bound(&mut w, call, leg, Transport::Udp);
                        bound(&mut w, call, leg, Transport::Tcp);
                    }
                    assert!(w.take(a.conn).is_empty() && w.take(b.conn).is_empty());
                    continue;
                }
                assert!(
                    readies(&msgs_a).is_empty() && readies(&msgs_b).is_empty(),
                    "{what}: nothing bound yet"
                );
                for (leg, t) in &awaited {
                    bound(&mut w, call, leg, other_transport(*t));
                    bound(&mut w, call + 1000, leg, *t);
                    bound(&mut w, call, &format!("{leg}x"), *t);
                }
                for leg in &free {
                    bound(&mut w, call, leg, Transport::Udp);
                    bound(&mut w, call, leg, Transport::Tcp);
                }
                assert!(
                    w.take(a.conn).is_empty() && w.take(b.conn).is_empty(),
                    "{what}: stray bindings change nothing"
                );
                if nat & 1 != 0 {
                    awaited.reverse();
                }
                for (i, (leg, t)) in awaited.iter().enumerate() {
                    bound(&mut w, call, leg, *t);
                    let (ra, rb) = (readies(&w.take(a.conn)), readies(&w.take(b.conn)));
                    if i + 1 < awaited.len() {
                        assert!(ra.is_empty() && rb.is_empty(), "{what}: not all bound");
                    } else {
                        assert_eq!((ra, rb), (vec![call], vec![call]), "{what}");
                    }
                }
                // A UDP leg re-binding from a new address is reported again: nothing more.
                for (leg, t) in &awaited {
                    bound(&mut w, call, leg, *t);
                }
                assert!(
                    w.take(a.conn).is_empty() && w.take(b.conn).is_empty(),
                    "{what}"
                );
            }
        }
        // Every call now starts through the gateway, delivering only to bound legs: each
        // waits for its bindings.
        assert_eq!(immediate, [], "no call needs no binding");
    }

    /// A receive-only client (it cannot send UDP, so it cannot bind a UDP source) gets its
    /// media over TCP, never at its reported address: both TCP legs are awaited.
    #[test]
    fn a_receive_only_client_is_delivered_over_tcp_and_awaited() {
        let (mut w, a, b, call, msgs_a, msgs_b, cmds) =
            call_with_msgs(caps(false, false, false), caps(false, true, false));
        let spec = &installs(&cmds)[0].2;
        assert!(spec.legs.iter().all(|l| l.delivery == Delivery::Tcp));
        assert!(readies(&msgs_a).is_empty() && readies(&msgs_b).is_empty());
        bound(&mut w, call, &spec.legs[0].name, Transport::Tcp);
        assert!(readies(&w.take(a.conn)).is_empty());
        bound(&mut w, call, &spec.legs[1].name, Transport::Tcp);
        assert_eq!(readies(&w.take(a.conn)), [call]);
        assert_eq!(readies(&w.take(b.conn)), [call]);
    }

    #[test]
    fn route_calls_wait_for_the_callers_leg_only() {
        for (fw, want) in [
            (sim::OPEN, Some(Transport::Udp)),
            (sim::NAT, Some(Transport::Udp)),
            (sim::BLOCKED, Some(Transport::Tcp)),
            (sim::SEND_ONLY, Some(Transport::Tcp)),
            (sim::RECV_ONLY, Some(Transport::Tcp)),
        ] {
            let mut w = World::new();
            let a = w.login("alice", fw);
            let call = w.dial(&a, "+4930123456", Some(a.media()));
            let msgs = w.take(a.conn);
            let mine = media_of(&msgs)[0].leg.clone().expect("the caller's leg");
            let spec = &installs(&w.take_shard())[0].2;
            let route = spec
                .legs
                .iter()
                .find(|l| l.name != mine)
                .map(|l| l.name.clone())
                .expect("the route's leg");
            let Some(t) = want else {
                assert_eq!(readies(&msgs), [call], "{fw:?}: nothing to wait for");
                continue;
            };
            assert!(readies(&msgs).is_empty(), "{fw:?}");
            bound(&mut w, call, &route, Transport::Udp);
            bound(&mut w, call, &mine, other_transport(t));
            assert!(
                w.take(a.conn).is_empty(),
                "{fw:?}: the route leg is never awaited"
            );
            bound(&mut w, call, &mine, t);
            assert_eq!(w.take(a.conn), [ServerMsg::MediaReady { call }], "{fw:?}");
        }
    }

    /// After a re-plan the new legs are awaited (old ones no longer count), and each plan gets
    /// its own `media_ready`, whether or not the old plan was ever ready.
    #[test]
    fn a_replan_waits_for_the_new_legs() {
        let mut w = World::new();
        let mut a = w.login("alice", sim::SEND_ONLY);
        let b = w.login("bob", sim::SEND_ONLY);
        let call = w.dial(&a, b.number, Some(a.media()));
        w.accept(&b, call, Some(b.media()));
        let (ma, mb) = (media_of(&w.take(a.conn)), media_of(&w.take(b.conn)));
        let (old_a, old_b) = (ma[0].leg.clone().unwrap(), mb[0].leg.clone().unwrap());
        // Both receive over TCP: both legs are awaited.
        bound(&mut w, call, &old_a, Transport::Tcp);
        assert!(readies(&w.take(b.conn)).is_empty());
        bound(&mut w, call, &old_b, Transport::Tcp);
        assert_eq!(readies(&w.take(a.conn)), [call]);
        assert_eq!(readies(&w.take(b.conn)), [call]);
        // Alice's firewall opens; the re-plan has her receive directly and bob over TCP.
        w.send(a.conn, ClientMsg::MediaTrouble { call });
        a.fw = sim::OPEN;
        w.probe(&a);
        w.probe(&b);
        let (msgs_a, msgs_b) = (w.take(a.conn), w.take(b.conn));
        let (ma, mb) = (media_of(&msgs_a), media_of(&msgs_b));
        assert_eq!(
            ma[0].plan,
            Some(Plan {
                forward: Path::UdpInTcpOut,
                backward: Path::DirectUdp
            })
        );
        assert!(readies(&msgs_a).is_empty() && readies(&msgs_b).is_empty());
        let (new_a, new_b) = (ma[0].leg.clone().unwrap(), mb[0].leg.clone().unwrap());
        // The old legs' bindings (reported again, or late) do not count.
        bound(&mut w, call, &old_a, Transport::Tcp);
        bound(&mut w, call, &old_b, Transport::Tcp);
        // Alice's new leg delivers nothing (she receives directly): not awaited.
        bound(&mut w, call, &new_a, Transport::Udp);
        assert!(w.take(a.conn).is_empty() && w.take(b.conn).is_empty());
        bound(&mut w, call, &new_b, Transport::Tcp);
        assert_eq!(w.take(a.conn), [ServerMsg::MediaReady { call }]);
        assert_eq!(w.take(b.conn), [ServerMsg::MediaReady { call }]);
        // A re-plan before the first plan was ready: the telephone route caller.
        let mut c = w.login("carol", sim::SEND_ONLY);
        let call = w.dial(&c, "+4930123", Some(c.media()));
        let old = media_of(&w.take(c.conn))[0].leg.clone().unwrap();
        w.send(c.conn, ClientMsg::MediaTrouble { call });
        c.fw = sim::OPEN;
        w.probe(&c);
        let msgs = w.take(c.conn);
        assert!(readies(&msgs).is_empty());
        let new = media_of(&msgs)[0].leg.clone().unwrap();
        bound(&mut w, call, &old, Transport::Tcp);
        assert!(w.take(c.conn).is_empty(), "the old plan's leg is gone");
        bound(&mut w, call, &new, Transport::Udp);
        assert_eq!(w.take(c.conn), [ServerMsg::MediaReady { call }]);
    }

    #[test]
    fn room_members_are_ready_once_their_own_leg_is_bound() {
        let mut w = World::new();
        let a = w.login("alice", sim::OPEN);
        let b = w.login("bob", sim::NAT);
        let mut c = w.login("carol", sim::BLOCKED);
        let d = w.login("dave", sim::RECV_ONLY);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![b.number.into(), c.number.into(), d.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        for x in [&b, &c, &d] {
            w.take(x.conn);
        }
        w.accept(&b, room, Some(b.media()));
        let (ma, mb) = (media_of(&w.take(a.conn)), media_of(&w.take(b.conn)));
        let (la, lb) = (ma[0].leg.clone().unwrap(), mb[0].leg.clone().unwrap());
        // Bob's UDP binding: bob is ready, alice is not.
        bound(&mut w, room, &lb, Transport::Udp);
        assert_eq!(w.take(b.conn), [ServerMsg::MediaReady { call: room }]);
        assert!(w.take(a.conn).is_empty());
        bound(&mut w, room, &la, Transport::Tcp);
        assert!(w.take(a.conn).is_empty(), "alice's delivery is UDP");
        bound(&mut w, room, &la, Transport::Udp);
        assert_eq!(w.take(a.conn), [ServerMsg::MediaReady { call: room }]);
        // Carol (TCP) and dave (receive-only: delivered over TCP) wait for their bindings.
        w.accept(&c, room, Some(c.media()));
        w.accept(&d, room, Some(d.media()));
        let msgs_c = w.take(c.conn);
        assert!(readies(&msgs_c).is_empty());
        let lc = media_of(&msgs_c)[0].leg.clone().unwrap();
        let msgs_d = w.take(d.conn);
        assert!(readies(&msgs_d).is_empty());
        let ld = media_of(&msgs_d)[0].leg.clone().unwrap();
        bound(&mut w, room, &ld, Transport::Tcp);
        assert_eq!(w.take(d.conn), [ServerMsg::MediaReady { call: room }]);
        bound(&mut w, room, &lc, Transport::Tcp);
        assert_eq!(w.take(c.conn), [ServerMsg::MediaReady { call: room }]);
        // Re-bindings and others' bindings tell nobody anything.
        bound(&mut w, room, &la, Transport::Udp);
        bound(&mut w, room, &lb, Transport::Udp);
        for x in [&a, &b, &c, &d] {
            assert!(w.take(x.conn).is_empty());
        }
        // Carol's path changes (now UDP): her new leg is awaited, the old one is gone.
        w.send(c.conn, ClientMsg::MediaTrouble { call: room });
        c.fw = sim::OPEN;
        w.probe(&c);
        let msgs_c = w.take(c.conn);
        assert!(readies(&msgs_c).is_empty());
        let lc2 = media_of(&msgs_c)[0].leg.clone().unwrap();
        bound(&mut w, room, &lc, Transport::Tcp);
        assert!(w.take(c.conn).is_empty());
        bound(&mut w, room, &lc2, Transport::Udp);
        assert_eq!(w.take(c.conn), [ServerMsg::MediaReady { call: room }]);
        for x in [&a, &b, &d] {
            assert!(w.take(x.conn).is_empty(), "only carol re-planned");
        }
    }

    /// Bindings reported before `media` went out (a room or call still installing) are
    /// remembered: `media_ready` follows `media`. Bindings for ended calls, unknown sessions
    /// and unknown legs are ignored.
    #[test]
    fn early_and_stray_bindings() {
        let mut w = World::new();
        w.auto_install = None;
        let a = w.login("alice", sim::BLOCKED);
        let b = w.login("bob", sim::BLOCKED);
        let call = w.dial(&a, b.number, None);
        w.accept(&b, call, None);
        w.take(a.conn);
        w.take(b.conn);
        let spec = installs(&w.take_shard()).remove(0).2;
        for l in &spec.legs {
            assert_eq!(l.delivery, Delivery::Tcp);
            bound(&mut w, call, &l.name, Transport::Tcp);
        }
        assert!(w.take(a.conn).is_empty(), "no media yet: no media_ready");
        let op = w.pending_installs.remove(0);
        w.input(Input::ShardInstalled { op, result: Ok(()) });
        for x in [&a, &b] {
            assert!(matches!(
                w.take(x.conn).as_slice(),
                [ServerMsg::Media(_), ServerMsg::MediaReady { call: c }] if *c == call
            ));
        }
        bound(&mut w, 9999, &spec.legs[0].name, Transport::Tcp);
        bound(&mut w, call, "no-such-leg", Transport::Udp);
        w.send(a.conn, ClientMsg::HangUp { call });
        w.take(b.conn);
        bound(&mut w, call, &spec.legs[1].name, Transport::Tcp);
        assert!(w.take(a.conn).is_empty() && w.take(b.conn).is_empty());
        // A room member's binding while the room is installing.
        let c = w.login("carol", sim::OPEN);
        w.send(
            a.conn,
            ClientMsg::Conference {
                tag: 1,
                numbers: vec![c.number.into()],
                media: Some(a.media()),
            },
        );
        let room = match w.take(a.conn)[0] {
            ServerMsg::Calling { call, .. } => call,
            _ => panic!(),
        };
        w.take(c.conn);
        w.accept(&c, room, Some(c.media()));
        let spec = installs(&w.take_shard()).remove(0).2;
        let carol = spec
            .legs
            .iter()
            .find(|l| l.delivery == Delivery::UdpLatched)
            .expect("carol's leg");
        bound(&mut w, room, &carol.name, Transport::Udp);
        assert!(w.take(c.conn).is_empty());
        let op = w.pending_installs.remove(0);
        w.input(Input::ShardInstalled { op, result: Ok(()) });
        assert!(matches!(
            w.take(c.conn).as_slice(),
            [ServerMsg::Media(_), ServerMsg::MediaReady { call }] if *call == room
        ));
        assert!(
            readies(&w.take(a.conn)).is_empty(),
            "alice's TCP leg is not bound"
        );
    }
}
