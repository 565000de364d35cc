//! Unit tests of `src/prestop.rs`.

use super::*;

#[test]
fn only_the_node_with_the_token_and_no_proxy_between_drains_the_pod() {
    let node = Some("10.0.1.7");
    let from = |source| admit(true, true, Some(source), node, false);
    assert_eq!(from("10.0.1.7:43122"), Ok(()), "the kubelet");
    assert_eq!(from("10.0.3.9:43122"), Err(Refusal::NotFromNode), "another pod");
    assert_eq!(from("10.0.1.70:43122"), Err(Refusal::NotFromNode), "a prefix is not the address");
    assert_eq!(admit(true, true, Some("10.0.1.7:1"), node, true), Err(Refusal::Forwarded), "through a proxy that forwards");
    assert_eq!(admit(true, false, Some("10.0.1.7:1"), node, false), Err(Refusal::WrongToken));
    assert_eq!(admit(true, true, Some("10.0.1.7:1"), None, false), Err(Refusal::NoHostIp));
    assert_eq!(admit(true, true, Some("10.0.1.7:1"), Some(" "), false), Err(Refusal::NoHostIp));
    assert_eq!(admit(true, true, None, node, false), Err(Refusal::NotFromNode));
    assert_eq!(admit(false, true, Some("10.0.1.7:1"), node, false), Err(Refusal::Off));
    assert_eq!(admit(true, true, Some("[fd00::7]:5"), Some("fd00::7"), false), Ok(()), "IPv6");
}

#[test]
fn a_hold_ends_when_a_later_read_counts_only_the_hooks_or_at_max_wait() {
    let at = |now, left| outcome(10_000, now, 20_000, left);
    assert_eq!(at(10_500, None), None, "not counted since the hook came");
    assert_eq!(at(11_000, Some(2)), None, "two clients still connected");
    assert_eq!(at(12_000, Some(0)), Some(Outcome::Gone { waited_ms: 2_000 }));
    assert_eq!(at(30_000, Some(3)), Some(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }));
    assert_eq!(at(30_000, None), Some(Outcome::TimedOut { waited_ms: 20_000, left: None }));
    assert_eq!(outcome(10_000, 10_000, 0, None), Some(Outcome::TimedOut { waited_ms: 0, left: None }), "0: at once");
    assert!(body(Outcome::Gone { waited_ms: 2_000 }).contains("no client connection left after 2000 ms"));
    assert!(body(Outcome::TimedOut { waited_ms: 20_000, left: Some(3) }).contains("3 client connections left"));
}
