//! The workers' shared-memory slots as rows, for the status views.

use crate::catalog::query_optional;
use crate::compat;
use crate::error::{OrRaise, Result};
use crate::publication::PLUGIN;
use crate::shmem::{self, WorkerKind, WorkerSlot};
use pgrx::prelude::*;
use pgrx::search_path;

fn timestamp(t: pg_sys::TimestampTz) -> Option<TimestampWithTimeZone> {
    (t != 0).then(|| TimestampWithTimeZone::try_from(t).ok()).flatten()
}

/// The worker's last error if the current user has the privileges of the object's owner:
/// errors can carry broker and table details.
fn visible_error(slot: &WorkerSlot) -> Option<String> {
    let catalog = match slot.kind {
        WorkerKind::Subscription => "kafka.subscription_catalog",
        WorkerKind::Publication => "kafka.publication_catalog",
    };
    let owner =
        query_optional::<pg_sys::Oid>(&format!("SELECT owner FROM {catalog} WHERE id = $1"), &[slot.object_id.into()])
            .ok()
            .flatten()?;
    // SAFETY: GetUserId reads the current user; has_privs_of_role is a role-membership
    // lookup by OID on the main thread inside the calling transaction, plain values only.
    let owners_role = unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) };
    owners_role.then(|| slot.last_error()).flatten()
}

/// One row per publication worker.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn publication_worker_status() -> TableIterator<
    'static,
    (
        name!(object_id, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(published_lsn, Option<i64>),
        name!(published_seq, Option<i64>),
        name!(published_commit_time, Option<TimestampWithTimeZone>),
        name!(events_per_second, f64),
        name!(events_total, i64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(started_at, Option<TimestampWithTimeZone>),
    ),
> {
    let rows: Vec<_> = shmem::slots_of(WorkerKind::Publication)
        .map(|slot| {
            let published = slot.published_seq >= 0;
            (
                slot.object_id,
                (slot.pid > 0).then_some(slot.pid),
                slot.state.as_str().to_string(),
                published.then_some(slot.published_lsn as i64),
                published.then_some(slot.published_seq),
                timestamp(slot.published_commit_time),
                slot.processed_per_second,
                slot.processed_total,
                visible_error(&slot),
                timestamp(slot.last_error_at),
                timestamp(slot.started_at),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// One row per subscription worker and partition it consumes, from the workers' shared-memory slots.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn subscription_worker_status() -> TableIterator<
    'static,
    (
        name!(object_id, i32),
        name!(worker, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(partition, Option<i32>),
        name!(next_offset, Option<i64>),
        name!(lag, Option<i64>),
        name!(rows_per_second, f64),
        name!(rows_total, i64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(started_at, Option<TimestampWithTimeZone>),
    ),
> {
    let mut rows = Vec::new();
    for slot in shmem::slots_of(WorkerKind::Subscription) {
        let common =
            (slot.object_id, slot.worker_index, (slot.pid > 0).then_some(slot.pid), slot.state.as_str().to_string());
        let error = visible_error(&slot);
        let tail = (
            slot.processed_per_second,
            slot.processed_total,
            error,
            timestamp(slot.last_error_at),
            timestamp(slot.started_at),
        );
        // One row per partition; a worker that has none yet still gets a row.
        let mut progress: Vec<(Option<i32>, Option<i64>, Option<i64>)> = slot
            .partitions()
            .iter()
            .map(|p| {
                let next = (p.next_offset >= 0).then_some(p.next_offset);
                let lag =
                    (p.next_offset >= 0 && p.high_watermark >= 0).then(|| (p.high_watermark - p.next_offset).max(0));
                (Some(p.partition), next, lag)
            })
            .collect();
        if progress.is_empty() {
            progress.push((None, None, None));
        }
        for (partition, next, lag) in progress {
            rows.push((
                common.0,
                common.1,
                common.2,
                common.3.clone(),
                partition,
                next,
                lag,
                tail.0,
                tail.1,
                tail.2.clone(),
                tail.3,
                tail.4,
            ));
        }
    }
    TableIterator::new(rows)
}

/// One row per replication slot of the extension's output plugin in the current database,
/// with what the server version knows about it (see [`compat::SLOT_DETAILS_SQL`]).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn replication_slot_details() -> TableIterator<
    'static,
    (
        name!(slot_name, String),
        name!(failover, Option<bool>),
        name!(inactive_since, Option<TimestampWithTimeZone>),
        name!(invalidation_reason, Option<String>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    // SAFETY: a plain Oid set once when this backend connected; read on its main thread.
    let database = unsafe { pg_sys::MyDatabaseId };
    let rows = Spi::connect(|client| {
        client
            .select(compat::SLOT_DETAILS_SQL, None, &[PLUGIN.into(), database.into()])?
            .map(|row| {
                Ok((row.get::<String>(1)?.unwrap_or_default(), row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
            })
            .collect::<Result<Vec<_>>>()
    })
    .or_raise();
    TableIterator::new(rows)
}
