//! HTTP/2 as the network role sees it (issue 35, work in progress): the frames Envoy writes to a
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

/// The frames Envoy writes on one client connection.
#[derive(Debug, Clone)]
pub struct Frames {
    state: State,
    head: Vec<u8>,
    /// Inside a header block: HEADERS or PUSH_PROMISE without END_HEADERS, until the
    /// CONTINUATION that ends it.
    in_header_block: bool,
    /// Envoy sent a GOAWAY of its own (or we did): none is added again.
    goaway_sent: bool,
    /// Streams whose response has not ended, as the server's frames show them (a stream the
    /// client opened and Envoy has not answered yet is not here: see [`Frames::quiet`]).
    open: Vec<u32>,
}

impl Default for Frames {
    fn default() -> Self {
        Frames::new()
    }
}

impl Frames {
    pub fn new() -> Frames {
        Frames { state: State::Between, head: Vec::with_capacity(FRAME_HEADER), in_header_block: false, goaway_sent: false, open: Vec::new() }
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

    /// No response under way on any stream, as far as Envoy's frames show.
    pub fn quiet(&self) -> bool {
        self.at_boundary() && self.open.is_empty()
    }

    /// How many bytes at the current position must be read to go on: a frame header's rest, or
    /// `None` when the next ones are payload and can be passed over unread ([`Frames::skip`]).
    pub fn wants(&self) -> Option<usize> {
        match self.state {
            State::Between => Some(FRAME_HEADER),
            State::Header => Some(FRAME_HEADER.saturating_sub(self.head.len())),
            State::Payload(_) | State::Lost => None,
        }
    }

    /// Passes over up to `n` payload bytes; returns how many.
    pub fn skip(&mut self, n: usize) -> usize {
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

    /// Feeds header bytes read at the current position (at most what [`Frames::wants`] asked);
    /// returns how many were used.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let want = match self.wants() {
            Some(want) => want.min(bytes.len()),
            None => return 0,
        };
        self.head.extend_from_slice(&bytes[..want]);
        if self.head.len() < FRAME_HEADER {
            self.state = State::Header;
            return want;
        }
        let mut h = [0u8; FRAME_HEADER];
        h.copy_from_slice(&self.head[..FRAME_HEADER]);
        self.head.clear();
        self.frame(h);
        want
    }

    /// Follows bytes held whole in memory, as the network role does with buffer reads. For tests
    /// and fuzzing.
    pub fn follow(&mut self, write: &[u8]) {
        let mut pos = 0;
        while pos < write.len() {
            let step = match self.wants() {
                None => self.skip(write.len().saturating_sub(pos)),
                Some(_) => self.feed(&write[pos..]),
            };
            if step == 0 {
                self.lose();
                return;
            }
            pos = pos.saturating_add(step);
        }
    }

    pub fn lose(&mut self) {
        self.state = State::Lost;
        self.head = Vec::new();
        self.open = Vec::new();
    }

    /// Records that a GOAWAY was added after the bytes followed so far.
    pub fn goaway_added(&mut self) {
        self.goaway_sent = true;
    }

    fn frame(&mut self, h: [u8; FRAME_HEADER]) {
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        if len > MAX_FRAME {
            self.lose();
            return;
        }
        // Inside a header block only its CONTINUATIONs may come.
        if self.in_header_block != (kind == CONTINUATION) {
            self.lose();
            return;
        }
        match kind {
            HEADERS | PUSH_PROMISE | CONTINUATION => self.in_header_block = flags & END_HEADERS == 0,
            GOAWAY => self.goaway_sent = true,
            _ => {}
        }
        let opens = kind == HEADERS || (kind == DATA && stream != 0);
        if opens && !self.open.contains(&stream) && flags & END_STREAM == 0 {
            if self.open.len() >= MAX_STREAMS {
                self.lose();
                return;
            }
            self.open.push(stream);
        }
        let ends = (matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0) || kind == RST_STREAM;
        if ends {
            self.open.retain(|s| *s != stream);
        }
        self.state = if len == 0 { State::Between } else { State::Payload(len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_response_stream_is_open_until_its_end_and_a_goaway_fits_only_between_frames() {
        let mut f = Frames::new();
        f.follow(&frame(0x4, 0, 0, &[0; 6])); // SETTINGS
        assert!(f.quiet());
        f.follow(&frame(HEADERS, END_HEADERS, 1, b"hpack"));
        assert!(!f.quiet() && f.at_boundary(), "stream 1's response under way");
        let data = frame(DATA, 0, 1, &[7; 100]);
        f.follow(&data[..50]);
        assert!(!f.at_boundary(), "mid-frame: nothing may be added here");
        f.follow(&data[50..]);
        assert!(f.at_boundary());
        f.follow(&frame(DATA, END_STREAM, 1, b"end"));
        assert!(f.quiet());
    }

    #[test]
    fn nothing_is_added_inside_a_header_block() {
        let mut f = Frames::new();
        f.follow(&frame(HEADERS, 0, 3, b"part"));
        assert!(!f.at_boundary(), "HEADERS without END_HEADERS: its CONTINUATION must come next");
        f.follow(&frame(CONTINUATION, END_HEADERS | END_STREAM, 3, b"rest"));
        assert!(f.at_boundary());
        let mut f = Frames::new();
        f.follow(&frame(HEADERS, 0, 3, b"part"));
        f.follow(&frame(DATA, 0, 3, b"x"));
        assert!(f.lost(), "a frame inside a header block cannot be followed");
    }

    #[test]
    fn envoys_own_goaway_and_resets_are_seen() {
        let mut f = Frames::new();
        f.follow(&frame(HEADERS, END_HEADERS, 5, b"h"));
        f.follow(&frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));
        assert!(f.quiet());
        f.follow(&frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]));
        assert!(f.goaway_sent());
        let mut g = Frames::new();
        g.follow(&GRACEFUL_GOAWAY);
        assert!(g.goaway_sent() && g.quiet(), "our own GOAWAY is a well-formed frame");
    }

    #[test]
    fn headers_split_across_writes_are_followed() {
        let mut f = Frames::new();
        let h = frame(HEADERS, END_HEADERS | END_STREAM, 7, b"hpack");
        for byte in &h {
            f.follow(std::slice::from_ref(byte));
        }
        assert!(f.quiet());
    }
}
