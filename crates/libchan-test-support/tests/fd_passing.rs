//! Descriptors passed between two real processes over a unix socket: the receiver reads a
//! file and writes into a socket the sender opened, and sends a pipe of its own back.

use std::io::{Read, Write};
use std::process::Stdio;

use libchan_core::{channel, Config, Fd, Sender};
use libchan_test_support::within;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Task {
    file: Fd,
    socket: Fd,
    reply: Sender<(String, Fd)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_cross_a_process_boundary() {
    let dir = std::env::temp_dir().join(format!("libchan-fd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock_path = dir.join("s");
    let file_path = dir.join("data.txt");
    std::fs::File::create(&file_path)
        .and_then(|mut f| f.write_all(b"contents of a file opened by the parent"))
        .expect("file");
    let config = Config::new(libchan_codec_cbor::Cbor);
    let listener = libchan_unix::UnixListener::bind(&sock_path, config).expect("bind");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fd-peer"))
        .arg(&sock_path)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn fd-peer");
    let session = within("child connects", listener.accept())
        .await
        .expect("accept");
    assert!(session.can_pass_fds());
    let tasks = session.open::<Task>().await.expect("open");
    for round in 0..3 {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (reply, mut replies) = channel(1);
        let file = std::fs::File::open(&file_path).expect("open file");
        tasks
            .send(Task {
                file: Fd::new(file),
                socket: Fd::new(theirs),
                reply,
            })
            .await
            .map_err(|e| e.error)
            .expect("send");
        let (contents, pipe) = within("reply", replies.recv())
            .await
            .expect("recv")
            .expect("a reply");
        assert_eq!(
            contents, "contents of a file opened by the parent",
            "round {round}"
        );
        let greeting = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let mut mine = mine;
            mine.read_to_string(&mut s).map(|_| s)
        })
        .await
        .expect("join")
        .expect("read socket");
        assert!(greeting.starts_with("hello from pid "), "{greeting}");
        let child_pid: u32 = greeting.trim()["hello from pid ".len()..]
            .parse()
            .expect("pid");
        assert_ne!(
            child_pid,
            std::process::id(),
            "a different process wrote it"
        );
        let mut f = std::fs::File::from(pipe.into_owned_fd().expect("a real descriptor"));
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read pipe");
        assert_eq!(s, "written by the child before sending the read end");
    }
    drop(tasks);
    let status = within("child exits", child.wait()).await.expect("wait");
    assert!(status.success(), "child: {status}");
    std::fs::remove_dir_all(&dir).ok();
}
