//! The shard's packet buffers: one page-aligned region cut into fixed-size buffers, each with a
//! reference count. A received payload stays in the buffer where the kernel put it; every send
//! that references it takes a reference, and the buffer goes back to the kernel (buffer ring) or
//! to the spare list only when the last reference is released. This is how the gateway forwards
//! without copying payloads.
//!
//! Buffers are grouped by id range: `[0, udp)` feed the UDP buffer ring, `[udp, udp+tcp)` the TCP
//! buffer ring, and the rest are spares the shard hands out itself (STUN responses that do not fit
//! in place, frames that must be reassembled). The driver decides what "give back" means; the
//! pool only reports which buffers became free.

use std::ptr::NonNull;

pub type BufId = u16;

/// The largest buffer a segment can describe: `Seg::off`/`Seg::len` are `u16`, so a full read
/// of a 65536-byte buffer would be a length of 0. The largest multiple of 64 below 65536.
pub const MAX_BUF_SIZE: usize = 65_472;

/// A buffer that is ours: the kernel handed it back (a receive completion or a read), or the
/// pool gave us a spare. It carries one reference, ours. The three states of a buffer are
/// types or checked counts, never conventions:
///
/// - **the kernel's** (on a ring, or not yet taken from the spare list): no handle, 0
///   references. Nothing can read or write it: [`Pool::buf`] and [`Pool::seg`] show nothing,
///   [`Pool::buf_mut`] refuses, [`Pool::hold`] refuses; [`Pool::received`] is the only way out,
///   and it refuses a buffer that is not the kernel's (a completion naming a buffer we hold).
/// - **ours**: a `Received`, exactly 1 reference, writable ([`Pool::buf_mut`]).
/// - **in flight**: referenced by sends; read-only until they are released. Every send (a UDP
///   datagram, a frame queued for a TCP connection) holds an [`InFlight`] token, made only by
///   [`Pool::send_ref`] and consumed only by [`Pool::sent`] when it completes or is dropped;
///   so does the first piece of a TCP frame kept until the rest arrives ([`Pool::keep`]). The
///   buffer goes back to the kernel only when the last reference is released.
///
/// The handle must be consumed: by [`Pool::release_received`] (our reference given back), or
/// by [`Received::into_ref`] (the reference travels on as a plain id in a queue, released with
/// [`Pool::release`]). Dropping it instead is a leak, caught by a debug assertion. Counts are
/// checked: a transition the state does not allow (a second release, a hold on the kernel's
/// buffer, a count at its maximum) is refused and counted ([`Pool::refused`]), never wrapped.
#[must_use = "a buffer of ours goes back only through Pool::release_received or into_ref"]
#[derive(Debug)]
pub struct Received {
    id: BufId,
}

impl Received {
    pub fn id(&self) -> BufId {
        self.id
    }

    /// Hands our reference on as a plain id (a reassembly buffer kept by a connection): from
    /// now on it is given back with [`Pool::release`].
    pub fn into_ref(self) -> BufId {
        let id = self.id;
        std::mem::forget(self);
        id
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        debug_assert!(
            std::thread::panicking(),
            "received buffer {} dropped without Pool::release_received",
            self.id
        );
    }
}

/// The references one send holds: the segments it reads (one datagram, at most two buffers),
/// each buffer referenced once on its behalf. The typed form of "in flight" (and of a frame's
/// first piece waiting in its receive buffer for the rest, which a later send will read):
///
/// - only [`Pool::send_ref`] (and [`Pool::keep`], for one segment) makes one, taking the
///   references (or none: refused);
/// - only [`Pool::sent`] consumes one, giving back exactly the references it holds, once: a
///   completion releases the buffers of the send it completes, never a buffer it does not
///   hold, and a second completion of the same send has no token left to give;
/// - not `Clone`/`Copy`, so a reference cannot be duplicated; dropping one instead of giving
///   it back is a leak, caught by a debug assertion.
///
/// A send is described from its token ([`InFlight::segs`]), so no send can be submitted
/// without one. Its size is that of the segments it carries (no allocation, no extra field):
/// the per-packet cost of the type is zero.
#[must_use = "a send's references go back only through Pool::sent"]
#[derive(Debug, PartialEq, Eq)]
pub struct InFlight {
    segs: [Seg; 2],
    nsegs: u8,
}

impl InFlight {
    /// The bytes the send reads, in order.
    #[inline]
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..usize::from(self.nsegs)]
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        debug_assert!(
            std::thread::panicking(),
            "send of {:?} dropped without Pool::sent",
            self.segs()
        );
    }
}

/// A byte range inside one pool buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    pub buf: BufId,
    pub off: u16,
    pub len: u16,
}

impl Seg {
    pub fn new(buf: BufId, off: usize, len: usize) -> Seg {
        // Clamped, never wrapped: buffers are at most MAX_BUF_SIZE, and `Pool::seg` clips a
        // segment to its buffer anyway.
        let clamp = |v: usize| u16::try_from(v).unwrap_or(u16::MAX);
        Seg {
            buf,
            off: clamp(off),
            len: clamp(len),
        }
    }
}

/// Which group a buffer belongs to; decides where it goes when freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Udp,
    Tcp,
    Spare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub buf_size: usize,
    pub udp: usize,
    pub tcp: usize,
    pub spare: usize,
}

impl PoolLayout {
    pub fn total(&self) -> usize {
        self.udp + self.tcp + self.spare
    }
}

pub struct Pool {
    base: NonNull<u8>,
    map_len: usize,
    layout: PoolLayout,
    /// References per buffer. `u32`: the admission budgets (send slots, queued frames, one
    /// turn's outbox) bound the references one buffer can gather far below 2^32, so the count
    /// cannot wrap at any configuration the types allow (a `u16` wrapped at `buf_size` 4096
    /// with 64-leg rooms and handed a buffer back to the kernel while sends still read it).
    refs: Box<[u32]>,
    /// Long-lived references per buffer: frames waiting in TCP send queues. A receive buffer
    /// pinned by a queue is off its ring for as long as the reader is slow, so each group's
    /// pinned buffers are counted (`pinned`) and the relay keeps them at half the group.
    pins: Box<[u32]>,
    pinned: [usize; 3],
    /// Buffers whose last reference was released since the driver last drained this list.
    freed: Vec<BufId>,
    spare_free: Vec<BufId>,
    /// Buffers currently referenced by anything (received and not yet recycled).
    in_use: usize,
    /// Transitions refused because the buffer's state did not allow them (see [`Received`]).
    refused: u64,
    /// Ring buffers that are the kernel's: on a ring, or handed to the driver by
    /// [`Pool::take_freed`] to put there. Only these can come back in a completion.
    kernel: Box<[bool]>,
}

// The region is owned by the pool and only touched from the shard's thread (and by the kernel
// through the ring, which the pool outlives).
unsafe impl Send for Pool {}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool layout is invalid: {0}")]
    Layout(&'static str),
    #[error("cannot map {bytes} bytes of packet buffers: {source}")]
    Map {
        bytes: usize,
        source: std::io::Error,
    },
}

impl Pool {
    pub fn new(layout: PoolLayout) -> Result<Pool, PoolError> {
        if layout.buf_size < 512 || layout.buf_size > MAX_BUF_SIZE || layout.buf_size % 64 != 0 {
            return Err(PoolError::Layout(
                "buffer size must be a multiple of 64 in 512..=65472 (segment lengths are u16)",
            ));
        }
        let total = layout.total();
        if total == 0 || total > usize::from(u16::MAX) {
            return Err(PoolError::Layout("total buffers must be in 1..=65535"));
        }
        let bytes = total * layout.buf_size;
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below. Populated up front:
        // the buffers are a fixed cost of the shard, paid (and visible in RSS) at start, not a
        // surprise that grows with the first calls.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PoolError::Map {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(PoolError::Layout("null mapping"))?;
        let first_spare = layout.udp + layout.tcp;
        Ok(Pool {
            base,
            map_len: bytes,
            layout,
            refs: vec![0; total].into_boxed_slice(),
            pins: vec![0; total].into_boxed_slice(),
            pinned: [0; 3],
            freed: Vec::with_capacity(total),
            spare_free: (first_spare..total).rev().map(|i| i as BufId).collect(),
            in_use: 0,
            refused: 0,
            kernel: (0..total).map(|i| i < first_spare).collect(),
        })
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    pub fn buf_size(&self) -> usize {
        self.layout.buf_size
    }

    pub fn group(&self, id: BufId) -> Group {
        let i = usize::from(id);
        if i < self.layout.udp {
            Group::Udp
        } else if i < self.layout.udp + self.layout.tcp {
            Group::Tcp
        } else {
            Group::Spare
        }
    }

    /// Address of buffer `id` (for buffer rings and iovecs). A pointer, not access: computing
    /// it is safe for any id (an id past the pool gives a pointer past the mapping, which the
    /// pool never hands to the kernel); reading or writing through it is the caller's `unsafe`.
    pub fn addr(&self, id: BufId) -> *mut u8 {
        self.base
            .as_ptr()
            .wrapping_add(usize::from(id) * self.layout.buf_size)
    }

    fn refs_of(&self, id: BufId) -> u32 {
        self.refs.get(usize::from(id)).copied().unwrap_or(0)
    }

    /// The bytes of buffer `id` while it is ours or in flight; empty while it is the kernel's
    /// (on a ring the kernel may be writing it) or when `id` is not a buffer of this pool.
    pub fn buf(&self, id: BufId) -> &[u8] {
        if self.refs_of(id) == 0 {
            return &[];
        }
        // SAFETY: id < total (it has a reference count), so the buffer lies inside the mapping;
        // a referenced buffer is off its ring, so the kernel does not write it, and writes
        // through `buf_mut` need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.addr(id), self.layout.buf_size) }
    }

    /// Write access to a buffer of ours that nothing else references: the handle proves it is
    /// ours, and exactly one reference (the handle's) proves no send or queue reads it, so a
    /// write can never race the kernel or change bytes another call's packet points at.
    pub fn buf_mut(&mut self, r: &Received) -> Option<&mut [u8]> {
        self.buf_mut_id(r.id)
    }

    /// [`Pool::buf_mut`] for the buffer a segment of a received packet lies in (the loop holds
    /// its handle while the relay handles the packet): None unless exactly one reference holds
    /// it.
    pub fn buf_mut_id(&mut self, id: BufId) -> Option<&mut [u8]> {
        if self.refs.get(usize::from(id)) != Some(&1) {
            return None;
        }
        // SAFETY: inside the mapping (id < total, checked by the lookup above); the single
        // reference is the caller's, so neither the kernel nor a pending send reads or writes
        // these bytes, and `&mut self` keeps this the only Rust view.
        Some(unsafe { std::slice::from_raw_parts_mut(self.addr(id), self.layout.buf_size) })
    }

    /// The bytes a segment names, clipped to its buffer; empty while the buffer is the kernel's.
    #[inline]
    pub fn seg(&self, s: Seg) -> &[u8] {
        let b = self.buf(s.buf);
        let start = usize::from(s.off).min(b.len());
        let end = (start + usize::from(s.len)).min(b.len());
        &b[start..end]
    }

    /// The kernel handed us buffer `id` (a completion): it starts with one reference, owned by
    /// the returned handle. None (counted in [`Pool::refused`]) when `id` is not a ring buffer
    /// of this pool or is not the kernel's to hand back: ours or in flight, or released but not
    /// yet handed to the driver by [`Pool::take_freed`] (so not on a ring).
    pub fn received(&mut self, id: BufId) -> Option<Received> {
        let i = usize::from(id);
        let kernels = self.kernel.get(i).copied().unwrap_or(false);
        match self.refs.get_mut(i) {
            Some(r) if kernels && *r == 0 => {
                *r = 1;
                self.kernel[i] = false;
                self.in_use += 1;
                Some(Received { id })
            }
            _ => {
                self.refused += 1;
                None
            }
        }
    }

    /// Gives back the reference a [`Received`] holds (the buffer returns to its ring once no
    /// send or queue references it either).
    pub fn release_received(&mut self, r: Received) {
        let id = r.into_ref();
        self.release(id);
    }

    /// Take a spare buffer (ours: one reference), if any is free.
    pub fn take_spare(&mut self) -> Option<Received> {
        let id = self.spare_free.pop()?;
        self.refs[usize::from(id)] = 1;
        self.in_use += 1;
        Some(Received { id })
    }

    /// Takes one more reference to a buffer that is ours or in flight (a send or a queued
    /// frame will read it). Refused (false, counted) for a buffer that is the kernel's or whose
    /// count is at its maximum: the caller then does not send. The admission budgets keep the
    /// count far below the maximum, so a refusal means a bug, and it costs one packet instead
    /// of a buffer handed back to the kernel while sends still read it.
    #[inline]
    #[must_use = "a refused reference means the buffer must not be sent from"]
    fn hold(&mut self, id: BufId) -> bool {
        match self.refs.get_mut(usize::from(id)) {
            Some(r) if *r > 0 && *r < u32::MAX => {
                *r += 1;
                true
            }
            _ => {
                self.refused += 1;
                false
            }
        }
    }

    /// [`Pool::hold`] on every segment's buffer, or on none (a packet in two parts is sent
    /// whole or not at all).
    #[must_use = "a refused reference means the buffers must not be sent from"]
    fn hold_all(&mut self, segs: &[Seg]) -> bool {
        for (i, s) in segs.iter().enumerate() {
            if !self.hold(s.buf) {
                for t in &segs[..i] {
                    self.release(t.buf);
                }
                return false;
            }
        }
        true
    }

    /// A send will read `segs` (one or two segments): takes one reference on each segment's
    /// buffer for it, all or none, and returns the token that holds them. None (counted in
    /// [`Pool::refused`]) for a buffer that is the kernel's or whose count is at its maximum,
    /// or for no segments or more than two: the caller then does not send.
    #[inline]
    pub fn send_ref(&mut self, segs: &[Seg]) -> Option<InFlight> {
        if segs.is_empty() || segs.len() > 2 {
            self.refused += 1;
            return None;
        }
        if !self.hold_all(segs) {
            return None;
        }
        let mut t = InFlight {
            segs: [Seg::default(); 2],
            nsegs: segs.len() as u8,
        };
        t.segs[..segs.len()].copy_from_slice(segs);
        Some(t)
    }

    /// Keeps `seg` (the first piece of a frame whose rest is in a later read) readable until
    /// the frame is whole: one reference, as for a send, given back with [`Pool::sent`]. None
    /// (counted) for a buffer that is not ours.
    #[inline]
    pub fn keep(&mut self, seg: Seg) -> Option<InFlight> {
        self.send_ref(std::slice::from_ref(&seg))
    }

    /// A send completed (or was never submitted): gives back the references its token holds.
    #[inline]
    pub fn sent(&mut self, t: InFlight) {
        let (segs, n) = (t.segs, usize::from(t.nsegs));
        std::mem::forget(t);
        for s in &segs[..n] {
            self.release(s.buf);
        }
    }

    /// Gives back one reference; the last one returns the buffer to the kernel (via
    /// [`Pool::take_freed`]) or to the spare list. Releasing a buffer that has no reference
    /// (the kernel's already) is refused and counted: it is never handed back twice.
    #[inline]
    pub fn release(&mut self, id: BufId) {
        let spare = self.group(id) == Group::Spare;
        let Some(r) = self.refs.get_mut(usize::from(id)).filter(|r| **r > 0) else {
            self.refused += 1;
            return;
        };
        *r -= 1;
        if *r == 0 {
            self.in_use -= 1;
            if spare {
                self.spare_free.push(id);
            } else {
                self.freed.push(id);
            }
        }
    }

    /// A queued frame holds `id` (besides its reference, taken with `hold`). Refused (counted)
    /// for a buffer without references or a count at its maximum.
    pub fn pin(&mut self, id: BufId) {
        let g = self.group(id) as usize;
        let i = usize::from(id);
        match (self.refs.get(i), self.pins.get_mut(i)) {
            (Some(&r), Some(p)) if r > 0 && *p < u32::MAX => {
                if *p == 0 {
                    self.pinned[g] += 1;
                }
                *p += 1;
            }
            _ => self.refused += 1,
        }
    }

    /// A queued frame let go of `id`. Refused (counted) for a buffer that is not pinned.
    pub fn unpin(&mut self, id: BufId) {
        let g = self.group(id) as usize;
        match self.pins.get_mut(usize::from(id)) {
            Some(p) if *p > 0 => {
                *p -= 1;
                if *p == 0 {
                    self.pinned[g] -= 1;
                }
            }
            _ => self.refused += 1,
        }
    }

    pub fn is_pinned(&self, id: BufId) -> bool {
        self.pins.get(usize::from(id)).is_some_and(|&p| p > 0)
    }

    /// Buffers of group `g` that queued frames hold.
    pub fn pinned(&self, g: Group) -> usize {
        self.pinned[g as usize]
    }

    /// Buffers in group `g`.
    pub fn group_size(&self, g: Group) -> usize {
        match g {
            Group::Udp => self.layout.udp,
            Group::Tcp => self.layout.tcp,
            Group::Spare => self.layout.spare,
        }
    }

    /// Ring buffers freed since the last call, swapped into `into` (which must be empty): the
    /// driver gives them back to the kernel. Swapping keeps both vectors' capacity, so this
    /// allocates nothing.
    pub fn take_freed(&mut self, into: &mut Vec<BufId>) {
        // Whatever the driver left in `into` is not ours to recycle a second time.
        into.clear();
        std::mem::swap(&mut self.freed, into);
        for &id in into.iter() {
            self.kernel[usize::from(id)] = true;
        }
    }

    pub fn refs(&self, id: BufId) -> u32 {
        self.refs_of(id)
    }

    /// Transitions refused because the buffer's state did not allow them (a second release, a
    /// hold on the kernel's buffer, a completion for a buffer we hold): 0 unless the shard has
    /// a bug, which then costs packets instead of memory safety.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn spare_free(&self) -> usize {
        self.spare_free.len()
    }

    /// Bytes of packet memory this pool maps.
    pub fn mapped_bytes(&self) -> usize {
        self.map_len
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped. The driver drops the ring (which may still
        // reference these buffers) before the pool.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool() -> Pool {
        Pool::new(PoolLayout {
            buf_size: 2048,
            udp: 4,
            tcp: 2,
            spare: 2,
        })
        .unwrap()
    }

    #[test]
    fn ring_buffers_are_reported_free_spares_go_back_to_the_spare_list() {
        let mut p = pool();
        let r = p.received(1).unwrap();
        assert!(p.hold(1));
        p.release_received(r);
        let mut freed = Vec::new();
        p.take_freed(&mut freed);
        assert!(freed.is_empty(), "still referenced once");
        p.release(1);
        p.take_freed(&mut freed);
        assert_eq!(freed, vec![1]);
        freed.clear();
        let s = p.take_spare().unwrap();
        assert_eq!(p.group(s.id()), Group::Spare);
        assert_eq!(p.spare_free(), 1);
        p.release_received(s);
        assert_eq!(p.spare_free(), 2);
        p.take_freed(&mut freed);
        assert!(freed.is_empty());
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.refused(), 0);
    }

    #[test]
    fn pins_count_distinct_buffers_per_group() {
        let mut p = pool();
        let r = p.received(4).unwrap(); // TCP group
        assert!(p.hold(4));
        p.pin(4);
        assert!(p.hold(4));
        p.pin(4);
        assert_eq!(
            p.pinned(Group::Tcp),
            1,
            "two frames in one buffer pin one buffer"
        );
        assert_eq!(p.pinned(Group::Udp), 0);
        p.unpin(4);
        p.release(4);
        assert!(p.is_pinned(4));
        p.unpin(4);
        p.release(4);
        assert_eq!(p.pinned(Group::Tcp), 0);
        p.release_received(r);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.group_size(Group::Tcp), 2);
        assert_eq!(p.refused(), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without Pool::release_received")]
    fn a_received_buffer_must_be_given_back() {
        let mut p = pool();
        let r = p.received(0).unwrap();
        drop(r);
    }

    #[test]
    fn buf_mut_refuses_buffers_the_kernel_or_a_send_may_touch() {
        let mut p = pool();
        assert!(p.buf_mut_id(0).is_none(), "on the ring: the kernel's");
        assert!(p.buf(0).is_empty(), "the kernel's: not even readable");
        let r = p.received(0).unwrap();
        assert!(p.buf_mut(&r).is_some(), "received: ours");
        assert!(p.hold(0));
        assert!(p.buf_mut(&r).is_none(), "a send reads it: in flight");
        assert_eq!(p.buf(0).len(), 2048, "in flight: readable");
        p.release(0);
        p.release_received(r);
        assert!(p.buf_mut_id(0).is_none());
        assert!(p.seg(Seg::new(0, 0, 10)).is_empty());
    }

    #[test]
    fn transitions_the_state_does_not_allow_are_refused_not_wrapped() {
        let mut p = pool();
        // A hold or a pin on the kernel's buffer, a release of it: refused.
        assert!(!p.hold(0));
        p.release(0);
        p.pin(0);
        p.unpin(0);
        assert_eq!(p.refused(), 4);
        let mut freed = Vec::new();
        p.take_freed(&mut freed);
        assert!(freed.is_empty(), "never handed to the kernel twice");
        assert_eq!(p.in_use(), 0);
        // A completion for a buffer we hold, or a spare, or no buffer of this pool: refused.
        let r = p.received(0).unwrap();
        assert!(p.received(0).is_none());
        assert!(p.received(6).is_none(), "spares never come from the kernel");
        assert!(p.received(500).is_none());
        assert!(!p.hold(500));
        assert!(p.buf(500).is_empty());
        assert!(!p.addr(500).is_null());
        // A second release after the last one: refused, and the buffer is freed once.
        p.release_received(r);
        p.release(0);
        p.take_freed(&mut freed);
        assert_eq!(freed, vec![0]);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.refused(), 9);
        // A count at its maximum refuses the next hold instead of wrapping to a small one.
        let r = p.received(1).unwrap();
        p.refs[1] = u32::MAX;
        assert!(!p.hold(1));
        assert_eq!(p.refs(1), u32::MAX);
        p.refs[1] = 1;
        // hold_all is all or nothing.
        let segs = [Seg::new(1, 0, 1), Seg::new(500, 0, 1)];
        assert!(!p.hold_all(&segs));
        assert_eq!(p.refs(1), 1, "the first hold was given back");
        p.release_received(r);
    }

    #[test]
    fn spares_run_out_without_panicking() {
        let mut p = pool();
        let a = p.take_spare().unwrap();
        let b = p.take_spare().unwrap();
        assert!(p.take_spare().is_none());
        p.release_received(a);
        p.release_received(b);
    }

    #[test]
    fn layout_is_validated() {
        let bad = PoolLayout {
            buf_size: 100,
            udp: 1,
            tcp: 1,
            spare: 1,
        };
        assert!(matches!(Pool::new(bad), Err(PoolError::Layout(_))));
    }

    #[test]
    fn segments_never_read_past_their_buffer() {
        let mut p = pool();
        let r = p.received(0).unwrap();
        assert_eq!(p.seg(Seg::new(0, 2040, 100)).len(), 8);
        assert_eq!(p.seg(Seg::new(0, 5000, 10)).len(), 0);
        assert_eq!(
            Seg::new(0, 70_000, 70_000).len,
            u16::MAX,
            "clamped, not wrapped"
        );
        p.release_received(r);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Receive(u16),
        Spare,
        Hold(u16),
        Release(u16),
        Pin(u16),
        Unpin(u16),
        GiveBack(usize),
        Write(usize),
        Recycle,
        /// A send of one or two segments (`send_ref`).
        Send(u16, Option<u16>),
        /// A send's completion (`sent`).
        Complete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..10).prop_map(Op::Receive),
            Just(Op::Spare),
            (0u16..10).prop_map(Op::Hold),
            (0u16..10).prop_map(Op::Release),
            (0u16..10).prop_map(Op::Pin),
            (0u16..10).prop_map(Op::Unpin),
            any::<usize>().prop_map(Op::GiveBack),
            any::<usize>().prop_map(Op::Write),
            Just(Op::Recycle),
            (0u16..10, prop::option::of(0u16..10)).prop_map(|(a, b)| Op::Send(a, b)),
            any::<usize>().prop_map(Op::Complete),
        ]
    }

    proptest! {
        /// Any order of operations, allowed or not: no panic, a buffer is with the kernel
        /// (on a ring, or on the spare list) or referenced, never both and never twice; every
        /// reference is accounted for exactly (handles of ours, sends' in-flight tokens, plain
        /// holds), so a completion gives back exactly what its send held and nothing of
        /// anyone else's; the use count matches the references; a buffer is writable only
        /// with exactly one.
        #[test]
        fn any_sequence_keeps_every_buffer_in_exactly_one_state(ops in prop::collection::vec(op(), 0..200)) {
            let mut p = pool();
            let total = p.layout().total();
            // The driver's view: ring buffers on a ring (all at start).
            let mut on_ring: Vec<bool> = (0..total).map(|i| i < 6).collect();
            // Not dropped on a failed assertion (a leaked handle would panic over the report).
            let mut handles = std::mem::ManuallyDrop::new(Vec::<Received>::new());
            let mut sends = std::mem::ManuallyDrop::new(Vec::<InFlight>::new());
            // Plain references taken with `hold` and not yet given back, per buffer.
            let mut held = vec![0u32; total];
            let mut freed = Vec::new();
            for o in ops {
                match o {
                    Op::Receive(id) => {
                        let was = on_ring.get(usize::from(id)).copied().unwrap_or(false);
                        match p.received(id) {
                            Some(r) => {
                                handles.push(r);
                                prop_assert!(was, "received {} that is not on a ring", id);
                                on_ring[usize::from(id)] = false;
                            }
                            None => prop_assert!(!was, "refused {} that is on a ring", id),
                        }
                    }
                    Op::Spare => if let Some(r) = p.take_spare() { handles.push(r) },
                    Op::Hold(id) => {
                        let live = p.refs(id) > 0;
                        prop_assert_eq!(p.hold(id), live);
                        if live {
                            held[usize::from(id)] += 1;
                        }
                    }
                    Op::Release(id) => {
                        let i = usize::from(id);
                        if held.get(i).is_some_and(|&h| h > 0) {
                            held[i] -= 1;
                            p.release(id);
                        } else if p.refs(id) == 0 {
                            // Nothing to give back: refused, counted, nothing freed twice.
                            let before = p.refused();
                            p.release(id);
                            prop_assert_eq!(p.refused(), before + 1);
                        }
                        // (A plain release of a reference a handle or a send holds is the
                        // untyped API misused; the typed owners are what this test follows.)
                    }
                    Op::Pin(id) => p.pin(id),
                    Op::Unpin(id) => p.unpin(id),
                    Op::GiveBack(i) => if !handles.is_empty() {
                        let at = i % handles.len();
                        let r = handles.swap_remove(at);
                        p.release_received(r);
                    },
                    Op::Write(i) => if !handles.is_empty() {
                        let r = &handles[i % handles.len()];
                        let one = p.refs(r.id()) == 1;
                        prop_assert_eq!(p.buf_mut(r).is_some(), one);
                    },
                    Op::Recycle => {
                        p.take_freed(&mut freed);
                        for &id in &freed {
                            let i = usize::from(id);
                            prop_assert!(!on_ring[i], "buffer {} handed to the kernel twice", id);
                            prop_assert_eq!(p.refs(id), 0);
                            on_ring[i] = true;
                        }
                        freed.clear();
                    }
                    Op::Send(a, b) => {
                        let segs: Vec<Seg> = std::iter::once(a)
                            .chain(b)
                            .map(|id| Seg::new(id, 0, 1))
                            .collect();
                        let before: Vec<u32> = (0..total).map(|i| p.refs(i as BufId)).collect();
                        let live = segs.iter().all(|s| p.refs(s.buf) > 0);
                        match p.send_ref(&segs) {
                            Some(t) => {
                                prop_assert!(live, "a send of the kernel's buffer {:?}", segs);
                                prop_assert_eq!(t.segs(), &segs[..]);
                                sends.push(t);
                            }
                            None => {
                                prop_assert!(!live, "a send of buffers of ours refused");
                                let after: Vec<u32> = (0..total).map(|i| p.refs(i as BufId)).collect();
                                prop_assert_eq!(before, after, "a refused send took a reference");
                            }
                        }
                    }
                    Op::Complete(i) => if !sends.is_empty() {
                        let at = i % sends.len();
                        let t = sends.swap_remove(at);
                        p.sent(t);
                    },
                }
                // Every reference has exactly one owner the test can name.
                for (id, &h) in held.iter().enumerate() {
                    let b = id as BufId;
                    let by_handles = handles.iter().filter(|r| r.id() == b).count() as u32;
                    let by_sends = sends
                        .iter()
                        .flat_map(|t| t.segs())
                        .filter(|s| s.buf == b)
                        .count() as u32;
                    prop_assert_eq!(
                        p.refs(b),
                        by_handles + by_sends + h,
                        "buffer {}: references without an owner, or an owner without one",
                        id
                    );
                }
                let referenced = (0..total).filter(|&i| p.refs(i as BufId) > 0).count();
                prop_assert_eq!(p.in_use(), referenced);
                for (i, &ring) in on_ring.iter().enumerate() {
                    prop_assert!(!(ring && p.refs(i as BufId) > 0), "buffer {} on a ring and referenced", i);
                }
            }
            // Every owner gives back what it holds: nothing is left referenced.
            for t in std::mem::ManuallyDrop::into_inner(sends) {
                p.sent(t);
            }
            for (id, n) in held.iter().enumerate() {
                for _ in 0..*n {
                    p.release(id as BufId);
                }
            }
            for r in std::mem::ManuallyDrop::into_inner(handles) {
                p.release_received(r);
            }
            prop_assert_eq!(p.in_use(), 0);
        }
    }

    #[test]
    fn a_send_holds_a_token_that_only_its_completion_gives_back() {
        let mut p = pool();
        let r = p.received(0).unwrap();
        let s = p.take_spare().unwrap();
        // No segments, more than two, or the kernel's buffer: no token, no reference.
        assert!(p.send_ref(&[]).is_none());
        assert!(p.send_ref(&[Seg::new(0, 0, 1); 3]).is_none());
        assert!(
            p.send_ref(&[Seg::new(0, 0, 1), Seg::new(1, 0, 1)])
                .is_none()
        );
        assert_eq!(p.refs(0), 1, "all or none");
        assert_eq!(p.refused(), 3);
        // A datagram straddling two buffers: one token, one reference on each.
        let t = p
            .send_ref(&[Seg::new(0, 10, 5), Seg::new(s.id(), 0, 7)])
            .unwrap();
        assert_eq!(t.segs(), [Seg::new(0, 10, 5), Seg::new(s.id(), 0, 7)]);
        assert_eq!((p.refs(0), p.refs(s.id())), (2, 2));
        assert_eq!(
            std::mem::size_of::<InFlight>(),
            std::mem::size_of::<[Seg; 2]>() + 2,
            "the token is the segments it describes, nothing more"
        );
        p.release_received(r);
        p.release_received(s);
        // The send is all that holds them now; its completion gives them back.
        assert_eq!(p.in_use(), 2);
        p.sent(t);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.spare_free(), 2);
        let mut freed = Vec::new();
        p.take_freed(&mut freed);
        assert_eq!(freed, vec![0]);
        assert_eq!(p.refused(), 3);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without Pool::sent")]
    fn a_send_token_must_be_given_back() {
        let mut p = pool();
        let r = p.received(0).unwrap();
        let t = p.send_ref(&[Seg::new(0, 0, 1)]).unwrap();
        p.release_received(r);
        drop(t);
    }
}
