//! Range vector clocks and the server-side clock gate.
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
//! pull until every live worker has reached that clock on the pulled ranges, and, for
//! *ordered* (sequential) pushes, applies them on every key range in (clock, worker rank)
//! order, after the pulls of their clock: the applied sequence of every key is then the
//! same in every run, so sequential runs give bitwise-identical models, also when a
//! server fails mid-run and another takes over its ranges: a resent piece of a push
//! moves no clock (`server/admit.rs`), the worker's next sequential request does. The
//! new head starts with its own clocks for the ranges, not the failed head's; with
//! several faults in a row gates can then wait on each other (an open finding of the
//! simulation: liveness, not order).
//!
//! Both are plain state machines: no sockets, no threads, no time. The caller carries out
//! the [`Action`]s they return, in order.

use std::collections::VecDeque;

use crate::base::keys::KeyRange;

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

    /// Node `node` has reached clock `t` on every range of `ranges` (each clipped to the
    /// clock's range): its clock rises to `t` where it is behind and stays where it is
    /// ahead (an older clock is a late message and moves nothing back).
    pub fn raise(&mut self, ranges: &[KeyRange], node: usize, t: u64) {
        assert!(node < self.nodes(), "unknown node {node}");
        let whole = self.range;
        let mut clipped: Vec<KeyRange> = ranges
            .iter()
            .filter_map(|r| r.intersect(&whole))
            .filter(|r| !r.is_empty())
            .collect();
        if clipped.is_empty() {
            return;
        }
        clipped.sort_by_key(|r| r.begin);
        for r in &clipped {
            self.split_at(r.begin);
            self.split_at(r.end);
        }
        // Both lists are sorted: walk them together.
        let mut i = 0;
        for (seg, clocks) in self.segments.iter_mut() {
            while i < clipped.len() && clipped[i].end <= seg.begin {
                i += 1;
            }
            if clipped[i..]
                .iter()
                .take_while(|r| r.begin < seg.end)
                .any(|r| r.covers(seg))
                && clocks[node] < t
            {
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

    /// Node `node` enters (or comes back) at clock `clock`: from now on it holds back
    /// [`min`](Self::min) like every live node.
    ///
    /// - A new node (`node >= nodes()`): the clock grows to `node + 1` nodes. Slots
    ///   between the old count and `node` that nobody asked for are added *retired*
    ///   (they hold nobody back, until an `add_node` of their own) with clock 0; `node`
    ///   gets `clock` on every segment, live.
    /// - A retired node is revived (live again) and a live one stays live; either way its
    ///   clock rises to `clock` where it is behind and stays where it is ahead (a clock
    ///   never goes back, so a node revived below a clock it reached keeps that clock
    ///   there).
    ///
    /// Other nodes' clocks do not move; segments stay merged.
    pub fn add_node(&mut self, node: usize, clock: u64) {
        if node >= self.nodes() {
            self.retired.resize(node + 1, true);
            for (_, clocks) in &mut self.segments {
                clocks.resize(node + 1, 0);
                clocks[node] = clock;
            }
        } else {
            for (_, clocks) in &mut self.segments {
                clocks[node] = clocks[node].max(clock);
            }
        }
        self.retired[node] = false;
        self.merge();
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
    /// The ranges it writes: where its place in the order matters.
    write: Vec<KeyRange>,
    /// The ranges on which it moves its worker's clock to `t` once applied.
    scope: Vec<KeyRange>,
    p: P,
}

/// A held pull.
#[derive(Debug)]
struct HeldPull<P> {
    min_clock: u64,
    ranges: Vec<KeyRange>,
    p: P,
}

/// The server side of the consistency models: holds pulls until the workers' clocks allow
/// them, and orders sequential pushes. `P` is whatever the caller needs to carry out an
/// action later (the request's bytes and connection).
///
/// Clocks are kept per key range, and every request says which ranges it concerns:
/// - a push *writes* some ranges (those holding its keys) and has a *scope*: the ranges on
///   which, once applied, it moves its worker's clock. A worker's first message of a
///   clock to a server carries all its keys for that server, so its scope is every range
///   the server heads; a resent piece (after a failover or a refusal) carries only some,
///   so its scope is what it writes;
/// - an ordered push of clock `t` from worker `w` applies when, on every range it
///   writes, every live worker ranked below `w` is at `t` and every one above at `t - 1`
///   and done with its pull of clock `t` (it sent a push of clock `t`, which follows
///   that pull): so on every range, pushes apply in (clock, rank) order, and the pulls
///   of clock `t` see every push of `t - 1` and none of `t`, whatever the order
///   requests arrive in and whichever server heads the range when they do. A worker's
///   ordered pushes apply in the order they arrived;
/// - a pull with oldest clock `m` is answered when every live worker is at `m` or later on
///   the ranges it reads;
/// - [`completed`](Self::completed): a sequential request says that every earlier task
///   of its worker finished, so every push of an older clock is acknowledged, hence
///   held by whichever server heads its keys now or later: the worker's clock rises on
///   every range. This is what moves clocks on ranges a server took over.
///
/// Workers are slots `0..workers()`, ranked by index. The gate starts with
/// [`new`](Self::new)'s workers, all at clock 0. A worker that joins a running job enters
/// with [`add_worker`](Self::add_worker) at the clock the scheduler chose for it: an epoch
/// boundary `C`, where every live worker has reached `C` and none has sent a request of
/// clock `C + 1` yet. It is then at `C` on every range and done with every pull up to
/// `C`: pulls that need clock `C` or older never wait for it, pulls that need `C + 1` or
/// later do, and its ordered pushes of `C + 1`, `C + 2`, ... take their (clock, rank)
/// place among the others' (its rank is its slot). A slot that
/// [`retire`](Self::retire)d may enter again the same way (a replaced worker keeps its
/// slot).
#[derive(Debug)]
pub struct ClockGate<P> {
    clock: RangeVectorClock,
    /// Ordered pushes waiting for their turn, per worker, in arrival order.
    pushes: Vec<VecDeque<HeldPush<P>>>,
    /// Pulls waiting for the workers' clocks.
    pulls: Vec<HeldPull<P>>,
    /// Per worker, the newest clock whose pull it is known to be done with: it sent a
    /// sequential push of that clock (after the pull) or said its pushes up to it are
    /// acknowledged.
    passed: Vec<u64>,
}

impl<P> ClockGate<P> {
    /// A gate over `range` for `workers` workers, all at clock 0 (more may enter later:
    /// [`add_worker`](Self::add_worker)).
    pub fn new(range: KeyRange, workers: usize) -> Self {
        ClockGate {
            clock: RangeVectorClock::new(range, workers),
            pushes: (0..workers).map(|_| VecDeque::new()).collect(),
            pulls: Vec::new(),
            passed: vec![0; workers],
        }
    }

    /// The workers' clocks.
    pub fn clock(&self) -> &RangeVectorClock {
        &self.clock
    }

    /// Number of worker slots (live or retired): indices `0..workers()` are workers of the
    /// gate. Methods given a larger index ignore it ([`push`](Self::push) panics).
    pub fn workers(&self) -> usize {
        self.pushes.len()
    }

    /// `worker` enters the gate at clock `clock` (an epoch boundary, see the type's
    /// docs): from now on it holds back the pulls that need a later clock than `clock`
    /// and the ordered pushes that must follow its pull of `clock + 1` or later, like
    /// every live worker. Returns the actions the change allows (normally none).
    ///
    /// - A new slot (`worker >= workers()`) grows the gate; slots between the old count
    ///   and `worker` are added retired (they hold nobody back, and may enter later).
    ///   The worker is at `clock` on every range and done with every pull up to `clock`.
    /// - A retired slot comes back as a new worker: its clock rises to `clock` where it
    ///   is behind (never back: where it had reached more, its new pushes up to that
    ///   clock count as late there and pulls there do not wait for them, so enter it no
    ///   older than the clock it left at), and it is done with the pulls up to `clock`
    ///   only. Its pushes held from before it retired stay held, as its pushes of their
    ///   clocks in their arrival order ahead of its new ones: those of `clock` or older
    ///   apply now (late), newer ones apply in their turn and only once the worker is
    ///   done with its new pull of their clock (they are applied *as well as* the new
    ///   worker's pushes of the same clock: [`evict`](Self::evict) them first if the new
    ///   worker sends its own).
    /// - A live slot stays as it is, its clock raised to `clock` where it is behind.
    ///
    /// Never moves another worker's clock.
    pub fn add_worker(&mut self, worker: usize, clock: u64) -> Vec<Action<P>> {
        let live = worker < self.pushes.len() && !self.clock.is_retired(worker);
        self.clock.add_node(worker, clock);
        if worker >= self.pushes.len() {
            self.pushes.resize_with(worker + 1, VecDeque::new);
            self.passed.resize(worker + 1, 0);
        }
        self.passed[worker] = if live {
            self.passed[worker].max(clock)
        } else {
            // A new worker: what it left pulled before it retired says nothing of it.
            clock
        };
        let mut out = Vec::new();
        self.drain_pushes(&mut out);
        self.release_pulls(&mut out);
        out
    }

    /// The smallest live worker clock on `ranges` (the largest clock anybody reached,
    /// when no range is given or no worker is live).
    pub fn min(&self, ranges: &[KeyRange]) -> u64 {
        ranges
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| self.clock.min(*r))
            .min()
            .unwrap_or_else(|| self.clock.min(self.clock.range()))
    }

    /// A push of clock `t` from `worker` that writes the ranges `write` and, once applied,
    /// moves the worker's clock to `t` on `scope`. Unordered (or unclocked, `t == 0`)
    /// pushes apply at once; ordered ones wait for their turn (see the type's docs).
    /// Returns the actions to carry out, in order: applies first, then the pulls they
    /// release.
    ///
    /// # Panics
    /// When `worker` is not a worker of the gate (callers check the sender first).
    pub fn push(
        &mut self,
        worker: usize,
        t: u64,
        write: Vec<KeyRange>,
        scope: Vec<KeyRange>,
        ordered: bool,
        p: P,
    ) -> Vec<Action<P>> {
        assert!(worker < self.pushes.len(), "unknown worker {worker}");
        let mut out = Vec::new();
        if t == 0 || !ordered || self.clock.is_retired(worker) {
            out.push(Action::Apply(p));
            self.clock.raise(&scope, worker, t);
        } else {
            self.passed[worker] = self.passed[worker].max(t);
            self.pushes[worker].push_back(HeldPush { t, write, scope, p });
            self.drain_pushes(&mut out);
        }
        self.release_pulls(&mut out);
        out
    }

    /// A pull that may reflect no clock older than `min_clock` on `ranges`: `Some` when
    /// it may be answered now, else the gate holds it and returns it from a later push,
    /// [`completed`](Self::completed) or [`retire`](Self::retire).
    pub fn pull(&mut self, min_clock: u64, ranges: Vec<KeyRange>, p: P) -> Option<P> {
        if min_clock == 0 || self.min(&ranges) >= min_clock {
            Some(p)
        } else {
            self.pulls.push(HeldPull {
                min_clock,
                ranges,
                p,
            });
            None
        }
    }

    /// Every push of `worker` with a clock up to `t` is acknowledged (its sequential
    /// request said so): its clock rises to `t` on every range.
    pub fn completed(&mut self, worker: usize, t: u64) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if worker >= self.pushes.len() || t == 0 {
            return out;
        }
        let all = [self.clock.range()];
        self.clock.raise(&all, worker, t);
        self.passed[worker] = self.passed[worker].max(t);
        self.drain_pushes(&mut out);
        self.release_pulls(&mut out);
        out
    }

    /// Every key of `worker`'s push of clock `t` in `scope` is held here (its worker said
    /// so; a sequential push follows its pull of `t`): its clock rises to `t` on `scope`.
    pub fn reached(&mut self, worker: usize, t: u64, scope: &[KeyRange]) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if worker >= self.pushes.len() || t == 0 {
            return out;
        }
        self.clock.raise(scope, worker, t);
        self.passed[worker] = self.passed[worker].max(t);
        self.drain_pushes(&mut out);
        self.release_pulls(&mut out);
        out
    }

    /// `worker` left (its connection closed): it no longer holds anybody back. Its pushes
    /// that arrived still apply, in their turn.
    pub fn retire(&mut self, worker: usize) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if worker >= self.pushes.len() {
            return out;
        }
        self.clock.retire(worker);
        self.drain_pushes(&mut out);
        self.release_pulls(&mut out);
        out
    }

    /// Take out every held request `stale` picks (requests routed with a table the
    /// server no longer has): they are not applied and move no clock. Returns them, and
    /// the actions their removal allows.
    pub fn evict(&mut self, stale: impl Fn(&P) -> bool) -> (Vec<P>, Vec<Action<P>>) {
        let mut gone = Vec::new();
        for q in &mut self.pushes {
            let (keep, out): (VecDeque<_>, VecDeque<_>) = q.drain(..).partition(|h| !stale(&h.p));
            *q = keep;
            gone.extend(out.into_iter().map(|h| h.p));
        }
        let (keep, out): (Vec<_>, Vec<_>) = self.pulls.drain(..).partition(|h| !stale(&h.p));
        self.pulls = keep;
        gone.extend(out.into_iter().map(|h| h.p));
        let mut actions = Vec::new();
        self.drain_pushes(&mut actions);
        self.release_pulls(&mut actions);
        (gone, actions)
    }

    /// Pulls held now.
    pub fn held_pulls(&self) -> usize {
        self.pulls.len()
    }

    /// Ordered pushes held now.
    pub fn held_pushes(&self) -> usize {
        self.pushes.iter().map(VecDeque::len).sum()
    }

    /// Whether `worker`'s held push `h` may apply now.
    fn turn(&self, worker: usize, h: &HeldPush<P>) -> bool {
        let write = h.write.iter().filter(|r| !r.is_empty());
        let clock_on = |v: usize| {
            write
                .clone()
                .map(|r| self.clock.clock_of(*r, v))
                .min()
                .unwrap_or(u64::MAX)
        };
        if clock_on(worker) >= h.t {
            // Late (its clock passed here already): nothing to order it against.
            return true;
        }
        if self.passed[worker] < h.t {
            // Its own worker's pull of this clock may still come: only for a push held
            // from before its worker retired and entered again below its clock (a push
            // that arrives says its worker is done with that pull).
            return false;
        }
        // Workers ranked below: their push of this clock applied here. Ranked above: their
        // push of the previous clock applied here, and their pull of this clock done (it
        // must not see this push).
        (0..self.pushes.len())
            .filter(|&v| v != worker && !self.clock.is_retired(v))
            .all(|v| {
                if v < worker {
                    clock_on(v) >= h.t
                } else {
                    clock_on(v) >= h.t - 1 && self.passed[v] >= h.t
                }
            })
    }

    /// Apply every held push whose turn came, until none does.
    fn drain_pushes(&mut self, out: &mut Vec<Action<P>>) {
        loop {
            let mut progress = false;
            for w in 0..self.pushes.len() {
                while self.pushes[w].front().is_some_and(|h| self.turn(w, h)) {
                    let h = self.pushes[w].pop_front().expect("front checked above");
                    self.clock.raise(&h.scope, w, h.t);
                    out.push(Action::Apply(h.p));
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn release_pulls(&mut self, out: &mut Vec<Action<P>>) {
        if self.pulls.is_empty() {
            return;
        }
        let pulls = std::mem::take(&mut self.pulls);
        for h in pulls {
            if self.min(&h.ranges) >= h.min_clock {
                out.push(Action::Answer(h.p));
            } else {
                self.pulls.push(h);
            }
        }
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

    /// One range as a list, as the gate takes them.
    fn v(b: u64, e: u64) -> Vec<KeyRange> {
        vec![r(b, e)]
    }

    #[test]
    fn ordered_pushes_apply_in_clock_then_rank_order() {
        let mut g = ClockGate::new(r(0, 10), 3);
        assert!(g.push(2, 1, v(0, 10), v(0, 10), true, "w2t1").is_empty());
        // Worker 0 goes first at clock 1, but not before worker 1 is done with its pull
        // of clock 1 (it has not pushed yet).
        assert!(g.push(0, 1, v(0, 10), v(0, 10), true, "w0t1").is_empty());
        assert!(g.push(0, 2, v(0, 10), v(0, 10), true, "w0t2").is_empty());
        assert_eq!(g.pull(1, v(0, 10), "pull"), None);
        let a = g.push(1, 1, v(0, 10), v(0, 10), true, "w1t1");
        assert_eq!(
            a,
            vec![
                Action::Apply("w0t1"),
                Action::Apply("w1t1"),
                Action::Apply("w2t1"),
                Action::Answer("pull"),
            ]
        );
        assert_eq!(
            g.held_pushes(),
            1,
            "worker 0 at clock 2 waits for the others' pulls"
        );
        // Worker 1 says it is done with clock 2 (a sequential pull of clock 3 would):
        // worker 0 at clock 2 still waits for worker 2.
        assert!(g.completed(1, 2).is_empty());
        // Worker 2 leaves: worker 0's push of clock 2 goes through.
        assert_eq!(g.retire(2), vec![Action::Apply("w0t2")]);
    }

    /// A resent piece (empty scope) moves no clock; `reached` on a range moves it there
    /// only, releasing what waited for it there.
    #[test]
    fn a_resent_piece_moves_no_clock_until_its_range_is_reached() {
        let mut g = ClockGate::new(r(0, 20), 2);
        // Worker 0's resent piece of clock 1 writes [0, 10) and moves nothing.
        assert_eq!(
            g.push(0, 1, v(0, 10), Vec::new(), true, "w0 piece"),
            Vec::new(),
            "worker 1 has not pushed clock 1: its pull may still come"
        );
        assert_eq!(
            g.push(1, 1, v(0, 10), v(0, 20), true, "w1"),
            vec![Action::Apply("w0 piece")]
        );
        // Worker 1's push waits: worker 0's clock on [0, 10) is still 0.
        assert_eq!(g.held_pushes(), 1);
        assert_eq!(g.pull(1, v(0, 10), "pull low"), None);
        // Worker 0's keys here are all in on [10, 20) only: nothing is released.
        assert!(g.reached(0, 1, &v(10, 20)).is_empty());
        assert_eq!(
            g.reached(0, 1, &v(0, 10)),
            vec![Action::Apply("w1"), Action::Answer("pull low")]
        );
        assert_eq!(g.clock().min(r(0, 20)), 1);
    }

    #[test]
    fn ordering_is_per_range() {
        let mut g = ClockGate::new(r(0, 20), 2);
        // Worker 1 writes only [10, 20): worker 0's clock on [0, 10) does not matter.
        assert!(g.push(0, 1, v(0, 10), v(0, 10), true, "w0 low").is_empty());
        assert_eq!(
            g.push(1, 1, v(10, 20), v(10, 20), true, "w1 high"),
            vec![Action::Apply("w0 low")],
            "worker 1 pushed: its pull of clock 1 is done"
        );
        assert_eq!(
            g.push(0, 1, v(10, 20), v(10, 20), true, "w0 high"),
            vec![Action::Apply("w0 high"), Action::Apply("w1 high")]
        );
        // A clock-only push (writes nothing) applies at once and moves its scope.
        assert_eq!(
            g.push(1, 2, vec![], v(0, 20), true, "w1 clock"),
            vec![Action::Apply("w1 clock")]
        );
        assert_eq!(g.clock().clock_of(r(0, 20), 1), 2);
        assert_eq!(g.clock().clock_of(r(0, 10), 0), 1);
    }

    /// The failover case: ranges a server took over have no clocks yet; resent pieces
    /// apply in rank order there and pulls wait for them, until the workers say (by a
    /// sequential request) that their older pushes are acknowledged.
    #[test]
    fn inherited_ranges_wait_for_resent_pieces() {
        let own = r(0, 10);
        let inherited = r(10, 20);
        let mut g = ClockGate::new(r(0, 20), 2);
        let mut applied = 0;
        for t in 1..=3 {
            for w in 0..2 {
                applied += g.push(w, t, vec![own], vec![own], true, "own").len();
            }
        }
        assert_eq!((applied, g.held_pushes()), (6, 0));
        // Both workers' pushes of clock 3 on the inherited range were in flight to the
        // failed head: worker 1's resent piece comes first and waits for worker 0's.
        assert!(g.completed(1, 2).is_empty());
        assert!(g
            .push(1, 3, vec![inherited], vec![inherited], true, "w1 resent")
            .is_empty());
        // Worker 1 cannot have pulled clock 4, but worker 0 may not either.
        assert_eq!(g.pull(3, vec![inherited], "pull 4"), None);
        assert!(g.completed(0, 2).is_empty());
        assert_eq!(
            g.push(0, 3, vec![inherited], vec![inherited], true, "w0 resent"),
            vec![
                Action::Apply("w0 resent"),
                Action::Apply("w1 resent"),
                Action::Answer("pull 4")
            ]
        );
        // A worker whose clock-3 push had no keys there: its next sequential request
        // says so, and releases what waited for it.
        let mut g = ClockGate::new(r(0, 20), 2);
        g.completed(0, 2);
        g.completed(1, 2);
        assert!(g
            .push(1, 3, vec![inherited], vec![inherited], true, "w1 resent")
            .is_empty());
        assert_eq!(g.completed(0, 3), vec![Action::Apply("w1 resent")]);
    }

    #[test]
    fn evicted_requests_move_no_clock() {
        let mut g = ClockGate::new(r(0, 10), 2);
        assert!(g.push(1, 1, v(0, 10), v(0, 10), true, ("w1", 7)).is_empty());
        assert_eq!(g.pull(1, v(0, 10), ("pull", 7)), None);
        assert!(g
            .push(1, 2, v(0, 10), v(0, 10), true, ("w1 next", 8))
            .is_empty());
        let (gone, actions) = g.evict(|p| p.1 == 7);
        assert_eq!(gone, vec![("w1", 7), ("pull", 7)]);
        assert!(actions.is_empty());
        assert_eq!(g.clock().clock_of(r(0, 10), 1), 0);
        assert_eq!(g.held_pushes(), 1);
        assert_eq!(g.held_pulls(), 0);
    }

    #[test]
    fn unordered_pushes_apply_at_once_and_release_pulls() {
        let mut g = ClockGate::new(r(0, 10), 2);
        assert_eq!(g.pull(0, v(0, 10), "p0"), Some("p0"));
        assert_eq!(g.pull(2, v(0, 10), "p2"), None);
        assert_eq!(
            g.push(0, 2, v(0, 10), v(0, 10), false, "a"),
            vec![Action::Apply("a")]
        );
        assert_eq!(
            g.push(1, 3, v(0, 10), v(0, 10), false, "b"),
            vec![Action::Apply("b"), Action::Answer("p2")]
        );
        // A late push with an older clock applies but moves no clock back.
        assert_eq!(
            g.push(1, 1, v(0, 10), v(0, 10), false, "c"),
            vec![Action::Apply("c")]
        );
        assert_eq!(g.clock().clock_of(r(0, 10), 1), 3);
        assert_eq!(g.held_pulls(), 0);
    }

    #[test]
    fn add_node_grows_revives_and_never_moves_back() {
        let mut c = RangeVectorClock::new(r(0, 100), 2);
        c.advance(r(0, 50), 0, 3);
        c.advance(r(0, 100), 1, 2);
        // Node 4 enters at 2: nodes 2 and 3 are added retired, at 0.
        c.add_node(4, 2);
        assert_eq!(c.nodes(), 5);
        assert!(c.is_retired(2) && c.is_retired(3) && !c.is_retired(4));
        assert_eq!(c.clock_of(r(0, 100), 2), 0);
        assert_eq!(c.clock_of(r(0, 100), 4), 2);
        assert_eq!(c.segments().len(), 2, "{:?}", c.segments());
        assert_eq!(c.min(r(0, 100)), 0, "node 0 is at 0 on [50, 100)");
        assert_eq!(c.min(r(0, 50)), 2);
        // A slot added retired enters later.
        c.add_node(3, 1);
        assert!(!c.is_retired(3));
        assert_eq!(c.min(r(0, 50)), 1);
        // A live node rises only where it is behind.
        c.add_node(0, 2);
        assert_eq!(c.clock_of(r(0, 50), 0), 3);
        assert_eq!(c.clock_of(r(50, 100), 0), 2);
        assert_eq!(c.clock_of(r(0, 100), 1), 2);
        // A retired node comes back, never below a clock it reached.
        c.retire(0);
        assert_eq!(c.min(r(0, 50)), 1);
        c.add_node(0, 1);
        assert!(!c.is_retired(0));
        assert_eq!(c.clock_of(r(0, 50), 0), 3);
        assert_eq!(c.clock_of(r(50, 100), 0), 2);
        c.add_node(3, 2);
        assert_eq!(c.min(r(0, 100)), 2);
        // Segments stay merged.
        for w in c.segments().windows(2) {
            assert_ne!(w[0].1, w[1].1);
        }
        assert_eq!(c.segments().len(), 2);
        // An empty range: nodes can still enter.
        let mut e = RangeVectorClock::new(r(5, 5), 1);
        e.add_node(2, 4);
        e.add_node(0, 1);
        assert_eq!((e.nodes(), e.is_retired(1)), (3, true));
        assert_eq!(e.segments(), &[(r(5, 5), vec![1, 0, 4])]);
    }

    /// A worker entering at clock 2: pulls that need clock 2 do not wait for it, those
    /// that need 3 do, and its push of 3 takes its rank's place.
    #[test]
    fn a_joined_worker_counts_from_its_entry_clock() {
        let mut g = ClockGate::new(r(0, 10), 2);
        assert!(g.completed(0, 2).is_empty());
        assert!(g.completed(1, 2).is_empty());
        assert!(g.add_worker(2, 2).is_empty());
        assert_eq!(g.workers(), 3);
        assert_eq!(g.clock().clock_of(r(0, 10), 2), 2);
        assert_eq!(g.pull(2, v(0, 10), "pull 3"), Some("pull 3"));
        assert_eq!(g.pull(3, v(0, 10), "pull 4"), None);
        assert!(g.push(0, 3, v(0, 10), v(0, 10), true, "w0").is_empty());
        assert!(
            g.push(1, 3, v(0, 10), v(0, 10), true, "w1").is_empty(),
            "the joined worker's pull of clock 3 may still come"
        );
        assert_eq!(
            g.push(2, 3, v(0, 10), v(0, 10), true, "w2"),
            vec![
                Action::Apply("w0"),
                Action::Apply("w1"),
                Action::Apply("w2"),
                Action::Answer("pull 4")
            ]
        );
        // A worker entering with a gap: the slot between holds nobody back.
        assert!(g.add_worker(4, 3).is_empty());
        assert_eq!(g.workers(), 5);
        assert!(g.clock().is_retired(3));
        assert_eq!(g.pull(3, v(0, 10), "pull 4 again"), Some("pull 4 again"));
        // Slots beyond the gate are ignored, as before.
        assert!(g.completed(7, 3).is_empty());
        assert!(g.reached(7, 3, &v(0, 10)).is_empty());
        assert!(g.retire(7).is_empty());
        assert_eq!(g.workers(), 5);
    }

    /// A replaced worker keeps its slot (rank 0 here): the others' pushes of the next
    /// clock wait for the new one's.
    #[test]
    fn a_retired_slot_enters_again() {
        let mut g = ClockGate::new(r(0, 10), 3);
        for w in 0..3 {
            g.completed(w, 1);
        }
        assert!(g.retire(0).is_empty());
        assert!(g.add_worker(0, 1).is_empty());
        assert!(!g.clock().is_retired(0));
        assert_eq!(g.pull(2, v(0, 10), "pull 3"), None);
        assert!(g.push(1, 2, v(0, 10), v(0, 10), true, "w1").is_empty());
        assert!(g.push(2, 2, v(0, 10), v(0, 10), true, "w2").is_empty());
        assert_eq!(
            g.push(0, 2, v(0, 10), v(0, 10), true, "w0"),
            vec![
                Action::Apply("w0"),
                Action::Apply("w1"),
                Action::Apply("w2"),
                Action::Answer("pull 3")
            ]
        );
    }

    /// A push its worker left held when it retired waits, once the slot entered again,
    /// for the new worker's pull of its clock, and applies (before the new worker's push
    /// of that clock) in its turn.
    #[test]
    fn a_push_held_across_retirement_waits_for_the_new_pull() {
        let mut g = ClockGate::new(r(0, 10), 2);
        g.completed(0, 1);
        g.completed(1, 1);
        assert!(g.push(0, 2, v(0, 10), v(0, 10), true, "old w0").is_empty());
        assert!(g.retire(0).is_empty(), "worker 1 may still pull clock 2");
        assert!(g.add_worker(0, 1).is_empty());
        assert!(
            g.push(1, 2, v(0, 10), v(0, 10), true, "w1").is_empty(),
            "the new worker 0 may still pull clock 2"
        );
        assert!(g.completed(0, 1).is_empty());
        assert_eq!(g.pull(1, v(0, 10), "new w0 pull"), Some("new w0 pull"));
        assert_eq!(
            g.push(0, 2, v(0, 10), v(0, 10), true, "new w0"),
            vec![
                Action::Apply("old w0"),
                Action::Apply("new w0"),
                Action::Apply("w1")
            ]
        );
        // Held pushes of the entry clock or older apply when the slot enters.
        let mut g = ClockGate::new(r(0, 10), 2);
        assert!(g.push(0, 1, v(0, 10), v(0, 10), true, "old w0").is_empty());
        g.retire(0);
        assert_eq!(g.add_worker(0, 1), vec![Action::Apply("old w0")]);
    }

    #[test]
    #[should_panic(expected = "unknown worker")]
    fn a_push_beyond_the_slots_panics() {
        let mut g = ClockGate::new(r(0, 10), 2);
        g.add_worker(3, 0);
        g.push(4, 1, v(0, 10), v(0, 10), true, "w4");
    }

    #[test]
    fn raise_moves_only_clocks_behind() {
        let mut c = RangeVectorClock::new(r(0, 100), 2);
        c.raise(&[r(10, 20), r(50, 60)], 0, 3);
        c.raise(&[r(0, 100)], 0, 2);
        assert_eq!(c.clock_of(r(10, 20), 0), 3);
        assert_eq!(c.clock_of(r(50, 60), 0), 3);
        assert_eq!(c.clock_of(r(20, 50), 0), 2);
        c.raise(&[r(15, 55), r(0, 5)], 0, 4);
        assert_eq!(c.clock_of(r(15, 55), 0), 4);
        assert_eq!(c.clock_of(r(10, 15), 0), 3);
        assert_eq!(c.clock_of(r(5, 10), 0), 2);
        assert_eq!(c.clock_of(r(0, 100), 1), 0);
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

        /// The failover model: a server heads `own` ranges and takes over the others at
        /// some point. Workers are sequential (a pull of clock t+1 after their push of t
        /// is acknowledged; every request says its older pushes are done). Pushes of
        /// clocks before a worker's failover clock on taken-over ranges went to the old
        /// head (the server holds them through replication: invisible here); the push at
        /// the failover clock comes as a resent piece (scope: what it writes); later ones
        /// as whole first messages. Whatever the interleaving, on every range the visible
        /// pushes apply in (clock, rank) order, every pull sees every visible push of an
        /// older clock on its ranges and none of its own clock or newer, and nothing waits
        /// forever.
        #[test]
        fn per_range_order_survives_a_failover(
            workers in 1usize..4,
            clocks in 1u64..6,
            own in 1usize..4,
            fail in proptest::collection::vec((0u64..6, any::<bool>()), 4),
            writes in proptest::collection::vec(0u8..64, 4 * 6),
            reads in proptest::collection::vec(1u8..64, 4 * 6),
            shuffle in proptest::collection::vec(any::<u32>(), 0..200),
        ) {
            const RANGES: usize = 6;
            let unit = |i: usize| r(i as u64 * 10, i as u64 * 10 + 10);
            let own_set: Vec<usize> = (0..own).collect();
            let mask_ranges = |m: u8, pick: &dyn Fn(usize) -> bool| -> Vec<KeyRange> {
                (0..RANGES).filter(|&i| m & (1 << i) != 0 && pick(i)).map(unit).collect()
            };
            let is_own = |i: usize| own_set.contains(&i);
            let all = |_: usize| true;
            // Each worker's failover clock (the push resent), and whether its own-range
            // piece at that clock was also refused and resent.
            let fails: Vec<(u64, bool)> = fail.iter().map(|&(f, b)| (f.min(clocks), b)).collect();
            // The messages of each worker, in order: (is pull, clock, write, scope).
            #[derive(Clone)]
            struct Msg { pull: bool, notice: bool, t: u64, write: Vec<KeyRange>, scope: Vec<KeyRange> }
            let mut plan: Vec<Vec<Vec<Msg>>> = Vec::new(); // worker -> step -> pieces
            // Visible pushes per range: (t, worker).
            let mut visible: Vec<Vec<(u64, usize)>> = vec![Vec::new(); RANGES];
            for w in 0..workers {
                let (f, refused) = fails[w];
                let mut steps = Vec::new();
                for t in 1..=clocks {
                    let m = writes[w * 6 + t as usize - 1];
                    if t > 1 {
                        let rd = reads[w * 6 + t as usize - 1];
                        steps.push(vec![Msg { pull: true, notice: false, t: t - 1, write: mask_ranges(rd, &all), scope: vec![] }]);
                    }
                    let own_w = mask_ranges(m, &is_own);
                    let other_w = mask_ranges(m, &|i| !is_own(i));
                    let own_scope: Vec<KeyRange> = own_set.iter().map(|&i| unit(i)).collect();
                    let pieces = if t < f {
                        vec![Msg { pull: false, notice: false, t, write: own_w.clone(), scope: own_scope }]
                    } else if t == f {
                        let first = if refused {
                            Msg { pull: false, notice: false, t, write: own_w.clone(), scope: own_w.clone() }
                        } else {
                            Msg { pull: false, notice: false, t, write: own_w.clone(), scope: own_scope }
                        };
                        vec![first, Msg { pull: false, notice: false, t, write: other_w.clone(), scope: other_w.clone() }]
                    } else {
                        vec![Msg { pull: false, notice: false, t, write: mask_ranges(m, &all), scope: (0..RANGES).map(unit).collect() }]
                    };
                    let resent = t == f;
                    for (i, seen) in visible.iter_mut().enumerate() {
                        if m & (1 << i) != 0 && (is_own(i) || t >= f) {
                            seen.push((t, w));
                        }
                    }
                    steps.push(pieces);
                    if resent {
                        // Once acknowledged, a push resent in part is followed by a
                        // notice of its clock.
                        steps.push(vec![Msg { pull: false, notice: true, t, write: vec![], scope: vec![] }]);
                    }
                }
                plan.push(steps);
            }
            // Tags: (worker, step, piece).
            let mut g: ClockGate<(usize, usize, usize)> = ClockGate::new(r(0, RANGES as u64 * 10), workers);
            let mut step = vec![0usize; workers];
            let mut sent = vec![0usize; workers]; // pieces of the current step sent
            let mut done = vec![0usize; workers]; // pieces of the current step done
            let mut last: Vec<Option<(u64, usize)>> = vec![None; RANGES];
            let mut applied: Vec<Vec<(u64, usize)>> = vec![Vec::new(); RANGES];
            let mut pick = 0usize;
            loop {
                let ready: Vec<usize> = (0..workers)
                    .filter(|&w| step[w] < plan[w].len() && sent[w] < plan[w][step[w]].len())
                    .collect();
                if ready.is_empty() {
                    break;
                }
                let w = ready[shuffle.get(pick).copied().unwrap_or(0) as usize % ready.len()];
                pick += 1;
                let msg = plan[w][step[w]][sent[w]].clone();
                let tag = (w, step[w], sent[w]);
                sent[w] += 1;
                // A sequential request: every older push of its worker is acknowledged.
                let implied = if msg.pull || msg.notice { msg.t } else { msg.t - 1 };
                let mut acts = g.completed(w, implied);
                if msg.notice {
                    step[w] += 1;
                    sent[w] = 0;
                } else if msg.pull {
                    if let Some(p) = g.pull(msg.t, msg.write.clone(), tag) {
                        acts.push(Action::Answer(p));
                    }
                } else {
                    acts.extend(g.push(w, msg.t, msg.write.clone(), msg.scope.clone(), true, tag));
                }
                for a in acts {
                    let (Action::Apply((pw, ps, pp)) | Action::Answer((pw, ps, pp))) = a;
                    let m = &plan[pw][ps][pp];
                    if m.pull {
                        for rg in &m.write {
                            let i = (rg.begin / 10) as usize;
                            for &(t, v) in &visible[i] {
                                prop_assert!(t > m.t || applied[i].contains(&(t, v)),
                                    "pull of {} by {pw} on range {i} before ({t}, {v})", m.t + 1);
                            }
                            for &(t, v) in &applied[i] {
                                prop_assert!(t <= m.t,
                                    "pull of {} by {pw} on range {i} after ({t}, {v})", m.t + 1);
                            }
                        }
                    } else {
                        for rg in &m.write {
                            let i = (rg.begin / 10) as usize;
                            let me = (m.t, pw);
                            prop_assert!(last[i].is_none_or(|l| l < me),
                                "range {i}: {me:?} applied after {:?}", last[i]);
                            last[i] = Some(me);
                            applied[i].push(me);
                        }
                    }
                    done[pw] += 1;
                    if done[pw] == plan[pw][ps].len() {
                        step[pw] += 1;
                        sent[pw] = 0;
                        done[pw] = 0;
                    }
                }
            }
            for w in 0..workers {
                prop_assert_eq!(step[w], plan[w].len(), "worker {} is stuck", w);
            }
            for i in 0..RANGES {
                let mut want = visible[i].clone();
                want.sort();
                prop_assert_eq!(&applied[i], &want, "range {}", i);
            }
        }

        /// Workers join mid-run under every model: `initial` workers, then up to three
        /// events at epoch boundaries (every live worker finished clock `C` and sent
        /// nothing of `C + 1`): a worker enters a new slot (maybe past a gap), a retired
        /// slot, or replaces a live worker in its slot, or a worker leaves. Each worker
        /// runs steps `t = entry + 1 ..= steps`: a pull with the model's oldest clock,
        /// then a push of `t` (requests as `server/admit.rs` makes them; per worker in
        /// order, interleaved at random). Checks: nothing waits forever; a pull answered
        /// saw every push up to its oldest clock from every worker live then (joined ones
        /// included), and, sequential, none of its own clock or newer on its ranges;
        /// sequential pushes apply per range in (clock, rank) order; an entry moves no
        /// other clock, and pulls of the entry clock or older never wait for anybody.
        #[test]
        fn workers_join_at_epoch_boundaries(
            initial in 1usize..4,
            steps in 1u64..6,
            model in 0u8..6,
            mut events in proptest::collection::vec((0u64..6, 0u8..5, any::<u8>()), 0..4),
            seed in any::<u64>(),
            shuffle in proptest::collection::vec(any::<u32>(), 0..400),
        ) {
            use crate::consistency::Consistency;
            const RANGES: u64 = 3;
            let whole = r(0, RANGES * 10);
            let unit = |i: u64| r(i * 10, i * 10 + 10);
            let consistency = match model {
                0 | 1 => Consistency::Sequential,
                2 => Consistency::BoundedDelay(0),
                3 => Consistency::BoundedDelay(1),
                4 => Consistency::BoundedDelay(2),
                _ => Consistency::Eventual,
            };
            let seq = consistency == Consistency::Sequential;
            let mix = |slot: usize, t: u64, salt: u64| {
                let mut x = seed
                    ^ (slot as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ t.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                    ^ salt.wrapping_mul(0x1656_67B1_9E37_79F9);
                x ^= x >> 33;
                x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
                x ^ (x >> 33)
            };
            // What a push writes (maybe nothing: clock only) and a pull reads (something).
            let writes = |slot: usize, t: u64| -> Vec<u64> {
                let m = mix(slot, t, 1) % 8;
                (0..RANGES).filter(|i| m & (1 << i) != 0).collect()
            };
            let reads = |slot: usize, t: u64| -> Vec<u64> {
                let m = mix(slot, t, 2) % 7 + 1;
                (0..RANGES).filter(|i| m & (1 << i) != 0).collect()
            };
            for e in &mut events {
                e.0 = e.0.min(steps);
            }
            events.sort_by_key(|e| e.0);
            let mut events: VecDeque<(u64, u8, u8)> = events.into();

            /// One worker's life in a slot: it entered at `entry`, left at `left`.
            struct Life { slot: usize, entry: u64, left: Option<u64> }
            /// A live worker's progress: the newest step whose pull it sent, whose pull
            /// was answered, whose push it sent; its requests sent, not yet delivered.
            struct Run { entry: u64, pulled: u64, answered: u64, pushed: u64, outbox: VecDeque<(bool, u64)> }
            let run = |entry: u64| Run { entry, pulled: entry, answered: entry, pushed: entry, outbox: VecDeque::new() };

            // Tags: (slot, clock, is pull).
            let mut g: ClockGate<(usize, u64, bool)> = ClockGate::new(whole, initial);
            let mut lives: Vec<Life> = (0..initial).map(|slot| Life { slot, entry: 0, left: None }).collect();
            let mut runs: Vec<Option<Run>> = (0..initial).map(|_| Some(run(0))).collect();
            let mut applied = std::collections::BTreeSet::<(usize, u64)>::new();
            let mut per_range: Vec<Vec<(u64, usize)>> = vec![Vec::new(); RANGES as usize];
            // The newest epoch boundary passed: every live worker reached it.
            let mut floor = 0u64;
            let mut pick = 0usize;
            loop {
                // An event whose boundary came.
                if let Some(&(c, kind, which)) = events.front() {
                    let ready = runs.iter().enumerate().all(|(s, w)| {
                        w.as_ref().is_none_or(|w| {
                            w.outbox.is_empty() && (w.entry >= c || applied.contains(&(s, c)))
                        })
                    });
                    if ready {
                        events.pop_front();
                        prop_assert_eq!((g.held_pulls(), g.held_pushes()), (0, 0));
                        let live: Vec<usize> = (0..runs.len()).filter(|&s| runs[s].is_some()).collect();
                        let retired: Vec<usize> = (0..g.workers()).filter(|&s| g.clock().is_retired(s)).collect();
                        let mut leave = |s: usize, g: &mut ClockGate<(usize, u64, bool)>, runs: &mut Vec<Option<Run>>| {
                            assert!(g.retire(s).is_empty());
                            runs[s] = None;
                            for l in lives.iter_mut().filter(|l| l.slot == s && l.left.is_none()) {
                                l.left = Some(c);
                            }
                        };
                        let join = match kind {
                            0 => Some(g.workers()),
                            1 => Some(g.workers() + 1),
                            2 if !retired.is_empty() => Some(retired[which as usize % retired.len()]),
                            2 => Some(g.workers()),
                            3 => {
                                let s = live[which as usize % live.len()];
                                leave(s, &mut g, &mut runs);
                                Some(s)
                            }
                            _ => {
                                if live.len() > 1 {
                                    leave(live[which as usize % live.len()], &mut g, &mut runs);
                                }
                                None
                            }
                        };
                        if let Some(s) = join {
                            let keys = |g: &ClockGate<(usize, u64, bool)>, v: usize| -> Vec<u64> {
                                (0..whole.end).map(|k| g.clock().clock_of(r(k, k + 1), v)).collect()
                            };
                            let before: Vec<Vec<u64>> = (0..g.workers()).map(|v| keys(&g, v)).collect();
                            prop_assert!(g.add_worker(s, c).is_empty());
                            prop_assert!(g.workers() > s && !g.clock().is_retired(s));
                            for (v, old) in before.iter().enumerate() {
                                let now = keys(&g, v);
                                if v == s {
                                    for (a, b) in old.iter().zip(&now) {
                                        prop_assert!(*b >= c.max(*a), "slot {} entered at {} from {:?} to {:?}", s, c, old, now);
                                    }
                                } else {
                                    prop_assert_eq!(old, &now, "slot {}'s entry moved slot {}", s, v);
                                }
                            }
                            prop_assert!(keys(&g, s).iter().all(|&k| k >= c));
                            prop_assert_eq!(g.pull(c, vec![whole], (usize::MAX, c, true)), Some((usize::MAX, c, true)));
                            if runs.len() <= s {
                                runs.resize_with(s + 1, || None);
                            }
                            runs[s] = Some(run(c));
                            lives.push(Life { slot: s, entry: c, left: None });
                        }
                        floor = c;
                        continue;
                    }
                }
                let barrier = events.front().map_or(u64::MAX, |e| e.0);
                // What may happen next: (slot, deliver) where deliver is false for a send.
                let mut next: Vec<(usize, bool)> = Vec::new();
                for (s, w) in runs.iter().enumerate() {
                    let Some(w) = w else { continue };
                    let t = w.pulled + 1;
                    let may_pull = w.pulled == w.pushed && t <= steps && t <= barrier && if seq {
                        t - 1 == w.entry || applied.contains(&(s, t - 1))
                    } else {
                        let m = consistency.min_clock(t);
                        m <= w.entry || applied.contains(&(s, m))
                    };
                    if may_pull || w.answered > w.pushed {
                        next.push((s, false));
                    }
                    if !w.outbox.is_empty() {
                        next.push((s, true));
                    }
                }
                if next.is_empty() {
                    break;
                }
                let (s, deliver) = next[shuffle.get(pick).copied().unwrap_or(0) as usize % next.len()];
                pick += 1;
                let w = runs[s].as_mut().expect("live");
                if !deliver {
                    if w.answered > w.pushed {
                        w.pushed += 1;
                        w.outbox.push_back((false, w.pushed));
                    } else {
                        w.pulled += 1;
                        w.outbox.push_back((true, w.pulled));
                    }
                    continue;
                }
                let (is_pull, t) = w.outbox.pop_front().expect("checked");
                let mut acts = if seq { g.completed(s, t - 1) } else { Vec::new() };
                if is_pull {
                    let m = consistency.min_clock(t);
                    let ranges: Vec<KeyRange> = reads(s, t).into_iter().map(unit).collect();
                    match g.pull(m, ranges, (s, t, true)) {
                        Some(p) => acts.push(Action::Answer(p)),
                        None => prop_assert!(m > floor, "pull of {} by {} (oldest clock {}) waits past boundary {}", t, s, m, floor),
                    }
                } else {
                    let write: Vec<KeyRange> = writes(s, t).into_iter().map(unit).collect();
                    acts.extend(g.push(s, t, write, vec![whole], seq, (s, t, false)));
                }
                for a in acts {
                    match a {
                        Action::Apply((ps, pt, _)) => {
                            for i in writes(ps, pt) {
                                let me = (pt, ps);
                                let seen = &mut per_range[i as usize];
                                if seq {
                                    prop_assert!(seen.last().is_none_or(|l| *l < me),
                                        "range {}: {:?} applied after {:?}", i, me, seen.last());
                                }
                                seen.push(me);
                            }
                            prop_assert!(applied.insert((ps, pt)), "({}, {}) applied twice", ps, pt);
                        }
                        Action::Answer((ps, pt, _)) => {
                            let m = consistency.min_clock(pt);
                            for l in &lives {
                                let upto = l.left.map_or(m, |left| left.min(m));
                                for c in l.entry + 1..=upto {
                                    prop_assert!(applied.contains(&(l.slot, c)),
                                        "pull of {} by {} (oldest clock {}) before ({}, {})", pt, ps, m, c, l.slot);
                                }
                            }
                            if seq {
                                for i in reads(ps, pt) {
                                    for &(c, v) in &per_range[i as usize] {
                                        prop_assert!(c < pt, "pull of {} by {} on range {} after ({}, {})", pt, ps, i, c, v);
                                    }
                                }
                            }
                            runs[ps].as_mut().expect("live").answered = pt;
                        }
                    }
                }
            }
            prop_assert!(events.is_empty(), "stuck before the boundary {:?}", events.front());
            for (s, w) in runs.iter().enumerate() {
                let Some(w) = w else { continue };
                prop_assert!(w.entry >= steps || applied.contains(&(s, steps)), "worker {} is stuck at {}", s, w.pushed);
            }
            prop_assert_eq!((g.held_pulls(), g.held_pushes()), (0, 0));
            for i in 0..RANGES {
                let mut want: Vec<(u64, usize)> = lives
                    .iter()
                    .flat_map(|l| (l.entry + 1..=l.left.unwrap_or(steps)).map(move |t| (t, l.slot)))
                    .filter(|&(t, v)| writes(v, t).contains(&i))
                    .collect();
                want.sort();
                let mut got = per_range[i as usize].clone();
                if !seq {
                    got.sort();
                }
                prop_assert_eq!(got, want, "range {}", i);
            }
        }
    }
}
