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
            let [vm, open, at_ms] = crate::drain::decode_u64s::<WORDS>(chunk);
            Record { vm, open, at_ms }
        })
        .collect()
}

pub fn encode(records: &[Record]) -> Vec<u8> {
    let words: Vec<u64> = records.iter().flat_map(|r| [r.vm, r.open, r.at_ms]).collect();
    crate::drain::encode_u64s(&words)
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
mod tests {
    use super::*;

    const STALE: u64 = 1_000;

    #[test]
    fn each_vm_keeps_one_record_and_stale_ones_drop_out() {
        let r = |vm, open, at_ms| Record { vm, open, at_ms };
        let records = publish(&[], r(1, 3, 10_000), STALE);
        let records = publish(&records, r(2, 1, 10_050), STALE);
        let records = publish(&records, r(1, 2, 10_100), STALE);
        assert_eq!(decode(&encode(&records)), records);
        assert_eq!(records.len(), 2, "one record per VM: {records:?}");
        assert_eq!(pod_wide(&records, 10_000, 10_150, STALE), Some(3));
        assert_eq!(pod_wide(&records, 10_060, 10_150, STALE), None, "VM 2 has not counted since the hook began");
        let later = publish(&records, r(1, 0, 11_200), STALE);
        assert_eq!(later, vec![r(1, 0, 11_200)], "VM 2 stopped ticking: its record is gone");
        assert_eq!(pod_wide(&records, 10_000, 12_000, STALE), Some(0), "stale records count for nothing");
    }

    #[test]
    fn the_record_list_is_bounded_and_tolerates_garbage() {
        let mut records = Vec::new();
        for vm in 0..200u64 {
            records = publish(&records, Record { vm, open: 1, at_ms: 5_000 + vm }, STALE);
        }
        assert_eq!(records.len(), CAPACITY);
        assert_eq!(records[0].vm, 199, "the newest are kept");
        assert_eq!(decode(b"short"), Vec::new());
        assert_eq!(pod_wide(&[], 0, 0, STALE), Some(0));
    }
}
