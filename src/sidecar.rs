//! What the sidecar says about its own drain: its admin API's `/ready` and `/stats`, and the
//! network role's probes of Envoy's own `connection: close`.

use crate::codec::{decode_u64s, encode_u64s};

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

#[cfg(test)]
#[path = "sidecar_tests.rs"]
mod tests;
