//! TLS for the softphone's control connection: the gateway's certificate is verified against
//! the system's roots or a CA file (`--ca`), and the session's RFC 9266 `tls-exporter` value
//! binds the SCRAM log-in to this very TLS session (see `control::auth`).
//!
//! Server forms: `tls://HOST[:PORT]` (default port [`DEFAULT_TLS_PORT`]) or `--tls` with a
//! plain `HOST[:PORT]`. The name checked in the certificate is HOST (a DNS name, or an IP
//! address in the certificate's IP subject alternative names).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::control::auth::{TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN};

/// The gateway's TLS control port by default (`[tls] control_port`).
pub const DEFAULT_TLS_PORT: u16 = 7443;

/// A TLS control connection on the phone's side.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How the phone verifies the gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Trust only the CAs in this PEM file; `None`: the system's roots.
    pub ca: Option<PathBuf>,
}

/// Splits off a `tls://` prefix: `(rest, true)` when present.
pub fn strip_scheme(server: &str) -> (&str, bool) {
    match server.trim().strip_prefix("tls://") {
        Some(rest) => (rest, true),
        None => (server, false),
    }
}

/// The client configuration: TLS 1.3 only (the `tls-exporter` binding needs it), roots from
/// `opts.ca` or the system.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca {
        Some(path) => {
            let certs = load_certs(path)?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(
                    "no trusted CA certificates found on this system; name one with --ca FILE"
                        .into(),
                );
            }
        }
    }
    let config = ClientConfig::builder_with_provider(crate::server::tls_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("CA file {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "CA file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// Runs the TLS handshake over `tcp` for `host`; the error says what was wrong with the
/// gateway's certificate.
pub async fn handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<ClientConfig>,
) -> Result<ClientStream, String> {
    let name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| format!("{host:?} is not a name TLS can verify: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector.connect(name, tcp).await.map_err(|e| {
        let inner = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned();
        match inner {
            Some(rustls::Error::InvalidCertificate(why)) => format!(
                "the gateway's TLS certificate is not trusted ({why:?}): it is not signed by a \
                 CA this phone trusts (--ca FILE names one), or it is not for {host}; refusing \
                 to log in"
            ),
            _ => format!("TLS handshake with the gateway failed: {e}"),
        }
    })
}

/// TLS on TCP media legs (the gateway's `gateway_tcp_tls`): verified like the control
/// channel, against `opts` for `host` (the name the phone dialled the gateway by).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MediaTls {
    pub opts: TlsOptions,
    pub host: String,
}

/// The ALPN name of a TLS media connection (`server::demux::ALPN_MEDIA`).
pub const ALPN_MEDIA: &[u8] = b"voxgate-media";

/// Runs TLS (ALPN `voxgate-media`) over a connected media stream and returns a local stream
/// that carries the same bytes in the clear: the media engine reads and writes RFC 4571 frames
/// on it as on a plain connection, and a task relays them through the TLS session. (The
/// phone's side copies once more per packet; the gateway's shard does not.)
pub async fn media_tunnel(tcp: TcpStream, tls: &MediaTls) -> Result<TcpStream, String> {
    let mut cfg = (*client_config(&tls.opts)?).clone();
    cfg.alpn_protocols = vec![ALPN_MEDIA.to_vec()];
    let mut s = handshake(tcp, &tls.host, Arc::new(cfg)).await?;
    if s.get_ref().1.alpn_protocol() != Some(ALPN_MEDIA) {
        return Err("the gateway did not take TLS media (no ALPN voxgate-media)".into());
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("local media relay: {e}"))?;
    let near = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("local media relay: {e}"))?;
    let (mut far, from) = l.accept().await.map_err(|e| e.to_string())?;
    if near.local_addr().ok() != Some(from) {
        return Err("local media relay: a stranger connected first".into());
    }
    let _ = near.set_nodelay(true);
    let _ = far.set_nodelay(true);
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut s, &mut far).await;
    });
    Ok(near)
}

/// The RFC 9266 `tls-exporter` value of an established session.
pub fn exporter(stream: &ClientStream) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; TLS_EXPORTER_LEN];
    stream
        .get_ref()
        .1
        .export_keying_material(&mut out[..], TLS_EXPORTER_LABEL, Some(b""))
        .map_err(|e| format!("TLS exporter: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server on loopback with a certificate for `localhost` signed by a fresh CA, which
    /// selects `alpn` (none: it offers no ALPN). Returns its port and the CA file.
    async fn media_server(
        dir: &Path,
        alpn: Option<&[u8]>,
    ) -> (u16, PathBuf, tokio::task::JoinHandle<()>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_file = dir.join(format!("ca-{}.pem", rand::random::<u32>()));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(crate::server::tls_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            while let Ok((s, _)) = l.accept().await {
                let Ok(mut s) = acceptor.accept(s).await else {
                    continue;
                };
                // An echo of one message.
                let mut b = [0u8; 64];
                if let Ok(n) = s.read(&mut b).await {
                    let _ = s.write_all(&b[..n]).await;
                }
            }
        });
        (port, ca_file, task)
    }

    #[tokio::test]
    async fn media_tunnel_verifies_the_gateway_and_carries_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (port, ca, task) = media_server(dir.path(), Some(ALPN_MEDIA)).await;
        let tls = |ca: &Path| MediaTls {
            opts: TlsOptions {
                ca: Some(ca.to_owned()),
            },
            host: "localhost".into(),
        };
        let connect = || TcpStream::connect(("127.0.0.1", port));
        // The right CA: plain bytes in, the same bytes back through TLS.
        let mut s = media_tunnel(connect().await.unwrap(), &tls(&ca))
            .await
            .unwrap();
        s.write_all(b"\x00\x04ping").await.unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"\x00\x04ping");
        // Another CA: refused, and the error says why.
        let (_, other_ca, other) = media_server(dir.path(), Some(ALPN_MEDIA)).await;
        let e = media_tunnel(connect().await.unwrap(), &tls(&other_ca))
            .await
            .unwrap_err();
        assert!(e.contains("certificate is not trusted"), "{e}");
        // The right name is checked too.
        let mut wrong_name = tls(&ca);
        wrong_name.host = "gateway.example".into();
        let e = media_tunnel(connect().await.unwrap(), &wrong_name)
            .await
            .unwrap_err();
        assert!(e.contains("not trusted"), "{e}");
        // A server that does not select voxgate-media is no media endpoint.
        let (port2, ca2, plain) = media_server(dir.path(), None).await;
        let e = media_tunnel(
            TcpStream::connect(("127.0.0.1", port2)).await.unwrap(),
            &tls(&ca2),
        )
        .await
        .unwrap_err();
        assert!(e.contains("voxgate-media"), "{e}");
        for t in [task, other, plain] {
            t.abort();
        }
    }

    #[test]
    fn scheme_and_missing_ca_files() {
        assert_eq!(strip_scheme("tls://gw:7443"), ("gw:7443", true));
        assert_eq!(strip_scheme("gw:7400"), ("gw:7400", false));
        let e = client_config(&TlsOptions {
            ca: Some("/nonexistent/ca.pem".into()),
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let e = client_config(&TlsOptions {
            ca: Some(empty.path().into()),
        })
        .unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
