//! What Envoy does when the module traps (a Rust panic is a trap: `panic = "abort"`), in each
//! role and under each `failure_policy`, with the fault-injection build (`make build-fault`):
//! the HTTP role traps on a request for /__close_relay_trap, the network role on a connection
//! whose first bytes are "TRAP ". Traffic must keep flowing under the shipped FAIL_OPEN.

use std::time::Duration;

use e2e::{App, Envoy, EnvoySpec, Filter};

/// What a client saw on one request over a fresh connection.
fn outcome(envoy: &Envoy, raw: &str) -> String {
    let Ok(mut c) = e2e::Client::try_open(envoy.port) else { return "refused".into() };
    if c.send(raw).is_err() {
        return "closed".into();
    }
    match c.try_response("GET") {
        Ok(r) if r.says_close() => format!("{} + close", r.status),
        Ok(r) => r.status.to_string(),
        Err(_) => "closed".into(),
    }
}

fn get(envoy: &Envoy, path: &str) -> String {
    outcome(envoy, &format!("GET {path} HTTP/1.1\r\nhost: app\r\n\r\n"))
}

struct Seen {
    /// Envoy's own signs of the trap: its log line, `server.envoy_bug_failures`, and the
    /// `wasm.<plugin>.vm_reload_*` counters.
    trap_log: Option<String>,
    envoy_bugs: u64,
    reload_stats: Vec<String>,
    trapping: String,
    right_after: Vec<String>,
    relays_after: String,
    a_second_later: Vec<String>,
    relays_a_second_later: String,
}

fn trap(role: &str, policy: &'static str) -> Seen {
    let app = App::start();
    let spec = EnvoySpec { failure_policy: policy, wasm: e2e::fault_wasm_path(), concurrency: 1, ..EnvoySpec::new(Filter::CloseRelay, app.port) };
    let envoy = Envoy::start(&format!("trap-{role}-{policy}"), &spec);
    assert_eq!(get(&envoy, "/close"), "200 + close", "the filter works before the trap");
    let trapping = match role {
        "http" => get(&envoy, "/__close_relay_trap"),
        _ => outcome(&envoy, "TRAP / HTTP/1.1\r\nhost: app\r\n\r\n"),
    };
    let right_after = (0..3).map(|_| get(&envoy, "/keep")).collect();
    let relays_after = get(&envoy, "/close");
    std::thread::sleep(Duration::from_millis(1500)); // FAIL_RELOAD's default backoff is 1 s
    let a_second_later = (0..3).map(|_| get(&envoy, "/keep")).collect();
    let relays_a_second_later = get(&envoy, "/close");
    envoy.wasm_log_with(&["Function: proxy_on_"]); // Envoy flushes its log on a timer
    let trap_log = envoy.wasm_trap();
    let envoy_bugs = envoy.counter("server.envoy_bug_failures");
    let reload_stats: Vec<String> = e2e::admin_get(envoy.admin, "/stats?filter=vm_reload")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.ends_with(": 0"))
        .map(str::to_owned)
        .collect();
    let seen = Seen { trap_log, envoy_bugs, reload_stats, trapping, right_after, relays_after, a_second_later, relays_a_second_later };
    eprintln!(
        "[envoy {}] {role} role traps, {policy}: log {:?}; server.envoy_bug_failures {}; {:?}",
        e2e::envoy_version(),
        seen.trap_log,
        seen.envoy_bugs,
        seen.reload_stats
    );
    eprintln!(
        "[envoy {}] {role} role traps, {policy}: trapping request -> {}; next requests -> {:?}, /close -> {}; \
         1.5 s later -> {:?}, /close -> {}",
        e2e::envoy_version(),
        seen.trapping,
        seen.right_after,
        seen.relays_after,
        seen.a_second_later,
        seen.relays_a_second_later
    );
    seen
}

fn all_ok(v: &[String]) -> bool {
    v.iter().all(|s| s == "200")
}

/// What docs/operations.md and the shipped alerts rely on, under every policy: Envoy
/// logs the failed callback at error level, and counts the trapping connection's close as an
/// Envoy bug (its HCM finds no close reason). FAIL_RELOAD also counts its reload backoffs.
fn assert_visible(s: &Seen, role: &str, policy: &str) {
    let callback = if role == "http" { "proxy_on_request_headers" } else { "proxy_on_downstream_data" };
    let line = s.trap_log.as_deref().unwrap_or_default();
    assert!(line.starts_with(&format!("Function: {callback} failed: Uncaught RuntimeError")), "{role} {policy}: {line:?}");
    assert!(s.envoy_bugs >= 1, "{role} {policy}: server.envoy_bug_failures did not move");
    let reloading = s.reload_stats.iter().any(|l| l.contains("vm_reload_backoff"));
    assert_eq!(reloading, policy == "FAIL_RELOAD", "{role} {policy}: {:?}", s.reload_stats);
}

#[test]
fn http_role_trap_fail_open_keeps_traffic_flowing() {
    let s = trap("http", "FAIL_OPEN");
    assert_visible(&s, "http", "FAIL_OPEN");
    assert!(all_ok(&s.right_after) && all_ok(&s.a_second_later), "traffic stopped after the trap");
    // The price: the module stays failed on that worker; closes are no longer relayed.
    assert_eq!(s.relays_a_second_later, "200");
}

#[test]
fn network_role_trap_fail_open_keeps_traffic_flowing() {
    let s = trap("network", "FAIL_OPEN");
    assert_visible(&s, "network", "FAIL_OPEN");
    assert!(all_ok(&s.right_after) && all_ok(&s.a_second_later), "traffic stopped after the trap");
    assert_eq!(s.relays_a_second_later, "200");
}

#[test]
fn http_role_trap_fail_closed_stops_traffic() {
    let s = trap("http", "FAIL_CLOSED");
    assert_visible(&s, "http", "FAIL_CLOSED");
    assert!(!all_ok(&s.right_after), "FAIL_CLOSED let traffic through: {:?}", s.right_after);
}

#[test]
fn network_role_trap_fail_closed_stops_traffic() {
    let s = trap("network", "FAIL_CLOSED");
    assert_visible(&s, "network", "FAIL_CLOSED");
    assert!(!all_ok(&s.right_after), "FAIL_CLOSED let traffic through: {:?}", s.right_after);
}

#[test]
fn http_role_trap_fail_reload_comes_back() {
    let s = trap("http", "FAIL_RELOAD");
    assert_visible(&s, "http", "FAIL_RELOAD");
    assert!(all_ok(&s.a_second_later) && s.relays_a_second_later == "200 + close", "not reloaded");
}

#[test]
fn network_role_trap_fail_reload_comes_back() {
    let s = trap("network", "FAIL_RELOAD");
    assert_visible(&s, "network", "FAIL_RELOAD");
    assert!(all_ok(&s.a_second_later) && s.relays_a_second_later == "200 + close", "not reloaded");
}

#[test]
fn every_shipped_configuration_fails_open() {
    let root = e2e::repo_root().join("envoyfilter");
    let local = std::fs::read_to_string(root.join("local/envoy.yaml")).unwrap();
    assert_eq!(local.matches("failure_policy: FAIL_OPEN").count(), 2, "local/envoy.yaml");
    assert!(!local.contains("FAIL_CLOSED") && !local.contains("FAIL_RELOAD"));
    for p in e2e::istio::read_docs(&root.join("wasmplugin/wasmplugin.yaml")) {
        assert_eq!(p["spec"]["failStrategy"], "FAIL_OPEN", "{}", p["metadata"]["name"]);
    }
    let filter = e2e::istio::read_docs(&root.join("envoyfilter.yaml")).remove(0);
    let policies: Vec<_> = filter["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["applyTo"] == "EXTENSION_CONFIG")
        .map(|p| p["patch"]["value"]["typed_config"]["config"]["failure_policy"].clone())
        .collect();
    assert_eq!(policies, vec![serde_json::json!("FAIL_OPEN"); 2], "envoyfilter.yaml");
}
