//! The control protocol between softphones and the gateway (documented in
//! `docs/PROTOCOL.md`): on a TCP connection to the control port, each message is a 2-byte
//! big-endian length followed by that many bytes of one UTF-8 JSON object whose `"type"` names
//! the message. JSON keeps the protocol readable in a capture and easy to script; the length
//! prefix bounds every message (at most [`MAX_MESSAGE`] bytes), so a peer can never make the
//! other side buffer without limit.
//!
//! Versioning: the client's first message is `hello` with the highest `version` it speaks; the
//! gateway answers with a `challenge` (it speaks that version) or a `refused` with code
//! `version`. Fields added later are optional, and unknown fields are ignored, so minor
//! additions do not need a new version.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use super::path::{Capabilities, Path, Plan, Transport};

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest JSON body accepted or sent, in bytes.
pub const MAX_MESSAGE: usize = 8192;
/// Longest `detail` of a `hang_up`, in bytes.
pub const MAX_DETAIL: usize = 400;
/// The control port a gateway listens on by default.
pub const DEFAULT_PORT: u16 = 7400;

pub type CallId = u64;

/// Messages a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message: SCRAM client-first (user name and client nonce).
    Hello {
        version: u16,
        user: String,
        nonce: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        software: Option<String>,
    },
    /// SCRAM client-final: channel binding (`biws`), the combined nonce, base64 proof.
    Proof {
        channel_binding: String,
        nonce: String,
        proof: String,
    },
    /// "I am still here" (also the answer to a `poll`).
    Heartbeat {
        seq: u64,
    },
    /// The local address of the socket the client probes from (NAT detection: the gateway
    /// compares it with the source it observes).
    ProbeLocal {
        probe: u32,
        local: SocketAddr,
    },
    /// Which of the gateway's probe datagrams arrived.
    ProbeReport {
        probe: u32,
        got_a: bool,
        got_b: bool,
    },
    /// Ask to be probed again (e.g. after a network change).
    Reprobe,
    /// Place a call by number. `tag` is the client's own reference, echoed in `calling`.
    /// `media` is the local address of the UDP socket the client will use for this call.
    Dial {
        tag: u32,
        number: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<SocketAddr>,
    },
    /// Start a conference room and invite these numbers; everyone hears everyone.
    Conference {
        tag: u32,
        numbers: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<SocketAddr>,
    },
    Accept {
        call: CallId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<SocketAddr>,
    },
    Reject {
        call: CallId,
    },
    HangUp {
        call: CallId,
    },
    /// The media path stopped working (nothing received for a while): ask the gateway to
    /// re-probe and re-plan, or end the call with a reason.
    MediaTrouble {
        call: CallId,
    },
    /// Log out.
    Bye,
    /// Which of these numbers (the user's contacts, at most [`MAX_PRESENCE_NUMBERS`]) are
    /// online now? Answered with `presence`.
    PresenceQuery {
        numbers: Vec<String>,
    },
    /// Take back a call this client is in after its control connection was lost (its
    /// gateway died, or the connection was reset): `token` is the call's `resume_token`.
    /// Answered with `resumed`, or `hang_up` when the call cannot be resumed (then it is over).
    Resume {
        call: CallId,
        token: String,
    },
}

/// Longest `resume` token a gateway takes, in bytes.
pub const MAX_RESUME_TOKEN: usize = 300;

/// Most numbers one `presence_query` may ask about.
pub const MAX_PRESENCE_NUMBERS: usize = 32;

/// Messages the gateway sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// SCRAM server-first: combined nonce, base64 salt, iteration count.
    Challenge {
        nonce: String,
        salt: String,
        iterations: u32,
    },
    /// Log-in succeeded: the gateway's SCRAM signature (base64) proves it holds the verifier.
    Welcome {
        session: u64,
        signature: String,
        user: String,
        number: String,
        heartbeat_ms: u32,
        /// Heart-beats a client may miss before it is offline.
        misses: u32,
        /// The client's address as the gateway sees the control connection.
        observed: SocketAddr,
    },
    /// Log-in failed, or the session is being closed; the connection closes after this.
    Refused {
        code: ErrorCode,
        message: String,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// The gateway has not heard from the client for a heart-beat interval: answer with a
    /// heartbeat.
    Poll {
        seq: u64,
    },
    /// Start probing: send a STUN Binding (USERNAME = token, MESSAGE-INTEGRITY keyed by the
    /// token) from the probe socket to `port_a` on the gateway, and report the socket's local
    /// address with `probe_local`.
    ProbeBegin {
        probe: u32,
        port_a: u16,
        port_b: u16,
        token: String,
        timeout_ms: u32,
    },
    /// The gateway has sent its probe datagrams (from `port_a` and `port_b`): report which
    /// arrived, after waiting at most `grace_ms` for any still on the way.
    ProbeCheck {
        probe: u32,
        grace_ms: u32,
    },
    ProbeResult {
        probe: u32,
        capabilities: Capabilities,
        /// The client's UDP address as the probe port saw it (its mapped address).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mapped: Option<SocketAddr>,
        /// The mapped address differs from the local one (address translation).
        translated: bool,
    },
    /// The gateway took a `dial` / `conference`: this is its call id.
    Calling {
        tag: u32,
        call: CallId,
    },
    /// The callee is being alerted.
    Ringing {
        call: CallId,
    },
    /// Someone is calling this client.
    Incoming {
        call: CallId,
        from_number: String,
        /// The caller as shown to the callee. The gateway sends the caller's number here too:
        /// log-in names are never revealed to other subscribers.
        from_user: String,
        conference: bool,
    },
    /// The call is up: how this client sends and receives media.
    Media(MediaInstructions),
    /// Every leg of the call that the gateway delivers to is bound: media sent from now on
    /// reaches the other side. Clients bind at once on `media`, and start sending audio on
    /// `media_ready` (so that nothing is lost while the other side is still binding).
    MediaReady {
        call: CallId,
    },
    /// The call is over (or never started), and why. `detail`, when present, says it in
    /// words a user can act on (at most [`MAX_DETAIL`] bytes; clients print it).
    HangUp {
        call: CallId,
        reason: HangupReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The gateway is going away (draining before a restart): log in to another gateway, one
    /// of `gateways` when given (control addresses, best first), else one of the client's own
    /// list. Sent when the client has no call on this gateway (at once, or when its last call
    /// ends: calls in progress are never cut for it); the connection closes right after.
    GoingAway {
        message: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gateways: Vec<String>,
    },
    /// The answer to `presence_query`: the numbers asked about that are online now (logged in
    /// and heart-beating), in the order asked.
    Presence {
        online: Vec<String>,
    },
    /// The call is relayed by a gateway of a fleet: should this client's control connection
    /// be lost during the call, it may log in to any gateway of the fleet and send
    /// `resume{call, token}` there; its media goes on meanwhile. Opaque to clients (at most
    /// [`MAX_RESUME_TOKEN`] bytes).
    ResumeToken {
        call: CallId,
        token: String,
    },
    /// The answer to `resume`: this connection carries the call's control messages now.
    Resumed {
        call: CallId,
    },
}

/// Where and how one client sends and receives media for one call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaInstructions {
    pub call: CallId,
    /// The planner's decision, caller→callee (`forward`) and callee→caller (`backward`).
    /// Absent in conference rooms, where everything goes through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Whether this client is the caller (`forward` is its sending direction).
    pub caller: bool,
    pub send: MediaSend,
    pub recv: MediaRecv,
    /// The leg this client binds at the gateway (STUN USERNAME; the key is derived from the
    /// session key), when any of its media goes through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leg: Option<String>,
    /// The shard's UDP and TCP media addresses, as this client reaches the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_udp: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_tcp: Option<SocketAddr>,
    /// TCP media to `gateway_tcp` runs inside TLS (ALPN `voxgate-media`), verified like the
    /// control channel's. Absent: plain RFC 4571.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway_tcp_tls: bool,
    /// RTP payload type and clock rate (0 / 8000: G.711 µ-law).
    pub payload_type: u8,
    pub clock_rate: u32,
    /// Proven paths: per direction, the path in force, the explicit fallback order and the
    /// direct candidate to check (two-party calls). Absent from gateways that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Box<PathOrders>>,
    /// This call is relayed by another gateway of the fleet: its leg keys and sealed check
    /// keys come from the call key `fleet_call_key(session key, call)`, not the session key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub call_key: bool,
}

/// The fallback orders of this client's two directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathOrders {
    pub send: PathOrder,
    pub recv: PathOrder,
}

/// One direction's paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathOrder {
    /// The path this direction uses now (`send`/`recv` say where that is).
    pub now: Path,
    /// Every path this direction may take, best first: `direct_udp` (only with `direct`), then
    /// `now`, then each step down (`udp_via_gateway` → `tcp_both`). At most 4 entries.
    pub order: Vec<Path>,
    /// A direct UDP candidate, used only once connectivity checks prove it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<DirectCandidate>,
}

/// A direct path to prove with keyed STUN checks before any media uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectCandidate {
    /// The peer's announced media address (a candidate, never a destination until proven).
    pub peer: SocketAddr,
    /// STUN USERNAME of this direction's checks.
    pub username: String,
    /// The direction's check key, sealed under this client's session key (base64, 64 chars).
    pub key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaSend {
    pub transport: Transport,
    /// Where to send: the peer (direct UDP), or the gateway's UDP or TCP media address.
    /// Absent when this client has nobody to send to (a listener in a room of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<SocketAddr>,
    pub via_gateway: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecv {
    pub transport: Transport,
    pub via_gateway: bool,
    /// The address media comes from, when known (the peer for direct UDP, the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A message that does not parse, or one that is not valid in this state.
    BadMessage,
    /// The protocol version is not supported.
    Version,
    /// Wrong user or password (the two are not told apart).
    AuthFailed,
    /// Too many failed log-ins from this address or for this user.
    RateLimited,
    /// The gateway is draining or at capacity.
    Unavailable,
    /// The call id is unknown to this client.
    UnknownCall,
    /// The same user logged in elsewhere; this session ends.
    Replaced,
    /// Missed heart-beats: the gateway considers the client offline.
    Timeout,
    Internal,
    /// The account was deleted, its password changed or its number reassigned while logged in.
    Revoked,
}

/// Why a call ended. A reason this build does not know (a newer gateway's) decodes as
/// [`HangupReason::Error`], so additions within a version do not break older clients' parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HangupReason {
    /// One side hung up.
    Normal,
    Rejected,
    Busy,
    NoAnswer,
    /// No registered user or telephone route has that number.
    NotFound,
    /// The callee is registered but not logged in.
    Offline,
    /// The other side stopped heart-beating or its connection dropped.
    PeerLost,
    /// The media path stopped working and could not be re-planned.
    MediaFailed,
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway could not set up media (no shard, a shard refused the session...).
    Error,
    /// A media address the call needs is in a range the gateway's peer policy denies
    /// (loopback, private, special-purpose, `denied_peers`); `detail` names the address and
    /// the range.
    PeerDenied,
    /// A media address the call needs is missing or not a unicast address.
    BadMediaAddress,
    /// Too many dials by this caller, rings of this callee, or room invitations per minute.
    RateLimited,
    /// The call reached the gateway's maximum call duration.
    TimeLimit,
    /// No media arrived from a party for longer than the inactivity time-out.
    NoMedia,
    /// The caller may not dial this number (its class of service).
    NotPermitted,
}

impl HangupReason {
    pub const ALL: [HangupReason; 16] = [
        HangupReason::Normal,
        HangupReason::Rejected,
        HangupReason::Busy,
        HangupReason::NoAnswer,
        HangupReason::NotFound,
        HangupReason::Offline,
        HangupReason::PeerLost,
        HangupReason::MediaFailed,
        HangupReason::Shutdown,
        HangupReason::Error,
        HangupReason::PeerDenied,
        HangupReason::BadMediaAddress,
        HangupReason::RateLimited,
        HangupReason::TimeLimit,
        HangupReason::NoMedia,
        HangupReason::NotPermitted,
    ];

    /// The reason named `s`; unknown names are `Error`.
    pub fn from_name(s: &str) -> HangupReason {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or(HangupReason::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HangupReason::Normal => "normal",
            HangupReason::Rejected => "rejected",
            HangupReason::Busy => "busy",
            HangupReason::NoAnswer => "no_answer",
            HangupReason::NotFound => "not_found",
            HangupReason::Offline => "offline",
            HangupReason::PeerLost => "peer_lost",
            HangupReason::MediaFailed => "media_failed",
            HangupReason::Shutdown => "shutdown",
            HangupReason::Error => "error",
            HangupReason::PeerDenied => "peer_denied",
            HangupReason::BadMediaAddress => "bad_media_address",
            HangupReason::RateLimited => "rate_limited",
            HangupReason::TimeLimit => "time_limit",
            HangupReason::NoMedia => "no_media",
            HangupReason::NotPermitted => "not_permitted",
        }
    }
}

impl<'de> Deserialize<'de> for HangupReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(HangupReason::from_name(&s))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("empty message")]
    Empty,
    #[error("message is not valid JSON for this protocol: {0}")]
    Json(String),
    #[error("a message must be a JSON object with a \"type\" field")]
    NotObject,
    #[error("unknown message type \"{got}\"; expected one of: {}", .expected.join(", "))]
    UnknownType {
        got: String,
        expected: &'static [&'static str],
    },
    #[error("bad \"{kind}\" message: {message}")]
    BadFields { kind: String, message: String },
}

/// The message types of one direction, by their `"type"` names.
pub trait MessageTypes {
    const TYPES: &'static [&'static str];
}

impl MessageTypes for ClientMsg {
    const TYPES: &'static [&'static str] = &[
        "hello",
        "proof",
        "heartbeat",
        "probe_local",
        "probe_report",
        "reprobe",
        "dial",
        "conference",
        "accept",
        "reject",
        "hang_up",
        "media_trouble",
        "bye",
        "presence_query",
        "resume",
    ];
}

impl MessageTypes for ServerMsg {
    const TYPES: &'static [&'static str] = &[
        "challenge",
        "welcome",
        "refused",
        "heartbeat_ack",
        "poll",
        "probe_begin",
        "probe_check",
        "probe_result",
        "calling",
        "ringing",
        "incoming",
        "media",
        "media_ready",
        "hang_up",
        "error",
        "going_away",
        "presence",
        "resume_token",
        "resumed",
    ];
}

/// A `hang_up` detail cut to [`MAX_DETAIL`] bytes at a character boundary, control
/// characters removed.
pub fn bounded_detail(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_DETAIL));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_DETAIL {
            break;
        }
        out.push(c);
    }
    out
}

/// Encodes `msg` as one frame (length prefix + JSON) appended to `out`.
pub fn encode<M: Serialize>(msg: &M, out: &mut Vec<u8>) -> Result<(), ControlError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    serde_json::to_writer(&mut *out, msg).map_err(|e| ControlError::Json(e.to_string()))?;
    let len = out.len() - start - 2;
    if len > MAX_MESSAGE {
        out.truncate(start);
        return Err(ControlError::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
    Ok(())
}

/// Decodes one message body (without the length prefix). Errors say what a person needs to
/// fix the message (never a Rust type name): not an object, an unknown `type` with the list
/// of known ones, or the field that is wrong in a known type.
pub fn decode<'de, M: Deserialize<'de> + MessageTypes>(body: &'de [u8]) -> Result<M, ControlError> {
    if body.is_empty() {
        return Err(ControlError::Empty);
    }
    if body.len() > MAX_MESSAGE {
        return Err(ControlError::TooLarge {
            len: body.len(),
            max: MAX_MESSAGE,
        });
    }
    serde_json::from_slice(body).map_err(|e| explain::<M>(body, &e))
}

/// Turns serde's error into one about the protocol.
fn explain<M: MessageTypes>(body: &[u8], e: &serde_json::Error) -> ControlError {
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        ty: Option<std::borrow::Cow<'a, str>>,
    }
    if e.is_syntax() || e.is_eof() {
        return ControlError::Json(short(&e.to_string()));
    }
    match serde_json::from_slice::<Tag<'_>>(body) {
        Err(_) => ControlError::NotObject,
        Ok(Tag { ty: None }) => ControlError::NotObject,
        Ok(Tag { ty: Some(t) }) if !M::TYPES.contains(&t.as_ref()) => ControlError::UnknownType {
            got: short_n(&t, 40),
            expected: M::TYPES,
        },
        Ok(Tag { ty: Some(t) }) => ControlError::BadFields {
            kind: t.into_owned(),
            message: short(&e.to_string()),
        },
    }
}

/// Reads the length prefix: the body length, or an error if it is over the limit.
pub fn body_len(header: [u8; 2]) -> Result<usize, ControlError> {
    let len = usize::from(u16::from_be_bytes(header));
    if len == 0 {
        return Err(ControlError::Empty);
    }
    if len > MAX_MESSAGE {
        return Err(ControlError::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    Ok(len)
}

/// Splits complete frames off the front of a receive buffer: returns the body of the first
/// complete frame and the bytes it spans, `Ok(None)` if more bytes are needed.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ControlError> {
    let Some(h) = buf.get(..2) else {
        return Ok(None);
    };
    let len = body_len([h[0], h[1]])?;
    Ok(buf.get(2..2 + len).map(|b| (b, 2 + len)))
}

/// At most 200 characters, control characters removed; a longer text is cut at a word
/// boundary and marked with "…".
fn short(s: &str) -> String {
    short_n(s, 200)
}

fn short_n(s: &str, n: usize) -> String {
    let mut t: String = s.chars().filter(|c| !c.is_control()).collect();
    if t.chars().count() > n {
        let cut: String = t.chars().take(n).collect();
        let end = cut
            .rfind([' ', ','])
            .filter(|&i| i > 0)
            .unwrap_or(cut.len());
        t = format!("{}…", cut[..end].trim_end_matches([' ', ',']));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame<M: Serialize>(m: &M) -> Vec<u8> {
        let mut v = Vec::new();
        encode(m, &mut v).unwrap();
        v
    }

    #[test]
    fn reference_bytes() {
        let f = frame(&ClientMsg::Heartbeat { seq: 7 });
        let body = br#"{"type":"heartbeat","seq":7}"#;
        assert_eq!(&f[..2], &(body.len() as u16).to_be_bytes());
        assert_eq!(&f[2..], body);
        assert_eq!(
            &frame(&ServerMsg::MediaReady { call: 12 })[2..],
            br#"{"type":"media_ready","call":12}"#
        );
        let m: ServerMsg = decode(br#"{"type":"hang_up","call":3,"reason":"no_answer"}"#).unwrap();
        assert_eq!(
            m,
            ServerMsg::HangUp {
                call: 3,
                reason: HangupReason::NoAnswer,
                detail: None,
            }
        );
        assert_eq!(
            &frame(&ServerMsg::HangUp {
                call: 3,
                reason: HangupReason::PeerDenied,
                detail: Some("media address 10.0.0.1 is in a denied range".into()),
            })[2..],
            br#"{"type":"hang_up","call":3,"reason":"peer_denied","detail":"media address 10.0.0.1 is in a denied range"}"#
        );
        assert_eq!(
            &frame(&ServerMsg::GoingAway {
                message: "draining".into(),
                gateways: vec![],
            })[2..],
            br#"{"type":"going_away","message":"draining"}"#
        );
        let m: ServerMsg =
            decode(br#"{"type":"going_away","message":"m","gateways":["a:1","b"]}"#).unwrap();
        assert_eq!(
            m,
            ServerMsg::GoingAway {
                message: "m".into(),
                gateways: vec!["a:1".into(), "b".into()],
            }
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_types_refused() {
        let m: ClientMsg = decode(br#"{"type":"heartbeat","seq":1,"future_field":[1,2]}"#).unwrap();
        assert_eq!(m, ClientMsg::Heartbeat { seq: 1 });
        let e = decode::<ClientMsg>(br#"{"type":"teleport"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown message type \"teleport\"; expected one of: hello, proof, heartbeat, \
             probe_local, probe_report, reprobe, dial, conference, accept, reject, hang_up, \
             media_trouble, bye, presence_query, resume"
        );
    }

    #[test]
    fn error_texts_name_the_problem_not_the_rust_type() {
        let text = |b: &[u8]| decode::<ClientMsg>(b).unwrap_err().to_string();
        for b in [
            &b"5"[..],
            b"[1,2]",
            b"\"hello\"",
            br#"{"seq":1}"#,
            br#"{"type":7}"#,
        ] {
            assert_eq!(
                text(b),
                "a message must be a JSON object with a \"type\" field",
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        assert_eq!(
            text(br#"{"type":"dial","tag":1}"#),
            "bad \"dial\" message: missing field `number`"
        );
        assert!(
            text(br#"{"type":"heartbeat","seq":"x"}"#)
                .starts_with("bad \"heartbeat\" message: invalid type: string \"x\", expected u64"),
            "{}",
            text(br#"{"type":"heartbeat","seq":"x"}"#)
        );
        assert!(
            text(b"{\"type\":").starts_with("message is not valid JSON for this protocol: EOF")
        );
        // A long unknown type is cut, at a word boundary where there is one.
        let long = format!(r#"{{"type":"{}"}}"#, "ab ".repeat(150));
        let t = text(long.as_bytes());
        assert!(t.contains("ab ab…\"; expected one of: hello"), "{t}");
        assert!(
            t.ends_with(", media_trouble, bye, presence_query, resume") && t.len() < 280,
            "{t}"
        );
        let e = decode::<ServerMsg>(br#"{"type":"hang_up","call":1}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "bad \"hang_up\" message: missing field `reason`");
        // A long list of valid values in serde's words is cut at a word, not mid-word.
        let e = decode::<ServerMsg>(br#"{"type":"error","code":"zzz","message":""}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("bad \"error\" message: unknown variant `zzz`"),
            "{e}"
        );
        for b in [&b"5"[..], br#"{"type":"x"}"#, br#"{"type":"dial"}"#, b"[]"] {
            for t in [text(b), decode::<ServerMsg>(b).unwrap_err().to_string()] {
                assert!(
                    !t.contains("ClientMsg") && !t.contains("ServerMsg") && !t.contains("enum"),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn message_type_lists_are_complete() {
        // Every listed name is a variant serde knows (its error is about fields, never the type).
        for t in ClientMsg::TYPES {
            let body = format!(r#"{{"type":"{t}","x":1}}"#);
            match decode::<ClientMsg>(body.as_bytes()) {
                Ok(_) => {}
                Err(e) => assert!(matches!(e, ControlError::BadFields { .. }), "{t}: {e}"),
            }
        }
        for t in ServerMsg::TYPES {
            let body = format!(r#"{{"type":"{t}","x":1}}"#);
            if let Err(e) = decode::<ServerMsg>(body.as_bytes()) {
                assert!(matches!(e, ControlError::BadFields { .. }), "{t}: {e}");
            }
        }
        // The lists have one name per variant (the client's session names every server
        // message in an exhaustive match: `session::msg_name`).
        assert_eq!(ClientMsg::TYPES.len(), 15);
        assert_eq!(ServerMsg::TYPES.len(), 19);
    }

    #[test]
    fn hangup_reasons_round_trip_and_unknown_ones_are_errors() {
        for r in HangupReason::ALL {
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<HangupReason>(&j).unwrap(), r);
        }
        let m: ServerMsg =
            decode(br#"{"type":"hang_up","call":1,"reason":"from_the_future"}"#).unwrap();
        assert_eq!(
            m,
            ServerMsg::HangUp {
                call: 1,
                reason: HangupReason::Error,
                detail: None
            }
        );
    }

    #[test]
    fn details_are_bounded() {
        assert_eq!(bounded_detail("a\nb"), "ab");
        let d = bounded_detail(&"é".repeat(1000));
        assert!(d.len() <= MAX_DETAIL && d.len() >= MAX_DETAIL - 1);
        assert_eq!(bounded_detail("short"), "short");
    }

    #[test]
    fn every_message_round_trips() {
        let media = MediaInstructions {
            call_key: false,
            call: 9,
            plan: Some(Plan {
                forward: Path::DirectUdp,
                backward: Path::TcpBoth,
            }),
            caller: true,
            send: MediaSend {
                transport: Transport::Udp,
                to: Some("192.0.2.1:4000".parse().unwrap()),
                via_gateway: false,
            },
            recv: MediaRecv {
                transport: Transport::Tcp,
                via_gateway: true,
                from: None,
            },
            leg: Some("l1".into()),
            gateway_udp: Some("[2001:db8::1]:7401".parse().unwrap()),
            gateway_tcp: Some("[2001:db8::1]:7401".parse().unwrap()),
            gateway_tcp_tls: false,
            payload_type: 0,
            clock_rate: 8000,
            paths: None,
        };
        let server = vec![
            ServerMsg::Challenge {
                nonce: "n".into(),
                salt: "c2FsdA==".into(),
                iterations: 4096,
            },
            ServerMsg::ProbeResult {
                probe: 1,
                capabilities: Capabilities::new(true, false).with_nat(true),
                mapped: Some("198.51.100.2:5000".parse().unwrap()),
                translated: true,
            },
            ServerMsg::Media(media),
            ServerMsg::MediaReady { call: 9 },
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                message: "x".into(),
            },
            ServerMsg::GoingAway {
                message: "draining".into(),
                gateways: vec!["gw2.example:7400".into()],
            },
        ];
        for m in server {
            let f = frame(&m);
            let (body, used) = split_frame(&f).unwrap().unwrap();
            assert_eq!(used, f.len());
            assert_eq!(decode::<ServerMsg>(body).unwrap(), m);
        }
        let client = vec![
            ClientMsg::Hello {
                version: VERSION,
                user: "alice".into(),
                nonce: "abc".into(),
                software: None,
            },
            ClientMsg::Dial {
                tag: 1,
                number: "+15551234".into(),
                media: Some("10.0.0.2:40000".parse().unwrap()),
            },
            ClientMsg::Reprobe,
            ClientMsg::Bye,
        ];
        for m in client {
            assert_eq!(decode::<ClientMsg>(&frame(&m)[2..]).unwrap(), m);
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(body_len([0, 0]), Err(ControlError::Empty));
        assert!(matches!(
            body_len([0xff, 0xff]),
            Err(ControlError::TooLarge { len: 65535, .. })
        ));
        let big = ClientMsg::Dial {
            tag: 1,
            number: "9".repeat(MAX_MESSAGE),
            media: None,
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&big, &mut out),
            Err(ControlError::TooLarge { .. })
        ));
        assert_eq!(
            out,
            vec![1, 2, 3],
            "a refused message leaves the buffer as it was"
        );
        assert_eq!(
            split_frame(&[0, 5, b'{']).unwrap(),
            None,
            "needs more bytes"
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode::<ClientMsg>(&b);
            let _ = decode::<ServerMsg>(&b);
            let _ = split_frame(&b);
        }

        #[test]
        fn decoding_json_shaped_input_never_panics(
            ty in prop_oneof![Just("hello"), Just("dial"), Just("probe_local"), Just("media"), Just("accept")],
            fields in proptest::collection::vec(("[a-z_]{1,8}", prop_oneof![
                Just("1".to_string()), Just("-1".to_string()), Just("\"x\"".to_string()),
                Just("null".to_string()), Just("[]".to_string()), Just("{}".to_string()),
                Just("\"1.2.3.4:5\"".to_string()), Just("18446744073709551616".to_string()),
            ]), 0..6),
        ) {
            let mut s = format!("{{\"type\":\"{ty}\"");
            for (k, v) in fields {
                s.push_str(&format!(",\"{k}\":{v}"));
            }
            s.push('}');
            let _ = decode::<ClientMsg>(s.as_bytes());
            let _ = decode::<ServerMsg>(s.as_bytes());
        }

        #[test]
        fn dial_round_trips(tag in any::<u32>(), number in "\\PC{0,40}", port in any::<u16>()) {
            let m = ClientMsg::Dial { tag, number, media: Some(SocketAddr::from(([10, 1, 2, 3], port))) };
            prop_assert_eq!(decode::<ClientMsg>(&frame(&m)[2..]).unwrap(), m);
        }
    }
}
