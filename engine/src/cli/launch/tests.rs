//! Detection from each launcher's environment, node-list expansion, and the errors.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan(pairs: &[(&str, &str)], flags: LaunchFlags) -> LaunchPlan {
    detect(&env(pairs), &flags).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
}

/// The error for `pairs`, which must contain every one of `needles`.
fn error(pairs: &[(&str, &str)], flags: LaunchFlags, needles: &[&str]) {
    let e = match detect(&env(pairs), &flags) {
        Ok(p) => panic!("{pairs:?} gave a plan: {p:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(e.contains(n), "{pairs:?}: {e:?} does not say {n:?}");
    }
}

fn servers(s: u32) -> LaunchFlags {
    LaunchFlags {
        servers: Some(s),
        ..LaunchFlags::default()
    }
}

fn hp(host: &str, port: u16) -> HostPort {
    HostPort {
        host: host.into(),
        port,
    }
}

fn expand(list: &str) -> Vec<String> {
    expand_nodelist(list).unwrap_or_else(|e| panic!("{list}: {e}"))
}

#[test]
fn nodelists_expand_in_order_keeping_zero_padding() {
    assert_eq!(
        expand("node[01-03,7],gpu-a[1-2]"),
        ["node01", "node02", "node03", "node7", "gpu-a1", "gpu-a2"]
    );
    assert_eq!(expand("localhost"), ["localhost"]);
    assert_eq!(expand(" a , b "), ["a", "b"]);
    assert_eq!(expand("n[08-10]"), ["n08", "n09", "n10"]);
    assert_eq!(expand("n[8-10]"), ["n8", "n9", "n10"]);
    assert_eq!(expand("n[007]"), ["n007"]);
    assert_eq!(expand("n[1-2]-ib"), ["n1-ib", "n2-ib"]);
    assert_eq!(expand("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
    assert_eq!(
        expand("127.0.0.[1-3],host"),
        ["127.0.0.1", "127.0.0.2", "127.0.0.3", "host"]
    );
    assert_eq!(expand("[1-2]x"), ["1x", "2x"]);
}

#[test]
fn malformed_nodelists_are_refused_with_the_reason() {
    let cases = [
        ("", "empty"),
        ("   ", "empty"),
        ("node[1-", "unclosed"),
        ("node1]", "unmatched ']'"),
        ("node[1-2]]", "unmatched ']'"),
        ("node[3-1]", "goes down"),
        ("node[a-b]", "expected N or N-M"),
        ("node[]", "expected N or N-M"),
        ("node[1-2-3]", "expected N or N-M"),
        ("a,,b", "empty host name"),
        ("a,", "empty host name"),
        ("n[1-[2]]", "nested"),
        ("n[0-99999999]", "more than"),
    ];
    for (list, needle) in cases {
        match expand_nodelist(list) {
            Ok(h) => panic!("{list:?} expanded to {} hosts", h.len()),
            Err(e) => assert!(
                e.contains(needle),
                "{list:?}: {e:?} does not say {needle:?}"
            ),
        }
    }
}

#[test]
fn pod_ordinals_come_from_the_name_end() {
    assert_eq!(pod_ordinal("pserv-server-3"), Some(3));
    assert_eq!(pod_ordinal("pserv-worker-12"), Some(12));
    assert_eq!(pod_ordinal("web-0"), Some(0));
    for bad in [
        "pserv",
        "pserv-",
        "-3",
        "pserv-x3",
        "pserv-3a",
        "pserv-99999999999",
    ] {
        assert_eq!(pod_ordinal(bad), None, "{bad}");
    }
}

#[test]
fn host_port_parses_names_addresses_and_v6() {
    assert_eq!(
        HostPort::parse("V", "node01:9190").unwrap(),
        hp("node01", 9190)
    );
    assert_eq!(HostPort::parse("V", "[::1]:7").unwrap(), hp("::1", 7));
    assert_eq!(hp("::1", 7).to_string(), "[::1]:7");
    assert_eq!(hp("10.0.0.1", 7).to_string(), "10.0.0.1:7");
    for (bad, needle) in [
        ("node01", "expected HOST:PORT"),
        (":9190", "host is empty"),
        ("node:0", "not a port"),
        ("node:70000", "not a port"),
        ("node:x", "not a port"),
        ("::1:9", "needs brackets"),
    ] {
        let e = HostPort::parse("PSERV_SCHEDULER", bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PSERV_SCHEDULER") && e.contains(needle),
            "{bad}: {e}"
        );
    }
}

#[test]
fn slurm_ranks_follow_the_layout() {
    // 1 scheduler, 2 servers, 3 workers.
    let expect = [
        (RoleKind::Scheduler, 0),
        (RoleKind::Server, 0),
        (RoleKind::Server, 1),
        (RoleKind::Worker, 0),
        (RoleKind::Worker, 1),
        (RoleKind::Worker, 2),
    ];
    for (global, (role, rank)) in expect.into_iter().enumerate() {
        let g = global.to_string();
        let p = plan(
            &[
                ("SLURM_PROCID", &g),
                ("SLURM_NTASKS", "6"),
                ("SLURM_JOB_NODELIST", "node[01-03]"),
                ("SLURM_LOCALID", "1"),
            ],
            servers(2),
        );
        assert_eq!((p.role, p.rank), (role, rank), "global rank {global}");
        assert_eq!(p.global_rank, Some(global as u32));
        assert_eq!(p.local_rank, Some(1));
        assert_eq!((p.servers, p.workers), (2, 3));
        assert_eq!(p.source, Source::Slurm);
        assert_eq!(p.scheduler, hp("node01", DEFAULT_SCHEDULER_PORT));
        assert!(
            p.reason.contains("SLURM_PROCID") && p.reason.contains("node01"),
            "{}",
            p.reason
        );
    }
}

#[test]
fn slurm_address_rules() {
    let base = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4")];
    // SLURM_NODELIST when SLURM_JOB_NODELIST is missing; the port flag applies.
    let mut e = base.to_vec();
    e.push(("SLURM_NODELIST", "gpu[7-9]"));
    let flags = LaunchFlags {
        scheduler_port: Some(7000),
        ..LaunchFlags::default()
    };
    let p = plan(&e, flags);
    assert_eq!(p.scheduler, hp("gpu7", 7000));
    assert_eq!(
        (p.role, p.rank, p.servers, p.workers),
        (RoleKind::Worker, 1, 1, 2)
    );
    assert_eq!(p.local_rank, None);
    // PSERV_SCHEDULER overrides the node list.
    e.push(("PSERV_SCHEDULER", "10.1.2.3:9300"));
    assert_eq!(
        plan(&e, LaunchFlags::default()).scheduler,
        hp("10.1.2.3", 9300)
    );
    // ... and must agree with the port flag.
    error(
        &e,
        flags,
        &["--scheduler-port 7000", "PSERV_SCHEDULER=10.1.2.3:9300"],
    );
    // No node list and no PSERV_SCHEDULER.
    error(
        &base,
        LaunchFlags::default(),
        &["SLURM_JOB_NODELIST", "PSERV_SCHEDULER"],
    );
    // A malformed node list names its variable.
    let mut bad = base.to_vec();
    bad.push(("SLURM_JOB_NODELIST", "node[1-"));
    error(
        &bad,
        LaunchFlags::default(),
        &["SLURM_JOB_NODELIST", "unclosed"],
    );
}

#[test]
fn sizes_that_do_not_fit_are_refused() {
    let nl = ("SLURM_JOB_NODELIST", "n1");
    // 3 processes cannot hold 1 scheduler + 2 servers + a worker.
    error(
        &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "3"), nl],
        servers(2),
        &["SLURM_NTASKS=3", "at least 4"],
    );
    // An explicit worker count must match.
    let flags = LaunchFlags {
        workers: Some(5),
        ..LaunchFlags::default()
    };
    error(
        &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), nl],
        flags,
        &["is 5", "leaves 2 worker(s)"],
    );
    error(
        &[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("PSERV_NUM_WORKERS", "1"),
            nl,
        ],
        LaunchFlags::default(),
        &["PSERV_NUM_WORKERS is 1"],
    );
    // PSERV_NUM_SERVERS sets S when --servers does not.
    let p = plan(
        &[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("PSERV_NUM_SERVERS", "2"),
            nl,
        ],
        LaunchFlags::default(),
    );
    assert_eq!(
        (p.role, p.rank, p.servers, p.workers),
        (RoleKind::Server, 1, 2, 1)
    );
    error(
        &[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4"), nl],
        LaunchFlags::default(),
        &["SLURM_PROCID=4 is not below SLURM_NTASKS=4"],
    );
    error(
        &[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "4"), nl],
        LaunchFlags::default(),
        &["SLURM_PROCID=\"x\"", "non-negative integer"],
    );
    error(
        &[("SLURM_PROCID", "0"), nl],
        LaunchFlags::default(),
        &["SLURM_NTASKS"],
    );
    error(
        &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), nl],
        servers(0),
        &["at least one server"],
    );
}

#[test]
fn open_mpi_pmi_and_pmix() {
    let p = plan(
        &[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "29500"),
        ],
        LaunchFlags::default(),
    );
    assert_eq!(p.source, Source::OpenMpi);
    assert_eq!(
        (p.role, p.rank, p.servers, p.workers),
        (RoleKind::Server, 0, 1, 1)
    );
    assert_eq!((p.global_rank, p.local_rank), (Some(1), Some(0)));
    assert_eq!(p.scheduler, hp("head", 29500));

    let p = plan(
        &[
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "3"),
            ("PSERV_SCHEDULER", "head:1234"),
        ],
        LaunchFlags::default(),
    );
    assert_eq!(p.source, Source::Pmi);
    assert_eq!((p.role, p.rank), (RoleKind::Worker, 0));
    assert_eq!(p.scheduler, hp("head", 1234));

    // PMIx gives no size: it comes from the explicit shape.
    let flags = LaunchFlags {
        servers: Some(2),
        workers: Some(2),
        ..LaunchFlags::default()
    };
    let p = plan(&[("PMIX_RANK", "4"), ("MASTER_ADDR", "head")], flags);
    assert_eq!(p.source, Source::Pmix);
    assert_eq!(
        (p.role, p.rank, p.servers, p.workers),
        (RoleKind::Worker, 1, 2, 2)
    );
    assert_eq!(p.scheduler, hp("head", DEFAULT_SCHEDULER_PORT));
    error(
        &[("PMIX_RANK", "4"), ("MASTER_ADDR", "head")],
        LaunchFlags::default(),
        &["no world size", "--workers"],
    );

    // No host list: say where the address must come from.
    for (rank, size) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ] {
        error(
            &[(rank, "0"), (size, "3")],
            LaunchFlags::default(),
            &[rank, "no host list", "PSERV_SCHEDULER", "MASTER_ADDR"],
        );
    }
    error(
        &[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "x"),
        ],
        LaunchFlags::default(),
        &["MASTER_PORT", "not a port"],
    );
}

#[test]
fn mpirun_inside_a_slurm_allocation_uses_the_mpi_rank() {
    // Open MPI's daemons were started by srun: SLURM_PROCID is the daemon's.
    let p = plan(
        &[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "node[05-06]"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ],
        LaunchFlags::default(),
    );
    assert_eq!(p.source, Source::OpenMpi);
    assert_eq!((p.role, p.rank, p.workers), (RoleKind::Worker, 1, 2));
    assert_eq!(p.scheduler, hp("node05", DEFAULT_SCHEDULER_PORT));
    assert!(p.reason.contains("disagrees"), "{}", p.reason);
    // srun --mpi=pmix: both agree, Slurm it is.
    let p = plan(
        &[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_NODELIST", "node[05-06]"),
            ("PMIX_RANK", "3"),
        ],
        LaunchFlags::default(),
    );
    assert_eq!(p.source, Source::Slurm);
}

#[test]
fn torchrun_style() {
    let p = plan(
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29400"),
        ],
        servers(2),
    );
    assert_eq!(p.source, Source::Torchrun);
    assert_eq!((p.role, p.servers, p.workers), (RoleKind::Scheduler, 2, 1));
    assert_eq!(p.scheduler, hp("10.0.0.7", 29400));
    // --scheduler-port wins over MASTER_PORT (torchrun's own store holds MASTER_PORT).
    let flags = LaunchFlags {
        scheduler_port: Some(9191),
        ..LaunchFlags::default()
    };
    let p = plan(
        &[
            ("RANK", "2"),
            ("WORLD_SIZE", "3"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29400"),
        ],
        flags,
    );
    assert_eq!(p.scheduler, hp("h", 9191));
    assert_eq!((p.role, p.rank), (RoleKind::Worker, 0));
    error(
        &[("RANK", "0"), ("WORLD_SIZE", "3")],
        LaunchFlags::default(),
        &["MASTER_ADDR is not set", "PSERV_SCHEDULER"],
    );
    error(
        &[("RANK", "0"), ("MASTER_ADDR", "h")],
        LaunchFlags::default(),
        &["WORLD_SIZE is not set"],
    );
    error(
        &[("WORLD_SIZE", "3"), ("MASTER_ADDR", "h")],
        LaunchFlags::default(),
        &["RANK is not set"],
    );
}

#[test]
fn plain_pserv_variables_and_kubernetes_ordinals() {
    let shape = [
        ("PSERV_NUM_SERVERS", "2"),
        ("PSERV_NUM_WORKERS", "3"),
        ("PSERV_SCHEDULER", "sched:9190"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut e = shape.to_vec();
        e.extend_from_slice(extra);
        e
    };
    let p = plan(
        &with(&[("PSERV_ROLE", "worker"), ("PSERV_RANK", "2")]),
        LaunchFlags::default(),
    );
    assert_eq!(p.source, Source::Pserv);
    assert_eq!(
        (p.role, p.rank, p.servers, p.workers),
        (RoleKind::Worker, 2, 2, 3)
    );
    assert_eq!(
        (p.global_rank, p.scheduler.clone()),
        (None, hp("sched", 9190))
    );
    // A StatefulSet pod: the rank is the ordinal of its name (POD_NAME before HOSTNAME).
    let p = plan(
        &with(&[("PSERV_ROLE", "server"), ("HOSTNAME", "pserv-server-1")]),
        LaunchFlags::default(),
    );
    assert_eq!(
        (p.source, p.role, p.rank),
        (Source::Kubernetes, RoleKind::Server, 1)
    );
    assert!(p.reason.contains("HOSTNAME=pserv-server-1"), "{}", p.reason);
    let p = plan(
        &with(&[
            ("PSERV_ROLE", "Worker"),
            ("POD_NAME", "pserv-worker-2"),
            ("HOSTNAME", "other"),
        ]),
        LaunchFlags::default(),
    );
    assert_eq!(
        (p.source, p.role, p.rank),
        (Source::Kubernetes, RoleKind::Worker, 2)
    );
    // The scheduler needs no rank, and no PSERV_SCHEDULER (then: every interface).
    let p = plan(
        &[
            ("PSERV_ROLE", "scheduler"),
            ("PSERV_NUM_SERVERS", "1"),
            ("PSERV_NUM_WORKERS", "1"),
        ],
        LaunchFlags::default(),
    );
    assert_eq!(
        (p.role, p.scheduler),
        (RoleKind::Scheduler, hp("0.0.0.0", DEFAULT_SCHEDULER_PORT))
    );

    error(
        &with(&[("PSERV_ROLE", "boss"), ("PSERV_RANK", "0")]),
        LaunchFlags::default(),
        &["PSERV_ROLE=\"boss\"", "scheduler, server or worker"],
    );
    error(
        &with(&[("PSERV_ROLE", "server"), ("PSERV_RANK", "2")]),
        LaunchFlags::default(),
        &["server rank 2", "PSERV_NUM_SERVERS=2"],
    );
    error(
        &with(&[("PSERV_ROLE", "worker")]),
        LaunchFlags::default(),
        &["needs PSERV_RANK", "HOSTNAME"],
    );
    error(
        &with(&[("PSERV_ROLE", "worker"), ("HOSTNAME", "laptop")]),
        LaunchFlags::default(),
        &["HOSTNAME=\"laptop\"", "-ORDINAL"],
    );
    error(
        &with(&[("PSERV_ROLE", "worker"), ("PSERV_RANK", "-1")]),
        LaunchFlags::default(),
        &["PSERV_RANK=\"-1\""],
    );
    error(
        &[
            ("PSERV_ROLE", "worker"),
            ("PSERV_RANK", "0"),
            ("PSERV_NUM_WORKERS", "1"),
        ],
        LaunchFlags::default(),
        &["PSERV_SCHEDULER=HOST:PORT"],
    );
    error(
        &[
            ("PSERV_ROLE", "worker"),
            ("PSERV_RANK", "0"),
            ("PSERV_SCHEDULER", "s:1"),
        ],
        LaunchFlags::default(),
        &["PSERV_NUM_WORKERS"],
    );
}

#[test]
fn detection_order_and_forced_launchers() {
    let slurm = [
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "3"),
        ("SLURM_JOB_NODELIST", "n[1-3]"),
    ];
    let torch = [("RANK", "2"), ("WORLD_SIZE", "3"), ("MASTER_ADDR", "m")];
    let pserv = [
        ("PSERV_ROLE", "worker"),
        ("PSERV_RANK", "0"),
        ("PSERV_NUM_WORKERS", "1"),
        ("PSERV_SCHEDULER", "s:1"),
    ];
    let all: Vec<_> = slurm.iter().chain(&torch).chain(&pserv).copied().collect();
    assert_eq!(plan(&all, LaunchFlags::default()).source, Source::Pserv);
    let no_pserv: Vec<_> = slurm.iter().chain(&torch).copied().collect();
    assert_eq!(
        plan(&no_pserv, LaunchFlags::default()).source,
        Source::Slurm
    );
    let mut mpi_torch = torch.to_vec();
    mpi_torch.extend([("PMI_RANK", "1"), ("PMI_SIZE", "3")]);
    assert_eq!(plan(&mpi_torch, LaunchFlags::default()).source, Source::Pmi);
    // --launcher picks one, whatever else is set.
    let forced = |l| LaunchFlags {
        launcher: l,
        ..LaunchFlags::default()
    };
    let p = plan(&all, forced(LauncherChoice::Torchrun));
    assert_eq!((p.source, p.role), (Source::Torchrun, RoleKind::Worker));
    assert_eq!(
        plan(&all, forced(LauncherChoice::Slurm)).source,
        Source::Slurm
    );
    error(
        &torch,
        forced(LauncherChoice::Slurm),
        &["SLURM_PROCID is not set"],
    );
    error(
        &torch,
        forced(LauncherChoice::Mpi),
        &["OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK"],
    );
    error(
        &torch,
        forced(LauncherChoice::Pserv),
        &["PSERV_ROLE is not set"],
    );
    // Nothing at all.
    error(
        &[],
        LaunchFlags::default(),
        &[
            "no launcher",
            "PSERV_ROLE",
            "SLURM_PROCID",
            "OMPI_COMM_WORLD_RANK",
            "RANK, WORLD_SIZE",
        ],
    );
    error(
        &[("PSERV_RANK", "1")],
        LaunchFlags::default(),
        &["PSERV_RANK is set"],
    );
}

#[test]
fn the_scheduler_listens_on_loopback_as_is_else_everywhere() {
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(scheduler_listen(a("127.0.0.1:9190")), a("127.0.0.1:9190"));
    assert_eq!(scheduler_listen(a("0.0.0.0:9190")), a("0.0.0.0:9190"));
    assert_eq!(scheduler_listen(a("10.2.3.4:9190")), a("0.0.0.0:9190"));
    assert_eq!(scheduler_listen(a("[fd00::1]:9190")), a("[::]:9190"));
    assert_eq!(
        route_ip(a("127.0.0.1:9190")).unwrap(),
        a("127.0.0.1:1").ip()
    );
}

#[test]
fn launch_flags_do_not_clash_with_the_roles_flags() {
    use clap::CommandFactory;
    crate::cli::app::Cli::command().debug_assert();
}
