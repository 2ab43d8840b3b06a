//! The multiplexing protocol as a pure state machine: bytes in, frames out, no IO.
//!
//! [`Mux`] owns every stream's state: flow-control credit, queued outgoing bytes, received
//! messages waiting for the application. A driver (see [`crate::driver`]) feeds it the bytes
//! it reads with [`Mux::handle_input`] and writes what [`Mux::poll_transmit`] produces. It
//! never blocks, reads a clock or touches a socket, so it can be tested byte for byte.
//!
//! Stream halves move through these states:
//!
//! ```text
//!  send half:  Open --finish/close/reset queued--> Ending --emitted--> Done
//!                 \------------- RESET received / connection lost ------> Failed
//!  recv half:  Open --DATA+FIN--> Fin      (drained, then Ok(None) forever)
//!                  --CLOSE------> Error    (drained, then the peer's error once, then Fin)
//!                  --RESET------> Failed   (drained, then the error)
//! ```
//!
//! A stream entry is removed once the local handle is released and both halves are over.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes stream ids (u32) with one multiplication (Fibonacci hashing) instead of SipHash:
/// the stream tables are looked up several times per message. Ids come from the peer, but
/// a table holds at most `max_streams` peer streams, so colliding ids cost at most that
/// many probes per lookup.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // The product's high half is well mixed; fold it into the low bits, which pick
        // the bucket (ids of one side are all odd or all even).
        let h = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }
}

pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};

use crate::config::Limits;
use crate::conn::ConnectionStats;
use crate::error::{Error, ErrorKind};
use crate::frame::{self, Frame, Hello, Reason, StreamKind, FLAG_FIN};
use crate::message::{
    InMessage, OpenedStreams, OutMessage, OutRef, RefKind, WireRef, MESSAGE_HEADER_LEN, REF_LEN,
};

/// Which end of the connection this is. Decides stream id parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that connected: opens odd stream ids.
    Dialer,
    /// The side that accepted: opens even stream ids.
    Listener,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Dialer => 1,
            Role::Listener => 2,
        }
    }

    fn first_id(self) -> u32 {
        match self {
            Role::Dialer => 1,
            Role::Listener => 2,
        }
    }

    /// True if `id` is in this role's namespace.
    pub fn owns(self, id: u32) -> bool {
        (id % 2 == 1) == (self == Role::Dialer)
    }
}

type RecvItem = Result<Queued, Error>;

/// A received message waiting for the application, kept small (48 bytes): a stream holds
/// up to a window of them, and most carry no references or descriptors.
struct Queued {
    payload: Bytes,
    extra: Extra,
}

/// What a queued message carries besides its payload.
enum Extra {
    None,
    /// One reference and no descriptors (a request and its reply Sender), in place: the
    /// reader allocates nothing for it (the receiving task makes the table's `Vec`, on
    /// its own thread).
    OneRef(WireRef),
    Boxed(Box<(Vec<WireRef>, Vec<OwnedFd>)>),
}

impl Queued {
    fn new(payload: Bytes, refs: Vec<WireRef>, fds: Vec<OwnedFd>) -> Queued {
        let extra = if refs.is_empty() && fds.is_empty() {
            Extra::None
        } else {
            Extra::Boxed(Box::new((refs, fds)))
        };
        Queued { payload, extra }
    }

    fn refs(&self) -> &[WireRef] {
        match &self.extra {
            Extra::None => &[],
            Extra::OneRef(r) => std::slice::from_ref(r),
            Extra::Boxed(e) => &e.0,
        }
    }

    /// No references and no descriptors.
    fn is_plain(&self) -> bool {
        matches!(self.extra, Extra::None)
    }

    /// What it counts against the window: its bytes on the wire.
    fn wire_len(&self) -> usize {
        self.payload.len() + self.refs().len() * REF_LEN + MESSAGE_HEADER_LEN
    }

    fn into_message(self) -> InMessage {
        let (refs, fds) = match self.extra {
            Extra::None => Default::default(),
            Extra::OneRef(r) => (std::iter::once(r).collect(), Vec::new()),
            Extra::Boxed(e) => {
                let (refs, fds) = *e;
                (refs.into(), fds)
            }
        };
        InMessage {
            payload: self.payload,
            refs,
            fds,
        }
    }
}

enum End {
    Fin,
    Error(String),
}

#[derive(Clone)]
enum RxState {
    Open,
    Fin,
    Error(String),
    Failed(Error),
}

enum TxState {
    Open,
    Ending,
    Done,
    Failed(Error),
}

struct Partial {
    body: Body,
    need: usize,
    payload_len: usize,
    nrefs: usize,
    fds: Vec<OwnedFd>,
    /// Set when the message is being skipped (over a limit; the error was delivered).
    discard: bool,
    counted: usize,
}

/// Most boxes of removed streams a connection keeps for new ones (about 400 bytes each).
const SPARE_STREAMS: usize = 64;

/// Most further messages [`Mux::poll_recv_batch`] hands out with the one asked for.
pub const RECV_BATCH: usize = 128;
/// Most bytes of messages [`Mux::poll_recv_batch`] hands out at once (it stops after the
/// message that reaches this).
pub const RECV_BATCH_BYTES: usize = 32 * 1024;

/// Fewest body bytes of one DATA frame worth a read of their own into the body.
const DIRECT_MIN_READ: usize = 4096;

/// Message headers [`Mux::try_direct`] looks at in the part of a frame that is here, at
/// most, to find where a large body begins.
const DIRECT_MAX_WALK: usize = 4096;

/// Bodies of at least this many bytes (or of our `max_frame_size`, if smaller) get their
/// final buffer when their header arrives ([`Body::with_len`]).
const DIRECT_BODY_MIN: usize = 64 * 1024;

/// Largest DATA frame sent while other streams wait for their turn: a larger peer
/// `max_frame_size` is used only by a stream that has the connection to itself, so that
/// a small message never waits behind more than this much of another stream's bulk.
const FAIR_FRAME: usize = 64 * 1024;

/// Where the driver puts the next bytes it reads from the connection; see
/// [`Mux::next_read`].
#[derive(Debug)]
pub enum ReadTarget {
    /// Into the read buffer given to [`Mux::handle_input`], appending; at most this many
    /// bytes if set (the next frame header, so that a large body's next frame can go
    /// straight into the body).
    Buffer(Option<usize>),
    /// Into the spare capacity of this buffer: the body of a large message, with room for
    /// exactly the bytes of the current DATA frame that belong to it. Give it back to
    /// [`Mux::handle_body_input`] after the read.
    Body(BytesMut),
}

/// A DATA frame whose payload the driver reads straight into a message body.
#[derive(Debug)]
struct Direct {
    stream: u32,
    /// Bytes of the frame still to arrive that belong to the body.
    left: usize,
    /// Bytes of the frame after those (the start of further messages): handled as a
    /// DATA frame of their own, with the frame's FIN flag, once the body's part is in.
    rest: usize,
    fin: bool,
    /// The body buffer split around this frame's part: what came before, and the room
    /// after it. Joined again (without copying) once the part is full.
    parts: Option<(BytesMut, BytesMut)>,
    /// This frame's part of the body, while it is not full and not with the driver.
    region: Option<BytesMut>,
    /// Bytes already in `region`.
    filled: usize,
    /// The driver holds `region` (a [`ReadTarget::Body`]).
    out: bool,
}

/// A queue that holds a lone item in place: most streams (a reply channel's) queue one
/// message at a time, for which a `VecDeque` would allocate (on the thread that queues it,
/// to be freed as often as not on another: the allocator's slow path). A second item moves
/// both to the `VecDeque`, which keeps its capacity from then on.
struct Queue<T> {
    /// The only item, if there is exactly one and `rest` was empty when it came.
    lone: Option<T>,
    /// The items otherwise; empty while `lone` holds one.
    rest: VecDeque<T>,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            lone: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> Queue<T> {
    fn is_empty(&self) -> bool {
        self.lone.is_none() && self.rest.is_empty()
    }

    fn len(&self) -> usize {
        self.rest.len() + usize::from(self.lone.is_some())
    }

    fn push_back(&mut self, item: T) {
        if let Some(first) = self.lone.take() {
            self.rest.push_back(first);
        } else if self.rest.is_empty() {
            self.lone = Some(item);
            return;
        }
        self.rest.push_back(item);
    }

    fn pop_front(&mut self) -> Option<T> {
        self.lone.take().or_else(|| self.rest.pop_front())
    }

    fn front(&self) -> Option<&T> {
        self.lone.as_ref().or_else(|| self.rest.front())
    }

    fn front_mut(&mut self) -> Option<&mut T> {
        match &mut self.lone {
            Some(item) => Some(item),
            None => self.rest.front_mut(),
        }
    }

    fn back_mut(&mut self) -> Option<&mut T> {
        match &mut self.lone {
            Some(item) => Some(item),
            None => self.rest.back_mut(),
        }
    }

    fn clear(&mut self) {
        self.lone = None;
        self.rest.clear();
    }

    /// Room for `n` more items without reallocating (one alone needs none).
    fn reserve(&mut self, n: usize) {
        let total = self.len() + n;
        if total > 1 {
            self.rest.reserve(total - self.rest.len());
        }
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.lone.iter().chain(self.rest.iter())
    }
}

impl<T> IntoIterator for Queue<T> {
    type Item = T;
    type IntoIter =
        std::iter::Chain<std::option::IntoIter<T>, std::collections::vec_deque::IntoIter<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.lone.into_iter().chain(self.rest)
    }
}

/// The tasks waiting on a stream's send side. Clones of a Sender may wait at once (for
/// window, for the end), so every one is woken, not only the last to register; a task
/// registers once however often it polls. A waiter whose future was dropped is woken once
/// more, spuriously, at the next wake-up; the list never holds more than the tasks that
/// polled since then.
#[derive(Default)]
struct Waiters(Vec<Waker>);

impl Waiters {
    fn register(&mut self, w: &Waker) {
        if !self.0.iter().any(|x| x.will_wake(w)) {
            self.0.push(w.clone());
        }
    }
}

/// The bytes of a queued chunk: a whole small message stays the `Vec` it was encoded
/// into (turning it into `Bytes` would allocate when its capacity is not its length); it
/// becomes shared only if the writer references part of it.
enum ChunkData {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl ChunkData {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            ChunkData::Owned(v) => v,
            ChunkData::Shared(b) => b,
        }
    }

    fn slice(&mut self, range: std::ops::Range<usize>) -> Bytes {
        if let ChunkData::Owned(v) = self {
            *self = ChunkData::Shared(Bytes::from(std::mem::take(v)));
        }
        match self {
            ChunkData::Shared(b) => b.slice(range),
            ChunkData::Owned(_) => unreachable!("made shared above"),
        }
    }
}

struct Chunk {
    data: ChunkData,
    pos: usize,
    fds: Vec<OwnedFd>,
    message: bool,
    /// Holds several whole small messages back to back (see [`COALESCE_MAX`]): a cut
    /// inside it must not split one of their headers.
    coalesced: bool,
}

/// A message of at most this many bytes, without descriptors, is appended to the
/// stream's last queued chunk (if that is a buffer of small messages with room) instead of
/// being queued on its own: its buffer is then freed by the sending thread, where it was
/// allocated, instead of by the writer's, and the queue does not grow per message.
const COALESCE_MAX: usize = 1024;
/// Largest buffer of coalesced small messages.
const COALESCE_CHUNK: usize = 16 * 1024;

/// The fields of a message header (docs/PROTOCOL.md §7): payload length, references,
/// descriptors. `h` is [`MESSAGE_HEADER_LEN`] bytes.
fn message_header(h: &[u8]) -> (usize, usize, usize) {
    let payload_len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let nrefs = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let nfds = usize::from(u16::from_be_bytes([h[6], h[7]]));
    (payload_len, nrefs, nfds)
}

impl Chunk {
    /// Shortens a cut of `k` bytes from `pos` so that it does not end inside the header of
    /// one of the coalesced messages (a header is never split across DATA frames).
    fn header_safe(&self, k: usize) -> usize {
        let data = self.data.as_slice();
        let end = self.pos + k;
        if !self.coalesced || end >= data.len() {
            return k;
        }
        // Walk the message boundaries (our own encoding) up to the cut.
        let mut at = 0;
        while at + MESSAGE_HEADER_LEN <= data.len() {
            if end < at {
                break;
            }
            if end < at + MESSAGE_HEADER_LEN {
                return at.saturating_sub(self.pos);
            }
            let (payload_len, nrefs, _) = message_header(&data[at..at + MESSAGE_HEADER_LEN]);
            at += MESSAGE_HEADER_LEN + payload_len + nrefs * REF_LEN;
        }
        k
    }
}

struct Stream {
    kind: StreamKind,
    parent: u32,
    handle: bool,
    claimed: bool,
    can_send: bool,
    can_recv: bool,
    // receive half
    rx: RxState,
    msgs: Queue<RecvItem>,
    bytes: VecDeque<Bytes>,
    buffered: usize,
    /// Boxed: rare (only messages spanning DATA frames) and large.
    partial: Option<Box<Partial>>,
    outstanding: u32,
    rx_waker: Option<Waker>,
    // send half
    tx: TxState,
    queue: Queue<Chunk>,
    pending: usize,
    credit: u32,
    end: Option<End>,
    tx_wakers: Waiters,
    in_ready: bool,
    /// Send a RESET (CANCEL) right after the send half's end: the local handle is gone
    /// while the peer may still be sending.
    reset_after: bool,
    /// Received messages not yet decoded that send this (local) Sender stream back to us.
    pins: u32,
    /// Opened by the peer under a parent and not claimed or released yet: listed in
    /// [`Mux::orphans`] (cleared by whoever takes it off the list).
    orphan: bool,
    /// Receive half: the application took the clean end and we confirmed it (CREDIT 0).
    end_confirmed: bool,
    /// Send half: the peer confirmed that its application took everything and the end.
    delivered: bool,
    delivered_waker: Option<Waker>,
    /// The peer reset the stream (after which delivery can no longer be confirmed).
    reset: Option<Error>,
}

impl Stream {
    /// Owns nothing to drop: what `remove_stream` leaves in a spare box.
    fn is_vacant(&self) -> bool {
        self.msgs.is_empty()
            && self.msgs.rest.capacity() == 0
            && self.bytes.capacity() == 0
            && self.partial.is_none()
            && self.rx_waker.is_none()
            && self.queue.is_empty()
            && self.queue.rest.capacity() == 0
            && self.end.is_none()
            && self.tx_wakers.0.capacity() == 0
            && self.delivered_waker.is_none()
            && self.reset.is_none()
            && matches!(self.rx, RxState::Open)
            && matches!(self.tx, TxState::Open)
    }

    /// Drops what the stream owns and leaves it [vacant](Stream::is_vacant), for a spare
    /// box. Each field is looked at first: the drop glue of the whole state walks every
    /// queue, about 200 instructions per stream when all are empty, as they usually are
    /// by the time a stream is removed.
    fn vacate(&mut self) {
        if !self.msgs.is_empty() || self.msgs.rest.capacity() != 0 {
            self.msgs = Queue::default();
        }
        if self.bytes.capacity() != 0 {
            self.bytes = VecDeque::new();
        }
        if self.partial.is_some() {
            self.partial = None;
        }
        if self.rx_waker.is_some() {
            self.rx_waker = None;
        }
        if !self.queue.is_empty() || self.queue.rest.capacity() != 0 {
            self.queue = Queue::default();
        }
        if self.end.is_some() {
            self.end = None;
        }
        if self.tx_wakers.0.capacity() != 0 {
            self.tx_wakers.0 = Vec::new();
        }
        if self.delivered_waker.is_some() {
            self.delivered_waker = None;
        }
        if self.reset.is_some() {
            self.reset = None;
        }
        if !matches!(self.rx, RxState::Open) {
            self.rx = RxState::Open;
        }
        if !matches!(self.tx, TxState::Open) {
            self.tx = TxState::Open;
        }
        debug_assert!(self.is_vacant(), "a vacated stream still owns something");
    }

    /// Nothing refers to the stream any more: no handle, claimed, not pinned, both halves
    /// over.
    fn removable(&self) -> bool {
        !self.handle && self.claimed && self.pins == 0 && self.rx_done() && self.tx_done()
    }

    /// Which halves a stream of `kind` has on the side that opened it (`local`) or not:
    /// `(can_send, can_recv)`.
    fn halves(kind: StreamKind, local: bool) -> (bool, bool) {
        match (kind, local) {
            (StreamKind::Bytes, _) => (true, true),
            (StreamKind::OpenerSends, true) | (StreamKind::OpenerReceives, false) => (true, false),
            (StreamKind::OpenerSends, false) | (StreamKind::OpenerReceives, true) => (false, true),
        }
    }

    /// Makes a [vacant](Stream::is_vacant) state (a spare box's, or [`Stream::new`]'s) a
    /// new stream of `kind`, in place: only the fields that own nothing are written, the
    /// others are in their new state already. Every field is named, so that a new one is
    /// decided here too.
    fn renew(&mut self, kind: StreamKind, local: bool, parent: u32, credit: u32, outstanding: u32) {
        debug_assert!(self.is_vacant(), "a renewed stream still owns something");
        let (send, recv) = Stream::halves(kind, local);
        let Stream {
            kind: s_kind,
            parent: s_parent,
            handle,
            claimed,
            can_send,
            can_recv,
            rx: _,
            msgs: _,
            bytes: _,
            buffered,
            partial: _,
            outstanding: s_outstanding,
            rx_waker: _,
            tx: _,
            queue: _,
            pending,
            credit: s_credit,
            end: _,
            tx_wakers: _,
            in_ready,
            reset_after,
            pins,
            orphan,
            end_confirmed,
            delivered,
            delivered_waker: _,
            reset: _,
        } = self;
        *s_kind = kind;
        *s_parent = parent;
        *handle = local;
        *claimed = local;
        *can_send = send;
        *can_recv = recv;
        *buffered = 0;
        *s_outstanding = if recv { outstanding } else { 0 };
        *pending = 0;
        *s_credit = credit;
        *in_ready = false;
        *reset_after = false;
        *pins = 0;
        *orphan = false;
        *end_confirmed = false;
        *delivered = false;
    }

    fn new(kind: StreamKind, local: bool, parent: u32, credit: u32, outstanding: u32) -> Self {
        // Nothing owned; the plain fields are placeholders that `renew` sets: it is the one
        // place that says what a new stream starts with.
        let mut s = Stream {
            kind,
            parent: 0,
            handle: false,
            claimed: false,
            can_send: false,
            can_recv: false,
            rx: RxState::Open,
            msgs: Queue::default(),
            bytes: VecDeque::new(),
            buffered: 0,
            partial: None,
            outstanding: 0,
            rx_waker: None,
            tx: TxState::Open,
            queue: Queue::default(),
            pending: 0,
            credit: 0,
            end: None,
            tx_wakers: Waiters::default(),
            in_ready: false,
            reset_after: false,
            pins: 0,
            orphan: false,
            end_confirmed: false,
            delivered: false,
            delivered_waker: None,
            reset: None,
        };
        s.renew(kind, local, parent, credit, outstanding);
        s
    }

    fn rx_done(&self) -> bool {
        !self.can_recv || !matches!(self.rx, RxState::Open)
    }

    fn tx_done(&self) -> bool {
        !self.can_send || matches!(self.tx, TxState::Done | TxState::Failed(_))
    }

    fn sendable(&self) -> bool {
        match self.queue.front() {
            Some(c) => {
                if c.message && c.pos == 0 {
                    self.credit as usize >= MESSAGE_HEADER_LEN
                } else if c.coalesced {
                    // Credit enough to move without splitting the next header.
                    let k = (c.data.len() - c.pos).min(self.credit as usize);
                    k > 0 && c.header_safe(k) > 0
                } else {
                    self.credit > 0
                }
            }
            None => self.end.is_some(),
        }
    }
}

/// The protocol state of one connection.
pub struct Mux {
    role: Role,
    local: Limits,
    codecs: Vec<String>,
    peer: Option<Hello>,
    codec: Option<String>,
    lost: Option<Error>,
    goaway_sent: bool,
    goaway_received: bool,
    /// A GOAWAY without error was sent or received: accept ends with `Ok(None)`.
    clean_goaway: bool,
    streams: IdMap<Box<Stream>>,
    /// Boxes of removed streams, emptied, for the next new streams: a request's reply
    /// channel is a stream opened and removed on each side, and with many requests in
    /// flight each box was an allocation that missed the allocator's per-thread cache.
    #[allow(clippy::vec_box)] // The boxes themselves are what is kept.
    spare_streams: Vec<Box<Stream>>,
    next_local: u32,
    last_peer: u32,
    peer_open: u32,
    local_open: u32,
    accept_q: VecDeque<u32>,
    accept_waker: Option<Waker>,
    /// Tasks waiting for the connection to end (`poll_ended`).
    ended_wakers: Vec<Waker>,
    handshake_waker: Option<Waker>,
    ctrl: BytesMut,
    /// DATA frames of small messages sent straight into the outgoing frames, and ends sent
    /// right away (see [`Mux::send_message`]): transmitted after `ctrl`, so after the OPEN
    /// of any stream they reference.
    immediate: BytesMut,
    /// The stream of the last frame in `immediate` (0: none), its header at `imm_at`: a
    /// later small message of the same stream extends that frame.
    imm_id: u32,
    imm_at: usize,
    ready: VecDeque<u32>,
    fd_in: VecDeque<OwnedFd>,
    wakers: Vec<Waker>,
    flush: bool,
    ping_seq: u64,
    ping_outstanding: bool,
    /// What the session holds for the application, and who may grow beyond a window.
    budget: Budget,
    /// Streams the peer opened for a message on a channel (the key) and that no decoded
    /// message claimed yet. Released when that channel is over: nothing can claim them.
    orphans: IdMap<VecDeque<u32>>,
    /// The driver asks where to read ([`Mux::next_read`]), so large bodies may be read
    /// into directly.
    direct_reads: bool,
    /// The DATA frame being read straight into a body, if any.
    direct: Option<Direct>,
    /// A body read directly ended with its frame and continues: read the next frame
    /// header alone, so that the frame's payload can go straight into the body too.
    expect_header: bool,
    /// Capacity of large bodies allocated ahead of their bytes (bounded by
    /// `max_session_buffer`; beyond it bodies are collected piece by piece).
    reserved: Arc<AtomicUsize>,
    /// Whether this side may send descriptors yet (PROTOCOL.md §8).
    fds_out: FdsOut,
    /// Streams whose next message carries descriptors, held until the peer answers FDS.
    fds_held: Vec<u32>,
    /// The peer's FDS was answered (it is answered once).
    fds_in: bool,
    /// The peer's FDS arrived and the driver has not been told yet ([`Mux::take_fds_asked`]).
    fds_asked: bool,
    /// Messages queued for the application since [`Mux::take_messages_in`] was last called.
    messages_in: usize,
}

/// Where this side is in the descriptor handshake (PROTOCOL.md §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdsOut {
    /// No descriptor sent or asked for yet.
    Idle,
    /// FDS sent; waiting for the answer.
    Asked,
    /// The peer answered: descriptors may go.
    Ready,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("role", &self.role)
            .field("codec", &self.codec)
            .field("streams", &self.streams.len())
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl Mux {
    /// A new connection state; the HELLO is queued for transmission at once.
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use libchan_core::mux::{Mux, Role};
    /// use libchan_core::Limits;
    /// let mut a = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    /// let mut b = Mux::new(Role::Listener, Limits::default(), vec!["cbor".into()]);
    /// let (mut ab, mut ba) = (BytesMut::new(), BytesMut::new());
    /// a.poll_transmit(&mut ab, &mut Vec::new(), 1 << 16);
    /// b.poll_transmit(&mut ba, &mut Vec::new(), 1 << 16);
    /// b.handle_input(&mut ab, &mut Vec::new()).unwrap();
    /// a.handle_input(&mut ba, &mut Vec::new()).unwrap();
    /// assert_eq!(a.codec(), Some("cbor"));
    /// ```
    pub fn new(role: Role, local: Limits, codecs: Vec<String>) -> Self {
        let budget_max = local.max_session_buffer;
        let mut ctrl = BytesMut::with_capacity(4096);
        frame::encode_hello(&mut ctrl, &Hello::new(role.code(), &local, codecs.clone()));
        Mux {
            role,
            local,
            codecs,
            peer: None,
            codec: None,
            lost: None,
            goaway_sent: false,
            goaway_received: false,
            clean_goaway: false,
            streams: IdMap::default(),
            spare_streams: Vec::new(),
            next_local: role.first_id(),
            last_peer: 0,
            peer_open: 0,
            local_open: 0,
            accept_q: VecDeque::new(),
            accept_waker: None,
            ended_wakers: Vec::new(),
            handshake_waker: None,
            ctrl,
            immediate: BytesMut::new(),
            imm_id: 0,
            imm_at: 0,
            ready: VecDeque::new(),
            fd_in: VecDeque::new(),
            wakers: Vec::new(),
            flush: true,
            ping_seq: 0,
            ping_outstanding: false,
            budget: Budget {
                held: 0,
                max: budget_max,
                priority: None,
                starved: Vec::new(),
            },
            orphans: IdMap::default(),
            direct_reads: false,
            direct: None,
            expect_header: false,
            reserved: Arc::new(AtomicUsize::new(0)),
            fds_out: FdsOut::Idle,
            fds_held: Vec::new(),
            fds_in: false,
            fds_asked: false,
            messages_in: 0,
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer's HELLO, once received.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// The codec both sides agreed on, once the handshake is done.
    pub fn codec(&self) -> Option<&str> {
        self.codec.as_deref()
    }

    /// The error that ended the connection, if it ended.
    pub fn lost(&self) -> Option<&Error> {
        self.lost.as_ref()
    }

    /// Counters for tests and monitoring.
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            streams: self.streams.len(),
            pending_accepts: self.accept_q.len(),
            unclaimed_fds: self.fd_in.len(),
        }
    }

    /// True (once) if something was queued for transmission since the last call.
    pub fn take_flush(&mut self) -> bool {
        std::mem::take(&mut self.flush)
    }

    /// Whether an operation left wakers to wake ([`Mux::take_wakers`]).
    #[inline]
    pub fn has_wakers(&self) -> bool {
        !self.wakers.is_empty()
    }

    /// Wakers to wake (outside any lock) after an operation.
    pub fn take_wakers(&mut self, into: &mut Vec<Waker>) {
        into.append(&mut self.wakers);
    }

    /// Waits for the handshake: ready with the agreed codec, or the error.
    pub fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<String, Error>> {
        if let Some(e) = &self.lost {
            return Poll::Ready(Err(e.clone()));
        }
        match &self.codec {
            Some(c) => Poll::Ready(Ok(c.clone())),
            None => {
                self.handshake_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn wake(&mut self, w: Option<Waker>) {
        if let Some(w) = w {
            self.wakers.push(w);
        }
    }

    fn alloc_id(&mut self) -> Result<u32, Error> {
        let id = self.next_local;
        if id > 0x7fff_ffff {
            return Err(Error::limit(
                "stream ids of this session",
                0x7fff_ffff,
                u64::from(id),
            ));
        }
        self.next_local += 2;
        Ok(id)
    }

    fn check_open(&self) -> Result<&Hello, Error> {
        if let Some(e) = &self.lost {
            return Err(e.clone());
        }
        if self.goaway_sent {
            return Err(Error::closed("session is closing"));
        }
        if self.goaway_received {
            return Err(Error::new(
                ErrorKind::Closed,
                "peer is closing the session (GOAWAY)",
            ));
        }
        self.peer
            .as_ref()
            .ok_or_else(|| Error::closed("handshake not finished"))
    }

    fn new_local_stream(&mut self, kind: StreamKind, parent: u32) -> Result<u32, Error> {
        let peer = self.check_open()?;
        if self.local_open >= peer.max_streams {
            return Err(Error::limit(
                "peer's max_streams",
                u64::from(peer.max_streams),
                u64::from(self.local_open) + 1,
            ));
        }
        let credit = peer.initial_window;
        let id = self.alloc_id()?;
        frame::encode_open(&mut self.ctrl, id, kind, parent);
        self.flush = true;
        let outstanding = self.local.initial_window;
        let s = self.new_stream(kind, true, parent, credit, outstanding);
        self.streams.insert(id, s);
        self.local_open += 1;
        Ok(id)
    }

    /// Opens a top-level stream of `kind`; the handle is held by the caller.
    pub fn open(&mut self, kind: StreamKind) -> Result<u32, Error> {
        self.new_local_stream(kind, 0)
    }

    /// Waits for a top-level channel opened by the peer. `Ok(None)` once the peer said
    /// GOAWAY and nothing is left to accept.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<u32>, Error>> {
        if let Some(id) = self.accept_q.pop_front() {
            if let Some(s) = self.streams.get_mut(&id) {
                s.handle = true;
                s.claimed = true;
            }
            return Poll::Ready(Ok(Some(id)));
        }
        if self.clean_goaway {
            return Poll::Ready(Ok(None));
        }
        if let Some(e) = &self.lost {
            return Poll::Ready(Err(e.clone()));
        }
        self.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Claims a stream the peer opened as a reference in a message on `parent`.
    pub fn claim(&mut self, parent: u32, id: u32, kind: StreamKind) -> Result<(), Error> {
        if let Some(e) = &self.lost {
            return Err(e.clone());
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(Error::decode(format!(
                "reference to stream {id}, which is not open"
            )));
        };
        if self.role.owns(id) || s.claimed || s.parent != parent || s.kind != kind {
            return Err(Error::decode(format!(
                "reference to stream {id} does not match its OPEN (parent {}, kind {:?}; \
                 expected parent {parent}, kind {kind:?}, unclaimed)",
                s.parent, s.kind
            )));
        }
        s.claimed = true;
        s.handle = true;
        if std::mem::take(&mut s.orphan) {
            self.unlist_orphan(parent, id);
        }
        Ok(())
    }

    /// Takes `id` off `parent`'s list of unclaimed streams (the caller cleared its
    /// `orphan` flag).
    fn unlist_orphan(&mut self, parent: u32, id: u32) {
        // Messages are usually decoded in the order their streams were opened: the
        // stream is usually the first of its parent's list (a scan of the list for every
        // claim was 2% of the instructions of rpc with 64 callers). An emptied list is
        // kept for the parent's next children; it goes with the parent.
        if let Some(v) = self.orphans.get_mut(&parent) {
            if v.front() == Some(&id) {
                v.pop_front();
            } else if let Some(i) = v.iter().position(|c| *c == id) {
                v.remove(i);
            }
        }
    }

    /// Channel `parent` is over: the streams opened for its messages that none claimed
    /// never will be.
    fn release_orphans(&mut self, parent: u32) {
        let Some(children) = self.orphans.remove(&parent) else {
            return;
        };
        for c in children {
            let unclaimed = self.streams.get(&c).is_some_and(|s| !s.claimed);
            if unclaimed {
                if let Some(s) = self.streams.get_mut(&c) {
                    s.claimed = true;
                    s.handle = true;
                }
                self.release(c);
            }
        }
    }

    /// Waits until stream `id` can take another message (its unsent bytes are below the
    /// peer's window).
    pub fn poll_send_ready(&mut self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        let threshold = self.send_threshold();
        let lost = self.lost.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Err(
                lost.unwrap_or_else(|| Error::closed("stream is closed"))
            ));
        };
        match &s.tx {
            TxState::Open => {}
            TxState::Failed(e) => return Poll::Ready(Err(e.clone())),
            _ => return Poll::Ready(Err(Error::closed("channel already closed"))),
        }
        if s.pending < threshold {
            return Poll::Ready(Ok(()));
        }
        s.tx_wakers.register(cx.waker());
        Poll::Pending
    }

    /// True if channel `id` can take another message now: what
    /// [`poll_send_ready`](Mux::poll_send_ready) would answer with `Ready(Ok)`.
    pub fn send_ready_now(&self, id: u32) -> bool {
        let threshold = self.send_threshold();
        self.lost.is_none()
            && self
                .streams
                .get(&id)
                .is_some_and(|s| matches!(s.tx, TxState::Open) && s.pending < threshold)
    }

    /// Queued bytes of a channel below which a send need not wait: the peer's window.
    fn send_threshold(&self) -> usize {
        self.peer
            .as_ref()
            .map_or(0, |p| p.initial_window as usize)
            .max(1)
    }

    /// Ready when the send half of `id` can no longer deliver (the receiver went away or
    /// the connection was lost).
    pub fn poll_send_closed(&mut self, cx: &mut Context<'_>, id: u32) -> Poll<()> {
        if self.lost.is_some() {
            return Poll::Ready(());
        }
        match self.streams.get_mut(&id) {
            None => Poll::Ready(()),
            Some(s) => match s.tx {
                TxState::Failed(_) | TxState::Done => Poll::Ready(()),
                _ => {
                    s.tx_wakers.register(cx.waker());
                    Poll::Pending
                }
            },
        }
    }

    /// Queues a message on channel stream `id`, opening the streams it references.
    /// Returns the ids assigned to its [`OutRef::New`] references, in order.
    ///
    /// A small message (at most 1 KiB, without descriptors or spliced blobs) with nothing
    /// queued ahead of it on its stream and the credit for it is written into the outgoing
    /// frames at once, appended to the stream's last frame when that was the last one
    /// written; the next [`poll_transmit`](Mux::poll_transmit) takes it after the control
    /// frames. Other messages wait in the stream's queue for their turn.
    pub fn send_message(&mut self, id: u32, mut msg: OutMessage) -> Result<OpenedStreams, Error> {
        self.send_message_then_ready(id, &mut msg)
            .map(|(ids, _)| ids)
    }

    /// [`send_message`](Mux::send_message), also saying whether the channel can take
    /// another message right away (what [`send_ready_now`](Mux::send_ready_now) would
    /// say after it). The message is taken from `msg` when it is queued and left there
    /// on error; by reference, the (large) message is not moved on the way.
    pub(crate) fn send_message_then_ready(
        &mut self,
        id: u32,
        msg: &mut OutMessage,
    ) -> Result<(OpenedStreams, bool), Error> {
        if let Some(e) = &self.lost {
            return Err(e.clone());
        }
        let Some(peer) = self.peer.as_ref() else {
            return Err(Error::closed("handshake not finished"));
        };
        let (max_msg, max_refs, max_fds) = (
            peer.max_message_size,
            peer.max_refs_per_message,
            peer.max_fds_per_message,
        );
        let max_frame = (peer.max_frame_size as usize).min(FAIR_FRAME);
        let threshold = self.send_threshold();
        let len = msg.len();
        if len > max_msg as usize {
            return Err(Error::limit(
                "peer's max_message_size",
                u64::from(max_msg),
                len as u64,
            ));
        }
        if msg.refs.len() > usize::from(max_refs) {
            return Err(Error::limit(
                "peer's max_refs_per_message",
                u64::from(max_refs),
                msg.refs.len() as u64,
            ));
        }
        if msg.fds.len() > usize::from(max_fds) {
            return Err(Error::limit(
                "peer's max_fds_per_message",
                u64::from(max_fds),
                msg.fds.len() as u64,
            ));
        }
        match self.streams.get(&id) {
            Some(s) if s.can_send && s.kind != StreamKind::Bytes => match &s.tx {
                TxState::Open => {}
                TxState::Failed(e) => return Err(e.clone()),
                _ => return Err(Error::closed("channel already closed")),
            },
            Some(_) => return Err(Error::closed("not a sending channel")),
            None => return Err(Error::closed("channel is closed")),
        }
        let news = msg
            .refs
            .iter()
            .filter(|r| matches!(r, OutRef::New(_)))
            .count();
        if news > 0 {
            self.check_open()?;
        }
        let peer_max = self.peer.as_ref().map_or(0, |p| p.max_streams);
        if self.local_open as usize + news > peer_max as usize {
            return Err(Error::limit(
                "peer's max_streams",
                u64::from(peer_max),
                self.local_open as u64 + news as u64,
            ));
        }
        let mut ids = OpenedStreams::new();
        for i in 0..msg.refs.len() {
            if let OutRef::New(kind) = msg.refs[i] {
                let sk = match kind {
                    RefKind::Sender => StreamKind::OpenerReceives,
                    RefKind::Receiver => StreamKind::OpenerSends,
                    _ => StreamKind::Bytes,
                };
                let nid = self.new_local_stream(sk, id)?;
                msg.patch_id(i, nid);
                ids.push(nid);
            }
        }
        let s = self.streams.get_mut(&id).expect("checked above");
        // (A message of at most COALESCE_MAX bytes fits any frame: max_frame_size is at
        // least 16 KiB.)
        if msg.splices.is_empty()
            && msg.fds.is_empty()
            && len <= COALESCE_MAX
            && s.queue.is_empty()
            && s.credit as usize >= len
        {
            // A small message with nothing queued ahead of it on its stream and the credit
            // for it goes straight into the outgoing frames, in a DATA frame of its own or
            // appended to the stream's frame written last: the writer then takes it with
            // the control frames, without the stream's queue, its turn in the ready list or
            // a look at the stream (written on the sending task's thread, read on the
            // writer's); and the encoding buffer is kept for the thread's next message.
            let imm = &mut self.immediate;
            if self.imm_id == id && imm.len() - self.imm_at - frame::HEADER_LEN + len <= max_frame {
                imm.extend_from_slice(&msg.buf);
                let n = imm.len() - self.imm_at - frame::HEADER_LEN;
                frame::patch_len(imm, self.imm_at, n);
            } else {
                self.imm_at = imm.len();
                frame::encode_data_header(imm, id, len, false);
                imm.extend_from_slice(&msg.buf);
                self.imm_id = id;
            }
            s.credit -= len as u32;
            self.flush = true;
            crate::message::recycle_buffer(std::mem::take(&mut msg.buf));
            return Ok((ids, s.pending < threshold));
        }
        // The message's parts are taken where it lies: moving the whole `OutMessage` (it
        // is large) cost more than queueing a small one.
        if msg.splices.is_empty() {
            let (buf, fds) = (std::mem::take(&mut msg.buf), std::mem::take(&mut msg.fds));
            let small = fds.is_empty() && buf.len() <= COALESCE_MAX;
            match s.queue.back_mut() {
                Some(Chunk {
                    data: ChunkData::Owned(v),
                    coalesced: true,
                    ..
                }) if small && v.len() + buf.len() <= COALESCE_CHUNK => {
                    if v.capacity() - v.len() < buf.len() {
                        // Grow in two steps, to 4 KiB then a whole chunk, rather than by
                        // doubling from the first message's size (each step a reallocation
                        // and a copy, on whichever thread sends); a stream with little
                        // queued (many channels, a few messages each) stays small.
                        let to = if v.capacity() < COALESCE_CHUNK / 4 {
                            COALESCE_CHUNK / 4
                        } else {
                            COALESCE_CHUNK
                        };
                        v.reserve(to.saturating_sub(v.len()).max(buf.len()));
                    }
                    v.extend_from_slice(&buf);
                    // Copied: the encoding buffer serves the thread's next message.
                    crate::message::recycle_buffer(buf);
                }
                // Its own buffer starts the chunk; later small ones append to it.
                _ => s.queue.push_back(Chunk {
                    data: ChunkData::Owned(buf),
                    pos: 0,
                    fds,
                    message: true,
                    coalesced: small,
                }),
            }
        } else {
            // The first piece starts with the message header (never spliced); the
            // rest continue the message like byte-stream data.
            let (pieces, fds) = msg.take().into_shared_pieces();
            let mut fds = Some(fds);
            for data in pieces {
                let first = fds.is_some();
                s.queue.push_back(Chunk {
                    data: ChunkData::Shared(data),
                    pos: 0,
                    fds: fds.take().unwrap_or_default(),
                    message: first,
                    coalesced: false,
                });
            }
        }
        s.pending += len;
        // `send_ready_now` (the connection is not lost, the channel open: checked above).
        let ready = s.pending < threshold;
        // With the stream at hand (no second lookup).
        Self::mark_stream_ready(&mut self.ready, &mut self.flush, id, s);
        Ok((ids, ready))
    }

    fn mark_ready(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            Self::mark_stream_ready(&mut self.ready, &mut self.flush, id, s);
        }
    }

    /// Puts stream `id` (`s`) in the ready queue if it has something to send and is not
    /// there yet, and asks for the writer.
    fn mark_stream_ready(ready: &mut VecDeque<u32>, flush: &mut bool, id: u32, s: &mut Stream) {
        if !s.in_ready && s.sendable() {
            s.in_ready = true;
            ready.push_back(id);
            *flush = true;
        }
    }

    /// Writes bytes on byte stream `id`; returns how many were taken.
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
        data: &[u8],
    ) -> Poll<Result<usize, Error>> {
        let threshold = match self.peer.as_ref() {
            Some(p) => p.initial_window as usize,
            None => return Poll::Ready(Err(Error::closed("handshake not finished"))),
        };
        let lost = self.lost.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Err(
                lost.unwrap_or_else(|| Error::closed("stream is closed"))
            ));
        };
        match &s.tx {
            TxState::Open => {}
            TxState::Failed(e) => return Poll::Ready(Err(e.clone())),
            _ => return Poll::Ready(Err(Error::closed("write after shutdown"))),
        }
        if let Some(e) = lost {
            return Poll::Ready(Err(e));
        }
        if s.pending >= threshold {
            s.tx_wakers.register(cx.waker());
            return Poll::Pending;
        }
        let n = data.len().min(threshold - s.pending);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        s.queue.push_back(Chunk {
            data: ChunkData::Owned(data[..n].to_vec()),
            pos: 0,
            fds: Vec::new(),
            message: false,
            coalesced: false,
        });
        s.pending += n;
        self.mark_ready(id);
        Poll::Ready(Ok(n))
    }

    /// Ends the send half of `id` cleanly after everything queued (DATA with FIN).
    pub fn finish(&mut self, id: u32) {
        self.end(id, End::Fin);
    }

    /// Ends the send half of `id` with an application error after everything queued.
    pub fn close_with_error(&mut self, id: u32, message: &str) {
        self.end(id, End::Error(message.to_owned()));
    }

    fn end(&mut self, id: u32, end: End) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.can_send
                && s.kind != StreamKind::Bytes
                && matches!(s.tx, TxState::Open)
                && matches!(end, End::Fin)
                && s.queue.is_empty()
                && self.lost.is_none()
                && self.peer.is_some()
            {
                // A channel with nothing queued: its end goes out now, on the stream's last
                // frame if that was the last one sent (an answer and its end in one frame).
                if self.imm_id == id {
                    frame::patch_flags(&mut self.immediate, self.imm_at, frame::FLAG_FIN);
                } else {
                    frame::encode_data_header(&mut self.immediate, id, 0, true);
                }
                self.imm_id = 0;
                s.tx = TxState::Done;
                self.wakers.append(&mut s.tx_wakers.0);
                self.flush = true;
                self.maybe_remove(id);
                return;
            }
            if s.can_send && matches!(s.tx, TxState::Open) {
                s.end = Some(end);
                s.tx = TxState::Ending;
                self.mark_ready(id);
            }
        }
    }

    /// Waits until stream `id` has sent everything queued (or failed).
    pub fn poll_flushed(&mut self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        match self.streams.get_mut(&id) {
            None => Poll::Ready(Ok(())),
            Some(s) => {
                if let TxState::Failed(e) = &s.tx {
                    return Poll::Ready(Err(e.clone()));
                }
                if s.pending == 0 && s.end.is_none() {
                    return Poll::Ready(Ok(()));
                }
                if let Some(e) = &self.lost {
                    return Poll::Ready(Err(e.clone()));
                }
                s.tx_wakers.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// Waits until the peer confirmed that its application took every message sent on
    /// channel `id` and its clean end (docs/PROTOCOL.md §6). The send half must have been
    /// ended cleanly ([`finish`](Mux::finish)).
    pub fn poll_delivered(&mut self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        let lost = self.lost.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Err(Error::closed(format!(
                "stream {id} is no longer known: delivery cannot be confirmed"
            ))));
        };
        if s.delivered {
            return Poll::Ready(Ok(()));
        }
        if let TxState::Failed(e) = &s.tx {
            return Poll::Ready(Err(e.clone()));
        }
        if let Some(e) = &s.reset {
            return Poll::Ready(Err(e.clone()));
        }
        if let Some(e) = lost {
            return Poll::Ready(Err(e));
        }
        s.delivered_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The local handle of `id` is gone. Unsent data is still sent; an open receive half is
    /// reset so the peer stops sending.
    pub fn release(&mut self, id: u32) {
        let listed = self
            .streams
            .get_mut(&id)
            .and_then(|s| std::mem::take(&mut s.orphan).then_some(s.parent));
        if let Some(parent) = listed {
            self.unlist_orphan(parent, id);
        }
        // (Releasing the orphans may release this stream too, through a reference in one
        // of their unread messages: what it holds is counted out after that, once.)
        self.release_orphans(id);
        self.budget.forget(id);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        self.budget.held = self.budget.held.saturating_sub(held(s));
        s.handle = false;
        let rx_open = s.can_recv && matches!(s.rx, RxState::Open);
        // A channel whose clean end arrived but was not read by the application: if it
        // took every message, delivery is confirmed all the same (the common "read one
        // reply, drop the receiver"); otherwise the sender learns it is not. Either way an
        // HTTP/2 stream can end.
        let unanswered = s.can_recv
            && s.kind != StreamKind::Bytes
            && matches!(s.rx, RxState::Fin)
            && !s.end_confirmed
            && self.lost.is_none();
        if unanswered {
            s.end_confirmed = true;
            if s.msgs.is_empty() && s.partial.is_none() {
                frame::encode_credit(&mut self.ctrl, id, 0);
            } else {
                frame::encode_reset(&mut self.ctrl, id, Reason::CANCEL);
            }
            self.flush = true;
        }
        let dropped = std::mem::take(&mut s.msgs);
        s.bytes.clear();
        s.buffered = 0;
        if let Some(p) = s.partial.take() {
            drop(p);
        }
        if rx_open {
            s.rx = RxState::Failed(Error::closed("released"));
            let tx_live = s.can_send && matches!(s.tx, TxState::Open | TxState::Ending);
            if tx_live && (!s.queue.is_empty() || s.end.is_some()) {
                // Send what is queued and the end first, then the RESET.
                if s.end.is_none() {
                    s.end = Some(End::Fin);
                    s.tx = TxState::Ending;
                }
                s.reset_after = true;
            } else {
                s.queue.clear();
                s.pending = 0;
                s.end = None;
                if s.can_send {
                    s.tx = TxState::Done;
                }
                frame::encode_reset(&mut self.ctrl, id, Reason::CANCEL);
                self.flush = true;
            }
        } else if s.can_send && matches!(s.tx, TxState::Open) {
            s.end = Some(End::Fin);
            s.tx = TxState::Ending;
        }
        if dropped.is_empty() {
            // Usually nothing was left unread: the stream is at hand for the rest.
            Self::mark_stream_ready(&mut self.ready, &mut self.flush, id, s);
            if s.removable() {
                self.remove_stream(id);
            }
        } else {
            self.mark_ready(id);
            for m in dropped.into_iter().flatten() {
                self.release_refs(m.refs());
            }
            self.maybe_remove(id);
        }
        self.unstarve();
    }

    /// Releases the peer-opened streams referenced by a message nobody will decode.
    ///
    /// Also called for every message once decoded: it unpins the local Sender streams the
    /// message sent back to us (see [`Mux::poll_recv`]). Claimed streams are left alone.
    pub fn release_refs(&mut self, refs: &[WireRef]) {
        for r in refs {
            if r.kind == RefKind::Sender && self.role.owns(r.id) {
                if let Some(s) = self.streams.get_mut(&r.id) {
                    s.pins = s.pins.saturating_sub(1);
                    if s.pins == 0 {
                        let w = s.rx_waker.take();
                        self.wake(w);
                        self.maybe_remove(r.id);
                    }
                }
                continue;
            }
            if r.kind != RefKind::Fd && !self.role.owns(r.id) {
                let unclaimed = self.streams.get(&r.id).is_some_and(|s| !s.claimed);
                if unclaimed {
                    if let Some(s) = self.streams.get_mut(&r.id) {
                        s.claimed = true;
                        s.handle = true;
                    }
                    self.release(r.id);
                }
            }
        }
    }

    fn maybe_remove(&mut self, id: u32) {
        if self.streams.get(&id).is_some_and(|s| s.removable()) {
            self.remove_stream(id);
        }
    }

    /// A new stream's state ([`Stream::new`]) in a box, a spare one if there is one
    /// ([`SPARE_STREAMS`]): that one holds the empty state `remove_stream` left (no
    /// waker, no buffer, nothing allocated), and only its plain fields are written.
    fn new_stream(
        &mut self,
        kind: StreamKind,
        local: bool,
        parent: u32,
        credit: u32,
        outstanding: u32,
    ) -> Box<Stream> {
        match self.spare_streams.pop() {
            Some(mut b) => {
                b.renew(kind, local, parent, credit, outstanding);
                b
            }
            None => Box::new(Stream::new(kind, local, parent, credit, outstanding)),
        }
    }

    /// Removes stream `id` (which [`Stream::removable`] said could go) and counts it out.
    fn remove_stream(&mut self, id: u32) {
        if let Some(mut b) = self.streams.remove(&id) {
            if self.spare_streams.len() < SPARE_STREAMS {
                // Its contents go now (wakers, buffers), as they would with the box; the
                // box waits for the next stream.
                b.vacate();
                self.spare_streams.push(b);
            }
            if self.role.owns(id) {
                self.local_open -= 1;
            } else {
                self.peer_open -= 1;
            }
            if self.goaway_sent && self.streams.is_empty() {
                // The last stream of a closing session is gone: wake the writer so that
                // it shuts the connection (`is_drained`).
                self.flush = true;
            }
        }
    }

    /// Takes the next message of channel stream `id`: `Ok(None)` after a clean end.
    pub fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
    ) -> Poll<Result<Option<InMessage>, Error>> {
        self.recv(cx, id, None)
    }

    /// [`poll_recv`](Mux::poll_recv) that also moves up to [`RECV_BATCH`] further
    /// messages already received on `id` into `more`, while they are plain (no references,
    /// no descriptors) and together under [`RECV_BATCH_BYTES`]: a receiver that drains
    /// `more` first takes the lock once per batch instead of once per message. Credit for
    /// them is granted as if the application took them; the caller holds at most that
    /// batch beyond the window.
    pub fn poll_recv_batch(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
        more: &mut VecDeque<InMessage>,
    ) -> Poll<Result<Option<InMessage>, Error>> {
        self.recv(cx, id, Some(more))
    }

    fn recv(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
        more: Option<&mut VecDeque<InMessage>>,
    ) -> Poll<Result<Option<InMessage>, Error>> {
        let window = self.local.initial_window;
        let lost = self.lost.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Ok(None));
        };
        if let Some(item) = s.msgs.pop_front() {
            if let Ok(m) = &item {
                let n = m.wire_len();
                s.buffered -= n;
                self.budget.held = self.budget.held.saturating_sub(n);
                if let Some(more) = more {
                    // Count first and reserve exactly: a receiver keeps its batch queue,
                    // so growing it by doubling would leave most of it unused for good.
                    let mut bytes = n;
                    let mut k = 0;
                    for next in s.msgs.iter() {
                        if more.len() + k >= RECV_BATCH || bytes >= RECV_BATCH_BYTES {
                            break;
                        }
                        match next {
                            Ok(m) if m.is_plain() => bytes += m.wire_len(),
                            _ => break,
                        }
                        k += 1;
                    }
                    more.reserve_exact(k);
                    for _ in 0..k {
                        let Some(Ok(m)) = s.msgs.pop_front() else {
                            unreachable!("counted only messages")
                        };
                        let n = m.wire_len();
                        s.buffered -= n;
                        self.budget.held = self.budget.held.saturating_sub(n);
                        more.push_back(m.into_message());
                    }
                }
            }
            let exempt = self.budget.exempt(id, s, 0);
            Self::grant(&mut self.ctrl, &mut self.flush, id, s, window, exempt);
            self.unstarve();
            return Poll::Ready(item.map(|m| Some(m.into_message())));
        }
        if s.pins > 0 && lost.is_none() {
            // A message sending this stream back to us is not decoded yet: the stream's
            // forwarder must live until it is, so its end is reported afterwards.
            s.rx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let r = match s.rx.clone() {
            RxState::Open => {
                if let Some(e) = lost {
                    return Poll::Ready(Err(e));
                }
                s.rx_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            RxState::Fin => {
                if !s.end_confirmed && s.kind != StreamKind::Bytes && lost.is_none() {
                    // Delivery confirmation (docs/PROTOCOL.md §6): the application took
                    // every message and the clean end.
                    s.end_confirmed = true;
                    frame::encode_credit(&mut self.ctrl, id, 0);
                    self.flush = true;
                }
                Poll::Ready(Ok(None))
            }
            RxState::Error(m) => {
                s.rx = RxState::Fin;
                // An error end is not a clean end: no confirmation.
                s.end_confirmed = true;
                Poll::Ready(Err(Error::new(ErrorKind::Remote, m)))
            }
            RxState::Failed(e) => Poll::Ready(Err(e)),
        };
        // Drained and ended: no message on it can claim a stream any more.
        self.release_orphans(id);
        r
    }

    /// Reads bytes of byte stream `id` into `out`: `Ok(0)` at the end.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
        out: &mut [u8],
    ) -> Poll<Result<usize, Error>> {
        let window = self.local.initial_window;
        let lost = self.lost.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Ok(0));
        };
        if !s.bytes.is_empty() {
            let mut n = 0;
            while n < out.len() {
                let Some(front) = s.bytes.front_mut() else {
                    break;
                };
                let k = front.len().min(out.len() - n);
                out[n..n + k].copy_from_slice(&front[..k]);
                n += k;
                if k == front.len() {
                    s.bytes.pop_front();
                } else {
                    let _ = front.split_to(k);
                }
            }
            s.buffered -= n;
            self.budget.held = self.budget.held.saturating_sub(n);
            Self::grant(&mut self.ctrl, &mut self.flush, id, s, window, false);
            return Poll::Ready(Ok(n));
        }
        match s.rx.clone() {
            RxState::Open => {
                if let Some(e) = lost {
                    return Poll::Ready(Err(e));
                }
                s.rx_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            RxState::Fin => Poll::Ready(Ok(0)),
            RxState::Error(m) => {
                s.rx = RxState::Fin;
                Poll::Ready(Err(Error::new(ErrorKind::Remote, m)))
            }
            RxState::Failed(e) => Poll::Ready(Err(e)),
        }
    }

    /// Grants credit for stream `s` per the receiver policy of docs/PROTOCOL.md §6.
    ///
    /// A partially received message at the head of the queue does not count against the
    /// window (it must be able to complete), as long as the session holds no more than
    /// `max_session_buffer` bytes in all (`exempt`).
    fn grant(
        ctrl: &mut BytesMut,
        flush: &mut bool,
        id: u32,
        s: &mut Stream,
        window: u32,
        exempt: bool,
    ) {
        if !matches!(s.rx, RxState::Open) || !s.can_recv {
            return;
        }
        let partial = s.partial.as_ref().map_or(0, |p| p.counted);
        let charged = if s.msgs.is_empty() && exempt {
            s.buffered
        } else {
            s.buffered + partial
        };
        let allowed = (window as usize).saturating_sub(charged);
        let gap = allowed.saturating_sub(s.outstanding as usize);
        if gap >= (window as usize) / 4 {
            s.outstanding += gap as u32;
            frame::encode_credit(ctrl, id, gap as u32);
            *flush = true;
        }
    }

    /// Sends a PING; true if one was sent (false while one is still unanswered).
    pub fn ping(&mut self) -> bool {
        if self.ping_outstanding {
            return false;
        }
        self.ping_seq += 1;
        self.ping_outstanding = true;
        frame::encode_ping(&mut self.ctrl, false, self.ping_seq);
        self.flush = true;
        true
    }

    /// True if a PING is unanswered.
    pub fn ping_outstanding(&self) -> bool {
        self.ping_outstanding
    }

    /// Starts a graceful close: GOAWAY is sent, no new channels are accepted or opened,
    /// existing ones finish (those the peer opened that wait to be accepted too).
    pub fn goaway(&mut self, reason: Reason, message: &str) {
        if self.goaway_sent || self.lost.is_some() {
            return;
        }
        self.goaway_sent = true;
        self.clean_goaway |= reason == Reason::NO_ERROR;
        let max = self
            .peer
            .as_ref()
            .map_or(Limits::MIN_FRAME_SIZE, |p| p.max_frame_size);
        frame::encode_goaway(&mut self.ctrl, self.last_peer, reason, message, max);
        self.flush = true;
        // Channels the peer opened before (waiting in the accept queue) stay: they are
        // open streams, which a graceful end lets finish; `poll_accept` hands them out
        // before it reports the end.
        let w = self.accept_waker.take();
        self.wake(w);
    }

    /// Releases the channels the peer opened that wait to be accepted (the peer sees them
    /// cancelled): for when nothing can accept them any more (the session's last handle
    /// is gone), so that the connection can end.
    pub fn release_unaccepted(&mut self) {
        let pending: Vec<u32> = self.accept_q.drain(..).collect();
        for id in pending {
            if let Some(s) = self.streams.get_mut(&id) {
                s.claimed = true;
                s.handle = true;
            }
            self.release(id);
        }
    }

    /// True if frames are ready to be sent (what [`poll_transmit`](Mux::poll_transmit)
    /// would return is not empty, credit and descriptors allowing).
    ///
    /// ```
    /// use libchan_core::mux::{Mux, Role};
    /// use libchan_core::Limits;
    /// let mut a = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    /// assert!(a.wants_transmit()); // the HELLO
    /// a.poll_transmit(&mut bytes::BytesMut::new(), &mut Vec::new(), 1 << 16);
    /// assert!(!a.wants_transmit());
    /// ```
    pub fn wants_transmit(&self) -> bool {
        !self.ctrl.is_empty() || !self.immediate.is_empty() || !self.ready.is_empty()
    }

    /// True once GOAWAY was sent and every stream is gone: the connection may be shut.
    pub fn is_drained(&self) -> bool {
        self.goaway_sent
            && self.streams.is_empty()
            && self.ctrl.is_empty()
            && self.immediate.is_empty()
    }

    /// Ready once the connection ended (gracefully or not).
    pub fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.lost.is_some() {
            return Poll::Ready(());
        }
        if !self.ended_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            self.ended_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// True if GOAWAY was sent or received.
    pub fn is_closing(&self) -> bool {
        self.goaway_sent || self.goaway_received
    }

    /// Ends the connection with `error`: every pending and later operation fails with it
    /// (after already received messages are taken).
    pub fn fail(&mut self, error: Error) {
        if self.lost.is_some() {
            return;
        }
        self.lost = Some(error.clone());
        let w = self.accept_waker.take();
        self.wake(w);
        let w = self.handshake_waker.take();
        self.wake(w);
        for w in std::mem::take(&mut self.ended_wakers) {
            self.wake(Some(w));
        }
        let mut ws = Vec::new();
        for s in self.streams.values_mut() {
            if matches!(s.rx, RxState::Open) && s.can_recv {
                s.rx = RxState::Failed(error.clone());
            }
            if matches!(s.tx, TxState::Open | TxState::Ending) && s.can_send {
                s.tx = TxState::Failed(error.clone());
                s.queue.clear();
                s.pending = 0;
                s.end = None;
            }
            ws.extend(s.rx_waker.take());
            ws.append(&mut s.tx_wakers.0);
            ws.extend(s.delivered_waker.take());
        }
        self.wakers.extend(ws);
        self.ready.clear();
        // Like the streams' queues: data that was not sent goes.
        self.immediate.clear();
        self.imm_id = 0;
        self.fd_in.clear();
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.maybe_remove(id);
        }
    }

    /// Fills `out` (up to about `max` bytes) with frames to send and `fds` with the
    /// descriptors that must travel with them (attached to the first byte of `out`).
    pub fn poll_transmit(&mut self, out: &mut BytesMut, fds: &mut Vec<OwnedFd>, max: usize) {
        self.transmit(out, None, fds, max);
    }

    /// Like [`poll_transmit`](Mux::poll_transmit), but message pieces of at least
    /// [`Batch::BY_REFERENCE`] bytes are referenced rather than copied into the batch's
    /// buffer, for a vectored write.
    ///
    /// ```
    /// use libchan_core::mux::{Batch, Mux, Role};
    /// use libchan_core::Limits;
    /// let mut a = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    /// let mut batch = Batch::new(64 * 1024);
    /// a.poll_transmit_batch(&mut batch, &mut Vec::new(), 1 << 16);
    /// let mut pieces = std::collections::VecDeque::new();
    /// let len = batch.len();
    /// batch.take_pieces(&mut pieces);
    /// assert_eq!(pieces.iter().map(|p| p.len()).sum::<usize>(), len); // the HELLO
    /// assert!(batch.is_empty());
    /// ```
    pub fn poll_transmit_batch(&mut self, out: &mut Batch, fds: &mut Vec<OwnedFd>, max: usize) {
        let refs = out.by_reference.then_some(&mut out.refs);
        self.transmit(&mut out.buf, refs, fds, max);
    }

    fn transmit(
        &mut self,
        out: &mut BytesMut,
        mut refs: Option<&mut Refs>,
        fds: &mut Vec<OwnedFd>,
        max: usize,
    ) {
        if !self.ctrl.is_empty() {
            out.extend_from_slice(&self.ctrl);
            self.ctrl.clear();
        }
        // (A failed connection has none: `fail` drops them with the streams' queues.)
        if !self.immediate.is_empty() {
            if out.is_empty() && self.immediate.len() > 4096 {
                // Many messages: hand their bytes over rather than copy them.
                std::mem::swap(out, &mut self.immediate);
            } else {
                out.extend_from_slice(&self.immediate);
                self.immediate.clear();
            }
            self.imm_id = 0;
        }
        let Some(peer) = self.peer.as_ref() else {
            return;
        };
        if self.lost.is_some() {
            return;
        }
        let max_frame = peer.max_frame_size as usize;
        let peer_max_frame = peer.max_frame_size;
        let threshold = peer.initial_window as usize;
        // One write carries at most the peer's max_fds_per_message descriptors, so that
        // what it holds unclaimed (this write's, plus the previous one's whose headers it
        // has not parsed yet) stays within twice that (PROTOCOL.md §8).
        let fd_cap = usize::from(peer.max_fds_per_message).max(1);
        let total = |out: &BytesMut, refs: &Option<&mut Refs>| {
            out.len() + refs.as_ref().map_or(0, |r| r.len)
        };
        while total(out, &refs) < max {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.in_ready = false;
            let frame_cap = if self.ready.is_empty() {
                max_frame
            } else {
                max_frame.min(FAIR_FRAME)
            };
            let room = frame_cap
                .min(s.credit as usize)
                .min(max - total(out, &refs).min(max));
            let at = out.len();
            frame::encode_data_header(out, id, 0, false);
            let mut n = 0;
            let mut held = false;
            while n < room {
                let Some(c) = s.queue.front_mut() else {
                    break;
                };
                if c.pos == 0 && c.message {
                    if room - n < MESSAGE_HEADER_LEN {
                        break;
                    }
                    if !c.fds.is_empty() {
                        if self.fds_out != FdsOut::Ready {
                            held = true;
                            break;
                        }
                        if fds.len() + c.fds.len() > fd_cap {
                            break;
                        }
                        fds.append(&mut c.fds);
                    }
                }
                let want = (c.data.len() - c.pos).min(room - n);
                let k = c.header_safe(want);
                if k == 0 && want > 0 {
                    // The next coalesced header does not fit: it goes in the next frame.
                    break;
                }
                match refs.as_deref_mut() {
                    Some(r) if k >= Batch::BY_REFERENCE => {
                        r.list.push((out.len(), c.data.slice(c.pos..c.pos + k)));
                        r.len += k;
                    }
                    _ => out.extend_from_slice(&c.data.as_slice()[c.pos..c.pos + k]),
                }
                c.pos += k;
                n += k;
                if c.pos == c.data.len() {
                    s.queue.pop_front();
                }
            }
            s.credit -= n as u32;
            s.pending -= n;
            if held {
                // A message with descriptors waits for the peer's answer to FDS; what
                // came before it goes now, other streams go on.
                if n == 0 {
                    out.truncate(at);
                } else {
                    frame::patch_len(out, at, n);
                }
                if s.pending < threshold {
                    self.wakers.append(&mut s.tx_wakers.0);
                }
                if !self.fds_held.contains(&id) {
                    self.fds_held.push(id);
                }
                if self.fds_out == FdsOut::Idle {
                    frame::encode_fds(out, false);
                    self.fds_out = FdsOut::Asked;
                }
                continue;
            }
            let mut fin = false;
            if s.queue.is_empty() {
                match s.end.take() {
                    Some(End::Fin) => fin = true,
                    Some(End::Error(m)) => {
                        if n == 0 {
                            out.truncate(at);
                        } else {
                            frame::patch_len(out, at, n);
                        }
                        frame::encode_close(out, id, &m, peer_max_frame);
                        if s.reset_after {
                            frame::encode_reset(out, id, Reason::CANCEL);
                        }
                        s.tx = TxState::Done;
                        self.wakers.append(&mut s.tx_wakers.0);
                        self.maybe_remove(id);
                        continue;
                    }
                    None => {}
                }
            }
            if n == 0 && !fin {
                out.truncate(at);
                if s.sendable() {
                    // No room left in this batch for what comes next (a message header
                    // is never split): keep its turn for the next batch.
                    s.in_ready = true;
                    self.ready.push_front(id);
                    break;
                }
            } else {
                frame::patch_len(out, at, n);
                if fin {
                    frame::patch_flags(out, at, FLAG_FIN);
                }
            }
            if fin {
                if s.reset_after {
                    frame::encode_reset(out, id, Reason::CANCEL);
                }
                s.tx = TxState::Done;
                self.wakers.append(&mut s.tx_wakers.0);
                self.maybe_remove(id);
                continue;
            }
            if s.pending < threshold {
                self.wakers.append(&mut s.tx_wakers.0);
            }
            if s.sendable() {
                s.in_ready = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Handles bytes read from the connection, consuming every whole frame in `buf` and
    /// descriptors received with them. An error is fatal: the caller should send what
    /// [`poll_transmit`](Mux::poll_transmit) still yields (a GOAWAY) and close.
    pub fn handle_input(
        &mut self,
        buf: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if self.lost.is_some() {
            buf.clear();
            fds.clear();
            return Ok(());
        }
        self.fd_in.extend(fds.drain(..));
        if self.direct.as_ref().is_some_and(|d| !d.out) {
            // The driver read into the buffer after all: the body's bytes are there.
            self.resume_frame(buf);
        }
        let max_fds = usize::from(self.local.max_fds_per_message).max(1) * 2;
        loop {
            let first = self.peer.is_none();
            let f = match frame::decode(buf, self.local.max_frame_size, first) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if let Err(e) = self.try_direct(buf) {
                        return Err(self.protocol_failure(e));
                    }
                    break;
                }
                Err(e) => {
                    let err = if first {
                        Error::new(ErrorKind::Handshake, e.0)
                    } else {
                        Error::protocol(e.0)
                    };
                    return Err(self.protocol_failure(err));
                }
            };
            if let Err(e) = self.handle_frame(f) {
                return Err(self.protocol_failure(e));
            }
            if self.lost.is_some() {
                break;
            }
        }
        if self.fd_in.len() > max_fds {
            let e = Error::protocol(format!(
                "{} descriptors received that no message announced (limit {max_fds})",
                self.fd_in.len()
            ));
            return Err(self.protocol_failure(e));
        }
        Ok(())
    }

    /// The peer closed its side of the connection (EOF).
    pub fn handle_eof(&mut self) {
        let e = if self.goaway_received {
            Error::lost("peer closed the session")
        } else if self.peer.is_none() {
            Error::new(
                ErrorKind::Handshake,
                "connection closed before the handshake finished",
            )
        } else {
            Error::lost("connection closed by peer without GOAWAY")
        };
        self.fail(e);
    }

    fn protocol_failure(&mut self, e: Error) -> Error {
        let max = self
            .peer
            .as_ref()
            .map_or(Limits::MIN_FRAME_SIZE, |p| p.max_frame_size);
        frame::encode_goaway(
            &mut self.ctrl,
            self.last_peer,
            Reason::PROTOCOL,
            e.message(),
            max,
        );
        self.flush = true;
        self.goaway_sent = true;
        self.fail(e.clone());
        e
    }

    fn handle_frame(&mut self, f: Frame) -> Result<(), Error> {
        let stream = match &f {
            Frame::Data { stream, .. }
            | Frame::Close { stream, .. }
            | Frame::Reset { stream, .. } => Some(*stream),
            _ => None,
        };
        match stream {
            Some(id) => self.accounted(id, |m| m.handle_frame_inner(f)),
            None => self.handle_frame_inner(f),
        }
    }

    /// Runs `f`, which changes what stream `id` holds, and settles the session budget.
    fn accounted<R>(&mut self, id: u32, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.held_by(id);
        let r = f(self);
        let after = self.held_by(id);
        self.budget.held = (self.budget.held + after).saturating_sub(before);
        let idle = self
            .streams
            .get(&id)
            .is_none_or(|s| s.partial.is_none() && s.msgs.is_empty());
        if idle {
            self.budget.forget(id);
        }
        self.unstarve();
        r
    }

    /// True once, after the peer's FDS frame (it is about to send descriptors): from the
    /// next read on, the driver must read descriptors with the bytes
    /// ([`LinkRead::enable_fds`](crate::driver::LinkRead::enable_fds)). PROTOCOL.md §8.
    pub fn take_fds_asked(&mut self) -> bool {
        std::mem::take(&mut self.fds_asked)
    }

    /// How many messages (or their decode errors) input queued for the application since
    /// the last call. The driver uses it to tell a batch of requests from a single one.
    pub fn take_messages_in(&mut self) -> usize {
        std::mem::take(&mut self.messages_in)
    }

    /// Says where the driver reads next: into the read buffer, or straight into the body
    /// of a large message whose DATA frame is arriving (the kernel then copies its bytes
    /// once, into their final place, instead of into the read buffer and again into the
    /// body). A driver that calls this must read where it says, and hand a
    /// [`ReadTarget::Body`] back to [`handle_body_input`](Mux::handle_body_input) — even
    /// after a read of 0 bytes or an error — before it calls anything else that takes
    /// input. A driver that never calls it gets no direct reads.
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use libchan_core::mux::{Mux, ReadTarget, Role};
    /// use libchan_core::Limits;
    /// let mut m = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    /// let mut buf = BytesMut::new();
    /// assert!(matches!(m.next_read(&mut buf), ReadTarget::Buffer(None)));
    /// ```
    pub fn next_read(&mut self, buf: &mut BytesMut) -> ReadTarget {
        self.direct_reads = true;
        if self.lost.is_some() {
            self.direct = None;
            return ReadTarget::Buffer(None);
        }
        if let Some(d) = &mut self.direct {
            if !d.out {
                if let Some(region) = d.region.take() {
                    d.out = true;
                    return ReadTarget::Body(region);
                }
                let dest = self
                    .streams
                    .get_mut(&d.stream)
                    .filter(|s| matches!(s.rx, RxState::Open))
                    .and_then(|s| s.partial.as_mut())
                    .and_then(|p| p.body.dest.take());
                let Some(mut dest) = dest else {
                    // The stream was released meanwhile: its bytes are stale, read them
                    // into the buffer as a frame of their own.
                    self.resume_frame(buf);
                    return ReadTarget::Buffer(None);
                };
                if dest.capacity() - dest.len() < d.left {
                    dest.reserve(d.left);
                }
                let head = dest.split_to(dest.len());
                let after = dest.split_off(d.left);
                d.parts = Some((head, after));
                d.filled = 0;
                d.out = true;
                self.expect_header = false;
                return ReadTarget::Body(dest);
            }
        }
        if self.expect_header {
            if buf.len() < frame::HEADER_LEN {
                return ReadTarget::Buffer(Some(frame::HEADER_LEN - buf.len()));
            }
            self.expect_header = false;
        }
        ReadTarget::Buffer(None)
    }

    /// Takes back the body buffer of a [`ReadTarget::Body`] after the driver read into
    /// it (`fds`: descriptors that arrived with those bytes), and handles the bytes, as
    /// [`handle_input`](Mux::handle_input) would have. Bytes beyond the room it had (a link
    /// that appended more than the spare capacity) are moved to `buf`, as input that
    /// follows.
    pub fn handle_body_input(
        &mut self,
        mut region: BytesMut,
        buf: &mut BytesMut,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), Error> {
        let Some(d) = self.direct.as_mut().filter(|d| d.out) else {
            return Ok(());
        };
        d.out = false;
        if self.lost.is_some() {
            self.direct = None;
            return Ok(());
        }
        let mut n = region.len().saturating_sub(d.filled);
        let extra = if n > d.left {
            n = d.left;
            Some(region.split_off(d.filled + n))
        } else {
            None
        };
        d.left -= n;
        d.filled += n;
        let (id, left, rest, fin) = (d.stream, d.left, d.rest, d.fin);
        let whole = if left == 0 {
            // The frame's part is in: join the body again (no copy: both sides are full).
            d.parts
                .take()
                .map(|(head, after)| join_parts(head, Some(region), after))
        } else {
            d.region = Some(region);
            None
        };
        self.fd_in.extend(fds.drain(..));
        if let Some(p) = self
            .streams
            .get_mut(&id)
            .filter(|s| matches!(s.rx, RxState::Open))
            .and_then(|s| s.partial.as_mut())
        {
            p.body.len += n;
            if whole.is_some() {
                p.body.dest = whole;
            }
        }
        self.accounted(id, |m| m.body_arrived(id, n));
        if left == 0 {
            self.direct = None;
            if rest > 0 || fin {
                // The frame's remainder: a frame of its own, in front of what follows.
                prepend_data_header(buf, id, rest, fin);
            } else {
                self.expect_header = self.streams.get(&id).is_some_and(|s| body_continues(s));
            }
        }
        if let Some(extra) = extra {
            buf.extend_from_slice(&extra);
        }
        if !buf.is_empty() {
            return self.handle_input(buf, &mut Vec::new());
        }
        Ok(())
    }

    /// `n` bytes of stream `id`'s partial message arrived straight in its body buffer.
    fn body_arrived(&mut self, id: u32, n: usize) {
        let mut pins: Vec<u32> = Vec::new();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if !matches!(s.rx, RxState::Open) {
            return;
        }
        let Some(p) = s.partial.as_mut() else {
            return;
        };
        // Checked when the frame was chosen for a direct read: within credit and body.
        s.outstanding = s.outstanding.saturating_sub(n as u32);
        p.need = p.need.saturating_sub(n);
        p.counted += n;
        let woke = p.need == 0 && finish_partial(s, &mut pins);
        self.messages_in += usize::from(woke);
        self.settle_rx(id, n, woke, pins);
    }

    /// After `extra` bytes arrived on stream `id`: grants credit as the receive policy
    /// allows, wakes the receiver if a message was queued (`woke`), and pins the local
    /// Sender streams that queued messages send back (`pins`).
    fn settle_rx(&mut self, id: u32, extra: usize, woke: bool, pins: Vec<u32>) {
        let window = self.local.initial_window;
        if let Some(s) = self.streams.get_mut(&id) {
            let exempt = self.budget.exempt(id, s, extra);
            Self::grant(&mut self.ctrl, &mut self.flush, id, s, window, exempt);
            if woke {
                let w = s.rx_waker.take();
                self.wake(w);
            }
        }
        for p in pins {
            if self.role.owns(p) {
                if let Some(t) = self.streams.get_mut(&p) {
                    t.pins += 1;
                }
            }
        }
    }

    /// With an incomplete frame at the front of `buf`: if it is a DATA frame that carries
    /// at least [`DIRECT_MIN_READ`] more bytes of a large body (one already begun, or one
    /// whose message header is in the part that is here), handles the bytes that are here
    /// as a frame of their own and has the rest read straight into the body.
    fn try_direct(&mut self, buf: &mut BytesMut) -> Result<(), Error> {
        if !self.direct_reads
            || self.direct.is_some()
            || self.peer.is_none()
            || buf.len() < frame::HEADER_LEN
            || buf[3] != frame::FrameType::DATA.0
        {
            return Ok(());
        }
        // `frame::decode` checked the length against max_frame_size and the reserved bit.
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        let fin = buf[4] & FLAG_FIN != 0;
        let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
        let here = buf.len() - frame::HEADER_LEN;
        let Some(s) = self.streams.get(&id) else {
            return Ok(());
        };
        if !s.can_recv
            || s.kind == StreamKind::Bytes
            || !matches!(s.rx, RxState::Open)
            || len > s.outstanding as usize
        {
            return Ok(());
        }
        // Where the message that the frame's part here ends in ends (`end`, in bytes from
        // the frame's payload), walking the headers of the messages that begin here.
        let mut end = match s.partial.as_ref() {
            Some(p) if p.discard || p.body.dest.is_none() => return Ok(()),
            Some(p) => p.need,
            None => 0,
        };
        let mut new_body = None;
        let payload = &buf[frame::HEADER_LEN..];
        let mut walked = 0;
        while end < here {
            walked += 1;
            if here - end < MESSAGE_HEADER_LEN || walked > DIRECT_MAX_WALK {
                // The part here ends in a message header (or too many messages begin
                // here to look at): no direct read.
                return Ok(());
            }
            let (payload_len, nrefs, _) = message_header(&payload[end..end + MESSAGE_HEADER_LEN]);
            let body = payload_len.saturating_add(nrefs * REF_LEN);
            new_body = Some(body);
            end = end.saturating_add(body.saturating_add(MESSAGE_HEADER_LEN));
        }
        let large = DIRECT_BODY_MIN.min(self.local.max_frame_size as usize);
        if end == here || new_body.is_some_and(|b| b < large) {
            return Ok(());
        }
        let direct = len.min(end) - here;
        if direct < DIRECT_MIN_READ {
            return Ok(());
        }
        buf.advance(frame::HEADER_LEN);
        let payload = buf.split().freeze();
        self.handle_frame(Frame::Data {
            stream: id,
            fin: false,
            payload,
        })?;
        // A body that begins here got its buffer only if the limits and the session's
        // reserve allowed it; otherwise the rest of the frame comes through the buffer.
        let ready = self
            .streams
            .get(&id)
            .filter(|s| matches!(s.rx, RxState::Open))
            .and_then(|s| s.partial.as_ref())
            .is_some_and(|p| !p.discard && p.body.dest.is_some() && p.need == end - here);
        if !ready {
            prepend_data_header(buf, id, len - here, fin);
            return Ok(());
        }
        self.direct = Some(Direct {
            stream: id,
            left: direct,
            rest: len - here - direct,
            fin,
            parts: None,
            region: None,
            filled: 0,
            out: false,
        });
        Ok(())
    }

    /// Gives up a pending direct read: the rest of its frame is read into `buf` (in front
    /// of what is there) as a DATA frame of its own.
    fn resume_frame(&mut self, buf: &mut BytesMut) {
        let Some(d) = self.direct.take() else {
            return;
        };
        if let Some((head, after)) = d.parts {
            // Part of the frame is in the body already: put the body back together.
            let head = join_parts(head, d.region, after);
            if let Some(p) = self
                .streams
                .get_mut(&d.stream)
                .and_then(|s| s.partial.as_mut())
            {
                p.body.dest = Some(head);
            }
        }
        prepend_data_header(buf, d.stream, d.left + d.rest, d.fin);
    }

    /// Re-grants credit to starved streams once that is allowed again.
    fn unstarve(&mut self) {
        let window = self.local.initial_window;
        for id in self.budget.take_starved() {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let ex = self.budget.exempt(id, s, 0);
            Self::grant(&mut self.ctrl, &mut self.flush, id, s, window, ex);
        }
    }

    fn held_by(&self, id: u32) -> usize {
        self.streams.get(&id).map_or(0, |s| held(s))
    }

    /// Bytes held for the application over all streams (for tests and monitoring).
    pub fn held(&self) -> usize {
        self.budget.held
    }

    fn handle_frame_inner(&mut self, f: Frame) -> Result<(), Error> {
        match f {
            Frame::Hello(h) => self.handle_hello(h),
            Frame::Open {
                stream,
                kind,
                parent,
            } => self.handle_open(stream, kind, parent),
            Frame::Data {
                stream,
                fin,
                payload,
            } => self.handle_data(stream, fin, payload),
            Frame::Credit { stream, increment } => {
                self.known(stream, "CREDIT")?;
                let Some(s) = self.streams.get_mut(&stream) else {
                    return Ok(());
                };
                if increment == 0 {
                    // Delivery confirmation: meaningful once our clean end was sent.
                    if s.can_send && matches!(s.tx, TxState::Done) {
                        s.delivered = true;
                        let w = s.delivered_waker.take();
                        self.wake(w);
                    }
                    return Ok(());
                }
                match s.credit.checked_add(increment) {
                    Some(c) if c <= i32::MAX as u32 => {
                        s.credit = c;
                        self.mark_ready(stream);
                        Ok(())
                    }
                    _ => Err(Error::protocol(format!(
                        "credit on stream {stream} overflows 2^31-1"
                    ))),
                }
            }
            Frame::Close { stream, message } => {
                self.known(stream, "CLOSE")?;
                self.end_rx(stream, RxState::Error(message))
            }
            Frame::Reset { stream, reason } => {
                self.known(stream, "RESET")?;
                let Some(s) = self.streams.get_mut(&stream) else {
                    return Ok(());
                };
                let e = Error::new(
                    if reason == Reason::REFUSED {
                        ErrorKind::Refused
                    } else {
                        ErrorKind::Reset
                    },
                    format!("peer reset the stream ({})", reason.describe()),
                );
                s.reset = Some(e.clone());
                if s.can_send && !matches!(s.tx, TxState::Done | TxState::Failed(_)) {
                    s.tx = TxState::Failed(e.clone());
                    s.queue.clear();
                    s.pending = 0;
                    s.end = None;
                }
                if s.can_recv && matches!(s.rx, RxState::Open) {
                    s.rx = RxState::Failed(e);
                    s.partial = None;
                }
                let w = (s.rx_waker.take(), s.delivered_waker.take());
                self.wakers.append(&mut s.tx_wakers.0);
                self.wake(w.0);
                self.wake(w.1);
                self.maybe_remove(stream);
                Ok(())
            }
            Frame::Ping { ack, opaque } => {
                if ack {
                    self.ping_outstanding = false;
                } else {
                    frame::encode_ping(&mut self.ctrl, true, opaque);
                    self.flush = true;
                }
                Ok(())
            }
            Frame::GoAway {
                reason, message, ..
            } => {
                self.goaway_received = true;
                self.clean_goaway |= reason == Reason::NO_ERROR;
                let w = self.accept_waker.take();
                self.wake(w);
                if reason != Reason::NO_ERROR {
                    self.fail(Error::new(
                        ErrorKind::Protocol,
                        format!("peer ended the session: {message}"),
                    ));
                }
                Ok(())
            }
            Frame::Fds { ack: true } => {
                if self.fds_out == FdsOut::Asked {
                    self.fds_out = FdsOut::Ready;
                    for id in std::mem::take(&mut self.fds_held) {
                        self.mark_ready(id);
                    }
                }
                Ok(())
            }
            Frame::Fds { ack: false } => {
                // Answered once: a peer asks once per connection.
                if !self.fds_in {
                    self.fds_in = true;
                    self.fds_asked = true;
                    frame::encode_fds(&mut self.ctrl, true);
                    self.flush = true;
                }
                Ok(())
            }
            Frame::Unknown { .. } => Ok(()),
        }
    }

    /// Checks that `stream` was opened at some point (it may be gone now).
    fn known(&self, stream: u32, what: &str) -> Result<(), Error> {
        let ever = if self.role.owns(stream) {
            stream < self.next_local
        } else {
            stream <= self.last_peer
        };
        if ever {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "{what} on stream {stream}, which was never opened"
            )))
        }
    }

    fn handle_hello(&mut self, h: Hello) -> Result<(), Error> {
        let hs = |m: String| Error::new(ErrorKind::Handshake, m);
        if h.version != frame::VERSION {
            return Err(hs(format!(
                "protocol version mismatch: ours {}, peer's {}",
                frame::VERSION,
                h.version
            )));
        }
        let peer_role = match h.role {
            1 => Role::Dialer,
            2 => Role::Listener,
            r => return Err(hs(format!("peer sent unknown role {r}"))),
        };
        if peer_role == self.role {
            return Err(hs(format!(
                "both sides claim the same role ({:?}); one must dial and one listen",
                self.role
            )));
        }
        let limits = Limits {
            max_frame_size: h.max_frame_size,
            max_message_size: h.max_message_size,
            initial_window: h.initial_window,
            max_streams: h.max_streams,
            max_pending_accepts: 0,
            max_fds_per_message: h.max_fds_per_message,
            max_refs_per_message: h.max_refs_per_message,
            max_session_buffer: 0,
        };
        if let Err(m) = limits.validate() {
            return Err(hs(format!("peer's limits are invalid: {m}")));
        }
        let (dialer, listener) = match self.role {
            Role::Dialer => (&self.codecs, &h.codecs),
            Role::Listener => (&h.codecs, &self.codecs),
        };
        let Some(codec) = dialer.iter().find(|c| listener.contains(c)).cloned() else {
            return Err(hs(format!(
                "no common codec: ours {:?}, peer's {:?}",
                self.codecs, h.codecs
            )));
        };
        self.codec = Some(codec);
        for (id, s) in self.streams.iter_mut() {
            s.credit = h.initial_window;
            if !s.in_ready && s.sendable() {
                s.in_ready = true;
                self.ready.push_back(*id);
            }
        }
        self.peer = Some(h);
        self.flush = true;
        let w = self.handshake_waker.take();
        self.wake(w);
        Ok(())
    }

    fn handle_open(&mut self, id: u32, kind: StreamKind, parent: u32) -> Result<(), Error> {
        if self.role.owns(id) {
            return Err(Error::protocol(format!(
                "peer opened stream {id} in our id namespace"
            )));
        }
        if id <= self.last_peer {
            return Err(Error::protocol(format!(
                "peer opened stream {id}, not above its last stream {}",
                self.last_peer
            )));
        }
        self.last_peer = id;
        if parent != 0 {
            self.known(parent, "OPEN parent")?;
        }
        let refuse = if self.goaway_sent || self.peer_open >= self.local.max_streams {
            true
        } else if parent == 0 {
            kind != StreamKind::OpenerSends
                || self.accept_q.len() >= self.local.max_pending_accepts as usize
        } else {
            !self.streams.contains_key(&parent)
        };
        if refuse {
            frame::encode_reset(&mut self.ctrl, id, Reason::REFUSED);
            self.flush = true;
            return Ok(());
        }
        let credit = self.peer.as_ref().map_or(0, |p| p.initial_window);
        let mut s = self.new_stream(kind, false, parent, credit, self.local.initial_window);
        if parent != 0 {
            s.orphan = true;
            self.orphans.entry(parent).or_default().push_back(id);
        }
        self.streams.insert(id, s);
        self.peer_open += 1;
        if parent == 0 {
            self.accept_q.push_back(id);
            let w = self.accept_waker.take();
            self.wake(w);
        }
        Ok(())
    }

    fn end_rx(&mut self, id: u32, state: RxState) -> Result<(), Error> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if !s.can_recv {
            return Err(Error::protocol(format!(
                "end of stream {id} from the side that does not send on it"
            )));
        }
        if !matches!(s.rx, RxState::Open) {
            // Ours already ended (we reset it or it was finished): stale, ignore.
            return Ok(());
        }
        if s.partial.is_some() {
            s.partial = None;
            s.msgs.push_back(Err(Error::protocol(format!(
                "stream {id} ended in the middle of a message"
            ))));
        }
        s.rx = state;
        let w = s.rx_waker.take();
        self.wake(w);
        self.maybe_remove(id);
        Ok(())
    }

    fn handle_data(&mut self, id: u32, fin: bool, mut payload: Bytes) -> Result<(), Error> {
        self.known(id, "DATA")?;
        let max_msg = self.local.max_message_size as usize;
        let max_refs = usize::from(self.local.max_refs_per_message);
        let max_fds = usize::from(self.local.max_fds_per_message);
        let mut pins: Vec<u32> = Vec::new();
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if !s.can_recv {
            return Err(Error::protocol(format!(
                "DATA on stream {id} from the side that does not send on it"
            )));
        }
        if !matches!(s.rx, RxState::Open) {
            // We reset it, or the peer sent after its FIN. Ignore stale data; data after
            // FIN is a stream error.
            if matches!(s.rx, RxState::Fin | RxState::Error(_)) && !payload.is_empty() {
                frame::encode_reset(&mut self.ctrl, id, Reason::PROTOCOL);
                self.flush = true;
            }
            return Ok(());
        }
        let len = payload.len();
        if len > s.outstanding as usize {
            let e = Error::protocol(format!(
                "peer sent {len} bytes on stream {id} with only {} bytes of credit",
                s.outstanding
            ));
            s.rx = RxState::Failed(e);
            s.msgs.clear();
            s.bytes.clear();
            s.buffered = 0;
            s.partial = None;
            frame::encode_reset(&mut self.ctrl, id, Reason::PROTOCOL);
            self.flush = true;
            let w = s.rx_waker.take();
            self.wake(w);
            return Ok(());
        }
        s.outstanding -= len as u32;
        let mut woke = false;
        if s.kind == StreamKind::Bytes {
            if !payload.is_empty() {
                s.buffered += len;
                s.bytes.push_back(unpin(payload));
                woke = true;
            }
        } else {
            let queued_before = s.msgs.len();
            // The frame after a run of small messages copied out together (`copied`).
            let mut rest: Option<Bytes> = None;
            let mut copied = false;
            loop {
                if payload.is_empty() {
                    match rest.take() {
                        Some(r) => {
                            payload = r;
                            copied = false;
                            continue;
                        }
                        None => break,
                    }
                }
                if let Some(p) = s.partial.as_mut() {
                    let take = p.need.min(payload.len());
                    let piece = payload.split_to(take);
                    p.need -= take;
                    if !p.discard {
                        p.body.push(piece);
                        p.counted += take;
                    }
                    if p.need == 0 && finish_partial(s, &mut pins) {
                        woke = true;
                    }
                    continue;
                }
                if payload.len() < MESSAGE_HEADER_LEN {
                    return Err(Error::protocol(format!(
                        "message header split across DATA frames on stream {id}"
                    )));
                }
                if !copied {
                    // Small messages are copied out of the read buffer so that they do not
                    // pin it; several in a row are copied together, with one allocation,
                    // and each keeps a slice of the copy.
                    let limits = (max_msg, max_refs, max_fds);
                    let (run, n) = small_run(&payload, limits);
                    if run > 0 {
                        s.msgs.reserve(n);
                        rest = Some(payload.split_off(run));
                        payload = Bytes::copy_from_slice(&payload);
                        copied = true;
                    }
                }
                // Read in place and advance: a split would touch the read buffer's shared
                // reference count, which the receiving thread touches too.
                let (payload_len, nrefs, nfds) = message_header(&payload[..MESSAGE_HEADER_LEN]);
                payload.advance(MESSAGE_HEADER_LEN);
                if nfds > self.fd_in.len() {
                    return Err(Error::protocol(format!(
                        "message on stream {id} announces {nfds} descriptors, {} arrived{}",
                        self.fd_in.len(),
                        if self.fds_in {
                            ""
                        } else {
                            " (no FDS frame came first: descriptors sent without one are \
                             lost, PROTOCOL.md §8)"
                        }
                    )));
                }
                // (A drain of nothing still costs its setup and teardown: most messages
                // carry no descriptor.)
                let fds: Vec<OwnedFd> = if nfds == 0 {
                    Vec::new()
                } else {
                    self.fd_in.drain(..nfds).collect()
                };
                let body_len = payload_len + nrefs * REF_LEN;
                let total = MESSAGE_HEADER_LEN + body_len;
                let discard = if total > max_msg {
                    Some(Error::limit(
                        "max_message_size",
                        max_msg as u64,
                        total as u64,
                    ))
                } else if nrefs > max_refs {
                    Some(Error::limit(
                        "max_refs_per_message",
                        max_refs as u64,
                        nrefs as u64,
                    ))
                } else if nfds > max_fds {
                    Some(Error::limit(
                        "max_fds_per_message",
                        max_fds as u64,
                        nfds as u64,
                    ))
                } else {
                    None
                };
                if discard.is_none() && payload.len() >= body_len {
                    let body = if copied {
                        payload.split_to(body_len)
                    } else {
                        take_unpinned(&mut payload, body_len)
                    };
                    s.buffered += total;
                    let item = complete(body, payload_len, nrefs, fds);
                    if item.is_err() {
                        s.buffered -= total;
                    }
                    pin(&mut pins, &item);
                    s.msgs.push_back(item);
                    woke = true;
                    continue;
                }
                let discarding = discard.is_some();
                if let Some(e) = discard {
                    // Reported now; the body's bytes are read and dropped as they come.
                    drop(fds);
                    s.msgs.push_back(Err(e));
                    woke = true;
                    if body_len == 0 {
                        continue;
                    }
                    s.partial = Some(Box::new(Partial {
                        body: Body::default(),
                        need: body_len,
                        payload_len,
                        nrefs,
                        fds: Vec::new(),
                        discard: true,
                        counted: 0,
                    }));
                    continue;
                }
                debug_assert!(!discarding);
                s.partial = Some(Box::new(Partial {
                    body: Body::with_len(
                        body_len,
                        DIRECT_BODY_MIN.min(self.local.max_frame_size as usize),
                        &self.reserved,
                        self.budget.max,
                    ),
                    need: body_len,
                    payload_len,
                    nrefs,
                    fds,
                    discard: false,
                    counted: MESSAGE_HEADER_LEN,
                }));
            }
            self.messages_in += s.msgs.len().saturating_sub(queued_before);
        }
        // A large body continues: its next frame may go straight into it.
        self.expect_header = body_continues(s);
        // The session total is settled by `handle_frame` after this frame; judge the
        // exemption on what it was before plus this frame.
        self.settle_rx(id, len, woke, pins);
        if fin {
            self.end_rx(id, RxState::Fin)?;
        }
        Ok(())
    }
}

/// Large pieces referenced by a [`Batch`]: each goes on the wire right before the byte
/// of the batch buffer at its offset.
#[derive(Debug, Default)]
struct Refs {
    list: Vec<(usize, Bytes)>,
    len: usize,
}

/// One batch of frames to write, filled by [`Mux::poll_transmit_batch`]: frame headers
/// and small pieces copied into one buffer, message pieces of at least
/// [`BY_REFERENCE`](Batch::BY_REFERENCE) bytes referenced where they are (no copy), for a
/// vectored write — or, made with [`Batch::copying`], everything copied into one buffer.
#[derive(Debug)]
pub struct Batch {
    buf: BytesMut,
    refs: Refs,
    by_reference: bool,
}

impl Batch {
    /// Pieces at least this long are referenced instead of copied.
    pub const BY_REFERENCE: usize = 4096;

    /// An empty batch whose copy buffer starts with `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Batch {
            buf: BytesMut::with_capacity(capacity),
            refs: Refs::default(),
            by_reference: true,
        }
    }

    /// An empty batch that copies every piece, so that it is always one buffer (for a
    /// link that does not write vectored).
    ///
    /// ```
    /// use libchan_core::mux::{Batch, Mux, Role};
    /// use libchan_core::Limits;
    /// let mut a = Mux::new(Role::Dialer, Limits::default(), vec!["cbor".into()]);
    /// let mut batch = Batch::copying(1024);
    /// a.poll_transmit_batch(&mut batch, &mut Vec::new(), 1 << 16);
    /// let mut pieces = std::collections::VecDeque::new();
    /// batch.take_pieces(&mut pieces);
    /// assert_eq!(pieces.len(), 1);
    /// ```
    pub fn copying(capacity: usize) -> Self {
        Batch {
            by_reference: false,
            ..Batch::new(capacity)
        }
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.buf.len() + self.refs.len
    }

    /// True if the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the batch's bytes to the end of `into`, in wire order, leaving the batch empty.
    /// The copy buffer's allocation is reused by the next batch once those pieces are
    /// dropped.
    pub fn take_pieces(&mut self, into: &mut VecDeque<Bytes>) {
        let mut copied = self.buf.split().freeze();
        let mut at = 0;
        for (offset, piece) in self.refs.list.drain(..) {
            if offset > at {
                into.push_back(copied.split_to(offset - at));
                at = offset;
            }
            into.push_back(piece);
        }
        if !copied.is_empty() {
            into.push_back(copied);
        }
        self.refs.len = 0;
    }
}

/// The session-wide receive budget (docs/PROTOCOL.md §6): bytes held for the application
/// over all streams, and which stream's partial message may grow beyond its window.
#[derive(Debug)]
struct Budget {
    /// Queued messages and bytes, and partially received messages, over all streams.
    held: usize,
    /// `max_session_buffer`.
    max: usize,
    /// The one stream whose partial message keeps growing beyond its window while `held`
    /// exceeds `max`, until the application took that message (so one can always complete).
    priority: Option<u32>,
    /// Streams denied that growth; reconsidered when it is allowed again.
    starved: Vec<u32>,
}

impl Budget {
    /// Whether stream `id`'s partial head message may grow beyond the window, given
    /// `extra` bytes about to be added.
    fn exempt(&mut self, id: u32, s: &Stream, extra: usize) -> bool {
        if self.priority == Some(id) && s.msgs.is_empty() && s.partial.is_none() {
            // Its message beyond the budget was taken: another stream may go next.
            self.priority = None;
        }
        if s.partial.is_none() {
            return false;
        }
        if self.held + extra <= self.max {
            return true;
        }
        match self.priority {
            Some(p) if p == id => true,
            Some(_) => {
                if !self.starved.contains(&id) {
                    self.starved.push(id);
                }
                false
            }
            None => {
                self.priority = Some(id);
                true
            }
        }
    }

    /// Starved streams to reconsider now, if any may grow again.
    fn take_starved(&mut self) -> Vec<u32> {
        if self.starved.is_empty() || (self.held > self.max && self.priority.is_some()) {
            return Vec::new();
        }
        std::mem::take(&mut self.starved)
    }

    fn forget(&mut self, id: u32) {
        if self.priority == Some(id) {
            self.priority = None;
        }
    }
}

/// Bytes a stream holds for the application.
fn held(s: &Stream) -> usize {
    s.buffered + s.partial.as_ref().map_or(0, |p| p.counted)
}

fn pin(pins: &mut Vec<u32>, item: &RecvItem) {
    if let Ok(m) = item {
        for r in m.refs() {
            if r.kind == RefKind::Sender {
                pins.push(r.id);
            }
        }
    }
}

/// Pieces of a read buffer smaller than this are copied out before they are held for the
/// application. A held slice keeps its whole read buffer (128 KiB) alive, so a peer could
/// otherwise pin a buffer per few bytes it makes us hold, far beyond what the flow-control
/// windows and the session budget count; with the copy, what is held is at most a few
/// times what is counted.
const UNPIN_BELOW: usize = 32 * 1024;

/// Takes the first `n` bytes of `buf` as with `split_to`, copying them out when they are
/// few (see [`UNPIN_BELOW`]) without first making a shared slice of the read buffer.
fn take_unpinned(buf: &mut Bytes, n: usize) -> Bytes {
    if n < UNPIN_BELOW {
        let piece = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        piece
    } else {
        buf.split_to(n)
    }
}

/// Most bytes of small messages copied out of the read buffer together: the copy stays
/// until the last of them is dropped, and a small one is cheap and stays in cache
/// (`stream` ran as fast as with whole frames, `channels` too).
const SMALL_RUN_MAX: usize = 4096;

/// Length and number of the whole messages at the start of `payload` (at most
/// [`SMALL_RUN_MAX`] bytes) whose bodies are under [`UNPIN_BELOW`] and within `limits`
/// (max_message_size, max_refs_per_message, max_fds_per_message), if there are at least
/// two; else `(0, 0)`.
fn small_run(payload: &[u8], limits: (usize, usize, usize)) -> (usize, usize) {
    let (max_msg, max_refs, max_fds) = limits;
    let (mut at, mut n) = (0, 0);
    while payload.len() - at >= MESSAGE_HEADER_LEN {
        let (payload_len, nrefs, nfds) = message_header(&payload[at..at + MESSAGE_HEADER_LEN]);
        let body = payload_len.saturating_add(nrefs * REF_LEN);
        if body >= UNPIN_BELOW
            || body > payload.len() - at - MESSAGE_HEADER_LEN
            || MESSAGE_HEADER_LEN + body > max_msg
            || nrefs > max_refs
            || nfds > max_fds
        {
            break;
        }
        if at + MESSAGE_HEADER_LEN + body > SMALL_RUN_MAX {
            break;
        }
        at += MESSAGE_HEADER_LEN + body;
        n += 1;
    }
    if n >= 2 {
        (at, n)
    } else {
        (0, 0)
    }
}

fn unpin(piece: Bytes) -> Bytes {
    if piece.len() < UNPIN_BELOW {
        Bytes::copy_from_slice(&piece)
    } else {
        piece
    }
}

/// The body of a message that spans DATA frames, collected without copying large pieces
/// (each stays a slice of its read buffer) and joined once, at its exact size, when
/// complete: growing one buffer would copy the body again at every doubling.
///
/// A large body (at least [`DIRECT_BODY_MIN`]) instead gets its final buffer at once
/// (`dest`): what arrives through the read buffer is copied into it, and the rest the
/// driver reads straight into it ([`Mux::next_read`]), so that most of its bytes are
/// copied once, by the kernel.
#[derive(Default)]
struct Body {
    pieces: Vec<Bytes>,
    /// Small pieces, copied (see [`UNPIN_BELOW`]), since the last large one.
    tail: BytesMut,
    len: usize,
    /// The whole body's buffer, for a large body; taken out while the driver reads into it.
    dest: Option<BytesMut>,
    /// Counts `dest`'s capacity against the session's direct-read reserve.
    _reserved: Option<Reserved>,
}

/// Capacity of message buffers allocated ahead of their bytes, counted against
/// `max_session_buffer` and released when the buffer is complete or dropped.
struct Reserved {
    n: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::Relaxed);
    }
}

impl Body {
    /// A body of `len` bytes that gets its buffer at once if it is at least `min` bytes
    /// and the reserve (`total`, at most `max`) allows.
    fn with_len(len: usize, min: usize, total: &Arc<AtomicUsize>, max: usize) -> Body {
        if len < min {
            return Body::default();
        }
        let now = total.fetch_add(len, Ordering::Relaxed);
        let reserved = Reserved {
            n: len,
            total: total.clone(),
        };
        if now + len > max {
            drop(reserved);
            return Body::default();
        }
        Body {
            dest: Some(BytesMut::with_capacity(len)),
            _reserved: Some(reserved),
            ..Body::default()
        }
    }

    fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        if let Some(d) = &mut self.dest {
            d.extend_from_slice(&piece);
            return;
        }
        if piece.len() < UNPIN_BELOW {
            self.tail.extend_from_slice(&piece);
        } else {
            if !self.tail.is_empty() {
                self.pieces.push(self.tail.split().freeze());
            }
            self.pieces.push(piece);
        }
    }

    fn join(mut self) -> Bytes {
        if let Some(d) = self.dest.take() {
            return d.freeze();
        }
        if !self.tail.is_empty() {
            self.pieces.push(self.tail.freeze());
        }
        if self.pieces.len() == 1 {
            return self.pieces.pop().expect("one piece");
        }
        let mut body = BytesMut::with_capacity(self.len);
        for p in &self.pieces {
            body.extend_from_slice(p);
        }
        body.freeze()
    }
}

/// Joins a body buffer split around a frame's part ([`Mux::next_read`]): what came
/// before (full), the part (full, unless the direct read is given up), the room after.
/// Each join only moves the end of one buffer to the next when its left side is full.
fn join_parts(mut head: BytesMut, part: Option<BytesMut>, after: BytesMut) -> BytesMut {
    if let Some(part) = part {
        head.unsplit(part);
    }
    head.unsplit(after);
    head
}

/// True if `s` is receiving a large body (one with its buffer allocated ahead) that
/// still needs enough bytes for a direct read ([`DIRECT_MIN_READ`]).
fn body_continues(s: &Stream) -> bool {
    s.partial
        .as_ref()
        .is_some_and(|p| p.body.dest.is_some() && p.need >= DIRECT_MIN_READ)
}

/// Puts a DATA frame header in front of the input in `buf` (empty, normally: input is
/// all consumed when a frame's payload goes straight into a body).
fn prepend_data_header(buf: &mut BytesMut, stream: u32, len: usize, fin: bool) {
    if buf.is_empty() {
        frame::encode_data_header(buf, stream, len, fin);
        return;
    }
    let mut h = BytesMut::with_capacity(frame::HEADER_LEN + buf.len());
    frame::encode_data_header(&mut h, stream, len, fin);
    h.extend_from_slice(buf);
    *buf = h;
}

/// The partial message of `s` is complete: queues it, unless it is being skipped. True
/// if a message (or its decode error) was queued.
fn finish_partial(s: &mut Stream, pins: &mut Vec<u32>) -> bool {
    let p = *s.partial.take().expect("a partial message");
    if p.discard {
        return false;
    }
    s.buffered += MESSAGE_HEADER_LEN + p.body.len;
    let item = complete(p.body.join(), p.payload_len, p.nrefs, p.fds).inspect_err(|_| {
        s.buffered -= MESSAGE_HEADER_LEN + p.payload_len + p.nrefs * REF_LEN;
    });
    pin(pins, &item);
    s.msgs.push_back(item);
    true
}

fn complete(body: Bytes, payload_len: usize, nrefs: usize, fds: Vec<OwnedFd>) -> RecvItem {
    let mut payload = body;
    if nrefs == 0 {
        // No table to split off (a split would allocate a shared handle for the empty tail).
        return Ok(Queued::new(payload, Vec::new(), fds));
    }
    let table = payload.split_off(payload_len);
    if nrefs == 1 && fds.is_empty() && table.len() == REF_LEN {
        let r = parse_ref(&table, 0)?;
        return Ok(Queued {
            payload,
            extra: Extra::OneRef(r),
        });
    }
    let mut refs = Vec::with_capacity(nrefs);
    for r in table.chunks_exact(REF_LEN) {
        refs.push(parse_ref(r, fds.len())?);
    }
    Ok(Queued::new(payload, refs, fds))
}

/// One entry of a reference table (docs/PROTOCOL.md §7, `REF_LEN` bytes), checked
/// against the `nfds` descriptors of its message.
fn parse_ref(r: &[u8], nfds: usize) -> Result<WireRef, Error> {
    let Some(kind) = RefKind::from_code(r[0]) else {
        return Err(Error::decode(format!("unknown reference kind {}", r[0])));
    };
    let id = u32::from_be_bytes([r[1], r[2], r[3], r[4]]);
    if kind == RefKind::Fd && id as usize >= nfds {
        return Err(Error::decode(format!(
            "fd reference {id} but the message carries {nfds} descriptors"
        )));
    }
    Ok(WireRef { kind, id })
}

#[cfg(test)]
mod tests {
    use super::{Queue, Queued, RecvItem};

    #[test]
    fn a_queued_message_stays_small() {
        // A stream holds up to a window of them.
        assert!(std::mem::size_of::<Queued>() <= 48);
        assert!(std::mem::size_of::<RecvItem>() <= 48);
    }

    /// Drains `q` front to back.
    fn drained(q: &mut Queue<u32>) -> Vec<u32> {
        std::iter::from_fn(|| q.pop_front()).collect()
    }

    #[test]
    fn a_queue_keeps_order_through_lone_and_shared_storage() {
        let mut q = Queue::default();
        assert!(q.is_empty());
        q.push_back(1);
        assert_eq!(q.front(), Some(&1));
        assert_eq!(q.rest.capacity(), 0, "a lone item allocates nothing");
        q.push_back(2);
        q.push_back(3);
        *q.back_mut().expect("three items") += 10;
        *q.front_mut().expect("three items") += 100;
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [101, 2, 13]);
        assert_eq!(q.pop_front(), Some(101));
        q.push_back(4);
        assert_eq!(drained(&mut q), [2, 13, 4]);
        assert!(q.is_empty());
        // Emptied, the next lone item is kept in place again, before any later ones.
        q.push_back(5);
        assert!(q.lone.is_some());
        q.push_back(6);
        assert_eq!(q.front(), Some(&5));
        assert_eq!(q.into_iter().collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn a_queue_reserves_only_for_more_than_one_item() {
        let mut q: Queue<u32> = Queue::default();
        q.reserve(1);
        assert_eq!(q.rest.capacity(), 0);
        q.reserve(3);
        assert!(q.rest.capacity() >= 3);
        q.push_back(1);
        q.reserve(1);
        assert!(q.rest.capacity() >= 2);
        q.clear();
        assert!(q.is_empty() && q.front().is_none() && q.back_mut().is_none());
    }
}
