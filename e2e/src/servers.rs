//! Real app servers as pod apps, each started as its own process on 127.0.0.1 and stopped with
//! its own graceful-shutdown signal, as Kubernetes stops a container: nginx (SIGQUIT), a Go
//! `net/http` server (`Server.Shutdown` on SIGTERM), a Node.js `http` server (`server.close()`
//! on SIGTERM), uvicorn (h11, SIGTERM) and Tomcat 10 (SIGTERM, its shutdown hook). Each answers
//! every path with `ok` after about 2 ms of work (nginx answers at once: it has no way to wait
//! without modules Debian's nginx-light lacks). `make app-servers` installs them (PyPI and npm
//! at exact versions, Debian's at the release's); the sources are in `e2e/apps/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::nginx::Nginx;
use crate::{connectable, repo_root, Port, Proc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Nginx,
    Go,
    Node,
    Uvicorn,
    Tomcat,
    /// A gRPC service on @grpc/grpc-js (HTTP/2 only; the rig's gRPC rows, not [`Server::ALL`]).
    Grpc,
}

impl Server {
    pub const ALL: [Server; 5] = [Server::Nginx, Server::Go, Server::Node, Server::Uvicorn, Server::Tomcat];

    pub fn as_str(self) -> &'static str {
        match self {
            Server::Nginx => "nginx",
            Server::Go => "go",
            Server::Node => "node",
            Server::Uvicorn => "uvicorn",
            Server::Tomcat => "tomcat",
            Server::Grpc => "grpc-js",
        }
    }

    /// What its graceful shutdown does, as measured by `tests/servers.rs`.
    pub fn shutdown(self) -> &'static str {
        match self {
            Server::Nginx => "on SIGQUIT nginx closes idle connections within a millisecond and stops accepting",
            Server::Go => "Go's Server.Shutdown closes idle connections at once and stops accepting",
            Server::Node => {
                "Node's server.close() closes idle connections and stops accepting; a connection busy at the signal \
                 keeps being served, without `Connection: close`"
            }
            Server::Uvicorn => {
                "uvicorn closes its listener and idle connections at its next 0.1 s tick, and a connection busy at \
                 the signal after its response, without `Connection: close`"
            }
            Server::Tomcat => "Tomcat pauses its connector and closes idle connections 30 to 60 ms after SIGTERM",
            Server::Grpc => {
                "grpc-js's tryShutdown() stops accepting and sends GOAWAY on each connection at once, finishing the \
                 calls under way"
            }
        }
    }

    /// The keep-alive connections it closes in normal service, if any.
    pub fn routine_close(self) -> Option<&'static str> {
        match self {
            Server::Tomcat => Some("maxKeepAliveRequests, every 100th request"),
            Server::Nginx => Some("keepalive_requests, every 1000th request here"),
            Server::Go | Server::Node | Server::Uvicorn | Server::Grpc => None,
        }
    }

    /// The signal its container gets: nginx's image sets `STOPSIGNAL SIGQUIT`, the rest SIGTERM.
    pub fn stop_signal(self) -> libc::c_int {
        match self {
            Server::Nginx => libc::SIGQUIT,
            _ => libc::SIGTERM,
        }
    }
}

/// One real app server, killed (by PID) on drop.
pub struct RealApp {
    pub server: Server,
    pub port: u16,
    proc: Proc,
    _lease: Option<Port>,
}

fn installed(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} missing: run `make app-servers`", path.display());
    path
}

impl RealApp {
    /// Starts `server` with its files under `dir` and waits until it answers.
    pub fn start(server: Server, dir: &Path) -> RealApp {
        fs::create_dir_all(dir).expect("app dir");
        if server == Server::Nginx {
            let nginx = Nginx::launch(
                dir,
                "keepalive_requests 1000;\n  keepalive_timeout 75s;\n  default_type text/plain;\n\
                 server {\n    listen 127.0.0.1:{port};\n    location / { return 200 \"ok\"; }\n  }\n",
            );
            let Nginx { port, proc, _lease } = nginx;
            return RealApp { server, port, proc, _lease: Some(_lease) };
        }
        let lease = Port::lease();
        let port = lease.get();
        let log = dir.join("server.log");
        let out = fs::File::create(&log).expect("server log");
        let mut cmd = match server {
            Server::Go => {
                let mut c = Command::new(installed(repo_root().join("target/apps/go-app")));
                c.args(["--port", &port.to_string()]);
                c
            }
            Server::Node => {
                let mut c = Command::new("node");
                c.arg(repo_root().join("e2e/apps/node/server.js")).args(["--port", &port.to_string()]);
                c
            }
            Server::Uvicorn => {
                let python = installed(repo_root().join(".apps/python"));
                let mut c = Command::new("python3");
                c.env("PYTHONPATH", format!("{}:{}", python.display(), repo_root().join("e2e/apps/uvicorn").display()))
                    .args(["-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--http", "h11", "--log-level", "warning"]);
                c
            }
            Server::Tomcat => tomcat(dir, port),
            Server::Grpc => {
                let app = repo_root().join("e2e/apps/grpc");
                installed(app.join("node_modules/@grpc/grpc-js"));
                let mut c = Command::new("node");
                c.arg(app.join("server.js"));
                c.args(["--port", &port.to_string()]);
                c
            }
            Server::Nginx => unreachable!("started above"),
        };
        let mut proc = Proc::spawn("app server", cmd.stdout(out.try_clone().expect("log")).stderr(out));
        let answers = |port| if server == Server::Grpc { answers_grpc(port) } else { answers(port) };
        proc.wait_ready(Duration::from_secs(60), &log, || connectable(port) && answers(port));
        RealApp { server, port, proc, _lease: Some(lease) }
    }

    /// The container's stop signal.
    pub fn terminate(&self) {
        self.proc.signal(self.server.stop_signal());
    }

    pub fn exited(&mut self) -> bool {
        self.proc.exited()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Tomcat 10 from Debian's `tomcat10` (CATALINA_HOME), with a CATALINA_BASE of its own under
/// `dir`: Debian's default conf, one HTTP connector on `port`, and the JSP app as ROOT.
fn tomcat(dir: &Path, port: u16) -> Command {
    let home = installed(PathBuf::from("/usr/share/tomcat10"));
    let base = dir.join("tomcat");
    let conf = base.join("conf");
    for sub in ["conf", "logs", "temp", "work", "webapps"] {
        fs::create_dir_all(base.join(sub)).expect("tomcat base");
    }
    for file in ["web.xml", "context.xml", "catalina.properties", "logging.properties"] {
        fs::copy(Path::new("/etc/tomcat10").join(file), conf.join(file)).expect("tomcat conf");
    }
    fs::write(
        conf.join("server.xml"),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Server port=\"-1\" shutdown=\"SHUTDOWN\">\n  <Service name=\"Catalina\">\n\
             \x20   <Connector port=\"{port}\" address=\"127.0.0.1\" protocol=\"HTTP/1.1\" connectionTimeout=\"20000\"/>\n\
             \x20   <Engine name=\"Catalina\" defaultHost=\"localhost\">\n\
             \x20     <Host name=\"localhost\" appBase=\"webapps\" unpackWARs=\"false\" autoDeploy=\"false\"/>\n\
             \x20   </Engine>\n  </Service>\n</Server>\n"
        ),
    )
    .expect("tomcat server.xml");
    let root = base.join("webapps/ROOT");
    let app = repo_root().join("e2e/apps/tomcat/ROOT");
    fs::create_dir_all(root.join("WEB-INF")).expect("tomcat ROOT");
    for file in ["index.jsp", "WEB-INF/web.xml"] {
        fs::copy(app.join(file), root.join(file)).expect("tomcat app");
    }
    let mut c = Command::new(home.join("bin/catalina.sh"));
    // `run` execs the JVM in the foreground: the PID we hold is Tomcat's.
    c.arg("run").env("CATALINA_HOME", &home).env("CATALINA_BASE", &base).stdin(Stdio::null());
    c
}

/// A gRPC call answered with OK.
fn answers_grpc(port: u16) -> bool {
    crate::grpc::Caller::new(Duration::from_secs(2)).and_then(|mut c| c.call(port)).is_ok_and(|e| e.ok())
}

/// A GET answered with 200 (Tomcat listens before its app is deployed).
fn answers(port: u16) -> bool {
    crate::Client::try_open(port).ok().and_then(|mut c| {
        c.send("GET /ready HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n").ok()?;
        c.try_response("GET").ok()
    }).is_some_and(|r| r.status == 200)
}
