//! The main demo: one small application run over every transport compiled in.
//!
//! A client sends a job that carries a reply Sender, a byte stream with the job's input and
//! a file descriptor; the server answers on the reply Sender with a summary that carries a
//! Receiver of progress events of its own. Over unix the descriptor is passed for real;
//! over tcp its contents travel as a byte stream; in memory everything moves as values.
//!
//! Run it with `cargo run --example demo`.

use std::io::Write;

use libchan::{channel, ByteStream, Fd, Receiver, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Serialize, Deserialize)]
struct Job {
    name: String,
    input: ByteStream,
    attachment: Fd,
    reply: Sender<Summary>,
}

#[derive(Serialize, Deserialize)]
struct Summary {
    words: usize,
    bytes: usize,
    attachment: String,
    attachment_was_descriptor: bool,
    events: Receiver<String>,
}

async fn server(session: Session) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut jobs = session.accept::<Job>().await?.ok_or("no job channel")?;
    while let Some(job) = jobs.recv().await? {
        let (events, events_rx) = channel(16);
        let mut input = job.input;
        let mut text = String::new();
        input.read_to_string(&mut text).await?;
        let was_fd = job.attachment.is_descriptor();
        let attachment = match job.attachment.into_owned_fd() {
            Ok(fd) => {
                tokio::task::spawn_blocking(move || {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).map(|_| s)
                })
                .await??
            }
            Err(fd) => {
                let mut s = String::new();
                let mut stream = fd.into_stream().map_err(|_| "attachment is neither")?;
                stream.read_to_string(&mut s).await?;
                s
            }
        };
        let summary = Summary {
            words: text.split_whitespace().count(),
            bytes: text.len(),
            attachment,
            attachment_was_descriptor: was_fd,
            events: events_rx,
        };
        job.reply.send(summary).await.map_err(|e| e.error)?;
        for e in ["started", "counted", "done"] {
            events
                .send(format!("{}: {e}", job.name))
                .await
                .map_err(|e| e.error)?;
        }
    }
    Ok(())
}

async fn client(
    session: Session,
    label: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let jobs = session.open::<Job>().await?;
    let (mut input, theirs) = libchan::pipe();
    let (reply, mut replies) = channel(1);
    let mut file = tempfile()?;
    writeln!(file, "hello from a file opened by the client")?;
    let file = std::fs::File::open(file_path())?;
    jobs.send(Job {
        name: format!("job@{label}"),
        input: theirs,
        attachment: Fd::new(file),
        reply,
    })
    .await
    .map_err(|e| e.error)?;
    input
        .write_all(b"the quick brown fox jumps over the lazy dog")
        .await?;
    input.shutdown().await?;
    let mut summary = replies.recv().await?.ok_or("no reply")?;
    let mut events = Vec::new();
    while let Some(e) = summary.events.recv().await? {
        events.push(e);
    }
    println!(
        "[{label:>4}] codec={} reply: {} words, {} bytes; attachment {}: {:?}; events: {}",
        session.codec(),
        summary.words,
        summary.bytes,
        if summary.attachment_was_descriptor {
            "passed as a real descriptor"
        } else {
            "streamed as bytes"
        },
        summary.attachment.trim(),
        events.join(", ")
    );
    Ok(())
}

fn file_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("libchan-demo-{}.txt", std::process::id()))
}

fn tempfile() -> std::io::Result<std::fs::File> {
    std::fs::File::create(file_path())
}

async fn run(
    label: &str,
    (a, b): (Session, Session),
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = tokio::spawn(server(b));
    client(a, label).await?;
    server.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    run("mem", Session::mem_pair()).await?;

    // The same code over sockets, addressed by URL (`libchan::listen` / `connect`).
    let dir = std::env::temp_dir().join(format!("libchan-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let unix = format!("unix://{}", dir.join("demo.sock").display());
    for url in [unix.as_str(), "tcp://127.0.0.1:0"] {
        let listener = libchan::listen(url).await?;
        let local = listener.local_url();
        let (a, b) = tokio::join!(libchan::connect(&local), listener.accept());
        run(url.split(':').next().unwrap_or(url), (a?, b?)).await?;
    }
    std::fs::remove_dir_all(&dir).ok();

    std::fs::remove_file(file_path()).ok();
    Ok(())
}
