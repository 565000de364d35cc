//! The module's metrics: every counter and gauge it exports, defined once per VM, and the one
//! batched on the hot path. The host primitives they sit on are `host::Counter` and
//! `host::Gauge`.

use crate::decision::SkipReason;
use crate::drain::Source;
use crate::host::{Counter, Gauge};

thread_local! {
    /// Responses counted but not yet added to `close_relay_responses_total`.
    static RESPONSES_UNFLUSHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Responses are counted in the VM and added to the host's counter in batches: a host call
/// per response is a round trip out of the VM on the hot path (measured with `make bench`).
const RESPONSES_BATCH: u64 = 64;

/// Every counter the module exports. Envoy shows them as `wasmcustom.<name>` in its stats and
/// as `<name>` in Prometheus output; both roles define all of them so names never move.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub responses: Counter,
    pub relayed: Counter,
    pub skipped: [Counter; SkipReason::ALL.len()],
    pub headers_rewritten: Counter,
    pub connections_closed: Counter,
    pub requests_closed: Counter,
    pub config_errors: Counter,
    pub drain_entered: [Counter; Source::ALL.len()],
    pub idle_closed: Counter,
    pub closed_while_draining: Counter,
    pub closed_connect_failure: Counter,
    pub rescued: Counter,
    /// `lean`: connections whose bytes it could no longer follow, left to Envoy to close.
    pub lean_lost: Counter,
    /// HTTP/2 connections told to go with a graceful GOAWAY while the pod drains.
    pub h2_goaway: Counter,
    /// HTTP/2 connections whose frames could no longer be followed: nothing added, left to Envoy.
    pub h2_lost: Counter,
    /// Requests that carried the preStop hook's header without the configured token (or with
    /// none configured): served by the app untouched.
    pub prestop_refused: Counter,
    /// Hooks answered by close-relay.
    pub prestop_answered: Counter,
    pub draining: Gauge,
    /// 1 once this role's plugin configuration was accepted, 0 when it was rejected (the role
    /// then passes traffic through): how a default sidecar, which logs at warning, shows that
    /// close-relay runs.
    pub http_ready: Gauge,
    pub network_ready: Gauge,
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            responses: Counter::define("close_relay_responses_total"),
            relayed: Counter::define("close_relay_relayed_total"),
            skipped: SkipReason::ALL
                .map(|r| Counter::define(&format!("close_relay_skipped_{}_total", r.as_str()))),
            headers_rewritten: Counter::define("close_relay_headers_rewritten_total"),
            connections_closed: Counter::define("close_relay_connections_closed_total"),
            requests_closed: Counter::define("close_relay_requests_closed_total"),
            config_errors: Counter::define("close_relay_config_errors_total"),
            drain_entered: Source::ALL
                .map(|s| Counter::define(&format!("close_relay_drain_entered_{}_total", s.as_str()))),
            idle_closed: Counter::define("close_relay_idle_closed_total"),
            closed_while_draining: Counter::define("close_relay_closed_while_draining_total"),
            closed_connect_failure: Counter::define("close_relay_closed_connect_failure_total"),
            rescued: Counter::define("close_relay_rescued_total"),
            lean_lost: Counter::define("close_relay_lean_lost_total"),
            h2_goaway: Counter::define("close_relay_h2_goaway_total"),
            h2_lost: Counter::define("close_relay_h2_lost_total"),
            prestop_refused: Counter::define("close_relay_prestop_refused_total"),
            prestop_answered: Counter::define("close_relay_prestop_answered_total"),
            draining: Gauge::define("close_relay_draining"),
            http_ready: Gauge::define("close_relay_http_role_ready"),
            network_ready: Gauge::define("close_relay_network_role_ready"),
        }
    }

    /// Counts one response; the host's counter catches up every [`RESPONSES_BATCH`] responses
    /// and on every tick ([`Metrics::flush`]).
    pub fn count_response(&self) {
        let n = RESPONSES_UNFLUSHED.get().saturating_add(1);
        if n >= RESPONSES_BATCH {
            RESPONSES_UNFLUSHED.set(0);
            self.responses.add(n);
        } else {
            RESPONSES_UNFLUSHED.set(n);
        }
    }

    pub fn flush(&self) {
        let n = RESPONSES_UNFLUSHED.replace(0);
        if n > 0 {
            self.responses.add(n);
        }
    }

    pub fn entered(&self, source: Source) -> Counter {
        let i = Source::ALL.iter().position(|s| *s == source).unwrap_or(0);
        self.drain_entered[i]
    }

    pub fn skipped(&self, reason: SkipReason) -> Counter {
        let i = SkipReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.skipped[i]
    }
}
