//! The CBOR codec of libchan (RFC 8949), the default codec.
//!
//! Payloads are serde values in CBOR: [ciborium] writes them, and a built-in slice
//! deserializer reads them (borrowing strings and byte strings from the input, bounding
//! every length by the bytes left and nesting by [`MAX_DEPTH`]). A reference to a channel
//! end, byte stream or descriptor is the CBOR tag [`REF_TAG`] (`0x4C43484E`, "LCHN")
//! around an unsigned integer: the index of the reference in the message's reference
//! table. Encoded, reference 0 is `DA 4C 43 48 4E 00`.
//!
//! ```
//! use libchan_codec_cbor::Cbor;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! Cbor.encode(&(1u8, "a"), &mut out).unwrap();
//! assert_eq!(out, [0x82, 0x01, 0x61, b'a']);
//! ```

mod de;

use ciborium::tag::Required;
use libchan_core::{Codec, Error, ErrorKind};
use serde::{Deserialize, Deserializer};

/// The CBOR tag that marks a reference.
pub const REF_TAG: u64 = 0x4C43_484E;

/// Deepest nesting accepted when decoding (arrays and maps inside each other).
pub const MAX_DEPTH: usize = 128;

/// The CBOR codec. Its handshake name is `"cbor"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cbor;

impl Codec for Cbor {
    fn name(&self) -> &str {
        "cbor"
    }

    fn encode(
        &self,
        value: &dyn libchan_core::erased_serde::Serialize,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        ciborium::ser::into_writer(value, out)
            .map_err(|e| Error::new(ErrorKind::Encode, format!("cbor: {e}")))
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn libchan_core::erased_serde::Deserializer<'_>,
        ) -> Result<(), libchan_core::erased_serde::Error>,
    ) -> Result<(), Error> {
        let mut de = de::De::new(input);
        visit(&mut <dyn libchan_core::erased_serde::Deserializer>::erase(
            &mut de,
        ))
        .map_err(|e| Error::new(ErrorKind::Decode, format!("cbor: {e}")))?;
        if de.remaining() != 0 {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("cbor: {} trailing bytes after the value", de.remaining()),
            ));
        }
        Ok(())
    }

    fn ref_marker(&self, index: u32) -> Box<dyn libchan_core::erased_serde::Serialize> {
        Box::new(Required::<u32, REF_TAG>(index))
    }

    fn read_ref(
        &self,
        d: &mut dyn libchan_core::erased_serde::Deserializer<'_>,
    ) -> Result<u32, libchan_core::erased_serde::Error> {
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
