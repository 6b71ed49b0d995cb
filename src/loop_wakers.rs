//! Every event loop's `mio::Waker`, in loop order, for what the loops of one process
//! (`IO_THREADS`) share: the in-process bus, the metrics board and the presence table each
//! wake the loops they hand something to. One value, set once all loops exist (a loop's waker
//! is made on its own thread), and shared by all three.

use std::sync::{Arc, OnceLock};

use mio::Waker;

#[derive(Debug, Default)]
pub struct LoopWakers {
    wakers: OnceLock<Vec<Arc<Waker>>>,
}

impl LoopWakers {
    /// All loops exist: their wakers, in loop order. Until then waking does nothing (what
    /// was handed over waits for the loop's next turn).
    pub fn connect(&self, wakers: Vec<Arc<Waker>>) {
        let _ = self.wakers.set(wakers);
    }

    /// Wakes loop `index`.
    pub fn wake(&self, index: usize) {
        if let Some(waker) = self.wakers.get().and_then(|wakers| wakers.get(index)) {
            let _ = waker.wake();
        }
    }

    /// Wakes every loop but `except`.
    pub fn wake_others(&self, except: usize) {
        let loops = self.wakers.get().map_or(0, Vec::len);
        for index in (0..loops).filter(|index| *index != except) {
            self.wake(index);
        }
    }
}
