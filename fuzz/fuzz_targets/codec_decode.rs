//! Every codec's decoder, including how it reads references, on arbitrary bytes.
#![no_main]

use libchan_core::{erased_serde, Codec};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Typical {
    id: u64,
    name: String,
    tags: Vec<String>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    nested: Option<Box<Typical>>,
    choice: Choice,
    blobs: Vec<libchan_core::Blob>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum Choice {
    A,
    B(i32),
    C { x: f64 },
}

fn run(codec: &dyn Codec, data: &[u8]) {
    let _ = codec.decode(data, &mut |d| {
        erased_serde::deserialize::<serde::de::IgnoredAny>(d).map(|_| ())
    });
    let _ = codec.decode(data, &mut |d| erased_serde::deserialize::<Typical>(d).map(|_| ()));
    let _ = codec.decode(data, &mut |d| codec.read_ref(d).map(|_| ()));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            run(&libchan_codec_cbor::Cbor, rest);
            // The typed path sessions take for CBOR (no type erasure).
            let _ = libchan_codec_cbor::decode::<serde::de::IgnoredAny>(rest);
            let _ = libchan_codec_cbor::decode::<Typical>(rest);
        }
        1 => run(&libchan_codec_json::Json, rest),
        2 => run(&libchan_codec_msgpack::MsgPack, rest),
        _ => run(&libchan_codec_xml::Xml, rest),
    }
});
