//! One rolling restart under load, step by step as a Deployment with maxSurge 1 does it, and
//! what the ALB saw.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::infra::{kubelet_prestop, Istiod, KubeProxy, Pod, KUBELET_GRACE_MS};
use super::load::{load, Reply, Sample, Speech};
use super::spec::{RunSpec, SidecarMode};
use crate::haproxy::Haproxy;
use crate::nginx::Nginx;
use crate::scratch;

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
    let (alb, speech) = if spec.app.grpc() {
        (Alb::Haproxy(Haproxy::start(&dir, kube.port)), Speech::Grpc)
    } else {
        (Alb::Nginx(Nginx::start(&dir, kube.port)), Speech::Http1)
    };
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let (port, rate, conc, duration, until) =
        (alb.port(), spec.rate_per_s, spec.concurrency, Duration::from_millis(spec.duration_ms), done.clone());
    let load = thread::spawn(move || load(speech, port, rate, conc, duration, start, until));
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

/// The ALB stand-in: nginx for HTTP/1.1, HAProxy for gRPC (HTTP/2 to the pods).
enum Alb {
    Nginx(Nginx),
    Haproxy(Haproxy),
}

impl Alb {
    fn port(&self) -> u16 {
        match self {
            Alb::Nginx(n) => n.port,
            Alb::Haproxy(h) => h.port,
        }
    }
}

fn summarize(spec: &RunSpec, samples: Vec<Sample>, events: Vec<(u64, String)>) -> RunResult {
    let mut statuses = BTreeMap::new();
    let mut five_xx_at = Vec::new();
    let mut conn_errors = 0;
    for s in &samples {
        match s.reply {
            Reply::Status(code) => {
                *statuses.entry(code).or_insert(0) += 1;
                if code >= 500 {
                    five_xx_at.push(s.at_ms);
                }
            }
            Reply::ConnError => conn_errors += 1,
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
