//! The filter's one HTTP/1 reader, on bytes: where a head ends, its lines, a field's name and
//! value, a status code, a token list, the transfer coding. `wire` (the edits), `framing`
//! (lean's view of the responses written) and `decision` (the HTTP role's response facts) read
//! through it, so a field is read the same way wherever it is read. Pure functions.
//!
//! Field values are bytes: obs-text (bytes past ASCII) says nothing about framing or tokens.

/// The line close-relay adds to a head.
pub const CLOSE_LINE: &[u8] = b"connection: close\r\n";

/// How every response head Envoy writes to an HTTP/1.1 client starts: the only heads edited.
pub const STATUS_LINE_START: &[u8] = b"HTTP/1.1 ";

/// How any HTTP/1 response head starts: the only bytes lean follows as a response.
pub const RESPONSE_START: &[u8] = b"HTTP/1.";

/// The first read of a head: most heads fit in it, so most cost one read; only a larger head
/// costs a second, bounded one.
pub const FIRST_READ: usize = 1024;

/// Where `needle` first starts in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The length of the head at the start of `buf`, its blank line included, once it is whole.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|i| i.saturating_add(4))
}

/// The lines of `head` without their ends (CRLF, or a bare LF), up to its blank line.
pub fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|b| *b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line)).take_while(|line| !line.is_empty())
}

/// A field line's name and value, the optional whitespace around the value left out; `None`
/// for a line without a colon.
pub fn field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let value = line.get(colon.saturating_add(1)..)?;
    Some((&line[..colon], ows_trimmed(value)))
}

/// The fields of the head at the start of `head`, after its first line; `None` for a line
/// without a colon.
pub fn fields(head: &[u8]) -> impl Iterator<Item = Option<(&[u8], &[u8])>> {
    lines(head).skip(1).map(field)
}

/// Does the comma-separated list `list` name `token` (any case, whitespace around it allowed)?
pub fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|b| *b == b',').any(|t| ows_trimmed(t).eq_ignore_ascii_case(token))
}

/// Is the last transfer coding of `transfer_encoding` chunked? Only then is a response's body
/// chunked; with another coding last, it ends with the connection (RFC 9112, section 6.3).
pub fn chunked(transfer_encoding: &[u8]) -> bool {
    transfer_encoding.rsplit(|b| *b == b',').next().is_some_and(|last| ows_trimmed(last).eq_ignore_ascii_case(b"chunked"))
}

/// `bytes` without the optional whitespace (spaces and tabs) around it.
fn ows_trimmed(bytes: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ows(b)).map_or(start, |i| i.saturating_add(1));
    &bytes[start..end]
}

/// A header field: its name and its value, trimmed.
pub type Field<'a> = (&'a [u8], &'a [u8]);

/// A whole response head's status and fields; `None` when it is not one (a status line without
/// a code, a field line without a colon).
#[cfg(not(feature = "httparse"))]
pub fn response_head(head: &[u8]) -> Option<(u16, Vec<Field<'_>>)> {
    let status = status(lines(head).next()?)?;
    Some((status, fields(head).collect::<Option<Vec<_>>>()?))
}

/// [`response_head`] by the `httparse` crate, built only to compare the two readers
/// (`cargo build --features httparse`; docs/cost.md, "One HTTP/1 reader"). Envoy writes at most
/// 100 fields (`max_headers_count`).
#[cfg(feature = "httparse")]
pub fn response_head(head: &[u8]) -> Option<(u16, Vec<Field<'_>>)> {
    let mut fields = [httparse::EMPTY_HEADER; 101];
    let mut response = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(_) = response.parse(head).ok()? else { return None };
    let status = response.code?;
    Some((status, response.headers.iter().map(|h| (h.name.as_bytes(), h.value)).collect()))
}

/// The status code of a status line (`HTTP/1.1 200 OK`).
pub fn status(line: &[u8]) -> Option<u16> {
    std::str::from_utf8(line.get(9..12)?).ok()?.parse().ok()
}

#[cfg(test)]
#[path = "http1_tests.rs"]
mod tests;
