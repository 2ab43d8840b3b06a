//! Unix-socket transport of libchan, with file descriptor passing.
//!
//! The libchan multiplexing protocol runs over a `SOCK_STREAM` unix socket. Descriptors in
//! messages ([`libchan_core::Fd`]) are passed with `SCM_RIGHTS`: the receiver gets a real
//! descriptor, not a copy of its contents.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
//! let dir = std::env::temp_dir().join(format!("libchan-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("sock");
//! let listener = libchan_unix::UnixListener::bind(&path, config.clone())?;
//! let (client, server) = tokio::join!(libchan_unix::connect(&path, &config), listener.accept());
//! let (client, server) = (client?, server?);
//! let tx = client.open::<String>().await?;
//! let mut rx = server.accept::<String>().await?.unwrap();
//! tx.send("over unix".into()).await.map_err(|e| e.error)?;
//! assert_eq!(rx.recv().await?.as_deref(), Some("over unix"));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use libchan_core::driver::{Link, LinkRead, LinkWrite};
use libchan_core::{Config, Error, ErrorKind, Role, Session};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Most descriptors one `recvmsg` can carry on Linux (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Connects to a libchan listener at `path` and runs the handshake.
pub async fn connect(path: impl AsRef<Path>, config: &Config) -> Result<Session, Error> {
    let path = path.as_ref();
    let s = UnixStream::connect(path).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Io,
            format!("cannot connect to {}: {e}", path.display()),
            e,
        )
    })?;
    over_stream(s, Role::Dialer, config).await
}

/// Runs a session over a connected unix stream socket.
pub async fn over_stream(
    stream: UnixStream,
    role: Role,
    config: &Config,
) -> Result<Session, Error> {
    Session::over_link(UnixLink(stream), role, config).await
}

/// Two sessions connected by a `socketpair`, for tests and for handing one end to a child
/// process.
pub async fn pair(config: &Config) -> Result<(Session, Session), Error> {
    let (a, b) = UnixStream::pair()
        .map_err(|e| Error::with_source(ErrorKind::Io, format!("socketpair: {e}"), e))?;
    let (a, b) = tokio::join!(
        over_stream(a, Role::Dialer, config),
        over_stream(b, Role::Listener, config)
    );
    Ok((a?, b?))
}

/// A listening unix socket that yields a [`Session`] per connection.
#[derive(Debug)]
pub struct UnixListener {
    inner: tokio::net::UnixListener,
    config: Config,
    path: PathBuf,
}

impl UnixListener {
    /// Binds to `path` (which must not exist).
    pub fn bind(path: impl AsRef<Path>, config: Config) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        let inner = tokio::net::UnixListener::bind(&path).map_err(|e| {
            Error::with_source(
                ErrorKind::Io,
                format!("cannot bind {}: {e}", path.display()),
                e,
            )
        })?;
        Ok(UnixListener {
            inner,
            config,
            path,
        })
    }

    /// The path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts a connection and runs its handshake (bounded by the configured handshake
    /// timeout). To keep one slow client from delaying others, use
    /// [`accept_stream`](UnixListener::accept_stream) and run [`over_stream`] in a task.
    pub async fn accept(&self) -> Result<Session, Error> {
        let s = self.accept_stream().await?;
        over_stream(s, Role::Listener, &self.config).await
    }

    /// Accepts a connection without running the handshake.
    pub async fn accept_stream(&self) -> Result<UnixStream, Error> {
        let (s, _) = self
            .inner
            .accept()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, format!("accept: {e}"), e))?;
        Ok(s)
    }
}

/// The send buffer a [`UnixLink`] asks for (`SO_SNDBUF`, set when the link starts; the
/// kernel doubles it and caps it at `net.core.wmem_max`).
///
/// A unix stream socket's send buffer bounds what is in flight between the two processes.
/// Linux's default (`wmem_default`, 208 KiB) makes a 1 MiB message fill it five times;
/// each time the writer waits and the reader wakes it, and with the tasks of both ends on
/// two runtime threads those hand-offs cost more than the copies: 1 MiB messages over
/// unix went from 2.7 to 4.1–4.2 GB/s with this value (`libchan-bench --transport unix
/// --workload bulk`, medians of 5–7 alternating runs; 512 KiB to 4 MiB gave the same).
/// The cost is kernel memory: up to twice this per connection while the peer reads slower
/// than this side writes, and data reaches a slow receiver sooner (where it is buffered
/// as received messages, up to the windows).
pub const SEND_BUFFER: usize = 256 * 1024;

/// A [`Link`] over a unix stream socket that passes descriptors with `SCM_RIGHTS`.
///
/// Starting the link sets the socket's send buffer to [`SEND_BUFFER`].
#[derive(Debug)]
pub struct UnixLink(pub UnixStream);

impl Link for UnixLink {
    fn can_pass_fds(&self) -> bool {
        true
    }

    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        // Best effort: the kernel caps the value at net.core.wmem_max (and doubles it).
        let _ = socket::setsockopt(&self.0, socket::sockopt::SndBuf, &SEND_BUFFER);
        let (r, w) = self.0.into_split();
        (
            Box::new(UnixRead {
                half: r,
                cmsg: Vec::new(),
            }),
            Box::new(UnixWrite(w)),
        )
    }
}

struct UnixRead {
    half: OwnedReadHalf,
    /// Room for the control message of one read, allocated by
    /// [`enable_fds`](LinkRead::enable_fds); empty until then: reads are plain `recv`s
    /// (about 150 ns cheaper each than a `recvmsg` here) while the peer sends no
    /// descriptors (PROTOCOL.md §8).
    cmsg: Vec<u8>,
}
struct UnixWrite(OwnedWriteHalf);

impl LinkRead for UnixRead {
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        self.poll_read(cx, buf, None, fds)
    }

    fn poll_read_fds_then(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut BytesMut,
        then: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        self.poll_read(cx, first, Some(then), fds)
    }

    fn enable_fds(&mut self) {
        if self.cmsg.is_empty() {
            self.cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        }
    }
}

impl UnixRead {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        mut then: Option<&mut BytesMut>,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        let sock: &UnixStream = self.half.as_ref();
        let cmsg = &mut self.cmsg;
        loop {
            match sock.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let fd = sock.as_raw_fd();
            // A read that returns less than the room it had, and no descriptors, emptied
            // the socket's queue: the kernel glues queued segments into one read and stops
            // short only after a segment that carried descriptors (or where the sender's
            // credentials change, which only `SO_PASSCRED` sockets record; these do not
            // set it); `short_reads_never_lose_queued_segments` checks it. Reporting that
            // read to tokio as `WouldBlock` clears the readiness it saw (and only that: a
            // segment arriving later sets it again), which saves the read that would only
            // say EAGAIN — one read of every two on a request/response link.
            let room =
                buf.capacity() - buf.len() + then.as_ref().map_or(0, |t| t.capacity() - t.len());
            let before = fds.len();
            let mut done = None;
            let res = sock.try_io(Interest::READABLE, || {
                let n = recv_with_fds(fd, buf, then.as_deref_mut(), fds, cmsg)?;
                if n > 0 && n < room && fds.len() == before {
                    done = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            if let Some(n) = done {
                return Poll::Ready(Ok(n));
            }
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

/// The spare capacity of `buf` as a byte slice for the kernel to fill.
fn spare_bytes(buf: &mut BytesMut) -> &mut [u8] {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recvmsg only writes into the buffer; we only expose the bytes it reports as
    // written (via set_len in `recv_with_fds`).
    unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) }
}

/// One read into the spare capacity of `buf`, then of `then` (if any): a plain `recv` or
/// `readv` until descriptors are enabled (`cmsg` empty), a `recvmsg` after.
fn recv_with_fds(
    fd: RawFd,
    buf: &mut BytesMut,
    mut then: Option<&mut BytesMut>,
    fds: &mut Vec<OwnedFd>,
    cmsg: &mut [u8],
) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    if cmsg.is_empty() {
        // Descriptors not enabled yet: none can come (PROTOCOL.md §8); a plain read.
        let n = match then.as_deref_mut() {
            Some(t) => {
                let mut iov = [
                    IoSliceMut::new(spare_bytes(buf)),
                    IoSliceMut::new(spare_bytes(t)),
                ];
                // SAFETY: `fd` is the open socket of the read half for this call.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                nix::sys::uio::readv(borrowed, &mut iov).map_err(io::Error::from)?
            }
            None => socket::recv(fd, spare_bytes(buf), MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from)?,
        };
        set_filled(buf, then, room, n);
        return Ok(n);
    }
    let (n, truncated) = {
        let first = spare_bytes(buf);
        let mut two;
        let mut one;
        let iov: &mut [IoSliceMut<'_>] = match then.as_deref_mut() {
            Some(t) => {
                two = [IoSliceMut::new(first), IoSliceMut::new(spare_bytes(t))];
                &mut two
            }
            None => {
                one = [IoSliceMut::new(first)];
                &mut one
            }
        };
        let msg = socket::recvmsg::<()>(
            fd,
            iov,
            Some(cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel just installed `r` in our table for us; we own it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    if truncated {
        fds.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were truncated (more than SCM_MAX_FD in one read)",
        ));
    }
    set_filled(buf, then, room, n);
    Ok(n)
}

/// Marks the `n` bytes a read put into the spare capacities of `buf` (which had `room`)
/// and then `then` as filled.
fn set_filled(buf: &mut BytesMut, then: Option<&mut BytesMut>, room: usize, n: usize) {
    // SAFETY: the read initialized the first `n` bytes of the spare capacities, in order.
    unsafe { buf.set_len(buf.len() + n.min(room)) };
    if let Some(t) = then {
        // SAFETY: as above; the kernel fills `then` only after `buf` is full.
        unsafe { t.set_len(t.len() + (n - n.min(room))) };
    }
}

impl LinkWrite for UnixWrite {
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if fds.is_empty() {
            return Pin::new(&mut self.0).poll_write(cx, buf);
        }
        self.poll_write_vectored_fds(cx, &[IoSlice::new(buf)], fds)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn can_write_inline(&self) -> bool {
        // A socket registered with tokio: a write that would block clears its readiness,
        // and the writer task's own poll registers its waker again.
        true
    }

    fn poll_write_vectored_fds(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if fds.is_empty() {
            return Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
        }
        let sock: &UnixStream = self.0.as_ref();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            match sock.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let fd = sock.as_raw_fd();
            let res = sock.try_io(Interest::WRITABLE, || send_with_fds(fd, bufs, &raw));
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn send_with_fds(fd: RawFd, bufs: &[IoSlice<'_>], raw: &[RawFd]) -> io::Result<usize> {
    socket::sendmsg::<()>(
        fd,
        bufs,
        &[ControlMessage::ScmRights(raw)],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    /// Reads from the link until `want` bytes came, collecting descriptors.
    async fn read_all(r: &mut dyn LinkRead, want: usize) -> (BytesMut, Vec<OwnedFd>) {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut fds = Vec::new();
        while buf.len() < want {
            let n = poll_fn(|cx| r.poll_read_fds(cx, &mut buf, &mut fds))
                .await
                .unwrap();
            assert!(n > 0, "unexpected end of stream");
        }
        (buf, fds)
    }

    /// A link's halves over one end of a socket pair (reading descriptors or not), and
    /// the write half of the other end, to write raw segments into it.
    fn reader_and_raw_writer(
        with_fds: bool,
    ) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>, OwnedWriteHalf) {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, w) = Box::new(UnixLink(b)).split();
        if with_fds {
            r.enable_fds();
        }
        let (_ra, wa) = a.into_split();
        (r, w, wa)
    }

    /// Segments with and without descriptors queued before a read, and segments that
    /// arrive after a short read: every byte and descriptor is read, nothing waits for an
    /// event that already happened (the reader clears readiness after short reads). Both
    /// with plain reads (before descriptors are enabled; none are sent then) and with
    /// `recvmsg`.
    #[tokio::test]
    async fn short_reads_never_lose_queued_segments() {
        let guard = Duration::from_secs(10);
        for with_fds in [false, true] {
            let (mut r, _w, wa) = reader_and_raw_writer(with_fds);
            let raw = wa.as_ref().as_raw_fd();
            for round in 0..50u8 {
                // Plain, then with a descriptor (if enabled), then plain: all queued
                // before the read.
                let file = std::fs::File::open("/dev/null").unwrap();
                let passed: &[RawFd] = if with_fds { &[file.as_raw_fd()] } else { &[] };
                send_with_fds(raw, &[IoSlice::new(&[round; 10])], &[]).unwrap();
                send_with_fds(raw, &[IoSlice::new(&[round; 10])], passed).unwrap();
                send_with_fds(raw, &[IoSlice::new(&[round; 10])], &[]).unwrap();
                let (buf, fds) = tokio::time::timeout(guard, read_all(&mut *r, 30))
                    .await
                    .expect("queued segments were not read");
                assert_eq!(&buf[..], &[round; 30][..]);
                assert_eq!(fds.len(), passed.len());
                // A segment that arrives after the reader found the queue empty wakes it.
                let late = tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    send_with_fds(raw, &[IoSlice::new(&[round; 5])], &[]).unwrap();
                });
                let (buf, _) = tokio::time::timeout(guard, read_all(&mut *r, 5))
                    .await
                    .expect("a later segment was not read");
                assert_eq!(&buf[..], &[round; 5][..]);
                late.await.unwrap();
            }
        }
    }

    /// One read into two buffers fills the first one's room, then the second's, and
    /// brings the descriptors that came with the bytes.
    #[tokio::test]
    async fn a_read_into_two_buffers_fills_them_in_order() {
        // Plain reads (`readv`) before descriptors are enabled, `recvmsg` after.
        for with_fds in [false, true] {
            let (mut r, _w, wa) = reader_and_raw_writer(with_fds);
            let raw = wa.as_ref().as_raw_fd();
            let file = std::fs::File::open("/dev/null").unwrap();
            let data: Vec<u8> = (0..40u8).collect();
            let passed: &[RawFd] = if with_fds { &[file.as_raw_fd()] } else { &[] };
            send_with_fds(raw, &[IoSlice::new(&data)], passed).unwrap();
            // Room for 25 bytes in the first buffer (as the driver limits a body's part).
            let mut first = BytesMut::with_capacity(64);
            let rest = first.split_off(25);
            let mut then = BytesMut::with_capacity(9);
            let mut fds = Vec::new();
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                poll_fn(|cx| r.poll_read_fds_then(cx, &mut first, &mut then, &mut fds)),
            )
            .await
            .expect("the queued bytes were not read")
            .unwrap();
            assert_eq!(n, 34);
            assert_eq!(&first[..], &data[..25]);
            assert_eq!(&then[..], &data[25..34]);
            assert_eq!(fds.len(), passed.len());
            drop(rest);
            // The rest is still there for the next read.
            let (buf, _) = tokio::time::timeout(Duration::from_secs(10), read_all(&mut *r, 6))
                .await
                .expect("the rest was not read");
            assert_eq!(&buf[..], &data[34..]);
        }
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    enum Mixed {
        Big(u32, libchan_core::Blob),
        WithFd(u32, libchan_core::Fd),
        Small(u32),
    }

    fn big(i: u32) -> Vec<u8> {
        let len = 65_536 * (1 + i as usize % 5) + i as usize * 7;
        (0..len)
            .map(|j| (j as u32 ^ i.wrapping_mul(2_654_435_761)) as u8)
            .collect()
    }

    /// Large bodies (read straight into their buffers) between messages that carry
    /// descriptors and small ones, over a real socket pair: every byte, every descriptor,
    /// in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_bodies_between_messages_with_descriptors_arrive_intact() {
        let config = Config::new(libchan_codec_cbor::Cbor);
        let (a, b) = pair(&config).await.unwrap();
        let tx = a.open::<Mixed>().await.unwrap();
        let mut rx = b.accept::<Mixed>().await.unwrap().unwrap();
        const N: u32 = 30;
        let sender = tokio::spawn(async move {
            for i in 0..N {
                tx.send(Mixed::Big(i, big(i).into())).await.unwrap();
                let f = std::fs::File::open("/dev/null").unwrap();
                tx.send(Mixed::WithFd(i, libchan_core::Fd::new(f)))
                    .await
                    .unwrap();
                tx.send(Mixed::Small(i)).await.unwrap();
            }
        });
        let guard = Duration::from_secs(30);
        for i in 0..N {
            let m = tokio::time::timeout(guard, rx.recv())
                .await
                .expect("stalled");
            match m.unwrap().unwrap() {
                Mixed::Big(k, blob) => {
                    assert_eq!(k, i);
                    assert!(blob[..] == big(i)[..], "body {i}");
                }
                _ => panic!("expected body {i}"),
            }
            let m = tokio::time::timeout(guard, rx.recv())
                .await
                .expect("stalled");
            match m.unwrap().unwrap() {
                Mixed::WithFd(k, fd) => {
                    assert_eq!(k, i);
                    let fd = fd.into_owned_fd().expect("a passed descriptor");
                    let file = std::fs::File::from(fd);
                    file.metadata().expect("a live descriptor");
                }
                _ => panic!("expected descriptor {i}"),
            }
            let m = tokio::time::timeout(guard, rx.recv())
                .await
                .expect("stalled");
            assert!(matches!(m.unwrap().unwrap(), Mixed::Small(k) if k == i));
        }
        sender.await.unwrap();
    }

    /// Starting a link raises the socket's send buffer to `SEND_BUFFER` (as far as
    /// `net.core.wmem_max` allows; the kernel reports twice the value it keeps).
    #[tokio::test]
    async fn a_link_raises_its_send_buffer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let before = socket::getsockopt(&a, socket::sockopt::SndBuf).unwrap();
        let probe = std::os::fd::AsFd::as_fd(&a).try_clone_to_owned().unwrap();
        let (_r, _w) = Box::new(UnixLink(a)).split();
        let after = socket::getsockopt(&probe, socket::sockopt::SndBuf).unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let want = 2 * SEND_BUFFER.min(cap);
        assert_eq!(after, want, "send buffer was {before}, now {after}");
    }
}
