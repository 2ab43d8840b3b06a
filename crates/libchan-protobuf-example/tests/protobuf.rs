//! The protobuf codec over real sockets: the conformance cases that apply to
//! `Proto<M>` messages (the serde-typed suite cannot: protobuf carries prost messages
//! only), the vectors of docs/PROTOCOL.md §9, and total decoding.

// Helpers shared by the tests panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io::{Read, Write};

use libchan_codec_protobuf::{wkt, Proto, Protobuf};
use libchan_core::{channel, pipe, Codec, Config, ErrorKind, Receiver, Sender, Session};
use libchan_protobuf_example::jobs::{Blob, Done, Event, Job, Register};
use libchan_test_support::within;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> Config {
    Config::new(Protobuf)
}

async fn tcp() -> (Session, Session) {
    let (a, b) = libchan_test_support::tcp_pair(config()).await;
    assert_eq!(a.codec(), "protobuf");
    (a, b)
}

async fn unix() -> (Session, Session) {
    libchan_unix::pair(&config()).await.expect("unix pair")
}

async fn open<T: libchan_core::Message>(a: &Session, b: &Session) -> (Sender<T>, Receiver<T>) {
    let tx = a.open::<T>().await.expect("open");
    let rx = within("accept", b.accept::<T>())
        .await
        .expect("accept")
        .expect("a channel");
    (tx, rx)
}

async fn recv<T: libchan_core::Message>(rx: &mut Receiver<T>) -> T {
    match within("recv", rx.recv()).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("unexpected end of stream"),
        Err(e) => panic!("recv failed: {e}"),
    }
}

async fn send<T: libchan_core::Message>(tx: &Sender<T>, v: T) {
    if let Err(e) = tx.send(v).await {
        panic!("send failed: {}", e.error);
    }
}

/// The worker side of a job: events, stdin echoed upper-cased to stdout, then `Done`.
async fn work(mut job: Proto<Job>) {
    let reply = job
        .take_sender::<Proto<Done>>(job.message.reply)
        .expect("reply");
    let events = job
        .take_sender::<Proto<Event>>(job.message.events)
        .expect("events");
    let mut stdin = job.take_byte_stream(job.message.stdin).expect("stdin");
    let mut stdout = job.take_byte_stream(job.message.stdout).expect("stdout");
    for sequence in 0..3 {
        let text = format!("{} step {sequence}", job.message.command);
        send(&events, Proto::new(Event { sequence, text })).await;
    }
    drop(events);
    let mut input = Vec::new();
    stdin.read_to_end(&mut input).await.expect("read stdin");
    stdout
        .write_all(&input.to_ascii_uppercase())
        .await
        .expect("write stdout");
    stdout.shutdown().await.expect("shutdown stdout");
    let status = job.message.args.len() as i32;
    send(
        &reply,
        Proto::new(Done {
            status,
            error: String::new(),
        }),
    )
    .await;
}

async fn jobs_round_trip<F, Fut>(pair: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (Session, Session)>,
{
    let (client, server) = pair().await;
    let (jobs, mut incoming) = open::<Proto<Job>>(&client, &server).await;
    let worker = tokio::spawn(async move {
        while let Some(job) = incoming.recv().await.expect("recv job") {
            tokio::spawn(work(job));
        }
    });
    let mut runs = Vec::new();
    for n in 0..8usize {
        let (reply_tx, reply_rx) = channel::<Proto<Done>>(1);
        let (events_tx, events_rx) = channel::<Proto<Event>>(4);
        let (mut stdin, stdin_far) = pipe();
        let (mut stdout, stdout_far) = pipe();
        let mut job = Proto::new(Job {
            command: format!("job{n}"),
            args: vec!["x".into(); n],
            ..Default::default()
        });
        job.message.reply = Some(job.put_sender(reply_tx));
        job.message.events = Some(job.put_sender(events_tx));
        job.message.stdin = Some(job.put_byte_stream(stdin_far));
        job.message.stdout = Some(job.put_byte_stream(stdout_far));
        assert_eq!(job.references(), 4);
        send(&jobs, job).await;
        runs.push(tokio::spawn(async move {
            let (mut reply_rx, mut events_rx) = (reply_rx, events_rx);
            stdin
                .write_all(format!("input of job {n}").as_bytes())
                .await
                .unwrap();
            stdin.shutdown().await.unwrap();
            let mut out = String::new();
            stdout.read_to_string(&mut out).await.unwrap();
            assert_eq!(out, format!("INPUT OF JOB {n}"));
            for sequence in 0..3 {
                let e = recv(&mut events_rx).await.message;
                assert_eq!(e.sequence, sequence);
                assert_eq!(e.text, format!("job{n} step {sequence}"));
            }
            assert!(within("events end", events_rx.recv())
                .await
                .unwrap()
                .is_none());
            assert_eq!(recv(&mut reply_rx).await.message.status, n as i32);
        }));
    }
    for r in runs {
        within("job", r).await.expect("job task");
    }
    drop(jobs);
    within("worker", worker).await.expect("worker");
}

#[tokio::test]
async fn jobs_with_reply_events_and_byte_streams_over_tcp() {
    jobs_round_trip(tcp).await;
}

#[tokio::test]
async fn jobs_with_reply_events_and_byte_streams_over_unix() {
    jobs_round_trip(unix).await;
}

#[tokio::test]
async fn ordering_completeness_and_large_messages() {
    let (a, b) = tcp().await;
    let (tx, mut rx) = open::<Proto<Blob>>(&a, &b).await;
    let n = 5_000u32;
    let producer = tokio::spawn(async move {
        for i in 0..n {
            let len = if i % 1000 == 999 { 4 << 20 } else { 64 };
            let data = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
            send(&tx, Proto::new(Blob { data, n: i })).await;
        }
    });
    for i in 0..n {
        let blob = recv(&mut rx).await.message;
        assert_eq!(blob.n, i);
        let len = if i % 1000 == 999 { 4 << 20 } else { 64 };
        assert_eq!(blob.data.len(), len);
        assert!(blob
            .data
            .iter()
            .enumerate()
            .all(|(k, &x)| x == (k as u32 ^ i) as u8));
    }
    within("producer", producer).await.unwrap();
    assert!(within("end", rx.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn receivers_and_repeated_senders() {
    let (dispatcher, worker) = tcp().await;
    let (register, mut registrations) = open::<Proto<Register>>(&worker, &dispatcher).await;

    // The worker registers: a Receiver of its jobs and three peer Senders.
    let (jobs_tx, mut jobs_rx) = channel::<Proto<Job>>(4);
    let mut peer_rxs = Vec::new();
    let mut reg = Proto::new(Register {
        name: "w1".into(),
        ..Default::default()
    });
    reg.message.jobs = Some(reg.put_receiver(jobs_rx_placeholder(&mut jobs_rx)));
    for _ in 0..3 {
        let (tx, rx) = channel::<Proto<Event>>(1);
        peer_rxs.push(rx);
        let field = reg.put_sender(tx);
        reg.message.peers.push(field);
    }
    send(&register, reg).await;

    let mut reg = recv(&mut registrations).await;
    assert_eq!(reg.message.name, "w1");
    let mut jobs_of_w1 = reg
        .take_receiver::<Proto<Job>>(reg.message.jobs)
        .expect("jobs");
    let peers: Vec<_> = reg.message.peers.clone();
    for (i, p) in peers.into_iter().enumerate() {
        let tx = reg.take_sender::<Proto<Event>>(p).expect("peer");
        send(
            &tx,
            Proto::new(Event {
                sequence: i as u64,
                text: "hi".into(),
            }),
        )
        .await;
    }
    for (i, rx) in peer_rxs.iter_mut().enumerate() {
        assert_eq!(recv(rx).await.message.sequence, i as u64);
    }
    // Jobs the worker side feeds into its channel reach the dispatcher's Receiver.
    send(
        &jobs_tx,
        Proto::new(Job {
            command: "queued".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(recv(&mut jobs_of_w1).await.message.command, "queued");
}

/// Moves the Receiver out of `rx`, leaving a closed one behind.
fn jobs_rx_placeholder(rx: &mut Receiver<Proto<Job>>) -> Receiver<Proto<Job>> {
    std::mem::replace(rx, channel::<Proto<Job>>(1).1)
}

#[tokio::test]
async fn ends_sent_back_resolve_to_the_originals() {
    let (a, b) = tcp().await;
    let (to_b, mut at_b) = open::<Proto<Register>>(&a, &b).await;
    let (to_a, mut at_a) = open::<Proto<Register>>(&b, &a).await;

    let (events_tx, mut events_rx) = channel::<Proto<Event>>(8);
    let (jobs_tx, jobs_rx) = channel::<Proto<Job>>(8);
    let mut reg = Proto::new(Register::default());
    let field = reg.put_sender(events_tx.clone());
    reg.message.peers.push(field);
    reg.message.jobs = Some(reg.put_receiver(jobs_rx));
    send(&to_b, reg).await;
    // Two jobs queued before the Receiver comes back; they must not be lost.
    for i in 0..2 {
        send(
            &jobs_tx,
            Proto::new(Job {
                command: format!("before {i}"),
                ..Default::default()
            }),
        )
        .await;
    }

    // b sends both ends straight back without using them.
    let mut reg = recv(&mut at_b).await;
    let peer = reg.message.peers[0];
    let s = reg.take_sender::<Proto<Event>>(peer).expect("sender");
    let r = reg
        .take_receiver::<Proto<Job>>(reg.message.jobs)
        .expect("receiver");
    let mut back = Proto::new(Register::default());
    let field = back.put_sender(s);
    back.message.peers.push(field);
    back.message.jobs = Some(back.put_receiver(r));
    send(&to_a, back).await;

    let mut back = recv(&mut at_a).await;
    let peer = back.message.peers[0];
    let s = back.take_sender::<Proto<Event>>(peer).expect("own sender");
    let mut r = back
        .take_receiver::<Proto<Job>>(back.message.jobs)
        .expect("own receiver");
    send(
        &s,
        Proto::new(Event {
            sequence: 9,
            text: "local".into(),
        }),
    )
    .await;
    assert_eq!(recv(&mut events_rx).await.message.sequence, 9);
    send(
        &jobs_tx,
        Proto::new(Job {
            command: "after".into(),
            ..Default::default()
        }),
    )
    .await;
    for expected in ["before 0", "before 1", "after"] {
        assert_eq!(recv(&mut r).await.message.command, expected);
    }
    // Back home, the ends are local again: no session is involved any more.
    assert_eq!(a.stats().exported, 0, "{:?}", a.stats());
}

async fn fd_log<F, Fut>(pair: F, expect_descriptor: bool)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (Session, Session)>,
{
    let (a, b) = pair().await;
    let (tx, mut rx) = open::<Proto<Job>>(&a, &b).await;
    let (mut log_reader, log_writer) = std::io::pipe().unwrap();
    let mut job = Proto::new(Job::default());
    job.message.log = Some(job.put_fd(libchan_core::Fd::new(log_writer)));
    send(&tx, job).await;
    let reader = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        log_reader.read_to_string(&mut text).unwrap();
        text
    });
    let mut job = recv(&mut rx).await;
    let fd = job.take_fd(job.message.log).expect("fd");
    assert_eq!(fd.is_descriptor(), expect_descriptor);
    if expect_descriptor {
        let mut f = std::fs::File::from(fd.into_owned_fd().unwrap());
        f.write_all(b"logged").unwrap();
    } else {
        // The sender's side copies the stream into the pipe until the stream ends.
        let mut s = fd.into_stream().unwrap();
        s.write_all(b"logged").await.unwrap();
        s.shutdown().await.unwrap();
    }
    assert_eq!(within("log", reader).await.unwrap(), "logged");
}

#[tokio::test]
async fn fd_over_unix_is_a_descriptor() {
    fd_log(unix, true).await;
}

#[tokio::test]
async fn fd_over_tcp_is_a_byte_stream() {
    fd_log(tcp, false).await;
}

#[tokio::test]
async fn a_malformed_message_is_a_decode_error_on_that_message_only() {
    let (a, b) = tcp().await;
    // The sender's type differs from the receiver's: Blob.n (tag 2, varint) is not
    // Job.args (tag 2, string), and invalid UTF-8 is not a Job.command (tag 1, string).
    let tx = a.open::<Proto<Blob>>().await.unwrap();
    let mut rx = within("accept", b.accept::<Proto<Job>>())
        .await
        .unwrap()
        .unwrap();
    let bad = [
        Blob {
            data: b"ok".to_vec(),
            n: 5,
        },
        Blob {
            data: vec![0xff, 0xfe],
            n: 0,
        },
    ];
    for blob in bad {
        send(&tx, Proto::new(blob)).await;
        let err = within("recv", rx.recv()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
        assert!(err.to_string().contains("protobuf"), "{err}");
    }
    // Blob{data: "ls"} is also a valid Job{command: "ls"}: the channel still works.
    send(
        &tx,
        Proto::new(Blob {
            data: b"ls".to_vec(),
            n: 0,
        }),
    )
    .await;
    assert_eq!(recv(&mut rx).await.message.command, "ls");
}

#[tokio::test]
async fn fields_naming_missing_taken_or_other_references_are_decode_errors() {
    let (a, b) = tcp().await;
    let (tx, mut rx) = open::<Proto<Job>>(&a, &b).await;
    let (events_tx, _events_rx) = channel::<Proto<Event>>(1);
    let (stream, _far) = pipe();
    let mut job = Proto::new(Job::default());
    job.message.events = Some(job.put_sender(events_tx));
    job.message.stdin = Some(job.put_byte_stream(stream));
    // A peer may write any index into a field: here one past the table, and the
    // stream's index in a Sender field.
    job.message.reply = Some(wkt::Sender { index: 7 });
    job.message.stdout = Some(wkt::ByteStream { index: 1 });
    send(&tx, job).await;
    let mut job = recv(&mut rx).await;
    let kind = |r: Result<(), libchan_core::Error>| r.unwrap_err().kind();

    let e = job.take_sender::<Proto<Done>>(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(e.to_string().contains("no Sender"), "{e}");
    let e = job
        .take_sender::<Proto<Done>>(job.message.reply)
        .unwrap_err();
    assert!(e.to_string().contains("names reference 7"), "{e}");
    let e = job
        .take_sender::<Proto<Event>>(wkt::Sender { index: 1 })
        .unwrap_err();
    assert!(e.to_string().contains("ByteStream where a Sender"), "{e}");
    // Index 1 was consumed by the failed take; index 0 is still there, once.
    assert!(job.take_sender::<Proto<Event>>(job.message.events).is_ok());
    assert_eq!(
        kind(
            job.take_sender::<Proto<Event>>(job.message.events)
                .map(drop)
        ),
        ErrorKind::Decode
    );
    // The session is unharmed.
    send(&tx, Proto::new(Job::default())).await;
    recv(&mut rx).await;
}

#[tokio::test]
async fn only_proto_messages_travel_on_the_protobuf_codec() {
    let (a, b) = tcp().await;
    let (tx, _rx) = open::<String>(&a, &b).await;
    let err = tx.send("plain".to_owned()).await.unwrap_err().error;
    assert_eq!(err.kind(), ErrorKind::Encode);
    assert!(err.to_string().contains("Proto<M> messages only"), "{err}");

    // Receiving protobuf bytes as a serde type is a decode error too.
    let tx = a.open::<Proto<Done>>().await.unwrap();
    let mut rx = within("accept", b.accept::<String>())
        .await
        .unwrap()
        .unwrap();
    send(&tx, Proto::new(Done::default())).await;
    let err = within("recv", rx.recv()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
}

#[tokio::test]
async fn proto_messages_also_travel_on_serde_codecs() {
    let config = Config::new(libchan_codec_cbor::Cbor);
    let (a, b) = libchan_test_support::tcp_pair(config).await;
    let (tx, mut rx) = open::<Proto<Job>>(&a, &b).await;
    let (reply_tx, mut reply_rx) = channel::<Proto<Done>>(1);
    let mut job = Proto::new(Job {
        command: "cbor".into(),
        ..Default::default()
    });
    job.message.reply = Some(job.put_sender(reply_tx));
    send(&tx, job).await;
    let mut job = recv(&mut rx).await;
    assert_eq!(job.message.command, "cbor");
    let reply = job.take_sender::<Proto<Done>>(job.message.reply).unwrap();
    send(
        &reply,
        Proto::new(Done {
            status: 3,
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(recv(&mut reply_rx).await.message.status, 3);
}

#[tokio::test]
async fn a_lost_connection_fails_pending_receives() {
    let (a, b) = tcp().await;
    let (_tx, mut rx) = open::<Proto<Job>>(&a, &b).await;
    a.abort();
    let err = within("recv", rx.recv()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionLost, "{err}");
}

/// docs/PROTOCOL.md §9, protobuf: the payload is the message's protobuf encoding.
#[test]
fn payload_vectors() {
    let vectors: [(Job, &str); 2] = [
        (
            Job {
                command: "ls".into(),
                reply: Some(wkt::Sender { index: 0 }),
                ..Default::default()
            },
            "0a 02 6c 73 1a 00",
        ),
        (
            Job {
                command: "ls".into(),
                stdin: Some(wkt::ByteStream { index: 1 }),
                ..Default::default()
            },
            "0a 02 6c 73 2a 02 08 01",
        ),
    ];
    for (job, hex) in vectors {
        let bytes: Vec<u8> = hex
            .split(' ')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let mut out = Vec::new();
        Protobuf.encode(&Proto::new(job.clone()), &mut out).unwrap();
        assert_eq!(out, bytes, "{job:?}");
        assert_eq!(Job::decode(bytes.as_slice()).unwrap(), job);
        assert_eq!(job.encode_to_vec(), bytes);
    }
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    // Every prefix and every one-byte mutation of a valid payload decodes or fails.
    let job = Job {
        command: "run".into(),
        args: vec!["a".into(), "bb".into()],
        reply: Some(wkt::Sender { index: 0 }),
        stdout: Some(wkt::ByteStream { index: 1 }),
        ..Default::default()
    };
    let bytes = job.encode_to_vec();
    for end in 0..=bytes.len() {
        let _ = libchan_test_support::decode::<Proto<Job>>(&Protobuf, &bytes[..end]);
    }
    for i in 0..bytes.len() {
        for x in [0x00, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] = x;
            let _ = libchan_test_support::decode::<Proto<Job>>(&Protobuf, &b);
        }
    }
    // A length prefix far beyond the input is an error, not an allocation.
    let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
    let err = libchan_test_support::decode::<Proto<Job>>(&Protobuf, &huge).unwrap_err();
    assert!(err.to_string().contains("buffer underflow"), "{err}");
}
