//! The XML codec: the whole conformance suite over tcp, the vectors of docs/PROTOCOL.md
//! §9, round trips of the serde data model, and total decoding.

use std::collections::BTreeMap;

use libchan_codec_xml::Xml;
use libchan_core::{Codec, Config, ErrorKind, Session};
use libchan_test_support::Caps;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

async fn tcp_pair() -> (Session, Session) {
    let (a, b) = libchan_test_support::tcp_pair(Config::new(Xml)).await;
    assert_eq!(a.codec(), "xml");
    (a, b)
}

libchan_test_support::conformance!(
    xml_over_tcp,
    tcp_pair,
    Caps {
        fds: false,
        loss: true
    }
);

fn encode<T: Serialize + ?Sized>(v: &T) -> String {
    let mut out = Vec::new();
    struct W<'a, T: ?Sized>(&'a T);
    impl<T: Serialize + ?Sized> Serialize for W<'_, T> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(s)
        }
    }
    Xml.encode(&W(v), &mut out).expect("encode");
    String::from_utf8(out).expect("UTF-8")
}

fn decode<T: DeserializeOwned>(xml: &str) -> Result<T, libchan_core::Error> {
    libchan_test_support::decode(&Xml, xml.as_bytes())
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
enum Shape {
    Dot,
    Circle(f64),
    Line(i32, i32),
    Rect { w: u32, h: u32 },
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Order {
    id: u64,
    customer: String,
    tags: Vec<String>,
    amount: i64,
    note: Option<String>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    shapes: Vec<Shape>,
    extra: BTreeMap<u8, bool>,
    unit: (),
}

#[test]
fn vectors() {
    // docs/PROTOCOL.md §9, xml.
    assert_eq!(encode(&*Xml.ref_marker(0)), "<ref>0</ref>");
    assert_eq!(
        encode(&(7u8, &*Xml.ref_marker(3))),
        "<seq><int>7</int><ref>3</ref></seq>"
    );
    #[derive(Serialize)]
    struct Job<'a> {
        cmd: &'a str,
        n: Option<u8>,
        bytes: &'a serde_bytes::Bytes,
    }
    assert_eq!(
        encode(&Job {
            cmd: "a<b & \"c\"",
            n: None,
            bytes: serde_bytes::Bytes::new(b"libchan"),
        }),
        concat!(
            "<struct><field name=\"cmd\"><str>a&lt;b &amp; &quot;c&quot;</str></field>",
            "<field name=\"n\"><none/></field>",
            "<field name=\"bytes\"><bytes>bGliY2hhbg==</bytes></field></struct>"
        )
    );
    assert_eq!(
        encode(&Shape::Rect { w: 1, h: 2 }),
        "<variant name=\"Rect\"><struct><field name=\"w\"><int>1</int></field><field name=\"h\"><int>2</int></field></struct></variant>"
    );
    assert_eq!(
        encode(&Shape::Dot),
        "<variant name=\"Dot\"><unit/></variant>"
    );
    assert_eq!(encode(&"\u{1}\r"), "<str encoding=\"base64\">AQ0=</str>");
    assert_eq!(encode(&"line\r\n"), "<str>line&#13;\n</str>");
}

#[test]
fn the_serde_data_model_round_trips() {
    let order = Order {
        id: u64::MAX,
        customer: "  ACME <Corp> & \"sons\" 'x' \t\n\r \u{1} é 🦀  ".into(),
        tags: vec![String::new(), "b".into()],
        amount: i64::MIN,
        note: None,
        payload: (0..=255).collect(),
        shapes: vec![
            Shape::Dot,
            Shape::Circle(-0.5),
            Shape::Line(-1, 2),
            Shape::Rect { w: 3, h: 4 },
        ],
        extra: [(1, true), (2, false)].into(),
        unit: (),
    };
    let xml = encode(&order);
    assert_eq!(decode::<Order>(&xml).unwrap(), order, "{xml}");
    assert_eq!(decode::<u128>(&encode(&u128::MAX)).unwrap(), u128::MAX);
    assert_eq!(decode::<i128>(&encode(&i128::MIN)).unwrap(), i128::MIN);
    assert!(decode::<f64>(&encode(&f64::NAN)).unwrap().is_nan());
    assert_eq!(
        decode::<f32>(&encode(&f32::INFINITY)).unwrap(),
        f32::INFINITY
    );
    assert_eq!(decode::<Option<u8>>(&encode(&Some(5u8))).unwrap(), Some(5));
    assert_eq!(decode::<char>(&encode(&'\u{0}')).unwrap(), '\u{0}');
    // Whitespace between elements is allowed; inside <str> it is data.
    let spaced = "<seq>\n  <str> a </str>\n  <int>1</int>\n</seq>";
    assert_eq!(decode::<(String, u8)>(spaced).unwrap(), (" a ".into(), 1));
    // Self-describing: any payload can be skipped without its type.
    decode::<serde::de::IgnoredAny>(&xml).unwrap();
}

#[test]
fn data_that_looks_like_a_reference_stays_data() {
    // A user string holding the text of a reference is escaped text in a <str>.
    assert_eq!(
        encode(&"<ref>0</ref>"),
        "<str>&lt;ref&gt;0&lt;/ref&gt;</str>"
    );
    // A <ref> where the type expects data is an error, not data.
    let e = decode::<u32>("<ref>0</ref>").unwrap_err();
    assert!(e.to_string().contains("reference"), "{e}");
}

#[test]
fn malformed_input_is_a_decode_error_without_panic() {
    let cases = [
        "",
        "<int>1",
        "<int>1</str>",
        "<int>x</int>",
        "<foo/>",
        "<seq><int>1</int>",
        "<str>a</str><str>b</str>",
        "text",
        "<!DOCTYPE x [<!ENTITY a \"aaaa\">]><str>&a;</str>",
        "<!-- c --><unit/>",
        "<?xml version=\"1.0\"?><unit/>",
        "<str>&unknown;</str>",
        "<str>&#0;</str>",
        "<str>&#xFFFFFFFF;</str>",
        "<bytes>!!!</bytes>",
        "<str encoding=\"base64\">//8=</str>",
        "<field name=\"a\"><unit/></field>",
        "<variant name=\"X\"/>",
        "<struct><int>1</int></struct>",
        "<int a=\"1\">1</int>",
        "<map><int>1</int></map>",
    ];
    for bad in cases {
        let e = decode::<serde::de::IgnoredAny>(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode, "{bad}");
    }
    let deep = format!("{}<unit/>{}", "<seq>".repeat(300), "</seq>".repeat(300));
    let e = decode::<serde::de::IgnoredAny>(&deep).unwrap_err();
    assert!(e.to_string().contains("128"), "{e}");
    // More elements than the type reads.
    assert!(decode::<(u8,)>("<seq><int>1</int><int>2</int></seq>").is_err());
    // Every prefix and many single-byte mutations of a valid message.
    let good = encode(&Order {
        id: 1,
        customer: "c".into(),
        tags: vec!["t".into()],
        amount: -1,
        note: Some("n".into()),
        payload: vec![1, 2, 3],
        shapes: vec![Shape::Line(1, 2)],
        extra: [(1, true)].into(),
        unit: (),
    })
    .into_bytes();
    for n in 0..good.len() {
        assert!(
            libchan_test_support::decode::<Order>(&Xml, &good[..n]).is_err(),
            "prefix {n}"
        );
    }
    for i in 0..good.len() {
        for v in [b'<', b'>', b'/', b'&', b'"', b'x', 0x00, 0xff] {
            let mut m = good.clone();
            m[i] = v;
            let _ = libchan_test_support::decode::<Order>(&Xml, &m);
            let _ = libchan_test_support::decode::<serde::de::IgnoredAny>(&Xml, &m);
        }
    }
}
