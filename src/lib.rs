//! close-relay: makes Envoy pass the app's `Connection: close` on to the client (an AWS ALB)
//! and close that client connection, so the ALB reconnects to a healthy pod instead of
//! reusing a connection into a dying one.
//!
//! One module, two roles, because a wasm HTTP filter alone cannot do it: Envoy treats
//! `Connection` as hop-by-hop, drops a `connection: close` that an HTTP filter sets, and gives an
//! HTTP filter no way to close its client connection.
//! - [`http::HttpRole`], an HTTP filter, sees the app's response headers and decides;
//! - [`network::NetworkRole`], a network filter before the HCM, sees the bytes written to the
//!   client and turns the HTTP role's private marker into `connection: close`.
//!
//! Both roles also watch for the pod going away ([`drain`], [`podwide`], [`queue`], [`root`]): then every
//! client connection is closed, busy ones after their response, idle ones after a short grace;
//! an HTTP/2 one is told first with a graceful GOAWAY ([`h2`]).
//!
//! Decisions live in [`decision`], [`drain`], [`sidecar`], [`evidence`], [`idle`], [`wire`],
//! [`framing`] (lean's view of the responses written) and [`h2`] as pure functions. They read
//! HTTP/1 through one reader, [`http1`]; [`follow`] is the loop `framing` and `h2` share,
//! [`codec`] the host's byte formats. Only [`host`] talks to the host, and none of its calls can
//! panic (`clippy.toml` refuses the SDK's); [`logging`] routes the `log` crate through it.
//! [`config`] is the configuration's type, [`validate`] how it is read. [`facts`] is what the
//! HTTP role reads of a request and a response, [`app`] what a response says about the app (for
//! both roles), [`probe`] the network role's probes of Envoy's drain, [`lean`] the network role
//! working alone. [`podwide`], [`queue`], [`root`] and the two context types act through
//! [`host`]. [`metrics`] holds what the module exports, [`plugin::Plugin`] what one plugin
//! instance's contexts share.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::arithmetic_side_effects))]

mod abi;
pub mod app;
pub mod census;
pub mod codec;
pub mod config;
pub mod conn;
pub mod decision;
pub mod drain;
pub mod evidence;
pub mod facts;
pub mod follow;
pub mod framing;
pub mod h2;
#[cfg(all(test, not(target_arch = "wasm32")))]
mod fake_host;
pub mod host;
pub mod http;
pub mod http1;
pub mod idle;
pub mod keys;
pub mod lean;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod network;
pub mod plugin;
pub mod podwide;
pub mod prestop;
pub mod probe;
pub mod queue;
pub mod root;
pub mod sidecar;
pub mod validate;
pub mod wire;

/// The module's exports after `make build`: the ABI marker, the allocator, and the callbacks the
/// two roles implement. The SDK exports every callback of the ABI, and Envoy enters the VM for
/// each one that is exported, body chunks and `on_log` included; `make build` removes the rest
/// (`e2e/src/bin/trim.rs`), and proxy-wasm-cpp-host skips them. A callback implemented but not
/// named here is never called, so a new one must be added here too.
pub const EXPORTS: &[&str] = &[
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    // Every context: creation and its end. The SDK drops a context in on_delete, and the roles
    // do their end-of-life work on drop, so proxy_on_done (called right before it) is not needed.
    "proxy_on_context_create",
    "proxy_on_delete",
    // Roots (root.rs): configuration, the tick, the polls' answers, the wake queue.
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    "proxy_on_http_call_response",
    "proxy_on_queue_ready",
    // The HTTP role (http.rs).
    "proxy_on_request_headers",
    "proxy_on_response_headers",
    // The network role (network.rs).
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_upstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_connection_close",
];

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    logging::init();
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::default())
    });
}}
