//! The HTTP role: looks at each response from the app, and when the app ended its connection
//! marks the response for the network role and, when both share a VM, closes the client
//! connection once the response is written.

use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::decision::{decide, Decision, RequestFacts, ResponseFacts, SkipReason, UnframedLearner};
use crate::{host, network, wire, Shared};

pub struct HttpRole {
    shared: Rc<Shared>,
    request: RequestFacts,
    /// Nonce of the client connection to close in `on_log`, once the response is complete.
    close_after: Option<String>,
}

impl HttpRole {
    pub fn new(shared: Rc<Shared>) -> Self {
        HttpRole { shared, request: RequestFacts::default(), close_after: None }
    }
}

/// Envoy refuses request headers once the response is being encoded, so the few request
/// facts the decision may need are taken on the way in.
fn request_facts_on_request() -> RequestFacts {
    RequestFacts {
        protocol: String::new(),
        method: host::header(MapType::HttpRequestHeaders, ":method").unwrap_or_default(),
        upgrade: host::header(MapType::HttpRequestHeaders, "upgrade"),
        connection: host::header(MapType::HttpRequestHeaders, "connection"),
    }
}

fn downstream_protocol() -> String {
    let protocol = host::get_property(vec!["request", "protocol"]).unwrap_or_default();
    String::from_utf8_lossy(&protocol).into_owned()
}

fn response_facts(headers: &[(String, String)]) -> ResponseFacts<'_> {
    let mut facts = ResponseFacts::default();
    for (name, value) in headers {
        match name.as_str() {
            ":status" => facts.status = value.parse().unwrap_or(0),
            "connection" => facts.connection = Some(value),
            "proxy-connection" => facts.proxy_connection = Some(value),
            "content-length" => facts.content_length = true,
            "transfer-encoding" => facts.transfer_encoding = Some(value),
            _ => {}
        }
    }
    facts
}

/// Per VM: whether an unframed response really ends the app's connection (see the learner).
fn unframed_ends_connection() -> bool {
    let host = host::get_property(vec!["upstream", "address"]);
    let local = host::get_property(vec!["upstream", "local_address"]);
    let (Some(host), Some(local)) = (host, local) else {
        // No upstream connection (a local reply): nothing to learn, and nothing to relay.
        return false;
    };
    LEARNER.with(|l| {
        l.borrow_mut()
            .ends_connection(&String::from_utf8_lossy(&host), &String::from_utf8_lossy(&local))
    })
}

thread_local! {
    static LEARNER: std::cell::RefCell<UnframedLearner> = std::cell::RefCell::default();
    static WARNED_NO_NETWORK_ROLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Context for HttpRole {}

impl HttpContext for HttpRole {
    fn on_http_request_headers(&mut self, _: usize, _end_of_stream: bool) -> Action {
        if self.shared.active().is_some() {
            self.request = request_facts_on_request();
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.shared.active() else {
            return Action::Continue;
        };
        let metrics = self.shared.metrics;
        metrics.responses.inc();
        let Ok(headers) = hostcalls::get_map(MapType::HttpResponseHeaders) else {
            return Action::Continue;
        };
        let facts = response_facts(&headers);
        let request = &mut self.request;
        let decision = decide(
            &facts,
            || RequestFacts { protocol: downstream_protocol(), ..std::mem::take(request) },
            unframed_ends_connection,
        );
        let end = match decision {
            Decision::Keep => return Action::Continue,
            Decision::Skip(reason) => {
                metrics.skipped(reason).inc();
                debug!("app ended its connection; not relayed: {}", reason.as_str());
                return Action::Continue;
            }
            Decision::Relay(end) => end,
        };
        if !config.relay_upstream_close {
            debug!("app ended its connection ({}); relay_upstream_close is off", end.as_str());
            return Action::Continue;
        }
        let Some(nonce) = host::get_property(vec![host::NONCE_PROPERTY]) else {
            metrics.skipped(SkipReason::NoNetworkRole).inc();
            if !WARNED_NO_NETWORK_ROLE.replace(true) {
                warn!(
                    "close-relay: no network role on this listener, cannot relay the app's \
                     connection close; add the NETWORK filter before the HTTP connection manager"
                );
            }
            return Action::Continue;
        };
        let nonce = String::from_utf8_lossy(&nonce).into_owned();
        if hostcalls::add_map_value(MapType::HttpResponseHeaders, wire::MARKER, &nonce).is_err() {
            return Action::Continue;
        }
        metrics.relayed.inc();
        debug!("app ended its connection ({}); relaying connection: close", end.as_str());
        if config.close_connection {
            self.close_after = Some(nonce);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(nonce) = self.close_after.take() else { return };
        let Some(connection) = network::context_for(&nonce) else {
            debug!("network role is in another VM; it closes on the next request");
            return;
        };
        // The network role's context owns the client connection; acting as it, the close
        // flushes the response already written and then closes.
        let closed = host::set_effective_context(connection).and_then(|_| host::close_downstream());
        match closed {
            Ok(()) => {
                self.shared.metrics.connections_closed.inc();
                debug!("closed client connection after relayed response");
            }
            Err(e) => debug!("could not close client connection: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::EndReason;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn facts_from_envoy_header_map() {
        let h = pairs(&[(":status", "200"), ("content-length", "2"), ("connection", "close")]);
        let f = response_facts(&h);
        assert_eq!((f.status, f.connection, f.content_length), (200, Some("close"), true));
        let h = pairs(&[(":status", "200"), ("x-envoy-upstream-service-time", "0")]);
        assert_eq!(crate::decision::upstream_end(&response_facts(&h)), Some(EndReason::CloseDelimited));
        let h = pairs(&[(":status", "nope")]);
        assert_eq!(response_facts(&h).status, 0);
    }
}
