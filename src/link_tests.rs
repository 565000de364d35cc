//! Unit tests of `src/link.rs`.

use super::*;

#[test]
fn an_address_carries_its_token_and_stays_unique_per_nonce() {
    let a = Address::new(0x2a, "00ff00ff00ff00ff");
    assert_eq!(a.text, "0000002a00ff00ff00ff00ff");
    assert_eq!(Address::parse(a.text.clone()), a);
    assert_eq!(Address::parse("short".into()).token, 0);
    assert_eq!(Address::parse("zzzzzzzz00ff".into()).token, 0, "not hex");
    assert_eq!(Address::parse(String::new()).token, 0);
    let closing = Address { closing: true, ..a.clone() };
    assert_eq!(closing.published(), "0000002a00ff00ff00ff00ff!");
    assert_eq!(Address::parse(closing.published()), closing, "the marker's value stays the same");
    assert_eq!(a.published(), a.text);
    let hook = Address { hook: true, ..closing.clone() };
    assert_eq!(hook.published(), "0000002a00ff00ff00ff00ff?!");
    assert_eq!(Address::parse(hook.published()), hook);
    assert_eq!(Address::parse(hook.published()).text, a.text, "the hook's mark is not part of the marker");
}

#[test]
fn notes_round_trip() {
    let conn = "0000002a00ff00ff00ff00ff".to_string();
    let notes = [
        Note::Wake,
        Note::Begin(conn.clone()),
        Note::End { conn: conn.clone(), begun: true },
        Note::End { conn, begun: false },
        Note::Enter { source: Source::AppFailure, until: u64::MAX },
        Note::Enter { source: Source::AppReadiness, until: 1_700_000_000_123 },
        Note::Clear(Source::AppFailure),
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
