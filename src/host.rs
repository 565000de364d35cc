//! The one seam between the filter and the proxy-wasm host: every host call the filter makes
//! goes through this file (over the raw declarations of `abi.rs`), and none of them can panic.
//!
//! The SDK's `hostcalls` (and the `Context` methods built on them) panic on any status they do
//! not expect, and a panic is a trap: under FAIL_OPEN that worker then runs without the filter
//! until Envoy restarts. So the ABI functions are declared here again, raw, and every status but
//! Ok comes back as a [`HostError`]. Clippy's `disallowed-methods` (`clippy.toml`) refuses the
//! SDK's versions everywhere; the one exception, `dispatch_http_call`, is explained where it is.
//!
//! The fault-injection build (`make build-fault`) can make any one of these calls fail as the
//! host would (`CLOSE_RELAY_HOST_FAULT=<abi name>` in the VM's environment), so the e2e tests show
//! each failure handled.

use std::time::Duration;

use proxy_wasm::types::{BufferType, Bytes, LogLevel, MapType, MetricType, StreamType};

thread_local! {
    /// Milliseconds since the epoch as of the last tick, free to read on the data
    /// path (idle graces, drain holds).
    static COARSE_NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub use crate::abi::{Call, HostError};
use crate::abi::*;

/// Takes ownership of bytes the host allocated in this VM (through the SDK's
/// `proxy_on_memory_allocate` export) and handed back as `data`/`size`.
fn owned(data: *mut u8, size: usize) -> Option<Bytes> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host allocated `size` bytes at `data` with this module's allocator and gave
    // up ownership; nothing else holds the pointer.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Replaces the first `len` bytes of a connection buffer with `with`.
pub fn replace_prefix(buffer: BufferType, len: usize, with: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointers and lengths come from live slices; the host copies before returning.
    invoke(Call::SetBufferBytes, || unsafe {
        proxy_set_buffer_bytes(buffer as u32, 0, len, with.as_ptr(), with.len())
    })
}

/// Applies `edit` to the start of a connection buffer; a failure is logged and leaves the
/// bytes as they were.
pub fn edit(buffer: BufferType, edit: &crate::wire::Edit) -> bool {
    let applied = replace_prefix(buffer, edit.len, &edit.with);
    if let Err(e) = applied {
        log::warn!("close-relay: could not edit {buffer:?}: {e:?}");
    }
    applied.is_ok()
}

/// Adds `bytes` at the end of a buffer of `len` bytes (Envoy's `Buffer::copyFrom` appends for a
/// start at or past the buffer's length).
pub fn append(buffer: BufferType, len: usize, bytes: &[u8]) -> Result<(), HostError> {
    // SAFETY: as above.
    invoke(Call::SetBufferBytes, || unsafe { proxy_set_buffer_bytes(buffer as u32, len, 0, bytes.as_ptr(), bytes.len()) })
}

/// Up to `max` bytes from the start of a buffer; `None` when absent, empty or unreadable.
pub fn get_buffer(buffer: BufferType, max: usize) -> Option<Bytes> {
    get_buffer_at(buffer, 0, max)
}

/// Up to `max` bytes of a buffer from `start`.
pub fn get_buffer_at(buffer: BufferType, start: usize, max: usize) -> Option<Bytes> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: out-pointers to locals; the host writes them before returning.
    invoke(Call::GetBufferBytes, || unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) })
        .ok()?;
    owned(data, size)
}

pub fn set_property(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: as above; a single-segment path needs no separators.
    invoke(Call::SetProperty, || unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// A property by its path segments (`["request", "protocol"]`); `None` when absent or when the
/// host cannot give it.
pub fn get_property(path: &[&str]) -> Option<Bytes> {
    let joined = property_path(path);
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as above.
    invoke(Call::GetProperty, || unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) })
        .ok()?;
    owned(data, size)
}

/// The ABI's property path: the segments joined by NULs.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// Closes the client connection of the effective context after flushing what was written.
pub fn close_downstream() -> Result<(), HostError> {
    // SAFETY: a plain integer argument.
    invoke(Call::CloseStream, || unsafe { proxy_close_stream(StreamType::Downstream as u32) })
}

pub fn set_effective_context(id: u32) -> Result<(), HostError> {
    // SAFETY: a plain integer argument.
    invoke(Call::SetEffectiveContext, || unsafe { proxy_set_effective_context(id) })
}

/// A whole header map in one call and one copy into the VM, serialized as the ABI has it (see
/// [`crate::codec::pairs`]): each call out of the VM, and each copy into it (the host calls back into the VM
/// to allocate), costs about a microsecond in Envoy's V8 (`make bench`).
pub fn header_map(map: MapType) -> Option<Bytes> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as above.
    invoke(Call::GetHeaderMapPairs, || unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) })
        .map_err(|e| log::debug!("header map {map:?} not readable: {e:?}"))
        .ok()?;
    owned(data, size)
}

pub fn add_header(map: MapType, name: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: as above.
    invoke(Call::AddHeaderMapValue, || unsafe {
        proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn remove_header(map: MapType, name: &str) -> Result<(), HostError> {
    // SAFETY: as above.
    invoke(Call::RemoveHeaderMapValue, || unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// One header's value; `None` when absent or when the map is not readable in this phase
/// (Envoy refuses request headers once the response is being encoded, for example).
pub fn header(map: MapType, name: &str) -> Option<String> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as above.
    let read = invoke(Call::GetHeaderMapValue, || unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    });
    match read {
        Ok(()) => Some(owned(data, size).map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()),
        Err(HostError::NOT_FOUND) => None,
        Err(e) => {
            log::debug!("header {name:?} of map {map:?} not readable: {e:?}");
            None
        }
    }
}

/// Writes `message` to the host's log at `level`; a failed call is dropped (the `log` crate's
/// plumbing: `logging.rs`).
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length of a live string; the host copies it.
    let _ = invoke(Call::Log, || unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) });
}

/// The host's log level (0 trace to 5 critical), or `None` when it does not say.
pub fn log_level() -> Option<u32> {
    let mut raw = LogLevel::Info as u32;
    // SAFETY: out-pointer to a local.
    invoke(Call::GetLogLevel, || unsafe { proxy_get_log_level(&mut raw) }).ok().map(|()| raw)
}

/// A hard-to-guess 64-bit value as 16 hex digits, from WASI's `random_get` (Envoy fills it from
/// its own random source). `None` when the host gives none: a guessable value would let an app
/// forge the marker, so the caller does without one.
pub fn nonce() -> Option<String> {
    let mut word = [0u8; 8];
    // SAFETY: out-pointer to a local of the length given. WASI's status is an errno (0: success).
    let filled = invoke(Call::RandomGet, || unsafe { random_get(word.as_mut_ptr(), word.len()) as u32 });
    filled.ok().map(|()| format!("{:016x}", u64::from_le_bytes(word)))
}

/// A value unique to this VM for naming (a queue, a census record): the nonce, or without one
/// the host's clock in ns, which two VMs do not start on at once.
pub fn unique() -> String {
    nonce().unwrap_or_else(|| format!("{:016x}", now_ns()))
}

fn now_ns() -> u64 {
    let mut ns = 0u64;
    // SAFETY: out-pointer to a local.
    match invoke(Call::GetCurrentTime, || unsafe { proxy_get_current_time_nanoseconds(&mut ns) }) {
        Ok(()) => ns,
        Err(_) => 0,
    }
}

/// The host's clock in ms since the epoch. Every read also moves [`coarse_now`] forward, so the
/// data path's cheap reads are never older than the last real one.
pub fn now_ms() -> u64 {
    refresh_coarse_now()
}

/// Reads the host's clock into [`coarse_now`] (a tick does, before its sweep); returns it.
pub fn refresh_coarse_now() -> u64 {
    let now = now_ns() / 1_000_000;
    COARSE_NOW.set(now);
    now
}

pub fn coarse_now() -> u64 {
    COARSE_NOW.get()
}

/// False when the host would not tick this root.
pub fn set_tick(period_ms: u64) -> bool {
    let period = u32::try_from(period_ms).unwrap_or(u32::MAX);
    // SAFETY: a plain integer argument.
    invoke(Call::SetTickPeriod, || unsafe { proxy_set_tick_period_milliseconds(period) }).is_ok()
}

/// Shared data (one store per `vm_id`, seen by every worker and both roles): value and CAS.
/// An absent key, or one the host cannot read, is empty.
pub fn shared_get(key: &str) -> (Vec<u8>, Option<u32>) {
    let (mut data, mut size, mut cas) = (std::ptr::null_mut(), 0, 0u32);
    // SAFETY: out-pointers to locals.
    let read = invoke(Call::GetSharedData, || unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
    });
    match read {
        Ok(()) => (owned(data, size).unwrap_or_default(), (cas != 0).then_some(cas)),
        Err(_) => (Vec::new(), None),
    }
}

fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
    // SAFETY: pointers and lengths of live slices; the host copies them.
    invoke(Call::SetSharedData, || unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0))
    })
}

/// Read-modify-write of one shared key with CAS retries; `f` returns what to store, or
/// `None` to leave it. Returns what `f` returned for the write that won.
pub fn shared_update<T>(key: &str, mut f: impl FnMut(&[u8]) -> Option<(Vec<u8>, T)>) -> Option<T> {
    for _ in 0..8 {
        let (current, cas) = shared_get(key);
        let (next, out) = f(&current)?;
        match shared_set(key, &next, cas) {
            Ok(()) => return Some(out),
            Err(HostError::CAS_MISMATCH) => continue, // another worker wrote first; read again
            Err(_) => return None,                    // the host cannot store it: retrying won't help
        }
    }
    None
}

pub fn register_queue(name: &str) -> Option<u32> {
    let mut token = 0u32;
    // SAFETY: out-pointer to a local.
    invoke(Call::RegisterSharedQueue, || unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut token) })
        .ok()?;
    Some(token)
}

pub fn enqueue(token: u32, item: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length of a live slice; the host copies it.
    invoke(Call::EnqueueSharedQueue, || unsafe { proxy_enqueue_shared_queue(token, item.as_ptr(), item.len()) })
}

/// Empties a shared queue; its items, oldest first (bounded: a queue that keeps filling is
/// read again on its next wake-up).
pub fn drain_queue(token: u32) -> Vec<Bytes> {
    let mut items = Vec::new();
    for _ in 0..1024 {
        let (mut data, mut size) = (std::ptr::null_mut(), 0);
        // SAFETY: out-pointers to locals.
        let item = invoke(Call::DequeueSharedQueue, || unsafe { proxy_dequeue_shared_queue(token, &mut data, &mut size) });
        let bytes = owned(data, size);
        if item.is_err() {
            break; // Empty (7), or the queue is gone
        }
        items.extend(bytes);
    }
    items
}

/// Answers the effective HTTP context's request from the filter, with `body` as text/plain;
/// the app never sees it. `details` names the answer in Envoy's access log
/// (`%RESPONSE_CODE_DETAILS%`).
pub fn send_local_response(status: u32, details: &str, body: &[u8]) -> Result<(), HostError> {
    let headers = crate::codec::encode_pairs(&[("content-type", "text/plain")]);
    // SAFETY: pointers and lengths of live slices; the host copies them before returning.
    invoke(Call::SendLocalResponse, || unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// GET `path` through Envoy `cluster`; the answer arrives in the root's
/// `on_http_call_response` under the returned token.
pub fn http_get(cluster: &str, authority: &str, path: &str, timeout_ms: u64) -> Option<u32> {
    // No raw call to make here (see below); this only lets the fault-injection build fail it.
    invoke(Call::HttpCall, || 0).ok()?;
    let headers = vec![(":method", "GET"), (":path", path), (":authority", authority)];
    // The SDK's own call, the one exception to the seam: its dispatcher routes the answer by
    // the token this call registers, and panics on a token it does not know, so a raw
    // `proxy_http_call` cannot be used. It panics only on a status other than Ok, BadArgument
    // and InternalFailure, and those are the only ones Envoy's httpCall returns.
    #[allow(clippy::disallowed_methods)]
    let dispatched = proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(timeout_ms),
    );
    dispatched.map_err(|e| log::debug!("dispatch to cluster {cluster:?} failed: {e:?}")).ok()
}

/// Status and body of the HTTP call answer being delivered; status 0 when it failed.
pub fn http_call_response(body_size: usize) -> (u16, Vec<u8>) {
    let status = header(MapType::HttpCallResponseHeaders, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = get_buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
    (status, body)
}

fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: out-pointer to a local; name is a live string.
    invoke(Call::DefineMetric, || unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })
        .ok()?;
    Some(id)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    pub fn define(name: &str) -> Counter {
        Counter(define_metric(MetricType::Counter, name))
    }

    pub fn inc(self) {
        self.add(1);
    }

    pub fn add(self, n: u64) {
        if let (Some(id), Ok(n)) = (self.0, i64::try_from(n)) {
            // SAFETY: plain integer arguments.
            let _ = invoke(Call::IncrementMetric, || unsafe { proxy_increment_metric(id, n) });
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    pub fn define(name: &str) -> Gauge {
        Gauge(define_metric(MetricType::Gauge, name))
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            // SAFETY: plain integer arguments.
            let _ = invoke(Call::RecordMetric, || unsafe { proxy_record_metric(id, value) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_paths_join_segments_with_nul() {
        assert_eq!(property_path(&["request", "protocol"]), b"request\0protocol");
        assert_eq!(property_path(&[crate::keys::ADDRESS_PROPERTY]), b"close_relay_address");
    }

    #[test]
    fn abi_names_are_distinct() {
        let mut names: Vec<_> = Call::ALL.iter().map(|c| c.abi_name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Call::ALL.len());
    }
}
