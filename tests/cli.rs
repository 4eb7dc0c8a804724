//! The binary's commands end to end: simulate a day, replay it, read the summary.

use crate::support::{labels, passflow, small_day};

fn summary_value(summary: &str, key: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| l.trim().strip_prefix(key).map(|rest| rest.trim().parse::<u64>().unwrap_or(u64::MAX)))
        .unwrap_or_else(|| panic!("no `{key}` in\n{summary}"))
}

#[test]
fn simulate_writes_a_city_folder_passes_and_labels() {
    let dir = small_day();
    for file in ["checkpoints.csv", "segments.csv", "regions.csv", "restrictions.toml", "passes.jsonl", "labels.json"] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let l = labels(dir);
    let lines = std::fs::read_to_string(dir.join("passes.jsonl")).unwrap().lines().count() as u64;
    assert_eq!(lines, l.records);
}

#[test]
fn replay_summarises_records_duplicates_and_dead_letters_as_labelled() {
    let dir = small_day();
    let db = tempfile::tempdir().unwrap();
    let out = passflow()
        .args(["replay", "--city"])
        .arg(dir)
        .arg("--input")
        .arg(dir.join("passes.jsonl"))
        .arg("--store")
        .arg(format!("sqlite://{}", db.path().join("r.db").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8(out.stdout).unwrap();
    let l = labels(dir);
    assert_eq!(summary_value(&summary, "records"), l.records);
    assert_eq!(summary_value(&summary, "valid"), l.valid_passes);
    assert_eq!(summary_value(&summary, "duplicates"), l.identical_duplicates);
    assert_eq!(summary_value(&summary, "dead letters"), l.dead_letters.values().sum::<u64>());
    for (reason, n) in &l.dead_letters {
        assert_eq!(summary_value(&summary, reason), *n, "{reason}");
    }
    assert!(summary.contains("passes/s"));
}

#[test]
fn replay_reads_standard_input_and_judges_the_future_against_now() {
    let dir = small_day();
    let input = r#"{"pass_id":"a","plate":"赣A12345","plate_color":2,"plate_type":"02","checkpoint_id":"KK0001","direction":2,"lane":1,"ts":"2026-03-02 08:00:00"}
{"pass_id":"b","plate":"赣A12345","plate_color":2,"plate_type":"02","checkpoint_id":"KK0001","direction":2,"lane":1,"ts":"2026-03-02 09:00:00"}
not json
"#;
    let mut child = passflow()
        .args(["replay", "--store", "null://", "--now", "2026-03-02 08:30:00", "--input", "-", "--city"])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary = String::from_utf8(out.stdout).unwrap();
    assert_eq!(summary_value(&summary, "records"), 3);
    assert_eq!(summary_value(&summary, "valid"), 1);
    assert_eq!(summary_value(&summary, "future_timestamp"), 1);
    assert_eq!(summary_value(&summary, "malformed_json"), 1);
}

#[test]
fn bad_arguments_and_a_broken_city_give_clear_errors() {
    let out = passflow().args(["replay", "--input", "/nonexistent.jsonl", "--store", "null://"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.jsonl"));
    let out = passflow().args(["replay", "--input", "-", "--store", "postgres://x"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected sqlite://PATH"));
    let out = passflow().args(["replay", "--input", "-", "--city", "/nonexistent-city"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-city/regions.csv"));
}

/// A stop waits `core.stop_timeout` for the pipeline's last checkpoint. A pipeline held by a
/// dependency that never answers (here a first-entry Redis nothing listens for) is left, and
/// the process exits with an error that says so, rather than hanging.
#[test]
fn a_stop_held_up_by_a_dependency_exits_after_the_stop_timeout() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let in_dir = |name: &str| dir.path().join(name);
    let mut child = passflow()
        .arg("run")
        .env("PASSFLOW__API__LISTEN", "127.0.0.1:0")
        .env("PASSFLOW__STORE__URL", format!("sqlite://{}", in_dir("passflow.db").display()))
        .env("PASSFLOW__STATE__DIR", in_dir("state"))
        .env("PASSFLOW__ARCHIVE__DIR", in_dir("archive"))
        .env("PASSFLOW__API__AUDIT_LOG", in_dir("audit.log"))
        .env("PASSFLOW__WEBHOOKS__QUEUE", in_dir("webhooks.db"))
        .env("PASSFLOW__PIPELINES__WATCHLIST_FILE", in_dir("watchlist.csv"))
        // Hours of a day a second: the day's traffic comes soon whatever the hour now.
        .env("PASSFLOW__SOURCE__SIMULATOR__VEHICLES", "20000")
        .env("PASSFLOW__SOURCE__SIMULATOR__SPEED", "20000")
        .env("PASSFLOW__PIPELINES__ENABLED", "[first_entry]")
        .env("PASSFLOW__PIPELINES__FIRST_ENTRY__STORE", format!("redis://127.0.0.1:{closed_port}"))
        .env("PASSFLOW__CORE__STOP_TIMEOUT", "2s")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("first-entry store (Redis) failed")) {
        match log.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("the pipeline never offered a first entry:\n{}", seen.join("\n")),
        }
    }
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(stopped.elapsed() < Duration::from_secs(30), "still running 30 s after the stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The rest of what it wrote, to the end of its output.
    while let Ok(line) = log.recv_timeout(Duration::from_secs(5)) {
        seen.push(line);
    }
    assert!(!status.success(), "{status}");
    let said = seen.iter().any(|l| l.contains("did not stop within 2s (core.stop_timeout)"));
    assert!(said, "no word of the task left behind:\n{}", seen.join("\n"));
}
