//! The message layout inside a channel stream.
//!
//! A channel stream carries a sequence of messages; DATA frames carry arbitrary slices of
//! that sequence, except that a message's 8-byte header never spans two frames.
//!
//! ```text
//! +-------------------+-------------+-------------+------------------+------------------------+
//! | payload_len (u32) | nrefs (u16) | nfds (u16)  | payload (codec)  | refs: nrefs x (kind u8,|
//! |                   |             |             |                  |        id u32)         |
//! +-------------------+-------------+-------------+------------------+------------------------+
//! ```

use std::borrow::Cow;
use std::fmt;
use std::os::fd::OwnedFd;

use bytes::Bytes;

thread_local! {
    /// An encoding buffer whose message went out by copy (see [`recycle_buffer`]).
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest encoding buffer kept per thread for the next message.
const SPARE_MAX: usize = 4096;

/// A buffer for encoding a message of about `hint` bytes: the thread's spare one when it
/// has one (its last small message's, copied into the outgoing frames), else a new one.
pub(crate) fn encode_buffer(hint: usize) -> Vec<u8> {
    let mut v = SPARE.with(|s| s.take());
    v.clear();
    v.reserve(hint);
    v
}

/// Keeps `buf` as the thread's spare encoding buffer if it is small.
pub(crate) fn recycle_buffer(buf: Vec<u8>) {
    if buf.capacity() <= SPARE_MAX {
        SPARE.with(|s| s.set(buf));
    }
}

/// Length of the fixed message header.
pub const MESSAGE_HEADER_LEN: usize = 8;
/// Length of one reference entry.
pub const REF_LEN: usize = 5;

/// What a reference in a message stands for, as seen by the message's receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefKind {
    /// A Sender: the receiver of the message sends on stream `id`.
    Sender,
    /// A Receiver: the receiver of the message receives on stream `id`.
    Receiver,
    /// A byte stream on stream `id`.
    ByteStream,
    /// A file descriptor passed with the message; `id` indexes the message's fds.
    Fd,
    /// A file descriptor carried as a byte stream on stream `id`.
    FdStream,
    /// A Receiver sent back to the side that created stream `id` (in the message
    /// receiver's namespace). The next entry is a [`RefKind::Receiver`] for a new stream
    /// that carries what the returning side had not delivered yet.
    ReturnedReceiver,
}

impl RefKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            RefKind::Sender => 1,
            RefKind::Receiver => 2,
            RefKind::ByteStream => 3,
            RefKind::Fd => 4,
            RefKind::FdStream => 5,
            RefKind::ReturnedReceiver => 6,
        }
    }

    /// Parses a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => RefKind::Sender,
            2 => RefKind::Receiver,
            3 => RefKind::ByteStream,
            4 => RefKind::Fd,
            5 => RefKind::FdStream,
            6 => RefKind::ReturnedReceiver,
            _ => return None,
        })
    }
}

/// One entry of a message's reference table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WireRef {
    /// What it stands for.
    pub kind: RefKind,
    /// A stream id, or for [`RefKind::Fd`] an index into the message's fds.
    pub id: u32,
}

/// A short list that keeps up to two items in place: a received message's reference
/// table ([`WireRefs`]) and the ids of the streams a queued message opened
/// ([`OpenedStreams`]). A request with its reply Sender allocates nothing for either.
///
/// ```
/// use libchan_core::message::{OpenedStreams, RefKind, WireRef, WireRefs};
/// let r = WireRef { kind: RefKind::Sender, id: 3 };
/// let refs: WireRefs = vec![r].into();
/// assert_eq!(&refs[..], &[r]);
/// let mut ids = OpenedStreams::new();
/// ids.push(3);
/// ids.push(5);
/// ids.push(7);
/// assert_eq!(&ids[..], &[3, 5, 7]);
/// assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![3, 5, 7]);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct InlineList<T>(smallvec::SmallVec<[T; 2]>);

/// A received message's reference table ([`InMessage::refs`]).
pub type WireRefs = InlineList<WireRef>;

/// The ids of the streams a queued message opened, one per [`OutRef::New`] reference, in
/// the order of its references ([`Connection::send_message`]).
///
/// [`Connection::send_message`]: crate::Connection::send_message
pub type OpenedStreams = InlineList<u32>;

impl<T> InlineList<T> {
    /// An empty list.
    pub fn new() -> Self {
        InlineList(smallvec::SmallVec::new())
    }

    /// Appends an item.
    pub fn push(&mut self, item: T) {
        self.0.push(item);
    }
}

impl<T> Default for InlineList<T> {
    fn default() -> Self {
        InlineList::new()
    }
}

impl<T: fmt::Debug> fmt::Debug for InlineList<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl<T> std::ops::Deref for InlineList<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T> From<Vec<T>> for InlineList<T> {
    fn from(v: Vec<T>) -> Self {
        InlineList(smallvec::SmallVec::from_vec(v))
    }
}

impl<T> FromIterator<T> for InlineList<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        InlineList(iter.into_iter().collect())
    }
}

impl<T> IntoIterator for InlineList<T> {
    type Item = T;
    type IntoIter = InlineListIter<T>;
    fn into_iter(self) -> InlineListIter<T> {
        InlineListIter(self.0.into_iter())
    }
}

/// The iterator of an [`InlineList`], by value.
pub struct InlineListIter<T>(smallvec::IntoIter<[T; 2]>);

impl<T: fmt::Debug> fmt::Debug for InlineListIter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.as_slice().iter()).finish()
    }
}

impl<T> Iterator for InlineListIter<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<T> ExactSizeIterator for InlineListIter<T> {}

/// A whole message received on a channel stream.
pub struct InMessage {
    /// The codec's bytes.
    pub payload: Bytes,
    /// The reference table.
    pub refs: WireRefs,
    /// Descriptors passed with the message.
    pub fds: Vec<OwnedFd>,
}

impl fmt::Debug for InMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMessage")
            .field("payload_len", &self.payload.len())
            .field("refs", &self.refs)
            .field("fds", &self.fds.len())
            .finish()
    }
}

/// A reference to put in an outgoing message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutRef {
    /// A stream the connection opens with the message (its id is assigned when queued).
    New(RefKind),
    /// An existing stream or fd index.
    Existing(WireRef),
}

/// One piece of an [`OutMessage`] in wire order.
enum Piece {
    /// A range of the buffer.
    Buf(std::ops::Range<usize>),
    /// The spliced blob at this index.
    Spliced(usize),
}

/// A message ready to be queued on a channel stream.
///
/// Built by the session layer: header, codec payload, reference table. Large
/// [`Blob`](crate::Blob)s in the payload may be held by reference (spliced) rather than
/// copied in; [`pieces`](OutMessage::pieces) yields the message's bytes in order either
/// way.
pub struct OutMessage {
    /// Header, payload and reference table, without the spliced blobs.
    pub(crate) buf: Vec<u8>,
    /// Blobs referenced instead of copied: (offset in `buf` where they go, bytes), in
    /// increasing offset order.
    pub(crate) splices: Vec<(usize, Bytes)>,
    pub(crate) payload_len: usize,
    pub(crate) refs: OutRefs,
    pub(crate) fds: Vec<OwnedFd>,
}

/// The references of a message being sent: usually none or one, kept inline.
pub(crate) type OutRefs = smallvec::SmallVec<[OutRef; 2]>;

impl fmt::Debug for OutMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutMessage")
            .field("len", &self.len())
            .field("spliced", &self.splices.len())
            .field("refs", &self.refs)
            .field("fds", &self.fds.len())
            .finish()
    }
}

impl OutMessage {
    /// Starts a message: returns a buffer with room for the header, to which the codec
    /// appends the payload.
    pub fn start(mut buf: Vec<u8>) -> Vec<u8> {
        buf.clear();
        buf.extend_from_slice(&[0; MESSAGE_HEADER_LEN]);
        buf
    }

    /// Finishes a message whose payload was appended to a buffer from [`OutMessage::start`].
    ///
    /// ```
    /// use libchan_core::message::OutMessage;
    /// let mut buf = OutMessage::start(Vec::new());
    /// buf.push(0xF6); // CBOR null
    /// let m = OutMessage::finish(buf, Vec::new(), Vec::new());
    /// assert_eq!(m.to_vec(), [0, 0, 0, 1, 0, 0, 0, 0, 0xF6]);
    /// ```
    pub fn finish(buf: Vec<u8>, refs: Vec<OutRef>, fds: Vec<OwnedFd>) -> OutMessage {
        Self::finish_spliced(buf, Vec::new(), OutRefs::from_vec(refs), fds)
    }

    /// [`finish`](OutMessage::finish) for a payload with spliced blobs (offsets in `buf`,
    /// increasing).
    pub(crate) fn finish_spliced(
        mut buf: Vec<u8>,
        splices: Vec<(usize, Bytes)>,
        refs: OutRefs,
        fds: Vec<OwnedFd>,
    ) -> OutMessage {
        debug_assert!(splices.windows(2).all(|w| w[0].0 <= w[1].0));
        let spliced: usize = splices.iter().map(|(_, b)| b.len()).sum();
        let payload_len = buf.len() - MESSAGE_HEADER_LEN + spliced;
        buf[0..4].copy_from_slice(&(payload_len as u32).to_be_bytes());
        buf[4..6].copy_from_slice(&(refs.len() as u16).to_be_bytes());
        buf[6..8].copy_from_slice(&(fds.len() as u16).to_be_bytes());
        for r in &refs {
            let (kind, id) = match r {
                OutRef::New(k) => (*k, 0),
                OutRef::Existing(w) => (w.kind, w.id),
            };
            buf.push(kind.code());
            buf.extend_from_slice(&id.to_be_bytes());
        }
        OutMessage {
            buf,
            splices,
            payload_len,
            refs,
            fds,
        }
    }

    /// Total length on the wire.
    pub fn len(&self) -> usize {
        self.buf.len() + self.splices.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// True if the message has no bytes (never the case for a finished message).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message as it goes on a channel stream (header, payload, references), as
    /// consecutive pieces: more than one where blobs are held by reference.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.layout().map(|p| match p {
            Piece::Buf(r) => &self.buf[r],
            Piece::Spliced(i) => &self.splices[i].1[..],
        })
    }

    /// The whole message in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in self.pieces() {
            v.extend_from_slice(p);
        }
        v
    }

    /// Moves the message out of `self`, leaving it empty.
    pub(crate) fn take(&mut self) -> OutMessage {
        OutMessage {
            buf: std::mem::take(&mut self.buf),
            splices: std::mem::take(&mut self.splices),
            payload_len: self.payload_len,
            refs: std::mem::take(&mut self.refs),
            fds: std::mem::take(&mut self.fds),
        }
    }

    /// The message's bytes as shared pieces in order (none empty), and its descriptors.
    pub(crate) fn into_shared_pieces(self) -> (Vec<Bytes>, Vec<OwnedFd>) {
        let layout: Vec<Piece> = self.layout().collect();
        let buf = Bytes::from(self.buf);
        let mut spliced: Vec<Option<Bytes>> =
            self.splices.into_iter().map(|(_, b)| Some(b)).collect();
        let out = layout
            .into_iter()
            .map(|p| match p {
                Piece::Buf(r) => buf.slice(r),
                Piece::Spliced(i) => spliced[i].take().expect("each splice once"),
            })
            .collect();
        (out, self.fds)
    }

    /// The order of the message's pieces: ranges of `buf` around the spliced blobs.
    fn layout(&self) -> impl Iterator<Item = Piece> + '_ {
        let mut at = 0;
        let mut next = self.splices.iter().enumerate();
        let mut pending: Option<usize> = None;
        std::iter::from_fn(move || loop {
            if let Some(i) = pending.take() {
                return Some(Piece::Spliced(i));
            }
            match next.next() {
                Some((i, (off, _))) => {
                    let r = at..*off;
                    at = *off;
                    pending = Some(i);
                    if !r.is_empty() {
                        return Some(Piece::Buf(r));
                    }
                }
                None if at < self.buf.len() => {
                    let r = at..self.buf.len();
                    at = self.buf.len();
                    return Some(Piece::Buf(r));
                }
                None => return None,
            }
        })
    }

    /// The codec payload's length.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The codec payload: borrowed, or joined into one buffer if blobs were spliced in.
    pub fn payload(&self) -> Cow<'_, [u8]> {
        let range = MESSAGE_HEADER_LEN..MESSAGE_HEADER_LEN + self.payload_len;
        if self.splices.is_empty() {
            return Cow::Borrowed(&self.buf[range]);
        }
        Cow::Owned(self.to_vec()[range].to_vec())
    }

    /// The references, in table order. [`OutRef::New`] entries need a stream opened by
    /// the connection, whose id it records with [`set_ref_id`](OutMessage::set_ref_id).
    pub fn refs(&self) -> &[OutRef] {
        &self.refs
    }

    /// Records the id of the stream opened for the reference at `index`.
    ///
    /// # Panics
    /// If `index` is out of range (a bug in the connection, never input from a peer).
    pub fn set_ref_id(&mut self, index: usize, id: u32) {
        assert!(index < self.refs.len(), "reference index out of range");
        self.patch_id(index, id);
    }

    /// The reference table as the receiver will see it (ids as recorded so far).
    pub fn wire_refs(&self) -> WireRefs {
        self.buf[self.table_at()..]
            .chunks_exact(REF_LEN)
            .filter_map(|r| {
                Some(WireRef {
                    kind: RefKind::from_code(r[0])?,
                    id: u32::from_be_bytes([r[1], r[2], r[3], r[4]]),
                })
            })
            .collect()
    }

    /// Takes the descriptors attached to the message.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// Where the reference table starts in `buf` (it is never spliced: it comes last).
    fn table_at(&self) -> usize {
        self.buf.len() - self.refs.len() * REF_LEN
    }

    /// Writes the id assigned to the reference at `index`.
    pub(crate) fn patch_id(&mut self, index: usize, id: u32) {
        let at = self.table_at() + index * REF_LEN + 1;
        self.buf[at..at + 4].copy_from_slice(&id.to_be_bytes());
    }
}
