//! One port for everything (`[single_port]`, e.g. 443): control (plain and TLS) and TCP media
//! (plain RFC 4571, or RFC 4571 inside TLS) on one TCP listener of the control thread.
//!
//! Each connection is admitted by the control connection limits first (everything below is
//! work those limits bound, and a time limit bounds it too), then told apart by its first bytes
//! ([`super::demux`]). A TLS connection's ClientHello is read (peeked, not consumed) for its
//! ALPN: `voxgate-media` is media, anything else control.
//!
//! - Control, plain or TLS, goes on exactly as on the control listeners.
//! - Media is handed to the shard that holds its leg (the USERNAME of the first frame's STUN
//!   Binding request, peeked) with [`crate::shard::Command::AdoptTcp`], and stops counting as
//!   a control connection: the shard's unbound-connection budgets take over. TLS media first
//!   finishes its handshake here: with `tls_engine = "kernel"` the handshake reads exactly
//!   the handshake's records, then kernel TLS takes the socket ([`super::ktls`]) and the shard
//!   gets the TCP socket itself (zero-copy); with `"userspace"` a relay task here holds the
//!   TLS session and the shard gets one end of a socket pair (one copy per packet each way);
//!   with `"shard"` the same exact handshake, then the shard gets the TCP socket and the
//!   session's record keys ([`crate::shard::Command::AdoptTls`]) and runs the records itself
//!   (the leg is read from copies of the first records, opened here and left unread).
//!
//! - A WebSocket media leg (the browser phone's): plain `GET /media/<leg>` where the port takes
//!   plain media, or a TLS connection offering ALPN `http/1.1` where it takes TLS media
//!   (`wss://`, the same two engines). The leg comes from the request path
//!   ([`demux::ws_request_leg`]), the request stays unread (peeked, or replayed into the socket
//!   pair), and the shard answers the handshake as on its own port.
//!
//! This module must not decide anything about a leg: an unknown leg's connection is closed, and
//! the shard checks the Binding's MESSAGE-INTEGRITY as for any connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::demux::{self, Kind};
use super::{ConnIo, Event, ServeError, Server, canonical};
use crate::config::{Config, SharedMedia, TlsEngine};
use crate::relay_spec::SessionId;
use crate::wire::tls_records;

/// The largest first media frame looked at: a leg's Binding request is about 80 bytes.
const MAX_FIRST_FRAME: usize = 1024;
/// The largest ClientHello looked at (one TLS record).
const MAX_CLIENT_HELLO: usize = 5 + 16_384;
/// How often a connection whose first bytes are still missing is looked at again.
const PEEK_AGAIN: Duration = Duration::from_millis(5);

/// What the shared port accepts.
#[derive(Clone, Copy, Debug)]
pub struct SharedState {
    pub plain_control: bool,
    pub media: SharedMedia,
    pub engine: TlsEngine,
}

/// A media connection ready for its shard.
pub struct MediaConn {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub leg: String,
    /// `tls` / `ktls` / `plain`, for the log.
    pub how: &'static str,
    /// TLS the shard runs (`tls_engine = "shard"`): the keys of the finished handshake.
    pub keys: Option<Box<crate::wire::tls_records::RecordKeys>>,
}

/// Which shard holds each live leg (the shared port's media connections go there).
#[derive(Default)]
pub struct LegShards {
    legs: HashMap<String, usize>,
    sessions: HashMap<SessionId, Vec<String>>,
    /// Sessions being installed, by the install's op: their legs count once it succeeded (a
    /// failed install is never removed by the core, so it must not leave legs behind).
    installing: HashMap<u64, (usize, SessionId, Vec<String>)>,
}

impl LegShards {
    pub fn pending(&mut self, op: u64, shard: usize, session: SessionId, legs: Vec<String>) {
        self.installing.insert(op, (shard, session, legs));
    }
    pub fn installed(&mut self, op: u64, ok: bool) {
        if let Some((shard, session, legs)) = self.installing.remove(&op)
            && ok
        {
            for l in legs {
                self.add(shard, session, &l);
            }
        }
    }
    pub fn add(&mut self, shard: usize, session: SessionId, leg: &str) {
        self.legs.insert(leg.to_owned(), shard);
        self.sessions
            .entry(session)
            .or_default()
            .push(leg.to_owned());
    }
    pub fn remove_leg(&mut self, session: SessionId, leg: &str) {
        self.legs.remove(leg);
        if let Some(v) = self.sessions.get_mut(&session) {
            v.retain(|l| l != leg);
        }
    }
    pub fn remove_session(&mut self, session: SessionId) {
        self.installing.retain(|_, (_, s, _)| *s != session);
        for leg in self.sessions.remove(&session).unwrap_or_default() {
            self.legs.remove(&leg);
        }
    }
    pub fn shard_of(&self, leg: &str) -> Option<usize> {
        self.legs.get(leg).copied()
    }
}

/// Binds the shared port when `[single_port] port` is set. With TLS media on kernel TLS,
/// refuses to start where the kernel has none (never a silent fallback).
pub(super) async fn listen(
    cfg: &Config,
) -> Result<(Option<TcpListener>, Option<SharedState>), ServeError> {
    let Some(port) = cfg.single_port.port else {
        return Ok((None, None));
    };
    let sp = &cfg.single_port;
    if sp.media == SharedMedia::Tls && sp.engine_is_kernel() {
        super::ktls::available().map_err(|e| {
            ServeError::Runtime(std::io::Error::other(format!(
                "single_port.media = \"tls\" with tls_engine = \"kernel\": {e}"
            )))
        })?;
    }
    let listener = super::bind_tcp(std::net::SocketAddr::new(cfg.server.listen, port)).await?;
    let state = SharedState {
        plain_control: cfg.tls.plain_control || cfg.tls.cert.is_none(),
        media: sp.media,
        engine: sp.tls_engine,
    };
    tracing::info!(
        addr = %listener.local_addr().map_err(ServeError::Runtime)?,
        plain_control = state.plain_control,
        tls_control = cfg.tls.cert.is_some(),
        media = ?state.media,
        tls_engine = ?state.engine,
        "shared port: control and TCP media, told apart by their first bytes"
    );
    Ok((Some(listener), Some(state)))
}

impl crate::config::SinglePortSection {
    fn engine_is_kernel(&self) -> bool {
        self.tls_engine == TlsEngine::Kernel
    }
}

pub(super) async fn acceptor(listener: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if events
                    .send(Event::AcceptedShared(stream, peer))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("accept on the shared port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Peeks until `enough` says the bytes suffice (or the buffer is full); the connection's
/// bytes stay unread.
async fn peek_until(
    s: &TcpStream,
    buf: &mut [u8],
    enough: impl Fn(&[u8]) -> bool,
) -> Result<usize, String> {
    loop {
        let n = s.peek(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its first bytes".into());
        }
        if enough(&buf[..n]) || n == buf.len() {
            return Ok(n);
        }
        // The socket stays readable while unread bytes wait: look again a moment later.
        tokio::time::sleep(PEEK_AGAIN).await;
    }
}

/// What a TLS connection on the shared port carries, from its ClientHello's ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hello {
    /// `voxgate-control`, or no ALPN at all.
    Control,
    /// `voxgate-media`: RFC 4571 frames.
    Media,
    /// `http/1.1` (what a browser offers for `wss://`), neither voxgate name: a WebSocket
    /// media leg, `GET /media/<leg>`.
    WebSocket,
}

/// The ALPN protocols a ClientHello offers decide; None: more bytes needed.
fn hello_kind(peeked: &[u8]) -> Result<Option<Hello>, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = peeked;
    while !rd.is_empty() {
        acceptor
            .read_tls(&mut rd)
            .map_err(|e| format!("ClientHello: {e}"))?;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let offers = |name: &[u8]| {
                accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut a| a.any(|p| p == name))
            };
            Ok(Some(if offers(demux::ALPN_MEDIA) {
                Hello::Media
            } else if !offers(demux::ALPN_CONTROL) && offers(demux::ALPN_HTTP1) {
                Hello::WebSocket
            } else {
                Hello::Control
            }))
        }
        Ok(None) => Ok(None),
        Err((e, _)) => Err(format!("ClientHello: {e}")),
    }
}

/// Peeks the first RFC 4571 frame of a media connection (plain, or under kernel TLS): the
/// leg it binds.
async fn peek_leg(s: &TcpStream) -> Result<String, String> {
    let mut buf = [0u8; MAX_FIRST_FRAME];
    let n = peek_until(s, &mut buf, |b| {
        demux::first_frame_len(b).is_some_and(|len| b.len() >= len)
    })
    .await?;
    demux::first_frame_leg(&buf[..n])
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

/// Peeks the opening request of a WebSocket media connection (plain, or under kernel TLS): the
/// leg its path names. The request stays unread: the shard answers it.
async fn peek_ws_leg(s: &TcpStream) -> Result<String, String> {
    let mut buf = [0u8; crate::wire::ws::MAX_HANDSHAKE];
    let n = peek_until(s, &mut buf, |b| {
        demux::ws_request_leg(b) != Err(demux::WsLegError::Incomplete)
    })
    .await?;
    demux::ws_request_leg(&buf[..n])
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

/// The TLS handshake of a media connection, reading exactly the handshake's records: nothing
/// after the client's Finished is consumed (it belongs to kernel TLS, which takes the socket
/// next), and nothing is sent after the server's last handshake record (no session tickets).
async fn handshake_exact(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
) -> Result<rustls::ServerConnection, String> {
    let mut conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
    let mut rec = vec![0u8; 5 + 16_384 + 256];
    let mut out = Vec::new();
    loop {
        while conn.wants_write() {
            out.clear();
            conn.write_tls(&mut out).map_err(|e| e.to_string())?;
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        if !conn.is_handshaking() {
            return Ok(conn);
        }
        stream
            .read_exact(&mut rec[..5])
            .await
            .map_err(|e| e.to_string())?;
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        if len > rec.len() - 5 {
            return Err(format!("a TLS record of {len} bytes"));
        }
        stream
            .read_exact(&mut rec[5..5 + len])
            .await
            .map_err(|e| e.to_string())?;
        let mut rd = &rec[..5 + len];
        while !rd.is_empty() {
            conn.read_tls(&mut rd).map_err(|e| e.to_string())?;
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the client why (the alert), then give up.
            out.clear();
            let _ = conn.write_tls(&mut out);
            let _ = stream.write_all(&out).await;
            return Err(format!("TLS handshake: {e}"));
        }
    }
}

/// A media connection's handshake, then kernel TLS on its socket with the session's secrets.
async fn ktls_handshake(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
    alpn: &[u8],
) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let secrets = handshake_secrets(stream, config, alpn).await?;
    super::ktls::enable(stream.as_raw_fd(), secrets).map_err(|e| e.to_string())
}

/// The most ciphertext looked at for a shard-engine connection's first frame or WebSocket
/// request: two records of the largest size (a phone sends its first frame in one small one).
const MAX_FIRST_RECORDS: usize = 2 * (tls_records::HEADER + tls_records::MAX_CIPHERTEXT);

/// The plaintext of the whole records at the start of `b`, opened with a copy of `rx` (the
/// shard opens them again from the same sequence number: nothing is consumed here).
fn peek_open(b: &[u8], rx: &tls_records::Opener) -> Result<Vec<u8>, String> {
    let mut rx = rx.clone();
    let mut plain = Vec::new();
    let mut at = 0;
    while b.len() - at >= tls_records::HEADER {
        let mut h = [0u8; tls_records::HEADER];
        h.copy_from_slice(&b[at..at + tls_records::HEADER]);
        let total = tls_records::HEADER + tls_records::body_len(&h).map_err(|e| e.to_string())?;
        if b.len() - at < total {
            break;
        }
        let mut rec = b[at..at + total].to_vec();
        let n = rx.open_in_place(&mut rec).map_err(|e| e.to_string())?;
        plain.extend_from_slice(&rec[tls_records::HEADER..tls_records::HEADER + n]);
        at += total;
    }
    Ok(plain)
}

/// A media connection for the shard's TLS engine: the exact handshake (as for kernel TLS),
/// its keys, and the leg its first frame (or WebSocket request, with `ws`) names, read by
/// peeking the first records and opening copies of them.
async fn shard_handshake(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
    ws: bool,
) -> Result<(tls_records::RecordKeys, String), String> {
    let alpn = if ws {
        demux::ALPN_HTTP1
    } else {
        demux::ALPN_MEDIA
    };
    let secrets = handshake_secrets(stream, config, alpn).await?;
    let keys = tls_records::RecordKeys::new(secrets).map_err(|e| e.to_string())?;
    let whole = |p: &[u8]| {
        if ws {
            demux::ws_request_leg(p) != Err(demux::WsLegError::Incomplete)
        } else {
            demux::first_frame_len(p).is_some_and(|len| p.len() >= len)
        }
    };
    let mut buf = vec![0u8; MAX_FIRST_RECORDS];
    let n = peek_until(stream, &mut buf, |b| match peek_open(b, &keys.rx) {
        Ok(p) => whole(&p),
        Err(_) => true,
    })
    .await?;
    let plain = peek_open(&buf[..n], &keys.rx)?;
    let leg = if ws {
        demux::ws_request_leg(&plain)
            .map(str::to_owned)
            .map_err(|e| e.to_string())?
    } else {
        demux::first_frame_leg(&plain)
            .map(str::to_owned)
            .map_err(|e| e.to_string())?
    };
    Ok((keys, leg))
}

/// A userspace TLS media connection: the handshake, the first frame read for its leg, and a
/// relay task between the TLS session and a socket pair whose other end goes to the shard.
async fn userspace_media(
    stream: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<(OwnedFd, String), String> {
    let mut tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    if tls.get_ref().1.alpn_protocol() != Some(demux::ALPN_MEDIA) {
        return Err("the TLS media connection did not settle on ALPN voxgate-media".into());
    }
    let mut first = vec![0u8; 2];
    tls.read_exact(&mut first)
        .await
        .map_err(|e| e.to_string())?;
    let len = usize::from(u16::from_be_bytes([first[0], first[1]]));
    if len + 2 > MAX_FIRST_FRAME {
        return Err(format!(
            "a first frame of {len} bytes is no Binding request"
        ));
    }
    first.resize(2 + len, 0);
    tls.read_exact(&mut first[2..])
        .await
        .map_err(|e| e.to_string())?;
    let leg = demux::first_frame_leg(&first)
        .map_err(|e| e.to_string())?
        .to_owned();
    Ok((relay(tls, &first).await?, leg))
}

/// A socket pair whose other end goes to the shard, and a task relaying between it and the
/// TLS session; `first` (bytes already read from the session) goes to the shard first.
async fn relay(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    first: &[u8],
) -> Result<OwnedFd, String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    ours.write_all(first).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // Ends when either side closes (the shard closing its end included).
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut ours).await;
    });
    Ok(OwnedFd::from(theirs))
}

/// A userspace TLS WebSocket media connection (`wss://`): the handshake, the opening request
/// read (at most the shard's handshake limit) for the leg its path names, then the relay; the
/// request goes to the shard, which answers it.
async fn userspace_ws(
    stream: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<(OwnedFd, String), String> {
    let mut tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    if tls.get_ref().1.alpn_protocol() != Some(demux::ALPN_HTTP1) {
        return Err("the TLS WebSocket connection did not settle on ALPN http/1.1".into());
    }
    let mut head = vec![0u8; crate::wire::ws::MAX_HANDSHAKE];
    let mut n = 0;
    let leg = loop {
        match demux::ws_request_leg(&head[..n]) {
            Ok(leg) => break leg.to_owned(),
            Err(demux::WsLegError::Incomplete) => {}
            Err(e) => return Err(e.to_string()),
        }
        let got = tls.read(&mut head[n..]).await.map_err(|e| e.to_string())?;
        if got == 0 {
            return Err("closed before its request was whole".into());
        }
        n += got;
    };
    Ok((relay(tls, &head[..n]).await?, leg))
}

/// Everything between accept and the hand-over, for one connection.
async fn sort(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: SharedState,
    tls: Option<Arc<ServerConfig>>,
) -> Sorted {
    let mut head = [0u8; demux::CLASSIFY_BYTES];
    let kind = match peek_until(&stream, &mut head, |b| demux::classify(b).is_some()).await {
        Ok(n) => demux::classify(&head[..n]).unwrap_or(Kind::Unknown),
        Err(e) => return Sorted::Refused(e),
    };
    match kind {
        Kind::Control if state.plain_control => Sorted::PlainControl(stream),
        Kind::Media if state.media == SharedMedia::Plain => match peek_leg(&stream).await {
            Ok(leg) => media(stream, peer, leg, "plain"),
            Err(e) => Sorted::Refused(e),
        },
        Kind::Http if state.media == SharedMedia::Plain => match peek_ws_leg(&stream).await {
            Ok(leg) => media(stream, peer, leg, "ws"),
            Err(e) => Sorted::Refused(e),
        },
        Kind::Tls => {
            let Some(config) = tls else {
                return Sorted::Refused("TLS, but no [tls] certificate is configured".into());
            };
            let mut hello = vec![0u8; MAX_CLIENT_HELLO];
            let hello_kind = loop {
                let n =
                    match peek_until(&stream, &mut hello, |b| !matches!(hello_kind(b), Ok(None)))
                        .await
                    {
                        Ok(n) => n,
                        Err(e) => return Sorted::Refused(e),
                    };
                match hello_kind(&hello[..n]) {
                    Ok(Some(m)) => break m,
                    Ok(None) if n < hello.len() => continue,
                    Ok(None) => return Sorted::Refused("ClientHello too large".into()),
                    Err(e) => return Sorted::Refused(e),
                }
            };
            if hello_kind == Hello::Control {
                return Sorted::TlsControl(
                    tokio_rustls::TlsAcceptor::from(config)
                        .accept(stream)
                        .await
                        .map(Box::new)
                        .map_err(|e| e.to_string()),
                );
            }
            if state.media != SharedMedia::Tls {
                return Sorted::Refused("TLS media, but this port takes plain media".into());
            }
            match (state.engine, hello_kind) {
                (TlsEngine::Kernel, Hello::WebSocket) => {
                    if let Err(e) = ktls_handshake(&mut stream, config, demux::ALPN_HTTP1).await {
                        return Sorted::Refused(e);
                    }
                    match peek_ws_leg(&stream).await {
                        Ok(leg) => media(stream, peer, leg, "wss-ktls"),
                        Err(e) => Sorted::Refused(e),
                    }
                }
                (TlsEngine::Kernel, _) => {
                    if let Err(e) = ktls_handshake(&mut stream, config, demux::ALPN_MEDIA).await {
                        return Sorted::Refused(e);
                    }
                    match peek_leg(&stream).await {
                        Ok(leg) => media(stream, peer, leg, "ktls"),
                        Err(e) => Sorted::Refused(e),
                    }
                }
                (TlsEngine::Userspace, Hello::WebSocket) => {
                    match userspace_ws(stream, config).await {
                        Ok((fd, leg)) => Sorted::Media(MediaConn {
                            fd,
                            peer,
                            leg,
                            how: "wss",
                            keys: None,
                        }),
                        Err(e) => Sorted::Refused(e),
                    }
                }
                (TlsEngine::Userspace, _) => match userspace_media(stream, config).await {
                    Ok((fd, leg)) => Sorted::Media(MediaConn {
                        fd,
                        peer,
                        leg,
                        how: "tls",
                        keys: None,
                    }),
                    Err(e) => Sorted::Refused(e),
                },
                (TlsEngine::Shard, hello) => {
                    let ws = hello == Hello::WebSocket;
                    match shard_handshake(&mut stream, config, ws).await {
                        Ok((keys, leg)) => match media(stream, peer, leg, "tls-shard") {
                            Sorted::Media(m) => Sorted::Media(MediaConn {
                                keys: Some(Box::new(keys)),
                                how: if ws { "wss-shard" } else { "tls-shard" },
                                ..m
                            }),
                            other => other,
                        },
                        Err(e) => Sorted::Refused(e),
                    }
                }
            }
        }
        Kind::Control => Sorted::Refused("plain control is off on this port".into()),
        Kind::Media => Sorted::Refused("plain media is off on this port".into()),
        Kind::Http => Sorted::Refused("plain WebSocket media is off on this port".into()),
        Kind::Unknown => Sorted::Refused("unknown first bytes".into()),
    }
}

fn media(stream: TcpStream, peer: SocketAddr, leg: String, how: &'static str) -> Sorted {
    match stream.into_std() {
        Ok(s) => Sorted::Media(MediaConn {
            fd: OwnedFd::from(s),
            peer,
            leg,
            how,
            keys: None,
        }),
        Err(e) => Sorted::Refused(e.to_string()),
    }
}

/// What a connection on the shared port turned out to be.
pub enum Sorted {
    PlainControl(TcpStream),
    TlsControl(Result<Box<super::tls::ServerStream>, String>),
    Media(MediaConn),
    Refused(String),
}

/// Tells the phone its TCP media is TLS when the single port takes TLS media (the address is
/// already the single port's: see `ShardInfo::tcp_port`).
pub(super) fn mark_tls_media(
    shared: Option<SharedState>,
    m: &mut crate::wire::control::MediaInstructions,
) {
    if m.gateway_tcp.is_some() && shared.is_some_and(|s| s.media == SharedMedia::Tls) {
        m.gateway_tcp_tls = true;
    }
}

impl Server {
    /// A connection on the shared port: admitted (or refused) first, then sorted in a task of
    /// its own, under the handshake's time limit.
    pub(super) fn on_shared_accepted(&mut self, now: Instant, stream: TcpStream, peer: SocketAddr) {
        let Some(state) = self.shared else {
            return;
        };
        let source = match self.limits.admit(canonical(peer).ip()) {
            Ok(s) => s,
            Err(why) => {
                drop(stream);
                if let Some((by_source, at_capacity)) = self.limits.note_refusal(now, why) {
                    tracing::warn!(
                        by_source,
                        at_capacity,
                        last_peer = %canonical(peer),
                        "shared-port connections refused at accept (counts since the last such line)"
                    );
                }
                return;
            }
        };
        let conn = self.next_conn;
        self.next_conn = crate::control::records::next_id(conn);
        let _ = stream.set_nodelay(true);
        let tls = self.tls.as_ref().map(|t| t.config.clone());
        let events = self.events.clone();
        let peer = canonical(peer);
        let task = tokio::spawn(async move {
            let sorted = match tokio::time::timeout(
                super::tls::HANDSHAKE_TIMEOUT,
                sort(stream, peer, state, tls),
            )
            .await
            {
                Ok(s) => s,
                Err(_) => Sorted::Refused("its first bytes or handshake timed out".into()),
            };
            let _ = events.send(Event::Sorted { conn, sorted }).await;
        });
        self.io.insert(
            conn,
            ConnIo {
                source,
                reader: task.abort_handle(),
            },
        );
    }

    pub(super) fn on_sorted(&mut self, now: Instant, conn: super::ConnId, sorted: Sorted) {
        match sorted {
            Sorted::PlainControl(stream) => self.on_plain_on_shared(now, conn, stream),
            Sorted::TlsControl(result) => self.on_tls_ready(now, conn, result),
            Sorted::Refused(why) => {
                tracing::debug!(conn, "shared port: closed: {why}");
                self.release(conn);
            }
            Sorted::Media(m) => {
                // No longer a control connection: the shard's budgets hold it from here.
                self.release(conn);
                let shard = self
                    .leg_shards
                    .shard_of(&m.leg)
                    .and_then(|i| self.shard(i).cloned());
                match shard {
                    Some(h) => {
                        tracing::info!(conn, shard = h.index, how = m.how, peer = %m.peer, "shared port: media connection handed to its shard");
                        let handed = match m.keys {
                            Some(keys) => h.adopt_tls(m.fd, m.peer, *keys),
                            None => h.adopt_tcp(m.fd, m.peer),
                        };
                        if let Err(e) = handed {
                            tracing::warn!("shared port: {e}");
                        }
                    }
                    None => tracing::debug!(conn, "shared port: media for no live leg: closed"),
                }
            }
        }
    }
}

/// The TLS handshake of a media connection, read exactly to its end (the first record stays
/// in the socket), checked to have settled on `alpn`; its traffic secrets for whoever runs the
/// record layer next (the kernel or the shard).
async fn handshake_secrets(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
    alpn: &[u8],
) -> Result<rustls::ExtractedSecrets, String> {
    let conn = handshake_exact(stream, config).await?;
    if conn.alpn_protocol() != Some(alpn) {
        return Err(format!(
            "the TLS media connection did not settle on ALPN {}",
            String::from_utf8_lossy(alpn)
        ));
    }
    conn.dangerous_extract_secrets()
        .map_err(|e| format!("TLS secrets: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leg_shards_follow_sessions_and_legs() {
        let mut m = LegShards::default();
        m.add(1, 10, "a");
        m.add(1, 10, "b");
        m.add(0, 11, "c");
        assert_eq!(m.shard_of("a"), Some(1));
        m.remove_leg(10, "a");
        assert_eq!(m.shard_of("a"), None);
        m.remove_session(10);
        assert_eq!(m.shard_of("b"), None);
        assert_eq!(m.shard_of("c"), Some(0));
        m.remove_session(11);
        assert!(m.legs.is_empty() && m.sessions.is_empty());
        // Installs count only once they succeeded; a failed one leaves nothing behind.
        m.pending(1, 0, 20, vec!["x".into()]);
        m.pending(2, 1, 21, vec!["y".into()]);
        assert_eq!(m.shard_of("x"), None);
        m.installed(1, true);
        m.installed(2, false);
        assert_eq!((m.shard_of("x"), m.shard_of("y")), (Some(0), None));
        m.pending(3, 0, 22, vec!["z".into()]);
        m.remove_session(22);
        m.remove_session(20);
        assert!(m.legs.is_empty() && m.sessions.is_empty() && m.installing.is_empty());
    }

    /// What kernel TLS is given, checked without kernel TLS: after the exact handshake the
    /// client's first application record is still unread in the socket, and the receive
    /// secret and sequence number rustls hands over decrypt it, exactly as the kernel would
    /// (TLS 1.3 record protection: nonce = IV xor sequence number, the header as AAD).
    #[tokio::test]
    async fn the_exact_handshake_leaves_the_first_record_to_the_kernel() {
        use rcgen::{CertificateParams, KeyPair};
        use rustls::crypto::cipher::InboundOpaqueMessage;
        use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        let server_cfg = super::super::tls::server_config(&cp, &kp).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client_cfg =
            rustls::ClientConfig::builder_with_provider(super::super::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client_cfg.alpn_protocols = vec![demux::ALPN_MEDIA.to_vec()];
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let first = b"the first RFC 4571 frame".to_vec();
        let sent = first.clone();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            // At once after the handshake, as a phone does.
            s.write_all(&sent).await.unwrap();
            s.flush().await.unwrap();
            // What "the kernel" sends back.
            let mut back = [0u8; 11];
            s.read_exact(&mut back).await.unwrap();
            back
        });
        let (mut stream, _) = l.accept().await.unwrap();
        let conn = handshake_exact(&mut stream, server_cfg).await.unwrap();
        assert_eq!(conn.alpn_protocol(), Some(demux::ALPN_MEDIA));
        let Some(rustls::SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite()
        else {
            panic!("TLS 1.3 only");
        };
        let secrets = conn.dangerous_extract_secrets().unwrap();
        // The client's record waits in the socket, whole.
        let mut rec = vec![0u8; 1024];
        let n = peek_until(&stream, &mut rec, |b| {
            b.len() >= 5 && b.len() >= 5 + usize::from(u16::from_be_bytes([b[3], b[4]]))
        })
        .await
        .unwrap();
        assert_eq!(rec[0], 0x17, "an application data record, not consumed");
        let len = 5 + usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        assert_eq!(n, len, "exactly one record after the handshake");
        let key_iv = |t| match t {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => panic!("a cipher the kernel takes"),
        };
        let (seq, traffic) = secrets.rx;
        let (k, iv) = key_iv(traffic);
        assert_eq!(seq, 0, "the first record after the handshake");
        let mut payload = rec[5..len].to_vec();
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut payload,
        );
        let plain = suite
            .aead_alg
            .decrypter(k, iv)
            .decrypt(msg, seq)
            .expect("the handed-over secret decrypts the kernel's first record");
        // (The decrypter strips TLS 1.3's inner content type into `typ`.)
        assert_eq!(plain.typ, ContentType::ApplicationData);
        assert_eq!(plain.payload, &first[..]);
        // And the other way: a record sealed with the transmit secret at its sequence number
        // (0: the gateway sent nothing after its handshake) is what the phone reads.
        let (seq, traffic) = secrets.tx;
        assert_eq!(
            seq, 0,
            "no session tickets or other records after the handshake"
        );
        let (k, iv) = key_iv(traffic);
        let record = suite
            .aead_alg
            .encrypter(k, iv)
            .encrypt(
                rustls::crypto::cipher::OutboundPlainMessage {
                    typ: ContentType::ApplicationData,
                    version: ProtocolVersion::TLSv1_2,
                    payload: b"from kernel"[..].into(),
                },
                seq,
            )
            .unwrap()
            .encode();
        stream.write_all(&record).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("the phone read the record")
            .unwrap();
        assert_eq!(&back, b"from kernel");
    }

    #[test]
    fn client_hello_alpn_decides() {
        let hello = |alpn: &[&[u8]]| {
            let mut cfg =
                rustls::ClientConfig::builder_with_provider(super::super::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let mut c =
                rustls::ClientConnection::new(Arc::new(cfg), "gw.example".try_into().unwrap())
                    .unwrap();
            let mut out = Vec::new();
            c.write_tls(&mut out).unwrap();
            out
        };
        let media = hello(&[demux::ALPN_MEDIA]);
        assert_eq!(hello_kind(&media), Ok(Some(Hello::Media)));
        assert_eq!(hello_kind(&media[..media.len() / 2]), Ok(None));
        assert_eq!(hello_kind(&hello(&[])), Ok(Some(Hello::Control)));
        assert_eq!(
            hello_kind(&hello(&[demux::ALPN_CONTROL])),
            Ok(Some(Hello::Control))
        );
        // What a browser offers for wss:// (and with h2 beside it).
        assert_eq!(
            hello_kind(&hello(&[demux::ALPN_HTTP1])),
            Ok(Some(Hello::WebSocket))
        );
        assert_eq!(
            hello_kind(&hello(&[b"h2", demux::ALPN_HTTP1])),
            Ok(Some(Hello::WebSocket))
        );
        assert_eq!(
            hello_kind(&hello(&[demux::ALPN_CONTROL, demux::ALPN_HTTP1])),
            Ok(Some(Hello::Control))
        );
        assert!(hello_kind(&[0x16, 3, 1, 0, 4, 9, 9, 9, 9]).is_err());
    }
}
