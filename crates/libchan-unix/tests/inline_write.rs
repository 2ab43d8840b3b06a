//! Messages a task sends in answer to input leave from the sending task itself
//! (`LinkWrite::can_write_inline`), whole and in order.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Duration;

use libchan_core::{Config, Role, Session};
use nix::sys::socket::{recv, MsgFlags};

const GUARD: Duration = Duration::from_secs(10);

/// Two sessions over a socket pair; also a second handle on the dialer's socket, to look
/// at what arrived for it without taking it.
async fn pair_with_peek() -> (Session, Session, StdUnixStream) {
    let (x, y) = StdUnixStream::pair().expect("socketpair");
    let peek = x.try_clone().expect("dup");
    let (a, b) = sessions_over(x, y).await;
    (a, b, peek)
}

/// A dialer session over `x` and a listener session over `y`.
async fn sessions_over(x: StdUnixStream, y: StdUnixStream) -> (Session, Session) {
    let config = Config::new(libchan_codec_cbor::Cbor);
    let socket = |s: StdUnixStream| {
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::UnixStream::from_std(s).expect("tokio socket")
    };
    let (a, b) = tokio::join!(
        libchan_unix::over_stream(socket(x), Role::Dialer, &config),
        libchan_unix::over_stream(socket(y), Role::Listener, &config),
    );
    (a.expect("dialer"), b.expect("listener"))
}

/// Bytes waiting in a socket's receive queue (up to 64 KiB), left there.
fn queued(s: &StdUnixStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let fd = s.as_fd();
    match recv(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &mut buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => panic!("peek: {e}"),
    }
}

/// On a one-thread runtime the writer task cannot run while the test task does not yield:
/// bytes in the peer's socket right after two sends that never waited were written by the
/// sending task itself.
#[tokio::test(flavor = "current_thread")]
async fn answers_sent_in_a_row_leave_before_the_sender_yields() {
    let (a, b, peek_a) = pair_with_peek().await;
    let tx = a.open::<u32>().await.expect("open");
    let mut rx = b.accept::<u32>().await.expect("accept").expect("a channel");
    let back = b.open::<u32>().await.expect("open back");
    let mut back_rx = a
        .accept::<u32>()
        .await
        .expect("accept back")
        .expect("a channel");

    // Input arrives at the listener...
    tx.send(1).await.expect("send");
    let got = tokio::time::timeout(GUARD, rx.recv()).await.expect("guard");
    assert_eq!(got.expect("recv"), Some(1));
    // ...which answers twice without yielding.
    let before = queued(&peek_a);
    back.send(10).await.expect("answer");
    back.send(11).await.expect("answer");
    let after = queued(&peek_a);
    assert!(
        after > before,
        "the answers were not written before the sending task yielded ({before} -> {after} bytes queued)"
    );
    for want in [10, 11] {
        let got = tokio::time::timeout(GUARD, back_rx.recv())
            .await
            .expect("guard");
        assert_eq!(got.expect("recv"), Some(want));
    }
}

/// Large answers written by the sending task (many frames in one write), then a small
/// one left to the writer task: all arrive whole and in order. (What a write that would
/// block leaves behind is tested in libchan-core's tests/api.rs, over a pipe small
/// enough to fill: this link's socket buffer is as large as the system allows.)
#[tokio::test(flavor = "current_thread")]
async fn large_answers_written_by_the_sending_task_arrive_in_order() {
    let (x, y) = StdUnixStream::pair().expect("socketpair");
    let (a, b) = sessions_over(x, y).await;
    let tx = a.open::<String>().await.expect("open");
    let mut rx = b
        .accept::<String>()
        .await
        .expect("accept")
        .expect("a channel");
    let back = b.open::<String>().await.expect("open back");
    let mut back_rx = a
        .accept::<String>()
        .await
        .expect("accept back")
        .expect("a channel");

    let big = |c: char, round: usize| format!("{round}:{}", c.to_string().repeat(100_000));
    for round in 0..20 {
        tx.send(format!("ping {round}")).await.expect("send");
        let got = tokio::time::timeout(GUARD, rx.recv()).await.expect("guard");
        assert_eq!(got.expect("recv"), Some(format!("ping {round}")));
        // Two large answers in a row after input: the second send writes both, from
        // this task; the third is the writer task's.
        back.send(big('a', round)).await.expect("answer");
        back.send(big('b', round)).await.expect("answer");
        back.send(format!("small {round}")).await.expect("answer");
        for want in [big('a', round), big('b', round), format!("small {round}")] {
            let got = tokio::time::timeout(GUARD, back_rx.recv())
                .await
                .expect("guard");
            assert_eq!(got.expect("recv").as_deref(), Some(want.as_str()));
        }
    }
}
