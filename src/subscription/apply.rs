//! Applying one batch: in a single transaction, move the stored offsets (compare-and-set),
//! write the rows, and record the messages that cannot become rows as dead letters. The
//! whole batch is first written at once; if a row is at fault, the batch is split in halves,
//! each in a subtransaction, until every bad row is isolated.

use super::copy::copy_rows;
use super::prefetch::Batch;
use super::target::Target;
use crate::catalog::{self, Subscription};
use crate::error::{BridgeError, Result};
use crate::format::{EncodedBatch, Mode};
use crate::security::as_table_owner;
use crate::settings;
use crate::worker;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::PgRelation;
use std::collections::HashMap;
use std::ops::Range;

/// A partition's stored position moving from `from` to `to` in this batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OffsetAdvance {
    pub(crate) partition: i32,
    pub(crate) from: i64,
    pub(crate) to: i64,
}

#[derive(Default, Debug)]
pub(crate) struct BatchOutcome {
    pub(crate) rows: usize,
    pub(crate) dead_letters: usize,
}

const STAGING_TABLE: &str = "pgkb_upsert_staging";
/// The staging table's columns for the last two fields of an upsert line: the message's
/// index in the batch, and whether it is a tombstone.
const STAGING_ORDINAL: &str = "__pgkb_ordinal";
const STAGING_TOMBSTONE: &str = "__pgkb_tombstone";

pub(crate) struct Applier<'a> {
    subscription: &'a Subscription,
    target: &'a Target,
    /// Upsert mode: the session's temporary staging table.
    staging: Option<Staging>,
}

impl<'a> Applier<'a> {
    /// Prepares the writer; in upsert mode this creates the session's staging table, so it
    /// must run inside a transaction.
    pub(crate) fn new(subscription: &'a Subscription, target: &'a Target) -> Result<Applier<'a>> {
        let staging = match target.shape.mode() {
            Mode::Insert => None,
            Mode::Upsert => Some(Staging::create(subscription, target)?),
        };
        Ok(Applier { subscription, target, staging })
    }

    pub(crate) fn apply(&self, messages: &Batch, advances: &[OffsetAdvance]) -> Result<BatchOutcome> {
        let batch = &messages.encoded;
        worker::transaction(|| {
            if !settings::subscription_synchronous_commit() {
                // The commit returns before its WAL is flushed. Exactly once still holds: a
                // crash can only lose the latest commits as a whole, rows and offsets
                // together, and the worker reads those messages again.
                settings::set_server_setting(c"synchronous_commit", c"off", settings::SettingScope::Transaction);
            }
            self.target.check_unchanged()?;
            // Privileges can be revoked, and row-level security enabled, while the worker runs.
            self.target.check_writable_by(self.subscription.owner)?;
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
                    catalog::insert_dead_letter(client, self.subscription, &message, error)
                })
            })?;
            Ok(BatchOutcome { rows: batch.rows.len() - failed_rows, dead_letters: dead.len() })
        })
    }

    /// Writes `rows[range]`; rows that fail on their own account (any error but the
    /// environment's, see [`BridgeError::is_environment_error`]) are added to `dead`.
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
            // Isolated: the message fails on its own while its neighbours pass.
            Err(e) if !e.is_environment_error() && range.len() == 1 => {
                dead.push((batch.rows[range.start].message, e.to_string()));
                Ok(())
            }
            Err(e) if !e.is_environment_error() => {
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
            if batch.rows[run.start].is_truncate() {
                // A TRUNCATE change event empties the table: a DELETE, which keeps the
                // apply one transaction with its offsets and fires the owner's DELETE
                // triggers.
                let sql = format!("DELETE FROM {}", self.target.quoted_name);
                as_table_owner(owner, || Spi::connect_mut(|client| client.update(&sql, None, &[]).map(drop)))?;
                continue;
            }
            let columns = batch.column_names(&self.target.shape, run.start);
            let text = batch.text(run.clone());
            match &self.staging {
                None => as_table_owner(owner, || copy_rows(self.target.relid, &columns, text)),
                Some(staging) => {
                    let staged: Vec<&str> =
                        columns.iter().copied().chain([STAGING_ORDINAL, STAGING_TOMBSTONE]).collect();
                    copy_rows(staging.relid, &staged, text);
                    let first = batch.rows[run.start].message as i32;
                    let last = batch.rows[run.end - 1].message as i32;
                    let sql = upsert_sql(self.target, staging, &columns);
                    as_table_owner(owner, || {
                        Spi::connect_mut(|client| client.update(&sql, None, &[first.into(), last.into()]).map(drop))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The statement that applies one run of staged rows: for each key, only its last message
/// counts; a last message without a value deletes the row, any other inserts or updates it.
/// Staged values are text; they become the columns' types here, in the statement that runs
/// as the owner, so that input functions and domain checks run with the owner's rights.
fn upsert_sql(target: &Target, staging: &Staging, columns: &[&str]) -> String {
    let keys: Vec<String> = target.shape.key_column_names().map(quote_identifier).collect();
    let keys = keys.join(", ");
    let quoted: Vec<String> = columns.iter().map(quote_identifier).collect();
    let typed: Vec<String> = columns
        .iter()
        .map(|c| format!("CAST(s.{0} AS {1}) AS {0}", quote_identifier(c), staging.column_type(c)))
        .collect();
    let key_match: Vec<&str> = target.shape.key_column_names().map(|k| staging.key_match(k)).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !target.shape.key_column_names().any(|k| k == **c))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_identifier(c)))
        .collect();
    let on_conflict =
        if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
    format!(
        "WITH staged AS (SELECT {typed}, s.{STAGING_ORDINAL}, s.{STAGING_TOMBSTONE} FROM pg_temp.{STAGING_TABLE} s \
                          WHERE s.{STAGING_ORDINAL} BETWEEN $1 AND $2), \
              latest AS (SELECT DISTINCT ON ({keys}) * FROM staged ORDER BY {keys}, {STAGING_ORDINAL} DESC), \
              deleted AS (DELETE FROM {target} t USING latest l WHERE l.{STAGING_TOMBSTONE} AND {key_match}) \
         INSERT INTO {target} AS t ({columns}) SELECT {columns} FROM latest WHERE NOT {STAGING_TOMBSTONE} \
         ON CONFLICT ({keys}) {on_conflict}",
        typed = typed.join(", "),
        target = target.quoted_name,
        key_match = key_match.join(" AND "),
        columns = quoted.join(", "),
    )
}

/// The session's upsert staging table, and what the upsert statement needs of the target's
/// column types.
///
/// Every staged column is `text`, with no default, constraint or trigger: filling it runs
/// no code of anyone's but PostgreSQL's text input, although the worker fills it as the
/// bootstrap superuser. Conversion to the target's types (input functions of user types,
/// domain checks) happens in the upsert statement, as the owner.
struct Staging {
    relid: pg_sys::Oid,
    /// Per column: its type, qualified unless in pg_catalog, without type modifier (the
    /// INSERT applies the column's modifier as an assignment, as COPY would).
    types: HashMap<String, String>,
    /// Per key column: the condition that matches it in the upsert statement.
    key_matches: HashMap<String, String>,
}

impl Staging {
    /// Creates (again) the staging table: the target's writable columns as text, plus the
    /// message's ordinal and whether it is a tombstone. The owner may read it, since the
    /// upsert statement runs as the owner.
    fn create(subscription: &Subscription, target: &Target) -> Result<Staging> {
        let (types, key_types) = column_types(target)?;
        let mut key_matches = HashMap::new();
        for (key, type_oid) in key_types {
            let condition = key_match(&key, type_oid)?;
            key_matches.insert(key, condition);
        }
        let columns: Vec<String> =
            target.shape.all_columns().map(|c| format!("{} text", quote_identifier(&c.name))).collect();
        let owner = quote_identifier(crate::security::role_name(subscription.owner));
        let relid = Spi::connect_mut(|client| {
            client.update(&format!("DROP TABLE IF EXISTS pg_temp.{STAGING_TABLE}"), None, &[])?;
            client.update(
                &format!(
                    "CREATE TEMPORARY TABLE {STAGING_TABLE} ({}, {STAGING_ORDINAL} integer, {STAGING_TOMBSTONE} boolean) \
                     ON COMMIT DELETE ROWS",
                    columns.join(", ")
                ),
                None,
                &[],
            )?;
            client.update(&format!("GRANT SELECT ON pg_temp.{STAGING_TABLE} TO {owner}"), None, &[])?;
            Ok::<_, BridgeError>(
                client
                    .select(
                        &format!("SELECT 'pg_temp.{STAGING_TABLE}'::pg_catalog.regclass::pg_catalog.oid"),
                        Some(1),
                        &[],
                    )?
                    .first()
                    .get_one::<pg_sys::Oid>()?
                    .unwrap_or(pg_sys::Oid::INVALID),
            )
        })?;
        Ok(Staging { relid, types, key_matches })
    }

    fn column_type(&self, column: &str) -> &str {
        self.types.get(column).map_or("pg_catalog.text", String::as_str)
    }

    fn key_match(&self, key: &str) -> &str {
        &self.key_matches[key]
    }
}

/// The writable columns' type names, and the type OIDs of the key columns.
#[allow(clippy::type_complexity)]
fn column_types(target: &Target) -> Result<(HashMap<String, String>, Vec<(String, pg_sys::Oid)>)> {
    // SAFETY: with_lock asks for a real lock mode (not NoLock), so relation_open locks the
    // table itself and raises an ERROR if it no longer exists.
    let relation = unsafe { PgRelation::with_lock(target.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    let keys: Vec<&str> = target.shape.key_column_names().collect();
    let mut types = HashMap::new();
    let mut key_types = Vec::new();
    for attribute in relation.tuple_desc().iter().filter(|a| !a.is_dropped()) {
        types.insert(attribute.name().to_owned(), qualified_type_name(attribute.atttypid));
        if keys.contains(&attribute.name()) {
            key_types.push((attribute.name().to_owned(), attribute.atttypid));
        }
    }
    Ok((types, key_types))
}

/// A type's schema-qualified name without type modifier, as the parser reads it back:
/// `pg_catalog.bpchar`, not `character` (which would mean `character(1)`).
fn qualified_type_name(type_oid: pg_sys::Oid) -> String {
    let flags = pg_sys::FORMAT_TYPE_TYPEMOD_GIVEN | pg_sys::FORMAT_TYPE_FORCE_QUALIFY;
    // SAFETY: format_type_extended returns a palloc'd, NUL-terminated name, never NULL:
    // without FORMAT_TYPE_ALLOW_INVALID an unknown type OID raises an ERROR instead.
    let name = unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_extended(type_oid, -1, flags as u16)) };
    name.to_string_lossy().into_owned()
}

/// How the upsert statement compares key column `key` of the table (`t`) with the staged
/// one (`l`): with the equality operator of the type's default operator class, named by its
/// schema, and both sides cast to exactly its operand types, so that no other operator of
/// that name and schema (one made for a domain over the type, say) can match better.
fn key_match(key: &str, type_oid: pg_sys::Oid) -> Result<String> {
    // SAFETY: lookup_type_cache never returns NULL (an unknown type raises an ERROR) and its
    // entries live in CacheMemoryContext for the backend's life; only eq_opr is read.
    // op_input_types writes both OIDs through pointers to live locals, or raises an ERROR.
    let (operator, left, right) = unsafe {
        let operator = (*pg_sys::lookup_type_cache(type_oid, pg_sys::TYPECACHE_EQ_OPR as i32)).eq_opr;
        let (mut left, mut right) = (type_oid, type_oid);
        if operator != pg_sys::InvalidOid {
            pg_sys::op_input_types(operator, &mut left, &mut right);
        }
        (operator, left, right)
    };
    let schema = catalog::query_optional::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_operator o \
           JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace WHERE o.oid = $1",
        &[operator.into()],
    )?
    .unwrap_or_else(|| "pg_catalog".into());
    let key = quote_identifier(key);
    Ok(format!("t.{key}::{} OPERATOR({schema}.=) l.{key}::{}", qualified_type_name(left), qualified_type_name(right)))
}
