//! User-registered update rules on servers: a test registers closures in
//! `ServerConfig::rules` and runs `Server`s in-process (the scheduler is a real process),
//! without touching the engine; workers name the rules by the ids registration returned.
//! Also: pushes naming a function the server cannot run get a clear error back and leave
//! the store as it was.

mod common;

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use common::Cluster;
use pserv_engine::keys::KEY_END;
use pserv_engine::proto::Status;
use pserv_engine::server::{Server, ServerConfig, UserRules};
use pserv_engine::update::{from_fn, ID_ADAGRAD, ID_FIRST_USER, ID_FTRL, ID_SUM};
use pserv_engine::worker::{TaskOpts, Worker, WorkerConfig};
use pserv_engine::{EngineError, KeyRange};
use pserv_transport::TcpConfig;

fn tcp() -> TcpConfig {
    TcpConfig {
        threads: 1,
        pin_cores: false,
        ..TcpConfig::default()
    }
}

fn worker(scheduler: SocketAddr, rank: u32) -> Worker {
    let mut cfg = WorkerConfig::new(scheduler);
    cfg.security = common::security();
    cfg.rank = Some(rank);
    cfg.tcp = tcp();
    cfg.register_timeout = Duration::from_secs(30);
    cfg.timeout = Duration::from_secs(30);
    Worker::connect(cfg).expect("worker connects")
}

/// Start in-process servers of ranks `0..n`, each with `rules`, on their own threads;
/// `Server::start` returns once every node registered, `run` once the job is over.
fn servers(scheduler: SocketAddr, n: u32, rules: &UserRules) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|rank| {
            let mut cfg = ServerConfig::new(scheduler);
            cfg.security = common::security();
            cfg.rank = Some(rank);
            cfg.tcp = tcp();
            cfg.shards = 4;
            cfg.register_timeout = Duration::from_secs(30);
            cfg.rules = rules.clone();
            std::thread::spawn(move || {
                Server::start(cfg)
                    .expect("server starts")
                    .run()
                    .expect("server runs")
            })
        })
        .collect()
}

/// Keys spread over the whole key space (so every server gets some).
fn spread_keys(n: u64, offset: u64) -> Vec<u64> {
    (0..n).map(|i| (KEY_END / n) * i + offset).collect()
}

const MU: f32 = 0.9;
const LR: f32 = 0.1;

/// Momentum SGD, one state element per weight: `v = mu v + g; w -= lr v`.
fn momentum(w: &mut [f32], v: &mut [f32], g: &[f32]) {
    for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
        *v = MU * *v + g;
        *w -= LR * *v;
    }
}

/// "Max with a push counter", two state elements per weight: the number of pushes and
/// the sum of the values pushed; the weight is the largest value pushed plus the counter
/// (so a pull shows both that the state persisted and the max).
fn max_count(w: &mut [f32], s: &mut [f32], g: &[f32]) {
    for ((w, s), &g) in w.iter_mut().zip(s.chunks_exact_mut(2)).zip(g) {
        let best = if s[0] == 0.0 { g } else { (*w - s[0]).max(g) };
        s[0] += 1.0;
        s[1] += g;
        *w = best + s[0];
    }
}

#[test]
fn user_rules_with_state_run_on_in_process_servers() {
    // The cluster's default is sum (no state): the stores keep state for the user rules.
    let mut c = Cluster::scheduler_only(2, 1, &["--update=sum", "--value-len=2"]);
    let mut rules = UserRules::default();
    let mom = rules.add_f32_fn("momentum", 1, momentum);
    let maxc = rules.add_f32(from_fn("max-count", 2, max_count));
    assert_eq!((mom, maxc), (ID_FIRST_USER, ID_FIRST_USER + 1));
    assert_eq!(rules.state_len_f32(), 2);
    assert_eq!(
        format!("{rules:?}"),
        r#"UserRules { f32: ["momentum", "max-count"], f64: [] }"#
    );
    let handles = servers(c.scheduler, 2, &rules);
    let w = worker(c.scheduler, 0);

    // Momentum on one set of keys (both servers), pushed with push_with.
    let keys = spread_keys(40, 3);
    let grads: Vec<Vec<f32>> = (0..5)
        .map(|step| {
            (0..keys.len() * 2)
                .map(|i| ((i % 7) as f32 - 3.0) * 0.5 + step as f32)
                .collect()
        })
        .collect();
    for g in &grads {
        w.wait(w.push_with(keys.clone(), g.clone(), mom)).unwrap();
    }
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    // Directly: per element, v and w from zero.
    for i in 0..keys.len() * 2 {
        let (mut wi, mut vi) = (0.0f32, 0.0f32);
        for g in &grads {
            vi = MU * vi + g[i];
            wi -= LR * vi;
        }
        assert_eq!(got[i], wi, "momentum element {i}");
    }
    // Plain sum (not momentum) for comparison would differ: the state did its job.
    let plain: f32 = grads.iter().map(|g| -LR * g[0]).sum();
    assert_ne!(got[0], plain);

    // Max-count on other keys, pushed with push_opts / push_pull_opts and TaskOpts::func.
    let keys2 = spread_keys(40, 5);
    let opts = TaskOpts {
        func: maxc,
        ..TaskOpts::default()
    };
    let pushes: [f32; 4] = [2.0, -1.0, 7.0, 3.0];
    for (n, &x) in pushes.iter().enumerate() {
        let vals: Vec<f32> = (0..keys2.len() * 2).map(|i| x + (i % 3) as f32).collect();
        if n + 1 < pushes.len() {
            w.wait(w.push_opts(keys2.clone(), vals, &opts)).unwrap();
        } else {
            let got = w
                .wait_pull::<f32>(w.push_pull_opts(keys2.clone(), vals, &opts))
                .unwrap()
                .to_vec();
            for (i, v) in got.iter().enumerate() {
                let max = pushes
                    .iter()
                    .map(|x| x + (i % 3) as f32)
                    .fold(f32::MIN, f32::max);
                assert_eq!(*v, max + pushes.len() as f32, "max-count element {i}");
            }
        }
    }
    // The momentum keys were not touched by the max-count pushes, and the built-ins still
    // work beside the user rules: the default (sum) and sum by id.
    let got2 = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    assert_eq!(got2, got);
    let keys3 = spread_keys(10, 9);
    w.wait(w.push(keys3.clone(), vec![1.5f32; 20])).unwrap();
    w.wait(w.push_with(keys3.clone(), vec![2.0f32; 20], ID_SUM))
        .unwrap();
    let got3 = w.wait_pull::<f32>(w.pull::<f32>(keys3)).unwrap().to_vec();
    assert!(got3.iter().all(|&v| v == 3.5), "{got3:?}");
    // An id past the registered rules is unknown.
    let e = w
        .wait(w.push_with(keys.clone(), vec![0.0f32; 80], ID_FIRST_USER + 2))
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::Server {
                status: Status::UnknownFunction,
                ..
            }
        ),
        "{e}"
    );

    w.finish(0).unwrap();
    for h in handles {
        h.join().expect("server thread");
    }
    c.procs.wait_all(Duration::from_secs(20));
}

#[test]
fn user_rules_of_the_cluster_value_type_are_served_f64() {
    let mut c = Cluster::scheduler_only(1, 1, &["--update=sum", "--value-type=f64"]);
    let mut rules = UserRules::default();
    // An f32 rule, not used by an f64 cluster, and the f64 rule the test pushes with.
    rules.add_f32_fn("unused", 3, |_, _, _| {});
    let ema = rules.add_f64_fn("ema", 1, |w, s, g| {
        // Exponential average with a bias correction from the push count in the state.
        for ((w, n), &g) in w.iter_mut().zip(s.iter_mut()).zip(g) {
            *n += 1.0;
            *w += (g - *w) / *n;
        }
    });
    assert_eq!(ema, ID_FIRST_USER);
    let handles = servers(c.scheduler, 1, &rules);
    let w = worker(c.scheduler, 0);
    let keys = vec![1u64, 10, 100];
    let pushed = [[1.0, 2.0, 3.0], [3.0, 6.0, -3.0], [8.0, 1.0, 0.0]];
    for g in pushed {
        w.wait(w.push_with(keys.clone(), g.to_vec(), ema)).unwrap();
    }
    // The running mean of what was pushed.
    let got = w.wait_pull::<f64>(w.pull::<f64>(keys)).unwrap().to_vec();
    for (i, v) in got.iter().enumerate() {
        let mean = pushed.iter().map(|g| g[i]).sum::<f64>() / 3.0;
        assert!((v - mean).abs() < 1e-12, "element {i}: {v} vs {mean}");
    }
    w.finish(0).unwrap();
    for h in handles {
        h.join().expect("server thread");
    }
    c.procs.wait_all(Duration::from_secs(20));
}

#[test]
fn bad_user_rules_fail_before_registering() {
    // Nothing listens there: the rules are refused before the server connects anywhere.
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cases: [(&str, &str); 2] = [("sum", "built-in"), ("dup", "taken by rule number 1")];
    for (name, want) in cases {
        let mut cfg = ServerConfig::new(nowhere);
        cfg.security = common::security();
        cfg.tcp = tcp();
        cfg.rules.f64.push(from_fn(name, 0, |_, _, _| {}));
        cfg.rules.f64.push(from_fn(name, 0, |_, _, _| {}));
        let started = std::time::Instant::now();
        match Server::start(cfg) {
            Err(EngineError::Config(m)) => {
                assert!(m.contains(name) && m.contains(want), "{m}")
            }
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("a server with bad rules started"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Adding a name again through the helpers replaces the rule and keeps the id.
    let mut rules = UserRules::default();
    let a = rules.add_f32_fn("r", 0, |_, _, _| {});
    rules.add_f32_fn("s", 0, |_, _, _| {});
    assert_eq!(rules.add_f32_fn("r", 2, |_, _, _| {}), a);
    assert_eq!((rules.f32.len(), rules.state_len_f32()), (2, 2));
}

#[test]
fn built_ins_whose_state_does_not_fit_are_refused_and_change_nothing() {
    // A sum cluster keeps no optimizer state: AdaGrad (1 per weight) and FTRL (2) by id
    // cannot run there.
    let mut c = Cluster::start(1, 1, &["--update=sum"]);
    let w = worker(c.scheduler, 0);
    let keys = vec![1u64, 2, 3];
    w.wait(w.push(keys.clone(), vec![1.0f32, 2.0, 3.0]))
        .unwrap();
    let range = KeyRange::new(1000, 1004);
    w.wait(w.push_range(range, vec![4.0f32; 4])).unwrap();
    for (id, name, needs) in [(ID_ADAGRAD, "adagrad", 1), (ID_FTRL, "ftrl", 2)] {
        let attempts = [
            w.push_with(keys.clone(), vec![9.0f32; 3], id),
            w.push_pull_opts(
                keys.clone(),
                vec![9.0f32; 3],
                &TaskOpts {
                    func: id,
                    ..TaskOpts::default()
                },
            ),
            w.push_range_opts(
                range,
                vec![9.0f32; 4],
                &TaskOpts {
                    func: id,
                    ..TaskOpts::default()
                },
            ),
        ];
        for ts in attempts {
            match w.wait(ts).unwrap_err() {
                EngineError::Server {
                    status, message, ..
                } => {
                    assert_eq!(status, Status::StoreError, "{message}");
                    assert!(
                        message.contains(name)
                            && message.contains(&format!("keeps {needs} state values"))
                            && message.contains("this store keeps 0"),
                        "{message}"
                    );
                }
                other => panic!("expected a server error, got {other}"),
            }
        }
    }
    // The store is as before.
    let got = w.wait_pull::<f32>(w.pull::<f32>(keys)).unwrap().to_vec();
    assert_eq!(got, vec![1.0, 2.0, 3.0]);
    let got = w
        .wait_pull::<f32>(w.pull_range::<f32>(range))
        .unwrap()
        .to_vec();
    assert_eq!(got, vec![4.0; 4]);
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(20));
}

/// An answer filter of the user's: each weight answered as its key's position in the
/// answer (so the test sees the keys reach it in order) plus the weight clipped to
/// [-1, 1].
struct ClipWithIndex;

impl pserv_engine::filter::AnswerFilter<f32> for ClipWithIndex {
    fn name(&self) -> &str {
        "clip-with-index"
    }
    fn apply(
        &self,
        keys: pserv_engine::filter::AnswerKeys<'_>,
        value_len: usize,
        values: &mut [f32],
    ) {
        let n = match keys {
            pserv_engine::filter::AnswerKeys::List(k) => k.len(),
            pserv_engine::filter::AnswerKeys::Range(r) => r.len() as usize,
        };
        assert_eq!(values.len(), n * value_len);
        for (i, v) in values.iter_mut().enumerate() {
            *v = (i / value_len) as f32 * 10.0 + v.clamp(-1.0, 1.0);
        }
    }
}

#[test]
fn pulls_name_answer_filters_built_in_and_the_users_and_an_unknown_one_is_refused() {
    use pserv_engine::filter::{round_bf16, ANSWER_BF16, ANSWER_FIRST_USER, ANSWER_ZERO_SMALL};
    let mut c = Cluster::scheduler_only(1, 1, &["--update=sum"]);
    let mut cfg = ServerConfig::new(c.scheduler);
    cfg.security = common::security();
    cfg.rank = Some(0);
    cfg.tcp = tcp();
    cfg.shards = 4;
    cfg.register_timeout = Duration::from_secs(30);
    let clip = cfg
        .answer_filters
        .f32
        .add(std::sync::Arc::new(ClipWithIndex));
    assert_eq!(clip, ANSWER_FIRST_USER);
    let server = std::thread::spawn(move || {
        Server::start(cfg)
            .expect("server starts")
            .run()
            .expect("server runs")
    });
    let w = worker(c.scheduler, 0);
    let keys = vec![3u64, 30, 300, 3000];
    let vals = vec![1.234_567_8f32, -5.0, 3e-7, 0.5];
    w.wait(w.push(keys.clone(), vals.clone())).unwrap();
    let pull = |func: u16| {
        let opts = TaskOpts {
            func,
            ..TaskOpts::default()
        };
        w.wait_pull::<f32>(w.pull_opts::<f32>(keys.clone(), &opts))
            .map(|p| p.to_vec())
    };
    assert_eq!(pull(0).unwrap(), vals);
    let bf16 = pull(ANSWER_BF16).unwrap();
    assert_eq!(
        bf16,
        vals.iter().map(|&v| round_bf16(v)).collect::<Vec<_>>()
    );
    assert_ne!(bf16[0], vals[0]);
    assert!(bf16.iter().all(|v| v.to_bits() & 0xffff == 0));
    assert_eq!(
        pull(ANSWER_ZERO_SMALL).unwrap(),
        vec![vals[0], -5.0, 0.0, 0.5]
    );
    assert_eq!(pull(clip).unwrap(), vec![1.0, 9.0, 20.0 + 3e-7, 30.5]);
    // Ranges too.
    let range = KeyRange::new(30, 32);
    let opts = TaskOpts {
        func: clip,
        ..TaskOpts::default()
    };
    let r = w
        .wait_pull::<f32>(w.pull_range_opts::<f32>(range, &opts))
        .unwrap()
        .to_vec();
    assert_eq!(r, vec![-1.0, 10.0]);
    // An id no filter has: a clear error; the weights as they were.
    match pull(ANSWER_FIRST_USER + 1) {
        Err(EngineError::Server {
            status, message, ..
        }) => {
            assert_eq!(status, Status::UnknownFunction);
            assert!(message.contains("no answer filter with id 17"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(pull(0).unwrap(), vals);
    w.finish(0).unwrap();
    server.join().expect("server thread");
    c.procs.wait_all(Duration::from_secs(20));
}
