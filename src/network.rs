//! The network role: sits before the HCM and sees the bytes Envoy writes to the client.
//! - Rewrites the HTTP role's marker into `connection: close`.
//! - Registers each client connection with this VM ([`crate::conn`]) and keeps its activity.
//! - After a relayed close, publishes the connection as closing, so that what the client already
//!   sent behind it is answered with close too, and leaves the close to the sweep once the
//!   connection is quiet ([`conn::sweep`]). Where nothing counts the connection's requests in
//!   flight, the client's next request, when it comes alone, gets `connection: close` added
//!   instead, and Envoy answers it and closes its own way.

use std::cell::RefCell;
use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType, PeerType};

use crate::config::Config;
use crate::conn::{self, Conn, ConnRef};
use crate::follow::{Follower, MAX_READS};
use crate::link::Handle;
use crate::plugin::Plugin;
use crate::wire::{self, Closer, Edit, HeadRewrite, HeadStep};
use crate::{host, http1, keys, lean, podwide, probe, queue};

thread_local! {
    /// The host's missing random value was logged once.
    static WARNED_NO_NONCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How much of an HTTP/2 read or write one buffer read takes, from where its frames are followed.
const H2_READ_AHEAD: usize = 1024;

pub struct NetworkRole {
    plugin: Rc<Plugin>,
    /// This connection's [`Handle`], once published; its text is also the marker's value.
    handle: Option<Handle>,
    conn: ConnRef,
}

impl NetworkRole {
    pub fn new(id: u32, plugin: Rc<Plugin>) -> Self {
        let conn = Rc::new(RefCell::new(Conn { context_id: id, ..Conn::default() }));
        NetworkRole { plugin, handle: None, conn }
    }

    /// Same VM: the next head is marked; rewrite it, holding back pieces until it is whole.
    fn rewrite_marked_head(&mut self, size: usize, max_head: usize) {
        let Some(handle) = self.marker_value() else { return };
        let Some(write) = host::get_buffer(BufferType::UpstreamData, size.min(max_head)) else {
            return;
        };
        let step = {
            let mut c = self.conn.borrow_mut();
            let step = wire::feed_marked_head(&mut c.carry, &write, &handle, max_head);
            c.head_pending = step == HeadStep::Hold;
            step
        };
        match step {
            HeadStep::Hold => {
                if !host::edit(BufferType::UpstreamData, &Edit { len: write.len(), with: Vec::new() }) {
                    self.give_up_hold(write.len());
                }
            }
            HeadStep::Done { edit: Some(edit), closer } => {
                if host::edit(BufferType::UpstreamData, &edit) {
                    if let Some(closer) = closer {
                        self.rewritten(closer);
                    }
                }
            }
            HeadStep::Done { edit: None, .. } => {}
        }
    }

    /// The host would not hold back this write of `len` bytes: it goes out as it is, so none of
    /// it stays held (it would go out twice), what earlier writes held goes out before it, and
    /// this head is not rewritten (the marker reaches the client as it is).
    fn give_up_hold(&mut self, len: usize) {
        let earlier = {
            let mut c = self.conn.borrow_mut();
            let before = c.carry.len().saturating_sub(len);
            c.carry.truncate(before);
            c.head_pending = false;
            std::mem::take(&mut c.carry)
        };
        if !earlier.is_empty() {
            host::edit(BufferType::UpstreamData, &Edit { len: 0, with: earlier });
        }
    }

    /// Separate VMs: notes arrive a dispatcher turn late, so nobody says in time which writes
    /// carry a marked head; any that starts one is read, and the head must come whole in it.
    fn rewrite_head(&mut self, size: usize, max_head: usize) {
        let Some(mut buf) = host::get_buffer(BufferType::UpstreamData, size.min(http1::FIRST_READ)) else {
            return;
        };
        if !buf.starts_with(http1::STATUS_LINE_START) {
            return;
        }
        if size > buf.len() && http1::head_len(&buf).is_none() {
            match host::get_buffer(BufferType::UpstreamData, size.min(max_head)) {
                Some(more) => buf = more,
                None => return,
            }
        }
        let Some(handle) = self.marker_value() else { return };
        let HeadRewrite::Rewritten { edit, closer } = wire::rewrite_response_head(&buf, &handle, max_head) else {
            return;
        };
        if host::edit(BufferType::UpstreamData, &edit) {
            self.rewritten(closer);
        }
    }

    /// The marker's value on this connection.
    fn marker_value(&self) -> Option<String> {
        self.handle.as_ref().map(|a| a.text.clone())
    }

    /// The client was told to close. Unless Envoy closes the connection itself, it is ours to
    /// close, and the HTTP role of any request the client already sent behind this response
    /// must close its answer too: the published address says so, to either VM.
    fn rewritten(&mut self, closer: Closer) {
        self.plugin.metrics.headers_rewritten.inc();
        let relay = closer == Closer::Relay;
        {
            let mut c = self.conn.borrow_mut();
            c.close_pending = relay;
            c.envoy_closes = !relay;
        }
        debug!("marker rewritten to connection: close; closed by {closer:?}");
        if let Some(handle) = self.handle.as_mut().filter(|a| relay && !a.closing) {
            handle.closing = true;
            if let Err(e) = host::set_property(keys::ADDRESS_PROPERTY, handle.published().as_bytes()) {
                warn!("close-relay: cannot mark the connection closing: {e:?}");
            }
        }
    }

    /// HTTP/2: follows the frames in this read or write from their headers, passing payloads over
    /// unread. While the pod drains, a write that ends at a frame boundary outside a header block
    /// gets a graceful GOAWAY after it, once ([`crate::h2`]).
    fn follow_h2(&self, buffer: BufferType, size: usize) {
        let mut c = self.conn.borrow_mut();
        let Conn { h2: Some(h2), lost_counted, .. } = &mut *c else { return };
        let frames = if buffer == BufferType::DownstreamData { &mut h2.client } else { &mut h2.server };
        let (mut pos, mut events) = (0, Vec::new());
        for _ in 0..MAX_READS {
            if pos >= size {
                break;
            }
            if frames.wants().is_none() {
                pos = pos.saturating_add(frames.skip(size.saturating_sub(pos)));
                continue;
            }
            // One read covers the small frames of a whole exchange (a request's HEADERS, an
            // answer's HEADERS and DATA); a long payload past it is passed over unread.
            let Some(bytes) = host::get_buffer_at(buffer, pos, H2_READ_AHEAD.min(size.saturating_sub(pos))).filter(|b| !b.is_empty()) else {
                break;
            };
            events.extend(frames.follow(&bytes));
            pos = pos.saturating_add(bytes.len());
        }
        if pos < size {
            frames.lose();
        }
        h2.apply(&events);
        if h2.lost() && !std::mem::replace(lost_counted, true) {
            drop(c);
            self.plugin.metrics.h2_lost.inc();
            debug!("h2: lost frame sync on this connection; nothing is added, Envoy closes it");
            return;
        }
        let tell = buffer == BufferType::UpstreamData && podwide::draining() && h2.may_tell();
        if tell && host::append(buffer, size, &crate::h2::GRACEFUL_GOAWAY).is_ok() {
            h2.server.goaway_added();
            drop(c);
            self.plugin.metrics.h2_goaway.inc();
            debug!("h2: graceful GOAWAY added after Envoy's write");
        }
    }

    /// Without anything that counts its requests in flight, the sweep cannot close a connection
    /// told to close: Envoy does, after answering the client's next request, when that request
    /// comes alone (Envoy presents what it has read but not yet handled again after each
    /// response: a request with more behind it is answered with close by the HTTP role instead).
    fn close_on_next_request(&mut self, size: usize) {
        if size > wire::MAX_REQUEST_LINE {
            return;
        }
        let Some(buf) = host::get_buffer(BufferType::DownstreamData, size) else {
            return;
        };
        let Some(edit) = wire::inject_request_close(&buf) else {
            return;
        };
        if host::edit(BufferType::DownstreamData, &edit) {
            let mut c = self.conn.borrow_mut();
            (c.close_pending, c.probe) = (false, false);
            drop(c);
            self.plugin.metrics.requests_closed.inc();
            debug!("added connection: close to the next request");
        }
    }
}

/// The kubelet's preStop hook is on this connection (it opens one per hook): the HTTP role
/// learns it from the published address, which it reads for every request anyway, so
/// recognising the hook costs the other connections nothing.
fn announce_hook(handle: Option<&mut Handle>, conn: &ConnRef) {
    // The host's clock, not the tick's: a census record dated after it surely counts every
    // connection opened before the hook.
    conn.borrow_mut().hook_since = Some(host::now_ms());
    if let Some(handle) = handle {
        handle.hook = true;
        if let Err(e) = host::set_property(keys::ADDRESS_PROPERTY, handle.published().as_bytes()) {
            warn!("close-relay: cannot mark the preStop hook's connection: {e:?}");
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
        if let Some(handle) = self.handle.take() {
            conn::unregister(&handle.text);
        }
    }
}

impl StreamContext for NetworkRole {
    /// The connection is closing (either side, or Envoy): mark it done, so that nothing closes
    /// it again (why that matters: [`conn::close`]).
    fn on_downstream_close(&mut self, _peer: PeerType) {
        self.conn.borrow_mut().closing = true;
    }

    fn on_upstream_close(&mut self, _peer: PeerType) {
        self.conn.borrow_mut().closing = true;
    }

    fn on_new_connection(&mut self) -> Action {
        if self.plugin.active().is_none() {
            return Action::Continue;
        }
        if let Some(max_head) = self.plugin.active().filter(|c| c.lean).map(Config::max_head) {
            self.handle = Some(lean::start(&self.conn, max_head));
            return Action::Continue;
        }
        let Some(nonce) = host::nonce() else {
            if !WARNED_NO_NONCE.replace(true) {
                warn!("close-relay: the host gives no random value for this connection's marker; not relayed");
            }
            return Action::Continue;
        };
        let handle = Handle::new(queue::own_queue().unwrap_or(0), &nonce);
        if let Err(e) = host::set_property(keys::ADDRESS_PROPERTY, handle.text.as_bytes()) {
            warn!("close-relay: cannot announce the network role on this connection: {e:?}");
            return Action::Continue;
        }
        self.conn.borrow_mut().activity.last_ms = host::coarse_now();
        conn::register(&handle.text, &self.conn);
        self.handle = Some(handle);
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.plugin.active() else { return Action::Continue };
        let (close_pending, undecided, starts_request) = {
            let mut c = self.conn.borrow_mut();
            let starts_request = !c.activity.saw_request || c.activity.last_was_response;
            // More bytes behind a probed request (a body, a pipelined request): its answer no
            // longer tells anything.
            c.probe = false;
            c.activity.read(host::coarse_now());
            if let Some(responses) = c.responses.as_mut() {
                responses.request_ends_an_answer_to_head();
            }
            (c.close_pending, c.activity.http1.is_none(), starts_request)
        };
        if config.lean {
            lean::in_flight(&self.conn, &self.plugin);
        }
        let mut first = None;
        if undecided && size > 0 {
            // Once per connection: the sweep closes only connections that speak HTTP/1.
            let read = host::get_buffer(BufferType::DownstreamData, size.min(http1::FIRST_READ)).unwrap_or_default();
            let first = first.insert(read);
            #[cfg(feature = "fault-injection")]
            if first.starts_with(b"TRAP ") {
                std::process::abort();
            }
            let http1 = wire::starts_http1_request(first);
            let mut c = self.conn.borrow_mut();
            c.activity.http1 = http1;
            if http1 == Some(false) && crate::h2::may_be_preface(first) {
                c.h2 = Some(crate::h2::Connection::new());
            }
            drop(c);
            if http1 == Some(true) && !config.lean && wire::head_has_header(first, keys::PRESTOP_HEADER.as_bytes()) {
                announce_hook(self.handle.as_mut(), &self.conn);
            }
        }
        if self.conn.borrow().h2.is_some() {
            self.follow_h2(BufferType::DownstreamData, size);
        }
        if starts_request && size <= http1::FIRST_READ && self.conn.borrow().activity.http1 == Some(true) {
            probe::arm(&self.conn, config, size, first);
        }
        if close_pending && size > 0 && config.close_connection && !self.conn.borrow().sweepable() {
            self.close_on_next_request(size);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.plugin.active().filter(|_| self.handle.is_some()) else {
            return Action::Continue;
        };
        let (marked, http_role_here, probe) = {
            let mut c = self.conn.borrow_mut();
            c.activity.wrote(size, host::coarse_now());
            (c.head_pending, c.http_role_here, c.probe)
        };
        if probe && !config.lean {
            probe::answer(&self.conn, &self.plugin, size);
        }
        if self.conn.borrow().h2.is_some() {
            self.follow_h2(BufferType::UpstreamData, size);
            return Action::Continue;
        }
        if config.lean {
            lean::follow_responses(&self.conn, &self.plugin, size);
        } else if marked {
            self.rewrite_marked_head(size, config.max_head());
        } else if !http_role_here && size >= http1::STATUS_LINE_START.len() {
            self.rewrite_head(size, config.max_head());
        }
        Action::Continue
    }
}
