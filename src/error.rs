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
    /// An event Kafka can never take (too large, a topic name it refuses).
    #[error("{0}")]
    EventRejected(String),
    /// A publication found events that Kafka can never take and must record them as dead
    /// letters before its next Kafka commit; decoding starts again once they are.
    #[error("dead letters must be recorded before the next Kafka commit")]
    DeadLettersToRecord,
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
            BridgeError::EventRejected(_) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            BridgeError::DeadLettersToRecord => ERRCODE_T_R_SERIALIZATION_FAILURE,
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

    /// Whether the error says the environment is at fault (the server, the session, the
    /// table's definition or privileges, the broker), not the data being written. A
    /// message whose write fails alone with any other error is a dead letter; a batch that
    /// fails with one of these is retried with backoff and never split into dead letters.
    ///
    /// The environment's SQLSTATE classes: 08 connection, 0A feature not supported (by the
    /// table), 0B/25 transaction state (a read-only server), 28 authorization, 3D/3F missing
    /// database or schema, 40 serialization failure or deadlock, 42 undefined or
    /// inaccessible objects (a dropped column, a revoked privilege), 53 insufficient
    /// resources (disk full, out of memory), 55 object not in prerequisite state (lock not
    /// available), 57 operator intervention (cancel, shutdown), 58 system error (I/O), 72
    /// snapshot too old, F0 configuration, HV foreign data wrapper, XX internal error. Not
    /// in the list, on purpose: 22 data exceptions, 23 constraint violations, 54 program
    /// limits (a value too deeply nested or too large for an index), P0 raised by a trigger.
    pub(crate) fn is_environment_error(&self) -> bool {
        let BridgeError::Postgres { sqlstate, .. } = self else {
            return true;
        };
        const ENVIRONMENT: [&[u8; 2]; 17] = [
            b"08", b"0A", b"25", b"28", b"3D", b"3F", b"40", b"42", b"53", b"55", b"57", b"58", b"72", b"F0", b"HV",
            b"XX", b"0B",
        ];
        let class = sqlstate_class(*sqlstate as i32);
        ENVIRONMENT.iter().any(|c| **c == class)
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
