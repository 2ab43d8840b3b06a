//! `--codecs`: encoded size and encode/decode time of one representative message through
//! each codec's `Codec` implementation (the path a session uses).

use std::hint::black_box;
use std::time::Instant;

use libchan::erased_serde;
use libchan::Codec;
use serde::{Deserialize, Serialize};

/// A typical request: ids, a name, a few tags, a small binary payload.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
struct Order {
    id: u64,
    customer: String,
    tags: Vec<String>,
    amount_cents: i64,
    express: bool,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

fn order() -> Order {
    Order {
        id: 1_234_567,
        customer: "ACME Corporation".into(),
        tags: vec!["priority".into(), "eu-west".into(), "gift".into()],
        amount_cents: -4_250,
        express: true,
        payload: vec![0xAB; 64],
    }
}

fn measure(codec: &dyn Codec, iters: u32) -> (usize, f64, f64) {
    let msg = order();
    let mut buf = Vec::with_capacity(512);
    codec.encode(&msg, &mut buf).expect("encode");
    let size = buf.len();
    let mut check: Option<Order> = None;
    codec
        .decode(&buf, &mut |d| {
            check = Some(erased_serde::deserialize(d)?);
            Ok(())
        })
        .expect("decode");
    assert_eq!(check.as_ref(), Some(&msg), "{} round trip", codec.name());
    let t = Instant::now();
    for _ in 0..iters {
        buf.clear();
        codec.encode(black_box(&msg), &mut buf).expect("encode");
    }
    let enc = t.elapsed().as_nanos() as f64 / f64::from(iters);
    let t = Instant::now();
    for _ in 0..iters {
        let mut out: Option<Order> = None;
        codec
            .decode(black_box(&buf), &mut |d| {
                out = Some(erased_serde::deserialize(d)?);
                Ok(())
            })
            .expect("decode");
        black_box(out);
    }
    let dec = t.elapsed().as_nanos() as f64 / f64::from(iters);
    (size, enc, dec)
}

/// Prints one JSON line per codec and metric.
pub(crate) fn run(quick: bool) {
    let iters = if quick { 2_000 } else { 200_000 };
    let codecs: [&dyn Codec; 3] = [
        &libchan::cbor::Cbor,
        &libchan_codec_msgpack::MsgPack,
        &libchan_codec_json::Json,
    ];
    for c in codecs {
        let (size, enc, dec) = measure(c, iters);
        let n = c.name();
        println!(r#"{{"system":"codec","codec":"{n}","metric":"encoded_bytes","value":{size}}}"#);
        println!(r#"{{"system":"codec","codec":"{n}","metric":"encode_ns","value":{enc:.1}}}"#);
        println!(r#"{{"system":"codec","codec":"{n}","metric":"decode_ns","value":{dec:.1}}}"#);
    }
}
