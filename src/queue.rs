//! This VM's queue: how a drain that begins on any worker reaches the others within a dispatcher
//! turn, and how an HTTP role in another VM reaches its connection's network role
//! ([`crate::link::Note`]).

use crate::codec;
use crate::host;
use crate::keys;
use crate::link::Note;

thread_local! {
    /// This VM's own wake queue, once its network root registered one.
    static OWN_WAKE: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Tokens kept at most; older ones belong to VMs long replaced by config updates.
const WAKE_CAPACITY: usize = 64;

/// Registers this VM's wake queue: a drain that begins on any worker then reaches this one
/// within a dispatcher turn (`on_queue_ready`), not a tick later, before an ALB reuses an idle
/// connection into a pod whose app already refuses new ones.
pub fn register_wake() -> Option<u32> {
    let name = format!("{}{}", keys::WAKE_QUEUE_PREFIX, host::unique());
    let token = host::register_queue(&name)?;
    OWN_WAKE.set(Some(token));
    host::shared_update(keys::WAKE_TOKENS, |current| {
        let mut tokens: Vec<u64> = current.chunks_exact(8).map(|c| codec::decode_u64s::<1>(c)[0]).collect();
        tokens.push(u64::from(token));
        let excess = tokens.len().saturating_sub(WAKE_CAPACITY);
        Some((codec::encode_u64s(&tokens[excess..]), ()))
    });
    Some(token)
}

/// This VM's queue, once its network root registered one: published in each connection's
/// [`crate::link::Handle`].
pub fn own_queue() -> Option<u32> {
    OWN_WAKE.get()
}

/// Sends `note` to the network root that owns `token`; false if it cannot (the queue is gone).
pub fn send(token: u32, note: &Note) -> bool {
    host::enqueue(token, &note.encode()).is_ok()
}

/// Wakes every VM's network root: a drain began.
pub fn wake_all() {
    let (tokens, _) = host::shared_get(keys::WAKE_TOKENS);
    for chunk in tokens.chunks_exact(8) {
        let [token] = codec::decode_u64s::<1>(chunk);
        // A token of a VM that is gone fails; nothing to do about it.
        if let Ok(token) = u32::try_from(token) {
            send(token, &Note::Wake);
        }
    }
}
