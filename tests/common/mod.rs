//! What `tests/reference.rs` and `tests/properties.rs` share: the configuration reference's
//! table (`docs/configuration.md`), read as the one statement of each option's range, and
//! configurations that set one option by its path.

// Each test crate uses part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const DOC: &str = include_str!("../../docs/configuration.md");

#[derive(Debug)]
pub struct Row {
    pub kind: String,
    pub default: String,
    pub range: String,
    pub meaning: String,
}

/// The table's rows by option path; its cells with the backticks taken off.
pub fn rows() -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in DOC.lines().filter(|l| l.starts_with("| `")) {
        // `\|` is a pipe inside a cell.
        let line = line.replace("\\|", "\u{1}");
        let cells: Vec<String> =
            line.trim_matches('|').split('|').map(|c| c.trim().replace('\u{1}', "|")).collect();
        assert_eq!(cells.len(), 5, "a row of five cells: {line}");
        let unquote = |c: &str| c.trim_matches('`').to_string();
        let row = Row { kind: cells[1].clone(), default: unquote(&cells[2]), range: unquote(&cells[3]), meaning: cells[4].clone() };
        assert!(rows.insert(unquote(&cells[0]), row).is_none(), "listed twice: {}", cells[0]);
    }
    rows
}

/// Every option with an integer range (`lo..=hi`), as the reference documents it.
pub fn ranges() -> Vec<(String, u128, u128)> {
    rows()
        .into_iter()
        .filter_map(|(path, row)| {
            let (lo, hi) = row.range.split_once("..=")?;
            let bound = |b: &str| b.parse().unwrap_or_else(|e| panic!("{path}: range bound {b:?}: {e}"));
            let (lo, hi) = (bound(lo), bound(hi));
            Some((path, lo, hi))
        })
        .collect()
}

/// `{"drain": {"sidecar": {"interval_ms": <value>}}}` for `drain.sidecar.interval_ms`, with the
/// readiness probe switched on so its options are checked. `value` is JSON text: it may be
/// past 2^64, which no Rust integer holds.
pub fn config_with(path: &str, value: &str) -> String {
    const PLACEHOLDER: &str = "__value__";
    let mut root = serde_json::json!({});
    let mut at = &mut root;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, key) in keys.iter().enumerate() {
        if *key == "app_readiness" {
            at[*key] = serde_json::json!({"enabled": true, "cluster": "app"});
        }
        if i + 1 == keys.len() {
            at[*key] = serde_json::json!(PLACEHOLDER);
        } else if at.get(*key).is_none() {
            at[*key] = serde_json::json!({});
        }
        at = &mut at[*key];
    }
    root.to_string().replace(&format!("\"{PLACEHOLDER}\""), value)
}
