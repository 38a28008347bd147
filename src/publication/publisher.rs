//! The Kafka side of a publication: a transactional producer whose `transactional.id` is
//! stable for the publication, and the progress records that make publishing exactly once.
//!
//! Each Kafka transaction carries change events and, last, a progress record on the
//! publication's progress topic naming the position `(commit_lsn, seq)` of its last event.
//! A new incarnation fences the previous one (`init_transactions`), reads the last committed
//! progress record, and skips every event at or before it. The slot's confirmed position
//! only moves past a PostgreSQL transaction once all its events are committed to Kafka.

use super::confirm::ConfirmTracker;
use super::events::TxnInfo;
use super::history;
use super::plugin::Sink;
use super::snapshot::SnapshotCursor;
use crate::catalog::publication::{OnEventError, Publication};
use crate::error::{BridgeError, Result};
use crate::kafka::{self, ErrorMailbox, Options};
use crate::shmem::{self, SlotId};
use crate::worker;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Most events in one Kafka transaction; a larger PostgreSQL transaction spans several.
const MAX_EVENTS_PER_KAFKA_TRANSACTION: usize = 50_000;
/// Longest a Kafka transaction stays open while decoding goes on.
pub(crate) const MAX_KAFKA_TRANSACTION_AGE: Duration = Duration::from_millis(500);
/// Kafka calls block for at most this long at a time, so that signals are served.
const CALL_SLICE: Duration = Duration::from_secs(1);
/// Longest wait for the broker during set-up or a commit.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the broker to abort a transaction when a session ends.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where an event stands in the publication's stream: its transaction's commit LSN, then
/// its index within that transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct Position {
    pub(crate) commit_lsn: u64,
    pub(crate) seq: i64,
}

#[derive(Serialize, Deserialize)]
struct ProgressRecord {
    publication: String,
    commit_lsn: u64,
    seq: i64,
    /// The server's timeline when the record was written (absent before release 0.3).
    #[serde(default)]
    timeline: Option<u32>,
    /// Where the publication's snapshot run stands (absent before release 0.4, and when
    /// no table was ever snapshotted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotCursor>,
}

pub(crate) struct Publisher {
    producer: Arc<ThreadedProducer<PublisherContext>>,
    pub(crate) errors: ErrorMailbox,
    progress_topic: String,
    transactional_id: String,
    publication: String,
    /// Everything at or before this position is in Kafka already.
    committed: Option<Position>,
    open: Option<OpenTransaction>,
    /// When the slot may be confirmed (the rule is written there).
    confirm: ConfirmTracker,
    pub(crate) events_total: u64,
    /// The worker's status slot, where each Kafka commit shows its position at once (a
    /// large PostgreSQL transaction is published in several while it is replayed).
    status: SlotId,
    on_event_error: OnEventError,
    /// Events Kafka can never take, found in this session and not yet recorded in
    /// `kafka.publication_dead_letters`: no Kafka commit may cover them before they are.
    pending_dead_letters: Vec<PublicationDeadLetter>,
    /// Positions beyond the committed progress that are recorded as dead letters already.
    recorded_dead_letters: HashSet<Position>,
    /// Deliveries the broker refused, by tag, filled by the delivery callback.
    refused: Arc<parking_lot::Mutex<Vec<(usize, String)>>>,
    /// The positions of the events sent in the open Kafka transaction: an event's tag is
    /// its index here.
    sent: Vec<Position>,
    /// What earlier sessions learnt of refused deliveries.
    refusals: HashMap<Position, Refusal>,
    /// The event being sent alone, to learn whether the broker refuses it.
    isolating: Option<Position>,
    /// The snapshot cursor of the last committed progress record.
    snapshot_committed: Option<SnapshotCursor>,
    /// The snapshot cursor after the chunk in the open Kafka transaction.
    snapshot_open: Option<SnapshotCursor>,
    /// Events that belong together are being handed over (a snapshot chunk, the copies
    /// of a TRUNCATE): they are not split between Kafka transactions.
    hold_commits: bool,
    /// Partition counts of the topics events went to every partition of.
    partitions: HashMap<String, i32>,
}

/// A delivery the broker refused for good (too large for the topic, an invalid record, a
/// policy): the whole Kafka transaction fails with it. The broker refuses a batch of
/// messages as a whole, so a refused event is first only a suspect; the next session sends
/// it alone, and if the broker refuses it then, it can never be published.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    reason: String,
    /// Refused when sent alone: the event itself is at fault.
    pub(crate) isolated: bool,
}

/// The producer's callbacks: librdkafka's errors for the status view, and the deliveries
/// the broker refused for good, by the tag of their event.
pub(crate) struct PublisherContext {
    errors: ErrorMailbox,
    refused: Arc<parking_lot::Mutex<Vec<(usize, String)>>>,
}

/// The tag given to records that are not events (progress records).
const NOT_AN_EVENT: usize = usize::MAX;

impl ClientContext for PublisherContext {
    fn log(&self, _level: RDKafkaLogLevel, _facility: &str, _message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.put(format!("{error}: {reason}"));
    }
}

impl ProducerContext for PublisherContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        if let Err((error, message)) = result {
            self.errors.put(format!("delivery to topic \"{}\" failed: {error}", message.topic()));
            if tag != NOT_AN_EVENT && refused_for_good(error) {
                self.refused.lock().push((tag, format!("the broker refused it: {error}")));
            }
        }
    }
}

/// Errors with which the broker refuses a message whatever the number of attempts.
fn refused_for_good(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(MessageSizeTooLarge | MessageBatchTooLarge | InvalidTopic | InvalidRecord | PolicyViolation)
    )
}

/// An event that Kafka can never take, as `kafka.publication_dead_letters` records it.
pub(crate) struct PublicationDeadLetter {
    pub(crate) position: Position,
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) error: String,
}

struct OpenTransaction {
    opened_at: Instant,
    events: usize,
    last: Position,
    /// Commit time of the PostgreSQL transaction of `last`.
    last_commit_time: i64,
}

impl Publisher {
    /// Connects, fences any earlier incarnation and reads the committed progress.
    /// `recorded_dead_letters` reads the positions recorded as dead letters after a position.
    pub(crate) fn connect(
        publication: &Publication,
        options: &Options,
        status: SlotId,
        recorded_dead_letters: impl FnOnce(Option<Position>) -> Result<HashSet<Position>>,
        mut refusals: HashMap<Position, Refusal>,
    ) -> Result<Publisher> {
        let transactional_id = transactional_id(publication);
        let brokers = publication.brokers.as_str();
        let config = options.client_config(
            brokers,
            &[("queue.buffering.max.kbytes", "16384"), ("linger.ms", "5")],
            &[("transactional.id", &transactional_id), ("enable.idempotence", "true")],
        );
        let errors = ErrorMailbox::default();
        let refused = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let context = PublisherContext { errors: errors.clone(), refused: refused.clone() };
        let producer: Arc<ThreadedProducer<PublisherContext>> = Arc::new(config.create_with_context(context)?);
        kafka::create_topic_if_missing(&options.client_config(brokers, &[], &[]), &publication.progress_topic, true)?;
        retry_while_timed_out("initialising the Kafka transactional producer", || {
            producer.init_transactions(CALL_SLICE)
        })?;
        let reader = options.client_config(
            brokers,
            &[],
            &[
                ("group.id", &transactional_id),
                ("enable.auto.commit", "false"),
                ("isolation.level", "read_committed"),
                ("enable.partition.eof", "true"),
                ("auto.offset.reset", "error"),
            ],
        );
        let progress = read_progress(&reader, &publication.progress_topic, &transactional_id)?;
        if let Some(record) = &progress {
            history::check_progress(record.commit_lsn, record.timeline)?;
        }
        let committed = progress.as_ref().map(|r| Position { commit_lsn: r.commit_lsn, seq: r.seq });
        let snapshot_committed = progress.and_then(|r| r.snapshot);
        if let Some(position) = committed {
            shmem::update(status, |slot| {
                slot.published_lsn = position.commit_lsn;
                slot.published_seq = position.seq;
            });
        }
        let recorded_dead_letters = recorded_dead_letters(committed)?;
        refusals.retain(|position, _| committed.is_none_or(|c| *position > c));
        abort_at_exit(&producer);
        Ok(Publisher {
            producer,
            errors,
            progress_topic: publication.progress_topic.clone(),
            transactional_id,
            publication: publication.name.clone(),
            committed,
            open: None,
            confirm: ConfirmTracker::default(),
            events_total: 0,
            status,
            on_event_error: publication.on_event_error,
            pending_dead_letters: Vec::new(),
            recorded_dead_letters,
            refused,
            sent: Vec::new(),
            refusals,
            isolating: None,
            snapshot_committed,
            snapshot_open: None,
            hold_commits: false,
            partitions: HashMap::new(),
        })
    }

    /// The refusals of this session's deliveries, for the next session (see [`Refusal`]).
    pub(crate) fn take_refusals(&mut self) -> Vec<(Position, Refusal)> {
        let isolating = self.isolating.take();
        let refused = std::mem::take(&mut *self.refused.lock());
        refused
            .into_iter()
            .filter_map(|(tag, reason)| self.sent.get(tag).map(|position| (*position, reason)))
            .map(|(position, reason)| (position, Refusal { reason, isolated: isolating == Some(position) }))
            .collect()
    }

    /// The dead letters to record before the next Kafka commit; once recorded, the caller
    /// hands them back with [`Publisher::dead_letters_recorded`].
    pub(crate) fn take_dead_letters(&mut self) -> Vec<PublicationDeadLetter> {
        std::mem::take(&mut self.pending_dead_letters)
    }

    pub(crate) fn dead_letters_recorded(&mut self, letters: &[PublicationDeadLetter]) {
        self.recorded_dead_letters.extend(letters.iter().map(|l| l.position));
    }

    /// Aborts the open Kafka transaction, if any: its events are published again by the
    /// next session, which starts from the committed progress.
    pub(crate) fn abort_transaction(&mut self) {
        if self.open.take().is_some() {
            let _ = self.producer.abort_transaction(ABORT_TIMEOUT);
            self.confirm.kafka_transaction_failed();
        }
        self.snapshot_open = None;
    }

    /// The snapshot cursor after the last chunk handed to Kafka, and whether the open Kafka
    /// transaction holds that chunk (it is then to be committed as soon as it can).
    pub(crate) fn snapshot_cursor(&self) -> (Option<SnapshotCursor>, bool) {
        match &self.snapshot_open {
            Some(open) => (Some(open.clone()), true),
            None => (self.snapshot_committed.clone(), false),
        }
    }

    pub(crate) fn has_open_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub(crate) fn open_transaction_age(&self) -> Duration {
        self.open.as_ref().map_or(Duration::ZERO, |t| t.opened_at.elapsed())
    }

    /// The LSN up to which the slot may now be confirmed, if it moved (see
    /// [`ConfirmTracker`]).
    pub(crate) fn confirmable(&mut self, caught_up: bool, decoded_up_to: u64) -> Option<u64> {
        self.confirm.take(caught_up, decoded_up_to)
    }

    /// Commits the open Kafka transaction, with its progress record, if there is one. The
    /// dead letters it covers must be recorded first ([`Publisher::take_dead_letters`]).
    pub(crate) fn commit_transaction(&mut self) -> Result<()> {
        if !self.pending_dead_letters.is_empty() {
            return Err(BridgeError::DeadLettersToRecord);
        }
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let record = ProgressRecord {
            publication: self.publication.clone(),
            commit_lsn: open.last.commit_lsn,
            seq: open.last.seq,
            timeline: Some(history::flushed_wal().1),
            snapshot: self.snapshot_open.clone().or_else(|| self.snapshot_committed.clone()),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let progress = BaseRecord::with_opaque_to(&self.progress_topic, NOT_AN_EVENT)
            .partition(0)
            .key(&self.transactional_id)
            .payload(&value);
        self.send(progress)?;
        // The commit flushes first, in slices of 100 ms that each run to their end: flushed
        // here, it finds nothing left to wait for.
        let outcome = self.flush().and_then(|()| {
            retry_while_timed_out("committing a Kafka transaction", || self.producer.commit_transaction(CALL_SLICE))
        });
        if let Err(e) = outcome {
            // The transaction is lost either way; what it held is published again by the
            // next session, which starts from the last committed progress.
            let _ = self.producer.abort_transaction(CALL_SLICE);
            self.confirm.kafka_transaction_failed();
            self.snapshot_open = None;
            let detail = self.errors.take().map(|d| format!(" ({d})")).unwrap_or_default();
            return Err(BridgeError::Kafka(format!("{e}{detail}")));
        }
        self.committed = Some(open.last);
        if let Some(cursor) = self.snapshot_open.take() {
            self.snapshot_committed = Some(cursor);
        }
        self.confirm.kafka_transaction_committed();
        shmem::update(self.status, |slot| {
            slot.published_lsn = open.last.commit_lsn;
            slot.published_seq = open.last.seq;
            slot.published_commit_time = open.last_commit_time;
        });
        Ok(())
    }

    fn send<K, P>(&self, mut record: BaseRecord<'_, K, P, usize>) -> Result<()>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    // The producer's own thread drains the queue; wait for room.
                    std::thread::sleep(Duration::from_micros(500));
                    worker::check_interrupts();
                }
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    let size =
                        back.payload.map_or(0, |p| p.to_bytes().len()) + back.key.map_or(0, |k| k.to_bytes().len());
                    return Err(BridgeError::EventRejected(format!(
                        "{e}: {size} bytes, more than the producer's message.max.bytes (raise it in the \
                         publication's options, and the topic's max.message.bytes on the broker)"
                    )));
                }
                Err((e, back)) => {
                    return Err(BridgeError::Kafka(format!("producing to topic \"{}\": {e}", back.topic)));
                }
            }
        }
    }

    /// Waits until every message sent so far is delivered or refused (its delivery report
    /// handled by the producer's thread).
    fn flush(&self) -> Result<()> {
        retry_while_timed_out("flushing the producer", || flush_now(&self.producer, CALL_SLICE))
    }

    fn begin_if_needed(&mut self, position: Position) -> Result<&mut OpenTransaction> {
        if self.open.is_none() {
            self.producer.begin_transaction()?;
            // Every delivery of the previous transaction has been reported: it committed.
            self.sent.clear();
            self.open =
                Some(OpenTransaction { opened_at: Instant::now(), events: 0, last: position, last_commit_time: 0 });
            self.confirm.kafka_transaction_opened();
        }
        Ok(self.open.as_mut().expect("just opened"))
    }
}

impl Publisher {
    /// Makes the open Kafka transaction's progress cover `position`, opening one if needed.
    fn cover(&mut self, position: Position, txn: &TxnInfo) -> Result<()> {
        let open = self.begin_if_needed(position)?;
        open.last = position;
        open.last_commit_time = txn.commit_time;
        Ok(())
    }

    /// An event Kafka can never take: a dead letter, or the end of the session.
    fn reject(&mut self, position: Position, txn: &TxnInfo, event: RejectedEvent<'_>) -> Result<()> {
        let RejectedEvent { topic, key, value, reason } = event;
        if self.on_event_error == OnEventError::Stop {
            return Err(BridgeError::EventRejected(format!(
                "the event at {}/{} for topic \"{topic}\" can never be published: {reason} (the publication's \
                 on_event_error is 'stop')",
                history::lsn_text(position.commit_lsn),
                position.seq
            )));
        }
        self.pending_dead_letters.push(PublicationDeadLetter {
            position,
            topic: topic.to_owned(),
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            error: reason,
        });
        self.cover(position, txn)
    }

    /// Commits from inside a long replay when the Kafka transaction is due, so that it never
    /// reaches the broker's transaction timeout.
    fn commit_if_due(&mut self) -> Result<()> {
        if self.hold_commits {
            return Ok(());
        }
        let due = self.open.as_ref().is_some_and(|t| {
            t.events >= MAX_EVENTS_PER_KAFKA_TRANSACTION || t.opened_at.elapsed() >= MAX_KAFKA_TRANSACTION_AGE
        });
        if due {
            self.commit_transaction()?;
        }
        Ok(())
    }
}

/// What [`Publisher::reject`] records of an event.
struct RejectedEvent<'a> {
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    reason: String,
}

impl Publisher {
    /// The number of partitions of `topic`, looked up once per session; 0 if the broker
    /// does not know the topic yet (it is created by the first message sent to it).
    fn partition_count(&mut self, topic: &str) -> Result<i32> {
        if let Some(count) = self.partitions.get(topic) {
            return Ok(*count);
        }
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), SETUP_TIMEOUT)
            .map_err(|e| BridgeError::Kafka(format!("reading the partitions of topic \"{topic}\": {e}")))?;
        let count = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
        if count > 0 {
            self.partitions.insert(topic.to_owned(), count);
        }
        Ok(count)
    }

    /// Sends one event, to `partition` if given (else the key's); see [`Sink::event`].
    fn publish(
        &mut self,
        txn: &TxnInfo,
        seq: i64,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        partition: Option<i32>,
    ) -> Result<()> {
        // A large transaction is replayed inside one call of the decoder: serve SIGTERM here.
        worker::check_interrupts();
        let position = Position { commit_lsn: txn.commit_lsn, seq };
        if self.committed.is_some_and(|c| position <= c) {
            return Ok(());
        }
        if !self.recorded_dead_letters.is_empty() && self.recorded_dead_letters.contains(&position) {
            self.cover(position, txn)?;
            return self.commit_if_due();
        }
        let known = if self.refusals.is_empty() { None } else { self.refusals.get(&position).cloned() };
        if let Some(reason) =
            kafka::topic_name_problem(topic).or(known.as_ref().filter(|r| r.isolated).map(|r| r.reason.clone()))
        {
            self.reject(position, txn, RejectedEvent { topic, key, value, reason })?;
            return self.commit_if_due();
        }
        self.begin_if_needed(position)?;
        if known.is_some() {
            // A suspect: alone in its batch, the broker's answer is about this event only.
            self.flush()?;
            self.isolating = Some(position);
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, self.sent.len());
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        match self.send(record) {
            Ok(()) => {
                self.events_total += 1;
                self.sent.push(position);
                let open = self.open.as_mut().expect("opened above");
                open.events += 1;
                open.last = position;
                open.last_commit_time = txn.commit_time;
            }
            Err(BridgeError::EventRejected(reason)) => {
                self.reject(position, txn, RejectedEvent { topic, key, value, reason })?
            }
            Err(e) => return Err(e),
        }
        if self.isolating == Some(position) {
            self.flush()?;
            if !self.refused.lock().is_empty() {
                // The transaction cannot commit now; the next session knows the event.
                return Err(BridgeError::Kafka(format!(
                    "the broker refused the event at {}/{} for good",
                    history::lsn_text(position.commit_lsn),
                    position.seq
                )));
            }
            self.isolating = None;
            self.refusals.remove(&position);
        }
        self.commit_if_due()
    }
}

impl Sink for Publisher {
    fn event(&mut self, txn: &TxnInfo, seq: i64, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()> {
        self.publish(txn, seq, topic, key, value, None)
    }

    fn event_to_every_partition(&mut self, txn: &TxnInfo, seq: i64, topic: &str, value: &[u8]) -> Result<()> {
        let count = self.partition_count(topic)?;
        if count == 0 {
            return self.publish(txn, seq, topic, None, Some(value), None);
        }
        self.hold_commits = true;
        let sent = (0..count).try_for_each(|p| self.publish(txn, seq, topic, None, Some(value), Some(p)));
        self.hold_commits = false;
        sent?;
        self.commit_if_due()
    }

    fn skipped(&mut self) -> Result<()> {
        worker::check_interrupts();
        self.commit_if_due()
    }

    fn commit(&mut self, txn: &TxnInfo) -> Result<()> {
        self.confirm.transaction_completed(txn.end_lsn);
        Ok(())
    }

    fn begin_chunk(&mut self) -> Result<()> {
        self.commit_if_due()?;
        self.hold_commits = true;
        Ok(())
    }

    fn end_chunk(&mut self, txn: &TxnInfo, cursor: SnapshotCursor) -> Result<()> {
        self.hold_commits = false;
        if self.open.is_none() {
            // No row of the chunk was left to publish: the cursor still moves, with a
            // progress record at the watermark (before any event of its transaction).
            self.cover(Position { commit_lsn: txn.commit_lsn, seq: -1 }, txn)?;
        }
        self.snapshot_open = Some(cursor);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.abort_transaction();
    }
}

/// The producer whose open Kafka transaction is aborted if the process exits (SIGTERM ends
/// a worker without unwinding): `read_committed` readers of its partitions need not wait for
/// the broker's transaction timeout.
static PRODUCER_AT_EXIT: parking_lot::Mutex<Option<Weak<ThreadedProducer<PublisherContext>>>> =
    parking_lot::Mutex::new(None);

fn abort_at_exit(producer: &Arc<ThreadedProducer<PublisherContext>>) {
    static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    *PRODUCER_AT_EXIT.lock() = Some(Arc::downgrade(producer));
    if !REGISTERED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: on the worker's main thread; registers a `'static` callback with a dummy
        // argument, once per process (REGISTERED).
        unsafe { pgrx::pg_sys::before_shmem_exit(Some(abort_open_transaction_at_exit), pgrx::pg_sys::Datum::from(0)) };
    }
}

/// # Safety
/// Only PostgreSQL calls it, from `proc_exit()` on the worker's main thread, with the dummy
/// argument registered above (never read).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn abort_open_transaction_at_exit(_code: i32, _arg: pgrx::pg_sys::Datum) {
    let producer = PRODUCER_AT_EXIT.lock().take().and_then(|weak| weak.upgrade());
    if let Some(producer) = producer {
        // Fails harmlessly when no transaction is open.
        let _ = producer.abort_transaction(ABORT_TIMEOUT);
    }
}

/// Stable for the publication, and distinct for every server, database and publication
/// (a publication dropped and created again under its name is another one).
pub(crate) fn transactional_id(publication: &Publication) -> String {
    // SAFETY: read-only backend globals, set before any worker code runs.
    let (system, database) = unsafe { (pgrx::pg_sys::GetSystemIdentifier(), pgrx::pg_sys::MyDatabaseId) };
    format!("pg_kafka_bridge.{system}.{}.{}", u32::from(database), publication.id)
}

/// librdkafka's flush, which returns as soon as the last delivery report is handled. The
/// wrapper's `flush` polls the event queue in slices of 100 ms that each last to their end,
/// which made every Kafka transaction's commit take 100 ms longer than the broker did.
fn flush_now<C: ProducerContext>(producer: &ThreadedProducer<C>, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: the client handle belongs to `producer`, alive for the call; rd_kafka_flush is
    // thread-safe. With delivery reports as events (how the wrapper configures the producer)
    // it only waits for the count of undelivered messages to reach zero, which the
    // producer's own polling thread brings about by handling the reports.
    let code = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), timeout_ms) };
    match RDKafkaErrorCode::from(code) {
        RDKafkaErrorCode::NoError => Ok(()),
        error => Err(KafkaError::Flush(error)),
    }
}

/// Repeats a Kafka call that timed out (each try blocks for [`CALL_SLICE`] at most, so that
/// SIGTERM is served), until it succeeds, fails otherwise, or [`SETUP_TIMEOUT`] passes.
fn retry_while_timed_out(what: &str, mut call: impl FnMut() -> rdkafka::error::KafkaResult<()>) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e))
                if e.code() == RDKafkaErrorCode::OperationTimedOut && Instant::now() < deadline =>
            {
                worker::check_interrupts();
            }
            // A commit first flushes the queue; a flush that timed out leaves it queued.
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) if Instant::now() < deadline => {
                worker::check_interrupts();
            }
            Err(e) => return Err(BridgeError::Kafka(format!("{what}: {e}"))),
        }
    }
}

/// The position in the last committed progress record of `key`, read from the end of
/// partition 0 backwards by a consumer of `config` (read_committed isolation).
fn read_progress(config: &ClientConfig, topic: &str, key: &str) -> Result<Option<ProgressRecord>> {
    let consumer: BaseConsumer = config.create()?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, SETUP_TIMEOUT)
        .map_err(|e| BridgeError::Kafka(format!("reading the progress topic \"{topic}\": {e}")))?;
    let mut window = 1_000i64;
    let mut end = high;
    while end > low {
        let start = (end - window).max(low);
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Offset(start))?;
        consumer.assign(&list)?;
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut found = None;
        loop {
            worker::check_interrupts();
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if m.offset() >= end {
                        break;
                    }
                    if m.key() == Some(key.as_bytes()) {
                        let record: Option<ProgressRecord> = m.payload().and_then(|p| serde_json::from_slice(p).ok());
                        found = record.or(found);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(BridgeError::Kafka(format!("reading the progress topic \"{topic}\": {e}"))),
                None if Instant::now() > deadline => {
                    return Err(BridgeError::Kafka(format!("timed out reading the progress topic \"{topic}\"")))
                }
                None => {}
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        end = start;
        window *= 8;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    /// What the wrapper's flush does (each poll slice of 100 ms runs to its end) made every
    /// Kafka commit 100 ms slower: `flush_now` must return with the delivery.
    #[test]
    fn flush_returns_with_the_last_delivery() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("flushed", 1, 1).expect("topic");
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).create().expect("producer");
        let mut fastest = Duration::MAX;
        for _ in 0..5 {
            producer.send(BaseRecord::<str, str>::to("flushed").payload("x")).expect("queued");
            let started = Instant::now();
            flush_now(&producer, Duration::from_secs(10)).expect("flushed");
            assert_eq!(producer.in_flight_count(), 0, "everything delivered");
            fastest = fastest.min(started.elapsed());
        }
        assert!(fastest < Duration::from_millis(50), "the fastest of 5 flushes took {fastest:?}");
    }
}
