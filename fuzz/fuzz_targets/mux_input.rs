//! The protocol state machine fed arbitrary peer bytes from the first byte on (handshake).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::drive(&[], data));
