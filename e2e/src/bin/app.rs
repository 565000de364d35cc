//! The upstream app for e2e tests and the demo: a small HTTP/1.x server on 127.0.0.1 whose
//! paths give each kind of response the filter must handle, byte for byte as written here.
//!
//! Usage: `app --port 8080 [--h2c]`. With `--h2c` it speaks HTTP/2 with prior knowledge and
//! answers every request with 200 and a body, without `content-length` (HTTP/2 frames bodies
//! itself). Otherwise HTTP/1.x, by path:
//! - `/keep`                keep-alive, Content-Length
//! - `/close`               `Connection: close` (HEAD: head only)
//! - `/close-token`         `Connection: Keep-Alive, CLOSE`
//! - `/proxy-close`         `Proxy-Connection: close`
//! - `/eof`                 HTTP/1.1, no framing: body ends at close
//! - `/http10-eof`          HTTP/1.0, no framing, close
//! - `/chunked-close`       chunked body + `Connection: close`
//! - `/big-close?bytes=N`   N pattern bytes (default 8 MiB) + `Connection: close`
//! - `/status-close?code=N` status N (204, 304, ...) without body + `Connection: close`
//! - `/big-head-close?bytes=N` about N bytes of `x-pad-*` headers + `Connection: close`
//! - `/spoof`               keep-alive response carrying forged `x-close-relay` headers
//! - `/envoy-503`           keep-alive 503 whose body is Envoy's own "upstream connect error"
//!   reply, as a gateway app passes on a dependency's
//! - `/passed-on?status=N&marker=V` status N (default 503) carrying rescue's marks as a gateway app
//!   passes a dependency's response headers on: `x-close-relay-refused: V` (default
//!   `orders.shop`, another service's) and `x-envoy-attempt-count: 3`
//! - `/delay?ms=N`          keep-alive `ok`, its head only after N ms (default 1000)
//! - `/late-body?ms=N`      keep-alive `ok`: its head at once, its body N ms later (default 300)
//! - `/prestop-header-seen`  how many requests reached the app carrying `x-close-relay-prestop`
//! - `/ws`                  with `Upgrade:` answers 101 and then echoes raw bytes
//! - `/ready`               200, or 503 after `/set-ready?v=0` (until `/set-ready?v=1`)
//! - `/reset`               no answer: the connection is reset, as Tomcat's shutdown resets
//!   the connections it is serving
//!
//! A request header `x-app-close: 1` makes any path answer with `Connection: close`.
//!
//! `--keep-alive-ms T`: the keep-alive race, on schedule. A request that comes on a connection
//! idle for T ms or more is met with a reset instead of an answer, as when the app closes an
//! idle connection just as the proxy reuses it (Node.js's `keepAliveTimeout`, 5 s, is shorter
//! than Envoy's hour). At most one in any T ms: the request has to cross the app's close on the
//! wire, and two doing so at once is rarer still. A connection in use is never reset.
//!
//! Graceful shutdown on SIGTERM, as real apps do it (`--shutdown MODE`):
//! - `close-header` (default): stop accepting (new connections are refused), answer the next
//!   request on each existing connection with `Connection: close`;
//! - `close-idle`: like Go's `Server.Shutdown`: refuse new connections, close idle ones at
//!   once, finish in-flight ones with `Connection: close`;
//! - `late-close`: keep serving normally for `--late-close-ms` (default 3000), then `close-header`
//!   (an app that serves on after its signal; not the preStop hook, which the rig sends itself).
//!
//! The app exits once no connection is left, or after `--shutdown-timeout-ms` (default 5000).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use e2e::pattern_byte;

static READY: AtomicBool = AtomicBool::new(true);
static PRESTOP_HEADER_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Set once the app is shutting down: no new connections, every connection ends.
static CLOSING: AtomicBool = AtomicBool::new(false);
static CLOSE_IDLE: AtomicBool = AtomicBool::new(false);
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// `--keep-alive-ms`: 0 for never; and when the last race was, in ms from the app's start.
static KEEP_ALIVE_MS: AtomicU64 = AtomicU64::new(0);
static LAST_RACE_MS: AtomicU64 = AtomicU64::new(0);
/// How often a waiting connection looks at the shutdown state.
const POLL: Duration = Duration::from_millis(10);

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let port = arg("--port").and_then(|p| p.parse::<u16>().ok()).unwrap_or(8080);
    if std::env::args().any(|a| a == "--h2c") {
        return serve_h2c(port);
    }
    let mode = arg("--shutdown").unwrap_or_else(|| "close-header".into());
    let ms = |name: &str, default: u64| arg(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (late, timeout) = (ms("--late-close-ms", 3000), ms("--shutdown-timeout-ms", 5000));
    KEEP_ALIVE_MS.store(ms("--keep-alive-ms", 0), Ordering::SeqCst);
    let listener = match TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("app: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let term = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()) {
        eprintln!("app: no SIGTERM handler: {e}");
        std::process::exit(1);
    }
    eprintln!("app: listening on 127.0.0.1:{port}, shutdown mode {mode}");
    let mut termed: Option<Instant> = None;
    loop {
        if term.load(Ordering::Relaxed) && termed.is_none() {
            termed = Some(Instant::now());
            eprintln!("app: SIGTERM, shutting down ({mode})");
        }
        if let Some(at) = termed {
            let delay = if mode == "late-close" { late } else { 0 };
            if at.elapsed() >= Duration::from_millis(delay) {
                break;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                OPEN.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let _ = serve(stream);
                    OPEN.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
    // Refuse new connections from now on; end the existing ones as the mode says.
    drop(listener);
    CLOSE_IDLE.store(mode == "close-idle", Ordering::SeqCst);
    CLOSING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_millis(timeout);
    while OPEN.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    eprintln!("app: exiting, {} connection(s) left", OPEN.load(Ordering::SeqCst));
    std::process::exit(0);
}

/// Waits for the first byte of the next request. `false` when the connection should end
/// instead: the peer closed, or the app closes idle connections on shutdown.
fn next_request_arrives(reader: &mut BufReader<TcpStream>) -> io::Result<bool> {
    reader.get_ref().set_read_timeout(Some(POLL))?;
    let arrived = loop {
        if CLOSING.load(Ordering::SeqCst) && CLOSE_IDLE.load(Ordering::SeqCst) {
            break false;
        }
        match reader.fill_buf() {
            Ok(buf) => break !buf.is_empty(),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
    };
    reader.get_ref().set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(arrived)
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let req = Request { method, path, query, headers };
    let body_len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    io::copy(&mut reader.by_ref().take(body_len as u64), &mut io::sink())?;
    Ok(Some(req))
}

/// Closes with a reset (`SO_LINGER` 0), as a socket closed with its request unread does.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on an open socket of ours, with a pointer to a live `linger` and its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Whether a request that comes after `idle` on a reused connection meets the keep-alive race
/// (`--keep-alive-ms`), at most once in any keep-alive period.
fn meets_the_race(idle: Duration) -> bool {
    static START: OnceLock<Instant> = OnceLock::new();
    let keep_alive = KEEP_ALIVE_MS.load(Ordering::SeqCst);
    if keep_alive == 0 || idle < Duration::from_millis(keep_alive) {
        return false;
    }
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + keep_alive;
    let last = LAST_RACE_MS.load(Ordering::SeqCst);
    now >= last + keep_alive && LAST_RACE_MS.compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

fn serve(stream: TcpStream) -> io::Result<()> {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut served = 0usize;
    loop {
        let idle_since = Instant::now();
        if !next_request_arrives(&mut reader)? {
            break;
        }
        served += 1;
        if served > 1 && meets_the_race(idle_since.elapsed()) {
            reset(&out);
            return Ok(());
        }
        let Some(req) = read_request(&mut reader)? else { break };
        if req.path == "/reset" {
            reset(&out);
            return Ok(());
        }
        if req.header("x-close-relay-prestop").is_some() {
            PRESTOP_HEADER_SEEN.fetch_add(1, Ordering::SeqCst);
        }
        let head_only = req.method == "HEAD";
        let forced = req.header("x-app-close") == Some("1") || CLOSING.load(Ordering::SeqCst);
        let close = if forced { "Connection: close\r\n" } else { "" };
        let simple = |extra: &str, body: &str| {
            let body = if head_only { "" } else { body };
            format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{extra}{close}\r\n{body}")
        };
        let (response, keep) = match req.path.as_str() {
            "/keep" => (simple("", "ok"), !forced),
            "/close" => (simple("Connection: close\r\n", "ok"), false),
            "/close-token" => (simple("Connection: Keep-Alive, CLOSE\r\n", "ok"), false),
            "/proxy-close" => (simple("Proxy-Connection: close\r\n", "ok"), false),
            "/eof" => ("HTTP/1.1 200 OK\r\n\r\neof-body".to_string(), false),
            "/http10-eof" => ("HTTP/1.0 200 OK\r\n\r\nhttp10-body".to_string(), false),
            "/chunked-close" => (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                    .to_string(),
                false,
            ),
            "/status-close" => {
                let code = req.param("code").unwrap_or("204");
                (format!("HTTP/1.1 {code} X\r\nConnection: close\r\n\r\n"), false)
            }
            "/big-head-close" => {
                let n: usize = req.param("bytes").and_then(|b| b.parse().ok()).unwrap_or(40 << 10);
                let pads: String = (0..n.div_ceil(4000))
                    .map(|i| format!("x-pad-{i}: {}\r\n", "a".repeat(3990)))
                    .collect();
                (simple(&format!("{pads}Connection: close\r\n"), "ok"), false)
            }
            "/ready" => {
                let status = if READY.load(Ordering::Relaxed) { "200 OK" } else { "503 Unavailable" };
                (format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n{close}\r\n"), !forced)
            }
            "/late-body" => {
                let ms = req.param("ms").and_then(|m| m.parse().ok()).unwrap_or(300);
                out.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{close}\r\n").as_bytes())?;
                out.flush()?;
                std::thread::sleep(Duration::from_millis(ms));
                out.write_all(b"ok")?;
                if forced {
                    return Ok(());
                }
                continue;
            }
            "/delay" => {
                let ms = req.param("ms").and_then(|m| m.parse().ok()).unwrap_or(1_000);
                std::thread::sleep(Duration::from_millis(ms));
                (simple("", "ok"), !forced)
            }
            "/prestop-header-seen" => {
                let seen = PRESTOP_HEADER_SEEN.load(Ordering::SeqCst).to_string();
                (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n{seen}", seen.len()), !forced)
            }
            "/set-ready" => {
                READY.store(req.param("v") == Some("1"), Ordering::Relaxed);
                (simple("", "ok"), !forced)
            }
            "/envoy-503" => {
                let body = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure";
                (format!("HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n{close}\r\n{body}", body.len()), !forced)
            }
            "/passed-on" => {
                let status = req.param("status").unwrap_or("503");
                let marker = req.param("marker").unwrap_or("orders.shop");
                let marks = format!("x-close-relay-refused: {marker}\r\nx-envoy-attempt-count: 3\r\n");
                let body = if head_only { "" } else { "no" };
                (format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n{marks}{close}\r\n{body}"), !forced)
            }
            "/spoof" => (
                simple("x-close-relay: 0000000000000000\r\nX-Close-Relay: close\r\n", "ok"),
                !forced,
            ),
            "/big" => {
                // A large keep-alive body (the soak's big and slow clients).
                let n: usize = req.param("bytes").and_then(|b| b.parse().ok()).unwrap_or(1 << 20);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n{close}\r\n");
                out.write_all(head.as_bytes())?;
                let body: Vec<u8> = (0..n).map(pattern_byte).collect();
                out.write_all(&body)?;
                if forced {
                    return Ok(());
                }
                continue;
            }
            "/big-close" => {
                let n: usize = req.param("bytes").and_then(|b| b.parse().ok()).unwrap_or(8 << 20);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
                out.write_all(head.as_bytes())?;
                let mut sent = 0;
                while sent < n {
                    let end = (sent + 65536).min(n);
                    let piece: Vec<u8> = (sent..end).map(pattern_byte).collect();
                    out.write_all(&piece)?;
                    sent = end;
                }
                return Ok(());
            }
            "/slow" => {
                // A keep-alive chunked stream with pauses longer than any idle grace: a response
                // in flight that writes nothing for a while (streaming, long-poll, SSE).
                let chunks: usize = req.param("chunks").and_then(|c| c.parse().ok()).unwrap_or(6);
                let pause = Duration::from_millis(req.param("pause_ms").and_then(|p| p.parse().ok()).unwrap_or(400));
                out.write_all(format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{close}\r\n").as_bytes())?;
                for i in 0..chunks {
                    if i > 0 {
                        std::thread::sleep(pause);
                    }
                    let piece = format!("chunk-{i}\n");
                    out.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())?;
                    out.flush()?;
                }
                out.write_all(b"0\r\n\r\n")?;
                if forced {
                    return Ok(());
                }
                continue;
            }
            "/ws" if req.header("upgrade").is_some() => {
                out.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                )?;
                // Echo raw bytes until the peer closes: Envoy relays them untouched.
                let mut buf = [0u8; 4096];
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    out.write_all(&buf[..n])?;
                }
            }
            _ => ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(), true),
        };
        out.write_all(response.as_bytes())?;
        if !keep {
            return Ok(());
        }
    }
    Ok(())
}

fn serve_h2c(port: u16) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("app: no runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("app: cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("app: listening on 127.0.0.1:{port} (h2c)");
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let response = http::Response::builder().status(200).body(()).unwrap_or_default();
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"h2-ok"), true);
                    }
                }
            });
        }
    });
}
