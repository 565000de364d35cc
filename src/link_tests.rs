//! Unit tests of `src/link.rs`.

use super::*;

#[test]
fn an_address_carries_its_token_and_stays_unique_per_nonce() {
    let a = Handle::new(0x2a, "00ff00ff00ff00ff");
    assert_eq!(a.text, "0000002a00ff00ff00ff00ff");
    assert_eq!(Handle::parse(a.text.clone()), a);
    assert_eq!(Handle::parse("short".into()).token, 0);
    assert_eq!(Handle::parse("zzzzzzzz00ff".into()).token, 0, "not hex");
    assert_eq!(Handle::parse(String::new()).token, 0);
    let closing = Handle { closing: true, ..a.clone() };
    assert_eq!(closing.published(), "0000002a00ff00ff00ff00ff!");
    assert_eq!(Handle::parse(closing.published()), closing, "the marker's value stays the same");
    assert_eq!(a.published(), a.text);
    let hook = Handle { hook: true, ..closing.clone() };
    assert_eq!(hook.published(), "0000002a00ff00ff00ff00ff?!");
    assert_eq!(Handle::parse(hook.published()), hook);
    assert_eq!(Handle::parse(hook.published()).text, a.text, "the hook's mark is not part of the marker");
}

#[test]
fn notes_round_trip() {
    let conn = "0000002a00ff00ff00ff00ff".to_string();
    let notes = [
        Note::Wake,
        Note::Begin(conn.clone()),
        Note::End(conn.clone()),
        Note::Enter { source: Source::AppFailure, until: u64::MAX },
        Note::Enter { source: Source::AppReadiness, until: 1_700_000_000_123 },
        Note::Clear(Source::AppFailure),
    ];
    for note in notes {
        assert_eq!(Note::decode(&note.encode()), Some(note));
    }
    // The encoding other versions read and write: an end carries the flag of a begin sent.
    assert_eq!(Note::End(conn.clone()).encode(), [b"e\x01".as_slice(), conn.as_bytes()].concat());
    assert_eq!(Note::decode(&[b"e\x00".as_slice(), conn.as_bytes()].concat()), None, "an end without its begin changes nothing");
}

#[test]
fn foreign_or_truncated_items_are_ignored() {
    for bad in [&b""[..], b"x", b"wextra", b"e", b"d", b"d\x09\0\0\0\0\0\0\0\0", b"d\x01\0\0", b"b\xff"] {
        assert_eq!(Note::decode(bad), None, "{bad:?}");
    }
}
