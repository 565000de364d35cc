//! One client connection as this VM knows it ([`Conn`]), the one type both roles act on, and
//! the VM's registry of them: by address, the notes from HTTP roles in other VMs, and the sweep
//! that closes connections once they are quiet. The network role registers a connection; a same-VM
//! HTTP role updates it through its methods, one in another VM through notes (`link`).

use std::cell::RefCell;
use std::rc::Rc;

use log::debug;

use crate::framing::{HeadSeen, Responses};
use crate::host;
use crate::idle::{self, Activity, Grace};
use crate::link::Note;
use crate::metrics::Metrics;

thread_local! {
    /// Connections of this VM by address (`link::Handle::text`). A connection stays
    /// on its worker, so an HTTP role that finds its address here shares the VM.
    static CONNS: std::cell::RefCell<std::collections::BTreeMap<String, ConnRef>> = const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
    /// This VM's network root sweeps idle connections (set once it is configured).
    static SWEEPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One client connection as this VM knows it; shared with a same-VM HTTP role.
#[derive(Debug, Default)]
pub struct Conn {
    /// The network role's context id, to act as it (`set_effective_context`).
    pub context_id: u32,
    pub activity: Activity,
    /// A relayed `connection: close` went out and Envoy will not close the connection itself:
    /// it ends when the client closes it, on the client's next request (`connection: close`
    /// added to it), or when it goes quiet ([`sweep`]).
    pub close_pending: bool,
    /// A marked response head said `connection: close` on Envoy's own account (its drain, the
    /// client asked, an answer before the request was whole): Envoy closes the connection
    /// itself, and the sweep only once Envoy's delayed close is surely over
    /// ([`Grace::envoy_told_ms`]).
    pub envoy_closes: bool,
    /// We asked Envoy to close it, or the connection is gone (its network context is done):
    /// nothing more to do, and its context id must not be used again.
    pub closing: bool,
    /// The host would not close it: the sweep leaves it, and a connection told to close ends
    /// on the client's next request instead.
    pub close_failed: bool,
    /// An HTTP role in this VM reports on this connection: writes need reading only when it
    /// has marked a response (`head_pending`). Without one (separate VMs), every write that
    /// may start a response head is read.
    pub http_role_here: bool,
    /// The HTTP role marked a response whose head has not been written yet.
    pub head_pending: bool,
    /// Bytes of that head held back until the rest of it is written.
    pub carry: Vec<u8>,
    /// `lean`: the network role follows the responses itself, and its count of requests in
    /// flight is whether one is under way or read and not yet answered ([`crate::framing`]).
    pub responses: Option<Responses>,
    /// `lean`: this connection was counted as lost (`close_relay_lean_lost_total`).
    pub lost_counted: bool,
    /// An HTTP role in another VM reported a request on this connection (a note).
    pub heard: bool,
    /// The kubelet's preStop hook came on this connection at this time (the host's clock): it
    /// is not one of the clients the hook waits for.
    pub hook_since: Option<u64>,
    /// The count last published on it for the HTTP role that holds the hook.
    pub hook_left: Option<u64>,
    /// `lean`: a 503 head went out and its body, which may be Envoy's own reply naming why it
    /// could not reach the app, comes in the next write (Envoy writes a head and its body apart).
    pub head_503: Option<HeadSeen>,
    /// HTTP/2 with prior knowledge: both sides' frames, followed from their headers.
    pub h2: Option<crate::h2::Connection>,
    /// A probe of Envoy's drain waits for the answer to this connection's request
    /// ([`crate::sidecar::Probed`]).
    pub probe: bool,
}

pub type ConnRef = Rc<RefCell<Conn>>;

impl Conn {
    /// A same-VM HTTP role saw a request start on this connection.
    pub fn request_started(&mut self) {
        self.activity.in_flight = self.activity.in_flight.saturating_add(1);
        self.http_role_here = true;
    }

    /// A same-VM HTTP role's stream ended, its response written: every byte the client sent
    /// before it is accounted for.
    pub fn request_done(&mut self, now_ms: u64) {
        self.activity.request_done(now_ms);
    }

    /// May the sweep close this connection once it is quiet? Only on evidence, for this very
    /// connection, that its requests in flight are counted: an HTTP role reported one (in this
    /// VM, or by a note from another), or `lean` follows it; and only where this VM sweeps at all
    /// (the host ticks it, and tells the time). A queue to hear notes on proves nothing: the HTTP
    /// plugin may have refused its configuration, trapped, or be missing from this chain.
    /// Otherwise a connection told to close ends on the client's next request.
    pub fn sweepable(&self) -> bool {
        SWEEPING.get() && !self.close_failed && (self.http_role_here || self.heard || self.responses.is_some())
    }

    /// A same-VM HTTP role marked the next response head: the network role rewrites that one
    /// and reads no other.
    pub fn mark_head(&mut self) {
        self.head_pending = true;
        self.http_role_here = true;
    }
}

/// Registers the connection at `address` with this VM.
pub fn register(address: &str, conn: &ConnRef) {
    CONNS.with(|c| c.borrow_mut().insert(address.to_string(), conn.clone()));
}

/// The connection is gone. `try_with`: this runs from a context's drop, also at VM teardown.
pub fn unregister(address: &str) {
    let _ = CONNS.try_with(|c| c.borrow_mut().remove(address));
}

/// Whether this VM's network root sweeps: set once it is configured.
pub fn set_sweeping(sweeping: bool) {
    SWEEPING.set(sweeping);
}

/// The connection at `address`, if its network role lives in this VM.
pub fn conn_for(address: &str) -> Option<ConnRef> {
    CONNS.with(|c| c.borrow().get(address).cloned())
}

/// Closes a client connection after what was written to it is flushed, acting as its network
/// context. Only from a root's turn, never from inside a stream: a stream can end while Envoy
/// is itself closing the connection, and closing it again from there crashes Envoy (a segfault on
/// 1.40.0). Never called with `CONNS` borrowed: Envoy may call back into
/// this VM while closing.
///
/// The host's close is Envoy's `FlushWrite`, without its HCM's delayed close: a socket closed
/// with input it has not read makes the kernel reset the connection and drop whatever it had
/// not sent yet. So it is only used on a connection that is quiet ([`idle::idle`]), where
/// Envoy has read everything the client sent.
pub fn close(conn: &ConnRef) -> bool {
    let id = {
        let mut c = conn.borrow_mut();
        if c.closing {
            return false;
        }
        c.closing = true;
        c.context_id
    };
    match host::set_effective_context(id).and_then(|_| host::close_downstream()) {
        Ok(()) => true,
        Err(e) => {
            debug!("could not close client connection: {e:?}");
            let mut c = conn.borrow_mut();
            (c.closing, c.close_failed) = (false, true);
            false
        }
    }
}

/// This VM's client connections still open, the preStop hooks' own left out, and the hooks'
/// connections with when each hook came.
pub fn census() -> (u64, Vec<(ConnRef, u64)>) {
    CONNS.with(|c| {
        let conns = c.borrow();
        let mut open = 0u64;
        let mut hooks = Vec::new();
        for conn in conns.values() {
            let c = conn.borrow();
            match c.hook_since {
                _ if c.closing => {}
                Some(since) => hooks.push((conn.clone(), since)),
                None => open = open.saturating_add(1),
            }
        }
        (open, hooks)
    })
}

/// A note from an HTTP role in another VM about one of this VM's connections, as a same-VM HTTP
/// role would have said it (`http.rs`).
pub fn hear(note: &Note) {
    let conn = match note {
        Note::Begin(conn) | Note::End(conn) => conn,
        Note::Wake | Note::Enter { .. } | Note::Clear(_) => return,
    };
    // Gone already (closed, or a note from before a config update): nothing to do.
    let Some(conn) = conn_for(conn) else { return };
    let mut c = conn.borrow_mut();
    match note {
        Note::Begin(_) => {
            c.activity.in_flight = c.activity.in_flight.saturating_add(1);
            c.heard = true;
        }
        // Only the count, and what it accounts for: a note is read a dispatcher turn late, when
        // the client may already have sent its next request, and the bytes this role saw itself
        // say which came last (a request still arriving reads as not quiet either way).
        _ => {
            c.activity.in_flight = c.activity.in_flight.saturating_sub(1);
            c.activity.unaccounted = false;
        }
    }
}

/// On each tick of the network root: closes connections that are idle and either told to
/// close already (`close_connection`), after the sidecar's grace like Envoy's own
/// delayed close, or on a pod that is draining (those on a second look, [`idle::second_look`]).
pub fn sweep(draining: bool, close_connection: bool, grace: Grace, metrics: &Metrics) {
    let now = host::coarse_now();
    let due: Vec<(ConnRef, bool, Activity)> = CONNS.with(|c| {
        c.borrow()
            .values()
            .filter_map(|conn| {
                let mut c = conn.borrow_mut();
                // Without a count of the requests in flight, a connection told to close ends on
                // the client's next request instead (`network.rs`).
                let told = (c.close_pending || c.envoy_closes) && close_connection && c.sweepable();
                let idle_ms = match (c.envoy_closes, told) {
                    (true, _) => grace.envoy_told_ms,
                    (false, true) => grace.told_ms,
                    (false, false) => grace.idle_ms,
                };
                // HTTP/2: idle when no stream is under way either way. A client told with a
                // GOAWAY opens no stream again: closed once quiet for a tick. One never told
                // (its connection had no write to carry a GOAWAY) gets the sidecar's grace
                // even while the app goes away, as a stream it sends may be on the wire.
                let is_idle = match &c.h2 {
                    Some(h2) => {
                        let quiet_ms = if h2.server.goaway_sent() { grace.tick_ms } else { idle_ms.max(grace.told_ms) };
                        h2.quiet() && now >= c.activity.last_ms.saturating_add(quiet_ms)
                    }
                    None => idle::idle(&c.activity, now, idle_ms, grace.fresh_ms, told),
                };
                let wanted = (draining || told) && !c.closing && !c.close_failed && is_idle;
                let close = wanted && (told || idle::second_look(&mut c.activity, now, idle_ms, grace.tick_ms));
                close.then(|| (conn.clone(), told, c.activity))
            })
            .collect()
    });
    for (conn, told, a) in due {
        if close(&conn) {
            if told {
                metrics.connections_closed.inc();
            } else if draining {
                metrics.idle_closed.inc();
            }
            debug!(
                "closed idle client connection (draining: {draining}, told to close: {told}, quiet {} ms by \
                 the tick clock, last bytes a response: {})",
                now.saturating_sub(a.last_ms),
                a.last_was_response
            );
        }
    }
}
