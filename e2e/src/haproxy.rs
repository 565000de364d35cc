//! HAProxy, from Debian's haproxy 2.6: the ALB stand-in of the HTTP/2 and gRPC rows of the
//! rolling-restart rig. An ALB target group with protocol version GRPC speaks cleartext HTTP/2
//! to each pod and multiplexes its clients' calls onto the connections it keeps there; HAProxy
//! does the same with `proto h2` on both sides and `http-reuse always`. Like the nginx stand-in,
//! it never retries a request (`retries 0`): an ALB does not.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Port, Proc};

pub struct Haproxy {
    pub port: u16,
    proc: Proc,
    _lease: Port,
}

impl Haproxy {
    /// The ALB: h2c from the clients, h2c to `upstream`, connections to it shared by all calls.
    pub fn start(dir: &Path, upstream: u16) -> Haproxy {
        fs::create_dir_all(dir).expect("haproxy dir");
        let lease = Port::lease();
        let port = lease.get();
        let conf = format!(
            "global\n  maxconn 4096\n\n\
             defaults\n  mode http\n  retries 0\n  timeout connect 2s\n  timeout client 60s\n  timeout server 5s\n\
             \x20 timeout http-keep-alive 1h\n\n\
             frontend alb\n  bind 127.0.0.1:{port} proto h2\n  default_backend pods\n\n\
             backend pods\n  http-reuse always\n  server pod 127.0.0.1:{upstream} proto h2\n"
        );
        let path = dir.join("haproxy.cfg");
        fs::write(&path, conf).expect("write haproxy.cfg");
        let log = dir.join("haproxy.log");
        let out = fs::File::create(&log).expect("haproxy log");
        let bin = ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("haproxy");
        let mut proc = Proc::spawn(
            "haproxy",
            Command::new(bin).arg("-db").arg("-f").arg(&path).stdin(Stdio::null()).stdout(out.try_clone().expect("log")).stderr(out),
        );
        proc.wait_ready(Duration::from_secs(10), &log, || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Haproxy { port, proc, _lease: lease }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
