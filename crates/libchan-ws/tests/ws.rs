//! The WebSocket transport: the whole conformance suite over ws and over wss (mutual TLS).

use libchan_core::{Config, ErrorKind, Session};
use libchan_test_support::{within, Caps};
use libchan_ws::WsClient;

fn config() -> Config {
    Config::new(libchan_codec_cbor::Cbor)
}

async fn ws_pair() -> (Session, Session) {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/libchan", tcp.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let (s, _) = tcp.accept().await.expect("accept");
        libchan_ws::accept(s, None, &config()).await
    });
    let client = WsClient::new(url, config())
        .connect()
        .await
        .expect("connect");
    let server = server.await.expect("task").expect("server session");
    (client, server)
}

libchan_test_support::conformance!(
    ws,
    ws_pair,
    Caps {
        fds: false,
        loss: true
    }
);

async fn wss_pair() -> (Session, Session) {
    let pki = libchan_test_support::pki::test_pki();
    let server_tls = libchan_tls::ServerTls::from_pem(
        pki.server_cert_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
    )
    .expect("pem")
    .require_client_cert(pki.ca_pem.as_bytes())
    .expect("ca")
    .build()
    .expect("server tls");
    let client_tls = libchan_tls::ClientTls::with_roots_pem(pki.ca_pem.as_bytes())
        .expect("roots")
        .client_cert(
            pki.client_cert_pem.as_bytes(),
            pki.client_key_pem.as_bytes(),
        )
        .expect("client cert")
        .build()
        .expect("client tls");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (s, _) = tcp.accept().await.expect("accept");
        let s = libchan_tls::server_handshake(s, server_tls, std::time::Duration::from_secs(10))
            .await
            .expect("tls");
        let peer = libchan_tls::stream_peer_identity(&s);
        libchan_ws::accept(s, peer, &config()).await
    });
    let client = WsClient::new(format!("wss://localhost:{port}/libchan"), config())
        .tls(client_tls)
        .connect()
        .await
        .expect("connect");
    let server = server.await.expect("task").expect("server session");
    assert_eq!(
        server.peer_identity().expect("client cert").subject_names(),
        ["client.example"]
    );
    (client, server)
}

libchan_test_support::conformance!(
    wss,
    wss_pair,
    Caps {
        fds: false,
        loss: true
    }
);

#[tokio::test]
async fn a_server_that_is_not_libchan_is_reported_as_refused() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = tcp.accept().await.expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 7\r\n\r\nno way!")
            .await;
    });
    let e = within(
        "refusal",
        WsClient::new(format!("ws://{addr}/libchan"), config()).connect(),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("403"), "{e}");
}

#[tokio::test]
async fn a_client_without_the_subprotocol_is_refused_by_the_server() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (s, _) = tcp.accept().await.expect("accept");
        libchan_ws::accept(s, None, &config()).await
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let r = tokio_tungstenite::client_async(format!("ws://{addr}/x"), tcp).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = r else {
        panic!("expected an HTTP refusal");
    };
    assert_eq!(resp.status(), 400);
    let e = server.await.expect("task").expect_err("no session");
    assert_eq!(e.kind(), ErrorKind::Handshake);
}

/// Counts the wake-ups of a waker.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Wakes {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A message arriving wakes the link's reader only: its writer, idle once its write is
/// done (it then waits for the session, not for the socket), is not woken with it.
/// tokio-tungstenite wakes the last writer on every readable event unless the link clears
/// that slot; this cost a cross-thread wake-up per round trip.
#[tokio::test]
async fn a_message_read_does_not_wake_an_idle_writer() {
    use bytes::BytesMut;
    use futures_util::SinkExt;
    use libchan_core::driver::Link;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    let (x, y) = tokio::io::duplex(1 << 16);
    let ours = WebSocketStream::from_raw_socket(x, Role::Client, None).await;
    let mut theirs = WebSocketStream::from_raw_socket(y, Role::Server, None).await;
    let (mut r, mut w) = Box::new(libchan_ws::WsLink::new(ours, None)).split();

    let writer_wakes = Arc::new(Wakes::default());
    let writer_waker = Waker::from(writer_wakes.clone());
    let reader_wakes = Arc::new(Wakes::default());
    let reader_waker = Waker::from(reader_wakes.clone());
    let mut buf = BytesMut::with_capacity(64);
    let mut fds = Vec::new();

    match w.poll_write_fds(&mut Context::from_waker(&writer_waker), b"ping", &[]) {
        Poll::Ready(Ok(4)) => {}
        other => panic!("write: {other:?}"),
    }
    assert!(r
        .poll_read_fds(&mut Context::from_waker(&reader_waker), &mut buf, &mut fds)
        .is_pending());
    theirs
        .send(Message::Binary(bytes::Bytes::from_static(b"pong")))
        .await
        .expect("peer sends");
    assert_eq!(reader_wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    match r.poll_read_fds(&mut Context::from_waker(&reader_waker), &mut buf, &mut fds) {
        Poll::Ready(Ok(4)) => assert_eq!(&buf[..], b"pong"),
        other => panic!("read: {other:?}"),
    }
    assert_eq!(
        writer_wakes.0.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the idle writer was woken by a read"
    );
}
