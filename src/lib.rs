//! # libchan
//!
//! Typed, nestable channels between processes: what Go channels are to goroutines,
//! libchan is to processes. Send typed messages on a [`Sender`]; a message may carry other
//! [`Sender`]s and [`Receiver`]s, [`ByteStream`]s and file descriptors ([`Fd`]), nested to
//! any depth and in either direction. The same code runs in memory
//! ([`Session::mem_pair`]), over unix sockets (with real descriptor passing) and over tcp.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan::Error> {
//! use libchan::{channel, Sender, Session};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Ask { question: String, reply: Sender<String> }
//!
//! let (client, server) = libchan::unix::pair(&libchan::config()).await?;
//! tokio::spawn(async move {
//!     let mut asks = server.accept::<Ask>().await?.expect("a channel");
//!     while let Some(ask) = asks.recv().await? {
//!         let _ = ask.reply.send(format!("you asked: {}", ask.question)).await;
//!     }
//!     Ok::<_, libchan::Error>(())
//! });
//! let asks = client.open::<Ask>().await?;
//! let (reply, mut answers) = channel(1);
//! asks.send(Ask { question: "ping?".into(), reply }).await.map_err(|e| e.error)?;
//! assert_eq!(answers.recv().await?.as_deref(), Some("you asked: ping?"));
//! # Ok(()) }
//! ```
//!
//! ## Addressing by URL
//!
//! [`listen`] and [`connect`] take `unix:///path`, `tcp://host:port`, `tls://host:port`,
//! `http://` and `https://host:port/path` (HTTP/2, with the WebSocket fallback on request)
//! and `ws://` / `wss://`; [`Options`] adds what a URL does not say (codec and limits,
//! TLS, credentials, keepalive). A URL whose transport is not compiled in is an error that
//! names the feature to enable. docs/GUIDE.md shows the common patterns.
//!
//! ## Crate features
//!
//! Each is additive. On by default:
//!
//! * `unix` — the unix-socket transport ([`unix`], `libchan-unix`).
//! * `tcp` — the tcp transport ([`tcp`], `libchan-tcp`).
//! * `cbor` — the CBOR codec ([`cbor`], `libchan-codec-cbor`), used by [`config()`].
//!
//! Off by default:
//!
//! * `tls` — the TLS transport (`tls`, `libchan-tls`: rustls with the *ring* provider,
//!   mutual TLS, the peer's verified identity on the session).
//! * `h2` — the HTTP/2 transport (`h2`, `libchan-h2`: one HTTP/2 stream per channel, h2c
//!   and TLS, an `Endpoint` to mount in an existing hyper server); turns on `tls` and `ws`,
//!   which it is built on.
//! * `ws` — the WebSocket transport (`ws`, `libchan-ws`: ws and wss).
//! * `json` — the JSON codec (`json`, `libchan-codec-json`).
//! * `msgpack` — the MessagePack codec (`msgpack`, `libchan-codec-msgpack`).
//! * `protobuf` — the Protocol Buffers codec for prost messages (`protobuf`,
//!   `libchan-codec-protobuf`).
//! * `xml` — the XML codec (`xml`, `libchan-codec-xml`).
//!
//! See [`libchan_core`] for the semantics (ordering, end of stream, errors, delivery when a
//! connection drops) and the design.

pub use libchan_core::*;

/// The CBOR codec.
#[cfg(feature = "cbor")]
pub use libchan_codec_cbor as cbor;
/// The JSON codec.
#[cfg(feature = "json")]
pub use libchan_codec_json as json;
/// The MessagePack codec.
#[cfg(feature = "msgpack")]
pub use libchan_codec_msgpack as msgpack;
/// The Protocol Buffers codec.
#[cfg(feature = "protobuf")]
pub use libchan_codec_protobuf as protobuf;
/// The XML codec.
#[cfg(feature = "xml")]
pub use libchan_codec_xml as xml;
/// The HTTP/2 transport.
#[cfg(feature = "h2")]
pub use libchan_h2 as h2;
/// The tcp transport.
#[cfg(feature = "tcp")]
pub use libchan_tcp as tcp;
/// The TLS transport.
#[cfg(feature = "tls")]
pub use libchan_tls as tls;
/// The unix-socket transport.
#[cfg(feature = "unix")]
pub use libchan_unix as unix;
/// The WebSocket transport.
#[cfg(feature = "ws")]
pub use libchan_ws as ws;

pub mod gateway;
mod url;
#[cfg(feature = "cbor")]
pub use url::{connect, listen};
pub use url::{Listener, Options};

/// The default configuration: the CBOR codec and default limits.
///
/// ```
/// assert_eq!(libchan::config().codec_names(), ["cbor"]);
/// ```
#[cfg(feature = "cbor")]
pub fn config() -> Config {
    Config::new(libchan_codec_cbor::Cbor)
}

/// The README's example, compiled and run as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
