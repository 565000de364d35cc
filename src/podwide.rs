//! What every worker and both roles must see, in shared data: the pod's drain record (behind a
//! per-VM cache that the ticks refresh, so the data path reads a `Cell` and never the host), the
//! app's answers, its closes and the single-reset bound.

use log::info;

use crate::codec;
use crate::drain::{DrainState, Source, Window, UNTIL_CLEARED};
use crate::host;
use crate::keys;
use crate::queue;
use crate::metrics::Metrics;

thread_local! {
    /// The shared drain state as of the last refresh, for the data path.
    static DRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static APP_GOING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The app's answers this VM saw since its last tick published them.
    static ANSWERS_UNPUBLISHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Is the app itself going away (see [`DrainState::app_going`])? As of the last refresh.
pub fn app_going() -> bool {
    APP_GOING.get()
}

/// Is the pod going away? As of the last tick or local entry.
pub fn draining() -> bool {
    DRAINING.get()
}

/// Re-reads the shared record (held sources expire here); returns whether draining.
pub fn refresh(metrics: &Metrics) -> bool {
    let now = host::now_ms();
    let state = DrainState::decode(&host::shared_get(keys::DRAIN_STATE).0);
    let draining = state.draining(now);
    APP_GOING.set(state.app_going(now));
    if draining != DRAINING.replace(draining) {
        let sources: Vec<_> = state.active_sources(now).iter().map(|s| s.as_str()).collect();
        info!("close-relay: pod draining: {draining} (sources: {sources:?})");
    }
    metrics.draining.set(u64::from(draining));
    draining
}

/// Turns `source` on until `until` (ms since the epoch, or [`UNTIL_CLEARED`]). The worker
/// whose write turns it on counts the entry, and learns it did: true.
pub fn enter(source: Source, until: u64, metrics: &Metrics) -> bool {
    let entered = record(source, until);
    if entered {
        metrics.entered(source).inc();
    }
    entered
}

/// [`enter`] for a source an HTTP role in another VM already counted (`link::Note::Enter`):
/// with different `vm_id`s this VM keeps its own record, which must learn it too.
pub fn enter_forwarded(source: Source, until: u64) {
    record(source, until);
}

fn record(source: Source, until: u64) -> bool {
    let now = host::now_ms();
    let entered = host::shared_update(keys::DRAIN_STATE, |current| {
        let mut state = DrainState::decode(current);
        let entered = state.enter(source, until, now);
        Some((state.encode(), entered))
    }) == Some(true);
    if entered {
        queue::wake_all();
        let until = if until == UNTIL_CLEARED { "cleared".into() } else { format!("+{} ms", until.saturating_sub(now)) };
        info!("close-relay: pod draining, source {} (until {until})", source.as_str());
    }
    if until > now {
        DRAINING.set(true);
        if matches!(source, Source::AppFailure | Source::AppCloses) {
            APP_GOING.set(true);
        }
    }
    entered
}

/// Until when `source` is on (ms since the epoch, [`UNTIL_CLEARED`], or 0 when off), in the
/// shared record.
pub fn active_until(source: Source) -> u64 {
    let now = host::now_ms();
    let state = DrainState::decode(&host::shared_get(keys::DRAIN_STATE).0);
    if state.is_active(source, now) { state.until(source) } else { 0 }
}

/// How often a single reset may drain the pod at once, pod-wide. Tomcat's shutdown begins by
/// resetting connections it is serving, and waiting for a second reset costs requests
/// (`docs/rollout.md`); but a client whose request makes a healthy app reset its connection can
/// send it again and again, and each drain closes every client connection. So one a minute,
/// and the app's next answer to a request begun after the reset ends it.
pub const SINGLE_RESET_EVERY_MS: u64 = 60_000;

/// Whether a single reset may drain the pod now; if so, the next one may only after
/// [`SINGLE_RESET_EVERY_MS`].
pub fn single_reset_allowed(now_ms: u64) -> bool {
    host::shared_update(keys::SINGLE_RESET_AFTER, |current| {
        let after = if current.len() == 8 { codec::decode_u64s::<1>(current)[0] } else { 0 };
        (now_ms >= after).then(|| (codec::encode_u64s(&[now_ms.saturating_add(SINGLE_RESET_EVERY_MS)]), true))
    }) == Some(true)
}

/// The app answered a request here: counted in the VM, free on the data path.
pub fn count_answer() {
    ANSWERS_UNPUBLISHED.set(ANSWERS_UNPUBLISHED.get().saturating_add(1));
}

/// Adds this VM's answers since the last tick to the pod's ([`keys::ANSWERS`]): one write a
/// tick, and only when there were any.
pub fn publish_answers() {
    let mine = ANSWERS_UNPUBLISHED.replace(0);
    if mine == 0 {
        return;
    }
    let added = host::shared_update(keys::ANSWERS, |current| {
        let total = if current.len() == 8 { codec::decode_u64s::<1>(current)[0] } else { 0 };
        Some((codec::encode_u64s(&[total.saturating_add(mine)]), ()))
    });
    if added.is_none() {
        ANSWERS_UNPUBLISHED.set(mine);
    }
}

/// The pod's answers: those published so far, and this VM's not yet published (read on a
/// failure only). This VM's own count at once: an answer it gave just before a failure, published
/// at the next tick, must not read as an answer after it (a streak of two rescues straddling a
/// tick then never drained the pod).
pub fn answers() -> u64 {
    let (current, _) = host::shared_get(keys::ANSWERS);
    let published = if current.len() == 8 { codec::decode_u64s::<1>(&current)[0] } else { 0 };
    published.saturating_add(ANSWERS_UNPUBLISHED.get())
}

/// Turns `source` off, when its cause has cleared (e.g. `healthcheck/ok`).
pub fn clear(source: Source, metrics: &Metrics) {
    let now = host::now_ms();
    let cleared = host::shared_update(keys::DRAIN_STATE, |current| {
        let mut state = DrainState::decode(current);
        if !state.is_active(source, now) {
            return None;
        }
        state.clear(source);
        Some((state.encode(), ()))
    });
    if cleared.is_some() {
        info!("close-relay: drain source {} cleared", source.as_str());
        refresh(metrics);
        // Every worker stops closing within a dispatcher turn, not a tick later.
        queue::wake_all();
    }
}

/// Counts one app `Connection: close` in the shared window; true once the threshold is met.
pub fn count_app_close(window_ms: u64, threshold: u64) -> bool {
    let now = host::now_ms();
    host::shared_update(keys::APP_CLOSES, |current| {
        let mut window = Window::decode(current);
        let count = window.record(now, window_ms);
        Some((window.encode(), count))
    })
    .is_some_and(|count| count >= threshold)
}
