//! A task's request and how it is split into messages by the routing table.

use std::collections::BTreeMap;
use std::ops::Range;

use std::sync::Arc;

use pserv_transport::wire::{Header, FLAG_CACHE_KEYS, FLAG_KEYS_CACHED, FLAG_RANGE};
use pserv_transport::{OutFrame, Payload};

use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::keycache::{ListId, SentLists, MIN_KEYS};
use crate::placement::Partition;
use crate::proto::request_timestamp;

use super::shared::Shared;
use super::tasks::{SegState, Segment, Timestamp};

/// The keys of a request.
enum RequestKeys {
    /// A sorted key list.
    List(Shared<Key>),
    /// A dense range (runs are offsets from its begin).
    Range(KeyRange),
}

/// The key and value payloads of the message holding some runs of a request's keys.
type Body = Box<dyn Fn(&[Range<usize>]) -> (Payload, Payload) + Send + Sync>;

/// A task's request, kept to build its messages: the first ones, and those that resend a
/// failed segment's keys under a newer routing table (same message, new epoch, new
/// segment index).
pub(crate) struct Request {
    keys: RequestKeys,
    /// Kind, sender, dtype, value length, function, clock and flags; the timestamp and
    /// epoch are set per message.
    pub(crate) header: Header,
    /// Values per key.
    vlen: usize,
    /// Whether it goes to every server (an empty message where it has no keys) to carry
    /// the worker's clock.
    pub(crate) clocked: bool,
    pub(crate) body: Body,
    /// Which lists each server caches (key caching on), for key-list requests.
    lists: Option<Arc<SentLists>>,
}

impl Request {
    /// A request for sorted `keys` (values from `values`, gathered per message).
    pub(crate) fn keyed<T: Value>(
        header: Header,
        vlen: usize,
        clocked: bool,
        keys: Shared<Key>,
        values: Option<Shared<T>>,
    ) -> Request {
        let ks = keys.clone();
        let body = move |runs: &[Range<usize>]| -> (Payload, Payload) {
            if runs.len() <= 1 {
                let idx = runs.first().cloned().unwrap_or(0..0);
                let vals = match &values {
                    Some(v) => v.payload(idx.start * vlen..idx.end * vlen),
                    None => Payload::empty(),
                };
                return (ks.payload(idx), vals);
            }
            // A server owning several runs gets them gathered into one key list,
            // scattered back on answer.
            let k = ks.as_slice();
            let n: usize = runs.iter().map(|r| r.len()).sum();
            let gathered: Vec<Key> = runs
                .iter()
                .flat_map(|r| k[r.clone()].iter().copied())
                .collect();
            let vals = match &values {
                Some(v) => {
                    let v = v.as_slice();
                    let vs: Vec<T> = runs
                        .iter()
                        .flat_map(|r| v[r.start * vlen..r.end * vlen].iter().copied())
                        .collect();
                    Shared::from(vs).payload(0..n * vlen)
                }
                None => Payload::empty(),
            };
            (Shared::from(gathered).payload(0..n), vals)
        };
        Request {
            keys: RequestKeys::List(keys),
            header,
            vlen,
            clocked,
            body: Box::new(body),
            lists: None,
        }
    }

    /// A request for every key of `range` (dense values from `values`).
    pub(crate) fn ranged<T: Value>(
        header: Header,
        vlen: usize,
        clocked: bool,
        range: KeyRange,
        values: Option<Shared<T>>,
    ) -> Request {
        let body = move |runs: &[Range<usize>]| -> (Payload, Payload) {
            let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
                // A clock-only message: no keys, no values.
                return (Payload::empty(), Payload::empty());
            };
            debug_assert!(
                runs.windows(2).all(|w| w[0].end == w[1].start),
                "a range message holds one run"
            );
            let (from, to) = (first.start, last.end);
            let vals = match &values {
                Some(v) => v.payload(from * vlen..to * vlen),
                None => Payload::empty(),
            };
            let keys = vec![range.begin + from as u64, range.begin + to as u64];
            (Payload::owned(keys), vals)
        };
        Request {
            keys: RequestKeys::Range(range),
            header,
            vlen,
            clocked,
            body: Box::new(body),
            lists: None,
        }
    }

    /// Name key lists servers confirmed they cache (`lists`), and ask them to cache the
    /// others (see [`crate::keycache`]). Ranges are never named.
    pub(crate) fn with_lists(mut self, lists: Option<Arc<SentLists>>) -> Request {
        if matches!(self.keys, RequestKeys::List(_)) {
            self.lists = lists;
        }
        self
    }

    /// All of the request's keys as runs.
    fn all(&self) -> Vec<Range<usize>> {
        let n = match &self.keys {
            RequestKeys::List(k) => k.len(),
            RequestKeys::Range(r) => r.len() as usize,
        };
        if n == 0 {
            Vec::new()
        } else {
            std::iter::once(0..n).collect()
        }
    }

    /// Split the keys at `runs` by `table`: per message, its server and runs.
    pub(crate) fn split(
        &self,
        table: &Partition,
        runs: &[Range<usize>],
    ) -> Vec<(u32, Vec<Range<usize>>)> {
        match &self.keys {
            RequestKeys::List(k) => split_key_runs(table, k.as_slice(), runs),
            RequestKeys::Range(r) => split_range_runs(table, *r, runs),
        }
    }

    /// The first messages: every key split by `table`, plus, for clocked requests, an
    /// empty message to each server of `clock_to` that gets no keys. A range request's
    /// messages carry one range each, and a server may get several: each moves the
    /// worker's clock only on what it writes, so every server of `clock_to` gets a
    /// closing empty message, which moves it on the rest.
    pub(crate) fn first_plan(
        &self,
        table: &Partition,
        clock_to: &[u32],
    ) -> Vec<(u32, Vec<Range<usize>>)> {
        let mut plan = self.split(table, &self.all());
        if self.clocked {
            let ranged = matches!(self.keys, RequestKeys::Range(_));
            for &s in clock_to {
                if ranged || !plan.iter().any(|(p, _)| *p == s) {
                    plan.push((s, Vec::new()));
                }
            }
            // Stable: a server's several range messages stay in key order.
            plan.sort_by_key(|(s, _)| *s);
        }
        plan
    }

    /// Segment `index` of task `ts`: the keys at `runs` to `server`, routed by a table
    /// of epoch `epoch`.
    pub(crate) fn message(
        &self,
        epoch: u64,
        ts: Timestamp,
        (index, origin): (usize, usize),
        server: u32,
        runs: Vec<Range<usize>>,
    ) -> (Segment, OutFrame) {
        let mut h = self.header;
        h.timestamp = request_timestamp(ts, index, origin);
        // The routing table this request was split with: a server at another epoch
        // refuses it (StaleEpoch) instead of serving keys it may no longer own.
        h.epoch = u32::try_from(epoch).unwrap_or(u32::MAX);
        if matches!(self.keys, RequestKeys::Range(_)) && !runs.is_empty() {
            h.flags |= FLAG_RANGE;
        }
        let (mut keys, values) = (self.body)(&runs);
        let n: usize = runs.iter().map(|r| r.len()).sum();
        let mut list = None;
        if let Some(lists) = self.lists.as_ref().filter(|_| n >= MIN_KEYS) {
            if let Ok(ks) = bytemuck::try_cast_slice::<u8, u64>(keys.bytes()) {
                let id = ListId::of(ks);
                // A resent segment (not its own origin) carries its keys: it may be the
                // answer to a miss.
                if lists.send_by_name(server, id, index == origin) {
                    h.flags |= FLAG_KEYS_CACHED;
                    keys = Payload::owned(id.words().to_vec());
                } else {
                    h.flags |= FLAG_CACHE_KEYS;
                }
                list = Some(id);
            }
        }
        let seg = Segment {
            server,
            values: n * self.vlen,
            state: SegState::Sent,
            part: None,
            runs,
            epoch,
            failed_at: None,
            attempt: 0,
            origin,
            list,
        };
        (seg, OutFrame::new(h, keys, values))
    }

    /// The segments and frames of a plan, numbered from segment `first`.
    pub(crate) fn messages(
        &self,
        table: &Partition,
        ts: Timestamp,
        first: usize,
        plan: Vec<(u32, Vec<Range<usize>>)>,
    ) -> (Vec<Segment>, Vec<(u32, OutFrame)>) {
        let mut segments = Vec::with_capacity(plan.len());
        let mut frames = Vec::with_capacity(plan.len());
        for (i, (server, runs)) in plan.into_iter().enumerate() {
            let (seg, frame) =
                self.message(table.epoch(), ts, (first + i, first + i), server, runs);
            segments.push(seg);
            frames.push((server, frame));
        }
        (segments, frames)
    }
}

/// Split the keys at `runs` (index ranges into the sorted `keys`) by `table`: one entry
/// per server, in server order, with its runs in key order (adjacent ones merged).
pub(crate) fn split_key_runs(
    table: &Partition,
    keys: &[Key],
    runs: &[Range<usize>],
) -> Vec<(u32, Vec<Range<usize>>)> {
    let mut groups: BTreeMap<u32, Vec<Range<usize>>> = BTreeMap::new();
    for run in runs {
        for (server, r) in table.split_keys(&keys[run.clone()]) {
            let r = run.start + r.start..run.start + r.end;
            let g = groups.entry(server as u32).or_default();
            match g.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => g.push(r),
            }
        }
    }
    groups.into_iter().collect()
}

/// Split the keys at `runs` (offsets from `range.begin`) by `table`: one entry per part
/// with one owner, in key order, each with its one run.
pub(crate) fn split_range_runs(
    table: &Partition,
    range: KeyRange,
    runs: &[Range<usize>],
) -> Vec<(u32, Vec<Range<usize>>)> {
    let mut out = Vec::new();
    for run in runs {
        let piece = KeyRange::new(range.begin + run.start as u64, range.begin + run.end as u64);
        for (server, p) in table.split_range(piece) {
            let at = (p.begin - range.begin) as usize;
            out.push((
                server as u32,
                std::iter::once(at..at + p.len() as usize).collect(),
            ));
        }
    }
    out
}
