-- The SQL surface of publications as a user sees it: argument checks, the catalog views,
-- the slot, and the events the output plugin makes of changes and kafka.send() (read here
-- with pg_logical_slot_peek_changes, since no worker runs in this database).
CREATE EXTENSION pg_kafka_bridge;
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], doc jsonb,
                    ok boolean, ratio float8, at timestamptz, big text);
CREATE TABLE by_index (a int NOT NULL, b text);
CREATE UNIQUE INDEX by_index_a ON by_index (a);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_a;
CREATE TABLE not_published (id int PRIMARY KEY);
CREATE TABLE no_key (a int);
CREATE UNLOGGED TABLE unlogged_items (id int PRIMARY KEY);
CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
CREATE VIEW items_view AS SELECT * FROM items;

-- Bad arguments: each error names the problem.
SELECT kafka.create_publication('Bad-Name', 'b:9092', ARRAY['items']::regclass[]);
SELECT kafka.create_publication('p', ' ', ARRAY['items']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY[]::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['no_key']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['unlogged_items']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['parted']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items_view']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['pg_class']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['no_such_table']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], topic => 'cdc {table}');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], progress_topic => 'a/b');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], options => '{"transactional.id": "x"}');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], options => '{"no.such": "1"}');
SELECT kafka.start_publication('nope');
SELECT kafka.drop_publication('nope');
SELECT kafka.send('nope', 'notes', 'k', 'v');

-- Slots are not transactional: a slot of the publication's name left by a create that rolled
-- back is replaced; a slot of that name from something else is not touched.
SELECT slot_name FROM pg_create_logical_replication_slot('pg_kafka_bridge_items_out', 'pg_kafka_bridge');
SELECT slot_name FROM pg_create_logical_replication_slot('pg_kafka_bridge_other', 'test_decoding');
SELECT kafka.create_publication('other', 'b:9092', ARRAY['items']::regclass[]);
SELECT pg_drop_replication_slot('pg_kafka_bridge_other');

-- A good publication, its catalog row and its slot.
SELECT kafka.create_publication('items_out', 'b:9092', ARRAY['items', 'by_index', 'items']::regclass[],
                                options => '{"sasl.password": "secret"}');
SELECT kafka.create_publication('items_out', 'b:9092', ARRAY['items']::regclass[]);
SELECT name, tables, topic, progress_topic, slot_name, options, enabled FROM kafka.publications;
SELECT slot_name, plugin, slot_type FROM pg_replication_slots WHERE database = current_database();
-- Workers run in database "postgres" only (pg_kafka_bridge.database).
SELECT publication, pid, state, slot, last_error FROM kafka.publication_status;
SELECT kafka.send('items_out', 'bad topic!', 'k', 'v');

-- Changes and messages, then the events they make.
INSERT INTO items VALUES (1, 'pen', 1.50, '{a,b}', '{"x": [1, 2]}', true, 0.25, '2026-01-02 03:04:05+00',
                          (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i));
INSERT INTO items (id, name, price, ratio) VALUES (2, E'quote " and \\ and \u00e9', 'NaN', '-Infinity');
UPDATE items SET name = 'fountain pen' WHERE id = 1;
UPDATE items SET id = 3 WHERE id = 2;
DELETE FROM items WHERE id = 3;
INSERT INTO by_index VALUES (7, 'seven');
DELETE FROM by_index;
INSERT INTO not_published VALUES (1);
BEGIN;
SELECT kafka.send('items_out', 'notes', 'k1', 'rolled back');
ROLLBACK;
BEGIN;
INSERT INTO items (id, name) VALUES (4, 'in a transaction with a message');
SELECT kafka.send('items_out', 'notes', 'k2', 'committed');
SELECT kafka.send('items_out', 'notes', NULL, '\x00ff'::bytea);
COMMIT;
SELECT data::jsonb #- '{value,source,lsn}' #- '{value,source,txid}' #- '{value,source,commit_time}'
                   #- '{value,after,big}' AS event,
       length(data::jsonb #>> '{value,after,big}') AS big
  FROM pg_logical_slot_peek_changes('pg_kafka_bridge_items_out', NULL, NULL);
-- Positions grow with commit order, and commit times are UTC timestamps.
SELECT count(*) AS events,
       bool_and((data::jsonb #>> '{value,source,commit_time}') ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$') AS utc
  FROM pg_logical_slot_peek_changes('pg_kafka_bridge_items_out', NULL, NULL)
 WHERE data::jsonb ? 'value' AND jsonb_typeof(data::jsonb -> 'value') = 'object';

-- Privileges: management functions and kafka.send are not for PUBLIC; other roles see
-- neither the secrets nor can they send through another's publication.
CREATE ROLE pub_stranger;
SET ROLE pub_stranger;
SELECT kafka.create_publication('mine', 'b:9092', ARRAY['items']::regclass[]);
SELECT kafka.send('items_out', 'notes', 'k', 'v');
SELECT name, options FROM kafka.publications;
RESET ROLE;
GRANT EXECUTE ON FUNCTION kafka.send(text, text, text, text), kafka.stop_publication(text) TO pub_stranger;
SET ROLE pub_stranger;
SELECT kafka.send('items_out', 'notes', 'k', 'v');
SELECT kafka.stop_publication('items_out');
RESET ROLE;
REVOKE EXECUTE ON FUNCTION kafka.send(text, text, text, text), kafka.stop_publication(text) FROM pub_stranger;

-- Stop, start, drop: the slot goes with the publication.
SELECT kafka.stop_publication('items_out');
SELECT publication, state FROM kafka.publication_status;
SELECT kafka.start_publication('items_out');
SELECT kafka.drop_publication('items_out');
SELECT count(*) AS publications FROM kafka.publications;
SELECT count(*) AS slots FROM pg_replication_slots WHERE database = current_database();
DROP ROLE pub_stranger;
DROP EXTENSION pg_kafka_bridge CASCADE;
