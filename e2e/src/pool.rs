//! An ALB-like pool of keep-alive client connections into a sidecar, some busy, some idle, and
//! the wait for all of them to be told or closed once something says the pod is going away: the
//! drain suites' (`tests/drain.rs`, `tests/lean.rs`) common story.

use std::time::{Duration, Instant};

use crate::{Client, Envoy};

pub const BUSY: usize = 3;
pub const IDLE: usize = 3;
/// Default config: admin polled every 1 s, ticks every 100 ms, idle grace 250 ms.
pub const WITHIN: Duration = Duration::from_secs(6);

pub struct Pool {
    pub busy: Vec<Client>,
    pub idle: Vec<Client>,
}

/// Opens the pool the way an ALB keeps one: each connection has carried a request.
pub fn pool(envoy: &Envoy) -> Pool {
    let mut open = |_| {
        let mut c = envoy.connect();
        let r = c.get("/keep");
        assert_eq!(r.status, 200);
        assert!(!r.says_close(), "{}", r.raw_head);
        c
    };
    let busy = (0..BUSY).map(&mut open).collect();
    let idle = (0..IDLE).map(&mut open).collect();
    let mut pool = Pool { busy, idle };
    // Longer than a poll interval plus a few sweeps: a false positive would show here.
    std::thread::sleep(Duration::from_millis(1300));
    for (i, c) in pool.busy.iter_mut().chain(pool.idle.iter_mut()).enumerate() {
        assert!(c.open_now(), "connection {i} closed before any trigger\n{}", envoy.wasm_log());
    }
    pool
}

/// Busy connections keep sending (as ALB traffic does) until they are told to close, and then
/// close them, as the ALB does; idle ones are only watched, as only close-relay closes those.
/// Returns the time from `trigger` to the last connection gone, and the statuses the busy
/// connections saw. (A client that ignores `connection: close` is closed once quiet:
/// `tests/relay.rs`.)
pub fn all_closed(envoy: &Envoy, mut pool: Pool, trigger: Instant, path: &str) -> (Duration, Vec<u16>) {
    let deadline = trigger + WITHIN;
    let mut last_close = trigger;
    let mut statuses = Vec::new();
    let mut told = vec![false; pool.busy.len()];
    let mut closed_busy = vec![false; pool.busy.len()];
    let mut closed_idle = vec![false; pool.idle.len()];
    while Instant::now() < deadline {
        for (i, c) in pool.busy.iter_mut().enumerate() {
            if closed_busy[i] {
                continue;
            }
            if !c.open_now() {
                closed_busy[i] = true;
                last_close = Instant::now();
                continue;
            }
            match c.send(&format!("GET {path} HTTP/1.1\r\nhost: app\r\n\r\n")).map(|_| c.try_response("GET")) {
                Ok(Ok(r)) => {
                    statuses.push(r.status);
                    assert!(!r.leaks_marker(), "{}", r.raw_head);
                    told[i] = r.says_close();
                    if told[i] {
                        // As the ALB does on `connection: close`: it closes the connection.
                        c.shutdown();
                        closed_busy[i] = true;
                        last_close = Instant::now();
                    }
                }
                // Closed between our check and the send: that is a close, not an error.
                _ => {
                    closed_busy[i] = true;
                    last_close = Instant::now();
                }
            }
        }
        for (i, c) in pool.idle.iter_mut().enumerate() {
            if !closed_idle[i] && !c.open_now() {
                closed_idle[i] = true;
                last_close = Instant::now();
            }
        }
        if closed_busy.iter().chain(&closed_idle).all(|c| *c) {
            return (last_close - trigger, statuses);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "not all closed within {WITHIN:?}: busy told {told:?} closed {closed_busy:?}, idle closed \
         {closed_idle:?}\n{}",
        envoy.wasm_log()
    );
}

pub fn report(source: &str, setup: &str, took: Duration) {
    eprintln!(
        "[envoy {}] drain source {source} ({setup}, {}): trigger -> last connection told or closed in {} ms",
        crate::envoy_version(),
        crate::layout().as_str(),
        took.as_millis()
    );
}

/// Traffic that goes on, as an ALB's does: one client sending `GET /keep` every 20 ms on a
/// keep-alive connection, opening a new one whenever it is told to close or the connection
/// ends, until stopped (20 s at most, or the time given to [`Traffic::start_for`]).
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

impl Traffic {
    pub fn start(port: u16) -> Traffic {
        Traffic::start_for(port, Duration::from_secs(20))
    }

    pub fn start_for(port: u16, at_most: Duration) -> Traffic {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut answered, mut connections) = (0u64, 0u64);
            let deadline = Instant::now() + at_most;
            let mut conn: Option<Client> = None;
            while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
                if conn.is_none() {
                    conn = Client::try_open(port).ok();
                    connections += 1;
                }
                if let Some(c) = conn.as_mut() {
                    let sent = c.send("GET /keep HTTP/1.1\r\nhost: alb\r\n\r\n").is_ok();
                    match c.try_response("GET").ok().filter(|_| sent) {
                        Some(r) => {
                            answered += u64::from(r.status == 200);
                            if r.says_close() {
                                conn = None;
                            }
                        }
                        None => conn = None,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (answered, connections)
        });
        Traffic { stop, handle }
    }

    /// Requests answered 200, and connections opened.
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0))
    }
}
