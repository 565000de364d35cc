//! nginx, from Debian's nginx-light: the ALB stand-in of the rolling-restart rig, and the app
//! `make bench` puts behind Envoy.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Port, Proc};

/// nginx as the ALB: an upstream keep-alive pool over HTTP/1.1, `Connection` cleared toward
/// the targets (so their `Connection: close` is honoured by closing that pooled connection),
/// and no retry of a failed request (`proxy_next_upstream off`), as an ALB does not retry. nginx
/// would also retire each pooled connection after 1000 requests (`keepalive_requests`), which an
/// ALB does not: that alone moved a busy connection to the new pod within seconds.
pub struct Nginx {
    pub port: u16,
    pub(crate) proc: Proc,
    pub(crate) _lease: Port,
}

impl Nginx {
    /// The ALB stand-in: a keep-alive pool to `upstream`, no retries.
    pub fn start(dir: &std::path::Path, upstream: u16) -> Nginx {
        Nginx::launch(
            dir,
            &format!(
                "upstream pods {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 100000000; keepalive_time 1h; }}\n\
                 server {{\n    listen 127.0.0.1:{{port}};\n    location / {{\n      proxy_pass http://pods;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_next_upstream off;\n\
                 proxy_connect_timeout 2s;\n      proxy_read_timeout 5s;\n    }}\n  }}\n"
            ),
        )
    }

    /// The app `make bench` puts behind Envoy, one path per traffic shape: `/` answers `ok`
    /// (2 B), `/64k` and `/1m` are static files of those sizes, `/post` takes a body and
    /// answers `ok`. Keep-alive without limit.
    pub fn bench_app(dir: &std::path::Path) -> Nginx {
        let files = dir.join("files");
        fs::create_dir_all(&files).expect("bench files");
        for (name, len) in [("64k", 64 * 1024), ("1m", 1024 * 1024)] {
            let body: Vec<u8> = (0..len).map(crate::pattern_byte).collect();
            fs::write(files.join(name), body).expect("write bench file");
        }
        Nginx::launch(
            dir,
            &format!(
                "keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  client_max_body_size 1m;\n\
                 default_type application/octet-stream;\n\
                 server {{\n    listen 127.0.0.1:{{port}};\n    root {};\n\
                 location = / {{ return 200 \"ok\"; }}\n    location = /post {{ return 200 \"ok\"; }}\n  }}\n",
                files.display()
            ),
        )
    }

    /// One nginx process (no master) serving `http_block`, in which `{port}` is its port.
    pub(crate) fn launch(dir: &std::path::Path, http_block: &str) -> Nginx {
        let lease = Port::lease();
        let port = lease.get();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  {http}}}\n",
            dir = dir.display(),
            http = http_block.replace("{port}", &port.to_string()),
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, conf).expect("write nginx.conf");
        let nginx = ["/usr/sbin/nginx", "nginx"].into_iter().find(|p| Path::new(p).exists() || *p == "nginx");
        let mut proc = Proc::spawn(
            "nginx",
            Command::new(nginx.unwrap_or("nginx"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        proc.wait_ready(Duration::from_secs(10), &dir.join("error.log"), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Nginx { port, proc, _lease: lease }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
