//! `cargo +nightly fuzz run stun`: see `voxgate::wire::fuzz::stun_message` for what it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| voxgate::wire::fuzz::stun_message(data));
