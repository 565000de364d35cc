//! The short rolling restart (two pods, one restart, a few seconds of load): the ALB sees 503s
//! with a plain sidecar when the app shuts down with `Connection: close` and the sidecar is
//! held until the app exits, and none with close-relay configured for a held sidecar (the app's
//! first close drains the pod: without it a rare race leaves one 503, see `rollout::physics`).
//! The full matrix is `make rollout`.

use e2e::rollout::{run, AppMode, RunResult, RunSpec, SidecarMode};

fn short(close_relay: bool) -> RunSpec {
    RunSpec {
        first_close_drains: close_relay,
        duration_ms: 5_000,
        restart_at_ms: 1_000,
        app_shutdown_timeout_ms: 3_000,
        ..RunSpec::new(close_relay, AppMode::CloseHeader, SidecarMode::Held)
    }
}

fn say(r: &RunResult) {
    eprintln!(
        "[envoy {}] rollout {} ({}): {} requests, {} 5xx, {} connection errors, statuses {:?}",
        e2e::envoy_version(),
        r.spec.label(),
        e2e::layout().as_str(),
        r.requests,
        r.five_xx,
        r.conn_errors,
        r.statuses
    );
}

#[test]
fn rolling_restart_without_the_filter_gives_the_alb_503s() {
    let r = run("short-nofilter", &short(false));
    say(&r);
    assert!(r.requests > 500, "load too small: {}", r.requests);
    assert!(r.five_xx > 0, "the rig did not reproduce the bug: {:?}", r.statuses);
}

#[test]
fn rolling_restart_with_close_relay_gives_the_alb_no_error() {
    let r = run("short-relay", &short(true));
    say(&r);
    assert!(r.requests > 500, "load too small: {}", r.requests);
    assert_eq!((r.five_xx, r.conn_errors), (0, 0), "{:?} at {:?} ms\n{:?}", r.statuses, r.five_xx_at, r.events);
}
