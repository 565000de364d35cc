//! Should this response close the client's connection, and why. Pure functions: no host calls.

use crate::http1;

/// Why a response closes the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The app said `Connection: close` (any case, anywhere in the token list).
    ConnectionClose,
    /// The app said `Proxy-Connection: close`, which Envoy's HTTP/1 pool honours too.
    ProxyConnectionClose,
    /// No `Content-Length` and not chunked: the body ends when the app closes (HTTP/1.0 or 1.1).
    CloseDelimited,
    /// Envoy could not connect to the app: this client must not meet that error twice.
    ConnectFailure,
    /// The app refused the request and a healthy pod answered it (rescue): this client must
    /// reconnect to a healthy pod instead of coming back through this one.
    Rescued,
    /// The pod is going away: every connection goes.
    Draining,
    /// An earlier response on this connection told the client to close, and the client had
    /// already sent this request behind it: answered, with close, as the connection ends.
    Pipelined,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectionClose => "connection_close",
            Reason::ProxyConnectionClose => "proxy_connection_close",
            Reason::CloseDelimited => "close_delimited",
            Reason::ConnectFailure => "connect_failure",
            Reason::Rescued => "rescued",
            Reason::Draining => "draining",
            Reason::Pipelined => "pipelined",
        }
    }
}

/// Why a connection-ending response is passed through without relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Client speaks HTTP/2, HTTP/3 or HTTP/1.0: no `Connection` header to relay at L4.
    NotHttp11,
    /// WebSocket or other `Upgrade`: the connection changes protocol; leave it alone.
    Upgrade,
    /// CONNECT tunnels are not HTTP responses on the wire after the head.
    Connect,
    /// 1xx (including 101): not a final response.
    Informational,
    /// No network role on this connection, so the marker could not be rewritten.
    NoNetworkRole,
}

impl SkipReason {
    pub const ALL: [SkipReason; 5] = [
        SkipReason::NotHttp11,
        SkipReason::Upgrade,
        SkipReason::Connect,
        SkipReason::Informational,
        SkipReason::NoNetworkRole,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotHttp11 => "not_http11",
            SkipReason::Upgrade => "upgrade",
            SkipReason::Connect => "connect",
            SkipReason::Informational => "informational",
            SkipReason::NoNetworkRole => "no_network_role",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The connection stays: nothing to do.
    Keep,
    Relay(Reason),
    Skip(SkipReason),
}

/// What the HTTP role reads from the app's response headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseFacts<'a> {
    pub status: u16,
    pub connection: Option<&'a str>,
    pub proxy_connection: Option<&'a str>,
    pub content_length: bool,
    pub transfer_encoding: Option<&'a str>,
}

/// What the HTTP role reads about the request, only once a response ends its connection.
#[derive(Debug, Default, Clone)]
pub struct RequestFacts {
    /// Envoy's `request.protocol`: "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3".
    pub protocol: String,
    pub method: String,
    pub upgrade: Option<String>,
    pub connection: Option<String>,
}

/// True when a comma-separated header value holds `token` (RFC 9110 §5.6.1, case-insensitive).
fn has_token(list: &str, token: &str) -> bool {
    http1::has_token(list.as_bytes(), token.as_bytes())
}

/// Does the app's response end the app's connection? `None` on the keep-alive fast path.
pub fn upstream_end(resp: &ResponseFacts) -> Option<Reason> {
    if resp.connection.is_some_and(|c| has_token(c, "close")) {
        return Some(Reason::ConnectionClose);
    }
    if resp.proxy_connection.is_some_and(|c| has_token(c, "close")) {
        return Some(Reason::ProxyConnectionClose);
    }
    let bodyless = resp.status < 200 || resp.status == 204 || resp.status == 304;
    let chunked = resp.transfer_encoding.is_some_and(|te| http1::chunked(te.as_bytes()));
    if !bodyless && !resp.content_length && !chunked {
        return Some(Reason::CloseDelimited);
    }
    None
}

/// Pod- and stream-level signals besides the response itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Signals {
    /// The pod is going away (see `drain`).
    pub draining: bool,
    /// This response is Envoy's own 5xx for a failed connect to the app (flag UF).
    pub connect_failure: bool,
    /// This response came from another pod after the app refused the request ([`rescued`]).
    pub rescued: bool,
    /// An earlier response on this connection already told the client to close.
    pub closing: bool,
}

/// The response header a rescue-enabled sidecar's Envoy adds to its own reply when its app did not
/// take the request (`local_reply_config`: response flag UF, and for an idempotent method UC or
/// UR): the pod that handed the request there may try another.
pub const REFUSED_HEADER: &str = "x-close-relay-refused";

/// Did a healthy pod answer this request after the local app refused it? The rescue route
/// (docs/rescue.md) tries the local app first, so only its retries go to another pod, and
/// Envoy sets `x-envoy-attempt-count` on the response (`include_attempt_count_in_response`):
/// 2 or more means a retry answered, unless the answer is a refusal too ([`REFUSED_HEADER`]:
/// every pod tried refused, or there was none). Without the count, or with one that is not a
/// number, nothing is known: not rescued. Only where rescue's route set the count: elsewhere
/// it is the app's own header ([`rescue_marks`]).
pub fn rescued(attempt_count: Option<&str>, refused: bool) -> bool {
    !refused && attempts(attempt_count) >= 2
}

fn attempts(attempt_count: Option<&str>) -> u32 {
    attempt_count.and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(0)
}

/// The names rescue's routes carry (`envoyfilter/rescue`): only on them does Envoy write
/// `x-envoy-attempt-count` and the refusal marker itself.
pub const RESCUE_ROUTE_PREFIX: &str = "close-relay-rescue";

/// Rescue's marks on one response, as far as this sidecar can prove them its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    /// A refusal: this Envoy's own reply when its app did not take the request, or the reply
    /// of the pod it handed the request to.
    pub refused: bool,
    /// Another pod answered after the local app refused.
    pub rescued: bool,
    /// A [`REFUSED_HEADER`] that is neither: the app's (or something behind it), passed on. It
    /// counts for nothing and is taken off before the client sees it.
    pub copy: bool,
}

/// Which of rescue's marks on a response are this sidecar's. `on_rescue_route`: the response
/// came by one of rescue's routes, where Envoy overwrites `x-envoy-attempt-count`. A marker is
/// a refusal only on a 5xx that is either Envoy's own reply to a connection its app refused or
/// reset (response flags UF, UC, UR: a local reply carries none of the app's headers), or the
/// answer of another pod, which only a retry reaches (attempts 2 or more), and whose sidecar
/// takes its own app's copies off. Anything else is the app's: a gateway passing on a
/// dependency's refusal must not drain its own pod.
pub fn rescue_marks(marker: bool, attempt_count: Option<&str>, failed: bool, flags: u64, on_rescue_route: bool) -> Marks {
    let tries = if on_rescue_route { attempts(attempt_count) } else { 0 };
    let envoys_reply = flags & (FLAG_UPSTREAM_CONNECTION_FAILURE | FLAG_UPSTREAM_REMOTE_RESET | FLAG_UPSTREAM_CONNECTION_TERMINATION) != 0;
    let refused = marker && on_rescue_route && failed && (envoys_reply || tries >= 2);
    Marks { refused, rescued: !marker && tries >= 2, copy: marker && !refused }
}

/// Full decision for one response. `request` is only consulted when something asks for a
/// close, and `unframed_ends_connection` only for a response without framing, so the host
/// calls behind them stay off the common path.
pub fn decide(
    resp: &ResponseFacts,
    signals: Signals,
    request: impl FnOnce() -> RequestFacts,
    unframed_ends_connection: impl FnOnce() -> bool,
) -> Decision {
    let end = upstream_end(resp);
    let reason = match (signals.connect_failure, end, signals.draining) {
        (true, _, _) => Reason::ConnectFailure,
        (false, _, _) if signals.rescued => Reason::Rescued,
        (false, Some(end), _) => end,
        (false, None, true) => Reason::Draining,
        (false, None, false) if signals.closing => Reason::Pipelined,
        (false, None, false) => return Decision::Keep,
    };
    if resp.status < 200 {
        return Decision::Skip(SkipReason::Informational);
    }
    let req = request();
    if req.method.eq_ignore_ascii_case("CONNECT") {
        return Decision::Skip(SkipReason::Connect);
    }
    if req.upgrade.is_some() || req.connection.as_deref().is_some_and(|c| has_token(c, "upgrade")) {
        return Decision::Skip(SkipReason::Upgrade);
    }
    if req.protocol != "HTTP/1.1" {
        return Decision::Skip(SkipReason::NotHttp11);
    }
    if reason == Reason::CloseDelimited
        && (req.method.eq_ignore_ascii_case("HEAD") || !unframed_ends_connection())
    {
        // A HEAD response never has a body, and an HTTP/2 app frames its bodies itself: in
        // both, missing framing headers say nothing about the connection.
        return match (signals.draining, signals.closing) {
            (true, _) => Decision::Relay(Reason::Draining),
            (false, true) => Decision::Relay(Reason::Pipelined),
            (false, false) => Decision::Keep,
        };
    }
    Decision::Relay(reason)
}

/// Tells a close-delimited HTTP/1 app from an HTTP/2 (h2c) app, which wasm cannot ask Envoy
/// about: both send responses without `Content-Length` or chunking. A close-delimited response
/// ends its upstream connection, so the next one comes over a new connection; an HTTP/2 app
/// keeps answering over the same one. Seeing an app's unframed response arrive on the upstream
/// connection that carried its previous one marks that app as multiplexed for good. The cost
/// is one relayed close per VM before an HTTP/2 app is recognised.
#[derive(Debug, Default)]
pub struct UnframedLearner {
    hosts: std::collections::BTreeMap<String, Unframed>,
}

#[derive(Debug, PartialEq, Eq)]
enum Unframed {
    /// The last unframed response came over this upstream connection (its local address).
    LastOn(String),
    Multiplexed,
}

/// Upstream hosts remembered at most; a sidecar talks to one app, so this is generous.
const LEARNER_CAPACITY: usize = 256;

impl UnframedLearner {
    /// An unframed response from `host` arrived over the upstream connection whose local
    /// address is `local`: does it end that connection?
    pub fn ends_connection(&mut self, host: &str, local: &str) -> bool {
        match self.hosts.get(host) {
            Some(Unframed::Multiplexed) => false,
            Some(Unframed::LastOn(previous)) if previous == local => {
                self.hosts.insert(host.to_string(), Unframed::Multiplexed);
                false
            }
            _ => {
                if self.hosts.len() >= LEARNER_CAPACITY {
                    self.hosts.clear();
                }
                self.hosts.insert(host.to_string(), Unframed::LastOn(local.to_string()));
                true
            }
        }
    }
}

/// Envoy's legacy response-flag bits (`response.flags`) that say how a 5xx came about.
const FLAG_UPSTREAM_REMOTE_RESET: u64 = 1 << 4; // UR
const FLAG_UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5; // UF
const FLAG_UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6; // UC

/// What a response says about the app, from its status and Envoy's response flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Answered, or failed in a way that says nothing about the app going away.
    Fine,
    /// Envoy could not connect to the app (UF): it refuses connections.
    Refused,
    /// The app reset or terminated the connection before answering (UR, UC).
    Reset,
}

/// Whether a response is a failure at all: a 5xx, or, for gRPC, any status with a `grpc-status`
/// other than 0 (Envoy answers a gRPC request it could not take to the app with HTTP 200 and
/// `grpc-status: 14`, a trailers-only response whose status is in its headers).
pub fn failed(status: u16, grpc_status: Option<&str>) -> bool {
    status >= 500 || grpc_status.is_some_and(|s| s.trim() != "0")
}

/// `failed`: [`failed`]. `refused` is [`REFUSED_HEADER`] on the response: with rescue, a refusal
/// can come back from the pod the request was handed to, as that pod's reply rather than this
/// Envoy's, so without UF.
pub fn upstream(failed: bool, flags: u64, refused: bool) -> Upstream {
    if !failed {
        Upstream::Fine
    } else if refused || flags & FLAG_UPSTREAM_CONNECTION_FAILURE != 0 {
        Upstream::Refused
    } else if flags & (FLAG_UPSTREAM_REMOTE_RESET | FLAG_UPSTREAM_CONNECTION_TERMINATION) != 0 {
        Upstream::Reset
    } else {
        Upstream::Fine
    }
}

/// What one response says about the app's health, for the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppSaid {
    /// The app answered, or Envoy failed for reasons of its own.
    Answered,
    /// The app refuses connections (UF, or rescue's refusal marker): it has stopped accepting,
    /// which a healthy app never does. Evidence at once.
    Refused,
    /// A reset (UC/UR, when `resets` counts), or a request another pod answered (rescue, after
    /// a refusal or a reset): evidence only when it comes again before the app answers
    /// (`evidence::Streak`), as a keep-alive race happens to a healthy app.
    Failed,
}

pub fn app_said(upstream: Upstream, rescued: bool, resets_count: bool) -> AppSaid {
    match upstream {
        Upstream::Refused => AppSaid::Refused,
        Upstream::Reset if resets_count => AppSaid::Failed,
        _ if rescued => AppSaid::Failed,
        _ => AppSaid::Answered,
    }
}

/// The response ends the app's own connection (as opposed to Envoy's reasons to close).
pub fn app_ended(reason: Reason) -> bool {
    matches!(reason, Reason::ConnectionClose | Reason::ProxyConnectionClose | Reason::CloseDelimited)
}

/// With `relay_upstream_close` off, the app's own close is not relayed, unless the pod is
/// draining anyway: then the response closes for that reason. Envoy's reasons stay.
pub fn relayed(reason: Reason, relay_upstream_close: bool, draining: bool) -> Option<Reason> {
    match (app_ended(reason), relay_upstream_close, draining) {
        (false, _, _) | (true, true, _) => Some(reason),
        (true, false, true) => Some(Reason::Draining),
        (true, false, false) => None,
    }
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
