//! The softphone's media engine against the real gateway data plane: shards spawned as the
//! gateway spawns them, a session installed with leg keys derived from test session keys
//! (`control::leg_key`), and media instructions built from the real planner for a given pair of
//! capabilities, as the control thread would. Each call plays a clip of real speech each way;
//! the recording at each end must equal the G.711 round trip of what the other end sent,
//! sample for sample, with nothing lost.

use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use voxgate::client::Firewall;
use voxgate::client::g711;
use voxgate::client::media::{
    BEST_EFFORT_BIND, BoundMedia, MediaError, MediaOptions, MediaReport, TransportUsed,
};
use voxgate::client::wav;
use voxgate::control::auth::SessionKey;
use voxgate::control::leg_key;
use voxgate::control::planner::{Capabilities, Path, Plan, plan};
use voxgate::metrics::Transport;
use voxgate::shard::{Backend, Delivery, LegSpec, SessionSpec, ShardConfig, ShardHandle, Shards};
use voxgate::wire::control::{MediaInstructions, MediaRecv, MediaSend};

fn shards() -> Shards {
    let cfg = ShardConfig {
        listen: "::".parse().expect("addr"),
        media_port_base: 0,
        shards: 1,
        backend: Backend::Auto,
        pin: false,
        udp_bufs: 512,
        tcp_bufs: 256,
        spare_bufs: 64,
        ring_entries: 256,
        send_slots: 512,
        ..ShardConfig::default()
    };
    Shards::spawn(&cfg).expect("shards start")
}

fn speech(name: &str, from_s: f64, len_s: f64) -> Arc<[i16]> {
    let all = wav::read(
        &FsPath::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .expect("test audio");
    let a = (from_s * 8000.0) as usize;
    let b = ((from_s + len_s) * 8000.0) as usize;
    Arc::from(&all[a..b.min(all.len())])
}

/// One softphone of a test call.
struct Peer {
    key: SessionKey,
    leg: String,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
}

impl Peer {
    async fn new(leg: &str, key: u8, v6: bool) -> Peer {
        let socket = UdpSocket::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" })
            .await
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        Peer {
            key: SessionKey::from_bytes([key; 32]),
            leg: leg.into(),
            socket: Arc::new(socket),
            addr,
        }
    }

    fn leg_spec(&self, delivery: Delivery) -> LegSpec {
        LegSpec {
            name: self.leg.clone(),
            key: leg_key(&self.key, &self.leg),
            delivery,
            trusted_source: None,
            clock_rate: 8000,
        }
    }
}

#[derive(Clone, Copy)]
struct Gateway {
    udp: SocketAddr,
    tcp: SocketAddr,
}

impl Gateway {
    fn of(h: &ShardHandle, v6: bool) -> Gateway {
        let ip: std::net::IpAddr = if v6 { "::1" } else { "127.0.0.1" }.parse().expect("ip");
        Gateway {
            udp: SocketAddr::new(ip, h.udp_addr.port()),
            tcp: SocketAddr::new(ip, h.tcp_addr.port()),
        }
    }
}

/// How the gateway delivers to a participant that receives over `path`.
fn delivery(path: Path) -> Delivery {
    match path {
        Path::DirectUdp => Delivery::None,
        Path::UdpViaGateway | Path::TcpInUdpOut => Delivery::UdpLatched,
        Path::UdpInTcpOut | Path::TcpBoth => Delivery::Tcp,
    }
}

/// The instructions the control thread would give `me` for `plan` (a room when `plan` is None).
fn instructions(
    plan: Option<Plan>,
    caller: bool,
    me: &Peer,
    other: Option<&Peer>,
    gw: Gateway,
) -> MediaInstructions {
    let room = Plan {
        forward: Path::UdpViaGateway,
        backward: Path::UdpViaGateway,
    };
    let p = plan.unwrap_or(room);
    let (send, recv) = if caller {
        (p.forward, p.backward)
    } else {
        (p.backward, p.forward)
    };
    let send_t = send.sender_transport();
    let recv_t = recv.receiver_transport();
    let peer = other.map(|o| o.addr);
    MediaInstructions {
        call_key: false,
        call: 1,
        plan,
        caller,
        send: MediaSend {
            transport: send_t,
            to: if !send.uses_gateway() {
                peer
            } else if send_t == Transport::Udp {
                Some(gw.udp)
            } else {
                Some(gw.tcp)
            },
            via_gateway: send.uses_gateway(),
        },
        recv: MediaRecv {
            transport: recv_t,
            via_gateway: recv.uses_gateway(),
            from: if !recv.uses_gateway() {
                peer
            } else if recv_t == Transport::Udp {
                Some(gw.udp)
            } else {
                None
            },
        },
        leg: (send.uses_gateway() || recv.uses_gateway()).then(|| me.leg.clone()),
        gateway_udp: Some(gw.udp),
        gateway_tcp: Some(gw.tcp),
        gateway_tcp_tls: false,
        payload_type: 0,
        clock_rate: 8000,
        paths: None,
    }
}

fn options(audio: Arc<[i16]>, firewall: Firewall) -> MediaOptions {
    MediaOptions {
        audio: Some(audio),
        record_samples: 30 * 8000,
        firewall,
        bind_timeout: Duration::from_secs(5),
        ..MediaOptions::default()
    }
}

/// The recording must be the G.711 round trip of `sent`, then only zeros (the padding of
/// the last frame and the silence sent after the audio).
fn assert_heard(who: &str, recording: &[i16], sent: &[i16]) {
    let expected: Vec<i16> = sent.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
    assert!(
        recording.len() >= expected.len(),
        "{who}: recorded {} samples, sent {}",
        recording.len(),
        expected.len()
    );
    if let Some(i) = (0..expected.len()).find(|&i| recording[i] != expected[i]) {
        panic!(
            "{who}: recording differs from what was sent at sample {i} (frame {}): {} != {}",
            i / 160,
            recording[i],
            expected[i]
        );
    }
    assert!(
        recording[expected.len()..].iter().all(|&s| s == 0),
        "{who}: only silence after the audio"
    );
    assert_eq!(recording.len() % 160, 0, "{who}: whole frames");
}

fn assert_clean(who: &str, got: &MediaReport, from: &MediaReport) {
    let r = &got.received;
    assert_eq!(r.lost, 0, "{who}: {r:?}");
    assert_eq!(r.ssrcs, 1, "{who}");
    assert_eq!(
        r.packets, from.sent.packets,
        "{who}: every packet sent arrived ({:?})",
        r.ignored
    );
    assert_eq!(r.ignored.wrong_source, 0, "{who}");
    let lat = r
        .latency_ms
        .expect("latency measured from the send-time extension");
    assert!(lat.p50 >= 0.0 && lat.max < 1000.0, "{who}: {lat:?}");
    assert!(r.jitter_ms < 100.0, "{who}: jitter {}", r.jitter_ms);
}

fn used(transport: Transport, via_gateway: bool) -> TransportUsed {
    TransportUsed {
        transport,
        via_gateway,
    }
}

struct Outcome {
    caller: MediaReport,
    callee: MediaReport,
    /// How long binding both ends took.
    bind_time: Duration,
}

/// Runs a two-party call between `caller` and `callee` capabilities through a real shard.
async fn call(
    caller_caps: Capabilities,
    callee_caps: Capabilities,
    v6: bool,
    fw: [Firewall; 2],
) -> Outcome {
    let shards = shards();
    let h = &shards.handles[0];
    let gw = Gateway::of(h, v6);
    let plan = plan(caller_caps, callee_caps);
    let a = Peer::new("call-1-a", 1, v6).await;
    let b = Peer::new("call-1-b", 2, v6).await;
    if plan.uses_gateway() {
        // A direction through the gateway involves both ends, so both have a leg.
        let legs = vec![
            a.leg_spec(delivery(plan.backward)),
            b.leg_spec(delivery(plan.forward)),
        ];
        h.install(SessionSpec { id: 1, legs })
            .await
            .expect("session installed");
    }
    let ia = instructions(Some(plan), true, &a, Some(&b), gw);
    let ib = instructions(Some(plan), false, &b, Some(&a), gw);
    // A: 1.5 s of speech (75 whole frames); B: 1.23 s of the reply (a partial last frame).
    let clip_a = speech("speech-8k.wav", 0.5, 1.5);
    let clip_b = speech("reply-8k.wav", 0.2, 1.23);
    let bind_start = tokio::time::Instant::now();
    let (ba, bb) = tokio::join!(
        BoundMedia::bind(
            &ia,
            &a.key,
            a.socket.clone(),
            options(clip_a.clone(), fw[0])
        ),
        BoundMedia::bind(
            &ib,
            &b.key,
            b.socket.clone(),
            options(clip_b.clone(), fw[1])
        ),
    );
    let (ba, bb) = (ba.expect("caller bound"), bb.expect("callee bound"));
    let bind_time = bind_start.elapsed();
    let mut ma = ba.start();
    let mut mb = bb.start();
    tokio::time::timeout(Duration::from_secs(10), async {
        ma.playback_done().await;
        mb.playback_done().await;
    })
    .await
    .expect("both played their clips");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ma.stop_sending().await;
    mb.stop_sending().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let caller = ma.finish().await;
    let callee = mb.finish().await;
    // Shown when a test fails (or with --nocapture).
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        eprintln!("{who}: {}", serde_json::to_string(r).unwrap_or_default());
    }
    assert_eq!(caller.sent.audio_packets, 75);
    assert_eq!(callee.sent.audio_packets, 62);
    assert_heard("callee", &callee.recording, &clip_a);
    assert_heard("caller", &caller.recording, &clip_b);
    assert_clean("callee", &callee, &caller);
    assert_clean("caller", &caller, &callee);
    assert_eq!(caller.plan, Some(plan));
    Outcome {
        caller,
        callee,
        bind_time,
    }
}

const UDP_BOTH: Capabilities = Capabilities::new(true, true);
const TCP_BOTH: Capabilities = Capabilities::new(false, false);
const UDP_OUT_TCP_IN: Capabilities = Capabilities::new(true, false);

#[tokio::test]
async fn udp_both_ways_via_the_gateway() {
    // Case 16 with both behind NAT: UDP via the gateway each way.
    let o = call(
        UDP_BOTH.with_nat(true),
        UDP_BOTH.with_nat(true),
        false,
        [Firewall::OPEN; 2],
    )
    .await;
    assert_eq!(o.caller.send, Some(used(Transport::Udp, true)));
    assert_eq!(o.caller.recv, used(Transport::Udp, true));
    assert_eq!(o.callee.received.udp_packets, o.callee.received.packets);
    assert_eq!(o.caller.udp_binding_confirmed, Some(true));
    assert!(o.caller.udp_mapped.is_some());
}

#[tokio::test]
async fn udp_both_ways_via_the_gateway_over_ipv6() {
    let o = call(
        UDP_BOTH.with_nat(true),
        UDP_BOTH.with_nat(true),
        true,
        [Firewall::OPEN; 2],
    )
    .await;
    assert!(o.caller.udp_mapped.is_some_and(|m| m.is_ipv6()));
}

#[tokio::test]
async fn udp_to_tcp_and_tcp_to_udp() {
    // Case 15: caller UDP both, callee TCP both: forward UDP→TCP, backward TCP→UDP.
    let o = call(UDP_BOTH, TCP_BOTH, false, [Firewall::OPEN; 2]).await;
    assert_eq!(
        o.caller.plan,
        Some(Plan {
            forward: Path::UdpInTcpOut,
            backward: Path::TcpInUdpOut
        })
    );
    assert_eq!(o.caller.send, Some(used(Transport::Udp, true)));
    assert_eq!(o.callee.recv, used(Transport::Tcp, true));
    assert_eq!(o.callee.received.tcp_packets, o.callee.received.packets);
    assert_eq!(o.callee.send, Some(used(Transport::Tcp, true)));
    assert_eq!(o.caller.received.udp_packets, o.caller.received.packets);
    assert!(o.callee.tcp_mapped.is_some() && o.callee.udp_mapped.is_none());
}

#[tokio::test]
async fn tcp_to_udp_and_udp_to_tcp() {
    // Case 12, the mirror: caller TCP both, callee UDP both.
    let o = call(TCP_BOTH, UDP_BOTH, false, [Firewall::OPEN; 2]).await;
    assert_eq!(
        o.caller.plan,
        Some(Plan {
            forward: Path::TcpInUdpOut,
            backward: Path::UdpInTcpOut
        })
    );
    assert_eq!(o.caller.send, Some(used(Transport::Tcp, true)));
    assert_eq!(o.callee.recv, used(Transport::Udp, true));
}

#[tokio::test]
async fn tcp_both_ways() {
    // Case 11: TCP↔TCP through the gateway in both directions.
    let o = call(TCP_BOTH, TCP_BOTH, false, [Firewall::OPEN; 2]).await;
    assert_eq!(o.caller.send, Some(used(Transport::Tcp, true)));
    assert_eq!(o.caller.recv, used(Transport::Tcp, true));
    assert_eq!(o.caller.received.tcp_packets, o.caller.received.packets);
    assert_eq!(
        o.caller.udp_binding_confirmed, None,
        "no UDP binding needed"
    );
}

#[tokio::test]
async fn direct_udp_without_the_gateway() {
    // Case 16 without NAT: no gateway at all.
    let o = call(UDP_BOTH, UDP_BOTH, false, [Firewall::OPEN; 2]).await;
    assert_eq!(o.caller.send, Some(used(Transport::Udp, false)));
    assert_eq!(o.callee.recv, used(Transport::Udp, false));
    assert_eq!((o.caller.udp_mapped, o.caller.tcp_mapped), (None, None));
}

#[tokio::test]
async fn direct_one_way_tcp_the_other() {
    // Case 4: caller sends direct UDP, receives over TCP; callee sends UDP via the gateway.
    let o = call(UDP_OUT_TCP_IN, UDP_BOTH, false, [Firewall::OPEN; 2]).await;
    assert_eq!(o.caller.send, Some(used(Transport::Udp, false)));
    assert_eq!(o.caller.recv, used(Transport::Tcp, true));
    assert_eq!(o.callee.send, Some(used(Transport::Udp, true)));
    assert_eq!(o.callee.recv, used(Transport::Udp, false));
}

#[tokio::test]
async fn udp_out_with_inbound_udp_dropped() {
    // Case 1: both "UDP out, TCP in", and both phones really discard every inbound datagram
    // (the simulated stateless firewall): the UDP binding answers never arrive, the gateway
    // binds on the requests anyway, and media flows UDP in, TCP out both ways.
    let fw = Firewall {
        block_udp_out: false,
        block_udp_in: true,
        simulate_nat: false,
    };
    let o = call(UDP_OUT_TCP_IN, UDP_OUT_TCP_IN, false, [fw, fw]).await;
    assert_eq!(o.caller.udp_binding_confirmed, Some(false));
    // The unanswered best-effort UDP binding does not hold up the TCP binding: the media
    // starts once TCP is bound, and the engine goes on with the UDP request.
    assert!(
        o.bind_time < BEST_EFFORT_BIND,
        "binding took {:?}",
        o.bind_time
    );
    assert_eq!(o.caller.send, Some(used(Transport::Udp, true)));
    assert_eq!(o.caller.recv, used(Transport::Tcp, true));
}

#[tokio::test]
async fn conference_room_mixes_every_other_participant() {
    let shards = shards();
    let h = &shards.handles[0];
    let gw = Gateway::of(h, false);
    let a = Peer::new("room-a", 1, false).await;
    let b = Peer::new("room-b", 2, false).await;
    let c = Peer::new("room-c", 3, false).await;
    h.install(SessionSpec {
        id: 7,
        legs: vec![
            a.leg_spec(Delivery::UdpLatched),
            b.leg_spec(Delivery::UdpLatched),
            c.leg_spec(Delivery::Tcp),
        ],
    })
    .await
    .expect("room installed");
    let ia = instructions(None, true, &a, None, gw);
    let ib = instructions(None, false, &b, None, gw);
    let mut ic = instructions(None, false, &c, None, gw);
    ic.recv = MediaRecv {
        transport: Transport::Tcp,
        via_gateway: true,
        from: None,
    };
    let clip_a = speech("speech-8k.wav", 1.0, 1.0);
    let clip_b = speech("reply-8k.wav", 0.5, 1.0);
    let (ba, bb, bc) = tokio::join!(
        BoundMedia::bind(
            &ia,
            &a.key,
            a.socket.clone(),
            options(clip_a.clone(), Firewall::OPEN)
        ),
        BoundMedia::bind(
            &ib,
            &b.key,
            b.socket.clone(),
            options(clip_b.clone(), Firewall::OPEN)
        ),
        BoundMedia::bind(
            &ic,
            &c.key,
            c.socket.clone(),
            MediaOptions {
                record_samples: 30 * 8000,
                ..MediaOptions::default()
            }
        ),
    );
    let (mut ma, mut mb, mc) = (
        ba.expect("a bound").start(),
        bb.expect("b bound").start(),
        bc.expect("c bound").start(),
    );
    ma.playback_done().await;
    mb.playback_done().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for m in [&ma, &mb, &mc] {
        m.stop_sending().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ra, rb, rc) = (ma.finish().await, mb.finish().await, mc.finish().await);
    for (who, r) in [("a", &ra), ("b", &rb), ("c", &rc)] {
        assert_eq!(r.received.ssrcs, 2, "{who} hears the two others");
        assert_eq!(r.received.lost, 0, "{who}");
    }
    assert_eq!(rc.received.tcp_packets, rc.received.packets);
    // C hears A and B mixed; each stream is placed from the 20 ms slot its first packet came
    // in, which for two phones started together is the same slot or one of the next few.
    let ua: Vec<i16> = clip_a.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
    let ub: Vec<i16> = clip_b.iter().map(|&s| g711::ulaw_round_trip(s)).collect();
    let mix = |oa: usize, ob: usize| {
        let mut m = vec![0i16; rc.recording.len()];
        for (i, v) in ua.iter().enumerate() {
            if let Some(x) = m.get_mut(oa + i) {
                *x = x.saturating_add(*v);
            }
        }
        for (i, v) in ub.iter().enumerate() {
            if let Some(x) = m.get_mut(ob + i) {
                *x = x.saturating_add(*v);
            }
        }
        m
    };
    let fits = (0..4)
        .flat_map(|d| [(0, d * 160), (d * 160, 0)])
        .any(|(oa, ob)| mix(oa, ob) == rc.recording);
    assert!(fits, "C's recording is the saturating mix of A and B");
}

#[tokio::test]
async fn bindings_with_the_wrong_key_fail_clearly() {
    let shards = shards();
    let h = &shards.handles[0];
    let gw = Gateway::of(h, false);
    let a = Peer::new("bad-a", 1, false).await;
    let b = Peer::new("bad-b", 2, false).await;
    h.install(SessionSpec {
        id: 3,
        legs: vec![a.leg_spec(Delivery::UdpLatched), b.leg_spec(Delivery::Tcp)],
    })
    .await
    .expect("installed");
    let p = plan(UDP_BOTH.with_nat(true), TCP_BOTH);
    let wrong = SessionKey::from_bytes([9; 32]);
    let opts = MediaOptions {
        bind_timeout: Duration::from_millis(600),
        ..MediaOptions::default()
    };
    // UDP: the gateway never answers a request with the wrong key.
    let e = BoundMedia::bind(
        &instructions(Some(p), true, &a, Some(&b), gw),
        &wrong,
        a.socket.clone(),
        opts.clone(),
    )
    .await
    .err()
    .expect("no binding");
    assert!(matches!(e, MediaError::UdpBindTimeout { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no valid answer to the UDP media binding"),
        "{e}"
    );
    // TCP: the gateway closes the connection.
    let e = BoundMedia::bind(
        &instructions(Some(p), false, &b, Some(&a), gw),
        &wrong,
        b.socket.clone(),
        opts,
    )
    .await
    .err()
    .expect("no binding");
    assert!(matches!(e, MediaError::TcpBind { .. }), "{e}");
}

// ---------------------------------------------------------------- proven paths

use voxgate::control::paths::{self as cpaths, CheckKey};
use voxgate::wire::control::{DirectCandidate, PathOrder, PathOrders};

/// `i` (a UDP-via-gateway instruction) with direct candidates: this phone's sending direction
/// to `send_to` and its receiving direction from `recv_from`, keys sealed as the gateway seals
/// them.
fn with_candidates(
    mut i: MediaInstructions,
    me: &Peer,
    send_to: SocketAddr,
    recv_from: SocketAddr,
    keys: &[CheckKey; 2],
) -> MediaInstructions {
    let (out_fwd, in_fwd) = (i.caller, !i.caller);
    let cand = |forward: bool, peer: SocketAddr| DirectCandidate {
        peer,
        username: cpaths::check_username(i.call, forward),
        key: cpaths::seal(
            &me.key,
            i.call,
            forward,
            [u8::from(forward) + 1; 16],
            &keys[usize::from(!forward)],
        ),
    };
    let order = vec![Path::DirectUdp, Path::UdpViaGateway, Path::TcpBoth];
    i.paths = Some(Box::new(PathOrders {
        send: PathOrder {
            now: Path::UdpViaGateway,
            order: order.clone(),
            direct: Some(cand(out_fwd, send_to)),
        },
        recv: PathOrder {
            now: Path::UdpViaGateway,
            order,
            direct: Some(cand(in_fwd, recv_from)),
        },
    }));
    i
}

/// A call through a real shard that starts UDP via the gateway both ways with direct
/// candidates; `victim`: the caller's candidate is a third party's socket instead of the
/// callee's. Returns both reports and what the victim got.
async fn proven_call(victim: Option<&UdpSocket>) -> (MediaReport, MediaReport, Vec<Vec<u8>>) {
    let shards = shards();
    let h = &shards.handles[0];
    let gw = Gateway::of(h, false);
    let a = Peer::new("call-1-a", 1, false).await;
    let b = Peer::new("call-1-b", 2, false).await;
    let via = Plan {
        forward: Path::UdpViaGateway,
        backward: Path::UdpViaGateway,
    };
    h.install(SessionSpec {
        id: 1,
        legs: vec![
            a.leg_spec(Delivery::UdpLatched),
            b.leg_spec(Delivery::UdpLatched),
        ],
    })
    .await
    .expect("session installed");
    let keys = [CheckKey([0x11; 16]), CheckKey([0x22; 16])];
    let b_cand = match victim {
        Some(v) => v.local_addr().expect("victim addr"),
        None => b.addr,
    };
    let ia = with_candidates(
        instructions(Some(via), true, &a, Some(&b), gw),
        &a,
        b_cand,
        b.addr,
        &keys,
    );
    let ib = with_candidates(
        instructions(Some(via), false, &b, Some(&a), gw),
        &b,
        a.addr,
        a.addr,
        &keys,
    );
    let clip_a = speech("speech-8k.wav", 0.5, 1.5);
    let clip_b = speech("reply-8k.wav", 0.2, 1.23);
    let (ba, bb) = tokio::join!(
        BoundMedia::bind(
            &ia,
            &a.key,
            a.socket.clone(),
            options(clip_a.clone(), Firewall::OPEN)
        ),
        BoundMedia::bind(
            &ib,
            &b.key,
            b.socket.clone(),
            options(clip_b.clone(), Firewall::OPEN)
        ),
    );
    let (mut ma, mut mb) = (
        ba.expect("caller bound").start(),
        bb.expect("callee bound").start(),
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        ma.playback_done().await;
        mb.playback_done().await;
    })
    .await
    .expect("both played their clips");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ma.stop_sending().await;
    mb.stop_sending().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (caller, callee) = (ma.finish().await, mb.finish().await);
    for (who, r) in [("caller", &caller), ("callee", &callee)] {
        eprintln!("{who}: {}", serde_json::to_string(r).unwrap_or_default());
    }
    // Nothing lost, nothing counted twice, whatever path each packet took.
    assert_heard("callee", &callee.recording, &clip_a);
    assert_heard("caller", &caller.recording, &clip_b);
    assert_clean("callee", &callee, &caller);
    assert_clean("caller", &caller, &callee);
    let mut got = Vec::new();
    if let Some(v) = victim {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = v.try_recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    (caller, callee, got)
}

/// Both directions start through the gateway, the phones prove the direct path with keyed
/// checks and switch to it without a gap: every packet arrives once, the copies sent on both
/// paths during the switch are dropped as duplicates, and most media went direct.
#[tokio::test]
async fn a_proven_direct_path_takes_over_seamlessly() {
    let (caller, callee, _) = proven_call(None).await;
    for (who, r, peer) in [("caller", &caller, &callee), ("callee", &callee, &caller)] {
        let p = &r.paths;
        assert!(p.send_candidate && p.send_direct, "{who}: {p:?}");
        let went = p.went_direct_ms.expect("went direct");
        assert!(went < 1000.0, "{who}: direct after {went} ms");
        assert!(p.direct_packets * 10 >= r.sent.packets * 7, "{who}: {p:?}");
        assert!(
            peer.paths.accepted_direct_from.is_some(),
            "{who}'s peer validated it"
        );
        assert_eq!(p.fallbacks, 0);
    }
}

/// A candidate that is a third party's address (a caller announcing a victim): the victim gets
/// no media, only at most 7 small keyed checks, and the call goes on through the gateway.
#[tokio::test]
async fn a_third_party_candidate_gets_only_a_few_checks_and_no_media() {
    let victim = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (caller, _, got) = proven_call(Some(&victim)).await;
    assert!(!caller.paths.send_direct);
    assert_eq!(caller.paths.direct_packets, 0);
    assert!(got.len() <= 7, "{} datagrams", got.len());
    assert!(
        got.iter()
            .all(|d| voxgate::wire::stun::looks_like_stun(d) && d.len() < 120)
    );
}
