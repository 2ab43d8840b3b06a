//! The workloads on libchan, through the same public API a user calls.

use std::time::Instant;

use libchan::{channel, pipe, Blob, ByteStream, Fd, Sender, Session};
use serde::{Deserialize, Serialize};

use crate::{count_to_end, emit, peak_rss_mb, report_pingpong, report_rpc, transfer, Counts, Res};

const SYSTEM: &str = "libchan";

/// `{seq: u64, payload: bytes}`.
#[derive(Serialize, Deserialize, Clone)]
struct Msg {
    seq: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// `{seq: u64, payload: bytes}` with the payload a [`Blob`]: the type libchan offers for
/// large byte payloads (the same bytes on the wire as `Msg`, sent and received without a
/// user-space copy where the codec allows).
#[derive(Serialize, Deserialize)]
struct BlobMsg {
    seq: u64,
    payload: Blob,
}

#[derive(Serialize, Deserialize)]
struct Req {
    seq: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    reply: Sender<u64>,
}

#[derive(Serialize, Deserialize)]
enum Attached {
    Fd(Fd),
    Stream(ByteStream),
}

fn msg(seq: u64, len: usize) -> Msg {
    Msg {
        seq,
        payload: vec![7; len],
    }
}

async fn pair(transport: &str) -> Res<(Session, Session)> {
    let config = libchan::config();
    Ok(match transport {
        "inmem" => Session::mem_pair(),
        "unix" => libchan::unix::pair(&config).await?,
        "tls" => {
            let pki = libchan_test_support::pki::test_pki();
            let server = libchan::tls::ServerTls::from_pem(
                pki.server_cert_pem.as_bytes(),
                pki.server_key_pem.as_bytes(),
            )?
            .build()?;
            let client = libchan::tls::ClientTls::with_roots_pem(pki.ca_pem.as_bytes())?.build()?;
            let l = libchan::tls::TlsListener::bind("127.0.0.1:0", server, config.clone()).await?;
            let addr = l.local_addr()?;
            let (a, b) = tokio::join!(
                libchan::tls::connect(addr, "localhost", client, &config),
                l.accept()
            );
            (a?, b?)
        }
        "h2" => {
            let l = libchan::h2::H2Listener::bind("127.0.0.1:0", config.clone()).await?;
            let client = libchan::h2::H2Client::new(l.local_addr().to_string(), config.clone());
            let (a, b) = tokio::join!(client.connect(), l.accept());
            // The listener's accept loop must outlive the sessions: keep it for the run.
            std::mem::forget(l);
            (a?, b?)
        }
        "ws" => {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("ws://{}/libchan", tcp.local_addr()?);
            let c = config.clone();
            let server = tokio::spawn(async move {
                let (s, _) = tcp.accept().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libchan::ws::accept(s, None, &c).await?,
                )
            });
            let a = libchan::ws::WsClient::new(url, config.clone())
                .connect()
                .await?;
            let b = server.await?.map_err(|e| e.to_string())?;
            (a, b)
        }
        _ => {
            let l = libchan::tcp::TcpListener::bind("127.0.0.1:0", config.clone()).await?;
            let addr = l.local_addr()?;
            let (a, b) = tokio::join!(libchan::tcp::connect(addr, &config), l.accept());
            (a?, b?)
        }
    })
}

async fn open<T: libchan::Message>(
    a: &Session,
    b: &Session,
) -> Res<(Sender<T>, libchan::Receiver<T>)> {
    let tx = a.open::<T>().await?;
    let rx = b.accept::<T>().await?.ok_or("no channel")?;
    Ok((tx, rx))
}

/// Runs one workload on one transport.
pub(crate) async fn run(t: &str, w: &str, c: Counts) -> Res<()> {
    let (a, b) = pair(t).await?;
    match w {
        "pingpong" => pingpong(t, &a, &b, c).await,
        "stream" => stream(t, &a, &b, c).await,
        "bulk" => bulk(t, &a, &b, c).await,
        "rpc" => rpc(t, &a, &b, c).await,
        "bytestream" => bytestream(t, &a, &b, c).await,
        "channels" => channels(t, a, b, c).await,
        _ => Err(format!("unknown workload {w}").into()),
    }
}

async fn pingpong(t: &str, a: &Session, b: &Session, c: Counts) -> Res<()> {
    let (tx, mut rx) = open::<Msg>(a, b).await?;
    let (back, mut back_rx) = open::<Msg>(b, a).await?;
    tokio::spawn(async move {
        while let Ok(Some(m)) = rx.recv().await {
            if back.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut rtts = Vec::with_capacity(c.pingpong);
    let start = Instant::now();
    let mut measured_start = start;
    for i in 0..(c.warmup + c.pingpong) {
        if i == c.warmup {
            measured_start = Instant::now();
        }
        let t0 = Instant::now();
        tx.send(msg(i as u64, 64)).await.map_err(|e| e.error)?;
        back_rx.recv().await?.ok_or("echo ended")?;
        if i >= c.warmup {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    report_pingpong(SYSTEM, t, rtts, measured_start.elapsed().as_secs_f64());
    Ok(())
}

async fn stream(t: &str, a: &Session, b: &Session, c: Counts) -> Res<()> {
    let (tx, mut rx) = open::<Msg>(a, b).await?;
    let n = c.stream;
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for seq in 0..n {
            if tx.send(msg(seq, 64)).await.is_err() {
                break;
            }
        }
    });
    for i in 0..n {
        let m = rx.recv().await?.ok_or("early end")?;
        if m.seq != i {
            return Err(format!("out of order: {} after {}", m.seq, i).into());
        }
    }
    producer.await?;
    let s = start.elapsed().as_secs_f64();
    emit(SYSTEM, t, "stream", "msgs_per_s", n as f64 / s);
    emit(
        SYSTEM,
        t,
        "stream",
        "mb_per_s",
        (n * 64) as f64 / (1 << 20) as f64 / s,
    );
    Ok(())
}

async fn bulk(t: &str, a: &Session, b: &Session, c: Counts) -> Res<()> {
    let (tx, mut rx) = open::<BlobMsg>(a, b).await?;
    let n = c.bulk;
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        // One payload, sent 1,024 times: cloning a Blob is a reference count.
        let payload = Blob::from(vec![7u8; 1 << 20]);
        for seq in 0..n {
            let m = BlobMsg {
                seq,
                payload: payload.clone(),
            };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    for _ in 0..n {
        let m = rx.recv().await?.ok_or("early end")?;
        if m.payload.len() != 1 << 20 {
            return Err("short payload".into());
        }
    }
    producer.await?;
    emit(
        SYSTEM,
        t,
        "bulk",
        "mb_per_s",
        n as f64 / start.elapsed().as_secs_f64(),
    );
    Ok(())
}

async fn rpc(t: &str, a: &Session, b: &Session, c: Counts) -> Res<()> {
    let (tx, mut rx) = open::<Req>(a, b).await?;
    tokio::spawn(async move {
        while let Ok(Some(r)) = rx.recv().await {
            let _ = r.reply.send(r.seq).await;
        }
    });
    for callers in [1u64, 64] {
        let n = c.rpc;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..callers {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..n / callers {
                    let t0 = Instant::now();
                    let (reply, mut answer) = channel(1);
                    let seq = k * n + i;
                    let req = Req {
                        seq,
                        payload: vec![7; 64],
                        reply,
                    };
                    tx.send(req).await.map_err(|e| e.error.to_string())?;
                    if answer.recv().await.map_err(|e| e.to_string())? != Some(seq) {
                        return Err("wrong answer".to_owned());
                    }
                    lat.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                Ok(lat)
            }));
        }
        let mut lat = Vec::new();
        for task in tasks {
            lat.extend(task.await??);
        }
        report_rpc(SYSTEM, t, callers, n, start.elapsed().as_secs_f64(), lat);
    }
    Ok(())
}

async fn bytestream(t: &str, a: &Session, b: &Session, c: Counts) -> Res<()> {
    let (tx, mut rx) = open::<Attached>(a, b).await?;
    let total = c.bytestream;
    let start = Instant::now();
    // Unix: a socketpair end passed as a real descriptor; elsewhere a libchan byte stream.
    let writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if t == "unix" {
        let (x, y) = std::os::unix::net::UnixStream::pair()?;
        tx.send(Attached::Fd(Fd::new(y)))
            .await
            .map_err(|e| e.error)?;
        x.set_nonblocking(true)?;
        Box::new(tokio::net::UnixStream::from_std(x)?)
    } else {
        let (mine, theirs) = pipe();
        tx.send(Attached::Stream(theirs))
            .await
            .map_err(|e| e.error)?;
        Box::new(mine)
    };
    let reader = tokio::spawn(async move {
        let got = rx.recv().await?.ok_or("no attachment")?;
        let r: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match got {
            Attached::Fd(fd) => match fd.into_owned_fd() {
                Ok(fd) => {
                    let s = std::os::unix::net::UnixStream::from(fd);
                    s.set_nonblocking(true)?;
                    Box::new(tokio::net::UnixStream::from_std(s)?)
                }
                Err(fd) => Box::new(fd.into_stream().map_err(|_| "neither fd nor stream")?),
            },
            Attached::Stream(s) => Box::new(s),
        };
        count_to_end(r).await
    });
    transfer(SYSTEM, t, start, writer, reader, total).await
}

async fn channels(t: &str, a: Session, b: Session, c: Counts) -> Res<()> {
    let k = c.channels;
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..k {
            let Some(mut rx) = b.accept::<Msg>().await? else {
                break;
            };
            readers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Ok(Some(_)) = rx.recv().await {
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for r in readers {
            total += r.await?;
        }
        Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(total)
    });
    let mut txs = Vec::with_capacity(k as usize);
    for _ in 0..k {
        txs.push(a.open::<Msg>().await?);
    }
    for tx in &txs {
        for seq in 0..10 {
            tx.send(msg(seq, 64)).await.map_err(|e| e.error)?;
        }
    }
    drop(txs);
    let total = receiver.await??;
    if total != u64::from(k) * 10 {
        return Err(format!("received {total} of {} messages", u64::from(k) * 10).into());
    }
    emit(SYSTEM, t, "channels", "secs", start.elapsed().as_secs_f64());
    emit(SYSTEM, t, "channels", "peak_rss_mb", peak_rss_mb());
    Ok(())
}
