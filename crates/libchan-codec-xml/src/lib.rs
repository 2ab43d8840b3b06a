//! The XML codec of libchan (handshake name `"xml"`): the serde data model as
//! self-describing XML 1.0, for peers and tools that speak XML.
//!
//! Every value is one element whose name says its type, so a payload can be read without
//! its Rust type, byte strings and top-level scalars round-trip, and a reference cannot be
//! confused with data (docs/PROTOCOL.md §9 is the normative description):
//!
//! | serde value | XML |
//! |---|---|
//! | `bool` | `<bool>true</bool>` |
//! | integers | `<int>-42</int>` |
//! | floats | `<float>1.5</float>` (`NaN`, `inf`, `-inf`) |
//! | `char`, string | `<str>a &lt; b</str>`; with characters XML 1.0 cannot carry, `<str encoding="base64">…</str>` |
//! | bytes | `<bytes>bGliY2hhbg==</bytes>` (standard base64) |
//! | `None` / `Some(v)` | `<none/>` / `v` |
//! | unit, unit struct | `<unit/>` |
//! | newtype struct | its value |
//! | sequence, tuple | `<seq>…</seq>` |
//! | map | `<map>k1 v1 k2 v2…</map>` (keys and values alternate) |
//! | struct | `<struct><field name="id">v</field>…</struct>` |
//! | enum variant | `<variant name="V">v</variant>` with `v` `<unit/>`, the value, a `<seq>` or a `<struct>` |
//! | **reference** | `<ref>3</ref>` |
//!
//! User strings are always text inside `<str>` (escaped), so no user value produces a
//! `<ref>` element; a `<ref>` is read only where the receiving type holds a channel end,
//! byte stream or descriptor, and the reference table outside the payload says which
//! entries exist. Decoding is total and bounded: at most 128 levels of nesting, no DTDs,
//! comments or processing instructions (an error, so no entity expansion), no allocation
//! beyond the input's size.
//!
//! ```
//! use libchan_codec_xml::Xml;
//! use libchan_core::Codec;
//! let mut out = Vec::new();
//! Xml.encode(&(7u8, "a<b"), &mut out).unwrap();
//! assert_eq!(out, b"<seq><int>7</int><str>a&lt;b</str></seq>");
//! out.clear();
//! Xml.encode(&*Xml.ref_marker(3), &mut out).unwrap();
//! assert_eq!(out, b"<ref>3</ref>");
//! ```

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use libchan_core::erased_serde;
use libchan_core::{Codec, Error, ErrorKind};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize, Serializer};

/// Maximum nesting depth of a payload.
pub const MAX_DEPTH: usize = 128;

/// The serde newtype name of a reference marker.
const REF_NAME: &str = "$libchan_xml_ref";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The XML codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Xml;

impl Codec for Xml {
    fn name(&self) -> &str {
        "xml"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error> {
        erased_serde::serialize(value, &mut Writer { out, in_ref: false })
            .map_err(|e| Error::new(ErrorKind::Encode, format!("xml: {e}")))
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error> {
        let mut de = XmlDe::new(input);
        visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de))
            .map_err(|e| Error::new(ErrorKind::Decode, format!("xml: {e}")))?;
        de.end()
            .map_err(|e| Error::new(ErrorKind::Decode, format!("xml: {e}")))
    }

    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> {
        Box::new(RefMarker(index))
    }

    fn read_ref(
        &self,
        d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u32;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a <ref> element")
            }
            fn visit_u32<E: de::Error>(self, v: u32) -> Result<u32, E> {
                Ok(v)
            }
        }
        Deserializer::deserialize_newtype_struct(d, REF_NAME, V)
    }
}

struct RefMarker(u32);

impl Serialize for RefMarker {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(REF_NAME, &self.0)
    }
}

// ---- errors --------------------------------------------------------------------------------

/// The error of the codec's serde adapters: serde's own message-carrying error.
type XmlError = serde::de::value::Error;

fn xml_error(message: impl fmt::Display) -> XmlError {
    de::Error::custom(message)
}

// ---- writing -------------------------------------------------------------------------------

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    /// Inside a reference marker: its integer is written bare, as `<ref>`'s text.
    in_ref: bool,
}

/// True for characters XML 1.0 cannot carry, not even as a character reference.
fn unrepresentable(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}')
}

impl Writer<'_> {
    fn leaf(&mut self, tag: &str, text: &str) {
        self.out.push(b'<');
        self.out.extend_from_slice(tag.as_bytes());
        self.out.push(b'>');
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"</");
        self.out.extend_from_slice(tag.as_bytes());
        self.out.push(b'>');
    }

    fn escaped(&mut self, s: &str) {
        for c in s.chars() {
            match c {
                '<' => self.out.extend_from_slice(b"&lt;"),
                '>' => self.out.extend_from_slice(b"&gt;"),
                '&' => self.out.extend_from_slice(b"&amp;"),
                '"' => self.out.extend_from_slice(b"&quot;"),
                '\r' => self.out.extend_from_slice(b"&#13;"),
                c => {
                    let mut b = [0; 4];
                    self.out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
    }

    fn string(&mut self, s: &str) {
        if s.chars().any(unrepresentable) {
            self.out.extend_from_slice(b"<str encoding=\"base64\">");
            let mut enc = String::new();
            B64.encode_string(s.as_bytes(), &mut enc);
            self.out.extend_from_slice(enc.as_bytes());
        } else {
            self.out.extend_from_slice(b"<str>");
            self.escaped(s);
        }
        self.out.extend_from_slice(b"</str>");
    }

    fn open(&mut self, tag: &str) {
        self.out.push(b'<');
        self.out.extend_from_slice(tag.as_bytes());
        self.out.push(b'>');
    }

    fn open_named(&mut self, tag: &str, name: &str) {
        self.out.push(b'<');
        self.out.extend_from_slice(tag.as_bytes());
        self.out.extend_from_slice(b" name=\"");
        self.escaped(name);
        self.out.extend_from_slice(b"\">");
    }

    fn close(&mut self, tag: &str) {
        self.out.extend_from_slice(b"</");
        self.out.extend_from_slice(tag.as_bytes());
        self.out.push(b'>');
    }

    fn float(&mut self, v: f64) {
        let text = if v.is_nan() {
            "NaN".to_owned()
        } else if v.is_infinite() {
            if v > 0.0 { "inf" } else { "-inf" }.to_owned()
        } else {
            v.to_string()
        };
        self.leaf("float", &text);
    }
}

type R = Result<(), XmlError>;

impl<'a, 'o> Serializer for &'a mut Writer<'o> {
    type Ok = ();
    type Error = XmlError;
    type SerializeSeq = Compound<'a, 'o>;
    type SerializeTuple = Compound<'a, 'o>;
    type SerializeTupleStruct = Compound<'a, 'o>;
    type SerializeTupleVariant = Compound<'a, 'o>;
    type SerializeMap = Compound<'a, 'o>;
    type SerializeStruct = Compound<'a, 'o>;
    type SerializeStructVariant = Compound<'a, 'o>;

    fn serialize_bool(self, v: bool) -> R {
        self.leaf("bool", if v { "true" } else { "false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> R {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> R {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> R {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> R {
        self.leaf("int", &v.to_string());
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> R {
        self.leaf("int", &v.to_string());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> R {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> R {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> R {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> R {
        if self.in_ref {
            self.out.extend_from_slice(v.to_string().as_bytes());
        } else {
            self.leaf("int", &v.to_string());
        }
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> R {
        self.leaf("int", &v.to_string());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> R {
        self.float(v.into());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> R {
        self.float(v);
        Ok(())
    }
    fn serialize_char(self, v: char) -> R {
        self.string(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> R {
        self.string(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> R {
        self.open("bytes");
        let mut enc = String::with_capacity(v.len() / 3 * 4 + 4);
        B64.encode_string(v, &mut enc);
        self.out.extend_from_slice(enc.as_bytes());
        self.close("bytes");
        Ok(())
    }
    fn serialize_none(self) -> R {
        self.out.extend_from_slice(b"<none/>");
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> R {
        v.serialize(self)
    }
    fn serialize_unit(self) -> R {
        self.out.extend_from_slice(b"<unit/>");
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> R {
        self.open_named("variant", variant);
        self.out.extend_from_slice(b"<unit/>");
        self.close("variant");
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, name: &'static str, v: &T) -> R {
        if name == REF_NAME {
            // Only this codec's own marker uses the name; it holds a u32.
            self.open("ref");
            self.in_ref = true;
            let r = v.serialize(&mut *self);
            self.in_ref = false;
            r?;
            self.close("ref");
            return Ok(());
        }
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> R {
        self.open_named("variant", variant);
        v.serialize(&mut *self)?;
        self.close("variant");
        Ok(())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a, 'o>, XmlError> {
        self.open("seq");
        Ok(Compound {
            w: self,
            close: &["seq"],
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Compound<'a, 'o>, XmlError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        len: usize,
    ) -> Result<Compound<'a, 'o>, XmlError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a, 'o>, XmlError> {
        self.open_named("variant", variant);
        self.open("seq");
        Ok(Compound {
            w: self,
            close: &["seq", "variant"],
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a, 'o>, XmlError> {
        self.open("map");
        Ok(Compound {
            w: self,
            close: &["map"],
        })
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a, 'o>, XmlError> {
        self.open("struct");
        Ok(Compound {
            w: self,
            close: &["struct"],
        })
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a, 'o>, XmlError> {
        self.open_named("variant", variant);
        self.open("struct");
        Ok(Compound {
            w: self,
            close: &["struct", "variant"],
        })
    }
}

struct Compound<'a, 'o> {
    w: &'a mut Writer<'o>,
    close: &'static [&'static str],
}

impl Compound<'_, '_> {
    fn finish(self) -> R {
        for t in self.close {
            self.w.close(t);
        }
        Ok(())
    }
}

/// Sequences, tuples and their struct and variant forms: each element is a value.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = XmlError;
            fn $method<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
                v.serialize(&mut *self.w)
            }
            fn end(self) -> R {
                self.finish()
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = XmlError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> R {
        k.serialize(&mut *self.w)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
        v.serialize(&mut *self.w)
    }
    fn end(self) -> R {
        self.finish()
    }
}

impl ser::SerializeStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = XmlError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, v: &T) -> R {
        self.w.open_named("field", key);
        v.serialize(&mut *self.w)?;
        self.w.close("field");
        Ok(())
    }
    fn end(self) -> R {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = XmlError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, v: &T) -> R {
        ser::SerializeStruct::serialize_field(self, key, v)
    }
    fn end(self) -> R {
        self.finish()
    }
}

// ---- reading -------------------------------------------------------------------------------

/// An element start as the deserializer sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tag {
    Bool,
    Int,
    Float,
    Str,
    Bytes,
    None,
    Unit,
    Seq,
    Map,
    Struct,
    Field,
    Variant,
    Ref,
}

impl Tag {
    fn parse(name: &[u8]) -> Option<Tag> {
        Some(match name {
            b"bool" => Tag::Bool,
            b"int" => Tag::Int,
            b"float" => Tag::Float,
            b"str" => Tag::Str,
            b"bytes" => Tag::Bytes,
            b"none" => Tag::None,
            b"unit" => Tag::Unit,
            b"seq" => Tag::Seq,
            b"map" => Tag::Map,
            b"struct" => Tag::Struct,
            b"field" => Tag::Field,
            b"variant" => Tag::Variant,
            b"ref" => Tag::Ref,
            _ => return None,
        })
    }
}

/// One element start: its tag, whether it is empty (`<x/>`), its `name` attribute and
/// whether it is a base64 string.
struct Head<'de> {
    tag: Tag,
    empty: bool,
    name: Option<Cow<'de, str>>,
    base64: bool,
}

struct XmlDe<'de> {
    reader: Reader<&'de [u8]>,
    peeked: Option<Event<'de>>,
    depth: usize,
}

fn err<T>(msg: impl Into<String>) -> Result<T, XmlError> {
    Err(xml_error(msg.into()))
}

impl<'de> XmlDe<'de> {
    fn new(input: &'de [u8]) -> Self {
        let mut reader = Reader::from_reader(input);
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        config.expand_empty_elements = false;
        XmlDe {
            reader,
            peeked: None,
            depth: 0,
        }
    }

    fn pos(&self) -> u64 {
        self.reader.buffer_position()
    }

    fn raw_event(&mut self) -> Result<Event<'de>, XmlError> {
        if let Some(e) = self.peeked.take() {
            return Ok(e);
        }
        self.reader
            .read_event()
            .map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))
    }

    /// The next event that is not whitespace between elements.
    fn event(&mut self) -> Result<Event<'de>, XmlError> {
        loop {
            let e = self.raw_event()?;
            match &e {
                Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => continue,
                Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                    return err(format!(
                        "at byte {}: comments, declarations, processing instructions and DTDs are not allowed",
                        self.pos()
                    ))
                }
                _ => return Ok(e),
            }
        }
    }

    fn peek(&mut self) -> Result<&Event<'de>, XmlError> {
        if self.peeked.is_none() {
            let e = self.event()?;
            self.peeked = Some(e);
        }
        match &self.peeked {
            Some(e) => Ok(e),
            None => err("no event"),
        }
    }

    /// True if the next event closes the current element.
    fn at_end(&mut self) -> Result<bool, XmlError> {
        Ok(matches!(self.peek()?, Event::End(_) | Event::Eof))
    }

    fn head(&mut self, start: &BytesStart<'de>, empty: bool) -> Result<Head<'de>, XmlError> {
        let tag = Tag::parse(start.name().as_ref()).ok_or_else(|| {
            xml_error(format!(
                "at byte {}: unknown element <{}>",
                self.pos(),
                String::from_utf8_lossy(start.name().as_ref())
            ))
        })?;
        let mut name = None;
        let mut base64 = false;
        for a in start.attributes() {
            let a = a.map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))?;
            match a.key.as_ref() {
                b"name" if matches!(tag, Tag::Field | Tag::Variant) => {
                    let v = a
                        .unescape_value()
                        .map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))?;
                    name = Some(Cow::Owned(v.into_owned()));
                }
                b"encoding" if tag == Tag::Str && a.value.as_ref() == b"base64" => base64 = true,
                other => {
                    return err(format!(
                        "at byte {}: unexpected attribute {} on <{}>",
                        self.pos(),
                        String::from_utf8_lossy(other),
                        String::from_utf8_lossy(start.name().as_ref())
                    ))
                }
            }
        }
        if matches!(tag, Tag::Field | Tag::Variant) && name.is_none() {
            return err(format!(
                "at byte {}: <field> and <variant> need a name",
                self.pos()
            ));
        }
        Ok(Head {
            tag,
            empty,
            name,
            base64,
        })
    }

    /// Reads the start of the next element (entering it, for a non-empty one).
    fn open(&mut self) -> Result<Head<'de>, XmlError> {
        match self.event()? {
            Event::Start(s) => {
                if self.depth >= MAX_DEPTH {
                    return err(format!(
                        "nesting deeper than the limit of {MAX_DEPTH} levels"
                    ));
                }
                self.depth += 1;
                self.head(&s, false)
            }
            Event::Empty(s) => self.head(&s, true),
            Event::Eof => err("unexpected end of input"),
            Event::End(_) => err(format!("at byte {}: expected a value", self.pos())),
            _ => err(format!(
                "at byte {}: text outside a value element",
                self.pos()
            )),
        }
    }

    /// Reads the end tag of the current element.
    fn close(&mut self, head: &Head<'de>) -> Result<(), XmlError> {
        if head.empty {
            return Ok(());
        }
        match self.event()? {
            Event::End(_) => {
                self.depth -= 1;
                Ok(())
            }
            _ => err(format!(
                "at byte {}: expected the end of <{:?}>",
                self.pos(),
                head.tag
            )),
        }
    }

    /// The text content of a leaf element (entities resolved), then its end tag.
    fn text(&mut self, head: &Head<'de>) -> Result<Cow<'de, str>, XmlError> {
        if head.empty {
            return Ok(Cow::Borrowed(""));
        }
        let mut out: Option<Cow<'de, str>> = None;
        loop {
            match self.raw_event()? {
                Event::Text(t) => {
                    let s = t
                        .decode()
                        .map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))?;
                    append(&mut out, s);
                }
                Event::CData(c) => {
                    let s = c
                        .decode()
                        .map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))?;
                    append(&mut out, s);
                }
                Event::GeneralRef(r) => {
                    let c = if r.is_char_ref() {
                        r.resolve_char_ref()
                            .map_err(|e| xml_error(format!("at byte {}: {e}", self.pos())))?
                    } else {
                        match r.as_ref() {
                            b"lt" => Some('<'),
                            b"gt" => Some('>'),
                            b"amp" => Some('&'),
                            b"quot" => Some('"'),
                            b"apos" => Some('\''),
                            _ => None,
                        }
                    };
                    let Some(c) = c else {
                        return err(format!("at byte {}: unknown entity", self.pos()));
                    };
                    append(&mut out, Cow::Owned(c.to_string()));
                }
                Event::End(_) => {
                    self.depth -= 1;
                    return Ok(out.unwrap_or(Cow::Borrowed("")));
                }
                _ => {
                    return err(format!(
                        "at byte {}: <{:?}> holds text only",
                        self.pos(),
                        head.tag
                    ))
                }
            }
        }
    }

    fn string(&mut self, head: &Head<'de>) -> Result<Cow<'de, str>, XmlError> {
        let t = self.text(head)?;
        if !head.base64 {
            return Ok(t);
        }
        let bytes = B64
            .decode(t.as_bytes())
            .map_err(|e| xml_error(format!("at byte {}: base64 string: {e}", self.pos())))?;
        String::from_utf8(bytes).map(Cow::Owned).map_err(|_| {
            xml_error(format!(
                "at byte {}: base64 string is not UTF-8",
                self.pos()
            ))
        })
    }

    fn end(&mut self) -> Result<(), XmlError> {
        match self.event()? {
            Event::Eof => Ok(()),
            _ => err(format!(
                "at byte {}: trailing data after the value",
                self.pos()
            )),
        }
    }

    fn expect(&mut self, tag: Tag) -> Result<Head<'de>, XmlError> {
        let h = self.open()?;
        if h.tag != tag {
            return err(format!(
                "at byte {}: expected <{tag:?}>, found <{:?}>",
                self.pos(),
                h.tag
            ));
        }
        Ok(h)
    }
}

fn append<'de>(out: &mut Option<Cow<'de, str>>, s: Cow<'de, str>) {
    match out {
        None => *out = Some(s),
        Some(o) => o.to_mut().push_str(&s),
    }
}

fn parse_int<'de, V: Visitor<'de>>(text: &str, v: V) -> Result<V::Value, XmlError> {
    if let Ok(u) = text.parse::<u64>() {
        return v.visit_u64(u);
    }
    if let Ok(i) = text.parse::<i64>() {
        return v.visit_i64(i);
    }
    if let Ok(u) = text.parse::<u128>() {
        return v.visit_u128(u);
    }
    if let Ok(i) = text.parse::<i128>() {
        return v.visit_i128(i);
    }
    err(format!("not an integer: {:?}", truncate(text)))
}

fn parse_float(text: &str) -> Result<f64, XmlError> {
    match text {
        "NaN" => Ok(f64::NAN),
        "inf" => Ok(f64::INFINITY),
        "-inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse::<f64>()
            .map_err(|_| xml_error(format!("not a float: {:?}", truncate(t)))),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl<'de> Deserializer<'de> for &mut XmlDe<'de> {
    type Error = XmlError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, XmlError> {
        let head = self.open()?;
        self.value(head, v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, XmlError> {
        if let Event::Empty(s) = self.peek()? {
            if s.name().as_ref() == b"none" {
                self.peeked = None;
                return v.visit_none();
            }
        }
        v.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, XmlError> {
        if name == REF_NAME {
            let head = self.expect(Tag::Ref)?;
            let t = self.text(&head)?;
            let i = t
                .parse::<u32>()
                .map_err(|_| xml_error(format!("bad reference index {:?}", truncate(&t))))?;
            return v.visit_u32(i);
        }
        v.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, XmlError> {
        self.deserialize_any(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, XmlError> {
        self.deserialize_any(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

impl<'de> XmlDe<'de> {
    fn value<V: Visitor<'de>>(&mut self, head: Head<'de>, v: V) -> Result<V::Value, XmlError> {
        match head.tag {
            Tag::Bool => match &*self.text(&head)? {
                "true" => v.visit_bool(true),
                "false" => v.visit_bool(false),
                t => err(format!("not a bool: {:?}", truncate(t))),
            },
            Tag::Int => {
                let t = self.text(&head)?;
                parse_int(&t, v)
            }
            Tag::Float => {
                let t = self.text(&head)?;
                v.visit_f64(parse_float(&t)?)
            }
            Tag::Str => match self.string(&head)? {
                Cow::Borrowed(s) => v.visit_borrowed_str(s),
                Cow::Owned(s) => v.visit_string(s),
            },
            Tag::Bytes => {
                let t = self.text(&head)?;
                let b = B64
                    .decode(t.as_bytes())
                    .map_err(|e| xml_error(format!("at byte {}: bytes: {e}", self.pos())))?;
                v.visit_byte_buf(b)
            }
            Tag::None => {
                self.close_leaf(&head)?;
                v.visit_none()
            }
            Tag::Unit => {
                self.close_leaf(&head)?;
                v.visit_unit()
            }
            Tag::Seq => {
                let out = v.visit_seq(Children {
                    de: self,
                    empty: head.empty,
                })?;
                self.finish_container(&head)?;
                Ok(out)
            }
            Tag::Map => {
                let out = v.visit_map(Children {
                    de: self,
                    empty: head.empty,
                })?;
                self.finish_container(&head)?;
                Ok(out)
            }
            Tag::Struct => {
                let out = v.visit_map(Fields {
                    de: self,
                    empty: head.empty,
                    field: None,
                })?;
                self.finish_container(&head)?;
                Ok(out)
            }
            Tag::Variant => {
                if head.empty {
                    return err(format!("at byte {}: <variant> needs a value", self.pos()));
                }
                let name = head.name.clone().unwrap_or(Cow::Borrowed(""));
                let out = v.visit_enum(VariantAccess { de: self, name })?;
                self.close(&head)?;
                Ok(out)
            }
            Tag::Ref => err(format!(
                "at byte {}: a reference where the receiving type expects data",
                self.pos()
            )),
            Tag::Field => err(format!(
                "at byte {}: <field> outside a <struct>",
                self.pos()
            )),
        }
    }

    fn close_leaf(&mut self, head: &Head<'de>) -> Result<(), XmlError> {
        if head.empty {
            return Ok(());
        }
        self.close(head)
    }

    /// After a visitor is done with a container: it must have read every child.
    fn finish_container(&mut self, head: &Head<'de>) -> Result<(), XmlError> {
        if head.empty {
            return Ok(());
        }
        if !self.at_end()? {
            return err(format!(
                "at byte {}: more elements in <{:?}> than the type reads",
                self.pos(),
                head.tag
            ));
        }
        self.close(head)
    }
}

struct Children<'a, 'de> {
    de: &'a mut XmlDe<'de>,
    empty: bool,
}

impl<'de> de::SeqAccess<'de> for Children<'_, 'de> {
    type Error = XmlError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, XmlError> {
        if self.empty || self.de.at_end()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }
}

impl<'de> de::MapAccess<'de> for Children<'_, 'de> {
    type Error = XmlError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, XmlError> {
        if self.empty || self.de.at_end()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, XmlError> {
        if self.de.at_end()? {
            return err(format!(
                "at byte {}: a map key without a value",
                self.de.pos()
            ));
        }
        seed.deserialize(&mut *self.de)
    }
}

struct Fields<'a, 'de> {
    de: &'a mut XmlDe<'de>,
    empty: bool,
    field: Option<Head<'de>>,
}

impl<'de> de::MapAccess<'de> for Fields<'_, 'de> {
    type Error = XmlError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, XmlError> {
        if self.empty || self.de.at_end()? {
            return Ok(None);
        }
        let head = self.de.expect(Tag::Field)?;
        if head.empty {
            return err(format!("at byte {}: <field> needs a value", self.de.pos()));
        }
        let name = head.name.clone().unwrap_or(Cow::Borrowed(""));
        self.field = Some(head);
        match name {
            Cow::Borrowed(s) => seed
                .deserialize(de::value::BorrowedStrDeserializer::new(s))
                .map(Some),
            Cow::Owned(s) => seed.deserialize(s.into_deserializer()).map(Some),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, XmlError> {
        let Some(head) = self.field.take() else {
            return err("a struct value without its field");
        };
        let out = seed.deserialize(&mut *self.de)?;
        self.de.close(&head)?;
        Ok(out)
    }
}

struct VariantAccess<'a, 'de> {
    de: &'a mut XmlDe<'de>,
    name: Cow<'de, str>,
}

impl<'a, 'de> de::EnumAccess<'de> for VariantAccess<'a, 'de> {
    type Error = XmlError;
    type Variant = Self;
    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self), XmlError> {
        let v = match &self.name {
            Cow::Borrowed(s) => seed.deserialize(de::value::BorrowedStrDeserializer::new(s))?,
            Cow::Owned(s) => seed.deserialize(s.as_str().into_deserializer())?,
        };
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for VariantAccess<'_, 'de> {
    type Error = XmlError;
    fn unit_variant(self) -> Result<(), XmlError> {
        let head = self.de.expect(Tag::Unit)?;
        self.de.close_leaf(&head)
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, XmlError> {
        seed.deserialize(&mut *self.de)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, XmlError> {
        let head = self.de.expect(Tag::Seq)?;
        self.de.value(head, v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, XmlError> {
        let head = self.de.expect(Tag::Struct)?;
        self.de.value(head, v)
    }
}
