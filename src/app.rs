//! What one response says about the app going away, judged the same way by both roles: the
//! HTTP role reads it from Envoy's response flags and rescue's marks, the lean network role
//! from the response head and Envoy's local reply. An answer ends the streak; a refusal is
//! evidence at once; a reset (when `resets` counts) or a rescue only when another came before
//! any answer ([`crate::evidence::Streak`]), or, once a minute, a reset of a connection that
//! was carrying answers ([`podwide::single_reset_allowed`]).

use log::debug;

use crate::config::Config;
use crate::decision::{self, AppSaid, Upstream};
use crate::drain::Source;
use crate::plugin::Plugin;
use crate::{host, podwide};

/// One response, as the role that saw it read it.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    pub upstream: Upstream,
    /// Another pod answered it (rescue).
    pub rescued: bool,
    /// It carries rescue's refusal marker: the refusal came from a pod with rescue.
    pub rescue_marked: bool,
}

/// The judgement on one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The app answered.
    Answered,
    /// A failure, not yet evidence (or the drain it would start is off).
    Failed,
    /// The app is going away: the pod drains from `source` until `until`. `single_reset`: on
    /// one reset of a busy connection alone, which a later answer may disprove.
    Going { source: Source, until: u64, single_reset: bool },
}

/// Judges `response`. `busy(now_ms)`: whether the upstream connection it failed on carried an
/// answer within `race_idle_ms` (a role that cannot tell says `false`).
pub fn judge(plugin: &Plugin, config: &Config, response: Response, busy: impl FnOnce(u64) -> bool) -> Verdict {
    let failure = &config.drain.app_failure;
    let Response { upstream, rescued, rescue_marked } = response;
    if rescued {
        plugin.metrics.rescued.inc();
    }
    let (evidence, single_reset) = match decision::app_said(upstream, rescued, failure.resets) {
        AppSaid::Answered => {
            plugin.streak.borrow_mut().answered();
            podwide::count_answer();
            return Verdict::Answered;
        }
        AppSaid::Refused => (true, false),
        AppSaid::Failed => {
            let now = host::now_ms();
            let in_a_row = plugin.streak.borrow_mut().failed(now, failure.window_ms, podwide::answers());
            let busy = !rescued && upstream == Upstream::Reset && busy(now);
            debug!("app failed a request ({upstream:?}, rescued: {rescued}, connection in use: {busy}): {in_a_row} in a row");
            if in_a_row >= failure.in_a_row {
                (true, false)
            } else {
                let single = busy && config.drain.enabled && failure.enabled && podwide::single_reset_allowed(now);
                (single, single)
            }
        }
    };
    if !(evidence && config.drain.enabled && failure.enabled) {
        return Verdict::Failed;
    }
    // A rescue: the next request on an idle connection would be rescued too, so the sidecar's
    // idle grace, not the app's at-once close (`Source::AppRescued`).
    let source = Source::for_app_failure(rescued || rescue_marked);
    debug!("app going away ({}): pod draining for {} ms", source.as_str(), failure.hold_ms);
    Verdict::Going { source, until: host::now_ms().saturating_add(failure.hold_ms), single_reset }
}
