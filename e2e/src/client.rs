//! A raw HTTP/1.1 client on one TCP connection: requests written byte for byte, responses
//! parsed with their head exactly as it came off the wire.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;


/// A parsed HTTP/1.x response with its head exactly as it came off the wire.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub raw_head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn says_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }

    pub fn leaks_marker(&self) -> bool {
        self.raw_head.to_ascii_lowercase().contains("x-close-relay")
    }
}

/// A raw client connection: writes bytes, parses responses, and tells whether the server
/// closed the socket.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn open(port: u16) -> Client {
        Client::try_open(port).unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"))
    }

    /// A connection to 127.0.0.1:`port` from the loopback address `source` (another pod, or the
    /// kubelet at [`crate::KUBELET_IP`]), as the sidecar sees a client's address.
    pub fn open_from(port: u16, source: std::net::Ipv4Addr) -> Client {
        use socket2::{Domain, SockAddr, Socket, Type};
        let connect = || -> io::Result<TcpStream> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.bind(&SockAddr::from(std::net::SocketAddrV4::new(source, 0)))?;
            socket.connect(&SockAddr::from(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port)))?;
            Ok(socket.into())
        };
        let stream = connect().unwrap_or_else(|e| panic!("connect 127.0.0.1:{port} from {source}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        Client { stream, buf: Vec::new() }
    }

    pub fn try_open(port: u16) -> io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client { stream, buf: Vec::new() })
    }

    /// How long a read waits (10 s unless set): a caller that waits longer on purpose, as the
    /// kubelet does for a preStop hook.
    pub fn set_timeout(&mut self, timeout: Duration) {
        let _ = self.stream.set_read_timeout(Some(timeout));
    }

    pub fn send(&mut self, raw: &str) -> io::Result<()> {
        self.send_bytes(raw.as_bytes())
    }

    pub fn send_bytes(&mut self, raw: &[u8]) -> io::Result<()> {
        self.stream.write_all(raw)
    }

    /// Sends a GET (or `method`) for `path` with optional extra header lines.
    pub fn request(&mut self, method: &str, path: &str, extra: &str) -> Response {
        self.send(&format!("{method} {path} HTTP/1.1\r\nhost: app\r\n{extra}\r\n"))
            .expect("send request");
        self.response(method)
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, "")
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take_until(&mut self, delim: &[u8]) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(delim.len()).position(|w| w == delim) {
                return Ok(self.buf.drain(..i + delim.len()).collect());
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-message"));
            }
        }
    }

    fn take_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    pub fn response(&mut self, method: &str) -> Response {
        self.try_response(method).expect("read response")
    }

    pub fn try_response(&mut self, method: &str) -> io::Result<Response> {
        let head = self.take_until(b"\r\n\r\n")?;
        let raw_head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = raw_head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut r = Response { status, raw_head, headers, body: Vec::new() };
        if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            return Ok(r);
        }
        if let Some(len) = r.header("content-length").and_then(|v| v.parse().ok()) {
            r.body = self.take_exact(len)?;
        } else if r.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let size_line = self.take_until(b"\r\n")?;
                let size = usize::from_str_radix(String::from_utf8_lossy(&size_line).trim(), 16)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let data = self.take_exact(size + 2)?;
                if size == 0 {
                    break;
                }
                r.body.extend_from_slice(&data[..size]);
            }
        } else {
            while self.fill()? > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        Ok(r)
    }

    /// True when the server closed the connection (EOF or reset) within `within`, with no
    /// further bytes before it.
    pub fn closed_by_server(&mut self, within: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(within));
        let closed = self.buf.is_empty()
            && match self.fill() {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            };
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(10)));
        closed
    }

    /// Whether the server has closed this connection, without waiting: a pending EOF or reset
    /// says closed; no data yet says open.
    pub fn open_now(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let _ = self.stream.set_nonblocking(true);
        let mut probe = [0u8; 1];
        let open = match self.stream.peek(&mut probe) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        let _ = self.stream.set_nonblocking(false);
        open
    }

    /// Waits until `want` bytes have arrived, keeping them for the next response read; false if
    /// they did not within `within`.
    pub fn received(&mut self, want: usize, within: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(within));
        while self.buf.len() < want && matches!(self.fill(), Ok(n) if n > 0) {}
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(10)));
        self.buf.len() >= want
    }

    /// Reads whatever raw bytes arrive within `within` (for upgraded connections).
    pub fn read_raw(&mut self, want: usize, within: Duration) -> Vec<u8> {
        self.received(want, within);
        std::mem::take(&mut self.buf)
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
