//! Compiling `.proto` files that use the well-known libchan messages, from a build script.
//!
//! ```no_run
//! // build.rs of a crate with `libchan-codec-protobuf = { features = ["build"] }` in
//! // [build-dependencies] and `prost` in [dependencies]:
//! fn main() -> std::io::Result<()> {
//!     libchan_codec_protobuf::build::compile_protos(&["proto/jobs.proto"], &["proto"])
//! }
//! // src/lib.rs: include!(concat!(env!("OUT_DIR"), "/jobs.rs"));
//! ```
//!
//! `.proto` files `import "libchan.proto";` and use `libchan.Sender`, `libchan.Receiver`,
//! `libchan.ByteStream` and `libchan.Fd` as field types; the generated Rust code refers to
//! [`wkt`](crate::wkt) for them. Compilation is pure Rust ([protox] parses, [prost_build]
//! generates): no `protoc` binary is needed on any machine.

use std::io;
use std::path::{Path, PathBuf};

/// Compiles `protos` (searching imports in `includes`, plus `libchan.proto`, which this
/// function provides) into Rust files in `OUT_DIR`, one per protobuf package.
pub fn compile_protos(
    protos: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
) -> io::Result<()> {
    compile_with(prost_build::Config::new(), protos, includes)
}

/// As [`compile_protos`], with a prost-build configuration of your own (derives, type
/// attributes, output directory...). The `extern_path` for package `libchan` is added.
pub fn compile_with(
    mut config: prost_build::Config,
    protos: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
) -> io::Result<()> {
    let out = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("OUT_DIR is not set: call this from a build script"))?;
    let include = out.join("libchan-proto-include");
    std::fs::create_dir_all(&include)?;
    let wkt = include.join("libchan.proto");
    if std::fs::read_to_string(&wkt).ok().as_deref() != Some(crate::LIBCHAN_PROTO) {
        std::fs::write(&wkt, crate::LIBCHAN_PROTO)?;
    }
    let mut dirs: Vec<PathBuf> = includes.iter().map(|p| p.as_ref().to_path_buf()).collect();
    dirs.push(include);
    let files: Vec<PathBuf> = protos.iter().map(|p| p.as_ref().to_path_buf()).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, &dirs).map_err(|e| io::Error::other(e.to_string()))?;
    config.extern_path(".libchan", "::libchan_codec_protobuf::wkt");
    config.compile_fds(fds)
}
