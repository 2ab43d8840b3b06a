//! The stream-provider seam: what the session layer needs from a connection.
//!
//! A [`Connection`] opens and accepts streams and carries whole messages and bytes on them,
//! with per-stream flow control. The multiplexer over any byte pipe ([`crate::driver`])
//! implements it for unix, tcp and every transport that carries one ordered byte stream; a
//! transport with native streams (HTTP/2, QUIC) implements it directly. The session layer
//! ([`crate::Session`]) uses nothing else, so a new transport never touches it.

use std::collections::VecDeque;
use std::fmt;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::frame::StreamKind;
use crate::message::{InMessage, OpenedStreams, OutMessage, WireRef};

/// Counters of a connection, for tests and monitoring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Streams in the connection's table.
    pub streams: usize,
    /// Top-level channels opened by the peer and not accepted yet.
    pub pending_accepts: usize,
    /// Descriptors received and not yet claimed by a message.
    pub unclaimed_fds: usize,
}

/// Who the peer of a connection is, as far as the transport verified it.
///
/// Filled by transports that authenticate: TLS with the peer's certificate chain (mutual
/// TLS on a server, the server's certificate on a client), an HTTP transport with the name
/// its authentication check returned. Plain unix and tcp sessions have none.
///
/// ```
/// let id = libchan_core::PeerIdentity::new()
///     .with_subject_names(vec!["client.example".into()])
///     .with_authenticated_as("alice");
/// assert_eq!(id.subject_names(), ["client.example"]);
/// assert_eq!(id.authenticated_as(), Some("alice"));
/// assert!(id.certificates().is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    certificates: Vec<Vec<u8>>,
    subject_names: Vec<String>,
    authenticated_as: Option<String>,
}

impl PeerIdentity {
    /// An identity with nothing verified yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the peer's verified certificate chain (DER, end-entity certificate first).
    pub fn with_certificates(mut self, chain: Vec<Vec<u8>>) -> Self {
        self.certificates = chain;
        self
    }

    /// Sets the subject names (DNS and URI subject alternative names) of the peer's
    /// verified end-entity certificate.
    pub fn with_subject_names(mut self, names: Vec<String>) -> Self {
        self.subject_names = names;
        self
    }

    /// Sets the name an authentication check accepted the peer as.
    pub fn with_authenticated_as(mut self, name: impl Into<String>) -> Self {
        self.authenticated_as = Some(name.into());
        self
    }

    /// The peer's verified certificate chain, DER, end-entity certificate first; empty
    /// when the peer presented none.
    pub fn certificates(&self) -> &[Vec<u8>] {
        &self.certificates
    }

    /// DNS and URI subject alternative names of the peer's verified certificate.
    pub fn subject_names(&self) -> &[String] {
        &self.subject_names
    }

    /// The name an authentication check accepted the peer as, if one ran.
    pub fn authenticated_as(&self) -> Option<&str> {
        self.authenticated_as.as_deref()
    }
}

/// A connection that opens and accepts streams and carries messages and bytes on them.
///
/// Stream ids are `u32`, namespaced by who opened them ([`Connection::is_local`]). All
/// methods are non-blocking; `poll_*` methods register the task's waker when they return
/// `Pending`. Implementations must be cheap to call on every message.
pub trait Connection: Send + Sync + fmt::Debug + 'static {
    /// Name of the codec agreed in the handshake.
    fn codec(&self) -> &str;
    /// True if descriptors can be passed as such (unix sockets).
    fn can_pass_fds(&self) -> bool;
    /// True if stream `id` was opened by this side.
    fn is_local(&self, id: u32) -> bool;
    /// Opens a top-level stream to the peer.
    fn open(&self, kind: StreamKind) -> Result<u32, Error>;
    /// Waits for a top-level channel opened by the peer; `Ok(None)` when the session is
    /// closing and none is left.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u32>, Error>>;
    /// Takes ownership of stream `id`, opened by the peer for a message on `parent`.
    fn claim(&self, parent: u32, id: u32, kind: StreamKind) -> Result<(), Error>;
    /// Waits until channel `id` can take another message.
    fn poll_send_ready(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>>;
    /// Queues a message on channel `id`; returns the ids of the streams it opened.
    fn send_message(&self, id: u32, msg: OutMessage) -> Result<OpenedStreams, Error>;
    /// [`send_message`](Connection::send_message), also saying whether channel `id` can
    /// take another message right away (what [`poll_send_ready`](Connection::poll_send_ready)
    /// would say now): then the next send skips asking. The default says `false`, so
    /// every send asks.
    fn send_message_then_ready(
        &self,
        id: u32,
        msg: OutMessage,
    ) -> Result<(OpenedStreams, bool), Error> {
        self.send_message(id, msg).map(|ids| (ids, false))
    }
    /// Takes the next message of channel `id`; `Ok(None)` after a clean end.
    fn poll_recv(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<Option<InMessage>, Error>>;
    /// [`poll_recv`](Connection::poll_recv) that may also move further messages of channel
    /// `id` that already arrived into `more` (only messages without references or
    /// descriptors, and a bounded number: the caller takes them before polling again).
    /// The default moves none.
    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        id: u32,
        more: &mut VecDeque<InMessage>,
    ) -> Poll<Result<Option<InMessage>, Error>> {
        let _ = more;
        self.poll_recv(cx, id)
    }
    /// Reads from byte stream `id`; `Ok(0)` at its end.
    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        id: u32,
        buf: &mut [u8],
    ) -> Poll<Result<usize, Error>>;
    /// Writes to byte stream `id`.
    fn poll_write(&self, cx: &mut Context<'_>, id: u32, buf: &[u8]) -> Poll<Result<usize, Error>>;
    /// Waits until everything queued on `id` has been handed to the transport.
    fn poll_flush(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>>;
    /// Waits until the peer's application took everything sent on channel `id` and its
    /// clean end (the send half must have been finished). The default: a
    /// [`Closed`](crate::ErrorKind::Closed) error, for transports that cannot tell.
    fn poll_delivered(&self, _cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        Poll::Ready(Err(Error::new(
            crate::ErrorKind::Closed,
            format!("this transport cannot confirm delivery (stream {id})"),
        )))
    }
    /// Ready once the connection ended, gracefully (both sides closed and every stream
    /// finished) or not. The default is ready at once: transports that cannot tell do not
    /// make [`Session::drain`](crate::Session::drain) wait.
    fn poll_ended(&self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
    /// Ready once the send half of `id` can no longer deliver.
    fn poll_send_closed(&self, cx: &mut Context<'_>, id: u32) -> Poll<()>;
    /// Ends the send half of `id` cleanly.
    fn finish(&self, id: u32);
    /// Ends the send half of `id` with an application error.
    fn close_with_error(&self, id: u32, message: &str);
    /// The local handle of `id` is gone. What is still queued for it is dropped, and the
    /// streams those messages reference are released as by
    /// [`release_refs`](Connection::release_refs); an open receiving direction is reset.
    fn release(&self, id: u32);
    /// [`finish`](Connection::finish) then [`release`](Connection::release): the last
    /// handle of a sending end is gone (one call, so a connection can do both at once).
    fn finish_and_release(&self, id: u32) {
        self.finish(id);
        self.release(id);
    }
    /// Called once for a received message after it was decoded (or not) when it has
    /// something to release: releases the streams it references that the decoder did not
    /// claim, and unpins the local Sender streams it sent back (PROTOCOL.md §7, "Sent
    /// back"). Not called for a message whose references were all claimed and none of
    /// which is a Sender stream of this side.
    fn release_refs(&self, refs: &[WireRef]);
    /// Starts a graceful close (no new channels; existing ones finish).
    fn close(&self);
    /// Drops the connection now.
    fn abort(&self);
    /// The error that ended the connection, if it ended.
    fn error(&self) -> Option<Error>;
    /// Counters.
    fn stats(&self) -> ConnectionStats;
    /// The peer's identity as the transport verified it; `None` by default.
    fn peer_identity(&self) -> Option<&PeerIdentity> {
        None
    }
}
