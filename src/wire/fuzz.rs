//! Fuzz targets for the wire parsers: one function per parser, taking arbitrary bytes. A
//! target panics only when the parser breaks a promise (a panic inside it, a round trip that
//! changes the message, two deframings of one stream that disagree); bad input itself must
//! come back as a typed error.
//!
//! The same functions run in two harnesses: `fuzz/` (cargo-fuzz / libFuzzer, coverage-guided,
//! nightly) and `tests/fuzz_targets.rs` (stable, every CI run: the seeds below, the corpus
//! files under `fuzz/corpus/<target>/`, and a bounded number of mutations of them). Seeds are
//! valid messages built with this module's own encoders, so mutations start close to what the
//! parsers accept.

use std::net::SocketAddr;

use super::{control, framing, stun};

/// A fuzz target: arbitrary bytes in, a panic only when a parser breaks a promise.
pub type Target = fn(&[u8]);

/// The targets, by the names `fuzz/fuzz_targets/` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("stun", stun_message),
    ("deframe", deframe),
    ("control", control_message),
];

/// STUN (RFC 8489, and RFC 3489 classic requests): parse, then every accessor, integrity and
/// fingerprint checks. An accepted message's attributes lie inside it.
pub fn stun_message(data: &[u8]) {
    let _ = stun::looks_like_stun(data);
    let _ = stun::is_rfc3489_binding_request(data);
    let _ = stun::check_binding_success(data, b"key", &[0; 12]);
    let Ok(m) = stun::Message::parse(data) else {
        return;
    };
    assert!(m.len() <= data.len(), "a message longer than its bytes");
    assert_eq!(m.as_bytes(), &data[..m.len()]);
    let _ = (m.class(), m.method(), m.transaction_id());
    for (_, value) in m.attributes() {
        assert!(
            value.len() <= m.len(),
            "an attribute longer than its message"
        );
    }
    let _ = m.username();
    let _ = m.mapped_address();
    let _ = m.xor_address(stun::attr::XOR_MAPPED_ADDRESS);
    let _ = m.error_code();
    let _ = m.check_integrity(b"key");
    let _ = m.check_fingerprint();
}

/// RFC 4571 deframing, as the shard does it (pieces of frames, over reads cut anywhere)
/// against the client's copying [`framing::FrameBuffer`] over the same stream: both must find
/// the same frames and fail at the same oversize length. The first byte picks the largest frame,
/// the second where the reads are cut; the rest is the stream.
pub fn deframe(data: &[u8]) {
    let [max, cut, stream @ ..] = data else {
        return;
    };
    let max_len = u16::from(*max) * 8;
    let cut = usize::from(*cut).max(1);

    // The shard's way: pieces over chunks of `cut` bytes, gathered.
    let mut d = framing::Deframer::new(max_len);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut failed = None;
    'chunks: for chunk in stream.chunks(cut) {
        let mut pos = 0;
        loop {
            match d.next_piece(chunk, &mut pos) {
                Ok(Some(p)) => {
                    assert!(p.range.end <= chunk.len() && p.range.start <= p.range.end);
                    assert!(p.range.len() <= usize::from(p.frame_len));
                    assert_eq!(p.first, current.is_empty(), "first piece flag");
                    current.extend_from_slice(&chunk[p.range.clone()]);
                    assert!(
                        current.len() <= usize::from(max_len),
                        "a frame over max_len"
                    );
                    if p.last {
                        assert_eq!(current.len(), usize::from(p.frame_len));
                        frames.push(std::mem::take(&mut current));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(d.is_failed());
                    failed = Some(e);
                    break 'chunks;
                }
            }
            assert!(pos <= chunk.len(), "position past the chunk");
        }
    }

    // The client's way: the whole stream, copied, with no limit on what is buffered.
    let mut fb = framing::FrameBuffer::with_limit(max_len, stream.len() + 2);
    let _ = fb.push(stream);
    let mut reference: Vec<Vec<u8>> = Vec::new();
    let reference_failed = loop {
        match fb.next_frame() {
            Ok(Some(f)) => reference.push(f),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    // Zero-length frames: the deframer skips them (nothing to relay).
    reference.retain(|f| !f.is_empty());
    assert_eq!(frames, reference, "the two deframers disagree");
    assert_eq!(
        failed, reference_failed,
        "the two deframers fail differently"
    );
}

/// Control messages (length-prefixed JSON, docs/PROTOCOL.md): frame splitting, then both
/// directions' decoders. A message that decodes encodes and decodes back to itself.
pub fn control_message(data: &[u8]) {
    if let Ok(Some((body, n))) = control::split_frame(data) {
        assert!(n <= data.len() && body.len() + 2 == n);
    }
    if let Ok(m) = control::decode::<control::ClientMsg>(data) {
        let mut out = Vec::new();
        if control::encode(&m, &mut out).is_ok() {
            let again: control::ClientMsg =
                control::decode(&out[2..]).expect("an encoded message decodes");
            assert_eq!(again, m, "a client message changed in a round trip");
        }
    }
    if let Ok(m) = control::decode::<control::ServerMsg>(data) {
        let mut out = Vec::new();
        if control::encode(&m, &mut out).is_ok() {
            let again: control::ServerMsg =
                control::decode(&out[2..]).expect("an encoded message decodes");
            assert_eq!(again, m, "a server message changed in a round trip");
        }
    }
}

/// Valid inputs for `target`, to start mutations from (also written as the fuzz corpus).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let v4: SocketAddr = ([192, 0, 2, 1], 40_000).into();
    let v6: SocketAddr = "[2001:db8::1]:40000".parse().expect("a literal address");
    match target {
        "stun" => {
            let mut out = Vec::new();
            let mut buf = [0u8; 512];
            if let Ok(n) = stun::write_binding_request(&mut buf, b"leg-a", b"key", &[7; 12]) {
                out.push(buf[..n].to_vec());
            }
            for a in [v4, v6] {
                if let Ok(n) = stun::write_binding_success(&mut buf, &[9; 12], a, b"key") {
                    out.push(buf[..n].to_vec());
                }
            }
            // A classic RFC 3489 Binding request (no magic cookie), and its answer.
            let mut classic = vec![0x00, 0x01, 0x00, 0x00];
            classic.extend_from_slice(&[0x5a; 16]);
            for a in [v4, v6] {
                if let Ok(n) = stun::write_rfc3489_binding_response(&mut buf, &classic, a) {
                    out.push(buf[..n].to_vec());
                }
            }
            out.push(classic);
            out
        }
        "deframe" => {
            let mut stream = Vec::new();
            for len in [12usize, 172, 0, 1, 300] {
                stream.extend_from_slice(&(len as u16).to_be_bytes());
                stream.extend((0..len).map(|i| i as u8));
            }
            let mut a = vec![200, 7];
            a.extend_from_slice(&stream);
            let mut b = vec![10, 1];
            b.extend_from_slice(&stream);
            vec![a, b]
        }
        "control" => [
            r#"{"type":"hello","version":1,"user":"alice","nonce":"rOprNGfwEbeRWgbNEkqO"}"#,
            r#"{"type":"heartbeat","seq":1}"#,
            r#"{"type":"dial","tag":1,"number":"+15550002","media":"192.0.2.1:40000"}"#,
            r#"{"type":"hang_up","call":4}"#,
            r#"{"type":"hang_up","call":4,"reason":"peer_denied","detail":"media address 127.0.0.1 is in a denied range"}"#,
            r#"{"type":"probe_report","probe":1,"got_a":true,"got_b":false}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_messages_the_parsers_accept() {
        for s in seeds("stun") {
            // RFC 3489 messages (no magic cookie) are not RFC 8489 messages; the gateway
            // recognises the classic request only.
            let classic = s.get(4..8) != Some(&stun::MAGIC_COOKIE.to_be_bytes()[..]);
            let ok = if classic {
                stun::is_rfc3489_binding_request(&s) || s[..2] == [0x01, 0x01]
            } else {
                stun::Message::parse(&s).is_ok()
            };
            assert!(ok, "{s:02x?}");
        }
        for s in seeds("control") {
            let client = control::decode::<control::ClientMsg>(&s);
            let server = control::decode::<control::ServerMsg>(&s);
            assert!(
                client.is_ok() || server.is_ok(),
                "{}: {client:?} {server:?}",
                String::from_utf8_lossy(&s)
            );
        }
        // The first deframe seed holds four non-empty frames; the second's limit is too small
        // for them (the oversize path).
        let deframe_seeds = seeds("deframe");
        for (s, frames, fails) in [(&deframe_seeds[0], 4, false), (&deframe_seeds[1], 1, true)] {
            let mut d = framing::Deframer::new(u16::from(s[0]) * 8);
            let (mut pos, mut last) = (0, 0);
            while let Ok(Some(p)) = d.next_piece(&s[2..], &mut pos) {
                last += usize::from(p.last);
            }
            assert_eq!((last, d.is_failed()), (frames, fails));
        }
        for &(name, target) in TARGETS {
            for s in seeds(name) {
                target(&s);
            }
        }
    }
}
