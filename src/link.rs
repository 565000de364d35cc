//! How an HTTP role reaches its connection's network role when the two run in different VMs
//! (different `vm_id`s, or, from Envoy 1.39, different VM environments, as istiod writes them for
//! `file://` modules). Nothing in the host lets one VM call into another, but a shared queue
//! does: any VM may enqueue on a token, and the VM that registered it is called back
//! (`on_queue_ready`) on its own worker, on the next dispatcher turn.
//!
//! So the network role publishes a [`Handle`] on its connection: its VM's queue token and a
//! per-connection nonce, in the connection's filter state. An HTTP role that does not find the
//! nonce in its own VM sends [`Note`]s on that token: a request began, a request ended, a drain
//! source turned on. Once a response has told the client to close, the network role publishes
//! the address again with [`CLOSING`] after it, so the HTTP role of a request the client had
//! already sent behind that response closes it too, from any VM. Pure codecs here; the sending
//! lives in [`crate::queue::send`], the applying in [`crate::conn::hear`].

use crate::drain::Source;

/// A handle on one client connection, as the network role publishes it in the connection's
/// filter state (`close_relay_address`, a name kept for VMs of other versions): `<token, 8 hex><nonce, 16 hex>`, then
/// [`CLOSING`] once a response told the client to close. The text without it is also the
/// marker's value, so the nonce keeps it unguessable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The network VM's queue; 0 when it has none (the HTTP role then cannot reach it).
    pub token: u32,
    pub text: String,
    /// A response on this connection already told the client to close.
    pub closing: bool,
    /// The connection's first request names the preStop hook's header (`drain.prestop`).
    pub hook: bool,
}

const TOKEN_HEX: usize = 8;

/// What the network role appends to a published address once the connection is closing.
pub const CLOSING: char = '!';
/// What it appends (before [`CLOSING`]) when the connection carries the preStop hook.
pub const HOOK: char = '?';

impl Handle {
    pub fn new(token: u32, nonce: &str) -> Handle {
        Handle { token, text: format!("{token:08x}{nonce}"), closing: false, hook: false }
    }

    /// Whatever the filter state holds; a value without a token reads as token 0.
    pub fn parse(mut text: String) -> Handle {
        let closing = text.ends_with(CLOSING);
        if closing {
            text.pop();
        }
        let hook = text.ends_with(HOOK);
        if hook {
            text.pop();
        }
        let token = text
            .get(..TOKEN_HEX)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .unwrap_or(0);
        Handle { token, text, closing, hook }
    }

    /// What the network role publishes for this connection.
    pub fn published(&self) -> String {
        let mut out = self.text.clone();
        if self.hook {
            out.push(HOOK);
        }
        if self.closing {
            out.push(CLOSING);
        }
        out
    }
}

/// What travels on a network VM's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Look now: a drain began somewhere (`queue::wake_all`), or this VM's own HTTP role asked.
    Wake,
    /// A request began on the connection (`text` of its [`Handle`]).
    Begin(String),
    /// A request ended, its response written; its [`Note::Begin`] was sent.
    End(String),
    /// A drain source turned on in the HTTP role's VM, until `until` (ms since the epoch). With
    /// different `vm_id`s the two VMs keep separate shared data, so the network VM would not
    /// see it otherwise.
    Enter { source: Source, until: u64 },
    /// A drain source the HTTP role's VM turned off: a single reset the app then disproved by
    /// answering ([`crate::podwide::single_reset_allowed`]).
    Clear(Source),
}

const WAKE: u8 = b'w';
const BEGIN: u8 = b'b';
const END: u8 = b'e';
const ENTER: u8 = b'd';
const CLEAR: u8 = b'c';
const BEGUN: u8 = 1;

impl Note {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Note::Wake => out.push(WAKE),
            Note::Begin(conn) => {
                out.push(BEGIN);
                out.extend_from_slice(conn.as_bytes());
            }
            Note::End(conn) => {
                // The flag byte stays for VMs of other versions, which read it.
                out.extend([END, BEGUN]);
                out.extend_from_slice(conn.as_bytes());
            }
            Note::Enter { source, until } => {
                out.push(ENTER);
                out.push(source.index() as u8);
                out.extend_from_slice(&until.to_le_bytes());
            }
            Note::Clear(source) => {
                out.push(CLEAR);
                out.push(source.index() as u8);
            }
        }
        out
    }

    /// `None` for anything this version did not write: an old VM's item is ignored, not misread.
    pub fn decode(bytes: &[u8]) -> Option<Note> {
        let (&op, rest) = bytes.split_first()?;
        let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
        match op {
            WAKE if rest.is_empty() => Some(Note::Wake),
            BEGIN => text(rest).map(Note::Begin),
            // An end whose begin was never sent (an older version's) changes nothing: ignored.
            END => match rest.split_first()? {
                (&flags, conn) if flags & BEGUN != 0 => text(conn).map(Note::End),
                _ => None,
            },
            ENTER => {
                let (&index, until) = rest.split_first()?;
                let source = *Source::ALL.get(usize::from(index))?;
                let until = u64::from_le_bytes(until.try_into().ok()?);
                Some(Note::Enter { source, until })
            }
            CLEAR => match rest {
                [index] => Source::ALL.get(usize::from(*index)).map(|s| Note::Clear(*s)),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
