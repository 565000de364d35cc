use super::*;

#[test]
fn token_lists_are_read_as_the_rfc_says() {
    assert!(has_token(b"close", b"close"));
    assert!(has_token(b"Keep-Alive, CLOSE", b"close"));
    assert!(has_token(b" te ,\tclose\t", b"close"));
    assert!(!has_token(b"closed", b"close"));
    assert!(!has_token(b"keep-alive", b"close"));
    assert!(!has_token(b"", b"close"));
    assert!(!has_token(b"clo se", b"close"));
}

#[test]
fn only_a_last_chunked_coding_makes_a_body_chunked() {
    assert!(chunked(b"chunked"));
    assert!(chunked(b"gzip, Chunked"));
    assert!(chunked(b"gzip,chunked\t"));
    assert!(!chunked(b"chunked, gzip"));
    assert!(!chunked(b"gzip"));
    assert!(!chunked(b""));
}

#[test]
fn fields_are_split_at_the_first_colon_and_trimmed() {
    assert_eq!(field(b"Host:  a:1 \t"), Some((&b"Host"[..], &b"a:1"[..])));
    assert_eq!(field(b"x:"), Some((&b"x"[..], &b""[..])));
    assert_eq!(field(b"no colon"), None);
    let head = b"HTTP/1.1 200 OK\r\na: 1\nb:2\r\n\r\nbody: x\r\n";
    let read: Vec<_> = fields(head).collect();
    assert_eq!(read, vec![Some((&b"a"[..], &b"1"[..])), Some((&b"b"[..], &b"2"[..]))]);
    assert_eq!(head_len(head), Some(29));
    assert_eq!(status(b"HTTP/1.1 204 No Content"), Some(204));
    assert_eq!(status(b"HTTP/1.1 2x4"), None);
}
