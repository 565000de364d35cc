//! `make rollout`: the rolling-restart matrix. Row groups per app (the rig's own app in its three
//! shutdown modes, then the real app servers): no filter, close-relay, close-relay with the
//! recommended setting, close-relay with rescue; columns: sidecar held or drained by istio-agent, without and with a
//! preStop hook (real servers). Prints the table and writes `target/rollout/report.json` and
//! `target/rollout/5xx.svg`.
//! The gRPC group (a @grpc/grpc-js service, HAProxy as the ALB speaking h2 to the pods, gRPC
//! calls as the load) has no lean row: lean follows HTTP/1.1 only.
//! `ROLLOUT_APPS=rig|real|grpc` runs one group only (real and grpc: `make app-servers`);
//! `ROLLOUT_ONLY=go` (a substring of the run label) runs a subset;
//! `ROLLOUT_REPEAT=N` runs each N times (the table shows the last, the JSON all);
//! `ROLLOUT_PRESTOP_HOOK_MS=N` sets the preStop columns' hook (3000);
//! `ROLLOUT_RACE=N` adds the idle-close race measurement, N runs per setting.

use std::fs;

use e2e::rollout::{chart, describe, explain, run, table, AppMode, Column, RunResult, RunSpec, Row, SidecarMode};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run_named(spec: &RunSpec, i: u64) -> RunResult {
    let name: String = format!("{}-{i}", spec.label())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let r = run(&name, spec);
    eprintln!("  {:<80} {} requests, {} 5xx, {} connection errors", spec.label(), r.requests, r.five_xx, r.conn_errors);
    r
}

/// The matrix's cells, in report order, at the heavier load ([`RunSpec::heavy`]): the rig's app has its own `prestop` mode, so the preStop
/// columns are for the real servers; a recommended cell equal to the default is not run again.
fn matrix(prestop_hook_ms: u64) -> Vec<RunSpec> {
    let apps: Vec<AppMode> = match std::env::var("ROLLOUT_APPS").as_deref() {
        Ok("rig") => AppMode::ALL.to_vec(),
        Ok("real") => AppMode::REAL.to_vec(),
        Ok("grpc") => AppMode::GRPC.to_vec(),
        _ => AppMode::ALL.into_iter().chain(AppMode::REAL).chain(AppMode::GRPC).collect(),
    };
    let mut cells = Vec::new();
    for app in apps {
        for column in Column::ALL {
            if column.has_hook() && !matches!(app, AppMode::Real(_)) {
                continue;
            }
            for row in Row::ALL {
                // Lean follows HTTP/1.1 only (docs/lean.md): no gRPC row.
                if row == Row::Lean && app.grpc() {
                    continue;
                }
                let hook_ms = if column.prestop { prestop_hook_ms } else { 0 };
                let spec = RunSpec { kubelet_hook: column.kubelet_hook, ..RunSpec::cell(row, app, column.sidecar, hook_ms) }.heavy();
                if !spec.is_redundant() {
                    cells.push(spec);
                }
            }
        }
    }
    cells
}

/// Closing idle ALB connections at once when the app refuses connections (the default,
/// `app_idle_grace_ms: 0`) against leaving them open until their next request meets a 503:
/// the rig's app, held sidecar, its first close draining the pod.
fn race_cells() -> Vec<RunSpec> {
    [0, 10_000]
        .map(|grace| RunSpec {
            app_idle_grace_ms: Some(grace),
            ..RunSpec::cell(Row::Recommended, AppMode::CloseHeader, SidecarMode::Held, 0)
        })
        .to_vec()
}

fn race_summary(results: &[RunResult]) -> String {
    let mut out = String::from(
        "\nidle-close race (app close-header, held sidecar, first close drains): 502 = a request crossed \
         close-relay's close of an idle ALB connection; 503 = a request reached pod A after the app stopped accepting\n",
    );
    for spec in race_cells() {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.spec.app_idle_grace_ms == spec.app_idle_grace_ms).collect();
        let count = |code: u16| runs.iter().map(|r| r.statuses.get(&code).copied().unwrap_or(0)).sum::<u64>();
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        out.push_str(&format!(
            "  app_idle_grace_ms {:>5}: {} runs, {requests} requests, {} x 502, {} x 503, {} other 5xx, {} connection errors\n",
            spec.app_idle_grace_ms.unwrap_or(0),
            runs.len(),
            count(502),
            count(503),
            runs.iter().map(|r| r.five_xx).sum::<u64>() - count(502) - count(503),
            runs.iter().map(|r| r.conn_errors).sum::<u64>()
        ));
    }
    out
}

fn main() {
    let out = e2e::repo_root().join("target/rollout");
    if let Err(e) = fs::create_dir_all(&out) {
        eprintln!("rollout: cannot create {}: {e}", out.display());
        std::process::exit(1);
    }
    let only = std::env::var("ROLLOUT_ONLY").unwrap_or_default();
    let repeat = env_num("ROLLOUT_REPEAT", 1);
    let prestop_hook_ms = env_num("ROLLOUT_PRESTOP_HOOK_MS", 3_000);
    let race_runs = env_num("ROLLOUT_RACE", 0);
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    for spec in matrix(prestop_hook_ms).iter().filter(|s| s.label().contains(&only)) {
        for i in 0..repeat {
            results.push(run_named(spec, i));
        }
    }
    let mut race = Vec::new();
    for spec in race_cells().iter().filter(|_| race_runs > 0) {
        for i in 0..race_runs {
            race.push(run_named(spec, i));
        }
    }
    if results.is_empty() && race.is_empty() {
        eprintln!("rollout: no run matches ROLLOUT_ONLY={only:?}");
        std::process::exit(1);
    }
    let s = RunSpec::cell(Row::NoFilter, AppMode::CloseHeader, SidecarMode::Held, prestop_hook_ms).heavy();
    let header = format!(
        "Rolling restart on Envoy {}, close-relay roles in {}: {} req/s over {} client connections, restart at {} s, \
         load until {} ms after pod A's sidecar stops, terminationDrainDuration {} s, rig app late-close {} s, \
         real servers' preStop hook {} s ({} s for the whole matrix)",
        e2e::envoy_version(),
        e2e::layout().as_str(),
        s.rate_per_s,
        s.concurrency,
        s.restart_at_ms / 1000,
        s.tail_ms,
        s.termination_drain_ms / 1000,
        s.late_close_ms / 1000,
        prestop_hook_ms / 1000,
        started.elapsed().as_secs()
    );
    let mut report = table(&results, &header);
    if !race.is_empty() {
        report.push_str(&race_summary(&race));
    }
    println!("\n{report}");
    let json = serde_json::json!({
        "envoy": e2e::envoy_version(),
        "layout": e2e::layout().as_str(),
        "runs": results.iter().chain(&race).map(|r| {
            let mut v = r.to_json();
            v["physics"] = explain(r).map_or(serde_json::Value::Null, |e| serde_json::json!({"cause": format!("{:?}", e.cause), "explained": e.explained(), "text": describe(r, &e)}));
            v
        }).collect::<Vec<_>>(),
    });
    let written = fs::write(out.join("report.json"), serde_json::to_string_pretty(&json).unwrap_or_default())
        .map_err(|e| e.to_string())
        .and_then(|_| chart(&results, &out.join("5xx.svg")));
    match written {
        Ok(()) => println!("wrote {0}/report.json and {0}/5xx.svg", out.display()),
        Err(e) => {
            eprintln!("rollout: could not write the report: {e}");
            std::process::exit(1);
        }
    }
}
