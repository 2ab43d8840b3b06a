//! The MessagePack codec of libchan (handshake name `"msgpack"`).
//!
//! Payloads are serde values in MessagePack as [rmp_serde] writes them with structs as
//! maps (field names kept, like the CBOR codec). A reference to a channel end, byte stream
//! or descriptor is the MessagePack *extension* value of type [`REF_EXT_TYPE`] (76, ASCII
//! `L`) whose 4 data bytes are the big-endian index in the message's reference table — as
//! Go libchan did with extension types. Reference 0 encodes as `d6 4c 00 00 00 00`
//! (fixext 4). User data is never an extension value unless the user's type writes one,
//! and the reference table outside the payload says which entries exist, so data that
//! merely looks like a reference cannot create or steal a stream.
//!
//! ```
//! use libchan_codec_msgpack::MsgPack;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! MsgPack.encode(&(1u8, "a"), &mut out).unwrap();
//! assert_eq!(out, [0x92, 0x01, 0xa1, b'a']);
//! out.clear();
//! MsgPack.encode(&*MsgPack.ref_marker(0), &mut out).unwrap();
//! assert_eq!(out, [0xd6, 0x4c, 0, 0, 0, 0]);
//! ```

use libchan_core::erased_serde;
use libchan_core::{Codec, Error, ErrorKind};
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeTuple, Serializer};

/// The MessagePack extension type of a reference.
pub const REF_EXT_TYPE: i8 = 76;

/// Deepest nesting accepted when decoding.
pub const MAX_DEPTH: usize = 128;

/// The MessagePack codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl Codec for MsgPack {
    fn name(&self) -> &str {
        "msgpack"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
        value
            .serialize(&mut ser)
            .map_err(|e| Error::new(ErrorKind::Encode, format!("msgpack: {e}")))
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error> {
        let mut rest = input;
        // The reading deserializer copies strings out of the input (bounded by it): the
        // borrowing one cannot report trailing bytes.
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(MAX_DEPTH);
        visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de))
            .map_err(|e| Error::new(ErrorKind::Decode, format!("msgpack: {e}")))?;
        drop(de);
        if !rest.is_empty() {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("msgpack: {} trailing bytes after the value", rest.len()),
            ));
        }
        Ok(())
    }

    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> {
        Box::new(RefExt(index))
    }

    fn read_ref(
        &self,
        d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error> {
        RefExt::deserialize(d).map(|r| r.0)
    }
}

/// A reference as an extension value.
struct RefExt(u32);

impl Serialize for RefExt {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(rmp_serde::MSGPACK_EXT_STRUCT_NAME, &ExtBody(self.0))
    }
}

struct ExtBody(u32);

impl Serialize for ExtBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&REF_EXT_TYPE)?;
        t.serialize_element(serde_bytes::Bytes::new(&self.0.to_be_bytes()))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for RefExt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Outer;
        impl<'de> Visitor<'de> for Outer {
            type Value = RefExt;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "a libchan reference (MessagePack extension type {REF_EXT_TYPE})"
                )
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<RefExt, D::Error> {
                d.deserialize_tuple(2, Inner)
            }
        }
        struct Inner;
        impl<'de> Visitor<'de> for Inner {
            type Value = RefExt;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an extension type and its data")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RefExt, A::Error> {
                let ty: i8 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("extension without a type"))?;
                let data: serde_bytes::ByteBuf = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("extension without data"))?;
                if ty != REF_EXT_TYPE {
                    return Err(de::Error::custom(format!(
                        "extension type {ty} where a libchan reference (type {REF_EXT_TYPE}) was expected"
                    )));
                }
                let bytes: [u8; 4] = data.as_slice().try_into().map_err(|_| {
                    de::Error::custom(format!(
                        "reference extension of {} bytes (expected 4)",
                        data.len()
                    ))
                })?;
                Ok(RefExt(u32::from_be_bytes(bytes)))
            }
        }
        d.deserialize_newtype_struct(rmp_serde::MSGPACK_EXT_STRUCT_NAME, Outer)
    }
}
