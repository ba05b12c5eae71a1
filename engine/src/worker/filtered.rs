//! Pushes through a [`FilterChain`]: the chain decides what is sent, on the worker,
//! before the request is built.

use crate::base::error::EngineError;
use crate::base::keys::Key;
use crate::base::value::Value;
use crate::filter::{Entries, FilterChain};

use super::config::TaskOpts;
use super::pulled::Pulled;
use super::tasks::Timestamp;
use super::Worker;

impl Worker {
    /// Run `chain` on a push of `values` for sorted, distinct `keys` and push what it
    /// passes on (possibly nothing: an empty push still carries the task's clock, which
    /// clocked consistency needs). Returns the push's timestamp.
    pub fn push_filtered<T: Value>(
        &self,
        keys: &[Key],
        values: &[T],
        chain: &mut FilterChain<T>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let value_len = self.value_len();
        if keys.len() * value_len != values.len() || !keys.windows(2).all(|w| w[0] < w[1]) {
            // Not valid push input: pushed as it is, so the request is refused with the
            // same reason as an unfiltered push (and the filters' state stays as it was).
            return self.push_opts(keys, values, opts);
        }
        let out = chain.apply(Entries::new(keys.to_vec(), values.to_vec(), value_len));
        self.push_opts(out.keys, out.values, opts)
    }

    /// Push everything `chain` holds back (residuals), at the end of training.
    pub fn push_drained<T: Value>(&self, chain: &mut FilterChain<T>, opts: &TaskOpts) -> Timestamp {
        let out = chain.drain(self.value_len());
        self.push_opts(out.keys, out.values, opts)
    }

    /// [`wait_pull`](Self::wait_pull) for a pull of `keys`, showing `chain` the weights it
    /// brought (filters such as the KKT filter decide by them).
    pub fn wait_pull_filtered<T: Value>(
        &self,
        ts: Timestamp,
        keys: &[Key],
        chain: &mut FilterChain<T>,
    ) -> Result<Pulled<T>, EngineError> {
        let pulled = self.wait_pull::<T>(ts)?;
        let values = pulled.to_vec();
        if values.len() == keys.len() * self.value_len() {
            chain.pulled(&Entries::new(keys.to_vec(), values, self.value_len()));
        }
        Ok(pulled)
    }
}
