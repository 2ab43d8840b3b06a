//! Test support for libchan: the conformance suite every transport runs, and a scripted
//! mock peer that speaks raw frames for bad-input tests. Not published.
//!
//! A transport's test file runs the whole suite with one macro call:
//!
//! ```text
//! libchan_test_support::conformance!(unix, || async {
//!     libchan_unix::pair(&config()).await.unwrap()
//! }, Caps { fds: true, loss: true });
//! ```

pub mod mock;
pub mod pki;
pub mod proxy;
pub mod suite;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use libchan_core::Session;

/// What a transport under test can do.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Descriptors arrive as real descriptors.
    pub fds: bool,
    /// The connection can be lost (not in memory).
    pub loss: bool,
}

/// Makes a fresh pair of connected sessions.
pub type PairFn =
    dyn Fn() -> Pin<Box<dyn Future<Output = (Session, Session)> + Send>> + Send + Sync;

/// The guard timeout for every wait in the suite: generous, never a measurement.
pub const GUARD: Duration = Duration::from_secs(60);

/// Awaits `f`, failing the test if it takes longer than [`GUARD`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {GUARD:?} waiting for {what}"),
    }
}

/// Waits until `cond` holds, re-checking each time the task is scheduled again (other
/// tasks run in between); fails the test after [`GUARD`]. For conditions that change as
/// background tasks finish, where there is no event to await.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Runs every conformance case against a transport: one `#[tokio::test]` per case.
#[macro_export]
macro_rules! conformance {
    ($name:ident, $pair:expr, $caps:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn pair_fn() -> std::sync::Arc<$crate::PairFn> {
                std::sync::Arc::new(move || Box::pin(($pair)()))
            }
            $crate::conformance!(@cases $caps;
                ordering_and_completeness, non_struct_values, both_sides_open_at_once,
                reply_senders, nested_receivers_deep, ends_sent_back_resolve_to_original,
                receiver_sent_back_resolves_to_original,
                sender_sent_back_with_messages_in_flight, undecoded_messages_release_their_ends,
                forwarding_through_proxy_session,
                byte_streams_both_ways_half_close, many_streams_in_one_message,
                end_of_stream_and_close_semantics, close_with_error_reaches_peer,
                decode_error_skips_one_message, large_messages_alongside_small,
                many_concurrent_channels_with_nested_refs, no_leaks_after_short_lived_nested,
                no_leaks_for_every_kind_of_end,
                loss_fails_pending_ops, fd_passing, accept_wrong_type_is_decode_error,
                session_close_is_graceful, channels_opened_before_close_are_still_accepted,
                unaccepted_channels_end_with_the_session,
                backpressure_bounds_memory, delivery_confirmation,
                blobs);
        }
    };
    (@cases $caps:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let case = $crate::suite::$case(pair_fn(), $caps);
                match tokio::time::timeout(2 * $crate::GUARD, case).await {
                    Ok(()) => {}
                    Err(_) => panic!("case {} timed out", stringify!($case)),
                }
            }
        )*
    };
}

/// A pair of sessions over a fresh loopback tcp connection, both with `config`: for
/// running the suite with a codec other than the default.
pub async fn tcp_pair(config: libchan_core::Config) -> (Session, Session) {
    let l = libchan_tcp::TcpListener::bind("127.0.0.1:0", config.clone())
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(libchan_tcp::connect(addr, &config), l.accept());
    (a.expect("connect"), b.expect("accept"))
}

/// Decodes `bytes` as a `T` through `codec`, as a session would.
pub fn decode<T: serde::de::DeserializeOwned>(
    codec: &dyn libchan_core::Codec,
    bytes: &[u8],
) -> Result<T, libchan_core::Error> {
    let mut out = None;
    codec.decode(bytes, &mut |d| {
        out = Some(libchan_core::erased_serde::deserialize::<T>(d)?);
        Ok(())
    })?;
    out.ok_or_else(|| libchan_core::Error::new(libchan_core::ErrorKind::Decode, "no value"))
}

/// Keeps `value` (a listener, a proxy process) alive until the test's runtime shuts down,
/// for pair functions whose sessions outlive the function.
pub fn keep_until_shutdown<T: Send + 'static>(value: T) {
    tokio::spawn(async move {
        let _keep = value;
        std::future::pending::<()>().await
    });
}

/// The newest build of example `name` of the package whose test is running: what `cargo
/// test` built next to the test binaries (`target/<profile>/examples/<name>-<hash>`), with
/// the same features.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples");
    let prefix = format!("{name}-");
    std::fs::read_dir(&dir)
        .expect("examples dir")
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && !n.contains('.')
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| dir.join(name))
}

/// Runs example `name` with `args` to completion (within [`GUARD`]); panics unless it
/// succeeds; returns its standard output.
pub async fn run_example(name: &str, args: &[&str]) -> String {
    let out = within(
        name,
        tokio::process::Command::new(example_binary(name))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|e| panic!("run example {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Resident memory of this process (VmRSS from /proc), for tests that bound memory.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}
