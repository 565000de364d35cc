//! Fuzzing every parser the filter has, as properties over generated input (proptest): the
//! plugin configuration, `Connection` token lists, the response-head rewrite (on arbitrary
//! splits into writes, huge heads, one response after another), the request edit, the drain
//! state, the admin pages we parse, and the lean role's reading of response framing. Each must never panic, never leak the marker and never
//! change a body byte. `make test` runs the default number of cases; `make fuzz` runs many more
//! (PROPTEST_CASES).

use std::sync::LazyLock;

use close_relay::config::Config;
use close_relay::http1::has_token;
use close_relay::drain::{DrainState, Window};
use close_relay::follow::Follower;
use close_relay::framing::Responses;
use close_relay::wire::{self, HeadStep, MARKER};
use close_relay::sidecar;
use proptest::prelude::*;

mod common;
use common::config_with;

const NONCE: &str = "00ff00ff00ff00ff";

fn config() -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

/// A header field line's name: ours, the ones we read, or anything token-like.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("connection".to_string()),
        Just("Connection".to_string()),
        Just("content-length".to_string()),
        Just(MARKER.to_string()),
        Just("X-Close-Relay".to_string()),
        "[a-zA-Z][a-zA-Z0-9-]{0,30}",
    ]
}

/// A field value: close tokens, our nonce or another one, or arbitrary visible text.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("close".to_string()),
        Just("keep-alive, Close".to_string()),
        Just("0123456789abcdef".to_string()),
        "[ -~]{0,40}".prop_map(|v| v.trim().to_string()),
        "[ -~]{200,3000}".prop_map(|v| v.trim().to_string()),
    ]
}

/// A response head Envoy could write: status line, fields (maybe ours, anywhere), blank line.
fn head() -> impl Strategy<Value = (Vec<u8>, bool)> {
    any::<bool>().prop_flat_map(head_marked)
}

fn head_marked(marked: bool) -> impl Strategy<Value = (Vec<u8>, bool)> {
    (prop::collection::vec((header_name(), header_value()), 0..12), Just(marked), any::<prop::sample::Index>())
        .prop_map(|(fields, marked, at)| {
            let mut lines: Vec<String> = fields
                .into_iter()
                // Only the HTTP role knows the nonce: nobody else can write it.
                .filter(|(_, v)| !v.contains(NONCE))
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect();
            if marked {
                lines.insert(at.index(lines.len() + 1), format!("{MARKER}: {NONCE}\r\n"));
            }
            (format!("HTTP/1.1 200 OK\r\n{}\r\n", lines.concat()).into_bytes(), marked)
        })
}

/// What the client must get for `head`: the marker line gone, and `connection: close` in its
/// place unless the head already said close.
fn expected(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let marker = format!("{MARKER}: {NONCE}\r\n");
    let already = text.split("\r\n").skip(1).any(|l| {
        l.split_once(':')
            .is_some_and(|(n, v)| n.eq_ignore_ascii_case("connection") && has_token(v.trim_start().as_bytes(), b"close"))
    });
    text.replacen(&marker, if already { "" } else { "connection: close\r\n" }, 1).into_bytes()
}

fn leaks(out: &[u8]) -> bool {
    out.windows(NONCE.len()).any(|w| w == NONCE.as_bytes())
}

/// The network role fed writes cut at `cuts` while a marked head is pending (same VM).
fn fed(stream: &[u8], cuts: &[usize], max_head: usize) -> Vec<u8> {
    let (mut carry, mut out, mut pending, mut at) = (Vec::new(), Vec::new(), true, 0);
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    ends.sort_unstable();
    ends.push(stream.len());
    for end in ends {
        let write = &stream[at..end];
        at = end;
        if !pending {
            out.extend_from_slice(write);
            continue;
        }
        match wire::feed_marked_head(&mut carry, write, NONCE, max_head) {
            HeadStep::Hold => {}
            HeadStep::Done { edit, .. } => {
                pending = false;
                out.extend_from_slice(&edit.map_or_else(|| write.to_vec(), |e| wire::apply(write, &e)));
            }
        }
    }
    out.extend_from_slice(&carry);
    out
}

/// The cases worth naming, beside the generated ones below.
#[test]
fn a_head_written_in_pieces_is_rewritten_whole() {
    let head = |extra: &str| {
        format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n{extra}date: Tue\r\nserver: envoy\r\n\r\nhello").into_bytes()
    };
    let stream = head(&format!("{MARKER}: {NONCE}\r\n"));
    let want = expected(&stream);
    for cut in 0..stream.len() {
        assert_eq!(fed(&stream, &[cut], 16384), want, "cut at {cut}");
    }
    assert_eq!(fed(&stream, &[3, 20, 40, 41, 60], 16384), want);
    // Not a head, or past the limit: released untouched.
    assert_eq!(fed(b"hello world", &[5], 16384), b"hello world");
    let big = head(&format!("x-big: {}\r\n{MARKER}: {NONCE}\r\n", "a".repeat(100)));
    assert_eq!(fed(&big, &[50], 64), big);
}

/// Every numeric option and its range, as `docs/configuration.md` documents them: an oracle
/// kept apart from `Config::validate` on purpose (`tests/reference.rs` checks the two agree at
/// the bounds; here every value around 2^32 and 2^64 is tried).
static NUMERIC_OPTIONS: LazyLock<Vec<(String, u128, u128)>> = LazyLock::new(common::ranges);

/// Values near the edges of 32 and 64 bits, written as JSON integers: those that are the
/// range's own values once truncated (2^32 + lo), and those just past.
fn wide_number() -> impl Strategy<Value = u128> {
    let two32 = 1u128 << 32;
    let two64 = 1u128 << 64;
    prop_oneof![
        (0u128..4_000_000).prop_map(move |x| two32 + x),
        (0u128..1000).prop_map(move |x| two32 - 1 - x),
        (0u128..4_000_000).prop_map(move |x| two64 - 1 - x),
        (0u128..4_000_000).prop_map(move |x| two64 + x),
        (0u128..1000).prop_map(move |x| (two32 << 1) + x),
        0u128..8_000_000,
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Accepted exactly when the value, as written, is in the option's range; refused with that
    /// option named otherwise. A cast to 32 bits anywhere between the JSON and the check
    /// would accept 2^32 + lo.
    #[test]
    fn numeric_options_are_checked_as_written(
        option in 0..NUMERIC_OPTIONS.len(),
        value in wide_number(),
    ) {
        let (path, lo, hi) = &NUMERIC_OPTIONS[option];
        let (path, lo, hi) = (path.as_str(), *lo, *hi);
        let raw = config_with(path, &value.to_string());
        match Config::parse(raw.as_bytes()) {
            Ok(_) => prop_assert!((lo..=hi).contains(&value), "{raw} accepted"),
            Err(e) => {
                prop_assert!(!(lo..=hi).contains(&value), "{raw} refused: {e}");
                prop_assert_eq!(e.field.as_deref(), Some(path), "{}", e);
            }
        }
    }

    #[test]
    fn config_never_panics_on_bytes(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Config::parse(&raw);
    }

    #[test]
    fn config_errors_name_an_unknown_field(key in "[a-z_]{1,20}", value in any::<u32>()) {
        let known = serde_json::to_value(Config::default()).unwrap();
        prop_assume!(known.get(&key).is_none());
        let err = Config::parse(format!("{{\"{key}\": {value}}}").as_bytes()).unwrap_err();
        prop_assert_eq!(err.field.as_deref(), Some(key.as_str()));
    }

    #[test]
    fn config_of_any_json_shape_never_panics(v in json()) {
        let _ = Config::parse(v.to_string().as_bytes());
        let _ = Config::parse(serde_json::json!({"drain": v}).to_string().as_bytes());
    }

    #[test]
    fn token_lists_match_the_rfc_model(list in "[ -~\t]{0,60}", token in "[a-zA-Z-]{1,12}") {
        let lower = |s: &str| s.bytes().map(|b| b.to_ascii_lowercase()).collect::<Vec<u8>>();
        let model = list.split(',').any(|t| lower(t.trim_matches(|c| c == ' ' || c == '\t')) == lower(&token));
        prop_assert_eq!(has_token(list.as_bytes(), token.as_bytes()), model);
    }

    #[test]
    fn a_head_in_one_write_is_rewritten_and_the_body_untouched(
        (head, marked) in head(), body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut write = head.clone();
        write.extend_from_slice(&body);
        let out = match wire::rewrite_response_head(&write, NONCE, 1 << 20) {
            wire::HeadRewrite::Rewritten { edit, .. } => wire::apply(&write, &edit),
            wire::HeadRewrite::None => write.clone(),
        };
        let shown = String::from_utf8_lossy(&head);
        prop_assert!(!marked || !leaks(&out[..out.len() - body.len()]), "marker leaked from {:?}", shown);
        prop_assert_eq!(&out[out.len() - body.len()..], &body[..], "body changed");
        if marked {
            prop_assert_eq!(&out[..out.len() - body.len()], &expected(&head)[..]);
        } else {
            prop_assert_eq!(out, write);
        }
    }

    #[test]
    fn a_marked_head_cut_anywhere_is_rewritten_whole(
        (head, _) in head_marked(true),
        body in prop::collection::vec(any::<u8>(), 0..1024),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut stream = head.clone();
        stream.extend_from_slice(&body);
        let mut want = expected(&head);
        want.extend_from_slice(&body);
        prop_assert_eq!(fed(&stream, &cuts, 1 << 20), want);
    }

    #[test]
    fn a_head_past_the_limit_is_released_untouched(
        (head, _) in head(), cuts in prop::collection::vec(any::<usize>(), 0..4), percent in 1usize..100,
    ) {
        let limit = head.len() * percent / 100;
        let out = fed(&head, &cuts, limit);
        // Past the limit nothing is rewritten; the bytes all arrive, in order.
        // The marker may sit inside the window with the head's end (and a `connection: close`)
        // past it: then close is said twice, which is harmless.
        let marker = format!("{MARKER}: {NONCE}\r\n");
        let doubled = String::from_utf8_lossy(&head).replacen(&marker, "connection: close\r\n", 1).into_bytes();
        prop_assert!(out == head || out == expected(&head) || out == doubled,
            "{:?} became {:?}", String::from_utf8_lossy(&head), String::from_utf8_lossy(&out));
    }

    #[test]
    fn responses_one_after_another_are_each_rewritten(
        heads in prop::collection::vec(head(), 1..5), cuts in prop::collection::vec(any::<usize>(), 0..3),
    ) {
        for (head, marked) in heads {
            let body = b"0123456789";
            let mut stream = head.clone();
            stream.extend_from_slice(body);
            let out = fed(&stream, &cuts, 1 << 20);
            let mut want = if marked { expected(&head) } else { head.clone() };
            want.extend_from_slice(body);
            prop_assert_eq!(out, want);
        }
    }

    #[test]
    fn request_edit_only_inserts_after_the_request_line(buf in request_bytes()) {
        if let Some(edit) = wire::inject_request_close(&buf) {
            let out = wire::apply(&buf, &edit);
            let line_end = buf.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            prop_assert_eq!(&out[..line_end], &buf[..line_end]);
            prop_assert_eq!(&out[line_end..line_end + 19], b"connection: close\r\n");
            prop_assert_eq!(&out[line_end + 19..], &buf[line_end..]);
        }
    }

    #[test]
    fn http1_sniff_never_panics_and_a_longer_prefix_only_decides(buf in prop::collection::vec(any::<u8>(), 0..40)) {
        let full = wire::starts_http1_request(&buf);
        for n in 0..buf.len() {
            let partial = wire::starts_http1_request(&buf[..n]);
            prop_assert!(partial.is_none() || partial == full);
        }
    }

    #[test]
    fn drain_state_and_admin_pages_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128), text in "[ -~\n]{0,400}") {
        let s = DrainState::decode(&bytes);
        prop_assert_eq!(DrainState::decode(&s.encode()), s);
        let _ = Window::decode(&bytes);
        let _ = sidecar::ready_says_draining(503, &bytes);
        let stats = sidecar::parse_drain_stats(&text);
        prop_assert_eq!(sidecar::DrainStats::decode_read(&stats.encode_read(1)), Some((1, stats)));
        let _ = close_relay::census::pod_wide(&close_relay::census::decode(&bytes), 5, 10, 3);
    }

    #[test]
    fn the_probes_readers_never_panic_and_a_probed_head_is_one_whole_head(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if wire::keep_alive_request(&bytes) {
            prop_assert!(bytes.ends_with(b"\r\n\r\n") && wire::starts_http1_request(&bytes) == Some(true));
        }
        let _ = close_relay::framing::head_at_start(&bytes);
        let _ = wire::local_reply_refused(&bytes);
    }
}

/// One response as Envoy writes it: a length, chunks (with their sizes), or no body.
fn response() -> impl Strategy<Value = Vec<u8>> {
    let body = prop::collection::vec(any::<u8>(), 0..300);
    let chunks = prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 0..5);
    prop_oneof![
        body.prop_map(|b| {
            let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", b.len()).into_bytes();
            r.extend(b);
            r
        }),
        chunks.prop_map(|cs| {
            let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for c in cs {
                r.extend(format!("{:x}\r\n", c.len()).into_bytes());
                r.extend(c);
                r.extend(b"\r\n");
            }
            r.extend(b"0\r\n\r\n");
            r
        }),
        Just(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
    ]
}

/// Feeds `stream` cut at `cuts` as the lean network role does (bounded steps per write);
/// returns the heads seen and whether a response is under way at the end.
fn follow(stream: &[u8], cuts: &[usize]) -> (usize, bool) {
    let mut r = Responses::new(96 * 1024);
    let mut heads = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    bounds.extend([0, stream.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    for w in bounds.windows(2) {
        heads += r.follow(&stream[w[0]..w[1]]).len();
    }
    (heads, r.in_flight())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn responses_cut_anywhere_are_followed_to_their_end(
        responses in prop::collection::vec(response(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let stream: Vec<u8> = responses.concat();
        let (heads, in_flight) = follow(&stream, &cuts);
        prop_assert_eq!(heads, responses.len());
        prop_assert!(!in_flight);
        // Every proper prefix that ends inside a response leaves one under way.
        let (_, cut_short) = follow(&stream[..stream.len() - 1], &cuts);
        prop_assert!(cut_short);
    }

    #[test]
    fn any_bytes_are_followed_or_lost_never_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        prefix in prop::bool::ANY,
    ) {
        let mut stream = if prefix { b"HTTP/1.1 200 OK\r\n".to_vec() } else { Vec::new() };
        stream.extend(bytes);
        follow(&stream, &cuts);
    }
}

fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        ("[A-Z]{1,8}", "[!-~]{1,30}", prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0"), Just("HTTP/2.0")], "[ -~\r\n]{0,80}")
            .prop_map(|(m, t, v, rest)| format!("{m} {t} {v}\r\n{rest}").into_bytes()),
    ]
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        "[ -~]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![Just("enabled".to_string()), Just("tick_ms".to_string()), Just("sidecar".to_string()), "[a-z_]{1,10}"],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One HTTP/2 frame of `kind` with `flags` on `stream`, carrying `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Envoy's side of an h2 connection: SETTINGS, then for each stream HEADERS (in one frame, or
/// split into a CONTINUATION), DATA frames, the last ending the stream.
fn h2_server_stream() -> impl Strategy<Value = (Vec<u8>, usize)> {
    proptest::collection::vec((any::<bool>(), proptest::collection::vec(0usize..300, 0..4)), 1..6).prop_map(|streams| {
        let mut out = h2_frame(0x4, 0, 0, &[0; 6]);
        for (i, (split, datas)) in streams.iter().enumerate() {
            let id = (i as u32) * 2 + 1;
            let end_now = if datas.is_empty() { 0x1 } else { 0 };
            if *split {
                out.extend(h2_frame(0x1, end_now, id, b"hpa"));
                out.extend(h2_frame(0x9, 0x4, id, b"ck"));
            } else {
                out.extend(h2_frame(0x1, 0x4 | end_now, id, b"hpack"));
            }
            for (j, len) in datas.iter().enumerate() {
                let last = if j + 1 == datas.len() { 0x1 } else { 0 };
                out.extend(h2_frame(0x0, last, id, &vec![7u8; *len]));
            }
        }
        (out, streams.len())
    })
}

proptest! {
    #![proptest_config(config())]

    /// However Envoy's writes cut its frames, the follower ends where the whole stream ends:
    /// every stream the client opened answered, at a frame boundary, nothing lost.
    #[test]
    fn h2_frames_cut_anywhere_are_followed_to_their_end((stream, n) in h2_server_stream(), cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
        let mut c = close_relay::h2::Connection::new();
        let mut client = close_relay::h2::CLIENT_PREFACE.to_vec();
        client.extend(h2_frame(0x4, 0, 0, &[]));
        for i in 0..n {
            client.extend(h2_frame(0x1, 0x4 | 0x1, (i as u32) * 2 + 1, b"h"));
        }
        c.read(&client);
        prop_assert_eq!(c.open_streams(), n);
        let mut bounds: Vec<usize> = cuts.iter().map(|x| x % (stream.len() + 1)).collect();
        bounds.extend([0, stream.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        for w in bounds.windows(2) {
            c.wrote(&stream[w[0]..w[1]]);
        }
        prop_assert!(c.quiet() && c.may_tell() && !c.lost());
    }

    /// Bytes of any kind never make the follower panic.
    #[test]
    fn h2_any_bytes_are_followed_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut c = close_relay::h2::Connection::new();
        c.read(&bytes);
        c.wrote(&bytes);
        let _ = (c.quiet(), c.may_tell(), c.lost());
    }
}

/// A field name Envoy could write: any token.
fn token_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,24}"
}

/// A field value Envoy could pass on: visible ASCII, spaces and tabs inside, obs-text (bytes
/// past ASCII), or nothing.
fn raw_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![0x21u8..=0x7e, Just(b' '), Just(b'\t'), 0x80u8..=0xff], 0..40)
}

/// A response head as Envoy writes one: a status line, up to 100 fields (its `max_headers_count`).
fn envoy_head() -> impl Strategy<Value = Vec<u8>> {
    (100u16..=599, "[ -~]{0,20}", prop::collection::vec((token_name(), raw_value()), 0..100)).prop_map(|(code, reason, fields)| {
        let mut head = format!("HTTP/1.1 {code} {}\r\n", reason.trim()).into_bytes();
        for (name, value) in fields {
            head.extend(name.into_bytes());
            head.extend(b": ");
            head.extend(value);
            head.extend(b"\r\n");
        }
        head.extend(b"\r\n");
        head
    })
}

/// A head as read: its status and its fields' names and values.
type Read = Option<(u16, Vec<(Vec<u8>, Vec<u8>)>)>;

/// The `httparse` crate's reading of a whole response head: the oracle.
fn httparse_head(head: &[u8]) -> Read {
    let mut fields = [httparse::EMPTY_HEADER; 101];
    let mut response = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(_) = response.parse(head).ok()? else { return None };
    Some((response.code?, response.headers.iter().map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec())).collect()))
}

fn our_head(head: &[u8]) -> Read {
    let (status, fields) = close_relay::http1::response_head(head)?;
    Some((status, fields.into_iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()))
}

proptest! {
    #![proptest_config(config())]

    /// Our reader and `httparse` read every head Envoy writes the same: status, names, values.
    #[test]
    fn the_http1_reader_reads_envoys_heads_as_httparse_does(head in envoy_head()) {
        let ours = our_head(&head);
        prop_assert!(ours.is_some(), "{:?}", String::from_utf8_lossy(&head));
        prop_assert_eq!(ours, httparse_head(&head));
    }

    /// On any bytes after a status line, a head both read whole is read the same.
    #[test]
    fn where_both_readers_take_a_head_they_agree(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend(bytes);
        let Some(end) = close_relay::http1::head_len(&head) else { return Ok(()) };
        let head = &head[..end];
        if let (Some(ours), Some(theirs)) = (our_head(head), httparse_head(head)) {
            prop_assert_eq!(ours, theirs);
        }
    }
}
