//! RFC 4571 framing — being written.
