//! What the contexts of one plugin instance share: its configuration and its metrics.

use crate::config::Config;
use crate::metrics::Metrics;

/// What every context of one plugin instance shares. `config` is `None` when the plugin
/// configuration was rejected: the plugin then passes everything through (fail open).
#[derive(Debug)]
pub struct Shared {
    pub config: Option<Config>,
    pub metrics: Metrics,
}

impl Shared {
    /// The configuration if the plugin is active.
    pub fn active(&self) -> Option<&Config> {
        self.config.as_ref().filter(|c| c.enabled)
    }
}
