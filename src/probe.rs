//! Probes of Envoy's drain. A default sidecar keeps no stat of the closes Envoy's drain makes,
//! so the network role asks a request: once a tick per VM, one Envoy would keep the connection
//! open for ([`wire::keep_alive_request`]); its answer then says whether Envoy's listener
//! drains (`connection: close`) or not. Envoy's closes in a row, pod-wide, drain the pod
//! (`sidecar_drain`, istio-agent's `drain_listeners`); a kept-alive answer ends that source.

use std::cell::Cell;

use log::debug;
use proxy_wasm::types::BufferType;

use crate::codec;
use crate::config::Config;
use crate::conn::ConnRef;
use crate::drain::{Source, UNTIL_CLEARED};
use crate::framing::{self, HeadSeen};
use crate::host;
use crate::keys;
use crate::podwide;
use crate::plugin::Plugin;
use crate::sidecar::{self, DrainStats, Probed};
use crate::{http1, wire};

thread_local! {
    /// Request heads a probe may still read this tick (the network root refills it each tick;
    /// arming a probe empties it).
    static READS: Cell<u32> = const { Cell::new(0) };
}

/// Request heads read per tick and VM looking for one to probe: a probe takes the first that
/// qualifies, and traffic where none does (all POSTs, say) costs at most this many reads a tick.
pub const READS_PER_TICK: u32 = 4;

/// The network root's tick: this tick's probes may read again.
pub fn refill_reads() {
    READS.set(READS_PER_TICK);
}

/// Arms a probe on the request starting this read of `size` bytes, if it qualifies and this
/// tick's reads allow. `first`: the head already read for this connection's first request,
/// free to look at.
pub fn arm(conn: &ConnRef, config: &Config, size: usize, first: Option<Vec<u8>>) {
    let reads = READS.get();
    if !(config.drain.enabled && config.drain.sidecar.enabled && reads > 0) {
        return;
    }
    let head = match first {
        Some(head) => head,
        None => {
            READS.set(reads.saturating_sub(1));
            let Some(head) = host::get_buffer(BufferType::DownstreamData, size) else { return };
            head
        }
    };
    if wire::keep_alive_request(&head) {
        READS.set(0);
        conn.borrow_mut().probe = true;
    }
}

/// The answer to a probed request starts in this write of `size` bytes (not `lean`, which
/// follows it).
pub fn answer(conn: &ConnRef, plugin: &Plugin, size: usize) {
    let Some(bytes) = host::get_buffer(BufferType::UpstreamData, size.min(http1::FIRST_READ)) else { return };
    match framing::head_at_start(&bytes) {
        Some(head) if head.is_final => {
            conn.borrow_mut().probe = false;
            probed(plugin, answered(&head));
        }
        // An interim 1xx: the final answer comes next.
        Some(_) => {}
        None => conn.borrow_mut().probe = false,
    }
}

/// What the final head answering a probed request says.
pub fn answered(head: &HeadSeen) -> Probed {
    if head.says_close { Probed::EnvoyClosed } else { Probed::KeptAlive }
}

/// What a probe saw, pod-wide: Envoy's own closes in a row drain the pod (`sidecar_drain`,
/// istio-agent's `drain_listeners`), a kept-alive answer ends that source.
pub fn probed(plugin: &Plugin, probed: Probed) {
    if plugin.active().filter(|c| c.drain.enabled && c.drain.sidecar.enabled).is_none() {
        return;
    }
    let in_a_row = host::shared_update(keys::ENVOY_CLOSES, |current| {
        let [n] = codec::decode_u64s(current);
        let next = sidecar::next_in_a_row(n, probed);
        Some((codec::encode_u64s(&[next]), next))
    })
    .unwrap_or(0);
    debug!("probe of Envoy's drain: {probed:?} ({in_a_row} of Envoy's closes in a row)");
    match probed {
        Probed::KeptAlive => podwide::clear(Source::SidecarDrain, &plugin.metrics),
        Probed::EnvoyClosed => {
            let updating = DrainStats::decode_read(&host::shared_get(keys::SIDECAR_READ).0)
                .is_some_and(|(_, stats)| stats.update_draining > 0);
            let health = podwide::active_until(Source::SidecarHealth) > 0;
            if sidecar::listeners_draining(in_a_row, updating, health) {
                podwide::enter(Source::SidecarDrain, UNTIL_CLEARED, &plugin.metrics);
            }
        }
    }
}
