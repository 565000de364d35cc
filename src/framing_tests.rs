//! Unit tests of `src/framing.rs`.

use super::*;

/// Follows `writes`; returns the heads seen and whether a response is under way after each.
fn follow(r: &mut Responses, writes: &[&[u8]]) -> (Vec<HeadSeen>, Vec<bool>) {
    let (mut heads, mut busy) = (Vec::new(), Vec::new());
    for write in writes {
        heads.extend(r.follow(write));
        busy.push(r.in_flight());
    }
    (heads, busy)
}

#[test]
fn a_response_with_a_length_ends_after_its_body_even_across_writes() {
    let mut r = Responses::new(96 * 1024);
    let (heads, busy) = follow(&mut r, &[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello", b"world"]);
    assert_eq!(heads.len(), 1);
    assert!(heads[0].whole_here && !heads[0].says_close && heads[0].is_final);
    assert_eq!(busy, [true, false]);
}

#[test]
fn a_slow_stream_stays_in_flight_until_its_last_chunk() {
    let mut r = Responses::new(96 * 1024);
    let (_, busy) = follow(
        &mut r,
        &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", b"1", b"0\r\n0123456789abcdef\r\n", b"0\r\n\r\n"],
    );
    assert_eq!(busy, [true, true, true, true, false]);
}

#[test]
fn chunk_data_that_looks_like_the_last_chunk_does_not_end_the_response() {
    let mut r = Responses::new(96 * 1024);
    let (_, busy) = follow(&mut r, &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n0\r\n\r\n\r\n", b"0\r\n\r\n"]);
    assert_eq!(busy, [true, false]);
}

#[test]
fn trailers_end_with_their_blank_line() {
    let mut r = Responses::new(96 * 1024);
    let (_, busy) = follow(&mut r, &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n", b"\r\n"]);
    assert_eq!(busy, [true, false]);
}

#[test]
fn two_responses_in_one_write_and_a_head_split_over_writes() {
    let mut r = Responses::new(96 * 1024);
    let (heads, busy) = follow(
        &mut r,
        &[b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-le", b"ngth: 2\r\n\r\nok"],
    );
    assert_eq!(heads.len(), 2);
    assert!(heads[0].whole_here && !heads[1].whole_here);
    assert_eq!(busy, [true, false]);
}

#[test]
fn interim_and_bodiless_answers_leave_nothing_in_flight() {
    for head in [&b"HTTP/1.1 100 Continue\r\n\r\n"[..], b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"] {
        let mut r = Responses::new(96 * 1024);
        assert_eq!(follow(&mut r, &[head]).1, [false], "{}", String::from_utf8_lossy(head));
    }
}

#[test]
fn the_answer_to_head_ends_when_the_client_sends_again() {
    let mut r = Responses::new(96 * 1024);
    follow(&mut r, &[b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"]);
    assert!(r.in_flight());
    r.request_ends_an_answer_to_head();
    assert!(!r.in_flight());
    // Body bytes already out: a client's bytes now are a pipelined request, not the end.
    follow(&mut r, &[b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc"]);
    r.request_ends_an_answer_to_head();
    assert!(r.in_flight());
}

#[test]
fn obs_text_in_a_header_value_is_no_loss() {
    let mut r = Responses::new(96 * 1024);
    let write = b"HTTP/1.1 200 OK\r\nx-name: caf\xe9\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(follow(&mut r, &[write]).1, [false]);
    assert!(!r.lost());
}

#[test]
fn what_cannot_be_followed_stays_in_flight_for_good() {
    for writes in [
        &[&b"garbage"[..]][..],
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"],
        &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
        &[b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"],
        &[b"HTTP/1.0 200 OK\r\n\r\nbody until close"],
    ] {
        let mut r = Responses::new(96 * 1024);
        assert_eq!(follow(&mut r, writes).1.last(), Some(&true), "{writes:?}");
    }
    let mut r = Responses::new(64);
    follow(&mut r, &[b"HTTP/1.1 200 OK\r\nx-long: 0123456789012345678901234567890123456789012345678901234567890123\r\n"]);
    assert!(r.lost());
}

#[test]
fn rescue_marks_are_read_from_the_head() {
    let mut r = Responses::new(96 * 1024);
    let (heads, _) = follow(&mut r, &[
        b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 2\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 503 x\r\nx-envoy-attempt-count: 3\r\nx-close-relay-refused: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 1\r\ncontent-length: 0\r\n\r\n",
    ]);
    let marks: Vec<_> = heads.iter().map(|h| (h.rescued, h.refused, h.attempt_counted)).collect();
    assert_eq!(marks, [(true, false, true), (false, true, true), (false, false, true)]);
    let (heads, _) = follow(&mut r, &[
        b"HTTP/1.1 503 x\r\nx-envoy-attempt-count: 1\r\nx-close-relay-refused: orders\r\nx-envoy-upstream-service-time: 3\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 503 x\r\nx-envoy-attempt-count: 2\r\nx-close-relay-refused: checkout\r\nx-envoy-upstream-service-time: 3\r\ncontent-length: 0\r\n\r\n",
    ]);
    let marks: Vec<_> = heads.iter().map(|h| (h.rescued, h.refused)).collect();
    assert_eq!(marks, [(false, false), (false, true)], "the app's copy counts for nothing; another pod's refusal does");
}

#[test]
fn a_head_that_says_close_is_seen_and_close_is_added_before_the_blank_line() {
    let mut r = Responses::new(96 * 1024);
    let (heads, _) = follow(&mut r, &[b"HTTP/1.1 503 x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"]);
    assert!(heads[0].says_close && !heads[0].rescued && !heads[0].refused);
    assert_eq!(with_close(b"HTTP/1.1 200 OK\r\na: b\r\n\r\n"), b"HTTP/1.1 200 OK\r\na: b\r\nconnection: close\r\n\r\n");
}

#[test]
fn a_head_at_the_start_says_whether_envoy_closes() {
    let close = |buf: &[u8]| head_at_start(buf).map(|h| (h.is_final, h.says_close));
    assert_eq!(close(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Some((true, false)));
    assert_eq!(close(b"HTTP/1.1 503 x\r\nConnection: Close\r\n\r\n"), Some((true, true)));
    assert_eq!(close(b"HTTP/1.1 200 OK\r\nx-close-relay: 0000\r\n\r\n"), Some((true, false)), "our marker is not Envoy's close");
    assert_eq!(close(b"HTTP/1.1 100 Continue\r\n\r\n"), Some((false, false)), "interim: the final head comes next");
    assert_eq!(close(b"HTTP/1.1 200 OK\r\nconnection: cl"), None);
    assert_eq!(close(b"garbage"), None);
}
