//! Pod-level drain state: which sources say the pod is going away, and since when. Pure
//! functions and plain data; the roots keep the state in proxy-wasm shared data so every
//! worker thread, and both roles, see one state.

/// What told us the pod is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Envoy's admin `/ready` says DRAINING: `healthcheck/fail`, or the server draining.
    SidecarHealth,
    /// Envoy drains its listeners (`drain_listeners?inboundonly&graceful`, as istio-agent
    /// sends on SIGTERM): the network role's probes see Envoy's own `connection: close` on
    /// answers it would keep alive ([`Probed`]), with no listener update under way. Ends on a
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

/// Fixed-width little-endian u64s: how small records live in shared data. Missing words read
/// as 0, so a short or foreign value is harmless.
pub fn decode_u64s<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut out = [0u64; N];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(word);
    }
    out
}

pub fn encode_u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
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

/// Admin `/ready`: 200 "LIVE" normally, 503 "DRAINING" after `healthcheck/fail` or while the
/// server drains. Anything else (starting up, an error) is not evidence of a drain.
pub fn ready_says_draining(status: u16, body: &[u8]) -> bool {
    status != 200 && body.windows(8).any(|w| w.eq_ignore_ascii_case(b"DRAINING"))
}

/// What one admin `/stats` read says. Only stats a default istio-proxy keeps are read: its
/// inclusion list keeps `listener_manager.*` (`docs/istio.md`), and nothing else here would be
/// there: what the module needs beyond this it sees itself (the network role's probes, the
/// census of client connections, Envoy's local replies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Listeners or filter chains draining because of a config update (LDS), not shutdown:
    /// Envoy's drain closes them too, routinely.
    pub update_draining: u64,
}

impl DrainStats {
    /// The shared record of the last read: when its call was sent (0: never), then the counters.
    pub fn encode_read(&self, read_ms: u64) -> Vec<u8> {
        encode_u64s(&[read_ms, self.update_draining])
    }

    /// The last read and when its call was sent, if there was one.
    pub fn decode_read(bytes: &[u8]) -> Option<(u64, DrainStats)> {
        let [read_ms, update_draining] = decode_u64s(bytes);
        (read_ms != 0).then_some((read_ms, DrainStats { update_draining }))
    }
}

/// Parses `/stats` text (`name: value` lines).
pub fn parse_drain_stats(stats: &str) -> DrainStats {
    let mut out = DrainStats::default();
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else { continue };
        let Ok(value) = value.trim().parse::<u64>() else { continue };
        if name == "listener_manager.total_listeners_draining" || name == "listener_manager.total_filter_chains_draining" {
            out.update_draining = out.update_draining.saturating_add(value);
        }
    }
    out
}

/// What one probe of the network role saw (`crate::network`): a request that Envoy had every
/// reason to answer keeping the connection open (HTTP/1.1, one whole head, no body, nothing
/// about `Connection`, nothing behind it) was answered with Envoy's own `connection: close`,
/// or without it. Envoy adds that header to such an answer only when its drain manager says
/// the listener drains (`drain_listeners`, `healthcheck/fail`, a listener update) or its
/// overload manager disables keep-alive: a client cannot make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    EnvoyClosed,
    KeptAlive,
}

/// Envoy's closes seen in a row, pod-wide, before they count as its drain: one could be a
/// single odd exchange; Envoy's drain closes every connection's next answer, so a second, on
/// another connection (the first one is closed), follows within a request or two.
pub const ENVOY_CLOSES_IN_A_ROW: u64 = 2;

/// The probes' record in shared data: Envoy's closes in a row (a kept-alive answer resets it).
pub fn next_in_a_row(in_a_row: u64, probed: Probed) -> u64 {
    match probed {
        Probed::EnvoyClosed => in_a_row.saturating_add(1),
        Probed::KeptAlive => 0,
    }
}

/// Is Envoy draining its listeners for shutdown, as the probes tell it? Enough of its own
/// closes in a row, no listener update draining in the last stats read, and no health-check
/// failure that explains them (its own source, cleared by `healthcheck/ok`).
pub fn listeners_draining(in_a_row: u64, updating: bool, health_failed: bool) -> bool {
    in_a_row >= ENVOY_CLOSES_IN_A_ROW && !updating && !health_failed
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

/// An app's failures that no answer came between, as one VM sees them. A reset of a reused
/// connection (UC/UR), or a request another pod answered for it (rescue), happens to a healthy
/// app too: one whose keep-alive idle timeout is shorter than Envoy's (Node.js: 5 s) closes an
/// idle connection just as Envoy reuses it. An app going away fails every request that comes,
/// one after the other; a healthy one answers the next.
///
/// One VM sees one worker's requests only, and a worker may carry little else than one
/// client's: so a streak also ends when the app answered anyone in the pod since it began
/// (`pod_answers`: the pod's answers as published each tick, [`crate::pod::answers`]). A
/// client whose request makes a healthy app reset its connection cannot then drain the pod
/// by sending it twice to a quiet worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    count: u32,
    last_ms: u64,
    /// The pod's answers published when this streak began.
    pod_answers: u64,
}

impl Streak {
    /// The app answered: what failed before was no sign of it going away.
    pub fn answered(&mut self) {
        *self = Streak::default();
    }

    /// One more failure at `now_ms`, with the pod's answers published so far; returns how
    /// many came in a row, each within `window_ms` of the one before (a failure long after the
    /// last is a new streak: traffic was sparse), with no answer anywhere in the pod between.
    pub fn failed(&mut self, now_ms: u64, window_ms: u64, pod_answers: u64) -> u32 {
        let follows = self.count > 0 && now_ms <= self.last_ms.saturating_add(window_ms) && pod_answers <= self.pod_answers;
        let count = if follows { self.count.saturating_add(1) } else { 1 };
        *self = Streak { count, last_ms: now_ms, pod_answers };
        count
    }
}

/// When each upstream connection (by its local port) last carried an answer, as one VM sees
/// them: a reset of a connection in use is the app going away; the keep-alive race only
/// happens to one reused after the app's idle timeout. Envoy's pool for the app is per worker,
/// as is this record, and the connections of one pool have distinct local ports.
#[derive(Debug, Default)]
pub struct UpstreamUse {
    answered_ms: std::collections::BTreeMap<u16, u64>,
}

/// Records beyond this are pruned of the idle ones (an upstream pool rarely holds as many).
const UPSTREAM_RECORDS: usize = 1_024;

impl UpstreamUse {
    pub fn answered(&mut self, port: u16, now_ms: u64, idle_ms: u64) {
        if self.answered_ms.len() >= UPSTREAM_RECORDS {
            self.answered_ms.retain(|_, at| now_ms.saturating_sub(*at) < idle_ms);
        }
        if self.answered_ms.len() < UPSTREAM_RECORDS {
            self.answered_ms.insert(port, now_ms);
        }
    }

    /// Whether the connection on `port` carried an answer less than `idle_ms` ago.
    pub fn busy(&self, port: u16, now_ms: u64, idle_ms: u64) -> bool {
        self.answered_ms.get(&port).is_some_and(|at| now_ms.saturating_sub(*at) < idle_ms)
    }
}

/// The port of an address as Envoy gives it (`127.0.0.6:41234`, `[::1]:41234`).
pub fn port_of(address: &[u8]) -> Option<u16> {
    let at = address.iter().rposition(|b| *b == b':')?;
    std::str::from_utf8(address.get(at.saturating_add(1)..)?).ok()?.parse().ok()
}

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
/// role that reports at all) may be a request waiting for its answer. Only HTTP/1 connections
/// are ours: a TCP chain (a server-first protocol, TLS passed through, h2 with prior knowledge)
/// is never closed.
pub fn idle(a: &Activity, now_ms: u64, grace_ms: u64, fresh_grace_ms: u64, told: bool) -> bool {
    // With a grace, the quiet counts from when a slow client could have read the last response
    // (the soak's slow reader was still reading 1 MiB 400 ms after Envoy wrote it, then sent its
    // next request into the close). Without one the app refuses connections: the next request
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
#[path = "drain_tests.rs"]
mod tests;
