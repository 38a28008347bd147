//! Benchmark of the Kafka-to-PostgreSQL path against its baseline, measured side by side:
//!
//! 1. backlog: N JSON orders (~120 bytes, 5 columns) are produced first; a subscription then
//!    ingests them into an empty table, timed from its creation to the last row. In the same
//!    run the same rows are loaded with `COPY ... FROM STDIN` into an identical empty table.
//! 2. streaming: a second subscription consumes while N more orders are being produced, to
//!    show the worker's memory while it keeps up with a live stream.
//!
//! Memory is the worker's private resident memory (see `memory`).
//!
//!   pgkb-bench [MESSAGES]        (default 1000000)

use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::orders;
use pg_kafka_bridge_e2e::*;
use std::io::Write;
use std::time::{Duration, Instant};

/// Messages per second produced in the streaming phase.
const STREAM_RATE: f64 = 150_000.0;

/// Autovacuum would start on a freshly loaded table in the middle of a timed phase (the worker
/// reports its writes as it goes, COPY only at its end): off for every table, both sides.
const TABLE_OPTIONS: &str = "WITH (autovacuum_enabled = false)";

const TABLE_COLUMNS: &str =
    "id bigint PRIMARY KEY, customer text, amount numeric(12,2), created_at timestamptz, payload jsonb";

fn main() {
    let messages: i64 = std::env::args().nth(1).map(|s| s.parse().expect("MESSAGES is a number")).unwrap_or(1_000_000);
    let mut pg = pg();
    let topic = unique("bench");
    create_topic(&topic, 4);
    println!("producing {messages} orders to {topic} (4 partitions)...");
    let started = Instant::now();
    let p = producer();
    for id in 0..messages {
        p.send(&topic, None, Some(id.to_string().as_bytes()), Some(orders::order_json(id).as_bytes()));
    }
    p.flush();
    println!("  produced in {:.1} s; letting the broker settle", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(15));

    // Baseline: COPY FROM STDIN of the same rows into an identical empty table.
    let copy_table = unique("bench_copy");
    pg.batch_execute(&format!("CREATE TABLE {copy_table} ({TABLE_COLUMNS}) {TABLE_OPTIONS}; CHECKPOINT")).unwrap();
    let started = Instant::now();
    let mut writer = pg.copy_in(&format!("COPY {copy_table} FROM STDIN")).unwrap();
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
    let copy_secs = started.elapsed().as_secs_f64();
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {copy_table}")), messages);
    pg.batch_execute("CHECKPOINT").unwrap();

    // The subscription, from the backlog.
    let table = unique("bench_sub");
    let sub = unique("bench");
    pg.batch_execute(&format!("CREATE TABLE {table} ({TABLE_COLUMNS}) {TABLE_OPTIONS}")).unwrap();
    // The local broker answers a fetch with the whole rest of the topic, whatever the fetch
    // limits: the largest response must fit.
    let options = if local_broker() { r#"{"receive.message.max.bytes": "2000000000"}"# } else { "{}" };
    let started = Instant::now();
    create_subscription(&mut pg, &sub, &topic, &table, &format!(", options => '{options}'{}", batch_size_argument()));
    let sampler = MemorySampler::start(subscription_workers(&sub));
    let non_empty = format!("SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1) t");
    wait_for("the first row", Duration::from_secs(120), || count(&mut pg, &non_empty) > 0);
    let first_row_secs = started.elapsed().as_secs_f64();
    let rows_at_first = count(&mut pg, &format!("SELECT count(*) FROM {table}"));
    wait_for_count(&format!("SELECT count(*) FROM {table}"), messages, Duration::from_secs(600));
    let sub_secs = started.elapsed().as_secs_f64();
    let backlog_memory = sampler.stop();
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT id) FROM {table}")), messages);
    drop_subscription(&mut pg, &sub);

    // Streaming: the worker consumes while the producer writes.
    let stream_topic = unique("bench_stream");
    create_topic(&stream_topic, 4);
    let stream_table = unique("bench_stream");
    let stream_sub = unique("bench_stream");
    pg.batch_execute(&format!("CREATE TABLE {stream_table} ({TABLE_COLUMNS}) {TABLE_OPTIONS}")).unwrap();
    create_subscription(&mut pg, &stream_sub, &stream_topic, &stream_table, &batch_size_argument());
    wait_for("the streaming worker", Duration::from_secs(30), || !worker_pids(&mut pg, &stream_sub).is_empty());
    let sampler = MemorySampler::start(subscription_workers(&stream_sub));
    let started = Instant::now();
    let p = producer();
    for id in 0..messages {
        p.send(&stream_topic, None, Some(id.to_string().as_bytes()), Some(orders::order_json(id).as_bytes()));
        // Paced below what the worker sustains, so that memory reflects a worker keeping up
        // with a stream rather than the broker's whole-backlog answers.
        if id % 10_000 == 9_999 {
            let due = Duration::from_secs_f64((id + 1) as f64 / STREAM_RATE);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {stream_table}"), messages, Duration::from_secs(600));
    let stream_secs = started.elapsed().as_secs_f64();
    let stream_memory = sampler.stop();
    drop_subscription(&mut pg, &stream_sub);
    pg.batch_execute(&format!("DROP TABLE {copy_table}, {table}, {stream_table}")).unwrap();

    let rate = |secs: f64| messages as f64 / secs;
    println!();
    println!("rows: {messages} JSON orders of ~120 bytes, 5 columns, primary key");
    println!("COPY FROM STDIN (baseline):      {:>9.0} rows/s  ({copy_secs:.2} s)", rate(copy_secs));
    println!("subscription, from a backlog:    {:>9.0} rows/s  ({sub_secs:.2} s)", rate(sub_secs));
    println!(
        "  of which: first rows after {first_row_secs:.2} s (worker start, first fetch), then {:.0} rows/s",
        (messages - rows_at_first) as f64 / (sub_secs - first_row_secs)
    );
    println!("ratio subscription / COPY:       {:>9.2}", copy_secs / sub_secs);
    println!(
        "subscription, live stream:       {:>9.0} rows/s  (paced producer at {STREAM_RATE:.0}/s, {stream_secs:.2} s)",
        rate(stream_secs)
    );
    println!("worker peak memory, live stream: {:>9.1} MB private (RssAnon)", stream_memory.0);
    println!(
        "worker peak memory, backlog:     {:>9.1} MB private (RssAnon; includes the local broker's whole-backlog fetch responses)",
        backlog_memory.0
    );
    println!(
        "worker peak RSS incl. shared buffers touched (VmHWM): {:.1} MB stream, {:.1} MB backlog",
        stream_memory.1, backlog_memory.1
    );
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
