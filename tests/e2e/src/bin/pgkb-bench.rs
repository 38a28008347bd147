//! Benchmarks of the Kafka-to-PostgreSQL path against `COPY ... FROM STDIN` of the same rows,
//! measured side by side in one run. Subscriptions are created with the extension's default
//! settings (batch size, batch timeout) unless said otherwise.
//!
//! Backlog (the default): N JSON orders (~120 bytes, 5 columns) are produced to a 4-partition
//! topic first, each to the partition a hash of its id gives. Then, in each of several rounds,
//! the rows are loaded with `COPY ... FROM STDIN` into an empty table, in id order (the
//! baseline) and in the topic's order (partition after partition, as a consumer reads them,
//! which costs the primary key index more), and a subscription (1 worker, then 2) ingests the
//! topic into another empty table, timed from its creation until its stored offsets cover
//! every message. Medians of the rounds are compared, so that a passing load on the machine
//! does not decide the ratio. Then the worker's memory on a live stream, and on a backlog
//! served by a broker that honours fetch size limits (librdkafka's mock cluster, in this
//! process, over TCP; the local broker answers every fetch with the whole rest of the topic).
//!
//! `--sizes`: the same comparison (one worker, one round each) for messages of about 100 B,
//! 1 KB and 10 KB (a bigint key and a text body), rows/s and MB/s.
//!
//! `--many`: 8 subscriptions of 1 worker each ingest 8 topics at once (N messages in all),
//! against one COPY of the same N rows; total rows/s and the workers' memory.
//!
//! Memory is a worker's private resident memory (see `memory`).
//!
//!   pgkb-bench [MESSAGES]           (default 1000000)
//!   pgkb-bench --sizes
//!   pgkb-bench --many [MESSAGES]    (default 1000000)
//!   PGKB_BENCH_ROUNDS (default 3), PGKB_BENCH_WORKERS (default "1,2"), PGKB_BENCH_BATCH_SIZE

use pg_kafka_bridge_e2e::bench::{self, Rows, TABLE_OPTIONS};
use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::*;
use rdkafka::mocking::MockCluster;
use std::io::Write;
use std::time::{Duration, Instant};

/// Messages per second produced in the streaming phase.
const STREAM_RATE: f64 = 150_000.0;
const PARTITIONS: i32 = 4;

/// Orders per partition of the mock cluster's topic: about 2 MB, within what it keeps.
const MOCK_MESSAGES_PER_PARTITION: i64 = 15_000;

/// One timed ingestion by a subscription.
struct Ingestion {
    secs: f64,
    worker_started_secs: f64,
    first_rows_secs: f64,
    peak_private_mb: f64,
    peak_rss_mb: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |arg: Option<&String>| arg.map(|s| s.parse().expect("MESSAGES is a number")).unwrap_or(1_000_000);
    match args.first().map(String::as_str) {
        Some("--sizes") => sizes(),
        Some("--many") => many(number(args.get(1))),
        _ => backlog(number(args.first())),
    }
}

fn backlog(messages: i64) {
    let rounds = bench::env_number("PGKB_BENCH_ROUNDS", 3);
    let worker_counts: Vec<i32> = bench::env_list("PGKB_BENCH_WORKERS", "1,2");
    let mut pg = pg();
    let topic = unique("bench");
    create_topic(&topic, PARTITIONS);
    println!("producing {messages} orders to {topic} ({PARTITIONS} partitions)...");
    bench::produce_rows(&producer(), &topic, Rows::Orders, PARTITIONS, 0..messages);
    println!("letting the broker settle");
    std::thread::sleep(Duration::from_secs(15));

    let id_order: Vec<i64> = (0..messages).collect();
    let topic_order = topic_order(messages);
    let (mut copy_secs, mut copy_topic_order_secs) = (Vec::new(), Vec::new());
    let mut ingestions: Vec<Vec<Ingestion>> = worker_counts.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        copy_secs.push(copy_load(&mut pg, Rows::Orders, &id_order));
        copy_topic_order_secs.push(copy_load(&mut pg, Rows::Orders, &topic_order));
        for (i, &workers) in worker_counts.iter().enumerate() {
            let extra = format!(", workers => {workers}{}", batch_size_argument());
            ingestions[i].push(ingest(&mut pg, &brokers(), &topic, Rows::Orders, messages, &extra));
        }
        let subs: Vec<String> = ingestions.iter().map(|r| format!("{:.2} s", r[round - 1].secs)).collect();
        println!(
            "round {round}: COPY {:.2} s (topic order {:.2} s), subscription {}",
            copy_secs[round - 1],
            copy_topic_order_secs[round - 1],
            subs.join(" / ")
        );
    }
    let (stream_secs, stream_memory) = live_stream(&mut pg, messages);
    let mock = mock_backlog(&mut pg, 2 * messages);

    let rate = |secs: f64| messages as f64 / secs;
    let copy = bench::median(&copy_secs);
    let copy_topic_order = bench::median(&copy_topic_order_secs);
    println!();
    println!("rows: {messages} JSON orders of ~120 bytes, 5 columns, primary key; medians of {rounds} rounds");
    println!("COPY FROM STDIN, id order (baseline): {:>9.0} rows/s  ({copy:.2} s)", rate(copy));
    println!(
        "COPY FROM STDIN, the topic's order:   {:>9.0} rows/s  ({copy_topic_order:.2} s, {:.2} of the baseline)",
        rate(copy_topic_order),
        copy / copy_topic_order
    );
    for (runs, workers) in ingestions.iter().zip(&worker_counts) {
        let secs = bench::median(&runs.iter().map(|r| r.secs).collect::<Vec<_>>());
        let started = bench::median(&runs.iter().map(|r| r.worker_started_secs).collect::<Vec<_>>());
        let first = bench::median(&runs.iter().map(|r| r.first_rows_secs).collect::<Vec<_>>());
        let peak = runs.iter().map(|r| r.peak_private_mb).fold(0.0, f64::max);
        println!("subscription, {workers} worker(s), end to end: {:>9.0} rows/s  ({secs:.2} s)", rate(secs));
        println!("  ratio to COPY (id order):           {:>9.2}", copy / secs);
        println!("  ratio to COPY (the topic's order):  {:>9.2}", copy_topic_order / secs);
        println!(
            "  worker running after {started:.2} s, first rows committed after {first:.2} s, then {:.0} rows/s; \
             peak {peak:.1} MB private per worker",
            messages as f64 / (secs - first)
        );
    }
    println!(
        "subscription, live stream:            {:>9.0} rows/s  (paced producer at {STREAM_RATE:.0}/s, {stream_secs:.2} s)",
        rate(stream_secs)
    );
    println!(
        "worker peak memory, live stream: {:.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers touched",
        stream_memory.0, stream_memory.1
    );
    println!(
        "worker peak memory, backlog of {} orders ({:.0} MB) on a broker honouring fetch limits (mock cluster): \
         {:.1} MB private, {:.1} MB RSS incl. shared buffers touched ({:.0} rows/s)",
        2 * messages,
        mock.1,
        mock.0.peak_private_mb,
        mock.0.peak_rss_mb,
        (2 * messages) as f64 / mock.0.secs
    );
    println!("(backlog peaks on the local broker include its whole-backlog fetch responses)");
}

/// The ids in the order a consumer of the topic reads them from the local broker, which
/// answers with every partition's whole backlog: partition after partition.
fn topic_order(messages: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = (0..messages).collect();
    ids.sort_by_key(|&id| (bench::partition_of(id, PARTITIONS), id));
    ids
}

/// A subscription consumes while the producer writes: the worker's memory while it keeps up.
fn live_stream(pg: &mut postgres::Client, messages: i64) -> (f64, (f64, f64)) {
    let topic = unique("bench_stream");
    create_topic(&topic, PARTITIONS);
    let table = create_table(pg, "bench_stream", Rows::Orders);
    let sub = unique("bench_stream");
    bench::create_subscription(pg, &brokers(), &sub, &topic, &table, &batch_size_argument());
    wait_for("the streaming worker", Duration::from_secs(30), || !worker_pids(pg, &sub).is_empty());
    let sampler = MemorySampler::start(subscription_workers(&sub));
    let producer = producer();
    // Paced below what the worker sustains, so that memory reflects a worker keeping up with
    // a stream rather than the broker's whole-backlog answers.
    let secs = bench::paced(messages, STREAM_RATE, |ids| {
        for id in ids {
            let (key, value) = (id.to_string(), Rows::Orders.json(id));
            producer.send(
                &topic,
                Some(bench::partition_of(id, PARTITIONS)),
                Some(key.as_bytes()),
                Some(value.as_bytes()),
            );
        }
    });
    producer.flush();
    let started = Instant::now() - Duration::from_secs_f64(secs);
    bench::wait_for_offsets(pg, &sub, messages, Duration::from_secs(600));
    let stream_secs = started.elapsed().as_secs_f64();
    let memory = sampler.stop();
    drop_subscription(pg, &sub);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    (stream_secs, memory)
}

/// One worker ingests `messages` orders from the mock cluster, which honours fetch limits;
/// returns the ingestion and the megabytes produced.
fn mock_backlog(pg: &mut postgres::Client, messages: i64) -> (Ingestion, f64) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("bench_mock");
    let partitions = (messages / MOCK_MESSAGES_PER_PARTITION).max(1) as i32;
    mock.create_topic(&topic, partitions, 1).expect("mock topic");
    println!("producing {messages} orders to the mock cluster ({partitions} partitions)...");
    let backlog_mb =
        bench::produce_rows(&producer_at(&mock.bootstrap_servers()), &topic, Rows::Orders, partitions, 0..messages);
    let ingestion = ingest(pg, &mock.bootstrap_servers(), &topic, Rows::Orders, messages, &batch_size_argument());
    (ingestion, backlog_mb)
}

fn sizes() {
    let mut pg = pg();
    println!("message size | COPY rows/s | COPY MB/s | subscription rows/s | subscription MB/s | ratio | worker peak");
    let mut lines = Vec::new();
    for (size, messages) in [(100usize, 1_000_000i64), (1_000, 200_000), (10_000, 20_000)] {
        // Each size on an empty broker: the local one rewrites its whole store every few
        // seconds, which would compete with the measured work.
        bench::empty_broker();
        let rows = Rows::Sized(size);
        let topic = unique("bench_size");
        create_topic(&topic, PARTITIONS);
        let mb = bench::produce_rows(&producer(), &topic, rows, PARTITIONS, 0..messages);
        std::thread::sleep(Duration::from_secs(10));
        let ids: Vec<i64> = (0..messages).collect();
        let copy = copy_load(&mut pg, rows, &ids);
        let sub = ingest(&mut pg, &brokers(), &topic, rows, messages, &batch_size_argument());
        let line = format!(
            "{} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} MB",
            rows.label(),
            messages as f64 / copy,
            mb / copy,
            messages as f64 / sub.secs,
            mb / sub.secs,
            copy / sub.secs,
            sub.peak_private_mb
        );
        println!("{line}");
        lines.push(line);
    }
    println!();
    println!("one worker, default settings, {PARTITIONS}-partition topics; MB/s counts keys and values");
    for line in lines {
        println!("{line}");
    }
}

fn many(messages: i64) {
    const SUBSCRIPTIONS: i64 = 8;
    let mut pg = pg();
    let per_topic = messages / SUBSCRIPTIONS;
    let producer = producer();
    let mut topics = Vec::new();
    println!("producing {per_topic} orders to each of {SUBSCRIPTIONS} topics (1 partition each)...");
    for i in 0..SUBSCRIPTIONS {
        let topic = unique("bench_many");
        create_topic(&topic, 1);
        bench::produce_rows(&producer, &topic, Rows::Orders, 1, i * per_topic..(i + 1) * per_topic);
        topics.push(topic);
    }
    std::thread::sleep(Duration::from_secs(15));
    let ids: Vec<i64> = (0..per_topic * SUBSCRIPTIONS).collect();
    let copy = copy_load(&mut pg, Rows::Orders, &ids);

    let tables: Vec<String> = topics.iter().map(|_| create_table(&mut pg, "bench_many", Rows::Orders)).collect();
    let subs: Vec<String> = topics.iter().map(|_| unique("bench_many")).collect();
    pg.batch_execute("CHECKPOINT").unwrap();
    let started = Instant::now();
    for ((topic, table), sub) in topics.iter().zip(&tables).zip(&subs) {
        bench::create_subscription(&mut pg, &brokers(), sub, topic, table, &batch_size_argument());
    }
    let sampler = MemorySampler::start({
        let subs = subs.clone();
        move |pg| subs.iter().flat_map(|s| worker_pids(pg, s)).collect()
    });
    for sub in &subs {
        bench::wait_for_offsets(&mut pg, sub, per_topic, Duration::from_secs(900));
    }
    let secs = started.elapsed().as_secs_f64();
    let (peak_one, _, peak_all) = sampler.stop_with_sum();
    for (table, sub) in tables.iter().zip(&subs) {
        assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT id) FROM {table}")), per_topic);
        drop_subscription(&mut pg, sub);
        pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    }
    let total = per_topic * SUBSCRIPTIONS;
    println!();
    println!("rows: {total} JSON orders, {per_topic} on each of {SUBSCRIPTIONS} topics");
    println!("COPY FROM STDIN of all {total} rows into one table: {:>9.0} rows/s  ({copy:.2} s)", total as f64 / copy);
    println!(
        "{SUBSCRIPTIONS} subscriptions of 1 worker at once, in all:   {:>9.0} rows/s  ({secs:.2} s, {:.2} of COPY)",
        total as f64 / secs,
        copy / secs
    );
    println!("workers' peak memory: {peak_one:.1} MB private for the largest, {peak_all:.1} MB for all {SUBSCRIPTIONS} together");
}

/// Loads `ids` of `rows` with COPY FROM STDIN, in that order, into a new table; returns the
/// seconds it took.
fn copy_load(pg: &mut postgres::Client, rows: Rows, ids: &[i64]) -> f64 {
    let table = create_table(pg, "bench_copy", rows);
    pg.batch_execute("CHECKPOINT").unwrap();
    let started = Instant::now();
    let mut writer = pg.copy_in(&format!("COPY {table} FROM STDIN")).unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    for &id in ids {
        rows.copy_line(id, &mut buf);
        if buf.len() > (1 << 20) - 16_384 {
            writer.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    writer.write_all(&buf).unwrap();
    writer.finish().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(count(pg, &format!("SELECT count(*) FROM {table}")), ids.len() as i64);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    secs
}

/// Ingests the topic with a new subscription into a new table, timed from the subscription's
/// creation until its stored offsets (committed with the rows) cover every message.
fn ingest(
    pg: &mut postgres::Client,
    bootstrap_servers: &str,
    topic: &str,
    rows: Rows,
    messages: i64,
    extra: &str,
) -> Ingestion {
    let table = create_table(pg, "bench_sub", rows);
    let sub = unique("bench");
    pg.batch_execute("CHECKPOINT").unwrap();
    let started = Instant::now();
    bench::create_subscription(pg, bootstrap_servers, &sub, topic, &table, extra);
    let sampler = MemorySampler::start(subscription_workers(&sub));
    bench::poll_until("the worker", Duration::from_secs(120), || !worker_pids(pg, &sub).is_empty());
    let worker_started_secs = started.elapsed().as_secs_f64();
    bench::poll_until("the first rows", Duration::from_secs(120), || bench::applied(pg, &sub) > 0);
    let first_rows_secs = started.elapsed().as_secs_f64();
    bench::wait_for_offsets(pg, &sub, messages, Duration::from_secs(600));
    let secs = started.elapsed().as_secs_f64();
    let (peak_private_mb, peak_rss_mb) = sampler.stop();
    assert_eq!(count(pg, &format!("SELECT count(DISTINCT id) FROM {table}")), messages);
    drop_subscription(pg, &sub);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    Ingestion { secs, worker_started_secs, first_rows_secs, peak_private_mb, peak_rss_mb }
}

fn create_table(pg: &mut postgres::Client, prefix: &str, rows: Rows) -> String {
    let table = unique(prefix);
    pg.batch_execute(&format!("CREATE TABLE {table} ({}) {TABLE_OPTIONS}", rows.columns())).unwrap();
    table
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
