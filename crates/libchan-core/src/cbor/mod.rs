//! The CBOR codec of libchan (RFC 8949), the default codec (feature `cbor`, on by
//! default; the crate `libchan-codec-cbor` re-exports it).
//!
//! It lives in the core so that a session whose codec is CBOR encodes and decodes each
//! message as its own type, monomorphized, instead of through the type-erased [`Codec`]
//! seam every other codec goes through (erased-serde made a 64-byte message's decode
//! about five times slower). The bytes are the same either way.
//!
//! Payloads are serde values in CBOR: a built-in serializer writes them (straight into the
//! message buffer; its bytes are exactly what [ciborium] writes, which the tests check),
//! and a built-in slice deserializer reads them (borrowing strings and byte strings from
//! the input, bounding every length by the bytes left and nesting by [`MAX_DEPTH`]). A
//! reference to a channel end, byte stream or descriptor is the CBOR tag [`REF_TAG`]
//! (`0x4C43484E`, "LCHN") around an unsigned integer: the index of the reference in the
//! message's reference table. Encoded, reference 0 is `DA 4C 43 48 4E 00`.
//!
//! ```
//! use libchan_core::cbor::Cbor;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! Cbor.encode(&(1u8, "a"), &mut out).unwrap();
//! assert_eq!(out, [0x82, 0x01, 0x61, b'a']);
//! ```

mod de;
mod ser;

use serde::Serialize;

use crate::{Codec, Error, ErrorKind};
use ciborium::tag::Required;
use serde::{Deserialize, Deserializer};

/// An encode or decode error of the built-in serializer and deserializer: what went
/// wrong (where, for a decode: the byte offset).
#[derive(Debug)]
pub(crate) struct CborError(String);

impl std::fmt::Display for CborError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CborError {}

impl serde::de::Error for CborError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CborError(msg.to_string())
    }
}

impl serde::ser::Error for CborError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CborError(msg.to_string())
    }
}

/// The CBOR tag that marks a reference.
pub const REF_TAG: u64 = 0x4C43_484E;

/// Deepest nesting accepted when decoding (arrays and maps inside each other).
pub const MAX_DEPTH: usize = 128;

/// The CBOR codec. Its handshake name is `"cbor"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cbor;

/// Appends the CBOR encoding of `value` to `out` (what [`Cbor`]'s [`Codec::encode`] does,
/// without the type erasure).
///
/// ```
/// let mut out = Vec::new();
/// libchan_core::cbor::encode(&(1u8, "a"), &mut out).unwrap();
/// assert_eq!(out, [0x82, 0x01, 0x61, b'a']);
/// ```
pub fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    value
        .serialize(&mut ser::Ser::new(out, false))
        .map_err(encode_error)
}

/// [`encode`] for a session: a [`Blob`](crate::Blob) that offered its bytes (see
/// [`EncodeCtx::take_offer`](crate::session::EncodeCtx::take_offer)) is recorded as a
/// splice instead of copied. The output, with the splices put back, is what [`encode`]
/// writes.
pub(crate) fn encode_spliced<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    value
        .serialize(&mut ser::Ser::new(out, true))
        .map_err(encode_error)
}

fn encode_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Encode, format!("cbor: {e}"))
}

/// Decodes one value from the whole of `input` (what [`Cbor`]'s [`Codec::decode`] does,
/// without the type erasure): trailing bytes are an error, as is anything malformed.
///
/// ```
/// let v: (u8, String) = libchan_core::cbor::decode(&[0x82, 0x01, 0x61, b'a']).unwrap();
/// assert_eq!(v, (1, "a".to_string()));
/// assert!(libchan_core::cbor::decode::<u8>(&[0x01, 0x02]).is_err()); // trailing byte
/// assert!(libchan_core::cbor::decode::<u8>(&[0x18]).is_err()); // truncated
/// ```
pub fn decode<'de, T: Deserialize<'de>>(input: &'de [u8]) -> Result<T, Error> {
    let mut de = de::De::new(input);
    let v = T::deserialize(&mut de).map_err(decode_error)?;
    no_trailing(&de)?;
    Ok(v)
}

fn decode_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Decode, format!("cbor: {e}"))
}

fn no_trailing(de: &de::De<'_>) -> Result<(), Error> {
    if de.remaining() != 0 {
        return Err(Error::new(
            ErrorKind::Decode,
            format!("cbor: {} trailing bytes after the value", de.remaining()),
        ));
    }
    Ok(())
}

impl Codec for Cbor {
    fn name(&self) -> &str {
        "cbor"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error> {
        encode(value, out)
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error> {
        let mut de = de::De::new(input);
        visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de)).map_err(decode_error)?;
        no_trailing(&de)
    }

    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> {
        Box::new(Required::<u32, REF_TAG>(index))
    }

    fn read_ref(
        &self,
        d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error> {
        RefIndex::deserialize(d).map(|r| r.0)
    }
}

/// A reference index, read through the deserializer's reference hook.
struct RefIndex(u32);

impl<'de> Deserialize<'de> for RefIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RefIndex;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a libchan reference")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RefIndex, E> {
                u32::try_from(v)
                    .map(RefIndex)
                    .map_err(|_| E::custom(format!("reference index {v} exceeds u32")))
            }
        }
        d.deserialize_newtype_struct(de::REF_NAME, V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_marker_bytes() {
        let mut out = Vec::new();
        Cbor.encode(&*Cbor.ref_marker(0), &mut out).unwrap();
        assert_eq!(out, [0xDA, 0x4C, 0x43, 0x48, 0x4E, 0x00]);
    }
}
