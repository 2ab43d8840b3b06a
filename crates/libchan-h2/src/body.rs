//! Outgoing HTTP/2 bodies: a queue of whole libchan frames per HTTP/2 stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Small frames are coalesced into HTTP/2 DATA frames of up to this many bytes.
const COALESCE: usize = 16 * 1024;

#[derive(Default)]
struct Inner {
    frames: VecDeque<Bytes>,
    bytes: usize,
    ended: bool,
    /// The body was dropped (stream reset, connection gone): pushes are discarded.
    dropped: bool,
    waker: Option<Waker>,
    /// Client side (libchan drives h2's client itself): the HTTP/2 stream the frames go
    /// to, fed by the connection's task through `flusher`.
    sink: Option<Sink>,
}

struct Sink {
    stream: h2::SendStream<Bytes>,
    flusher: Arc<Flusher>,
    /// Listed in the flusher's queues to feed.
    listed: bool,
    /// The stream's end was sent.
    end_sent: bool,
}

/// The queues of one HTTP/2 connection with frames for h2, fed into h2 by the task that
/// drives the connection (right before it polls the connection, which writes them): h2's
/// lock is then taken by that task alone, and everything queued since its last turn
/// leaves in one write.
#[derive(Default)]
pub(crate) struct Flusher {
    state: Mutex<FlusherState>,
}

#[derive(Default)]
struct FlusherState {
    listed: Vec<Arc<OutQueue>>,
    waker: Option<Waker>,
    /// The connection's task is gone: nothing is fed any more (and nothing is kept, which
    /// would tie queues and flusher in a cycle).
    closed: bool,
}

impl Flusher {
    fn lock(&self) -> MutexGuard<'_, FlusherState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list(&self, q: Arc<OutQueue>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.listed.push(q);
        let w = st.waker.take();
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Registers the connection's task and hands h2 what the listed queues hold; true if
    /// there was any (poll the connection again).
    pub(crate) fn feed(&self, cx: &mut Context<'_>) -> bool {
        let listed = {
            let mut st = self.lock();
            st.waker = Some(cx.waker().clone());
            std::mem::take(&mut st.listed)
        };
        let any = !listed.is_empty();
        for q in listed {
            q.feed();
        }
        any
    }

    /// The connection's task ends: drops what is listed, and lists nothing from now on.
    pub(crate) fn close(&self) {
        let listed = {
            let mut st = self.lock();
            st.closed = true;
            st.waker = None;
            std::mem::take(&mut st.listed)
        };
        drop(listed);
    }
}

/// The frames queued for one direction of one HTTP/2 stream.
#[derive(Default)]
pub(crate) struct OutQueue {
    inner: Mutex<Inner>,
}

impl fmt::Debug for OutQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("OutQueue")
            .field("frames", &g.frames.len())
            .field("bytes", &g.bytes)
            .field("ended", &g.ended)
            .finish()
    }
}

impl OutQueue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on the queue feeds `stream` (what it holds, then every frame pushed),
    /// through `flusher`, the connection's.
    pub(crate) fn attach(self: &Arc<Self>, stream: h2::SendStream<Bytes>, flusher: &Arc<Flusher>) {
        let mut g = self.lock();
        if g.dropped {
            return;
        }
        g.sink = Some(Sink {
            stream,
            flusher: flusher.clone(),
            listed: false,
            end_sent: false,
        });
        // What was queued before, and an end already asked for, go out on its turn.
        self.list(g);
    }

    /// Hands what is queued to h2 (the connection's task, through its flusher).
    fn feed(&self) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(sink) = g.sink.as_mut() else {
            return;
        };
        sink.listed = false;
        if g.dropped {
            return;
        }
        g.bytes = 0;
        while let Some(f) = g.frames.pop_front() {
            // h2 keeps what its flow control does not let out yet; libchan's credit
            // bounds that (docs/PROTOCOL.md §14).
            if sink.stream.send_data(f, false).is_err() {
                // The stream was reset or the connection is gone.
                g.dropped = true;
                g.frames.clear();
                return;
            }
        }
        if g.ended && !sink.end_sent {
            sink.end_sent = true;
            let _ = sink.stream.send_data(Bytes::new(), true);
        }
    }

    /// Lists the queue with its connection's flusher, if it feeds h2 and is not listed.
    fn list(self: &Arc<Self>, mut g: MutexGuard<'_, Inner>) {
        let Some(sink) = g.sink.as_mut() else {
            return;
        };
        if sink.listed {
            return;
        }
        sink.listed = true;
        let flusher = sink.flusher.clone();
        drop(g);
        flusher.list(self.clone());
    }

    /// Queues a frame. Ignored after [`end`](OutQueue::end) or once the body is gone.
    pub(crate) fn push(self: &Arc<Self>, frame: Bytes) {
        let mut g = self.lock();
        if g.ended || g.dropped {
            return;
        }
        g.bytes += frame.len();
        g.frames.push_back(frame);
        if g.sink.is_some() {
            return self.list(g);
        }
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    /// Ends the body once what is queued has been sent.
    pub(crate) fn end(self: &Arc<Self>) {
        let mut g = self.lock();
        if g.ended {
            return;
        }
        g.ended = true;
        if g.sink.is_some() {
            return self.list(g);
        }
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }
}

/// The body of a libchan HTTP/2 request or response: the frames of one libchan stream (or
/// of the session's control stream), or a short fixed text (refusals).
pub struct OutBody {
    kind: Kind,
}

enum Kind {
    Stream(Arc<OutQueue>),
    Full(Option<Bytes>),
}

impl fmt::Debug for OutBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Stream(q) => f.debug_tuple("OutBody").field(q).finish(),
            Kind::Full(b) => f.debug_tuple("OutBody").field(b).finish(),
        }
    }
}

impl OutBody {
    pub(crate) fn stream(q: Arc<OutQueue>) -> Self {
        OutBody {
            kind: Kind::Stream(q),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        OutBody {
            kind: Kind::Full(None),
        }
    }

    /// A body of fixed bytes (used for refusals and errors).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        OutBody {
            kind: Kind::Full(Some(bytes.into())),
        }
    }
}

impl Drop for OutBody {
    fn drop(&mut self) {
        if let Kind::Stream(q) = &self.kind {
            let mut g = q.lock();
            g.dropped = true;
            g.frames.clear();
            g.bytes = 0;
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(q) => {
                let mut g = q.lock();
                let Some(first) = g.frames.pop_front() else {
                    if g.ended {
                        return Poll::Ready(None);
                    }
                    g.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                };
                let mut out = first;
                if out.len() < COALESCE && g.frames.front().is_some_and(|f| f.len() < COALESCE) {
                    let mut buf = BytesMut::with_capacity(COALESCE * 2);
                    buf.extend_from_slice(&out);
                    while let Some(f) = g.frames.front() {
                        if buf.len() + f.len() > COALESCE * 2 {
                            break;
                        }
                        buf.extend_from_slice(f);
                        g.frames.pop_front();
                    }
                    out = buf.freeze();
                }
                g.bytes -= out.len();
                Poll::Ready(Some(Ok(Frame::data(out))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}
