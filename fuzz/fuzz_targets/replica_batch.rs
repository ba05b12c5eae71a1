//! Replication batches (`Control::Replicate { batch }`: `ReplicaBatch`, `ReplicaPart`,
//! `PushRecord`) as a replica receives them: decoded from a control frame's values with
//! `Control::from_frame`, then run through what the replica does before and while it
//! applies one (`replication::receive_batch`: the late-batch check against ranges it took
//! over, installing each part into a store, recording its pushes, forwarding or
//! acknowledging it), once as a replica that took nothing over and once as one that took
//! ranges over at a newer table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_engine::proto::Control;
use pserv_engine::replication::receive_batch;
use pserv_engine::store::{Store, StoreConfig};
use pserv_engine::KeyRange;
use pserv_fuzz::control_from_values;

fuzz_target!(|data: &[u8]| {
    let Some(Control::Replicate { batch }) = control_from_values(data) else {
        return;
    };
    let cfg = StoreConfig {
        shards: 4,
        value_len: 2,
        state_len: 1,
        sparse_initial_keys: 16,
        dense_max_bytes: 1 << 20,
    };
    let store = Store::<f32>::new(KeyRange::new(0, 1 << 16), cfg).expect("a valid store");
    let rest = batch.rest.len();
    let out = receive_batch(&store, batch.clone(), None);
    // Forwarded down the chain, or acknowledged to its head (a marker at the tail: neither).
    assert!(out.len() <= 1);
    if let Some((to, msg)) = out.first() {
        match msg {
            Control::Replicate { batch: next } => {
                assert_eq!(Some(*to), batch.rest.first().copied());
                assert_eq!(next.rest.len() + 1, rest);
            }
            Control::ReplicaAck { seq } => {
                assert_eq!((*to, *seq), (batch.origin, batch.seq));
            }
            other => panic!("a replica sent {other:?}"),
        }
    }
    let taken = vec![KeyRange::new(10, 20), KeyRange::new(1 << 15, 1 << 16)];
    let _ = receive_batch(
        &store,
        batch,
        Some((u64::MAX, &[1, 2, 3, 12, 40_000], taken)),
    );
});
