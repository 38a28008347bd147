//! Subscriptions: create, start, stop, drop.

use crate::catalog::{self, ExistingOffset, Subscription};
use crate::error::{BridgeError, OrRaise, Result};
use crate::format::{Format, Mode, StartFrom};
use crate::kafka::Options;
use crate::launcher;
use crate::security::as_catalog_owner;
use crate::shmem::{self, WorkerKind};
use crate::subscription::consumer::{SeekTarget, TopicConsumer};
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
    // SAFETY: GetUserId reads the current user, set in every backend once it is connected.
    let caller = unsafe { pg_sys::GetUserId() };
    let brokers = brokers.trim();
    check_names(name, topic).or_raise();
    let subscription = Subscription {
        id: 0,
        name: name.to_owned(),
        owner: caller,
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        target_schema: target.namespace().to_owned(),
        target_table: target.name().to_owned(),
        format: choice(format, Format::parse, "format", Format::NAMES).or_raise(),
        mode: choice(mode, Mode::parse, "mode", Mode::NAMES).or_raise(),
        key_columns,
        start_from: choice(start_from, StartFrom::parse, "start_from", StartFrom::NAMES).or_raise(),
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

fn check_names(name: &str, topic: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(BridgeError::InvalidParameter(format!(
            "invalid subscription name \"{name}\": use 1 to 63 letters, digits, '_', '.' or '-'"
        )));
    }
    super::check_topic_name(topic)
}

/// One of the values a text argument may take, or an error that lists them.
fn choice<T>(value: &str, parse: fn(&str) -> Option<T>, argument: &str, names: &str) -> Result<T> {
    parse(value).ok_or_else(|| BridgeError::InvalidParameter(format!("unknown {argument} \"{value}\": use {names}")))
}

fn validate(s: &Subscription, target: &PgRelation) -> Result<()> {
    validate_settings(s)?;
    validate_target(s, target)
}

/// The settings that do not depend on the target table.
fn validate_settings(s: &Subscription) -> Result<()> {
    let invalid = |m: String| Err(BridgeError::InvalidParameter(m));
    if s.brokers.is_empty() {
        return invalid("brokers must name at least one host:port".into());
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
    if s.mode == Mode::Insert && s.key_columns.is_some() {
        return invalid("key_columns applies to mode 'upsert' only".into());
    }
    Options::for_owner(&s.options, s.owner)?;
    Ok(())
}

/// The target table: a table the owner may write, whose columns suit the format and mode.
fn validate_target(s: &Subscription, target: &PgRelation) -> Result<()> {
    let invalid = |m: String| Err(BridgeError::InvalidParameter(m));
    let (format, mode) = (s.format, s.mode);
    // SAFETY: pgrx opened `target` (a regclass argument) with AccessShareLock, so rd_rel
    // points to its relcache entry's pg_class row until it is closed; only read here.
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

/// Changes a subscription in place; NULL leaves a setting as it is, `options` replaces the
/// whole object. Its workers start a new session with the new settings once the transaction
/// commits; the stored offsets stay.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn alter_subscription(
    name: &str,
    brokers: default!(Option<&str>, "NULL"),
    options: default!(Option<JsonB>, "NULL"),
    target: default!(Option<PgRelation>, "NULL"),
    batch_size: default!(Option<i32>, "NULL"),
    batch_timeout_ms: default!(Option<i32>, "NULL"),
    workers: default!(Option<i32>, "NULL"),
) {
    change_subscription(name, |current| {
        let mut altered = current.clone();
        altered.brokers = brokers.map_or(altered.brokers, |b| b.trim().to_owned());
        altered.options = options.map_or(altered.options, |o| o.0);
        altered.batch_size = batch_size.unwrap_or(altered.batch_size);
        altered.batch_timeout_ms = batch_timeout_ms.unwrap_or(altered.batch_timeout_ms);
        altered.workers = workers.unwrap_or(altered.workers);
        validate_settings(&altered)?;
        if let Some(target) = &target {
            altered.target_schema = target.namespace().to_owned();
            altered.target_table = target.name().to_owned();
            validate_target(&altered, target)?;
        }
        altered.update_settings()?;
        launcher::reload_at_commit(WorkerKind::Subscription, altered.id);
        Ok(())
    })
    .or_raise();
}

/// Sets the next offset of one or all partitions of a stopped subscription: `'earliest'`,
/// `'latest'`, an offset, or a timestamp (the first message at or after it).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn seek(subscription: &str, position: &str, partition: default!(Option<i32>, "NULL")) {
    let target = SeekTarget::parse(position).or_raise();
    change_subscription(subscription, |s| {
        if s.enabled || shmem::has_live_workers(WorkerKind::Subscription, s.id) {
            return Err(BridgeError::NotInPrerequisiteState(format!(
                "subscription \"{subscription}\" is running: stop it with kafka.stop_subscription('{subscription}') \
                 and seek once kafka.subscription_status shows no worker"
            )));
        }
        let options = Options::for_owner(&s.options, s.owner)?;
        let source = TopicConsumer::connect(s, &options)?;
        let partitions = source.partitions()?;
        let chosen = match partition {
            None => partitions,
            Some(p) if partitions.contains(&p) => vec![p],
            Some(p) => {
                return Err(BridgeError::InvalidParameter(format!(
                    "topic \"{}\" has no partition {p} (it has {})",
                    s.topic,
                    partitions.len()
                )))
            }
        };
        let positions = chosen.iter().map(|&p| Ok((p, source.resolve(p, target)?))).collect::<Result<Vec<_>>>()?;
        catalog::store_offsets(s, &positions, ExistingOffset::Replace)
    })
    .or_raise();
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
    // SAFETY: GetUserId reads the current user, set in every backend once it is connected.
    let caller = unsafe { pg_sys::GetUserId() };
    as_catalog_owner(|| {
        let subscription = Subscription::by_name_for_update(name)?;
        super::check_owner(caller, subscription.owner, "subscription", name)?;
        change(&subscription)
    })?;
    launcher::wake_at_commit();
    Ok(())
}
