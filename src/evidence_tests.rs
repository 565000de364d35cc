//! Unit tests of `src/evidence.rs`.

use super::*;

#[test]
fn failures_count_in_a_row_until_the_app_answers() {
    let mut s = Streak::default();
    assert_eq!(s.failed(1_000, 2_000, 7), 1, "one reset: a keep-alive race, maybe");
    assert_eq!(s.failed(1_010, 2_000, 7), 2, "another before any answer");
    s.answered();
    assert_eq!(s.failed(1_020, 2_000, 7), 1, "an answer between: a new streak");
    assert_eq!(s.failed(3_021, 2_000, 7), 1, "too long after the last one: a new streak");
    assert_eq!(s.failed(3_021, 2_000, 7), 2);
    assert_eq!(s.failed(3_030, 2_000, 9), 1, "the app answered another worker's requests between: a new streak");
    assert_eq!(s.failed(3_040, 2_000, 9), 2, "none since");
}

#[test]
fn a_reset_of_a_connection_in_use_is_told_from_one_reused_after_idling() {
    let mut u = UpstreamUse::default();
    u.answered(41_000, 10_000, 1_000);
    assert!(u.busy(41_000, 10_020, 1_000), "answered 20 ms before: Tomcat resetting what it serves");
    assert!(!u.busy(41_000, 16_000, 1_000), "idle 6 s: the keep-alive race of a 5 s idle timeout");
    assert!(!u.busy(41_001, 10_020, 1_000), "never seen: a new connection");
    assert!(!u.busy(41_000, 10_020, 0), "0 turns it off");
    for port in 0..2_000u16 {
        u.answered(port, 20_000 + u64::from(port), 1_000);
    }
    assert!(u.answered_ms.len() <= UPSTREAM_RECORDS, "bounded: {}", u.answered_ms.len());
    assert!(u.busy(1_999, 22_000, 1_000), "the newest is kept");
    assert_eq!([port_of(b"127.0.0.6:41234"), port_of(b"[::1]:80"), port_of(b"nonsense"), port_of(b"1.2.3.4:99999")], [
        Some(41_234),
        Some(80),
        None,
        None
    ]);
}
