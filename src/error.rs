//! The extension's error type. Inside the extension errors are values; at the SQL boundary
//! they become PostgreSQL `ERROR`s with a SQLSTATE, and in workers they become the
//! `last_error` of the status views.

use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub(crate) enum BridgeError {
    /// A SQL argument that is not acceptable.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{kind} \"{name}\" does not exist")]
    UndefinedObject { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    DuplicateObject { kind: &'static str, name: String },
    #[error("{0}")]
    InsufficientPrivilege(String),
    /// The object exists but cannot be used as asked (wrong state, missing prerequisite).
    #[error("{0}")]
    NotInPrerequisiteState(String),
    /// Asked of a PostgreSQL version that does not have it.
    #[error("{0}")]
    FeatureNotSupported(String),
    /// The broker could not be reached or refused a request.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// Another worker or a manual change moved a stored offset under this worker's feet.
    #[error("stored offset of {topic}/{partition} moved to {found:?} while this worker expected {expected}; re-reading positions")]
    OffsetMoved { topic: String, partition: i32, expected: i64, found: Option<i64> },
    /// An error raised by PostgreSQL while the worker was running SQL or applying rows.
    #[error("{message}")]
    Postgres { sqlstate: PgSqlErrorCode, message: String },
}

pub(crate) type Result<T, E = BridgeError> = std::result::Result<T, E>;

impl BridgeError {
    pub(crate) fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            BridgeError::InvalidParameter(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            BridgeError::UndefinedObject { .. } => ERRCODE_UNDEFINED_OBJECT,
            BridgeError::DuplicateObject { .. } => ERRCODE_DUPLICATE_OBJECT,
            BridgeError::InsufficientPrivilege(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            BridgeError::NotInPrerequisiteState(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            BridgeError::FeatureNotSupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            BridgeError::Kafka(_) => ERRCODE_CONNECTION_FAILURE,
            BridgeError::OffsetMoved { .. } => ERRCODE_T_R_SERIALIZATION_FAILURE,
            BridgeError::Postgres { sqlstate, .. } => *sqlstate,
        }
    }

    /// Raises this error as a PostgreSQL `ERROR`; used only at the SQL boundary.
    pub(crate) fn raise(self) -> ! {
        pgrx::ereport!(PgLogLevel::ERROR, self.sqlstate(), self.to_string());
        unreachable!("ereport(ERROR) returns control")
    }

    /// Turns an error caught from PostgreSQL (or a Rust panic) back into a value.
    pub(crate) fn from_caught(caught: CaughtError) -> Self {
        match caught {
            CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => report.into(),
            CaughtError::RustPanic { ereport, .. } => ereport.into(),
        }
    }

    /// Whether the error is the fault of the row being written (bad value, constraint
    /// violation, rejected by a trigger), as opposed to the table, the server or the session.
    /// Only such errors may send a message to the dead-letter table.
    pub(crate) fn is_row_error(&self) -> bool {
        let BridgeError::Postgres { sqlstate, .. } = self else {
            return false;
        };
        let code = *sqlstate as i32;
        let class = sqlstate_class(code);
        // 22: data exception, 23: integrity constraint violation, P0: raised by PL/pgSQL.
        class == *b"22" || class == *b"23" || class == *b"P0"
    }
}

/// The two leading characters of a SQLSTATE packed the way PostgreSQL packs them.
fn sqlstate_class(code: i32) -> [u8; 2] {
    let unpack = |shift: u32| (((code >> shift) & 0x3F) as u8) + b'0';
    [unpack(0), unpack(6)]
}

impl From<ErrorReportWithLevel> for BridgeError {
    fn from(report: ErrorReportWithLevel) -> Self {
        let mut message = report.message().to_string();
        if let Some(detail) = report.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        BridgeError::Postgres { sqlstate: report.sql_error_code(), message }
    }
}

impl From<rdkafka::error::KafkaError> for BridgeError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        BridgeError::Kafka(e.to_string())
    }
}

/// Unwraps a result at the SQL boundary, raising the error as a PostgreSQL `ERROR`.
pub(crate) trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

impl From<pgrx::spi::SpiError> for BridgeError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        BridgeError::Postgres { sqlstate: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, message: format!("SPI: {e}") }
    }
}
