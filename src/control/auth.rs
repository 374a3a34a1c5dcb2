//! SCRAM-SHA-256 log-in (being written).
