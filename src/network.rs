//! The network role: sits before the HCM and sees the bytes Envoy writes to the client.
//! - Rewrites the HTTP role's marker into `connection: close`.
//! - Keeps this VM's registry of client connections, which a same-VM HTTP role updates directly
//!   and one in another VM through notes on this VM's queue (`link`).
//! - When no HTTP role could close the connection after a relayed close (no queue), adds
//!   `connection: close` to the client's next request, so the HCM answers with close and closes.
//! - Closes idle connections while the pod drains, and those already told to close.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType, PeerType};

use crate::drain::{self, Activity, Grace};
use crate::host;
use crate::metrics::Metrics;
use crate::link::{Address, Note};
use crate::wire::{self, Edit, HeadRewrite, HeadStep};
use crate::pod;
use crate::shared::Shared;

/// Most heads fit in one small read; only a larger head costs a second, bounded one.
const FIRST_READ: usize = 1024;

/// One client connection as this VM knows it; shared with a same-VM HTTP role.
#[derive(Debug, Default)]
pub struct Conn {
    /// The network role's context id, to act as it (`set_effective_context`).
    pub context_id: u32,
    pub activity: Activity,
    /// A relayed `connection: close` went out: the connection must end.
    pub close_pending: bool,
    /// We asked Envoy to close it, or the connection is gone (its network context is done):
    /// nothing more to do, and its context id must not be used again.
    pub closing: bool,
    /// An HTTP role in this VM reports on this connection: writes need reading only when it
    /// has marked a response (`head_pending`). Without one (separate VMs), every write that
    /// may start a response head is read.
    pub http_role_here: bool,
    /// The HTTP role marked a response whose head has not been written yet.
    pub head_pending: bool,
    /// Bytes of that head held back until the rest of it is written.
    pub carry: Vec<u8>,
}

pub type ConnRef = Rc<RefCell<Conn>>;

thread_local! {
    /// Connections of this VM by address (`link::Address::text`). One VM runs on one worker
    /// thread and a connection stays on its worker, so an HTTP role that finds its address here
    /// shares the VM.
    static CONNS: RefCell<HashMap<String, ConnRef>> = RefCell::new(HashMap::new());
}

thread_local! {
    /// Connections an HTTP role asked to close once its response is done (see [`close_soon`]).
    static CLOSE_SOON: RefCell<Vec<ConnRef>> = const { RefCell::new(Vec::new()) };
}

/// Closes `conn` on the next dispatcher turn, not now: an HTTP role's stream can end while
/// Envoy is itself closing the connection (the stream ends with it), and closing it again from
/// there crashes Envoy (a segfault, seen in the soak on 1.40.0). False without a wake queue:
/// the tick's sweep closes it then, as a connection told to close.
pub fn close_soon(conn: &ConnRef) -> bool {
    CLOSE_SOON.with(|c| c.borrow_mut().push(conn.clone()));
    pod::wake_self()
}

/// The network root's turn: closes what HTTP roles asked for; returns how many closed.
pub fn close_requested() -> u64 {
    let due = CLOSE_SOON.with(|c| std::mem::take(&mut *c.borrow_mut()));
    due.iter().map(|conn| u64::from(close(conn))).sum()
}

/// The connection at `address`, if its network role lives in this VM.
pub fn conn_for(address: &str) -> Option<ConnRef> {
    CONNS.with(|c| c.borrow().get(address).cloned())
}

/// Closes a client connection after what was written to it is flushed, acting as its network
/// context. Never called with `CONNS` borrowed: Envoy may call back into this VM while closing.
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
            false
        }
    }
}

/// A note from an HTTP role in another VM about one of this VM's connections, as a same-VM HTTP
/// role would have said it (`http.rs`). True when it closed the connection.
pub fn hear(note: &Note) -> bool {
    let (conn, ended, close_now) = match note {
        Note::Begin(conn) => (conn, false, false),
        Note::End { conn, begun, close } => (conn, *begun, *close),
        Note::Wake | Note::Enter { .. } => return false,
    };
    // Gone already (closed, or a note from before a config update): nothing to do.
    let Some(conn) = conn_for(conn) else { return false };
    {
        let mut c = conn.borrow_mut();
        match note {
            Note::Begin(_) => c.activity.in_flight += 1,
            // Only the count: a note is read a dispatcher turn late, when the client may already
            // have sent its next request, and the bytes this role saw itself say which came last.
            _ if ended => c.activity.in_flight = c.activity.in_flight.saturating_sub(1),
            _ => {}
        }
    }
    close_now && close(&conn)
}

/// On each tick of the network root: closes connections that are idle and either told to
/// close already, or on a pod that is draining (those on a second look, [`drain::second_look`]).
pub fn sweep(draining: bool, grace: Grace, metrics: &Metrics) {
    let now = host::coarse_now();
    let due: Vec<(ConnRef, bool, Activity)> = CONNS.with(|c| {
        c.borrow()
            .values()
            .filter_map(|conn| {
                let mut c = conn.borrow_mut();
                let told = c.close_pending;
                let wanted = (draining || told) && !c.closing && drain::idle(&c.activity, now, grace.idle_ms, grace.fresh_ms);
                let close = wanted && (told || drain::second_look(&mut c.activity, now, grace.idle_ms, grace.tick_ms));
                close.then(|| (conn.clone(), told, c.activity))
            })
            .collect()
    });
    for (conn, told, a) in due {
        if close(&conn) {
            if draining && !told {
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

fn apply(buffer: BufferType, edit: &Edit) -> bool {
    let applied = host::replace_prefix(buffer, edit.len, &edit.with);
    if let Err(e) = applied {
        warn!("close-relay: could not edit {buffer:?}: {e:?}");
    }
    applied.is_ok()
}

pub struct NetworkRole {
    shared: Rc<Shared>,
    /// This connection's [`Address`] text, once published; also the marker's value.
    address: Option<String>,
    conn: ConnRef,
}

impl NetworkRole {
    pub fn new(id: u32, shared: Rc<Shared>) -> Self {
        let conn = Rc::new(RefCell::new(Conn { context_id: id, ..Conn::default() }));
        NetworkRole { shared, address: None, conn }
    }

    /// Same VM: the next head is marked; rewrite it, holding back pieces until it is whole.
    fn rewrite_marked_head(&self, size: usize, nonce: &str, max_head: usize) {
        let Some(write) = host::get_buffer(BufferType::UpstreamData, size.min(max_head)) else {
            return;
        };
        let step = {
            let mut c = self.conn.borrow_mut();
            let step = wire::feed_marked_head(&mut c.carry, &write, nonce, max_head);
            c.head_pending = step == HeadStep::Hold;
            step
        };
        match step {
            HeadStep::Hold => {
                apply(BufferType::UpstreamData, &Edit { len: write.len(), with: Vec::new() });
            }
            HeadStep::Done { edit: Some(edit), rewritten } => {
                if apply(BufferType::UpstreamData, &edit) && rewritten {
                    self.rewritten();
                }
            }
            HeadStep::Done { edit: None, .. } => {}
        }
    }

    /// Separate VMs: notes arrive a dispatcher turn late, so nobody says in time which writes
    /// carry a marked head; any that starts one is read, and the head must come whole in it.
    fn rewrite_head(&self, size: usize, nonce: &str, max_head: usize) {
        let Some(mut buf) = host::get_buffer(BufferType::UpstreamData, size.min(FIRST_READ)) else {
            return;
        };
        if !buf.starts_with(wire::STATUS_LINE_START) {
            return;
        }
        if size > buf.len() && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match host::get_buffer(BufferType::UpstreamData, size.min(max_head)) {
                Some(more) => buf = more,
                None => return,
            }
        }
        let HeadRewrite::Rewritten { edit, .. } = wire::rewrite_response_head(&buf, nonce, max_head) else {
            return;
        };
        if apply(BufferType::UpstreamData, &edit) {
            self.rewritten();
        }
    }

    fn rewritten(&self) {
        self.conn.borrow_mut().close_pending = true;
        self.shared.metrics.headers_rewritten.inc();
        debug!("marker rewritten to connection: close");
    }

    fn close_on_next_request(&mut self, size: usize) {
        let Some(buf) = host::get_buffer(BufferType::DownstreamData, size.min(wire::MAX_REQUEST_LINE)) else {
            return;
        };
        let Some(edit) = wire::inject_request_close(&buf) else {
            return;
        };
        if apply(BufferType::DownstreamData, &edit) {
            self.conn.borrow_mut().close_pending = false;
            self.shared.metrics.requests_closed.inc();
            debug!("added connection: close to the next request");
        }
    }
}

impl Context for NetworkRole {}

/// The connection is gone (Envoy's `onCloseTCP`: `on_done`, `on_log`, `on_delete` back to back;
/// the SDK drops the context in `on_delete`, see `HttpRole`'s `Drop`).
impl Drop for NetworkRole {
    fn drop(&mut self) {
        // An HTTP role may still hold this connection; it must never act as a finished context.
        self.conn.borrow_mut().closing = true;
        if let Some(address) = self.address.take() {
            let _ = CONNS.try_with(|c| c.borrow_mut().remove(&address));
        }
    }
}

impl StreamContext for NetworkRole {
    /// The connection is closing (either side, or Envoy): mark it done, so that nothing closes
    /// it again (why that matters: [`close_soon`]).
    fn on_downstream_close(&mut self, _peer: PeerType) {
        self.conn.borrow_mut().closing = true;
    }

    fn on_upstream_close(&mut self, _peer: PeerType) {
        self.conn.borrow_mut().closing = true;
    }

    fn on_new_connection(&mut self) -> Action {
        if self.shared.active().is_none() {
            return Action::Continue;
        }
        let address = Address::new(pod::own_queue().unwrap_or(0), &host::nonce()).text;
        if let Err(e) = host::set_property(host::NONCE_PROPERTY, address.as_bytes()) {
            warn!("close-relay: cannot announce the network role on this connection: {e:?}");
            return Action::Continue;
        }
        self.conn.borrow_mut().activity.last_ms = host::coarse_now();
        CONNS.with(|c| c.borrow_mut().insert(address.clone(), self.conn.clone()));
        self.address = Some(address);
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.shared.active() else { return Action::Continue };
        let (close_pending, undecided) = {
            let mut c = self.conn.borrow_mut();
            c.activity.read(host::coarse_now());
            (c.close_pending, c.activity.http1.is_none())
        };
        if undecided && size > 0 {
            // Once per connection: the sweep closes only connections that speak HTTP/1.
            let first = host::get_buffer(BufferType::DownstreamData, size.min(FIRST_READ)).unwrap_or_default();
            #[cfg(feature = "fault-injection")]
            if first.starts_with(b"TRAP ") {
                std::process::abort();
            }
            self.conn.borrow_mut().activity.http1 = wire::starts_http1_request(&first);
        }
        if close_pending && size > 0 && config.close_connection {
            self.close_on_next_request(size);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let (Some(config), Some(nonce)) = (self.shared.active(), self.address.as_deref()) else {
            return Action::Continue;
        };
        let (marked, http_role_here) = {
            let mut c = self.conn.borrow_mut();
            c.activity.wrote(size, host::coarse_now());
            (c.head_pending, c.http_role_here)
        };
        if marked {
            self.rewrite_marked_head(size, nonce, config.max_head());
        } else if !http_role_here && size >= wire::STATUS_LINE_START.len() {
            self.rewrite_head(size, nonce, config.max_head());
        }
        Action::Continue
    }
}
