//! `make rollout`: the rolling-restart matrix (BRIEF §4). Rows: no filter, close-relay;
//! columns: app shutdown mode x sidecar mode. Prints the table and writes
//! `target/rollout/report.json` and `target/rollout/5xx.svg`.
//! `ROLLOUT_ONLY=close-header` (a substring of the run label) runs a subset;
//! `ROLLOUT_REPEAT=N` runs each N times (the table shows the last, the JSON all).
//! `ROLLOUT_APPS=real` runs the real app servers instead of the rig's app (`make app-servers`);
//! `ROLLOUT_PRESTOP_HOOK_MS=N` gives them a preStop hook of N ms before their stop signal.

use std::fs;

use e2e::rollout::{chart, physics, run, table, AppMode, RunSpec, SidecarMode};

fn main() {
    let out = e2e::repo_root().join("target/rollout");
    if let Err(e) = fs::create_dir_all(&out) {
        eprintln!("rollout: cannot create {}: {e}", out.display());
        std::process::exit(1);
    }
    let only = std::env::var("ROLLOUT_ONLY").unwrap_or_default();
    let repeat: usize = std::env::var("ROLLOUT_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut results = Vec::new();
    // ROLLOUT_APPS=real: the real app servers (e2e/src/servers.rs, `make app-servers`) instead of
    // the rig's own app.
    let apps: &[AppMode] = if std::env::var("ROLLOUT_APPS").as_deref() == Ok("real") { &AppMode::REAL } else { &AppMode::ALL };
    for &app in apps {
        for sidecar in SidecarMode::ALL {
            for (close_relay, first_close_drains) in [(false, false), (true, false), (true, true)] {
                let prestop_hook_ms = std::env::var("ROLLOUT_PRESTOP_HOOK_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                let spec = RunSpec { first_close_drains, prestop_hook_ms, ..RunSpec::new(close_relay, app, sidecar) };
                if !spec.label().contains(&only) {
                    continue;
                }
                for i in 0..repeat {
                    let name = format!(
                        "{}{}-{}-{}-{i}",
                        u8::from(close_relay),
                        u8::from(first_close_drains),
                        app.as_str(),
                        sidecar.as_str().split(' ').next().unwrap_or("")
                    );
                    let r = run(&name, &spec);
                    eprintln!("  {:<62} {} requests, {} 5xx, {} connection errors", spec.label(), r.requests, r.five_xx, r.conn_errors);
                    results.push(r);
                }
            }
        }
    }
    if results.is_empty() {
        eprintln!("rollout: no run matches ROLLOUT_ONLY={only:?}");
        std::process::exit(1);
    }
    let s = &results[0].spec;
    let header = format!(
        "Rolling restart on Envoy {}, close-relay roles in {}: {} req/s over {} client connections for {} s, \
         restart at {} s, terminationDrainDuration {} s, prestop {} s",
        e2e::envoy_version(),
        e2e::layout().as_str(),
        s.rate_per_s,
        s.concurrency,
        s.duration_ms / 1000,
        s.restart_at_ms / 1000,
        s.termination_drain_ms / 1000,
        s.prestop_ms / 1000
    );
    let report = table(&results, &header);
    println!("\n{report}");
    let json = serde_json::json!({
        "envoy": e2e::envoy_version(),
        "layout": e2e::layout().as_str(),
        "runs": results.iter().map(|r| {
            let mut v = r.to_json();
            v["physics"] = physics(r).map_or(serde_json::Value::Null, serde_json::Value::from);
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
