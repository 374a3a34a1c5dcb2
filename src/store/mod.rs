//! Subscriber directory and telephone routes (being written).
