//! [`Blob`]: a byte payload that crosses a connection without being copied in user space.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::session::{with_decode, with_encode};

/// Blobs at least this long are written by reference when a session encodes with the
/// built-in CBOR codec (smaller ones are copied into the message; a copy is cheaper than
/// the bookkeeping).
pub(crate) const SPLICE_MIN: usize = 4096;

/// Received blobs at least this long share the received message's buffer; smaller ones are
/// copied out, so that a small blob never keeps a large read buffer alive (the same rule,
/// and the same bound, as the connection's read path: docs/SECURITY.md).
pub(crate) const SHARE_MIN: usize = 32 * 1024;

/// An immutable byte payload, cheap to clone, that libchan sends and receives without
/// copying it in user space where it can.
///
/// On the wire a `Blob` is exactly what `#[serde(with = "serde_bytes")] Vec<u8>` is (a
/// CBOR byte string, a msgpack bin, …), so a peer may use either. The difference is the
/// copies:
///
/// * **Sending** over a session whose codec is the built-in CBOR one, a blob of 4 KiB or
///   more is not copied into the encoded message: the connection writes it from the
///   blob's own memory (`writev`), and keeps a reference until it is written. Cloning a
///   `Blob` to send it again costs a reference count, not a copy.
/// * **Receiving** with a codec that lends byte strings from its input (CBOR does), a
///   blob of 32 KiB or more shares the buffer the message arrived in instead of being
///   copied into a new `Vec` (smaller ones are copied, so that a small blob never pins a
///   large buffer).
///
/// With other codecs a `Blob` works the same and is encoded like any byte string.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), libchan_core::Error> {
/// use libchan_core::{Blob, Session};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Chunk { seq: u64, data: Blob }
///
/// let (a, b) = Session::mem_pair();
/// let tx = a.open::<Chunk>().await?;
/// let mut rx = b.accept::<Chunk>().await?.expect("a channel");
/// let data = Blob::from(vec![7u8; 1 << 20]);
/// tx.send(Chunk { seq: 0, data: data.clone() }).await.map_err(|e| e.error)?;
/// let got = rx.recv().await?.expect("a chunk");
/// assert_eq!(got.data, data);
/// assert_eq!(got.data.len(), 1 << 20);
/// # Ok(()) }
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(Bytes);

impl Blob {
    /// An empty blob.
    ///
    /// ```
    /// assert!(libchan_core::Blob::new().is_empty());
    /// ```
    pub const fn new() -> Blob {
        Blob(Bytes::new())
    }

    /// A blob of static bytes (no allocation).
    ///
    /// ```
    /// let b = libchan_core::Blob::from_static(b"hello");
    /// assert_eq!(&b[..], b"hello");
    /// ```
    pub const fn from_static(bytes: &'static [u8]) -> Blob {
        Blob(Bytes::from_static(bytes))
    }

    /// A blob holding a copy of `data`.
    ///
    /// ```
    /// let b = libchan_core::Blob::copy_from_slice(&[1, 2, 3]);
    /// assert_eq!(b.len(), 3);
    /// ```
    pub fn copy_from_slice(data: &[u8]) -> Blob {
        Blob(Bytes::copy_from_slice(data))
    }

    /// The bytes, as a [`Bytes`] (no copy).
    ///
    /// ```
    /// let b = libchan_core::Blob::from(vec![1u8, 2]);
    /// let bytes: bytes::Bytes = b.into_bytes();
    /// assert_eq!(&bytes[..], &[1, 2]);
    /// ```
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The bytes as a `Vec` (a copy unless this blob is the only owner of a whole `Vec`).
    ///
    /// ```
    /// let v = libchan_core::Blob::from(vec![1u8, 2]).into_vec();
    /// assert_eq!(v, [1, 2]);
    /// ```
    pub fn into_vec(self) -> Vec<u8> {
        Vec::from(self.0)
    }
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for Blob {
    fn from(b: Bytes) -> Blob {
        Blob(b)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Blob {
        Blob(Bytes::from(v))
    }
}

impl From<&'static [u8]> for Blob {
    fn from(s: &'static [u8]) -> Blob {
        Blob(Bytes::from_static(s))
    }
}

impl From<Blob> for Bytes {
    fn from(b: Blob) -> Bytes {
        b.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.len() >= SPLICE_MIN {
            // Offered to the session's encoder: if it splices, it recognises these bytes
            // when the serializer writes them and references them instead of copying.
            with_encode(|ctx| ctx.offer_blob(&self.0));
        }
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        d.deserialize_byte_buf(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        if v.len() >= SHARE_MIN {
            if let Some(Some(b)) = with_decode(|ctx| ctx.share(v)) {
                return Ok(Blob(b));
            }
        }
        Ok(Blob::copy_from_slice(v))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob::copy_from_slice(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob::copy_from_slice(v.as_bytes()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        // Codecs without a byte type (JSON) carry bytes as an array of numbers. The size
        // hint comes from the input: it is bounded by what arrived, but capped anyway.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Blob::from(v))
    }
}
