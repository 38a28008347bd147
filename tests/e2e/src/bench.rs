//! What the benchmarks share: row shapes, paced producing, the local broker reset between
//! phases, medians and percentiles.

use crate::orders;
use crate::{brokers, local_broker, script, Producer_};
use postgres::Client;
use std::time::{Duration, Instant};

/// Autovacuum would start on a freshly loaded table in the middle of a timed phase (a worker
/// reports its writes as it goes, COPY only at its end): off for every table, both sides.
pub const TABLE_OPTIONS: &str = "WITH (autovacuum_enabled = false)";

/// The rows a benchmark moves.
#[derive(Clone, Copy, Debug)]
pub enum Rows {
    /// JSON orders of about 120 bytes, 5 columns (see [`orders`]).
    Orders,
    /// `{"id": n, "body": "..."}` of about this many bytes: a bigint key and a text body.
    Sized(usize),
}

impl Rows {
    pub fn columns(self) -> &'static str {
        match self {
            Rows::Orders => {
                "id bigint PRIMARY KEY, customer text, amount numeric(12,2), created_at timestamptz, payload jsonb"
            }
            Rows::Sized(_) => "id bigint PRIMARY KEY, body text",
        }
    }

    pub fn json(self, id: i64) -> String {
        match self {
            Rows::Orders => orders::order_json(id),
            Rows::Sized(size) => format!(r#"{{"id":{id},"body":"{}"}}"#, body(id, size)),
        }
    }

    pub fn copy_line(self, id: i64, out: &mut Vec<u8>) {
        match self {
            Rows::Orders => orders::order_copy_line(id, out),
            Rows::Sized(size) => {
                use std::io::Write;
                writeln!(out, "{id}\t{}", body(id, size)).unwrap();
            }
        }
    }

    /// The SQL expression of row `i` (a bigint), for `INSERT ... SELECT ... FROM
    /// generate_series(...) i`.
    pub fn select_list(self) -> String {
        match self {
            Rows::Orders => "i, 'customer-' || (i % 1000), (i % 100000) / 100.0, \
                 '2026-11-27 10:00:00+00'::timestamptz + i * interval '1 second', \
                 jsonb_build_object('sku', 'SKU-' || (i % 97), 'qty', i % 5 + 1)"
                .into(),
            Rows::Sized(size) => {
                format!("i, rpad(i::text || '-', {}, 'abcdefghijklmnopqrstuvwxyz')", body_length(size))
            }
        }
    }

    pub fn label(self) -> String {
        match self {
            Rows::Orders => "orders of ~120 bytes, 5 columns".into(),
            Rows::Sized(size) if size >= 1000 => format!("{} KB messages (bigint, text)", size / 1000),
            Rows::Sized(size) => format!("{size} B messages (bigint, text)"),
        }
    }
}

/// The body that makes a sized message about `size` bytes long: varied text, so that no
/// layer compresses it away.
fn body(id: i64, size: usize) -> String {
    let mut body = format!("{id}-");
    let alphabet = b"abcdefghijklmnopqrstuvwxyz";
    let mut i = id as usize;
    while body.len() < body_length(size) {
        body.push(alphabet[i % alphabet.len()] as char);
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    body
}

/// The JSON around the body (`{"id":123456,"body":""}`) takes about 25 bytes.
fn body_length(size: usize) -> usize {
    size.saturating_sub(25).max(1)
}

/// The partition of a 4-partition topic that order `id` goes to: a hash of the id, as a
/// producer's key hash spreads keys, but known to the benchmark, so that its COPY baseline can
/// also load the rows in the order a consumer reads them.
pub fn partition_of(id: i64, partitions: i32) -> i32 {
    let mut x = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) % partitions as u64) as i32
}

/// Calls `send` with the ids 0..count at `rate` per second, starting now, each call with the
/// ids that are due; returns the seconds it took. It looks at the clock every 200 µs, so that
/// the pace holds to the millisecond at any rate.
pub fn paced(count: i64, rate: f64, mut send: impl FnMut(std::ops::Range<i64>)) -> f64 {
    let started = Instant::now();
    let mut next = 0;
    while next < count {
        let due = ((started.elapsed().as_secs_f64() * rate) as i64 + 1).min(count);
        if due > next {
            send(next..due);
            next = due;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    started.elapsed().as_secs_f64()
}

/// The local broker, stopped without saving, emptied and started again, so that a phase does
/// not compete with the previous phases' data: the broker rewrites its whole store every few
/// seconds. Does nothing against a real Kafka cluster.
pub fn empty_broker() {
    if local_broker() {
        script("broker", &["reset"]);
    }
}

/// Produces `ids` as JSON of `rows`, keyed by id, each to the partition [`partition_of`]
/// gives; returns the megabytes of keys and values.
pub fn produce_rows(producer: &Producer_, topic: &str, rows: Rows, partitions: i32, ids: std::ops::Range<i64>) -> f64 {
    let mut bytes = 0;
    for id in ids {
        let (key, value) = (id.to_string(), rows.json(id));
        bytes += key.len() + value.len();
        producer.send(topic, Some(partition_of(id, partitions)), Some(key.as_bytes()), Some(value.as_bytes()));
    }
    producer.flush();
    bytes as f64 / 1e6
}

/// A subscription with the extension's defaults but for `extra` (", workers => 2").
pub fn create_subscription(
    pg: &mut Client,
    bootstrap_servers: &str,
    name: &str,
    topic: &str,
    table: &str,
    extra: &str,
) {
    // The local broker answers a fetch with the whole rest of the topic, whatever the fetch
    // limits: the largest response must fit.
    let options = if bootstrap_servers == brokers() && local_broker() {
        r#", options => '{"receive.message.max.bytes": "2000000000"}'"#
    } else {
        ""
    };
    pg.batch_execute(&format!(
        "SELECT kafka.create_subscription(name => '{name}', brokers => '{bootstrap_servers}', topic => '{topic}', \
         target => '{table}'::regclass{options}{extra})"
    ))
    .unwrap_or_else(|e| panic!("create_subscription {name}: {e}"));
}

/// Messages a subscription applied so far: the sum of its stored offsets, which start at 0
/// on a new topic. Cheap to ask, unlike counting a growing table, which would compete with
/// the worker.
pub fn applied(pg: &mut Client, subscription: &str) -> i64 {
    pg.query_one(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM kafka.offsets WHERE subscription = $1",
        &[&subscription],
    )
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// Polls every 10 ms until the subscription applied `messages`.
pub fn wait_for_offsets(pg: &mut Client, subscription: &str, messages: i64, timeout: Duration) {
    poll_until(&format!("{subscription} to apply {messages} messages"), timeout, || {
        applied(pg, subscription) >= messages
    });
}

/// Polls `condition` every 10 ms (often enough to time a phase of a benchmark) until it holds,
/// or panics naming `what` after `timeout`.
pub fn poll_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Inserts rows `ids` of `rows` into `table` in one statement (one transaction).
pub fn insert(pg: &mut Client, table: &str, rows: Rows, ids: std::ops::Range<i64>) {
    pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT {} FROM generate_series({}, {}) i",
        rows.select_list(),
        ids.start,
        ids.end - 1
    ))
    .unwrap();
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// p50, p99 and the maximum of `values` (milliseconds), nearest rank.
pub fn percentiles(values: &mut [f64]) -> (f64, f64, f64) {
    assert!(!values.is_empty(), "no latencies measured");
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    (rank(0.5), rank(0.99), values[values.len() - 1])
}

/// A comma-separated list of numbers from the environment.
pub fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name} is a list of numbers")))
        .collect()
}

pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number"))).unwrap_or(default)
}
