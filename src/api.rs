//! The SQL API: thin functions that check their arguments and the caller's rights, write the
//! catalog, and wake the launcher when the transaction commits.

use crate::catalog::Subscription;
use crate::error::{BridgeError, OrRaise, Result};
use crate::format::{Format, Mode};
use crate::kafka::Options;
use crate::launcher;
use crate::security::as_catalog_owner;
use crate::shmem::{self, WorkerKind};
use crate::subscription::target::Target;
use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation};

const MAX_BATCH_SIZE: i32 = 1_000_000;

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn create_subscription(
    name: &str,
    brokers: &str,
    topic: &str,
    target: PgRelation,
    format: default!(&str, "'json'"),
    mode: default!(&str, "'insert'"),
    key_columns: default!(Option<Vec<String>>, "NULL"),
    start_from: default!(&str, "'earliest'"),
    batch_size: default!(i32, 10000),
    batch_timeout_ms: default!(i32, 100),
    workers: default!(i32, 1),
    options: default!(JsonB, "'{}'"),
) {
    let caller = unsafe { pg_sys::GetUserId() };
    let subscription = Subscription {
        id: 0,
        name: name.to_owned(),
        owner: caller,
        brokers: brokers.trim().to_owned(),
        topic: topic.to_owned(),
        target_schema: target.namespace().to_owned(),
        target_table: target.name().to_owned(),
        format: format.to_owned(),
        mode: mode.to_owned(),
        key_columns,
        start_from: start_from.to_owned(),
        batch_size,
        batch_timeout_ms,
        workers,
        options: options.0,
        enabled: true,
    };
    validate(&subscription, &target).or_raise();
    as_catalog_owner(|| subscription.insert()).or_raise();
    launcher::wake_at_commit();
    let database = crate::settings::database();
    if current_database() != database {
        warning!(
            "subscription \"{name}\" will not run in this database: workers run only in database \"{database}\" (pg_kafka_bridge.database)"
        );
    }
}

fn current_database() -> String {
    unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }.to_string_lossy().into_owned()
}

fn validate(s: &Subscription, target: &PgRelation) -> Result<()> {
    let invalid = |m: String| Err(BridgeError::InvalidParameter(m));
    if s.name.is_empty() || s.name.len() > 63 || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return invalid(format!(
            "invalid subscription name \"{}\": use 1 to 63 letters, digits, '_', '.' or '-'",
            s.name
        ));
    }
    if s.brokers.is_empty() {
        return invalid("brokers must name at least one host:port".into());
    }
    if s.topic.is_empty()
        || s.topic.len() > 249
        || !s.topic.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return invalid(format!(
            "invalid topic name \"{}\": Kafka topics use 1 to 249 letters, digits, '_', '.' or '-'",
            s.topic
        ));
    }
    let Some(format) = Format::parse(&s.format) else {
        return invalid(format!("unknown format \"{}\": use {}", s.format, Format::NAMES));
    };
    let Some(mode) = Mode::parse(&s.mode) else {
        return invalid(format!("unknown mode \"{}\": use {}", s.mode, Mode::NAMES));
    };
    if s.start_from != "earliest" && s.start_from != "latest" {
        return invalid(format!("unknown start_from \"{}\": use 'earliest' or 'latest'", s.start_from));
    }
    if !(1..=MAX_BATCH_SIZE).contains(&s.batch_size) {
        return invalid(format!("batch_size must be between 1 and {MAX_BATCH_SIZE}, not {}", s.batch_size));
    }
    if !(0..=60_000).contains(&s.batch_timeout_ms) {
        return invalid(format!("batch_timeout_ms must be between 0 and 60000, not {}", s.batch_timeout_ms));
    }
    if s.workers < 1 || s.workers > shmem::MAX_WORKERS as i32 {
        return invalid(format!("workers must be between 1 and {}, not {}", shmem::MAX_WORKERS, s.workers));
    }
    if mode == Mode::Insert && s.key_columns.is_some() {
        return invalid("key_columns applies to mode 'upsert' only".into());
    }
    Options::from_json(&s.options)?;
    let (relkind, persistence) = unsafe { ((*target.rd_rel).relkind as u8, (*target.rd_rel).relpersistence as u8) };
    if relkind != pg_sys::RELKIND_RELATION && relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        return invalid(format!("\"{}\" is not a table", target.name()));
    }
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        return invalid(format!("\"{}\" is a temporary table, which background workers cannot see", target.name()));
    }
    let quoted = format!("{}.{}", spi::quote_identifier(target.namespace()), spi::quote_identifier(target.name()));
    let target = Target::describe(target.oid(), quoted, format, mode, s.key_columns.as_deref())?;
    target.check_writable_by(s.owner)
}

#[pg_extern(volatile, parallel_unsafe)]
fn start_subscription(name: &str) {
    change_subscription(name, |s| s.set_enabled(true)).or_raise();
}

#[pg_extern(volatile, parallel_unsafe)]
fn stop_subscription(name: &str) {
    change_subscription(name, |s| s.set_enabled(false)).or_raise();
}

#[pg_extern(volatile, parallel_unsafe)]
fn drop_subscription(name: &str) {
    change_subscription(name, |s| s.delete()).or_raise();
}

/// Applies `change` to a subscription the caller owns, then wakes the launcher at commit.
fn change_subscription(name: &str, change: impl FnOnce(&Subscription) -> Result<()>) -> Result<()> {
    let caller = unsafe { pg_sys::GetUserId() };
    as_catalog_owner(|| {
        let subscription = Subscription::by_name_for_update(name)?;
        if !unsafe { pg_sys::has_privs_of_role(caller, subscription.owner) } {
            return Err(BridgeError::InsufficientPrivilege(format!("must be owner of subscription \"{name}\"")));
        }
        change(&subscription)
    })?;
    launcher::wake_at_commit();
    Ok(())
}

/// One row per worker and partition it consumes, from the workers' shared-memory slots.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(kind, String),
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
    let timestamp = |t: pg_sys::TimestampTz| (t != 0).then(|| TimestampWithTimeZone::try_from(t).ok()).flatten();
    let mut rows = Vec::new();
    let database = unsafe { pg_sys::MyDatabaseId };
    for (_, slot) in shmem::snapshot().into_iter().filter(|(_, s)| s.database == database) {
        let kind = match slot.kind {
            WorkerKind::Subscription => "subscription",
        };
        let common = (
            kind.to_string(),
            slot.object_id,
            slot.worker_index,
            (slot.pid > 0).then_some(slot.pid),
            slot.state.as_str().to_string(),
        );
        let error = slot.last_error();
        let tail =
            (slot.rows_per_second, slot.rows_total, error, timestamp(slot.last_error_at), timestamp(slot.started_at));
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
                common.0.clone(),
                common.1,
                common.2,
                common.3,
                common.4.clone(),
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
