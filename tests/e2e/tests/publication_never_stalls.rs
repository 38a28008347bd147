//! PostgreSQL to Kafka never stalls: events Kafka can never take (too large, a topic name it
//! refuses) are dead letters and the rest flows, exactly once even with a `kill -9` in
//! between; with `on_event_error => 'stop'` the publication stops with the reason and
//! retries with backoff; a replay longer than the Kafka transaction timeout completes; a
//! stopped publication leaves no Kafka transaction open.

use pg_kafka_bridge_e2e::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(90);

/// Text of `n` bytes that neither PostgreSQL nor the producer can compress away.
fn noise(n: usize) -> String {
    let mut rng = Rng::new();
    (0..n).map(|_| char::from(b'a' + rng.below(26) as u8)).collect()
}

fn dead_letters(pg: &mut postgres::Client, name: &str) -> Vec<(String, i64, String, usize, String)> {
    pg.query(
        "SELECT lsn::text, seq, topic, length(value), error FROM kafka.publication_dead_letters \
          WHERE publication = $1 ORDER BY lsn, seq",
        &[&name],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<_, Option<i32>>(3).unwrap_or(0) as usize, r.get(4)))
    .collect()
}

#[test]
fn an_event_too_large_or_for_an_invalid_topic_is_a_dead_letter_and_the_rest_flows() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, doc text)")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");
    pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, 'small');
         INSERT INTO {table} VALUES (2, '{}');
         INSERT INTO {table} VALUES (3, 'small');",
        noise(2_900_000)
    ))
    .unwrap();
    // A table renamed to a name that makes an invalid topic.
    let renamed = format!("{table} renamed");
    pg.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} VALUES (4, 'small'); ALTER TABLE {table} RENAME TO \"{renamed}\"; \
         INSERT INTO \"{renamed}\" VALUES (5, 'after the rename'); COMMIT;
         ALTER TABLE \"{renamed}\" RENAME TO {table};
         INSERT INTO {table} VALUES (6, 'small');"
    ))
    .unwrap();

    let ids = published_ids(&topic, 4, TIMEOUT);
    assert_eq!(ids, BTreeMap::from([(1, 1), (3, 1), (4, 1), (6, 1)]), "{}", publication_status(&mut pg, &name));
    wait_for("two dead letters", TIMEOUT, || dead_letters(&mut pg, &name).len() == 2);
    let letters = dead_letters(&mut pg, &name);
    let (_, _, big_topic, big_size, big_error) = &letters[0];
    assert_eq!(big_topic, &topic);
    assert!(*big_size > 2_900_000, "the dead letter keeps the whole event: {big_size} bytes");
    assert!(big_error.contains("too large") && big_error.contains("message.max.bytes"), "{big_error}");
    let (_, _, bad_topic, _, bad_error) = &letters[1];
    assert_eq!(bad_topic, &format!("{prefix}.{renamed}"));
    assert!(bad_error.contains("invalid topic name"), "{bad_error}");
    let (state, counted): (String, i64) = {
        let row = pg
            .query_one("SELECT state, dead_letters FROM kafka.publication_status WHERE publication = $1", &[&name])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((state.as_str(), counted), ("running", 2));
    drop_publication(&mut pg, &name);
}

/// The dead letter sits in the middle of a large transaction, and the server is killed
/// (`kill -9` of the worker) while that transaction is being published: afterwards every
/// other row is in Kafka once and the dead letter is recorded once.
#[test]
fn a_dead_letter_inside_a_large_transaction_survives_kill_minus_nine_exactly_once() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, doc text)")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");
    create_topic(&topic, 1);
    const ROWS: i64 = 200_000;
    pg.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} SELECT i, repeat('x', 200) FROM generate_series(1, {half}) i;
         INSERT INTO {table} VALUES ({big}, '{noise}');
         INSERT INTO {table} SELECT i, repeat('x', 200) FROM generate_series({half} + 1, {ROWS}) i;
         COMMIT;",
        half = ROWS / 2,
        big = ROWS + 1,
        noise = noise(1_500_000)
    ))
    .unwrap();
    // Kill while the transaction is being published: some but not all of it is in Kafka.
    let started = Instant::now();
    let killed_at = loop {
        let published = published_seq(&mut pg, &name);
        if let Some(n) = published.filter(|n| *n > 0 && *n < ROWS) {
            let pids = publication_worker_pids(&mut pg, &name);
            assert_eq!(pids.len(), 1);
            let status = std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap();
            assert!(status.success());
            break n;
        }
        assert!(started.elapsed() < TIMEOUT, "the transaction was never seen in flight: {published:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    pg = pg_after_restart();
    let seen = published_ids(&topic, ROWS as usize, TIMEOUT);
    assert_eq!(seen.len(), ROWS as usize, "killed after {killed_at} events; {}", publication_status(&mut pg, &name));
    assert!(seen.values().all(|&n| n == 1), "some rows were published twice");
    assert!(!seen.contains_key(&(ROWS + 1)));
    wait_for("the dead letter", TIMEOUT, || dead_letters(&mut pg, &name).len() == 1);
    drop_publication(&mut pg, &name);
}

/// Index in its transaction of the last event committed to Kafka: it grows while a large
/// transaction is published in several Kafka transactions.
fn published_seq(pg: &mut postgres::Client, name: &str) -> Option<i64> {
    pg.query_one("SELECT published_seq FROM kafka.publication_status WHERE publication = $1", &[&name])
        .ok()
        .and_then(|r| r.get(0))
}

/// A connection once the cluster is back from the crash restart a `kill -9` causes.
fn pg_after_restart() -> postgres::Client {
    std::thread::sleep(Duration::from_secs(1));
    pg()
}

#[test]
fn on_event_error_stop_stops_with_the_reason_and_retries_with_backoff() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, doc text)")).unwrap();
    create_publication(
        &mut pg,
        &name,
        &[&table],
        &format!(", topic => '{prefix}.{{table}}', on_event_error => 'stop'"),
    );
    pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, '{}'); INSERT INTO {table} VALUES (2, 'small')",
        noise(2_900_000)
    ))
    .unwrap();
    wait_for("the publication to stop with the reason", TIMEOUT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("too large") && e.contains("'stop'"))
    });
    let state: String =
        pg.query_one("SELECT state FROM kafka.publication_status WHERE publication = $1", &[&name]).unwrap().get(0);
    assert_eq!(state, "error");
    // Attempts over 15 s, seen as changes of last_error_at; the process stays the same.
    let pids = publication_worker_pids(&mut pg, &name);
    let mut attempts = std::collections::BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let at: Option<String> = pg
            .query_one("SELECT last_error_at::text FROM kafka.publication_status WHERE publication = $1", &[&name])
            .unwrap()
            .get(0);
        attempts.extend(at);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(attempts.len() <= 8, "{} attempts in 15 s: no backoff", attempts.len());
    assert!(attempts.len() >= 2, "the publication does not retry");
    assert_eq!(publication_worker_pids(&mut pg, &name), pids, "the worker process was restarted");
    assert_eq!(
        count(&mut pg, &format!("SELECT count(*) FROM kafka.publication_dead_letters WHERE publication = '{name}'")),
        0
    );
    // Nothing after the event that cannot be published went out.
    assert!(read_events_with_kcat(&format!("{prefix}.{table}"), 0, Duration::from_secs(1)).is_empty());
    drop_publication(&mut pg, &name);
}

/// Stopping a publication in the middle of a large transaction aborts its open Kafka
/// transaction: a read_committed reader of the topic sees what follows at once, instead of
/// waiting for the broker's transaction timeout.
#[test]
fn a_stopped_publication_leaves_no_kafka_transaction_open() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");
    create_topic(&topic, 1);
    pg.batch_execute(&format!("INSERT INTO {table} SELECT generate_series(1, 500000)")).unwrap();
    let started = Instant::now();
    loop {
        if published_seq(&mut pg, &name).is_some_and(|n| n > 0 && n < 500_000) {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "the transaction was never seen in flight");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop_publication(&mut pg, &name);
    let marker = producer();
    marker.send(&topic, Some(0), Some(b"marker"), Some(b"after the stop"));
    marker.flush();
    // kcat: librdkafka 2.12's consumer stops short on this broker's aborted transactions.
    let seen_at = Instant::now();
    let mut seen = false;
    while !seen && seen_at.elapsed() < Duration::from_secs(10) {
        let events = read_events_with_kcat(&topic, 1, Duration::from_secs(1));
        seen = events.iter().any(|e| e.raw_value.as_deref() == Some(b"after the stop".as_slice()));
    }
    assert!(seen, "a read_committed reader did not get past the stopped publication's transaction in 10 s");
    drop_publication(&mut pg, &name);
}

/// One PostgreSQL transaction whose replay takes longer than the Kafka transaction timeout
/// (lowered to 2 s): a published row, two million changes of an unpublished table, another
/// published row. The Kafka transaction holding the first row is committed from inside the
/// replay, before the broker's timeout would abort it: its progress record comes before the
/// one of the second row. (The local broker does not enforce the timeout itself, so the test
/// reads the progress records.)
#[test]
fn a_replay_longer_than_the_kafka_transaction_timeout_commits_inside_it() {
    let mut pg = pg();
    let (table, other, name, prefix) = (unique("t"), unique("other"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY); CREATE TABLE {other} (id int, pad text)"))
        .unwrap();
    create_publication(
        &mut pg,
        &name,
        &[&table],
        &format!(", topic => '{prefix}.{{table}}', options => '{{\"transaction.timeout.ms\": \"2000\"}}'"),
    );
    let topic = format!("{prefix}.{table}");
    create_topic(&topic, 1);
    pg.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} VALUES (1);
         INSERT INTO {other} SELECT i, repeat('x', 20) FROM generate_series(1, 2000000) i;
         INSERT INTO {table} VALUES (2);
         COMMIT;"
    ))
    .unwrap();
    let started = Instant::now();
    assert_eq!(
        published_ids(&topic, 2, TIMEOUT),
        BTreeMap::from([(1, 1), (2, 1)]),
        "{}",
        publication_status(&mut pg, &name)
    );
    let replay = started.elapsed();
    let progress: Vec<(u64, i64)> =
        read_events_with_kcat(&format!("pg_kafka_bridge.progress.{name}"), 2, Duration::from_secs(10))
            .iter()
            .filter_map(|e| e.value.as_ref().map(|v| (v["commit_lsn"].as_u64().unwrap(), v["seq"].as_i64().unwrap())))
            .collect();
    let lsn = progress.last().expect("a progress record").0;
    let of_the_transaction: Vec<i64> = progress.iter().filter(|p| p.0 == lsn).map(|p| p.1).collect();
    assert_eq!(
        of_the_transaction,
        vec![0, 1],
        "the first row's Kafka transaction was not committed inside the replay ({replay:?})"
    );
    drop_publication(&mut pg, &name);
}

/// A worker process that keeps dying is started again with a growing delay (100 ms doubled
/// for each exit in a row), never in a tight loop, and its status says why meanwhile.
#[test]
fn a_worker_that_keeps_dying_is_restarted_with_backoff() {
    let mut pg = pg();
    let (table, name) = (unique("t"), unique("pub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut pg, &name, &[&table], "");
    let mut delays = Vec::new();
    let mut previous = 0;
    for _ in 0..6 {
        wait_for("a worker", TIMEOUT, || {
            publication_worker_pids(&mut pg, &name).first().is_some_and(|p| *p != previous)
        });
        let pid = publication_worker_pids(&mut pg, &name)[0];
        pg.batch_execute(&format!("SELECT pg_terminate_backend({pid})")).unwrap();
        let killed = Instant::now();
        wait_for("the worker to exit", TIMEOUT, || !publication_worker_pids(&mut pg, &name).contains(&pid));
        let (state, error): (String, Option<String>) = {
            let row = pg
                .query_one("SELECT state, last_error FROM kafka.publication_status WHERE publication = $1", &[&name])
                .unwrap();
            (row.get(0), row.get(1))
        };
        if publication_worker_pids(&mut pg, &name).is_empty() {
            assert_eq!(state, "error");
            assert!(error.as_deref().is_some_and(|e| e.contains("exited with code 1")), "{error:?}");
        }
        wait_for("a new worker", TIMEOUT, || !publication_worker_pids(&mut pg, &name).is_empty());
        delays.push(killed.elapsed());
        previous = pid;
    }
    assert!(delays[5] >= Duration::from_millis(3000), "no backoff: {delays:?}");
    assert!(delays[5] > delays[0], "{delays:?}");
    drop_publication(&mut pg, &name);
}

/// A progress record in Kafka ahead of this server's WAL (as after a restore from an older
/// backup) stops the publication with an error that says so, and publishes nothing more.
#[test]
fn a_progress_record_ahead_of_the_wal_stops_the_publication_with_a_clear_error() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (1)")).unwrap();
    assert_eq!(published_ids(&topic, 1, TIMEOUT).len(), 1);
    stop_publication(&mut pg, &name);

    // What a later server wrote: the key is the publication's transactional id.
    let row = pg
        .query_one(
            "SELECT format('pg_kafka_bridge.%s.%s.%s', (SELECT system_identifier FROM pg_control_system()), \
                           (SELECT oid FROM pg_database WHERE datname = current_database()), p.id), \
                    (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint + 1000000000 \
               FROM kafka.publication_catalog p WHERE p.name = $1",
            &[&name],
        )
        .unwrap();
    let (key, ahead): (String, i64) = (row.get(0), row.get(1));
    let record = serde_json::json!({"publication": name, "commit_lsn": ahead, "seq": 0});
    let p = producer();
    p.send(
        &format!("pg_kafka_bridge.progress.{name}"),
        Some(0),
        Some(key.as_bytes()),
        Some(record.to_string().as_bytes()),
    );
    p.flush();

    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}'); INSERT INTO {table} VALUES (2)")).unwrap();
    wait_for("the error in the status", TIMEOUT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("ahead of this server's WAL"))
    });
    let state: String =
        pg.query_one("SELECT state FROM kafka.publication_status WHERE publication = $1", &[&name]).unwrap().get(0);
    assert_eq!(state, "error");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(read_events_with_kcat(&topic, 1, Duration::from_secs(1)).len(), 1, "published past the guard");
    drop_publication(&mut pg, &name);
}

/// The broker refuses an event the producer accepted (the topic's max.message.bytes is below
/// the producer's): the Kafka transaction fails with it, and the events batched with it are
/// refused too. Sent again one by one, only the event at fault becomes a dead letter; every
/// other row of the transaction is published once.
#[test]
fn an_event_the_broker_refuses_is_found_alone_and_is_a_dead_letter() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, doc text)")).unwrap();
    let topic = format!("{prefix}.{table}");
    create_topic_with(&topic, &[("max.message.bytes", "4000")]);
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    pg.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} SELECT i, 'small' FROM generate_series(1, 20) i;
         INSERT INTO {table} VALUES (21, '{}');
         INSERT INTO {table} SELECT i, 'small' FROM generate_series(22, 40) i;
         COMMIT;
         INSERT INTO {table} VALUES (41, 'after');",
        noise(8000)
    ))
    .unwrap();
    let expected: BTreeMap<i64, usize> = (1..=41).filter(|id| *id != 21).map(|id| (id, 1)).collect();
    assert_eq!(published_ids(&topic, 40, TIMEOUT), expected, "{}", publication_status(&mut pg, &name));
    wait_for("the dead letter", TIMEOUT, || dead_letters(&mut pg, &name).len() == 1);
    let (_, seq, _, size, error) = dead_letters(&mut pg, &name).remove(0);
    assert_eq!(seq, 20, "the 21st change of its transaction");
    assert!(size > 8000 && error.contains("refused"), "{size} bytes: {error}");
    drop_publication(&mut pg, &name);
}
