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
-- Slot names carry the database's OID; shown here as <db>.
CREATE FUNCTION slot_shown(slot text) RETURNS text LANGUAGE sql AS
  $$ SELECT replace(slot, (SELECT oid::text FROM pg_database WHERE datname = current_database()), '<db>') $$;
CREATE FUNCTION wait_for_slots(expected int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE n int;
BEGIN
  FOR i IN 1..300 LOOP
    SELECT count(*) INTO n FROM pg_replication_slots WHERE database = current_database();
    EXIT WHEN n = expected;
    PERFORM pg_sleep(0.1);
  END LOOP;
  RETURN n;
END $$;

-- Bad arguments: each error names the problem.
SELECT kafka.create_publication('Bad-Name', 'b:9092', ARRAY['items']::regclass[]);
SELECT kafka.create_publication('p', ' ', ARRAY['items']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY[]::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['no_key']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['unlogged_items']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items_view']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['pg_class']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['no_such_table']::regclass[]);
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], topic => 'cdc {table}');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], progress_topic => 'a/b');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], options => '{"transactional.id": "x"}');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], options => '{"no.such": "1"}');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], on_event_error => 'ignore');
SELECT kafka.create_publication('p', 'b:9092', ARRAY['items']::regclass[], snapshot => 'all');
SELECT kafka.snapshot('nope');
SELECT kafka.start_publication('nope');
SELECT kafka.drop_publication('nope');
SELECT kafka.send('nope', 'notes', 'k', 'v');

-- Slots are not transactional, but follow the catalog: the slot of a create that rolled back
-- is dropped (by the launcher; a new create waits for that), and a slot of the name that no
-- publication made is never touched.
BEGIN;
SELECT kafka.create_publication('items_out', 'b:9092', ARRAY['items']::regclass[]);
ROLLBACK;
SELECT slot_shown(slot_name) FROM pg_create_logical_replication_slot(
  'pg_kafka_bridge_' || (SELECT oid FROM pg_database WHERE datname = current_database()) || '_other', 'pgoutput');
DO $$
BEGIN
  PERFORM kafka.create_publication('other', 'b:9092', ARRAY['items']::regclass[]);
EXCEPTION WHEN object_not_in_prerequisite_state THEN
  RAISE NOTICE '%', slot_shown(SQLERRM);
END $$;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'pg_kafka_bridge_%_other';

-- A good publication, its catalog row and its slot.
SELECT kafka.create_publication('items_out', 'b:9092', ARRAY['items', 'by_index', 'items']::regclass[],
                                options => '{"sasl.password": "secret"}');
SELECT kafka.create_publication('items_out', 'b:9092', ARRAY['items']::regclass[]);
SELECT name, tables, topic, progress_topic, slot_shown(slot_name), options, enabled, snapshot FROM kafka.publications;
-- Its tables are empty: their snapshots are done at once. A requested run waits for the
-- worker (which runs in another database).
SELECT publication, "table", run, state, rows, rows_per_second FROM kafka.publication_snapshots;
SELECT kafka.snapshot('items_out', ARRAY['not_published']::regclass[]);
SELECT kafka.snapshot('items_out', ARRAY['by_index']::regclass[]);
SELECT publication, "table", run, state FROM kafka.publication_snapshots;
SELECT slot_shown(slot_name), plugin, slot_type FROM pg_replication_slots
 WHERE database = current_database();
-- Workers run in database "postgres" only (pg_kafka_bridge.database).
SELECT publication, pid, state, slot_shown(slot), last_error FROM kafka.publication_status;
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
TRUNCATE by_index, not_published;
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
  FROM pg_logical_slot_peek_changes((SELECT slot_name FROM kafka.publications WHERE name = 'items_out'), NULL, NULL);
-- Positions (commit LSN, seq) grow strictly in the order the events come, and commit times
-- are UTC timestamps.
WITH events AS (
  SELECT n, (data::jsonb #>> '{value,source,lsn}')::numeric AS lsn, (data::jsonb #>> '{value,source,seq}')::int AS seq,
         data::jsonb #>> '{value,source,commit_time}' AS commit_time
    FROM pg_logical_slot_peek_changes((SELECT slot_name FROM kafka.publications WHERE name = 'items_out'), NULL, NULL)
         WITH ORDINALITY AS c(lsn, xid, data, n)
   WHERE data::jsonb ? 'value' AND jsonb_typeof(data::jsonb -> 'value') = 'object')
SELECT count(*) AS events,
       bool_and(previous_lsn IS NULL OR (lsn, seq) > (previous_lsn, previous_seq)) AS positions_grow,
       bool_and(commit_time ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$') AS utc
  FROM (SELECT *, lag(lsn) OVER (ORDER BY n) AS previous_lsn, lag(seq) OVER (ORDER BY n) AS previous_seq
          FROM events) e;

-- Privileges: management functions and kafka.send are not for PUBLIC; other roles see
-- neither the secrets nor can they send through another's publication.
CREATE ROLE pub_stranger;
SET ROLE pub_stranger;
SELECT kafka.create_publication('mine', 'b:9092', ARRAY['items']::regclass[]);
SELECT kafka.snapshot('items_out');
SELECT kafka.send('items_out', 'notes', 'k', 'v');
SELECT name, options FROM kafka.publications;
RESET ROLE;
GRANT EXECUTE ON FUNCTION kafka.send(text, text, text, text), kafka.stop_publication(text),
    kafka.snapshot(text, oid[]) TO pub_stranger;
SET ROLE pub_stranger;
SELECT kafka.send('items_out', 'notes', 'k', 'v');
SELECT kafka.stop_publication('items_out');
SELECT kafka.snapshot('items_out');
RESET ROLE;
REVOKE EXECUTE ON FUNCTION kafka.send(text, text, text, text), kafka.stop_publication(text),
    kafka.snapshot(text, oid[]) FROM pub_stranger;

-- A role allowed to manage Kafka objects, but not a superuser: it cannot publish rows that
-- row-level security hides from it, nor set options that reach the server's files, loader
-- or programs. Each error names the option and why.
CREATE ROLE kafka_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kafka TO kafka_admin;
GRANT CREATE ON SCHEMA public TO kafka_admin;
CREATE TABLE rls_items (id int PRIMARY KEY, who text);
ALTER TABLE rls_items ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON rls_items USING (who = current_user);
GRANT SELECT ON rls_items, items TO kafka_admin;
SET ROLE kafka_admin;
SELECT kafka.create_publication('hidden', 'b:9092', ARRAY['rls_items']::regclass[]);
SELECT kafka.create_publication('files', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"ssl.key.location": "/etc/ssl/private/ssl-cert-snakeoil.key"}');
SELECT kafka.create_publication('loader', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"plugin.library.paths": "/tmp/not_loaded"}');
SELECT kafka.create_publication('engine', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"ssl.engine.location": "/tmp/not_loaded.so"}');
SELECT kafka.create_publication('krb', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"sasl.kerberos.kinit.cmd": "touch /tmp/pwned"}');
SELECT kafka.create_publication('krb', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"sasl.mechanisms": "GSSAPI"}');
SELECT kafka.create_publication('krb', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"security.protocol": "sasl_ssl"}');
SELECT kafka.create_publication('cb', 'b:9092', ARRAY['items']::regclass[], options => '{"dr_msg_cb": "1"}');
SELECT kafka.subscription_worker_status();
RESET ROLE;
-- Members of pg_read_server_files may name server files.
GRANT pg_read_server_files TO kafka_admin;
SET ROLE kafka_admin;
SELECT kafka.create_publication('files', 'b:9092', ARRAY['items']::regclass[],
                                options => '{"ssl.ca.location": "/etc/ssl/certs"}');
SELECT kafka.drop_publication('files');
RESET ROLE;
REVOKE pg_read_server_files FROM kafka_admin;
-- The table's owner bypasses its row-level security, and may publish it.
ALTER TABLE rls_items OWNER TO kafka_admin;
SET ROLE kafka_admin;
SELECT kafka.create_publication('own_rls', 'b:9092', ARRAY['rls_items']::regclass[]);
SELECT kafka.drop_publication('own_rls');
RESET ROLE;
DROP TABLE rls_items;
REVOKE SELECT ON items FROM kafka_admin;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA kafka FROM kafka_admin;
REVOKE CREATE ON SCHEMA public FROM kafka_admin;
DROP ROLE kafka_admin;

-- Stop, start, drop: the slot goes with the publication, once the drop commits; a drop that
-- rolls back keeps both.
SELECT kafka.stop_publication('items_out');
SELECT publication, state FROM kafka.publication_status;
SELECT kafka.start_publication('items_out');
BEGIN;
SELECT kafka.drop_publication('items_out');
ROLLBACK;
BEGIN;
SAVEPOINT before_drop;
SELECT kafka.drop_publication('items_out');
ROLLBACK TO SAVEPOINT before_drop;
COMMIT;
SELECT pg_sleep(0.5);
SELECT name FROM kafka.publications;
SELECT wait_for_slots(1) AS slots;
SELECT kafka.drop_publication('items_out');
SELECT count(*) AS publications FROM kafka.publications;
SELECT wait_for_slots(0) AS slots;
DROP ROLE pub_stranger;
DROP EXTENSION pg_kafka_bridge CASCADE;
