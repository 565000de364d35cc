//! The kubelet's preStop hook (`drain.prestop`): a `preStop.httpGet` carrying
//! `x-close-relay-prestop: <token>` reaches the sidecar's inbound listener like any request. The
//! network role sees the header in the connection's first bytes (the kubelet opens a connection
//! per hook) and says so in the published address; the HTTP role checks the token, turns on the
//! `prestop` drain source and holds the request here. The network role that owns the hook's
//! connection counts the pod's other client connections ([`crate::census`], every worker, any
//! protocol) and publishes the count on that connection ([`keys::PRESTOP_PROPERTY`]), which an
//! HTTP role in any VM can read. Each HTTP VM's tick answers its holds once that count is 0, or
//! when `max_wait_ms` has passed, and the kubelet goes on to stop the app.

use log::{info, warn};

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

/// Whether a hold that began at `since_ms` ends now. `left`: the pod's other client connections
/// as counted after the hook came (none yet: `None`).
pub fn outcome(since_ms: u64, now_ms: u64, max_wait_ms: u64, left: Option<u64>) -> Option<Outcome> {
    let waited_ms = now_ms.saturating_sub(since_ms);
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
            format!("close-relay prestop: max_wait_ms passed after {waited_ms} ms, client connections not counted (no network role on the hook's connection)\n")
        }
    }
}

/// Holds the hook of HTTP context `context_id` until [`tick`] answers it.
pub fn hold(context_id: u32) {
    let since_ms = host::now_ms();
    vm::HOLDS.with(|h| h.borrow_mut().push(Hold { context_id, since_ms }));
    info!("close-relay: kubelet preStop hook held until the pod's client connections are gone");
}

/// The hook's context ended before its answer (the kubelet gave up): forget it.
pub fn forget(context_id: u32) {
    vm::HOLDS.with(|h| h.borrow_mut().retain(|hold| hold.context_id != context_id));
}

/// What the hook's network role last published on its connection, read as the held context.
fn left_on(context_id: u32) -> Option<u64> {
    host::set_effective_context(context_id).ok()?;
    let raw = host::get_property(&[keys::PRESTOP_PROPERTY])?;
    std::str::from_utf8(&raw).ok()?.parse().ok()
}

/// Answers every hold whose outcome is in.
pub fn tick(max_wait_ms: u64, metrics: &Metrics) {
    if vm::HOLDS.with(|h| h.borrow().is_empty()) {
        return;
    }
    let now = host::now_ms();
    let holds: Vec<Hold> = vm::HOLDS.with(|h| h.borrow().clone());
    let due: Vec<(Hold, Outcome)> = holds
        .into_iter()
        .filter_map(|hold| outcome(hold.since_ms, now, max_wait_ms, left_on(hold.context_id)).map(|o| (hold, o)))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_when_a_later_read_counts_only_the_hooks_or_at_max_wait() {
        let at = |now, left| outcome(10_000, now, 20_000, left);
        assert_eq!(at(10_500, None), None, "not counted since the hook came");
        assert_eq!(at(11_000, Some(2)), None, "two clients still connected");
        assert_eq!(at(12_000, Some(0)), Some(Outcome::Gone { waited_ms: 2_000 }));
        assert_eq!(at(30_000, Some(3)), Some(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }));
        assert_eq!(at(30_000, None), Some(Outcome::TimedOut { waited_ms: 20_000, left: None }));
        assert_eq!(outcome(10_000, 10_000, 0, None), Some(Outcome::TimedOut { waited_ms: 0, left: None }), "0: at once");
        assert!(body(Outcome::Gone { waited_ms: 2_000 }).contains("no client connection left after 2000 ms"));
        assert!(body(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }).contains("3 client connections left"));
    }
}
