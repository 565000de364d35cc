//! What a default injected istio-proxy has that can change close-relay's behaviour, put into
//! every Envoy the suites, the demo, the rollout, the soak and the bench start (`docs/istio.md`
//! names what is still left out, and why it cannot change a result):
//! - the bootstrap's stats: Istio's inclusion list with no `proxyStatsMatcher` set, and
//!   `use_all_default_tags: false` (istio/istio `tools/packaging/common/envoy_bootstrap.json`,
//!   `pkg/bootstrap/config.go` `getStatsOptions`). Envoy never creates a stat outside it;
//! - the runtime layer istiod's bootstrap writes (`extractRuntimeFlags`);
//! - the `prometheus_stats` (admin) and `agent` (istio-agent, 15020) clusters, and a `node`;
//! - pilot-agent's flags (`pkg/envoy/proxy.go`): log level warning, `misc:error`, immediate
//!   drain strategy, 45 s drain time.
//!
//! Every Envoy is checked once it is up ([`check_stats`]): a stat outside the list fails the
//! test that started it.

use serde_json::{json, Value};

/// Istio's inclusion list: `(kind, pattern)` as the bootstrap writes it.
pub const INCLUSION: &[(&str, &str)] = &[
    ("prefix", "reporter="),
    ("prefix", "cluster_manager"),
    ("prefix", "listener_manager"),
    ("prefix", "server"),
    ("prefix", "cluster.xds-grpc"),
    ("prefix", "wasm"),
    ("prefix", "component"),
    ("prefix", "istio"),
    ("suffix", "rbac.allowed"),
    ("suffix", "rbac.denied"),
    ("suffix", "shadow_allowed"),
    ("suffix", "shadow_denied"),
    ("regex", r"vhost\..*\.route\..*"),
];

/// The bootstrap's `stats_config`.
pub fn stats_config() -> Value {
    let patterns: Vec<Value> = INCLUSION
        .iter()
        .map(|(kind, pattern)| match *kind {
            "regex" => json!({"safe_regex": {"regex": pattern}}),
            kind => json!({ kind: pattern }),
        })
        .collect();
    json!({"use_all_default_tags": false, "stats_matcher": {"inclusion_list": {"patterns": patterns}}})
}

/// The runtime layer of Istio's bootstrap, then the admin layer.
pub fn layered_runtime() -> Value {
    json!({"layers": [
        {"name": "global config", "static_layer": {
            "overload.global_downstream_max_connections": 2147483647,
            "re2.max_program_size.error_level": 32768,
            "envoy.reloadable_features.http_reject_path_with_fragment": false
        }},
        {"name": "admin", "admin_layer": {}}
    ]})
}

/// The node Istio writes for a sidecar of `checkout-0` in namespace `shop`.
pub fn node() -> Value {
    json!({
        "id": "sidecar~127.0.0.1~checkout-0.shop~shop.svc.cluster.local",
        "cluster": "checkout.shop",
        "metadata": {"NAMESPACE": "shop", "NAME": "checkout-0", "ISTIO_VERSION": "1.30.3", "CLUSTER_ID": "Kubernetes"}
    })
}

/// Istio's bootstrap names the node; xDS subscriptions, file-based ones too, require it.
pub fn ensure_node(bootstrap: &mut Value) {
    if bootstrap.get("node").is_none() {
        bootstrap["node"] = node();
    }
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    })
}

/// istio-agent's status port (nothing listens on it in the rig: no feature reads it).
pub const AGENT_PORT: u16 = 15020;

/// Makes `bootstrap` a sidecar's: its stats, runtime, node, and the two clusters.
pub fn apply(bootstrap: &mut Value, admin: u16) {
    bootstrap["stats_config"] = stats_config();
    bootstrap["layered_runtime"] = layered_runtime();
    ensure_node(bootstrap);
    let clusters = &mut bootstrap["static_resources"]["clusters"];
    if !clusters.is_array() {
        *clusters = json!([]);
    }
    for (name, port) in [("prometheus_stats", admin), ("agent", AGENT_PORT)] {
        let list = clusters.as_array_mut().expect("clusters is a list");
        if !list.iter().any(|c| c["name"] == name) {
            list.push(static_cluster(name, port));
        }
    }
}

/// pilot-agent's flags for Envoy, with `concurrency` workers (the mesh's default is 2) and the
/// drain strategy a test names (`immediate`, as pilot-agent passes, unless a test shows Envoy's
/// own default).
pub fn flags(concurrency: u32, drain_strategy: &str) -> Vec<String> {
    [
        "--drain-time-s", "45",
        "--drain-strategy", drain_strategy,
        "--parent-shutdown-time-s", "60",
        "--local-address-ip-version", "v4",
        "--file-flush-interval-msec", "1000",
        "--disable-hot-restart",
        "-l", "warning",
        "--component-log-level", "misc:error",
        "--concurrency", &concurrency.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether a stat of this name exists on a default sidecar.
pub fn kept(name: &str) -> bool {
    INCLUSION.iter().any(|(kind, pattern)| match *kind {
        "prefix" => name.starts_with(pattern),
        "suffix" => name.ends_with(pattern),
        _ => name.starts_with("vhost.") && name.contains(".route."),
    })
}

/// Every stat `/stats` lists is one the inclusion list keeps; else the stats that are not.
pub fn check_stats(stats: &str) -> Result<(), String> {
    let outside: Vec<&str> = stats
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .filter(|name| !kept(name))
        .take(5)
        .collect();
    if outside.is_empty() {
        Ok(())
    } else {
        Err(format!("stats a default istio-proxy does not have: {outside:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inclusion_list_keeps_what_istio_keeps_and_nothing_else() {
        for name in ["wasmcustom.close_relay_responses_total", "listener_manager.total_listeners_draining", "server.state",
            "cluster.xds-grpc.upstream_cx_total", "vhost.inbound|http|8080.route.default.upstream_rq_200", "http.inbound_0.0.0.0_8080.rbac.allowed"]
        {
            assert!(kept(name), "{name}");
        }
        for name in ["http.inbound_0.0.0.0_8080.downstream_cx_drain_close", "http.inbound_0.0.0.0_8080.downstream_cx_http1_active",
            "cluster.inbound|8080||.upstream_cx_connect_fail", "listener.127.0.0.1_15006.downstream_cx_active", "runtime.load_success"]
        {
            assert!(!kept(name), "{name}");
        }
        assert!(check_stats("server.live: 1\nwasm.envoy.wasm.runtime.v8.active: 4\n").is_ok());
        assert!(check_stats("server.live: 1\nhttp.admin.downstream_rq_total: 3\n").is_err());
        assert_eq!(stats_config()["stats_matcher"]["inclusion_list"]["patterns"].as_array().map(Vec::len), Some(INCLUSION.len()));
    }
}
