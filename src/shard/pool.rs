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

/// A buffer the kernel handed back (a receive completion or a read): it starts with one
/// reference, which is ours. The three states of a buffer are types or counts, never
/// conventions: on a ring it is the kernel's (no handle, 0 references, `buf_mut` refuses it);
/// received it is a `Received` (ours, 1 reference, writable); referenced by sends or queued
/// frames it is in flight (more references, read-only until they are released). The handle
/// must be consumed by [`Pool::release_received`], which gives our reference back; dropping it
/// instead is a leak, caught by a debug assertion.
#[must_use = "a received buffer goes back to its ring only through Pool::release_received"]
#[derive(Debug)]
pub struct Received {
    id: BufId,
}

impl Received {
    pub fn id(&self) -> BufId {
        self.id
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

/// A byte range inside one pool buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    pub buf: BufId,
    pub off: u16,
    pub len: u16,
}

impl Seg {
    pub fn new(buf: BufId, off: usize, len: usize) -> Seg {
        debug_assert!(off <= u16::MAX as usize && len <= u16::MAX as usize);
        Seg {
            buf,
            off: off as u16,
            len: len as u16,
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

    /// Address of buffer `id` (for buffer rings and iovecs).
    pub fn addr(&self, id: BufId) -> *mut u8 {
        debug_assert!(usize::from(id) < self.refs.len());
        // SAFETY: id < total, so the offset is inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(usize::from(id) * self.layout.buf_size)
        }
    }

    pub fn buf(&self, id: BufId) -> &[u8] {
        // SAFETY: the buffer lies inside the mapping; the kernel writes into a buffer only while
        // it is on a ring, and the shard reads it only after the kernel handed it back.
        unsafe { std::slice::from_raw_parts(self.addr(id), self.layout.buf_size) }
    }

    /// Write access to a buffer that nothing else references: exactly one reference, the
    /// caller's. A buffer on a ring (0 references: the kernel may write it) or read by a send in
    /// flight (2 or more) gives None, so a write can never race the kernel or change bytes a
    /// send or another call's queue still points at.
    pub fn buf_mut(&mut self, id: BufId) -> Option<&mut [u8]> {
        if self.refs.get(usize::from(id)) != Some(&1) {
            return None;
        }
        // SAFETY: inside the mapping (id < total, checked by the lookup above); the single
        // reference is the caller's, so neither the kernel nor a pending send reads or writes
        // these bytes, and `&mut self` keeps this the only Rust view.
        Some(unsafe { std::slice::from_raw_parts_mut(self.addr(id), self.layout.buf_size) })
    }

    pub fn seg(&self, s: Seg) -> &[u8] {
        let b = self.buf(s.buf);
        let start = usize::from(s.off).min(b.len());
        let end = (start + usize::from(s.len)).min(b.len());
        &b[start..end]
    }

    /// The kernel handed us buffer `id` (a completion): it starts with one reference, owned by
    /// the returned handle.
    pub fn received(&mut self, id: BufId) -> Received {
        let r = &mut self.refs[usize::from(id)];
        debug_assert_eq!(*r, 0, "buffer {id} received twice");
        if *r == 0 {
            self.in_use += 1;
        }
        *r += 1;
        Received { id }
    }

    /// Gives back the reference a [`Received`] holds (the buffer returns to its ring once no
    /// send or queue references it either).
    pub fn release_received(&mut self, r: Received) {
        let id = r.id;
        std::mem::forget(r);
        self.release(id);
    }

    /// Take a spare buffer (one reference), if any is free.
    pub fn take_spare(&mut self) -> Option<BufId> {
        let id = self.spare_free.pop()?;
        self.refs[usize::from(id)] = 1;
        self.in_use += 1;
        Some(id)
    }

    #[inline]
    pub fn hold(&mut self, id: BufId) {
        let r = &mut self.refs[usize::from(id)];
        debug_assert!(*r > 0, "hold on free buffer {id}");
        debug_assert!(*r < u32::MAX, "reference count of buffer {id} would wrap");
        // Saturating: never wraps to a small count (which would free a buffer still in use);
        // a saturated buffer is leaked instead, which the budgets make impossible anyway.
        *r = r.saturating_add(1);
    }

    #[inline]
    pub fn release(&mut self, id: BufId) {
        let r = &mut self.refs[usize::from(id)];
        debug_assert!(*r > 0, "release of free buffer {id}");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.in_use -= 1;
            if self.group(id) == Group::Spare {
                self.spare_free.push(id);
            } else {
                self.freed.push(id);
            }
        }
    }

    /// A queued frame holds `id` (besides its reference, taken with `hold`).
    pub fn pin(&mut self, id: BufId) {
        let g = self.group(id) as usize;
        let p = &mut self.pins[usize::from(id)];
        debug_assert!(self.refs[usize::from(id)] > 0, "pin of a free buffer {id}");
        if *p == 0 {
            self.pinned[g] += 1;
        }
        *p += 1;
    }

    pub fn unpin(&mut self, id: BufId) {
        let g = self.group(id) as usize;
        let p = &mut self.pins[usize::from(id)];
        debug_assert!(*p > 0, "unpin of an unpinned buffer {id}");
        if *p == 1 {
            self.pinned[g] -= 1;
        }
        *p = p.saturating_sub(1);
    }

    pub fn is_pinned(&self, id: BufId) -> bool {
        self.pins[usize::from(id)] > 0
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
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.freed, into);
    }

    pub fn refs(&self, id: BufId) -> u32 {
        self.refs[usize::from(id)]
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
        let r = p.received(1);
        p.hold(1);
        p.release_received(r);
        let mut freed = Vec::new();
        p.take_freed(&mut freed);
        assert!(freed.is_empty(), "still referenced once");
        p.release(1);
        p.take_freed(&mut freed);
        assert_eq!(freed, vec![1]);
        freed.clear();
        let s = p.take_spare().unwrap();
        assert_eq!(p.group(s), Group::Spare);
        assert_eq!(p.spare_free(), 1);
        p.release(s);
        assert_eq!(p.spare_free(), 2);
        p.take_freed(&mut freed);
        assert!(freed.is_empty());
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn pins_count_distinct_buffers_per_group() {
        let mut p = pool();
        let r = p.received(4); // TCP group
        p.hold(4);
        p.pin(4);
        p.hold(4);
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
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without Pool::release_received")]
    fn a_received_buffer_must_be_given_back() {
        let mut p = pool();
        let r = p.received(0);
        drop(r);
    }

    #[test]
    fn buf_mut_refuses_buffers_the_kernel_or_a_send_may_touch() {
        let mut p = pool();
        assert!(p.buf_mut(0).is_none(), "on the ring: the kernel's");
        let r = p.received(0);
        assert!(p.buf_mut(0).is_some(), "received: ours");
        p.hold(0);
        assert!(p.buf_mut(0).is_none(), "a send reads it: in flight");
        p.release(0);
        p.release_received(r);
        assert!(p.buf_mut(0).is_none());
    }

    #[test]
    fn spares_run_out_without_panicking() {
        let mut p = pool();
        assert!(p.take_spare().is_some());
        assert!(p.take_spare().is_some());
        assert!(p.take_spare().is_none());
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
        let p = pool();
        assert_eq!(p.seg(Seg::new(0, 2040, 100)).len(), 8);
        assert_eq!(p.seg(Seg::new(0, 5000, 10)).len(), 0);
    }
}
