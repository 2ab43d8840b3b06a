//! The libchan benchmark: every workload of `../shared/bench/WORKLOADS.md` on every
//! transport, for libchan and for a `raw` system (the same workload on bare sockets with
//! hand-written framing), printed as JSON Lines on stdout.
//!
//! ```text
//! cargo run --release -p libchan-bench -- [--quick] [--transport T]... [--workload W]... [--table]
//! ```
//!
//! `--quick` divides every count by 10 (CI smoke runs). `--table` also prints a
//! libchan / raw ratio table on stderr. Workloads that measure memory run in a fresh
//! child process (this binary with `--child`).

mod codecs;
mod lc;
mod raw;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

/// Transports benchmarked, in output order.
pub(crate) const TRANSPORTS: [&str; 6] = ["inmem", "unix", "tcp", "tls", "h2", "ws"];
/// Workloads, in output order.
pub(crate) const WORKLOADS: [&str; 6] = [
    "pingpong",
    "stream",
    "bulk",
    "rpc",
    "bytestream",
    "channels",
];

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Counts {
    pub(crate) pingpong: usize,
    pub(crate) warmup: usize,
    pub(crate) stream: u64,
    pub(crate) bulk: u64,
    pub(crate) rpc: u64,
    pub(crate) bytestream: u64,
    pub(crate) channels: u32,
}

impl Counts {
    fn new(quick: bool) -> Counts {
        let d = if quick { 10 } else { 1 };
        Counts {
            pingpong: 20_000 / d as usize,
            warmup: 1_000 / d as usize,
            stream: 1_000_000 / d,
            bulk: 1_024 / d,
            rpc: 20_000 / d,
            bytestream: (1 << 30) / d,
            channels: 10_000 / d as u32,
        }
    }
}

/// One result line.
pub(crate) fn emit(system: &str, transport: &str, workload: &str, metric: &str, value: f64) {
    let value = if value.is_finite() { value } else { 0.0 };
    let line = format!(
        "{{\"system\":\"{system}\",\"transport\":\"{transport}\",\"workload\":\"{workload}\",\"metric\":\"{metric}\",\"value\":{}}}",
        round(value)
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Emits the pingpong metrics from round-trip times (µs) measured over `secs`.
pub(crate) fn report_pingpong(system: &str, t: &str, mut rtts: Vec<f64>, secs: f64) {
    let n = rtts.len();
    rtts.sort_by(f64::total_cmp);
    emit(system, t, "pingpong", "rtt_p50_us", percentile(&rtts, 0.5));
    emit(system, t, "pingpong", "rtt_p99_us", percentile(&rtts, 0.99));
    emit(system, t, "pingpong", "rtt_per_s", n as f64 / secs);
}

/// Emits the rpc metrics of one round with `callers` callers: `n` requests in `secs`,
/// with the latencies (µs) of every request.
pub(crate) fn report_rpc(
    system: &str,
    t: &str,
    callers: u64,
    n: u64,
    secs: f64,
    mut lat: Vec<f64>,
) {
    if callers == 1 {
        emit(system, t, "rpc", "req_per_s_1", n as f64 / secs);
        lat.sort_by(f64::total_cmp);
        emit(system, t, "rpc", "rpc_p50_us", percentile(&lat, 0.5));
    } else {
        emit(system, t, "rpc", "req_per_s_64", n as f64 / secs);
    }
}

/// The bytestream workload's transfer: writes `total` bytes in 64 KiB writes into `w`,
/// shuts it down, waits for `reader` (which counts what arrived) and emits the rate since
/// `start`.
pub(crate) async fn transfer(
    system: &str,
    t: &str,
    start: std::time::Instant,
    mut w: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    reader: tokio::task::JoinHandle<Res<u64>>,
    total: u64,
) -> Res<()> {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < total {
        w.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    w.shutdown().await?;
    drop(w);
    let got = reader.await??;
    if got != sent {
        return Err(format!("read {got} of {sent} bytes").into());
    }
    emit(
        system,
        t,
        "bytestream",
        "mb_per_s",
        sent as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Reads `r` to its end; returns how many bytes came.
pub(crate) async fn count_to_end(mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>) -> Res<u64> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

/// Percentile of sorted samples.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Peak resident memory of this process, from `VmHWM` in `/proc/self/status`.
pub(crate) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    quick: bool,
    table: bool,
    child: bool,
    /// Measure the codecs instead of the workloads.
    codecs: bool,
    systems: Vec<String>,
    transports: Vec<String>,
    workloads: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        table: false,
        child: false,
        codecs: false,
        systems: Vec::new(),
        transports: Vec::new(),
        workloads: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--table" => a.table = true,
            "--child" => a.child = true,
            "--codecs" => a.codecs = true,
            "--system" => a.systems.push(it.next().ok_or("--system needs a value")?),
            "--transport" => a
                .transports
                .push(it.next().ok_or("--transport needs a value")?),
            "--workload" => a
                .workloads
                .push(it.next().ok_or("--workload needs a value")?),
            "-h" | "--help" => {
                return Err(
                    "usage: libchan-bench [--quick] [--table] [--transport T]... \
                            [--workload W]... [--system libchan|raw]... | [--quick] --codecs"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    for t in &a.transports {
        if !TRANSPORTS.contains(&t.as_str()) {
            return Err(format!("unknown transport {t:?}; known: {TRANSPORTS:?}"));
        }
    }
    for w in &a.workloads {
        if !WORKLOADS.contains(&w.as_str()) {
            return Err(format!("unknown workload {w:?}; known: {WORKLOADS:?}"));
        }
    }
    Ok(a)
}

fn selected<'a>(all: &[&'a str], chosen: &[String]) -> Vec<&'a str> {
    all.iter()
        .copied()
        .filter(|x| chosen.is_empty() || chosen.iter().any(|c| c == x))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("BENCH_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs one cell in this process.
fn run_cell(system: &str, transport: &str, workload: &str, counts: Counts) -> Res<()> {
    let rt = runtime();
    let (s, t, w) = (system.to_owned(), transport.to_owned(), workload.to_owned());
    rt.block_on(async move {
        tokio::spawn(async move {
            match s.as_str() {
                "libchan" => lc::run(&t, &w, counts).await,
                _ => raw::run(&t, &w, counts).await,
            }
        })
        .await?
    })
}

/// Runs one cell in a fresh child process, forwarding its lines (and keeping them for
/// the ratio table).
fn run_child(
    system: &str,
    transport: &str,
    workload: &str,
    quick: bool,
    lines: &mut Vec<String>,
) -> Res<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--child",
        "--system",
        system,
        "--transport",
        transport,
        "--workload",
        workload,
    ]);
    if quick {
        cmd.arg("--quick");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or("no child stdout")?;
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        lines.push(line);
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("{system}/{transport}/{workload} child failed: {status}").into());
    }
    Ok(())
}

/// Whether a (system, transport, workload) cell exists.
fn has_cell(system: &str, transport: &str, workload: &str) -> bool {
    if system != "raw" {
        return true;
    }
    // Raw figures exist for the socket transports only: tls, h2 and ws are compared with
    // raw tcp.
    match transport {
        "inmem" => !matches!(workload, "bytestream" | "rpc"),
        "tls" | "h2" | "ws" => false,
        _ => true,
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.codecs {
        codecs::run(args.quick);
        return;
    }
    let counts = Counts::new(args.quick);
    let systems = selected(&["libchan", "raw"], &args.systems);
    let transports = selected(&TRANSPORTS, &args.transports);
    let workloads = selected(&WORKLOADS, &args.workloads);
    if args.child {
        for s in &systems {
            for t in &transports {
                for w in &workloads {
                    if let Err(e) = run_cell(s, t, w, counts) {
                        eprintln!("{s}/{t}/{w}: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
        return;
    }
    let mut failed = false;
    let mut lines = Vec::new();
    for t in &transports {
        for w in &workloads {
            for s in &systems {
                if !has_cell(s, t, w) {
                    continue;
                }
                // Every cell runs in a fresh process: figures of one never depend on
                // what an earlier one left behind, and peak memory is the cell's own.
                if let Err(e) = run_child(s, t, w, args.quick, &mut lines) {
                    eprintln!("{e}");
                    failed = true;
                }
            }
        }
    }
    if args.table {
        eprint!("{}", ratio_table(&lines));
    }
    if failed {
        std::process::exit(1);
    }
}

/// The libchan / raw ratio of every metric, from JSON Lines.
fn ratio_table(lines: &[String]) -> String {
    let mut vals: BTreeMap<(String, String, String), BTreeMap<String, f64>> = BTreeMap::new();
    for line in lines {
        let field = |k: &str| -> Option<String> {
            let key = format!("\"{k}\":");
            let at = line.find(&key)? + key.len();
            let rest = &line[at..];
            let end = rest.find([',', '}'])?;
            Some(rest[..end].trim_matches('"').to_owned())
        };
        let (Some(s), Some(t), Some(w), Some(m), Some(v)) = (
            field("system"),
            field("transport"),
            field("workload"),
            field("metric"),
            field("value").and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        vals.entry((t, w, m)).or_default().insert(s, v);
    }
    let mut out =
        String::from("transport  workload    metric           libchan        raw   libchan/raw\n");
    for ((t, w, m), by) in &vals {
        let l = by.get("libchan").copied();
        let r = by.get("raw").copied();
        let ratio = match (l, r) {
            (Some(l), Some(r)) if r != 0.0 => format!("{:.2}", l / r),
            _ => "-".into(),
        };
        let f = |v: Option<f64>| {
            v.map_or("-".to_owned(), |v| {
                if v.abs() < 10.0 {
                    format!("{v:.3}")
                } else {
                    format!("{v:.1}")
                }
            })
        };
        out.push_str(&format!(
            "{t:<10} {w:<11} {m:<15} {:>10} {:>10} {ratio:>13}\n",
            f(l),
            f(r)
        ));
    }
    out
}
