//! The simulated network: connections between simulated processes, with delays, FIFO
//! order per connection and direction (what TCP gives), stalls (a partition that heals:
//! the bytes wait, then arrive in order), and closes (a process died: what it had in
//! flight is lost, and each end learns of the close after a delay of its own). Plus the
//! event queue of the whole run, ordered by (time, sequence): one seed, one order.

use std::collections::{BTreeMap, BinaryHeap};

use crate::proto::Control;

use super::rng::Rng;

/// A simulated process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Addr {
    /// The scheduler.
    Sched,
    /// The server of this rank.
    Server(u32),
    /// The worker of this rank.
    Worker(u32),
}

/// A connection, as both its ends name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnId(pub(crate) u64);

/// What travels on a connection.
#[derive(Clone, Debug)]
pub(crate) enum Msg {
    /// A control message.
    Control(Control),
    /// A data frame (request or answer), as its bytes on the wire.
    Data(Vec<u8>),
}

/// Something that happens at a time.
#[derive(Debug)]
pub(crate) enum Event {
    /// `msg` arrives at `to` on `conn` (dropped if the connection closed meanwhile).
    Deliver {
        /// The connection.
        conn: ConnId,
        /// The receiving end.
        to: Addr,
        /// The message.
        msg: Msg,
    },
    /// `at` learns that `conn` closed.
    Closed {
        /// The connection.
        conn: ConnId,
        /// The end that learns it.
        at: Addr,
    },
    /// A timer of process `at` (of incarnation `life`: a restarted process ignores the
    /// timers of its previous life).
    Timer {
        /// The process.
        at: Addr,
        /// Its incarnation when the timer was set.
        life: u64,
        /// Which timer.
        kind: Timer,
    },
    /// A fault or a membership change the run injects.
    Fault(super::world::Fault),
}

/// The timers of the simulated processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Scheduler: time passes (its `Tick` input).
    SchedTick,
    /// Server: the control loop's 100 ms timeout (heartbeat, reconnect, stop when idle).
    ServerTick,
    /// Server: the replication window flusher.
    Flush,
    /// Server: the second half of a table switch (replication moves to the new chains),
    /// which the real control loop runs after releasing the gate: requests may be served
    /// in between.
    OnTable,
    /// Worker: the retry thread's tick.
    Retry,
    /// Worker: the training loop's next step.
    Step,
    /// Worker: look for a restarted scheduler.
    Rejoin,
}

struct Conn {
    ends: [Addr; 2],
    open: bool,
    /// Per direction (from end 0, from end 1): whether what is in flight still arrives
    /// (a process that stops flushes its sends; one that dies may lose them).
    flows: [bool; 2],
    /// Per end: whether it knows the connection closed (its sends fail at once).
    known_closed: [bool; 2],
    /// Per direction (from end 0, from end 1): the last delivery time (FIFO).
    last_at: [u64; 2],
    /// Bytes wait until this time (a partition that heals).
    stalled_until: u64,
}

/// Delays, in microseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delays {
    /// Usual one-way delay range.
    pub(crate) min_us: u64,
    /// Usual one-way delay range.
    pub(crate) max_us: u64,
    /// Per mille of messages delayed up to `spike_us` more.
    pub(crate) spike_per_mille: u64,
    /// The longest extra delay.
    pub(crate) spike_us: u64,
    /// How long an end takes to learn that a connection closed, at most.
    pub(crate) close_us: u64,
}

/// The network and the event queue.
pub(crate) struct Net {
    /// Now, in microseconds since the run started.
    pub(crate) now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    pub(crate) rng: Rng,
    pub(crate) delays: Delays,
    /// Messages delivered, for the report.
    pub(crate) delivered: u64,
}

impl Net {
    /// An empty network whose choices come from `rng`.
    pub(crate) fn new(rng: Rng, delays: Delays) -> Net {
        Net {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            rng,
            delays,
            delivered: 0,
        }
    }

    /// Queue `ev` at time `at` (not before now).
    pub(crate) fn at(&mut self, at: u64, ev: Event) {
        let at = at.max(self.now);
        self.seq += 1;
        self.queue.push(std::cmp::Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Queue timer `kind` of process `at` (incarnation `life`) in `after_us`.
    pub(crate) fn timer(&mut self, at: Addr, life: u64, kind: Timer, after_us: u64) {
        let t = self.now + after_us;
        self.at(t, Event::Timer { at, life, kind });
    }

    /// The next event, with time moved to it.
    pub(crate) fn pop(&mut self) -> Option<Event> {
        let std::cmp::Reverse((t, seq)) = self.queue.pop()?;
        debug_assert!(t >= self.now, "time never goes back");
        self.now = t;
        self.events.remove(&seq)
    }

    /// Open a connection from `from` to `to` (the caller checked `to` accepts).
    pub(crate) fn connect(&mut self, from: Addr, to: Addr) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                ends: [from, to],
                open: true,
                flows: [true; 2],
                known_closed: [false; 2],
                last_at: [self.now; 2],
                stalled_until: 0,
            },
        );
        id
    }

    fn end_of(c: &Conn, a: Addr) -> usize {
        if c.ends[0] == a {
            0
        } else {
            debug_assert_eq!(c.ends[1], a, "{a:?} is an end of the connection");
            1
        }
    }

    /// The other end of `conn`, seen from `from`.
    pub(crate) fn peer(&self, conn: ConnId, from: Addr) -> Addr {
        let c = &self.conns[&conn];
        c.ends[1 - Self::end_of(c, from)]
    }

    /// Whether `from` may send on `conn`: false once it learnt the connection closed
    /// (a send to a dead peer it has not noticed yet succeeds and is lost).
    pub(crate) fn usable(&self, conn: ConnId, from: Addr) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| !c.known_closed[Self::end_of(c, from)])
    }

    /// Send `msg` from `from` on `conn`. Returns false when `from` knows it closed.
    pub(crate) fn send(&mut self, conn: ConnId, from: Addr, msg: Msg) -> bool {
        let now = self.now;
        let d = self.delays;
        let mut delay = self.rng.between(d.min_us, d.max_us);
        if self.rng.chance(d.spike_per_mille) {
            delay += self.rng.below(d.spike_us);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let e = Self::end_of(c, from);
        if c.known_closed[e] {
            return false;
        }
        if !c.open {
            // The peer died and this end has not noticed yet: the bytes are lost.
            return true;
        }
        let at = (now + delay).max(c.last_at[e]).max(c.stalled_until);
        c.last_at[e] = at;
        let to = c.ends[1 - e];
        self.at(at, Event::Deliver { conn, to, msg });
        true
    }

    /// Whether a message in flight to `to` on `conn` still arrives.
    pub(crate) fn deliverable(&self, conn: ConnId, to: Addr) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            let from = 1 - Self::end_of(c, to);
            c.flows[from] && (c.open || !c.known_closed[1 - from])
        })
    }

    /// Close every connection `a` is an end of (it died, or stopped when `flush`): each
    /// other end learns it after a delay; `a` itself is gone and learns nothing. A
    /// process that died loses what it had in flight by a coin per connection.
    pub(crate) fn close_all(&mut self, a: Addr, flush: bool) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.open && c.ends.contains(&a))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let keep = flush || self.rng.chance(500);
            self.close(id, a);
            if let Some(c) = self.conns.get_mut(&id) {
                let e = Self::end_of(c, a);
                c.flows[e] = keep;
                // Nothing reaches a process that is gone.
                c.flows[1 - e] = false;
            }
        }
    }

    /// Close `conn` from end `by` (which knows at once); the other end learns it later.
    pub(crate) fn close(&mut self, conn: ConnId, by: Addr) {
        let close_us = self.delays.close_us;
        let after = self.rng.between(1, close_us.max(1));
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        let e = Self::end_of(c, by);
        c.known_closed[e] = true;
        let other = c.ends[1 - e];
        // Behind what was in flight towards it (a close comes after the data, as a FIN).
        let at = (self.now + after).max(c.last_at[e]);
        self.at(at, Event::Closed { conn, at: other });
    }

    /// `at` learnt that `conn` closed.
    pub(crate) fn learn_closed(&mut self, conn: ConnId, at: Addr) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let e = Self::end_of(c, at);
            c.known_closed[e] = true;
        }
    }

    /// Stall both directions of every open connection between `a` and `b` until
    /// `until` (a partition between them that heals then).
    pub(crate) fn stall(&mut self, a: Addr, b: Addr, until: u64) {
        for c in self.conns.values_mut() {
            if c.open && c.ends.contains(&a) && c.ends.contains(&b) {
                c.stalled_until = c.stalled_until.max(until);
            }
        }
    }
}
