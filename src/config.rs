//! Plugin configuration: one serde type, defaults for every field, validation that names the
//! offending field. A bad configuration never stops traffic: the root context logs the error
//! and the plugin passes everything through untouched (fail open).

use serde::Deserialize;
use std::fmt;

/// Which half of the module a plugin instance plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
// Serialize only natively, for e2e checks of the shipped manifests; the .wasm never writes one.
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `envoy.filters.http.wasm`: sees the app's response headers and decides.
    Http,
    /// `envoy.filters.network.wasm` before the HCM: sees the bytes written to the client.
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Role of this instance; when absent it comes from the root id (see [`role_from_root_id`]).
    pub role: Option<Role>,
    /// Master switch: `false` makes both roles pass everything through.
    pub enabled: bool,
    /// Relay the app's own `Connection: close` (and close-delimited responses) to the client.
    pub relay_upstream_close: bool,
    /// After relaying, close the client connection right after the response, in either layout
    /// (across VMs by a note on the network VM's queue; without one, on the client's next
    /// request).
    pub close_connection: bool,
    /// A 5xx Envoy returns because it could not connect to the app closes the client
    /// connection, draining or not, so one ALB connection meets at most one such error.
    pub close_on_connect_failure: bool,
    /// Pod-level drain awareness: close every client connection once the pod is going away.
    pub drain: DrainConfig,
    /// How many bytes of a response head the network role inspects at most. Must exceed the
    /// largest head Envoy lets through (its HTTP/1 codec limit is 60 KiB by default), or the
    /// marker of a larger head could not be rewritten. A `u64` like every number here, so a
    /// value is range-checked as written, never after a cast to wasm32's 32-bit `usize`.
    pub max_head_bytes: u64,
    /// The network role works alone (no HTTP plugin): it follows each response's framing in the
    /// bytes it writes, and reads every drain source from the sidecar's stats. Gives up relaying
    /// the app's own closes and the preStop hook; needs rescue to lose nothing (docs/lean.md).
    pub lean: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            role: None,
            enabled: true,
            relay_upstream_close: true,
            close_connection: true,
            close_on_connect_failure: true,
            drain: DrainConfig::default(),
            max_head_bytes: 96 * 1024,
            lean: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    pub enabled: bool,
    /// How often each VM refreshes the shared drain state and looks for idle connections.
    pub tick_ms: u64,
    /// While draining, a connection with no request in flight and no bytes for this long is
    /// closed. The grace covers a request already on the wire (requests that arrived are
    /// tracked exactly); longer only lets an ALB reuse the connection into a dying pod.
    pub idle_grace_ms: u64,
    /// The idle grace when the app itself is going away (`app_failure`, `app_closes`): it
    /// refuses new connections, so an idle ALB connection left open meets a 503 as soon as it
    /// is reused, while closing it risks only a request crossing the close on the wire.
    pub app_idle_grace_ms: u64,
    /// Sidecar drain: Envoy's admin API (`/ready`, `/stats`) polled through a cluster.
    pub sidecar: SidecarPoll,
    /// App shutdown: Envoy could not connect to the app, or the app reset connections.
    pub app_failure: AppFailure,
    /// App shutdown: many `Connection: close` answers in a short window. Off by default.
    pub app_closes: AppCloses,
    /// App shutdown: its readiness URL fails. Off by default (needs the app's cluster).
    pub app_readiness: ReadinessProbe,
    /// The kubelet's preStop hook, answered by close-relay itself once the pod's client
    /// connections are gone. Off until a token is set.
    pub prestop: Prestop,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            enabled: true,
            tick_ms: 100,
            idle_grace_ms: 250,
            app_idle_grace_ms: 0,
            sidecar: SidecarPoll::default(),
            app_failure: AppFailure::default(),
            app_closes: AppCloses::default(),
            app_readiness: ReadinessProbe::default(),
            prestop: Prestop::default(),
        }
    }
}

/// A request carrying `x-close-relay-prestop: <token>` (the kubelet's `preStop.httpGet`) puts
/// the pod into the `prestop` drain source and is answered by close-relay, never by the app,
/// once no other HTTP/1 client connection is left or after `max_wait_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct Prestop {
    /// The secret the hook's header must carry; without one there is no trigger.
    #[cfg_attr(not(target_arch = "wasm32"), serde(skip_serializing_if = "Option::is_none"))]
    pub token: Option<Secret>,
    /// Or the name of the VM's environment variable that holds it (`vmConfig.env` with
    /// `valueFrom: HOST`, from the proxy's own environment): then the token is in neither the
    /// plugin's resource nor Envoy's config dump, which the app container can read on the
    /// admin port.
    #[cfg_attr(not(target_arch = "wasm32"), serde(skip_serializing_if = "Option::is_none"))]
    pub token_env: Option<String>,
    /// How long the answer waits for the connections to go. The kubelet waits for a hook at
    /// most the pod's grace period (30 s by default) and then sends SIGTERM with what is left.
    pub max_wait_ms: u64,
}

impl Default for Prestop {
    fn default() -> Self {
        Prestop { token: None, token_env: None, max_wait_ms: 20_000 }
    }
}

/// A secret from the configuration: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(transparent)]
pub struct Secret(String);

/// Shorter tokens are refused: the hook's header reaches the app's port from anywhere.
pub const MIN_TOKEN_CHARS: usize = 16;

impl Secret {
    /// Whether `offered` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_bytes().ct_eq(offered))
    }

    pub fn check(&self, field: &str) -> Result<(), ConfigError> {
        let problem = if self.0.chars().count() < MIN_TOKEN_CHARS {
            Some(format!("must be at least {MIN_TOKEN_CHARS} characters (it has {})", self.0.chars().count()))
        } else if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            Some("must be printable ASCII without spaces, as an HTTP header value carries it".into())
        } else {
            None
        };
        problem.map_or(Ok(()), |message| Err(ConfigError { field: Some(field.into()), message }))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} characters, redacted>)", self.0.chars().count())
    }
}

/// The sidecar's own admin API (`/ready`, then `/stats`), polled every `interval_ms`. Its own
/// type, with its own defaults: a config that sets only `interval_ms` keeps the poll on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct SidecarPoll {
    pub enabled: bool,
    pub cluster: String,
    pub authority: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for SidecarPoll {
    fn default() -> Self {
        SidecarPoll {
            enabled: true,
            cluster: "prometheus_stats".into(),
            authority: "localhost".into(),
            interval_ms: 1000,
            timeout_ms: 1000,
        }
    }
}

/// Where a poll goes: the cluster, the `:authority`, and how long to wait for the answer.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub timeout_ms: u64,
}

impl SidecarPoll {
    pub fn target(&self) -> Target<'_> {
        Target { cluster: &self.cluster, authority: &self.authority, timeout_ms: self.timeout_ms }
    }
}

impl ReadinessProbe {
    pub fn target(&self) -> Target<'_> {
        Target { cluster: &self.cluster, authority: &self.authority, timeout_ms: self.timeout_ms }
    }
}

/// The app's readiness URL, probed every `interval_ms` through a cluster the user names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct ReadinessProbe {
    pub enabled: bool,
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed probes before the source turns on.
    pub failures: u32,
}

impl Default for ReadinessProbe {
    fn default() -> Self {
        ReadinessProbe {
            enabled: false,
            cluster: String::new(),
            path: "/ready".into(),
            authority: "localhost".into(),
            interval_ms: 1000,
            timeout_ms: 1000,
            failures: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct AppFailure {
    pub enabled: bool,
    /// Count resets of established connections (UC/UR), not only refused connections (UF).
    pub resets: bool,
    /// Resets (or rescued requests) that must come one after the other, with no answer from
    /// the app between them, before they count as the app going away. A refused connection
    /// counts at once; one reset alone is the keep-alive race a healthy app has too.
    pub in_a_row: u32,
    /// How close two failures must be to count as in a row.
    pub window_ms: u64,
    /// A reset of an upstream connection that carried an answer less than this long before
    /// counts at once: the app is resetting connections it is serving (Tomcat's shutdown). One
    /// of a connection idle longer may be the keep-alive race (the app's idle close crossing
    /// Envoy's reuse) and counts toward `in_a_row`. Keep it below the app's keep-alive idle
    /// timeout; 0: every reset counts toward `in_a_row`.
    pub race_idle_ms: u64,
    /// How long the pod stays draining after the last failure.
    pub hold_ms: u64,
}

impl Default for AppFailure {
    fn default() -> Self {
        AppFailure { enabled: true, resets: true, in_a_row: 2, window_ms: 2_000, race_idle_ms: 1_000, hold_ms: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct AppCloses {
    pub enabled: bool,
    pub threshold: u64,
    pub window_ms: u64,
    pub hold_ms: u64,
}

impl Default for AppCloses {
    fn default() -> Self {
        AppCloses { enabled: false, threshold: 5, window_ms: 2_000, hold_ms: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault, when one can be named.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{}`: {}", field, self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl Config {
    /// Takes what the configuration names from the VM's environment (`drain.prestop.token_env`).
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let field = || Some("drain.prestop.token_env".to_string());
        let Some(name) = self.drain.prestop.token_env.clone() else { return Ok(self) };
        if self.drain.prestop.token.is_some() {
            return Err(ConfigError { field: field(), message: "give the token or the variable that holds it, not both".into() });
        }
        let value = env(&name).ok_or_else(|| ConfigError {
            field: field(),
            message: format!("the VM's environment has no {name:?} (vmConfig.env, valueFrom: HOST)"),
        })?;
        let token = Secret(value);
        token.check("drain.prestop.token_env")?;
        self.drain.prestop.token = Some(token);
        Ok(self)
    }

    /// What only one role may be given: `lean` is the network role alone.
    pub fn check_role(&self, role: Role) -> Result<(), ConfigError> {
        if self.lean && role == Role::Http {
            return Err(ConfigError {
                field: Some("lean".into()),
                message: "is the network role working alone: remove the HTTP plugin, or set lean false in both".into(),
            });
        }
        Ok(())
    }

    /// `max_head_bytes` as a length; validation keeps it far below 4 GiB, so it always fits.
    pub fn max_head(&self) -> usize {
        usize::try_from(self.max_head_bytes).unwrap_or(usize::MAX)
    }
}

/// The role when the configuration does not say: a root id that mentions "network"
/// (`close_relay_network`, Istio's `pluginName`) is the network role, anything else HTTP.
pub fn role_from_root_id(root_id: &str) -> Role {
    if root_id.to_ascii_lowercase().contains("network") {
        Role::Network
    } else {
        Role::Http
    }
}

/// Reads only `role` from a configuration, even one that is otherwise invalid: the host needs
/// to know which kind of context to create before the rest of the config matters.
pub fn role_hint(raw: &[u8]) -> Option<Role> {
    let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    Role::deserialize(value.get("role")?).ok()
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
