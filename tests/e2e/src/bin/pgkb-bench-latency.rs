//! Latency in both directions, at fixed rates, with the extension's default settings.
//!
//! Subscription: a producer (linger.ms 0) writes JSON orders at the rate for the duration to
//! a 4-partition topic; one worker ingests them into a table with a `_kafka_timestamp`
//! column. A row's latency is the commit time of the transaction that wrote it
//! (`pg_xact_commit_timestamp(xmin)`, hence `track_commit_timestamp = on`) minus the
//! message's timestamp, which the producer set when the message was handed to it.
//!
//! Publication: a client inserts rows at the rate for the duration, in a transaction every
//! time rows are due (that is every millisecond or so). A row's latency is the time a
//! `read_committed` consumer, tailing the topic in this process, receives its event minus the
//! commit time of the PostgreSQL transaction (the event's `source.commit_time`): what a
//! Kafka reader sees, the Kafka transaction's commit and the consumer's fetch included.
//!
//! Each direction and rate runs on an empty broker; the first 200 messages (connections,
//! metadata) are not counted.
//!
//!   pgkb-bench-latency       PGKB_BENCH_RATES (default "1000,10000"), PGKB_BENCH_SECONDS (60)

use pg_kafka_bridge_e2e::bench::{self, Rows, TABLE_OPTIONS};
use pg_kafka_bridge_e2e::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WARMUP: i64 = 200;
const PARTITIONS: i32 = 4;

struct Latencies {
    achieved_rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    measured: usize,
}

fn main() {
    let rates: Vec<f64> = bench::env_list("PGKB_BENCH_RATES", "1000,10000");
    let seconds = bench::env_number("PGKB_BENCH_SECONDS", 60) as f64;
    let mut pg = pg();
    let tracked: String = pg.query_one("SHOW track_commit_timestamp", &[]).unwrap().get(0);
    assert_eq!(tracked, "on", "track_commit_timestamp must be on (scripts/bench.sh latency turns it on)");
    let mut results = Vec::new();
    for &rate in &rates {
        println!("subscription at {rate:.0} messages/s for {seconds:.0} s...");
        results.push(("subscription", rate, subscription(&mut pg, rate, seconds)));
    }
    for &rate in &rates {
        println!("publication at {rate:.0} rows/s for {seconds:.0} s...");
        results.push(("publication", rate, publication(&mut pg, rate, seconds)));
    }
    println!();
    println!("latency, default settings, {seconds:.0} s per rate (ms)");
    println!("direction | rate /s | achieved /s | p50 ms | p99 ms | max ms | measured");
    for (direction, rate, l) in results {
        println!(
            "{direction} | {rate:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {}",
            l.achieved_rate, l.p50, l.p99, l.max, l.measured
        );
    }
}

fn subscription(pg: &mut postgres::Client, rate: f64, seconds: f64) -> Latencies {
    bench::empty_broker();
    let (topic, table, sub) = (unique("bench_lat"), unique("bench_lat"), unique("bench_lat"));
    create_topic(&topic, PARTITIONS);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} ({}, _kafka_timestamp timestamptz) {TABLE_OPTIONS}",
        Rows::Orders.columns()
    ))
    .unwrap();
    bench::create_subscription(pg, &brokers(), &sub, &topic, &table, "");
    let producer = producer_with(&brokers(), &[("linger.ms", "0")]);
    let send = |ids: std::ops::Range<i64>| {
        for id in ids {
            let (key, value) = (id.to_string(), Rows::Orders.json(id));
            producer.send(
                &topic,
                Some(bench::partition_of(id, PARTITIONS)),
                Some(key.as_bytes()),
                Some(value.as_bytes()),
            );
        }
    };
    send(0..WARMUP);
    bench::wait_for_offsets(pg, &sub, WARMUP, Duration::from_secs(60));
    let count = (rate * seconds) as i64;
    let secs = bench::paced(count, rate, |ids| send(ids.start + WARMUP..ids.end + WARMUP));
    producer.flush();
    bench::wait_for_offsets(pg, &sub, WARMUP + count, Duration::from_secs(300));
    let rows = pg
        .query(
            &format!(
                "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xmin) - _kafka_timestamp) * 1000)::float8 \
                   FROM {table} WHERE id >= {WARMUP}"
            ),
            &[],
        )
        .unwrap();
    let mut latencies: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(latencies.len() as i64, count, "every message a row");
    drop_subscription(pg, &sub);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    let (p50, p99, max) = bench::percentiles(&mut latencies);
    Latencies { achieved_rate: count as f64 / secs, p50, p99, max, measured: latencies.len() }
}

fn publication(pg: &mut postgres::Client, rate: f64, seconds: f64) -> Latencies {
    bench::empty_broker();
    let (table, name) = (unique("bench_lat"), unique("bench_lat"));
    let topic = format!("bench.{table}");
    create_topic(&topic, 1);
    pg.batch_execute(&format!("CREATE TABLE {table} ({}) {TABLE_OPTIONS}", Rows::Orders.columns())).unwrap();
    create_publication(pg, &name, &[&table], &format!(", topic => '{topic}', snapshot => 'none'"));
    let count = (rate * seconds) as i64;
    let tail = Tail::start(&topic, WARMUP + count);
    let insert = |pg: &mut postgres::Client, ids: std::ops::Range<i64>| {
        pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT {} FROM generate_series({}, {}) i",
            Rows::Orders.select_list(),
            ids.start,
            ids.end - 1
        ))
        .unwrap();
    };
    insert(pg, 0..WARMUP);
    tail.wait_for(WARMUP as usize, Duration::from_secs(120));
    let secs = bench::paced(count, rate, |ids| insert(pg, ids.start + WARMUP..ids.end + WARMUP));
    let received = tail.finish(Duration::from_secs(300));
    let mut latencies: Vec<f64> = received.iter().filter(|(id, _)| *id >= WARMUP).map(|(_, l)| *l).collect();
    assert_eq!(latencies.len() as i64, count, "every row an event");
    drop_publication(pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    let (p50, p99, max) = bench::percentiles(&mut latencies);
    Latencies { achieved_rate: count as f64 / secs, p50, p99, max, measured: latencies.len() }
}

/// A `read_committed` consumer tailing a topic in a thread of its own, noting for each event
/// its row's id and how long after the PostgreSQL commit it arrived.
struct Tail {
    received: Arc<Mutex<Vec<(i64, f64)>>>,
    expected: usize,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Tail {
    fn start(topic: &str, expected: i64) -> Tail {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("bench_tail"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .set("receive.message.max.bytes", "2000000000")
            .create()
            .expect("consumer");
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&partitions).unwrap();
        let received = Arc::new(Mutex::new(Vec::with_capacity(expected as usize)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match consumer.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => {
                            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
                            let event: serde_json::Value =
                                serde_json::from_slice(m.payload().expect("an event")).expect("a JSON event");
                            let commit_us = epoch_micros(event["source"]["commit_time"].as_str().expect("commit_time"));
                            let id = event["after"]["id"].as_i64().expect("an id");
                            received.lock().unwrap().push((id, (now_us - commit_us) as f64 / 1000.0));
                        }
                        Some(Err(e)) => eprintln!("tailing: {e}"),
                        None => {}
                    }
                }
            })
        };
        Tail { received, expected: expected as usize, stop, thread }
    }

    fn wait_for(&self, events: usize, timeout: Duration) {
        wait_for("the tailing consumer", timeout, || self.received.lock().unwrap().len() >= events);
    }

    fn finish(self, timeout: Duration) -> Vec<(i64, f64)> {
        let deadline = Instant::now() + timeout;
        while self.received.lock().unwrap().len() < self.expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Microseconds since the Unix epoch of `2026-12-02T01:23:45.123456Z`, the form events carry.
fn epoch_micros(iso: &str) -> i64 {
    let number = |range: std::ops::Range<usize>| iso[range].parse::<i64>().expect("an ISO timestamp");
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let seconds = number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
    let micros = number(20..26);
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + seconds) * 1_000_000 + micros
}
