//! A serde serializer that appends CBOR to a `Vec<u8>`.
//!
//! Written for libchan's send path: it writes heads and contents straight into the
//! message buffer, and handles blob splices and ciborium's tag types (libchan's reference
//! tag is written through one) itself. Its output is
//! byte for byte what ciborium 0.2 writes for the same value (minimal-length heads,
//! definite lengths where serde knows them, floats in the shortest of half, single and
//! double precision that keeps the value, integers beyond 64 bits as bignums, ciborium's
//! tag types), so peers cannot tell the two apart; the tests compare both on a corpus.

use serde::ser::{self, Serialize};

use super::CborError;

const TAG_BIGPOS: u64 = 2;
const TAG_BIGNEG: u64 = 3;

/// How ciborium's tag types (`ciborium::tag::Required` and friends) present themselves
/// to a serializer: a tuple variant of this enum and variant names whose first field is
/// the tag, or a newtype variant for an untagged value.
const TAG_ENUM: &str = "@@TAG@@";
const TAGGED: &str = "@@TAGGED@@";
const UNTAGGED: &str = "@@UNTAGGED@@";

type Result<T> = std::result::Result<T, CborError>;

/// The serializer: the output buffer and whether offered blobs may be spliced.
pub(crate) struct Ser<'a> {
    out: &'a mut Vec<u8>,
    splice: bool,
}

impl<'a> Ser<'a> {
    /// A serializer appending to `out`; with `splice`, a byte string that a
    /// [`Blob`](crate::Blob) offered is recorded as a splice instead of copied.
    pub(crate) fn new(out: &'a mut Vec<u8>, splice: bool) -> Self {
        Ser { out, splice }
    }

    /// One head: major type and argument, in its shortest form. A one-byte head (small
    /// integers, short strings and collections: most heads of a message) is written
    /// inline, the others in [`Ser::head_long`].
    #[inline(always)]
    fn head(&mut self, major: u8, v: u64) {
        if v < 24 {
            self.out.push((major << 5) | v as u8);
        } else {
            self.head_long(major, v);
        }
    }

    /// [`Ser::head`] for an argument of 24 or more.
    #[inline(never)]
    fn head_long(&mut self, major: u8, v: u64) {
        let m = major << 5;
        if v <= u64::from(u8::MAX) {
            self.out.extend_from_slice(&[m | 24, v as u8]);
        } else if v <= u64::from(u16::MAX) {
            let b = (v as u16).to_be_bytes();
            self.out.extend_from_slice(&[m | 25, b[0], b[1]]);
        } else if v <= u64::from(u32::MAX) {
            self.out.push(m | 26);
            self.out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            self.out.push(m | 27);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// The head of a collection: definite length, or indefinite (`None`).
    #[inline]
    fn collection(&mut self, major: u8, len: Option<usize>) {
        match len {
            Some(n) => self.head(major, n as u64),
            None => self.out.push((major << 5) | 31),
        }
    }

    /// A bignum (tag 2 or 3) of a magnitude above `u64::MAX`.
    fn bignum(&mut self, tag: u64, v: u128) {
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        self.head(6, tag);
        self.head(2, (bytes.len() - skip) as u64);
        self.out.extend_from_slice(&bytes[skip..]);
    }

    #[inline]
    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// True if `data` is an offered blob, now recorded as a splice at the current offset.
    #[cold]
    fn spliced(&mut self, data: &[u8]) -> bool {
        let at = self.out.len();
        crate::session::with_encode(|ctx| ctx.take_offer(data, at)) == Some(true)
    }
}

/// A collection being written; `indefinite` ones end with a break.
pub(crate) struct Collection<'s, 'a> {
    ser: &'s mut Ser<'a>,
    indefinite: bool,
    /// A ciborium tag: the first field is the tag number.
    tag: bool,
}

impl Collection<'_, '_> {
    fn finish(self) {
        if self.indefinite {
            self.ser.out.push(0xFF);
        }
    }
}

impl<'s, 'a> ser::Serializer for &'s mut Ser<'a> {
    type Ok = ();
    type Error = CborError;
    type SerializeSeq = Collection<'s, 'a>;
    type SerializeTuple = Collection<'s, 'a>;
    type SerializeTupleStruct = Collection<'s, 'a>;
    type SerializeTupleVariant = Collection<'s, 'a>;
    type SerializeMap = Collection<'s, 'a>;
    type SerializeStruct = Collection<'s, 'a>;
    type SerializeStructVariant = Collection<'s, 'a>;

    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out.push(if v { 0xF5 } else { 0xF4 });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<()> {
        self.serialize_i64(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result<()> {
        self.serialize_i64(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result<()> {
        if v < 0 {
            self.head(1, !(v as u64));
        } else {
            self.head(0, v as u64);
        }
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result<()> {
        if v < 0 {
            let m = !(v as u128);
            match u64::try_from(m) {
                Ok(m) => self.head(1, m),
                Err(_) => self.bignum(TAG_BIGNEG, m),
            }
        } else {
            match u64::try_from(v) {
                Ok(v) => self.head(0, v),
                Err(_) => self.bignum(TAG_BIGPOS, v as u128),
            }
        }
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result<()> {
        self.serialize_u64(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<()> {
        self.serialize_u64(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<()> {
        self.serialize_u64(v.into())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result<()> {
        self.head(0, v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result<()> {
        match u64::try_from(v) {
            Ok(v) => self.head(0, v),
            Err(_) => self.bignum(TAG_BIGPOS, v),
        }
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<()> {
        self.serialize_f64(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result<()> {
        // The shortest precision that keeps the value, exactly as ciborium picks it (its
        // half-precision conversion included): rare enough on the hot path to borrow.
        ciborium::ser::into_writer(&v, &mut *self.out).map_err(|e| CborError(e.to_string()))
    }

    fn serialize_char(self, v: char) -> Result<()> {
        self.text(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<()> {
        self.text(v);
        Ok(())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        self.head(2, v.len() as u64);
        if self.splice && v.len() >= crate::blob::SPLICE_MIN && self.spliced(v) {
            return Ok(());
        }
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_none(self) -> Result<()> {
        self.out.push(0xF6);
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<()> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<()> {
        self.serialize_none()
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<()> {
        self.serialize_none()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<()> {
        self.text(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<()> {
        if name != TAG_ENUM || variant != UNTAGGED {
            self.head(5, 1);
            self.text(variant);
        }
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Collection<'s, 'a>> {
        self.collection(4, len);
        Ok(Collection {
            ser: self,
            indefinite: len.is_none(),
            tag: false,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Collection<'s, 'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Collection<'s, 'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Collection<'s, 'a>> {
        if name == TAG_ENUM && variant == TAGGED {
            return Ok(Collection {
                ser: self,
                indefinite: false,
                tag: true,
            });
        }
        self.head(5, 1);
        self.text(variant);
        self.head(4, len as u64);
        Ok(Collection {
            ser: self,
            indefinite: false,
            tag: false,
        })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Collection<'s, 'a>> {
        self.collection(5, len);
        Ok(Collection {
            ser: self,
            indefinite: len.is_none(),
            tag: false,
        })
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Collection<'s, 'a>> {
        self.head(5, len as u64);
        Ok(Collection {
            ser: self,
            indefinite: false,
            tag: false,
        })
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Collection<'s, 'a>> {
        self.head(5, 1);
        self.text(variant);
        self.head(5, len as u64);
        Ok(Collection {
            ser: self,
            indefinite: false,
            tag: false,
        })
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The collection traits whose items are written one after the other.
macro_rules! items {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Collection<'_, '_> {
            type Ok = ();
            type Error = CborError;

            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
                value.serialize(&mut *self.ser)
            }

            fn end(self) -> Result<()> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

items!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field
);

impl ser::SerializeTupleVariant for Collection<'_, '_> {
    type Ok = ();
    type Error = CborError;

    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        if self.tag {
            self.tag = false;
            let tag = value
                .serialize(TagNumber)
                .map_err(|_| CborError("expected tag".into()))?;
            self.ser.head(6, tag);
            return Ok(());
        }
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<()> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeMap for Collection<'_, '_> {
    type Ok = ();
    type Error = CborError;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<()> {
        key.serialize(&mut *self.ser)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        value.serialize(&mut *self.ser)
    }

    fn end(self) -> Result<()> {
        self.finish();
        Ok(())
    }
}

/// The collection traits whose items are fields: name, then value.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Collection<'_, '_> {
            type Ok = ();
            type Error = CborError;

            #[inline]
            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<()> {
                self.ser.text(key);
                value.serialize(&mut *self.ser)
            }

            fn end(self) -> Result<()> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

/// Methods of [`TagNumber`] for every other kind of value: not a tag number.
macro_rules! not_tags {
    ($($method:ident($ty:ty)),*) => {$(
        fn $method(self, _: $ty) -> Result<u64> {
            Err(not_tag())
        }
    )*};
}

/// Reads the tag number of a ciborium tag type: an unsigned integer, nothing else.
struct TagNumber;

impl ser::Serializer for TagNumber {
    type Ok = u64;
    type Error = CborError;
    type SerializeSeq = ser::Impossible<u64, CborError>;
    type SerializeTuple = ser::Impossible<u64, CborError>;
    type SerializeTupleStruct = ser::Impossible<u64, CborError>;
    type SerializeTupleVariant = ser::Impossible<u64, CborError>;
    type SerializeMap = ser::Impossible<u64, CborError>;
    type SerializeStruct = ser::Impossible<u64, CborError>;
    type SerializeStructVariant = ser::Impossible<u64, CborError>;

    fn serialize_u8(self, v: u8) -> Result<u64> {
        Ok(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<u64> {
        Ok(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<u64> {
        Ok(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<u64> {
        Ok(v)
    }
    not_tags!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str)
    );

    fn serialize_none(self) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_unit(self) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<u64> {
        Err(not_tag())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(not_tag())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple> {
        Err(not_tag())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(not_tag())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(not_tag())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap> {
        Err(not_tag())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct> {
        Err(not_tag())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(not_tag())
    }
}

fn not_tag() -> CborError {
    CborError("expected tag".into())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ciborium::tag::{Accepted, Captured, Required};
    use ciborium::value::Value;
    use serde::Serialize;

    /// Ours and ciborium's encodings of `v`, which must be equal.
    fn same<T: Serialize + ?Sized + std::fmt::Debug>(v: &T) {
        let mut ours = vec![0xAB]; // appends: what was there stays
        v.serialize(&mut super::Ser::new(&mut ours, false))
            .expect("ours encodes");
        let mut theirs = vec![0xAB];
        ciborium::ser::into_writer(v, &mut theirs).expect("ciborium encodes");
        assert_eq!(ours, theirs, "encoding of {v:?}");
    }

    #[derive(Serialize, Debug)]
    struct Unit;
    #[derive(Serialize, Debug)]
    struct Newtype(u32);
    #[derive(Serialize, Debug)]
    struct Tuple(i8, String);
    #[derive(Serialize, Debug)]
    struct Fields {
        a: u64,
        #[serde(with = "serde_bytes")]
        b: Vec<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        c: Option<bool>,
        d: Vec<Option<char>>,
        e: BTreeMap<String, f64>,
    }
    #[derive(Serialize, Debug)]
    struct Flattened {
        x: u8,
        #[serde(flatten)]
        rest: BTreeMap<String, u8>,
    }
    #[derive(Serialize, Debug)]
    enum E {
        U,
        N(i64),
        T(u8, u8),
        S { f: String },
    }

    #[test]
    fn integers_at_every_head_length() {
        for v in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u32::MAX.into(),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            same(&v);
            same(&(v as u128));
        }
        for v in [
            -1i64,
            -24,
            -25,
            -256,
            -257,
            -65_536,
            -65_537,
            i64::from(i32::MIN),
            i64::MIN,
        ] {
            same(&v);
            same(&(v as i128));
        }
        for v in [u128::MAX, u128::from(u64::MAX) + 1, 1 << 100] {
            same(&v);
        }
        for v in [i128::MIN, i128::MAX, -(1i128 << 64) - 1, -(1i128 << 64)] {
            same(&v);
        }
        same(&(7u8, -7i8, 300u16, -300i16, 70_000u32, -70_000i32));
    }

    #[test]
    fn floats_in_their_shortest_exact_precision() {
        for v in [
            0.0f64,
            -0.0,
            1.5,
            65_504.0,
            65_505.0,
            1e-8,
            5.960_464_477_539_063e-8,
            0.1,
            1e300,
            f64::from(f32::MAX),
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            same(&v);
            same(&(v as f32));
        }
    }

    #[test]
    fn strings_bytes_and_simple_values() {
        for n in [0usize, 23, 24, 255, 256, 70_000] {
            same(&"é".repeat(n / 2 + n % 2));
            same(&serde_bytes::ByteBuf::from(vec![9u8; n]));
        }
        same(&'x');
        same(&'€');
        same(&true);
        same(&false);
        same(&());
        same(&None::<u8>);
        same(&Some(3u8));
    }

    #[test]
    fn structs_enums_and_collections() {
        same(&Unit);
        same(&Newtype(1 << 20));
        same(&Tuple(-3, "t".into()));
        let mut e = BTreeMap::new();
        e.insert("pi".to_string(), 3.25);
        e.insert("big".to_string(), 1e40);
        same(&Fields {
            a: 1 << 40,
            b: vec![1, 2, 3],
            c: None,
            d: vec![Some('a'), None],
            e,
        });
        let mut rest = BTreeMap::new();
        rest.insert("y".to_string(), 2);
        same(&Flattened { x: 1, rest });
        same(&vec![E::U, E::N(-5), E::T(1, 2), E::S { f: "g".into() }]);
        let mut m = std::collections::HashMap::new();
        m.insert(1u8, vec![(); 3]);
        same(&m);
    }

    /// Lengths serde does not know up front: indefinite-length array and map.
    #[test]
    fn collections_of_unknown_length() {
        struct Iters;
        impl Serialize for Iters {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(&Seq)?;
                t.serialize_element(&Map)?;
                t.end()
            }
        }
        struct Seq;
        impl Serialize for Seq {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq((0u16..300).filter(|i| i % 7 == 0))
            }
        }
        struct Map;
        impl Serialize for Map {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map((0u8..10).filter(|i| i % 3 == 0).map(|i| (i, "v")))
            }
        }
        impl std::fmt::Debug for Iters {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Iters")
            }
        }
        same(&Iters);
    }

    #[test]
    fn ciborium_tags() {
        same(&Required::<u32, { super::super::REF_TAG }>(0));
        same(&Required::<u32, { super::super::REF_TAG }>(70_000));
        same(&Captured(Some(55_799), "self-described".to_string()));
        same(&Captured(None, 4u8));
        same(&Accepted::<u8, 1>(9));
        same(&Value::Tag(0, Box::new(Value::Text("2026-11-27".into()))));
    }

    /// Random value trees (a fixed seed): every kind of item, nested.
    #[test]
    fn random_values() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        fn tree(next: &mut dyn FnMut() -> u64, depth: u32) -> Value {
            let r = next();
            match r % if depth > 3 { 6 } else { 9 } {
                0 => Value::Integer((r >> 8).into()),
                1 => Value::Integer((-((r >> 9) as i64)).into()),
                2 => Value::Bytes(vec![r as u8; (r >> 16) as usize % 300]),
                3 => Value::Text("ab".repeat((r >> 16) as usize % 40)),
                4 => Value::Float(f64::from_bits(r)),
                5 => Value::Bool(r & 256 != 0),
                6 => Value::Array((0..r % 5).map(|_| tree(next, depth + 1)).collect()),
                7 => Value::Map(
                    (0..r % 4)
                        .map(|_| (tree(next, depth + 1), tree(next, depth + 1)))
                        .collect(),
                ),
                _ => Value::Tag(r >> 20, Box::new(tree(next, depth + 1))),
            }
        }
        for _ in 0..2000 {
            same(&tree(&mut next, 0));
        }
    }
}
