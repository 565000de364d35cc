//! A fake proxy-wasm host for native tests: the ABI functions `host.rs` imports, defined here
//! over one thread's state (time, shared data with compare-and-swap, queues, properties,
//! buffers, header maps, metrics, closes). The contexts and `host.rs` itself run unchanged
//! against it, so configure, the marker round trip, the sweep and drain transitions are tested
//! in milliseconds, beside the real-Envoy suites. Only in `cargo test` builds off wasm32.
//!
//! One thread is one host and one VM: the host here and the VM's state (`crate::vm`) are
//! thread-locals, so each test, on its own thread as cargo runs them, starts on a fresh pair;
//! [`reset`] clears the host, not the VM.

#![allow(clippy::disallowed_types)] // a test host off wasm32, where std's seed cannot fail

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

#[derive(Default)]
pub struct Fake {
    pub now_ns: u64,
    pub shared_data: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    pub queues: HashMap<u32, VecDeque<Vec<u8>>>,
    queue_names: HashMap<Vec<u8>, u32>,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    /// By `BufferType` number.
    pub buffers: HashMap<u32, Vec<u8>>,
    /// Reads of each buffer, by `BufferType` number.
    pub buffer_reads: HashMap<u32, u32>,
    /// By `MapType` number, in order.
    pub maps: HashMap<u32, Vec<(String, String)>>,
    pub effective_context: u32,
    /// Effective contexts whose stream was closed, in order.
    pub closed: Vec<u32>,
    /// Local responses sent: the effective context, the status, the body.
    pub local_responses: Vec<(u32, u32, Vec<u8>)>,
    pub metrics: Vec<(String, i64)>,
    pub tick_ms: u32,
    /// WASI's `random_get` fails, as a host without a random source would.
    pub no_random: bool,
    /// `proxy_set_buffer_bytes` fails, as a host that cannot edit the buffer would.
    pub no_buffer_edits: bool,
    pub random_calls: u64,
}

thread_local! {
    static FAKE: RefCell<Fake> = RefCell::new(Fake::default());
}

/// Resets the host to an empty one at `now_ms`.
pub fn reset(now_ms: u64) {
    FAKE.with(|f| *f.borrow_mut() = Fake { now_ns: now_ms * 1_000_000, ..Fake::default() });
    // The tick clock too, as a root's first tick would set it.
    crate::host::now_ms();
}

pub fn with<T>(f: impl FnOnce(&mut Fake) -> T) -> T {
    FAKE.with(|fake| f(&mut fake.borrow_mut()))
}

/// A metric's value by name (0 when never defined).
pub fn metric(name: &str) -> i64 {
    with(|f| f.metrics.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v))
}

/// Hands `bytes` to the module as the host does: memory the module then owns (`host::owned`).
unsafe fn hand_over(bytes: &[u8], data: *mut *mut u8, size: *mut usize) {
    let boxed: Box<[u8]> = bytes.into();
    let len = boxed.len();
    *data = Box::into_raw(boxed).cast::<u8>();
    *size = len;
}

unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

#[no_mangle]
extern "C" fn proxy_log(_level: u32, _message: *const u8, _size: usize) -> u32 {
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_log_level(level: *mut u32) -> u32 {
    *level = 5;
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32 {
    *time = with(|f| f.now_ns);
    OK
}

#[no_mangle]
extern "C" fn proxy_set_tick_period_milliseconds(period: u32) -> u32 {
    with(|f| f.tick_ms = period);
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_buffer_bytes(buffer: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    let bytes = with(|f| {
        *f.buffer_reads.entry(buffer).or_default() += 1;
        f.buffers.get(&buffer).cloned()
    });
    let Some(bytes) = bytes else { return NOT_FOUND };
    let from = start.min(bytes.len());
    let to = from.saturating_add(max).min(bytes.len());
    hand_over(&bytes[from..to], data, size);
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_set_buffer_bytes(buffer: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32 {
    let with_bytes = slice(data, data_size).to_vec();
    if with(|f| f.no_buffer_edits) {
        return 10; // InternalFailure
    }
    with(|f| {
        let buf = f.buffers.entry(buffer).or_default();
        let from = start.min(buf.len());
        let to = from.saturating_add(size).min(buf.len());
        buf.splice(from..to, with_bytes);
    });
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32 {
    let pairs = with(|f| f.maps.get(&map).cloned().unwrap_or_default());
    hand_over(&crate::codec::encode_pairs(&pairs), data, size);
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_header_map_value(
    map: u32,
    key: *const u8,
    key_size: usize,
    value: *mut *mut u8,
    value_size: *mut usize,
) -> u32 {
    let key = String::from_utf8_lossy(slice(key, key_size)).into_owned();
    let found = with(|f| f.maps.get(&map).and_then(|m| m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())));
    match found {
        Some(v) => {
            hand_over(v.as_bytes(), value, value_size);
            OK
        }
        None => NOT_FOUND,
    }
}

#[no_mangle]
unsafe extern "C" fn proxy_add_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32 {
    let pair = (String::from_utf8_lossy(slice(key, key_size)).into_owned(), String::from_utf8_lossy(slice(value, value_size)).into_owned());
    with(|f| f.maps.entry(map).or_default().push(pair));
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32 {
    let key = String::from_utf8_lossy(slice(key, key_size)).into_owned();
    with(|f| f.maps.entry(map).or_default().retain(|(k, _)| *k != key));
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_property(path: *const u8, path_size: usize, value: *mut *mut u8, value_size: *mut usize) -> u32 {
    let path = slice(path, path_size).to_vec();
    match with(|f| f.properties.get(&path).cloned()) {
        Some(v) => {
            hand_over(&v, value, value_size);
            OK
        }
        None => NOT_FOUND,
    }
}

#[no_mangle]
unsafe extern "C" fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, size: usize) -> u32 {
    let (path, value) = (slice(path, path_size).to_vec(), slice(value, size).to_vec());
    with(|f| f.properties.insert(path, value));
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_get_shared_data(
    key: *const u8,
    key_size: usize,
    value: *mut *mut u8,
    value_size: *mut usize,
    cas: *mut u32,
) -> u32 {
    let key = slice(key, key_size).to_vec();
    match with(|f| f.shared_data.get(&key).cloned()) {
        Some((v, c)) => {
            hand_over(&v, value, value_size);
            *cas = c;
            OK
        }
        None => NOT_FOUND,
    }
}

#[no_mangle]
unsafe extern "C" fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32 {
    let (key, value) = (slice(key, key_size).to_vec(), slice(value, value_size).to_vec());
    with(|f| {
        let current = f.shared_data.get(&key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return CAS_MISMATCH;
        }
        f.shared_data.insert(key, (value, current + 1));
        OK
    })
}

#[no_mangle]
unsafe extern "C" fn proxy_register_shared_queue(name: *const u8, name_size: usize, token: *mut u32) -> u32 {
    let name = slice(name, name_size).to_vec();
    *token = with(|f| {
        let next = u32::try_from(f.queue_names.len()).unwrap_or(u32::MAX) + 1;
        let t = *f.queue_names.entry(name).or_insert(next);
        f.queues.entry(t).or_default();
        t
    });
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_enqueue_shared_queue(token: u32, value: *const u8, value_size: usize) -> u32 {
    let item = slice(value, value_size).to_vec();
    with(|f| match f.queues.get_mut(&token) {
        Some(q) => {
            q.push_back(item);
            OK
        }
        None => NOT_FOUND,
    })
}

#[no_mangle]
unsafe extern "C" fn proxy_dequeue_shared_queue(token: u32, value: *mut *mut u8, value_size: *mut usize) -> u32 {
    match with(|f| f.queues.get_mut(&token).and_then(VecDeque::pop_front)) {
        Some(item) => {
            hand_over(&item, value, value_size);
            OK
        }
        None => 7, // Empty
    }
}

#[no_mangle]
extern "C" fn proxy_close_stream(_stream: u32) -> u32 {
    with(|f| {
        let id = f.effective_context;
        f.closed.push(id);
    });
    OK
}

#[no_mangle]
extern "C" fn proxy_set_effective_context(id: u32) -> u32 {
    with(|f| f.effective_context = id);
    OK
}

/// A local response: recorded against the effective context, with its status and body.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn proxy_send_local_response(
    status: u32,
    _details: *const u8,
    _details_size: usize,
    body: *const u8,
    body_size: usize,
    _headers: *const u8,
    _headers_size: usize,
    _grpc_status: i32,
) -> u32 {
    let body = slice(body, body_size).to_vec();
    with(|f| {
        let id = f.effective_context;
        f.local_responses.push((id, status, body));
    });
    OK
}

#[no_mangle]
unsafe extern "C" fn proxy_define_metric(_kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32 {
    let name = String::from_utf8_lossy(slice(name, name_size)).into_owned();
    *id = with(|f| match f.metrics.iter().position(|(n, _)| *n == name) {
        Some(i) => u32::try_from(i).unwrap_or(u32::MAX),
        None => {
            f.metrics.push((name, 0));
            u32::try_from(f.metrics.len() - 1).unwrap_or(u32::MAX)
        }
    });
    OK
}

#[no_mangle]
extern "C" fn proxy_increment_metric(id: u32, offset: i64) -> u32 {
    with(|f| f.metrics.get_mut(id as usize).map_or(NOT_FOUND, |(_, v)| {
        *v += offset;
        OK
    }))
}

/// WASI's random source: a counter's bytes, distinct on every call, or the errno a host without
/// one returns (`ENOSYS`).
#[no_mangle]
unsafe extern "C" fn random_get(buf: *mut u8, len: usize) -> i32 {
    with(|f| {
        if f.no_random {
            return 52;
        }
        f.random_calls += 1;
        let bytes = f.random_calls.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
        for i in 0..len {
            *buf.add(i) = bytes[i % 8];
        }
        0
    })
}

#[no_mangle]
extern "C" fn proxy_record_metric(id: u32, value: u64) -> u32 {
    with(|f| f.metrics.get_mut(id as usize).map_or(NOT_FOUND, |(_, v)| {
        *v = i64::try_from(value).unwrap_or(i64::MAX);
        OK
    }))
}

/// An HTTP call out (the roots' polls): the fake has no cluster, so it answers as Envoy does for
/// an unknown one, InternalFailure, and the root logs that the source is blind.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
extern "C" fn proxy_http_call(
    _upstream: *const u8,
    _upstream_size: usize,
    _headers: *const u8,
    _headers_size: usize,
    _body: *const u8,
    _body_size: usize,
    _trailers: *const u8,
    _trailers_size: usize,
    _timeout_ms: u32,
    _token: *mut u32,
) -> u32 {
    10
}

/// ABI functions the SDK references (its `hostcalls`, behind default trait methods) and the
/// filter never calls: defined so the test binary links, each answering Unimplemented. Calling
/// one is a test bug (their real arguments are not declared here).
macro_rules! never_called {
    ($($name:ident),* $(,)?) => {$(
        #[no_mangle]
        extern "C" fn $name() -> u32 {
            12
        }
    )*};
}

never_called!(
    proxy_call_foreign_function,
    proxy_continue_stream,
    proxy_done,
    proxy_get_status,
    proxy_grpc_call,
    proxy_grpc_cancel,
    proxy_grpc_close,
    proxy_grpc_send,
    proxy_grpc_stream,
    proxy_replace_header_map_value,
    proxy_resolve_shared_queue,
    proxy_set_header_map_pairs,
);

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use proxy_wasm::traits::{HttpContext, RootContext, StreamContext};
    use proxy_wasm::types::{BufferType, MapType};

    use super::*;
    use crate::config::Config;
    use crate::drain::{Source, UNTIL_CLEARED};
use crate::idle::Grace;
    use crate::http::HttpRole;
    use crate::metrics::Metrics;
    use crate::network::NetworkRole;
    use crate::plugin::Plugin;
    use crate::{conn, keys, podwide, root};

    const START_MS: u64 = 1_000_000;

    /// As a network root configured with a tick and a clock leaves the VM: sweeping.
    fn plugin(config: Config) -> Rc<Plugin> {
        conn::set_sweeping(true);
        Rc::new(Plugin::new(Some(config), Metrics::define()))
    }

    fn set_map(map: MapType, pairs: &[(&str, &str)]) {
        with(|f| f.maps.insert(map as u32, pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    }

    fn set_buffer(buffer: BufferType, bytes: &[u8]) {
        with(|f| f.buffers.insert(buffer as u32, bytes.to_vec()));
    }

    fn buffer(buffer: BufferType) -> Vec<u8> {
        with(|f| f.buffers.get(&(buffer as u32)).cloned().unwrap_or_default())
    }

    fn advance(ms: u64) {
        with(|f| f.now_ns += ms * 1_000_000);
        crate::host::now_ms();
    }

    /// A connection whose network role and HTTP role share this VM, one request in.
    fn connection(id: u32, plugin: &Rc<Plugin>) -> (NetworkRole, HttpRole) {
        let mut net = NetworkRole::new(id, plugin.clone());
        net.on_new_connection();
        set_buffer(BufferType::DownstreamData, b"GET / HTTP/1.1\r\nhost: alb\r\n\r\n");
        net.on_downstream_data(30, false);
        with(|f| f.properties.insert(b"request\0protocol".to_vec(), b"HTTP/1.1".to_vec()));
        set_map(MapType::HttpRequestHeaders, &[(":method", "GET")]);
        let mut http = HttpRole::new(2, plugin.clone());
        http.on_http_request_headers(0, true);
        (net, http)
    }

    /// What the network role published for the connection last made.
    fn published() -> String {
        let handle = with(|f| f.properties.get(keys::ADDRESS_PROPERTY.as_bytes()).cloned()).unwrap_or_default();
        String::from_utf8_lossy(&handle).into_owned()
    }

    fn marked_with(handle: &str) -> bool {
        with(|f| f.maps[&(MapType::HttpResponseHeaders as u32)].iter().any(|(k, v)| k == crate::wire::MARKER && v == handle))
    }

    /// A connection whose first response is the app's close, marked by the HTTP role and its
    /// head (as Envoy writes it, the app's `connection` dropped) rewritten by the network role:
    /// the roles, the marker's value and that head.
    fn relayed_close(id: u32, plugin: &Rc<Plugin>) -> (NetworkRole, HttpRole, String, String) {
        let (mut net, mut http) = connection(id, plugin);
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("connection", "close"), ("content-length", "2")]);
        http.on_http_response_headers(0, false);
        let handle = published();
        assert!(marked_with(&handle), "the response carries the marker with this connection's address");
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{}: {handle}\r\n\r\nok", crate::wire::MARKER);
        set_buffer(BufferType::UpstreamData, head.as_bytes());
        net.on_upstream_data(head.len(), false);
        (net, http, handle, head)
    }

    /// The connections a sweep closes `ms` later, with the default graces, nothing draining.
    fn swept_after(ms: u64, plugin: &Rc<Plugin>) -> Vec<u32> {
        advance(ms);
        conn::sweep(false, true, Grace::for_sweep(250, 0, 100, false), &plugin.metrics);
        with(|f| f.closed.clone())
    }

    #[test]
    fn without_a_random_value_a_connection_passes_through_unmarked_and_nothing_panics() {
        reset(START_MS);
        with(|f| f.no_random = true);
        let plugin = plugin(Config::default());
        let (mut net, mut http) = connection(9, &plugin);
        assert_eq!(published(), "", "no guessable handle is published");
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("connection", "close"), ("content-length", "2")]);
        http.on_http_response_headers(0, false);
        assert!(with(|f| f.maps[&(MapType::HttpResponseHeaders as u32)].iter().all(|(k, _)| k != crate::wire::MARKER)));
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        set_buffer(BufferType::UpstreamData, head);
        net.on_upstream_data(head.len(), false);
        assert_eq!(buffer(BufferType::UpstreamData), head, "the response untouched");
    }

    #[test]
    fn the_apps_close_is_marked_rewritten_and_its_connection_closed_after_the_response() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let (_net, http, _, _) = relayed_close(7, &plugin);
        assert_eq!(buffer(BufferType::UpstreamData), b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        drop(http); // the stream ends; the client was told, and may close first
        assert!(with(|f| f.closed.is_empty()), "never from inside the stream's end");
        assert!(swept_after(300, &plugin).is_empty(), "not before the sidecar's grace, as Envoy's delayed close");
        assert_eq!(swept_after(100, &plugin), vec![7], "quiet: closed on the sweep");
        assert_eq!(metric("close_relay_relayed_total"), 1);
        assert_eq!(metric("close_relay_connections_closed_total"), 1);
    }

    #[test]
    fn a_held_write_the_host_would_not_hold_back_goes_out_once() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let (mut net, mut http) = connection(10, &plugin);
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("connection", "close"), ("content-length", "2")]);
        http.on_http_response_headers(0, false);
        let handle = published();
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{}: {handle}\r\n\r\nok", crate::wire::MARKER);
        let (first, rest) = head.as_bytes().split_at(20);
        set_buffer(BufferType::UpstreamData, first);
        with(|f| f.no_buffer_edits = true);
        net.on_upstream_data(first.len(), false);
        assert_eq!(buffer(BufferType::UpstreamData), first, "not held back: it goes out as it is");
        with(|f| f.no_buffer_edits = false);
        set_buffer(BufferType::UpstreamData, rest);
        net.on_upstream_data(rest.len(), false);
        assert_eq!(buffer(BufferType::UpstreamData), rest, "the next write carries only its own bytes");
    }

    #[test]
    fn requests_the_client_sent_behind_a_relayed_close_are_answered_with_close_before_it() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let (mut net, http, handle, head) = relayed_close(8, &plugin);
        drop(http);
        assert_eq!(published(), format!("{handle}!"), "the connection is published as closing");

        // A request pipelined in the same read as the first: the HCM dispatches it now, and its
        // HTTP role reads that the connection is closing.
        set_map(MapType::HttpRequestHeaders, &[(":method", "GET")]);
        let mut second = HttpRole::new(2, plugin.clone());
        second.on_http_request_headers(0, true);
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("content-length", "2")]);
        second.on_http_response_headers(0, false);
        assert!(marked_with(&handle), "its answer closes too");
        assert_eq!(metric("close_relay_relayed_total"), 2);
        assert!(swept_after(1_000, &plugin).is_empty(), "never with that request in flight");

        drop(second);

        // One sent after it, read later: left as it is (a request with `connection: close`
        // would make Envoy drop any the client pipelined behind it), and answered with close.
        let next = b"GET /next HTTP/1.1\r\nhost: alb\r\n\r\n";
        set_buffer(BufferType::DownstreamData, next);
        net.on_downstream_data(next.len(), false);
        assert_eq!(buffer(BufferType::DownstreamData), next);
        let mut third = HttpRole::new(2, plugin.clone());
        third.on_http_request_headers(0, true);
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("content-length", "2")]);
        third.on_http_response_headers(0, false);
        assert_eq!(metric("close_relay_relayed_total"), 3);
        set_buffer(BufferType::UpstreamData, head.as_bytes());
        net.on_upstream_data(head.len(), false);
        drop(third);
        assert!(swept_after(300, &plugin).is_empty(), "within the grace after the last answer");
        assert_eq!(swept_after(100, &plugin), vec![8], "closed once quiet after the last one");
        assert_eq!(metric("close_relay_requests_closed_total"), 0);
    }

    /// Envoy answered bytes its filters never saw as a request (a 400 or 426 from its codec, or
    /// no HTTP role on this chain): no finished request accounts for them, so the sweep leaves
    /// the connection to Envoy, which closes it when the client does or after its delayed
    /// close, instead of closing it under a client that may still be sending.
    #[test]
    fn a_draining_pod_never_sweeps_a_connection_whose_bytes_no_request_accounts_for() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let mut net = NetworkRole::new(13, plugin.clone());
        net.on_new_connection();
        let head = b"PUT /url HTTP/1.0\r\n\r\n";
        set_buffer(BufferType::DownstreamData, head);
        net.on_downstream_data(head.len(), false);
        let answer = b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\nconnection: close\r\n\r\nUpgrade Required";
        set_buffer(BufferType::UpstreamData, answer);
        net.on_upstream_data(answer.len(), false);
        podwide::enter(Source::SidecarHealth, UNTIL_CLEARED, &plugin.metrics);
        let grace = Grace::for_sweep(250, 0, 100, podwide::app_going());
        for _ in 0..5 {
            advance(400);
            conn::sweep(true, true, grace, &plugin.metrics);
        }
        assert!(with(|f| f.closed.is_empty()), "closed under a client that may still be sending");
    }

    #[test]
    fn a_draining_pod_sweeps_an_idle_connection_on_the_second_look_and_never_a_busy_one() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let (mut idle_net, idle_http) = connection(11, &plugin);
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("content-length", "2")]);
        set_buffer(BufferType::UpstreamData, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        idle_net.on_upstream_data(40, false);
        drop(idle_http);
        let (_busy_net, _busy_http) = connection(12, &plugin);
        podwide::enter(Source::SidecarHealth, UNTIL_CLEARED, &plugin.metrics);
        assert!(podwide::draining());
        let grace = Grace::for_sweep(250, 0, 100, podwide::app_going());
        advance(400);
        conn::sweep(true, true, grace, &plugin.metrics);
        assert!(with(|f| f.closed.is_empty()), "first look: wait a tick");
        advance(100);
        conn::sweep(true, true, grace, &plugin.metrics);
        assert_eq!(with(|f| f.closed.clone()), vec![11], "the idle one, not the one with a request in flight");
        assert_eq!(metric("close_relay_idle_closed_total"), 1);
        assert_eq!(metric("close_relay_drain_entered_sidecar_health_total"), 1);
    }

    #[test]
    fn a_bad_configuration_is_counted_and_the_plugin_passes_everything_through() {
        reset(START_MS);
        set_buffer(BufferType::PluginConfiguration, br#"{"drain": {"idle_grace_ms": "soon"}}"#);
        let mut root = root::Root::default();
        assert!(root.on_configure(0), "never refuses a configuration: fail open");
        assert_eq!(metric("close_relay_config_errors_total"), 1);
        let Some(mut http) = root.create_http_context(3) else { panic!("no HTTP context") };
        set_map(MapType::HttpResponseHeaders, &[(":status", "200"), ("connection", "close")]);
        http.on_http_response_headers(0, false);
        assert_eq!(with(|f| f.maps[&(MapType::HttpResponseHeaders as u32)].len()), 2, "no marker added");
        assert_eq!(metric("close_relay_relayed_total"), 0);
    }

    #[test]
    fn notes_from_an_http_role_in_another_vm_count_the_request_until_it_ends() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let mut net = NetworkRole::new(21, plugin.clone());
        net.on_new_connection();
        let handle = with(|f| f.properties.get(keys::ADDRESS_PROPERTY.as_bytes()).cloned()).unwrap_or_default();
        let handle = String::from_utf8_lossy(&handle).into_owned();
        let note = |n: &crate::link::Note| crate::link::Note::decode(&n.encode());
        let grace = Grace::for_sweep(250, 0, 100, false);
        let sweep_twice = || {
            advance(1_000);
            conn::sweep(true, true, grace, &plugin.metrics);
            advance(100);
            conn::sweep(true, true, grace, &plugin.metrics);
        };
        set_buffer(BufferType::DownstreamData, b"GET / HTTP/1.1\r\nhost: alb\r\n\r\n");
        net.on_downstream_data(30, false);
        note(&crate::link::Note::Begin(handle.clone())).iter().for_each(conn::hear);
        podwide::enter(Source::SidecarHealth, UNTIL_CLEARED, &plugin.metrics);
        sweep_twice();
        assert!(with(|f| f.closed.is_empty()), "a request in flight is never swept");
        note(&crate::link::Note::End(handle)).iter().for_each(conn::hear);
        set_buffer(BufferType::UpstreamData, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        net.on_upstream_data(40, false);
        sweep_twice();
        assert_eq!(with(|f| f.closed.clone()), vec![21], "once the end note came");
    }

    fn configured_root(config: &str) -> root::Root {
        set_buffer(BufferType::PluginConfiguration, config.as_bytes());
        let mut root = root::Root::default();
        assert!(root.on_configure(0));
        root
    }

    #[test]
    fn the_sidecars_ready_answer_turns_the_drain_on_and_off() {
        reset(START_MS);
        let mut root = configured_root("{}");
        root.on_ready(503, b"DRAINING");
        assert!(podwide::draining());
        assert_eq!(metric("close_relay_drain_entered_sidecar_health_total"), 1);
        root.on_ready(503, b"DRAINING");
        assert_eq!(metric("close_relay_drain_entered_sidecar_health_total"), 1, "entered once");
        root.on_ready(200, b"LIVE");
        assert!(!podwide::draining(), "healthcheck/ok ends it");
        root.on_ready(503, b"no healthy upstream");
        assert!(!podwide::draining(), "a 503 that does not say DRAINING is no evidence");
    }

    /// A lean connection (the network role alone) with one request read.
    fn lean_connection(id: u32, plugin: &Rc<Plugin>) -> NetworkRole {
        let mut net = NetworkRole::new(id, plugin.clone());
        net.on_new_connection();
        let request = b"GET / HTTP/1.1\r\nhost: alb\r\n\r\n";
        set_buffer(BufferType::DownstreamData, request);
        net.on_downstream_data(request.len(), false);
        net
    }

    fn write(net: &mut NetworkRole, bytes: &[u8]) {
        set_buffer(BufferType::UpstreamData, bytes);
        net.on_upstream_data(bytes.len(), false);
    }

    #[test]
    fn lean_sweeps_a_connection_only_once_its_response_is_out_and_tells_the_next_one_to_close() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut slow = lean_connection(31, &plugin);
        write(&mut slow, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n");
        let mut quiet = lean_connection(32, &plugin);
        write(&mut quiet, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        podwide::enter(Source::SidecarHealth, UNTIL_CLEARED, &plugin.metrics);
        let grace = Grace::for_sweep(250, 0, 100, podwide::app_going());
        for _ in 0..3 {
            advance(400);
            conn::sweep(true, true, grace, &plugin.metrics);
        }
        assert_eq!(with(|f| f.closed.clone()), vec![32], "the idle one; the stream paused mid-body stays");
        write(&mut slow, b"0\r\n\r\n");
        set_buffer(BufferType::DownstreamData, b"GET / HTTP/1.1\r\nhost: alb\r\n\r\n");
        slow.on_downstream_data(29, false);
        write(&mut slow, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(buffer(BufferType::UpstreamData), b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        for _ in 0..2 {
            advance(400);
            conn::sweep(true, true, grace, &plugin.metrics);
        }
        assert_eq!(with(|f| f.closed.clone()), vec![32, 31]);
        assert_eq!(metric("close_relay_closed_while_draining_total"), 1);
    }

    #[test]
    fn lean_drains_on_two_rescued_answers_in_a_row_and_not_on_one() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut net = lean_connection(41, &plugin);
        let rescued = b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 2\r\ncontent-length: 0\r\n\r\n";
        write(&mut net, rescued);
        write(&mut net, b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 1\r\ncontent-length: 0\r\n\r\n");
        write(&mut net, rescued);
        assert!(!podwide::draining(), "an answer between: a keep-alive race, maybe");
        write(&mut net, rescued);
        assert!(podwide::draining());
        assert_eq!(metric("close_relay_drain_entered_app_rescued_total"), 1);
        assert_eq!(metric("close_relay_rescued_total"), 3);
    }

    #[test]
    fn two_rescued_answers_drain_the_pod_though_the_tick_between_them_publishes_the_answer_before() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut net = lean_connection(42, &plugin);
        let rescued = b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 2\r\ncontent-length: 0\r\n\r\n";
        write(&mut net, b"HTTP/1.1 200 OK\r\nx-envoy-attempt-count: 1\r\ncontent-length: 0\r\n\r\n");
        write(&mut net, rescued);
        // The tick publishes this VM's answer, given before the first rescue.
        podwide::publish_answers();
        write(&mut net, rescued);
        assert!(podwide::draining(), "an answer published late read as one between the rescues");
    }

    /// A 503 as Envoy writes it, with `headers` (whole lines) and `body`.
    fn reply_503(headers: &str, body: &str) -> String {
        format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n{headers}\r\n{body}", body.len())
    }

    #[test]
    fn lean_reads_a_dead_app_from_envoys_own_replies() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut net = lean_connection(51, &plugin);
        let reset = reply_503("content-type: text/plain\r\n", "upstream connect error or disconnect/reset before headers. reset reason: connection termination");
        write(&mut net, reply_503("", "the app's own 503, whatever it says").as_bytes());
        write(&mut net, reset.as_bytes());
        assert!(!podwide::draining(), "one reset: the keep-alive race, maybe");
        // Envoy writes a head and its body apart.
        let (head, body) = reset.split_at(reset.find("\r\n\r\n").map_or(0, |i| i + 4));
        write(&mut net, head.as_bytes());
        assert!(!podwide::draining(), "the body, which names the failure, has not come yet");
        write(&mut net, body.as_bytes());
        assert!(podwide::draining() && podwide::app_going(), "a second before any answer: the app is going");
    }

    #[test]
    fn lean_never_takes_an_apps_503_for_envoys_own_whatever_its_body_says() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut net = lean_connection(53, &plugin);
        // A gateway app passing on a dependency's reply: Envoy's router marks it as the app's.
        let passed_on = reply_503(
            "x-envoy-upstream-service-time: 3\r\n",
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
        );
        for _ in 0..5 {
            write(&mut net, passed_on.as_bytes());
        }
        assert!(!podwide::draining(), "the app's own 503s, five in a row");
    }

    #[test]
    fn lean_drains_at_once_on_envoys_own_reply_to_a_refusal() {
        reset(START_MS);
        let plugin = plugin(Config { lean: true, ..Config::default() });
        let mut net = lean_connection(52, &plugin);
        let body = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";
        write(&mut net, reply_503("", body).as_bytes());
        assert!(podwide::draining() && podwide::app_going(), "a refusal: at once, no rescue to catch the next one");
        assert_eq!(metric("close_relay_drain_entered_app_failure_total"), 1);
    }

    /// A connection of this VM whose request is probed, answered with `head`.
    fn probed(id: u32, plugin: &Rc<Plugin>, head: &[u8]) {
        crate::probe::refill_reads();
        let (mut net, _http) = connection(id, plugin);
        write(&mut net, head);
    }

    #[test]
    fn envoys_own_close_on_two_probed_requests_is_its_drain_and_a_kept_alive_answer_ends_it() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let closed = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
        let kept = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        probed(61, &plugin, closed);
        assert!(!podwide::draining(), "one close: an odd exchange, maybe");
        probed(62, &plugin, closed);
        assert!(podwide::draining());
        assert_eq!(metric("close_relay_drain_entered_sidecar_drain_total"), 1);
        probed(63, &plugin, kept);
        assert!(!podwide::draining(), "Envoy kept a connection open: it is not draining");
        // A request that asked to close is never probed; nor is a second one the same tick.
        crate::probe::refill_reads();
        let mut net = NetworkRole::new(64, plugin.clone());
        net.on_new_connection();
        set_buffer(BufferType::DownstreamData, b"GET / HTTP/1.1\r\nhost: alb\r\nconnection: close\r\n\r\n");
        net.on_downstream_data(48, false);
        write(&mut net, closed);
        probed(65, &plugin, closed);
        let (mut net, _http) = connection(66, &plugin);
        write(&mut net, closed);
        assert!(!podwide::draining(), "only one probe counted since the kept-alive answer");
        // A listener update (LDS) makes Envoy close too: not a shutdown.
        with(|f| f.shared_data.insert(keys::SIDECAR_READ.as_bytes().to_vec(), (crate::sidecar::DrainStats { update_draining: 1 }.encode_read(START_MS), 1)));
        probed(67, &plugin, closed);
        assert!(!podwide::draining(), "closes during a listener update");
    }

    #[test]
    fn traffic_no_probe_can_take_costs_a_few_reads_a_tick_not_one_a_request() {
        reset(START_MS);
        let plugin = plugin(Config::default());
        let (mut net, _http) = connection(81, &plugin);
        crate::probe::refill_reads();
        let post = b"POST / HTTP/1.1\r\nhost: alb\r\ncontent-length: 2\r\n\r\nok";
        let reads = || with(|f| f.buffer_reads.get(&(BufferType::DownstreamData as u32)).copied().unwrap_or(0));
        let before = reads();
        for _ in 0..20 {
            write(&mut net, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            set_buffer(BufferType::DownstreamData, post);
            net.on_downstream_data(post.len(), false);
        }
        assert_eq!(reads() - before, crate::probe::READS_PER_TICK, "20 POSTs in one tick");
    }

    #[test]
    fn the_prestop_hook_is_answered_once_the_network_roles_count_no_other_client() {
        reset(START_MS);
        let mut root = configured_root(r#"{"role": "network"}"#);
        let plugin = plugin(Config::default());
        let (busy, _http) = connection(71, &plugin);
        let mut hook = NetworkRole::new(72, plugin.clone());
        hook.on_new_connection();
        let request = format!("GET /prestop HTTP/1.1\r\nhost: pod\r\n{}: a-token-of-16-chars\r\n\r\n", keys::PRESTOP_HEADER);
        set_buffer(BufferType::DownstreamData, request.as_bytes());
        hook.on_downstream_data(request.len(), false);
        let metrics = Metrics::define();
        crate::prestop::hold(7);
        // Another worker's VM last counted before the hook came: its count cannot answer it.
        let other = |at_ms| crate::census::encode(&[crate::census::Record { vm: 99, open: 0, at_ms }]);
        with(|f| f.shared_data.insert(keys::CENSUS.as_bytes().to_vec(), (other(START_MS - 50), 1)));
        advance(100);
        root.on_tick();
        crate::prestop::tick(20_000, &metrics);
        assert!(with(|f| f.local_responses.is_empty()), "not counted since the hook came");
        let census = with(|f| f.shared_data[keys::CENSUS.as_bytes()].0.clone());
        let mut records = crate::census::decode(&census);
        records.iter_mut().filter(|r| r.vm == 99).for_each(|r| r.at_ms = START_MS + 100);
        with(|f| f.shared_data.insert(keys::CENSUS.as_bytes().to_vec(), (crate::census::encode(&records), 2)));
        advance(100);
        root.on_tick();
        crate::prestop::tick(20_000, &metrics);
        assert!(with(|f| f.local_responses.is_empty()), "the busy client is still there");
        drop(busy);
        advance(100);
        root.on_tick();
        crate::prestop::tick(20_000, &metrics);
        let answered = with(|f| f.local_responses.clone());
        assert_eq!(answered.len(), 1);
        assert_eq!((answered[0].0, answered[0].1), (7, 200));
        assert!(String::from_utf8_lossy(&answered[0].2).contains("no client connection left"));
    }
}
