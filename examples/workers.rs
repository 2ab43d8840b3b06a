//! A worker pool. Workers connect to a dispatcher and register by sending it a
//! `Receiver`: on it the dispatcher receives one job slot (a `Sender<Job>`) each time the
//! worker is idle, so work is pulled, never pushed to a busy worker. Clients submit jobs
//! that carry their own reply channel; the dispatcher never sees the results.
//!
//! Everything runs over unix-socket sessions, addressed by URL (one process here, for a
//! self-contained example; each role could be its own process).
//!
//! ```sh
//! cargo run --example workers
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use libchan::{channel, Receiver, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Serialize, Deserialize)]
struct Job {
    numbers: Vec<u64>,
    reply: Sender<Done>,
}

#[derive(Serialize, Deserialize, Debug)]
struct Done {
    sum: u64,
    worker: String,
}

/// What a worker sends to register.
#[derive(Serialize, Deserialize)]
struct Register {
    name: String,
    /// One job slot per idle moment of the worker.
    slots: Receiver<Sender<Job>>,
}

/// What arrives at the dispatcher: a worker registering, or a client's job queue.
#[derive(Serialize, Deserialize)]
enum Hello {
    Worker(Register),
    Client(Receiver<Job>),
}

/// The dispatcher: one queue of jobs, handed to whichever worker asks first.
async fn dispatcher(listener: libchan::Listener) -> Result<()> {
    let (queue_tx, queue_rx) = channel::<Job>(64);
    let queue = Arc::new(Mutex::new(queue_rx));
    loop {
        let session = listener.accept().await?;
        let queue_tx = queue_tx.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            let Ok(Some(mut hellos)) = session.accept::<Hello>().await else {
                return;
            };
            while let Ok(Some(hello)) = hellos.recv().await {
                match hello {
                    Hello::Client(mut jobs) => {
                        let queue_tx = queue_tx.clone();
                        tokio::spawn(async move {
                            while let Ok(Some(job)) = jobs.recv().await {
                                if queue_tx.send(job).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Hello::Worker(mut reg) => {
                        let queue = queue.clone();
                        let requeue = queue_tx.clone();
                        eprintln!("dispatcher: {} registered", reg.name);
                        tokio::spawn(async move {
                            // Each slot the worker offers gets the next job.
                            while let Ok(Some(slot)) = reg.slots.recv().await {
                                let job = queue.lock().await.recv().await;
                                let Ok(Some(job)) = job else { return };
                                if let Err(e) = slot.send(job).await {
                                    // The worker went away: the job goes back in the queue
                                    // for another worker.
                                    let _ = requeue.send(e.message).await;
                                    return;
                                }
                            }
                        });
                    }
                }
            }
        });
    }
}

/// A worker: asks for a job, does it, asks for the next.
async fn worker(url: String, name: String) -> Result<()> {
    let session = libchan::connect(&url).await?;
    let hellos = session.open::<Hello>().await?;
    let (slots_tx, slots_rx) = channel::<Sender<Job>>(1);
    hellos
        .send(Hello::Worker(Register {
            name: name.clone(),
            slots: slots_rx,
        }))
        .await
        .map_err(|e| e.error)?;
    loop {
        let (slot, mut job_rx) = channel::<Job>(1);
        if slots_tx.send(slot).await.is_err() {
            return Ok(());
        }
        let Some(job) = job_rx.recv().await? else {
            return Ok(());
        };
        let sum = job.numbers.iter().sum();
        let _ = job
            .reply
            .send(Done {
                sum,
                worker: name.clone(),
            })
            .await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("libchan-workers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("unix://{}", dir.join("dispatcher.sock").display());
    let listener = libchan::listen(&url).await?;
    tokio::spawn(dispatcher(listener));
    for i in 0..3 {
        tokio::spawn(worker(url.clone(), format!("worker-{i}")));
    }

    let client: Session = libchan::connect(&url).await?;
    let hellos = client.open::<Hello>().await?;
    let (jobs_tx, jobs_rx) = channel::<Job>(16);
    hellos
        .send(Hello::Client(jobs_rx))
        .await
        .map_err(|e| e.error)?;
    let mut replies = Vec::new();
    for n in 1..=30u64 {
        let (reply, rx) = channel::<Done>(1);
        jobs_tx
            .send(Job {
                numbers: (1..=n).collect(),
                reply,
            })
            .await
            .map_err(|e| e.error)?;
        replies.push((n, rx));
    }
    let mut per_worker = BTreeMap::new();
    for (n, mut rx) in replies {
        let done = rx.recv().await?.ok_or("no reply")?;
        if done.sum != n * (n + 1) / 2 {
            return Err(format!("job {n}: wrong sum {}", done.sum).into());
        }
        *per_worker.entry(done.worker).or_insert(0) += 1;
    }
    println!("30 jobs done, all sums right; jobs per worker: {per_worker:?}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
