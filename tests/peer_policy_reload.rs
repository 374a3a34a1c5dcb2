//! The peer policy reloaded by SIGHUP reaches the shards of a real `voxgate serve` process
//! (issue 11): a source the reloaded `denied_peers` names cannot latch a UDP media leg, although
//! the same source could before the reload. Seen as a user sees it: the leg's Binding is
//! answered or not, the media reaches the far end (an IP voice gateway stand-in) or not, and
//! the gateway's `/metrics` count the refusal under `denied_latch`.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::Gateway;
use voxgate::client::binding;
use voxgate::client::session::{Event, Phone};

/// The number the test dials: a telephone route to the voice gateway stand-in.
const NUMBER: &str = "+4930123456";

/// An RTP packet (version 2, payload type 0) whose SSRC and sequence number the test knows.
fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160).map(|i| (i as u32 ^ ssrc) as u8));
    p
}

/// The `denied_latch` drops over all shards, as `/metrics` shows them.
fn denied_latches(gw: &Gateway) -> u64 {
    let admin = gw.admin.as_deref().expect("the admin listener is on");
    let (code, body) = common::http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    let mut found = false;
    let n = body
        .lines()
        .filter(|l| {
            l.starts_with("voxgate_shard_drops_total{") && l.contains("reason=\"denied_latch\"")
        })
        .map(|l| {
            found = true;
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        })
        .sum();
    assert!(found, "/metrics exports the denied_latch drops:\n{body}");
    n
}

/// Sends the leg's Binding from `s` (up to three times, as a client retransmits) and returns
/// whether the gateway answered with a response keyed by the leg key.
fn binds(s: &UdpSocket, gw: SocketAddr, leg: &str, key: &[u8]) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let txid = binding::new_txid();
    let mut req = [0u8; 512];
    let n = binding::request(&mut req, leg, key, &txid).unwrap();
    let mut resp = [0u8; 512];
    for _ in 0..3 {
        s.send_to(&req[..n], gw).unwrap();
        if let Ok((m, from)) = s.recv_from(&mut resp) {
            assert_eq!(from, gw, "the answer comes from the gateway's media port");
            binding::check_response(&resp[..m], key, &txid).expect("a keyed answer");
            return true;
        }
    }
    false
}

/// What the voice gateway stand-in receives within `wait`.
fn received(voice: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let end = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        voice
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match voice.recv_from(&mut buf) {
            Ok((n, _)) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    got
}

/// One call to the route: its leg name, the gateway's UDP media address and the leg key.
struct Call {
    id: voxgate::wire::control::CallId,
    leg: String,
    gateway_udp: SocketAddr,
    key: Vec<u8>,
}

async fn call(phone: &Phone, events: &mut tokio::sync::mpsc::Receiver<Event>) -> Call {
    let announced = SocketAddr::new(phone.local_addr().ip(), 9);
    let id = phone.dial(NUMBER, announced).await.expect("dial accepted");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, events.recv()).await {
            Ok(Some(Event::Media(m))) if m.call == id => {
                let leg = m
                    .leg
                    .expect("the route call's media goes through the gateway");
                let gateway_udp = m.gateway_udp.expect("a UDP media address");
                let key = voxgate::control::leg_key(phone.session_key(), &leg);
                return Call {
                    id,
                    leg,
                    gateway_udp,
                    key,
                };
            }
            Ok(Some(Event::HangUp { reason, detail, .. })) => {
                panic!("the route call ended: {reason:?} {detail:?}")
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no media instructions for the route call"),
        }
    }
}

#[test]
fn sighup_denied_peers_stop_a_source_latching_a_udp_leg() {
    let voice = UdpSocket::bind("127.0.0.1:0").unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("voxgate.toml");
    std::fs::write(&cfg, "[server]\ndenied_peers = [\"127.0.0.9/32\"]\n").unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    common::run_ok(std::process::Command::new(common::BIN).args([
        "route",
        "add",
        "+49",
        &voice.local_addr().unwrap().to_string(),
        "--data-dir",
        gw.dir.path().join("data").to_str().unwrap(),
    ]));
    // Alice's media socket sits at 127.0.0.3: allowed now, denied after the reload.
    let soon_denied = UdpSocket::bind("127.0.0.3:0").unwrap();
    let allowed = UdpSocket::bind("127.0.0.2:0").unwrap();
    let rt = common::phone_runtime();
    rt.block_on(async {
        let (phone, mut events) = common::log_in(&gw, "alice").await;

        // Before the reload: 127.0.0.3 binds the leg and its media reaches the far end.
        let c = call(&phone, &mut events).await;
        assert!(
            binds(&soon_denied, c.gateway_udp, &c.leg, &c.key),
            "before the reload the leg binds from 127.0.0.3"
        );
        soon_denied.send_to(&rtp(1, 1), c.gateway_udp).unwrap();
        let got = received(&voice, Duration::from_secs(3));
        assert!(
            got.contains(&rtp(1, 1)),
            "the media reached the voice gateway: {} datagrams",
            got.len()
        );
        assert_eq!(denied_latches(&gw), 0);
        phone.hang_up(c.id).await.unwrap();

        // The operator denies 127.0.0.3 and reloads.
        std::fs::write(&cfg, "[server]\ndenied_peers = [\"127.0.0.3/32\"]\n").unwrap();
        let mark = gw.log_len();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
        gw.wait_log(mark, "the reload", |l| l.contains("configuration reloaded"));

        // A new call: the same source cannot latch its leg, even with the right key; its
        // media goes nowhere; the gateway counts the refusal.
        let c = call(&phone, &mut events).await;
        assert!(
            !binds(&soon_denied, c.gateway_udp, &c.leg, &c.key),
            "after the reload 127.0.0.3 gets no answer"
        );
        soon_denied.send_to(&rtp(2, 1), c.gateway_udp).unwrap();
        let got = received(&voice, Duration::from_secs(1));
        assert!(
            !got.contains(&rtp(2, 1)),
            "media from the denied source reached the voice gateway"
        );
        let denied = denied_latches(&gw);
        assert!(denied >= 1, "denied_latch counted: {denied}");
        // The call itself works from an allowed source: only the prefix is refused.
        assert!(
            binds(&allowed, c.gateway_udp, &c.leg, &c.key),
            "127.0.0.2 binds the same leg"
        );
        allowed.send_to(&rtp(3, 1), c.gateway_udp).unwrap();
        let got = received(&voice, Duration::from_secs(3));
        assert!(got.contains(&rtp(3, 1)), "{} datagrams", got.len());
        // A bound leg cannot be moved into the denied prefix either.
        assert!(!binds(&soon_denied, c.gateway_udp, &c.leg, &c.key));
        soon_denied.send_to(&rtp(2, 2), c.gateway_udp).unwrap();
        let got = received(&voice, Duration::from_secs(1));
        assert!(!got.contains(&rtp(2, 2)));
        assert!(
            denied_latches(&gw) > denied,
            "the move was refused and counted"
        );
        phone.hang_up(c.id).await.unwrap();
        let _ = phone.bye().await;
    });
}
