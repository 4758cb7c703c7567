//! Accepted messages on their way to a delivery worker without a claim on the store.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::store::Claimed;

/// Messages handed over to a worker and not taken yet, at most: past that, a backlog forms
/// in the store instead of in memory.
const ROOM: usize = 128;

/// Where the messages a durable flow accepts meet the delivery worker of one of its targets.
///
/// While the worker has claimed everything due and has room, a message is committed already
/// claimed for it ([`Handoff::reserve`]) and handed over in memory once the commit lands: the
/// worker sends it without a claim of its own or a read of the message. Otherwise it is
/// committed pending, and the worker, woken ([`Handoff::wake`]), claims it from the store,
/// behind what was due before it. The store stays the truth either way: a handed-over entry
/// is in flight there under a lease, as a claimed one is, and due again when the lease runs
/// out or the process starts again.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Wakes the worker to claim from the store.
    due: Notify,
    /// Wakes the worker to take what was handed over.
    handed: Notify,
    /// Handed over and not taken yet; `None` while no worker runs.
    waiting: Mutex<Option<VecDeque<Claimed>>>,
    /// How many more messages may be reserved.
    room: AtomicUsize,
    /// Whether the worker has claimed everything due from the store: until it has, new
    /// messages queue there too, behind the older ones.
    caught_up: AtomicBool,
}

impl Handoff {
    /// Tells the worker that deliveries are due in the store.
    pub fn wake(&self) {
        self.due.notify_one();
    }

    /// Room for one message to be handed over, when the worker takes messages that way now.
    pub fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        if !self.caught_up.load(Ordering::Acquire) {
            return None;
        }
        if self
            .room
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| {
                room.checked_sub(1)
            })
            .is_err()
        {
            // The worker falls behind: this message and the next wait in the store.
            self.caught_up.store(false, Ordering::Release);
            return None;
        }
        Some(Reservation {
            handoff: Arc::clone(self),
            held: true,
        })
    }

    /// Starts taking messages: once the worker has caught up, they are handed over.
    pub fn open(&self) {
        *self.lock() = Some(VecDeque::new());
        self.room.store(ROOM, Ordering::Release);
    }

    /// Tells that the worker has claimed everything due from the store: what is accepted
    /// from now on may be handed over.
    pub fn caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
    }

    /// Until the worker is told that deliveries are due in the store.
    pub fn due(&self) -> Notified<'_> {
        self.due.notified()
    }

    /// Until a message is handed over.
    pub fn handed(&self) -> Notified<'_> {
        self.handed.notified()
    }

    /// Stops taking messages; returns those handed over and not taken.
    pub fn close(&self) -> Vec<Claimed> {
        self.caught_up.store(false, Ordering::Release);
        self.lock().take().map(Vec::from).unwrap_or_default()
    }

    /// Up to `most` of the messages handed over, oldest first.
    pub fn take(&self, most: usize) -> Vec<Claimed> {
        let taken: Vec<Claimed> = match self.lock().as_mut() {
            Some(waiting) => {
                let n = most.min(waiting.len());
                waiting.drain(..n).collect()
            }
            None => Vec::new(),
        };
        self.room.fetch_add(taken.len(), Ordering::AcqRel);
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VecDeque<Claimed>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Room for one message in a [`Handoff`]; given back when dropped unused.
#[derive(Debug)]
pub struct Reservation {
    handoff: Arc<Handoff>,
    held: bool,
}

impl Reservation {
    /// Hands `entry`, committed claimed, over to the worker. False when the worker has
    /// stopped meanwhile: then nobody takes it, and its claim is to be released.
    #[must_use]
    pub fn hand_over(mut self, entry: Claimed) -> bool {
        let mut waiting = self.handoff.lock();
        let Some(waiting) = waiting.as_mut() else {
            return false;
        };
        waiting.push_back(entry);
        // The room goes with the entry, until the worker takes it.
        self.held = false;
        self.handoff.handed.notify_one();
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.handoff.room.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(outbox_id: i64) -> Claimed {
        Claimed {
            outbox_id,
            message_id: format!("m{outbox_id}"),
            attempts: 0,
            queued_at: 0,
            document: serde_json::Value::Null,
            content_type: None,
            record_id: None,
            lease_until: 0,
        }
    }

    #[test]
    fn messages_are_handed_over_only_while_the_worker_keeps_up_and_has_room() {
        let handoff = Arc::new(Handoff::default());
        assert!(handoff.reserve().is_none(), "no worker runs yet");
        handoff.open();
        assert!(
            handoff.reserve().is_none(),
            "the worker has not caught up yet"
        );
        handoff.caught_up();

        let mut reserved: Vec<Reservation> = std::iter::from_fn(|| handoff.reserve()).collect();
        assert_eq!(reserved.len(), ROOM);
        // Full: the next message waits in the store, and so do those after it, room or not,
        // until the worker has claimed what waits there.
        drop(reserved.pop());
        assert!(handoff.reserve().is_none());
        assert_eq!(handoff.room.load(Ordering::Acquire), 1);

        for (n, reservation) in reserved.into_iter().enumerate() {
            assert!(reservation.hand_over(entry(n as i64)));
        }
        let taken = handoff.take(3);
        assert_eq!(
            taken.iter().map(|e| e.outbox_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(handoff.room.load(Ordering::Acquire), 4);
        handoff.caught_up();
        let late = handoff.reserve().unwrap();

        // Stopped: what was handed over and not taken goes back, and nothing more is taken.
        assert_eq!(handoff.close().len(), ROOM - 4);
        assert!(handoff.reserve().is_none());
        assert!(!late.hand_over(entry(999)));
    }
}
