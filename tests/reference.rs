//! `docs/configuration.md` against `src/config.rs`: every option the type accepts is in the
//! table and nothing else is; each default and type is the one `Config::default()` has; each
//! range is the one validation enforces (both bounds accepted, one past either refused with the
//! option named). The option names come from the type itself: serde's "expected one of" list
//! for each object, so a field added to `config.rs` without a row fails here. And the docs'
//! links: every relative one leads to a file.

use close_relay::config::Config;
use serde_json::{json, Value};

mod common;
use common::{config_with, ranges, rows, DOC};

fn parse(raw: &str) -> Result<Config, close_relay::config::ConfigError> {
    Config::parse(raw.as_bytes())
}

/// Every option path the type accepts: the fields serde names for an unknown one at each
/// object, recursing into those whose default is an object.
fn options() -> Vec<String> {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let mut out = Vec::new();
    let mut objects = vec![String::new()];
    while let Some(prefix) = objects.pop() {
        let probe = if prefix.is_empty() { "no_such_option".to_string() } else { format!("{prefix}.no_such_option") };
        let message = parse(&config_with(&probe, "1")).unwrap_err().message;
        // serde: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`".
        let listed = message.rsplit("expected ").next().unwrap_or_default().trim_start_matches("one of ");
        for field in listed.split(", ").flat_map(|f| f.split(" or ")).map(|f| f.trim_matches('`')) {
            let path = if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") };
            let default = path.split('.').try_fold(&defaults, |v, k| v.get(k));
            if default.is_some_and(Value::is_object) {
                objects.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_reference_lists_every_option_and_no_other() {
    let documented: Vec<String> = rows().into_keys().collect();
    assert_eq!(documented, options(), "docs/configuration.md against src/config.rs");
}

#[test]
fn each_default_and_type_is_the_modules() {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for (path, row) in rows() {
        let default = path.split('.').try_fold(&defaults, |v, k| v.get(k)).filter(|v| !v.is_null());
        match default {
            None => assert_eq!(row.default, "none", "{path}"),
            Some(v) => assert_eq!(serde_json::from_str::<Value>(&row.default).ok().as_ref(), Some(v), "{path}: default"),
        }
        let kind = match default {
            Some(Value::Bool(_)) => "bool",
            Some(Value::Number(_)) => "integer",
            Some(Value::String(_)) => "string",
            // No default: the type is what the module accepts.
            _ => {
                let sample = if row.kind.contains("\"network\"") { json!("network") } else { json!("a-token-of-16-chars") };
                assert!(parse(&config_with(&path, &sample.to_string())).is_ok(), "{path}: {} not accepted", row.kind);
                continue;
            }
        };
        assert_eq!(row.kind, kind, "{path}: type");
        assert!(!row.meaning.is_empty(), "{path}: no meaning");
    }
}

#[test]
fn each_range_is_the_one_validation_enforces() {
    for (path, row) in rows() {
        assert!(row.kind != "integer" || row.range.contains("..="), "{path}: every integer has a range");
    }
    for (path, lo, hi) in ranges() {
        // An option of a source that is off is only checked once the source is on: `config_with`
        // switches the readiness probe on.
        let with = |n: u128| parse(&config_with(&path, &n.to_string()));
        assert!(with(lo).is_ok() && with(hi).is_ok(), "{path}: {lo} or {hi} refused");
        for n in [lo.checked_sub(1), Some(hi + 1)].into_iter().flatten() {
            let refused = with(n).expect_err(&format!("{path}: {n} accepted"));
            assert_eq!(refused.field.as_deref(), Some(path.as_str()), "{path}: {n}: {}", refused.message);
        }
    }
}

#[test]
fn the_logged_errors_shown_are_the_modules() {
    for (config, shown) in [(json!({"bogus_option": 1}), "field `bogus_option`: "), (json!({"drain": {"idle_grace_ms": 4294967396u64}}), "field `drain.idle_grace_ms`: ")] {
        let e = parse(&config.to_string()).unwrap_err();
        let line = format!("invalid plugin configuration: {shown}{}", e.message);
        assert!(DOC.contains(&line), "docs/configuration.md should show: {line}");
    }
}

/// The README and the docs link to each other and to the repository's files: every relative
/// link leads to a file that exists, so a page moved or renamed breaks `make test`.
#[test]
fn every_relative_link_in_the_docs_leads_to_a_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut links = 0;
    for page in pages.iter().filter(|p| p.extension().is_some_and(|e| e == "md")) {
        let text = std::fs::read_to_string(page).unwrap();
        for target in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            let file = target.split('#').next().unwrap_or_default();
            if file.is_empty() || file.contains("://") {
                continue;
            }
            let dir = page.parent().unwrap();
            assert!(dir.join(file).exists(), "{}: link to {target} leads nowhere", page.display());
            links += 1;
        }
    }
    assert!(links > 20, "only {links} links found");
}
