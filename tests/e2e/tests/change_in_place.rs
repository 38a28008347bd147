//! Running pipelines changed in place: `kafka.alter_subscription`, `kafka.alter_publication`
//! and `kafka.seek` keep positions, and nothing is lost or duplicated (every message and row
//! is counted) while the change happens under load.

use pg_kafka_bridge_e2e::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(90);

fn produce(topic: &str, ids: std::ops::Range<i64>) {
    let p = producer();
    for id in ids {
        p.send_json(topic, None, &id.to_string(), &json!({"id": id}));
    }
    p.flush();
}

/// How many rows of each id `table` holds.
fn ids_in(pg: &mut postgres::Client, table: &str) -> BTreeMap<i64, i64> {
    pg.query(&format!("SELECT id, count(*) FROM {table} GROUP BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn once_each(ids: std::ops::Range<i64>) -> BTreeMap<i64, i64> {
    ids.map(|id| (id, 1)).collect()
}

/// How often each row id was published to `topic`, as counts comparable with [`once_each`].
fn ids_published(topic: &str, expected: usize) -> BTreeMap<i64, i64> {
    published_ids(topic, expected, TIMEOUT).into_iter().map(|(id, n)| (id, n as i64)).collect()
}

/// The other spelling of the local broker's address: a broker address change that still
/// reaches the same broker.
fn other_address() -> String {
    brokers().replace("127.0.0.1", "localhost")
}

#[test]
fn alter_subscription_changes_brokers_options_batching_workers_and_target_while_running() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "alter", 2, "id bigint");
    let other_table = unique("alter_other");
    pg.batch_execute(&format!("CREATE TABLE {other_table} (id bigint)")).unwrap();
    create_subscription(&mut pg, &sub, &topic, &table, "");
    produce(&topic, 0..2000);
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 2000, TIMEOUT);

    // While messages flow: brokers, options, batching and workers change.
    let producing = std::thread::spawn({
        let topic = topic.clone();
        move || produce(&topic, 2000..6000)
    });
    pg.batch_execute(&format!(
        "SELECT kafka.alter_subscription('{sub}', brokers => '{}', options => '{{\"client.id\": \"altered\"}}', \
         batch_size => 100, batch_timeout_ms => 10, workers => 2)",
        other_address()
    ))
    .unwrap();
    producing.join().unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 6000, TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ids_in(&mut pg, &table), once_each(0..6000), "{}", status(&mut pg, &sub));
    let row = pg
        .query_one(
            "SELECT brokers, options->>'client.id', batch_size, batch_timeout_ms, workers FROM kafka.subscriptions \
              WHERE name = $1",
            &[&sub],
        )
        .unwrap();
    let shown: (String, String, i32, i32, i32) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(shown, (other_address(), "altered".into(), 100, 10, 2));
    wait_for("two workers", TIMEOUT, || worker_pids(&mut pg, &sub).len() == 2);

    // The target changes: later messages go to the other table, from the same positions.
    pg.batch_execute(&format!("SELECT kafka.alter_subscription('{sub}', target => '{other_table}')")).unwrap();
    produce(&topic, 6000..7000);
    wait_for_count(&format!("SELECT count(*) FROM {other_table}"), 1000, TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ids_in(&mut pg, &other_table), once_each(6000..7000));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 6000);

    // Arguments that name a problem.
    for (call, expected) in [
        (format!("SELECT kafka.alter_subscription('{sub}', batch_size => 0)"), "batch_size"),
        (format!("SELECT kafka.alter_subscription('{sub}', brokers => ' ')"), "brokers"),
        (format!("SELECT kafka.alter_subscription('{sub}', options => '{{\"no.such\": \"1\"}}')"), "no.such"),
        ("SELECT kafka.alter_subscription('no_such_subscription', workers => 1)".into(), "does not exist"),
    ] {
        let error = pg.batch_execute(&call).unwrap_err();
        assert!(error.as_db_error().unwrap().message().contains(expected), "{call}: {error}");
    }
    drop_subscription(&mut pg, &sub);
}

#[test]
fn seek_replays_exactly_from_an_offset_or_a_time() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "seek", 1, "id bigint");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    produce(&topic, 0..1000);
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1000, TIMEOUT);

    let running = pg.batch_execute(&format!("SELECT kafka.seek('{sub}', '0')")).unwrap_err();
    assert!(running.as_db_error().unwrap().message().contains("is running"), "{running}");

    drop_worker(&mut pg, &sub);
    pg.batch_execute(&format!("SELECT kafka.seek('{sub}', '600')")).unwrap();
    assert_eq!(count(&mut pg, &format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'")), 600);
    pg.batch_execute(&format!("SELECT kafka.start_subscription('{sub}')")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1400, TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let mut expected = once_each(0..1000);
    (600..1000).for_each(|id| *expected.get_mut(&id).unwrap() += 1);
    assert_eq!(ids_in(&mut pg, &table), expected, "from offset 600, once more");

    // By time: the messages produced after a moment, once more.
    std::thread::sleep(Duration::from_millis(1500));
    let moment: String = pg.query_one("SELECT now()::text", &[]).unwrap().get(0);
    std::thread::sleep(Duration::from_millis(1500));
    produce(&topic, 1000..1300);
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1700, TIMEOUT);
    drop_worker(&mut pg, &sub);
    pg.batch_execute(&format!("SELECT kafka.seek('{sub}', '{moment}')")).unwrap();
    pg.batch_execute(&format!("SELECT kafka.start_subscription('{sub}')")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 2000, TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    (1000..1300).for_each(|id| {
        expected.insert(id, 2);
    });
    assert_eq!(ids_in(&mut pg, &table), expected, "from {moment}, once more");

    // 'latest' skips what is there; arguments that name a problem.
    drop_worker(&mut pg, &sub);
    produce(&topic, 1300..1400);
    pg.batch_execute(&format!("SELECT kafka.seek('{sub}', 'latest', partition => 0)")).unwrap();
    assert_eq!(count(&mut pg, &format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'")), 1400);
    for (call, expected) in [
        (format!("SELECT kafka.seek('{sub}', 'yesterday-ish')"), "invalid position"),
        (format!("SELECT kafka.seek('{sub}', '-5')"), "negative"),
        (format!("SELECT kafka.seek('{sub}', '99999')"), "holds offsets 0 to 1400"),
        (format!("SELECT kafka.seek('{sub}', 'earliest', partition => 7)"), "no partition 7"),
    ] {
        let error = pg.batch_execute(&call).unwrap_err();
        assert!(error.as_db_error().unwrap().message().contains(expected), "{call}: {error}");
    }
    drop_subscription(&mut pg, &sub);
}

/// Stops a subscription and waits until its workers are gone.
fn drop_worker(pg: &mut postgres::Client, sub: &str) {
    pg.batch_execute(&format!("SELECT kafka.stop_subscription('{sub}')")).unwrap();
    wait_for("the workers to stop", TIMEOUT, || worker_pids(pg, sub).is_empty());
}

#[test]
fn alter_publication_adds_and_drops_tables_and_changes_brokers_and_options_while_running() {
    let mut pg = pg();
    let (first, second, name, prefix) = (unique("a"), unique("b"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {first} (id int PRIMARY KEY); CREATE TABLE {second} (id int PRIMARY KEY)"))
        .unwrap();
    // Without snapshots: the rows of the table added later are published once, as changes.
    create_publication(&mut pg, &name, &[&first], &format!(", topic => '{prefix}.{{table}}', snapshot => 'none'"));
    let (first_topic, second_topic) = (format!("{prefix}.{first}"), format!("{prefix}.{second}"));
    create_topic(&first_topic, 1);
    create_topic(&second_topic, 1);
    let slot = slot_of(&mut pg, &name);
    pg.batch_execute(&format!("INSERT INTO {first} SELECT generate_series(0, 999)")).unwrap();
    wait_for("the first rows published", TIMEOUT, || {
        read_events_with_kcat(&first_topic, 1000, Duration::from_secs(5)).len() >= 1000
    });

    // Brokers and options change while rows are written; then a table joins.
    pg.batch_execute(&format!(
        "SELECT kafka.alter_publication('{name}', brokers => '{}', options => '{{\"linger.ms\": \"20\"}}')",
        other_address()
    ))
    .unwrap();
    for chunk in 0..10 {
        let from = 1000 + chunk * 100;
        pg.batch_execute(&format!("INSERT INTO {first} SELECT generate_series({from}, {from} + 99)")).unwrap();
    }
    pg.batch_execute(&format!("SELECT kafka.alter_publication('{name}', add_tables => ARRAY['{second}']::regclass[])"))
        .unwrap();
    pg.batch_execute(&format!("INSERT INTO {second} SELECT generate_series(0, 499)")).unwrap();
    // Then the first table leaves, once what it had is published: its later rows are not.
    wait_for("the rows written so far published", TIMEOUT, || {
        read_events_with_kcat(&first_topic, 2000, Duration::from_secs(5)).len() >= 2000
            && read_events_with_kcat(&second_topic, 500, Duration::from_secs(5)).len() >= 500
    });
    pg.batch_execute(&format!("SELECT kafka.alter_publication('{name}', drop_tables => ARRAY['{first}']::regclass[])"))
        .unwrap();
    pg.batch_execute(&format!("INSERT INTO {first} SELECT generate_series(5000, 5099)")).unwrap();
    pg.batch_execute(&format!("INSERT INTO {second} SELECT generate_series(500, 599)")).unwrap();

    assert_eq!(ids_published(&second_topic, 600), once_each(0..600), "{}", publication_status(&mut pg, &name));
    assert_eq!(ids_published(&first_topic, 2000), once_each(0..2000));
    assert_eq!(slot_of(&mut pg, &name), slot, "the slot stays");
    let (brokers, linger, tables): (String, String, String) = {
        let row = pg
            .query_one(
                "SELECT brokers, options->>'linger.ms', tables::text FROM kafka.publications WHERE name = $1",
                &[&name],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((brokers, linger, tables), (other_address(), "20".into(), format!("{{{second}}}")));

    for (call, expected) in [
        (
            format!("SELECT kafka.alter_publication('{name}', drop_tables => ARRAY['{first}']::regclass[])"),
            "is not published",
        ),
        (
            format!("SELECT kafka.alter_publication('{name}', drop_tables => ARRAY['{second}']::regclass[])"),
            "at least one table",
        ),
        (
            format!("SELECT kafka.alter_publication('{name}', options => '{{\"transactional.id\": \"x\"}}')"),
            "transactional.id",
        ),
    ] {
        let error = pg.batch_execute(&call).unwrap_err();
        assert!(error.as_db_error().unwrap().message().contains(expected), "{call}: {error}");
    }
    drop_publication(&mut pg, &name);
}
