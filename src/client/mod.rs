//! The softphone library: used by `voxgate phone`, the tests and the load generator.

pub mod binding;
