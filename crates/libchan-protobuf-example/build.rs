//! Compiles proto/jobs.proto, which imports libchan.proto, without protoc.

fn main() -> std::io::Result<()> {
    libchan_codec_protobuf::build::compile_protos(&["proto/jobs.proto"], &["proto"])
}
