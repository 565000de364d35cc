//! `make demo`: the bug and the fix side by side on 127.0.0.1, with real Envoy processes.
//! Starts the app on :8080, a plain sidecar on :10001 and a close-relay sidecar from
//! `envoyfilter/local/envoy.yaml` on :10000, sends the same requests to both, prints what the
//! client (the ALB) sees, and stops everything it started. Then rescue: a sidecar from
//! `envoyfilter/local/envoy-rescue.yaml` on :10002 hands a request its stopped app refuses to
//! "another pod" (an app on :8081, from `envoyfilter/local/peers.yaml`).

use std::time::{Duration, Instant};

use e2e::{scratch, App, Client, Envoy, EnvoySpec, Filter, Port};

fn show(label: &str, port: u16, path: &str) {
    let mut c = Client::open(port);
    let started = Instant::now();
    let r = c.get(path);
    let connection = r.header("connection").unwrap_or("(none)").to_string();
    let socket = if c.closed_by_server(Duration::from_secs(2)) {
        format!("closed by Envoy ({:.1} ms after the request)", started.elapsed().as_secs_f64() * 1e3)
    } else {
        "open, will be reused".to_string()
    };
    println!("  {label:<28} GET {path:<6} -> {} | connection: {connection:<6} | socket {socket}", r.status);
}

fn main() {
    println!("close-relay demo, Envoy {} ({})", e2e::envoy_version(), e2e::envoy_bin().display());
    let app = App::start_on(Port::fixed(8080), &[]);
    let plain = Envoy::start("demo-plain", &EnvoySpec::new(Filter::None, app.port));
    let relay = Envoy::launch(
        scratch("demo-relay"),
        &e2e::repo_root().join("envoyfilter/local/envoy.yaml"),
        Port::fixed(10000),
        Port::fixed(9901),
    );
    println!("app 127.0.0.1:8080 | plain sidecar 127.0.0.1:{} | close-relay sidecar 127.0.0.1:10000\n", plain.port);
    println!("The app is shutting down and answers `Connection: close` (/close):");
    show("sidecar without close-relay", plain.port, "/close");
    show("sidecar with close-relay", relay.port, "/close");
    println!("  -> without the filter the ALB keeps sending into the dying pod; with it, it reconnects.");
    println!("\nA healthy app keeps its connections (/keep), and close-relay leaves them alone:");
    show("sidecar without close-relay", plain.port, "/keep");
    show("sidecar with close-relay", relay.port, "/keep");
    println!("\nThe pod is going away: the sidecar drains (admin /healthcheck/fail). Two idle ALB connections each:");
    let mut idle: Vec<(&str, Client)> = Vec::new();
    for (label, port) in [("sidecar without close-relay", plain.port), ("sidecar with close-relay", relay.port)] {
        for _ in 0..2 {
            let mut c = Client::open(port);
            c.get("/keep");
            idle.push((label, c));
        }
    }
    let drained = Instant::now();
    plain.admin_post("/healthcheck/fail");
    relay.admin_post("/healthcheck/fail");
    std::thread::sleep(Duration::from_millis(2500));
    for (label, c) in idle.iter_mut() {
        let state = if c.open_now() { "still open: the ALB will send its next request into the dying pod" } else { "closed: the ALB reconnects to a healthy pod" };
        println!("  {label:<28} idle connection {:.1} s after the drain began: {state}", drained.elapsed().as_secs_f64());
    }
    println!("\nclose-relay counters (admin 127.0.0.1:9901/stats?filter=close_relay):");
    for line in e2e::admin_get(relay.admin, "/stats?filter=close_relay").unwrap_or_default().lines() {
        if !line.ends_with(": 0") {
            println!("  {line}");
        }
    }
    println!("\nRescue: the app stops accepting, and a request is already on its way (envoy-rescue.yaml, another pod on :8081):");
    let other = App::start_on(Port::fixed(8081), &[]);
    let rescue = Envoy::launch(
        scratch("demo-rescue"),
        &e2e::repo_root().join("envoyfilter/local/envoy-rescue.yaml"),
        Port::fixed(10002),
        Port::fixed(9902),
    );
    let attempt = |port: u16| {
        let mut c = Client::open(port);
        let r = c.get("/keep");
        format!("{} (x-envoy-attempt-count: {}, connection: {})", r.status, r.header("x-envoy-attempt-count").unwrap_or("-"), r.header("connection").unwrap_or("(none)"))
    };
    println!("  app up, rescue sidecar           GET /keep -> {}: answered by its own app", attempt(rescue.port));
    let mut app = app;
    app.kill();
    println!("  app stopped, plain sidecar       GET /keep -> {}", attempt(plain.port));
    println!("  app stopped, rescue sidecar      GET /keep -> {}: answered by the other pod", attempt(rescue.port));
    drop(other);

    println!("\nBy hand, from the repository root:");
    println!("  target/debug/app --port 8080 &");
    println!("  {} -c envoyfilter/local/envoy.yaml &", e2e::envoy_bin().display());
    println!("  curl -sv http://127.0.0.1:10000/close");
    println!("  and rescue: target/debug/app --port 8081 & {} -c envoyfilter/local/envoy-rescue.yaml &", e2e::envoy_bin().display());
}
