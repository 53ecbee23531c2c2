//! Admission against the KV cache. Each GPU worker reports at start how many positions its cache holds and in
//! blocks of how many ([`WorkerCache`]); a sequence is admitted only while every such worker has room, in whole
//! blocks, for what it will cache next (its prompt and a stretch of tokens ahead, at most prompt + max_tokens)
//! beside the sequences already admitted ([`CacheBudget`]), and its hold grows as it generates (`try_grow`; the
//! scheduler preempts a sequence when one cannot grow). The others wait in order; one whose prompt + max_tokens
//! cannot fit even alone is refused ([`TooLarge`]). CPU workers' caches have no bound.
//!
//! A sequence's room is held from admission until every worker has freed it (the Free rpc returned), so a
//! new sequence never meets blocks a finished one still holds.

use std::fmt;

/// One worker's cache, as it reported it at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerCache {
    pub rank: usize,
    /// Positions the cache holds over all sequences.
    pub capacity: usize,
    /// A sequence holds its positions rounded up to a multiple of this.
    pub block: usize,
}

impl WorkerCache {
    /// Positions a sequence of `positions` holds here.
    fn held(&self, positions: usize) -> usize {
        let block = self.block.max(1);
        positions.div_ceil(block) * block
    }
}

/// A sequence no worker's cache could hold even alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub rank: usize,
    /// The prompt + max_tokens asked for.
    pub positions: usize,
    pub capacity: usize,
    pub block: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "This request needs {} positions of KV cache (prompt + max_tokens), but the cache of worker {} holds {} \
             (in blocks of {}).",
            self.positions, self.rank, self.capacity, self.block
        )
    }
}

/// The bounded caches of a fleet: what can ever be admitted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheLimits {
    pub workers: Vec<WorkerCache>,
}

impl CacheLimits {
    /// Refuses a sequence of `positions` that some worker could not hold even with nothing else cached.
    pub fn check(&self, positions: usize) -> Result<(), TooLarge> {
        match self.workers.iter().find(|w| w.held(positions) > w.capacity) {
            Some(w) => Err(TooLarge { rank: w.rank, positions, capacity: w.capacity, block: w.block }),
            None => Ok(()),
        }
    }

    /// The most positions one sequence can have: the smallest cache; `None` without a bounded one.
    pub fn capacity(&self) -> Option<usize> {
        self.workers.iter().map(|w| w.capacity).min()
    }
}

/// The limits and what the admitted sequences hold of them.
#[derive(Clone, Debug, Default)]
pub struct CacheBudget {
    limits: CacheLimits,
    /// Positions held on each bounded worker, in `limits.workers` order.
    held: Vec<usize>,
}

impl CacheBudget {
    pub fn new(limits: CacheLimits) -> Self {
        let held = vec![0; limits.workers.len()];
        Self { limits, held }
    }

    pub fn limits(&self) -> &CacheLimits {
        &self.limits
    }

    /// Holds room for a sequence of `positions` on every worker, if each has it; `false` changes nothing.
    pub fn try_reserve(&mut self, positions: usize) -> bool {
        let fits = self.limits.workers.iter().zip(&self.held).all(|(w, &h)| h + w.held(positions) <= w.capacity);
        if fits {
            for (w, h) in self.limits.workers.iter().zip(&mut self.held) {
                *h += w.held(positions);
            }
        }
        fits
    }

    /// Grows a sequence's hold from `from` to `to` positions on every worker, if each has the extra blocks;
    /// `false` changes nothing. A hold grown this way is given back by `release(to)`.
    pub fn try_grow(&mut self, from: usize, to: usize) -> bool {
        let extra = |w: &WorkerCache| w.held(to).saturating_sub(w.held(from));
        let fits = self.limits.workers.iter().zip(&self.held).all(|(w, &h)| h + extra(w) <= w.capacity);
        if fits {
            for (w, h) in self.limits.workers.iter().zip(&mut self.held) {
                *h += extra(w);
            }
        }
        fits
    }

    /// Gives back what `try_reserve(positions)` held.
    pub fn release(&mut self, positions: usize) {
        for (w, h) in self.limits.workers.iter().zip(&mut self.held) {
            *h = h.saturating_sub(w.held(positions));
        }
    }

    /// `(capacity, held)` of the worker with the least room left, for metrics; `None` without a bounded cache.
    pub fn tightest(&self) -> Option<(usize, usize)> {
        self.limits.workers.iter().zip(&self.held).map(|(w, &h)| (w.capacity, h)).min_by_key(|&(c, h)| c - h.min(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CacheLimits {
        // Two GPU workers: 256 positions in blocks of 64, and 512 in blocks of 64.
        CacheLimits {
            workers: vec![
                WorkerCache { rank: 0, capacity: 512, block: 64 },
                WorkerCache { rank: 2, capacity: 256, block: 64 },
            ],
        }
    }

    #[test]
    fn a_sequence_that_cannot_fit_alone_is_named_with_the_numbers() {
        let l = limits();
        assert_eq!(l.check(256), Ok(()));
        let err = l.check(257).expect_err("over 256");
        assert_eq!(err, TooLarge { rank: 2, positions: 257, capacity: 256, block: 64 });
        let msg = err.to_string();
        assert!(msg.contains("257 positions") && msg.contains("worker 2 holds 256"), "{msg}");
        assert_eq!(l.capacity(), Some(256));
        // CPU workers only: no bound.
        assert_eq!(CacheLimits::default().check(usize::MAX / 2), Ok(()));
        assert_eq!(CacheLimits::default().capacity(), None);
    }

    #[test]
    fn admission_holds_whole_blocks_until_released() {
        let mut b = CacheBudget::new(limits());
        // 100 positions hold two blocks (128) on each worker: two such sequences fill the 256 of worker 2.
        assert!(b.try_reserve(100));
        assert!(b.try_reserve(65));
        assert_eq!(b.tightest(), Some((256, 256)));
        // A third waits, even of one position; nothing was held for it.
        assert!(!b.try_reserve(1));
        assert_eq!(b.tightest(), Some((256, 256)));
        // Freed room is reused; one block on its own goes to a sequence of one block.
        b.release(65);
        assert!(b.try_reserve(64));
        assert!(b.try_reserve(1));
        assert!(!b.try_reserve(1));
        b.release(100);
        b.release(64);
        b.release(1);
        assert_eq!(b.tightest(), Some((256, 0)));
        // A hold grows by whole blocks, only while every worker has them, and is given back at its new size.
        assert!(b.try_reserve(10));
        assert!(b.try_grow(10, 64), "within its block: nothing more to hold");
        assert_eq!(b.tightest(), Some((256, 64)));
        assert!(b.try_grow(64, 200));
        assert_eq!(b.tightest(), Some((256, 256)));
        assert!(!b.try_grow(200, 257));
        assert_eq!(b.tightest(), Some((256, 256)), "a refused growth holds nothing more");
        b.release(200);
        assert_eq!(b.tightest(), Some((256, 0)));
        // Without bounded workers everything fits.
        let mut open = CacheBudget::new(CacheLimits::default());
        assert!(open.try_reserve(1 << 30) && open.try_reserve(1 << 30));
        assert_eq!(open.tightest(), None);
    }
}
