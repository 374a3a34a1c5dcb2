//! The softphone's control session: one TCP connection to the gateway's control port, speaking
//! [`wire::control`](crate::wire::control).
//!
//! [`Phone::connect`] logs in by SCRAM ([`control::auth`]: `hello` → `challenge` → `proof` →
//! `welcome`), and checks the gateway's signature before anything else: a "gateway" without
//! this user's verifier is refused ([`ClientError::GatewayNotAuthenticated`]), and only then is
//! the [`SessionKey`] (the seed's "additional password", from which the media leg keys are
//! derived) kept. A background task then owns the connection:
//!
//! - sends a `heartbeat` every `heartbeat_ms` (from `welcome`) and answers `poll` with one;
//!   declares the gateway lost when it has said nothing for `misses + 1` intervals;
//! - runs every probe by itself: on `probe_begin` it binds a UDP probe socket, reports its
//!   local address (`probe_local`: the IP of the control connection's local address, the probe
//!   socket's port), sends STUN Binding requests (USERNAME = token, MESSAGE-INTEGRITY keyed by
//!   the token, FINGERPRINT) to the gateway's port A every 100 ms until answered or
//!   `timeout_ms`, records which of the gateway's datagrams arrived (a STUN message from port A
//!   or B whose MESSAGE-INTEGRITY verifies with the token), and on `probe_check` waits up to
//!   `grace_ms` for the missing ones before sending `probe_report`;
//! - turns the gateway's messages into [`Event`]s and matches `calling` to `dial`.
//!
//! The [`Firewall`] of [`PhoneOptions`] applies to the probe socket (see [`Firewall`]).
//! Passwords and keys never reach a log.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::{Firewall, canonical};
use crate::control::auth::{self, AuthError, ClientConfig, ClientFirst, SessionKey};
use crate::wire::control::{
    self as proto, CallId, Capabilities, ClientMsg, ErrorCode, HangupReason, MediaInstructions,
    ServerMsg,
};
use crate::wire::stun;

/// Longest the gateway may take for one step of the log-in, or to answer a `dial`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Dials waiting for their `calling`.
const MAX_PENDING_DIALS: usize = 16;
/// Probes running at once (the gateway normally runs one).
const MAX_PROBES: usize = 4;
/// How long a probe waits for its `probe_check` beyond its own time-out.
const PROBE_LINGER: Duration = Duration::from_secs(30);
/// Shortest heart-beat interval honoured (a gateway asking for less gets this).
const MIN_HEARTBEAT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server address {0:?}: expected HOST[:PORT]")]
    BadServer(String),
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        server: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the gateway at {server}: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("{}", refused_text(*code, message))]
    Refused { code: ErrorCode, message: String },
    #[error(
        "the gateway could not prove that it holds this user's password verifier: it is not the \
         real gateway (or not this user's); log-in aborted"
    )]
    GatewayNotAuthenticated,
    #[error("log-in failed: {0}")]
    Auth(AuthError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the control session has ended")]
    Closed,
    #[error("the gateway answered: {message} ({})", code_name(*code))]
    Gateway { code: ErrorCode, message: String },
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    /// TLS could not be set up, or the gateway's certificate is not trusted.
    #[error("{0}")]
    Tls(String),
}

/// The control connection's halves: plain TCP or TLS.
type ConnReader = Box<dyn AsyncRead + Send + Unpin>;
type ConnWriter = Box<dyn AsyncWrite + Send + Unpin>;

impl ClientError {
    /// Whether the gateway refused the log-in (as opposed to a network problem).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Refused { .. } | ClientError::GatewayNotAuthenticated
        )
    }
}

/// The protocol's name of an error code.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadMessage => "bad_message",
        ErrorCode::Version => "version",
        ErrorCode::AuthFailed => "auth_failed",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::UnknownCall => "unknown_call",
        ErrorCode::Replaced => "replaced",
        ErrorCode::Timeout => "timeout",
        ErrorCode::Internal => "internal",
        ErrorCode::Revoked => "revoked",
    }
}

/// What a `refused` means, in words.
pub fn refused_text(code: ErrorCode, message: &str) -> String {
    match code {
        // A channel-binding failure is not about the password: say what the gateway said.
        ErrorCode::AuthFailed if message.contains("channel binding") => {
            format!("log-in refused (auth_failed): {message}")
        }
        ErrorCode::AuthFailed => "log-in refused: wrong user or password".into(),
        ErrorCode::RateLimited => {
            format!("refused: too many attempts or messages, try again later ({message})")
        }
        ErrorCode::Revoked => format!("session closed: the account changed ({message})"),
        ErrorCode::Version => format!(
            "log-in refused: the gateway does not speak protocol version {} ({message})",
            proto::VERSION
        ),
        ErrorCode::Unavailable => format!("the gateway is unavailable: {message}"),
        ErrorCode::Replaced => format!("session closed: logged in elsewhere ({message})"),
        ErrorCode::Timeout => format!("session closed: missed heart-beats ({message})"),
        other => format!("refused ({}): {message}", code_name(other)),
    }
}

/// How a phone behaves.
#[derive(Clone, Debug)]
pub struct PhoneOptions {
    /// The simulated firewall (probe socket here; the media engine takes its own copy).
    pub firewall: Firewall,
    /// What the phone accepts of a gateway's challenge (iteration bounds).
    pub auth: ClientConfig,
    /// Per step of connecting and logging in.
    pub timeout: Duration,
    /// Events buffered for the application; beyond, events are dropped (and logged).
    pub event_capacity: usize,
    /// Sent in `hello`.
    pub software: Option<String>,
    /// Connect with TLS and bind the log-in to it (also implied by a `tls://` server).
    pub tls: Option<super::tls::TlsOptions>,
    /// Tunnel the control connection through this HTTP proxy (CONNECT).
    pub proxy: Option<super::proxy::ProxyConfig>,
}

impl Default for PhoneOptions {
    fn default() -> Self {
        PhoneOptions {
            firewall: Firewall::OPEN,
            auth: ClientConfig::default(),
            timeout: ANSWER_TIMEOUT,
            event_capacity: 256,
            software: Some(concat!("voxgate-phone/", env!("CARGO_PKG_VERSION")).into()),
            tls: None,
            proxy: None,
        }
    }
}

/// What the gateway said in `welcome`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Welcome {
    pub session: u64,
    pub user: String,
    pub number: String,
    pub heartbeat: Duration,
    pub misses: u32,
    /// This client's address as the gateway sees the control connection.
    pub observed: SocketAddr,
}

/// The outcome of a probe: what this client's firewall lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeOutcome {
    pub probe: u32,
    pub capabilities: Capabilities,
    /// The probe socket's address as the gateway saw it.
    pub mapped: Option<SocketAddr>,
    pub translated: bool,
}

/// What happens on the control session, in the order the gateway said it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    ProbeResult(ProbeOutcome),
    Incoming {
        call: CallId,
        from_number: String,
        from_user: String,
        conference: bool,
    },
    Ringing {
        call: CallId,
    },
    /// The call is up (or was re-planned): how to send and receive its media.
    Media(MediaInstructions),
    /// How to take `call` back through another gateway (or this one) should this session be
    /// lost during it ([`Phone::resume`]); the call is relayed by a gateway of a fleet.
    ResumeToken {
        call: CallId,
        token: String,
    },
    /// The gateway took `call` back after [`Phone::resume`].
    Resumed {
        call: CallId,
    },
    /// Every leg of the call the gateway delivers to is bound (for a room member: its own):
    /// audio sent now reaches the other side. It follows the `Media` it belongs to, and may
    /// come while the phone is still binding; relay it with
    /// [`MediaCall::media_ready`](super::media::MediaCall::media_ready).
    MediaReady {
        call: CallId,
    },
    HangUp {
        call: CallId,
        reason: HangupReason,
        /// The gateway's words for why (bounded; printed as is).
        detail: Option<String>,
    },
    /// An `error` from the gateway that no `dial` was waiting for.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The gateway is going away (`going_away`): log in elsewhere, preferably at one of
    /// `gateways` (bounded: at most [`super::gateways::MAX_GATEWAYS`], each at most
    /// [`super::gateways::MAX_ENTRY`] bytes). A `Disconnected` follows when it closes.
    GoingAway {
        message: String,
        gateways: Vec<String>,
    },
    /// The session is over (not sent after [`Phone::bye`]).
    Disconnected {
        reason: String,
        /// The gateway closed it with `refused` and this code (`None`: the connection was
        /// closed, reset or went silent).
        refused: Option<ErrorCode>,
    },
}

enum Command {
    Send(ClientMsg),
    Dial {
        number: Option<String>,
        numbers: Vec<String>,
        media: SocketAddr,
        reply: oneshot::Sender<Result<CallId, ClientError>>,
    },
    Bye(oneshot::Sender<()>),
}

/// A logged-in softphone. Dropping it logs out.
pub struct Phone {
    cmd: mpsc::Sender<Command>,
    key: SessionKey,
    welcome: Welcome,
    local: SocketAddr,
    server: SocketAddr,
    caps: watch::Receiver<Option<ProbeOutcome>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phone")
            .field("welcome", &self.welcome)
            .field("local", &self.local)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Splits `HOST[:PORT]` (also `[v6]:port`, a bare IPv6 address); the port defaults to 7400.
pub fn parse_server(server: &str) -> Result<(String, u16), ClientError> {
    parse_server_default(server, proto::DEFAULT_PORT)
}

/// [`parse_server`] with another default port.
pub fn parse_server_default(server: &str, default: u16) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadServer(server.to_owned());
    let s = server.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip().to_string(), a.port()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip.to_string(), default));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let ip: IpAddr = inner.parse().map_err(|_| bad())?;
        return Ok((ip.to_string(), default));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            let port: u16 = port.parse().map_err(|_| bad())?;
            Ok((host.to_owned(), port))
        }
        Some(_) => Err(bad()),
        None => Ok((s.to_owned(), default)),
    }
}

/// Reads one message from the control connection (bounded by the protocol's limit).
async fn read_msg(reader: &mut ConnReader, buf: &mut Vec<u8>) -> Result<ServerMsg, ClientError> {
    loop {
        if let Some((body, used)) =
            proto::split_frame(buf).map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            let m = proto::decode::<ServerMsg>(body);
            buf.drain(..used);
            match m {
                Ok(m) => return Ok(m),
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
        let mut chunk = [0u8; 4096];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the gateway closed the connection".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write_msg(writer: &mut ConnWriter, msg: &ClientMsg) -> Result<(), ClientError> {
    let mut out = Vec::new();
    proto::encode(msg, &mut out).map_err(|e| ClientError::Protocol(e.to_string()))?;
    writer.write_all(&out).await?;
    // TLS holds records until flushed (plain TCP: nothing to do).
    writer.flush().await?;
    Ok(())
}

async fn connect_tcp(
    server: &str,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| ClientError::Timeout("the server name to resolve"))?
            .map_err(|source| ClientError::Resolve {
                server: server.to_owned(),
                source,
            })?
            .collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(ClientError::Connect {
        server: server.to_owned(),
        source: last,
    })
}

impl Phone {
    /// Connects to `server` (`HOST[:PORT]`, default port 7400) and logs in as `user`.
    pub async fn connect(
        server: &str,
        user: &str,
        password: &str,
        opts: PhoneOptions,
    ) -> Result<(Phone, mpsc::Receiver<Event>), ClientError> {
        let (server, tls_scheme) = super::tls::strip_scheme(server);
        let tls = match (&opts.tls, tls_scheme) {
            (Some(o), _) => Some(o.clone()),
            (None, true) => Some(super::tls::TlsOptions::default()),
            (None, false) => None,
        };
        let default_port = match tls_scheme {
            true => super::tls::DEFAULT_TLS_PORT,
            false => proto::DEFAULT_PORT,
        };
        let (host, port) = parse_server_default(server, default_port)?;
        let stream = match &opts.proxy {
            None => connect_tcp(server, &host, port, opts.timeout).await?,
            Some(p) => {
                let target = match host.parse::<IpAddr>() {
                    Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                    _ => format!("{host}:{port}"),
                };
                super::proxy::connect(p, &target, opts.timeout)
                    .await
                    .map_err(|reason| ClientError::Connect {
                        server: server.to_owned(),
                        source: std::io::Error::other(reason),
                    })?
            }
        };
        let local = stream.local_addr()?;
        let peer = stream.peer_addr()?;
        let t = opts.timeout;
        // Over TLS the log-in is bound to the session (RFC 9266 tls-exporter): never downgraded.
        let (mut reader, mut writer, exporter): (ConnReader, ConnWriter, Option<Vec<u8>>) =
            match tls {
                None => {
                    let (r, w) = stream.into_split();
                    (Box::new(r), Box::new(w), None)
                }
                Some(o) => {
                    let config = super::tls::client_config(&o).map_err(ClientError::Tls)?;
                    let s = tokio::time::timeout(t, super::tls::handshake(stream, &host, config))
                        .await
                        .map_err(|_| ClientError::Timeout("the TLS handshake"))?
                        .map_err(ClientError::Tls)?;
                    let x = super::tls::exporter(&s).map_err(ClientError::Tls)?;
                    let (r, w) = tokio::io::split(s);
                    (Box::new(r), Box::new(w), Some(x))
                }
            };
        let mut rbuf = Vec::new();

        let (client, hello) = {
            let mut rng = rand::rng();
            ClientFirst::with_config(user, opts.auth, &mut rng).map_err(ClientError::Auth)?
        };
        write_msg(
            &mut writer,
            &ClientMsg::Hello {
                version: proto::VERSION,
                user: hello.user,
                nonce: hello.client_nonce,
                software: opts.software.clone(),
            },
        )
        .await?;
        let challenge = match tokio::time::timeout(t, read_msg(&mut reader, &mut rbuf))
            .await
            .map_err(|_| ClientError::Timeout("the gateway's challenge"))??
        {
            ServerMsg::Challenge {
                nonce,
                salt,
                iterations,
            } => auth::Challenge {
                server_nonce: nonce,
                salt: BASE64.decode(salt).map_err(|_| {
                    ClientError::Protocol("the challenge's salt is not base64".into())
                })?,
                iterations,
            },
            ServerMsg::Refused { code, message } => {
                return Err(ClientError::Refused { code, message });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected a challenge, got {}",
                    msg_name(&other)
                )));
            }
        };
        // PBKDF2 with the gateway's iteration count: off the async thread.
        let password = password.to_owned();
        let (client, proof) = tokio::task::spawn_blocking(move || {
            client.respond_bound(&password, &challenge, exporter.as_deref())
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("log-in computation failed: {e}")))?
        .map_err(ClientError::Auth)?;
        write_msg(
            &mut writer,
            &ClientMsg::Proof {
                channel_binding: proof.channel_binding.clone(),
                nonce: proof.nonce.clone(),
                proof: BASE64.encode(&proof.proof),
            },
        )
        .await?;
        let (welcome, signature) = match tokio::time::timeout(t, read_msg(&mut reader, &mut rbuf))
            .await
            .map_err(|_| ClientError::Timeout("the gateway's welcome"))??
        {
            ServerMsg::Welcome {
                session,
                signature,
                user,
                number,
                heartbeat_ms,
                misses,
                observed,
            } => (
                Welcome {
                    session,
                    user,
                    number,
                    heartbeat: Duration::from_millis(u64::from(heartbeat_ms)).max(MIN_HEARTBEAT),
                    misses,
                    observed,
                },
                signature,
            ),
            ServerMsg::Refused { code, message } => {
                return Err(ClientError::Refused { code, message });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {}",
                    msg_name(&other)
                )));
            }
        };
        let signature = BASE64
            .decode(signature)
            .map_err(|_| ClientError::GatewayNotAuthenticated)?;
        let key = client
            .verify_server(&auth::ServerSignature { signature })
            .map_err(|e| match e {
                AuthError::ServerNotAuthenticated => ClientError::GatewayNotAuthenticated,
                other => ClientError::Auth(other),
            })?;
        tracing::info!(
            user = %welcome.user,
            number = %welcome.number,
            session = welcome.session,
            "logged in; the gateway proved it holds this user's verifier"
        );

        let (cmd_tx, cmd_rx) = mpsc::channel(32);
        let (ev_tx, ev_rx) = mpsc::channel(opts.event_capacity.max(1));
        let (caps_tx, caps_rx) = watch::channel(None);
        let (probe_tx, probe_rx) = mpsc::channel(16);
        let session = Session {
            reader,
            writer,
            rbuf,
            events: ev_tx,
            caps: caps_tx,
            pending: VecDeque::new(),
            next_tag: 1,
            heartbeat_seq: 0,
            heartbeat: welcome.heartbeat,
            misses: welcome.misses,
            last_heard: Instant::now(),
            probes: HashMap::new(),
            probe_tx,
            firewall: opts.firewall,
            server_ip: canonical(peer).ip(),
            local_ip: canonical(local).ip(),
        };
        let task = tokio::spawn(session.run(cmd_rx, probe_rx));
        Ok((
            Phone {
                cmd: cmd_tx,
                key,
                welcome,
                local,
                server: peer,
                caps: caps_rx,
                task: Some(task),
            },
            ev_rx,
        ))
    }

    /// The session key from the log-in (media leg keys derive from it). Do not log it.
    pub fn session_key(&self) -> &SessionKey {
        &self.key
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The gateway's control address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server
    }

    /// The local address of the control connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The last probe result, if a probe has finished.
    pub fn capabilities(&self) -> Option<ProbeOutcome> {
        *self.caps.borrow()
    }

    /// Waits up to `wait` for a probe result (returns at once if there is one).
    pub async fn wait_capabilities(&self, wait: Duration) -> Option<ProbeOutcome> {
        let mut rx = self.caps.clone();
        let r = tokio::time::timeout(wait, rx.wait_for(|c| c.is_some())).await;
        match r {
            Ok(Ok(c)) => *c,
            _ => *self.caps.borrow(),
        }
    }

    /// A UDP socket for one call's media, in the gateway's address family. Make it before
    /// `dial`/`accept` and pass [`media_address`](Self::media_address) of it.
    pub async fn media_socket(&self) -> std::io::Result<Arc<UdpSocket>> {
        let any = if canonical(self.server).is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        Ok(Arc::new(UdpSocket::bind(SocketAddr::new(any, 0)).await?))
    }

    /// The address to announce for a media socket: the control connection's local IP (the
    /// interface that reaches the gateway) with the socket's port.
    pub fn media_address(&self, socket: &UdpSocket) -> std::io::Result<SocketAddr> {
        Ok(SocketAddr::new(
            canonical(self.local).ip(),
            socket.local_addr()?.port(),
        ))
    }

    async fn command(&self, c: Command) -> Result<(), ClientError> {
        self.cmd.send(c).await.map_err(|_| ClientError::Closed)
    }

    async fn send(&self, m: ClientMsg) -> Result<(), ClientError> {
        self.command(Command::Send(m)).await
    }

    async fn place(
        &self,
        number: Option<String>,
        numbers: Vec<String>,
        media: SocketAddr,
    ) -> Result<CallId, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Dial {
            number,
            numbers,
            media,
            reply,
        })
        .await?;
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("the gateway's answer to the dial")),
        }
    }

    /// Calls `number`; `media` is the call's UDP media address. Returns the call id; the
    /// outcome arrives as events (`Ringing`, `Media`, `HangUp`).
    pub async fn dial(&self, number: &str, media: SocketAddr) -> Result<CallId, ClientError> {
        self.place(Some(number.to_owned()), Vec::new(), media).await
    }

    /// Starts a conference room with `numbers`.
    pub async fn conference(
        &self,
        numbers: &[String],
        media: SocketAddr,
    ) -> Result<CallId, ClientError> {
        self.place(None, numbers.to_vec(), media).await
    }

    pub async fn accept(&self, call: CallId, media: SocketAddr) -> Result<(), ClientError> {
        self.send(ClientMsg::Accept {
            call,
            media: Some(media),
        })
        .await
    }

    pub async fn reject(&self, call: CallId) -> Result<(), ClientError> {
        self.send(ClientMsg::Reject { call }).await
    }

    pub async fn hang_up(&self, call: CallId) -> Result<(), ClientError> {
        self.send(ClientMsg::HangUp { call }).await
    }

    pub async fn reprobe(&self) -> Result<(), ClientError> {
        self.send(ClientMsg::Reprobe).await
    }

    /// Asks this gateway to take back `call`, whose control connection was lost with another
    /// gateway (`token`: the call's [`Event::ResumeToken`]). Answered with
    /// [`Event::Resumed`], or [`Event::HangUp`] when it cannot be.
    pub async fn resume(&self, call: CallId, token: &str) -> Result<(), ClientError> {
        self.send(ClientMsg::Resume {
            call,
            token: token.to_owned(),
        })
        .await
    }

    /// Tells the gateway that no media has arrived for a while.
    pub async fn media_trouble(&self, call: CallId) -> Result<(), ClientError> {
        self.send(ClientMsg::MediaTrouble { call }).await
    }

    /// Logs out: sends `bye` and waits (briefly) for the connection to close.
    pub async fn bye(mut self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        let r = self.command(Command::Bye(tx)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        r
    }
}

fn msg_name(m: &ServerMsg) -> &'static str {
    match m {
        ServerMsg::Challenge { .. } => "challenge",
        ServerMsg::Welcome { .. } => "welcome",
        ServerMsg::Refused { .. } => "refused",
        ServerMsg::HeartbeatAck { .. } => "heartbeat_ack",
        ServerMsg::Poll { .. } => "poll",
        ServerMsg::ProbeBegin { .. } => "probe_begin",
        ServerMsg::ProbeCheck { .. } => "probe_check",
        ServerMsg::ProbeResult { .. } => "probe_result",
        ServerMsg::Calling { .. } => "calling",
        ServerMsg::Ringing { .. } => "ringing",
        ServerMsg::Incoming { .. } => "incoming",
        ServerMsg::Media(_) => "media",
        ServerMsg::MediaReady { .. } => "media_ready",
        ServerMsg::HangUp { .. } => "hang_up",
        ServerMsg::Error { .. } => "error",
        ServerMsg::GoingAway { .. } => "going_away",
        ServerMsg::Presence { .. } => "presence",
        ServerMsg::ResumeToken { .. } => "resume_token",
        ServerMsg::Resumed { .. } => "resumed",
    }
}

/// The background task that owns the control connection.
struct Session {
    reader: ConnReader,
    writer: ConnWriter,
    rbuf: Vec<u8>,
    events: mpsc::Sender<Event>,
    caps: watch::Sender<Option<ProbeOutcome>>,
    pending: VecDeque<(u32, oneshot::Sender<Result<CallId, ClientError>>)>,
    next_tag: u32,
    heartbeat_seq: u64,
    heartbeat: Duration,
    misses: u32,
    last_heard: Instant,
    probes: HashMap<u32, oneshot::Sender<Duration>>,
    probe_tx: mpsc::Sender<ClientMsg>,
    firewall: Firewall,
    server_ip: IpAddr,
    local_ip: IpAddr,
}

/// Why the session loop ended.
enum End {
    /// The application said bye (no `Disconnected` event).
    Bye(Option<oneshot::Sender<()>>),
    Lost(String),
    /// The gateway said `refused` with this code.
    Refused(ErrorCode, String),
}

impl Session {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut probe_rx: mpsc::Receiver<ClientMsg>,
    ) {
        let mut hb = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        hb.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let silence_limit = (self.heartbeat * (self.misses + 1)).max(Duration::from_secs(3));
        // Messages that came in the same read as `welcome` (a gateway probes right away).
        let mut early_end = self.drain().await;
        let end = loop {
            if let Some(end) = early_end.take() {
                break end;
            }
            let mut chunk = [0u8; 4096];
            tokio::select! {
                r = self.reader.read(&mut chunk) => match r {
                    Ok(0) => break End::Lost("the gateway closed the control connection".into()),
                    Ok(n) => {
                        self.last_heard = Instant::now();
                        self.rbuf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = self.drain().await {
                            break end;
                        }
                    }
                    Err(e) => break End::Lost(format!("control connection: {e}")),
                },
                c = cmds.recv() => match c {
                    None => break End::Bye(None),
                    Some(Command::Bye(reply)) => break End::Bye(Some(reply)),
                    Some(c) => {
                        if let Err(e) = self.command(c).await {
                            break End::Lost(e.to_string());
                        }
                    }
                },
                m = probe_rx.recv() => {
                    if let Some(m) = m
                        && let Err(e) = self.send(&m).await
                    {
                        break End::Lost(e.to_string());
                    }
                },
                _ = hb.tick() => {
                    if self.last_heard.elapsed() > silence_limit {
                        break End::Lost(format!(
                            "the gateway has said nothing for {:.1} s",
                            self.last_heard.elapsed().as_secs_f64()
                        ));
                    }
                    if let Err(e) = self.send_heartbeat().await {
                        break End::Lost(e.to_string());
                    }
                }
            }
        };
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(ClientError::Closed));
        }
        match end {
            End::Bye(reply) => {
                let _ = self.send(&ClientMsg::Bye).await;
                let _ = self.writer.shutdown().await;
                // Give the gateway a moment to close its side.
                let mut chunk = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while matches!(self.reader.read(&mut chunk).await, Ok(n) if n > 0) {}
                })
                .await;
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            End::Lost(reason) => {
                tracing::warn!("control session ended: {reason}");
                self.emit(Event::Disconnected {
                    reason,
                    refused: None,
                });
            }
            End::Refused(code, reason) => {
                tracing::warn!("control session ended: {reason}");
                self.emit(Event::Disconnected {
                    reason,
                    refused: Some(code),
                });
            }
        }
    }

    async fn send(&mut self, m: &ClientMsg) -> Result<(), ClientError> {
        write_msg(&mut self.writer, m).await
    }

    async fn send_heartbeat(&mut self) -> Result<(), ClientError> {
        self.heartbeat_seq += 1;
        let seq = self.heartbeat_seq;
        self.send(&ClientMsg::Heartbeat { seq }).await
    }

    fn emit(&self, e: Event) {
        match self.events.try_send(e) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e)) => {
                tracing::error!("event queue full; dropping {e:?}");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    async fn command(&mut self, c: Command) -> Result<(), ClientError> {
        match c {
            Command::Send(m) => self.send(&m).await,
            Command::Dial {
                number,
                numbers,
                media,
                reply,
            } => {
                if self.pending.len() >= MAX_PENDING_DIALS {
                    let _ = reply.send(Err(ClientError::Protocol(
                        "too many dials waiting for the gateway".into(),
                    )));
                    return Ok(());
                }
                let tag = self.next_tag;
                self.next_tag = self.next_tag.wrapping_add(1).max(1);
                let m = match number {
                    Some(number) => ClientMsg::Dial {
                        tag,
                        number,
                        media: Some(media),
                    },
                    None => ClientMsg::Conference {
                        tag,
                        numbers,
                        media: Some(media),
                    },
                };
                self.pending.push_back((tag, reply));
                self.send(&m).await
            }
            Command::Bye(_) => Ok(()),
        }
    }

    /// Handles every complete message in the buffer; `Some` ends the session.
    async fn drain(&mut self) -> Option<End> {
        loop {
            let (msg, used) = match proto::split_frame(&self.rbuf) {
                Ok(Some((body, used))) => (proto::decode::<ServerMsg>(body), used),
                Ok(None) => return None,
                Err(e) => return Some(End::Lost(format!("bad frame from the gateway: {e}"))),
            };
            self.rbuf.drain(..used);
            match msg {
                Ok(m) => {
                    if let Some(end) = self.on_message(m).await {
                        return Some(end);
                    }
                }
                // A newer gateway may send messages this build does not know: skip them.
                Err(e) => tracing::warn!("ignoring a message from the gateway: {e}"),
            }
        }
    }

    async fn on_message(&mut self, m: ServerMsg) -> Option<End> {
        match m {
            // The softphone never asks for presence (the web page does).
            ServerMsg::HeartbeatAck { .. } | ServerMsg::Presence { .. } => {}
            ServerMsg::Poll { .. } => {
                // Answered with the phone's own next heart-beat number (the poll's number is
                // the gateway's; a heart-beat of any number proves the phone is there).
                if let Err(e) = self.send_heartbeat().await {
                    return Some(End::Lost(e.to_string()));
                }
            }
            ServerMsg::ProbeBegin {
                probe,
                port_a,
                port_b,
                token,
                timeout_ms,
            } => {
                self.probes.retain(|_, tx| !tx.is_closed());
                if self.probes.len() >= MAX_PROBES {
                    tracing::warn!("too many probes at once; ignoring probe {probe}");
                    return None;
                }
                let (check_tx, check_rx) = oneshot::channel();
                self.probes.insert(probe, check_tx);
                let p = Probe {
                    probe,
                    port_a,
                    port_b,
                    token,
                    timeout: Duration::from_millis(u64::from(timeout_ms)),
                    server_ip: self.server_ip,
                    local_ip: self.local_ip,
                    firewall: self.firewall,
                };
                tokio::spawn(p.run(self.probe_tx.clone(), check_rx));
            }
            ServerMsg::ProbeCheck { probe, grace_ms } => match self.probes.remove(&probe) {
                Some(tx) => {
                    let _ = tx.send(Duration::from_millis(u64::from(grace_ms)));
                }
                None => {
                    // Unknown probe: say nothing arrived rather than leave the gateway waiting.
                    let m = ClientMsg::ProbeReport {
                        probe,
                        got_a: false,
                        got_b: false,
                    };
                    if let Err(e) = self.send(&m).await {
                        return Some(End::Lost(e.to_string()));
                    }
                }
            },
            ServerMsg::ProbeResult {
                probe,
                capabilities,
                mapped,
                translated,
            } => {
                let o = ProbeOutcome {
                    probe,
                    capabilities,
                    mapped,
                    translated,
                };
                tracing::info!(
                    send_udp = capabilities.send_udp,
                    recv_udp = capabilities.recv_udp,
                    nat = capabilities.nat,
                    "probe result"
                );
                self.caps.send_replace(Some(o));
                self.emit(Event::ProbeResult(o));
            }
            ServerMsg::Calling { tag, call } => {
                match self.pending.iter().position(|(t, _)| *t == tag) {
                    Some(i) => {
                        if let Some((_, reply)) = self.pending.remove(i) {
                            let _ = reply.send(Ok(call));
                        }
                    }
                    None => tracing::warn!("calling for an unknown tag {tag}"),
                }
            }
            ServerMsg::Ringing { call } => self.emit(Event::Ringing { call }),
            ServerMsg::Incoming {
                call,
                from_number,
                from_user,
                conference,
            } => self.emit(Event::Incoming {
                call,
                from_number,
                from_user,
                conference,
            }),
            ServerMsg::Media(m) => self.emit(Event::Media(m)),
            ServerMsg::ResumeToken { call, token } => {
                if token.len() <= crate::wire::control::MAX_RESUME_TOKEN {
                    self.emit(Event::ResumeToken { call, token });
                }
            }
            ServerMsg::Resumed { call } => self.emit(Event::Resumed { call }),
            ServerMsg::MediaReady { call } => self.emit(Event::MediaReady { call }),
            ServerMsg::HangUp {
                call,
                reason,
                detail,
            } => self.emit(Event::HangUp {
                call,
                reason,
                detail: detail.map(|d| crate::wire::control::bounded_detail(&d)),
            }),
            ServerMsg::Error { code, message } => {
                // The gateway answers in order: an error while a dial waits is that dial's.
                match self.pending.pop_front() {
                    Some((_, reply)) => {
                        let _ = reply.send(Err(ClientError::Gateway { code, message }));
                    }
                    None => self.emit(Event::Error { code, message }),
                }
            }
            ServerMsg::Refused { code, message } => {
                return Some(End::Refused(code, refused_text(code, &message)));
            }
            ServerMsg::GoingAway { message, gateways } => {
                tracing::info!("the gateway is going away: {message}");
                let gateways = gateways
                    .into_iter()
                    .filter(|g| g.len() <= super::gateways::MAX_ENTRY)
                    .take(super::gateways::MAX_GATEWAYS)
                    .collect();
                self.emit(Event::GoingAway {
                    message: crate::wire::control::bounded_detail(&message),
                    gateways,
                });
            }
            ServerMsg::Challenge { .. } | ServerMsg::Welcome { .. } => {
                tracing::warn!("ignoring an unexpected {} after log-in", msg_name(&m));
            }
        }
        None
    }
}

/// One probe, run on its own task.
struct Probe {
    probe: u32,
    port_a: u16,
    port_b: u16,
    token: String,
    timeout: Duration,
    server_ip: IpAddr,
    local_ip: IpAddr,
    firewall: Firewall,
}

impl Probe {
    /// The Binding request: USERNAME = token, MESSAGE-INTEGRITY keyed by the token bytes,
    /// FINGERPRINT.
    fn request(&self, txid: &[u8; 12], buf: &mut [u8]) -> Option<usize> {
        let mut w = stun::Writer::new(buf, stun::Class::Request, stun::BINDING, txid).ok()?;
        w.attr(stun::attr::USERNAME, self.token.as_bytes()).ok()?;
        w.message_integrity(self.token.as_bytes()).ok()?;
        w.fingerprint().ok()?;
        Some(w.finish())
    }

    /// Which port a datagram proves, if it is a gateway probe datagram at all.
    fn classify(&self, data: &[u8], from: SocketAddr) -> Option<bool> {
        let from = canonical(from);
        if from.ip() != self.server_ip || !stun::looks_like_stun(data) {
            return None;
        }
        let m = stun::Message::parse(data).ok()?;
        m.check_integrity(self.token.as_bytes()).ok()?;
        m.check_fingerprint().ok()?;
        if from.port() == self.port_a {
            Some(true)
        } else if from.port() == self.port_b {
            Some(false)
        } else {
            None
        }
    }

    async fn run(self, out: mpsc::Sender<ClientMsg>, check: oneshot::Receiver<Duration>) {
        let any = if self.server_ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let socket = match UdpSocket::bind(SocketAddr::new(any, 0)).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("probe {}: cannot bind a UDP socket: {e}", self.probe);
                None
            }
        };
        if let Some(port) = socket
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port())
        {
            let local = self
                .firewall
                .reported_local(SocketAddr::new(self.local_ip, port));
            let _ = out
                .send(ClientMsg::ProbeLocal {
                    probe: self.probe,
                    local,
                })
                .await;
        }
        let target = SocketAddr::new(self.server_ip, self.port_a);
        let txid = super::binding::new_txid();
        let mut req = [0u8; 512];
        let req_len = self.request(&txid, &mut req);
        let started = Instant::now();
        let send_until = started + self.timeout;
        let give_up = send_until + PROBE_LINGER;
        let (mut got_a, mut got_b) = (false, false);
        let mut next_send = started;
        let mut check = Some(check);
        let mut report_at: Option<Instant> = None;
        let mut buf = vec![0u8; 2048];
        loop {
            let now = Instant::now();
            if report_at.is_some_and(|t| now >= t || (got_a && got_b)) {
                break;
            }
            if now >= give_up && report_at.is_none() {
                tracing::warn!("probe {}: no probe_check from the gateway", self.probe);
                return;
            }
            let sending = !got_a && now < send_until;
            if sending && now >= next_send {
                if let (Some(s), Some(n)) = (&socket, req_len)
                    && let Err(e) = self.firewall.send_to(s, &req[..n], target)
                {
                    tracing::debug!("probe {}: send: {e}", self.probe);
                }
                next_send = now + super::media::BIND_RETRANSMIT;
            }
            let mut wake = report_at.unwrap_or(give_up);
            if sending {
                wake = wake.min(next_send);
            }
            let recv = async {
                match &socket {
                    Some(s) => s.recv_from(&mut buf).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = recv => {
                    if let Ok((n, from)) = r
                        && self.firewall.admits_udp_in()
                    {
                        match self.classify(&buf[..n], from) {
                            Some(true) => got_a = true,
                            Some(false) => got_b = true,
                            None => {}
                        }
                    }
                }
                g = async { check.as_mut().expect("polled only while present").await }, if check.is_some() => {
                    check = None;
                    // A dropped sender (session over) ends the probe at once.
                    let grace = match g {
                        Ok(grace) => grace,
                        Err(_) => return,
                    };
                    report_at = Some(Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        tracing::debug!(probe = self.probe, got_a, got_b, "probe report");
        let _ = out
            .send(ClientMsg::ProbeReport {
                probe: self.probe,
                got_a,
                got_b,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_gateway::{FakeGateway, Mode, gateway, gateway_with, listener};
    use super::*;

    fn opts() -> PhoneOptions {
        PhoneOptions {
            auth: ClientConfig {
                min_iterations: 1,
                max_iterations: 10_000,
            },
            ..PhoneOptions::default()
        }
    }

    #[test]
    fn server_addresses() {
        let p = |s: &str| parse_server(s).map_err(|e| e.to_string());
        assert_eq!(p("gw.example"), Ok(("gw.example".into(), 7400)));
        assert_eq!(p("gw.example:7500"), Ok(("gw.example".into(), 7500)));
        assert_eq!(p("192.0.2.1"), Ok(("192.0.2.1".into(), 7400)));
        assert_eq!(p("192.0.2.1:1"), Ok(("192.0.2.1".into(), 1)));
        assert_eq!(p("::1"), Ok(("::1".into(), 7400)));
        assert_eq!(p("[::1]"), Ok(("::1".into(), 7400)));
        assert_eq!(p("[2001:db8::1]:9"), Ok(("2001:db8::1".into(), 9)));
        assert!(p("gw:notaport").is_err());
        assert!(p("").is_err());
        assert!(p("[nope]").is_err());
    }

    #[tokio::test]
    async fn logs_in_and_shares_the_session_key() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "s3cret", Mode::Honest, 10_000));
        let (phone, _events) = Phone::connect(&addr, "alice", "s3cret", opts())
            .await
            .expect("log-in");
        let mut g = gw.await.expect("gateway");
        assert_eq!(Some(phone.session_key()), g.key.as_ref());
        assert_eq!(phone.welcome().number, "+15550001");
        assert_eq!(phone.welcome().observed, g.peer);
        assert_eq!(phone.local_addr(), g.peer);
        phone.bye().await.expect("bye");
        assert_eq!(g.recv().await, ClientMsg::Bye);
    }

    #[tokio::test]
    async fn wrong_password_is_a_clear_refusal() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "s3cret", Mode::Honest, 10_000));
        let e = Phone::connect(&addr, "alice", "guess", opts())
            .await
            .expect_err("refused");
        assert_eq!(e.to_string(), "log-in refused: wrong user or password");
        assert!(e.is_refusal());
        gw.await.expect("gateway");
        // An unknown user gets the same answer.
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "s3cret", Mode::Honest, 10_000));
        let e = Phone::connect(&addr, "mallory", "s3cret", opts())
            .await
            .expect_err("refused");
        assert_eq!(e.to_string(), "log-in refused: wrong user or password");
        gw.await.expect("gateway");
    }

    #[tokio::test]
    async fn messages_right_behind_welcome_are_handled() {
        let (l, addr) = listener().await;
        let o = ProbeOutcome {
            probe: 1,
            capabilities: Capabilities::new(false, true),
            mapped: None,
            translated: false,
        };
        let gw = tokio::spawn(gateway_with(
            l,
            "pw",
            Mode::Honest,
            10_000,
            super::super::fake_gateway::ITER,
            vec![ServerMsg::ProbeResult {
                probe: 1,
                capabilities: o.capabilities,
                mapped: None,
                translated: false,
            }],
        ));
        let (phone, mut events) = Phone::connect(&addr, "alice", "pw", opts())
            .await
            .expect("log-in");
        let _g = gw.await.expect("gateway");
        assert_eq!(
            phone.wait_capabilities(Duration::from_secs(2)).await,
            Some(o)
        );
        assert_eq!(events.recv().await, Some(Event::ProbeResult(o)));
    }

    #[tokio::test]
    async fn a_gateway_without_the_verifier_is_rejected() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "s3cret", Mode::WrongSignature, 10_000));
        let e = Phone::connect(&addr, "alice", "s3cret", opts())
            .await
            .expect_err("not our gateway");
        assert!(matches!(e, ClientError::GatewayNotAuthenticated), "{e}");
        assert!(e.to_string().contains("not the real gateway"), "{e}");
        gw.await.expect("gateway");
        // Nobody to connect to: a clear error too.
        let (l, addr) = listener().await;
        drop(l);
        let e = Phone::connect(&addr, "alice", "s3cret", opts())
            .await
            .expect_err("refused connection");
        assert!(
            e.to_string()
                .starts_with("cannot connect to the gateway at"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_weak_challenge_is_refused_by_default() {
        // The default client config wants at least 4096 iterations; the fake uses 16.
        let (l, addr) = listener().await;
        let gw = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 512];
            let mut s = s;
            let _ = s.read(&mut buf).await;
            let mut out = Vec::new();
            proto::encode(
                &ServerMsg::Refused {
                    code: ErrorCode::RateLimited,
                    message: "retry after 30 s".into(),
                },
                &mut out,
            )
            .expect("encode");
            s.write_all(&out).await.expect("write");
        });
        let e = Phone::connect(&addr, "alice", "pw", PhoneOptions::default())
            .await
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "refused: too many attempts or messages, try again later (retry after 30 s)"
        );
        gw.await.expect("gateway");
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "pw", Mode::Honest, 10_000));
        let e = Phone::connect(&addr, "alice", "pw", PhoneOptions::default())
            .await
            .expect_err("too few iterations");
        assert!(
            matches!(e, ClientError::Auth(AuthError::Iterations { .. })),
            "{e}"
        );
        drop(gw);
    }

    #[tokio::test]
    async fn heartbeats_polls_and_calls() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "pw", Mode::Honest, 50));
        let (phone, mut events) = Phone::connect(&addr, "alice", "pw", opts())
            .await
            .expect("log-in");
        let mut g = gw.await.expect("gateway");
        // Heart-beats come by themselves, numbered.
        let t0 = Instant::now();
        assert_eq!(g.recv().await, ClientMsg::Heartbeat { seq: 1 });
        g.send(&ServerMsg::HeartbeatAck { seq: 1 }).await;
        assert_eq!(g.recv().await, ClientMsg::Heartbeat { seq: 2 });
        assert!(
            t0.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t0.elapsed()
        );
        // A poll is answered with a heart-beat at once.
        g.send(&ServerMsg::Poll { seq: 9 }).await;
        assert!(matches!(g.recv().await, ClientMsg::Heartbeat { .. }));
        // A dial gets its call id from `calling`.
        let media: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let dial = async { phone.dial("+15550002", media).await };
        let serve = async {
            let ClientMsg::Dial {
                tag,
                number,
                media: m,
            } = g.recv_skip_heartbeats().await
            else {
                panic!("expected dial")
            };
            assert_eq!((number.as_str(), m), ("+15550002", Some(media)));
            g.send(&ServerMsg::Calling { tag, call: 77 }).await;
            g.send(&ServerMsg::Ringing { call: 77 }).await;
            g.send(&ServerMsg::HangUp {
                call: 77,
                reason: HangupReason::Busy,
                detail: None,
            })
            .await;
        };
        let (call, ()) = tokio::join!(dial, serve);
        assert_eq!(call.expect("call id"), 77);
        assert_eq!(events.recv().await, Some(Event::Ringing { call: 77 }));
        assert_eq!(
            events.recv().await,
            Some(Event::HangUp {
                call: 77,
                reason: HangupReason::Busy,
                detail: None,
            })
        );
        // A dial the gateway refuses with an error.
        let dial = async { phone.dial("nobody", media).await };
        let serve = async {
            assert!(matches!(
                g.recv_skip_heartbeats().await,
                ClientMsg::Dial { .. }
            ));
            g.send(&ServerMsg::Error {
                code: ErrorCode::BadMessage,
                message: "bad number".into(),
            })
            .await;
        };
        let (r, ()) = tokio::join!(dial, serve);
        assert!(r.expect_err("refused").to_string().contains("bad number"));
        phone.hang_up(77).await.expect("send");
        assert_eq!(
            g.recv_skip_heartbeats().await,
            ClientMsg::HangUp { call: 77 }
        );
        // The gateway goes away: the phone says so.
        drop(g);
        assert!(matches!(
            events.recv().await,
            Some(Event::Disconnected { .. })
        ));
    }

    /// The gateway's two probe ports, and its side of one probe.
    async fn run_probe(g: &mut FakeGateway, probe: u32, answer: bool) -> (bool, bool, bool) {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind b");
        let token = "tok-123456";
        g.send(&ServerMsg::ProbeBegin {
            probe,
            port_a: a.local_addr().expect("a").port(),
            port_b: b.local_addr().expect("b").port(),
            token: token.into(),
            timeout_ms: 400,
        })
        .await;
        let ClientMsg::ProbeLocal { probe: p, local } = g.recv_skip_heartbeats().await else {
            panic!("expected probe_local")
        };
        assert_eq!(p, probe);
        assert_eq!(local.ip(), g.peer.ip(), "the control connection's local IP");
        // Wait for the request on A.
        let mut buf = [0u8; 1500];
        let got_request =
            tokio::time::timeout(Duration::from_millis(600), a.recv_from(&mut buf)).await;
        let mut heard = false;
        if let Ok(Ok((n, from))) = got_request {
            heard = true;
            assert_eq!(from.port(), local.port(), "sent from the probe socket");
            let m = stun::Message::parse(&buf[..n]).expect("STUN");
            assert_eq!(m.username(), Some(token.as_bytes()));
            m.check_integrity(token.as_bytes())
                .expect("keyed by the token");
            m.check_fingerprint().expect("fingerprint");
            if answer {
                let mut out = [0u8; 256];
                let mut w = stun::Writer::new(
                    &mut out,
                    stun::Class::Success,
                    stun::BINDING,
                    m.transaction_id(),
                )
                .expect("writer");
                w.xor_address(stun::attr::XOR_MAPPED_ADDRESS, from)
                    .expect("attr");
                w.message_integrity(token.as_bytes()).expect("mi");
                w.fingerprint().expect("fp");
                let n = w.finish();
                a.send_to(&out[..n], from).await.expect("send a");
                // From B: a forged one (wrong key) first, then the real one.
                let mut w =
                    stun::Writer::new(&mut out, stun::Class::Indication, stun::BINDING, &[1; 12])
                        .expect("writer");
                w.message_integrity(b"not the token").expect("mi");
                let n = w.finish();
                b.send_to(&out[..n], from).await.expect("send b");
                let mut w =
                    stun::Writer::new(&mut out, stun::Class::Indication, stun::BINDING, &[2; 12])
                        .expect("writer");
                w.message_integrity(token.as_bytes()).expect("mi");
                w.fingerprint().expect("fp");
                let n = w.finish();
                b.send_to(&out[..n], from).await.expect("send b");
            }
        }
        g.send(&ServerMsg::ProbeCheck {
            probe,
            grace_ms: 200,
        })
        .await;
        let ClientMsg::ProbeReport {
            probe: p,
            got_a,
            got_b,
        } = g.recv_skip_heartbeats().await
        else {
            panic!("expected probe_report")
        };
        assert_eq!(p, probe);
        (heard, got_a, got_b)
    }

    #[tokio::test]
    async fn probes_are_answered_by_themselves() {
        let (l, addr) = listener().await;
        let gw = tokio::spawn(gateway(l, "pw", Mode::Honest, 10_000));
        let (phone, mut events) = Phone::connect(&addr, "alice", "pw", opts())
            .await
            .expect("log-in");
        let mut g = gw.await.expect("gateway");
        assert_eq!(run_probe(&mut g, 1, true).await, (true, true, true));
        // No answer from the gateway: the phone reports nothing arrived.
        assert_eq!(run_probe(&mut g, 2, false).await, (true, false, false));
        let caps = Capabilities::new(true, true);
        let mapped: SocketAddr = "198.51.100.1:5000".parse().expect("addr");
        g.send(&ServerMsg::ProbeResult {
            probe: 2,
            capabilities: caps,
            mapped: Some(mapped),
            translated: true,
        })
        .await;
        let expected = ProbeOutcome {
            probe: 2,
            capabilities: caps,
            mapped: Some(mapped),
            translated: true,
        };
        assert_eq!(events.recv().await, Some(Event::ProbeResult(expected)));
        assert_eq!(phone.capabilities(), Some(expected));
        assert_eq!(
            phone.wait_capabilities(Duration::from_millis(1)).await,
            Some(expected)
        );
        // A check for a probe it never saw: answered with nothing.
        g.send(&ServerMsg::ProbeCheck {
            probe: 99,
            grace_ms: 0,
        })
        .await;
        assert_eq!(
            g.recv_skip_heartbeats().await,
            ClientMsg::ProbeReport {
                probe: 99,
                got_a: false,
                got_b: false
            }
        );
        phone.reprobe().await.expect("send");
        assert_eq!(g.recv_skip_heartbeats().await, ClientMsg::Reprobe);
    }

    #[tokio::test]
    async fn the_simulated_firewall_blocks_probe_datagrams() {
        for (fw, expect) in [
            (
                Firewall {
                    block_udp_out: true,
                    block_udp_in: false,
                    simulate_nat: false,
                },
                (false, false, false),
            ),
            (
                Firewall {
                    block_udp_out: false,
                    block_udp_in: true,
                    simulate_nat: false,
                },
                (true, false, false),
            ),
        ] {
            let (l, addr) = listener().await;
            let gw = tokio::spawn(gateway(l, "pw", Mode::Honest, 10_000));
            let (_phone, _events) = Phone::connect(
                &addr,
                "alice",
                "pw",
                PhoneOptions {
                    firewall: fw,
                    ..opts()
                },
            )
            .await
            .expect("log-in");
            let mut g = gw.await.expect("gateway");
            assert_eq!(run_probe(&mut g, 1, true).await, expect, "{fw:?}");
        }
    }
}
