//! The protocol state machine after a valid HELLO: arbitrary frames, streams, messages.
#![no_main]

mod common;

use bytes::BytesMut;
use libchan_core::frame::{self, Hello};
use libchan_core::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut hello = BytesMut::new();
    frame::encode_hello(&mut hello, &Hello::new(1, &Limits::default(), vec!["cbor".into()]));
    common::drive(&hello, data)
});
