//! Frames of the libchan multiplexing protocol: pure encoders and a total decoder.
//!
//! Every frame is a 9-byte header followed by `length` payload bytes:
//!
//! ```text
//! +-----------------------+-----------+-----------+-------------------------------+
//! | length (24, BE)       | type (8)  | flags (8) | stream id (32, BE, top bit 0) |
//! +-----------------------+-----------+-----------+-------------------------------+
//! ```
//!
//! See docs/PROTOCOL.md for the meaning of every field.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of a frame header in bytes.
pub const HEADER_LEN: usize = 9;
/// Magic bytes at the start of a HELLO payload.
pub const MAGIC: [u8; 4] = *b"LCHN";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Largest HELLO payload accepted (checked before any limit is known).
pub const MAX_HELLO_LEN: usize = 4096;

/// A frame type code. Unknown codes from a newer peer are kept, and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Session handshake (stream 0, first frame each way).
    pub const HELLO: FrameType = FrameType(0x0);
    /// Opens a stream.
    pub const OPEN: FrameType = FrameType(0x1);
    /// Stream bytes.
    pub const DATA: FrameType = FrameType(0x2);
    /// Flow-control credit for a stream.
    pub const CREDIT: FrameType = FrameType(0x3);
    /// Ends a stream's direction with an application error.
    pub const CLOSE: FrameType = FrameType(0x4);
    /// Aborts a stream in both directions.
    pub const RESET: FrameType = FrameType(0x5);
    /// Liveness probe (stream 0).
    pub const PING: FrameType = FrameType(0x6);
    /// Ends the session (stream 0).
    pub const GOAWAY: FrameType = FrameType(0x7);
    /// Descriptor handshake (stream 0): "descriptors follow" / "read with them now".
    pub const FDS: FrameType = FrameType(0x8);
}

/// Flag of DATA: the sender's direction of the stream ends after this frame.
pub const FLAG_FIN: u8 = 0x1;
/// Flag of PING and FDS: this is the answer.
pub const FLAG_ACK: u8 = 0x1;

/// What kind of stream an OPEN creates, from the opener's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// A channel whose messages flow from the acceptor to the opener (a Sender handed out).
    OpenerReceives,
    /// A channel whose messages flow from the opener to the acceptor.
    OpenerSends,
    /// A byte stream, both directions.
    Bytes,
}

impl StreamKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            StreamKind::OpenerReceives => 1,
            StreamKind::OpenerSends => 2,
            StreamKind::Bytes => 3,
        }
    }

    /// Parses a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(StreamKind::OpenerReceives),
            2 => Some(StreamKind::OpenerSends),
            3 => Some(StreamKind::Bytes),
            _ => None,
        }
    }
}

/// A RESET reason code. Unknown codes are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reason(pub u32);

impl Reason {
    /// The receiving end was dropped.
    pub const CANCEL: Reason = Reason(0);
    /// The stream broke the protocol (data after end, credit exceeded, bad header).
    pub const PROTOCOL: Reason = Reason(1);
    /// A limit was exceeded (message size, fds, references).
    pub const LIMIT: Reason = Reason(2);
    /// The stream was refused (too many streams or pending accepts).
    pub const REFUSED: Reason = Reason(3);
    /// GOAWAY: normal end of the session.
    pub const NO_ERROR: Reason = Reason(0);

    /// A short description.
    pub fn describe(self) -> &'static str {
        match self.0 {
            0 => "cancelled",
            1 => "protocol error",
            2 => "limit exceeded",
            3 => "refused",
            _ => "unknown reason",
        }
    }
}

/// The HELLO payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// 1 = dialer (odd stream ids), 2 = listener (even stream ids).
    pub role: u8,
    /// Largest frame payload the sender accepts.
    pub max_frame_size: u32,
    /// Largest message the sender accepts.
    pub max_message_size: u32,
    /// Credit the sender grants for each stream.
    pub initial_window: u32,
    /// Streams the sender accepts open at once.
    pub max_streams: u32,
    /// Fds per message the sender accepts.
    pub max_fds_per_message: u16,
    /// References per message the sender accepts.
    pub max_refs_per_message: u16,
    /// Codec names, in order of preference.
    pub codecs: Vec<String>,
}

impl Hello {
    /// The HELLO of this protocol version announcing `limits`; `role` is 1 (dialer) or 2
    /// (listener).
    pub fn new(role: u8, limits: &crate::config::Limits, codecs: Vec<String>) -> Hello {
        Hello {
            version: VERSION,
            role,
            max_frame_size: limits.max_frame_size,
            max_message_size: limits.max_message_size,
            initial_window: limits.initial_window,
            max_streams: limits.max_streams,
            max_fds_per_message: limits.max_fds_per_message,
            max_refs_per_message: limits.max_refs_per_message,
            codecs,
        }
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// HELLO.
    Hello(Hello),
    /// OPEN: a new stream.
    Open {
        /// The new stream id.
        stream: u32,
        /// Its kind.
        kind: StreamKind,
        /// The channel whose next message references it (0 for a top-level channel).
        parent: u32,
    },
    /// DATA.
    Data {
        /// Stream id.
        stream: u32,
        /// The sender's direction ends after this frame.
        fin: bool,
        /// The bytes.
        payload: Bytes,
    },
    /// CREDIT.
    Credit {
        /// Stream id.
        stream: u32,
        /// Bytes of credit added.
        increment: u32,
    },
    /// CLOSE: the sender's direction ends with an application error.
    Close {
        /// Stream id.
        stream: u32,
        /// The application's message (UTF-8).
        message: String,
    },
    /// RESET.
    Reset {
        /// Stream id.
        stream: u32,
        /// Why.
        reason: Reason,
    },
    /// PING.
    Ping {
        /// Answer to a ping.
        ack: bool,
        /// Echoed verbatim.
        opaque: u64,
    },
    /// GOAWAY.
    GoAway {
        /// Highest stream id opened by the receiver of this frame that was processed.
        last_stream: u32,
        /// Why.
        reason: Reason,
        /// Details (UTF-8).
        message: String,
    },
    /// FDS: the sender is about to send descriptors (`ack` false), or the answer: the
    /// sender now reads descriptors with the bytes (`ack` true). PROTOCOL.md §8.
    Fds {
        /// The answer.
        ack: bool,
    },
    /// A frame of a type this version does not know; ignored.
    Unknown {
        /// Its type.
        ty: FrameType,
    },
}

/// A frame the peer sent that breaks the protocol. Always fatal to the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, FrameError> {
    Err(FrameError(msg.into()))
}

/// Decodes one frame from the front of `buf`, if a whole one is there.
///
/// ```
/// use bytes::BytesMut;
/// use libchan_core::frame::{decode, encode_credit, Frame};
/// let mut buf = BytesMut::new();
/// encode_credit(&mut buf, 3, 1024);
/// let mut partial = BytesMut::from(&buf[..5]);
/// assert_eq!(decode(&mut partial, 65536, false), Ok(None)); // needs more bytes
/// assert_eq!(
///     decode(&mut buf, 65536, false),
///     Ok(Some(Frame::Credit { stream: 3, increment: 1024 }))
/// );
/// ```
///
/// `max_frame_size` is this side's limit; `first` requires a HELLO (the first frame of a
/// connection), which is checked against [`MAX_HELLO_LEN`] instead. Total: any input gives a
/// frame, `Ok(None)` (need more bytes) or an error, never a panic, and allocates nothing
/// beyond the frame it returns.
pub fn decode(
    buf: &mut BytesMut,
    max_frame_size: u32,
    first: bool,
) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    let ty = FrameType(buf[3]);
    let flags = buf[4];
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
    if first {
        if ty != FrameType::HELLO {
            return err(format!(
                "expected a HELLO frame (type 0) first, got type {} (not a libchan peer?)",
                ty.0
            ));
        }
        if len > MAX_HELLO_LEN {
            return err(format!(
                "HELLO of {len} bytes exceeds max hello length {MAX_HELLO_LEN}"
            ));
        }
    } else if len > max_frame_size as usize {
        return err(format!(
            "frame of {len} bytes exceeds max_frame_size {max_frame_size}"
        ));
    }
    if stream & 0x8000_0000 != 0 {
        return err(format!("reserved bit set in stream id {stream:#x}"));
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let mut p = buf.split_to(len).freeze();
    let frame = match ty {
        FrameType::HELLO => {
            if stream != 0 {
                return err("HELLO on a stream other than 0");
            }
            if !first {
                return err("second HELLO");
            }
            Frame::Hello(decode_hello(&mut p)?)
        }
        FrameType::OPEN => {
            need_stream(stream, "OPEN")?;
            if p.len() != 5 {
                return err(format!("OPEN payload of {} bytes, expected 5", p.len()));
            }
            let code = p.get_u8();
            let kind = StreamKind::from_code(code)
                .ok_or_else(|| FrameError(format!("OPEN with unknown stream kind {code}")))?;
            Frame::Open {
                stream,
                kind,
                parent: p.get_u32(),
            }
        }
        FrameType::DATA => {
            need_stream(stream, "DATA")?;
            Frame::Data {
                stream,
                fin: flags & FLAG_FIN != 0,
                payload: p,
            }
        }
        FrameType::CREDIT => {
            need_stream(stream, "CREDIT")?;
            if p.len() != 4 {
                return err(format!("CREDIT payload of {} bytes, expected 4", p.len()));
            }
            let increment = p.get_u32();
            if increment > i32::MAX as u32 {
                return err(format!("CREDIT increment {increment} outside 0..=2^31-1"));
            }
            Frame::Credit { stream, increment }
        }
        FrameType::CLOSE => {
            need_stream(stream, "CLOSE")?;
            Frame::Close {
                stream,
                message: utf8(&p, "CLOSE")?,
            }
        }
        FrameType::RESET => {
            need_stream(stream, "RESET")?;
            if p.len() != 4 {
                return err(format!("RESET payload of {} bytes, expected 4", p.len()));
            }
            Frame::Reset {
                stream,
                reason: Reason(p.get_u32()),
            }
        }
        FrameType::PING => {
            if stream != 0 || p.len() != 8 {
                return err("PING must be on stream 0 with 8 bytes");
            }
            Frame::Ping {
                ack: flags & FLAG_ACK != 0,
                opaque: p.get_u64(),
            }
        }
        FrameType::GOAWAY => {
            if stream != 0 || p.len() < 8 {
                return err("GOAWAY must be on stream 0 with at least 8 bytes");
            }
            let last_stream = p.get_u32();
            let reason = Reason(p.get_u32());
            Frame::GoAway {
                last_stream,
                reason,
                message: utf8(&p, "GOAWAY")?,
            }
        }
        FrameType::FDS => {
            if stream != 0 || !p.is_empty() {
                return err("FDS must be on stream 0 with an empty payload");
            }
            Frame::Fds {
                ack: flags & FLAG_ACK != 0,
            }
        }
        ty => Frame::Unknown { ty },
    };
    Ok(Some(frame))
}

fn need_stream(stream: u32, what: &str) -> Result<(), FrameError> {
    if stream == 0 {
        return err(format!("{what} on stream 0"));
    }
    Ok(())
}

fn utf8(p: &[u8], what: &str) -> Result<String, FrameError> {
    std::str::from_utf8(p)
        .map(str::to_owned)
        .map_err(|_| FrameError(format!("{what} message is not UTF-8")))
}

fn decode_hello(p: &mut Bytes) -> Result<Hello, FrameError> {
    if p.len() < 29 {
        return err(format!(
            "HELLO payload of {} bytes, expected at least 29",
            p.len()
        ));
    }
    let mut magic = [0u8; 4];
    p.copy_to_slice(&mut magic);
    if magic != MAGIC {
        return err(format!(
            "bad magic {magic:02x?}, expected {MAGIC:02x?} (not a libchan peer?)"
        ));
    }
    let version = p.get_u16();
    let role = p.get_u8();
    let _reserved = p.get_u8();
    let max_frame_size = p.get_u32();
    let max_message_size = p.get_u32();
    let initial_window = p.get_u32();
    let max_streams = p.get_u32();
    let max_fds_per_message = p.get_u16();
    let max_refs_per_message = p.get_u16();
    let n = p.get_u8();
    let mut codecs = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        if p.is_empty() {
            return err("HELLO codec list truncated");
        }
        let l = usize::from(p.get_u8());
        if p.len() < l {
            return err("HELLO codec name truncated");
        }
        let name = p.split_to(l);
        codecs.push(utf8(&name, "HELLO codec name")?);
    }
    if !p.is_empty() {
        return err(format!("{} trailing bytes after HELLO", p.len()));
    }
    Ok(Hello {
        version,
        role,
        max_frame_size,
        max_message_size,
        initial_window,
        max_streams,
        max_fds_per_message,
        max_refs_per_message,
        codecs,
    })
}

fn header(out: &mut BytesMut, len: usize, ty: FrameType, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(ty.0);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// Encodes a HELLO.
pub fn encode_hello(out: &mut BytesMut, h: &Hello) {
    let names: Vec<&[u8]> = h
        .codecs
        .iter()
        .take(255)
        .map(|c| &c.as_bytes()[..c.len().min(255)])
        .collect();
    let len = 29 + names.iter().map(|n| 1 + n.len()).sum::<usize>();
    header(out, len, FrameType::HELLO, 0, 0);
    out.put_slice(&MAGIC);
    out.put_u16(h.version);
    out.put_u8(h.role);
    out.put_u8(0);
    out.put_u32(h.max_frame_size);
    out.put_u32(h.max_message_size);
    out.put_u32(h.initial_window);
    out.put_u32(h.max_streams);
    out.put_u16(h.max_fds_per_message);
    out.put_u16(h.max_refs_per_message);
    out.put_u8(names.len() as u8);
    for n in names {
        out.put_u8(n.len() as u8);
        out.put_slice(n);
    }
}

/// Encodes an OPEN.
pub fn encode_open(out: &mut BytesMut, stream: u32, kind: StreamKind, parent: u32) {
    header(out, 5, FrameType::OPEN, 0, stream);
    out.put_u8(kind.code());
    out.put_u32(parent);
}

/// Encodes a DATA header for `len` payload bytes; the caller appends the payload.
pub fn encode_data_header(out: &mut BytesMut, stream: u32, len: usize, fin: bool) {
    header(
        out,
        len,
        FrameType::DATA,
        if fin { FLAG_FIN } else { 0 },
        stream,
    );
}

/// Patches the length of a frame header written at `at` in `out`.
pub fn patch_len(out: &mut [u8], at: usize, len: usize) {
    out[at] = (len >> 16) as u8;
    out[at + 1] = (len >> 8) as u8;
    out[at + 2] = len as u8;
}

/// Sets flags of a frame header written at `at`.
pub fn patch_flags(out: &mut [u8], at: usize, flags: u8) {
    out[at + 4] = flags;
}

/// Encodes a CREDIT.
pub fn encode_credit(out: &mut BytesMut, stream: u32, increment: u32) {
    header(out, 4, FrameType::CREDIT, 0, stream);
    out.put_u32(increment);
}

/// Encodes a CLOSE (message truncated to fit `max_frame_size`).
pub fn encode_close(out: &mut BytesMut, stream: u32, message: &str, max_frame_size: u32) {
    let m = truncate_utf8(message, max_frame_size as usize);
    header(out, m.len(), FrameType::CLOSE, 0, stream);
    out.put_slice(m.as_bytes());
}

/// Encodes a RESET.
pub fn encode_reset(out: &mut BytesMut, stream: u32, reason: Reason) {
    header(out, 4, FrameType::RESET, 0, stream);
    out.put_u32(reason.0);
}

/// Encodes a PING.
pub fn encode_ping(out: &mut BytesMut, ack: bool, opaque: u64) {
    header(out, 8, FrameType::PING, if ack { FLAG_ACK } else { 0 }, 0);
    out.put_u64(opaque);
}

/// Encodes an FDS (PROTOCOL.md §8).
pub fn encode_fds(out: &mut BytesMut, ack: bool) {
    header(out, 0, FrameType::FDS, if ack { FLAG_ACK } else { 0 }, 0);
}

/// Encodes a GOAWAY (message truncated to fit `max_frame_size`).
pub fn encode_goaway(
    out: &mut BytesMut,
    last_stream: u32,
    reason: Reason,
    message: &str,
    max_frame_size: u32,
) {
    let m = truncate_utf8(message, max_frame_size as usize - 8);
    header(out, 8 + m.len(), FrameType::GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(reason.0);
    out.put_slice(m.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8], first: bool) -> Frame {
        let mut b = BytesMut::from(bytes);
        let f = decode(&mut b, 1 << 16, first)
            .expect("valid")
            .expect("complete");
        assert!(b.is_empty());
        f
    }

    #[test]
    fn open_bytes() {
        let mut out = BytesMut::new();
        encode_open(&mut out, 3, StreamKind::OpenerSends, 0);
        assert_eq!(&out[..], &[0, 0, 5, 1, 0, 0, 0, 0, 3, 2, 0, 0, 0, 0]);
        assert_eq!(
            roundtrip(&out, false),
            Frame::Open {
                stream: 3,
                kind: StreamKind::OpenerSends,
                parent: 0
            }
        );
    }

    #[test]
    fn truncated_frames_need_more() {
        let mut out = BytesMut::new();
        encode_credit(&mut out, 5, 100);
        for cut in 0..out.len() {
            let mut b = BytesMut::from(&out[..cut]);
            assert_eq!(decode(&mut b, 1 << 16, false), Ok(None));
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1][..]);
        let e = decode(&mut b, 65536, false).unwrap_err();
        assert!(
            e.0.contains("16777215") && e.0.contains("max_frame_size 65536"),
            "{e}"
        );
        assert!(b.capacity() < 1 << 20);
    }

    #[test]
    fn garbage_first_frame() {
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let e = decode(&mut b, 65536, true).unwrap_err();
        assert!(e.0.contains("expected a HELLO"), "{e}");
    }

    #[test]
    fn hello_roundtrip() {
        let h = Hello {
            version: 1,
            role: 1,
            max_frame_size: 65536,
            max_message_size: 1 << 20,
            initial_window: 1 << 18,
            max_streams: 100,
            max_fds_per_message: 4,
            max_refs_per_message: 8,
            codecs: vec!["cbor".into(), "json".into()],
        };
        let mut out = BytesMut::new();
        encode_hello(&mut out, &h);
        assert_eq!(roundtrip(&out, true), Frame::Hello(h));
    }

    #[test]
    fn decode_is_total_on_all_short_inputs() {
        // Every 1- and 2-byte payload for every frame type: no panic.
        for ty in 0..=8u8 {
            for len in 0..=2usize {
                for v in 0..=255u8 {
                    let mut b = BytesMut::new();
                    header(
                        &mut b,
                        len,
                        FrameType(ty),
                        0xff,
                        if ty == 0 { 0 } else { 1 },
                    );
                    for _ in 0..len {
                        b.put_u8(v);
                    }
                    let _ = decode(&mut b.clone(), 65536, false);
                    let _ = decode(&mut b, 65536, true);
                }
            }
        }
    }
}
