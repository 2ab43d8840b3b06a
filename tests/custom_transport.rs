//! A transport written only against libchan's public traits, as a user would write one:
//! a message-oriented pipe (like a WebSocket) where every write becomes one chunk on a
//! bounded in-process queue. The whole conformance suite runs over it, and the same link
//! type works over `IoLink` for comparison.

use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll};

use bytes::BytesMut;
use libchan::driver::{IoLink, Link, LinkRead, LinkWrite};
use libchan::{Role, Session};
use libchan_test_support::Caps;
use tokio::sync::mpsc;

/// One end of a chunk pipe.
struct ChunkLink {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

struct ChunkRead {
    rx: mpsc::Receiver<Vec<u8>>,
    leftover: Vec<u8>,
}

struct ChunkWrite {
    tx: tokio_util_like::PollSender,
}

/// A minimal poll-based sender over `mpsc::Sender` (what `tokio_util::sync::PollSender`
/// does), written here so the example needs nothing beyond tokio.
mod tokio_util_like {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    type Reserve = Pin<Box<dyn Future<Output = Result<mpsc::OwnedPermit<Vec<u8>>, ()>> + Send>>;

    pub(crate) struct PollSender {
        tx: Option<mpsc::Sender<Vec<u8>>>,
        reserving: Option<Reserve>,
    }

    impl PollSender {
        pub(crate) fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
            PollSender {
                tx: Some(tx),
                reserving: None,
            }
        }

        /// Sends `chunk` once there is room; `Err` if the other end is gone.
        pub(crate) fn poll_send(
            &mut self,
            cx: &mut Context<'_>,
            chunk: &[u8],
        ) -> Poll<Result<(), ()>> {
            if self.reserving.is_none() {
                let Some(tx) = self.tx.clone() else {
                    return Poll::Ready(Err(()));
                };
                self.reserving = Some(Box::pin(
                    async move { tx.reserve_owned().await.map_err(|_| ()) },
                ));
            }
            let fut = self.reserving.as_mut().expect("set above");
            match fut.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => {
                    self.reserving = None;
                    match r {
                        Ok(permit) => {
                            permit.send(chunk.to_vec());
                            Poll::Ready(Ok(()))
                        }
                        Err(()) => Poll::Ready(Err(())),
                    }
                }
            }
        }

        pub(crate) fn close(&mut self) {
            self.tx = None;
            self.reserving = None;
        }
    }
}

fn chunk_pair() -> (ChunkLink, ChunkLink) {
    let (t1, r1) = mpsc::channel(64);
    let (t2, r2) = mpsc::channel(64);
    (ChunkLink { tx: t1, rx: r2 }, ChunkLink { tx: t2, rx: r1 })
}

impl Link for ChunkLink {
    fn split(self: Box<Self>) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>) {
        (
            Box::new(ChunkRead {
                rx: self.rx,
                leftover: Vec::new(),
            }),
            Box::new(ChunkWrite {
                tx: tokio_util_like::PollSender::new(self.tx),
            }),
        )
    }
}

impl LinkRead for ChunkRead {
    fn poll_read_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _fds: &mut Vec<OwnedFd>,
    ) -> Poll<io::Result<usize>> {
        if self.leftover.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Ready(Some(chunk)) => self.leftover = chunk,
            }
        }
        let room = (buf.capacity() - buf.len()).max(1);
        let n = room.min(self.leftover.len());
        buf.extend_from_slice(&self.leftover[..n]);
        self.leftover.drain(..n);
        Poll::Ready(Ok(n))
    }
}

impl LinkWrite for ChunkWrite {
    fn poll_write_fds(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no descriptors over chunks",
            )));
        }
        // Like a WebSocket: at most 16 KiB per message, so frames span messages.
        let n = buf.len().min(16 * 1024);
        match self.tx.poll_send(cx, &buf[..n]) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(())) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

async fn chunk_sessions() -> (Session, Session) {
    let (x, y) = chunk_pair();
    let config = libchan::config();
    let (a, b) = tokio::join!(
        Session::over_link(x, Role::Dialer, &config),
        Session::over_link(y, Role::Listener, &config)
    );
    (a.expect("dialer"), b.expect("listener"))
}

libchan_test_support::conformance!(
    chunk_link,
    chunk_sessions,
    Caps {
        fds: false,
        loss: true
    }
);

async fn duplex_sessions() -> (Session, Session) {
    let (x, y) = tokio::io::duplex(256 * 1024);
    let config = libchan::config();
    let (a, b) = tokio::join!(
        Session::over_link(IoLink::new(x), Role::Dialer, &config),
        Session::over_link(IoLink::new(y), Role::Listener, &config)
    );
    (a.expect("dialer"), b.expect("listener"))
}

libchan_test_support::conformance!(
    io_link_duplex,
    duplex_sessions,
    Caps {
        fds: false,
        loss: true
    }
);

/// A link that buffers in user space (as TLS does) must be flushed after each batch:
/// `tokio::io::BufWriter` holds up to 8 KiB until flushed, so without the flush a small
/// message would never leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffering_link_is_flushed_after_each_batch() {
    let (x, y) = tokio::io::duplex(1 << 16);
    let config = libchan::config();
    let (a, b) = tokio::join!(
        Session::over_link(
            IoLink::new(tokio::io::BufWriter::new(x)),
            Role::Dialer,
            &config
        ),
        Session::over_link(
            IoLink::new(tokio::io::BufWriter::new(y)),
            Role::Listener,
            &config
        ),
    );
    let (a, b) = (a.expect("dialer"), b.expect("listener"));
    let tx = a.open::<u8>().await.expect("open");
    tx.send(42).await.expect("send");
    let mut rx = libchan_test_support::within("accept", b.accept::<u8>())
        .await
        .expect("accept")
        .expect("channel");
    assert_eq!(
        libchan_test_support::within("the small message", rx.recv())
            .await
            .expect("recv"),
        Some(42)
    );
}
