//! The real app servers the rolling-restart rig runs as pod apps (`e2e::servers`), each on its
//! own: it serves keep-alive requests, and on its container's stop signal it stops accepting new
//! connections and exits once its clients are gone. Each prints what its shutdown did to an idle
//! keep-alive connection, the behaviour close-relay has to meet.

use std::time::{Duration, Instant};

use e2e::servers::{RealApp, Server};
use e2e::Client;

fn refused_within(port: u16, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if Client::try_open(port).is_err() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn check(server: Server) -> String {
    let dir = e2e::scratch(&format!("server-{}", server.as_str().replace(' ', "-")));
    let mut app = RealApp::start(server, &dir);
    let mut busy = Client::open(app.port);
    for i in 0..2 {
        // Named on failure: one fresh-clone run saw a reset here from one of the five servers.
        let r = busy
            .send("GET /keep HTTP/1.1\r\nhost: app\r\n\r\n")
            .and_then(|_| busy.try_response("GET"))
            .unwrap_or_else(|e| panic!("{}: request {i} on a fresh keep-alive connection: {e}", server.as_str()));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{}: {}", server.as_str(), r.raw_head);
        assert!(!r.says_close(), "{}: closes keep-alive connections: {}", server.as_str(), r.raw_head);
    }
    let mut idle = Client::open(app.port);
    assert_eq!(idle.get("/keep").status, 200);
    let signalled = Instant::now();
    app.terminate();
    let idle_closed = idle.closed_by_server(Duration::from_secs(1)).then(|| signalled.elapsed());
    let refused = refused_within(app.port, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}: still accepting 5 s after its stop signal", server.as_str()));
    drop((busy, idle));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.exited() {
        assert!(Instant::now() < deadline, "{}: did not exit within 30 s of its clients leaving", server.as_str());
        std::thread::sleep(Duration::from_millis(20));
    }
    format!(
        "{:<12} stop signal {:>7}: idle keep-alive connection {}, new connections refused after {} ms, exited {} ms after the signal",
        server.as_str(),
        if server.stop_signal() == libc::SIGQUIT { "SIGQUIT" } else { "SIGTERM" },
        idle_closed.map_or("left open (1 s)".to_string(), |d| format!("closed after {} ms", d.as_millis())),
        refused.as_millis(),
        signalled.elapsed().as_millis()
    )
}

#[test]
fn each_real_server_serves_keep_alive_and_shuts_down_on_its_stop_signal() {
    let lines: Vec<String> = std::thread::scope(|s| {
        let running: Vec<_> = Server::ALL.iter().map(|&server| s.spawn(move || check(server))).collect();
        running.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    for line in &lines {
        eprintln!("[app server] {line}");
    }
    assert_eq!(lines.len(), Server::ALL.len());
}

/// The rolling restart with a real server as pod A's app, one per shutdown style: Go (idle
/// connections closed at once, `Connection: close` in flight, as nginx and Tomcat do), Node.js
/// (a connection busy at the signal stays open), uvicorn (closes at its next tick, no header).
mod rollout {
    use e2e::rollout::{describe, explain, run, AppMode, Row, RunResult, RunSpec, SidecarMode};
    use e2e::servers::Server;

    const STYLES: [Server; 3] = [Server::Go, Server::Node, Server::Uvicorn];
    const PRESTOP_MS: u64 = 3_000;

    fn cell(row: Row, server: Server, sidecar: SidecarMode, prestop_hook_ms: u64) -> RunResult {
        restart(RunSpec::cell(row, AppMode::Real(server), sidecar, prestop_hook_ms), 300)
    }

    /// One restart of `spec`, 1.5 s into the load: what the ALB saw, printed, and the load checked
    /// to have been at least `min_requests`.
    fn restart(spec: RunSpec, min_requests: u64) -> RunResult {
        let spec = RunSpec { restart_at_ms: 1_500, ..spec };
        let name = format!("real-{}-{:?}-{:?}-{}-{}", spec.app.as_str(), spec.row, spec.sidecar, spec.prestop_hook_ms, spec.concurrency);
        // The load is the precondition, not the result: on two cores shared with other suites
        // the client may fall short of it (1956 and 979 requests against 3297 alone, 2026-12-05),
        // and then the run measured nothing; it is run again, three times at most.
        let mut r = run(&name, &spec);
        for _ in 0..2 {
            if r.requests > min_requests {
                break;
            }
            eprintln!("[envoy {}] rollout {}: load too small ({} requests), run again", e2e::envoy_version(), spec.label(), r.requests);
            r = run(&name, &spec);
        }
        eprintln!(
            "[envoy {}] rollout {} ({}): {} requests, {} 5xx, {} connection errors, statuses {:?}, rescued {}{}",
            e2e::envoy_version(),
            spec.label(),
            e2e::layout().as_str(),
            r.requests,
            r.five_xx,
            r.conn_errors,
            r.statuses,
            r.counters.get("close_relay_rescued_total").copied().unwrap_or(0),
            explain(&r).map(|e| format!("\n  physics: {}", describe(&r, &e))).unwrap_or_default()
        );
        assert!(r.requests > min_requests, "{}: load too small: {}", spec.label(), r.requests);
        r
    }

    /// At most one error per ALB connection, none of them a connection error, each explained.
    fn at_most_one_each(r: &RunResult) {
        assert_eq!(r.conn_errors, 0, "{}: {:?}", r.spec.label(), r.events);
        assert!(r.five_xx <= r.spec.concurrency as u64, "{}: {} 5xx at {:?}", r.spec.label(), r.five_xx, r.five_xx_at);
        let why = explain(r);
        assert!(why.as_ref().is_none_or(|e| e.explained()), "{}: {why:?}", r.spec.label());
    }

    fn each_style(sidecar: SidecarMode) {
        for server in STYLES {
            at_most_one_each(&cell(Row::CloseRelay, server, sidecar, 0));
            // With the recommended preStop the sidecar hears of the shutdown while the app still
            // serves: no request is lost.
            let r = cell(Row::Recommended, server, sidecar, PRESTOP_MS);
            assert_eq!((r.five_xx, r.conn_errors), (0, 0), "{}: {:?} at {:?}\n{:?}", r.spec.label(), r.statuses, r.five_xx_at, r.events);
        }
    }

    /// With rescue, what the app refuses or loses to its own idle close is answered by pod B:
    /// nothing is lost, at the load where requests on their way to a stopping app show. Go closes
    /// its idle connections at once; Node.js keeps a connection busy at the signal open.
    #[test]
    fn held_sidecar_close_relay_with_rescue_loses_nothing_at_1200_requests_per_second() {
        for server in [Server::Go, Server::Node] {
            let r = restart(RunSpec::cell(Row::Rescue, AppMode::Real(server), SidecarMode::Held, 0).heavy(), 2_000);
            assert_eq!((r.five_xx, r.conn_errors), (0, 0), "{}: {:?} at {:?}\n{:?}", r.spec.label(), r.statuses, r.five_xx_at, r.events);
        }
    }

    #[test]
    fn a_held_sidecar_without_the_filter_gives_each_real_server_hundreds_of_503s() {
        for server in STYLES {
            let r = cell(Row::NoFilter, server, SidecarMode::Held, 0);
            assert!(r.five_xx > 50, "{}: the rig did not reproduce the bug: {:?}", r.spec.label(), r.statuses);
        }
    }

    #[test]
    fn held_sidecar_close_relay_keeps_real_servers_to_one_error_per_connection_and_zero_with_the_prestop() {
        each_style(SidecarMode::Held);
    }

    #[test]
    fn istio_drain_close_relay_keeps_real_servers_to_one_error_per_connection_and_zero_with_the_prestop() {
        each_style(SidecarMode::IstioAgent);
    }
}
