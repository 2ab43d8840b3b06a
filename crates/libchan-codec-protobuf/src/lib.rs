//! The Protocol Buffers codec of libchan (handshake name `"protobuf"`), for messages
//! defined in `.proto` files and compiled with [prost].
//!
//! A message on a channel is a [`Proto<M>`]: a prost message `M` plus the channel ends,
//! byte streams and descriptors it carries. The payload on the wire is exactly `M`'s
//! protobuf encoding, so any protobuf library reads it. A field of one of the well-known
//! types of `libchan.proto` ([`LIBCHAN_PROTO`], mirrored by the [`wkt`] module) stands for
//! an entry of the message's reference table:
//!
//! ```protobuf
//! syntax = "proto3";
//! import "libchan.proto";
//! message Job {
//!   string command = 1;
//!   libchan.Sender reply = 2;     // where the worker sends its Result
//!   repeated libchan.ByteStream inputs = 3;
//! }
//! ```
//!
//! Put a channel end in with [`Proto::put_sender`] (and `put_receiver`, `put_byte_stream`,
//! `put_fd`), which returns the field value; take it out, typed, with
//! [`Proto::take_sender`] and its siblings:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), libchan_core::Error> {
//! use libchan_codec_protobuf::{wkt, Proto};
//!
//! // What prost generates for the `Job` above (normally `include!`d from OUT_DIR).
//! #[derive(Clone, PartialEq, prost::Message)]
//! pub struct Job {
//!     #[prost(string, tag = "1")]
//!     pub command: String,
//!     #[prost(message, optional, tag = "2")]
//!     pub reply: Option<wkt::Sender>,
//! }
//! #[derive(Clone, PartialEq, prost::Message)]
//! pub struct Done {
//!     #[prost(int32, tag = "1")]
//!     pub status: i32,
//! }
//!
//! let (client, server) = libchan_core::Session::mem_pair();
//! let jobs = client.open::<Proto<Job>>().await?;
//! let (reply_tx, mut reply_rx) = libchan_core::channel::<Proto<Done>>(1);
//!
//! let mut job = Proto::new(Job { command: "true".into(), reply: None });
//! job.message.reply = Some(job.put_sender(reply_tx));
//! jobs.send(job).await.map_err(|e| e.error)?;
//!
//! let mut incoming = server.accept::<Proto<Job>>().await?.expect("a channel");
//! let mut job = incoming.recv().await?.expect("a job");
//! let reply = job.take_sender::<Proto<Done>>(job.message.reply)?;
//! reply.send(Proto::new(Done { status: 0 })).await.map_err(|e| e.error)?;
//!
//! assert_eq!(reply_rx.recv().await?.expect("a reply").message.status, 0);
//! # Ok(()) }
//! ```
//!
//! The session's codec must be [`Protobuf`] (`Config::new(Protobuf)`) for the payload to be
//! plain protobuf; under another codec a `Proto<M>` still works, as a two-element array of
//! the protobuf bytes and the references. The protobuf codec carries nothing but
//! `Proto<M>` messages: sending any other type is an [`ErrorKind::Encode`] error.
//!
//! Decoding is prost's, which is total and allocates no more than the input's size; the
//! reference table is checked by libchan as for every codec (kinds, each entry claimed at
//! most once), so user data cannot create or steal a stream: a `wkt` field only names an
//! entry the table already has, and [`Proto::take_sender`] checks the entry's kind.
//!
//! To compile `.proto` files that import `libchan.proto`, enable the `build` feature and
//! call `build::compile_protos` (feature `build`) from a build script: pure Rust, no
//! `protoc`.

use std::any::Any;
use std::fmt;

use libchan_core::erased_serde;
use libchan_core::{Attachment, ByteStream, Codec, Error, ErrorKind, Fd, Message};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{self, Serialize, SerializeSeq, SerializeTuple, Serializer};

#[cfg(feature = "build")]
pub mod build;

/// The text of `libchan.proto`, the well-known messages for references.
pub const LIBCHAN_PROTO: &str = include_str!("../proto/libchan.proto");

/// The serde newtype name under which a [`Proto`] meets its codec.
const PROTO_NAME: &str = "$libchan_protobuf";
/// The serde newtype name of a reference marker of this codec.
const REF_NAME: &str = "$libchan_protobuf_ref";

/// The well-known messages of `libchan.proto` (package `libchan`), as prost types.
///
/// Generated code refers to them through `extern_path(".libchan", "::libchan_codec_protobuf::wkt")`,
/// which `build::compile_protos` (feature `build`) sets up.
pub mod wkt {
    /// `libchan.Sender`: a channel end the receiver of the message sends on.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct Sender {
        /// Position among the message's references.
        #[prost(uint32, tag = "1")]
        pub index: u32,
    }

    /// `libchan.Receiver`: a channel end the receiver of the message receives from.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct Receiver {
        /// Position among the message's references.
        #[prost(uint32, tag = "1")]
        pub index: u32,
    }

    /// `libchan.ByteStream`: a bidirectional byte stream.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct ByteStream {
        /// Position among the message's references.
        #[prost(uint32, tag = "1")]
        pub index: u32,
    }

    /// `libchan.Fd`: a file descriptor (or, where it cannot be passed, its contents as a
    /// byte stream).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct Fd {
        /// Position among the message's references.
        #[prost(uint32, tag = "1")]
        pub index: u32,
    }
}

// ---- the codec ---------------------------------------------------------------------------

/// The Protocol Buffers codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Protobuf;

impl Codec for Protobuf {
    fn name(&self) -> &str {
        "protobuf"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), Error> {
        erased_serde::serialize(value, Outer { out })
            .map_err(|e| Error::new(ErrorKind::Encode, format!("protobuf: {e}")))
    }

    fn decode(
        &self,
        input: &[u8],
        visit: &mut dyn FnMut(
            &mut dyn erased_serde::Deserializer<'_>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), Error> {
        visit(&mut <dyn erased_serde::Deserializer>::erase(PayloadDe {
            input,
        }))
        .map_err(|e| Error::new(ErrorKind::Decode, format!("protobuf: {e}")))
    }

    fn ref_marker(&self, index: u32) -> Box<dyn erased_serde::Serialize> {
        Box::new(RefMarker(index))
    }

    fn read_ref(
        &self,
        _d: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<u32, erased_serde::Error> {
        Err(de::Error::custom(
            "the protobuf codec carries references as fields of the libchan.* messages of a Proto<M>, not as serde values",
        ))
    }
}

struct RefMarker(u32);

impl Serialize for RefMarker {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(REF_NAME, &self.0)
    }
}

/// The error of the codec's serde adapters: serde's own message-carrying error.
type CodecError = serde::de::value::Error;

fn codec_error(message: impl fmt::Display) -> CodecError {
    de::Error::custom(message)
}

fn only_proto<T>(what: &str) -> Result<T, CodecError> {
    Err(codec_error(format!(
        "the protobuf codec carries libchan_codec_protobuf::Proto<M> messages only, not a {what}"
    )))
}

/// Rejects every serde method but the ones a `Proto` uses.
macro_rules! reject {
    ($($method:ident($($arg:ty),*) => $what:literal;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<Self::Ok, CodecError> { only_proto($what) })*
    };
}

macro_rules! reject_compound {
    () => {
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, CodecError> {
            only_proto("tuple struct")
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, CodecError> {
            only_proto("enum")
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, CodecError> {
            only_proto("map")
        }
        fn serialize_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStruct, CodecError> {
            only_proto("struct")
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, CodecError> {
            only_proto("enum")
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<Self::Ok, CodecError> {
            only_proto("enum")
        }
        fn serialize_newtype_variant<T: ?Sized + Serialize>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<Self::Ok, CodecError> {
            only_proto("enum")
        }
        fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<Self::Ok, CodecError> {
            only_proto("option")
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<Self::Ok, CodecError> {
            only_proto("unit struct")
        }
        reject! {
            serialize_bool(bool) => "bool";
            serialize_i8(i8) => "integer";
            serialize_i16(i16) => "integer";
            serialize_i32(i32) => "integer";
            serialize_i64(i64) => "integer";
            serialize_u8(u8) => "integer";
            serialize_u16(u16) => "integer";
            serialize_u64(u64) => "integer";
            serialize_f32(f32) => "float";
            serialize_f64(f64) => "float";
            serialize_char(char) => "char";
            serialize_str(&str) => "string";
            serialize_none() => "option";
            serialize_unit() => "unit";
        }
    };
}

/// The serializer a whole message meets: accepts `newtype(PROTO_NAME, (bytes, [refs]))`.
struct Outer<'a> {
    out: &'a mut Vec<u8>,
}

type Never = ser::Impossible<(), CodecError>;

impl<'a> Serializer for Outer<'a> {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Never;
    type SerializeTuple = Body<'a>;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Never;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Never;

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        if name == PROTO_NAME {
            value.serialize(self)
        } else {
            only_proto("newtype struct")
        }
    }

    fn serialize_tuple(self, len: usize) -> Result<Body<'a>, CodecError> {
        if len != 2 {
            return only_proto("tuple");
        }
        Ok(Body {
            out: self.out,
            element: 0,
        })
    }

    fn serialize_bytes(self, _: &[u8]) -> Result<(), CodecError> {
        only_proto("byte string")
    }

    fn serialize_u32(self, _: u32) -> Result<(), CodecError> {
        only_proto("integer")
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Never, CodecError> {
        only_proto("sequence")
    }

    reject_compound!();
}

/// The two elements of a `Proto` body: the payload bytes, then the references.
struct Body<'a> {
    out: &'a mut Vec<u8>,
    element: u8,
}

impl SerializeTuple for Body<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), CodecError> {
        let e = self.element;
        self.element += 1;
        match e {
            0 => value.serialize(Payload { out: self.out }),
            1 => value.serialize(Refs),
            _ => only_proto("tuple"),
        }
    }

    fn end(self) -> Result<(), CodecError> {
        Ok(())
    }
}

/// Writes the protobuf bytes as the whole payload.
struct Payload<'a> {
    out: &'a mut Vec<u8>,
}

impl Serializer for Payload<'_> {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Never;
    type SerializeTuple = Never;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Never;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Never;

    fn serialize_bytes(self, v: &[u8]) -> Result<(), CodecError> {
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), CodecError> {
        only_proto("newtype struct")
    }
    fn serialize_tuple(self, _: usize) -> Result<Never, CodecError> {
        only_proto("tuple")
    }
    fn serialize_u32(self, _: u32) -> Result<(), CodecError> {
        only_proto("integer")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Never, CodecError> {
        only_proto("sequence")
    }
    reject_compound!();
}

/// Accepts the sequence of reference markers; the reference table itself is written by
/// libchan outside the payload, so nothing goes into the payload here.
struct Refs;

impl Serializer for Refs {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Self;
    type SerializeTuple = Never;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Never;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Never;

    fn serialize_seq(self, _: Option<usize>) -> Result<Self, CodecError> {
        Ok(Refs)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        if name == REF_NAME {
            value.serialize(self)
        } else {
            only_proto("newtype struct")
        }
    }
    fn serialize_u32(self, _: u32) -> Result<(), CodecError> {
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), CodecError> {
        only_proto("byte string")
    }
    fn serialize_tuple(self, _: usize) -> Result<Never, CodecError> {
        only_proto("tuple")
    }
    reject_compound!();
}

impl SerializeSeq for Refs {
    type Ok = ();
    type Error = CodecError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), CodecError> {
        value.serialize(Refs)
    }
    fn end(self) -> Result<(), CodecError> {
        Ok(())
    }
}

/// The deserializer over a payload: yields `newtype(PROTO_NAME, (bytes, unit))`, the unit
/// saying that the references are the whole reference table.
struct PayloadDe<'a> {
    input: &'a [u8],
}

impl<'de> Deserializer<'de> for PayloadDe<'de> {
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, CodecError> {
        Err(codec_error(
            "a protobuf payload can only be received as a libchan_codec_protobuf::Proto<M>"
                .to_owned(),
        ))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        if name == PROTO_NAME {
            visitor.visit_newtype_struct(self)
        } else {
            self.deserialize_any(visitor)
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        if len != 2 {
            return self.deserialize_any(visitor);
        }
        visitor.visit_seq(BodyAccess {
            input: self.input,
            element: 0,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple_struct
        map struct enum identifier ignored_any
    }
}

struct BodyAccess<'a> {
    input: &'a [u8],
    element: u8,
}

impl<'de> SeqAccess<'de> for BodyAccess<'de> {
    type Error = CodecError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        let e = self.element;
        self.element = self.element.saturating_add(1);
        match e {
            0 => seed
                .deserialize(de::value::BorrowedBytesDeserializer::new(self.input))
                .map(Some),
            1 => seed
                .deserialize(de::value::UnitDeserializer::new())
                .map(Some),
            _ => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(2usize.saturating_sub(self.element as usize))
    }
}

// ---- Proto<M> ------------------------------------------------------------------------------

/// A reference to put in an outgoing message: a typed channel end, byte stream or fd.
trait Outgoing: erased_serde::Serialize + Send {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: Serialize + Send + 'static> Outgoing for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

enum Slot {
    /// Put in by this process (also what a message moved through an in-memory session
    /// holds).
    Out(Box<dyn Outgoing>),
    /// Received over a connection, not typed yet.
    In(Attachment),
    /// Taken out.
    Taken,
}

/// A prost message with the channel ends, byte streams and descriptors it carries.
///
/// See the [crate docs](crate) for an example. `Proto<M>` is a libchan [`Message`]: use it
/// as the type of a channel (`Sender<Proto<Job>>`).
pub struct Proto<M> {
    /// The protobuf message. Its `libchan.*` fields name entries of the references.
    pub message: M,
    refs: Vec<Slot>,
}

impl<M: fmt::Debug> fmt::Debug for Proto<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proto")
            .field("message", &self.message)
            .field("references", &self.refs.len())
            .finish()
    }
}

impl<M> Proto<M> {
    /// A message without references (yet).
    pub fn new(message: M) -> Self {
        Proto {
            message,
            refs: Vec::new(),
        }
    }

    /// How many references the message carries (taken ones included).
    pub fn references(&self) -> usize {
        self.refs.len()
    }

    fn put(&mut self, value: Box<dyn Outgoing>) -> u32 {
        let index = self.refs.len() as u32;
        self.refs.push(Slot::Out(value));
        index
    }

    /// Adds a Sender; returns the value for a `libchan.Sender` field.
    pub fn put_sender<T: Message>(&mut self, tx: libchan_core::Sender<T>) -> wkt::Sender {
        wkt::Sender {
            index: self.put(Box::new(tx)),
        }
    }

    /// Adds a Receiver; returns the value for a `libchan.Receiver` field.
    pub fn put_receiver<T: Message>(&mut self, rx: libchan_core::Receiver<T>) -> wkt::Receiver {
        wkt::Receiver {
            index: self.put(Box::new(rx)),
        }
    }

    /// Adds a byte stream; returns the value for a `libchan.ByteStream` field.
    pub fn put_byte_stream(&mut self, stream: ByteStream) -> wkt::ByteStream {
        wkt::ByteStream {
            index: self.put(Box::new(stream)),
        }
    }

    /// Adds a descriptor; returns the value for a `libchan.Fd` field.
    pub fn put_fd(&mut self, fd: Fd) -> wkt::Fd {
        wkt::Fd {
            index: self.put(Box::new(fd)),
        }
    }

    fn take<R: 'static>(
        &mut self,
        index: Option<u32>,
        what: &str,
        wire: impl FnOnce(Attachment) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let Some(index) = index else {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("the message has no {what} in this field"),
            ));
        };
        let count = self.refs.len();
        let slot = self.refs.get_mut(index as usize).ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("{what} field names reference {index}, but the message has {count}"),
            )
        })?;
        match std::mem::replace(slot, Slot::Taken) {
            Slot::In(a) => wire(a),
            Slot::Out(b) => b.into_any().downcast::<R>().map(|b| *b).map_err(|_| {
                Error::new(
                    ErrorKind::Decode,
                    format!("reference {index} is not a {what} of this type"),
                )
            }),
            Slot::Taken => Err(Error::new(
                ErrorKind::Decode,
                format!("reference {index} was already taken"),
            )),
        }
    }

    /// Takes the Sender a `libchan.Sender` field names. A
    /// [`Decode`](ErrorKind::Decode) error if the field is absent, names no reference,
    /// names one already taken or one of another kind.
    pub fn take_sender<T: Message>(
        &mut self,
        field: impl Into<Option<wkt::Sender>>,
    ) -> Result<libchan_core::Sender<T>, Error> {
        let index = field.into().map(|f| f.index);
        self.take(index, "Sender", Attachment::into_sender::<T>)
    }

    /// Takes the Receiver a `libchan.Receiver` field names (errors as for
    /// [`take_sender`](Proto::take_sender)).
    pub fn take_receiver<T: Message>(
        &mut self,
        field: impl Into<Option<wkt::Receiver>>,
    ) -> Result<libchan_core::Receiver<T>, Error> {
        let index = field.into().map(|f| f.index);
        self.take(index, "Receiver", Attachment::into_receiver::<T>)
    }

    /// Takes the byte stream a `libchan.ByteStream` field names.
    pub fn take_byte_stream(
        &mut self,
        field: impl Into<Option<wkt::ByteStream>>,
    ) -> Result<ByteStream, Error> {
        let index = field.into().map(|f| f.index);
        self.take(index, "ByteStream", Attachment::into_byte_stream)
    }

    /// Takes the descriptor a `libchan.Fd` field names.
    pub fn take_fd(&mut self, field: impl Into<Option<wkt::Fd>>) -> Result<Fd, Error> {
        let index = field.into().map(|f| f.index);
        self.take(index, "Fd", Attachment::into_fd)
    }
}

struct OutRefs<'a>(&'a [Slot]);

impl Serialize for OutRefs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (i, slot) in self.0.iter().enumerate() {
            match slot {
                Slot::Out(v) => seq.serialize_element(&**v as &dyn erased_serde::Serialize)?,
                Slot::In(_) => {
                    return Err(ser::Error::custom(format!(
                        "reference {i} was received and not taken: take it (typed) before sending the message on"
                    )))
                }
                Slot::Taken => {
                    return Err(ser::Error::custom(format!(
                        "reference {i} was taken out of this message"
                    )))
                }
            }
        }
        seq.end()
    }
}

impl<M: prost::Message> Serialize for Proto<M> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Body<'a, M>(&'a Proto<M>);
        impl<M: prost::Message> Serialize for Body<'_, M> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let bytes = self.0.message.encode_to_vec();
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(&Bytes(&bytes))?;
                t.serialize_element(&OutRefs(&self.0.refs))?;
                t.end()
            }
        }
        s.serialize_newtype_struct(PROTO_NAME, &Body(self))
    }
}

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de, M: prost::Message + Default> serde::Deserialize<'de> for Proto<M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Outer<M>(std::marker::PhantomData<M>);
        impl<'de, M: prost::Message + Default> Visitor<'de> for Outer<M> {
            type Value = Proto<M>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a libchan protobuf message")
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Proto<M>, D::Error> {
                d.deserialize_tuple(2, self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Proto<M>, A::Error> {
                let message = seq
                    .next_element_seed(DecodeSeed::<M>(std::marker::PhantomData))?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let refs: InRefs = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                Ok(Proto {
                    message,
                    refs: refs.0.into_iter().map(Slot::In).collect(),
                })
            }
        }
        d.deserialize_newtype_struct(PROTO_NAME, Outer(std::marker::PhantomData))
    }
}

/// Decodes the protobuf bytes straight from the codec's input (no copy where the codec
/// lends its input).
struct DecodeSeed<M>(std::marker::PhantomData<M>);

impl<'de, M: prost::Message + Default> DeserializeSeed<'de> for DecodeSeed<M> {
    type Value = M;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<M, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de, M: prost::Message + Default> Visitor<'de> for DecodeSeed<M> {
    type Value = M;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("protobuf bytes")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<M, E> {
        M::decode(v).map_err(|e| E::custom(format!("protobuf: {e}")))
    }
}

/// The references: under the protobuf codec the unit (meaning "the whole reference
/// table"), under other codecs a sequence of reference markers.
struct InRefs(Vec<Attachment>);

impl<'de> serde::Deserialize<'de> for InRefs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InRefs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("libchan references")
            }
            fn visit_unit<E: de::Error>(self) -> Result<InRefs, E> {
                match Attachment::claim_all() {
                    Ok(refs) => Ok(InRefs(refs)),
                    // Decoded outside a libchan receive (a captured payload, a test):
                    // there is no reference table, so no references.
                    Err(e) if e.kind() == ErrorKind::Closed => Ok(InRefs(Vec::new())),
                    Err(e) => Err(E::custom(e)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InRefs, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<Attachment>()? {
                    out.push(a);
                }
                Ok(InRefs(out))
            }
        }
        d.deserialize_any(V)
    }
}
