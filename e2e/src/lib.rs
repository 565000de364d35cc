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
pub mod grpc;
pub mod h2c;
pub mod haproxy;
pub mod istio;
pub mod oci;
pub mod origin;
pub mod pool;
pub mod nginx;
pub mod ports;
pub mod process;
pub mod rescue;
pub mod rollout;
pub mod servers;
pub mod sidecar;
pub mod soak;
pub mod wasm;

/// The byte at offset `i` of the app's `/big-close` body.
pub fn pattern_byte(i: usize) -> u8 {
    b"0123456789abcdefghijklmnopqrstuvwxyz"[i % 36]
}

/// Runs `each(worker, item)` for every item on `workers` threads, each taking the next item as
/// it frees up; the results in the order they finished. A worker's panic is the caller's.
pub fn on_workers<T: Sync, R: Send>(items: &[T], workers: usize, each: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let running: Vec<_> = (0..workers.max(1))
            .map(|worker| {
                let (next, each) = (&next, &each);
                s.spawn(move || {
                    let mut done = Vec::new();
                    while let Some(item) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        done.push(each(worker, item));
                    }
                    done
                })
            })
            .collect();
        running.into_iter().flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub use ports::Port;

/// The kubelet's address on the rig: the node's IP (`HOST_IP`) every Envoy's VMs are given.
/// Other pods connect from other loopback addresses ([`NEIGHBOUR_IP`]).
pub const KUBELET_IP: &str = "127.0.0.1";
pub const NEIGHBOUR_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);
pub use app::*;
pub use client::*;
pub use envoy::*;
pub use process::*;
