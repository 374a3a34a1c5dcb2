//! The control protocol over a WebSocket (`GET /control`), for the log-in page.
//!
//! One WebSocket text message carries one control message (the JSON body of a TCP frame,
//! docs/PROTOCOL.md "Framing"). The bridge does not interpret them: it turns each connection
//! into an ordinary control connection, a loopback TCP pair whose server end the control loop
//! takes exactly as it takes an accepted TCP connection, with the browser's address as the
//! peer (so per-source limits, log-in rate limits and the message rate apply as on TCP). The
//! core has one code path for both transports.
//!
//! Media: the connection's `local` address is the loopback pair's, so `gateway_tcp` in media
//! instructions names the gateway's loopback address. The bridge therefore adds `gateway_ws` to
//! every `media` message it passes to the page: a `ws://` URL on the host the page itself used
//! (its `Host` header) and the port of `gateway_tcp`, the shard's TCP media listener, which
//! speaks WebSocket beside RFC 4571 (`shard::relay::ws`). The page binds its leg there.

use std::net::SocketAddr;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{WebState, field_error};
use crate::wire::control::MAX_MESSAGE;

/// Hands a new control connection (server end, browser's address) to the control loop.
pub type Bridge = mpsc::Sender<(TcpStream, SocketAddr)>;

/// `true` when the request has no `Origin` or one naming the host it was sent to (a page of
/// another site may not open a control connection in its visitor's name).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let o = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    o == Some(host)
}

pub async fn upgrade(
    State(state): State<WebState>,
    ConnectInfo(super::listener::Peer(peer)): ConnectInfo<super::listener::Peer>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_of)
        .map(str::to_owned);
    let Some(bridge) = state.bridge.clone() else {
        return field_error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "the control protocol is not available here",
        );
    };
    if !same_origin(&headers) {
        return field_error(
            StatusCode::FORBIDDEN,
            None,
            "cross-origin control connection",
        );
    }
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = run(socket, peer, bridge, host).await {
                tracing::debug!(%peer, "web control connection: {e}");
            }
        })
        .into_response()
}

/// A connected loopback TCP pair: (the control loop's end, the bridge's end).
async fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ours = TcpStream::connect(l.local_addr()?).await?;
    loop {
        let (theirs, from) = l.accept().await?;
        // Only our own connection: anything else that raced to this port is dropped.
        if from == ours.local_addr()? {
            return Ok((theirs, ours));
        }
    }
}

/// The host part of a `Host` header (`name`, `1.2.3.4`, `[v6]`), if it is made only of the
/// characters a host name or address can have (it goes into a URL the page opens).
fn host_of(h: &str) -> Option<&str> {
    let host = if h.starts_with('[') {
        &h[..=h.find(']')?]
    } else {
        h.split(':').next()?
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    ok.then_some(host)
}

/// A `media` message for the page, with `gateway_ws` added (see the module docs); any other
/// message unchanged.
fn for_page(text: String, host: Option<&str>) -> String {
    if !text.contains("\"media\"") {
        return text;
    }
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return text;
    };
    if v["type"] != "media" {
        return text;
    }
    let Some(tcp) = v["gateway_tcp"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return text;
    };
    let ip = match tcp.ip() {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    };
    let host = host.map_or(ip, str::to_owned);
    // TLS media on the single port: wss:// there, with the leg in the path (the port hands
    // the connection to the shard holding that leg before anything is answered).
    let scheme = if v["gateway_tcp_tls"] == true {
        "wss"
    } else {
        "ws"
    };
    let path = match v["leg"].as_str() {
        Some(leg) if !leg.is_empty() && leg.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            format!("/media/{leg}")
        }
        _ => "/media".to_owned(),
    };
    v["gateway_ws"] = format!("{scheme}://{host}:{}{path}", tcp.port()).into();
    v.to_string()
}

async fn run(
    mut ws: WebSocket,
    peer: SocketAddr,
    bridge: Bridge,
    host: Option<String>,
) -> std::io::Result<()> {
    let (theirs, ours) = pair().await?;
    ours.set_nodelay(true)?;
    bridge
        .send((theirs, peer))
        .await
        .map_err(|_| std::io::Error::other("the control loop is gone"))?;
    let (mut rd, mut wr) = ours.into_split();
    // The control loop's messages, one frame each, become text messages.
    let (to_ws, mut from_loop) = mpsc::channel::<String>(16);
    let reader = tokio::spawn(async move {
        let mut body = Vec::new();
        loop {
            let mut h = [0u8; 2];
            if rd.read_exact(&mut h).await.is_err() {
                return;
            }
            body.resize(usize::from(u16::from_be_bytes(h)), 0);
            if rd.read_exact(&mut body).await.is_err() {
                return;
            }
            let text = for_page(String::from_utf8_lossy(&body).into_owned(), host.as_deref());
            if to_ws.send(text).await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        tokio::select! {
            m = ws.recv() => {
                let bytes = match m {
                    Some(Ok(Message::Text(t))) => t.as_str().as_bytes().to_vec(),
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break Ok(()),
                    Some(Err(e)) => break Err(std::io::Error::other(e)),
                };
                // Empty or oversized: framed as is, so that the control loop refuses it with
                // the same error a TCP client gets (its length is checked there).
                let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
                let mut frame = Vec::with_capacity(2 + bytes.len());
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend_from_slice(&bytes[..usize::from(len).min(bytes.len())]);
                if wr.write_all(&frame).await.is_err() {
                    break Ok(());
                }
            }
            out = from_loop.recv() => match out {
                Some(text) => {
                    if ws.send(Message::Text(text.into())).await.is_err() {
                        break Ok(());
                    }
                }
                // The control loop closed the connection (after a refusal, a bye, a time-out).
                None => {
                    let _ = ws.send(Message::Close(None)).await;
                    break Ok(());
                }
            },
        }
    };
    reader.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_messages_get_a_websocket_address() {
        assert_eq!(host_of("127.0.0.1:7481"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:7481"), Some("[::1]"));
        assert_eq!(host_of("gw.example.org"), Some("gw.example.org"));
        assert_eq!(host_of("evil\"/x"), None);
        let m = r#"{"type":"media","call":4,"caller":true,"gateway_tcp":"127.0.0.1:7402","payload_type":0}"#;
        let v: serde_json::Value =
            serde_json::from_str(&for_page(m.into(), Some("gw.example.org"))).unwrap();
        assert_eq!(v["gateway_ws"], "ws://gw.example.org:7402/media");
        assert_eq!(v["call"], 4);
        let v: serde_json::Value = serde_json::from_str(&for_page(m.into(), None)).unwrap();
        assert_eq!(v["gateway_ws"], "ws://127.0.0.1:7402/media");
        // With a leg: its name in the path; with TLS media on the single port: wss://.
        let m = r#"{"type":"media","call":4,"caller":true,"leg":"00ff","gateway_tcp":"127.0.0.1:443","payload_type":0}"#;
        let v: serde_json::Value =
            serde_json::from_str(&for_page(m.into(), Some("gw.example.org"))).unwrap();
        assert_eq!(v["gateway_ws"], "ws://gw.example.org:443/media/00ff");
        let m = r#"{"type":"media","call":4,"caller":true,"leg":"00ff","gateway_tcp":"127.0.0.1:443","gateway_tcp_tls":true,"payload_type":0}"#;
        let v: serde_json::Value =
            serde_json::from_str(&for_page(m.into(), Some("gw.example.org"))).unwrap();
        assert_eq!(v["gateway_ws"], "wss://gw.example.org:443/media/00ff");
        // Without a TCP media address (no leg through the gateway), and other messages: as is.
        let direct = r#"{"type":"media","call":4}"#;
        assert_eq!(for_page(direct.into(), Some("h")), direct);
        let other = r#"{"type":"incoming","from_user":"media"}"#;
        assert_eq!(for_page(other.into(), Some("h")), other);
    }

    #[test]
    fn origins() {
        let h = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(k.clone(), v.parse().unwrap());
            }
            m
        };
        assert!(same_origin(&h(&[(header::HOST, "127.0.0.1:7481")])));
        assert!(same_origin(&h(&[
            (header::HOST, "127.0.0.1:7481"),
            (header::ORIGIN, "http://127.0.0.1:7481")
        ])));
        assert!(!same_origin(&h(&[
            (header::HOST, "127.0.0.1:7481"),
            (header::ORIGIN, "https://evil.example")
        ])));
        assert!(!same_origin(&h(&[(
            header::ORIGIN,
            "http://127.0.0.1:7481"
        )])));
    }
}
