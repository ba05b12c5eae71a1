//! Control messages (registration, cluster tables, barriers, windows, replication, ...)
//! as the scheduler, servers and workers decode them: the input is a `Control` frame's
//! value bytes, wrapped in a frame and checked as a receiver checks it, then decoded with
//! `Control::from_frame` (what every handler calls). A message that decodes must encode
//! and decode again to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_engine::proto::Control;
use pserv_fuzz::{control_from_values, Aligned};
use pserv_transport::wire::Frame;

fuzz_target!(|data: &[u8]| {
    let Some(msg) = control_from_values(data) else {
        return;
    };
    if let Control::Table { partition } = &msg {
        // What every node does with a new table: route keys by it.
        for key in [0, 1, data.len() as u64, u64::MAX / 2, u64::MAX - 1] {
            let i = partition.index_of(key);
            let _ = partition.server_of(key);
            let _ = partition.chain_of(key);
            assert!(partition.ranges()[i].contains(key));
        }
    }
    let again = msg.to_frame(0).to_bytes();
    let buf2 = Aligned::new(&again);
    let (frame2, _) = Frame::new_checked(buf2.bytes(), usize::MAX).expect("an encoded frame");
    let back = Control::from_frame(&frame2).expect("an encoded control message decodes");
    assert_eq!(
        back.to_frame(0).to_bytes(),
        again,
        "a control message does not encode to the same bytes twice"
    );
});
