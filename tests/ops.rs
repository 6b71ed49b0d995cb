//! Issue 26 item 3: what operators get in `deploy/` works with the running server: the alert
//! rules pass `promtool check rules`, and every metric the rules and the Grafana dashboard name
//! is in a real server's `/metrics` (in peer mode, so the relay's metrics are there too).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::{Backend, LocalService, Server, Storage};

fn scrape(server: &Server) -> String {
    let addr = server.metrics_addr().expect("metrics address");
    let mut http = std::net::TcpStream::connect(&addr).expect("connect to /metrics");
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut page = String::new();
    let _ = http.read_to_string(&mut page);
    page
}

/// Every `noomnim_...` name in `text` (histogram suffixes taken off).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("noomnim_") {
        let start = i + at;
        let end = start
            + bytes[start..]
                .iter()
                .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_'))
                .unwrap_or(bytes.len() - start);
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_string());
        i = end;
    }
    names
}

#[test]
fn dashboard_and_alerts_name_only_metrics_the_server_serves() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let server = Server::start_with(
        &storage,
        &[
            ("PEER", "true"),
            ("REDIS_URL", &redis.redis_url()),
            ("METRICS_PORT", "0"),
        ],
    );
    assert!(server.logged("peer subscriber: connected"));
    let served = metric_names(&scrape(&server));
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["deploy/alerts.yml", "deploy/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("deploy file");
        let named = metric_names(&text);
        assert!(named.len() >= 5, "{file} names metrics: {named:?}");
        let missing: Vec<&String> = named.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "{file} names {missing:?}, not in /metrics"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana-dashboard.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
}

/// The rules are valid, and fire (and stay quiet) on the series of deploy/alerts.test.yml: an
/// instance that stops answering scrapes, a relay that loses Redis.
#[test]
fn alert_rules_pass_promtool() {
    let root = env!("CARGO_MANIFEST_DIR");
    for args in [
        ["check", "rules", "deploy/alerts.yml"],
        ["test", "rules", "deploy/alerts.test.yml"],
    ] {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(root)
            .output()
            .expect("promtool (apt-get install prometheus; .ci/run installs it)");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
