//! Graceful shutdown over real sockets: `Session::drain` lets channels already open
//! finish, refuses new ones, and returns once the connection ended; past its deadline it
//! aborts and says how many streams were still open.

use std::time::Duration;

use libchan::ErrorKind;
use libchan_test_support::within;

async fn tcp_pair() -> (libchan::Session, libchan::Session) {
    libchan_test_support::tcp_pair(libchan::config()).await
}

#[tokio::test]
async fn drain_lets_open_channels_finish_then_ends_the_connection() {
    let (a, b) = tcp_pair().await;
    let tx = a.open::<u32>().await.unwrap();
    let mut rx = within("accept", b.accept::<u32>()).await.unwrap().unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(v) = rx.recv().await.unwrap() {
            got.push(v);
        }
        got
    });
    let drain = {
        let a = a.clone();
        tokio::spawn(async move { a.drain(Duration::from_secs(60)).await })
    };
    // New channels are refused once draining (`drain` starts with `close`, as here); the
    // open one keeps working.
    a.close();
    let e = a.open::<u32>().await.unwrap_err();
    assert!(e.is_closed(), "{e}");
    for i in 0..1000 {
        tx.send(i).await.map_err(|e| e.error).unwrap();
    }
    drop(tx);
    assert_eq!(
        within("reader", reader).await.unwrap(),
        (0..1000).collect::<Vec<_>>()
    );
    within("drain", drain).await.unwrap().unwrap();
    // The connection is over on both sides, gracefully.
    let r = within("accept after drain", b.accept::<u32>()).await;
    assert!(matches!(r, Ok(None)), "{r:?}");
    assert_eq!(a.error().map(|e| e.kind()), Some(ErrorKind::Closed));
}

#[tokio::test]
async fn drain_past_its_deadline_aborts_and_says_what_was_open() {
    let (a, b) = tcp_pair().await;
    let _tx = a.open::<u32>().await.unwrap();
    // The peer holds the channel open and never finishes it.
    let mut rx = within("accept", b.accept::<u32>()).await.unwrap().unwrap();
    let e = within("drain", a.drain(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(e.to_string().contains("1 streams still open"), "{e}");
    let e = within("peer sees the abort", rx.recv()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
}

/// Regression: the last stream of a closing session going away (here: a receiver dropped
/// after the peer's error end) must wake the connection's writer to shut it; the drain
/// used to wait forever.
#[tokio::test]
async fn drain_ends_when_the_last_stream_is_released_later() {
    let (a, b) = tcp_pair().await;
    let tx = b.open::<u32>().await.unwrap();
    let mut rx = within("accept", a.accept::<u32>()).await.unwrap().unwrap();
    a.close();
    let drain = {
        let a = a.clone();
        tokio::spawn(async move { a.drain(Duration::from_secs(60)).await })
    };
    tx.send(1).await.map_err(|e| e.error).unwrap();
    tx.close_with_error("done badly").await;
    assert_eq!(within("1", rx.recv()).await.unwrap(), Some(1));
    assert!(within("error", rx.recv()).await.unwrap_err().is_remote());
    drop(rx);
    within("drain", drain).await.unwrap().unwrap();
}

/// The reply pattern: the receiver takes the one message it expects and is dropped
/// without reading the end. Everything was taken, so delivery is confirmed.
#[tokio::test]
async fn delivery_is_confirmed_when_every_message_was_taken() {
    let (a, b) = tcp_pair().await;
    let tx = a.open::<u32>().await.unwrap();
    let mut rx = within("accept", b.accept::<u32>()).await.unwrap().unwrap();
    tx.send(1).await.map_err(|e| e.error).unwrap();
    tx.close().await; // the end is queued behind the message
    let confirm = tokio::spawn(async move { tx.delivered().await });
    // Frames arrive in order: once a message opened later has arrived, so has the end.
    let marker = a.open::<u32>().await.unwrap();
    marker.send(2).await.map_err(|e| e.error).unwrap();
    let mut m = within("accept marker", b.accept::<u32>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(within("marker", m.recv()).await.unwrap(), Some(2));
    assert_eq!(within("reply", rx.recv()).await.unwrap(), Some(1));
    drop(rx); // the end is never read
    within("delivered", confirm).await.unwrap().unwrap();
}
