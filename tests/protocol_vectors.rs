//! The worked test vectors of `docs/PROTOCOL.md` ("Test vectors"), checked against the code:
//! the values are parsed from the document itself, so the document and the code cannot drift
//! apart. Each value is computed twice where the document gives a formula: once by the code
//! the gateway and the softphone run, once here from the formula with plain HMAC/PBKDF2.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use voxgate::client::binding;
use voxgate::control::auth::{AuthConfig, ClientFirst, ServerFirst, SessionKey, Verifier};
use voxgate::control::leg_key;
use voxgate::control::paths::{self, CheckKey};
use voxgate::wire::control::{self as proto, ClientMsg, ServerMsg};

/// An "RNG" that yields one byte value forever: fixed nonces.
struct Fixed(u8);

impl rand::RngCore for Fixed {
    fn next_u32(&mut self) -> u32 {
        u32::from_ne_bytes([self.0; 4])
    }
    fn next_u64(&mut self) -> u64 {
        u64::from_ne_bytes([self.0; 8])
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        dst.fill(self.0);
    }
}

impl rand::CryptoRng for Fixed {}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `name = value` lines of the fenced block after the `<!-- test-vectors -->` marker.
fn doc_vectors() -> BTreeMap<String, String> {
    let doc = include_str!("../docs/PROTOCOL.md");
    let start = doc
        .find("<!-- test-vectors -->")
        .expect("docs/PROTOCOL.md has a test-vectors block");
    let block = doc[start..]
        .split("```")
        .nth(1)
        .expect("a fenced block follows the marker");
    block
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Everything the document lists, computed by the code.
fn computed() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let (user, password) = ("alice", "pencil");
    let salt = [0x03u8; 16];
    let iterations = 4096;
    v.insert("user".into(), user.into());
    v.insert("password".into(), password.into());
    v.insert("salt".into(), B64.encode(salt));
    v.insert("iterations".into(), iterations.to_string());

    // The code's log-in, both sides, with fixed nonces.
    let (client, hello) = ClientFirst::new(user, &mut Fixed(0x01)).expect("hello");
    let verifier = Verifier::with_salt(password, &salt, iterations);
    let cfg = AuthConfig::new([0x55; 32], iterations);
    let (server, challenge) =
        ServerFirst::new(&cfg, &hello, Some(&verifier), &mut Fixed(0x02)).expect("challenge");
    let (client, proof) = client.respond(password, &challenge).expect("proof");
    let (signature, server_key) = server.verify(&proof).expect("verified");
    let client_key = client.verify_server(&signature).expect("server verified");
    assert_eq!(client_key, server_key);
    v.insert("client_nonce".into(), hello.client_nonce.clone());
    v.insert("nonce".into(), challenge.server_nonce.clone());
    v.insert("client_proof".into(), B64.encode(&proof.proof));
    v.insert("server_signature".into(), B64.encode(&signature.signature));
    v.insert("session_key".into(), hex(client_key.as_bytes()));

    // The JSON messages, as the wire module encodes them (body only; a 2-byte length precedes).
    let json = |m: &dyn erased::Enc| m.json();
    v.insert(
        "hello_json".into(),
        json(&ClientMsg::Hello {
            version: proto::VERSION,
            user: user.into(),
            nonce: hello.client_nonce.clone(),
            software: None,
        }),
    );
    v.insert(
        "challenge_json".into(),
        json(&ServerMsg::Challenge {
            nonce: challenge.server_nonce.clone(),
            salt: B64.encode(&challenge.salt),
            iterations: challenge.iterations,
        }),
    );
    v.insert(
        "proof_json".into(),
        json(&ClientMsg::Proof {
            channel_binding: proof.channel_binding.clone(),
            nonce: proof.nonce.clone(),
            proof: B64.encode(&proof.proof),
        }),
    );

    // Keys derived from the session key.
    let leg = "L1";
    v.insert("leg".into(), leg.into());
    let lk = leg_key(&client_key, leg);
    v.insert(
        "leg_key".into(),
        String::from_utf8(lk.clone()).expect("hex text"),
    );
    let mut buf = [0u8; 256];
    let n = binding::request(&mut buf, leg, &lk, &[0x0a; 12]).expect("request");
    v.insert("binding_txid".into(), hex(&[0x0a; 12]));
    v.insert("binding_request".into(), hex(&buf[..n]));
    let ck = CheckKey([0x07; 16]);
    v.insert("check_call".into(), "42".into());
    v.insert("check_key".into(), hex(&ck.0));
    v.insert("check_nonce".into(), hex(&[0x09; 16]));
    v.insert("check_username".into(), paths::check_username(42, true));
    v.insert(
        "check_key_sealed".into(),
        paths::seal(&client_key, 42, true, [0x09; 16], &ck),
    );
    v
}

mod erased {
    pub trait Enc {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Enc for T {
        fn json(&self) -> String {
            let mut out = Vec::new();
            voxgate::wire::control::encode(self, &mut out).expect("encodes");
            String::from_utf8(out[2..].to_vec()).expect("utf-8")
        }
    }
}

#[test]
fn the_documents_vectors_are_what_the_code_computes() {
    let doc = doc_vectors();
    let code = computed();
    if std::env::var("PRINT_VECTORS").is_ok() {
        for (k, v) in &code {
            println!("{k} = {v}");
        }
    }
    assert!(!doc.is_empty(), "no vectors found in docs/PROTOCOL.md");
    for (k, want) in &code {
        assert_eq!(doc.get(k), Some(want), "docs/PROTOCOL.md test vector `{k}`");
    }
    for k in doc.keys() {
        assert!(
            code.contains_key(k),
            "the document lists `{k}`, which no test checks"
        );
    }
}

/// The formulas of the document, computed here independently of the code's modules.
#[test]
fn the_documents_formulas_give_the_same_values() {
    let d = doc_vectors();
    let g = |k: &str| d.get(k).cloned().unwrap_or_else(|| panic!("vector {k}"));
    let salt = B64.decode(g("salt")).expect("salt");
    let iterations: u32 = g("iterations").parse().expect("iterations");
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(g("password").as_bytes(), &salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    let auth_message = format!(
        "n={u},r={cn},r={n},s={s},i={i},c=biws,r={n}",
        u = g("user"),
        cn = g("client_nonce"),
        n = g("nonce"),
        s = g("salt"),
        i = iterations
    );
    let client_sig = hmac(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(client_sig)
        .map(|(a, b)| a ^ b)
        .collect();
    assert_eq!(B64.encode(&proof), g("client_proof"));
    assert_eq!(
        B64.encode(hmac(&server_key, auth_message.as_bytes())),
        g("server_signature")
    );
    let session = hmac(
        &stored_key,
        &[&b"voxgate session key v1\0"[..], auth_message.as_bytes()].concat(),
    );
    assert_eq!(hex(&session), g("session_key"));
    let leg_key = hmac(
        &session,
        &[&b"voxgate leg key\0"[..], g("leg").as_bytes()].concat(),
    );
    assert_eq!(hex(&leg_key), g("leg_key"));
    // The sealed check key opens with the session key to the listed key.
    let sk = SessionKey::from_bytes(session);
    let opened = paths::open(&sk, 42, true, &g("check_key_sealed")).expect("opens");
    assert_eq!(hex(&opened.0), g("check_key"));
    let raw = B64.decode(g("check_key_sealed")).expect("base64");
    let ctx = b"42:forward";
    let e = hmac(
        &session,
        &[&b"voxgate check key enc\0"[..], &raw[..16], ctx].concat(),
    );
    let ct: Vec<u8> = opened.0.iter().zip(e).map(|(a, b)| a ^ b).collect();
    assert_eq!(&raw[16..32], &ct[..]);
    let tag = hmac(
        &session,
        &[&b"voxgate check key mac\0"[..], ctx, &raw[..32]].concat(),
    );
    assert_eq!(&raw[32..], &tag[..16]);
}
