//! STUN (RFC 8489) codec — being written; see the wire issue.
