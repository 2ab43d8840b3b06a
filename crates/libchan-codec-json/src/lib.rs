//! The JSON codec of libchan (handshake name `"json"`), for peers that speak JSON best.
//!
//! Payloads are UTF-8 JSON as [serde_json] writes them (structs as objects,
//! `Option::None` as `null`), except that serde byte strings (`serde_bytes`, `ByteBuf`)
//! are strings in standard base64 with padding (RFC 4648 §4) instead of arrays of numbers:
//! a third larger than the bytes, not four times. A reference to a channel end, byte
//! stream or descriptor is the object `{"$libchan_ref": <index>}`: exactly one member, whose
//! value is the index in the message's reference table. Reference 0 encodes as
//! `{"$libchan_ref":0}`. A reference is only read where the receiving type holds a
//! `Sender`, `Receiver`, `ByteStream` or `Fd`, and the reference table outside the payload
//! says which entries exist and of which kind, so user data that merely looks like a
//! reference cannot create or steal a stream. Decoding is bounded: serde_json's
//! recursion limit (128) and no allocation beyond the input's size.
//!
//! ```
//! use libchan_codec_json::Json;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! Json.encode(&(1u8, "a"), &mut out).unwrap();
//! assert_eq!(out, br#"[1,"a"]"#);
//! out.clear();
//! Json.encode(&*Json.ref_marker(0), &mut out).unwrap();
//! assert_eq!(out, br#"{"$libchan_ref":0}"#);
//! ```

use libchan_core::erased_serde;
use libchan_core::{Codec, Error, ErrorKind};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_bytes_repr::{ByteFmtDeserializer, ByteFmtSerializer};

fn b64_config() -> base64::engine::GeneralPurposeConfig {
    base64::engine::GeneralPurposeConfig::new()
}

/// The member name of a reference object.
pub const REF_KEY: &str = "$libchan_ref";

/// The JSON codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl Codec for Json {
    fn name(&self) -> &str {
        "json"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut ser = serde_json::Serializer::new(out);
        let ser = ByteFmtSerializer::base64(&mut ser, base64::alphabet::STANDARD, b64_config());
        value
            .serialize(ser)
            .map_err(|e| Error::new(ErrorKind::Encode, format!("json: {e}")))
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error> {
        let mut de = serde_json::Deserializer::from_slice(input);
        let bytes_as_base64 =
            ByteFmtDeserializer::new_base64(&mut de, base64::alphabet::STANDARD, b64_config());
        visit(&mut <dyn erased_serde::Deserializer>::erase(
            bytes_as_base64,
        ))
        .map_err(|e| Error::new(ErrorKind::Decode, format!("json: {e}")))?;
        de.end()
            .map_err(|e| Error::new(ErrorKind::Decode, format!("json: {e}")))
    }

    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> {
        Box::new(RefObj(index))
    }

    fn read_ref(
        &self,
        d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error> {
        RefObj::deserialize(d).map(|r| r.0)
    }
}

struct RefObj(u32);

impl Serialize for RefObj {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(REF_KEY, &self.0)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for RefObj {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RefObj;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a libchan reference {{\"{REF_KEY}\": index}}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RefObj, A::Error> {
                let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? else {
                    return Err(de::Error::custom(
                        "empty object where a reference was expected",
                    ));
                };
                if key != REF_KEY {
                    return Err(de::Error::custom(format!(
                        "member {key:?} where a reference ({REF_KEY}) was expected"
                    )));
                }
                let index: u32 = map.next_value()?;
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "a reference object has exactly one member",
                    ));
                }
                Ok(RefObj(index))
            }
        }
        d.deserialize_map(V)
    }
}
