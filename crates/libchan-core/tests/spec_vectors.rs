//! The hex test vectors of docs/PROTOCOL.md are produced by this crate's encoders and
//! decode back to the frames the document describes, so the spec cannot drift from the
//! code.

use std::collections::BTreeMap;

use bytes::BytesMut;
use libchan_core::frame::{self, Frame, Hello, Reason, StreamKind};
use libchan_core::message::{OutMessage, OutRef, RefKind, WireRef};
use libchan_core::mux::{Mux, Role};
use libchan_core::{Codec, Limits};

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|t| u8::from_str_radix(t, 16).expect("hex byte"))
        .collect()
}

fn default_hello(role: u8) -> Hello {
    Hello::new(role, &Limits::default(), vec!["cbor".into()])
}

/// A dialer Mux that has completed its handshake with a default listener.
fn dialer() -> Mux {
    let mut m = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    let mut out = BytesMut::new();
    m.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    let mut hello = BytesMut::new();
    frame::encode_hello(&mut hello, &default_hello(2));
    m.handle_input(&mut hello, &mut Vec::new()).expect("hello");
    m
}

fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    libchan_codec_cbor::Cbor.encode(v, &mut out).expect("cbor");
    out
}

/// Every vector, by name, as the code produces it.
fn vectors() -> BTreeMap<&'static str, Vec<u8>> {
    let mut v = BTreeMap::new();
    let mut b = BytesMut::new();
    frame::encode_hello(&mut b, &default_hello(1));
    v.insert("hello-dialer", b.to_vec());

    let mut b = BytesMut::new();
    frame::encode_open(&mut b, 1, StreamKind::OpenerSends, 0);
    v.insert("open-top-level", b.to_vec());

    // A message `7u32` on stream 1, produced by the real send path.
    let mut m = dialer();
    let id = m.open(StreamKind::OpenerSends).expect("open");
    assert_eq!(id, 1);
    let mut buf = OutMessage::start(Vec::new());
    buf.extend_from_slice(&cbor(&7u32));
    m.send_message(id, OutMessage::finish(buf, vec![], vec![]))
        .expect("send");
    let mut out = BytesMut::new();
    m.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    v.insert("open-and-message-u32", out.to_vec());

    // A message carrying a new Sender reference: payload [ref 0], the referenced stream is
    // opened (parent 1) before the DATA.
    let mut buf = OutMessage::start(Vec::new());
    buf.extend_from_slice(&cbor(&vec![ciborium::tag::Required::<
        u32,
        { libchan_codec_cbor::REF_TAG },
    >(0)]));
    m.send_message(
        id,
        OutMessage::finish(buf, vec![OutRef::New(RefKind::Sender)], vec![]),
    )
    .expect("send");
    let mut out = BytesMut::new();
    m.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    v.insert("message-with-sender-ref", out.to_vec());

    // A message sending back the peer's stream 2 as a Sender, then the clean end.
    let mut buf = OutMessage::start(Vec::new());
    buf.extend_from_slice(&cbor(&ciborium::tag::Required::<
        u32,
        { libchan_codec_cbor::REF_TAG },
    >(0)));
    m.send_message(
        id,
        OutMessage::finish(
            buf,
            vec![OutRef::Existing(WireRef {
                kind: RefKind::Sender,
                id: 2,
            })],
            vec![],
        ),
    )
    .expect("send");
    m.finish(id);
    let mut out = BytesMut::new();
    m.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    v.insert("returned-sender-and-fin", out.to_vec());

    let mut b = BytesMut::new();
    frame::encode_credit(&mut b, 1, 65536);
    v.insert("credit", b.to_vec());
    let mut b = BytesMut::new();
    frame::encode_close(&mut b, 3, "disk full", 65536);
    v.insert("close-with-error", b.to_vec());
    let mut b = BytesMut::new();
    frame::encode_reset(&mut b, 3, Reason::CANCEL);
    v.insert("reset-cancel", b.to_vec());
    let mut b = BytesMut::new();
    frame::encode_ping(&mut b, false, 1);
    frame::encode_ping(&mut b, true, 1);
    v.insert("ping-and-ack", b.to_vec());
    let mut b = BytesMut::new();
    frame::encode_fds(&mut b, false);
    frame::encode_fds(&mut b, true);
    v.insert("fds-and-ack", b.to_vec());
    let mut b = BytesMut::new();
    frame::encode_goaway(&mut b, 4, Reason::NO_ERROR, "bye", 65536);
    v.insert("goaway", b.to_vec());
    v
}

/// Parses the vectors out of docs/PROTOCOL.md: a line `vector: NAME` followed by a fenced
/// block of hex bytes.
fn spec_vectors() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some(name) = l.trim().strip_prefix("vector: ") {
            let fence = lines.next().expect("fence");
            assert!(fence.starts_with("```"), "vector {name}: fence expected");
            let mut hex = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                let l = l.split('#').next().unwrap_or("");
                hex.push_str(l);
                hex.push(' ');
            }
            out.insert(name.trim().to_owned(), unhex(&hex));
        }
    }
    out
}

#[test]
fn spec_vectors_match_the_code() {
    let code = vectors();
    if std::env::var_os("PRINT_VECTORS").is_some() {
        for (k, v) in &code {
            println!("vector: {k}\n{}\n", hex(v));
        }
    }
    let spec = spec_vectors();
    for (name, bytes) in &code {
        let Some(s) = spec.get(*name) else {
            panic!("docs/PROTOCOL.md lacks vector {name}:\n{}", hex(bytes));
        };
        assert_eq!(
            hex(s),
            hex(bytes),
            "vector {name} in docs/PROTOCOL.md differs from the code"
        );
    }
    for name in spec.keys() {
        assert!(
            code.contains_key(name.as_str()),
            "unknown vector {name} in the spec"
        );
    }
}

#[test]
fn spec_vectors_decode_to_what_the_spec_says() {
    let spec = spec_vectors();
    let decode_all = |name: &str| {
        let mut b = BytesMut::from(&spec[name][..]);
        let mut frames = Vec::new();
        let first = name.starts_with("hello");
        while let Some(f) = frame::decode(&mut b, 65536, first && frames.is_empty()).expect("valid")
        {
            frames.push(f);
        }
        assert!(b.is_empty(), "{name}: trailing bytes");
        frames
    };
    assert_eq!(decode_all("hello-dialer"), [Frame::Hello(default_hello(1))]);
    let f = decode_all("message-with-sender-ref");
    assert!(matches!(
        f[0],
        Frame::Open {
            stream: 3,
            kind: StreamKind::OpenerReceives,
            parent: 1
        }
    ));
    assert_eq!(
        decode_all("close-with-error"),
        [Frame::Close {
            stream: 3,
            message: "disk full".into()
        }]
    );
    assert_eq!(
        decode_all("fds-and-ack"),
        [Frame::Fds { ack: false }, Frame::Fds { ack: true }]
    );
    assert_eq!(
        decode_all("goaway"),
        [Frame::GoAway {
            last_stream: 4,
            reason: Reason::NO_ERROR,
            message: "bye".into()
        }]
    );
}
