//! The TLS transport: the whole conformance suite over mutual TLS, peer identities, and the
//! failures a user must be able to tell apart (unknown CA, missing client certificate,
//! a peer that is not TLS at all).

use std::sync::Arc;

use libchan_core::{Config, ErrorKind, Session};
use libchan_test_support::pki::{test_pki, TestPki};
use libchan_test_support::{within, Caps};
use libchan_tls::{ClientTls, ServerTls, TlsListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> Config {
    Config::new(libchan_codec_cbor::Cbor)
}

fn mutual(pki: &TestPki) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let server = ServerTls::from_pem(
        pki.server_cert_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
    )
    .expect("server pem")
    .require_client_cert(pki.ca_pem.as_bytes())
    .expect("client ca")
    .build()
    .expect("server config");
    let client = ClientTls::with_roots_pem(pki.ca_pem.as_bytes())
        .expect("roots")
        .client_cert(
            pki.client_cert_pem.as_bytes(),
            pki.client_key_pem.as_bytes(),
        )
        .expect("client pem")
        .build()
        .expect("client config");
    (server, client)
}

async fn tls_pair() -> (Session, Session) {
    let pki = test_pki();
    let (server_tls, client_tls) = mutual(&pki);
    let listener = TlsListener::bind("127.0.0.1:0", server_tls, config())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = config();
    let (a, b) = tokio::join!(
        libchan_tls::connect(addr, "localhost", client_tls, &config),
        listener.accept()
    );
    (a.expect("connect"), b.expect("accept"))
}

libchan_test_support::conformance!(
    mutual_tls,
    tls_pair,
    Caps {
        fds: false,
        loss: true
    }
);

#[tokio::test]
async fn both_sides_see_the_verified_peer() {
    let (client, server) = tls_pair().await;
    let server_seen_by_client = client.peer_identity().expect("server identity");
    assert_eq!(server_seen_by_client.subject_names(), ["localhost"]);
    assert_eq!(server_seen_by_client.certificates().len(), 1);
    let client_seen_by_server = server.peer_identity().expect("client identity");
    assert_eq!(client_seen_by_server.subject_names(), ["client.example"]);
    assert_eq!(client_seen_by_server.authenticated_as(), None);
}

async fn listener(server_tls: Arc<rustls::ServerConfig>) -> (TlsListener, std::net::SocketAddr) {
    let l = TlsListener::bind("127.0.0.1:0", server_tls, config())
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

#[tokio::test]
async fn a_server_from_an_unknown_ca_is_refused() {
    let cfg = config();
    let (server_tls, _) = mutual(&test_pki());
    let (_, other_client) = mutual(&test_pki());
    let (l, addr) = listener(server_tls).await;
    let (c, s) = within("handshakes", async {
        tokio::join!(
            libchan_tls::connect(addr, "localhost", other_client, &cfg),
            l.accept()
        )
    })
    .await;
    let e = c.expect_err("unknown issuer must fail");
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    assert_eq!(
        s.expect_err("server side fails too").kind(),
        ErrorKind::Handshake
    );
}

#[tokio::test]
async fn a_wrong_server_name_is_refused() {
    let cfg = config();
    let pki = test_pki();
    let (server_tls, client_tls) = mutual(&pki);
    let (l, addr) = listener(server_tls).await;
    let (c, _s) = within("handshakes", async {
        tokio::join!(
            libchan_tls::connect(addr, "not-the-server.example", client_tls, &cfg),
            l.accept()
        )
    })
    .await;
    let e = c.expect_err("name mismatch must fail");
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert!(e.to_string().contains("not valid for name"), "{e}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_certificate() {
    let cfg = config();
    let pki = test_pki();
    let (server_tls, _) = mutual(&pki);
    let anonymous = ClientTls::with_roots_pem(pki.ca_pem.as_bytes())
        .expect("roots")
        .build()
        .expect("config");
    let (l, addr) = listener(server_tls).await;
    let (c, s) = within("handshakes", async {
        tokio::join!(
            libchan_tls::connect(addr, "localhost", anonymous, &cfg),
            l.accept()
        )
    })
    .await;
    let e = s.expect_err("server must refuse");
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert!(e.to_string().contains("certificate"), "{e}");
    // TLS 1.3 clients learn of the refusal at the first read: the libchan handshake.
    assert!(c.is_err(), "client must not get a session");
}

#[tokio::test]
async fn verification_can_be_turned_off_only_by_the_dangerous_option() {
    let cfg = config();
    let pki = test_pki();
    let server_tls = ServerTls::from_pem(
        pki.server_cert_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
    )
    .expect("pem")
    .build()
    .expect("config");
    let stranger = test_pki();
    let strict = ClientTls::with_roots_pem(stranger.ca_pem.as_bytes())
        .expect("roots")
        .build()
        .expect("config");
    let lax = ClientTls::with_roots_pem(stranger.ca_pem.as_bytes())
        .expect("roots")
        .dangerous_accept_any_server_certificate()
        .build()
        .expect("config");
    let (l, addr) = listener(server_tls).await;
    let (c, _) = tokio::join!(
        libchan_tls::connect(addr, "localhost", strict, &cfg),
        l.accept()
    );
    assert_eq!(c.expect_err("strict").kind(), ErrorKind::Handshake);
    let (c, s) = tokio::join!(
        libchan_tls::connect(addr, "anything.example", lax, &cfg),
        l.accept()
    );
    let (c, s) = (c.expect("lax connects"), s.expect("accept"));
    let tx = c.open::<u8>().await.expect("open");
    tx.send(1).await.expect("send");
    let mut rx = s.accept::<u8>().await.expect("accept").expect("channel");
    assert_eq!(rx.recv().await.expect("recv"), Some(1));
}

#[tokio::test]
async fn plaintext_garbage_is_a_handshake_error_and_the_listener_keeps_serving() {
    let cfg = config();
    let pki = test_pki();
    let (server_tls, client_tls) = mutual(&pki);
    let (l, addr) = listener(server_tls).await;
    let garbage = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
    });
    let e = within("garbage refused", l.accept())
        .await
        .expect_err("not tls");
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    garbage.await.expect("garbage task");
    let (c, s) = tokio::join!(
        libchan_tls::connect(addr, "localhost", client_tls, &cfg),
        l.accept()
    );
    c.expect("connect after garbage");
    s.expect("accept after garbage");
}

#[tokio::test]
async fn a_silent_client_hits_the_handshake_timeout() {
    let pki = test_pki();
    let (server_tls, _) = mutual(&pki);
    let l = TlsListener::bind(
        "127.0.0.1:0",
        server_tls,
        config().handshake_timeout(std::time::Duration::from_millis(200)),
    )
    .await
    .expect("bind");
    let addr = l.local_addr().expect("addr");
    let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let e = within("timeout", l.accept()).await.expect_err("silent");
    assert_eq!(e.kind(), ErrorKind::Handshake);
    assert!(e.to_string().contains("handshake_timeout"), "{e}");
}

#[test]
fn bad_pem_names_what_is_wrong() {
    let e = ServerTls::from_pem(b"not pem", b"nor this").expect_err("bad pem");
    assert!(e.to_string().contains("server certificate chain"), "{e}");
    let e = ClientTls::with_roots_pem(b"").expect_err("no roots");
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    let e = ServerTls::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem")
        .expect_err("missing file");
    assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
}
