//! `cargo +nightly fuzz run control`: see `voxgate::wire::fuzz::control_message` for what it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| voxgate::wire::fuzz::control_message(data));
