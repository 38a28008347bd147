//! The only code that reads and writes the `kafka.*` tables. Every statement names its
//! objects schema-qualified and passes values as parameters. Subscriptions and their offsets
//! and dead letters are here; publications in [`publication`].

pub(crate) mod publication;
pub(crate) mod snapshot;

use crate::error::{BridgeError, Result};
use crate::format::{Format, Message, Mode, StartFrom};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiHeapTupleData};
use pgrx::JsonB;
use std::collections::HashMap;

/// A subscription as stored in `kafka.subscription_catalog`.
#[derive(Clone, Debug)]
pub(crate) struct Subscription {
    pub(crate) id: i32,
    pub(crate) name: String,
    pub(crate) owner: pg_sys::Oid,
    pub(crate) brokers: String,
    pub(crate) topic: String,
    pub(crate) target_schema: String,
    pub(crate) target_table: String,
    pub(crate) format: Format,
    pub(crate) mode: Mode,
    pub(crate) key_columns: Option<Vec<String>>,
    pub(crate) start_from: StartFrom,
    pub(crate) batch_size: i32,
    pub(crate) batch_timeout_ms: i32,
    pub(crate) workers: i32,
    pub(crate) options: serde_json::Value,
    pub(crate) enabled: bool,
}

const SUBSCRIPTION_COLUMNS: &str = "id, name, owner, brokers, topic, target_schema::text, \
     target_table::text, format, mode, key_columns::text[], start_from, batch_size, \
     batch_timeout_ms, workers, options, enabled";

impl Subscription {
    fn from_row(row: &SpiHeapTupleData) -> Result<Subscription> {
        Ok(Subscription {
            id: req(row, 1)?,
            name: req(row, 2)?,
            owner: req(row, 3)?,
            brokers: req(row, 4)?,
            topic: req(row, 5)?,
            target_schema: req(row, 6)?,
            target_table: req(row, 7)?,
            format: choice(row, 8, Format::parse)?,
            mode: choice(row, 9, Mode::parse)?,
            key_columns: row.get(10)?,
            start_from: choice(row, 11, StartFrom::parse)?,
            batch_size: req(row, 12)?,
            batch_timeout_ms: req(row, 13)?,
            workers: req(row, 14)?,
            options: req::<JsonB>(row, 15)?.0,
            enabled: req(row, 16)?,
        })
    }

    fn load(condition: &str, arg: DatumWithOid) -> Result<Option<Subscription>> {
        let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM kafka.subscription_catalog WHERE {condition}");
        load_one(&sql, arg, Subscription::from_row)
    }

    pub(crate) fn by_id(id: i32) -> Result<Option<Subscription>> {
        Subscription::load("id = $1", id.into())
    }

    /// Looks a subscription up by name, locking its row against concurrent changes.
    pub(crate) fn by_name_for_update(name: &str) -> Result<Subscription> {
        Subscription::load("name = $1 FOR UPDATE", name.into())?
            .ok_or_else(|| BridgeError::UndefinedObject { kind: "subscription", name: name.into() })
    }

    pub(crate) fn insert(&self) -> Result<i32> {
        Spi::connect_mut(|client| {
            let exists = client
                .select(
                    "SELECT 1 FROM kafka.subscription_catalog WHERE name = $1",
                    Some(1),
                    &[self.name.as_str().into()],
                )?
                .len();
            if exists > 0 {
                return Err(BridgeError::DuplicateObject { kind: "subscription", name: self.name.clone() });
            }
            let row = client.update(
                "INSERT INTO kafka.subscription_catalog (name, owner, brokers, topic, target_schema, \
                 target_table, format, mode, key_columns, start_from, batch_size, batch_timeout_ms, \
                 workers, options, enabled) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, true) RETURNING id",
                Some(1),
                &[
                    self.name.as_str().into(),
                    self.owner.into(),
                    self.brokers.as_str().into(),
                    self.topic.as_str().into(),
                    self.target_schema.as_str().into(),
                    self.target_table.as_str().into(),
                    self.format.as_str().into(),
                    self.mode.as_str().into(),
                    self.key_columns.clone().into(),
                    self.start_from.as_str().into(),
                    self.batch_size.into(),
                    self.batch_timeout_ms.into(),
                    self.workers.into(),
                    JsonB(self.options.clone()).into(),
                ],
            )?;
            Ok(row.first().get_one::<i32>()?.unwrap_or_default())
        })
    }

    /// Stores the settings `kafka.alter_subscription` may change.
    pub(crate) fn update_settings(&self) -> Result<()> {
        Spi::connect_mut(|client| {
            client.update(
                "UPDATE kafka.subscription_catalog SET brokers = $2, options = $3, target_schema = $4, \
                 target_table = $5, batch_size = $6, batch_timeout_ms = $7, workers = $8 WHERE id = $1",
                None,
                &[
                    self.id.into(),
                    self.brokers.as_str().into(),
                    JsonB(self.options.clone()).into(),
                    self.target_schema.as_str().into(),
                    self.target_table.as_str().into(),
                    self.batch_size.into(),
                    self.batch_timeout_ms.into(),
                    self.workers.into(),
                ],
            )?;
            Ok(())
        })
    }

    pub(crate) fn set_enabled(&self, enabled: bool) -> Result<()> {
        set_enabled_in("kafka.subscription_catalog", self.id, enabled)
    }

    pub(crate) fn delete(&self) -> Result<()> {
        delete_from("kafka.subscription_catalog", self.id)
    }
}

/// Starts or stops catalog entry `id` of `table`, one of the extension's catalog tables.
fn set_enabled_in(table: &str, id: i32, enabled: bool) -> Result<()> {
    Spi::connect_mut(|client| {
        client.update(&format!("UPDATE {table} SET enabled = $2 WHERE id = $1"), None, &[id.into(), enabled.into()])?;
        Ok(())
    })
}

/// Deletes catalog entry `id` of `table`, one of the extension's catalog tables.
fn delete_from(table: &str, id: i32) -> Result<()> {
    Spi::connect_mut(|client| {
        client.update(&format!("DELETE FROM {table} WHERE id = $1"), None, &[id.into()])?;
        Ok(())
    })
}

/// A column of a catalog row that must not be null.
pub(crate) fn req<T: FromDatum + IntoDatum>(row: &SpiHeapTupleData, i: usize) -> Result<T> {
    row.get::<T>(i)?.ok_or_else(|| BridgeError::Postgres {
        sqlstate: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        message: format!("catalog column {i} is null"),
    })
}

/// A text column of a catalog row holding one of the names `parse` knows (its CHECK
/// constraint allows no other).
fn choice<T>(row: &SpiHeapTupleData, i: usize, parse: fn(&str) -> Option<T>) -> Result<T> {
    let text: String = req(row, i)?;
    parse(&text).ok_or_else(|| BridgeError::Postgres {
        sqlstate: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        message: format!("catalog column {i} holds an unknown value \"{text}\""),
    })
}

/// The first row of `sql` (with one argument) turned into a value by `from_row`. Read-write,
/// so that the statement may lock the row (FOR UPDATE).
fn load_one<T>(sql: &str, arg: DatumWithOid, from_row: fn(&SpiHeapTupleData) -> Result<T>) -> Result<Option<T>> {
    Spi::connect_mut(|client| {
        let table = client.update(sql, Some(1), &[arg])?;
        match table.into_iter().next() {
            Some(row) => from_row(&row).map(Some),
            None => Ok(None),
        }
    })
}

/// The first column of the first row of `sql`, or `None` when it returns no row.
pub(crate) fn query_optional<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    Spi::connect(|client| {
        let table = client.select(sql, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        Ok(table.first().get_one::<T>()?)
    })
}

/// `(id, workers)` of every enabled subscription.
pub(crate) fn enabled_subscriptions() -> Result<Vec<(i32, i32)>> {
    Spi::connect(|client| {
        let table =
            client.select("SELECT id, workers FROM kafka.subscription_catalog WHERE enabled ORDER BY id", None, &[])?;
        table
            .into_iter()
            .map(|row| Ok((row.get::<i32>(1)?.unwrap_or_default(), row.get::<i32>(2)?.unwrap_or(1))))
            .collect()
    })
}

/// Whether the extension is installed in the current database.
pub(crate) fn extension_installed() -> Result<bool> {
    Ok(Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_kafka_bridge')")?
        .unwrap_or(false))
}

/// The version of the extension's SQL objects in this database, if it is installed.
pub(crate) fn installed_version() -> Result<Option<String>> {
    query_optional::<String>("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_kafka_bridge'", &[])
}

/// How many partitions the topic had when the subscription first started: the first worker
/// to start records `count`, later calls return what was recorded.
pub(crate) fn initial_partitions(subscription_id: i32, count: i32) -> Result<i32> {
    Spi::connect_mut(|client| {
        let row = client.update(
            "UPDATE kafka.subscription_catalog SET initial_partitions = coalesce(initial_partitions, $2) \
             WHERE id = $1 RETURNING initial_partitions",
            Some(1),
            &[subscription_id.into(), count.into()],
        )?;
        Ok(if row.is_empty() { count } else { row.first().get_one::<i32>()?.unwrap_or(count) })
    })
}

/// Stored positions of the subscription's partitions of its topic.
pub(crate) fn read_offsets(subscription: &Subscription) -> Result<HashMap<i32, i64>> {
    Spi::connect(|client| {
        let table = client.select(
            "SELECT partition, next_offset FROM kafka.offsets WHERE subscription_id = $1 AND topic = $2",
            None,
            &[subscription.id.into(), subscription.topic.as_str().into()],
        )?;
        table
            .into_iter()
            .map(|row| Ok((row.get::<i32>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or_default())))
            .collect()
    })
}

/// What [`store_offsets`] does with a partition that has a stored position already.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExistingOffset {
    /// Keep it: the new one is only a start for partitions without one.
    Keep,
    /// Replace it (`kafka.seek`).
    Replace,
}

/// Stores the positions `(partition, next offset)` of the subscription's partitions.
pub(crate) fn store_offsets(
    subscription: &Subscription,
    positions: &[(i32, i64)],
    existing: ExistingOffset,
) -> Result<()> {
    let on_conflict = match existing {
        ExistingOffset::Keep => "DO NOTHING",
        ExistingOffset::Replace => "DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = pg_catalog.now()",
    };
    let sql = format!(
        "INSERT INTO kafka.offsets (subscription_id, subscription, topic, partition, next_offset) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription_id, topic, partition) {on_conflict}"
    );
    Spi::connect_mut(|client| {
        for &(partition, offset) in positions {
            client.update(
                &sql,
                None,
                &[
                    subscription.id.into(),
                    subscription.name.as_str().into(),
                    subscription.topic.as_str().into(),
                    partition.into(),
                    offset.into(),
                ],
            )?;
        }
        Ok(())
    })
}

/// Moves a partition's position from `expected` to `next`. Fails with `OffsetMoved` if the
/// stored position is not `expected`: another worker or a manual change moved it.
/// The position must also still belong to this very subscription (by id): one dropped and
/// created again under the same name is another subscription.
pub(crate) fn advance_offset(
    client: &mut SpiClient,
    subscription: &Subscription,
    partition: i32,
    expected: i64,
    next: i64,
) -> Result<()> {
    let (id, topic) = (subscription.id, subscription.topic.as_str());
    let updated = client
        .update(
            "UPDATE kafka.offsets SET next_offset = $5, updated_at = pg_catalog.now() \
              WHERE subscription_id = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
            None,
            &[id.into(), topic.into(), partition.into(), expected.into(), next.into()],
        )?
        .len();
    if updated == 1 {
        return Ok(());
    }
    let found = client
        .select(
            "SELECT next_offset FROM kafka.offsets WHERE subscription_id = $1 AND topic = $2 AND partition = $3",
            Some(1),
            &[id.into(), topic.into(), partition.into()],
        )?
        .first()
        .get_one::<i64>()
        .unwrap_or(None);
    Err(BridgeError::OffsetMoved { topic: topic.into(), partition, expected, found })
}

/// Records a message that could not become a row, with why.
pub(crate) fn insert_dead_letter(
    client: &mut SpiClient,
    subscription: &Subscription,
    message: &Message,
    error: &str,
) -> Result<()> {
    client.update(
        "INSERT INTO kafka.dead_letters (subscription_id, subscription, topic, partition, \"offset\", key, payload, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        None,
        &[
            subscription.id.into(),
            subscription.name.as_str().into(),
            message.topic.into(),
            message.partition.into(),
            message.offset.into(),
            message.key.into(),
            message.payload.into(),
            error.into(),
        ],
    )?;
    Ok(())
}

/// The schema-qualified, quoted name of table `relid`, or `None` if it no longer exists.
pub(crate) fn qualified_table_name(relid: pg_sys::Oid) -> Option<String> {
    // SAFETY: syscache lookups by OID on the main thread inside a transaction. The name
    // lookups return NULL when the object is missing (get_rel_namespace returns InvalidOid,
    // whose namespace name is NULL) and a palloc'd NUL-terminated copy otherwise; both
    // pointers are checked before CStr::from_ptr reads them.
    unsafe {
        let table = pg_sys::get_rel_name(relid);
        let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if table.is_null() || schema.is_null() {
            return None;
        }
        let quote =
            |name: *const std::ffi::c_char| spi::quote_identifier(std::ffi::CStr::from_ptr(name).to_string_lossy());
        Some(format!("{}.{}", quote(schema), quote(table)))
    }
}

/// What a query names in FROM to read every row of table `relid`: the table alone (`ONLY`,
/// not the tables that inherit from it), or a partitioned table with its partitions; `None`
/// if the table no longer exists.
pub(crate) fn every_row_of(relid: pg_sys::Oid) -> Option<String> {
    let name = qualified_table_name(relid)?;
    // SAFETY: a syscache lookup by OID inside a transaction.
    let relkind = unsafe { pg_sys::get_rel_relkind(relid) } as u8;
    Some(if relkind == pg_sys::RELKIND_PARTITIONED_TABLE { name } else { format!("ONLY {name}") })
}
