//! Errors that users can branch on.

use std::fmt;
use std::sync::Arc;

/// What went wrong, in a category a program can branch on.
///
/// A clean end of stream is never an error: [`Receiver::recv`](crate::Receiver::recv)
/// returns `Ok(None)` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection to the peer was lost (IO error, the peer vanished, or the session
    /// ended before this channel was closed by its sender).
    ConnectionLost,
    /// The peer closed the channel with an application error; the message is the peer's.
    Remote,
    /// A received message could not be decoded as the expected type. Only that message is
    /// lost; the channel keeps working.
    Decode,
    /// A value could not be encoded by the session's codec.
    Encode,
    /// A configured limit was exceeded; the message names the limit and the value.
    Limit,
    /// The peer broke the wire protocol.
    Protocol,
    /// The handshake failed (not a libchan peer, version or codec mismatch, timeout).
    Handshake,
    /// Local misuse: the handle or session was closed or moved, or used outside a session.
    Closed,
    /// The peer refused a channel (for example because its stream limit was reached).
    Refused,
    /// The channel was reset: the other end was dropped before the stream finished.
    Reset,
    /// A transport IO error while setting up a connection.
    Io,
}

/// The error type of libchan.
///
/// Cheap to clone; [`kind`](Error::kind) and the `is_*` predicates say what happened,
/// `Display` says it in words.
///
/// ```
/// use libchan_core::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Remote, "disk full");
/// assert!(e.is_remote());
/// assert_eq!(e.to_string(), "peer error: disk full");
/// ```
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// Creates an error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: None,
            }),
        }
    }

    /// Creates an error of `kind` with a message and a cause.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: Some(Arc::new(source)),
            }),
        }
    }

    /// An error about a limit: names the limit, its value and the offending value.
    ///
    /// ```
    /// let e = libchan_core::Error::limit("max_message_size", 1024, 5000);
    /// assert!(e.is_limit());
    /// assert_eq!(e.to_string(), "limit: max_message_size exceeded: 5000 > limit 1024");
    /// ```
    pub fn limit(limit: &str, max: u64, value: u64) -> Self {
        Error::new(
            ErrorKind::Limit,
            format!("{limit} exceeded: {value} > limit {max}"),
        )
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, without the category prefix. For [`ErrorKind::Remote`] this is exactly
    /// what the peer sent.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// True if the connection was lost.
    pub fn is_connection_lost(&self) -> bool {
        self.kind() == ErrorKind::ConnectionLost
    }

    /// True if the peer closed the channel with an application error.
    pub fn is_remote(&self) -> bool {
        self.kind() == ErrorKind::Remote
    }

    /// True if a received message could not be decoded.
    pub fn is_decode(&self) -> bool {
        self.kind() == ErrorKind::Decode
    }

    /// True if a limit was exceeded.
    pub fn is_limit(&self) -> bool {
        self.kind() == ErrorKind::Limit
    }

    /// True for local misuse (a closed or moved handle, a closed session).
    pub fn is_closed(&self) -> bool {
        self.kind() == ErrorKind::Closed
    }

    /// True if the peer broke the protocol.
    pub fn is_protocol(&self) -> bool {
        self.kind() == ErrorKind::Protocol
    }

    /// True if the handshake failed.
    pub fn is_handshake(&self) -> bool {
        self.kind() == ErrorKind::Handshake
    }

    /// True if the other end reset the channel.
    pub fn is_reset(&self) -> bool {
        self.kind() == ErrorKind::Reset
    }

    /// True if the peer refused a channel.
    pub fn is_refused(&self) -> bool {
        self.kind() == ErrorKind::Refused
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }

    pub(crate) fn decode(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Decode, message)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Protocol, message)
    }

    pub(crate) fn lost(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::ConnectionLost, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind() {
            ErrorKind::ConnectionLost => "connection lost",
            ErrorKind::Remote => "peer error",
            ErrorKind::Decode => "decode error",
            ErrorKind::Encode => "encode error",
            ErrorKind::Limit => "limit",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Handshake => "handshake failed",
            ErrorKind::Closed => "closed",
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Io => "io error",
        };
        write!(f, "{prefix}: {}", self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind())
            .field("message", &self.inner.message);
        if let Some(s) = &self.inner.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind() {
            ErrorKind::ConnectionLost => std::io::ErrorKind::ConnectionAborted,
            ErrorKind::Reset => std::io::ErrorKind::ConnectionReset,
            ErrorKind::Closed => std::io::ErrorKind::BrokenPipe,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// The error of [`Sender::send`](crate::Sender::send): the message is handed back.
pub struct SendError<T> {
    /// The message that was not sent.
    pub message: T,
    /// Why it was not sent.
    pub error: Error,
}

impl<T> SendError<T> {
    /// Returns the message that was not sent.
    pub fn into_inner(self) -> T {
        self.message
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send failed: {}", self.error)
    }
}

impl<T> std::error::Error for SendError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The error of [`Sender::try_send`](crate::Sender::try_send): the message is handed back.
pub enum TrySendError<T> {
    /// The channel has no capacity right now.
    Full(T),
    /// The message could not be sent at all; the error says why.
    Failed(SendError<T>),
}

impl<T> TrySendError<T> {
    /// Returns the message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Full(t) => t,
            TrySendError::Failed(e) => e.message,
        }
    }

    /// True if the channel was merely full.
    pub fn is_full(&self) -> bool {
        matches!(self, TrySendError::Full(_))
    }
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl<T> fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("channel full"),
            TrySendError::Failed(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<T> std::error::Error for TrySendError<T> {}
