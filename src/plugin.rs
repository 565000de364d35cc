//! What the contexts of one plugin instance share: its configuration, its metrics, and the
//! app's failures in a row as its responses show them.

use std::cell::{Cell, RefCell};

use crate::config::Config;
use crate::evidence::Streak;
use crate::metrics::Metrics;

/// What every context of one plugin instance shares. `config` is `None` when the plugin
/// configuration was rejected: the plugin then passes everything through (fail open).
#[derive(Debug)]
pub struct Plugin {
    pub config: Option<Config>,
    pub metrics: Metrics,
    /// The app's failures in a row, as this plugin instance's responses show them (the HTTP
    /// role's, or the lean network role's): per VM, one worker, as reading shared data on every
    /// answer would cost a host call per request; a dying app fails every worker's requests.
    pub streak: RefCell<Streak>,
    /// This VM recorded in shared data that rescue is on ([`crate::keys::RESCUE_SEEN`]).
    pub rescue_recorded: Cell<bool>,
    /// A single reset drained the pod at once ([`crate::podwide::single_reset_allowed`]), with no
    /// failure since to confirm it: the number of the last request begun before it. The app's
    /// answer to a later request disproves it.
    pub unconfirmed_reset: Cell<Option<u64>>,
}

impl Plugin {
    pub fn new(config: Option<Config>, metrics: Metrics) -> Plugin {
        Plugin { config, metrics, streak: RefCell::default(), rescue_recorded: Cell::new(false), unconfirmed_reset: Cell::new(None) }
    }

    /// The configuration if the plugin is active.
    pub fn active(&self) -> Option<&Config> {
        self.config.as_ref().filter(|c| c.enabled)
    }
}
