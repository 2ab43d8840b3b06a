//! `--codecs`: encoded size and encode/decode time of one representative message through
//! each codec's `Codec` implementation (the path a session uses).

use std::hint::black_box;
use std::time::Instant;

use libchan::erased_serde;
use libchan::Codec;
use libchan_codec_protobuf::{Proto, Protobuf};
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

/// The same order as a prost message (what `protoc` would generate from an equivalent
/// `.proto`), for the protobuf codec.
#[derive(Clone, PartialEq, prost::Message)]
struct OrderPb {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    customer: String,
    #[prost(string, repeated, tag = "3")]
    tags: Vec<String>,
    #[prost(sint64, tag = "4")]
    amount_cents: i64,
    #[prost(bool, tag = "5")]
    express: bool,
    #[prost(bytes = "vec", tag = "6")]
    payload: Vec<u8>,
}

fn order_pb() -> Proto<OrderPb> {
    let o = order();
    Proto::new(OrderPb {
        id: o.id,
        customer: o.customer,
        tags: o.tags,
        amount_cents: o.amount_cents,
        express: o.express,
        payload: o.payload,
    })
}

fn measure<T>(codec: &dyn Codec, msg: T, same: fn(&T, &T) -> bool, iters: u32) -> (usize, f64, f64)
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let mut buf = Vec::with_capacity(512);
    codec.encode(&msg, &mut buf).expect("encode");
    let size = buf.len();
    let mut check: Option<T> = None;
    codec
        .decode(&buf, &mut |d| {
            check = Some(erased_serde::deserialize(d)?);
            Ok(())
        })
        .expect("decode");
    assert!(
        check.is_some_and(|c| same(&c, &msg)),
        "{} round trip",
        codec.name()
    );
    let t = Instant::now();
    for _ in 0..iters {
        buf.clear();
        codec.encode(black_box(&msg), &mut buf).expect("encode");
    }
    let enc = t.elapsed().as_nanos() as f64 / f64::from(iters);
    let t = Instant::now();
    for _ in 0..iters {
        let mut out: Option<T> = None;
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
    let codecs: [&dyn Codec; 4] = [
        &libchan::cbor::Cbor,
        &libchan_codec_msgpack::MsgPack,
        &libchan_codec_json::Json,
        &libchan_codec_xml::Xml,
    ];
    let serde_codecs = codecs
        .into_iter()
        .map(|c| (c, measure(c, order(), |a, b| a == b, iters)));
    let protobuf = (
        &Protobuf as &dyn Codec,
        measure(&Protobuf, order_pb(), |a, b| a.message == b.message, iters),
    );
    for (c, (size, enc, dec)) in serde_codecs.chain([protobuf]) {
        let n = c.name();
        println!(r#"{{"system":"codec","codec":"{n}","metric":"encoded_bytes","value":{size}}}"#);
        println!(r#"{{"system":"codec","codec":"{n}","metric":"encode_ns","value":{enc:.1}}}"#);
        println!(r#"{{"system":"codec","codec":"{n}","metric":"decode_ns","value":{dec:.1}}}"#);
    }
}
