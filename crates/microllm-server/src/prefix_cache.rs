//! The prefix cache: keys and values of earlier requests' tokens, kept in fixed-size blocks
//! under a memory budget, so that a new request whose prompt starts like an earlier one (a
//! system prompt, a chat history) copies that prefix's KV instead of evaluating it again.
//!
//! A token sequence is cut into blocks of `block_tokens`. A block is named by its parent block
//! (the block before it, or the root) and its own tokens, so following blocks from the root
//! names a whole prefix: two blocks with the same tokens after different prefixes are different
//! blocks, and the same prefix always leads to the same chain. Lookup hashes `(parent, tokens)`
//! and then compares both exactly (block ids are never reused and tokens are stored), so a hash
//! collision can cost a lookup but never return KV for other tokens. Exact token match at the
//! same positions means the copied KV is bit for bit what evaluating the prefix gives.
//!
//! Each block holds the KV rows of its positions for every layer, as the opaque bytes of
//! `State::kv_read`. When the budget is full, the least recently used block goes first; every
//! lookup or insert touches the whole chain it walks, so a parent is never older than its
//! children and ties go to the deeper block: eviction always takes a leaf, and the shared
//! beginnings of many prompts outlive their individual continuations.

use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Names a block; never reused. The root (the empty prefix) is 0.
pub(crate) type BlockId = u64;
const ROOT: BlockId = 0;

struct Block {
    parent: BlockId,
    tokens: Box<[u32]>,
    hash: u64,
    /// Blocks in the chain up to and including this one (1 for a first block).
    depth: usize,
    last_used: u64,
    n_children: usize,
    kv: Vec<u8>,
}

/// What the cache holds, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub blocks: usize,
    pub bytes: usize,
    pub evictions: u64,
}

pub(crate) struct PrefixCache {
    block_tokens: usize,
    block_bytes: usize,
    max_blocks: usize,
    hash: fn(BlockId, &[u32]) -> u64,
    /// `hash(parent, tokens)` -> the blocks with that hash (almost always one).
    index: HashMap<u64, Vec<BlockId>>,
    blocks: HashMap<BlockId, Block>,
    /// Eviction order: oldest first, deeper first on a tie.
    lru: BTreeSet<(u64, Reverse<usize>, BlockId)>,
    next_id: BlockId,
    tick: u64,
    /// Buffers of evicted blocks, reused by the next inserts.
    spare: Vec<Vec<u8>>,
    evictions: u64,
}

fn sip_hash(parent: BlockId, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// A cache of blocks of `block_tokens` positions, each `bytes_per_pos` bytes of KV per
    /// position, holding at most `budget_bytes` of KV (0: the cache is off).
    pub fn new(block_tokens: usize, bytes_per_pos: usize, budget_bytes: usize) -> Self {
        Self::with_hash(block_tokens, bytes_per_pos, budget_bytes, sip_hash)
    }

    fn with_hash(
        block_tokens: usize,
        bytes_per_pos: usize,
        budget_bytes: usize,
        hash: fn(BlockId, &[u32]) -> u64,
    ) -> Self {
        let block_tokens = block_tokens.max(1);
        let block_bytes = block_tokens * bytes_per_pos;
        PrefixCache {
            block_tokens,
            block_bytes,
            max_blocks: budget_bytes.checked_div(block_bytes).unwrap_or(0),
            hash,
            index: HashMap::new(),
            blocks: HashMap::new(),
            lru: BTreeSet::new(),
            next_id: ROOT + 1,
            tick: 0,
            spare: Vec::new(),
            evictions: 0,
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Most blocks the budget holds.
    pub fn capacity_blocks(&self) -> usize {
        self.max_blocks
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            blocks: self.blocks.len(),
            bytes: self.blocks.len() * self.block_bytes,
            evictions: self.evictions,
        }
    }

    /// The cached child of `parent` holding exactly `tokens`.
    fn find(&self, parent: BlockId, tokens: &[u32]) -> Option<BlockId> {
        let h = (self.hash)(parent, tokens);
        self.index.get(&h)?.iter().copied().find(|id| {
            self.blocks
                .get(id)
                .is_some_and(|b| b.parent == parent && *b.tokens == *tokens)
        })
    }

    fn touch(&mut self, id: BlockId) {
        if let Some(b) = self.blocks.get_mut(&id) {
            self.lru.remove(&(b.last_used, Reverse(b.depth), id));
            b.last_used = self.tick;
            self.lru.insert((b.last_used, Reverse(b.depth), id));
        }
    }

    /// The longest chain of cached blocks that `tokens` starts with (whole blocks only), first
    /// block first; marks them used.
    pub fn lookup(&mut self, tokens: &[u32]) -> Vec<BlockId> {
        self.tick += 1;
        let mut chain = Vec::new();
        let mut parent = ROOT;
        for block in tokens.chunks_exact(self.block_tokens) {
            let Some(id) = self.find(parent, block) else {
                break;
            };
            self.touch(id);
            chain.push(id);
            parent = id;
        }
        chain
    }

    /// The KV rows of a block returned by [`PrefixCache::lookup`] (`block_tokens` positions).
    pub fn kv(&self, id: BlockId) -> Option<&[u8]> {
        self.blocks.get(&id).map(|b| b.kv.as_slice())
    }

    /// Caches the whole blocks of `tokens` that are not cached yet. `read(from, to, out)` must
    /// append the KV rows of positions `from..to` of `tokens` to `out`. Stops early, keeping
    /// what it inserted, when the budget cannot make room without evicting this very chain or
    /// when `read` fails. Returns the number of blocks added.
    pub fn insert<E>(
        &mut self,
        tokens: &[u32],
        mut read: impl FnMut(usize, usize, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<usize, E> {
        if self.max_blocks == 0 {
            return Ok(0);
        }
        self.tick += 1;
        let bt = self.block_tokens;
        let mut parent = ROOT;
        let mut depth = 0;
        let mut added = 0;
        for (i, block) in tokens.chunks_exact(bt).enumerate() {
            depth += 1;
            if let Some(id) = self.find(parent, block) {
                self.touch(id);
                parent = id;
                continue;
            }
            if self.blocks.len() >= self.max_blocks && !self.evict_one() {
                break;
            }
            let mut kv = self.spare.pop().unwrap_or_default();
            kv.clear();
            if let Err(e) = read(i * bt, (i + 1) * bt, &mut kv) {
                self.spare.push(kv);
                return Err(e);
            }
            let id = self.next_id;
            self.next_id += 1;
            let hash = (self.hash)(parent, block);
            self.index.entry(hash).or_default().push(id);
            if let Some(p) = self.blocks.get_mut(&parent) {
                p.n_children += 1;
            }
            self.lru.insert((self.tick, Reverse(depth), id));
            self.blocks.insert(
                id,
                Block {
                    parent,
                    tokens: block.into(),
                    hash,
                    depth,
                    last_used: self.tick,
                    n_children: 0,
                    kv,
                },
            );
            added += 1;
            parent = id;
        }
        Ok(added)
    }

    /// Drops the least recently used block unless it was used by the current operation.
    fn evict_one(&mut self) -> bool {
        let Some(&(last_used, _, id)) = self.lru.first() else {
            return false;
        };
        if last_used == self.tick {
            return false;
        }
        self.lru.pop_first();
        let Some(b) = self.blocks.remove(&id) else {
            return false;
        };
        debug_assert_eq!(b.n_children, 0, "the oldest block is always a leaf");
        if let Some(ids) = self.index.get_mut(&b.hash) {
            ids.retain(|&x| x != id);
            if ids.is_empty() {
                self.index.remove(&b.hash);
            }
        }
        if let Some(p) = self.blocks.get_mut(&b.parent) {
            p.n_children -= 1;
        }
        self.spare.push(b.kv);
        self.evictions += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake KV rows: each position's row is its token and position, `W` bytes wide, so a
    /// block's bytes show exactly which tokens at which positions they came from.
    const W: usize = 8;

    fn rows(tokens: &[u32], from: usize, to: usize, out: &mut Vec<u8>) {
        for (p, t) in tokens.iter().enumerate().take(to).skip(from) {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(p as u32).to_le_bytes());
        }
    }

    fn insert(c: &mut PrefixCache, tokens: &[u32]) -> usize {
        c.insert(tokens, |a, b, out| {
            rows(tokens, a, b, out);
            Ok::<(), ()>(())
        })
        .unwrap()
    }

    /// The tokens and positions the chain's KV rows came from.
    fn chain_rows(c: &PrefixCache, chain: &[BlockId]) -> Vec<(u32, u32)> {
        chain
            .iter()
            .flat_map(|&id| c.kv(id).unwrap().chunks_exact(W))
            .map(|r| {
                (
                    u32::from_le_bytes(r[..4].try_into().unwrap()),
                    u32::from_le_bytes(r[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Looks `tokens` up and returns where the matched blocks' rows came from.
    fn hit(c: &mut PrefixCache, tokens: &[u32]) -> Vec<(u32, u32)> {
        let chain = c.lookup(tokens);
        chain_rows(c, &chain)
    }

    fn expect_rows(tokens: &[u32]) -> Vec<(u32, u32)> {
        tokens
            .iter()
            .enumerate()
            .map(|(p, &t)| (t, p as u32))
            .collect()
    }

    fn seq(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    #[test]
    fn longest_whole_block_prefix_is_found() {
        let mut c = PrefixCache::new(4, W, 1 << 20);
        let a = seq(0, 14); // 3 whole blocks + 2 tokens
        assert_eq!(insert(&mut c, &a), 3);
        assert_eq!(c.stats().blocks, 3);
        // Inserting again adds nothing.
        assert_eq!(insert(&mut c, &a), 0);
        // Same first 9 tokens, then different: 2 blocks match.
        let mut b = a[..9].to_vec();
        b.extend([100, 101, 102, 103, 104]);
        let chain = c.lookup(&b);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain_rows(&c, &chain), expect_rows(&b[..8]));
        // A prompt shorter than one block, or differing in the first block, matches nothing.
        assert!(c.lookup(&a[..3]).is_empty());
        let mut d = a.clone();
        d[1] = 99;
        assert!(c.lookup(&d).is_empty());
        // A longer prompt matches all three.
        let mut e = a.clone();
        e.extend(seq(50, 10));
        assert_eq!(hit(&mut c, &e), expect_rows(&a[..12]));
        // b's own continuation is cached after the shared part.
        assert_eq!(insert(&mut c, &b), 1);
        assert_eq!(hit(&mut c, &b), expect_rows(&b[..12]));
        assert_eq!(c.stats().blocks, 4);
    }

    #[test]
    fn a_block_is_named_by_its_whole_prefix() {
        let mut c = PrefixCache::new(2, W, 1 << 20);
        // The same block [7, 8] after two different first blocks: two different blocks.
        insert(&mut c, &[1, 2, 7, 8]);
        assert_eq!(c.lookup(&[3, 4, 7, 8]).len(), 0);
        assert_eq!(insert(&mut c, &[3, 4, 7, 8]), 2);
        assert_eq!(c.stats().blocks, 4);
        let x = c.lookup(&[1, 2, 7, 8]);
        let y = c.lookup(&[3, 4, 7, 8]);
        assert_ne!(x[1], y[1]);
        assert_eq!(chain_rows(&c, &y), expect_rows(&[3, 4, 7, 8]));
        // A block's tokens alone (at the root) match nothing.
        assert!(c.lookup(&[7, 8]).is_empty());
    }

    #[test]
    fn colliding_hashes_never_return_other_tokens() {
        // Every (parent, tokens) hashes alike: lookups must still compare exactly.
        let mut c = PrefixCache::with_hash(2, W, 1 << 20, |_, _| 42);
        insert(&mut c, &[1, 2, 3, 4]);
        insert(&mut c, &[1, 2, 5, 6]);
        insert(&mut c, &[9, 9, 3, 4]);
        assert_eq!(c.stats().blocks, 5);
        for t in [[1, 2, 3, 4], [1, 2, 5, 6], [9, 9, 3, 4]] {
            assert_eq!(hit(&mut c, &t), expect_rows(&t));
        }
        assert_eq!(hit(&mut c, &[1, 2, 9, 9]), expect_rows(&[1, 2]));
        assert!(c.lookup(&[2, 1, 3, 4]).is_empty());
        assert!(c.lookup(&[9, 8, 3, 4]).is_empty());
    }

    #[test]
    fn lru_eviction_keeps_the_budget_and_takes_leaves_first() {
        // Room for 4 blocks of 2 tokens.
        let mut c = PrefixCache::new(2, W, 4 * 2 * W);
        assert_eq!(c.capacity_blocks(), 4);
        let sys = [1, 2, 3, 4]; // a shared "system prompt" of 2 blocks
        let a = [1, 2, 3, 4, 10, 11];
        let b = [1, 2, 3, 4, 20, 21];
        let d = [1, 2, 3, 4, 30, 31];
        insert(&mut c, &a);
        insert(&mut c, &b);
        assert_eq!(c.stats().blocks, 4);
        // Full: d's last block evicts the least recently used leaf (a's), not the shared ones.
        assert_eq!(insert(&mut c, &d), 1);
        assert_eq!(
            c.stats(),
            CacheStats {
                blocks: 4,
                bytes: 4 * 2 * W,
                evictions: 1
            }
        );
        assert_eq!(c.lookup(&a).len(), 2);
        assert_eq!(c.lookup(&b).len(), 3);
        assert_eq!(c.lookup(&d).len(), 3);
        // Using b makes d's leaf the oldest: the next insert evicts it.
        c.lookup(&b);
        insert(&mut c, &a);
        assert_eq!(c.lookup(&d).len(), 2);
        assert_eq!(hit(&mut c, &a), expect_rows(&a));
        assert_eq!(hit(&mut c, &b), expect_rows(&b));
        // The shared blocks were never evicted.
        assert_eq!(c.lookup(&sys).len(), 2);
        assert_eq!(c.stats().evictions, 2);
        // An unrelated long sequence evicts everything older but never its own chain: it
        // keeps its first 4 blocks and stops.
        let long = seq(100, 12);
        assert_eq!(insert(&mut c, &long), 4);
        assert_eq!(c.stats().blocks, 4);
        assert_eq!(hit(&mut c, &long), expect_rows(&long[..8]));
        assert!(c.lookup(&sys).is_empty());
    }

    #[test]
    fn a_zero_budget_caches_nothing_and_read_errors_stop_the_insert() {
        let mut c = PrefixCache::new(2, W, 0);
        assert_eq!(insert(&mut c, &[1, 2, 3, 4]), 0);
        assert!(c.lookup(&[1, 2, 3, 4]).is_empty());
        let mut c = PrefixCache::new(2, W, 1 << 20);
        let mut calls = 0;
        let r = c.insert(&[1, 2, 3, 4, 5, 6], |a, b, out| {
            calls += 1;
            if calls == 2 {
                return Err("boom");
            }
            rows(&[1, 2, 3, 4, 5, 6], a, b, out);
            Ok(())
        });
        assert_eq!(r, Err("boom"));
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6]).len(), 1);
    }
}
