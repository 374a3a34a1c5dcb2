//! WebSocket (RFC 6455) for the browser phone's media leg: the opening handshake a shard's TCP
//! listener answers, and the frames that carry one RTP/RTCP/STUN packet each.
//!
//! This module owns the byte formats only. [`parse_upgrade`] checks a client's opening
//! handshake (bounded by [`MAX_HANDSHAKE`]) and computes the `Sec-WebSocket-Accept` value;
//! [`Deframer`] walks client frames inside the caller's receive buffers like
//! [`framing::Deframer`] does for RFC 4571, unmasking each payload piece **in place** and
//! reporting where it lies, so the shard forwards it from where it landed. Only what a media leg
//! needs is accepted: unfragmented binary frames of at most `max_len` bytes, and the control
//! frames ping, pong and close. Text frames, fragments, unmasked client frames, reserved bits and
//! oversize frames are errors: the caller closes the connection (a byte stream cannot be
//! resynchronised).
//!
//! RFC 6455 §5.1: "a client MUST mask all frames that it sends to the server … The server MUST
//! close the connection upon receiving a frame that is not masked."

use std::ops::Range;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest, Sha1};

use super::framing::{self, Piece};

/// The largest opening handshake (request line and headers) a shard reads.
pub const MAX_HANDSHAKE: usize = 2048;
/// Most headers an opening handshake may carry.
pub const MAX_HEADERS: usize = 32;
/// RFC 6455 §1.3: the GUID appended to the client's key.
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
pub const MAX_CONTROL: usize = 125;

/// Why an opening handshake was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum HandshakeError {
    #[error("opening handshake longer than {MAX_HANDSHAKE} bytes")]
    TooLarge,
    #[error("not an HTTP request: {0}")]
    Malformed(String),
    #[error("method {0} is not GET")]
    NotGet(String),
    #[error("not HTTP/1.1")]
    Version,
    #[error("missing or wrong {0} header")]
    Header(&'static str),
    #[error("Sec-WebSocket-Key is not base64 of 16 bytes")]
    BadKey,
}

/// A complete, valid opening handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes of the request (request line, headers and the empty line).
    pub len: usize,
    /// The `Sec-WebSocket-Accept` value to answer with (base64 of a SHA-1: 28 characters).
    pub accept: [u8; 28],
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The accept value for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_for(key: &[u8]) -> [u8; 28] {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID.as_bytes());
    let mut out = [0u8; 28];
    // 20 bytes encode to exactly 28 base64 characters.
    let n = B64
        .encode_slice(h.finalize(), &mut out)
        .expect("28 bytes hold base64 of 20");
    debug_assert_eq!(n, 28);
    out
}

/// Parses a client's opening handshake at the start of `buf`. `Ok(None)`: incomplete, read on
/// (only while `buf` is shorter than [`MAX_HANDSHAKE`]; after that it is `TooLarge`).
///
/// Checked (RFC 6455 §4.2.1): `GET`, HTTP/1.1, `Upgrade: websocket`, `Connection: Upgrade`,
/// `Sec-WebSocket-Version: 13`, and a `Sec-WebSocket-Key` that is base64 of 16 bytes. `Origin`
/// is not checked: the leg is authenticated by its keyed STUN Binding, which a page of another
/// site cannot compute.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<Upgrade>, HandshakeError> {
    let window = &buf[..buf.len().min(MAX_HANDSHAKE)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HANDSHAKE => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    match req.method {
        Some("GET") => {}
        m => {
            return Err(HandshakeError::NotGet(
                m.unwrap_or("").chars().take(16).collect(),
            ));
        }
    }
    if req.version != Some(1) {
        return Err(HandshakeError::Version);
    }
    let get = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if !get("Upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err(HandshakeError::Header("Upgrade"));
    }
    if !get("Connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Err(HandshakeError::Header("Connection"));
    }
    if get("Sec-WebSocket-Version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::Header("Sec-WebSocket-Version"));
    }
    let key = get("Sec-WebSocket-Key")
        .ok_or(HandshakeError::Header("Sec-WebSocket-Key"))?
        .trim_ascii();
    let mut raw = [0u8; 18];
    match B64.decode_slice(key, &mut raw) {
        Ok(16) => {}
        _ => return Err(HandshakeError::BadKey),
    }
    Ok(Some(Upgrade {
        len,
        accept: accept_for(key),
    }))
}

/// Writes the `101 Switching Protocols` answer into `out`; returns its length (None: `out` too
/// short; 129 bytes suffice).
pub fn write_response(accept: &[u8; 28], out: &mut [u8]) -> Option<usize> {
    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: ";
    const TAIL: &[u8] = b"\r\n\r\n";
    let n = HEAD.len() + accept.len() + TAIL.len();
    let out = out.get_mut(..n)?;
    out[..HEAD.len()].copy_from_slice(HEAD);
    out[HEAD.len()..HEAD.len() + 28].copy_from_slice(accept);
    out[HEAD.len() + 28..].copy_from_slice(TAIL);
    Some(n)
}

/// Errors of the frame layer; each one ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum WsError {
    #[error("fragmented WebSocket message (one packet per frame is required)")]
    Fragmented,
    #[error("text WebSocket frame on a media leg (binary only)")]
    Text,
    #[error("unmasked client frame")]
    Unmasked,
    #[error("reserved bits set (no extension was negotiated)")]
    Reserved,
    #[error("unknown WebSocket opcode {0:#x}")]
    Opcode(u8),
    #[error("WebSocket frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
}

/// What a step of the [`Deframer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A piece of a binary frame's payload, already unmasked in the chunk.
    Data(Piece),
    /// A complete ping; its payload is [`Deframer::control_payload`] (answer with a pong).
    Ping,
    /// A pong (ignored by a server that sends no pings).
    Pong,
    /// A close frame: the peer is done.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Gathering a frame header (`hdr_got` bytes so far).
    Header,
    Payload {
        opcode: u8,
        frame_len: u16,
        /// Payload bytes already passed (the mask's phase).
        done: u16,
    },
    Failed(WsError),
}

/// Streaming deframer of client frames, with no buffer of its own beyond one header and one
/// control payload (139 bytes).
#[derive(Clone, Debug)]
pub struct Deframer {
    max_len: u16,
    state: State,
    hdr: [u8; 14],
    hdr_got: u8,
    mask: [u8; 4],
    ctrl: [u8; MAX_CONTROL],
    ctrl_len: u8,
}

/// Total header length announced by a frame's first two bytes (mask key included).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl Deframer {
    /// A deframer accepting binary frames of at most `max_len` bytes.
    pub fn new(max_len: u16) -> Deframer {
        Deframer {
            max_len,
            state: State::Header,
            hdr: [0; 14],
            hdr_got: 0,
            mask: [0; 4],
            ctrl: [0; MAX_CONTROL],
            ctrl_len: 0,
        }
    }

    /// The payload of the last complete control frame.
    pub fn control_payload(&self) -> &[u8] {
        &self.ctrl[..usize::from(self.ctrl_len)]
    }

    /// True when between frames and not failed.
    pub fn is_idle(&self) -> bool {
        self.state == State::Header && self.hdr_got == 0
    }

    fn fail(&mut self, e: WsError) -> WsError {
        self.state = State::Failed(e);
        e
    }

    /// Checks the first two header bytes as soon as they are there.
    fn check_start(&mut self) -> Result<(), WsError> {
        let (b0, b1) = (self.hdr[0], self.hdr[1]);
        let opcode = b0 & 0x0f;
        if b0 & 0x70 != 0 {
            return Err(self.fail(WsError::Reserved));
        }
        if b1 & 0x80 == 0 {
            return Err(self.fail(WsError::Unmasked));
        }
        match opcode {
            OP_BINARY => {}
            OP_TEXT => return Err(self.fail(WsError::Text)),
            OP_CONTINUATION => return Err(self.fail(WsError::Fragmented)),
            OP_CLOSE | OP_PING | OP_PONG => {
                if b1 & 0x7f > MAX_CONTROL as u8 {
                    return Err(self.fail(WsError::ControlTooLong));
                }
            }
            o => return Err(self.fail(WsError::Opcode(o))),
        }
        // RFC 6455 §5.4: a control frame is never fragmented; a data frame here neither.
        if b0 & 0x80 == 0 {
            return Err(self.fail(WsError::Fragmented));
        }
        if b1 & 0x7f == 127 {
            // A 64-bit length: never within a u16 limit.
            return Err(self.fail(WsError::TooLarge {
                len: 1 << 16,
                max: usize::from(self.max_len),
            }));
        }
        Ok(())
    }

    /// The next event in `chunk[*pos..]`, unmasking data in place; advances `*pos` past the
    /// bytes consumed. `Ok(None)` when the chunk is exhausted. After an error every later call
    /// returns the same error.
    pub fn next(&mut self, chunk: &mut [u8], pos: &mut usize) -> Result<Option<Event>, WsError> {
        loop {
            if let State::Failed(e) = self.state {
                return Err(e);
            }
            let rest_len = chunk.len().saturating_sub(*pos);
            if rest_len == 0 {
                return Ok(None);
            }
            match self.state {
                State::Failed(e) => return Err(e),
                State::Header => {
                    let got = usize::from(self.hdr_got);
                    let need = if got < 2 { 2 } else { header_len(self.hdr[1]) };
                    let take = (need - got).min(rest_len);
                    self.hdr[got..got + take].copy_from_slice(&chunk[*pos..*pos + take]);
                    *pos += take;
                    self.hdr_got += take as u8;
                    let got = usize::from(self.hdr_got);
                    if got == 2 {
                        self.check_start()?;
                    }
                    if got < 2 || got < header_len(self.hdr[1]) {
                        continue;
                    }
                    if let Some(ev) = self.begin_payload()? {
                        return Ok(Some(ev));
                    }
                }
                State::Payload {
                    opcode,
                    frame_len,
                    done,
                } => {
                    let remaining = usize::from(frame_len - done);
                    let take = remaining.min(rest_len);
                    let start = *pos;
                    let bytes = &mut chunk[start..start + take];
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b ^= self.mask[(usize::from(done) + i) % 4];
                    }
                    *pos += take;
                    let new_done = done + take as u16;
                    let last = new_done == frame_len;
                    self.state = if last {
                        State::Header
                    } else {
                        State::Payload {
                            opcode,
                            frame_len,
                            done: new_done,
                        }
                    };
                    if opcode == OP_BINARY {
                        return Ok(Some(Event::Data(Piece {
                            range: start..start + take,
                            frame_len,
                            first: done == 0,
                            last,
                        })));
                    }
                    let at = usize::from(done);
                    self.ctrl[at..at + take].copy_from_slice(bytes);
                    self.ctrl_len = new_done as u8;
                    if last {
                        return Ok(Some(control_event(opcode)));
                    }
                }
            }
        }
    }

    /// A whole header is in `hdr`: set up the payload. Returns an event for an empty control
    /// frame (it has no payload bytes to wait for).
    fn begin_payload(&mut self) -> Result<Option<Event>, WsError> {
        let b0 = self.hdr[0];
        let b1 = self.hdr[1];
        let opcode = b0 & 0x0f;
        let (len, at) = match b1 & 0x7f {
            126 => (u16::from_be_bytes([self.hdr[2], self.hdr[3]]), 4),
            n => (u16::from(n), 2),
        };
        self.mask.copy_from_slice(&self.hdr[at..at + 4]);
        self.hdr_got = 0;
        if opcode == OP_BINARY && len > self.max_len {
            return Err(self.fail(WsError::TooLarge {
                len: u64::from(len),
                max: usize::from(self.max_len),
            }));
        }
        self.ctrl_len = 0;
        if len == 0 {
            self.state = State::Header;
            // An empty binary frame carries nothing to relay.
            return Ok((opcode != OP_BINARY).then(|| control_event(opcode)));
        }
        self.state = State::Payload {
            opcode,
            frame_len: len,
            done: 0,
        };
        Ok(None)
    }
}

fn control_event(opcode: u8) -> Event {
    match opcode {
        OP_PING => Event::Ping,
        OP_PONG => Event::Pong,
        _ => Event::Close,
    }
}

/// The header of a server frame (unmasked, FIN set) of `len` payload bytes: 2 bytes up to 125,
/// 4 up to 65535. Returns the header bytes and how many of them are used.
pub fn server_header(opcode: u8, len: usize) -> Result<([u8; 4], u8), framing::FrameError> {
    let b0 = 0x80 | (opcode & 0x0f);
    match u16::try_from(len) {
        Ok(l) if l <= 125 => Ok(([b0, l as u8, 0, 0], 2)),
        Ok(l) => {
            let [hi, lo] = l.to_be_bytes();
            Ok(([b0, 126, hi, lo], 4))
        }
        Err(_) => Err(framing::FrameError::TooLarge {
            len,
            max: usize::from(u16::MAX),
        }),
    }
}

/// A masked client frame (FIN set) carrying `payload` (for clients and tests; allocates).
pub fn client_frame(opcode: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    v.push(0x80 | (opcode & 0x0f));
    match payload.len() {
        n if n <= 125 => v.push(0x80 | n as u8),
        n if n <= 0xffff => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// One server frame at the start of `buf` (for clients and tests): (opcode, payload range,
/// bytes consumed), or None when incomplete. Server frames are unmasked (RFC 6455 §5.1); a
/// masked or fragmented one, or one with a 64-bit length, is an error.
pub fn parse_server_frame(buf: &[u8]) -> Result<Option<(u8, Range<usize>, usize)>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    if b0 & 0x80 == 0 {
        return Err(WsError::Fragmented);
    }
    if b1 & 0x80 != 0 {
        return Err(WsError::Unmasked);
    }
    let (len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(l) => (usize::from(u16::from_be_bytes([l[0], l[1]])), 4),
            None => return Ok(None),
        },
        127 => {
            return Err(WsError::TooLarge {
                len: 1 << 16,
                max: 0xffff,
            });
        }
        n => (usize::from(n), 2),
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some((b0 & 0x0f, at..at + len, at + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &[u8] = b"GET /media HTTP/1.1\r\nHost: 192.0.2.1:7401\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://192.0.2.1\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc6455_sample_handshake() {
        // RFC 6455 §1.3: key "dGhlIHNhbXBsZSBub25jZQ==" gives
        // "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
        let u = parse_upgrade(SAMPLE).unwrap().unwrap();
        assert_eq!(u.len, SAMPLE.len());
        assert_eq!(&u.accept, b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut out = [0u8; 200];
        let n = write_response(&u.accept, &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"[..]
        );
        assert_eq!(write_response(&u.accept, &mut out[..100]), None);
        // Incomplete: read on.
        assert_eq!(parse_upgrade(&SAMPLE[..40]), Ok(None));
    }

    #[test]
    fn handshake_refusals() {
        let swap = |from: &str, to: &str| {
            let s = String::from_utf8(SAMPLE.to_vec())
                .unwrap()
                .replace(from, to);
            parse_upgrade(s.as_bytes())
        };
        assert_eq!(
            swap("GET", "POST"),
            Err(HandshakeError::NotGet("POST".into()))
        );
        assert_eq!(swap("HTTP/1.1", "HTTP/1.0"), Err(HandshakeError::Version));
        assert_eq!(
            swap("Upgrade: websocket", "Upgrade: h2c"),
            Err(HandshakeError::Header("Upgrade"))
        );
        assert_eq!(
            swap("keep-alive, Upgrade", "keep-alive"),
            Err(HandshakeError::Header("Connection"))
        );
        assert_eq!(
            swap("Version: 13", "Version: 8"),
            Err(HandshakeError::Header("Sec-WebSocket-Version"))
        );
        assert_eq!(
            swap("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            Err(HandshakeError::BadKey)
        );
        assert!(matches!(
            parse_upgrade(b"\x00\x14\x00\x01garbage\r\n\r\n"),
            Err(HandshakeError::Malformed(_))
        ));
        // No end of headers within the limit.
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HANDSHAKE + 10, b'a');
        assert_eq!(parse_upgrade(&long), Err(HandshakeError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_upgrade(&many),
            Err(HandshakeError::Malformed(_))
        ));
    }

    /// Feeds `stream` to a deframer in chunks of `cut` bytes; collects frames and control events.
    fn run(max: u16, stream: &[u8], cut: usize) -> Result<Vec<(u8, Vec<u8>)>, WsError> {
        let mut d = Deframer::new(max);
        let mut out = Vec::new();
        let mut cur = Vec::new();
        for chunk in stream.chunks(cut.max(1)) {
            let mut chunk = chunk.to_vec();
            let mut pos = 0;
            while let Some(ev) = d.next(&mut chunk, &mut pos)? {
                match ev {
                    Event::Data(p) => {
                        if p.first {
                            cur.clear();
                        }
                        cur.extend_from_slice(&chunk[p.range.clone()]);
                        assert_eq!(p.last, cur.len() == usize::from(p.frame_len));
                        if p.last {
                            out.push((OP_BINARY, std::mem::take(&mut cur)));
                        }
                    }
                    Event::Ping => out.push((OP_PING, d.control_payload().to_vec())),
                    Event::Pong => out.push((OP_PONG, d.control_payload().to_vec())),
                    Event::Close => out.push((OP_CLOSE, d.control_payload().to_vec())),
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_and_refusals() {
        let m = [1, 2, 3, 4];
        let mut s = client_frame(OP_BINARY, m, b"hello");
        s.extend(client_frame(OP_PING, m, b"p"));
        s.extend(client_frame(OP_BINARY, m, &[]));
        s.extend(client_frame(OP_BINARY, m, &[7u8; 300]));
        s.extend(client_frame(OP_CLOSE, m, &[3, 232]));
        let want = vec![
            (OP_BINARY, b"hello".to_vec()),
            (OP_PING, b"p".to_vec()),
            (OP_BINARY, vec![7u8; 300]),
            (OP_CLOSE, vec![3, 232]),
        ];
        for cut in [1, 2, 3, 7, 1000] {
            assert_eq!(run(1500, &s, cut).unwrap(), want, "cut {cut}");
        }
        let bad = |bytes: Vec<u8>| run(1500, &bytes, 1000).unwrap_err();
        assert_eq!(bad(client_frame(OP_TEXT, m, b"x")), WsError::Text);
        let mut frag = client_frame(OP_BINARY, m, b"x");
        frag[0] &= 0x7f;
        assert_eq!(bad(frag), WsError::Fragmented);
        assert_eq!(
            bad(client_frame(OP_CONTINUATION, m, b"x")),
            WsError::Fragmented
        );
        let mut unmasked = client_frame(OP_BINARY, m, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(bad(unmasked), WsError::Unmasked);
        let mut rsv = client_frame(OP_BINARY, m, b"x");
        rsv[0] |= 0x40;
        assert_eq!(bad(rsv), WsError::Reserved);
        assert_eq!(bad(client_frame(0x3, m, b"x")), WsError::Opcode(3));
        assert_eq!(
            bad(client_frame(OP_BINARY, m, &[0; 1501])),
            WsError::TooLarge {
                len: 1501,
                max: 1500
            }
        );
        assert!(matches!(
            bad(client_frame(OP_BINARY, m, &vec![0; 70000])),
            WsError::TooLarge { .. }
        ));
        assert_eq!(
            bad(client_frame(OP_PING, m, &[0; 126])),
            WsError::ControlTooLong
        );
        // An error is final.
        let mut d = Deframer::new(10);
        let mut t = client_frame(OP_TEXT, m, b"x");
        let mut pos = 0;
        assert!(d.next(&mut t, &mut pos).is_err());
        let mut ok = client_frame(OP_BINARY, m, b"x");
        pos = 0;
        assert_eq!(d.next(&mut ok, &mut pos), Err(WsError::Text));
    }

    #[test]
    fn server_headers() {
        assert_eq!(server_header(OP_BINARY, 5).unwrap(), ([0x82, 5, 0, 0], 2));
        assert_eq!(
            server_header(OP_BINARY, 125).unwrap(),
            ([0x82, 125, 0, 0], 2)
        );
        assert_eq!(
            server_header(OP_BINARY, 300).unwrap(),
            ([0x82, 126, 1, 44], 4)
        );
        assert_eq!(server_header(OP_PONG, 0).unwrap(), ([0x8a, 0, 0, 0], 2));
        assert!(server_header(OP_BINARY, 70000).is_err());
        let mut f = server_header(OP_BINARY, 300).unwrap().0.to_vec();
        f.extend_from_slice(&[9; 300]);
        assert_eq!(parse_server_frame(&f), Ok(Some((OP_BINARY, 4..304, 304))));
        assert_eq!(parse_server_frame(&f[..100]), Ok(None));
    }

    proptest! {
        /// Any bytes: no panic, bounded answer; a complete handshake never claims more bytes
        /// than it was given.
        #[test]
        fn handshake_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            if let Ok(Some(u)) = parse_upgrade(&bytes) {
                prop_assert!(u.len <= bytes.len().min(MAX_HANDSHAKE));
            }
        }

        /// A valid handshake with arbitrary extra headers and key parses wherever it is cut,
        /// and the accept value is the RFC's function of the key.
        #[test]
        fn handshake_roundtrip(key in proptest::array::uniform16(any::<u8>()),
                               extra in proptest::collection::vec("[a-z]{1,10}: [ -~]{0,20}", 0..10),
                               cut in 0usize..400) {
            let k = B64.encode(key);
            let mut req = format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {k}\r\n");
            for e in &extra { req.push_str(e); req.push_str("\r\n"); }
            req.push_str("\r\n");
            let b = req.as_bytes();
            let u = parse_upgrade(b).unwrap().unwrap();
            prop_assert_eq!(u.len, b.len());
            prop_assert_eq!(u.accept, accept_for(k.as_bytes()));
            if cut < b.len() {
                prop_assert_eq!(parse_upgrade(&b[..cut]), Ok(None));
            }
        }

        /// Arbitrary bytes in arbitrary chunks: no panic, every data piece lies in its chunk,
        /// no frame over the limit is ever reported.
        #[test]
        fn deframer_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                                 cut in 1usize..300, max in 1u16..2000) {
            let mut d = Deframer::new(max);
            for chunk in bytes.chunks(cut) {
                let mut chunk = chunk.to_vec();
                let mut pos = 0;
                loop {
                    match d.next(&mut chunk, &mut pos) {
                        Ok(Some(Event::Data(p))) => {
                            prop_assert!(p.range.end <= chunk.len());
                            prop_assert!(p.frame_len <= max);
                        }
                        Ok(Some(_)) => prop_assert!(d.control_payload().len() <= MAX_CONTROL),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }

        /// Masked binary frames of any size within the limit and any mask come back unmasked,
        /// whole, in order, however the stream is cut.
        #[test]
        fn deframer_roundtrip(frames in proptest::collection::vec(
                                  (proptest::collection::vec(any::<u8>(), 1..400), any::<[u8; 4]>()), 1..6),
                              cut in 1usize..500) {
            let mut s = Vec::new();
            for (p, m) in &frames { s.extend(client_frame(OP_BINARY, *m, p)); }
            let got = run(400, &s, cut).unwrap();
            let want: Vec<_> = frames.iter().map(|(p, _)| (OP_BINARY, p.clone())).collect();
            prop_assert_eq!(got, want);
        }
    }
}
