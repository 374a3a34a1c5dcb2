//! HTTP CONNECT proxies (RFC 9110 §9.3.6): a phone whose only way out is a proxy tunnels its
//! control connection and its TCP media connections through it.
//!
//! `--proxy http://[USER:PASS@]HOST[:PORT]` (default port 8080), else the `https_proxy` /
//! `HTTPS_PROXY` environment variables (not for loopback destinations, nor for hosts listed in
//! `no_proxy` / `NO_PROXY`). Credentials come from the URL or `--proxy-user` (its password from
//! a file or the `VOXGATE_PROXY_PASSWORD` environment variable, never from argv alone) and are
//! sent (`Proxy-Authorization: Basic`) only after the proxy answered 407.
//!
//! Written by hand: a CONNECT client is one request and one bounded response head; the crates
//! that do it bring an HTTP stack the phone does not otherwise need.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest response head read from a proxy.
pub const MAX_RESPONSE_HEAD: usize = 8192;
/// A proxy's port when the URL names none.
pub const DEFAULT_PROXY_PORT: u16 = 8080;

/// An HTTP proxy to tunnel through. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub host: String,
    pub port: u16,
    /// User and password, sent when the proxy asks (407).
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u.as_str()))
            .finish()
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a bad %-escape in the proxy URL's credentials".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy URL's credentials are not UTF-8".into())
}

impl ProxyConfig {
    /// Parses `http://[USER:PASS@]HOST[:PORT][/]` (the scheme may be left out).
    pub fn parse(url: &str) -> Result<ProxyConfig, String> {
        let bad =
            |why: &str| format!("bad proxy URL: {why} (expected http://[USER:PASS@]HOST[:PORT])");
        let rest = match url.trim().split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme {scheme:?} is not supported, only http"
                )));
            }
            None => url.trim(),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad("a path is not allowed"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                Some((percent_decode(user)?, percent_decode(pass)?))
            }
            None => None,
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (ip, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => DEFAULT_PROXY_PORT,
                None => return Err(bad("junk after ]")),
            };
            (ip.to_owned(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
                None => (hostport.to_owned(), DEFAULT_PROXY_PORT),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(bad("no host"));
        }
        Ok(ProxyConfig {
            host,
            port,
            credentials,
        })
    }

    /// The proxy from `https_proxy` / `HTTPS_PROXY` for a connection to `host`, unless `host`
    /// is loopback or matches `no_proxy` / `NO_PROXY`.
    pub fn from_env(host: &str) -> Result<Option<ProxyConfig>, String> {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let Some(url) = var(["https_proxy", "HTTPS_PROXY"]) else {
            return Ok(None);
        };
        if bypass(host, var(["no_proxy", "NO_PROXY"]).as_deref()) {
            return Ok(None);
        }
        ProxyConfig::parse(&url)
            .map(Some)
            .map_err(|e| format!("https_proxy: {e}"))
    }
}

/// Whether `host` goes around an environment proxy: loopback, or listed in `no_proxy`
/// (`*`, exact names, `.suffix` or `suffix` domain matches, IP addresses).
pub fn bypass(host: &str, no_proxy: Option<&str>) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    {
        return true;
    }
    let host = host.to_ascii_lowercase();
    no_proxy.unwrap_or("").split(',').any(|e| {
        let e = e.trim().to_ascii_lowercase();
        let e = e.trim_start_matches('.');
        !e.is_empty() && (e == "*" || host == e || host.ends_with(&format!(".{e}")))
    })
}

/// Opens a TCP connection to `target` (`HOST:PORT` as the proxy should dial it) through
/// `proxy`, asking with credentials only after a 407. The stream returned is the tunnel.
pub async fn connect(
    proxy: &ProxyConfig,
    target: &str,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let attempt = |auth: Option<String>| async move {
        tokio::time::timeout(timeout, connect_once(proxy, target, auth.as_deref()))
            .await
            .map_err(|_| {
                format!(
                    "the proxy {}:{} did not answer in time",
                    proxy.host, proxy.port
                )
            })?
    };
    match attempt(None).await? {
        Answer::Tunnel(s) => Ok(s),
        Answer::AuthRequired => {
            let Some((user, pass)) = &proxy.credentials else {
                return Err(format!(
                    "the proxy {}:{} requires authentication (407); give credentials in the \
                     proxy URL or --proxy-user",
                    proxy.host, proxy.port
                ));
            };
            let token = BASE64.encode(format!("{user}:{pass}"));
            match attempt(Some(token)).await? {
                Answer::Tunnel(s) => Ok(s),
                Answer::AuthRequired => Err(format!(
                    "the proxy {}:{} refused the credentials of {user:?} (407)",
                    proxy.host, proxy.port
                )),
            }
        }
    }
}

enum Answer {
    Tunnel(TcpStream),
    AuthRequired,
}

async fn connect_once(
    proxy: &ProxyConfig,
    target: &str,
    auth: Option<&str>,
) -> Result<Answer, String> {
    let mut s = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| {
            format!(
                "cannot connect to the proxy {}:{}: {e}",
                proxy.host, proxy.port
            )
        })?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(token) = auth {
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("proxy: {e}"))?;
    // Read the head one byte at a time: nothing past it may be consumed (it is the tunnel's).
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(format!(
                "the proxy's answer is longer than {MAX_RESPONSE_HEAD} bytes"
            ));
        }
        let b = s.read_u8().await.map_err(|e| {
            format!("the proxy closed the connection before answering CONNECT: {e}")
        })?;
        head.push(b);
    }
    match parse_status(&head)? {
        200..=299 => Ok(Answer::Tunnel(s)),
        407 => Ok(Answer::AuthRequired),
        _ => Err(format!(
            "the proxy refused to tunnel to {target}: {}",
            status_line(&head)
        )),
    }
}

fn status_line(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line).chars().take(200).collect()
}

/// The status code of an HTTP/1.x response head.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line = status_line(head);
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && code.len() == 3 => code
            .parse()
            .map_err(|_| format!("the proxy's answer is not HTTP: {line:?}")),
        _ => Err(format!("the proxy's answer is not HTTP: {line:?}")),
    }
}

/// `HOST:PORT` for a CONNECT request (IPv6 in brackets).
pub fn target(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls() {
        let p = ProxyConfig::parse("http://u%40x:p%3Aw@proxy.example:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 3128));
        assert_eq!(p.credentials, Some(("u@x".into(), "p:w".into())));
        assert!(!format!("{p:?}").contains("p:w"));
        let p = ProxyConfig::parse("[::1]:8888").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.credentials),
            ("::1", 8888, None)
        );
        assert_eq!(
            ProxyConfig::parse("proxy").unwrap().port,
            DEFAULT_PROXY_PORT
        );
        for bad in [
            "socks5://p:1",
            "http://p:x",
            "http://p/path",
            "http://",
            "http://u@",
        ] {
            assert!(ProxyConfig::parse(bad).is_err(), "{bad}");
        }
        assert!(bypass("127.0.0.1", None));
        assert!(bypass("[::1]", None));
        assert!(bypass("gw.corp.example", Some("x, .corp.example")));
        assert!(bypass("corp.example", Some("corp.example")));
        assert!(!bypass("notcorp.example", Some("corp.example")));
        assert!(!bypass("gw.example", Some("")));
        assert_eq!(parse_status(b"HTTP/1.1 407 Proxy Auth\r\n\r\n"), Ok(407));
        assert_eq!(parse_status(b"HTTP/1.0 200\r\n\r\n"), Ok(200));
        assert!(parse_status(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,120}", b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ProxyConfig::parse(&s);
            let _ = bypass(&s, Some(&s));
            let _ = parse_status(&b);
            let _ = percent_decode(&s);
        }
    }
}
