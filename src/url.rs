//! [`connect`] and [`listen`] by URL, and [`Options`] for everything a URL does not say.

use std::fmt;

use libchan_core::{Config, Error, ErrorKind, Session};

/// Connects to `url` with default [`Options`] (CBOR, default limits).
///
/// | URL | transport | feature |
/// |---|---|---|
/// | `unix:///run/app.sock` | unix socket, descriptors passed | `unix` |
/// | `tcp://host:port` | tcp | `tcp` |
/// | `tls://host:port` | TLS over tcp ([`Options::tls_client`]) | `tls` |
/// | `http://host:port/path` | HTTP/2 cleartext (h2c), path default `/libchan` | `h2` |
/// | `https://host:port/path` | HTTP/2 over TLS ([`Options::tls_client`]) | `h2` |
/// | `ws://host:port/path`, `wss://…` | WebSocket | `ws` |
///
/// A URL whose transport is not compiled in is an error naming the feature to enable.
/// Needs the `cbor` feature (the default codec); with another codec use
/// [`Options::with_config`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), libchan::Error> {
/// let listener = libchan::listen("tcp://127.0.0.1:0").await?;
/// let url = listener.local_url();
/// let (client, server) = tokio::join!(libchan::connect(&url), listener.accept());
/// let (client, server) = (client?, server?);
/// let tx = client.open::<String>().await?;
/// let mut rx = server.accept::<String>().await?.expect("a channel");
/// tx.send("hi".into()).await.map_err(|e| e.error)?;
/// assert_eq!(rx.recv().await?.as_deref(), Some("hi"));
/// # Ok(()) }
/// ```
#[cfg(feature = "cbor")]
pub async fn connect(url: &str) -> Result<Session, Error> {
    Options::new().connect(url).await
}

/// Listens at `url` with default [`Options`]; see [`connect`] for the URLs. Port 0 picks
/// a free port ([`Listener::local_url`] tells which).
#[cfg(feature = "cbor")]
pub async fn listen(url: &str) -> Result<Listener, Error> {
    Options::new().listen(url).await
}

fn misuse(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Closed, message)
}

#[allow(dead_code)] // which helpers are used depends on the features
fn feature_off(scheme: &str, feature: &str) -> Error {
    misuse(format!(
        "{scheme}:// URLs need the libchan feature `{feature}` (features = [\"{feature}\"] in Cargo.toml)"
    ))
}

/// A URL taken apart: scheme, `host:port` (or the path of a unix socket), HTTP path.
#[derive(Debug)]
#[allow(dead_code)] // which fields are read depends on the features
struct Target<'a> {
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
}

fn parse(url: &str) -> Result<Target<'_>, Error> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| misuse(format!("{url:?} is not a URL (scheme://...)")))?;
    if scheme == "unix" {
        if rest.is_empty() {
            return Err(misuse(format!("{url:?} names no socket path")));
        }
        return Ok(Target {
            scheme,
            authority: rest,
            path: "",
        });
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(misuse(format!("{url:?} names no host")));
    }
    Ok(Target {
        scheme,
        authority,
        path,
    })
}

/// `host:port`, with the scheme's default port when the URL has none.
#[allow(dead_code)]
fn with_port(authority: &str, default: u16) -> String {
    let has_port = match authority.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with('['),
        None => false,
    };
    if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{default}")
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
#[allow(dead_code)]
fn host(authority: &str) -> &str {
    let h = if authority.starts_with('[') {
        authority.split(']').next().unwrap_or(authority)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    h.trim_matches(|c| c == '[' || c == ']')
}

#[allow(dead_code)]
fn http_path(path: &str) -> &str {
    if path.is_empty() || path == "/" {
        "/libchan"
    } else {
        path
    }
}

/// How to connect or listen, beyond what the URL says: codec and limits ([`Config`]), TLS,
/// request headers (credentials for an authorizing endpoint), the WebSocket fallback.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), libchan::Error> {
/// use std::time::Duration;
/// let options = libchan::Options::new()
///     .config(libchan::config().keepalive(Duration::from_secs(30)));
/// let listener = options.listen("tcp://127.0.0.1:0").await?;
/// let url = listener.local_url();
/// let (client, server) = tokio::join!(options.connect(&url), listener.accept());
/// assert_eq!(client?.codec(), server?.codec());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Options {
    config: Config,
    #[cfg(feature = "tls")]
    tls_client: Option<std::sync::Arc<libchan_tls::rustls::ClientConfig>>,
    #[cfg(feature = "tls")]
    tls_server: Option<std::sync::Arc<libchan_tls::rustls::ServerConfig>>,
    #[cfg(feature = "tls")]
    server_name: Option<String>,
    headers: Vec<(String, String)>,
    websocket_fallback: bool,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("config", &self.config)
            .field("headers", &self.headers.len())
            .field("websocket_fallback", &self.websocket_fallback)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "cbor")]
impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

impl Options {
    /// Default options: [`config()`](crate::config()) (CBOR, default limits), no TLS, no
    /// headers.
    #[cfg(feature = "cbor")]
    pub fn new() -> Self {
        Options::with_config(crate::config())
    }

    /// Options with `config` (codec, limits, timeouts, keepalive).
    pub fn with_config(config: Config) -> Self {
        Options {
            config,
            #[cfg(feature = "tls")]
            tls_client: None,
            #[cfg(feature = "tls")]
            tls_server: None,
            #[cfg(feature = "tls")]
            server_name: None,
            headers: Vec::new(),
            websocket_fallback: false,
        }
    }

    /// Replaces the session configuration (codec, limits, timeouts, keepalive).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The TLS configuration to connect with (`tls://`, `https://`, `wss://`), for
    /// example from [`ClientTls`](libchan_tls::ClientTls). The server is verified as the
    /// URL's host unless [`server_name`](Options::server_name) says otherwise.
    #[cfg(feature = "tls")]
    pub fn tls_client(mut self, tls: std::sync::Arc<libchan_tls::rustls::ClientConfig>) -> Self {
        self.tls_client = Some(tls);
        self
    }

    /// The name to verify the server's certificate against, when the URL's host is not it
    /// (for example an IP address).
    #[cfg(feature = "tls")]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The TLS configuration to listen with (`tls://`, `https://`, `wss://`), for example
    /// from [`ServerTls`](libchan_tls::ServerTls).
    #[cfg(feature = "tls")]
    pub fn tls_server(mut self, tls: std::sync::Arc<libchan_tls::rustls::ServerConfig>) -> Self {
        self.tls_server = Some(tls);
        self
    }

    /// Adds a request header for `http(s)://` and `ws(s)://` (credentials such as
    /// `Authorization`, checked by the server's `Endpoint::authorize`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// For `http(s)://`: fall back to a WebSocket on the same URL when the server or a
    /// proxy speaks only HTTP/1.1.
    pub fn websocket_fallback(mut self) -> Self {
        self.websocket_fallback = true;
        self
    }

    #[cfg(feature = "tls")]
    fn client_tls(
        &self,
        scheme: &str,
    ) -> Result<std::sync::Arc<libchan_tls::rustls::ClientConfig>, Error> {
        self.tls_client.clone().ok_or_else(|| {
            misuse(format!(
                "{scheme}:// needs a client TLS configuration: Options::tls_client(ClientTls::...build()?)"
            ))
        })
    }

    #[cfg(feature = "tls")]
    fn server_tls(
        &self,
        scheme: &str,
    ) -> Result<std::sync::Arc<libchan_tls::rustls::ServerConfig>, Error> {
        self.tls_server.clone().ok_or_else(|| {
            misuse(format!(
                "listening on {scheme}:// needs a server TLS configuration: Options::tls_server(ServerTls::...build()?)"
            ))
        })
    }

    #[cfg(feature = "tls")]
    fn name_for<'a>(&'a self, authority: &'a str) -> &'a str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| host(authority))
    }

    /// Connects to `url` (see [`connect`] for the URLs).
    pub async fn connect(&self, url: &str) -> Result<Session, Error> {
        let t = parse(url)?;
        match t.scheme {
            "unix" => {
                #[cfg(feature = "unix")]
                return libchan_unix::connect(t.authority, &self.config).await;
                #[cfg(not(feature = "unix"))]
                return Err(feature_off("unix", "unix"));
            }
            "tcp" => {
                #[cfg(feature = "tcp")]
                return libchan_tcp::connect(t.authority, &self.config).await;
                #[cfg(not(feature = "tcp"))]
                return Err(feature_off("tcp", "tcp"));
            }
            "tls" => {
                #[cfg(feature = "tls")]
                return libchan_tls::connect(
                    t.authority,
                    self.name_for(t.authority),
                    self.client_tls("tls")?,
                    &self.config,
                )
                .await;
                #[cfg(not(feature = "tls"))]
                return Err(feature_off("tls", "tls"));
            }
            "http" | "https" => {
                #[cfg(feature = "h2")]
                {
                    let secure = t.scheme == "https";
                    let addr = with_port(t.authority, if secure { 443 } else { 80 });
                    let mut c = libchan_h2::H2Client::new(addr, self.config.clone())
                        .path(http_path(t.path));
                    if secure {
                        c = c.tls(self.name_for(t.authority), self.client_tls("https")?);
                    }
                    for (k, v) in &self.headers {
                        c = c.header(k, v);
                    }
                    if self.websocket_fallback {
                        c = c.websocket_fallback();
                    }
                    return c.connect().await;
                }
                #[cfg(not(feature = "h2"))]
                return Err(feature_off(t.scheme, "h2"));
            }
            "ws" | "wss" => {
                #[cfg(feature = "ws")]
                {
                    let full = format!("{}://{}{}", t.scheme, t.authority, http_path(t.path));
                    let mut c = libchan_ws::WsClient::new(full, self.config.clone());
                    if t.scheme == "wss" {
                        let tls = self.client_tls("wss")?;
                        c = match &self.server_name {
                            Some(n) => c.tls_with_name(n.clone(), tls),
                            None => c.tls(tls),
                        };
                    }
                    for (k, v) in &self.headers {
                        c = c.header(k, v);
                    }
                    return c.connect().await;
                }
                #[cfg(not(feature = "ws"))]
                return Err(feature_off(t.scheme, "ws"));
            }
            other => Err(misuse(format!(
                "unknown URL scheme {other:?} (unix, tcp, tls, http, https, ws, wss)"
            ))),
        }
    }

    /// Listens at `url` (see [`connect`] for the URLs). `ws://` and `wss://` are served by
    /// the HTTP/2 endpoint, which answers WebSocket upgrades on the same path (feature
    /// `h2`).
    #[allow(unreachable_code, unused_variables)] // with no transport feature compiled in
    pub async fn listen(&self, url: &str) -> Result<Listener, Error> {
        let t = parse(url)?;
        let inner = match t.scheme {
            "unix" => {
                #[cfg(feature = "unix")]
                {
                    Inner::Unix(libchan_unix::UnixListener::bind(
                        t.authority,
                        self.config.clone(),
                    )?)
                }
                #[cfg(not(feature = "unix"))]
                return Err(feature_off("unix", "unix"));
            }
            "tcp" => {
                #[cfg(feature = "tcp")]
                {
                    Inner::Tcp(
                        libchan_tcp::TcpListener::bind(t.authority, self.config.clone()).await?,
                    )
                }
                #[cfg(not(feature = "tcp"))]
                return Err(feature_off("tcp", "tcp"));
            }
            "tls" => {
                #[cfg(feature = "tls")]
                {
                    Inner::Tls(
                        libchan_tls::TlsListener::bind(
                            t.authority,
                            self.server_tls("tls")?,
                            self.config.clone(),
                        )
                        .await?,
                    )
                }
                #[cfg(not(feature = "tls"))]
                return Err(feature_off("tls", "tls"));
            }
            "http" | "https" | "ws" | "wss" => {
                #[cfg(feature = "h2")]
                {
                    let secure = matches!(t.scheme, "https" | "wss");
                    let addr = with_port(t.authority, if secure { 443 } else { 80 });
                    let endpoint =
                        libchan_h2::Endpoint::new(self.config.clone()).path(http_path(t.path));
                    let tls = if secure {
                        Some(self.server_tls(t.scheme)?)
                    } else {
                        None
                    };
                    Inner::H2(
                        libchan_h2::H2Listener::with_endpoint(&addr, endpoint, tls).await?,
                        t.scheme.to_owned(),
                        http_path(t.path).to_owned(),
                    )
                }
                #[cfg(not(feature = "h2"))]
                return Err(feature_off(t.scheme, "h2"));
            }
            other => {
                return Err(misuse(format!(
                    "unknown URL scheme {other:?} (unix, tcp, tls, http, https, ws, wss)"
                )))
            }
        };
        Ok(Listener { inner })
    }
}

/// A listener made by [`listen`] or [`Options::listen`].
pub struct Listener {
    inner: Inner,
}

enum Inner {
    #[cfg(feature = "unix")]
    Unix(libchan_unix::UnixListener),
    #[cfg(feature = "tcp")]
    Tcp(libchan_tcp::TcpListener),
    #[cfg(feature = "tls")]
    Tls(libchan_tls::TlsListener),
    #[cfg(feature = "h2")]
    H2(libchan_h2::H2Listener, String, String),
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Listener").field(&self.local_url()).finish()
    }
}

impl Listener {
    /// The next session.
    pub async fn accept(&self) -> Result<Session, Error> {
        match &self.inner {
            #[cfg(feature = "unix")]
            Inner::Unix(l) => l.accept().await,
            #[cfg(feature = "tcp")]
            Inner::Tcp(l) => l.accept().await,
            #[cfg(feature = "tls")]
            Inner::Tls(l) => l.accept().await,
            #[cfg(feature = "h2")]
            Inner::H2(l, _, _) => l.accept().await,
            #[allow(unreachable_patterns)]
            _ => Err(misuse("no transport compiled in")),
        }
    }

    /// The URL clients connect to (with the port chosen when the URL said 0).
    pub fn local_url(&self) -> String {
        match &self.inner {
            #[cfg(feature = "unix")]
            Inner::Unix(l) => format!("unix://{}", l.path().display()),
            #[cfg(feature = "tcp")]
            Inner::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_owned(),
            },
            #[cfg(feature = "tls")]
            Inner::Tls(l) => match l.local_addr() {
                Ok(a) => format!("tls://{a}"),
                Err(_) => "tls://?".to_owned(),
            },
            #[cfg(feature = "h2")]
            Inner::H2(l, scheme, path) => format!("{scheme}://{}{path}", l.local_addr()),
            #[allow(unreachable_patterns)]
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let t = parse("unix:///run/a.sock").unwrap();
        assert_eq!((t.scheme, t.authority), ("unix", "/run/a.sock"));
        let t = parse("https://example.com/api/chan").unwrap();
        assert_eq!((t.authority, t.path), ("example.com", "/api/chan"));
        assert_eq!(with_port("example.com", 443), "example.com:443");
        assert_eq!(with_port("example.com:8443", 443), "example.com:8443");
        assert_eq!(with_port("[::1]", 80), "[::1]:80");
        assert_eq!(with_port("[::1]:81", 80), "[::1]:81");
        assert_eq!(host("[::1]:81"), "::1");
        assert_eq!(host("example.com:1"), "example.com");
        assert_eq!(http_path(""), "/libchan");
        assert!(parse("localhost:80").is_err());
        assert!(parse("tcp://").is_err());
        assert!(parse("unix://").is_err());
    }

    /// Only compiled without these features (`.ci/run` builds the facade so once).
    #[cfg(not(any(feature = "tls", feature = "h2", feature = "ws")))]
    #[tokio::test]
    async fn urls_of_transports_not_compiled_in_name_the_feature() {
        for (url, feature) in [
            ("tls://h:1", "`tls`"),
            ("https://h", "`h2`"),
            ("http://h", "`h2`"),
            ("ws://h", "`ws`"),
            ("wss://h", "`ws`"),
        ] {
            let e = connect(url).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Closed, "{url}: {e}");
            assert!(e.to_string().contains(feature), "{url}: {e}");
        }
        let e = listen("ws://127.0.0.1:0").await.unwrap_err();
        assert!(e.to_string().contains("`h2`"), "{e}");
    }
}
