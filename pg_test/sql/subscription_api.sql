-- The SQL surface of subscriptions as a user sees it: argument checks, the catalog views,
-- privileges. Runs in a database where no worker runs (pg_kafka_bridge.database names
-- another), so nothing here touches Kafka.
CREATE EXTENSION IF NOT EXISTS pg_kafka_bridge;
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2), _kafka_offset bigint);

-- Bad arguments: each error names the problem.
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', format => 'avro');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', mode => 'merge');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', workers => 0);
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', batch_size => 0);
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', start_from => 'middle');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', options => '"x"');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', options => '{"fetch.min.bytes": 1}');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', options => '{"no.such": "1"}');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', options => '{"enable.auto.commit": "true"}');
SELECT kafka.create_subscription('s', 'b:9092', 'bad topic!', 'orders');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'no_such_table');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', format => 'bytea');
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', key_columns => ARRAY['id']);
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders', mode => 'upsert', key_columns => ARRAY['customer']);
CREATE VIEW orders_view AS SELECT * FROM orders;
SELECT kafka.create_subscription('s', 'b:9092', 'orders', 'orders_view');
SELECT kafka.stop_subscription('nope');
SELECT kafka.drop_subscription('nope');

-- A good subscription and what the catalog shows of it.
SELECT kafka.create_subscription('orders_in', 'b:9092', 'orders', 'orders',
                                 options => '{"sasl.password": "secret", "client.rack": "r1"}');
SELECT kafka.create_subscription('orders_in', 'b:9092', 'orders', 'orders');
SELECT name, owner, brokers, topic, target, format, mode, key_columns, start_from, batch_size,
       batch_timeout_ms, workers, options, enabled
  FROM kafka.subscriptions;
SELECT subscription, state, topic, partition, next_offset FROM kafka.subscription_status;
SELECT kafka.stop_subscription('orders_in');
SELECT name, enabled FROM kafka.subscriptions;
SELECT subscription, state FROM kafka.subscription_status;
SELECT kafka.start_subscription('orders_in');
SELECT name, enabled FROM kafka.subscriptions;

-- A stored position (as a worker would store it): its owner sees it.
INSERT INTO kafka.offsets (subscription_id, subscription, topic, partition, next_offset)
SELECT id, name, topic, 0, 42 FROM kafka.subscription_catalog WHERE name = 'orders_in';
SELECT subscription, partition, next_offset FROM kafka.offsets;

-- Another role: cannot manage subscriptions, sees no secrets, sees no other's offsets.
CREATE ROLE regress_kafka_user;
SET ROLE regress_kafka_user;
SELECT kafka.create_subscription('mine', 'b:9092', 'orders', 'orders');
SELECT kafka.stop_subscription('orders_in');
SELECT name, options FROM kafka.subscriptions;
SELECT options FROM kafka.subscription_catalog;
SELECT count(*) FROM kafka.offsets;
RESET ROLE;

-- Granted the functions, a role still needs the right to write the table.
GRANT EXECUTE ON FUNCTION kafka.create_subscription, kafka.stop_subscription TO regress_kafka_user;
SET ROLE regress_kafka_user;
SELECT kafka.create_subscription('mine', 'b:9092', 'orders', 'orders');
SELECT kafka.stop_subscription('orders_in');
RESET ROLE;
GRANT INSERT ON orders TO regress_kafka_user;
SET ROLE regress_kafka_user;
SELECT kafka.create_subscription('mine', 'b:9092', 'orders', 'orders');
SELECT name, owner FROM kafka.subscriptions ORDER BY name;
RESET ROLE;

SELECT kafka.drop_subscription('mine');
SELECT kafka.drop_subscription('orders_in');
SELECT count(*) FROM kafka.subscriptions;
DROP VIEW orders_view;
DROP TABLE orders;
REVOKE ALL ON FUNCTION kafka.create_subscription, kafka.stop_subscription FROM regress_kafka_user;
DROP ROLE regress_kafka_user;
