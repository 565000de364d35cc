//! Unit tests of `src/sidecar.rs`.

use super::*;

#[test]
fn ready_endpoint() {
    assert!(ready_says_draining(503, b"DRAINING\n"));
    assert!(!ready_says_draining(200, b"LIVE\n"));
    assert!(!ready_says_draining(503, b"PRE_INITIALIZING\n"));
    assert!(!ready_says_draining(0, b""));
}

#[test]
fn the_stats_record_reads_only_what_a_default_sidecar_keeps() {
    let stats = "http.inbound_0.0.0.0_8080.downstream_cx_drain_close: 2\n\
                 listener_manager.total_listeners_draining: 0\n\
                 listener_manager.total_filter_chains_draining: 1\n\
                 garbage line\n";
    let read = parse_drain_stats(stats);
    assert_eq!(read, DrainStats { update_draining: 1 });
    assert_eq!(DrainStats::decode_read(&read.encode_read(1_234)), Some((1_234, read)));
    assert_eq!(DrainStats::decode_read(b""), None);
    assert_eq!(DrainStats::decode_read(&read.encode_read(0)), None);
}

#[test]
fn envoys_own_closes_in_a_row_tell_its_drain_unless_an_update_or_health_explains_them() {
    let mut in_a_row = next_in_a_row(0, Probed::EnvoyClosed);
    assert!(!listeners_draining(in_a_row, false, false), "one close: an odd exchange, maybe");
    in_a_row = next_in_a_row(in_a_row, Probed::EnvoyClosed);
    assert!(listeners_draining(in_a_row, false, false));
    assert!(!listeners_draining(in_a_row, true, false), "a listener update drains its old chains");
    assert!(!listeners_draining(in_a_row, false, true), "healthcheck/fail is its own source");
    assert_eq!(next_in_a_row(in_a_row, Probed::KeptAlive), 0, "a kept-alive answer: Envoy is not draining");
    assert_eq!(next_in_a_row(u64::MAX, Probed::EnvoyClosed), u64::MAX);
}
