//! Wake-up for a sleeping shard: an eventfd the shard polls. The sender writes it only when no
//! wake-up is already pending, so a burst of commands costs one syscall, and packets none.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Waker {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: AtomicBool::new(false),
        })
    }

    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Called by the shard before it drains its command queue. The eventfd is read *before*
    /// `pending` is cleared: clearing first let a sender write between the two, and the read
    /// then swallowed that write while `pending` stayed set, so the next sender wrote nothing
    /// and its command waited for the idle timeout. In this order a sender that finds
    /// `pending` set has its command drained right after; one that finds it clear writes a
    /// wake-up that stays readable.
    pub fn clear_pending(&self) {
        if self.pending.load(Ordering::Acquire) {
            let mut v: u64 = 0;
            // SAFETY: reading 8 bytes into a live u64; EAGAIN is fine.
            unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            self.pending.store(false, Ordering::Release);
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(w: &Waker) -> bool {
        let mut p = libc::pollfd {
            fd: w.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_wake_after_the_drain_leaves_the_eventfd_readable() {
        let w = Waker::new().unwrap();
        w.wake();
        assert!(readable(&w));
        w.clear_pending();
        assert!(!readable(&w), "the wake-up was consumed");
        // The next command after a drain must wake the shard again.
        w.wake();
        assert!(readable(&w), "a later wake-up is never swallowed");
        w.clear_pending();
        w.wake();
        w.wake();
        assert!(readable(&w));
    }
}
