//! The keys and values of many sequences in one pool of fixed-size blocks, for iteration-level batching (paged
//! attention: Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
//! PagedAttention"). A sequence holds a list of blocks, its [`BlockTable`]; it takes one more block when it
//! fills the last and gives them all back when it ends. Sequences of any length therefore join and leave a
//! running batch without anyone's cache moving, and the pool's size is a memory budget that admission can
//! count in blocks.
//!
//! A step is ragged: each sequence brings its own number of new tokens (a whole prompt, a chunk of one, or the
//! single token of a decoding step), all of them in one `[tokens, width]` matrix, so the projections run once
//! over every sequence of the step. Only attention looks at the sequences one by one, through their blocks.
//!
//! Sequences that start with the same tokens share their blocks ([`PagedKv::share_prefix`], the prefix cache
//! of [`super::blocks`]): a prompt that repeats an earlier one, or its instructions, computes only what is new.

use rayon::prelude::*;

use super::blocks::BlockPool;
use super::decoder::{masked_softmax, RopeTables};
use super::gemm::{matmul, Threads, View, ViewMut};

/// A sequence's place in a [`PagedKv`]: its blocks in order, and how many positions it has cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    pub len: usize,
    /// Leading blocks whose prefix key is known (registered in the prefix cache, or shared from it), and the
    /// key after them.
    hashed: usize,
    key: u64,
}

/// One sequence of a ragged step: `new` tokens at the positions after the `table.len` it has cached.
#[derive(Clone, Copy, Debug)]
pub struct Span<'a> {
    pub blocks: &'a [u32],
    pub past: usize,
    pub new: usize,
}

/// Every layer's rotated keys and values in `blocks` blocks of `block_size` positions (each block
/// `kv_heads × block_size × head_dim` values, a key/value head's positions contiguous), and the free list.
#[derive(Debug)]
pub struct PagedKv {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    blocks: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    pool: BlockPool,
}

impl PagedKv {
    /// A pool for a model of `layers` layers, `heads` query and `kv_heads` key/value heads of `head_dim`.
    pub fn new(
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        blocks: usize,
    ) -> Self {
        assert!(block_size > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads), "paged cache geometry");
        let size = blocks * kv_heads * block_size * head_dim;
        // Written now, not only allocated: every page is faulted in at start-up instead of by the step that
        // first reaches it (a page's first touch is a fault, and in a virtual machine whose memory the host
        // backs lazily, a stall of up to hundreds of milliseconds in the middle of a request).
        let touched = || {
            let mut values = Vec::with_capacity(size);
            values.resize(size, 0f32);
            values
        };
        Self {
            heads,
            kv_heads,
            head_dim,
            block_size,
            blocks,
            layers: (0..layers).map(|_| (touched(), touched())).collect(),
            pool: BlockPool::new(blocks, block_size),
        }
    }

    /// Layers, query heads, key/value heads and head size it was made for.
    pub fn geometry(&self) -> (usize, usize, usize, usize) {
        (self.layers.len(), self.heads, self.kv_heads, self.head_dim)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks a sequence can take: free ones, and cached ones no sequence holds (evicted when taken).
    pub fn free_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Cached blocks no sequence holds: kept for prefixes that may come again, and counted as free.
    pub fn cached_blocks(&self) -> usize {
        self.pool.idle()
    }

    /// Bytes of keys and values one block holds over all layers (f32).
    pub fn bytes_per_block(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.block_size * self.head_dim * 4
    }

    /// Blocks that `positions` positions fill.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Gives `table` the blocks it needs to hold `extra` more positions than it has cached. Returns false, and
    /// takes nothing, when the pool has too few free blocks.
    pub fn reserve(&mut self, table: &mut BlockTable, extra: usize) -> bool {
        let need = self.blocks_for(table.len + extra).saturating_sub(table.blocks.len());
        match self.pool.take(need) {
            Some(blocks) => {
                table.blocks.extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Returns a finished sequence's blocks to the pool (those in the prefix cache stay cached until needed).
    pub fn release(&mut self, table: &mut BlockTable) {
        self.pool.let_go(&table.blocks);
        *table = BlockTable::default();
    }

    /// Starts the empty `table` with the longest prefix of `tokens` that the cache holds under `salt` (keys
    /// and values depend on the model's weights: a LoRA adapter needs its own salt). Whole blocks are shared;
    /// where only the start of a cached block matches, that block is copied into a block of the table's own,
    /// so its later positions can be written. Returns the positions the table now holds, at most
    /// `tokens.len()`, which the sequence need not compute. A copy needs a free block; without one, the table
    /// keeps the whole blocks only.
    pub fn share_prefix(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) -> usize {
        assert!(table.blocks.is_empty() && table.len == 0, "share_prefix starts an empty table");
        let bs = self.block_size;
        let prefix = self.pool.lookup(tokens, salt);
        for &b in &prefix.full {
            self.pool.hold(b);
        }
        table.blocks = prefix.full;
        table.len = table.blocks.len() * bs;
        table.hashed = table.blocks.len();
        table.key = prefix.key;
        if let Some((from, matched)) = prefix.partial {
            // Held while a block is taken, so that taking cannot evict it.
            self.pool.hold(from);
            if let Some(to) = self.pool.take(1) {
                self.copy_block(from, to[0]);
                table.blocks.push(to[0]);
                table.len += matched;
            }
            self.pool.let_go(&[from]);
        }
        table.len
    }

    /// Registers the blocks that `table` has filled since the last call, `tokens` being the sequence's tokens
    /// (at least its cached positions), so that later sequences starting with the same tokens under `salt`
    /// share them.
    pub fn register(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) {
        let bs = self.block_size;
        let full = table.len.min(tokens.len()) / bs;
        if table.hashed == 0 && full > 0 {
            table.key = self.pool.root_key(salt);
        }
        for i in table.hashed..full {
            table.key = self.pool.register(table.blocks[i], table.key, &tokens[i * bs..(i + 1) * bs]);
        }
        table.hashed = table.hashed.max(full);
    }

    /// Releases an ended sequence's blocks ([`PagedKv::release`]) after registering them, its last, partly
    /// filled block too: nothing writes it any more, so a later prompt that starts with the same tokens can
    /// copy it (a prompt shorter than a block included).
    pub fn release_cached(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) {
        self.register(table, tokens, salt);
        let bs = self.block_size;
        let len = table.len.min(tokens.len());
        let full = len / bs;
        if !len.is_multiple_of(bs) && full < table.blocks.len() && table.hashed == full {
            let parent = if full == 0 { self.pool.root_key(salt) } else { table.key };
            self.pool.register(table.blocks[full], parent, &tokens[full * bs..len]);
        }
        self.release(table);
    }

    /// Copies every layer's keys and values of block `from` into block `to`.
    fn copy_block(&mut self, from: u32, to: u32) {
        let size = self.kv_heads * self.block_size * self.head_dim;
        let (from, to) = (from as usize * size, to as usize * size);
        for (k, v) in &mut self.layers {
            k.copy_within(from..from + size, to);
            v.copy_within(from..from + size, to);
        }
    }

    /// Attention of layer `layer` for a ragged step: queries `[tokens, heads · head_dim]`, keys and values
    /// `[tokens, kv_heads · head_dim]` before rotation, the tokens of `spans` one after the other. The new keys
    /// (rotated to their positions) and values go into each sequence's blocks; each query sees its sequence's
    /// cached positions and its new ones up to itself (within `window` positions, when given). Returns the
    /// context, `[tokens, heads · head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        spans: &[Span<'_>],
        rope: &RopeTables,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (nh, kvh, d, bs) = (self.heads, self.kv_heads, self.head_dim, self.block_size);
        let starts: Vec<usize> = spans
            .iter()
            .scan(0, |at, s| {
                let start = *at;
                *at += s.new;
                Some(start)
            })
            .collect();
        let tokens = starts.last().zip(spans.last()).map_or(0, |(a, s)| a + s.new);
        assert!(q.len() == tokens * nh * d && k.len() == tokens * kvh * d, "paged attention: {tokens} tokens");
        for s in spans {
            assert!(
                s.past + s.new <= s.blocks.len() * bs,
                "paged attention: {} positions in {} blocks",
                s.past + s.new,
                s.blocks.len()
            );
        }
        let (kc, vc) = &mut self.layers[layer];
        // The new keys (rotated) and values into their blocks: a few values per token, not worth threads.
        for (span, &start) in spans.iter().zip(&starts) {
            for i in 0..span.new {
                let (t, pos) = (start + i, span.past + i);
                let block = span.blocks[pos / bs] as usize;
                for g in 0..kvh {
                    let at = ((block * kvh + g) * bs + pos % bs) * d;
                    rope.rotate(&k[(t * kvh + g) * d..][..d], pos, &mut kc[at..at + d]);
                    vc[at..at + d].copy_from_slice(&v[(t * kvh + g) * d..][..d]);
                }
            }
        }
        let (kc, vc) = (&*kc, &*vc);
        let groups = nh / kvh;
        let window = window.unwrap_or(usize::MAX);
        // One task per (sequence, key/value head): its keys and values gathered from the blocks once, and the
        // queries of all the heads it serves in one product.
        let outputs: Vec<Vec<f32>> = (0..spans.len() * kvh)
            .into_par_iter()
            .map(|task| {
                let (n, g) = (task / kvh, task % kvh);
                let (span, start) = (&spans[n], starts[n]);
                let (past, new) = (span.past, span.new);
                let total = past + new;
                let (mut keys, mut values) = (vec![0f32; total * d], vec![0f32; total * d]);
                for (b, &block) in span.blocks.iter().enumerate().take(total.div_ceil(bs)) {
                    let rows = bs.min(total - b * bs);
                    let from = (block as usize * kvh + g) * bs * d;
                    keys[b * bs * d..][..rows * d].copy_from_slice(&kc[from..from + rows * d]);
                    values[b * bs * d..][..rows * d].copy_from_slice(&vc[from..from + rows * d]);
                }
                // Rows `h · new + i`: head `g · groups + h`, new token `i`.
                let mut qr = vec![0f32; groups * new * d];
                for h in 0..groups {
                    for i in 0..new {
                        let src = &q[((start + i) * nh + g * groups + h) * d..][..d];
                        rope.rotate(src, past + i, &mut qr[(h * new + i) * d..][..d]);
                    }
                }
                let m = groups * new;
                let mut p = vec![0f32; m * total];
                matmul(
                    ViewMut::new(&mut p, m, total),
                    View::new(&qr, m, d),
                    View::new(&keys, total, d).t(),
                    scale,
                    false,
                    Threads::One,
                );
                masked_softmax(&mut p, total, |r, j| {
                    let at = past + r % new;
                    j > at || at - j >= window
                });
                let mut out = vec![0f32; m * d];
                matmul(
                    ViewMut::new(&mut out, m, d),
                    View::new(&p, m, total),
                    View::new(&values, total, d),
                    1.0,
                    false,
                    Threads::One,
                );
                out
            })
            .collect();
        let width = nh * d;
        let mut ctx = vec![0f32; tokens * width];
        for (task, out) in outputs.iter().enumerate() {
            let (n, g) = (task / kvh, task % kvh);
            let (start, new) = (starts[n], spans[n].new);
            for h in 0..groups {
                for i in 0..new {
                    ctx[(start + i) * width + (g * groups + h) * d..][..d]
                        .copy_from_slice(&out[(h * new + i) * d..][..d]);
                }
            }
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reserved_as_needed_released_and_reused() {
        let mut kv = PagedKv::new(1, 2, 1, 4, 4, 5);
        assert_eq!((kv.free_blocks(), kv.blocks_for(9), kv.bytes_per_block()), (5, 3, 2 * 4 * 4 * 4));
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(kv.reserve(&mut a, 6), "6 positions: 2 blocks");
        assert_eq!(a.blocks, vec![0, 1]);
        a.len = 6;
        assert!(kv.reserve(&mut a, 2), "8 fit the 2 blocks");
        assert_eq!(a.blocks.len(), 2);
        assert!(!kv.reserve(&mut b, 13), "4 blocks, 3 free: nothing taken");
        assert_eq!((b.blocks.len(), kv.free_blocks()), (0, 3));
        assert!(kv.reserve(&mut b, 12));
        assert_eq!(kv.free_blocks(), 0);
        kv.release(&mut a);
        assert_eq!((a.len, a.blocks.len(), kv.free_blocks()), (0, 0, 2));
        let mut c = BlockTable::default();
        assert!(kv.reserve(&mut c, 5));
        assert_eq!(c.blocks, vec![0, 1], "released blocks come back");
    }
}
