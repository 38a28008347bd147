//! Applying one batch: in a single transaction, move the stored offsets (compare-and-set),
//! write the rows, and record the messages that cannot become rows as dead letters. The
//! whole batch is first written at once; if a row is at fault, the batch is split in halves,
//! each in a subtransaction, until every bad row is isolated.

use super::copy::copy_rows;
use super::prefetch::Batch;
use super::target::Target;
use crate::catalog::{self, Subscription};
use crate::error::{BridgeError, Result};
use crate::format::{EncodedBatch, Mode, STAGING_ORDINAL, STAGING_TOMBSTONE};
use crate::security::run_as;
use crate::settings;
use crate::worker;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use std::ops::Range;

/// A partition's stored position moving from `from` to `to` in this batch.
#[derive(Clone, Copy, Debug)]
pub struct Advance {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

#[derive(Default, Debug)]
pub struct BatchOutcome {
    pub rows: usize,
    pub dead_letters: usize,
}

const STAGING_TABLE: &str = "pgkb_upsert_staging";

pub struct Applier<'a> {
    subscription: &'a Subscription,
    target: &'a Target,
    /// Upsert mode: the session's temporary staging table.
    staging: Option<pg_sys::Oid>,
}

impl<'a> Applier<'a> {
    /// Prepares the writer; in upsert mode this creates the session's staging table, so it
    /// must run inside a transaction.
    pub fn new(subscription: &'a Subscription, target: &'a Target) -> Result<Applier<'a>> {
        let staging = match target.shape.mode() {
            Mode::Insert => None,
            Mode::Upsert => Some(create_staging(subscription, target)?),
        };
        Ok(Applier { subscription, target, staging })
    }

    pub fn apply(&self, messages: &Batch, advances: &[Advance]) -> Result<BatchOutcome> {
        let batch = &messages.encoded;
        worker::transaction(|| {
            if !settings::subscription_synchronous_commit() {
                commit_asynchronously();
            }
            self.target.check_unchanged()?;
            Spi::connect_mut(|client| {
                // Deferred constraints are checked per statement, where a failing row can be
                // isolated, rather than at commit.
                client.update("SET CONSTRAINTS ALL IMMEDIATE", None, &[])?;
                advances
                    .iter()
                    .try_for_each(|a| catalog::advance_offset(client, self.subscription, a.partition, a.from, a.to))
            })?;
            let mut dead: Vec<(usize, String)> = batch.rejected.iter().map(|r| (r.message, r.error.clone())).collect();
            let rejected_before_write = dead.len();
            self.write_isolating(batch, 0..batch.rows.len(), &mut dead)?;
            let failed_rows = dead.len() - rejected_before_write;
            Spi::connect_mut(|client| {
                dead.iter().try_for_each(|(i, error)| {
                    let message = messages.message(*i, &self.subscription.topic);
                    catalog::insert_dead_letter(client, &self.subscription.name, &message, error)
                })
            })?;
            Ok(BatchOutcome { rows: batch.rows.len() - failed_rows, dead_letters: dead.len() })
        })
    }

    /// Writes `rows[range]`; rows that fail on their own account are added to `dead`.
    fn write_isolating(
        &self,
        batch: &EncodedBatch,
        range: Range<usize>,
        dead: &mut Vec<(usize, String)>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        match worker::subtransaction(|| self.write(batch, range.clone())) {
            Ok(()) => Ok(()),
            Err(e) if e.is_row_error() && range.len() == 1 => {
                dead.push((batch.rows[range.start].message, e.to_string()));
                Ok(())
            }
            Err(e) if e.is_row_error() => {
                let middle = range.start + range.len() / 2;
                self.write_isolating(batch, range.start..middle, dead)?;
                self.write_isolating(batch, middle..range.end, dead)
            }
            Err(e) => Err(e),
        }
    }

    fn write(&self, batch: &EncodedBatch, range: Range<usize>) -> Result<()> {
        let owner = self.subscription.owner;
        for run in batch.runs(range) {
            let columns = batch.column_names(&self.target.shape, run.start);
            let text = batch.text(run.clone());
            match self.staging {
                None => {
                    run_as(owner, true, || copy_rows(self.target.relid, &columns, text));
                }
                Some(staging) => {
                    copy_rows(staging, &columns, text);
                    let first = batch.rows[run.start].message as i32;
                    let last = batch.rows[run.end - 1].message as i32;
                    let sql = upsert_sql(self.target, &columns[..columns.len() - 2]);
                    run_as(owner, true, || {
                        Spi::connect_mut(|client| client.update(&sql, None, &[first.into(), last.into()]).map(drop))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Lets this transaction's commit return before its WAL is flushed (`SET LOCAL
/// synchronous_commit = off`). Exactly once still holds: a crash can only lose the latest
/// commits as a whole, rows and offsets together, and the worker reads those messages again.
fn commit_asynchronously() {
    unsafe {
        pg_sys::set_config_option(
            c"synchronous_commit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// The statement that applies one run of staged rows: for each key, only its last message
/// counts; a last message without a value deletes the row, any other inserts or updates it.
fn upsert_sql(target: &Target, columns: &[&str]) -> String {
    let keys: Vec<String> = target.shape.key_column_names().map(quote_identifier).collect();
    let keys = keys.join(", ");
    let quoted: Vec<String> = columns.iter().map(quote_identifier).collect();
    let key_match: Vec<String> =
        target.shape.key_column_names().map(|k| format!("t.{0} = l.{0}", quote_identifier(k))).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !target.shape.key_column_names().any(|k| k == **c))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_identifier(c)))
        .collect();
    let on_conflict =
        if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
    format!(
        "WITH latest AS (SELECT DISTINCT ON ({keys}) * FROM pg_temp.{STAGING_TABLE} \
                          WHERE {STAGING_ORDINAL} BETWEEN $1 AND $2 ORDER BY {keys}, {STAGING_ORDINAL} DESC), \
              deleted AS (DELETE FROM {target} t USING latest l WHERE l.{STAGING_TOMBSTONE} AND {key_match}) \
         INSERT INTO {target} AS t ({columns}) SELECT {columns} FROM latest WHERE NOT {STAGING_TOMBSTONE} \
         ON CONFLICT ({keys}) {on_conflict}",
        target = target.quoted_name,
        key_match = key_match.join(" AND "),
        columns = quoted.join(", "),
    )
}

/// Creates (again) the session's staging table: the target's writable columns without
/// constraints, plus the message's ordinal and whether it is a tombstone. The owner may read
/// it, since the upsert statement runs as the owner.
fn create_staging(subscription: &Subscription, target: &Target) -> Result<pg_sys::Oid> {
    let columns: Vec<String> = target.shape.all_columns().map(|c| quote_identifier(&c.name)).collect();
    Spi::connect_mut(|client| {
        client.update(&format!("DROP TABLE IF EXISTS pg_temp.{STAGING_TABLE}"), None, &[])?;
        client.update(
            &format!(
                "CREATE TEMPORARY TABLE {STAGING_TABLE} ON COMMIT DELETE ROWS AS \
                 SELECT {}, 0::integer AS {STAGING_ORDINAL}, false AS {STAGING_TOMBSTONE} FROM {} WITH NO DATA",
                columns.join(", "),
                target.quoted_name
            ),
            None,
            &[],
        )?;
        let owner = catalog::query_optional::<String>(
            "SELECT pg_catalog.quote_ident(rolname) FROM pg_catalog.pg_roles WHERE oid = $1",
            &[subscription.owner.into()],
        )?
        .ok_or_else(|| BridgeError::InsufficientPrivilege("the owner of the subscription no longer exists".into()))?;
        client.update(&format!("GRANT SELECT ON pg_temp.{STAGING_TABLE} TO {owner}"), None, &[])?;
        Ok(client
            .select(&format!("SELECT 'pg_temp.{STAGING_TABLE}'::regclass::oid"), Some(1), &[])?
            .first()
            .get_one::<pg_sys::Oid>()?
            .unwrap_or(pg_sys::Oid::INVALID))
    })
}
