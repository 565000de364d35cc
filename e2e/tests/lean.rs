//! The lean configuration against a real Envoy: the network role alone (`"lean": true`, no HTTP
//! filter), following each response's framing in the bytes it writes and reading the drain
//! sources from the sidecar's stats. Its promise is the drain suite's: once the pod is going
//! away, idle connections are closed, busy ones after their response, and no byte a plain Envoy
//! would deliver is lost. With rescue, what the dying app refuses meanwhile is answered by
//! another pod, so the ALB sees no error at all.

use std::time::{Duration, Instant};

use e2e::pool::{all_closed, pool, report, IDLE};
use e2e::rescue::{self, Pod};
use e2e::{App, Client, Envoy, EnvoySpec, Filter};

fn lean(app: &App) -> EnvoySpec {
    EnvoySpec::new(Filter::Lean, app.port)
}

fn wait_for(what: &str, envoy: &Envoy, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}\n{}", envoy.wasm_log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_sidecar_draining_closes_idle_connections_and_busy_ones_after_their_response() {
    let app = App::start();
    let envoy = Envoy::start("lean-healthcheck", &lean(&app));
    let pool = pool(&envoy);
    let trigger = Instant::now();
    envoy.admin_post("/healthcheck/fail");
    let (took, statuses) = all_closed(&envoy, pool, trigger, "/keep");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(envoy.counter("wasmcustom.close_relay_idle_closed_total") >= IDLE as u64, "{}", envoy.wasm_log());
    report("sidecar_health (lean)", "--drain-strategy immediate", took);
}

/// What a plain Envoy delivers, lean must too: a chunked stream that pauses longer than any
/// grace, with a request pipelined behind it, arrives whole while the pod drains; then the
/// connection closes.
#[test]
fn a_response_still_streaming_when_the_pod_drains_arrives_whole_then_the_connection_closes() {
    let app = App::start();
    let envoy = Envoy::start("lean-in-flight", &lean(&app));
    let seen = e2e::in_flight_through_a_drain(&envoy);
    eprintln!("[envoy {}] lean: {seen}", e2e::envoy_version());
}

/// The same with pauses far past every grace (1 s against 250 ms and a second look): only the
/// framing says the stream is not over; the connection's quiet alone would close it.
/// A request read and not yet answered is in flight. While the pod drains, lean tells the
/// client to close on an answer; a request the client sends after it all the same (it had it
/// on the way, or it pipelined it), which the app takes a second to answer, is answered before
/// the connection closes, as a plain Envoy answers it (here 1.5 s: longer than Envoy's delayed
/// close, after which lean closes a connection Envoy itself said close on).
#[test]
fn a_request_sent_after_a_told_answer_is_answered_though_it_takes_a_second() {
    let app = App::start();
    let told_then_slow = |envoy: &Envoy, pipelined: bool| {
        let mut c = envoy.connect();
        let told = if pipelined {
            c.send("GET /keep HTTP/1.1\r\nhost: app\r\n\r\nGET /delay?ms=1500 HTTP/1.1\r\nhost: app\r\n\r\n").expect("send");
            c.response("GET").says_close()
        } else {
            let told = c.get("/keep").says_close();
            c.send("GET /delay?ms=1500 HTTP/1.1\r\nhost: app\r\n\r\n").expect("send");
            told
        };
        let late = c.try_response("GET").unwrap_or_else(|e| panic!("pipelined {pipelined}: the request was cut: {e}\n{}", envoy.wasm_log()));
        assert_eq!((late.status, late.body.as_slice()), (200, &b"ok"[..]));
        (told, c)
    };
    let plain = Envoy::start("lean-told-then-slow-plain", &EnvoySpec::new(Filter::None, app.port));
    plain.admin_post("/healthcheck/fail");
    std::thread::sleep(Duration::from_millis(300));
    for pipelined in [false, true] {
        told_then_slow(&plain, pipelined);
    }
    let envoy = Envoy::start("lean-told-then-slow", &lean(&app));
    envoy.admin_post("/healthcheck/fail");
    wait_for("the drain", &envoy, Duration::from_secs(4), || envoy.counter("wasmcustom.close_relay_drain_entered_sidecar_health_total") > 0);
    for pipelined in [false, true] {
        let (told, mut c) = told_then_slow(&envoy, pipelined);
        assert!(told, "the drain did not reach lean");
        assert!(c.closed_by_server(Duration::from_secs(3)), "left open after its last answer\n{}", envoy.wasm_log());
    }
}

/// A connection lean cannot follow is left to Envoy, and counted: never quietly. Here the client
/// pipelines a request after an answer's head and before its body, which lean takes for the end
/// of an answer to HEAD; the body that follows starts no head.
#[test]
fn a_connection_lean_cannot_follow_is_counted_and_left_to_envoy() {
    let app = App::start();
    let envoy = Envoy::start("lean-lost", &lean(&app));
    let mut c = envoy.connect();
    c.send("GET /late-body?ms=400 HTTP/1.1\r\nhost: app\r\n\r\n").expect("send");
    assert!(c.received(16, Duration::from_secs(3)), "no response started");
    c.send("GET /keep HTTP/1.1\r\nhost: app\r\n\r\n").expect("send the pipelined request");
    let late = c.try_response("GET").unwrap_or_else(|e| panic!("the answer was cut: {e}"));
    assert_eq!(late.body, b"ok");
    let next = c.try_response("GET").unwrap_or_else(|e| panic!("the pipelined request was lost: {e}"));
    assert_eq!((next.status, next.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(envoy.counter_reaching("wasmcustom.close_relay_lean_lost_total", 1, Duration::from_secs(2)), 1);
    envoy.admin_post("/healthcheck/fail");
    std::thread::sleep(Duration::from_millis(1_800));
    assert!(c.open_now(), "closed though lean could not follow it");
}

#[test]
fn a_stream_pausing_longer_than_any_grace_is_never_taken_for_idle() {
    let app = App::start();
    let envoy = Envoy::start("lean-long-pause", &lean(&app));
    let mut c = envoy.connect();
    c.send("GET /slow?chunks=3&pause_ms=1000 HTTP/1.1\r\nhost: app\r\n\r\n").expect("send");
    assert!(c.received(16, Duration::from_secs(3)), "no response started");
    envoy.admin_post("/healthcheck/fail");
    let slow = c.try_response("GET").unwrap_or_else(|e| panic!("slow stream cut: {e}\n{}", envoy.wasm_log()));
    let expected: String = (0..3).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&slow.body), expected);
    assert!(c.closed_by_server(Duration::from_secs(6)), "left open after the drain\n{}", envoy.wasm_log());
}

/// Every framing Envoy writes is followed to its end, so a connection that carried any of them
/// is idle afterwards and closes on the drain; a WebSocket is no longer HTTP and stays open.
#[test]
fn every_framing_envoy_writes_is_followed_so_the_connection_still_closes_when_idle() {
    let app = App::start();
    let envoy = Envoy::start("lean-framings", &lean(&app));
    let exchanges: [(&str, &[&str]); 6] = [
        ("content-length", &["GET /keep HTTP/1.1\r\nhost: a\r\n\r\n"]),
        ("1 MiB body", &["GET /big HTTP/1.1\r\nhost: a\r\n\r\n"]),
        ("chunked", &["GET /slow?chunks=3&pause_ms=10 HTTP/1.1\r\nhost: a\r\n\r\n"]),
        ("HEAD, then GET", &["HEAD /keep HTTP/1.1\r\nhost: a\r\n\r\n", "GET /keep HTTP/1.1\r\nhost: a\r\n\r\n"]),
        ("100-continue", &["POST /keep HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n", "hello"]),
        ("close-delimited from the app", &["GET /eof HTTP/1.1\r\nhost: a\r\n\r\n"]),
    ];
    let mut conns: Vec<(&str, Client)> = Vec::new();
    for (name, requests) in exchanges {
        let mut c = envoy.connect();
        for request in requests {
            c.send(request).expect("send");
            if request.starts_with("GET") || request.starts_with("HEAD") {
                let method = if request.starts_with("HEAD") { "HEAD" } else { "GET" };
                let r = c.try_response(method).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(r.status, 200, "{name}");
            }
        }
        if name == "100-continue" {
            let interim = c.try_response("POST").expect("100 Continue");
            let r = if interim.status == 100 { c.try_response("POST").expect("the answer") } else { interim };
            assert_eq!(r.status, 200, "{name}");
        }
        conns.push((name, c));
    }
    let mut ws = envoy.connect();
    ws.send("GET /ws HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n").expect("send");
    assert!(ws.received(12, Duration::from_secs(3)), "no upgrade answer");
    std::thread::sleep(Duration::from_millis(600));
    for (name, c) in conns.iter_mut() {
        assert!(c.open_now(), "{name}: closed before any drain\n{}", envoy.wasm_log());
    }
    envoy.admin_post("/healthcheck/fail");
    for (name, c) in conns.iter_mut() {
        assert!(c.closed_by_server(Duration::from_secs(6)), "{name}: left open after the drain\n{}", envoy.wasm_log());
    }
    assert!(ws.open_now(), "the WebSocket was closed: it is no longer HTTP, and never ours\n{}", envoy.wasm_log());
}

/// The app dies under an ALB's pool: every request meanwhile is answered by pod B (rescue), the
/// rescued answers' heads drain pod A with no HTTP role, and every connection closes.
#[test]
fn with_rescue_a_dead_app_costs_no_error_and_the_rescued_answers_drain_the_pod() {
    let (mut a, b) = (Pod::start("lean-rescue-a", Filter::Lean), Pod::start("lean-rescue-b", Filter::Lean));
    a.sees(&[&a, &b]);
    let pool = pool(&a.envoy);
    let trigger = Instant::now();
    a.app.kill();
    let (took, statuses) = all_closed(&a.envoy, pool, trigger, "/keep");
    assert!(!statuses.is_empty() && statuses.iter().all(|s| *s == 200), "{statuses:?}\n{}", a.envoy.wasm_log());
    assert!(a.sent().1 > 0, "nothing went to pod B");
    assert!(a.rescued() > 0, "the rescued answers were not counted");
    let entered = "wasmcustom.close_relay_drain_entered_app_rescued_total";
    assert_eq!(a.envoy.counter_reaching(entered, 1, Duration::from_secs(3)), 1, "{}", a.envoy.wasm_log());
    report("app_rescued (lean, app killed)", "rescue's marks on the heads", took);
    drop(b);
}

/// Without rescue nothing of ours marks a refusal on the wire, and a default sidecar keeps no
/// stat of it: Envoy's own 503 names it in its body ("upstream connect error ... connection
/// failure"), and the pod drains from that. The requests sent before meet the dead app (503),
/// as through a plain Envoy: lean needs rescue to lose nothing.
#[test]
fn without_rescue_a_dead_app_drains_the_pod_from_envoys_own_replies() {
    let mut app = App::start();
    let envoy = Envoy::start("lean-killed", &lean(&app));
    let pool = pool(&envoy);
    let trigger = Instant::now();
    app.kill();
    let (took, statuses) = all_closed(&envoy, pool, trigger, "/keep");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    let entered = "wasmcustom.close_relay_drain_entered_app_failure_total";
    assert_eq!(envoy.counter_reaching(entered, 1, Duration::from_secs(3)), 1, "{}", envoy.wasm_log());
    let errors = statuses.iter().filter(|s| **s == 503).count();
    report(&format!("app_failure (lean, app killed, no rescue: {errors} 503s meanwhile)"), "Envoy's local replies", took);
}

/// Lean reads Envoy's own 503 by its body; an app that passes on a dependency's reply says the
/// same words (a gateway, a BFF). Envoy's router marks the app's answer as the app's
/// (`x-envoy-upstream-service-time`), so its 503s, however many, never drain the pod.
#[test]
fn an_app_passing_on_envoys_reply_text_never_drains_the_pod() {
    let app = App::start();
    let envoy = Envoy::start("lean-passed-on", &lean(&app));
    let mut idle = envoy.connect();
    assert!(!idle.get("/keep").says_close());
    let mut c = envoy.connect();
    for _ in 0..6 {
        let r = c.get("/envoy-503");
        assert_eq!(r.status, 503);
        assert!(String::from_utf8_lossy(&r.body).starts_with("upstream connect error"), "{}", r.raw_head);
        assert!(!r.says_close(), "the pod began draining on the app's own 503:\n{}", r.raw_head);
    }
    std::thread::sleep(Duration::from_millis(1_300));
    assert!(idle.open_now(), "an idle connection was closed: the app's 503s drained the pod");
    assert_eq!(envoy.counter("wasmcustom.close_relay_drain_entered_app_failure_total"), 0);
}

/// `lean` in an HTTP plugin is a configuration error: that plugin passes traffic through and
/// says why; the network role of the same pair still works.
#[test]
fn lean_given_to_the_http_role_is_refused_and_traffic_flows() {
    let app = App::start();
    let mut spec = EnvoySpec::new(Filter::CloseRelay, app.port);
    spec.http_config = r#"{"lean": true}"#.into();
    let envoy = Envoy::start("lean-http-role", &spec);
    let mut c = envoy.connect();
    assert_eq!(c.get("/keep").status, 200);
    wait_for("the configuration error", &envoy, Duration::from_secs(3), || envoy.log().contains("field `lean`"));
    assert!(envoy.log().contains("DISABLED"), "{}", envoy.wasm_log());
}

/// The standalone bootstrap a user tries first (envoyfilter/local/envoy-lean.yaml, with
/// peers.yaml beside it): lean and rescue, and it works: a dead app's requests are answered by
/// the other pod, and its rescued answers drain the pod and close the connection.
#[test]
fn the_shipped_standalone_lean_bootstrap_rescues_and_drains() {
    let mut app = App::start();
    let other = App::start();
    let envoy = rescue::launch_standalone("envoy-lean.yaml", (10003, 9903), app.port, other.port);
    assert!(!envoy.log().contains("DISABLED"), "{}", envoy.wasm_log());
    let mut c = envoy.connect();
    let r = c.get("/keep");
    assert_eq!((r.status, r.header("x-envoy-attempt-count")), (200, Some("1")), "{}", r.raw_head);
    app.kill();
    for _ in 0..2 {
        let r = c.get("/keep");
        assert_eq!((r.status, r.header("x-envoy-attempt-count")), (200, Some("2")), "{}", r.raw_head);
    }
    assert!(c.closed_by_server(Duration::from_secs(3)), "the drained pod kept the connection\n{}", envoy.wasm_log());
    assert_eq!(envoy.counter("wasmcustom.close_relay_drain_entered_app_rescued_total"), 1);
}

/// Lean follows HTTP/1.1 only, and refuses nothing on HTTP/2: an h2c connection passes
/// through untouched, and while the pod drains the network role still tells it with a graceful
/// GOAWAY at Envoy's next write; both streams arrive whole.
#[test]
fn an_h2c_connection_passes_through_lean_and_is_told_to_go_when_the_pod_drains() {
    let app = App::start();
    let envoy = Envoy::start("lean-h2", &lean(&app));
    let d = e2e::h2c::streams_through_a_drain(&envoy);
    assert_eq!(String::from_utf8_lossy(&d.slow), e2e::h2c::slow_body(), "the stream was cut");
    assert_eq!((d.late.0, d.late.1.as_slice()), (200, &b"ok"[..]));
    assert!(d.told, "no GOAWAY reached the client\n{}", envoy.wasm_log());
    assert!(d.driver_end.starts_with("Ok(Ok("), "the connection ended with an error: {}", d.driver_end);
    assert_eq!(envoy.counter("wasmcustom.close_relay_h2_goaway_total"), 1);
    assert_eq!(envoy.counter("wasmcustom.close_relay_lean_lost_total"), 0, "lean counted an h2 connection as lost");
}
