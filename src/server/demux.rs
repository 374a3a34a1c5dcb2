//! What a connection on the shared port (`[single_port]`) is, from its first bytes, and which
//! leg a media connection binds (from its first RFC 4571 frame). Pure functions over bytes
//! peeked from the socket: nothing here reads, writes or allocates per byte.
//!
//! The rules (docs/PROTOCOL.md, "One port for everything"):
//!
//! | first bytes | kind |
//! | --- | --- |
//! | `16 03 xx` (a TLS handshake record) | [`Kind::Tls`]; after the handshake its ALPN says control or media |
//! | `LL LL 00 01` …: a 2-byte length (at least 20), then a STUN message type (first byte 0..=3) | [`Kind::Media`] (RFC 4571 framing, the leg's Binding request first) |
//! | `LL LL 7b` (`{`): a 2-byte length, then a JSON object | [`Kind::Control`] |
//! | `GET ` | [`Kind::Http`] (a WebSocket media leg, `GET /media/<leg>`: [`ws_request_leg`]) |
//!
//! Anything else is [`Kind::Unknown`], and the connection is closed. Three bytes decide every
//! kind but HTTP, which needs four; [`classify`] says `None` while fewer have arrived.

use crate::wire::stun;

/// The ALPN protocol name of a TLS control connection (a client that offers no ALPN is a
/// control connection too: TLS control clients predate the shared port).
pub const ALPN_CONTROL: &[u8] = b"voxgate-control";
/// The ALPN protocol name of a TLS TCP media connection (RFC 4571 frames inside TLS).
pub const ALPN_MEDIA: &[u8] = b"voxgate-media";

/// Bytes [`classify`] may need.
pub const CLASSIFY_BYTES: usize = 4;

/// What a connection on the shared port carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TLS ClientHello: control or media, by ALPN after the handshake.
    Tls,
    /// Plain TCP media: RFC 4571 frames, the first one the leg's STUN Binding request.
    Media,
    /// The plain control protocol: 2-byte length, JSON.
    Control,
    /// An HTTP request (`GET `): a WebSocket upgrade.
    Http,
    /// None of these: closed.
    Unknown,
}

/// What the first bytes say; `None`: not enough bytes yet to tell (wait for more).
pub fn classify(b: &[u8]) -> Option<Kind> {
    let &first = b.first()?;
    if first == 0x16 {
        // A TLS record: type 22 (handshake), then the legacy version's major byte 3.
        let &major = b.get(1)?;
        return Some(if major == 0x03 {
            Kind::Tls
        } else {
            Kind::Unknown
        });
    }
    if first == b'G' {
        let head = b.get(..4)?;
        return Some(if head == b"GET " {
            Kind::Http
        } else {
            Kind::Unknown
        });
    }
    // Both framings start with a 2-byte length: the third byte tells them apart.
    let &third = b.get(2)?;
    let len = usize::from(u16::from_be_bytes([b[0], b[1]]));
    if len == 0 {
        return Some(Kind::Unknown);
    }
    Some(match third {
        // A STUN message type's first byte is 0..=3 (RFC 7983; Binding is 0x0001); the smallest STUN message is its 20-byte header.
        0x00..=0x03 if len >= 20 => Kind::Media,
        b'{' => Kind::Control,
        _ => Kind::Unknown,
    })
}

/// Bytes the first RFC 4571 frame takes (its 2-byte length included), from its length; `None`
/// until the length has arrived.
pub fn first_frame_len(b: &[u8]) -> Option<usize> {
    let hdr = b.first_chunk::<2>()?;
    Some(2 + usize::from(u16::from_be_bytes(*hdr)))
}

/// Why the first frame names no leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LegError {
    #[error("the first RFC 4571 frame has not fully arrived")]
    Incomplete,
    #[error("the first RFC 4571 frame is not a STUN Binding request")]
    NotBinding,
    #[error("the Binding request has no USERNAME (leg name)")]
    NoUsername,
    #[error("the USERNAME is not a leg name")]
    BadUsername,
}

/// The leg a plain media connection's first frame (a STUN Binding request whose USERNAME is
/// the leg) binds: the shard that holds that leg gets the connection. Nothing is verified
/// here: the shard checks the MESSAGE-INTEGRITY with the leg's key as for any connection.
pub fn first_frame_leg(b: &[u8]) -> Result<&str, LegError> {
    let total = first_frame_len(b).ok_or(LegError::Incomplete)?;
    let frame = b.get(2..total).ok_or(LegError::Incomplete)?;
    let msg = stun::Message::parse(frame).map_err(|_| LegError::NotBinding)?;
    if msg.method() != stun::BINDING || msg.class() != stun::Class::Request {
        return Err(LegError::NotBinding);
    }
    let user = msg.username().ok_or(LegError::NoUsername)?;
    let user = std::str::from_utf8(user).map_err(|_| LegError::BadUsername)?;
    // Leg names are 32 hex digits; anything longer or stranger cannot be one.
    if user.is_empty() || user.len() > 64 || !user.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(LegError::BadUsername);
    }
    Ok(user)
}

/// The ALPN protocol name a browser offers for a `wss://` connection: on the shared port a TLS
/// connection that offers it (and neither voxgate name) is a WebSocket media leg.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The request path prefix of a WebSocket media leg on the shared port: `/media/<leg>`.
pub const WS_MEDIA_PREFIX: &[u8] = b"GET /media/";

/// Why a WebSocket request names no leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsLegError {
    #[error("the request head has not fully arrived")]
    Incomplete,
    #[error("request head longer than {} bytes", crate::wire::ws::MAX_HANDSHAKE)]
    TooLarge,
    #[error("the request line is not GET /media/<leg> HTTP/1.1")]
    NotMediaPath,
}

/// The leg a WebSocket media connection's opening request names in its path
/// (`GET /media/<leg> HTTP/1.1`): the shard that holds that leg gets the connection, request
/// unread (the shard answers the handshake; the first binary frame's keyed Binding
/// authenticates the leg as for any connection). The whole head must have arrived within
/// [`crate::wire::ws::MAX_HANDSHAKE`] bytes, the shard's own limit.
pub fn ws_request_leg(b: &[u8]) -> Result<&str, WsLegError> {
    let max = crate::wire::ws::MAX_HANDSHAKE;
    let window = &b[..b.len().min(max)];
    if !window.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(if b.len() >= max {
            WsLegError::TooLarge
        } else {
            WsLegError::Incomplete
        });
    }
    let line_end = window
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(WsLegError::NotMediaPath)?;
    let leg = window[..line_end]
        .strip_prefix(WS_MEDIA_PREFIX)
        .and_then(|r| r.strip_suffix(b" HTTP/1.1"))
        .ok_or(WsLegError::NotMediaPath)?;
    // Leg names are 32 hex digits; anything longer or stranger cannot be one.
    if leg.is_empty() || leg.len() > 64 || !leg.iter().all(u8::is_ascii_alphanumeric) {
        return Err(WsLegError::NotMediaPath);
    }
    std::str::from_utf8(leg).map_err(|_| WsLegError::NotMediaPath)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn binding(leg: &str) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let n = stun::write_binding_request(&mut buf, leg.as_bytes(), b"key", &[7; 12]).unwrap();
        let mut v = (n as u16).to_be_bytes().to_vec();
        v.extend_from_slice(&buf[..n]);
        v
    }

    #[test]
    fn each_kind_from_its_real_first_bytes() {
        // A TLS 1.3 ClientHello record header.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Kind::Tls));
        // The reference `hello` frame of PROTOCOL.md.
        let hello =
            br#"{"type":"hello","version":1,"user":"alice","nonce":"AQEBAQEBAQEBAQEBAQEBAQEB"}"#;
        let mut ctl = (hello.len() as u16).to_be_bytes().to_vec();
        ctl.extend_from_slice(hello);
        assert_eq!(classify(&ctl), Some(Kind::Control));
        let media = binding("0123456789abcdef0123456789abcdef");
        assert_eq!(classify(&media), Some(Kind::Media));
        assert_eq!(classify(b"GET /media HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(
            first_frame_leg(&media),
            Ok("0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn websocket_requests_name_their_leg_in_the_path() {
        let req =
            b"GET /media/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: gw.example:443\r\n\
                    Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(ws_request_leg(req), Ok("0123456789abcdef0123456789abcdef"));
        // Not yet all there: wait (the request line alone is not enough).
        assert_eq!(ws_request_leg(&req[..60]), Err(WsLegError::Incomplete));
        assert_eq!(ws_request_leg(b""), Err(WsLegError::Incomplete));
        for bad in [
            &b"GET /media HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /media/ HTTP/1.1\r\n\r\n",
            b"GET /media/ab/../cd HTTP/1.1\r\n\r\n",
            b"GET /media/abc HTTP/1.0\r\n\r\n",
            b"POST /media/abc HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                ws_request_leg(bad),
                Err(WsLegError::NotMediaPath),
                "{bad:?}"
            );
        }
        let mut long = b"GET /media/ab HTTP/1.1\r\nX: ".to_vec();
        long.resize(crate::wire::ws::MAX_HANDSHAKE + 100, b'a');
        assert_eq!(ws_request_leg(&long), Err(WsLegError::TooLarge));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(ws_request_leg(&long), Err(WsLegError::TooLarge));
    }

    #[test]
    fn waits_for_enough_bytes_and_refuses_the_rest() {
        assert_eq!(classify(&[]), None);
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x00, 0x20]), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GEX "), Some(Kind::Unknown));
        assert_eq!(classify(&[0x16, 0x02, 0, 0]), Some(Kind::Unknown));
        // A zero length, a STUN frame too short for a header, an RTP packet first.
        assert_eq!(classify(&[0, 0, 0]), Some(Kind::Unknown));
        assert_eq!(classify(&[0, 8, 0, 1]), Some(Kind::Unknown));
        assert_eq!(classify(&[0, 172, 0x80]), Some(Kind::Unknown));
        assert_eq!(classify(b"SSH-2.0"), Some(Kind::Unknown));
    }

    #[test]
    fn leg_errors_say_what_is_wrong() {
        let media = binding("abc");
        assert_eq!(
            first_frame_leg(&media[..media.len() - 1]),
            Err(LegError::Incomplete)
        );
        assert_eq!(first_frame_leg(&[0]), Err(LegError::Incomplete));
        let mut not_stun = vec![0, 20];
        not_stun.extend_from_slice(&[0x80; 20]);
        assert_eq!(first_frame_leg(&not_stun), Err(LegError::NotBinding));
        assert_eq!(first_frame_leg(&binding("a b")), Err(LegError::BadUsername));
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_is_stable(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = classify(&b);
            // A decision, once made, does not change as more bytes arrive.
            if let Some(k) = k {
                let mut more = b.clone();
                more.extend_from_slice(&[0xaa; 8]);
                prop_assert_eq!(classify(&more), Some(k));
            } else {
                prop_assert!(b.len() < CLASSIFY_BYTES);
            }
            let _ = first_frame_leg(&b);
        }

        #[test]
        fn any_leg_name_round_trips(leg in "[0-9a-f]{1,32}") {
            let f = binding(&leg);
            prop_assert_eq!(classify(&f), Some(Kind::Media));
            prop_assert_eq!(first_frame_leg(&f), Ok(leg.as_str()));
        }

        #[test]
        fn ws_request_leg_never_panics_and_waits_within_its_bound(
            b in proptest::collection::vec(any::<u8>(), 0..3000)
        ) {
            match ws_request_leg(&b) {
                Ok(leg) => prop_assert!(!leg.is_empty() && leg.len() <= 64),
                Err(WsLegError::Incomplete) => {
                    prop_assert!(b.len() < crate::wire::ws::MAX_HANDSHAKE)
                }
                Err(_) => {}
            }
        }

        #[test]
        fn any_leg_path_round_trips(leg in "[0-9a-f]{1,32}", host in "[a-z.]{1,40}") {
            let req = format!("GET /media/{leg} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            prop_assert_eq!(classify(req.as_bytes()), Some(Kind::Http));
            prop_assert_eq!(ws_request_leg(req.as_bytes()), Ok(leg.as_str()));
        }
    }
}
