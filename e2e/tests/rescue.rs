//! Rescue on a real Envoy: two pods of one service, each an app behind a close-relay sidecar whose
//! inbound route tries the local app first and hands a refused request to the other pods
//! (`e2e::rescue`), which it reads over EDS from a file the test rewrites as istiod would push.

use std::time::Duration;

use serde_json::Value;

use e2e::rescue::{self, Names, Pod, REFUSED_HEADER};
use e2e::{App, Filter};

const PORT: u16 = rescue::SERVICE_PORT;

#[test]
fn while_the_app_accepts_not_one_request_leaves_the_pod() {
    let (a, b) = (Pod::start("rescue-up-a", Filter::CloseRelay), Pod::start("rescue-up-b", Filter::CloseRelay));
    a.sees(&[&a, &b]);
    let mut c = a.envoy.connect();
    for i in 0..100 {
        let r = if i % 4 == 0 {
            c.request("POST", "/keep", "content-length: 5\r\n\r\nhello")
        } else {
            c.get("/keep")
        };
        assert_eq!(r.status, 200);
        assert!(!r.says_close(), "a request the app answered closed its connection:\n{}", r.raw_head);
    }
    assert_eq!(a.sent(), (100, 0), "(to the local app, to other pods)");
    assert_eq!(b.sent(), (0, 0));
    assert_eq!(a.rescued(), 0);
}

#[test]
fn a_request_the_app_refuses_is_answered_by_another_pod_and_its_connection_closes() {
    let (mut a, b) = (Pod::start("rescue-down-a", Filter::CloseRelay), Pod::start("rescue-down-b", Filter::CloseRelay));
    a.sees(&[&b]);
    a.app.kill();
    // A rescue is evidence that the app is going away once another follows it before the app
    // answers anything (one alone may be a keep-alive race): three rounds, so that one of the
    // two workers sees two.
    let round = [("GET", String::new()), ("POST", format!("content-length: 16384\r\n\r\n{}", "x".repeat(16384)))];
    let requests: Vec<_> = round.iter().cycle().take(6).collect();
    for (method, rest) in &requests {
        let mut c = a.envoy.connect();
        let r = c.request(method, "/keep", rest);
        assert_eq!(r.status, 200, "{method} not rescued:\n{}", r.raw_head);
        assert_eq!(r.header("x-envoy-attempt-count"), Some("2"), "{method}: one retry, to the other pod");
        assert!(r.says_close(), "{method}: the rescued response kept the client on the dying pod:\n{}", r.raw_head);
        assert!(c.closed_by_server(Duration::from_secs(3)), "{method}: connection left open");
    }
    assert_eq!(b.sent().0, 6, "the other pod's app answered them all");
    assert_eq!(b.stat(&Names::for_port(PORT).local, "rq_success"), 6, "and answered them well");
    assert_eq!(a.rescued(), 6);
    assert_eq!(a.envoy.counter("wasmcustom.close_relay_drain_entered_app_rescued_total"), 1);
    assert_eq!(a.envoy.counter("wasmcustom.close_relay_drain_entered_app_failure_total"), 0, "no request failed");
}

/// A gateway app passes a dependency's response on, headers and all: its dependency, another
/// service with close-relay and rescue, refused, so the 503 carries that service's refusal
/// marker and an attempt count. Pod A's sidecar must not send the POST again (the app ran it),
/// must not drain its pod, and must not pass the marker to the ALB.
#[test]
fn a_dependencys_refusal_the_app_passes_on_runs_once_keeps_the_pod_serving_and_stays_inside() {
    let (a, b) = (Pod::start("rescue-chain-a", Filter::CloseRelay), Pod::start("rescue-chain-b", Filter::CloseRelay));
    a.sees(&[&b]);
    let mut idle = a.envoy.connect();
    assert!(!idle.get("/keep").says_close());
    let before = a.sent().0;
    let mut c = a.envoy.connect();
    for (method, rest) in [("POST", "content-length: 5\r\n\r\nhello"), ("GET", ""), ("POST", "content-length: 5\r\n\r\nhello")] {
        let r = c.request(method, "/passed-on", rest);
        assert_eq!(r.status, 503, "{}", r.raw_head);
        assert_eq!(r.header(REFUSED_HEADER), None, "{method}: the app's marker reached the client:\n{}", r.raw_head);
        assert!(!r.says_close(), "{method}: the app's answer closed its connection:\n{}", r.raw_head);
    }
    assert_eq!(a.sent(), (before + 3, 0), "(to the local app, to other pods): each ran once, on pod A");
    assert_eq!(b.sent(), (0, 0));
    assert_eq!(a.rescued(), 0);
    std::thread::sleep(Duration::from_millis(600));
    assert!(idle.open_now(), "pod A drained on its app's answers\n{}", a.envoy.wasm_log());
    assert!(!c.get("/keep").says_close(), "pod A drained on its app's answers");
    for source in ["app_failure", "app_rescued"] {
        assert_eq!(a.envoy.counter(&format!("wasmcustom.close_relay_drain_entered_{source}_total")), 0, "{source}");
    }
}

#[test]
fn a_rescue_never_goes_further_than_one_pod_even_when_every_app_refuses() {
    let (mut a, mut b) = (Pod::start("rescue-loop-a", Filter::CloseRelay), Pod::start("rescue-loop-b", Filter::CloseRelay));
    a.sees(&[&b]);
    b.sees(&[&a]);
    a.app.kill();
    b.app.kill();
    const N: u64 = 10;
    for _ in 0..N {
        let mut c = a.envoy.connect();
        let r = c.get("/keep");
        assert_eq!(r.status, 503, "one answer, the refusal:\n{}", r.raw_head);
        assert_eq!(r.header(REFUSED_HEADER), Some(rescue::MARKER));
        assert!(r.says_close(), "a refusal keeps the client on this pod:\n{}", r.raw_head);
    }
    let (a_sent, b_sent) = (a.sent(), b.sent());
    eprintln!("[envoy {}] every app refusing, {N} requests: pod A sent (local, other pods) {a_sent:?}, pod B {b_sent:?}", e2e::envoy_version());
    assert!(a_sent.1 >= N && a_sent.1 <= 2 * N, "pod A hands each request on once, or twice when the first pod refused: {a_sent:?}");
    assert_eq!(b_sent.1, 0, "pod B handed a rescued request on: a loop");
    let b_refused = b.stat(&Names::for_port(PORT).local, "cx_connect_fail");
    assert_eq!(b_refused, a_sent.1, "every request pod A handed on, pod B tried on its own app only");
    assert_eq!(a.rescued(), 0, "a refusal is no rescue");
    // The pod drains, with the sidecar's idle grace: a request on an idle connection is rescued
    // or refused once, never met by an at-once close.
    assert_eq!(a.envoy.counter("wasmcustom.close_relay_drain_entered_app_rescued_total"), 1);
    assert_eq!(a.envoy.counter("wasmcustom.close_relay_drain_entered_app_failure_total"), 0);
}

#[test]
fn a_rescue_that_lands_back_on_its_own_pod_is_tried_on_another() {
    let (mut a, b) = (Pod::start("rescue-self-a", Filter::CloseRelay), Pod::start("rescue-self-b", Filter::CloseRelay));
    // The endpoint removal has not reached pod A's sidecar yet: it still lists itself.
    a.sees(&[&a, &b]);
    a.app.kill();
    const N: u64 = 20;
    let mut landed_home = 0;
    for _ in 0..N {
        let mut c = a.envoy.connect();
        let r = c.get("/keep");
        assert_eq!(r.status, 200, "a rescue that landed on its own pod was lost:\n{}", r.raw_head);
        if r.header("x-envoy-attempt-count") == Some("3") {
            landed_home += 1;
        }
    }
    eprintln!("[envoy {}] pod A listing itself: {landed_home} of {N} rescues landed on pod A first, then went to pod B", e2e::envoy_version());
    assert_eq!(b.sent().0, N, "pod B's app answered every one");
    assert_eq!(a.rescued(), N);
}

#[test]
fn a_body_beyond_envoys_retry_buffer_is_not_replayed() {
    let (mut a, b) = (Pod::start("rescue-big-a", Filter::CloseRelay), Pod::start("rescue-big-b", Filter::CloseRelay));
    a.sees(&[&b]);
    a.app.kill();
    // Envoy keeps a request body for a retry up to the connection's buffer limit (1 MiB by
    // default). Whether the body outgrows it before the retry starts is a race: either way no
    // app sees a cut body.
    let body = 4 * 1024 * 1024;
    let mut c = a.envoy.connect();
    c.send(&format!("POST /keep HTTP/1.1\r\nhost: app\r\ncontent-length: {body}\r\n\r\n")).expect("send head");
    let chunk = vec![b'x'; 64 * 1024];
    let sent = (0..body / chunk.len()).take_while(|_| c.send_bytes(&chunk).is_ok()).count() * chunk.len();
    let r = c.try_response("POST");
    let status = r.as_ref().map(|r| r.status).ok();
    let reached = b.stat(&Names::for_port(PORT).local, "rq_total");
    eprintln!(
        "[envoy {}] a {body}-byte POST with the app down: {sent} bytes sent, answered {status:?}, {reached} requests reached pod B's app",
        e2e::envoy_version()
    );
    match status {
        // The retry was decided before the buffer overflowed: the whole body went to pod B.
        // The rig app reads a body whole (its content-length) before it answers.
        Some(200) => assert_eq!(reached, 1, "the rescued POST reached pod B once"),
        // Past the buffer the retry is abandoned: the refusal (503), or Envoy's own 507 when the
        // body outgrew the buffer while the retry waited (1.38.2, 1.40.0); nothing sent anywhere.
        Some(503 | 507) | None => assert_eq!(b.sent().0, 0, "a body past the buffer reached another pod"),
        Some(other) => panic!("unexpected answer {other}"),
    }
}

/// The standalone bootstrap a user without Istio tries first (envoyfilter/local/envoy-rescue.yaml,
/// with peers.yaml beside it): the same rescue as the tests' and the EnvoyFilter's, and it works.
#[test]
fn the_shipped_standalone_rescue_bootstrap_answers_from_another_pod_while_the_app_is_down() {
    let root = e2e::repo_root();
    let text = std::fs::read_to_string(root.join("envoyfilter/local/envoy-rescue.yaml")).unwrap();
    let shipped: Value = e2e::istio::docs(&text).remove(0);
    let hcm = &shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][1]["typed_config"];
    let routes = hcm["route_config"]["virtual_hosts"][0]["routes"].as_array().unwrap();
    let policy = |name: &str| routes.iter().find(|r| r["name"] == name).map(|r| r["route"]["retry_policy"].clone());
    assert_eq!(policy("close-relay-rescue-idempotent"), Some(rescue::retry_policy(true)));
    assert_eq!(policy(rescue::ROUTE), Some(rescue::retry_policy(false)));
    assert_eq!(hcm["local_reply_config"]["mappers"], rescue::refused_reply_mappers());

    let mut app = App::start();
    let other = App::start();
    let envoy = rescue::launch_standalone("envoy-rescue.yaml", (10002, 9902), app.port, other.port);
    let mut c = envoy.connect();
    let r = c.get("/keep");
    assert_eq!((r.status, r.header("x-envoy-attempt-count"), r.says_close()), (200, Some("1"), false), "{}", r.raw_head);
    app.kill();
    let mut c = envoy.connect();
    let r = c.get("/keep");
    assert_eq!((r.status, r.header("x-envoy-attempt-count")), (200, Some("2")), "{}", r.raw_head);
    assert!(r.says_close() && c.closed_by_server(Duration::from_secs(3)), "{}", r.raw_head);
    assert_eq!(envoy.counter("wasmcustom.close_relay_rescued_total"), 1);
}
