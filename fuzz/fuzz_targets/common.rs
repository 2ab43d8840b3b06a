//! Drives a listener-side Mux (handshake and session layer, no IO) with peer bytes.

use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libchan_core::mux::{Mux, Role};
use libchan_core::Limits;

pub fn small_limits() -> Limits {
    let mut l = Limits::default();
    l.max_frame_size = 16 * 1024;
    l.max_message_size = 64 * 1024;
    l.initial_window = 32 * 1024;
    l.max_streams = 64;
    l.max_pending_accepts = 16;
    l.max_session_buffer = 1024 * 1024;
    l
}

/// Feeds `data[1..]` after `prefix`, in chunks of `data[0]` bytes, then takes whatever the
/// session layer would take: accepted channels and their messages.
pub fn drive(prefix: &[u8], data: &[u8]) {
    let mut mux = Mux::new(Role::Listener, small_limits(), vec!["cbor".into()]);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = BytesMut::new();
    let mut fds = Vec::new();
    mux.poll_transmit(&mut out, &mut fds, 1 << 20);
    let mut input = BytesMut::from(prefix);
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    for chunk in data.chunks(usize::from(step).max(1)) {
        input.extend_from_slice(chunk);
        if mux.handle_input(&mut input, &mut Vec::new()).is_err() {
            break;
        }
        out.clear();
        mux.poll_transmit(&mut out, &mut fds, 1 << 20);
        let _ = mux.poll_handshake(&mut cx);
        while let Poll::Ready(Ok(Some(id))) = mux.poll_accept(&mut cx) {
            for _ in 0..4 {
                match mux.poll_recv(&mut cx, id) {
                    Poll::Ready(Ok(Some(msg))) => mux.release_refs(&msg.refs),
                    _ => break,
                }
            }
            mux.release(id);
        }
    }
    mux.handle_eof();
    out.clear();
    mux.poll_transmit(&mut out, &mut fds, 1 << 20);
}
