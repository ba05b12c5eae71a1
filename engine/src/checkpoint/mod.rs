//! Checkpoints: a consistent snapshot of every server's ranges (weights and update-rule
//! state) and the routing table, taken at an epoch barrier of the job, and a cluster
//! started from one (`--restore DIR`).
//!
//! On disk, under the checkpoint folder `DIR`:
//!
//! ```text
//! DIR/latest                   "epoch-E": the newest complete checkpoint (written last)
//! DIR/epoch-E/server-R.ckpt    the keys server R headed, values and state (format.rs)
//! DIR/epoch-E/manifest         epoch, routing table, update rule, shape, job flags, and
//!                              every server file with its length and checksum
//! ```
//!
//! Who does what: the scheduler decides when (`--checkpoint-every`, or a
//! `pserv checkpoint` request, at the next epoch barrier), holds that barrier, asks every
//! server that heads a range to write its file (`Control::CheckpointWrite`), waits for
//! all of them (bounded), writes the manifest and then `latest`, and only then releases
//! the barrier (`scheduler/checkpoint.rs`). Every file is written atomically (a temporary
//! file, fsync, rename, fsync of the folder: [`write_atomic`]), so a crash leaves the
//! previous checkpoint whole; a checkpoint without its manifest does not exist.
//!
//! Restoring ([`Checkpoint::open`] verifies everything first): servers load every key of
//! the ranges they hold under the new table from all server files (so the number of
//! servers may differ), the scheduler numbers epochs from the checkpoint's, and the job's
//! workers start at epoch E + 1 after checking that the job's flags are the checkpoint's.
//!
//! Invariant: a checkpoint is read only after its manifest's checksum, every listed
//! file's length and checksum, and the shape (element type, values per key, update rule)
//! were checked; anything else is refused with an error naming the file.

pub mod format;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::base::error::EngineError;
use crate::placement::Partition;
use crate::proto::ValueType;
use crate::update::UpdateSpec;

pub use format::ServerPart;

/// The manifest's file name inside an epoch folder.
pub const MANIFEST: &str = "manifest";
/// The pointer to the newest checkpoint inside a checkpoint folder.
pub const LATEST: &str = "latest";
/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// How long the scheduler waits for every server's file before it gives the checkpoint
/// up (naming the servers that did not answer) and releases the barrier.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What is wrong with a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No manifest where one was looked for.
    #[error("no checkpoint at {dir}: {why}")]
    Missing {
        /// The folder given.
        dir: String,
        /// What was looked for.
        why: String,
    },
    /// A file could not be read or written.
    #[error("checkpoint file {file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is shorter than it says.
    #[error("checkpoint file {file} is truncated: {have} bytes, {want} expected")]
    Truncated {
        /// The file.
        file: String,
        /// Its length.
        have: u64,
        /// The length its header (or the manifest) says.
        want: u64,
    },
    /// A file's bytes do not match its checksum.
    #[error(
        "checkpoint file {file} is corrupted: checksum {computed:016x}, expected {stored:016x}"
    )]
    Checksum {
        /// The file.
        file: String,
        /// The checksum written with it.
        stored: u64,
        /// The checksum of its bytes now.
        computed: u64,
    },
    /// A file is not what it should be.
    #[error("checkpoint file {file} is malformed: {why}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// The checkpoint does not fit the cluster or job being started.
    #[error("the checkpoint {manifest} does not fit this run: {why}")]
    Mismatch {
        /// The manifest.
        manifest: String,
        /// What differs, and how.
        why: String,
    },
}

impl From<CheckpointError> for EngineError {
    fn from(e: CheckpointError) -> Self {
        EngineError::Config(e.to_string())
    }
}

/// `--checkpoint-every`: every N epochs (`N`, `Ne`) or at the first epoch barrier N
/// seconds after the previous checkpoint (`Ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Every {
    /// Every this many epochs (at the barriers of epochs N, 2N, ...).
    Epochs(u64),
    /// At the first epoch barrier at least this many seconds after the last checkpoint
    /// (or the start).
    Secs(u64),
}

impl std::str::FromStr for Every {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, secs) = match s.strip_suffix('s') {
            Some(n) => (n, true),
            None => (s.strip_suffix('e').unwrap_or(s), false),
        };
        let n: u64 = num.parse().map_err(|_| {
            format!("{s:?}: expected N or Ne (every N epochs) or Ns (every N seconds)")
        })?;
        if n == 0 {
            return Err(format!("{s:?}: must be at least 1"));
        }
        Ok(if secs {
            Every::Secs(n)
        } else {
            Every::Epochs(n)
        })
    }
}

impl std::fmt::Display for Every {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Every::Epochs(n) => write!(f, "{n}e"),
            Every::Secs(n) => write!(f, "{n}s"),
        }
    }
}

/// The scheduler's checkpoint flags (`pserv scheduler`, `pserv local`).
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct CheckpointArgs {
    /// Write a checkpoint to --checkpoint-dir every N epochs (`N` or `Ne`) or at the
    /// first epoch barrier N seconds after the previous one (`Ns`).
    #[arg(long, env = "PSERV_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<Every>,
    /// Where --checkpoint-every writes (DIR/epoch-E/..., DIR/latest).
    #[arg(long, env = "PSERV_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
}

impl CheckpointArgs {
    /// Refuse flags that cannot work together.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.checkpoint_every.is_some() && self.checkpoint_dir.is_none() {
            return Err(EngineError::Config(
                "--checkpoint-every needs --checkpoint-dir (where the checkpoints go)".into(),
            ));
        }
        Ok(())
    }

    /// These flags for a child's command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(e) = self.checkpoint_every {
            a.push(format!("--checkpoint-every={e}"));
        }
        if let Some(d) = &self.checkpoint_dir {
            a.push(format!("--checkpoint-dir={}", d.display()));
        }
        a
    }
}

/// `--restore DIR` for the scheduler and the servers (workers take it from the job's
/// flags).
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct RestoreArgs {
    /// Start from the checkpoint in DIR (its `latest`, or DIR itself when it holds a
    /// manifest).
    #[arg(long, env = "PSERV_RESTORE")]
    pub restore: Option<PathBuf>,
}

/// A server's file as the manifest lists it (and as the server reports it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The server that wrote it.
    pub rank: u32,
    /// Its name inside the epoch folder.
    pub name: String,
    /// Its length.
    pub bytes: u64,
    /// The xxh3-64 of its bytes.
    pub checksum: u64,
    /// The keys it holds.
    pub keys: u64,
    /// Update-rule state elements per key.
    pub state_len: u32,
}

/// What a checkpoint is: written last, after every server file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The job epoch after whose barrier it was taken (training resumes at epoch + 1).
    pub epoch: u64,
    /// The element type of the values.
    pub value_type: ValueType,
    /// Values per key.
    pub value_len: u32,
    /// The servers' default update rule, as `--update` takes it (a string: its numbers
    /// are compared as written, with no JSON float round trip).
    pub update: String,
    /// Update-rule state elements per key in the files.
    pub state_len: u32,
    /// Replicas per range after the head.
    pub replicas: u32,
    /// The routing table at the checkpoint.
    pub partition: Partition,
    /// The job's model-defining flags, as its worker 0 reported them (`null` when no
    /// worker did).
    pub job: Option<serde_json::Value>,
    /// Every server file.
    pub files: Vec<FileEntry>,
}

/// The folder name of epoch `epoch`'s checkpoint.
pub fn epoch_dir_name(epoch: u64) -> String {
    format!("epoch-{epoch}")
}

/// The file name of server `rank`'s part.
pub fn server_file_name(rank: u32) -> String {
    format!("server-{rank}.ckpt")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        file: path.display().to_string(),
        source,
    }
}

/// Write `bytes` to `path` atomically: into a temporary file next to it, fsync, rename
/// over `path`, fsync the folder. A reader sees the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io_err(path))
}

/// Create `dir` (and its parents).
pub fn create_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

const MANIFEST_HEAD: &str = "pserv-checkpoint-manifest";

/// The manifest's bytes: a first line with the format, the version, the JSON body's
/// length and checksum, then the JSON body.
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(m).expect("a manifest encodes");
    let mut out = format!(
        "{MANIFEST_HEAD} v{MANIFEST_VERSION} bytes={} xxh3={:016x}\n",
        body.len(),
        format::checksum(&body)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Decode and verify a manifest's bytes (`path` is named in every error).
pub fn decode_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, CheckpointError> {
    let file = path.display().to_string();
    let malformed = |why: String| CheckpointError::Malformed {
        file: file.clone(),
        why,
    };
    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(
            if bytes.starts_with(MANIFEST_HEAD.as_bytes()) || bytes.is_empty() {
                CheckpointError::Truncated {
                    file: file.clone(),
                    have: bytes.len() as u64,
                    want: bytes.len() as u64 + 1,
                }
            } else {
                malformed("not a pserv checkpoint manifest".into())
            },
        );
    };
    let head = std::str::from_utf8(&bytes[..nl])
        .map_err(|_| malformed("not a pserv checkpoint manifest".into()))?;
    let parts: Vec<&str> = head.split(' ').collect();
    if parts.len() != 4 || parts[0] != MANIFEST_HEAD {
        return Err(malformed(format!(
            "not a pserv checkpoint manifest (first line {head:?})"
        )));
    }
    if parts[1] != format!("v{MANIFEST_VERSION}") {
        return Err(malformed(format!(
            "manifest version {}; this build reads v{MANIFEST_VERSION}",
            parts[1]
        )));
    }
    let field = |p: &str, key: &str, radix: u32| {
        p.strip_prefix(key)
            .and_then(|v| u64::from_str_radix(v, radix).ok())
            .ok_or_else(|| malformed(format!("bad first line {head:?}")))
    };
    let len = field(parts[2], "bytes=", 10)?;
    let stored = field(parts[3], "xxh3=", 16)?;
    let body = &bytes[nl + 1..];
    if (body.len() as u64) < len {
        return Err(CheckpointError::Truncated {
            file,
            have: bytes.len() as u64,
            want: (nl + 1) as u64 + len,
        });
    }
    if body.len() as u64 > len {
        return Err(malformed(format!(
            "{} bytes after the {len} its first line announces",
            body.len() as u64 - len
        )));
    }
    let computed = format::checksum(body);
    if computed != stored {
        return Err(CheckpointError::Checksum {
            file,
            stored,
            computed,
        });
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if m.version != MANIFEST_VERSION {
        return Err(malformed(format!("manifest version {}", m.version)));
    }
    Ok(m)
}

/// A verified checkpoint: its folder and manifest.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The epoch folder (holding the manifest and the server files).
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Find the checkpoint `dir` names (`dir/latest`'s folder, or `dir` itself when it
    /// holds a manifest) and verify its manifest and the length and checksum of every
    /// server file it lists.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let ck = Self::open_manifest(dir)?;
        ck.verify_files()?;
        Ok(ck)
    }

    /// Check the length and checksum of every server file the manifest lists (one file
    /// in memory at a time).
    pub fn verify_files(&self) -> Result<(), CheckpointError> {
        for f in &self.manifest.files {
            self.read_file(f)?;
        }
        Ok(())
    }

    /// [`open`](Self::open) without reading the server files: only the manifest is
    /// verified (what the scheduler and the workers need; the servers verify every file
    /// they load, [`parts`](Self::parts)).
    pub fn open_manifest(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let dir = resolve(dir)?;
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let manifest = decode_manifest(&path, &bytes)?;
        Ok(Checkpoint { dir, manifest })
    }

    /// The manifest's path (for messages).
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST)
    }

    fn read_file(&self, f: &FileEntry) -> Result<Vec<u8>, CheckpointError> {
        if f.name.contains('/') || f.name.starts_with('.') {
            return Err(CheckpointError::Malformed {
                file: self.manifest_path().display().to_string(),
                why: format!("lists a file outside its folder: {:?}", f.name),
            });
        }
        let path = self.dir.join(&f.name);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let file = path.display().to_string();
        if (bytes.len() as u64) < f.bytes {
            return Err(CheckpointError::Truncated {
                file,
                have: bytes.len() as u64,
                want: f.bytes,
            });
        }
        if bytes.len() as u64 != f.bytes {
            return Err(CheckpointError::Malformed {
                file,
                why: format!("{} bytes, the manifest says {}", bytes.len(), f.bytes),
            });
        }
        let computed = format::checksum(&bytes);
        if computed != f.checksum {
            return Err(CheckpointError::Checksum {
                file,
                stored: f.checksum,
                computed,
            });
        }
        Ok(bytes)
    }

    /// Every server file, decoded and checked against the manifest (epoch, shape).
    pub fn parts(&self) -> Result<Vec<ServerPart>, CheckpointError> {
        self.manifest.files.iter().map(|f| self.part(f)).collect()
    }

    /// One server file of the manifest, read, verified (length, checksum) and decoded,
    /// and checked against the manifest (epoch, shape, key count).
    pub fn part(&self, f: &FileEntry) -> Result<ServerPart, CheckpointError> {
        let m = &self.manifest;
        let elem = match m.value_type {
            ValueType::F32 => 4,
            ValueType::F64 => 8,
        };
        let bytes = self.read_file(f)?;
        let path = self.dir.join(&f.name);
        let p = format::decode(&path, &bytes)?;
        let shape = (p.elem_bytes, p.value_len, p.state_len, p.epoch);
        let keys = p.keys.len() as u64;
        if shape != (elem, m.value_len, m.state_len, m.epoch) || keys != f.keys {
            return Err(CheckpointError::Malformed {
                file: path.display().to_string(),
                why: format!(
                    "holds {keys} keys of epoch {} ({} bytes per element, {} values and {} \
                     state elements per key); the manifest says {} keys of epoch {} \
                     ({elem}, {}, {})",
                    p.epoch,
                    p.elem_bytes,
                    p.value_len,
                    p.state_len,
                    f.keys,
                    m.epoch,
                    m.value_len,
                    m.state_len
                ),
            });
        }
        Ok(p)
    }

    /// Refuse a cluster that cannot hold this checkpoint's values: another element type,
    /// value length or update rule.
    pub fn check_cluster(
        &self,
        value_type: ValueType,
        value_len: u32,
        update: &UpdateSpec,
    ) -> Result<(), CheckpointError> {
        let m = &self.manifest;
        let mut why = Vec::new();
        if m.value_type != value_type {
            why.push(format!(
                "value type {:?} in the checkpoint, {value_type:?} here",
                m.value_type
            ));
        }
        if m.value_len != value_len {
            why.push(format!(
                "{} values per key in the checkpoint, {value_len} here (--value-len)",
                m.value_len
            ));
        }
        if m.update != update.to_string() {
            why.push(format!(
                "update rule `{}` in the checkpoint, `{update}` here",
                m.update
            ));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(self.mismatch(why.join("; ")))
        }
    }

    /// A mismatch error naming this checkpoint's manifest.
    pub fn mismatch(&self, why: String) -> CheckpointError {
        CheckpointError::Mismatch {
            manifest: self.manifest_path().display().to_string(),
            why,
        }
    }

    /// Refuse a job whose model-defining flags (`flags`, as [`job_flags`] reports them)
    /// differ from the checkpoint's.
    pub fn check_job(&self, flags: &BTreeMap<String, String>) -> Result<(), CheckpointError> {
        let Some(job) = &self.manifest.job else {
            return Ok(());
        };
        let theirs: BTreeMap<String, String> =
            serde_json::from_value(job.clone()).map_err(|e| CheckpointError::Malformed {
                file: self.manifest_path().display().to_string(),
                why: format!("its job flags: {e}"),
            })?;
        let mut why = Vec::new();
        for k in theirs.keys().chain(flags.keys()) {
            let (a, b) = (theirs.get(k), flags.get(k));
            if a != b
                && !why
                    .iter()
                    .any(|w: &String| w.starts_with(&format!("--{k}:")))
            {
                let show = |v: Option<&String>| v.map_or("(not set)".to_string(), |v| v.clone());
                why.push(format!(
                    "--{k}: {} in the checkpoint, {} here",
                    show(a),
                    show(b)
                ));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(self.mismatch(why.join("; ")))
        }
    }
}

/// The epoch folder `dir` names: `dir` itself when it holds a manifest, else the folder
/// `dir/latest` names.
pub fn resolve(dir: &Path) -> Result<PathBuf, CheckpointError> {
    if dir.join(MANIFEST).is_file() {
        return Ok(dir.to_path_buf());
    }
    let latest = dir.join(LATEST);
    match std::fs::read_to_string(&latest) {
        Ok(name) => {
            let name = name.trim();
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(CheckpointError::Malformed {
                    file: latest.display().to_string(),
                    why: format!("names {name:?}, not an epoch folder"),
                });
            }
            let d = dir.join(name);
            if !d.join(MANIFEST).is_file() {
                return Err(CheckpointError::Missing {
                    dir: dir.display().to_string(),
                    why: format!("{} names {name}, which has no {MANIFEST}", latest.display()),
                });
            }
            Ok(d)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CheckpointError::Missing {
            dir: dir.display().to_string(),
            why: format!("neither {MANIFEST} nor {LATEST} is there"),
        }),
        Err(source) => Err(CheckpointError::Io {
            file: latest.display().to_string(),
            source,
        }),
    }
}

/// Write `manifest` into `root/epoch-E/` and then point `root/latest` at it, both
/// atomically. Returns the epoch folder.
pub fn commit(root: &Path, manifest: &Manifest) -> Result<PathBuf, CheckpointError> {
    let name = epoch_dir_name(manifest.epoch);
    let dir = root.join(&name);
    write_atomic(&dir.join(MANIFEST), &encode_manifest(manifest))?;
    write_atomic(&root.join(LATEST), format!("{name}\n").as_bytes())?;
    Ok(dir)
}

/// The job flags a checkpoint records and a restore must match: `args` (a job's command
/// line, `--flag=value`) without those that do not change the model (`skip`).
pub fn job_flags(args: &[String], skip: &[&str]) -> BTreeMap<String, String> {
    args.iter()
        .filter_map(|a| {
            let a = a.strip_prefix("--")?;
            let (k, v) = a.split_once('=').unwrap_or((a, "true"));
            (!skip.contains(&k)).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}
