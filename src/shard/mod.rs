//! The per-core data plane — being written.
