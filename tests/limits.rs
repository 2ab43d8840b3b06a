//! Limits are enforced on both sides, and an error about a limit names it and the value.

use libchan::{Limits, Role};
use libchan_test_support::within;

async fn pair_with(a: Limits, b: Limits) -> (libchan::Session, libchan::Session) {
    let (x, y) = tokio::net::UnixStream::pair().expect("socketpair");
    let (ca, cb) = (
        libchan::config().with_limits(a),
        libchan::config().with_limits(b),
    );
    let (sa, sb) = tokio::join!(
        libchan::unix::over_stream(x, Role::Dialer, &ca),
        libchan::unix::over_stream(y, Role::Listener, &cb)
    );
    (sa.expect("a"), sb.expect("b"))
}

#[tokio::test]
async fn a_message_over_the_peers_limit_is_refused_locally_and_handed_back() {
    let small = Limits {
        max_message_size: 4096,
        ..Limits::default()
    };
    let (a, b) = pair_with(Limits::default(), small).await;
    let tx = a.open::<Vec<u8>>().await.expect("open");
    let mut rx = within("accept", b.accept::<Vec<u8>>())
        .await
        .expect("accept")
        .expect("channel");
    let e = tx.send(vec![0; 10_000]).await.expect_err("too big");
    assert!(e.error.is_limit(), "{}", e.error);
    assert!(
        e.error.message().contains("peer's max_message_size") && e.error.message().contains("4096"),
        "{}",
        e.error
    );
    assert_eq!(e.into_inner().len(), 10_000, "the message is handed back");
    // The channel and the session go on.
    tx.send(vec![1; 100]).await.expect("small one");
    assert_eq!(
        within("recv", rx.recv()).await.expect("recv"),
        Some(vec![1; 100])
    );
}

#[tokio::test]
async fn too_many_descriptors_in_one_message_is_a_named_limit() {
    let few = Limits {
        max_fds_per_message: 2,
        ..Limits::default()
    };
    let (a, _b) = pair_with(Limits::default(), few).await;
    let tx = a.open::<Vec<libchan::Fd>>().await.expect("open");
    let fds: Vec<libchan::Fd> = (0..3)
        .map(|_| libchan::Fd::new(std::fs::File::open("/dev/null").expect("open")))
        .collect();
    let e = tx.send(fds).await.expect_err("too many fds");
    assert!(e.error.is_limit(), "{}", e.error);
    assert!(
        e.error.message().contains("max_fds_per_message"),
        "{}",
        e.error
    );
    // The descriptors are handed back untouched.
    assert!(e.into_inner().iter().all(|fd| fd.is_descriptor()));
}

#[tokio::test]
async fn opening_beyond_the_peers_stream_limit_is_a_named_limit() {
    let few = Limits {
        max_streams: 3,
        ..Limits::default()
    };
    let (a, _b) = pair_with(Limits::default(), few).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(a.open::<u8>().await.expect("within the limit"));
    }
    let e = a.open::<u8>().await.expect_err("over the limit");
    assert!(e.is_limit(), "{e}");
    assert!(e.message().contains("peer's max_streams"), "{e}");
}

#[test]
fn invalid_limits_are_rejected_with_the_value() {
    let bad = Limits {
        initial_window: 10,
        ..Limits::default()
    };
    let e = bad.validate().expect_err("too small");
    assert!(e.contains("initial_window 10"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_with_descriptors_in_one_burst_all_arrive() {
    let (a, b) = pair_with(Limits::default(), Limits::default()).await;
    let tx = a
        .open::<(u32, Vec<libchan::Fd>, Vec<u8>)>()
        .await
        .expect("open");
    let mut rx = within("accept", b.accept::<(u32, Vec<libchan::Fd>, Vec<u8>)>())
        .await
        .expect("accept")
        .expect("channel");
    // 100 messages of 3 descriptors each, queued before anything is read: the writer
    // batches them, and the receiver must never see more unclaimed descriptors than its
    // limit allows.
    let sender = tokio::spawn(async move {
        for i in 0..100u32 {
            let fds = (0..3)
                .map(|_| libchan::Fd::new(std::fs::File::open("/dev/null").expect("open")))
                .collect();
            tx.send((i, fds, vec![1; 8192]))
                .await
                .map_err(|e| e.error)
                .expect("send");
        }
    });
    for i in 0..100u32 {
        let (n, fds, _) = within("recv", rx.recv())
            .await
            .expect("recv")
            .expect("message");
        assert_eq!(n, i);
        assert_eq!(fds.len(), 3);
        assert!(fds.iter().all(|f| f.is_descriptor()));
    }
    within("sender", sender).await.expect("sender");
}
