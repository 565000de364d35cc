//! Reading a plugin configuration: JSON in, [`Config`] out, or an error that names the field at
//! fault and the range it must be in. A role whose configuration is refused passes traffic
//! through (`root.rs`).

use std::fmt;

use serde::Deserialize;

use serde_json::Value;

use crate::config::{Config, ConfigError};

const MAX_HEAD_BYTES_RANGE: (u64, u64) = (1024, 8 * 1024 * 1024);

impl Config {
    /// Parses the plugin configuration. Empty input (Istio's default) means all defaults.
    pub fn parse(raw: &[u8]) -> Result<Config, ConfigError> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Config::default());
        }
        let value: Value = serde_json::from_slice(raw)
            .map_err(|e| ConfigError { field: None, message: format!("not valid JSON: {e}") })?;
        if !value.is_object() {
            return Err(ConfigError { field: None, message: "must be a JSON object".into() });
        }
        let config = Config::deserialize(&value).map_err(|e| at_fault(&value, e))?;
        config.validate()?;
        Ok(config)
    }

    /// What serde cannot say: ranges, and the options that need one another.
    fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.drain;
        in_range("max_head_bytes", self.max_head_bytes, MAX_HEAD_BYTES_RANGE)?;
        in_range("drain.tick_ms", d.tick_ms, (10, 10_000))?;
        in_range("drain.idle_grace_ms", d.idle_grace_ms, (0, 600_000))?;
        in_range("drain.app_idle_grace_ms", d.app_idle_grace_ms, (0, 600_000))?;
        in_range("drain.app_failure.hold_ms", d.app_failure.hold_ms, (0, 3_600_000))?;
        in_range("drain.app_failure.in_a_row", d.app_failure.in_a_row, (1, 1_000))?;
        in_range("drain.app_failure.window_ms", d.app_failure.window_ms, (1, 3_600_000))?;
        in_range("drain.app_failure.race_idle_ms", d.app_failure.race_idle_ms, (0, 3_600_000))?;
        in_range("drain.app_closes.threshold", d.app_closes.threshold, (1, 1_000_000))?;
        in_range("drain.app_closes.window_ms", d.app_closes.window_ms, (1, 3_600_000))?;
        in_range("drain.app_closes.hold_ms", d.app_closes.hold_ms, (0, 3_600_000))?;
        in_range("drain.prestop.max_wait_ms", d.prestop.max_wait_ms, (0, 3_600_000))?;
        if let Some(token) = &d.prestop.token {
            token.check("drain.prestop.token")?;
            if !d.sidecar.enabled {
                return Err(ConfigError {
                    field: Some("drain.prestop.token".into()),
                    message: "needs drain.sidecar enabled: the hook's answer counts the pod's \
                              client connections in Envoy's stats"
                        .into(),
                });
            }
        }
        if self.lean {
            let why = if d.prestop.token.is_some() || d.prestop.token_env.is_some() {
                Some(("drain.prestop.token", "lean has no HTTP role to answer the preStop hook"))
            } else if !(d.enabled && d.sidecar.enabled) {
                Some(("drain.sidecar", "lean reads every drain source from the sidecar's stats: needs drain and drain.sidecar enabled"))
            } else {
                None
            };
            if let Some((field, message)) = why {
                return Err(ConfigError { field: Some(field.into()), message: message.into() });
            }
        }
        let (sidecar, probe) = (&d.sidecar, &d.app_readiness);
        if sidecar.enabled {
            check_target("drain.sidecar", &sidecar.cluster, sidecar.interval_ms, sidecar.timeout_ms)?;
        }
        if probe.enabled {
            check_target("drain.app_readiness", &probe.cluster, probe.interval_ms, probe.timeout_ms)?;
            in_range("drain.app_readiness.failures", probe.failures, (1, 1000))?;
            if !probe.path.starts_with('/') {
                return Err(ConfigError {
                    field: Some("drain.app_readiness.path".into()),
                    message: format!("{:?} must start with /", probe.path),
                });
            }
        }
        Ok(())
    }
}

/// What an enabled poll needs: a cluster to go through and sane timings.
fn check_target(name: &str, cluster: &str, interval_ms: u64, timeout_ms: u64) -> Result<(), ConfigError> {
    if cluster.is_empty() {
        return Err(ConfigError {
            field: Some(format!("{name}.cluster")),
            message: "must name an Envoy cluster when enabled".into(),
        });
    }
    in_range(&format!("{name}.interval_ms"), interval_ms, (50, 3_600_000))?;
    in_range(&format!("{name}.timeout_ms"), timeout_ms, (10, 60_000))
}

/// Checked on the field's own type: no cast can turn an out-of-range value into one in range.
fn in_range<T: PartialOrd + fmt::Display>(field: &str, value: T, (lo, hi): (T, T)) -> Result<(), ConfigError> {
    if lo <= value && value <= hi {
        return Ok(());
    }
    Err(ConfigError {
        field: Some(field.into()),
        message: format!("{value} is out of range {lo}..={hi}"),
    })
}

/// Names the field at fault by its dotted path (`drain.sidecar.interval_ms`), an unknown one
/// too, with the deserializer's own message. Only a configuration already refused gets here:
/// the object is narrowed level by level to the one key that still fails alone
/// (`#[serde(default)]` fills the rest), which costs a few more deserializations and no code for
/// every field's type.
/// A number too large for its field is refused with its type (past 2^64 JSON parses it as a
/// float).
fn at_fault(value: &Value, error: serde_json::Error) -> ConfigError {
    let (mut narrowed, mut path, mut error) = (value.clone(), Vec::<String>::new(), error);
    // The configuration nests three objects deep; the bound only keeps the loop finite.
    for _ in 0..8 {
        let Some(object) = pointer(&narrowed, &path).and_then(Value::as_object) else { break };
        let failing = object.iter().find_map(|(key, field)| {
            let mut trial = narrowed.clone();
            let at = pointer_mut(&mut trial, &path)?;
            *at = Value::Object(serde_json::Map::from_iter([(key.clone(), field.clone())]));
            Config::deserialize(&trial).err().map(|e| (key.clone(), trial, e))
        });
        let Some((key, trial, e)) = failing else { break };
        (narrowed, error) = (trial, e);
        path.push(key);
    }
    let path = path.join(".");
    let mut message = error.to_string();
    // serde quotes a string it did not expect: under `drain.prestop` that may be the token.
    if path.starts_with("drain.prestop") {
        if let (Some(open), Some(close)) = (message.find('"'), message.rfind('"')) {
            if open < close {
                message.replace_range(open..=close, "<redacted>");
            }
        }
    }
    ConfigError { field: (!path.is_empty()).then_some(path), message }
}

fn pointer<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn pointer_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, key| v.get_mut(key))
}
