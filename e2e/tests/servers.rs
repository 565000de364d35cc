//! The real app servers the rolling-restart rig runs as pod apps (`e2e::servers`), each on its
//! own: it serves keep-alive requests, and on its container's stop signal it stops accepting new
//! connections and exits once its clients are gone. Each prints what its shutdown did to an idle
//! keep-alive connection, the behaviour close-relay has to meet.

use std::time::{Duration, Instant};

use e2e::servers::{RealApp, Server};
use e2e::Conn;

fn refused_within(port: u16, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if Conn::try_open(port).is_err() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn check(server: Server) -> String {
    let dir = e2e::scratch(&format!("server-{}", server.as_str().replace(' ', "-")));
    let mut app = RealApp::start(server, &dir);
    let mut busy = Conn::open(app.port);
    for _ in 0..2 {
        let r = busy.get("/keep");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{}: {}", server.as_str(), r.raw_head);
        assert!(!r.says_close(), "{}: closes keep-alive connections: {}", server.as_str(), r.raw_head);
    }
    let mut idle = Conn::open(app.port);
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
