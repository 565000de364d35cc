//! The floor `make bench` measures close-relay against: the least a proxy-wasm filter can be.
//! No SDK, no allocator, no host call; it exports only what Envoy needs to load a module and
//! create its contexts, so every other callback is skipped by proxy-wasm-cpp-host's null
//! check. Loaded in both roles, it costs what a wasm filter costs before it does anything.

#![no_std]

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The ABI this module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Never called: the module never asks the host for data. Null tells a host that did the
/// allocation failed.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(_size: usize) -> *mut u8 {
    core::ptr::null_mut()
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, _plugin_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}
