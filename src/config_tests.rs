//! Unit tests of `src/config.rs`.

use super::*;

#[test]
fn empty_config_is_all_defaults() {
    assert_eq!(Config::parse(b""), Ok(Config::default()));
    assert_eq!(Config::parse(b"  \n"), Ok(Config::default()));
    assert_eq!(Config::parse(b"{}"), Ok(Config::default()));
}

#[test]
fn every_field_parses() {
    let c = Config::parse(
        br#"{"role":"network","enabled":false,"relay_upstream_close":false,
             "close_connection":false,"max_head_bytes":4096}"#,
    )
    .unwrap();
    assert_eq!(c.role, Some(Role::Network));
    assert!(!c.enabled && !c.relay_upstream_close && !c.close_connection);
    assert_eq!(c.max_head_bytes, 4096);
}

#[test]
fn unknown_field_is_named() {
    let e = Config::parse(br#"{"enabled":true,"bogus_field":1}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("bogus_field"));
    assert!(e.to_string().contains("bogus_field"), "{e}");
}

#[test]
fn wrong_type_is_named_with_value() {
    let e = Config::parse(br#"{"enabled":true,"close_connection":"yes"}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("close_connection"));
    assert!(e.to_string().contains("\"yes\""), "{e}");
}

#[test]
fn bad_role_is_named() {
    let e = Config::parse(br#"{"role":"both"}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("role"));
}

#[test]
fn out_of_range_is_named() {
    let e = Config::parse(br#"{"max_head_bytes":1}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("max_head_bytes"));
    assert!(Config::parse(br#"{"max_head_bytes":99999999}"#).is_err());
}

#[test]
fn drain_section_defaults_and_nested_errors() {
    let c = Config::parse(br#"{"drain": {"idle_grace_ms": 250}}"#).unwrap();
    assert_eq!(c.drain.idle_grace_ms, 250);
    assert_eq!(c.drain.sidecar.cluster, "prometheus_stats");
    assert!(c.drain.sidecar.enabled && c.drain.app_failure.enabled && !c.drain.app_closes.enabled);
    let e = Config::parse(br#"{"drain": {"sidecar": {"clustr": "x"}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.sidecar.clustr"));
    assert!(e.message.contains("clustr"), "{e}");
    let e = Config::parse(br#"{"drain": {"app_readiness": {"enabled": true}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.app_readiness.cluster"));
    let e = Config::parse(br#"{"drain": {"tick_ms": 0}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.tick_ms"));
    let e = Config::parse(
        br#"{"drain": {"app_readiness": {"enabled": true, "cluster": "app", "path": "ready"}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.app_readiness.path"));
    // A disabled sidecar poll needs no cluster.
    assert!(Config::parse(br#"{"drain": {"sidecar": {"enabled": false, "cluster": ""}}}"#).is_ok());
    // Setting one field of the sidecar poll keeps its other defaults, `enabled` first.
    let c = Config::parse(br#"{"drain": {"sidecar": {"interval_ms": 500}}}"#).unwrap();
    assert!(c.drain.sidecar.enabled && c.drain.sidecar.cluster == "prometheus_stats");
    // Only the readiness probe has a path and counts failures.
    let e = Config::parse(br#"{"drain": {"sidecar": {"failures": 2}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.sidecar.failures"));
}

#[test]
fn numbers_past_32_and_64_bits_are_refused_as_written() {
    // 2^32 + 100 would be 100 after a cast to wasm32's usize: it must fail as itself.
    let e = Config::parse(br#"{"drain": {"idle_grace_ms": 4294967396}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.idle_grace_ms"));
    assert!(e.message.contains("4294967396"), "{e}");
    let e = Config::parse(br#"{"max_head_bytes": 4294968320}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("max_head_bytes"));
    let e = Config::parse(br#"{"drain": {"app_readiness": {"failures": 4294967297}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.app_readiness.failures"));
    let e = Config::parse(br#"{"drain": {"tick_ms": 18446744073709551716}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.tick_ms"));
    let e = Config::parse(br#"{"drain": {"app_closes": {"threshold": -1}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.app_closes.threshold"));
}

#[test]
fn the_prestop_token_may_come_from_the_vms_environment() {
    let named = |json: &str| Config::parse(json.as_bytes()).unwrap();
    let c = named(r#"{"drain": {"prestop": {"token_env": "CLOSE_RELAY_PRESTOP_TOKEN"}}}"#);
    let token = "from-the-proxy-env-0123456789";
    let resolved = c.clone().with_env(|k| (k == "CLOSE_RELAY_PRESTOP_TOKEN").then(|| token.to_string())).unwrap();
    assert!(resolved.drain.prestop.token.unwrap().matches(token.as_bytes()));
    let e = c.clone().with_env(|_| None).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.prestop.token_env"));
    assert!(!e.to_string().contains(token));
    assert!(c.with_env(|_| Some("short".into())).is_err(), "too short");
    let both = named(r#"{"drain": {"prestop": {"token": "e2e-prestop-token-0123456789", "token_env": "X"}}}"#);
    assert!(both.with_env(|_| Some(token.into())).is_err());
    assert_eq!(named("{}").with_env(|_| None).unwrap(), Config::default());
}

#[test]
fn the_prestop_token_is_checked_compared_in_constant_time_and_never_shown() {
    assert_eq!(Config::parse(b"{}").unwrap().drain.prestop.token, None, "no token: no trigger");
    let token = "s3cret-0123456789abcdef";
    let c = Config::parse(format!(r#"{{"drain": {{"prestop": {{"token": "{token}"}}}}}}"#).as_bytes()).unwrap();
    let secret = c.drain.prestop.token.clone().unwrap();
    assert!(secret.matches(token.as_bytes()));
    assert!(!secret.matches(b"s3cret-0123456789abcdeX") && !secret.matches(b"s3cret") && !secret.matches(b""));
    assert_eq!(c.drain.prestop.max_wait_ms, 20_000);
    assert!(!format!("{c:?}").contains(token), "the configuration as logged shows the token");
    for bad in ["short-token", "has a space in it, 1234", "non-ascii-é-0123456789"] {
        let e = Config::parse(format!(r#"{{"drain": {{"prestop": {{"token": "{bad}"}}}}}}"#).as_bytes()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("drain.prestop.token"), "{e}");
        assert!(!e.to_string().contains(bad.split(' ').next().unwrap_or(bad)), "the error shows the token: {e}");
    }
    let e = Config::parse(format!(r#"{{"drain": {{"prestop": {{"max_wait_ms": "{token}"}}}}}}"#).as_bytes()).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.prestop.max_wait_ms"));
    assert!(!e.to_string().contains(token), "{e}");
    let e = Config::parse(
        format!(r#"{{"drain": {{"sidecar": {{"enabled": false}}, "prestop": {{"token": "{token}"}}}}}}"#).as_bytes(),
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.prestop.token"));
    assert!(e.message.contains("drain.sidecar"), "{e}");
}

#[test]
fn not_json_or_not_object() {
    assert!(Config::parse(b"{nope").unwrap_err().message.contains("not valid JSON"));
    assert!(Config::parse(b"[1]").unwrap_err().message.contains("object"));
}

#[test]
fn lean_is_the_network_role_alone_with_the_sidecar_poll() {
    let c = Config::parse(br#"{"lean": true}"#).unwrap();
    assert!(c.lean && c.check_role(Role::Network).is_ok());
    assert_eq!(c.check_role(Role::Http).unwrap_err().field.as_deref(), Some("lean"));
    let e = Config::parse(br#"{"lean": true, "drain": {"sidecar": {"enabled": false}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.sidecar"));
    let e = Config::parse(br#"{"lean": true, "drain": {"prestop": {"token": "0123456789abcdefgh"}}}"#).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("drain.prestop.token"));
    assert!(!Config::default().lean);
}

#[test]
fn role_from_root_id_and_hint() {
    assert_eq!(role_from_root_id("close_relay_network"), Role::Network);
    assert_eq!(role_from_root_id("close-relay-NETWORK"), Role::Network);
    assert_eq!(role_from_root_id("close_relay_http"), Role::Http);
    assert_eq!(role_from_root_id(""), Role::Http);
    assert_eq!(role_hint(br#"{"role":"network","bogus":1}"#), Some(Role::Network));
    assert_eq!(role_hint(br#"{"role":7}"#), None);
    assert_eq!(role_hint(b"garbage"), None);
}
