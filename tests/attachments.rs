//! Untyped references (`Attachment`) in serde messages over a real unix socket: every
//! kind arrives, is typed afterwards and works; wrong kinds are decode errors; and
//! `claim_all` outside a receive is a misuse error.

use libchan::{channel, pipe, Attachment, AttachmentKind, ErrorKind, Fd, Receiver, Sender};
use libchan_test_support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Bag = (Sender<u32>, Receiver<u32>, libchan::ByteStream, Fd);
type Untyped = (Attachment, Attachment, Attachment, Attachment);

#[tokio::test]
async fn every_kind_arrives_untyped_and_is_typed_later() {
    let (a, b) = libchan::unix::pair(&libchan::config()).await.unwrap();
    let tx = a.open::<Bag>().await.unwrap();
    let mut rx = within("accept", b.accept::<Untyped>())
        .await
        .unwrap()
        .unwrap();

    let (s_tx, mut s_rx) = channel::<u32>(1);
    let (r_tx, r_rx) = channel::<u32>(1);
    let (mut near, far) = pipe();
    let (mut log_reader, log_writer) = std::io::pipe().unwrap();
    tx.send((s_tx, r_rx, far, Fd::new(log_writer)))
        .await
        .map_err(|e| e.error)
        .unwrap();

    let (s, r, bs, fd) = within("recv", rx.recv()).await.unwrap().unwrap();
    assert_eq!(
        [s.kind(), r.kind(), bs.kind(), fd.kind()],
        [
            AttachmentKind::Sender,
            AttachmentKind::Receiver,
            AttachmentKind::ByteStream,
            AttachmentKind::Fd
        ]
    );
    // Typing an attachment as another kind is a decode error.
    let err = bs.into_sender::<u32>().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(
        err.to_string().contains("ByteStream where a Sender"),
        "{err}"
    );

    let s = s.into_sender::<u32>().unwrap();
    s.send(5).await.map_err(|e| e.error).unwrap();
    assert_eq!(within("sent", s_rx.recv()).await.unwrap(), Some(5));

    let mut r = r.into_receiver::<u32>().unwrap();
    r_tx.send(6).await.map_err(|e| e.error).unwrap();
    assert_eq!(within("received", r.recv()).await.unwrap(), Some(6));

    let fd = fd.into_fd().unwrap();
    assert!(fd.is_descriptor(), "unix passes the descriptor itself");
    std::io::Write::write_all(
        &mut std::fs::File::from(fd.into_owned_fd().unwrap()),
        b"log",
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut log_reader, &mut text).unwrap();
    assert_eq!(text, "log");

    // The byte stream was dropped with the failed attempt: the peer sees its end.
    near.write_all(b"x").await.ok();
    let mut buf = Vec::new();
    within("stream end", near.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.is_empty());
}

#[tokio::test]
async fn own_ends_sent_back_as_attachments_are_the_originals() {
    let (a, b) = libchan::unix::pair(&libchan::config()).await.unwrap();
    // a sends its own ends to b; b reads them untyped, types them and sends them back;
    // a reads them untyped again and gets its originals.
    let typed = a.open::<(Sender<u32>, Receiver<u32>)>().await.unwrap();
    let mut at_b = within("accept", b.accept::<(Attachment, Attachment)>())
        .await
        .unwrap()
        .unwrap();
    let back = b.open::<(Sender<u32>, Receiver<u32>)>().await.unwrap();
    let mut at_a = within("accept", a.accept::<(Attachment, Attachment)>())
        .await
        .unwrap()
        .unwrap();

    let (s_tx, mut s_rx) = channel::<u32>(4);
    let (r_tx, r_rx) = channel::<u32>(4);
    typed.send((s_tx, r_rx)).await.map_err(|e| e.error).unwrap();
    r_tx.send(1).await.map_err(|e| e.error).unwrap();
    let (s, r) = within("recv", at_b.recv()).await.unwrap().unwrap();
    let s = s.into_sender::<u32>().unwrap();
    let r = r.into_receiver::<u32>().unwrap();
    back.send((s, r)).await.map_err(|e| e.error).unwrap();

    let (s, r) = within("recv back", at_a.recv()).await.unwrap().unwrap();
    let s = s.into_sender::<u32>().unwrap();
    s.send(7).await.map_err(|e| e.error).unwrap();
    assert_eq!(within("own sender", s_rx.recv()).await.unwrap(), Some(7));
    // The returned Receiver delivers what was queued before it came back, then more.
    let mut r = r.into_receiver::<u32>().unwrap();
    r_tx.send(2).await.map_err(|e| e.error).unwrap();
    assert_eq!(within("1", r.recv()).await.unwrap(), Some(1));
    assert_eq!(within("2", r.recv()).await.unwrap(), Some(2));
}

#[test]
fn claim_all_outside_a_receive_is_misuse() {
    let err = Attachment::claim_all().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}
