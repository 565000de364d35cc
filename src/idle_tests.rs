//! Unit tests of `src/idle.rs`.

use super::*;

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
