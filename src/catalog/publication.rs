//! Publications as stored in `kafka.publication_catalog`.

use super::{load_one, req};
use crate::error::{BridgeError, Result};
use crate::publication::{Position, PublicationDeadLetter};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::JsonB;
use std::collections::HashSet;

#[derive(Clone, Debug)]
pub(crate) struct Publication {
    pub(crate) id: i32,
    pub(crate) name: String,
    pub(crate) owner: pg_sys::Oid,
    pub(crate) brokers: String,
    pub(crate) tables: Vec<pg_sys::Oid>,
    /// Topic template: `{schema}` and `{table}` are replaced by each table's names.
    pub(crate) topic: String,
    pub(crate) progress_topic: String,
    pub(crate) slot_name: String,
    pub(crate) options: serde_json::Value,
    pub(crate) enabled: bool,
    pub(crate) on_event_error: OnEventError,
    pub(crate) snapshot: SnapshotMode,
}

/// Which rows a publication publishes besides its tables' changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SnapshotMode {
    /// The rows its tables hold when they are added to it (at creation or later).
    Initial,
    /// None: only the changes committed after a table was added.
    None,
}

impl SnapshotMode {
    pub(crate) const NAMES: &'static str = "'initial' or 'none'";

    pub(crate) fn parse(s: &str) -> Option<SnapshotMode> {
        [SnapshotMode::Initial, SnapshotMode::None].into_iter().find(|m| m.as_str() == s)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SnapshotMode::Initial => "initial",
            SnapshotMode::None => "none",
        }
    }
}

/// What an event that Kafka can never take does to its publication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnEventError {
    /// It is recorded in `kafka.publication_dead_letters` and the publication moves on.
    DeadLetter,
    /// The worker stops with the error, and retries with backoff.
    Stop,
}

impl OnEventError {
    pub(crate) const NAMES: &'static str = "'dead_letter' or 'stop'";

    pub(crate) fn parse(s: &str) -> Option<OnEventError> {
        [OnEventError::DeadLetter, OnEventError::Stop].into_iter().find(|m| m.as_str() == s)
    }

    /// The name the SQL API and the catalog use.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OnEventError::DeadLetter => "dead_letter",
            OnEventError::Stop => "stop",
        }
    }
}

const PUBLICATION_COLUMNS: &str =
    "id, name, owner, brokers, tables::bigint[], topic, progress_topic, slot_name::text, \
     options, enabled, on_event_error, snapshot";

impl Publication {
    fn from_row(row: &SpiHeapTupleData) -> Result<Publication> {
        let tables: Vec<i64> = req(row, 5)?;
        Ok(Publication {
            id: req(row, 1)?,
            name: req(row, 2)?,
            owner: req(row, 3)?,
            brokers: req(row, 4)?,
            tables: tables.into_iter().map(|oid| pg_sys::Oid::from(oid as u32)).collect(),
            topic: req(row, 6)?,
            progress_topic: req(row, 7)?,
            slot_name: req(row, 8)?,
            options: req::<JsonB>(row, 9)?.0,
            enabled: req(row, 10)?,
            on_event_error: OnEventError::parse(&req::<String>(row, 11)?).unwrap_or(OnEventError::DeadLetter),
            snapshot: SnapshotMode::parse(&req::<String>(row, 12)?).unwrap_or(SnapshotMode::None),
        })
    }

    fn load(condition: &str, arg: DatumWithOid) -> Result<Option<Publication>> {
        let sql = format!("SELECT {PUBLICATION_COLUMNS} FROM kafka.publication_catalog WHERE {condition}");
        load_one(&sql, arg, Publication::from_row)
    }

    pub(crate) fn by_id(id: i32) -> Result<Option<Publication>> {
        Publication::load("id = $1", id.into())
    }

    pub(crate) fn by_name(name: &str) -> Result<Publication> {
        Publication::load("name = $1", name.into())?
            .ok_or_else(|| BridgeError::UndefinedObject { kind: "publication", name: name.into() })
    }

    /// Looks a publication up by name, locking its row against concurrent changes.
    pub(crate) fn by_name_for_update(name: &str) -> Result<Publication> {
        Publication::load("name = $1 FOR UPDATE", name.into())?
            .ok_or_else(|| BridgeError::UndefinedObject { kind: "publication", name: name.into() })
    }

    pub(crate) fn by_slot_name(slot_name: &str) -> Result<Option<Publication>> {
        Publication::load("slot_name = $1", slot_name.into())
    }

    pub(crate) fn exists(name: &str) -> Result<bool> {
        Ok(super::query_optional::<i32>("SELECT 1 FROM kafka.publication_catalog WHERE name = $1", &[name.into()])?
            .is_some())
    }

    pub(crate) fn insert(&self) -> Result<i32> {
        let tables: Vec<i64> = self.tables.iter().map(|oid| u32::from(*oid) as i64).collect();
        Spi::connect_mut(|client| {
            let row = client.update(
                "INSERT INTO kafka.publication_catalog (name, owner, brokers, tables, topic, progress_topic, \
                 slot_name, options, on_event_error, snapshot) \
                 VALUES ($1, $2, $3, $4::bigint[]::oid[], $5, $6, $7, $8, $9, $10) \
                 RETURNING id",
                Some(1),
                &[
                    self.name.as_str().into(),
                    self.owner.into(),
                    self.brokers.as_str().into(),
                    tables.into(),
                    self.topic.as_str().into(),
                    self.progress_topic.as_str().into(),
                    self.slot_name.as_str().into(),
                    JsonB(self.options.clone()).into(),
                    self.on_event_error.as_str().into(),
                    self.snapshot.as_str().into(),
                ],
            )?;
            Ok(row.first().get_one::<i32>()?.unwrap_or_default())
        })
    }

    /// Stores the settings `kafka.alter_publication` may change.
    pub(crate) fn update_settings(&self) -> Result<()> {
        let tables: Vec<i64> = self.tables.iter().map(|oid| u32::from(*oid) as i64).collect();
        Spi::connect_mut(|client| {
            client.update(
                "UPDATE kafka.publication_catalog SET brokers = $2, options = $3, tables = $4::bigint[]::oid[] \
                 WHERE id = $1",
                None,
                &[self.id.into(), self.brokers.as_str().into(), JsonB(self.options.clone()).into(), tables.into()],
            )?;
            Ok(())
        })
    }

    pub(crate) fn set_enabled(&self, enabled: bool) -> Result<()> {
        super::set_enabled_in("kafka.publication_catalog", self.id, enabled)
    }

    pub(crate) fn delete(&self) -> Result<()> {
        super::delete_from("kafka.publication_catalog", self.id)
    }
}

/// Ids of the enabled publications.
pub(crate) fn enabled_publications() -> Result<Vec<i32>> {
    Spi::connect(|client| {
        let table = client.select("SELECT id FROM kafka.publication_catalog WHERE enabled ORDER BY id", None, &[])?;
        table.into_iter().map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default())).collect()
    })
}

/// Records events Kafka can never take; an event recorded before (the WAL decoded again)
/// is left as it is.
pub(crate) fn record_dead_letters(publication: &Publication, letters: &[PublicationDeadLetter]) -> Result<()> {
    Spi::connect_mut(|client| {
        for letter in letters {
            client.update(
                "INSERT INTO kafka.publication_dead_letters \
                   (publication_id, publication, lsn, seq, topic, key, value, error) \
                 VALUES ($1, $2, '0/0'::pg_catalog.pg_lsn OPERATOR(pg_catalog.+) $3::pg_catalog.numeric, $4, $5, $6, $7, $8) \
                 ON CONFLICT (publication_id, lsn, seq) DO NOTHING",
                None,
                &[
                    publication.id.into(),
                    publication.name.as_str().into(),
                    (letter.position.commit_lsn as i64).into(),
                    letter.position.seq.into(),
                    letter.topic.as_str().into(),
                    letter.key.as_deref().into(),
                    letter.value.as_deref().into(),
                    letter.error.as_str().into(),
                ],
            )?;
        }
        Ok(())
    })
}

/// Positions of the publication's dead letters after `after` (all of them if `None`).
pub(crate) fn recorded_dead_letters(publication_id: i32, after: Option<Position>) -> Result<HashSet<Position>> {
    let (lsn, seq) = after.map_or((-1, -1), |p| (p.commit_lsn as i64, p.seq));
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT (lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::pg_catalog.int8, seq \
               FROM kafka.publication_dead_letters \
              WHERE publication_id = $1 \
                AND ((lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::pg_catalog.int8, seq) > ($2, $3)",
            None,
            &[publication_id.into(), lsn.into(), seq.into()],
        )?;
        rows.into_iter()
            .map(|row| Ok(Position { commit_lsn: req::<i64>(&row, 1)? as u64, seq: req(&row, 2)? }))
            .collect()
    })
}
