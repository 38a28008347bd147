//! Snapshot runs as stored in `kafka.snapshot_catalog`: one row per table of a publication
//! that was ever snapshotted, with the state of its latest run. The rows are the queue of
//! requested snapshots and their status; where a run stands for exactly-once purposes is
//! in the publication's progress records in Kafka, not here (see
//! [`crate::publication::snapshot`]).

use super::req;
use crate::error::Result;
use pgrx::prelude::*;

/// A table whose snapshot is requested or running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotTask {
    pub(crate) table: pg_sys::Oid,
    /// Counts the table's runs: a new request while one runs starts the next.
    pub(crate) run: i32,
}

/// Requests a new run for each of `tables` (pending until the worker gets to it); a table
/// known to hold no row gets a run that is done already.
pub(crate) fn request(publication_id: i32, tables: &[(pg_sys::Oid, bool)]) -> Result<()> {
    Spi::connect_mut(|client| {
        for (table, empty) in tables {
            let state = if *empty { "done" } else { "pending" };
            client.update(
                "INSERT INTO kafka.snapshot_catalog (publication_id, table_oid, run, state, started_at, finished_at) \
                 VALUES ($1, $2, 1, $3, CASE WHEN $3 = 'done' THEN pg_catalog.now() END, \
                         CASE WHEN $3 = 'done' THEN pg_catalog.now() END) \
                 ON CONFLICT (publication_id, table_oid) DO UPDATE \
                    SET run = kafka.snapshot_catalog.run OPERATOR(pg_catalog.+) 1, state = EXCLUDED.state, rows = 0, \
                        requested_at = pg_catalog.now(), started_at = EXCLUDED.started_at, \
                        finished_at = EXCLUDED.finished_at",
                None,
                &[publication_id.into(), (*table).into(), state.into()],
            )?;
        }
        Ok(())
    })
}

/// Forgets the snapshots of tables no longer published.
pub(crate) fn forget(publication_id: i32, tables: &[pg_sys::Oid]) -> Result<()> {
    Spi::connect_mut(|client| {
        for table in tables {
            client.update(
                "DELETE FROM kafka.snapshot_catalog WHERE publication_id = $1 AND table_oid = $2",
                None,
                &[publication_id.into(), (*table).into()],
            )?;
        }
        Ok(())
    })
}

/// The run to work on next: the one running, else the pending one requested first.
pub(crate) fn next_task(publication_id: i32) -> Result<Option<SnapshotTask>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT table_oid, run FROM kafka.snapshot_catalog \
              WHERE publication_id = $1 AND state IN ('pending', 'running') \
              ORDER BY state = 'running' DESC, requested_at, table_oid LIMIT 1",
            None,
            &[publication_id.into()],
        )?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some(SnapshotTask { table: req(&row, 1)?, run: req(&row, 2)? })),
            None => Ok(None),
        }
    })
}

/// Records `rows` published so far by the run, marking it running; false if the run is
/// no longer wanted (the table was dropped from the publication, or a new run requested).
pub(crate) fn record_progress(publication_id: i32, task: SnapshotTask, rows: i64) -> Result<bool> {
    Spi::connect_mut(|client| {
        let updated = client.update(
            "UPDATE kafka.snapshot_catalog \
                SET state = 'running', rows = $4, started_at = coalesce(started_at, pg_catalog.now()) \
              WHERE publication_id = $1 AND table_oid = $2 AND run = $3 AND state IN ('pending', 'running') \
             RETURNING 1",
            None,
            &[publication_id.into(), task.table.into(), task.run.into(), rows.into()],
        )?;
        Ok(!updated.is_empty())
    })
}

/// Marks the run done with `rows` published.
pub(crate) fn finish(publication_id: i32, task: SnapshotTask, rows: i64) -> Result<()> {
    Spi::connect_mut(|client| {
        client.update(
            "UPDATE kafka.snapshot_catalog \
                SET state = 'done', rows = $4, started_at = coalesce(started_at, pg_catalog.now()), \
                    finished_at = pg_catalog.now() \
              WHERE publication_id = $1 AND table_oid = $2 AND run = $3",
            None,
            &[publication_id.into(), task.table.into(), task.run.into(), rows.into()],
        )?;
        Ok(())
    })
}
