//! WebSocket media connections (the browser phone's leg) beside RFC 4571 on the shard's TCP
//! listener. A connection whose first byte is `G` (an HTTP `GET`; an RFC 4571 stream starts with
//! a length's high byte, 0x00–0x05 for any frame within `max_frame`) gets its opening handshake
//! gathered in a spare buffer (at most [`ws::MAX_HANDSHAKE`] bytes), checked, and answered with
//! `101 Switching Protocols`; from then on each binary frame carries one packet, unmasked in
//! place and handed to the same piece handling as an RFC 4571 frame (`tcp::on_tcp`), so binding
//! (the keyed STUN Binding as the first packet), forwarding, queues and drop rules are the TCP
//! leg's. Frames the gateway sends carry a WebSocket header instead of the length prefix.
//!
//! Ping is answered with pong; close, text, fragmented, unmasked or oversize frames close the
//! connection (a close frame is not echoed: the connection just ends). This module owns only the
//! framing decision and the handshake; it does not change how a leg binds or forwards.

use super::{ConnId, DropReason, Outbox, Relay, framing};
use crate::shard::pool::{BufId, Pool, Seg};
use crate::wire::ws;

/// How a TCP media connection frames packets; decided by its first byte.
#[derive(Debug)]
pub(crate) enum Framing {
    /// Nothing received yet.
    Undecided,
    /// RFC 4571: a 2-byte length before each packet.
    Rfc4571,
    /// An HTTP request being gathered in a spare buffer (`got` bytes so far).
    Handshake { buf: BufId, got: u16 },
    /// WebSocket frames, after the 101 answer.
    WebSocket(Box<ws::Deframer>),
}

/// Gives back the spare a half-read handshake holds (the connection is closing).
pub(super) fn release(pool: &mut Pool, f: &mut Framing) {
    if let Framing::Handshake { buf, .. } = std::mem::replace(f, Framing::Undecided) {
        pool.release(buf);
    }
}

impl Relay {
    /// The header of a frame of `len` bytes toward connection `c`: an RFC 4571 length or a
    /// WebSocket binary frame header.
    pub(super) fn frame_header(&self, c: ConnId, len: usize) -> Option<([u8; 4], u8)> {
        let conn = self.conn(c)?;
        if matches!(conn.framing, Framing::WebSocket(_)) {
            return ws::server_header(ws::OP_BINARY, len).ok();
        }
        framing::header(len).ok().map(|[a, b]| ([a, b, 0, 0], 2))
    }

    /// The next piece of packet payload in `seg[*pos..]`, by the connection's framing.
    /// `Err(())`: a framing error (the caller counts it and closes the connection).
    pub(super) fn next_piece(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        pos: &mut usize,
        out: &mut Outbox,
    ) -> Result<Option<framing::Piece>, ()> {
        let max_frame = self.cfg.max_frame;
        loop {
            let Some(conn) = self.conn_mut(c) else {
                return Ok(None);
            };
            if conn.closing {
                return Ok(None);
            }
            match &mut conn.framing {
                Framing::Rfc4571 => {
                    return conn.deframer.next_piece(pool.seg(seg), pos).map_err(|_| ());
                }
                Framing::Undecided => match pool.seg(seg).get(*pos) {
                    None => return Ok(None),
                    Some(b'G') => {
                        let Some(buf) = super::tcp::take_spare(pool, false) else {
                            self.counters.drop(DropReason::NoReassemblyBuffer);
                            return Err(());
                        };
                        if let Some(conn) = self.conn_mut(c) {
                            conn.framing = Framing::Handshake { buf, got: 0 };
                        } else {
                            pool.release(buf);
                        }
                    }
                    Some(_) => conn.framing = Framing::Rfc4571,
                },
                Framing::Handshake { buf, got } => {
                    let (buf, old) = (*buf, usize::from(*got));
                    let limit = ws::MAX_HANDSHAKE.min(pool.buf_size());
                    let avail = usize::from(seg.len).saturating_sub(*pos);
                    let n = avail.min(limit - old);
                    let piece = Seg::new(seg.buf, usize::from(seg.off) + *pos, n);
                    let copied = super::tcp::copy_into_at(pool, buf, old, &[piece]);
                    let got = old + copied;
                    let parsed = if got >= limit && got < ws::MAX_HANDSHAKE {
                        // A pool buffer smaller than the protocol's limit is the bound.
                        ws::parse_upgrade(&pool.buf(buf)[..got])
                            .and_then(|u| u.ok_or(ws::HandshakeError::TooLarge).map(Some))
                    } else {
                        ws::parse_upgrade(&pool.buf(buf)[..got])
                    };
                    match parsed {
                        // Counted (BadFrame) and closed by the caller.
                        Err(_) => return Err(()),
                        Ok(None) => {
                            *pos += copied;
                            if let Some(conn) = self.conn_mut(c) {
                                conn.framing = Framing::Handshake {
                                    buf,
                                    got: got as u16,
                                };
                            }
                            return Ok(None);
                        }
                        Ok(Some(u)) => {
                            // Bytes after the request (none from a browser, which waits for
                            // the answer) are frames.
                            *pos += u.len - old;
                            self.upgrade(pool, c, buf, &u.accept, max_frame, out);
                        }
                    }
                }
                Framing::WebSocket(d) => {
                    let start = *pos;
                    let len = usize::from(seg.len).saturating_sub(start);
                    // SAFETY: `seg` lies inside the pool mapping (a received buffer); the bytes
                    // from `start` on have not been handed to anything yet (pieces before
                    // `start` may be queued, none after), and no operation on this buffer is
                    // in flight while the loop hands it to us, so this is the only view of
                    // them; it ends before the next call that touches the pool.
                    let rest = unsafe {
                        std::slice::from_raw_parts_mut(
                            pool.addr(seg.buf).add(usize::from(seg.off) + start),
                            len,
                        )
                    };
                    let mut p = 0;
                    let ev = d.next(rest, &mut p);
                    *pos = start + p;
                    match ev {
                        Ok(None) => return Ok(None),
                        Ok(Some(ws::Event::Data(mut piece))) => {
                            piece.range = piece.range.start + start..piece.range.end + start;
                            return Ok(Some(piece));
                        }
                        Ok(Some(ws::Event::Pong)) => {}
                        Ok(Some(ws::Event::Ping)) => self.pong(pool, c, out),
                        Ok(Some(ws::Event::Close)) => {
                            self.close(pool, c, out);
                            return Ok(None);
                        }
                        Err(_) => return Err(()),
                    }
                }
            }
        }
    }

    /// The handshake checked: answer 101 from the spare it was gathered in, and read frames.
    fn upgrade(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        buf: BufId,
        accept: &[u8; 28],
        max_frame: u16,
        out: &mut Outbox,
    ) {
        let cap = self.cfg.tcp_queue_frames;
        if let Some(conn) = self.conn_mut(c) {
            conn.framing = Framing::WebSocket(Box::new(ws::Deframer::new(max_frame)));
            // Room for the answer and the Binding's answer that may follow it before the first
            // send completes; the bound connection keeps this queue.
            conn.queue.grow(cap.max(2));
        }
        // The spare holds one reference, ours: nothing else reads it.
        let n = pool
            .buf_mut_id(buf)
            .and_then(|b| ws::write_response(accept, b));
        if let Some(n) = n {
            self.push_raw_frame(pool, c, Seg::new(buf, 0, n), [0; 4], 0, out);
        }
        pool.release(buf);
    }

    /// Answers a ping with a pong carrying its payload.
    fn pong(&mut self, pool: &mut Pool, c: ConnId, out: &mut Outbox) {
        let Some(buf) = pool.take_spare() else {
            self.counters.drop(DropReason::NoReassemblyBuffer);
            return;
        };
        let payload = match self.conn(c).map(|x| &x.framing) {
            Some(Framing::WebSocket(d)) => d.control_payload(),
            _ => &[],
        };
        let n = payload.len();
        if let Some(b) = pool.buf_mut(&buf) {
            b[..n].copy_from_slice(payload);
            if let Ok((hdr, hl)) = ws::server_header(ws::OP_PONG, n) {
                self.push_raw_frame(pool, c, Seg::new(buf.id(), 0, n), hdr, hl, out);
            }
        }
        pool.release_received(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fd, recv, sent_bytes};
    use super::super::{Delivery, LegSpec, RelayConfig, SessionSpec};
    use super::*;
    use crate::metrics::DropReason;
    use crate::wire::stun;

    fn pool() -> Pool {
        super::super::test_support::pool(64)
    }

    /// Feeds `bytes` to connection `c` in reads of at most `cut` bytes.
    fn feed(
        relay: &mut Relay,
        pool: &mut Pool,
        c: ConnId,
        bytes: &[u8],
        cut: usize,
        out: &mut Outbox,
    ) {
        for piece in bytes.chunks(cut) {
            let id = (64..128).find(|&b| pool.refs(b) == 0).unwrap();
            let seg = recv(pool, id, piece);
            relay.on_tcp(pool, c, seg, 1, out);
            pool.release(id);
        }
    }

    /// The bytes queued on `c` (headers and payloads), as the socket would carry them; then
    /// the send completes.
    fn drain(relay: &mut Relay, pool: &mut Pool, c: ConnId) -> Vec<u8> {
        let conn = relay.conn(c).unwrap();
        let mut v = Vec::new();
        for i in 0..conn.queue.len {
            let f = conn.queue.get(i).unwrap();
            v.extend_from_slice(&f.hdr[..usize::from(f.hdr_len)]);
            for s in f.segs() {
                v.extend_from_slice(pool.seg(*s));
            }
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; super::super::TCP_IOV];
        relay.prepare_tcp_send(pool, c, &mut iov);
        relay.tcp_sent(pool, c, v.len());
        v
    }

    const HANDSHAKE: &[u8] = b"GET /media HTTP/1.1\r\nHost: 192.0.2.1:7401\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn session(relay: &mut Relay) {
        relay
            .install(SessionSpec {
                id: 1,
                legs: vec![
                    LegSpec {
                        name: "u".into(),
                        key: b"k".to_vec(),
                        delivery: Delivery::UdpLatched,
                        trusted_source: Some("192.0.2.1:1000".parse().unwrap()),
                        clock_rate: 8000,
                    },
                    LegSpec {
                        name: "w".into(),
                        key: b"kw".to_vec(),
                        delivery: Delivery::Tcp,
                        trusted_source: None,
                        clock_rate: 8000,
                    },
                ],
            })
            .unwrap();
    }

    #[test]
    fn a_websocket_leg_upgrades_binds_and_carries_media_both_ways() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        session(&mut relay);
        let c = relay
            .on_accept(
                &mut pool,
                fd(),
                "192.0.2.2:2000".parse().unwrap(),
                0,
                &mut out,
            )
            .unwrap();
        // The handshake in pieces: answered once complete, with RFC 6455's accept value.
        feed(&mut relay, &mut pool, c, HANDSHAKE, 30, &mut out);
        let answer = drain(&mut relay, &mut pool, c);
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        assert!(!relay.conn(c).unwrap().is_bound());
        // Media before the Binding: not a Binding, the connection closes (as on RFC 4571)...
        // shown on a second connection below. First the Binding, masked, split over reads.
        let mut req = [0u8; 256];
        let n = stun::write_binding_request(&mut req, b"w", b"kw", &[5; 12]).unwrap();
        let frame = ws::client_frame(ws::OP_BINARY, [9, 8, 7, 6], &req[..n]);
        feed(&mut relay, &mut pool, c, &frame, 7, &mut out);
        assert!(
            relay.conn(c).unwrap().is_bound(),
            "bound by the keyed Binding"
        );
        let resp = drain(&mut relay, &mut pool, c);
        let (op, range, used) = ws::parse_server_frame(&resp).unwrap().unwrap();
        assert_eq!((op, used), (ws::OP_BINARY, resp.len()));
        let m = stun::Message::parse(&resp[range]).unwrap();
        assert_eq!(m.transaction_id(), &[5; 12]);
        m.check_integrity(b"kw").unwrap();
        // UDP media toward the WebSocket leg: one binary frame each (4-byte header: 172 > 125).
        let rtp: Vec<u8> = (0..172u32)
            .map(|i| if i == 0 { 0x80 } else { i as u8 })
            .collect();
        let seg = recv(&mut pool, 0, &rtp);
        relay.on_udp(
            &mut pool,
            "192.0.2.1:1000".parse().unwrap(),
            seg,
            1,
            &mut out,
        );
        pool.release(0);
        let got = drain(&mut relay, &mut pool, c);
        assert_eq!(&got[..4], &[0x82, 126, 0, 172]);
        assert_eq!(&got[4..], &rtp[..]);
        // WebSocket media toward the UDP leg: unmasked in place, sent from where it landed.
        let mut two = ws::client_frame(ws::OP_BINARY, [1, 2, 3, 4], &rtp);
        two.extend(ws::client_frame(ws::OP_BINARY, [4, 3, 2, 1], &rtp[..100]));
        feed(&mut relay, &mut pool, c, &two, 1000, &mut out);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        for o in out.udp.drain(..) {
            if o.dst == "192.0.2.1:1000".parse().unwrap() {
                sent.push(sent_bytes(&pool, &o.data));
            }
            pool.sent(o.data);
        }
        assert_eq!(sent, vec![rtp.clone(), rtp[..100].to_vec()]);
        // Ping: answered with a pong carrying its payload.
        feed(
            &mut relay,
            &mut pool,
            c,
            &ws::client_frame(ws::OP_PING, [7; 4], b"hi"),
            1000,
            &mut out,
        );
        assert_eq!(drain(&mut relay, &mut pool, c), vec![0x8a, 2, b'h', b'i']);
        // A text frame is not media: the connection closes.
        feed(
            &mut relay,
            &mut pool,
            c,
            &ws::client_frame(ws::OP_TEXT, [7; 4], b"{}"),
            1000,
            &mut out,
        );
        assert_eq!(out.close, vec![c]);
        assert_eq!(relay.counters.dropped(DropReason::BadFrame), 1);
        assert!(relay.reap(&mut pool, c).is_some());
        assert_eq!(pool.in_use(), 0, "nothing leaks");
    }

    #[test]
    fn bad_or_slow_handshakes_close_and_give_their_buffer_back() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        session(&mut relay);
        let accept = |relay: &mut Relay, pool: &mut Pool, out: &mut Outbox| {
            relay
                .on_accept(pool, fd(), "192.0.2.2:2000".parse().unwrap(), 0, out)
                .unwrap()
        };
        // Headers that never end: closed at MAX_HANDSHAKE bytes, not later.
        let c = accept(&mut relay, &mut pool, &mut out);
        let mut long = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(ws::MAX_HANDSHAKE + 500, b'a');
        feed(
            &mut relay,
            &mut pool,
            c,
            &long[..ws::MAX_HANDSHAKE - 1],
            700,
            &mut out,
        );
        assert!(out.close.is_empty(), "still within the limit");
        feed(
            &mut relay,
            &mut pool,
            c,
            &long[ws::MAX_HANDSHAKE - 1..],
            700,
            &mut out,
        );
        assert_eq!(out.close, vec![c]);
        assert!(relay.reap(&mut pool, c).is_some());
        assert_eq!(pool.in_use(), 0);
        // A wrong handshake (version 8): closed, no answer.
        let c = accept(&mut relay, &mut pool, &mut out);
        let v8 = String::from_utf8(HANDSHAKE.to_vec())
            .unwrap()
            .replace("Version: 13", "Version: 8");
        feed(&mut relay, &mut pool, c, v8.as_bytes(), 1000, &mut out);
        assert_eq!(out.close.last(), Some(&c));
        assert_eq!(relay.conn(c).unwrap().queued(), 0);
        assert!(relay.reap(&mut pool, c).is_some());
        // Half a handshake, then silence: the housekeeping closes it and its spare comes back.
        let c = accept(&mut relay, &mut pool, &mut out);
        feed(&mut relay, &mut pool, c, &HANDSHAKE[..50], 1000, &mut out);
        assert_eq!(pool.in_use(), 1, "the handshake's spare");
        relay.housekeeping(&mut pool, 60_000_000_000, &mut out);
        assert_eq!(out.close.last(), Some(&c));
        assert!(relay.reap(&mut pool, c).is_some());
        assert_eq!(pool.in_use(), 0);
        // Upgraded, then media before the Binding: closed, as on an RFC 4571 connection.
        let c = accept(&mut relay, &mut pool, &mut out);
        feed(&mut relay, &mut pool, c, HANDSHAKE, 1000, &mut out);
        drain(&mut relay, &mut pool, c);
        feed(
            &mut relay,
            &mut pool,
            c,
            &ws::client_frame(ws::OP_BINARY, [1; 4], &[0x80; 50]),
            1000,
            &mut out,
        );
        assert_eq!(out.close.last(), Some(&c));
        // Oversize and fragmented frames close too.
        for bad in [ws::client_frame(ws::OP_BINARY, [1; 4], &[0; 1501]), {
            let mut f = ws::client_frame(ws::OP_BINARY, [1; 4], &[0x80; 20]);
            f[0] &= 0x7f;
            f
        }] {
            let c = accept(&mut relay, &mut pool, &mut out);
            feed(&mut relay, &mut pool, c, HANDSHAKE, 1000, &mut out);
            drain(&mut relay, &mut pool, c);
            feed(&mut relay, &mut pool, c, &bad, 1000, &mut out);
            assert_eq!(out.close.last(), Some(&c));
        }
    }

    #[test]
    fn half_done_handshakes_never_take_the_spares_bound_legs_need() {
        // 8 spares; each half-done handshake holds one. Unbound connections may take one only
        // while more than half are free: the fifth is refused (closed), and a bound leg can
        // still gather a frame.
        let mut relay = Relay::new(RelayConfig {
            max_unbound_tcp_per_source: 100,
            ..RelayConfig::default()
        });
        let mut pool = pool();
        let mut out = Outbox::default();
        session(&mut relay);
        let mut conns = Vec::new();
        for i in 0..6u16 {
            let peer = format!("192.0.2.{}:2000", 10 + i).parse().unwrap();
            let c = relay.on_accept(&mut pool, fd(), peer, 0, &mut out).unwrap();
            feed(&mut relay, &mut pool, c, &HANDSHAKE[..20], 1000, &mut out);
            conns.push(c);
        }
        assert_eq!(pool.spare_free(), 4, "half the spares stay free");
        assert_eq!(
            out.close,
            conns[4..].to_vec(),
            "the fifth and sixth are refused"
        );
        assert_eq!(relay.counters.dropped(DropReason::NoReassemblyBuffer), 2);
        for c in conns {
            relay.close(&mut pool, c, &mut out);
            relay.reap(&mut pool, c);
        }
        assert_eq!(pool.in_use(), 0);
    }

    proptest::proptest! {
        /// After a valid handshake, arbitrary bytes in arbitrary reads never panic, and once the
        /// connection is closed and reaped no buffer stays held.
        #[test]
        fn arbitrary_frames_never_panic_or_leak(
            stream in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            cut in 1usize..400,
            valid_first in proptest::prelude::any::<bool>(),
        ) {
            let mut relay = Relay::new(RelayConfig { max_frame: 600, ..RelayConfig::default() });
            let mut pool = pool();
            let mut out = Outbox::default();
            session(&mut relay);
            let c = relay.on_accept(&mut pool, fd(), "192.0.2.2:2000".parse().unwrap(), 0, &mut out).unwrap();
            feed(&mut relay, &mut pool, c, HANDSHAKE, 1000, &mut out);
            drain(&mut relay, &mut pool, c);
            if valid_first {
                let mut req = [0u8; 256];
                let n = stun::write_binding_request(&mut req, b"w", b"kw", &[5; 12]).unwrap();
                feed(&mut relay, &mut pool, c, &ws::client_frame(ws::OP_BINARY, [3; 4], &req[..n]), 1000, &mut out);
                drain(&mut relay, &mut pool, c);
            }
            feed(&mut relay, &mut pool, c, &stream, cut, &mut out);
            for o in out.udp.drain(..) {
                pool.sent(o.data);
            }
            relay.close(&mut pool, c, &mut out);
            proptest::prop_assert!(relay.reap(&mut pool, c).is_some());
            proptest::prop_assert_eq!(pool.in_use(), 0);
        }
    }
}
