//! Checkpoints with real processes: `pserv local` writes a checkpoint after every epoch,
//! every process of the job is SIGKILLed after the checkpoint of epoch 2 landed, and
//! `pserv local --restore` finishes the job with the model of a run without the crash,
//! bit for bit (sequential consistency), with the same and with another number of
//! servers; a corrupted checkpoint is refused naming the file; `pserv checkpoint` asks a
//! running job for one.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;

/// The job: sequential consistency (deterministic), AdaGrad (optimizer state on the
/// servers), reshuffled every epoch.
fn job(servers: u32, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--workers=2",
        "--examples=40000",
        "--features=30000",
        "--epochs=4",
        "--seed=5",
        "--lr=1",
        "--consistency=sequential",
        "--timeout-secs=120",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--servers={servers}"));
    a.extend(common::net_flags());
    a.extend_from_slice(extra);
    a
}

fn flag(name: &str, v: impl std::fmt::Display) -> String {
    format!("--{name}={v}")
}

/// `pserv local ARGS --dump-model=DUMP`; its summary.
fn run(args: &[String], dump: &Path) -> serde_json::Value {
    std::fs::create_dir_all(dump).unwrap();
    let mut a = args.to_vec();
    a.push(flag("dump-model", dump.display()));
    common::local_summary(&a, &dump.join("summary.json"))
}

/// (weights bitwise equal, keys, relative L2 distance) of `b` against `a`, after
/// checking they trained the same keys.
fn compare(a: &BTreeMap<u64, u32>, b: &BTreeMap<u64, u32>) -> (usize, usize, f64) {
    assert!(a.len() > 5000, "only {} keys trained", a.len());
    assert_eq!(a.len(), b.len(), "the same keys are trained");
    let (mut same, mut d2, mut n2) = (0, 0f64, 0f64);
    for (k, w) in a {
        let v = *b.get(k).expect("the same keys");
        same += usize::from(v == *w);
        let (x, y) = (f64::from(f32::from_bits(*w)), f64::from(f32::from_bits(v)));
        d2 += (x - y) * (x - y);
        n2 += x * x;
    }
    (same, a.len(), (d2 / n2).sqrt())
}

/// The pids of `parent`'s children (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces; it ends at the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

fn sigkill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Kills the launcher (by pid) if a test fails before it did.
struct Launcher(Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_local(args: &[String]) -> Launcher {
    let child = common::pserv_cmd()
        .arg("local")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pserv runs");
    Launcher(child)
}

/// The epoch `DIR/latest` names, if any.
fn latest(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("latest")).ok()?;
    s.trim().strip_prefix("epoch-")?.parse().ok()
}

/// Run the job with a checkpoint after every epoch and SIGKILL the launcher and every
/// process it started once the checkpoint of epoch 2 is written; returns the epoch of
/// the newest checkpoint then.
fn crash_after_checkpoint_2(ck: &Path) -> u64 {
    let mut args = job(
        3,
        &[
            flag("checkpoint-every", 1),
            flag("checkpoint-dir", ck.display()),
        ],
    );
    // Slow the workers (time only, not values) so the job is still running then.
    args.push("--slow-worker=*:4".into());
    let mut l = spawn_local(&args);
    let deadline = Instant::now() + Duration::from_secs(90);
    let epoch = loop {
        if let Some(e) = latest(ck).filter(|&e| e >= 2) {
            break e;
        }
        assert!(
            l.0.try_wait().unwrap().is_none(),
            "pserv local ended before the checkpoint of epoch 2"
        );
        assert!(
            Instant::now() < deadline,
            "no checkpoint of epoch 2 within 90 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        l.0.try_wait().unwrap().is_none(),
        "the job was over before the crash"
    );
    let pid = l.0.id();
    let kids = children(pid);
    assert!(kids.len() >= 6, "scheduler, 3 servers, 2 workers: {kids:?}");
    sigkill(pid);
    for k in &kids {
        sigkill(*k);
    }
    let _ = l.0.wait();
    // Every one of them is gone (zombies reaped by init count as gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    while kids.iter().any(|k| {
        std::fs::read_to_string(format!("/proc/{k}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    }) {
        assert!(
            Instant::now() < deadline,
            "processes survived SIGKILL: {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "SIGKILLed pserv local (pid {pid}) and its processes {kids:?} after checkpoint {epoch}"
    );
    epoch
}

#[test]
fn a_job_killed_after_a_checkpoint_and_restored_ends_with_the_model_of_a_clean_run() {
    let dir = Scratch::new("ckpt-restore");
    let clean = run(&job(3, &[]), &dir.path("clean"));
    let reference = common::merged_model(&dir.path("clean"));
    let ck = dir.path("ck");
    let epoch = crash_after_checkpoint_2(&ck);
    assert!((2..4).contains(&epoch), "checkpoint {epoch} of 4 epochs");
    let restore = flag("restore", ck.display());
    // The same command line, with --restore.
    let same = job(
        3,
        &[
            flag("checkpoint-every", 1),
            flag("checkpoint-dir", ck.display()),
            restore.clone(),
        ],
    );
    let restored = run(&same, &dir.path("restored"));
    let train = clean["train_examples"].as_u64().unwrap();
    assert_eq!(
        restored["examples"].as_u64().unwrap(),
        train * (4 - epoch),
        "the restored run trains only the epochs after the checkpoint: {restored}"
    );
    let after: Vec<u64> = serde_json::from_value(restored["checkpoints"].clone()).unwrap();
    assert_eq!(after, ((epoch + 1)..=4).collect::<Vec<_>>(), "{restored}");
    let (same_w, total, rel) = compare(&reference, &common::merged_model(&dir.path("restored")));
    eprintln!(
        "restored with 3 servers: {same_w} of {total} weights bitwise equal, relative L2 {rel:.2e}"
    );
    assert_eq!(same_w, total, "relative L2 distance {rel:.2e}");
    assert_eq!(clean["test_logloss"], restored["test_logloss"]);

    // Another number of servers: the ranges are re-placed, each key's updates still apply
    // in the same (clock, rank) order, so the model is the same bit for bit.
    // (From the checkpoint the crash left: the restored run wrote newer ones since.)
    let at = ck.join(format!("epoch-{epoch}"));
    let restore = flag("restore", at.display());
    let two = run(&job(2, std::slice::from_ref(&restore)), &dir.path("two"));
    let (same_w, total, rel) = compare(&reference, &common::merged_model(&dir.path("two")));
    eprintln!(
        "restored with 2 servers: {same_w} of {total} weights bitwise equal, relative L2 {rel:.2e}"
    );
    assert_eq!(same_w, total, "relative L2 distance {rel:.2e}");
    assert_eq!(two["servers"], 2);

    // Into a replicated cluster: heads and replicas load their ranges (the merged model
    // checks that replicas agree).
    let mut replicated = job(3, std::slice::from_ref(&restore));
    replicated.push("--replicas=1".into());
    run(&replicated, &dir.path("replicated"));
    let (same_w, total, rel) = compare(&reference, &common::merged_model(&dir.path("replicated")));
    assert_eq!(same_w, total, "replicated: relative L2 distance {rel:.2e}");

    // A flipped byte in a server file: refused before any process starts, naming it.
    let file = at.join("server-1.ckpt");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let out = common::pserv_cmd()
        .arg("local")
        .args(job(3, std::slice::from_ref(&restore)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("corrupted"),
        "{err}"
    );
    // A job whose flags differ from the checkpoint's is refused with what differs.
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let other: Vec<String> = job(3, &[restore])
        .into_iter()
        .map(|a| if a == "--lr=1" { "--lr=2".into() } else { a })
        .collect();
    let out = common::pserv_cmd()
        .arg("local")
        .args(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lr: 1 in the checkpoint, 2 here"), "{err}");
}

/// The launcher's run folder (`$TMPDIR/pserv-local-PID-*`) and the scheduler's address
/// in it.
fn scheduler_addr(launcher: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("pserv-local-{launcher}-")) {
                let p: PathBuf = e.path().join("scheduler.addr");
                if let Ok(s) = std::fs::read_to_string(&p) {
                    if !s.trim().is_empty() {
                        return s.trim().to_string();
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no scheduler address");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pserv_checkpoint_asks_a_running_job_for_one() {
    let dir = Scratch::new("ckpt-ask");
    let summary = dir.path("summary.json");
    let mut args = job(2, &[flag("summary-json", summary.display())]);
    args.push("--slow-worker=*:4".into());
    let mut l = spawn_local(&args);
    let addr = scheduler_addr(l.0.id());
    let ck = dir.path("asked");
    let out = common::pserv_cmd()
        .args(["checkpoint", &format!("--scheduler={addr}")])
        .arg(&ck)
        .arg("--timeout-secs=60")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("checkpoint of epoch"), "{said}");
    let epoch = latest(&ck).expect("latest written");
    let c = pserv_engine::checkpoint::Checkpoint::open(&ck).unwrap();
    assert_eq!(c.manifest.epoch, epoch);
    assert_eq!(c.manifest.files.len(), 2, "one file per server");
    let keys: u64 = c.parts().unwrap().iter().map(|p| p.keys.len() as u64).sum();
    assert!(keys > 5000, "{keys} keys");
    let deadline = Instant::now() + Duration::from_secs(90);
    let st = loop {
        if let Some(st) = l.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the job did not finish");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["checkpoints"], serde_json::json!([epoch]), "{s}");
    // Asked once the job is over: refused with the reason, or no scheduler to ask.
    let out = common::pserv_cmd()
        .args(["checkpoint", &format!("--scheduler={addr}")])
        .arg(&ck)
        .arg("--timeout-secs=5")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

const ADAGRAD: &str = "adagrad:0.5:0.00000001";

/// A checkpoint written with the library as the servers and the scheduler write one:
/// `keys` split over two server files, weight `i / 1000` and AdaGrad state `1 + i / 100`
/// for the `i`-th key.
fn crafted_checkpoint(root: &Path, keys: &[u64]) {
    use pserv_engine::checkpoint::{self as ck, format, FileEntry, Manifest, ServerPart};
    let dir = root.join(ck::epoch_dir_name(3));
    ck::create_dir(&dir).unwrap();
    let half = keys.len() / 2;
    let mut files = Vec::new();
    for (rank, range) in [(0u32, 0..half), (1, half..keys.len())] {
        let w: Vec<f32> = range.clone().map(|i| i as f32 / 1000.0).collect();
        let n: Vec<f32> = range.clone().map(|i| 1.0 + i as f32 / 100.0).collect();
        let part = ServerPart {
            elem_bytes: 4,
            value_len: 1,
            state_len: 1,
            epoch: 3,
            rank,
            keys: keys[range].to_vec(),
            weights: w.iter().flat_map(|x| x.to_le_bytes()).collect(),
            state: n.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let bytes = part.encode();
        let name = ck::server_file_name(rank);
        ck::write_atomic(&dir.join(&name), &bytes).unwrap();
        files.push(FileEntry {
            rank,
            name,
            bytes: bytes.len() as u64,
            checksum: format::checksum(&bytes),
            keys: part.keys.len() as u64,
            state_len: 1,
        });
    }
    let manifest = Manifest {
        version: ck::MANIFEST_VERSION,
        epoch: 3,
        value_type: pserv_engine::proto::ValueType::F32,
        value_len: 1,
        update: ADAGRAD.into(),
        state_len: 1,
        replicas: 0,
        partition: pserv_engine::Partition::even(2),
        job: None,
        files,
    };
    ck::commit(root, &manifest).unwrap();
}

/// Servers started by hand with `--restore` hold the checkpoint's weights and optimizer
/// state, wherever the new table puts each key (two files, three servers with replicas);
/// a corrupted file stops the server that reads it with an error naming the file, and a
/// scheduler of another value length refuses the checkpoint.
#[test]
fn servers_started_by_hand_restore_weights_and_state_onto_a_new_table() {
    let dir = Scratch::new("ckpt-hand");
    let root = dir.path("ck");
    let keys = common::spread_keys(3000, 5);
    crafted_checkpoint(&root, &keys);
    let restore = flag("restore", root.display());
    let update = flag("update", ADAGRAD);
    let c = common::Cluster::start_with(3, 1, &[&update, &restore, "--replicas=1"], &[&restore]);
    let w = common::worker(&c, 0, Duration::from_secs(30));
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    let want: Vec<f32> = (0..keys.len()).map(|i| i as f32 / 1000.0).collect();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "restored weights differ"
    );
    // The state came along: one step of AdaGrad from it (not from n = 0).
    w.wait(w.push(keys.clone(), vec![1.0f32; keys.len()]))
        .unwrap();
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    for (i, g) in got.iter().enumerate() {
        let n = 1.0 + i as f32 / 100.0 + 1.0;
        let want = i as f32 / 1000.0 - 0.5f32 * 1.0 / (n.sqrt() + 1e-8f32);
        assert_eq!(g.to_bits(), want.to_bits(), "key {i}: {g} != {want}");
    }
    w.finish(0).unwrap();
    drop(c);

    // Another value length: the scheduler refuses at once, naming the flag.
    let out = common::pserv_cmd()
        .args([
            "scheduler",
            "--listen=127.0.0.1:0",
            "--servers=1",
            "--workers=1",
        ])
        .args([&update, &restore, "--value-len=2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--value-len") && err.contains("manifest"),
        "{err}"
    );

    // A flipped bit: the scheduler reads only the manifest, the server every file.
    let file = root.join("epoch-3").join("server-1.ckpt");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let mut c = common::Cluster::scheduler_only(1, 1, &[&update, &restore]);
    // The servers are welcomed (and restore) once the worker registered too.
    let mut wa = vec!["worker".to_string(), format!("--scheduler={}", c.scheduler)];
    wa.extend(common::net_flags());
    c.procs.spawn("worker 0", &wa);
    let mut a = vec![
        "server".to_string(),
        format!("--scheduler={}", c.scheduler),
        restore.clone(),
    ];
    a.extend(common::net_flags());
    let out = common::pserv_cmd().args(&a).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("corrupted"),
        "{err}"
    );
}

/// Under bounded delay (not deterministic: no bitwise claim) a finished job's checkpoint
/// resumes with more epochs: the restored run trains only the new ones, from the
/// checkpoint's model (its first held-out loss is already that of a trained model), and
/// checkpoints them on the same schedule.
#[test]
fn a_bounded_delay_job_resumes_from_a_checkpoint_with_more_epochs() {
    let dir = Scratch::new("ckpt-more");
    let ck = dir.path("ck");
    let base = |epochs: u32, extra: &[String]| -> Vec<String> {
        job(2, extra)
            .into_iter()
            .map(|a| match a.as_str() {
                "--consistency=sequential" => "--consistency=bounded:1".into(),
                "--epochs=4" => format!("--epochs={epochs}"),
                // A rate at which the held-out loss falls every epoch.
                "--lr=1" => "--lr=0.05".into(),
                _ => a,
            })
            .collect()
    };
    let every = [
        flag("checkpoint-every", "2e"),
        flag("checkpoint-dir", ck.display()),
    ];
    let first = run(&base(3, &every), &dir.path("first"));
    assert_eq!(first["checkpoints"], serde_json::json!([2]), "{first}");
    let curve = |s: &serde_json::Value| -> Vec<f64> {
        s["eval_curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect()
    };
    let fresh_loss = curve(&first)[0];
    let first_epoch3 = curve(&first)[2];
    let mut more = every.to_vec();
    more.push(flag("restore", ck.display()));
    let resumed = run(&base(6, &more), &dir.path("resumed"));
    let train = first["train_examples"].as_u64().unwrap();
    assert_eq!(
        resumed["examples"].as_u64().unwrap(),
        train * 4,
        "epochs 3 to 6"
    );
    assert_eq!(
        resumed["checkpoints"],
        serde_json::json!([4, 6]),
        "{resumed}"
    );
    let resumed_first = curve(&resumed)[0];
    let loss = resumed["test_logloss"].as_f64().unwrap();
    eprintln!(
        "held-out logloss: {:?} (first run), {:?} (resumed after epoch 2)",
        curve(&first),
        curve(&resumed)
    );
    // Epoch 3 resumed from the checkpoint is epoch 3 of the first run, up to the
    // bounded-delay interleaving; a run from scratch would be at its epoch-1 loss.
    assert!(
        (resumed_first - first_epoch3).abs() < (fresh_loss - first_epoch3) / 4.0,
        "the resumed run starts from the trained model"
    );
    assert!(loss.is_finite() && loss < 0.69, "{resumed}");
}
