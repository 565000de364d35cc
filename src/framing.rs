//! Where each response written to the client ends, told from the bytes themselves: what the
//! network role knows when it works alone (`lean`), with no HTTP role to count the requests in
//! flight. Pure: the role reads only the bytes [`Responses::wants`] asks for, at the write's
//! current position, and passes over bodies by their length without reading them. Header
//! values are bytes: obs-text (bytes past ASCII) says nothing about framing.
//!
//! Envoy writes every response to an HTTP/1.1 client itself, so the framing is its own: a
//! `content-length`, `chunked` with its own chunk lines, no body (1xx, 204, 304), or, for an
//! HTTP/1.0 client, the connection's end. Anything this reader cannot follow makes the connection
//! [`Responses::lost`]: in flight for good, never closed as idle, as a plain Envoy would keep it.
//!
//! Requests are not read: Envoy's HTTP/1 codec takes one at a time, and presents the bytes of
//! one the client pipelined behind another to the network filters again once the answer before
//! it is written, so a request read after the last answer is one waiting for its own
//! (`lean.rs`, `in_flight`).

use crate::decision;
use crate::http1::{self, find, CLOSE_LINE, RESPONSE_START};
use crate::follow::Follower;

/// Later reads of a head larger than the first.
const HEAD_MORE: usize = 16 * 1024;
/// Envoy's chunk lines are a hex length and CRLF; a trailer line may be longer.
const LINE_READ: usize = 32;
const LINE_MAX: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No response under way: the next byte starts a head.
    Between,
    /// A head begun and not yet whole (its bytes so far in `carry`).
    Head,
    /// Body bytes left (`content-length`).
    Body(u64),
    /// A chunk-size line (its bytes so far in `carry`).
    ChunkLine,
    /// Chunk data and the CRLF after it, bytes left.
    ChunkData(u64),
    /// The trailer section after the last chunk, until its empty line.
    Trailers,
    /// The response ends with the connection (close-delimited), or the connection is no longer
    /// HTTP (`101 Switching Protocols`).
    Open,
    /// Bytes this reader could not follow.
    Lost,
}

/// A response head that ended in the bytes just fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSeen {
    /// The head's length, blank line included.
    pub len: usize,
    /// The whole head is at the start of the bytes fed (none of it came in an earlier read).
    pub whole_here: bool,
    /// It already says `connection: close` (Envoy's own decision: it closes the connection).
    pub says_close: bool,
    /// A final response (not 1xx).
    pub is_final: bool,
    pub status: u16,
    /// Rescue's marks on it: another pod answered (`x-envoy-attempt-count` 2 or more), or the
    /// app refused and no pod could answer ([`crate::decision::REFUSED_HEADER`]).
    pub rescued: bool,
    pub refused: bool,
    /// It carries `x-envoy-attempt-count` at all: the route it came by is rescue's.
    pub attempt_counted: bool,
    /// It carries `x-envoy-upstream-service-time`, which Envoy's router sets on an answer that
    /// came from the app and never on its own local reply: whatever its body says, it is the
    /// app's (or something behind it).
    pub from_upstream: bool,
}

/// What one [`Responses::feed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input consumed; the rest is fed again from the new position.
    pub used: usize,
    pub head: Option<HeadSeen>,
}

/// The responses on one client connection, as Envoy writes them.
#[derive(Debug, Clone)]
pub struct Responses {
    state: State,
    /// A head or line that spans reads.
    carry: Vec<u8>,
    /// Some of the current response's body went out (a HEAD's answer never has any).
    body_started: bool,
    max_head: usize,
}

impl Responses {
    pub fn new(max_head: usize) -> Responses {
        Responses { state: State::Between, carry: Vec::new(), body_started: false, max_head }
    }

    /// A response is under way (or the connection cannot be followed): it must not be closed.
    pub fn in_flight(&self) -> bool {
        self.state != State::Between
    }

    pub fn lost(&self) -> bool {
        self.state == State::Lost
    }

    /// The client sent bytes: a guess that the answer under way was to HEAD, when its head
    /// announced a body and none of it went out yet; its exchange is then over. (Were it a
    /// pipelined request instead, the body that follows would not start a head, and the
    /// connection is [`lost`]: kept, and counted.)
    ///
    /// [`lost`]: Responses::lost
    pub fn request_ends_an_answer_to_head(&mut self) {
        if !self.body_started && matches!(self.state, State::Body(_) | State::ChunkLine) {
            self.state = State::Between;
        }
    }

    /// Feeds the bytes read at the current position (at most what [`Follower::wants`] asked).
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        let held = self.carry.len();
        match self.state {
            State::Between | State::Head => self.feed_head(bytes, held),
            State::ChunkLine => self.feed_chunk_line(bytes, held),
            State::Trailers => self.feed_trailers(bytes, held),
            _ => Fed { used: 0, head: None },
        }
    }

    fn feed_head(&mut self, bytes: &[u8], held: usize) -> Fed {
        if held == 0 && !RESPONSE_START.starts_with(&bytes[..bytes.len().min(RESPONSE_START.len())]) {
            self.lose();
            return Fed { used: bytes.len(), head: None };
        }
        self.carry.extend_from_slice(bytes);
        let from = held.saturating_sub(3);
        let Some(end) = find(&self.carry[from..], b"\r\n\r\n").map(|i| from.saturating_add(i).saturating_add(4)) else {
            if self.carry.len() >= self.max_head {
                self.lose();
            } else {
                self.state = State::Head;
            }
            return Fed { used: bytes.len(), head: None };
        };
        let Some(h) = parse_head(&self.carry[..end]) else {
            self.lose();
            return Fed { used: end.saturating_sub(held), head: None };
        };
        // A marker is this pod's only on Envoy's own reply (no `x-envoy-upstream-service-time`)
        // or on the answer of a pod a retry reached; on the app's answer it is passed on.
        let refused = h.refused && (!h.from_upstream || decision::rescued(h.attempt_count, false));
        let seen = HeadSeen {
            len: end,
            whole_here: held == 0,
            says_close: h.says_close,
            is_final: h.is_final,
            status: h.status,
            rescued: decision::rescued(h.attempt_count, refused),
            refused,
            attempt_counted: h.attempt_count.is_some(),
            from_upstream: h.from_upstream,
        };
        let next = h.next;
        self.carry.clear();
        self.body_started = false;
        self.state = next;
        Fed { used: end.saturating_sub(held), head: Some(seen) }
    }

    /// One line ends in `carry`: its end, or `None` (more to read, or lost when too long).
    fn line(&mut self, bytes: &[u8], held: usize) -> Option<usize> {
        self.carry.extend_from_slice(bytes);
        let from = held.saturating_sub(1);
        let end = find(&self.carry[from..], b"\r\n").map(|i| from.saturating_add(i).saturating_add(2));
        if end.is_none() && self.carry.len() > LINE_MAX {
            self.lose();
        }
        end
    }

    fn feed_chunk_line(&mut self, bytes: &[u8], held: usize) -> Fed {
        let Some(end) = self.line(bytes, held) else { return Fed { used: bytes.len(), head: None } };
        let size = chunk_size(&self.carry[..end.saturating_sub(2)]);
        self.carry.clear();
        self.state = match size {
            None => State::Lost,
            Some(0) => State::Trailers,
            // The data, then its CRLF.
            Some(n) => State::ChunkData(n.saturating_add(2)),
        };
        Fed { used: end.saturating_sub(held), head: None }
    }

    fn feed_trailers(&mut self, bytes: &[u8], held: usize) -> Fed {
        let Some(end) = self.line(bytes, held) else { return Fed { used: bytes.len(), head: None } };
        self.carry.clear();
        if end == 2 {
            self.state = State::Between;
        }
        Fed { used: end.saturating_sub(held), head: None }
    }
}

impl Follower for Responses {
    type Found = HeadSeen;

    /// How many bytes at the current position must be read to go on, or `None` when the next
    /// ones can be passed over unread ([`Follower::skip`]).
    fn wants(&self) -> Option<usize> {
        match self.state {
            State::Between => Some(http1::FIRST_READ),
            State::Head => Some(HEAD_MORE.min(self.max_head.saturating_sub(self.carry.len())).max(1)),
            State::ChunkLine | State::Trailers => Some(LINE_READ),
            State::Body(_) | State::ChunkData(_) | State::Open | State::Lost => None,
        }
    }

    /// Passes over up to `n` bytes unread; returns how many (0 when they must be read).
    fn skip(&mut self, n: usize) -> usize {
        let n64 = n as u64;
        match self.state {
            State::Body(left) | State::ChunkData(left) => {
                let take = left.min(n64);
                self.body_started = true;
                let rest = left.saturating_sub(take);
                self.state = match (self.state, rest) {
                    (State::Body(_), 0) => State::Between,
                    (State::Body(_), _) => State::Body(rest),
                    (_, 0) => State::ChunkLine,
                    (_, _) => State::ChunkData(rest),
                };
                // `take` <= `n`, which is a usize.
                usize::try_from(take).unwrap_or(n)
            }
            State::Open | State::Lost => n,
            _ => 0,
        }
    }

    /// [`Responses::feed`], as a follower: the head that ended in these bytes, if one did.
    fn look(&mut self, bytes: &[u8]) -> (usize, Option<HeadSeen>) {
        let fed = self.feed(bytes);
        (fed.used, fed.head)
    }

    /// The connection's bytes can no longer be followed.
    fn lose(&mut self) {
        self.state = State::Lost;
        self.carry = Vec::new();
    }
}


/// The response head whole at the start of `buf`, if there is one (the network role's probes
/// read one head, apart from any connection's responses).
pub fn head_at_start(buf: &[u8]) -> Option<HeadSeen> {
    Responses::new(buf.len().max(1)).feed(buf).head
}

#[derive(Debug, Clone, Copy)]
struct Head<'a> {
    next: State,
    says_close: bool,
    is_final: bool,
    status: u16,
    attempt_count: Option<&'a str>,
    refused: bool,
    from_upstream: bool,
}

type Field<'a> = http1::Field<'a>;

/// What a head's framing fields say: its length (`None`: none given, `Err`: two that differ) and
/// whether its last transfer coding is chunked (`Some(false)`: a coding, not chunked).
fn framing_fields(fields: &[Field<'_>]) -> Option<(Option<u64>, Option<bool>)> {
    let (mut length, mut chunked) = (None::<u64>, None);
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = Some(http1::chunked(value));
        }
    }
    Some((length, chunked))
}

/// A whole response head: what follows it, and whether it says close.
fn parse_head(head: &[u8]) -> Option<Head<'_>> {
    let (status, fields) = http1::response_head(head)?;
    let (length, chunked) = framing_fields(&fields)?;
    let (mut attempt_count, mut refused, mut from_upstream, mut says_close) = (None, false, false, false);
    for (name, value) in &fields {
        if name.eq_ignore_ascii_case(b"connection") {
            says_close |= http1::has_token(value, b"close");
        } else if name.eq_ignore_ascii_case(b"x-envoy-attempt-count") {
            attempt_count = std::str::from_utf8(value).ok();
        } else if name.eq_ignore_ascii_case(decision::REFUSED_HEADER.as_bytes()) {
            refused = true;
        } else if name.eq_ignore_ascii_case(b"x-envoy-upstream-service-time") {
            from_upstream = true;
        }
    }
    let next = match status {
        101 => State::Open,
        100..=199 | 204 | 304 => State::Between,
        _ if chunked == Some(true) => State::ChunkLine,
        _ => match length {
            Some(0) => State::Between,
            Some(n) => State::Body(n),
            None => State::Open,
        },
    };
    Some(Head { next, says_close, is_final: status >= 200, status, attempt_count, refused, from_upstream })
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The same bytes with `connection: close` before the blank line that ends `head`.
pub fn with_close(head: &[u8]) -> Vec<u8> {
    let fields_end = head.len().saturating_sub(2);
    let mut out = Vec::with_capacity(head.len().saturating_add(CLOSE_LINE.len()));
    out.extend_from_slice(&head[..fields_end]);
    out.extend_from_slice(CLOSE_LINE);
    out.extend_from_slice(&head[fields_end..]);
    out
}

#[cfg(test)]
#[path = "framing_tests.rs"]
mod tests;
