use std::path::{Path, PathBuf};

use super::*;

fn part(rank: u32, keys: Vec<u64>) -> ServerPart {
    let n = keys.len();
    let weights: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
    let state: Vec<f32> = (0..n).map(|i| (i * i) as f32 + 0.25).collect();
    ServerPart {
        elem_bytes: 4,
        value_len: 1,
        state_len: 1,
        epoch: 2,
        rank,
        keys,
        weights: bytemuck::cast_slice(&weights).to_vec(),
        state: bytemuck::cast_slice(&state).to_vec(),
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d =
            std::env::temp_dir().join(format!("pserv-ckpt-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_server_file_round_trips() {
    let p = part(3, vec![1, 5, 9, 1 << 40, u64::MAX - 1]);
    let bytes = p.encode();
    assert_eq!(
        bytes.len(),
        format::HEADER_LEN + 5 * (8 + 4 + 4) + format::TRAILER_LEN
    );
    assert_eq!(format::decode(Path::new("x"), &bytes).unwrap(), p);
    let empty = part(0, vec![]);
    assert_eq!(
        format::decode(Path::new("x"), &empty.encode()).unwrap(),
        empty
    );
}

#[test]
fn a_truncated_server_file_is_refused_at_every_length() {
    let bytes = part(1, vec![2, 4, 6, 8]).encode();
    for len in 0..bytes.len() {
        let e = format::decode(Path::new("/ck/server-1.ckpt"), &bytes[..len]).unwrap_err();
        let s = e.to_string();
        assert!(
            matches!(e, CheckpointError::Truncated { .. }),
            "length {len}: {s}"
        );
        assert!(
            s.contains("/ck/server-1.ckpt") && s.contains("truncated"),
            "{s}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let e = format::decode(Path::new("f"), &longer).unwrap_err();
    assert!(matches!(e, CheckpointError::Malformed { .. }), "{e}");
}

#[test]
fn every_flipped_bit_of_a_server_file_is_refused() {
    let bytes = part(1, vec![2, 4, 6]).encode();
    for i in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        let e = format::decode(Path::new("/ck/server-1.ckpt"), &b)
            .expect_err(&format!("bit {i} flipped was accepted"));
        assert!(e.to_string().contains("/ck/server-1.ckpt"), "{e}");
    }
}

#[test]
fn a_header_that_claims_too_much_is_refused_without_allocating() {
    let mut b = part(0, vec![]).encode();
    b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = format::decode(Path::new("f"), &b).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    b[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = format::decode(Path::new("f"), &b).unwrap_err();
    assert!(matches!(e, CheckpointError::Truncated { .. }), "{e}");
}

#[test]
fn unsorted_keys_with_a_good_checksum_are_refused() {
    let mut p = part(0, vec![5, 3]);
    let bytes = p.encode();
    assert!(format::decode(Path::new("f"), &bytes)
        .unwrap_err()
        .to_string()
        .contains("not ascending"));
    p.keys = vec![1, u64::MAX];
    let e = format::decode(Path::new("f"), &p.encode()).unwrap_err();
    assert!(e.to_string().contains("reserved key"), "{e}");
}

fn manifest(files: Vec<FileEntry>) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        epoch: 2,
        value_type: ValueType::F32,
        value_len: 1,
        update: UpdateSpec::Adagrad { lr: 0.3, eps: 1e-8 }.to_string(),
        state_len: 1,
        replicas: 0,
        partition: Partition::even(2),
        job: Some(serde_json::json!({"seed": "5", "lr": "1"})),
        files,
    }
}

/// Write a two-server checkpoint under `root` as the scheduler and servers do.
fn write_checkpoint(root: &Path) -> Manifest {
    let dir = root.join(epoch_dir_name(2));
    create_dir(&dir).unwrap();
    let mut files = Vec::new();
    for (rank, keys) in [(0u32, vec![1u64, 2, 3]), (1, vec![1 << 63, (1 << 63) + 7])] {
        let p = part(rank, keys);
        let bytes = p.encode();
        let name = server_file_name(rank);
        write_atomic(&dir.join(&name), &bytes).unwrap();
        files.push(FileEntry {
            rank,
            name,
            bytes: bytes.len() as u64,
            checksum: format::checksum(&bytes),
            keys: p.keys.len() as u64,
            state_len: p.state_len,
        });
    }
    let m = manifest(files);
    commit(root, &m).unwrap();
    m
}

#[test]
fn a_checkpoint_round_trips_through_latest_and_its_own_folder() {
    let d = Dir::new("roundtrip");
    let m = write_checkpoint(&d.0);
    assert_eq!(
        std::fs::read_to_string(d.0.join(LATEST)).unwrap(),
        "epoch-2\n"
    );
    for at in [d.0.clone(), d.0.join("epoch-2")] {
        let ck = Checkpoint::open(&at).unwrap();
        assert_eq!(ck.manifest, m);
        let parts = ck.parts().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].keys, vec![1 << 63, (1 << 63) + 7]);
    }
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(d.0.join("epoch-2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn a_corrupted_or_truncated_checkpoint_is_refused_naming_the_file() {
    let d = Dir::new("corrupt");
    write_checkpoint(&d.0);
    let file = d.0.join("epoch-2").join(server_file_name(1));
    let good = std::fs::read(&file).unwrap();
    let mut flipped = good.clone();
    flipped[60] ^= 0x10;
    std::fs::write(&file, &flipped).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("corrupted") && e.contains(&file.display().to_string()),
        "{e}"
    );
    std::fs::write(&file, &good[..good.len() - 3]).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains(&file.display().to_string()),
        "{e}"
    );
    std::fs::remove_file(&file).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    std::fs::write(&file, &good).unwrap();
    Checkpoint::open(&d.0).unwrap();
    // The manifest: one byte changed, cut short, gone.
    let mpath = d.0.join("epoch-2").join(MANIFEST);
    let mbytes = std::fs::read(&mpath).unwrap();
    let mut m2 = mbytes.clone();
    let at = m2.len() - 10;
    m2[at] ^= 0x01;
    std::fs::write(&mpath, &m2).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("corrupted") && e.contains(&mpath.display().to_string()),
        "{e}"
    );
    std::fs::write(&mpath, &mbytes[..mbytes.len() / 2]).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::remove_file(&mpath).unwrap();
    let e = Checkpoint::open(&d.0).unwrap_err().to_string();
    assert!(e.contains("no manifest"), "{e}");
    let e = Checkpoint::open(&d.0.join("nothing"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no checkpoint at") && e.contains("neither"),
        "{e}"
    );
}

#[test]
fn a_cluster_or_job_that_does_not_fit_is_refused_with_what_differs() {
    let d = Dir::new("mismatch");
    write_checkpoint(&d.0);
    let ck = Checkpoint::open(&d.0).unwrap();
    let rule = UpdateSpec::Adagrad { lr: 0.3, eps: 1e-8 };
    ck.check_cluster(ValueType::F32, 1, &rule).unwrap();
    let e = ck
        .check_cluster(ValueType::F32, 2, &UpdateSpec::Sgd { lr: 1.0 })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--value-len") && e.contains("update rule"),
        "{e}"
    );
    assert!(e.contains("manifest"), "{e}");
    let flags = |lr: &str| {
        [("seed", "5"), ("lr", lr)]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into_iter()
            .collect()
    };
    ck.check_job(&flags("1")).unwrap();
    let e = ck.check_job(&flags("2")).unwrap_err().to_string();
    assert!(e.contains("--lr: 1 in the checkpoint, 2 here"), "{e}");
}

#[test]
fn every_parses_epochs_and_seconds() {
    assert_eq!("3".parse::<Every>(), Ok(Every::Epochs(3)));
    assert_eq!("2e".parse::<Every>(), Ok(Every::Epochs(2)));
    assert_eq!("30s".parse::<Every>(), Ok(Every::Secs(30)));
    assert!("0".parse::<Every>().is_err());
    assert!("x".parse::<Every>().is_err());
    for e in [Every::Epochs(4), Every::Secs(9)] {
        assert_eq!(e.to_string().parse::<Every>(), Ok(e));
    }
}

#[test]
fn job_flags_leave_out_what_does_not_change_the_model() {
    let args: Vec<String> = ["--seed=5", "--epochs=4", "--key-cache", "--lr=1"]
        .map(String::from)
        .to_vec();
    let f = job_flags(&args, &["epochs"]);
    assert_eq!(f.len(), 3);
    assert_eq!(f["key-cache"], "true");
    assert!(!f.contains_key("epochs"));
}
