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
    /// Client side: the HTTP/2 stream the frames go to directly (no body task between).
    sink: Option<h2::SendStream<Bytes>>,
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

    /// From now on sends straight on `stream`: what is queued first, then every frame
    /// pushed (the client side, which drives its HTTP/2 streams itself).
    pub(crate) fn attach(&self, mut stream: h2::SendStream<Bytes>) {
        let mut g = self.lock();
        if g.dropped {
            return;
        }
        g.bytes = 0;
        let queued = std::mem::take(&mut g.frames);
        let mut ok = true;
        for f in queued {
            ok = ok && stream.send_data(f, false).is_ok();
        }
        if g.ended && ok {
            let _ = stream.send_data(Bytes::new(), true);
        }
        if !ok {
            g.dropped = true;
        }
        g.sink = Some(stream);
    }

    /// Queues a frame. Ignored after [`end`](OutQueue::end) or once the body is gone.
    pub(crate) fn push(&self, frame: Bytes) {
        let mut g = self.lock();
        if g.ended || g.dropped {
            return;
        }
        if let Some(s) = g.sink.as_mut() {
            // h2 keeps what its flow control does not let out yet; libchan's credit
            // bounds that (docs/PROTOCOL.md §14).
            if s.send_data(frame, false).is_err() {
                g.dropped = true; // the stream was reset or the connection is gone
            }
            return;
        }
        g.bytes += frame.len();
        g.frames.push_back(frame);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    /// Ends the body once what is queued has been sent.
    pub(crate) fn end(&self) {
        let mut g = self.lock();
        if g.ended {
            return;
        }
        g.ended = true;
        if !g.dropped {
            if let Some(s) = g.sink.as_mut() {
                let _ = s.send_data(Bytes::new(), true);
            }
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
