//! `pserv launch` end to end: for each launcher's environment, one `pserv launch` process
//! per rank on 127.0.0.1 with the variables that launcher sets, training a small job; a
//! worker's CMD with the environment it gets, its exit status and signals; bad
//! environments; and the deploy files (Kubernetes manifests, the sbatch script).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pserv, Scratch};
use pserv_engine::cli::launch::{detect, LaunchFlags, RoleKind};
use yaml_rust2::{Yaml, YamlLoader};

/// A small job that trains in about half a second on two cores (0.74 held-out accuracy
/// against a majority class of 0.57, logloss 0.58 against 0.68 for the constant
/// predictor; at lr 1 two asynchronous workers do not overshoot), and two unpinned loops
/// per process.
const JOB: [(&str, &str); 9] = [
    ("PSERV_EXAMPLES", "8000"),
    ("PSERV_FEATURES", "1000"),
    ("PSERV_EPOCHS", "3"),
    ("PSERV_LR", "1"),
    ("PSERV_BATCH_SIZE", "50"),
    ("PSERV_SEED", "7"),
    ("PSERV_THREADS", "2"),
    ("PSERV_PIN_CORES", "false"),
    ("PSERV_LOG", "warn"),
];

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pserv launch ARGS` with exactly `env` (and `PATH`): nothing of the test's own
/// environment (a CI job under Slurm, say) leaks into the detection.
fn launch(env: &[(String, String)], args: &[&str]) -> Command {
    let mut c = common::pserv_cmd();
    c.arg("launch")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PSERV_SECRET_FILE", common::secret_file())
        .envs(env.iter().map(|(k, v)| (k, v)));
    c
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Launch processes, SIGKILLed (by pid) and reaped when dropped.
struct Ranks(Vec<(u32, Child, PathBuf)>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `n` ranks (last first: the scheduler starts after everyone else, so the others
/// must wait for it), rank `r` with `rank_env(r)` and the job's variables; wait for all;
/// check each printed a plan from `source(r)`; return the job summary.
fn run_cluster(
    tag: &str,
    n: u32,
    source: fn(u32) -> &'static str,
    args: &[&str],
    rank_env: impl Fn(u32) -> Vec<(String, String)>,
) -> serde_json::Value {
    let dir = Scratch::new(tag);
    let summary = dir.path("summary.json");
    let mut ranks = Ranks(Vec::new());
    for r in (0..n).rev() {
        let mut env = owned(&JOB);
        env.push(("PSERV_SUMMARY_JSON".into(), summary.display().to_string()));
        env.extend(rank_env(r));
        let log = dir.path(&format!("rank{r}.log"));
        let child = launch(&env, args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ranks.0.push((r, child, log));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let logs = |ranks: &Ranks| {
        ranks
            .0
            .iter()
            .map(|(r, _, log)| {
                format!(
                    "--- rank {r}:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    for i in 0..ranks.0.len() {
        loop {
            if let Some(st) = ranks.0[i].1.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "rank {} exited with {st}\n{}",
                    ranks.0[i].0,
                    logs(&ranks)
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not finish within 120 s\n{}",
                logs(&ranks)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (r, _, log) in &ranks.0 {
        let text = std::fs::read_to_string(log).unwrap();
        let source = source(*r);
        assert!(
            text.contains(&format!("; from {source} (")),
            "rank {r} did not say it used {source}:\n{text}"
        );
    }
    serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary written")).unwrap()
}

/// The job trained: every example of the three epochs seen, well above the majority
/// class and below the constant predictor's logloss.
fn check_trained(s: &serde_json::Value, workers: u64) {
    let acc = s["test_accuracy"].as_f64().unwrap();
    let majority = s["majority_rate"].as_f64().unwrap();
    let logloss = s["test_logloss"].as_f64().unwrap();
    eprintln!("trained: accuracy {acc} (majority class {majority}), logloss {logloss}");
    assert!(
        acc > majority + 0.08,
        "accuracy {acc} vs majority {majority}: {s}"
    );
    assert!(logloss < 0.63, "logloss {logloss}: {s}");
    assert_eq!(s["epochs"], 3, "{s}");
    assert_eq!(s["examples"], 3 * 6400, "{s}");
    let traffic: Vec<&String> = s
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("traffic_worker_"))
        .collect();
    assert_eq!(traffic.len() as u64, workers, "{s}");
}

/// An environment, as `launch` takes it.
type Env = Vec<(String, String)>;

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[test]
fn slurm_tasks_form_a_cluster() {
    let port = free_port().to_string();
    // The first host of the node list is the scheduler's; the others never resolve.
    let s = run_cluster(
        "slurm",
        4,
        |_| "Slurm",
        &["--servers=1", "--scheduler-port", &port],
        |r| {
            vec![
                kv("SLURM_PROCID", r),
                kv("SLURM_NTASKS", 4),
                kv("SLURM_JOB_NODELIST", "localhost,nohost[01-03]"),
                kv("SLURM_LOCALID", r),
            ]
        },
    );
    check_trained(&s, 2);
}

#[test]
fn open_mpi_ranks_form_a_cluster_with_two_servers() {
    let port = free_port();
    let s = run_cluster(
        "ompi",
        4,
        |_| "Open MPI",
        &["--servers=2"],
        |r| {
            vec![
                kv("OMPI_COMM_WORLD_RANK", r),
                kv("OMPI_COMM_WORLD_SIZE", 4),
                kv("MASTER_ADDR", "127.0.0.1"),
                kv("MASTER_PORT", port),
            ]
        },
    );
    check_trained(&s, 1);
}

#[test]
fn pmi_ranks_form_a_cluster() {
    let port = free_port();
    let s = run_cluster(
        "pmi",
        3,
        |_| "PMI",
        &[],
        |r| {
            vec![
                kv("PMI_RANK", r),
                kv("PMI_SIZE", 3),
                kv("PSERV_SCHEDULER", format!("127.0.0.1:{port}")),
            ]
        },
    );
    check_trained(&s, 1);
}

#[test]
fn torchrun_ranks_form_a_cluster_whose_worker_is_a_cmd() {
    // The worker is CMD: `pserv worker`, configured only by what launch puts in its
    // environment (PSERV_SCHEDULER, PSERV_RANK), as a training script would be.
    let port = free_port();
    let s = run_cluster(
        "torchrun",
        4,
        |_| "torchrun-style variables",
        &["--", pserv(), "worker"],
        |r| {
            vec![
                kv("RANK", r),
                kv("WORLD_SIZE", 4),
                kv("LOCAL_RANK", 0),
                kv("MASTER_ADDR", "localhost"),
                kv("MASTER_PORT", port),
            ]
        },
    );
    check_trained(&s, 2);
}

#[test]
fn pserv_variables_and_a_pod_ordinal_form_a_cluster() {
    let port = free_port();
    // Global rank 0: the scheduler; 1: server 0; 2, 3: workers 0 and 1, the last one
    // with its rank from a StatefulSet pod's name, as on Kubernetes.
    let s = run_cluster(
        "pserv",
        4,
        |r| match r {
            3 => "Kubernetes",
            _ => "PSERV_* variables",
        },
        &[],
        |r| {
            let mut e = vec![
                kv("PSERV_NUM_SERVERS", 1),
                kv("PSERV_NUM_WORKERS", 2),
                kv("PSERV_SCHEDULER", format!("127.0.0.1:{port}")),
            ];
            match r {
                0 => e.push(kv("PSERV_ROLE", "scheduler")),
                1 => e.extend([kv("PSERV_ROLE", "server"), kv("PSERV_RANK", 0)]),
                2 => e.extend([kv("PSERV_ROLE", "worker"), kv("PSERV_RANK", 0)]),
                _ => e.extend([kv("PSERV_ROLE", "worker"), kv("HOSTNAME", "pserv-worker-1")]),
            }
            e
        },
    );
    check_trained(&s, 2);
}

/// A stand-in scheduler that accepts connections (a worker waits for one before CMD).
fn fake_scheduler() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_worker_cmd_gets_its_rank_and_the_scheduler_and_its_exit_status_is_kept() {
    let dir = Scratch::new("cmd");
    let out = dir.path("env.txt");
    let (_sched, port) = fake_scheduler();
    // Global rank 4 of 6 with 2 servers: worker 1 of 3.
    let env = vec![
        kv("SLURM_PROCID", 4),
        kv("SLURM_NTASKS", 6),
        kv("SLURM_JOB_NODELIST", "localhost"),
        kv("SLURM_LOCALID", 1),
    ];
    let script = format!(
        "echo \"$PSERV_ROLE $PSERV_RANK $PSERV_NUM_WORKERS $PSERV_NUM_SERVERS $PSERV_SCHEDULER $PSERV_LOCAL_RANK $1\" > {}; exit 3",
        out.display()
    );
    let o = launch(
        &env,
        &[
            "--servers=2",
            "--scheduler-port",
            &port.to_string(),
            "--",
            "sh",
            "-c",
            &script,
            "sh",
            "arg1",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        format!("worker 1 3 2 127.0.0.1:{port} 1 arg1")
    );
    assert!(
        stderr(&o).contains("worker 1 of 2 server(s) and 3 worker(s)"),
        "{}",
        stderr(&o)
    );
}

/// `pid`'s state letter from /proc, if it still exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim().chars().next()
}

fn wait_file(p: &Path) -> String {
    common::wait_file(p, Duration::from_secs(20))
}

#[test]
fn sigterm_reaches_the_cmd_and_its_status_is_the_launchs() {
    let dir = Scratch::new("sig");
    let (ready, got) = (dir.path("ready"), dir.path("got"));
    let (_sched, port) = fake_scheduler();
    let env = vec![
        kv("PSERV_ROLE", "worker"),
        kv("PSERV_RANK", 0),
        kv("PSERV_NUM_WORKERS", 1),
        kv("PSERV_SCHEDULER", format!("127.0.0.1:{port}")),
    ];
    let script = format!(
        "trap 'echo term > {got}; exit 7' TERM; echo $$ > {ready}; while true; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut child = launch(&env, &["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sh: u32 = wait_file(&ready).trim().parse().unwrap();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("launch did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(7), "{err}");
    assert_eq!(std::fs::read_to_string(&got).unwrap().trim(), "term");
    assert!(err.contains("forwarding it to CMD"), "{err}");
    assert!(
        matches!(proc_state(sh), None | Some('Z')),
        "CMD (pid {sh}) still runs"
    );
}

#[test]
fn a_cmd_past_its_time_limit_is_stopped_with_sigkill_when_it_ignores_sigterm() {
    let dir = Scratch::new("limit");
    let pids = dir.path("pids");
    let (_sched, port) = fake_scheduler();
    let env = vec![
        kv("PSERV_ROLE", "worker"),
        kv("PSERV_RANK", 0),
        kv("PSERV_NUM_WORKERS", 1),
        kv("PSERV_SCHEDULER", format!("127.0.0.1:{port}")),
    ];
    // sh and its sleep both ignore SIGTERM.
    let script = format!(
        "trap '' TERM; sleep 60 & echo \"$$ $!\" > {}; wait",
        pids.display()
    );
    let started = Instant::now();
    let o = launch(
        &env,
        &[
            "--timeout-secs=1",
            "--grace-secs=1",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .output()
    .unwrap();
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ran past --timeout-secs 1"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("SIGKILL"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(20), "took {took:?}");
    for pid in std::fs::read_to_string(&pids).unwrap().split_whitespace() {
        let pid: u32 = pid.parse().unwrap();
        // Killed with its group; a zombie at most until its new parent reaps it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(proc_state(pid), None | Some('Z')) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} of CMD's group still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn bad_environments_fail_with_status_2_naming_the_variable() {
    let cases: Vec<(Env, &[&str])> = vec![
        (
            vec![],
            &["no launcher", "PSERV_ROLE", "SLURM_PROCID", "MASTER_ADDR"],
        ),
        (
            vec![
                kv("SLURM_PROCID", 0),
                kv("SLURM_NTASKS", 4),
                kv("SLURM_JOB_NODELIST", "node[1-"),
            ],
            &["SLURM_JOB_NODELIST", "unclosed '['"],
        ),
        (
            vec![kv("OMPI_COMM_WORLD_RANK", 1), kv("OMPI_COMM_WORLD_SIZE", 3)],
            &["Open MPI", "no host list", "PSERV_SCHEDULER", "MASTER_ADDR"],
        ),
        (
            vec![kv("RANK", 0), kv("WORLD_SIZE", 2), kv("MASTER_ADDR", "h")],
            &["WORLD_SIZE=2 does not fit", "at least 3"],
        ),
        (
            vec![
                kv("PSERV_ROLE", "server"),
                kv("PSERV_NUM_WORKERS", 1),
                kv("PSERV_SCHEDULER", "h:1"),
            ],
            &["needs PSERV_RANK"],
        ),
    ];
    for (env, needles) in cases {
        let o = launch(&env, &[]).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{env:?}: {err}");
        assert!(err.starts_with("pserv launch: error: "), "{env:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{env:?}: {err:?} does not say {n:?}");
        }
    }
}

#[test]
fn dry_run_prints_the_plan() {
    let env = vec![
        kv("SLURM_PROCID", 2),
        kv("SLURM_NTASKS", 5),
        kv("SLURM_JOB_NODELIST", "gpu-a[07-09]"),
    ];
    let o = launch(&env, &["--servers=2", "--dry-run"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["source"], "slurm");
    assert_eq!(
        (plan["role"].as_str(), plan["rank"].as_u64()),
        (Some("server"), Some(1))
    );
    assert_eq!(
        (plan["servers"].as_u64(), plan["workers"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(plan["scheduler"]["host"], "gpu-a07");
    assert_eq!(plan["scheduler"]["port"], 9190);
}

#[test]
fn a_server_waits_for_the_scheduler_a_bounded_time() {
    let port = free_port();
    let env = vec![
        kv("PSERV_ROLE", "server"),
        kv("PSERV_RANK", 0),
        kv("PSERV_NUM_WORKERS", 1),
        kv("PSERV_SCHEDULER", format!("127.0.0.1:{port}")),
    ];
    let started = Instant::now();
    let o = launch(&env, &["--wait-scheduler-secs=1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not accept a connection within 1s"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn s<'a>(y: &'a Yaml, path: &[&str]) -> &'a str {
    let mut v = y;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string: {v:?}"))
}

/// `labels` as a map (a missing map is empty).
fn labels(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn subset(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    !a.is_empty() && a.iter().all(|(k, v)| b.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_describe_a_headless_service_and_a_statefulset_per_role() {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let parsed =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for d in parsed.into_iter().filter(|d| !d.is_null()) {
            for key in ["apiVersion", "kind"] {
                assert!(
                    d[key].as_str().is_some_and(|v| !v.is_empty()),
                    "{}: no {key}",
                    f.display()
                );
            }
            assert!(!s(&d, &["metadata", "name"]).is_empty(), "{}", f.display());
            docs.push(d);
        }
    }
    let of = |kind: &str| {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect::<Vec<_>>()
    };
    let (services, sets, maps) = (of("Service"), of("StatefulSet"), of("ConfigMap"));
    assert_eq!(services.len(), 1);
    assert_eq!(maps.len(), 1);
    let svc = services[0];
    assert_eq!(s(svc, &["apiVersion"]), "v1");
    assert_eq!(
        s(svc, &["spec", "clusterIP"]),
        "None",
        "the Service is headless"
    );
    let svc_name = s(svc, &["metadata", "name"]);
    let svc_port = svc["spec"]["ports"][0]["port"].as_i64().unwrap();
    let config = maps[0];
    let config_name = s(config, &["metadata", "name"]);
    let data: BTreeMap<String, String> = labels(&config["data"]);

    let mut by_role = BTreeMap::new();
    for set in &sets {
        let name = s(set, &["metadata", "name"]);
        assert_eq!(s(set, &["apiVersion"]), "apps/v1", "{name}");
        assert_eq!(s(set, &["spec", "serviceName"]), svc_name, "{name}");
        let template = &set["spec"]["template"];
        let pod_labels = labels(&template["metadata"]["labels"]);
        assert!(
            subset(
                &labels(&set["spec"]["selector"]["matchLabels"]),
                &pod_labels
            ),
            "{name}: the selector does not match the template's labels"
        );
        assert!(
            subset(&labels(&svc["spec"]["selector"]), &pod_labels),
            "{name}: the Service does not select its pods (no DNS names)"
        );
        let c = &template["spec"]["containers"][0];
        let argv: Vec<&str> = c["command"]
            .as_vec()
            .into_iter()
            .chain(c["args"].as_vec())
            .flatten()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            argv.windows(2).any(|w| w == ["pserv", "launch"]),
            "{name}: {argv:?}"
        );
        assert!(
            c["envFrom"]
                .as_vec()
                .unwrap()
                .iter()
                .any(|e| e["configMapRef"]["name"].as_str() == Some(config_name)),
            "{name} does not read {config_name}"
        );
        let env = c["env"].as_vec().unwrap();
        let role = env
            .iter()
            .find(|e| e["name"].as_str() == Some("PSERV_ROLE"))
            .map(|e| s(e, &["value"]).to_string())
            .unwrap_or_else(|| panic!("{name} sets no PSERV_ROLE"));
        assert!(
            env.iter().any(|e| e["name"].as_str() == Some("POD_NAME")
                && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.name")),
            "{name}: POD_NAME from the downward API"
        );
        // The cluster secret: a Secret volume, mounted where PSERV_SECRET_FILE points.
        let secret_file = env
            .iter()
            .find(|e| e["name"].as_str() == Some("PSERV_SECRET_FILE"))
            .map(|e| s(e, &["value"]).to_string())
            .unwrap_or_else(|| panic!("{name} sets no PSERV_SECRET_FILE"));
        let volumes = template["spec"]["volumes"].as_vec().unwrap();
        let mounted = c["volumeMounts"].as_vec().unwrap().iter().any(|m| {
            secret_file.starts_with(&format!("{}/", s(m, &["mountPath"])))
                && volumes.iter().any(|v| {
                    v["name"].as_str() == m["name"].as_str()
                        && v["secret"]["secretName"].as_str() == Some("pserv-secret")
                })
        });
        assert!(mounted, "{name}: {secret_file} is not in a mounted Secret");
        let replicas = set["spec"]["replicas"].as_i64().unwrap() as u32;
        assert!(
            by_role
                .insert(role.clone(), (name.to_string(), replicas))
                .is_none(),
            "two sets for {role}"
        );
    }
    let count = |var: &str| data[var].parse::<u32>().unwrap();
    assert_eq!(by_role["scheduler"].1, 1);
    assert_eq!(by_role["server"].1, count("PSERV_NUM_SERVERS"));
    assert_eq!(by_role["worker"].1, count("PSERV_NUM_WORKERS"));
    assert_eq!(
        data["PSERV_SCHEDULER"],
        format!("{}-0.{svc_name}:{svc_port}", by_role["scheduler"].0),
        "PSERV_SCHEDULER names the scheduler pod in the Service"
    );
    // Every pod of every set derives the role and rank it stands for.
    for (role, (set, replicas)) in &by_role {
        for ordinal in 0..*replicas {
            let mut env: BTreeMap<String, String> = data.clone();
            env.insert("PSERV_ROLE".into(), role.clone());
            env.insert("POD_NAME".into(), format!("{set}-{ordinal}"));
            let plan = detect(&env, &LaunchFlags::default()).unwrap();
            assert_eq!(plan.role.to_string(), *role);
            if plan.role != RoleKind::Scheduler {
                assert_eq!(plan.rank, ordinal);
            }
        }
    }
}

#[test]
fn the_sbatch_script_is_valid_shell_running_srun_pserv_launch() {
    let path = deploy("slurm/pserv.sbatch");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("#!/bin/bash\n"));
    assert!(text.contains("#SBATCH --ntasks="));
    assert!(
        text.lines()
            .any(|l| l.starts_with("srun ") && l.contains("pserv launch")),
        "{text}"
    );
    assert!(
        text.contains("pserv secret") && text.contains("export PSERV_SECRET_FILE"),
        "the job makes a cluster secret: {text}"
    );
    let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(o.status.success(), "bash -n: {}", stderr(&o));
}
