//! One-sided descriptors and endpoints from a peer: `RegionDesc::decode` (the window
//! descriptors a server grants a worker) and the shared-memory backend's endpoint bytes
//! (`onesided::shm::check_endpoint`, what `connect` decodes). The RDMA backend's
//! `decode_endpoint` is only built with the `rdma` feature, which this crate does not
//! turn on. A descriptor that decodes must encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_transport::onesided::{shm, RegionDesc};

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = RegionDesc::decode(data) {
        assert!(desc.locator.len() <= RegionDesc::LOCATOR_MAX);
        assert!(desc.addr.checked_add(desc.len).is_some());
        assert_eq!(
            desc.encode(),
            data,
            "a descriptor does not encode to its bytes"
        );
    }
    let _ = shm::check_endpoint(data);
});
