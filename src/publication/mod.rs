//! PostgreSQL to Kafka. A publication worker decodes its slot in-process and publishes
//! every committed change of its tables, and every `kafka.send()` message, in commit order
//! with Kafka transactions (see [`publisher`] for why this is exactly once).

mod confirm;
mod decoder;
pub(crate) mod events;
mod history;
pub(crate) mod outbox;
mod plugin;
pub(crate) use plugin::PLUGIN;
mod publisher;
use publisher::Refusal;
pub(crate) use publisher::{Position, PublicationDeadLetter};
pub(crate) mod slots;
pub(crate) mod snapshot;

use crate::catalog::{self, publication::Publication};
use crate::error::{BridgeError, Result};
use crate::kafka::Options;
use crate::settings;
use crate::shmem::{self, SlotId, WorkerState};
use crate::worker::{self, Backoff, RateMeter};
use decoder::Decoder;
use pgrx::prelude::*;
use plugin::Selection;
use publisher::{Publisher, MAX_KAFKA_TRANSACTION_AGE};
use snapshot::{SnapshotCursor, Snapshotter, Window, WindowHost};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest stretch of decoding between two looks at signals and the Kafka transaction.
const READ_BUDGET: Duration = Duration::from_millis(100);
/// Pause when all flushed WAL is decoded and nothing more was flushed meanwhile.
const IDLE_WAIT: Duration = Duration::from_millis(20);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_kafka_bridge_publication_main(_arg: pg_sys::Datum) {
    let Some((id, slot)) = worker::attach_with_slot(&settings::database()) else {
        return;
    };
    let worker = PublicationWorker { id, publication_id: slot.object_id, refusals: RefCell::default() };
    worker.run();
}

struct PublicationWorker {
    id: SlotId,
    publication_id: i32,
    /// What the broker refused in earlier sessions, by event position.
    refusals: RefCell<HashMap<Position, Refusal>>,
}

/// How a session ended without an error.
enum SessionEnd {
    /// The publication was stopped or dropped.
    Stopped,
    /// Decoding must start again at once: events to record as dead letters were found in
    /// the middle of a replay, or the definition was altered.
    Restart,
}

impl PublicationWorker {
    fn run(&self) {
        let mut backoff = Backoff::default();
        loop {
            worker::check_interrupts_and_reload();
            match self.session(&mut backoff) {
                Ok(SessionEnd::Stopped) => return,
                Ok(SessionEnd::Restart) => {}
                Err(e) => backoff.wait_after(self.id, &e),
            }
        }
    }

    /// Publishes until the publication is stopped, decoding must start again, or something
    /// fails.
    fn session(&self, backoff: &mut Backoff) -> Result<SessionEnd> {
        let Some((publication, options)) = worker::transaction(|| self.load())? else {
            return Ok(SessionEnd::Stopped);
        };
        worker::report_application_name(&publication.name);
        pin_output_settings();
        let recorded =
            |after| worker::transaction(|| catalog::publication::recorded_dead_letters(publication.id, after));
        let publisher = Publisher::connect(&publication, &options, self.id, recorded, self.refusals.borrow().clone())?;
        let mut meter = RateMeter::default();
        let mut reported_events = 0;
        self.report(&publisher, &mut meter, &mut reported_events);
        let mut decoder = Decoder::open(&publication.slot_name, Selection::of(&publication), Box::new(publisher))?;
        let mut snapshotter = Snapshotter::new(publication.id, publication.owner, &publication.topic);
        shmem::update(self.id, |slot| slot.state = WorkerState::Running);
        let mut next_check = Instant::now() + settings::metadata_refresh();
        loop {
            worker::check_interrupts_and_reload();
            if shmem::take_reload_request(self.id) {
                // kafka.alter_publication changed the definition: what is open is published
                // again by the next session, from the committed progress.
                decoder.sink::<Publisher>().abort_transaction();
                return Ok(SessionEnd::Restart);
            }
            if Instant::now() >= next_check {
                // Rights can be revoked, and row-level security enabled, while the worker
                // runs: checked again at this interval, not only at the start.
                if worker::transaction(|| self.load())?.is_none() {
                    return Ok(SessionEnd::Stopped);
                }
                next_check = Instant::now() + settings::metadata_refresh();
            }
            let read = decoder.read(READ_BUDGET);
            let decoded_up_to = decoder.decoded_up_to();
            let p = decoder.sink::<Publisher>();
            // Dead letters are recorded before any Kafka commit covers them.
            let letters = p.take_dead_letters();
            if !letters.is_empty() {
                worker::transaction(|| catalog::publication::record_dead_letters(&publication, &letters))?;
                p.dead_letters_recorded(&letters);
            }
            let caught_up = match read {
                Ok(caught_up) => caught_up,
                Err(BridgeError::DeadLettersToRecord) => {
                    p.abort_transaction();
                    return Ok(SessionEnd::Restart);
                }
                Err(e) => return self.after_failure(p, e),
            };
            // The next snapshot chunk is read while the producer delivers the previous one.
            snapshotter.step(&mut decoder)?;
            let p = decoder.sink::<Publisher>();
            let mut progressed = caught_up;
            if p.has_open_transaction() && (caught_up || p.open_transaction_age() >= MAX_KAFKA_TRANSACTION_AGE) {
                if let Err(e) = p.commit_transaction() {
                    return self.after_failure(p, e);
                }
                progressed = true;
                // The broker took a commit: an error it reported before has passed.
                shmem::update(self.id, |slot| slot.state = WorkerState::Running);
            }
            // When idle, this is also the heartbeat that keeps the slot moving (its restart
            // point follows at the next running-transactions record, which the background
            // writer logs every 15 s while the server writes anything).
            let confirm = p.confirmable(caught_up, decoded_up_to);
            // What the broker reports while nothing is to be published shows as the last
            // error; the state changes only when a commit fails.
            if let Some(e) = p.errors.take() {
                shmem::update(self.id, |slot| slot.set_error(&format!("Kafka: {e}")));
            }
            self.report(p, &mut meter, &mut reported_events);
            if let Some(lsn) = confirm {
                decoder.confirm(lsn)?;
            }
            // Only progress ends a run of failures: a session that fails again at the same
            // event after some decoding keeps backing off.
            if progressed {
                backoff.reset();
            }
            // What was flushed while the Kafka transaction committed is read at once: at a
            // steady rate of commits, each cycle publishes what the previous one's commit
            // took time for, rather than waiting for more.
            if caught_up && !snapshotter.busy() && !decoder.more_flushed() {
                worker::sleep(IDLE_WAIT);
            }
        }
    }

    /// A session failed with `error`. If the broker refused deliveries for good, the next
    /// session, started at once, knows them (see [`Refusal`]); otherwise the error stands.
    fn after_failure(&self, publisher: &mut Publisher, error: BridgeError) -> Result<SessionEnd> {
        let refusals = publisher.take_refusals();
        if refusals.is_empty() {
            return Err(error);
        }
        publisher.abort_transaction();
        log!(
            "pg_kafka_bridge: the broker refused {} event(s) for good ({error}); publishing again, each suspect alone",
            refusals.len()
        );
        let mut known = self.refusals.borrow_mut();
        for (position, refusal) in refusals {
            // What an event sent alone showed stays; a suspect never replaces it.
            if refusal.isolated || !known.contains_key(&position) {
                known.insert(position, refusal);
            }
        }
        Ok(SessionEnd::Restart)
    }

    fn report(&self, publisher: &Publisher, meter: &mut RateMeter, reported_events: &mut u64) {
        meter.record((publisher.events_total - *reported_events) as usize);
        *reported_events = publisher.events_total;
        shmem::update(self.id, |slot| {
            slot.processed_per_second = meter.rate;
            slot.processed_total = *reported_events as i64;
        });
    }

    /// The publication, if it is still there and enabled; checks that its owner may still
    /// read every row of every table it publishes and set its options.
    fn load(&self) -> Result<Option<(Publication, Options)>> {
        let Some(publication) = Publication::by_id(self.publication_id)? else {
            return Ok(None);
        };
        if !publication.enabled {
            return Ok(None);
        }
        for &table in &publication.tables {
            // A dropped table simply has no more changes.
            if let Some(name) = crate::catalog::qualified_table_name(table) {
                crate::security::check_reads_every_row(table, publication.owner, &name)?;
            }
        }
        let options = Options::for_owner(&publication.options, publication.owner)?;
        Ok(Some((publication, options)))
    }
}

impl WindowHost for Decoder {
    fn window(&mut self) -> &mut Option<Window> {
        Decoder::window(self)
    }

    fn snapshot_cursor(&mut self) -> (Option<SnapshotCursor>, bool) {
        self.sink::<Publisher>().snapshot_cursor()
    }
}

/// Settings that change the text output of values: events look the same whatever the
/// server's or a role's defaults are (ALTER ROLE / DATABASE ... SET are overridden too).
const OUTPUT_SETTINGS: [(&std::ffi::CStr, &std::ffi::CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"IntervalStyle", c"postgres"),
    (c"TimeZone", c"UTC"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
    (c"lc_monetary", c"C"),
];

fn pin_output_settings() {
    for (name, value) in OUTPUT_SETTINGS {
        settings::set_server_setting(name, value, settings::SettingScope::Session);
    }
}
