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
use proxy_wasm::types::MapType;

use crate::metrics::Metrics;
use crate::{host, keys};

thread_local! {
    /// When a refused hook was last logged.
    static PRESTOP_WARNED_MS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// This VM's held preStop hooks (a pod normally has one).
    static HOLDS: std::cell::RefCell<Vec<Hold>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The environment variable that holds the node's IP in the VM: istio-proxy has `HOST_IP`
/// (`status.hostIP`), and the plugin gets it with `vmConfig.env: [{name: HOST_IP, valueFrom: HOST}]`.
pub const HOST_IP_ENV: &str = "HOST_IP";

/// How often a refused hook is logged at most: outsiders can send as many as they like.
const WARN_EVERY_MS: u64 = 60_000;

/// Why a hook is refused (it is answered 403 by close-relay, and never reaches the app).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token configured, or drain awareness off.
    Off,
    WrongToken,
    /// The VM does not know the node's IP: nothing tells the kubelet from anyone else.
    NoHostIp,
    /// Not from the node's IP: another pod, or a client through the load balancer.
    NotFromNode,
    /// A proxy forwarded it: the kubelet sends none of these headers, an ALB adds them.
    Forwarded,
    /// Behind another request on its connection: the kubelet opens a connection per hook.
    NotFirst,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Off => "no token configured, or drain awareness off",
            Refusal::WrongToken => "wrong token",
            Refusal::NoHostIp => "the VM's environment has no HOST_IP (vmConfig.env, valueFrom: HOST)",
            Refusal::NotFromNode => "not from the node's IP",
            Refusal::Forwarded => "forwarded by a proxy (X-Forwarded-For, Forwarded)",
            Refusal::NotFirst => "not first on its connection",
        }
    }
}

/// What a hook must be to drain the pod. The kubelet runs `preStop.httpGet` from the node, on a
/// connection of its own, straight to the pod's IP: Istio rewrites only probes to its agent,
/// and the sidecar's redirect keeps the source address, so the node's IP is the connection's
/// source. Another pod connects from its own IP; the ALB from its own (IP targets), or, through
/// a NodePort that masquerades, from a node's, with `X-Forwarded-For` in its default mode.
pub fn admit(armed: bool, token_matches: bool, source: Option<&str>, host_ip: Option<&str>, forwarded: bool) -> Result<(), Refusal> {
    if !armed {
        return Err(Refusal::Off);
    }
    let host_ip = host_ip.map(str::trim).filter(|ip| !ip.is_empty()).ok_or(Refusal::NoHostIp)?;
    if source.map(ip_of) != Some(host_ip) {
        return Err(Refusal::NotFromNode);
    }
    if forwarded {
        return Err(Refusal::Forwarded);
    }
    if !token_matches {
        return Err(Refusal::WrongToken);
    }
    Ok(())
}

/// The IP of an address as Envoy gives it (`10.0.1.7:43122`, `[fd00::7]:43122`).
fn ip_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Refuses a hook: counted, logged at most once a minute, answered 403 here.
pub fn refuse(refusal: Refusal, metrics: &Metrics) {
    metrics.prestop_refused.inc();
    let now = host::now_ms();
    if PRESTOP_WARNED_MS.get().is_none_or(|at| now.saturating_sub(at) >= WARN_EVERY_MS) {
        PRESTOP_WARNED_MS.set(Some(now));
        warn!(
            "close-relay: refused a request carrying {} ({}); answered 403, no drain (logged once a minute, counted in \
             close_relay_prestop_refused_total)",
            keys::PRESTOP_HEADER,
            refusal.as_str()
        );
    }
    let body = format!("close-relay prestop: refused: {}\n", refusal.as_str());
    if let Err(e) = host::send_local_response(403, "close_relay_prestop_refused", body.as_bytes()) {
        info!("close-relay: cannot answer a refused preStop hook ({e:?}); its header was taken off");
    }
}

/// The request's facts a hook is judged by, read from the host (the hook's path only).
pub fn judge(token: Option<&crate::config::Secret>, drain_enabled: bool, offered: &str) -> Result<(), Refusal> {
    let header = |name| host::header(MapType::HttpRequestHeaders, name);
    let forwarded = header("x-forwarded-for").is_some() || header("forwarded").is_some();
    let source = host::get_property(&["source", "address"]).map(|a| String::from_utf8_lossy(&a).into_owned());
    let host_ip = std::env::var(HOST_IP_ENV).ok();
    let matches = token.is_some_and(|t| t.matches(offered.as_bytes()));
    admit(token.is_some() && drain_enabled, matches, source.as_deref(), host_ip.as_deref(), forwarded)
}

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
    HOLDS.with(|h| h.borrow_mut().push(Hold { context_id, since_ms }));
    info!("close-relay: kubelet preStop hook held until the pod's client connections are gone");
}

/// The hook's context ended before its answer (the kubelet gave up): forget it.
pub fn forget(context_id: u32) {
    HOLDS.with(|h| h.borrow_mut().retain(|hold| hold.context_id != context_id));
}

/// What the hook's network role last published on its connection, read as the held context.
fn left_on(context_id: u32) -> Option<u64> {
    host::set_effective_context(context_id).ok()?;
    let raw = host::get_property(&[keys::PRESTOP_PROPERTY])?;
    std::str::from_utf8(&raw).ok()?.parse().ok()
}

/// Answers every hold whose outcome is in.
pub fn tick(max_wait_ms: u64, metrics: &Metrics) {
    if HOLDS.with(|h| h.borrow().is_empty()) {
        return;
    }
    let now = host::now_ms();
    let holds: Vec<Hold> = HOLDS.with(|h| h.borrow().clone());
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
#[path = "prestop_tests.rs"]
mod tests;
