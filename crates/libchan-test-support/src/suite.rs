//! The conformance cases. Each takes a factory of connected session pairs and the
//! transport's capabilities, and panics on failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use libchan_core::{channel, pipe, ByteStream, ErrorKind, Fd, Receiver, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{within, Caps, PairFn};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Msg {
    seq: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

fn msg(seq: u64, len: usize) -> Msg {
    Msg {
        seq,
        payload: (0..len).map(|i| (seq as usize + i) as u8).collect(),
    }
}

async fn send<T: libchan_core::Message>(tx: &Sender<T>, v: T) {
    if let Err(e) = tx.send(v).await {
        panic!("send failed: {}", e.error);
    }
}

async fn recv<T: libchan_core::Message>(rx: &mut Receiver<T>) -> T {
    match within("recv", rx.recv()).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("unexpected end of stream"),
        Err(e) => panic!("recv failed: {e}"),
    }
}

async fn open_pair<T: libchan_core::Message>(a: &Session, b: &Session) -> (Sender<T>, Receiver<T>) {
    let tx = a.open::<T>().await.expect("open");
    let rx = within("accept", b.accept::<T>())
        .await
        .expect("accept")
        .expect("a channel");
    (tx, rx)
}

#[derive(Serialize, Deserialize)]
struct WithBlobs {
    seq: u64,
    big: libchan_core::Blob,
    small: libchan_core::Blob,
    mid: libchan_core::Blob,
    nested: Vec<libchan_core::Blob>,
    reply: Sender<libchan_core::Blob>,
}

/// The same message with `Vec<u8>` byte strings: a peer may use either type.
#[derive(Serialize, Deserialize)]
struct WithVecs {
    seq: u64,
    #[serde(with = "serde_bytes")]
    big: Vec<u8>,
    #[serde(with = "serde_bytes")]
    small: Vec<u8>,
    #[serde(with = "serde_bytes")]
    mid: Vec<u8>,
    nested: Vec<serde_bytes::ByteBuf>,
    reply: Sender<libchan_core::Blob>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

/// Blobs (sent by reference where the codec allows) arrive intact, interleaved with a
/// channel reference, in messages spanning many frames; a `Blob` and a `serde_bytes`
/// `Vec<u8>` are the same on the wire in both directions.
pub async fn blobs(pair: Arc<PairFn>, caps: Caps) {
    use libchan_core::Blob;
    let (a, b) = pair().await;
    let sizes = [(1 << 20) + 3, 5000, 4096, 40_000, 0, 70_000];
    // Blob -> Blob.
    let (tx, mut rx) = open_pair::<WithBlobs>(&a, &b).await;
    for (seq, &len) in sizes.iter().enumerate() {
        let seq = seq as u64;
        let big = Blob::from(pattern(seq, len));
        let (reply, mut answer) = channel(1);
        let m = WithBlobs {
            seq,
            big: big.clone(),
            small: Blob::from_static(b"tiny"),
            mid: Blob::from(pattern(seq + 100, 4096)),
            // The same blob twice in one message, then another.
            nested: vec![big.clone(), big.clone(), Blob::from(pattern(seq + 7, 9000))],
            reply,
        };
        send(&tx, m).await;
        let got = recv(&mut rx).await;
        assert_eq!(got.seq, seq);
        assert_eq!(got.big, big, "big blob of {len} bytes");
        assert_eq!(&got.small[..], b"tiny");
        assert_eq!(&got.mid[..], &pattern(seq + 100, 4096)[..]);
        assert_eq!(got.nested.len(), 3);
        assert_eq!(got.nested[0], big);
        assert_eq!(got.nested[1], big);
        assert_eq!(&got.nested[2][..], &pattern(seq + 7, 9000)[..]);
        // The reference after the blobs still names the right stream.
        send(&got.reply, got.big.clone()).await;
        assert_eq!(recv(&mut answer).await, big);
    }
    drop(tx);
    if !caps.loss {
        // In memory, values are not encoded: a channel has one type.
        return;
    }
    // Blob -> Vec<u8>: the receiving side decodes the same channel as `WithVecs`.
    let tx = a.open::<WithBlobs>().await.expect("open");
    let mut rx = within("accept", b.accept::<WithVecs>())
        .await
        .expect("accept")
        .expect("a channel");
    let big = Blob::from(pattern(1, 300_000));
    let (reply, mut answer) = channel(1);
    send(
        &tx,
        WithBlobs {
            seq: 1,
            big: big.clone(),
            small: Blob::new(),
            mid: Blob::from(pattern(2, 8192)),
            nested: vec![big.clone()],
            reply,
        },
    )
    .await;
    let got = recv(&mut rx).await;
    assert_eq!(got.big, &big[..]);
    assert!(got.small.is_empty());
    assert_eq!(got.mid, pattern(2, 8192));
    assert_eq!(&got.nested[0][..], &big[..]);
    send(&got.reply, Blob::from_static(b"ok")).await;
    assert_eq!(&recv(&mut answer).await[..], b"ok");
    // Vec<u8> -> Blob.
    let tx = b.open::<WithVecs>().await.expect("open");
    let mut rx = within("accept", a.accept::<WithBlobs>())
        .await
        .expect("accept")
        .expect("a channel");
    let (reply, _answer) = channel(1);
    send(
        &tx,
        WithVecs {
            seq: 2,
            big: pattern(3, 200_000),
            small: vec![1, 2, 3],
            mid: pattern(4, 50_000),
            nested: vec![serde_bytes::ByteBuf::from(pattern(5, 10))],
            reply,
        },
    )
    .await;
    let got = recv(&mut rx).await;
    assert_eq!(&got.big[..], &pattern(3, 200_000)[..]);
    assert_eq!(&got.small[..], &[1, 2, 3]);
    assert_eq!(&got.mid[..], &pattern(4, 50_000)[..]);
    assert_eq!(&got.nested[0][..], &pattern(5, 10)[..]);
}

/// Thousands of messages arrive complete and in order.
pub async fn ordering_and_completeness(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Msg>(&a, &b).await;
    let n = 10_000u64;
    let producer = tokio::spawn(async move {
        for i in 0..n {
            send(&tx, msg(i, 64)).await;
        }
    });
    for i in 0..n {
        let m = recv(&mut rx).await;
        assert_eq!(m, msg(i, 64), "message {i}");
    }
    producer.await.expect("producer");
    assert_eq!(within("end", rx.recv()).await.expect("clean end"), None);
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Shape {
    Unit,
    Tuple(i32, String),
    Struct { x: f64, tags: Vec<String> },
}

/// Values that are not structs: integers, strings, options, enums, maps, tuples, unit.
pub async fn non_struct_values(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (t1, mut r1) = open_pair::<u8>(&a, &b).await;
    let (t2, mut r2) = open_pair::<String>(&a, &b).await;
    let (t3, mut r3) = open_pair::<Option<Vec<i64>>>(&a, &b).await;
    let (t4, mut r4) = open_pair::<Shape>(&a, &b).await;
    let (t5, mut r5) = open_pair::<BTreeMap<String, (bool, ())>>(&a, &b).await;
    let (t6, mut r6) = open_pair::<()>(&a, &b).await;
    send(&t1, 255).await;
    send(&t2, "héllo".to_owned()).await;
    send(&t3, None).await;
    send(&t3, Some(vec![-1, i64::MAX])).await;
    for s in [
        Shape::Unit,
        Shape::Tuple(-7, "t".into()),
        Shape::Struct {
            x: 1.5,
            tags: vec!["a".into()],
        },
    ] {
        send(&t4, s).await;
    }
    let map: BTreeMap<String, (bool, ())> = [("k".to_owned(), (true, ()))].into();
    send(&t5, map.clone()).await;
    send(&t6, ()).await;
    assert_eq!(recv(&mut r1).await, 255);
    assert_eq!(recv(&mut r2).await, "héllo");
    assert_eq!(recv(&mut r3).await, None);
    assert_eq!(recv(&mut r3).await, Some(vec![-1, i64::MAX]));
    assert_eq!(recv(&mut r4).await, Shape::Unit);
    assert_eq!(recv(&mut r4).await, Shape::Tuple(-7, "t".into()));
    assert!(matches!(recv(&mut r4).await, Shape::Struct { x, .. } if x == 1.5));
    assert_eq!(recv(&mut r5).await, map);
    recv(&mut r6).await;
}

/// Both sides open channels at the same time; every channel reaches the right side.
pub async fn both_sides_open_at_once(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let k = 50u64;
    let side = |me: Session, tag: u64| async move {
        let mut txs = Vec::new();
        for i in 0..k {
            let tx = me.open::<u64>().await.expect("open");
            send(&tx, tag * 1000 + i).await;
            txs.push(tx);
        }
        let mut got = Vec::new();
        for _ in 0..k {
            let mut rx = within("accept", me.accept::<u64>())
                .await
                .expect("accept")
                .expect("channel");
            got.push(recv(&mut rx).await);
        }
        got.sort();
        (txs, got)
    };
    let (ra, rb) = tokio::join!(side(a.clone(), 1), side(b.clone(), 2));
    assert_eq!(ra.1, (0..k).map(|i| 2000 + i).collect::<Vec<_>>());
    assert_eq!(rb.1, (0..k).map(|i| 1000 + i).collect::<Vec<_>>());
}

#[derive(Serialize, Deserialize)]
struct Request {
    n: u64,
    reply: Sender<u64>,
}

/// Requests carry a fresh reply Sender each; answers come back on it.
pub async fn reply_senders(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Request>(&a, &b).await;
    let server = tokio::spawn(async move {
        while let Some(req) = rx.recv().await.expect("recv") {
            let _ = req.reply.send(req.n + 1).await;
        }
    });
    for n in 0..300 {
        let (reply, mut answer) = channel(1);
        send(&tx, Request { n, reply }).await;
        assert_eq!(recv(&mut answer).await, n + 1);
        // The reply channel ends when the server drops its end.
        assert_eq!(within("reply end", answer.recv()).await.expect("end"), None);
    }
    drop(tx);
    within("server", server).await.expect("server");
}

#[derive(Serialize, Deserialize)]
struct Level3 {
    events: Receiver<u32>,
}

/// Receivers nested several levels deep, sent both ways.
pub async fn nested_receivers_deep(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Receiver<Receiver<Level3>>>(&a, &b).await;
    let (t1, r1) = channel::<Receiver<Level3>>(4);
    let (t2, r2) = channel::<Level3>(4);
    let (t3, r3) = channel::<u32>(16);
    send(&tx, r1).await;
    send(&t1, r2).await;
    send(&t2, Level3 { events: r3 }).await;
    for i in 0..10 {
        send(&t3, i).await;
    }
    drop(t3);
    let mut got1 = recv(&mut rx).await;
    let mut got2 = recv(&mut got1).await;
    let mut got3 = recv(&mut got2).await;
    for i in 0..10 {
        assert_eq!(recv(&mut got3.events).await, i);
    }
    assert_eq!(within("end", got3.events.recv()).await.expect("end"), None);

    // And back the other way: b sends a Receiver of its own to a.
    let (back_tx, mut back_rx) = open_pair::<Level3>(&b, &a).await;
    let (t4, r4) = channel::<u32>(4);
    send(&back_tx, Level3 { events: r4 }).await;
    send(&t4, 99).await;
    let mut l = recv(&mut back_rx).await;
    assert_eq!(recv(&mut l.events).await, 99);
}

/// A Sender sent to the peer and sent back resolves to the original channel.
pub async fn ends_sent_back_resolve_to_original(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (to_b, mut at_b) = open_pair::<Sender<String>>(&a, &b).await;
    let (to_a, mut at_a) = open_pair::<Sender<String>>(&b, &a).await;
    let (orig, mut orig_rx) = channel::<String>(8);
    send(&to_b, orig.clone()).await;
    let proxy = recv(&mut at_b).await;
    send(&proxy, "via b".to_owned()).await;
    send(&to_a, proxy).await;
    let back = recv(&mut at_a).await;
    assert!(
        back.same_channel(&orig),
        "a Sender sent back must resolve to the original"
    );
    send(&back, "local".to_owned()).await;
    // Order holds per sending handle; these came through two different handles.
    let mut got = [recv(&mut orig_rx).await, recv(&mut orig_rx).await];
    got.sort();
    assert_eq!(got, ["local".to_owned(), "via b".to_owned()]);
}

/// A Receiver sent to the peer and sent back becomes the original receiver again: nothing
/// is lost or reordered, and once what was in flight is drained no forwarding is left.
pub async fn receiver_sent_back_resolves_to_original(pair: Arc<PairFn>, caps: Caps) {
    let (a, b) = pair().await;
    let (to_b, mut at_b) = open_pair::<Receiver<u32>>(&a, &b).await;
    let (to_a, mut at_a) = open_pair::<Receiver<u32>>(&b, &a).await;
    let (tx, rx) = channel::<u32>(64);
    for i in 0..10 {
        send(&tx, i).await;
    }
    send(&to_b, rx).await;
    let mut at_peer = recv(&mut at_b).await;
    // The peer takes a few, then sends the receiver back while more are in flight.
    for i in 0..3 {
        assert_eq!(recv(&mut at_peer).await, i);
    }
    for i in 10..20 {
        send(&tx, i).await;
    }
    send(&to_a, at_peer).await;
    let mut back = recv(&mut at_a).await;
    for i in 20..30 {
        send(&tx, i).await;
    }
    for i in 3..30 {
        assert_eq!(recv(&mut back).await, i, "in order, nothing lost");
    }
    if caps.loss {
        // Drained: the forwarding tasks on both sides are gone.
        crate::wait_until("forwarders to end", || {
            let (sa, sb) = (a.stats(), b.stats());
            sa.tasks == 0 && sb.tasks == 0 && sb.exported == 0
        })
        .await;
    }
    send(&tx, 30).await;
    assert_eq!(recv(&mut back).await, 30);
    drop(tx);
    assert_eq!(within("eos", back.recv()).await.expect("eos"), None);
}

/// Sent back while the peer's proxy is dropped at once: no lost reference, no hang.
pub async fn sender_sent_back_with_messages_in_flight(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (to_b, mut at_b) = open_pair::<Sender<u32>>(&a, &b).await;
    let (to_a, mut at_a) = open_pair::<(u32, Sender<u32>)>(&b, &a).await;
    let bounce = tokio::spawn(async move {
        let mut i = 0;
        while let Some(s) = at_b.recv().await.expect("recv at b") {
            send(&s, i).await;
            send(&to_a, (i, s)).await;
            i += 1;
        }
    });
    for i in 0..200u32 {
        let (orig, mut orig_rx) = channel::<u32>(4);
        send(&to_b, orig.clone()).await;
        let (j, back) = recv(&mut at_a).await;
        assert_eq!(i, j);
        assert!(back.same_channel(&orig), "round {i}");
        assert_eq!(recv(&mut orig_rx).await, i);
    }
    drop(to_b);
    within("bounce", bounce).await.expect("bounce");
    // Every round's stream and its export are gone once both sides dropped their ends.
    crate::wait_until("exports to be released", || {
        a.stats().exported == 0 && a.stats().connection.streams <= 2
    })
    .await;
}

/// A receiver dropped with messages that arrived and were never decoded: the ends those
/// messages carry are released, both the peer's new channels and our own Senders sent
/// back (which otherwise keep our channel from ending: it waits for such a message to be
/// decoded, so that the Sender in it resolves to the original).
pub async fn undecoded_messages_release_their_ends(pair: Arc<PairFn>, caps: Caps) {
    const N: usize = 8;
    let (a, b) = pair().await;
    let (to_b, mut at_b) = open_pair::<Sender<u32>>(&a, &b).await;
    let (to_a, mut at_a) = open_pair::<(u32, Sender<u32>, Sender<u32>)>(&b, &a).await;
    let (orig, mut orig_rx) = channel::<u32>(4);
    send(&to_b, orig.clone()).await;
    let proxy = recv(&mut at_b).await;
    let base = a.stats().connection.streams;
    let mut replies = Vec::new();
    for i in 0..N as u32 {
        let (tx, rx) = channel::<u32>(1);
        replies.push(rx);
        send(&to_a, (i, tx, proxy.clone())).await;
    }
    // Over a connection each message opens a channel at `a` before it arrives: once all
    // are open, the messages are queued there too (on an ordered connection) when the
    // receiver goes. (In memory there is no connection to count.)
    if caps.loss {
        crate::wait_until("the messages to arrive", || {
            a.stats().connection.streams >= base + N
        })
        .await;
    }
    let (first, _, back) = recv(&mut at_a).await;
    assert_eq!(first, 0);
    assert!(back.same_channel(&orig));
    drop((back, at_a, proxy, orig));
    for mut rx in replies {
        // Ok(None) for the one decoded and dropped, an error for the others: no hang.
        let _ = within("a reply channel to end", rx.recv()).await;
    }
    assert_eq!(
        within("our own channel to end", orig_rx.recv())
            .await
            .expect("clean end"),
        None
    );
}

/// Ends forwarded through a middle session reach the far side and work both ways.
pub async fn forwarding_through_proxy_session(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b1) = pair().await;
    let (b2, c) = pair().await;
    // a -> b: Requests; b forwards each request unchanged to c; c answers on the reply.
    let (a_tx, mut b_rx) = open_pair::<Request>(&a, &b1).await;
    let (b_tx, mut c_rx) = open_pair::<Request>(&b2, &c).await;
    let proxy = tokio::spawn(async move {
        while let Some(req) = b_rx.recv().await.expect("proxy recv") {
            send(&b_tx, req).await;
        }
    });
    let server = tokio::spawn(async move {
        while let Some(req) = c_rx.recv().await.expect("server recv") {
            let _ = req.reply.send(req.n * 10).await;
        }
    });
    for n in 0..100 {
        let (reply, mut answer) = channel(1);
        send(&a_tx, Request { n, reply }).await;
        assert_eq!(recv(&mut answer).await, n * 10);
    }
    // A byte stream through the proxy too.
    let (s_tx, mut s_rx) = open_pair::<ByteStream>(&a, &b1).await;
    let (s2_tx, mut s2_rx) = open_pair::<ByteStream>(&b2, &c).await;
    let (mut mine, theirs) = pipe();
    send(&s_tx, theirs).await;
    let mid = recv(&mut s_rx).await;
    send(&s2_tx, mid).await;
    let mut far = recv(&mut s2_rx).await;
    mine.write_all(b"through the proxy").await.expect("write");
    mine.shutdown().await.expect("shutdown");
    let mut got = String::new();
    within("read", far.read_to_string(&mut got))
        .await
        .expect("read");
    assert_eq!(got, "through the proxy");
    far.write_all(b"and back").await.expect("write back");
    far.shutdown().await.expect("shutdown back");
    let mut back = String::new();
    within("read back", mine.read_to_string(&mut back))
        .await
        .expect("read back");
    assert_eq!(back, "and back");
    drop(a_tx);
    within("proxy", proxy).await.expect("proxy");
    within("server", server).await.expect("server");
}

/// Byte streams carry data both ways; shutdown ends one direction only.
pub async fn byte_streams_both_ways_half_close(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<ByteStream>(&a, &b).await;
    let (mut mine, theirs) = pipe();
    send(&tx, theirs).await;
    let mut remote = recv(&mut rx).await;
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let big2 = big.clone();
    let writer = tokio::spawn(async move {
        mine.write_all(&big2).await.expect("write");
        mine.shutdown().await.expect("shutdown");
        // The other direction still works after our shutdown.
        let mut reply = Vec::new();
        mine.read_to_end(&mut reply).await.expect("read reply");
        reply
    });
    let mut got = Vec::new();
    within("read", remote.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(got.len(), big.len());
    assert!(got == big, "contents differ");
    remote
        .write_all(b"reply after peer's shutdown")
        .await
        .expect("write reply");
    remote.shutdown().await.expect("shutdown reply");
    let reply = within("writer", writer).await.expect("writer");
    assert_eq!(reply, b"reply after peer's shutdown");

    // A stream opened by the other side, sent the other way.
    let (tx2, mut rx2) = open_pair::<ByteStream>(&b, &a).await;
    let (mut mine2, theirs2) = pipe();
    send(&tx2, theirs2).await;
    let mut r2 = recv(&mut rx2).await;
    r2.write_all(b"x").await.expect("write");
    r2.shutdown().await.expect("shutdown");
    let mut s = Vec::new();
    within("read", mine2.read_to_end(&mut s))
        .await
        .expect("read");
    assert_eq!(s, b"x");
}

/// One message carries many streams and channels.
pub async fn many_streams_in_one_message(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<(Vec<ByteStream>, Vec<Sender<u32>>)>(&a, &b).await;
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..20 {
        let (m, t) = pipe();
        mine.push(m);
        theirs.push(t);
    }
    let mut rxs = Vec::new();
    let mut txs = Vec::new();
    for _ in 0..20 {
        let (t, r) = channel(2);
        txs.push(t);
        rxs.push(r);
    }
    send(&tx, (theirs, txs)).await;
    let (streams, senders) = recv(&mut rx).await;
    assert_eq!(streams.len(), 20);
    for (i, (mut s, t)) in streams.into_iter().zip(senders).enumerate() {
        s.write_all(format!("stream {i}").as_bytes())
            .await
            .expect("write");
        s.shutdown().await.expect("shutdown");
        send(&t, i as u32).await;
    }
    for (i, (mut m, mut r)) in mine.into_iter().zip(rxs).enumerate() {
        let mut got = String::new();
        within("read", m.read_to_string(&mut got))
            .await
            .expect("read");
        assert_eq!(got, format!("stream {i}"));
        assert_eq!(recv(&mut r).await, i as u32);
    }
}

/// End of stream repeats; send after close fails as misuse; double close is a no-op.
pub async fn end_of_stream_and_close_semantics(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<u32>(&a, &b).await;
    let tx2 = tx.clone();
    send(&tx, 1).await;
    tx.close().await;
    tx.close().await;
    let e = tx2.send(2).await.expect_err("send after close");
    assert_eq!(e.error.kind(), ErrorKind::Closed, "{}", e.error);
    assert_eq!(e.into_inner(), 2, "the message is handed back");
    assert_eq!(recv(&mut rx).await, 1);
    for _ in 0..3 {
        assert_eq!(within("eos", rx.recv()).await.expect("eos"), None);
    }
    // Dropping the receiver makes the sender fail.
    let (tx, rx) = open_pair::<u32>(&a, &b).await;
    drop(rx);
    within("closed", tx.closed()).await;
    let e = tx.send(3).await.expect_err("receiver gone");
    assert!(!e.error.is_connection_lost(), "{}", e.error);
    // The session still works.
    let (tx, mut rx) = open_pair::<u32>(&a, &b).await;
    send(&tx, 4).await;
    assert_eq!(recv(&mut rx).await, 4);
}

/// close_with_error carries the peer's message, after the messages sent before it.
pub async fn close_with_error_reaches_peer(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<u32>(&a, &b).await;
    send(&tx, 7).await;
    tx.close_with_error("disk full").await;
    assert_eq!(recv(&mut rx).await, 7);
    let e = within("error", rx.recv()).await.expect_err("peer error");
    assert!(e.is_remote(), "{e}");
    assert_eq!(e.message(), "disk full");
    assert_eq!(
        within("eos", rx.recv()).await.expect("eos after error"),
        None
    );
}

/// A message that does not decode as the expected type fails alone; the next one arrives.
pub async fn decode_error_skips_one_message(pair: Arc<PairFn>, caps: Caps) {
    if !caps.loss {
        return; // In memory, types are checked by the compiler: nothing to decode.
    }
    let (a, b) = pair().await;
    let tx = a.open::<Shape>().await.expect("open");
    let mut rx = within("accept", b.accept::<u64>())
        .await
        .expect("accept")
        .expect("channel");
    send(&tx, Shape::Unit).await;
    let e = within("decode", rx.recv()).await.expect_err("decode error");
    assert!(e.is_decode(), "{e}");
    drop(tx);
    assert_eq!(within("eos", rx.recv()).await.expect("eos"), None);
}

/// A 64 MiB message does not stall small messages on other channels: they all arrive
/// before it does.
pub async fn large_messages_alongside_small(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (big_tx, mut big_rx) = open_pair::<Msg>(&a, &b).await;
    let (small_tx, mut small_rx) = open_pair::<Msg>(&a, &b).await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let big = tokio::spawn(async move {
        send(&big_tx, msg(7, 64 * 1024 * 1024)).await;
    });
    let small = tokio::spawn(async move {
        for i in 0..2000 {
            send(&small_tx, msg(i, 32)).await;
        }
    });
    let o = order.clone();
    let big_reader = tokio::spawn(async move {
        let m = recv(&mut big_rx).await;
        o.lock().expect("lock").push("big");
        m
    });
    for i in 0..2000 {
        assert_eq!(recv(&mut small_rx).await.seq, i);
    }
    order.lock().expect("lock").push("small");
    let m = within("big", big_reader).await.expect("big reader");
    assert_eq!(m, msg(7, 64 * 1024 * 1024));
    big.await.expect("big");
    small.await.expect("small");
    assert_eq!(
        *order.lock().expect("lock"),
        ["small", "big"],
        "small messages waited for the large one"
    );
}

/// Many channels at once, each message carrying nested references.
pub async fn many_concurrent_channels_with_nested_refs(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let k = 100;
    let server = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..k {
                let mut rx = b.accept::<Request>().await.expect("accept").expect("ch");
                tasks.push(tokio::spawn(async move {
                    while let Some(r) = rx.recv().await.expect("recv") {
                        let _ = r.reply.send(r.n * 2).await;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        })
    };
    let mut clients = Vec::new();
    for c in 0..k {
        let a = a.clone();
        clients.push(tokio::spawn(async move {
            let tx = a.open::<Request>().await.expect("open");
            for i in 0..20u64 {
                let (reply, mut ans) = channel(1);
                let n = c as u64 * 1000 + i;
                send(&tx, Request { n, reply }).await;
                assert_eq!(recv(&mut ans).await, n * 2);
            }
        }));
    }
    for c in clients {
        within("client", c).await.expect("client");
    }
    within("server", server).await.expect("server");
}

/// True once neither session has forwarding tasks or exports left and their stream
/// tables are no larger than `max_a` and `max_b`.
fn released<'a>(
    a: &'a Session,
    b: &'a Session,
    max_a: usize,
    max_b: usize,
) -> impl FnMut() -> bool + 'a {
    move || {
        let (sa, sb) = (a.stats(), b.stats());
        sa.tasks == 0
            && sb.tasks == 0
            && sa.exported == 0
            && sb.exported == 0
            && sa.connection.streams <= max_a
            && sb.connection.streams <= max_b
    }
}

/// Thousands of short-lived nested channels leave no tasks or table entries behind.
pub async fn no_leaks_after_short_lived_nested(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<(Sender<u32>, Receiver<u32>)>(&a, &b).await;
    let base_a = a.stats();
    let server = tokio::spawn(async move {
        while let Some((s, mut r)) = rx.recv().await.expect("recv") {
            let v = r.recv().await.expect("inner recv").expect("value");
            let _ = s.send(v + 1).await;
        }
    });
    for i in 0..2000u32 {
        let (s, mut s_rx) = channel(1);
        let (r_tx, r) = channel(1);
        send(&tx, (s, r)).await;
        send(&r_tx, i).await;
        drop(r_tx);
        assert_eq!(recv(&mut s_rx).await, i + 1);
    }
    drop(tx);
    within("server", server).await.expect("server");
    // Everything winds down asynchronously: wait for the counters, bounded.
    crate::wait_until(
        "stats to settle",
        released(&a, &b, base_a.connection.streams, 1),
    )
    .await;
}

#[derive(Serialize, Deserialize)]
enum Cargo {
    Stream(ByteStream),
    Descriptor(Fd),
    Events(Receiver<u32>),
    Unused(Sender<u32>),
    Back(Receiver<u32>),
}

/// Every kind of end, sent and used or dropped hundreds of times, leaves no task, export
/// or stream entry behind on either side.
pub async fn no_leaks_for_every_kind_of_end(pair: Arc<PairFn>, caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Cargo>(&a, &b).await;
    let (back_tx, mut back_rx) = open_pair::<Receiver<u32>>(&b, &a).await;
    let (base_a, base_b) = (a.stats(), b.stats());
    let peer = tokio::spawn(async move {
        while let Some(c) = rx.recv().await.expect("recv") {
            match c {
                Cargo::Stream(mut s) => {
                    let mut v = Vec::new();
                    s.read_to_end(&mut v).await.expect("read stream");
                    assert_eq!(v, b"bytes");
                }
                Cargo::Descriptor(fd) => match fd.into_stream() {
                    Ok(mut s) => {
                        let mut v = Vec::new();
                        s.read_to_end(&mut v).await.expect("read fd stream");
                        assert_eq!(v, b"fd");
                    }
                    Err(fd) => drop(fd),
                },
                Cargo::Events(r) => drop(r),
                Cargo::Unused(s) => drop(s),
                Cargo::Back(r) => send(&back_tx, r).await,
            }
        }
    });
    for i in 0..200u32 {
        let (mut mine, theirs) = pipe();
        send(&tx, Cargo::Stream(theirs)).await;
        mine.write_all(b"bytes").await.expect("write");
        mine.shutdown().await.expect("shutdown");
        drop(mine);

        let (r, mut w) = std::io::pipe().expect("pipe");
        use std::io::Write;
        w.write_all(b"fd").expect("write pipe");
        drop(w);
        send(&tx, Cargo::Descriptor(Fd::new(r))).await;

        let (etx, erx) = channel::<u32>(4);
        send(&etx, i).await;
        send(&tx, Cargo::Events(erx)).await;

        let (utx, _urx) = channel::<u32>(1);
        send(&tx, Cargo::Unused(utx)).await;

        let (btx, brx) = channel::<u32>(4);
        send(&btx, i).await;
        send(&tx, Cargo::Back(brx)).await;
        let mut returned = recv(&mut back_rx).await;
        assert_eq!(recv(&mut returned).await, i);
    }
    drop(tx);
    within("peer", peer).await.expect("peer");
    if !caps.loss {
        return; // In memory there are no tasks, exports or streams to count.
    }
    crate::wait_until(
        "every end released",
        released(&a, &b, base_a.connection.streams, base_b.connection.streams),
    )
    .await;
}

/// When the connection is lost, pending receive, send and accept fail as lost, quickly.
pub async fn loss_fails_pending_ops(pair: Arc<PairFn>, caps: Caps) {
    if !caps.loss {
        return; // An in-memory session has no connection to lose.
    }
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Msg>(&b, &a).await;
    let (btx, _keep) = open_pair::<Msg>(&a, &b).await;
    // A pending receive at b's peer, a pending accept, and a send blocked on credit.
    let pending_recv = tokio::spawn(async move { rx.recv().await });
    let a2 = a.clone();
    let pending_accept = tokio::spawn(async move { a2.accept::<u32>().await });
    let pending_send = tokio::spawn(async move {
        loop {
            if let Err(e) = btx.send(msg(0, 64 * 1024)).await {
                return e.error;
            }
        }
    });
    tokio::task::yield_now().await;
    b.abort();
    drop(tx);
    let e = within("pending recv", pending_recv)
        .await
        .expect("task")
        .expect_err("recv must fail");
    assert!(e.is_connection_lost(), "recv: {e}");
    let e = within("pending accept", pending_accept)
        .await
        .expect("task")
        .expect_err("accept must fail");
    assert!(e.is_connection_lost(), "accept: {e}");
    let e = within("pending send", pending_send).await.expect("task");
    assert!(e.is_connection_lost(), "send: {e}");
    let e = a.open::<u32>().await.expect_err("open after loss");
    assert!(e.is_connection_lost(), "open: {e}");
}

/// A descriptor travels: a real one where the transport passes them, a stream elsewhere.
pub async fn fd_passing(pair: Arc<PairFn>, caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<(String, Fd)>(&a, &b).await;
    let (r, mut w) = std::io::pipe().expect("pipe");
    use std::io::Write;
    w.write_all(b"through a descriptor").expect("write pipe");
    drop(w);
    send(&tx, ("pipe".to_owned(), Fd::new(r))).await;
    let (name, fd) = recv(&mut rx).await;
    assert_eq!(name, "pipe");
    let mut got = Vec::new();
    if caps.fds {
        let owned = fd.into_owned_fd().expect("a real descriptor");
        let mut f = std::fs::File::from(owned);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            f.read_to_end(&mut got).map(|_| got)
        })
        .await
        .expect("join")
        .map(|g| assert_eq!(g, b"through a descriptor"))
        .expect("read");
    } else {
        let mut s = fd.into_stream().expect("a byte stream");
        within("read", s.read_to_end(&mut got)).await.expect("read");
        assert_eq!(got, b"through a descriptor");
    }
}

/// Accepting with the wrong type fails clearly instead of panicking.
pub async fn accept_wrong_type_is_decode_error(pair: Arc<PairFn>, caps: Caps) {
    let (a, b) = pair().await;
    let tx = a.open::<String>().await.expect("open");
    send(&tx, "text".to_owned()).await;
    if caps.loss {
        let mut rx = within("accept", b.accept::<Vec<u64>>())
            .await
            .expect("accept")
            .expect("channel");
        let e = within("recv", rx.recv()).await.expect_err("wrong type");
        assert!(e.is_decode(), "{e}");
    } else {
        let e = within("accept", b.accept::<Vec<u64>>())
            .await
            .expect_err("wrong type");
        assert!(e.is_decode(), "{e}");
    }
}

/// close() lets open channels finish and makes accept return None.
pub async fn session_close_is_graceful(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<u32>(&a, &b).await;
    b.close();
    assert!(within("accept after close", b.accept::<u32>())
        .await
        .expect("accept")
        .is_none());
    send(&tx, 1).await;
    assert_eq!(recv(&mut rx).await, 1);
    // No new channels either way once one side closed; the other side's accept ends too.
    let e = b.open::<u32>().await.expect_err("open after close");
    assert!(e.is_closed(), "{e}");
    assert!(within("peer's accept after close", a.accept::<u32>())
        .await
        .expect("accept")
        .is_none());
    let e = a.open::<u32>().await.expect_err("peer opens after close");
    assert!(e.is_closed(), "{e}");
    drop(tx);
    assert_eq!(within("eos", rx.recv()).await.expect("eos"), None);
}

/// A pair where the first session opened a channel and sent 7 on it, and the second has
/// the opening waiting to be accepted.
async fn opened_not_accepted(pair: &Arc<PairFn>, caps: Caps) -> (Session, Session, Sender<u32>) {
    let (a, b) = pair().await;
    let tx = a.open::<u32>().await.expect("open");
    send(&tx, 7).await;
    if caps.loss {
        // Over a connection: wait until b has the opening (in memory it has it at once).
        within("the opening arrives", async {
            while b.stats().connection.pending_accepts == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    (a, b, tx)
}

/// A channel the peer opened before `close()` is still accepted after it: a close refuses
/// new channels and lets open ones finish (PROTOCOL.md §10), including those waiting to be
/// accepted; then accept ends.
pub async fn channels_opened_before_close_are_still_accepted(pair: Arc<PairFn>, caps: Caps) {
    let (_a, b, tx) = opened_not_accepted(&pair, caps).await;
    b.close();
    let mut rx = within("accept after close", b.accept::<u32>())
        .await
        .expect("accept")
        .expect("the channel opened before the close");
    assert_eq!(recv(&mut rx).await, 7);
    assert!(within("accept", b.accept::<u32>())
        .await
        .expect("accept")
        .is_none());
    send(&tx, 8).await;
    assert_eq!(recv(&mut rx).await, 8);
    drop(tx);
    assert_eq!(within("eos", rx.recv()).await.expect("eos"), None);
}

/// When the last handle of a session goes, the channels the peer opened that nobody
/// accepted are ended (nobody can accept them any more): the peer's sender learns it.
pub async fn unaccepted_channels_end_with_the_session(pair: Arc<PairFn>, caps: Caps) {
    let (_a, b, tx) = opened_not_accepted(&pair, caps).await;
    drop(b);
    within("the sender learns its channel ended", tx.closed()).await;
}

/// A receiver that does not read makes the sender wait (no unbounded buffering).
pub async fn backpressure_bounds_memory(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Msg>(&a, &b).await;
    // Fill until try_send reports Full; bounded by window (or local capacity).
    let mut sent = 0u64;
    loop {
        match tx.try_send(msg(sent, 1024)) {
            Ok(()) => sent += 1,
            Err(e) if e.is_full() => break,
            Err(e) => panic!("try_send: {e}"),
        }
        // Let the writer move what it can, so only the receiver's window limits us.
        if sent.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
        assert!(sent < 100_000, "no backpressure after {sent} messages");
    }
    for i in 0..sent {
        assert_eq!(recv(&mut rx).await.seq, i);
    }
}

/// `Sender::delivered` returns once the receiving application took every message and the
/// end, not before; and fails (it does not hang) when the receiver is dropped first.
pub async fn delivery_confirmation(pair: Arc<PairFn>, _caps: Caps) {
    let (a, b) = pair().await;
    let (tx, mut rx) = open_pair::<Msg>(&a, &b).await;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let confirm = tokio::spawn(async move {
        for i in 0..100 {
            send(&tx, msg(i, 1000)).await;
        }
        let r = tx.delivered().await;
        let _ = done_tx.send(());
        r
    });
    for i in 0..100 {
        assert_eq!(recv(&mut rx).await.seq, i);
        // Not confirmed while messages (or the end) remain to be taken.
        assert!(
            done_rx.try_recv().is_err(),
            "confirmed before message {i} was taken"
        );
    }
    assert!(within("end", rx.recv()).await.expect("end").is_none());
    within("confirmation", confirm)
        .await
        .expect("task")
        .expect("delivered");

    // A receiver dropped before the end: an error, promptly.
    let (tx, rx) = open_pair::<Msg>(&a, &b).await;
    send(&tx, msg(0, 10)).await;
    drop(rx);
    let e = within("failed confirmation", tx.delivered())
        .await
        .expect_err("the receiver was dropped");
    assert!(
        matches!(e.kind(), ErrorKind::Reset | ErrorKind::Closed),
        "{e}"
    );
}
