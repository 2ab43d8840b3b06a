//! # libchan-core
//!
//! Typed, nestable channels between processes, as Go channels are between goroutines.
//!
//! A program sends typed messages on a [`Sender`] and receives them from a [`Receiver`]. A
//! message may carry other channel ends, byte streams ([`ByteStream`]) and file descriptors
//! ([`Fd`]), nested to any depth and in either direction; on the other side each one works
//! exactly as it did locally. The same code runs in memory ([`Session::mem_pair`]), over
//! unix sockets and tcp (the `libchan-unix` and `libchan-tcp` crates), and over any
//! transport that implements [`driver::Link`] (a byte pipe) or [`Connection`] (native
//! streams).
//!
//! This crate holds the types, the seams, the wire protocol and the session layer; it has
//! no transport of its own besides the in-memory one.
//!
//! ## Getting started
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! use libchan_core::{channel, Sender, Session};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Request { n: u32, reply: Sender<u32> }
//!
//! let (client, server) = Session::mem_pair();
//! tokio::spawn(async move {
//!     let mut requests = server.accept::<Request>().await?.expect("a channel");
//!     while let Some(req) = requests.recv().await? {
//!         let _ = req.reply.send(req.n * 2).await;
//!     }
//!     Ok::<_, libchan_core::Error>(())
//! });
//! let requests = client.open::<Request>().await?;
//! let (reply, mut replies) = channel(1);
//! requests.send(Request { n: 21, reply }).await.map_err(|e| e.error)?;
//! assert_eq!(replies.recv().await?, Some(42));
//! # Ok(()) }
//! ```
//!
//! ## Design
//!
//! ```text
//!  application   Sender<T> / Receiver<T> / ByteStream / Fd      (serde types, any nesting)
//!       |
//!  session       encode/decode with a Codec; ends in a message become references to
//!       |        streams opened with the message; forwarding tasks where needed
//!  seam          Connection: open/accept streams, messages and bytes with flow control
//!       |                                   \
//!  mux           Mux (pure state machine)    native-stream transports (HTTP/2, ...)
//!       |        + driver (reader/writer tasks)
//!  seam          Link: a byte pipe, optionally passing descriptors
//!       |
//!  transport     unix (SCM_RIGHTS), tcp, tls, websocket, yours
//! ```
//!
//! ## Semantics
//!
//! * **Order**: messages of one channel arrive in the order they were sent by one sender.
//! * **Backpressure**: [`Sender::send`] waits while the peer's window for the channel is
//!   full; memory per channel is bounded by the limits in [`Limits`].
//! * **End of stream**: when every clone of a Sender is dropped or one calls
//!   [`Sender::close`], the receiver gets every message sent before, then `Ok(None)`.
//! * **Errors**: [`Sender::close_with_error`] delivers the peer's message as an
//!   [`ErrorKind::Remote`] error after the messages sent before it. When a connection
//!   drops, messages already received are still delivered, then every receive, send and
//!   accept fails with [`ErrorKind::ConnectionLost`]; messages still in flight are lost and
//!   a successful `send` does not mean the peer received the message
//!   ([`Sender::flush`] says it left this process). [`Sender::delivered`] closes a
//!   channel and returns only once the receiving application took every message and the
//!   end; if it fails, some of the messages may have been taken and some not.
//! * **Shutdown**: [`Session::close`] stops new channels both ways while open ones finish;
//!   [`Session::drain`] waits for that, with a deadline after which it aborts.
//!
//! ## Cancel safety
//!
//! [`Receiver::recv`] and [`Session::accept`] are cancel safe. [`Sender::send`] dropped
//! before completion has not sent the message.

pub mod attachment;
mod blob;
#[cfg(feature = "cbor")]
pub mod cbor;
pub mod channel;
pub mod codec;
pub mod config;
pub mod conn;
pub mod driver;
pub mod error;
pub mod frame;
pub mod message;
pub mod mux;
pub mod session;
mod spin;
pub mod stream;

pub use attachment::{Attachment, AttachmentKind};
pub use blob::Blob;
pub use channel::{channel, Receiver, Sender};
pub use codec::Codec;
pub use config::{Config, Limits};
pub use conn::{Connection, ConnectionStats, PeerIdentity};
pub use error::{Error, ErrorKind, SendError, TrySendError};
pub use mux::Role;
pub use session::{Message, Session, SessionStats};
pub use stream::{pipe, ByteStream, Fd};

pub use erased_serde;
