//! `libchan`: poke a libchan service by hand, in the spirit of websocat and grpcurl.
//!
//! ```text
//! libchan connect URL [options]     connect to URL
//! libchan listen URL [options]      accept one session at URL
//!
//! Each line on stdin is a JSON value, sent as one message on a channel this side opens
//! (on the first line). Each message on channels the peer opens is printed as one JSON
//! line on stdout. At the end of stdin the channel is closed and its delivery confirmed;
//! then the session is drained: the peer's channels finish, no new ones are accepted.
//!
//! options:
//!   --codec cbor|json|msgpack|xml   the codec to offer (default cbor)
//!   --header 'Name: value'          request header for http(s):// and ws(s):// (repeatable)
//!   --ca FILE                       trust this CA (PEM) for tls/https/wss
//!   --cert FILE --key FILE          our certificate: the server's when listening, a client
//!                                   certificate when connecting
//!   --client-ca FILE                when listening: require client certificates from this CA
//!   --server-name NAME              verify the server as NAME (default: the URL's host)
//!   --websocket-fallback            http(s)://: fall back to a WebSocket
//!
//! exit codes:
//!   0  clean end: stdin ended, everything sent was delivered, the peer's channels ended
//!   2  usage or local error (bad arguments, URL, certificate, a stdin line that is not JSON)
//!   3  the connection was lost (or could not be made)
//!   4  the peer ended a channel with an application error, or refused the session
//!   5  a received message could not be decoded (the rest were printed)
//! ```
//!
//! Byte strings in received messages are printed as `{"$bytes": "<base64>"}`; references
//! to channels, byte streams and descriptors as the codec writes them (a number or
//! marker object), since the tool does not follow them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use libchan::{Error, ErrorKind, Options, Session};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

mod value;

use value::Shown;

const USAGE: &str = "usage: libchan connect|listen URL [--codec cbor|json|msgpack|xml] \
[--header 'Name: value']... [--ca FILE] [--cert FILE --key FILE] [--client-ca FILE] \
[--server-name NAME] [--websocket-fallback]";

/// Exit codes (documented above).
const USAGE_ERROR: u8 = 2;
const LOST: u8 = 3;
const REMOTE: u8 = 4;
const DECODE: u8 = 5;

#[derive(Default)]
struct Args {
    mode: String,
    url: String,
    codec: Option<String>,
    headers: Vec<(String, String)>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    server_name: Option<String>,
    websocket_fallback: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    a.mode = it.next().ok_or(USAGE)?;
    if a.mode == "--help" || a.mode == "-h" {
        return Err(USAGE.to_owned());
    }
    a.url = it.next().ok_or(USAGE)?;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--codec" => a.codec = Some(value()?),
            "--header" => {
                let h = value()?;
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| format!("--header {h:?} is not 'Name: value'"))?;
                a.headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            "--ca" => a.ca = Some(value()?),
            "--cert" => a.cert = Some(value()?),
            "--key" => a.key = Some(value()?),
            "--client-ca" => a.client_ca = Some(value()?),
            "--server-name" => a.server_name = Some(value()?),
            "--websocket-fallback" => a.websocket_fallback = true,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if !matches!(a.mode.as_str(), "connect" | "listen") {
        return Err(format!("unknown mode {:?}\n{USAGE}", a.mode));
    }
    Ok(a)
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

fn options(a: &Args) -> Result<Options, String> {
    let config = match a.codec.as_deref().unwrap_or("cbor") {
        "cbor" => libchan::config(),
        "json" => libchan::Config::new(libchan::json::Json),
        "msgpack" => libchan::Config::new(libchan::msgpack::MsgPack),
        "xml" => libchan::Config::new(libchan::xml::Xml),
        other => {
            return Err(format!(
                "unknown codec {other:?} (cbor, json, msgpack, xml)"
            ))
        }
    };
    let mut o = Options::with_config(config);
    for (k, v) in &a.headers {
        o = o.header(k, v);
    }
    if a.websocket_fallback {
        o = o.websocket_fallback();
    }
    if let Some(n) = &a.server_name {
        o = o.server_name(n.clone());
    }
    let tls_err = |e: Error| e.to_string();
    if a.mode == "connect" {
        if let Some(ca) = &a.ca {
            let mut c = libchan::tls::ClientTls::with_roots_pem(&read(ca)?).map_err(tls_err)?;
            if let (Some(cert), Some(key)) = (&a.cert, &a.key) {
                c = c.client_cert(&read(cert)?, &read(key)?).map_err(tls_err)?;
            }
            o = o.tls_client(c.build().map_err(tls_err)?);
        }
    } else if let (Some(cert), Some(key)) = (&a.cert, &a.key) {
        let mut s =
            libchan::tls::ServerTls::from_pem(&read(cert)?, &read(key)?).map_err(tls_err)?;
        if let Some(ca) = &a.client_ca {
            s = s.require_client_cert(&read(ca)?).map_err(tls_err)?;
        }
        o = o.tls_server(s.build().map_err(tls_err)?);
    }
    Ok(o)
}

/// The exit code an error calls for.
fn code_for(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::ConnectionLost | ErrorKind::Io | ErrorKind::Handshake | ErrorKind::Reset => LOST,
        ErrorKind::Remote | ErrorKind::Refused => REMOTE,
        ErrorKind::Decode => DECODE,
        _ => USAGE_ERROR,
    }
}

/// The worst outcome so far (the highest exit code wins, except that 0 < everything).
#[derive(Default)]
struct Outcome(Mutex<u8>);

impl Outcome {
    async fn note(&self, code: u8, message: &str) {
        eprintln!("libchan: {message}");
        let mut c = self.0.lock().await;
        if *c == 0 || (code != DECODE && *c == DECODE) {
            *c = code;
        }
    }
}

/// Prints every message of every channel the peer opens, until the peer opens no more.
async fn print_incoming(session: Session, outcome: Arc<Outcome>) {
    let stdout = Arc::new(Mutex::new(tokio::io::stdout()));
    let mut readers = Vec::new();
    loop {
        match session.accept::<Shown>().await {
            Ok(Some(mut rx)) => {
                let stdout = stdout.clone();
                let outcome = outcome.clone();
                readers.push(tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(Some(v)) => {
                                let mut line = v.0.to_string();
                                line.push('\n');
                                let mut out = stdout.lock().await;
                                if out.write_all(line.as_bytes()).await.is_err()
                                    || out.flush().await.is_err()
                                {
                                    return;
                                }
                            }
                            Ok(None) => return,
                            Err(e) if e.is_decode() => {
                                outcome
                                    .note(DECODE, &format!("undecodable message: {e}"))
                                    .await;
                            }
                            Err(e) => {
                                let what = if e.is_remote() {
                                    "the peer ended a channel with an error"
                                } else {
                                    "receive failed"
                                };
                                outcome.note(code_for(&e), &format!("{what}: {e}")).await;
                                return;
                            }
                        }
                    }
                }));
            }
            Ok(None) => break,
            Err(e) => {
                outcome
                    .note(code_for(&e), &format!("connection: {e}"))
                    .await;
                break;
            }
        }
    }
    for r in readers {
        let _ = r.await;
    }
}

/// Sends each stdin line as a message; at the end, closes and confirms delivery.
async fn send_stdin(session: Session, outcome: Arc<Outcome>) -> Result<(), ()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut tx = None;
    let mut n = 0u64;
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                outcome.note(USAGE_ERROR, &format!("stdin: {e}")).await;
                return Err(());
            }
        };
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                outcome
                    .note(USAGE_ERROR, &format!("stdin line {n} is not JSON: {e}"))
                    .await;
                return Err(());
            }
        };
        if tx.is_none() {
            match session.open::<serde_json::Value>().await {
                Ok(t) => tx = Some(t),
                Err(e) => {
                    outcome.note(code_for(&e), &format!("open: {e}")).await;
                    return Err(());
                }
            }
        }
        if let Some(t) = &tx {
            if let Err(e) = t.send(value).await {
                outcome
                    .note(code_for(&e.error), &format!("send: {}", e.error))
                    .await;
                return Err(());
            }
        }
    }
    if let Some(t) = tx {
        if let Err(e) = t.delivered().await {
            outcome
                .note(code_for(&e), &format!("delivery not confirmed: {e}"))
                .await;
            return Err(());
        }
    }
    Ok(())
}

async fn run(a: Args) -> u8 {
    let options = match options(&a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("libchan: {e}");
            return USAGE_ERROR;
        }
    };
    let session = if a.mode == "connect" {
        options.connect(&a.url).await
    } else {
        match options.listen(&a.url).await {
            Ok(l) => {
                eprintln!("libchan: listening on {}", l.local_url());
                l.accept().await
            }
            Err(e) => Err(e),
        }
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            eprintln!("libchan: {e}");
            return code_for(&e);
        }
    };
    let outcome = Arc::new(Outcome::default());
    let mut printer = tokio::spawn(print_incoming(session.clone(), outcome.clone()));
    let mut sender = tokio::spawn(send_stdin(session.clone(), outcome.clone()));
    let sent = tokio::select! {
        s = &mut sender => {
            let sent = matches!(s, Ok(Ok(())));
            if sent {
                // No new channels either way; the peer's open channels finish.
                session.close();
            } else {
                session.abort();
            }
            let _ = (&mut printer).await;
            sent
        }
        _ = &mut printer => {
            // The peer opens no more channels. If the connection is gone (or a channel
            // failed), stdin cannot be delivered: stop now; else finish sending.
            if session.error().is_some() || *outcome.0.lock().await != 0 {
                sender.abort();
                session.abort();
                false
            } else {
                let sent = matches!((&mut sender).await, Ok(Ok(())));
                session.close();
                sent
            }
        }
    };
    if sent {
        // Wait for the connection to end cleanly; the peer decides how long its channels
        // stay open, so no deadline here (interrupt to stop).
        let _ = session
            .drain(Duration::from_secs(u64::from(u32::MAX)))
            .await;
    }
    let code = *outcome.0.lock().await;
    code
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let code = run(args).await;
    // Exit now: a thread may still be blocked reading stdin, which the runtime's shutdown
    // would wait for. Everything printed was flushed line by line.
    std::process::exit(i32::from(code))
}
