//! Unit tests of `src/drain.rs`.

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

#[test]
fn the_sweep_grace_follows_who_is_going_away() {
    let g = |idle_ms, told_ms| Grace { idle_ms, told_ms, envoy_told_ms: 1_100, fresh_ms: 350, tick_ms: 100 };
    assert_eq!(Grace::for_sweep(250, 0, 100, false), g(350, 350));
    assert_eq!(Grace::for_sweep(250, 0, 100, true), g(0, 350));
    assert_eq!(Grace::for_sweep(5_000, 0, 100, false).envoy_told_ms, 5_100, "never below the sidecar's grace");
    assert_eq!(Grace::for_sweep(250, 50, 100, true).idle_ms, 150);
    assert_eq!(Grace::for_sweep(0, 0, 100, false).fresh_ms, 0);
}

#[test]
fn a_large_response_gives_a_slow_reader_time_before_an_idle_close() {
    let mut a = Activity { http1: Some(true), ..Default::default() };
    a.read(1_000);
    a.wrote(512 * 1024, 1_010);
    a.wrote(512 * 1024, 1_020);
    assert!(!idle(&a, 9_000, 350, 350, false), "no finished request accounts for the bytes read");
    a.request_done(1_020);
    assert_eq!(a.reading_ms(), 1_000, "1 MiB at the slow rate");
    assert!(!idle(&a, 1_400, 350, 350, false), "a slow reader may still be reading");
    assert!(idle(&a, 2_400, 350, 350, false));
    assert!(idle(&a, 1_020, 0, 350, false), "no grace: the app is gone, close at once");
    assert!(idle(&a, 1_370, 350, 350, true), "told to close: the client sends nothing more to race");
    a.read(1_100);
    assert!(idle(&a, 1_450, 350, 350, true), "told: the rest of an upload answered early, read and dropped");
    assert!(!idle(&a, 1_449, 350, 350, true), "but only once quiet");
    a.in_flight = 1;
    assert!(!idle(&a, 9_000, 350, 350, true), "never with a request in flight");
    a.in_flight = 0;
    a.read(2_500);
    a.wrote(2, 2_501);
    a.request_done(2_501);
    assert_eq!(a.reading_ms(), 0, "a new response counts from zero");
    assert!(idle(&a, 2_851, 350, 350, false));
}

#[test]
fn an_idle_close_needs_a_second_look_unless_the_app_is_gone() {
    let quiet = Activity { last_ms: 1_000, saw_request: true, http1: Some(true), last_was_response: true, ..Default::default() };
    let mut a = quiet;
    assert!(!second_look(&mut a, 1_500, 250, 100), "first look after a stall: wait");
    assert!(!second_look(&mut a, 1_520, 250, 100), "a sweep right after (a wake) is not a second look");
    assert!(second_look(&mut a, 1_600, 250, 100), "a tick later, still quiet: close");
    let mut a = quiet;
    assert!(!second_look(&mut a, 1_500, 250, 100));
    a.last_ms = 1_550; // the client's request went out after the first look
    assert!(!second_look(&mut a, 2_000, 250, 100), "bytes since the first look: look again");
    assert!(second_look(&mut a, 2_100, 250, 100));
    let mut a = quiet;
    assert!(second_look(&mut a, 1_000, 0, 100), "no grace: at once");
}

#[test]
fn state_round_trips_and_tolerates_garbage() {
    let mut s = DrainState::default();
    assert!(s.enter(Source::AppFailure, 5_000, 1_000));
    assert!(s.enter(Source::SidecarHealth, UNTIL_CLEARED, 1_000));
    assert_eq!(DrainState::decode(&s.encode()), s);
    assert_eq!(DrainState::decode(b""), DrainState::default());
    assert_eq!(DrainState::decode(b"abc"), DrainState::default());
    let mut longer = s.encode();
    longer.extend_from_slice(&[1, 2, 3]);
    assert_eq!(DrainState::decode(&longer), s);
}

#[test]
fn a_refusal_under_rescue_drains_with_the_sidecars_grace() {
    assert_eq!(Source::for_app_failure(true), Source::AppRescued);
    assert_eq!(Source::for_app_failure(false), Source::AppFailure);
    let mut s = DrainState::default();
    s.enter(Source::for_app_failure(true), 5_000, 1_000);
    assert!(s.draining(2_000) && !s.app_going(2_000), "idle connections keep the sidecar's grace");
    assert_eq!(Grace::for_sweep(250, 0, 100, s.app_going(2_000)).idle_ms, 350);
}

#[test]
fn sources_expire_or_wait_to_be_cleared() {
    let mut s = DrainState::default();
    assert!(!s.draining(0));
    s.enter(Source::AppFailure, 2_000, 1_000);
    assert!(s.draining(1_999));
    assert!(!s.draining(2_000), "held sources expire");
    assert!(s.enter(Source::SidecarHealth, UNTIL_CLEARED, 3_000));
    assert!(!s.enter(Source::SidecarHealth, UNTIL_CLEARED, 4_000), "no second entry");
    assert_eq!(s.active_sources(u64::MAX - 1), vec![Source::SidecarHealth]);
    assert!(!s.app_going(5_000));
    s.clear(Source::SidecarHealth);
    assert!(!s.draining(5_000));
    s.enter(Source::AppCloses, 6_000, 5_000);
    assert!(s.app_going(5_500) && !s.app_going(6_000));
}

#[test]
fn entering_never_shortens() {
    let mut s = DrainState::default();
    s.enter(Source::AppFailure, 9_000, 0);
    assert!(!s.enter(Source::AppFailure, 5_000, 1_000));
    assert!(s.is_active(Source::AppFailure, 8_000));
}

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

#[test]
fn window_counts_and_restarts() {
    let mut w = Window::default();
    assert_eq!(w.record(1_000, 500), 1);
    assert_eq!(w.record(1_200, 500), 2);
    assert_eq!(w.record(1_499, 500), 3);
    assert_eq!(w.record(1_500, 500), 1, "window passed");
    assert_eq!(Window::decode(&w.encode()), w);
}

#[test]
fn idle_rules() {
    let quiet = Activity { last_ms: 1_000, ..Default::default() };
    assert!(!idle(&quiet, 1_500, 1_000, 1_000, false), "within grace");
    assert!(idle(&quiet, 2_000, 1_000, 1_000, false), "never used");
    let http1 = Activity { saw_request: true, http1: Some(true), ..quiet };
    let busy = Activity { in_flight: 1, last_was_response: true, ..http1 };
    assert!(!idle(&busy, 99_000, 1_000, 1_000, false), "a response still being written (slow, streaming)");
    let done = Activity { last_was_response: true, ..http1 };
    assert!(idle(&done, 2_000, 1_000, 1_000, false));
    let waiting = Activity { last_was_response: false, ..http1 };
    assert!(!idle(&waiting, 99_000, 1_000, 1_000, false), "request bytes not reported as a request: a head arriving");
}

#[test]
fn a_new_connection_gets_the_fresh_grace_even_when_the_grace_is_zero() {
    let fresh = Activity { last_ms: 1_000, ..Default::default() };
    assert!(!idle(&fresh, 1_100, 0, 350, false), "its first request may be on the way");
    assert!(idle(&fresh, 1_350, 0, 350, false));
    let answered = Activity { last_ms: 1_000, saw_request: true, http1: Some(true), last_was_response: true, ..Default::default() };
    assert!(idle(&answered, 1_000, 0, 350, false), "used and answered: the zero grace applies");
}

#[test]
fn connections_that_are_not_http1_are_never_idle() {
    let quiet = Activity { last_ms: 1_000, ..Default::default() };
    let other = Activity { saw_request: true, http1: Some(false), last_was_response: true, ..quiet };
    assert!(!idle(&other, 99_000, 1_000, 1_000, false), "TCP chain, TLS passthrough or h2 preface");
    let server_first = Activity { last_was_response: true, ..quiet };
    assert!(!idle(&server_first, 99_000, 1_000, 1_000, false), "the server spoke first: not HTTP");
    let undecided = Activity { saw_request: true, ..quiet };
    assert!(!idle(&undecided, 99_000, 1_000, 1_000, false), "a few bytes, not yet a method");
}
