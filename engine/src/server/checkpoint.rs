//! A server's side of checkpoints: write the keys it heads (values and update-rule
//! state, as the store holds them) into its checkpoint file, and load, at start-up, every
//! key of the ranges it holds under the new routing table from all the files of a
//! checkpoint.
//!
//! Writing happens on the control thread while the scheduler holds an epoch barrier: no
//! worker pushes then, so the file is a consistent cut of this server's ranges.

use std::path::Path;

use crate::base::error::EngineError;
use crate::base::keys::KeyRange;
use crate::checkpoint::{self, Checkpoint, FileEntry, ServerPart};
use crate::proto::ReplicaPart;

use super::handler::entries;
use super::Ready;

/// Keys installed per store request on restore (bounds the copies made).
const INSTALL_CHUNK: usize = 1 << 16;

/// Write `dir/server-RANK.ckpt` (atomically) with every stored key of the ranges this
/// server heads under its current table; returns the file as the manifest lists it.
pub(super) fn write_part(ready: &Ready, dir: &Path, epoch: u64) -> Result<FileEntry, String> {
    let ranges: Vec<KeyRange> = ready.table.read().ranges_of(ready.rank as usize);
    let store = entries(ready);
    let keys = store.stored_keys(&ranges);
    let (weights, state) = if keys.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        store.read_keys(&keys)
    };
    let (vl, sl, eb) = store.shape();
    let part = ServerPart {
        elem_bytes: eb as u32,
        value_len: vl as u32,
        state_len: sl as u32,
        epoch,
        rank: ready.rank,
        keys,
        weights,
        state,
    };
    let bytes = part.encode();
    let name = checkpoint::server_file_name(ready.rank);
    checkpoint::create_dir(dir)
        .and_then(|()| checkpoint::write_atomic(&dir.join(&name), &bytes))
        .map_err(|e| e.to_string())?;
    Ok(FileEntry {
        rank: ready.rank,
        name,
        bytes: bytes.len() as u64,
        checksum: checkpoint::format::checksum(&bytes),
        keys: part.keys.len() as u64,
        state_len: part.state_len,
    })
}

/// Load the checkpoint `dir` names into this server's store: every key of every server
/// file that falls in a range whose chain (head or replica) holds this server under its
/// table. Refuses (before installing anything: every file is read and verified first) a
/// checkpoint that fails verification or whose shape is not this store's. Returns the keys installed.
pub(super) fn restore(
    ready: &Ready,
    dir: &Path,
    cluster: &crate::proto::ClusterInfo,
) -> Result<u64, EngineError> {
    let ck = Checkpoint::open_manifest(dir)?;
    ck.check_cluster(cluster.value_type, cluster.value_len, &cluster.update)?;
    let store = entries(ready);
    let (vl, sl, eb) = store.shape();
    let m = &ck.manifest;
    if (m.value_len as usize, m.state_len as usize) != (vl, sl) {
        return Err(ck
            .mismatch(format!(
                "{} values and {} state elements per key in the checkpoint, {vl} and {sl} in \
                 this server's store (another --value-len or update rule)",
                m.value_len, m.state_len
            ))
            .into());
    }
    // Every file is verified before anything is installed; then one file is in memory
    // at a time (each is verified again as it is decoded).
    ck.verify_files()?;
    let table = ready.table.read().clone();
    let me = ready.rank;
    let mine: Vec<KeyRange> = table
        .ranges()
        .iter()
        .zip(table.owners())
        .zip(table.followers())
        .filter(|((_, &o), f)| o == me || f.contains(&me))
        .map(|((r, _), _)| *r)
        .collect();
    let mut installed = 0u64;
    for f in &m.files {
        let p = &ck.part(f)?;
        let (w_per, s_per) = (vl * eb, sl * eb);
        let mut keys = Vec::new();
        let mut weights = Vec::new();
        let mut state = Vec::new();
        let flush = |keys: &mut Vec<u8>, weights: &mut Vec<u8>, state: &mut Vec<u8>| {
            if keys.is_empty() {
                return Ok(());
            }
            let part = ReplicaPart::Keys {
                keys: std::mem::take(keys),
                weights: std::mem::take(weights),
                state: std::mem::take(state),
            };
            store.install(&part).map_err(|e| {
                EngineError::Config(format!(
                    "restoring {} (server {}'s file): {e}",
                    ck.dir.display(),
                    p.rank
                ))
            })
        };
        for (i, &k) in p.keys.iter().enumerate() {
            let r = mine.partition_point(|r| r.end <= k);
            if !mine.get(r).is_some_and(|r| r.contains(k)) {
                continue;
            }
            keys.extend_from_slice(&k.to_le_bytes());
            weights.extend_from_slice(&p.weights[i * w_per..(i + 1) * w_per]);
            state.extend_from_slice(&p.state[i * s_per..(i + 1) * s_per]);
            installed += 1;
            if keys.len() / 8 >= INSTALL_CHUNK {
                flush(&mut keys, &mut weights, &mut state)?;
            }
        }
        flush(&mut keys, &mut weights, &mut state)?;
    }
    Ok(installed)
}
