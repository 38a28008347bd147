//! Kafka to PostgreSQL. A subscription worker owns the partitions `p` of its topic with
//! `p % workers == worker index`; it reads them from the offsets stored in `kafka.offsets`
//! and applies each batch in one transaction with the offsets it moves.

pub(crate) mod apply;
pub(crate) mod consumer;
pub(crate) mod copy;
pub(crate) mod prefetch;
pub(crate) mod target;

use crate::catalog::{self, ExistingOffset, Subscription};
use crate::error::{BridgeError, Result};
use crate::format::StartFrom;
use crate::kafka::Options;
use crate::settings;
use crate::shmem::{self, PartitionProgress, SlotId, WorkerState};
use crate::worker::{self, Backoff, RateMeter};
use apply::{Applier, OffsetAdvance};
use consumer::TopicConsumer;
use pgrx::prelude::*;
use prefetch::{BatchReader, Prefetcher};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use target::Target;

/// How often applied positions are committed to the broker's consumer group (for Kafka's
/// lag tools only; PostgreSQL holds the positions that count).
const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_kafka_bridge_subscription_main(_arg: pg_sys::Datum) {
    let Some((id, slot)) = worker::attach_with_slot(&settings::database()) else {
        return;
    };
    let mut worker = SubscriptionWorker { id, subscription_id: slot.object_id, worker_index: slot.worker_index };
    worker.run();
}

enum SessionEnd {
    /// The subscription was stopped or dropped: exit.
    Exit,
    /// Something changed (partitions added, the definition altered): set up again at once.
    Restart,
}

struct SubscriptionWorker {
    id: SlotId,
    subscription_id: i32,
    worker_index: i32,
}

/// What a running session works with.
struct Session<'a> {
    subscription: &'a Subscription,
    target: &'a Target,
    source: Arc<TopicConsumer>,
    applier: &'a Applier<'a>,
}

impl SubscriptionWorker {
    fn run(&mut self) {
        let mut backoff = Backoff::default();
        loop {
            worker::check_interrupts_and_reload();
            match self.session(&mut backoff) {
                Ok(SessionEnd::Exit) => return,
                Ok(SessionEnd::Restart) => backoff.reset(),
                Err(e) => backoff.wait_after(self.id, &e),
            }
        }
    }

    /// Sets up from the catalog and consumes until an error, a change, or the end.
    fn session(&mut self, backoff: &mut Backoff) -> Result<SessionEnd> {
        let Some((subscription, target, options)) = worker::transaction(|| self.load())? else {
            return Ok(SessionEnd::Exit);
        };
        worker::report_application_name(&subscription.name);
        let source = Arc::new(TopicConsumer::connect(&subscription, &options)?);
        let all_partitions = source.partitions()?;
        let partitions = self.owned(&all_partitions, subscription.workers);
        let mut positions = self.positions(&subscription, &source, &partitions, all_partitions.len() as i32)?;
        source.assign(&positions)?;
        let applier = worker::transaction(|| Applier::new(&subscription, &target))?;
        // After a failed session the state stays "error" until this one shows progress (rows
        // applied, or the broker answering a metadata refresh): a stored position the broker
        // no longer has, say, fails each new session at its first fetch.
        shmem::update(self.id, |slot| {
            if slot.state == WorkerState::Starting {
                slot.state = WorkerState::Running;
            }
        });
        let session =
            Session { subscription: &subscription, target: &target, source: source.clone(), applier: &applier };
        self.consume(&session, &partitions, &mut positions, backoff)
    }

    fn consume(
        &mut self,
        session: &Session,
        partitions: &[i32],
        positions: &mut BTreeMap<i32, i64>,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd> {
        let subscription = session.subscription;
        let prefetcher = Prefetcher::start(BatchReader {
            source: session.source.clone(),
            shape: Arc::new(session.target.shape.clone()),
            topic: subscription.topic.clone(),
            batch_size: subscription.batch_size as usize,
            batch_timeout: Duration::from_millis(subscription.batch_timeout_ms as u64),
            stop: Arc::new(AtomicBool::new(false)),
            main_waiting: Arc::new(AtomicBool::new(false)),
        });
        let mut next_refresh = Instant::now() + settings::metadata_refresh();
        let mut meter = RateMeter::default();
        let mut next_publish = Instant::now();
        let mut published: Option<BTreeMap<i32, i64>> = None;
        loop {
            worker::check_interrupts_and_reload();
            if shmem::take_reload_request(self.id) {
                // kafka.alter_subscription changed the definition.
                return Ok(SessionEnd::Restart);
            }
            // Also when the topic went quiet: the last positions reach the group too.
            if settings::publish_consumer_offsets()
                && Instant::now() >= next_publish
                && published.as_ref() != Some(&*positions)
            {
                session.source.publish_positions(positions.iter().map(|(p, o)| (*p, *o)));
                published = Some(positions.clone());
                next_publish = Instant::now() + PUBLISH_INTERVAL;
            }
            if Instant::now() >= next_refresh {
                if self.owned(&session.source.partitions()?, subscription.workers) != partitions {
                    return Ok(SessionEnd::Restart);
                }
                // The broker answered: whatever it reported before has passed.
                shmem::update(self.id, |slot| slot.state = WorkerState::Running);
                next_refresh = Instant::now() + settings::metadata_refresh();
            }
            let Some(batch) = prefetcher.next(Duration::from_millis(100)) else {
                continue;
            };
            let mut batch = batch?;
            let broker_error = batch.broker_error.take().or_else(|| session.source.errors.take());
            let mut advances: BTreeMap<i32, OffsetAdvance> = BTreeMap::new();
            for m in &batch.messages {
                // The consumer starts at the stored positions and never seeks within a
                // session, so anything else means the assignment changed under us.
                let Some(from) = positions.get(&m.partition).copied().filter(|from| m.offset >= *from) else {
                    return Err(BridgeError::Kafka(format!(
                        "received offset {} of partition {}, which this worker does not expect; re-reading positions",
                        m.offset, m.partition
                    )));
                };
                advances.entry(m.partition).or_insert(OffsetAdvance { partition: m.partition, from, to: from }).to =
                    m.offset + 1;
            }
            if advances.is_empty() {
                meter.record(0);
                self.report(&session.source, positions, &meter, 0, broker_error.as_deref());
                continue;
            }
            let advances: Vec<OffsetAdvance> = advances.into_values().collect();
            let outcome = session.applier.apply(&batch, &advances)?;
            for a in &advances {
                positions.insert(a.partition, a.to);
            }
            // Flush the table statistics now and then (at most once a second), so that
            // autovacuum and autoanalyze see the worker's writes.
            // SAFETY: on the worker's main thread, outside any transaction (the batch's own
            // transaction has committed in `apply`), as pgstat_report_stat requires; takes and
            // returns plain values.
            unsafe { pg_sys::pgstat_report_stat(false) };
            backoff.reset();
            let applied = outcome.rows + outcome.dead_letters;
            meter.record(applied);
            self.report(&session.source, positions, &meter, applied, broker_error.as_deref());
        }
    }

    /// Publishes progress (and a broker problem, if any) in the worker's slot.
    fn report(
        &self,
        source: &TopicConsumer,
        positions: &BTreeMap<i32, i64>,
        meter: &RateMeter,
        applied: usize,
        broker_error: Option<&str>,
    ) {
        let progress: Vec<PartitionProgress> = positions
            .iter()
            .map(|(&partition, &next_offset)| PartitionProgress {
                partition,
                next_offset,
                high_watermark: source.cached_high_watermark(partition).unwrap_or(-1),
            })
            .collect();
        shmem::update(self.id, |slot| {
            slot.processed_total += applied as i64;
            slot.processed_per_second = meter.rate;
            slot.set_partitions(progress.into_iter());
            match broker_error {
                Some(e) => {
                    slot.state = WorkerState::Error;
                    slot.set_error(&format!("Kafka: {e}"));
                }
                None if applied > 0 => slot.state = WorkerState::Running,
                None => {}
            }
        });
    }

    /// Reads the definition and resolves the table; `None` if the subscription is gone or
    /// stopped. Checks again that the owner may write the table and set its options (it
    /// may have lost privileges since).
    fn load(&self) -> Result<Option<(Subscription, Target, Options)>> {
        let Some(subscription) = Subscription::by_id(self.subscription_id)? else {
            return Ok(None);
        };
        if !subscription.enabled || self.worker_index >= subscription.workers {
            return Ok(None);
        }
        let target = Target::open(
            &subscription.target_schema,
            &subscription.target_table,
            subscription.format,
            subscription.mode,
            subscription.key_columns.as_deref(),
        )?;
        target.check_writable_by(subscription.owner)?;
        let options = Options::for_owner(&subscription.options, subscription.owner)?;
        Ok(Some((subscription, target, options)))
    }

    fn owned(&self, partitions: &[i32], workers: i32) -> Vec<i32> {
        partitions.iter().copied().filter(|p| p % workers == self.worker_index).collect()
    }

    /// The stored position of each owned partition. Partitions without one get their start
    /// stored first: the partitions the topic had when the subscription first started begin
    /// where `start_from` says; partitions added later begin at their start, since all their
    /// messages are new.
    fn positions(
        &self,
        subscription: &Subscription,
        source: &TopicConsumer,
        partitions: &[i32],
        partition_count: i32,
    ) -> Result<BTreeMap<i32, i64>> {
        let (stored, initial_partitions) = worker::transaction(|| {
            let initial = catalog::initial_partitions(subscription.id, partition_count)?;
            Ok((catalog::read_offsets(subscription)?, initial))
        })?;
        let mut missing = Vec::new();
        for &p in partitions.iter().filter(|p| !stored.contains_key(p)) {
            let latest = subscription.start_from == StartFrom::Latest && p < initial_partitions;
            missing.push((p, source.boundary(p, latest)?));
        }
        if !missing.is_empty() {
            worker::transaction(|| catalog::store_offsets(subscription, &missing, ExistingOffset::Keep))?;
        }
        let stored = worker::transaction(|| catalog::read_offsets(subscription))?;
        Ok(partitions.iter().filter_map(|p| stored.get(p).map(|o| (*p, *o))).collect())
    }
}
