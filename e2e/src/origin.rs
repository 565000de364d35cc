//! An origin inside the test process for the comparisons with a plain Envoy: it answers each
//! request by its [`Reply`] and records every request as Envoy forwarded it, so two Envoys can
//! be compared on what reached the app as well as on what reached the client.
//!
//! Requests are framed with `httparse` (heads, chunk sizes); what is recorded is the request's
//! bytes as they arrived, less Envoy's random `x-request-id` line.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::ports::Port;

/// How one piece of bytes is written: the write patterns of the comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// All at once.
    Whole,
    /// One byte per write.
    ByteByByte,
    /// One write per line, each ending at its CRLF.
    Lines,
    /// The bytes twice, back to back, in one write (the client pipelines).
    Twice,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [Pattern::Whole, Pattern::ByteByByte, Pattern::Lines, Pattern::Twice];

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Whole => "one write",
            Pattern::ByteByByte => "byte by byte",
            Pattern::Lines => "split at CRLF",
            Pattern::Twice => "pipelined twice",
        }
    }

    /// The writes that send `bytes` this way.
    pub fn writes(self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match self {
            Pattern::Whole => vec![bytes.to_vec()],
            Pattern::ByteByByte => bytes.iter().map(|b| vec![*b]).collect(),
            Pattern::Lines => bytes.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect(),
            Pattern::Twice => vec![[bytes, bytes].concat()],
        }
    }
}

/// Writes `writes` one by one, a short pause between them so that each is read on its own.
pub fn write_pieces(stream: &mut TcpStream, writes: &[Vec<u8>]) -> std::io::Result<()> {
    for (i, piece) in writes.iter().enumerate() {
        if i > 0 {
            thread::sleep(Duration::from_micros(50));
        }
        stream.write_all(piece)?;
    }
    Ok(())
}

/// How the origin answers each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200, keep-alive, the request as recorded for its body.
    Echo,
    /// As [`Reply::Echo`] with `Connection: close`; the origin then closes its connection.
    EchoClose,
    /// `Connection: close` and this many bytes of body (`crate::pattern_byte`).
    BigClose(usize),
    /// 413 with `Connection: close` as soon as the head is in, the body unread; then it reads and
    /// drops whatever still comes, until Envoy closes (as servers linger on close).
    EarlyReject,
    /// These bytes, written the given way: a response from a corpus. The origin then closes,
    /// unless the bytes are one response that frames itself for keep-alive ([`keeps_alive`]):
    /// closing under a pooled connection would make Envoy's upstream keep-alive race (a 503
    /// for the next request, plain Envoy or not) part of the comparison.
    Raw(Vec<u8>, Pattern),
}

struct State {
    stop: AtomicBool,
    reply: Mutex<Reply>,
    requests: Mutex<Vec<Vec<u8>>>,
}

/// An origin on its own leased port, stopped (and its threads joined) on drop.
pub struct Origin {
    pub port: u16,
    _lease: Port,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

/// How often a waiting thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

impl Origin {
    pub fn start(reply: Reply) -> Origin {
        // A leased port may still be taken for a moment by something outside the leases (CI
        // saw "Address already in use" once, as the rig's app did before): take another.
        let (lease, listener) = (0..5)
            .find_map(|_| {
                let lease = Port::lease();
                match TcpListener::bind(("127.0.0.1", lease.get())) {
                    Ok(listener) => Some((lease, listener)),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => None,
                    Err(e) => panic!("origin on {}: {e}", lease.get()),
                }
            })
            .unwrap_or_else(|| panic!("origin: five leased ports in a row were taken"));
        let port = lease.get();
        let state = Arc::new(State { stop: AtomicBool::new(false), reply: Mutex::new(reply), requests: Mutex::default() });
        let shared = state.clone();
        let accept = thread::spawn(move || {
            let mut conns = Vec::new();
            while !shared.stop.load(Ordering::Relaxed) {
                // Blocking: a drop wakes it with a connection of its own once `stop` is set.
                match listener.accept() {
                    Ok(_) if shared.stop.load(Ordering::Relaxed) => break,
                    Ok((stream, _)) => {
                        let s = shared.clone();
                        conns.push(thread::spawn(move || serve(stream, &s)));
                    }
                    Err(_) => thread::sleep(POLL),
                }
                conns.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Origin { port, _lease: lease, state, accept: Some(accept) }
    }

    pub fn set_reply(&self, reply: Reply) {
        *lock(&self.state.reply) = reply;
    }

    /// The requests received since the last call, in the order they were complete.
    pub fn take_requests(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *lock(&self.state.requests))
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&(std::net::Ipv4Addr::LOCALHOST, self.port).into(), Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads into `buf` until `more` is satisfied; false at EOF, on an error or at stop.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, state: &State) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if state.stop.load(Ordering::Relaxed) {
            return false;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return false,
        }
    }
}

/// Where the request framed at the start of `buf` ends: `Ok(Some(end))` once it is whole,
/// `Ok(None)` while more must come, `Err` for bytes that are no request. Also its head's end.
fn request_end(buf: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let value = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Ok(chunked_end(buf, head).map(|end| (end, head)));
    }
    let length = value("content-length").and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
    Ok((buf.len() >= head + length).then_some((head + length, head)))
}

/// The end of a chunked body starting at `at` (trailers included), once it is all in `buf`.
pub fn chunked_end(buf: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let httparse::Status::Complete((line, size)) = httparse::parse_chunk_size(buf.get(at..)?).ok()? else {
            return None;
        };
        at += line;
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                let rest = buf.get(at..)?;
                let eol = rest.windows(2).position(|w| w == b"\r\n")?;
                at += eol + 2;
                if eol == 0 {
                    return Some(at);
                }
            }
        }
        at = at.checked_add(usize::try_from(size).ok()?)?.checked_add(2)?;
        if at > buf.len() {
            return None;
        }
    }
}

/// A request as recorded: without Envoy's request id, random per request (the one line two
/// Envoys never agree on), and a chunked body as its data (where Envoy cuts chunks depends on
/// how the bytes came in).
fn recorded(request: &[u8], head: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(request.len());
    let mut chunked = false;
    for line in request[..head].split_inclusive(|b| *b == b'\n') {
        let lower = line.to_ascii_lowercase();
        chunked |= lower.starts_with(b"transfer-encoding:") && lower.windows(7).any(|w| w == b"chunked");
        if !lower.starts_with(b"x-request-id:") {
            out.extend_from_slice(line);
        }
    }
    if chunked {
        out.extend_from_slice(&crate::compare::dechunked(&request[head..]));
    } else {
        out.extend_from_slice(&request[head..]);
    }
    out
}

/// Whether `response` is one HTTP/1.1 response, whole, whose framing lets the connection go on:
/// a length or a finished chunked body (or none by its status), and no `Connection: close`.
pub fn keeps_alive(response: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = resp.parse(response) else { return false };
    let values = |name: &str| -> Vec<String> {
        resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase()).collect()
    };
    let code = resp.code.unwrap_or(0);
    if resp.version != Some(1) || values("connection").iter().any(|v| v.contains("close")) || (100..200).contains(&code) {
        return false;
    }
    let (chunked, lengths) = (values("transfer-encoding"), values("content-length"));
    let end = if code == 204 || code == 304 {
        Some(head)
    } else if chunked.len() == 1 && chunked[0].trim() == "chunked" && lengths.is_empty() {
        chunked_end(response, head)
    } else if chunked.is_empty() && lengths.len() == 1 {
        lengths[0].trim().parse::<usize>().ok().and_then(|n| head.checked_add(n))
    } else {
        None
    };
    end == Some(response.len())
}

fn serve(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let (end, head) = match request_end(&buf) {
            Ok(Some(found)) => found,
            Ok(None) if fill(&mut stream, &mut buf, state) => continue,
            // EOF, stop, or bytes that are no request: Envoy never sends those; hang up.
            _ => return,
        };
        let reply = lock(&state.reply).clone();
        if reply == Reply::EarlyReject {
            lock(&state.requests).push(recorded(&buf[..head], head));
            let _ = stream.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n");
            let _ = stream.shutdown(Shutdown::Write);
            while fill(&mut stream, &mut buf, state) {
                buf.clear();
            }
            return;
        }
        let request = recorded(&buf[..end], head);
        buf.drain(..end);
        lock(&state.requests).push(request.clone());
        let sent = match &reply {
            Reply::Echo | Reply::EchoClose => {
                let close = if reply == Reply::EchoClose { "connection: close\r\n" } else { "" };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{close}\r\n", request.len());
                stream.write_all(&[head.as_bytes(), &request].concat())
            }
            Reply::BigClose(n) => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n");
                let body: Vec<u8> = (0..*n).map(crate::pattern_byte).collect();
                stream.write_all(&[head.as_bytes(), &body].concat())
            }
            Reply::Raw(bytes, pattern) => write_pieces(&mut stream, &pattern.writes(bytes)),
            Reply::EarlyReject => Ok(()),
        };
        let keep = match &reply {
            Reply::Echo => true,
            Reply::Raw(bytes, _) => keeps_alive(bytes),
            _ => false,
        };
        if sent.is_err() || !keep {
            // A lingering close: nothing unread is left to turn the close into a reset.
            let _ = stream.shutdown(Shutdown::Write);
            while fill(&mut stream, &mut buf, state) {
                buf.clear();
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_by_length_and_by_chunks() {
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET"), Ok(Some((27, 27))));
        assert_eq!(request_end(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nab"), Ok(None));
        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx: y\r\n\r\nNEXT";
        assert_eq!(request_end(chunked), Ok(Some((chunked.len() - 4, 47))));
        assert_eq!(request_end(&chunked[..60]), Ok(None));
        assert!(request_end(b"\x16\x03\x01 tls").is_err());
    }

    #[test]
    fn only_a_self_framed_response_keeps_the_connection() {
        assert!(keeps_alive(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
        assert!(keeps_alive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n"));
        assert!(keeps_alive(b"HTTP/1.1 304 Not Modified\r\n\r\n"));
        for until_close in [
            &b"HTTP/1.1 200 OK\r\n\r\nbody"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            assert!(!keeps_alive(until_close), "{:?}", String::from_utf8_lossy(until_close));
        }
    }

    #[test]
    fn patterns_cut_the_same_bytes() {
        let bytes = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        for p in Pattern::ALL {
            let joined: Vec<u8> = p.writes(bytes).concat();
            let want = if p == Pattern::Twice { [&bytes[..], &bytes[..]].concat() } else { bytes.to_vec() };
            assert_eq!(joined, want, "{}", p.as_str());
        }
        assert_eq!(Pattern::Lines.writes(bytes).len(), 3);
    }

    #[test]
    fn the_request_id_is_the_only_line_dropped_and_chunks_are_joined() {
        let r = b"GET / HTTP/1.1\r\nx-request-id: 42\r\nhost: a\r\n\r\nbody";
        assert_eq!(recorded(r, r.len() - 4), b"GET / HTTP/1.1\r\nhost: a\r\n\r\nbody");
        let c = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n1\r\na\r\n0\r\n\r\n";
        assert_eq!(recorded(c, 47), b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\naa\r\n");
    }
}
