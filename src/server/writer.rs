//! The sending side of the control connections, without a task or a channel per connection.
//!
//! A control message is a few hundred bytes and a client's socket buffer is almost always
//! empty, so a message is written straight from the control loop with a non-blocking
//! `try_write`. Only when the kernel does not take all of it does the connection get a flush
//! task, which owns the write half until the backlog is out and then hands it back (an
//! [`Flushed`] event); messages sent meanwhile queue behind the backlog, in order. An idle
//! connection so costs its write half and an empty `Vec`: no task, no channel (those were
//! 1.6 KB of heap per logged-in subscriber).

use std::collections::HashMap;
use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use crate::control::gateway::ConnId;

/// A control connection's write side: a plain TCP write half, or the write half of a TLS
/// stream. TLS has no non-blocking write from the control loop (a record must be sealed and
/// flushed by a task), so every message to a TLS connection goes through a flush task.
pub enum ControlWrite {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<super::tls::ServerStream>),
}

impl From<OwnedWriteHalf> for ControlWrite {
    fn from(w: OwnedWriteHalf) -> Self {
        ControlWrite::Plain(w)
    }
}

impl ControlWrite {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            ControlWrite::Plain(w) => w.try_write(bytes),
            ControlWrite::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            ControlWrite::Plain(w) => w.write_all(bytes).await,
            ControlWrite::Tls(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }
}

/// A flush task is done: the write half comes back, or `None` when writing failed (the reader
/// sees the connection end and reports it).
pub struct Flushed {
    pub conn: ConnId,
    pub wr: Option<ControlWrite>,
}

struct Writer {
    /// `None` while a flush task owns it.
    wr: Option<ControlWrite>,
    /// Bytes waiting behind the flush in progress.
    pending: Vec<u8>,
    /// Close once everything queued is out.
    closing: bool,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// No such connection (closed, or never writable).
    Gone,
    /// The client does not read: more than the limit waits for it.
    Backlog,
}

/// Every control connection's write side.
pub struct Writers<F> {
    conns: HashMap<ConnId, Writer>,
    /// Bytes that may wait for one client before it counts as not reading.
    limit: usize,
    /// Starts a flush task: `spawn(conn, wr, bytes)`.
    spawn: F,
}

impl<F> Writers<F>
where
    F: FnMut(ConnId, ControlWrite, Vec<u8>),
{
    pub fn new(limit: usize, spawn: F) -> Writers<F> {
        Writers {
            conns: HashMap::new(),
            limit,
            spawn,
        }
    }

    pub fn insert(&mut self, conn: ConnId, wr: impl Into<ControlWrite>) {
        self.conns.insert(
            conn,
            Writer {
                wr: Some(wr.into()),
                pending: Vec::new(),
                closing: false,
            },
        );
    }

    pub fn contains(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Queue one encoded message for `conn`: written now when the socket takes it.
    pub fn send(&mut self, conn: ConnId, frame: &[u8]) -> Result<(), SendError> {
        let w = self.conns.get_mut(&conn).ok_or(SendError::Gone)?;
        if w.closing {
            return Err(SendError::Gone);
        }
        let Some(wr) = w.wr.as_ref() else {
            if w.pending.len() + frame.len() > self.limit {
                self.conns.remove(&conn);
                return Err(SendError::Backlog);
            }
            w.pending.extend_from_slice(frame);
            return Ok(());
        };
        let written = match wr.try_write(frame) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                // The reader will see the connection end; nothing more can be sent.
                self.conns.remove(&conn);
                return Err(SendError::Gone);
            }
        };
        if written < frame.len() {
            let wr = w.wr.take().expect("checked above");
            (self.spawn)(conn, wr, frame[written..].to_vec());
        }
        Ok(())
    }

    /// Close `conn` once what is queued for it is out (dropping the write half shuts down the
    /// write side after the bytes the kernel holds).
    pub fn close(&mut self, conn: ConnId) {
        if let Some(w) = self.conns.get_mut(&conn) {
            if w.wr.is_some() {
                self.conns.remove(&conn);
            } else {
                w.closing = true;
            }
        }
    }

    /// Forget `conn` at once (it disconnected).
    pub fn remove(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// A flush task finished: send what queued meanwhile, or keep the write half for the next
    /// message.
    pub fn flushed(&mut self, f: Flushed) {
        let Some(w) = self.conns.get_mut(&f.conn) else {
            return;
        };
        let Some(wr) = f.wr else {
            self.conns.remove(&f.conn);
            return;
        };
        if !w.pending.is_empty() {
            let bytes = std::mem::take(&mut w.pending);
            (self.spawn)(f.conn, wr, bytes);
        } else if w.closing {
            self.conns.remove(&f.conn);
        } else {
            w.wr = Some(wr);
        }
    }

    /// Drop every write half (at shutdown): queued bytes already in the kernel still go out.
    pub fn clear(&mut self) {
        self.conns.clear();
    }
}

/// The flush task: write everything, then hand the write half back.
pub async fn flush(conn: ConnId, mut wr: ControlWrite, bytes: Vec<u8>) -> Flushed {
    let ok = wr.write_all(&bytes).await.is_ok();
    Flushed {
        conn,
        wr: ok.then_some(wr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    type Spawned = Arc<Mutex<Vec<(ConnId, ControlWrite, Vec<u8>)>>>;
    type TestWriters = Writers<Box<dyn FnMut(ConnId, ControlWrite, Vec<u8>)>>;

    async fn pair() -> (OwnedWriteHalf, TcpStream, tokio::net::tcp::OwnedReadHalf) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let (rd, wr) = s.into_split();
        (wr, c, rd)
    }

    fn writers(limit: usize) -> (TestWriters, Spawned) {
        let spawned: Spawned = Arc::default();
        let s = spawned.clone();
        let w: TestWriters = Writers::new(
            limit,
            Box::new(move |c, wr, b| s.lock().unwrap().push((c, wr, b))),
        );
        (w, spawned)
    }

    #[tokio::test]
    async fn small_messages_go_straight_out_without_a_task() {
        let (wr, mut client, _rd) = pair().await;
        let (mut w, spawned) = writers(1 << 16);
        w.insert(7, wr);
        w.send(7, b"hello ").unwrap();
        w.send(7, b"world").unwrap();
        assert!(spawned.lock().unwrap().is_empty());
        w.close(7);
        assert!(!w.contains(7));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        assert_eq!(w.send(7, b"x"), Err(SendError::Gone));
    }

    #[tokio::test]
    async fn a_backlog_is_flushed_in_order_then_the_limit_disconnects() {
        let (wr, mut client, _rd) = pair().await;
        let limit = 1 << 20;
        let (mut w, spawned) = writers(limit);
        w.insert(1, wr);
        // The client reads nothing: fill the kernel's buffers until a flush task is needed.
        let chunk: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let mut sent = 0usize;
        while spawned.lock().unwrap().is_empty() {
            w.send(1, &chunk).unwrap();
            sent += chunk.len();
            assert!(sent < 64 << 20, "the kernel took 64 MiB without blocking");
        }
        // Messages sent while the flush runs queue behind it, up to the limit.
        w.send(1, b"tail").unwrap();
        sent += 4;
        let (conn, wr, backlog) = spawned.lock().unwrap().pop().unwrap();
        assert_eq!(conn, 1);
        let flusher = tokio::spawn(flush(conn, wr, backlog));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while got.len() < sent {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            (got, client)
        });
        let done = flusher.await.unwrap();
        assert!(done.wr.is_some());
        w.flushed(done);
        // "tail" waited behind the backlog: a second flush carries it.
        let (conn, wr, rest) = spawned.lock().unwrap().pop().unwrap();
        assert_eq!(rest, b"tail");
        w.flushed(flush(conn, wr, rest).await);
        let (got, _client) = reader.await.unwrap();
        assert_eq!(got.len(), sent);
        assert!(got.ends_with(b"tail"));
        for (i, b) in got[..got.len() - 4].iter().enumerate() {
            assert_eq!(*b, (i % 4096 % 256) as u8, "byte {i} out of order");
        }
        // Idle again: the write half is back.
        w.send(1, b"!").unwrap();
        assert!(spawned.lock().unwrap().is_empty());

        // A client that never reads is cut off at the limit, not buffered without bound.
        let (wr, _client2, _rd2) = pair().await;
        let (mut w, spawned) = writers(8192);
        w.insert(2, wr);
        let mut res = Ok(());
        for _ in 0..100_000 {
            res = w.send(2, &chunk);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(SendError::Backlog));
        assert!(!w.contains(2));
        assert_eq!(spawned.lock().unwrap().len(), 1);
    }
}
