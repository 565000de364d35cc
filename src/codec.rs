//! The fixed-width records of shared data and queue notes: little-endian u64 words.

/// Fixed-width little-endian u64s: how small records live in shared data. Missing words read
/// as 0, so a short or foreign value is harmless.
pub fn decode_u64s<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut out = [0u64; N];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(word);
    }
    out
}

pub fn encode_u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}
