//! When a client connection is idle, and when a sweep may close it: its activity, the graces,
//! and the second look.

/// What the network role knows about one client connection's activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Last time bytes moved either way (ms since the epoch).
    pub last_ms: u64,
    /// Requests the HTTP role saw start and not yet finish: exact in one VM, and across VMs
    /// once its notes have been read (`link`), which the sweep does first.
    pub in_flight: u32,
    /// The last bytes were written to the client (a response), not read from it.
    pub last_was_response: bool,
    /// Any request bytes were read at all.
    pub saw_request: bool,
    /// What the first bytes read said: an HTTP/1 request, something else, or not yet known.
    pub http1: Option<bool>,
    /// When a sweep last found this connection idle (tick clock), for [`second_look`].
    pub idle_seen_ms: Option<u64>,
    /// Bytes written to the client since it last sent any: the last response, so far.
    pub response_bytes: u64,
    /// The client sent bytes that no finished request accounts for yet: a request the HTTP role
    /// has not reported (or never will: no HTTP role on this chain, a head Envoy refused before
    /// its filters ran), whose answer, if any, is Envoy's business.
    pub unaccounted: bool,
}

/// The slowest reading rate a client is given time for: Envoy has written a response when the
/// kernel holds its last bytes, and a client that reads at this rate is still reading them.
pub const SLOW_READER_BYTES_PER_S: u64 = 1 << 20;

impl Activity {
    /// The client sent bytes (a request, or part of one).
    pub fn read(&mut self, now_ms: u64) {
        self.last_ms = now_ms;
        self.last_was_response = false;
        self.saw_request = true;
        self.response_bytes = 0;
        self.unaccounted = true;
    }

    /// `size` bytes were written to the client.
    pub fn wrote(&mut self, size: usize, now_ms: u64) {
        self.last_ms = now_ms;
        self.last_was_response = true;
        self.response_bytes = self.response_bytes.saturating_add(size as u64);
    }

    /// How long the client may still be reading the last response after Envoy wrote it.
    pub fn reading_ms(&self) -> u64 {
        self.response_bytes.saturating_mul(1000) / SLOW_READER_BYTES_PER_S
    }

    /// The HTTP role's stream ended, its response written (it may have written nothing).
    pub fn request_done(&mut self, now_ms: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_ms = now_ms;
        self.last_was_response = true;
        self.unaccounted = false;
    }
}

/// May this connection be closed as idle now? Never with a request in flight, never within
/// `grace_ms` of the last byte (a request may be on the wire), and only when the last bytes were
/// a response: request bytes the HTTP role has not reported (a head still arriving, or no HTTP
/// role that reports at all) may be a request waiting for its answer. This judges HTTP/1
/// connections; an h2c one is judged by its frames (`conn::sweep`), and any other TCP chain (a
/// server-first protocol, TLS passed through) is never closed.
pub fn idle(a: &Activity, now_ms: u64, grace_ms: u64, fresh_grace_ms: u64, told: bool) -> bool {
    // With a grace, the quiet counts from when a slow client could have read the last response
    // (a client reading 1 MiB slowly can still be reading it hundreds of ms after Envoy wrote
    // it, and then send its next request into the close). Without one the app refuses connections: the next request
    // fails either way, and the kernel still delivers what it holds. A client told to close
    // (`told`) has no next request to send: the grace alone stands for Envoy's delayed close,
    // and the kernel delivers what it holds, as nothing the client sent is left unread.
    let reading = if grace_ms == 0 || told { 0 } else { a.reading_ms() };
    if a.in_flight > 0 || now_ms < a.last_ms.saturating_add(grace_ms).saturating_add(reading) {
        return false;
    }
    if told {
        // Bytes read since the response are no request waiting for its answer: a request head
        // got `connection: close` added as it came (`network.rs`), and Envoy closes after it
        // itself; what else comes is the rest of a body Envoy answered early, read and dropped.
        return true;
    }
    match a.http1 {
        // Only bytes a finished request accounts for: after Envoy's own answer to a head its
        // filters never saw (a 400, a 426), it closes when the client does or after its delayed
        // close, reading nothing meanwhile, and a close from us would leave the client's bytes
        // unread: a reset.
        Some(true) => a.last_was_response && !a.unaccounted,
        Some(false) => false,
        // Nothing decided yet: idle only if nobody has spoken, and not before a new connection
        // had `fresh_grace_ms` to send its first request (a client opens one to use it). A
        // server that spoke first is not serving HTTP.
        None => !a.saw_request && !a.last_was_response && now_ms >= a.last_ms.saturating_add(fresh_grace_ms),
    }
}

/// A sweep's graces, in ms: how long a connection must be quiet (`idle_ms`), one a response
/// told to close (`told_ms`), a new one that has sent nothing yet (`fresh_ms`), and the tick
/// between two looks ([`second_look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    pub idle_ms: u64,
    pub told_ms: u64,
    /// One whose head said close on Envoy's own account ([`ENVOY_DELAYED_CLOSE_MS`]).
    pub envoy_told_ms: u64,
    pub fresh_ms: u64,
    pub tick_ms: u64,
}

/// Envoy's default `delayed_close_timeout`, which Istio keeps. Envoy closes a connection it
/// told to close (a client's own close, an answer before the request was whole) once the
/// client has closed, or this long after its last write; meanwhile it reads nothing, so a
/// close from us then would leave the client's bytes unread and reset the connection. One it
/// told while draining, it keeps until the HCM's `drain_timeout` (5 s): the sweep closes that
/// one once quiet past this.
pub const ENVOY_DELAYED_CLOSE_MS: u64 = 1_000;

impl Grace {
    /// While the app itself goes away its own grace applies (0: at once), else the sidecar's;
    /// a new connection, and one a response told to close, always get the sidecar's: the client
    /// was told, and a well-behaved one closes first, while one still sending gets its answer
    /// (as Envoy's delayed close waits for the client before it closes). Activity times come
    /// from the tick clock, up to one tick stale: adding a tick keeps a grace a true minimum.
    pub fn for_sweep(idle_grace_ms: u64, app_idle_grace_ms: u64, tick_ms: u64, app_going: bool) -> Grace {
        let with_tick = |grace: u64| if grace == 0 { 0 } else { grace.saturating_add(tick_ms) };
        let idle = if app_going { app_idle_grace_ms } else { idle_grace_ms };
        let sidecar = with_tick(idle_grace_ms);
        let envoy_told_ms = sidecar.max(ENVOY_DELAYED_CLOSE_MS.saturating_add(tick_ms));
        Grace { idle_ms: with_tick(idle), told_ms: sidecar, envoy_told_ms, fresh_ms: sidecar, tick_ms }
    }
}

/// Should a sweep close a connection [`idle`] says may go? With a grace, only on a second look:
/// a sweep at least half a tick earlier found it idle too, and no byte moved since. The grace
/// is wall-clock time: after the host stalled Envoy for longer than it (a throttled or loaded
/// sidecar), the first tick may run before Envoy reads a request already waiting in the
/// socket; by the next one it has. Without a grace (the app refuses connections, so a reuse
/// meets a 503 anyway) it closes at once. Records this look in `a`.
pub fn second_look(a: &mut Activity, now_ms: u64, grace_ms: u64, tick_ms: u64) -> bool {
    if grace_ms == 0 {
        return true;
    }
    match a.idle_seen_ms {
        Some(seen) if seen > a.last_ms && now_ms >= seen.saturating_add(tick_ms / 2) => true,
        Some(seen) if seen > a.last_ms => false,
        _ => {
            a.idle_seen_ms = Some(now_ms);
            false
        }
    }
}

#[cfg(test)]
#[path = "idle_tests.rs"]
mod tests;
