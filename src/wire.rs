//! Byte-level edits the network role makes on the client connection. Pure functions.
//!
//! Envoy's proxy-wasm buffers only accept a replacement that starts at offset 0 (drain a
//! prefix, prepend new bytes), so every edit is expressed as "replace the first `len` bytes".

use crate::http1::{self, find, CLOSE_LINE, STATUS_LINE_START};

/// Name of the private response header the HTTP role adds and the network role rewrites.
/// Its value is the connection's address ([`crate::link::Handle`]: its VM's queue token and a secret
/// per-connection nonce), so an app cannot forge it.
pub const MARKER: &str = "x-close-relay";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// How many bytes at the start of the buffer are replaced.
    pub len: usize,
    pub with: Vec<u8>,
}

/// Who ends the connection after a response whose marker was rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// close-relay added `connection: close`: closing the connection is close-relay's job.
    Relay,
    /// The head said `connection: close` already (Envoy's drain, a request that asked for it,
    /// an answer before the request was whole): Envoy's HCM closes the connection itself, in
    /// its own way (after its delayed close), and close-relay must leave it to it.
    Envoy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadRewrite {
    /// Not a response head carrying our marker: leave the bytes alone.
    None,
    /// Marker found and turned into `connection: close`, or dropped when the head had one.
    Rewritten { edit: Edit, closer: Closer },
}

/// A request line longer than this is not worth editing.
pub const MAX_REQUEST_LINE: usize = 8192;

/// Turns the marker line `x-close-relay: <address>` of an HTTP/1.1 response head at the start of
/// `buf` into `connection: close` (or drops it when the head already says close). Looks at no
/// more than `max_head` bytes. Any other bytes, body included, are returned unchanged.
pub fn rewrite_response_head(buf: &[u8], address: &str, max_head: usize) -> HeadRewrite {
    if !buf.starts_with(STATUS_LINE_START) {
        return HeadRewrite::None;
    }
    let window = &buf[..buf.len().min(max_head)];
    // Header lines live between the status line and the blank line (or the window's end).
    let Some(status_end) = find(window, b"\r\n") else {
        return HeadRewrite::None;
    };
    let head_end = http1::head_len(window);
    let fields_end = head_end.map_or(window.len(), |e| e.saturating_sub(2));
    let mut marker = None;
    let mut already_close = false;
    let mut pos = status_end.saturating_add(2);
    while pos < fields_end {
        let Some(len) = find(&window[pos..fields_end], b"\r\n") else { break };
        let line = &window[pos..pos.saturating_add(len)];
        if let Some((name, value)) = http1::field(line) {
            if name.eq_ignore_ascii_case(MARKER.as_bytes()) && value == address.as_bytes() {
                marker = Some((pos, pos.saturating_add(len).saturating_add(2)));
            } else if name.eq_ignore_ascii_case(b"connection") && http1::has_token(value, b"close") {
                already_close = true;
            }
        }
        pos = pos.saturating_add(len).saturating_add(2);
    }
    let Some((start, end)) = marker else {
        return HeadRewrite::None;
    };
    let len = head_end.unwrap_or(end);
    let mut with = Vec::with_capacity(len);
    with.extend_from_slice(&window[..start]);
    if !already_close {
        with.extend_from_slice(CLOSE_LINE);
    }
    with.extend_from_slice(&window[end..len]);
    let closer = if already_close { Closer::Envoy } else { Closer::Relay };
    HeadRewrite::Rewritten { edit: Edit { len, with }, closer }
}

/// What to do with one write while a marked response head is on its way (the HTTP role said
/// so, from the same VM): the head is rewritten whole, even when Envoy writes it in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadStep {
    /// Replace this write's first `len` bytes with `with`; the head is done, and `closer` says
    /// who ends the connection when the marker was found.
    Done { edit: Option<Edit>, closer: Option<Closer> },
    /// The head is not complete yet: hold this write back (it is in `carry`) until the rest.
    Hold,
}

/// Feeds one write of `write` bytes while a marked head is expected. `carry` holds what earlier
/// writes held back. A head never ends without a blank line, so holding part of one back
/// never stalls a response; a head larger than `max_head`, or bytes that do not start a
/// response head, are released as they are.
pub fn feed_marked_head(carry: &mut Vec<u8>, write: &[u8], address: &str, max_head: usize) -> HeadStep {
    let held = carry.len();
    carry.extend_from_slice(write);
    let data = &carry[..];
    let looks_like_head =
        data.len() < STATUS_LINE_START.len() && STATUS_LINE_START.starts_with(data) || data.starts_with(STATUS_LINE_START);
    if looks_like_head && http1::head_len(data).is_none() && data.len() < max_head {
        return HeadStep::Hold;
    }
    let step = match rewrite_response_head(data, address, max_head) {
        HeadRewrite::Rewritten { edit, closer } => {
            HeadStep::Done { edit: Some(Edit { len: write.len(), with: apply(data, &edit) }), closer: Some(closer) }
        }
        HeadRewrite::None if held > 0 => {
            HeadStep::Done { edit: Some(Edit { len: write.len(), with: data.to_vec() }), closer: None }
        }
        HeadRewrite::None => HeadStep::Done { edit: None, closer: None },
    };
    carry.clear();
    step
}

/// Adds `connection: close` to the HTTP/1.x request head that is all of `buf`, right after the
/// request line, so Envoy's HCM answers it with `connection: close` and closes natively.
/// Returns `None` unless `buf` is exactly one head with a well-formed request line: a body or
/// an HTTP/2 preface is never touched, and neither is a head with more bytes behind it (a
/// request pipelined behind it would never be answered once Envoy closes after this one).
pub fn inject_request_close(buf: &[u8]) -> Option<Edit> {
    let line_end = find(&buf[..buf.len().min(MAX_REQUEST_LINE)], b"\r\n")?;
    let (method, _, _) = request_line(&buf[..line_end])?;
    if method == b"PRI" || http1::head_len(buf) != Some(buf.len()) {
        return None;
    }
    let mut with = Vec::with_capacity(line_end.saturating_add(2).saturating_add(CLOSE_LINE.len()));
    with.extend_from_slice(&buf[..line_end.saturating_add(2)]);
    with.extend_from_slice(CLOSE_LINE);
    Some(Edit { len: line_end.saturating_add(2), with })
}

/// A well-formed HTTP/1.x request line: its method (1 to 20 upper-case letters), target (visible
/// ASCII) and version (`HTTP/1.1` or `HTTP/1.0`).
fn request_line(line: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut parts = line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && (1..=20).contains(&method.len())
        && method.iter().all(u8::is_ascii_uppercase)
        && !target.is_empty()
        && target.iter().all(|b| b.is_ascii_graphic())
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0");
    well_formed.then_some((method, target, version))
}

/// Do the first bytes a client sent start an HTTP/1 request (a method token, then a space)?
/// `None` while too few bytes have come to tell. TLS, binary protocols and the HTTP/2 preface
/// (`PRI * HTTP/2.0`) are `Some(false)`.
pub fn starts_http1_request(buf: &[u8]) -> Option<bool> {
    const MAX_METHOD: usize = 20;
    let token = buf.iter().take(MAX_METHOD + 1).take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(token) {
        None if token < MAX_METHOD => None,
        Some(b' ') if token > 0 => Some(&buf[..token] != b"PRI"),
        _ => Some(false),
    }
}

/// Does the request head at the start of `buf` carry header `name` (ASCII, any case)? Only
/// what `buf` holds of the head is looked at.
pub fn head_has_header(buf: &[u8], name: &[u8]) -> bool {
    http1::fields(buf).flatten().any(|(field, _)| field.eq_ignore_ascii_case(name))
}

/// Is `buf` exactly one whole HTTP/1.1 request head that Envoy has every reason to answer
/// keeping the connection open? A target in origin form, one `host`, well-formed fields, no
/// body (`content-length: 0` at most, no `transfer-encoding`), no field that names
/// `connection`, `upgrade` or `expect`, and nothing behind it. Envoy then says `connection:
/// close` on its own only when its listener drains (`sidecar::Probed`): what a client asks for,
/// a malformed head and an answer before the request is whole are all left out here.
pub fn keep_alive_request(buf: &[u8]) -> bool {
    if http1::head_len(buf) != Some(buf.len()) {
        return false;
    }
    let mut lines = http1::lines(buf);
    let Some((method, target, version)) = lines.next().and_then(request_line) else { return false };
    let line_ok = method != b"CONNECT" && target.first() == Some(&b'/') && version == b"HTTP/1.1";
    let mut hosts: usize = 0;
    for line in lines {
        let Some((name, value)) = http1::field(line) else { return false };
        let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        if name.is_empty() || !name.iter().all(token) || value.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
            return false;
        }
        let lower = name.to_ascii_lowercase();
        let names = |word: &[u8]| lower.windows(word.len()).any(|w| w == word);
        if names(b"connection") || names(b"upgrade") || names(b"expect") || lower == b"transfer-encoding" {
            return false;
        }
        if lower == b"content-length" && value != b"0" {
            return false;
        }
        hosts = hosts.saturating_add(usize::from(lower == b"host"));
    }
    line_ok && hosts == 1
}

/// What Envoy's own reply says when it could not get an answer from the app: its body starts
/// with this, then the reset reason (`connection failure` when the app refused the
/// connection, `connection termination` or another reason when it reset it).
pub const LOCAL_REPLY_START: &[u8] = b"upstream connect error or disconnect/reset before headers.";

/// Which failure Envoy's local reply body at the start of `body` names: `Some(true)` the app
/// refused the connection, `Some(false)` it reset it, `None` not Envoy's reply (as far as
/// `body` goes).
pub fn local_reply_refused(body: &[u8]) -> Option<bool> {
    let rest = body.strip_prefix(LOCAL_REPLY_START)?;
    Some(find(rest, b"connection failure").is_some())
}

/// Applies an edit to a copy of `buf` (what Envoy does with drain + prepend); for tests and
/// fuzzing the network role's behaviour without a host.
pub fn apply(buf: &[u8], edit: &Edit) -> Vec<u8> {
    let mut out = edit.with.clone();
    out.extend_from_slice(&buf[edit.len..]);
    out
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
