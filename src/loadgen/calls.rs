//! `voxgate bench calls`: the call set-up rate of one gateway or of a fleet.
//!
//! `--logged-in` bench subscribers (drawn at random, seeded, from the `--subscribers`
//! provisioned ones, [`super::setup::user`]) log in, phone `i` of them to gateway `i % G` of
//! the `--server` list; then `--concurrency` workers place `--calls` calls between random free
//! pairs (with several gateways, caller and callee always on different gateways: every call
//! crosses the fleet). A call's set-up latency runs from just before the `dial` to the moment
//! both phones hold their `media` instructions (the caller's and the callee's); the callee
//! accepts as soon as it is rung. The caller then hangs up and both phones wait for the end
//! before they are drawn again. The run is bounded by `--max-seconds`; what it measured is
//! printed as one JSON object (and written to `--out`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::setup::user;
use crate::client::session::{Event, Phone, PhoneOptions};
use crate::wire::control::CallId;

/// Time allowed for one call to come up, or to end.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Log-ins running at once.
const CONCURRENT_LOGINS: usize = 32;

#[derive(clap::Args, Debug)]
pub struct CallsArgs {
    /// A gateway's control address `HOST:PORT`; give it once per gateway of the fleet (or a
    /// comma-separated list). Phone `i` logs in to gateway `i % count`.
    #[arg(long, required = true, value_delimiter = ',')]
    server: Vec<String>,
    /// Provisioned bench subscribers (`voxgate bench users N | voxgate user import`).
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Subscribers logged in (drawn at random from the provisioned ones).
    #[arg(long, default_value_t = 1_000)]
    logged_in: usize,
    /// Calls to place.
    #[arg(long, default_value_t = 2_000)]
    calls: usize,
    /// Calls being set up at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Stop placing calls after this many seconds (log-ins included).
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Seed of the draws (who logs in, who calls whom).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Name of this configuration in the results.
    #[arg(long, default_value = "calls")]
    label: String,
    /// Also write the JSON result here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct CallsResult {
    pub label: String,
    pub gateways: usize,
    pub subscribers: usize,
    pub logged_in: usize,
    pub login_seconds: f64,
    pub calls_attempted: usize,
    pub calls_set_up: usize,
    pub calls_failed: usize,
    /// Calls whose two phones were on different gateways.
    pub cross_gateway: usize,
    pub seconds: f64,
    pub setups_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first few failures, as the phones saw them.
    pub errors: Vec<String>,
}

struct Slot {
    phone: Phone,
    events: mpsc::Receiver<Event>,
    gateway: usize,
    index: usize,
}

pub fn run(a: &CallsArgs) -> Result<(), String> {
    if a.logged_in < 2 || a.logged_in > a.subscribers {
        return Err(format!(
            "--logged-in must be between 2 and --subscribers ({})",
            a.subscribers
        ));
    }
    if a.concurrency == 0 || 2 * a.concurrency > a.logged_in {
        return Err("--concurrency must be at least 1 and at most half of --logged-in".into());
    }
    super::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt.block_on(measure(a))?;
    let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    println!("{text}");
    if let Some(p) = &a.out {
        std::fs::write(p, format!("{text}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if r.calls_set_up == 0 {
        return Err(format!("no call was set up: {:?}", r.errors));
    }
    Ok(())
}

async fn measure(a: &CallsArgs) -> Result<CallsResult, String> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.max_seconds);
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut who: Vec<usize> = (0..a.subscribers).collect();
    who.shuffle(&mut rng);
    who.truncate(a.logged_in);
    let gateways = a.server.len();

    // Log in, at most CONCURRENT_LOGINS at once.
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LOGINS));
    let mut set = tokio::task::JoinSet::new();
    for (i, &index) in who.iter().enumerate() {
        let server = a.server[i % gateways].clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            let (u, _, pw) = user(index);
            let opts = PhoneOptions {
                software: Some("voxgate-bench".into()),
                ..PhoneOptions::default()
            };
            let r = tokio::time::timeout(STEP_TIMEOUT, async {
                let (p, ev) = Phone::connect(&server, &u, &pw, opts)
                    .await
                    .map_err(|e| format!("log-in of {u} at {server}: {e}"))?;
                p.wait_capabilities(STEP_TIMEOUT)
                    .await
                    .ok_or_else(|| format!("{u}: no probe result"))?;
                Ok::<_, String>((p, ev))
            })
            .await
            .unwrap_or_else(|_| Err(format!("log-in of {u} at {server} timed out")));
            (i, index, r)
        });
    }
    let mut slots: Vec<Option<Slot>> = (0..a.logged_in).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        let (i, index, r) = j.map_err(|e| e.to_string())?;
        let (phone, events) = r?;
        slots[i] = Some(Slot {
            phone,
            events,
            gateway: i % gateways,
            index,
        });
        if Instant::now() > deadline {
            return Err("--max-seconds passed while logging in".into());
        }
    }
    let login_seconds = start.elapsed().as_secs_f64();

    struct Shared {
        slots: Vec<Option<Slot>>,
        rng: rand::rngs::StdRng,
        left: usize,
        latencies: Vec<Duration>,
        failed: usize,
        cross: usize,
        errors: Vec<String>,
    }
    let shared = Arc::new(Mutex::new(Shared {
        slots,
        rng,
        left: a.calls,
        latencies: Vec::with_capacity(a.calls),
        failed: 0,
        cross: 0,
        errors: Vec::new(),
    }));
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency {
        let shared = shared.clone();
        workers.spawn(async move {
            loop {
                // Draw a free caller and a free callee (on another gateway in a fleet).
                let drawn = {
                    let mut s = shared.lock().unwrap();
                    if s.left == 0 || Instant::now() > deadline {
                        return;
                    }
                    let free: Vec<usize> = (0..s.slots.len())
                        .filter(|&i| s.slots[i].is_some())
                        .collect();
                    let c = free[s.rng.random_range(0..free.len())];
                    let cg = s.slots[c].as_ref().unwrap().gateway;
                    let others: Vec<usize> = free
                        .into_iter()
                        .filter(|&i| {
                            i != c && (gateways == 1 || s.slots[i].as_ref().unwrap().gateway != cg)
                        })
                        .collect();
                    if others.is_empty() {
                        None
                    } else {
                        s.left -= 1;
                        let e = others[s.rng.random_range(0..others.len())];
                        Some((
                            (c, s.slots[c].take().unwrap()),
                            (e, s.slots[e].take().unwrap()),
                        ))
                    }
                };
                let Some((mut caller, mut callee)) = drawn else {
                    // Every free phone is on the caller's gateway: wait for a call to end.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let r = one_call(&mut caller.1, &mut callee.1).await;
                let mut s = shared.lock().unwrap();
                match r {
                    Ok(d) => {
                        s.latencies.push(d);
                        if caller.1.gateway != callee.1.gateway {
                            s.cross += 1;
                        }
                    }
                    Err(e) => {
                        s.failed += 1;
                        if s.errors.len() < 10 {
                            s.errors.push(e);
                        }
                    }
                }
                s.slots[caller.0] = Some(caller.1);
                s.slots[callee.0] = Some(callee.1);
            }
        });
    }
    while let Some(j) = workers.join_next().await {
        j.map_err(|e| e.to_string())?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (r, slots) = {
        let mut s = shared.lock().unwrap();
        let slots = std::mem::take(&mut s.slots);
        s.latencies.sort();
        let pct = |q: f64| -> f64 {
            if s.latencies.is_empty() {
                return 0.0;
            }
            let i = ((s.latencies.len() as f64 * q).ceil() as usize).clamp(1, s.latencies.len());
            s.latencies[i - 1].as_secs_f64() * 1e3
        };
        let r = CallsResult {
            label: a.label.clone(),
            gateways,
            subscribers: a.subscribers,
            logged_in: a.logged_in,
            login_seconds,
            calls_attempted: s.latencies.len() + s.failed,
            calls_set_up: s.latencies.len(),
            calls_failed: s.failed,
            cross_gateway: s.cross,
            seconds,
            setups_per_second: s.latencies.len() as f64 / seconds.max(1e-9),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            errors: s.errors.clone(),
        };
        (r, slots)
    };
    for p in slots.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_millis(200), p.phone.bye()).await;
    }
    Ok(r)
}

/// The next event `f` picks out, within [`STEP_TIMEOUT`]; a hang-up of `call` is an error.
async fn next(
    ev: &mut mpsc::Receiver<Event>,
    what: &str,
    call: Option<CallId>,
    mut f: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    let until = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(until, ev.recv()).await {
            Ok(Some(e)) if f(&e) => return Ok(e),
            Ok(Some(Event::HangUp {
                call: c,
                reason,
                detail,
            })) if Some(c) == call => {
                return Err(format!(
                    "hang-up ({}{}) waiting for {what}",
                    reason.as_str(),
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                ));
            }
            Ok(Some(Event::Disconnected { reason, .. })) => {
                return Err(format!("disconnected ({reason}) waiting for {what}"));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("session closed waiting for {what}")),
            Err(_) => return Err(format!("timed out waiting for {what}")),
        }
    }
}

/// `a` calls `b`; `b` accepts when rung. The set-up time: dial until both have `media`.
/// Then `a` hangs up and `b` sees the end.
async fn one_call(a: &mut Slot, b: &mut Slot) -> Result<Duration, String> {
    let sock_a = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let sock_b = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let (_, number, _) = user(b.index);
    let media_a = a.phone.media_address(&sock_a).map_err(|e| e.to_string())?;
    let media_b = b.phone.media_address(&sock_b).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let call = a
        .phone
        .dial(&number, media_a)
        .await
        .map_err(|e| format!("dial {number}: {e}"))?;
    let r = async {
        let Event::Incoming { call: call_b, .. } = next(&mut b.events, "incoming", None, |e| {
            matches!(e, Event::Incoming { .. })
        })
        .await?
        else {
            unreachable!()
        };
        b.phone
            .accept(call_b, media_b)
            .await
            .map_err(|e| format!("accept: {e}"))?;
        next(
            &mut a.events,
            "the caller's media",
            Some(call),
            |e| matches!(e, Event::Media(m) if m.call == call),
        )
        .await?;
        next(
            &mut b.events,
            "the callee's media",
            Some(call_b),
            |e| matches!(e, Event::Media(m) if m.call == call_b),
        )
        .await?;
        Ok::<_, String>((t.elapsed(), call_b))
    }
    .await;
    let _ = a.phone.hang_up(call).await;
    let (took, call_b) = r?;
    next(
        &mut b.events,
        "the end of the call",
        None,
        |e| matches!(e, Event::HangUp { call: c, .. } if *c == call_b),
    )
    .await?;
    Ok(took)
}
