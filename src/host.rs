//! Thin, fallible wrappers over the proxy-wasm host ABI, plus metrics and the nonce.
//!
//! The SDK panics on statuses it does not expect from `set_buffer`, `set_property` and
//! `close_downstream`; a panic in a filter traps the VM, so these three are declared here
//! again and return errors instead.

use proxy_wasm::hostcalls;
use std::cell::Cell;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::types::{BufferType, Bytes, LogLevel, MapType, MetricType, StreamType};

use crate::decision::SkipReason;
use crate::drain::Source;

/// Connection filter-state key through which the network role announces itself and its
/// per-connection nonce to the HTTP role, across VMs too.
pub const NONCE_PROPERTY: &str = "close_relay_nonce";

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, size: usize)
        -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
}

/// A host status other than Ok, as its raw ABI number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

fn status(raw: u32) -> Result<(), HostError> {
    if raw == 0 {
        Ok(())
    } else {
        Err(HostError(raw))
    }
}

/// Replaces the first `len` bytes of a connection buffer with `with`.
pub fn replace_prefix(buffer: BufferType, len: usize, with: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointers and lengths come from live slices; the host copies before returning.
    status(unsafe { proxy_set_buffer_bytes(buffer as u32, 0, len, with.as_ptr(), with.len()) })
}

pub fn set_property(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: as above; a single-segment path needs no separators.
    status(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Closes the client connection of the effective context after flushing what was written.
pub fn close_downstream() -> Result<(), HostError> {
    // SAFETY: a plain integer argument (StreamType::Downstream).
    status(unsafe { proxy_close_stream(StreamType::Downstream as u32) })
}

pub fn set_effective_context(id: u32) -> Result<(), HostError> {
    hostcalls::set_effective_context(id).map_err(|s| HostError(s as u32))
}

pub fn get_property(path: Vec<&str>) -> Option<Bytes> {
    hostcalls::get_property(path).ok().flatten()
}

pub fn get_buffer(buffer: BufferType, max: usize) -> Option<Bytes> {
    hostcalls::get_buffer(buffer, 0, max).ok().flatten()
}

/// One header's value; `None` when absent or when the map is not readable in this phase
/// (Envoy refuses request headers once the response is being encoded, for example).
pub fn header(map: MapType, name: &str) -> Option<String> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host allocates `data` through our `proxy_on_memory_allocate` export and
    // hands its ownership to us; `Vec::from_raw_parts` takes it back with the same length.
    unsafe {
        let raw = proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size);
        if raw == 1 {
            return None; // NotFound: the header is absent.
        }
        if raw != 0 {
            log::debug!("header {name:?} of map {map:?} not readable: status {raw}");
            return None;
        }
        if data.is_null() {
            return Some(String::new());
        }
        String::from_utf8(Vec::from_raw_parts(data, size, size)).ok()
    }
}

/// Makes `log` calls below the host's level free: they are filtered before formatting.
pub fn follow_host_log_level() {
    let level = hostcalls::get_log_level().unwrap_or(LogLevel::Info);
    proxy_wasm::set_log_level(level);
}

/// A hard-to-guess 64-bit value as 16 hex digits. `RandomState` is seeded from WASI
/// `random_get`, which Envoy implements; each call advances its key.
pub fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(now) = hostcalls::get_current_time() {
        if let Ok(since) = now.duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(since.as_nanos());
        }
    }
    format!("{:016x}", hasher.finish())
}

thread_local! {
    /// Milliseconds since the epoch as of the last tick: good enough for idle graces and drain
    /// holds, and free to read on the data path.
    static COARSE_NOW: Cell<u64> = const { Cell::new(0) };
}

/// The host's clock in ms since the epoch; also refreshes [`coarse_now`].
pub fn now_ms() -> u64 {
    let now = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    COARSE_NOW.set(now);
    now
}

pub fn coarse_now() -> u64 {
    COARSE_NOW.get()
}

pub fn set_tick(period_ms: u64) {
    let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
}

/// Shared data (one store per `vm_id`, seen by every worker and both roles): value and CAS.
pub fn shared_get(key: &str) -> (Vec<u8>, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((value, cas)) => (value.unwrap_or_default(), cas),
        Err(_) => (Vec::new(), None),
    }
}

/// Read-modify-write of one shared key with CAS retries; `f` returns what to store, or
/// `None` to leave it. Returns what `f` returned for the write that won.
pub fn shared_update<T>(key: &str, mut f: impl FnMut(&[u8]) -> Option<(Vec<u8>, T)>) -> Option<T> {
    for _ in 0..8 {
        let (current, cas) = shared_get(key);
        let (next, out) = f(&current)?;
        match hostcalls::set_shared_data(key, Some(&next), cas) {
            Ok(()) => return Some(out),
            Err(_) => continue, // CAS mismatch: another worker wrote first; read again.
        }
    }
    None
}

pub fn register_queue(name: &str) -> Option<u32> {
    hostcalls::register_shared_queue(name).ok()
}

pub fn enqueue(token: u32) {
    let _ = hostcalls::enqueue_shared_queue(token, Some(b"drain"));
}

/// Empties a shared queue (its items only say "look now").
pub fn drain_queue(token: u32) {
    for _ in 0..1024 {
        if !matches!(hostcalls::dequeue_shared_queue(token), Ok(Some(_))) {
            break;
        }
    }
}

/// GET `path` through Envoy `cluster`; the answer arrives in the root's
/// `on_http_call_response` under the returned token.
pub fn http_get(cluster: &str, authority: &str, path: &str, timeout_ms: u64) -> Option<u32> {
    let headers = vec![(":method", "GET"), (":path", path), (":authority", authority)];
    hostcalls::dispatch_http_call(cluster, headers, None, vec![], Duration::from_millis(timeout_ms))
        .map_err(|e| log::debug!("dispatch to cluster {cluster:?} failed: {e:?}"))
        .ok()
}

/// Status and body of the HTTP call answer being delivered; status 0 when it failed.
pub fn http_call_response(body_size: usize) -> (u16, Vec<u8>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = get_buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
    (status, body)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Counter {
        Counter(hostcalls::define_metric(MetricType::Counter, name).ok())
    }

    pub fn inc(self) {
        self.add(1);
    }

    pub fn add(self, n: u64) {
        if let (Some(id), Ok(n)) = (self.0, i64::try_from(n)) {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

thread_local! {
    /// Responses counted but not yet added to `close_relay_responses_total`.
    static RESPONSES_UNFLUSHED: Cell<u64> = const { Cell::new(0) };
}

/// Responses are counted in the VM and added to the host's counter in batches: a host call
/// per response is a round trip out of the VM on the hot path (measured with `make bench`).
const RESPONSES_BATCH: u64 = 64;

#[derive(Debug, Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    fn define(name: &str) -> Gauge {
        Gauge(hostcalls::define_metric(MetricType::Gauge, name).ok())
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Every counter the module exports. Envoy shows them as `wasmcustom.<name>` in its stats and
/// as `<name>` in Prometheus output; both roles define all of them so names never move.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub responses: Counter,
    pub relayed: Counter,
    pub skipped: [Counter; SkipReason::ALL.len()],
    pub headers_rewritten: Counter,
    pub connections_closed: Counter,
    pub requests_closed: Counter,
    pub config_errors: Counter,
    pub drain_entered: [Counter; Source::ALL.len()],
    pub idle_closed: Counter,
    pub closed_while_draining: Counter,
    pub closed_connect_failure: Counter,
    pub draining: Gauge,
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            responses: Counter::define("close_relay_responses_total"),
            relayed: Counter::define("close_relay_relayed_total"),
            skipped: SkipReason::ALL
                .map(|r| Counter::define(&format!("close_relay_skipped_{}_total", r.as_str()))),
            headers_rewritten: Counter::define("close_relay_headers_rewritten_total"),
            connections_closed: Counter::define("close_relay_connections_closed_total"),
            requests_closed: Counter::define("close_relay_requests_closed_total"),
            config_errors: Counter::define("close_relay_config_errors_total"),
            drain_entered: Source::ALL
                .map(|s| Counter::define(&format!("close_relay_drain_entered_{}_total", s.as_str()))),
            idle_closed: Counter::define("close_relay_idle_closed_total"),
            closed_while_draining: Counter::define("close_relay_closed_while_draining_total"),
            closed_connect_failure: Counter::define("close_relay_closed_connect_failure_total"),
            draining: Gauge::define("close_relay_draining"),
        }
    }

    /// Counts one response; the host's counter catches up every [`RESPONSES_BATCH`] responses
    /// and on every tick ([`Metrics::flush`]).
    pub fn count_response(&self) {
        let n = RESPONSES_UNFLUSHED.get() + 1;
        if n >= RESPONSES_BATCH {
            RESPONSES_UNFLUSHED.set(0);
            self.responses.add(n);
        } else {
            RESPONSES_UNFLUSHED.set(n);
        }
    }

    pub fn flush(&self) {
        let n = RESPONSES_UNFLUSHED.replace(0);
        if n > 0 {
            self.responses.add(n);
        }
    }

    pub fn entered(&self, source: Source) -> Counter {
        let i = Source::ALL.iter().position(|s| *s == source).unwrap_or(0);
        self.drain_entered[i]
    }

    pub fn skipped(&self, reason: SkipReason) -> Counter {
        let i = SkipReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.skipped[i]
    }
}
