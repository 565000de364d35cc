//! `make bench`: what close-relay costs on the common path (keep-alive responses that keep
//! their connection), against Envoy without a filter (the baseline) and the Lua peer, in one
//! run. Interleaved rounds; every figure is a ratio against the baseline of the same round and
//! concurrency; the median over rounds is printed with its min-max.
//! Env: BENCH_ROUNDS (5), BENCH_SECONDS (3), BENCH_CONNS ("1,16,64"), BENCH_CONFIGS.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::Command;

use e2e::rollout::Nginx;
use e2e::{Envoy, EnvoySpec, Filter};
use serde_json::{json, Value};

/// The baseline first; BENCH_CONFIGS=http-only,separate-vms adds the cost breakdown.
fn configs() -> Vec<(&'static str, Filter)> {
    // "disabled": both roles loaded with {"enabled": false}, the bare cost of Envoy calling wasm.
    let mut all = vec![("baseline", Filter::None), ("close-relay", Filter::SameVm), ("lua peer", Filter::Lua)];
    let extra = std::env::var("BENCH_CONFIGS").unwrap_or_default();
    if extra.contains("http-only") {
        all.push(("http-only", Filter::HttpOnly));
    }
    if extra.contains("disabled") {
        all.push(("disabled", Filter::SameVm));
    }
    if extra.contains("separate-vms") {
        all.push(("separate-vms", Filter::SeparateVms));
    }
    all
}

/// Envoy gets a core of its own; wrk and the app share the other, so Envoy's CPU time per
/// request is not blurred by them competing for its core.
const ENVOY_CPU: &str = "1";
const LOAD_CPU: &str = "0";

fn pin(pid: u32, cpu: &str) {
    let ok = Command::new("taskset").args(["-a", "-cp", cpu, &pid.to_string()]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("bench: could not pin {pid} to CPU {cpu}; figures will be noisier");
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Envoy's CPU time so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / ticks
}

fn micros(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => f64::NAN,
    }
}

type Metric = (&'static str, fn(&Sample) -> f64);

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
    rss_kib: f64,
    requests: f64,
}

/// One wrk run against `envoy`; keep-alive, one wrk thread.
fn measure(envoy: &Envoy, conns: u32, seconds: u32) -> Sample {
    let cpu0 = cpu_seconds(envoy.pid());
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "wrk", "-t1", &format!("-c{conns}"), &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{}/", envoy.port))
        .output()
        .expect("run wrk (make bench installs it)");
    let cpu = cpu_seconds(envoy.pid()) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string())).unwrap_or_default()
    };
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let errors = text.lines().any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    assert!(requests > 0.0 && !errors, "wrk against {}:\n{text}", envoy.port);
    Sample {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        p50_us: micros(&field("50%")),
        p99_us: micros(&field("99%")),
        cpu_us_per_req: cpu * 1e6 / requests,
        rss_kib: envoy.rss_kib() as f64,
        requests,
    }
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let seconds: u32 = env_or("BENCH_SECONDS", 3);
    let conns: Vec<u32> = std::env::var("BENCH_CONNS")
        .unwrap_or_else(|_| "1,16,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let out_dir = e2e::repo_root().join("target/bench");
    fs::create_dir_all(&out_dir).expect("target/bench");
    let dir = e2e::scratch("bench");
    let app = Nginx::static_ok(&dir);
    let configs = configs();
    let envoys: Vec<(&str, Envoy)> = configs
        .iter()
        .map(|(name, filter)| {
            let mut spec = EnvoySpec { concurrency: 1, ..EnvoySpec::new(*filter, app.port) };
            if *name == "disabled" {
                spec.http_config = r#"{"enabled": false}"#.into();
                spec.network_config = r#"{"role": "network", "enabled": false}"#.into();
            }
            (*name, Envoy::start(&format!("bench-{}", name.replace(' ', "-")), &spec))
        })
        .collect();
    pin(app.pid(), LOAD_CPU);
    for (_, envoy) in &envoys {
        pin(envoy.pid(), ENVOY_CPU);
        measure(envoy, 16, 1); // warm up: VMs, pools, caches
    }
    // samples[conns][config] = one Sample per round
    let mut samples: BTreeMap<u32, BTreeMap<&str, Vec<Sample>>> = BTreeMap::new();
    for round in 0..rounds {
        for &c in &conns {
            // Rotate the order each round so no configuration always runs first.
            for i in 0..envoys.len() {
                let (name, envoy) = &envoys[(i + round) % envoys.len()];
                let s = measure(envoy, c, seconds);
                eprintln!(
                    "round {} c={c:<3} {name:<12} {:>8.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  cpu {:>5.1} us/req  rss {:>6.0} KiB",
                    round + 1,
                    s.rps,
                    s.p50_us,
                    s.p99_us,
                    s.cpu_us_per_req,
                    s.rss_kib
                );
                samples.entry(c).or_default().entry(name).or_default().push(s);
            }
        }
    }
    let wasm = fs::read(e2e::wasm_path()).expect("wasm");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&wasm).expect("gzip");
    let gz_len = gz.finish().expect("gzip").len();

    let mut table = format!(
        "Envoy {} (1 worker), wrk keep-alive, {rounds} rounds x {seconds} s, app: nginx `200 ok`\n\
         ratio to the baseline of the same round: median (min-max); lower is better except req/s\n\n\
         {:<5} {:<12} {:>22} {:>22} {:>22} {:>22} {:>22}\n",
        e2e::envoy_version(),
        "conns",
        "config",
        "req/s",
        "p50 latency",
        "p99 latency",
        "Envoy CPU per request",
        "Envoy RSS"
    );
    let mut report = Vec::new();
    for (c, by_config) in &samples {
        let base = &by_config["baseline"];
        let b = |f: fn(&Sample) -> f64| median_min_max(base.iter().map(f).collect()).0;
        table.push_str(&format!(
            "{c:<5} {:<12} {:>22} {:>22} {:>22} {:>22} {:>22}\n",
            "baseline",
            format!("{:.0}", b(|s| s.rps)),
            format!("{:.0} us", b(|s| s.p50_us)),
            format!("{:.0} us", b(|s| s.p99_us)),
            format!("{:.1} us", b(|s| s.cpu_us_per_req)),
            format!("{:.0} KiB", b(|s| s.rss_kib)),
        ));
        let mut row = json!({"conns": c, "baseline": {
            "rps": b(|s| s.rps), "p50_us": b(|s| s.p50_us), "p99_us": b(|s| s.p99_us),
            "cpu_us_per_req": b(|s| s.cpu_us_per_req), "rss_kib": b(|s| s.rss_kib),
        }});
        for (name, _) in configs.iter().skip(1) {
            let runs = &by_config[name];
            let ratio = |f: fn(&Sample) -> f64| median_min_max(runs.iter().zip(base).map(|(r, b)| f(r) / f(b)).collect());
            let cell = |(m, lo, hi): (f64, f64, f64)| format!("{m:.3} ({lo:.3}-{hi:.3})");
            let metrics: [Metric; 5] = [
                ("rps", |s| s.rps),
                ("p50", |s| s.p50_us),
                ("p99", |s| s.p99_us),
                ("cpu_per_request", |s| s.cpu_us_per_req),
                ("rss", |s| s.rss_kib),
            ];
            table.push_str(&format!("{c:<5} {name:<12}"));
            let mut ratios = serde_json::Map::new();
            for (key, f) in metrics {
                let r = ratio(f);
                table.push_str(&format!(" {:>22}", cell(r)));
                ratios.insert(key.into(), json!({"median": r.0, "min": r.1, "max": r.2}));
            }
            table.push('\n');
            row[*name] = Value::Object(ratios);
            row[format!("{name} requests")] = json!(runs.iter().map(|s| s.requests).sum::<f64>());
        }
        report.push(row);
    }
    table.push_str(&format!("\n.wasm: {} B raw, {gz_len} B gzipped\n", wasm.len()));
    println!("{table}");
    let json = json!({
        "envoy": e2e::envoy_version(), "rounds": rounds, "seconds": seconds,
        "wasm_bytes": wasm.len(), "wasm_gzip_bytes": gz_len, "results": report,
    });
    fs::write(out_dir.join("report.json"), serde_json::to_string_pretty(&json).unwrap_or_default()).expect("write report");
    fs::write(out_dir.join("table.txt"), &table).expect("write table");
    eprintln!("wrote {}/report.json and table.txt", out_dir.display());
}
