//! A minimal TURN client (RFC 8656) for driving coturn with the same load as voxgate: per
//! stream, Allocate with long-term credentials (the first request is answered 401 with REALM
//! and NONCE; the key is [`stun::long_term_key`]), CreatePermission and ChannelBind for the
//! peer (one of the load generator's plain UDP sockets), then ChannelData: a 4-byte header
//! (channel number, length) + the packet, one relay hop per packet as through voxgate.
//!
//! The message building and parsing is sans-IO (tested against hand-written bytes); the
//! blocking set-up over a UDP socket or a TCP connection is [`setup_allocation`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::wire::stun::{self, Class, Message, Writer, attr};

/// RFC 8656 §12: channel numbers 0x4000 through 0x4FFF.
pub const FIRST_CHANNEL: u16 = 0x4000;
/// REQUESTED-TRANSPORT value for UDP (the IANA protocol number).
pub const TRANSPORT_UDP: u8 = 17;

/// Long-term credentials once the server has told its realm and nonce.
#[derive(Clone, Debug)]
pub struct Auth {
    pub username: String,
    pub realm: String,
    pub nonce: Vec<u8>,
    pub key: [u8; 16],
}

impl Auth {
    pub fn new(username: &str, password: &str, realm: &str, nonce: &[u8]) -> Auth {
        Auth {
            username: username.into(),
            realm: realm.into(),
            nonce: nonce.to_vec(),
            key: stun::long_term_key(username, realm, password),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TurnError {
    #[error("STUN encoding: {0}")]
    Encode(stun::StunError),
    #[error("malformed answer: {0}")]
    Malformed(stun::StunError),
    #[error("the answer belongs to another transaction")]
    WrongTransaction,
    #[error("error response {code}: {reason}")]
    Refused { code: u16, reason: String },
    #[error("no answer in time")]
    Timeout,
    #[error("{0}")]
    Io(String),
    #[error("the answer lacks {0}")]
    Missing(&'static str),
}

impl From<std::io::Error> for TurnError {
    fn from(e: std::io::Error) -> Self {
        TurnError::Io(e.to_string())
    }
}

/// What a response says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Success; for Allocate, the relayed address.
    Success { relayed: Option<SocketAddr> },
    /// 401 (or 438 stale nonce): retry with these.
    Challenge { realm: String, nonce: Vec<u8> },
}

fn finish_auth(w: &mut Writer<'_>, auth: Option<&Auth>) -> Result<(), stun::StunError> {
    if let Some(a) = auth {
        w.attr(attr::USERNAME, a.username.as_bytes())?;
        w.attr(attr::REALM, a.realm.as_bytes())?;
        w.attr(attr::NONCE, &a.nonce)?;
        w.message_integrity(&a.key)?;
    }
    Ok(())
}

/// Allocate request for a UDP relay; without `auth` it draws the 401 challenge.
pub fn allocate(buf: &mut [u8], txid: &[u8; 12], auth: Option<&Auth>) -> Result<usize, TurnError> {
    let mut w =
        Writer::new(buf, Class::Request, stun::ALLOCATE, txid).map_err(TurnError::Encode)?;
    w.attr(attr::REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0])
        .map_err(TurnError::Encode)?;
    finish_auth(&mut w, auth).map_err(TurnError::Encode)?;
    Ok(w.finish())
}

pub fn create_permission(
    buf: &mut [u8],
    txid: &[u8; 12],
    peer: SocketAddr,
    auth: &Auth,
) -> Result<usize, TurnError> {
    let mut w = Writer::new(buf, Class::Request, stun::CREATE_PERMISSION, txid)
        .map_err(TurnError::Encode)?;
    w.xor_address(attr::XOR_PEER_ADDRESS, peer)
        .map_err(TurnError::Encode)?;
    finish_auth(&mut w, Some(auth)).map_err(TurnError::Encode)?;
    Ok(w.finish())
}

pub fn channel_bind(
    buf: &mut [u8],
    txid: &[u8; 12],
    channel: u16,
    peer: SocketAddr,
    auth: &Auth,
) -> Result<usize, TurnError> {
    let mut w =
        Writer::new(buf, Class::Request, stun::CHANNEL_BIND, txid).map_err(TurnError::Encode)?;
    let [c0, c1] = channel.to_be_bytes();
    w.attr(attr::CHANNEL_NUMBER, &[c0, c1, 0, 0])
        .map_err(TurnError::Encode)?;
    w.xor_address(attr::XOR_PEER_ADDRESS, peer)
        .map_err(TurnError::Encode)?;
    finish_auth(&mut w, Some(auth)).map_err(TurnError::Encode)?;
    Ok(w.finish())
}

/// Reads the answer to the request `txid` (checking MESSAGE-INTEGRITY when `auth` is given
/// and the answer carries it).
pub fn parse_answer(b: &[u8], txid: &[u8; 12], auth: Option<&Auth>) -> Result<Answer, TurnError> {
    let m = Message::parse(b).map_err(TurnError::Malformed)?;
    if m.transaction_id() != txid {
        return Err(TurnError::WrongTransaction);
    }
    match m.class() {
        Class::Success => {
            if let Some(a) = auth
                && m.attr(attr::MESSAGE_INTEGRITY).is_some()
            {
                m.check_integrity(&a.key).map_err(TurnError::Malformed)?;
            }
            let relayed = m
                .xor_address(attr::XOR_RELAYED_ADDRESS)
                .map_err(TurnError::Malformed)?;
            Ok(Answer::Success { relayed })
        }
        Class::Error => {
            let (code, reason) = m.error_code().ok_or(TurnError::Missing("ERROR-CODE"))?;
            if code == 401 || code == 438 {
                let nonce = m.attr(attr::NONCE).ok_or(TurnError::Missing("NONCE"))?;
                let realm = match m.attr(attr::REALM) {
                    Some(r) => String::from_utf8_lossy(r).into_owned(),
                    None => auth.map(|a| a.realm.clone()).unwrap_or_default(),
                };
                return Ok(Answer::Challenge {
                    realm,
                    nonce: nonce.to_vec(),
                });
            }
            Err(TurnError::Refused {
                code,
                reason: String::from_utf8_lossy(reason).into_owned(),
            })
        }
        _ => Err(TurnError::Missing("a response class")),
    }
}

/// The ChannelData header (RFC 8656 §12.4): channel number, then the length of the data
/// (without padding). Over TCP the message is padded to a multiple of 4 bytes.
pub fn channel_data_header(channel: u16, len: u16) -> [u8; 4] {
    let [c0, c1] = channel.to_be_bytes();
    let [l0, l1] = len.to_be_bytes();
    [c0, c1, l0, l1]
}

/// Padding after a ChannelData message of `len` data bytes on a stream transport.
pub fn tcp_padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Where a TURN client talks to the server.
pub enum Control {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Control {
    fn exchange(
        &mut self,
        req: &[u8],
        txid: &[u8; 12],
        deadline: Instant,
    ) -> Result<Vec<u8>, TurnError> {
        match self {
            Control::Udp(s) => {
                let mut buf = [0u8; 1500];
                let mut next_send = Instant::now();
                loop {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(TurnError::Timeout);
                    }
                    if now >= next_send {
                        s.send(req)?;
                        next_send = now + Duration::from_millis(200);
                    }
                    s.set_read_timeout(Some(
                        (next_send.min(deadline) - now).max(Duration::from_millis(1)),
                    ))?;
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            let b = &buf[..n];
                            if Message::parse(b).is_ok_and(|m| m.transaction_id() == txid) {
                                return Ok(b.to_vec());
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Control::Tcp(s) => {
                s.write_all(req)?;
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ))?;
                let mut head = [0u8; stun::HEADER_LEN];
                s.read_exact(&mut head)?;
                let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
                let mut msg = head.to_vec();
                msg.resize(stun::HEADER_LEN + len, 0);
                s.read_exact(&mut msg[stun::HEADER_LEN..])?;
                Ok(msg)
            }
        }
    }
}

/// One allocation, set up and bound to `peer` on `channel`.
#[derive(Debug)]
pub struct Allocation {
    pub relayed: SocketAddr,
    pub channel: u16,
}

/// Allocate (with the 401 round), CreatePermission and ChannelBind for `peer`, blocking,
/// within `timeout`.
pub fn setup_allocation(
    ctl: &mut Control,
    username: &str,
    password: &str,
    peer: SocketAddr,
    channel: u16,
    timeout: Duration,
) -> Result<Allocation, TurnError> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    let mut auth: Option<Auth> = None;
    let mut relayed = None;
    for _ in 0..3 {
        let txid: [u8; 12] = rand::random();
        let n = allocate(&mut buf, &txid, auth.as_ref())?;
        let ans = ctl.exchange(&buf[..n], &txid, deadline)?;
        match parse_answer(&ans, &txid, auth.as_ref())? {
            Answer::Success { relayed: r } => {
                relayed = Some(r.ok_or(TurnError::Missing("XOR-RELAYED-ADDRESS"))?);
                break;
            }
            Answer::Challenge { realm, nonce } => {
                auth = Some(Auth::new(username, password, &realm, &nonce));
            }
        }
    }
    let relayed = relayed.ok_or(TurnError::Refused {
        code: 401,
        reason: "still unauthorized after the challenge".into(),
    })?;
    let auth = auth.ok_or(TurnError::Missing("a challenge"))?;
    let txid: [u8; 12] = rand::random();
    let n = create_permission(&mut buf, &txid, peer, &auth)?;
    let ans = ctl.exchange(&buf[..n], &txid, deadline)?;
    if !matches!(
        parse_answer(&ans, &txid, Some(&auth))?,
        Answer::Success { .. }
    ) {
        return Err(TurnError::Missing("a CreatePermission success"));
    }
    let txid: [u8; 12] = rand::random();
    let n = channel_bind(&mut buf, &txid, channel, peer, &auth)?;
    let ans = ctl.exchange(&buf[..n], &txid, deadline)?;
    if !matches!(
        parse_answer(&ans, &txid, Some(&auth))?,
        Answer::Success { .. }
    ) {
        return Err(TurnError::Missing("a ChannelBind success"));
    }
    Ok(Allocation { relayed, channel })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn unauthenticated_allocate_reference_bytes() {
        let mut b = [0u8; 64];
        let n = allocate(&mut b, &TXID, None).unwrap();
        assert_eq!(
            &b[..n],
            &[
                0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                12, 0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0
            ]
        );
    }

    #[test]
    fn authenticated_requests_carry_credentials_and_verify() {
        let auth = Auth::new("bench", "bench", "voxgate.test", b"abcd");
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut b = [0u8; 256];
        let n = channel_bind(&mut b, &TXID, 0x4001, peer, &auth).unwrap();
        let m = Message::parse(&b[..n]).unwrap();
        assert_eq!(m.method(), stun::CHANNEL_BIND);
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.attr(attr::CHANNEL_NUMBER), Some(&[0x40, 0x01, 0, 0][..]));
        assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS).unwrap(), Some(peer));
        assert_eq!(m.attr(attr::USERNAME), Some(&b"bench"[..]));
        assert_eq!(m.attr(attr::REALM), Some(&b"voxgate.test"[..]));
        assert_eq!(m.attr(attr::NONCE), Some(&b"abcd"[..]));
        m.check_integrity(&auth.key).unwrap();
        assert!(m.check_integrity(&[0u8; 16]).is_err());

        let n = create_permission(&mut b, &TXID, peer, &auth).unwrap();
        let m = Message::parse(&b[..n]).unwrap();
        assert_eq!(m.method(), stun::CREATE_PERMISSION);
        m.check_integrity(&auth.key).unwrap();
    }

    #[test]
    fn long_term_key_is_md5_of_user_realm_password() {
        // MD5("bench:voxgate.test:bench"), computed independently.
        let a = Auth::new("bench", "bench", "voxgate.test", b"n");
        let hex: String = a.key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.len(), 32);
        assert_eq!(a.key, stun::long_term_key("bench", "voxgate.test", "bench"));
    }

    #[test]
    fn answers_parse() {
        // 401 with REALM and NONCE, written by hand.
        let mut b = vec![
            0x01, 0x13, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        b.extend_from_slice(&[0x00, 0x09, 0x00, 0x10, 0, 0, 4, 1]);
        b.extend_from_slice(b"Unauthorized");
        b.extend_from_slice(&[0x00, 0x15, 0x00, 0x04]);
        b.extend_from_slice(b"nnnn");
        b.extend_from_slice(&[0x00, 0x14, 0x00, 0x03]);
        b.extend_from_slice(b"r.t\0");
        let len = (b.len() - 20) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            parse_answer(&b, &TXID, None).unwrap(),
            Answer::Challenge {
                realm: "r.t".into(),
                nonce: b"nnnn".to_vec()
            }
        );
        assert_eq!(
            parse_answer(&b, &[0; 12], None),
            Err(TurnError::WrongTransaction)
        );
        // 403 is a refusal.
        b[26] = 4;
        b[27] = 3;
        assert!(matches!(
            parse_answer(&b, &TXID, None),
            Err(TurnError::Refused { code: 403, .. })
        ));

        // Allocate success with XOR-RELAYED-ADDRESS and MESSAGE-INTEGRITY.
        let auth = Auth::new("u", "p", "r", b"n");
        let relay: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let mut out = [0u8; 128];
        let mut w = Writer::new(&mut out, Class::Success, stun::ALLOCATE, &TXID).unwrap();
        w.xor_address(attr::XOR_RELAYED_ADDRESS, relay).unwrap();
        w.message_integrity(&auth.key).unwrap();
        let n = w.finish();
        assert_eq!(
            parse_answer(&out[..n], &TXID, Some(&auth)).unwrap(),
            Answer::Success {
                relayed: Some(relay)
            }
        );
        let wrong = Auth::new("u", "other", "r", b"n");
        assert!(parse_answer(&out[..n], &TXID, Some(&wrong)).is_err());
    }

    #[test]
    fn channel_data_framing() {
        assert_eq!(channel_data_header(0x4000, 172), [0x40, 0x00, 0x00, 0xAC]);
        assert_eq!(tcp_padding(172), 0);
        assert_eq!(tcp_padding(173), 3);
        assert_eq!(tcp_padding(175), 1);
    }
}
