//! The short rolling restart (two pods, one restart, a few seconds of load): the ALB sees
//! hundreds of 503s with a plain sidecar when the app shuts down with `Connection: close` and
//! the sidecar is held until the app exits. With close-relay configured for a held sidecar (the
//! app's first close drains the pod) each ALB connection meets at most one error, and usually
//! none: the app stops accepting at SIGTERM, so a request crossing the first close or an idle
//! close on the wire has nowhere to go (`rollout::physics` explains each). The full matrix is
//! `make rollout`.

use e2e::rollout::{physics, run, AppMode, RunResult, RunSpec, SidecarMode};

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
fn rolling_restart_with_close_relay_gives_each_alb_connection_at_most_one_error() {
    let r = run("short-relay", &short(true));
    say(&r);
    assert!(r.requests > 500, "load too small: {}", r.requests);
    assert_eq!(r.conn_errors, 0, "{:?}", r.events);
    // nginx holds at most `concurrency` connections to the pod, and close-relay closes each one
    // that meets an error: more errors than that would be a connection meeting two.
    assert!(
        r.five_xx <= r.spec.concurrency as u64,
        "{} 5xx over {} ALB connections: {:?} at {:?} ms\n{:?}",
        r.five_xx,
        r.spec.concurrency,
        r.statuses,
        r.five_xx_at,
        r.events
    );
    let why = physics(&r);
    assert!(!why.as_deref().is_some_and(|w| w.contains("not explained")), "{why:?}");
    if let Some(why) = why {
        eprintln!("[envoy {}] physics: {why}", e2e::envoy_version());
    }
}
