//! Range vector clocks and the server-side clock gate (MISSION.md P8, P6).
//!
//! A [`RangeVectorClock`] records, for each key range a node holds, the clock up to which
//! it has seen each peer. It is kept per *range*, not per key: a list of segments, each a
//! key range with one clock per node. Advancing a sub-range splits a segment; neighbours
//! whose clocks become equal merge again, so the size stays O(ranges x nodes) however many
//! keys the ranges hold. Clocks never go backwards (asserted).
//!
//! A [`ClockGate`] is what a server runs on top of it for the consistency models: workers
//! tag their pushes with their clock (iteration) and their pulls with the oldest clock the
//! answer may reflect ([`crate::consistency::Consistency::min_clock`]). The gate holds a
//! pull until every live worker has reached that clock on the pulled range, and, for
//! *ordered* (sequential) pushes, holds the pushes of clock `t` until every live worker's
//! push of clock `t` is in, then applies them in worker rank order: the applied sequence
//! is then the same in every run, so sequential runs give bitwise-identical models.
//!
//! Both are plain state machines: no sockets, no threads, no time. The caller carries out
//! the [`Action`]s they return, in order.

use std::collections::VecDeque;

use crate::keys::KeyRange;

/// Clocks of every node over one key range, kept as segments.
#[derive(Debug, Clone)]
pub struct RangeVectorClock {
    range: KeyRange,
    /// Sorted, non-overlapping, covering `range`; adjacent segments differ in clocks.
    segments: Vec<(KeyRange, Vec<u64>)>,
    /// Nodes that left: they no longer hold anybody back.
    retired: Vec<bool>,
}

impl RangeVectorClock {
    /// All clocks 0 over `range`, for `nodes` nodes.
    pub fn new(range: KeyRange, nodes: usize) -> Self {
        RangeVectorClock {
            range,
            segments: vec![(range, vec![0; nodes])],
            retired: vec![false; nodes],
        }
    }

    /// The range the clock covers.
    pub fn range(&self) -> KeyRange {
        self.range
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.retired.len()
    }

    /// The segments: key ranges, each with one clock per node.
    pub fn segments(&self) -> &[(KeyRange, Vec<u64>)] {
        &self.segments
    }

    /// Node `node` has reached clock `t` on `range`.
    ///
    /// # Panics
    /// When `range` is not within the clock's range, `node` is unknown, or the advance
    /// would move a clock backwards (a clock never goes back).
    pub fn advance(&mut self, range: KeyRange, node: usize, t: u64) {
        assert!(
            self.range.covers(&range),
            "clock advance on {range} outside {}",
            self.range
        );
        assert!(node < self.nodes(), "unknown node {node}");
        if range.is_empty() {
            return;
        }
        self.split_at(range.begin);
        self.split_at(range.end);
        for (r, clocks) in self.segments.iter_mut() {
            if range.covers(r) {
                assert!(
                    clocks[node] <= t,
                    "clock of node {node} on {r} would go back from {} to {t}",
                    clocks[node]
                );
                clocks[node] = t;
            }
        }
        self.merge();
    }

    /// Split the segment holding `key` so a segment starts at `key`.
    fn split_at(&mut self, key: u64) {
        if key <= self.range.begin || key >= self.range.end {
            return;
        }
        let i = self.segments.partition_point(|(r, _)| r.end <= key);
        let (r, clocks) = self.segments[i].clone();
        if r.begin == key {
            return;
        }
        self.segments[i].0 = KeyRange::new(r.begin, key);
        self.segments
            .insert(i + 1, (KeyRange::new(key, r.end), clocks));
    }

    /// Merge neighbours with equal clocks.
    fn merge(&mut self) {
        let mut out: Vec<(KeyRange, Vec<u64>)> = Vec::with_capacity(self.segments.len());
        for (r, c) in self.segments.drain(..) {
            match out.last_mut() {
                Some((pr, pc)) if *pc == c && pr.end == r.begin => pr.end = r.end,
                _ => out.push((r, c)),
            }
        }
        self.segments = out;
    }

    /// The smallest clock of any live node anywhere on `range` (the part within the
    /// clock's range). With no live node left: the largest clock anybody reached.
    pub fn min(&self, range: KeyRange) -> u64 {
        let live = self.retired.iter().any(|r| !r);
        let mut out: Option<u64> = None;
        for (r, clocks) in &self.segments {
            if r.intersect(&range).is_none() {
                continue;
            }
            let m = if live {
                clocks
                    .iter()
                    .zip(&self.retired)
                    .filter(|(_, &gone)| !gone)
                    .map(|(&c, _)| c)
                    .min()
            } else {
                clocks.iter().copied().max()
            };
            out = match (out, m) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        out.unwrap_or(0)
    }

    /// The smallest clock of `node` on `range`.
    pub fn clock_of(&self, range: KeyRange, node: usize) -> u64 {
        self.segments
            .iter()
            .filter(|(r, _)| r.intersect(&range).is_some())
            .map(|(_, c)| c[node])
            .min()
            .unwrap_or(0)
    }

    /// Node `node` left: it no longer holds back [`min`](Self::min).
    pub fn retire(&mut self, node: usize) {
        self.retired[node] = true;
    }

    /// Whether `node` has left.
    pub fn is_retired(&self, node: usize) -> bool {
        self.retired[node]
    }
}

/// What the server must do with a request the gate let through.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<P> {
    /// Apply this push to the store (and acknowledge it).
    Apply(P),
    /// Answer this pull from the store.
    Answer(P),
}

/// A held ordered push.
#[derive(Debug)]
struct HeldPush<P> {
    t: u64,
    range: KeyRange,
    p: P,
}

/// The server side of the consistency models: holds pulls until the workers' clocks allow
/// them, and orders sequential pushes. `P` is whatever the caller needs to carry out an
/// action later (the request's bytes and connection).
#[derive(Debug)]
pub struct ClockGate<P> {
    clock: RangeVectorClock,
    /// Ordered pushes waiting for their clock's batch, per worker, in arrival order.
    pushes: Vec<VecDeque<HeldPush<P>>>,
    /// Pulls waiting for the workers' clocks: (oldest clock allowed, range, request).
    pulls: Vec<(u64, KeyRange, P)>,
}

impl<P> ClockGate<P> {
    /// A gate over `range` for `workers` workers, all at clock 0.
    pub fn new(range: KeyRange, workers: usize) -> Self {
        ClockGate {
            clock: RangeVectorClock::new(range, workers),
            pushes: (0..workers).map(|_| VecDeque::new()).collect(),
            pulls: Vec::new(),
        }
    }

    /// The workers' clocks.
    pub fn clock(&self) -> &RangeVectorClock {
        &self.clock
    }

    /// A push of clock `t` from `worker` on `range` arrived. Unordered (or unclocked,
    /// `t == 0`) pushes apply at once; ordered ones wait until every live worker's push of
    /// clock `t` is in, then apply in rank order. Returns the actions to carry out, in
    /// order: applies first, then the pulls they release.
    ///
    /// # Panics
    /// When `worker` is not a worker of the gate (callers check the sender first).
    pub fn push(
        &mut self,
        worker: usize,
        t: u64,
        range: KeyRange,
        ordered: bool,
        p: P,
    ) -> Vec<Action<P>> {
        assert!(worker < self.pushes.len(), "unknown worker {worker}");
        let range = range.intersect(&self.clock.range()).unwrap_or(KeyRange {
            begin: self.clock.range().begin,
            end: self.clock.range().begin,
        });
        let mut out = Vec::new();
        if t == 0 || !ordered || self.clock.is_retired(worker) {
            out.push(Action::Apply(p));
            self.note(worker, t, range);
        } else {
            self.pushes[worker].push_back(HeldPush { t, range, p });
            self.drain_batches(&mut out);
        }
        self.release_pulls(&mut out);
        out
    }

    /// A pull that may reflect no clock older than `min_clock` on `range`: `Some` when it
    /// may be answered now, else the gate holds it and returns it from a later push or
    /// retire.
    pub fn pull(&mut self, min_clock: u64, range: KeyRange, p: P) -> Option<P> {
        if min_clock == 0 || self.clock.min(range) >= min_clock {
            Some(p)
        } else {
            self.pulls.push((min_clock, range, p));
            None
        }
    }

    /// `worker` left (its connection closed): it no longer holds anybody back. Its pushes
    /// that arrived still apply, in their batches.
    pub fn retire(&mut self, worker: usize) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if worker >= self.pushes.len() {
            return out;
        }
        self.clock.retire(worker);
        self.drain_batches(&mut out);
        self.release_pulls(&mut out);
        out
    }

    /// Pulls held now.
    pub fn held_pulls(&self) -> usize {
        self.pulls.len()
    }

    /// Ordered pushes held now.
    pub fn held_pushes(&self) -> usize {
        self.pushes.iter().map(VecDeque::len).sum()
    }

    /// Move `worker`'s clock up to `t` on `range` (never back: an older clock is a late
    /// message and changes nothing).
    fn note(&mut self, worker: usize, t: u64, range: KeyRange) {
        if t > self.clock.clock_of(range, worker) {
            // Parts of the range may be ahead already; advance only the parts behind.
            let behind: Vec<KeyRange> = self
                .clock
                .segments()
                .iter()
                .filter_map(|(r, c)| (c[worker] < t).then(|| r.intersect(&range)).flatten())
                .collect();
            for r in behind {
                self.clock.advance(r, worker, t);
            }
        }
    }

    /// Apply complete batches of ordered pushes, oldest clock first, rank order within.
    fn drain_batches(&mut self, out: &mut Vec<Action<P>>) {
        loop {
            let waiting_for_someone = self
                .pushes
                .iter()
                .enumerate()
                .any(|(w, q)| q.is_empty() && !self.clock.is_retired(w));
            if waiting_for_someone {
                return;
            }
            let Some(t) = self
                .pushes
                .iter()
                .filter_map(|q| q.front().map(|h| h.t))
                .min()
            else {
                return;
            };
            for w in 0..self.pushes.len() {
                if self.pushes[w].front().is_some_and(|h| h.t == t) {
                    let h = self.pushes[w].pop_front().expect("front checked above");
                    out.push(Action::Apply(h.p));
                    self.note(w, h.t, h.range);
                }
            }
        }
    }

    fn release_pulls(&mut self, out: &mut Vec<Action<P>>) {
        if self.pulls.is_empty() {
            return;
        }
        let clock = &self.clock;
        let mut keep = Vec::with_capacity(self.pulls.len());
        for (m, r, p) in self.pulls.drain(..) {
            if clock.min(r) >= m {
                out.push(Action::Answer(p));
            } else {
                keep.push((m, r, p));
            }
        }
        self.pulls = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPACE: u64 = 64;

    fn r(b: u64, e: u64) -> KeyRange {
        KeyRange::new(b, e)
    }

    #[test]
    fn split_and_merge() {
        let mut c = RangeVectorClock::new(r(0, 100), 2);
        c.advance(r(10, 20), 0, 3);
        assert_eq!(c.segments().len(), 3);
        assert_eq!(c.clock_of(r(10, 20), 0), 3);
        assert_eq!(c.clock_of(r(0, 100), 0), 0);
        assert_eq!(c.min(r(10, 20)), 0);
        c.advance(r(0, 10), 0, 3);
        c.advance(r(20, 100), 0, 3);
        assert_eq!(c.segments().len(), 1, "{:?}", c.segments());
        c.advance(r(0, 100), 1, 3);
        assert_eq!(c.min(r(0, 100)), 3);
    }

    #[test]
    #[should_panic(expected = "go back")]
    fn clocks_never_go_back() {
        let mut c = RangeVectorClock::new(r(0, 100), 1);
        c.advance(r(0, 50), 0, 5);
        c.advance(r(40, 60), 0, 4);
    }

    #[test]
    fn retired_nodes_do_not_hold_back() {
        let mut c = RangeVectorClock::new(r(0, 10), 3);
        c.advance(r(0, 10), 0, 4);
        c.advance(r(0, 10), 1, 2);
        assert_eq!(c.min(r(0, 10)), 0);
        c.retire(2);
        assert_eq!(c.min(r(0, 10)), 2);
        c.retire(1);
        c.retire(0);
        assert_eq!(c.min(r(0, 10)), 4, "all gone: the newest clock");
    }

    #[test]
    fn ordered_pushes_apply_in_rank_order_per_clock() {
        let mut g = ClockGate::new(r(0, 10), 3);
        assert!(g.push(2, 1, r(0, 10), true, "w2t1").is_empty());
        assert!(g.push(0, 1, r(0, 10), true, "w0t1").is_empty());
        assert!(g.push(0, 2, r(0, 10), true, "w0t2").is_empty());
        assert_eq!(g.pull(1, r(0, 10), "pull"), None);
        let a = g.push(1, 1, r(0, 10), true, "w1t1");
        assert_eq!(
            a,
            vec![
                Action::Apply("w0t1"),
                Action::Apply("w1t1"),
                Action::Apply("w2t1"),
                Action::Answer("pull"),
            ]
        );
        assert_eq!(g.held_pushes(), 1);
        // Worker 1 and 2 leave: worker 0's push of clock 2 goes through.
        assert!(g.retire(1).is_empty());
        assert_eq!(g.retire(2), vec![Action::Apply("w0t2")]);
    }

    #[test]
    fn unordered_pushes_apply_at_once_and_release_pulls() {
        let mut g = ClockGate::new(r(0, 10), 2);
        assert_eq!(g.pull(0, r(0, 10), "p0"), Some("p0"));
        assert_eq!(g.pull(2, r(0, 10), "p2"), None);
        assert_eq!(g.push(0, 2, r(0, 10), false, "a"), vec![Action::Apply("a")]);
        assert_eq!(
            g.push(1, 3, r(0, 10), false, "b"),
            vec![Action::Apply("b"), Action::Answer("p2")]
        );
        // A late push with an older clock applies but moves no clock back.
        assert_eq!(g.push(1, 1, r(0, 10), false, "c"), vec![Action::Apply("c")]);
        assert_eq!(g.clock().clock_of(r(0, 10), 1), 3);
        assert_eq!(g.held_pulls(), 0);
    }

    /// A per-key model of a vector clock.
    fn model_min(m: &[Vec<u64>], range: KeyRange) -> u64 {
        (range.begin..range.end.min(SPACE))
            .flat_map(|k| m[k as usize].iter().copied())
            .min()
            .unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The segmented clock agrees with a per-key model, stays merged, and stays small.
        #[test]
        fn range_clock_matches_per_key_model(
            ops in proptest::collection::vec((0u64..SPACE, 0u64..SPACE, 0usize..3, 1u64..4), 1..80),
        ) {
            let nodes = 3;
            let mut c = RangeVectorClock::new(r(0, SPACE), nodes);
            let mut m = vec![vec![0u64; nodes]; SPACE as usize];
            for (a, b, node, step) in ops {
                let (lo, hi) = (a.min(b), a.max(b) + 1);
                let t = (lo..hi).map(|k| m[k as usize][node]).max().unwrap() + step;
                c.advance(r(lo, hi), node, t);
                for k in lo..hi {
                    m[k as usize][node] = t;
                }
                // Segments tile the range, and neighbours differ.
                let segs = c.segments();
                prop_assert_eq!(segs[0].0.begin, 0);
                prop_assert_eq!(segs.last().unwrap().0.end, SPACE);
                for w in segs.windows(2) {
                    prop_assert_eq!(w[0].0.end, w[1].0.begin);
                    prop_assert!(w[0].1 != w[1].1);
                }
                for (sr, clocks) in segs {
                    for k in sr.begin..sr.end {
                        prop_assert_eq!(&m[k as usize], clocks);
                    }
                }
                for probe in [r(0, SPACE), r(lo, hi), r(0, lo.max(1)), r(hi - 1, SPACE)] {
                    prop_assert_eq!(c.min(probe), model_min(&m, probe));
                }
            }
        }

        /// Ordered pushes apply in the same order whatever order they arrive in, and
        /// pulls are answered only when every worker's clock allows.
        #[test]
        fn ordered_apply_order_is_deterministic(
            workers in 1usize..5,
            clocks in 1u64..6,
            shuffle in proptest::collection::vec(any::<u32>(), 0..40),
        ) {
            // Each worker sends clocks 1..=clocks in order, plus a pull at each clock that
            // needs the previous clock done (sequential). Interleave workers randomly.
            let mut next = vec![1u64; workers];
            let mut g: ClockGate<(usize, u64, bool)> = ClockGate::new(r(0, 100), workers);
            let mut applied = Vec::new();
            let mut answered = Vec::new();
            let mut step = 0;
            let mut pulled = vec![false; workers];
            loop {
                let live: Vec<usize> = (0..workers).filter(|&w| next[w] <= clocks).collect();
                if live.is_empty() {
                    break;
                }
                let w = live[shuffle.get(step).copied().unwrap_or(0) as usize % live.len()];
                step += 1;
                let t = next[w];
                let acts = if !pulled[w] {
                    pulled[w] = true;
                    g.pull(t - 1, r(0, 100), (w, t, false)).map(|p| vec![Action::Answer(p)]).unwrap_or_default()
                } else {
                    pulled[w] = false;
                    next[w] += 1;
                    g.push(w, t, r(0, 100), true, (w, t, true))
                };
                for a in acts {
                    match a {
                        Action::Apply(p) => applied.push((p.1, p.0)),
                        Action::Answer(p) => {
                            // Every worker has applied clock t - 1 when a pull at t is answered.
                            let done_before = applied.iter().filter(|(t, _)| *t + 1 == p.1).count();
                            prop_assert!(p.1 == 1 || done_before == workers);
                            answered.push(p);
                        }
                    }
                }
            }
            let mut want: Vec<(u64, usize)> = (1..=clocks).flat_map(|t| (0..workers).map(move |w| (t, w))).collect();
            want.sort();
            prop_assert_eq!(applied, want);
            prop_assert_eq!(answered.len(), workers * clocks as usize);
            prop_assert_eq!(g.held_pulls(), 0);
        }
    }
}
