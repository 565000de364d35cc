//! The app's failures as evidence that it is going away: a streak of failures no answer came
//! between, and which upstream connections were in use when one was reset.

/// An app's failures that no answer came between, as one VM sees them. A reset of a reused
/// connection (UC/UR), or a request another pod answered for it (rescue), happens to a healthy
/// app too: one whose keep-alive idle timeout is shorter than Envoy's (Node.js: 5 s) closes an
/// idle connection just as Envoy reuses it. An app going away fails every request that comes,
/// one after the other; a healthy one answers the next.
///
/// One VM sees one worker's requests only, and a worker may carry little else than one
/// client's: so a streak also ends when the app answered anyone in the pod since it began
/// (`pod_answers`: the pod's answers as published each tick, [`crate::podwide::answers`]). A
/// client whose request makes a healthy app reset its connection cannot then drain the pod
/// by sending it twice to a quiet worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    count: u32,
    last_ms: u64,
    /// The pod's answers published when this streak began.
    pod_answers: u64,
}

impl Streak {
    /// The app answered: what failed before was no sign of it going away.
    pub fn answered(&mut self) {
        *self = Streak::default();
    }

    /// One more failure at `now_ms`, with the pod's answers published so far; returns how
    /// many came in a row, each within `window_ms` of the one before (a failure long after the
    /// last is a new streak: traffic was sparse), with no answer anywhere in the pod between.
    pub fn failed(&mut self, now_ms: u64, window_ms: u64, pod_answers: u64) -> u32 {
        let follows = self.count > 0 && now_ms <= self.last_ms.saturating_add(window_ms) && pod_answers <= self.pod_answers;
        let count = if follows { self.count.saturating_add(1) } else { 1 };
        *self = Streak { count, last_ms: now_ms, pod_answers };
        count
    }
}

/// When each upstream connection (by its local port) last carried an answer, as one VM sees
/// them: a reset of a connection in use is the app going away; the keep-alive race only
/// happens to one reused after the app's idle timeout. Envoy's pool for the app is per worker,
/// as is this record, and the connections of one pool have distinct local ports.
#[derive(Debug, Default)]
pub struct UpstreamUse {
    answered_ms: std::collections::BTreeMap<u16, u64>,
}

/// Records beyond this are pruned of the idle ones (an upstream pool rarely holds as many).
const UPSTREAM_RECORDS: usize = 1_024;

impl UpstreamUse {
    pub fn answered(&mut self, port: u16, now_ms: u64, idle_ms: u64) {
        if self.answered_ms.len() >= UPSTREAM_RECORDS {
            self.answered_ms.retain(|_, at| now_ms.saturating_sub(*at) < idle_ms);
        }
        if self.answered_ms.len() < UPSTREAM_RECORDS {
            self.answered_ms.insert(port, now_ms);
        }
    }

    /// Whether the connection on `port` carried an answer less than `idle_ms` ago.
    pub fn busy(&self, port: u16, now_ms: u64, idle_ms: u64) -> bool {
        self.answered_ms.get(&port).is_some_and(|at| now_ms.saturating_sub(*at) < idle_ms)
    }
}

/// The port of an address as Envoy gives it (`127.0.0.6:41234`, `[::1]:41234`).
pub fn port_of(address: &[u8]) -> Option<u16> {
    let at = address.iter().rposition(|b| *b == b':')?;
    std::str::from_utf8(address.get(at.saturating_add(1)..)?).ok()?.parse().ok()
}

#[cfg(test)]
#[path = "evidence_tests.rs"]
mod tests;
