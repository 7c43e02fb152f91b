//! Write sessions (RIFL): every write carries this client's id, a sequence number
//! its retries reuse, and the lowest sequence still in flight, so the servers apply
//! it once and may forget the replies below that.

use super::{Client, MAX_WRITES_IN_FLIGHT};
use crate::proto::RequestId;
use std::collections::BTreeSet;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Sequence numbers of one client's writes, and which are still unanswered.
pub(super) struct Session {
    pub(super) client_id: u64,
    state: Mutex<SeqWindow>,
    room: Notify,
}

impl Session {
    pub(super) fn new(client_id: u64) -> Session {
        Session {
            client_id,
            state: Mutex::new(SeqWindow::new(MAX_WRITES_IN_FLIGHT)),
            room: Notify::new(),
        }
    }

    pub(super) async fn begin(&self) -> u64 {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(seq) = self.state.lock().expect("session lock").begin() {
                return seq;
            }
            room.await;
        }
    }

    fn finish(&self, seq: u64) {
        self.state.lock().expect("session lock").finish(seq);
        self.room.notify_waiters();
    }

    fn request_id(&self, seq: u64) -> RequestId {
        RequestId {
            client_id: self.client_id,
            seq,
            first_incomplete: self.state.lock().expect("session lock").first_incomplete(),
        }
    }
}

/// The seq of one write; when dropped (answered, failed or abandoned) the write no
/// longer holds back `first_incomplete`.
pub(super) struct WriteTicket {
    pub(super) client: Client,
    pub(super) seq: u64,
}

impl WriteTicket {
    pub(super) fn id(&self) -> RequestId {
        self.client.inner.session.request_id(self.seq)
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.client.inner.session.finish(self.seq);
    }
}

/// Pure seq bookkeeping: seqs start at 1 and increase; `first_incomplete` is the
/// lowest seq in flight, or the next seq when none is, so it never decreases; at
/// most `window` seqs (from `first_incomplete` up) are outstanding.
#[derive(Debug)]
struct SeqWindow {
    next: u64,
    in_flight: BTreeSet<u64>,
    window: u64,
}

impl SeqWindow {
    fn new(window: u64) -> SeqWindow {
        SeqWindow {
            next: 1,
            in_flight: BTreeSet::new(),
            window,
        }
    }

    /// The next seq, or `None` while the window is full.
    fn begin(&mut self) -> Option<u64> {
        if self.next - self.first_incomplete() >= self.window {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        self.in_flight.insert(seq);
        Some(seq)
    }

    fn finish(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
    }

    fn first_incomplete(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn first_incomplete_is_the_lowest_unanswered_seq() {
        let mut w = SeqWindow::new(256);
        assert_eq!(w.first_incomplete(), 1);
        let (a, b, c) = (w.begin().unwrap(), w.begin().unwrap(), w.begin().unwrap());
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(w.first_incomplete(), 1);
        w.finish(b);
        assert_eq!(w.first_incomplete(), 1, "an older write is still in flight");
        w.finish(a);
        assert_eq!(w.first_incomplete(), 3);
        w.finish(c);
        assert_eq!(w.first_incomplete(), 4, "none in flight: the next seq");
        assert_eq!(w.begin(), Some(4));
    }

    #[test]
    fn first_incomplete_never_decreases() {
        let mut w = SeqWindow::new(8);
        let mut in_flight = Vec::new();
        let mut last = 0;
        // A deterministic interleaving of begins and out-of-order finishes.
        for step in 0u64..500 {
            if step % 3 != 2 {
                if let Some(seq) = w.begin() {
                    in_flight.push(seq);
                }
            } else if !in_flight.is_empty() {
                let i = (step as usize * 7) % in_flight.len();
                w.finish(in_flight.swap_remove(i));
            }
            let fi = w.first_incomplete();
            assert!(fi >= last, "first_incomplete went back from {last} to {fi}");
            assert!(in_flight.iter().all(|&s| s >= fi));
            last = fi;
        }
    }

    #[test]
    fn the_window_bounds_outstanding_seqs() {
        let mut w = SeqWindow::new(3);
        let first = w.begin().unwrap();
        w.begin().unwrap();
        w.begin().unwrap();
        assert_eq!(w.begin(), None, "three outstanding from seq 1");
        w.finish(3);
        assert_eq!(w.begin(), None, "seq 1 still holds the window back");
        w.finish(first);
        assert_eq!(w.begin(), Some(4));
    }

    #[tokio::test]
    async fn a_full_window_waits_for_an_answer() {
        let session = Arc::new(Session {
            client_id: 7,
            state: Mutex::new(SeqWindow::new(2)),
            room: Notify::new(),
        });
        assert_eq!(session.begin().await, 1);
        assert_eq!(session.begin().await, 2);
        let waiter = tokio::spawn({
            let session = session.clone();
            async move { session.begin().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert_eq!(session.request_id(2).first_incomplete, 1);
        session.finish(1);
        assert_eq!(waiter.await.unwrap(), 3);
        let id = session.request_id(3);
        assert_eq!((id.client_id, id.seq, id.first_incomplete), (7, 3, 2));
    }
}
