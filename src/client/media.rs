//! One call's media, as the softphone sends and receives it.
//!
//! Given the gateway's [`MediaInstructions`], the session key and the call's UDP socket (made
//! before `dial`/`accept`, so that its address went into them), this module:
//!
//! 1. **binds** the call's leg at the gateway ([`BoundMedia::bind`]): a STUN Binding request
//!    (USERNAME = leg, MESSAGE-INTEGRITY keyed by [`control::leg_key`]) from the UDP socket to
//!    the gateway's UDP media port when any UDP direction goes via the gateway, retransmitted
//!    every 100 ms until answered; and, when a direction is TCP, a TCP connection to the
//!    gateway's media port whose first RFC 4571 frame is the same request. Both at once. Every
//!    answer must carry MESSAGE-INTEGRITY with the leg key (`binding::check_response`), which
//!    only the real gateway can compute (the seed's warning about a spoofed gateway).
//! 2. **waits for `media_ready`** when asked to ([`MediaOptions::ready_timeout`]): bound, it
//!    receives at once but holds the audio until [`MediaCall::media_ready`] relays the
//!    gateway's `media_ready` (every leg the gateway delivers to is bound, so the first packets
//!    are not dropped for want of the other side's binding), or until the time-out, after
//!    which it sends anyway and says so. After a re-plan, the same. Nothing is sent while held
//!    and the audio position does not move, so no audio is lost to the wait.
//! 3. **sends** G.711 µ-law RTP (payload type 0, 160 samples = 20 ms per packet, paced by a
//!    deadline clock that does not drift), from a WAV file or silence, over UDP to the peer or
//!    the gateway, or as RFC 4571 frames on the TCP media connection. Each packet carries an
//!    RFC 8285 one-byte header extension (ID 1, 8 bytes) with the sender's wall-clock send time
//!    in ns, so that the receiver can measure one-way latency. **That measure is only valid
//!    when both ends read the same clock**, e.g. two softphones on one host.
//! 4. **receives** on the UDP socket and/or the TCP connection, only from the expected source
//!    (the gateway, or a validated direct source of the peer), ignoring STUN and RTCP; keeps
//!    per-SSRC loss and jitter ([`RtpStats`]), a latency histogram, and the recording.
//!
//! Proven paths ([`super::paths`]). A two-party call's instructions say where each direction
//! starts (through the gateway) and carry, per direction, the fallback order and any direct
//! candidate with its sealed check key. The engine runs the checks from the call's socket; a
//! sending direction goes direct only once its check succeeded (sending on both paths for
//! [`super::paths::OVERLAP`]), falls back to the gateway when consent expires, and a new source
//! of the peer's media is accepted only once it answered this side's challenge. Duplicate RTP
//! sequence numbers are dropped (`ignored.duplicate`). A phone that receives UDP from the
//! gateway keeps consent with it (keyed Binding every 500 ms); losing it shows in
//! [`Status::gateway_consent_lost`].
//!
//! Binding rules. The UDP binding *must* be answered when this client sends UDP via the
//! gateway and also receives over UDP: without it the gateway drops the media. When the
//! client sends UDP via the gateway but receives over TCP, the plan says its firewall does
//! not admit UDP in, so the answer may never arrive although the gateway got the request and
//! bound the source: the request is then sent for [`BEST_EFFORT_BIND`] and the call goes on
//! (`udp_binding_confirmed: false` in the report). A client that only *receives* UDP via the
//! gateway binds best effort too, and sends a STUN Binding indication every
//! [`KEEPALIVE_INTERVAL`] so that NAT and firewall state for the gateway stays open. The TCP
//! binding must always succeed. A best-effort UDP binding does not hold up a TCP binding:
//! once the TCP side is bound (and the UDP request has gone out), the engine starts and goes
//! on with the UDP request itself (taking its answer) until [`BEST_EFFORT_BIND`] is over,
//! sending it ahead of each media packet to the gateway meanwhile: the gateway drops media
//! from a source it has not bound, and a client whose inbound UDP is blocked cannot know
//! whether a request arrived.
//!
//! Recording. Decoded frames are placed by RTP sequence number from the first packet
//! received, gaps filled with silence: when nothing is lost the recording equals the sent
//! audio after one G.711 encode/decode, padded with zeros to whole 20 ms frames and followed
//! by the silence sent after it. In a conference room the streams of all SSRCs are mixed
//! (saturating sum), each placed from the 20 ms slot in which its first packet arrived.
//!
//! What it must not do: block the pacer on a slow TCP connection (frames beyond a small
//! bound are dropped and counted), grow memory without bound (recording, SSRC table and
//! queues are bounded), or accept media from anyone but the expected source.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::binding::{self, BindingError};
use super::paths::{CallPaths, PathsReport, SeqWindow, Transmit};
use super::{Firewall, canonical, g711};
use crate::control::{self, auth::SessionKey};
use crate::metrics::Transport;
use crate::metrics::rtpstats::{RtpReport, RtpStats};
use crate::wire::control::{MediaInstructions, Plan};
use crate::wire::{framing, rtp, stun};

/// Samples per RTP packet: 20 ms at 8 kHz.
pub const SAMPLES_PER_PACKET: usize = 160;
/// Time between packets.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// RTP payload type of G.711 µ-law (RFC 3551 §6).
pub const PT_PCMU: u8 = 0;
/// The G.711 clock rate.
pub const CLOCK_RATE: u32 = 8000;
/// RFC 8285 §4.2: the one-byte header extension form is marked by this profile value.
pub const ONE_BYTE_PROFILE: u16 = 0xBEDE;
/// The extension element carrying the send time (wall clock, ns since the Unix epoch, 8 bytes
/// big-endian).
pub const SEND_TIME_ID: u8 = 1;
/// Fixed header + 4-byte extension header + 12 bytes of elements (1 + 8, padded).
pub const RTP_HEADER_LEN: usize = rtp::HEADER_LEN + 4 + 12;
/// Largest media packet accepted.
pub const MAX_PACKET: usize = 1500;
/// How long a best-effort UDP binding is tried.
pub const BEST_EFFORT_BIND: Duration = Duration::from_millis(500);
/// How long the audio waits for the gateway's `media_ready` after this client's bindings
/// are done, before it goes anyway (a gateway that predates `media_ready`).
pub const MEDIA_READY_TIMEOUT: Duration = Duration::from_secs(3);
/// Retransmission interval of binding requests.
pub const BIND_RETRANSMIT: Duration = Duration::from_millis(100);
/// Keep-alive interval for receive-only UDP via the gateway.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Most SSRCs tracked per call (a conference room has one per other participant).
pub const MAX_SSRCS: usize = 64;
/// Bytes waiting to be written on the TCP media connection before new frames are dropped
/// (about 1 s of G.711 packets).
pub const TCP_BACKLOG: usize = 64 * 1024;
/// Datagrams that arrived while binding, kept for the receiver.
const MAX_EARLY: usize = 128;
/// Datagrams taken from the socket when the call ends, at most (a few seconds of a room).
const MAX_TAKEN_AT_END: usize = 4096;
/// Reads (of 4 KiB) from the TCP media connection when the call ends, at most.
const MAX_TCP_READS_AT_END: usize = 64;

// ---------------------------------------------------------------- errors

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("the media instructions are unusable: {0}")]
    Instructions(&'static str),
    #[error(
        "payload type {payload_type} at {clock_rate} Hz is not supported: voxgate phone speaks G.711 µ-law (PT 0, 8000 Hz)"
    )]
    Codec { payload_type: u8, clock_rate: u32 },
    #[error(
        "no valid answer to the UDP media binding from the gateway at {gateway} within {waited:?}{detail}"
    )]
    UdpBindTimeout {
        gateway: SocketAddr,
        waited: Duration,
        detail: String,
    },
    #[error("cannot open the TCP media connection to {gateway}: {source}")]
    TcpConnect {
        gateway: SocketAddr,
        source: std::io::Error,
    },
    #[error("TCP media binding with the gateway at {gateway} failed: {reason}")]
    TcpBind { gateway: SocketAddr, reason: String },
    #[error("media socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the media engine has stopped")]
    Stopped,
}

// ---------------------------------------------------------------- packetisation

/// One 20 ms frame, ready to be put in an RTP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub sequence: u16,
    pub timestamp: u32,
    /// RFC 3551 §4.1: set on the first packet of a talkspurt (here: the first packet sent).
    pub marker: bool,
    /// Carries audio from the source (false: silence after it).
    pub audio: bool,
    pub payload: [u8; SAMPLES_PER_PACKET],
}

/// The frames of a call as a pure iterator: the source cut into 160-sample frames (the last
/// one padded with zeros), encoded as µ-law, numbered per RFC 3550 (sequence +1, timestamp
/// +160 per packet, both wrapping), marker on the first; then silence for ever, or the end
/// if `silence_after` is off. No clock and no IO: the pacer decides when each one goes.
#[derive(Clone, Debug)]
pub struct Packetizer {
    source: Arc<[i16]>,
    pos: usize,
    sequence: u16,
    timestamp: u32,
    first: bool,
    silence_after: bool,
}

impl Packetizer {
    /// Frames of `source` starting at the given (normally random) sequence and timestamp.
    pub fn new(source: Arc<[i16]>, first_sequence: u16, first_timestamp: u32) -> Self {
        Packetizer {
            source,
            pos: 0,
            sequence: first_sequence,
            timestamp: first_timestamp,
            first: true,
            silence_after: true,
        }
    }

    /// Whether silence follows the source (default) or the iterator ends with it.
    pub fn silence_after(mut self, yes: bool) -> Self {
        self.silence_after = yes;
        self
    }

    /// Frames that carry the source: `ceil(len / 160)`.
    pub fn audio_frames(&self) -> usize {
        self.source.len().div_ceil(SAMPLES_PER_PACKET)
    }

    /// Every frame of the source has been produced.
    pub fn audio_done(&self) -> bool {
        self.pos >= self.source.len()
    }
}

impl Iterator for Packetizer {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        let audio = self.pos < self.source.len();
        if !audio && !self.silence_after {
            return None;
        }
        let mut payload = [g711::ULAW_SILENCE; SAMPLES_PER_PACKET];
        if audio {
            let end = (self.pos + SAMPLES_PER_PACKET).min(self.source.len());
            // The rest stays 0xFF: µ-law of 0, the zero padding of the last frame.
            g711::encode_ulaw_into(&self.source[self.pos..end], &mut payload);
            self.pos = end;
        }
        let f = Frame {
            sequence: self.sequence,
            timestamp: self.timestamp,
            marker: self.first,
            audio,
            payload,
        };
        self.first = false;
        self.sequence = self.sequence.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(SAMPLES_PER_PACKET as u32);
        Some(f)
    }
}

/// When packet `k` (from 0) is due: `start + k × 20 ms`, computed from the start rather than
/// by adding intervals, so no drift accumulates.
pub fn send_deadline(start: Instant, k: u32) -> Instant {
    start + PACKET_INTERVAL * k
}

/// Writes the RTP packet for `frame` into `buf` (at least [`RTP_HEADER_LEN`] + 160 bytes):
/// fixed header with X set, the RFC 8285 one-byte extension with the send time, the payload.
/// Returns the packet length, or `None` if `buf` is too small.
///
/// RFC 8285 §4.2: "the 16-bit value required by the RTP specification for a header extension,
/// labeled in the RTP specification as 'defined by profile', MUST have the fixed bit pattern
/// 0xBEDE"; each element is `ID (4 bits) | L (4 bits) = length - 1`, then the data, and the
/// extension is padded with zero bytes to a whole number of 32-bit words.
pub fn write_packet(frame: &Frame, ssrc: u32, send_time_ns: u64, buf: &mut [u8]) -> Option<usize> {
    let len = RTP_HEADER_LEN + SAMPLES_PER_PACKET;
    let out = buf.get_mut(..len)?;
    rtp::write_fixed_header(
        out,
        frame.marker,
        PT_PCMU,
        frame.sequence,
        frame.timestamp,
        ssrc,
    )
    .ok()?;
    out[0] |= 0x10; // X: a header extension follows
    let [p0, p1] = ONE_BYTE_PROFILE.to_be_bytes();
    out[12..16].copy_from_slice(&[p0, p1, 0, 3]);
    out[16] = (SEND_TIME_ID << 4) | 7;
    out[17..25].copy_from_slice(&send_time_ns.to_be_bytes());
    out[25..28].fill(0);
    out[RTP_HEADER_LEN..].copy_from_slice(&frame.payload);
    Some(len)
}

/// The send time carried by a packet's RFC 8285 one-byte extension element [`SEND_TIME_ID`].
pub fn send_time_ns<T: AsRef<[u8]>>(p: &rtp::RtpPacket<T>) -> Option<u64> {
    let (profile, data) = p.extension()?;
    if profile != ONE_BYTE_PROFILE {
        return None;
    }
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        if b == 0 {
            // Padding between elements.
            i += 1;
            continue;
        }
        let (id, len) = (b >> 4, usize::from(b & 0x0f) + 1);
        if id == 15 {
            // RFC 8285 §4.2: ID 15 is reserved; "the rest of the header extension" is ignored.
            return None;
        }
        let value = data.get(i + 1..i + 1 + len)?;
        if id == SEND_TIME_ID
            && let Ok(v) = <[u8; 8]>::try_from(value)
        {
            return Some(u64::from_be_bytes(v));
        }
        i += 1 + len;
    }
    None
}

/// Nanoseconds since the Unix epoch on this host's wall clock.
pub fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------- recording

struct RecStream {
    ssrc: u32,
    /// Extended sequence number of the first packet, and the highest seen.
    base: i64,
    highest: i64,
    last_seq: u16,
    /// Where frame 0 of this stream lies in the recording, in samples.
    offset: usize,
    frame_len: usize,
    /// Frames already written (so a duplicate is not mixed in twice).
    written: Vec<u64>,
}

/// The recording: decoded frames placed by sequence number, gaps silent, streams mixed.
/// Bounded to `max_samples`; frames beyond are dropped.
pub struct Recorder {
    max_samples: usize,
    samples: Vec<i16>,
    start: Option<Instant>,
    streams: Vec<RecStream>,
    /// Frames that could not be placed (before a stream's first packet, beyond the bound,
    /// too many SSRCs).
    pub dropped_frames: u64,
}

impl Recorder {
    pub fn new(max_samples: usize) -> Self {
        Recorder {
            max_samples,
            samples: Vec::new(),
            start: None,
            streams: Vec::new(),
            dropped_frames: 0,
        }
    }

    /// Places one decoded frame of `ssrc` with sequence number `seq`, arrived at `arrival`.
    pub fn on_frame(&mut self, ssrc: u32, seq: u16, arrival: Instant, pcm: &[i16]) {
        if pcm.is_empty() || self.max_samples == 0 {
            return;
        }
        let start = *self.start.get_or_insert(arrival);
        let k = match self.streams.iter().position(|s| s.ssrc == ssrc) {
            Some(k) => k,
            None => {
                if self.streams.len() >= MAX_SSRCS {
                    self.dropped_frames += 1;
                    return;
                }
                // The 20 ms slot of the first packet, counted from the first packet of all.
                let slots = (arrival.saturating_duration_since(start).as_micros()
                    + PACKET_INTERVAL.as_micros() / 2)
                    / PACKET_INTERVAL.as_micros();
                let frame_len = pcm.len();
                self.streams.push(RecStream {
                    ssrc,
                    base: i64::from(seq),
                    highest: i64::from(seq),
                    last_seq: seq,
                    offset: usize::try_from(slots)
                        .unwrap_or(usize::MAX)
                        .saturating_mul(frame_len),
                    frame_len,
                    written: Vec::new(),
                });
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[k];
        // Extend the 16-bit sequence number around the highest seen (RFC 3550 A.1 style).
        let delta = i64::from(seq.wrapping_sub(s.last_seq) as i16);
        let ext = s.highest + delta;
        if ext > s.highest {
            s.highest = ext;
            s.last_seq = seq;
        }
        let Ok(idx) = usize::try_from(ext - s.base) else {
            self.dropped_frames += 1;
            return;
        };
        let pos = idx
            .checked_mul(s.frame_len)
            .and_then(|p| p.checked_add(s.offset));
        let Some(pos) = pos.filter(|p| p.saturating_add(pcm.len()) <= self.max_samples) else {
            self.dropped_frames += 1;
            return;
        };
        let (word, bit) = (idx / 64, 1u64 << (idx % 64));
        if s.written.len() <= word {
            s.written.resize(word + 1, 0);
        }
        if s.written[word] & bit != 0 {
            return; // a duplicate
        }
        s.written[word] |= bit;
        let end = pos + pcm.len();
        if self.samples.len() < end {
            self.samples.resize(end, 0);
        }
        for (o, &v) in self.samples[pos..end].iter_mut().zip(pcm) {
            *o = o.saturating_add(v);
        }
    }

    pub fn samples(&self) -> &[i16] {
        &self.samples
    }

    pub fn into_samples(self) -> Vec<i16> {
        self.samples
    }
}

// ---------------------------------------------------------------- reports

/// How one direction actually travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TransportUsed {
    pub transport: Transport,
    pub via_gateway: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SentStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets that carried the source audio (the rest was silence).
    pub audio_packets: u64,
    /// Packets the simulated firewall refused to send.
    pub blocked: u64,
    /// Packets dropped because the socket or the TCP connection could not take them.
    pub dropped: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ignored {
    /// STUN on the media path (binding answers, retransmissions).
    pub stun: u64,
    pub rtcp: u64,
    /// Datagrams from anyone but the expected source.
    pub wrong_source: u64,
    pub malformed: u64,
    /// RTP with a payload type other than the call's.
    pub payload_type: u64,
    /// Datagrams the simulated firewall discarded.
    pub firewall: u64,
    /// Packets of SSRCs beyond [`MAX_SSRCS`].
    pub too_many_ssrcs: u64,
    /// RTP packets whose sequence number was already received (the copy a sender sends on
    /// both paths while it switches to a direct path): not counted, not lost.
    pub duplicate: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReceivedStats {
    pub packets: u64,
    pub bytes: u64,
    pub udp_packets: u64,
    pub tcp_packets: u64,
    /// Summed over SSRCs (RFC 3550 A.3: expected − received).
    pub lost: u64,
    /// Largest interarrival jitter over SSRCs (RFC 3550 A.8), in ms.
    pub jitter_ms: f64,
    /// One-way latency from the send-time extension; valid only when both ends share a clock.
    pub latency_ms: Option<LatencyMs>,
    pub ssrcs: usize,
    pub streams: Vec<RtpReport>,
    pub ignored: Ignored,
    /// When the first media packet arrived, ms after the engine started (right after `media`
    /// and the bindings).
    pub first_packet_ms: Option<f64>,
    /// The longest time between two accepted media packets, ms (how long audio was lost when a
    /// path failed and the call recovered).
    pub max_gap_ms: f64,
}

/// What a call's media did.
#[derive(Clone, Debug, Serialize)]
pub struct MediaReport {
    /// `None` when this client had nobody to send to.
    pub send: Option<TransportUsed>,
    pub recv: TransportUsed,
    pub plan: Option<Plan>,
    pub sent: SentStats,
    pub received: ReceivedStats,
    /// The gateway's view of our UDP and TCP media sources (XOR-MAPPED-ADDRESS).
    pub udp_mapped: Option<SocketAddr>,
    pub tcp_mapped: Option<SocketAddr>,
    /// Whether the gateway answered the UDP binding (`None`: no UDP binding was needed).
    pub udp_binding_confirmed: Option<bool>,
    /// Times the gateway re-planned the media of this call.
    pub replans: u32,
    /// How long the audio was held, once bound, for the gateway's `media_ready` the first time
    /// (`None`: it was not held, see [`MediaOptions::ready_timeout`]).
    pub media_ready_wait_ms: Option<f64>,
    /// The audio went without `media_ready` after the time-out (for the first plan or a
    /// re-plan).
    pub media_ready_timed_out: bool,
    /// The TCP media connection was closed by the gateway during the call.
    pub tcp_closed: bool,
    /// Proven paths: direct checks, consent, fallbacks (see [`super::paths`]).
    pub paths: PathsReport,
    pub duration_s: f64,
    /// The recording (empty unless asked for).
    #[serde(skip)]
    pub recording: Vec<i16>,
}

// ---------------------------------------------------------------- options and routes

/// What to play and record.
#[derive(Clone, Debug)]
pub struct MediaOptions {
    /// Audio to send (8 kHz mono); `None` sends silence.
    pub audio: Option<Arc<[i16]>>,
    /// Keep sending silence after the audio (default), so the peer keeps hearing the call.
    pub silence_after_audio: bool,
    /// Keep the recording, at most this many samples (0: no recording).
    pub record_samples: usize,
    pub firewall: Firewall,
    /// How long a binding that must succeed is tried.
    pub bind_timeout: Duration,
    /// `Some(t)`: hold the audio, once bound, until [`MediaCall::media_ready`] (the gateway's
    /// `media_ready` for this call: every leg it delivers to is bound, so nothing sent is
    /// lost), or for at most `t` (then it goes anyway, with a warning). Again after each
    /// re-plan. Receiving starts at once either way. `None` (default): send as soon as bound,
    /// for callers that do not relay `media_ready` (or bind both ends themselves, as
    /// [`BoundMedia`] allows).
    pub ready_timeout: Option<Duration>,
    /// Open TCP media connections through this HTTP proxy (CONNECT).
    pub proxy: Option<super::proxy::ProxyConfig>,
    /// How to verify the gateway when it asks for TLS on TCP media (`gateway_tcp_tls`);
    /// `None`: such instructions fail.
    pub tls: Option<super::tls::MediaTls>,
}

impl Default for MediaOptions {
    fn default() -> Self {
        MediaOptions {
            audio: None,
            silence_after_audio: true,
            record_samples: 0,
            firewall: Firewall::OPEN,
            bind_timeout: Duration::from_secs(5),
            ready_timeout: None,
            proxy: None,
            tls: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendRoute {
    Udp(SocketAddr),
    Tcp,
}

/// Where UDP media may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UdpSource {
    /// Nothing is received over UDP.
    None,
    Exactly(SocketAddr),
    /// Direct UDP with no address given: the first RTP source is latched (symmetric RTP).
    Latch(Option<SocketAddr>),
}

#[derive(Clone, Debug)]
struct Route {
    send: Option<SendRoute>,
    udp_source: UdpSource,
    recv_tcp: bool,
    /// The gateway's TCP media address, when a direction is TCP.
    gateway_tcp: Option<SocketAddr>,
    /// TCP media inside TLS.
    tcp_tls: bool,
    /// The gateway's UDP media address, when a UDP direction goes via the gateway.
    gateway_udp: Option<SocketAddr>,
    /// The UDP binding must be answered (see the module docs).
    udp_bind_required: bool,
    /// Receive-only UDP via the gateway: keep the path open with Binding indications.
    keepalive: bool,
    leg: Option<String>,
}

impl Route {
    fn from_instructions(i: &MediaInstructions) -> Result<Route, MediaError> {
        if i.payload_type != PT_PCMU || i.clock_rate != CLOCK_RATE {
            return Err(MediaError::Codec {
                payload_type: i.payload_type,
                clock_rate: i.clock_rate,
            });
        }
        let send = match (i.send.transport, i.send.to) {
            (_, None) => None,
            (Transport::Udp, Some(to)) => Some(SendRoute::Udp(canonical(to))),
            (Transport::Tcp, Some(_)) => Some(SendRoute::Tcp),
        };
        let recv_tcp = i.recv.transport == Transport::Tcp;
        let needs_tcp = recv_tcp || send == Some(SendRoute::Tcp);
        let gateway_tcp = if needs_tcp {
            let addr = i.gateway_tcp.or(match send {
                Some(SendRoute::Tcp) => i.send.to,
                _ => None,
            });
            Some(canonical(addr.ok_or(MediaError::Instructions(
                "a direction is TCP but no gateway TCP address was given",
            ))?))
        } else {
            None
        };
        let send_udp_via_gw = matches!(send, Some(SendRoute::Udp(_))) && i.send.via_gateway;
        let recv_udp_via_gw = !recv_tcp && i.recv.via_gateway;
        let gateway_udp = if send_udp_via_gw || recv_udp_via_gw {
            let addr = i.gateway_udp.or(match send {
                Some(SendRoute::Udp(to)) if send_udp_via_gw => Some(to),
                _ => i.recv.from,
            });
            Some(canonical(addr.ok_or(MediaError::Instructions(
                "UDP goes via the gateway but no gateway UDP address was given",
            ))?))
        } else {
            None
        };
        let udp_source = match (recv_tcp, i.recv.via_gateway, i.recv.from) {
            (true, _, _) => UdpSource::None,
            (false, true, from) => match from.or(gateway_udp) {
                Some(a) => UdpSource::Exactly(canonical(a)),
                None => {
                    return Err(MediaError::Instructions(
                        "media comes via the gateway but no gateway address was given",
                    ));
                }
            },
            (false, false, Some(from)) => UdpSource::Exactly(canonical(from)),
            (false, false, None) => UdpSource::Latch(None),
        };
        let leg = i.leg.clone();
        if (gateway_tcp.is_some() || gateway_udp.is_some()) && leg.is_none() {
            return Err(MediaError::Instructions(
                "media goes via the gateway but no leg was given",
            ));
        }
        Ok(Route {
            send,
            udp_source,
            recv_tcp,
            gateway_tcp,
            tcp_tls: i.gateway_tcp_tls,
            gateway_udp,
            udp_bind_required: send_udp_via_gw && !recv_tcp,
            keepalive: recv_udp_via_gw && !send_udp_via_gw,
            leg,
        })
    }
}

// ---------------------------------------------------------------- binding

/// A datagram received before the engine started.
struct Early {
    data: Vec<u8>,
    from: SocketAddr,
    at: Instant,
}

/// The connections a route needs, bound.
struct Links {
    tcp: Option<TcpStream>,
    /// Frames that arrived on the TCP connection right behind the binding answer.
    tcp_in: framing::FrameBuffer,
    udp_mapped: Option<SocketAddr>,
    tcp_mapped: Option<SocketAddr>,
    udp_confirmed: Option<bool>,
    /// A best-effort UDP binding still unanswered when the TCP binding was done: the engine
    /// goes on with it.
    udp_pending: Option<UdpBinder>,
    early: Vec<Early>,
}

/// One UDP binding transaction: the Binding request for `leg`, sent from the call's socket to
/// the gateway every [`BIND_RETRANSMIT`] until a valid answer or the deadline. Split from the
/// waiting so that the engine can carry on with a best-effort binding while media flows.
struct UdpBinder {
    gateway: SocketAddr,
    key: Vec<u8>,
    txid: [u8; 12],
    req: Vec<u8>,
    next_send: Instant,
    deadline: Instant,
    wait: Duration,
    /// Requests that left the socket.
    sent: u32,
    /// Why it did not work, for the error message.
    problem: String,
}

impl UdpBinder {
    fn new(
        gateway: SocketAddr,
        leg: &str,
        key: &[u8],
        wait: Duration,
    ) -> Result<UdpBinder, MediaError> {
        let txid = binding::new_txid();
        let mut req = [0u8; 512];
        let n = binding::request(&mut req, leg, key, &txid)
            .map_err(|_| MediaError::Instructions("leg name too long for a STUN request"))?;
        let now = Instant::now();
        Ok(UdpBinder {
            gateway,
            key: key.to_vec(),
            txid,
            req: req[..n].to_vec(),
            next_send: now,
            deadline: now + wait,
            wait,
            sent: 0,
            problem: String::new(),
        })
    }

    fn timeout_error(&self) -> MediaError {
        MediaError::UdpBindTimeout {
            gateway: self.gateway,
            waited: self.wait,
            detail: self.problem.clone(),
        }
    }

    /// Sends the request if a (re)transmission is due.
    fn transmit_if_due(&mut self, socket: &UdpSocket, firewall: Firewall, now: Instant) {
        if now >= self.next_send {
            self.transmit(socket, firewall, now);
        }
    }

    /// Sends the request now; the next retransmission is due [`BIND_RETRANSMIT`] later.
    fn transmit(&mut self, socket: &UdpSocket, firewall: Firewall, now: Instant) {
        match firewall.send_to(socket, &self.req, self.gateway) {
            Ok(true) => self.sent += 1,
            Ok(false) => {}
            Err(e) => {
                // Often transient (no route yet); the next retransmission tries again.
                tracing::debug!("binding request to {}: {e}", self.gateway);
                self.problem = format!(" (sending failed: {e})");
            }
        }
        self.next_send = now + BIND_RETRANSMIT;
    }

    /// Makes sure the request has left the socket once (waiting for the socket to be
    /// writable, at most until the deadline): media may follow it.
    async fn ensure_sent(&mut self, socket: &UdpSocket, firewall: Firewall) {
        if self.sent > 0 || firewall.block_udp_out {
            return;
        }
        let _ = tokio::time::timeout_at(self.deadline, socket.writable()).await;
        self.transmit(socket, firewall, Instant::now());
    }

    /// When something is due: the next retransmission or the deadline.
    fn wake_at(&self) -> Instant {
        self.next_send.min(self.deadline)
    }

    fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// A datagram from `from`: `Some(mapped)` when it is the gateway's valid answer.
    fn on_datagram(&mut self, data: &[u8], from: SocketAddr) -> Option<SocketAddr> {
        if from != self.gateway || !stun::looks_like_stun(data) {
            return None;
        }
        match binding::check_response(data, &self.key, &self.txid) {
            Ok(mapped) => Some(mapped),
            Err(BindingError::WrongTransaction) => None,
            Err(e) => {
                tracing::warn!("ignoring a binding answer from {from}: {e}");
                self.problem = format!(" (an answer was refused: {e})");
                None
            }
        }
    }

    /// Sends and retransmits until a valid answer (`Some(mapped)`) or the deadline (`None`).
    /// Other datagrams that arrive meanwhile are kept in `early` (bounded). Cancel-safe: a
    /// dropped `run` leaves the binder ready to go on.
    async fn run(
        &mut self,
        socket: &UdpSocket,
        firewall: Firewall,
        early: &mut Vec<Early>,
    ) -> Option<SocketAddr> {
        let mut buf = vec![0u8; 2048];
        loop {
            let now = Instant::now();
            if self.expired(now) {
                return None;
            }
            if now >= self.next_send && !firewall.block_udp_out {
                // tokio's `try_send_to` says WouldBlock until the reactor has seen the socket
                // writable, which a fresh socket may not have yet: the first request would
                // silently wait for the retransmission.
                let _ = tokio::time::timeout_at(self.deadline, socket.writable()).await;
            }
            self.transmit_if_due(socket, firewall, Instant::now());
            let Ok(r) = tokio::time::timeout_at(self.wake_at(), socket.recv_from(&mut buf)).await
            else {
                continue;
            };
            let (len, from) = match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("UDP receive while binding: {e}");
                    continue;
                }
            };
            if !firewall.admits_udp_in() {
                continue;
            }
            let data = &buf[..len];
            let from = canonical(from);
            if let Some(mapped) = self.on_datagram(data, from) {
                return Some(mapped);
            }
            if early.len() < MAX_EARLY && !stun::looks_like_stun(data) {
                early.push(Early {
                    data: data.to_vec(),
                    from,
                    at: Instant::now(),
                });
            }
        }
    }
}

/// Opens the TCP media connection and binds it with the first RFC 4571 frame.
async fn bind_tcp(
    gateway: SocketAddr,
    leg: &str,
    key: &[u8],
    wait: Duration,
    proxy: Option<&super::proxy::ProxyConfig>,
    tls: Option<Option<&super::tls::MediaTls>>,
) -> Result<(TcpStream, SocketAddr, framing::FrameBuffer), MediaError> {
    let fail = |reason: String| MediaError::TcpBind { gateway, reason };
    let connect = async {
        match proxy {
            None => TcpStream::connect(gateway).await,
            Some(p) => super::proxy::connect(p, &super::proxy::target(gateway), wait)
                .await
                .map_err(std::io::Error::other),
        }
    };
    let stream = match tokio::time::timeout(wait, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(MediaError::TcpConnect { gateway, source }),
        Err(_) => {
            return Err(MediaError::TcpConnect {
                gateway,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            });
        }
    };
    stream.set_nodelay(true)?;
    // `Some(..)`: the gateway asked for TLS.
    let stream = match tls {
        None => stream,
        Some(None) => {
            return Err(fail(
                "the gateway asks for TLS on TCP media, but this phone has no TLS settings".into(),
            ));
        }
        Some(Some(t)) => {
            match tokio::time::timeout(wait, super::tls::media_tunnel(stream, t)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(fail(e)),
                Err(_) => return Err(fail("the TLS handshake timed out".into())),
            }
        }
    };
    let txid = binding::new_txid();
    let mut frame = [0u8; 514];
    let n = binding::request(&mut frame[2..], leg, key, &txid)
        .map_err(|_| MediaError::Instructions("leg name too long for a STUN request"))?;
    let hdr = framing::header(n).map_err(|e| fail(e.to_string()))?;
    frame[..2].copy_from_slice(&hdr);
    let mut inbuf = framing::FrameBuffer::new(MAX_PACKET as u16);
    let deadline = Instant::now() + wait;
    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = stream;
        s.write_all(&frame[..2 + n]).await?;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(f) = inbuf.next_frame().map_err(|e| fail(e.to_string()))? {
                if !stun::looks_like_stun(&f) {
                    continue;
                }
                match binding::check_response(&f, key, &txid) {
                    Ok(mapped) => return Ok((s, mapped)),
                    Err(BindingError::WrongTransaction) => {}
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            let got = s.read(&mut chunk).await?;
            if got == 0 {
                return Err(fail(
                    "the gateway closed the connection (unknown leg or wrong key?)".into(),
                ));
            }
            inbuf.push(&chunk[..got]).map_err(|e| fail(e.to_string()))?;
        }
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok((s, mapped))) => Ok((s, mapped, inbuf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(fail(format!("no answer within {wait:?}"))),
    }
}

/// Binds what `route` needs, the UDP binding and the TCP connection + binding concurrently.
/// A required UDP binding and the TCP binding must succeed; the first failure is returned at
/// once. A best-effort UDP binding (see the module docs) does not hold up a TCP binding: if
/// the TCP side is done first, the engine carries on with it ([`Links::udp_pending`]); with no
/// TCP binding it is waited for, at most [`BEST_EFFORT_BIND`].
async fn establish(
    route: &Route,
    key: &SessionKey,
    socket: &UdpSocket,
    opts: &MediaOptions,
) -> Result<Links, MediaError> {
    let leg = route.leg.as_deref().unwrap_or_default();
    let leg_key = control::leg_key(key, leg);
    let required = route.udp_bind_required;
    let fw = opts.firewall;
    let mut links = Links {
        tcp: None,
        tcp_in: framing::FrameBuffer::new(MAX_PACKET as u16),
        udp_mapped: None,
        tcp_mapped: None,
        udp_confirmed: None,
        udp_pending: None,
        early: Vec::new(),
    };
    let mut udp = match route.gateway_udp {
        Some(gw) => {
            let wait = if required {
                opts.bind_timeout
            } else {
                BEST_EFFORT_BIND
            };
            Some(UdpBinder::new(gw, leg, &leg_key, wait)?)
        }
        None => None,
    };
    let tcp = route.gateway_tcp.map(|gw| {
        let tls = route.tcp_tls.then_some(opts.tls.as_ref());
        bind_tcp(
            gw,
            leg,
            &leg_key,
            opts.bind_timeout,
            opts.proxy.as_ref(),
            tls,
        )
    });
    let mut early = Vec::new();
    // `udp_result`: Some(Some(mapped)) answered, Some(None) no answer in time, None: no UDP
    // binding, or one the engine goes on with.
    let (tcp, udp_result) = match (tcp, udp.as_mut()) {
        (None, None) => (None, None),
        (Some(tcp), None) => (Some(tcp.await?), None),
        (None, Some(b)) => (None, Some(b.run(socket, fw, &mut early).await)),
        (Some(tcp), Some(b)) if required => {
            let udp = async {
                match b.run(socket, fw, &mut early).await {
                    Some(mapped) => Ok(mapped),
                    None => Err(b.timeout_error()),
                }
            };
            let (t, mapped) = tokio::try_join!(tcp, udp)?;
            (Some(t), Some(Some(mapped)))
        }
        (Some(tcp), Some(b)) => {
            let mut tcp = std::pin::pin!(tcp);
            let first = {
                let run = std::pin::pin!(b.run(socket, fw, &mut early));
                // Biased: the UDP request goes out before the TCP binding is looked at.
                tokio::select! {
                    biased;
                    mapped = run => Ok(mapped),
                    t = &mut tcp => Err(t),
                }
            };
            match first {
                Ok(mapped) => (Some(tcp.await?), Some(mapped)),
                Err(t) => {
                    let t = t?;
                    b.ensure_sent(socket, fw).await;
                    (Some(t), None)
                }
            }
        }
    };
    if let Some((s, mapped, inbuf)) = tcp {
        links.tcp = Some(s);
        links.tcp_mapped = Some(mapped);
        links.tcp_in = inbuf;
    }
    match (udp_result, udp) {
        (Some(Some(mapped)), _) => {
            links.udp_mapped = Some(mapped);
            links.udp_confirmed = Some(true);
        }
        (Some(None), Some(b)) => {
            if required {
                return Err(b.timeout_error());
            }
            tracing::info!(
                "the gateway's answer to the UDP binding did not arrive (inbound UDP blocked?); \
                 going on: the gateway binds on the request"
            );
            links.udp_confirmed = Some(false);
        }
        (None, Some(b)) => links.udp_pending = Some(b),
        (Some(None), None) | (None, None) => {}
    }
    links.early = early;
    if matches!(route.send, Some(SendRoute::Udp(_))) && !fw.block_udp_out {
        // The first packet must not be refused by tokio's `try_send_to` because the reactor
        // has not seen a fresh socket writable yet (see `UdpBinder::run`).
        let _ = tokio::time::timeout(opts.bind_timeout, socket.writable()).await;
    }
    Ok(links)
}

// ---------------------------------------------------------------- the engine

/// The proven paths of a route: gateway consent when this phone receives UDP from the gateway
/// (only then can the answers arrive), direct candidates from the instructions.
fn call_paths(i: &MediaInstructions, key: &SessionKey, route: &Route, now: Instant) -> CallPaths {
    let gw = route
        .gateway_udp
        .filter(|_| !route.recv_tcp && i.recv.via_gateway);
    let leg_key = route.leg.as_deref().map(|l| control::leg_key(key, l));
    CallPaths::new(i, key, gw, leg_key, now.into_std(), rand::random())
}

/// A call whose media is bound at the gateway but not yet flowing. Binding both ends first
/// and then starting them avoids losing the first packets to a peer that is not bound yet
/// (when one process holds both ends; phones wait for the gateway's `media_ready` instead,
/// see [`MediaOptions::ready_timeout`]).
pub struct BoundMedia {
    instr: MediaInstructions,
    key: SessionKey,
    socket: Arc<UdpSocket>,
    opts: MediaOptions,
    route: Route,
    links: Links,
}

impl BoundMedia {
    /// Binds what `instr` needs (see the module docs). `socket` is the call's UDP socket.
    pub async fn bind(
        instr: &MediaInstructions,
        key: &SessionKey,
        socket: Arc<UdpSocket>,
        opts: MediaOptions,
    ) -> Result<BoundMedia, MediaError> {
        let route = Route::from_instructions(instr)?;
        if matches!(route.send, Some(SendRoute::Udp(_))) && opts.firewall.block_udp_out {
            tracing::warn!(
                "the plan sends media over UDP but the simulated firewall blocks outgoing UDP: \
                 the peer will hear nothing"
            );
        }
        let links = establish(&route, key, &socket, &opts).await?;
        Ok(BoundMedia {
            instr: instr.clone(),
            key: key.clone(),
            socket,
            opts,
            route,
            links,
        })
    }

    /// The gateway's view of our UDP media source, if it answered.
    pub fn udp_mapped(&self) -> Option<SocketAddr> {
        self.links.udp_mapped
    }

    /// The gateway's view of our TCP media source, if a TCP connection was bound.
    pub fn tcp_mapped(&self) -> Option<SocketAddr> {
        self.links.tcp_mapped
    }

    /// Starts sending and receiving on a task of the current runtime.
    pub fn start(self) -> MediaCall {
        let now = Instant::now();
        let has_audio = self.opts.audio.as_ref().is_some_and(|a| !a.is_empty());
        let sending = self.route.send.is_some();
        let engine = Engine::new(self, now);
        let holding = engine.hold.is_some();
        let (status_tx, status_rx) = watch::channel(Status {
            started: now,
            playback_done: !has_audio || !sending,
            has_audio,
            holding,
            sending_since: (sending && !holding).then_some(now),
            last_media: None,
            received: 0,
            tcp_closed: false,
            gateway_consent_lost: false,
        });
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let task = tokio::spawn(engine.run(ctl_rx, status_tx));
        MediaCall {
            ctl: ctl_tx,
            task,
            status: status_rx,
        }
    }
}

/// What the caller of the engine can watch while a call runs.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub started: Instant,
    /// Every frame of the audio has been sent (true from the start when there is none).
    pub playback_done: bool,
    pub has_audio: bool,
    /// The audio is held until `media_ready` (see [`MediaOptions::ready_timeout`]).
    pub holding: bool,
    /// When sending last started (after the bindings, or after `media_ready`).
    pub sending_since: Option<Instant>,
    /// Arrival of the last media packet accepted.
    pub last_media: Option<Instant>,
    pub received: u64,
    /// The gateway closed the TCP media connection.
    pub tcp_closed: bool,
    /// The UDP path to the gateway lost consent (no keyed answer for 2 s).
    pub gateway_consent_lost: bool,
}

impl Status {
    /// How long no media has arrived: since the last packet, the start, or the moment this
    /// side started sending (the other side normally starts then too), whichever is latest;
    /// zero while the audio is held for `media_ready` (the other side is waiting as well).
    pub fn idle_for(&self, now: Instant) -> Duration {
        if self.holding {
            return Duration::ZERO;
        }
        let since = [Some(self.started), self.last_media, self.sending_since]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.started);
        now.saturating_duration_since(since)
    }
}

enum Ctl {
    StopSending,
    /// The gateway's `media_ready` for this call.
    Ready,
    Replan(
        Box<MediaInstructions>,
        oneshot::Sender<Result<(), MediaError>>,
    ),
    Finish,
}

/// A running call's media. Dropping it stops the engine (without a report).
pub struct MediaCall {
    ctl: mpsc::Sender<Ctl>,
    task: JoinHandle<MediaReport>,
    status: watch::Receiver<Status>,
}

impl MediaCall {
    /// Binds and starts in one step (see [`BoundMedia`]).
    pub async fn start(
        instr: &MediaInstructions,
        key: &SessionKey,
        socket: Arc<UdpSocket>,
        opts: MediaOptions,
    ) -> Result<MediaCall, MediaError> {
        Ok(BoundMedia::bind(instr, key, socket, opts).await?.start())
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Resolves once the audio has been sent (never, if there is audio and the engine
    /// stopped sending before the end).
    pub async fn playback_done(&mut self) {
        if self.status.wait_for(|s| s.playback_done).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when the status changes (new media, end of playback, TCP closed).
    pub async fn changed(&mut self) -> Result<(), MediaError> {
        self.status.changed().await.map_err(|_| MediaError::Stopped)
    }

    /// New instructions for the same call (the gateway re-planned): binds what the new route
    /// needs and switches to it; sequence numbers, SSRC, audio position and statistics go on.
    /// On error the old route stays.
    pub async fn replan(&self, instr: MediaInstructions) -> Result<(), MediaError> {
        let (tx, rx) = oneshot::channel();
        self.ctl
            .send(Ctl::Replan(Box::new(instr), tx))
            .await
            .map_err(|_| MediaError::Stopped)?;
        rx.await.map_err(|_| MediaError::Stopped)?
    }

    /// The gateway said `media_ready` for this call: held audio goes now. Call it for every
    /// `media_ready` of the call, in the order the control session delivered it relative to
    /// re-plans (a `media_ready` that comes while nothing is held is ignored).
    pub async fn media_ready(&self) {
        let _ = self.ctl.send(Ctl::Ready).await;
    }

    /// Stops sending; reception goes on until [`finish`](Self::finish).
    pub async fn stop_sending(&self) {
        let _ = self.ctl.send(Ctl::StopSending).await;
    }

    /// Stops the engine and returns what it did.
    pub async fn finish(self) -> MediaReport {
        let _ = self.ctl.send(Ctl::Finish).await;
        match self.task.await {
            Ok(r) => r,
            Err(e) => {
                // The engine panicked or was cancelled: report nothing rather than panic here.
                tracing::error!("media engine: {e}");
                MediaReport {
                    send: None,
                    recv: TransportUsed {
                        transport: Transport::Udp,
                        via_gateway: false,
                    },
                    plan: None,
                    sent: SentStats::default(),
                    received: ReceivedStats::default(),
                    udp_mapped: None,
                    tcp_mapped: None,
                    udp_binding_confirmed: None,
                    replans: 0,
                    media_ready_wait_ms: None,
                    media_ready_timed_out: false,
                    tcp_closed: false,
                    paths: PathsReport::default(),
                    duration_s: 0.0,
                    recording: Vec::new(),
                }
            }
        }
    }
}

/// The receiving half's state.
struct Receiver {
    t0: Instant,
    /// Arrival of the last accepted media packet.
    last_at: Option<Instant>,
    streams: Vec<(u32, RtpStats)>,
    /// Per stream (same index): sequence numbers seen, to drop duplicates.
    windows: Vec<SeqWindow>,
    latency: Histogram<u64>,
    recorder: Option<Recorder>,
    stats: ReceivedStats,
    pcm: [i16; MAX_PACKET],
}

impl Receiver {
    fn new(t0: Instant, record_samples: usize) -> Self {
        Receiver {
            t0,
            last_at: None,
            streams: Vec::new(),
            windows: Vec::new(),
            // 1 µs .. 60 s at 3 significant figures; constant bounds cannot fail.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds"),
            recorder: (record_samples > 0).then(|| Recorder::new(record_samples)),
            stats: ReceivedStats::default(),
            pcm: [0; MAX_PACKET],
        }
    }

    /// One media packet from the expected source. Returns whether it was accepted as media.
    fn on_packet(&mut self, data: &[u8], at: Instant, wall_ns: u64, tcp: bool) -> bool {
        if stun::looks_like_stun(data) {
            self.stats.ignored.stun += 1;
            return false;
        }
        if rtp::is_rtcp(data) {
            self.stats.ignored.rtcp += 1;
            return false;
        }
        let Ok(p) = rtp::RtpPacket::new_checked(data) else {
            self.stats.ignored.malformed += 1;
            return false;
        };
        if p.payload_type() != PT_PCMU {
            self.stats.ignored.payload_type += 1;
            return false;
        }
        let ssrc = p.ssrc();
        let k = match self.streams.iter().position(|(s, _)| *s == ssrc) {
            Some(k) => k,
            None if self.streams.len() < MAX_SSRCS => {
                self.streams.push((ssrc, RtpStats::default()));
                self.windows.push(SeqWindow::default());
                self.streams.len() - 1
            }
            None => {
                self.stats.ignored.too_many_ssrcs += 1;
                return false;
            }
        };
        if let Some(w) = self.windows.get_mut(k)
            && !w.fresh(p.sequence())
        {
            self.stats.ignored.duplicate += 1;
            return false;
        }
        let arrival_ns = at.saturating_duration_since(self.t0).as_nanos();
        let arrival = (arrival_ns * u128::from(CLOCK_RATE) / 1_000_000_000) as u64;
        self.streams[k]
            .1
            .on_packet(ssrc, p.sequence(), p.timestamp(), arrival);
        if let Some(sent) = send_time_ns(&p)
            && let Some(d) = wall_ns.checked_sub(sent)
        {
            let _ = self.latency.record((d / 1000).max(1));
        }
        match self.last_at {
            None => {
                self.stats.first_packet_ms =
                    Some(at.saturating_duration_since(self.t0).as_secs_f64() * 1000.0);
            }
            Some(last) => {
                let gap = at.saturating_duration_since(last).as_secs_f64() * 1000.0;
                self.stats.max_gap_ms = self.stats.max_gap_ms.max(gap);
            }
        }
        self.last_at = Some(at);
        self.stats.packets += 1;
        self.stats.bytes += data.len() as u64;
        if tcp {
            self.stats.tcp_packets += 1;
        } else {
            self.stats.udp_packets += 1;
        }
        if let Some(rec) = &mut self.recorder {
            let payload = p.payload();
            let n = payload.len().min(self.pcm.len());
            for (o, &c) in self.pcm[..n].iter_mut().zip(payload) {
                *o = g711::decode_ulaw(c);
            }
            rec.on_frame(ssrc, p.sequence(), at, &self.pcm[..n]);
        }
        true
    }

    fn report(&mut self) -> (ReceivedStats, Vec<i16>) {
        let mut s = std::mem::take(&mut self.stats);
        s.streams = self.streams.iter().map(|(_, r)| r.report()).collect();
        s.ssrcs = s.streams.len();
        s.lost = s.streams.iter().map(|r| r.lost).sum();
        s.jitter_ms = s
            .streams
            .iter()
            .map(|r| f64::from(r.jitter) * 1000.0 / f64::from(CLOCK_RATE))
            .fold(0.0, f64::max);
        if !self.latency.is_empty() {
            let ms = |us: u64| us as f64 / 1000.0;
            s.latency_ms = Some(LatencyMs {
                p50: ms(self.latency.value_at_quantile(0.5)),
                p99: ms(self.latency.value_at_quantile(0.99)),
                max: ms(self.latency.max()),
            });
        }
        let rec = self
            .recorder
            .take()
            .map(Recorder::into_samples)
            .unwrap_or_default();
        (s, rec)
    }
}

struct Engine {
    socket: Arc<UdpSocket>,
    key: SessionKey,
    instr: MediaInstructions,
    opts: MediaOptions,
    route: Route,
    tcp: Option<TcpStream>,
    tcp_in: framing::FrameBuffer,
    tcp_out: Vec<u8>,
    tcp_closed: bool,
    udp_mapped: Option<SocketAddr>,
    tcp_mapped: Option<SocketAddr>,
    udp_confirmed: Option<bool>,
    /// A best-effort UDP binding still waiting for its answer.
    udp_pending: Option<UdpBinder>,
    early: Vec<Early>,
    frames: Packetizer,
    ssrc: u32,
    sending: bool,
    /// Holding the audio for `media_ready`: when it goes anyway.
    hold: Option<Instant>,
    /// When the current hold began (the bindings were done).
    hold_since: Instant,
    /// How long the audio was held the first time.
    ready_wait: Option<Duration>,
    ready_timed_out: bool,
    sent: SentStats,
    rx: Receiver,
    started: Instant,
    replans: u32,
    /// Direct candidates, consent and source validation (see [`super::paths`]).
    paths: CallPaths,
}

enum Ev {
    Ctl(Option<Ctl>),
    Tick,
    Keepalive,
    /// The UDP binding still pending wants a retransmission, or has run out of time.
    Bind,
    /// No `media_ready` in time.
    HoldExpired,
    /// The proven paths want the clock (checks, consent, overlap end).
    Paths,
    Udp(std::io::Result<(usize, SocketAddr)>),
    Tcp(std::io::Result<tokio::io::Ready>),
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn tcp_ready(tcp: Option<&TcpStream>, want_write: bool) -> std::io::Result<tokio::io::Ready> {
    match tcp {
        Some(t) => {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            t.ready(interest).await
        }
        None => std::future::pending().await,
    }
}

impl Engine {
    fn new(b: BoundMedia, now: Instant) -> Engine {
        let audio = b
            .opts
            .audio
            .clone()
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let frames = Packetizer::new(audio, rand::random(), rand::random())
            .silence_after(b.opts.silence_after_audio);
        let sending = b.route.send.is_some();
        let record = b.opts.record_samples;
        let hold = b.opts.ready_timeout.filter(|_| sending).map(|t| now + t);
        let paths = call_paths(&b.instr, &b.key, &b.route, now);
        Engine {
            paths,
            socket: b.socket,
            key: b.key,
            instr: b.instr,
            route: b.route,
            tcp: b.links.tcp,
            tcp_in: b.links.tcp_in,
            tcp_out: Vec::new(),
            tcp_closed: false,
            udp_mapped: b.links.udp_mapped,
            tcp_mapped: b.links.tcp_mapped,
            udp_confirmed: b.links.udp_confirmed,
            udp_pending: b.links.udp_pending,
            early: b.links.early,
            opts: b.opts,
            frames,
            ssrc: rand::random(),
            sending,
            hold,
            hold_since: now,
            ready_wait: None,
            ready_timed_out: false,
            sent: SentStats::default(),
            rx: Receiver::new(now, record),
            started: now,
            replans: 0,
        }
    }

    async fn run(
        mut self,
        mut ctl: mpsc::Receiver<Ctl>,
        status: watch::Sender<Status>,
    ) -> MediaReport {
        let mut pacer = tokio::time::interval_at(self.started, PACKET_INTERVAL);
        // Burst: a late wake-up sends the packets that were due, so the long-run rate is
        // exactly one per 20 ms (no drift).
        pacer.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut keepalive =
            tokio::time::interval_at(self.started + KEEPALIVE_INTERVAL, KEEPALIVE_INTERVAL);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let socket = self.socket.clone();
        let mut buf = vec![0u8; 2048];
        for e in std::mem::take(&mut self.early) {
            self.on_udp(&e.data, e.from, e.at, &status);
        }
        self.drain_tcp_frames(&status);
        if self.hold.is_some() {
            tracing::info!(
                call = self.instr.call,
                "media bound; holding the audio until the gateway's media_ready"
            );
        }
        loop {
            let want_write = !self.tcp_out.is_empty();
            let bind_wake = self.udp_pending.as_ref().map(UdpBinder::wake_at);
            let paths_wake = self.paths.poll_timeout().map(Instant::from_std);
            let ev = tokio::select! {
                biased;
                c = ctl.recv() => Ev::Ctl(c),
                _ = pacer.tick(), if self.sending && self.hold.is_none() => Ev::Tick,
                r = socket.recv_from(&mut buf) => Ev::Udp(r),
                r = tcp_ready(self.tcp.as_ref(), want_write) => Ev::Tcp(r),
                _ = sleep_until_opt(bind_wake), if bind_wake.is_some() => Ev::Bind,
                _ = sleep_until_opt(self.hold), if self.hold.is_some() => Ev::HoldExpired,
                _ = sleep_until_opt(paths_wake), if paths_wake.is_some() => Ev::Paths,
                _ = keepalive.tick(), if self.route.keepalive => Ev::Keepalive,
            };
            match ev {
                Ev::Ctl(None) | Ev::Ctl(Some(Ctl::Finish)) => {
                    self.take_arrived(&socket, &mut buf, &status);
                    break;
                }
                Ev::Ctl(Some(Ctl::StopSending)) => self.sending = false,
                Ev::Ctl(Some(Ctl::Ready)) => {
                    if self.release(false, &status) {
                        pacer.reset_immediately();
                    } else {
                        tracing::debug!(call = self.instr.call, "media_ready while not holding");
                    }
                }
                Ev::HoldExpired => {
                    tracing::warn!(
                        call = self.instr.call,
                        "no media_ready from the gateway within {:?} of binding: sending anyway \
                         (a gateway without media_ready?); the start may be clipped",
                        self.opts.ready_timeout.unwrap_or_default()
                    );
                    if self.release(true, &status) {
                        pacer.reset_immediately();
                    }
                }
                Ev::Ctl(Some(Ctl::Replan(instr, reply))) => {
                    let r = self.replan(*instr, &status).await;
                    if r.is_ok() {
                        pacer.reset();
                    }
                    let _ = reply.send(r);
                }
                Ev::Tick => self.send_next(&status),
                Ev::Keepalive => self.send_keepalive(),
                Ev::Bind => self.bind_tick(),
                Ev::Paths => {
                    let out = self.paths.handle_timeout(Instant::now().into_std());
                    self.transmit_all(out);
                    let lost = self.paths.gateway_lost();
                    status.send_if_modified(|s| {
                        let changed = s.gateway_consent_lost != lost;
                        s.gateway_consent_lost = lost;
                        changed
                    });
                }
                Ev::Udp(Ok((n, from))) => {
                    self.on_udp(&buf[..n], canonical(from), Instant::now(), &status);
                }
                Ev::Udp(Err(e)) => {
                    // E.g. an ICMP error reported on the socket; nothing to do but go on.
                    tracing::debug!("UDP media receive: {e}");
                }
                Ev::Tcp(Ok(ready)) => self.on_tcp_ready(ready, &status),
                Ev::Tcp(Err(e)) => self.tcp_lost(&format!("{e}"), &status),
            }
        }
        self.report()
    }

    /// Ends the hold (if any); whether there was one.
    fn release(&mut self, timed_out: bool, status: &watch::Sender<Status>) -> bool {
        if self.hold.take().is_none() {
            return false;
        }
        let now = Instant::now();
        let waited = now.saturating_duration_since(self.hold_since);
        self.ready_wait.get_or_insert(waited);
        self.ready_timed_out |= timed_out;
        if !timed_out {
            tracing::info!(
                call = self.instr.call,
                waited_ms = waited.as_millis() as u64,
                "media_ready: sending the audio"
            );
        }
        status.send_modify(|s| {
            s.holding = false;
            s.sending_since = Some(now);
        });
        true
    }

    /// The pending best-effort UDP binding: retransmit, or give up at its deadline.
    fn bind_tick(&mut self) {
        let Some(b) = &mut self.udp_pending else {
            return;
        };
        let now = Instant::now();
        if b.expired(now) {
            tracing::info!(
                "the gateway's answer to the UDP binding did not arrive (inbound UDP blocked?); \
                 going on: the gateway binds on the request"
            );
            self.udp_pending = None;
            self.udp_confirmed = Some(false);
        } else {
            b.transmit_if_due(&self.socket, self.opts.firewall, now);
        }
    }

    fn send_next(&mut self, status: &watch::Sender<Status>) {
        let Some(route) = self.route.send else {
            return;
        };
        let Some(frame) = self.frames.next() else {
            self.sending = false;
            return;
        };
        let mut pkt = [0u8; RTP_HEADER_LEN + SAMPLES_PER_PACKET];
        let Some(n) = write_packet(&frame, self.ssrc, wall_clock_ns(), &mut pkt) else {
            return;
        };
        if let (SendRoute::Udp(to), Some(b)) = (route, &mut self.udp_pending)
            && to == b.gateway
        {
            // The gateway only takes media from a bound source, and nothing tells this side
            // whether the request got there: until the answer (or BEST_EFFORT_BIND), each
            // packet is preceded by it, so a lost request costs no audio.
            b.transmit(&self.socket, self.opts.firewall, Instant::now());
        }
        let (direct, via_route) = self.paths.send_targets(Instant::now().into_std());
        let mut ok_direct = false;
        if let (SendRoute::Udp(_), Some(d)) = (route, direct) {
            if let Ok(true) = self.opts.firewall.send_to(&self.socket, &pkt[..n], d) {
                self.paths.sent_direct();
                ok_direct = true;
            }
        }
        // Through the gateway unless direct (and during the switch's overlap as well).
        let route_used = via_route || !matches!(route, SendRoute::Udp(_));
        let ok_route = route_used
            && match route {
                SendRoute::Udp(to) => {
                    match self.opts.firewall.send_to(&self.socket, &pkt[..n], to) {
                        Ok(true) => true,
                        Ok(false) if self.opts.firewall.block_udp_out => {
                            self.sent.blocked += 1;
                            false
                        }
                        Ok(false) => {
                            self.sent.dropped += 1;
                            false
                        }
                        Err(e) => {
                            tracing::debug!("UDP media send to {to}: {e}");
                            self.sent.dropped += 1;
                            false
                        }
                    }
                }
                SendRoute::Tcp => self.queue_tcp(&pkt[..n]),
            };
        let ok = ok_direct || ok_route;
        if ok {
            self.sent.packets += 1;
            self.sent.bytes += n as u64;
            if frame.audio {
                self.sent.audio_packets += 1;
            }
        }
        if frame.audio && self.frames.audio_done() {
            status.send_modify(|s| s.playback_done = true);
        }
    }

    /// Queues one RFC 4571 frame and writes what the socket takes now.
    fn queue_tcp(&mut self, pkt: &[u8]) -> bool {
        if self.tcp.is_none() || self.tcp_out.len() + 2 + pkt.len() > TCP_BACKLOG {
            self.sent.dropped += 1;
            return false;
        }
        let Ok(hdr) = framing::header(pkt.len()) else {
            return false;
        };
        self.tcp_out.extend_from_slice(&hdr);
        self.tcp_out.extend_from_slice(pkt);
        self.flush_tcp();
        true
    }

    fn flush_tcp(&mut self) {
        let Some(t) = &self.tcp else {
            self.tcp_out.clear();
            return;
        };
        while !self.tcp_out.is_empty() {
            match t.try_write(&self.tcp_out) {
                Ok(0) => break,
                Ok(n) => {
                    self.tcp_out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("TCP media send: {e}");
                    self.tcp_out.clear();
                    break;
                }
            }
        }
    }

    /// Sends what the proven paths asked for (checks, answers, consent requests).
    fn transmit_all(&mut self, out: Vec<Transmit>) {
        for t in out {
            if let Err(e) = self.opts.firewall.send_to(&self.socket, &t.data, t.to) {
                tracing::debug!("path check to {}: {e}", t.to);
            }
        }
    }

    fn send_keepalive(&mut self) {
        let Some(gw) = self.route.gateway_udp else {
            return;
        };
        let mut b = [0u8; 64];
        let txid = binding::new_txid();
        let n = stun::Writer::new(&mut b, stun::Class::Indication, stun::BINDING, &txid).and_then(
            |mut w| {
                w.fingerprint()?;
                Ok(w.finish())
            },
        );
        if let Ok(n) = n {
            let _ = self.opts.firewall.send_to(&self.socket, &b[..n], gw);
        }
    }

    fn on_udp(
        &mut self,
        data: &[u8],
        from: SocketAddr,
        at: Instant,
        status: &watch::Sender<Status>,
    ) {
        if !self.opts.firewall.admits_udp_in() {
            self.rx.stats.ignored.firewall += 1;
            return;
        }
        if let Some(b) = &mut self.udp_pending
            && let Some(mapped) = b.on_datagram(data, from)
        {
            self.udp_mapped = Some(mapped);
            self.udp_confirmed = Some(true);
            self.udp_pending = None;
            return;
        }
        if stun::looks_like_stun(data) {
            let (used, out) = self.paths.handle_input(at.into_std(), from, data);
            self.transmit_all(out);
            if used {
                self.rx.stats.ignored.stun += 1;
                return;
            }
        }
        let validated = self.paths.accepts(from);
        let expected = validated
            || match &mut self.route.udp_source {
                UdpSource::None => false,
                UdpSource::Exactly(a) => *a == from,
                UdpSource::Latch(Some(a)) => *a == from,
                UdpSource::Latch(latched) => {
                    // Latch on the first packet that looks like our RTP.
                    let looks = !stun::looks_like_stun(data)
                        && rtp::RtpPacket::new_checked(data)
                            .is_ok_and(|p| p.payload_type() == PT_PCMU);
                    if looks {
                        *latched = Some(from);
                    }
                    looks
                }
            };
        if !expected {
            if !stun::looks_like_stun(data) {
                self.rx.stats.ignored.wrong_source += 1;
            } else {
                self.rx.stats.ignored.stun += 1;
            }
            return;
        }
        if self.rx.on_packet(data, at, wall_clock_ns(), false) {
            self.note_media(at, status);
        }
    }

    fn note_media(&self, at: Instant, status: &watch::Sender<Status>) {
        let received = self.rx.stats.packets;
        // Only the first packet wakes watchers; later ones just update the value.
        status.send_if_modified(|s| {
            let first = s.last_media.is_none();
            s.last_media = Some(at);
            s.received = received;
            first
        });
    }

    /// The call is over: takes the media that already arrived and waits on the sockets (the
    /// engine may be behind on a loaded machine, and `Finish` goes first), so that the report
    /// and the recording hold everything the other side's last packets brought before the
    /// end. Reads the sockets directly, not through the runtime's readiness (which the I/O
    /// driver may not have updated yet), without waiting; at most one socket buffer's worth.
    fn take_arrived(&mut self, socket: &UdpSocket, buf: &mut [u8], status: &watch::Sender<Status>) {
        use std::mem::MaybeUninit;
        let raw = socket2::SockRef::from(socket);
        for _ in 0..MAX_TAKEN_AT_END {
            // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv_from only writes.
            let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
            let Ok((n, from)) = raw.recv_from(uninit) else {
                break;
            };
            let Some(from) = from.as_socket() else {
                continue;
            };
            self.on_udp(&buf[..n], canonical(from), Instant::now(), status);
        }
        let reads = std::cell::Cell::new(0usize);
        self.read_tcp(status, |t, chunk| {
            use std::io::Read;
            reads.set(reads.get() + 1);
            if reads.get() > MAX_TCP_READS_AT_END {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            (&*socket2::SockRef::from(t)).read(chunk)
        });
    }

    fn on_tcp_ready(&mut self, ready: tokio::io::Ready, status: &watch::Sender<Status>) {
        if ready.is_writable() {
            self.flush_tcp();
        }
        if ready.is_readable() || ready.is_read_closed() {
            self.read_tcp(status, |t, chunk| t.try_read(chunk));
        }
    }

    /// Reads the TCP media connection with `read` until it would block (or closes).
    fn read_tcp(
        &mut self,
        status: &watch::Sender<Status>,
        read: impl Fn(&TcpStream, &mut [u8]) -> std::io::Result<usize>,
    ) {
        let mut chunk = [0u8; 4096];
        loop {
            let Some(t) = &self.tcp else { return };
            match read(t, &mut chunk) {
                Ok(0) => {
                    self.drain_tcp_frames(status);
                    self.tcp_lost("the gateway closed the TCP media connection", status);
                    return;
                }
                Ok(n) => {
                    if let Err(e) = self.tcp_in.push(&chunk[..n]) {
                        // Drain, then retry once; a stream that still does not fit is broken.
                        self.drain_tcp_frames(status);
                        if self.tcp_in.push(&chunk[..n]).is_err() {
                            self.tcp_lost(&e.to_string(), status);
                            return;
                        }
                    }
                    self.drain_tcp_frames(status);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.tcp_lost(&e.to_string(), status);
                    return;
                }
            }
        }
    }

    fn drain_tcp_frames(&mut self, status: &watch::Sender<Status>) {
        loop {
            match self.tcp_in.next_frame() {
                Ok(Some(f)) => {
                    let at = Instant::now();
                    if !self.route.recv_tcp {
                        // Only STUN is expected on a send-only connection.
                        if !stun::looks_like_stun(&f) {
                            self.rx.stats.ignored.wrong_source += 1;
                        }
                        continue;
                    }
                    if self.rx.on_packet(&f, at, wall_clock_ns(), true) {
                        self.note_media(at, status);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.tcp_lost(&e.to_string(), status);
                    return;
                }
            }
        }
    }

    fn tcp_lost(&mut self, why: &str, status: &watch::Sender<Status>) {
        if self.tcp.take().is_some() {
            tracing::warn!("TCP media connection lost: {why}");
            self.tcp_closed = true;
            self.tcp_out.clear();
            status.send_modify(|s| s.tcp_closed = true);
        }
    }

    async fn replan(
        &mut self,
        instr: MediaInstructions,
        status: &watch::Sender<Status>,
    ) -> Result<(), MediaError> {
        let route = Route::from_instructions(&instr)?;
        let links = establish(&route, &self.key, &self.socket, &self.opts).await?;
        self.route = route;
        self.tcp = links.tcp;
        self.tcp_in = links.tcp_in;
        self.tcp_out.clear();
        self.udp_mapped = links.udp_mapped.or(self.udp_mapped);
        self.tcp_mapped = links.tcp_mapped.or(self.tcp_mapped);
        self.udp_confirmed = links.udp_confirmed;
        self.udp_pending = links.udp_pending;
        self.early = links.early;
        self.paths = call_paths(&instr, &self.key, &self.route, Instant::now());
        self.instr = instr;
        self.replans += 1;
        self.sending = self.route.send.is_some();
        // Held again until the new plan's media_ready; the audio position stays where it is.
        let now = Instant::now();
        self.hold = self
            .opts
            .ready_timeout
            .filter(|_| self.sending)
            .map(|t| now + t);
        self.hold_since = now;
        let holding = self.hold.is_some();
        let sending = self.sending;
        status.send_modify(|s| {
            s.tcp_closed = false;
            s.holding = holding;
            if sending && !holding {
                s.sending_since = Some(now);
            }
        });
        for e in std::mem::take(&mut self.early) {
            self.on_udp(&e.data, e.from, e.at, status);
        }
        Ok(())
    }

    fn report(&mut self) -> MediaReport {
        let (received, recording) = self.rx.report();
        let i = &self.instr;
        MediaReport {
            // Where this side ended up sending: direct once a candidate was proven (and its
            // consent held), else as instructed.
            send: self.route.send.map(|_| TransportUsed {
                transport: i.send.transport,
                via_gateway: i.send.via_gateway && !self.paths.report.send_direct,
            }),
            recv: TransportUsed {
                transport: i.recv.transport,
                via_gateway: i.recv.via_gateway,
            },
            plan: i.plan,
            sent: self.sent,
            received,
            udp_mapped: self.udp_mapped,
            tcp_mapped: self.tcp_mapped,
            udp_binding_confirmed: self
                .udp_confirmed
                .or(self.udp_pending.as_ref().map(|_| false)),
            replans: self.replans,
            media_ready_wait_ms: self.ready_wait.map(|d| d.as_secs_f64() * 1000.0),
            media_ready_timed_out: self.ready_timed_out,
            tcp_closed: self.tcp_closed,
            paths: self.paths.report,
            duration_s: Instant::now()
                .saturating_duration_since(self.started)
                .as_secs_f64(),
            recording,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(n: usize) -> Arc<[i16]> {
        (0..n)
            .map(|i| ((i as i32 * 997) % 20_000 - 10_000) as i16)
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn packetizer_numbers_frames_per_rfc3550_and_pads_the_last() {
        let src = clip(1000); // 6 full frames + 40 samples
        let p = Packetizer::new(src.clone(), 65_534, u32::MAX - 200);
        assert_eq!(p.audio_frames(), 7);
        let frames: Vec<Frame> = p.take(10).collect();
        let seqs: Vec<u16> = frames.iter().map(|f| f.sequence).collect();
        assert_eq!(seqs, [65534, 65535, 0, 1, 2, 3, 4, 5, 6, 7], "wraps");
        for (k, f) in frames.iter().enumerate() {
            assert_eq!(
                f.timestamp,
                (u32::MAX - 200).wrapping_add(160 * k as u32),
                "timestamp advances 160 per packet"
            );
            assert_eq!(f.marker, k == 0, "marker on the first packet only");
            assert_eq!(f.audio, k < 7);
        }
        // Payloads are the µ-law of the source, the last padded with µ-law zeros, then silence.
        let mut decoded: Vec<i16> = Vec::new();
        for f in &frames[..7] {
            decoded.extend(f.payload.iter().map(|&c| g711::decode_ulaw(c)));
        }
        let expected: Vec<i16> = src
            .iter()
            .map(|&s| g711::ulaw_round_trip(s))
            .chain(std::iter::repeat_n(0, 120))
            .collect();
        assert_eq!(decoded, expected);
        assert!(frames[7..].iter().all(|f| f.payload == [0xFF; 160]));
        // Without silence after, it ends with the audio.
        let p = Packetizer::new(src, 0, 0).silence_after(false);
        assert_eq!(p.count(), 7);
        let mut p = Packetizer::new(clip(320), 0, 0);
        assert!(!p.audio_done());
        p.next();
        p.next();
        assert!(p.audio_done(), "exactly two frames");
    }

    #[test]
    fn deadlines_do_not_drift() {
        let t0 = Instant::now();
        assert_eq!(send_deadline(t0, 0), t0);
        assert_eq!(send_deadline(t0, 50), t0 + Duration::from_secs(1));
        assert_eq!(
            send_deadline(t0, 180_000),
            t0 + Duration::from_secs(3600),
            "an hour of packets ends exactly an hour later"
        );
    }

    #[test]
    fn packets_carry_header_extension_and_payload() {
        let f = Packetizer::new(clip(160), 77, 1234)
            .next()
            .expect("a frame");
        let mut buf = [0u8; 300];
        let n = write_packet(&f, 0xdead_beef, 0x0102_0304_0506_0708, &mut buf).expect("fits");
        assert_eq!(n, 12 + 16 + 160);
        let p = rtp::RtpPacket::new_checked(&buf[..n]).expect("valid RTP");
        assert_eq!(
            (
                p.version(),
                p.payload_type(),
                p.sequence(),
                p.timestamp(),
                p.ssrc()
            ),
            (2, 0, 77, 1234, 0xdead_beef)
        );
        assert!(p.marker() && p.has_extension());
        assert_eq!(p.payload(), &f.payload[..]);
        assert_eq!(send_time_ns(&p), Some(0x0102_0304_0506_0708));
        // Reference bytes of the extension: 0xBEDE, 3 words, ID 1 L 7, the time, padding.
        assert_eq!(
            &buf[12..28],
            &[0xBE, 0xDE, 0, 3, 0x17, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]
        );
        assert_eq!(write_packet(&f, 1, 1, &mut [0u8; 100]), None);
        // Another element first, padding between, then ours: still found.
        let mut other = rtp::RtpRepr {
            payload_type: 0,
            extension: Some((
                ONE_BYTE_PROFILE,
                vec![0x21, 9, 9, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0],
            )),
            ..Default::default()
        };
        let mut b = [0u8; 64];
        let n = other.emit(&mut b).expect("emit");
        let p = rtp::RtpPacket::new_checked(&b[..n]).expect("valid");
        assert_eq!(send_time_ns(&p), Some(42));
        // A two-byte-form extension is not read.
        other.extension = Some((0x1000, vec![1, 8, 0, 0]));
        let n = other.emit(&mut b).expect("emit");
        let p = rtp::RtpPacket::new_checked(&b[..n]).expect("valid");
        assert_eq!(send_time_ns(&p), None);
    }

    #[test]
    fn recorder_places_by_sequence_fills_gaps_and_mixes() {
        let t0 = Instant::now();
        let frame = |v: i16| [v; 160];
        let mut r = Recorder::new(100_000);
        // Stream 1: seq 65535, 0, (1 lost), 2, a duplicate of 0, and a late 65534 (before the
        // first: dropped).
        r.on_frame(1, 65535, t0, &frame(100));
        r.on_frame(1, 0, t0, &frame(200));
        r.on_frame(1, 2, t0, &frame(400));
        r.on_frame(1, 0, t0, &frame(200));
        r.on_frame(1, 65534, t0, &frame(50));
        assert_eq!(r.dropped_frames, 1);
        let s = r.samples();
        assert_eq!(s.len(), 4 * 160);
        assert!(s[..160].iter().all(|&x| x == 100));
        assert!(
            s[160..320].iter().all(|&x| x == 200),
            "duplicate not mixed twice"
        );
        assert!(s[320..480].iter().all(|&x| x == 0), "lost frame is silence");
        assert!(s[480..].iter().all(|&x| x == 400));
        // Stream 2 starts 40 ms later: placed from slot 2, mixed with saturation.
        r.on_frame(2, 9000, t0 + Duration::from_millis(41), &frame(i16::MAX));
        r.on_frame(2, 9001, t0 + Duration::from_millis(61), &frame(i16::MAX));
        let s = r.samples();
        assert!(s[320..480].iter().all(|&x| x == i16::MAX));
        assert!(s[480..].iter().all(|&x| x == i16::MAX), "saturating sum");
        // Bounded.
        let mut r = Recorder::new(320);
        r.on_frame(1, 0, t0, &frame(1));
        r.on_frame(1, 1, t0, &frame(1));
        r.on_frame(1, 2, t0, &frame(1));
        r.on_frame(1, 30_000, t0, &frame(1));
        assert_eq!(r.samples().len(), 320);
        assert_eq!(r.dropped_frames, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_sends_fifty_packets_a_second_without_drift() {
        let start = Instant::now();
        let mut pacer = tokio::time::interval_at(start, PACKET_INTERVAL);
        pacer.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut ticks = Vec::new();
        for k in 0..500u32 {
            let at = pacer.tick().await;
            assert_eq!(at, send_deadline(start, k));
            ticks.push(Instant::now());
            if k == 100 {
                // A stall of 95 ms: the missed packets go out at once, then the grid resumes.
                tokio::time::sleep(Duration::from_millis(95)).await;
            }
        }
        assert_eq!(ticks[499], start + Duration::from_millis(20 * 499));
        assert_eq!(
            ticks[101],
            start + Duration::from_millis(20 * 100 + 95),
            "late packets burst"
        );
    }

    #[test]
    fn routes_follow_the_instructions() {
        use crate::wire::control::{MediaRecv, MediaSend};
        let gw_udp: SocketAddr = "192.0.2.1:7401".parse().expect("addr");
        let gw_tcp: SocketAddr = "192.0.2.1:7401".parse().expect("addr");
        let peer: SocketAddr = "198.51.100.7:4000".parse().expect("addr");
        let base = MediaInstructions {
            call_key: false,
            call: 1,
            plan: None,
            caller: true,
            send: MediaSend {
                transport: Transport::Udp,
                to: Some(gw_udp),
                via_gateway: true,
            },
            recv: MediaRecv {
                transport: Transport::Tcp,
                via_gateway: true,
                from: None,
            },
            leg: Some("l".into()),
            gateway_udp: Some(gw_udp),
            gateway_tcp: Some(gw_tcp),
            gateway_tcp_tls: false,
            payload_type: 0,
            clock_rate: 8000,
            paths: None,
        };
        let r = Route::from_instructions(&base).expect("valid");
        assert_eq!(r.send, Some(SendRoute::Udp(gw_udp)));
        assert_eq!(r.udp_source, UdpSource::None);
        assert!(r.recv_tcp && !r.udp_bind_required && !r.keepalive);
        assert_eq!((r.gateway_tcp, r.gateway_udp), (Some(gw_tcp), Some(gw_udp)));
        // Direct both ways: no gateway, no leg needed; the source is the peer.
        let direct = MediaInstructions {
            send: MediaSend {
                transport: Transport::Udp,
                to: Some(peer),
                via_gateway: false,
            },
            recv: MediaRecv {
                transport: Transport::Udp,
                via_gateway: false,
                from: Some(peer),
            },
            leg: None,
            gateway_udp: None,
            gateway_tcp: None,
            gateway_tcp_tls: false,
            ..base.clone()
        };
        let r = Route::from_instructions(&direct).expect("valid");
        assert_eq!(r.udp_source, UdpSource::Exactly(peer));
        assert_eq!((r.gateway_tcp, r.gateway_udp), (None, None));
        // TCP out, UDP in via the gateway: receive-only UDP keeps the path open.
        let tcp_out = MediaInstructions {
            send: MediaSend {
                transport: Transport::Tcp,
                to: Some(gw_tcp),
                via_gateway: true,
            },
            recv: MediaRecv {
                transport: Transport::Udp,
                via_gateway: true,
                from: None,
            },
            ..base.clone()
        };
        let r = Route::from_instructions(&tcp_out).expect("valid");
        assert_eq!(r.udp_source, UdpSource::Exactly(gw_udp));
        assert!(r.keepalive && !r.udp_bind_required);
        // Refusals.
        assert!(matches!(
            Route::from_instructions(&MediaInstructions {
                payload_type: 8,
                ..base.clone()
            }),
            Err(MediaError::Codec { .. })
        ));
        assert!(matches!(
            Route::from_instructions(&MediaInstructions {
                leg: None,
                ..base.clone()
            }),
            Err(MediaError::Instructions(_))
        ));
        assert!(matches!(
            Route::from_instructions(&MediaInstructions {
                gateway_tcp: None,
                gateway_tcp_tls: false,
                ..base
            }),
            Err(MediaError::Instructions(_))
        ));
    }

    // ---- holding the audio for media_ready ----

    /// Instructions for direct UDP to `peer` (no gateway, nothing to bind).
    fn direct(peer: SocketAddr) -> MediaInstructions {
        use crate::wire::control::{MediaRecv, MediaSend};
        MediaInstructions {
            call_key: false,
            call: 4,
            plan: None,
            caller: true,
            send: MediaSend {
                transport: Transport::Udp,
                to: Some(peer),
                via_gateway: false,
            },
            recv: MediaRecv {
                transport: Transport::Udp,
                via_gateway: false,
                from: Some(peer),
            },
            leg: None,
            gateway_udp: None,
            gateway_tcp: None,
            gateway_tcp_tls: false,
            payload_type: 0,
            clock_rate: 8000,
            paths: None,
        }
    }

    /// Every RTP packet waiting on `s`, as (sequence, marker, payload).
    fn drain(s: &UdpSocket) -> Vec<(u16, bool, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.try_recv(&mut buf) {
            let p = rtp::RtpPacket::new_checked(&buf[..n]).expect("RTP");
            out.push((p.sequence(), p.marker(), p.payload().to_vec()));
        }
        out
    }

    async fn held_call(audio: Arc<[i16]>) -> (MediaCall, UdpSocket) {
        let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let me = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let opts = MediaOptions {
            audio: Some(audio),
            ready_timeout: Some(MEDIA_READY_TIMEOUT),
            ..MediaOptions::default()
        };
        let key = SessionKey::from_bytes([3; 32]);
        let instr = direct(peer.local_addr().expect("addr"));
        let m = MediaCall::start(&instr, &key, me, opts)
            .await
            .expect("start");
        (m, peer)
    }

    /// The µ-law payload of audio frame `k` of `clip`.
    fn frame_payload(clip: &Arc<[i16]>, k: usize) -> Vec<u8> {
        Packetizer::new(clip.clone(), 0, 0)
            .nth(k)
            .expect("frame")
            .payload
            .to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn held_audio_waits_for_media_ready_and_starts_from_its_first_sample() {
        let clip = clip(160 * 50);
        let (mut m, peer) = held_call(clip.clone()).await;
        assert!(m.status().holding);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(drain(&peer).is_empty(), "nothing is sent while held");
        let st = m.status();
        assert!(st.holding && !st.playback_done);
        assert_eq!(
            st.idle_for(Instant::now()),
            Duration::ZERO,
            "no media trouble while held"
        );
        m.media_ready().await;
        tokio::time::sleep(Duration::from_millis(110)).await;
        let got = drain(&peer);
        assert!(
            (5..=7).contains(&got.len()),
            "20 ms pacing: {} packets",
            got.len()
        );
        assert!(got[0].1, "the first packet is marked");
        for (k, (seq, _, payload)) in got.iter().enumerate() {
            assert_eq!(*seq, got[0].0.wrapping_add(k as u16));
            assert_eq!(
                payload,
                &frame_payload(&clip, k),
                "frame {k}: no audio skipped"
            );
        }
        let st = m.status();
        assert!(!st.holding && st.sending_since.is_some());
        // A second media_ready (nothing held) changes nothing.
        m.media_ready().await;
        m.playback_done().await;
        let r = m.finish().await;
        assert_eq!(r.sent.audio_packets, 50);
        let waited = r.media_ready_wait_ms.expect("held");
        assert!((2000.0..2010.0).contains(&waited), "{waited}");
        assert!(!r.media_ready_timed_out);
        assert_eq!(drain(&peer).len() + got.len(), r.sent.packets as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn without_media_ready_the_audio_goes_after_the_time_out() {
        let clip = clip(160 * 10);
        let (m, peer) = held_call(clip.clone()).await;
        tokio::time::sleep(MEDIA_READY_TIMEOUT - Duration::from_millis(10)).await;
        assert!(drain(&peer).is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = drain(&peer);
        assert!(!got.is_empty(), "sent after the time-out");
        assert_eq!(got[0].2, frame_payload(&clip, 0));
        let r = m.finish().await;
        assert!(r.media_ready_timed_out);
        let waited = r.media_ready_wait_ms.expect("held");
        assert!((3000.0..3010.0).contains(&waited), "{waited}");
    }

    /// The call ends (the peer or the gateway hung up) while media that already arrived waits
    /// on the socket, unread (the engine was behind, and `Finish` is taken first): it is
    /// counted and recorded all the same. Before, it was left on the socket, so a loaded
    /// machine's phone reported fewer packets than the gateway had relayed to it.
    #[tokio::test]
    async fn finishing_takes_the_media_that_already_arrived() {
        // A blocking socket: sending does not yield, so the engine cannot read in between.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let me = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let me_addr = me.local_addr().expect("addr");
        let opts = MediaOptions {
            record_samples: 8000,
            ..MediaOptions::default()
        };
        let instr = direct(peer.local_addr().expect("addr"));
        let m = MediaCall::start(&instr, &SessionKey::from_bytes([3; 32]), me, opts)
            .await
            .expect("start");
        // The engine runs and waits on its socket.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let audio = clip(160 * 30);
        for f in Packetizer::new(audio.clone(), 100, 0).take(30) {
            let mut pkt = [0u8; RTP_HEADER_LEN + SAMPLES_PER_PACKET];
            let n = write_packet(&f, 0x1234, wall_clock_ns(), &mut pkt).expect("packet");
            peer.send_to(&pkt[..n], me_addr).expect("send");
        }
        let r = m.finish().await;
        assert_eq!(r.received.packets, 30, "{:?}", r.received);
        assert_eq!(r.received.lost, 0);
        let want: Vec<i16> = audio.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
        assert_eq!(r.recording.len(), want.len());
        assert!(r.recording == want, "the recording holds all 30 frames");
    }

    /// Without `ready_timeout` the audio goes as soon as the media is bound (as before).
    #[tokio::test(start_paused = true)]
    async fn not_holding_unless_asked() {
        let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let me = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let opts = MediaOptions {
            audio: Some(clip(1600)),
            ..MediaOptions::default()
        };
        let instr = direct(peer.local_addr().expect("addr"));
        let m = MediaCall::start(&instr, &SessionKey::from_bytes([3; 32]), me, opts)
            .await
            .expect("start");
        assert!(!m.status().holding);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain(&peer).is_empty());
        let r = m.finish().await;
        assert_eq!(
            (r.media_ready_wait_ms, r.media_ready_timed_out),
            (None, false)
        );
    }

    /// A re-plan holds the audio again until the new plan's media_ready; it then goes on
    /// where it stopped (next sequence number, next frame), on the new route.
    #[tokio::test(start_paused = true)]
    async fn a_replan_holds_the_audio_again_without_losing_samples() {
        let clip = clip(160 * 100);
        let (m, old_peer) = held_call(clip.clone()).await;
        // Let the I/O driver see the fresh socket writable first (tokio's `try_send_to` says
        // WouldBlock until it has): a real phone's socket is older than its call.
        tokio::time::sleep(Duration::from_millis(10)).await;
        m.media_ready().await;
        tokio::time::sleep(Duration::from_millis(95)).await;
        let before = drain(&old_peer);
        assert!(!before.is_empty());
        let new_peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        m.replan(direct(new_peer.local_addr().expect("addr")))
            .await
            .expect("re-planned");
        let more = drain(&old_peer);
        assert!(m.status().holding);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(drain(&new_peer).is_empty(), "held after the re-plan");
        assert!(drain(&old_peer).is_empty());
        m.media_ready().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = drain(&new_peer);
        assert!(!after.is_empty());
        let sent: Vec<_> = before.iter().chain(&more).collect();
        assert_eq!(sent[0].2, frame_payload(&clip, 0));
        let last = sent.last().expect("sent before");
        assert_eq!(after[0].0, last.0.wrapping_add(1), "sequence goes on");
        assert_eq!(
            after[0].2,
            frame_payload(&clip, sent.len()),
            "the next frame"
        );
        assert!(!after[0].1);
        let r = m.finish().await;
        assert_eq!(r.replans, 1);
        assert!(!r.media_ready_timed_out);
    }
}
