//! Per-packet costs of the wire codecs on the gateway's hot paths: demultiplexing and
//! authenticating a STUN Binding request, reading the RTP header of a G.711 packet, and
//! finding RFC 4571 frames in a TCP receive buffer.
//!
//! Quick run: `cargo bench --bench packet_path -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voxgate::wire::{framing, rtp, stun};

const TXID: [u8; 12] = *b"voxgate-txid";
const KEY: &[u8] = b"per-leg-session-key-0123456789ab";

/// A Binding request as a client sends it on a media port: USERNAME, MESSAGE-INTEGRITY,
/// FINGERPRINT (ICE-style, RFC 8445 §7.1.2).
fn binding_request(buf: &mut [u8]) -> usize {
    let mut w = stun::Writer::new(buf, stun::Class::Request, stun::BINDING, &TXID)
        .expect("buffer holds a header");
    w.attr(stun::attr::USERNAME, b"leg-7f3a:alice")
        .and_then(|w| w.message_integrity(KEY))
        .and_then(|w| w.fingerprint())
        .expect("buffer holds the request");
    w.finish()
}

fn bench_stun(c: &mut Criterion) {
    let mut buf = [0u8; 128];
    let n = binding_request(&mut buf);
    let req = &buf[..n];
    let mut g = c.benchmark_group("stun");
    g.throughput(Throughput::Elements(1));
    g.bench_function("looks_like_stun", |b| {
        b.iter(|| stun::looks_like_stun(black_box(req)))
    });
    g.bench_function("binding_request_parse_check_integrity", |b| {
        b.iter(|| {
            let req = black_box(req);
            stun::looks_like_stun(req)
                && stun::Message::parse(req)
                    .and_then(|m| m.check_integrity(black_box(KEY)))
                    .is_ok()
        })
    });
    let mapped: SocketAddr = "198.51.100.23:40123".parse().expect("valid address");
    g.bench_function("binding_response_write", |b| {
        let mut out = [0u8; 128];
        b.iter(|| {
            let mut w = stun::Writer::new(&mut out, stun::Class::Success, stun::BINDING, &TXID)
                .expect("buffer holds a header");
            w.xor_address(stun::attr::XOR_MAPPED_ADDRESS, black_box(mapped))
                .and_then(|w| w.message_integrity(KEY))
                .and_then(|w| w.fingerprint())
                .expect("buffer holds the response");
            w.finish()
        })
    });
    g.finish();
}

fn bench_rtp(c: &mut Criterion) {
    // 12-byte header + 160 bytes of 20 ms G.711 at 8 kHz.
    let mut pkt = [0xd5u8; 172];
    rtp::write_fixed_header(&mut pkt, false, 0, 4711, 160 * 4711, 0x5eed_cafe)
        .expect("172 bytes hold a header");
    let mut g = c.benchmark_group("rtp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("new_checked_seq_ts_ssrc_g711", |b| {
        b.iter(|| {
            let p = rtp::RtpPacket::new_checked(black_box(&pkt[..])).expect("valid packet");
            (p.sequence(), p.timestamp(), p.ssrc())
        })
    });
    g.finish();
}

fn bench_framing(c: &mut Criterion) {
    // A TCP receive buffer of 2 KiB full of 174-byte frames (length prefix + 172-byte RTP),
    // ending inside a frame as real reads do.
    let frame_len = 172;
    let mut stream = Vec::new();
    while stream.len() < 2048 {
        stream.extend_from_slice(&framing::header(frame_len).expect("small frame"));
        stream.extend(std::iter::repeat_n(0xd5u8, frame_len));
    }
    let chunk = &stream[..2048];
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(2048));
    g.bench_function("deframer_2KiB_of_174B_frames", |b| {
        b.iter(|| {
            let mut d = framing::Deframer::new(1500);
            let chunk = black_box(chunk);
            let mut pos = 0;
            let mut frames = 0u32;
            while let Ok(Some(p)) = d.next_piece(chunk, &mut pos) {
                frames += u32::from(p.last);
            }
            frames
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("header", |b| {
        b.iter(|| framing::header(black_box(172usize)))
    });
    g.finish();
}

criterion_group!(packet_path, bench_stun, bench_rtp, bench_framing);
criterion_main!(packet_path);
