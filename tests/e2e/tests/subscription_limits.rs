//! Kafka to PostgreSQL against a broker that honours fetch size limits and deletes old
//! messages: librdkafka's mock cluster, in this process, reached by the worker over TCP. The
//! local broker can show neither: it answers every fetch with the whole rest of the topic and
//! never deletes anything. The mock keeps at most 5 MB per partition.

use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::*;
use rdkafka::mocking::MockCluster;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// The bound the product promises for one worker, whatever the backlog.
const WORKER_MEMORY_LIMIT_MB: f64 = 128.0;

/// A kilobyte of text, different for each message.
fn kilobyte(i: i64) -> String {
    format!("{i:>1024}")
}

#[test]
fn worker_memory_stays_bounded_whatever_the_backlog() {
    // 240,000 messages of 1 KB: a backlog of about 240 MB, twice the worker's memory bound.
    const MESSAGES: i64 = 240_000;
    const PARTITIONS: i32 = 80;
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("mem");
    mock.create_topic(&topic, PARTITIONS, 1).expect("mock topic");
    let p = producer_at(&mock.bootstrap_servers());
    for i in 0..MESSAGES {
        // Spread evenly: no partition may outgrow what the mock keeps.
        p.send(&topic, Some((i % PARTITIONS as i64) as i32), None, Some(kilobyte(i).as_bytes()));
    }
    p.flush();

    let mut pg = pg();
    let (table, sub) = (unique("mem"), unique("sub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (payload text)")).unwrap();
    create_subscription_at(&mut pg, &mock.bootstrap_servers(), &sub, &topic, &table, ", format => 'text'");
    let sampler = MemorySampler::start({
        let sub = sub.clone();
        move |pg| worker_pids(pg, &sub)
    });
    wait_for_count(&format!("SELECT count(*) FROM {table}"), MESSAGES, WAIT);
    let (peak_private_mb, _) = sampler.stop();
    assert!(peak_private_mb > 0.0, "the worker's memory was never sampled");
    println!("worker peak private memory: {peak_private_mb:.1} MB");
    assert!(
        peak_private_mb < WORKER_MEMORY_LIMIT_MB,
        "the worker used {peak_private_mb:.1} MB of private memory for a backlog of ~240 MB"
    );
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT payload) FROM {table}")), MESSAGES);
    drop_subscription(&mut pg, &sub);
}

#[test]
fn a_position_the_broker_no_longer_has_stops_the_worker_without_skipping() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("gone");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let p = producer_at(&mock.bootstrap_servers());
    for i in 0..100 {
        p.send(&topic, None, None, Some(kilobyte(i).as_bytes()));
    }
    p.flush();

    let mut pg = pg();
    let (table, sub) = (unique("gone"), unique("sub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (payload text)")).unwrap();
    create_subscription_at(&mut pg, &mock.bootstrap_servers(), &sub, &topic, &table, ", format => 'text'");
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 100, WAIT);
    pg.batch_execute(&format!("SELECT kafka.stop_subscription('{sub}')")).unwrap();
    wait_for("the worker to stop", WAIT, || worker_pids(&mut pg, &sub).is_empty());

    // While the subscription is stopped, 8 MB more push the messages after its stored
    // position out of the partition's 5 MB.
    for i in 100..8_100 {
        p.send(&topic, None, None, Some(kilobyte(i).as_bytes()));
    }
    p.flush();
    let stored = "SELECT next_offset FROM kafka.offsets WHERE subscription = $1";
    assert_eq!(pg.query_one(stored, &[&sub]).unwrap().get::<_, i64>(0), 100);

    pg.batch_execute(&format!("SELECT kafka.start_subscription('{sub}')")).unwrap();
    wait_for("the status to show the lost position", WAIT, || {
        last_error(&mut pg, &sub).is_some_and(|e| e.to_lowercase().contains("offset"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 100, "messages were skipped");
    assert_eq!(pg.query_one(stored, &[&sub]).unwrap().get::<_, i64>(0), 100, "the stored position moved");
    let state = status(&mut pg, &sub);
    assert!(state.contains("| error |"), "the worker does not show the error state: {state}");
    drop_subscription(&mut pg, &sub);
}
