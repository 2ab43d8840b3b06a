//! Drives a listener-side Mux (handshake and session layer, no IO) with peer bytes.

use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libchan_core::mux::{Mux, ReadTarget, Role};
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

/// Feeds `data[1..]` after `prefix`, at most `data[0]` bytes per read, where the state
/// machine asks for them (its read buffer, or straight into a large message body), then
/// takes whatever the session layer would take: accepted channels and their messages.
pub fn drive(prefix: &[u8], data: &[u8]) {
    let mut mux = Mux::new(Role::Listener, small_limits(), vec!["cbor".into()]);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = BytesMut::new();
    let mut fds = Vec::new();
    mux.poll_transmit(&mut out, &mut fds, 1 << 20);
    let mut input = BytesMut::new();
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut rest: Vec<u8> = prefix.to_vec();
    rest.extend_from_slice(data);
    let mut rest = &rest[..];
    while !rest.is_empty() {
        let failed = match mux.next_read(&mut input) {
            ReadTarget::Buffer(limit) => {
                let k = step.min(limit.unwrap_or(usize::MAX)).min(rest.len());
                input.extend_from_slice(&rest[..k]);
                rest = &rest[k..];
                mux.handle_input(&mut input, &mut Vec::new()).is_err()
            }
            ReadTarget::Body(mut body) => {
                let room = body.capacity() - body.len();
                assert!(room > 0, "a body to read into without room");
                let k = step.min(room).min(rest.len());
                body.extend_from_slice(&rest[..k]);
                rest = &rest[k..];
                mux.handle_body_input(body, &mut input, &mut Vec::new())
                    .is_err()
            }
        };
        if failed {
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
