//! The shipped manifests, checked with real tools and without an Envoy, so once per `make test`
//! rather than per Envoy version: every manifest and kustomize build against Istio's own CRD
//! schemas (CEL rules included), broken ones refused with the rule named, the alerting rules
//! through promtool, the example overlays, and the plugin configs against `config.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use close_relay::config::{Config, Role};
use e2e::istio::{self, kustomize, run, validate};
use serde_json::{json, Value};

fn root() -> PathBuf {
    e2e::repo_root()
}

fn say(what: &str) {
    eprintln!("[manifests] {what}");
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
        "envoyfilter/lean/trafficextension/trafficextension.yaml",
        "envoyfilter/lean/wasmplugin/wasmplugin.yaml",
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
        ("envoyfilter/lean/trafficextension", 1),
        ("envoyfilter/lean/wasmplugin", 1),
        ("envoyfilter/examples/checkout", 2),
        ("envoyfilter/examples/prestop-token", 2),
        ("envoyfilter/examples/prestop-token-trafficextension", 2),
        // The settings ConfigMap is kustomize's only (local-config): just the EnvoyFilter comes out.
        ("envoyfilter/examples/checkout-rescue", 1),
    ];
    // One validator run for everything: it compiles the schemas once (a second per run).
    let scratch = e2e::scratch("istio-valid");
    let pushed = with_pushed_url();
    let mut built_files = Vec::new();
    for (i, (dir, objects)) in builds.iter().enumerate() {
        let (built, yaml) = kustomize(&pushed.join(dir));
        assert!(built, "kustomize build {dir}: {yaml}");
        let file = scratch.join(format!("build-{i}.yaml"));
        fs::write(&file, yaml).unwrap();
        built_files.push((file, *dir, *objects));
    }
    let all: Vec<&Path> = files.iter().map(PathBuf::as_path).chain(built_files.iter().map(|(f, ..)| f.as_path())).collect();
    let (ok, out) = validate(&all);
    assert!(ok, "{out}");
    let oks = |file: &Path| out.lines().filter(|l| l.starts_with(&format!("ok {}: ", file.display()))).count();
    assert_eq!(files.iter().map(|f| oks(f)).sum::<usize>(), 11, "{out}");
    for (file, dir, objects) in &built_files {
        assert_eq!(oks(file), *objects, "kustomize build {dir}: {out}");
    }
    say(&format!(
        "{} manifests and 8 kustomize builds valid against Istio 1.30.3's CRDs (CEL rules included), Istio 1.29's \
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
            ext.replacen("- {name: HOST_IP, valueFrom: HOST}", "- {name: HOST_IP, valueFrom: HOST, value: x}", 1),
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
fn alerting_rules_pass_promtool_and_fire_on_a_trap_a_reload_a_bad_config_and_a_failed_pull() {
    let dir = e2e::scratch("prometheus-rules");
    let rule = fs::read_to_string(root().join("envoyfilter/monitoring/prometheusrule.yaml")).unwrap();
    rules_for_promtool(&rule, &dir);
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], &dir);
    assert!(ok && out.contains("SUCCESS: 5 rules found"), "{out}");
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
    say("PrometheusRule: Operator schema, promtool check rules, and promtool alert tests (trap, reload, bad config, not running, failed pull)");
}

/// The URL the example overlays carry until the user puts in the one `make push` printed.
const PLACEHOLDER: &str = "<the oci://...@sha256:... URL that make push printed>";
/// What `make push` prints, in the form it prints it.
const PUSHED: &str = "oci://123456789012.dkr.ecr.eu-west-1.amazonaws.com/close-relay@sha256:\
                      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// A copy of the repository's envoyfilter/ with the example overlays' placeholder replaced by a
/// pushed image's URL, as a user's copy is once they follow the overlay's comment.
fn with_pushed_url() -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let p = entry.unwrap().path();
            let dest = to.join(p.file_name().unwrap());
            if p.is_dir() {
                copy(&p, &dest);
            } else {
                fs::write(&dest, fs::read_to_string(&p).unwrap().replace(PLACEHOLDER, PUSHED)).unwrap();
            }
        }
    }
    // Once per test binary: the tests run in parallel, and a scratch dir is emptied when named.
    static COPIED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPIED
        .get_or_init(|| {
            let copied = e2e::scratch("pushed-url");
            copy(&root().join("envoyfilter"), &copied.join("envoyfilter"));
            copied
        })
        .clone()
}

#[test]
fn the_example_overlays_as_shipped_are_refused_until_the_pushed_url_is_put_in() {
    let scratch = e2e::scratch("placeholder-url");
    for dir in ["checkout", "checkout-trafficextension", "prestop-token", "prestop-token-trafficextension"] {
        let raw = fs::read_to_string(root().join("envoyfilter/examples").join(dir).join("kustomization.yaml")).unwrap();
        assert!(!raw.contains("sha256:0000"), "{dir} carries a digest that would pass the API server and fail the pull");
        let (built, yaml) = kustomize(&root().join("envoyfilter/examples").join(dir));
        assert!(built && yaml.contains(PLACEHOLDER), "{dir}: {yaml}");
        let file = scratch.join(format!("{dir}.yaml"));
        fs::write(&file, yaml).unwrap();
        let (ok, out) = validate(&[file.as_path()]);
        assert!(!ok && out.contains("url must have schema one of [http, https, file, oci]"), "{dir} was not refused:\n{out}");
    }
    say("the example overlays, as shipped, are refused by the API server's CEL rule on the url");
}

/// An example overlay's build, with the pushed URL put in: the two plugins, both of `kind`.
fn overlay_pair(dir: &str, kind: &str) -> Vec<Value> {
    let (built, yaml) = kustomize(&with_pushed_url().join("envoyfilter/examples").join(dir));
    assert!(built, "{yaml}");
    let resources = istio::docs(&yaml);
    assert_eq!(resources.len(), 2, "{yaml}");
    assert!(resources.iter().all(|r| r["kind"] == kind), "{yaml}");
    resources
}

#[test]
fn example_overlays_select_one_workload_in_its_namespace() {
    for (dir, kind) in [("checkout", "WasmPlugin"), ("checkout-trafficextension", "TrafficExtension")] {
        for r in &overlay_pair(dir, kind) {
            assert_eq!(r["metadata"]["namespace"], "shop");
            assert_eq!(r["spec"]["selector"]["matchLabels"], json!({"app": "checkout"}));
            let url = if kind == "WasmPlugin" { &r["spec"]["url"] } else { &r["spec"]["wasm"]["url"] };
            assert_eq!(url.as_str(), Some(PUSHED), "{url}");
        }
    }
}

#[test]
fn the_prestop_token_overlays_set_a_token_both_plugins_accept() {
    for (dir, kind) in [("prestop-token", "WasmPlugin"), ("prestop-token-trafficextension", "TrafficExtension")] {
        for r in &overlay_pair(dir, kind) {
            token_set(r, if kind == "WasmPlugin" { &r["spec"]["pluginConfig"] } else { &r["spec"]["wasm"]["pluginConfig"] });
        }
    }
}

/// `r`'s plugin configuration has the overlay's token, and both roles accept it.
fn token_set(r: &Value, plugin_config: &Value) {
    assert_eq!(r["spec"]["selector"]["matchLabels"], json!({"app": "checkout"}));
    let config =
        Config::parse(plugin_config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", r["metadata"]["name"]));
    let token = config.drain.prestop.token.unwrap_or_else(|| panic!("{}: no token", r["metadata"]["name"]));
    assert!(token.matches(b"replace-me-with-your-own-token"));
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

/// The lean plugin shows `lean: true` and the options lean reads, each at its default, and the
/// module parses it as the network role alone.
#[test]
fn the_lean_plugin_is_the_network_role_alone_at_the_defaults() {
    let lean = [
        istio::read_docs(&root().join("envoyfilter/lean/wasmplugin/wasmplugin.yaml")),
        istio::read_docs(&root().join("envoyfilter/lean/trafficextension/trafficextension.yaml")),
    ];
    for docs in lean {
        assert_eq!(docs.len(), 1, "one plugin, the network role");
        let spec = &docs[0]["spec"];
        let (kind, config) = match spec.get("wasm") {
            Some(wasm) => (wasm["type"].clone(), wasm["pluginConfig"].clone()),
            None => (spec["type"].clone(), spec["pluginConfig"].clone()),
        };
        assert_eq!(kind, "NETWORK");
        let parsed = Config::parse(config.to_string().as_bytes()).unwrap();
        assert_eq!(parsed, Config { role: Some(Role::Network), lean: true, ..Config::default() });
        assert!(parsed.check_role(Role::Network).is_ok());
    }
}

/// `make push` writes every manifest a user applies with the pushed image: the pair and the
/// lean plugin, each API (`oci render`).
#[test]
fn make_push_renders_every_manifest_that_names_the_image() {
    let out = e2e::scratch("oci-render");
    let image = format!("oci://registry.example.org/shop/close-relay@sha256:{}", "ab".repeat(32));
    let status = Command::new(env!("CARGO_BIN_EXE_oci")).args(["render", &image]).arg(&out).status();
    assert!(status.is_ok_and(|s| s.success()), "oci render failed");
    for name in ["trafficextension.yaml", "wasmplugin.yaml", "envoyfilter.yaml", "lean-trafficextension.yaml", "lean-wasmplugin.yaml"] {
        let text = fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(&image) && !text.contains(istio::EXAMPLE_IMAGE), "{name} does not name the pushed image");
    }
}

/// The YAML the guide shows a user, fenced (```yaml) or inline (`key: value` with an annotation
/// or label key), from the README and every page of docs/.
fn guide_yaml() -> Vec<(String, String)> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs")).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    docs.sort();
    pages.extend(docs.into_iter().filter(|p| p.extension().is_some_and(|x| x == "md")));
    let mut out = Vec::new();
    for page in pages {
        let text = fs::read_to_string(&page).unwrap();
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("```yaml\n") {
            let body = &rest[at + 8..];
            let end = body.find("```").unwrap_or(body.len());
            // Fenced blocks inside a list item are indented: dedent by the first line's indent.
            let indent = body.len() - body.trim_start_matches(' ').len();
            let block: String = body[..end].lines().map(|l| l.get(indent..).unwrap_or(l.trim_start())).collect::<Vec<_>>().join("\n");
            out.push((format!("{name}, fenced"), block));
            rest = &body[end..];
        }
        // Inline: `a.b/c: value` — an annotation or a label, as a user pastes it.
        for (i, span) in text.split('`').enumerate().filter(|(i, _)| i % 2 == 1) {
            let Some((key, _)) = span.split_once(": ") else { continue };
            if key.contains('/') && !key.contains(' ') && !key.starts_with('/') && !span.contains('\n') && !key.contains("://") {
                out.push((format!("{name}, inline #{i}"), span.to_string()));
            }
        }
    }
    out
}

/// A snippet as part of the whole object a user puts it in: a Deployment's pod template (its
/// annotations, labels, or the app container's `lifecycle`).
fn in_a_deployment(snippet: &Value) -> Value {
    let mut deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "checkout"}},
            "template": {
                "metadata": {"labels": {"app": "checkout"}, "annotations": {}},
                "spec": {"containers": [{"name": "app", "image": "checkout:1"}]}
            }
        }
    });
    let Value::Object(fields) = snippet else { panic!("not a mapping: {snippet}") };
    for (key, value) in fields {
        let template = &mut deployment["spec"]["template"];
        match key.as_str() {
            "lifecycle" => template["spec"]["containers"][0]["lifecycle"] = value.clone(),
            k if k.starts_with("close-relay/") || k == "app" => template["metadata"]["labels"][k] = value.clone(),
            k if k.contains('/') => template["metadata"]["annotations"][k] = value.clone(),
            k => panic!("no place for `{k}` in a Deployment: teach this test where it goes"),
        }
    }
    deployment
}

#[test]
fn every_yaml_the_guide_shows_validates_in_the_object_it_goes_in() {
    let dir = e2e::scratch("guide-yaml");
    let snippets = guide_yaml();
    assert!(snippets.len() >= 5, "found only {snippets:?}");
    let mut files = Vec::new();
    for (i, (place, yaml)) in snippets.iter().enumerate() {
        let parsed = istio::docs(yaml);
        assert_eq!(parsed.len(), 1, "{place}: {yaml}");
        let object = if parsed[0].get("apiVersion").is_some() { parsed[0].clone() } else { in_a_deployment(&parsed[0]) };
        let file = dir.join(format!("snippet-{i}.yaml"));
        fs::write(&file, object.to_string()).unwrap();
        files.push(file);
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, out) = validate(&paths);
    assert!(ok, "{out}\n{snippets:#?}");
    // The mistake the guide once showed: an annotation given a map is refused.
    let wrong = dir.join("wrong.yaml");
    fs::write(&wrong, in_a_deployment(&istio::docs("proxy.istio.io/config: {terminationDrainDuration: 40s}")[0]).to_string()).unwrap();
    let (ok, out) = validate(&[&wrong]);
    assert!(!ok, "an annotation given a map was accepted:\n{out}");
    say(&format!("{} YAML snippets from the README and docs/, each in its whole object", snippets.len()));
}
