//! The CBOR codec of libchan (RFC 8949), the default codec.
//!
//! Payloads are serde values in CBOR as [ciborium] writes them. A reference to a channel
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

use std::cell::Cell;
use std::ptr::NonNull;

use ciborium::tag::Required;
use libchan_core::{Codec, Error, ErrorKind};
use serde::de::Error as _;
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
        let mut reader = input;
        let res = with_visitor(visit, || {
            ciborium::de::from_reader_with_recursion_limit::<Visit, _>(&mut reader, MAX_DEPTH)
        });
        res.map_err(|e| Error::new(ErrorKind::Decode, format!("cbor: {e}")))?;
        if !reader.is_empty() {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("cbor: {} trailing bytes after the value", reader.len()),
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
        let Required::<u32, REF_TAG>(i) = libchan_core::erased_serde::deserialize(d)?;
        Ok(i)
    }
}

type VisitFn<'a> = dyn FnMut(
        &mut dyn libchan_core::erased_serde::Deserializer<'_>,
    ) -> Result<(), libchan_core::erased_serde::Error>
    + 'a;

thread_local! {
    static VISITOR: Cell<Option<NonNull<VisitFn<'static>>>> = const { Cell::new(None) };
}

/// Makes `visit` reachable from [`Visit::deserialize`] while `f` runs: ciborium only
/// deserializes `DeserializeOwned` types, so the visitor travels through a thread-local.
fn with_visitor<R>(visit: &mut VisitFn<'_>, f: impl FnOnce() -> R) -> R {
    // SAFETY: only the lifetime is erased; the pointer is removed from the thread-local
    // before this function returns, so it never outlives `visit`.
    let ptr: NonNull<VisitFn<'static>> = unsafe {
        std::mem::transmute::<NonNull<VisitFn<'_>>, NonNull<VisitFn<'static>>>(NonNull::from(visit))
    };
    let prev = VISITOR.with(|c| c.replace(Some(ptr)));
    let r = f();
    VISITOR.with(|c| c.set(prev));
    r
}

struct Visit;

impl<'de> Deserialize<'de> for Visit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Some(mut ptr) = VISITOR.with(|c| c.take()) else {
            return Err(D::Error::custom("cbor visitor missing"));
        };
        let mut erased = <dyn libchan_core::erased_serde::Deserializer>::erase(d);
        // SAFETY: installed by `with_visitor`, which outlives this call; taken out of the
        // thread-local so no other reference exists while it runs.
        let r = unsafe { ptr.as_mut() }(&mut erased);
        VISITOR.with(|c| c.set(Some(ptr)));
        r.map_err(D::Error::custom)?;
        Ok(Visit)
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
