//! The soak: the same mixed load on two stacks side by side, a plain sidecar (the baseline) and
//! a close-relay sidecar, while the same faults hit both on a cycle:
//! - the app is SIGKILLed, then restarted a second later;
//! - Envoy's admin drains (`healthcheck/fail`) and un-drains (`healthcheck/ok`);
//! - the listener is pushed again over LDS, for close-relay with a bad plugin configuration,
//!   then with the good one (as istiod pushes updates; each push drains the old listener).
//!
//! Load, per stack: keep-alive clients (some of whose requests the app ends with close), short
//! connections, an h2c client, large bodies and a slow reader. Every HTTP/1 head is checked for
//! the marker, every large body byte by byte.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{envoy_config, pattern_byte, App, Client, Envoy, EnvoySpec, Filter};

const BIG: usize = 1 << 20;

#[derive(Default)]
pub struct Tally {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    /// (ms since start, what happened), for every request that did not get a good answer.
    pub failures: Mutex<Vec<(u64, String)>>,
    pub leaks: AtomicU64,
    pub corrupt: AtomicU64,
}

impl Tally {
    /// `at`: when the failed request was sent (ms since start), so a slow one counts where it
    /// began.
    fn failed(&self, at: u64, what: String) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.failures.lock() {
            f.push((at, what));
        }
    }

    fn good(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.ok.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Stack {
    pub name: &'static str,
    pub app: Mutex<App>,
    pub envoy: Envoy,
    pub tally: Tally,
    listener: Value,
    pub rss_kib: Mutex<Vec<(u64, u64)>>,
}

impl Stack {
    fn start(name: &'static str, filter: Filter) -> Stack {
        let app = App::start();
        let spec = EnvoySpec::new(filter, app.port);
        let envoy = Envoy::start_lds(&format!("soak-{name}"), &spec);
        let listener = envoy_config(&spec, envoy.port, envoy.admin)["static_resources"]["listeners"][0].clone();
        Stack { name, app: Mutex::new(app), envoy, tally: Tally::default(), listener, rss_kib: Mutex::new(Vec::new()) }
    }

    /// Pushes the listener again; `bad` gives close-relay's roles an invalid configuration
    /// (the baseline's listener only changes its stats prefix, to drain the same way).
    fn push_listener(&self, version: u64, bad: bool) {
        let mut l = self.listener.clone();
        let chain = &mut l["filter_chains"][0]["filters"];
        for f in chain.as_array_mut().into_iter().flatten() {
            let network_wasm = f["typed_config"].get("config").is_some();
            if bad && network_wasm {
                f["typed_config"]["config"]["configuration"] = json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"role\": \"network\", \"bogus\": true}"});
            }
            let hcm = &mut f["typed_config"];
            if hcm["stat_prefix"].is_string() {
                hcm["stat_prefix"] = json!(format!("inbound_v{version}"));
                for h in hcm["http_filters"].as_array_mut().into_iter().flatten() {
                    if bad && h["typed_config"].get("config").is_some() {
                        h["typed_config"]["config"]["configuration"] = json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"bogus\": true}"});
                    }
                }
            }
        }
        self.envoy.swap_listener(&l, version);
    }
}

/// One HTTP/1 request on `c`; false when the connection must be replaced.
fn one(stack: &Stack, start: Instant, c: &mut Client, path: &str, extra: &str) -> bool {
    let at = start.elapsed().as_millis() as u64;
    let sent = c.send(&format!("GET {path} HTTP/1.1\r\nhost: app\r\n{extra}\r\n"));
    let r = match sent.and_then(|_| c.try_response("GET")) {
        Ok(r) => r,
        Err(e) => {
            stack.tally.failed(at, format!("{path}: connection error: {e}"));
            return false;
        }
    };
    if r.leaks_marker() {
        stack.tally.leaks.fetch_add(1, Ordering::Relaxed);
    }
    if path.starts_with("/big") && r.status == 200 && (r.body.len() != BIG || r.body.iter().enumerate().any(|(i, b)| *b != pattern_byte(i))) {
        stack.tally.corrupt.fetch_add(1, Ordering::Relaxed);
    }
    if r.status == 200 {
        stack.tally.good();
    } else {
        stack.tally.failed(at, format!("{path}: {}", r.status));
    }
    !r.says_close()
}

fn http1_worker(stack: &Stack, stop: &AtomicBool, start: Instant, kind: &str) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Client::try_open(stack.envoy.port) else {
            stack.tally.failed(start.elapsed().as_millis() as u64, "connect refused".into());
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let keep = match kind {
                "keep-alive" => one(stack, start, &mut c, if n.is_multiple_of(10) { "/close" } else { "/keep" }, ""),
                "short" => {
                    one(stack, start, &mut c, "/keep", "connection: close\r\n");
                    false
                }
                "big" => one(stack, start, &mut c, "/big", ""),
                _ => slow_big(stack, start, &mut c),
            };
            thread::sleep(Duration::from_millis(if kind == "keep-alive" { 5 } else { 20 }));
            if !keep {
                break;
            }
        }
    }
}

/// A slow reader: asks for a large body and reads it in small pieces with pauses.
fn slow_big(stack: &Stack, start: Instant, c: &mut Client) -> bool {
    let at = start.elapsed().as_millis() as u64;
    if c.send("GET /big HTTP/1.1\r\nhost: app\r\n\r\n").is_err() {
        stack.tally.failed(at, "/big slow: connection error".into());
        return false;
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let piece = c.read_raw(1, Duration::from_secs(3));
        if piece.is_empty() {
            break;
        }
        got.extend_from_slice(&piece);
        if got.windows(4).position(|w| w == b"\r\n\r\n").is_some_and(|h| got.len() >= h + 4 + BIG) {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        stack.tally.failed(at, "/big slow: no response".into());
        return false;
    };
    let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
    if head.contains("x-close-relay") {
        stack.tally.leaks.fetch_add(1, Ordering::Relaxed);
    }
    let body = &got[h + 4..];
    if !head.starts_with("http/1.1 200") {
        stack.tally.failed(at, format!("/big slow: {}", head.lines().next().unwrap_or_default()));
        return !head.contains("connection: close");
    }
    // A wrong byte, or too many, is corruption; a body cut short (the app killed mid-body) is
    // a failed request like any other.
    if body.len() > BIG || body.iter().enumerate().any(|(i, b)| *b != pattern_byte(i)) {
        stack.tally.corrupt.fetch_add(1, Ordering::Relaxed);
    }
    if body.len() != BIG {
        stack.tally.failed(at, format!("/big slow: body of {} bytes", body.len()));
        return false;
    }
    stack.tally.good();
    !head.contains("connection: close")
}

fn h2c_worker(stack: &Stack, stop: &AtomicBool, start: Instant) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    rt.block_on(async {
        while !stop.load(Ordering::Relaxed) {
            let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", stack.envoy.port)).await else {
                stack.tally.failed(start.elapsed().as_millis() as u64, "h2c: connect refused".into());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok((client, conn)) = h2::client::handshake(tcp).await else {
                stack.tally.failed(start.elapsed().as_millis() as u64, "h2c: handshake".into());
                continue;
            };
            let driver = tokio::spawn(conn);
            let mut client = client;
            while !stop.load(Ordering::Relaxed) {
                let Ok(ready) = client.ready().await else { break };
                client = ready;
                let Ok(req) = http::Request::get("http://app/keep").body(()) else { break };
                let Ok((resp, _)) = client.send_request(req, true) else {
                    stack.tally.failed(start.elapsed().as_millis() as u64, "h2c: send".into());
                    break;
                };
                match resp.await {
                    Ok(r) => {
                        if r.headers().keys().any(|k| k.as_str().starts_with("x-close-relay")) {
                            stack.tally.leaks.fetch_add(1, Ordering::Relaxed);
                        }
                        if r.status() == 200 {
                            stack.tally.good();
                        } else {
                            stack.tally.failed(start.elapsed().as_millis() as u64, format!("h2c: {}", r.status()));
                        }
                    }
                    Err(e) => {
                        // A GOAWAY (drain, listener update) ends the connection: reconnect.
                        stack.tally.failed(start.elapsed().as_millis() as u64, format!("h2c: {e}"));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            driver.abort();
        }
    });
}

/// A fault and when it is active (ms since start), for telling failures apart.
#[derive(Debug, Clone)]
pub struct Fault {
    pub what: &'static str,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Fault {
    /// Requests sent shortly before the fault fail with it; 2 s after it things settle.
    fn covers(&self, t: u64) -> bool {
        t + 100 >= self.from_ms && t <= self.to_ms + 2_000
    }
}

pub struct Soak {
    pub stacks: Vec<Arc<Stack>>,
    pub faults: Vec<Fault>,
    pub seconds: u64,
    pub alive: Vec<bool>,
}

/// When each fault of a cycle starts and ends, in ms from the cycle's start.
#[derive(Debug, Clone, Copy)]
pub struct Cycle {
    pub kill: u64,
    pub restart: u64,
    pub drain: u64,
    pub undrain: u64,
    pub bad_push: u64,
    pub good_push: u64,
    /// The end of the cycle's last fault window; the next cycle starts at `length`.
    pub settled: u64,
    pub length: u64,
}

impl Cycle {
    /// `make soak`'s cycle: a fault every few seconds, each given time to settle.
    pub const FULL: Cycle =
        Cycle { kill: 3_000, restart: 4_000, drain: 8_000, undrain: 10_000, bad_push: 13_000, good_push: 16_000, settled: 19_000, length: 20_000 };
    /// `make test`'s: the same faults closer together. The drain stays 2.5 s long, as the
    /// sidecar's health is polled once a second.
    pub const SHORT: Cycle =
        Cycle { kill: 1_500, restart: 2_500, drain: 4_000, undrain: 6_500, bad_push: 8_000, good_push: 9_500, settled: 11_000, length: 11_500 };
}

/// Runs the soak for `seconds`, the faults on `cycle`, at least once.
pub fn run(seconds: u64, cycle: Cycle) -> Soak {
    let stacks: Vec<Arc<Stack>> =
        vec![Arc::new(Stack::start("baseline", Filter::None)), Arc::new(Stack::start("close-relay", Filter::CloseRelay))];
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut workers = Vec::new();
    for stack in &stacks {
        for kind in ["keep-alive", "keep-alive", "keep-alive", "short", "big", "slow", "h2c"] {
            let (stack, stop) = (stack.clone(), stop.clone());
            workers.push(thread::spawn(move || {
                if kind == "h2c" {
                    h2c_worker(&stack, &stop, start);
                } else {
                    http1_worker(&stack, &stop, start, kind);
                }
            }));
        }
    }
    // Envoy's memory, twice a second, for the trend (`Soak::rss_trend`).
    {
        let (stacks, stop) = (stacks.clone(), stop.clone());
        workers.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &stacks {
                    if let Ok(mut r) = s.rss_kib.lock() {
                        r.push((start.elapsed().as_millis() as u64, s.envoy.rss_kib()));
                    }
                }
                thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    // The fault schedule may panic (an Envoy that died refuses its admin port): the workers
    // are stopped and joined first in any case, so every process is stopped by its owner.
    let mut faults = Vec::new();
    let schedule = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let at = |ms: u64| {
            let target = start + Duration::from_millis(ms);
            if let Some(wait) = target.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        };
        let now_ms = || start.elapsed().as_millis() as u64;
        let mut version = 1;
        let mut n = 0;
        while now_ms() + cycle.length <= seconds * 1000 || n == 0 {
            let step = |at: u64| n * cycle.length + at;
            at(step(cycle.kill));
            let from = now_ms();
            for s in &stacks {
                if let Ok(mut app) = s.app.lock() {
                    app.kill();
                }
            }
            at(step(cycle.restart));
            for s in &stacks {
                if let Ok(mut app) = s.app.lock() {
                    app.restart();
                }
            }
            faults.push(Fault { what: "app SIGKILLed and restarted", from_ms: from, to_ms: now_ms() });
            at(step(cycle.drain));
            let from = now_ms();
            for s in &stacks {
                s.envoy.admin_post("/healthcheck/fail");
            }
            at(step(cycle.undrain));
            for s in &stacks {
                s.envoy.admin_post("/healthcheck/ok");
            }
            faults.push(Fault { what: "healthcheck/fail, then ok", from_ms: from, to_ms: now_ms() });
            at(step(cycle.bad_push));
            let from = now_ms();
            version += 1;
            for s in &stacks {
                s.push_listener(version, true);
            }
            at(step(cycle.good_push));
            version += 1;
            for s in &stacks {
                s.push_listener(version, false);
            }
            faults.push(Fault { what: "listener pushed with a bad plugin config, then a good one", from_ms: from, to_ms: now_ms() });
            at(step(cycle.settled));
            n += 1;
        }
        at(seconds * 1000);
    }));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    if let Err(panic) = schedule {
        drop(stacks);
        std::panic::resume_unwind(panic);
    }
    let alive = stacks.iter().map(|s| s.envoy.rss_kib() > 0 && crate::admin_get(s.envoy.admin, "/ready").is_some()).collect();
    Soak { stacks, faults, seconds, alive }
}

impl Soak {
    /// Failures that fall outside every fault window (plus 2 s to settle after it).
    pub fn failures_outside_faults(&self, stack: &Stack) -> Vec<(u64, String)> {
        let f = stack.tally.failures.lock().map(|f| f.clone()).unwrap_or_default();
        f.into_iter()
            .filter(|(t, _)| !self.faults.iter().any(|w| w.covers(*t)))
            .collect()
    }

    /// Failures inside fault windows, by fault.
    pub fn failures_by_fault(&self, stack: &Stack) -> Vec<(&'static str, usize)> {
        let f = stack.tally.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let mut out: Vec<(&'static str, usize)> = Vec::new();
        for w in &self.faults {
            let n = f.iter().filter(|(t, _)| w.covers(*t)).count();
            match out.iter_mut().find(|(what, _)| *what == w.what) {
                Some(e) => e.1 += n,
                None => out.push((w.what, n)),
            }
        }
        out
    }

    /// Envoy's RSS: the median over the second quarter of the run, and over the last quarter.
    pub fn rss_trend(&self, stack: &Stack) -> (u64, u64) {
        let r = stack.rss_kib.lock().map(|r| r.clone()).unwrap_or_default();
        let total = self.seconds * 1000;
        let median = |lo: u64, hi: u64| {
            let mut v: Vec<u64> = r.iter().filter(|(t, _)| *t >= lo && *t <= hi).map(|(_, k)| *k).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        (median(total / 4, total / 2), median(total * 3 / 4, total + 1000))
    }

    pub fn report(&self) -> String {
        let mut out = format!("soak: {} s, {} faults\n", self.seconds, self.faults.len());
        for (s, alive) in self.stacks.iter().zip(&self.alive) {
            let t = &s.tally;
            let (early, late) = self.rss_trend(s);
            out.push_str(&format!(
                "  {:<12} requests {:>6}  ok {:>6}  failed {:>4} (outside faults {})  leaks {}  corrupt bodies {}  \
                 envoy alive {alive}  rss {early} -> {late} KiB\n",
                s.name,
                t.requests.load(Ordering::Relaxed),
                t.ok.load(Ordering::Relaxed),
                t.failures.lock().map(|f| f.len()).unwrap_or(0),
                self.failures_outside_faults(s).len(),
                t.leaks.load(Ordering::Relaxed),
                t.corrupt.load(Ordering::Relaxed),
            ));
            for (what, n) in self.failures_by_fault(s) {
                out.push_str(&format!("    during {what}: {n} failed\n"));
            }
            for (t, what) in self.failures_outside_faults(s).iter().take(5) {
                out.push_str(&format!("    outside faults at {t} ms: {what}\n"));
            }
        }
        let lost = lost_vs_baseline(self);
        out.push_str(&format!("  close-relay failures when the baseline had none within 0.5 s: {}\n", lost.len()));
        out
    }
}

/// close-relay's failures at moments when the baseline, under the same load and faults, had
/// none within half a second: requests the baseline would have served.
pub fn lost_vs_baseline(soak: &Soak) -> Vec<(u64, String)> {
    let failures = |i: usize| soak.stacks[i].tally.failures.lock().map(|f| f.clone()).unwrap_or_default();
    let (baseline, ours) = (failures(0), failures(1));
    ours.into_iter().filter(|(t, _)| !baseline.iter().any(|(b, _)| b.abs_diff(*t) <= 500)).collect()
}

/// The soak's pass criteria for close-relay, against the baseline of the same run.
pub fn verdict(soak: &Soak) -> Result<(), String> {
    let ours = &soak.stacks[1];
    let t = &ours.tally;
    let mut problems = Vec::new();
    if soak.alive.iter().any(|a| !a) {
        problems.push(format!("an Envoy died: alive {:?}", soak.alive));
    }
    if t.leaks.load(Ordering::Relaxed) > 0 {
        problems.push(format!("{} responses leaked the marker", t.leaks.load(Ordering::Relaxed)));
    }
    if t.corrupt.load(Ordering::Relaxed) > 0 {
        problems.push(format!("{} bodies corrupted", t.corrupt.load(Ordering::Relaxed)));
    }
    let lost = lost_vs_baseline(soak);
    if !lost.is_empty() {
        problems.push(format!("{} requests lost that the baseline served, first: {:?}", lost.len(), &lost[..lost.len().min(5)]));
    }
    let (early, late) = soak.rss_trend(ours);
    if late > early + (early / 10).max(8 * 1024) {
        problems.push(format!("Envoy's memory grew: {early} KiB -> {late} KiB"));
    }
    for s in &soak.stacks {
        let rejected = s.envoy.counter("listener_manager.lds.update_rejected");
        let accepted = s.envoy.counter("listener_manager.lds.update_success");
        if rejected > 0 || accepted < 1 + 2 * (soak.faults.len() as u64 / 3) {
            problems.push(format!("{}: listener pushes accepted {accepted}, rejected {rejected}", s.name));
        }
    }
    let count = |name: &str| ours.envoy.counter(&format!("wasmcustom.close_relay_{name}_total"));
    for name in ["relayed", "config_errors", "drain_entered_sidecar_health", "drain_entered_app_failure"] {
        if count(name) == 0 {
            problems.push(format!("close_relay_{name}_total is 0: that part of the soak did not happen"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
