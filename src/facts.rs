//! What the HTTP role reads from the host for its decision: the request's few facts on the way
//! in, the response's headers in one read, Envoy's response flags, rescue's marks, and the
//! upstream connection the response came on.

use log::{debug, warn};
use proxy_wasm::types::MapType;

use crate::decision::{self, Marks, RequestFacts, ResponseFacts};
use crate::{evidence, host};

thread_local! {
    /// Which upstream connections answered close-delimited responses, to tell an HTTP/2 app
    /// from one that ends its connections.
    static LEARNER: std::cell::RefCell<decision::UnframedLearner> = std::cell::RefCell::default();
}

/// Envoy lets go of the request headers once `on_http_request_headers` returns, so the few
/// request facts the decision may need are taken on the way in: three single reads, of which
/// only `:method` is usually there (an absent header costs no copy into the VM, where a whole-map
/// read copies every header the ALB sent; `make bench`).
pub fn request_facts_on_request() -> RequestFacts {
    let read = |name| host::header(MapType::HttpRequestHeaders, name);
    RequestFacts {
        protocol: String::new(),
        method: read(":method").unwrap_or_default(),
        upgrade: read("upgrade"),
        connection: read("connection"),
    }
}

/// Rescue's marks on this response that this sidecar wrote ([`decision::rescue_marks`]); a
/// refusal marker it did not write is taken off. The route's name is read only when a mark is
/// there at all: with rescue, every response carries an attempt count, few one of 2 or more.
pub fn rescue_marks(headers: &ResponseHeaders, failed: bool, flags: u64) -> Marks {
    if !headers.refused && !decision::rescued(headers.attempt_count.as_deref(), false) {
        return Marks::default();
    }
    let route = host::get_property(&["xds", "route_name"]);
    let on_rescue_route = route.is_some_and(|r| r.starts_with(decision::RESCUE_ROUTE_PREFIX.as_bytes()));
    let marks = decision::rescue_marks(headers.refused, headers.attempt_count.as_deref(), failed, flags, on_rescue_route);
    if marks.copy {
        debug!("{} on a response this sidecar did not refuse: the app's, taken off", decision::REFUSED_HEADER);
        if let Err(e) = host::remove_header(MapType::HttpResponseHeaders, decision::REFUSED_HEADER) {
            warn!("close-relay: cannot take the app's {} off its response: {e:?}", decision::REFUSED_HEADER);
        }
    }
    marks
}

/// The local port of the upstream connection this response came on.
pub fn upstream_port() -> Option<u16> {
    evidence::port_of(&host::get_property(&["upstream", "local_address"])?)
}

pub fn downstream_protocol() -> String {
    let protocol = host::get_property(&["request", "protocol"]).unwrap_or_default();
    String::from_utf8_lossy(&protocol).into_owned()
}

pub fn response_flags() -> u64 {
    let raw = host::get_property(&["response", "flags"]).unwrap_or_default();
    let mut word = [0u8; 8];
    for (slot, byte) in word.iter_mut().zip(raw) {
        *slot = byte;
    }
    u64::from_le_bytes(word)
}

/// The response headers the decision reads, from one whole-map read: a response carries few
/// headers, and one read (one call out of the VM, one copy into it) costs less than the four
/// single reads it replaces (`make bench`).
#[derive(Default)]
pub struct ResponseHeaders {
    status: Option<String>,
    connection: Option<String>,
    proxy_connection: Option<String>,
    content_length: bool,
    transfer_encoding: Option<String>,
    /// `x-envoy-attempt-count`, present where the route includes it in the response (rescue).
    attempt_count: Option<String>,
    /// [`decision::REFUSED_HEADER`]: the pod that made this reply could not reach its app.
    refused: bool,
    /// gRPC's status when the response is trailers-only (Envoy's own reply to a gRPC request).
    pub grpc_status: Option<String>,
}

impl ResponseHeaders {
    pub fn read() -> ResponseHeaders {
        let map = host::header_map(MapType::HttpResponseHeaders).unwrap_or_default();
        ResponseHeaders::from_pairs(crate::codec::pairs(&map))
    }

    /// Only the names the decision reads are copied out; Envoy hands them lower-cased.
    fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> ResponseHeaders {
        let mut h = ResponseHeaders::default();
        for (name, value) in pairs {
            let value = || Some(String::from_utf8_lossy(value).into_owned());
            match name {
                b":status" => h.status = value(),
                b"connection" => h.connection = value(),
                b"proxy-connection" => h.proxy_connection = value(),
                b"content-length" => h.content_length = true,
                b"transfer-encoding" => h.transfer_encoding = value(),
                b"x-envoy-attempt-count" => h.attempt_count = value(),
                b"grpc-status" => h.grpc_status = value(),
                _ if name == decision::REFUSED_HEADER.as_bytes() => h.refused = true,
                _ => {}
            }
        }
        h
    }

    pub fn facts(&self) -> ResponseFacts<'_> {
        ResponseFacts {
            status: self.status.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
            connection: self.connection.as_deref(),
            proxy_connection: self.proxy_connection.as_deref(),
            content_length: self.content_length,
            transfer_encoding: self.transfer_encoding.as_deref(),
        }
    }
}

/// Per VM: whether an unframed response really ends the app's connection (see the learner).
pub fn unframed_ends_connection() -> bool {
    let host = host::get_property(&["upstream", "address"]);
    let local = host::get_property(&["upstream", "local_address"]);
    let (Some(host), Some(local)) = (host, local) else {
        // No upstream connection (a local reply): nothing to learn, and nothing to relay.
        return false;
    };
    LEARNER.with(|l| {
        l.borrow_mut()
            .ends_connection(&String::from_utf8_lossy(&host), &String::from_utf8_lossy(&local))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &'static str)]) -> ResponseHeaders {
        ResponseHeaders::from_pairs(list.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn facts_from_envoy_header_map() {
        let h = headers(&[(":status", "200"), ("content-length", "2"), ("connection", "close")]);
        let f = h.facts();
        assert_eq!((f.status, f.connection, f.content_length), (200, Some("close"), true));
        let h = headers(&[(":status", "200"), ("x-envoy-upstream-service-time", "0")]);
        assert_eq!(decision::upstream_end(&h.facts()), Some(decision::Reason::CloseDelimited));
        let h = headers(&[(":status", "200"), ("transfer-encoding", "chunked"), ("proxy-connection", "Close")]);
        assert_eq!(decision::upstream_end(&h.facts()), Some(decision::Reason::ProxyConnectionClose));
        assert_eq!(headers(&[(":status", "nope")]).facts().status, 0);
        assert_eq!(headers(&[]).facts().status, 0);
    }
}
