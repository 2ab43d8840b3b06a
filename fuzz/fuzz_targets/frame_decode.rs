//! The frame decoder on arbitrary bytes: a frame, "need more", or an error; never a panic.
#![no_main]

use bytes::BytesMut;
use libchan_core::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut first = true;
    while let Ok(Some(_)) = frame::decode(&mut buf, 64 * 1024, first) {
        first = false;
    }
});
