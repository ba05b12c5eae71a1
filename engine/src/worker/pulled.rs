//! What a pull hands back: the answers as received, put in key order on demand.

use std::marker::PhantomData;
use std::ops::Range;

use pserv_transport::OwnedFrame;

use crate::base::value::Value;

/// Values returned by a pull: one segment per answering server, each still in the buffer
/// it was received into (no copy until you ask for one). A server that owns several
/// ranges answers for all of its keys in one segment, so segments are in server order,
/// not necessarily in key order (and parts resent after a routing change come last):
/// [`copy_to`](Self::copy_to) puts values back in key order.
pub struct Pulled<T> {
    /// Each answer with the runs of the request's keys it holds, in its order.
    pub(super) parts: Vec<Answer>,
    pub(super) _t: PhantomData<T>,
}

impl<T: Value> Pulled<T> {
    /// The segments, one per answer (see the type's doc for their order).
    pub fn segments(&self) -> impl Iterator<Item = &[T]> {
        self.parts
            .iter()
            .map(|(p, _)| p.frame().values_as::<T>().expect("checked when received"))
    }

    /// The values as one slice in key order, when they came in one piece.
    pub fn as_slice(&self) -> Option<&[T]> {
        match self.parts.as_slice() {
            [] => Some(&[]),
            [(_, runs)] if runs.len() <= 1 => self.segments().next(),
            _ => None,
        }
    }

    /// The smallest worker clock the servers had reached on these keys when they
    /// answered (0 for unclocked pulls): how stale the values may be.
    pub fn server_clock(&self) -> u64 {
        self.parts
            .iter()
            .map(|(p, _)| p.header().clock)
            .min()
            .unwrap_or(0)
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.segments().map(<[T]>::len).sum()
    }

    /// Whether no value was pulled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy the values into `out` in key order (which must have exactly
    /// [`len`](Self::len) elements).
    ///
    /// # Panics
    /// If `out` has the wrong length.
    pub fn copy_to(&self, out: &mut [T]) {
        assert_eq!(
            out.len(),
            self.len(),
            "pull destination has the wrong length"
        );
        for ((frame, runs), seg) in self.parts.iter().zip(self.segments()) {
            let keys: usize = runs.iter().map(|r| r.len()).sum();
            if keys == 0 {
                continue;
            }
            let vl = seg.len() / keys;
            let mut at = 0;
            for r in runs {
                let n = r.len() * vl;
                out[r.start * vl..r.start * vl + n].copy_from_slice(&seg[at..at + n]);
                at += n;
            }
            debug_assert_eq!(
                at,
                seg.len(),
                "answer {} sized for its runs",
                frame.header().timestamp
            );
        }
    }

    /// The values in one new vector, in key order.
    pub fn to_vec(&self) -> Vec<T> {
        let mut v = vec![T::default(); self.len()];
        self.copy_to(&mut v);
        v
    }
}

/// One server's answer to a task, with the runs of the request's keys it holds.
pub(super) type Answer = (OwnedFrame, Vec<Range<usize>>);
