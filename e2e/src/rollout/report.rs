//! The report: why each lost request was lost (from the run's numbers), the table and the chart.

use std::collections::BTreeMap;
use std::path::Path;

use super::run::RunResult;
use super::spec::{recommended, AppMode, Column, Row, Setting, SidecarMode};

/// A 5xx is timed when its request was sent: one sent this long before the app's stop signal
/// was still on its way when the app stopped.
const SENT_BEFORE_SIGNAL_MS: i64 = 20;

/// gRPC: calls sent this long after the app's stop signal may still have gone out before the
/// ALB's connection got close-relay's GOAWAY (at Envoy's next write to it).
const GRPC_UNTOLD_MS: i64 = 100;

/// Why a run lost requests, read from its numbers: what the 5xx were, when their requests were
/// sent against the app's stop signal, and whether each ALB connection met at most one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub cause: Cause,
    pub five_xx: u64,
    /// The 5xx by status.
    pub statuses: BTreeMap<u16, u64>,
    /// When the first and the last 5xx's request was sent, in ms after the app's stop signal
    /// (negative: before it).
    pub first_ms: i64,
    pub last_ms: i64,
    /// No more 5xx than ALB connections: close-relay closed each connection that met one.
    pub at_most_one_each: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No filter, sidecar held: nothing closes the ALB's connections to the dying pod.
    Bug,
    /// No filter, istio-agent drain: requests on their way when the app stopped, and idle
    /// connections Envoy's drain never closes (envoy#42305).
    EnvoyDrainLeavesIdle,
    /// `app_idle_grace_ms` kept idle ALB connections open: each reused one met a 503.
    IdleLeftOpen { grace_ms: u64 },
    /// `drain.app_closes.threshold: 1` took a real server's routine close for its shutdown.
    RoutineCloseDrained,
    /// A real server stopped accepting with requests already on their way, and nothing could
    /// tell the sidecar sooner: 503s, and 502s crossing the idle close.
    OnTheWire,
    /// The rig's close-idle app closed every idle connection and refused new ones at SIGTERM.
    ClosedIdleAtSignal,
    /// The rig's app, defaults: nothing said "going away" before the first 503.
    NoSignalBeforeFirst503,
    /// The rig's app, its first close draining: requests crossing that close.
    CrossedFirstClose,
    /// None of the above: with rescue on, any loss; otherwise numbers no cause fits.
    Unexplained,
}

impl Explanation {
    pub fn explained(&self) -> bool {
        self.cause != Cause::Unexplained
    }
}

/// Why a cell is not 0, from what the run saw; `None` when nothing was lost.
pub fn explain(r: &RunResult) -> Option<Explanation> {
    if r.five_xx == 0 {
        return None;
    }
    let statuses: BTreeMap<u16, u64> = r.statuses.iter().filter(|(code, _)| **code >= 500).map(|(c, k)| (*c, *k)).collect();
    let after: Vec<i64> = r.five_xx_at.iter().map(|t| *t as i64 - r.app_signal_at as i64).collect();
    let (first_ms, last_ms) = (after.first().copied().unwrap_or(0), after.last().copied().unwrap_or(0));
    let only_502_503 = statuses.keys().all(|code| *code == 502 || *code == 503);
    let at_most_one_each = r.five_xx <= r.spec.concurrency as u64;
    let told_early = r.spec.prestop_hook_ms > 0 && (r.spec.sidecar == SidecarMode::IstioAgent || r.spec.setting.prestop_fails_sidecar);
    let cause = match r.spec.app {
        _ if r.spec.row == Row::NoFilter => match r.spec.sidecar {
            SidecarMode::Held => Cause::Bug,
            SidecarMode::IstioAgent => Cause::EnvoyDrainLeavesIdle,
        },
        _ if r.spec.rescue() => Cause::Unexplained,
        _ if r.spec.app_idle_grace_ms.is_some_and(|g| g > 0) && only_502_503 && at_most_one_each => {
            Cause::IdleLeftOpen { grace_ms: r.spec.app_idle_grace_ms.unwrap_or(0) }
        }
        AppMode::Real(_) if first_ms < 0 && r.spec.setting.first_close_drains => Cause::RoutineCloseDrained,
        AppMode::Real(_) if only_502_503 && at_most_one_each && first_ms >= -SENT_BEFORE_SIGNAL_MS && !told_early => Cause::OnTheWire,
        // HTTP/2 multiplexes every call onto the one or two connections the ALB keeps to the pod,
        // so "one per connection" says nothing; the calls sent before close-relay's GOAWAY could
        // reach the ALB are: a GOAWAY rides on Envoy's next write to that connection, and while
        // every call fails on a refused connect, that write can be 20-30 ms away.
        AppMode::Real(_) if r.spec.app.grpc() && only_502_503 && first_ms >= -SENT_BEFORE_SIGNAL_MS && last_ms <= GRPC_UNTOLD_MS && !told_early => {
            Cause::OnTheWire
        }
        AppMode::Real(_) => Cause::Unexplained,
        AppMode::CloseIdle => Cause::ClosedIdleAtSignal,
        AppMode::CloseHeader | AppMode::LateClose if !r.spec.setting.first_close_drains => Cause::NoSignalBeforeFirst503,
        AppMode::CloseHeader | AppMode::LateClose if at_most_one_each => Cause::CrossedFirstClose,
        _ => Cause::Unexplained,
    };
    Some(Explanation { cause, five_xx: r.five_xx, statuses, first_ms, last_ms, at_most_one_each })
}

/// The physics line of the report for one run.
pub fn describe(r: &RunResult, e: &Explanation) -> String {
    let n = e.five_xx;
    let errors = e.statuses.iter().map(|(c, k)| format!("{k}x {c}")).collect::<Vec<_>>().join(", ");
    let head = format!("{n} 5xx ({errors}), {} to {} ms after the app's stop signal", e.first_ms, e.last_ms);
    match e.cause {
        Cause::Bug => format!(
            "{head}: the bug. Nothing closes the ALB's connections to pod A, so each request on \
             them met a 503 from the app's signal until the sidecar stopped."
        ),
        Cause::EnvoyDrainLeavesIdle if r.spec.app.grpc() => format!(
            "{head}: Envoy's own drain sends a GOAWAY on a busy ALB connection with the next response \
             headers it encodes, but calls already sent to pod A when the app stopped accepting had no \
             app to reach, and an idle connection is never told (envoy#14350)."
        ),
        Cause::EnvoyDrainLeavesIdle => format!(
            "{head}: Envoy's own drain adds `connection: close` to each response on a busy ALB \
             connection, but requests already sent to pod A when the app stopped accepting had \
             no app to reach, and an idle connection learns of the drain only on its next \
             request (envoy#42305)."
        ),
        Cause::IdleLeftOpen { grace_ms } => format!(
            "{head}: close-relay left idle ALB connections open for {grace_ms} ms once the app refused \
             connections, so each one the ALB reused in that time met a 503 (which then closed it)."
        ),
        Cause::RoutineCloseDrained => {
            let AppMode::Real(server) = r.spec.app else { return head };
            format!(
                "{head}: before any shutdown, {} closed a keep-alive connection as routine ({}), \
                 the first close drained the pod, and an idle ALB connection was closed at the instant \
                 nginx reused it (the idle-close race): `drain.app_closes.threshold: 1` is wrong for this server.",
                server.as_str(),
                server.routine_close().unwrap_or("its own limit")
            )
        }
        Cause::OnTheWire if r.spec.app.grpc() => format!(
            "{head}, at the physical limit: {shutdown}. The calls already on their way met it: the streams its \
             GOAWAY refused (Envoy: UR, remote_refused_stream_reset) and the new ones it no longer accepted \
             (UF), each UNAVAILABLE. A filter cannot see the app's GOAWAY itself (docs/http2.md): close-relay \
             drained the pod on the first of these and told each ALB connection to go with a GOAWAY at \
             Envoy's next write to it, and the ALB, multiplexing every call onto one or two connections, \
             sent calls on them until then. Zero needs rescue (it retries refused streams and connections \
             on pod B) or the kubelet's preStop hook.",
            shutdown = crate::servers::Server::Grpc.shutdown(),
        ),
        Cause::OnTheWire => {
            let AppMode::Real(server) = r.spec.app else { return head };
            format!(
                "{head}, at the physical limit: {shutdown}. {reached} and nothing could tell the sidecar \
                 sooner: {why}. close-relay closed that ALB connection with its 503 \
                 (`close_on_connect_failure`) and every idle one at once (`app_failure`){crossed}. Each \
                 ALB connection met at most one. Zero needs the sidecar told before the app stops: a \
                 preStop hook (held sidecar: one that POSTs healthcheck/fail), or rescue.",
                shutdown = server.shutdown(),
                reached = match e.statuses.get(&503) {
                    Some(1) => "A request reached pod A after the app stopped accepting and found no app to connect to,".into(),
                    Some(k) => format!("{k} requests reached pod A after the app stopped accepting and found no app to connect to,"),
                    None => "No request met a refused connection,".into(),
                },
                why = if r.spec.prestop_hook_ms > 0 {
                    "a preStop sleep alone tells a held sidecar nothing"
                } else {
                    "the endpoint removal and the stop signal come together"
                },
                crossed = match e.statuses.get(&502) {
                    Some(k) => format!(
                        "; {k} request(s) the ALB had just put on an idle connection as close-relay closed it crossed \
                         that close on the wire (502, the idle-close race: left open, that connection's \
                         next request would have met a 503 instead)"
                    ),
                    None => String::new(),
                }
            )
        }
        Cause::ClosedIdleAtSignal => format!(
            "{head}: at SIGTERM the app closed all its idle connections and refused new ones at \
             the same instant, before any drain signal; a request reaching pod A then had no \
             upstream at all. close-relay closes each such ALB connection on its first 503 (UF) \
             and drains the rest, so each ALB connection meets at most one."
        ),
        Cause::NoSignalBeforeFirst503 => format!(
            "{head}: once shutting down, the app refused new connections; Envoy's pooled \
             connections to it carried one more answer each (relayed as close), but the ALB held \
             more idle connections to the pod than that, and with the default configuration \
             nothing says 'pod going away' before the first 503 (which then drains the rest). \
             With a held sidecar, `drain.app_closes.threshold: 1` makes the app's first close \
             that signal (next row)."
        ),
        Cause::CrossedFirstClose => format!(
            "{head}: the app stopped accepting at SIGTERM and its first close drained the pod; \
             close-relay then closed every idle ALB connection at once, but a request the ALB had \
             just put on one of them crossed that close (502), or a request that reached pod A \
             before the first close needed a new connection to the app (503 UF). Each ALB \
             connection meets at most one ({} here at most); a loaded machine widens both windows. \
             Zero needs the ALB to stop using the pod before the app stops accepting: a preStop \
             delay with the sidecar drained.",
            r.spec.concurrency
        ),
        Cause::Unexplained if r.spec.rescue() => format!(
            "{head}: lost with rescue on, where pod B could have answered: not explained by physics, a defect to investigate"
        ),
        Cause::Unexplained => format!("{head}: not explained by physics, a defect to investigate"),
    }
}

/// The apps the results cover, in the order they first appear.
fn apps_in(results: &[RunResult]) -> Vec<AppMode> {
    let mut apps = Vec::new();
    for r in results {
        if !apps.contains(&r.spec.app) {
            apps.push(r.spec.app);
        }
    }
    apps
}

/// The report table: one row group per app (no filter, close-relay, recommended), columns =
/// sidecar mode x preStop hook. A recommended cell that equals the default shows `= close-relay`.
pub fn table(results: &[RunResult], header: &str) -> String {
    let matrix: Vec<&RunResult> = results.iter().filter(|r| r.spec.app_idle_grace_ms.is_none()).collect();
    let mut out = format!("{header}\ncells: requests / 5xx / connection errors; - = not run\n\n");
    out.push_str(&format!("{:<14}{:<26}", "app", ""));
    for c in Column::ALL {
        out.push_str(&format!("| {:<22}", c.as_str()));
    }
    out.push('\n');
    let apps = apps_in(results);
    for &app in &apps {
        for row in Row::ALL {
            let name = if row == Row::NoFilter { app.as_str() } else { "" };
            out.push_str(&format!("{name:<14}{:<26}", row.as_str()));
            for c in Column::ALL {
                let found = matrix.iter().rev().find(|r| r.spec.app == app && r.spec.row == row && r.spec.column() == c);
                let cell = match found {
                    Some(r) => format!("{} / {} / {}", r.requests, r.five_xx, r.conn_errors),
                    None if row == Row::Recommended && recommended(app, c.sidecar, c.prestop) == Setting::default() => {
                        "= close-relay".into()
                    }
                    None => "-".into(),
                };
                out.push_str(&format!("| {cell:<22}"));
            }
            out.push('\n');
        }
    }
    out.push_str("\n\"Istio-style drain only\" = the no-filter row, istio drain columns.\nrecommended:\n");
    for &app in &apps {
        // Columns grouped by the setting recommended there, in column order.
        let mut groups: Vec<(Setting, Vec<&str>)> = Vec::new();
        for c in Column::ALL.into_iter().filter(|c| matrix.iter().any(|r| r.spec.app == app && r.spec.column() == *c)) {
            let setting = recommended(app, c.sidecar, c.prestop);
            match groups.iter_mut().find(|(s, _)| *s == setting) {
                Some((_, cols)) => cols.push(c.as_str()),
                None => groups.push((setting, vec![c.as_str()])),
            }
        }
        let described: Vec<String> = groups.iter().map(|(s, cols)| format!("{} ({})", s.describe(), cols.join(", "))).collect();
        out.push_str(&format!("  {}: {}\n", app.as_str(), described.join("; ")));
    }
    for r in results {
        if let Some(e) = explain(r) {
            out.push_str(&format!("physics, {}: {}\n", r.spec.label(), describe(r, &e)));
        }
    }
    for r in results.iter().filter(|r| r.spec.rescue()) {
        let stat = |suffix: &str| r.counters.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v).sum::<u64>();
        out.push_str(&format!(
            "rescue, {}: {} responses rescued\n",
            r.spec.label(),
            stat("close_relay_rescued_total")
        ));
    }
    out
}

/// 5xx per 250 ms over time, one panel per app, one line per row x column.
pub fn chart(results: &[RunResult], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let apps = apps_in(results);
    if apps.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (1200, 260 * apps.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((apps.len(), 1));
    let bucket = 250u64;
    let end = results.iter().flat_map(|r| r.events.last().map(|e| e.0)).max().unwrap_or(1000);
    let buckets = |r: &RunResult| {
        let mut counts = vec![0u64; (end / bucket + 1) as usize];
        for t in &r.five_xx_at {
            if let Some(c) = counts.get_mut((t / bucket) as usize) {
                *c += 1;
            }
        }
        counts
    };
    let peak = results.iter().flat_map(buckets).max().unwrap_or(0).max(1);
    // One hue per row (red: no filter, blue: close-relay, green: recommended), darker with a preStop.
    let color = |r: &RunResult| {
        let shade = |c: (u8, u8, u8)| {
            let k = if r.spec.column().has_hook() { 2 } else { 1 };
            let k = if r.spec.sidecar == SidecarMode::Held { k } else { k + 1 };
            RGBColor(c.0 / k, c.1 / k, c.2 / k)
        };
        match r.spec.row {
            Row::NoFilter => shade((230, 40, 40)),
            Row::CloseRelay => shade((40, 90, 230)),
            Row::Recommended => shade((20, 170, 60)),
            Row::Rescue => shade((150, 40, 200)),
            Row::Lean => shade((230, 140, 20)),
        }
    };
    for (panel, app) in panels.iter().zip(apps) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("app {}: 5xx per {bucket} ms at the ALB", app.as_str()), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(25)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..end as f64 / 1000.0, 0u64..peak + 1)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("seconds").draw().map_err(|e| e.to_string())?;
        for r in results.iter().filter(|r| r.spec.app == app) {
            let counts = buckets(r);
            let c = color(r);
            let points = counts.iter().enumerate().map(|(b, n)| ((b as u64 * bucket) as f64 / 1000.0, *n));
            let label = format!("{} / {} ({} 5xx)", r.spec.filter_label(), r.spec.column().as_str(), r.five_xx);
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::spec::RunSpec;
    use crate::servers::Server;

    /// A run of `spec` whose 5xx were sent at these ms after the app's signal (at 2 s).
    fn lost(spec: RunSpec, five_xx: &[(u16, i64)]) -> RunResult {
        let signal = 2_000u64;
        let mut statuses = BTreeMap::from([(200, 1_000)]);
        for (code, _) in five_xx {
            *statuses.entry(*code).or_insert(0) += 1;
        }
        RunResult {
            spec,
            requests: 1_000 + five_xx.len() as u64,
            five_xx: five_xx.len() as u64,
            conn_errors: 0,
            statuses,
            five_xx_at: five_xx.iter().map(|(_, at)| (signal as i64 + at) as u64).collect(),
            events: Vec::new(),
            app_signal_at: signal,
            counters: BTreeMap::new(),
        }
    }

    fn go(row: Row, sidecar: SidecarMode) -> RunSpec {
        RunSpec::cell(row, AppMode::Real(Server::Go), sidecar, 0).heavy()
    }

    #[test]
    fn nothing_lost_needs_no_explanation() {
        assert_eq!(explain(&lost(go(Row::CloseRelay, SidecarMode::Held), &[])), None);
    }

    #[test]
    fn requests_on_the_wire_as_a_real_server_stops_are_physics_at_most_one_per_connection() {
        let e = explain(&lost(go(Row::CloseRelay, SidecarMode::Held), &[(503, 3), (503, 7), (502, 9)])).unwrap();
        assert_eq!((e.cause, e.five_xx, e.first_ms, e.last_ms, e.at_most_one_each), (Cause::OnTheWire, 3, 3, 9, true));
        assert_eq!(e.statuses, BTreeMap::from([(502, 1), (503, 2)]));
        // Sent well before the signal, more than the ALB's connections, or another status: not physics.
        let early = [(503, -200)];
        let many: Vec<(u16, i64)> = (0..25).map(|i| (503, i)).collect();
        for five_xx in [&early[..], &many[..], &[(504, 5)][..]] {
            assert_eq!(explain(&lost(go(Row::CloseRelay, SidecarMode::Held), five_xx)).unwrap().cause, Cause::Unexplained, "{five_xx:?}");
        }
    }

    #[test]
    fn any_loss_with_rescue_is_a_defect_and_without_the_filter_the_bug() {
        for row in [Row::Rescue, Row::Lean] {
            assert_eq!(explain(&lost(go(row, SidecarMode::Held), &[(503, 3)])).unwrap().cause, Cause::Unexplained);
        }
        assert_eq!(explain(&lost(go(Row::NoFilter, SidecarMode::Held), &[(503, 3)])).unwrap().cause, Cause::Bug);
        let drained = explain(&lost(go(Row::NoFilter, SidecarMode::IstioAgent), &[(503, 3)])).unwrap();
        assert_eq!(drained.cause, Cause::EnvoyDrainLeavesIdle);
    }

    #[test]
    fn grpc_calls_the_apps_goaway_refused_are_physics_without_rescue_and_a_defect_with_it() {
        let grpc = |row| RunSpec::cell(row, AppMode::Real(Server::Grpc), SidecarMode::Held, 0).heavy();
        let e = explain(&lost(grpc(Row::CloseRelay), &[(503, 1), (503, 9)])).unwrap();
        assert_eq!(e.cause, Cause::OnTheWire);
        // More calls than ALB connections: HTTP/2 multiplexes them; but not long after the signal.
        let many: Vec<(u16, i64)> = (0..37).map(|i| (503, 6 + i)).collect();
        assert_eq!(explain(&lost(grpc(Row::CloseRelay), &many)).unwrap().cause, Cause::OnTheWire);
        let late: Vec<(u16, i64)> = (0..37).map(|i| (503, 6 + i * 10)).collect();
        assert_eq!(explain(&lost(grpc(Row::CloseRelay), &late)).unwrap().cause, Cause::Unexplained);
        assert!(describe(&lost(grpc(Row::CloseRelay), &[(503, 1)]), &e).contains("GOAWAY"));
        assert_eq!(explain(&lost(grpc(Row::Rescue), &[(503, 1)])).unwrap().cause, Cause::Unexplained);
    }

    #[test]
    fn a_told_sidecar_losing_requests_is_not_physics() {
        let told = RunSpec::cell(Row::Recommended, AppMode::Real(Server::Go), SidecarMode::Held, 3_000);
        assert_eq!(explain(&lost(told, &[(503, 3)])).unwrap().cause, Cause::Unexplained);
    }
}
