//! The kubelet's preStop hook (`drain.prestop`): a `preStop.httpGet` carrying
//! `x-close-relay-prestop: <token>` reaches the sidecar's inbound listener like any request. The
//! network role sees the header in the connection's first bytes (the kubelet opens a connection
//! per hook) and says so in the published address; the HTTP role checks the token, turns on the
//! `prestop` drain source and holds the request here. Each HTTP VM's tick answers its holds
//! once Envoy's stats show no other HTTP/1 client connection on the inbound listeners, or when
//! `max_wait_ms` has passed, and the kubelet goes on to stop the app.

use log::{info, warn};

use crate::drain::{self, DrainStats};
use crate::metrics::Metrics;
use crate::{host, keys};
use crate::vm;

/// One held hook: the HTTP context to answer and when the hold began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hold {
    context_id: u32,
    since_ms: u64,
}

/// How a hold ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No other client connection is left.
    Gone { waited_ms: u64 },
    /// `max_wait_ms` passed; `left`: connections the last read after the hold began still
    /// counted (unknown without one).
    TimedOut { waited_ms: u64, left: Option<u64> },
}

/// Whether a hold that began at `since_ms` ends now. `read`: the last stats read, when its call
/// was sent and the inbound HTTP/1 client connections it counted; only a read sent after the hold
/// began counts, as only it surely counts the hook's own connections, `hooks` of them pod-wide.
pub fn outcome(since_ms: u64, now_ms: u64, max_wait_ms: u64, read: Option<(u64, u64)>, hooks: u64) -> Option<Outcome> {
    let waited_ms = now_ms.saturating_sub(since_ms);
    let left = read.filter(|(at, _)| *at >= since_ms).map(|(_, active)| active.saturating_sub(hooks));
    match left {
        Some(0) => Some(Outcome::Gone { waited_ms }),
        _ if waited_ms >= max_wait_ms => Some(Outcome::TimedOut { waited_ms, left }),
        _ => None,
    }
}

/// The answer's body: which of the two happened, and how many connections were left.
pub fn body(outcome: Outcome) -> String {
    match outcome {
        Outcome::Gone { waited_ms } => {
            format!("close-relay prestop: no client connection left after {waited_ms} ms\n")
        }
        Outcome::TimedOut { waited_ms, left: Some(left) } => {
            format!("close-relay prestop: max_wait_ms passed after {waited_ms} ms, {left} client connections left\n")
        }
        Outcome::TimedOut { waited_ms, left: None } => {
            format!("close-relay prestop: max_wait_ms passed after {waited_ms} ms, client connections not counted (no stats read)\n")
        }
    }
}

/// Holds the hook of HTTP context `context_id` until [`tick`] answers it.
pub fn hold(context_id: u32) {
    let since_ms = host::now_ms();
    vm::HOLDS.with(|h| h.borrow_mut().push(Hold { context_id, since_ms }));
    count_hooks(1);
    info!("close-relay: kubelet preStop hook held until the pod's client connections are gone");
}

/// The hook's context ended before its answer (the kubelet gave up): forget it.
pub fn forget(context_id: u32) {
    let removed = vm::HOLDS.with(|h| {
        let mut holds = h.borrow_mut();
        let before = holds.len();
        holds.retain(|hold| hold.context_id != context_id);
        before != holds.len()
    });
    if removed {
        count_hooks(-1);
    }
}

/// Answers every hold whose outcome is in.
pub fn tick(max_wait_ms: u64, metrics: &Metrics) {
    if vm::HOLDS.with(|h| h.borrow().is_empty()) {
        return;
    }
    let now = host::now_ms();
    let read = DrainStats::decode_read(&host::shared_get(keys::SIDECAR_STATS).0)
        .map(|(at, stats)| (at, stats.inbound_http1_active));
    let [hooks] = drain::decode_u64s(&host::shared_get(keys::PRESTOP_HOOKS).0);
    let due: Vec<(Hold, Outcome)> = vm::HOLDS.with(|h| {
        h.borrow()
            .iter()
            .filter_map(|hold| outcome(hold.since_ms, now, max_wait_ms, read, hooks).map(|o| (*hold, o)))
            .collect()
    });
    for (hold, outcome) in due {
        forget(hold.context_id);
        let text = body(outcome);
        let answered = host::set_effective_context(hold.context_id)
            .and_then(|()| host::send_local_response(200, "close_relay_prestop", text.as_bytes()));
        match answered {
            Ok(()) => {
                metrics.prestop_answered.inc();
                info!("{}", text.trim_end());
            }
            Err(e) => warn!("close-relay: cannot answer the preStop hook ({e:?}); the kubelet's own wait ends it"),
        }
    }
}

/// Hooks held pod-wide, in the HTTP VMs' shared data (they share a `vm_id` in either layout).
fn count_hooks(delta: i64) {
    host::shared_update(keys::PRESTOP_HOOKS, |current| {
        let [n] = drain::decode_u64s(current);
        let next = n.saturating_add_signed(delta);
        Some((drain::encode_u64s(&[next]), ()))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_when_a_later_read_counts_only_the_hooks_or_at_max_wait() {
        let at = |now, read, hooks| outcome(10_000, now, 20_000, read, hooks);
        assert_eq!(at(10_500, None, 1), None, "no read yet");
        assert_eq!(at(10_500, Some((9_900, 0)), 1), None, "a read from before the hook began does not count");
        assert_eq!(at(11_000, Some((10_900, 3)), 1), None, "two clients still connected");
        assert_eq!(at(12_000, Some((11_900, 1)), 1), Some(Outcome::Gone { waited_ms: 2_000 }), "only the hook's own");
        assert_eq!(at(12_000, Some((11_900, 0)), 1), Some(Outcome::Gone { waited_ms: 2_000 }), "the stat lagged");
        assert_eq!(at(30_000, Some((29_900, 4)), 1), Some(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }));
        assert_eq!(at(30_000, None, 1), Some(Outcome::TimedOut { waited_ms: 20_000, left: None }));
        assert_eq!(outcome(10_000, 10_000, 0, None, 1), Some(Outcome::TimedOut { waited_ms: 0, left: None }), "0: at once");
        assert!(body(Outcome::Gone { waited_ms: 2_000 }).contains("no client connection left after 2000 ms"));
        assert!(body(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }).contains("3 client connections left"));
    }
}
