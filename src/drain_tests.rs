//! Unit tests of `src/drain.rs`.

use super::*;

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
    assert_eq!(crate::idle::Grace::for_sweep(250, 0, 100, s.app_going(2_000)).idle_ms, 350);
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
fn window_counts_and_restarts() {
    let mut w = Window::default();
    assert_eq!(w.record(1_000, 500), 1);
    assert_eq!(w.record(1_200, 500), 2);
    assert_eq!(w.record(1_499, 500), 3);
    assert_eq!(w.record(1_500, 500), 1, "window passed");
    assert_eq!(Window::decode(&w.encode()), w);
}
