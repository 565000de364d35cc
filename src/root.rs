//! The root context of either role: configuration, the tick that keeps this VM's view of the
//! pod's drain state fresh, and the polls (Envoy admin, app readiness) that feed that state.
//! Every worker's root ticks; shared-data CAS elects one of them per poll interval.

use std::collections::BTreeMap;
use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::census::{self, Record};
use crate::codec;
use crate::config::{self, Config, Role, Target};
use crate::drain::{Source, UNTIL_CLEARED};
use crate::host;
use crate::idle::Grace;
use crate::keys;
use crate::link::Note;
use crate::metrics::Metrics;
use crate::plugin::Plugin;
use crate::sidecar;
use crate::{conn, http, logging, network, podwide, prestop, probe, queue};

thread_local! {
    /// This VM's name in the census of client connections (`census::Record::vm`).
    static CENSUS_ID: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Only the stats `sidecar::parse_drain_stats` reads, all kept by a default sidecar's inclusion
/// list (`listener_manager`), percent-encoded for the query string.
const STATS_PATH: &str = "/stats?filter=%5Elistener_manager%5C.total_%28listeners%7Cfilter_chains%29_draining%24";

/// The page an outstanding HTTP call asked for (not [`host::Call`], the ABI calls).
#[derive(Debug, Clone, Copy)]
enum Page {
    Ready,
    Stats,
    Readiness,
}

/// Where a poll goes: the sidecar's admin API (`/ready`, `/stats`), or the app's readiness URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poller {
    Sidecar,
    AppReadiness,
}

pub struct Root {
    role: Role,
    plugin: Rc<Plugin>,
    /// Outstanding calls: the page asked for, and when the call was sent.
    pages: BTreeMap<u32, (Page, u64)>,
    /// Pollers whose dispatch failed (no such cluster): warned once, retried every interval.
    warned: Vec<Poller>,
}

impl Default for Root {
    fn default() -> Self {
        Root {
            role: Role::Http,
            plugin: Rc::new(Plugin::new(None, Metrics::default())),
            pages: BTreeMap::new(),
            warned: Vec::new(),
        }
    }
}

/// Claims the next poll of `key` for this worker if it is due; the CAS makes one winner.
fn claim(key: &str, interval_ms: u64) -> bool {
    let now = host::now_ms();
    host::shared_update(key, |current| {
        let [due] = codec::decode_u64s(current);
        (now >= due).then(|| (codec::encode_u64s(&[now.saturating_add(interval_ms)]), ()))
    })
    .is_some()
}

/// Publishes this VM's count of client connections ([`census`]) and, on each preStop hook's
/// connection here, the pod's other connections as counted since the hook came.
fn count_connections(tick_ms: u64) {
    let now = host::now_ms();
    if CENSUS_ID.get() == 0 {
        CENSUS_ID.set(u64::from_str_radix(&host::unique(), 16).unwrap_or(1).max(1));
    }
    let (open, hooks) = conn::census();
    let stale_ms = census::STALE_TICKS.saturating_mul(tick_ms);
    let mine = Record { vm: CENSUS_ID.get(), open, at_ms: now };
    let records = host::shared_update(keys::CENSUS, |current| {
        let records = census::publish(&census::decode(current), mine, stale_ms);
        Some((census::encode(&records), records))
    })
    .unwrap_or_else(|| vec![mine]);
    for (conn, since) in hooks {
        let Some(left) = census::pod_wide(&records, since, now, stale_ms) else { continue };
        let id = {
            let c = conn.borrow();
            if c.hook_left == Some(left) {
                continue;
            }
            c.context_id
        };
        let published = host::set_effective_context(id)
            .and_then(|()| host::set_property(keys::PRESTOP_PROPERTY, left.to_string().as_bytes()));
        match published {
            Ok(()) => conn.borrow_mut().hook_left = Some(left),
            Err(e) => debug!("cannot publish the preStop hook's count: {e:?}"),
        }
    }
}

impl Root {
    fn poll(&mut self, poller: Poller, target: Target, path: &str, page: Page) {
        match host::http_get(target.cluster, target.authority, path, target.timeout_ms) {
            Some(token) => {
                self.pages.insert(token, (page, host::now_ms()));
            }
            None if !self.warned.contains(&poller) => {
                self.warned.push(poller);
                warn!(
                    "close-relay: cannot reach cluster {:?} for {path}; that drain source is \
                     blind until it exists",
                    target.cluster
                );
            }
            None => {}
        }
    }

    pub(crate) fn on_ready(&mut self, status: u16, body: &[u8]) {
        let Some(config) = self.plugin.active() else { return };
        let metrics = &self.plugin.metrics;
        if sidecar::ready_says_draining(status, body) {
            podwide::enter(Source::SidecarHealth, UNTIL_CLEARED, metrics);
            // The closes the probes saw are its own; `healthcheck/ok` must end the drain.
            podwide::clear(Source::SidecarDrain, metrics);
        } else if status == 200 {
            podwide::clear(Source::SidecarHealth, metrics);
        }
        let sidecar = config.drain.sidecar.clone();
        self.poll(Poller::Sidecar, sidecar.target(), STATS_PATH, Page::Stats);
    }

    /// `sent_at`: when the call went out: the probes compare their evidence against the read
    /// that was current then (`network::probed`).
    pub(crate) fn on_stats(&mut self, status: u16, body: &[u8], sent_at: u64) {
        if status != 200 || self.plugin.active().is_none() {
            return;
        }
        let now = sidecar::parse_drain_stats(&String::from_utf8_lossy(body));
        host::shared_update(keys::SIDECAR_READ, |_| Some((now.encode_read(sent_at), ())));
        if now.update_draining > 0 {
            // Envoy's closes on a listener update are no shutdown: the probes' entry was early.
            podwide::clear(Source::SidecarDrain, &self.plugin.metrics);
        }
    }

    pub(crate) fn on_readiness(&mut self, status: u16) {
        let Some(config) = self.plugin.active() else { return };
        let metrics = &self.plugin.metrics;
        if (200..300).contains(&status) {
            host::shared_update(keys::READINESS_FAILURES, |_| Some((codec::encode_u64s(&[0]), ())));
            podwide::clear(Source::AppReadiness, metrics);
            return;
        }
        let failures = host::shared_update(keys::READINESS_FAILURES, |current| {
            let [n] = codec::decode_u64s(current);
            Some((codec::encode_u64s(&[n.saturating_add(1)]), n.saturating_add(1)))
        })
        .unwrap_or(0);
        debug!("app readiness probe failed ({status}), {failures} in a row");
        if failures >= u64::from(config.drain.app_readiness.failures) {
            podwide::enter(Source::AppReadiness, UNTIL_CLEARED, metrics);
        }
    }
}

impl Root {
    /// Applies what this VM's queue carries (`link::Note`); returns whether a wake-up was among
    /// the notes.
    fn read_queue(&self, queue_id: u32) -> bool {
        let mut woken = false;
        for item in host::drain_queue(queue_id) {
            match Note::decode(&item) {
                Some(Note::Wake) => woken = true,
                Some(Note::Enter { source, until }) => podwide::enter_forwarded(source, until),
                Some(Note::Clear(source)) => podwide::clear(source, &self.plugin.metrics),
                Some(note) => conn::hear(&note),
                None => debug!("ignored a queue item this version did not write"),
            }
        }
        woken
    }

    fn sweep(&self, draining: bool) {
        let Some(config) = self.plugin.active() else { return };
        if self.role == Role::Network {
            let d = &config.drain;
            let grace = Grace::for_sweep(d.idle_grace_ms, d.app_idle_grace_ms, d.tick_ms, podwide::app_going());
            conn::sweep(draining, config.close_connection, grace, &self.plugin.metrics);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some((page, sent_at)) = self.pages.remove(&token) else { return };
        let (status, body) = host::http_call_response(body_size);
        match page {
            Page::Ready => self.on_ready(status, &body),
            Page::Stats => self.on_stats(status, &body, sent_at),
            Page::Readiness => self.on_readiness(status),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        logging::follow_host_level();
        let raw = host::get_buffer(BufferType::PluginConfiguration, usize::MAX).unwrap_or_default();
        let root_id = host::get_property(&["plugin_root_id"]).unwrap_or_default();
        let root_id = String::from_utf8_lossy(&root_id);
        self.role = config::role_hint(&raw).unwrap_or_else(|| config::role_from_root_id(&root_id));
        let metrics = Metrics::define();
        let role = self.role;
        let config = match Config::parse(&raw)
            .and_then(|c| c.check_role(role).map(|()| c))
            .and_then(|c| c.with_env(|name| std::env::var(name).ok()))
        {
            Ok(config) => {
                info!("close-relay {:?} role ready (root id {root_id:?}): {config:?}", self.role);
                Some(config)
            }
            Err(e) => {
                metrics.config_errors.inc();
                error!(
                    "close-relay {:?} role DISABLED, passing traffic through: invalid plugin \
                     configuration: {e}",
                    self.role
                );
                None
            }
        };
        let ready = if self.role == Role::Http { metrics.http_ready } else { metrics.network_ready };
        ready.set(u64::from(config.is_some()));
        self.plugin = Rc::new(Plugin::new(config, metrics));
        if let Some(config) = self.plugin.active() {
            if self.role == Role::Network && queue::register_wake().is_none() {
                warn!(
                    "close-relay: no queue for HTTP roles in other VMs; their connections told to \
                     close end on the client's next request"
                );
            }
            // Without drain awareness too: the tick closes connections told to close once quiet.
            let ticking = host::set_tick(config.drain.tick_ms);
            if self.role == Role::Network {
                // The sweep needs both the tick and the host's clock.
                conn::set_sweeping(ticking && host::now_ms() > 0);
            }
            if config.drain.enabled {
                podwide::refresh(&self.plugin.metrics);
            }
        }
        // Returning false would make Envoy reject the plugin; we fail open instead.
        true
    }

    fn on_tick(&mut self) {
        // `/logging?wasm=debug` on the admin API takes effect within a tick.
        logging::follow_host_level();
        let Some(config) = self.plugin.active() else { return };
        self.plugin.metrics.flush();
        podwide::publish_answers();
        if self.role == Role::Network {
            probe::refill_reads();
            if !config.lean {
                // Only the preStop hook reads the count, and lean has no HTTP role to hold one.
                count_connections(config.drain.tick_ms);
            }
        }
        if let Some(queue) = queue::own_queue().filter(|_| self.role == Role::Network) {
            // Notes from HTTP roles in other VMs first: the sweep must count their requests. A
            // wake-up among them needs nothing more: this tick sweeps anyway.
            self.read_queue(queue);
        }
        if !config.drain.enabled {
            // The tick clock the sweep reads; with drain awareness the refresh below sets it.
            host::refresh_coarse_now();
            self.sweep(false);
            return;
        }
        let drain = config.drain.clone();
        let draining = podwide::refresh(&self.plugin.metrics);
        if drain.sidecar.enabled && claim(keys::SIDECAR_POLL, drain.sidecar.interval_ms) {
            self.poll(Poller::Sidecar, drain.sidecar.target(), "/ready", Page::Ready);
        }
        let readiness = &drain.app_readiness;
        if readiness.enabled && claim(keys::READINESS_POLL, readiness.interval_ms) {
            self.poll(Poller::AppReadiness, readiness.target(), &readiness.path, Page::Readiness);
        }
        self.sweep(draining);
        if self.role == Role::Http {
            prestop::tick(drain.prestop.max_wait_ms, &self.plugin.metrics);
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let woken = self.read_queue(queue_id);
        let Some(config) = self.plugin.active() else { return };
        // Sweep when woken (a drain began), as in one VM; not after every
        // note from another VM's requests: a sweep right after each response, at the app's zero
        // grace, would close connections just as their clients send the next request.
        if config.drain.enabled && woken {
            let draining = podwide::refresh(&self.plugin.metrics);
            self.sweep(draining);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(match self.role {
            Role::Http => ContextType::HttpContext,
            Role::Network => ContextType::StreamContext,
        })
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(http::HttpRole::new(id, self.plugin.clone())))
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(network::NetworkRole::new(id, self.plugin.clone())))
    }
}
