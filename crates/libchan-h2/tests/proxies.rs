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

async fn through(start: impl FnOnce(std::net::SocketAddr) -> Proxy) -> (Session, Session) {
    let listener = H2Listener::bind("127.0.0.1:0", config())
        .await
        .expect("bind");
    let proxy = start(listener.local_addr());
    let client = H2Client::new(proxy.addr().to_string(), config());
    let (c, s) = tokio::join!(client.connect(), listener.accept());
    let c = c.unwrap_or_else(|e| panic!("connect through proxy: {e}\n{}", proxy.error_log()));
    let s = s.expect("accept");
    // Proxy and listener live until the test's runtime shuts down.
    tokio::spawn(async move {
        let _keep = (listener, proxy);
        std::future::pending::<()>().await
    });
    (c, s)
}

libchan_test_support::conformance!(
    nginx,
    || through(|up| proxy::nginx(up, NginxMode::Grpc)),
    Caps {
        fds: false,
        loss: true
    }
);

libchan_test_support::conformance!(
    haproxy,
    || through(proxy::haproxy),
    Caps {
        fds: false,
        loss: true
    }
);
