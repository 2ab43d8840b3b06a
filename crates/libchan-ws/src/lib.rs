//! WebSocket transport of libchan: the libchan multiplexing protocol (docs/PROTOCOL.md §3
//! on) carried in binary WebSocket messages, over `ws://` or `wss://` (TLS by rustls).
//!
//! The WebSocket subprotocol is [`SUBPROTOCOL`] (`libchan.v1`); a frame may span messages.
//! Servers usually accept WebSocket sessions on the same path as HTTP/2 ones, through
//! `libchan_h2::Endpoint` (an HTTP/1.1 upgrade: [`upgrade_response`] and
//! [`over_upgraded`]); [`accept`] serves a bare tcp or TLS stream.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("ws://{}/libchan", tcp.local_addr().unwrap());
//! let server_config = config.clone();
//! let server = tokio::spawn(async move {
//!     let (s, _) = tcp.accept().await.unwrap();
//!     libchan_ws::accept(s, None, &server_config).await
//! });
//! let client = libchan_ws::WsClient::new(url, config).connect().await?;
//! let server = server.await.unwrap()?;
//! let tx = client.open::<String>().await?;
//! tx.send("over a websocket".into()).await.map_err(|e| e.error)?;
//! let mut rx = server.accept::<String>().await?.expect("a channel");
//! assert_eq!(rx.recv().await?.as_deref(), Some("over a websocket"));
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use http::{HeaderValue, StatusCode};
use libchan_core::driver::{Link, LinkRead, LinkWrite};
use libchan_core::{Config, Error, ErrorKind, PeerIdentity, Role, Session};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub use tokio_tungstenite;

/// The WebSocket subprotocol of libchan version 1.
pub const SUBPROTOCOL: &str = "libchan.v1";
/// Largest binary message this side sends (a batch of frames).
pub const MAX_SEND_MESSAGE: usize = 256 * 1024;
/// Largest message accepted from the peer; larger ones end the session (the peer's
/// batches are at most [`MAX_SEND_MESSAGE`] plus one frame).
pub const MAX_RECV_MESSAGE: usize = 1024 * 1024;
/// Longest refusal text a client reads from a refusing server.
const MAX_REFUSAL_TEXT: usize = 4096;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_RECV_MESSAGE))
        .max_frame_size(Some(MAX_RECV_MESSAGE))
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::with_source(ErrorKind::Io, format!("{what}: {e}"), e)
}

/// A [`Link`] over an established WebSocket.
pub struct WsLink<S> {
    ws: WebSocketStream<S>,
    peer: Option<PeerIdentity>,
}

impl<S> fmt::Debug for WsLink<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsLink")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl<S> WsLink<S> {
    /// Wraps an established WebSocket; `peer` is what the transport verified about the
    /// other side, if anything.
    pub fn new(ws: WebSocketStream<S>, peer: Option<PeerIdentity>) -> Self {
        WsLink { ws, peer }
    }
}

impl<S> Link for WsLink<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn peer_identity(&self) -> Option<PeerIdentity> {
        self.peer.clone()
    }

    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        let (sink, stream) = self.ws.split();
        (
            Box::new(WsRead {
                stream,
                pending: Bytes::new(),
            }),
            Box::new(WsWrite {
                sink,
                in_flight: None,
            }),
        )
    }
}

struct WsRead<S> {
    stream: SplitStream<WebSocketStream<S>>,
    /// The part of a WebSocket message that did not fit the last read's room.
    pending: Bytes,
}

impl<S> LinkRead for WsRead<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(take_into(&mut self.pending, buf)));
        }
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) | Poll::Ready(Some(Ok(Message::Close(_)))) => {
                    return Poll::Ready(Ok(0))
                }
                Poll::Ready(Some(Ok(Message::Binary(b)))) => {
                    if b.is_empty() {
                        continue;
                    }
                    self.pending = b;
                    return Poll::Ready(Ok(take_into(&mut self.pending, buf)));
                }
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a libchan WebSocket (only binary messages carry frames)",
                    )))
                }
                // Pings are answered by the WebSocket layer.
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(format!("websocket: {e}"))))
                }
            }
        }
    }
}

/// Moves as much of `from` as fits in the spare capacity of `buf` (at least one byte).
fn take_into(from: &mut Bytes, buf: &mut BytesMut) -> usize {
    let room = (buf.capacity() - buf.len()).max(1);
    let n = room.min(from.len());
    buf.extend_from_slice(&from.split_to(n));
    n
}

struct WsWrite<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    /// Bytes of the caller's buffer already handed to the sink, not yet flushed.
    in_flight: Option<usize>,
}

impl<S> LinkWrite for WsWrite<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            return Poll::Ready(Err(io::Error::other(
                "a WebSocket cannot pass file descriptors",
            )));
        }
        let ws = |e: WsError| io::Error::other(format!("websocket: {e}"));
        let n = match self.in_flight {
            Some(n) => n,
            None => {
                if let Err(e) = std::task::ready!(Pin::new(&mut self.sink).poll_ready(cx)) {
                    return Poll::Ready(Err(ws(e)));
                }
                let n = buf.len().min(MAX_SEND_MESSAGE);
                let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                if let Err(e) = Pin::new(&mut self.sink).start_send(msg) {
                    return Poll::Ready(Err(ws(e)));
                }
                self.in_flight = Some(n);
                n
            }
        };
        // Flush before reporting the bytes written: the writer does not call again when it
        // has nothing more to send.
        match Pin::new(&mut self.sink).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.in_flight = None;
                // tokio-tungstenite wakes the task that last wrote whenever the socket
                // becomes readable too (one waker proxy per direction, both slots woken).
                // The writer needs no wake-up once its write is done: leave a no-op waker
                // in that slot, so that every message read does not also wake the idle
                // writer (which cost a cross-thread wake-up per round trip).
                let mut idle = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut self.sink).poll_flush(&mut idle);
                Poll::Ready(r.map(|()| n).map_err(ws))
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink)
            .poll_close(cx)
            .map_err(|e| io::Error::other(format!("websocket close: {e}")))
    }
}

/// Connects to a libchan WebSocket endpoint (`ws://host:port/path` or `wss://…`).
#[derive(Clone)]
pub struct WsClient {
    url: String,
    tls: Option<(Option<String>, Arc<rustls::ClientConfig>)>,
    headers: Vec<(String, String)>,
    config: Config,
}

impl fmt::Debug for WsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl WsClient {
    /// A client for `url` (`ws://` or `wss://`).
    pub fn new(url: impl Into<String>, config: Config) -> Self {
        WsClient {
            url: url.into(),
            tls: None,
            headers: Vec::new(),
            config,
        }
    }

    /// The TLS config for `wss://` URLs (the server is verified as the URL's host).
    pub fn tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some((None, tls));
        self
    }

    /// The TLS config for `wss://`, verifying the server as `server_name` instead of the
    /// URL's host (for example when the URL names an IP address).
    pub fn tls_with_name(
        mut self,
        server_name: impl Into<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        self.tls = Some((Some(server_name.into()), tls));
        self
    }

    /// Adds a header to the upgrade request (credentials such as `Authorization`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn target(&self) -> Result<(bool, String, String), Error> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| Error::new(ErrorKind::Closed, format!("bad URL {:?}: {e}", self.url)))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            other => {
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!("URL scheme {other:?} is not ws or wss"),
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "URL without a host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        Ok((secure, host.clone(), format!("{host}:{port}")))
    }

    /// Connects (tcp, then TLS for `wss://`), upgrades to a WebSocket with subprotocol
    /// [`SUBPROTOCOL`] and runs the libchan handshake. A server that refuses the upgrade
    /// gives an [`ErrorKind::Refused`] error naming the HTTP status and the server's text.
    pub async fn connect(&self) -> Result<Session, Error> {
        let (secure, host, addr) = self.target()?;
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| io_err(&format!("connect {addr}"), e))?;
        tcp.set_nodelay(true)
            .map_err(|e| io_err("set TCP_NODELAY", e))?;
        if !secure {
            return self.connect_io(tcp, None).await;
        }
        let Some((name, tls)) = &self.tls else {
            return Err(Error::new(
                ErrorKind::Closed,
                "wss:// URL without a TLS config (WsClient::tls)",
            ));
        };
        let mut tls = (**tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = name.clone().unwrap_or(host);
        let timeout = self.config.handshake_timeout_value();
        let s = libchan_tls::client_handshake(tcp, &name, Arc::new(tls), timeout).await?;
        let peer = libchan_tls::stream_peer_identity(&s);
        self.connect_io(s, peer).await
    }

    /// Upgrades an established connection (tcp or TLS) and runs the session over it.
    pub async fn connect_io<S>(&self, io: S, peer: Option<PeerIdentity>) -> Result<Session, Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let timeout = self.config.handshake_timeout_value();
        let fut = async {
            let ws = self.upgrade(io).await?;
            Session::over_link(WsLink::new(ws, peer), Role::Dialer, &self.config).await
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Handshake,
                format!("no WebSocket session within handshake_timeout {timeout:?}"),
            )),
        }
    }

    async fn upgrade<S>(&self, io: S) -> Result<WebSocketStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut req =
            self.url.as_str().into_client_request().map_err(|e| {
                Error::new(ErrorKind::Closed, format!("bad URL {:?}: {e}", self.url))
            })?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        for (k, v) in &self.headers {
            let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) else {
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!("invalid header {k:?}"),
                ));
            };
            req.headers_mut().append(k, v);
        }
        let (ws, resp) =
            match tokio_tungstenite::client_async_with_config(req, io, Some(ws_config())).await {
                Ok(r) => r,
                Err(WsError::Http(resp)) => {
                    let status = resp.status();
                    let body = resp.body().as_deref().unwrap_or_default();
                    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_REFUSAL_TEXT)]);
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "the server refused the WebSocket session: HTTP {status}: {}",
                            text.trim()
                        ),
                    ));
                }
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Handshake,
                        format!("WebSocket handshake: {e}"),
                    ))
                }
            };
        let proto = resp.headers().get("sec-websocket-protocol");
        if proto.map(|v| v.as_bytes()) != Some(SUBPROTOCOL.as_bytes()) {
            return Err(Error::new(
                ErrorKind::Handshake,
                format!("the server did not select subprotocol {SUBPROTOCOL} (got {proto:?})"),
            ));
        }
        Ok(ws)
    }
}

/// True if `headers` ask for a WebSocket upgrade.
pub fn is_upgrade_request(headers: &http::HeaderMap) -> bool {
    let has = |name: &str, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has("upgrade", "websocket") && has("connection", "upgrade")
}

/// The `101 Switching Protocols` answer to a libchan WebSocket upgrade request, or why it
/// is refused (status and text): wrong WebSocket version, no key, or a client that does not
/// offer [`SUBPROTOCOL`].
pub fn upgrade_response(
    req: &http::request::Parts,
) -> Result<http::Response<()>, (StatusCode, String)> {
    if req.method != http::Method::GET {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket upgrades use GET".into(),
        ));
    }
    if req
        .headers
        .get("sec-websocket-version")
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Version must be 13".into(),
        ));
    }
    let Some(key) = req.headers.get("sec-websocket-key") else {
        return Err((StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key".into()));
    };
    let offers = req
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offers {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("the client does not offer WebSocket subprotocol {SUBPROTOCOL}"),
        ));
    }
    let accept = derive_accept_key(key.as_bytes());
    http::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", SUBPROTOCOL)
        .body(())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Runs the server side of a session over a connection that an HTTP server already
/// upgraded (after sending [`upgrade_response`]).
pub async fn over_upgraded<S>(
    io: S,
    peer: Option<PeerIdentity>,
    config: &Config,
) -> Result<Session, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, Some(ws_config())).await;
    Session::over_link(WsLink::new(ws, peer), Role::Listener, config).await
}

/// Serves one WebSocket session on a bare connection (tcp or TLS): runs the HTTP upgrade
/// (any path; subprotocol [`SUBPROTOCOL`] required) and the libchan handshake, both within
/// the configured handshake timeout.
pub async fn accept<S>(io: S, peer: Option<PeerIdentity>, config: &Config) -> Result<Session, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let timeout = config.handshake_timeout_value();
    let fut = async {
        // The callback's type is tungstenite's.
        #[allow(clippy::result_large_err)]
        let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let (parts, ()) = req.clone().into_parts();
            match upgrade_response(&parts) {
                // tungstenite computes the accept key itself; add the subprotocol.
                Ok(_) => {
                    let mut resp = resp;
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(SUBPROTOCOL),
                    );
                    Ok(resp)
                }
                Err((status, text)) => {
                    let mut r = ErrorResponse::new(Some(text));
                    *r.status_mut() = status;
                    Err(r)
                }
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(ws_config()))
            .await
            .map_err(|e| Error::new(ErrorKind::Handshake, format!("WebSocket handshake: {e}")))?;
        Session::over_link(WsLink::new(ws, peer), Role::Listener, config).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::Handshake,
            format!("no WebSocket session within handshake_timeout {timeout:?}"),
        )),
    }
}
