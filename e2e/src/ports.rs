//! The one place test ports come from.
//!
//! Binding port 0, dropping the socket and handing the number on races: between the drop and
//! the server's bind, anything else (a test thread, another clone's `make test`, the kernel's
//! choice of a source port for an outgoing connection) can take it. A [`Port`] instead is a
//! lease that can not be handed out twice while it is held:
//! - ports come from a band below the kernel's ephemeral range
//!   (`/proc/sys/net/ipv4/ip_local_port_range`), so no port-0 bind and no outgoing connection
//!   on this machine is ever given one;
//! - each port has a lock file in one directory for the whole machine, locked (`flock`) for as
//!   long as the lease lives, so two threads, two test binaries or two clones never share one;
//! - a port some other program already listens on fails the bind check and is passed over.
//!
//! The lease is held for the life of the server that serves the port, restarts included: an
//! app killed and started again on its port keeps it reserved in between.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::PathBuf;

/// The lowest port handed out: above the well-known and most registered service ports.
const BAND_START: u16 = 12_000;
/// Ports tried before giving up: a full band is never this busy on a test machine.
const MAX_TRIES: usize = 4_096;

/// A port reserved for one server on 127.0.0.1 until dropped.
#[derive(Debug)]
pub struct Port {
    number: u16,
    _lock: Option<File>,
}

impl Port {
    /// A free port, reserved until the lease drops.
    pub fn lease() -> Port {
        let (lo, hi) = band();
        let span = u32::from(hi - lo) + 1;
        let dir = lock_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let start = random() % span;
        for i in 0..MAX_TRIES as u32 {
            let Ok(number) = u16::try_from(u32::from(lo) + (start + i) % span) else { continue };
            let Ok(lock) = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(number.to_string()))
            else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue; // leased by another thread, test binary or clone
            }
            // Held by something outside this allocator (the bind sets SO_REUSEADDR, as every
            // server in the suite does, so connections left in TIME_WAIT do not count).
            if TcpListener::bind(("127.0.0.1", number)).is_err() {
                continue;
            }
            return Port { number, _lock: Some(lock) };
        }
        panic!("no free port in 127.0.0.1:{lo}-{hi} after {MAX_TRIES} tries");
    }

    /// A port named by a shipped configuration (the demo's 8080, 9901, 10000): not reserved,
    /// so only for programs a person runs, never in a test.
    pub fn fixed(number: u16) -> Port {
        Port { number, _lock: None }
    }

    pub fn get(&self) -> u16 {
        self.number
    }
}

/// Shared by every clone and every test binary on the machine.
fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("close-relay-ports")
}

/// From [`BAND_START`] to just below the ephemeral range.
fn band() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low > BAND_START + 1_000,
        "ephemeral ports start at {ephemeral_low}: no room below them for test ports"
    );
    (BAND_START, ephemeral_low - 1)
}

fn random() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_while_held_and_below_the_ephemeral_range() {
        let (lo, hi) = band();
        let leases: Vec<Port> = (0..64).map(|_| Port::lease()).collect();
        let mut numbers: Vec<u16> = leases.iter().map(Port::get).collect();
        assert!(numbers.iter().all(|n| (lo..=hi).contains(n)), "{numbers:?}");
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), leases.len(), "a port was leased twice");
    }

    #[test]
    fn a_held_port_is_not_leased_again_from_another_thread() {
        let held = Port::lease();
        let others: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| (0..32).map(|_| Port::lease().get()).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        assert!(!others.contains(&held.get()));
    }

    #[test]
    fn a_port_someone_listens_on_is_passed_over() {
        let lease = Port::lease();
        let number = lease.get();
        let listener = TcpListener::bind(("127.0.0.1", number)).expect("bind leased port");
        drop(lease); // the lock is free now, but the port is not
        let again: Vec<Port> = (0..256).map(|_| Port::lease()).collect();
        assert!(again.iter().all(|p| p.get() != number));
        drop(listener);
    }
}
