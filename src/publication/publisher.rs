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
use super::plugin::Sink;
use crate::catalog::publication::Publication;
use crate::error::{BridgeError, Result};
use crate::kafka::{self, BridgeContext, ErrorMailbox, Options};
use crate::shmem::{self, SlotId};
use crate::worker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Most events in one Kafka transaction; a larger PostgreSQL transaction spans several.
const MAX_EVENTS_PER_KAFKA_TRANSACTION: usize = 50_000;
/// Longest a Kafka transaction stays open while decoding goes on.
pub(crate) const MAX_KAFKA_TRANSACTION_AGE: Duration = Duration::from_millis(500);
/// Kafka calls block for at most this long at a time, so that signals are served.
const CALL_SLICE: Duration = Duration::from_secs(1);
/// Longest wait for the broker during set-up or a commit.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where an event stands in the publication's stream: its transaction's commit LSN, then
/// its index within that transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Position {
    pub(crate) commit_lsn: u64,
    pub(crate) seq: i64,
}

#[derive(Serialize, Deserialize)]
struct ProgressRecord {
    publication: String,
    commit_lsn: u64,
    seq: i64,
}

pub(crate) struct Publisher {
    producer: ThreadedProducer<BridgeContext>,
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
    pub(crate) fn connect(publication: &Publication, options: &Options, status: SlotId) -> Result<Publisher> {
        let transactional_id = transactional_id(publication);
        let brokers = publication.brokers.as_str();
        let config = options.client_config(
            brokers,
            &[("queue.buffering.max.kbytes", "16384"), ("linger.ms", "5")],
            &[("transactional.id", &transactional_id), ("enable.idempotence", "true")],
        );
        let errors = ErrorMailbox::default();
        let producer: ThreadedProducer<BridgeContext> =
            config.create_with_context(BridgeContext { errors: errors.clone() })?;
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
        let committed = read_progress(&reader, &publication.progress_topic, &transactional_id)?;
        if let Some(position) = committed {
            shmem::update(status, |slot| {
                slot.published_lsn = position.commit_lsn;
                slot.published_seq = position.seq;
            });
        }
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
        })
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

    /// Commits the open Kafka transaction, with its progress record, if there is one.
    pub(crate) fn commit_transaction(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let record = ProgressRecord {
            publication: self.publication.clone(),
            commit_lsn: open.last.commit_lsn,
            seq: open.last.seq,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let progress = BaseRecord::to(&self.progress_topic).partition(0).key(&self.transactional_id).payload(&value);
        self.send(progress)?;
        let outcome =
            retry_while_timed_out("committing a Kafka transaction", || self.producer.commit_transaction(CALL_SLICE));
        if let Err(e) = outcome {
            // The transaction is lost either way; what it held is published again by the
            // next session, which starts from the last committed progress.
            let _ = self.producer.abort_transaction(CALL_SLICE);
            self.confirm.kafka_transaction_failed();
            let detail = self.errors.take().map(|d| format!(" ({d})")).unwrap_or_default();
            return Err(BridgeError::Kafka(format!("{e}{detail}")));
        }
        self.committed = Some(open.last);
        self.confirm.kafka_transaction_committed();
        shmem::update(self.status, |slot| {
            slot.published_lsn = open.last.commit_lsn;
            slot.published_seq = open.last.seq;
            slot.published_commit_time = open.last_commit_time;
        });
        Ok(())
    }

    fn send<K, P>(&self, mut record: BaseRecord<'_, K, P>) -> Result<()>
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
                Err((e, back)) => {
                    return Err(BridgeError::Kafka(format!("producing to topic \"{}\": {e}", back.topic)));
                }
            }
        }
    }

    fn begin_if_needed(&mut self, position: Position) -> Result<&mut OpenTransaction> {
        if self.open.is_none() {
            self.producer.begin_transaction()?;
            self.open =
                Some(OpenTransaction { opened_at: Instant::now(), events: 0, last: position, last_commit_time: 0 });
            self.confirm.kafka_transaction_opened();
        }
        Ok(self.open.as_mut().expect("just opened"))
    }
}

impl Sink for Publisher {
    fn event(&mut self, txn: &TxnInfo, seq: i64, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()> {
        let position = Position { commit_lsn: txn.commit_lsn, seq };
        if self.committed.is_some_and(|c| position <= c) {
            return Ok(());
        }
        self.begin_if_needed(position)?;
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        self.send(record)?;
        self.events_total += 1;
        let open = self.open.as_mut().expect("opened above");
        open.events += 1;
        open.last = position;
        open.last_commit_time = txn.commit_time;
        if open.events >= MAX_EVENTS_PER_KAFKA_TRANSACTION {
            self.commit_transaction()?;
        }
        Ok(())
    }

    fn commit(&mut self, txn: &TxnInfo) -> Result<()> {
        self.confirm.transaction_completed(txn.end_lsn);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Stable for the publication, and distinct for every server, database and publication
/// (a publication dropped and created again under its name is another one).
pub(crate) fn transactional_id(publication: &Publication) -> String {
    // SAFETY: read-only backend globals, set before any worker code runs.
    let (system, database) = unsafe { (pgrx::pg_sys::GetSystemIdentifier(), pgrx::pg_sys::MyDatabaseId) };
    format!("pg_kafka_bridge.{system}.{}.{}", u32::from(database), publication.id)
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
fn read_progress(config: &ClientConfig, topic: &str, key: &str) -> Result<Option<Position>> {
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
                        found = record.map(|r| Position { commit_lsn: r.commit_lsn, seq: r.seq }).or(found);
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
