//! 10,000 cycles of attaching and closing descriptors and byte streams and of opening and
//! dropping nested channels, over a real unix socket (descriptors passed with SCM_RIGHTS):
//! afterwards the process's open descriptors, the runtime's live tasks and both sessions'
//! tables are back where they started.

use libchan::{channel, pipe, ByteStream, Fd, Receiver, Sender};
use libchan_test_support::{wait_until, within};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CYCLES: u32 = 10_000;

#[derive(Serialize, Deserialize)]
struct Job {
    data: ByteStream,
    file: Fd,
    reply: Sender<u32>,
    events: Receiver<u32>,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cycles_leave_no_descriptor_task_or_stream_behind() {
    let (a, b) = libchan::unix::pair(&libchan::config())
        .await
        .expect("unix pair");
    let jobs = a.open::<Job>().await.expect("open");
    let mut incoming = b.accept::<Job>().await.expect("accept").expect("channel");
    let worker = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some(mut job) = incoming.recv().await.expect("recv") {
            let mut buf = Vec::new();
            job.data.read_to_end(&mut buf).await.expect("read stream");
            let Ok(fd) = job.file.into_owned_fd() else {
                panic!("a real descriptor over unix");
            };
            let mut file = tokio::fs::File::from_std(std::fs::File::from(fd));
            let mut fbuf = Vec::new();
            file.read_to_end(&mut fbuf).await.expect("read fd");
            let event = job.events.recv().await.expect("event").expect("one event");
            job.reply
                .send(buf.len() as u32 + fbuf.len() as u32 + event)
                .await
                .expect("reply");
            n += 1;
        }
        n
    });

    let cycle = |i: u32| {
        let jobs = jobs.clone();
        async move {
            let (mut mine, theirs) = pipe();
            let (r, mut w) = std::io::pipe().expect("pipe");
            std::io::Write::write_all(&mut w, b"fd").expect("write pipe");
            drop(w);
            let (reply, mut replies) = channel(1);
            let (events_tx, events) = channel(1);
            jobs.send(Job {
                data: theirs,
                file: Fd::new(r),
                reply,
                events,
            })
            .await
            .expect("send job");
            mine.write_all(b"bytes").await.expect("write");
            mine.shutdown().await.expect("shutdown");
            events_tx.send(i).await.expect("event");
            drop(events_tx);
            assert_eq!(replies.recv().await.expect("reply"), Some(5 + 2 + i));
        }
    };

    // Warm up (runtime threads, the socket, lazily created buffers), then measure.
    cycle(0).await;
    let settled = |a: &libchan::Session, b: &libchan::Session| {
        let (sa, sb) = (a.stats(), b.stats());
        (
            sa.connection.streams,
            sb.connection.streams,
            sa.tasks,
            sb.tasks,
            sa.exported,
            sb.exported,
        )
    };
    wait_until("warm-up released", || settled(&a, &b) == (1, 1, 0, 0, 0, 0)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let fds_before = open_fds();
    let tasks_before = metrics.num_alive_tasks();

    within("10,000 cycles", async {
        for i in 1..=CYCLES {
            cycle(i).await;
        }
    })
    .await;

    wait_until("every stream, task and export released", || {
        settled(&a, &b) == (1, 1, 0, 0, 0, 0)
    })
    .await;
    wait_until("descriptors back to the baseline", || {
        open_fds() == fds_before
    })
    .await;
    wait_until("tasks back to the baseline", || {
        metrics.num_alive_tasks() == tasks_before
    })
    .await;
    drop(jobs);
    assert_eq!(within("worker", worker).await.expect("worker"), CYCLES + 1);
}
