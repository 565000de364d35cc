//! The host's byte formats: shared data's and queue notes' fixed-width records (little-endian
//! u64 words), and the ABI's serialized header maps.

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

/// The pairs of a serialized map, borrowed from it: a count, then each key's and value's length,
/// then each key and value followed by a NUL. Garbage gives the pairs that were whole, never a
/// panic.
pub fn pairs(bytes: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = word(0).unwrap_or(0);
    let mut at = count.checked_mul(8).and_then(|n| n.checked_add(4)).unwrap_or(usize::MAX);
    let mut take = move |len: usize| -> Option<&[u8]> {
        let field = bytes.get(at..at.checked_add(len)?)?;
        at = at.checked_add(len)?.checked_add(1)?;
        Some(field)
    };
    (0..count).map_while(move |i| {
        let (key_len, value_len) = (word(i.saturating_mul(8).saturating_add(4))?, word(i.saturating_mul(8).saturating_add(8))?);
        Some((take(key_len)?, take(value_len)?))
    })
}

/// A header map as the ABI passes one: the pair count, each name's and value's length (u32,
/// little-endian), then each name and value followed by a NUL.
pub fn encode_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let len = |s: &[u8]| u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_le_bytes().to_vec();
    for (name, value) in pairs {
        out.extend(len(name.as_ref()));
        out.extend(len(value.as_ref()));
    }
    for (name, value) in pairs {
        for s in [name.as_ref(), value.as_ref()] {
            out.extend_from_slice(s);
            out.push(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_garbage_never_panics() {
        let written = [(":status", "200"), ("connection", "close"), ("", "")];
        let whole = encode_pairs(&written);
        let read: Vec<(&[u8], &[u8])> = pairs(&whole).collect();
        let expected: Vec<(&[u8], &[u8])> = written.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
        assert_eq!(read, expected);
        assert_eq!(pairs(&[]).count(), 0);
        assert_eq!(pairs(&[0xff, 0xff, 0xff, 0xff]).count(), 0);
        for cut in 0..whole.len() {
            let some = pairs(&whole[..cut]).count();
            assert!(some < written.len() || cut + 1 >= whole.len(), "cut {cut}: {some}");
        }
    }
}
