//! TCP transport of libchan.
//!
//! The libchan multiplexing protocol over a TCP connection (`TCP_NODELAY` set). A
//! descriptor in a message ([`libchan_core::Fd`]) cannot be passed over tcp: its contents
//! travel as a byte stream and the receiver gets [`libchan_core::Fd::into_stream`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! let config = libchan_core::Config::new(libchan_codec_cbor::Cbor);
//! let listener = libchan_tcp::TcpListener::bind("127.0.0.1:0", config.clone()).await?;
//! let addr = listener.local_addr()?;
//! let (client, server) = tokio::join!(libchan_tcp::connect(addr, &config), listener.accept());
//! let (client, server) = (client?, server?);
//! let tx = client.open::<u64>().await?;
//! let mut rx = server.accept::<u64>().await?.unwrap();
//! tx.send(5).await.map_err(|e| e.error)?;
//! assert_eq!(rx.recv().await?, Some(5));
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;

use libchan_core::driver::{IoRead, IoWrite, Link, LinkRead, LinkWrite, WriteInline};
use libchan_core::{Config, Error, ErrorKind, Role, Session};
use tokio::net::{TcpStream, ToSocketAddrs};

fn io_err(what: &str, e: io::Error) -> Error {
    Error::with_source(ErrorKind::Io, format!("{what}: {e}"), e)
}

/// Connects to a libchan tcp listener and runs the handshake.
pub async fn connect(addr: impl ToSocketAddrs, config: &Config) -> Result<Session, Error> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| io_err("connect", e))?;
    over_stream(s, Role::Dialer, config).await
}

/// Runs a session over a connected tcp stream.
pub async fn over_stream(stream: TcpStream, role: Role, config: &Config) -> Result<Session, Error> {
    stream
        .set_nodelay(true)
        .map_err(|e| io_err("set TCP_NODELAY", e))?;
    Session::over_link(TcpLink(stream), role, config).await
}

/// A listening tcp socket that yields a [`Session`] per connection.
#[derive(Debug)]
pub struct TcpListener {
    inner: tokio::net::TcpListener,
    config: Config,
}

impl TcpListener {
    /// Binds to `addr` (port 0 picks a free port).
    pub async fn bind(addr: impl ToSocketAddrs, config: Config) -> Result<Self, Error> {
        let inner = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io_err("bind", e))?;
        Ok(TcpListener { inner, config })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.inner.local_addr().map_err(|e| io_err("local_addr", e))
    }

    /// Accepts a connection and runs its handshake (bounded by the configured handshake
    /// timeout). To keep one slow client from delaying others, use
    /// [`accept_stream`](TcpListener::accept_stream) and run [`over_stream`] in a task.
    pub async fn accept(&self) -> Result<Session, Error> {
        let s = self.accept_stream().await?;
        over_stream(s, Role::Listener, &self.config).await
    }

    /// Accepts a connection without running the handshake.
    pub async fn accept_stream(&self) -> Result<TcpStream, Error> {
        let (s, _) = self.inner.accept().await.map_err(|e| io_err("accept", e))?;
        Ok(s)
    }
}

/// A [`Link`] over a tcp stream.
#[derive(Debug)]
pub struct TcpLink(pub TcpStream);

impl Link for TcpLink {
    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        let (r, w) = self.0.into_split();
        // A tokio socket: sending tasks may write it (`LinkWrite::can_write_inline`).
        (Box::new(IoRead(r)), Box::new(WriteInline(IoWrite(w))))
    }
}
