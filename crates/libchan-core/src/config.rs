//! Limits and session configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Codec;

/// Limits a session enforces on what its peer may send.
///
/// Every limit is announced to the peer in the handshake. Exceeding one gives an
/// [`ErrorKind::Limit`](crate::ErrorKind::Limit) error that names the limit and the value.
///
/// ```
/// use libchan_core::Limits;
/// let limits = Limits { max_message_size: 1 << 20, ..Limits::default() };
/// assert_eq!(limits.max_frame_size, 256 * 1024);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes (16 KiB ..= 16 MiB - 1).
    pub max_frame_size: u32,
    /// Largest message accepted, in bytes (header, payload and references).
    pub max_message_size: u32,
    /// Credit granted to the peer for each stream, in bytes (at least 64 KiB).
    pub initial_window: u32,
    /// Streams the peer may have open at once.
    pub max_streams: u32,
    /// Top-level channels opened by the peer and not yet accepted.
    pub max_pending_accepts: u32,
    /// File descriptors attached to one message.
    pub max_fds_per_message: u16,
    /// References (channels, streams, fds) in one message.
    pub max_refs_per_message: u16,
    /// Bytes the session may hold for the application over all streams before
    /// partially received large messages stop getting credit beyond the window (local,
    /// not announced). With it, a session holds at most about
    /// `max_session_buffer + max_streams × initial_window` bytes.
    pub max_session_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 256 * 1024,
            max_message_size: 128 * 1024 * 1024,
            initial_window: 256 * 1024,
            max_streams: 16 * 1024,
            max_pending_accepts: 16 * 1024,
            max_fds_per_message: 16,
            max_refs_per_message: 1024,
            max_session_buffer: 256 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Smallest allowed [`initial_window`](Limits::initial_window).
    pub const MIN_WINDOW: u32 = 64 * 1024;
    /// Smallest allowed [`max_frame_size`](Limits::max_frame_size).
    pub const MIN_FRAME_SIZE: u32 = 16 * 1024;
    /// Largest allowed [`max_frame_size`](Limits::max_frame_size) (24-bit length field).
    pub const MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

    /// Checks that the limits are within the ranges the protocol allows.
    pub fn validate(&self) -> Result<(), String> {
        if !(Self::MIN_FRAME_SIZE..=Self::MAX_FRAME_SIZE).contains(&self.max_frame_size) {
            return Err(format!(
                "max_frame_size {} outside {}..={}",
                self.max_frame_size,
                Self::MIN_FRAME_SIZE,
                Self::MAX_FRAME_SIZE
            ));
        }
        if self.initial_window < Self::MIN_WINDOW || self.initial_window > i32::MAX as u32 {
            return Err(format!(
                "initial_window {} outside {}..={}",
                self.initial_window,
                Self::MIN_WINDOW,
                i32::MAX
            ));
        }
        if self.max_message_size < 8 {
            return Err(format!(
                "max_message_size {} below 8",
                self.max_message_size
            ));
        }
        if self.max_fds_per_message > 253 {
            return Err(format!(
                "max_fds_per_message {} above 253 (SCM_MAX_FD)",
                self.max_fds_per_message
            ));
        }
        Ok(())
    }
}

/// How a session is set up: codecs offered, limits, timeouts.
///
/// ```
/// # use libchan_core::{Config, Limits};
/// # fn f(codec: impl libchan_core::Codec) {
/// let config = Config::new(codec).handshake_timeout(std::time::Duration::from_secs(5));
/// assert_eq!(config.limits(), &Limits::default());
/// # }
/// ```
#[derive(Clone)]
pub struct Config {
    pub(crate) codecs: Vec<Arc<dyn Codec>>,
    pub(crate) limits: Limits,
    pub(crate) handshake_timeout: Duration,
    pub(crate) keepalive: Option<Duration>,
}

impl Config {
    /// A configuration offering one codec, with default limits.
    pub fn new(codec: impl Codec) -> Self {
        Config {
            codecs: vec![Arc::new(codec)],
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(10),
            keepalive: None,
        }
    }

    /// Offers another codec, after those already offered (lower preference).
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codecs.push(Arc::new(codec));
        self
    }

    /// Sets the limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long the handshake may take before the connection is dropped (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The configured handshake timeout (transports bound their own handshakes, such as
    /// TLS, by it too).
    pub fn handshake_timeout_value(&self) -> Duration {
        self.handshake_timeout
    }

    /// Sends a ping after this much idle time and drops the connection if the peer does
    /// not answer within the same interval (default: off).
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = Some(interval);
        self
    }

    /// Names of the offered codecs, in order of preference.
    pub fn codec_names(&self) -> Vec<String> {
        self.codecs.iter().map(|c| c.name().to_owned()).collect()
    }

    pub(crate) fn find_codec(&self, name: &str) -> Option<Arc<dyn Codec>> {
        self.codecs.iter().find(|c| c.name() == name).cloned()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("codecs", &self.codec_names())
            .field("limits", &self.limits)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}
