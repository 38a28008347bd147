use super::*;

fn col(name: &str, kind: ValueKind) -> ColumnInfo {
    ColumnInfo { name: name.into(), kind }
}

fn msg<'a>(offset: i64, key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Message<'a> {
    Message { topic: "t", partition: 3, offset, key, payload, timestamp_ms: Some(0), headers: vec![] }
}

fn lines(batch: &EncodedBatch) -> Vec<String> {
    String::from_utf8(batch.buf.clone()).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn json_object_maps_keys_and_metadata() {
    let shape = TargetShape::new(
        vec![
            col("id", ValueKind::Other),
            col("tags", ValueKind::Array),
            col("doc", ValueKind::Json),
            col("_kafka_offset", ValueKind::Other),
            col("_kafka_key", ValueKind::Bytea),
        ],
        Format::Json,
        Mode::Insert,
        &[],
    )
    .unwrap();
    let mut b = EncodedBatch::default();
    b.push(
        &shape,
        0,
        &msg(7, Some(b"k"), Some(br#"{"id": 5, "tags": ["a", null], "doc": {"x": "y\tz"}, "other": 1}"#)),
    );
    b.push(&shape, 1, &msg(8, None, Some(br#"{"id": "six"}"#)));
    assert!(b.rejected.is_empty(), "{:?}", b.rejected);
    assert_eq!(lines(&b), vec![r#"5	{"a",NULL}	{"x": "y\\tz"}	7	\\x6b"#, "six\t8\t\\N"]);
    assert_eq!(b.runs(0..2), vec![0..1, 1..2]);
    assert_eq!(b.column_names(&shape, 0), vec!["id", "tags", "doc", "_kafka_offset", "_kafka_key"]);
    assert_eq!(b.column_names(&shape, 1), vec!["id", "_kafka_offset", "_kafka_key"]);
    assert_eq!(b.text(1..2), b"six\t8\t\\N\n");
}

#[test]
fn bad_messages_are_rejected_with_reasons() {
    let shape = TargetShape::new(vec![col("name", ValueKind::Other)], Format::Json, Mode::Insert, &[]).unwrap();
    let mut b = EncodedBatch::default();
    b.push(&shape, 0, &msg(0, None, Some(b"not json")));
    b.push(&shape, 1, &msg(1, None, Some(b"[1,2]")));
    b.push(&shape, 2, &msg(2, None, Some(br#"{"name": "a\u0000b"}"#)));
    b.push(&shape, 3, &msg(3, None, None));
    b.push(&shape, 4, &msg(4, None, Some(br#"{"name": "ok"}"#)));
    let errors: Vec<&str> = b.rejected.iter().map(|r| r.error.as_str()).collect();
    assert!(errors[0].starts_with("invalid JSON message"), "{errors:?}");
    assert!(errors[1].contains("expected a JSON object"), "{errors:?}");
    assert!(errors[2].contains("NUL"), "{errors:?}");
    assert!(errors[3].contains("tombstone"), "{errors:?}");
    assert_eq!(b.rows.len(), 1);
    assert_eq!(b.rows[0].message, 4);
    assert_eq!(lines(&b), vec!["ok"]);
}

#[test]
fn single_json_column_takes_whole_payload() {
    let shape = TargetShape::new(
        vec![col("doc", ValueKind::Json), col("_kafka_partition", ValueKind::Other)],
        Format::Json,
        Mode::Insert,
        &[],
    )
    .unwrap();
    let mut b = EncodedBatch::default();
    b.push(&shape, 0, &msg(0, None, Some(b"[1,\n2]")));
    b.push(&shape, 1, &msg(1, None, Some(b"{bad")));
    assert_eq!(lines(&b), vec!["[1,\\n2]\t3"]);
    assert_eq!(b.rejected.len(), 1);
}

#[test]
fn text_and_bytea_formats() {
    let text = TargetShape::new(
        vec![col("id", ValueKind::Other), col("payload", ValueKind::Other)],
        Format::Text,
        Mode::Insert,
        &[],
    )
    .unwrap();
    let mut b = EncodedBatch::default();
    b.push(&text, 0, &msg(0, None, Some(b"hello\\world")));
    b.push(&text, 1, &msg(1, None, Some(&[0xff, 0xfe])));
    assert_eq!(lines(&b), vec!["hello\\\\world"]);
    assert!(b.rejected[0].error.contains("UTF-8"));

    assert!(TargetShape::new(vec![col("payload", ValueKind::Other)], Format::Bytea, Mode::Insert, &[]).is_err());
    let bytea = TargetShape::new(vec![col("body", ValueKind::Bytea)], Format::Bytea, Mode::Insert, &[]).unwrap();
    let mut b = EncodedBatch::default();
    b.push(&bytea, 0, &msg(0, None, Some(&[0, 1])));
    assert_eq!(lines(&b), vec!["\\\\x0001"]);
}

#[test]
fn upsert_rows_carry_ordinal_and_tombstones_take_keys() {
    let shape = TargetShape::new(
        vec![col("id", ValueKind::Other), col("v", ValueKind::Other)],
        Format::Json,
        Mode::Upsert,
        &["id".to_string()],
    )
    .unwrap();
    let mut b = EncodedBatch::default();
    b.push(&shape, 0, &msg(0, Some(b"1"), Some(br#"{"v": "x"}"#)));
    b.push(&shape, 1, &msg(1, Some(b"42"), None));
    b.push(&shape, 2, &msg(2, Some(br#"{"id": 7}"#), None));
    b.push(&shape, 3, &msg(3, Some(b"plain"), None));
    b.push(&shape, 4, &msg(4, None, None));
    assert_eq!(lines(&b), vec!["\\N\tx\t0\tf", "42\t1\tt", "7\t2\tt", "plain\t3\tt"]);
    assert_eq!(b.column_names(&shape, 1), vec!["id"]);
    assert_eq!(b.rejected.len(), 1);
}

#[test]
fn shape_errors_name_the_problem() {
    let only_meta = TargetShape::new(vec![col("_kafka_offset", ValueKind::Other)], Format::Json, Mode::Insert, &[]);
    assert!(only_meta.unwrap_err().contains("no column"));
    let two =
        TargetShape::new(vec![col("a", ValueKind::Other), col("b", ValueKind::Other)], Format::Text, Mode::Insert, &[]);
    assert!(two.unwrap_err().contains("payload"));
    let no_key = TargetShape::new(vec![col("a", ValueKind::Other)], Format::Json, Mode::Upsert, &[]);
    assert!(no_key.unwrap_err().contains("key"));
    let bad_key = TargetShape::new(vec![col("a", ValueKind::Other)], Format::Json, Mode::Upsert, &["zz".into()]);
    assert!(bad_key.unwrap_err().contains("\"zz\""));
}

#[test]
fn change_events_upsert_their_after_row_and_delete_by_key() {
    let columns = vec![col("id", ValueKind::Other), col("name", ValueKind::Other)];
    let shape = TargetShape::new(columns.clone(), Format::Change, Mode::Upsert, &["id".into()]).unwrap();
    let mut b = EncodedBatch::default();
    let source = r#""source": {"lsn": 1, "seq": 0}"#;
    let insert = format!(r#"{{"op": "c", "before": null, "after": {{"id": 1, "name": "pen"}}, {source}}}"#);
    let update = r#"{"op": "u", "before": {"id": 1}, "after": {"id": 1}, "unchanged_toast": ["name"]}"#;
    let delete = r#"{"op": "d", "before": {"id": 1}, "after": null}"#;
    b.push(&shape, 0, &msg(0, Some(br#"{"id": 1}"#), Some(insert.as_bytes())));
    b.push(&shape, 1, &msg(1, Some(br#"{"id": 1}"#), Some(update.as_bytes())));
    b.push(&shape, 2, &msg(2, Some(br#"{"id": 1}"#), Some(delete.as_bytes())));
    b.push(&shape, 3, &msg(3, Some(br#"{"id": 2}"#), Some(br#"{"op": "x", "after": {}}"#)));
    b.push(&shape, 4, &msg(4, Some(br#"{"id": 2}"#), Some(br#"{"op": "c", "after": null}"#)));
    b.push(&shape, 5, &msg(5, Some(br#"{"id": 2}"#), Some(b"[1]")));
    b.push(&shape, 6, &msg(6, None, Some(br#"{"op": "t", "before": null, "after": null}"#)));
    b.push(&shape, 7, &msg(7, Some(br#"{"id": 3}"#), Some(br#"{"op": "r", "after": {"id": 3}}"#)));
    assert_eq!(lines(&b), vec!["1\tpen\t0\tf", "1\t1\tf", "1\t2\tt", "3\t7\tf"]);
    // The TRUNCATE is a run of its own between the rows before and after it.
    let truncates: Vec<bool> = b.rows.iter().map(|r| r.is_truncate()).collect();
    assert_eq!(truncates, vec![false, false, false, true, false]);
    assert_eq!(b.runs(0..5).len(), 4);
    // An update that leaves a column out leaves that column as it is.
    assert_eq!(b.column_names(&shape, 1), vec!["id"]);
    let errors: Vec<_> = b.rejected.iter().map(|r| (r.message, r.error.as_str())).collect();
    assert_eq!(errors[0], (3, "change event has unknown op \"x\""));
    assert_eq!(errors[1], (4, "change event has no \"after\" row"));
    assert!(errors[2].1.starts_with("invalid change event"), "{errors:?}");
    let insert_mode = TargetShape::new(columns, Format::Change, Mode::Insert, &[]).unwrap_err();
    assert_eq!(insert_mode, "format 'change' needs mode 'upsert': change events update and delete rows");
}
