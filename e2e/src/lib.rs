//! Test harness: real Envoy, the real `.wasm`, the real app binary, raw sockets, all on
//! 127.0.0.1. Every process started here is killed by PID when its guard drops, also when a
//! test fails. By what it drives: `process` (guards, waits, scratch dirs), `app` (the rig's
//! app), `envoy` (binaries, configurations, the running Envoy), `client` (a raw HTTP/1.1
//! client); the scenario rigs are `rollout`, `servers`, `soak` and `istio`.

use std::path::{Path, PathBuf};

pub mod app;
pub mod client;
pub mod compare;
pub mod corpus;
pub mod envoy;
pub mod istio;
pub mod oci;
pub mod origin;
pub mod ports;
pub mod process;
pub mod rescue;
pub mod rollout;
pub mod servers;
pub mod soak;
pub mod wasm;

/// The byte at offset `i` of the app's `/big-close` body.
pub fn pattern_byte(i: usize) -> u8 {
    b"0123456789abcdefghijklmnopqrstuvwxyz"[i % 36]
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub use ports::Port;
pub use app::*;
pub use client::*;
pub use envoy::*;
pub use process::*;
