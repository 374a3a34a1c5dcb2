//! HTTPS on the web listener (`[web] https = true`): the same pages, API and WebSocket control
//! bridge, over TLS 1.3 with the control channel's certificate (`[tls] cert`/`key`, loaded by
//! `server::tls::server_config`), ALPN `http/1.1`.
//!
//! A connection takes its place under `[web] max_connections` when it is accepted (the handshake
//! is work the cap bounds), handshakes in a task of its own under a time limit (a slow or silent
//! client holds only its own place, never the accept loop), and reaches axum only once the
//! handshake is done. The idle time-out of `listener::Conn` applies to the handshake too.
//!
//! The certificate is reloaded on SIGHUP with the control listener's (`Server::reload_tls`
//! sends the new configuration through a watch channel): each handshake takes the latest, and
//! connections already open keep the session they have.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::ServerConfig;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::listener::{Conn, Limited, Peer};

/// A handshake that has not finished by then is dropped (and its place given back).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control channel's TLS configuration, for HTTP/1.1 (ALPN `http/1.1`).
pub fn for_http(control: &ServerConfig) -> Arc<ServerConfig> {
    let mut c = control.clone();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// Connections whose TLS handshake is done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Conn>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `inner` (holding its connection cap) and handshakes each connection in a
    /// task of its own.
    pub fn new(
        mut inner: Limited,
        config: watch::Receiver<Arc<ServerConfig>>,
    ) -> io::Result<TlsListener> {
        use axum::serve::Listener;
        let local = inner.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (conn, peer) = inner.accept().await;
                // The configuration as of this connection (a SIGHUP may have replaced it).
                let acceptor = TlsAcceptor::from(config.borrow().clone());
                let done = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "web TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "web TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Conn>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task never ends while this listener lives (it holds the receiver).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}
