//! Getting calls up on voxgate through its real control plane, then handing the media sockets
//! to the engine.
//!
//! Each call: two subscribers log in ([`Phone::connect`]) with the simulated firewall that the
//! scenario needs (the gateway's real probe measures it and its real planner picks the path),
//! the caller dials, the callee accepts, both receive their `media` instructions, and the
//! bench binds each leg itself — a STUN Binding keyed by [`control::leg_key`] from the call's
//! UDP socket to the shard's UDP port, and/or a TCP connection to the shard's TCP port whose
//! first RFC 4571 frame is that Binding — on plain sockets that the engine then owns. The
//! phones stay logged in (heart-beating on a background thread) until the [`Calls`] is
//! dropped.
//!
//! Subscribers are `bench00000`, `bench00001`, … with numbers `+1999000000`, … and passwords
//! `bench-pw-00000`, … ([`user`]); `voxgate bench users N` prints them as the CSV that
//! `voxgate user import` reads.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};

use super::engine::{RxSpec, TxSpec};
use crate::client::session::{Event, Phone, PhoneOptions};
use crate::client::{Firewall, binding};
use crate::control;
use crate::metrics::Transport;
use crate::wire::control::{CallId, MediaInstructions};
use crate::wire::framing;

/// Log-ins running at once.
const CONCURRENT_CALLS: usize = 32;
/// Time allowed for one call to come up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Subscriber `i`: (user, number, password).
pub fn user(i: usize) -> (String, String, String) {
    (
        format!("bench{i:05}"),
        format!("+1999{i:06}"),
        format!("bench-pw-{i:05}"),
    )
}

/// The CSV (`user,number,password`) of subscribers `0..n`.
pub fn users_csv(n: usize) -> String {
    let mut s = String::from("user,number,password\n");
    for i in 0..n {
        let (u, num, pw) = user(i);
        s.push_str(&format!("{u},{num},{pw}\n"));
    }
    s
}

/// How the two sides of a call are placed behind their (simulated) firewalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Both open but behind (simulated) NAT: both directions UDP via the gateway.
    UdpUdp,
    /// Caller UDP (NAT), callee TCP only; traffic caller→callee (UDP in, TCP out).
    UdpTcp,
    /// The same call; traffic callee→caller (TCP in, UDP out).
    TcpUdp,
    /// Both TCP only: TCP in, TCP out.
    TcpTcp,
    /// As tcp-udp, with the TCP leg inside TLS (a gateway whose single port takes TLS media:
    /// kernel TLS, or its userspace relay).
    TcpUdpTls,
    /// As udp-tcp, with the TCP leg inside TLS: the gateway seals what it sends to the TCP leg.
    UdpTcpTls,
    /// A conference room: one speaker, N listeners, all UDP via the gateway.
    Room,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::UdpUdp => "udp-udp",
            Scenario::UdpTcp => "udp-tcp",
            Scenario::TcpUdp => "tcp-udp",
            Scenario::TcpTcp => "tcp-tcp",
            Scenario::TcpUdpTls => "tcp-udp-tls",
            Scenario::UdpTcpTls => "udp-tcp-tls",
            Scenario::Room => "room",
        }
    }

    fn firewalls(self) -> (Firewall, Firewall) {
        let nat = Firewall {
            simulate_nat: true,
            ..Firewall::OPEN
        };
        let tcp_only = Firewall {
            block_udp_out: true,
            block_udp_in: true,
            simulate_nat: false,
        };
        match self {
            Scenario::UdpUdp | Scenario::Room => (nat, nat),
            Scenario::UdpTcp | Scenario::TcpUdp | Scenario::TcpUdpTls | Scenario::UdpTcpTls => {
                (nat, tcp_only)
            }
            Scenario::TcpTcp => (tcp_only, tcp_only),
        }
    }
}

/// Which directions of each call carry load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directions {
    Forward,
    Backward,
    Both,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("call {call}: {what}")]
    Call { call: usize, what: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One leg's media sockets, owned here, used by the engine by fd.
struct Leg {
    udp: Option<OwnedFd>,
    tcp: Option<OwnedFd>,
    send: Transport,
    recv: Transport,
}

impl Leg {
    fn tx(&self) -> Option<TxSpec> {
        match self.send {
            Transport::Udp => self.udp.as_ref().map(|f| TxSpec {
                fd: f.as_raw_fd(),
                tcp: false,
                header: Vec::new(),
                padding: 0,
            }),
            Transport::Tcp => self.tcp.as_ref().map(|f| TxSpec {
                fd: f.as_raw_fd(),
                tcp: true,
                header: framing::header(super::packet::PACKET_LEN)
                    .map(|h| h.to_vec())
                    .unwrap_or_default(),
                padding: 0,
            }),
        }
    }

    fn rx(&self) -> Option<RxSpec> {
        let fd: RawFd = match self.recv {
            Transport::Udp => self.udp.as_ref()?.as_raw_fd(),
            Transport::Tcp => self.tcp.as_ref()?.as_raw_fd(),
        };
        Some(RxSpec {
            fd,
            tcp: self.recv == Transport::Tcp,
        })
    }
}

/// Calls that are up: their sockets, and the phones keeping them up.
pub struct Calls {
    pub streams: Vec<TxSpec>,
    pub rx: Vec<RxSpec>,
    pub fanout: u32,
    pub calls: usize,
    /// The plans the gateway chose (forward, backward) for the first call, as text.
    pub plan: String,
    _legs: Vec<Leg>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    hangups: Arc<std::sync::atomic::AtomicU64>,
}

impl Calls {
    /// Calls that the gateway ended while they should have been up.
    pub fn hangups(&self) -> u64 {
        self.hangups.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Up {
    legs: Vec<(Leg, bool)>,
    phones: Vec<(Phone, mpsc::Receiver<Event>)>,
    plan: String,
}

/// Brings up `calls` calls of `scenario` (or, for `Room`, one room with `listeners`), using
/// subscribers from `user_base` on.
/// Called once every subscriber is logged in and before the first call is dialled (two-party
/// scenarios), so that memory can be read for log-ins and for calls apart.
pub type AfterLogin = Box<dyn FnOnce() + Send>;

// One argument per independent knob of the bench's call set-up; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn bring_up(
    server: &str,
    scenario: Scenario,
    calls: usize,
    listeners: usize,
    directions: Directions,
    user_base: usize,
    after_login: Option<AfterLogin>,
    tls: Option<crate::client::tls::MediaTls>,
) -> Result<Calls, SetupError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server.to_owned();
    let hangups = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hangups2 = hangups.clone();
    let thread = std::thread::Builder::new()
        .name("bench-phones".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(SetupError::Io(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let r = if scenario == Scenario::Room {
                    room(&server, listeners, user_base)
                        .await
                        .map(|u| vec![u])
                        .map_err(|what| SetupError::Call { call: 0, what })
                } else {
                    all_calls(&server, scenario, calls, user_base, after_login, &tls).await
                };
                let ups = match r {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut legs = Vec::new();
                let mut phones = Vec::new();
                let plan = ups.first().map(|u| u.plan.clone()).unwrap_or_default();
                for u in ups {
                    legs.push(u.legs);
                    phones.extend(u.phones);
                }
                let _ = tx.send(Ok((legs, plan)));
                // Keep the phones: drain their events (counting hang-ups) until told to stop.
                let mut drains = tokio::task::JoinSet::new();
                let mut keep = Vec::new();
                for (p, mut ev) in phones {
                    let h = hangups2.clone();
                    drains.spawn(async move {
                        while let Some(e) = ev.recv().await {
                            if matches!(e, Event::HangUp { .. } | Event::Disconnected { .. }) {
                                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                    keep.push(p);
                }
                let _ = stop_rx.await;
                for p in keep {
                    let _ = tokio::time::timeout(Duration::from_millis(200), p.bye()).await;
                }
                drains.abort_all();
            });
        })?;
    let (groups, plan) = rx
        .recv()
        .map_err(|_| SetupError::Io(std::io::Error::other("the phone thread died")))??;
    let mut streams = Vec::new();
    let mut rxs = Vec::new();
    let mut all_legs = Vec::new();
    let n_calls = groups.len();
    let mut fanout = 1;
    for legs in groups {
        if scenario == Scenario::Room {
            // legs[0] is the speaker.
            fanout = (legs.len() - 1) as u32;
            for (leg, speaker) in &legs {
                if *speaker {
                    streams.extend(leg.tx());
                } else {
                    rxs.extend(leg.rx());
                }
            }
        } else {
            let (caller, callee) = (&legs[0].0, &legs[1].0);
            if matches!(directions, Directions::Forward | Directions::Both) {
                streams.extend(caller.tx());
                rxs.extend(callee.rx());
            }
            if matches!(directions, Directions::Backward | Directions::Both) {
                streams.extend(callee.tx());
                rxs.extend(caller.rx());
            }
        }
        all_legs.extend(legs.into_iter().map(|(l, _)| l));
    }
    // A TCP leg that both sends and receives appears once per role; epoll needs it once.
    rxs.sort_by_key(|r| r.fd);
    rxs.dedup_by_key(|r| r.fd);
    Ok(Calls {
        streams,
        rx: rxs,
        fanout,
        calls: n_calls,
        plan,
        _legs: all_legs,
        stop: Some(stop_tx),
        thread: Some(thread),
        hangups,
    })
}

/// Logs in every subscriber first (at most [`CONCURRENT_CALLS`] at once), calls
/// `after_login`, then sets the calls up.
async fn all_calls(
    server: &str,
    scenario: Scenario,
    calls: usize,
    user_base: usize,
    after_login: Option<AfterLogin>,
    tls: &Option<crate::client::tls::MediaTls>,
) -> Result<Vec<Up>, SetupError> {
    let (fw_a, fw_b) = scenario.firewalls();
    let sem = Arc::new(Semaphore::new(CONCURRENT_CALLS));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..2 * calls {
        let sem = sem.clone();
        let server = server.to_owned();
        let fw = if i % 2 == 0 { fw_a } else { fw_b };
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = tokio::time::timeout(CALL_TIMEOUT, login(&server, user_base + i, fw))
                .await
                .unwrap_or_else(|_| Err("log-in timed out".into()));
            (i, r)
        });
    }
    let mut phones: Vec<Option<LoggedIn>> = (0..2 * calls).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        let (i, r) = j.map_err(|e| SetupError::Call {
            call: 0,
            what: e.to_string(),
        })?;
        phones[i] = Some(r.map_err(|what| SetupError::Call { call: i / 2, what })?);
    }
    if let Some(f) = after_login {
        // Let the gateway finish the probes before memory is read.
        tokio::time::sleep(Duration::from_millis(300)).await;
        f();
    }
    let mut set = tokio::task::JoinSet::new();
    let mut it = phones.into_iter().flatten();
    for c in 0..calls {
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            break;
        };
        let sem = sem.clone();
        let tls = tls.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = tokio::time::timeout(CALL_TIMEOUT, one_call(a, b, user_base + 2 * c + 1, &tls))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            (c, r)
        });
    }
    let mut ups: Vec<Option<Up>> = (0..calls).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        let (c, r) = j.map_err(|e| SetupError::Call {
            call: 0,
            what: e.to_string(),
        })?;
        ups[c] = Some(r.map_err(|what| SetupError::Call { call: c, what })?);
    }
    Ok(ups.into_iter().flatten().collect())
}

type LoggedIn = (Phone, mpsc::Receiver<Event>);

async fn login(
    server: &str,
    i: usize,
    fw: Firewall,
) -> Result<(Phone, mpsc::Receiver<Event>), String> {
    let (u, _, pw) = user(i);
    let opts = PhoneOptions {
        firewall: fw,
        software: Some("voxgate-bench".into()),
        ..PhoneOptions::default()
    };
    let (p, ev) = Phone::connect(server, &u, &pw, opts)
        .await
        .map_err(|e| format!("log-in of {u}: {e}"))?;
    p.wait_capabilities(Duration::from_secs(15))
        .await
        .ok_or_else(|| format!("{u}: no probe result"))?;
    Ok((p, ev))
}

async fn wait_event(
    ev: &mut mpsc::Receiver<Event>,
    what: &str,
    mut f: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ev.recv()).await {
            Ok(Some(e)) if f(&e) => return Ok(e),
            Ok(Some(Event::HangUp { reason, .. })) => {
                return Err(format!("hang-up ({}) waiting for {what}", reason.as_str()));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("session closed waiting for {what}")),
            Err(_) => return Err(format!("timed out waiting for {what}")),
        }
    }
}

async fn wait_media(
    ev: &mut mpsc::Receiver<Event>,
    call: Option<CallId>,
) -> Result<MediaInstructions, String> {
    match wait_event(
        ev,
        "media",
        |e| matches!(e, Event::Media(m) if call.is_none_or(|c| m.call == c)),
    )
    .await?
    {
        Event::Media(m) => Ok(m),
        _ => Err("unreachable".into()),
    }
}

/// Caller `a` dials callee `b` (subscriber `callee`), `b` accepts, both bind their legs.
async fn one_call(
    a: LoggedIn,
    b: LoggedIn,
    callee: usize,
    tls: &Option<crate::client::tls::MediaTls>,
) -> Result<Up, String> {
    let (a, mut ev_a) = a;
    let (b, mut ev_b) = b;
    let sock_a = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let sock_b = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let (_, number_b, _) = user(callee);
    let call = a
        .dial(
            &number_b,
            a.media_address(&sock_a).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| format!("dial: {e}"))?;
    let incoming = wait_event(&mut ev_b, "incoming", |e| {
        matches!(e, Event::Incoming { .. })
    })
    .await?;
    let Event::Incoming { call: call_b, .. } = incoming else {
        return Err("unreachable".into());
    };
    b.accept(call_b, b.media_address(&sock_b).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("accept: {e}"))?;
    let m_a = wait_media(&mut ev_a, Some(call)).await?;
    let m_b = wait_media(&mut ev_b, Some(call_b)).await?;
    let plan = m_a
        .plan
        .map(|p| format!("forward {:?}, backward {:?}", p.forward, p.backward))
        .unwrap_or_default();
    let leg_a = bind_leg(&a, sock_a, &m_a, tls).await?;
    let leg_b = bind_leg(&b, sock_b, &m_b, tls).await?;
    Ok(Up {
        legs: vec![(leg_a, true), (leg_b, false)],
        phones: vec![(a, ev_a), (b, ev_b)],
        plan,
    })
}

async fn room(server: &str, listeners: usize, user_base: usize) -> Result<Up, String> {
    let (fw, _) = Scenario::Room.firewalls();
    let (s, mut ev_s) = login(server, user_base, fw).await?;
    let mut ls = Vec::new();
    for i in 0..listeners {
        ls.push(login(server, user_base + 1 + i, fw).await?);
    }
    let sock_s = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let numbers: Vec<String> = (0..listeners).map(|i| user(user_base + 1 + i).1).collect();
    let call = s
        .conference(
            &numbers,
            s.media_address(&sock_s).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| format!("conference: {e}"))?;
    let mut legs = Vec::new();
    let mut pending = Vec::new();
    for (p, ev) in ls.iter_mut() {
        let incoming = wait_event(ev, "incoming", |e| matches!(e, Event::Incoming { .. })).await?;
        let Event::Incoming { call: c, .. } = incoming else {
            return Err("unreachable".into());
        };
        let sock = UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        p.accept(c, p.media_address(&sock).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| format!("accept: {e}"))?;
        pending.push((c, sock));
    }
    let m_s = wait_media(&mut ev_s, Some(call)).await?;
    legs.push((bind_leg(&s, sock_s, &m_s, &None).await?, true));
    for ((p, ev), (c, sock)) in ls.iter_mut().zip(pending) {
        let m = wait_media(ev, Some(c)).await?;
        legs.push((bind_leg(p, sock, &m, &None).await?, false));
    }
    let mut phones = vec![(s, ev_s)];
    phones.extend(ls);
    Ok(Up {
        legs,
        phones,
        plan: "room".into(),
    })
}

/// Binds the leg of `m` from `sock` (UDP) and/or a new TCP connection, as the plan says.
async fn bind_leg(
    p: &Phone,
    sock: UdpSocket,
    m: &MediaInstructions,
    tls: &Option<crate::client::tls::MediaTls>,
) -> Result<Leg, String> {
    let leg = m
        .leg
        .as_deref()
        .ok_or("the instructions name no leg: not via the gateway")?;
    let key = control::leg_key(p.session_key(), leg);
    let udp_via = (m.send.transport == Transport::Udp && m.send.via_gateway)
        || (m.recv.transport == Transport::Udp && m.recv.via_gateway);
    let tcp = m.send.transport == Transport::Tcp || m.recv.transport == Transport::Tcp;
    if !m.send.via_gateway && m.send.to.is_some() && m.send.transport == Transport::Udp && !udp_via
    {
        return Err("the plan is direct UDP, not via the gateway".into());
    }
    let mut udp_fd = None;
    if udp_via || m.send.transport == Transport::Udp {
        let gw = m.gateway_udp.ok_or("no gateway UDP address")?;
        let mut req = [0u8; 512];
        let mut buf = [0u8; 1500];
        let mut bound = false;
        for _ in 0..50 {
            let txid = binding::new_txid();
            let n = binding::request(&mut req, leg, &key, &txid).map_err(|e| e.to_string())?;
            sock.send_to(&req[..n], gw)
                .await
                .map_err(|e| e.to_string())?;
            if let Ok(Ok((len, from))) =
                tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
                && from == gw
                && binding::check_response(&buf[..len], &key, &txid).is_ok()
            {
                bound = true;
                break;
            }
        }
        if !bound {
            return Err(format!("UDP binding of leg {leg} not answered"));
        }
        let to = if m.send.transport == Transport::Udp {
            m.send.to.unwrap_or(gw)
        } else {
            gw
        };
        sock.connect(to).await.map_err(|e| e.to_string())?;
        let std = sock.into_std().map_err(|e| e.to_string())?;
        udp_fd = Some(OwnedFd::from(std));
    }
    let mut tcp_fd = None;
    if tcp {
        let gw: SocketAddr = m.gateway_tcp.ok_or("no gateway TCP address")?;
        let mut s = TcpStream::connect(gw)
            .await
            .map_err(|e| format!("TCP {gw}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        match (m.gateway_tcp_tls, tls) {
            (true, Some(t)) => {
                // The engine writes plain frames on a local stream; a task on this (phones')
                // thread carries them through TLS (the load generator's cost, not the
                // gateway's).
                s = crate::client::tls::media_tunnel(s, t)
                    .await
                    .map_err(|e| format!("TLS media {gw}: {e}"))?;
            }
            (true, None) => {
                return Err(
                    "the gateway puts TCP media under TLS: use scenario tcp-udp-tls or udp-tcp-tls"
                        .into(),
                );
            }
            (false, Some(_)) => {
                return Err(
                    "a TLS scenario, but the gateway's TCP media is plain (it needs \
                     [single_port] media = \"tls\")"
                        .into(),
                );
            }
            (false, None) => {}
        }
        let txid = binding::new_txid();
        let mut req = [0u8; 512];
        let n = binding::request(&mut req[2..], leg, &key, &txid).map_err(|e| e.to_string())?;
        let h = framing::header(n).map_err(|e| e.to_string())?;
        req[..2].copy_from_slice(&h);
        s.write_all(&req[..n + 2])
            .await
            .map_err(|e| e.to_string())?;
        let mut lenb = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut lenb))
            .await
            .map_err(|_| "TCP binding: no answer".to_string())?
            .map_err(|e| e.to_string())?;
        let mut ans = vec![0u8; usize::from(u16::from_be_bytes(lenb))];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ans))
            .await
            .map_err(|_| "TCP binding: no answer".to_string())?
            .map_err(|e| e.to_string())?;
        binding::check_response(&ans, &key, &txid).map_err(|e| format!("TCP binding: {e}"))?;
        let std = s.into_std().map_err(|e| e.to_string())?;
        tcp_fd = Some(OwnedFd::from(std));
    }
    Ok(Leg {
        udp: udp_fd,
        tcp: tcp_fd,
        send: m.send.transport,
        recv: m.recv.transport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_and_their_csv() {
        assert_eq!(
            user(7),
            (
                "bench00007".into(),
                "+1999000007".into(),
                "bench-pw-00007".into()
            )
        );
        let csv = users_csv(2);
        assert_eq!(
            csv,
            "user,number,password\nbench00000,+1999000000,bench-pw-00000\nbench00001,+1999000001,bench-pw-00001\n"
        );
        crate::store::validate_user(&user(99_999).0).unwrap();
        crate::store::validate_number(&user(99_999).1).unwrap();
    }
}
