//! Publications as stored in `kafka.publication_catalog`.

use super::{load_one, req};
use crate::error::{BridgeError, Result};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::JsonB;

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
}

const PUBLICATION_COLUMNS: &str =
    "id, name, owner, brokers, tables::bigint[], topic, progress_topic, slot_name::text, options, enabled";

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
                 slot_name, options) VALUES ($1, $2, $3, $4::bigint[]::oid[], $5, $6, $7, $8) RETURNING id",
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
                ],
            )?;
            Ok(row.first().get_one::<i32>()?.unwrap_or_default())
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
