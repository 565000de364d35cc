//! HTTP/2 as the network role sees it: the frames Envoy writes to a
//! client connection, followed from their 9-byte headers alone (payloads are passed over unread,
//! HPACK never touched), so that a graceful GOAWAY can be added at a frame boundary at the end of
//! a write, and a connection with no stream open can be told from a busy one.
//!
//! Why at the end of a write: a proxy-wasm network filter changes bytes only inside a write Envoy
//! makes (`proxy_set_buffer_bytes` with a start at the buffer's length appends to it, Envoy's
//! `Buffer::copyFrom`), and no call writes to a quiet connection. Why a frame boundary outside a
//! header block: RFC 9113 §6.10 forbids any frame between HEADERS (or PUSH_PROMISE) without
//! END_HEADERS and its last CONTINUATION. Why last-stream-id 2^31-1 and NO_ERROR: RFC 9113 §6.8's
//! first step of a graceful shutdown; a lower id would make the client retry elsewhere streams
//! that Envoy is still running, and Envoy's own later GOAWAY may only lower it, which it does.

use crate::follow::Follower;

/// The frame header's length.
pub const FRAME_HEADER: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Frames larger than this are no frame Envoy writes (its SETTINGS_MAX_FRAME_SIZE is 16 KiB by
/// default, 2^24-1 at most): the bytes cannot be followed.
const MAX_FRAME: u32 = (1 << 24) - 1;

/// Streams followed at most; a connection with more open at once is lost (kept, never told).
const MAX_STREAMS: usize = 1024;

/// What a client with prior knowledge sends first (RFC 9113 §3.4), before its SETTINGS.
pub const CLIENT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection's first bytes may be an h2c client's: they agree with the preface as
/// far as either goes (a first read may hold less than the whole preface).
pub fn may_be_preface(first: &[u8]) -> bool {
    let n = first.len().min(CLIENT_PREFACE.len());
    first.get(..n) == CLIENT_PREFACE.get(..n)
}

/// Which way the frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's: the preface, then frames; its HEADERS open streams.
    Client,
    /// Envoy's to the client: its END_STREAM or RST_STREAM ends a stream.
    Server,
}

/// A graceful GOAWAY: last-stream-id 2^31-1, NO_ERROR, no debug data.
pub const GRACEFUL_GOAWAY: [u8; 17] = [0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0];

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// At a frame boundary.
    Between,
    /// Some of a frame header, in `head`.
    Header,
    /// Payload bytes left of the current frame.
    Payload(u32),
    /// Bytes that cannot be followed: nothing is ever added to this connection.
    Lost,
}

/// The frames one side writes on a client connection, and the streams under way on it (a stream
/// the client opened whose response has not ended); the two sides share the stream set.
#[derive(Debug, Clone)]
pub struct Frames {
    side: Side,
    /// Client side: bytes of the preface still to come.
    preface_left: usize,
    state: State,
    head: Vec<u8>,
    /// Inside a header block: HEADERS or PUSH_PROMISE without END_HEADERS, until the
    /// CONTINUATION that ends it.
    in_header_block: bool,
    /// Envoy sent a GOAWAY of its own (or we did): none is added again.
    goaway_sent: bool,
}

/// One connection's HTTP/2: both sides' frames and the streams under way.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: Frames,
    pub server: Frames,
    /// Streams the client opened whose response has not ended.
    open: Vec<u32>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

impl Connection {
    pub fn new() -> Connection {
        Connection { client: Frames::new(Side::Client), server: Frames::new(Side::Server), open: Vec::new() }
    }

    /// Follows what the client sent.
    pub fn read(&mut self, bytes: &[u8]) {
        let events = self.client.follow(bytes);
        self.apply(&events);
    }

    /// Follows what Envoy wrote.
    pub fn wrote(&mut self, bytes: &[u8]) {
        let events = self.server.follow(bytes);
        self.apply(&events);
    }

    pub fn lost(&self) -> bool {
        self.client.lost() || self.server.lost()
    }

    /// No stream under way, both sides between frames: the connection may be closed as idle.
    pub fn quiet(&self) -> bool {
        !self.lost() && self.open.is_empty() && self.client.at_boundary() && self.server.at_boundary()
    }

    /// A graceful GOAWAY may be added after what Envoy wrote so far, and none was sent yet.
    pub fn may_tell(&self) -> bool {
        !self.lost() && self.server.at_boundary() && !self.server.goaway_sent()
    }

    pub fn open_streams(&self) -> usize {
        self.open.len()
    }

    pub(crate) fn apply(&mut self, events: &[Event]) {
        for event in events {
            match *event {
                Event::Opened(id) if !self.open.contains(&id) => {
                    if self.open.len() >= MAX_STREAMS {
                        self.client.lose();
                        return;
                    }
                    self.open.push(id);
                }
                Event::Ended(id) => self.open.retain(|s| *s != id),
                Event::Opened(_) => {}
            }
        }
    }
}

/// What one frame says about the streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Opened(u32),
    Ended(u32),
}

impl Frames {
    pub fn new(side: Side) -> Frames {
        let preface_left = if side == Side::Client { CLIENT_PREFACE.len() } else { 0 };
        Frames { side, preface_left, state: State::Between, head: Vec::with_capacity(FRAME_HEADER), in_header_block: false, goaway_sent: false }
    }

    pub fn lost(&self) -> bool {
        self.state == State::Lost
    }

    /// Whether a GOAWAY may be added right after the bytes followed so far.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Between && !self.in_header_block
    }

    pub fn goaway_sent(&self) -> bool {
        self.goaway_sent
    }

    /// Records that a GOAWAY was added after the bytes followed so far.
    pub fn goaway_added(&mut self) {
        self.goaway_sent = true;
    }

    fn frame(&mut self, h: [u8; FRAME_HEADER]) -> Option<Event> {
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        // Inside a header block only its CONTINUATIONs may come.
        if len > MAX_FRAME || self.in_header_block != (kind == CONTINUATION) {
            self.lose();
            return None;
        }
        match kind {
            HEADERS | PUSH_PROMISE | CONTINUATION => self.in_header_block = flags & END_HEADERS == 0,
            GOAWAY => self.goaway_sent = true,
            _ => {}
        }
        self.state = if len == 0 { State::Between } else { State::Payload(len) };
        let server_ends = matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0;
        match (self.side, kind) {
            (Side::Client, HEADERS) if stream != 0 => Some(Event::Opened(stream)),
            (_, RST_STREAM) => Some(Event::Ended(stream)),
            (Side::Server, _) if server_ends => Some(Event::Ended(stream)),
            _ => None,
        }
    }
}

impl Follower for Frames {
    type Found = Event;

    /// How many bytes at the current position must be read to go on: a frame header's rest, or
    /// `None` when the next ones are payload and can be passed over unread ([`Follower::skip`]).
    fn wants(&self) -> Option<usize> {
        if self.preface_left > 0 && self.state != State::Lost {
            return Some(self.preface_left);
        }
        match self.state {
            State::Between => Some(FRAME_HEADER),
            State::Header => Some(FRAME_HEADER.saturating_sub(self.head.len())),
            State::Payload(_) | State::Lost => None,
        }
    }

    /// Passes over up to `n` payload bytes; returns how many.
    fn skip(&mut self, n: usize) -> usize {
        match self.state {
            State::Payload(left) => {
                let take = u32::try_from(n).unwrap_or(u32::MAX).min(left);
                let rest = left.saturating_sub(take);
                self.state = if rest == 0 { State::Between } else { State::Payload(rest) };
                usize::try_from(take).unwrap_or(n)
            }
            State::Lost => n,
            _ => 0,
        }
    }

    /// Feeds bytes read at the current position (at most what [`Follower::wants`] asked): the
    /// preface's, or a frame header's. Returns how many were used, and what the frame said.
    fn look(&mut self, bytes: &[u8]) -> (usize, Option<Event>) {
        let want = match self.wants() {
            Some(want) => want.min(bytes.len()),
            None => return (0, None),
        };
        if self.preface_left > 0 {
            let at = CLIENT_PREFACE.len().saturating_sub(self.preface_left);
            if CLIENT_PREFACE.get(at..at.saturating_add(want)) != Some(&bytes[..want]) {
                self.lose();
                return (want, None);
            }
            self.preface_left = self.preface_left.saturating_sub(want);
            return (want, None);
        }
        self.head.extend_from_slice(&bytes[..want]);
        if self.head.len() < FRAME_HEADER {
            self.state = State::Header;
            return (want, None);
        }
        let mut h = [0u8; FRAME_HEADER];
        h.copy_from_slice(&self.head[..FRAME_HEADER]);
        self.head.clear();
        (want, self.frame(h))
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.head = Vec::new();
    }
}

#[cfg(test)]
#[path = "h2_tests.rs"]
mod tests;
