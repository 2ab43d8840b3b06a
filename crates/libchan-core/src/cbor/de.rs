//! A serde deserializer over a CBOR byte slice.
//!
//! Written for libchan's receive path: it borrows strings and byte strings from the input
//! (no scratch copies), knows the reference tag natively, and is total — every length is
//! checked against the bytes that remain before anything is allocated, nesting is bounded
//! by [`MAX_DEPTH`](super::MAX_DEPTH), and any malformed input is an error naming the byte
//! offset.

use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};

use super::{CborError, MAX_DEPTH, REF_TAG};

/// The newtype-struct name through which [`super::Cbor::read_ref`] asks for a reference.
pub(crate) const REF_NAME: &str = "\0libchan-cbor-ref";

const TAG_BIGPOS: u64 = 2;
const TAG_BIGNEG: u64 = 3;
const BREAK: u8 = 0xFF;

type Result<T> = std::result::Result<T, CborError>;

/// Deserializer state: the whole input, the read position and the current nesting depth.
pub(crate) struct De<'de> {
    input: &'de [u8],
    pos: usize,
    depth: usize,
}

/// Length argument of a head: a definite value or "indefinite" (additional info 31).
#[derive(Clone, Copy)]
enum Arg {
    Val(u64),
    Indefinite,
}

impl<'de> De<'de> {
    pub(crate) fn new(input: &'de [u8]) -> Self {
        De {
            input,
            pos: 0,
            depth: 0,
        }
    }

    /// Bytes left after the value, for the trailing-bytes check.
    pub(crate) fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    #[cold]
    #[inline(never)]
    fn err<T>(&self, what: impl fmt::Display) -> Result<T> {
        Err(CborError(format!("{what} at byte {}", self.pos)))
    }

    #[inline]
    fn peek(&self) -> Result<u8> {
        match self.input.get(self.pos) {
            Some(b) => Ok(*b),
            None => self.err("unexpected end of input"),
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'de [u8]> {
        if n > self.remaining() {
            return self.err(format_args!(
                "length {n} exceeds the {} bytes left",
                self.remaining()
            ));
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Reads one head: (major type, additional info, argument).
    ///
    /// A head whose argument is in its first byte (small integers, short strings and
    /// containers: most heads of a message) is read inline, the others in
    /// [`De::head_long`].
    #[inline(always)]
    fn head(&mut self) -> Result<(u8, u8, Arg)> {
        if let Some(&b) = self.input.get(self.pos) {
            let ai = b & 0x1F;
            if ai < 24 {
                self.pos += 1;
                return Ok((b >> 5, ai, Arg::Val(u64::from(ai))));
            }
        }
        self.head_long()
    }

    /// [`De::head`] for an argument in the bytes that follow the first (or a malformed
    /// or missing head).
    #[inline(never)]
    fn head_long(&mut self) -> Result<(u8, u8, Arg)> {
        let Some(&b) = self.input.get(self.pos) else {
            return self.err("unexpected end of input");
        };
        let (major, ai) = (b >> 5, b & 0x1F);
        let rest = &self.input[self.pos + 1..];
        // The argument in the next 1, 2, 4 or 8 bytes, big-endian: one bounds check each.
        let (v, n) = match ai {
            0..=23 => (u64::from(ai), 0),
            24 if !rest.is_empty() => (u64::from(rest[0]), 1),
            25 if rest.len() >= 2 => (u64::from(u16::from_be_bytes([rest[0], rest[1]])), 2),
            26 if rest.len() >= 4 => (
                u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]])),
                4,
            ),
            27 if rest.len() >= 8 => (
                u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
                8,
            ),
            24..=27 => {
                self.pos += 1;
                return self.err(format_args!(
                    "length {} exceeds the {} bytes left",
                    1usize << (ai - 24),
                    rest.len()
                ));
            }
            31 if matches!(major, 2..=5 | 7) => {
                self.pos += 1;
                return Ok((major, ai, Arg::Indefinite));
            }
            _ => {
                return self.err(format_args!(
                    "malformed head 0x{b:02x} (major {major}, additional info {ai})"
                ));
            }
        };
        self.pos += 1 + n;
        Ok((major, ai, Arg::Val(v)))
    }

    /// A definite length that must fit in what is left of the input, `per_item` bytes at
    /// least per item.
    #[inline]
    fn len(&self, v: u64, per_item: u64) -> Result<usize> {
        let left = self.remaining() as u64;
        if v.saturating_mul(per_item) > left {
            return self.err(format_args!(
                "length {v} exceeds the {left} bytes left in the payload"
            ));
        }
        Ok(v as usize)
    }

    /// An unsigned integer visited at once (what `deserialize_any` would visit), anything
    /// else through `deserialize_any`.
    #[inline]
    fn unsigned_or_any<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        if self.peek()? >> 5 == 0 {
            if let (_, _, Arg::Val(v)) = self.head()? {
                return visitor.visit_u64(v);
            }
        }
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(format_args!(
                "nesting depth exceeds the limit MAX_DEPTH = {MAX_DEPTH}"
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// The chunks of an indefinite-length byte or text string, concatenated.
    fn chunks(&mut self, major: u8) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            if self.peek()? == BREAK {
                self.pos += 1;
                return Ok(out);
            }
            match self.head()? {
                (m, _, Arg::Val(n)) if m == major => {
                    let n = self.len(n, 1)?;
                    out.extend_from_slice(self.take(n)?);
                }
                _ => return self.err("bad chunk in an indefinite-length string"),
            }
        }
    }

    /// A big-endian magnitude of at most 16 bytes (tags 2 and 3).
    fn bignum(&mut self) -> Result<u128> {
        match self.head()? {
            (2, _, Arg::Val(n)) if n <= 16 => {
                let bytes = self.take(n as usize)?;
                Ok(bytes
                    .iter()
                    .fold(0u128, |acc, b| (acc << 8) | u128::from(*b)))
            }
            _ => self.err("bignum wider than 128 bits or not a byte string"),
        }
    }

    fn float(&self, ai: u8, bits: u64) -> Result<f64> {
        Ok(match ai {
            25 => half_to_f64(bits as u16),
            26 => f64::from(f32::from_bits(bits as u32)),
            27 => f64::from_bits(bits),
            _ => return self.err(format_args!("unsupported simple value {bits}")),
        })
    }
}

/// `bytes` as UTF-8 text. Short ASCII strings (field names, variant names) skip the general
/// validation, whose setup costs more than the check for them.
#[inline]
fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.len() <= 16 && bytes.iter().all(|b| b.is_ascii()) {
        // SAFETY: every byte is ASCII, and ASCII is valid UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

fn half_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1F);
    let mant = f64::from(h & 0x3FF);
    sign * match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mant / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Integer methods of the deserializer: an unsigned integer is visited at once
/// ([`De::unsigned_or_any`]), anything else through `deserialize_any`.
macro_rules! unsigned_or_any {
    ($($method:ident),*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            self.unsigned_or_any(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut De<'de> {
    type Error = CborError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let start = self.pos;
        let (major, ai, arg) = self.head()?;
        match (major, arg) {
            (0, Arg::Val(v)) => visitor.visit_u64(v),
            (1, Arg::Val(v)) => match i64::try_from(v) {
                Ok(v) => visitor.visit_i64(-1 - v),
                Err(_) => visitor.visit_i128(-1 - i128::from(v)),
            },
            (2, Arg::Val(n)) => {
                let n = self.len(n, 1)?;
                visitor.visit_borrowed_bytes(self.take(n)?)
            }
            (2, Arg::Indefinite) => visitor.visit_byte_buf(self.chunks(2)?),
            (3, Arg::Val(n)) => {
                let n = self.len(n, 1)?;
                match text(self.take(n)?) {
                    Some(s) => visitor.visit_borrowed_str(s),
                    None => self.err("text string is not UTF-8"),
                }
            }
            (3, Arg::Indefinite) => match String::from_utf8(self.chunks(3)?) {
                Ok(s) => visitor.visit_string(s),
                Err(_) => self.err("text string is not UTF-8"),
            },
            (4, arg) => {
                let left = match arg {
                    Arg::Val(n) => Some(self.len(n, 1)?),
                    Arg::Indefinite => None,
                };
                self.enter()?;
                let mut access = Items {
                    de: self,
                    left,
                    what: "array items",
                };
                let v = visitor.visit_seq(&mut access)?;
                access.finish()?;
                self.leave();
                Ok(v)
            }
            (5, arg) => {
                let left = match arg {
                    Arg::Val(n) => Some(self.len(n, 2)?),
                    Arg::Indefinite => None,
                };
                self.enter()?;
                let mut access = Items {
                    de: self,
                    left,
                    what: "map entries",
                };
                let v = visitor.visit_map(&mut access)?;
                access.finish()?;
                self.leave();
                Ok(v)
            }
            (6, Arg::Val(tag)) => match tag {
                TAG_BIGPOS => visitor.visit_u128(self.bignum()?),
                TAG_BIGNEG => {
                    let m = self.bignum()?;
                    match i128::try_from(m) {
                        Ok(m) => visitor.visit_i128(-1 - m),
                        Err(_) => self.err("negative bignum below i128::MIN"),
                    }
                }
                REF_TAG => {
                    self.pos = start;
                    self.err("a libchan reference where the receiving type expects a plain value")
                }
                // Other tags are transparent: the tagged value stands for itself.
                _ => {
                    self.enter()?;
                    let v = self.deserialize_any(visitor)?;
                    self.leave();
                    Ok(v)
                }
            },
            (7, arg) => match (ai, arg) {
                (20, _) => visitor.visit_bool(false),
                (21, _) => visitor.visit_bool(true),
                (22 | 23, _) => visitor.visit_none(),
                (25..=27, Arg::Val(bits)) => visitor.visit_f64(self.float(ai, bits)?),
                (31, _) => {
                    self.pos = start;
                    self.err("unexpected break")
                }
                _ => {
                    self.pos = start;
                    self.err(format_args!(
                        "unsupported simple value (additional info {ai})"
                    ))
                }
            },
            _ => unreachable!("head() rejects indefinite lengths for majors 0, 1 and 6"),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek()? {
            0xF6 | 0xF7 => {
                self.pos += 1;
                visitor.visit_none()
            }
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek()? {
            0xF6 | 0xF7 => {
                self.pos += 1;
                visitor.visit_unit()
            }
            _ => self.err("expected null (unit)"),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        if name == REF_NAME {
            let start = self.pos;
            return match self.head()? {
                (6, _, Arg::Val(REF_TAG)) => match self.head()? {
                    (0, _, Arg::Val(i)) => visitor.visit_u64(i),
                    _ => {
                        self.pos = start;
                        self.err("reference tag without an unsigned index")
                    }
                },
                _ => {
                    self.pos = start;
                    self.err("expected a libchan reference (CBOR tag 0x4C43484E)")
                }
            };
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        match self.peek()? >> 5 {
            // A unit variant: its name.
            3 => visitor.visit_enum(Enum {
                de: self,
                data: false,
            }),
            // A variant with data: a map of one entry, name to value.
            5 => {
                let start = self.pos;
                match self.head()? {
                    (_, _, Arg::Val(1)) => {}
                    _ => {
                        self.pos = start;
                        return self.err("expected an enum as a single-entry map");
                    }
                }
                self.enter()?;
                let v = visitor.visit_enum(Enum {
                    de: self,
                    data: true,
                })?;
                self.leave();
                Ok(v)
            }
            _ => self.err("expected an enum (a text string or a single-entry map)"),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        // Visiting as IgnoredAny walks the value with the same checks and no allocation
        // beyond indefinite-length strings.
        self.deserialize_any(de::IgnoredAny)?;
        visitor.visit_unit()
    }

    fn is_human_readable(&self) -> bool {
        false
    }

    // The common cases first, each visiting what `deserialize_any` would (so the result
    // is the same), without going through its whole dispatch.

    unsigned_or_any!(
        deserialize_u64,
        deserialize_u32,
        deserialize_u16,
        deserialize_u8,
        deserialize_i64,
        deserialize_i32
    );

    #[inline]
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let b = self.peek()?;
        if b >> 5 == 3 && b & 0x1F != 31 {
            if let (_, _, Arg::Val(n)) = self.head()? {
                let n = self.len(n, 1)?;
                return match text(self.take(n)?) {
                    Some(s) => visitor.visit_borrowed_str(s),
                    None => self.err("text string is not UTF-8"),
                };
            }
        }
        self.deserialize_any(visitor)
    }

    #[inline]
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_str(visitor)
    }

    #[inline]
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_str(visitor)
    }

    #[inline]
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let b = self.peek()?;
        if b >> 5 == 2 && b & 0x1F != 31 {
            if let (_, _, Arg::Val(n)) = self.head()? {
                let n = self.len(n, 1)?;
                return visitor.visit_borrowed_bytes(self.take(n)?);
            }
        }
        self.deserialize_any(visitor)
    }

    #[inline]
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_bytes(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i128 u128 f32 f64 char
        seq tuple tuple_struct map struct
    }
}

/// The items of an array or the entries of a map, definite (`left`) or up to a break.
struct Items<'a, 'de> {
    de: &'a mut De<'de>,
    left: Option<usize>,
    /// "array items" or "map entries", for errors.
    what: &'static str,
}

impl Items<'_, '_> {
    /// Whether another item follows (and counts it).
    #[inline]
    fn next(&mut self) -> Result<bool> {
        match &mut self.left {
            Some(0) => Ok(false),
            Some(n) => {
                *n -= 1;
                Ok(true)
            }
            None => Ok(self.de.peek()? != BREAK),
        }
    }

    /// After the visitor is done: all items must have been read.
    fn finish(&mut self) -> Result<()> {
        match self.left {
            Some(0) => Ok(()),
            Some(n) => self.de.err(format_args!("{n} {} left unread", self.what)),
            None if self.de.peek()? == BREAK => {
                self.de.pos += 1;
                Ok(())
            }
            None => self.de.err(format_args!("{} left unread", self.what)),
        }
    }
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = CborError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if !self.next()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        self.left
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = CborError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if !self.next()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        self.left
    }
}

struct Enum<'a, 'de> {
    de: &'a mut De<'de>,
    /// Whether a value follows the variant name (the single-entry map form).
    data: bool,
}

impl Enum<'_, '_> {
    fn expect_data(&self) -> Result<()> {
        if self.data {
            Ok(())
        } else {
            self.de.err("enum variant with data written as a bare name")
        }
    }
}

impl<'de> de::EnumAccess<'de> for Enum<'_, 'de> {
    type Error = CborError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let v = seed.deserialize(&mut *self.de)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for Enum<'_, 'de> {
    type Error = CborError;

    fn unit_variant(self) -> Result<()> {
        if self.data {
            // Accept `{"Variant": null}` as well as the bare name.
            return de::Deserializer::deserialize_unit(&mut *self.de, de::IgnoredAny).map(|_| ());
        }
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        self.expect_data()?;
        seed.deserialize(&mut *self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value> {
        self.expect_data()?;
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.expect_data()?;
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fmt::Debug;

    use serde::{Deserialize, Serialize};

    /// `v` encoded by ciborium, decoded by ours and by ciborium as a `T`: both agree (on
    /// the value, or on failing).
    fn agree<T: Serialize + for<'a> Deserialize<'a> + PartialEq + Debug>(bytes: &[u8]) {
        let ours = super::super::decode::<T>(bytes).ok();
        let theirs = ciborium::de::from_reader::<T, _>(bytes).ok();
        assert_eq!(ours, theirs, "decoding {bytes:02x?}");
    }

    fn cbor<S: Serialize>(v: &S) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).expect("encodes");
        out
    }

    /// Heads whose argument is cut short or malformed: the error names the width, what
    /// is left and the offset, and nothing panics.
    #[test]
    fn long_heads_cut_short_are_errors_that_say_where() {
        let cases: [(&[u8], &str); 6] = [
            (&[0x18], "length 1 exceeds the 0 bytes left at byte 1"),
            (&[0x19, 1], "length 2 exceeds the 1 bytes left at byte 1"),
            (
                &[0x1A, 1, 2, 3],
                "length 4 exceeds the 3 bytes left at byte 1",
            ),
            (
                &[0x1B, 1, 2, 3, 4, 5, 6, 7],
                "length 8 exceeds the 7 bytes left at byte 1",
            ),
            (
                &[0x1C],
                "malformed head 0x1c (major 0, additional info 28) at byte 0",
            ),
            (&[], "unexpected end of input at byte 0"),
        ];
        for (bytes, want) in cases {
            let e = super::super::decode::<u64>(bytes).expect_err("cut short");
            assert!(e.to_string().contains(want), "{bytes:02x?}: {e}");
        }
        // And whole, each width decodes.
        for (bytes, v) in [
            (&[0x18, 200][..], 200u64),
            (&[0x19, 1, 0][..], 256),
            (&[0x1A, 0, 1, 0, 0][..], 65_536),
            (&[0x1B, 0, 0, 0, 1, 0, 0, 0, 0][..], 1 << 32),
        ] {
            assert_eq!(super::super::decode::<u64>(bytes).expect("whole"), v);
        }
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Ints {
        a: u8,
        b: u16,
        c: u32,
        d: u64,
        e: i8,
        f: i16,
        g: i32,
        h: i64,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Texts {
        name: String,
        #[serde(with = "serde_bytes")]
        raw: Vec<u8>,
        #[serde(rename = "ünïcode-field-name-longer-than-16")]
        long: char,
        map: BTreeMap<String, String>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum E {
        Unit,
        New(i32),
        Rec { x: u8 },
    }

    /// The typed fast paths (integers, text, bytes, identifiers) visit what the general
    /// path visits: same values, same failures, including for mismatched kinds.
    #[test]
    fn fast_paths_agree_with_ciborium() {
        for x in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
        ] {
            let i = x as i64;
            let ints = (
                x as u8, x as u16, x as u32, x, i as i8, i as i16, i as i32, -i,
            );
            let (a, b, c, d, e, f, g, h) = ints;
            agree::<Ints>(&cbor(&Ints {
                a,
                b,
                c,
                d,
                e,
                f,
                g,
                h,
            }));
            agree::<(u8, u16, u32, u64, i8, i16, i32, i64)>(&cbor(&ints));
            // Out of range or negative where unsigned is expected: both refuse.
            agree::<u8>(&cbor(&x));
            agree::<u32>(&cbor(&-(i + 1)));
            agree::<i64>(&cbor(&u64::MAX));
        }
        for name in [
            "",
            "a",
            "seq",
            "sixteen-chars-ok",
            "seventeen-chars-x",
            "é",
            "日本語",
        ] {
            let mut map = BTreeMap::new();
            map.insert(name.to_string(), name.repeat(3));
            let t = Texts {
                name: name.to_string(),
                raw: name.as_bytes().to_vec(),
                long: 'ß',
                map,
            };
            agree::<Texts>(&cbor(&t));
            agree::<String>(&cbor(&name));
            agree::<serde_bytes::ByteBuf>(&cbor(&serde_bytes::Bytes::new(name.as_bytes())));
            // (Bytes where text is expected and the other way round are accepted here
            // when the visitor takes them, unlike ciborium: that is the general path's
            // behaviour, which the fast paths fall back to for any other kind.)
        }
        // Not UTF-8, short and long.
        agree::<String>(&[0x62, 0xC3, 0x28]);
        agree::<String>(&[
            0x78, 0x12, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        // Indefinite-length text and bytes take the general path.
        agree::<String>(&[0x7F, 0x61, b'a', 0x61, b'b', 0xFF]);
        agree::<serde_bytes::ByteBuf>(&[0x5F, 0x41, 1, 0x41, 2, 0xFF]);
        for e in [E::Unit, E::New(-7), E::Rec { x: 3 }] {
            agree::<E>(&cbor(&e));
        }
        // Truncated input: both fail.
        let whole = cbor(&Ints {
            a: 1,
            b: 300,
            c: 70_000,
            d: 1 << 40,
            e: -1,
            f: -300,
            g: -70_000,
            h: -(1 << 40),
        });
        for n in 0..whole.len() {
            agree::<Ints>(&whole[..n]);
        }
    }
}
