//! The rig's processes and infrastructure: kube-proxy, istiod's endpoint pushes, the kubelet's
//! preStop hook, and the pods (app + Envoy sidecar). The ALB is [`crate::nginx::Nginx`].

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::spec::{AppMode, Row, RunSpec, KUBELET_HOOK_TOKEN};
use crate::servers::RealApp;
use crate::{rescue, scratch, App, Client, Envoy, EnvoySpec, Filter};

/// How long the kubelet waits for a preStop hook: the pod's grace period (30 s by default).
pub const KUBELET_GRACE_MS: u64 = 30_000;

/// The kubelet's `preStop.httpGet` to the pod's port with close-relay's header: a connection of
/// its own, no timeout but the grace period. Returns what the answer said.
pub fn kubelet_prestop(port: u16, grace: Duration) -> String {
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
pub struct Istiod {
    files: Vec<PathBuf>,
    lag: Duration,
    pending: Vec<(Instant, Vec<u16>)>,
}

impl Istiod {
    pub fn new(pods: [&Pod; 2], lag_ms: u64) -> Istiod {
        let files = pods.iter().filter_map(|p| p.envoy_eds.clone()).collect();
        Istiod { files, lag: Duration::from_millis(lag_ms), pending: Vec::new() }
    }

    /// The endpoints now: pushed at once (the pods' start) or after the lag.
    pub fn endpoints(&mut self, ports: Vec<u16>, now: bool) {
        let at = if now { Instant::now() } else { Instant::now() + self.lag };
        self.pending.push((at, ports));
        self.push_due();
    }

    pub fn push_due(&mut self) {
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
        envoy_spec.app_h2c = spec.app.grpc();
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
