//! The blocks of a paged key/value pool ([`super::paged::PagedKv`]): who holds each one, which are free, and a
//! prefix cache over the full ones (automatic prefix caching, as vLLM's block hashes and SGLang's radix tree
//! do it).
//!
//! A block that a sequence has filled never changes again, so once full it is registered under the tokens it
//! holds and the prefix before them: a chain key `hash(parent key, tokens)` from a root key per salt (the LoRA
//! adapter: the same tokens under another adapter have other keys and values). A later sequence whose prompt
//! starts with the same tokens holds those blocks too instead of computing them again; when every holder has
//! let go, a registered block stays cached, idle, until a sequence needs a block and none is free; then the
//! idle block let go longest ago is evicted. The tokens are kept beside each key, so a hash collision can
//! never hand out the wrong block.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

/// A registered block: the chain key of the prefix it ends, its parent's key, and its tokens.
#[derive(Debug)]
struct Entry {
    key: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

/// What a pool holds of a token sequence: whole blocks from the start, each holding the next `block_size`
/// tokens, then, where the next whole block is not cached, the cached block that starts with the most of the
/// tokens after them (and how many it matches).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Prefix {
    pub full: Vec<u32>,
    /// The chain key after the whole blocks.
    pub key: u64,
    pub partial: Option<(u32, usize)>,
}

#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: usize,
    /// Sequences holding each block.
    refs: Vec<u32>,
    entries: Vec<Option<Entry>>,
    by_key: HashMap<u64, u32>,
    /// Registered blocks by their parent's key (the candidates for a partial match).
    children: HashMap<u64, Vec<u32>>,
    /// Registered blocks no sequence holds, by when they were let go (the oldest is evicted first).
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    /// Unregistered blocks no sequence holds, taken from the end.
    free: Vec<u32>,
    /// Keys of this process's own (a client cannot aim at a collision it cannot compute).
    hasher: RandomState,
}

impl BlockPool {
    pub fn new(blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; blocks],
            entries: (0..blocks).map(|_| None).collect(),
            by_key: HashMap::new(),
            children: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; blocks],
            clock: 0,
            free: (0..blocks as u32).rev().collect(),
            hasher: RandomState::new(),
        }
    }

    /// The chain key before a sequence's first block.
    pub fn root_key(&self, salt: u64) -> u64 {
        self.hasher.hash_one((u64::MAX, salt))
    }

    /// The chain key of a block of `tokens` after the prefix of key `parent`.
    pub fn chain_key(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// Blocks a sequence can take: the free ones and the cached ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Cached blocks nobody holds.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// `n` blocks for one holder, free ones first, then idle cached ones (the longest idle first, forgotten);
    /// none when fewer are available.
    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.available() {
            return None;
        }
        let from_free = n.min(self.free.len());
        let mut taken: Vec<u32> = self.free.drain(self.free.len() - from_free..).rev().collect();
        while taken.len() < n {
            let (_, block) = self.idle.pop_first().expect("counted as available");
            self.forget(block);
            taken.push(block);
        }
        for &b in &taken {
            self.refs[b as usize] = 1;
        }
        Some(taken)
    }

    /// One more holder of a cached block.
    pub fn hold(&mut self, block: u32) {
        let b = block as usize;
        if self.refs[b] == 0 {
            self.idle.remove(&self.idle_since[b]);
        }
        self.refs[b] += 1;
    }

    /// A holder lets its blocks go (a sequence's, in order). The blocks nobody holds any more become free, or
    /// idle when cached; the later blocks of a sequence count as let go earlier, so its tail is evicted before
    /// the prefix that other sequences are more likely to share.
    pub fn let_go(&mut self, blocks: &[u32]) {
        for &block in blocks.iter().rev() {
            let b = block as usize;
            assert!(self.refs[b] > 0, "block {block} let go by a sequence that does not hold it");
            self.refs[b] -= 1;
            if self.refs[b] > 0 {
                continue;
            }
            if self.entries[b].is_some() {
                self.clock += 1;
                self.idle_since[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Registers `block` holding `tokens` after the prefix of key `parent`, and returns its key. A block already
    /// registered under that key (the same prefix computed by another sequence at the same time) keeps it;
    /// `block` then stays unregistered and is freed as usual. A block of fewer tokens than a block holds (the
    /// tail of a sequence that has ended, written no more) is only ever matched in part, so copied, never
    /// shared or continued.
    pub fn register(&mut self, block: u32, parent: u64, tokens: &[u32]) -> u64 {
        debug_assert!(!tokens.is_empty() && tokens.len() <= self.block_size);
        let key = self.chain_key(parent, tokens);
        if self.by_key.contains_key(&key) || self.entries[block as usize].is_some() {
            return key;
        }
        self.by_key.insert(key, block);
        self.children.entry(parent).or_default().push(block);
        self.entries[block as usize] = Some(Entry { key, parent, tokens: tokens.into() });
        key
    }

    /// The cached prefix of `tokens` under `salt` (holding nothing yet).
    pub fn lookup(&self, tokens: &[u32], salt: u64) -> Prefix {
        let mut prefix = Prefix { key: self.root_key(salt), ..Prefix::default() };
        for chunk in tokens.chunks(self.block_size) {
            if chunk.len() == self.block_size {
                let key = self.chain_key(prefix.key, chunk);
                let found = self.by_key.get(&key).filter(|&&b| self.tokens(b) == chunk);
                if let Some(&block) = found {
                    prefix.full.push(block);
                    prefix.key = key;
                    continue;
                }
            }
            prefix.partial = self
                .children
                .get(&prefix.key)
                .into_iter()
                .flatten()
                .map(|&b| (b, self.tokens(b).iter().zip(chunk).take_while(|(a, b)| a == b).count()))
                .filter(|&(_, n)| n > 0)
                .max_by_key(|&(b, n)| (n, std::cmp::Reverse(b)));
            break;
        }
        prefix
    }

    fn tokens(&self, block: u32) -> &[u32] {
        self.entries[block as usize].as_ref().map_or(&[], |e| &e.tokens)
    }

    /// Drops an evicted block's registration.
    fn forget(&mut self, block: u32) {
        let Some(entry) = self.entries[block as usize].take() else { return };
        self.by_key.remove(&entry.key);
        if let Some(siblings) = self.children.get_mut(&entry.parent) {
            siblings.retain(|&b| b != block);
            if siblings.is_empty() {
                self.children.remove(&entry.parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_blocks_are_found_by_their_prefix_and_salt() {
        let mut pool = BlockPool::new(6, 2);
        let blocks = pool.take(3).expect("3 of 6");
        let k0 = pool.register(blocks[0], pool.root_key(0), &[5, 6]);
        let k1 = pool.register(blocks[1], k0, &[7, 8]);
        pool.register(blocks[2], k1, &[9, 10]);
        let p = pool.lookup(&[5, 6, 7, 8, 9], 0);
        assert_eq!((p.full.as_slice(), p.key, p.partial), (&blocks[..2], k1, Some((blocks[2], 1))));
        assert_eq!(
            pool.lookup(&[5, 6, 7, 8, 9], 1),
            Prefix { key: pool.root_key(1), ..Prefix::default() },
            "another salt"
        );
        let p = pool.lookup(&[5, 6, 7, 3], 0);
        assert_eq!((p.full.len(), p.partial), (1, Some((blocks[1], 1))), "a partial match of the second block");
        assert_eq!(pool.lookup(&[6, 5], 0).full.len(), 0, "the same tokens at another place are another block");
        // The same prefix computed again elsewhere keeps the first registration.
        let again = pool.take(1).expect("a free block")[0];
        assert_eq!(pool.register(again, pool.root_key(0), &[5, 6]), k0);
        assert_eq!(pool.lookup(&[5, 6], 0).full, vec![blocks[0]]);
    }

    #[test]
    fn blocks_let_go_stay_cached_until_needed_and_the_tail_goes_first() {
        let mut pool = BlockPool::new(4, 1);
        let a = pool.take(3).expect("3 of 4");
        let mut key = pool.root_key(0);
        for (i, &b) in a.iter().enumerate() {
            key = pool.register(b, key, &[i as u32]);
        }
        pool.let_go(&a);
        assert_eq!((pool.available(), pool.idle()), (4, 3));
        assert_eq!(pool.lookup(&[0, 1, 2], 0).full, a, "still cached after the holder left");
        // Two blocks: the free one, then the sequence's last block.
        let b = pool.take(2).expect("2 available");
        assert_eq!(b[1], a[2]);
        assert_eq!(pool.lookup(&[0, 1, 2], 0).full, a[..2].to_vec(), "the tail was evicted");
        // A held cached block is not evictable.
        pool.hold(a[0]);
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.take(1).expect("one left"), vec![a[1]]);
        assert_eq!(pool.take(1), None);
        pool.let_go(&[a[0]]);
        pool.let_go(&b);
        assert_eq!((pool.available(), pool.idle()), (3, 1), "evicted blocks come back free");
    }
}
