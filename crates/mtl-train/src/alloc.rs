//! Allocator tuning for the binaries, which use mimalloc as their global allocator.

/// Tells mimalloc never to return freed pages to the kernel. By default it does so after a delay, and a training
/// step frees and reallocates hundreds of megabytes: each time the kernel zeroed the pages again on the next
/// fault (measured: 48,000 page faults and about 10% of a step at 16 × 128; 800 with this). Harmless when
/// mimalloc is not the global allocator.
#[allow(unsafe_code)]
pub fn keep_freed_pages() {
    // `mi_option_purge_delay` comes right before `mi_option_use_numa_nodes` in mimalloc.h; the bindings lack it.
    let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: sets an integer option; mimalloc reads options atomically and allows changing them at any time.
    unsafe { libmimalloc_sys::mi_option_set(purge_delay, -1) };
}

/// Lets mimalloc return freed pages to the kernel again (after its default delay of 10 ms), undoing
/// [`keep_freed_pages`]. Decoder training frees and reallocates tensors of a different size at nearly every
/// step (prompts and answers vary in length), so pages kept for reuse pile up: measured, a run's resident
/// memory grew from 14 to 22 GiB over 100 steps and was killed for memory.
#[allow(unsafe_code)]
pub fn return_freed_pages() {
    let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: as in `keep_freed_pages`.
    unsafe { libmimalloc_sys::mi_option_set(purge_delay, 10) };
}
