//! HTTP/2 transport of libchan: every channel and every byte stream is its own HTTP/2
//! stream, so HTTP/2 flow control, proxies (nginx `grpc_pass`, haproxy `proto h2`) and
//! authentication middleware see real streams.
//!
//! A session starts with one POST request to the endpoint's path: the *control stream*. Its
//! response carries a session token; every further HTTP/2 stream of the session is a POST
//! to the same path naming the token and its libchan stream id. Only the client can open
//! HTTP/2 streams, so when the server opens a channel, the client opens the HTTP/2 stream
//! for it (docs/PROTOCOL.md §14). Works over TLS with ALPN `h2` and over cleartext h2c.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! use libchan_h2::{H2Client, H2Listener};
//! let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
//! let listener = H2Listener::bind("127.0.0.1:0", config.clone()).await?;
//! let addr = listener.local_addr();
//!
//! let client = H2Client::new(addr.to_string(), config).connect().await?;
//! let server = listener.accept().await?;
//!
//! let tx = client.open::<String>().await?; // one HTTP/2 stream
//! let mut rx = server.accept::<String>().await?.expect("a channel");
//! tx.send("over h2c".into()).await.map_err(|e| e.error)?;
//! assert_eq!(rx.recv().await?.as_deref(), Some("over h2c"));
//! # Ok(()) }
//! ```
//!
//! To serve libchan from a hyper server that also serves other routes, hand the requests of
//! one path to [`Endpoint::handle`] and take sessions from [`Endpoint::accept`]; an
//! [`Endpoint::authorize`] check runs on every new session's request (headers such as
//! `Authorization`, and the TLS peer identity) before any channel exists.

mod body;
mod router;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libchan_core::{Config, Error, ErrorKind, PeerIdentity, Role, Session};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub use body::OutBody;
use router::{Bind, ClientSide, H2Link, Router};

/// Request header naming the protocol version on a control stream request (`1`).
pub const VERSION_HEADER: &str = "libchan-version";
/// Response header of a control stream (the session token), and request header of every
/// other HTTP/2 stream of that session.
pub const SESSION_HEADER: &str = "libchan-session";
/// Request header naming the libchan stream id an HTTP/2 stream carries.
pub const STREAM_HEADER: &str = "libchan-stream";
/// Content type of libchan requests and responses.
pub const CONTENT_TYPE: &str = "application/x-libchan";
/// Default path of the endpoint.
pub const DEFAULT_PATH: &str = "/libchan";
/// Most sessions waiting in [`Endpoint::accept`]; more are refused with 503.
pub const MAX_PENDING_SESSIONS: usize = 128;
/// Longest refusal text a client reads from a refusing server.
const MAX_REFUSAL_TEXT: usize = 4096;
/// Largest header list (HTTP/2's accounting: names, values, 32 bytes each) the client
/// takes in a response; hyper's client default.
const MAX_RESPONSE_HEADERS: u32 = 16 * 1024;

/// `headers` without the connection-specific ones, which HTTP/2 forbids (RFC 9113
/// §8.2.2; `te` is allowed only as `te: trailers`, which libchan does not send).
fn without_connection_headers(headers: &HeaderMap) -> HeaderMap {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    let mut h = headers.clone();
    for name in [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    h
}

/// What to add to an h2 error of a client request: a response head over
/// [`MAX_RESPONSE_HEADERS`] ends in a stream reset (h2's PROTOCOL_ERROR, or the server's
/// own reset right behind it), so a reset names that limit as a possible cause.
pub(crate) fn reset_hint(e: &h2::Error) -> String {
    if e.is_reset() {
        format!(
            " (the stream was reset; a response whose header list is over \
             {MAX_RESPONSE_HEADERS} bytes is refused that way)"
        )
    } else {
        String::new()
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Io, format!("{what}: {e}"), e)
}

/// Why an authorization check refused a session: the HTTP status and a message, both sent
/// to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status of the response (401, 403, …).
    pub status: StatusCode,
    /// Text sent as the response body.
    pub message: String,
}

impl Refusal {
    /// A refusal with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// 401 Unauthorized: no or bad credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403 Forbidden: valid credentials, not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
}

/// The check an [`Endpoint`] runs on each new session's request: `Ok(Some(name))` accepts
/// it as `name` ([`PeerIdentity::authenticated_as`]), `Ok(None)` accepts it anonymously.
pub type AuthorizeFn = dyn Fn(&http::request::Parts, Option<&PeerIdentity>) -> Result<Option<String>, Refusal>
    + Send
    + Sync;

/// Live sessions of an endpoint, by token.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<String, Weak<Router>>>,
}

impl Registry {
    pub(crate) fn remove(&self, token: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    fn get(&self, token: &str) -> Option<Arc<Router>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .and_then(Weak::upgrade)
    }
}

struct EndpointInner {
    config: Config,
    path: String,
    registry: Arc<Registry>,
    authorize: Option<Arc<AuthorizeFn>>,
    accept_tx: mpsc::Sender<Result<Session, Error>>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Result<Session, Error>>>,
}

/// The server side: turns HTTP/2 requests into libchan sessions. Cheap to clone.
///
/// Embedding in a hyper server that serves other routes too:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), libchan_core::Error> {
/// use http::{Request, Response, StatusCode};
/// use hyper::body::Incoming;
/// use libchan_h2::{Endpoint, OutBody};
///
/// let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
/// let endpoint = Endpoint::new(config.clone())
///     .authorize(|req, _tls| match req.headers.get("authorization") {
///         Some(v) if v == "Bearer s3cret" => Ok(Some("alice".into())),
///         _ => Err(libchan_h2::Refusal::unauthorized("bad token")),
///     });
/// // The application's own routing: /libchan goes to libchan, the rest is REST.
/// let ep = endpoint.clone();
/// let service = hyper::service::service_fn(move |req: Request<Incoming>| {
///     let ep = ep.clone();
///     async move {
///         Ok::<_, std::convert::Infallible>(match req.uri().path() {
///             "/libchan" => ep.handle(req, None).await,
///             "/health" => Response::new(OutBody::full("ok")),
///             _ => {
///                 let mut r = Response::new(OutBody::full("not found"));
///                 *r.status_mut() = StatusCode::NOT_FOUND;
///                 r
///             }
///         })
///     }
/// });
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let addr = listener.local_addr().unwrap();
/// tokio::spawn(async move {
///     loop {
///         let (tcp, _) = listener.accept().await.unwrap();
///         let service = service.clone();
///         tokio::spawn(async move {
///             let io = hyper_util::rt::TokioIo::new(tcp);
///             let builder = hyper_util::server::conn::auto::Builder::new(
///                 hyper_util::rt::TokioExecutor::new(),
///             );
///             let _ = builder.serve_connection_with_upgrades(io, service).await;
///         });
///     }
/// });
///
/// let client = libchan_h2::H2Client::new(addr.to_string(), config)
///     .header("authorization", "Bearer s3cret")
///     .connect()
///     .await?;
/// let server = endpoint.accept().await?;
/// assert_eq!(server.peer_identity().unwrap().authenticated_as(), Some("alice"));
/// let tx = client.open::<u32>().await?;
/// tx.send(7).await.map_err(|e| e.error)?;
/// assert_eq!(server.accept::<u32>().await?.unwrap().recv().await?, Some(7));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("path", &self.inner.path)
            .field("authorize", &self.inner.authorize.is_some())
            .finish_non_exhaustive()
    }
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response<OutBody> {
    let mut r = Response::new(OutBody::full(text.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn new_token() -> Result<String, Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| Error::new(ErrorKind::Io, format!("random session token: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Endpoint {
    /// An endpoint serving sessions with `config` at [`DEFAULT_PATH`].
    pub fn new(config: Config) -> Self {
        let (accept_tx, accept_rx) = mpsc::channel(MAX_PENDING_SESSIONS);
        Endpoint {
            inner: Arc::new(EndpointInner {
                config,
                path: DEFAULT_PATH.to_owned(),
                registry: Arc::new(Registry::default()),
                authorize: None,
                accept_tx,
                accept_rx: tokio::sync::Mutex::new(accept_rx),
            }),
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut EndpointInner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(i) => i,
            Err(shared) => {
                let (accept_tx, accept_rx) = mpsc::channel(MAX_PENDING_SESSIONS);
                EndpointInner {
                    config: shared.config.clone(),
                    path: shared.path.clone(),
                    registry: Arc::new(Registry::default()),
                    authorize: shared.authorize.clone(),
                    accept_tx,
                    accept_rx: tokio::sync::Mutex::new(accept_rx),
                }
            }
        };
        f(&mut inner);
        Endpoint {
            inner: Arc::new(inner),
        }
    }

    /// Serves at `path` instead of [`DEFAULT_PATH`] (used by [`Endpoint::serve_connection`]
    /// and [`H2Listener`]; [`Endpoint::handle`] serves whatever it is given).
    pub fn path(self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.rebuild(|i| i.path = path)
    }

    /// Runs `check` on the request of every new session, before any channel exists. A
    /// refusal becomes the HTTP response (status and message) the client reports as
    /// [`ErrorKind::Refused`].
    pub fn authorize(
        self,
        check: impl Fn(&http::request::Parts, Option<&PeerIdentity>) -> Result<Option<String>, Refusal>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let check: Arc<AuthorizeFn> = Arc::new(check);
        self.rebuild(|i| i.authorize = Some(check))
    }

    /// The next session whose libchan handshake finished (or the error of one that
    /// failed; keep calling to serve others).
    pub async fn accept(&self) -> Result<Session, Error> {
        let mut rx = self.inner.accept_rx.lock().await;
        rx.recv()
            .await
            .unwrap_or_else(|| Err(Error::new(ErrorKind::Closed, "endpoint closed")))
    }

    /// Handles one HTTP request for the endpoint: a new session (its control stream) or one
    /// HTTP/2 stream of an existing session. `peer` is the TLS identity of the connection
    /// it came on, if any. Answers 405 to methods other than POST, 426 to HTTP/1.
    pub async fn handle<B>(&self, req: Request<B>, peer: Option<PeerIdentity>) -> Response<OutBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: fmt::Display + Send,
    {
        if libchan_ws::is_upgrade_request(req.headers()) {
            return self.websocket_request(req, peer);
        }
        if req.method() != Method::POST {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "libchan endpoints take POST",
            );
        }
        if req.version() != http::Version::HTTP_2 {
            return plain(
                StatusCode::UPGRADE_REQUIRED,
                "libchan over HTTP/1.1 needs a WebSocket upgrade (subprotocol libchan.v1)",
            );
        }
        let (parts, body) = req.into_parts();
        match parts.headers.get(SESSION_HEADER) {
            Some(token) => self.stream_request(&parts, token, body),
            None => self.session_request(parts, body, peer),
        }
    }

    /// Runs the authorization check; `Err` is the refusal response.
    #[allow(clippy::result_large_err)]
    fn check(
        &self,
        parts: &http::request::Parts,
        peer: Option<PeerIdentity>,
    ) -> Result<Option<PeerIdentity>, Response<OutBody>> {
        let Some(check) = &self.inner.authorize else {
            return Ok(peer);
        };
        match check(parts, peer.as_ref()) {
            Ok(Some(name)) => Ok(Some(peer.unwrap_or_default().with_authenticated_as(name))),
            Ok(None) => Ok(peer),
            Err(r) => Err(plain(r.status, r.message)),
        }
    }

    /// An HTTP/1.1 WebSocket upgrade on the endpoint's path: the same session, carried in
    /// binary WebSocket messages (PROTOCOL.md §16).
    fn websocket_request<B>(
        &self,
        mut req: Request<B>,
        peer: Option<PeerIdentity>,
    ) -> Response<OutBody> {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = req.into_parts();
        let identity = match self.check(&parts, peer) {
            Ok(i) => i,
            Err(refusal) => return refusal,
        };
        let resp = match libchan_ws::upgrade_response(&parts) {
            Ok(r) => r,
            Err((status, text)) => return plain(status, text),
        };
        let permit = match self.inner.accept_tx.clone().try_reserve_owned() {
            Ok(p) => p,
            Err(_) => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many sessions waiting to be accepted",
                )
            }
        };
        let config = self.inner.config.clone();
        tokio::spawn(async move {
            let r = match on_upgrade.await {
                Ok(upgraded) => {
                    libchan_ws::over_upgraded(TokioIo::new(upgraded), identity, &config).await
                }
                Err(e) => Err(Error::new(
                    ErrorKind::Handshake,
                    format!("WebSocket upgrade: {e}"),
                )),
            };
            permit.send(r);
        });
        resp.map(|()| OutBody::empty())
    }

    fn stream_request<B>(
        &self,
        parts: &http::request::Parts,
        token: &HeaderValue,
        body: B,
    ) -> Response<OutBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: fmt::Display + Send,
    {
        let Some(router) = token.to_str().ok().and_then(|t| self.inner.registry.get(t)) else {
            return plain(StatusCode::NOT_FOUND, "no such libchan session");
        };
        let Some(id) = parts
            .headers
            .get(STREAM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
        else {
            return plain(
                StatusCode::BAD_REQUEST,
                "missing or bad libchan-stream header",
            );
        };
        match router.bind_server_stream(id) {
            Ok(out) => {
                router.add_body(Bind::Stream(id), body);
                ok_response(out, None)
            }
            Err(status) => plain(status, format!("libchan stream {id} cannot be bound here")),
        }
    }

    fn session_request<B>(
        &self,
        parts: http::request::Parts,
        body: B,
        peer: Option<PeerIdentity>,
    ) -> Response<OutBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: fmt::Display + Send,
    {
        if let Some(v) = parts.headers.get(VERSION_HEADER) {
            if v != "1" {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("unsupported libchan version {v:?}; this endpoint speaks 1"),
                );
            }
        }
        let identity = match self.check(&parts, peer) {
            Ok(i) => i,
            Err(refusal) => return refusal,
        };
        let permit = match self.inner.accept_tx.clone().try_reserve_owned() {
            Ok(p) => p,
            Err(_) => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many sessions waiting to be accepted",
                )
            }
        };
        let token = match new_token() {
            Ok(t) => t,
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let config = &self.inner.config;
        let router = Router::new(
            Role::Listener,
            None,
            identity,
            config.limits(),
            Some((Arc::downgrade(&self.inner.registry), token.clone())),
        );
        self.inner
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), Arc::downgrade(&router));
        router.add_body(Bind::Control, body);
        let out = router.control();
        let config = config.clone();
        tokio::spawn(async move {
            let r = Session::over_link(H2Link(router), Role::Listener, &config).await;
            permit.send(r);
        });
        ok_response(out, Some(token))
    }

    /// Serves one connection (HTTP/2, or HTTP/1.1 with a WebSocket upgrade)
    /// until it ends: requests to the endpoint's path go to [`Endpoint::handle`], others
    /// get 404. `peer` is the connection's TLS identity, if any.
    pub async fn serve_connection<IO>(
        &self,
        io: IO,
        peer: Option<PeerIdentity>,
    ) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let ep = self.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let ep = ep.clone();
            let peer = peer.clone();
            async move {
                Ok::<_, std::convert::Infallible>(if req.uri().path() == ep.inner.path {
                    ep.handle(req, peer).await
                } else {
                    plain(StatusCode::NOT_FOUND, "not found")
                })
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let limits = self.inner.config.limits();
        builder
            .http2()
            .max_concurrent_streams(2 * limits.max_streams + 16)
            .initial_stream_window_size(h2_window(limits))
            .initial_connection_window_size(16 * 1024 * 1024);
        builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await
            .map_err(|e| Error::new(ErrorKind::ConnectionLost, format!("HTTP connection: {e}")))
    }
}

/// The HTTP/2 stream window: libchan's own credit is the binding flow control, so the
/// HTTP/2 window only needs to keep a stream's credit in flight.
fn h2_window(limits: &libchan_core::Limits) -> u32 {
    (limits.initial_window.saturating_mul(2)).clamp(65_535, 2 * 1024 * 1024 * 1024 - 1)
}

fn ok_response(out: Arc<body::OutQueue>, token: Option<String>) -> Response<OutBody> {
    let mut r = Response::new(OutBody::stream(out));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE),
    );
    if let Some(t) = token {
        if let Ok(v) = HeaderValue::from_str(&t) {
            r.headers_mut().insert(SESSION_HEADER, v);
        }
    }
    r
}

/// A standalone HTTP/2 server for libchan sessions (h2c, or TLS with ALPN `h2`).
#[derive(Debug)]
pub struct H2Listener {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Listener {
    /// Listens for cleartext HTTP/2 (h2c, prior knowledge) at `addr`.
    pub async fn bind(addr: &str, config: Config) -> Result<Self, Error> {
        Self::with_endpoint(addr, Endpoint::new(config), None).await
    }

    /// Listens for HTTP/2 over TLS at `addr`; the TLS config gets ALPN `h2` (and
    /// `http/1.1`, for other routes of a combined server).
    pub async fn bind_tls(
        addr: &str,
        tls: Arc<rustls::ServerConfig>,
        config: Config,
    ) -> Result<Self, Error> {
        Self::with_endpoint(addr, Endpoint::new(config), Some(tls)).await
    }

    /// Listens at `addr` serving `endpoint` (its path, authorization check and config).
    pub async fn with_endpoint(
        addr: &str,
        endpoint: Endpoint,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, Error> {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err("bind", e))?;
        let local_addr = tcp.local_addr().map_err(|e| io_err("local_addr", e))?;
        let tls = tls.map(|t| {
            let mut c = (*t).clone();
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(c)
        });
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = tcp.accept().await else {
                    continue;
                };
                let ep = ep.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    match tls {
                        None => {
                            let _ = ep.serve_connection(s, None).await;
                        }
                        Some(tls) => {
                            let timeout = ep.inner.config.handshake_timeout_value();
                            let Ok(s) = libchan_tls::server_handshake(s, tls, timeout).await else {
                                return;
                            };
                            let peer = libchan_tls::stream_peer_identity(&s);
                            let _ = ep.serve_connection(s, peer).await;
                        }
                    }
                });
            }
        });
        Ok(H2Listener {
            endpoint,
            local_addr,
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoint it serves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The next session (see [`Endpoint::accept`]).
    pub async fn accept(&self) -> Result<Session, Error> {
        self.endpoint.accept().await
    }
}

/// Connects to a libchan HTTP/2 endpoint.
///
/// `addr` is `host:port`; the request goes to `http://addr/libchan` (h2c with prior
/// knowledge) or, with [`tls`](H2Client::tls), `https://server_name:port/libchan` with
/// ALPN `h2`. The client takes responses whose header list is at most 16 KiB (HTTP/2's
/// accounting), and tells the server it may not push streams.
#[derive(Clone)]
pub struct H2Client {
    addr: String,
    path: String,
    tls: Option<(String, Arc<rustls::ClientConfig>)>,
    headers: HeaderMap,
    config: Config,
    websocket_fallback: bool,
}

impl fmt::Debug for H2Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Client")
            .field("addr", &self.addr)
            .field("path", &self.path)
            .field("tls", &self.tls.as_ref().map(|t| &t.0))
            .finish_non_exhaustive()
    }
}

impl H2Client {
    /// A client for the endpoint at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>, config: Config) -> Self {
        H2Client {
            addr: addr.into(),
            path: DEFAULT_PATH.to_owned(),
            tls: None,
            headers: HeaderMap::new(),
            config,
            websocket_fallback: false,
        }
    }

    /// Prefers HTTP/2 but falls back to a WebSocket on the same URL when the server (or a
    /// proxy on the way) speaks only HTTP/1.1: over TLS when ALPN does not select `h2`,
    /// over cleartext when the HTTP/2 connection fails. A session the server *refused*
    /// (an HTTP status) is not retried.
    pub fn websocket_fallback(mut self) -> Self {
        self.websocket_fallback = true;
        self
    }

    fn websocket(&self) -> libchan_ws::WsClient {
        let (scheme, authority) = match &self.tls {
            Some((name, _)) => {
                let port = self.addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("443");
                ("wss", format!("{name}:{port}"))
            }
            None => ("ws", self.addr.clone()),
        };
        let mut ws = libchan_ws::WsClient::new(
            format!("{scheme}://{authority}{}", self.path),
            self.config.clone(),
        );
        for (k, v) in &self.headers {
            if let Ok(v) = v.to_str() {
                ws = ws.header(k.as_str(), v);
            }
        }
        ws
    }

    async fn tcp(&self) -> Result<TcpStream, Error> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| io_err(&format!("connect {}", self.addr), e))?;
        tcp.set_nodelay(true)
            .map_err(|e| io_err("set TCP_NODELAY", e))?;
        Ok(tcp)
    }

    /// The endpoint's path (default [`DEFAULT_PATH`]).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Uses TLS, verifying the server as `server_name`; ALPN is set to `h2`.
    pub fn tls(mut self, server_name: impl Into<String>, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut c = (*tls).clone();
        c.alpn_protocols = vec![b"h2".to_vec()];
        self.tls = Some((server_name.into(), Arc::new(c)));
        self
    }

    /// Adds a header to the session's request (credentials such as `Authorization`).
    /// Invalid names or values are ignored, and so are connection-specific headers
    /// (`Connection`, `Keep-Alive`, `Transfer-Encoding`, …) over HTTP/2, which forbids them.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            self.headers.append(n, v);
        }
        self
    }

    /// Connects, runs the TLS handshake if configured, opens the session's control stream
    /// and runs the libchan handshake. A server that refuses the session gives an
    /// [`ErrorKind::Refused`] error naming the HTTP status and the server's message.
    pub async fn connect(&self) -> Result<Session, Error> {
        let tcp = self.tcp().await?;
        let Some((name, tls)) = &self.tls else {
            return match self.connect_io(tcp, None).await {
                Err(e) if self.websocket_fallback && !e.is_refused() => {
                    let tcp = self.tcp().await?;
                    self.websocket().connect_io(tcp, None).await.map_err(|we| {
                        Error::new(we.kind(), format!("{we} (after HTTP/2 failed: {e})"))
                    })
                }
                r => r,
            };
        };
        let tls = if self.websocket_fallback {
            let mut c = (**tls).clone();
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(c)
        } else {
            tls.clone()
        };
        let timeout = self.config.handshake_timeout_value();
        let s = libchan_tls::client_handshake(tcp, name, tls, timeout).await?;
        let peer = libchan_tls::stream_peer_identity(&s);
        let h2 = match &s {
            libchan_tls::tokio_rustls::TlsStream::Client(c) => {
                c.get_ref().1.alpn_protocol() == Some(b"h2")
            }
            libchan_tls::tokio_rustls::TlsStream::Server(_) => false,
        };
        if !h2 && self.websocket_fallback {
            return self.websocket().connect_io(s, peer).await;
        }
        self.connect_io(s, peer).await
    }

    /// Runs the session over an established connection that speaks HTTP/2 (`peer`: the
    /// identity the caller verified, if any).
    pub async fn connect_io<IO>(&self, io: IO, peer: Option<PeerIdentity>) -> Result<Session, Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let timeout = self.config.handshake_timeout_value();
        match tokio::time::timeout(timeout, self.start(io, peer)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Handshake,
                format!("no HTTP/2 session within handshake_timeout {timeout:?}"),
            )),
        }
    }

    async fn start<IO>(&self, io: IO, peer: Option<PeerIdentity>) -> Result<Session, Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let limits = self.config.limits();
        // h2's client, driven directly: the session's writer hands frames to h2's send
        // buffers and its reader polls h2's receive streams (no body tasks between).
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(h2_window(limits))
            .initial_connection_window_size(16 * 1024 * 1024)
            .max_header_list_size(MAX_RESPONSE_HEADERS)
            // Nothing would read pushed streams: a server may not push.
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| Error::new(ErrorKind::Handshake, format!("HTTP/2 handshake: {e}")))?;
        let (scheme, authority) = match &self.tls {
            Some((name, _)) => {
                let port = self.addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("443");
                ("https", format!("{name}:{port}"))
            }
            None => ("http", self.addr.clone()),
        };
        let uri: Uri = format!("{scheme}://{authority}{}", self.path)
            .parse()
            .map_err(|e| Error::new(ErrorKind::Closed, format!("bad endpoint URI: {e}")))?;
        let flusher = Arc::new(body::Flusher::default());
        let router = Router::new(
            Role::Dialer,
            Some(ClientSide {
                sender: sender.clone(),
                uri: uri.clone(),
                token: std::sync::OnceLock::new(),
                flusher: flusher.clone(),
            }),
            peer,
            limits,
            None,
        );
        let weak = Arc::downgrade(&router);
        let feeder = flusher.clone();
        tokio::spawn(async move {
            // The connection's task: feeds h2 what the session's writer queued, then polls
            // the connection, which writes it (and reads).
            let flusher = feeder;
            let mut conn = std::pin::pin!(conn);
            let r = std::future::poll_fn(|cx| loop {
                let fed = flusher.feed(cx);
                match conn.as_mut().poll(cx) {
                    Poll::Pending if fed => continue,
                    r => return r,
                }
            })
            .await;
            flusher.close();
            if let Some(router) = weak.upgrade() {
                router.fail(match r {
                    Ok(()) => "HTTP/2 connection closed".to_owned(),
                    Err(e) => format!("HTTP/2 connection failed: {e}"),
                });
            }
        });
        let mut req = Request::post(uri)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(VERSION_HEADER, "1")
            .body(())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Closed,
                    format!("building the session request: {e}"),
                )
            })?;
        // HTTP/2 forbids connection-specific headers (h2 refuses a request with one);
        // hyper's client dropped them, and so does this one.
        req.headers_mut()
            .extend(without_connection_headers(&self.headers));
        let lost = |e: h2::Error| {
            Error::new(
                ErrorKind::ConnectionLost,
                format!("session request: {e}{}", reset_hint(&e)),
            )
        };
        let mut sender = sender.ready().await.map_err(lost)?;
        let (response, stream) = sender.send_request(req, false).map_err(lost)?;
        router.control().attach(stream, &flusher);
        let resp = response.await.map_err(lost)?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = router::ClientBody::Body(resp.into_body());
            let text = router::read_text(body, MAX_REFUSAL_TEXT).await;
            return Err(Error::new(
                ErrorKind::Refused,
                format!("the server refused the session: HTTP {status}: {text}"),
            ));
        }
        let Some(token) = resp.headers().get(SESSION_HEADER).cloned() else {
            return Err(Error::new(
                ErrorKind::Handshake,
                format!("the server answered without a {SESSION_HEADER} header: not a libchan endpoint?"),
            ));
        };
        if let Some(client) = router.client() {
            let _ = client.token.set(token);
        }
        router.add_body(Bind::Control, router::ClientBody::Body(resp.into_body()));
        Session::over_link(H2Link(router), Role::Dialer, &self.config).await
    }
}
