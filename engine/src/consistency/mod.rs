//! Tasks, their dependencies and the consistency models.
//!
//! Every push, pull and server-side function call a worker issues is a *task* with a
//! timestamp: 1, 2, 3, ... in the order the worker issued them. A task may start (send its
//! messages) only when the [`Gate`] says so:
//!
//! - its **consistency model** allows it: [`Consistency::Sequential`] (tau = 0) waits until
//!   every earlier task has finished; [`Consistency::BoundedDelay`] with a maximal delay
//!   `tau` waits until every task more than `tau` steps older has finished (task `t` needs
//!   tasks `1 ..= t - tau - 1`); [`Consistency::Eventual`] (tau = infinity) waits for
//!   nothing;
//! - and every task it was declared to execute **after** has finished
//!   (execute-after-finished dependencies, the paper's task DAG).
//!
//! The gate is a plain state machine: the caller submits tasks in timestamp order and
//! reports finished tasks; the gate answers which tasks may start now. No threads, no
//! sockets, no clocks, so it is tested exhaustively with property tests below.
//!
//! The same model also tells the servers how stale a pull may be ([`Consistency::min_clock`]):
//! with vector clocks (see [`crate::consistency::clock`]), a pull issued at worker clock `c` is answered
//! once every worker has finished its iteration `c - tau - 1`.

pub mod clock;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Task timestamps, as the worker API hands them out (1, 2, 3, ...; 0 is never a task).
pub type Ts = u64;

/// A consistency model (the paper's section 3.2: sequential, eventual, bounded delay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// tau = 0: a task starts only after every earlier task has finished.
    Sequential,
    /// tau = infinity: tasks start at once and never wait for one another.
    Eventual,
    /// A task starts once every task more than `tau` steps older has finished.
    BoundedDelay(u64),
}

impl Consistency {
    /// The maximal delay: 0 for sequential, `None` (infinity) for eventual.
    pub fn tau(&self) -> Option<u64> {
        match *self {
            Consistency::Sequential => Some(0),
            Consistency::Eventual => None,
            Consistency::BoundedDelay(t) => Some(t),
        }
    }

    /// The newest earlier task that must have finished before task (or clock) `t` may
    /// start: `t - tau - 1`, or 0 (nothing) when that is not positive or for eventual.
    pub fn min_clock(&self, t: u64) -> u64 {
        match self.tau() {
            None => 0,
            Some(tau) => t.saturating_sub(tau.saturating_add(1)),
        }
    }
}

impl Default for Consistency {
    /// Eventual: nothing waits (the fastest; what training jobs usually want).
    fn default() -> Self {
        Consistency::Eventual
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Sequential => f.write_str("sequential"),
            Consistency::Eventual => f.write_str("eventual"),
            Consistency::BoundedDelay(t) => write!(f, "bounded:{t}"),
        }
    }
}

/// Why a consistency model did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown consistency model {0:?}: expected sequential, eventual or bounded:TAU (TAU a whole number, or inf)")]
pub struct ParseConsistencyError(String);

impl FromStr for Consistency {
    type Err = ParseConsistencyError;

    /// `sequential` (or `seq`), `eventual` (or `async`), `bounded:TAU`. `bounded:0` is
    /// sequential and `bounded:inf` eventual.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "sequential" | "seq" => return Ok(Consistency::Sequential),
            "eventual" | "async" => return Ok(Consistency::Eventual),
            _ => {}
        }
        let tau = t
            .strip_prefix("bounded:")
            .or_else(|| t.strip_prefix("bounded-delay:"))
            .ok_or_else(|| ParseConsistencyError(s.to_owned()))?;
        match tau {
            "inf" | "infinity" => Ok(Consistency::Eventual),
            n => match n.parse::<u64>() {
                Ok(0) => Ok(Consistency::Sequential),
                Ok(n) => Ok(Consistency::BoundedDelay(n)),
                Err(_) => Err(ParseConsistencyError(s.to_owned())),
            },
        }
    }
}

/// A task waiting to start.
#[derive(Debug)]
struct Waiting {
    /// Every task up to this one must have finished (0: none).
    prefix: Ts,
    /// Tasks it executes after, not yet known finished.
    deps: Vec<Ts>,
}

/// The worker-side task gate: which submitted tasks may start, given their consistency
/// model, their dependencies and which tasks have finished.
///
/// Invariants (asserted): tasks are submitted in timestamp order without gaps, starting at
/// 1; only started tasks finish; each task finishes once. A task starts when every task
/// up to `model.min_clock(ts)` has finished and so has every task it depends on.
#[derive(Debug, Default)]
pub struct Gate {
    /// The newest submitted task (0: none yet).
    last: Ts,
    /// Every task up to this one has finished.
    prefix: Ts,
    /// Finished tasks above `prefix`.
    done_above: BTreeSet<Ts>,
    /// Submitted tasks that may not start yet, by timestamp.
    waiting: BTreeMap<Ts, Waiting>,
    /// Tasks started and not finished.
    running: BTreeSet<Ts>,
}

impl Gate {
    /// An empty gate; the first task is timestamp 1.
    pub fn new() -> Self {
        Gate::default()
    }

    /// Submit task `ts` (must be the previous submission + 1) with its model and the
    /// earlier tasks it executes after. Returns whether it may start now; if not, a later
    /// [`finish`](Self::finish) returns it when it may.
    ///
    /// # Panics
    /// When `ts` is out of order, or a dependency is not an earlier task (callers check
    /// user input first).
    pub fn submit(&mut self, ts: Ts, model: Consistency, deps: &[Ts]) -> bool {
        assert_eq!(ts, self.last + 1, "tasks are submitted in timestamp order");
        assert!(
            deps.iter().all(|&d| d >= 1 && d < ts),
            "task {ts}: dependencies {deps:?} must be earlier tasks"
        );
        self.last = ts;
        let w = Waiting {
            prefix: model.min_clock(ts),
            deps: deps
                .iter()
                .copied()
                .filter(|&d| !self.is_finished(d))
                .collect(),
        };
        if self.ready(&w) {
            self.running.insert(ts);
            true
        } else {
            self.waiting.insert(ts, w);
            false
        }
    }

    /// Task `ts` (started earlier) has finished. Returns the waiting tasks that may start
    /// now, in timestamp order; they count as started.
    ///
    /// # Panics
    /// When `ts` was not started or finished already.
    pub fn finish(&mut self, ts: Ts) -> Vec<Ts> {
        assert!(
            self.running.remove(&ts),
            "task {ts} finished but it was not running"
        );
        if ts == self.prefix + 1 {
            self.prefix = ts;
            while self.done_above.remove(&(self.prefix + 1)) {
                self.prefix += 1;
            }
        } else {
            self.done_above.insert(ts);
        }
        let mut started = Vec::new();
        let prefix = self.prefix;
        let done_above = &self.done_above;
        for (&t, w) in self.waiting.iter_mut() {
            w.deps
                .retain(|&d| !(d <= prefix || done_above.contains(&d)));
            if w.prefix <= prefix && w.deps.is_empty() {
                started.push(t);
            }
        }
        for t in &started {
            self.waiting.remove(t);
            self.running.insert(*t);
        }
        started
    }

    fn ready(&self, w: &Waiting) -> bool {
        w.prefix <= self.prefix && w.deps.is_empty()
    }

    /// Reserve the next `n` timestamps as tasks that finished without running (a worker
    /// that numbers each clock's tasks from a fixed base skips the rest of a clock's
    /// numbers). Nothing waiting can start from it: a skipped number follows every
    /// submitted task.
    pub fn skip(&mut self, n: Ts) {
        if n == 0 {
            return;
        }
        let first = self.last + 1;
        self.last += n;
        if self.prefix + 1 == first {
            self.prefix = self.last;
            while self.done_above.remove(&(self.prefix + 1)) {
                self.prefix += 1;
            }
        } else {
            self.done_above.extend(first..=self.last);
        }
    }

    /// Whether task `ts` has finished.
    pub fn is_finished(&self, ts: Ts) -> bool {
        ts <= self.prefix || self.done_above.contains(&ts)
    }

    /// Every task up to this one has finished.
    pub fn finished_prefix(&self) -> Ts {
        self.prefix
    }

    /// Tasks submitted but not allowed to start yet.
    pub fn blocked(&self) -> usize {
        self.waiting.len()
    }

    /// Tasks started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    /// The newest submitted task (0: none).
    pub fn last(&self) -> Ts {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_and_display_round_trip() {
        for (s, c) in [
            ("sequential", Consistency::Sequential),
            ("eventual", Consistency::Eventual),
            ("bounded:3", Consistency::BoundedDelay(3)),
            ("bounded:0", Consistency::Sequential),
            ("bounded:inf", Consistency::Eventual),
            ("Bounded:16", Consistency::BoundedDelay(16)),
        ] {
            assert_eq!(s.parse::<Consistency>().unwrap(), c, "{s}");
            assert_eq!(c.to_string().parse::<Consistency>().unwrap(), c);
        }
        for bad in ["", "bounded", "bounded:-1", "bounded:x", "strict"] {
            let e = bad.parse::<Consistency>().unwrap_err();
            assert!(e.to_string().contains("bounded:TAU"), "{e}");
        }
    }

    #[test]
    fn min_clock_is_t_minus_tau_minus_one() {
        assert_eq!(Consistency::Sequential.min_clock(5), 4);
        assert_eq!(Consistency::BoundedDelay(2).min_clock(5), 2);
        assert_eq!(Consistency::BoundedDelay(2).min_clock(3), 0);
        assert_eq!(Consistency::BoundedDelay(u64::MAX).min_clock(9), 0);
        assert_eq!(Consistency::Eventual.min_clock(1000), 0);
    }

    #[test]
    fn sequential_runs_one_at_a_time() {
        let mut g = Gate::new();
        assert!(g.submit(1, Consistency::Sequential, &[]));
        assert!(!g.submit(2, Consistency::Sequential, &[]));
        assert!(!g.submit(3, Consistency::Sequential, &[]));
        assert_eq!(g.finish(1), vec![2]);
        assert_eq!(g.finish(2), vec![3]);
        assert_eq!(g.finish(3), Vec::<Ts>::new());
        assert_eq!(g.finished_prefix(), 3);
    }

    #[test]
    fn dependencies_hold_an_eventual_task() {
        let mut g = Gate::new();
        assert!(g.submit(1, Consistency::Eventual, &[]));
        assert!(g.submit(2, Consistency::Eventual, &[]));
        assert!(!g.submit(3, Consistency::Eventual, &[2]));
        assert!(!g.submit(4, Consistency::Eventual, &[1, 1]));
        assert_eq!(g.blocked(), 2);
        assert_eq!(g.finish(1), vec![4]);
        assert_eq!(g.finish(2), vec![3]);
        assert!(!g.is_finished(3));
    }

    #[test]
    #[should_panic(expected = "timestamp order")]
    fn out_of_order_submit_is_a_bug() {
        let mut g = Gate::new();
        g.submit(2, Consistency::Eventual, &[]);
    }

    /// One generated task: its model and its dependencies (as back offsets).
    #[derive(Debug, Clone)]
    struct Spec {
        model: Consistency,
        deps: Vec<u64>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let model = prop_oneof![
            Just(Consistency::Sequential),
            Just(Consistency::Eventual),
            (1u64..6).prop_map(Consistency::BoundedDelay),
        ];
        (model, proptest::collection::vec(1u64..8, 0..3))
            .prop_map(|(model, deps)| Spec { model, deps })
    }

    /// Drive a gate: submit `specs` in order, finishing running tasks in the order the
    /// `picks` choose (a random completion schedule); check every start against the model.
    /// Returns the start order.
    fn drive(specs: &[Spec], picks: &[usize], interleave: &[bool]) -> Vec<Ts> {
        let mut g = Gate::new();
        let mut running: Vec<Ts> = Vec::new();
        let mut finished: BTreeSet<Ts> = BTreeSet::new();
        let mut order = Vec::new();
        let mut deps_of = BTreeMap::new();
        let mut model_of = BTreeMap::new();
        let check_start = |t: Ts,
                           finished: &BTreeSet<Ts>,
                           deps_of: &BTreeMap<Ts, Vec<Ts>>,
                           model_of: &BTreeMap<Ts, Consistency>| {
            let model: Consistency = model_of[&t];
            // The staleness bound: every task more than tau older has finished.
            for old in 1..=model.min_clock(t) {
                assert!(
                    finished.contains(&old),
                    "task {t} ({model}) started before task {old} finished"
                );
            }
            for d in &deps_of[&t] {
                assert!(finished.contains(d), "task {t} started before its dep {d}");
            }
        };
        let mut next = 1;
        let mut step = 0;
        let n = specs.len() as u64;
        while finished.len() < specs.len() {
            let submit =
                next <= n && (running.is_empty() || interleave.get(step).copied().unwrap_or(true));
            if submit {
                let s = &specs[(next - 1) as usize];
                let deps: Vec<Ts> = s
                    .deps
                    .iter()
                    .filter(|&&b| b < next)
                    .map(|&b| next - b)
                    .collect();
                deps_of.insert(next, deps.clone());
                model_of.insert(next, s.model);
                if g.submit(next, s.model, &deps) {
                    check_start(next, &finished, &deps_of, &model_of);
                    running.push(next);
                    order.push(next);
                }
                next += 1;
            } else {
                // Liveness: when nothing more can be submitted something must be running.
                assert!(
                    !running.is_empty(),
                    "deadlock: nothing running, {} blocked",
                    g.blocked()
                );
                let i = picks.get(step).copied().unwrap_or(0) % running.len();
                let t = running.swap_remove(i);
                finished.insert(t);
                for s in g.finish(t) {
                    check_start(s, &finished, &deps_of, &model_of);
                    running.push(s);
                    order.push(s);
                }
            }
            step += 1;
            assert_eq!(g.in_flight(), running.len());
        }
        assert_eq!(g.finished_prefix(), n);
        assert_eq!(g.blocked(), 0);
        order
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The staleness bound and the dependencies are never violated, and every task
        /// eventually runs, whatever the completion order.
        #[test]
        fn gate_keeps_the_bound_and_stays_live(
            specs in proptest::collection::vec(spec(), 1..60),
            picks in proptest::collection::vec(0usize..64, 0..200),
            interleave in proptest::collection::vec(any::<bool>(), 0..200),
        ) {
            let order = drive(&specs, &picks, &interleave);
            prop_assert_eq!(order.len(), specs.len());
        }

        /// Sequential runs are deterministic: whatever the completion schedule, tasks
        /// start in timestamp order, one at a time.
        #[test]
        fn sequential_is_deterministic(
            n in 1usize..50,
            picks in proptest::collection::vec(0usize..64, 0..200),
            interleave in proptest::collection::vec(any::<bool>(), 0..200),
        ) {
            let specs = vec![Spec { model: Consistency::Sequential, deps: vec![] }; n];
            let order = drive(&specs, &picks, &interleave);
            prop_assert_eq!(order, (1..=n as u64).collect::<Vec<_>>());
        }

        /// Bounded delay with tau keeps at most tau + 1 tasks in flight when tasks are
        /// submitted as fast as possible.
        #[test]
        fn bounded_delay_caps_in_flight(tau in 0u64..6, n in 1u64..40, picks in proptest::collection::vec(0usize..64, 0..100)) {
            let mut g = Gate::new();
            let model = Consistency::BoundedDelay(tau);
            let mut running: Vec<Ts> = Vec::new();
            for (step, t) in (1..=n).enumerate() {
                if g.submit(t, model, &[]) {
                    running.push(t);
                }
                prop_assert!(g.in_flight() as u64 <= tau + 1);
                // Finish something now and then.
                if picks.get(step).is_some_and(|p| p % 3 == 0) && !running.is_empty() {
                    let i = picks[step] % running.len();
                    let done = running.swap_remove(i);
                    running.extend(g.finish(done));
                }
            }
            while let Some(t) = running.pop() {
                running.extend(g.finish(t));
                prop_assert!(g.in_flight() as u64 <= tau + 1);
            }
            prop_assert_eq!(g.finished_prefix(), n);
        }
    }
}
