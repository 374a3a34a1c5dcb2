//! The HTTP admin listener: `GET /metrics` (Prometheus text exposition) and `GET /health`.
//!
//! It runs as tasks on the control thread's tokio runtime (axum over hyper), never on a shard.
//! A request never blocks the control loop: the core's numbers come back on a oneshot from the
//! loop (a copy of [`GatewayStats`], taken between two events), and the shards are asked here,
//! each with a short time-out, by the same commands the dumps and the watchdog use: a snapshot
//! for `/metrics` (whose latency histogram goes into the [`Ledger`], so the next dump still
//! gets it), a ping for `/health`.
//!
//! `/health` answers `200 ready` only when the control loop and every shard answer within
//! [`HEALTH_TIMEOUT`] and the gateway is not draining; otherwise `503` with the reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

use crate::control::gateway::GatewayStats;
use crate::metrics::prom::{self, Ledger, ShardNumbers, ShardReading};
use crate::shard::ShardHandle;

/// How long `/health` waits for each shard's ping and for the control loop.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `/metrics` waits for each shard's snapshot.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the admin tasks share with the control loop.
#[derive(Clone)]
pub struct AdminState {
    pub shards: Vec<ShardHandle>,
    pub ledger: Arc<Mutex<Ledger>>,
    /// Asks the control loop for a copy of the core's numbers.
    pub stats: mpsc::Sender<oneshot::Sender<GatewayStats>>,
    pub start_time_unix_s: f64,
}

/// Serves the admin endpoints on `listener` until the runtime ends.
pub fn spawn(listener: tokio::net::TcpListener, state: AdminState) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin listener stopped: {e}");
        }
    });
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn core_stats(state: &AdminState, wait: Duration) -> Option<GatewayStats> {
    let (tx, rx) = oneshot::channel();
    state.stats.try_send(tx).ok()?;
    tokio::time::timeout(wait, rx).await.ok()?.ok()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let Some(gw) = core_stats(&state, SCRAPE_TIMEOUT).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the control loop did not answer\n",
        )
            .into_response();
    };
    // Each shard's answer is awaited by a task of its own, without a time-out, so that a late
    // answer's latency histogram still reaches the ledger (and the next dump); the scrape
    // waits for it only up to SCRAPE_TIMEOUT.
    let mut waits = Vec::with_capacity(state.shards.len());
    for h in &state.shards {
        let (tx, rx) = oneshot::channel();
        let (h2, ledger) = (h.clone(), state.ledger.clone());
        tokio::spawn(async move {
            if let Ok(s) = h2.snapshot(false).await {
                ledger
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_latency(s.shard, &s.latency);
                let _ = tx.send(ShardNumbers {
                    counters: s.counters,
                    sessions: s.sessions,
                    tcp_conns: s.tcp_conns,
                    tcp_queued: s.tcp_queued,
                    buffers_in_use: s.buffers_in_use,
                    leg_sockets: s.leg_sockets,
                });
            }
        });
        waits.push((h.index, rx));
    }
    let mut readings = Vec::with_capacity(waits.len());
    let deadline = tokio::time::Instant::now() + SCRAPE_TIMEOUT;
    for (shard, rx) in waits {
        let answered = tokio::time::timeout_at(deadline, rx)
            .await
            .ok()
            .and_then(Result::ok);
        if answered.is_none() {
            tracing::warn!(shard, "shard did not answer a metrics scrape");
        }
        readings.push(ShardReading { shard, answered });
    }
    let body = {
        let ledger = state.ledger.lock().unwrap_or_else(|p| p.into_inner());
        prom::render(&prom::Scrape {
            shards: &readings,
            gateway: &gw,
            ledger: &ledger,
            start_time_unix_s: state.start_time_unix_s,
        })
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn health(State(state): State<AdminState>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    let Some(gw) = core_stats(&state, HEALTH_TIMEOUT).await else {
        return unavailable("not ready: the control loop did not answer\n".into());
    };
    if gw.draining {
        return unavailable("not ready: draining\n".into());
    }
    for h in &state.shards {
        if !matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, h.ping()).await,
            Ok(Ok(()))
        ) {
            return unavailable(format!(
                "not ready: shard {} did not answer within {} ms\n",
                h.index,
                HEALTH_TIMEOUT.as_millis()
            ));
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admin state over `shards`, with a control loop that answers `stats`.
    fn state(shards: Vec<ShardHandle>, stats: GatewayStats) -> AdminState {
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<GatewayStats>>(4);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(stats.clone());
            }
        });
        AdminState {
            shards,
            ledger: Arc::new(Mutex::new(Ledger::new(1))),
            stats: tx,
            start_time_unix_s: 0.0,
        }
    }

    async fn body(r: Response) -> (StatusCode, String) {
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_stuck_shard_makes_health_503_and_metrics_say_it_is_down() {
        let (stuck, _queue) = ShardHandle::stuck(0);
        let s = state(vec![stuck], GatewayStats::default());
        let t = std::time::Instant::now();
        let (code, text) = body(health(State(s.clone())).await).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, "not ready: shard 0 did not answer within 500 ms\n");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "health answers in bounded time"
        );
        let (code, text) = body(metrics(State(s)).await).await;
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("voxgate_shard_up{shard=\"0\"} 0\n"), "{text}");
        assert!(!text.contains("voxgate_shard_packets_total{shard=\"0\""));
    }

    #[tokio::test]
    async fn draining_is_503_and_a_silent_control_loop_too() {
        let s = state(
            Vec::new(),
            GatewayStats {
                draining: true,
                ..GatewayStats::default()
            },
        );
        let (code, text) = body(health(State(s)).await).await;
        assert_eq!(
            (code, text.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
        );
        // A control loop that never answers.
        let (tx, _rx) = mpsc::channel::<oneshot::Sender<GatewayStats>>(4);
        let s = AdminState {
            shards: Vec::new(),
            ledger: Arc::new(Mutex::new(Ledger::new(0))),
            stats: tx,
            start_time_unix_s: 0.0,
        };
        let (code, text) = body(health(State(s)).await).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("control loop did not answer"), "{text}");
        let ok = state(Vec::new(), GatewayStats::default());
        assert_eq!(
            body(health(State(ok)).await).await,
            (StatusCode::OK, "ready\n".into())
        );
    }
}
