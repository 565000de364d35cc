//! One client connection as this VM knows it ([`Conn`]), the one type both roles act on, and
//! the VM's registry of them: by address, the closes HTTP roles asked for, the notes from HTTP
//! roles in other VMs, and the idle sweep. The network role registers a connection; a same-VM
//! HTTP role updates it through its methods, one in another VM through notes (`link`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::debug;

use crate::drain::{self, Activity, Grace};
use crate::host;
use crate::link::Note;
use crate::metrics::Metrics;
use crate::pod;

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

impl Conn {
    /// A same-VM HTTP role saw a request start on this connection.
    pub fn request_started(&mut self) {
        self.activity.in_flight += 1;
        self.http_role_here = true;
    }

    /// A same-VM HTTP role's stream ended, its response written.
    pub fn request_done(&mut self, now_ms: u64) {
        self.activity.request_done(now_ms);
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
