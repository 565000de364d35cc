//! The network role: sits before the HCM and sees the bytes Envoy writes to the client. It
//! rewrites the HTTP role's marker into `connection: close`, and when the HTTP role could not
//! close the connection itself (different VM), adds `connection: close` to the client's next
//! request so the HCM answers it with close and closes natively.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType};

use crate::wire::{self, Edit, HeadRewrite};
use crate::{host, Shared};

/// Most heads fit in one small read; only a larger head costs a second, bounded one.
const FIRST_READ: usize = 1024;
/// A request line longer than this is not worth editing.
const REQUEST_READ: usize = 8192;

thread_local! {
    /// Network contexts of this VM by connection nonce. One VM runs on one worker thread and a
    /// connection stays on its worker, so an HTTP role that finds its nonce here shares the VM.
    static CONTEXTS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// The network context serving the connection with `nonce`, if it lives in this VM.
pub fn context_for(nonce: &str) -> Option<u32> {
    CONTEXTS.with(|c| c.borrow().get(nonce).copied())
}

fn apply(buffer: BufferType, edit: &Edit) -> bool {
    let applied = host::replace_prefix(buffer, edit.len, &edit.with);
    if let Err(e) = applied {
        warn!("close-relay: could not edit {buffer:?}: {e:?}");
    }
    applied.is_ok()
}

pub struct NetworkRole {
    id: u32,
    shared: Rc<Shared>,
    nonce: Option<String>,
    /// A relayed close went out; the client's next request must end the connection.
    close_pending: bool,
}

impl NetworkRole {
    pub fn new(id: u32, shared: Rc<Shared>) -> Self {
        NetworkRole { id, shared, nonce: None, close_pending: false }
    }

    fn rewrite_head(&mut self, size: usize, nonce: &str, max_head: usize) {
        let Some(mut buf) = host::get_buffer(BufferType::UpstreamData, size.min(FIRST_READ)) else {
            return;
        };
        if !buf.starts_with(b"HTTP/1.1 ") {
            return;
        }
        if size > buf.len() && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match host::get_buffer(BufferType::UpstreamData, size.min(max_head)) {
                Some(more) => buf = more,
                None => return,
            }
        }
        let HeadRewrite::Rewritten { edit, already_close } =
            wire::rewrite_response_head(&buf, nonce, max_head)
        else {
            return;
        };
        if apply(BufferType::UpstreamData, &edit) {
            self.close_pending = true;
            self.shared.metrics.headers_rewritten.inc();
            debug!("marker rewritten to connection: close (envoy already closing: {already_close})");
        }
    }

    fn close_on_next_request(&mut self, size: usize) {
        let Some(buf) = host::get_buffer(BufferType::DownstreamData, size.min(REQUEST_READ)) else {
            return;
        };
        let Some(edit) = wire::inject_request_close(&buf) else {
            return;
        };
        if apply(BufferType::DownstreamData, &edit) {
            self.close_pending = false;
            self.shared.metrics.requests_closed.inc();
            debug!("added connection: close to the next request");
        }
    }
}

impl Context for NetworkRole {
    fn on_done(&mut self) -> bool {
        if let Some(nonce) = self.nonce.take() {
            CONTEXTS.with(|c| c.borrow_mut().remove(&nonce));
        }
        true
    }
}

impl StreamContext for NetworkRole {
    fn on_new_connection(&mut self) -> Action {
        if self.shared.active().is_none() {
            return Action::Continue;
        }
        let nonce = host::nonce();
        if let Err(e) = host::set_property(host::NONCE_PROPERTY, nonce.as_bytes()) {
            warn!("close-relay: cannot announce the network role on this connection: {e:?}");
            return Action::Continue;
        }
        CONTEXTS.with(|c| c.borrow_mut().insert(nonce.clone(), self.id));
        self.nonce = Some(nonce);
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        if self.close_pending && size > 0 && self.shared.active().is_some_and(|c| c.close_connection) {
            self.close_on_next_request(size);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let (Some(config), Some(nonce)) = (self.shared.active(), self.nonce.clone()) else {
            return Action::Continue;
        };
        if size >= 9 {
            self.rewrite_head(size, &nonce, config.max_head_bytes);
        }
        Action::Continue
    }
}
