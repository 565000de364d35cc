//! Unit tests of `src/h2.rs`.

use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const SETTINGS: u8 = 0x4;

fn opened() -> Connection {
    let mut c = Connection::new();
    c.read(&[CLIENT_PREFACE, &frame(SETTINGS, 0, 0, &[])].concat());
    c.wrote(&frame(SETTINGS, 0, 0, &[0; 6]));
    c
}

#[test]
fn a_stream_is_under_way_from_the_clients_headers_to_the_end_of_its_response() {
    let mut c = opened();
    assert!(c.quiet());
    c.read(&frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hpack"));
    assert!(!c.quiet(), "asked, not yet answered");
    c.wrote(&frame(HEADERS, END_HEADERS, 1, b"hpack"));
    let data = frame(DATA, 0, 1, &[7; 100]);
    c.wrote(&data[..50]);
    assert!(!c.may_tell(), "mid-frame: nothing may be added here");
    c.wrote(&data[50..]);
    assert!(c.may_tell() && !c.quiet());
    c.wrote(&frame(DATA, END_STREAM, 1, b"end"));
    assert!(c.quiet());
}

#[test]
fn nothing_is_added_inside_a_header_block() {
    let mut c = opened();
    c.read(&frame(HEADERS, END_HEADERS | END_STREAM, 3, b"h"));
    c.wrote(&frame(HEADERS, END_STREAM, 3, b"part"));
    assert!(!c.may_tell() && !c.quiet(), "HEADERS without END_HEADERS: its CONTINUATION must come next");
    c.wrote(&frame(CONTINUATION, END_HEADERS, 3, b"rest"));
    assert!(c.may_tell() && c.quiet());
    let mut c = opened();
    c.wrote(&frame(HEADERS, 0, 3, b"part"));
    c.wrote(&frame(DATA, 0, 3, b"x"));
    assert!(c.lost(), "a frame inside a header block cannot be followed");
}

#[test]
fn resets_end_a_stream_and_envoys_own_goaway_is_seen() {
    let mut c = opened();
    c.read(&frame(HEADERS, END_HEADERS, 5, b"h"));
    c.read(&frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));
    assert!(c.quiet(), "the client cancelled it");
    c.read(&frame(HEADERS, END_HEADERS, 7, b"h"));
    c.wrote(&frame(RST_STREAM, 0, 7, &[0, 0, 0, 2]));
    assert!(c.quiet(), "Envoy reset it");
    c.wrote(&frame(GOAWAY, 0, 0, &[0, 0, 0, 7, 0, 0, 0, 0]));
    assert!(!c.may_tell(), "Envoy told the client itself");
    let mut g = opened();
    g.wrote(&GRACEFUL_GOAWAY);
    assert!(g.server.goaway_sent() && g.quiet(), "our own GOAWAY is a well-formed frame");
}

#[test]
fn frames_split_anywhere_are_followed() {
    let mut c = Connection::new();
    let client = [CLIENT_PREFACE, &frame(SETTINGS, 0, 0, &[]), &frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hpack")].concat();
    for byte in &client {
        c.read(std::slice::from_ref(byte));
    }
    assert_eq!(c.open_streams(), 1);
    for byte in &frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hpack") {
        c.wrote(std::slice::from_ref(byte));
    }
    assert!(c.quiet());
}

#[test]
fn what_is_not_http2_is_lost() {
    let mut c = Connection::new();
    c.read(b"GET / HTTP/1.1\r\n\r\n");
    assert!(c.lost());
}

#[test]
fn a_first_read_may_hold_the_preface_or_only_its_start() {
    assert!(may_be_preface(CLIENT_PREFACE) && may_be_preface(b"PRI * HTTP/2"));
    let mut more = CLIENT_PREFACE.to_vec();
    more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert!(may_be_preface(&more), "the preface and the client's SETTINGS in one read");
    assert!(!may_be_preface(b"GET / HTTP/1.1\r\n") && !may_be_preface(b"PRI * HTTP/1.1"));
}
