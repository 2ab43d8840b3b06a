//! A quick performance probe (not the benchmark suite): stream, ping-pong, rpc and
//! 10,000-channel figures over unix, tcp and in memory, beside a raw unix-socket echo.
//!
//! `cargo run --release --example perf_probe [unix|tcp|mem]...`
//!
//! Both ends run as tasks on one tokio runtime with two worker threads, as in
//! ../shared/bench/WORKLOADS.md. Figures vary a lot with machine load; quote several runs.

use std::time::Instant;

use libchan::{channel, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Serialize, Deserialize, Clone)]
struct Msg {
    seq: u64,
    #[serde(with = "bytes64")]
    payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Req {
    seq: u64,
    #[serde(with = "bytes64")]
    payload: Vec<u8>,
    reply: Sender<u64>,
}

mod bytes64 {
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn pair(kind: &str) -> Res<(Session, Session)> {
    let config = libchan::config();
    Ok(match kind {
        "unix" => libchan::unix::pair(&config).await?,
        "mem" => Session::mem_pair(),
        _ => {
            let l = libchan::tcp::TcpListener::bind("127.0.0.1:0", config.clone()).await?;
            let addr = l.local_addr()?;
            let (a, b) = tokio::join!(libchan::tcp::connect(addr, &config), l.accept());
            (a?, b?)
        }
    })
}

async fn stream(kind: String, n: u64) -> Res<()> {
    let (a, b) = pair(&kind).await?;
    let tx = a.open::<Msg>().await?;
    let mut rx = b.accept::<Msg>().await?.ok_or("no channel")?;
    let t = Instant::now();
    let producer = tokio::spawn(async move {
        for seq in 0..n {
            let m = Msg {
                seq,
                payload: vec![1; 64],
            };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    for i in 0..n {
        let m = rx.recv().await?.ok_or("early end")?;
        assert_eq!(m.seq, i);
    }
    producer.await?;
    let s = t.elapsed().as_secs_f64();
    println!("{kind:>4} stream     {:>10.0} msgs/s", n as f64 / s);
    Ok(())
}

async fn pingpong(kind: String, n: usize) -> Res<()> {
    let (a, b) = pair(&kind).await?;
    let tx = a.open::<Msg>().await?;
    let mut rx = b.accept::<Msg>().await?.ok_or("no channel")?;
    let back = b.open::<Msg>().await?;
    let mut brx = a.accept::<Msg>().await?.ok_or("no channel")?;
    tokio::spawn(async move {
        while let Ok(Some(m)) = rx.recv().await {
            if back.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut v = Vec::with_capacity(n);
    for i in 0..(n + 1000) {
        let t = Instant::now();
        let m = Msg {
            seq: i as u64,
            payload: vec![1; 64],
        };
        tx.send(m).await.map_err(|e| e.error)?;
        brx.recv().await?.ok_or("early end")?;
        if i >= 1000 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    v.sort_by(f64::total_cmp);
    println!(
        "{kind:>4} pingpong   p50 {:.1} us  p99 {:.1} us",
        v[v.len() / 2],
        v[v.len() * 99 / 100]
    );
    Ok(())
}

async fn rpc(kind: String, n: u64, callers: u64) -> Res<()> {
    let (a, b) = pair(&kind).await?;
    let tx = a.open::<Req>().await?;
    let mut rx = b.accept::<Req>().await?.ok_or("no channel")?;
    tokio::spawn(async move {
        while let Ok(Some(r)) = rx.recv().await {
            let _ = r.reply.send(r.seq).await;
        }
    });
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / callers {
                let (reply, mut answer) = channel(1);
                let seq = c * n + i;
                let req = Req {
                    seq,
                    payload: vec![0; 64],
                    reply,
                };
                if tx.send(req).await.is_err() {
                    break;
                }
                assert_eq!(answer.recv().await.ok().flatten(), Some(seq));
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    println!(
        "{kind:>4} rpc x{callers:<3}   {:>10.0} req/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn channels(kind: String) -> Res<()> {
    let (a, b) = pair(&kind).await?;
    let t = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..10_000 {
            let Ok(Some(mut rx)) = b.accept::<Msg>().await else {
                break;
            };
            readers.push(tokio::spawn(async move {
                let mut c = 0;
                while let Ok(Some(_)) = rx.recv().await {
                    c += 1;
                }
                c
            }));
        }
        let mut total = 0;
        for r in readers {
            total += r.await.unwrap_or(0);
        }
        total
    });
    let mut txs = Vec::new();
    for _ in 0..10_000 {
        txs.push(a.open::<Msg>().await?);
    }
    for tx in &txs {
        for seq in 0..10 {
            let m = Msg {
                seq,
                payload: vec![1; 64],
            };
            tx.send(m).await.map_err(|e| e.error)?;
        }
    }
    drop(txs);
    let total = receiver.await?;
    assert_eq!(total, 100_000);
    println!(
        "{kind:>4} channels   {:.3} s (10,000 x 10)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn raw_pingpong(n: usize) -> Res<()> {
    let (mut a, mut b) = tokio::net::UnixStream::pair()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 84];
        while b.read_exact(&mut buf).await.is_ok() {
            if b.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut v = Vec::with_capacity(n);
    let (buf, mut r) = ([0u8; 84], [0u8; 84]);
    for i in 0..(n + 1000) {
        let t = Instant::now();
        a.write_all(&buf).await?;
        a.read_exact(&mut r).await?;
        if i >= 1000 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    v.sort_by(f64::total_cmp);
    println!(
        " raw pingpong   p50 {:.1} us (unix socket echo)",
        v[v.len() / 2]
    );
    Ok(())
}

#[tokio::main(worker_threads = 2)]
async fn main() -> Res<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    for kind in ["unix", "tcp", "mem"] {
        if !which.is_empty() && !which.iter().any(|w| w == kind) {
            continue;
        }
        let k = || kind.to_owned();
        tokio::spawn(stream(k(), 1_000_000)).await??;
        tokio::spawn(pingpong(k(), 20_000)).await??;
        tokio::spawn(rpc(k(), 20_000, 1)).await??;
        tokio::spawn(rpc(k(), 20_000, 64)).await??;
        tokio::spawn(channels(k())).await??;
    }
    tokio::spawn(raw_pingpong(20_000)).await??;
    Ok(())
}
