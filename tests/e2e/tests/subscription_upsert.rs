//! Kafka to PostgreSQL in upsert mode: the last message per key wins; a message without a
//! value (a tombstone) deletes its key's row.

use pg_kafka_bridge_e2e::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn rows(pg: &mut postgres::Client, table: &str) -> Vec<(i64, String)> {
    pg.query(&format!("SELECT id, v FROM {table} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn last_message_per_key_wins_and_tombstones_delete() {
    let mut pg = pg();
    let (topic, table, sub) =
        topic_and_table(&mut pg, "ups", 1, "id bigint PRIMARY KEY, v text NOT NULL, n int DEFAULT 7");
    create_subscription(&mut pg, &sub, &topic, &table, ", mode => 'upsert'");
    let p = producer();
    // One batch: updates and deletes of the same key in one go.
    p.send_json(&topic, None, "1", &json!({"id": 1, "v": "a"}));
    p.send_json(&topic, None, "2", &json!({"id": 2, "v": "b"}));
    p.send_json(&topic, None, "1", &json!({"id": 1, "v": "a2"}));
    p.send(&topic, None, Some(b"2"), None);
    p.send_json(&topic, None, "3", &json!({"id": 3, "v": "c"}));
    p.send(&topic, None, Some(br#"{"id": 3}"#), None);
    p.send_json(&topic, None, "3", &json!({"id": 3, "v": "c2"}));
    p.send_json(&topic, None, "4", &json!({"id": 4, "v": "d"}));
    p.flush();
    wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), 8, WAIT);
    assert_eq!(rows(&mut pg, &table), vec![(1, "a2".into()), (3, "c2".into()), (4, "d".into())]);
    // Later batches: a delete of an existing row, an update, a delete of a missing key.
    p.send(&topic, None, Some(b"4"), None);
    p.send_json(&topic, None, "1", &json!({"id": 1, "v": "a3"}));
    p.send(&topic, None, Some(b"99"), None);
    p.flush();
    wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), 11, WAIT);
    assert_eq!(rows(&mut pg, &table), vec![(1, "a3".into()), (3, "c2".into())]);
    let n: i32 = pg.query_one(&format!("SELECT n FROM {table} WHERE id = 1"), &[]).unwrap().get(0);
    assert_eq!(n, 7, "a column missing from the message keeps its default");
    // A row that breaks a constraint is a dead letter; the rest of its batch applies.
    p.send_json(&topic, None, "5", &json!({"id": 5}));
    p.send_json(&topic, None, "6", &json!({"id": 6, "v": "f"}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table} WHERE id = 6"), 1, WAIT);
    let error: String = pg
        .query_one(&format!("SELECT error FROM kafka.dead_letters WHERE subscription = '{sub}'"), &[])
        .unwrap()
        .get(0);
    assert!(error.contains("not-null"), "{error}");
    drop_subscription(&mut pg, &sub);
}

#[test]
fn upsert_on_chosen_key_columns() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(
        &mut pg,
        "upk",
        1,
        "id bigserial PRIMARY KEY, region text, code text, v text, UNIQUE (region, code)",
    );
    create_subscription(&mut pg, &sub, &topic, &table, ", mode => 'upsert', key_columns => ARRAY['region', 'code']");
    let p = producer();
    p.send_json(&topic, None, "x", &json!({"region": "eu", "code": "a", "v": "1"}));
    p.send_json(&topic, None, "x", &json!({"region": "us", "code": "a", "v": "2"}));
    p.send_json(&topic, None, "x", &json!({"region": "eu", "code": "a", "v": "3"}));
    p.send(&topic, None, Some(br#"{"region": "us", "code": "a"}"#), None);
    p.flush();
    wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), 4, WAIT);
    let got: Vec<(String, String, String)> = pg
        .query(&format!("SELECT region, code, v FROM {table} ORDER BY region"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![("eu".into(), "a".into(), "3".into())]);
    drop_subscription(&mut pg, &sub);
}

/// Staged values take their column's type in the upsert statement: fixed-width types keep
/// their width (`char(3)`, `bit(4)`), so keys that differ only after the first character
/// stay distinct and a tombstone deletes only its own key.
#[test]
fn upsert_keeps_fixed_width_keys_and_values_whole() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "upw", 1, "code char(3) PRIMARY KEY, flags bit(4), v text");
    create_subscription(&mut pg, &sub, &topic, &table, ", mode => 'upsert'");
    let p = producer();
    p.send_json(&topic, None, "abc", &json!({"code": "abc", "flags": "1010", "v": "1"}));
    p.send_json(&topic, None, "abd", &json!({"code": "abd", "flags": "0101", "v": "2"}));
    p.send_json(&topic, None, "abe", &json!({"code": "abe", "flags": "0011", "v": "3"}));
    p.send(&topic, None, Some(br#"{"code": "abd"}"#), None);
    p.flush();
    wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), 4, WAIT);
    let got: Vec<(String, String, String)> = pg
        .query(&format!("SELECT code, flags::text, v FROM {table} ORDER BY code"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![("abc".into(), "1010".into(), "1".into()), ("abe".into(), "0011".into(), "3".into())]);
    drop_subscription(&mut pg, &sub);
}
