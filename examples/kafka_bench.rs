//! The Kafka benchmark's helper (scripts/bench-kafka.sh): `produce BROKERS FILE LIMIT`
//! loads the first LIMIT lines of a checkout file into the topic `events` (3 partitions,
//! keyed by order id) and creates `saga-commands`; `raw BROKERS` reads the whole topic with a
//! plain rdkafka consumer in a fresh group — the practical limit sagawatch is compared to.

use std::io::BufRead;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};

fn config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn produce(brokers: &str, file: &str, limit: usize) {
    let admin: AdminClient<DefaultClientContext> = config(brokers).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let topics = [
        NewTopic::new("events", 3, TopicReplication::Fixed(1)),
        NewTopic::new("saga-commands", 3, TopicReplication::Fixed(1)),
    ];
    for r in rt
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .unwrap()
    {
        if let Err((t, e)) = r {
            assert_eq!(e, RDKafkaErrorCode::TopicAlreadyExists, "creating {t}");
        }
    }
    let p: BaseProducer = config(brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let f = std::io::BufReader::new(std::fs::File::open(file).unwrap());
    let mut n = 0;
    for line in f.lines().take(limit) {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let key = v["data"]["order_id"].as_str().unwrap_or("").to_string();
        loop {
            match p.send(BaseRecord::to("events").key(&key).payload(&line)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    p.poll(Duration::from_millis(20));
                }
                Err((e, _)) => panic!("{e}"),
            }
        }
        p.poll(Duration::ZERO);
        n += 1;
    }
    p.flush(Duration::from_secs(300)).unwrap();
    println!("{n}");
}

fn raw(brokers: &str) {
    let group = format!("raw-bench-{}", std::process::id());
    let c: BaseConsumer = config(brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let total: i64 = (0..3)
        .map(|p| {
            c.fetch_watermarks("events", p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum();
    c.subscribe(&["events"]).unwrap();
    let mut n = 0i64;
    let mut bytes = 0usize;
    let mut start = None;
    while n < total {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            bytes += m.payload().map(<[u8]>::len).unwrap_or(0);
            n += 1;
        }
    }
    let secs = start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
    println!("{n} {secs:.3} {bytes}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("produce") => produce(&args[2], &args[3], args[4].parse().unwrap()),
        Some("raw") => raw(&args[2]),
        _ => eprintln!("usage: kafka_bench produce BROKERS FILE LIMIT | raw BROKERS"),
    }
}
