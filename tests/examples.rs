//! The examples run as tests so they cannot rot. `cargo test` builds them next to the test
//! binaries (target/<profile>/examples); each must finish successfully and print what it
//! promises.

use libchan_test_support::run_example as run;

/// Redis (`redis-server`, `redis-cli`, `redis-benchmark`; `.ci/run` installs them) behind
/// the gateway, over unix (descriptor passed) and tcp (byte stream).
#[tokio::test]
async fn gateway_in_front_of_redis() {
    let out = run("gateway", &["--requests", "500"]).await;
    assert!(
        out.contains("unix gateway (fd passed): SET -> OK, GET -> unix gateway (fd passed)"),
        "{out}"
    );
    assert!(
        out.contains("tcp gateway (byte stream): SET -> OK"),
        "{out}"
    );
    assert_eq!(out.matches("requests per second").count(), 8, "{out}");
}

#[tokio::test]
async fn demo() {
    let out = run("demo", &[]).await;
    for transport in ["mem", "unix", "tcp"] {
        assert!(out.contains(&format!("{transport}] codec=")), "{out}");
    }
}

/// Remote commands over tcp and mutual TLS: 8 at once, exit codes, stderr, a missing
/// program.
#[cfg(feature = "tls")]
#[tokio::test]
async fn rexec() {
    let out = run("rexec", &[]).await;
    for t in ["tcp", "tls"] {
        assert!(
            out.contains(&format!(
                "[{t}] 8 concurrent `wc -l` of 1000 lines: all 1000, exit 0"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "[{t}] sh: stdout \"out\", stderr \"err\", status Ok(3)"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("[{t}] missing program: Err(")),
            "{out}"
        );
    }
    assert!(
        out.contains("[tls] client certificate names Some(\"rexec-client\")"),
        "{out}"
    );
}

/// Three workers pull 30 jobs; every reply is right.
#[tokio::test]
async fn workers() {
    let out = run("workers", &[]).await;
    assert!(out.contains("30 jobs done, all sums right"), "{out}");
}

/// Events through a subscriber's Sender and through a server-made Receiver.
#[tokio::test]
async fn events() {
    let out = run("events", &[]).await;
    assert!(
        out.contains("via our Sender (subscribe): [0, 1, 2, 3, 4]"),
        "{out}"
    );
    assert!(
        out.contains("via the server's Receiver (watch): [0, 1, 2, 3, 4]"),
        "{out}"
    );
}
