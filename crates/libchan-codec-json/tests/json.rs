//! The JSON codec: the whole conformance suite over tcp, the reference vectors of
//! docs/PROTOCOL.md §9, and total decoding.

use std::collections::BTreeMap;

use libchan_codec_json::Json;
use libchan_core::{Codec, Config, ErrorKind, Session};
use libchan_test_support::Caps;
use serde::de::DeserializeOwned;

fn config() -> Config {
    Config::new(Json)
}

async fn tcp_pair() -> (Session, Session) {
    let (a, b) = libchan_test_support::tcp_pair(config()).await;
    assert_eq!(a.codec(), "json");
    (a, b)
}

libchan_test_support::conformance!(
    json_over_tcp,
    tcp_pair,
    Caps {
        fds: false,
        loss: true
    }
);

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, libchan_core::Error> {
    libchan_test_support::decode(&Json, bytes)
}

#[test]
fn reference_vectors() {
    // docs/PROTOCOL.md §9, json: reference 0 and reference 3 inside an array.
    let mut out = Vec::new();
    Json.encode(&*Json.ref_marker(0), &mut out).unwrap();
    assert_eq!(out, br#"{"$libchan_ref":0}"#);
    out.clear();
    Json.encode(&(7u8, &*Json.ref_marker(3)), &mut out).unwrap();
    assert_eq!(out, br#"[7,{"$libchan_ref":3}]"#);
}

#[test]
fn data_that_looks_like_a_reference_stays_data() {
    let m: BTreeMap<String, u32> = decode(br#"{"$libchan_ref":0}"#).unwrap();
    assert_eq!(m["$libchan_ref"], 0);
}

#[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
struct B {
    #[serde(with = "serde_bytes")]
    b: Vec<u8>,
}

#[test]
fn bytes_are_base64_strings() {
    let mut out = Vec::new();
    Json.encode(
        &B {
            b: b"libchan".to_vec(),
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(out, br#"{"b":"bGliY2hhbg=="}"#);
    assert_eq!(
        decode::<B>(&out).unwrap(),
        B {
            b: b"libchan".to_vec()
        }
    );
}

#[test]
fn malformed_input_is_a_decode_error() {
    for bad in [
        &br#"{"b":"not base64!"}"#[..],
        b"",
        b"{",
        b"[1,2",
        b"\"unterminated",
        b"1 2",
        b"{\"a\":}",
        b"\xff\xfe",
    ] {
        let e = decode::<B>(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode, "{bad:?}");
    }
    // Nesting beyond serde_json's recursion limit (128) is an error, not a stack overflow.
    let deep = [vec![b'['; 200], vec![b']'; 200]].concat();
    let e = decode::<serde_json::Value>(&deep).unwrap_err();
    assert!(e.to_string().contains("recursion limit"), "{e}");
}
