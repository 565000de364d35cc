//! `make soak`: the soak of `e2e/src/soak.rs` for SOAK_SECONDS (300), report on stdout and in
//! target/soak/report.txt; exits 1 if close-relay lost a request the baseline served, leaked the
//! marker, corrupted a body, crashed, or grew.

fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let soak = e2e::soak::run(seconds, e2e::soak::Cycle::FULL);
    let report = soak.report();
    println!("[envoy {}] {report}", e2e::envoy_version());
    let dir = e2e::repo_root().join("target/soak");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("report.txt"), &report);
    let verdict = e2e::soak::verdict(&soak);
    // Stops every process the soak started (by PID, on drop) before exiting.
    drop(soak);
    if let Err(why) = verdict {
        eprintln!("soak FAILED: {why}");
        std::process::exit(1);
    }
    eprintln!("soak passed");
}
