//! A separate process for the fault tests: it connects (`unix PATH` or `tcp ADDR`), opens a
//! channel, and sends without end: first a message carrying a byte stream it keeps writing
//! to, then numbered messages, with a 32 MiB message every 1,000. The test kills it.
//!
//! With a third argument `sink`, it instead accepts one channel of byte buffers and never
//! reads from it (a consumer that stopped); the test stops or kills it.

use libchan_core::{pipe, ByteStream, Config};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

#[derive(Serialize, Deserialize)]
enum Feed {
    Stream(ByteStream),
    Number(u64),
    Big(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (kind, target) = (
        args.next().ok_or("usage: stream-peer unix|tcp TARGET")?,
        args.next().ok_or("usage: stream-peer unix|tcp TARGET")?,
    );
    let config = Config::new(libchan_codec_cbor::Cbor);
    let session = match kind.as_str() {
        "unix" => libchan_unix::connect(&target, &config).await?,
        _ => libchan_tcp::connect(target.as_str(), &config).await?,
    };
    if args.next().as_deref() == Some("sink") {
        let _held = session.accept::<Vec<u8>>().await?;
        println!("accepted");
        std::future::pending::<()>().await;
    }
    let feed = session.open::<Feed>().await?;
    let (mut mine, theirs) = pipe();
    feed.send(Feed::Stream(theirs)).await.map_err(|e| e.error)?;
    tokio::spawn(async move {
        let chunk = vec![b'x'; 16 * 1024];
        while mine.write_all(&chunk).await.is_ok() {}
    });
    let mut n = 0u64;
    loop {
        if n % 1000 == 999 {
            feed.send(Feed::Big(vec![7; 32 << 20]))
                .await
                .map_err(|e| e.error)?;
        }
        feed.send(Feed::Number(n)).await.map_err(|e| e.error)?;
        n += 1;
    }
}
