//! The load: clients on keep-alive connections to the ALB at a fixed rate, every status and
//! connection error counted with when its request was sent.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::Client;

/// What one request of the load got from the ALB.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// The client could not talk to the ALB at all.
    ConnError,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_ms: u64,
    pub reply: Reply,
}

/// What the clients speak to the ALB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speech {
    /// `GET /keep` on HTTP/1.1 keep-alive connections.
    Http1,
    /// Unary gRPC calls on h2c connections ([`crate::grpc`]); a call that ends with a
    /// grpc-status other than OK counts as the HTTP status a gateway maps it to (UNAVAILABLE: 503).
    Grpc,
}

/// One client's connection to the ALB.
enum Conn {
    Http1(Option<Client>),
    Grpc(crate::grpc::Caller),
}

impl Conn {
    fn new(speech: Speech) -> Conn {
        match speech {
            Speech::Http1 => Conn::Http1(None),
            Speech::Grpc => match crate::grpc::Caller::new(Duration::from_secs(5)) {
                Ok(caller) => Conn::Grpc(caller),
                Err(e) => panic!("rollout load: no runtime for the gRPC client: {e}"),
            },
        }
    }

    fn request(&mut self, port: u16) -> Reply {
        match self {
            Conn::Http1(conn) => match request(conn, port) {
                Ok((status, close)) => {
                    if close {
                        *conn = None;
                    }
                    Reply::Status(status)
                }
                Err(_) => {
                    *conn = None;
                    Reply::ConnError
                }
            },
            Conn::Grpc(caller) => caller.call(port).map_or(Reply::ConnError, |ended| Reply::Status(ended.as_http())),
        }
    }
}

/// A bounded load: `concurrency` clients, each with its own keep-alive connection to the ALB,
/// together sending `rate_per_s` requests per second for `duration` or until `done`.
pub fn load(speech: Speech, port: u16, rate_per_s: u64, concurrency: usize, duration: Duration, start: Instant, done: Arc<AtomicBool>) -> Vec<Sample> {
    let interval = Duration::from_secs_f64(concurrency as f64 / rate_per_s.max(1) as f64);
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let done = done.clone();
            thread::spawn(move || {
                let mut samples = Vec::new();
                let mut conn = Conn::new(speech);
                let mut next = start + interval.mul_f64(i as f64 / concurrency as f64);
                while next < start + duration && !done.load(Ordering::Relaxed) {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    next += interval;
                    let at_ms = start.elapsed().as_millis() as u64;
                    let reply = conn.request(port);
                    samples.push(Sample { at_ms, reply });
                }
                samples
            })
        })
        .collect();
    let mut all: Vec<Sample> = workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect();
    all.sort_by_key(|s| s.at_ms);
    all
}

fn request(conn: &mut Option<Client>, port: u16) -> io::Result<(u16, bool)> {
    if conn.is_none() {
        *conn = Some(Client::try_open(port)?);
    }
    let c = conn.as_mut().ok_or_else(|| io::Error::other("no connection"))?;
    c.send("GET /keep HTTP/1.1\r\nhost: alb\r\n\r\n")?;
    let r = c.try_response("GET")?;
    Ok((r.status, r.says_close()))
}
