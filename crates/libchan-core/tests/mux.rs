//! Tests of the pure protocol state machine: two `Mux`es joined by a byte shuttle, and
//! hand-written frames for what a well-behaved peer never sends.

use std::task::{Context, Poll, Waker};

use bytes::{BufMut, BytesMut};
use libchan_core::frame::{self, Frame, Hello, Reason, StreamKind};
use libchan_core::message::{InMessage, OutMessage, OutRef, RefKind, WireRef};
use libchan_core::mux::{Mux, ReadTarget, Role};
use libchan_core::{ErrorKind, Limits};

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

struct Pair {
    a: Mux,
    b: Mux,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(Limits::default(), Limits::default())
    }

    fn with(la: Limits, lb: Limits) -> Pair {
        let mut p = Pair {
            a: Mux::new(Role::Dialer, la, vec!["cbor".into()]),
            b: Mux::new(Role::Listener, lb, vec!["cbor".into()]),
        };
        p.run();
        assert_eq!(p.a.codec(), Some("cbor"));
        p
    }

    /// Moves bytes both ways until both sides are quiet, `max` bytes per transmit.
    fn run_limited(&mut self, max: usize) {
        for _ in 0..100_000 {
            let mut ab = BytesMut::new();
            let mut ba = BytesMut::new();
            self.a.poll_transmit(&mut ab, &mut Vec::new(), max);
            self.b.poll_transmit(&mut ba, &mut Vec::new(), max);
            if ab.is_empty() && ba.is_empty() {
                return;
            }
            self.b
                .handle_input(&mut ab, &mut Vec::new())
                .expect("b input");
            self.a
                .handle_input(&mut ba, &mut Vec::new())
                .expect("a input");
        }
        panic!("no quiescence");
    }

    fn run(&mut self) {
        self.run_limited(1 << 20)
    }
}

fn message(payload: &[u8]) -> OutMessage {
    let mut b = OutMessage::start(Vec::new());
    b.extend_from_slice(payload);
    OutMessage::finish(b, vec![], vec![])
}

fn recv(m: &mut Mux, id: u32) -> Poll<Result<Option<InMessage>, libchan_core::Error>> {
    m.poll_recv(&mut cx(), id)
}

fn accept(m: &mut Mux) -> u32 {
    match m.poll_accept(&mut cx()) {
        Poll::Ready(Ok(Some(id))) => id,
        other => panic!("no accept: {other:?}"),
    }
}

#[test]
fn handshake_picks_the_dialers_first_common_codec() {
    let mut a = Mux::new(
        Role::Dialer,
        Limits::default(),
        vec!["json".into(), "cbor".into()],
    );
    let mut b = Mux::new(
        Role::Listener,
        Limits::default(),
        vec!["cbor".into(), "json".into()],
    );
    let (mut ab, mut ba) = (BytesMut::new(), BytesMut::new());
    a.poll_transmit(&mut ab, &mut Vec::new(), 1 << 20);
    b.poll_transmit(&mut ba, &mut Vec::new(), 1 << 20);
    b.handle_input(&mut ab, &mut Vec::new()).expect("b");
    a.handle_input(&mut ba, &mut Vec::new()).expect("a");
    assert_eq!(a.codec(), Some("json"));
    assert_eq!(b.codec(), Some("json"));
}

fn handshake_error(a: Mux, mut bytes: BytesMut) -> libchan_core::Error {
    let mut a = a;
    let e = a
        .handle_input(&mut bytes, &mut Vec::new())
        .expect_err("must fail");
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    // The failing side sends a GOAWAY that names the problem.
    let mut out = BytesMut::new();
    a.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    let mut first = true;
    let mut found = false;
    while let Some(f) = frame::decode(&mut out, 1 << 20, first).expect("own frames") {
        first = false;
        if let Frame::GoAway {
            reason, message, ..
        } = f
        {
            assert_eq!(reason, Reason::PROTOCOL);
            assert_eq!(message, e.message());
            found = true;
        }
    }
    assert!(found, "GOAWAY sent");
    e
}

fn hello(version: u16, role: u8, codecs: &[&str]) -> BytesMut {
    let mut h = Hello::new(
        role,
        &Limits::default(),
        codecs.iter().map(|c| c.to_string()).collect(),
    );
    h.version = version;
    let mut b = BytesMut::new();
    frame::encode_hello(&mut b, &h);
    b
}

fn dialer() -> Mux {
    Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()])
}

#[test]
fn codec_mismatch_names_both_sides() {
    let e = handshake_error(dialer(), hello(1, 2, &["json", "xml"]));
    assert_eq!(
        e.message(),
        r#"no common codec: ours ["cbor"], peer's ["json", "xml"]"#
    );
}

#[test]
fn version_mismatch_names_both_sides() {
    let e = handshake_error(dialer(), hello(2, 2, &["cbor"]));
    assert_eq!(e.message(), "protocol version mismatch: ours 1, peer's 2");
}

#[test]
fn same_role_is_refused() {
    let e = handshake_error(dialer(), hello(1, 1, &["cbor"]));
    assert!(e.message().contains("same role"), "{e}");
}

#[test]
fn garbage_instead_of_hello() {
    let e = handshake_error(dialer(), BytesMut::from(&b"SSH-2.0-OpenSSH_9.2\r\n"[..]));
    assert!(e.message().contains("expected a HELLO"), "{e}");
}

#[test]
fn bad_limits_in_hello() {
    let mut h = hello(1, 2, &["cbor"]);
    // initial_window (offset 9 + 16) = 1: below the minimum.
    h[25..29].copy_from_slice(&1u32.to_be_bytes());
    let e = handshake_error(dialer(), h);
    assert!(e.message().contains("initial_window 1"), "{e}");
}

#[test]
fn small_message_roundtrip_is_zero_copy_sized() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(id, message(b"hello")).expect("send");
    p.run();
    let bid = accept(&mut p.b);
    assert_eq!(bid, id);
    match recv(&mut p.b, id) {
        Poll::Ready(Ok(Some(m))) => assert_eq!(&m.payload[..], b"hello"),
        other => panic!("{other:?}"),
    }
    assert!(recv(&mut p.b, id).is_pending());
    p.a.finish(id);
    p.run();
    assert!(matches!(recv(&mut p.b, id), Poll::Ready(Ok(None))));
    assert!(matches!(recv(&mut p.b, id), Poll::Ready(Ok(None))));
}

#[test]
fn large_message_does_not_stall_other_streams() {
    let mut p = Pair::new();
    let big = p.a.open(StreamKind::OpenerSends).expect("open");
    let small = p.a.open(StreamKind::OpenerSends).expect("open");
    let payload = vec![7u8; 8 << 20];
    p.a.send_message(big, message(&payload)).expect("big");
    p.a.send_message(small, message(b"small")).expect("small");
    // Move at most 128 KiB per round: the small message must arrive while the big one is
    // still incomplete.
    let mut ab = BytesMut::new();
    p.a.poll_transmit(&mut ab, &mut Vec::new(), 128 * 1024);
    p.b.handle_input(&mut ab, &mut Vec::new()).expect("b");
    let (b1, b2) = (accept(&mut p.b), accept(&mut p.b));
    assert!(recv(&mut p.b, b1).is_pending(), "big not complete yet");
    assert!(matches!(recv(&mut p.b, b2), Poll::Ready(Ok(Some(_)))));
    // The big message completes, in frames no larger than max_frame_size.
    p.run_limited(128 * 1024);
    match recv(&mut p.b, b1) {
        Poll::Ready(Ok(Some(m))) => assert_eq!(m.payload.len(), payload.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn small_messages_in_a_row_are_copied_out_of_the_read_buffer_together() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    let sizes = [10, 0, 300, 40_000, 5, 6];
    for (i, &n) in sizes.iter().enumerate() {
        p.a.send_message(id, message(&pattern(id, i, n)))
            .expect("send");
    }
    let mut wire = BytesMut::new();
    p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let input = wire.as_ptr_range();
    let in_input = |b: &[u8]| b.as_ptr() >= input.start && b.as_ptr() < input.end;
    p.b.handle_input(&mut wire, &mut Vec::new()).expect("input");
    let bid = accept(&mut p.b);
    let got: Vec<InMessage> = (0..sizes.len())
        .map(|i| match recv(&mut p.b, bid) {
            Poll::Ready(Ok(Some(m))) => m,
            other => panic!("message {i}: {other:?}"),
        })
        .collect();
    for (i, m) in got.iter().enumerate() {
        assert!(m.payload[..] == pattern(id, i, sizes[i])[..], "message {i}");
    }
    // The first three share one copy, back to back with their headers between them...
    for i in [0, 1, 2] {
        assert!(
            !in_input(&got[i].payload),
            "message {i} pins the read buffer"
        );
    }
    for i in [1, 2] {
        let prev = &got[i - 1].payload;
        assert_eq!(
            got[i].payload.as_ptr() as usize,
            prev.as_ptr() as usize + prev.len() + 8,
            "message {i} follows message {} in one copy",
            i - 1
        );
    }
    // ...the large one stays a slice of the read buffer, and the last two are copied.
    assert!(
        in_input(&got[3].payload),
        "a 40,000-byte body is not copied"
    );
    assert!(!in_input(&got[4].payload) && !in_input(&got[5].payload));
}

#[test]
fn frames_are_capped_at_64_kib_while_another_stream_waits() {
    let mut p = Pair::new();
    let peer_max = Limits::default().max_frame_size as usize;
    assert!(
        peer_max > 64 * 1024,
        "the default allows frames above 64 KiB"
    );
    let big = p.a.open(StreamKind::OpenerSends).expect("open");
    let small = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(big, message(&vec![7u8; 1 << 20]))
        .expect("big");
    // Above the size of messages sent straight into the outgoing frames: it is queued.
    p.a.send_message(small, message(&[5u8; 2000]))
        .expect("small");
    let frames = sent_frames(&mut p.a);
    let sizes: Vec<(u32, usize)> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data {
                stream, payload, ..
            } => Some((*stream, payload.len())),
            _ => None,
        })
        .collect();
    let small_at = sizes
        .iter()
        .position(|&(s, _)| s == small)
        .expect("the small message is sent in the same batch");
    // While `small` waits, `big` gets at most 64 KiB before it.
    let before: Vec<usize> = sizes[..small_at].iter().map(|&(_, n)| n).collect();
    assert!(
        !before.is_empty() && before.iter().all(|&n| n <= 64 * 1024),
        "frames of `big` before `small`: {before:?}"
    );
    // Alone, `big` uses frames up to the peer's max_frame_size (here: its remaining credit).
    let after: Vec<usize> = sizes[small_at + 1..]
        .iter()
        .filter(|&&(s, _)| s == big)
        .map(|&(_, n)| n)
        .collect();
    assert!(
        after.iter().any(|&n| n > 64 * 1024) && after.iter().all(|&n| n <= peer_max),
        "frames of `big` after `small`: {after:?}"
    );
}

#[test]
fn credit_bounds_what_is_sent_until_the_receiver_consumes() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    let window = Limits::default().initial_window as usize;
    let n = 3 * window / 1000;
    for _ in 0..n {
        p.a.send_message(id, message(&[1u8; 992])).expect("send");
    }
    p.run();
    let bid = accept(&mut p.b);
    // Without consumption, b holds at most a window's worth of complete messages.
    let mut got = 0;
    while let Poll::Ready(Ok(Some(_))) = recv(&mut p.b, bid) {
        got += 1;
        if got == 1 {
            // Stop consuming after one: check what arrived so far is bounded.
            break;
        }
    }
    let mut queued = 0;
    // Count what is queued by draining without running the shuttle.
    while let Poll::Ready(Ok(Some(_))) = recv(&mut p.b, bid) {
        queued += 1;
    }
    assert!(
        (queued + 1) * 1000 <= window + 1000,
        "{} messages buffered beyond the window",
        queued + 1
    );
    // Consuming released credit: the rest flows.
    p.run();
    let mut rest = 0;
    loop {
        match recv(&mut p.b, bid) {
            Poll::Ready(Ok(Some(_))) => rest += 1,
            _ => {
                p.run();
                if let Poll::Ready(Ok(Some(_))) = recv(&mut p.b, bid) {
                    rest += 1;
                    continue;
                }
                break;
            }
        }
    }
    assert_eq!(queued + 1 + rest, n);
}

/// Raw frames from a scripted peer to a listener Mux that has shaken hands.
fn scripted() -> Mux {
    let mut b = Mux::new(Role::Listener, Limits::default(), vec!["cbor".into()]);
    let mut h = hello(1, 1, &["cbor"]);
    b.handle_input(&mut h, &mut Vec::new()).expect("hello");
    let mut own_hello = BytesMut::new();
    b.poll_transmit(&mut own_hello, &mut Vec::new(), 1 << 20);
    b
}

fn data(stream: u32, fin: bool, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    frame::encode_data_header(&mut b, stream, payload.len(), fin);
    b.put_slice(payload);
    b
}

fn msg_bytes(payload: &[u8], refs: &[(u8, u32)], nfds: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&(refs.len() as u16).to_be_bytes());
    v.extend_from_slice(&nfds.to_be_bytes());
    v.extend_from_slice(payload);
    for (k, id) in refs {
        v.push(*k);
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

fn open(stream: u32, kind: StreamKind, parent: u32) -> BytesMut {
    let mut b = BytesMut::new();
    frame::encode_open(&mut b, stream, kind, parent);
    b
}

fn sent_frames(m: &mut Mux) -> Vec<Frame> {
    let mut out = BytesMut::new();
    m.poll_transmit(&mut out, &mut Vec::new(), 1 << 20);
    let mut v = Vec::new();
    while let Some(f) = frame::decode(&mut out, 1 << 24, false).expect("own frames") {
        v.push(f);
    }
    v
}

#[test]
fn data_on_a_never_opened_stream_is_a_connection_error() {
    let mut b = scripted();
    let e = b
        .handle_input(&mut data(5, false, b"x"), &mut Vec::new())
        .expect_err("error");
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.message().contains("never opened"), "{e}");
}

#[test]
fn non_increasing_ids_are_a_connection_error() {
    let mut b = scripted();
    b.handle_input(&mut open(5, StreamKind::OpenerSends, 0), &mut Vec::new())
        .expect("open 5");
    let e = b
        .handle_input(&mut open(3, StreamKind::OpenerSends, 0), &mut Vec::new())
        .expect_err("3 after 5");
    assert!(e.message().contains("not above"), "{e}");
    let mut b = scripted();
    let e = b
        .handle_input(&mut open(2, StreamKind::OpenerSends, 0), &mut Vec::new())
        .expect_err("even id from a dialer");
    assert!(e.message().contains("namespace"), "{e}");
}

#[test]
fn data_after_fin_resets_the_stream_only() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, true, &msg_bytes(&[0x07], &[], 0)));
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0x08], &[], 0)));
    input.extend_from_slice(&open(3, StreamKind::OpenerSends, 0));
    input.extend_from_slice(&data(3, false, &msg_bytes(&[0x09], &[], 0)));
    b.handle_input(&mut input, &mut Vec::new())
        .expect("session survives");
    assert!(sent_frames(&mut b).contains(&Frame::Reset {
        stream: 1,
        reason: Reason::PROTOCOL
    }));
    let id1 = accept(&mut b);
    let id3 = accept(&mut b);
    assert!(matches!(recv(&mut b, id1), Poll::Ready(Ok(Some(_)))));
    assert!(matches!(recv(&mut b, id1), Poll::Ready(Ok(None))));
    assert!(matches!(recv(&mut b, id3), Poll::Ready(Ok(Some(_)))));
}

#[test]
fn more_data_than_credit_resets_the_stream() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    // Five complete 60 KB messages, never consumed: 300 KB against a 256 KiB window.
    for _ in 0..5 {
        input.extend_from_slice(&data(1, false, &msg_bytes(&[0u8; 60_000], &[], 0)));
    }
    b.handle_input(&mut input, &mut Vec::new())
        .expect("session survives");
    let frames = sent_frames(&mut b);
    assert!(
        frames.contains(&Frame::Reset {
            stream: 1,
            reason: Reason::PROTOCOL
        }),
        "{frames:?}"
    );
    let id = accept(&mut b);
    // What arrived within credit is still delivered, then the error.
    let mut ok = 0;
    loop {
        match recv(&mut b, id) {
            Poll::Ready(Ok(Some(_))) => ok += 1,
            Poll::Ready(Err(e)) => {
                assert!(e.message().contains("credit"), "{e}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok, 0, "a flow-control violation discards the stream's data");
}

#[test]
fn oversized_message_is_skipped_and_reported() {
    let limits = Limits {
        max_message_size: 1024,
        ..Limits::default()
    };
    let mut b = Mux::new(Role::Listener, limits, vec!["cbor".into()]);
    b.handle_input(&mut hello(1, 1, &["cbor"]), &mut Vec::new())
        .expect("hello");
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, false, &msg_bytes(&[1u8; 5000], &[], 0)));
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0x07], &[], 0)));
    b.handle_input(&mut input, &mut Vec::new())
        .expect("survives");
    let id = accept(&mut b);
    match recv(&mut b, id) {
        Poll::Ready(Err(e)) => {
            assert!(e.is_limit());
            assert_eq!(
                e.message(),
                "max_message_size exceeded: 5008 > limit 1024",
                "names the limit and the value"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv(&mut b, id), Poll::Ready(Ok(Some(m))) if m.payload[..] == [7]));
}

#[test]
fn oversized_length_prefix_in_a_message_header_does_not_allocate() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    // Claims a 4 GiB payload; only 10 bytes follow.
    let mut m = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    m.extend_from_slice(&[0u8; 10]);
    input.extend_from_slice(&data(1, false, &m));
    b.handle_input(&mut input, &mut Vec::new())
        .expect("survives");
    let id = accept(&mut b);
    match recv(&mut b, id) {
        Poll::Ready(Err(e)) => assert!(e.is_limit(), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_split_across_frames_is_a_connection_error() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, false, &[0, 0, 0]));
    let e = b
        .handle_input(&mut input, &mut Vec::new())
        .expect_err("split header");
    assert!(e.message().contains("split"), "{e}");
}

#[test]
fn fds_announced_but_not_received_is_a_connection_error() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0xf6], &[(4, 0)], 1)));
    let e = b
        .handle_input(&mut input, &mut Vec::new())
        .expect_err("no fds arrived");
    assert!(
        e.message()
            .contains("announces 1 descriptors, 0 arrived (no FDS frame came first"),
        "{e}"
    );
}

#[test]
fn open_flood_beyond_max_streams_is_refused_and_the_session_survives() {
    let limits = Limits {
        max_streams: 10,
        ..Limits::default()
    };
    let mut b = Mux::new(Role::Listener, limits, vec!["cbor".into()]);
    b.handle_input(&mut hello(1, 1, &["cbor"]), &mut Vec::new())
        .expect("hello");
    b.poll_transmit(&mut BytesMut::new(), &mut Vec::new(), 1 << 20);
    let mut input = BytesMut::new();
    for i in 0..20u32 {
        input.extend_from_slice(&open(2 * i + 1, StreamKind::OpenerSends, 0));
    }
    b.handle_input(&mut input, &mut Vec::new())
        .expect("survives");
    let refused = sent_frames(&mut b)
        .into_iter()
        .filter(|f| matches!(f, Frame::Reset { reason, .. } if *reason == Reason::REFUSED))
        .count();
    assert_eq!(refused, 10);
    assert_eq!(b.stats().streams, 10);
}

#[test]
fn reference_to_a_stream_that_does_not_exist_fails_the_claim_only() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0xf6], &[(1, 99)], 0)));
    b.handle_input(&mut input, &mut Vec::new())
        .expect("survives");
    let id = accept(&mut b);
    let Poll::Ready(Ok(Some(m))) = recv(&mut b, id) else {
        panic!("message")
    };
    assert_eq!(m.refs[0].kind, RefKind::Sender);
    let e = b
        .claim(id, 99, StreamKind::OpenerReceives)
        .expect_err("unknown");
    assert!(e.is_decode(), "{e}");
}

#[test]
fn nested_streams_are_opened_before_the_message_in_increasing_order() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    let mut buf = OutMessage::start(Vec::new());
    buf.push(0xf6);
    let ids =
        p.a.send_message(
            id,
            OutMessage::finish(
                buf,
                vec![
                    OutRef::New(RefKind::Sender),
                    OutRef::New(RefKind::Receiver),
                    OutRef::New(RefKind::ByteStream),
                ],
                vec![],
            ),
        )
        .expect("send");
    assert_eq!(&ids[..], [3, 5, 7]);
    p.run();
    let bid = accept(&mut p.b);
    let Poll::Ready(Ok(Some(m))) = recv(&mut p.b, bid) else {
        panic!("message")
    };
    let kinds: Vec<_> = m.refs.iter().map(|r| (r.kind, r.id)).collect();
    assert_eq!(
        kinds,
        [
            (RefKind::Sender, 3),
            (RefKind::Receiver, 5),
            (RefKind::ByteStream, 7)
        ]
    );
    p.b.claim(bid, 3, StreamKind::OpenerReceives)
        .expect("claim 3");
    p.b.claim(bid, 5, StreamKind::OpenerSends).expect("claim 5");
    // Wrong kind for 7: a decode error, and it stays claimable correctly.
    assert!(p.b.claim(bid, 7, StreamKind::OpenerSends).is_err());
    p.b.claim(bid, 7, StreamKind::Bytes).expect("claim 7");
    assert!(
        p.b.claim(bid, 7, StreamKind::Bytes).is_err(),
        "claimed twice"
    );
}

#[test]
fn ping_is_answered() {
    let mut b = scripted();
    let mut input = BytesMut::new();
    frame::encode_ping(&mut input, false, 42);
    b.handle_input(&mut input, &mut Vec::new()).expect("ping");
    assert_eq!(
        sent_frames(&mut b),
        [Frame::Ping {
            ack: true,
            opaque: 42
        }]
    );
}

/// A message with descriptors, as the session layer builds one.
fn message_with_fd(payload: &[u8]) -> OutMessage {
    let fd = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
    let mut b = OutMessage::start(Vec::new());
    b.extend_from_slice(payload);
    OutMessage::finish(
        b,
        vec![OutRef::Existing(WireRef {
            kind: RefKind::Fd,
            id: 0,
        })],
        vec![fd],
    )
}

/// Transmits what `m` has, returning the frames and the descriptors that go with them.
fn sent_frames_and_fds(m: &mut Mux) -> (Vec<Frame>, usize) {
    let mut out = BytesMut::new();
    let mut fds = Vec::new();
    m.poll_transmit(&mut out, &mut fds, 1 << 20);
    let mut v = Vec::new();
    while let Some(f) = frame::decode(&mut out, 1 << 24, false).expect("own frames") {
        v.push(f);
    }
    (v, fds.len())
}

#[test]
fn a_message_with_descriptors_waits_for_the_answer_to_fds_and_others_do_not() {
    let mut p = Pair::new();
    let with_fd = p.a.open(StreamKind::OpenerSends).expect("open");
    let plain = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(with_fd, message(b"before"))
        .expect("before");
    p.a.send_message(with_fd, message_with_fd(b"fd"))
        .expect("with fd");
    p.a.send_message(plain, message(b"plain")).expect("plain");
    // What precedes the message on its stream goes, the other stream goes, and FDS asks
    // the peer; no descriptor leaves yet.
    let (frames, nfds) = sent_frames_and_fds(&mut p.a);
    assert_eq!(nfds, 0, "a descriptor went before the answer");
    let data_on = |frames: &[Frame], id: u32| {
        frames
            .iter()
            .filter(|f| matches!(f, Frame::Data { stream, .. } if *stream == id))
            .count()
    };
    assert_eq!(data_on(&frames, with_fd), 1, "{frames:?}");
    assert_eq!(data_on(&frames, plain), 1, "{frames:?}");
    assert_eq!(
        frames
            .iter()
            .filter(|f| **f == Frame::Fds { ack: false })
            .count(),
        1,
        "{frames:?}"
    );
    // More on the held stream waits behind it; FDS is not asked twice.
    p.a.send_message(with_fd, message(b"after")).expect("after");
    let (frames, nfds) = sent_frames_and_fds(&mut p.a);
    assert_eq!((frames.len(), nfds), (0, 0), "{frames:?}");
    // The peer's answer releases the stream: the message goes with its descriptor.
    let mut ack = BytesMut::new();
    frame::encode_fds(&mut ack, true);
    p.a.handle_input(&mut ack, &mut Vec::new()).expect("ack");
    let (frames, nfds) = sent_frames_and_fds(&mut p.a);
    assert_eq!(nfds, 1);
    assert_eq!(data_on(&frames, with_fd), 1, "{frames:?}");
    // Later descriptors go at once.
    p.a.send_message(with_fd, message_with_fd(b"fd2"))
        .expect("second fd");
    let (frames, nfds) = sent_frames_and_fds(&mut p.a);
    assert_eq!((data_on(&frames, with_fd), nfds), (1, 1), "{frames:?}");
}

#[test]
fn fds_is_answered_once_and_tells_the_driver_to_read_descriptors() {
    let mut b = scripted();
    assert!(!b.take_fds_asked());
    let mut input = BytesMut::new();
    frame::encode_fds(&mut input, false);
    frame::encode_fds(&mut input, false);
    // An answer nobody asked for is ignored.
    frame::encode_fds(&mut input, true);
    b.handle_input(&mut input, &mut Vec::new()).expect("fds");
    assert!(b.take_fds_asked());
    assert!(!b.take_fds_asked(), "told once");
    assert_eq!(sent_frames(&mut b), [Frame::Fds { ack: true }]);
}

#[test]
fn fds_with_a_payload_or_on_a_stream_is_a_connection_error() {
    for (stream, len) in [(0u32, 1usize), (1, 0)] {
        let mut b = scripted();
        let mut input = BytesMut::new();
        input.put_uint(len as u64, 3);
        input.put_u8(0x8);
        input.put_u8(0);
        input.put_u32(stream);
        input.put_bytes(0, len);
        let e = b
            .handle_input(&mut input, &mut Vec::new())
            .expect_err("bad FDS");
        assert!(e.message().contains("FDS must be on stream 0"), "{e}");
    }
}

#[test]
fn connection_loss_delivers_received_messages_then_the_error() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0x07], &[], 0)));
    b.handle_input(&mut input, &mut Vec::new()).expect("input");
    b.handle_eof();
    let id = accept(&mut b);
    assert!(matches!(recv(&mut b, id), Poll::Ready(Ok(Some(_)))));
    match recv(&mut b, id) {
        Poll::Ready(Err(e)) => assert!(e.is_connection_lost(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(b.poll_accept(&mut cx()), Poll::Ready(Err(e)) if e.is_connection_lost()));
}

#[test]
fn stats_return_to_zero_after_streams_end() {
    let mut p = Pair::new();
    for _ in 0..100 {
        let id = p.a.open(StreamKind::OpenerSends).expect("open");
        p.a.send_message(id, message(b"x")).expect("send");
        p.a.finish(id);
        p.a.release(id);
        p.run();
        let bid = accept(&mut p.b);
        assert!(matches!(recv(&mut p.b, bid), Poll::Ready(Ok(Some(_)))));
        assert!(matches!(recv(&mut p.b, bid), Poll::Ready(Ok(None))));
        p.b.release(bid);
        p.run();
    }
    assert_eq!(p.a.stats().streams, 0);
    assert_eq!(p.b.stats().streams, 0);
}

#[test]
fn a_batch_ending_just_short_of_a_header_does_not_spin() {
    // Stream 1's message leaves fewer than 8 bytes in the batch; stream 3's next message
    // header cannot be split, so the batch must end there and stream 3 go next time.
    for short in 1..9usize {
        let mut p = Pair::new();
        let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
        let s3 = p.a.open(StreamKind::OpenerSends).expect("open");
        let mut flush = BytesMut::new();
        p.a.poll_transmit(&mut flush, &mut Vec::new(), 1 << 20);
        p.b.handle_input(&mut flush, &mut Vec::new())
            .expect("opens");
        // Messages above the size sent straight into the outgoing frames: both queued.
        let max = 3000;
        // One DATA frame: 9 header + 8 message header + payload.
        let payload = max - short - 9 - 8;
        p.a.send_message(s1, message(&vec![1u8; payload]))
            .expect("send");
        let next = vec![3u8; 1100];
        p.a.send_message(s3, message(&next)).expect("send");
        let mut out = BytesMut::new();
        p.a.poll_transmit(&mut out, &mut Vec::new(), max);
        assert!(out.len() <= max + 9 + 8, "short {short}: {}", out.len());
        p.b.handle_input(&mut out, &mut Vec::new()).expect("input");
        p.run();
        let (b1, b3) = (accept(&mut p.b), accept(&mut p.b));
        assert!(matches!(recv(&mut p.b, b1), Poll::Ready(Ok(Some(_)))));
        assert!(
            matches!(recv(&mut p.b, b3), Poll::Ready(Ok(Some(m))) if m.payload[..] == next[..])
        );
    }
}

#[test]
fn session_buffer_bounds_partial_messages_and_one_still_completes() {
    let lb = Limits {
        max_session_buffer: 1 << 20,
        ..Limits::default()
    };
    let window = lb.initial_window as usize;
    let mut p = Pair::with(Limits::default(), lb);
    let n = 4;
    let ids: Vec<u32> = (0..n)
        .map(|_| p.a.open(StreamKind::OpenerSends).expect("open"))
        .collect();
    for id in &ids {
        p.a.send_message(*id, message(&vec![9u8; 3 << 20]))
            .expect("send");
    }
    p.run_limited(64 * 1024);
    // Never consumed: what b holds stays within the budget plus a window per stream
    // (and the one message allowed to complete beyond it).
    assert!(
        p.b.held() <= (1 << 20) + n * window + (3 << 20) + 2 * 64 * 1024,
        "held {}",
        p.b.held()
    );
    // Consuming what completes lets every message through, one after another.
    let bids: Vec<u32> = (0..n).map(|_| accept(&mut p.b)).collect();
    let mut done = vec![false; n];
    for _ in 0..1000 {
        for (i, id) in bids.iter().enumerate() {
            if !done[i] {
                if let Poll::Ready(Ok(Some(m))) = recv(&mut p.b, *id) {
                    assert_eq!(m.payload.len(), 3 << 20);
                    done[i] = true;
                }
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        p.run_limited(64 * 1024);
    }
    assert!(done.iter().all(|d| *d), "no deadlock: {done:?}");
    assert_eq!(p.b.held(), 0);
}

#[test]
fn streams_opened_for_messages_that_never_came_are_released_when_the_channel_ends() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    // Two nested streams announced for channel 1; only one message, referencing one.
    input.extend_from_slice(&open(3, StreamKind::OpenerReceives, 1));
    input.extend_from_slice(&open(5, StreamKind::OpenerReceives, 1));
    input.extend_from_slice(&data(1, false, &msg_bytes(&[0xf6], &[(1, 3)], 0)));
    input.extend_from_slice(&data(1, true, &[]));
    b.handle_input(&mut input, &mut Vec::new()).expect("input");
    let id = accept(&mut b);
    let Poll::Ready(Ok(Some(m))) = recv(&mut b, id) else {
        panic!("message")
    };
    b.claim(id, 3, StreamKind::OpenerReceives).expect("claim 3");
    b.release_refs(&m.refs);
    assert!(matches!(recv(&mut b, id), Poll::Ready(Ok(None))));
    // Stream 5 can never be claimed now: it is released (we would have sent on it, so
    // the peer sees its end) and gone; 3 stays (claimed).
    let frames = sent_frames(&mut b);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            Frame::Data {
                stream: 5,
                fin: true,
                ..
            }
        )),
        "{frames:?}"
    );
    assert!(b.claim(id, 5, StreamKind::OpenerReceives).is_err());
    b.release(id);
    b.release(3);
    sent_frames(&mut b); // 3's FIN goes out
    assert_eq!(b.stats().streams, 0, "{:?}", b.stats());
}

/// A batch for a vectored write (large pieces referenced, not copied) puts exactly the
/// bytes of a copied batch on the wire, in the same order, whatever the batch limit.
#[test]
fn batches_by_reference_match_copied_batches() {
    use libchan_core::mux::Batch;
    for max in [300, 5_000, 70_000, 1 << 20] {
        let mut copied = Pair::new();
        let mut referenced = Pair::new();
        let sizes = [3usize, 4_096, 10, 100_000, 5_000, 1, 150_000, 4_095];
        for p in [&mut copied, &mut referenced] {
            let x = p.a.open(StreamKind::OpenerSends).expect("open");
            let y = p.a.open(StreamKind::OpenerSends).expect("open");
            for (i, n) in sizes.iter().enumerate() {
                let body: Vec<u8> = (0..*n).map(|k| (k * 7 + i) as u8).collect();
                let id = if i % 2 == 0 { x } else { y };
                p.a.send_message(id, message(&body)).expect("send");
            }
        }
        let mut rounds = 0;
        loop {
            let mut flat = BytesMut::new();
            copied.a.poll_transmit(&mut flat, &mut Vec::new(), max);
            let mut batch = Batch::new(64);
            referenced
                .a
                .poll_transmit_batch(&mut batch, &mut Vec::new(), max);
            let len = batch.len();
            let mut pieces = std::collections::VecDeque::new();
            batch.take_pieces(&mut pieces);
            assert!(batch.is_empty());
            let mut joined = BytesMut::new();
            for p in &pieces {
                joined.extend_from_slice(p);
            }
            assert_eq!(joined.len(), len);
            assert_eq!(joined, flat, "max {max}, round {rounds}");
            if max >= 5_000 && flat.len() > 20_000 {
                assert!(pieces.len() > 1, "large pieces were copied (max {max})");
            }
            if flat.is_empty() {
                break;
            }
            // Both peers see the same bytes and grant the same credit.
            let mut again = flat.clone();
            copied
                .b
                .handle_input(&mut flat, &mut Vec::new())
                .expect("b");
            referenced
                .b
                .handle_input(&mut again, &mut Vec::new())
                .expect("b");
            for p in [&mut copied, &mut referenced] {
                let mut ba = BytesMut::new();
                p.b.poll_transmit(&mut ba, &mut Vec::new(), 1 << 20);
                p.a.handle_input(&mut ba, &mut Vec::new()).expect("a");
            }
            rounds += 1;
            assert!(rounds < 10_000, "no end");
        }
        // Everything arrived, intact and in order, at the peer of the batched side.
        let x = accept(&mut referenced.b);
        let y = accept(&mut referenced.b);
        for (i, n) in sizes.iter().enumerate() {
            let id = if i % 2 == 0 { x } else { y };
            let Poll::Ready(Ok(Some(m))) = recv(&mut referenced.b, id) else {
                panic!("message {i} missing");
            };
            let body: Vec<u8> = (0..*n).map(|k| (k * 7 + i) as u8).collect();
            assert_eq!(&m.payload[..], &body[..], "message {i}");
        }
    }
}

/// `poll_recv_batch` hands out further plain messages in order, stops before a message
/// with references (only the message asked for may have some) and at its byte bound.
#[test]
fn receive_batches_are_ordered_bounded_and_stop_at_references() {
    use libchan_core::mux::{RECV_BATCH, RECV_BATCH_BYTES};
    use std::collections::VecDeque;
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    // Two full batches and 10 more small ones, one with a reference, 10 of 4 KiB.
    let small = 2 * (RECV_BATCH + 1) + 10;
    let tag = |i: usize| (i as u16).to_be_bytes().repeat(5);
    for i in 0..small {
        p.a.send_message(id, message(&tag(i))).expect("send");
    }
    let mut b = OutMessage::start(Vec::new());
    b.extend_from_slice(b"with a ref");
    p.a.send_message(
        id,
        OutMessage::finish(b, vec![OutRef::New(RefKind::Sender)], vec![]),
    )
    .expect("send");
    for i in 0..10u8 {
        p.a.send_message(id, message(&[i; 4096])).expect("send");
    }
    p.run();
    let bid = accept(&mut p.b);
    let mut got: Vec<InMessage> = Vec::new();
    let mut batches = Vec::new();
    loop {
        let mut more = VecDeque::new();
        match p.b.poll_recv_batch(&mut cx(), bid, &mut more) {
            Poll::Ready(Ok(Some(m))) => {
                assert!(more.len() <= RECV_BATCH);
                let bytes: usize = more.iter().map(|m| m.payload.len() + 8).sum();
                assert!(
                    bytes < RECV_BATCH_BYTES + 4096 + 8,
                    "{bytes} bytes in one batch"
                );
                assert!(more.iter().all(|m| m.refs.is_empty()));
                // Reserved for what it holds, not grown by doubling (a receiver keeps it).
                assert_eq!(more.capacity(), more.len(), "batch queue capacity");
                batches.push(1 + more.len());
                got.push(m);
                got.extend(more);
            }
            Poll::Pending => break,
            other => panic!("{other:?}"),
        }
        p.run();
    }
    assert_eq!(got.len(), small + 11);
    for (i, m) in got[..small].iter().enumerate() {
        assert_eq!(&m.payload[..], &tag(i)[..], "message {i}");
    }
    assert_eq!(got[small].refs.len(), 1);
    assert_eq!(&got[small].payload[..], b"with a ref");
    for (i, m) in got[small + 1..].iter().enumerate() {
        assert_eq!(&m.payload[..], &[i as u8; 4096][..]);
    }
    // The plain messages in batches of at most 1 + RECV_BATCH; a batch stops before the
    // message with a reference, which starts the next one; 4 KiB messages go a few at a
    // time (the byte bound).
    let full = RECV_BATCH + 1;
    assert_eq!(&batches[..3], &[full, full, 10], "{batches:?}");
    let per_bytes = RECV_BATCH_BYTES / (4096 + 8) + 2;
    assert!(batches[3..].iter().all(|&n| n <= per_bytes), "{batches:?}");
    assert!(
        batches.len() > 4,
        "the byte bound split the 4 KiB ones: {batches:?}"
    );
    assert_eq!(batches.iter().sum::<usize>(), small + 11);
}

/// Small messages queued back to back share one buffer; cut into frames anywhere (by
/// the batch size, the frame size and the credit) none of their headers is split across
/// DATA frames, which the receiver would take as a protocol error.
#[test]
fn small_messages_queued_together_are_never_cut_inside_a_header() {
    const N: u32 = 2000;
    let limits = Limits {
        initial_window: Limits::MIN_WINDOW,
        max_frame_size: Limits::MIN_FRAME_SIZE,
        ..Limits::default()
    };
    for max in [30, 37, 100, 1000, 4099, 1 << 20] {
        let mut p = Pair::with(limits.clone(), limits.clone());
        let id = p.a.open(StreamKind::OpenerSends).expect("open");
        for i in 0..N {
            let len = (i * 37 % 301) as usize;
            p.a.send_message(id, message(&vec![i as u8; len]))
                .expect("send");
        }
        p.run_limited(max);
        let bid = accept(&mut p.b);
        let mut got = 0u32;
        for _ in 0..100_000 {
            while let Poll::Ready(Ok(Some(m))) = recv(&mut p.b, bid) {
                let len = (got * 37 % 301) as usize;
                assert_eq!(&m.payload[..], &vec![got as u8; len][..], "message {got}");
                got += 1;
            }
            if got == N {
                break;
            }
            p.run_limited(max);
        }
        assert_eq!(got, N, "batches of {max} bytes");
    }
}

/// A receiving driver that reads where the mux says ([`Mux::next_read`]), in chunks of
/// pseudo-random sizes, from `wire`. Returns the bytes that went straight into bodies.
fn feed_directed(m: &mut Mux, wire: &mut BytesMut, buf: &mut BytesMut, seed: &mut u64) -> usize {
    const CHUNKS: [usize; 7] = [1, 5, 9, 100, 4096, 65_536, 300_000];
    feed_with(m, wire, buf, || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        CHUNKS[(*seed >> 33) as usize % CHUNKS.len()]
    })
}

/// Reads `wire` into `m` where it says, each read at most `chunk()` bytes, until `wire`
/// is empty; returns the bytes read straight into bodies.
fn feed_with(
    m: &mut Mux,
    wire: &mut BytesMut,
    buf: &mut BytesMut,
    mut chunk: impl FnMut() -> usize,
) -> usize {
    let mut direct = 0;
    loop {
        let chunk = chunk();
        match m.next_read(buf) {
            ReadTarget::Buffer(limit) => {
                let k = chunk.min(limit.unwrap_or(usize::MAX)).min(wire.len());
                if k == 0 {
                    return direct;
                }
                buf.extend_from_slice(&wire.split_to(k));
                m.handle_input(buf, &mut Vec::new()).expect("input");
            }
            ReadTarget::Body(mut region) => {
                let room = region.capacity() - region.len();
                assert!(room > 0, "a body target without room");
                let k = chunk.min(room).min(wire.len());
                region.extend_from_slice(&wire.split_to(k));
                direct += k;
                m.handle_body_input(region, buf, &mut Vec::new())
                    .expect("body input");
                if k == 0 {
                    return direct;
                }
            }
        }
    }
}

fn pattern(stream: u32, i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| {
            (j as u32)
                .wrapping_mul(31)
                .wrapping_add(stream * 7 + i as u32) as u8
        })
        .collect()
}

#[test]
fn large_bodies_read_straight_into_place_arrive_intact() {
    const SIZES: [usize; 6] = [100 * 1024, 10, 300 * 1024 + 7, 70_000, 5, 1 << 20];
    for seed0 in 0..4u64 {
        let mut p = Pair::new();
        let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
        let s2 = p.a.open(StreamKind::OpenerSends).expect("open");
        let mut sent = 0;
        let (mut wire, mut buf, mut seed) = (BytesMut::new(), BytesMut::new(), seed0);
        let (mut got1, mut got2, mut direct) = (0, 0, 0);
        let (mut b1, mut b2) = (None, None);
        let mut ended = false;
        for _ in 0..100_000 {
            // Keep a few messages queued on each stream.
            while sent < 24 && p.a.stats().streams > 0 {
                let (id, i) = if sent % 2 == 0 {
                    (s1, sent / 2)
                } else {
                    (s2, sent / 2)
                };
                let len = SIZES[i % SIZES.len()];
                p.a.send_message(id, message(&pattern(id, i, len)))
                    .expect("send");
                sent += 1;
                if sent == 24 {
                    p.a.finish(s1);
                    p.a.finish(s2);
                }
            }
            p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
            direct += feed_directed(&mut p.b, &mut wire, &mut buf, &mut seed);
            let mut back = BytesMut::new();
            p.b.poll_transmit(&mut back, &mut Vec::new(), 1 << 20);
            p.a.handle_input(&mut back, &mut Vec::new())
                .expect("credit");
            while let Poll::Ready(Ok(Some(id))) = p.b.poll_accept(&mut cx()) {
                if b1.is_none() {
                    b1 = Some(id);
                } else {
                    b2 = Some(id);
                }
            }
            for (bid, got, sid) in [(b1, &mut got1, s1), (b2, &mut got2, s2)] {
                let Some(bid) = bid else { continue };
                loop {
                    match recv(&mut p.b, bid) {
                        Poll::Ready(Ok(Some(m))) => {
                            let len = SIZES[*got % SIZES.len()];
                            assert!(
                                m.payload[..] == pattern(sid, *got, len)[..],
                                "stream {sid} message {got} (seed {seed0})"
                            );
                            *got += 1;
                        }
                        Poll::Ready(Ok(None)) => {
                            if bid == b2.unwrap_or(0) {
                                ended = true;
                            }
                            break;
                        }
                        Poll::Ready(Err(e)) => panic!("stream {sid}: {e}"),
                        Poll::Pending => break,
                    }
                }
            }
            if got1 == 12 && got2 == 12 && ended {
                break;
            }
        }
        assert_eq!((got1, got2), (12, 12), "seed {seed0}");
        assert!(ended, "the end after a large body arrives");
        let large: usize = (0..24)
            .map(|i| SIZES[(i / 2) % SIZES.len()])
            .filter(|&n| n >= 65_536)
            .sum();
        assert!(
            direct >= large / 2,
            "only {direct} of {large} bytes of large bodies were read straight into them"
        );
        assert_eq!(p.b.held(), 0);
    }
}

/// Reads `wire` into `m` where it says, `first` bytes through the buffer first; returns the
/// bytes read straight into bodies.
fn feed_after(m: &mut Mux, wire: &mut BytesMut, buf: &mut BytesMut, first: usize) -> usize {
    let mut first = Some(first);
    feed_with(m, wire, buf, || first.take().unwrap_or(usize::MAX))
}

#[test]
fn a_large_body_that_begins_in_a_frames_first_part_is_read_straight_into_place() {
    // Small messages, then a large one, in one frame of which only the first part has
    // arrived: the rest of that frame goes straight into the large body.
    let mut p = Pair::new();
    let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
    for i in 0..3 {
        p.a.send_message(s1, message(&pattern(s1, i, 100)))
            .expect("send");
    }
    let large = pattern(s1, 3, 200_000);
    p.a.send_message(s1, message(&large)).expect("send");
    let mut wire = BytesMut::new();
    p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let mut buf = BytesMut::new();
    let direct = feed_after(&mut p.b, &mut wire, &mut buf, 2000);
    assert!(
        direct > 190_000,
        "{direct} of 200,000 bytes read straight into the body"
    );
    let bid = accept(&mut p.b);
    for i in 0..3 {
        match recv(&mut p.b, bid) {
            Poll::Ready(Ok(Some(m))) => assert!(m.payload[..] == pattern(s1, i, 100)[..]),
            other => panic!("message {i}: {other:?}"),
        }
    }
    match recv(&mut p.b, bid) {
        Poll::Ready(Ok(Some(m))) => assert!(m.payload[..] == large[..], "large body"),
        other => panic!("large message: {other:?}"),
    }
    assert_eq!(p.b.held(), 0);
}

#[test]
fn a_large_body_in_a_frames_first_part_without_room_in_the_reserve_comes_through_the_buffer() {
    // The session's reserve for bodies allocated ahead is too small for this one: the rest
    // of its frame is read through the buffer, and everything arrives.
    let lb = Limits {
        max_session_buffer: 100_000,
        ..Limits::default()
    };
    let mut p = Pair::with(Limits::default(), lb);
    let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
    let sizes = [100, 200_000, 100];
    for (i, &n) in sizes.iter().enumerate() {
        p.a.send_message(s1, message(&pattern(s1, i, n)))
            .expect("send");
    }
    let mut wire = BytesMut::new();
    p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let mut buf = BytesMut::new();
    let direct = feed_after(&mut p.b, &mut wire, &mut buf, 2000);
    assert_eq!(
        direct, 0,
        "no body buffer allocated ahead beyond the reserve"
    );
    let bid = accept(&mut p.b);
    for (i, &n) in sizes.iter().enumerate() {
        match recv(&mut p.b, bid) {
            Poll::Ready(Ok(Some(m))) => assert!(m.payload[..] == pattern(s1, i, n)[..]),
            other => panic!("message {i}: {other:?}"),
        }
    }
    assert!(p.b.lost().is_none());
}

#[test]
fn a_stream_released_during_a_direct_read_drops_its_bytes_and_the_session_goes_on() {
    let mut p = Pair::new();
    let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(s1, message(&pattern(s1, 0, 1 << 20)))
        .expect("send");
    let mut wire = BytesMut::new();
    p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let mut buf = BytesMut::new();
    // Header and the first part through the buffer, then a direct read in progress.
    let mut target = p.b.next_read(&mut buf);
    let mut guard = 0;
    let region = loop {
        guard += 1;
        assert!(guard < 100, "no direct read offered");
        match target {
            ReadTarget::Buffer(limit) => {
                let k = limit.unwrap_or(20_000).min(wire.len());
                buf.extend_from_slice(&wire.split_to(k));
                p.b.handle_input(&mut buf, &mut Vec::new()).expect("input");
            }
            ReadTarget::Body(region) => break region,
        }
        target = p.b.next_read(&mut buf);
    };
    let bid = accept(&mut p.b);
    p.b.release(bid);
    let mut region = region;
    let k = 1000.min(region.capacity() - region.len());
    region.extend_from_slice(&wire.split_to(k));
    p.b.handle_body_input(region, &mut buf, &mut Vec::new())
        .expect("body input");
    // The rest of the released stream's bytes, then a new stream that works.
    let mut seed = 7;
    feed_directed(&mut p.b, &mut wire, &mut buf, &mut seed);
    let s3 = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(s3, message(&pattern(s3, 1, 200_000)))
        .expect("send");
    // One step of both directions: data to b (read where it says), credit back to a.
    let step = |p: &mut Pair, wire: &mut BytesMut, buf: &mut BytesMut, seed: &mut u64| {
        p.a.poll_transmit(wire, &mut Vec::new(), 1 << 20);
        feed_directed(&mut p.b, wire, buf, seed);
        let mut back = BytesMut::new();
        p.b.poll_transmit(&mut back, &mut Vec::new(), 1 << 20);
        p.a.handle_input(&mut back, &mut Vec::new())
            .expect("credit");
    };
    let mut accepted = None;
    for _ in 0..1000 {
        step(&mut p, &mut wire, &mut buf, &mut seed);
        if accepted.is_none() {
            if let Poll::Ready(Ok(Some(id))) = p.b.poll_accept(&mut cx()) {
                accepted = Some(id);
            }
        }
        let Some(id) = accepted else { continue };
        match recv(&mut p.b, id) {
            Poll::Ready(Ok(Some(m))) => {
                assert!(m.payload[..] == pattern(s3, 1, 200_000)[..]);
                assert!(p.b.lost().is_none());
                return;
            }
            Poll::Pending => {}
            other => panic!("{other:?}"),
        }
    }
    panic!("the new stream's message never arrived");
}

#[test]
fn a_driver_that_stops_reading_into_the_body_still_gets_every_byte() {
    let mut p = Pair::new();
    let s1 = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(s1, message(&pattern(s1, 0, 300_000)))
        .expect("send");
    let mut wire = BytesMut::new();
    p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
    let mut buf = BytesMut::new();
    // As told until part of a body was read straight into it...
    let mut guard = 0;
    loop {
        guard += 1;
        assert!(guard < 100, "no direct read offered");
        match p.b.next_read(&mut buf) {
            ReadTarget::Buffer(limit) => {
                let k = limit.unwrap_or(20_000).min(wire.len());
                buf.extend_from_slice(&wire.split_to(k));
                p.b.handle_input(&mut buf, &mut Vec::new()).expect("input");
            }
            ReadTarget::Body(mut region) => {
                region.extend_from_slice(&wire.split_to(1000));
                p.b.handle_body_input(region, &mut buf, &mut Vec::new())
                    .expect("body input");
                break;
            }
        }
    }
    // ...then everything through the read buffer, never asking again.
    let bid = accept(&mut p.b);
    for _ in 0..1000 {
        p.a.poll_transmit(&mut wire, &mut Vec::new(), 1 << 20);
        buf.extend_from_slice(&wire.split());
        p.b.handle_input(&mut buf, &mut Vec::new()).expect("input");
        let mut back = BytesMut::new();
        p.b.poll_transmit(&mut back, &mut Vec::new(), 1 << 20);
        p.a.handle_input(&mut back, &mut Vec::new())
            .expect("credit");
        match recv(&mut p.b, bid) {
            Poll::Ready(Ok(Some(m))) => {
                assert_eq!(m.payload.len(), 300_000);
                assert!(m.payload[..] == pattern(s1, 0, 300_000)[..]);
                return;
            }
            Poll::Pending => {}
            other => panic!("{other:?}"),
        }
    }
    panic!("the message never arrived");
}

#[test]
fn a_received_reference_table_is_read_whole_and_checked() {
    let mut b = scripted();
    let mut input = open(1, StreamKind::OpenerSends, 0);
    // Each message in a frame of its own, then the same four in one frame (copied out of
    // the read buffer together): one reference, an unknown kind, a descriptor reference
    // without descriptors, two references.
    let msgs = [
        msg_bytes(&[0xf6], &[(1, 3)], 0),
        msg_bytes(&[0xf6], &[(9, 3)], 0),
        msg_bytes(&[0xf6], &[(4, 0)], 0),
        msg_bytes(&[0xf6, 0xf6], &[(1, 3), (2, 5)], 0),
    ];
    for m in &msgs {
        input.extend_from_slice(&data(1, false, m));
    }
    input.extend_from_slice(&data(1, false, &msgs.concat()));
    b.handle_input(&mut input, &mut Vec::new())
        .expect("survives");
    let id = accept(&mut b);
    for round in 0..2 {
        let Poll::Ready(Ok(Some(m))) = recv(&mut b, id) else {
            panic!("round {round}: one reference")
        };
        assert_eq!(&m.payload[..], [0xf6]);
        assert_eq!(
            &m.refs[..],
            [WireRef {
                kind: RefKind::Sender,
                id: 3
            }]
        );
        let Poll::Ready(Err(e)) = recv(&mut b, id) else {
            panic!("round {round}: unknown kind")
        };
        assert!(
            e.is_decode() && e.message().contains("unknown reference kind 9"),
            "{e}"
        );
        let Poll::Ready(Err(e)) = recv(&mut b, id) else {
            panic!("round {round}: descriptor reference")
        };
        assert!(
            e.message()
                .contains("fd reference 0 but the message carries 0 descriptors"),
            "{e}"
        );
        let Poll::Ready(Ok(Some(m))) = recv(&mut b, id) else {
            panic!("round {round}: two references")
        };
        assert_eq!(&m.payload[..], [0xf6, 0xf6]);
        assert_eq!(
            &m.refs[..],
            [
                WireRef {
                    kind: RefKind::Sender,
                    id: 3
                },
                WireRef {
                    kind: RefKind::Receiver,
                    id: 5
                }
            ]
        );
    }
    assert!(matches!(recv(&mut b, id), Poll::Pending));
}

#[test]
fn small_messages_and_their_end_leave_in_one_frame() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    p.a.send_message(id, message(b"one")).expect("one");
    p.a.send_message(id, message(b"two")).expect("two");
    p.a.finish(id);
    let data: Vec<Frame> = sent_frames(&mut p.a)
        .into_iter()
        .filter(|f| matches!(f, Frame::Data { .. }))
        .collect();
    // Two messages of an 8-byte header and 3 bytes each, and the end, in one DATA frame.
    assert!(
        matches!(&data[..], [Frame::Data { stream, fin: true, payload }]
            if *stream == id && payload.len() == 2 * (8 + 3)),
        "{data:?}"
    );
}

#[test]
fn a_small_message_never_overtakes_what_its_stream_queued() {
    // Messages of 1,000 bytes (queued: above the size sent straight into the frames) and
    // of 10 (sent straight when nothing is queued ahead and there is credit), more than
    // the window holds: they arrive in the order sent.
    let mut p = Pair::new();
    let window = Limits::default().initial_window as usize;
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    let n = 3 * window / 1000;
    let payload = |i: usize| {
        let len = if i.is_multiple_of(3) { 10 } else { 1000 };
        let mut v = vec![(i % 251) as u8; len];
        v[..4].copy_from_slice(&(i as u32).to_be_bytes());
        v
    };
    for i in 0..n {
        p.a.send_message(id, message(&payload(i))).expect("send");
    }
    p.a.finish(id);
    let mut got = 0;
    let mut b_id = None;
    for _ in 0..10_000 {
        p.run();
        let bid = *b_id.get_or_insert_with(|| accept(&mut p.b));
        loop {
            match recv(&mut p.b, bid) {
                Poll::Ready(Ok(Some(m))) => {
                    assert_eq!(&m.payload[..], &payload(got)[..], "message {got}");
                    got += 1;
                }
                Poll::Ready(Ok(None)) => {
                    assert_eq!(got, n);
                    return;
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
        }
    }
    panic!("got {got} of {n} messages");
}

#[test]
fn a_failed_connection_has_no_data_left_to_send() {
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    let _ = sent_frames(&mut p.a);
    // Small: it waits in the outgoing frames, not in the stream's queue.
    p.a.send_message(id, message(b"unsent")).expect("send");
    assert!(p.a.wants_transmit());
    p.a.fail(libchan_core::Error::new(
        ErrorKind::ConnectionLost,
        "link gone",
    ));
    assert!(
        !p.a.wants_transmit(),
        "data of a failed connection still waits"
    );
    assert!(sent_frames(&mut p.a).is_empty());
}

#[test]
fn unclaimed_streams_go_with_their_channel_whatever_was_claimed_first() {
    // Four messages, each opening a reply stream (3, 5, 7, 9) under the same channel; the
    // receiver claims only the third. Releasing the channel releases the other three.
    let mut p = Pair::new();
    let id = p.a.open(StreamKind::OpenerSends).expect("open");
    for _ in 0..4 {
        let mut buf = OutMessage::start(Vec::new());
        buf.push(0xf6);
        let refs = vec![OutRef::New(RefKind::Sender)];
        p.a.send_message(id, OutMessage::finish(buf, refs, vec![]))
            .expect("send");
    }
    p.run();
    let bid = accept(&mut p.b);
    let mut opened = Vec::new();
    while let Poll::Ready(Ok(Some(m))) = recv(&mut p.b, bid) {
        opened.extend(m.refs.iter().map(|r| r.id));
    }
    assert_eq!(opened, [3, 5, 7, 9]);
    p.b.claim(bid, 7, StreamKind::OpenerReceives)
        .expect("claim 7");
    p.b.release(bid);
    p.run();
    assert_eq!(p.b.stats().streams, 1, "only the claimed stream is left");
}

/// A stream's state goes when the stream is removed (here the waker of a receive that
/// waited: the task it would wake is not kept alive), although the connection keeps the
/// emptied box for its next stream; the streams opened next start afresh.
#[test]
fn a_removed_stream_drops_its_state_and_the_next_streams_start_afresh() {
    use std::sync::Arc;
    use std::task::Wake;
    struct Counted;
    impl Wake for Counted {
        fn wake(self: Arc<Self>) {}
    }
    let mut p = Pair::new();
    for round in 0..3u8 {
        let id = p.a.open(StreamKind::OpenerSends).expect("open");
        p.a.send_message(id, message(&[round; 10])).expect("send");
        p.run();
        let bid = accept(&mut p.b);
        // A fresh stream: the first message is this round's, nothing else is queued.
        match p.b.poll_recv(&mut cx(), bid) {
            Poll::Ready(Ok(Some(m))) => assert_eq!(&m.payload[..], &[round; 10][..]),
            other => panic!("round {round}: {other:?}"),
        }
        let counted = Arc::new(Counted);
        let waker = Waker::from(counted.clone());
        assert!(p
            .b
            .poll_recv(&mut Context::from_waker(&waker), bid)
            .is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&counted), 2, "the stream holds the waker");
        // Both ends let go: the stream is removed on each side.
        p.b.release(bid);
        p.a.release(id);
        p.run();
        assert_eq!(
            Arc::strong_count(&counted),
            1,
            "round {round}: the removed stream kept its waker"
        );
        assert_eq!(p.a.stats().streams, 0, "round {round}");
        assert_eq!(p.b.stats().streams, 0, "round {round}");
    }
}
