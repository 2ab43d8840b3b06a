//! Messages compiled from `proto/jobs.proto` by `build.rs` with
//! `libchan_codec_protobuf::build::compile_protos` (pure Rust, no `protoc`).
//!
//! ```
//! use libchan_protobuf_example::jobs::{Done, Job};
//! use prost::Message;
//! let job = Job { command: "ls".into(), ..Default::default() };
//! assert_eq!(Job::decode(job.encode_to_vec().as_slice()).unwrap(), job);
//! assert_eq!(Done::default().status, 0);
//! ```

/// The `jobs` protobuf package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod jobs {
    include!(concat!(env!("OUT_DIR"), "/jobs.rs"));
}
