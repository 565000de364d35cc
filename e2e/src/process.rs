//! Processes the tests start: each killed by PID and reaped when its guard drops, also when a
//! test fails; waiting for them; their scratch directories.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};


use crate::repo_root;

/// A child process killed (by PID) and reaped on drop.
pub struct Proc {
    child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { child, name }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits until `ready`, for at most `timeout`; a process that exits first fails at once.
    /// Either failure panics with what the process wrote to `log`. The timeouts are long because
    /// a loaded machine (Envoys compiling the module on both cores) can hold a new process back
    /// for seconds; a quiet one is ready in milliseconds.
    pub fn wait_ready(&mut self, timeout: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            // Whether it had exited before `ready` looked: what it wrote before exiting counts.
            let exited = self.exited();
            if ready() {
                return;
            }
            if exited || Instant::now() > deadline {
                let said = fs::read_to_string(log).unwrap_or_default();
                panic!("{} did not start (exited: {exited}); log {}:\n{said}", self.name, log.display());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM, as the kubelet sends it.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the child (by its PID): a server's own graceful-shutdown signal.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's PID with a valid signal number.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn connectable(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A scratch directory under `target/e2e/` for one test's configs and logs.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo_root().join("target/e2e").join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
