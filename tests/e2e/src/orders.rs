//! The sample rows of the demo and the benchmark: orders of about 120 bytes as JSON, with
//! five columns (id bigint, customer text, amount numeric, created_at timestamptz, payload
//! jsonb), and the same rows as COPY text.

pub fn order_json(id: i64) -> String {
    let o = Order::new(id);
    format!(
        r#"{{"id":{id},"customer":"{}","amount":{},"created_at":"{}","payload":{}}}"#,
        o.customer, o.amount, o.created_at, o.payload
    )
}

pub fn order_copy_line(id: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    let o = Order::new(id);
    writeln!(out, "{id}\t{}\t{}\t{}\t{}", o.customer, o.amount, o.created_at, o.payload).unwrap();
}

struct Order {
    customer: String,
    amount: String,
    created_at: String,
    payload: String,
}

impl Order {
    fn new(id: i64) -> Order {
        Order {
            customer: format!("customer-{:05}", id % 50_000),
            amount: format!("{}.{:02}", id % 10_000, id % 100),
            created_at: format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + id % 28, id % 24, id % 60),
            payload: format!(r#"{{"sku":"SKU-{:06}","qty":{}}}"#, id % 1_000_000, 1 + id % 9),
        }
    }
}
