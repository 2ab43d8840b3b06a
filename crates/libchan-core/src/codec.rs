//! The codec seam: how message payloads and references are encoded.

use crate::error::Error;

/// A serialization format for message payloads.
///
/// A codec turns a value into bytes through serde (type-erased, so that sessions need not
/// be generic over the codec) and says how a *reference* — the index of a channel, byte
/// stream or descriptor in the message's reference table — looks in its format. Decoding
/// must be total: malformed input gives an error, never a panic, and allocates no more than
/// the input justifies.
///
/// ```
/// use libchan_core::{Codec, Error};
/// #[derive(Debug)]
/// struct Null;
/// impl Codec for Null {
///     fn name(&self) -> &str { "null" }
///     fn encode(&self, _v: &dyn erased_serde::Serialize, _out: &mut Vec<u8>) -> Result<(), Error> { Ok(()) }
///     fn decode(&self, _input: &[u8], _visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>) -> Result<(), Error> {
///         Err(Error::new(libchan_core::ErrorKind::Decode, "null codec"))
///     }
///     fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> { Box::new(index) }
///     fn read_ref(&self, d: &mut dyn erased_serde::Deserializer<'_>) -> Result<u32, erased_serde::Error> {
///         erased_serde::deserialize(d)
///     }
/// }
/// assert_eq!(Null.name(), "null");
/// ```
pub trait Codec: std::any::Any + Send + Sync + std::fmt::Debug {
    /// The name announced in the handshake (ASCII, at most 255 bytes), e.g. `"cbor"`.
    fn name(&self) -> &str;

    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error>;

    /// Decodes `input` by handing a deserializer over it to `visit`. Trailing bytes after
    /// the value are an error.
    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error>;

    /// The value that stands for reference `index` in a payload.
    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize>;

    /// Reads a reference written by [`ref_marker`](Codec::ref_marker); anything else is an
    /// error.
    fn read_ref(
        &self,
        d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error>;
}
