//! RFC 4571 framing: RTP (and RTCP, STUN) packets on a TCP stream.
//!
//! RFC 4571 §2:
//!
//! > The bitstream consists of a 16-bit unsigned integer LENGTH field (in network byte
//! > order) followed by the RTP or RTCP packet (LENGTH octets).
//!
//! This module owns the byte format only: [`header`] builds a length prefix, [`Deframer`]
//! finds frame payloads inside the caller's receive buffers without copying or allocating
//! (the shard sends frames from where they landed), and [`FrameBuffer`] is a bounded,
//! copying convenience for clients. It does no IO and never trusts a length field: every
//! frame is bounded by a `max_len` chosen by the caller, and every buffer is bounded.

use std::ops::Range;

/// Size of the RFC 4571 length prefix.
pub const HEADER_LEN: usize = 2;

/// Errors of the RFC 4571 framing layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum FrameError {
    /// A frame (announced by a length field, or asked of [`header`]) is longer than allowed.
    #[error("RFC 4571 frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// [`FrameBuffer::push`] would hold more than its bound; nothing was appended.
    #[error("frame buffer full: {buffered} bytes held, {incoming} more would exceed {max}")]
    BufferFull {
        buffered: usize,
        incoming: usize,
        max: usize,
    },
}

/// The 2-byte length prefix for a packet of `len` bytes.
///
/// RFC 4571 §2: "This framing can carry RTP packets up to 65535 octets".
pub fn header(len: usize) -> Result<[u8; 2], FrameError> {
    match u16::try_from(len) {
        Ok(l) => Ok(l.to_be_bytes()),
        Err(_) => Err(FrameError::TooLarge {
            len,
            max: usize::from(u16::MAX),
        }),
    }
}

/// A piece of frame payload found in one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Where the piece lies in the chunk passed to [`Deframer::next_piece`].
    pub range: Range<usize>,
    /// Length of the whole frame this piece belongs to (never 0).
    pub frame_len: u16,
    /// This piece starts the frame.
    pub first: bool,
    /// This piece completes the frame.
    pub last: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between frames, or after the first byte of a length prefix (`Some(high byte)`).
    Header(Option<u8>),
    /// Inside a frame of `frame_len` bytes with `remaining` still to come.
    Payload {
        frame_len: u16,
        remaining: u16,
        started: bool,
    },
    /// A length field exceeded the limit; the stream cannot be resynchronised.
    Failed(FrameError),
}

/// Streaming RFC 4571 deframer with no buffer of its own.
///
/// It walks the caller's chunks in stream order and reports, per chunk, the byte ranges that
/// belong to frame payloads. Length prefixes (also one split across two chunks) are consumed
/// internally. A length field above `max_len` puts it in a failed state for good: a TCP
/// byte stream has no resynchronisation point, so the caller closes the connection.
#[derive(Clone, Debug)]
pub struct Deframer {
    max_len: u16,
    state: State,
}

impl Deframer {
    /// A deframer accepting frames of at most `max_len` bytes.
    pub fn new(max_len: u16) -> Self {
        Deframer {
            max_len,
            state: State::Header(None),
        }
    }

    /// Next piece of frame payload found in `chunk[*pos..]`; advances `*pos` past the bytes
    /// consumed (prefix bytes and the piece). `Ok(None)` when the chunk is exhausted (also
    /// when `*pos` is beyond its end). Zero-length frames are skipped.
    ///
    /// `Err(FrameError::TooLarge)` when a length field exceeds `max_len`; every later call
    /// returns the same error.
    pub fn next_piece(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
    ) -> Result<Option<Piece>, FrameError> {
        loop {
            if let State::Failed(e) = self.state {
                return Err(e);
            }
            let rest = chunk.get(*pos..).unwrap_or(&[]);
            match (self.state, rest) {
                (_, []) => return Ok(None),
                (State::Header(None), [hi, lo, ..]) => {
                    *pos += 2;
                    self.begin_frame(u16::from_be_bytes([*hi, *lo]))?;
                }
                (State::Header(None), [hi]) => {
                    *pos += 1;
                    self.state = State::Header(Some(*hi));
                }
                (State::Header(Some(hi)), [lo, ..]) => {
                    *pos += 1;
                    self.begin_frame(u16::from_be_bytes([hi, *lo]))?;
                }
                (
                    State::Payload {
                        frame_len,
                        remaining,
                        started,
                    },
                    rest,
                ) => {
                    // `take` fits in u16 because it is at most `remaining`.
                    let take = u16::try_from(rest.len()).map_or(remaining, |r| r.min(remaining));
                    let start = *pos;
                    *pos += usize::from(take);
                    let left = remaining - take;
                    self.state = if left == 0 {
                        State::Header(None)
                    } else {
                        State::Payload {
                            frame_len,
                            remaining: left,
                            started: true,
                        }
                    };
                    return Ok(Some(Piece {
                        range: start..*pos,
                        frame_len,
                        first: !started,
                        last: left == 0,
                    }));
                }
                (State::Failed(e), _) => return Err(e),
            }
        }
    }

    fn begin_frame(&mut self, len: u16) -> Result<(), FrameError> {
        self.state = if len == 0 {
            // RFC 4571 allows a zero LENGTH; there is nothing to relay.
            State::Header(None)
        } else if len > self.max_len {
            let e = FrameError::TooLarge {
                len: usize::from(len),
                max: usize::from(self.max_len),
            };
            self.state = State::Failed(e);
            return Err(e);
        } else {
            State::Payload {
                frame_len: len,
                remaining: len,
                started: false,
            }
        };
        Ok(())
    }

    /// True when between frames (no partial header or payload pending) and not failed.
    pub fn is_idle(&self) -> bool {
        self.state == State::Header(None)
    }

    /// Bytes of the current frame still expected (0 when idle, waiting on a header, or failed).
    pub fn remaining(&self) -> usize {
        match self.state {
            State::Payload { remaining, .. } => usize::from(remaining),
            _ => 0,
        }
    }

    /// True after a length field exceeded `max_len`.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }
}

/// Bounded, copying accumulator of a framed stream, for clients.
///
/// [`push`](Self::push) appends received bytes, [`next_frame`](Self::next_frame) takes the
/// next complete frame payload. At most `max_buffered` bytes are held; a push that would
/// exceed the bound is refused whole (nothing appended) so the caller can drain frames and
/// push again.
#[derive(Clone, Debug)]
pub struct FrameBuffer {
    max_len: u16,
    max_buffered: usize,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    start: usize,
    failed: Option<FrameError>,
}

impl FrameBuffer {
    /// A buffer for frames of at most `max_len` bytes, holding at most
    /// `max(64 KiB, 2 * (HEADER_LEN + max_len))` bytes.
    pub fn new(max_len: u16) -> Self {
        let two_frames = 2 * (HEADER_LEN + usize::from(max_len));
        Self::with_limit(max_len, two_frames.max(64 * 1024))
    }

    /// A buffer for frames of at most `max_len` bytes holding at most `max_buffered` bytes
    /// (raised to `HEADER_LEN + max_len` if lower, so that any allowed frame fits).
    pub fn with_limit(max_len: u16, max_buffered: usize) -> Self {
        FrameBuffer {
            max_len,
            max_buffered: max_buffered.max(HEADER_LEN + usize::from(max_len)),
            buf: Vec::new(),
            start: 0,
            failed: None,
        }
    }

    /// Bytes held and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends `data`, or refuses it whole with `BufferFull` if the bound would be exceeded.
    pub fn push(&mut self, data: &[u8]) -> Result<(), FrameError> {
        let buffered = self.buffered();
        if buffered.saturating_add(data.len()) > self.max_buffered {
            return Err(FrameError::BufferFull {
                buffered,
                incoming: data.len(),
                max: self.max_buffered,
            });
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete frame payload, `Ok(None)` if none is complete yet. Zero-length
    /// frames are skipped. A length field above `max_len` is `TooLarge`, for this and every
    /// later call.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            if let Some(e) = self.failed {
                return Err(e);
            }
            let rest = self.buf.get(self.start..).unwrap_or(&[]);
            let Some((&[hi, lo], body)) = rest.split_first_chunk::<HEADER_LEN>() else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([hi, lo]);
            if len > self.max_len {
                let e = FrameError::TooLarge {
                    len: usize::from(len),
                    max: usize::from(self.max_len),
                };
                self.failed = Some(e);
                return Err(e);
            }
            let Some(frame) = body.get(..usize::from(len)) else {
                return Ok(None);
            };
            let frame = frame.to_vec();
            self.start += HEADER_LEN + frame.len();
            if self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            }
            if !frame.is_empty() {
                return Ok(Some(frame));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Collects the frames a Deframer finds in `chunks`, in order.
    fn deframe(d: &mut Deframer, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut frames = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        for chunk in chunks {
            let mut pos = 0;
            while let Some(p) = d.next_piece(chunk, &mut pos)? {
                assert_eq!(p.first, current.is_empty(), "first flag");
                current.extend_from_slice(&chunk[p.range.clone()]);
                assert!(current.len() <= usize::from(p.frame_len));
                assert_eq!(
                    p.last,
                    current.len() == usize::from(p.frame_len),
                    "last flag"
                );
                if p.last {
                    frames.push(std::mem::take(&mut current));
                }
            }
            assert_eq!(pos, chunk.len(), "a chunk is consumed whole");
        }
        Ok(frames)
    }

    fn encode(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&header(f.len()).unwrap());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn header_reference_bytes() {
        assert_eq!(header(0), Ok([0x00, 0x00]));
        assert_eq!(header(172), Ok([0x00, 0xac]));
        assert_eq!(header(0x1234), Ok([0x12, 0x34]));
        assert_eq!(header(65535), Ok([0xff, 0xff]));
        assert_eq!(
            header(65536),
            Err(FrameError::TooLarge {
                len: 65536,
                max: 65535
            })
        );
    }

    #[test]
    fn reference_stream_in_one_chunk() {
        // Two frames: "abc" (00 03) and "de" (00 02), one empty frame between them.
        let stream = [
            0x00, 0x03, b'a', b'b', b'c', 0x00, 0x00, 0x00, 0x02, b'd', b'e',
        ];
        let mut d = Deframer::new(1500);
        let mut pos = 0;
        assert_eq!(
            d.next_piece(&stream, &mut pos),
            Ok(Some(Piece {
                range: 2..5,
                frame_len: 3,
                first: true,
                last: true
            }))
        );
        assert!(d.is_idle());
        assert_eq!(
            d.next_piece(&stream, &mut pos),
            Ok(Some(Piece {
                range: 9..11,
                frame_len: 2,
                first: true,
                last: true
            }))
        );
        assert_eq!(d.next_piece(&stream, &mut pos), Ok(None));
        assert_eq!(pos, stream.len());
        assert!(d.is_idle());
    }

    #[test]
    fn header_split_across_chunks() {
        let mut d = Deframer::new(1500);
        let mut pos = 0;
        assert_eq!(d.next_piece(&[0x00], &mut pos), Ok(None));
        assert_eq!(pos, 1);
        assert!(!d.is_idle());
        assert_eq!(d.remaining(), 0);
        pos = 0;
        let second = [0x04, 1, 2];
        assert_eq!(
            d.next_piece(&second, &mut pos),
            Ok(Some(Piece {
                range: 1..3,
                frame_len: 4,
                first: true,
                last: false
            }))
        );
        assert_eq!(d.remaining(), 2);
        pos = 0;
        let third = [3, 4, 0x00];
        assert_eq!(
            d.next_piece(&third, &mut pos),
            Ok(Some(Piece {
                range: 0..2,
                frame_len: 4,
                first: false,
                last: true
            }))
        );
        assert_eq!(d.next_piece(&third, &mut pos), Ok(None));
        assert_eq!(pos, 3);
        assert!(!d.is_idle(), "half a header is pending");
    }

    #[test]
    fn oversize_frame_fails_for_good() {
        let mut d = Deframer::new(200);
        let mut pos = 0;
        let e = FrameError::TooLarge { len: 201, max: 200 };
        assert_eq!(d.next_piece(&[0x00, 0xc9, 0, 0], &mut pos), Err(e));
        assert!(d.is_failed());
        assert!(!d.is_idle());
        assert_eq!(d.next_piece(&[0x00, 0x01, 0], &mut 0), Err(e));
        assert_eq!(d.next_piece(&[], &mut 0), Err(e));
        // Exactly max_len is fine.
        let mut d = Deframer::new(200);
        let mut stream = vec![0x00, 0xc8];
        stream.extend_from_slice(&[7; 200]);
        assert_eq!(deframe(&mut d, &[&stream]), Ok(vec![vec![7; 200]]));
    }

    #[test]
    fn zero_length_frames_are_skipped() {
        let mut d = Deframer::new(10);
        let stream = [0, 0, 0, 0, 0, 1, 9, 0, 0];
        assert_eq!(deframe(&mut d, &[&stream]), Ok(vec![vec![9]]));
        assert!(d.is_idle());
    }

    #[test]
    fn position_past_end_is_exhausted() {
        let mut d = Deframer::new(10);
        let mut pos = 5;
        assert_eq!(d.next_piece(&[0, 1], &mut pos), Ok(None));
        assert_eq!(pos, 5);
    }

    #[test]
    fn frame_buffer_reassembles_and_bounds() {
        let mut fb = FrameBuffer::with_limit(4, 8);
        fb.push(&[0, 2, b'h']).unwrap();
        assert_eq!(fb.next_frame(), Ok(None));
        fb.push(&[b'i', 0, 0, 0]).unwrap();
        assert_eq!(fb.next_frame(), Ok(Some(b"hi".to_vec())));
        assert_eq!(fb.next_frame(), Ok(None));
        assert_eq!(fb.buffered(), 1);
        // 1 held + 8 incoming > 8: refused whole.
        assert_eq!(
            fb.push(&[0; 8]),
            Err(FrameError::BufferFull {
                buffered: 1,
                incoming: 8,
                max: 8
            })
        );
        assert_eq!(fb.buffered(), 1);
        fb.push(&[3, 1, 2, 3]).unwrap();
        assert_eq!(fb.next_frame(), Ok(Some(vec![1, 2, 3])));
        assert_eq!(fb.buffered(), 0);
        // Oversize frame.
        fb.push(&[0, 5]).unwrap();
        let e = FrameError::TooLarge { len: 5, max: 4 };
        assert_eq!(fb.next_frame(), Err(e));
        assert_eq!(fb.next_frame(), Err(e));
    }

    #[test]
    fn frame_buffer_bound_fits_one_frame() {
        let fb = FrameBuffer::with_limit(100, 10);
        assert_eq!(fb.max_buffered, 102);
        let fb = FrameBuffer::new(1500);
        assert_eq!(fb.max_buffered, 64 * 1024);
        let fb = FrameBuffer::new(u16::MAX);
        assert_eq!(fb.max_buffered, 2 * (2 + 65535));
    }

    fn frames_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(
            prop_oneof![
                1 => Just(Vec::new()),
                8 => prop::collection::vec(any::<u8>(), 1..300),
            ],
            0..20,
        )
    }

    /// Cuts `stream` at the given sizes (cycled); size 0 yields empty chunks.
    fn cut<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
        let sizes = if sizes.iter().all(|&s| s == 0) {
            &[0, 1][..]
        } else {
            sizes
        };
        let mut chunks = Vec::new();
        let mut rest = stream;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            let (a, b) = rest.split_at(n);
            chunks.push(a);
            rest = b;
            i += 1;
        }
        chunks
    }

    proptest! {
        #[test]
        fn deframer_reassembles_any_chunking(
            frames in frames_strategy(),
            sizes in prop::collection::vec(
                prop_oneof![Just(0usize), Just(1usize), Just(2usize), 1usize..600],
                1..16,
            ),
        ) {
            let stream = encode(&frames);
            let chunks = cut(&stream, &sizes);
            let mut d = Deframer::new(300);
            let got = deframe(&mut d, &chunks).unwrap();
            let want: Vec<Vec<u8>> = frames.iter().filter(|f| !f.is_empty()).cloned().collect();
            prop_assert_eq!(got, want);
            prop_assert!(d.is_idle());
            prop_assert_eq!(d.remaining(), 0);
        }

        #[test]
        fn frame_buffer_reassembles_any_chunking(
            frames in frames_strategy(),
            sizes in prop::collection::vec(1usize..700, 1..16),
        ) {
            let stream = encode(&frames);
            // A pending partial frame (<= 301 bytes) plus a chunk (<= 699) always fits.
            let mut fb = FrameBuffer::with_limit(300, 1000);
            let mut got = Vec::new();
            for chunk in cut(&stream, &sizes) {
                fb.push(chunk).unwrap();
                while let Some(f) = fb.next_frame().unwrap() {
                    got.push(f);
                }
                prop_assert!(fb.buffered() <= 1000);
            }
            let want: Vec<Vec<u8>> = frames.iter().filter(|f| !f.is_empty()).cloned().collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(fb.buffered(), 0);
        }

        #[test]
        fn deframer_never_panics(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
            max in any::<u16>(),
            start in 0usize..80,
        ) {
            let mut d = Deframer::new(max);
            for (i, chunk) in chunks.iter().enumerate() {
                let mut pos = if i == 0 { start } else { 0 };
                while let Ok(Some(p)) = d.next_piece(chunk, &mut pos) {
                    prop_assert!(p.range.end <= chunk.len());
                    prop_assert!(p.frame_len <= max && p.frame_len > 0);
                }
            }
        }
    }
}
