//! `pserv-transport`: moves bytes between pserv nodes, and nothing else.
//!
//! - [`wire`]: the frame format (a 56-byte `Pod` header, a key list, value bytes), with
//!   checked zero-copy views for anything that comes from the network.
//! - [`auth`]: the mutual challenge-response over a cluster secret every connection
//!   starts with (when configured), binding the node id a peer speaks as.
//! - [`tls`]: optional TLS 1.3 (rustls) for connections between hosts, certificates
//!   checked both ways against a cluster CA, after the secret's exchange.
//! - [`buf`]: payloads sent straight from the caller's buffers, and pooled receive buffers.
//! - [`compress`]: value compression into self-describing blocks (none, LZ4, zstd, zero runs).
//! - [`tcp`]: TCP on per-core mio event loops, the transport that runs everywhere.
//! - [`onesided`]: one-sided reads, writes and notifications of registered memory (the
//!   [`onesided::OneSided`] interface; shared memory here, RDMA verbs where a device is),
//!   with versioned blocks ([`onesided::seqlock`]) so readers never see a torn value.
//!
//! The transport knows frames, not parameters: what a push or a pull means is the
//! engine's business.
#![forbid(unsafe_code)]

pub mod auth;
pub mod buf;
pub mod compress;
pub mod onesided;
pub mod rdmapipe;
pub mod shmpipe;
pub mod tcp;
pub mod tls;
pub mod wire;

pub use auth::{AuthConfig, AuthError, Secret};
pub use buf::{AsBytes, BufPool, OutFrame, OwnedFrame, Payload, PoolBuf, RecvFrame};
pub use compress::Codec;
pub use rdmapipe::RdmaMessages;
pub use shmpipe::ShmMessages;
pub use tcp::{CloseReason, Conn, Connector, Handler, TcpConfig, TcpTransport, TransportError};
pub use tls::{TlsConfig, TlsError};
pub use wire::{DType, Frame, Header, MessageKind, WireError};
