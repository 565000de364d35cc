//! The rig's own upstream app (`src/bin/app.rs`) as a process: its shutdown modes and paths.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;


use crate::client::Client;
use crate::process::{connectable, wait_until, Proc};
use crate::{repo_root, Port};

/// The `app` binary cargo built beside this executable (tests live one level deeper, in deps/).
pub fn app_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("app"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("app binary not found near {}: cargo build -p e2e", exe.display()))
}

/// What the app writes once it listens, and when its port is taken (`src/bin/app.rs`).
const LISTENING: &str = "app: listening on";
const TAKEN: &str = "Address already in use";

pub struct App {
    pub port: u16,
    args: Vec<String>,
    proc: Option<Proc>,
    /// Held while the app lives and across restarts, so its port is never handed to another;
    /// dropped after `proc` (fields drop in order), once the app is gone.
    _lease: Port,
}

impl App {
    pub fn start() -> App {
        App::start_with(&[])
    }

    /// The app speaking HTTP/2 with prior knowledge (h2c).
    pub fn start_h2c() -> App {
        App::start_with(&["--h2c"])
    }

    /// The app with extra arguments (`--shutdown close-idle`, ...) on a port of its own.
    pub fn start_with(extra: &[&str]) -> App {
        App::start_on(Port::lease(), extra)
    }

    /// The app on `lease`, or on another leased port if something took this one first. Once,
    /// under CI's load, a leased port nothing listened on at lease time was taken before the app
    /// bound it ("Address already in use") while a connect to it still succeeded: Envoy then
    /// met a refused port. The app now has to say it listens, and a taken port is exchanged.
    pub fn start_on(lease: Port, extra: &[&str]) -> App {
        let mut app = App {
            port: lease.get(),
            args: extra.iter().map(|a| a.to_string()).collect(),
            proc: None,
            _lease: lease,
        };
        for _ in 0..3 {
            if app.launch_once() {
                return app;
            }
            eprintln!("[app] 127.0.0.1:{} was taken before the app could listen on it; leasing another port", app.port);
            let lease = Port::lease();
            (app.port, app._lease) = (lease.get(), lease);
        }
        panic!("app: three leased ports taken before the app could listen on them");
    }

    /// Starts the app on its port and waits until it listens there; panics if it cannot.
    fn launch(&mut self) {
        assert!(self.launch_once(), "app: 127.0.0.1:{} is taken", self.port);
    }

    /// Starts the app and waits until it says it listens (true) or that its port is taken.
    fn launch_once(&mut self) -> bool {
        let port = self.port;
        let dir = repo_root().join("target/e2e");
        let _ = fs::create_dir_all(&dir);
        let log_path = dir.join(format!("app-{port}-{}.log", std::process::id()));
        let stderr = fs::File::create(&log_path).map(Stdio::from).unwrap_or_else(|_| Stdio::null());
        let mut proc = Proc::spawn(
            "app",
            Command::new(app_bin()).args(["--port", &port.to_string()]).args(&self.args).stderr(stderr),
        );
        let said = || fs::read_to_string(&log_path).unwrap_or_default();
        proc.wait_ready(Duration::from_secs(30), &log_path, || {
            let said = said();
            said.contains(TAKEN) || (said.contains(LISTENING) && connectable(port))
        });
        if said().contains(TAKEN) {
            return false;
        }
        self.proc = Some(proc);
        true
    }

    /// Kills the app (SIGKILL): its port refuses connections from now on.
    pub fn kill(&mut self) {
        drop(self.proc.take());
        wait_until("app port to close", Duration::from_secs(5), || !connectable(self.port));
    }

    /// Sends SIGTERM: the app shuts down gracefully in its `--shutdown` mode.
    pub fn terminate(&self) {
        if let Some(p) = &self.proc {
            p.terminate();
        }
    }

    pub fn exited(&mut self) -> bool {
        self.proc.as_mut().is_none_or(Proc::exited)
    }

    /// Starts the app again on the same port, in the same mode (kills it first if it runs).
    pub fn restart(&mut self) {
        drop(self.proc.take());
        self.launch();
    }

    /// Makes the app's `/ready` answer 200 (`true`) or 503.
    pub fn set_ready(&self, ready: bool) {
        let mut c = Client::open(self.port);
        let r = c.get(&format!("/set-ready?v={}", u8::from(ready)));
        assert_eq!(r.status, 200);
    }
}
