//! Push and pull by key list and by dense range: checking a request and building it.

use pserv_transport::wire::{Header, MessageKind, FLAG_ORDERED};

use crate::base::error::EngineError;
use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::consistency::Consistency;

use super::config::TaskOpts;
use super::request::Request;
use super::shared::Shared;
use super::tasks::Timestamp;
use super::Worker;

impl Worker {
    /// Push `values` (`keys.len() * value_len` of them) for sorted, distinct `keys`; the
    /// servers apply their update function. Returns at once.
    pub fn push<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.push_opts(keys, values, &TaskOpts::default())
    }

    /// [`push`](Self::push) with an explicit update function id (0: the server default).
    pub fn push_with<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        func: u16,
    ) -> Timestamp {
        self.push_opts(
            keys,
            values,
            &TaskOpts {
                func,
                ..TaskOpts::default()
            },
        )
    }

    /// [`push`](Self::push) with task options (dependencies, consistency, function).
    pub fn push_opts<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.keyed::<T>(MessageKind::Push, keys.into(), Some(values.into()), opts)
    }

    /// Pull the values of sorted, distinct `keys`. Returns at once; collect the values with
    /// [`wait_pull`](Self::wait_pull). Keys never pushed read as zero.
    pub fn pull<T: Value>(&self, keys: impl Into<Shared<Key>>) -> Timestamp {
        self.pull_opts::<T>(keys, &TaskOpts::default())
    }

    /// [`pull`](Self::pull) with task options.
    pub fn pull_opts<T: Value>(&self, keys: impl Into<Shared<Key>>, opts: &TaskOpts) -> Timestamp {
        self.keyed::<T>(MessageKind::Pull, keys.into(), None, opts)
    }

    /// Push, then pull the updated values of the same keys, in one round trip per server.
    pub fn push_pull<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.push_pull_opts(keys, values, &TaskOpts::default())
    }

    /// [`push_pull`](Self::push_pull) with task options.
    pub fn push_pull_opts<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.keyed::<T>(
            MessageKind::PushPull,
            keys.into(),
            Some(values.into()),
            opts,
        )
    }

    /// Push dense values for every key of `range` (`range.len() * value_len` values).
    pub fn push_range<T: Value>(&self, range: KeyRange, values: impl Into<Shared<T>>) -> Timestamp {
        self.push_range_opts(range, values, &TaskOpts::default())
    }

    /// [`push_range`](Self::push_range) with task options.
    pub fn push_range_opts<T: Value>(
        &self,
        range: KeyRange,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.ranged::<T>(MessageKind::Push, range, Some(values.into()), opts)
    }

    /// Pull the dense values of every key of `range`.
    pub fn pull_range<T: Value>(&self, range: KeyRange) -> Timestamp {
        self.pull_range_opts::<T>(range, &TaskOpts::default())
    }

    /// [`pull_range`](Self::pull_range) with task options.
    pub fn pull_range_opts<T: Value>(&self, range: KeyRange, opts: &TaskOpts) -> Timestamp {
        self.ranged::<T>(MessageKind::Pull, range, None, opts)
    }

    /// Push dense values for `range`, then pull the updated values.
    pub fn push_pull_range<T: Value>(
        &self,
        range: KeyRange,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.ranged::<T>(
            MessageKind::PushPull,
            range,
            Some(values.into()),
            &TaskOpts::default(),
        )
    }

    pub(super) fn check_types<T: Value>(&self) -> Result<(), EngineError> {
        if T::DTYPE != self.cluster.value_type.dtype() {
            return Err(EngineError::InvalidRequest(format!(
                "values of type {:?}, but the cluster stores {:?}",
                T::DTYPE,
                self.cluster.value_type
            )));
        }
        Ok(())
    }

    /// The header of a request, with its consistency clock and flags (the timestamp and
    /// the routing epoch are set per message, see [`Request::message`]).
    pub(super) fn header<T: Value>(&self, kind: MessageKind, opts: &TaskOpts) -> Header {
        let model = opts.consistency.unwrap_or(self.consistency);
        request_header(
            kind,
            self.node_id,
            (T::DTYPE as u8, self.value_len() as u32),
            opts.func,
            self.clock(),
            model,
        )
    }

    /// Whether a request of this kind advances this worker's clock on the servers (then
    /// it goes to every server, with an empty key list where it has no keys).
    fn clocked_write(&self, kind: MessageKind) -> bool {
        clocked_write(self.clock(), kind)
    }

    fn keyed<T: Value>(
        &self,
        kind: MessageKind,
        keys: Shared<Key>,
        values: Option<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let vlen = self.value_len();
        self.launch(kind, T::DTYPE as u8, opts, || {
            let k = keys.as_slice();
            self.check_types::<T>()?;
            if let Some(i) = k.windows(2).position(|w| w[0] >= w[1]) {
                return Err(EngineError::InvalidRequest(format!(
                    "keys must be sorted and distinct: keys[{i}] = {} then {}",
                    k[i],
                    k[i + 1]
                )));
            }
            if k.last() == Some(&crate::base::keys::KEY_END) {
                return Err(EngineError::InvalidRequest(
                    "key u64::MAX is outside the key space".into(),
                ));
            }
            if let Some(v) = &values {
                if v.len() != k.len() * vlen {
                    return Err(EngineError::InvalidRequest(format!(
                        "{} values for {} keys x {vlen} values per key",
                        v.len(),
                        k.len()
                    )));
                }
            }
            Ok(Request::keyed(
                self.header::<T>(kind, opts),
                vlen,
                self.clocked_write(kind),
                keys,
                values,
            )
            .with_lists(self.core.sent_lists.clone()))
        })
    }

    fn ranged<T: Value>(
        &self,
        kind: MessageKind,
        range: KeyRange,
        values: Option<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let vlen = self.value_len();
        self.launch(kind, T::DTYPE as u8, opts, || {
            self.check_types::<T>()?;
            if let Some(v) = &values {
                if Some(v.len() as u64) != range.len().checked_mul(vlen as u64) {
                    return Err(EngineError::InvalidRequest(format!(
                        "{} values for a range of {} keys x {vlen} values per key",
                        v.len(),
                        range.len()
                    )));
                }
            }
            Ok(Request::ranged(
                self.header::<T>(kind, opts),
                vlen,
                self.clocked_write(kind),
                range,
                values,
            ))
        })
    }
}

/// The header of a request of `kind` from node `sender` with values of (type tag,
/// length per key), update function `func`, sent at worker clock `clock` under `model`:
/// the consistency clock and flags set (the timestamp and the routing epoch are set per
/// message, see [`Request::message`]). The worker and the simulation build requests
/// with it.
pub(crate) fn request_header(
    kind: MessageKind,
    sender: u32,
    (dtype, value_len): (u8, u32),
    func: u16,
    clock: u64,
    model: Consistency,
) -> Header {
    let mut h = Header::new(kind, sender, 0);
    h.dtype = dtype;
    h.value_len = value_len;
    h.func = func;
    if clock > 0 {
        h.clock = if kind == MessageKind::Pull {
            model.min_clock(clock)
        } else {
            clock
        };
        // Sequential: pushes apply in (clock, rank) order, and any request says that
        // every earlier task of this worker finished (the servers move its clock).
        if model == Consistency::Sequential {
            h.flags |= FLAG_ORDERED;
        }
    }
    debug_assert!(
        clock == 0 || h.clock <= clock,
        "a request never carries a clock ahead of its worker"
    );
    h
}

/// Whether a request of `kind` at worker clock `clock` advances the worker's clock on the
/// servers (then it goes to every server, with an empty key list where it has no keys).
pub(crate) fn clocked_write(clock: u64, kind: MessageKind) -> bool {
    clock > 0 && kind != MessageKind::Pull
}
