//! The notify hub: wakes long polls when a namespace's journal grows.
//!
//! Invariant (enforced by the callers in `routes`): a namespace's new head is published only
//! after the journal rows up to it are committed, and a long poll subscribes before it reads
//! the head it compares with, so a change can never slip between the check and the wait.
//! The in-process hub keeps one `watch` channel per namespace holding the latest head; a
//! PostgreSQL `LISTEN/NOTIFY` hub can implement the same trait to wake other nodes.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

pub trait NotifyHub: Send + Sync + 'static {
    /// A receiver of the namespace's latest published head.
    fn subscribe(&self, ns: i64) -> watch::Receiver<i64>;
    /// Announces that the namespace's journal now reaches `head`.
    fn publish(&self, ns: i64, head: i64);
}

/// Notification within one `dbx serve` process.
#[derive(Default)]
pub struct LocalHub {
    channels: Mutex<HashMap<i64, watch::Sender<i64>>>,
}

impl LocalHub {
    fn sender(&self, ns: i64) -> watch::Sender<i64> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(ns).or_insert_with(|| watch::channel(0).0).clone()
    }
}

impl NotifyHub for LocalHub {
    fn subscribe(&self, ns: i64) -> watch::Receiver<i64> {
        self.sender(ns).subscribe()
    }

    fn publish(&self, ns: i64, head: i64) {
        self.sender(ns).send_if_modified(|current| {
            if head > *current {
                *current = head;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_wakes_subscribers_and_never_goes_back() {
        let hub = LocalHub::default();
        let mut rx = hub.subscribe(7);
        let mut other = hub.subscribe(8);
        hub.publish(7, 3);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 3);
        hub.publish(7, 2);
        assert!(!rx.has_changed().unwrap());
        assert!(!other.has_changed().unwrap());
        hub.publish(8, 1);
        other.changed().await.unwrap();
        assert_eq!(*other.borrow(), 1);
    }
}
