//! Benchmark of the Kafka-to-PostgreSQL path against its baseline, measured side by side:
//!
//! 1. backlog: N JSON orders (~120 bytes, 5 columns) are produced first. Then, in each of
//!    several rounds, the same rows are loaded with `COPY ... FROM STDIN` into an empty table,
//!    and a subscription (with 1, then 2 workers) ingests the topic into another empty table,
//!    timed from its creation until its stored offsets cover every message. The medians of
//!    the rounds are compared, so that a passing load on the machine does not decide the ratio.
//! 2. streaming: a subscription consumes while N more orders are being produced, to show the
//!    worker's memory while it keeps up with a live stream.
//! 3. bounded memory: 2N orders are produced to a broker that honours fetch size limits
//!    (librdkafka's mock cluster, in this process, over TCP); one worker ingests them while its
//!    memory is sampled. The local broker cannot show this: it answers every fetch with the
//!    whole rest of the topic. The mock keeps at most 5 MB per partition, hence a topic of
//!    many partitions, each below that.
//!
//! Memory is the worker's private resident memory (see `memory`).
//!
//!   pgkb-bench [MESSAGES]        (default 1000000)
//!   PGKB_BENCH_ROUNDS (default 3), PGKB_BENCH_WORKERS (default "1,2"), PGKB_BENCH_BATCH_SIZE

use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::orders;
use pg_kafka_bridge_e2e::*;
use rdkafka::mocking::MockCluster;
use std::io::Write;
use std::time::{Duration, Instant};

/// Messages per second produced in the streaming phase.
const STREAM_RATE: f64 = 150_000.0;

/// Autovacuum would start on a freshly loaded table in the middle of a timed phase (the worker
/// reports its writes as it goes, COPY only at its end): off for every table, both sides.
const TABLE_OPTIONS: &str = "WITH (autovacuum_enabled = false)";

/// Orders per partition of the mock cluster's topic: about 2 MB, within what it keeps.
const MOCK_MESSAGES_PER_PARTITION: i64 = 15_000;

const TABLE_COLUMNS: &str =
    "id bigint PRIMARY KEY, customer text, amount numeric(12,2), created_at timestamptz, payload jsonb";

/// One timed ingestion by a subscription.
struct Ingestion {
    secs: f64,
    first_rows_secs: f64,
    peak_private_mb: f64,
    peak_rss_mb: f64,
}

fn main() {
    let messages: i64 = std::env::args().nth(1).map(|s| s.parse().expect("MESSAGES is a number")).unwrap_or(1_000_000);
    let rounds: usize = env_number("PGKB_BENCH_ROUNDS", 3);
    let worker_counts: Vec<i32> = std::env::var("PGKB_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|w| w.trim().parse().expect("PGKB_BENCH_WORKERS is a list of numbers"))
        .collect();
    let mut pg = pg();
    let topic = unique("bench");
    create_topic(&topic, 4);
    println!("producing {messages} orders to {topic} (4 partitions)...");
    produce_orders(&producer(), &topic, messages, None);
    println!("letting the broker settle");
    std::thread::sleep(Duration::from_secs(15));

    // The local broker answers a fetch with the whole rest of the topic, whatever the fetch
    // limits: the largest response must fit.
    let options = if local_broker() { r#"{"receive.message.max.bytes": "2000000000"}"# } else { "{}" };
    let mut copy_secs = Vec::new();
    let mut ingestions: Vec<Vec<Ingestion>> = worker_counts.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        copy_secs.push(copy_load(&mut pg, messages));
        for (i, &workers) in worker_counts.iter().enumerate() {
            let extra = format!(", workers => {workers}, options => '{options}'{}", batch_size_argument());
            ingestions[i].push(ingest(&mut pg, &brokers(), &topic, messages, &extra));
        }
        let subs: Vec<String> = ingestions.iter().map(|r| format!("{:.2} s", r[round - 1].secs)).collect();
        println!("round {round}: COPY {:.2} s, subscription {}", copy_secs[round - 1], subs.join(" / "));
    }

    // Streaming: the worker consumes while the producer writes.
    let stream_topic = unique("bench_stream");
    create_topic(&stream_topic, 4);
    let stream_table = create_table(&mut pg, "bench_stream");
    let stream_sub = unique("bench_stream");
    create_subscription(&mut pg, &stream_sub, &stream_topic, &stream_table, &batch_size_argument());
    wait_for("the streaming worker", Duration::from_secs(30), || !worker_pids(&mut pg, &stream_sub).is_empty());
    let sampler = MemorySampler::start(subscription_workers(&stream_sub));
    let started = Instant::now();
    // Paced below what the worker sustains, so that memory reflects a worker keeping up with
    // a stream rather than the broker's whole-backlog answers.
    produce_orders(&producer(), &stream_topic, messages, Some(STREAM_RATE));
    wait_for_offsets(&mut pg, &stream_sub, messages, Duration::from_secs(600));
    let stream_secs = started.elapsed().as_secs_f64();
    let stream_memory = sampler.stop();
    drop_subscription(&mut pg, &stream_sub);
    pg.batch_execute(&format!("DROP TABLE {stream_table}")).unwrap();

    // Bounded memory, from a broker that honours fetch limits.
    let mock_messages = 2 * messages;
    let mock = MockCluster::new(1).expect("mock cluster");
    let mock_topic = unique("bench_mock");
    let mock_partitions = (mock_messages / MOCK_MESSAGES_PER_PARTITION).max(1) as i32;
    mock.create_topic(&mock_topic, mock_partitions, 1).expect("mock topic");
    println!("producing {mock_messages} orders to the mock cluster ({mock_partitions} partitions)...");
    let backlog_mb = produce_orders(&producer_at(&mock.bootstrap_servers()), &mock_topic, mock_messages, None);
    let mock_ingestion = ingest(&mut pg, &mock.bootstrap_servers(), &mock_topic, mock_messages, &batch_size_argument());

    let rate = |secs: f64| messages as f64 / secs;
    let copy = median(&copy_secs);
    println!();
    println!("rows: {messages} JSON orders of ~120 bytes, 5 columns, primary key; medians of {rounds} rounds");
    println!("COPY FROM STDIN (baseline):      {:>9.0} rows/s  ({copy:.2} s)", rate(copy));
    for (runs, workers) in ingestions.iter().zip(&worker_counts) {
        let secs = median(&runs.iter().map(|r| r.secs).collect::<Vec<_>>());
        let first = median(&runs.iter().map(|r| r.first_rows_secs).collect::<Vec<_>>());
        let peak = runs.iter().map(|r| r.peak_private_mb).fold(0.0, f64::max);
        println!("subscription, {workers} worker(s), backlog: {:>9.0} rows/s  ({secs:.2} s)", rate(secs));
        println!(
            "  first rows after {first:.2} s (worker start, first fetch), then {:.0} rows/s; peak {peak:.1} MB private per worker",
            messages as f64 / (secs - first)
        );
        println!("  ratio subscription / COPY:     {:>9.2}", copy / secs);
    }
    println!(
        "subscription, live stream:       {:>9.0} rows/s  (paced producer at {STREAM_RATE:.0}/s, {stream_secs:.2} s)",
        rate(stream_secs)
    );
    println!(
        "worker peak memory, live stream: {:>9.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers touched",
        stream_memory.0, stream_memory.1
    );
    println!(
        "worker peak memory, backlog of {mock_messages} orders ({backlog_mb:.0} MB) on a broker honouring fetch limits \
         (mock cluster): {:.1} MB private, {:.1} MB RSS incl. shared buffers touched ({:.0} rows/s)",
        mock_ingestion.peak_private_mb,
        mock_ingestion.peak_rss_mb,
        mock_messages as f64 / mock_ingestion.secs
    );
    println!("(backlog peaks on the local broker include its whole-backlog fetch responses)");
}

/// Loads the orders with COPY FROM STDIN into a new table; returns the seconds it took.
fn copy_load(pg: &mut postgres::Client, messages: i64) -> f64 {
    let table = create_table(pg, "bench_copy");
    pg.batch_execute("CHECKPOINT").unwrap();
    let started = Instant::now();
    let mut writer = pg.copy_in(&format!("COPY {table} FROM STDIN")).unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    for id in 0..messages {
        orders::order_copy_line(id, &mut buf);
        if buf.len() > (1 << 20) - 512 {
            writer.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    writer.write_all(&buf).unwrap();
    writer.finish().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(count(pg, &format!("SELECT count(*) FROM {table}")), messages);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    secs
}

/// Ingests the topic with a new subscription into a new table, timed from the subscription's
/// creation until its stored offsets (committed with the rows) cover every message.
fn ingest(pg: &mut postgres::Client, bootstrap_servers: &str, topic: &str, messages: i64, extra: &str) -> Ingestion {
    let table = create_table(pg, "bench_sub");
    let sub = unique("bench");
    pg.batch_execute("CHECKPOINT").unwrap();
    let started = Instant::now();
    create_subscription_at(pg, bootstrap_servers, &sub, topic, &table, extra);
    let sampler = MemorySampler::start(subscription_workers(&sub));
    wait_for("the first rows", Duration::from_secs(120), || applied(pg, &sub) > 0);
    let first_rows_secs = started.elapsed().as_secs_f64();
    wait_for_offsets(pg, &sub, messages, Duration::from_secs(600));
    let secs = started.elapsed().as_secs_f64();
    let (peak_private_mb, peak_rss_mb) = sampler.stop();
    assert_eq!(count(pg, &format!("SELECT count(DISTINCT id) FROM {table}")), messages);
    drop_subscription(pg, &sub);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    Ingestion { secs, first_rows_secs, peak_private_mb, peak_rss_mb }
}

fn create_table(pg: &mut postgres::Client, prefix: &str) -> String {
    let table = unique(prefix);
    pg.batch_execute(&format!("CREATE TABLE {table} ({TABLE_COLUMNS}) {TABLE_OPTIONS}")).unwrap();
    table
}

/// Messages applied so far: the sum of the stored offsets, which start at 0 on a new topic.
/// Cheap to ask, unlike counting a growing table, which would compete with the worker.
fn applied(pg: &mut postgres::Client, subscription: &str) -> i64 {
    pg.query_one(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM kafka.offsets WHERE subscription = $1",
        &[&subscription],
    )
    .map(|r| r.get(0))
    .unwrap_or(0)
}

fn wait_for_offsets(pg: &mut postgres::Client, subscription: &str, messages: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while applied(pg, subscription) < messages {
        assert!(Instant::now() < deadline, "timed out waiting for {subscription} to apply {messages} messages");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Produces orders 0..count, keyed by id; at `rate` messages per second if given. Returns the
/// megabytes of keys and values produced.
fn produce_orders(producer: &Producer_, topic: &str, count: i64, rate: Option<f64>) -> f64 {
    let started = Instant::now();
    let mut bytes = 0;
    for id in 0..count {
        let (key, value) = (id.to_string(), orders::order_json(id));
        bytes += key.len() + value.len();
        producer.send(topic, None, Some(key.as_bytes()), Some(value.as_bytes()));
        if let Some(rate) = rate.filter(|_| id % 10_000 == 9_999) {
            let due = Duration::from_secs_f64((id + 1) as f64 / rate);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    producer.flush();
    bytes as f64 / (1 << 20) as f64
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number"))).unwrap_or(default)
}

/// `PGKB_BENCH_BATCH_SIZE` sets the subscriptions' batch size (default: the extension's).
fn batch_size_argument() -> String {
    std::env::var("PGKB_BENCH_BATCH_SIZE").map(|n| format!(", batch_size => {n}")).unwrap_or_default()
}

/// The PIDs of a subscription's workers, for the memory sampler.
fn subscription_workers(subscription: &str) -> impl FnMut(&mut postgres::Client) -> Vec<i32> + Send + 'static {
    let subscription = subscription.to_string();
    move |pg| worker_pids(pg, &subscription)
}
