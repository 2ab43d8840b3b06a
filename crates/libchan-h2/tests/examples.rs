//! `examples/embed.rs` runs as a test so it cannot rot: a hyper server with REST routes
//! that also serves libchan over HTTP/2 and WebSocket on one path, behind a token check.

#[tokio::test]
async fn embed() {
    let out = libchan_test_support::run_example("embed", &[]).await;
    assert!(out.contains("serving REST and libchan on http://"), "{out}");
    assert!(out.contains("http2: Some(\"hello http2"), "{out}");
    assert!(out.contains("websocket: Some(\"hello websocket"), "{out}");
    assert!(out.contains("without credentials:"), "{out}");
}
