//! When a publication's slot may be confirmed, and up to where.
//!
//! Confirming a slot up to an LSN tells PostgreSQL that every transaction committing before
//! it is dealt with: after a restart, decoding skips them, and the WAL they need may go. So
//! the slot is the durable lower bound of what the publication has published, and it must
//! never pass a transaction that is not entirely in Kafka. The rule:
//!
//! 1. A PostgreSQL transaction is *completed* when its last event has been handed to the
//!    producer (the decoder's commit callback). Its end LSN may be confirmed once the Kafka
//!    transaction holding its last event has committed; if it had no event at all (a
//!    transaction of unpublished tables), at once, unless a Kafka transaction is open (then
//!    with that one: confirming it would also confirm whatever the open one holds, if the
//!    positions interleave, so it waits for the commit).
//! 2. A Kafka transaction that fails is lost as a whole: the transactions completed in it
//!    are not confirmed, and the next session publishes them again from the slot, skipping
//!    what the progress record shows as committed (the upper bound).
//! 3. When decoding has caught up with the flushed WAL and no Kafka transaction is open,
//!    all decoded WAL is dealt with, whatever wrote it: it may be confirmed. This is the
//!    heartbeat that keeps an idle publication's slot (and the WAL it retains) moving.
//!    Transactions still running have not committed before that point, so confirming it
//!    does not skip them.
//!
//! Confirmed positions only grow: a smaller one is never handed out after a larger one.

#[derive(Debug, Default)]
pub(crate) struct ConfirmTracker {
    /// Whether a Kafka transaction is open.
    kafka_open: bool,
    /// End LSN of the last PostgreSQL transaction completed inside the open Kafka one.
    completed_in_open: Option<u64>,
    /// End LSN that may be confirmed and was not handed out yet.
    confirmable: Option<u64>,
    /// The largest position handed out so far.
    confirmed: u64,
}

impl ConfirmTracker {
    pub(crate) fn kafka_transaction_opened(&mut self) {
        self.kafka_open = true;
    }

    /// The last event of the PostgreSQL transaction ending at `end_lsn` was handed over.
    pub(crate) fn transaction_completed(&mut self, end_lsn: u64) {
        if self.kafka_open {
            self.completed_in_open = Some(end_lsn);
        } else {
            self.confirmable = Some(end_lsn);
        }
    }

    pub(crate) fn kafka_transaction_committed(&mut self) {
        self.kafka_open = false;
        if let Some(end) = self.completed_in_open.take() {
            self.confirmable = Some(end);
        }
    }

    pub(crate) fn kafka_transaction_failed(&mut self) {
        self.kafka_open = false;
        self.completed_in_open = None;
    }

    /// The position the slot may be confirmed up to now, if it moved: `decoded_up_to` is the
    /// end of the WAL decoded so far, `caught_up` whether that is all the flushed WAL.
    pub(crate) fn take(&mut self, caught_up: bool, decoded_up_to: u64) -> Option<u64> {
        let mut next = self.confirmable.take();
        if caught_up && !self.kafka_open {
            next = Some(next.map_or(decoded_up_to, |n| n.max(decoded_up_to)));
        }
        let next = next.filter(|n| *n > self.confirmed)?;
        self.confirmed = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_confirmed_only_after_its_kafka_commit() {
        let mut t = ConfirmTracker::default();
        t.kafka_transaction_opened();
        t.transaction_completed(100);
        assert_eq!(t.take(false, 150), None, "not while its Kafka transaction is open");
        assert_eq!(t.take(true, 150), None, "not even when caught up");
        t.kafka_transaction_committed();
        assert_eq!(t.take(false, 150), Some(100));
        assert_eq!(t.take(false, 150), None, "handed out once");
    }

    #[test]
    fn a_failed_kafka_transaction_confirms_nothing_it_held() {
        let mut t = ConfirmTracker::default();
        t.kafka_transaction_opened();
        t.transaction_completed(100);
        t.kafka_transaction_failed();
        assert_eq!(t.take(false, 150), None);
        // The next session decodes it again and commits it.
        t.kafka_transaction_opened();
        t.transaction_completed(100);
        t.kafka_transaction_committed();
        assert_eq!(t.take(false, 150), Some(100));
    }

    #[test]
    fn a_large_transaction_over_several_kafka_transactions_is_confirmed_at_the_last() {
        let mut t = ConfirmTracker::default();
        t.kafka_transaction_opened();
        t.kafka_transaction_committed(); // the first part: no transaction completed in it
        assert_eq!(t.take(false, 500), None);
        t.kafka_transaction_opened();
        t.transaction_completed(400);
        t.kafka_transaction_committed();
        assert_eq!(t.take(false, 500), Some(400));
    }

    #[test]
    fn transactions_without_events_are_confirmed_unless_a_kafka_transaction_is_open() {
        let mut t = ConfirmTracker::default();
        t.transaction_completed(50);
        assert_eq!(t.take(false, 60), Some(50));
        t.kafka_transaction_opened();
        t.transaction_completed(70); // had events in the open Kafka transaction
        t.transaction_completed(80); // had none, but comes after
        assert_eq!(t.take(false, 90), None);
        t.kafka_transaction_committed();
        assert_eq!(t.take(false, 90), Some(80));
    }

    #[test]
    fn idle_and_caught_up_confirms_all_decoded_wal() {
        let mut t = ConfirmTracker::default();
        assert_eq!(t.take(false, 1_000), None, "not before catching up");
        assert_eq!(t.take(true, 1_000), Some(1_000));
        assert_eq!(t.take(true, 1_000), None, "nothing new");
        t.kafka_transaction_opened();
        assert_eq!(t.take(true, 2_000), None, "not while a Kafka transaction is open");
        t.kafka_transaction_committed();
        assert_eq!(t.take(true, 2_000), Some(2_000));
    }

    #[test]
    fn positions_only_grow() {
        let mut t = ConfirmTracker::default();
        assert_eq!(t.take(true, 1_000), Some(1_000));
        t.transaction_completed(900);
        assert_eq!(t.take(false, 1_000), None);
    }
}
