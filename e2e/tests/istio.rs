//! Shipping to Istio, on each Envoy: the EnvoyFilter and the WasmPlugin pair turned into Envoy
//! config as istiod and istio-agent would, run by a real Envoy on the core relay story; the OCI
//! image pushed to a real registry (Debian's docker-registry) with `make push` and pulled back
//! with skopeo. The manifests' own checks, which need no Envoy, are in `tests/manifests.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::istio::{self, kustomize, run, validate, EXAMPLE_IMAGE};
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
    // As the guide verifies it on a default sidecar (warning level): by the metrics alone.
    assert_eq!(envoy.roles_ready(), (1, 1), "a role is not running:\n{}", envoy.wasm_log());
    let log = envoy.wasm_log();
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
         data:\n  service: {}\n  servicePort: \"{}\"\n  targetPort: \"{target_port}\"\n  marker: {}\n",
        rescue::SERVICE,
        rescue::SERVICE_PORT,
        rescue::MARKER
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
        let stat = |cluster: &str| self.envoy.cluster_rq_total(cluster);
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
    assert_eq!(names, ["close-relay-rescue-guard", "close-relay-rescue-idempotent", rescue::ROUTE]);
    assert_eq!(rescue_route(routes, "close-relay-rescue-idempotent")["route"]["retry_policy"], rescue::retry_policy(true));
    assert_eq!(rescue_route(routes, rescue::ROUTE)["route"]["retry_policy"], rescue::retry_policy(false));
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
            assert_eq!(e2e::layout_of_vms(2, built), Some(layout), "{kind} {scheme}: {built} wasm VMs Envoy built, {want} expected");
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
