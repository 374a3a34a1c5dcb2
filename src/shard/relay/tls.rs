//! TLS 1.3 on a TCP media connection, run by the shard itself (`tls_engine = "shard"`): the
//! record layer kernel TLS would run, on the traffic secrets of the handshake the control
//! thread finished ([`crate::wire::tls_records`] does the cryptography).
//!
//! Receiving: ciphertext lands in the shard's receive buffers as on any TCP connection. A
//! record that lies whole in one read is opened in place there, and its plaintext (a slice of
//! that same buffer) goes to the RFC 4571 / WebSocket deframing of `tcp::on_tcp_plain`, so a
//! forwarded packet points into the buffer the kernel filled: no copy. A record cut by a read
//! is gathered in a spare buffer (`tcp::take_spare`, the reassembly machinery frames use) and
//! opened in place there. A record larger than a pool buffer (a peer may send up to 2^14 +
//! 256 bytes; voxgate phones send one frame per record) is gathered on the heap — only on a
//! bound connection, one record at a time — and its plaintext copied into spares.
//!
//! Sending: the frames queued for the connection (length prefix or WebSocket header, and
//! payload) are copied once into the connection's send buffer, as many as fit one record
//! ([`SEND_PLAIN`] bytes), and sealed there in place; the socket sends that record. (Kernel
//! TLS copies the payload into the kernel the same way; the plain path sends from the receive
//! buffers.) A record is written whole before the next is sealed: its sequence number is
//! spent.
//!
//! Any record error ends this connection only: a header that is not `application_data`, a
//! length over 2^14 + 256, a record that fails authentication, an alert (close_notify
//! included) or a handshake message (KeyUpdate: the gateway does not rekey), sequence numbers
//! exhausted. Counted as `bad_frame`.

use super::tcp::{copy_into_at, take_spare};
use super::{ConnId, DropReason, Outbox, Relay};
use crate::shard::pool::{BufId, Pool, Seg};
use crate::wire::tls_records::{self, HEADER, Opener, RecordError, RecordKeys, Sealer};

/// Plaintext bytes one record the shard sends carries at most: about 23 G.711 frames, so a
/// backlog leaves in few records, and the connection's send buffer stays small.
pub const SEND_PLAIN: usize = 4096;

/// Why a connection's TLS stream ended.
#[derive(Debug)]
enum Fail {
    Record(RecordError),
    /// No spare buffer to gather a record in.
    NoBuffer,
    /// A record larger than a pool buffer on a connection that has not bound.
    Unbound(usize),
}

impl From<RecordError> for Fail {
    fn from(e: RecordError) -> Fail {
        Fail::Record(e)
    }
}

/// Where a record cut by a read is gathered.
enum Gather {
    None,
    /// Header and body in a spare pool buffer: `need` bytes, `got` so far.
    Spare {
        buf: BufId,
        need: usize,
        got: usize,
    },
    /// A record larger than a pool buffer.
    Heap {
        data: Vec<u8>,
        got: usize,
    },
}

/// The plaintext of one record.
enum Plain {
    /// Opened where it was received.
    InPlace(Seg),
    /// Opened in a spare, which holds one reference (ours).
    Spare(BufId, Seg),
    Heap(Vec<u8>, usize),
}

/// A connection's TLS state.
pub struct TlsConn {
    rx: Opener,
    tx: Sealer,
    /// A header cut by a read.
    hdr: [u8; HEADER],
    hdr_got: usize,
    gather: Gather,
    /// The record being sent: `send[sent..sealed]` is still to write.
    send: Box<[u8]>,
    sealed: usize,
    sent: usize,
    /// Sealing failed (sequence numbers exhausted): nothing more is sent, and the connection
    /// is closed when it next delivers bytes.
    failed: bool,
}

impl TlsConn {
    pub fn new(keys: RecordKeys) -> TlsConn {
        TlsConn {
            rx: keys.rx,
            tx: keys.tx,
            hdr: [0; HEADER],
            hdr_got: 0,
            gather: Gather::None,
            send: vec![0u8; Sealer::record_len(SEND_PLAIN)].into_boxed_slice(),
            sealed: 0,
            sent: 0,
            failed: false,
        }
    }

    /// A sealed record is not fully written yet.
    pub fn pending(&self) -> bool {
        self.sent < self.sealed
    }

    /// Gives back a spare a half-gathered record holds (the connection is closing).
    pub(super) fn release(&mut self, pool: &mut Pool) {
        if let Gather::Spare { buf, .. } = std::mem::replace(&mut self.gather, Gather::None) {
            pool.release(buf);
        }
    }

    /// A record's header is whole: where its body is gathered.
    fn start(&mut self, pool: &mut Pool, h: &[u8; HEADER], bound: bool) -> Result<(), Fail> {
        let need = HEADER + tls_records::body_len(h)?;
        if need <= pool.buf_size() {
            let buf = take_spare(pool, bound).ok_or(Fail::NoBuffer)?;
            match pool.buf_mut_id(buf) {
                Some(b) => b[..HEADER].copy_from_slice(h),
                None => {
                    pool.release(buf);
                    return Err(Fail::NoBuffer);
                }
            }
            self.gather = Gather::Spare {
                buf,
                need,
                got: HEADER,
            };
        } else if bound {
            let mut data = vec![0u8; need];
            data[..HEADER].copy_from_slice(h);
            self.gather = Gather::Heap { data, got: HEADER };
        } else {
            return Err(Fail::Unbound(need));
        }
        Ok(())
    }

    /// Takes bytes of `seg` from `*pos` on: at most one record's worth. Returns the record's
    /// plaintext once one is whole.
    fn step(
        &mut self,
        pool: &mut Pool,
        seg: Seg,
        pos: &mut usize,
        bound: bool,
    ) -> Result<Option<Plain>, Fail> {
        let avail = usize::from(seg.len).saturating_sub(*pos);
        let at = usize::from(seg.off) + *pos;
        match &mut self.gather {
            Gather::None if self.hdr_got == 0 && avail >= HEADER => {
                let mut h = [0u8; HEADER];
                h.copy_from_slice(&pool.seg(seg)[*pos..*pos + HEADER]);
                let total = HEADER + tls_records::body_len(&h)?;
                if avail >= total && at + total <= pool.buf_size() {
                    // SAFETY: the record lies inside the received segment (checked against
                    // `seg.len` and the buffer size above), which the caller holds a reference
                    // on. No one else reads these bytes: pieces handed on before `*pos` may be
                    // queued for sends, none after it, and the kernel is done writing the
                    // buffer; this view ends before anything else touches the pool.
                    let rec = unsafe {
                        std::slice::from_raw_parts_mut(pool.addr(seg.buf).add(at), total)
                    };
                    let n = self.rx.open_in_place(rec)?;
                    *pos += total;
                    return Ok(Some(Plain::InPlace(Seg::new(seg.buf, at + HEADER, n))));
                }
                *pos += HEADER;
                self.start(pool, &h, bound)?;
                Ok(None)
            }
            Gather::None => {
                let take = (HEADER - self.hdr_got).min(avail);
                self.hdr[self.hdr_got..self.hdr_got + take]
                    .copy_from_slice(&pool.seg(seg)[*pos..*pos + take]);
                self.hdr_got += take;
                *pos += take;
                if self.hdr_got == HEADER {
                    self.hdr_got = 0;
                    let h = self.hdr;
                    self.start(pool, &h, bound)?;
                }
                Ok(None)
            }
            Gather::Spare { buf, need, got } => {
                let (buf, need) = (*buf, *need);
                let take = (need - *got).min(avail);
                let copied = copy_into_at(pool, buf, *got, &[Seg::new(seg.buf, at, take)]);
                *got += copied;
                *pos += take;
                if *got < need {
                    return Ok(None);
                }
                self.gather = Gather::None;
                let opened = match pool.buf_mut_id(buf) {
                    Some(b) => self.rx.open_in_place(&mut b[..need]).map_err(Fail::from),
                    None => Err(Fail::NoBuffer),
                };
                match opened {
                    Ok(n) => Ok(Some(Plain::Spare(buf, Seg::new(buf, HEADER, n)))),
                    Err(e) => {
                        pool.release(buf);
                        Err(e)
                    }
                }
            }
            Gather::Heap { data, got } => {
                let take = (data.len() - *got).min(avail);
                data[*got..*got + take].copy_from_slice(&pool.seg(seg)[*pos..*pos + take]);
                *got += take;
                *pos += take;
                if *got < data.len() {
                    return Ok(None);
                }
                let Gather::Heap { mut data, .. } =
                    std::mem::replace(&mut self.gather, Gather::None)
                else {
                    return Ok(None);
                };
                let n = self.rx.open_in_place(&mut data)?;
                Ok(Some(Plain::Heap(data, n)))
            }
        }
    }
}

impl Relay {
    /// Puts connection `c` under TLS with the keys of its finished handshake (before anything
    /// was read from it).
    pub fn set_tls(&mut self, c: ConnId, keys: RecordKeys) {
        if let Some(conn) = self.conn_mut(c) {
            conn.tls = Some(Box::new(TlsConn::new(keys)));
        }
    }

    /// Ciphertext arrived on a TLS connection: `seg` in the pool, one reference held by the
    /// caller. Each whole record's plaintext goes on to the plain path.
    pub(super) fn on_tls(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        seg: Seg,
        rx_ns: u64,
        out: &mut Outbox,
    ) {
        let mut pos = 0usize;
        while pos < usize::from(seg.len) {
            let Some(conn) = self.conn_mut(c) else { return };
            if conn.closing {
                return;
            }
            let bound = conn.leg.is_some();
            let Some(t) = conn.tls.as_deref_mut() else {
                return;
            };
            let step = if t.failed {
                Err(Fail::Record(RecordError::SequenceExhausted))
            } else {
                t.step(pool, seg, &mut pos, bound)
            };
            match step {
                Ok(None) => {}
                Ok(Some(Plain::InPlace(p))) => self.on_tcp_plain(pool, c, p, rx_ns, out),
                Ok(Some(Plain::Spare(buf, p))) => {
                    self.counters.reassembly_copies += 1;
                    self.on_tcp_plain(pool, c, p, rx_ns, out);
                    pool.release(buf);
                }
                Ok(Some(Plain::Heap(data, n))) => {
                    self.counters.reassembly_copies += 1;
                    self.feed_copied(pool, c, &data[HEADER..HEADER + n], rx_ns, out);
                }
                Err(e) => {
                    let reason = match e {
                        Fail::NoBuffer => DropReason::NoReassemblyBuffer,
                        Fail::Record(_) | Fail::Unbound(_) => DropReason::BadFrame,
                    };
                    let why = match &e {
                        Fail::Record(r) => r.to_string(),
                        Fail::NoBuffer => "no spare buffer for a record".to_string(),
                        Fail::Unbound(n) => {
                            format!("a {n}-byte record before the connection bound")
                        }
                    };
                    tracing::debug!(conn = c.idx, "TLS media connection closed: {why}");
                    self.counters.drop(reason);
                    self.close(pool, c, out);
                    return;
                }
            }
        }
    }

    /// The plaintext of a record larger than a pool buffer, copied into spares piece by piece.
    fn feed_copied(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        plain: &[u8],
        rx_ns: u64,
        out: &mut Outbox,
    ) {
        for chunk in plain.chunks(pool.buf_size()) {
            let Some(conn) = self.conn(c) else { return };
            if conn.closing {
                return;
            }
            let Some(buf) = take_spare(pool, conn.leg.is_some()) else {
                // Plaintext cannot be skipped (the framing would lose its place).
                self.counters.drop(DropReason::NoReassemblyBuffer);
                self.close(pool, c, out);
                return;
            };
            if let Some(b) = pool.buf_mut_id(buf) {
                b[..chunk.len()].copy_from_slice(chunk);
                self.on_tcp_plain(pool, c, Seg::new(buf, 0, chunk.len()), rx_ns, out);
            }
            pool.release(buf);
        }
    }

    /// The TLS form of `prepare_tcp_send`: the record still being written, or a new one sealed
    /// from the queued frames (which leave the queue: their bytes are in the record).
    pub(super) fn prepare_tls_send(
        &mut self,
        pool: &mut Pool,
        c: ConnId,
        iov: &mut [libc::iovec],
    ) -> usize {
        let Some(conn) = self.conn_mut(c) else {
            return 0;
        };
        if conn.send_inflight || conn.closing || iov.is_empty() {
            return 0;
        }
        let Some(t) = conn.tls.as_deref_mut() else {
            return 0;
        };
        if !t.pending() {
            t.sealed = 0;
            t.sent = 0;
            if t.failed {
                return 0;
            }
            let mut n = 0usize;
            loop {
                let Some(conn) = self.conn_mut(c) else {
                    return 0;
                };
                let room = SEND_PLAIN - n;
                if conn.queue.len == 0 || room == 0 {
                    break;
                }
                let Some(t) = conn.tls.as_deref_mut() else {
                    return 0;
                };
                let Some(f) = conn.queue.get(0) else {
                    break;
                };
                let done = conn.queue.head_sent;
                let flen = f.len();
                let segs = f.segs();
                let parts = [
                    &f.hdr[..usize::from(f.hdr_len)],
                    segs.first().map_or(&[][..], |s| pool.seg(*s)),
                    segs.get(1).map_or(&[][..], |s| pool.seg(*s)),
                ];
                let mut skip = done;
                let mut took = 0usize;
                for p in parts {
                    if skip >= p.len() {
                        skip -= p.len();
                        continue;
                    }
                    let p = &p[skip..];
                    skip = 0;
                    let k = p.len().min(room - took);
                    t.send[HEADER + n + took..HEADER + n + took + k].copy_from_slice(&p[..k]);
                    took += k;
                    if took == room {
                        break;
                    }
                }
                n += took;
                // Whole (or shorter than it said: never sent twice).
                if done + took >= flen || took < room {
                    let Some(f) = conn.queue.pop() else {
                        break;
                    };
                    if let Some(g) = f.group {
                        conn.from_group[g as usize] -= 1;
                    }
                    self.retire_frame(pool, f);
                } else {
                    conn.queue.head_sent += took;
                    break;
                }
            }
            let Some(t) = self.conn_mut(c).and_then(|x| x.tls.as_deref_mut()) else {
                return 0;
            };
            if n == 0 {
                return 0;
            }
            match t.tx.seal_in_place(&mut t.send, n) {
                Ok(len) => t.sealed = len,
                Err(_) => {
                    t.failed = true;
                    self.counters.drop(DropReason::SendError);
                    return 0;
                }
            }
        }
        let Some(conn) = self.conn_mut(c) else {
            return 0;
        };
        // Nothing in the queue is read by this send.
        conn.queue.sending = 0;
        let Some(t) = conn.tls.as_deref_mut() else {
            return 0;
        };
        iov[0] = libc::iovec {
            iov_base: t.send[t.sent..].as_mut_ptr().cast(),
            iov_len: t.sealed - t.sent,
        };
        1
    }

    /// `sent` bytes of the record were written.
    pub(super) fn tls_sent(&mut self, c: ConnId, sent: usize) {
        let Some(conn) = self.conn_mut(c) else { return };
        conn.queue.sending = 0;
        if let Some(t) = conn.tls.as_deref_mut() {
            t.sent = (t.sent + sent).min(t.sealed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bind_t_by_hand, fd, leg, recv, sent_bytes};
    use super::super::{Delivery, RelayConfig, SessionSpec};
    use super::*;
    use crate::wire::tls_records::tests::{client_reads, client_writes, handshake};

    fn pool() -> Pool {
        super::super::test_support::pool(256)
    }

    /// A TCP leg `t` under shard TLS (suite `suite`), bound by hand, beside UDP leg `u`
    /// (trusted source 192.0.2.1:1000, sending to 192.0.2.9:9); and the phone's rustls.
    fn tls_session(
        relay: &mut Relay,
        pool: &mut Pool,
        out: &mut Outbox,
        suite: usize,
    ) -> (ConnId, rustls::ClientConnection) {
        relay
            .install(SessionSpec {
                id: 1,
                legs: vec![
                    leg(
                        "u",
                        Delivery::Udp("192.0.2.9:9".parse().unwrap()),
                        Some("192.0.2.1:1000"),
                    ),
                    leg("t", Delivery::Tcp, None),
                ],
            })
            .unwrap();
        let c = relay
            .on_accept(pool, fd(), "192.0.2.2:2000".parse().unwrap(), 0, out)
            .unwrap();
        let (keys, client) = handshake(suite);
        relay.set_tls(c, keys);
        bind_t_by_hand(relay, c);
        (c, client)
    }

    fn rtp(i: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|j| {
                if j == 0 {
                    0x80
                } else {
                    i.wrapping_add(j as u8)
                }
            })
            .collect()
    }

    fn rfc4571(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&(f.len() as u16).to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    /// Feeds `stream` in reads of the sizes in `cuts` (cycled), each in a fresh TCP buffer.
    fn feed(
        relay: &mut Relay,
        pool: &mut Pool,
        c: ConnId,
        stream: &[u8],
        cuts: &[usize],
        out: &mut Outbox,
    ) {
        let (mut at, mut k) = (0usize, 0usize);
        while at < stream.len() {
            let n = cuts[k % cuts.len()].clamp(1, 2048).min(stream.len() - at);
            let id = (64..320u16)
                .find(|&b| pool.refs(b) == 0)
                .expect("a free TCP buffer");
            let seg = recv(pool, id, &stream[at..at + n]);
            relay.on_tcp(pool, c, seg, 1, out);
            pool.release(id);
            at += n;
            k += 1;
        }
    }

    fn forwarded(pool: &mut Pool, out: &mut Outbox) -> Vec<Vec<u8>> {
        let got = out.udp.iter().map(|o| sent_bytes(pool, &o.data)).collect();
        for o in out.udp.drain(..) {
            pool.sent(o.data);
        }
        got
    }

    #[test]
    fn whole_records_are_opened_in_place_and_forwarded_from_there() {
        for suite in 0..3 {
            let mut relay = Relay::new(RelayConfig::default());
            let mut pool = pool();
            let mut out = Outbox::default();
            let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, suite);
            let frames: Vec<Vec<u8>> = (0..3).map(|i| rtp(i, 172)).collect();
            // One record per frame, as a phone writes them; all in one read.
            let stream: Vec<u8> = frames
                .iter()
                .flat_map(|f| client_writes(&mut client, &rfc4571(std::slice::from_ref(f))))
                .collect();
            let seg = recv(&mut pool, 64, &stream);
            relay.on_tcp(&mut pool, c, seg, 1, &mut out);
            pool.release(64);
            assert!(
                out.udp
                    .iter()
                    .all(|o| o.data.segs().len() == 1 && o.data.segs()[0].buf == 64),
                "every packet points into the buffer the records arrived in"
            );
            assert_eq!(forwarded(&mut pool, &mut out), frames);
            assert_eq!(relay.counters.reassembly_copies, 0);
            assert_eq!(pool.in_use(), 0);
            assert!(!relay.conn(c).unwrap().closing);
        }
    }

    #[test]
    fn records_cut_at_every_boundary_forward_the_same_packets() {
        let frames: Vec<Vec<u8>> = (0..4).map(|i| rtp(i, 100 + usize::from(i) * 60)).collect();
        // Frames across records too: two records, cut inside the second frame.
        let plain = rfc4571(&frames);
        for cuts in [
            vec![1usize],
            vec![2, 7, 300],
            vec![5],
            vec![4, 1, 1, 1000],
            vec![2048],
        ] {
            let mut relay = Relay::new(RelayConfig::default());
            let mut pool = pool();
            let mut out = Outbox::default();
            let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 1);
            let mut stream = client_writes(&mut client, &plain[..250]);
            stream.extend(client_writes(&mut client, &plain[250..]));
            feed(&mut relay, &mut pool, c, &stream, &cuts, &mut out);
            assert!(!relay.conn(c).unwrap().closing, "{cuts:?}");
            assert_eq!(forwarded(&mut pool, &mut out), frames, "{cuts:?}");
            // Byte by byte, at most one spare held at a time: memory stays bounded.
            assert_eq!(pool.in_use(), 0, "{cuts:?}");
        }
    }

    #[test]
    fn a_record_larger_than_a_buffer_is_gathered_on_a_bound_connection() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 2);
        let frames: Vec<Vec<u8>> = (0..30).map(|i| rtp(i, 172)).collect();
        let stream = client_writes(&mut client, &rfc4571(&frames));
        assert!(stream.len() > 5000, "one record of {} bytes", stream.len());
        feed(&mut relay, &mut pool, c, &stream, &[1500], &mut out);
        assert_eq!(forwarded(&mut pool, &mut out), frames);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_bad_record_closes_the_connection_and_frees_its_buffers() {
        type Spoil = fn(&mut Vec<u8>);
        let cases: [(&str, Spoil); 5] = [
            ("bit flip", |r| r[20] ^= 0x10),
            ("tag flip", |r| {
                let n = r.len();
                r[n - 1] ^= 1
            }),
            ("oversize length", |r| {
                r[3..5].copy_from_slice(&0x4101u16.to_be_bytes())
            }),
            ("not application data", |r| r[0] = 22),
            ("garbage", |r| r.iter_mut().for_each(|b| *b = 0x41)),
        ];
        for (what, spoil) in cases {
            let mut relay = Relay::new(RelayConfig::default());
            let mut pool = pool();
            let mut out = Outbox::default();
            let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 0);
            let good = client_writes(&mut client, &rfc4571(&[rtp(1, 172)]));
            let mut bad = client_writes(&mut client, &rfc4571(&[rtp(2, 172)]));
            spoil(&mut bad);
            let mut stream = good.clone();
            stream.extend_from_slice(&bad);
            // Cut inside the bad record: the spare it is gathered in comes back.
            feed(
                &mut relay,
                &mut pool,
                c,
                &stream,
                &[good.len() + 30, 2048],
                &mut out,
            );
            assert_eq!(forwarded(&mut pool, &mut out), vec![rtp(1, 172)], "{what}");
            assert!(relay.conn(c).unwrap().closing, "{what}: closed");
            assert_eq!(out.close, vec![c], "{what}");
            assert_eq!(relay.counters.dropped(DropReason::BadFrame), 1, "{what}");
            assert_eq!(pool.in_use(), 0, "{what}");
        }
    }

    #[test]
    fn an_alert_or_a_key_update_closes_the_connection() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 0);
        client.send_close_notify();
        let mut alert = Vec::new();
        client.write_tls(&mut alert).unwrap();
        feed(&mut relay, &mut pool, c, &alert, &[2048], &mut out);
        assert!(relay.conn(c).unwrap().closing);
        let mut relay = Relay::new(RelayConfig::default());
        let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 1);
        client.refresh_traffic_keys().unwrap();
        let mut update = Vec::new();
        client.write_tls(&mut update).unwrap();
        feed(&mut relay, &mut pool, c, &update, &[2048], &mut out);
        assert!(relay.conn(c).unwrap().closing);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn frames_toward_a_tls_leg_leave_sealed_in_one_record() {
        let mut relay = Relay::new(RelayConfig::default());
        let mut pool = pool();
        let mut out = Outbox::default();
        let (c, mut client) = tls_session(&mut relay, &mut pool, &mut out, 0);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| rtp(i, 172)).collect();
        for (i, f) in frames.iter().enumerate() {
            let seg = recv(&mut pool, i as BufId, f);
            relay.on_udp(
                &mut pool,
                "192.0.2.1:1000".parse().unwrap(),
                seg,
                0,
                &mut out,
            );
            pool.release(i as BufId);
        }
        assert_eq!(relay.conn(c).unwrap().queued(), 3);
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 8];
        assert_eq!(relay.prepare_tcp_send(&mut pool, c, &mut iov), 1);
        // The payloads were copied into the record: their buffers are free already.
        assert_eq!(relay.conn(c).unwrap().queued(), 0);
        assert_eq!(pool.in_use(), 0);
        assert!(relay.tcp_has_queued(c), "the record is still to write");
        let rec = |iov: &libc::iovec| {
            // SAFETY: the iovec points into the connection's send buffer.
            unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) }.to_vec()
        };
        let whole = rec(&iov[0]);
        assert_eq!(whole.len(), 5 + 3 * 174 + 1 + 16, "one record");
        // Written in two goes: the rest is offered again, never a new record.
        relay.tcp_sent(&mut pool, c, 100);
        assert_eq!(relay.prepare_tcp_send(&mut pool, c, &mut iov), 1);
        assert_eq!(rec(&iov[0]), whole[100..]);
        relay.tcp_sent(&mut pool, c, whole.len() - 100);
        assert!(!relay.tcp_has_queued(c));
        assert_eq!(relay.prepare_tcp_send(&mut pool, c, &mut iov), 0);
        // The phone's rustls reads the three frames.
        assert_eq!(client_reads(&mut client, &whole), Some(rfc4571(&frames)));
    }
}
