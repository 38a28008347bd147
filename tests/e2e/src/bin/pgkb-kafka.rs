//! A small Kafka command-line tool for the demo and the benchmarks.
//!
//!   pgkb-kafka create-topic TOPIC PARTITIONS
//!   pgkb-kafka produce-orders TOPIC COUNT [FIRST_ID]
//!   pgkb-kafka count TOPIC          messages a read_committed consumer sees
//!
//! Orders are JSON objects of about 120 bytes with five fields (id bigint, customer text,
//! amount numeric, created_at timestamptz, payload jsonb), keyed by id.

use pg_kafka_bridge_e2e::{consume_all, create_topic, orders, producer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["create-topic", topic, partitions] => create_topic(topic, partitions.parse().expect("PARTITIONS is a number")),
        ["produce-orders", topic, count] => produce_orders(topic, count.parse().expect("COUNT is a number"), 0),
        ["produce-orders", topic, count, first] => produce_orders(
            topic,
            count.parse().expect("COUNT is a number"),
            first.parse().expect("FIRST_ID is a number"),
        ),
        ["count", topic] => println!("{}", consume_all(topic, 0, std::time::Duration::from_secs(10)).len()),
        _ => {
            eprintln!("usage: pgkb-kafka create-topic TOPIC PARTITIONS | produce-orders TOPIC COUNT [FIRST_ID]");
            std::process::exit(2);
        }
    }
}

fn produce_orders(topic: &str, count: i64, first: i64) {
    let p = producer();
    for id in first..first + count {
        p.send(topic, None, Some(id.to_string().as_bytes()), Some(orders::order_json(id).as_bytes()));
    }
    p.flush();
    println!("produced {count} orders to {topic}");
}
