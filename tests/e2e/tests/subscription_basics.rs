//! Kafka to PostgreSQL: rows, metadata, formats, several workers, stop and start.

use pg_kafka_bridge_e2e::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn json_messages_become_rows_with_metadata_and_offsets() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(
        &mut pg,
        "json",
        3,
        "id bigint PRIMARY KEY, customer text, amount numeric(12,2), \
         created_at timestamptz, payload jsonb, tags text[], note text DEFAULT 'none', \
         _kafka_topic text, _kafka_partition int, _kafka_offset bigint, _kafka_key text, \
         _kafka_timestamp timestamptz, _kafka_headers jsonb",
    );
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    for i in 0..300i64 {
        let v = json!({"id": i, "customer": format!("c{i}"), "amount": "12.34", "created_at": "2026-01-02T03:04:05Z",
                       "payload": {"n": i, "s": "x\ty"}, "tags": ["a", "b"], "unknown": 1});
        p.send_json(&topic, Some((i % 3) as i32), &i.to_string(), &v);
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 300, WAIT);
    let row = pg
        .query_one(
            &format!(
                "SELECT customer, amount::text, payload->>'s', tags, note, _kafka_topic, _kafka_key, \
                 _kafka_partition, _kafka_timestamp IS NOT NULL, _kafka_headers::text FROM {table} WHERE id = 7"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "c7");
    assert_eq!(row.get::<_, String>(1), "12.34");
    assert_eq!(row.get::<_, String>(2), "x\ty");
    assert_eq!(row.get::<_, Vec<String>>(3), vec!["a", "b"]);
    assert_eq!(row.get::<_, String>(4), "none", "a missing key takes the column default");
    assert_eq!(row.get::<_, String>(5), topic);
    assert_eq!(row.get::<_, String>(6), "7");
    assert_eq!(row.get::<_, i32>(7), 1);
    assert!(row.get::<_, bool>(8));
    assert_eq!(row.get::<_, String>(9), "{}");
    // Offsets: each partition received 100 messages.
    let offsets = pg
        .query(
            &format!("SELECT partition, next_offset FROM kafka.offsets WHERE subscription = '{sub}' ORDER BY 1"),
            &[],
        )
        .unwrap();
    let offsets: Vec<(i32, i64)> = offsets.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(offsets, vec![(0, 100), (1, 100), (2, 100)]);
    // Positions reach the broker's consumer group only when the setting says so; turning it
    // on with a reload (SIGHUP) takes effect in the running worker.
    let group = format!("pg_kafka_bridge.{sub}");
    assert_eq!(group_offsets(&group, &topic, 3), vec![-1, -1, -1]);
    pg.batch_execute("ALTER SYSTEM SET pg_kafka_bridge.publish_consumer_offsets = on").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    p.send_json(&topic, Some(0), "300", &json!({"id": 300}));
    p.flush();
    wait_for("the consumer group's offsets", WAIT, || group_offsets(&group, &topic, 3) == vec![101, 100, 100]);
    // A message right after that publish, then silence: its position reaches the group too,
    // once the interval (5 s) has passed, although no batch follows it.
    p.send_json(&topic, Some(0), "301", &json!({"id": 301}));
    p.flush();
    wait_for("the last position of a topic gone quiet", WAIT, || {
        group_offsets(&group, &topic, 3) == vec![102, 100, 100]
    });
    pg.batch_execute("ALTER SYSTEM RESET pg_kafka_bridge.publish_consumer_offsets").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    // Every row's position matches the stored partition, exactly once.
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT (_kafka_partition, _kafka_offset)) FROM {table}")), 302);
    let status = status(&mut pg, &sub);
    assert!(status.contains("running"), "{status}");
    drop_subscription(&mut pg, &sub);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.offsets WHERE subscription = '{sub}'")), 0);
}

#[test]
fn text_and_bytea_formats() {
    let mut pg = pg();
    let (topic, text_table, bytea_table) = (unique("raw"), unique("texts"), unique("blobs"));
    let (text_sub, bytea_sub) = (unique("subt"), unique("subb"));
    create_topic(&topic, 1);
    pg.batch_execute(&format!(
        "CREATE TABLE {text_table} (id bigserial, payload text, _kafka_offset bigint); \
         CREATE TABLE {bytea_table} (body bytea, _kafka_key bytea)"
    ))
    .unwrap();
    create_subscription(&mut pg, &text_sub, &topic, &text_table, ", format => 'text'");
    create_subscription(&mut pg, &bytea_sub, &topic, &bytea_table, ", format => 'bytea'");
    let p = producer();
    p.send(&topic, None, Some(&[0xff, 0]), Some(b"line one\\ with\ttab"));
    p.send(&topic, None, None, Some(&[0xc3, 0x28]));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {bytea_table}"), 2, WAIT);
    wait_for_count(&format!("SELECT count(*) FROM {text_table}"), 1, WAIT);
    let text: String = pg.query_one(&format!("SELECT payload FROM {text_table}"), &[]).unwrap().get(0);
    assert_eq!(text, "line one\\ with\ttab");
    let blobs: Vec<(Vec<u8>, Option<Vec<u8>>)> = pg
        .query(&format!("SELECT body, _kafka_key FROM {bytea_table} ORDER BY length(body) DESC"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(blobs[0], (b"line one\\ with\ttab".to_vec(), Some(vec![0xff, 0])));
    assert_eq!(blobs[1], (vec![0xc3, 0x28], None));
    // The invalid UTF-8 message is a dead letter of the text subscription, with its bytes.
    wait_for_count(&format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{text_sub}'"), 1, WAIT);
    let (payload, error): (Vec<u8>, String) = pg
        .query_one(&format!("SELECT payload, error FROM kafka.dead_letters WHERE subscription = '{text_sub}'"), &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(payload, vec![0xc3, 0x28]);
    assert!(error.contains("UTF-8"), "{error}");
    drop_subscription(&mut pg, &text_sub);
    drop_subscription(&mut pg, &bytea_sub);
}

#[test]
fn several_workers_split_the_partitions() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "multi", 4, "id bigint PRIMARY KEY, _kafka_partition int");
    create_subscription(&mut pg, &sub, &topic, &table, ", workers => 2");
    let p = producer();
    for i in 0..400i64 {
        p.send_json(&topic, Some((i % 4) as i32), &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 400, WAIT);
    let pids = worker_pids(&mut pg, &sub);
    assert_eq!(pids.len(), 2, "{}", status(&mut pg, &sub));
    let split: Vec<(i32, i32)> = pg
        .query(
            &format!("SELECT worker, partition FROM kafka.subscription_status WHERE subscription = '{sub}' ORDER BY partition"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(split, vec![(0, 0), (1, 1), (0, 2), (1, 3)]);
    let backend_types =
        count(&mut pg, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_kafka_bridge subscription'");
    assert!(backend_types >= 2);
    drop_subscription(&mut pg, &sub);
}

#[test]
fn stop_is_prompt_and_start_resumes_where_it_stopped() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "stop", 1, "id bigint PRIMARY KEY");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    for i in 0..50i64 {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 50, WAIT);
    pg.batch_execute(&format!("SELECT kafka.stop_subscription('{sub}')")).unwrap();
    wait_for("the worker to exit after stop_subscription", Duration::from_secs(5), || {
        worker_pids(&mut pg, &sub).is_empty()
    });
    for i in 50..80i64 {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 50, "a stopped subscription applies nothing");
    pg.batch_execute(&format!("SELECT kafka.start_subscription('{sub}')")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 80, WAIT);
    // A worker killed with SIGTERM exits promptly and the launcher starts a new one.
    let pid = worker_pids(&mut pg, &sub)[0];
    pg.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    wait_for("a new worker after SIGTERM", Duration::from_secs(10), || {
        let pids = worker_pids(&mut pg, &sub);
        !pids.is_empty() && !pids.contains(&pid)
    });
    drop_subscription(&mut pg, &sub);
}

#[test]
fn partitions_added_while_running_are_consumed_from_their_start() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "grow", 1, "id bigint PRIMARY KEY, _kafka_partition int");
    create_subscription(&mut pg, &sub, &topic, &table, ", start_from => 'latest'");
    wait_for("the worker to store its start position", WAIT, || {
        count(&mut pg, &format!("SELECT count(*) FROM kafka.offsets WHERE subscription = '{sub}'")) == 1
    });
    let p = producer();
    p.send_json(&topic, Some(0), "0", &json!({"id": 0}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1, WAIT);
    add_partitions(&topic, 3);
    // A new producer: the first one's metadata knows one partition only.
    let p = producer();
    // Written before the worker notices the new partitions: still consumed, since partitions
    // found later start at their beginning whatever start_from says.
    for i in 1..=20i64 {
        p.send_json(&topic, Some((i % 3) as i32), &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 21, WAIT);
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT _kafka_partition) FROM {table}")), 3);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.offsets WHERE subscription = '{sub}'")), 3);
    drop_subscription(&mut pg, &sub);
}

#[test]
fn start_from_latest_skips_the_existing_messages_of_every_worker() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "latest", 4, "id bigint PRIMARY KEY");
    let p = producer();
    for i in 0..40i64 {
        p.send_json(&topic, Some((i % 4) as i32), &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    create_subscription(&mut pg, &sub, &topic, &table, ", start_from => 'latest', workers => 2");
    wait_for("both workers to store their start positions", WAIT, || {
        count(&mut pg, &format!("SELECT count(*) FROM kafka.offsets WHERE subscription = '{sub}' AND next_offset = 10"))
            == 4
    });
    for i in 100..120i64 {
        p.send_json(&topic, Some((i % 4) as i32), &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 20, WAIT);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table} WHERE id < 100")), 0);
    drop_subscription(&mut pg, &sub);
}

#[test]
fn columns_added_while_running_are_filled() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "alter", 1, "id bigint");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    p.send_json(&topic, None, "1", &json!({"id": 1, "note": "before"}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1, WAIT);
    pg.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN note text")).unwrap();
    p.send_json(&topic, None, "2", &json!({"id": 2, "note": "after"}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table} WHERE note = 'after'"), 1, WAIT);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 2);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'")), 0);
    drop_subscription(&mut pg, &sub);
}

/// A batch goes as soon as nothing more is waiting and the worker is idle, long before its
/// `batch_timeout_ms`; a burst that arrives together still makes few large batches.
#[test]
fn an_idle_worker_applies_a_message_at_once_and_a_burst_in_few_batches() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "early", 1, "id bigint PRIMARY KEY");
    pg.batch_execute(&format!(
        "SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}', \
         target => '{table}'::regclass, batch_timeout_ms => 20000)",
        brokers()
    ))
    .unwrap();
    let p = producer();
    // The first message only once the worker runs: its consumer is set up, and waits.
    wait_for("the worker", WAIT, || status(&mut pg, &sub).contains("running"));
    std::thread::sleep(Duration::from_secs(1));
    for (round, id) in [0i64, 1, 2].into_iter().enumerate() {
        let sent = std::time::Instant::now();
        p.send_json(&topic, None, &id.to_string(), &json!({"id": id}));
        p.flush();
        wait_for_count(&format!("SELECT count(*) FROM {table} WHERE id = {id}"), 1, WAIT);
        let took = sent.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "message {round}: a row after {took:?}, as if waiting for the batch to fill"
        );
    }
    // A burst of 5,000: librdkafka holds them all at once, so the batch takes them all.
    const BURST: i64 = 5_000;
    for id in 100..100 + BURST {
        p.send_json(&topic, None, &id.to_string(), &json!({"id": id}));
    }
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table} WHERE id >= 100"), BURST, WAIT);
    let transactions = count(&mut pg, &format!("SELECT count(DISTINCT xmin::text) FROM {table} WHERE id >= 100"));
    assert!(transactions <= 50, "a burst of {BURST} messages took {transactions} transactions");
    drop_subscription(&mut pg, &sub);
}

#[test]
fn batch_commits_wait_for_the_disk_only_when_configured() {
    // One message per batch. A synchronous commit flushes the WAL itself, so each batch
    // counts a sync; asynchronous commits leave the flushing to the WAL writer, which syncs a
    // few times a second at most.
    const MESSAGES: i64 = 300;
    let mut pg = pg();
    let syncs_off = wal_syncs_while_applying(&mut pg, MESSAGES);
    pg.batch_execute("ALTER SYSTEM SET pg_kafka_bridge.subscription_synchronous_commit = on").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    let syncs_on = wal_syncs_while_applying(&mut pg, MESSAGES);
    pg.batch_execute("ALTER SYSTEM RESET pg_kafka_bridge.subscription_synchronous_commit").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(syncs_on >= MESSAGES, "synchronous batch commits: {syncs_on} WAL syncs for {MESSAGES} batches");
    assert!(
        syncs_off < MESSAGES / 2,
        "asynchronous batch commits (the default): {syncs_off} WAL syncs for {MESSAGES} batches"
    );
}

/// WAL syncs (`pg_stat_wal`) of the whole server while a new subscription applies a backlog of
/// `messages`, one per batch. The worker's statistics reach the view once it has exited.
fn wal_syncs_while_applying(pg: &mut postgres::Client, messages: i64) -> i64 {
    let (topic, table, sub) = topic_and_table(pg, "sync", 1, "id bigint");
    let p = producer();
    for i in 0..messages {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    // PostgreSQL 18 counts WAL syncs in pg_stat_io (per process kind) instead of pg_stat_wal.
    let version: i32 = pg.query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    let wal_syncs = if version >= 180000 {
        "SELECT sum(fsyncs)::bigint FROM pg_stat_io WHERE object = 'wal'"
    } else {
        "SELECT wal_sync FROM pg_stat_wal"
    };
    let before = count(pg, wal_syncs);
    create_subscription(pg, &sub, &topic, &table, ", batch_size => 1");
    wait_for_count(&format!("SELECT count(*) FROM {table}"), messages, WAIT);
    drop_subscription(pg, &sub);
    count(pg, wal_syncs) - before
}

/// A stored position moved under a running worker (by another worker, or by hand) is never
/// overwritten: the worker's compare-and-set fails, the batch rolls back, and the worker
/// reads the positions again and goes on from the moved one.
#[test]
fn a_position_moved_under_a_running_worker_is_taken_up() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "cas", 1, "id bigint");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    for i in 0..100i64 {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    let position = format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'");
    wait_for_count(&position, 100, WAIT);
    pg.batch_execute(&format!("UPDATE kafka.offsets SET next_offset = 50 WHERE subscription = '{sub}'")).unwrap();
    for i in 100..110i64 {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for_count(&position, 110, WAIT);
    assert_eq!(
        count(&mut pg, &format!("SELECT count(*) FROM {table}")),
        160,
        "messages 50 to 109 applied from the moved position"
    );
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table} WHERE id BETWEEN 50 AND 99")), 100);
    let error = last_error(&mut pg, &sub).unwrap_or_default();
    assert!(error.contains("moved"), "the status shows why the batch was not applied: {error}");
    drop_subscription(&mut pg, &sub);
}
