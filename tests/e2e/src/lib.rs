//! Harness of the end-to-end tests: a PostgreSQL cluster with the extension installed and
//! a Kafka-protocol broker, both reached over TCP at the addresses in the environment
//! (`PGHOST`, `PGPORT`, `KAFKA_BROKERS`; `scripts/env.sh` sets the defaults). The cluster is
//! controlled through `scripts/cluster.sh`, the local broker through `scripts/broker.sh`.

pub mod bench;
pub mod memory;
pub mod orders;
pub mod workload;

use postgres::{Client, NoTls};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// Whether the broker is the local one that `scripts/broker.sh` controls.
pub fn local_broker() -> bool {
    std::env::var("PGKB_LOCAL_BROKER").is_ok_and(|local| local == brokers())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

pub fn connection_string() -> String {
    format!(
        "host={} port={} user={} dbname={}",
        env_or("PGHOST", "127.0.0.1"),
        env_or("PGPORT", "5499"),
        env_or("PGUSER", "postgres"),
        env_or("PGDATABASE", "postgres")
    )
}

/// A connection to the test cluster, waiting for it to accept connections (it may be
/// restarting after a crash) and making sure the extension exists.
pub fn pg() -> Client {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match Client::connect(&connection_string(), NoTls) {
            Ok(mut client) => match client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_kafka_bridge") {
                Ok(()) => return client,
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot create the extension: {e}")
                }
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => panic!("cannot connect to PostgreSQL: {e}"),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one of the repository's scripts (`scripts/NAME.sh`) with arguments.
pub fn script(name: &str, args: &[&str]) {
    let path = repo_root().join("scripts").join(format!("{name}.sh"));
    let status = Command::new("bash").arg(&path).args(args).status().expect("run script");
    assert!(status.success(), "{} {:?} failed: {status}", path.display(), args);
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A name no other test run uses: for topics, tables and subscriptions.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn create_topic(name: &str, partitions: i32) {
    create_topic_of(name, partitions, &[]);
}

/// A topic of one partition with topic-level settings (`max.message.bytes`, ...).
pub fn create_topic_with(name: &str, settings: &[(&str, &str)]) {
    create_topic_of(name, 1, settings);
}

fn create_topic_of(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in settings {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = block_on(admin.create_topics([&topic], &options)).expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    wait_for(&format!("topic {name} with {partitions} partitions"), Duration::from_secs(30), || {
        partition_count(name) == partitions
    });
}

pub fn partition_count(topic: &str) -> i32 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()
        .and_then(|m| m.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len() as i32))
        .unwrap_or(0)
}

/// Runs a future to completion on the current thread (the admin client's futures need no
/// runtime of their own).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
    fn raw() -> RawWaker {
        RawWaker::new(std::ptr::null(), &VTABLE)
    }
    static VTABLE: RawWakerVTable = RawWakerVTable::new(|_| raw(), |_| {}, |_| {}, |_| {});
    let waker = unsafe { Waker::from_raw(raw()) };
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An idempotent producer: messages are written once each, in order per partition.
pub struct Producer_ {
    inner: ThreadedProducer<DefaultProducerContext>,
}

pub fn producer() -> Producer_ {
    producer_at(&brokers())
}

/// A producer to the brokers at `bootstrap_servers` rather than those of `KAFKA_BROKERS`.
pub fn producer_at(bootstrap_servers: &str) -> Producer_ {
    producer_with(bootstrap_servers, &[])
}

/// [`producer_at`] with settings of its own (`linger.ms`, ...).
pub fn producer_with(bootstrap_servers: &str, settings: &[(&str, &str)]) -> Producer_ {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    Producer_ { inner: config.create().expect("producer") }
}

impl Producer_ {
    pub fn send(&self, topic: &str, partition: Option<i32>, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut record: BaseRecord<[u8], [u8]> = BaseRecord::to(topic);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = payload {
            record = record.payload(v);
        }
        let mut record = record;
        loop {
            match self.inner.send(record) {
                Ok(()) => return,
                Err((e, r)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("produce to {topic}: {e}"),
            }
        }
    }

    pub fn send_json(&self, topic: &str, partition: Option<i32>, key: &str, value: &serde_json::Value) {
        self.send(topic, partition, Some(key.as_bytes()), Some(value.to_string().as_bytes()));
    }

    pub fn flush(&self) {
        self.inner.flush(Duration::from_secs(60)).expect("flush producer");
    }
}

/// Polls `condition` until it holds, or panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).map(|r| r.get::<_, i64>(0)).unwrap_or(-1)
}

/// Waits until `sql` (a count) returns `expected`, reconnecting as needed; panics with the
/// last value on timeout.
pub fn wait_for_count(sql: &str, expected: i64, timeout: Duration) {
    let mut last = -1;
    let mut client = pg();
    let deadline = Instant::now() + timeout;
    loop {
        last = match client.query_one(sql, &[]) {
            Ok(r) => r.get::<_, i64>(0),
            Err(_) => {
                client = pg();
                last
            }
        };
        if last == expected {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: `{sql}` is {last}, expected {expected}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PIDs of the running workers of a subscription.
pub fn worker_pids(client: &mut Client, subscription: &str) -> Vec<i32> {
    let rows = client
        .query(
            "SELECT DISTINCT pid FROM kafka.subscription_status WHERE subscription = $1 AND pid IS NOT NULL",
            &[&subscription],
        )
        .unwrap_or_default();
    rows.iter().map(|r| r.get::<_, i32>(0)).collect()
}

/// A message read back: partition, offset, key, value.
pub type Consumed = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Every message of a topic, read with read_committed isolation from the beginning.
pub fn consume_all(topic: &str, expected_at_least: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("topic.metadata.refresh.interval.ms", "1000")
        // The local broker answers a fetch with the whole rest of the topic.
        .set("receive.message.max.bytes", "2000000000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push((m.partition(), m.offset(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
                quiet_since = Instant::now();
            }
            // A topic that the code under test creates may not exist yet.
            Some(Err(e))
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(Err(e)) => panic!("consuming {topic}: {e}"),
            None if out.len() >= expected_at_least && quiet_since.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    out
}

/// A new topic of `partitions` partitions and a new table of `columns`, under names no other
/// test uses; returns them with a fresh subscription name.
pub fn topic_and_table(pg: &mut Client, prefix: &str, partitions: i32, columns: &str) -> (String, String, String) {
    let (topic, table) = (unique(prefix), unique(prefix));
    create_topic(&topic, partitions);
    pg.batch_execute(&format!("CREATE TABLE {table} ({columns})")).unwrap();
    (topic, table, unique("sub"))
}

/// Creates a subscription `name` from `topic` into `table`; `extra` adds named arguments
/// (", format => 'text'").
pub fn create_subscription(client: &mut Client, name: &str, topic: &str, table: &str, extra: &str) {
    create_subscription_at(client, &brokers(), name, topic, table, extra)
}

/// [`create_subscription`] of a topic on the brokers at `bootstrap_servers`.
pub fn create_subscription_at(
    client: &mut Client,
    bootstrap_servers: &str,
    name: &str,
    topic: &str,
    table: &str,
    extra: &str,
) {
    client
        .batch_execute(&format!(
            "SELECT kafka.create_subscription(name => '{name}', brokers => '{bootstrap_servers}', topic => '{topic}', \
             target => '{table}'::regclass, batch_timeout_ms => 20{extra})"
        ))
        .unwrap_or_else(|e| panic!("create_subscription {name}: {e}"));
}

/// Drops a subscription and waits until its workers are gone.
pub fn drop_subscription(client: &mut Client, name: &str) {
    client.batch_execute(&format!("SELECT kafka.drop_subscription('{name}')")).unwrap();
    wait_for("workers of a dropped subscription to exit", Duration::from_secs(30), || {
        count(
            client,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_kafka_bridge subscription' AND application_name = '{name}'"),
        ) == 0
    });
}

/// The subscription's status rows as text, for assertion messages.
pub fn status(client: &mut Client, subscription: &str) -> String {
    client
        .query(
            "SELECT coalesce(worker::text, '-'), coalesce(pid::text, '-'), state, coalesce(partition::text, '-'), \
                    coalesce(next_offset::text, '-'), coalesce(last_error, '') \
               FROM kafka.subscription_status WHERE subscription = $1",
            &[&subscription],
        )
        .map(|rows| {
            rows.iter()
                .map(|r| (0..6).map(|i| r.get::<_, String>(i)).collect::<Vec<_>>().join(" | "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| e.to_string())
}

/// The last error a subscription's workers report, if any.
pub fn last_error(client: &mut Client, subscription: &str) -> Option<String> {
    client
        .query_one("SELECT max(last_error) FROM kafka.subscription_status WHERE subscription = $1", &[&subscription])
        .ok()
        .and_then(|r| r.get::<_, Option<String>>(0))
}

/// Grows a topic to `total` partitions.
pub fn add_partitions(topic: &str, total: usize) {
    use rdkafka::admin::NewPartitions;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        block_on(admin.create_partitions([&NewPartitions::new(topic, total)], &options)).expect("create partitions");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("adding partitions to {t}: {e}"));
    }
    wait_for(&format!("topic {topic} with {total} partitions"), Duration::from_secs(30), || {
        partition_count(topic) == total as i32
    });
}

/// Offsets committed to the broker by consumer group `group` for partitions `0..partitions`
/// of `topic` (-1 where none).
pub fn group_offsets(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
    (0..partitions)
        .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// How much a crash test does: messages or changes to write, and crashes.
pub struct CrashPlan {
    pub volume: i64,
    pub kills: usize,
    pub server_stops: usize,
}

impl CrashPlan {
    /// The bounded plan for CI, or with `PGKB_SOAK=1` the long one: 1,000,000, 50 kills of a
    /// worker, 5 immediate stops of the server.
    pub fn new(bounded_volume: i64) -> CrashPlan {
        if std::env::var("PGKB_SOAK").is_ok_and(|v| v == "1") {
            CrashPlan { volume: 1_000_000, kills: 50, server_stops: 5 }
        } else {
            CrashPlan { volume: bounded_volume, kills: 10, server_stops: 2 }
        }
    }
}

/// A small deterministic generator, seeded from the clock and printed so that a failing run
/// can be replayed with PGKB_SEED.
pub struct Rng(u64);

impl Rng {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Rng {
        let seed = std::env::var("PGKB_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        println!("PGKB_SEED={seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Creates a publication `name` of `tables`; `extra` adds named arguments (", topic => 'x'").
pub fn create_publication(client: &mut Client, name: &str, tables: &[&str], extra: &str) {
    let tables = tables.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&format!(
            "SELECT kafka.create_publication(name => '{name}', brokers => '{}', \
             tables => ARRAY[{tables}]::regclass[]{extra})",
            brokers()
        ))
        .unwrap_or_else(|e| panic!("create_publication {name}: {e}"));
}

/// PIDs of the running workers of publication `name`, from pg_stat_activity.
pub fn publication_worker_pids(client: &mut Client, name: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_kafka_bridge publication' \
             AND application_name = $1",
            &[&name],
        )
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

/// Stops a publication and waits until its worker is gone.
pub fn stop_publication(client: &mut Client, name: &str) {
    client.batch_execute(&format!("SELECT kafka.stop_publication('{name}')")).unwrap();
    wait_for("the publication's worker to stop", Duration::from_secs(60), || {
        publication_worker_pids(client, name).is_empty()
    });
}

/// The replication slot of publication `name`.
pub fn slot_of(client: &mut Client, name: &str) -> String {
    client
        .query_one("SELECT slot_name::text FROM kafka.publications WHERE name = $1", &[&name])
        .unwrap_or_else(|e| panic!("slot of publication {name}: {e}"))
        .get(0)
}

/// Drops a publication; its worker and, once the drop committed, its slot must go.
pub fn drop_publication(client: &mut Client, name: &str) {
    let slot = slot_of(client, name);
    client.batch_execute(&format!("SELECT kafka.drop_publication('{name}')")).unwrap();
    wait_for("the slot of a dropped publication to go", Duration::from_secs(30), || {
        count(client, &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")) == 0
    });
    wait_for("the worker of a dropped publication to exit", Duration::from_secs(30), || {
        publication_worker_pids(client, name).is_empty()
    });
}

/// A publication's status row as text, for assertion messages.
pub fn publication_status(client: &mut Client, name: &str) -> String {
    client
        .query_one(
            "SELECT concat_ws(' | ', pid, state, confirmed_lsn, published_lsn, published_seq, retained_wal_bytes, \
                    events_total, last_error) FROM kafka.publication_status WHERE publication = $1",
            &[&name],
        )
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .unwrap_or_else(|e| e.to_string())
}

/// The last error a publication's status shows, if any.
pub fn publication_error(client: &mut Client, name: &str) -> Option<String> {
    client
        .query_one("SELECT last_error FROM kafka.publication_status WHERE publication = $1", &[&name])
        .ok()
        .and_then(|r| r.get::<_, Option<String>>(0))
}

/// A change event or message read back from Kafka: key and value parsed as JSON where they
/// are JSON (change events always are).
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Option<serde_json::Value>,
    pub value: Option<serde_json::Value>,
    pub raw_value: Option<Vec<u8>>,
}

impl Event {
    pub fn op(&self) -> &str {
        self.value.as_ref().and_then(|v| v["op"].as_str()).unwrap_or("")
    }

    pub fn after(&self) -> &serde_json::Value {
        self.value.as_ref().map_or(&serde_json::Value::Null, |v| &v["after"])
    }

    /// The event's position (commit LSN, index in its transaction).
    pub fn position(&self) -> (u64, i64) {
        let source = &self.value.as_ref().expect("a change event")["source"];
        (source["lsn"].as_u64().unwrap(), source["seq"].as_i64().unwrap())
    }
}

/// Every committed message of a single-partition topic, in order, as events.
pub fn consume_events(topic: &str, expected_at_least: usize, timeout: Duration) -> Vec<Event> {
    let parse = |b: &Option<Vec<u8>>| b.as_ref().and_then(|b| serde_json::from_slice(b).ok());
    let mut messages = consume_all(topic, expected_at_least, timeout);
    messages.sort_by_key(|m| (m.0, m.1));
    messages.iter().map(|m| Event { key: parse(&m.2), value: parse(&m.3), raw_value: m.3.clone() }).collect()
}

/// How often each row id (`after.id` of the change events) was published to a
/// single-partition topic, read back by kcat ([`read_events_with_kcat`]).
pub fn published_ids(topic: &str, expected: usize, timeout: Duration) -> std::collections::BTreeMap<i64, usize> {
    let mut ids = std::collections::BTreeMap::new();
    for event in read_events_with_kcat(topic, expected, timeout) {
        *ids.entry(event.after()["id"].as_i64().unwrap()).or_insert(0) += 1;
    }
    ids
}

/// Every committed message of a single-partition topic, in order, read by `kcat` (Debian's
/// build of an older librdkafka): an independent read_committed consumer. The local broker
/// lists aborted transactions in a way that makes librdkafka 2.12's consumer stop short on a
/// topic with many of them; kcat reads such topics to the end. Keys and values must be text
/// without newlines (change events are). Waits until at least `expected` messages are there,
/// then reads once more to catch any beyond.
pub fn read_events_with_kcat(topic: &str, expected: usize, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = read_events_once(topic);
        if events.len() >= expected || Instant::now() > deadline {
            std::thread::sleep(Duration::from_secs(3));
            return read_events_once(topic);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Every committed message of a single-partition topic at this moment, read once by kcat
/// (see [`read_events_with_kcat`]).
pub fn read_events_once(topic: &str) -> Vec<Event> {
    let output = Command::new("kcat")
        .args(["-C", "-b", &brokers(), "-t", topic, "-p", "0", "-o", "beginning", "-e", "-q"])
        // The local broker answers a fetch with the whole rest of the topic.
        .args(["-X", "isolation.level=read_committed", "-X", "receive.message.max.bytes=2000000000"])
        .args(["-f", "%k\t%s\n"])
        .output()
        .expect("run kcat");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('\t').unwrap_or((line, ""));
            Event {
                key: serde_json::from_str(key).ok(),
                value: serde_json::from_str(value).ok(),
                raw_value: Some(value.as_bytes().to_vec()),
            }
        })
        .collect()
}
