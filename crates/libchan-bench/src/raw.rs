//! The workloads on bare sockets: frames `[len u32][chan u32][seq u64][payload]` through
//! 64 KiB buffered readers and writers, flushed per message for ping-pong and rpc and when
//! full for streams (as ../shared/bench/PEERS.md measured "raw"). In memory: tokio mpsc.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::{count_to_end, emit, peak_rss_mb, report_pingpong, report_rpc, transfer, Counts, Res};

const SYSTEM: &str = "raw";
const BUF: usize = 64 * 1024;

type R = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type W = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

struct Frame {
    chan: u32,
    seq: u64,
    payload: Vec<u8>,
}

async fn write_frame(w: &mut W, chan: u32, seq: u64, payload: &[u8]) -> Res<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    h[4..8].copy_from_slice(&chan.to_be_bytes());
    h[8..16].copy_from_slice(&seq.to_be_bytes());
    w.write_all(&h).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Reads a frame into `payload` (reused); `None` at end of stream.
async fn read_frame(r: &mut R, payload: &mut Vec<u8>) -> Res<Option<(u32, u64)>> {
    let mut h = [0u8; 16];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > 64 << 20 {
        return Err(format!("frame of {len} bytes").into());
    }
    payload.resize(len, 0);
    r.read_exact(payload).await?;
    let chan = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let seq = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    Ok(Some((chan, seq)))
}

/// A connected pair of sockets, split into buffered halves: (a_read, a_write, b_read, b_write).
async fn sockets(t: &str) -> Res<(R, W, R, W)> {
    fn halves<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (R, W) {
        let (r, w) = tokio::io::split(s);
        (
            BufReader::with_capacity(BUF, Box::new(r) as Box<dyn AsyncRead + Send + Unpin>),
            BufWriter::with_capacity(BUF, Box::new(w) as Box<dyn AsyncWrite + Send + Unpin>),
        )
    }
    if t == "unix" {
        let (a, b) = tokio::net::UnixStream::pair()?;
        let (ar, aw) = halves(a);
        let (br, bw) = halves(b);
        return Ok((ar, aw, br, bw));
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    let (a, (b, _)) = (a?, b?);
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let (ar, aw) = halves(a);
    let (br, bw) = halves(b);
    Ok((ar, aw, br, bw))
}

/// Runs one workload on one transport.
pub(crate) async fn run(t: &str, w: &str, c: Counts) -> Res<()> {
    if t == "inmem" {
        return inmem(w, c).await;
    }
    match w {
        "pingpong" => pingpong(t, c).await,
        "stream" => stream(t, c.stream, 64, "stream").await,
        "bulk" => stream(t, c.bulk, 1 << 20, "bulk").await,
        "rpc" => rpc(t, c).await,
        "bytestream" => bytestream(t, c).await,
        "channels" => channels(t, c).await,
        _ => Err(format!("unknown workload {w}").into()),
    }
}

async fn pingpong(t: &str, c: Counts) -> Res<()> {
    let (mut ar, mut aw, mut br, mut bw) = sockets(t).await?;
    tokio::spawn(async move {
        let mut p = Vec::new();
        while let Ok(Some((chan, seq))) = read_frame(&mut br, &mut p).await {
            if write_frame(&mut bw, chan, seq, &p).await.is_err() || bw.flush().await.is_err() {
                break;
            }
        }
    });
    let payload = vec![7u8; 64];
    let mut p = Vec::new();
    let mut rtts = Vec::with_capacity(c.pingpong);
    let mut measured = Instant::now();
    for i in 0..(c.warmup + c.pingpong) {
        if i == c.warmup {
            measured = Instant::now();
        }
        let t0 = Instant::now();
        write_frame(&mut aw, 1, i as u64, &payload).await?;
        aw.flush().await?;
        read_frame(&mut ar, &mut p).await?.ok_or("echo ended")?;
        if i >= c.warmup {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    report_pingpong(SYSTEM, t, rtts, measured.elapsed().as_secs_f64());
    Ok(())
}

/// `stream` (64-byte payloads) and `bulk` (1 MiB payloads): one way, checked in order.
async fn stream(t: &str, n: u64, size: usize, workload: &str) -> Res<()> {
    let (_ar, mut aw, mut br, _bw) = sockets(t).await?;
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        let payload = vec![7u8; size];
        for seq in 0..n {
            write_frame(&mut aw, 1, seq, &payload).await?;
        }
        aw.flush().await?;
        aw.shutdown().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    let mut p = Vec::new();
    for i in 0..n {
        let (_, seq) = read_frame(&mut br, &mut p).await?.ok_or("early end")?;
        if seq != i || p.len() != size {
            return Err("out of order or short".into());
        }
    }
    producer.await??;
    let s = start.elapsed().as_secs_f64();
    let mb = (n as f64 * size as f64) / (1 << 20) as f64;
    if workload == "stream" {
        emit(SYSTEM, t, "stream", "msgs_per_s", n as f64 / s);
    }
    emit(SYSTEM, t, workload, "mb_per_s", mb / s);
    Ok(())
}

/// Requests carry an id standing in for the reply channel; a writer task batches while
/// its queue is non-empty; replies are routed to oneshots by id.
async fn rpc(t: &str, c: Counts) -> Res<()> {
    let (mut ar, mut aw, mut br, mut bw) = sockets(t).await?;
    // Server: answer each request; flush when no more input is buffered.
    tokio::spawn(async move {
        let mut p = Vec::new();
        while let Ok(Some((chan, seq))) = read_frame(&mut br, &mut p).await {
            if write_frame(&mut bw, chan, seq, &[]).await.is_err() {
                break;
            }
            if br.buffer().is_empty() && bw.flush().await.is_err() {
                break;
            }
        }
    });
    let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<u64>>>> = Arc::default();
    let (qtx, mut qrx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        while let Some(f) = qrx.recv().await {
            if write_frame(&mut aw, f.chan, f.seq, &f.payload)
                .await
                .is_err()
            {
                return;
            }
            while let Ok(f) = qrx.try_recv() {
                if write_frame(&mut aw, f.chan, f.seq, &f.payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if aw.flush().await.is_err() {
                return;
            }
        }
    });
    let routes = pending.clone();
    tokio::spawn(async move {
        let mut p = Vec::new();
        while let Ok(Some((_, seq))) = read_frame(&mut ar, &mut p).await {
            let tx = routes.lock().ok().and_then(|mut m| m.remove(&seq));
            if let Some(tx) = tx {
                let _ = tx.send(seq);
            }
        }
    });
    for callers in [1u64, 64] {
        let n = c.rpc;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..callers {
            let (qtx, pending) = (qtx.clone(), pending.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..n / callers {
                    let t0 = Instant::now();
                    let seq = (callers << 40) + k * n + i;
                    let (tx, rx) = oneshot::channel();
                    pending.lock().map_err(|_| "poisoned")?.insert(seq, tx);
                    qtx.send(Frame {
                        chan: 1,
                        seq,
                        payload: vec![7; 64],
                    })
                    .map_err(|_| "writer gone")?;
                    if rx.await.map_err(|_| "no reply")? != seq {
                        return Err("wrong reply");
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

/// 1 GiB through a socket in 64 KiB writes. On unix, as PEERS.md measured it: a header
/// frame with a fresh socketpair end attached (`SCM_RIGHTS`) goes over the connection,
/// and the bytes go through the passed socket; on tcp, through the connection itself.
async fn bytestream(t: &str, c: Counts) -> Res<()> {
    let total = c.bytestream;
    let start = Instant::now();
    let (w, r): (
        Box<dyn AsyncWrite + Send + Unpin>,
        Box<dyn AsyncRead + Send + Unpin>,
    ) = if t == "unix" {
        let (x, y) = std::os::unix::net::UnixStream::pair()?;
        let received = pass_fd(y)?;
        x.set_nonblocking(true)?;
        received.set_nonblocking(true)?;
        (
            Box::new(tokio::net::UnixStream::from_std(x)?),
            Box::new(tokio::net::UnixStream::from_std(received)?),
        )
    } else {
        let (_ar, aw, br, _bw) = sockets(t).await?;
        (Box::new(aw.into_inner()), Box::new(br.into_inner()))
    };
    let reader = tokio::spawn(count_to_end(r));
    transfer(SYSTEM, t, start, w, reader, total).await
}

/// Sends `fd` with a 16-byte header frame over a fresh unix connection and returns the
/// descriptor as received on the other side.
fn pass_fd(fd: std::os::unix::net::UnixStream) -> Res<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let header = [0u8; 16];
    let raw = [fd.as_raw_fd()];
    sendmsg::<()>(
        a.as_raw_fd(),
        &[IoSlice::new(&header)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )?;
    drop(fd);
    let mut buf = [0u8; 16];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        b.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&r) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(r) };
                return Ok(std::os::unix::net::UnixStream::from(owned));
            }
        }
    }
    Err("no descriptor received".into())
}

async fn channels(t: &str, c: Counts) -> Res<()> {
    let (_ar, mut aw, mut br, _bw) = sockets(t).await?;
    let k = c.channels;
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        let payload = vec![7u8; 64];
        for chan in 0..k {
            for seq in 0..10 {
                write_frame(&mut aw, chan, seq, &payload).await?;
            }
        }
        aw.flush().await?;
        aw.shutdown().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    let mut per: HashMap<u32, u64> = HashMap::new();
    let mut p = Vec::new();
    while let Some((chan, _)) = read_frame(&mut br, &mut p).await? {
        *per.entry(chan).or_default() += 1;
    }
    producer.await??;
    if per.len() != k as usize || per.values().any(|n| *n != 10) {
        return Err("lost messages".into());
    }
    emit(SYSTEM, t, "channels", "secs", start.elapsed().as_secs_f64());
    emit(SYSTEM, t, "channels", "peak_rss_mb", peak_rss_mb());
    Ok(())
}

/// In memory: tokio mpsc channels carrying the same values.
async fn inmem(w: &str, c: Counts) -> Res<()> {
    let t = "inmem";
    match w {
        "pingpong" => {
            let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(64);
            let (btx, mut brx) = mpsc::channel::<(u64, Vec<u8>)>(64);
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if btx.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let mut rtts = Vec::new();
            let mut measured = Instant::now();
            for i in 0..(c.warmup + c.pingpong) {
                if i == c.warmup {
                    measured = Instant::now();
                }
                let t0 = Instant::now();
                tx.send((i as u64, vec![7; 64])).await?;
                brx.recv().await.ok_or("echo ended")?;
                if i >= c.warmup {
                    rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            report_pingpong(SYSTEM, t, rtts, measured.elapsed().as_secs_f64());
        }
        "stream" | "bulk" => {
            let (n, size) = if w == "stream" {
                (c.stream, 64)
            } else {
                (c.bulk, 1 << 20)
            };
            let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(64);
            let start = Instant::now();
            tokio::spawn(async move {
                for seq in 0..n {
                    if tx.send((seq, vec![7; size])).await.is_err() {
                        break;
                    }
                }
            });
            for i in 0..n {
                let (seq, _) = rx.recv().await.ok_or("early end")?;
                if seq != i {
                    return Err("out of order".into());
                }
            }
            let s = start.elapsed().as_secs_f64();
            if w == "stream" {
                emit(SYSTEM, t, "stream", "msgs_per_s", n as f64 / s);
            }
            emit(
                SYSTEM,
                t,
                w,
                "mb_per_s",
                n as f64 * size as f64 / (1 << 20) as f64 / s,
            );
        }
        "channels" => {
            let start = Instant::now();
            let mut readers = Vec::new();
            let mut txs = Vec::new();
            for _ in 0..c.channels {
                let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(64);
                txs.push(tx);
                readers.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while rx.recv().await.is_some() {
                        n += 1;
                    }
                    n
                }));
            }
            for tx in &txs {
                for seq in 0..10 {
                    tx.send((seq, vec![7; 64])).await?;
                }
            }
            drop(txs);
            let mut total = 0;
            for r in readers {
                total += r.await?;
            }
            if total != u64::from(c.channels) * 10 {
                return Err("lost messages".into());
            }
            emit(SYSTEM, t, "channels", "secs", start.elapsed().as_secs_f64());
            emit(SYSTEM, t, "channels", "peak_rss_mb", peak_rss_mb());
        }
        _ => {}
    }
    Ok(())
}
