//! What Istio does with our manifests, done here so a real Envoy can run the result:
//! - [`apply_envoy_filter`]: istiod applying an EnvoyFilter's patches to a sidecar's inbound
//!   listener, then serving the EXTENSION_CONFIGs over ECDS, with istio-agent rewriting their
//!   `oci://` code to the pulled module's local file;
//! - [`apply_wasm_plugins`]: istiod turning WasmPlugins into ECDS filters (NETWORK ones right
//!   before the HCM, HTTP ones right before the router, in UNSPECIFIED_PHASE).
//!
//! ECDS is served from files (`path_config_source`) instead of istiod's ADS stream. Only the
//! patch operations and matches the shipped manifests use are supported; anything else panics,
//! so a manifest change that this emulation cannot follow fails the test instead of passing
//! unchecked.

use std::fs;
use std::path::Path;

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

/// Istio's bootstrap names the node; xDS subscriptions, file-based ones too, require it.
pub(crate) fn sidecar_node(bootstrap: &mut Value) {
    if bootstrap.get("node").is_none() {
        bootstrap["node"] = json!({"id": "sidecar~127.0.0.1~checkout-0.shop~shop.svc.cluster.local", "cluster": "checkout.shop"});
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
    sidecar_node(bootstrap);
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
        let (apply_to, op) = (p["applyTo"].as_str().expect("applyTo"), &p["patch"]["operation"]);
        if apply_to == "EXTENSION_CONFIG" {
            continue;
        }
        assert_eq!(p["match"]["context"], "SIDECAR_INBOUND", "unsupported match {}", p["match"]);
        assert_eq!(op, "INSERT_BEFORE", "unsupported operation {op}");
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

/// Turns WasmPlugins into ECDS filters on `bootstrap`'s inbound listeners, as istiod does (see
/// the module docs), with `wasm` as the module istio-agent pulled.
pub fn apply_wasm_plugins(bootstrap: &mut Value, plugins: &[Value], wasm: &Path, dir: &Path) {
    sidecar_node(bootstrap);
    for plugin in plugins {
        let spec = &plugin["spec"];
        assert_eq!(plugin["kind"], "WasmPlugin");
        assert_eq!(spec["match"], json!([{"mode": "SERVER"}]), "inbound only");
        assert_eq!(spec["phase"], "UNSPECIFIED_PHASE", "this emulation places UNSPECIFIED_PHASE only");
        assert!(spec["url"].as_str().is_some_and(|u| u.starts_with("oci://")), "url {}", spec["url"]);
        let network = spec["type"] == "NETWORK";
        let name = format!("default.{}", plugin["metadata"]["name"].as_str().expect("name"));
        let resource = json!({
            "name": name,
            "typed_config": {
                "@type": if network { NETWORK_WASM } else { HTTP_WASM },
                "config": {
                    "name": name,
                    "root_id": spec["pluginName"],
                    "failure_policy": if spec["failStrategy"] == "FAIL_OPEN" { "FAIL_OPEN" } else { "FAIL_CLOSED" },
                    "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": wasm}}},
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": spec["pluginConfig"].to_string()
                    }
                }
            }
        });
        let filter = json!({
            "name": name,
            "config_discovery": {
                "config_source": ecds_file(dir, &resource),
                "type_urls": [if network { NETWORK_WASM } else { HTTP_WASM }]
            }
        });
        insert_inbound(bootstrap, if network { Before::Hcm } else { Before::HttpFilter(ROUTER) }, &filter);
    }
}

/// The shipped manifests with the example image replaced by a pushed one (`make push`).
pub const EXAMPLE_IMAGE: &str = "oci://registry.example.com/close-relay:0.1.0";
