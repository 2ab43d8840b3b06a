//! The tcp gateway: raw tcp connections handed to a libchan service as attachments.
//!
//! A [`Gateway`] accepts plain tcp connections (from any client: `redis-cli`, `psql`,
//! `ssh`…) and sends each, as an [`Accepted`] message, on a [`Sender`] that leads to a
//! service. Over a unix-socket session the connection's descriptor itself is passed
//! (`SCM_RIGHTS`): the service then talks to the client directly and no byte goes through
//! the gateway. Over any other transport the connection travels as a byte stream that the
//! gateway copies. The service side does not care which: [`Accepted::into_io`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan::Error> {
//! use libchan::gateway::{Accepted, Gateway};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let (gw_side, service_side) = libchan::unix::pair(&libchan::config()).await?;
//! let conns = gw_side.open::<Accepted>().await?;
//! let gateway = Gateway::bind("127.0.0.1:0").await?;
//! let addr = gateway.local_addr()?;
//! tokio::spawn(gateway.serve(conns));
//!
//! // The service: echo upper-cased, on the client's own socket.
//! tokio::spawn(async move {
//!     let mut incoming = service_side.accept::<Accepted>().await?.expect("channel");
//!     while let Some(accepted) = incoming.recv().await? {
//!         let mut io = accepted.into_io()?;
//!         let mut buf = [0u8; 5];
//!         io.read_exact(&mut buf).await.ok();
//!         io.write_all(&buf.to_ascii_uppercase()).await.ok();
//!     }
//!     Ok::<_, libchan::Error>(())
//! });
//!
//! let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
//! client.write_all(b"hello").await.expect("write");
//! let mut back = [0u8; 5];
//! client.read_exact(&mut back).await.expect("read");
//! assert_eq!(&back, b"HELLO");
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use libchan_core::{ByteStream, Error, ErrorKind, Fd, Sender};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

/// One accepted tcp connection, as the service receives it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    /// The connection: a descriptor over unix, a byte stream elsewhere.
    pub conn: Fd,
    /// The client's address as the gateway saw it.
    pub peer_addr: String,
    /// The gateway's address the client connected to.
    pub local_addr: String,
}

impl Accepted {
    /// The connection as something to read and write: the client's own socket when the
    /// descriptor was passed, else the byte stream.
    pub fn into_io(self) -> Result<ClientIo, Error> {
        match self.conn.into_owned_fd() {
            Ok(fd) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)
                    .map_err(|e| Error::new(ErrorKind::Io, format!("set_nonblocking: {e}")))?;
                TcpStream::from_std(std)
                    .map(ClientIo::Socket)
                    .map_err(|e| Error::new(ErrorKind::Io, format!("register socket: {e}")))
            }
            Err(fd) => fd
                .into_stream()
                .map(ClientIo::Stream)
                .map_err(|_| Error::new(ErrorKind::Closed, "the connection was already taken")),
        }
    }
}

/// A client connection on the service's side; see [`Accepted::into_io`].
#[derive(Debug)]
pub enum ClientIo {
    /// The client's tcp socket itself (the descriptor was passed).
    Socket(TcpStream),
    /// A byte stream the gateway copies to and from the client's socket.
    Stream(ByteStream),
}

impl ClientIo {
    /// True if this is the client's own socket (no copy through the gateway).
    pub fn is_socket(&self) -> bool {
        matches!(self, ClientIo::Socket(_))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Socket(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Stream(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Socket(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Stream(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Socket(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Stream(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Socket(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Stream(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A tcp listener whose connections go to a libchan service.
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
}

impl Gateway {
    /// Listens on `addr` (port 0 picks a free port).
    pub async fn bind(addr: impl ToSocketAddrs) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("gateway bind: {e}")))?;
        Ok(Gateway { listener })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Io, format!("gateway local_addr: {e}")))
    }

    /// Accepts connections and sends each to `service`, in order, waiting while the
    /// service's channel is full (clients then wait in the listen backlog). Returns the
    /// error that ended it: the service's channel closed or its session lost. A failed
    /// `accept` (out of descriptors, say) is retried after 100 ms, as hyper does, so it
    /// never spins.
    pub async fn serve(self, service: Sender<Accepted>) -> Error {
        let local = self
            .listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = service.closed() => {
                    return Error::new(ErrorKind::Closed, "the service's channel closed");
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(_) => {
                    // EMFILE and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let std = match stream.into_std() {
                Ok(s) => s,
                Err(_) => continue,
            };
            let msg = Accepted {
                conn: Fd::new(std),
                peer_addr: peer.to_string(),
                local_addr: local.clone(),
            };
            if let Err(e) = service.send(msg).await {
                return e.error;
            }
        }
    }
}
