//! The lean plugin: the network role alone (`lean: true`), with no HTTP role beside it. It
//! follows the responses Envoy writes from their heads and chunk lines ([`crate::framing`]):
//! while the pod drains, a response head gets `connection: close`, and the sweep closes the
//! connection once its response is out; what a response says about the app goes to
//! [`app::judge`], as the HTTP role's does.

use log::debug;
use proxy_wasm::types::BufferType;

use crate::app::{self, Verdict};
use crate::codec;
use crate::conn::{self, Conn, ConnRef};
use crate::decision::Upstream;
use crate::follow::{Follower, MAX_READS};
use crate::framing::{self, HeadSeen, Responses};
use crate::host;
use crate::http1;
use crate::keys;
use crate::link::Handle;
use crate::podwide;
use crate::probe;
use crate::plugin::Plugin;
use crate::wire::{self, Closer, Edit};

/// Enough of Envoy's local reply body to read its reset reason ([`wire::local_reply_refused`]).
const LOCAL_REPLY_READ: usize = wire::LOCAL_REPLY_START.len() + 48;

/// A new client connection: no HTTP role reads an address, so none is published; the
/// connection is registered for the sweep under its context id.
pub fn start(conn: &ConnRef, max_head: usize) -> Handle {
    let handle = Handle::new(0, &conn.borrow().context_id.to_string());
    {
        let mut c = conn.borrow_mut();
        c.activity.last_ms = host::coarse_now();
        c.responses = Some(Responses::new(max_head));
    }
    conn::register(&handle.text, conn);
    handle
}

/// Follows the responses in this write, reading only heads and chunk lines. While
/// the pod drains, a head at the start of a write gets `connection: close`, and the sweep
/// closes the connection once its response is out and it is quiet.
pub fn follow_responses(conn: &ConnRef, plugin: &Plugin, size: usize) {
    let draining = podwide::draining();
    let (mut pos, mut end) = (0, size);
    let mut c = conn.borrow_mut();
    let Conn { responses: Some(responses), probe, head_503, .. } = &mut *c else { return };
    if let Some(head) = head_503.take() {
        watch_app(plugin, head, local_reply(0, end));
    }
    let mut told = None;
    for _ in 0..MAX_READS {
        if pos >= end {
            break;
        }
        let Some(want) = responses.wants() else {
            pos = pos.saturating_add(responses.skip(end.saturating_sub(pos)));
            continue;
        };
        let Some(bytes) = host::get_buffer_at(BufferType::UpstreamData, pos, want.min(end.saturating_sub(pos))).filter(|b| !b.is_empty()) else {
            break;
        };
        let fed = responses.feed(&bytes);
        pos = pos.saturating_add(fed.used);
        if let Some(head) = fed.head.filter(|h| h.is_final) {
            if std::mem::take(probe) {
                probe::probed(plugin, probe::answered(&head));
            }
            // Envoy's own reply when it could not reach the app: a default sidecar keeps no
            // stat of it, but its body names it (one read more, for a 503 of Envoy's own
            // only: an app's 503 passing on a dependency's reply says the same words).
            let envoys_503 = head.status == 503 && !head.from_upstream;
            if envoys_503 && pos == end && responses.in_flight() {
                *head_503 = Some(head);
            } else {
                let local = if envoys_503 { local_reply(pos, end) } else { None };
                watch_app(plugin, head, local);
            }
        }
        let Some(head) = fed.head.filter(|h| draining && h.is_final && h.whole_here && pos == h.len) else { continue };
        if head.says_close {
            told = Some(Closer::Envoy);
        } else if host::edit(BufferType::UpstreamData, &Edit { len: head.len, with: framing::with_close(&bytes[..head.len]) }) {
            (pos, end) = (pos.saturating_add(http1::CLOSE_LINE.len()), end.saturating_add(http1::CLOSE_LINE.len()));
            told = Some(Closer::Relay);
        }
    }
    if pos < end {
        responses.lose();
    }
    drop(c);
    in_flight(conn, plugin);
    if let Some(closer) = told {
        let mut c = conn.borrow_mut();
        c.close_pending = closer == Closer::Relay;
        c.envoy_closes = closer == Closer::Envoy;
        drop(c);
        plugin.metrics.headers_rewritten.inc();
        plugin.metrics.closed_while_draining.inc();
    }
}

/// What the sweep reads. A response under way is in flight, and so is a request read
/// since the last answer was written: Envoy presents a request pipelined behind another to
/// the filters again once the answer before it is out, so its bytes come after that answer.
/// A connection whose responses cannot be followed is Envoy's alone (never closed as idle),
/// counted once.
pub fn in_flight(conn: &ConnRef, plugin: &Plugin) {
    let mut c = conn.borrow_mut();
    let Some(responses) = c.responses.as_ref() else { return };
    let lost = responses.lost();
    let busy = responses.in_flight() || (c.activity.saw_request && !c.activity.last_was_response);
    c.activity.in_flight = u32::from(busy);
    c.activity.unaccounted = busy;
    if lost && !std::mem::replace(&mut c.lost_counted, true) {
        drop(c);
        plugin.metrics.lean_lost.inc();
        debug!("lean: lost track of this connection's bytes; left to Envoy to close");
    }
}

/// What a response says about the app ([`app::judge`]), from rescue's marks on its head and
/// Envoy's own reply (`local`: Envoy could not reach the app, `Some(true)` refused, `Some(false)`
/// reset).
fn watch_app(plugin: &Plugin, head: HeadSeen, local: Option<bool>) {
    let Some(config) = plugin.active() else { return };
    if head.attempt_counted && !plugin.rescue_recorded.replace(true) {
        host::shared_update(keys::RESCUE_SEEN, |_| Some((codec::encode_u64s(&[1]), ())));
    }
    let upstream = match local {
        _ if head.refused => Upstream::Refused,
        Some(true) => Upstream::Refused,
        Some(false) => Upstream::Reset,
        None => Upstream::Fine,
    };
    let response = app::Response { upstream, rescued: head.rescued, rescue_marked: head.refused };
    if let Verdict::Going { source, until, .. } = app::judge(plugin, config, response, |_| false) {
        podwide::enter(source, until, &plugin.metrics);
    }
}

/// Which failure Envoy's local reply starting at `pos` of this write names, if it is one.
fn local_reply(pos: usize, end: usize) -> Option<bool> {
    if pos >= end {
        return None;
    }
    let body = host::get_buffer_at(BufferType::UpstreamData, pos, LOCAL_REPLY_READ.min(end.saturating_sub(pos)))?;
    wire::local_reply_refused(&body)
}
