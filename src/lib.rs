//! close-relay: makes Envoy pass the app's `Connection: close` on to the client (an AWS ALB)
//! and close that client connection, so the ALB reconnects to a healthy pod instead of
//! reusing a connection into a dying one.
//!
//! One module, two roles (see `../shared/BRIEF.md` for why two are needed):
//! - [`http::HttpRole`], an HTTP filter, sees the app's response headers and decides;
//! - [`network::NetworkRole`], a network filter before the HCM, sees the bytes written to the
//!   client and turns the HTTP role's private marker into `connection: close`.
//!
//! Decisions live in [`decision`] and [`wire`] as pure functions; everything that talks to the
//! host is in [`host`] and the two context types.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod decision;
pub mod host;
pub mod http;
pub mod network;
pub mod wire;

use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType};

use config::{Config, Role};
use host::Metrics;

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

pub struct Root {
    role: Role,
    shared: Rc<Shared>,
}

impl Default for Root {
    fn default() -> Self {
        Root { role: Role::Http, shared: Rc::new(Shared { config: None, metrics: Metrics::default() }) }
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        host::follow_host_log_level();
        let raw = host::get_buffer(BufferType::PluginConfiguration, usize::MAX).unwrap_or_default();
        let root_id = host::get_property(vec!["plugin_root_id"]).unwrap_or_default();
        let root_id = String::from_utf8_lossy(&root_id);
        self.role = config::role_hint(&raw).unwrap_or_else(|| config::role_from_root_id(&root_id));
        let metrics = Metrics::define();
        let config = match Config::parse(&raw) {
            Ok(config) => {
                info!("close-relay {:?} role ready (root id {root_id:?}): {config:?}", self.role);
                Some(config)
            }
            Err(e) => {
                metrics.config_errors.inc();
                error!(
                    "close-relay {:?} role DISABLED, passing traffic through: invalid plugin \
                     configuration: {e}",
                    self.role
                );
                None
            }
        };
        self.shared = Rc::new(Shared { config, metrics });
        // Returning false would make Envoy reject the plugin; we fail open instead.
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(match self.role {
            Role::Http => ContextType::HttpContext,
            Role::Network => ContextType::StreamContext,
        })
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(http::HttpRole::new(self.shared.clone())))
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(network::NetworkRole::new(id, self.shared.clone())))
    }
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}
