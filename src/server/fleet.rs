//! The fleet's Redis side: presence and location of subscribers, node liveness, and the
//! messages between nodes for calls across them ([`crate::control::fleet`] decides; this
//! module only carries out its [`FleetAction`]s and reports back [`FleetInput`]s).
//!
//! Keys (all under the `voxgate:` prefix):
//! - `voxgate:presence:{user}` = node, with a TTL of `presence_ttl_ms` (default 3 heart-beat
//!   intervals), written at log-in, refreshed every heart-beat interval while the node runs,
//!   deleted at log-out (only if it still names this node: a later log-in elsewhere wins).
//! - `voxgate:node:{node}` = `alive`, same TTL and refresh: a node killed with `-9` vanishes
//!   within the TTL, and so do its subscribers' presence keys.
//! - Channel `voxgate:node:{node}`: what other nodes tell this one, each message a JSON
//!   envelope `{from, msg}` sealed with ChaCha20-Poly1305 under the fleet key (random 96-bit
//!   nonce; the channel name is the associated data, so a message for one node does not open
//!   as one for another). Call keys cross Redis only inside such sealed messages.
//!
//! All Redis commands run in order on one task of the control thread's runtime, through a
//! `redis` connection manager that reconnects by itself; the subscriber runs on another task
//! and re-subscribes after a Redis restart. Nothing here blocks the control loop: actions are
//! queued (bounded), answers come back as events.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Event;
use crate::control::fleet::{FleetAction, FleetInput, FleetMsg, NodeId};
use crate::control::gateway::Input;

/// The environment variable with the Redis password (when neither the URL in the config file
/// nor `password_file` has it).
pub const PASSWORD_ENV: &str = "VOXGATE_REDIS_PASSWORD";
/// The environment variable with the fleet key (64 hex digits), when `key_file` is not set.
pub const KEY_ENV: &str = "VOXGATE_FLEET_KEY";
/// Largest sealed message taken from the channel.
const MAX_MESSAGE: usize = 64 * 1024;
/// Actions queued for Redis at most (beyond, they are refused: a look-up is answered with an
/// error, a message is dropped and logged).
const QUEUE: usize = 8192;

/// `[fleet]`: several gateways sharing presence in Redis. Off while `redis` is empty.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSection {
    /// `redis://USER@HOST:PORT/` (an ACL user); the password from the URL (config file only),
    /// else `password_file`, else `$VOXGATE_REDIS_PASSWORD`. Empty: no fleet.
    pub redis: String,
    /// A file (mode 0600) whose first line is the Redis password.
    pub password_file: Option<PathBuf>,
    /// A file (mode 0600) whose first line is the fleet key: 64 hex digits, the same on every
    /// node. Unset: `$VOXGATE_FLEET_KEY`.
    pub key_file: Option<PathBuf>,
    /// This gateway's name in the fleet. Empty: `HOSTNAME:CONTROL_PORT`.
    pub node: String,
    /// Presence and node-liveness TTL; 0: three heart-beat intervals.
    pub presence_ttl_ms: u64,
    /// Bounds connecting to Redis and each command.
    pub timeout_ms: u64,
    /// How long an established call this node relays waits for a party whose gateway (or
    /// control connection) is gone to `resume` it on another gateway; then it ends with
    /// `peer_lost`. At most 600000.
    pub resume_grace_ms: u64,
}

impl Default for FleetSection {
    fn default() -> Self {
        FleetSection {
            redis: String::new(),
            password_file: None,
            key_file: None,
            node: String::new(),
            presence_ttl_ms: 0,
            timeout_ms: 2000,
            resume_grace_ms: 10_000,
        }
    }
}

impl std::fmt::Debug for FleetSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSection")
            .field("redis", &"<not shown: may hold a password>")
            .field("password_file", &self.password_file)
            .field("key_file", &self.key_file)
            .field("node", &self.node)
            .field("presence_ttl_ms", &self.presence_ttl_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("resume_grace_ms", &self.resume_grace_ms)
            .finish()
    }
}

impl FleetSection {
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }

    /// Problems with the section, each naming its key (checked without connecting).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.enabled() {
            return p;
        }
        if !self.redis.starts_with("redis://") {
            p.push("fleet.redis: expected redis://USER@HOST:PORT/".into());
        }
        if self.node.len() > 200 || self.node.chars().any(|c| c.is_whitespace() || c == '/') {
            p.push("fleet.node: at most 200 characters, no spaces or '/'".into());
        }
        if self.resume_grace_ms > 600_000 {
            p.push("fleet.resume_grace_ms: at most 600000 (10 minutes)".into());
        }
        p
    }
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet: {0}")]
    Config(String),
    #[error("fleet: Redis at {url} is unavailable: {error}")]
    Redis { url: String, error: String },
}

/// The URL without its password, for messages.
fn shown(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        None => "(unparsable URL)".into(),
    }
}

/// Seals and opens what crosses Redis.
#[derive(Clone)]
pub struct Seal(ChaCha20Poly1305);

impl Seal {
    pub fn new(key: &[u8; 32]) -> Self {
        Seal(ChaCha20Poly1305::new(Key::from_slice(key)))
    }

    /// `nonce || ciphertext`, the channel as associated data.
    pub fn seal(&self, channel: &str, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let mut out = nonce.to_vec();
        let ct = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: channel.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 seals any message below 256 GiB");
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, channel: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 + 16 || sealed.len() > MAX_MESSAGE {
            return None;
        }
        let (nonce, ct) = sealed.split_at(12);
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: channel.as_bytes(),
                },
            )
            .ok()
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: NodeId,
    msg: FleetMsg,
}

fn channel(node: &str) -> String {
    format!("voxgate:node:{node}")
}

fn presence_key(user: &str) -> String {
    format!("voxgate:presence:{user}")
}

/// The fleet key from `key_file` or the environment.
fn fleet_key(sec: &FleetSection) -> Result<[u8; 32], FleetError> {
    let text = match &sec.key_file {
        Some(f) => crate::store::location::read_password_file(f)
            .map_err(|e| FleetError::Config(format!("key_file: {e}")))?,
        None => std::env::var(KEY_ENV)
            .map_err(|_| {
                FleetError::Config(format!(
                    "no fleet key: set [fleet] key_file (mode 0600) or {KEY_ENV} \
                     (64 hex digits, the same on every node)"
                ))
            })?
            .into_bytes(),
    };
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let bad = || FleetError::Config("the fleet key must be 64 hex digits".into());
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// The connection info: the URL with its password from the config, a file or the environment.
fn connection_info(sec: &FleetSection) -> Result<redis::ConnectionInfo, FleetError> {
    use redis::IntoConnectionInfo;
    let info = sec
        .redis
        .as_str()
        .into_connection_info()
        .map_err(|e| FleetError::Config(format!("redis: {e}")))?;
    let settings = info.redis_settings().clone();
    if settings.password().is_some() {
        return Ok(info);
    }
    let password = match &sec.password_file {
        Some(f) => crate::store::location::read_password_file(f)
            .map_err(|e| FleetError::Config(format!("password_file: {e}")))?,
        None => match std::env::var(PASSWORD_ENV) {
            Ok(p) => p.into_bytes(),
            Err(_) => return Ok(info),
        },
    };
    let password = String::from_utf8(password)
        .map_err(|_| FleetError::Config("the Redis password is not UTF-8".into()))?;
    Ok(info.set_redis_settings(settings.set_password(password)))
}

/// The fleet side of a running gateway: queue actions with [`FleetIo::act`].
pub struct FleetIo {
    pub node: NodeId,
    tx: Option<mpsc::Sender<FleetAction>>,
    worker: tokio::task::JoinHandle<()>,
    subscriber: tokio::task::JoinHandle<()>,
    events: mpsc::Sender<Event>,
}

impl FleetIo {
    /// Connects to Redis (refusing to start when it is unreachable or refuses the
    /// credentials), subscribes to this node's channel and starts refreshing.
    pub(super) async fn start(
        sec: &FleetSection,
        control_port: u16,
        heartbeat: Duration,
        events: mpsc::Sender<Event>,
    ) -> Result<FleetIo, FleetError> {
        let info = connection_info(sec)?;
        let key = fleet_key(sec)?;
        let node = if sec.node.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("{host}:{control_port}")
        } else {
            sec.node.clone()
        };
        let url = shown(&sec.redis);
        let timeout = Duration::from_millis(sec.timeout_ms.clamp(100, 60_000));
        let ttl = if sec.presence_ttl_ms == 0 {
            heartbeat * 3
        } else {
            Duration::from_millis(sec.presence_ttl_ms)
        }
        .max(Duration::from_secs(1));
        let client = redis::Client::open(info).map_err(|e| FleetError::Config(e.to_string()))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let redis_err = |e: redis::RedisError| FleetError::Redis {
            url: url.clone(),
            error: e.to_string(),
        };
        let mut conn =
            tokio::time::timeout(timeout * 2, client.get_connection_manager_with_config(cfg))
                .await
                .map_err(|_| FleetError::Redis {
                    url: url.clone(),
                    error: "connect timed out".into(),
                })?
                .map_err(redis_err)?;
        let _: () = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let seal = Seal::new(&key);
        let (tx, rx) = mpsc::channel(QUEUE);
        // Subscribed before the node says it is alive: nothing sent to it is missed.
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let subscriber = tokio::spawn(subscribe(
            client,
            node.clone(),
            seal.clone(),
            events.clone(),
            Some(subscribed_tx),
        ));
        match tokio::time::timeout(timeout * 2, subscribed_rx).await {
            Ok(Ok(())) => {}
            _ => {
                subscriber.abort();
                return Err(FleetError::Redis {
                    url,
                    error: "could not subscribe to this node's channel".into(),
                });
            }
        }
        let worker = Worker {
            node: node.clone(),
            conn,
            seal,
            events: events.clone(),
            ttl,
            online: HashSet::new(),
            peers: HashMap::new(),
            missing: HashMap::new(),
            // One and a half refresh intervals: the third consecutive check that misses it.
            grace: heartbeat.min(ttl / 2).max(Duration::from_millis(100)) * 3 / 2,
            last_error: None,
        };
        let worker = tokio::spawn(worker.run(rx, heartbeat.min(ttl / 2)));
        tracing::info!(node = %node, redis = %url, ttl_ms = ttl.as_millis() as u64, "fleet: joined");
        Ok(FleetIo {
            node,
            tx: Some(tx),
            worker,
            subscriber,
            events,
        })
    }

    /// Queues an action for Redis (in order).
    pub fn act(&self, a: FleetAction) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(a) {
            let a = match e {
                mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
            };
            tracing::warn!("fleet: Redis queue full: an action is dropped");
            if let FleetAction::Locate { id, .. } = a {
                let _ = self
                    .events
                    .try_send(Event::Input(Input::Fleet(FleetInput::Located {
                        id,
                        node: Err("the fleet's Redis queue is full".into()),
                    })));
            }
        }
    }

    /// Lets the queued actions (log-outs at shutdown) reach Redis, then stops (bounded).
    pub async fn finish(mut self) {
        self.tx = None;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.worker).await;
        self.worker.abort();
        self.subscriber.abort();
    }
}

struct Worker {
    node: NodeId,
    conn: redis::aio::ConnectionManager,
    seal: Seal,
    events: mpsc::Sender<Event>,
    ttl: Duration,
    /// Users logged in here: their presence is refreshed every tick.
    online: HashSet<String>,
    /// Nodes this one talks to, checked for liveness every tick.
    peers: HashMap<NodeId, ()>,
    /// Peers whose liveness key was missing at the last checks: since when. A peer is declared
    /// down only when its key stays missing for [`Worker::grace`]: after a Redis restart
    /// (empty) every live node writes its key again within one of its refresh intervals, and
    /// a single check between the restart and that refresh must not end its calls.
    missing: HashMap<NodeId, tokio::time::Instant>,
    /// How long a peer's key may be missing before the peer is declared down.
    grace: Duration,
    /// The last Redis error logged (the same one is not logged again until it clears).
    last_error: Option<String>,
}

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]`.
const DEL_IF: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<FleetAction>, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                a = rx.recv() => match a {
                    Some(a) => self.act(a).await,
                    None => break,
                },
                _ = tick.tick() => self.refresh().await,
            }
        }
        // Leaving: this node is gone at once rather than when its key expires.
        let _: Result<(), _> = self.conn.del(channel(&self.node)).await;
    }

    fn failed(&mut self, what: &str, e: &redis::RedisError) {
        let text = e.to_string();
        if self.last_error.as_deref() != Some(&text) {
            tracing::error!(error = %text, "fleet: Redis {what} failed");
            self.last_error = Some(text);
        }
    }

    fn ok(&mut self) {
        if self.last_error.take().is_some() {
            tracing::info!("fleet: Redis answers again");
        }
    }

    fn input(&self, i: FleetInput) {
        let _ = self.events.try_send(Event::Input(Input::Fleet(i)));
    }

    async fn act(&mut self, a: FleetAction) {
        let ttl = self.ttl.as_millis() as u64;
        match a {
            FleetAction::Online { user } => {
                // GET: the node that held the user before (its session there is replaced).
                let r: redis::RedisResult<Option<String>> = redis::cmd("SET")
                    .arg(presence_key(&user))
                    .arg(&self.node)
                    .arg("PX")
                    .arg(ttl)
                    .arg("GET")
                    .query_async(&mut self.conn)
                    .await;
                match r {
                    Ok(before) => {
                        self.ok();
                        if let Some(node) = before.filter(|n| *n != self.node) {
                            self.input(FleetInput::WasOnline {
                                user: user.clone(),
                                node,
                            });
                        }
                    }
                    Err(e) => self.failed("presence write", &e),
                }
                self.online.insert(user);
            }
            FleetAction::Offline { user } => {
                self.online.remove(&user);
                let r: redis::RedisResult<i64> = redis::Script::new(DEL_IF)
                    .key(presence_key(&user))
                    .arg(&self.node)
                    .invoke_async(&mut self.conn)
                    .await;
                if let Err(e) = r {
                    self.failed("presence delete", &e);
                }
            }
            FleetAction::Locate { id, user } => {
                let r: redis::RedisResult<Option<String>> =
                    self.conn.get(presence_key(&user)).await;
                let node = match r {
                    Ok(n) => {
                        self.ok();
                        Ok(n)
                    }
                    Err(e) => {
                        self.failed("presence look-up", &e);
                        Err(e.to_string())
                    }
                };
                self.input(FleetInput::Located { id, node });
            }
            FleetAction::Send { node, msg } => {
                let ch = channel(&node);
                let env = Envelope {
                    from: self.node.clone(),
                    msg,
                };
                let plain = match serde_json::to_vec(&env) {
                    Ok(p) => p,
                    Err(e) => return tracing::error!(error = %e, "fleet: message not encoded"),
                };
                let sealed = self.seal.seal(&ch, &plain);
                let r: redis::RedisResult<i64> = self.conn.publish(&ch, sealed).await;
                match r {
                    Ok(0) => {
                        tracing::warn!(node = %node, "fleet: nobody listens on that node's channel");
                        self.peers.remove(&node);
                        self.missing.remove(&node);
                        self.input(FleetInput::NodeDown { node });
                    }
                    Ok(_) => {
                        self.ok();
                        if self.peers.len() < 4096 {
                            self.peers.insert(node, ());
                        }
                    }
                    Err(e) => self.failed("publish", &e),
                }
            }
        }
    }

    /// Every tick: this node's liveness and its users' presence, then the peers' liveness.
    async fn refresh(&mut self) {
        let ttl = self.ttl.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(channel(&self.node))
            .arg("alive")
            .arg("PX")
            .arg(ttl)
            .ignore();
        for user in &self.online {
            pipe.cmd("SET")
                .arg(presence_key(user))
                .arg(&self.node)
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        let r: redis::RedisResult<()> = pipe.query_async(&mut self.conn).await;
        match r {
            Ok(()) => self.ok(),
            Err(e) => return self.failed("presence refresh", &e),
        }
        if self.peers.is_empty() {
            return;
        }
        let peers: Vec<NodeId> = self.peers.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for p in &peers {
            pipe.exists(channel(p));
        }
        let alive: redis::RedisResult<Vec<bool>> = pipe.query_async(&mut self.conn).await;
        if let Ok(alive) = alive {
            let now = tokio::time::Instant::now();
            for (p, alive) in peers.into_iter().zip(alive) {
                if alive {
                    self.missing.remove(&p);
                    continue;
                }
                let since = *self.missing.entry(p.clone()).or_insert(now);
                if now.duration_since(since) >= self.grace {
                    self.missing.remove(&p);
                    self.peers.remove(&p);
                    self.input(FleetInput::NodeDown { node: p });
                }
            }
        }
    }
}

/// Receives this node's messages; re-subscribes (after a pause) whenever the subscription
/// ends (a Redis restart).
async fn subscribe(
    client: redis::Client,
    node: NodeId,
    seal: Seal,
    events: mpsc::Sender<Event>,
    mut subscribed: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let ch = channel(&node);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut ps) => match ps.subscribe(&ch).await {
                Ok(()) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    } else {
                        tracing::info!("fleet: subscribed again");
                    }
                    let mut stream = ps.on_message();
                    while let Some(m) = stream.next().await {
                        let Some(plain) = seal.open(&ch, m.get_payload_bytes()) else {
                            tracing::warn!(
                                "fleet: a message that is not sealed with the fleet key: dropped"
                            );
                            continue;
                        };
                        let env: Envelope = match serde_json::from_slice(&plain) {
                            Ok(e) => e,
                            Err(e) => {
                                tracing::warn!(error = %e, "fleet: undecodable message: dropped");
                                continue;
                            }
                        };
                        let input = FleetInput::Message {
                            from: env.from,
                            msg: env.msg,
                        };
                        if events
                            .send(Event::Input(Input::Fleet(input)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    tracing::warn!("fleet: subscription ended (Redis gone?); re-subscribing");
                }
                Err(e) => tracing::warn!(error = %e, "fleet: subscribe failed"),
            },
            Err(e) => tracing::debug!(error = %e, "fleet: Redis unreachable for the subscription"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_only_with_the_key_and_for_their_channel() {
        let a = Seal::new(&[7; 32]);
        let b = Seal::new(&[8; 32]);
        let s = a.seal("voxgate:node:n1", b"call key inside");
        assert!(!s.windows(8).any(|w| w == b"call key"), "plaintext visible");
        assert_eq!(a.open("voxgate:node:n1", &s).unwrap(), b"call key inside");
        assert!(
            b.open("voxgate:node:n1", &s).is_none(),
            "another key opened it"
        );
        assert!(
            a.open("voxgate:node:n2", &s).is_none(),
            "another channel opened it"
        );
        let mut t = s.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(a.open("voxgate:node:n1", &t).is_none(), "tampered");
        assert!(a.open("voxgate:node:n1", &s[..20]).is_none());
        assert!(
            a.open("voxgate:node:n1", &vec![0; MAX_MESSAGE + 1])
                .is_none()
        );
    }

    proptest::proptest! {
        /// What arrives on a node's channel is untrusted bytes: opening and decoding them
        /// never panics, and only sealed envelopes come through.
        #[test]
        fn arbitrary_channel_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let seal = Seal::new(&[1; 32]);
            proptest::prop_assert!(seal.open("voxgate:node:n", &b).is_none());
            let _ = serde_json::from_slice::<Envelope>(&b);
            // Sealed garbage opens, and then fails to decode without panicking.
            let sealed = seal.seal("voxgate:node:n", &b);
            let plain = seal.open("voxgate:node:n", &sealed).unwrap();
            proptest::prop_assert_eq!(&plain, &b);
            let _ = serde_json::from_slice::<Envelope>(&plain);
        }
    }

    #[test]
    fn envelopes_round_trip() {
        use crate::wire::control::{ClientMsg, HangupReason};
        for msg in [
            FleetMsg::Ring {
                call: 1,
                vconn: 2,
                user: "bob".into(),
            },
            FleetMsg::RingFailed {
                call: 1,
                vconn: 2,
                reason: HangupReason::Busy,
            },
            FleetMsg::FromPhone {
                vconn: 2,
                msg: ClientMsg::HangUp { call: 1 },
            },
            FleetMsg::Release { call: 9, vconn: 2 },
            FleetMsg::Resume {
                call: 9,
                vconn: 2,
                user: "bob".into(),
            },
            FleetMsg::Resumed { call: 9, vconn: 2 },
            FleetMsg::ResumeFailed {
                call: 9,
                vconn: 2,
                reason: HangupReason::NotPermitted,
                detail: "not yours".into(),
            },
        ] {
            let text = serde_json::to_vec(&Envelope {
                from: "a".into(),
                msg,
            })
            .unwrap();
            let back: Envelope = serde_json::from_slice(&text).unwrap();
            assert_eq!(back.from, "a");
            assert_eq!(serde_json::to_vec(&back).unwrap(), text);
        }
    }

    #[test]
    fn the_url_is_shown_without_its_password() {
        let s = shown("redis://voxgate:Hunter2@127.0.0.1:6379/");
        assert!(
            !s.contains("Hunter2") && s.contains("voxgate@127.0.0.1:6379"),
            "{s}"
        );
    }

    #[test]
    fn the_section_names_its_problems() {
        let mut s = FleetSection::default();
        assert!(s.problems().is_empty() && !s.enabled());
        s.redis = "http://x".into();
        s.node = "a b".into();
        let p = s.problems();
        assert!(p.iter().any(|p| p.starts_with("fleet.redis")), "{p:?}");
        assert!(p.iter().any(|p| p.starts_with("fleet.node")), "{p:?}");
    }
}
