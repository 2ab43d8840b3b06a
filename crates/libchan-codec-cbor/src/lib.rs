//! The CBOR codec of libchan (RFC 8949), the default codec.
//!
//! Payloads are serde values in CBOR: a built-in serializer writes them (the same bytes
//! as ciborium), and a built-in slice deserializer reads them (borrowing strings and byte strings from the input, bounding
//! every length by the bytes left and nesting by [`MAX_DEPTH`]). A reference to a channel
//! end, byte stream or descriptor is the CBOR tag [`REF_TAG`] (`0x4C43484E`, "LCHN")
//! around an unsigned integer: the index of the reference in the message's reference
//! table. Encoded, reference 0 is `DA 4C 43 48 4E 00`.
//!
//! The implementation lives in `libchan_core::cbor` (the core's default feature `cbor`),
//! so that sessions using it encode and decode each message as its own type rather than
//! through the type-erased codec seam; this crate names it for those who pick codecs by
//! crate, like every other codec.
//!
//! ```
//! use libchan_codec_cbor::Cbor;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! Cbor.encode(&(1u8, "a"), &mut out).unwrap();
//! assert_eq!(out, [0x82, 0x01, 0x61, b'a']);
//! ```

pub use libchan_core::cbor::{decode, encode, Cbor, MAX_DEPTH, REF_TAG};
