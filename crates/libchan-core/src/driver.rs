//! The tokio driver that runs the multiplexer ([`crate::mux::Mux`]) over a byte pipe.
//!
//! A transport that carries one ordered byte stream (unix, tcp, tls, websocket, or one of
//! yours) implements [`Link`] and calls [`crate::Session::over_link`]. Two tasks do the IO:
//! a reader that feeds [`Mux::handle_input`] and wakes receivers, and a writer that batches
//! whatever [`Mux::poll_transmit`] produces into few large writes. Senders never wait for
//! the writer: they queue under a short lock and notify it — except that the second
//! message a task sends after input arrived is written by that task itself, when the
//! writer task is idle and the link allows it ([`LinkWrite::can_write_inline`]), and
//! after input that brought a batch of requests every 32nd message after it as well.
//! Over a link that writes vectored ([`LinkWrite::is_write_vectored`]), the writer takes
//! batches from [`Mux::poll_transmit_batch`] instead: frame headers and small pieces
//! copied into one buffer, message pieces of 4 KiB or more handed to `writev`/`sendmsg`
//! where they are.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::io::IoSlice;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::{Connection, ConnectionStats, PeerIdentity};
use crate::error::{Error, ErrorKind};
use crate::frame::{self, Reason, StreamKind};
use crate::message::{InMessage, OpenedStreams, OutMessage, WireRef};
use crate::mux::{Batch, Mux, ReadTarget, Role};

/// Size of one batch handed to the link by the writer.
const WRITE_BATCH: usize = 256 * 1024;
/// After the first write a sending task makes after input that was a batch of requests,
/// how many more messages queued make it write again (see [`Shared::with_send`]).
const INLINE_EVERY: usize = 32;
/// Read buffer growth step.
const READ_CHUNK: usize = 128 * 1024;

/// A byte pipe the multiplexer runs over, optionally passing descriptors.
pub trait Link: Send + 'static {
    /// True if [`LinkWrite::poll_write_fds`] really passes descriptors.
    fn can_pass_fds(&self) -> bool {
        false
    }
    /// The peer's identity as this link verified it (a TLS link: the peer's certificate);
    /// `None` by default. Read once, before [`split`](Link::split).
    fn peer_identity(&self) -> Option<PeerIdentity> {
        None
    }
    /// Splits into independently owned halves.
    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>);
}

/// The read half of a [`Link`].
pub trait LinkRead: Send + 'static {
    /// Reads into the spare capacity of `buf` (appending), and any descriptors that arrived
    /// with those bytes into `fds`. `Ok(0)` is end of stream.
    ///
    /// Read no more than that spare capacity: the driver hands in the body of a large
    /// message with room for exactly the bytes of it that come next (bytes beyond it are
    /// still handled right, but cost a copy of the body so far).
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>>;

    /// The peer is about to send descriptors (its FDS frame arrived, PROTOCOL.md §8): from
    /// the next read on, receive the descriptors that come with the bytes. Until then a
    /// link MAY read without them (the unix link uses a plain `recv`, cheaper than
    /// `recvmsg` with room for `SCM_RIGHTS`): a peer sends descriptors only after our answer
    /// to its FDS, and the driver calls this before its next read after the FDS. The driver
    /// calls it at most once. The default does nothing (a link that always reads descriptors, or
    /// passes none).
    fn enable_fds(&mut self) {}

    /// Reads into the spare capacity of `first` and, once that is full, of `then`, in
    /// one call where the link can (the unix link: one `recvmsg` with two buffers);
    /// returns the bytes read in all. The driver uses it to read the rest of a large
    /// message body's frame and the next frame header together. The default reads into
    /// `first` only.
    fn poll_read_fds_then(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut BytesMut,
        then: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        let _ = then;
        self.poll_read_fds(cx, first, fds)
    }
}

/// The write half of a [`Link`].
pub trait LinkWrite: Send + 'static {
    /// Writes a prefix of `buf`; `fds` (possibly empty) must travel with its first byte.
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>>;
    /// True if [`poll_write_vectored_fds`](LinkWrite::poll_write_vectored_fds) writes
    /// several buffers at once (`writev`, `sendmsg`); then the driver references large
    /// message pieces instead of copying them into one buffer. False by default.
    fn is_write_vectored(&self) -> bool {
        false
    }
    /// Writes a prefix of the concatenation of `bufs`; `fds` (possibly empty) must travel
    /// with its first byte. Called only if [`is_write_vectored`](LinkWrite::is_write_vectored)
    /// is true; the default writes the first non-empty buffer.
    fn poll_write_vectored_fds(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        self.poll_write_fds(cx, first, fds)
    }
    /// True if a sending task may write in the writer task's place while the writer task
    /// waits: the driver then writes the second message a task sends after input arrived
    /// (and whatever else is ready) from that task, so that a task answering several
    /// requests gets the first answers out while it works on the rest. The link is then
    /// polled from the sending task with a waker that never wakes, and only while the
    /// writer task is not writing; a write that would block returns `Pending`, and the
    /// writer task writes the rest, polling with its own waker; if the link's
    /// [`poll_flush`](LinkWrite::poll_flush) would block, the writer task flushes. Links
    /// over sockets registered with tokio qualify (TLS over one too); a link whose
    /// `Pending` must wake the task that got it must say false. False by default.
    fn can_write_inline(&self) -> bool {
        false
    }
    /// Pushes out anything the link buffered (a TLS record, a buffered writer). The writer
    /// calls it after each batch, before it waits for more to send. The default does
    /// nothing: sockets do not buffer in user space.
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// Shuts the write direction down.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A [`Link`] over any tokio byte stream (no descriptor passing).
///
/// ```
/// # async fn f() {
/// let (a, _b) = tokio::io::duplex(1 << 16);
/// let link = libchan_core::driver::IoLink::new(a);
/// # let _ = link;
/// # }
/// ```
pub struct IoLink<S> {
    io: S,
}

impl<S> IoLink<S> {
    /// Wraps a byte stream.
    pub fn new(io: S) -> Self {
        IoLink { io }
    }
}

impl<S> fmt::Debug for IoLink<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoLink").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Link for IoLink<S> {
    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        let (r, w) = tokio::io::split(self.io);
        (Box::new(IoRead(r)), Box::new(IoWrite(w)))
    }
}

/// Read half adapter for any [`AsyncRead`].
pub struct IoRead<R>(pub R);
/// Write half adapter for any [`AsyncWrite`].
pub struct IoWrite<W>(pub W);

impl<R> fmt::Debug for IoRead<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IoRead")
    }
}

impl<W> fmt::Debug for IoWrite<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IoWrite")
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> LinkRead for IoRead<R> {
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        poll_read_buf(Pin::new(&mut self.0), cx, buf)
    }
}

/// Reads from an [`AsyncRead`] into the spare capacity of a `BytesMut`.
pub fn poll_read_buf<R: AsyncRead + ?Sized>(
    r: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(spare);
    match r.poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            // SAFETY: `ReadBuf` guarantees the first `n` bytes of the spare capacity are
            // initialized.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> LinkWrite for IoWrite<W> {
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this link cannot pass file descriptors",
            )));
        }
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored_fds(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this link cannot pass file descriptors",
            )));
        }
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A [`LinkWrite`] that sending tasks may write in the writer task's place
/// ([`LinkWrite::can_write_inline`]), around one that does not say so itself: for a write
/// half over a socket registered with tokio (the tcp and TLS links wrap their [`IoWrite`]
/// in it).
///
/// ```
/// use libchan_core::driver::{IoWrite, LinkWrite, WriteInline};
/// let (a, _b) = tokio::io::duplex(1024);
/// let w = WriteInline(IoWrite(a));
/// assert!(w.can_write_inline());
/// ```
#[derive(Debug)]
pub struct WriteInline<W>(pub W);

impl<W: LinkWrite> LinkWrite for WriteInline<W> {
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_fds(cx, buf, fds)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored_fds(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_vectored_fds(cx, bufs, fds)
    }

    fn can_write_inline(&self) -> bool {
        true
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_shutdown(cx)
    }
}

thread_local! {
    /// The wakers' list of [`Shared::with`], reused.
    static WAKE_LIST: std::cell::Cell<Vec<Waker>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The wakers an operation left in the multiplexer, moved into the thread's spare list
/// (under the lock), or `None` when it left none — most sends and receives — which
/// leaves the thread-local list alone.
#[inline]
fn collect_wakers(m: &mut Mux) -> Option<Vec<Waker>> {
    if !m.has_wakers() {
        return None;
    }
    let mut wakers = WAKE_LIST.with(|l| l.take());
    m.take_wakers(&mut wakers);
    Some(wakers)
}

/// Wakes the wakers an operation collected (outside the multiplexer's lock) and keeps the
/// list's allocation for the thread's next operation.
fn wake_all(wakers: Option<Vec<Waker>>) {
    let Some(mut wakers) = wakers else {
        return;
    };
    for w in wakers.drain(..) {
        w.wake();
    }
    // A waker that re-entered `with` on this thread took an empty list; ours goes back.
    WAKE_LIST.with(|l| l.set(wakers));
}

/// Wakes the connection's one writer task: what tokio's `Notify` does with
/// `notify_one` for a single waiter (a notification with nobody waiting is kept for the
/// next wait; several coalesce into one), with a flag and an [`AtomicWaker`] instead of
/// a lock and a list of waiters (ping-pong: about 490 instructions less per round trip).
#[derive(Default)]
struct WriterSignal {
    permit: AtomicBool,
    waker: AtomicWaker,
}

impl WriterSignal {
    fn notify_one(&self) {
        // Already set: whoever set it woke the waiter, which takes the permit once it
        // runs (it looks again after registering).
        if !self.permit.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Waits for a notification (only the writer task waits).
    async fn notified(&self) {
        poll_fn(|cx| {
            if self.take_permit() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.take_permit() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn take_permit(&self) -> bool {
        self.permit.load(Ordering::Acquire) && self.permit.swap(false, Ordering::AcqRel)
    }
}

pub(crate) struct Shared {
    mux: Mutex<Mux>,
    notify: WriterSignal,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The link's write half and the writer's buffers, while the writer task waits;
    /// empty while it (or a sending task, see [`Shared::with_send`]) writes.
    io: IoSlot,
    /// The link can be written by a sending task ([`LinkWrite::can_write_inline`]).
    inline_capable: bool,
    /// How many messages queued since the last batch make a sending task write them
    /// itself (see [`Shared::with_send`]): 2 after input, [`INLINE_EVERY`] after such a
    /// write when the input was a batch (`input_batch`), 0 (none) otherwise.
    inline_at: AtomicUsize,
    /// The reader's last input queued several messages or woke several tasks: a batch of
    /// requests, whose answers go out every [`INLINE_EVERY`] messages.
    input_batch: AtomicBool,
    /// Messages queued since the last batch was taken for writing (changed under the
    /// multiplexer's lock).
    queued_sends: AtomicUsize,
    /// Tasks the reader's last input woke (receivers with messages, senders with credit).
    /// Several of them are likely to send as soon as they run: the writer then lets them
    /// run first (see `write_loop`).
    input_woke: AtomicUsize,
}

/// What the writer task owns between writes (see [`Shared::io`]).
struct WriteState {
    w: Box<dyn LinkWrite>,
    batch: Batch,
    /// Bytes taken from the batch and not written yet (left by a write that would block).
    pieces: VecDeque<Bytes>,
    /// Descriptors to send with the first byte of `pieces`.
    fds: Vec<OwnedFd>,
    /// A sending task's write left bytes in the link's buffer (its flush would block):
    /// the writer task flushes before anything else.
    unflushed: bool,
}

/// Where the [`WriteState`] waits between writes, handed between the writer task and
/// sending tasks without a lock (two lock operations per write less on every message).
struct IoSlot {
    /// The state while nobody writes; null while the writer task or a sending task has it.
    state: AtomicPtr<WriteState>,
    /// The writer task found the state taken by a sending task: it waits for a
    /// notification, which that task gives when it puts the state back.
    missed: AtomicBool,
    /// The connection's tasks were aborted, or a sending task's write panicked (a link's
    /// bug): the state is dropped, and the writer task ends.
    gone: AtomicBool,
}

impl IoSlot {
    fn new(st: WriteState) -> IoSlot {
        IoSlot {
            state: AtomicPtr::new(Box::into_raw(Box::new(st))),
            missed: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        }
    }

    /// Takes the state, if it is here.
    fn take(&self) -> Option<Box<WriteState>> {
        let p = self.state.swap(std::ptr::null_mut(), Ordering::SeqCst);
        // SAFETY: a non-null pointer in the slot always comes from `Box::into_raw` (`new`,
        // `put`), and the swap made this call its only owner.
        (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
    }

    /// Puts the state back (drops it once the slot is gone); true if the writer task
    /// waits for it and must be notified.
    fn put(&self, st: Box<WriteState>) -> bool {
        if self.gone.load(Ordering::SeqCst) {
            return false;
        }
        let old = self.state.swap(Box::into_raw(st), Ordering::SeqCst);
        if !old.is_null() {
            // SAFETY: as in `take`; cannot happen (one state, one holder), but if it did
            // the older state is freed rather than leaked.
            drop(unsafe { Box::from_raw(old) });
        }
        if self.gone.load(Ordering::SeqCst) {
            // `set_gone` ran meanwhile and found the slot empty.
            drop(self.take());
            return false;
        }
        self.missed.swap(false, Ordering::SeqCst)
    }

    /// Marks the slot gone and drops the state if it is here (else its holder drops it).
    fn set_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
        drop(self.take());
    }
}

// The slot hands the state between threads through a raw pointer, which the compiler
// does not check: the state must be `Send` for that to be sound.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<WriteState>();
};

impl Drop for IoSlot {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl Shared {
    /// Puts the writer's state back; notifies the writer task if it waited for it. After
    /// [`abort_tasks`](Shared::abort_tasks) the state is dropped instead (and with it the
    /// link's write half).
    fn put_state(&self, st: Box<WriteState>) {
        if self.io.put(st) {
            self.notify.notify_one();
        }
    }

    /// [`with`](Shared::with) for an operation that queues a message. If this is the
    /// second message queued since the writer last took a batch, input arrived since the
    /// last such write, the writer task waits, and the link allows it
    /// ([`LinkWrite::can_write_inline`]), the sending task writes what is ready itself:
    /// taken under the same lock, written right away. A task answering a batch of
    /// requests gets its first answers to the peer while it works on the rest, so both
    /// ends work at once (rpc with 64 callers: 282 k -> 387 k requests/s). Not on the first
    /// message: one answer and the end of its reply channel (the Sender dropped next)
    /// still leave together, from the writer, as one frame. After input that was a batch
    /// (several messages queued, or several tasks woken: `input_batch`) the answers keep
    /// leaving this way, every [`INLINE_EVERY`] messages, so the peer keeps working on
    /// them while the rest are made (rpc with 64 callers +7–16% in alternating rounds);
    /// otherwise once per input, so that a task sending many messages in a row (a stream
    /// whose input is credit) leaves them to the writer, which writes them together.
    fn with_send<R>(&self, f: impl FnOnce(&mut Mux) -> R) -> R {
        let inline_at = self.inline_at.load(Ordering::Relaxed);
        if !self.inline_capable || inline_at == 0 {
            return self.with(f);
        }
        let (r, flush, inline, wakers) = {
            let mut m = self.lock();
            let r = f(&mut m);
            let wakers = collect_wakers(&mut m);
            let flush = m.take_flush();
            let queued = self.queued_sends.fetch_add(1, Ordering::Relaxed) + 1;
            let mut inline = None;
            let mut handed_back = false;
            if queued >= inline_at && m.wants_transmit() && m.lost().is_none() {
                if let Some(mut st) = self.io.take() {
                    // Not while a write that would block left bytes (and descriptors that
                    // go with their first byte): those are the writer task's to finish.
                    if st.pieces.is_empty() && st.fds.is_empty() && !st.unflushed {
                        let next = if self.input_batch.load(Ordering::Relaxed) {
                            INLINE_EVERY
                        } else {
                            0
                        };
                        self.inline_at.store(next, Ordering::Relaxed);
                        self.queued_sends.store(0, Ordering::Relaxed);
                        m.poll_transmit_batch(&mut st.batch, &mut st.fds, WRITE_BATCH);
                        // What did not fit the batch is the writer's.
                        inline = Some((st, m.wants_transmit()));
                    } else {
                        self.io.put(st);
                        handed_back = true;
                    }
                }
            }
            (r, flush || handed_back, inline, wakers)
        };
        wake_all(wakers);
        match inline {
            Some((st, more)) => self.write_inline(st, more),
            None if flush => self.notify.notify_one(),
            None => {}
        }
        r
    }

    /// Writes what [`with_send`](Shared::with_send) took, without waiting: what would
    /// block is left to the writer task.
    fn write_inline(&self, mut st: Box<WriteState>, more: bool) {
        st.batch.take_pieces(&mut st.pieces);
        // A link that panics fails the connection (as it would in the writer task), not
        // the task that happened to send.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(Waker::noop());
            match poll_write_pieces(&mut *st.w, &mut cx, &mut st.pieces, &mut st.fds) {
                Poll::Ready(Ok(())) => match st.w.poll_flush(&mut cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => {
                        st.unflushed = true;
                        Ok(())
                    }
                },
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Ok(()),
            }
        }));
        let Ok(res) = res else {
            // The state is in an unknown condition: drop it (and the write half with it);
            // the writer task ends when it finds it gone.
            self.io.set_gone();
            drop(st);
            self.with(|m| m.fail(Error::lost("the connection's link panicked while writing")));
            self.notify.notify_one();
            return;
        };
        let left = !st.pieces.is_empty() || st.unflushed;
        self.put_state(st);
        match res {
            Err(e) => {
                fail_write(self, e);
                self.notify.notify_one();
            }
            // The rest (what would block, or what did not fit one batch) is the writer's.
            Ok(()) if left || more => self.notify.notify_one(),
            Ok(()) => {}
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mux> {
        crate::spin::lock_spinning(&self.mux)
    }

    /// Runs `f` on the mux, then wakes whoever it asked for, and the writer task if `f`
    /// queued frames. Woken from a runtime thread, the writer runs on that thread as soon
    /// as the current task yields (tokio's LIFO slot), so whatever the task queued until
    /// then goes out in one write, without a hop to the other thread.
    fn with<R>(&self, f: impl FnOnce(&mut Mux) -> R) -> R {
        self.with_counted(f).0
    }

    /// [`with`](Shared::with), also telling how many wakers it woke.
    fn with_counted<R>(&self, f: impl FnOnce(&mut Mux) -> R) -> (R, usize) {
        // The list's allocation is kept per thread (`collect_wakers`): a fresh list for
        // each operation that wakes someone was an allocation per message.
        let (r, flush, wakers) = {
            let mut m = self.lock();
            let r = f(&mut m);
            (r, m.take_flush(), collect_wakers(&mut m))
        };
        let woken = wakers.as_ref().map_or(0, Vec::len);
        wake_all(wakers);
        if flush {
            self.notify.notify_one();
        }
        (r, woken)
    }

    /// Stops the driver tasks and drops the link's write half (the reader task owns the
    /// read half), so the connection closes.
    fn abort_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
        self.io.set_gone();
    }
}

/// A [`Connection`] made of a [`Mux`] and its reader and writer tasks.
pub struct MuxConnection {
    shared: Arc<Shared>,
    codec: String,
    role: Role,
    can_pass_fds: bool,
    peer: Option<PeerIdentity>,
}

impl fmt::Debug for MuxConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxConnection")
            .field("role", &self.role)
            .field("codec", &self.codec)
            .field("can_pass_fds", &self.can_pass_fds)
            .finish()
    }
}

impl MuxConnection {
    /// Runs the handshake over `link` and starts the driver tasks on the current runtime.
    pub async fn start(
        link: Box<dyn Link>,
        role: Role,
        config: &Config,
    ) -> Result<MuxConnection, Error> {
        config
            .limits
            .validate()
            .map_err(|m| Error::new(ErrorKind::Closed, format!("invalid limits: {m}")))?;
        if config.codecs.is_empty() {
            return Err(Error::closed("no codec configured"));
        }
        let can_pass_fds = link.can_pass_fds();
        let peer = link.peer_identity();
        let mux = Mux::new(role, config.limits.clone(), config.codec_names());
        let (r, w) = link.split();
        let inline_capable = w.can_write_inline();
        let batch = if w.is_write_vectored() {
            Batch::new(WRITE_BATCH + 64 * 1024)
        } else {
            Batch::copying(WRITE_BATCH + 64 * 1024)
        };
        let shared = Arc::new(Shared {
            mux: Mutex::new(mux),
            notify: WriterSignal::default(),
            tasks: Mutex::new(Vec::new()),
            io: IoSlot::new(WriteState {
                w,
                batch,
                pieces: VecDeque::new(),
                fds: Vec::new(),
                unflushed: false,
            }),
            inline_capable,
            inline_at: AtomicUsize::new(0),
            input_batch: AtomicBool::new(false),
            queued_sends: AtomicUsize::new(0),
            input_woke: AtomicUsize::new(0),
        });
        let reader = tokio::spawn(read_loop(shared.clone(), r));
        let writer = tokio::spawn(write_loop(shared.clone()));
        {
            let mut t = shared.tasks.lock().unwrap_or_else(|e| e.into_inner());
            t.push(reader);
            t.push(writer);
        }
        if let Some(interval) = config.keepalive {
            let ka = tokio::spawn(keepalive_loop(Arc::downgrade(&shared), interval));
            shared
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ka);
        }
        let hs = poll_fn(|cx| shared.lock().poll_handshake(cx));
        let codec = match tokio::time::timeout(config.handshake_timeout, hs).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // Let the writer flush the GOAWAY that names the problem, briefly.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(200),
                    poll_fn(|cx| {
                        let done =
                            shared.tasks.lock().unwrap_or_else(|e| e.into_inner())[1].is_finished();
                        if done {
                            Poll::Ready(())
                        } else {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                    }),
                )
                .await;
                shared.abort_tasks();
                return Err(e);
            }
            Err(_) => {
                shared.abort_tasks();
                return Err(Error::new(
                    ErrorKind::Handshake,
                    format!(
                        "no handshake from the peer within handshake_timeout {:?}",
                        config.handshake_timeout
                    ),
                ));
            }
        };
        Ok(MuxConnection {
            shared,
            codec,
            role,
            can_pass_fds,
            peer,
        })
    }
}

impl Drop for MuxConnection {
    fn drop(&mut self) {
        // Nothing can accept the peer's pending channels any more: end them too.
        self.shared.with(|m| {
            m.goaway(Reason::NO_ERROR, "session closed");
            m.release_unaccepted();
        });
    }
}

/// Fails the connection if the task that holds it panics (a bug, or a link that panics):
/// every waiting end then gets an error instead of waiting forever.
struct FailOnPanic {
    shared: Arc<Shared>,
    task: &'static str,
}

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let task = self.task;
            self.shared.with(|m| {
                m.fail(Error::lost(format!(
                    "the connection's {task} task panicked"
                )))
            });
            self.shared.notify.notify_one();
        }
    }
}

async fn read_loop(shared: Arc<Shared>, mut r: Box<dyn LinkRead>) {
    let _guard = FailOnPanic {
        shared: shared.clone(),
        task: "reader",
    };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut fds = Vec::new();
    let mut target = ReadTarget::Buffer(None);
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        // Room in the read buffer: all of it, or a frame header only (after a body's part,
        // or when a large body's next frame may follow: its payload can go straight into
        // the body).
        let limit = match &target {
            ReadTarget::Buffer(limit) => *limit,
            ReadTarget::Body(_) => Some(frame::HEADER_LEN),
        };
        let spare = limit.map(|k| buf.split_off(buf.len() + k));
        let (res, body) = match target {
            ReadTarget::Buffer(_) => (
                poll_fn(|cx| r.poll_read_fds(cx, &mut buf, &mut fds)).await,
                None,
            ),
            ReadTarget::Body(mut body) => {
                let res =
                    poll_fn(|cx| r.poll_read_fds_then(cx, &mut body, &mut buf, &mut fds)).await;
                (res, Some(body))
            }
        };
        if let Some(spare) = spare {
            buf.unsplit(spare);
        }
        let got_input = matches!(res, Ok(n) if n > 0);
        let ((stop, next, fds_asked, messages), woken) = shared.with_counted(|m| {
            // A body goes back to the mux even after a read of nothing or an error.
            let handled = match body {
                Some(body) => m.handle_body_input(body, &mut buf, &mut fds),
                None if matches!(res, Ok(n) if n > 0) => m.handle_input(&mut buf, &mut fds),
                None => Ok(()),
            };
            let stop = match res {
                Ok(0) => {
                    m.handle_eof();
                    true
                }
                Ok(_) => handled.is_err() || m.lost().is_some(),
                Err(e) => {
                    m.fail(read_failed(e));
                    true
                }
            };
            (
                stop,
                m.next_read(&mut buf),
                m.take_fds_asked(),
                m.take_messages_in(),
            )
        });
        shared.input_woke.store(woken, Ordering::Relaxed);
        // Stored only when they change: they usually hold these values already (a task
        // answering single requests never gets to its second message), and a store on
        // every read would take their cache line from the thread that sends.
        if shared.inline_capable && got_input {
            let batch = woken > 1 || messages > 1;
            if shared.input_batch.load(Ordering::Relaxed) != batch {
                shared.input_batch.store(batch, Ordering::Relaxed);
            }
            if shared.inline_at.load(Ordering::Relaxed) != 2 {
                shared.inline_at.store(2, Ordering::Relaxed);
            }
        }
        if fds_asked {
            r.enable_fds();
        }
        if stop {
            shared.notify.notify_one();
            return;
        }
        target = next;
    }
}

fn read_failed(e: io::Error) -> Error {
    Error::with_source(ErrorKind::ConnectionLost, format!("read failed: {e}"), e)
}

async fn write_loop(shared: Arc<Shared>) {
    let _guard = FailOnPanic {
        shared: shared.clone(),
        task: "writer",
    };
    loop {
        // The link and the buffers, unless a sending task is writing with them: it
        // notifies us when it puts them back (`Shared::put_state`).
        if shared.io.gone.load(Ordering::SeqCst) {
            return;
        }
        let taken = shared.io.take().or_else(|| {
            // A sending task has it: ask for a notification, then look once more (it may
            // have put it back before seeing the request).
            shared.io.missed.store(true, Ordering::SeqCst);
            let st = shared.io.take();
            if st.is_some() {
                shared.io.missed.store(false, Ordering::SeqCst);
            }
            st
        });
        let Some(mut st) = taken else {
            shared.notify.notified().await;
            continue;
        };
        let res = write_once(&shared, &mut st).await;
        if res.is_err() {
            // Done: the link's write half is dropped with the state (the peer sees the
            // end), and sending tasks find none to write with.
            return;
        }
        shared.put_state(st);
        if res == Ok(true) {
            continue;
        }
        // Everything that was ready went out, and whatever is queued from now on
        // notifies us (`Shared::with`): wait without another look at the queue (one lock
        // less per write; ping-pong 9.05 -> 8.97 µs).
        shared.notify.notified().await;
        if shared.input_woke.load(Ordering::Relaxed) > 1 {
            // Several tasks the last input woke are about to run, and likely to send (many
            // callers, each with its answer): let them queue first, so their frames go out
            // in one write instead of one write each (rpc with 64 callers: 6 times fewer
            // writes, a quarter less CPU per request). One task woken (a ping-pong, a
            // single stream) is not delayed.
            to_back_of_queue().await;
        }
    }
}

/// One round of the writer: what a sending task left unwritten, then one batch of what
/// is ready. `Ok(true)`: look again at once; `Ok(false)`: wait for a notification;
/// `Err(())`: the writer is done (the connection failed or was shut).
async fn write_once(shared: &Shared, st: &mut WriteState) -> Result<bool, ()> {
    let WriteState {
        w,
        batch,
        pieces,
        fds,
        unflushed,
    } = st;
    if !pieces.is_empty() || *unflushed {
        if let Err(e) = poll_fn(|cx| poll_write_pieces(&mut **w, cx, pieces, fds)).await {
            fail_write(shared, e);
            return Err(());
        }
        if let Err(e) = poll_fn(|cx| w.poll_flush(cx)).await {
            fail_write(shared, e);
            return Err(());
        }
        *unflushed = false;
    }
    let (lost, drained, more) = shared.with(|m| {
        shared.queued_sends.store(0, Ordering::Relaxed);
        m.poll_transmit_batch(batch, fds, WRITE_BATCH);
        (m.lost().is_some(), m.is_drained(), m.wants_transmit())
    });
    if !batch.is_empty() {
        batch.take_pieces(pieces);
        let res = poll_fn(|cx| poll_write_pieces(&mut **w, cx, pieces, fds)).await;
        pieces.clear();
        if let Err(e) = res {
            fail_write(shared, e);
            return Err(());
        }
        if let Err(e) = poll_fn(|cx| w.poll_flush(cx)).await {
            fail_write(shared, e);
            return Err(());
        }
        return Ok(more || lost || drained);
    }
    if lost || drained {
        let _ = poll_fn(|cx| w.poll_shutdown(cx)).await;
        if drained && !lost {
            // Everything finished; the peer sees our GOAWAY and end of stream.
            shared.with(|m| m.fail(Error::closed("session closed")));
        }
        return Err(());
    }
    Ok(false)
}

/// Puts the running task at the back of its worker's run queue, behind the tasks already
/// woken. Unlike `tokio::task::yield_now`, which waits until the worker has nothing else to
/// do, the task stays runnable and an idle worker may take it: the write still overlaps
/// with the other tasks' work.
async fn to_back_of_queue() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        // Woken while it runs, the task is rescheduled once its poll returns.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Writes `pieces` whole (one buffer with plain writes, several with vectored writes);
/// `fds` go with the first byte. `Pending` leaves what is not written in `pieces`.
fn poll_write_pieces(
    w: &mut dyn LinkWrite,
    cx: &mut Context<'_>,
    pieces: &mut VecDeque<Bytes>,
    fds: &mut Vec<OwnedFd>,
) -> Poll<io::Result<()>> {
    /// Buffers handed to one write (Linux accepts up to 1024).
    const MAX_IOV: usize = 64;
    while !pieces.is_empty() {
        let n = if pieces.len() == 1 {
            // One buffer: a plain write, cheaper in the kernel than a vectored one.
            std::task::ready!(w.poll_write_fds(cx, &pieces[0], fds))?
        } else {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let k = pieces.len().min(MAX_IOV);
            for (slot, p) in iov.iter_mut().zip(pieces.iter()) {
                *slot = IoSlice::new(p);
            }
            std::task::ready!(w.poll_write_vectored_fds(cx, &iov[..k], fds))?
        };
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "wrote 0 bytes",
            )));
        }
        fds.clear();
        let mut left = n;
        while left > 0 {
            let front = pieces
                .front_mut()
                .expect("wrote no more than the pieces hold");
            if front.len() <= left {
                left -= front.len();
                pieces.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Poll::Ready(Ok(()))
}

fn fail_write(shared: &Shared, e: io::Error) {
    shared.with(|m| {
        m.fail(Error::with_source(
            ErrorKind::ConnectionLost,
            format!("write failed: {e}"),
            e,
        ))
    });
}

async fn keepalive_loop(shared: std::sync::Weak<Shared>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let stop = shared.with(|m| {
            if m.lost().is_some() {
                return true;
            }
            if m.ping_outstanding() {
                m.fail(Error::lost(format!(
                    "keepalive: no answer to a ping within {interval:?}"
                )));
                return true;
            }
            m.ping();
            false
        });
        if stop {
            shared.abort_tasks();
            return;
        }
    }
}

impl Connection for MuxConnection {
    fn codec(&self) -> &str {
        &self.codec
    }

    fn can_pass_fds(&self) -> bool {
        self.can_pass_fds
    }

    fn is_local(&self, id: u32) -> bool {
        self.role.owns(id)
    }

    fn open(&self, kind: StreamKind) -> Result<u32, Error> {
        self.shared.with(|m| m.open(kind))
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u32>, Error>> {
        self.shared.with(|m| m.poll_accept(cx))
    }

    fn claim(&self, parent: u32, id: u32, kind: StreamKind) -> Result<(), Error> {
        self.shared.with(|m| m.claim(parent, id, kind))
    }

    fn poll_send_ready(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        self.shared.with(|m| m.poll_send_ready(cx, id))
    }

    fn send_message(&self, id: u32, msg: OutMessage) -> Result<OpenedStreams, Error> {
        self.shared.with_send(|m| m.send_message(id, msg))
    }

    fn send_message_then_ready(
        &self,
        id: u32,
        mut msg: OutMessage,
    ) -> Result<(OpenedStreams, bool), Error> {
        self.shared
            .with_send(|m| m.send_message_then_ready(id, &mut msg))
    }

    fn poll_recv(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<Option<InMessage>, Error>> {
        self.shared.with(|m| m.poll_recv(cx, id))
    }

    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        id: u32,
        more: &mut VecDeque<InMessage>,
    ) -> Poll<Result<Option<InMessage>, Error>> {
        self.shared.with(|m| m.poll_recv_batch(cx, id, more))
    }

    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        id: u32,
        buf: &mut [u8],
    ) -> Poll<Result<usize, Error>> {
        self.shared.with(|m| m.poll_read(cx, id, buf))
    }

    fn poll_write(&self, cx: &mut Context<'_>, id: u32, buf: &[u8]) -> Poll<Result<usize, Error>> {
        self.shared.with(|m| m.poll_write(cx, id, buf))
    }

    fn poll_flush(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        self.shared.with(|m| m.poll_flushed(cx, id))
    }

    fn poll_send_closed(&self, cx: &mut Context<'_>, id: u32) -> Poll<()> {
        self.shared.with(|m| m.poll_send_closed(cx, id))
    }

    fn poll_delivered(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        self.shared.with(|m| m.poll_delivered(cx, id))
    }

    fn poll_ended(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.with(|m| m.poll_ended(cx))
    }

    fn finish(&self, id: u32) {
        self.shared.with(|m| m.finish(id))
    }

    fn close_with_error(&self, id: u32, message: &str) {
        self.shared.with(|m| m.close_with_error(id, message))
    }

    fn release(&self, id: u32) {
        self.shared.with(|m| m.release(id))
    }

    fn finish_and_release(&self, id: u32) {
        self.shared.with(|m| {
            m.finish(id);
            m.release(id)
        })
    }

    fn release_refs(&self, refs: &[WireRef]) {
        self.shared.with(|m| m.release_refs(refs))
    }

    fn close(&self) {
        self.shared
            .with(|m| m.goaway(Reason::NO_ERROR, "session closed"))
    }

    fn abort(&self) {
        self.shared
            .with(|m| m.fail(Error::closed("session aborted locally")));
        self.shared.abort_tasks();
    }

    fn error(&self) -> Option<Error> {
        self.shared.lock().lost().cloned()
    }

    fn stats(&self) -> ConnectionStats {
        self.shared.lock().stats()
    }

    fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A notification given while nobody waits is kept for the next wait, several
    /// coalesce into one, and a waiting task is woken by the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_signal_keeps_one_notification_and_wakes_a_waiter() {
        let guard = Duration::from_secs(10);
        let s = Arc::new(WriterSignal::default());
        s.notify_one();
        s.notify_one();
        tokio::time::timeout(guard, s.notified())
            .await
            .expect("a kept notification");
        // Coalesced: the second notification above left nothing for a second wait.
        assert!(!s.take_permit(), "two notifications kept as two");
        for _ in 0..1000 {
            let (s2, (started_tx, started_rx)) = (s.clone(), tokio::sync::oneshot::channel());
            let waiter = tokio::spawn(async move {
                let _ = started_tx.send(());
                s2.notified().await;
            });
            started_rx.await.expect("waiter started");
            s.notify_one();
            tokio::time::timeout(guard, waiter)
                .await
                .expect("woken")
                .expect("waiter task");
        }
    }
}
