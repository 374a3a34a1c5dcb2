//! A tiny fake gateway for the client's tests: the server side of the log-in (real SCRAM from
//! `control::auth`) and raw control messages, on a real TCP connection.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::control::auth::{self, AuthConfig, ServerFirst, SessionKey, Verifier};
use crate::wire::control::{self as proto, ClientMsg, ErrorCode, ServerMsg};

/// Iterations of the fake's verifiers (tests let the phone accept so few).
pub(crate) const ITER: u32 = 16;

/// The gateway's end of one control connection, in the test.
pub(crate) struct FakeGateway {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: Vec<u8>,
    pub key: Option<SessionKey>,
    pub peer: SocketAddr,
}

impl FakeGateway {
    pub async fn recv(&mut self) -> ClientMsg {
        loop {
            if let Some((body, used)) = proto::split_frame(&self.buf).expect("frame") {
                let m = proto::decode::<ClientMsg>(body).expect("client message");
                self.buf.drain(..used);
                return m;
            }
            let mut chunk = [0u8; 4096];
            let n = self.reader.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the phone closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Next message that is not a heartbeat.
    pub async fn recv_skip_heartbeats(&mut self) -> ClientMsg {
        loop {
            match self.recv().await {
                ClientMsg::Heartbeat { .. } => continue,
                m => return m,
            }
        }
    }

    pub async fn send(&mut self, m: &ServerMsg) {
        self.send_all(std::slice::from_ref(m)).await;
    }

    /// Several messages in one write (so the phone reads them together).
    pub async fn send_all(&mut self, ms: &[ServerMsg]) {
        let mut out = Vec::new();
        for m in ms {
            proto::encode(m, &mut out).expect("encode");
        }
        self.writer.write_all(&out).await.expect("write");
    }
}

pub(crate) enum Mode {
    Honest,
    WrongSignature,
}

/// Accepts one phone and runs the server side of the log-in with `password`'s verifier
/// (user "alice"; anyone else is unknown).
pub(crate) async fn gateway(
    listener: TcpListener,
    password: &str,
    mode: Mode,
    hb_ms: u32,
) -> FakeGateway {
    gateway_with(listener, password, mode, hb_ms, ITER, Vec::new()).await
}

/// [`gateway`] with the iteration count, and messages sent in the same write as `welcome`.
pub(crate) async fn gateway_with(
    listener: TcpListener,
    password: &str,
    mode: Mode,
    hb_ms: u32,
    iterations: u32,
    after_welcome: Vec<ServerMsg>,
) -> FakeGateway {
    let (s, peer) = listener.accept().await.expect("accept");
    let (reader, writer) = s.into_split();
    let mut g = FakeGateway {
        reader,
        writer,
        buf: Vec::new(),
        key: None,
        peer,
    };
    let verifier = Verifier::with_salt(password, b"0123456789abcdef", iterations);
    let config = AuthConfig::new([7; 32], iterations);
    let ClientMsg::Hello {
        version,
        user,
        nonce,
        ..
    } = g.recv().await
    else {
        panic!("expected hello")
    };
    assert_eq!(version, proto::VERSION);
    let (server, ch) = {
        let mut rng = rand::rng();
        ServerFirst::new(
            &config,
            &auth::Hello {
                user: user.clone(),
                client_nonce: nonce,
            },
            (user == "alice").then_some(&verifier),
            &mut rng,
        )
        .expect("valid hello")
    };
    g.send(&ServerMsg::Challenge {
        nonce: ch.server_nonce,
        salt: BASE64.encode(&ch.salt),
        iterations: ch.iterations,
    })
    .await;
    let ClientMsg::Proof {
        channel_binding,
        nonce,
        proof,
    } = g.recv().await
    else {
        panic!("expected proof")
    };
    let proof = auth::ClientProof {
        channel_binding,
        nonce,
        proof: BASE64.decode(proof).expect("base64"),
    };
    match server.verify(&proof) {
        Ok((sig, key)) => {
            let signature = match mode {
                Mode::Honest => BASE64.encode(&sig.signature),
                Mode::WrongSignature => BASE64.encode([0u8; 32]),
            };
            g.key = Some(key);
            let mut msgs = vec![ServerMsg::Welcome {
                session: 42,
                signature,
                user: user.clone(),
                number: "+15550001".into(),
                heartbeat_ms: hb_ms,
                misses: 3,
                observed: peer,
            }];
            msgs.extend(after_welcome);
            g.send_all(&msgs).await;
        }
        Err(_) => {
            g.send(&ServerMsg::Refused {
                code: ErrorCode::AuthFailed,
                message: "authentication failed".into(),
            })
            .await;
        }
    }
    g
}

pub(crate) async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    (l, a)
}
