//! Subscriptions: create, start, stop, drop.

use crate::catalog::Subscription;
use crate::error::{BridgeError, OrRaise, Result};
use crate::format::{Format, Mode};
use crate::kafka::Options;
use crate::launcher;
use crate::security::as_catalog_owner;
use crate::shmem;
use crate::subscription::target::Target;
use pgrx::prelude::*;
use pgrx::search_path;
use pgrx::{JsonB, PgRelation};

const MAX_BATCH_SIZE: i32 = 1_000_000;

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
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
    super::warn_if_workers_run_elsewhere("subscription", name);
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
    super::check_topic_name(&s.topic)?;
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
    Options::for_owner(&s.options, s.owner)?;
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
#[search_path(pg_catalog, pg_temp)]
fn start_subscription(name: &str) {
    change_subscription(name, |s| s.set_enabled(true)).or_raise();
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn stop_subscription(name: &str) {
    change_subscription(name, |s| s.set_enabled(false)).or_raise();
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn drop_subscription(name: &str) {
    change_subscription(name, |s| s.delete()).or_raise();
}

/// Applies `change` to a subscription the caller owns, then wakes the launcher at commit.
fn change_subscription(name: &str, change: impl FnOnce(&Subscription) -> Result<()>) -> Result<()> {
    let caller = unsafe { pg_sys::GetUserId() };
    as_catalog_owner(|| {
        let subscription = Subscription::by_name_for_update(name)?;
        super::check_owner(caller, subscription.owner, "subscription", name)?;
        change(&subscription)
    })?;
    launcher::wake_at_commit();
    Ok(())
}
