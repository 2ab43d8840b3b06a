//! Faults with a real peer process: it is killed (SIGKILL) while it streams messages, a
//! large message and a byte stream. Everything already received is delivered; then every
//! pending and later receive, read and send fails with a connection-lost error, within the
//! guard timeout, over unix and over tcp.

use std::process::Stdio;

use libchan_core::{ByteStream, Config, ErrorKind, Session};
use libchan_test_support::within;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

#[derive(Serialize, Deserialize)]
enum Feed {
    Stream(ByteStream),
    Number(u64),
    Big(#[serde(with = "serde_bytes")] Vec<u8>),
}

async fn killed_mid_stream(session: Session, mut child: tokio::process::Child) {
    let mut feed = within("the feed", session.accept::<Feed>())
        .await
        .expect("accept")
        .expect("channel");
    let Some(Feed::Stream(mut bytes)) = within("first", feed.recv()).await.expect("recv") else {
        panic!("the first message carries the byte stream");
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 1 << 20 {
        got += within("bytes", bytes.read(&mut buf)).await.expect("read");
    }
    // Read numbers until the first big message has started to arrive, then kill.
    let mut last = None;
    while last.is_none_or(|n| n < 1500) {
        match within("feed", feed.recv()).await.expect("recv") {
            Some(Feed::Number(n)) => {
                assert_eq!(n, last.map_or(0, |l| l + 1), "in order, none lost");
                last = Some(n);
            }
            Some(Feed::Big(v)) => assert_eq!(v.len(), 32 << 20),
            other => panic!("unexpected {:?}", other.is_some()),
        }
    }
    let back = session.open::<u8>().await.expect("open towards the peer");
    child.kill().await.expect("kill");
    // What was received is still delivered, in order; then the loss is reported.
    let e = within("feed error", async {
        loop {
            match feed.recv().await {
                Ok(Some(Feed::Number(n))) => {
                    assert_eq!(Some(n), last.map(|l| l + 1));
                    last = Some(n);
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("a killed peer is not a clean end of stream"),
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    let e = within("byte stream error", async {
        loop {
            match bytes.read(&mut buf).await {
                Ok(0) => panic!("a killed peer is not a clean end of the byte stream"),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await;
    assert!(e.to_string().contains("connection lost"), "{e}");
    let e = within("send after loss", back.send(1))
        .await
        .expect_err("lost");
    assert_eq!(e.error.kind(), ErrorKind::ConnectionLost);
    assert_eq!(
        within("accept after loss", session.accept::<u8>())
            .await
            .expect_err("lost")
            .kind(),
        ErrorKind::ConnectionLost
    );
}

fn spawn(kind: &str, target: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stream-peer"))
        .args([kind, target])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn stream-peer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_stream_over_unix() {
    let dir = std::env::temp_dir().join(format!("libchan-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("s");
    let listener = libchan_unix::UnixListener::bind(&path, Config::new(libchan_codec_cbor::Cbor))
        .expect("bind");
    let child = spawn("unix", path.to_str().expect("utf-8 path"));
    let session = within("connect", listener.accept()).await.expect("accept");
    killed_mid_stream(session, child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_stream_over_tcp() {
    let listener =
        libchan_tcp::TcpListener::bind("127.0.0.1:0", Config::new(libchan_codec_cbor::Cbor))
            .await
            .expect("bind");
    let child = spawn("tcp", &listener.local_addr().expect("addr").to_string());
    let session = within("connect", listener.accept()).await.expect("accept");
    killed_mid_stream(session, child).await;
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid; it only sends a signal.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A peer process that accepts a channel and never reads: the sender is held back by
/// credit (its memory stays bounded, measured), and once the peer process is stopped
/// (SIGSTOP: no FIN, no RST, nothing) keepalive ends the session within its interval and
/// the pending send fails with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_then_freezes() {
    let config = Config::new(libchan_codec_cbor::Cbor).keepalive(Duration::from_millis(500));
    let listener = libchan_tcp::TcpListener::bind("127.0.0.1:0", config)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stream-peer"))
        .args(["tcp", &addr, "sink"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn stream-peer");
    let session = within("connect", listener.accept()).await.expect("accept");
    let tx = session.open::<Vec<u8>>().await.expect("open");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    within("peer accepted", out.read_line(&mut line))
        .await
        .expect("read");
    assert_eq!(line.trim(), "accepted");

    // Fill until the channel pushes back; count what left this process.
    let before = libchan_test_support::rss_bytes();
    let chunk = vec![1u8; 1 << 20];
    let mut sent = 0usize;
    within("backpressure", async {
        loop {
            match tx.try_send(chunk.clone()) {
                Ok(()) => sent += 1,
                Err(libchan_core::TrySendError::Full(_)) => break,
                Err(libchan_core::TrySendError::Failed(e)) => panic!("send failed: {}", e.error),
            }
            // Let the writer task move queued data to the socket.
            tokio::task::yield_now().await;
        }
    })
    .await;
    let grown = libchan_test_support::rss_bytes().saturating_sub(before);
    eprintln!(
        "stopped reader: {sent} MiB accepted by try_send before backpressure; RSS grew {} KiB",
        grown / 1024
    );
    // Bounded by the peer's window plus one queued message, not by what we tried to send;
    // the bound here is generous (allocator slack), the figure is in the output above.
    assert!(
        sent <= 4,
        "{sent} messages of 1 MiB accepted without a reader"
    );
    assert!(grown < 64 << 20, "RSS grew {grown} bytes");

    // Freeze the peer: it answers nothing any more, and the connection is not closed.
    let pid = child.id().expect("pid") as i32;
    signal(pid, libc::SIGSTOP);
    // The writer may still be moving what credit allows out of the queue, so the first
    // sends can find room; the peer's window bounds how many. The one that waits for room
    // must fail.
    let e = within("keepalive", async {
        loop {
            if let Err(e) = tx.send(chunk.clone()).await {
                break e;
            }
        }
    })
    .await
    .error;
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(e.message().contains("keepalive"), "{e}");
    signal(pid, libc::SIGKILL);
    let _ = child.wait().await;
}
