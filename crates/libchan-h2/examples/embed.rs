//! A plain hyper server with ordinary REST routes that also serves libchan on one path:
//! HTTP/2 clients get one HTTP/2 stream per channel, HTTP/1.1-only clients a WebSocket.
//! Self-contained: the server runs, two clients (HTTP/2 and WebSocket) use it, it exits.
//!
//! ```sh
//! cargo run -p libchan-h2 --example embed
//! ```

use std::convert::Infallible;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libchan_core::{Config, Error, Sender};
use libchan_h2::{Endpoint, H2Client, OutBody, Refusal};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Greet {
    name: String,
    reply: Sender<String>,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = Config::new(libchan_codec_cbor::Cbor);
    let endpoint = Endpoint::new(config.clone()).authorize(|req, _tls| {
        match req.headers.get("authorization").map(|v| v.as_bytes()) {
            Some(b"Bearer demo") => Ok(Some("demo-user".into())),
            _ => Err(Refusal::unauthorized("send Authorization: Bearer demo")),
        }
    });

    // The application's own server and routes.
    let ep = endpoint.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ep = ep.clone();
        async move {
            Ok::<_, Infallible>(match req.uri().path() {
                "/libchan" => ep.handle(req, None).await,
                "/api/status" => Response::new(OutBody::full("{\"status\":\"ok\"}")),
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
        .map_err(|e| Error::new(libchan_core::ErrorKind::Io, e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::new(libchan_core::ErrorKind::Io, e.to_string()))?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    println!("serving REST and libchan on http://{addr}");

    // The libchan service: greets whoever asks, on every session.
    tokio::spawn(async move {
        while let Ok(session) = endpoint.accept().await {
            let who = session
                .peer_identity()
                .and_then(|p| p.authenticated_as().map(str::to_owned))
                .unwrap_or_default();
            tokio::spawn(async move {
                while let Ok(Some(mut greets)) = session.accept::<Greet>().await {
                    let who = who.clone();
                    tokio::spawn(async move {
                        while let Ok(Some(g)) = greets.recv().await {
                            let _ = g
                                .reply
                                .send(format!("hello {}, said {who}'s server", g.name))
                                .await;
                        }
                    });
                }
            });
        }
    });

    // An HTTP/2 client and a WebSocket client.
    let h2 = H2Client::new(addr.to_string(), config.clone())
        .header("authorization", "Bearer demo")
        .connect()
        .await?;
    let ws = libchan_ws::WsClient::new(format!("ws://{addr}/libchan"), config.clone())
        .header("authorization", "Bearer demo")
        .connect()
        .await?;
    for (name, session) in [("http2", h2), ("websocket", ws)] {
        let greets = session.open::<Greet>().await?;
        let (reply, mut replies) = libchan_core::channel(1);
        greets
            .send(Greet {
                name: name.into(),
                reply,
            })
            .await
            .map_err(|e| e.error)?;
        println!("{name}: {:?}", replies.recv().await?);
    }
    let refused = H2Client::new(addr.to_string(), config).connect().await;
    println!("without credentials: {}", refused.expect_err("refused"));
    Ok(())
}
