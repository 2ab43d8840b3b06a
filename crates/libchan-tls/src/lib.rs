//! TLS transport of libchan: the libchan multiplexing protocol inside TLS (rustls with the
//! *ring* provider), over tcp.
//!
//! Defaults are the safe ones: TLS 1.2 and 1.3 only, the server's certificate verified
//! against the roots the client is given (no built-in roots: pass your CA, or a rustls
//! config with the roots you trust). Mutual TLS is one call on each side
//! ([`ServerTls::require_client_cert`], [`ClientTls::client_cert`]), and the verified peer
//! is available on the session as [`Session::peer_identity`] (certificate chain and subject
//! names). Turning verification off takes
//! [`ClientTls::dangerous_accept_any_server_certificate`].
//!
//! Library code here never calls rustls' process-wide default provider: every config is
//! built with [`crypto_provider`], so an application that also links aws-lc-rs still works.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! # let pki = libchan_test_support::pki::test_pki();
//! # let (cert_pem, key_pem, ca_pem) =
//! #     (pki.server_cert_pem.as_bytes(), pki.server_key_pem.as_bytes(), pki.ca_pem.as_bytes());
//! use libchan_tls::{ClientTls, ServerTls, TlsListener};
//! let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
//! let server_tls = ServerTls::from_pem(cert_pem, key_pem)?.build()?;
//! let client_tls = ClientTls::with_roots_pem(ca_pem)?.build()?;
//!
//! let listener = TlsListener::bind("127.0.0.1:0", server_tls, config.clone()).await?;
//! let addr = listener.local_addr()?;
//! let (client, server) = tokio::join!(
//!     libchan_tls::connect(addr, "localhost", client_tls, &config),
//!     listener.accept()
//! );
//! let (client, server) = (client?, server?);
//! let tx = client.open::<String>().await?;
//! let mut rx = server.accept::<String>().await?.expect("a channel");
//! tx.send("over tls".into()).await.map_err(|e| e.error)?;
//! assert_eq!(rx.recv().await?.as_deref(), Some("over tls"));
//! // The client verified the server's certificate, and can tell whom it talks to.
//! let id = client.peer_identity().expect("verified server");
//! assert_eq!(id.subject_names(), ["localhost"]);
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use libchan_core::driver::{IoRead, IoWrite, Link, LinkRead, LinkWrite, WriteInline};
use libchan_core::{Config, Error, ErrorKind, PeerIdentity, Role, Session};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

pub use rustls;
pub use tokio_rustls;

/// The crypto provider every config of this crate is built with (*ring*).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl fmt::Display) -> Error {
    Error::new(ErrorKind::Closed, format!("tls configuration: {what}: {e}"))
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::with_source(ErrorKind::Io, format!("{what}: {e}"), e)
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(what, e))?;
    if certs.is_empty() {
        return Err(tls_err(what, "no CERTIFICATE block in the PEM input"));
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| tls_err(what, e))
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| io_err(&format!("read {}", path.display()), e))
}

fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(pem, "CA certificates")? {
        roots.add(c).map_err(|e| tls_err("CA certificate", e))?;
    }
    Ok(roots)
}

/// Builds a rustls [`ServerConfig`] for libchan listeners.
///
/// ```
/// # let pki = libchan_test_support::pki::test_pki();
/// let tls = libchan_tls::ServerTls::from_pem(pki.server_cert_pem.as_bytes(), pki.server_key_pem.as_bytes())?
///     .require_client_cert(pki.ca_pem.as_bytes())? // mutual TLS
///     .build()?;
/// assert!(tls.alpn_protocols.is_empty());
/// # Ok::<(), libchan_core::Error>(())
/// ```
pub struct ServerTls {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
    alpn: Vec<Vec<u8>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certs", &self.certs.len())
            .field("mutual", &self.client_roots.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// A certificate chain (leaf first) and its private key, PEM.
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        Ok(ServerTls {
            certs: certs_from_pem(cert_chain_pem, "server certificate chain")?,
            key: key_from_pem(key_pem, "server private key")?,
            client_roots: None,
            alpn: Vec::new(),
        })
    }

    /// Like [`from_pem`](ServerTls::from_pem), reading the two files.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        Self::from_pem(&read_file(cert_chain.as_ref())?, &read_file(key.as_ref())?)
    }

    /// Mutual TLS: clients must present a certificate issued by one of these CAs (PEM).
    pub fn require_client_cert(mut self, ca_pem: &[u8]) -> Result<Self, Error> {
        self.client_roots = Some(roots_from_pem(ca_pem)?);
        Ok(self)
    }

    /// ALPN protocols to offer, most preferred first (the HTTP/2 transport sets `h2`).
    pub fn alpn(mut self, protocols: Vec<Vec<u8>>) -> Self {
        self.alpn = protocols;
        self
    }

    /// The rustls config: TLS 1.2 and 1.3, the *ring* provider.
    pub fn build(self) -> Result<Arc<ServerConfig>, Error> {
        let provider = crypto_provider();
        let b = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("protocol versions", e))?;
        let b = match self.client_roots {
            Some(roots) => {
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| tls_err("client verifier", e))?;
                b.with_client_cert_verifier(v)
            }
            None => b.with_no_client_auth(),
        };
        let mut cfg = b
            .with_single_cert(self.certs, self.key)
            .map_err(|e| tls_err("server certificate", e))?;
        cfg.alpn_protocols = self.alpn;
        Ok(Arc::new(cfg))
    }
}

/// Builds a rustls [`ClientConfig`] for libchan clients.
///
/// ```
/// # let pki = libchan_test_support::pki::test_pki();
/// let tls = libchan_tls::ClientTls::with_roots_pem(pki.ca_pem.as_bytes())?
///     .client_cert(pki.client_cert_pem.as_bytes(), pki.client_key_pem.as_bytes())?
///     .build()?;
/// # let _ = tls;
/// # Ok::<(), libchan_core::Error>(())
/// ```
pub struct ClientTls {
    roots: RootCertStore,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    accept_any_server_certificate: bool,
    alpn: Vec<Vec<u8>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots.len())
            .field("client_cert", &self.client_cert.is_some())
            .field(
                "accept_any_server_certificate",
                &self.accept_any_server_certificate,
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_pem` (one or more PEM blocks).
    pub fn with_roots_pem(ca_pem: &[u8]) -> Result<Self, Error> {
        Ok(Self::with_roots(roots_from_pem(ca_pem)?))
    }

    /// Like [`with_roots_pem`](ClientTls::with_roots_pem), reading a file.
    pub fn with_roots_pem_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::with_roots_pem(&read_file(path.as_ref())?)
    }

    /// Trusts the roots of a rustls store (e.g. filled from `webpki-roots`).
    pub fn with_roots(roots: RootCertStore) -> Self {
        ClientTls {
            roots,
            client_cert: None,
            accept_any_server_certificate: false,
            alpn: Vec::new(),
        }
    }

    /// Presents this certificate chain and key (PEM) to servers that ask (mutual TLS).
    pub fn client_cert(mut self, cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        self.client_cert = Some((
            certs_from_pem(cert_chain_pem, "client certificate chain")?,
            key_from_pem(key_pem, "client private key")?,
        ));
        Ok(self)
    }

    /// **Turns server certificate verification off.** Any certificate for any name is
    /// accepted, so anyone on the path can impersonate the server. For tests and for
    /// setups where the peer is authenticated by other means only.
    pub fn dangerous_accept_any_server_certificate(mut self) -> Self {
        self.accept_any_server_certificate = true;
        self
    }

    /// ALPN protocols to offer, most preferred first.
    pub fn alpn(mut self, protocols: Vec<Vec<u8>>) -> Self {
        self.alpn = protocols;
        self
    }

    /// The rustls config: TLS 1.2 and 1.3, the *ring* provider.
    pub fn build(self) -> Result<Arc<ClientConfig>, Error> {
        let provider = crypto_provider();
        let b = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("protocol versions", e))?;
        let b = if self.accept_any_server_certificate {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
        } else {
            b.with_root_certificates(self.roots)
        };
        let mut cfg = match self.client_cert {
            Some((certs, key)) => b
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err("client certificate", e))?,
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn;
        Ok(Arc::new(cfg))
    }
}

/// Accepts any server certificate, but still checks the handshake signatures with it.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The identity of the peer of a TLS connection: its certificate chain and the DNS and URI
/// subject alternative names of its end-entity certificate. `None` if it presented none.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<PeerIdentity> {
    let chain = conn.peer_certificates()?;
    let leaf = chain.first()?;
    let names = match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => cert
            .valid_dns_names()
            .chain(cert.valid_uri_names())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    };
    Some(
        PeerIdentity::new()
            .with_certificates(chain.iter().map(|c| c.as_ref().to_vec()).collect())
            .with_subject_names(names),
    )
}

/// The identity of the peer of an established TLS stream (see [`peer_identity`]).
pub fn stream_peer_identity<S>(stream: &TlsStream<S>) -> Option<PeerIdentity> {
    match stream {
        TlsStream::Client(c) => peer_identity(c.get_ref().1),
        TlsStream::Server(s) => peer_identity(s.get_ref().1),
    }
}

fn handshake_err(e: io::Error) -> Error {
    Error::with_source(ErrorKind::Handshake, format!("tls handshake: {e}"), e)
}

async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::Handshake,
            format!("tls handshake not done within handshake_timeout {timeout:?}"),
        )),
    }
}

/// Runs the client side of a TLS handshake on `tcp` (bounded by `timeout`). For
/// transports that put their own protocol inside TLS (HTTP/2, WebSocket).
pub async fn client_handshake(
    tcp: TcpStream,
    server_name: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, Error> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        Error::new(
            ErrorKind::Closed,
            format!("server name {server_name:?}: {e}"),
        )
    })?;
    tcp.set_nodelay(true)
        .map_err(|e| io_err("set TCP_NODELAY", e))?;
    bounded(timeout, async {
        let s = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(handshake_err)?;
        Ok(TlsStream::Client(s))
    })
    .await
}

/// Runs the server side of a TLS handshake on `tcp` (bounded by `timeout`).
pub async fn server_handshake(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, Error> {
    tcp.set_nodelay(true)
        .map_err(|e| io_err("set TCP_NODELAY", e))?;
    bounded(timeout, async {
        let s = TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .map_err(handshake_err)?;
        Ok(TlsStream::Server(s))
    })
    .await
}

/// Connects to a libchan TLS listener, verifies it as `server_name`, and runs the libchan
/// handshake. The TLS handshake counts against [`Config::handshake_timeout`].
pub async fn connect(
    addr: impl ToSocketAddrs,
    server_name: &str,
    tls: Arc<ClientConfig>,
    config: &Config,
) -> Result<Session, Error> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| io_err("connect", e))?;
    let s = client_handshake(tcp, server_name, tls, config.handshake_timeout_value()).await?;
    Session::over_link(TlsLink(s), Role::Dialer, config).await
}

/// A listening tcp socket that runs TLS and then a libchan session per connection.
pub struct TlsListener {
    inner: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    config: Config,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Binds to `addr` (port 0 picks a free port).
    pub async fn bind(
        addr: impl ToSocketAddrs,
        tls: Arc<ServerConfig>,
        config: Config,
    ) -> Result<Self, Error> {
        let inner = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err("bind", e))?;
        Ok(TlsListener { inner, tls, config })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.inner.local_addr().map_err(|e| io_err("local_addr", e))
    }

    /// Accepts a connection and runs the TLS and libchan handshakes, each bounded by the
    /// configured handshake timeout. A client failing TLS gives an
    /// [`ErrorKind::Handshake`] error; to keep serving, call `accept` again. To keep one
    /// slow client from delaying others, use [`accept_tcp`](TlsListener::accept_tcp) and
    /// run [`TlsListener::handshake`] in a task.
    pub async fn accept(&self) -> Result<Session, Error> {
        let tcp = self.accept_tcp().await?;
        self.handshake(tcp).await
    }

    /// Accepts a tcp connection without any handshake.
    pub async fn accept_tcp(&self) -> Result<TcpStream, Error> {
        let (s, _) = self.inner.accept().await.map_err(|e| io_err("accept", e))?;
        Ok(s)
    }

    /// Runs the TLS and libchan handshakes on an accepted connection.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<Session, Error> {
        let s =
            server_handshake(tcp, self.tls.clone(), self.config.handshake_timeout_value()).await?;
        Session::over_link(TlsLink(s), Role::Listener, &self.config).await
    }
}

/// A [`Link`] over an established TLS stream; the peer's certificate becomes the session's
/// [`PeerIdentity`].
#[derive(Debug)]
pub struct TlsLink(pub TlsStream<TcpStream>);

impl Link for TlsLink {
    fn peer_identity(&self) -> Option<PeerIdentity> {
        stream_peer_identity(&self.0)
    }

    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        let (r, w) = tokio::io::split(self.0);
        // Sending tasks may write it (`LinkWrite::can_write_inline`); rustls keeps the
        // records the socket did not take, and the writer task flushes them.
        (Box::new(IoRead(r)), Box::new(WriteInline(IoWrite(w))))
    }
}
