//! Publications: create (with their replication slot), start, stop, drop (with their slot),
//! and `kafka.send()`.

use crate::catalog::publication::{OnEventError, Publication, SnapshotMode};
use crate::catalog::query_optional;
use crate::catalog::snapshot;
use crate::error::{BridgeError, OrRaise, Result};
use crate::kafka::Options;
use crate::launcher;
use crate::publication::events::render_topic;
use crate::publication::outbox::{self, Outgoing};
use crate::publication::slots;
use crate::security::as_catalog_owner;
use crate::shmem::WorkerKind;
use pgrx::prelude::*;
use pgrx::search_path;
use pgrx::{JsonB, PgRelation};

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn create_publication(
    name: &str,
    brokers: &str,
    tables: Vec<pg_sys::Oid>,
    topic: default!(&str, "'{schema}.{table}'"),
    options: default!(JsonB, "'{}'"),
    progress_topic: default!(Option<&str>, "NULL"),
    on_event_error: default!(&str, "'dead_letter'"),
    snapshot: default!(&str, "'initial'"),
) {
    // SAFETY: GetUserId reads the current user, set in every backend once it is connected.
    let caller = unsafe { pg_sys::GetUserId() };
    let mut oids: Vec<pg_sys::Oid> = Vec::new();
    for oid in tables {
        // Regclass values name existing tables; the lock keeps them until the end.
        // SAFETY: with_lock asks for a real lock mode (not NoLock), so relation_open locks
        // the relation itself and raises an ERROR for an OID that names no relation.
        let table = unsafe { PgRelation::with_lock(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        check_publishable(&table, topic, caller).or_raise();
        if !oids.contains(&oid) {
            oids.push(oid);
        }
    }
    let publication = Publication {
        id: 0,
        name: name.to_owned(),
        owner: caller,
        brokers: brokers.trim().to_owned(),
        tables: oids,
        topic: topic.to_owned(),
        progress_topic: progress_topic.map_or_else(|| format!("pg_kafka_bridge.progress.{name}"), str::to_owned),
        slot_name: slots::slot_name(name),
        options: options.0,
        enabled: true,
        on_event_error: OnEventError::parse(on_event_error)
            .ok_or_else(|| {
                BridgeError::InvalidParameter(format!(
                    "invalid on_event_error \"{on_event_error}\": use {}",
                    OnEventError::NAMES
                ))
            })
            .or_raise(),
        snapshot: SnapshotMode::parse(snapshot)
            .ok_or_else(|| {
                BridgeError::InvalidParameter(format!("invalid snapshot \"{snapshot}\": use {}", SnapshotMode::NAMES))
            })
            .or_raise(),
    };
    validate(&publication).or_raise();
    let snapshots = initial_snapshots(&publication, &publication.tables).or_raise();
    as_catalog_owner(|| {
        slots::lock_publication_catalog()?;
        if Publication::exists(name)? {
            return Err(BridgeError::DuplicateObject { kind: "publication", name: name.into() });
        }
        // The slot comes first: PostgreSQL creates slots only in transactions that have not
        // written anything yet.
        slots::create(&publication.slot_name)?;
        let id = publication.insert()?;
        snapshot::request(id, &snapshots)
    })
    .or_raise();
    launcher::wake_at_commit();
    super::warn_if_workers_run_elsewhere("publication", name);
}

/// The snapshots that publishing `tables` from now on starts with, if the publication's mode
/// is 'initial': per table, whether it holds no row now (read as the caller, the owner).
/// Such a table's snapshot is done at once: every row it gets from now on is a change that
/// decoding publishes.
fn initial_snapshots(publication: &Publication, tables: &[pg_sys::Oid]) -> Result<Vec<(pg_sys::Oid, bool)>> {
    if publication.snapshot == SnapshotMode::None {
        return Ok(Vec::new());
    }
    tables
        .iter()
        .map(|&table| {
            let rows = crate::catalog::every_row_of(table)
                .ok_or_else(|| BridgeError::UndefinedObject { kind: "table", name: format!("OID {table}") })?;
            let empty = query_optional::<bool>(&format!("SELECT NOT EXISTS (SELECT FROM {rows})"), &[])?;
            Ok((table, empty.unwrap_or(false)))
        })
        .collect()
}

fn validate(p: &Publication) -> Result<()> {
    let invalid = |m: String| Err(BridgeError::InvalidParameter(m));
    if p.name.is_empty()
        || p.name.len() > slots::MAX_PUBLICATION_NAME
        || !p.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return invalid(format!(
            "invalid publication name \"{}\": use 1 to {} lower-case letters, digits or '_' (it names a replication slot)",
            p.name,
            slots::MAX_PUBLICATION_NAME
        ));
    }
    if p.brokers.is_empty() {
        return invalid("brokers must name at least one host:port".into());
    }
    if p.tables.is_empty() {
        return invalid("tables must name at least one table".into());
    }
    super::check_topic_name(&p.progress_topic)?;
    Options::for_owner(&p.options, p.owner)?;
    // SAFETY: a plain int GUC variable (PGC_POSTMASTER, so fixed since start-up), read on
    // the backend's main thread.
    let wal_level = unsafe { pg_sys::wal_level };
    if wal_level < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
        return Err(BridgeError::NotInPrerequisiteState(
            "publications need wal_level = logical in postgresql.conf (and a server restart)".into(),
        ));
    }
    Ok(())
}

/// A table can be published if it is a plain, WAL-logged table with a key for its events,
/// whose changes the caller may read, and whose topic is a valid name.
fn check_publishable(table: &PgRelation, template: &str, caller: pg_sys::Oid) -> Result<()> {
    let invalid = |m: String| Err(BridgeError::InvalidParameter(m));
    let quoted = format!("{}.{}", spi::quote_identifier(table.namespace()), spi::quote_identifier(table.name()));
    // SAFETY: `table` is open and locked, so rd_rel points to its relcache entry's pg_class
    // row, valid until the relation is closed (when `table` is dropped); only read here.
    let (relkind, persistence, identity) = unsafe {
        let rel = &*table.rd_rel;
        (rel.relkind as u8, rel.relpersistence as u8, rel.relreplident as u8)
    };
    // A partitioned table's partitions (those attached later too) are published as it.
    if relkind != pg_sys::RELKIND_RELATION && relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        return invalid(format!("{quoted} is not a table"));
    }
    if table.namespace() == "pg_catalog" || table.namespace() == "information_schema" {
        return invalid(format!("{quoted} is a system catalog"));
    }
    if persistence != pg_sys::RELPERSISTENCE_PERMANENT {
        return invalid(format!("{quoted} is a temporary or unlogged table, whose changes are not in the WAL"));
    }
    let has_primary_key = query_optional::<bool>(
        "SELECT true FROM pg_catalog.pg_index WHERE indrelid = $1 AND indisprimary",
        &[table.oid().into()],
    )?
    .is_some();
    let keyed = match identity {
        pg_sys::REPLICA_IDENTITY_INDEX => true,
        pg_sys::REPLICA_IDENTITY_DEFAULT | pg_sys::REPLICA_IDENTITY_FULL => has_primary_key,
        _ => false,
    };
    if !keyed {
        return invalid(format!(
            "{quoted} has no key for its events: add a primary key, or set REPLICA IDENTITY USING INDEX on a unique index"
        ));
    }
    crate::security::check_reads_every_row(table.oid(), caller, &quoted)?;
    super::check_topic_name(&render_topic(template, table.namespace(), table.name()))
}

/// Changes a publication in place; NULL leaves a setting as it is, `options` replaces the
/// whole object. The slot stays, and with it the position: once the transaction commits,
/// the worker starts a new session with the new definition, from its last published
/// position. The table list applies from there: an added table's changes after it are
/// published, a dropped table's are not. An added table's rows are snapshotted if the
/// publication's snapshot mode is 'initial'.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn alter_publication(
    name: &str,
    brokers: default!(Option<&str>, "NULL"),
    options: default!(Option<JsonB>, "NULL"),
    add_tables: default!(Option<Vec<pg_sys::Oid>>, "NULL"),
    drop_tables: default!(Option<Vec<pg_sys::Oid>>, "NULL"),
) {
    change_publication(name, |current| {
        let mut altered = current.clone();
        altered.brokers = brokers.map_or(altered.brokers, |b| b.trim().to_owned());
        altered.options = options.map_or(altered.options, |o| o.0);
        for oid in add_tables.unwrap_or_default() {
            // SAFETY: as in create_publication: a real lock mode, so an OID that names no
            // relation raises an ERROR.
            let table = unsafe { PgRelation::with_lock(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
            check_publishable(&table, &altered.topic, altered.owner)?;
            if !altered.tables.contains(&oid) {
                altered.tables.push(oid);
            }
        }
        for oid in drop_tables.unwrap_or_default() {
            if !altered.tables.contains(&oid) {
                let table = crate::catalog::qualified_table_name(oid).unwrap_or_else(|| format!("OID {oid}"));
                return Err(BridgeError::InvalidParameter(format!("{table} is not published by \"{name}\"")));
            }
            altered.tables.retain(|t| *t != oid);
        }
        validate(&altered)?;
        altered.update_settings()?;
        let added: Vec<pg_sys::Oid> = altered.tables.iter().filter(|t| !current.tables.contains(t)).copied().collect();
        let dropped: Vec<pg_sys::Oid> =
            current.tables.iter().filter(|t| !altered.tables.contains(t)).copied().collect();
        snapshot::forget(altered.id, &dropped)?;
        snapshot::request(altered.id, &initial_snapshots(&altered, &added)?)?;
        launcher::reload_at_commit(WorkerKind::Publication, altered.id);
        Ok(())
    })
    .or_raise();
}

/// Publishes the current rows of `tables` (all the publication's tables if NULL) again,
/// while the publication keeps streaming: each table's snapshot starts a new run, taken
/// after the runs requested before it.
#[pg_extern(name = "snapshot", volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn request_snapshot(publication: &str, tables: default!(Option<Vec<pg_sys::Oid>>, "NULL")) {
    change_publication(publication, |p| {
        let tables = match tables {
            None => p.tables.clone(),
            Some(tables) => {
                for table in &tables {
                    if !p.tables.contains(table) {
                        let name =
                            crate::catalog::qualified_table_name(*table).unwrap_or_else(|| format!("OID {table}"));
                        return Err(BridgeError::InvalidParameter(format!(
                            "{name} is not published by \"{publication}\""
                        )));
                    }
                }
                tables
            }
        };
        let existing: Vec<(pg_sys::Oid, bool)> = tables
            .into_iter()
            .filter(|t| crate::catalog::qualified_table_name(*t).is_some())
            .map(|t| (t, false))
            .collect();
        snapshot::request(p.id, &existing)
    })
    .or_raise();
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn start_publication(name: &str) {
    change_publication(name, |p| p.set_enabled(true)).or_raise();
    launcher::wake_at_commit();
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn stop_publication(name: &str) {
    change_publication(name, |p| p.set_enabled(false)).or_raise();
    launcher::wake_at_commit();
}

/// Drops the publication; its worker stops, and its slot is dropped, once the transaction
/// commits (see [`slots`]).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn drop_publication(name: &str) {
    change_publication(name, |p| {
        slots::drop_at_commit(&p.slot_name)?;
        p.delete()
    })
    .or_raise();
    launcher::wake_at_commit();
}

/// Looks up a publication the caller owns, locks it and applies `change`.
fn change_publication<R>(name: &str, change: impl FnOnce(&Publication) -> Result<R>) -> Result<R> {
    // SAFETY: GetUserId reads the current user, set in every backend once it is connected.
    let caller = unsafe { pg_sys::GetUserId() };
    as_catalog_owner(|| {
        let publication = Publication::by_name_for_update(name)?;
        super::check_owner(caller, publication.owner, "publication", name)?;
        change(&publication)
    })
}

/// Publishes a message to `topic` through the publication if, and only if, the calling
/// transaction commits; in commit order with the publication's table changes.
#[pg_extern(name = "send", volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn send_text(publication: &str, topic: &str, key: Option<&str>, value: Option<&str>) {
    send(publication, topic, key.map(str::as_bytes), value.map(str::as_bytes)).or_raise();
}

#[pg_extern(name = "send", volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn send_bytea(publication: &str, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    send(publication, topic, key, value).or_raise();
}

fn send(publication: &str, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()> {
    super::check_topic_name(topic)?;
    // SAFETY: GetUserId reads the current user, set in every backend once it is connected.
    let caller = unsafe { pg_sys::GetUserId() };
    let found = as_catalog_owner(|| Publication::by_name(publication))?;
    super::check_owner(caller, found.owner, "publication", publication)?;
    let message = Outgoing { publication_id: found.id, topic, key, value }.encode();
    // SAFETY: on the backend's main thread inside the caller's transaction, which the
    // message's transaction id comes from.
    unsafe { crate::compat::log_transactional_message(outbox::PREFIX, &message) };
    Ok(())
}
