//! Latency in both directions, at fixed rates, with the extension's default settings, each
//! beside a baseline of the broker's own latency measured in the same run.
//!
//! Subscription: a producer (linger.ms 0) writes JSON orders at the rate for the duration to
//! a 4-partition topic; one worker ingests them into a table with a `_kafka_timestamp`
//! column. A row's latency is the commit time of the transaction that wrote it
//! (`pg_xact_commit_timestamp(xmin)`, hence `track_commit_timestamp = on`) minus the
//! message's timestamp, which the producer set when the message was handed to it.
//! Baseline: a plain consumer in this process tailing the same topic with the worker's fetch
//! settings (message timestamp to receipt), the latency of any consumer of that broker.
//!
//! Publication: a client inserts rows at the rate for the duration, in a transaction every
//! time rows are due (about every millisecond). A row's latency is the time a
//! `read_committed` consumer, tailing the topic in this process, receives its event minus the
//! commit time of the PostgreSQL transaction (the event's `source.commit_time`): what a
//! Kafka reader sees, the Kafka transaction's commit and the consumer's fetch included.
//! Baseline: at the same time and rate, a transactional producer in this process writes
//! messages as large as the events to another topic, committing whenever messages are due,
//! tailed the same way (message timestamp to receipt): the latency of Kafka transactions on
//! that broker.
//!
//! Each direction and rate runs on an empty broker; the first 200 messages (connections,
//! metadata) are not counted.
//!
//!   pgkb-bench-latency       PGKB_BENCH_RATES (default "1000,10000"), PGKB_BENCH_SECONDS (60)

use pg_kafka_bridge_e2e::bench::{self, Rows, TABLE_OPTIONS};
use pg_kafka_bridge_e2e::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WARMUP: i64 = 200;
const PARTITIONS: i32 = 4;
/// The subscription's baseline consumer fetches as a subscription worker does: the broker
/// here holds a fetch up to its maximum wait at times, although messages came.
const SUBSCRIPTION_FETCH_WAIT: &str = "100";
/// The readers of a publication's events and of its baseline wait at most 10 ms per fetch,
/// so that they see each committed message as soon as they can.
const READER_FETCH_WAIT: &str = "10";

/// p50, p99 and maximum, in milliseconds.
type Percentiles = (f64, f64, f64);

struct Measured {
    achieved_rate: f64,
    product: Percentiles,
    baseline: Percentiles,
    measured: usize,
}

impl Measured {
    /// `count` messages sent in `secs`, with the product's and the baseline's latencies.
    fn new(count: i64, secs: f64, mut product: Vec<f64>, mut baseline: Vec<f64>) -> Measured {
        Measured {
            achieved_rate: count as f64 / secs,
            measured: product.len(),
            product: bench::percentiles(&mut product),
            baseline: bench::percentiles(&mut baseline),
        }
    }
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
        results.push(("subscription", "any consumer", rate, subscription(&mut pg, rate, seconds)));
    }
    for &rate in &rates {
        println!("publication at {rate:.0} rows/s for {seconds:.0} s...");
        results.push(("publication", "Kafka transactions", rate, publication(&mut pg, rate, seconds)));
    }
    println!();
    println!("latency, default settings, {seconds:.0} s per rate, in ms; the broker's own beside it");
    println!("direction | rate /s | achieved /s | p50 | p99 | max | broker baseline | p50 | p99 | max | measured");
    for (direction, baseline, rate, m) in results {
        let ((p50, p99, max), (b50, b99, bmax)) = (m.product, m.baseline);
        println!(
            "{direction} | {rate:.0} | {:.0} | {p50:.1} | {p99:.1} | {max:.1} | {baseline} | {b50:.1} | {b99:.1} | \
             {bmax:.1} | {}",
            m.achieved_rate, m.measured
        );
    }
}

fn subscription(pg: &mut postgres::Client, rate: f64, seconds: f64) -> Measured {
    bench::empty_broker();
    let (topic, table, sub) = (unique("bench_lat"), unique("bench_lat"), unique("bench_lat"));
    create_topic(&topic, PARTITIONS);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} ({}, _kafka_timestamp timestamptz) {TABLE_OPTIONS}",
        Rows::Orders.columns()
    ))
    .unwrap();
    bench::create_subscription(pg, &brokers(), &sub, &topic, &table, "");
    let count = (rate * seconds) as i64;
    let consumer = Tail::start(&topic, PARTITIONS, false, SUBSCRIPTION_FETCH_WAIT, count, |m, now_us| {
        let id: i64 = std::str::from_utf8(m.key()?).ok()?.parse().ok()?;
        Some((id, now_us - m.timestamp().to_millis()? * 1000))
    });
    let producer = producer_with(&brokers(), &[("linger.ms", "0")]);
    let send = |ids: std::ops::Range<i64>| {
        for id in ids {
            let (key, value) = (id.to_string(), Rows::Orders.json(id));
            let partition = Some(bench::partition_of(id, PARTITIONS));
            producer.send(&topic, partition, Some(key.as_bytes()), Some(value.as_bytes()));
        }
    };
    send(0..WARMUP);
    bench::wait_for_offsets(pg, &sub, WARMUP, Duration::from_secs(60));
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
    let latencies: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(latencies.len() as i64, count, "every message a row");
    let baseline = consumer.finish(Duration::from_secs(60));
    drop_subscription(pg, &sub);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    Measured::new(count, secs, latencies, baseline)
}

fn publication(pg: &mut postgres::Client, rate: f64, seconds: f64) -> Measured {
    bench::empty_broker();
    let (table, name) = (unique("bench_lat"), unique("bench_lat"));
    let (topic, baseline_topic) = (format!("bench.{table}"), unique("bench_lat_baseline"));
    create_topic(&topic, 1);
    create_topic(&baseline_topic, 1);
    pg.batch_execute(&format!("CREATE TABLE {table} ({}) {TABLE_OPTIONS}", Rows::Orders.columns())).unwrap();
    create_publication(pg, &name, &[&table], &format!(", topic => '{topic}', snapshot => 'none'"));
    let count = (rate * seconds) as i64;
    let events = Tail::start(&topic, 1, true, READER_FETCH_WAIT, count, |m, now_us| {
        let event: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
        let commit_us = epoch_micros(event["source"]["commit_time"].as_str()?);
        Some((event["after"]["id"].as_i64()?, now_us - commit_us))
    });
    let baseline = Tail::start(&baseline_topic, 1, true, READER_FETCH_WAIT, count, |m, now_us| {
        let id: i64 = std::str::from_utf8(m.payload()?).ok()?.trim_end().parse().ok()?;
        Some((id, now_us - m.timestamp().to_millis()? * 1000))
    });
    bench::insert(pg, &table, Rows::Orders, 0..WARMUP);
    events.wait_for(WARMUP as usize, Duration::from_secs(120));
    // The baseline's messages are as large as the events: the broker's work grows with bytes.
    let event_size = events.last_size.load(Ordering::SeqCst);
    let baseline_producer = transactional_producer(&baseline_topic, rate, count, event_size);
    let secs =
        bench::paced(count, rate, |ids| bench::insert(pg, &table, Rows::Orders, ids.start + WARMUP..ids.end + WARMUP));
    baseline_producer.join().expect("the baseline's producer");
    let latencies = events.finish(Duration::from_secs(300));
    assert_eq!(latencies.len() as i64, count, "every row an event");
    let baseline = baseline.finish(Duration::from_secs(60));
    drop_publication(pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    Measured::new(count, secs, latencies, baseline)
}

/// Writes ids `WARMUP..WARMUP + count` to `topic` at `rate` in a thread of its own, as
/// messages of `size` bytes, with a transactional producer that commits a Kafka transaction
/// whenever messages are due.
fn transactional_producer(topic: &str, rate: f64, count: i64, size: usize) -> std::thread::JoinHandle<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("bench_lat_baseline"))
        .create()
        .expect("a transactional producer");
    producer.init_transactions(Duration::from_secs(30)).expect("init_transactions");
    let topic = topic.to_string();
    std::thread::spawn(move || {
        bench::paced(count, rate, |ids| {
            producer.begin_transaction().expect("begin_transaction");
            for id in ids.start + WARMUP..ids.end + WARMUP {
                let payload = format!("{id:<size$}");
                producer.send(BaseRecord::<str, str>::to(&topic).payload(&payload)).expect("queued");
            }
            // What the extension does before each commit (librdkafka's own flush).
            // SAFETY: the handle belongs to `producer`, alive for the call.
            unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), 30_000) };
            producer.commit_transaction(Duration::from_secs(30)).expect("commit_transaction");
        });
    })
}

/// A consumer tailing a topic from its start in a thread of its own, noting for each message
/// its id and latency (µs, from `measure`), in milliseconds.
struct Tail {
    received: Arc<Mutex<Vec<(i64, f64)>>>,
    /// Size of the last message's key and value.
    last_size: Arc<AtomicUsize>,
    expected: usize,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Tail {
    fn start(
        topic: &str,
        partitions: i32,
        read_committed: bool,
        fetch_wait_max_ms: &str,
        expected: i64,
        measure: impl Fn(&BorrowedMessage, i64) -> Option<(i64, i64)> + Send + 'static,
    ) -> Tail {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("bench_tail"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" })
            .set("fetch.wait.max.ms", fetch_wait_max_ms)
            .set("receive.message.max.bytes", "2000000000")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
        consumer.assign(&list).unwrap();
        let received = Arc::new(Mutex::new(Vec::with_capacity((WARMUP + expected) as usize)));
        let stop = Arc::new(AtomicBool::new(false));
        let last_size = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (received, stop, size) = (received.clone(), stop.clone(), last_size.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match consumer.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => {
                            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
                            let (id, latency_us) = measure(&m, now_us).expect("a message of the benchmark");
                            size.store(m.key_len() + m.payload_len(), Ordering::SeqCst);
                            received.lock().unwrap().push((id, latency_us as f64 / 1000.0));
                        }
                        Some(Err(e)) => eprintln!("tailing: {e}"),
                        None => {}
                    }
                }
            })
        };
        Tail { received, last_size, expected: expected as usize, stop, thread }
    }

    fn wait_for(&self, messages: usize, timeout: Duration) {
        wait_for("the tailing consumer", timeout, || self.received.lock().unwrap().len() >= messages);
    }

    /// The latencies of the measured messages (those after the warm-up), once all came.
    fn finish(self, timeout: Duration) -> Vec<f64> {
        let deadline = Instant::now() + timeout;
        let measured = |received: &Vec<(i64, f64)>| received.iter().filter(|(id, _)| *id >= WARMUP).count();
        while measured(&self.received.lock().unwrap()) < self.expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        let received = std::mem::take(&mut *self.received.lock().unwrap());
        received.into_iter().filter(|(id, _)| *id >= WARMUP).map(|(_, latency)| latency).collect()
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
