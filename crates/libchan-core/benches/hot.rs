//! Micro-benchmarks of the hot pure parts: frame decoding, the protocol state machine's
//! send and receive paths, credit bookkeeping, and the codec path of a small message
//! (through the type-erased `Codec` seam and, for comparison, ciborium called directly).
//!
//! `cargo bench -p libchan-core --bench hot`

use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use libchan_core::frame::{self, StreamKind};
use libchan_core::message::OutMessage;
use libchan_core::mux::{Mux, Role};
use libchan_core::{Codec, Limits};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Msg {
    seq: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// Two muxes that have shaken hands, and a channel from `a` to `b` that `b` accepted.
fn pair() -> (Mux, Mux, u32) {
    let mut a = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    let mut b = Mux::new(Role::Listener, Limits::default(), vec!["cbor".into()]);
    let (mut ab, mut ba) = (BytesMut::new(), BytesMut::new());
    a.poll_transmit(&mut ab, &mut Vec::new(), 1 << 20);
    b.poll_transmit(&mut ba, &mut Vec::new(), 1 << 20);
    b.handle_input(&mut ab, &mut Vec::new()).expect("hello");
    a.handle_input(&mut ba, &mut Vec::new()).expect("hello");
    let id = a.open(StreamKind::OpenerSends).expect("open");
    let mut ab = BytesMut::new();
    a.poll_transmit(&mut ab, &mut Vec::new(), 1 << 20);
    b.handle_input(&mut ab, &mut Vec::new()).expect("open");
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(b.poll_accept(&mut cx), Poll::Ready(Ok(Some(_)))));
    (a, b, id)
}

fn small_message() -> OutMessage {
    let mut buf = OutMessage::start(Vec::with_capacity(96));
    buf.extend_from_slice(&[0xa2; 84]);
    OutMessage::finish(buf, Vec::new(), Vec::new())
}

fn mux_paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("mux");
    g.throughput(Throughput::Elements(100));
    // 100 small messages: queue, transmit, handle on the other side, receive.
    g.bench_function("100 small messages end to end", |bench| {
        let (mut a, mut b, id) = pair();
        let mut wire = BytesMut::with_capacity(1 << 16);
        let mut cx = Context::from_waker(Waker::noop());
        bench.iter(|| {
            for _ in 0..100 {
                a.send_message(id, small_message()).expect("send");
            }
            a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
            b.handle_input(&mut wire, &mut Vec::new()).expect("input");
            for _ in 0..100 {
                let Poll::Ready(Ok(Some(m))) = b.poll_recv(&mut cx, id) else {
                    panic!("message")
                };
                black_box(m);
            }
            // Credit goes back.
            b.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
            a.handle_input(&mut wire, &mut Vec::new()).expect("credit");
        })
    });
    g.finish();

    let mut wire = BytesMut::new();
    let (mut a, _b, id) = pair();
    a.send_message(id, small_message()).expect("send");
    a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let frame_bytes = wire.split().freeze();
    c.bench_function("frame decode (DATA, one small message)", |bench| {
        bench.iter(|| {
            let mut b = BytesMut::from(&frame_bytes[..]);
            black_box(frame::decode(&mut b, 65536, false).expect("frame"))
        })
    });
    c.bench_function("frame encode (CREDIT)", |bench| {
        let mut out = BytesMut::with_capacity(64);
        bench.iter(|| {
            out.clear();
            frame::encode_credit(&mut out, black_box(3), black_box(65536));
            black_box(&out);
        })
    });
}

fn codec_path(c: &mut Criterion) {
    let codec = libchan_codec_cbor::Cbor;
    let msg = Msg {
        seq: 12345,
        payload: vec![7; 64],
    };
    let mut encoded = Vec::new();
    codec.encode(&msg, &mut encoded).expect("encode");
    let mut g = c.benchmark_group("codec, {seq, 64 B}");
    g.bench_function("encode through Codec (erased)", |bench| {
        let mut out = Vec::with_capacity(128);
        bench.iter(|| {
            out.clear();
            codec.encode(black_box(&msg), &mut out).expect("encode");
        })
    });
    g.bench_function("decode through Codec (erased)", |bench| {
        bench.iter(|| {
            let mut out: Option<Msg> = None;
            codec
                .decode(black_box(&encoded), &mut |d| {
                    out = Some(erased_serde::deserialize::<Msg>(d)?);
                    Ok(())
                })
                .expect("decode");
            black_box(out)
        })
    });
    g.bench_function("encode typed (what CBOR sessions do)", |bench| {
        let mut out = Vec::with_capacity(128);
        bench.iter(|| {
            out.clear();
            libchan_core::cbor::encode(black_box(&msg), &mut out).expect("encode");
        })
    });
    g.bench_function("decode typed (what CBOR sessions do)", |bench| {
        bench.iter(|| {
            let m: Msg = libchan_core::cbor::decode(black_box(&encoded)).expect("decode");
            black_box(m)
        })
    });
    g.bench_function("decode with ciborium directly", |bench| {
        bench.iter(|| {
            let m: Msg = ciborium::de::from_reader(black_box(&encoded[..])).expect("decode");
            black_box(m)
        })
    });
    g.finish();
}

criterion_group!(benches, mux_paths, codec_path);
criterion_main!(benches);
