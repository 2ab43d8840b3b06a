//! Properties of the public API: thread-safety of every public type, and clear errors
//! when an end is serialized outside a libchan send.

use libchan_core::{
    channel, pipe, ByteStream, Config, Error, Fd, Receiver, SendError, Sender, Session,
    TrySendError,
};

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}
fn unpin<T: Unpin>() {}

#[test]
fn public_types_are_send_sync_unpin() {
    send_sync::<Session>();
    send_sync::<Sender<u32>>();
    send_sync::<Receiver<u32>>();
    send_sync::<ByteStream>();
    send_sync::<Fd>();
    send_sync::<Error>();
    send_sync::<Config>();
    send::<SendError<u32>>();
    send::<TrySendError<u32>>();
    unpin::<Sender<u32>>();
    unpin::<Receiver<u32>>();
    unpin::<ByteStream>();
}

#[tokio::test]
async fn serializing_an_end_outside_a_send_is_an_error_not_a_panic() {
    let (tx, rx) = channel::<u32>(1);
    let (a, _b) = pipe();
    let fd = Fd::new(std::fs::File::open("/dev/null").expect("open"));
    let mut out = Vec::new();
    for (what, r) in [
        ("Sender", ciborium::ser::into_writer(&tx, &mut out)),
        ("Receiver", ciborium::ser::into_writer(&rx, &mut out)),
        ("ByteStream", ciborium::ser::into_writer(&a, &mut out)),
        ("Fd", ciborium::ser::into_writer(&fd, &mut out)),
    ] {
        let e = r.expect_err(what).to_string();
        assert!(
            e.contains("can only be serialized by a libchan send"),
            "{what}: {e}"
        );
    }
    // Deserializing one outside a receive is an error too.
    let bytes = [0xda, 0x4c, 0x43, 0x48, 0x4e, 0x00];
    let e = ciborium::de::from_reader::<Sender<u32>, _>(&bytes[..])
        .expect_err("outside")
        .to_string();
    assert!(e.contains("libchan"), "{e}");
    // The ends still work afterwards.
    tx.send(1).await.expect("send");
}

/// A reply channel's receiver, dropped after its one reply came over a session, does not
/// wake its own task: the sender copy the session held for the peer goes away inside the
/// drop, and a self-wake makes tokio reschedule the task behind the others and wake an
/// idle worker thread for it (a futex wake per request in the request/reply pattern).
#[tokio::test]
async fn dropping_a_reply_receiver_does_not_wake_its_task() {
    use libchan_core::{channel, Config, Sender};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};

    struct Counting(AtomicUsize, Waker);
    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.wake_by_ref();
        }
    }

    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor)).await;
    let tx = a.open::<Sender<u8>>().await.unwrap();
    let mut rx = b.accept::<Sender<u8>>().await.unwrap().unwrap();
    let (reply, mut answer) = channel::<u8>(1);
    tx.send(reply).await.unwrap();
    let back = rx.recv().await.unwrap().unwrap();
    back.send(5).await.unwrap();
    drop(back);
    let mut counter = None;
    let got = std::future::poll_fn(|cx| {
        let c = counter
            .get_or_insert_with(|| Arc::new(Counting(AtomicUsize::new(0), cx.waker().clone())))
            .clone();
        answer.poll_recv(&mut Context::from_waker(&Waker::from(c)))
    })
    .await;
    assert_eq!(got.unwrap(), Some(5));
    let counter = counter.unwrap();
    let before = counter.0.load(Ordering::SeqCst);
    drop(answer);
    assert_eq!(
        counter.0.load(Ordering::SeqCst),
        before,
        "the drop woke its own task"
    );
}

/// Several clones of one Sender waiting for the same full window at once are all woken
/// when it opens again (each task that waits is woken, not only the last to register).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sender_clone_waiting_on_a_full_window_gets_through() {
    use libchan_core::Limits;

    let limits = Limits {
        initial_window: Limits::MIN_WINDOW,
        ..Limits::default()
    };
    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor).with_limits(limits)).await;
    let tx = a.open::<Vec<u8>>().await.unwrap();
    let mut rx = b.accept::<Vec<u8>>().await.unwrap().unwrap();
    const CLONES: usize = 8;
    const EACH: usize = 200;
    let mut senders = Vec::new();
    for _ in 0..CLONES {
        let tx = tx.clone();
        // 8 KiB messages: the 64 KiB window fills with a few, so clones wait together.
        senders.push(tokio::spawn(async move {
            for _ in 0..EACH {
                tx.send(vec![1; 8 * 1024]).await.unwrap();
            }
        }));
    }
    drop(tx);
    let all = async {
        let mut n = 0;
        while let Some(m) = rx.recv().await.unwrap() {
            assert_eq!(m.len(), 8 * 1024);
            n += 1;
            if n % 16 == 0 {
                tokio::task::yield_now().await;
            }
        }
        n
    };
    let n = tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("a waiting sender was never woken");
    assert_eq!(n, CLONES * EACH);
    for s in senders {
        s.await.unwrap();
    }
}

/// One sender whose peer reads nothing stops once what is in flight (the peer's window)
/// and what is queued (another window) are full: `send` skips asking the connection
/// while the previous send left room, and must still stop at the window.
#[tokio::test(flavor = "current_thread")]
async fn a_sender_whose_peer_reads_nothing_stops_at_the_window() {
    use libchan_core::Limits;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const SIZE: usize = 8 * 1024;
    let window = Limits::MIN_WINDOW as usize;
    let limits = Limits {
        initial_window: Limits::MIN_WINDOW,
        ..Limits::default()
    };
    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor).with_limits(limits)).await;
    let tx = a.open::<Vec<u8>>().await.unwrap();
    let _rx = b.accept::<Vec<u8>>().await.unwrap().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        loop {
            tx.send(vec![1; SIZE]).await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    // One thread: every yield lets the sender, the writer and the peer's reader run until
    // they wait; a sender without backpressure would pass the bound in its first turn
    // (it yields only every 128 sends).
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let n = sent.load(Ordering::SeqCst);
    assert!(n >= window / SIZE, "only {n} sends completed");
    assert!(
        n <= 2 * window / SIZE + 2,
        "{n} sends of {SIZE} bytes completed against a window of {window}"
    );
    sender.abort();
}

/// A task that sends or receives on a remote channel without ever waiting still yields
/// now and then (tokio's cooperative budget), so other tasks on its thread run meanwhile:
/// here a one-thread runtime, where nothing else could run otherwise.
#[tokio::test(flavor = "current_thread")]
async fn remote_send_and_recv_yield_to_other_tasks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const N: usize = 1000;
    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor)).await;
    let tx = a.open::<u32>().await.unwrap();
    let mut rx = b.accept::<u32>().await.unwrap().unwrap();
    let marker_tx = a.open::<u32>().await.unwrap();
    let mut marker_rx = b.accept::<u32>().await.unwrap().unwrap();

    // Sending: 1000 small messages fit the window, so no send waits.
    let ran = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let ran = ran.clone();
        async move {
            let flag = tokio::spawn(async move { ran.store(true, Ordering::SeqCst) });
            let mut seen_at = None;
            for i in 0..N {
                tx.send(i as u32).await.unwrap();
                if seen_at.is_none() && flag.is_finished() {
                    seen_at = Some(i);
                }
            }
            marker_tx.send(0).await.unwrap();
            (seen_at, tx, marker_tx)
        }
    });
    let (seen_at, _tx, _marker_tx) = sender.await.unwrap();
    assert!(ran.load(Ordering::SeqCst));
    assert!(
        seen_at.is_some(),
        "another task ran only after {N} sends that never waited"
    );

    // Receiving: the marker comes after the 1000 messages on the same pipe, so once it is
    // here every one of them is queued and no receive waits.
    marker_rx.recv().await.unwrap();
    let receiver = tokio::spawn(async move {
        let flag = tokio::spawn(async {});
        let mut seen_at = None;
        for i in 0..N {
            assert_eq!(rx.recv().await.unwrap(), Some(i as u32));
            if seen_at.is_none() && flag.is_finished() {
                seen_at = Some(i);
            }
        }
        seen_at
    });
    assert!(
        receiver.await.unwrap().is_some(),
        "another task ran only after {N} receives that never waited"
    );
}

/// Two sessions over an in-process byte pipe (a real multiplexer and driver on each side).
async fn duplex_pair(config: Config) -> (Session, Session) {
    use libchan_core::driver::IoLink;
    let (x, y) = tokio::io::duplex(1 << 16);
    sessions_over(IoLink::new(x), IoLink::new(y), &config).await
}

/// The dialing and the listening session over the two ends of a link, handshake done.
async fn sessions_over(
    dialer: impl libchan_core::driver::Link,
    listener: impl libchan_core::driver::Link,
    config: &Config,
) -> (Session, Session) {
    use libchan_core::mux::Role;
    let (a, b) = tokio::join!(
        Session::over_link(dialer, Role::Dialer, config),
        Session::over_link(listener, Role::Listener, config)
    );
    (a.expect("dialer"), b.expect("listener"))
}

/// A link whose reader panics at its `n`th read (after the handshake).
struct PanickingLink {
    io: tokio::io::DuplexStream,
    panic_at: usize,
}

struct PanickingRead {
    inner: Box<dyn libchan_core::driver::LinkRead>,
    reads: usize,
    panic_at: usize,
}

impl libchan_core::driver::LinkRead for PanickingRead {
    fn poll_read_fds(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut bytes::BytesMut,
        fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.inner.poll_read_fds(cx, buf, fds);
        if r.is_ready() {
            self.reads += 1;
            assert!(self.reads < self.panic_at, "a link that panics (test)");
        }
        r
    }
}

impl libchan_core::driver::Link for PanickingLink {
    fn split(
        self: Box<Self>,
    ) -> (
        Box<dyn libchan_core::driver::LinkRead>,
        Box<dyn libchan_core::driver::LinkWrite>,
    ) {
        let (r, w) = Box::new(libchan_core::driver::IoLink::new(self.io)).split();
        (
            Box::new(PanickingRead {
                inner: r,
                reads: 0,
                panic_at: self.panic_at,
            }),
            w,
        )
    }
}

#[tokio::test]
async fn a_panicking_reader_fails_the_session_instead_of_hanging_it() {
    use libchan_core::driver::IoLink;
    use libchan_core::ErrorKind;
    let config = Config::new(libchan_codec_cbor::Cbor);
    let (x, y) = tokio::io::duplex(1 << 16);
    // HELLO is the first read; the panic comes with the next one (the OPEN).
    let link = PanickingLink { io: y, panic_at: 2 };
    let (a, b) = sessions_over(IoLink::new(x), link, &config).await;
    let _tx = a.open::<u32>().await.expect("open");
    let guard = std::time::Duration::from_secs(10);
    let accepted = tokio::time::timeout(guard, b.accept::<u32>())
        .await
        .expect("accept waited forever after the reader panicked");
    let err = accepted.expect_err("no channel can arrive through a panicked reader");
    assert_eq!(err.kind(), ErrorKind::ConnectionLost, "{err}");
    assert!(err.to_string().contains("reader task panicked"), "{err}");
}

/// A byte pipe that counts its non-empty writes.
struct CountingWrites {
    io: tokio::io::DuplexStream,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for CountingWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountingWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Call {
    n: u32,
    reply: Sender<u32>,
}

/// Callers whose answers arrive together run before the writer, so their next requests
/// leave together: one write for all of them rather than one each. (One worker thread, so
/// the order is tokio's alone: a task woken from a worker runs right after the waking one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn requests_of_callers_woken_together_leave_in_few_writes() {
    use libchan_core::driver::IoLink;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const CALLERS: u32 = 16;
    let config = Config::new(libchan_codec_cbor::Cbor);
    let writes = Arc::new(AtomicUsize::new(0));
    let (x, y) = tokio::io::duplex(1 << 20);
    let x = CountingWrites {
        io: x,
        writes: writes.clone(),
    };
    let (a, b) = sessions_over(IoLink::new(x), IoLink::new(y), &config).await;
    let tx = a.open::<Call>().await.expect("open");
    let mut rx = b
        .accept::<Call>()
        .await
        .expect("accept")
        .expect("a channel");
    let mut callers = Vec::new();
    for k in 0..CALLERS {
        let tx = tx.clone();
        callers.push(tokio::spawn(async move {
            for round in 0..2 {
                let (reply, mut answer) = channel(1);
                let call = Call { n: k, reply };
                tx.send(call).await.map_err(|e| e.error).expect("send");
                let got = answer.recv().await.expect("answer");
                assert_eq!(got, Some(k + round * 100));
            }
        }));
    }
    // Answer a whole round at once, so that its answers arrive in one read.
    let guard = std::time::Duration::from_secs(30);
    let mut writes_in_round = Vec::new();
    for round in 0..2 {
        let mut calls = Vec::new();
        while calls.len() < CALLERS as usize {
            let call = tokio::time::timeout(guard, rx.recv())
                .await
                .expect("requests within the guard")
                .expect("recv")
                .expect("a request");
            calls.push(call);
        }
        writes_in_round.push(writes.load(Ordering::SeqCst));
        for c in calls {
            c.reply.send(c.n + round * 100).await.expect("reply");
        }
    }
    for c in callers {
        tokio::time::timeout(guard, c)
            .await
            .expect("callers within the guard")
            .expect("caller");
    }
    let second = writes_in_round[1] - writes_in_round[0];
    assert!(
        second <= 4,
        "{CALLERS} callers woken by one read sent their next requests in {second} writes"
    );
}

/// A local channel whose Sender went out over a session creates its queue only on a
/// first local send (the receiver reads the session's stream alone until then): a
/// receiver already waiting is woken by that send, and one whose local senders all go
/// without sending sees the clean end once the remote copy ends too.
#[tokio::test(flavor = "current_thread")]
async fn a_receiver_waiting_on_a_sent_sender_is_woken_by_the_first_local_send() {
    use std::time::Duration;
    let guard = Duration::from_secs(10);
    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor)).await;
    let tx = a.open::<Sender<u32>>().await.unwrap();
    let mut rx = b.accept::<Sender<u32>>().await.unwrap().unwrap();

    let (reply, mut answer) = channel::<u32>(2);
    let local = reply.clone();
    tx.send(reply).await.unwrap();
    let remote = rx.recv().await.unwrap().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let got = tokio::spawn(async move {
        while let Some(v) = answer.recv().await.unwrap() {
            seen_tx.send(v).unwrap();
        }
    });
    // The receiver runs first and waits on the remote stream, with no queue yet.
    tokio::task::yield_now().await;
    local.send(1).await.unwrap();
    let first = tokio::time::timeout(guard, seen.recv()).await;
    assert_eq!(first.expect("woken by the first local send"), Some(1));
    remote.send(2).await.unwrap();
    assert_eq!(seen.recv().await, Some(2));
    drop(local);
    drop(remote);
    tokio::time::timeout(guard, got)
        .await
        .expect("ended")
        .unwrap();
    assert_eq!(seen.recv().await, None);

    // Never a local send: the end comes when the last copy, the remote one, goes.
    let (reply, mut answer) = channel::<u32>(1);
    let local = reply.clone();
    tx.send(reply).await.unwrap();
    let remote = rx.recv().await.unwrap().unwrap();
    let got = tokio::spawn(async move { answer.recv().await.unwrap() });
    tokio::task::yield_now().await;
    drop(local);
    tokio::task::yield_now().await;
    assert!(!got.is_finished(), "ended while the remote copy was alive");
    drop(remote);
    let got = tokio::time::timeout(guard, got)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(got, None);
}

/// A local receiver waiting before the first send of a purely local channel is woken by
/// it, and sees the end when every sender goes.
#[tokio::test(flavor = "current_thread")]
async fn a_local_receiver_waiting_before_the_first_send_is_woken() {
    use std::time::Duration;
    let guard = Duration::from_secs(10);

    let (tx, mut rx) = channel::<u32>(2);
    let got = tokio::spawn(async move {
        let first = rx.recv().await;
        let second = rx.recv().await;
        (first.unwrap(), second.unwrap())
    });
    tokio::task::yield_now().await;
    let other = tx.clone();
    tx.send(1).await.unwrap();
    drop(tx);
    drop(other);
    let got = tokio::time::timeout(guard, got)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(got, (Some(1), None));
}

/// Before any local send, a dropped or closed receiver still fails sends and ends
/// `closed()`, as a receiver of a queue does.
#[tokio::test(flavor = "current_thread")]
async fn a_receiver_gone_before_the_first_send_is_seen_by_senders() {
    use std::time::Duration;
    let guard = Duration::from_secs(10);

    let (tx, rx) = channel::<u32>(1);
    let waiting = tokio::spawn({
        let tx = tx.clone();
        async move { tx.closed().await }
    });
    tokio::task::yield_now().await;
    drop(rx);
    tokio::time::timeout(guard, waiting)
        .await
        .expect("closed() ended")
        .unwrap();
    tokio::time::timeout(guard, tx.closed())
        .await
        .expect("closed() at once");
    let e = tx.send(3).await.unwrap_err();
    assert_eq!(e.error.kind(), libchan_core::ErrorKind::Reset);
    assert_eq!(e.into_inner(), 3);
    match tx.try_send(4) {
        Err(TrySendError::Failed(e)) => assert_eq!(e.into_inner(), 4),
        _ => panic!("try_send to a dropped receiver"),
    }

    let (tx, mut rx) = channel::<u32>(1);
    rx.close();
    assert!(tx.send(5).await.is_err());
    assert_eq!(rx.recv().await.unwrap(), None);
}

/// A reply Sender that only travels: the answer comes through its stream, then the end
/// when the peer drops it, without a local queue in between.
#[tokio::test]
async fn a_travelling_reply_sender_delivers_then_ends() {
    let (a, b) = duplex_pair(Config::new(libchan_codec_cbor::Cbor)).await;
    let tx = a.open::<Sender<u8>>().await.unwrap();
    let mut rx = b.accept::<Sender<u8>>().await.unwrap().unwrap();
    for round in 0..3u8 {
        let (reply, mut answer) = channel::<u8>(1);
        tx.send(reply).await.unwrap();
        let back = rx.recv().await.unwrap().unwrap();
        back.send(round).await.unwrap();
        drop(back);
        assert_eq!(answer.recv().await.unwrap(), Some(round));
        assert_eq!(answer.recv().await.unwrap(), None);
    }
}

/// A link over an in-process pipe whose write half lets sending tasks write
/// (`can_write_inline`), counting the writes that would block, and panicking at its
/// `panic_at`th write if asked to.
struct InlineLink {
    io: tokio::io::DuplexStream,
    would_block: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Calls of the write half's `poll_write_fds`.
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    panic_at: Option<usize>,
    /// Writes go to a buffer in front of the pipe, which only a flush empties (as rustls
    /// keeps records): [`FlushOnly`].
    buffered: bool,
}

/// A write half that takes every write into its buffer and writes it on only when
/// flushed.
struct FlushOnly {
    inner: Box<dyn libchan_core::driver::LinkWrite>,
    buf: Vec<u8>,
}

impl libchan_core::driver::LinkWrite for FlushOnly {
    fn poll_write_fds(
        &mut self,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
        _fds: &[std::os::fd::OwnedFd],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while !self.buf.is_empty() {
            let n = std::task::ready!(self.inner.poll_write_fds(cx, &self.buf, &[]))?;
            self.buf.drain(..n);
        }
        self.inner.poll_flush(cx)
    }

    fn poll_shutdown(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_flush(cx))?;
        self.inner.poll_shutdown(cx)
    }
}

struct InlineWrite {
    inner: Box<dyn libchan_core::driver::LinkWrite>,
    would_block: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    panic_at: Option<usize>,
}

impl libchan_core::driver::LinkWrite for InlineWrite {
    fn poll_write_fds(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        fds: &[std::os::fd::OwnedFd],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let writes = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if self.panic_at == Some(writes) {
            panic!("a link that panics while writing (test)");
        }
        let r = self.inner.poll_write_fds(cx, buf, fds);
        if r.is_pending() {
            self.would_block
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn can_write_inline(&self) -> bool {
        true
    }

    fn poll_flush(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = self.inner.poll_flush(cx);
        if r.is_pending() {
            self.would_block
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.inner.poll_shutdown(cx)
    }
}

impl libchan_core::driver::Link for InlineLink {
    fn split(
        self: Box<Self>,
    ) -> (
        Box<dyn libchan_core::driver::LinkRead>,
        Box<dyn libchan_core::driver::LinkWrite>,
    ) {
        let (r, w) = Box::new(libchan_core::driver::IoLink::new(self.io)).split();
        let w: Box<dyn libchan_core::driver::LinkWrite> = if self.buffered {
            Box::new(FlushOnly {
                inner: w,
                buf: Vec::new(),
            })
        } else {
            w
        };
        (
            r,
            Box::new(InlineWrite {
                inner: w,
                would_block: self.would_block,
                writes: self.writes,
                panic_at: self.panic_at,
            }),
        )
    }
}

/// What an [`InlineLink`]'s write half counted: writes that would block, and all writes.
#[derive(Clone, Default)]
struct WriteCounts {
    would_block: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A channel from `a` to `b` and one back: `(to b, b's receiver, back to a, a's receiver)`.
async fn forth_and_back<T>(
    a: &Session,
    b: &Session,
) -> (Sender<T>, Receiver<T>, Sender<T>, Receiver<T>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let tx = a.open::<T>().await.expect("open");
    let rx = b.accept::<T>().await.expect("accept").expect("a channel");
    let back = b.open::<T>().await.expect("open back");
    let back_rx = a
        .accept::<T>()
        .await
        .expect("accept back")
        .expect("a channel");
    (tx, rx, back, back_rx)
}

/// Two sessions over a pipe of `capacity` bytes; the listener's link is an [`InlineLink`].
async fn inline_pair(
    capacity: usize,
    panic_at: Option<usize>,
    buffered: bool,
) -> (Session, Session, WriteCounts) {
    use libchan_core::driver::IoLink;
    let (x, y) = tokio::io::duplex(capacity);
    let counts = WriteCounts::default();
    let link = InlineLink {
        io: y,
        would_block: counts.would_block.clone(),
        writes: counts.writes.clone(),
        panic_at,
        buffered,
    };
    let config = Config::new(libchan_codec_cbor::Cbor);
    let (a, b) = sessions_over(IoLink::new(x), link, &config).await;
    (a, b, counts)
}

/// Answers to input are written by the sending task (the second of them writes both); on
/// a one-thread runtime the peer cannot read meanwhile, so with a 1 KiB pipe that write
/// would block after its first kilobyte. The writer task writes the rest when the peer
/// reads: every answer arrives whole, in order, before what is sent after it.
#[tokio::test(flavor = "current_thread")]
async fn what_a_sending_task_could_not_write_is_finished_by_the_writer_in_order() {
    // Over the pipe itself, and through a buffer that only a flush empties: a sending
    // task's flush would block too, and the writer task flushes.
    for buffered in [false, true] {
        answers_arrive_over_a_small_pipe(buffered).await;
    }
}

async fn answers_arrive_over_a_small_pipe(buffered: bool) {
    let guard = std::time::Duration::from_secs(10);
    let (a, b, counts) = inline_pair(1024, None, buffered).await;
    let (tx, mut rx, back, mut back_rx) = forth_and_back::<String>(&a, &b).await;
    let big = |c: char, round: usize| format!("{round}:{}", c.to_string().repeat(20_000));
    for round in 0..10 {
        tx.send(format!("ping {round}")).await.expect("send");
        let got = tokio::time::timeout(guard, rx.recv()).await.expect("guard");
        assert_eq!(got.expect("recv"), Some(format!("ping {round}")));
        back.send(big('a', round)).await.expect("answer");
        back.send(big('b', round)).await.expect("answer");
        // Nothing else is sent until both arrived.
        for want in [big('a', round), big('b', round)] {
            let got = tokio::time::timeout(guard, back_rx.recv())
                .await
                .expect("an answer never came");
            assert_eq!(got.expect("recv").as_deref(), Some(want.as_str()));
        }
        back.send(format!("small {round}")).await.expect("answer");
        let got = tokio::time::timeout(guard, back_rx.recv())
            .await
            .expect("an answer never came");
        assert_eq!(got.expect("recv"), Some(format!("small {round}")));
    }
    assert!(
        counts.would_block.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no write or flush would block (buffered: {buffered}): the test did not reach the case it is about"
    );
}

/// A task answering a batch of requests (one input that queued many messages) writes its
/// answers itself as it goes: the second, then every 32nd after it, so that the peer can
/// work on the first answers while the rest are made; the writer task writes what is left
/// once the task yields. 64 answers: three writes (2 + 32 + 30). A task answering one
/// request at a time, or sending many in a row after input that was no batch, writes
/// once per input (the 64 answers again, after a single request: two writes).
#[tokio::test(flavor = "current_thread")]
async fn answers_to_a_batch_of_requests_leave_in_writes_of_32() {
    use std::sync::atomic::Ordering;
    let guard = std::time::Duration::from_secs(10);
    let (a, b, counts) = inline_pair(1 << 20, None, false).await;
    let (tx, mut rx, back, mut back_rx) = forth_and_back::<u32>(&a, &b).await;
    for (requests, writes) in [(64u32, 3), (1, 2)] {
        for i in 0..requests {
            tx.send(i).await.expect("send");
        }
        for i in 0..requests {
            let got = tokio::time::timeout(guard, rx.recv()).await.expect("guard");
            assert_eq!(got.expect("recv"), Some(i));
        }
        // Whatever the listener still had to write (credit for the requests) goes out
        // first; the answers start with a fresh cooperative budget, so that nothing but
        // the inline writes interrupts them.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let before = counts.writes.load(Ordering::Relaxed);
        for i in 0..64 {
            back.send(i).await.expect("answer");
        }
        for i in 0..64 {
            let got = tokio::time::timeout(guard, back_rx.recv())
                .await
                .expect("an answer never came");
            assert_eq!(got.expect("recv"), Some(i));
        }
        assert_eq!(
            counts.writes.load(Ordering::Relaxed) - before,
            writes,
            "writes of 64 answers after {requests} request(s)"
        );
    }
}

/// A link that panics in a write made by a sending task fails the session (every end
/// gets an error) instead of panicking that task or hanging the session.
#[tokio::test(flavor = "current_thread")]
async fn a_link_panicking_in_a_sending_tasks_write_fails_the_session() {
    use libchan_core::ErrorKind;
    let guard = std::time::Duration::from_secs(10);
    // The listener's writes: HELLO, the OPEN of `back`, a credit perhaps; the panic comes
    // at a later one, which the answers below reach whoever makes it.
    let (a, b, _) = inline_pair(1 << 16, Some(4), false).await;
    let (tx, mut rx, back, mut back_rx) = forth_and_back::<u32>(&a, &b).await;
    let mut failed = None;
    for i in 0..20u32 {
        if tx.send(i).await.is_err() {
            break;
        }
        match tokio::time::timeout(guard, rx.recv()).await.expect("guard") {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        // Two answers in a row: the second is written by this task.
        for k in 0..2 {
            if let Err(e) = back.send(i * 2 + k).await {
                failed = Some(e.error);
                break;
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let err = match failed {
        Some(e) => e,
        None => {
            tokio::time::timeout(guard, back.closed())
                .await
                .map(|()| back.send(0))
                .expect("the session did not fail after its link panicked")
                .await
                .expect_err("a send after the link panicked")
                .error
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionLost, "{err}");
    // The dialer sees the connection end too.
    let end = tokio::time::timeout(guard, async {
        loop {
            match back_rx.recv().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the dialer never saw the end");
    assert!(!matches!(end, Ok(Some(_))));
}
