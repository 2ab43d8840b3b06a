//! `libchan::connect` / `libchan::listen` for every URL scheme over real sockets (TLS with
//! test certificates from rcgen), and the errors a wrong URL or a missing TLS
//! configuration gives.

// Helpers shared by the tests panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use libchan::{ErrorKind, Options, Session};
use libchan_test_support::within;

fn tls_options() -> Options {
    let pki = libchan_test_support::pki::test_pki();
    let server = libchan::tls::ServerTls::from_pem(
        pki.server_cert_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
    )
    .unwrap()
    .build()
    .unwrap();
    let client = libchan::tls::ClientTls::with_roots_pem(pki.ca_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    Options::new()
        .tls_server(server)
        .tls_client(client)
        .server_name("localhost")
}

async fn round_trip(options: &Options, url: &str) -> (Session, Session) {
    let listener = options.listen(url).await.expect(url);
    let local = listener.local_url();
    assert!(
        local.starts_with(url.split("://").next().unwrap()),
        "{local}"
    );
    let (client, server) = within(url, async {
        tokio::join!(options.connect(&local), listener.accept())
    })
    .await;
    let (client, server) = (client.expect(&local), server.expect(&local));
    let tx = client
        .open::<(String, libchan::Sender<String>)>()
        .await
        .unwrap();
    let mut rx = within(
        "accept",
        server.accept::<(String, libchan::Sender<String>)>(),
    )
    .await
    .unwrap()
    .unwrap();
    let (reply_tx, mut reply_rx) = libchan::channel(1);
    tx.send((url.to_owned(), reply_tx))
        .await
        .map_err(|e| e.error)
        .unwrap();
    let (got, reply) = within("recv", rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, url);
    reply
        .send(format!("back over {local}"))
        .await
        .map_err(|e| e.error)
        .unwrap();
    assert_eq!(
        within("reply", reply_rx.recv()).await.unwrap(),
        Some(format!("back over {local}"))
    );
    (client, server)
}

#[tokio::test]
async fn every_scheme_connects_and_carries_nested_channels() {
    let dir = std::env::temp_dir().join(format!("libchan-urls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unix = format!("unix://{}", dir.join("s").display());
    let tls = tls_options();
    let plain = Options::new();
    let (c, _s) = round_trip(&plain, &unix).await;
    assert!(c.can_pass_fds());
    round_trip(&plain, "tcp://127.0.0.1:0").await;
    let (c, _s) = round_trip(&tls, "tls://127.0.0.1:0").await;
    assert!(c.peer_identity().is_some(), "the server's certificate");
    round_trip(&plain, "http://127.0.0.1:0/libchan").await;
    round_trip(&tls, "https://127.0.0.1:0/api/chan").await;
    round_trip(&plain, "ws://127.0.0.1:0/ws").await;
    round_trip(&tls, "wss://127.0.0.1:0").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_free_functions_use_the_default_options() {
    let listener = libchan::listen("tcp://127.0.0.1:0").await.unwrap();
    let url = listener.local_url();
    let (c, s) = tokio::join!(libchan::connect(&url), listener.accept());
    assert_eq!(c.unwrap().codec(), "cbor");
    assert_eq!(s.unwrap().codec(), "cbor");
}

#[tokio::test]
async fn url_mistakes_are_local_errors_that_say_what_to_do() {
    for (url, says) in [
        ("localhost:80", "not a URL"),
        ("ftp://host", "unknown URL scheme"),
        ("tcp://", "names no host"),
        ("unix://", "names no socket path"),
        ("tls://127.0.0.1:1", "Options::tls_client"),
        ("https://127.0.0.1:1", "Options::tls_client"),
        ("wss://127.0.0.1:1", "Options::tls_client"),
    ] {
        let e = libchan::connect(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{url}: {e}");
        assert!(e.to_string().contains(says), "{url}: {e}");
    }
    let e = libchan::listen("https://127.0.0.1:0").await.unwrap_err();
    assert!(e.to_string().contains("Options::tls_server"), "{e}");
    // Nothing listens: an IO error, not a misuse.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = libchan::connect(&format!("tcp://{addr}"))
        .await
        .unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Closed, "{e}");
}

#[tokio::test]
async fn credentials_reach_the_endpoint_as_headers() {
    let endpoint =
        libchan::h2::Endpoint::new(libchan::config()).authorize(|parts, _tls| {
            match parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
            {
                Some("Bearer good") => Ok(Some("good".to_owned())),
                _ => Err(libchan::h2::Refusal::unauthorized("bad token")),
            }
        });
    let listener = libchan::h2::H2Listener::with_endpoint("127.0.0.1:0", endpoint, None)
        .await
        .unwrap();
    let url = format!("http://{}/libchan", listener.local_addr());
    let listener = Arc::new(listener);
    let accepting = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await })
    };
    let e = Options::new()
        .header("authorization", "Bearer bad")
        .connect(&url)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    Options::new()
        .header("authorization", "Bearer good")
        .connect(&url)
        .await
        .unwrap();
    within("accepted", accepting).await.unwrap().unwrap();
}
