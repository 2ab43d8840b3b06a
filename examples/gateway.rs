//! The tcp gateway in front of a real Redis server.
//!
//! Starts `redis-server` (from the distribution's packages), a libchan service that
//! forwards each client connection it receives to Redis, and a [`Gateway`] on a tcp port
//! that hands every accepted connection to the service — once over a unix-socket session
//! (the client's descriptor is passed: the gateway is out of the data path) and once over
//! a tcp session (the connection travels as a byte stream through the gateway). Then the
//! real `redis-cli` and `redis-benchmark` talk to Redis directly, through a plain tcp
//! proxy doing the same forwarding as the service (the baseline for the gateway's own
//! cost), and through each gateway.
//!
//! ```sh
//! cargo run --release --example gateway -- --requests 100000
//! ```

use std::process::Stdio;
use std::time::Duration;

use libchan::gateway::{Accepted, Gateway};
use libchan::Session;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A free loopback port (bound, then released for Redis to take).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts Redis on `port` and waits until it says it is ready.
async fn start_redis(port: u16) -> Result<tokio::process::Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(out).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("Ready to accept connections") {
                return Ok::<_, std::io::Error>(true);
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(Duration::from_secs(30), ready).await {
        Ok(Ok(true)) => {}
        _ => return Err("redis-server did not become ready".into()),
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// The service: every connection it is handed goes to Redis.
async fn service(session: Session, redis: String) -> Result<()> {
    let mut incoming = session
        .accept::<Accepted>()
        .await?
        .ok_or("no channel from the gateway")?;
    while let Some(accepted) = incoming.recv().await? {
        let redis = redis.clone();
        tokio::spawn(async move {
            let Ok(mut client) = accepted.into_io() else {
                return;
            };
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(&redis).await {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
    Ok(())
}

/// A gateway on a free port whose service is reached over the session pair `pair`.
async fn gateway(pair: (Session, Session), redis: &str) -> Result<u16> {
    let (gw_side, service_side) = pair;
    tokio::spawn(service(service_side, redis.to_owned()));
    let conns = gw_side.open::<Accepted>().await?;
    let gw = Gateway::bind("127.0.0.1:0").await?;
    let port = gw.local_addr()?.port();
    tokio::spawn(async move {
        let _keep = gw_side;
        gw.serve(conns).await
    });
    Ok(port)
}

/// The same forwarding as the service, without libchan: the baseline for the gateway's
/// own cost (the service's copy to Redis is in both).
async fn plain_proxy(redis: &str) -> Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let redis = redis.to_owned();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let redis = redis.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(&redis).await {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    Ok(port)
}

async fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `redis-benchmark` SET and GET through `port`; returns its "requests per second" lines.
async fn bench(port: u16, requests: u32) -> Result<String> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            "set,get",
            "-n",
            &requests.to_string(),
            "-c",
            "50",
            "-q",
        ])
        .output()
        .await?;
    if !out.status.success() {
        return Err("redis-benchmark failed".into());
    }
    let text = String::from_utf8(out.stdout)?;
    // -q prints "SET: 123.45 requests per second, p50=..." after carriage returns.
    let lines: Vec<String> = text
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .map(|l| l.trim().to_owned())
        .collect();
    if lines.len() != 2 {
        return Err(format!("unexpected redis-benchmark output: {text:?}").into());
    }
    Ok(lines.join("; "))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut requests = 2_000u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => requests = args.next().ok_or("--requests N")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let redis_port = free_port()?;
    let _redis = start_redis(redis_port).await?;
    let redis = format!("127.0.0.1:{redis_port}");

    let config = libchan::config();
    let via_unix = gateway(libchan::unix::pair(&config).await?, &redis).await?;
    let listener = libchan::listen("tcp://127.0.0.1:0").await?;
    let url = listener.local_url();
    let (a, b) = tokio::join!(libchan::connect(&url), listener.accept());
    let via_tcp = gateway((a?, b?), &redis).await?;

    for (name, port) in [
        ("unix gateway (fd passed)", via_unix),
        ("tcp gateway (byte stream)", via_tcp),
    ] {
        let set = cli(port, &["SET", "greeting", name]).await?;
        let get = cli(port, &["GET", "greeting"]).await?;
        println!("{name}: SET -> {set}, GET -> {get}");
        if set != "OK" || get != name {
            return Err(format!("{name}: unexpected replies").into());
        }
    }
    println!("redis-benchmark, {requests} requests, 50 clients:");
    let proxy = plain_proxy(&redis).await?;
    for (name, port) in [
        ("direct", redis_port),
        ("plain proxy", proxy),
        ("unix gateway", via_unix),
        ("tcp gateway", via_tcp),
    ] {
        println!("  {name:>13}: {}", bench(port, requests).await?);
    }
    Ok(())
}
