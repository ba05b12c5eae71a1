//! The transport handler: control messages from the scheduler and the servers, and the
//! servers' answers, which complete the segments of tasks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pserv_transport::wire::{MessageKind, FLAG_CACHE_KEYS};
use pserv_transport::{CloseReason, Conn, Handler, RecvFrame};

use crate::base::ids::{ConnTag, Holder, ServerRank};
use crate::proto::{Control, Status};

use super::state::Core;
use super::tasks::judge_answer;

pub(super) struct WorkerHandler {
    pub(super) core: Arc<Core>,
}

impl Handler for WorkerHandler {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let f = frame.frame();
        let h = *f.header();
        let tag = ConnTag::from_u64(conn.tag(), Holder::Worker);
        if tag == ConnTag::Scheduler {
            match Control::from_frame(&f) {
                Ok(Control::Servers { servers }) => self.core.connect_new(servers),
                Ok(Control::Shutdown) => {
                    self.core.over.store(true, Ordering::Release);
                    let _ = self.core.control.send(Control::Shutdown);
                }
                Ok(Control::PleaseLeave) => {
                    tracing::info!("asked to leave: finishing the current clock");
                    self.core.leave.store(true, Ordering::Release);
                }
                Ok(Control::Table { partition }) => {
                    let epoch = partition.epoch();
                    if self.core.install(partition) {
                        tracing::info!(epoch, "new routing table installed");
                        self.core.wake();
                    } else {
                        tracing::debug!(epoch, "routing table not newer than ours; ignored");
                    }
                }
                Ok(msg) => {
                    let _ = self.core.control.send(msg);
                }
                Err(e) => tracing::warn!(error = %e, "bad control message from the scheduler"),
            }
            return;
        }
        let ConnTag::Server(ServerRank(server)) = tag else {
            tracing::warn!(peer = %conn.peer_addr(), "frame from an unknown peer; closing it");
            conn.close();
            return;
        };
        if h.kind == MessageKind::Control as u8 {
            // A server's redirect carries its routing table; window grants and refusals
            // (one-sided setup) go to the caller waiting for them.
            match Control::from_frame(&f) {
                Ok(Control::Table { partition }) => {
                    let epoch = partition.epoch();
                    if self.core.install(partition) {
                        tracing::info!(epoch, server, "newer routing table learnt from a server");
                        self.core.wake();
                    }
                }
                Ok(msg) => {
                    let _ = self.core.control.send(msg);
                }
                Err(e) => tracing::warn!(server, error = %e, "bad control message from a server"),
            }
            return;
        }
        let value_bytes = f.values().len();
        let error_text = (h.status != Status::Ok as u8)
            .then(|| String::from_utf8_lossy(f.values()).into_owned());
        let lists = self.core.sent_lists.as_ref();
        self.core.settle(h.timestamp, server, |st, seg| {
            if let (Some(lists), Some(id)) = (lists, st.segments[seg].list) {
                if h.status == Status::KeyCacheMiss as u8 {
                    lists.missed(server, id);
                } else if h.status == Status::Ok as u8 && h.has(FLAG_CACHE_KEYS) {
                    lists.confirm(server, id);
                }
            }
            let (outcome, keep) = judge_answer(st, seg, server, &h, value_bytes, error_text);
            if keep {
                st.segments[seg].part = Some(frame.into_owned());
            }
            outcome
        });
    }

    fn on_close(&mut self, conn: &Conn, reason: &CloseReason) {
        match ConnTag::from_u64(conn.tag(), Holder::Worker) {
            ConnTag::Scheduler => {
                tracing::debug!(%reason, "scheduler connection closed");
                let current = self
                    .core
                    .sched
                    .lock()
                    .as_ref()
                    .is_some_and(|c| c.id() == conn.id());
                if self.core.over.load(Ordering::Acquire) {
                    let _ = self.core.control.send(Control::Shutdown);
                } else if current {
                    self.core.scheduler_lost();
                }
            }
            ConnTag::Server(ServerRank(server)) => self.core.server_lost(server),
            // A worker connects to no other worker.
            ConnTag::Unknown | ConnTag::Worker(_) => {}
        }
    }
}
