//! Envoy under test: which binary and version, the module it loads, the configurations the
//! suites build (plain, close-relay in either layout, Lua, LDS), and the running Envoy with its
//! admin API.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Client;
use crate::process::{connectable, scratch, Proc};
use crate::{sidecar, wasm};
use crate::{repo_root, Port};

/// The Envoy under test: `$ENVOY`, else the newest one `make envoy` installed under `.envoy/`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = fs::read_dir(repo_root().join(".envoy"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("envoy/_bin/envoy"))
        .filter(|p| p.exists())
        .collect();
    found.sort_by_key(|p| version_key(&p.to_string_lossy()));
    found.pop().unwrap_or_else(|| panic!("no Envoy: run `make envoy` or set ENVOY=/path/to/envoy"))
}

fn version_key(path: &str) -> Vec<u32> {
    path.split(['/', '.']).filter_map(|s| s.parse().ok()).collect()
}

/// `1.40.0` for the Envoy under test (from `envoy --version`: `... version: <sha>/1.40.0/...`).
pub fn envoy_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let out = Command::new(envoy_bin()).arg("--version").output().expect("run envoy --version");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("version: ")
            .nth(1)
            .and_then(|v| v.split('/').nth(1))
            .unwrap_or("unknown")
            .to_string()
    })
}

/// The module as `make build` ships it.
pub fn wasm_path() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| built("target/wasm32-wasip1/release/close_relay.wasm", "make build")).clone()
}

/// The module built with `--features fault-injection` (`make build-fault`): it traps on demand.
pub fn fault_wasm_path() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| built("target/fault/wasm32-wasip1/release/close_relay.wasm", "make build-fault")).clone()
}

/// A module the tests may load: present, and trimmed to close-relay's exports as shipped (a
/// plain `cargo build` leaves every SDK export in, which Envoy would call and we never ship).
/// Checked once per test binary: parsing the module takes a tenth of a second unoptimised.
fn built(path: &str, make: &str) -> PathBuf {
    let p = repo_root().join(path);
    let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}: run `{make}`", p.display()));
    let mut exports = wasm::exports(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut shipped = close_relay::EXPORTS.to_vec();
    exports.sort();
    shipped.sort_unstable();
    assert_eq!(exports, shipped, "{} is not trimmed to its exports: run `{make}`", p.display());
    p
}

/// Where the two roles run: the relay, drain, rollout and soak suites run every scenario in
/// both (`CLOSE_RELAY_LAYOUT=one|split`, `make test` runs each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Both roles in one VM per worker (same vm_id, code and configuration): Istio with an
    /// `oci://` image, and on Envoy < 1.39 any pair of WasmPlugins.
    One,
    /// Each role in its own VM (different vm_ids): EnvoyFilter users who name them apart. The
    /// strictest split: shared data is kept per vm_id too, so nothing but the queue notes
    /// (`src/link.rs`) crosses. Istio's own split (one vm_id, different environments, Envoy
    /// >= 1.39) is tested through its emulation in the istio suite.
    Split,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::One => "one VM",
            Layout::Split => "split VMs",
        }
    }
}

/// The layout under test: `$CLOSE_RELAY_LAYOUT` (`one`, the default, or `split`).
pub fn layout() -> Layout {
    match std::env::var("CLOSE_RELAY_LAYOUT").as_deref() {
        Ok("split") => Layout::Split,
        Ok("one") | Err(_) => Layout::One,
        Ok(other) => panic!("CLOSE_RELAY_LAYOUT={other}: expected one or split"),
    }
}

const VMS_ACTIVE: &str = "wasm.envoy.wasm.runtime.v8.active";

/// The wasm VMs Envoy keeps for close-relay: per VM key one per worker, one for the main thread
/// and the base VM they are cloned from; split VMs have two keys.
pub fn vms_for(concurrency: u32, layout: Layout) -> u64 {
    (u64::from(concurrency) + 2) * if layout == Layout::Split { 2 } else { 1 }
}

/// The layout a settled VM count shows, allowing one VM short per key. Once, on 1.39.3 under
/// CI's load, the count stayed 3 where 4 (one VM) for 20 s while Envoy's log showed both
/// workers' VMs built. One key gives concurrency + 1 or + 2, two keys 2 x that: the ranges
/// never meet, so a wrong layout still fails.
pub fn layout_of_vms(concurrency: u32, vms: u64) -> Option<Layout> {
    [Layout::One, Layout::Split].into_iter().find(|&layout| {
        let keys = if layout == Layout::Split { 2 } else { 1 };
        let full = vms_for(concurrency, layout);
        (full - keys..=full).contains(&vms)
    })
}

/// How close-relay is loaded into the test Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Plain sidecar: the bug.
    None,
    /// Both roles, in the layout under test ([`layout`]).
    CloseRelay,
    /// Each role in its own VM (different vm_id), whatever the layout under test.
    SeparateVms,
    /// Only the HTTP role, a misconfiguration that must not break anything.
    HttpOnly,
    /// The lean configuration: the network role alone (`"lean": true`), no HTTP filter.
    Lean,
    /// The peer a user would pick instead: Envoy's Lua filter asking the HCM to close the
    /// connection after a response whose `Connection` says close (`make bench`).
    Lua,
}

/// The Lua peer: what close-relay's core relay does, in Envoy's built-in Lua.
const LUA_PEER: &str = r#"
function envoy_on_response(response_handle)
  local c = response_handle:headers():get("connection")
  if c ~= nil and string.find(string.lower(c), "close", 1, true) then
    response_handle:streamInfo():drainConnectionUponCompletion()
  end
end
"#;

pub struct EnvoySpec {
    pub filter: Filter,
    pub http_config: String,
    pub network_config: String,
    pub app_port: u16,
    /// Talk HTTP/2 (h2c) to the app, as Istio does for `http2`/`grpc` ports.
    pub app_h2c: bool,
    /// Envoy worker threads; each runs its own copy of the VMs.
    pub concurrency: u32,
    /// `--drain-strategy` (Envoy's default is gradual; Istio runs immediate).
    pub drain_strategy: &'static str,
    /// The inbound listener's `drain_type`: DEFAULT or MODIFY_ONLY.
    pub drain_type: &'static str,
    /// The module both roles load: the release build, or the fault-injection build.
    pub wasm: PathBuf,
    /// What Envoy does when the module traps: FAIL_OPEN (ours), FAIL_CLOSED, FAIL_RELOAD.
    pub failure_policy: &'static str,
    /// The VMs' environment (`vm_config.environment_variables`), as istiod sets it: the
    /// shipped manifests give the plugin the node's IP (`HOST_IP`, the kubelet's source
    /// address; on the rig the kubelet is 127.0.0.1 and other pods are 127.0.0.2 and up).
    pub vm_env: Vec<(String, String)>,
    /// Rescue (`crate::rescue`): the file the service's other pods are read from over EDS.
    pub rescue: Option<PathBuf>,
    /// More apps, each behind a listener of its own like the first ([`Envoy::lanes`]): for
    /// tests that run many independent exchanges at once and must tell apart what each app got.
    pub lanes: Vec<u16>,
}

impl EnvoySpec {
    pub fn new(filter: Filter, app_port: u16) -> EnvoySpec {
        EnvoySpec {
            filter,
            http_config: String::new(),
            network_config: String::new(),
            app_port,
            app_h2c: false,
            concurrency: 2,
            drain_strategy: "immediate",
            drain_type: "DEFAULT",
            wasm: wasm_path(),
            failure_policy: "FAIL_OPEN",
            vm_env: vec![("HOST_IP".into(), crate::KUBELET_IP.into())],
            rescue: None,
            lanes: Vec::new(),
        }
    }
}

impl EnvoySpec {
    /// Where the roles run, when both are loaded.
    pub fn layout(&self) -> Option<Layout> {
        match self.filter {
            Filter::CloseRelay => Some(layout()),
            Filter::SeparateVms => Some(Layout::Split),
            _ => None,
        }
    }
}

fn wasm_filter(spec: &EnvoySpec, kind: &str, root_id: &str, vm_id: &str, config: &str) -> Value {
    let mut vm_config = json!({
        "vm_id": vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": spec.wasm}}
    });
    if !spec.vm_env.is_empty() {
        let values: serde_json::Map<String, Value> = spec.vm_env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        vm_config["environment_variables"] = json!({"key_values": values});
    }
    json!({
        "name": format!("close_relay.{kind}"),
        "typed_config": {
            "@type": format!("type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm"),
            "config": {
                "name": format!("close_relay_{kind}"),
                "root_id": root_id,
                "failure_policy": spec.failure_policy,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config
                },
                "vm_config": vm_config
            }
        }
    })
}

/// The network role's configuration with `"lean": true` added (an empty one: the defaults).
pub fn lean_config(network_config: &str) -> String {
    let mut config: Value = serde_json::from_str(network_config).unwrap_or_else(|_| json!({}));
    config["role"] = json!("network");
    config["lean"] = json!(true);
    config.to_string()
}

/// With `E2E_ACCESS_LOG_DIR` set (an investigation, never the suites), each Envoy logs every
/// request to `<dir>/<listener port>.log`: when it started (epoch seconds), its downstream
/// connection, the status and response flags, the upstream connection it used, how long it took.
fn access_log(listen: u16) -> Value {
    let Some(dir) = std::env::var_os("E2E_ACCESS_LOG_DIR") else { return json!([]) };
    let path = std::path::Path::new(&dir).join(format!("{listen}.log"));
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.to_string_lossy(),
            "log_format": {"text_format_source": {"inline_string":
                "%START_TIME(%s.%3f)% %CONNECTION_ID% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_LOCAL_ADDRESS% %DURATION% %RESPONSE_CODE_DETAILS% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESP(GRPC-STATUS)%%TRAILER(GRPC-STATUS)%\n"}}
        }
    }])
}

/// An Istio-like inbound sidecar listener: [network role] -> HCM([http role] -> router).
pub fn envoy_config(spec: &EnvoySpec, listen: u16, admin: u16) -> Value {
    let (net_vm, http_vm) = match spec.layout() {
        Some(Layout::Split) => ("close_relay_net", "close_relay_http"),
        _ => ("close_relay", "close_relay"),
    };
    let mut filters = Vec::new();
    if matches!(spec.filter, Filter::CloseRelay | Filter::SeparateVms) {
        filters.push(wasm_filter(spec, "network", "close_relay_network", net_vm, &spec.network_config));
    }
    if spec.filter == Filter::Lean {
        filters.push(wasm_filter(spec, "network", "close_relay_network", net_vm, &lean_config(&spec.network_config)));
    }
    let mut http_filters = Vec::new();
    match spec.filter {
        Filter::None | Filter::Lean => {}
        Filter::Lua => http_filters.push(json!({
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": LUA_PEER}
            }
        })),
        _ => http_filters.push(wasm_filter(spec, "http", "close_relay_http", http_vm, &spec.http_config)),
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    filters.push(json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound_0.0.0.0_8080",
            "codec_type": "AUTO",
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "route_config": {
                "name": "inbound|8080||",
                "virtual_hosts": [{
                    "name": "inbound|http|8080", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                                "route": {"cluster": "inbound|8080||", "timeout": "0s"}}]
                }]
            },
            "http_filters": http_filters,
            "access_log": access_log(listen)
        }
    }));
    let address = |port: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let app_protocol = if spec.app_h2c {
        json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }})
    } else {
        json!({})
    };
    let mut bootstrap = json!({
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": address(listen),
                "traffic_direction": "INBOUND",
                "drain_type": spec.drain_type,
                "filter_chains": [{"filters": filters}]
            }],
            "clusters": [
                {
                    "name": "inbound|8080||",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": app_protocol,
                    "load_assignment": {"cluster_name": "inbound|8080||", "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": address(spec.app_port)}}]}]}
                },
                {
                    "name": "prometheus_stats",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "prometheus_stats", "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": address(admin)}}]}]}
                }
            ]
        }
    });
    if let Some(eds) = &spec.rescue {
        crate::rescue::apply(&mut bootstrap, "inbound|8080||", crate::rescue::SERVICE_PORT, eds);
    }
    sidecar::apply(&mut bootstrap, admin);
    bootstrap
}

/// Copies the first listener and its cluster once per lane: `(listen port, app port)`.
fn add_lanes(bootstrap: &mut Value, lanes: &[(u16, u16)]) {
    let resources = &mut bootstrap["static_resources"];
    let (listener, cluster) = (resources["listeners"][0].clone(), resources["clusters"][0].clone());
    for (i, (listen, app)) in lanes.iter().enumerate() {
        let name = format!("inbound|8080||lane{i}");
        let mut l = listener.clone();
        l["name"] = json!(format!("virtualInbound-lane{i}"));
        l["address"]["socket_address"]["port_value"] = json!(listen);
        for filter in l["filter_chains"][0]["filters"].as_array_mut().into_iter().flatten() {
            if let Some(routes) = filter.pointer_mut("/typed_config/route_config/virtual_hosts/0/routes/0/route") {
                routes["cluster"] = json!(name);
            }
        }
        let mut c = cluster.clone();
        c["name"] = json!(name);
        c["load_assignment"]["cluster_name"] = json!(name);
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = json!(app);
        push(&mut resources["listeners"], l);
        push(&mut resources["clusters"], c);
    }
}

fn push(list: &mut Value, item: Value) {
    if let Some(list) = list.as_array_mut() {
        list.push(item);
    }
}

pub struct Envoy {
    pub port: u16,
    pub admin: u16,
    pub dir: PathBuf,
    proc: Proc,
    _leases: [Port; 2],
    /// The listen ports of [`EnvoySpec::lanes`], in order, leased as long as Envoy runs.
    pub lanes: Vec<u16>,
    _lane_leases: Vec<Port>,
    /// Whether close-relay runs here (wasm VMs at start): then the closes are reported on drop.
    wasm: bool,
}

impl Envoy {
    pub fn start(name: &str, spec: &EnvoySpec) -> Envoy {
        Envoy::start_with(name, spec, false)
    }

    /// Like [`Envoy::start`], but the listener comes over LDS from a watched file, so a test
    /// can swap it ([`Envoy::swap_listener`]) as istiod pushes listener updates.
    pub fn start_lds(name: &str, spec: &EnvoySpec) -> Envoy {
        Envoy::start_with(name, spec, true)
    }

    fn start_with(name: &str, spec: &EnvoySpec, lds: bool) -> Envoy {
        let dir = scratch(name);
        let (port, admin) = (Port::lease(), Port::lease());
        let mut config = envoy_config(spec, port.get(), admin.get());
        let lane_leases: Vec<Port> = spec.lanes.iter().map(|_| Port::lease()).collect();
        let lanes: Vec<u16> = lane_leases.iter().map(Port::get).collect();
        add_lanes(&mut config, &lanes.iter().copied().zip(spec.lanes.iter().copied()).collect::<Vec<_>>());
        let args = sidecar::flags(spec.concurrency, spec.drain_strategy);
        if lds {
            let listener = config["static_resources"]["listeners"][0].take();
            config["static_resources"]["listeners"] = json!([]);
            fs::create_dir_all(dir.join("lds")).expect("lds dir");
            config["dynamic_resources"] = json!({"lds_config": {
                "path_config_source": {"path": dir.join("lds/lds.json"), "watched_directory": {"path": dir.join("lds")}},
                "resource_api_version": "V3"
            }});
            write_lds(&dir, &listener, 1);
        }
        let file = dir.join("envoy.json");
        fs::write(&file, config.to_string()).expect("write config");
        let mut envoy = Envoy::launch_with(dir, &file, port, admin, &args);
        (envoy.lanes, envoy._lane_leases) = (lanes, lane_leases);
        if let Some(layout) = spec.layout() {
            let want = vms_for(spec.concurrency, layout);
            let built = envoy.wasm_vms_settling_at(want);
            // Envoy's own count, to tell a wrong layout from a stats read that failed.
            let logged = envoy.log().lines().rev().find(|l| l.contains("now active")).map(str::to_owned);
            assert_eq!(
                layout_of_vms(spec.concurrency, built),
                Some(layout),
                "{name}: {} asked ({want} VMs), but the stats say {built} wasm VMs; Envoy's log: {logged:?}",
                layout.as_str()
            );
            eprintln!("[envoy {}] {name}: {built} wasm VMs ({})", envoy_version(), layout.as_str());
        }
        envoy
    }

    /// Replaces the LDS listener (atomically: write, then move into the watched directory).
    pub fn swap_listener(&self, listener: &Value, version: u64) {
        write_lds(&self.dir, listener, version);
    }

    /// Starts Envoy on a config file that listens on `port` with its admin on `admin`, from
    /// the repository root (where the shipped configs expect to be run), with pilot-agent's
    /// flags at the mesh's default two workers.
    pub fn launch(dir: PathBuf, config: &Path, port: Port, admin: Port) -> Envoy {
        Envoy::launch_workers(dir, config, port, admin, 2)
    }

    /// Like [`Envoy::launch`], with `concurrency` workers (`make bench`).
    pub fn launch_workers(dir: PathBuf, config: &Path, port: Port, admin: Port, concurrency: u32) -> Envoy {
        Envoy::launch_with(dir, config, port, admin, &sidecar::flags(concurrency, "immediate"))
    }

    /// The leases are held as long as Envoy runs: nothing else is handed its ports. Every Envoy
    /// must be a default sidecar's: a stat outside Istio's inclusion list fails here.
    fn launch_with(dir: PathBuf, config: &Path, port_lease: Port, admin_lease: Port, args: &[String]) -> Envoy {
        let (port, admin) = (port_lease.get(), admin_lease.get());
        let log = dir.join("envoy.log");
        let mut proc = Proc::spawn(
            "envoy",
            Command::new(envoy_bin())
                .current_dir(repo_root())
                .arg("-c")
                .arg(config)
                .args(args)
                .arg("--log-path")
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        proc.wait_ready(Duration::from_secs(30), &log, || {
            connectable(port) && admin_get(admin, "/ready").is_some_and(|b| b.contains("LIVE"))
        });
        let stats = admin_get(admin, "/stats").unwrap_or_default();
        if let Err(e) = sidecar::check_stats(&stats) {
            panic!("{}: not a default istio-proxy's stats (Istio's inclusion list missing?): {e}", config.display());
        }
        let mut envoy = Envoy {
            port,
            admin,
            dir,
            proc,
            _leases: [port_lease, admin_lease],
            lanes: Vec::new(),
            _lane_leases: Vec::new(),
            wasm: false,
        };
        envoy.wasm = envoy.wasm_vms() > 0;
        envoy
    }

    /// The guide's debug logging (`POST /logging?wasm=debug`), for a test that reads the
    /// module's info and debug lines: a default sidecar logs at warning, and the module follows
    /// the new level on its next tick.
    pub fn debug_log(&self) {
        self.admin_post("/logging?wasm=debug");
        std::thread::sleep(Duration::from_millis(250));
    }

    /// Whether each role's configuration was accepted (`close_relay_<role>_role_ready`), as a
    /// user verifies it on a default sidecar.
    pub fn roles_ready(&self) -> (u64, u64) {
        let ready = |role| self.counter(&format!("wasmcustom.close_relay_{role}_role_ready"));
        (ready("http"), ready("network"))
    }

    /// Requests a cluster sent, summed over its hosts, from `/clusters`: per-host counters are
    /// not stats, so a default sidecar's inclusion list keeps them.
    pub fn cluster_rq_total(&self, cluster: &str) -> u64 {
        self.cluster_host_stat(cluster, "rq_total")
    }

    /// Hosts of a cluster that Envoy counts healthy, from `/clusters`.
    pub fn cluster_healthy_hosts(&self, cluster: &str) -> u64 {
        let body = admin_get(self.admin, "/clusters").unwrap_or_default();
        let prefix = format!("{cluster}::");
        body.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|rest| rest.ends_with("::health_flags::healthy"))
            .count() as u64
    }

    /// [`Envoy::cluster_healthy_hosts`] once it equals `want`, or its value after `within`.
    pub fn cluster_healthy_hosts_settling_at(&self, cluster: &str, want: u64, within: Duration) -> u64 {
        stat_once(|| self.cluster_healthy_hosts(cluster), within, |v| v == want)
    }

    /// One per-host counter of a cluster (`<cluster>::<host>::<stat>::<value>` lines of
    /// `/clusters`: `cx_total`, `cx_connect_fail`, `rq_total`, `rq_error`, ...), summed.
    pub fn cluster_host_stat(&self, cluster: &str, stat: &str) -> u64 {
        let body = admin_get(self.admin, "/clusters").unwrap_or_default();
        let (prefix, suffix) = (format!("{cluster}::"), format!("::{stat}::"));
        body.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.rsplit_once(&suffix).and_then(|(_, v)| v.trim().parse::<u64>().ok()))
            .sum()
    }

    /// Wasm VMs alive now (`wasm.envoy.wasm.runtime.v8.active`).
    pub fn wasm_vms(&self) -> u64 {
        self.counter(VMS_ACTIVE)
    }

    /// The VM count once it is `want`, or as it is after a while: while Envoy starts, VMs it
    /// builds to check a configuration are counted until they are gone (seen on a loaded machine:
    /// 8 for a moment where 4 remain), and a worker's VM can come well after Envoy answers LIVE
    /// (seen with two suites beside CI: 7 of 8 after 5 s, Envoy logging the 8th just after).
    /// Only a wrong layout waits the whole time.
    pub fn wasm_vms_settling_at(&self, want: u64) -> u64 {
        self.counter_settling_at(VMS_ACTIVE, want, Duration::from_secs(20))
    }

    fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Which way close-relay closed client connections, for the test's output: right after a
    /// relayed response (either layout), on the client's next request (the fallback), or idle.
    fn report_closes(&self) {
        if !self.wasm {
            return;
        }
        let closes = ["connections_closed", "requests_closed", "idle_closed"]
            .map(|c| self.counter(&format!("wasmcustom.close_relay_{c}_total")));
        eprintln!(
            "[envoy {}] {}: {} wasm VMs; closed after the response {}, on the next request {}, idle {}",
            envoy_version(),
            self.name(),
            self.wasm_vms(),
            closes[0],
            closes[1],
            closes[2]
        );
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Wasm log lines only, for failure messages.
    pub fn wasm_log(&self) -> String {
        self.log().lines().filter(|l| l.contains("[wasm]")).collect::<Vec<_>>().join("\n")
    }

    /// The wasm log once it holds every one of `needles` (Envoy flushes its log file on a
    /// timer), or as it is after a few seconds.
    pub fn wasm_log_with(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.wasm_log();
            if needles.iter().all(|n| log.contains(n)) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Envoy's own line for a trapped module (`Function: proxy_on_<callback> failed: ...`),
    /// from the wasm log as it is now.
    pub fn wasm_trap(&self) -> Option<String> {
        self.wasm_log()
            .lines()
            .find(|l| l.contains("Function: proxy_on_") && l.contains("failed"))
            .and_then(|l| l.split("] ").last())
            .map(str::to_owned)
    }

    /// A counter from the admin API; 0 when absent.
    pub fn counter(&self, name: &str) -> u64 {
        let body = admin_get(self.admin, &format!("/stats?filter=^{name}$")).unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every stat whose name matches `regex` (Envoy's `/stats?filter=`), by name, with any
    /// `wasmcustom.` prefix dropped.
    pub fn counters_matching(&self, regex: &str) -> std::collections::BTreeMap<String, u64> {
        let body = admin_get(self.admin, &format!("/stats?filter={regex}")).unwrap_or_default();
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.trim_start_matches("wasmcustom.").to_string(), v.trim().parse().ok()?)))
            .collect()
    }

    /// The counter once it reaches `at_least`, or its value after `within`: for counters that
    /// other VMs bump on their own poll schedule.
    pub fn counter_reaching(&self, name: &str, at_least: u64, within: Duration) -> u64 {
        self.counter_once(name, within, |v| v >= at_least)
    }

    /// A gauge once it equals `want`, or its value after `within`.
    pub fn counter_settling_at(&self, name: &str, want: u64, within: Duration) -> u64 {
        self.counter_once(name, within, |v| v == want)
    }

    /// The counter once `done` says so, or its value after `within`.
    fn counter_once(&self, name: &str, within: Duration, done: impl Fn(u64) -> bool) -> u64 {
        stat_once(|| self.counter(name), within, done)
    }

    /// POST on the admin API (`/healthcheck/fail`, `/drain_listeners?...`).
    pub fn admin_post(&self, path: &str) {
        let mut c = Client::open(self.admin);
        c.send(&format!("POST {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n"))
            .expect("admin post");
        let r = c.response("POST");
        assert_eq!(r.status, 200, "POST {path}: {}", String::from_utf8_lossy(&r.body));
    }

    pub fn prometheus(&self) -> String {
        admin_get(self.admin, "/stats/prometheus").unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Envoy's resident memory (VmRSS) now, in KiB; 0 once it is gone.
    pub fn rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn alive(&mut self) -> bool {
        !self.proc.exited()
    }

    /// Stops Envoy (by PID) as the kubelet does when the sidecar's time is up: SIGTERM, then
    /// SIGKILL if it is still there after a second. SIGTERM lets it flush its log.
    pub fn stop(mut self) {
        self.report_closes();
        self.wasm = false;
        self.proc.terminate();
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.proc.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn connect(&self) -> Client {
        Client::open(self.port)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if !self.proc.exited() {
            self.report_closes();
        }
    }
}

/// What [`in_flight_through_a_drain`] saw.
pub struct InFlight {
    /// From the drain's trigger to the last byte of the pipelined response.
    pub delivered: Duration,
    /// From the trigger to the connection closed by Envoy.
    pub closed: Duration,
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slow stream in flight at the drain: 6 of 6 chunks and the pipelined response delivered over {} ms, \
             then closed {} ms after the trigger",
            self.delivered.as_millis(),
            self.closed.as_millis()
        )
    }
}

/// The pod starts draining (`healthcheck/fail`) while a response is still being written: a
/// chunked stream that pauses longer than any idle grace, with a pipelined request waiting
/// behind it. Both must arrive whole, as through a plain Envoy, and only then may the connection
/// close (it must: the pod is going away). Panics on a lost byte or a connection left open.
pub fn in_flight_through_a_drain(envoy: &Envoy) -> InFlight {
    let mut c = envoy.connect();
    c.send("GET /slow?chunks=6&pause_ms=400 HTTP/1.1\r\nhost: app\r\n\r\nGET /keep HTTP/1.1\r\nhost: app\r\n\r\n")
        .expect("send");
    assert!(c.received(16, Duration::from_secs(3)), "no response started");
    let trigger = Instant::now();
    envoy.admin_post("/healthcheck/fail");
    let slow = c.try_response("GET").unwrap_or_else(|e| panic!("slow stream cut: {e}\n{}", envoy.wasm_log()));
    let expected: String = (0..6).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&slow.body), expected, "slow stream body");
    let pipelined = c.try_response("GET").unwrap_or_else(|e| panic!("pipelined response lost: {e}\n{}", envoy.wasm_log()));
    assert_eq!((pipelined.status, pipelined.body.as_slice()), (200, &b"ok"[..]));
    let delivered = trigger.elapsed();
    assert!(c.closed_by_server(Duration::from_secs(6)), "connection left open after the drain\n{}", envoy.wasm_log());
    InFlight { delivered, closed: trigger.elapsed() }
}

fn write_lds(dir: &Path, listener: &Value, version: u64) {
    let mut resource = listener.clone();
    resource["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
    let response = json!({"version_info": version.to_string(), "resources": [resource]});
    let tmp = dir.join("lds.json.tmp");
    fs::write(&tmp, response.to_string()).expect("write lds");
    fs::rename(&tmp, dir.join("lds/lds.json")).expect("move lds into place");
}

/// The stat `read` gives once `done` says so, or its value after `within`.
fn stat_once(read: impl Fn() -> u64, within: Duration, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let v = read();
        if done(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET on the admin API; `None` when it does not answer 200.
pub fn admin_get(port: u16, path: &str) -> Option<String> {
    let mut c = Client::try_open(port).ok()?;
    c.send(&format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")).ok()?;
    let r = c.try_response("GET").ok()?;
    (r.status == 200).then(|| String::from_utf8_lossy(&r.body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_count_tells_the_layout_one_vm_short_at_most_per_key() {
        let at = |c, vms| layout_of_vms(c, vms);
        assert_eq!([2, 3, 4, 5, 6, 7, 8, 9].map(|v| at(2, v)), [
            None,
            Some(Layout::One),
            Some(Layout::One),
            None,
            Some(Layout::Split),
            Some(Layout::Split),
            Some(Layout::Split),
            None
        ]);
        for c in 1..=16 {
            assert_eq!(at(c, vms_for(c, Layout::One)), Some(Layout::One));
            assert_eq!(at(c, vms_for(c, Layout::Split)), Some(Layout::Split));
        }
    }
}
