//! Pod-level drain state: which sources say the pod is going away, and since when. Pure
//! functions and plain data; the roots keep the state in proxy-wasm shared data so every
//! worker thread, and both roles, see one state.

use crate::codec::{decode_u64s, encode_u64s};

/// What told us the pod is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Envoy's admin `/ready` says DRAINING: `healthcheck/fail`, or the server draining.
    SidecarHealth,
    /// Envoy drains its listeners (`drain_listeners?inboundonly&graceful`, as istio-agent
    /// sends on SIGTERM): the network role's probes see Envoy's own `connection: close` on
    /// answers it would keep alive ([`crate::sidecar::Probed`]), with no listener update under way. Ends on a
    /// kept-alive answer.
    SidecarDrain,
    /// The app refuses connections or resets them (Envoy answers 503 UF/UC/UR).
    AppFailure,
    /// The app answered with `Connection: close` more than a threshold within a window.
    AppCloses,
    /// The app's own readiness URL fails.
    AppReadiness,
    /// The app refuses connections on a pod with rescue: a healthy pod answered a request it
    /// refused (`x-envoy-attempt-count` of 2 or more), or the refusal carries rescue's marker.
    /// The app is going away, but a request that meets it now is rescued too, so idle
    /// connections get the sidecar's grace instead of the app's at-once close.
    AppRescued,
    /// The kubelet's preStop hook (`drain.prestop`): the pod is being deleted. Never clears.
    Prestop,
}

impl Source {
    pub const ALL: [Source; 7] = [
        Source::SidecarHealth,
        Source::SidecarDrain,
        Source::AppFailure,
        Source::AppCloses,
        Source::AppReadiness,
        Source::AppRescued,
        Source::Prestop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::SidecarHealth => "sidecar_health",
            Source::SidecarDrain => "sidecar_drain",
            Source::AppFailure => "app_failure",
            Source::AppCloses => "app_closes",
            Source::AppReadiness => "app_readiness",
            Source::AppRescued => "app_rescued",
            Source::Prestop => "prestop",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The source an app failure turns on. A refusal carrying rescue's marker comes from a pod
    /// with rescue: the next request on an idle connection would be rescued too, so closing those
    /// at once (`app_failure`'s grace) would only race the client.
    pub fn for_app_failure(rescue_marked: bool) -> Source {
        if rescue_marked {
            Source::AppRescued
        } else {
            Source::AppFailure
        }
    }
}

/// Active "until" for a source that stays on until its cause clears.
pub const UNTIL_CLEARED: u64 = u64::MAX;

/// Per source: 0 when inactive, else the time (ms since the epoch) it stays active until.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainState {
    until: [u64; Source::ALL.len()],
}

impl DrainState {
    /// Tolerant of short or foreign bytes: whatever is missing counts as inactive.
    pub fn decode(bytes: &[u8]) -> DrainState {
        DrainState { until: decode_u64s(bytes) }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_u64s(&self.until)
    }

    /// Until when `source` is on; 0 if it never was.
    pub fn until(&self, source: Source) -> u64 {
        self.until[source.index()]
    }

    pub fn is_active(&self, source: Source, now_ms: u64) -> bool {
        self.until[source.index()] > now_ms
    }

    pub fn draining(&self, now_ms: u64) -> bool {
        Source::ALL.iter().any(|s| self.is_active(*s, now_ms))
    }

    /// The app itself is going away (it refuses connections or is closing them), as opposed to
    /// the sidecar draining in front of an app that still serves.
    pub fn app_going(&self, now_ms: u64) -> bool {
        self.is_active(Source::AppFailure, now_ms) || self.is_active(Source::AppCloses, now_ms)
    }

    pub fn active_sources(&self, now_ms: u64) -> Vec<Source> {
        Source::ALL.into_iter().filter(|s| self.is_active(*s, now_ms)).collect()
    }

    /// Activates `source` until `until` (never shortening an active one). Returns true when
    /// this turned the source on: the caller counts an entry.
    pub fn enter(&mut self, source: Source, until: u64, now_ms: u64) -> bool {
        let was = self.is_active(source, now_ms);
        let slot = &mut self.until[source.index()];
        *slot = (*slot).max(until);
        !was
    }

    pub fn clear(&mut self, source: Source) {
        self.until[source.index()] = 0;
    }
}

/// Counts events in a fixed window; the window restarts when it has passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub start_ms: u64,
    pub count: u64,
}

impl Window {
    pub fn decode(bytes: &[u8]) -> Window {
        let [start_ms, count] = decode_u64s(bytes);
        Window { start_ms, count }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_u64s(&[self.start_ms, self.count])
    }

    /// Records one event at `now_ms` and returns the count in the current window.
    pub fn record(&mut self, now_ms: u64, window_ms: u64) -> u64 {
        if now_ms >= self.start_ms.saturating_add(window_ms) || self.count == 0 {
            *self = Window { start_ms: now_ms, count: 0 };
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

#[cfg(test)]
#[path = "drain_tests.rs"]
mod tests;
