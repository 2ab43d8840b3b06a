//! Sessions: top-level channels over a connection, and the encoding of ends in messages.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::future::poll_fn;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::channel::{Receiver, Sender};
use crate::codec::Codec;
use crate::config::Config;
use crate::conn::{Connection, ConnectionStats};
use crate::driver::{Link, MuxConnection};
use crate::error::{Error, ErrorKind};
use crate::frame::StreamKind;
use crate::message::{InMessage, OutMessage, OutRef, RefKind, WireRef};
use crate::mux::Role;

/// A type that can be sent on a channel.
///
/// Implemented for every `Serialize + DeserializeOwned + Send + 'static` type, including
/// structs and enums that contain [`Sender`]s, [`Receiver`]s,
/// [`ByteStream`](crate::ByteStream)s and [`Fd`](crate::Fd)s anywhere.
pub trait Message: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Message for T {}

/// A session: a connection to one peer, on which either side opens channels.
///
/// Sessions are cheap to clone. The connection closes gracefully when the last clone and
/// the last channel end using it are dropped, or at once on [`abort`](Session::abort).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), libchan_core::Error> {
/// use libchan_core::Session;
/// let (a, b) = Session::mem_pair();
/// let tx = a.open::<String>().await?;
/// let mut rx = b.accept::<String>().await?.expect("a channel");
/// tx.send("hello".to_owned()).await.map_err(|e| e.error)?;
/// assert_eq!(rx.recv().await?, Some("hello".to_owned()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Kind,
}

#[derive(Clone)]
enum Kind {
    Net(Arc<NetSession>),
    Mem(Arc<MemSession>),
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Kind::Net(n) => f
                .debug_struct("Session")
                .field("conn", &n.conn)
                .finish_non_exhaustive(),
            Kind::Mem(_) => f.debug_struct("Session").field("mem", &true).finish(),
        }
    }
}

/// Counters of a session, for tests and monitoring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// The connection's counters.
    pub connection: ConnectionStats,
    /// Forwarding tasks alive (one per end sent that needs one).
    pub tasks: usize,
    /// Sent Senders remembered so that they resolve when sent back.
    pub exported: usize,
}

impl Session {
    /// Runs a session over a byte pipe: performs the handshake and starts the driver.
    ///
    /// `role` decides who opens odd and who opens even stream ids: one side must be
    /// [`Role::Dialer`] and the other [`Role::Listener`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), libchan_core::Error> {
    /// use libchan_core::{driver::IoLink, Config, Role, Session};
    /// let config = Config::new(libchan_codec_cbor::Cbor);
    /// let (x, y) = tokio::io::duplex(64 * 1024);
    /// let (a, b) = tokio::join!(
    ///     Session::over_link(IoLink::new(x), Role::Dialer, &config),
    ///     Session::over_link(IoLink::new(y), Role::Listener, &config),
    /// );
    /// let (a, b) = (a?, b?);
    /// assert_eq!(a.codec(), "cbor");
    /// let tx = a.open::<Vec<u8>>().await?;
    /// tx.send(vec![1, 2]).await.map_err(|e| e.error)?;
    /// let mut rx = b.accept::<Vec<u8>>().await?.expect("a channel");
    /// assert_eq!(rx.recv().await?, Some(vec![1, 2]));
    /// # Ok(()) }
    /// ```
    pub async fn over_link(link: impl Link, role: Role, config: &Config) -> Result<Session, Error> {
        let conn = MuxConnection::start(Box::new(link), role, config).await?;
        Session::over_connection(Box::new(conn), config)
    }

    /// Runs a session over any [`Connection`] whose handshake is done.
    pub fn over_connection(conn: Box<dyn Connection>, config: &Config) -> Result<Session, Error> {
        let codec = config.find_codec(conn.codec()).ok_or_else(|| {
            Error::new(
                ErrorKind::Handshake,
                format!(
                    "connection agreed on codec {:?}, which is not configured",
                    conn.codec()
                ),
            )
        })?;
        #[cfg(feature = "cbor")]
        let cbor = (&*codec as &dyn Any).is::<crate::cbor::Cbor>();
        Ok(Session {
            inner: Kind::Net(Arc::new(NetSession {
                conn,
                codec,
                #[cfg(feature = "cbor")]
                cbor,
                origins: Mutex::new(crate::mux::IdMap::default()),
                tasks: AtomicUsize::new(0),
            })),
        })
    }

    /// Two connected in-memory sessions: messages move as Rust values, never serialized.
    pub fn mem_pair() -> (Session, Session) {
        let cap = crate::Limits::default().max_pending_accepts as usize;
        let (ta, ra) = mpsc::channel(cap);
        let (tb, rb) = mpsc::channel(cap);
        let closing = Arc::new(tokio::sync::watch::channel(false).0);
        let a = MemSession {
            to_peer: Mutex::new(Some(tb)),
            accepts: tokio::sync::Mutex::new(ra),
            closing: closing.clone(),
        };
        let b = MemSession {
            to_peer: Mutex::new(Some(ta)),
            accepts: tokio::sync::Mutex::new(rb),
            closing,
        };
        (
            Session {
                inner: Kind::Mem(Arc::new(a)),
            },
            Session {
                inner: Kind::Mem(Arc::new(b)),
            },
        )
    }

    /// Opens a top-level channel to the peer, which gets its [`Receiver`] from
    /// [`accept`](Session::accept).
    pub async fn open<T: Message>(&self) -> Result<Sender<T>, Error> {
        match &self.inner {
            Kind::Net(n) => {
                let id = n.conn.open(StreamKind::OpenerSends)?;
                Ok(Sender::remote(n.clone(), id))
            }
            Kind::Mem(m) => {
                if *m.closing.borrow() {
                    return Err(Error::closed("session is closing"));
                }
                let (tx, rx) = crate::channel::channel::<T>(64);
                let peer = m
                    .to_peer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .ok_or_else(|| Error::closed("session is closed"))?;
                let item: MemAccept = (std::any::type_name::<T>(), Box::new(rx));
                match peer.try_send(item) {
                    Ok(()) => Ok(tx),
                    Err(mpsc::error::TrySendError::Full(_)) => Err(Error::limit(
                        "peer's max_pending_accepts",
                        peer.max_capacity() as u64,
                        peer.max_capacity() as u64 + 1,
                    )),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Err(Error::lost("peer session is gone"))
                    }
                }
            }
        }
    }

    /// Waits for a top-level channel opened by the peer. `Ok(None)` when the session is
    /// closing (either side called [`close`](Session::close) or the peer went away
    /// cleanly) and no channel is left to accept.
    ///
    /// # Cancel safety
    /// Cancel safe: a channel is never lost if the future is dropped.
    pub async fn accept<T: Message>(&self) -> Result<Option<Receiver<T>>, Error> {
        match &self.inner {
            Kind::Net(n) => {
                let id = poll_fn(|cx| n.conn.poll_accept(cx)).await?;
                Ok(id.map(|id| Receiver::remote(n.clone(), id)))
            }
            Kind::Mem(m) => {
                let mut closing = m.closing.subscribe();
                let mut q = m.accepts.lock().await;
                let item = tokio::select! {
                    biased;
                    item = q.recv() => item,
                    _ = closing.wait_for(|c| *c) => None,
                };
                match item {
                    None => Ok(None),
                    Some((name, b)) => match b.downcast::<Receiver<T>>() {
                        Ok(rx) => Ok(Some(*rx)),
                        Err(_) => Err(Error::decode(format!(
                            "accepted channel carries {name}, not {}",
                            std::any::type_name::<T>()
                        ))),
                    },
                }
            }
        }
    }

    /// Starts a graceful close: no new channels either way; channels already open finish,
    /// including those the peer opened that are not accepted yet ([`accept`](Session::accept)
    /// returns them before it returns `Ok(None)`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), libchan_core::Error> {
    /// let (a, b) = libchan_core::Session::mem_pair();
    /// let tx = a.open::<u8>().await?;
    /// b.close();
    /// assert!(a.open::<u8>().await.unwrap_err().is_closed());
    /// let mut rx = b.accept::<u8>().await?.expect("opened before the close");
    /// tx.send(1).await.map_err(|e| e.error)?; // open channels still work
    /// assert_eq!(rx.recv().await?, Some(1));
    /// assert!(b.accept::<u8>().await?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn close(&self) {
        match &self.inner {
            Kind::Net(n) => n.conn.close(),
            Kind::Mem(m) => {
                m.closing.send_replace(true);
            }
        }
    }

    /// Graceful shutdown with a deadline: [`close`](Session::close) (no new channels
    /// either way), then waits until the channels already open have finished on both sides
    /// and the connection ended. If that takes longer than `timeout`, the session is
    /// [aborted](Session::abort) and the error (kind [`Closed`](ErrorKind::Closed)) says how
    /// many streams were still open.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), libchan_core::Error> {
    /// let (a, _b) = libchan_core::Session::mem_pair();
    /// a.drain(std::time::Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn drain(&self, timeout: std::time::Duration) -> Result<(), Error> {
        self.close();
        let Kind::Net(n) = &self.inner else {
            return Ok(());
        };
        let ended = std::future::poll_fn(|cx| n.conn.poll_ended(cx));
        match tokio::time::timeout(timeout, ended).await {
            Ok(()) => Ok(()),
            Err(_) => {
                let open = n.conn.stats().streams;
                n.conn.abort();
                Err(Error::new(
                    ErrorKind::Closed,
                    format!(
                        "drain did not finish within {timeout:?} ({open} streams still open); the session was aborted"
                    ),
                ))
            }
        }
    }

    /// Drops the connection now. Pending operations here fail with a
    /// [`Closed`](ErrorKind::Closed) error; the peer sees a lost connection.
    pub fn abort(&self) {
        match &self.inner {
            Kind::Net(n) => n.conn.abort(),
            Kind::Mem(_) => self.close(),
        }
    }

    /// The peer's identity as the transport verified it (a TLS peer certificate, an HTTP
    /// authentication result); `None` for transports that verify nothing, and in memory.
    pub fn peer_identity(&self) -> Option<&crate::PeerIdentity> {
        match &self.inner {
            Kind::Net(n) => n.conn.peer_identity(),
            Kind::Mem(_) => None,
        }
    }

    /// Name of the codec in use (`"mem"` for in-memory sessions).
    pub fn codec(&self) -> &str {
        match &self.inner {
            Kind::Net(n) => n.codec.name(),
            Kind::Mem(_) => "mem",
        }
    }

    /// True if descriptors travel as real descriptors on this session.
    pub fn can_pass_fds(&self) -> bool {
        match &self.inner {
            Kind::Net(n) => n.conn.can_pass_fds(),
            Kind::Mem(_) => true,
        }
    }

    /// The error that ended the session's connection, if it ended.
    pub fn error(&self) -> Option<Error> {
        match &self.inner {
            Kind::Net(n) => n.conn.error(),
            Kind::Mem(_) => None,
        }
    }

    /// Counters for tests and monitoring.
    ///
    /// ```
    /// let (a, _b) = libchan_core::Session::mem_pair();
    /// assert_eq!(a.stats().tasks, 0);
    /// ```
    pub fn stats(&self) -> SessionStats {
        match &self.inner {
            Kind::Net(n) => SessionStats {
                connection: n.conn.stats(),
                tasks: n.tasks.load(Ordering::Relaxed),
                exported: n.origins.lock().unwrap_or_else(|e| e.into_inner()).len(),
            },
            Kind::Mem(_) => SessionStats::default(),
        }
    }
}

type MemAccept = (&'static str, Box<dyn Any + Send>);

struct MemSession {
    to_peer: Mutex<Option<mpsc::Sender<MemAccept>>>,
    accepts: tokio::sync::Mutex<mpsc::Receiver<MemAccept>>,
    /// Shared by both sides: set by `close` on either, like a GOAWAY.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A Sender of some message type, exported on a stream so that it can come back.
pub(crate) type ExportedSender = Arc<dyn Any + Send + Sync>;

/// What a session remembers about an end it sent, so that the end can come back.
enum Origin {
    /// A Sender (one allocation: the `Arc` is stored as it is, not boxed again).
    Sender(ExportedSender),
    /// How to get a Receiver sent back (see [`NetSession::export_returned`]).
    Returned(Box<dyn Any + Send>),
}

pub(crate) struct NetSession {
    pub(crate) conn: Box<dyn Connection>,
    pub(crate) codec: Arc<dyn Codec>,
    /// The codec is the core's own CBOR: messages are encoded and decoded as their own
    /// types, without the type-erased seam (same bytes).
    #[cfg(feature = "cbor")]
    cbor: bool,
    /// What we sent on our streams, by stream id (ours: odd or even; an [`IdMap`] like
    /// the multiplexer's stream table, looked up once or twice per request).
    ///
    /// [`IdMap`]: crate::mux::IdMap
    origins: Mutex<crate::mux::IdMap<Origin>>,
    tasks: AtomicUsize,
}

impl fmt::Debug for NetSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetSession")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl NetSession {
    /// True if this session encodes with the core's own CBOR, monomorphized: it splices
    /// large [`Blob`](crate::Blob)s instead of copying them and writes reference markers
    /// directly.
    fn typed_cbor(&self) -> bool {
        #[cfg(feature = "cbor")]
        return self.cbor;
        #[cfg(not(feature = "cbor"))]
        false
    }

    /// Appends a value's payload: through the codec seam, or directly when the codec is
    /// the core's CBOR (same bytes, without type erasure).
    fn encode_payload<T: Message>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), Error> {
        #[cfg(feature = "cbor")]
        if self.cbor {
            return crate::cbor::encode_spliced(value, out);
        }
        self.codec.encode(value, out)
    }

    /// Decodes a payload as a `T`, the counterpart of
    /// [`encode_payload`](NetSession::encode_payload).
    fn decode_payload<T: Message>(&self, payload: &[u8]) -> Result<T, Error> {
        #[cfg(feature = "cbor")]
        if self.cbor {
            return crate::cbor::decode(payload);
        }
        let mut out = None;
        self.codec.decode(payload, &mut |d| {
            out = Some(erased_serde::deserialize::<T>(d)?);
            Ok(())
        })?;
        out.ok_or_else(|| Error::decode("codec produced no value"))
    }

    /// Spawns a forwarding task, counted in [`SessionStats::tasks`].
    pub(crate) fn spawn(
        self: &Arc<Self>,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let counter = TaskCount(self.clone());
        counter.0.tasks.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _c = counter;
            fut.await;
        });
    }

    pub(crate) fn export_sender<T: Message>(&self, id: u32, tx: Sender<T>) {
        let shared: ExportedSender = Arc::new(tx);
        crate::spin::lock_spinning(&self.origins).insert(id, Origin::Sender(shared));
    }

    pub(crate) fn unexport(&self, id: u32) {
        let v = crate::spin::lock_spinning(&self.origins).remove(&id);
        drop(v);
    }

    /// Remembers how to get a Receiver sent on stream `id` back if it returns.
    pub(crate) fn export_returned<H: Send + 'static>(&self, id: u32, handle: H) {
        crate::spin::lock_spinning(&self.origins).insert(id, Origin::Returned(Box::new(handle)));
    }

    /// Takes what [`export_returned`](NetSession::export_returned) stored for `id`.
    pub(crate) fn take_returned<H: Send + 'static>(&self, id: u32) -> Option<H> {
        let mut o = crate::spin::lock_spinning(&self.origins);
        if matches!(o.get(&id), Some(Origin::Returned(b)) if b.is::<H>()) {
            match o.remove(&id) {
                Some(Origin::Returned(b)) => b.downcast::<H>().ok().map(|b| *b),
                _ => None,
            }
        } else {
            None
        }
    }

    /// The Sender exported on stream `id`, untyped.
    pub(crate) fn exported_sender_any(&self, id: u32) -> Option<ExportedSender> {
        crate::spin::lock_spinning(&self.origins)
            .get(&id)
            .and_then(|o| match o {
                Origin::Sender(s) => Some(s.clone()),
                Origin::Returned(_) => None,
            })
    }
}

struct TaskCount(Arc<NetSession>);

impl Drop for TaskCount {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something sent in a message that needs work once its stream id is known, or needs to be
/// put back if the send fails.
pub(crate) trait Attach: Send {
    fn install(self: Box<Self>, session: &Arc<NetSession>, id: u32);
    fn restore(self: Box<Self>);
}

/// The attachments of an encoded message, one slot per reference.
/// The attachments of a message being sent (usually none or one, kept inline).
pub(crate) type Attachments = smallvec::SmallVec<[Option<Box<dyn Attach>>; 2]>;

pub(crate) struct EncodeCtx<'a> {
    pub(crate) session: &'a Arc<NetSession>,
    pub(crate) refs: crate::message::OutRefs,
    pub(crate) attach: Attachments,
    pub(crate) fds: Vec<OwnedFd>,
    /// True if the encoder splices blobs (see [`crate::Blob`]): blobs offer their bytes.
    pub(crate) splicing: bool,
    /// Blobs being serialized whose bytes the encoder has not written yet.
    pub(crate) offers: Vec<Bytes>,
    /// Blobs the encoder referenced instead of copying: (offset in the buffer, bytes).
    pub(crate) splices: Vec<(usize, Bytes)>,
}

impl EncodeCtx<'_> {
    /// A blob about to be serialized offers its bytes to a splicing encoder.
    pub(crate) fn offer_blob(&mut self, b: &Bytes) {
        if self.splicing {
            self.offers.push(b.clone());
        }
    }

    /// The encoder is about to write `data` at offset `at`: true if `data` is an offered
    /// blob's memory, now recorded as a splice (the encoder then skips the copy).
    #[cfg_attr(not(feature = "cbor"), allow(dead_code))]
    pub(crate) fn take_offer(&mut self, data: &[u8], at: usize) -> bool {
        let Some(i) = self
            .offers
            .iter()
            .position(|b| b.as_ptr() == data.as_ptr() && b.len() == data.len())
        else {
            return false;
        };
        let b = self.offers.swap_remove(i);
        self.splices.push((at, b));
        true
    }

    /// Adds a reference; returns the codec's marker for it.
    pub(crate) fn push(&mut self, r: OutRef, attach: Option<Box<dyn Attach>>) -> RefMarker {
        let index = self.refs.len() as u32;
        self.refs.push(r);
        self.attach.push(attach);
        #[cfg(feature = "cbor")]
        if self.splicing {
            return RefMarker::Cbor(index);
        }
        RefMarker::Codec(self.session.codec.ref_marker(index))
    }
}

/// How a reference is written into the payload: the codec's marker, or (typed CBOR path)
/// the CBOR reference tag written directly, without boxing the codec's marker.
pub(crate) enum RefMarker {
    #[cfg(feature = "cbor")]
    Cbor(u32),
    Codec(Box<dyn erased_serde::Serialize>),
}

impl Serialize for RefMarker {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            #[cfg(feature = "cbor")]
            RefMarker::Cbor(index) => {
                ciborium::tag::Required::<u32, { crate::cbor::REF_TAG }>(*index).serialize(s)
            }
            RefMarker::Codec(m) => erased_serde::serialize(&**m, s),
        }
    }
}

pub(crate) struct DecodeCtx<'a> {
    pub(crate) session: &'a Arc<NetSession>,
    /// The payload being decoded (blobs may share it).
    pub(crate) payload: &'a Bytes,
    pub(crate) parent: u32,
    pub(crate) refs: &'a [WireRef],
    pub(crate) used: Used,
    pub(crate) fds: Vec<Option<OwnedFd>>,
}

/// Which references of a message were claimed: bits for up to 64 (no allocation for the
/// usual message), a vector beyond.
pub(crate) struct Used {
    bits: u64,
    more: Vec<bool>,
}

impl Used {
    fn new(n: usize) -> Used {
        Used {
            bits: 0,
            more: if n > 64 { vec![false; n] } else { Vec::new() },
        }
    }

    /// Reference `i` was claimed (false for an index out of range).
    pub(crate) fn get(&self, i: usize) -> bool {
        match self.more.get(i) {
            Some(u) => *u,
            None => i < 64 && self.bits & (1 << i) != 0,
        }
    }

    /// Marks reference `i` claimed (callers check the range first; beyond it, nothing).
    fn set(&mut self, i: usize) {
        match self.more.get_mut(i) {
            Some(u) => *u = true,
            None if i < 64 => self.bits |= 1 << i,
            None => {}
        }
    }
}

impl DecodeCtx<'_> {
    /// `v` as a shared slice of the payload, if it lies within it.
    pub(crate) fn share(&self, v: &[u8]) -> Option<Bytes> {
        let (start, end) = (
            self.payload.as_ptr() as usize,
            self.payload.as_ptr() as usize + self.payload.len(),
        );
        let p = v.as_ptr() as usize;
        (p >= start && p + v.len() <= end).then(|| self.payload.slice_ref(v))
    }

    /// Takes reference `index` of the expected kind, once.
    pub(crate) fn take(&mut self, index: u32, kinds: &[RefKind]) -> Result<WireRef, String> {
        let i = index as usize;
        let Some(r) = self.refs.get(i) else {
            return Err(format!(
                "reference {index} out of range (message has {})",
                self.refs.len()
            ));
        };
        if self.used.get(i) {
            return Err(format!("reference {index} used twice"));
        }
        if !kinds.contains(&r.kind) {
            return Err(format!(
                "reference {index} is a {:?}, expected {:?}",
                r.kind, kinds
            ));
        }
        self.used.set(i);
        Ok(*r)
    }
}

thread_local! {
    static ENCODE: Cell<Option<NonNull<EncodeCtx<'static>>>> = const { Cell::new(None) };
    static DECODE: Cell<Option<NonNull<DecodeCtx<'static>>>> = const { Cell::new(None) };
}

/// Runs `f` with the encode context of the message being encoded on this thread, if any.
pub(crate) fn with_encode<R>(f: impl FnOnce(&mut EncodeCtx<'_>) -> R) -> Option<R> {
    let p = ENCODE.with(|c| c.take())?;
    struct Restore(NonNull<EncodeCtx<'static>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENCODE.with(|c| c.set(Some(self.0)));
        }
    }
    let guard = Restore(p);
    // SAFETY: the pointer was installed by `encode_message`, which keeps the context alive
    // and untouched until the codec returns; taking it out of the cell makes this the only
    // reference while `f` runs.
    let ctx = unsafe { &mut *guard.0.as_ptr() };
    Some(f(ctx))
}

/// Runs `f` with the decode context of the message being decoded on this thread, if any.
pub(crate) fn with_decode<R>(f: impl FnOnce(&mut DecodeCtx<'_>) -> R) -> Option<R> {
    let p = DECODE.with(|c| c.take())?;
    struct Restore(NonNull<DecodeCtx<'static>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DECODE.with(|c| c.set(Some(self.0)));
        }
    }
    let guard = Restore(p);
    // SAFETY: as in `with_encode`.
    let ctx = unsafe { &mut *guard.0.as_ptr() };
    Some(f(ctx))
}

/// Encodes `value` as a message on `session`; the attachments are to be installed once
/// the message is queued, or restored if it is not.
// Inlined into the send: its result (the message and its attachments) is large, and
// returning it from a call copied it (stream: 3% less CPU inlined).
#[inline(always)]
pub(crate) fn encode_message<T: Message>(
    session: &Arc<NetSession>,
    value: &T,
    buf: Vec<u8>,
) -> Result<(OutMessage, Attachments), Error> {
    let mut ctx = EncodeCtx {
        session,
        refs: Default::default(),
        attach: Default::default(),
        fds: Vec::new(),
        splicing: session.typed_cbor(),
        offers: Vec::new(),
        splices: Vec::new(),
    };
    let mut buf = OutMessage::start(buf);
    let prev =
        ENCODE.with(|c| c.replace(Some(NonNull::from(&mut ctx).cast::<EncodeCtx<'static>>())));
    let res = session.encode_payload(value, &mut buf);
    ENCODE.with(|c| c.set(prev));
    if let Err(e) = res {
        for a in ctx.attach.into_iter().flatten() {
            a.restore();
        }
        return Err(e);
    }
    let msg = OutMessage::finish_spliced(buf, ctx.splices, ctx.refs, ctx.fds);
    let over = if msg.refs().len() > u16::MAX as usize {
        Some(Error::limit(
            "references per message",
            u64::from(u16::MAX),
            msg.refs().len() as u64,
        ))
    } else if msg.payload_len() > u32::MAX as usize {
        Some(Error::limit(
            "payload length (u32 on the wire)",
            u64::from(u32::MAX),
            msg.payload_len() as u64,
        ))
    } else {
        None
    };
    if let Some(e) = over {
        for a in ctx.attach.into_iter().flatten() {
            a.restore();
        }
        return Err(e);
    }
    Ok((msg, ctx.attach))
}

/// Decodes a received message as a `T`, claiming the streams it references.
pub(crate) fn decode_message<T: Message>(
    session: &Arc<NetSession>,
    parent: u32,
    msg: InMessage,
) -> Result<T, Error> {
    let InMessage { payload, refs, fds } = msg;
    let mut ctx = DecodeCtx {
        session,
        payload: &payload,
        parent,
        refs: &refs,
        used: Used::new(refs.len()),
        fds: fds.into_iter().map(Some).collect(),
    };
    let prev =
        DECODE.with(|c| c.replace(Some(NonNull::from(&mut ctx).cast::<DecodeCtx<'static>>())));
    let res = session.decode_payload::<T>(&payload);
    DECODE.with(|c| c.set(prev));
    // Streams the decoder did not claim are released; Senders sent back are unpinned.
    // When every stream was claimed and none is one of ours, there is nothing to do (the
    // usual request with a reply Sender): the connection is not asked.
    let conn = &session.conn;
    let to_release = refs.iter().enumerate().any(|(i, r)| {
        let ours = conn.is_local(r.id);
        match r.kind {
            RefKind::Sender if ours => true,
            RefKind::Fd => false,
            _ => !ours && !ctx.used.get(i),
        }
    });
    if to_release {
        conn.release_refs(&refs);
    }
    res
}

#[cfg(all(test, feature = "cbor"))]
mod tests {
    use super::*;
    use crate::driver::IoLink;
    use crate::message::MESSAGE_HEADER_LEN;
    use crate::Blob;

    #[derive(Serialize, serde::Deserialize)]
    struct WithBlobs {
        a: Blob,
        small: Blob,
        b: Vec<Blob>,
    }

    #[derive(Serialize)]
    struct WithVecs<'a> {
        #[serde(with = "serde_bytes")]
        a: &'a [u8],
        #[serde(with = "serde_bytes")]
        small: &'a [u8],
        b: Vec<&'a serde_bytes::Bytes>,
    }

    #[test]
    fn used_marks_each_reference_once_below_and_above_64() {
        for n in [1usize, 3, 64, 65, 200] {
            let mut u = Used::new(n);
            for i in (0..n).step_by(3) {
                assert!(!u.get(i), "{n}: {i} claimed before");
                u.set(i);
            }
            for i in 0..n {
                assert_eq!(u.get(i), i % 3 == 0, "{n}: {i}");
            }
            assert!(!u.get(n.max(64) + 1), "{n}: out of range");
        }
    }

    async fn net_pair() -> (Session, Session) {
        let config = Config::new(crate::cbor::Cbor);
        let (x, y) = tokio::io::duplex(64 * 1024);
        let (a, b) = tokio::join!(
            Session::over_link(IoLink::new(x), Role::Dialer, &config),
            Session::over_link(IoLink::new(y), Role::Listener, &config),
        );
        (a.expect("dialer"), b.expect("listener"))
    }

    fn net(s: &Session) -> &Arc<NetSession> {
        match &s.inner {
            Kind::Net(n) => n,
            Kind::Mem(_) => panic!("not a connection"),
        }
    }

    /// Large blobs are referenced, not copied, and the bytes are what a `Vec<u8>` gives;
    /// a large received blob shares the payload, a small one is copied out.
    #[tokio::test]
    async fn blobs_are_spliced_and_shared() {
        let (a, _b) = net_pair().await;
        let x: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let y: Vec<u8> = (0..5_000u32).map(|i| (i * 3) as u8).collect();
        let value = WithBlobs {
            a: Blob::from(x.clone()),
            small: Blob::from(vec![9u8; 100]),
            b: vec![Blob::from(y.clone()), Blob::from(vec![1u8; 10])],
        };
        let (msg, _) = encode_message(net(&a), &value, Vec::new()).expect("encode");
        assert_eq!(msg.splices.len(), 2, "the 100,000 and 5,000-byte blobs");
        assert!(
            msg.buf.len() < 200,
            "blobs not copied: {} bytes",
            msg.buf.len()
        );
        let mut plain = OutMessage::start(Vec::new());
        crate::cbor::encode(
            &WithVecs {
                a: &x,
                small: &[9; 100],
                b: vec![
                    serde_bytes::Bytes::new(&y),
                    serde_bytes::Bytes::new(&[1; 10]),
                ],
            },
            &mut plain,
        )
        .expect("encode");
        let plain = OutMessage::finish(plain, Vec::new(), Vec::new());
        assert_eq!(msg.to_vec(), plain.to_vec());
        assert_eq!(msg.payload(), plain.payload());
        assert_eq!(msg.pieces().count(), 5, "buf, blob, buf, blob, buf");

        let whole = Bytes::from(plain.to_vec());
        let payload = whole.slice(MESSAGE_HEADER_LEN..);
        let got: WithBlobs = decode_message(
            net(&a),
            1,
            InMessage {
                payload: payload.clone(),
                refs: Default::default(),
                fds: Vec::new(),
            },
        )
        .expect("decode");
        assert_eq!(&got.a[..], &x[..]);
        let inside = |b: &Blob| {
            let p = b.as_ptr() as usize;
            p >= payload.as_ptr() as usize && p < payload.as_ptr() as usize + payload.len()
        };
        assert!(inside(&got.a), "a 100,000-byte blob shares the payload");
        assert!(!inside(&got.b[0]), "a 5,000-byte blob is copied out");
        assert_eq!(&got.b[0][..], &y[..]);
    }
}
