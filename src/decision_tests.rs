//! Unit tests of `src/decision.rs`.

use super::*;

#[test]
fn a_refusal_is_evidence_at_once_a_reset_or_a_rescue_only_in_a_row() {
    assert_eq!(app_said(Upstream::Refused, false, true), AppSaid::Refused);
    assert_eq!(app_said(Upstream::Reset, false, true), AppSaid::Failed);
    assert_eq!(app_said(Upstream::Reset, false, false), AppSaid::Answered, "resets not counted");
    assert_eq!(app_said(Upstream::Fine, true, false), AppSaid::Failed, "rescued: the app failed it");
    assert_eq!(app_said(Upstream::Fine, false, true), AppSaid::Answered);
}

#[test]
fn a_grpc_failure_is_a_failure_whatever_its_http_status() {
    assert!(failed(503, None));
    assert!(failed(200, Some("14")), "Envoy's UNAVAILABLE for a gRPC request it could not take to the app");
    assert!(!failed(200, Some("0")));
    assert!(!failed(200, None));
    assert_eq!(upstream(failed(200, Some("14")), FLAG_UPSTREAM_CONNECTION_FAILURE, false), Upstream::Refused);
    assert_eq!(upstream(failed(200, Some("14")), 0, false), Upstream::Fine, "the app's own UNAVAILABLE, after running the call");
}

#[test]
fn rescue_marks_count_only_where_this_sidecar_wrote_them() {
    let uf = FLAG_UPSTREAM_CONNECTION_FAILURE;
    let marks = |marker, count, status: u16, flags, route| rescue_marks(marker, count, status >= 500, flags, route);
    assert_eq!(marks(true, Some("1"), 503, uf, true), Marks { refused: true, ..Marks::default() }, "this Envoy's own refusal");
    assert_eq!(marks(true, Some("3"), 503, 0, true), Marks { refused: true, ..Marks::default() }, "the last pod tried refused too");
    assert_eq!(marks(false, Some("2"), 200, 0, true), Marks { rescued: true, ..Marks::default() });
    let copy = Marks { copy: true, ..Marks::default() };
    assert_eq!(marks(true, Some("1"), 503, 0, true), copy, "the local app passed a dependency's refusal on");
    assert_eq!(marks(true, None, 503, uf, false), copy, "no rescue route: nobody here writes it");
    assert_eq!(marks(true, Some("2"), 200, 0, true), copy, "never on an answer");
    assert_eq!(marks(false, Some("3"), 200, 0, false), Marks::default(), "the app's own attempt count, rescue not installed");
    assert_eq!(marks(false, Some("1"), 200, 0, true), Marks::default());
}

#[test]
fn only_a_retry_that_was_answered_is_a_rescue() {
    assert!(rescued(Some("2"), false));
    assert!(rescued(Some(" 3"), false));
    assert!(!rescued(Some("1"), false), "the local app answered");
    assert!(!rescued(Some("2"), true), "the pod tried refused as well");
    assert!(!rescued(Some("3"), true), "no pod to try: Envoy tried the app again");
    assert!(!rescued(None, false), "no rescue route: nothing known");
    assert!(!rescued(Some("two"), false));
    assert!(!rescued(Some("99999999999"), false), "out of range: nothing known");
}

#[test]
fn a_rescued_response_closes_its_connection_even_when_the_app_kept_it() {
    let signals = Signals { rescued: true, ..calm() };
    let keep_alive = ResponseFacts { status: 200, content_length: true, ..Default::default() };
    assert_eq!(decide(&keep_alive, signals, h11, || true), Decision::Relay(Reason::Rescued));
    let failed = Signals { connect_failure: true, rescued: true, ..calm() };
    assert_eq!(decide(&keep_alive, failed, h11, || true), Decision::Relay(Reason::ConnectFailure));
    assert_eq!(relayed(Reason::Rescued, false, false), Some(Reason::Rescued), "Envoy's reason, not the app's");
}

#[test]
fn response_flags_say_refused_or_reset_only_on_a_5xx() {
    assert_eq!(upstream(503 >= 500, FLAG_UPSTREAM_CONNECTION_FAILURE, false), Upstream::Refused);
    assert_eq!(upstream(503 >= 500, FLAG_UPSTREAM_CONNECTION_FAILURE | FLAG_UPSTREAM_REMOTE_RESET, false), Upstream::Refused);
    assert_eq!(upstream(503 >= 500, FLAG_UPSTREAM_REMOTE_RESET, false), Upstream::Reset);
    assert_eq!(upstream(503 >= 500, FLAG_UPSTREAM_CONNECTION_TERMINATION, false), Upstream::Reset);
    assert_eq!(upstream(503 >= 500, 0, false), Upstream::Fine, "the app's own 503");
    assert_eq!(upstream(200 >= 500, FLAG_UPSTREAM_CONNECTION_FAILURE, false), Upstream::Fine);
    assert_eq!(upstream(503 >= 500, 0, true), Upstream::Refused, "the pod it was handed to refused too");
    assert_eq!(upstream(200 >= 500, 0, true), Upstream::Fine, "only a 5xx is a refusal");
}

#[test]
fn relay_upstream_close_off_keeps_the_apps_close_unless_draining() {
    assert_eq!(relayed(Reason::ConnectionClose, true, false), Some(Reason::ConnectionClose));
    assert_eq!(relayed(Reason::ConnectionClose, false, false), None);
    assert_eq!(relayed(Reason::CloseDelimited, false, true), Some(Reason::Draining));
    assert_eq!(relayed(Reason::ConnectFailure, false, false), Some(Reason::ConnectFailure));
    assert_eq!(relayed(Reason::Draining, false, true), Some(Reason::Draining));
}

fn ok(connection: Option<&str>) -> ResponseFacts<'_> {
    ResponseFacts { status: 200, connection, content_length: true, ..Default::default() }
}

fn yes() -> bool {
    true
}

fn calm() -> Signals {
    Signals::default()
}

fn h11() -> RequestFacts {
    RequestFacts { protocol: "HTTP/1.1".into(), method: "GET".into(), ..Default::default() }
}

#[test]
fn keep_alive_is_the_fast_path() {
    assert_eq!(upstream_end(&ok(None)), None);
    assert_eq!(upstream_end(&ok(Some("keep-alive"))), None);
    let chunked = ResponseFacts {
        status: 200,
        transfer_encoding: Some("gzip, Chunked"),
        ..Default::default()
    };
    assert_eq!(upstream_end(&chunked), None);
    let mut called = false;
    assert_eq!(
        decide(
            &ok(None),
            calm(),
            || {
                called = true;
                h11()
            },
            || unreachable!("framing is not consulted on the keep-alive path")
        ),
        Decision::Keep
    );
    assert!(!called, "request facts must not be read on the keep-alive path");
}

#[test]
fn connection_close_relays() {
    assert_eq!(decide(&ok(Some("Close")), calm(), h11, yes), Decision::Relay(Reason::ConnectionClose));
    let proxy = ResponseFacts { proxy_connection: Some("close"), ..ok(None) };
    assert_eq!(decide(&proxy, calm(), h11, yes), Decision::Relay(Reason::ProxyConnectionClose));
}

#[test]
fn close_delimited_relays_but_not_for_head_or_bodyless() {
    let eof = ResponseFacts { status: 200, ..Default::default() };
    assert_eq!(decide(&eof, calm(), h11, yes), Decision::Relay(Reason::CloseDelimited));
    let head = || RequestFacts { method: "HEAD".into(), ..h11() };
    assert_eq!(decide(&eof, calm(), head, yes), Decision::Keep);
    for status in [204, 304] {
        let r = ResponseFacts { status, ..Default::default() };
        assert_eq!(upstream_end(&r), None, "{status}");
    }
    // HEAD with an explicit close still relays.
    assert_eq!(decide(&ok(Some("close")), calm(), head, yes), Decision::Relay(Reason::ConnectionClose));
}

#[test]
fn unframed_response_from_a_multiplexed_app_keeps() {
    let eof = ResponseFacts { status: 200, ..Default::default() };
    assert_eq!(decide(&eof, calm(), h11, || false), Decision::Keep);
}

#[test]
fn learner_tells_close_delimited_from_http2() {
    let mut l = UnframedLearner::default();
    // HTTP/1 close-delimited: every response on a fresh upstream connection.
    assert!(l.ends_connection("10.0.0.1:8080", "127.0.0.1:40001"));
    assert!(l.ends_connection("10.0.0.1:8080", "127.0.0.1:40002"));
    assert!(l.ends_connection("10.0.0.1:8080", "127.0.0.1:40003"));
    // HTTP/2: the second response on the same connection gives it away, for good.
    assert!(l.ends_connection("10.0.0.2:8080", "127.0.0.1:50001"));
    assert!(!l.ends_connection("10.0.0.2:8080", "127.0.0.1:50001"));
    assert!(!l.ends_connection("10.0.0.2:8080", "127.0.0.1:50002"));
    // Hosts are independent.
    assert!(l.ends_connection("10.0.0.1:8080", "127.0.0.1:40004"));
}

#[test]
fn learner_is_bounded() {
    let mut l = UnframedLearner::default();
    for i in 0..10 * LEARNER_CAPACITY {
        l.ends_connection(&format!("h{i}"), "l");
    }
    assert!(l.hosts.len() <= LEARNER_CAPACITY);
}

#[test]
fn draining_closes_every_final_http11_response() {
    let draining = Signals { draining: true, ..calm() };
    assert_eq!(decide(&ok(None), draining, h11, yes), Decision::Relay(Reason::Draining));
    // The app's own reason wins when it has one.
    assert_eq!(decide(&ok(Some("close")), draining, h11, yes), Decision::Relay(Reason::ConnectionClose));
    // Unframed from an HTTP/2 app, or HEAD: still closed, because draining.
    let eof = ResponseFacts { status: 200, ..Default::default() };
    assert_eq!(decide(&eof, draining, h11, || false), Decision::Relay(Reason::Draining));
    // Skips still apply.
    let h2 = || RequestFacts { protocol: "HTTP/2".into(), ..h11() };
    assert_eq!(decide(&ok(None), draining, h2, yes), Decision::Skip(SkipReason::NotHttp11));
    let ws = || RequestFacts { upgrade: Some("websocket".into()), ..h11() };
    assert_eq!(decide(&ok(None), draining, ws, yes), Decision::Skip(SkipReason::Upgrade));
}

#[test]
fn a_request_sent_behind_a_close_is_answered_with_close() {
    let closing = Signals { closing: true, ..calm() };
    assert_eq!(decide(&ok(None), closing, h11, yes), Decision::Relay(Reason::Pipelined));
    assert_eq!(decide(&ok(Some("close")), closing, h11, yes), Decision::Relay(Reason::ConnectionClose));
    let eof = ResponseFacts { status: 200, ..Default::default() };
    assert_eq!(decide(&eof, closing, h11, || false), Decision::Relay(Reason::Pipelined));
    let both = Signals { draining: true, ..closing };
    assert_eq!(decide(&ok(None), both, h11, yes), Decision::Relay(Reason::Draining));
    let h10 = || RequestFacts { protocol: "HTTP/1.0".into(), ..h11() };
    assert_eq!(decide(&ok(None), closing, h10, yes), Decision::Skip(SkipReason::NotHttp11));
}

#[test]
fn connect_failure_always_closes() {
    let failed = ResponseFacts { status: 503, content_length: true, ..Default::default() };
    let signals = Signals { connect_failure: true, ..calm() };
    assert_eq!(decide(&failed, signals, h11, yes), Decision::Relay(Reason::ConnectFailure));
    assert_eq!(decide(&failed, calm(), h11, yes), Decision::Keep);
}

#[test]
fn skips() {
    let close = ok(Some("close"));
    let h2 = || RequestFacts { protocol: "HTTP/2".into(), ..h11() };
    assert_eq!(decide(&close, calm(), h2, yes), Decision::Skip(SkipReason::NotHttp11));
    let h10 = || RequestFacts { protocol: "HTTP/1.0".into(), ..h11() };
    assert_eq!(decide(&close, calm(), h10, yes), Decision::Skip(SkipReason::NotHttp11));
    let ws = || RequestFacts { upgrade: Some("websocket".into()), ..h11() };
    assert_eq!(decide(&close, calm(), ws, yes), Decision::Skip(SkipReason::Upgrade));
    let conn_upgrade = || RequestFacts { connection: Some("keep-alive, Upgrade".into()), ..h11() };
    assert_eq!(decide(&close, calm(), conn_upgrade, yes), Decision::Skip(SkipReason::Upgrade));
    let connect = || RequestFacts { method: "CONNECT".into(), ..h11() };
    assert_eq!(decide(&close, calm(), connect, yes), Decision::Skip(SkipReason::Connect));
    let switching = ResponseFacts { status: 101, ..close };
    assert_eq!(decide(&switching, calm(), h11, yes), Decision::Skip(SkipReason::Informational));
}

#[test]
fn reason_names_are_prometheus_friendly() {
    for r in SkipReason::ALL {
        assert!(r.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()));
    }
}
