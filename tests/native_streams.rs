//! The stream-provider seam, shown with a transport written only against the public
//! `Connection` trait: in-process "native streams" (as HTTP/2 or QUIC would provide), one
//! pair of queues per stream and no multiplexer. The whole conformance suite runs over it,
//! descriptors included (they move as values in-process).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libchan::frame::StreamKind;
use libchan::message::{InMessage, OpenedStreams, OutMessage, OutRef, RefKind, WireRef};
use libchan::{Connection, ConnectionStats, Error, ErrorKind, Session};
use libchan_test_support::Caps;

/// Messages a stream direction buffers before `poll_send_ready` waits.
const MSG_CAP: usize = 64;
/// Bytes a byte-stream direction buffers before `poll_write` waits.
const BYTE_CAP: usize = 256 * 1024;

#[derive(Default)]
struct Dir {
    msgs: VecDeque<InMessage>,
    bytes: VecDeque<u8>,
    /// `Some(None)`: clean end; `Some(Some(m))`: ended with error `m`.
    end: Option<Option<String>>,
    error_reported: bool,
    reader_gone: bool,
    /// The reader took the clean end: delivery is confirmed.
    end_taken: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Dir {
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

struct NStream {
    kind: StreamKind,
    opener: usize,
    parent: u32,
    claimed: bool,
    held: [bool; 2],
    /// `dirs[s]`: data flowing to side `s`.
    dirs: [Dir; 2],
    pins: [u32; 2],
}

#[derive(Default)]
struct World {
    streams: HashMap<u32, NStream>,
    next: [u32; 2],
    accept: [VecDeque<u32>; 2],
    accept_waker: [Option<Waker>; 2],
    lost: Option<Error>,
    closing: bool,
}

impl World {
    fn wake_all(&mut self) {
        for w in self.accept_waker.iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
        for s in self.streams.values_mut() {
            s.dirs[0].wake();
            s.dirs[1].wake();
        }
    }

    fn maybe_remove(&mut self, id: u32) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.claimed && !s.held[0] && !s.held[1] && s.pins == [0, 0])
        {
            self.streams.remove(&id);
        }
    }

    fn new_stream(&mut self, side: usize, kind: StreamKind, parent: u32) -> u32 {
        let id = self.next[side];
        self.next[side] += 2;
        self.streams.insert(
            id,
            NStream {
                kind,
                opener: side,
                parent,
                claimed: false,
                held: [side == 0, side == 1],
                dirs: [Dir::default(), Dir::default()],
                pins: [0, 0],
            },
        );
        id
    }
}

#[derive(Debug)]
struct NativeConn {
    world: Arc<Mutex<World>>,
    side: usize,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("streams", &self.streams.len())
            .finish()
    }
}

fn native_pair() -> (NativeConn, NativeConn) {
    let world = Arc::new(Mutex::new(World {
        next: [1, 2],
        ..World::default()
    }));
    (
        NativeConn {
            world: world.clone(),
            side: 0,
        },
        NativeConn { world, side: 1 },
    )
}

/// The session's last handle is gone: the channels the peer opened that nobody accepted
/// can never be accepted now, so they end (the peer's sender sees its channel closed).
impl Drop for NativeConn {
    fn drop(&mut self) {
        let pending: Vec<u32> = self.w().accept[self.side].drain(..).collect();
        for id in pending {
            if let Some(s) = self.w().streams.get_mut(&id) {
                s.claimed = true;
                s.held[self.side] = true;
            }
            self.release(id);
        }
    }
}

impl NativeConn {
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn other(&self) -> usize {
        1 - self.side
    }

    fn reset() -> Error {
        Error::new(ErrorKind::Reset, "the other end is gone")
    }
}

impl Connection for NativeConn {
    fn codec(&self) -> &str {
        "cbor"
    }

    fn can_pass_fds(&self) -> bool {
        true
    }

    fn is_local(&self, id: u32) -> bool {
        (id % 2 == 1) == (self.side == 0)
    }

    fn open(&self, kind: StreamKind) -> Result<u32, Error> {
        let mut w = self.w();
        if let Some(e) = &w.lost {
            return Err(e.clone());
        }
        if w.closing {
            return Err(Error::new(ErrorKind::Closed, "session is closing"));
        }
        let id = w.new_stream(self.side, kind, 0);
        let other = self.other();
        w.accept[other].push_back(id);
        if let Some(wk) = w.accept_waker[other].take() {
            wk.wake();
        }
        Ok(id)
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u32>, Error>> {
        let mut w = self.w();
        if let Some(id) = w.accept[self.side].pop_front() {
            if let Some(s) = w.streams.get_mut(&id) {
                s.claimed = true;
                s.held[self.side] = true;
            }
            return Poll::Ready(Ok(Some(id)));
        }
        if w.closing {
            return Poll::Ready(Ok(None));
        }
        if let Some(e) = &w.lost {
            return Poll::Ready(Err(e.clone()));
        }
        w.accept_waker[self.side] = Some(cx.waker().clone());
        Poll::Pending
    }

    fn claim(&self, parent: u32, id: u32, kind: StreamKind) -> Result<(), Error> {
        let mut w = self.w();
        let other = self.other();
        match w.streams.get_mut(&id) {
            Some(s) if !s.claimed && s.parent == parent && s.kind == kind && s.opener == other => {
                s.claimed = true;
                s.held[self.side] = true;
                Ok(())
            }
            _ => Err(Error::new(
                ErrorKind::Decode,
                format!("reference to stream {id} does not match"),
            )),
        }
    }

    fn poll_send_ready(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        let mut w = self.w();
        if let Some(e) = &w.lost {
            return Poll::Ready(Err(e.clone()));
        }
        let other = self.other();
        let Some(s) = w.streams.get_mut(&id) else {
            return Poll::Ready(Err(Error::new(ErrorKind::Closed, "stream is closed")));
        };
        let d = &mut s.dirs[other];
        if d.reader_gone {
            return Poll::Ready(Err(Self::reset()));
        }
        if d.end.is_some() {
            return Poll::Ready(Err(Error::new(ErrorKind::Closed, "already closed")));
        }
        if d.msgs.len() < MSG_CAP {
            return Poll::Ready(Ok(()));
        }
        d.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn send_message(&self, id: u32, mut msg: OutMessage) -> Result<OpenedStreams, Error> {
        let mut w = self.w();
        if let Some(e) = &w.lost {
            return Err(e.clone());
        }
        let (me, other) = (self.side, self.other());
        match w.streams.get(&id) {
            Some(s) if !s.dirs[other].reader_gone => {}
            Some(_) => return Err(Self::reset()),
            None => return Err(Error::new(ErrorKind::Closed, "stream is closed")),
        }
        let mut ids = OpenedStreams::new();
        for i in 0..msg.refs().len() {
            match msg.refs()[i] {
                OutRef::New(kind) => {
                    let sk = match kind {
                        RefKind::Sender => StreamKind::OpenerReceives,
                        RefKind::Receiver => StreamKind::OpenerSends,
                        _ => StreamKind::Bytes,
                    };
                    let nid = w.new_stream(me, sk, id);
                    msg.set_ref_id(i, nid);
                    ids.push(nid);
                }
                OutRef::Existing(WireRef {
                    kind: RefKind::Sender,
                    id: sid,
                }) => {
                    // A Sender sent back to its creator: its stream must outlive the
                    // message (see PROTOCOL.md §7, "Sent back").
                    if let Some(t) = w.streams.get_mut(&sid) {
                        t.pins[other] += 1;
                    }
                }
                OutRef::Existing(_) => {}
            }
        }
        let m = InMessage {
            payload: Bytes::copy_from_slice(&msg.payload()),
            refs: msg.wire_refs(),
            fds: msg.take_fds(),
        };
        let d = &mut w.streams.get_mut(&id).expect("checked").dirs[other];
        d.msgs.push_back(m);
        d.wake();
        Ok(ids)
    }

    fn poll_recv(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<Option<InMessage>, Error>> {
        let mut w = self.w();
        let lost = w.lost.clone();
        let me = self.side;
        let Some(s) = w.streams.get_mut(&id) else {
            return Poll::Ready(Ok(None));
        };
        let pinned = s.pins[me] > 0;
        let d = &mut s.dirs[me];
        if let Some(m) = d.msgs.pop_front() {
            d.wake();
            return Poll::Ready(Ok(Some(m)));
        }
        if pinned && lost.is_none() {
            d.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        match &d.end {
            Some(None) => {
                if !d.end_taken {
                    d.end_taken = true;
                    d.wake();
                }
                return Poll::Ready(Ok(None));
            }
            Some(Some(m)) => {
                if d.error_reported {
                    return Poll::Ready(Ok(None));
                }
                d.error_reported = true;
                return Poll::Ready(Err(Error::new(ErrorKind::Remote, m.clone())));
            }
            None => {}
        }
        if let Some(e) = lost {
            return Poll::Ready(Err(e));
        }
        d.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        id: u32,
        buf: &mut [u8],
    ) -> Poll<Result<usize, Error>> {
        let mut w = self.w();
        let lost = w.lost.clone();
        let me = self.side;
        let Some(s) = w.streams.get_mut(&id) else {
            return Poll::Ready(Ok(0));
        };
        let d = &mut s.dirs[me];
        if !d.bytes.is_empty() {
            let n = buf.len().min(d.bytes.len());
            for (dst, src) in buf.iter_mut().zip(d.bytes.drain(..n)) {
                *dst = src;
            }
            d.wake();
            return Poll::Ready(Ok(n));
        }
        if d.end.is_some() {
            return Poll::Ready(Ok(0));
        }
        if let Some(e) = lost {
            return Poll::Ready(Err(e));
        }
        d.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_write(&self, cx: &mut Context<'_>, id: u32, buf: &[u8]) -> Poll<Result<usize, Error>> {
        let mut w = self.w();
        if let Some(e) = &w.lost {
            return Poll::Ready(Err(e.clone()));
        }
        let other = self.other();
        let Some(s) = w.streams.get_mut(&id) else {
            return Poll::Ready(Err(Error::new(ErrorKind::Closed, "stream is closed")));
        };
        let d = &mut s.dirs[other];
        if d.reader_gone {
            return Poll::Ready(Err(Self::reset()));
        }
        if d.end.is_some() {
            return Poll::Ready(Err(Error::new(ErrorKind::Closed, "write after shutdown")));
        }
        let room = BYTE_CAP.saturating_sub(d.bytes.len());
        if room == 0 {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        d.bytes.extend(&buf[..n]);
        d.wake();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&self, _cx: &mut Context<'_>, _id: u32) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_delivered(&self, cx: &mut Context<'_>, id: u32) -> Poll<Result<(), Error>> {
        let mut w = self.w();
        let lost = w.lost.clone();
        let other = self.other();
        let Some(s) = w.streams.get_mut(&id) else {
            return Poll::Ready(Err(Error::new(ErrorKind::Closed, "stream forgotten")));
        };
        let d = &mut s.dirs[other];
        if d.end_taken {
            return Poll::Ready(Ok(()));
        }
        if d.reader_gone {
            return Poll::Ready(Err(Error::new(
                ErrorKind::Reset,
                "the receiver was dropped before it took the end",
            )));
        }
        if let Some(e) = lost {
            return Poll::Ready(Err(e));
        }
        d.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_send_closed(&self, cx: &mut Context<'_>, id: u32) -> Poll<()> {
        let mut w = self.w();
        if w.lost.is_some() {
            return Poll::Ready(());
        }
        let other = self.other();
        match w.streams.get_mut(&id) {
            None => Poll::Ready(()),
            Some(s) if s.dirs[other].reader_gone => Poll::Ready(()),
            Some(s) => {
                s.dirs[other].writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn finish(&self, id: u32) {
        let other = self.other();
        let mut w = self.w();
        if w.lost.is_some() {
            return; // nothing reaches the peer any more
        }
        if let Some(s) = w.streams.get_mut(&id) {
            let d = &mut s.dirs[other];
            if d.end.is_none() {
                d.end = Some(None);
            }
            d.wake();
        }
    }

    fn close_with_error(&self, id: u32, message: &str) {
        let other = self.other();
        let mut w = self.w();
        if w.lost.is_some() {
            return;
        }
        if let Some(s) = w.streams.get_mut(&id) {
            let d = &mut s.dirs[other];
            if d.end.is_none() {
                d.end = Some(Some(message.to_owned()));
            }
            d.wake();
        }
    }

    fn release(&self, id: u32) {
        let (me, other) = (self.side, self.other());
        let mut w = self.w();
        let lost = w.lost.clone();
        let mut dropped = Vec::new();
        if let Some(s) = w.streams.get_mut(&id) {
            s.held[me] = false;
            let mine = &mut s.dirs[me];
            mine.reader_gone = true;
            dropped.extend(mine.msgs.drain(..));
            mine.bytes.clear();
            mine.wake();
            let theirs = &mut s.dirs[other];
            if theirs.end.is_none() && lost.is_none() {
                theirs.end = Some(None);
            }
            theirs.wake();
        }
        drop(w);
        for m in dropped {
            self.release_refs(&m.refs);
        }
        self.w().maybe_remove(id);
    }

    fn release_refs(&self, refs: &[WireRef]) {
        let me = self.side;
        for r in refs {
            if r.kind == RefKind::Fd || r.kind == RefKind::ReturnedReceiver {
                continue;
            }
            if self.is_local(r.id) {
                if r.kind == RefKind::Sender {
                    let mut w = self.w();
                    if let Some(s) = w.streams.get_mut(&r.id) {
                        s.pins[me] = s.pins[me].saturating_sub(1);
                        s.dirs[me].wake();
                    }
                    w.maybe_remove(r.id);
                }
                continue;
            }
            let unclaimed = self.w().streams.get(&r.id).is_some_and(|s| !s.claimed);
            if unclaimed {
                if let Some(s) = self.w().streams.get_mut(&r.id) {
                    s.claimed = true;
                    s.held[me] = true;
                }
                self.release(r.id);
            }
        }
    }

    fn close(&self) {
        let mut w = self.w();
        w.closing = true;
        w.wake_all();
    }

    fn abort(&self) {
        let mut w = self.w();
        w.lost = Some(Error::new(ErrorKind::ConnectionLost, "connection aborted"));
        w.wake_all();
    }

    fn error(&self) -> Option<Error> {
        self.w().lost.clone()
    }

    fn stats(&self) -> ConnectionStats {
        let w = self.w();
        let mut s = ConnectionStats::default();
        s.streams = w.streams.len();
        s.pending_accepts = w.accept[self.side].len();
        s
    }
}

async fn native_sessions() -> (Session, Session) {
    let (x, y) = native_pair();
    let config = libchan::config();
    (
        Session::over_connection(Box::new(x), &config).expect("a"),
        Session::over_connection(Box::new(y), &config).expect("b"),
    )
}

libchan_test_support::conformance!(
    native,
    native_sessions,
    Caps {
        fds: true,
        loss: true
    }
);
