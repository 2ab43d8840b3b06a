//! The HTTP/2 transport through real proxies started by the test on loopback: nginx
//! (`grpc_pass` to an h2c upstream) and haproxy (`proto h2` both sides). The whole
//! conformance suite runs through each, byte streams and long-lived bidirectional channels
//! included.

use libchan_core::{Config, Session};
use libchan_h2::{H2Client, H2Listener};
use libchan_test_support::proxy::{self, NginxMode, Proxy};
use libchan_test_support::Caps;

fn config() -> Config {
    Config::new(libchan_codec_cbor::Cbor)
}

/// A session pair through the proxy `start` puts in front of an `H2Listener`; with
/// `websocket_fallback`, a client that prefers HTTP/2 and falls back to a WebSocket.
async fn through(
    start: impl FnOnce(std::net::SocketAddr) -> Proxy,
    websocket_fallback: bool,
) -> (Session, Session) {
    let listener = H2Listener::bind("127.0.0.1:0", config())
        .await
        .expect("bind");
    let proxy = start(listener.local_addr());
    let mut client = H2Client::new(proxy.addr().to_string(), config());
    if websocket_fallback {
        client = client.websocket_fallback();
    }
    let (c, s) = tokio::join!(client.connect(), listener.accept());
    let c = c.unwrap_or_else(|e| panic!("connect through proxy: {e}\n{}", proxy.error_log()));
    let s = s.expect("accept");
    libchan_test_support::keep_until_shutdown((listener, proxy));
    (c, s)
}

libchan_test_support::conformance!(
    nginx,
    || through(|up| proxy::nginx(up, NginxMode::Grpc), false),
    Caps {
        fds: false,
        loss: true
    }
);

libchan_test_support::conformance!(
    haproxy,
    || through(proxy::haproxy, false),
    Caps {
        fds: false,
        loss: true
    }
);

/// An HTTP/1.1-only proxy (nginx passing WebSocket upgrades): a client that prefers HTTP/2
/// falls back to a WebSocket on the same URL, served by the same endpoint.
async fn through_nginx_websocket() -> (Session, Session) {
    through(|up| proxy::nginx(up, NginxMode::WebSocket), true).await
}

libchan_test_support::conformance!(
    nginx_websocket_fallback,
    through_nginx_websocket,
    Caps {
        fds: false,
        loss: true
    }
);

#[tokio::test]
async fn nginx_sees_one_http2_request_per_channel() {
    let listener = H2Listener::bind("127.0.0.1:0", config())
        .await
        .expect("bind");
    let proxy = proxy::nginx(listener.local_addr(), NginxMode::Grpc);
    let client = H2Client::new(proxy.addr().to_string(), config());
    let (c, s) = tokio::join!(client.connect(), listener.accept());
    let (c, s) = (c.expect("connect"), s.expect("accept"));
    let mut txs = Vec::new();
    for i in 0..10u32 {
        let tx = c.open::<u32>().await.expect("open");
        tx.send(i).await.expect("send");
        let mut rx = s.accept::<u32>().await.expect("accept").expect("channel");
        assert_eq!(rx.recv().await.expect("recv"), Some(i));
        txs.push(tx);
    }
    drop(txs);
    c.close();
    libchan_test_support::wait_until("nginx logs every request", || {
        proxy.access_log().matches("POST /libchan HTTP/2.0").count() == 11
    })
    .await;
    let log = proxy.access_log();
    assert_eq!(
        log.matches("POST /libchan HTTP/2.0\" 200").count(),
        11,
        "{log}"
    );
}
