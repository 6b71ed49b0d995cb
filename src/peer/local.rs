//! The in-process bus between event loops (`IO_THREADS` > 1 without `PEER`): each loop is to
//! the others what a peer instance is, minus Redis. What a loop would publish to peers (stored
//! messages, leaves, typing, lines for a user's devices or a room, activity, presence) is
//! put on every other loop's event channel, as it is published, as the `PeerEvent` a
//! subscriber would have delivered, so the same sequencer, gap filling and presence paths
//! serve both; the other loops are woken once at the end of the publishing loop's turn.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::PeerEvent;
use crate::loop_wakers::LoopWakers;

/// Every loop's event channel, and their wakers.
pub struct LocalBus {
    senders: Vec<Sender<PeerEvent>>,
    receivers: Vec<Option<Receiver<PeerEvent>>>,
    wakers: Arc<LoopWakers>,
}

/// One loop's end of the bus.
pub struct BusMember {
    pub index: usize,
    pub senders: Vec<Sender<PeerEvent>>,
    pub events: Receiver<PeerEvent>,
    pub wakers: Arc<LoopWakers>,
}

impl LocalBus {
    pub fn new(loops: usize, wakers: Arc<LoopWakers>) -> LocalBus {
        let (senders, receivers) = (0..loops)
            .map(|_| {
                let (sender, receiver) = crossbeam_channel::unbounded();
                (sender, Some(receiver))
            })
            .unzip();
        LocalBus {
            senders,
            receivers,
            wakers,
        }
    }

    /// Loop `index`'s end (each taken once).
    pub fn member(&mut self, index: usize) -> Option<BusMember> {
        Some(BusMember {
            index,
            senders: self.senders.clone(),
            events: self.receivers.get_mut(index)?.take()?,
            wakers: self.wakers.clone(),
        })
    }
}

impl BusMember {
    /// Puts `event` on every other loop's channel (they are woken by `wake_others`).
    pub fn send_to_others(&self, event: PeerEvent) {
        for (index, sender) in self.senders.iter().enumerate() {
            if index != self.index {
                let _ = sender.send(event.clone());
            }
        }
    }

    /// Wakes every other loop, once for whatever was sent since the last wake.
    ///
    /// Why not per event: a wake is an `eventfd` write and, for a sleeping loop, a `poll`
    /// return; waking per event cost two loops in scenario (a) ~28,000 extra syscalls a second
    /// (one per stored message), where one per turn costs what the turn's batch needs.
    pub fn wake_others(&self) {
        self.wakers.wake_others(self.index);
    }
}
