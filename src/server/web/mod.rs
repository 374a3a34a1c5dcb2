//! The web listener: the registration page (the seed's Fig. 3a) and the admin REST API.
//!
//! It runs as tasks on the control thread's tokio runtime (axum over hyper), never on a shard.
//! Every directory access runs in `tokio::task::spawn_blocking` with a store connection of its
//! own (the same factory the look-up workers use), so a slow store never blocks the runtime.
//!
//! The page computes the SCRAM-SHA-256 verifier with WebCrypto and sends only salt,
//! iterations, StoredKey and ServerKey: the password never leaves the browser. The server
//! applies the same validation (and returns the same error texts) as `voxgate user add`, as
//! JSON `{field, message}`.
//!
//! Plain HTTP ([`spawn`]) belongs on loopback or behind a TLS-terminating proxy; with
//! `[web] https = true` the same [`router`] is served over TLS ([`spawn_https`], `https`).

// Handlers return axum `Response`s as their error values (the answer to send): idiomatic, and
// never on a hot path.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod control;
pub mod db;
pub mod https;
pub mod limit;
pub mod listener;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Registration;
use crate::directory::{SALT_LEN, Verifier};
use crate::server::lookup::StoreFactory;
use crate::store::StoreError;

/// Shortest admin token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Largest request body the web listener reads.
pub const MAX_BODY: usize = 16 * 1024;
/// Shortest password the page accepts (the same as `voxgate user add`).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Smallest estimated password entropy the page accepts, in bits.
pub const MIN_PASSWORD_BITS: u32 = 40;

/// Every route the listener serves: (method, path). The OpenAPI file (`docs/openapi.yaml`)
/// documents exactly these (a test checks both ways, against the running server too).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/register.js"),
    ("GET", "/scram.js"),
    ("GET", "/style.css"),
    ("GET", "/login"),
    ("GET", "/login.js"),
    ("GET", "/phone.js"),
    ("GET", "/control"),
    ("GET", "/api/v1/register"),
    ("POST", "/api/v1/register"),
    ("GET", "/api/v1/subscribers"),
    ("POST", "/api/v1/subscribers"),
    ("DELETE", "/api/v1/subscribers/{user}"),
    ("GET", "/api/v1/routes"),
    ("POST", "/api/v1/routes"),
    ("DELETE", "/api/v1/routes/{prefix}"),
];

const REGISTER_HTML: &str = include_str!("../../../web/register.html");
const REGISTER_JS: &str = include_str!("../../../web/register.js");
const SCRAM_JS: &str = include_str!("../../../web/scram.js");
const STYLE_CSS: &str = include_str!("../../../web/style.css");
const LOGIN_HTML: &str = include_str!("../../../web/login.html");
const LOGIN_JS: &str = include_str!("../../../web/login.js");
const PHONE_JS: &str = include_str!("../../../web/phone.js");

/// Numbers the page may assign: E.164 or local, both ends the same length and form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumberRange {
    plus: bool,
    digits: usize,
    lo: u64,
    hi: u64,
}

impl NumberRange {
    /// `""` (no range) or `"+1555010000-+1555019999"`.
    pub fn parse(s: &str) -> Result<Option<NumberRange>, String> {
        if s.trim().is_empty() {
            return Ok(None);
        }
        let (a, b) = s.split_once('-').ok_or_else(|| {
            format!("{s:?}: expected FIRST-LAST, e.g. \"+1555010000-+1555019999\"")
        })?;
        let (a, b) = (a.trim(), b.trim());
        for n in [a, b] {
            if let Some(why) = crate::directory::number_problem(n, false) {
                return Err(format!("{n:?}: {why}"));
            }
        }
        let (pa, da) = (a.starts_with('+'), a.trim_start_matches('+'));
        let (pb, db) = (b.starts_with('+'), b.trim_start_matches('+'));
        if pa != pb || da.len() != db.len() {
            return Err(format!(
                "{a:?} and {b:?} must both be E.164 or both local, with as many digits"
            ));
        }
        let (lo, hi): (u64, u64) = (
            da.parse().map_err(|e| format!("{a:?}: {e}"))?,
            db.parse().map_err(|e| format!("{b:?}: {e}"))?,
        );
        if lo > hi {
            return Err(format!("{a:?} comes after {b:?}"));
        }
        Ok(Some(NumberRange {
            plus: pa,
            digits: da.len(),
            lo,
            hi,
        }))
    }

    fn format(&self, n: u64) -> String {
        format!(
            "{}{:0width$}",
            if self.plus { "+" } else { "" },
            n,
            width = self.digits
        )
    }

    /// The first number of the range not in `taken` (checks at most `taken.len() + 1`).
    pub fn first_free(&self, taken: &std::collections::HashSet<String>) -> Option<String> {
        (self.lo..=self.hi)
            .take(taken.len().saturating_add(1))
            .map(|n| self.format(n))
            .find(|n| !taken.contains(n))
    }
}

impl std::fmt::Display for NumberRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.format(self.lo), self.format(self.hi))
    }
}

/// What the web tasks share.
#[derive(Clone)]
pub struct WebState {
    pub store: StoreFactory,
    /// `web.db` in the data directory (invitation codes, personal information).
    pub web_db: PathBuf,
    pub registration: Registration,
    pub number_range: Option<NumberRange>,
    /// PBKDF2 iterations the page must use (at least; `[auth] scram_iterations`).
    pub iterations: u32,
    /// SHA-256 of each admin token (compared in constant time).
    pub token_hashes: Arc<Vec<[u8; 32]>>,
    /// Registration attempts per source.
    pub attempts: Arc<std::sync::Mutex<limit::AttemptLimit>>,
    /// Where WebSocket control connections go (`None`: `/control` is unavailable).
    pub bridge: Option<control::Bridge>,
}

impl WebState {
    /// `true` when `headers` carry `Authorization: Bearer <one of the tokens>`.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let h: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut ok = subtle::Choice::from(0);
        for t in self.token_hashes.iter() {
            ok |= t.ct_eq(&h);
        }
        ok.into()
    }
}

/// The admin tokens: the config's, and the lines of `file` (blank lines and `#` comments
/// skipped). Each at least [`MIN_TOKEN_LEN`] characters.
pub fn load_tokens(cfg: &crate::config::WebSection) -> Result<Vec<[u8; 32]>, String> {
    let mut tokens: Vec<String> = cfg.admin_tokens.clone();
    if let Some(f) = &cfg.admin_token_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("web.admin_token_file {}: {e}", f.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if let Some(t) = tokens.iter().find(|t| t.len() < MIN_TOKEN_LEN) {
        return Err(format!(
            "an admin token of {} characters: at least {MIN_TOKEN_LEN}",
            t.len()
        ));
    }
    Ok(tokens
        .iter()
        .map(|t| Sha256::digest(t.as_bytes()).into())
        .collect())
}

/// The listener's routes (exactly [`ROUTES`]).
pub fn router(state: WebState) -> Router {
    let page = |ct: &'static str, body: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, ct),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
        })
    };
    Router::new()
        .route("/", page("text/html; charset=utf-8", REGISTER_HTML))
        .route(
            "/register.js",
            page("text/javascript; charset=utf-8", REGISTER_JS),
        )
        .route(
            "/scram.js",
            page("text/javascript; charset=utf-8", SCRAM_JS),
        )
        .route("/style.css", page("text/css; charset=utf-8", STYLE_CSS))
        .route("/login", page("text/html; charset=utf-8", LOGIN_HTML))
        .route(
            "/login.js",
            page("text/javascript; charset=utf-8", LOGIN_JS),
        )
        .route(
            "/phone.js",
            page("text/javascript; charset=utf-8", PHONE_JS),
        )
        .route("/control", get(control::upgrade))
        .route("/api/v1/register", get(register_params).post(register))
        .route(
            "/api/v1/subscribers",
            get(api::list_subscribers).post(api::add_subscriber),
        )
        .route("/api/v1/subscribers/{user}", delete(api::del_subscriber))
        .route("/api/v1/routes", get(api::list_routes).post(api::add_route))
        .route("/api/v1/routes/{prefix}", delete(api::del_route))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Binds the web listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the pages and the API on `listener` until the runtime ends, with at most
/// `max_connections` connections at once, each closed after `idle` without traffic.
pub fn spawn(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    idle: std::time::Duration,
    state: WebState,
) {
    let app = router(state);
    let listener = listener::Limited::new(listener, max_connections, idle);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<listener::Peer>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("web listener stopped: {e}");
        }
    });
}

/// [`spawn`] over TLS (`config`: see [`https::for_http`]; each handshake takes the latest, so
/// a certificate reloaded on SIGHUP serves new connections while open ones keep theirs).
pub fn spawn_https(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    idle: std::time::Duration,
    state: WebState,
    config: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let app = router(state);
    let listener = https::TlsListener::new(
        listener::Limited::new(listener, max_connections, idle),
        config,
    )?;
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<listener::Peer>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("web listener stopped: {e}");
        }
    });
    Ok(())
}

/// A JSON response.
pub(crate) fn json(code: StatusCode, v: &serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// An error naming the field at fault (`None`: the request as a whole).
pub(crate) fn field_error(code: StatusCode, field: Option<&str>, message: &str) -> Response {
    json(
        code,
        &serde_json::json!({ "field": field, "message": message }),
    )
}

/// Runs `f` with a store connection off the runtime's thread.
pub(crate) async fn with_store<T: Send + 'static>(
    state: &WebState,
    f: impl FnOnce(&mut dyn crate::store::Store) -> Result<T, Response> + Send + 'static,
) -> Result<T, Response> {
    let factory = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut st = factory().map_err(|e| {
            tracing::warn!("web: cannot open the store: {e}");
            field_error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the directory is unavailable",
            )
        })?;
        f(&mut *st)
    })
    .await
    .unwrap_or_else(|e| {
        Err(field_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &format!("internal error: {e}"),
        ))
    })
}

/// The field a store error is about, with the status to answer.
pub(crate) fn store_error(e: &StoreError) -> Response {
    let (code, field) = match e {
        StoreError::InvalidUser { .. } => (StatusCode::UNPROCESSABLE_ENTITY, Some("user")),
        StoreError::InvalidNumber { .. } => (StatusCode::UNPROCESSABLE_ENTITY, Some("number")),
        StoreError::InvalidPrefix { .. } => (StatusCode::UNPROCESSABLE_ENTITY, Some("prefix")),
        StoreError::InvalidMediaAddr { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, Some("media_addr"))
        }
        StoreError::InvalidDescription { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, Some("description"))
        }
        StoreError::InvalidVerifier { .. } => (StatusCode::UNPROCESSABLE_ENTITY, Some("password")),
        StoreError::DuplicateUser { .. } => (StatusCode::CONFLICT, Some("user")),
        StoreError::DuplicateNumber { .. } => (StatusCode::CONFLICT, Some("number")),
        StoreError::DuplicateRoute { .. } => (StatusCode::CONFLICT, Some("prefix")),
        _ => {
            tracing::warn!("web: store error: {e}");
            return field_error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the directory is unavailable",
            );
        }
    };
    field_error(code, field, &e.to_string())
}

/// A verifier as JSON: base64 salt and keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifierJson {
    salt: String,
    iterations: u32,
    stored_key: String,
    server_key: String,
}

impl VerifierJson {
    pub(crate) fn decode(&self, min_iterations: u32) -> Result<Verifier, Response> {
        let bad = |m: &str| {
            field_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("password"),
                &format!("invalid verifier: {m}"),
            )
        };
        let salt = B64
            .decode(&self.salt)
            .map_err(|_| bad("salt is not base64"))?;
        let key = |s: &str, what: &str| -> Result<[u8; 32], Response> {
            B64.decode(s)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| bad(&format!("{what} is not 32 bytes of base64")))
        };
        if self.iterations < min_iterations {
            return Err(bad(&format!(
                "{} iterations; this gateway requires at least {min_iterations}",
                self.iterations
            )));
        }
        Ok(Verifier {
            salt,
            iterations: self.iterations,
            stored_key: key(&self.stored_key, "stored_key")?,
            server_key: key(&self.server_key, "server_key")?,
        })
    }
}

/// Parses a JSON body; a malformed one is a 400 naming what is wrong.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        field_error(
            StatusCode::BAD_REQUEST,
            None,
            &format!("malformed request: {e}"),
        )
    })
}

/// `GET /api/v1/register`: what the page needs to register (mode, a fresh salt, iterations).
async fn register_params(State(state): State<WebState>) -> Response {
    let mut salt = [0u8; SALT_LEN];
    rand::Rng::fill(&mut rand::rng(), &mut salt);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "registration": state.registration,
            "salt": B64.encode(salt),
            "iterations": state.iterations,
            "number_range": state.number_range.as_ref().map(|r| r.to_string()),
            "min_password_chars": MIN_PASSWORD_CHARS,
            "min_password_bits": MIN_PASSWORD_BITS,
        }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    user: String,
    /// Empty or absent: assign one from `[web] number_range`.
    #[serde(default)]
    number: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    invite: String,
    verifier: VerifierJson,
}

/// `POST /api/v1/register`: registers a subscriber from the page.
async fn register(
    State(state): State<WebState>,
    axum::extract::ConnectInfo(listener::Peer(peer)): axum::extract::ConnectInfo<listener::Peer>,
    body: Bytes,
) -> Response {
    let unprocessable =
        |field: &str, m: String| field_error(StatusCode::UNPROCESSABLE_ENTITY, Some(field), &m);
    if state.registration == Registration::Closed {
        return field_error(StatusCode::FORBIDDEN, None, "registration is closed");
    }
    let counted = state
        .attempts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .attempt(peer.ip(), std::time::Instant::now());
    if let Err(wait) = counted {
        tracing::info!(%peer, "registration attempts over the limit");
        let mut r = field_error(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            &format!(
                "too many registration attempts from your address; try again in {} s",
                wait.as_secs().max(1)
            ),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(wait.as_secs().max(1)),
        );
        return r;
    }
    let req: RegisterRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(e) = crate::store::validate_user(&req.user) {
        return store_error(&e);
    }
    if !req.number.is_empty()
        && let Err(e) = crate::store::validate_number(&req.number)
    {
        return store_error(&e);
    }
    if req.number.is_empty() && state.number_range.is_none() {
        return unprocessable("number", "enter a number: this gateway assigns none".into());
    }
    if let Some(p) = db::display_name_problem(&req.display_name) {
        return unprocessable("display_name", format!("invalid display name: {p}"));
    }
    if let Some(p) = db::email_problem(&req.email) {
        return unprocessable("email", format!("invalid e-mail address: {p}"));
    }
    let verifier = match req.verifier.decode(state.iterations) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let web_db = state.web_db.clone();
    let by_invite = state.registration == Registration::Invite;
    let range = state.number_range.clone();
    let result = with_store(&state, move |st| {
        let db = db::WebDb::open(&web_db).map_err(|e| {
            tracing::warn!("web: {e}");
            field_error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the web store is unavailable",
            )
        })?;
        let internal = |e: String| {
            tracing::warn!("web: {e}");
            field_error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the web store is unavailable",
            )
        };
        if by_invite && !db.take_invite(&req.invite).map_err(internal)? {
            return Err(field_error(
                StatusCode::FORBIDDEN,
                Some("invite"),
                "unknown or used-up invitation code",
            ));
        }
        let added = (|| {
            let number = if req.number.is_empty() {
                let taken = st
                    .list_users()
                    .map_err(|e| store_error(&e))?
                    .into_iter()
                    .map(|s| s.number)
                    .collect();
                let r = range.as_ref().expect("checked above");
                r.first_free(&taken).ok_or_else(|| {
                    field_error(
                        StatusCode::CONFLICT,
                        Some("number"),
                        &format!("every number of {r} is taken"),
                    )
                })?
            } else {
                req.number.clone()
            };
            st.add_user(&crate::store::Subscriber {
                user: req.user.clone(),
                number: number.clone(),
                verifier,
                allow_prefixes: None,
            })
            .map_err(|e| store_error(&e))?;
            Ok(number)
        })();
        match added {
            Ok(number) => {
                let profile = db::Profile {
                    display_name: req.display_name.clone(),
                    email: req.email.clone(),
                };
                if let Err(e) = db.set_profile(&req.user, &profile) {
                    tracing::warn!(user = %req.user, "web: profile not kept: {e}");
                }
                Ok((req.user, number))
            }
            Err(r) => {
                if by_invite {
                    db.give_back_invite(&req.invite).map_err(internal)?;
                }
                Err(r)
            }
        }
    })
    .await;
    match result {
        Ok((user, number)) => {
            tracing::info!(%user, %number, "registered through the web page");
            json(
                StatusCode::CREATED,
                &serde_json::json!({ "user": user, "number": number }),
            )
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Whatever is configured or sent: an answer, no panic.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}", t in "[+0-9-]{0,40}") {
            let _ = NumberRange::parse(&s);
            if let Ok(Some(r)) = NumberRange::parse(&t) {
                // A parsed range prints as it parses, and assigns inside itself.
                prop_assert_eq!(NumberRange::parse(&r.to_string()).unwrap(), Some(r.clone()));
                let n = r.first_free(&Default::default()).unwrap();
                prop_assert!(crate::directory::number_problem(&n, false).is_none());
            }
            let _ = db::email_problem(&s);
            let _ = db::display_name_problem(&s);
            let _ = db::code_problem(&s);
            let _ = parse_body::<RegisterRequest>(&Bytes::from(s.clone().into_bytes()));
        }

        #[test]
        fn json_register_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_body::<RegisterRequest>(&Bytes::from(body));
        }
    }

    #[test]
    fn number_ranges_parse_and_assign_the_first_free_number() {
        assert_eq!(NumberRange::parse("").unwrap(), None);
        let r = NumberRange::parse("+1555010000-+1555019999")
            .unwrap()
            .unwrap();
        assert_eq!(r.to_string(), "+1555010000-+1555019999");
        let mut taken = std::collections::HashSet::new();
        assert_eq!(r.first_free(&taken).as_deref(), Some("+1555010000"));
        taken.insert("+1555010000".to_string());
        taken.insert("+4930".to_string());
        assert_eq!(r.first_free(&taken).as_deref(), Some("+1555010001"));
        let local = NumberRange::parse("0100-0101").unwrap().unwrap();
        let taken: std::collections::HashSet<String> =
            ["0100".to_string(), "0101".to_string()].into();
        assert_eq!(local.first_free(&taken), None);
        for bad in ["+1555", "+1-+22", "+19-+11", "+1-2", "x-y", "+0123-+0124"] {
            assert!(NumberRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let cfg = crate::config::WebSection {
            admin_tokens: vec!["0123456789abcdef-token".into()],
            ..Default::default()
        };
        let state = WebState {
            store: Arc::new(|| {
                Ok(Box::new(crate::store::SqliteStore::open_in_memory()?)
                    as Box<dyn crate::store::Store>)
            }),
            web_db: PathBuf::from("/nonexistent"),
            registration: Registration::Open,
            number_range: None,
            iterations: 4096,
            token_hashes: Arc::new(load_tokens(&cfg).unwrap()),
            attempts: Default::default(),
            bridge: None,
        };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(state.authorized(&with("Bearer 0123456789abcdef-token")));
        assert!(!state.authorized(&with("Bearer 0123456789abcdef-toke")));
        assert!(!state.authorized(&with("Basic 0123456789abcdef-token")));
        assert!(!state.authorized(&HeaderMap::new()));
        let short = crate::config::WebSection {
            admin_tokens: vec!["short".into()],
            ..Default::default()
        };
        assert!(load_tokens(&short).unwrap_err().contains("at least 16"));
    }
}
