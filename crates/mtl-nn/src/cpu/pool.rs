//! Buffers that the encoder's passes hand back for later passes to take again: the activations a layer kept for
//! the backward pass, once that pass is done with them, and the temporaries of every layer. A step at 16 × 128
//! tokens allocates about half a gigabyte of them; freshly allocated, each was zeroed first (on the one thread
//! that allocates, while the other cores wait), only to be overwritten by the product or pass that fills it.
//!
//! A buffer [`take`]n from here holds whatever its last user left, except for a part beyond that user's length,
//! which is zeroed: every caller overwrites all of it. The pool keeps at most [`KEEP_BYTES`]; a request that
//! nothing kept can serve drops the largest smaller buffer, so that buffers of shapes no longer used (a longer
//! batch than the rest) do not pile up.

use std::sync::Mutex;

/// The most the pool keeps; beyond it the oldest buffers go back to the allocator.
const KEEP_BYTES: usize = 512 << 20;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` elements, reused where one of at least `len` and at most twice that is kept.
pub(crate) fn take(len: usize) -> Vec<f32> {
    let found = POOL.lock().ok().and_then(|mut pool| {
        let fits = |v: &Vec<f32>| v.capacity() >= len && v.capacity() <= 2 * len;
        match pool.iter().enumerate().filter(|(_, v)| fits(v)).min_by_key(|(_, v)| v.capacity()) {
            Some((i, _)) => Some(pool.remove(i)),
            None => {
                if let Some((i, _)) =
                    pool.iter().enumerate().filter(|(_, v)| v.capacity() < len).max_by_key(|(_, v)| v.capacity())
                {
                    pool.remove(i);
                }
                None
            }
        }
    });
    match found {
        Some(mut v) => {
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// Hands `v` back for a later [`take`].
pub(crate) fn give(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        pool.push(v);
        let mut bytes: usize = pool.iter().map(|v| v.capacity() * 4).sum();
        while bytes > KEEP_BYTES {
            bytes -= pool.remove(0).capacity() * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_at_the_length_asked_with_any_new_part_zeroed() {
        // Lengths no other test of this process asks for.
        give(vec![7.0; 100_003]);
        let v = take(100_003);
        assert_eq!(v.len(), 100_003);
        let mut v = v;
        v.truncate(60_001);
        give(v);
        let w = take(90_001);
        assert_eq!(w.len(), 90_001);
        assert!(w[60_001..].iter().all(|&x| x == 0.0), "the part beyond the last user's length is zeroed");
        // Too large a buffer is not used for a small request.
        give(w);
        assert_eq!(take(1_001).capacity(), 1_001);
    }
}
