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
use crate::decision::{self, decide, Decision, Reason, RequestFacts, ResponseFacts, Signals, SkipReason, Upstream};
use crate::drain::{Source, UNTIL_CLEARED};
use crate::link::{Handle, Note};
use crate::plugin::Plugin;
use crate::facts::{self, ResponseHeaders};
use crate::{app, host, keys, podwide, prestop, queue, wire};

thread_local! {
    /// This VM's upstream connections' last answers (the app's pool is per worker too).
    static UPSTREAM_USE: std::cell::RefCell<crate::evidence::UpstreamUse> = std::cell::RefCell::default();
    /// Requests begun in this VM, numbering them (which began after a reset).
    static REQUESTS_BEGUN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The missing network role was logged once.
    static WARNED_NO_NETWORK_ROLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub struct HttpRole {
    context_id: u32,
    plugin: Rc<Plugin>,
    request: RequestFacts,
    /// This connection's address, once read (the network role published it).
    handle: Option<Handle>,
    /// This connection's state when its network role shares the VM; its in-flight count
    /// includes this request until the stream ends (on drop).
    conn: Option<ConnRef>,
    /// The network role is in another VM and was told this request began.
    begun_there: bool,
    /// This request's number in the VM ([`REQUESTS_BEGUN`]).
    number: u64,
}

impl HttpRole {
    pub fn new(context_id: u32, plugin: Rc<Plugin>) -> Self {
        HttpRole {
            context_id,
            plugin,
            request: RequestFacts::default(),
            handle: None,
            conn: None,
            begun_there: false,
            number: 0,
        }
    }

    fn handle(&mut self) -> Option<&Handle> {
        if self.handle.is_none() {
            let raw = host::get_property(&[keys::ADDRESS_PROPERTY])?;
            self.handle = Some(Handle::parse(String::from_utf8_lossy(&raw).into_owned()));
        }
        self.handle.as_ref()
    }

    /// The network VM's queue when the network role is in another VM and has one.
    fn other_vm(&self) -> Option<u32> {
        let handle = self.handle.as_ref().filter(|a| a.token != 0)?;
        self.conn.is_none().then_some(handle.token)
    }

    /// Counts this request against its connection so the sweep never closes a connection with a
    /// request in flight: directly in a shared VM, else by a note to the network VM.
    fn track_request(&mut self) {
        let Some(handle) = self.handle() else { return };
        match conn::conn_for(&handle.text) {
            Some(conn) => {
                conn.borrow_mut().request_started();
                self.conn = Some(conn);
            }
            None if handle.token != 0 => {
                self.begun_there = queue::send(handle.token, &Note::Begin(handle.text.clone()));
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
        let plugin = self.plugin.clone();
        let config = plugin.active()?;
        let prestop = &config.drain.prestop;
        let hook = self.handle.as_ref().is_some_and(|a| a.hook);
        if !hook {
            if prestop.token.is_some() && host::header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER).is_some() {
                let _ = host::remove_header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER);
                prestop::refuse(prestop::Refusal::NotFirst, &plugin.metrics);
                return Some(Action::Pause);
            }
            return None;
        }
        let offered = host::header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER)?;
        let _ = host::remove_header(MapType::HttpRequestHeaders, keys::PRESTOP_HEADER);
        if let Err(refusal) = prestop::judge(prestop.token.as_ref(), config.drain.enabled, &offered) {
            prestop::refuse(refusal, &plugin.metrics);
            return Some(Action::Pause);
        }
        self.entered(Source::Prestop, UNTIL_CLEARED);
        prestop::hold(self.context_id);
        Some(Action::Pause)
    }

    /// A drain source this VM turned on and its evidence then disproved; the network VM keeps its
    /// own record with different `vm_id`s, so it is told too.
    fn cleared(&mut self, source: Source) {
        podwide::clear(source, &self.plugin.metrics);
        self.handle();
        if let Some(token) = self.other_vm() {
            queue::send(token, &Note::Clear(source));
        }
    }

    /// A drain source this request turned on; with different `vm_id`s the network VM keeps its
    /// own record, so it is told too (a same-`vm_id` network VM already sees it: a no-op there).
    fn entered(&mut self, source: Source, until: u64) {
        if !podwide::enter(source, until, &self.plugin.metrics) {
            return;
        }
        self.handle();
        if let Some(token) = self.other_vm() {
            queue::send(token, &Note::Enter { source, until });
        }
    }

    /// Whether this response must close its client connection, and why: the pure decision,
    /// what it cannot relay counted, the app's own closes counted toward `app_closes`.
    fn close_reason(&mut self, config: &Config, facts: &ResponseFacts, signals: Signals) -> Option<Reason> {
        let metrics = self.plugin.metrics;
        let request = &mut self.request;
        let decision = decide(
            facts,
            signals,
            || RequestFacts { protocol: facts::downstream_protocol(), ..std::mem::take(request) },
            facts::unframed_ends_connection,
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
        let metrics = self.plugin.metrics;
        let Some(handle) = self.handle().map(|a| a.text.clone()) else {
            metrics.skipped(SkipReason::NoNetworkRole).inc();
            if !WARNED_NO_NETWORK_ROLE.replace(true) {
                warn!(
                    "close-relay: no network role on this listener, cannot relay the app's \
                     connection close; add the NETWORK filter before the HTTP connection manager"
                );
            }
            return;
        };
        if let Err(e) = host::add_header(MapType::HttpResponseHeaders, wire::MARKER, &handle) {
            warn!("close-relay: cannot mark the response, not relayed: {e:?}");
            return;
        }
        if self.conn.is_none() {
            self.conn = conn::conn_for(&handle);
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
        if config.drain.enabled && closes.enabled && podwide::count_app_close(closes.window_ms, closes.threshold) {
            self.entered(Source::AppCloses, host::now_ms().saturating_add(closes.hold_ms));
        }
    }

    /// What this response says about the app ([`app::judge`]), with what only this role knows:
    /// which upstream connection a reset came on, and which requests began after a single
    /// reset. Rescued requests are counted. Returns whether Envoy could not connect.
    fn watch_app(&mut self, config: &Config, headers: &ResponseHeaders, status: u16) -> (Upstream, bool) {
        let failed = decision::failed(status, headers.grpc_status.as_deref());
        let flags = if failed { facts::response_flags() } else { 0 };
        let marks = facts::rescue_marks(headers, failed, flags);
        let upstream = decision::upstream(failed, flags, marks.refused);
        let failure = &config.drain.app_failure;
        // Which upstream connection: only where a reset can drain the pod.
        let watched = config.drain.enabled && failure.enabled && failure.resets && failure.race_idle_ms > 0;
        let port = watched.then(facts::upstream_port).flatten();
        let response = app::Response { upstream, rescued: marks.rescued, rescue_marked: marks.refused };
        let busy = |now| port.is_some_and(|port| UPSTREAM_USE.with(|u| u.borrow().busy(port, now, failure.race_idle_ms)));
        match app::judge(&self.plugin, config, response, busy) {
            app::Verdict::Answered => {
                if self.plugin.unconfirmed_reset.get().is_some_and(|before| self.number > before) {
                    self.plugin.unconfirmed_reset.set(None);
                    debug!("the app answered a request begun after its single reset: not going away");
                    self.cleared(Source::AppFailure);
                }
                // The tick's clock, free to read: at most a tick old (100 ms) against a second
                // of `race_idle_ms`, and an older record only ever reads as idle.
                if let Some(port) = port {
                    UPSTREAM_USE.with(|u| u.borrow_mut().answered(port, host::coarse_now(), failure.race_idle_ms));
                }
            }
            app::Verdict::Failed => {}
            app::Verdict::Going { source, until, single_reset } => {
                // The number of the last request begun before the reset: this one or a later.
                self.plugin.unconfirmed_reset.set(single_reset.then(|| REQUESTS_BEGUN.get()));
                self.entered(source, until);
            }
        }
        (upstream, marks.rescued)
    }
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
            let conn = self.handle.take().map(|a| a.text).unwrap_or_default();
            queue::send(token, &Note::End(conn));
        }
    }
}

impl HttpContext for HttpRole {
    fn on_http_request_headers(&mut self, _: usize, _end_of_stream: bool) -> Action {
        if self.plugin.active().is_none() {
            return Action::Continue;
        }
        #[cfg(feature = "fault-injection")]
        if host::header(MapType::HttpRequestHeaders, ":path").as_deref() == Some("/__close_relay_trap") {
            std::process::abort();
        }
        self.request = facts::request_facts_on_request();
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
        let plugin = self.plugin.clone();
        let Some(config) = plugin.active() else {
            return Action::Continue;
        };
        plugin.metrics.count_response();
        let headers = ResponseHeaders::read();
        let facts = headers.facts();
        let (upstream, rescued) = self.watch_app(config, &headers, facts.status);
        let connect_failure = upstream == Upstream::Refused && config.close_on_connect_failure;
        let closing = self.handle.as_ref().is_some_and(|a| a.closing);
        let signals = Signals { draining: config.drain.enabled && podwide::draining(), connect_failure, rescued, closing };
        if let Some(reason) = self.close_reason(config, &facts, signals) {
            self.mark(reason);
        }
        Action::Continue
    }
}
