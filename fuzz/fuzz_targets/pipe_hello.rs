//! The hellos that move a TCP connection onto shared memory or RDMA rings: the first 64
//! bytes of the input as a shared-memory hello (`shmpipe::check_hello`), the first 96 as
//! an RDMA hello (`rdmapipe::check_hello`), decoded as the transport decodes them when a
//! stream starts with their magic; and the first 96 as a rendezvous descriptor of the
//! RDMA pipe (`rdmapipe::check_rendezvous`, expecting the id the 97th byte names).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_transport::rdmapipe::{self, RDMA_HELLO_LEN, RDV_LEN};
use pserv_transport::shmpipe::{self, HELLO_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..HELLO_LEN) {
        let _ = shmpipe::check_hello(b.try_into().expect("64 bytes"));
    }
    if let Some(b) = data.get(..RDMA_HELLO_LEN) {
        let _ = rdmapipe::check_hello(b.try_into().expect("96 bytes"));
    }
    if let Some(b) = data.get(..RDV_LEN) {
        let id = data.get(RDV_LEN).map_or(0, |&i| u64::from(i));
        let _ = rdmapipe::check_rendezvous(
            b.try_into().expect("96 bytes"),
            id,
            pserv_transport::wire::DEFAULT_MAX_FRAME,
        );
    }
});
