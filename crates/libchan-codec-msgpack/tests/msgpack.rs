//! The MessagePack codec: the whole conformance suite over tcp, the reference vectors of
//! docs/PROTOCOL.md §9, and total decoding.

use std::collections::BTreeMap;

use libchan_codec_msgpack::MsgPack;
use libchan_core::{Codec, Config, ErrorKind, Session};
use libchan_test_support::Caps;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn config() -> Config {
    Config::new(MsgPack)
}

async fn tcp_pair() -> (Session, Session) {
    let (a, b) = libchan_test_support::tcp_pair(config()).await;
    assert_eq!(a.codec(), "msgpack");
    (a, b)
}

libchan_test_support::conformance!(
    msgpack_over_tcp,
    tcp_pair,
    Caps {
        fds: false,
        loss: true
    }
);

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, libchan_core::Error> {
    libchan_test_support::decode(&MsgPack, bytes)
}

#[test]
fn reference_vectors() {
    // docs/PROTOCOL.md §9, msgpack: reference 0, and reference 3 inside an array.
    let mut out = Vec::new();
    MsgPack.encode(&*MsgPack.ref_marker(0), &mut out).unwrap();
    assert_eq!(out, [0xd6, 0x4c, 0, 0, 0, 0]);
    out.clear();
    MsgPack
        .encode(&(7u8, &*MsgPack.ref_marker(3)), &mut out)
        .unwrap();
    assert_eq!(out, [0x92, 0x07, 0xd6, 0x4c, 0, 0, 0, 3]);
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct S {
    a: u32,
    #[serde(with = "serde_bytes")]
    b: Vec<u8>,
    c: Option<String>,
}

#[test]
fn structs_are_maps_with_field_names() {
    let mut out = Vec::new();
    MsgPack
        .encode(
            &S {
                a: 1,
                b: vec![2],
                c: None,
            },
            &mut out,
        )
        .unwrap();
    assert_eq!(out[0], 0x83, "fixmap of 3");
    assert_eq!(
        decode::<S>(&out).unwrap(),
        S {
            a: 1,
            b: vec![2],
            c: None
        }
    );
}

#[test]
fn data_that_looks_like_a_reference_stays_data() {
    // An extension value read as plain data where the type expects a number fails; a map
    // with the same bytes stays a map.
    assert!(decode::<u32>(&[0xd6, 0x4c, 0, 0, 0, 0]).is_err());
    let m: BTreeMap<String, u32> = decode(&[0x81, 0xa1, b'r', 0x00]).unwrap();
    assert_eq!(m["r"], 0);
}

#[test]
fn malformed_input_is_a_decode_error_without_panic_or_huge_allocation() {
    let cases: &[&[u8]] = &[
        &[],
        &[0xc1],                         // never-used marker
        &[0x92, 0x01],                   // array of 2 with 1 item
        &[0xdb, 0xff, 0xff, 0xff, 0xff], // str32 of 4 GiB, no data
        &[0xdd, 0xff, 0xff, 0xff, 0xff], // array32 of 4 G items
        &[0x01, 0x02],                   // trailing bytes
    ];
    for bad in cases {
        let e = decode::<serde::de::IgnoredAny>(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode, "{bad:02x?}");
    }
    let deep = [vec![0x91; 300], vec![0x00]].concat();
    assert!(decode::<serde::de::IgnoredAny>(&deep).is_err());
    // Every prefix and single-byte mutation of a valid message.
    let mut good = Vec::new();
    MsgPack
        .encode(
            &S {
                a: 300,
                b: vec![1; 40],
                c: Some("x".repeat(40)),
            },
            &mut good,
        )
        .unwrap();
    for n in 0..good.len() {
        assert!(decode::<S>(&good[..n]).is_err());
    }
    for i in 0..good.len() {
        for v in [0x00, 0xc1, 0xdb, 0xdd, 0xdf, 0xff] {
            let mut m = good.clone();
            m[i] = v;
            let _ = decode::<S>(&m);
            let _ = decode::<serde::de::IgnoredAny>(&m);
        }
    }
}

#[tokio::test]
async fn peers_without_a_common_codec_fail_naming_both_lists() {
    let l = libchan_tcp::TcpListener::bind("127.0.0.1:0", Config::new(libchan_codec_cbor::Cbor))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let cfg = config();
    let (a, b) = tokio::join!(libchan_tcp::connect(addr, &cfg), l.accept());
    let e = a.expect_err("no common codec");
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    assert!(
        e.to_string().contains("msgpack") && e.to_string().contains("cbor"),
        "{e}"
    );
    assert!(b.is_err());
    // With both on the dialer's list, the first one the listener also has is used.
    let l = libchan_tcp::TcpListener::bind("127.0.0.1:0", Config::new(libchan_codec_cbor::Cbor))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let cfg = config().codec(libchan_codec_cbor::Cbor);
    let (a, b) = tokio::join!(libchan_tcp::connect(addr, &cfg), l.accept());
    assert_eq!(a.expect("connect").codec(), "cbor");
    assert_eq!(b.expect("accept").codec(), "cbor");
}
