//! The `libchan` binary against real libchan services over tcp: JSON lines in and out,
//! and one exit code per way a session can end.

use std::process::Stdio;

use libchan::{Sender, Session};
use libchan_test_support::within;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

fn cli(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_libchan"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn libchan")
}

async fn finish(mut child: Child) -> (i32, String, String) {
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let (a, b, status) = within("cli exit", async {
        tokio::join!(
            so.read_to_string(&mut out),
            se.read_to_string(&mut err),
            child.wait()
        )
    })
    .await;
    a.expect("stdout");
    b.expect("stderr");
    (status.expect("status").code().expect("exit code"), out, err)
}

#[derive(Serialize, Deserialize, Debug)]
struct Echo {
    n: u64,
    text: String,
    #[serde(with = "serde_bytes")]
    raw: Vec<u8>,
}

/// A service that echoes each JSON value it receives, numbered, on a channel it opens.
async fn echo_service(session: Session) {
    let mut rx = within("accept", session.accept::<serde_json::Value>())
        .await
        .expect("accept")
        .expect("a channel");
    let mut tx: Option<Sender<Echo>> = None;
    let mut n = 0;
    while let Some(v) = rx.recv().await.expect("recv") {
        if tx.is_none() {
            tx = Some(session.open::<Echo>().await.expect("open"));
        }
        n += 1;
        let echo = Echo {
            n,
            text: v.to_string(),
            raw: vec![0, 1, 2],
        };
        tx.as_ref()
            .expect("tx")
            .send(echo)
            .await
            .map_err(|e| e.error)
            .expect("send");
    }
    drop(tx);
}

#[tokio::test]
async fn json_lines_in_echoes_out_and_a_clean_end_is_exit_0() {
    let listener = libchan::listen("tcp://127.0.0.1:0").await.expect("listen");
    let url = listener.local_url();
    let mut child = cli(&["connect", &url]);
    let session = within("session", listener.accept()).await.expect("accept");
    let service = tokio::spawn(echo_service(session));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"hello\":\"world\"}\n[1,2,3]\n\n\"last\"\n")
        .await
        .expect("write");
    drop(stdin);
    let (code, out, err) = finish(child).await;
    within("service", service).await.expect("service");
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["n"], 1);
    assert_eq!(lines[0]["text"], "{\"hello\":\"world\"}");
    assert_eq!(lines[1]["text"], "[1,2,3]");
    assert_eq!(lines[2]["text"], "\"last\"");
    assert_eq!(lines[2]["raw"]["$bytes"], "AAEC");
}

#[tokio::test]
async fn a_lost_connection_is_exit_3() {
    let listener = libchan::listen("tcp://127.0.0.1:0").await.expect("listen");
    let url = listener.local_url();
    let mut child = cli(&["connect", &url]);
    let session = within("session", listener.accept()).await.expect("accept");
    let _stdin = child.stdin.take();
    session.abort();
    let (code, _out, err) = finish(child).await;
    assert_eq!(code, 3, "stderr: {err}");
    assert!(err.contains("connection"), "{err}");
}

#[tokio::test]
async fn a_peer_error_is_exit_4() {
    let listener = libchan::listen("tcp://127.0.0.1:0").await.expect("listen");
    let url = listener.local_url();
    let mut child = cli(&["connect", &url]);
    let session = within("session", listener.accept()).await.expect("accept");
    let tx = session.open::<String>().await.expect("open");
    tx.send("before".into())
        .await
        .map_err(|e| e.error)
        .expect("send");
    tx.close_with_error("disk full").await;
    // stdin stays open until the message is printed: a closed stdin would end the
    // session (GOAWAY) before the channel might arrive.
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut printed = String::new();
    within("printed", stdout.read_line(&mut printed))
        .await
        .expect("read");
    assert_eq!(printed.trim(), "\"before\"");
    drop(child.stdin.take());
    let mut err = String::new();
    let mut se = child.stderr.take().expect("stderr");
    within("stderr", se.read_to_string(&mut err))
        .await
        .expect("stderr");
    let status = within("exit", child.wait()).await.expect("status");
    assert_eq!(status.code(), Some(4), "stderr: {err}");
    assert!(err.contains("disk full"), "{err}");
}

#[tokio::test]
async fn local_mistakes_are_exit_2() {
    for args in [
        vec!["connect", "nowhere"],
        vec!["connect", "ftp://x"],
        vec!["dance", "tcp://127.0.0.1:1"],
        vec!["connect", "tcp://127.0.0.1:1", "--codec", "yaml"],
        vec!["connect", "tls://127.0.0.1:1"],
    ] {
        let child = cli(&args);
        let (code, _, err) = finish(child).await;
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    // A stdin line that is not JSON.
    let listener = libchan::listen("tcp://127.0.0.1:0").await.expect("listen");
    let url = listener.local_url();
    let mut child = cli(&["connect", &url]);
    let _session = within("session", listener.accept()).await.expect("accept");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"{not json}\n").await.expect("write");
    let (code, _, err) = finish(child).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 1 is not JSON"), "{err}");
}

#[tokio::test]
async fn listen_mode_prints_what_a_client_sends() {
    let mut child = cli(&["listen", "tcp://127.0.0.1:0", "--codec", "json"]);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    within("listening line", stderr.read_line(&mut line))
        .await
        .expect("read");
    let url = line
        .trim()
        .strip_prefix("libchan: listening on ")
        .expect("the listening line")
        .to_owned();
    let client = libchan::Options::with_config(libchan::Config::new(libchan::json::Json))
        .connect(&url)
        .await
        .expect("connect");
    let tx = client.open::<(u32, String)>().await.expect("open");
    tx.send((7, "seven".into()))
        .await
        .map_err(|e| e.error)
        .expect("send");
    let confirm = tokio::spawn(async move { tx.delivered().await });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut printed = String::new();
    within("printed", stdout.read_line(&mut printed))
        .await
        .expect("read");
    assert_eq!(printed.trim(), "[7,\"seven\"]");
    within("delivered", confirm)
        .await
        .expect("task")
        .expect("delivered");
    drop(child.stdin.take());
    let status = within("exit", child.wait()).await.expect("status");
    assert_eq!(status.code(), Some(0));
}
