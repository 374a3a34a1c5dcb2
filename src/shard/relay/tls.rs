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
                let f = *conn.queue.get(0);
                let done = conn.queue.head_sent;
                let parts = [
                    &f.hdr[..usize::from(f.hdr_len)],
                    if f.nsegs > 0 {
                        pool.seg(f.segs[0])
                    } else {
                        &[]
                    },
                    if f.nsegs > 1 {
                        pool.seg(f.segs[1])
                    } else {
                        &[]
                    },
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
                if done + took >= f.len() || took < room {
                    let f = conn.queue.pop();
                    if let Some(g) = f.group {
                        conn.from_group[g as usize] -= 1;
                    }
                    self.retire_frame(pool, &f);
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
