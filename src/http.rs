//! The HTTP role: looks at each response and decides whether the client connection must end
//! (the app ended its own, Envoy could not reach the app, the pod is draining, or an earlier
//! response already told the client to close). Then it marks the response for the network
//! role, which rewrites the mark and sees to the close. It also reports app failures, which
//! start a drain, and which connections have a request in flight: directly in a shared VM, by
//! notes on the network VM's queue from another VM (`link`).

use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::config::Config;
use crate::conn::{self, ConnRef};
use crate::decision::{self, decide, AppSaid, Decision, Marks, Reason, RequestFacts, ResponseFacts, Signals, SkipReason, Upstream};
use crate::drain::{Source, UNTIL_CLEARED};
use crate::evidence;
use crate::link::{Address, Note};
use crate::shared::Shared;
use crate::{host, keys, pod, prestop, wire};

thread_local! {
    /// Which upstream connections answered close-delimited responses, to tell an
    /// HTTP/2 app from one that ends its connections.
    static LEARNER: std::cell::RefCell<crate::decision::UnframedLearner> = std::cell::RefCell::default();
    /// This VM's upstream connections' last answers (the app's pool is per worker too).
    static UPSTREAM_USE: std::cell::RefCell<crate::evidence::UpstreamUse> = std::cell::RefCell::default();
    /// Requests begun in this VM, numbering them (which began after a reset).
    static REQUESTS_BEGUN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The missing network role was logged once.
    static WARNED_NO_NETWORK_ROLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub struct HttpRole {
    context_id: u32,
    shared: Rc<Shared>,
    request: RequestFacts,
    /// This connection's address, once read (the network role published it).
    address: Option<Address>,
    /// This connection's state when its network role shares the VM; its in-flight count
    /// includes this request until the stream ends (on drop).
    conn: Option<ConnRef>,
    /// The network role is in another VM and was told this request began.
    begun_there: bool,
    /// This request's number in the VM ([`REQUESTS_BEGUN`]).
    number: u64,
}

impl HttpRole {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        HttpRole {
            context_id,
            shared,
            request: RequestFacts::default(),
            address: None,
            conn: None,
            begun_there: false,
            number: 0,
        }
    }

    fn address(&mut self) -> Option<&Address> {
        if self.address.is_none() {
            let raw = host::get_property(&[keys::ADDRESS_PROPERTY])?;
            self.address = Some(Address::parse(String::from_utf8_lossy(&raw).into_owned()));
        }
        self.address.as_ref()
    }

    /// The network VM's queue when the network role is in another VM and has one.
    fn other_vm(&self) -> Option<u32> {
        let address = self.address.as_ref().filter(|a| a.token != 0)?;
        self.conn.is_none().then_some(address.token)
    }

    /// Counts this request against its connection so the sweep never closes a connection with a
    /// request in flight: directly in a shared VM, else by a note to the network VM.
    fn track_request(&mut self) {
        let Some(address) = self.address() else { return };
        match conn::conn_for(&address.text) {
            Some(conn) => {
                conn.borrow_mut().request_started();
                self.conn = Some(conn);
            }
            None if address.token != 0 => {
                self.begun_there = pod::send(address.token, &Note::Begin(address.text.clone()));
            }
            None => {}
        }
    }

    /// The kubelet's preStop hook, when the network role saw its header first on this
    /// connection (the kubelet opens one per hook): from the node's IP, with no proxy between,
    /// with the configured token, it drains the pod and is held for `prestop` to answer;
    /// anything else is refused with 403, counted. The header never reaches the app: where a
    /// token is configured it is taken off every request.
    fn prestop_hook(&mut self) -> Option<Action> {
        let shared = self.shared.clone();
        let config = shared.active()?;
        let prestop = &config.drain.prestop;
        let hook = self.address.as_ref().is_some_and(|a| a.hook);
        if !hook {
            if prestop.token.is_some() && host::header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER).is_some() {
                let _ = host::remove_header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER);
                prestop::refuse(prestop::Refusal::NotFirst, &shared.metrics);
                return Some(Action::Pause);
            }
            return None;
        }
        let offered = host::header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER)?;
        let _ = host::remove_header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER);
        if let Err(refusal) = prestop::judge(prestop.token.as_ref(), config.drain.enabled, &offered) {
            prestop::refuse(refusal, &shared.metrics);
            return Some(Action::Pause);
        }
        self.entered(Source::Prestop, UNTIL_CLEARED);
        prestop::hold(self.context_id);
        Some(Action::Pause)
    }

    /// A drain source this VM turned on and its evidence then disproved; the network VM keeps its
    /// own record with different `vm_id`s, so it is told too.
    fn cleared(&mut self, source: Source) {
        pod::clear(source, &self.shared.metrics);
        self.address();
        if let Some(token) = self.other_vm() {
            pod::send(token, &Note::Clear(source));
        }
    }

    /// A drain source this request turned on; with different `vm_id`s the network VM keeps its
    /// own record, so it is told too (a same-`vm_id` network VM already sees it: a no-op there).
    fn entered(&mut self, source: Source, until: u64) {
        if !pod::enter(source, until, &self.shared.metrics) {
            return;
        }
        self.address();
        if let Some(token) = self.other_vm() {
            pod::send(token, &Note::Enter { source, until });
        }
    }

    /// Whether this response must close its client connection, and why: the pure decision,
    /// what it cannot relay counted, the app's own closes counted toward `app_closes`.
    fn close_reason(&mut self, config: &Config, facts: &ResponseFacts, signals: Signals) -> Option<Reason> {
        let metrics = self.shared.metrics;
        let request = &mut self.request;
        let decision = decide(
            facts,
            signals,
            || RequestFacts { protocol: downstream_protocol(), ..std::mem::take(request) },
            unframed_ends_connection,
        );
        let ended = match decision {
            Decision::Keep => return None,
            Decision::Skip(skip) => {
                metrics.skipped(skip).inc();
                debug!("connection should end; not relayed: {}", skip.as_str());
                return None;
            }
            Decision::Relay(reason) => reason,
        };
        if decision::app_ended(ended) {
            self.count_app_close(config);
        }
        let reason = decision::relayed(ended, config.relay_upstream_close, signals.draining);
        if reason.is_none() {
            debug!("app ended its connection ({}); relay_upstream_close is off", ended.as_str());
        }
        reason.or(signals.closing.then_some(Reason::Pipelined))
    }

    /// Marks the response for the network role with this connection's address; the network role
    /// rewrites it and sees to the close.
    fn mark(&mut self, reason: Reason) {
        let metrics = self.shared.metrics;
        let Some(address) = self.address().map(|a| a.text.clone()) else {
            metrics.skipped(SkipReason::NoNetworkRole).inc();
            if !WARNED_NO_NETWORK_ROLE.replace(true) {
                warn!(
                    "close-relay: no network role on this listener, cannot relay the app's \
                     connection close; add the NETWORK filter before the HTTP connection manager"
                );
            }
            return;
        };
        if let Err(e) = host::add_header(MapType::HttpResponseHeaders, wire::MARKER, &address) {
            warn!("close-relay: cannot mark the response, not relayed: {e:?}");
            return;
        }
        if self.conn.is_none() {
            self.conn = conn::conn_for(&address);
        }
        if let Some(conn) = &self.conn {
            conn.borrow_mut().mark_head();
        }
        metrics.relayed.inc();
        match reason {
            Reason::Draining => metrics.closed_while_draining.inc(),
            Reason::ConnectFailure => metrics.closed_connect_failure.inc(),
            _ => {}
        }
        debug!("closing client connection after this response: {}", reason.as_str());
    }

    /// The app's own close, for `app_closes`: enough of them in a window drain the pod.
    fn count_app_close(&mut self, config: &Config) {
        let closes = &config.drain.app_closes;
        if config.drain.enabled && closes.enabled && pod::count_app_close(closes.window_ms, closes.threshold) {
            self.entered(Source::AppCloses, host::now_ms().saturating_add(closes.hold_ms));
        }
    }

    /// What this response says about the app: an answer ends a streak of failures; a refusal
    /// drains the pod at once; a reset or a rescue only when another came before any answer
    /// (`evidence::Streak`). Rescued requests are counted. Returns whether Envoy could not connect.
    fn watch_app(&mut self, config: &Config, headers: &ResponseHeaders, status: u16) -> (Upstream, bool) {
        let failed = decision::failed(status, headers.grpc_status.as_deref());
        let flags = if failed { response_flags() } else { 0 };
        let marks = rescue_marks(headers, failed, flags);
        let upstream = decision::upstream(failed, flags, marks.refused);
        let rescued = marks.rescued;
        if rescued {
            self.shared.metrics.rescued.inc();
        }
        let failure = &config.drain.app_failure;
        // Which upstream connection: only where a reset can drain the pod.
        let watched = config.drain.enabled && failure.enabled && failure.resets && failure.race_idle_ms > 0;
        let port = || watched.then(upstream_port).flatten();
        let evidence = match decision::app_said(upstream, rescued, failure.resets) {
            AppSaid::Answered => {
                self.shared.streak.borrow_mut().answered();
                pod::count_answer();
                if self.shared.unconfirmed_reset.get().is_some_and(|before| self.number > before) {
                    self.shared.unconfirmed_reset.set(None);
                    debug!("the app answered a request begun after its single reset: not going away");
                    self.cleared(Source::AppFailure);
                }
                // The tick's clock, free to read: at most a tick old (100 ms) against a second
                // of `race_idle_ms`, and an older record only ever reads as idle.
                if let Some(port) = port() {
                    UPSTREAM_USE.with(|u| u.borrow_mut().answered(port, host::coarse_now(), failure.race_idle_ms));
                }
                return (upstream, rescued);
            }
            AppSaid::Refused => {
                self.shared.unconfirmed_reset.set(None);
                true
            }
            AppSaid::Failed => {
                let now = host::now_ms();
                let busy = !rescued
                    && port().is_some_and(|port| UPSTREAM_USE.with(|u| u.borrow().busy(port, now, failure.race_idle_ms)));
                let in_a_row = self.shared.streak.borrow_mut().failed(now, failure.window_ms, pod::answers());
                debug!("app failed a request (response flags {flags:#x}, rescued: {rescued}, connection in use: {busy}): {in_a_row} in a row");
                if in_a_row >= failure.in_a_row {
                    self.shared.unconfirmed_reset.set(None);
                    true
                } else if busy && config.drain.enabled && failure.enabled && pod::single_reset_allowed(now) {
                    // The number of the last request begun before the reset: this one or a later.
                    self.shared.unconfirmed_reset.set(Some(REQUESTS_BEGUN.get()));
                    true
                } else {
                    false
                }
            }
        };
        if config.drain.enabled && failure.enabled && evidence {
            // A rescue: the next request on an idle connection would be rescued too, so the
            // sidecar's idle grace, not the app's at-once close (`Source::AppRescued`).
            let source = if rescued { Source::AppRescued } else { Source::for_app_failure(marks.refused) };
            debug!("app going away ({}): pod draining for {} ms", source.as_str(), failure.hold_ms);
            self.entered(source, host::now_ms().saturating_add(failure.hold_ms));
        }
        (upstream, rescued)
    }
}

/// Envoy lets go of the request headers once `on_http_request_headers` returns, so the few
/// request facts the decision may need are taken on the way in: three single reads, of which
/// only `:method` is usually there (an absent header costs no copy into the VM, where a whole-map
/// read copies every header the ALB sent; `make bench`).
fn request_facts_on_request() -> RequestFacts {
    let read = |name| host::header(MapType::HttpRequestHeaders, name);
    RequestFacts {
        protocol: String::new(),
        method: read(":method").unwrap_or_default(),
        upgrade: read("upgrade"),
        connection: read("connection"),
    }
}

/// Rescue's marks on this response that this sidecar wrote ([`decision::rescue_marks`]); a
/// refusal marker it did not write is taken off. The route's name is read only when a mark is
/// there at all: with rescue, every response carries an attempt count, few one of 2 or more.
fn rescue_marks(headers: &ResponseHeaders, failed: bool, flags: u64) -> Marks {
    if !headers.refused && !decision::rescued(headers.attempt_count.as_deref(), false) {
        return Marks::default();
    }
    let route = host::get_property(&["xds", "route_name"]);
    let on_rescue_route = route.is_some_and(|r| r.starts_with(decision::RESCUE_ROUTE_PREFIX.as_bytes()));
    let marks = decision::rescue_marks(headers.refused, headers.attempt_count.as_deref(), failed, flags, on_rescue_route);
    if marks.copy {
        debug!("{} on a response this sidecar did not refuse: the app's, taken off", decision::REFUSED_HEADER);
        if let Err(e) = host::remove_header(MapType::HttpResponseHeaders, decision::REFUSED_HEADER) {
            warn!("close-relay: cannot take the app's {} off its response: {e:?}", decision::REFUSED_HEADER);
        }
    }
    marks
}

/// The local port of the upstream connection this response came on.
fn upstream_port() -> Option<u16> {
    evidence::port_of(&host::get_property(&["upstream", "local_address"])?)
}

fn downstream_protocol() -> String {
    let protocol = host::get_property(&["request", "protocol"]).unwrap_or_default();
    String::from_utf8_lossy(&protocol).into_owned()
}

fn response_flags() -> u64 {
    let raw = host::get_property(&["response", "flags"]).unwrap_or_default();
    let mut word = [0u8; 8];
    for (slot, byte) in word.iter_mut().zip(raw) {
        *slot = byte;
    }
    u64::from_le_bytes(word)
}

/// The response headers the decision reads, from one whole-map read: a response carries few
/// headers, and one read (one call out of the VM, one copy into it) costs less than the four
/// single reads it replaces (`make bench`).
#[derive(Default)]
struct ResponseHeaders {
    status: Option<String>,
    connection: Option<String>,
    proxy_connection: Option<String>,
    content_length: bool,
    transfer_encoding: Option<String>,
    /// `x-envoy-attempt-count`, present where the route includes it in the response (rescue).
    attempt_count: Option<String>,
    /// [`decision::REFUSED_HEADER`]: the pod that made this reply could not reach its app.
    refused: bool,
    /// gRPC's status when the response is trailers-only (Envoy's own reply to a gRPC request).
    grpc_status: Option<String>,
}

impl ResponseHeaders {
    fn read() -> ResponseHeaders {
        let map = host::header_map(MapType::HttpResponseHeaders).unwrap_or_default();
        ResponseHeaders::from_pairs(host::pairs(&map))
    }

    /// Only the names the decision reads are copied out; Envoy hands them lower-cased.
    fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> ResponseHeaders {
        let mut h = ResponseHeaders::default();
        for (name, value) in pairs {
            let value = || Some(String::from_utf8_lossy(value).into_owned());
            match name {
                b":status" => h.status = value(),
                b"connection" => h.connection = value(),
                b"proxy-connection" => h.proxy_connection = value(),
                b"content-length" => h.content_length = true,
                b"transfer-encoding" => h.transfer_encoding = value(),
                b"x-envoy-attempt-count" => h.attempt_count = value(),
                b"grpc-status" => h.grpc_status = value(),
                _ if name == decision::REFUSED_HEADER.as_bytes() => h.refused = true,
                _ => {}
            }
        }
        h
    }

    fn facts(&self) -> ResponseFacts<'_> {
        ResponseFacts {
            status: self.status.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
            connection: self.connection.as_deref(),
            proxy_connection: self.proxy_connection.as_deref(),
            content_length: self.content_length,
            transfer_encoding: self.transfer_encoding.as_deref(),
        }
    }
}

/// Per VM: whether an unframed response really ends the app's connection (see the learner).
fn unframed_ends_connection() -> bool {
    let host = host::get_property(&["upstream", "address"]);
    let local = host::get_property(&["upstream", "local_address"]);
    let (Some(host), Some(local)) = (host, local) else {
        // No upstream connection (a local reply): nothing to learn, and nothing to relay.
        return false;
    };
    LEARNER.with(|l| {
        l.borrow_mut()
            .ends_connection(&String::from_utf8_lossy(&host), &String::from_utf8_lossy(&local))
    })
}

impl Context for HttpRole {}

/// The stream is over, its response written: the request leaves the in-flight count. Envoy
/// ends a stream with `on_done` and `on_delete` back to back (`Context::onDestroy`), and the SDK
/// drops the context in `on_delete`; doing the work here lets the module leave `proxy_on_done`
/// unexported, one call into the VM less per request (`crate::EXPORTS`).
impl Drop for HttpRole {
    fn drop(&mut self) {
        prestop::forget(self.context_id);
        if let Some(conn) = self.conn.take() {
            conn.borrow_mut().request_done(host::coarse_now());
        } else if let Some(token) = self.other_vm().filter(|_| self.begun_there) {
            let conn = self.address.take().map(|a| a.text).unwrap_or_default();
            pod::send(token, &Note::End { conn, begun: true });
        }
    }
}

impl HttpContext for HttpRole {
    fn on_http_request_headers(&mut self, _: usize, _end_of_stream: bool) -> Action {
        if self.shared.active().is_none() {
            return Action::Continue;
        }
        #[cfg(feature = "fault-injection")]
        if host::header(MapType::HttpRequestHeaders, ":path").as_deref() == Some("/__close_relay_trap") {
            std::process::abort();
        }
        self.request = request_facts_on_request();
        self.number = REQUESTS_BEGUN.get().saturating_add(1);
        REQUESTS_BEGUN.set(self.number);
        // Read now (whether an earlier response told this connection to close is what the
        // network role published before this request was dispatched), and counted whether or
        // not the pod's drain is watched: a connection told to close is only closed once no
        // request is in flight on it.
        self.track_request();
        self.prestop_hook().unwrap_or(Action::Continue)
    }

    /// The story of one response: its facts, the decision, then the act.
    fn on_http_response_headers(&mut self, _: usize, _end_of_stream: bool) -> Action {
        let shared = self.shared.clone();
        let Some(config) = shared.active() else {
            return Action::Continue;
        };
        shared.metrics.count_response();
        let headers = ResponseHeaders::read();
        let facts = headers.facts();
        let (upstream, rescued) = self.watch_app(config, &headers, facts.status);
        let connect_failure = upstream == Upstream::Refused && config.close_on_connect_failure;
        let closing = self.address.as_ref().is_some_and(|a| a.closing);
        let signals = Signals { draining: config.drain.enabled && pod::draining(), connect_failure, rescued, closing };
        if let Some(reason) = self.close_reason(config, &facts, signals) {
            self.mark(reason);
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &'static str)]) -> ResponseHeaders {
        ResponseHeaders::from_pairs(list.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn facts_from_envoy_header_map() {
        let h = headers(&[(":status", "200"), ("content-length", "2"), ("connection", "close")]);
        let f = h.facts();
        assert_eq!((f.status, f.connection, f.content_length), (200, Some("close"), true));
        let h = headers(&[(":status", "200"), ("x-envoy-upstream-service-time", "0")]);
        assert_eq!(crate::decision::upstream_end(&h.facts()), Some(Reason::CloseDelimited));
        let h = headers(&[(":status", "200"), ("transfer-encoding", "chunked"), ("proxy-connection", "Close")]);
        assert_eq!(crate::decision::upstream_end(&h.facts()), Some(Reason::ProxyConnectionClose));
        assert_eq!(headers(&[(":status", "nope")]).facts().status, 0);
        assert_eq!(headers(&[]).facts().status, 0);
    }
}
