//! The raw proxy-wasm ABI as this module declares it (the SDK's versions panic on a status
//! they do not expect), the calls by name, and the one function that runs each: [`invoke`],
//! where the fault-injection build fails a call as the host would. Only `host.rs` uses it.

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    pub(crate) fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    pub(crate) fn proxy_get_log_level(level: *mut u32) -> u32;
    pub(crate) fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    pub(crate) fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    pub(crate) fn proxy_get_buffer_bytes(buffer: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    pub(crate) fn proxy_set_buffer_bytes(buffer: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    pub(crate) fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    pub(crate) fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    pub(crate) fn proxy_add_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize)
        -> u32;
    pub(crate) fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    pub(crate) fn proxy_get_property(path: *const u8, path_size: usize, value: *mut *mut u8, value_size: *mut usize) -> u32;
    pub(crate) fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, size: usize) -> u32;
    pub(crate) fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    pub(crate) fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    pub(crate) fn proxy_register_shared_queue(name: *const u8, name_size: usize, token: *mut u32) -> u32;
    pub(crate) fn proxy_enqueue_shared_queue(token: u32, value: *const u8, value_size: usize) -> u32;
    pub(crate) fn proxy_dequeue_shared_queue(token: u32, value: *mut *mut u8, value_size: *mut usize) -> u32;
    pub(crate) fn proxy_close_stream(stream: u32) -> u32;
    pub(crate) fn proxy_set_effective_context(id: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    pub(crate) fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    pub(crate) fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    pub(crate) fn proxy_record_metric(id: u32, value: u64) -> u32;
}

// WASI's random source, which std would call with a panic on failure (`RandomState::new`).
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    pub(crate) fn random_get(buf: *mut u8, len: usize) -> i32;
}

/// A host status other than Ok, as its raw ABI number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

impl HostError {
    /// `NotFound`: an absent header, property or key; an answer, not a failure.
    pub const NOT_FOUND: HostError = HostError(1);
    /// `CasMismatch`: another writer changed the shared key since it was read.
    pub const CAS_MISMATCH: HostError = HostError(8);
    /// `InternalFailure`: what a host answers when it cannot do the call at all.
    pub const INTERNAL_FAILURE: HostError = HostError(10);
}

/// Every host call this module makes, by its ABI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Log,
    GetLogLevel,
    GetCurrentTime,
    SetTickPeriod,
    GetBufferBytes,
    SetBufferBytes,
    GetHeaderMapPairs,
    GetHeaderMapValue,
    AddHeaderMapValue,
    RemoveHeaderMapValue,
    GetProperty,
    SetProperty,
    GetSharedData,
    SetSharedData,
    RegisterSharedQueue,
    EnqueueSharedQueue,
    DequeueSharedQueue,
    CloseStream,
    SetEffectiveContext,
    SendLocalResponse,
    HttpCall,
    DefineMetric,
    IncrementMetric,
    RecordMetric,
    RandomGet,
}

impl Call {
    pub const ALL: [Call; 25] = [
        Call::Log,
        Call::GetLogLevel,
        Call::GetCurrentTime,
        Call::SetTickPeriod,
        Call::GetBufferBytes,
        Call::SetBufferBytes,
        Call::GetHeaderMapPairs,
        Call::GetHeaderMapValue,
        Call::AddHeaderMapValue,
        Call::RemoveHeaderMapValue,
        Call::GetProperty,
        Call::SetProperty,
        Call::GetSharedData,
        Call::SetSharedData,
        Call::RegisterSharedQueue,
        Call::EnqueueSharedQueue,
        Call::DequeueSharedQueue,
        Call::CloseStream,
        Call::SetEffectiveContext,
        Call::SendLocalResponse,
        Call::HttpCall,
        Call::DefineMetric,
        Call::IncrementMetric,
        Call::RecordMetric,
        Call::RandomGet,
    ];

    pub fn abi_name(self) -> &'static str {
        match self {
            Call::Log => "proxy_log",
            Call::GetLogLevel => "proxy_get_log_level",
            Call::GetCurrentTime => "proxy_get_current_time_nanoseconds",
            Call::SetTickPeriod => "proxy_set_tick_period_milliseconds",
            Call::GetBufferBytes => "proxy_get_buffer_bytes",
            Call::SetBufferBytes => "proxy_set_buffer_bytes",
            Call::GetHeaderMapPairs => "proxy_get_header_map_pairs",
            Call::GetHeaderMapValue => "proxy_get_header_map_value",
            Call::AddHeaderMapValue => "proxy_add_header_map_value",
            Call::RemoveHeaderMapValue => "proxy_remove_header_map_value",
            Call::GetProperty => "proxy_get_property",
            Call::SetProperty => "proxy_set_property",
            Call::GetSharedData => "proxy_get_shared_data",
            Call::SetSharedData => "proxy_set_shared_data",
            Call::RegisterSharedQueue => "proxy_register_shared_queue",
            Call::EnqueueSharedQueue => "proxy_enqueue_shared_queue",
            Call::DequeueSharedQueue => "proxy_dequeue_shared_queue",
            Call::CloseStream => "proxy_close_stream",
            Call::SetEffectiveContext => "proxy_set_effective_context",
            Call::SendLocalResponse => "proxy_send_local_response",
            Call::HttpCall => "proxy_http_call",
            Call::DefineMetric => "proxy_define_metric",
            Call::IncrementMetric => "proxy_increment_metric",
            Call::RecordMetric => "proxy_record_metric",
            Call::RandomGet => "random_get",
        }
    }
}

/// Runs one raw host call, or, in the fault-injection build, fails it as the host would.
pub(crate) fn invoke(call: Call, raw: impl FnOnce() -> u32) -> Result<(), HostError> {
    #[cfg(feature = "fault-injection")]
    if fault::fails(call) {
        return Err(HostError::INTERNAL_FAILURE);
    }
    let _ = call;
    match raw() {
        0 => Ok(()),
        status => Err(HostError(status)),
    }
}

#[cfg(feature = "fault-injection")]
mod fault {
    use super::Call;
    use std::cell::Cell;

    thread_local! {
        /// The call named by `CLOSE_RELAY_HOST_FAULT` (WASI environment, from the VM config),
        /// read once per VM: `Some(None)` when there is none.
        static FAILING: Cell<Option<Option<Call>>> = const { Cell::new(None) };
    }

    pub fn fails(call: Call) -> bool {
        let failing = FAILING.get().unwrap_or_else(|| {
            let named = std::env::var("CLOSE_RELAY_HOST_FAULT").ok();
            let failing = Call::ALL.into_iter().find(|c| named.as_deref() == Some(c.abi_name()));
            FAILING.set(Some(failing));
            failing
        });
        failing == Some(call)
    }
}
