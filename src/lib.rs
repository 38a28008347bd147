//! pg_kafka_bridge: exactly-once data movement between Apache Kafka and PostgreSQL, run by
//! background workers inside the database.
//!
//! Map of the modules:
//! - [`settings`]: the `pg_kafka_bridge.*` configuration parameters.
//! - [`error`]: the error type and its mapping to SQLSTATEs.
//! - [`catalog`]: the only code that reads and writes the `kafka.*` tables.
//! - [`api`]: the SQL functions (`kafka.create_subscription`, `kafka.send`, ...), thin wrappers
//!   over the catalog.
//! - [`shmem`]: worker slots in shared memory, which back the status views.
//! - [`security`]: switching the current user for catalog writes and row writes.
//! - [`launcher`]: the launcher background worker; it starts and stops workers, nothing else.
//! - [`worker`]: what every worker shares: entry, signals, transactions, backoff.
//! - [`subscription`]: Kafka to PostgreSQL: consume, batch, apply, dead letters.
//! - [`publication`]: PostgreSQL to Kafka: logical decoding in the worker (and the output
//!   plugin), change events, transactional publishing with progress records.
//! - [`format`]: message to row conversion, pure Rust.
//! - [`kafka`]: Kafka client options and the hand-over of librdkafka errors.

use pgrx::prelude::*;

pub(crate) mod api;
pub(crate) mod catalog;
pub(crate) mod compat;
pub(crate) mod error;
pub(crate) mod format;
pub(crate) mod kafka;
pub(crate) mod launcher;
pub(crate) mod publication;
pub(crate) mod security;
pub(crate) mod settings;
pub(crate) mod shmem;
pub(crate) mod subscription;
pub(crate) mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/views.sql", name = "views", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Workers and shared memory can only be set up by the postmaster while it loads
    // shared_preload_libraries; loaded any other way the extension could not run at all.
    // SAFETY: a plain bool global that miscinit.c sets around loading the preload
    // libraries; read on the loading process's main thread, where _PG_init runs.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        error!("pg_kafka_bridge must be loaded via shared_preload_libraries");
    }
    settings::define();
    shmem::init();
    publication::slots::install_drop_extension_hook();
    launcher::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod sql_api_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_kafka_bridge'"]
    }
}
