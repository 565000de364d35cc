//! `make bench`: what close-relay costs, next to what it is compared with, in one run.
//!
//! Configurations: Envoy without a filter (the baseline), the Lua peer, the floor module
//! (`e2e/floor`: both roles, nothing but the exports a filter needs), close-relay disabled and
//! close-relay as shipped; the wasm ones loaded the way the shipped WasmPlugins load them (one
//! VM, their pluginConfig); and close-relay with the roles in split VMs, as Envoy >= 1.39 builds
//! the same pair from a `file://` module (the layouts in docs/how-it-works.md). Traffic shapes: a tiny GET, ALB-like request headers with a 64 KiB
//! response, a 1 MiB response, a 16 KiB POST (wrk, HTTP/1.1), and a tiny GET over HTTP/2 (h2load,
//! h2c with prior knowledge, as an ALB's HTTP2 and GRPC target groups speak to the pods).
//!
//! CPU: one Envoy worker pinned to its own core, wrk and the app on the other; rounds
//! interleaved, each configuration's CPU per request divided by the baseline's of the same round
//! and shape; the median over rounds with its min-max. Memory: each configuration again at
//! `--concurrency 2` (Istio's default), its RSS after traffic of every shape.
//!
//! Env: BENCH_ROUNDS (5), BENCH_SECONDS (3), BENCH_CONNS (16), BENCH_SHAPES (all, by key),
//! BENCH_RSS_ROUNDS (up to 3), BENCH_WASM (`label=path,...`: more modules loaded as shipped, for
//! ablation builds).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::nginx::Nginx;
use e2e::{istio, Envoy, EnvoySpec, Filter, Port};
use serde_json::{json, Value};

/// Envoy gets a core of its own; wrk and the app share the other, so Envoy's CPU time per
/// request is not blurred by them competing for its core.
const ENVOY_CPU: &str = "1";
const LOAD_CPU: &str = "0";

/// A traffic shape: what the client sends (a wrk Lua script, or h2load's path) and what the
/// app answers.
struct Shape {
    key: &'static str,
    title: &'static str,
    script: String,
    /// h2load over h2c (prior knowledge) instead of wrk over HTTP/1.1: the ALB's HTTP/2 and
    /// gRPC target groups; Envoy speaks HTTP/1.1 to the app either way.
    h2: bool,
}

/// What an ALB puts on every request it forwards, about 900 bytes of headers in all.
const ALB_HEADERS: [(&str, &str); 10] = [
    ("x-forwarded-for", "203.0.113.195, 198.51.100.17"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-port", "443"),
    ("x-amzn-trace-id", "Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8;Sampled=1"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-language", "en-US,en;q=0.9,de;q=0.8"),
    ("referer", "https://shop.example.com/catalog/category/outdoor-equipment?page=3&sort=price-asc"),
    (
        "cookie",
        "session=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c; \
         cart=8f14e45fceea167a5a36dedd4bea2543; consent=analytics%3Dtrue%26ads%3Dfalse; AWSALB=Xk2c7aQ9mZ3bT1pR8vL0yN5wE4uH6jG; \
         AWSALBCORS=Xk2c7aQ9mZ3bT1pR8vL0yN5wE4uH6jG; theme=dark; locale=en-US",
    ),
];

fn shapes() -> Vec<Shape> {
    let alb: String = ALB_HEADERS.iter().map(|(k, v)| format!("wrk.headers[\"{k}\"] = \"{v}\"\n")).collect();
    let post_body = "x".repeat(16 * 1024);
    let all = vec![
        Shape { key: "tiny", title: "tiny GET, 2 B body", script: "wrk.path = \"/\"\n".into(), h2: false },
        Shape {
            key: "alb",
            title: "ALB-like: 10 request headers (~900 B), 64 KiB body",
            script: format!("wrk.path = \"/64k\"\n{alb}"),
            h2: false,
        },
        Shape { key: "1m", title: "1 MiB response", script: "wrk.path = \"/1m\"\n".into(), h2: false },
        Shape {
            key: "post",
            title: "16 KiB POST, 2 B body",
            script: format!(
                "wrk.method = \"POST\"\nwrk.path = \"/post\"\nwrk.headers[\"content-type\"] = \"application/octet-stream\"\n\
                 wrk.body = \"{post_body}\"\n"
            ),
            h2: false,
        },
        Shape {
            key: "h2",
            title: "HTTP/2 (h2c): tiny GET, 2 B body, 10 streams at once per connection",
            script: "/".into(),
            h2: true,
        },
    ];
    let wanted = std::env::var("BENCH_SHAPES").unwrap_or_default();
    all.into_iter().filter(|s| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == s.key)).collect()
}

/// How a configuration's Envoy is built.
#[derive(Clone)]
enum Setup {
    /// One of the rig's own configurations (no filter, the Lua peer).
    Plain(Filter),
    /// The shipped WasmPlugin pair with this module; `disabled` replaces each pluginConfig by
    /// `{"role": ..., "enabled": false}`; `file` names the module by `file://`, which splits
    /// the roles into two VMs on Envoy >= 1.39.
    Shipped { wasm: PathBuf, disabled: bool, file: bool },
    /// The shipped lean WasmPlugin (envoyfilter/lean): the network role alone.
    Lean { wasm: PathBuf },
}

struct Config {
    name: String,
    setup: Setup,
}

fn configs() -> Vec<Config> {
    let release = e2e::wasm_path();
    let floor = e2e::repo_root().join("target/wasm32-wasip1/release/floor.wasm");
    assert!(floor.exists(), "{} missing: `make bench` builds it", floor.display());
    let mut all = vec![
        Config { name: "baseline".into(), setup: Setup::Plain(Filter::None) },
        Config { name: "lua peer".into(), setup: Setup::Plain(Filter::Lua) },
        Config { name: "floor".into(), setup: Setup::Shipped { wasm: floor, disabled: false, file: false } },
        Config { name: "disabled".into(), setup: Setup::Shipped { wasm: release.clone(), disabled: true, file: false } },
        Config { name: "close-relay".into(), setup: Setup::Shipped { wasm: release.clone(), disabled: false, file: false } },
        Config { name: "lean".into(), setup: Setup::Lean { wasm: release.clone() } },
    ];
    if istio::vm_key_has_environment(e2e::envoy_version()) {
        let setup = Setup::Shipped { wasm: release, disabled: false, file: true };
        all.push(Config { name: "close-relay split VMs".into(), setup });
    }
    for extra in std::env::var("BENCH_WASM").unwrap_or_default().split(',').filter(|s| !s.trim().is_empty()) {
        let (label, path) = extra.split_once('=').unwrap_or_else(|| panic!("BENCH_WASM wants label=path, got {extra:?}"));
        let wasm = PathBuf::from(path.trim());
        assert!(wasm.exists(), "BENCH_WASM: {} missing", wasm.display());
        all.push(Config { name: label.trim().into(), setup: Setup::Shipped { wasm, disabled: false, file: false } });
    }
    // Modules loaded as the lean plugin is, for its ablations.
    for extra in std::env::var("BENCH_LEAN_WASM").unwrap_or_default().split(',').filter(|s| !s.trim().is_empty()) {
        let (label, path) = extra.split_once('=').unwrap_or_else(|| panic!("BENCH_LEAN_WASM wants label=path, got {extra:?}"));
        let wasm = PathBuf::from(path.trim());
        assert!(wasm.exists(), "BENCH_LEAN_WASM: {} missing", wasm.display());
        all.push(Config { name: label.trim().into(), setup: Setup::Lean { wasm } });
    }
    all
}

fn shipped_plugins(disabled: bool) -> Vec<Value> {
    let mut plugins = istio::read_docs(&e2e::repo_root().join("envoyfilter/wasmplugin/wasmplugin.yaml"));
    if disabled {
        for p in &mut plugins {
            let role = p["spec"]["pluginConfig"]["role"].clone();
            p["spec"]["pluginConfig"] = json!({"role": role, "enabled": false});
        }
    }
    plugins
}

/// Starts `config`'s Envoy with `concurrency` workers at istio-proxy's log level.
fn start(config: &Config, app_port: u16, concurrency: u32, tag: &str) -> Envoy {
    let dir = e2e::scratch(&format!("bench-{}-{tag}", config.name.replace(' ', "-")));
    let (port, admin) = (Port::lease(), Port::lease());
    let filter = match &config.setup {
        Setup::Plain(filter) => *filter,
        Setup::Shipped { .. } | Setup::Lean { .. } => Filter::None,
    };
    let mut bootstrap = e2e::envoy_config(&EnvoySpec::new(filter, app_port), port.get(), admin.get());
    if let Setup::Shipped { wasm, disabled, file } = &config.setup {
        let mut plugins = shipped_plugins(*disabled);
        if *file {
            plugins = istio::with_url(&plugins, &format!("file://{}", wasm.display()));
        }
        istio::apply_extensions(&mut bootstrap, &plugins, wasm, &dir);
    }
    if let Setup::Lean { wasm } = &config.setup {
        let plugins = istio::read_docs(&e2e::repo_root().join("envoyfilter/lean/wasmplugin/wasmplugin.yaml"));
        istio::apply_extensions(&mut bootstrap, &plugins, wasm, &dir);
    }
    let file = dir.join("envoy.json");
    fs::write(&file, bootstrap.to_string()).expect("write envoy.json");
    Envoy::launch_workers(dir, &file, port, admin, concurrency)
}

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

struct Sample {
    rps: f64,
    cpu_us_per_req: f64,
}

/// One wrk run of `script` against `envoy`: keep-alive, one wrk thread, on the load core. A run
/// with socket errors is run again, twice at most: a stall of the whole machine (wrk's own
/// clock stopped for seconds, every configuration alike) times requests out, and the figure
/// would measure the stall, not Envoy. Errors every time are Envoy's: the bench stops.
fn measure(envoy: &Envoy, load: &Load, conns: u32, seconds: u32) -> Sample {
    let run = || match load {
        Load::Wrk(script) => try_measure(envoy, script, conns, seconds),
        Load::H2load(path) => try_h2load(envoy, path, conns, seconds),
    };
    for attempt in 1..3 {
        match run() {
            Ok(sample) => return sample,
            Err(text) => eprintln!("bench: the load against {} saw errors (attempt {attempt}), measuring again:\n{text}", envoy.port),
        }
    }
    run().unwrap_or_else(|text| panic!("the load against {}, three times:\n{text}", envoy.port))
}

/// What drives a shape: wrk with its script, or h2load with a path.
enum Load {
    Wrk(PathBuf),
    H2load(String),
}

/// Streams h2load keeps open on each connection at once.
const H2_STREAMS: u32 = 10;

/// One h2load run over h2c (prior knowledge), `conns` connections with [`H2_STREAMS`] streams
/// each, one thread, on the load core; like [`try_measure`], any failed request is an error.
fn try_h2load(envoy: &Envoy, path: &str, conns: u32, seconds: u32) -> Result<Sample, String> {
    let cpu0 = cpu_seconds(envoy.pid());
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "h2load", "-t1", &format!("-c{conns}"), &format!("-m{H2_STREAMS}"), &format!("-D{seconds}")])
        .arg(format!("http://127.0.0.1:{}{path}", envoy.port))
        .output()
        .expect("run h2load (make bench installs it)");
    let cpu = cpu_seconds(envoy.pid()) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    // "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, 0 errored, 0 timeout"
    let field = |line: &str, name: &str| -> Option<f64> {
        let words: Vec<&str> = line.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
        words.windows(2).find(|w| w[1] == name).and_then(|w| w[0].parse().ok())
    };
    let requests = text.lines().find(|l| l.starts_with("requests:"));
    let succeeded = requests.and_then(|l| field(l, "succeeded")).unwrap_or(0.0);
    let failed = requests.and_then(|l| Some(field(l, "failed")? + field(l, "errored")? + field(l, "timeout")?));
    let non_2xx = text.lines().find(|l| l.starts_with("status codes:")).and_then(|l| {
        Some(field(l, "3xx")? + field(l, "4xx")? + field(l, "5xx")?)
    });
    if succeeded == 0.0 || failed != Some(0.0) || non_2xx != Some(0.0) {
        return Err(text.into_owned());
    }
    // "finished in 3.00s, 12345.67 req/s, 1.23MB/s"
    let rps = text.lines().find(|l| l.starts_with("finished in")).and_then(|l| field(l, "req/s")).unwrap_or(0.0);
    Ok(Sample { rps, cpu_us_per_req: cpu * 1e6 / succeeded })
}

fn try_measure(envoy: &Envoy, script: &Path, conns: u32, seconds: u32) -> Result<Sample, String> {
    let cpu0 = cpu_seconds(envoy.pid());
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "wrk", "-t1", &format!("-c{conns}"), &format!("-d{seconds}s"), "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", envoy.port))
        .output()
        .expect("run wrk (make bench installs it)");
    let cpu = cpu_seconds(envoy.pid()) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let errors = text.lines().any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if requests == 0.0 || errors {
        return Err(text.into_owned());
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok(Sample { rps, cpu_us_per_req: cpu * 1e6 / requests })
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip").len()
}

/// The goal's verdict on one figure.
fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let seconds: u32 = env_or("BENCH_SECONDS", 3);
    let conns: u32 = env_or("BENCH_CONNS", 16);
    let out_dir = e2e::repo_root().join("target/bench");
    fs::create_dir_all(&out_dir).expect("target/bench");
    let dir = e2e::scratch("bench");
    let app = Nginx::bench_app(&dir);
    pin(app.pid(), LOAD_CPU);
    let shapes = shapes();
    let scripts: Vec<Load> = shapes
        .iter()
        .map(|s| {
            if s.h2 {
                return Load::H2load(s.script.clone());
            }
            let path = dir.join(format!("{}.lua", s.key));
            fs::write(&path, &s.script).expect("write wrk script");
            Load::Wrk(path)
        })
        .collect();
    let configs = configs();

    // CPU: one pinned worker per configuration, all running side by side, measured in turn.
    let envoys: Vec<Envoy> = configs.iter().map(|c| start(c, app.port, 1, "c1")).collect();
    for envoy in &envoys {
        pin(envoy.pid(), ENVOY_CPU);
        for script in &scripts {
            measure(envoy, script, conns, 1); // warm up: VMs, pools, caches
        }
    }
    // cpu[shape][config][round]
    let mut cpu: Vec<Vec<Vec<Sample>>> =
        shapes.iter().map(|_| configs.iter().map(|_| Vec::new()).collect()).collect();
    for round in 0..rounds {
        for (s, script) in scripts.iter().enumerate() {
            // Rotate the order each round so no configuration always runs first.
            for i in 0..envoys.len() {
                let c = (i + round) % envoys.len();
                let sample = measure(&envoys[c], script, conns, seconds);
                eprintln!(
                    "round {} {:<5} {:<14} {:>8.0} req/s  cpu {:>7.2} us/req",
                    round + 1,
                    shapes[s].key,
                    configs[c].name,
                    sample.rps,
                    sample.cpu_us_per_req
                );
                cpu[s][c].push(sample);
            }
        }
    }
    drop(envoys);

    // Memory: each configuration at Istio's two workers, after traffic of every shape; the
    // rounds interleave so a slow drift of the machine hits every configuration alike.
    let rss_rounds: usize = env_or("BENCH_RSS_ROUNDS", rounds.clamp(1, 3));
    let mut rss: Vec<Vec<f64>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..rss_rounds {
        for (c, config) in configs.iter().enumerate() {
            let envoy = start(config, app.port, 2, &format!("c2-{round}"));
            for script in &scripts {
                measure(&envoy, script, conns, 1);
            }
            std::thread::sleep(Duration::from_millis(300));
            rss[c].push(envoy.rss_kib() as f64 / 1024.0);
            envoy.stop();
        }
    }

    let (table, report) = render(&shapes, &configs, &cpu, &rss, rounds, seconds, conns);
    println!("{table}");
    fs::write(out_dir.join("report.json"), serde_json::to_string_pretty(&report).unwrap_or_default())
        .expect("write report");
    fs::write(out_dir.join("table.txt"), &table).expect("write table");
    eprintln!("wrote {}/report.json and table.txt", out_dir.display());
}

fn render(
    shapes: &[Shape],
    configs: &[Config],
    cpu: &[Vec<Vec<Sample>>],
    rss: &[Vec<f64>],
    rounds: usize,
    seconds: u32,
    conns: u32,
) -> (String, Value) {
    let index = |name: &str| configs.iter().position(|c| c.name == name).expect("configuration");
    let (base, lua, floor, relay, lean) =
        (index("baseline"), index("lua peer"), index("floor"), index("close-relay"), index("lean"));
    let mut t = format!(
        "Envoy {} (one worker pinned to its own core), app nginx, wrk -c{conns} keep-alive (HTTP/2: h2load -c{conns} \
         -m{H2_STREAMS}), {rounds} interleaved rounds x {seconds} s\n\
         CPU per request: ratio to the baseline of the same round, median (min-max); us per request, median\n",
        e2e::envoy_version(),
    );
    let mut shape_reports = Vec::new();
    let mut goals = Vec::new();
    for (s, shape) in shapes.iter().enumerate() {
        t.push_str(&format!("\n{}\n", shape.title));
        t.push_str(&format!("  {:<14} {:>24} {:>10} {:>10} {:>10}\n", "config", "CPU/request ratio", "us/req", "+us", "req/s"));
        let us = |c: usize| median_min_max(cpu[s][c].iter().map(|x| x.cpu_us_per_req).collect()).0;
        // Configuration `a`'s CPU per request over `b`'s, per round, so a round's noise cancels.
        let ratio = |a: usize, b: usize| {
            median_min_max(cpu[s][a].iter().zip(&cpu[s][b]).map(|(x, y)| x.cpu_us_per_req / y.cpu_us_per_req).collect())
        };
        let mut rows = serde_json::Map::new();
        for (c, config) in configs.iter().enumerate() {
            let (m, lo, hi) = ratio(c, base);
            let rps = median_min_max(cpu[s][c].iter().map(|x| x.rps).collect()).0;
            let cell = if c == base { "1".to_string() } else { format!("{m:.3} ({lo:.3}-{hi:.3})") };
            let extra = if c == base { "-".to_string() } else { format!("{:+.2}", us(c) - us(base)) };
            t.push_str(&format!("  {:<14} {:>24} {:>10.2} {:>10} {:>10.0}\n", config.name, cell, us(c), extra, rps));
            rows.insert(
                config.name.clone(),
                json!({"cpu_ratio": {"median": m, "min": lo, "max": hi}, "cpu_us_per_request": us(c), "rps": rps}),
            );
        }
        let (vs_lua, vs_floor) = (ratio(relay, lua), ratio(relay, floor));
        goals.push(format!(
            "  {:<6} close-relay / lua peer {:.3} ({:.3}-{:.3}): <= 1 {}; close-relay / floor {:.3} ({:.3}-{:.3}): <= 1.05 {}",
            shape.key,
            vs_lua.0,
            vs_lua.1,
            vs_lua.2,
            verdict(vs_lua.0 <= 1.0),
            vs_floor.0,
            vs_floor.1,
            vs_floor.2,
            verdict(vs_floor.0 <= 1.05)
        ));
        let lean_vs_lua = ratio(lean, lua);
        goals.push(format!(
            "  {:<6} lean / lua peer {:.3} ({:.3}-{:.3}): <= 1.10 {}",
            shape.key,
            lean_vs_lua.0,
            lean_vs_lua.1,
            lean_vs_lua.2,
            verdict(lean_vs_lua.0 <= 1.10)
        ));
        shape_reports.push(json!({
            "shape": shape.key, "title": shape.title, "configs": rows,
            "close_relay_vs_lua": {"median": vs_lua.0, "min": vs_lua.1, "max": vs_lua.2},
            "close_relay_vs_floor": {"median": vs_floor.0, "min": vs_floor.1, "max": vs_floor.2},
            "lean_vs_lua": {"median": lean_vs_lua.0, "min": lean_vs_lua.1, "max": lean_vs_lua.2},
        }));
    }

    let mut rss_report = serde_json::Map::new();
    if !rss[0].is_empty() {
        let rss_mb: Vec<(f64, f64, f64)> = rss.iter().map(|v| median_min_max(v.clone())).collect();
        t.push_str(&format!("\nEnvoy RSS at --concurrency 2 after traffic of every shape, MB, median of {} (min-max)\n", rss[0].len()));
        t.push_str(&format!("  {:<14} {:>24} {:>10}\n", "config", "RSS", "+MB"));
        for (c, config) in configs.iter().enumerate() {
            let (m, lo, hi) = rss_mb[c];
            let extra = if c == base { "-".to_string() } else { format!("{:+.1}", m - rss_mb[base].0) };
            t.push_str(&format!("  {:<14} {:>24} {:>10}\n", config.name, format!("{m:.1} ({lo:.1}-{hi:.1})"), extra));
            rss_report.insert(config.name.clone(), json!({"median": m, "min": lo, "max": hi}));
        }
        let rss_over_floor = rss_mb[relay].0 - rss_mb[floor].0;
        goals.push(format!("  RSS    close-relay - floor {rss_over_floor:+.1} MB: <= 4 MB {}", verdict(rss_over_floor <= 4.0)));
        let lean_over_floor = rss_mb[lean].0 - rss_mb[floor].0;
        goals.push(format!("  RSS    lean - floor {lean_over_floor:+.1} MB: <= 6 MB {}", verdict(lean_over_floor <= 6.0)));
    }
    t.push_str("\n.wasm\n");
    let mut sizes = serde_json::Map::new();
    for config in configs {
        if let Setup::Shipped { wasm, disabled: false, file: false } | Setup::Lean { wasm } = &config.setup {
            let bytes = fs::read(wasm).expect("read .wasm");
            let gz = gzip_len(&bytes);
            t.push_str(&format!("  {:<14} {:>8} B raw {:>8} B gzipped\n", config.name, bytes.len(), gz));
            sizes.insert(config.name.clone(), json!({"raw": bytes.len(), "gzip": gz}));
        }
    }
    t.push_str(
        "\ngoals (close-relay's CPU per request at or below the Lua peer's, within 5% of the floor's; RSS within 4 MB of \
         the floor's; lean's CPU within 10% of the Lua peer's, its RSS within 6 MB of the floor's)\n",
    );
    for g in &goals {
        t.push_str(g);
        t.push('\n');
    }
    let report = json!({
        "envoy": e2e::envoy_version(), "rounds": rounds, "seconds": seconds, "conns": conns,
        "shapes": shape_reports, "rss_mb_concurrency_2": rss_report, "wasm_bytes": sizes,
    });
    (t, report)
}
