//! Status codes of answers: what a refused request says, on the wire and in errors.

/// Status codes of error answers (the values carry a UTF-8 text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Malformed request (unsorted keys, bad lengths, wrong kind).
    BadRequest = 1,
    /// Keys outside the server's range.
    NotOwner = 2,
    /// The update function id is not registered.
    UnknownFunction = 3,
    /// The value type differs from the cluster's.
    WrongType = 4,
    /// The server has not received its cluster table yet.
    NotReady = 5,
    /// The store refused (for example a dense block too large).
    StoreError = 6,
    /// The request was routed with another epoch of the routing table than the server's
    /// (a redirect: the worker must learn the current table and resend).
    StaleEpoch = 7,
    /// The request named its key list by a cached name (`FLAG_KEYS_CACHED`) this server
    /// does not hold (evicted, never stored, or another list under that name); nothing
    /// was applied. The worker resends with the keys.
    KeyCacheMiss = 8,
}

impl Status {
    /// Decode a status byte (unknown codes map to `BadRequest`).
    pub fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Ok,
            2 => Status::NotOwner,
            3 => Status::UnknownFunction,
            4 => Status::WrongType,
            5 => Status::NotReady,
            6 => Status::StoreError,
            7 => Status::StaleEpoch,
            8 => Status::KeyCacheMiss,
            _ => Status::BadRequest,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}
