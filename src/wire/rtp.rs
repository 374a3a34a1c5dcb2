//! RTP header view — being written.
