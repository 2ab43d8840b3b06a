//! The slice decoder reads what ciborium writes, and rejects malformed input without
//! panicking.

use std::collections::BTreeMap;

use libchan_codec_cbor::Cbor;
use libchan_core::{erased_serde, Codec, ErrorKind};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, libchan_core::Error> {
    let mut out = None;
    Cbor.decode(bytes, &mut |d| {
        out = Some(erased_serde::deserialize::<T>(d)?);
        Ok(())
    })?;
    Ok(out.expect("value"))
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(&v, &mut bytes).expect("encode");
    let back: T = decode(&bytes).unwrap_or_else(|e| panic!("{v:?} ({bytes:02x?}): {e}"));
    assert_eq!(back, v);
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
enum E {
    Unit,
    New(u8),
    Tuple(i32, String),
    Struct { a: Option<u64>, b: Vec<bool> },
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Everything {
    u: u64,
    i: i64,
    small: i8,
    big: u128,
    neg_big: i128,
    f: f64,
    g: f32,
    s: String,
    #[serde(with = "serde_bytes")]
    b: Vec<u8>,
    v: Vec<u8>,
    opt: Option<Box<Everything>>,
    unit: (),
    tuple: (u8, char, bool),
    map: BTreeMap<String, E>,
    es: Vec<E>,
}

fn everything() -> Everything {
    Everything {
        u: u64::MAX,
        i: i64::MIN,
        small: -5,
        big: u128::MAX,
        neg_big: i128::MIN,
        f: -1.5e300,
        g: 0.25,
        s: "héllo".into(),
        b: vec![0, 1, 255],
        v: vec![9; 30],
        opt: Some(Box::new(Everything {
            u: 0,
            i: -1,
            small: 0,
            big: 1,
            neg_big: -1,
            f: 0.0,
            g: 1.0,
            s: String::new(),
            b: vec![],
            v: vec![],
            opt: None,
            unit: (),
            tuple: (0, 'x', false),
            map: BTreeMap::new(),
            es: vec![],
        })),
        unit: (),
        tuple: (7, '€', true),
        map: [("k".to_string(), E::Unit), ("l".to_string(), E::New(3))].into(),
        es: vec![
            E::Unit,
            E::New(1),
            E::Tuple(-3, "t".into()),
            E::Struct {
                a: Some(2),
                b: vec![true, false],
            },
            E::Struct { a: None, b: vec![] },
        ],
    }
}

#[test]
fn reads_what_ciborium_writes() {
    round_trip(everything());
    round_trip(0u8);
    round_trip(-24i64);
    round_trip(-25i64);
    round_trip(u64::MAX as u128 + 1);
    round_trip(-(u64::MAX as i128) - 2);
    round_trip(f64::INFINITY);
    round_trip(None::<u8>);
    round_trip(vec![Some(1u8), None]);
    round_trip("x".repeat(70_000));
}

#[test]
fn reads_forms_other_encoders_write() {
    // Half floats: 1.5 and -infinity.
    assert_eq!(decode::<f64>(&[0xF9, 0x3E, 0x00]).unwrap(), 1.5);
    assert_eq!(
        decode::<f64>(&[0xF9, 0xFC, 0x00]).unwrap(),
        f64::NEG_INFINITY
    );
    // Indefinite-length array, map, byte and text strings.
    assert_eq!(
        decode::<Vec<u8>>(&[0x9F, 0x01, 0x02, 0xFF]).unwrap(),
        [1, 2]
    );
    let m: BTreeMap<String, u8> = decode(&[0xBF, 0x61, b'a', 0x01, 0xFF]).unwrap();
    assert_eq!(m["a"], 1);
    let b: serde_bytes::ByteBuf = decode(&[0x5F, 0x41, 1, 0x42, 2, 3, 0xFF]).unwrap();
    assert_eq!(b.as_ref(), [1, 2, 3]);
    let s: String = decode(&[0x7F, 0x61, b'a', 0x61, b'b', 0xFF]).unwrap();
    assert_eq!(s, "ab");
    // An unknown tag (1, epoch time) is transparent; undefined reads as None.
    assert_eq!(decode::<u32>(&[0xC1, 0x1A, 0, 0, 1, 0]).unwrap(), 256);
    assert_eq!(decode::<Option<u8>>(&[0xF7]).unwrap(), None);
    // A non-minimal head is accepted (RFC 8949 does not require preferred encoding).
    assert_eq!(decode::<u8>(&[0x18, 0x05]).unwrap(), 5);
}

#[test]
fn malformed_input_is_a_decode_error_naming_the_offset() {
    let cases: &[(&[u8], &str)] = &[
        (&[], "unexpected end of input at byte 0"),
        (&[0x1C], "malformed head 0x1c"),
        (&[0x1F], "malformed head 0x1f"),
        (
            &[0x5B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            "exceeds the 0 bytes left",
        ),
        (
            &[0x9B, 0, 0, 0, 1, 0, 0, 0, 0, 0x01],
            "exceeds the 1 bytes left",
        ),
        (&[0x62, 0xFF, 0xFE], "not UTF-8"),
        (&[0x82, 0x01], "length 2 exceeds the 1 bytes left"),
        (&[0x9F, 0x01], "unexpected end of input at byte 2"),
        (&[0xFF], "unexpected break"),
        (&[0xF8, 0x20], "unsupported simple value"),
        (&[0x01, 0x02], "1 trailing bytes"),
        (
            &[0xDA, 0x4C, 0x43, 0x48, 0x4E, 0x00],
            "a libchan reference where",
        ),
        (&[0x5F, 0x61, b'a', 0xFF], "bad chunk"),
    ];
    for (bytes, want) in cases {
        let e = decode::<serde::de::IgnoredAny>(bytes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode, "{bytes:02x?}");
        assert!(e.to_string().contains(want), "{bytes:02x?}: {e}");
    }
    let deep = [vec![0x81; 200], vec![0x00]].concat();
    let e = decode::<serde::de::IgnoredAny>(&deep).unwrap_err();
    assert!(e.to_string().contains("MAX_DEPTH = 128"), "{e}");
    // A struct with an array that has more items than the type reads.
    let e = decode::<(u8, u8)>(&[0x83, 1, 2, 3]).unwrap_err();
    assert!(e.to_string().contains("1 array items left unread"), "{e}");
}

#[test]
fn every_prefix_and_mutation_of_a_valid_message_is_handled_without_panic() {
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(&everything(), &mut bytes).unwrap();
    for n in 0..bytes.len() {
        assert!(
            decode::<Everything>(&bytes[..n]).is_err(),
            "prefix {n} decoded"
        );
        let _ = decode::<serde::de::IgnoredAny>(&bytes[..n]);
    }
    // Deterministic mutations: every byte position, a few values each.
    let mut decoded = 0;
    for i in 0..bytes.len() {
        for v in [0x00, 0x1B, 0x3B, 0x5F, 0x7B, 0x9F, 0xBB, 0xDB, 0xFB, 0xFF] {
            let mut m = bytes.clone();
            m[i] = v;
            decoded += usize::from(decode::<Everything>(&m).is_ok());
            let _ = decode::<serde::de::IgnoredAny>(&m);
        }
    }
    assert!(decoded < bytes.len() * 10, "mutations must mostly fail");
}
