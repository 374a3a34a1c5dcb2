//! `cargo +nightly fuzz run deframe`: see `voxgate::wire::fuzz::deframe` for what it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| voxgate::wire::fuzz::deframe(data));
