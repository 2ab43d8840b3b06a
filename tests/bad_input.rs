//! What a session does with a hostile or broken peer, driven by the scripted mock peer
//! over real unix sockets and real tcp connections (every case runs on both). Every case ends with a clear error in bounded time, no panic,
//! and where the protocol says so, the session and its other channels keep working.

use std::time::Duration;

use libchan::frame::{self, Frame, Reason, StreamKind};
use libchan::{Config, ErrorKind, Role, Sender, Session};
use libchan_test_support::mock::MockPeer;
use libchan_test_support::within;

fn data(stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    frame::encode_data_header(&mut b, stream, payload.len(), false);
    b.extend_from_slice(payload);
    b.to_vec()
}

fn open(stream: u32) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    frame::encode_open(&mut b, stream, StreamKind::OpenerSends, 0);
    b.to_vec()
}

fn message(payload: &[u8], refs: &[(u8, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&(refs.len() as u16).to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(payload);
    for (k, id) in refs {
        v.push(*k);
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

/// The cases, for one transport: `S` is its stream type, `pair()` gives a connected pair,
/// `over_stream` runs a session over one end.
macro_rules! hostile_peer_cases {
    () => {
        fn config() -> Config {
            libchan::config().handshake_timeout(Duration::from_secs(2))
        }

        /// A listener session on one end of a socketpair, a mock dialer on the other. The mock's
        /// HELLO is sent first so the session's handshake completes.
        async fn session_and_mock() -> (Session, MockPeer<S>) {
            let (a, b) = pair().await;
            let mut mock = MockPeer::new(b);
            mock.write(&MockPeer::<S>::hello_frame(1, &["cbor"]))
                .await
                .expect("hello");
            let s = within(
                "handshake",
                over_stream(a, Role::Listener, &config()),
            )
            .await
            .expect("handshake");
            let f = within("session hello", mock.read_frame())
                .await
                .expect("read");
            assert!(matches!(f, Some(Frame::Hello(_))));
            (s, mock)
        }

        async fn handshake_with(bytes: &[u8]) -> libchan::Error {
            let (a, b) = pair().await;
            let mut mock = MockPeer::new(b);
            mock.write(bytes).await.expect("write");
            within(
                "handshake",
                over_stream(a, Role::Listener, &config()),
            )
            .await
            .expect_err("handshake must fail")
        }

        #[tokio::test]
        async fn garbage_bytes_fail_the_handshake_clearly() {
            let e = handshake_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
            assert!(e.message().contains("expected a HELLO"), "{e}");
        }

        #[tokio::test]
        async fn malformed_hello_fails_the_handshake_clearly() {
            let mut h = MockPeer::<S>::hello_frame(1, &["cbor"]);
            h[9] = b'X'; // magic
            let e = handshake_with(&h).await;
            assert!(e.is_handshake() && e.message().contains("bad magic"), "{e}");
            let mut h = MockPeer::<S>::hello_frame(1, &["cbor"]);
            let n = h.len();
            h[n - 5] = 200; // codec name length beyond the frame
            let e = handshake_with(&h).await;
            assert!(e.is_handshake() && e.message().contains("truncated"), "{e}");
            let e = handshake_with(&MockPeer::<S>::hello_frame(1, &["json"])).await;
            assert!(e.message().contains("no common codec"), "{e}");
        }

        #[tokio::test]
        async fn a_handshake_that_never_finishes_times_out() {
            let (a, b) = pair().await;
            let mut mock = MockPeer::new(b);
            mock.write(&[0, 0])
                .await
                .expect("two bytes of a header, then silence");
            let e = within(
                "handshake",
                over_stream(a, Role::Listener, &config()),
            )
            .await
            .expect_err("slowloris");
            assert!(e.is_handshake(), "{e}");
            assert!(e.message().contains("handshake_timeout"), "{e}");
        }

        #[tokio::test]
        async fn truncated_frame_then_eof_is_a_lost_connection() {
            let (s, mut mock) = session_and_mock().await;
            let mut bytes = open(1);
            bytes.extend_from_slice(&data(1, &message(&[0x07], &[]))[..12]);
            mock.write(&bytes).await.expect("write");
            let mut rx = within("accept", s.accept::<u32>())
                .await
                .expect("accept")
                .expect("channel");
            drop(mock);
            let e = within("recv", rx.recv()).await.expect_err("lost");
            assert!(e.is_connection_lost(), "{e}");
            let e = within("accept", s.accept::<u32>()).await.expect_err("lost");
            assert!(e.is_connection_lost(), "{e}");
        }

        #[tokio::test]
        async fn oversized_length_prefix_ends_the_session_with_a_named_limit() {
            let (s, mut mock) = session_and_mock().await;
            mock.write(&[0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1])
                .await
                .expect("write");
            let goaway = within(
                "goaway",
                mock.read_until(|f| matches!(f, Frame::GoAway { .. })),
            )
            .await
            .expect("read")
            .expect("a GOAWAY before the end");
            let Frame::GoAway {
                reason, message, ..
            } = goaway
            else {
                unreachable!()
            };
            assert_eq!(reason, Reason::PROTOCOL);
            assert!(
                message.contains("16777215") && message.contains("max_frame_size 262144"),
                "{message}"
            );
            let e = within("accept", s.accept::<u32>())
                .await
                .expect_err("session over");
            assert!(e.is_protocol(), "{e}");
            assert!(e.message().contains("max_frame_size"), "{e}");
        }

        #[tokio::test]
        async fn reference_to_a_stream_never_opened_is_a_decode_error_and_the_channel_goes_on() {
            let (s, mut mock) = session_and_mock().await;
            let mut bytes = open(1);
            // [Sender] referring to stream 99, which was never opened; then a good message.
            bytes.extend_from_slice(&data(
                1,
                &message(&[0x81, 0xda, 0x4c, 0x43, 0x48, 0x4e, 0x00], &[(1, 99)]),
            ));
            bytes.extend_from_slice(&data(1, &message(&[0x81, 0x07], &[])));
            bytes.extend_from_slice(&open(3));
            bytes.extend_from_slice(&data(3, &message(&[0x81, 0x08], &[])));
            mock.write(&bytes).await.expect("write");
            let mut senders = within("accept", s.accept::<Vec<Sender<u32>>>())
                .await
                .expect("accept")
                .expect("channel");
            let e = within("recv", senders.recv()).await.expect_err("bad ref");
            assert!(e.is_decode(), "{e}");
            assert!(e.message().contains("stream 99"), "{e}");
            let mut numbers = within("accept", s.accept::<Vec<u32>>())
                .await
                .expect("accept")
                .expect("channel");
            assert_eq!(
                within("recv", numbers.recv()).await.expect("other channel"),
                Some(vec![8])
            );
            // The bad message did not wedge its channel: the next one is a decode error of a
            // different kind (an integer where a reference is expected), not the same error again.
            let e = within("recv", senders.recv()).await.expect_err("not a ref");
            assert!(e.is_decode() && !e.message().contains("stream 99"), "{e}");
        }

        #[tokio::test]
        async fn reference_of_the_wrong_kind_is_a_decode_error_not_a_panic() {
            let (s, mut mock) = session_and_mock().await;
            let mut bytes = open(1);
            let mut nested = bytes::BytesMut::new();
            frame::encode_open(&mut nested, 3, StreamKind::OpenerSends, 1);
            bytes.extend_from_slice(&nested);
            // A Receiver reference where the application expects a Sender.
            bytes.extend_from_slice(&data(
                1,
                &message(&[0xda, 0x4c, 0x43, 0x48, 0x4e, 0x00], &[(2, 3)]),
            ));
            mock.write(&bytes).await.expect("write");
            let mut rx = within("accept", s.accept::<Sender<u32>>())
                .await
                .expect("accept")
                .expect("channel");
            let e = within("recv", rx.recv()).await.expect_err("wrong kind");
            assert!(e.is_decode(), "{e}");
            // The unused stream 3 is released: the mock sees a RESET for it.
            let f = within(
                "reset",
                mock.read_until(|f| matches!(f, Frame::Reset { stream: 3, .. })),
            )
            .await
            .expect("read");
            assert!(f.is_some());
        }

        #[tokio::test]
        async fn data_on_a_stream_never_opened_ends_the_session_with_goaway() {
            let (s, mut mock) = session_and_mock().await;
            mock.write(&data(41, &message(&[0x07], &[])))
                .await
                .expect("write");
            let f = within(
                "goaway",
                mock.read_until(|f| matches!(f, Frame::GoAway { .. })),
            )
            .await
            .expect("read");
            assert!(
                matches!(f, Some(Frame::GoAway { ref message, .. }) if message.contains("never opened")),
                "{f:?}"
            );
            let e = within("accept", s.accept::<u32>()).await.expect_err("over");
            assert!(e.is_protocol(), "{e}");
        }

        #[tokio::test]
        async fn undecodable_cbor_is_a_decode_error_and_the_channel_goes_on() {
            let (s, mut mock) = session_and_mock().await;
            let mut bytes = open(1);
            for bad in [
                &[0x1c][..],                                                 // reserved additional info
                &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], // 2^64-byte string
                &[0x9f; 600][..],  // nesting deeper than the limit
                &[0x07, 0x07][..], // trailing bytes
            ] {
                bytes.extend_from_slice(&data(1, &message(bad, &[])));
            }
            bytes.extend_from_slice(&data(1, &message(&[0x18, 0x2a], &[])));
            mock.write(&bytes).await.expect("write");
            let mut rx = within("accept", s.accept::<u64>())
                .await
                .expect("accept")
                .expect("channel");
            for _ in 0..4 {
                let e = within("recv", rx.recv()).await.expect_err("undecodable");
                assert!(e.is_decode(), "{e}");
            }
            assert_eq!(within("recv", rx.recv()).await.expect("good"), Some(42));
        }

        #[tokio::test]
        async fn keepalive_detects_a_silent_peer() {
            let (a, b) = pair().await;
            let mut mock = MockPeer::new(b);
            mock.write(&MockPeer::<S>::hello_frame(1, &["cbor"]))
                .await
                .expect("hello");
            let config = config().keepalive(Duration::from_millis(200));
            let s = over_stream(a, Role::Listener, &config)
                .await
                .expect("handshake");
            // The mock reads (so the socket does not fill) but never answers pings.
            let reader = tokio::spawn(async move {
                let mut pings = 0;
                while let Ok(Some(f)) = mock.read_frame().await {
                    if matches!(f, Frame::Ping { ack: false, .. }) {
                        pings += 1;
                    }
                }
                pings
            });
            let e = within("keepalive", s.accept::<u32>())
                .await
                .expect_err("silent peer");
            assert!(e.is_connection_lost(), "{e}");
            assert!(e.message().contains("keepalive"), "{e}");
            s.abort();
            assert!(within("mock", reader).await.expect("mock") >= 1);
        }

        #[tokio::test]
        async fn returned_receiver_reference_at_the_largest_index_is_a_decode_error() {
            let (s, mut mock) = session_and_mock().await;
            let mut bytes = open(1);
            // Tag "LCHN" around u32::MAX: a reference index no table can hold.
            bytes.extend_from_slice(&data(
                1,
                &message(
                    &[0xda, 0x4c, 0x43, 0x48, 0x4e, 0x1a, 0xff, 0xff, 0xff, 0xff],
                    &[(6, 2)],
                ),
            ));
            // A ReturnedReceiver entry as the last entry of the table, with no Receiver after it.
            bytes.extend_from_slice(&data(
                1,
                &message(&[0xda, 0x4c, 0x43, 0x48, 0x4e, 0x00], &[(6, 2)]),
            ));
            mock.write(&bytes).await.expect("write");
            let mut rx = within("accept", s.accept::<libchan::Receiver<u32>>())
                .await
                .expect("accept")
                .expect("channel");
            for _ in 0..2 {
                let e = within("recv", rx.recv()).await.expect_err("bad reference");
                assert!(e.is_decode(), "{e}");
            }
        }


        /// Small messages held for the application must not keep the read buffers they
        /// arrived in alive: here 1,500 held 9-byte messages, each followed by 96 KiB of
        /// junk the session reads and drops (DATA on a stream it reset), would pin 1,500
        /// read buffers (about 190 MiB) if the messages stayed slices of those buffers.
        #[tokio::test]
        async fn small_held_messages_do_not_pin_read_buffers() {
            let (s, mut mock) = session_and_mock().await;
            let mut setup = open(1);
            setup.extend_from_slice(&open(3));
            let mut b = bytes::BytesMut::new();
            frame::encode_reset(&mut b, 3, Reason::CANCEL);
            setup.extend_from_slice(&b);
            mock.write(&setup).await.expect("write");
            // Accepted and never read: every message is held.
            let _held = within("accept", s.accept::<u32>())
                .await
                .expect("accept")
                .expect("channel");
            let small = data(1, &message(&[0x01], &[]));
            let mut round = small.clone();
            for _ in 0..2 {
                round.extend_from_slice(&data(3, &vec![0u8; 48 * 1024]));
            }
            let before = libchan_test_support::rss_bytes();
            for _ in 0..1500 {
                mock.write(&round).await.expect("write");
            }
            // Everything before a PING is processed when its answer comes.
            let mut b = bytes::BytesMut::new();
            frame::encode_ping(&mut b, false, 42);
            mock.write(&b).await.expect("ping");
            within("ping answer", async {
                loop {
                    match mock.read_frame().await.expect("read") {
                        Some(Frame::Ping { ack: true, .. }) => break,
                        Some(_) => {}
                        None => panic!("session ended"),
                    }
                }
            })
            .await;
            let grown = libchan_test_support::rss_bytes().saturating_sub(before);
            assert!(
                grown < 64 << 20,
                "holding 1,500 small messages grew RSS by {} MiB",
                grown >> 20
            );
            assert_eq!(s.stats().connection.streams, 2, "{:?}", s.stats());
        }
    };
}

mod unix {
    use super::*;

    type S = tokio::net::UnixStream;

    async fn pair() -> (S, S) {
        S::pair().expect("socketpair")
    }

    use libchan::unix::over_stream;

    hostile_peer_cases!();
}

mod tcp {
    use super::*;

    type S = tokio::net::TcpStream;

    async fn pair() -> (S, S) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(S::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    use libchan::tcp::over_stream;

    hostile_peer_cases!();
}
