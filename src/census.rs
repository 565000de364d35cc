//! How many client connections the pod has open, counted by the network role itself: it sees
//! every connection open and close, HTTP/1 or HTTP/2, on every worker. A default istio-proxy
//! keeps no stat that says so (`docs/istio.md`). The kubelet's preStop hook waits on this count.
//!
//! Each network VM publishes its own count on its tick, as one record in shared data
//! ([`crate::keys::CENSUS`]); the pod-wide count is the sum of the records still fresh. A VM that
//! stops ticking (replaced by a config update, or trapped) stops refreshing its record, so its
//! connections drop out of the count after [`STALE_TICKS`] ticks instead of holding a hook until
//! `max_wait_ms`. Pure codecs and sums here; the publishing is in `root.rs`.

/// One network VM's count: who, how many, when (ms since the epoch, its tick clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub vm: u64,
    pub open: u64,
    pub at_ms: u64,
}

/// Records kept at most: a pod has a VM per worker per VM key, and a few more while a config
/// update replaces them.
pub const CAPACITY: usize = 64;

/// A record not refreshed for this many ticks belongs to a VM that is gone.
pub const STALE_TICKS: u64 = 10;

const WORDS: usize = 3;

pub fn decode(bytes: &[u8]) -> Vec<Record> {
    bytes
        .chunks_exact(8 * WORDS)
        .map(|chunk| {
            let [vm, open, at_ms] = crate::codec::decode_u64s::<WORDS>(chunk);
            Record { vm, open, at_ms }
        })
        .collect()
}

pub fn encode(records: &[Record]) -> Vec<u8> {
    let words: Vec<u64> = records.iter().flat_map(|r| [r.vm, r.open, r.at_ms]).collect();
    crate::codec::encode_u64s(&words)
}

/// The records with `mine` put in place of this VM's old one, stale ones dropped, the newest
/// [`CAPACITY`] kept.
pub fn publish(records: &[Record], mine: Record, stale_ms: u64) -> Vec<Record> {
    let mut out: Vec<Record> = records
        .iter()
        .filter(|r| r.vm != mine.vm && mine.at_ms.saturating_sub(r.at_ms) < stale_ms)
        .copied()
        .collect();
    out.push(mine);
    out.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
    out.truncate(CAPACITY);
    out
}

/// The pod's client connections as counted no earlier than `since_ms`: `None` while a fresh
/// record is older than that (its VM has not counted since; its next tick will).
pub fn pod_wide(records: &[Record], since_ms: u64, now_ms: u64, stale_ms: u64) -> Option<u64> {
    let fresh = records.iter().filter(|r| now_ms.saturating_sub(r.at_ms) < stale_ms);
    let mut sum = 0u64;
    for r in fresh {
        if r.at_ms < since_ms {
            return None;
        }
        sum = sum.saturating_add(r.open);
    }
    Some(sum)
}

#[cfg(test)]
#[path = "census_tests.rs"]
mod tests;
