//! The core story against a real Envoy (`$ENVOY`, or the newest under `.envoy/`): the app ends
//! its connection, and the client (standing in for the ALB) must see `connection: close` on
//! that response and then a closed socket.

use std::time::{Duration, Instant};

use close_relay::host::Call;
use e2e::{pattern_byte, App, Envoy, EnvoySpec, Filter, Response};

const SOON: Duration = Duration::from_secs(3);
const A_WHILE: Duration = Duration::from_millis(700);

fn setup(name: &str, filter: Filter) -> (App, Envoy) {
    let app = App::start();
    let envoy = Envoy::start(name, &EnvoySpec::new(filter, app.port));
    (app, envoy)
}

fn say(what: &str) {
    eprintln!("[envoy {}] {what}", e2e::envoy_version());
}

fn assert_clean(r: &Response, envoy: &Envoy) {
    assert!(!r.leaks_marker(), "marker leaked:\n{}\nwasm log:\n{}", r.raw_head, envoy.wasm_log());
}

/// The client saw `connection: close`, no marker, and exactly `body`.
fn assert_relayed(r: &Response, envoy: &Envoy, body: &[u8]) {
    assert!(r.says_close(), "close not relayed:\n{}\nwasm log:\n{}", r.raw_head, envoy.wasm_log());
    assert_clean(r, envoy);
    assert_eq!(r.body, body, "body of\n{}", r.raw_head);
}

#[test]
fn without_filter_the_close_is_swallowed_and_the_connection_stays_open() {
    let (_app, envoy) = setup("nofilter", Filter::None);
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    assert!(!r.says_close(), "Envoy without the filter relayed close?\n{}", r.raw_head);
    assert!(!c.closed_by_server(A_WHILE), "connection closed without the filter");
    // The dying-pod case: the client reuses the connection.
    assert_eq!(c.get("/keep").status, 200);
    say("no filter: app said close, client saw no close header and the connection stayed open (the bug)");
}

#[test]
fn a_relayed_close_closes_the_connection_right_after_the_response() {
    let (_app, envoy) = setup("relay-close", Filter::CloseRelay);
    let mut c = envoy.connect();
    let r = c.get("/close");
    let answered = Instant::now();
    assert_eq!(r.status, 200);
    assert_relayed(&r, &envoy, b"ok");
    assert!(c.closed_by_server(SOON), "Envoy did not close after the relayed response");
    let took = answered.elapsed();
    assert_eq!(envoy.counter("wasmcustom.close_relay_relayed_total"), 1);
    assert_eq!(envoy.counter("wasmcustom.close_relay_headers_rewritten_total"), 1);
    // Closed once quiet after the sidecar's grace, as Envoy's own delayed close waits for a
    // client that sends on (`tests/parity.rs`): not on a next request, as none came.
    assert_eq!(envoy.counter("wasmcustom.close_relay_connections_closed_total"), 1, "{}", envoy.wasm_log());
    assert_eq!(envoy.counter("wasmcustom.close_relay_requests_closed_total"), 0);
    say(&format!(
        "{}: client saw `connection: close` on that response and the socket closed {} ms after it",
        e2e::layout().as_str(),
        took.as_millis()
    ));
}

#[test]
fn split_vms_without_a_queue_close_on_the_next_request() {
    // The fallback when the network VM has no queue to hear from the HTTP role: the fault build
    // fails its registration.
    let app = App::start();
    let mut spec = EnvoySpec::new(Filter::SeparateVms, app.port);
    spec.wasm = e2e::fault_wasm_path();
    spec.vm_env = vec![("CLOSE_RELAY_HOST_FAULT".into(), Call::RegisterSharedQueue.abi_name().into())];
    let envoy = Envoy::start("noqueue", &spec);
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_relayed(&r, &envoy, b"ok");
    // A client that ignores the header and sends again gets its answer, then a close.
    let next = c.request("GET", "/keep", "connection: keep-alive\r\n");
    assert_eq!(next.status, 200);
    assert!(next.says_close(), "next response lacks close:\n{}", next.raw_head);
    assert!(c.closed_by_server(SOON), "Envoy did not close after the next response");
    assert_eq!(envoy.counter("wasmcustom.close_relay_requests_closed_total"), 1);
    say("split VMs without a queue: client saw `connection: close`; its next request was answered and closed");
}

#[test]
fn keep_alive_responses_are_untouched() {
    let (_app, envoy) = setup("keepalive", Filter::CloseRelay);
    let mut c = envoy.connect();
    for _ in 0..3 {
        let r = c.get("/keep");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(r.header("connection"), None, "{}", r.raw_head);
        assert_clean(&r, &envoy);
    }
    assert!(!c.closed_by_server(A_WHILE));
    assert_eq!(envoy.counter("wasmcustom.close_relay_responses_total"), 3);
    assert_eq!(envoy.counter("wasmcustom.close_relay_relayed_total"), 0);
}

#[test]
fn every_way_an_app_ends_its_connection_is_relayed_with_the_body_intact() {
    let (_app, envoy) = setup("variants", Filter::CloseRelay);
    let cases: [(&str, &str, &[u8]); 6] = [
        ("GET", "/close-token", b"ok"),
        ("GET", "/proxy-close", b"ok"),
        ("GET", "/eof", b"eof-body"),
        ("GET", "/http10-eof", b"http10-body"),
        ("GET", "/chunked-close", b"hello world"),
        ("HEAD", "/close", b""),
    ];
    for (method, path, body) in cases {
        let mut c = envoy.connect();
        let r = c.request(method, path, "");
        assert_eq!(r.status, 200, "{method} {path}");
        assert_relayed(&r, &envoy, body);
        assert!(c.closed_by_server(SOON), "{method} {path} not closed");
    }
    for code in [204, 304] {
        let mut c = envoy.connect();
        let r = c.get(&format!("/status-close?code={code}"));
        assert_eq!(r.status, code);
        assert_relayed(&r, &envoy, b"");
        assert!(c.closed_by_server(SOON), "{code} not closed");
    }
}

#[test]
fn large_body_under_back_pressure_arrives_intact_before_the_close() {
    let (_app, envoy) = setup("bigbody", Filter::CloseRelay);
    let mut c = envoy.connect();
    let n = 8 << 20;
    c.send(&format!("GET /big-close?bytes={n} HTTP/1.1\r\nhost: app\r\n\r\n")).unwrap();
    // Let Envoy's buffers fill and its watermarks push back on the app before reading.
    std::thread::sleep(Duration::from_millis(1500));
    let r = c.response("GET");
    assert!(r.says_close(), "{}", r.raw_head);
    assert_clean(&r, &envoy);
    assert_eq!(r.body.len(), n);
    let first_bad = r.body.iter().enumerate().position(|(i, b)| *b != pattern_byte(i));
    assert_eq!(first_bad, None, "body corrupted");
    assert!(c.closed_by_server(SOON));
    say("8 MiB body under back-pressure: intact, then `connection: close` honoured by a close");
}

#[test]
fn expect_100_continue_then_close_is_relayed_on_the_final_response() {
    let (_app, envoy) = setup("continue", Filter::CloseRelay);
    let mut c = envoy.connect();
    c.send("POST /close HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .unwrap();
    let interim = c.response("POST");
    assert_eq!(interim.status, 100, "{}", interim.raw_head);
    assert_clean(&interim, &envoy);
    assert!(!interim.says_close());
    c.send("hello").unwrap();
    let r = c.response("POST");
    assert_eq!(r.status, 200);
    assert_relayed(&r, &envoy, b"ok");
    assert!(c.closed_by_server(SOON));
}

#[test]
fn a_large_response_head_is_relayed_without_leaking_the_marker() {
    let (_app, envoy) = setup("bighead", Filter::CloseRelay);
    let mut c = envoy.connect();
    let r = c.get("/big-head-close?bytes=40960");
    assert_eq!(r.status, 200, "{}", &r.raw_head[..200.min(r.raw_head.len())]);
    assert!(r.raw_head.len() > 40_000);
    assert_relayed(&r, &envoy, b"ok");
    assert!(c.closed_by_server(SOON));
}

#[test]
fn an_upstream_cannot_spoof_the_marker() {
    let (_app, envoy) = setup("spoof", Filter::CloseRelay);
    let mut c = envoy.connect();
    let r = c.get("/spoof");
    assert_eq!(r.status, 200);
    assert!(!r.says_close(), "forged marker turned into close:\n{}", r.raw_head);
    // The app's own headers pass through as the app wrote them.
    assert!(r.raw_head.contains("x-close-relay: 0000000000000000"), "{}", r.raw_head);
    assert!(!c.closed_by_server(A_WHILE));
    assert_eq!(c.get("/keep").status, 200);
}

#[test]
fn websocket_upgrade_is_untouched() {
    let (_app, envoy) = setup("upgrade", Filter::CloseRelay);
    let mut c = envoy.connect();
    c.send("GET /ws HTTP/1.1\r\nhost: app\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n").unwrap();
    let r = c.response("GET");
    assert_eq!(r.status, 101, "{}", r.raw_head);
    assert_clean(&r, &envoy);
    assert!(!r.says_close());
    // Raw bytes that look like our marker pass both ways unchanged.
    let payload = "HTTP/1.1 200 OK\r\nx-close-relay: 0123456789abcdef\r\n\r\n";
    c.send(payload).unwrap();
    let echoed = c.read_raw(payload.len(), SOON);
    assert_eq!(String::from_utf8_lossy(&echoed), payload);
    // An upgrade request the app ends with close is left to Envoy as well.
    let mut c = envoy.connect();
    let r = c.request("GET", "/close", "upgrade: websocket\r\nconnection: Upgrade\r\n");
    assert_clean(&r, &envoy);
    assert!(envoy.counter("wasmcustom.close_relay_skipped_informational_total")
        + envoy.counter("wasmcustom.close_relay_skipped_upgrade_total") >= 1);
}

#[test]
fn h2c_downstream_is_untouched_and_never_sees_the_marker() {
    let (_app, envoy) = setup("h2c", Filter::CloseRelay);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let port = envoy.port;
    let statuses = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let mut seen = Vec::new();
        // The app ends its connection on the first; the second proves the h2 connection lives.
        for path in ["/close", "/keep"] {
            let req = http::Request::get(format!("http://app{path}")).body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            let leaked: Vec<_> = resp.headers().keys().filter(|k| k.as_str().starts_with("x-close-relay")).collect();
            assert!(leaked.is_empty(), "marker leaked over h2: {:?}", resp.headers());
            seen.push(resp.status().as_u16());
            client = client.ready().await.unwrap();
        }
        drop(client);
        driver.abort();
        seen
    });
    assert_eq!(statuses, [200, 200]);
    assert_eq!(envoy.counter("wasmcustom.close_relay_skipped_not_http11_total"), 1);
    assert_eq!(envoy.counter("wasmcustom.close_relay_headers_rewritten_total"), 0);
}

#[test]
fn an_http2_app_without_content_length_is_learned_not_closed() {
    // HTTP/2 apps frame bodies themselves, so their responses look close-delimited to wasm.
    // One worker, so the one relay it may take to learn is exact.
    let app = App::start_h2c();
    let mut spec = EnvoySpec::new(Filter::CloseRelay, app.port);
    spec.app_h2c = true;
    spec.concurrency = 1;
    let envoy = Envoy::start("h2app", &spec);
    let mut first = envoy.connect();
    let r = first.get("/");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"h2-ok"[..]));
    let mut c = envoy.connect();
    for _ in 0..5 {
        let r = c.get("/");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"h2-ok"[..]));
        assert!(!r.says_close(), "HTTP/2 app response relayed as close:\n{}", r.raw_head);
        assert_clean(&r, &envoy);
    }
    assert!(!c.closed_by_server(A_WHILE));
    assert!(envoy.counter("wasmcustom.close_relay_relayed_total") <= 1);
    say("HTTP/2 app: unframed responses recognised as multiplexed, connections kept");
}

#[test]
fn bad_configuration_fails_open_with_a_clear_log() {
    let app = App::start();
    let mut spec = EnvoySpec::new(Filter::CloseRelay, app.port);
    spec.http_config = r#"{"bogus_option": true}"#.into();
    spec.network_config = r#"{"role": "network", "max_head_bytes": "big"}"#.into();
    let mut envoy = Envoy::start("badconfig", &spec);
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "traffic must keep flowing");
    assert_clean(&r, &envoy);
    let mut c = envoy.connect();
    assert_eq!(c.get("/keep").status, 200);
    let log = envoy.wasm_log_with(&["bogus_option", "max_head_bytes"]);
    assert!(log.contains("DISABLED") && log.contains("bogus_option"), "no clear error:\n{log}");
    assert!(log.contains("max_head_bytes"), "network role error does not name the field:\n{log}");
    assert!(envoy.alive());
    say("bad config: both roles logged the field at fault and passed traffic through");
}

/// wasm32's `usize` is 32 bits: 2^32 + 100 ms cast to it would run as a 100 ms grace, and
/// 2^32 + 2048 bytes as a 2 KiB head limit. In the real module both must be refused as written.
#[test]
fn numbers_past_32_bits_are_refused_as_written_in_the_real_module() {
    let app = App::start();
    let mut spec = EnvoySpec::new(Filter::CloseRelay, app.port);
    spec.http_config = r#"{"drain": {"idle_grace_ms": 4294967396}}"#.into();
    spec.network_config = r#"{"role": "network", "max_head_bytes": 4294969344}"#.into();
    let mut envoy = Envoy::start("widenumbers", &spec);
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "traffic must keep flowing");
    assert_clean(&r, &envoy);
    assert!(!r.says_close(), "a disabled filter relayed:\n{}", r.raw_head);
    let http = "field `drain.idle_grace_ms`: 4294967396 is out of range 0..=600000";
    let network = "field `max_head_bytes`: 4294969344 is out of range 1024..=8388608";
    let log = envoy.wasm_log_with(&[http, network]);
    assert!(log.contains(http) && log.contains(network), "no clear error naming the field:\n{log}");
    // Each role on each of the 2 workers (and on the main thread, where Envoy checks it first).
    let disabled = log.matches("role DISABLED, passing traffic through").count() as u64;
    assert!(disabled >= 2 * 2, "{log}");
    assert_eq!(envoy.counter("wasmcustom.close_relay_config_errors_total"), disabled);
    assert!(envoy.alive());
    say("2^32 + 100 ms and 2^32 + 2 KiB refused as written in the .wasm, both roles failed open");
}

#[test]
fn http_role_alone_passes_traffic_and_warns() {
    let (_app, envoy) = setup("httponly", Filter::HttpOnly);
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_eq!(r.status, 200);
    assert_clean(&r, &envoy);
    let log = envoy.wasm_log_with(&["no network role"]);
    assert!(log.contains("no network role"), "{log}");
    assert_eq!(envoy.counter("wasmcustom.close_relay_skipped_no_network_role_total"), 1);
}

#[test]
fn metrics_have_stable_prometheus_names() {
    let (_app, envoy) = setup("metrics", Filter::CloseRelay);
    let mut c = envoy.connect();
    c.get("/close");
    let prom = envoy.prometheus();
    for name in [
        "close_relay_responses_total",
        "close_relay_relayed_total",
        "close_relay_headers_rewritten_total",
        "close_relay_connections_closed_total",
        "close_relay_requests_closed_total",
        "close_relay_skipped_not_http11_total",
        "close_relay_skipped_upgrade_total",
        "close_relay_skipped_connect_total",
        "close_relay_skipped_informational_total",
        "close_relay_skipped_no_network_role_total",
        "close_relay_config_errors_total",
    ] {
        assert!(
            prom.lines().any(|l| l.starts_with(name) && !l.starts_with('#')),
            "{name} missing from /stats/prometheus"
        );
    }
}

#[test]
fn shipped_local_envoy_yaml_validates_loads_both_roles_and_relays() {
    let out = std::process::Command::new(e2e::envoy_bin())
        .current_dir(e2e::repo_root())
        .args(["--mode", "validate", "-c", "envoyfilter/local/envoy.yaml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{text}");
    // The same file, on free ports so it can run beside anything else.
    let app = App::start();
    let (port, admin) = (e2e::Port::lease(), e2e::Port::lease());
    let yaml = std::fs::read_to_string(e2e::repo_root().join("envoyfilter/local/envoy.yaml")).unwrap()
        .replace("port_value: 10000", &format!("port_value: {}", port.get()))
        .replace("port_value: 9901", &format!("port_value: {}", admin.get()))
        .replace("port_value: 8080", &format!("port_value: {}", app.port));
    let dir = e2e::scratch("shipped-yaml");
    std::fs::write(dir.join("envoy.yaml"), yaml).unwrap();
    let envoy = Envoy::launch(dir.clone(), &dir.join("envoy.yaml"), port, admin);
    assert_eq!(envoy.roles_ready(), (1, 1), "a role is not running:\n{}", envoy.wasm_log());
    let log = envoy.wasm_log();
    assert!(!log.contains("DISABLED"), "shipped configuration rejected:\n{log}");
    let mut c = envoy.connect();
    let r = c.get("/close");
    assert_relayed(&r, &envoy, b"ok");
    assert!(c.closed_by_server(SOON));
}

#[test]
fn the_lua_peer_relays_the_close_where_envoy_has_drain_connection_upon_completion() {
    // `make bench` compares close-relay's cost with this Lua filter: it must do the same core
    // job (Envoy's `drainConnectionUponCompletion`), or the comparison means nothing. Older
    // Envoys lack the call: there the peer does not exist, and the test shows it.
    let (_app, envoy) = setup("lua", Filter::Lua);
    let mut c = envoy.connect();
    assert!(!c.get("/keep").says_close());
    let r = c.get("/close");
    let missing = "attempt to call method 'drainConnectionUponCompletion' (a nil value)";
    // Envoy writes its log file every 50 ms here.
    let deadline = std::time::Instant::now() + SOON;
    let mut log = envoy.log();
    while !r.says_close() && !log.contains(missing) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = envoy.log();
    }
    if log.contains(missing) {
        assert!(!r.says_close(), "{}", r.raw_head);
        say("Lua peer: this Envoy has no drainConnectionUponCompletion; the peer cannot relay here");
        return;
    }
    assert!(r.says_close(), "Lua peer did not relay:\n{}", r.raw_head);
    assert!(c.closed_by_server(SOON));
    say("Lua peer (bench comparison): relays the app's close and closes the connection");
}
