//! A separate process for the fd-passing tests: it connects to the unix socket given as
//! its argument, receives files and sockets, uses them, and sends a descriptor back.

use std::io::{Read, Write};

use libchan_core::{Config, Fd, Sender};
use serde::{Deserialize, Serialize};

/// What the test process sends.
#[derive(Serialize, Deserialize)]
struct Task {
    /// A file opened by the test: read it.
    file: Fd,
    /// One end of a socketpair: write a greeting into it.
    socket: Fd,
    /// Where to report what was read, and to send a descriptor back.
    reply: Sender<(String, Fd)>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: fd-peer SOCKET")?;
    let config = Config::new(libchan_codec_cbor::Cbor);
    let session = libchan_unix::connect(&path, &config).await?;
    let mut tasks = session.accept::<Task>().await?.ok_or("no task channel")?;
    while let Some(task) = tasks.recv().await? {
        let mut file = std::fs::File::from(task.file.into_owned_fd().map_err(|_| "not a fd")?);
        let mut contents = String::new();
        file.read_to_string(&mut contents)?;
        let mut sock = std::os::unix::net::UnixStream::from(
            task.socket.into_owned_fd().map_err(|_| "not a fd")?,
        );
        writeln!(sock, "hello from pid {}", std::process::id())?;
        drop(sock);
        // A pipe of our own, its read end sent back.
        let (r, mut w) = std::io::pipe()?;
        w.write_all(b"written by the child before sending the read end")?;
        drop(w);
        task.reply
            .send((contents, Fd::new(r)))
            .await
            .map_err(|e| e.error)?;
    }
    Ok(())
}
