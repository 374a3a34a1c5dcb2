//! TLS on the control channel (`[tls]`): a second control listener whose connections are
//! TLS 1.3 (rustls, ring provider), and the certificate reload on SIGHUP.
//!
//! A connection on the TLS listener is admitted by the connection limits *before* its
//! handshake (the handshake is work the limits bound), handshakes in its own task under a
//! time limit, and only then reaches the core: `Connected`, then `TlsChannel` with the
//! session's RFC 9266 `tls-exporter` value, which the SCRAM log-in checks its channel
//! binding against. A reload swaps the `ServerConfig` that later handshakes use; sessions
//! already established keep theirs. The same reload serves the single port (it takes `config`
//! per connection) and the web listener with `[web] https = true` (through a watch channel).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{ConnIo, Event, ReadRate, ServeError, Server, canonical, conn_reader};
use crate::config::Config;
use crate::control::auth::{TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN};
use crate::control::gateway::{ConnId, Input};

/// A TLS control connection on the gateway side.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A handshake that has not finished by then is dropped (and its slot given back).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS listener's state: the configuration new handshakes use.
pub struct TlsState {
    pub(super) config: Arc<ServerConfig>,
    /// Plain control connections arrive on this listener too (first byte not 0x16).
    shared: bool,
    /// `[web] https = true`: the web listener's configuration (the same certificate, ALPN
    /// `http/1.1`), replaced together with `config` on SIGHUP.
    pub(super) web: Option<tokio::sync::watch::Sender<Arc<ServerConfig>>>,
}

/// The first byte of a TLS record carrying a handshake (the ClientHello). A plain control
/// connection starts with its `hello` frame's 2-byte length, whose first byte is 0x00..=0x03
/// for any valid `hello` (far below 0x1600 bytes).
pub(super) const TLS_HANDSHAKE: u8 = 0x16;

/// The crypto provider both ends use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and key into a TLS 1.3 server configuration. The error names
/// the file and what is wrong with it.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    // The shared port's ALPN names (a client that offers none is a control client); media
    // connections go to kernel TLS after the handshake, so nothing may follow the handshake
    // from our side (no session tickets) and the secrets must be extractable.
    config.alpn_protocols = vec![
        super::demux::ALPN_CONTROL.to_vec(),
        super::demux::ALPN_MEDIA.to_vec(),
        // A browser's wss:// media leg (the shared port sorts it by its request path).
        super::demux::ALPN_HTTP1.to_vec(),
    ];
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Binds the TLS control listener when `[tls]` names a certificate.
pub(super) async fn listen(
    cfg: &Config,
) -> Result<(Option<TcpListener>, Option<TlsState>), ServeError> {
    let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) else {
        return Ok((None, None));
    };
    let config = server_config(cert, key).map_err(|e| {
        ServeError::Runtime(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })?;
    let listener =
        super::bind_tcp(SocketAddr::new(cfg.server.listen, cfg.tls.control_port)).await?;
    tracing::info!(
        addr = %listener.local_addr().map_err(ServeError::Runtime)?,
        cert = %cert.display(),
        plain_control = cfg.tls.plain_control,
        "TLS control listener"
    );
    let shared = cfg.tls.shared_port(&cfg.server);
    if shared {
        tracing::info!("plain and TLS control share this port (told apart by the first byte)");
    }
    Ok((
        Some(listener),
        Some(TlsState {
            config,
            shared,
            web: None,
        }),
    ))
}

pub(super) async fn acceptor(listener: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if events.send(Event::AcceptedTls(stream, peer)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("accept on the TLS control port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Server {
    /// A connection on the TLS listener: admitted (or refused) first, then its handshake runs
    /// in a task of its own.
    pub(super) fn on_tls_accepted(&mut self, now: Instant, stream: TcpStream, peer: SocketAddr) {
        let Some(state) = &self.tls else {
            return;
        };
        let source = match self.limits.admit(canonical(peer).ip()) {
            Ok(s) => s,
            // Refused before any TLS: the refusal frame would not be understood, so just close.
            Err(why) => {
                drop(stream);
                if let Some((by_source, at_capacity)) = self.limits.note_refusal(now, why) {
                    tracing::warn!(
                        by_source,
                        at_capacity,
                        last_peer = %canonical(peer),
                        "TLS control connections refused at accept (counts since the last such line)"
                    );
                }
                return;
            }
        };
        let conn = self.next_conn;
        self.next_conn = crate::control::records::next_id(conn);
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(state.config.clone());
        let events = self.events.clone();
        let shared = state.shared;
        let handshake = tokio::spawn(async move {
            // Ok(handshake result) or Err(the stream, for the plain path; None: it closed).
            let work = async {
                if shared {
                    let mut first = [0u8; 1];
                    match stream.peek(&mut first).await {
                        Ok(1) if first[0] == TLS_HANDSHAKE => {}
                        Ok(1) => return Err(Some(stream)),
                        _ => return Err(None),
                    }
                }
                Ok(acceptor.accept(stream).await.map_err(|e| e.to_string()))
            };
            let ev = match tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
                Ok(Ok(result)) => Event::TlsReady {
                    conn,
                    result: result.map(Box::new),
                },
                Ok(Err(Some(stream))) => Event::PlainOnShared { conn, stream },
                Ok(Err(None)) => Event::TlsReady {
                    conn,
                    result: Err("closed before its first byte".to_owned()),
                },
                Err(_) => Event::TlsReady {
                    conn,
                    result: Err("the TLS handshake timed out".to_owned()),
                },
            };
            let _ = events.send(ev).await;
        });
        self.io.insert(
            conn,
            ConnIo {
                source,
                reader: handshake.abort_handle(),
            },
        );
    }

    /// The handshake ended: the connection reaches the core with its channel binding, or its
    /// slot comes back.
    pub(super) fn on_tls_ready(
        &mut self,
        now: Instant,
        conn: ConnId,
        result: Result<Box<ServerStream>, String>,
    ) {
        let stream = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(conn, "TLS handshake failed: {e}");
                self.release(conn);
                return;
            }
        };
        let Some(io) = self.io.get_mut(&conn) else {
            return;
        };
        let (tcp, session) = stream.get_ref();
        let peer = tcp.peer_addr();
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
        let mut exporter = vec![0u8; TLS_EXPORTER_LEN];
        let exported =
            session.export_keying_material(&mut exporter[..], TLS_EXPORTER_LABEL, Some(b""));
        let (Ok(peer), Ok(_)) = (peer, exported) else {
            self.release(conn);
            return;
        };
        let (rd, wr) = tokio::io::split(*stream);
        let rate = ReadRate {
            rate: crate::control::limits::Rate {
                burst: self.cfg.limits.message_burst,
                per_s: self.cfg.limits.messages_per_s,
            },
            close_after: Duration::from_secs(self.cfg.limits.flood_close_s),
        };
        io.reader = tokio::spawn(conn_reader(conn, rd, self.events.clone(), rate)).abort_handle();
        self.writers
            .insert(conn, super::writer::ControlWrite::Tls(wr));
        self.gateway.handle(
            now,
            Input::Connected {
                conn,
                peer: canonical(peer),
                local: canonical(local),
            },
        );
        self.gateway
            .handle(now, Input::TlsChannel { conn, exporter });
    }

    /// A plain control connection on the shared port (already admitted): as on the plain
    /// listener.
    pub(super) fn on_plain_on_shared(&mut self, now: Instant, conn: ConnId, stream: TcpStream) {
        let Some(io) = self.io.get_mut(&conn) else {
            return;
        };
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
            self.release(conn);
            return;
        };
        let (rd, wr) = stream.into_split();
        let rate = ReadRate {
            rate: crate::control::limits::Rate {
                burst: self.cfg.limits.message_burst,
                per_s: self.cfg.limits.messages_per_s,
            },
            close_after: Duration::from_secs(self.cfg.limits.flood_close_s),
        };
        io.reader = tokio::spawn(conn_reader(conn, rd, self.events.clone(), rate)).abort_handle();
        self.writers.insert(conn, wr);
        self.gateway.handle(
            now,
            Input::Connected {
                conn,
                peer: canonical(peer),
                local: canonical(local),
            },
        );
    }

    /// SIGHUP: read the certificate and key again; handshakes from now on use them, sessions
    /// already established are untouched. A file that does not load keeps the old pair.
    pub(super) fn reload_tls(&mut self) {
        let (Some(state), Some(cert), Some(key)) =
            (&mut self.tls, &self.cfg.tls.cert, &self.cfg.tls.key)
        else {
            return;
        };
        match server_config(cert, key) {
            Ok(config) => {
                if let Some(web) = &state.web {
                    web.send_replace(super::web::https::for_http(&config));
                }
                state.config = config;
                tracing::info!(cert = %cert.display(), web = state.web.is_some(), "SIGHUP: TLS certificate reloaded; established connections keep theirs");
            }
            Err(e) => {
                tracing::error!("SIGHUP: TLS certificate not reloaded, keeping the old one: {e}")
            }
        }
    }
}
