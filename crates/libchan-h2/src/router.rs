//! The router: runs libchan's multiplexer over many HTTP/2 streams.
//!
//! The session's [`MuxConnection`](libchan_core::driver::MuxConnection) writes frames to
//! an [`H2Link`] as it would to a socket. The router puts every frame of libchan stream
//! *X* on the HTTP/2 stream of *X*, and the frames about the connection (HELLO, PING,
//! GOAWAY, and top-level OPENs from the server, which cannot open HTTP/2 streams) on the
//! session's control stream. The OPEN of a nested stream travels on its parent's HTTP/2
//! stream, just before the message that references it, so that order is kept where it
//! matters. Inbound, the session's reader polls every HTTP/2 body itself (no task per
//! stream: a frame goes from HTTP/2's connection task straight to the multiplexer's
//! reader) and hands whole frames to the multiplexer; frames of a stream whose OPEN has
//! not been handed over yet wait (and with them HTTP/2 flow control stops that stream).
//! See docs/PROTOCOL.md §14.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body::Body;
use libchan_core::driver::{Link, LinkRead, LinkWrite};
use libchan_core::frame::{FrameType, FLAG_FIN, HEADER_LEN};
use libchan_core::{PeerIdentity, Role};
use tokio::sync::watch;

use crate::body::OutQueue;
use crate::{Registry, CONTENT_TYPE, SESSION_HEADER, STREAM_HEADER};

/// Read at most this much from the inbound bodies per read call; a body is not polled
/// further while this much waits for the multiplexer.
const READ_BATCH: usize = 256 * 1024;

/// Where an inbound HTTP/2 body belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bind {
    Control,
    Stream(u32),
}

struct Route {
    /// Stream kind code from its OPEN (1, 2 channel; 3 bytes); 0 until known.
    kind: u8,
    out: Arc<OutQueue>,
    /// True once the multiplexer knows the stream (its OPEN was handed over or sent).
    known: watch::Sender<bool>,
    /// For a peer-opened stream: true once the peer's OPENs before it were handed over.
    turn: watch::Sender<bool>,
    /// An HTTP/2 stream exists (server: its request arrived; client: it was requested).
    bound: bool,
    out_ended: bool,
    in_ended: bool,
    reset: bool,
    /// A channel's data direction ended cleanly (DATA+FIN), either way.
    fin: bool,
    /// A channel's data direction ended with CLOSE, either way.
    closed: bool,
    /// The receiver's delivery confirmation (CREDIT 0) passed, either way.
    confirmed: bool,
    /// Our half of the HTTP/2 stream was ended.
    half_closed: bool,
    /// The peer's half of the HTTP/2 stream ended.
    peer_done: bool,
}

impl Route {
    fn new(known: bool) -> Route {
        Route {
            kind: 0,
            out: Arc::new(OutQueue::default()),
            known: watch::channel(known).0,
            turn: watch::channel(false).0,
            bound: false,
            out_ended: false,
            in_ended: false,
            reset: false,
            fin: false,
            closed: false,
            confirmed: false,
            half_closed: false,
            peer_done: false,
        }
    }

    /// Records what frame `frame` (of type `ty`) does to the stream's lifecycle; `out` if
    /// we send it.
    fn note(&mut self, ty: u8, flags: u8, frame: &[u8], out: bool) {
        match FrameType(ty) {
            FrameType::DATA if flags & FLAG_FIN != 0 => {
                self.fin = true;
                if out {
                    self.out_ended = true;
                } else {
                    self.in_ended = true;
                }
            }
            FrameType::CLOSE => {
                self.closed = true;
                if out {
                    self.out_ended = true;
                } else {
                    self.in_ended = true;
                }
            }
            FrameType::RESET => self.reset = true,
            FrameType::CREDIT if frame.get(HEADER_LEN..HEADER_LEN + 4) == Some(&[0; 4][..]) => {
                self.confirmed = true;
            }
            _ => {}
        }
    }

    /// Both ends agree, from the frames each saw, when a stream needs its HTTP/2 stream no
    /// more: after a RESET, after the one data direction of a channel ended, after both
    /// directions of a byte stream ended.
    fn done(&self) -> bool {
        self.reset
            || match self.kind {
                // A channel's stream also carries the receiver's delivery confirmation
                // (CREDIT 0, docs/PROTOCOL.md §6) after a clean end.
                1 | 2 => self.closed || (self.fin && self.confirmed),
                3 => self.out_ended && self.in_ended,
                _ => false,
            }
    }
}

struct State {
    routes: HashMap<u32, Route>,
    carry: BytesMut,
    failure: Option<String>,
}

/// What the client side needs to open HTTP/2 streams (it drives h2's client itself: a
/// stream's request leaves from the writer, its frames through the connection's
/// [`Flusher`](crate::body::Flusher), its response is read by the session's reader).
pub(crate) struct ClientSide {
    pub(crate) sender: h2::client::SendRequest<Bytes>,
    pub(crate) uri: Uri,
    /// The session token, set once the control stream's response named it.
    pub(crate) token: std::sync::OnceLock<HeaderValue>,
    /// Feeds our streams' frames into h2 from the connection's task.
    pub(crate) flusher: Arc<crate::body::Flusher>,
}

pub(crate) struct Router {
    role: Role,
    client: Option<ClientSide>,
    identity: Option<PeerIdentity>,
    max_frame: usize,
    max_routes: usize,
    control: Arc<OutQueue>,
    state: Mutex<State>,
    inbound: Arc<Inbound>,
    /// The next id the peer opens: its OPENs reach the multiplexer in id order (they may
    /// arrive on different HTTP/2 streams, out of order).
    next_peer_open: std::sync::atomic::AtomicU32,
    registry: Option<(Weak<Registry>, String)>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("role", &self.role)
            .field("routes", &self.lock().routes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some((registry, token)) = &self.registry {
            if let Some(r) = registry.upgrade() {
                r.remove(token);
            }
        }
    }
}

fn header(frame: &[u8]) -> (usize, u8, u8, u32) {
    let len = (usize::from(frame[0]) << 16) | (usize::from(frame[1]) << 8) | usize::from(frame[2]);
    let id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7FFF_FFFF;
    (len, frame[3], frame[4], id)
}

/// Kind and parent of an OPEN frame; `None` if its payload is malformed (the multiplexer
/// reports that).
fn open_fields(frame: &[u8]) -> Option<(u8, u32)> {
    let p = frame.get(HEADER_LEN..HEADER_LEN + 5)?;
    Some((p[0], u32::from_be_bytes([p[1], p[2], p[3], p[4]])))
}

enum Admit {
    /// Hand the frame over; the stream id (if any) becomes known once it is queued.
    Forward(Option<u32>),
    /// The stream is not known yet: wait for its OPEN.
    Wait(watch::Receiver<bool>),
    /// An OPEN that must wait until the peer's lower ids have been handed over.
    WaitTurn(watch::Receiver<bool>),
}

impl Router {
    pub(crate) fn new(
        role: Role,
        client: Option<ClientSide>,
        identity: Option<PeerIdentity>,
        limits: &libchan_core::Limits,
        registry: Option<(Weak<Registry>, String)>,
    ) -> Arc<Router> {
        Arc::new(Router {
            role,
            client,
            identity,
            max_frame: limits.max_frame_size as usize,
            max_routes: 2 * limits.max_streams as usize + 16,
            control: Arc::new(OutQueue::default()),
            state: Mutex::new(State {
                routes: HashMap::new(),
                carry: BytesMut::new(),
                failure: None,
            }),
            inbound: Arc::new(Inbound::default()),
            next_peer_open: std::sync::atomic::AtomicU32::new(if role == Role::Dialer {
                2
            } else {
                1
            }),
            registry,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn client(&self) -> Option<&ClientSide> {
        self.client.as_ref()
    }

    pub(crate) fn control(&self) -> Arc<OutQueue> {
        self.control.clone()
    }

    /// Ends the session with `msg` as the reason the connection was lost.
    pub(crate) fn fail(&self, msg: String) {
        let mut st = self.lock();
        if st.failure.is_some() {
            return;
        }
        st.failure = Some(msg);
        drop(st);
        self.inbound.wake_reader();
    }

    /// The session's reader is gone: drops the bodies nobody will read, and any handed
    /// over from now on.
    fn stop_readers(&self) {
        let added = {
            let mut st = self.inbound.lock();
            st.closed = true;
            std::mem::take(&mut st.added)
        };
        drop(added);
    }

    fn end_all(&self) {
        let st = self.lock();
        self.control.end();
        for r in st.routes.values() {
            r.out.end();
        }
    }

    /// Queues one frame the multiplexer wrote.
    fn route_out(self: &Arc<Self>, st: &mut State, frame: Bytes) {
        let (_, ty, flags, id) = header(&frame);
        if id == 0 {
            self.control.push(frame);
            return;
        }
        if FrameType(ty) == FrameType::OPEN {
            let (kind, parent) = open_fields(&frame).unwrap_or((0, 0));
            let route = st.routes.entry(id).or_insert_with(|| Route::new(true));
            route.kind = kind;
            route.known.send_replace(true);
            let open_here = parent == 0 && self.role == Role::Dialer;
            let spawn = self.role == Role::Dialer && !route.bound;
            if spawn {
                route.bound = true;
            }
            let own_out = route.out.clone();
            if open_here {
                own_out.push(frame);
            } else if parent == 0 {
                self.control.push(frame);
            } else if let Some(p) = st.routes.get(&parent) {
                p.out.push(frame);
            }
            if spawn {
                self.open_client_stream(id, own_out);
            }
            return;
        }
        let Some(route) = st.routes.get_mut(&id) else {
            return; // stale: the stream is over on both sides
        };
        if route.half_closed {
            return;
        }
        route.note(ty, flags, &frame, true);
        route.out.push(frame);
        self.settle(st, id);
    }

    /// Ends our half of stream `id`'s HTTP/2 stream once it is done, and forgets the route
    /// once both halves ended.
    fn settle(&self, st: &mut State, id: u32) {
        let Some(route) = st.routes.get_mut(&id) else {
            return;
        };
        // The client half-closes first; the server ends its response only after the
        // request ended, as gRPC does: proxies (nginx) end a request whose response ended.
        let may_end = self.role == Role::Dialer || route.peer_done;
        if route.done() && may_end && !route.half_closed {
            route.half_closed = true;
            route.out.end();
        }
        if route.half_closed && route.peer_done {
            st.routes.remove(&id);
        }
    }

    /// Decides about one inbound frame from the HTTP/2 stream `bind`.
    fn admit(self: &Arc<Self>, bind: Bind, frame: &[u8]) -> Result<Admit, String> {
        let (_, ty, flags, id) = header(frame);
        let is_open = FrameType(ty) == FrameType::OPEN;
        let mut st = self.lock();
        match bind {
            Bind::Control => {
                if id == 0 {
                    return Ok(Admit::Forward(None));
                }
                let (kind, parent) = open_fields(frame).unwrap_or((0, u32::MAX));
                if is_open && parent == 0 && self.role == Role::Dialer && !self.role.owns(id) {
                    if let Some(wait) = self.turn(&mut st, id)? {
                        return Ok(wait);
                    }
                    self.peer_opened(&mut st, id, kind)?;
                    return Ok(Admit::Forward(Some(id)));
                }
                Err(format!(
                    "frame type {ty} for stream {id} on the control stream"
                ))
            }
            Bind::Stream(s) if id == s => {
                let Some(route) = st.routes.get_mut(&s) else {
                    return Err(format!("no route for stream {s}"));
                };
                if is_open {
                    let (kind, parent) = open_fields(frame).unwrap_or((0, u32::MAX));
                    if parent != 0
                        || *route.known.borrow()
                        || self.role.owns(id)
                        || self.role == Role::Dialer
                    {
                        return Err(format!("unexpected OPEN of stream {id} on its own stream"));
                    }
                    if let Some(wait) = self.turn(&mut st, id)? {
                        return Ok(wait);
                    }
                    if let Some(route) = st.routes.get_mut(&s) {
                        route.kind = kind;
                    }
                    return Ok(Admit::Forward(Some(id)));
                }
                if !*route.known.borrow() {
                    return Ok(Admit::Wait(route.known.subscribe()));
                }
                route.note(ty, flags, frame, false);
                self.settle(&mut st, s);
                Ok(Admit::Forward(None))
            }
            Bind::Stream(s) => {
                let (kind, parent) = open_fields(frame).unwrap_or((0, u32::MAX));
                if is_open && parent == s && !self.role.owns(id) {
                    if let Some(wait) = self.turn(&mut st, id)? {
                        return Ok(wait);
                    }
                    self.peer_opened(&mut st, id, kind)?;
                    return Ok(Admit::Forward(Some(id)));
                }
                Err(format!(
                    "frame type {ty} for stream {id} on the HTTP/2 stream of stream {s}"
                ))
            }
        }
    }

    /// Whether the peer's OPEN of `id` may be handed over now: ids reach the multiplexer in
    /// the order the peer assigned them (PROTOCOL.md §14: consecutive).
    fn turn(&self, st: &mut State, id: u32) -> Result<Option<Admit>, String> {
        let next = self
            .next_peer_open
            .load(std::sync::atomic::Ordering::SeqCst);
        if id < next {
            return Err(format!(
                "peer opened stream {id} again or out of sequence (next expected {next})"
            ));
        }
        if id > next {
            // Only this OPEN's own route is woken when its turn comes (no thundering herd).
            if !st.routes.contains_key(&id) && st.routes.len() >= self.max_routes {
                return Err(format!(
                    "more than {} streams routed (2 x max_streams + 16)",
                    self.max_routes
                ));
            }
            let route = st.routes.entry(id).or_insert_with(|| Route::new(false));
            return Ok(Some(Admit::WaitTurn(route.turn.subscribe())));
        }
        Ok(None)
    }

    /// The peer opened stream `id` (its OPEN is being handed over): record it, and on the
    /// client open the HTTP/2 stream the server cannot open itself.
    fn peer_opened(self: &Arc<Self>, st: &mut State, id: u32, kind: u8) -> Result<(), String> {
        if !st.routes.contains_key(&id) && st.routes.len() >= self.max_routes {
            return Err(format!(
                "more than {} streams routed (2 x max_streams + 16)",
                self.max_routes
            ));
        }
        let route = st.routes.entry(id).or_insert_with(|| Route::new(false));
        if *route.known.borrow() {
            return Err(format!("stream {id} opened twice"));
        }
        route.kind = kind;
        if self.role == Role::Dialer && !route.bound {
            route.bound = true;
            let out = route.out.clone();
            self.open_client_stream(id, out);
        }
        Ok(())
    }

    fn mark_known(&self, id: u32) {
        let st = self.lock();
        if let Some(r) = st.routes.get(&id) {
            r.known.send_replace(true);
        }
        if !self.role.owns(id) {
            let next = id.saturating_add(2);
            self.next_peer_open
                .store(next, std::sync::atomic::Ordering::SeqCst);
            if let Some(r) = st.routes.get(&next) {
                r.turn.send_replace(true);
            }
        }
    }

    /// The peer's half of an HTTP/2 stream ended cleanly.
    fn body_ended(&self, bind: Bind) -> Result<(), String> {
        match bind {
            Bind::Control => Err(String::new()),
            Bind::Stream(s) => {
                let mut st = self.lock();
                let Some(route) = st.routes.get_mut(&s) else {
                    return Ok(());
                };
                route.peer_done = true;
                if !route.done() {
                    return Err(format!(
                        "the HTTP/2 stream of libchan stream {s} ended before the stream did"
                    ));
                }
                self.settle(&mut st, s);
                Ok(())
            }
        }
    }

    /// Server: an HTTP/2 request arrived for stream `id`. Returns the queue its response
    /// body sends from.
    pub(crate) fn bind_server_stream(&self, id: u32) -> Result<Arc<OutQueue>, StatusCode> {
        let mut st = self.lock();
        if st.failure.is_some() {
            return Err(StatusCode::GONE);
        }
        if id == 0 {
            return Err(StatusCode::BAD_REQUEST);
        }
        if !st.routes.contains_key(&id) {
            if self.role.owns(id) {
                return Err(StatusCode::NOT_FOUND);
            }
            if st.routes.len() >= self.max_routes {
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        let route = st.routes.entry(id).or_insert_with(|| Route::new(false));
        if route.bound {
            return Err(StatusCode::CONFLICT);
        }
        route.bound = true;
        Ok(route.out.clone())
    }

    /// Client: opens the HTTP/2 stream of libchan stream `id`, whose frames go out from
    /// `out`. Runs under the state's lock, from the writer, so streams open in the order
    /// their OPENs are written. A fresh clone of h2's sender is always ready: h2 holds a
    /// stream beyond the server's `max_concurrent_streams` until another ends (test
    /// `channels_beyond_the_servers_stream_limit_wait_for_room`); libchan's `max_streams`
    /// bounds how many wait.
    fn open_client_stream(self: &Arc<Self>, id: u32, out: Arc<OutQueue>) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let mut sender = client.sender.clone();
        let r = match sender.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Err(e)) => Err(format!("HTTP/2 connection: {e}")),
            Poll::Ready(Ok(())) | Poll::Pending => self.send_stream_request(&mut sender, id, &out),
        };
        if let Err(m) = r {
            // `fail` takes the state's lock, which the caller holds.
            let router = self.clone();
            tokio::spawn(async move { router.fail(m) });
        }
    }

    /// Client: sends the request of stream `id`'s HTTP/2 stream (`sender` is ready) and
    /// hands its response to the reader.
    fn send_stream_request(
        &self,
        sender: &mut h2::client::SendRequest<Bytes>,
        id: u32,
        out: &Arc<OutQueue>,
    ) -> Result<(), String> {
        let client = self.client.as_ref().ok_or("no client side")?;
        let token = client.token.get().ok_or("no session token")?.clone();
        // Each stream's id is new: never worth a slot in HPACK's dynamic table.
        let mut stream_id = HeaderValue::from(id);
        stream_id.set_sensitive(true);
        let req = Request::post(client.uri.clone())
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(SESSION_HEADER, token)
            .header(STREAM_HEADER, stream_id)
            .body(())
            .map_err(|e| format!("building the request for stream {id}: {e}"))?;
        let (response, stream) = sender
            .send_request(req, false)
            .map_err(|e| format!("HTTP/2 stream for libchan stream {id}: {e}"))?;
        out.attach(stream, &client.flusher);
        self.add_body(Bind::Stream(id), ClientBody::Response { id, response });
        Ok(())
    }

    /// Hands an inbound HTTP/2 body to the session's reader, which polls it from now on.
    pub(crate) fn add_body<B>(&self, bind: Bind, body: B)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: fmt::Display,
    {
        let mut st = self.inbound.lock();
        if st.closed {
            return;
        }
        st.added.push((bind, Box::pin(body)));
        wake_after(st);
    }
}

/// Client: the response side of one of our HTTP/2 streams, read by the session's reader:
/// first the response's head (which must be 200), then its body.
pub(crate) enum ClientBody {
    /// Waiting for the response to the request of libchan stream `id`.
    Response {
        id: u32,
        response: h2::client::ResponseFuture,
    },
    /// The response's body.
    Body(h2::RecvStream),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, String>>> {
        let this = self.get_mut();
        loop {
            match this {
                ClientBody::Response { id, response } => {
                    let resp = match Pin::new(response).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Some(Err(format!(
                                "HTTP/2 stream for libchan stream {id}: {e}{}",
                                crate::reset_hint(&e)
                            ))))
                        }
                        Poll::Ready(Ok(r)) => r,
                    };
                    if resp.status() != StatusCode::OK {
                        return Poll::Ready(Some(Err(format!(
                            "the server answered HTTP {} to the HTTP/2 stream of libchan stream {id}",
                            resp.status()
                        ))));
                    }
                    *this = ClientBody::Body(resp.into_body());
                }
                ClientBody::Body(body) => {
                    return match body.poll_data(cx) {
                        Poll::Ready(Some(Ok(d))) => {
                            // Read means consumed: the multiplexer's credit bounds what
                            // the reader holds.
                            let _ = body.flow_control().release_capacity(d.len());
                            Poll::Ready(Some(Ok(http_body::Frame::data(d))))
                        }
                        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.to_string()))),
                        Poll::Ready(None) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// The [`Link`] a session's multiplexer runs over.
#[derive(Debug)]
pub(crate) struct H2Link(pub(crate) Arc<Router>);

impl Link for H2Link {
    fn peer_identity(&self) -> Option<PeerIdentity> {
        self.0.identity.clone()
    }

    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        (
            Box::new(H2Read {
                router: self.0.clone(),
                slots: Vec::new(),
                free: Vec::new(),
                todo: VecDeque::new(),
                pending: VecDeque::new(),
                pending_bytes: 0,
                eof: false,
            }),
            Box::new(H2Write { router: self.0 }),
        )
    }
}

/// An inbound HTTP/2 body, its errors as text.
trait InBody: Send {
    /// The next DATA of the body (other frames, such as trailers, are skipped).
    fn poll_data(self: Pin<&mut Self>, cx: &mut Context<'_>)
        -> Poll<Option<Result<Bytes, String>>>;
}

impl<B> InBody for B
where
    B: Body<Data = Bytes> + Send,
    B::Error: fmt::Display,
{
    fn poll_data(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, String>>> {
        loop {
            return match self.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => Poll::Ready(Some(Ok(d))),
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.to_string()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

type BoxedBody = Pin<Box<dyn InBody>>;

/// What the session's reader shares with the tasks that hand it bodies and with the
/// bodies' wakers.
#[derive(Default)]
struct Inbound {
    state: Mutex<InboundState>,
}

#[derive(Default)]
struct InboundState {
    /// Bodies handed over since the reader last looked.
    added: Vec<(Bind, BoxedBody)>,
    /// Slots whose body (or wait) was woken.
    ready: Vec<usize>,
    /// The reader, when it waits.
    waker: Option<Waker>,
    /// The reader is gone.
    closed: bool,
}

impl Inbound {
    fn lock(&self) -> MutexGuard<'_, InboundState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_reader(&self) {
        wake_after(self.lock());
    }
}

/// Releases the inbound state, then wakes the reader if it waits.
fn wake_after(mut st: MutexGuard<'_, InboundState>) {
    let w = st.waker.take();
    drop(st);
    if let Some(w) = w {
        w.wake();
    }
}

/// The waker a body's slot is polled with: queues the slot for the reader.
struct SlotWake {
    slot: usize,
    inbound: Arc<Inbound>,
    /// Queued and not yet taken by the reader: further wake-ups add nothing.
    queued: AtomicBool,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = self.inbound.lock();
        st.ready.push(self.slot);
        wake_after(st);
    }
}

type WaitFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One inbound HTTP/2 body being read.
struct Slot {
    bind: Bind,
    body: BoxedBody,
    /// Received bytes not yet handed over (at most one incomplete frame, or the frames
    /// behind one that waits).
    buf: BytesMut,
    /// The frame at the head of `buf` waits for this (its stream's OPEN, or its turn).
    wait: Option<WaitFuture>,
    wake: Arc<SlotWake>,
    waker: Waker,
}

/// What became of a slot after its turn.
enum Driven {
    /// Waiting for its body or for an OPEN.
    Idle,
    /// Stopped because enough waits for the multiplexer: poll it again later.
    Full,
    /// The body ended or failed: free the slot.
    Done,
}

struct H2Read {
    router: Arc<Router>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots to drive, in the order they were woken.
    todo: VecDeque<usize>,
    /// Whole frames admitted and not yet read by the multiplexer.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    /// The control stream ended: the connection's end.
    eof: bool,
}

impl Drop for H2Read {
    fn drop(&mut self) {
        self.router.stop_readers();
    }
}

impl H2Read {
    fn add(&mut self, bind: Bind, body: BoxedBody) {
        let idx = self.free.pop().unwrap_or(self.slots.len());
        let wake = Arc::new(SlotWake {
            slot: idx,
            inbound: self.router.inbound.clone(),
            queued: AtomicBool::new(true),
        });
        let slot = Slot {
            bind,
            body,
            buf: BytesMut::new(),
            wait: None,
            waker: Waker::from(wake.clone()),
            wake,
        };
        if idx == self.slots.len() {
            self.slots.push(Some(slot));
        } else {
            self.slots[idx] = Some(slot);
        }
        self.todo.push_back(idx);
    }

    /// Reads what slot `idx`'s body has and admits its whole frames into `pending`.
    fn drive(&mut self, idx: usize) -> Driven {
        let router = &self.router;
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            return Driven::Idle; // a stale wake-up of a freed slot
        };
        slot.wake.queued.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&slot.waker);
        loop {
            if let Some(wait) = slot.wait.as_mut() {
                match wait.as_mut().poll(&mut cx) {
                    Poll::Pending => return Driven::Idle,
                    Poll::Ready(Err(m)) => {
                        router.fail(m);
                        return Driven::Done;
                    }
                    Poll::Ready(Ok(())) => slot.wait = None,
                }
            }
            while slot.buf.len() >= HEADER_LEN {
                let (len, ..) = header(&slot.buf);
                if len > router.max_frame {
                    router.fail(format!(
                        "frame length exceeds max_frame_size: {len} > limit {}",
                        router.max_frame
                    ));
                    return Driven::Done;
                }
                if slot.buf.len() < HEADER_LEN + len {
                    break;
                }
                match router.admit(slot.bind, &slot.buf[..HEADER_LEN + len]) {
                    Err(m) => {
                        router.fail(m);
                        return Driven::Done;
                    }
                    Ok(Admit::Forward(opened)) => {
                        let frame = slot.buf.split_to(HEADER_LEN + len).freeze();
                        self.pending_bytes += frame.len();
                        self.pending.push_back(frame);
                        if let Some(id) = opened {
                            router.mark_known(id);
                        }
                    }
                    Ok(Admit::Wait(mut known)) => {
                        slot.wait = Some(Box::pin(async move {
                            known
                                .wait_for(|k| *k)
                                .await
                                .map(|_| ())
                                .map_err(|_| "stream forgotten".to_owned())
                        }));
                        break;
                    }
                    Ok(Admit::WaitTurn(mut turn)) => {
                        slot.wait = Some(Box::pin(async move {
                            turn.wait_for(|t| *t)
                                .await
                                .map(|_| ())
                                .map_err(|_| "session gone".to_owned())
                        }));
                        break;
                    }
                }
            }
            if slot.wait.is_some() {
                continue; // poll the new wait, which registers the slot's waker
            }
            if self.pending_bytes >= READ_BATCH {
                return Driven::Full;
            }
            match slot.body.as_mut().poll_data(&mut cx) {
                Poll::Pending => return Driven::Idle,
                Poll::Ready(Some(Ok(d))) => slot.buf.extend_from_slice(&d),
                Poll::Ready(Some(Err(e))) => {
                    router.fail(match slot.bind {
                        Bind::Control => format!("HTTP/2 control stream failed: {e}"),
                        Bind::Stream(s) => {
                            format!("HTTP/2 stream of libchan stream {s} failed: {e}")
                        }
                    });
                    return Driven::Done;
                }
                Poll::Ready(None) => {
                    if !slot.buf.is_empty() {
                        router.fail(format!(
                            "HTTP/2 stream ended inside a frame ({} bytes left)",
                            slot.buf.len()
                        ));
                        return Driven::Done;
                    }
                    match router.body_ended(slot.bind) {
                        Ok(()) => {}
                        // End of the control stream: end of the connection.
                        Err(m) if m.is_empty() => self.eof = true,
                        Err(m) => router.fail(m),
                    }
                    return Driven::Done;
                }
            }
        }
    }

    /// Moves admitted frames into `buf`, at most `room` bytes in all; returns the count.
    fn take_pending(&mut self, buf: &mut BytesMut, room: usize, mut n: usize) -> usize {
        while n < room {
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            let k = (room - n).min(front.len());
            buf.extend_from_slice(&front.split_to(k));
            n += k;
            self.pending_bytes -= k;
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
        n
    }
}

impl LinkRead for H2Read {
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        // Never more than the room the caller gave (it may be a message body's exact
        // remainder); what does not fit waits for the next read.
        let room = (buf.capacity() - buf.len()).max(1);
        let mut n = self.take_pending(buf, room, 0);
        loop {
            if n >= room || n >= READ_BATCH {
                return Poll::Ready(Ok(n));
            }
            if self.todo.is_empty() {
                let (added, ready) = {
                    let mut st = self.router.inbound.lock();
                    if st.added.is_empty() && st.ready.is_empty() {
                        st.waker = Some(cx.waker().clone());
                        break;
                    }
                    (std::mem::take(&mut st.added), std::mem::take(&mut st.ready))
                };
                self.todo.extend(ready);
                for (bind, body) in added {
                    self.add(bind, body);
                }
            }
            while let Some(idx) = self.todo.pop_front() {
                match self.drive(idx) {
                    Driven::Idle => {}
                    Driven::Full => {
                        self.todo.push_front(idx);
                        break;
                    }
                    Driven::Done => {
                        self.slots[idx] = None;
                        self.free.push(idx);
                    }
                }
                if self.pending_bytes >= READ_BATCH {
                    break;
                }
            }
            n = self.take_pending(buf, room, n);
        }
        if n > 0 || self.eof {
            return Poll::Ready(Ok(n));
        }
        if let Some(m) = self.router.lock().failure.clone() {
            return Poll::Ready(Err(io::Error::other(m)));
        }
        Poll::Pending
    }
}

struct H2Write {
    router: Arc<Router>,
}

impl Drop for H2Write {
    fn drop(&mut self) {
        self.router.end_all();
    }
}

impl LinkWrite for H2Write {
    fn can_write_inline(&self) -> bool {
        // Frames go to the HTTP/2 streams' queues, never blocking.
        true
    }

    fn poll_write_fds(
        &mut self,
        _cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            return Poll::Ready(Err(io::Error::other("HTTP/2 cannot pass file descriptors")));
        }
        let router = self.router.clone();
        let mut st = router.lock();
        st.carry.extend_from_slice(buf);
        while st.carry.len() >= HEADER_LEN {
            let (len, ..) = header(&st.carry);
            if st.carry.len() < HEADER_LEN + len {
                break;
            }
            let frame = st.carry.split_to(HEADER_LEN + len).freeze();
            router.route_out(&mut st, frame);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.router.end_all();
        Poll::Ready(Ok(()))
    }
}

/// Reads at most `limit` bytes of a body as text (for refusal messages).
pub(crate) async fn read_text<B>(body: B, limit: usize) -> String
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while out.len() < limit {
        match poll_fn(|cx| Pin::as_mut(&mut body).poll_frame(cx)).await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d[..d.len().min(limit - out.len())]);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim().to_owned()
}
