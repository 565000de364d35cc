//! Rescue: a sidecar whose app refuses a request hands it, once, to a healthy pod of the same
//! service, as an ingress gateway would have picked one. Pure Envoy configuration; close-relay
//! only notices the rescued response (`decision::rescued`) and closes its client connection.
//!
//! What [`apply`] does to a sidecar's inbound path, and why each piece is there (each was
//! measured on Envoy 1.40.0 before it was written down; the `rescue` suite keeps it true on every
//! version):
//! - **Local first, then the other pods**: the inbound route goes to an aggregate cluster whose
//!   members are the local app at a fixed endpoint (priority 0) and the service's cluster
//!   (priority 1, twice: see below). While the app accepts, priority 0 takes every request and
//!   nothing leaves the pod. The first member cannot be istiod's ORIGINAL_DST `inbound|<port>||`:
//!   its host set is empty until a request has gone through it, so the aggregate would send every
//!   request to the other pods.
//! - **Only what the app never saw**: `retry_on: connect-failure,refused-stream,reset-before-request`
//!   (the app refused the connection; on HTTP/2 its GOAWAY or REFUSED_STREAM said it did not
//!   process the stream, RFC 9113 §8.7, as a gRPC server's graceful stop does to the streams
//!   already on their way; or Envoy's connection was reset before one byte of the request was
//!   written). Idempotent methods may also be sent again after a connection failure the app may
//!   have seen (RFC 9110 §9.2.2), and must be: an app closing its idle connections at shutdown
//!   races Envoy's reuse of them (503 UC 0 to 8 ms after Go's signal at 1200 requests/s, with the
//!   request already written), so their route adds `reset`. `previous_priorities` moves each
//!   retry past the priorities already tried.
//! - **One hop, never a loop**: the pods' routes add `x-envoy-attempt-count` to the request they
//!   send; a request that arrives with a count of 2 or more is a rescue, and the guard route in
//!   front sends it to the local app only, never on. Without the guard, two pods whose apps both
//!   refuse pass a request back and forth (10,240 hops before Envoy gave up, measured).
//!   Envoy's HCM does not strip that header (`cleanInternalHeaders` removes `x-envoy-retry-on` and
//!   `x-envoy-max-retries`, so a client cannot ask for retries, but leaves the count).
//! - **Never back onto itself**: for a moment after its removal the service's endpoints may still
//!   list this very pod, and a rescue landing there meets the same refusing app. The landing
//!   pod's own reply to a refused connection carries [`REFUSED_HEADER`] (`local_reply_config`,
//!   response flag UF; for idempotent methods also UC and UR, a connection the stopping app
//!   closed under the request), which the rescuing pod retries once more (`retriable-headers`), on
//!   another host (`previous_hosts`) of the service's cluster, which stands in the aggregate a
//!   second time so that `previous_priorities` still has a priority left for that third try
//!   (with the cluster once, the third try went back to the refusing local app).
//! - **Sized for a burst**: the aggregate's retry circuit breaker allows as many retries at once
//!   as requests (Envoy's default is 3), and the back-off starts at 1 ms, not 25.
//! - **The rescued response says so**: `include_attempt_count_in_response`, which close-relay
//!   reads to close that client connection.

use std::fs;
use std::path::Path;

use serde_json::{json, Value};

/// The header each retry carries (request) and the count that answered (response).
pub const ATTEMPT_COUNT: &str = "x-envoy-attempt-count";
pub use close_relay::decision::REFUSED_HEADER;
/// The refusal marker's value: this service's own (`<service>.<namespace>`), as the example
/// overlay's settings give it. The router retries only on it exactly, so a dependency's refusal
/// that the app passes on (another service, another value) is never retried.
pub const MARKER: &str = "checkout.shop";
/// The name rescue gives istiod's default inbound route (the plugin trusts Envoy's attempt
/// count and marker only on rescue's routes: `close_relay::decision::RESCUE_ROUTE_PREFIX`).
pub const ROUTE: &str = "close-relay-rescue";
/// The service whose other pods the rig's sidecars rescue to, as Istio names its cluster.
pub const SERVICE: &str = "checkout.shop.svc.cluster.local";
/// The service port the rig's sidecars name their clusters after (each pod's app has its own).
pub const SERVICE_PORT: u16 = 8080;

/// Every request a retry may still be in flight for; Envoy's default of 3 would turn most of a
/// burst of rescues into 503 URX at 1000 requests/s.
const MAX_RETRIES: u32 = 1024;

/// The clusters rescue adds for the inbound port `port`.
pub struct Names {
    /// The local app at a fixed endpoint.
    pub local: String,
    /// The service's other pods (Istio: istiod's `outbound|<port>||<fqdn>`, over EDS).
    pub peers: String,
    /// Local first, then the peers.
    pub aggregate: String,
}

impl Names {
    pub fn for_port(port: u16) -> Names {
        Names {
            local: format!("close-relay-local|{port}"),
            peers: format!("outbound|{port}||{SERVICE}"),
            aggregate: format!("close-relay-rescue|{port}"),
        }
    }
}

/// Methods a proxy may send again after a connection failure, whether or not the app read them
/// (RFC 9110 §9.2.2).
const IDEMPOTENT: &str = "GET|HEAD|OPTIONS|TRACE|PUT|DELETE";

/// The route's retry policy: what is retried, where, how many times, how soon. `idempotent`
/// also retries a connection the app closed or reset after Envoy wrote the request (response
/// flags UC, UR): the keep-alive race with an app closing its idle connections at shutdown,
/// which Envoy cannot tell from a request the app read.
pub fn retry_policy(idempotent: bool) -> Value {
    let on = if idempotent { "connect-failure,refused-stream,reset,retriable-headers" } else { "connect-failure,refused-stream,reset-before-request,retriable-headers" };
    json!({
        "retry_on": on,
        "retriable_headers": [{"name": REFUSED_HEADER, "string_match": {"exact": MARKER}}],
        "num_retries": 2,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1
            }
        },
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}
        }],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.010s"}
    })
}

/// A request whose method a proxy may send again ([`IDEMPOTENT`]).
fn idempotent_method() -> Value {
    json!({"name": ":method", "string_match": {"safe_regex": {"regex": IDEMPOTENT}}})
}

/// `matcher` that also needs `header`.
fn with_header(matcher: &Value, header: Value) -> Value {
    let mut matcher = matcher.clone();
    let mut headers = matcher["headers"].as_array().cloned().unwrap_or_default();
    headers.push(header);
    matcher["headers"] = json!(headers);
    matcher
}

/// A request that is itself a rescue: the local app only, never on.
fn guard(matcher: &Value, local: &str) -> Value {
    let matcher = with_header(matcher, json!({"name": ATTEMPT_COUNT, "range_match": {"start": 2, "end": 1_000_000}}));
    json!({"name": "close-relay-rescue-guard", "match": matcher, "route": {"cluster": local, "timeout": "0s"}})
}

/// The service's other pods over EDS from a file, as istiod serves them over ADS.
fn peers_cluster(name: &str, eds: &Path) -> Value {
    json!({
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {
            "service_name": name,
            "eds_config": {"path_config_source": {"path": eds}, "resource_api_version": "V3"}
        }
    })
}

fn aggregate_cluster(names: &Names) -> Value {
    let limits = |priority: &str| json!({"priority": priority, "max_retries": MAX_RETRIES});
    json!({
        "name": names.aggregate,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "circuit_breakers": {"thresholds": [limits("DEFAULT"), limits("HIGH")]},
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": [names.local, names.peers, names.peers]
            }
        }
    })
}

/// Envoy's own reply when its app did not take the request says so ([`REFUSED_HEADER`]): a
/// refused connection (UF), and, for an idempotent method, a connection the app closed or reset
/// under the request (UC, UR), which a rescue landing on a stopping app meets too (Tomcat's
/// paused connector: 3 such 503s in a held restart at 1200 requests/s).
pub fn refused_reply_mappers() -> Value {
    let mark = json!([{"header": {"key": REFUSED_HEADER, "value": MARKER}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]);
    json!([
        {"filter": {"response_flag_filter": {"flags": ["UF"]}}, "headers_to_add": mark},
        {
            "filter": {"and_filter": {"filters": [
                {"response_flag_filter": {"flags": ["UC", "UR"]}},
                {"header_filter": {"header": idempotent_method()}}
            ]}},
            "headers_to_add": mark
        }
    ])
}

/// Turns the inbound routes to `inbound_cluster` (a STATIC cluster to the app, as the rig builds
/// it) into rescue routes for the app's `port`, with the other pods read from `eds`.
pub fn apply(bootstrap: &mut Value, inbound_cluster: &str, port: u16, eds: &Path) {
    let names = Names::for_port(port);
    crate::sidecar::ensure_node(bootstrap);
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters");
    let mut local = clusters.iter().find(|c| c["name"] == inbound_cluster).cloned().expect("the inbound cluster");
    local["name"] = json!(names.local);
    local["load_assignment"]["cluster_name"] = json!(names.local);
    // The service's cluster speaks what the service's port speaks (istiod: h2 for a grpc or
    // http2 port), as the inbound cluster does here.
    let mut peers = peers_cluster(&names.peers, eds);
    peers["typed_extension_protocol_options"] = local["typed_extension_protocol_options"].clone();
    clusters.extend([local, peers, aggregate_cluster(&names)]);
    for (_, hcm) in crate::istio::inbound_hcms(bootstrap) {
        rescue_hcm(&mut hcm["typed_config"], inbound_cluster, &names);
    }
}

fn rescue_hcm(hcm: &mut Value, inbound_cluster: &str, names: &Names) {
    let mappers = hcm["local_reply_config"]["mappers"].as_array().cloned().unwrap_or_default();
    let ours = refused_reply_mappers().as_array().cloned().unwrap_or_default();
    hcm["local_reply_config"]["mappers"] = json!([mappers, ours].concat());
    for vhost in hcm["route_config"]["virtual_hosts"].as_array_mut().expect("virtual_hosts") {
        vhost["include_request_attempt_count"] = json!(true);
        vhost["include_attempt_count_in_response"] = json!(true);
        let routes = vhost["routes"].as_array().cloned().unwrap_or_default();
        let mut rescued = Vec::new();
        for mut route in routes {
            if route["route"]["cluster"] == inbound_cluster {
                rescued.push(guard(&route["match"], &names.local));
                route["route"]["cluster"] = json!(names.aggregate);
                let mut idempotent = route.clone();
                idempotent["name"] = json!("close-relay-rescue-idempotent");
                idempotent["match"] = with_header(&route["match"], idempotent_method());
                idempotent["route"]["retry_policy"] = retry_policy(true);
                rescued.push(idempotent);
                route["route"]["retry_policy"] = retry_policy(false);
                route["name"] = json!(ROUTE);
            }
            rescued.push(route);
        }
        vhost["routes"] = json!(rescued);
    }
}

/// istiod's push to one sidecar: `envoy` now sees `pods` as the service's endpoints (on the rig's
/// [`SERVICE_PORT`]), once its service cluster counts them all healthy.
pub fn push_eds(envoy: &crate::Envoy, eds: &Path, pods: &[u16]) {
    write_eds(eds, SERVICE_PORT, pods);
    let peers = Names::for_port(SERVICE_PORT).peers;
    let seen = envoy.cluster_healthy_hosts_settling_at(&peers, pods.len() as u64, std::time::Duration::from_secs(10));
    assert_eq!(seen, pods.len() as u64, "the sidecar did not take the EDS push");
}

/// The service's endpoints on `port` as one pod's sidecar sees them: written whole, then moved
/// into place, as Envoy's file watch expects (a push from istiod).
pub fn write_eds(eds: &Path, port: u16, pods: &[u16]) {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let response = json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": Names::for_port(port).peers,
            "endpoints": [{"lb_endpoints": endpoints}]
        }]
    });
    let tmp = eds.with_extension("tmp");
    fs::write(&tmp, response.to_string()).expect("write EDS");
    fs::rename(&tmp, eds).expect("move EDS into place");
}

/// One pod of the service in the e2e suites: an app and its sidecar with rescue on (`filter`:
/// close-relay's pair, or lean), knowing no other pod yet.
pub struct Pod {
    pub app: crate::App,
    pub envoy: crate::Envoy,
    pub eds: std::path::PathBuf,
}

impl Pod {
    pub fn start(name: &str, filter: crate::Filter) -> Pod {
        let app = crate::App::start();
        let eds = crate::scratch(&format!("{name}-eds")).join("peers.json");
        write_eds(&eds, SERVICE_PORT, &[]);
        let mut spec = crate::EnvoySpec::new(filter, app.port);
        spec.rescue = Some(eds.clone());
        let envoy = crate::Envoy::start(name, &spec);
        Pod { app, envoy, eds }
    }

    /// istiod's push: this sidecar now sees `pods` as the service's endpoints.
    pub fn sees(&self, pods: &[&Pod]) {
        push_eds(&self.envoy, &self.eds, &pods.iter().map(|p| p.envoy.port).collect::<Vec<_>>());
    }

    /// A per-host counter of one of this sidecar's clusters, summed (`/clusters`).
    pub fn stat(&self, cluster: &str, stat: &str) -> u64 {
        self.envoy.cluster_host_stat(cluster, stat)
    }

    /// Requests this sidecar sent to the local app, and to other pods.
    pub fn sent(&self) -> (u64, u64) {
        let names = Names::for_port(SERVICE_PORT);
        (self.stat(&names.local, "rq_total"), self.stat(&names.peers, "rq_total"))
    }

    pub fn rescued(&self) -> u64 {
        self.envoy.counter("wasmcustom.close_relay_rescued_total")
    }
}

/// Launches one of the shipped standalone bootstraps with rescue (`envoyfilter/local/<file>`,
/// listening on `listen` with its admin on `admin_port` as shipped) on leased ports: this pod's
/// app on `app_port`, the one other pod of `peers.yaml` on `peer_port`.
pub fn launch_standalone(file: &str, (listen, admin_port): (u16, u16), app_port: u16, peer_port: u16) -> crate::Envoy {
    let local = crate::repo_root().join("envoyfilter/local");
    let text = fs::read_to_string(local.join(file)).expect("read the shipped bootstrap");
    let (port, admin) = (crate::Port::lease(), crate::Port::lease());
    let dir = crate::scratch(&format!("shipped-{}", file.trim_end_matches(".yaml")));
    let peers = fs::read_to_string(local.join("peers.yaml")).expect("read peers.yaml");
    fs::write(dir.join("peers.yaml"), peers.replace("port_value: 8081", &format!("port_value: {peer_port}"))).expect("write peers.yaml");
    let yaml = text
        .replace(&format!("port_value: {listen}"), &format!("port_value: {}", port.get()))
        .replace(&format!("port_value: {admin_port}"), &format!("port_value: {}", admin.get()))
        .replace("port_value: 8080", &format!("port_value: {app_port}"))
        .replace("envoyfilter/local/peers.yaml", &dir.join("peers.yaml").display().to_string());
    fs::write(dir.join("envoy.yaml"), yaml).expect("write envoy.yaml");
    crate::Envoy::launch(dir.clone(), &dir.join("envoy.yaml"), port, admin)
}
