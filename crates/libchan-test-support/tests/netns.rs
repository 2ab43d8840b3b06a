//! A connection cut without a FIN or RST: the peer process runs in a network namespace
//! this test creates, linked to ours by a veth pair; taking our end of the link down drops
//! every packet silently, as a cable pulled or a firewall dropping would. Keepalive must
//! notice within its interval and fail every pending operation with an error that says so.
//!
//! Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), so the test is
//! ignored in a plain `cargo test`; `.ci/run` runs it with `--ignored` as root.

use std::process::{Command, Stdio};
use std::time::Duration;

use libchan_core::{Config, ErrorKind};
use libchan_test_support::within;
use tokio::io::{AsyncBufReadExt, BufReader};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (iproute2 is needed)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace and a veth pair, removed on drop.
struct Netns {
    name: String,
    ours: String,
}

impl Netns {
    fn new(subnet: u8) -> (Netns, String, String) {
        let id = std::process::id() % 100_000;
        let n = Netns {
            name: format!("libchan-{id}"),
            ours: format!("lcA{id}"),
        };
        let theirs = format!("lcB{id}");
        let (our_ip, their_ip) = (format!("10.213.{subnet}.1"), format!("10.213.{subnet}.2"));
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &n.ours, "type", "veth", "peer", "name", &theirs,
        ]);
        ip(&["link", "set", &theirs, "netns", &n.name]);
        ip(&["addr", "add", &format!("{our_ip}/30"), "dev", &n.ours]);
        ip(&["link", "set", &n.ours, "up"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &n.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["addr", "add", &format!("{their_ip}/30"), "dev", &theirs]);
        exec(&["link", "set", &theirs, "up"]);
        exec(&["link", "set", "lo", "up"]);
        (n, our_ip, their_ip)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.ours])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to create a network namespace; .ci/run runs it with --ignored"]
async fn a_connection_cut_without_fin_is_detected_by_keepalive() {
    let (ns, our_ip, _their_ip) = Netns::new(77);
    let config = Config::new(libchan_codec_cbor::Cbor).keepalive(Duration::from_millis(500));
    let listener = libchan_tcp::TcpListener::bind(format!("{our_ip}:0"), config)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_stream-peer")])
        .args(["tcp", &addr, "sink"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn stream-peer in the namespace");
    let session = within("connect", listener.accept()).await.expect("accept");
    let tx = session.open::<Vec<u8>>().await.expect("open");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    within("peer accepted", out.read_line(&mut line))
        .await
        .expect("read");
    assert_eq!(line.trim(), "accepted");
    tx.send(vec![1; 1024])
        .await
        .map_err(|e| e.error)
        .expect("send");
    tx.flush().await.expect("flushed");

    // Pull the cable: no FIN, no RST, nothing arrives any more.
    ip(&["link", "set", &ns.ours, "down"]);
    let accepting = session.accept::<u32>();
    let e = within("keepalive", accepting)
        .await
        .expect_err("the connection is gone");
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(e.message().contains("keepalive"), "{e}");
    // Every other pending or later operation says the same.
    let e = tx.send(vec![2; 16]).await.expect_err("lost").error;
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    let _ = child.kill().await;
    drop(ns);
}
