//! Deterministic simulation of a whole cluster (TigerBeetle's VOPR in miniature), over
//! the code that ships: the real [`SchedulerCore`](crate::scheduler::SchedulerCore), and
//! servers and workers built from the shipped decision code (the replication core, the
//! clock gate and its admission, routing refusals and the table switch on the servers;
//! request building, splitting, answer judging, parking and resending and the task gate
//! on the workers), in one thread, over a simulated network whose delays, stalls,
//! crashes and the faults injected all come from one seed. Links keep order per
//! connection and direction (what TCP gives); a crash loses what was in flight by a
//! coin.
//!
//! Faults: server crashes, joins and graceful leaves, a server cut off from the
//! scheduler (its heartbeats stall: a live server is declared dead), servers cut off
//! from each other or from a worker for a while, scheduler crashes (a new one starts
//! with `--recover` and the nodes rejoin), worker crashes and late workers.
//!
//! The checkers (see [`check`]) run after every event. With sequential consistency, a
//! seed with faults is compared with the failure-free run of the same seed: every key
//! must hold the same pushes in the same order.
//!
//! `PSERV_SIM_SEED=n` reruns one seed and prints its event log (`PSERV_SIM_VERBOSE=1`:
//! every message too); `PSERV_SIM_SEEDS=n` sets how many seeds the test runs,
//! `PSERV_SIM_FIRST` the first; a failure prints the line that replays it
//! (`PSERV_SIM_LIST=1`: a line per failed seed).
//!
//! Two fault mixes ([`Mix`]): `sim_seeds` (CI) runs the checked one; the ignored
//! `sim_seeds_all_faults` every fault with every consistency model, which still fails
//! on an open finding (the clock gate's state does not move with a range).
//!
//! Layout: [`world`] (the cluster, the faults, the loop), [`net`] (connections, delays,
//! the event queue), [`server`] and [`worker`] (the processes), [`store`] (push
//! histories as the replicated values), [`check`] (the invariants), [`rng`].
//!
//! Invariant: every choice comes from the seed: one seed, one run.

pub(crate) mod check;
pub(crate) mod net;
pub(crate) mod rng;
pub(crate) mod server;
pub(crate) mod store;
#[cfg(test)]
mod tests;
pub(crate) mod worker;
pub mod world;

pub use world::{Mix, SimConfig, SimFailure, SimReport};

use crate::consistency::Consistency;

/// The command that replays seed `seed` of fault mix `mix`.
pub fn replay_line(seed: u64, mix: Mix) -> String {
    match mix {
        Mix::Checked => format!(
            "PSERV_SIM_SEED={seed} cargo test --release -p pserv-engine --lib sim::tests::sim_seeds -- --nocapture"
        ),
        Mix::All => format!(
            "PSERV_SIM_SEED={seed} cargo test --release -p pserv-engine --lib sim::tests::sim_seeds_all_faults -- --ignored --nocapture"
        ),
    }
}

/// Run seed `seed` (with faults) and check it; with sequential consistency, also run its
/// failure-free twin and compare the models. Returns the report, or what broke with the
/// replay line and the end of the event log.
pub fn run_seed(seed: u64, mix: Mix) -> Result<SimReport, String> {
    let cfg = SimConfig::draw(seed, Some(mix));
    let faulty = world::World::new(seed, cfg.clone())
        .run()
        .map_err(|f| explain(seed, mix, &cfg, &f))?;
    if cfg.model == Consistency::Sequential {
        let clean_cfg = SimConfig {
            faults: Vec::new(),
            ..cfg.clone()
        };
        let clean = world::World::new(seed, clean_cfg.clone())
            .run()
            .map_err(|f| explain(seed, mix, &clean_cfg, &f))?;
        for (k, h) in &clean.finals {
            let got = faulty.finals.get(k).cloned().unwrap_or_default();
            if got != *h {
                for l in &faulty.log {
                    eprintln!("{l}");
                }
                let first = got.iter().zip(h).position(|(a, b)| a != b);
                return Err(format!(
                    "seed {seed}: sequential model differs from the failure-free run on key {k:#x}: {} pushes vs {} (first difference at {first:?}); faults {:?}\n  with faults: {got:x?}\n  without:     {h:x?}\n  replay: {}",
                    got.len(),
                    h.len(),
                    faulty.faults,
                    replay_line(seed, mix)
                ));
            }
        }
    }
    Ok(faulty)
}

fn explain(seed: u64, mix: Mix, cfg: &SimConfig, f: &SimFailure) -> String {
    let mut s = format!(
        "seed {seed}: {}\n  config: {cfg:?}\n  replay: {}",
        f.violations.join("\n  and: "),
        replay_line(seed, mix)
    );
    if std::env::var("PSERV_SIM_SEED").is_ok() {
        s.push_str("\n  last events:\n");
        for l in &f.log {
            s.push_str("    ");
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}
