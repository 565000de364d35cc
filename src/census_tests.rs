//! Unit tests of `src/census.rs`.

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
