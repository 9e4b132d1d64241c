//! A real Kafka-protocol broker for the tests: tansu, started from an empty directory on a
//! free loopback port (in-memory storage, or SQLite where a test restarts it), with topic
//! creation, producing and reading back through rdkafka.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{free_port, signal, wait_for};

/// A message read back from a topic.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub partition: i32,
    pub key: String,
    pub payload: String,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    sqlite: bool,
    child: Option<Child>,
}

impl Broker {
    /// Starts tansu with in-memory storage (`sqlite: false`) or an SQLite file in its
    /// directory that survives restarts.
    pub fn start(sqlite: bool) -> Broker {
        let mut b = Broker {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            sqlite,
            child: None,
        };
        b.spawn();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = if self.sqlite {
            // Relative to the broker's working directory (its own directory).
            "sqlite://tansu.db".to_string()
        } else {
            "memory://tansu/".to_string()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("tansu")
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("tansu must be on PATH (scripts/test.sh installs it)");
        self.child = Some(child);
        let client: BaseConsumer = self.config().create().unwrap();
        wait_for(Duration::from_secs(60), "the broker to answer", || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tansu exited with {st}: {}", self.log());
            }
            client
                .fetch_metadata(None, Duration::from_secs(1))
                .ok()
                .map(|_| ())
        });
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers())
            .set("log_level", "3");
        c
    }

    /// Stops the broker (SIGKILL); `restart` brings it back on the same port and storage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn pause(&self) {
        signal(self.child.as_ref().unwrap(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.as_ref().unwrap(), "CONT");
    }

    pub fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(t, n)| NewTopic::new(t, *n, TopicReplication::Fixed(1)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .unwrap();
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => panic!("creating topic {t}: {e}"),
            }
        }
    }

    /// Produces (topic, key, payload, partition) messages and waits until all are
    /// acknowledged. One message per record batch, as services publishing one event at a
    /// time make them, and because tansu 0.6.0 answers a fetch from an offset inside a
    /// batch with the batches after it: a consumer resuming mid-batch would skip the rest.
    pub fn produce(&self, msgs: &[(&str, &str, &str, Option<i32>)]) {
        let p: BaseProducer = self
            .config()
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .set("acks", "all")
            .create()
            .unwrap();
        for (topic, key, payload, partition) in msgs {
            loop {
                let mut rec = BaseRecord::to(topic).key(*key).payload(*payload);
                if let Some(n) = partition {
                    rec = rec.partition(*n);
                }
                match p.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        p.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => panic!("producing to {topic}: {e}"),
                }
            }
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(120))
            .expect("all messages acknowledged");
    }

    /// Produces one message whose payload is any bytes (not UTF-8, say).
    pub fn produce_bytes(&self, topic: &str, payload: &[u8]) {
        let p: BaseProducer = self.config().set("acks", "all").create().unwrap();
        p.send(BaseRecord::<[u8], [u8]>::to(topic).payload(payload))
            .map_err(|(e, _)| e)
            .unwrap();
        p.flush(Duration::from_secs(60))
            .expect("the message acknowledged");
    }

    /// The number of partitions of a topic.
    pub fn partitions(&self, topic: &str) -> i32 {
        let c: BaseConsumer = self.config().create().unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0].partitions().len() as i32
    }

    /// Every message of a topic: read from the beginning until nothing more arrives for
    /// two seconds (tansu's high watermarks can trail what a fetch returns).
    pub fn read_all(&self, topic: &str, limit: Duration) -> Vec<Consumed> {
        self.read_until(topic, usize::MAX, limit, Some((0, Duration::from_secs(2))))
    }

    /// Every message of a topic expected to hold `expect`: read until one more than that
    /// arrived, or the topic stayed quiet for 2 s once `expect` had (or `limit` passed).
    pub fn read_settled(&self, topic: &str, expect: usize, limit: Duration) -> Vec<Consumed> {
        self.read_until(
            topic,
            expect + 1,
            limit,
            Some((expect, Duration::from_secs(2))),
        )
    }

    /// Every message of a topic, read from the beginning until `want` arrived or `limit`
    /// passed (a few more may follow; callers compare what they got).
    pub fn read(&self, topic: &str, want: usize, limit: Duration) -> Vec<Consumed> {
        self.read_until(topic, want, limit, None)
    }

    fn read_until(
        &self,
        topic: &str,
        want: usize,
        limit: Duration,
        // Stop once this many came and then nothing for that long.
        quiet: Option<(usize, Duration)>,
    ) -> Vec<Consumed> {
        let c: BaseConsumer = self
            .config()
            .set("enable.partition.eof", "false")
            .set("group.id", "sagawatch-test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions(topic) {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let end = std::time::Instant::now() + limit;
        let mut last = std::time::Instant::now();
        while out.len() < want && std::time::Instant::now() < end {
            if quiet.is_some_and(|(n, q)| out.len() >= n && last.elapsed() >= q) {
                break;
            }
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let text =
                        |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or(b"")).into_owned();
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| (x.key.to_string(), text(x.value)))
                                .collect()
                        })
                        .unwrap_or_default();
                    last = std::time::Instant::now();
                    out.push(Consumed {
                        partition: m.partition(),
                        key: text(m.key()),
                        payload: text(m.payload()),
                        headers,
                    });
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A paused broker must be woken to die cleanly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.stop();
    }
}
