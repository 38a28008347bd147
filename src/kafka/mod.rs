//! Kafka client configuration shared by every worker, and the client context that carries
//! librdkafka's errors from its own threads to the worker's main thread.

mod properties;

use crate::error::{BridgeError, Result};
use parking_lot::Mutex;
use pgrx::pg_sys;
use properties::Access;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;

/// Librdkafka properties given by an owner, checked against [`properties`]: the allow-list.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options(Vec<(String, String)>);

impl Options {
    /// Accepts a JSON object whose values are strings, naming properties that `owner` may
    /// set (see [`properties`]), with values librdkafka accepts. Every name is checked before
    /// librdkafka sees any value, since setting some properties loads code at once. No
    /// broker is contacted. Looks roles up: runs inside a transaction.
    pub(crate) fn for_owner(value: &serde_json::Value, owner: pg_sys::Oid) -> Result<Options> {
        let serde_json::Value::Object(map) = value else {
            return Err(BridgeError::InvalidParameter(format!(
                "options must be a JSON object of strings, not {value}"
            )));
        };
        let mut pairs = Vec::with_capacity(map.len());
        for (name, value) in map {
            let serde_json::Value::String(value) = value else {
                return Err(BridgeError::InvalidParameter(format!(
                    "option \"{name}\" must be a JSON string, not {value}"
                )));
            };
            let Some(access) = properties::access(name, value) else {
                return Err(BridgeError::InvalidParameter(format!(
                    "option \"{name}\" is not a librdkafka property that pg_kafka_bridge allows"
                )));
            };
            if access == Access::Managed {
                return Err(BridgeError::InvalidParameter(format!(
                    "option \"{name}\" is set by pg_kafka_bridge and cannot be overridden"
                )));
            }
            if !may_set(owner, access) {
                return Err(BridgeError::InsufficientPrivilege(format!(
                    "option \"{name}\" is not allowed for role \"{}\": {}",
                    crate::security::role_name(owner),
                    access.requirement()
                )));
            }
            pairs.push((name.clone(), value.clone()));
        }
        if properties::kerberos_by_default(&pairs) && !may_set(owner, Access::ServerProgram) {
            return Err(BridgeError::InsufficientPrivilege(format!(
                "option \"security.protocol\" without \"sasl.mechanisms\" means Kerberos (GSSAPI), which is not allowed for role \"{}\": {}",
                crate::security::role_name(owner),
                Access::ServerProgram.requirement()
            )));
        }
        for (name, value) in &pairs {
            let mut probe = ClientConfig::new();
            probe.set(name, value);
            if let Err(e) = probe.create_native_config() {
                return Err(BridgeError::InvalidParameter(format!("option \"{name}\": {}", kafka_reason(&e))));
            }
        }
        Ok(Options(pairs))
    }

    /// The configuration of a Kafka client of `brokers`, in three layers: the extension's
    /// `defaults` (tuning), which these options override, then `managed` properties, which
    /// the extension's guarantees depend on and no option can name.
    pub(crate) fn client_config(
        &self,
        brokers: &str,
        defaults: &[(&str, &str)],
        managed: &[(&str, &str)],
    ) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in defaults {
            config.set(*name, *value);
        }
        for (name, value) in &self.0 {
            config.set(name, value);
        }
        config.set("bootstrap.servers", brokers);
        for (name, value) in managed {
            config.set(*name, *value);
        }
        config
    }
}

/// Whether `role` holds what PostgreSQL asks for the same power as a property of `access`.
fn may_set(role: pg_sys::Oid, access: Access) -> bool {
    // SAFETY: plain catalog lookups by OID (superuser_arg, has_privs_of_role) on the main
    // thread; callers run inside a transaction. Plain values in and out, no pointers.
    unsafe {
        match access {
            Access::Open => true,
            Access::Managed => false,
            _ if pg_sys::superuser_arg(role) => true,
            Access::ServerFiles => {
                pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES))
            }
            Access::ServerProgram => {
                pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM))
            }
            Access::Superuser => false,
        }
    }
}

fn kafka_reason(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, description, _, _) => description.clone(),
        other => other.to_string(),
    }
}

/// Keeps the latest error librdkafka reported from its background threads. The callbacks
/// only store it; the worker's main thread reads it and reports it through PostgreSQL.
#[derive(Clone, Default)]
pub(crate) struct ErrorMailbox(Arc<Mutex<Option<String>>>);

impl ErrorMailbox {
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().take()
    }

    /// Keeps `message` as the latest error (called from librdkafka's threads).
    pub(crate) fn put(&self, message: String) {
        *self.0.lock() = Some(message);
    }
}

pub(crate) struct BridgeContext {
    pub(crate) errors: ErrorMailbox,
}

impl ClientContext for BridgeContext {
    fn log(&self, _level: RDKafkaLogLevel, _facility: &str, _message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.put(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for BridgeContext {}

/// Creates a topic of one partition with the broker's default replication, unless it exists.
/// `compacted` topics keep the last record of each key.
pub(crate) fn create_topic_if_missing(config: &ClientConfig, topic: &str, compacted: bool) -> Result<()> {
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = config.create()?;
    let mut new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(-1));
    if compacted {
        new_topic = new_topic.set("cleanup.policy", "compact");
    }
    let timeout = Some(Duration::from_secs(10));
    let options = AdminOptions::new().operation_timeout(timeout).request_timeout(timeout);
    let results = block_on(admin.create_topics([&new_topic], &options))
        .map_err(|e| BridgeError::Kafka(format!("creating topic \"{topic}\": {e}")))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(BridgeError::Kafka(format!("creating topic \"{name}\": {code}"))),
        }
    }
    Ok(())
}

/// Waits for a future of the admin client, whose own thread completes it.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
    fn raw() -> RawWaker {
        RawWaker::new(std::ptr::null(), &VTABLE)
    }
    static VTABLE: RawWakerVTable = RawWakerVTable::new(|_| raw(), |_| {}, |_| {}, |_| {});
    // SAFETY: the RawWaker contract holds trivially: its data pointer is NULL and never
    // read, clone returns an equal RawWaker, and wake/wake_by_ref/drop do nothing, which
    // is thread-safe. The future is polled every 5 ms instead of relying on wake-ups.
    let waker = unsafe { Waker::from_raw(raw()) };
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
        crate::worker::check_interrupts();
    }
}

/// Why Kafka would refuse `topic` as a topic name, if it would: 1 to 249 ASCII letters,
/// digits, '_', '.' or '-', and neither "." nor "..".
pub(crate) fn topic_name_problem(topic: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." || !topic.chars().all(allowed) {
        return Some(format!(
            "invalid topic name \"{topic}\": Kafka topics use 1 to 249 letters, digits, '_', '.' or '-'"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscription's or publication's options override the extension's defaults (the
    /// README says so of `fetch.wait.max.ms` and the others), never the managed properties.
    #[test]
    fn options_override_defaults_but_not_managed_properties() {
        let options = Options(vec![
            ("fetch.wait.max.ms".into(), "10".into()),
            ("isolation.level".into(), "read_uncommitted".into()),
        ]);
        let config = options.client_config(
            "broker:9092",
            &[("fetch.wait.max.ms", "100"), ("fetch.max.bytes", "8388608")],
            &[("isolation.level", "read_committed")],
        );
        assert_eq!(config.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(config.get("fetch.max.bytes"), Some("8388608"));
        assert_eq!(config.get("isolation.level"), Some("read_committed"));
        assert_eq!(config.get("bootstrap.servers"), Some("broker:9092"));
    }
}
