//! The rolling restart that gives an ALB 503s behind an Istio sidecar, rebuilt with real
//! processes on 127.0.0.1:
//! load client -> nginx (the ALB: keep-alive pool, `Connection` cleared, no retries) ->
//! kube-proxy (a TCP forwarder choosing a pod per NEW connection, established ones pinned) ->
//! pod = Envoy sidecar (inbound listener like Istio's, with or without close-relay) -> app.
//! A Deployment-style restart (maxSurge 1) replaces pod A by pod B under steady load.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::servers::{RealApp, Server};
use crate::{rescue, scratch, App, Client, Envoy, EnvoySpec, Filter, Port, Proc};

/// How the app shuts down on SIGTERM (see `app --shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppMode {
    CloseHeader,
    CloseIdle,
    /// Serves on for `late_close_ms` after its signal, then `CloseHeader` (not the preStop hook).
    LateClose,
    /// A real app server (`crate::servers`), stopped with its container's signal.
    Real(Server),
}

impl AppMode {
    /// The rig's own app in its three shutdown modes.
    pub const ALL: [AppMode; 3] = [AppMode::CloseHeader, AppMode::CloseIdle, AppMode::LateClose];
    pub const REAL: [AppMode; 5] = [
        AppMode::Real(Server::Nginx),
        AppMode::Real(Server::Go),
        AppMode::Real(Server::Node),
        AppMode::Real(Server::Uvicorn),
        AppMode::Real(Server::Tomcat),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AppMode::CloseHeader => "close-header",
            AppMode::CloseIdle => "close-idle",
            AppMode::LateClose => "late-close",
            AppMode::Real(server) => server.as_str(),
        }
    }
}

/// What the sidecar does when the pod terminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// istio-agent: `drain_listeners?inboundonly&graceful`, wait terminationDrainDuration, stop.
    IstioAgent,
    /// Held until the app exits (EXIT_ON_ZERO_ACTIVE_CONNECTIONS, native sidecars), then stop.
    Held,
}

impl SidecarMode {
    pub const ALL: [SidecarMode; 2] = [SidecarMode::Held, SidecarMode::IstioAgent];

    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::IstioAgent => "istio-agent drain",
            SidecarMode::Held => "held until app exit",
        }
    }
}

/// A row of the report: what the pod runs besides the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// A plain sidecar.
    NoFilter,
    /// close-relay with its default configuration.
    CloseRelay,
    /// close-relay with the settings the README recommends for this app ([`recommended`]).
    Recommended,
    /// close-relay with its defaults, and rescue (`crate::rescue`): a request the app refuses is
    /// handed to pod B.
    Rescue,
    /// The lean configuration (the network role alone, `envoyfilter/lean`) with rescue.
    Lean,
}

impl Row {
    pub const ALL: [Row; 5] = [Row::NoFilter, Row::CloseRelay, Row::Recommended, Row::Rescue, Row::Lean];

    pub fn as_str(self) -> &'static str {
        match self {
            Row::NoFilter => "no filter",
            Row::CloseRelay => "close-relay",
            Row::Recommended => "close-relay, recommended",
            Row::Rescue => "close-relay + rescue",
            Row::Lean => "lean + rescue",
        }
    }
}

/// What the README recommends beside close-relay's defaults, for one app and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setting {
    /// `drain.app_closes.threshold: 1`: the app's first `Connection: close` counts as the pod
    /// going away.
    pub first_close_drains: bool,
    /// The preStop hook first tells the sidecar (`POST /healthcheck/fail` on its admin API),
    /// then sleeps: a held sidecar hears nothing else before the app stops accepting.
    pub prestop_fails_sidecar: bool,
}

impl Setting {
    pub fn describe(self) -> String {
        let mut parts = Vec::new();
        if self.first_close_drains {
            parts.push("drain.app_closes.threshold 1");
        }
        if self.prestop_fails_sidecar {
            parts.push("preStop POSTs the sidecar's healthcheck/fail before its sleep");
        }
        if parts.is_empty() {
            "the defaults".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The recommended setting, from `make rollout`'s measurements (README "Which app server").
/// The rig's app answers every request in flight at SIGTERM with `Connection: close`, so its first
/// close is the earliest signal. The real servers stop within milliseconds of their signal, too
/// soon for a first close to come before the first 503, and Tomcat closes every 100th keep-alive
/// request routinely, which a threshold of 1 would take for a shutdown: they keep the defaults,
/// and a held sidecar needs its preStop to tell it.
pub fn recommended(app: AppMode, sidecar: SidecarMode, prestop: bool) -> Setting {
    match app {
        AppMode::Real(_) => Setting { first_close_drains: false, prestop_fails_sidecar: prestop && sidecar == SidecarMode::Held },
        _ => Setting { first_close_drains: true, prestop_fails_sidecar: false },
    }
}

#[derive(Debug, Clone)]
pub struct RunSpec {
    pub row: Row,
    pub close_relay: bool,
    pub setting: Setting,
    /// Overrides `drain.app_idle_grace_ms` (the idle-close race measurement).
    pub app_idle_grace_ms: Option<u64>,
    pub app: AppMode,
    pub sidecar: SidecarMode,
    /// Endpoint removal lags the SIGTERM by this much.
    pub endpoint_lag_ms: u64,
    pub rate_per_s: u64,
    pub concurrency: usize,
    /// The longest the load runs; it ends sooner, `tail_ms` after pod A's sidecar stops.
    pub duration_ms: u64,
    pub tail_ms: u64,
    /// When the rolling restart begins, from the start of the load.
    pub restart_at_ms: u64,
    /// istio-agent's terminationDrainDuration.
    pub termination_drain_ms: u64,
    pub late_close_ms: u64,
    /// A real server's preStop hook: its stop signal comes this long after the pod's SIGTERM
    /// (the rig's own app has its `late-close` mode instead).
    pub prestop_hook_ms: u64,
    /// The preStop hook is the kubelet's `httpGet` with close-relay's header and token
    /// (`drain.prestop`): the app is signalled once the sidecar answers it.
    pub kubelet_hook: bool,
    pub app_shutdown_timeout_ms: u64,
    /// Held sidecar: how long after the app exits the kubelet stops it (it notices container
    /// exits on its ~1 s PLEG relist).
    pub sidecar_stop_after_app_ms: u64,
    /// How long after an endpoint change the sidecars' service cluster has it (istiod's debounce
    /// and push): until then pod A still lists itself among the pods a rescue may go to.
    pub eds_push_lag_ms: u64,
}

impl RunSpec {
    /// One cell: `row` for `app` under `sidecar`, with a preStop hook of `prestop_hook_ms`.
    pub fn cell(row: Row, app: AppMode, sidecar: SidecarMode, prestop_hook_ms: u64) -> RunSpec {
        let setting = match row {
            Row::Recommended => recommended(app, sidecar, prestop_hook_ms > 0),
            Row::NoFilter | Row::CloseRelay | Row::Rescue | Row::Lean => Setting::default(),
        };
        RunSpec {
            row,
            close_relay: row != Row::NoFilter,
            setting,
            app_idle_grace_ms: None,
            app,
            sidecar,
            endpoint_lag_ms: 0,
            rate_per_s: 200,
            concurrency: 8,
            duration_ms: 12_000,
            tail_ms: 500,
            restart_at_ms: 2_000,
            termination_drain_ms: 5_000,
            late_close_ms: 3_000,
            prestop_hook_ms,
            kubelet_hook: false,
            app_shutdown_timeout_ms: 5_000,
            sidecar_stop_after_app_ms: 1_000,
            eds_push_lag_ms: 1_000,
        }
    }

    /// The load where the last requests on their way to a stopping app show (`make rollout`):
    /// 24 ALB connections, 1200 requests/s, all to pod A until its removal.
    pub fn heavy(self) -> RunSpec {
        RunSpec { rate_per_s: 1_200, concurrency: 24, ..self }
    }

    pub fn rescue(&self) -> bool {
        matches!(self.row, Row::Rescue | Row::Lean)
    }

    /// The recommended row is run only where it differs from the default one.
    pub fn is_redundant(&self) -> bool {
        self.row == Row::Recommended && self.setting == Setting::default()
    }

    /// The close-relay plugin configuration (HTTP role; the network role adds its role).
    pub fn relay_config(&self) -> String {
        let mut drain = serde_json::Map::new();
        if self.setting.first_close_drains {
            drain.insert("app_closes".into(), json!({"enabled": true, "threshold": 1}));
        }
        if let Some(ms) = self.app_idle_grace_ms {
            drain.insert("app_idle_grace_ms".into(), json!(ms));
        }
        // Lean has no HTTP role to answer the hook: the kubelet's request reaches the app.
        if self.kubelet_hook && self.row != Row::Lean {
            drain.insert("prestop".into(), json!({"token": KUBELET_HOOK_TOKEN}));
        }
        if drain.is_empty() {
            String::new()
        } else {
            json!({ "drain": drain }).to_string()
        }
    }

    pub fn filter_label(&self) -> String {
        match self.app_idle_grace_ms {
            Some(ms) => format!("{}, app_idle_grace_ms {ms}", self.row.as_str()),
            None => self.row.as_str().into(),
        }
    }

    pub fn column(&self) -> Column {
        Column { sidecar: self.sidecar, prestop: self.prestop_hook_ms > 0, kubelet_hook: self.kubelet_hook }
    }

    pub fn label(&self) -> String {
        let prestop = if self.kubelet_hook {
            " + kubelet preStop".to_string()
        } else if self.prestop_hook_ms > 0 {
            format!(" + preStop {} s", self.prestop_hook_ms / 1000)
        } else {
            String::new()
        };
        format!("{} | app {}{prestop} | sidecar {}", self.filter_label(), self.app.as_str(), self.sidecar.as_str())
    }
}

/// The token the kubelet-hook column's pods are configured with and its hook sends.
pub const KUBELET_HOOK_TOKEN: &str = "rollout-kubelet-prestop-token";

/// A column of the report: the sidecar mode, and whether the app has a preStop hook: a sleep
/// (`prestop`), or the kubelet's `httpGet` that close-relay answers (`kubelet_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub sidecar: SidecarMode,
    pub prestop: bool,
    pub kubelet_hook: bool,
}

impl Column {
    pub const ALL: [Column; 6] = [
        Column { sidecar: SidecarMode::Held, prestop: false, kubelet_hook: false },
        Column { sidecar: SidecarMode::IstioAgent, prestop: false, kubelet_hook: false },
        Column { sidecar: SidecarMode::Held, prestop: true, kubelet_hook: false },
        Column { sidecar: SidecarMode::IstioAgent, prestop: true, kubelet_hook: false },
        Column { sidecar: SidecarMode::Held, prestop: false, kubelet_hook: true },
        Column { sidecar: SidecarMode::IstioAgent, prestop: false, kubelet_hook: true },
    ];

    pub fn as_str(self) -> &'static str {
        match (self.sidecar, self.prestop, self.kubelet_hook) {
            (SidecarMode::Held, _, true) => "held + kubelet preStop",
            (SidecarMode::IstioAgent, _, true) => "istio drain + kubelet preStop",
            (SidecarMode::Held, false, false) => "held",
            (SidecarMode::IstioAgent, false, false) => "istio drain",
            (SidecarMode::Held, true, false) => "held + preStop",
            (SidecarMode::IstioAgent, true, false) => "istio drain + preStop",
        }
    }

    /// Whether the app's stop waits for a preStop hook of either kind (the real servers only:
    /// the rig's app has its own `prestop` mode).
    pub fn has_hook(self) -> bool {
        self.prestop || self.kubelet_hook
    }
}

/// How long the kubelet waits for a preStop hook: the pod's grace period (30 s by default).
const KUBELET_GRACE_MS: u64 = 30_000;

/// The kubelet's `preStop.httpGet` to the pod's port with close-relay's header: a connection of
/// its own, no timeout but the grace period. Returns what the answer said.
fn kubelet_prestop(port: u16, grace: Duration) -> String {
    let request = format!(
        "GET /prestop HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-lifecycle/1.33\r\n\
         x-close-relay-prestop: {KUBELET_HOOK_TOKEN}\r\n\r\n"
    );
    let Ok(mut c) = Client::try_open(port) else { return "could not connect".into() };
    c.set_timeout(grace);
    match c.send(&request).and_then(|()| c.try_response("GET")) {
        Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body).trim_end()),
        Err(e) => format!("no answer: {e}"),
    }
}

/// A TCP forwarder like kube-proxy: each new connection goes to the next endpoint in the
/// current list; established connections stay where they are.
pub struct KubeProxy {
    pub port: u16,
    endpoints: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
}

impl KubeProxy {
    pub fn start(endpoints: Vec<u16>) -> KubeProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("kube-proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let endpoints = Arc::new(Mutex::new(endpoints));
        let stop = Arc::new(AtomicBool::new(false));
        let (eps, halt) = (endpoints.clone(), stop.clone());
        thread::spawn(move || {
            let next = AtomicUsize::new(0);
            while !halt.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                let target = {
                    let eps = eps.lock().unwrap_or_else(|e| e.into_inner());
                    (!eps.is_empty()).then(|| eps[next.fetch_add(1, Ordering::Relaxed) % eps.len()])
                };
                let upstream = target.and_then(|p| TcpStream::connect(("127.0.0.1", p)).ok());
                match upstream {
                    Some(up) => forward(client, up),
                    None => drop(client), // no endpoint: the connection is refused
                }
            }
        });
        KubeProxy { port, endpoints, stop }
    }

    pub fn set_endpoints(&self, endpoints: Vec<u16>) {
        *self.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = endpoints;
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn forward(client: TcpStream, upstream: TcpStream) {
    let _ = client.set_nonblocking(false);
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let pairs = [
        (client.try_clone(), upstream.try_clone()),
        (upstream.try_clone(), client.try_clone()),
    ];
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from, to) else { return };
        thread::spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => {
                        // A FIN goes on as a FIN, so each side sees the other close.
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            let _ = from.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
        });
    }
}

/// nginx as the ALB: an upstream keep-alive pool over HTTP/1.1, `Connection` cleared toward
/// the targets (so their `Connection: close` is honoured by closing that pooled connection),
/// and no retry of a failed request (`proxy_next_upstream off`), as an ALB does not retry. nginx
/// would also retire each pooled connection after 1000 requests (`keepalive_requests`), which an
/// ALB does not: that alone moved a busy connection to the new pod within seconds.
pub struct Nginx {
    pub port: u16,
    pub(crate) proc: Proc,
    pub(crate) _lease: Port,
}

impl Nginx {
    /// The ALB stand-in: a keep-alive pool to `upstream`, no retries.
    pub fn start(dir: &std::path::Path, upstream: u16) -> Nginx {
        Nginx::launch(
            dir,
            &format!(
                "upstream pods {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 100000000; keepalive_time 1h; }}\n\
                 server {{\n    listen 127.0.0.1:{{port}};\n    location / {{\n      proxy_pass http://pods;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_next_upstream off;\n\
                 proxy_connect_timeout 2s;\n      proxy_read_timeout 5s;\n    }}\n  }}\n"
            ),
        )
    }

    /// The app `make bench` puts behind Envoy, one path per traffic shape: `/` answers `ok`
    /// (2 B), `/64k` and `/1m` are static files of those sizes, `/post` takes a body and
    /// answers `ok`. Keep-alive without limit.
    pub fn bench_app(dir: &std::path::Path) -> Nginx {
        let files = dir.join("files");
        fs::create_dir_all(&files).expect("bench files");
        for (name, len) in [("64k", 64 * 1024), ("1m", 1024 * 1024)] {
            let body: Vec<u8> = (0..len).map(crate::pattern_byte).collect();
            fs::write(files.join(name), body).expect("write bench file");
        }
        Nginx::launch(
            dir,
            &format!(
                "keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  client_max_body_size 1m;\n\
                 default_type application/octet-stream;\n\
                 server {{\n    listen 127.0.0.1:{{port}};\n    root {};\n\
                 location = / {{ return 200 \"ok\"; }}\n    location = /post {{ return 200 \"ok\"; }}\n  }}\n",
                files.display()
            ),
        )
    }

    /// One nginx process (no master) serving `http_block`, in which `{port}` is its port.
    pub(crate) fn launch(dir: &std::path::Path, http_block: &str) -> Nginx {
        let lease = Port::lease();
        let port = lease.get();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  {http}}}\n",
            dir = dir.display(),
            http = http_block.replace("{port}", &port.to_string()),
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, conf).expect("write nginx.conf");
        let nginx = ["/usr/sbin/nginx", "nginx"].into_iter().find(|p| Path::new(p).exists() || *p == "nginx");
        let mut proc = Proc::spawn(
            "nginx",
            Command::new(nginx.unwrap_or("nginx"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        proc.wait_ready(Duration::from_secs(10), &dir.join("error.log"), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Nginx { port, proc, _lease: lease }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

use std::path::Path;

/// A pod's app: the rig's own, or a real server.
pub enum PodApp {
    Rig(App),
    Real(RealApp),
}

impl PodApp {
    pub fn port(&self) -> u16 {
        match self {
            PodApp::Rig(app) => app.port,
            PodApp::Real(app) => app.port,
        }
    }

    /// The container's stop signal.
    pub fn terminate(&self) {
        match self {
            PodApp::Rig(app) => app.terminate(),
            PodApp::Real(app) => app.terminate(),
        }
    }

    pub fn exited(&mut self) -> bool {
        match self {
            PodApp::Rig(app) => app.exited(),
            PodApp::Real(app) => app.exited(),
        }
    }
}

/// istiod's EDS for the service, as the rescue row's sidecars see it: each endpoint change
/// reaches them `lag` later, by a rewrite of each sidecar's file.
struct Istiod {
    files: Vec<PathBuf>,
    lag: Duration,
    pending: Vec<(Instant, Vec<u16>)>,
}

impl Istiod {
    fn new(pods: [&Pod; 2], lag_ms: u64) -> Istiod {
        let files = pods.iter().filter_map(|p| p.envoy_eds.clone()).collect();
        Istiod { files, lag: Duration::from_millis(lag_ms), pending: Vec::new() }
    }

    /// The endpoints now: pushed at once (the pods' start) or after the lag.
    fn endpoints(&mut self, ports: Vec<u16>, now: bool) {
        let at = if now { Instant::now() } else { Instant::now() + self.lag };
        self.pending.push((at, ports));
        self.push_due();
    }

    fn push_due(&mut self) {
        let now = Instant::now();
        while self.pending.first().is_some_and(|(at, _)| *at <= now) {
            let (_, ports) = self.pending.remove(0);
            for file in &self.files {
                rescue::write_eds(file, rescue::SERVICE_PORT, &ports);
            }
        }
    }
}

/// One pod: the app and its Envoy sidecar.
pub struct Pod {
    pub app: PodApp,
    pub envoy: Envoy,
    /// The service's endpoints as this sidecar reads them (rescue only).
    pub envoy_eds: Option<PathBuf>,
}

impl Pod {
    /// Starts and waits until ready (Envoy LIVE, app answering), like a readiness probe.
    pub fn start(name: &str, spec: &RunSpec) -> Pod {
        let app = match spec.app {
            AppMode::Real(server) => PodApp::Real(RealApp::start(server, &scratch(&format!("{name}-app")))),
            mode => {
                let mut args = vec!["--shutdown", mode.as_str()];
                let (late, timeout) = (spec.late_close_ms.to_string(), spec.app_shutdown_timeout_ms.to_string());
                args.extend(["--late-close-ms", &late, "--shutdown-timeout-ms", &timeout]);
                PodApp::Rig(App::start_with(&args))
            }
        };
        let filter = match spec.row {
            Row::NoFilter => Filter::None,
            Row::Lean => Filter::Lean,
            _ => Filter::CloseRelay,
        };
        let mut envoy_spec = EnvoySpec::new(filter, app.port());
        if spec.rescue() {
            let eds = scratch(&format!("{name}-eds")).join("service.json");
            rescue::write_eds(&eds, rescue::SERVICE_PORT, &[]);
            envoy_spec.rescue = Some(eds);
        }
        let config = spec.relay_config();
        envoy_spec.network_config = match config.strip_prefix('{') {
            Some(rest) => format!(r#"{{"role": "network", {rest}"#),
            None => r#"{"role": "network"}"#.into(),
        };
        envoy_spec.http_config = config;
        let envoy = Envoy::start(name, &envoy_spec);
        Pod { app, envoy, envoy_eds: envoy_spec.rescue }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Status(u16),
    /// The client could not talk to the ALB at all.
    ConnError,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_ms: u64,
    pub outcome: Outcome,
}

/// A bounded load: `concurrency` clients, each with its own keep-alive connection to nginx,
/// together sending `rate_per_s` requests per second for `duration` or until `done`.
fn load(port: u16, rate_per_s: u64, concurrency: usize, duration: Duration, start: Instant, done: Arc<AtomicBool>) -> Vec<Sample> {
    let interval = Duration::from_secs_f64(concurrency as f64 / rate_per_s.max(1) as f64);
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let done = done.clone();
            thread::spawn(move || {
                let mut samples = Vec::new();
                let mut conn: Option<Client> = None;
                let mut next = start + interval.mul_f64(i as f64 / concurrency as f64);
                while next < start + duration && !done.load(Ordering::Relaxed) {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    next += interval;
                    let at_ms = start.elapsed().as_millis() as u64;
                    let outcome = match request(&mut conn, port) {
                        Ok((status, close)) => {
                            if close {
                                conn = None;
                            }
                            Outcome::Status(status)
                        }
                        Err(_) => {
                            conn = None;
                            Outcome::ConnError
                        }
                    };
                    samples.push(Sample { at_ms, outcome });
                }
                samples
            })
        })
        .collect();
    let mut all: Vec<Sample> = workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect();
    all.sort_by_key(|s| s.at_ms);
    all
}

fn request(conn: &mut Option<Client>, port: u16) -> io::Result<(u16, bool)> {
    if conn.is_none() {
        *conn = Some(Client::try_open(port)?);
    }
    let c = conn.as_mut().ok_or_else(|| io::Error::other("no connection"))?;
    c.send("GET /keep HTTP/1.1\r\nhost: alb\r\n\r\n")?;
    let r = c.try_response("GET")?;
    Ok((r.status, r.says_close()))
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub spec: RunSpec,
    pub requests: u64,
    pub five_xx: u64,
    pub conn_errors: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// When each 5xx's request was sent, in ms from the start of the load.
    pub five_xx_at: Vec<u64>,
    /// What the rig did, and when.
    pub events: Vec<(u64, String)>,
    /// When pod A's app got its stop signal, from the start of the load.
    pub app_signal_at: u64,
    /// Pod A's close-relay counters (`close_relay_*_total`) just before its sidecar stopped.
    pub counters: BTreeMap<String, u64>,
}

impl RunResult {
    pub fn to_json(&self) -> Value {
        json!({
            "close_relay": self.spec.close_relay,
            "row": self.spec.row.as_str(),
            "filter": self.spec.filter_label(),
            "setting": self.spec.setting.describe(),
            "prestop_hook_ms": self.spec.prestop_hook_ms,
            "close_relay_config": self.spec.relay_config(),
            "app_mode": self.spec.app.as_str(),
            "sidecar_mode": self.spec.sidecar.as_str(),
            "rate_per_s": self.spec.rate_per_s,
            "concurrency": self.spec.concurrency,
            "duration_ms": self.spec.duration_ms,
            "endpoint_lag_ms": self.spec.endpoint_lag_ms,
            "requests": self.requests,
            "five_xx": self.five_xx,
            "conn_errors": self.conn_errors,
            "statuses": self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "five_xx_at_ms": self.five_xx_at,
            "events": self.events.iter().map(|(t, e)| json!({"at_ms": t, "event": e})).collect::<Vec<_>>(),
            "app_signal_at_ms": self.app_signal_at,
            "close_relay_counters": self.counters,
        })
    }
}

/// One rolling restart under load: pod A serves, pod B replaces it (maxSurge 1). Pod B is
/// started beside A, and joins the endpoints when the restart begins.
pub fn run(name: &str, spec: &RunSpec) -> RunResult {
    let dir: PathBuf = scratch(&format!("rollout-{name}"));
    let (a, b) = thread::scope(|s| {
        let b = s.spawn(|| Pod::start(&format!("{name}-b"), spec));
        let a = Pod::start(&format!("{name}-a"), spec);
        (a, b.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    // Pod B is ready before pod A is deleted, so the service already lists both when A goes.
    let mut istiod = Istiod::new([&a, &b], spec.eds_push_lag_ms);
    istiod.endpoints(vec![a.envoy.port, b.envoy.port], true);
    let kube = KubeProxy::start(vec![a.envoy.port]);
    let nginx = Nginx::start(&dir, kube.port);
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let (port, rate, conc, duration, until) =
        (nginx.port, spec.rate_per_s, spec.concurrency, Duration::from_millis(spec.duration_ms), done.clone());
    let load = thread::spawn(move || load(port, rate, conc, duration, start, until));
    let mut events = Vec::new();
    let mut note = |what: &str| events.push((start.elapsed().as_millis() as u64, what.to_string()));
    thread::sleep(Duration::from_millis(spec.restart_at_ms).saturating_sub(start.elapsed()));

    kube.set_endpoints(vec![a.envoy.port, b.envoy.port]);
    note("rollout: pod B ready, added to endpoints");
    let Pod { app: mut app_a, envoy: envoy_a, .. } = a;
    if spec.endpoint_lag_ms == 0 {
        kube.set_endpoints(vec![b.envoy.port]);
        istiod.endpoints(vec![b.envoy.port], false);
        note("pod A removed from endpoints");
    }
    if spec.sidecar == SidecarMode::IstioAgent {
        envoy_a.admin_post("/drain_listeners?inboundonly&graceful");
    }
    let terminated = Instant::now();
    let mut app_signal_at = start.elapsed().as_millis() as u64;
    let mut kubelet_hook = None;
    if spec.kubelet_hook {
        let (port, grace) = (envoy_a.port, Duration::from_millis(KUBELET_GRACE_MS));
        kubelet_hook = Some(thread::spawn(move || kubelet_prestop(port, grace)));
        note("pod A: SIGTERM (sidecar), the kubelet's preStop httpGet sent");
    } else if spec.prestop_hook_ms == 0 {
        app_a.terminate();
        note("pod A: SIGTERM (app and sidecar)");
    } else {
        if spec.setting.prestop_fails_sidecar {
            envoy_a.admin_post("/healthcheck/fail");
        }
        note("pod A: SIGTERM (sidecar), preStop hook running");
    }
    let mut app_signalled = spec.prestop_hook_ms == 0 && !spec.kubelet_hook;
    let mut removed = spec.endpoint_lag_ms == 0;
    let mut app_exited: Option<Instant> = None;
    let mut sidecar_stopped: Option<Instant> = None;
    let mut counters = BTreeMap::new();
    let sidecar_stop_at = match spec.sidecar {
        SidecarMode::IstioAgent => Some(terminated + Duration::from_millis(spec.termination_drain_ms)),
        SidecarMode::Held => None,
    };
    let hook_ms = if spec.kubelet_hook { KUBELET_GRACE_MS } else { spec.prestop_hook_ms };
    let give_up = terminated
        + Duration::from_millis(spec.late_close_ms + hook_ms + spec.app_shutdown_timeout_ms + spec.sidecar_stop_after_app_ms + 5_000);
    let mut envoy_a = Some(envoy_a);
    let tail = Duration::from_millis(spec.tail_ms);
    while sidecar_stopped.is_none_or(|at| at.elapsed() < tail) && Instant::now() < give_up {
        istiod.push_due();
        if !removed && terminated.elapsed() >= Duration::from_millis(spec.endpoint_lag_ms) {
            kube.set_endpoints(vec![b.envoy.port]);
            istiod.endpoints(vec![b.envoy.port], false);
            note("pod A removed from endpoints");
            removed = true;
        }
        if let Some(hook) = kubelet_hook.take_if(|h| h.is_finished()) {
            let answer = hook.join().unwrap_or_else(|_| "the hook's thread panicked".into());
            app_a.terminate();
            app_signalled = true;
            app_signal_at = start.elapsed().as_millis() as u64;
            note(&format!("pod A: kubelet preStop answered after {} ms ({answer}), app signalled", terminated.elapsed().as_millis()));
        }
        if !app_signalled && !spec.kubelet_hook && terminated.elapsed() >= Duration::from_millis(spec.prestop_hook_ms) {
            app_a.terminate();
            app_signalled = true;
            app_signal_at = start.elapsed().as_millis() as u64;
            note("pod A: preStop done, app signalled");
        }
        if app_exited.is_none() && app_a.exited() {
            app_exited = Some(Instant::now());
            note("pod A: app exited");
        }
        let stop = match (sidecar_stop_at, app_exited) {
            (Some(at), _) => Instant::now() >= at,
            (None, Some(exited)) => exited.elapsed() >= Duration::from_millis(spec.sidecar_stop_after_app_ms),
            (None, None) => false,
        };
        if stop {
            if let Some(e) = envoy_a.take() {
                counters = e.counters_matching("close_relay_.*_total");
                if spec.rescue() {
                    // The rescue cluster's retries, and those its circuit breaker refused.
                    counters.extend(e.counters_matching("^cluster\\.close-relay-rescue.[0-9]+\\.upstream_rq_retry"));
                }
                e.stop();
                sidecar_stopped = Some(Instant::now());
                note("pod A: sidecar stopped");
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    done.store(true, Ordering::Relaxed);
    if !removed {
        kube.set_endpoints(vec![b.envoy.port]);
        note("pod A removed from endpoints");
    }
    let samples = load.join().unwrap_or_default();
    note("load done");
    drop(envoy_a);
    RunResult { app_signal_at, counters, ..summarize(spec, samples, events) }
}

fn summarize(spec: &RunSpec, samples: Vec<Sample>, events: Vec<(u64, String)>) -> RunResult {
    let mut statuses = BTreeMap::new();
    let mut five_xx_at = Vec::new();
    let mut conn_errors = 0;
    for s in &samples {
        match s.outcome {
            Outcome::Status(code) => {
                *statuses.entry(code).or_insert(0) += 1;
                if code >= 500 {
                    five_xx_at.push(s.at_ms);
                }
            }
            Outcome::ConnError => conn_errors += 1,
        }
    }
    RunResult {
        spec: spec.clone(),
        requests: samples.len() as u64,
        five_xx: five_xx_at.len() as u64,
        conn_errors,
        statuses,
        five_xx_at,
        events,
        app_signal_at: 0,
        counters: BTreeMap::new(),
    }
}

/// A 5xx is timed when its request was sent: one sent this long before the app's stop signal
/// was still on its way when the app stopped.
const SENT_BEFORE_SIGNAL_MS: i64 = 20;

/// Why a cell is not 0, from what the run saw: the bug itself (no filter), or requests already
/// on the wire that no signal could have saved. Anything else says it is unexplained.
pub fn physics(r: &RunResult) -> Option<String> {
    if r.five_xx == 0 {
        return None;
    }
    let n = r.five_xx;
    let errors = r.statuses.iter().filter(|(code, _)| **code >= 500).map(|(c, k)| format!("{k}x {c}")).collect::<Vec<_>>().join(", ");
    // Each 5xx in ms after the app's stop signal (negative: before it).
    let after: Vec<i64> = r.five_xx_at.iter().map(|t| *t as i64 - r.app_signal_at as i64).collect();
    let (first, last) = (after.first().copied().unwrap_or(0), after.last().copied().unwrap_or(0));
    let only_502_503 = r.statuses.iter().all(|(code, _)| *code < 500 || *code == 502 || *code == 503);
    let at_most_one_each = n <= r.spec.concurrency as u64;
    let told_early = r.spec.prestop_hook_ms > 0 && (r.spec.sidecar == SidecarMode::IstioAgent || r.spec.setting.prestop_fails_sidecar);
    let head = format!("{n} 5xx ({errors}), {first} to {last} ms after the app's stop signal");
    if r.spec.row == Row::NoFilter {
        return Some(match r.spec.sidecar {
            SidecarMode::Held => format!(
                "{head}: the bug. Nothing closes the ALB's connections to pod A, so each request on \
                 them met a 503 from the app's signal until the sidecar stopped."
            ),
            SidecarMode::IstioAgent => format!(
                "{head}: Envoy's own drain adds `connection: close` to each response on a busy ALB \
                 connection, but requests already sent to pod A when the app stopped accepting had \
                 no app to reach, and an idle connection learns of the drain only on its next \
                 request (envoy#42305)."
            ),
        });
    }
    if r.spec.rescue() {
        return Some(format!(
            "{head}: lost with rescue on, where pod B could have answered: not explained by physics, a defect to investigate ({:?})",
            r.statuses
        ));
    }
    let explained = match r.spec.app {
        _ if r.spec.app_idle_grace_ms.is_some_and(|g| g > 0) && only_502_503 && at_most_one_each => format!(
            "{head}: close-relay left idle ALB connections open for {} ms once the app refused \
             connections, so each one the ALB reused in that time met a 503 (which then closed it).",
            r.spec.app_idle_grace_ms.unwrap_or(0)
        ),
        AppMode::Real(server) if after.iter().any(|t| *t < 0) && r.spec.setting.first_close_drains => format!(
            "{head}: before any shutdown, {server} closed a keep-alive connection as routine ({routine}), \
             the first close drained the pod, and an idle ALB connection was closed at the instant \
             nginx reused it (the idle-close race): `drain.app_closes.threshold: 1` is wrong for this server.",
            server = server.as_str(),
            routine = server.routine_close().unwrap_or("its own limit")
        ),
        AppMode::Real(server) if only_502_503 && at_most_one_each && first >= -SENT_BEFORE_SIGNAL_MS && !told_early => format!(
            "{head}, at the physical limit: {shutdown}. {reached} and nothing could tell the sidecar \
             sooner: {why}. close-relay closed that ALB connection with its 503 \
             (`close_on_connect_failure`) and every idle one at once (`app_failure`){crossed}. Each \
             ALB connection met at most one. Zero needs the sidecar told before the app stops: a \
             preStop hook (held sidecar: one that POSTs healthcheck/fail).",
            shutdown = server.shutdown(),
            reached = match r.statuses.get(&503) {
                Some(1) => "A request reached pod A after the app stopped accepting and found no app to connect to,".into(),
                Some(k) => format!("{k} requests reached pod A after the app stopped accepting and found no app to connect to,"),
                None => "No request met a refused connection,".into(),
            },
            why = if r.spec.prestop_hook_ms > 0 {
                "a preStop sleep alone tells a held sidecar nothing"
            } else {
                "the endpoint removal and the stop signal come together"
            },
            crossed = match r.statuses.get(&502) {
                Some(k) => format!(
                    "; {k} request(s) the ALB had just put on an idle connection as close-relay closed it crossed \
                     that close on the wire (502, the idle-close race: left open, that connection's \
                     next request would have met a 503 instead)"
                ),
                None => String::new(),
            }
        ),
        AppMode::Real(_) => format!("{head}: not explained by physics, a defect to investigate ({:?})", r.statuses),
        AppMode::CloseIdle => format!(
            "{n} 5xx: at SIGTERM the app closed all its idle connections and refused new ones at \
             the same instant, before any drain signal; a request reaching pod A then had no \
             upstream at all. close-relay closes each such ALB connection on its first 503 (UF) \
             and drains the rest, so each ALB connection meets at most one."
        ),
        AppMode::CloseHeader | AppMode::LateClose if !r.spec.setting.first_close_drains => format!(
            "{n} 5xx: once shutting down, the app refused new connections; Envoy's pooled \
             connections to it carried one more answer each (relayed as close), but the ALB held \
             more idle connections to the pod than that, and with the default configuration \
             nothing says 'pod going away' before the first 503 (which then drains the rest). \
             With a held sidecar, `drain.app_closes.threshold: 1` makes the app's first close \
             that signal (next row)."
        ),
        AppMode::CloseHeader | AppMode::LateClose if at_most_one_each => format!(
            "{n} 5xx: the app stopped accepting at SIGTERM and its first close drained the pod; \
             close-relay then closed every idle ALB connection at once, but a request the ALB had \
             just put on one of them crossed that close (502), or a request that reached pod A \
             before the first close needed a new connection to the app (503 UF). Each ALB \
             connection meets at most one ({} here at most); a loaded machine widens both windows. \
             Zero needs the ALB to stop using the pod before the app stops accepting: a preStop \
             delay with the sidecar drained.",
            r.spec.concurrency
        ),
        _ => format!("{n} 5xx not explained by physics: a defect to investigate ({:?})", r.statuses),
    };
    Some(explained)
}

/// The apps the results cover, in the order they first appear.
fn apps_in(results: &[RunResult]) -> Vec<AppMode> {
    let mut apps = Vec::new();
    for r in results {
        if !apps.contains(&r.spec.app) {
            apps.push(r.spec.app);
        }
    }
    apps
}

/// The report table: one row group per app (no filter, close-relay, recommended), columns =
/// sidecar mode x preStop hook. A recommended cell that equals the default shows `= close-relay`.
pub fn table(results: &[RunResult], header: &str) -> String {
    let matrix: Vec<&RunResult> = results.iter().filter(|r| r.spec.app_idle_grace_ms.is_none()).collect();
    let mut out = format!("{header}\ncells: requests / 5xx / connection errors; - = not run\n\n");
    out.push_str(&format!("{:<14}{:<26}", "app", ""));
    for c in Column::ALL {
        out.push_str(&format!("| {:<22}", c.as_str()));
    }
    out.push('\n');
    let apps = apps_in(results);
    for &app in &apps {
        for row in Row::ALL {
            let name = if row == Row::NoFilter { app.as_str() } else { "" };
            out.push_str(&format!("{name:<14}{:<26}", row.as_str()));
            for c in Column::ALL {
                let found = matrix.iter().rev().find(|r| r.spec.app == app && r.spec.row == row && r.spec.column() == c);
                let cell = match found {
                    Some(r) => format!("{} / {} / {}", r.requests, r.five_xx, r.conn_errors),
                    None if row == Row::Recommended && recommended(app, c.sidecar, c.prestop) == Setting::default() => {
                        "= close-relay".into()
                    }
                    None => "-".into(),
                };
                out.push_str(&format!("| {cell:<22}"));
            }
            out.push('\n');
        }
    }
    out.push_str("\n\"Istio-style drain only\" = the no-filter row, istio drain columns.\nrecommended:\n");
    for &app in &apps {
        // Columns grouped by the setting recommended there, in column order.
        let mut groups: Vec<(Setting, Vec<&str>)> = Vec::new();
        for c in Column::ALL.into_iter().filter(|c| matrix.iter().any(|r| r.spec.app == app && r.spec.column() == *c)) {
            let setting = recommended(app, c.sidecar, c.prestop);
            match groups.iter_mut().find(|(s, _)| *s == setting) {
                Some((_, cols)) => cols.push(c.as_str()),
                None => groups.push((setting, vec![c.as_str()])),
            }
        }
        let described: Vec<String> = groups.iter().map(|(s, cols)| format!("{} ({})", s.describe(), cols.join(", "))).collect();
        out.push_str(&format!("  {}: {}\n", app.as_str(), described.join("; ")));
    }
    for r in results {
        if let Some(why) = physics(r) {
            out.push_str(&format!("physics, {}: {why}\n", r.spec.label()));
        }
    }
    for r in results.iter().filter(|r| r.spec.rescue()) {
        let stat = |suffix: &str| r.counters.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v).sum::<u64>();
        out.push_str(&format!(
            "rescue, {}: {} responses rescued; Envoy retried {} requests, {} refused by the retry circuit breaker\n",
            r.spec.label(),
            stat("close_relay_rescued_total"),
            stat(".upstream_rq_retry"),
            stat(".upstream_rq_retry_overflow")
        ));
    }
    out
}

/// 5xx per 250 ms over time, one panel per app, one line per row x column.
pub fn chart(results: &[RunResult], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let apps = apps_in(results);
    if apps.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (1200, 260 * apps.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((apps.len(), 1));
    let bucket = 250u64;
    let end = results.iter().flat_map(|r| r.events.last().map(|e| e.0)).max().unwrap_or(1000);
    let buckets = |r: &RunResult| {
        let mut counts = vec![0u64; (end / bucket + 1) as usize];
        for t in &r.five_xx_at {
            if let Some(c) = counts.get_mut((t / bucket) as usize) {
                *c += 1;
            }
        }
        counts
    };
    let peak = results.iter().flat_map(buckets).max().unwrap_or(0).max(1);
    // One hue per row (red: no filter, blue: close-relay, green: recommended), darker with a preStop.
    let color = |r: &RunResult| {
        let shade = |c: (u8, u8, u8)| {
            let k = if r.spec.column().has_hook() { 2 } else { 1 };
            let k = if r.spec.sidecar == SidecarMode::Held { k } else { k + 1 };
            RGBColor(c.0 / k, c.1 / k, c.2 / k)
        };
        match r.spec.row {
            Row::NoFilter => shade((230, 40, 40)),
            Row::CloseRelay => shade((40, 90, 230)),
            Row::Recommended => shade((20, 170, 60)),
            Row::Rescue => shade((150, 40, 200)),
            Row::Lean => shade((230, 140, 20)),
        }
    };
    for (panel, app) in panels.iter().zip(apps) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("app {}: 5xx per {bucket} ms at the ALB", app.as_str()), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(25)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..end as f64 / 1000.0, 0u64..peak + 1)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("seconds").draw().map_err(|e| e.to_string())?;
        for r in results.iter().filter(|r| r.spec.app == app) {
            let counts = buckets(r);
            let c = color(r);
            let points = counts.iter().enumerate().map(|(b, n)| ((b as u64 * bucket) as f64 / 1000.0, *n));
            let label = format!("{} / {} ({} 5xx)", r.spec.filter_label(), r.spec.column().as_str(), r.five_xx);
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
