//! The table a subscription writes: finding it by name, describing its columns, and checking
//! that the subscription's owner may write it.

use crate::catalog;
use crate::error::{BridgeError, Result};
use crate::format::{ColumnInfo, Format, Mode, TargetShape, ValueKind};
use pgrx::prelude::*;
use pgrx::PgTupleDesc;

/// The target table of a subscription, resolved and described.
pub(crate) struct Target {
    pub(crate) relid: pg_sys::Oid,
    pub(crate) shape: TargetShape,
    /// Schema-qualified, quoted name, for messages and generated SQL.
    pub(crate) quoted_name: String,
    /// The writable columns' names and types when the table was described.
    signature: Option<String>,
}

impl Target {
    pub(crate) fn open(
        schema: &str,
        table: &str,
        format: Format,
        mode: Mode,
        key_columns: Option<&[String]>,
    ) -> Result<Target> {
        let quoted_name = format!("{}.{}", spi::quote_identifier(schema), spi::quote_identifier(table));
        let relid = catalog::query_optional::<pg_sys::Oid>(
            "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[schema.into(), table.into()],
        )?
        .ok_or_else(|| BridgeError::UndefinedObject { kind: "table", name: quoted_name.clone() })?;
        Target::describe(relid, quoted_name, format, mode, key_columns)
    }

    pub(crate) fn describe(
        relid: pg_sys::Oid,
        quoted_name: String,
        format: Format,
        mode: Mode,
        key_columns: Option<&[String]>,
    ) -> Result<Target> {
        let columns = writable_columns(relid)?;
        let keys = match (mode, key_columns) {
            (Mode::Insert, _) => Vec::new(),
            (Mode::Upsert, Some(keys)) => keys.to_vec(),
            (Mode::Upsert, None) => primary_key_columns(relid)?,
        };
        if mode == Mode::Upsert && !keys.is_empty() && !has_unique_index_on(relid, &keys)? {
            return Err(BridgeError::InvalidParameter(format!(
                "upsert needs a unique index or constraint on exactly the key columns ({}) of table {quoted_name}",
                keys.join(", ")
            )));
        }
        let shape = TargetShape::new(columns, format, mode, &keys)
            .map_err(|e| BridgeError::InvalidParameter(format!("table {quoted_name}: {e}")))?;
        let signature = column_signature(relid)?;
        Ok(Target { relid, shape, quoted_name, signature })
    }

    /// Fails if the table's columns changed since it was described (or it is gone): the
    /// worker then describes it again rather than write rows shaped for the old table.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        if column_signature(self.relid)? == self.signature {
            return Ok(());
        }
        Err(BridgeError::NotInPrerequisiteState(format!(
            "table {} changed or was dropped; describing it again",
            self.quoted_name
        )))
    }

    /// Checks that `role` may write the table as the subscription's mode needs.
    pub(crate) fn check_writable_by(&self, role: pg_sys::Oid) -> Result<()> {
        let role_exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE oid = $1)",
            &[role.into()],
        )?
        .unwrap_or(false);
        if !role_exists {
            return Err(BridgeError::InsufficientPrivilege(format!(
                "the owner of the subscription (role {}) no longer exists",
                role.to_u32()
            )));
        }
        let mut needed = pg_sys::ACL_INSERT as pg_sys::AclMode;
        if self.shape.mode() == Mode::Upsert {
            needed |= (pg_sys::ACL_SELECT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) as pg_sys::AclMode;
        }
        // SAFETY: a privilege lookup by OID on the main thread inside a transaction; plain
        // values in and out (a table that no longer exists raises an ERROR).
        let granted = unsafe { pg_sys::pg_class_aclmask(self.relid, role, needed, pg_sys::AclMaskHow::ACLMASK_ALL) };
        if granted != needed {
            return Err(BridgeError::InsufficientPrivilege(format!(
                "the subscription owner may not {} table {}",
                if self.shape.mode() == Mode::Upsert { "insert, select, update and delete in" } else { "insert into" },
                self.quoted_name
            )));
        }
        // SAFETY: a catalog lookup by OID on the main thread inside a transaction; plain
        // values in and out, and with noError a missing table gives RLS_NONE.
        let rls = unsafe { pg_sys::check_enable_rls(self.relid, role, true) };
        if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            return Err(BridgeError::NotInPrerequisiteState(format!(
                "table {} has row-level security enabled for the subscription owner; subscriptions cannot write it",
                self.quoted_name
            )));
        }
        Ok(())
    }
}

fn writable_columns(relid: pg_sys::Oid) -> Result<Vec<ColumnInfo>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT a.attname::text, \
                    CASE WHEN a.atttypid IN ('json'::regtype, 'jsonb'::regtype) THEN 'json' \
                         WHEN a.atttypid = 'bytea'::regtype THEN 'bytea' \
                         WHEN t.typcategory = 'A' THEN 'array' ELSE 'other' END \
               FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
              ORDER BY a.attnum",
            None,
            &[relid.into()],
        )?;
        rows.into_iter()
            .map(|row| {
                let kind = match row.get::<&str>(2)?.unwrap_or("other") {
                    "json" => ValueKind::Json,
                    "bytea" => ValueKind::Bytea,
                    "array" => ValueKind::Array,
                    _ => ValueKind::Other,
                };
                Ok(ColumnInfo { name: row.get::<String>(1)?.unwrap_or_default(), kind })
            })
            .collect()
    })
}

/// Names and types of the writable columns, from the relation cache (cheap enough to run
/// before every batch); `None` if the table is gone.
fn column_signature(relid: pg_sys::Oid) -> Result<Option<String>> {
    // SAFETY: on the main thread inside a transaction. try_relation_open returns NULL for a
    // missing table (checked) or an open, locked relation whose rd_att stays valid until
    // relation_close; the PgTupleDesc wrapper (no refcount release) is dropped before that.
    unsafe {
        // Taking the lock also processes pending invalidations, so the description is current.
        let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return Ok(None);
        }
        let signature = PgTupleDesc::from_pg_unchecked((*rel).rd_att)
            .iter()
            .filter(|a| !a.is_dropped() && a.attgenerated == 0)
            .map(|a| format!("{}:{}:{}", a.name(), a.atttypid.to_u32(), a.atttypmod))
            .collect::<Vec<_>>()
            .join(",");
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(Some(signature))
    }
}

fn primary_key_columns(relid: pg_sys::Oid) -> Result<Vec<String>> {
    Ok(Spi::get_one_with_args::<Vec<String>>(
        "SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) \
           FROM pg_catalog.pg_index i \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
          WHERE i.indrelid = $1 AND i.indisprimary",
        &[relid.into()],
    )?
    .unwrap_or_default())
}

fn has_unique_index_on(relid: pg_sys::Oid, columns: &[String]) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS ( \
           SELECT 1 FROM pg_catalog.pg_index i \
            WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
              AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE \"C\") FROM pg_catalog.pg_attribute a \
                    WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) \
                  = (SELECT array_agg(c ORDER BY c COLLATE \"C\") FROM unnest($2::text[]) c) \
              AND i.indnkeyatts = cardinality($2::text[]))",
        &[relid.into(), columns.to_vec().into()],
    )?
    .unwrap_or(false))
}
