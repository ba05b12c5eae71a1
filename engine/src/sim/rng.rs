//! The simulation's one source of chance: a seeded splitmix64 stream.

use crate::placement::ring::splitmix64;

/// A small seeded RNG; every choice of a run comes from one, so a seed replays a run.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// The stream of `seed`.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(splitmix64(seed ^ 0x5eed_5eed_5eed_5eed))
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi, "an empty interval {lo}..={hi}");
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// An independent stream derived from this one (for a part of the run whose choices
    /// must not shift when another part makes more of them).
    pub(crate) fn fork(&mut self, salt: u64) -> Rng {
        Rng(splitmix64(self.next() ^ salt))
    }
}
