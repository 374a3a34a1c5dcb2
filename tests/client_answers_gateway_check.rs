//! The softphone answers the gateway's validation check (PROTOCOL.md, "Validated latching"):
//! when a bound leg's source changes, the gateway sends a Binding request keyed with the leg
//! key to the new source, and moves media there only when the answer comes back. A stand-in
//! gateway socket binds a real media engine, then checks it: the engine answers a check keyed
//! with its leg key (same transaction id, MESSAGE-INTEGRITY with the leg key, the request's
//! source as XOR-MAPPED-ADDRESS), and ignores one keyed with anything else or from elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use voxgate::client::Firewall;
use voxgate::client::media::{BoundMedia, MediaOptions};
use voxgate::control::auth::SessionKey;
use voxgate::control::leg_key;
use voxgate::control::planner::{Path, Plan};
use voxgate::metrics::Transport;
use voxgate::wire::control::{MediaInstructions, MediaRecv, MediaSend};
use voxgate::wire::stun;

/// The next STUN message on `gw` (media packets are skipped), with its source.
async fn next_stun(gw: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = tokio::time::timeout_at(deadline, gw.recv_from(&mut buf)).await;
        let (n, from) = r.ok()?.ok()?;
        if stun::looks_like_stun(&buf[..n]) {
            return Some((buf[..n].to_vec(), from));
        }
    }
}

#[tokio::test]
async fn the_phone_answers_a_keyed_check_from_its_gateway_only() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = gw.local_addr().unwrap();
    let phone = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let phone_addr = phone.local_addr().unwrap();
    let session = SessionKey::from_bytes([7; 32]);
    let leg = "call-9-a";
    let key = leg_key(&session, leg);
    let instr = MediaInstructions {
        call_key: false,
        call: 9,
        plan: Some(Plan {
            forward: Path::UdpViaGateway,
            backward: Path::UdpViaGateway,
        }),
        caller: true,
        send: MediaSend {
            transport: Transport::Udp,
            to: Some(gw_addr),
            via_gateway: true,
        },
        recv: MediaRecv {
            transport: Transport::Udp,
            via_gateway: true,
            from: Some(gw_addr),
        },
        leg: Some(leg.into()),
        gateway_udp: Some(gw_addr),
        gateway_tcp: None,
        gateway_tcp_tls: false,
        payload_type: 0,
        clock_rate: 8000,
        paths: None,
    };
    let opts = MediaOptions {
        firewall: Firewall::OPEN,
        bind_timeout: Duration::from_secs(5),
        ..MediaOptions::default()
    };
    // The stand-in gateway answers the phone's Binding, as the shard does.
    let answer = async {
        let (req, from) = next_stun(&gw, Duration::from_secs(5))
            .await
            .expect("the phone binds");
        let m = stun::Message::parse(&req).unwrap();
        assert_eq!(m.username(), Some(leg.as_bytes()));
        let mut b = [0u8; 128];
        let n = stun::write_binding_success(&mut b, m.transaction_id(), from, &key).unwrap();
        gw.send_to(&b[..n], from).await.unwrap();
    };
    let (bound, ()) = tokio::join!(
        BoundMedia::bind(&instr, &session, phone.clone(), opts),
        answer
    );
    let call = bound.expect("bound").start();

    // The gateway's check, keyed with the leg key: answered.
    let txid = [0x42; 12];
    let mut b = [0u8; 256];
    let n = stun::write_binding_request(&mut b, leg.as_bytes(), &key, &txid).unwrap();
    gw.send_to(&b[..n], phone_addr).await.unwrap();
    let (resp, from) = next_stun(&gw, Duration::from_secs(3))
        .await
        .expect("the phone answers its gateway's check");
    assert_eq!(from, phone_addr, "from the call's socket");
    assert_eq!(
        stun::check_binding_success(&resp, &key, &txid),
        Some(gw_addr),
        "same transaction id, keyed with the leg key, the check's source as mapped address"
    );

    // A check keyed with another key, or naming another leg: no answer.
    let n = stun::write_binding_request(&mut b, leg.as_bytes(), b"not the key", &[1; 12]).unwrap();
    gw.send_to(&b[..n], phone_addr).await.unwrap();
    let n = stun::write_binding_request(&mut b, b"other-leg", &key, &[2; 12]).unwrap();
    gw.send_to(&b[..n], phone_addr).await.unwrap();
    // From a socket that is not the gateway: no answer either (it would be a reflector).
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let n = stun::write_binding_request(&mut b, leg.as_bytes(), &key, &[3; 12]).unwrap();
    stranger.send_to(&b[..n], phone_addr).await.unwrap();
    let mut sbuf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stranger.recv_from(&mut sbuf))
            .await
            .is_err(),
        "a stranger gets no answer"
    );
    // What the phone sends the gateway meanwhile: its own keep-alives and consent checks
    // (requests), never an answer to the wrongly keyed or misnamed checks.
    let end = tokio::time::Instant::now() + Duration::from_millis(400);
    while let Some((m, _)) = next_stun(
        &gw,
        end.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
    {
        let parsed = stun::Message::parse(&m).unwrap();
        assert!(
            matches!(
                parsed.class(),
                stun::Class::Indication | stun::Class::Request
            ),
            "no answer to a wrongly keyed check: {:?} {:?}",
            parsed.class(),
            parsed.transaction_id()
        );
    }
    call.stop_sending().await;
    let _ = call.finish().await;
}
