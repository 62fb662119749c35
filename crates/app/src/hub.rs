//! "Something moved": the journal's head (any process appended), a write became durable, or
//! shutdown began. Whatever holds waiting requests subscribes once and is called back: an event
//! loop rings its waker and then walks its own waiters (one wake-up per loop, however many
//! requests it holds), a blocked thread unparks, a tokio task is notified.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Callback = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Subscribers {
    next: u64,
    list: Vec<(u64, Callback)>,
}

#[derive(Clone, Default)]
pub struct Hub {
    subs: Arc<Mutex<Subscribers>>,
    notified: Arc<AtomicU64>,
}

/// Unsubscribes when dropped.
pub struct Subscription {
    subs: Arc<Mutex<Subscribers>>,
    key: u64,
}

impl Hub {
    /// Calls `wake` after every change from now on, on the notifying thread: keep it short.
    pub fn subscribe(&self, wake: impl Fn() + Send + Sync + 'static) -> Subscription {
        let mut subs = lock(&self.subs);
        let key = subs.next;
        subs.next += 1;
        subs.list.push((key, Arc::new(wake)));
        Subscription {
            subs: self.subs.clone(),
            key,
        }
    }

    /// Calls every subscriber (outside the lock: one may unsubscribe meanwhile).
    pub fn notify(&self) {
        self.notified.fetch_add(1, Ordering::Relaxed);
        let callbacks: Vec<Callback> = lock(&self.subs)
            .list
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        for wake in callbacks {
            wake();
        }
    }

    /// Subscribers right now (event loops count once, blocked threads once each).
    pub fn subscribers(&self) -> usize {
        lock(&self.subs).list.len()
    }

    /// Notifications sent so far.
    pub fn notifications(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.subs).list.retain(|(k, _)| *k != self.key);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn subscribers_are_called_until_they_unsubscribe() {
        let hub = Hub::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let sub = hub.subscribe(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
        hub.notify();
        hub.notify();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        drop(sub);
        hub.notify();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(hub.subscribers(), 0);
    }
}
