//! Round trips of the launch configs: build one, turn it into its child's command line,
//! parse that with the `pserv` command line, and compare; and the exact command lines
//! `pserv local` gives its children.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::cli::app::{Cli, Cmd, ReplArgs};
use crate::cli::args::{ClusterArgs, NetArgs};
use crate::cli::roles::{SchedulerLaunch, ServerLaunch, WorkerLaunch};
use crate::consistency::Consistency;
use crate::job::{JobArgs, Optimizer};
use crate::onesided::TransportKind;
use crate::proto::ValueType;
use crate::update::UpdateSpec;

/// Parse a child's command line (after the executable's prefix) as `pserv` does.
fn parse(args: &[String]) -> Cmd {
    Cli::try_parse_from(std::iter::once("pserv".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"))
        .cmd
}

/// Structs without `PartialEq` compare by their debug form (every field).
fn same<T: std::fmt::Debug>(a: &T, b: &T) {
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

/// Every transport flag set away from its default.
fn net_all() -> NetArgs {
    NetArgs {
        transport: TransportKind::Shm,
        rdma_messages: false,
        threads: Some(3),
        pin_cores: false,
        busy_poll_us: 7,
        max_frame_mb: 9,
        // (A secret file travels in the environment, not in the arguments.)
        security: crate::cli::args::SecurityArgs {
            secret_file: None,
            insecure: true,
        },
        tls: crate::cli::args::TlsArgs {
            tls_cert: Some(PathBuf::from("/etc/pserv/node.pem")),
            tls_key: Some(PathBuf::from("/etc/pserv/node.key")),
            tls_ca: Some(PathBuf::from("/etc/pserv/ca.pem")),
        },
    }
}

/// The transport flags with nothing optional set.
fn net_min() -> NetArgs {
    NetArgs {
        transport: TransportKind::Rdma,
        rdma_messages: true,
        threads: None,
        pin_cores: true,
        busy_poll_us: 0,
        max_frame_mb: 1,
        security: crate::cli::args::SecurityArgs::default(),
        tls: crate::cli::args::TlsArgs::default(),
    }
}

/// Every job flag set away from its default.
fn job_all() -> JobArgs {
    JobArgs {
        data: Some(PathBuf::from("/data/train.libsvm")),
        test_data: Some(PathBuf::from("/data/test.libsvm")),
        seed: 42,
        examples: Some(1234),
        features: Some(5678),
        test_fraction: 0.1,
        epochs: 7,
        batch_size: 33,
        lr: Some(0.3),
        l2: 1e-7,
        l1: 0.25,
        optimizer: Optimizer::Ftrl,
        shuffle: crate::job::Shuffle::Once,
        consistency: Consistency::BoundedDelay(3),
        slow_worker: Some("0:5,*:1:0.5".into()),
        skip_departed: true,
        join_at_epoch: Some(3),
        eval_every: 11,
        target_logloss: Some(0.45),
        trace: Some(PathBuf::from("/tmp/trace")),
        hash_buckets: Some(1 << 20),
        filters: vec![
            crate::filter::FilterSpec::Significant(0.01),
            crate::filter::FilterSpec::Kkt,
        ],
        key_cache: true,
        compress: pserv_transport::compress::Codec::Zstd { level: 7 },
        pull_filter: crate::job::PullFilter::ZeroSmall,
        restore: Some(PathBuf::from("/ck/run")),
    }
}

/// The job flags with nothing optional set.
fn job_min() -> JobArgs {
    JobArgs {
        data: None,
        test_data: None,
        seed: 0,
        examples: None,
        features: None,
        test_fraction: 0.5,
        epochs: 1,
        batch_size: 1,
        lr: None,
        l2: 0.0,
        l1: 0.0,
        optimizer: Optimizer::Adagrad,
        shuffle: crate::job::Shuffle::None,
        consistency: Consistency::Sequential,
        slow_worker: None,
        skip_departed: false,
        join_at_epoch: None,
        eval_every: 0,
        target_logloss: None,
        trace: None,
        hash_buckets: None,
        filters: Vec::new(),
        key_cache: false,
        compress: pserv_transport::compress::Codec::None,
        pull_filter: crate::job::PullFilter::None,
        restore: None,
    }
}

#[test]
fn a_scheduler_launch_round_trips_through_the_scheduler_parser() {
    let addr: SocketAddr = "10.1.2.3:4567".parse().unwrap();
    let full = SchedulerLaunch {
        listen: addr,
        port_file: Some(PathBuf::from("/tmp/x/scheduler.addr")),
        summary_json: Some(PathBuf::from("/tmp/x/summary.json")),
        cluster: ClusterArgs {
            servers: 5,
            workers: 3,
            value_type: ValueType::F64,
            value_len: 4,
            vnodes: 7,
            replicas: Some(2),
        },
        update: UpdateSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.2,
            l2: 1e-5,
        },
        progress: true,
        recover: true,
        net: net_all(),
        checkpoint: crate::checkpoint::CheckpointArgs {
            checkpoint_every: Some(crate::checkpoint::Every::Secs(30)),
            checkpoint_dir: Some(PathBuf::from("/ck/every")),
        },
        restore: Some(PathBuf::from("/ck/from")),
        replace: crate::cli::roles::ReplaceArgs {
            replace_failed_workers: true,
            replace_wait_secs: 7,
        },
    };
    let min = SchedulerLaunch {
        port_file: None,
        summary_json: None,
        cluster: ClusterArgs {
            value_type: ValueType::F32,
            replicas: None,
            ..full.cluster.clone()
        },
        update: UpdateSpec::Sum,
        progress: false,
        recover: false,
        net: net_min(),
        checkpoint: Default::default(),
        restore: None,
        replace: Default::default(),
        ..full.clone()
    };
    let updates = [
        UpdateSpec::Assign,
        UpdateSpec::Sgd { lr: 0.05 },
        UpdateSpec::Adagrad { lr: 0.5, eps: 1e-8 },
    ];
    let more = updates.map(|update| SchedulerLaunch {
        update,
        ..full.clone()
    });
    for l in [full, min].iter().chain(&more) {
        let Cmd::Scheduler(a) = parse(&l.to_args()) else {
            panic!("not a scheduler command")
        };
        assert_eq!(a.listen, l.listen);
        assert_eq!(a.port_file, l.port_file);
        assert_eq!(a.output.summary_json, l.summary_json);
        same(&a.cluster, &l.cluster);
        assert_eq!(a.update, l.update);
        assert_eq!(a.progress, l.progress);
        assert_eq!(a.recover, l.recover);
        same(&a.net, &l.net);
        assert_eq!(a.checkpoint, l.checkpoint);
        assert_eq!(a.restore.restore, l.restore);
        assert_eq!(a.replace.wait(), l.replace.wait());
    }
}

#[test]
fn a_server_launch_round_trips_through_the_server_parser() {
    let full = ServerLaunch {
        scheduler: "10.1.2.3:4567".parse().unwrap(),
        rank: Some(4),
        join: true,
        net: net_all(),
        repl: ReplArgs {
            replication_batch: 5,
            replication_window_us: 6,
        },
        dump_model: Some(PathBuf::from("/tmp/model")),
        allow_non_finite: true,
        restore: Some(PathBuf::from("/ck/from")),
    };
    let min = ServerLaunch {
        rank: None,
        join: false,
        net: net_min(),
        dump_model: None,
        allow_non_finite: false,
        restore: None,
        ..full.clone()
    };
    for l in [full, min] {
        let Cmd::Server(a) = parse(&l.to_args()) else {
            panic!("not a server command")
        };
        assert_eq!(a.sched.scheduler, l.scheduler);
        assert_eq!(a.rank, l.rank);
        assert_eq!(a.join, l.join);
        same(&a.net, &l.net);
        same(&a.repl, &l.repl);
        assert_eq!(a.dump_model, l.dump_model);
        assert_eq!(a.allow_non_finite, l.allow_non_finite);
        assert_eq!(a.restore.restore, l.restore);
    }
}

#[test]
fn a_worker_launch_round_trips_through_the_worker_parser() {
    let full = WorkerLaunch {
        scheduler: "10.1.2.3:4567".parse().unwrap(),
        rank: Some(2),
        replace: None,
        job: job_all(),
        net: net_all(),
    };
    let min = WorkerLaunch {
        rank: None,
        replace: None,
        job: job_min(),
        net: net_min(),
        ..full.clone()
    };
    let sgd = WorkerLaunch {
        job: JobArgs {
            optimizer: Optimizer::Sgd,
            consistency: Consistency::Eventual,
            ..job_all()
        },
        ..full.clone()
    };
    let replacement = WorkerLaunch {
        rank: None,
        replace: Some(1),
        ..full.clone()
    };
    for l in [full, min, sgd, replacement] {
        let Cmd::Worker(a) = parse(&l.to_args()) else {
            panic!("not a worker command")
        };
        assert_eq!(a.sched.scheduler, l.scheduler);
        assert_eq!(a.rank, l.rank);
        assert_eq!(a.replace, l.replace);
        same(&a.job, &l.job);
        same(&a.net, &l.net);
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// What `pserv local --servers 2 --workers 2` passes on, flag for flag (as before the
/// launch configs existed).
#[test]
fn pserv_local_gives_its_children_these_command_lines() {
    let Cmd::Local(local) =
        Cli::parse_from(["pserv", "local", "--servers", "2", "--workers", "2"]).cmd
    else {
        panic!("not a local command")
    };
    let plan = local.plan(Vec::new()).unwrap();
    let net = [
        "--transport=auto",
        "--rdma-messages=true",
        "--pin-cores=true",
        "--busy-poll-us=100",
        "--max-frame-mb=512",
    ];
    let sched = plan.scheduler(Path::new("/s/scheduler.addr"), Path::new("/s/summary.json"));
    let mut want = strings(&[
        "scheduler",
        "--listen=127.0.0.1:0",
        "--port-file=/s/scheduler.addr",
        "--summary-json=/s/summary.json",
        "--servers=2",
        "--workers=2",
        "--value-type=f32",
        "--value-len=1",
        "--vnodes=64",
        "--update=adagrad:0.5:0.00000001",
        "--replicas=1",
        "--progress",
    ]);
    want.extend(strings(&net));
    assert_eq!(sched.to_args(), want);

    let addr: SocketAddr = "127.0.0.1:9190".parse().unwrap();
    let repl = ["--replication-batch=32", "--replication-window-us=0"];
    for (rank, head) in [(Some(1), "--rank=1"), (None, "--join")] {
        let mut want = strings(&["server", "--scheduler=127.0.0.1:9190", head]);
        want.extend(strings(&net));
        want.extend(strings(&repl));
        assert_eq!(plan.server(addr, rank).to_args(), want);
    }

    let job = [
        "--seed=1",
        "--test-fraction=0.2",
        "--epochs=3",
        "--batch-size=100",
        "--l2=0.00001",
        "--shuffle=epoch",
        "--l1=0",
        "--optimizer=adagrad",
        "--consistency=eventual",
        "--eval-every=0",
    ];
    for (rank, head) in [(Some(0), &["--rank=0"][..]), (None, &[][..])] {
        let mut want = strings(&["worker", "--scheduler=127.0.0.1:9190"]);
        want.extend(strings(head));
        want.extend(strings(&job));
        want.extend(strings(&net));
        assert_eq!(plan.worker(addr, rank).to_args(), want);
    }
}
