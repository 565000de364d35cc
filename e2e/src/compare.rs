//! Never less than a plain Envoy: the same bytes sent to a plain Envoy and to Envoy with
//! close-relay, and what each delivered compared, to the client and to the origin.
//!
//! The differences close-relay is allowed are all in [`compare`]: an added `connection: close`
//! on a response, and a close after the last response the client asked for. Everything else
//! fails with the case, the bytes and both outcomes.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::envoy::{Envoy, EnvoySpec, Filter};
use crate::origin::{chunked_end, write_pieces, Origin, Reply};

/// How the client's side of one exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The server closed (FIN) after its last byte.
    Closed,
    /// The connection was reset: whatever the kernel still held for the client was lost.
    Reset,
    /// Still open when the client stopped waiting.
    Open,
}

/// One client connection's script: what it writes, and how it reads.
#[derive(Debug, Clone)]
pub struct Plan {
    pub writes: Vec<Vec<u8>>,
    /// Pause between two writes.
    pub gap: Duration,
    /// The client starts reading only this long after its first write (a slow reader).
    pub read_after: Duration,
    /// Once everything is written, the client stops waiting after this long without a byte.
    pub quiet: Duration,
}

impl Plan {
    pub fn new(writes: Vec<Vec<u8>>, quiet: Duration) -> Plan {
        Plan { writes, gap: Duration::from_micros(50), read_after: Duration::ZERO, quiet }
    }
}

/// What the client received on one connection.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// Longest any exchange may take, whatever the server does.
const LIMIT: Duration = Duration::from_secs(20);

/// Runs `plan` on a new connection to `port`: writes from this thread, reads on another.
pub fn exchange(port: u16, plan: &Plan) -> Exchange {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect {port}: {e}"));
    let _ = stream.set_nodelay(true);
    // A server that stops reading (an early answer, a close) must not hold the writer forever.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut reader = stream.try_clone().expect("clone the client socket");
    let written = Arc::new(AtomicBool::new(false));
    let done = written.clone();
    let (read_after, quiet) = (plan.read_after, plan.quiet);
    let read = thread::spawn(move || {
        thread::sleep(read_after);
        let _ = reader.set_read_timeout(Some(Duration::from_millis(10)));
        let (start, mut last) = (Instant::now(), Instant::now());
        let (mut bytes, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
        let end = loop {
            match reader.read(&mut chunk) {
                Ok(0) => break End::Closed,
                Ok(n) => {
                    bytes.extend_from_slice(&chunk[..n]);
                    last = Instant::now();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if (done.load(Ordering::Relaxed) && last.elapsed() >= quiet) || start.elapsed() > LIMIT {
                        break End::Open;
                    }
                }
                Err(_) => break End::Reset,
            }
        };
        Exchange { bytes, end }
    });
    for (i, piece) in plan.writes.iter().enumerate() {
        if i > 0 && !plan.gap.is_zero() {
            thread::sleep(plan.gap);
        }
        if write_pieces(&mut stream, std::slice::from_ref(piece)).is_err() {
            break;
        }
    }
    written.store(true, Ordering::Relaxed);
    read.join().unwrap_or_else(|_| Exchange { bytes: Vec::new(), end: End::Reset })
}

/// One response as the client saw it, with the header lines that differ by the clock only
/// made equal (`date`, `x-envoy-upstream-service-time`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status_line: String,
    pub headers: Vec<String>,
    /// A chunked body's data: where Envoy cuts chunks depends on how the bytes came in.
    pub body: Vec<u8>,
    /// All of it came; otherwise the connection ended in its body.
    pub whole: bool,
}

/// Responses in `bytes`, and whatever follows the last whole one. `head_only`: the requests
/// were HEAD, whose responses carry no body.
pub fn responses(bytes: &[u8], head_only: bool) -> (Vec<Response>, Vec<u8>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = resp.parse(&bytes[at..]) else { break };
        let code = resp.code.unwrap_or(0);
        let value = |name: &str| {
            resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let body_start = at + head;
        let chunked = value("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body_end = if head_only || code < 200 || code == 204 || code == 304 {
            Some(body_start)
        } else if chunked {
            chunked_end(bytes, body_start)
        } else if let Some(n) = value("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
            (bytes.len() >= body_start + n).then_some(body_start + n)
        } else {
            Some(bytes.len())
        };
        // An unfinished response (the app stopped early) is the last one, with what came of it.
        let (end, whole) = body_end.map_or((bytes.len(), false), |e| (e, true));
        let mut lines = clock_free(&bytes[at..body_start]).into_iter();
        let status_line = lines.next().unwrap_or_default();
        let raw = &bytes[body_start..end];
        let body = if chunked && !head_only { dechunked(raw) } else { raw.to_vec() };
        out.push(Response { status_line, headers: lines.collect(), body, whole });
        at = end;
    }
    let rest = clock_free(&bytes[at..]).join("\r\n").into_bytes();
    (out, rest)
}

/// A head's lines without the two that tell the time: `date`, and the value of
/// `x-envoy-upstream-service-time`.
fn clock_free(head: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| match l.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("x-envoy-upstream-service-time") => format!("{name}: *"),
            _ => l.to_string(),
        })
        .collect()
}

/// A chunked body's data, whole or as far as it came, then its trailer section: where Envoy
/// cuts chunks depends on how the bytes came in, what they carry does not.
pub fn dechunked(body: &[u8]) -> Vec<u8> {
    let (mut out, mut at) = (Vec::new(), 0);
    while let Ok(httparse::Status::Complete((line, size))) = httparse::parse_chunk_size(&body[at..]) {
        at += line;
        if size == 0 {
            break;
        }
        let end = usize::try_from(size).ok().and_then(|n| at.checked_add(n)).map_or(body.len(), |e| e.min(body.len()));
        out.extend_from_slice(&body[at..end]);
        at = (end + 2).min(body.len());
        if end == body.len() {
            break;
        }
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// What one side delivered: to the client, and to the origin.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub client: Exchange,
    pub origin: Vec<Vec<u8>>,
}

/// The allowed differences one comparison found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Responses where close-relay added `connection: close`.
    pub added_close: usize,
    /// close-relay closed after the last response where the plain Envoy kept the connection.
    pub closed_after_last: bool,
}

fn says_close(line: &str) -> bool {
    line.split_once(':').is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case("connection") && v.to_ascii_lowercase().contains("close"))
}

/// Compares close-relay's outcome with the plain Envoy's for the same input: equal but for
/// the allowed differences, or a description of the first other one.
pub fn compare(plain: &Outcome, relay: &Outcome, head_only: bool) -> Result<Allowed, String> {
    let mut allowed = Allowed::default();
    if relay.client.bytes.to_ascii_lowercase().windows(13).any(|w| w == b"x-close-relay") {
        return Err("close-relay's marker reached the client".into());
    }
    if plain.origin != relay.origin {
        return Err(format!("the origin received {} request(s) from plain Envoy, {} through close-relay", plain.origin.len(), relay.origin.len()));
    }
    let (p, p_rest) = responses(&plain.client.bytes, head_only);
    let (r, r_rest) = responses(&relay.client.bytes, head_only);
    if p.len() != r.len() {
        return Err(format!("the client got {} response(s) from plain Envoy, {} through close-relay", p.len(), r.len()));
    }
    for (i, (p, r)) in p.iter().zip(&r).enumerate() {
        let mut r_headers = r.headers.clone();
        if !p.headers.iter().any(|l| says_close(l)) {
            if let Some(added) = r_headers.iter().position(|l| l.eq_ignore_ascii_case("connection: close")) {
                r_headers.remove(added);
                allowed.added_close += 1;
            }
        }
        if p.status_line != r.status_line || p.headers != r_headers || p.body != r.body || p.whole != r.whole {
            return Err(format!("response {} differs", i + 1));
        }
    }
    if p_rest != r_rest {
        // An unfinished response (the app closed or stopped early) may carry the close too.
        let lines = |b: &[u8]| String::from_utf8_lossy(b).split("\r\n").map(str::to_owned).collect::<Vec<_>>();
        let (p_lines, mut r_lines) = (lines(&p_rest), lines(&r_rest));
        let added = r_lines.iter().position(|l| l.eq_ignore_ascii_case("connection: close"));
        match added {
            Some(i) if !p_lines.iter().any(|l| says_close(l)) => {
                r_lines.remove(i);
                allowed.added_close += 1;
            }
            _ => {}
        }
        if p_lines != r_lines {
            return Err("the bytes after the last whole response differ".into());
        }
    }
    // Where plain Envoy's last response said close, Envoy closed the connection itself, with its
    // delayed close; whether that close is a FIN or a reset depends only on when the client's
    // last bytes came against it, in either Envoy (close-relay leaves such a close to Envoy).
    // Counting a reset here as a difference (plain Envoy's FIN, close-relay's reset) found one
    // or two in 3,336 comparisons on some runs and none on others, with the module before and
    // after issue 34 alike (Envoy 1.37.0, two runs each, 2026-12-05): timing, not a rule.
    let envoy_closed = p.last().is_some_and(|r| r.headers.iter().any(|l| says_close(l)));
    match (plain.client.end, relay.client.end) {
        (a, b) if a == b => {}
        (End::Closed | End::Reset, End::Closed | End::Reset) if envoy_closed => {}
        (End::Open, End::Closed) => allowed.closed_after_last = true,
        (a, b) => return Err(format!("the connection ended {a:?} with plain Envoy, {b:?} through close-relay")),
    }
    Ok(allowed)
}

/// Both outcomes, readable in a failure message.
pub fn describe(plain: &Outcome, relay: &Outcome) -> String {
    let show = |o: &Outcome| {
        format!(
            "  client ({:?}, {} bytes): {:?}\n  origin: {:?}",
            o.client.end,
            o.client.bytes.len(),
            String::from_utf8_lossy(&o.client.bytes[..o.client.bytes.len().min(2048)]),
            o.origin.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect::<Vec<_>>()
        )
    };
    format!("plain Envoy:\n{}\nclose-relay:\n{}", show(plain), show(relay))
}

/// A plain Envoy and an Envoy with close-relay, in front of origins of their own.
pub struct Pair {
    pub plain: Envoy,
    pub relay: Envoy,
    lanes: Vec<Lane>,
}

/// One listener on each Envoy, each in front of its own origin: exchanges on different lanes
/// run at the same time without mixing what the origins received.
pub struct Lane {
    ports: [u16; 2],
    origins: [Origin; 2],
}

impl Pair {
    /// `relay` is close-relay's Envoy, its app ports set here; the plain one is the same Envoy
    /// without the filter.
    pub fn start(name: &str, relay: EnvoySpec, reply: Reply) -> Pair {
        Pair::with_lanes(name, relay, reply, 1)
    }

    pub fn with_lanes(name: &str, mut relay: EnvoySpec, reply: Reply, lanes: usize) -> Pair {
        let origins: Vec<[Origin; 2]> = (0..lanes.max(1)).map(|_| [Origin::start(reply.clone()), Origin::start(reply.clone())]).collect();
        let mut plain = EnvoySpec::new(Filter::None, origins[0][0].port);
        plain.drain_strategy = relay.drain_strategy;
        plain.lanes = origins[1..].iter().map(|o| o[0].port).collect();
        relay.app_port = origins[0][1].port;
        relay.lanes = origins[1..].iter().map(|o| o[1].port).collect();
        let (plain, relay) = thread::scope(|s| {
            let plain = s.spawn(|| Envoy::start(&format!("{name}-plain"), &plain));
            let relay = Envoy::start(&format!("{name}-relay"), &relay);
            (plain.join().expect("plain Envoy"), relay)
        });
        let ports = |e: &Envoy| std::iter::once(e.port).chain(e.lanes.iter().copied()).collect::<Vec<_>>();
        let lanes = ports(&plain).into_iter().zip(ports(&relay)).zip(origins).map(|((p, r), origins)| Lane { ports: [p, r], origins }).collect();
        Pair { plain, relay, lanes }
    }

    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    pub fn set_reply(&self, reply: Reply) {
        self.lanes[0].set_reply(reply);
    }

    /// The same plan on both, on the first lane: (plain, close-relay).
    pub fn run(&self, plan: &Plan) -> (Outcome, Outcome) {
        self.lanes[0].run(plan)
    }
}

impl Lane {
    pub fn set_reply(&self, reply: Reply) {
        self.origins.iter().for_each(|o| o.set_reply(reply.clone()));
    }

    /// The same plan on both, at the same time: (plain, close-relay).
    pub fn run(&self, plan: &Plan) -> (Outcome, Outcome) {
        thread::scope(|s| {
            let plain = s.spawn(|| exchange(self.ports[0], plan));
            let relay = exchange(self.ports[1], plan);
            let plain = plain.join().expect("plain exchange");
            let [p, r] = &self.origins;
            (Outcome { client: plain, origin: p.take_requests() }, Outcome { client: relay, origin: r.take_requests() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(bytes: &[u8], end: End) -> Outcome {
        Outcome { client: Exchange { bytes: bytes.to_vec(), end }, origin: vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()] }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: Mon\r\n\r\nok";
    const OK_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\ndate: Tue\r\n\r\nok";

    #[test]
    fn an_added_close_and_a_close_after_the_last_response_are_allowed() {
        let plain = outcome(&[OK, OK].concat(), End::Open);
        let relay = outcome(&[OK_CLOSE, OK_CLOSE].concat(), End::Closed);
        assert_eq!(compare(&plain, &relay, false), Ok(Allowed { added_close: 2, closed_after_last: true }));
        assert_eq!(compare(&plain, &plain, false), Ok(Allowed::default()));
        let cut = |head: &[u8]| outcome(&[OK, head, b"abc"].concat(), End::Closed);
        let unfinished = compare(&cut(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"), &cut(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\n"), false);
        assert_eq!(unfinished, Ok(Allowed { added_close: 1, closed_after_last: false }), "an unfinished response may say close too");
    }

    #[test]
    fn a_lost_response_a_reset_or_a_cut_body_is_not() {
        let plain = outcome(&[OK, OK].concat(), End::Open);
        assert!(compare(&plain, &outcome(OK_CLOSE, End::Closed), false).is_err());
        assert!(compare(&plain, &outcome(&[OK, OK].concat(), End::Reset), false).is_err());
        let told = outcome(&[OK, OK_CLOSE].concat(), End::Closed);
        assert!(compare(&told, &outcome(&[OK, OK_CLOSE].concat(), End::Reset), false).is_ok(), "Envoy's own close, either way");
        assert!(compare(&plain, &outcome(&[OK, &OK[..OK.len() - 1]].concat(), End::Closed), false).is_err());
        let mut other_origin = outcome(&[OK, OK].concat(), End::Open);
        other_origin.origin.clear();
        assert!(compare(&plain, &other_origin, false).is_err());
        let leak = outcome(&[OK, b"HTTP/1.1 200 OK\r\nx-close-relay: 1\r\ncontent-length: 2\r\n\r\nok"].concat(), End::Open);
        assert!(compare(&plain, &leak, false).unwrap_err().contains("marker"));
    }

    #[test]
    fn responses_are_framed_like_a_client_frames_them() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (r, rest) = responses(&[&chunked[..], OK, b"HTTP/1.1 2"].concat(), false);
        assert_eq!((r.len(), rest.as_slice()), (2, &b"HTTP/1.1 2"[..]));
        assert_eq!(r[1].headers, vec!["content-length: 2".to_string()], "date dropped");
        let (r, rest) = responses(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true);
        assert_eq!((r.len(), rest.len()), (1, 0), "HEAD: no body");
        let (r, _) = responses(b"HTTP/1.1 200 OK\r\n\r\nuntil close", false);
        assert_eq!(r[0].body, b"until close");
        let cut = |chunks: &str| responses(format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{chunks}0\r\nx: y\r\n\r\n").as_bytes(), false).0;
        assert_eq!(cut("2\r\nbo\r\n1\r\nd\r\n"), cut("1\r\nb\r\n2\r\nod\r\n"), "chunk boundaries do not count");
        assert_eq!(cut("3\r\nbod\r\n")[0].body, b"bodx: y\r\n\r\n");
        let (r, rest) = responses(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: x\r\nx-envoy-upstream-service-time: 3\r\n\r\nabc", false);
        assert_eq!((r[0].whole, r[0].body.as_slice(), rest.len()), (false, &b"abc"[..], 0), "an unfinished response");
        assert_eq!(r[0].headers, vec!["content-length: 9".to_string(), "x-envoy-upstream-service-time: *".to_string()]);
        let unfinished = |chunks: &str| responses(format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{chunks}").as_bytes(), false).0;
        assert_eq!(unfinished("1\r\nh\r\n1\r\ne\r\n"), unfinished("2\r\nhe\r\n"));
        assert_eq!(unfinished("5\r\nhel")[0].body, b"hel");
    }
}
