//! A scripted mock peer: speaks raw frames, to test what a session does with bad input.

use bytes::BytesMut;
use libchan_core::frame::{self, Hello};
use libchan_core::Limits;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A peer that writes whatever bytes the test wants and reads frames back.
#[derive(Debug)]
pub struct MockPeer<S> {
    io: S,
    buf: BytesMut,
    first: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MockPeer<S> {
    /// Wraps one end of a connection.
    pub fn new(io: S) -> Self {
        MockPeer {
            io,
            buf: BytesMut::new(),
            first: true,
        }
    }

    /// A valid HELLO for `role` (1 dialer, 2 listener) offering `codecs`.
    pub fn hello_frame(role: u8, codecs: &[&str]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame::encode_hello(
            &mut out,
            &Hello::new(
                role,
                &Limits::default(),
                codecs.iter().map(|s| s.to_string()).collect(),
            ),
        );
        out.to_vec()
    }

    /// Writes raw bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads the next frame the session sends; `None` at end of stream.
    pub async fn read_frame(&mut self) -> std::io::Result<Option<frame::Frame>> {
        loop {
            match frame::decode(&mut self.buf, Limits::MAX_FRAME_SIZE, self.first) {
                Ok(Some(f)) => {
                    self.first = false;
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.0)),
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads frames until one matches `pred` or the stream ends.
    pub async fn read_until(
        &mut self,
        mut pred: impl FnMut(&frame::Frame) -> bool,
    ) -> std::io::Result<Option<frame::Frame>> {
        while let Some(f) = self.read_frame().await? {
            if pred(&f) {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// The underlying connection.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}
