//! Configuration parameters (`pg_kafka_bridge.*`), registered once in `_PG_init` and read
//! through the typed accessors below.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static LAUNCHER_NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static RETRY_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static METADATA_REFRESH_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
static CONSUMER_QUEUE_KBYTES: GucSetting<i32> = GucSetting::<i32>::new(16_384);
static PUBLISH_CONSUMER_OFFSETS: GucSetting<bool> = GucSetting::<bool>::new(false);
static SUBSCRIPTION_SYNCHRONOUS_COMMIT: GucSetting<bool> = GucSetting::<bool>::new(false);
static FAILOVER_SLOTS: GucSetting<bool> = GucSetting::<bool>::new(false);
static SNAPSHOT_CHUNK_ROWS: GucSetting<i32> = GucSetting::<i32>::new(20_000);

pub(crate) fn define() {
    GucRegistry::define_string_guc(
        c"pg_kafka_bridge.database",
        c"Database in which the launcher looks for subscriptions.",
        c"The extension must be created in this database; its workers connect to it.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_kafka_bridge.launcher_naptime",
        c"Longest time the launcher sleeps between two checks of the catalog.",
        c"Creating, starting or stopping a subscription wakes the launcher at commit anyway.",
        &LAUNCHER_NAPTIME_MS,
        50,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_kafka_bridge.retry_backoff_max",
        c"Longest wait of a worker between two attempts after an error.",
        c"The wait starts at 100 ms and doubles after each failed attempt, up to this value.",
        &RETRY_BACKOFF_MAX_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_kafka_bridge.metadata_refresh",
        c"How often a subscription worker checks its topic for new partitions.",
        c"",
        &METADATA_REFRESH_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_kafka_bridge.publish_consumer_offsets",
        c"Also commit applied positions to each subscription's Kafka consumer group.",
        c"Only so that Kafka's lag tools see subscriptions; positions are always read from kafka.offsets.",
        &PUBLISH_CONSUMER_OFFSETS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_kafka_bridge.subscription_synchronous_commit",
        c"Whether subscription workers wait for each batch's commit to reach disk (synchronous_commit).",
        c"Off by default, as for PostgreSQL's own subscriptions: a crash can only undo the last batches \
          together with their offsets, and the worker reads them from Kafka again.",
        &SUBSCRIPTION_SYNCHRONOUS_COMMIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_kafka_bridge.failover_slots",
        c"Whether publications created from now on get failover replication slots (PostgreSQL 17 and later).",
        c"A failover slot is synchronised to standbys that have sync_replication_slots on, so that a \
          promoted standby continues the publication.",
        &FAILOVER_SLOTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_kafka_bridge.consumer_queue_size",
        c"Most pre-fetched message data a subscription worker buffers (librdkafka queued.max.messages.kbytes).",
        c"Bounds a worker's memory whatever the backlog; a subscription's options can override it.",
        &CONSUMER_QUEUE_KBYTES,
        1024,
        2_097_151,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_kafka_bridge.snapshot_chunk_rows",
        c"Most rows a publication's snapshot reads in one chunk (one short transaction).",
        c"Chunks of wide rows stop earlier, at 8 MB of events.",
        &SNAPSHOT_CHUNK_ROWS,
        100,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub(crate) fn snapshot_chunk_rows() -> usize {
    SNAPSHOT_CHUNK_ROWS.get() as usize
}

pub(crate) fn publish_consumer_offsets() -> bool {
    PUBLISH_CONSUMER_OFFSETS.get()
}

pub(crate) fn subscription_synchronous_commit() -> bool {
    SUBSCRIPTION_SYNCHRONOUS_COMMIT.get()
}

pub(crate) fn failover_slots() -> bool {
    FAILOVER_SLOTS.get()
}

pub(crate) fn database() -> String {
    DATABASE.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "postgres".into())
}

pub(crate) fn launcher_naptime() -> Duration {
    Duration::from_millis(LAUNCHER_NAPTIME_MS.get() as u64)
}

pub(crate) fn retry_backoff_max() -> Duration {
    Duration::from_millis(RETRY_BACKOFF_MAX_MS.get() as u64)
}

pub(crate) fn metadata_refresh() -> Duration {
    Duration::from_millis(METADATA_REFRESH_MS.get() as u64)
}

pub(crate) fn consumer_queue_kbytes() -> i32 {
    CONSUMER_QUEUE_KBYTES.get()
}

/// How long a value set by [`set_server_setting`] lasts.
#[derive(Clone, Copy)]
pub(crate) enum SettingScope {
    /// The rest of the session, over any role or database default (`ALTER ROLE ... SET`).
    Session,
    /// Until the current transaction ends (`SET LOCAL`).
    Transaction,
    /// Until the GUC nest level the caller opened is closed (`AtEOXact_GUC`).
    NestLevel,
}

/// Sets one of PostgreSQL's own settings in this backend. A value the setting rejects
/// raises an ERROR.
pub(crate) fn set_server_setting(name: &std::ffi::CStr, value: &std::ffi::CStr, scope: SettingScope) {
    let (context, source, action) = match scope {
        SettingScope::Session => (
            pgrx::pg_sys::GucContext::PGC_SUSET,
            pgrx::pg_sys::GucSource::PGC_S_OVERRIDE,
            pgrx::pg_sys::GucAction::GUC_ACTION_SET,
        ),
        SettingScope::Transaction => (
            pgrx::pg_sys::GucContext::PGC_USERSET,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
            pgrx::pg_sys::GucAction::GUC_ACTION_LOCAL,
        ),
        SettingScope::NestLevel => (
            pgrx::pg_sys::GucContext::PGC_USERSET,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
            pgrx::pg_sys::GucAction::GUC_ACTION_SAVE,
        ),
    };
    // SAFETY: called on the backend's main thread; both strings are NUL-terminated and
    // outlive the call, which copies them; elevel 0 makes a rejected value an ERROR.
    unsafe {
        pgrx::pg_sys::set_config_option(name.as_ptr(), value.as_ptr(), context, source, action, true, 0, false);
    }
}
