//! Properties of the public API: thread-safety of every public type, and clear errors
//! when an end is serialized outside a libchan send.

use libchan_core::{
    channel, pipe, ByteStream, Config, Error, Fd, Receiver, SendError, Sender, Session,
    TrySendError,
};

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}
fn unpin<T: Unpin>() {}

#[test]
fn public_types_are_send_sync_unpin() {
    send_sync::<Session>();
    send_sync::<Sender<u32>>();
    send_sync::<Receiver<u32>>();
    send_sync::<ByteStream>();
    send_sync::<Fd>();
    send_sync::<Error>();
    send_sync::<Config>();
    send::<SendError<u32>>();
    send::<TrySendError<u32>>();
    unpin::<Sender<u32>>();
    unpin::<Receiver<u32>>();
    unpin::<ByteStream>();
}

#[tokio::test]
async fn serializing_an_end_outside_a_send_is_an_error_not_a_panic() {
    let (tx, rx) = channel::<u32>(1);
    let (a, _b) = pipe();
    let fd = Fd::new(std::fs::File::open("/dev/null").expect("open"));
    let mut out = Vec::new();
    for (what, r) in [
        ("Sender", ciborium::ser::into_writer(&tx, &mut out)),
        ("Receiver", ciborium::ser::into_writer(&rx, &mut out)),
        ("ByteStream", ciborium::ser::into_writer(&a, &mut out)),
        ("Fd", ciborium::ser::into_writer(&fd, &mut out)),
    ] {
        let e = r.expect_err(what).to_string();
        assert!(
            e.contains("can only be serialized by a libchan send"),
            "{what}: {e}"
        );
    }
    // Deserializing one outside a receive is an error too.
    let bytes = [0xda, 0x4c, 0x43, 0x48, 0x4e, 0x00];
    let e = ciborium::de::from_reader::<Sender<u32>, _>(&bytes[..])
        .expect_err("outside")
        .to_string();
    assert!(e.contains("libchan"), "{e}");
    // The ends still work afterwards.
    tx.send(1).await.expect("send");
}
