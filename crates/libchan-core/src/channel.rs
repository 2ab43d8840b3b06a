//! Typed channel ends: [`Sender`], [`Receiver`] and the local pair constructor [`channel`].

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorKind, SendError, TrySendError};
use crate::message::{InMessage, InlineListIter, OutRef, RefKind, WireRef};
use crate::session::{decode_message, encode_message, with_encode, Attach, Message, NetSession};

pub(crate) enum Item<T> {
    Value(T),
    Error(Error),
    End,
}

/// Creates a local channel with room for `buffer` messages (at least 1).
///
/// Either end can be kept, or sent in a message over any session; it keeps working on the
/// other side exactly as it does here.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (tx, mut rx) = libchan_core::channel::<u32>(8);
/// tx.send(7).await.unwrap();
/// drop(tx);
/// assert_eq!(rx.recv().await.unwrap(), Some(7));
/// assert_eq!(rx.recv().await.unwrap(), None);
/// # }
/// ```
pub fn channel<T: Send + 'static>(buffer: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Local::new(buffer.max(1), 1));
    (
        Sender {
            inner: SenderInner::Local(LocalSender {
                shared: shared.clone(),
                tx: OnceLock::new(),
            }),
        },
        Receiver {
            slot: Arc::new(Mutex::new(Some(RecvInner::Local {
                rx: None,
                done: false,
                shared,
                turn: 0,
            }))),
        },
    )
}

/// The sending end of a channel. Clone it to send from several tasks.
///
/// The channel ends cleanly (the receiver gets `Ok(None)`) when every clone is dropped or
/// one calls [`close`](Sender::close).
pub struct Sender<T> {
    inner: SenderInner<T>,
}

enum SenderInner<T> {
    Local(LocalSender<T>),
    Remote(Arc<RemoteSender>, PhantomData<fn(T)>),
}

struct LocalSender<T> {
    /// Shared by the channel's ends.
    shared: Arc<Local<T>>,
    /// This handle's clone of the queue's sender, taken on its first local send.
    tx: OnceLock<mpsc::Sender<Item<T>>>,
}

/// The state of a local channel, shared by its ends.
///
/// The queue of local sends (a tokio `mpsc`) is created on the first local send, or by
/// the receiver when it waits while no Sender went out over a session: a channel whose
/// Sender only travels (a reply Sender in a request, say) never needs it, and creating
/// one costs an aligned allocation, a block of slots, and (freed on another thread) the
/// allocator's locks.
struct Local<T> {
    /// The channel's remote senders (its `closed` flag is the local senders' too).
    feeds: Feeds,
    /// The queue's capacity.
    buffer: usize,
    /// Local sender handles alive.
    senders: AtomicUsize,
    lazy: Mutex<LazyQueue<T>>,
}

struct LazyQueue<T> {
    /// The queue's own sender, kept while sender handles live (each handle sends on a
    /// clone of it): dropped with the last handle, which ends the queue.
    tx: Option<mpsc::Sender<Item<T>>>,
    /// The queue's receiving half, until the channel's receiver takes it.
    rx: Option<mpsc::Receiver<Item<T>>>,
    /// The receiver was closed or dropped: no queue is created any more.
    rx_closed: bool,
}

impl<T> Local<T> {
    fn new(buffer: usize, senders: usize) -> Self {
        Local {
            feeds: Feeds::default(),
            buffer,
            senders: AtomicUsize::new(senders),
            lazy: Mutex::new(LazyQueue {
                tx: None,
                rx: None,
                rx_closed: false,
            }),
        }
    }

    fn lazy(&self) -> std::sync::MutexGuard<'_, LazyQueue<T>> {
        self.lazy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sender of the queue, created if needed; `None` once the receiver is gone.
    fn queue_tx(&self) -> Option<mpsc::Sender<Item<T>>> {
        let mut lazy = self.lazy();
        if let Some(tx) = &lazy.tx {
            return Some(tx.clone());
        }
        if lazy.rx_closed {
            return None;
        }
        let rx = self.create(&mut lazy);
        lazy.rx = Some(rx);
        let tx = lazy.tx.clone();
        drop(lazy);
        // The receiver may be waiting on the feeds alone: it takes the queue when polled.
        self.feeds.wake();
        tx
    }

    /// Creates the queue, keeping its sender; returns its receiving half.
    fn create(&self, lazy: &mut LazyQueue<T>) -> mpsc::Receiver<Item<T>> {
        let (tx, rx) = mpsc::channel(self.buffer);
        lazy.tx = Some(tx);
        rx
    }

    /// Every sender handle is gone.
    fn senders_gone(&self) -> bool {
        self.senders.load(Ordering::Acquire) == 0
    }

    /// Marks the receiver gone and hands over the queue if it was not taken yet.
    fn close_rx(&self, rx: &mut Option<mpsc::Receiver<Item<T>>>) {
        let mut lazy = self.lazy();
        lazy.rx_closed = true;
        if rx.is_none() {
            *rx = lazy.rx.take();
        }
        drop(lazy);
        if let Some(rx) = rx {
            rx.close();
        }
    }

    fn is_rx_closed(&self) -> bool {
        self.lazy().rx_closed
    }
}

impl<T> LocalSender<T> {
    /// This handle's queue sender (the queue is created on first use); `None` once the
    /// receiver is gone.
    fn tx(&self) -> Option<&mpsc::Sender<Item<T>>> {
        if self.tx.get().is_none() {
            let tx = self.shared.queue_tx()?;
            // Another send of this handle may have set it meanwhile: the same queue.
            let _ = self.tx.set(tx);
        }
        self.tx.get()
    }
}

impl<T> Drop for LocalSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let root = self.shared.lazy().tx.take();
        match root {
            // The queue ends when this handle's own clone goes too (tokio wakes the
            // receiver).
            Some(root) => drop(root),
            // No queue: the receiver learns of the end from the count.
            None => self.shared.feeds.wake(),
        }
    }
}

/// Streams on which peers send into a local channel: one per copy of the channel's
/// Sender that went out over a session. The channel's receiver reads them directly, so a
/// remote sender costs no forwarding task and no extra hop per message.
#[derive(Default)]
pub(crate) struct Feeds {
    /// Some clone of the channel's Sender called `close`: later sends fail.
    closed: AtomicBool,
    /// Usually one (a reply Sender sent once): kept inline, no allocation.
    list: Mutex<SmallVec<[RemoteReceiver; 1]>>,
    waker: Mutex<Option<std::task::Waker>>,
    /// The receiver took the clean end (`Some(true)`) or was dropped first (`Some(false)`).
    end: Mutex<Option<bool>>,
    end_notify: tokio::sync::Notify,
}

impl Feeds {
    fn set_end(&self, taken: bool) {
        let mut e = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(taken);
        }
        drop(e);
        self.end_notify.notify_waiters();
    }

    async fn end_taken(&self) -> bool {
        loop {
            let notified = self.end_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(taken) = *self.end.lock().unwrap_or_else(|e| e.into_inner()) {
                return taken;
            }
            notified.await;
        }
    }
}

impl Feeds {
    fn add(&self, r: RemoteReceiver) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        self.wake();
    }

    /// Wakes the receiver if it waits.
    fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    /// Forgets the receiver's waker (the receiver is going away).
    fn forget_waker(&self) {
        self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Drops every feed (the peers' sends then fail) and forgets their exports.
    fn clear(&self) {
        let list = std::mem::take(&mut *self.list.lock().unwrap_or_else(|e| e.into_inner()));
        for r in list {
            r.session.unexport(r.id);
        }
    }
}

pub(crate) struct RemoteSender {
    session: Arc<NetSession>,
    id: u32,
    closed: AtomicBool,
    size_hint: AtomicUsize,
    /// The last send left the channel below its send threshold: the next one need not
    /// ask the connection first (one lock per send instead of two). Only a send by
    /// another clone in between can have filled it since, so the threshold is exceeded
    /// by at most one message per clone sending at that moment. True for a new handle:
    /// its stream was just opened or claimed, nothing is queued on it yet, and a stream
    /// that failed meanwhile fails the send itself (a reply Sender's one answer takes the
    /// lock once, not twice).
    ready: AtomicBool,
    /// Sends that went without spending cooperative budget since the last that spent
    /// one (see [`COOP_EVERY`]); shared by clones, as a hint only.
    coop_turn: AtomicU32,
}

impl Drop for RemoteSender {
    fn drop(&mut self) {
        self.session.conn.finish_and_release(self.id);
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            inner: match &self.inner {
                SenderInner::Local(l) => {
                    l.shared.senders.fetch_add(1, Ordering::Relaxed);
                    let tx = OnceLock::new();
                    if let Some(t) = l.tx.get() {
                        let _ = tx.set(t.clone());
                    }
                    SenderInner::Local(LocalSender {
                        shared: l.shared.clone(),
                        tx,
                    })
                }
                SenderInner::Remote(r, _) => SenderInner::Remote(r.clone(), PhantomData),
            },
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            SenderInner::Local(_) => f.debug_struct("Sender").field("local", &true).finish(),
            SenderInner::Remote(r, _) => f.debug_struct("Sender").field("stream", &r.id).finish(),
        }
    }
}

impl<T: Message> Sender<T> {
    pub(crate) fn remote(session: Arc<NetSession>, id: u32) -> Self {
        Sender {
            inner: SenderInner::Remote(RemoteSender::new(session, id), PhantomData),
        }
    }

    /// Sends a message, waiting for capacity (backpressure) if the channel is full.
    ///
    /// Over a connection, `Ok` means the message is queued for the peer, in order after
    /// earlier messages of this channel; see the delivery rules in the crate docs. On error
    /// the message is handed back. Like tokio's channels, each send spends one unit of the
    /// task's cooperative budget (`tokio::task::coop`): a task that sends without ever
    /// waiting still yields now and then, so other tasks (the connection's writer among
    /// them) run during a burst.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, mut rx) = libchan_core::channel::<String>(1);
    /// tx.send("hi".into()).await.unwrap();
    /// drop(rx);
    /// // The receiver is gone: the message comes back with the error.
    /// let e = tx.send("lost?".into()).await.unwrap_err();
    /// assert_eq!(e.into_inner(), "lost?");
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// If the future is dropped before it completes, the message was not sent.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        match &self.inner {
            SenderInner::Local(l) => {
                if l.shared.feeds.closed.load(Ordering::Acquire) {
                    return Err(SendError {
                        message: value,
                        error: Error::closed("send after close"),
                    });
                }
                let Some(tx) = l.tx() else {
                    return Err(SendError {
                        message: value,
                        error: Error::new(ErrorKind::Reset, "receiver dropped"),
                    });
                };
                tx.send(Item::Value(value)).await.map_err(|e| SendError {
                    message: match e.0 {
                        Item::Value(v) => v,
                        _ => unreachable!("sent a value"),
                    },
                    error: Error::new(ErrorKind::Reset, "receiver dropped"),
                })
            }
            SenderInner::Remote(r, _) => {
                if r.closed.load(Ordering::Acquire) {
                    return Err(SendError {
                        message: value,
                        error: Error::closed("send after close"),
                    });
                }
                if let Err(error) = poll_fn(|cx| poll_send_ready_coop(r, cx)).await {
                    return Err(SendError {
                        message: value,
                        error,
                    });
                }
                remote_send(r, value)
            }
        }
    }

    /// Sends a message if there is capacity now.
    ///
    /// ```
    /// let (tx, _rx) = libchan_core::channel::<u8>(1);
    /// tx.try_send(1).unwrap();
    /// let full = tx.try_send(2).unwrap_err();
    /// assert!(full.is_full());
    /// assert_eq!(full.into_inner(), 2);
    /// ```
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        match &self.inner {
            SenderInner::Local(l) => {
                if l.shared.feeds.closed.load(Ordering::Acquire) {
                    return Err(TrySendError::Failed(SendError {
                        message: value,
                        error: Error::closed("send after close"),
                    }));
                }
                let Some(tx) = l.tx() else {
                    return Err(TrySendError::Failed(SendError {
                        message: value,
                        error: Error::new(ErrorKind::Reset, "receiver dropped"),
                    }));
                };
                tx.try_send(Item::Value(value)).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(Item::Value(v)) => TrySendError::Full(v),
                    mpsc::error::TrySendError::Closed(Item::Value(v)) => {
                        TrySendError::Failed(SendError {
                            message: v,
                            error: Error::new(ErrorKind::Reset, "receiver dropped"),
                        })
                    }
                    _ => unreachable!("sent a value"),
                })
            }
            SenderInner::Remote(r, _) => {
                if r.closed.load(Ordering::Acquire) {
                    return Err(TrySendError::Failed(SendError {
                        message: value,
                        error: Error::closed("send after close"),
                    }));
                }
                let waker = std::task::Waker::noop();
                let mut cx = Context::from_waker(waker);
                match r.session.conn.poll_send_ready(&mut cx, r.id) {
                    Poll::Pending => Err(TrySendError::Full(value)),
                    Poll::Ready(Err(error)) => Err(TrySendError::Failed(SendError {
                        message: value,
                        error,
                    })),
                    Poll::Ready(Ok(())) => remote_send(r, value).map_err(TrySendError::Failed),
                }
            }
        }
    }

    /// Ends the channel cleanly for every clone: the receiver gets the messages sent so
    /// far, then `Ok(None)`. Later sends fail with a [`Closed`](ErrorKind::Closed) error;
    /// closing twice does nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, mut rx) = libchan_core::channel::<u8>(4);
    /// let other = tx.clone();
    /// tx.send(1).await.unwrap();
    /// tx.close().await;
    /// assert!(other.send(2).await.unwrap_err().error.is_closed());
    /// assert_eq!(rx.recv().await.unwrap(), Some(1));
    /// assert_eq!(rx.recv().await.unwrap(), None);
    /// # }
    /// ```
    pub async fn close(&self) {
        self.end(None).await
    }

    /// Ends the channel with an application error: the receiver gets the messages sent so
    /// far, then an [`ErrorKind::Remote`] error carrying `message`, then `Ok(None)`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, mut rx) = libchan_core::channel::<u8>(4);
    /// tx.close_with_error("disk full").await;
    /// let e = rx.recv().await.unwrap_err();
    /// assert!(e.is_remote());
    /// assert_eq!(e.message(), "disk full");
    /// assert_eq!(rx.recv().await.unwrap(), None);
    /// # }
    /// ```
    pub async fn close_with_error(&self, message: impl Into<String>) {
        self.end(Some(message.into())).await
    }

    async fn end(&self, error: Option<String>) {
        match &self.inner {
            SenderInner::Local(l) => {
                if l.shared.feeds.closed.swap(true, Ordering::AcqRel) {
                    return;
                }
                let Some(tx) = l.tx() else { return };
                if let Some(m) = error {
                    let _ = tx.send(Item::Error(Error::new(ErrorKind::Remote, m))).await;
                }
                let _ = tx.send(Item::End).await;
            }
            SenderInner::Remote(r, _) => {
                if r.closed.swap(true, Ordering::AcqRel) {
                    return;
                }
                match error {
                    None => r.session.conn.finish(r.id),
                    Some(m) => r.session.conn.close_with_error(r.id, &m),
                }
            }
        }
    }

    /// Waits until the receiving end is gone (dropped, or its connection lost).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, rx) = libchan_core::channel::<u8>(1);
    /// drop(rx);
    /// tx.closed().await;
    /// # }
    /// ```
    pub async fn closed(&self) {
        match &self.inner {
            SenderInner::Local(l) => {
                if let Some(tx) = l.tx() {
                    tx.closed().await
                }
            }
            SenderInner::Remote(r, _) => {
                poll_fn(|cx| r.session.conn.poll_send_closed(cx, r.id)).await
            }
        }
    }

    /// Waits until every message sent so far has been handed to the transport.
    /// (Local channels: returns at once.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), libchan_core::Error> {
    /// let (a, _b) = libchan_core::Session::mem_pair();
    /// let tx = a.open::<u8>().await?;
    /// tx.send(1).await.map_err(|e| e.error)?;
    /// tx.flush().await?;
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) -> Result<(), Error> {
        match &self.inner {
            SenderInner::Local(_) => Ok(()),
            SenderInner::Remote(r, _) => poll_fn(|cx| r.session.conn.poll_flush(cx, r.id)).await,
        }
    }

    /// Closes the channel (as [`close`](Sender::close)) and waits until the receiving
    /// application has taken every message sent on it: delivery confirmation. Over a
    /// connection a receiver that took every message and was then dropped without reading
    /// the end also confirms; a local channel's receiver must read the end.
    ///
    /// `Ok(())` means the peer's application received everything, in order. Errors: the
    /// receiver was dropped with messages unread ([`ErrorKind::Reset`], or
    /// [`ErrorKind::Closed`] for a local channel), the connection was lost first
    /// ([`ErrorKind::ConnectionLost`]: some messages may or may not have been taken), or
    /// the transport cannot confirm ([`ErrorKind::Closed`]). Confirmation is per hop: a
    /// process that relays the channel onward confirms when its relay took the messages.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), libchan_core::Error> {
    /// let (a, b) = libchan_core::Session::mem_pair();
    /// let tx = a.open::<u8>().await?;
    /// let mut rx = b.accept::<u8>().await?.expect("a channel");
    /// tx.send(1).await.map_err(|e| e.error)?;
    /// let confirm = tokio::spawn(async move { tx.delivered().await });
    /// assert_eq!(rx.recv().await?, Some(1));
    /// assert_eq!(rx.recv().await?, None); // the end is taken: delivery is confirmed
    /// confirm.await.expect("task")?;
    /// # Ok(()) }
    /// ```
    pub async fn delivered(&self) -> Result<(), Error> {
        self.close().await;
        match &self.inner {
            SenderInner::Local(l) => {
                if l.shared.feeds.end_taken().await {
                    Ok(())
                } else {
                    Err(Error::closed(
                        "the receiver was dropped before it took everything",
                    ))
                }
            }
            SenderInner::Remote(r, _) => {
                poll_fn(|cx| r.session.conn.poll_delivered(cx, r.id)).await
            }
        }
    }

    /// True if both handles send on the same channel.
    ///
    /// ```
    /// let (tx, _rx) = libchan_core::channel::<u8>(1);
    /// let (other, _orx) = libchan_core::channel::<u8>(1);
    /// assert!(tx.same_channel(&tx.clone()));
    /// assert!(!tx.same_channel(&other));
    /// ```
    pub fn same_channel(&self, other: &Sender<T>) -> bool {
        match (&self.inner, &other.inner) {
            (SenderInner::Local(a), SenderInner::Local(b)) => Arc::ptr_eq(&a.shared, &b.shared),
            (SenderInner::Remote(a, _), SenderInner::Remote(b, _)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Remote sends and receives spend one unit of tokio's cooperative budget per this many
/// messages (tokio's own channels: one per message). A task that sends or receives without
/// ever waiting still yields, after 512 messages instead of 128: often enough that the
/// writer it woke and the other workers get to run while it produces (without the budget,
/// a stream ran on one core), rarely enough that a stream of small messages is not moved
/// between workers every 128 (unix stream of 64-byte messages, 12 alternating rounds:
/// 4.44 -> 4.85 M msg/s, CPU per million 412 -> 375 ms).
const COOP_EVERY: u32 = 4;

/// Waits for room on a remote channel, as a share of the task's tokio cooperative budget
/// ([`COOP_EVERY`]): a task that sends without ever waiting yields now and then, like with
/// tokio's own channels, so that the connection's writer (and, with a multi-thread
/// runtime, the other workers) get to run while it produces instead of after.
fn poll_send_ready_coop(r: &RemoteSender, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
    let turn = r.coop_turn.load(Ordering::Relaxed);
    if turn + 1 < COOP_EVERY {
        let res = if r.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            std::task::ready!(r.session.conn.poll_send_ready(cx, r.id))
        };
        r.coop_turn.store(turn + 1, Ordering::Relaxed);
        return Poll::Ready(res);
    }
    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    r.coop_turn.store(0, Ordering::Relaxed);
    // The previous send left room: no need to ask the connection (see `ready`).
    let res = if r.ready.load(Ordering::Relaxed) {
        Ok(())
    } else {
        std::task::ready!(r.session.conn.poll_send_ready(cx, r.id))
    };
    coop.made_progress();
    Poll::Ready(res)
}

fn remote_send<T: Message>(r: &Arc<RemoteSender>, value: T) -> Result<(), SendError<T>> {
    // A few bytes of slack: the next message is often the same but for an integer that
    // got a longer CBOR head (a counter, a sequence number), which would otherwise cost a
    // reallocation of the whole buffer.
    let hint = r.size_hint.load(Ordering::Relaxed);
    let hint = hint + hint / 16 + 16;
    let (msg, attach) =
        match encode_message(&r.session, &value, crate::message::encode_buffer(hint)) {
            Ok(x) => x,
            Err(error) => {
                return Err(SendError {
                    message: value,
                    error,
                })
            }
        };
    // The next message of this channel likely has about this size: starting its buffer
    // there saves the copies of growing it (a 1 MiB message grown from 64 KiB was copied
    // twice). One small message after a large one brings the hint back down. Spliced
    // blobs are not in the buffer, so they do not count.
    r.size_hint.store(msg.buf.len(), Ordering::Relaxed);
    match r.session.conn.send_message_then_ready(r.id, msg) {
        Ok((ids, ready)) => {
            r.ready.store(ready, Ordering::Relaxed);
            // (Most messages carry no attachment: their empty list is not even walked.)
            if !attach.is_empty() {
                let mut ids = ids.into_iter();
                for a in attach.into_iter().flatten() {
                    // Attachments of new streams get ids in order; others get none.
                    a.install_next(&r.session, &mut ids);
                }
            }
            drop(value);
            Ok(())
        }
        Err(error) => {
            for a in attach.into_iter().flatten() {
                a.restore();
            }
            Err(SendError {
                message: value,
                error,
            })
        }
    }
}

trait InstallNext {
    fn install_next(self, session: &Arc<NetSession>, ids: &mut InlineListIter<u32>);
}

impl InstallNext for Box<dyn Attach> {
    fn install_next(self, session: &Arc<NetSession>, ids: &mut InlineListIter<u32>) {
        match ids.next() {
            Some(id) => self.install(session, id),
            None => self.restore(),
        }
    }
}

/// The receiving end of a channel.
pub struct Receiver<T> {
    slot: Arc<Mutex<Option<RecvInner<T>>>>,
}

enum RecvInner<T> {
    Local {
        /// The queue of local sends, once a local send created it.
        rx: Option<mpsc::Receiver<Item<T>>>,
        done: bool,
        shared: Arc<Local<T>>,
        turn: usize,
    },
    Remote(RemoteReceiver),
    /// A Receiver sent back to us: first what the peer had not delivered (on `first`),
    /// then the original receiver, handed back by its forwarding task.
    Returned {
        first: RemoteReceiver,
        rest: oneshot::Receiver<RecvInner<T>>,
        first_done: bool,
    },
}

pub(crate) struct RemoteReceiver {
    pub(crate) session: Arc<NetSession>,
    pub(crate) id: u32,
    /// Messages the connection handed out ahead (see [`Connection::poll_recv_batch`]),
    /// taken before the connection is polled again.
    ///
    /// [`Connection::poll_recv_batch`]: crate::Connection::poll_recv_batch
    pub(crate) ahead: VecDeque<InMessage>,
    /// Messages taken from `ahead` without spending cooperative budget since the last
    /// that spent one (see [`COOP_EVERY`]).
    coop_turn: u32,
}

impl RemoteReceiver {
    pub(crate) fn new(session: Arc<NetSession>, id: u32) -> RemoteReceiver {
        RemoteReceiver {
            session,
            id,
            ahead: VecDeque::new(),
            coop_turn: 0,
        }
    }
}

impl Drop for RemoteReceiver {
    fn drop(&mut self) {
        self.session.conn.release(self.id);
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T: Message> Receiver<T> {
    pub(crate) fn remote(session: Arc<NetSession>, id: u32) -> Self {
        Receiver {
            slot: Arc::new(Mutex::new(Some(RecvInner::Remote(RemoteReceiver::new(
                session, id,
            ))))),
        }
    }

    /// Receives the next message.
    ///
    /// `Ok(Some(v))` is a message, `Ok(None)` a clean end of stream (and again on every
    /// later call). Errors tell apart a lost connection, the peer's application error
    /// ([`close_with_error`](Sender::close_with_error); the channel then ends), a message
    /// that could not be decoded (the channel goes on) and local misuse.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, mut rx) = libchan_core::channel::<u8>(1);
    /// tokio::spawn(async move { tx.send(9).await.unwrap() });
    /// assert_eq!(rx.recv().await.unwrap(), Some(9));
    /// assert_eq!(rx.recv().await.unwrap(), None); // every sender dropped
    /// # }
    /// ```
    ///
    /// Each message received from a connection spends one unit of the task's cooperative
    /// budget, as with [`send`](Sender::send).
    ///
    /// # Cancel safety
    /// Cancel safe: no message is lost if the future is dropped.
    pub async fn recv(&mut self) -> Result<Option<T>, Error> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next message; see [`recv`](Receiver::recv).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>, Error>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let next = match slot.as_mut() {
                None => {
                    return Poll::Ready(Err(Error::closed("receiver was moved into a message")))
                }
                Some(inner) => match poll_inner(inner, cx) {
                    Step::Ready(r) => return r,
                    Step::Switch(next) => next,
                },
            };
            *slot = Some(next);
        }
    }

    /// Stops the channel: senders see it closed; messages already queued can still be
    /// received.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (tx, mut rx) = libchan_core::channel::<u8>(2);
    /// tx.send(1).await.unwrap();
    /// rx.close();
    /// assert!(tx.send(2).await.is_err());
    /// assert_eq!(rx.recv().await.unwrap(), Some(1));
    /// # }
    /// ```
    pub fn close(&mut self) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(RecvInner::Local { rx, shared, .. }) = slot.as_mut() {
            shared.close_rx(rx);
            shared.feeds.clear();
        }
    }
}

enum Step<T> {
    Ready(Poll<Result<Option<T>, Error>>),
    Switch(RecvInner<T>),
}

fn poll_remote<T: Message>(
    r: &mut RemoteReceiver,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<T>, Error>> {
    if r.coop_turn + 1 < COOP_EVERY {
        if let Some(m) = r.ahead.pop_front() {
            r.coop_turn += 1;
            return Poll::Ready(decode_message::<T>(&r.session, r.id, m).map(Some));
        }
    }
    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    r.coop_turn = 0;
    if let Some(m) = r.ahead.pop_front() {
        coop.made_progress();
        return Poll::Ready(decode_message::<T>(&r.session, r.id, m).map(Some));
    }
    let res = std::task::ready!(r.session.conn.poll_recv_batch(cx, r.id, &mut r.ahead));
    coop.made_progress();
    Poll::Ready(match res {
        Ok(None) => Ok(None),
        Err(e) => Err(e),
        Ok(Some(m)) => decode_message::<T>(&r.session, r.id, m).map(Some),
    })
}

enum FeedPoll<T> {
    Ready(Result<Option<T>, Error>),
    Pending { any: bool },
}

/// Polls the feeds of a local channel, starting after the one that delivered last.
fn poll_feeds<T: Message>(feeds: &Feeds, turn: &mut usize, cx: &mut Context<'_>) -> FeedPoll<T> {
    {
        let mut w = feeds.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }
    let mut list = feeds.list.lock().unwrap_or_else(|e| e.into_inner());
    let mut i = 0;
    while i < list.len() {
        let idx = (*turn + i) % list.len();
        match poll_remote::<T>(&mut list[idx], cx) {
            Poll::Pending => i += 1,
            Poll::Ready(Ok(Some(v))) => {
                *turn = idx + 1;
                return FeedPoll::Ready(Ok(Some(v)));
            }
            Poll::Ready(Err(e)) if e.is_decode() => {
                *turn = idx + 1;
                return FeedPoll::Ready(Err(e));
            }
            Poll::Ready(r) => {
                // This peer's copy of the Sender is gone (or its connection).
                let gone = list.swap_remove(idx);
                drop(list);
                gone.session.unexport(gone.id);
                drop(gone);
                if let Err(e) = r {
                    return FeedPoll::Ready(Err(e));
                }
                list = feeds.list.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
    }
    FeedPoll::Pending {
        any: !list.is_empty(),
    }
}

fn poll_inner<T: Message>(inner: &mut RecvInner<T>, cx: &mut Context<'_>) -> Step<T> {
    match inner {
        RecvInner::Local {
            rx,
            done,
            shared,
            turn,
        } => {
            if *done {
                return Step::Ready(Poll::Ready(Ok(None)));
            }
            // Registers the waker that a queue's creation or the last sender's drop wakes.
            let has_feeds = match poll_feeds::<T>(&shared.feeds, turn, cx) {
                FeedPoll::Ready(r) => return Step::Ready(Poll::Ready(r)),
                FeedPoll::Pending { any } => any,
            };
            let queued = match rx {
                Some(rx) => rx.poll_recv(cx),
                None => {
                    let mut lazy = shared.lazy();
                    match lazy.rx.take() {
                        Some(r) => {
                            drop(lazy);
                            rx.insert(r).poll_recv(cx)
                        }
                        // No queue, and no sender handle left or the receiver closed:
                        // the queue's end.
                        None if shared.senders_gone() || lazy.rx_closed => Poll::Ready(None),
                        // Waiting with no remote sender: the senders are local (or moved
                        // within the process), so the queue will be used. Creating it here,
                        // on the receiver's thread, spares the first send the creation and
                        // the extra wake-up (in-memory rpc: a quarter of its throughput).
                        None if !has_feeds => {
                            let r = shared.create(&mut lazy);
                            drop(lazy);
                            rx.insert(r).poll_recv(cx)
                        }
                        None => Poll::Pending,
                    }
                }
            };
            Step::Ready(match queued {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) if has_feeds => Poll::Pending,
                Poll::Ready(None) | Poll::Ready(Some(Item::End)) => {
                    *done = true;
                    shared.close_rx(rx);
                    shared.feeds.clear();
                    shared.feeds.set_end(true);
                    Poll::Ready(Ok(None))
                }
                Poll::Ready(Some(Item::Value(v))) => Poll::Ready(Ok(Some(v))),
                Poll::Ready(Some(Item::Error(e))) => Poll::Ready(Err(e)),
            })
        }
        RecvInner::Remote(r) => Step::Ready(poll_remote(r, cx)),
        RecvInner::Returned {
            first,
            rest,
            first_done,
        } => {
            if !*first_done {
                match poll_remote::<T>(first, cx) {
                    Poll::Ready(Ok(None)) => *first_done = true,
                    other => return Step::Ready(other),
                }
            }
            match Pin::new(rest).poll(cx) {
                Poll::Pending => Step::Ready(Poll::Pending),
                Poll::Ready(Ok(original)) => Step::Switch(original),
                // The forwarding task ended on its own: everything came through `first`.
                Poll::Ready(Err(_)) => Step::Switch(RecvInner::Local {
                    rx: None,
                    done: true,
                    shared: Arc::new(Local::new(1, 0)),
                    turn: 0,
                }),
            }
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // A remote end releases its stream when dropped (the connection drops what is
        // still queued and releases what those messages reference); a local channel's
        // feeds are dropped and forgotten here.
        let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(RecvInner::Local { mut rx, shared, .. }) = taken {
            // The channel keeps the waker of the last poll until its last sender is gone,
            // and clearing the feeds below may drop that sender: it would wake the task
            // that is dropping this receiver, which tokio then reschedules behind the
            // others and hands to an idle worker thread (a futex wake per reply in the
            // request/reply pattern). Forget the feeds' waker, and replace the queue's
            // with one that does nothing.
            shared.feeds.forget_waker();
            shared.close_rx(&mut rx);
            if let Some(mut rx) = rx {
                let _ = rx.poll_recv(&mut Context::from_waker(std::task::Waker::noop()));
            }
            shared.feeds.clear();
            shared.feeds.set_end(false);
        }
    }
}

impl<T: Message> Sender<T> {
    /// A Sender for a remote stream already claimed (see `attachment.rs`).
    pub(crate) fn from_remote(r: Arc<RemoteSender>) -> Self {
        Sender {
            inner: SenderInner::Remote(r, PhantomData),
        }
    }
}

impl RemoteSender {
    pub(crate) fn new(session: Arc<NetSession>, id: u32) -> Arc<Self> {
        Arc::new(RemoteSender {
            session,
            id,
            closed: AtomicBool::new(false),
            size_hint: AtomicUsize::new(64),
            ready: AtomicBool::new(true),
            coop_turn: AtomicU32::new(0),
        })
    }
}

impl<T: Message> Receiver<T> {
    /// A Receiver for a remote stream already claimed (see `attachment.rs`).
    pub(crate) fn from_remote(r: RemoteReceiver) -> Self {
        Receiver {
            slot: Arc::new(Mutex::new(Some(RecvInner::Remote(r)))),
        }
    }

    /// A Receiver of ours that came back: `first` carries what the peer had not
    /// delivered, then the original continues (its forwarding task hands it back).
    pub(crate) fn returned(first: RemoteReceiver, original: u32) -> Self {
        let (back_tx, back_rx) = oneshot::channel();
        // Ask the forwarding task of our stream to stop and hand the original back.
        // If it is gone, everything it forwarded arrives on the new stream.
        if let Some(stop) = first.session.take_returned::<ReturnStop<T>>(original) {
            let _ = stop.send(back_tx);
        }
        Receiver {
            slot: Arc::new(Mutex::new(Some(RecvInner::Returned {
                first,
                rest: back_rx,
                first_done: false,
            }))),
        }
    }
}

// ---- serialization of ends -------------------------------------------------------------

fn outside<R>(what: &str, f: impl FnOnce(String) -> R) -> R {
    f(format!(
        "a libchan {what} can only be serialized by a libchan send on a session"
    ))
}

impl<T: Message> Serialize for Sender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let marker = with_encode(|ctx| {
            // Sent back to the session that created its stream: refer to that stream.
            if let SenderInner::Remote(r, _) = &self.inner {
                if Arc::ptr_eq(&r.session, ctx.session) && !ctx.session.conn.is_local(r.id) {
                    return ctx.push(
                        OutRef::Existing(WireRef {
                            kind: RefKind::Sender,
                            id: r.id,
                        }),
                        None,
                    );
                }
            }
            ctx.push(
                OutRef::New(RefKind::Sender),
                Some(Box::new(SenderAttach(self.clone()))),
            )
        });
        match marker {
            Some(m) => m.serialize(s),
            None => outside("Sender", |m| Err(S::Error::custom(m))),
        }
    }
}

impl<'de, T: Message> Deserialize<'de> for Sender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::attachment::claim_typed(d, "Sender", &[RefKind::Sender], |a| a.into_sender::<T>())
    }
}

impl<T: Message> Serialize for Receiver<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let marker = with_encode(|ctx| {
            let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(inner) = taken else {
                return Err("Receiver was already moved into another message".to_owned());
            };
            // Sent back to the session whose stream it receives from: name that stream,
            // and forward what has not been delivered yet on a new one (PROTOCOL.md §7).
            if let RecvInner::Remote(r) = &inner {
                if Arc::ptr_eq(&r.session, ctx.session) && !ctx.session.conn.is_local(r.id) {
                    let marker = ctx.push(
                        OutRef::Existing(WireRef {
                            kind: RefKind::ReturnedReceiver,
                            id: r.id,
                        }),
                        None,
                    );
                    ctx.push(
                        OutRef::New(RefKind::Receiver),
                        Some(Box::new(ReceiverAttach {
                            slot: self.slot.clone(),
                            inner: Some(inner),
                        })),
                    );
                    return Ok(marker);
                }
            }
            Ok(ctx.push(
                OutRef::New(RefKind::Receiver),
                Some(Box::new(ReceiverAttach {
                    slot: self.slot.clone(),
                    inner: Some(inner),
                })),
            ))
        });
        match marker {
            Some(Ok(m)) => m.serialize(s),
            Some(Err(e)) => Err(S::Error::custom(e)),
            None => outside("Receiver", |m| Err(S::Error::custom(m))),
        }
    }
}

impl<'de, T: Message> Deserialize<'de> for Receiver<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::attachment::claim_typed(
            d,
            "Receiver",
            &[RefKind::Receiver, RefKind::ReturnedReceiver],
            |a| a.into_receiver::<T>(),
        )
    }
}

/// A Sender sent in a message: the peer sends on a new stream, a task forwards into it.
struct SenderAttach<T>(Sender<T>);

impl<T: Message> Attach for SenderAttach<T> {
    fn install(self: Box<Self>, session: &Arc<NetSession>, id: u32) {
        let tx = self.0;
        if let SenderInner::Local(l) = &tx.inner {
            let feed = RemoteReceiver::new(session.clone(), id);
            if l.shared.is_rx_closed() {
                // Nobody receives any more: refuse the peer's messages at once.
                drop(feed);
            } else {
                // The channel's receiver reads the new stream itself; the handle itself
                // is kept for the peer's sending it back (no clone to count and drop).
                // Exported before the feed is added: a feed that ends at once unexports
                // its id, which must then be there to go.
                let shared = l.shared.clone();
                session.export_sender(id, tx);
                shared.feeds.add(feed);
            }
            return;
        }
        session.export_sender(id, tx.clone());
        let mut rx = Receiver::<T>::remote(session.clone(), id);
        let s = session.clone();
        session.spawn(async move {
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(Some(v)) => {
                            if tx.send(v).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let end = !e.is_decode();
                            forward_error(&tx, e).await;
                            if end {
                                break;
                            }
                        }
                    },
                    _ = tx.closed() => break,
                }
            }
            drop(rx);
            s.unexport(id);
        });
    }

    fn restore(self: Box<Self>) {}
}

async fn forward_error<T: Message>(tx: &Sender<T>, e: Error) {
    match &tx.inner {
        SenderInner::Local(l) => {
            if let Some(tx) = l.tx() {
                let _ = tx.send(Item::Error(e)).await;
            }
        }
        SenderInner::Remote(..) => {
            if !e.is_decode() {
                tx.close_with_error(e.to_string()).await;
            }
        }
    }
}

/// A Receiver sent in a message: a task forwards what it receives to the peer.
struct ReceiverAttach<T> {
    slot: Arc<Mutex<Option<RecvInner<T>>>>,
    inner: Option<RecvInner<T>>,
}

/// Sent to a Receiver's forwarding task when the Receiver comes back: the task stops and
/// hands the original receiver back on the enclosed channel.
type ReturnStop<T> = oneshot::Sender<oneshot::Sender<RecvInner<T>>>;

impl<T: Message> Attach for ReceiverAttach<T> {
    fn install(mut self: Box<Self>, session: &Arc<NetSession>, id: u32) {
        let inner = self.inner.take().expect("installed once");
        let mut rx = Receiver {
            slot: Arc::new(Mutex::new(Some(inner))),
        };
        let tx = Sender::<T>::remote(session.clone(), id);
        let (stop_tx, mut stop_rx) = oneshot::channel::<oneshot::Sender<RecvInner<T>>>();
        session.export_returned::<ReturnStop<T>>(id, stop_tx);
        let s = session.clone();
        session.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    back = &mut stop_rx => {
                        if let Ok(back) = back {
                            let taken = rx.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                            if let Some(inner) = taken {
                                let _ = back.send(inner);
                            }
                        }
                        break;
                    }
                    r = rx.recv() => match r {
                        Ok(Some(v)) => {
                            if tx.send(v).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tx.close_with_error(e.to_string()).await;
                            break;
                        }
                    },
                    _ = tx.closed() => break,
                }
            }
            s.take_returned::<ReturnStop<T>>(id);
        });
    }

    fn restore(mut self: Box<Self>) {
        if let Some(inner) = self.inner.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(inner);
        }
    }
}
