//! Log-in by mutual challenge/response: SCRAM-SHA-256 (RFC 5802, RFC 7677), sans-IO.
//!
//! The seed (Fig. 2d, "Initiating Telephony Connection"): *"A challenge/response
//! protocol is preferably implemented on the gateway server for verifying the
//! identity and password information sent by the internal user"*, and *"the
//! gateway server may assign and transmit to the sender an additional password,
//! which is used to secure future voice data transmissions"*.
//!
//! SCRAM gives both halves: the client proves it knows the password without
//! sending it, the gateway proves it holds the user's [`Verifier`] (so a fake
//! gateway is caught), and both derive the same per-log-in [`SessionKey`] (the
//! "additional password") without it ever crossing the wire.
//!
//! This module owns the cryptography and the order of messages; it does no IO
//! and reads no clock. The four messages are plain structs ([`Hello`],
//! [`Challenge`], [`ClientProof`], [`ServerSignature`]) that the control
//! protocol carries in its own encoding. Each side is a typestate: a transition
//! consumes the state and one message, so an attempt cannot be verified twice
//! and messages cannot be taken out of order.
//!
//! ```text
//!  client                                         gateway
//!  ClientFirst::new ── Hello{user, cnonce} ─────▶ ServerFirst::new (verifier looked up, or none)
//!  respond(password) ◀── Challenge{cnonce+snonce, salt, i} ──
//!                    ── ClientProof{c=biws, nonce, proof} ──▶ verify
//!  verify_server     ◀── ServerSignature ─────────────────── (+ SessionKey)
//!  (+ SessionKey)
//! ```
//!
//! Deviations from RFC 5802, all deliberate:
//! - Channel binding is `tls-exporter` (RFC 9266) or none: over TLS the client
//!   sends the GS2 header `p=tls-exporter,,` and `c=` carries it followed by
//!   the 32-byte exporter value ([`ClientAwaitingChallenge::respond_bound`],
//!   [`ServerAwaitingProof::verify_bound`]); without TLS it is `n,,`
//!   (`c=biws`). `y,,` is refused: a voxgate client never sends it. No authzid.
//! - No SASLprep: the password is used as its UTF-8 bytes. Both ends are
//!   voxgate, so they agree; for ASCII passwords this equals SASLprep.
//! - User names must be printable without white space (see [`validate_user`]);
//!   `,` and `=` are allowed and escaped as `=2C` / `=3D` in the SCRAM text.
//!
//! Unknown users: the gateway answers with a *decoy* challenge whose salt is
//! derived from a server secret and the user name (stable across probes, like a
//! real user's), runs the same computations at verification, and fails with the
//! same [`AuthError::Rejected`] as a wrong password. Set
//! [`AuthConfig::decoy_iterations`] to the iteration count used for real
//! verifiers, or the count gives unknown users away.
//!
//! Log-in attempts are throttled by [`RateLimiter`] (per source address, per
//! user at a source, and a per-user slow-down that spares sources which have
//! not failed), charged at `hello` and given back on success; refusals are
//! logged at a bounded rate through [`RefusalLog`]. Also sans-IO: the caller
//! passes `now`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::CryptoRng;
use subtle::{Choice, ConstantTimeEq};

pub use crate::directory::{InvalidUser, MAX_USER_LEN, SALT_LEN, Verifier, validate_user};
use crate::directory::{client_key, hmac, salted_password, server_key, sha256};

/// Shortest client nonce, in characters. RFC 7677's example uses 20.
pub const MIN_CLIENT_NONCE_LEN: usize = 16;
/// Shortest server part of the nonce a client accepts, in characters.
pub const MIN_SERVER_NONCE_LEN: usize = 16;
/// Longest nonce part (client or server), in characters.
pub const MAX_NONCE_LEN: usize = 128;
/// Salt lengths a client accepts, in bytes.
pub const SALT_LEN_RANGE: std::ops::RangeInclusive<usize> = 8..=128;
/// RFC 7677 §4: the iteration count "SHOULD be at least 4096".
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Highest iteration count a client accepts by default (bounds the work a fake
/// gateway can make a client do).
pub const DEFAULT_MAX_ITERATIONS: u32 = 1_000_000;

/// Channel binding none: base64 of the GS2 header `n,,`.
const CHANNEL_BINDING_NONE: &str = "biws";
/// The GS2 header of a log-in bound to its TLS channel (RFC 9266).
pub const GS2_TLS_EXPORTER: &str = "p=tls-exporter,,";
/// RFC 9266 §2: the exporter label (no context: a zero-length context value).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// RFC 9266 §2: the exporter output length.
pub const TLS_EXPORTER_LEN: usize = 32;
/// Longest `c=` value decoded (base64 of the GS2 header and 32 bytes is 68 characters).
const MAX_CHANNEL_BINDING_LEN: usize = 256;
/// Random bytes in a nonce part (base64: 24 characters, no padding).
const NONCE_BYTES: usize = 18;
const SESSION_KEY_LABEL: &[u8] = b"voxgate session key v1\0";

/// Errors of the log-in exchange.
///
/// The gateway answers a wrong password, an unknown user, a wrong nonce and a
/// malformed proof alike with [`AuthError::Rejected`]. The other variants
/// describe malformed messages and say nothing about the user's existence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    InvalidUser(#[from] InvalidUser),
    #[error("invalid {field}: {reason}")]
    InvalidNonce {
        field: &'static str,
        reason: &'static str,
    },
    #[error("the server nonce does not extend this client's nonce")]
    NonceMismatch,
    #[error("unsupported channel binding: only none (\"biws\") and tls-exporter are supported")]
    ChannelBinding,
    /// The client bound the log-in to a TLS channel whose exporter differs from the
    /// gateway's side of this connection: something terminates TLS in between.
    #[error(
        "the log-in's channel binding does not match this TLS connection \
         (a TLS-terminating proxy between client and gateway?)"
    )]
    ChannelBindingMismatch,
    /// The client bound the log-in to TLS, but the gateway sees no TLS on this connection.
    #[error(
        "the log-in's channel binding names a TLS session but this connection to the gateway \
         is not TLS (a TLS-terminating proxy between client and gateway?)"
    )]
    ChannelBindingUnavailable,
    #[error("salt length {len} is outside {min}..={max} bytes")]
    SaltLength { len: usize, min: usize, max: usize },
    #[error("iteration count {got} is outside {min}..={max}")]
    Iterations { got: u32, min: u32, max: u32 },
    #[error("authentication failed")]
    Rejected,
    #[error("the gateway's signature is wrong: it does not hold this user's verifier")]
    ServerNotAuthenticated,
}

/// RFC 5802 `saslname`: `=` becomes `=3D` and `,` becomes `=2C`.
pub fn escape_user(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// Inverse of [`escape_user`]; rejects a `=` not followed by `2C` or `3D` and
/// a bare `,` (RFC 5802: "the server MUST fail the authentication").
pub fn unescape_user(saslname: &str) -> Result<String, InvalidUser> {
    let mut out = String::with_capacity(saslname.len());
    let mut rest = saslname;
    while let Some(i) = rest.find([',', '=']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("=2C") {
            out.push(',');
        } else if tail.starts_with("=3D") {
            out.push('=');
        } else {
            return Err(InvalidUser {
                reason: "bad escape: only =2C and =3D are allowed, and no bare comma",
            });
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 5802 `printable`: `%x21-2B / %x2D-7E` (visible ASCII except `,`).
fn validate_nonce_part(
    part: &str,
    min: usize,
    max: usize,
    field: &'static str,
) -> Result<(), AuthError> {
    let err = |reason| Err(AuthError::InvalidNonce { field, reason });
    if part.len() < min {
        return err("too short");
    }
    if part.len() > max {
        return err("too long");
    }
    if !part
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return err("not printable ASCII without comma");
    }
    Ok(())
}

fn random_nonce<R: CryptoRng + ?Sized>(rng: &mut R) -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rng.fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The values both sides sign: RFC 5802 §3
/// `AuthMessage := client-first-message-bare + "," + server-first-message + ","
/// + client-final-message-without-proof`.
struct Exchange<'a> {
    user: &'a str,
    client_nonce: &'a str,
    /// Client nonce followed by the server's part.
    nonce: &'a str,
    salt: &'a [u8],
    iterations: u32,
    /// The `c=` value: base64 of the GS2 header and the channel-binding data.
    channel_binding: &'a str,
}

impl Exchange<'_> {
    fn auth_message(&self) -> String {
        format!(
            "n={user},r={cnonce},r={nonce},s={salt},i={i},c={cb},r={nonce}",
            user = escape_user(self.user),
            cnonce = self.client_nonce,
            nonce = self.nonce,
            salt = BASE64.encode(self.salt),
            i = self.iterations,
            cb = self.channel_binding,
        )
    }
}

/// The per-log-in key derived from the exchange: `HMAC(StoredKey, label ||
/// AuthMessage)`. Computing it takes the password (the client) or the
/// verifier (the gateway); an eavesdropper without the verifier database
/// cannot, one with it can (no forward secrecy: use TLS where that matters).
/// It differs for every attempt, as the AuthMessage carries fresh nonces.
fn session_key(stored_key: &[u8; 32], auth_message: &str) -> SessionKey {
    SessionKey(hmac(
        stored_key,
        &[SESSION_KEY_LABEL, auth_message.as_bytes()],
    ))
}

/// The per-log-in key both sides derive (the seed's "additional password"),
/// from which per-leg media keys are derived. `Debug` redacts it; equality is
/// constant-time.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SessionKey(bytes)
    }

    /// The key material. Do not log it.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key for one purpose, e.g. `derive("leg", call_and_leg_id)`:
    /// `HMAC(session key, "voxgate " || label || 0 || context)`.
    pub fn derive(&self, label: &str, context: &[u8]) -> SessionKey {
        SessionKey(hmac(
            &self.0,
            &[b"voxgate ", label.as_bytes(), b"\0", context],
        ))
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl ConstantTimeEq for SessionKey {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for SessionKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SessionKey {}

// ---- messages -------------------------------------------------------------

/// Client → gateway: RFC 5802 client-first-message (GS2 header `n,,`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The user name, unescaped.
    pub user: String,
    pub client_nonce: String,
}

/// Gateway → client: RFC 5802 server-first-message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The client nonce followed by the gateway's fresh part.
    pub server_nonce: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// Client → gateway: RFC 5802 client-final-message. `Debug` redacts the proof
/// (with the challenge it allows an offline guess of the password).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientProof {
    /// Base64 of the GS2 header (and channel-binding data): `"biws"` (`n,,`) or
    /// base64 of `p=tls-exporter,,` and the exporter value.
    pub channel_binding: String,
    /// Must equal the challenge's `server_nonce`.
    pub nonce: String,
    /// ClientKey XOR ClientSignature, 32 bytes.
    pub proof: Vec<u8>,
}

impl fmt::Debug for ClientProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientProof")
            .field("channel_binding", &self.channel_binding)
            .field("nonce", &self.nonce)
            .field("proof", &"<redacted>")
            .finish()
    }
}

/// Gateway → client: RFC 5802 server-final-message `v=`. `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerSignature {
    /// HMAC(ServerKey, AuthMessage), 32 bytes.
    pub signature: Vec<u8>,
}

impl fmt::Debug for ServerSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSignature(<redacted>)")
    }
}

// ---- gateway side ---------------------------------------------------------

/// Gateway-wide log-in settings. `Debug` redacts the secret.
#[derive(Clone)]
pub struct AuthConfig {
    /// Keys the decoy salts and keys for unknown users. Keep it stable across
    /// restarts (or a prober sees an unknown user's salt change).
    secret: [u8; 32],
    /// Iteration count advertised for unknown users; set it to the count used
    /// for real verifiers.
    pub decoy_iterations: u32,
}

impl AuthConfig {
    pub fn new(secret: [u8; 32], decoy_iterations: u32) -> Self {
        AuthConfig {
            secret,
            decoy_iterations: decoy_iterations.max(1),
        }
    }

    /// A config with a fresh random secret.
    pub fn generate<R: CryptoRng + ?Sized>(decoy_iterations: u32, rng: &mut R) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::new(secret, decoy_iterations)
    }

    /// The secret, to persist it. Do not log it.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// A verifier-shaped decoy for a user who does not exist: stable per user
    /// name, indistinguishable from a real one without the secret.
    fn decoy(&self, user: &str) -> Verifier {
        let salt = hmac(&self.secret, &[b"voxgate decoy salt\0", user.as_bytes()]);
        Verifier {
            salt: salt[..SALT_LEN].to_vec(),
            iterations: self.decoy_iterations,
            stored_key: hmac(&self.secret, &[b"voxgate decoy stored\0", user.as_bytes()]),
            server_key: hmac(&self.secret, &[b"voxgate decoy server\0", user.as_bytes()]),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &"<redacted>")
            .field("decoy_iterations", &self.decoy_iterations)
            .finish()
    }
}

/// The gateway before a [`Hello`]: only a name for the first transition.
#[derive(Debug)]
pub enum ServerFirst {}

impl ServerFirst {
    /// Takes the client's [`Hello`] and the user's verifier as looked up in
    /// the store (`None`: no such user) and answers with a [`Challenge`].
    ///
    /// For an unknown user the challenge carries a decoy salt (stable per user
    /// name) and [`AuthConfig::decoy_iterations`], and the attempt fails at
    /// [`ServerAwaitingProof::verify`] exactly like a wrong password.
    #[allow(clippy::new_ret_no_self)] // a typestate transition: yields the next state and its message
    pub fn new<R: CryptoRng + ?Sized>(
        config: &AuthConfig,
        hello: &Hello,
        verifier: Option<&Verifier>,
        rng: &mut R,
    ) -> Result<(ServerAwaitingProof, Challenge), AuthError> {
        Self::with_server_nonce(config, hello, verifier, random_nonce(rng))
    }

    fn with_server_nonce(
        config: &AuthConfig,
        hello: &Hello,
        verifier: Option<&Verifier>,
        server_part: String,
    ) -> Result<(ServerAwaitingProof, Challenge), AuthError> {
        validate_user(&hello.user)?;
        validate_nonce_part(
            &hello.client_nonce,
            MIN_CLIENT_NONCE_LEN,
            MAX_NONCE_LEN,
            "client nonce",
        )?;
        // The decoy is computed for every user so that both paths do the same work.
        let decoy = config.decoy(&hello.user);
        let (known, v) = match verifier {
            Some(v) => (Choice::from(1), v),
            None => (Choice::from(0), &decoy),
        };
        let nonce = format!("{}{}", hello.client_nonce, server_part);
        let challenge = Challenge {
            server_nonce: nonce.clone(),
            salt: v.salt.clone(),
            iterations: v.iterations,
        };
        let state = ServerAwaitingProof {
            user: hello.user.clone(),
            client_nonce: hello.client_nonce.clone(),
            nonce,
            salt: v.salt.clone(),
            iterations: v.iterations,
            stored_key: v.stored_key,
            server_key: v.server_key,
            known,
        };
        Ok((state, challenge))
    }
}

/// The gateway after sending its [`Challenge`], waiting for the [`ClientProof`].
/// `Debug` redacts the keys.
pub struct ServerAwaitingProof {
    user: String,
    client_nonce: String,
    nonce: String,
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
    /// Whether the user exists; kept as a `Choice` so the verdict is computed
    /// without a branch on it.
    known: Choice,
}

impl ServerAwaitingProof {
    /// The user this attempt is for.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Checks the client's proof. On success returns the signature that proves
    /// the gateway to the client, and the session key.
    ///
    /// Any failure that depends on secrets, the user's existence or the nonce
    /// is [`AuthError::Rejected`], decided in constant time after the same
    /// computations.
    pub fn verify(
        self,
        client_final: &ClientProof,
    ) -> Result<(ServerSignature, SessionKey), AuthError> {
        self.verify_bound(client_final, None)
    }

    /// [`Self::verify`] on a connection whose TLS session gave `tls_exporter` (RFC 9266:
    /// label [`TLS_EXPORTER_LABEL`], no context, [`TLS_EXPORTER_LEN`] bytes; `None`: not
    /// TLS). A proof bound with `p=tls-exporter` must carry exactly this value; one bound
    /// without TLS (`n,,`) is accepted on either.
    pub fn verify_bound(
        self,
        client_final: &ClientProof,
        tls_exporter: Option<&[u8]>,
    ) -> Result<(ServerSignature, SessionKey), AuthError> {
        check_channel_binding(&client_final.channel_binding, tls_exporter)?;
        let auth_message = Exchange {
            user: &self.user,
            client_nonce: &self.client_nonce,
            nonce: &self.nonce,
            salt: &self.salt,
            iterations: self.iterations,
            channel_binding: &client_final.channel_binding,
        }
        .auth_message();
        // RFC 5802 §3: ClientSignature := HMAC(StoredKey, AuthMessage);
        // ClientKey := ClientProof XOR ClientSignature; check H(ClientKey) = StoredKey.
        let client_signature = hmac(&self.stored_key, &[auth_message.as_bytes()]);
        let proof_len_ok = Choice::from(u8::from(client_final.proof.len() == 32));
        let mut proof = [0u8; 32];
        for (dst, src) in proof.iter_mut().zip(&client_final.proof) {
            *dst = *src;
        }
        let client_key = xor(&proof, &client_signature);
        let ok = sha256(&client_key).ct_eq(&self.stored_key)
            & client_final.nonce.as_bytes().ct_eq(self.nonce.as_bytes())
            & proof_len_ok
            & self.known;
        if !bool::from(ok) {
            return Err(AuthError::Rejected);
        }
        let signature = hmac(&self.server_key, &[auth_message.as_bytes()]);
        Ok((
            ServerSignature {
                signature: signature.to_vec(),
            },
            session_key(&self.stored_key, &auth_message),
        ))
    }
}

/// The `c=` value a client sends: `biws` without TLS, else base64 of
/// [`GS2_TLS_EXPORTER`] followed by the exporter value.
pub fn channel_binding_value(tls_exporter: Option<&[u8]>) -> String {
    match tls_exporter {
        None => CHANNEL_BINDING_NONE.to_owned(),
        Some(data) => {
            let mut bytes = GS2_TLS_EXPORTER.as_bytes().to_vec();
            bytes.extend_from_slice(data);
            BASE64.encode(bytes)
        }
    }
}

/// The gateway's check of a `c=` value against its side of the connection.
fn check_channel_binding(c: &str, tls_exporter: Option<&[u8]>) -> Result<(), AuthError> {
    if c == CHANNEL_BINDING_NONE {
        return Ok(());
    }
    if c.len() > MAX_CHANNEL_BINDING_LEN {
        return Err(AuthError::ChannelBinding);
    }
    let bytes = BASE64
        .decode(c.as_bytes())
        .map_err(|_| AuthError::ChannelBinding)?;
    let Some(data) = bytes.strip_prefix(GS2_TLS_EXPORTER.as_bytes()) else {
        return Err(AuthError::ChannelBinding);
    };
    let Some(ours) = tls_exporter else {
        return Err(AuthError::ChannelBindingUnavailable);
    };
    if bool::from(data.ct_eq(ours)) {
        Ok(())
    } else {
        Err(AuthError::ChannelBindingMismatch)
    }
}

impl fmt::Debug for ServerAwaitingProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerAwaitingProof")
            .field("user", &self.user)
            .field("nonce", &self.nonce)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

// ---- client side ----------------------------------------------------------

/// What a client accepts from a gateway's [`Challenge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Fewer iterations make a captured proof cheap to attack offline; a fake
    /// gateway could ask for 1.
    pub min_iterations: u32,
    /// More iterations than this is refused (a fake gateway could ask for
    /// `u32::MAX` to stall the client).
    pub max_iterations: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            min_iterations: DEFAULT_ITERATIONS,
            max_iterations: DEFAULT_MAX_ITERATIONS,
        }
    }
}

/// The client before its [`Hello`]: only a name for the first transition.
#[derive(Debug)]
pub enum ClientFirst {}

impl ClientFirst {
    /// Starts a log-in for `user` with [`ClientConfig::default`].
    #[allow(clippy::new_ret_no_self)] // a typestate transition: yields the next state and its message
    pub fn new<R: CryptoRng + ?Sized>(
        user: &str,
        rng: &mut R,
    ) -> Result<(ClientAwaitingChallenge, Hello), AuthError> {
        Self::with_config(user, ClientConfig::default(), rng)
    }

    pub fn with_config<R: CryptoRng + ?Sized>(
        user: &str,
        config: ClientConfig,
        rng: &mut R,
    ) -> Result<(ClientAwaitingChallenge, Hello), AuthError> {
        Self::with_nonce(user, random_nonce(rng), config)
    }

    fn with_nonce(
        user: &str,
        client_nonce: String,
        config: ClientConfig,
    ) -> Result<(ClientAwaitingChallenge, Hello), AuthError> {
        validate_user(user)?;
        validate_nonce_part(
            &client_nonce,
            MIN_CLIENT_NONCE_LEN,
            MAX_NONCE_LEN,
            "client nonce",
        )?;
        let hello = Hello {
            user: user.to_owned(),
            client_nonce: client_nonce.clone(),
        };
        let state = ClientAwaitingChallenge {
            user: user.to_owned(),
            client_nonce,
            config,
        };
        Ok((state, hello))
    }
}

/// The client after its [`Hello`], waiting for the [`Challenge`].
#[derive(Debug)]
pub struct ClientAwaitingChallenge {
    user: String,
    client_nonce: String,
    config: ClientConfig,
}

impl ClientAwaitingChallenge {
    /// Checks the challenge and proves knowledge of `password`. Runs PBKDF2
    /// with the challenge's iteration count (bounded by [`ClientConfig`]).
    pub fn respond(
        self,
        password: &str,
        challenge: &Challenge,
    ) -> Result<(ClientAwaitingSignature, ClientProof), AuthError> {
        self.respond_bound(password, challenge, None)
    }

    /// [`Self::respond`], bound to the TLS channel whose exporter value (RFC 9266) is
    /// `tls_exporter` (`None`: not TLS, GS2 header `n,,`). A gateway on the other end of a
    /// different TLS session (a TLS-terminating man in the middle) refuses the proof, and
    /// the gateway's signature covers the binding: a welcome that verifies means the
    /// gateway checked it (no downgrade).
    pub fn respond_bound(
        self,
        password: &str,
        challenge: &Challenge,
        tls_exporter: Option<&[u8]>,
    ) -> Result<(ClientAwaitingSignature, ClientProof), AuthError> {
        let channel_binding = channel_binding_value(tls_exporter);
        let server_part = challenge
            .server_nonce
            .strip_prefix(&self.client_nonce)
            .ok_or(AuthError::NonceMismatch)?;
        validate_nonce_part(
            server_part,
            MIN_SERVER_NONCE_LEN,
            MAX_NONCE_LEN,
            "server nonce",
        )?;
        if !SALT_LEN_RANGE.contains(&challenge.salt.len()) {
            return Err(AuthError::SaltLength {
                len: challenge.salt.len(),
                min: *SALT_LEN_RANGE.start(),
                max: *SALT_LEN_RANGE.end(),
            });
        }
        let (min, max) = (self.config.min_iterations, self.config.max_iterations);
        if !(min..=max).contains(&challenge.iterations) || challenge.iterations == 0 {
            return Err(AuthError::Iterations {
                got: challenge.iterations,
                min,
                max,
            });
        }
        let auth_message = Exchange {
            user: &self.user,
            client_nonce: &self.client_nonce,
            nonce: &challenge.server_nonce,
            salt: &challenge.salt,
            iterations: challenge.iterations,
            channel_binding: &channel_binding,
        }
        .auth_message();
        let salted = salted_password(password, &challenge.salt, challenge.iterations);
        let client_key = client_key(&salted);
        let stored_key = sha256(&client_key);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = ClientProof {
            channel_binding,
            nonce: challenge.server_nonce.clone(),
            proof: xor(&client_key, &client_signature).to_vec(),
        };
        let state = ClientAwaitingSignature {
            expected: hmac(&server_key(&salted), &[auth_message.as_bytes()]),
            session_key: session_key(&stored_key, &auth_message),
        };
        Ok((state, proof))
    }
}

/// The client after its proof, waiting for the gateway to prove itself.
/// `Debug` redacts the keys.
pub struct ClientAwaitingSignature {
    expected: [u8; 32],
    session_key: SessionKey,
}

impl ClientAwaitingSignature {
    /// Checks the gateway's signature (constant-time); only then is the
    /// session key released.
    pub fn verify_server(self, signature: &ServerSignature) -> Result<SessionKey, AuthError> {
        if bool::from(signature.signature.ct_eq(&self.expected)) {
            Ok(self.session_key)
        } else {
            Err(AuthError::ServerNotAuthenticated)
        }
    }
}

impl fmt::Debug for ClientAwaitingSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAwaitingSignature(<redacted>)")
    }
}

// ---- rate limiting --------------------------------------------------------

/// A token bucket: `burst` log-in attempts at once, then one more per
/// `refill_every` (longer while the bucket keeps running dry: see
/// [`RateLimitConfig::max_backoff`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub burst: u32,
    pub refill_every: Duration,
}

/// Limits on log-in attempts. `None` turns a scope off.
///
/// An attempt is charged at `hello`, before the store is asked or any key is
/// derived, and stays charged unless it succeeds: a pending attempt counts, and
/// one abandoned after its challenge (`bye`, the log-in time-out, a dropped
/// connection) counts like a failure. So N connections that all send `hello`
/// first get no more challenges than the buckets hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Attempts per source address (IPv6: per prefix), whatever the user.
    pub per_ip: Option<Bucket>,
    /// Attempts per user name at one source address: the lock-out a guesser
    /// runs into. It is local to the source: the real user elsewhere is not
    /// locked out by it.
    pub per_user_source: Option<Bucket>,
    /// Attempts per user name from all sources: a slow-down that only applies
    /// to sources with unsuccessful attempts for that user. A source with a clean
    /// record for the user (nothing charged, or everything refilled) is always
    /// let through, so knowing a user name is not enough to lock its owner out.
    pub per_user: Option<Bucket>,
    /// Back-off: each time a bucket is emptied again before it refilled, its
    /// refill period doubles, up to this (a bucket that refills completely
    /// starts over at its base period).
    pub max_backoff: Duration,
    /// Most buckets kept per scope; beyond it the least recently charged
    /// bucket is forgotten (a forgotten bucket is a full one).
    pub max_entries: usize,
    /// IPv6 sources are limited per prefix of this length (one host usually
    /// owns a whole /64).
    pub ipv6_prefix_len: u8,
}

impl Default for RateLimitConfig {
    /// Per source: 20 attempts at once, then 1 per 3 s; per user at one source:
    /// 5, then 1 per 12 s; per user from failing sources: 30, then 1 per 2 s;
    /// back-off up to 5 minutes; 65 536 buckets per scope; IPv6 per /64.
    fn default() -> Self {
        RateLimitConfig {
            per_ip: Some(Bucket {
                burst: 20,
                refill_every: Duration::from_secs(3),
            }),
            per_user_source: Some(Bucket {
                burst: 5,
                refill_every: Duration::from_secs(12),
            }),
            per_user: Some(Bucket {
                burst: 30,
                refill_every: Duration::from_secs(2),
            }),
            max_backoff: Duration::from_secs(300),
            max_entries: 65_536,
            ipv6_prefix_len: 64,
        }
    }
}

/// Which limit refused a log-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitScope {
    SourceIp,
    UserAtSource,
    User,
}

impl LimitScope {
    pub const ALL: [LimitScope; 3] = [
        LimitScope::SourceIp,
        LimitScope::UserAtSource,
        LimitScope::User,
    ];

    fn index(self) -> usize {
        match self {
            LimitScope::SourceIp => 0,
            LimitScope::UserAtSource => 1,
            LimitScope::User => 2,
        }
    }
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitScope::SourceIp => "source address",
            LimitScope::UserAtSource => "user from this address",
            LimitScope::User => "user",
        })
    }
}

/// A log-in refused before any work, because of earlier attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many log-in attempts for this {scope}; retry in {}s", retry_after.as_secs().max(1))]
pub struct RateLimited {
    pub scope: LimitScope,
    pub retry_after: Duration,
}

/// Doublings of the refill period at most (2^16 times the base).
const MAX_BACKOFF_LEVEL: u8 = 16;

#[derive(Clone, Copy, Debug)]
struct Entry {
    tokens: u32,
    refilled_at: Instant,
    /// Back-off: the refill period is the base one doubled this many times.
    level: u8,
    /// Emptied since it was last full (the next emptying doubles the period).
    drained: bool,
    /// Position in the table's eviction order.
    seq: u64,
}

/// Buckets for one scope, with least-recently-charged eviction.
#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Entry>,
    order: BTreeMap<u64, K>,
    next_seq: u64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new() -> Self {
        Buckets {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    fn period(bucket: &Bucket, level: u8, max_backoff: Duration) -> Duration {
        let doubled = bucket
            .refill_every
            .checked_mul(1u32 << level.min(MAX_BACKOFF_LEVEL))
            .unwrap_or(Duration::MAX);
        doubled.min(max_backoff.max(bucket.refill_every))
    }

    /// The entry as of `now`: tokens refilled, the back-off reset once full.
    fn refill(entry: &Entry, bucket: &Bucket, now: Instant, max_backoff: Duration) -> Entry {
        let period = Self::period(bucket, entry.level, max_backoff);
        let elapsed = now.saturating_duration_since(entry.refilled_at);
        let earned = elapsed
            .as_nanos()
            .checked_div(period.as_nanos())
            .unwrap_or(u128::MAX);
        let tokens = u128::from(entry.tokens).saturating_add(earned);
        if tokens >= u128::from(bucket.burst) {
            Entry {
                tokens: bucket.burst,
                refilled_at: now,
                level: 0,
                drained: false,
                seq: entry.seq,
            }
        } else {
            // earned < burst ≤ u32::MAX here, so the casts are lossless.
            Entry {
                tokens: tokens as u32,
                refilled_at: entry.refilled_at + period.saturating_mul(earned as u32),
                level: entry.level,
                drained: entry.drained,
                seq: entry.seq,
            }
        }
    }

    /// `Some(retry_after)` when the bucket for `key` is empty at `now`.
    fn check(
        &self,
        key: &K,
        bucket: &Bucket,
        now: Instant,
        max_backoff: Duration,
    ) -> Option<Duration> {
        let entry = self.map.get(key)?;
        let e = Self::refill(entry, bucket, now, max_backoff);
        (e.tokens == 0).then(|| {
            (e.refilled_at + Self::period(bucket, e.level, max_backoff))
                .saturating_duration_since(now)
        })
    }

    /// Whether `key` has nothing charged at `now` (no entry, or full again).
    fn is_clean(&self, key: &K, bucket: &Bucket, now: Instant, max_backoff: Duration) -> bool {
        self.map
            .get(key)
            .is_none_or(|e| Self::refill(e, bucket, now, max_backoff).tokens >= bucket.burst)
    }

    fn charge(
        &mut self,
        key: K,
        bucket: &Bucket,
        now: Instant,
        max_entries: usize,
        max_backoff: Duration,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut entry = match self.map.get(&key) {
            Some(old) => {
                self.order.remove(&old.seq);
                Self::refill(old, bucket, now, max_backoff)
            }
            None => Entry {
                tokens: bucket.burst,
                refilled_at: now,
                level: 0,
                drained: false,
                seq,
            },
        };
        entry.seq = seq;
        entry.tokens = entry.tokens.saturating_sub(1);
        if entry.tokens == 0 {
            // Emptied again before it refilled: the next token takes twice as long.
            if entry.drained {
                entry.level = (entry.level + 1).min(MAX_BACKOFF_LEVEL);
            }
            entry.drained = true;
            entry.refilled_at = now;
        }
        self.map.insert(key.clone(), entry);
        self.order.insert(seq, key);
        while self.map.len() > max_entries {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }

    /// Gives one token back (a successful attempt).
    fn refund(&mut self, key: &K, bucket: &Bucket, now: Instant, max_backoff: Duration) {
        let Some(old) = self.map.get(key) else {
            return;
        };
        let mut e = Self::refill(old, bucket, now, max_backoff);
        e.tokens = (e.tokens + 1).min(bucket.burst);
        if e.tokens >= bucket.burst {
            e.level = 0;
            e.drained = false;
        }
        self.map.insert(key.clone(), e);
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Throttles log-in attempts per source address, per user at a source, and per
/// user, sans-IO. See [`RateLimitConfig`] for the rules.
///
/// Call [`RateLimiter::begin`] at `hello`, before the store is asked: it
/// refuses, or charges the attempt. Call [`RateLimiter::succeeded`] when the
/// attempt logs in: its charge is given back. Nothing is called for a failure:
/// the charge simply stays. Memory is bounded by
/// [`RateLimitConfig::max_entries`] per scope.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    ips: Buckets<IpAddr>,
    user_sources: Buckets<(String, IpAddr)>,
    users: Buckets<String>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        RateLimiter {
            config,
            ips: Buckets::new(),
            user_sources: Buckets::new(),
            users: Buckets::new(),
        }
    }

    /// Whether a log-in from `ip` for `user` may be attempted at `now`
    /// (charges nothing).
    pub fn check(&self, now: Instant, ip: IpAddr, user: &str) -> Result<(), RateLimited> {
        let c = &self.config;
        let ip = self.ip_key(ip);
        let refused = |scope, retry_after| Err(RateLimited { scope, retry_after });
        if let Some(b) = &c.per_ip
            && let Some(retry) = self.ips.check(&ip, b, now, c.max_backoff)
        {
            return refused(LimitScope::SourceIp, retry);
        }
        let us = (user_key(user), ip);
        if let Some(b) = &c.per_user_source
            && let Some(retry) = self.user_sources.check(&us, b, now, c.max_backoff)
        {
            return refused(LimitScope::UserAtSource, retry);
        }
        if let Some(b) = &c.per_user
            && let Some(retry) = self.users.check(&us.0, b, now, c.max_backoff)
        {
            // The reserved allowance: a source that has not failed for this
            // user is never slowed down on its account.
            let clean = match &c.per_user_source {
                Some(bs) => self.user_sources.is_clean(&us, bs, now, c.max_backoff),
                None => false,
            };
            if !clean {
                return refused(LimitScope::User, retry);
            }
        }
        Ok(())
    }

    /// Checks, then charges an attempt from `ip` for `user` to every scope.
    pub fn begin(&mut self, now: Instant, ip: IpAddr, user: &str) -> Result<(), RateLimited> {
        self.check(now, ip, user)?;
        let c = self.config;
        let (max, backoff) = (c.max_entries, c.max_backoff);
        let ip = self.ip_key(ip);
        if let Some(b) = c.per_ip {
            self.ips.charge(ip, &b, now, max, backoff);
        }
        if let Some(b) = c.per_user_source {
            self.user_sources
                .charge((user_key(user), ip), &b, now, max, backoff);
        }
        if let Some(b) = c.per_user {
            self.users.charge(user_key(user), &b, now, max, backoff);
        }
        Ok(())
    }

    /// The attempt [`begin`](Self::begin) charged logged in: its charge is
    /// given back.
    pub fn succeeded(&mut self, now: Instant, ip: IpAddr, user: &str) {
        let c = self.config;
        let ip = self.ip_key(ip);
        if let Some(b) = c.per_ip {
            self.ips.refund(&ip, &b, now, c.max_backoff);
        }
        if let Some(b) = c.per_user_source {
            self.user_sources
                .refund(&(user_key(user), ip), &b, now, c.max_backoff);
        }
        if let Some(b) = c.per_user {
            self.users.refund(&user_key(user), &b, now, c.max_backoff);
        }
    }

    /// Buckets held (source addresses, users at sources, users).
    pub fn len(&self) -> (usize, usize, usize) {
        (self.ips.len(), self.user_sources.len(), self.users.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0, 0)
    }

    fn ip_key(&self, ip: IpAddr) -> IpAddr {
        source_key(ip, self.config.ipv6_prefix_len)
    }
}

/// The unit limits are kept per: an IPv4 address (v4-mapped IPv6 as IPv4), or
/// an IPv6 address cut to `prefix_len` bits.
pub fn source_key(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let len = u32::from(prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
    }
}

/// User names as keys, cut to [`MAX_USER_LEN`] bytes so that an unvalidated
/// name cannot make a bucket large.
fn user_key(user: &str) -> String {
    let mut end = user.len().min(MAX_USER_LEN);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user[..end].to_owned()
}

/// Refusals, logged at a bounded rate: the first refusal after a quiet
/// interval is logged at once, later ones are counted and summed up in the
/// next line, at most one line per `interval`. Sans-IO.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    last_line: Option<Instant>,
    counts: [u64; 3],
}

/// Refusals per scope since the last line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalSummary {
    pub source: u64,
    pub user_at_source: u64,
    pub user: u64,
}

impl RefusalLog {
    pub fn new(interval: Duration) -> Self {
        RefusalLog {
            interval,
            last_line: None,
            counts: [0; 3],
        }
    }

    /// Counts a refusal; returns the counts to log when a line is due.
    pub fn note(&mut self, now: Instant, scope: LimitScope) -> Option<RefusalSummary> {
        self.counts[scope.index()] += 1;
        let due = self
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        let [source, user_at_source, user] = std::mem::take(&mut self.counts);
        Some(RefusalSummary {
            source,
            user_at_source,
            user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Small iteration counts keep debug-build tests fast (except the RFC vector).
    const TEST_ITERATIONS: u32 = 2;
    const TEST_CLIENT: ClientConfig = ClientConfig {
        min_iterations: 1,
        max_iterations: 16,
    };

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn config() -> AuthConfig {
        AuthConfig::new([9; 32], TEST_ITERATIONS)
    }

    struct Outcome {
        server: Result<(ServerSignature, SessionKey), AuthError>,
        challenge: Challenge,
    }

    /// One full log-in: `registered` is the password the store holds (or no
    /// user), `typed` what the client types.
    fn login(user: &str, registered: Option<&str>, typed: &str, rng: &mut StdRng) -> Outcome {
        let verifier = registered.map(|p| Verifier::new(p, TEST_ITERATIONS, rng));
        let (client, hello) = ClientFirst::with_config(user, TEST_CLIENT, rng).expect("valid user");
        let (server, challenge) =
            ServerFirst::new(&config(), &hello, verifier.as_ref(), rng).expect("valid hello");
        let (_client, proof) = client.respond(typed, &challenge).expect("valid challenge");
        Outcome {
            server: server.verify(&proof),
            challenge,
        }
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 §3.
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap_or_default();
        let verifier = Verifier::with_salt("pencil", &salt, 4096);
        let (client, hello) = ClientFirst::with_nonce(
            "user",
            "rOprNGfwEbeRWgbNEkqO".into(),
            ClientConfig::default(),
        )
        .expect("valid");
        let (server, challenge) = ServerFirst::with_server_nonce(
            &config(),
            &hello,
            Some(&verifier),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        )
        .expect("valid");
        assert_eq!(
            challenge.server_nonce,
            "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        );
        assert_eq!(challenge.iterations, 4096);
        assert_eq!(challenge.salt, salt);
        let (client, proof) = client.respond("pencil", &challenge).expect("valid");
        assert_eq!(proof.channel_binding, "biws");
        assert_eq!(
            BASE64.encode(&proof.proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let (signature, server_key) = server.verify(&proof).expect("RFC proof verifies");
        assert_eq!(
            BASE64.encode(&signature.signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let client_key = client
            .verify_server(&signature)
            .expect("RFC signature verifies");
        assert_eq!(client_key, server_key);
    }

    /// The RFC 7677 exchange again, bound to a TLS channel whose exporter value is the bytes
    /// 0x00..=0x1f (the worked vector of docs/PROTOCOL.md).
    #[test]
    fn tls_exporter_channel_binding_vector() {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap_or_default();
        let verifier = Verifier::with_salt("pencil", &salt, 4096);
        let exporter: Vec<u8> = (0u8..32).collect();
        let start = || {
            let (client, hello) = ClientFirst::with_nonce(
                "user",
                "rOprNGfwEbeRWgbNEkqO".into(),
                ClientConfig::default(),
            )
            .expect("valid");
            let (server, challenge) = ServerFirst::with_server_nonce(
                &config(),
                &hello,
                Some(&verifier),
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            )
            .expect("valid");
            (client, server, challenge)
        };
        let (client, server, challenge) = start();
        let (client, proof) = client
            .respond_bound("pencil", &challenge, Some(&exporter))
            .expect("valid");
        assert_eq!(
            proof.channel_binding,
            "cD10bHMtZXhwb3J0ZXIsLAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
        );
        assert_eq!(
            BASE64.encode(&proof.proof),
            "QC6CS20quADQRb3mT99YUH+n3VJxUvzuK0K0E1Vrs2M="
        );
        let (signature, server_key) = server
            .verify_bound(&proof, Some(&exporter))
            .expect("bound proof verifies on the same channel");
        assert_eq!(
            BASE64.encode(&signature.signature),
            "2GiAgapEppLVlUXbxUDksL3VgYHzuqiK5tR4mhJGgvs="
        );
        assert_eq!(client.verify_server(&signature).expect("ok"), server_key);

        // The same proof on another TLS session (a man in the middle relays it): refused.
        let (_, server, _) = start();
        let mut other = exporter.clone();
        other[31] ^= 1;
        assert_eq!(
            server.verify_bound(&proof, Some(&other)).err(),
            Some(AuthError::ChannelBindingMismatch)
        );
        // ... and on a plain connection (the man in the middle talks plain TCP onwards).
        let (_, server, _) = start();
        assert_eq!(
            server.verify_bound(&proof, None).err(),
            Some(AuthError::ChannelBindingUnavailable)
        );
        // Rewriting c= to "biws" breaks the proof (the client signed the binding).
        let (_, server, _) = start();
        let stripped = ClientProof {
            channel_binding: "biws".into(),
            ..proof.clone()
        };
        assert_eq!(
            server.verify_bound(&stripped, Some(&exporter)).err(),
            Some(AuthError::Rejected)
        );
        // An unbound log-in (`n,,`) over TLS is accepted: only the client can insist.
        let (client, server, challenge) = start();
        let (_, plain) = client.respond("pencil", &challenge).expect("valid");
        assert!(server.verify_bound(&plain, Some(&exporter)).is_ok());
        // A signature for the unbound exchange does not verify for the bound one.
        let (client, server, challenge) = start();
        let (bound_client, _) = client
            .respond_bound("pencil", &challenge, Some(&exporter))
            .expect("valid");
        let (unbound_sig, _) = server.verify(&plain).expect("ok");
        assert_eq!(
            bound_client.verify_server(&unbound_sig).err(),
            Some(AuthError::ServerNotAuthenticated)
        );
        // Other GS2 headers and junk: unsupported.
        for c in ["eSws", "cD10bHMtdW5pcXVlLCw=", "!!", &"A".repeat(300)] {
            let (_, server, challenge) = start();
            let p = ClientProof {
                channel_binding: c.into(),
                nonce: challenge.server_nonce,
                proof: vec![0; 32],
            };
            assert_eq!(
                server.verify_bound(&p, Some(&exporter)).err(),
                Some(AuthError::ChannelBinding),
                "{c}"
            );
        }
    }

    #[test]
    fn success_gives_both_sides_the_same_session_key() {
        let mut rng = rng();
        let verifier = Verifier::new("correct horse", TEST_ITERATIONS, &mut rng);
        let (client, hello) = ClientFirst::with_config("alice", TEST_CLIENT, &mut rng).expect("ok");
        let (server, challenge) =
            ServerFirst::new(&config(), &hello, Some(&verifier), &mut rng).expect("ok");
        assert_eq!(server.user(), "alice");
        assert!(challenge.server_nonce.starts_with(&hello.client_nonce));
        let (client, proof) = client.respond("correct horse", &challenge).expect("ok");
        let (signature, server_key) = server.verify(&proof).expect("right password");
        let client_key = client.verify_server(&signature).expect("real gateway");
        assert_eq!(client_key, server_key);
        assert_ne!(client_key.as_bytes(), &[0; 32]);
        // A second log-in gets a different session key.
        assert_ne!(
            login("alice", Some("pw"), "pw", &mut rng)
                .server
                .map(|(_, k)| k)
                .ok(),
            Some(client_key)
        );
    }

    #[test]
    fn wrong_password_and_unknown_user_look_the_same() {
        let mut rng = rng();
        let wrong = login("alice", Some("right"), "wrong", &mut rng);
        let unknown = login("mallory", None, "anything", &mut rng);
        assert_eq!(wrong.server.as_ref().err(), Some(&AuthError::Rejected));
        assert_eq!(unknown.server.as_ref().err(), Some(&AuthError::Rejected));
        // The challenges have the same shape.
        assert_eq!(wrong.challenge.salt.len(), unknown.challenge.salt.len());
        assert_eq!(wrong.challenge.iterations, unknown.challenge.iterations);
        assert_eq!(
            wrong.challenge.server_nonce.len(),
            unknown.challenge.server_nonce.len()
        );
        // An unknown user's salt is stable across probes, differs per user
        // and per server secret.
        let again = login("mallory", None, "other", &mut rng);
        assert_eq!(unknown.challenge.salt, again.challenge.salt);
        assert_ne!(unknown.challenge.server_nonce, again.challenge.server_nonce);
        let other_user = login("mallorz", None, "x", &mut rng);
        assert_ne!(unknown.challenge.salt, other_user.challenge.salt);
        let (_, hello) = ClientFirst::with_config("mallory", TEST_CLIENT, &mut rng).expect("ok");
        let (_, other_secret) =
            ServerFirst::new(&AuthConfig::new([1; 32], 2), &hello, None, &mut rng).expect("ok");
        assert_ne!(unknown.challenge.salt, other_secret.salt);
        // Even the right "password" for a decoy cannot succeed: the proof's
        // ClientKey cannot hash to the decoy StoredKey.
        assert_eq!(
            login("ghost", None, "", &mut rng).server.err(),
            Some(AuthError::Rejected)
        );
    }

    #[test]
    fn replayed_proof_fails_against_a_new_challenge() {
        let mut rng = rng();
        let verifier = Verifier::new("pw", TEST_ITERATIONS, &mut rng);
        let (client, hello) = ClientFirst::with_config("bob", TEST_CLIENT, &mut rng).expect("ok");
        let (server, challenge) =
            ServerFirst::new(&config(), &hello, Some(&verifier), &mut rng).expect("ok");
        let (_, captured) = client.respond("pw", &challenge).expect("ok");
        assert!(server.verify(&captured).is_ok());

        // The attacker replays the same Hello; the gateway picks a fresh nonce.
        let (server2, challenge2) =
            ServerFirst::new(&config(), &hello, Some(&verifier), &mut rng).expect("ok");
        assert_ne!(challenge2.server_nonce, challenge.server_nonce);
        assert_eq!(server2.verify(&captured).err(), Some(AuthError::Rejected));
        // Rewriting the nonce to the new one does not help: the proof is bound
        // to the old AuthMessage.
        let (server3, challenge3) =
            ServerFirst::new(&config(), &hello, Some(&verifier), &mut rng).expect("ok");
        let forged = ClientProof {
            nonce: challenge3.server_nonce.clone(),
            ..captured.clone()
        };
        assert_eq!(server3.verify(&forged).err(), Some(AuthError::Rejected));
    }

    #[test]
    fn tampered_server_signature_fails_on_the_client() {
        let mut rng = rng();
        let verifier = Verifier::new("pw", TEST_ITERATIONS, &mut rng);
        let (client, hello) = ClientFirst::with_config("carol", TEST_CLIENT, &mut rng).expect("ok");
        let (server, challenge) =
            ServerFirst::new(&config(), &hello, Some(&verifier), &mut rng).expect("ok");
        let (client, proof) = client.respond("pw", &challenge).expect("ok");
        let (mut signature, _) = server.verify(&proof).expect("ok");
        signature.signature[31] ^= 1;
        assert_eq!(
            client.verify_server(&signature).err(),
            Some(AuthError::ServerNotAuthenticated)
        );
    }

    #[test]
    fn fake_gateway_without_the_verifier_is_caught() {
        let mut rng = rng();
        // A gateway that does not know the user answers with a decoy; the
        // client's password then matches nothing the fake can sign.
        let (client, hello) = ClientFirst::with_config("dave", TEST_CLIENT, &mut rng).expect("ok");
        let fake = Verifier::new("guess", TEST_ITERATIONS, &mut rng);
        let (server, challenge) =
            ServerFirst::new(&config(), &hello, Some(&fake), &mut rng).expect("ok");
        let (client, proof) = client.respond("real password", &challenge).expect("ok");
        assert_eq!(server.verify(&proof).err(), Some(AuthError::Rejected));
        let forged = ServerSignature {
            signature: vec![0; 32],
        };
        assert_eq!(
            client.verify_server(&forged).err(),
            Some(AuthError::ServerNotAuthenticated)
        );
    }

    #[test]
    fn client_refuses_bad_challenges() {
        let mut rng = rng();
        let good = |client_nonce: &str| Challenge {
            server_nonce: format!("{client_nonce}ABCDEFGHIJKLMNOPQRSTUVWX"),
            salt: vec![1; 16],
            iterations: 4,
        };
        let start =
            |rng: &mut StdRng| ClientFirst::with_config("erin", TEST_CLIENT, rng).expect("ok");
        let (client, hello) = start(&mut rng);
        assert!(client.respond("pw", &good(&hello.client_nonce)).is_ok());

        type Tamper = fn(&mut Challenge);
        let cases: [(Tamper, AuthError); 6] = [
            (
                |c| c.server_nonce = "someone else's nonce and more".into(),
                AuthError::NonceMismatch,
            ),
            (
                |c| c.server_nonce.truncate(c.server_nonce.len() - 20),
                AuthError::InvalidNonce {
                    field: "server nonce",
                    reason: "too short",
                },
            ),
            (
                |c| c.server_nonce.push_str(",,,"),
                AuthError::InvalidNonce {
                    field: "server nonce",
                    reason: "not printable ASCII without comma",
                },
            ),
            (
                |c| c.salt = vec![],
                AuthError::SaltLength {
                    len: 0,
                    min: 8,
                    max: 128,
                },
            ),
            (
                |c| c.iterations = 0,
                AuthError::Iterations {
                    got: 0,
                    min: 1,
                    max: 16,
                },
            ),
            (
                |c| c.iterations = u32::MAX,
                AuthError::Iterations {
                    got: u32::MAX,
                    min: 1,
                    max: 16,
                },
            ),
        ];
        for (tamper, expected) in cases {
            let (client, hello) = start(&mut rng);
            let mut challenge = good(&hello.client_nonce);
            tamper(&mut challenge);
            assert_eq!(client.respond("pw", &challenge).err(), Some(expected));
        }
        // The default config refuses fewer than 4096 iterations.
        let (client, hello) = ClientFirst::new("erin", &mut rng).expect("ok");
        assert!(matches!(
            client.respond("pw", &good(&hello.client_nonce)),
            Err(AuthError::Iterations {
                got: 4,
                min: 4096,
                ..
            })
        ));
    }

    #[test]
    fn server_refuses_bad_hellos_and_channel_bindings() {
        let mut rng = rng();
        let hello = |user: &str, nonce: &str| Hello {
            user: user.into(),
            client_nonce: nonce.into(),
        };
        let nonce = "0123456789abcdef";
        for (h, expected) in [
            (
                hello("", nonce),
                AuthError::InvalidUser(InvalidUser { reason: "empty" }),
            ),
            (
                hello("a b", nonce),
                AuthError::InvalidUser(InvalidUser {
                    reason: "contains a control character or white space",
                }),
            ),
            (
                hello(&"x".repeat(65), nonce),
                AuthError::InvalidUser(InvalidUser {
                    reason: "longer than 64 bytes",
                }),
            ),
            (
                hello("ok", "short"),
                AuthError::InvalidNonce {
                    field: "client nonce",
                    reason: "too short",
                },
            ),
            (
                hello("ok", "0123456789abcdef,"),
                AuthError::InvalidNonce {
                    field: "client nonce",
                    reason: "not printable ASCII without comma",
                },
            ),
            (
                hello("ok", &"n".repeat(129)),
                AuthError::InvalidNonce {
                    field: "client nonce",
                    reason: "too long",
                },
            ),
        ] {
            assert_eq!(
                ServerFirst::new(&config(), &h, None, &mut rng).err(),
                Some(expected)
            );
        }
        let (server, challenge) =
            ServerFirst::new(&config(), &hello("ok", nonce), None, &mut rng).expect("ok");
        let proof = ClientProof {
            channel_binding: "eSws".into(),
            nonce: challenge.server_nonce,
            proof: vec![0; 32],
        };
        assert_eq!(server.verify(&proof).err(), Some(AuthError::ChannelBinding));
    }

    #[test]
    fn user_names_with_comma_and_equals_are_escaped_and_work() {
        assert_eq!(escape_user("a,b=c"), "a=2Cb=3Dc");
        assert_eq!(unescape_user("a=2Cb=3Dc").as_deref(), Ok("a,b=c"));
        assert_eq!(unescape_user("=3D=2C").as_deref(), Ok("=,"));
        assert!(unescape_user("a=2cb").is_err());
        assert!(unescape_user("a=").is_err());
        assert!(unescape_user("a,b").is_err());
        let mut rng = rng();
        assert!(login("a,b=c", Some("pw"), "pw", &mut rng).server.is_ok());
        // "a=2Cb" (literal) and "a,b" are different users with different AuthMessages.
        let ex = |user| {
            Exchange {
                user,
                client_nonce: "n",
                nonce: "nn",
                salt: b"s",
                iterations: 1,
                channel_binding: "biws",
            }
            .auth_message()
        };
        assert_ne!(ex("a=2Cb"), ex("a,b"));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let mut rng = rng();
        let verifier = Verifier::with_salt("pw", b"saltsalt", 1);
        let key = SessionKey::from_bytes([0xab; 32]);
        let config = AuthConfig::new([0xcd; 32], 1);
        let (client, hello) = ClientFirst::with_config("frank", TEST_CLIENT, &mut rng).expect("ok");
        let (server, challenge) =
            ServerFirst::new(&config, &hello, Some(&verifier), &mut rng).expect("ok");
        let server_debug = format!("{server:?}");
        let (client, proof) = client.respond("pw", &challenge).expect("ok");
        let (signature, _) = server.verify(&proof).expect("ok");
        let texts = [
            format!("{verifier:?}"),
            format!("{key:?}"),
            format!("{config:?}"),
            server_debug,
            format!("{client:?}"),
            format!("{proof:?}"),
            format!("{signature:?}"),
        ];
        let secrets = [
            format!("{:?}", verifier.stored_key),
            format!("{:?}", verifier.server_key),
            format!("{:?}", key.as_bytes()),
            format!("{:?}", config.secret()),
            format!("{:?}", proof.proof),
            format!("{:?}", signature.signature),
        ];
        for text in &texts {
            assert!(text.contains("redacted"), "{text}");
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "{text}");
            }
            assert!(!text.contains("171, 171"), "{text}"); // 0xab bytes
        }
    }

    #[test]
    fn verifier_equality_and_derived_keys() {
        let a = Verifier::with_salt("pw", b"saltsalt", 3);
        assert_eq!(a, Verifier::with_salt("pw", b"saltsalt", 3));
        assert_ne!(a, Verifier::with_salt("pw2", b"saltsalt", 3));
        assert_ne!(a, Verifier::with_salt("pw", b"saltsalx", 3));
        assert_ne!(a, Verifier::with_salt("pw", b"saltsalt", 4));
        assert_eq!(Verifier::with_salt("pw", b"saltsalt", 0).iterations, 1);
        let key = SessionKey::from_bytes([1; 32]);
        assert_eq!(key.derive("leg", b"1"), key.derive("leg", b"1"));
        assert_ne!(key.derive("leg", b"1"), key.derive("leg", b"2"));
        assert_ne!(key.derive("leg", b"1"), key.derive("leg1", b""));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verify_never_panics(
            proof in proptest::collection::vec(any::<u8>(), 0..80),
            nonce in ".{0,200}",
            channel_binding in prop_oneof![Just("biws".to_string()), ".{0,8}"],
            known in any::<bool>(),
        ) {
            let mut rng = rng();
            let verifier = Verifier::with_salt("pw", b"saltsalt", 1);
            let hello = Hello { user: "grace".into(), client_nonce: "0123456789abcdef".into() };
            let (server, challenge) = ServerFirst::new(
                &config(), &hello, known.then_some(&verifier), &mut rng,
            ).expect("valid hello");
            // Half the time use the right nonce, so the proof check itself runs.
            let nonce = if proof.len() % 2 == 0 { challenge.server_nonce } else { nonce };
            let result = server.verify(&ClientProof { channel_binding, nonce, proof });
            prop_assert!(result.is_err());
        }

        #[test]
        fn server_first_never_panics(user in ".{0,80}", client_nonce in ".{0,140}") {
            let mut rng = rng();
            let _ = ServerFirst::new(&config(), &Hello { user, client_nonce }, None, &mut rng);
        }

        #[test]
        fn respond_never_panics(
            server_nonce in ".{0,200}",
            salt in proptest::collection::vec(any::<u8>(), 0..200),
            iterations in prop_oneof![0u32..8, any::<u32>()],
            prefix in any::<bool>(),
        ) {
            let mut rng = rng();
            let (client, hello) = ClientFirst::with_config("heidi", TEST_CLIENT, &mut rng)
                .expect("valid");
            let server_nonce = if prefix {
                format!("{}{server_nonce}", hello.client_nonce)
            } else {
                server_nonce
            };
            let _ = client.respond("pw", &Challenge { server_nonce, salt, iterations });
        }

        #[test]
        fn channel_binding_check_never_panics(
            c in ".{0,400}",
            ours in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) {
            // Half the time the client's value for our own channel, so acceptance is tested.
            let c = match &ours {
                Some(o) if c.len() % 2 == 0 => channel_binding_value(Some(o)),
                _ => c,
            };
            let accepted = check_channel_binding(&c, ours.as_deref()).is_ok();
            let ours_value = ours.as_deref().map(|o| channel_binding_value(Some(o)));
            prop_assert_eq!(accepted, c == "biws" || Some(&c) == ours_value.as_ref());
        }

        #[test]
        fn escape_round_trips(user in ".{0,40}") {
            let escaped = escape_user(&user);
            prop_assert!(!escaped.contains(','));
            prop_assert_eq!(unescape_user(&escaped), Ok(user));
        }

        #[test]
        fn unescape_never_panics(s in ".{0,40}") {
            let _ = unescape_user(&s);
        }
    }

    // ---- rate limiter ----

    fn bucket(burst: u32, secs: u64) -> Option<Bucket> {
        Some(Bucket {
            burst,
            refill_every: Duration::from_secs(secs),
        })
    }

    fn limiter(max_entries: usize) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            per_ip: bucket(6, 10),
            per_user_source: bucket(3, 60),
            per_user: bucket(4, 30),
            max_backoff: Duration::from_secs(3600),
            max_entries,
            ipv6_prefix_len: 64,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn attempts_are_charged_at_begin_and_pending_ones_count() {
        // 200 attempts that all start before any finishes: only the bucket's
        // worth is let through, from one source for one user.
        let t0 = Instant::now();
        let mut rl = limiter(100);
        let through = (0..200)
            .filter(|_| rl.begin(t0, ip("192.0.2.1"), "alice").is_ok())
            .count();
        assert_eq!(through, 3, "per user at this source");
        // Across user names, the source's own bucket stops it.
        let mut rl = limiter(100);
        let through = (0..200)
            .filter(|i| rl.begin(t0, ip("192.0.2.1"), &format!("u{i}")).is_ok())
            .count();
        assert_eq!(through, 6, "per source");
        assert_eq!(
            rl.begin(t0, ip("192.0.2.1"), "zed"),
            Err(RateLimited {
                scope: LimitScope::SourceIp,
                retry_after: Duration::from_secs(10)
            })
        );
    }

    #[test]
    fn success_gives_the_charge_back() {
        let t0 = Instant::now();
        let mut rl = limiter(100);
        for _ in 0..50 {
            rl.begin(t0, ip("192.0.2.1"), "alice").unwrap();
            rl.succeeded(t0, ip("192.0.2.1"), "alice");
        }
        // Abandoned attempts (no success) stay charged.
        for _ in 0..3 {
            rl.begin(t0, ip("192.0.2.1"), "alice").unwrap();
        }
        assert_eq!(
            rl.begin(t0, ip("192.0.2.1"), "alice").unwrap_err().scope,
            LimitScope::UserAtSource
        );
    }

    #[test]
    fn a_guesser_never_locks_the_user_out_at_a_clean_source() {
        let t0 = Instant::now();
        let mut rl = limiter(10_000);
        let secs = |s| t0 + Duration::from_secs(s);
        // Many sources guess alice's password: the per-user bucket runs dry and
        // every failing source is slowed down...
        let mut refused_user = 0;
        for i in 0..40u32 {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + i));
            for _ in 0..3 {
                if let Err(e) = rl.begin(secs(1), src, "alice") {
                    assert_eq!(e.scope, LimitScope::User);
                    refused_user += 1;
                }
            }
        }
        // ...each new source gets its one reserved attempt, then waits on the
        // user's bucket: the first source took 3 of its 4 tokens, the second
        // the last one, the 38 others only their reserved attempt.
        assert_eq!(refused_user, 120 - (3 + 1 + 38));
        let guesser = IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6405));
        assert_eq!(
            rl.check(secs(2), guesser, "alice").unwrap_err().scope,
            LimitScope::User
        );
        // The real user from a source that has not failed logs in at once, and
        // again and again (each success gives its charge back).
        for _ in 0..10 {
            rl.begin(secs(2), ip("203.0.113.7"), "alice").unwrap();
            rl.succeeded(secs(2), ip("203.0.113.7"), "alice");
        }
        // One typo there makes that source a failing one, slowed like the rest
        // (a slow-down, not a lock-out: the user's bucket refills).
        rl.begin(secs(2), ip("203.0.113.7"), "alice").unwrap();
        assert_eq!(
            rl.check(secs(2), ip("203.0.113.7"), "alice")
                .unwrap_err()
                .scope,
            LimitScope::User
        );
        assert!(rl.check(secs(2), ip("203.0.113.8"), "alice").is_ok());
        // Other users are untouched.
        assert!(rl.check(secs(2), guesser, "bob").is_ok());
    }

    #[test]
    fn lock_outs_back_off_and_reset_once_refilled() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(RateLimitConfig {
            per_ip: None,
            per_user: None,
            per_user_source: bucket(2, 10),
            max_backoff: Duration::from_secs(35),
            ..RateLimitConfig::default()
        });
        let a = ip("192.0.2.1");
        let at = |s: u64| t0 + Duration::from_secs(s);
        rl.begin(at(0), a, "u").unwrap();
        rl.begin(at(0), a, "u").unwrap();
        // First lock-out: the base period.
        assert_eq!(
            rl.check(at(0), a, "u").unwrap_err().retry_after,
            Duration::from_secs(10)
        );
        rl.begin(at(10), a, "u").unwrap();
        // Emptied again before it refilled: twice as long, then 4x, capped at 35 s.
        assert_eq!(
            rl.check(at(10), a, "u").unwrap_err().retry_after,
            Duration::from_secs(20)
        );
        assert!(rl.check(at(29), a, "u").is_err());
        rl.begin(at(30), a, "u").unwrap();
        assert_eq!(
            rl.check(at(30), a, "u").unwrap_err().retry_after,
            Duration::from_secs(35)
        );
        rl.begin(at(65), a, "u").unwrap();
        assert_eq!(
            rl.check(at(65), a, "u").unwrap_err().retry_after,
            Duration::from_secs(35)
        );
        // Left alone until full again, it starts over at the base period.
        let t = 65 + 2 * 35;
        rl.begin(at(t), a, "u").unwrap();
        rl.begin(at(t), a, "u").unwrap();
        assert_eq!(
            rl.check(at(t), a, "u").unwrap_err().retry_after,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn ipv6_is_limited_per_prefix_and_mapped_v4_as_v4() {
        let t0 = Instant::now();
        let mut rl = limiter(100);
        for i in 1..=6 {
            rl.begin(t0, ip(&format!("2001:db8:1:2::{i}")), &format!("u{i}"))
                .unwrap();
        }
        assert!(rl.check(t0, ip("2001:db8:1:2:ffff::9"), "x").is_err());
        assert!(rl.check(t0, ip("2001:db8:1:3::1"), "x").is_ok());
        for i in 1..=6 {
            rl.begin(t0, ip("::ffff:192.0.2.5"), &format!("v{i}"))
                .unwrap();
        }
        assert!(rl.check(t0, ip("192.0.2.5"), "x").is_err());
        assert_eq!(source_key(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(source_key(ip("2001:db8::1"), 200), ip("2001:db8::1"));
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let t0 = Instant::now();
        let mut rl = limiter(4);
        for i in 0..1000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = rl.begin(
                t0 + Duration::from_millis(u64::from(i)),
                addr,
                &format!("user{i}"),
            );
            let (ips, user_sources, users) = rl.len();
            assert!(ips <= 4 && user_sources <= 4 && users <= 4);
        }
        // Re-charging an entry moves it to the back of the eviction order.
        let mut rl = RateLimiter::new(RateLimitConfig {
            per_ip: bucket(2, 60),
            per_user: None,
            per_user_source: None,
            max_entries: 2,
            ..RateLimitConfig::default()
        });
        rl.begin(t0, ip("192.0.2.1"), "a").unwrap();
        rl.begin(t0, ip("192.0.2.2"), "b").unwrap();
        rl.begin(t0, ip("192.0.2.1"), "a").unwrap();
        rl.begin(t0, ip("192.0.2.3"), "c").unwrap(); // evicts .2, not .1
        assert!(rl.check(t0, ip("192.0.2.1"), "a").is_err());
        assert!(rl.check(t0, ip("192.0.2.2"), "b").is_ok());
    }

    #[test]
    fn disabled_scopes_and_long_names() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(RateLimitConfig {
            per_ip: None,
            per_user_source: None,
            per_user: Some(Bucket {
                burst: 1,
                refill_every: Duration::ZERO,
            }),
            ..RateLimitConfig::default()
        });
        let long = "é".repeat(1000);
        for _ in 0..100 {
            rl.begin(t0, ip("192.0.2.1"), &long).unwrap();
        }
        // Zero refill interval: always refilled. No per-IP scope: nothing kept.
        assert_eq!(rl.len(), (0, 0, 1));
        assert!(user_key(&long).len() <= MAX_USER_LEN);
        // Time going backwards does not panic or refill.
        let mut rl = limiter(10);
        let t1 = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            rl.begin(t1, ip("192.0.2.1"), "z").unwrap();
        }
        assert!(rl.check(t0, ip("192.0.2.1"), "z").is_err());
        assert!(!rl.is_empty());
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate_with_counts() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let first = log.note(t0, LimitScope::SourceIp);
        assert_eq!(
            first,
            Some(RefusalSummary {
                source: 1,
                user_at_source: 0,
                user: 0
            })
        );
        let mut lines = 0;
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_millis(i);
            let scope = LimitScope::ALL[(i % 3) as usize];
            lines += usize::from(log.note(at, scope).is_some());
        }
        assert_eq!(
            lines, 0,
            "10 000 refusals in 10 s: no line before the interval"
        );
        let s = log
            .note(t0 + Duration::from_secs(10), LimitScope::User)
            .unwrap();
        assert_eq!(s.source + s.user_at_source + s.user, 10_001);
    }

    proptest::proptest! {
        #[test]
        fn limiter_never_panics_and_stays_bounded(
            ops in proptest::collection::vec((0u8..3, 0u8..8, 0u8..4, 0u64..100_000), 0..300)
        ) {
            let t0 = Instant::now();
            let mut rl = limiter(5);
            for (op, src, user, ms) in ops {
                let now = t0 + Duration::from_millis(ms);
                let src = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, src));
                let user = format!("u{user}");
                match op {
                    0 => { let _ = rl.begin(now, src, &user); }
                    1 => rl.succeeded(now, src, &user),
                    _ => { let _ = rl.check(now, src, &user); }
                }
                let (a, b, c) = rl.len();
                proptest::prop_assert!(a <= 5 && b <= 5 && c <= 5);
            }
        }
    }
}
