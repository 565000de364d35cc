//! How an HTTP role reaches its connection's network role when the two run in different VMs
//! (different `vm_id`s, or, from Envoy 1.39, different VM environments, as istiod writes them for
//! `file://` modules). Nothing in the host lets one VM call into another, but a shared queue
//! does: any VM may enqueue on a token, and the VM that registered it is called back
//! (`on_queue_ready`) on its own worker, on the next dispatcher turn.
//!
//! So the network role publishes its connection as an [`Address`]: its VM's queue token and a
//! per-connection nonce, in the connection's filter state. An HTTP role that does not find the
//! nonce in its own VM sends [`Note`]s on that token: a request began, a request ended (and
//! whether the connection must close now), a drain source turned on. Pure codecs here; the
//! sending and applying live in `http.rs` and `root.rs`.

use crate::drain::Source;

/// A client connection as the network role publishes it: `<token, 8 hex><nonce, 16 hex>`.
/// The whole string is also the marker's value, so the nonce keeps it unguessable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The network VM's queue; 0 when it has none (the HTTP role then cannot reach it).
    pub token: u32,
    pub text: String,
}

const TOKEN_HEX: usize = 8;

impl Address {
    pub fn new(token: u32, nonce: &str) -> Address {
        Address { token, text: format!("{token:08x}{nonce}") }
    }

    /// Whatever the filter state holds; a value without a token reads as token 0.
    pub fn parse(text: String) -> Address {
        let token = text
            .get(..TOKEN_HEX)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .unwrap_or(0);
        Address { token, text }
    }
}

/// What travels on a network VM's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Look now: a drain began somewhere (`pod::wake_all`), or this VM's own HTTP role asked.
    Wake,
    /// A request began on the connection (`text` of its [`Address`]).
    Begin(String),
    /// A request ended, its response written. `begun`: its [`Note::Begin`] was sent (only with
    /// drain awareness on). `close`: the response relayed a close; close the connection now.
    End { conn: String, begun: bool, close: bool },
    /// A drain source turned on in the HTTP role's VM, until `until` (ms since the epoch). With
    /// different `vm_id`s the two VMs keep separate shared data, so the network VM would not
    /// see it otherwise.
    Enter { source: Source, until: u64 },
}

const WAKE: u8 = b'w';
const BEGIN: u8 = b'b';
const END: u8 = b'e';
const ENTER: u8 = b'd';
const BEGUN: u8 = 1;
const CLOSE: u8 = 2;

impl Note {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Note::Wake => out.push(WAKE),
            Note::Begin(conn) => {
                out.push(BEGIN);
                out.extend_from_slice(conn.as_bytes());
            }
            Note::End { conn, begun, close } => {
                out.push(END);
                out.push(if *begun { BEGUN } else { 0 } | if *close { CLOSE } else { 0 });
                out.extend_from_slice(conn.as_bytes());
            }
            Note::Enter { source, until } => {
                out.push(ENTER);
                out.push(source.index() as u8);
                out.extend_from_slice(&until.to_le_bytes());
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
            END => {
                let (&flags, conn) = rest.split_first()?;
                let conn = text(conn)?;
                Some(Note::End { conn, begun: flags & BEGUN != 0, close: flags & CLOSE != 0 })
            }
            ENTER => {
                let (&index, until) = rest.split_first()?;
                let source = *Source::ALL.get(usize::from(index))?;
                let until = u64::from_le_bytes(until.try_into().ok()?);
                Some(Note::Enter { source, until })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_carries_its_token_and_stays_unique_per_nonce() {
        let a = Address::new(0x2a, "00ff00ff00ff00ff");
        assert_eq!(a.text, "0000002a00ff00ff00ff00ff");
        assert_eq!(Address::parse(a.text.clone()), a);
        assert_eq!(Address::parse("short".into()).token, 0);
        assert_eq!(Address::parse("zzzzzzzz00ff".into()).token, 0, "not hex");
        assert_eq!(Address::parse(String::new()).token, 0);
    }

    #[test]
    fn notes_round_trip() {
        let conn = "0000002a00ff00ff00ff00ff".to_string();
        let notes = [
            Note::Wake,
            Note::Begin(conn.clone()),
            Note::End { conn: conn.clone(), begun: true, close: false },
            Note::End { conn: conn.clone(), begun: false, close: true },
            Note::End { conn, begun: true, close: true },
            Note::Enter { source: Source::AppFailure, until: u64::MAX },
            Note::Enter { source: Source::AppReadiness, until: 1_700_000_000_123 },
        ];
        for note in notes {
            assert_eq!(Note::decode(&note.encode()), Some(note));
        }
    }

    #[test]
    fn foreign_or_truncated_items_are_ignored() {
        for bad in [&b""[..], b"x", b"wextra", b"e", b"d", b"d\x09\0\0\0\0\0\0\0\0", b"d\x01\0\0", b"b\xff"] {
            assert_eq!(Note::decode(bad), None, "{bad:?}");
        }
    }
}
