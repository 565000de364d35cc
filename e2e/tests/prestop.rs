//! The kubelet's preStop hook against a real Envoy: `lifecycle.preStop.httpGet` with the header
//! `x-close-relay-prestop: <token>` reaches the sidecar's inbound listener like any request.
//! close-relay answers it itself, and only once the ALB's connections are gone: idle ones
//! closed, a busy one after its response. Then the kubelet stops the app, and nothing is left
//! to meet it. Only the kubelet can pull this lever: a hook from anywhere else, or with the wrong
//! token, is refused by close-relay and never reaches the app.

use std::time::{Duration, Instant};

use e2e::{App, Client, Envoy, EnvoySpec, Filter};

const TOKEN: &str = "e2e-prestop-token-0123456789";

/// What the kubelet sends for `preStop: httpGet` (Go's client, `kube-lifecycle` agent).
fn hook(path: &str, token: &str) -> String {
    hook_with(path, token, "")
}

/// The same with more header lines, each ending in CRLF (what a proxy on the way adds).
fn hook_with(path: &str, token: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: kube-lifecycle/1.33\r\n\
         X-Close-Relay-Prestop: {token}\r\n{extra}Accept-Encoding: gzip\r\n\r\n"
    )
}

fn start(name: &str, app: &App, prestop: &str) -> Envoy {
    let mut spec = EnvoySpec::new(Filter::CloseRelay, app.port);
    let drain = format!(r#""drain": {{"prestop": {prestop}}}"#);
    spec.http_config = format!("{{{drain}}}");
    spec.network_config = format!(r#"{{"role": "network", {drain}}}"#);
    let envoy = Envoy::start(name, &spec);
    // The token must never reach the module's log, at any level: look at them all.
    envoy.debug_log();
    envoy
}

fn kept(envoy: &Envoy) -> Client {
    let mut c = envoy.connect();
    let r = c.get("/keep");
    assert!(r.status == 200 && !r.says_close(), "{}", r.raw_head);
    c
}

/// A connection busy with a slow stream of `chunks` pieces, 400 ms apart, already begun.
fn busy_with(envoy: &Envoy, chunks: u32) -> Client {
    let mut busy = kept(envoy);
    busy.send(&format!("GET /slow?chunks={chunks}&pause_ms=400 HTTP/1.1\r\nhost: app\r\n\r\n")).expect("send");
    assert!(busy.received(16, Duration::from_secs(3)), "no response started");
    busy
}

/// The kubelet's hook, on a connection of its own: the answer's status and body, and how long
/// it took to come.
fn kubelet_hook(envoy: &Envoy) -> (u16, String, Duration) {
    let sent = Instant::now();
    let mut kubelet = envoy.connect();
    kubelet.send(&hook("/app-would-404", TOKEN)).expect("send the hook");
    let answer = kubelet.try_response("GET").unwrap_or_else(|e| panic!("no answer to the hook: {e}\n{}", envoy.wasm_log()));
    (answer.status, String::from_utf8_lossy(&answer.body).into_owned(), sent.elapsed())
}

fn report(what: &str, took: Duration) {
    eprintln!("[envoy {}] prestop hook ({}): {what} in {} ms", e2e::envoy_version(), e2e::layout().as_str(), took.as_millis());
}

#[test]
fn the_kubelets_prestop_hook_is_answered_once_the_albs_connections_are_gone() {
    let app = App::start();
    let envoy = start("prestop-answered", &app, &format!(r#"{{"token": "{TOKEN}"}}"#));
    let mut idle: Vec<Client> = (0..3).map(|_| kept(&envoy)).collect();
    let mut busy = busy_with(&envoy, 4);
    let (status, body, took) = kubelet_hook(&envoy);
    assert_eq!(status, 200, "answered by the app, not close-relay? {body}");
    assert!(body.contains("no client connection left"), "{body}");
    for c in &mut idle {
        assert!(c.closed_by_server(Duration::ZERO), "an idle ALB connection outlived the hook's answer");
    }
    let slow = busy.try_response("GET").unwrap_or_else(|e| panic!("the busy response was cut: {e}"));
    let expected: String = (0..4).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&slow.body), expected);
    // Its head went out before the drain began: the connection closes once the response ends.
    assert!(busy.closed_by_server(Duration::from_millis(100)), "the busy connection outlived the hook's answer");
    // The slow response ends about 1.6 s after it began: the hook waited for it.
    assert!(took >= Duration::from_millis(1_000), "answered after {took:?}, before the busy response ended");
    assert_eq!(envoy.counter("wasmcustom.close_relay_prestop_answered_total"), 1);
    assert!(envoy.counter("wasmcustom.close_relay_drain_entered_prestop_total") >= 1);
    assert!(!envoy.wasm_log().contains(TOKEN), "the token reached close-relay's log");
    report(&format!("answered \"{}\"", body.trim_end()), took);
}

/// On a default sidecar, which keeps no stat of its client connections: a 5 s response is in
/// flight when the hook comes. The hook is answered once that response has ended, and within
/// about a second of its end (the network roles count the connections themselves).
#[test]
fn a_hook_waits_for_a_5_s_response_and_is_answered_within_a_second_of_its_end() {
    let app = App::start();
    let envoy = start("prestop-5s", &app, &format!(r#"{{"token": "{TOKEN}"}}"#));
    let mut busy = busy_with(&envoy, 13);
    let stream = std::thread::spawn(move || {
        let r = busy.try_response("GET");
        let ended = Instant::now();
        (r.map(|r| r.body.len()), ended, busy.closed_by_server(Duration::from_secs(3)))
    });
    let (status, body, took) = kubelet_hook(&envoy);
    let answered = Instant::now();
    let (len, ended, closed) = stream.join().expect("the stream's reader");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("no client connection left"), "{body}");
    let expected = (0..13).map(|i: u32| format!("chunk-{i}\n").len()).sum::<usize>();
    assert_eq!(len.unwrap_or_else(|e| panic!("the 5 s response was cut: {e}")), expected);
    assert!(closed, "the busy connection stayed open after its response");
    assert!(answered >= ended, "answered {:?} before the response ended", ended - answered);
    let after_end = answered - ended;
    assert!(after_end < Duration::from_millis(1_500), "answered {after_end:?} after the response ended");
    report(&format!("5 s response in flight: answered \"{}\" {} ms after it ended", body.trim_end(), after_end.as_millis()), took);
}

#[test]
fn a_hook_still_waiting_at_max_wait_is_answered_with_what_was_left() {
    let app = App::start();
    let envoy = start("prestop-max-wait", &app, &format!(r#"{{"token": "{TOKEN}", "max_wait_ms": 1000}}"#));
    let mut busy = busy_with(&envoy, 8);
    let (status, body, took) = kubelet_hook(&envoy);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("max_wait_ms passed") && body.contains("1 client connections left"), "{body}");
    assert!(took >= Duration::from_millis(1_000) && took < Duration::from_millis(2_500), "{took:?}");
    let slow = busy.try_response("GET").unwrap_or_else(|e| panic!("the busy response was cut: {e}"));
    assert_eq!(slow.body.len(), (0..8).map(|i: u32| format!("chunk-{i}\n").len()).sum::<usize>());
    report(&format!("answered \"{}\"", body.trim_end()), took);
}

/// Whatever can drain the pod is a lever over its traffic, and only the kubelet may pull this
/// one. A hook from another pod, one a proxy forwarded (the ALB adds `X-Forwarded-For` in its
/// default mode), one with the wrong token, or one on a connection that carried a request
/// before (the kubelet opens one per hook): close-relay answers 403 itself, counts it, drains
/// nothing, and the header never reaches the app; a minute of refusals logs one line.
#[test]
fn a_hook_not_from_the_kubelet_is_refused_drains_nothing_and_never_reaches_the_app() {
    let app = App::start();
    let envoy = start("prestop-refused", &app, &format!(r#"{{"token": "{TOKEN}"}}"#));
    let mut idle = kept(&envoy);
    let kubelet: std::net::Ipv4Addr = e2e::KUBELET_IP.parse().unwrap();
    let wrong = "not-the-token-0123456789";
    let cases = [
        ("from another pod", e2e::NEIGHBOUR_IP, hook("/keep", TOKEN), false),
        ("forwarded by the ALB", kubelet, hook_with("/keep", TOKEN, "X-Forwarded-For: 203.0.113.9\r\n"), false),
        ("forwarded by a proxy", kubelet, hook_with("/keep", TOKEN, "Forwarded: for=203.0.113.9\r\n"), false),
        ("with the wrong token", kubelet, hook("/keep", wrong), false),
        ("behind another request", kubelet, hook("/keep", TOKEN), true),
    ];
    for (i, (name, source, request, behind)) in cases.iter().enumerate() {
        let mut c = Client::open_from(envoy.port, *source);
        if *behind {
            assert_eq!(c.get("/keep").status, 200);
        }
        c.send(request).expect("send");
        let r = c.try_response("GET").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, 403, "{name}: not refused:\n{}", r.raw_head);
        assert_eq!(envoy.counter("wasmcustom.close_relay_prestop_refused_total"), i as u64 + 1, "{name}: not counted");
        eprintln!("[envoy {}] prestop hook ({}): {name}: refused 403", e2e::envoy_version(), e2e::layout().as_str());
    }
    let mut c = envoy.connect();
    assert_eq!(c.get("/prestop-header-seen").body, b"0", "the header reached the app");
    assert_eq!(envoy.counter("wasmcustom.close_relay_drain_entered_prestop_total"), 0, "drained");
    std::thread::sleep(Duration::from_millis(400));
    assert!(idle.open_now(), "an ALB connection was closed: the pod drained\n{}", envoy.wasm_log());
    assert!(!idle.get("/keep").says_close(), "the pod drains");
    std::thread::sleep(Duration::from_millis(1_100)); // Envoy flushes its log file every second
    let log = envoy.wasm_log();
    assert!(!log.contains(TOKEN) && !log.contains(wrong), "an offered token reached close-relay's log");
    // Once a minute per worker: two workers here.
    let lines = log.matches("refused a request carrying").count();
    assert!((1..=2).contains(&lines), "{lines} lines for {} refusals:\n{log}", cases.len());

    // No token configured: no hook at all, and nobody's header reaches the app either.
    let envoy = start("prestop-no-token", &app, "{}");
    let mut c = envoy.connect();
    c.send(&hook("/keep", TOKEN)).expect("send");
    assert_eq!(c.try_response("GET").expect("answer").status, 403);
    assert_eq!(envoy.counter("wasmcustom.close_relay_drain_entered_prestop_total"), 0);
    assert_eq!(envoy.connect().get("/prestop-header-seen").body, b"0", "the header reached the app");
}
