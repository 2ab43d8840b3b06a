//! The HTTP/2 transport: the whole conformance suite over h2c and over TLS, with every
//! channel and byte stream on its own HTTP/2 stream.

use libchan_core::{Config, Session};
use libchan_h2::{H2Client, H2Listener};
use libchan_test_support::Caps;

fn config() -> Config {
    Config::new(libchan_codec_cbor::Cbor)
}

async fn h2c_pair() -> (Session, Session) {
    let listener = H2Listener::bind("127.0.0.1:0", config())
        .await
        .expect("bind");
    let addr = listener.local_addr();
    let client = H2Client::new(addr.to_string(), config());
    let (c, s) = tokio::join!(client.connect(), listener.accept());
    let pair = (c.expect("connect"), s.expect("accept"));
    libchan_test_support::keep_until_shutdown(listener);
    pair
}

libchan_test_support::conformance!(
    h2c,
    h2c_pair,
    Caps {
        fds: false,
        loss: true
    }
);

/// Fresh certificates; server and client configs for mutual TLS.
fn mutual_tls() -> (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
) {
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
    (server_tls, client_tls)
}

async fn tls_pair() -> (Session, Session) {
    let (server_tls, client_tls) = mutual_tls();
    let listener = H2Listener::bind_tls("127.0.0.1:0", server_tls, config())
        .await
        .expect("bind");
    let addr = listener.local_addr();
    let client = H2Client::new(addr.to_string(), config()).tls("localhost", client_tls);
    let (c, s) = tokio::join!(client.connect(), listener.accept());
    let pair = (c.expect("connect"), s.expect("accept"));
    // The TLS identities reach both sessions.
    assert_eq!(
        pair.0.peer_identity().expect("server cert").subject_names(),
        ["localhost"]
    );
    assert_eq!(
        pair.1.peer_identity().expect("client cert").subject_names(),
        ["client.example"]
    );
    libchan_test_support::keep_until_shutdown(listener);
    pair
}

libchan_test_support::conformance!(
    h2_tls,
    tls_pair,
    Caps {
        fds: false,
        loss: true
    }
);

mod http {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use ::http::{Request, Response, StatusCode};
    use bytes::Bytes;
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use libchan_core::{ByteStream, ErrorKind, Receiver, Sender};
    use libchan_h2::{Endpoint, H2Client, H2Listener, OutBody, Refusal};
    use libchan_test_support::within;
    use serde::{Deserialize, Serialize};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::config;

    /// Serves `endpoint` at /libchan beside a REST route, counting the HTTP requests that
    /// reach /libchan.
    async fn combined_server(endpoint: Endpoint) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        combined_server_with(endpoint, None).await
    }

    /// [`combined_server`] whose HTTP/2 connections allow at most `max_streams`
    /// concurrent streams, if given.
    async fn combined_server_with(
        endpoint: Endpoint,
        max_streams: Option<u32>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let ep = endpoint.clone();
            let count = count.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match req.uri().path() {
                    "/libchan" => {
                        count.fetch_add(1, Ordering::SeqCst);
                        ep.handle(req, None).await
                    }
                    "/api/hello" => Response::new(OutBody::full("hello from REST")),
                    _ => {
                        let mut r = Response::new(OutBody::full("not found"));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    }
                })
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Some(n) = max_streams {
                        builder.http2().max_concurrent_streams(n);
                    }
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (addr, requests)
    }

    #[derive(Serialize, Deserialize)]
    struct Job {
        reply: Sender<String>,
        events: Receiver<u32>,
        data: ByteStream,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_channel_and_byte_stream_is_its_own_http2_stream() {
        let endpoint = Endpoint::new(config());
        let (addr, requests) = combined_server(endpoint.clone()).await;
        let client = H2Client::new(addr.to_string(), config())
            .connect()
            .await
            .expect("connect");
        let server = endpoint.accept().await.expect("accept");
        // The control stream.
        assert_eq!(requests.load(Ordering::SeqCst), 1);

        let jobs = client.open::<Job>().await.expect("open"); // +1
        let (reply, mut replies) = libchan_core::channel(1); // +1 when sent
        let (events_tx, events) = libchan_core::channel(4); // +1 when sent
        let (mut data, theirs) = libchan_core::pipe(); // +1 when sent
        jobs.send(Job {
            reply,
            events,
            data: theirs,
        })
        .await
        .expect("send");
        let mut rx = within("accept", server.accept::<Job>())
            .await
            .expect("accept")
            .expect("channel");
        let mut job = within("job", rx.recv()).await.expect("recv").expect("job");
        // The server opens a channel of its own: the client opens its HTTP/2 stream.
        let server_side = server.open::<String>().await.expect("server open"); // +1
        let mut from_server = within("accept", client.accept::<String>())
            .await
            .expect("accept")
            .expect("channel");
        server_side
            .send("hi from the server".into())
            .await
            .expect("send");
        assert_eq!(
            from_server.recv().await.expect("recv").as_deref(),
            Some("hi from the server")
        );
        events_tx.send(5).await.expect("event");
        assert_eq!(job.events.recv().await.expect("recv"), Some(5));
        data.write_all(b"bytes over their own stream")
            .await
            .expect("write");
        data.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        job.data.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"bytes over their own stream");
        job.reply.send("done".into()).await.expect("reply");
        assert_eq!(replies.recv().await.expect("recv").as_deref(), Some("done"));
        // control + jobs + reply + events + byte stream + the server's channel.
        assert_eq!(requests.load(Ordering::SeqCst), 6);

        // The same server answers its REST route over HTTP/1.1.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /api/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut resp = String::new();
        tcp.read_to_string(&mut resp).await.expect("read");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("hello from REST"), "{resp}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn channels_beyond_the_servers_stream_limit_wait_for_room() {
        // A hyper server that allows 4 concurrent HTTP/2 streams: the control stream and
        // three channels. The client opens 12 at once; the others wait for streams to end.
        let endpoint = Endpoint::new(config());
        let (addr, requests) = combined_server_with(endpoint.clone(), Some(4)).await;
        let client = H2Client::new(addr.to_string(), config())
            .connect()
            .await
            .expect("connect");
        let server = endpoint.accept().await.expect("accept");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..12 {
                let mut rx = server
                    .accept::<u32>()
                    .await
                    .expect("accept")
                    .expect("channel");
                got.push(rx.recv().await.expect("recv").expect("message"));
                assert_eq!(rx.recv().await.expect("end"), None);
            }
            got.sort_unstable();
            got
        });
        for i in 0..12u32 {
            let tx = client.open::<u32>().await.expect("open");
            tx.send(i).await.expect("send");
        }
        let got = within("all 12 channels", reader).await.expect("reader");
        assert_eq!(got, (0..12).collect::<Vec<_>>());
        assert_eq!(requests.load(Ordering::SeqCst), 13);
    }

    #[tokio::test]
    async fn connection_specific_headers_are_left_out_of_http2_requests() {
        // HTTP/2 forbids them (h2 refuses such a request); the client drops them.
        let listener = H2Listener::bind("127.0.0.1:0", config())
            .await
            .expect("bind");
        let client = H2Client::new(listener.local_addr().to_string(), config())
            .header("connection", "keep-alive")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("x-kept", "yes");
        let (c, s) = within("connect", async {
            tokio::join!(client.connect(), listener.accept())
        })
        .await;
        let (c, s) = (c.expect("connect"), s.expect("accept"));
        let tx = c.open::<u32>().await.expect("open");
        let mut rx = within("accept", s.accept::<u32>())
            .await
            .expect("accept")
            .expect("channel");
        tx.send(7).await.expect("send");
        assert_eq!(rx.recv().await.expect("recv"), Some(7));
    }

    #[tokio::test]
    async fn a_response_header_list_over_the_clients_limit_is_refused_naming_it() {
        // A server that answers the session request with 32 KiB of headers: the client
        // takes at most 16 KiB (hyper's client default, which it had before it drove h2).
        let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
            let mut r = Response::new(OutBody::empty());
            let filler = "x".repeat(32 * 1024);
            r.headers_mut().insert(
                "x-filler",
                ::http::HeaderValue::from_str(&filler).expect("header"),
            );
            Ok::<_, std::convert::Infallible>(r)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        });
        let err = within(
            "the refusal",
            H2Client::new(addr.to_string(), config()).connect(),
        )
        .await
        .expect_err("a 32 KiB header list must be refused");
        assert_eq!(err.kind(), ErrorKind::ConnectionLost, "{err}");
        assert!(err.to_string().contains("16384"), "{err}");
    }

    #[tokio::test]
    async fn authorization_refuses_with_the_http_status_and_names_accepted_peers() {
        let endpoint = Endpoint::new(config()).authorize(|req, _tls| {
            match req.headers.get("authorization").map(|v| v.as_bytes()) {
                Some(b"Bearer good") => Ok(Some("alice".into())),
                Some(b"Bearer banned") => Err(Refusal::forbidden("alice's sister is banned")),
                _ => Err(Refusal::unauthorized("missing or bad bearer token")),
            }
        });
        let listener = H2Listener::with_endpoint("127.0.0.1:0", endpoint, None)
            .await
            .expect("bind");
        let addr = listener.local_addr().to_string();

        let e = H2Client::new(addr.clone(), config())
            .connect()
            .await
            .expect_err("no token");
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        assert!(e.to_string().contains("401 Unauthorized"), "{e}");
        assert!(e.to_string().contains("missing or bad bearer token"), "{e}");

        let e = H2Client::new(addr.clone(), config())
            .header("authorization", "Bearer banned")
            .connect()
            .await
            .expect_err("banned");
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("403 Forbidden"), "{e}");

        let client = H2Client::new(addr, config())
            .header("authorization", "Bearer good")
            .connect()
            .await
            .expect("accepted");
        let server = listener.accept().await.expect("session");
        let id = server.peer_identity().expect("identity");
        assert_eq!(id.authenticated_as(), Some("alice"));
        let tx = client.open::<u8>().await.expect("open");
        tx.send(1).await.expect("send");
        let mut rx = server
            .accept::<u8>()
            .await
            .expect("accept")
            .expect("channel");
        assert_eq!(rx.recv().await.expect("recv"), Some(1));
    }

    #[tokio::test]
    async fn wrong_paths_versions_and_tokens_are_refused() {
        let listener = H2Listener::bind("127.0.0.1:0", config())
            .await
            .expect("bind");
        let addr = listener.local_addr().to_string();
        let e = H2Client::new(addr.clone(), config())
            .path("/elsewhere")
            .connect()
            .await
            .expect_err("404");
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("404"), "{e}");

        let e = H2Client::new(addr.clone(), config())
            .header("libchan-version", "2")
            .connect()
            .await
            .expect_err("version");
        // The client sends version 1 too: two values, neither accepted as "1" alone.
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");

        // A stream request naming a session that does not exist.
        let status = raw_request(
            &addr,
            &[("libchan-session", "00"), ("libchan-stream", "1")],
            b"",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    async fn raw_request(addr: &str, headers: &[(&str, &str)], body: &'static [u8]) -> StatusCode {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2");
        tokio::spawn(conn);
        let mut req = Request::post(format!("http://{addr}/libchan"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(OutBody::full(Bytes::from_static(body)))
            .expect("request");
        sender.send_request(req).await.expect("response").status()
    }

    #[tokio::test]
    async fn an_oversized_frame_length_fails_the_session_naming_the_limit() {
        let listener = H2Listener::bind("127.0.0.1:0", config())
            .await
            .expect("bind");
        let addr = listener.local_addr().to_string();
        // A frame header announcing 16 MiB - 1 on the control stream.
        let status = raw_request(&addr, &[], &[0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 1, 2, 3]).await;
        assert_eq!(status, StatusCode::OK);
        let e = within("failed session", listener.accept())
            .await
            .expect_err("oversized frame");
        assert!(
            e.to_string()
                .contains("max_frame_size: 16777215 > limit 262144"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_control_stream_of_garbage_fails_that_session_only() {
        let listener = H2Listener::bind("127.0.0.1:0", config())
            .await
            .expect("bind");
        let addr = listener.local_addr().to_string();
        let status = raw_request(&addr, &[], b"GARBAGE GARBAGE GARBAGE").await;
        assert_eq!(status, StatusCode::OK);
        let e = within("failed session", listener.accept())
            .await
            .expect_err("garbage is no handshake");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Protocol | ErrorKind::Handshake | ErrorKind::ConnectionLost
            ),
            "{e}"
        );
        let client = H2Client::new(addr, config())
            .connect()
            .await
            .expect("connect");
        let server = listener.accept().await.expect("a good session still works");
        let tx = server.open::<u8>().await.expect("open");
        tx.send(9).await.expect("send");
        let mut rx = client
            .accept::<u8>()
            .await
            .expect("accept")
            .expect("channel");
        assert_eq!(rx.recv().await.expect("recv"), Some(9));
    }
}

mod websocket {
    use libchan_core::ErrorKind;
    use libchan_h2::{Endpoint, H2Listener, Refusal};
    use libchan_ws::WsClient;

    use super::config;

    #[tokio::test]
    async fn the_endpoint_serves_websocket_upgrades_with_the_same_authorization() {
        let endpoint = Endpoint::new(config()).authorize(|req, _| {
            match req.headers.get("authorization").map(|v| v.as_bytes()) {
                Some(b"Bearer ok") => Ok(Some("bob".into())),
                _ => Err(Refusal::unauthorized("who are you?")),
            }
        });
        let listener = H2Listener::with_endpoint("127.0.0.1:0", endpoint, None)
            .await
            .expect("bind");
        let url = format!("ws://{}/libchan", listener.local_addr());
        let e = WsClient::new(url.clone(), config())
            .connect()
            .await
            .expect_err("no credentials");
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        assert!(e.to_string().contains("401"), "{e}");
        assert!(e.to_string().contains("who are you?"), "{e}");

        let client = WsClient::new(url, config())
            .header("authorization", "Bearer ok")
            .connect()
            .await
            .expect("connect");
        let server = listener.accept().await.expect("session");
        assert_eq!(
            server.peer_identity().expect("identity").authenticated_as(),
            Some("bob")
        );
        let tx = server.open::<String>().await.expect("open");
        tx.send("to a websocket client".into()).await.expect("send");
        let mut rx = client
            .accept::<String>()
            .await
            .expect("accept")
            .expect("channel");
        assert_eq!(
            rx.recv().await.expect("recv").as_deref(),
            Some("to a websocket client")
        );
    }
}

#[tokio::test]
async fn authorization_sees_the_tls_client_certificate() {
    let (server_tls, client_tls) = mutual_tls();
    let endpoint = libchan_h2::Endpoint::new(config()).authorize(|_req, tls| {
        let names = tls.map(|t| t.subject_names().to_vec()).unwrap_or_default();
        if names.iter().any(|n| n == "client.example") {
            Ok(Some("the client.example service".into()))
        } else {
            Err(libchan_h2::Refusal::forbidden(format!("{names:?} may not")))
        }
    });
    let listener = H2Listener::with_endpoint("127.0.0.1:0", endpoint, Some(server_tls))
        .await
        .expect("bind");
    let client = H2Client::new(listener.local_addr().to_string(), config())
        .tls("localhost", client_tls)
        .connect()
        .await
        .expect("connect");
    let server = listener.accept().await.expect("session");
    let id = server.peer_identity().expect("identity");
    assert_eq!(id.authenticated_as(), Some("the client.example service"));
    assert_eq!(id.subject_names(), ["client.example"]);
    drop(client);
}
