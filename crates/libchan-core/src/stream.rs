//! Byte streams and file descriptors that travel in messages.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use crate::frame::StreamKind;
use crate::message::{OutRef, RefKind, WireRef};
use crate::session::{with_encode, Attach, NetSession, RefMarker};

/// Creates a connected pair of local byte streams.
///
/// Either end can be kept or sent in a message; over a connection the bytes travel on a
/// stream of their own, with flow control, so a large transfer never stalls channels.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let (mut a, mut b) = libchan_core::pipe();
/// a.write_all(b"hi").await?;
/// a.shutdown().await?;
/// let mut s = String::new();
/// b.read_to_string(&mut s).await?;
/// assert_eq!(s, "hi");
/// # Ok(()) }
/// ```
pub fn pipe() -> (ByteStream, ByteStream) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (ByteStream::local(a), ByteStream::local(b))
}

/// A bidirectional byte stream with half-close (`shutdown` ends the writing direction).
pub struct ByteStream {
    slot: Arc<Mutex<Option<BsInner>>>,
}

enum BsInner {
    Local(DuplexStream),
    Remote(RemoteBytes),
    Io(Box<dyn AsyncReadWrite>),
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

struct RemoteBytes {
    session: Arc<NetSession>,
    id: u32,
}

impl Drop for RemoteBytes {
    fn drop(&mut self) {
        self.session.conn.release(self.id);
    }
}

impl fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteStream").finish_non_exhaustive()
    }
}

impl ByteStream {
    fn local(d: DuplexStream) -> Self {
        ByteStream {
            slot: Arc::new(Mutex::new(Some(BsInner::Local(d)))),
        }
    }

    /// Wraps any tokio byte stream (a socket, a child's stdio...) so it can be sent.
    pub fn from_io(io: impl AsyncRead + AsyncWrite + Send + Unpin + 'static) -> Self {
        ByteStream {
            slot: Arc::new(Mutex::new(Some(BsInner::Io(Box::new(io))))),
        }
    }

    pub(crate) fn remote(session: Arc<NetSession>, id: u32) -> Self {
        ByteStream {
            slot: Arc::new(Mutex::new(Some(BsInner::Remote(RemoteBytes {
                session,
                id,
            })))),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BsInner) -> Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        let mut g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(inner) => f(inner),
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "byte stream was moved into a message",
            ))),
        }
    }
}

impl AsyncRead for ByteStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|inner| match inner {
            BsInner::Local(d) => Pin::new(d).poll_read(cx, buf),
            BsInner::Io(d) => Pin::new(d).poll_read(cx, buf),
            BsInner::Remote(r) => {
                let dst = buf.initialize_unfilled();
                match r.session.conn.poll_read(cx, r.id, dst) {
                    Poll::Ready(Ok(n)) => {
                        buf.advance(n);
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
        })
    }
}

impl AsyncWrite for ByteStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|inner| match inner {
            BsInner::Local(d) => Pin::new(d).poll_write(cx, buf),
            BsInner::Io(d) => Pin::new(d).poll_write(cx, buf),
            BsInner::Remote(r) => r
                .session
                .conn
                .poll_write(cx, r.id, buf)
                .map_err(io::Error::from),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|inner| match inner {
            BsInner::Local(d) => Pin::new(d).poll_flush(cx),
            BsInner::Io(d) => Pin::new(d).poll_flush(cx),
            BsInner::Remote(r) => r.session.conn.poll_flush(cx, r.id).map_err(io::Error::from),
        })
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|inner| match inner {
            BsInner::Local(d) => Pin::new(d).poll_shutdown(cx),
            BsInner::Io(d) => Pin::new(d).poll_shutdown(cx),
            BsInner::Remote(r) => {
                r.session.conn.finish(r.id);
                Poll::Ready(Ok(()))
            }
        })
    }
}

impl ByteStream {
    fn encode(&self, kind: RefKind) -> Result<RefMarker, String> {
        with_encode(|ctx| {
            let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(inner) = taken else {
                return Err("byte stream was already moved into another message".to_owned());
            };
            Ok(ctx.push(
                OutRef::New(kind),
                Some(Box::new(BytesAttach {
                    slot: self.slot.clone(),
                    inner: Some(inner),
                })),
            ))
        })
        .unwrap_or_else(|| {
            Err(
                "a libchan ByteStream can only be serialized by a libchan send on a session"
                    .to_owned(),
            )
        })
    }
}

impl Serialize for ByteStream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.encode(RefKind::ByteStream) {
            Ok(m) => m.serialize(s),
            Err(e) => Err(S::Error::custom(e)),
        }
    }
}

impl<'de> Deserialize<'de> for ByteStream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::attachment::claim_typed(d, "ByteStream", &[RefKind::ByteStream], |a| {
            a.into_byte_stream()
        })
    }
}

pub(crate) fn claim_bytes(
    ctx: &mut crate::session::DecodeCtx<'_>,
    r: WireRef,
) -> Result<ByteStream, String> {
    ctx.session
        .conn
        .claim(ctx.parent, r.id, StreamKind::Bytes)
        .map_err(|e| e.message().to_owned())?;
    Ok(ByteStream::remote(ctx.session.clone(), r.id))
}

struct BytesAttach {
    slot: Arc<Mutex<Option<BsInner>>>,
    inner: Option<BsInner>,
}

impl Attach for BytesAttach {
    fn install(mut self: Box<Self>, session: &Arc<NetSession>, id: u32) {
        let inner = self.inner.take().expect("installed once");
        let mut local = ByteStream {
            slot: Arc::new(Mutex::new(Some(inner))),
        };
        let mut remote = ByteStream::remote(session.clone(), id);
        session.spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
        });
    }

    fn restore(mut self: Box<Self>) {
        if let Some(inner) = self.inner.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(inner);
        }
    }
}

/// A file descriptor sent in a message.
///
/// Over a unix socket it is passed with `SCM_RIGHTS` and the receiver gets a real
/// descriptor ([`into_owned_fd`](Fd::into_owned_fd)). Over transports that cannot pass
/// descriptors (tcp, ...) its contents travel as a byte stream instead: the sender's side
/// copies between the descriptor and the stream, and the receiver gets a [`ByteStream`]
/// ([`into_stream`](Fd::into_stream)). In memory it moves as is.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// let file = std::fs::File::open("/dev/null")?;
/// let fd = libchan_core::Fd::new(file);
/// assert!(fd.is_descriptor());
/// let _owned: std::os::fd::OwnedFd = fd.into_owned_fd().expect("a descriptor");
/// # Ok(()) }
/// ```
pub struct Fd {
    slot: Arc<Mutex<Option<FdInner>>>,
}

enum FdInner {
    Owned(OwnedFd),
    Stream(ByteStream),
}

impl fmt::Debug for Fd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(FdInner::Owned(fd)) => f.debug_tuple("Fd").field(&fd.as_raw_fd()).finish(),
            Some(FdInner::Stream(_)) => f.write_str("Fd(stream)"),
            None => f.write_str("Fd(moved)"),
        }
    }
}

impl Fd {
    /// Wraps a descriptor (a `File`, a socket, an `OwnedFd`...).
    pub fn new(fd: impl Into<OwnedFd>) -> Self {
        Fd {
            slot: Arc::new(Mutex::new(Some(FdInner::Owned(fd.into())))),
        }
    }

    pub(crate) fn from_stream(s: ByteStream) -> Self {
        Fd::from_inner(FdInner::Stream(s))
    }

    fn from_inner(inner: FdInner) -> Self {
        Fd {
            slot: Arc::new(Mutex::new(Some(inner))),
        }
    }

    /// True if this holds a real descriptor (false if it arrived as a byte stream).
    pub fn is_descriptor(&self) -> bool {
        matches!(
            self.slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
            Some(FdInner::Owned(_))
        )
    }

    /// The descriptor, if this holds one; otherwise `self` back.
    pub fn into_owned_fd(self) -> Result<OwnedFd, Fd> {
        let inner = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        match inner {
            Some(FdInner::Owned(fd)) => Ok(fd),
            Some(other) => Err(Fd::from_inner(other)),
            None => Err(self),
        }
    }

    /// The byte stream carrying the descriptor's contents, if it arrived as one; otherwise
    /// `self` back.
    pub fn into_stream(self) -> Result<ByteStream, Fd> {
        let inner = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        match inner {
            Some(FdInner::Stream(s)) => Ok(s),
            Some(other) => Err(Fd::from_inner(other)),
            None => Err(self),
        }
    }
}

impl Serialize for Fd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = with_encode(|ctx| -> Result<RefMarker, String> {
            let mut g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_ref() {
                None => Err("Fd was already moved into another message".to_owned()),
                Some(FdInner::Owned(fd)) if ctx.session.conn.can_pass_fds() => {
                    let dup = fd
                        .try_clone()
                        .map_err(|e| format!("cannot duplicate descriptor: {e}"))?;
                    let index = ctx.fds.len() as u32;
                    ctx.fds.push(dup);
                    Ok(ctx.push(
                        OutRef::Existing(WireRef {
                            kind: RefKind::Fd,
                            id: index,
                        }),
                        None,
                    ))
                }
                Some(FdInner::Owned(_)) => {
                    let Some(FdInner::Owned(fd)) = g.take() else {
                        unreachable!("checked above")
                    };
                    let io = fd_io(fd).map_err(|e| format!("cannot stream descriptor: {e}"))?;
                    Ok(ctx.push(
                        OutRef::New(RefKind::FdStream),
                        Some(Box::new(FdAttach {
                            slot: self.slot.clone(),
                            io: Some(io),
                        })),
                    ))
                }
                Some(FdInner::Stream(bs)) => {
                    // Forwarded as a stream again; on a failed send it goes back in place.
                    let inner = bs.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let Some(inner) = inner else {
                        return Err("Fd stream was moved".to_owned());
                    };
                    Ok(ctx.push(
                        OutRef::New(RefKind::FdStream),
                        Some(Box::new(BytesAttach {
                            slot: bs.slot.clone(),
                            inner: Some(inner),
                        })),
                    ))
                }
            }
        });
        match r {
            Some(Ok(m)) => m.serialize(s),
            Some(Err(e)) => Err(S::Error::custom(e)),
            None => Err(S::Error::custom(
                "a libchan Fd can only be serialized by a libchan send on a session",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Fd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::attachment::claim_typed(d, "Fd", &[RefKind::Fd, RefKind::FdStream], |a| a.into_fd())
    }
}

/// How a descriptor that cannot be passed is turned into something to copy from and to.
enum FdIo {
    Both(Box<dyn AsyncReadWrite>),
    ReadOnly(tokio::fs::File),
    WriteOnly(tokio::fs::File),
}

fn fd_io(fd: OwnedFd) -> io::Result<FdIo> {
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is a valid open descriptor owned by `fd` for the duration of the calls;
    // `fstat` writes into a zeroed struct we own, `fcntl(F_GETFL)` only reads flags.
    let (is_sock, mode) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(raw, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fl = libc::fcntl(raw, libc::F_GETFL);
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        (
            st.st_mode & libc::S_IFMT == libc::S_IFSOCK,
            fl & libc::O_ACCMODE,
        )
    };
    if is_sock {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        return Ok(FdIo::Both(Box::new(tokio::net::UnixStream::from_std(s)?)));
    }
    let f = tokio::fs::File::from_std(std::fs::File::from(fd));
    Ok(match mode {
        libc::O_WRONLY => FdIo::WriteOnly(f),
        libc::O_RDONLY => FdIo::ReadOnly(f),
        _ => FdIo::Both(Box::new(f)),
    })
}

struct FdAttach {
    slot: Arc<Mutex<Option<FdInner>>>,
    io: Option<FdIo>,
}

impl Attach for FdAttach {
    fn install(mut self: Box<Self>, session: &Arc<NetSession>, id: u32) {
        let io = self.io.take().expect("installed once");
        let mut remote = ByteStream::remote(session.clone(), id);
        session.spawn(async move {
            use tokio::io::AsyncWriteExt;
            match io {
                FdIo::Both(mut io) => {
                    let _ = tokio::io::copy_bidirectional(&mut io, &mut remote).await;
                }
                FdIo::ReadOnly(mut f) => {
                    let _ = tokio::io::copy(&mut f, &mut remote).await;
                    let _ = remote.shutdown().await;
                }
                FdIo::WriteOnly(mut f) => {
                    let _ = remote.shutdown().await;
                    let _ = tokio::io::copy(&mut remote, &mut f).await;
                    let _ = f.flush().await;
                }
            }
        });
    }

    fn restore(mut self: Box<Self>) {
        let fd: Option<OwnedFd> = match self.io.take() {
            Some(FdIo::ReadOnly(f)) | Some(FdIo::WriteOnly(f)) => {
                f.try_into_std().ok().map(OwnedFd::from)
            }
            _ => None,
        };
        if let Some(fd) = fd {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(FdInner::Owned(fd));
        }
    }
}
