//! Unit tests of `src/wire.rs`.

use super::*;

const NONCE: &str = "0123456789abcdef";

#[test]
fn finds_a_header_in_a_request_head_only() {
    let name = b"x-close-relay-prestop";
    let hook = b"GET /stop HTTP/1.1\r\nHost: 10.0.0.7:8080\r\nUser-Agent: kube-lifecycle/1.33\r\nX-Close-Relay-Prestop: t\r\n\r\n";
    assert!(head_has_header(hook, name));
    assert!(head_has_header(b"GET / HTTP/1.1\nx-close-relay-prestop:t\n\n", name), "bare LF");
    assert!(!head_has_header(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nx-close-relay-prestop: t\r\n", name), "in the body");
    assert!(!head_has_header(b"GET /x-close-relay-prestop: HTTP/1.1\r\n\r\n", name), "in the request line");
    assert!(!head_has_header(b"GET / HTTP/1.1\r\nx-close-relay-prestopper: t\r\n\r\n", name), "another header");
    assert!(!head_has_header(b"GET / HTTP/1.1\r\nx-close-relay-pre", name), "cut short");
}

#[test]
fn tells_http1_requests_from_other_protocols() {
    assert_eq!(starts_http1_request(b"GET / HTTP/1.1\r\n"), Some(true));
    assert_eq!(starts_http1_request(b"M-SEARCH"), Some(false));
    assert_eq!(starts_http1_request(b"PROPFIND /x"), Some(true));
    assert_eq!(starts_http1_request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(false));
    assert_eq!(starts_http1_request(&[0x16, 0x03, 0x01, 0x02]), Some(false), "TLS");
    assert_eq!(starts_http1_request(b" GET"), Some(false));
    assert_eq!(starts_http1_request(b"get / HTTP/1.1"), Some(false));
    assert_eq!(starts_http1_request(b"GE"), None, "not enough bytes yet");
    assert_eq!(starts_http1_request(b""), None);
    assert_eq!(starts_http1_request(&[b'A'; 40]), Some(false), "no method is that long");
}

fn head(extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n{extra}date: Tue\r\nserver: envoy\r\n\r\nhello"
    )
    .into_bytes()
}

fn rewritten(buf: &[u8]) -> (Vec<u8>, bool) {
    match rewrite_response_head(buf, NONCE, 16384) {
        HeadRewrite::Rewritten { edit, closer } => (apply(buf, &edit), closer == Closer::Envoy),
        HeadRewrite::None => panic!("no rewrite of {:?}", String::from_utf8_lossy(buf)),
    }
}

#[test]
fn marker_becomes_connection_close_body_intact() {
    let buf = head(&format!("{MARKER}: {NONCE}\r\n"));
    let (out, already) = rewritten(&buf);
    assert!(!already);
    assert_eq!(out, head("connection: close\r\n"));
}

#[test]
fn marker_dropped_when_envoy_already_closes() {
    let buf = head(&format!("{MARKER}: {NONCE}\r\nconnection: close\r\n"));
    let (out, already) = rewritten(&buf);
    assert!(already);
    assert_eq!(out, head("connection: close\r\n"));
}

#[test]
fn a_wrong_address_or_no_marker_is_untouched() {
    for buf in [
        head(&format!("{MARKER}: ffffffffffffffff\r\n")),
        head(""),
        head(&format!("{MARKER}: {NONCE}x\r\n")),
        b"HTTP/1.0 200 OK\r\nx-close-relay: 0123456789abcdef\r\n\r\n".to_vec(),
        format!("\r\n{MARKER}: {NONCE}\r\n").into_bytes(),
        b"HTTP/1.1 200".to_vec(),
    ] {
        assert_eq!(rewrite_response_head(&buf, NONCE, 16384), HeadRewrite::None);
    }
}

#[test]
fn marker_in_body_is_not_a_header() {
    let mut buf = head("");
    buf.extend_from_slice(format!("\r\n{MARKER}: {NONCE}\r\n").as_bytes());
    assert_eq!(rewrite_response_head(&buf, NONCE, 16384), HeadRewrite::None);
}

#[test]
fn marker_beyond_window_is_not_seen() {
    let buf = head(&format!("{MARKER}: {NONCE}\r\n"));
    assert_eq!(rewrite_response_head(&buf, NONCE, 40), HeadRewrite::None);
}

#[test]
fn head_without_end_in_this_write_still_rewrites_the_marker() {
    let buf = format!("HTTP/1.1 200 OK\r\n{MARKER}: {NONCE}\r\nserver: en").into_bytes();
    let (out, _) = rewritten(&buf);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nconnection: close\r\nserver: en");
}

#[test]
fn request_close_injected_after_request_line() {
    let req = b"GET /a?b=c HTTP/1.1\r\nhost: x\r\n\r\n";
    let edit = inject_request_close(req).unwrap();
    assert_eq!(apply(req, &edit), b"GET /a?b=c HTTP/1.1\r\nconnection: close\r\nhost: x\r\n\r\n");
}

#[test]
fn request_injection_refuses_non_requests() {
    for buf in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n",
        b"get / HTTP/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/1.1",
        b"\x16\x03\x01\x02\x00",
        b"{\"json\": \"body\"}\r\n",
        b"",
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nok",
        b"GET / HTTP/1.1\r\nhost: x\r\n",
    ] {
        assert_eq!(inject_request_close(buf), None, "{:?}", String::from_utf8_lossy(buf));
    }
}
#[test]
fn a_probe_takes_only_requests_envoy_would_keep_alive() {
    let yes: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"HEAD /x?y=1 HTTP/1.1\r\nHost: a\r\nuser-agent: ELB-HealthChecker/2.0\r\ncontent-length: 0\r\n\r\n",
    ];
    for r in yes {
        assert!(keep_alive_request(r), "{}", String::from_utf8_lossy(r));
    }
    let no: &[&[u8]] = &[
        b"GET / HTTP/1.0\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nproxy-connection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nbad name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nx: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\n",
        b"GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nhost: a\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    for r in no {
        assert!(!keep_alive_request(r), "{}", String::from_utf8_lossy(r));
    }
}

#[test]
fn envoys_local_reply_names_a_refusal_or_a_reset() {
    let body = |reason: &str| format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}");
    assert_eq!(local_reply_refused(body("connection failure, transport failure reason: delayed connect error: 111").as_bytes()), Some(true));
    assert_eq!(local_reply_refused(b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure"), Some(true));
    assert_eq!(local_reply_refused(body("connection termination").as_bytes()), Some(false));
    assert_eq!(local_reply_refused(b"no healthy upstream"), None);
}
