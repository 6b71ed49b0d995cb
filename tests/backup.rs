//! Issue 24 item 6: `noomnim backup PATH` copies the embedded store while the server keeps
//! serving. Under a write storm the copy opens, passes `PRAGMA integrity_check`, and holds every
//! message acknowledged before the backup began; the server goes on storing meanwhile.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{ug, unique, Backend, Client, Server, Storage};
use serde_json::json;

#[test]
fn a_backup_under_a_write_storm_holds_everything_acked_before_it() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("RATE_LIMIT", "0")]);
    let group = unique("backup");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    let stop = Arc::new(AtomicBool::new(false));
    let storms: Vec<_> = (0..3)
        .map(|i| {
            let (addr, group, stop) = (server.addr, group.clone(), stop.clone());
            std::thread::spawn(move || {
                let name = format!("storm{i}");
                let mut client = Client::connect(addr);
                client.request("find_user", json!({"username": name}));
                client.request("join_group", ug(&name, &group));
                let mut acked = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let ack = client.request(
                        "send_message",
                        json!({"group_name": group, "text": format!("{name} {}", acked.len())}),
                    );
                    assert_eq!(ack["event"], "message_sent", "{ack}");
                    acked.push(ack["data"]["seq"].as_u64().expect("seq"));
                }
                acked
            })
        })
        .collect();
    // Let the storm store something, then note the newest acknowledged seq.
    for _ in 0..50 {
        owner.request(
            "send_message",
            json!({"group_name": group, "text": "before"}),
        );
    }
    let acked_before = owner.request("send_message", json!({"group_name": group, "text": "mark"}))
        ["data"]["seq"]
        .as_u64()
        .expect("seq");
    let target = std::env::temp_dir().join(format!("{}.sqlite3", unique("backup-copy")));
    let data_dir = storage.env()[0].1.clone();
    let output = Command::new(common::BINARY)
        .env_clear()
        .env("DATA_DIR", &data_dir)
        .args(["backup", target.to_str().expect("path")])
        .output()
        .expect("run backup");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("backup:"), "a summary: {stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("copied"),
        "no progress when not on a terminal: {stderr}"
    );
    stop.store(true, Ordering::SeqCst);
    let sent: usize = storms
        .into_iter()
        .map(|s| s.join().expect("storm").len())
        .sum();
    assert!(sent > 0, "the storm went on during the backup");
    // The server kept serving.
    assert!(owner.try_request_ping());

    let copy = rusqlite::Connection::open(&target).expect("the copy opens");
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    let seqs: Vec<i64> = copy
        .prepare("SELECT seq FROM messages WHERE group_name = ?1 ORDER BY seq")
        .expect("prepare")
        .query_map([&group], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(
        seqs.len() as u64 >= acked_before,
        "{} < {acked_before}",
        seqs.len()
    );
    assert_eq!(
        seqs[..acked_before as usize],
        (1..=acked_before as i64).collect::<Vec<_>>()[..],
        "every message acknowledged before the backup, gapless"
    );
    // A second backup to the same path is refused rather than overwriting it.
    let again = Command::new(common::BINARY)
        .env_clear()
        .env("DATA_DIR", &data_dir)
        .args(["backup", target.to_str().expect("path")])
        .output()
        .expect("run backup");
    assert_eq!(again.status.code(), Some(1));
    let _ = std::fs::remove_file(target);
}

/// Issue 26 item 4: on a terminal the backup shows its progress and a final summary.
#[test]
fn a_backup_on_a_terminal_shows_progress_then_a_summary() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let group = unique("progress");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    for i in 0..20 {
        owner.request(
            "send_message",
            json!({"group_name": group, "text": format!("m{i}")}),
        );
    }
    let target = std::env::temp_dir().join(format!("{}.sqlite3", unique("backup-tty")));
    let data_dir = storage.env()[0].1.clone();
    let tmux = common::tmux::Tmux::start(&format!(
        "env DATA_DIR={data_dir} {} backup {}; sleep 30",
        common::BINARY,
        target.display()
    ));
    let screen = tmux.wait_for("backup:", 1);
    assert!(screen.contains("copy complete"), "{screen}");
    assert!(
        screen.contains("backup:") && screen.contains("messages"),
        "{screen}"
    );
    let _ = std::fs::remove_file(target);
}

/// Issue 24's race: the server is killed (SIGKILL) while a backup is being taken. The backup
/// either completes (then it opens, passes `integrity_check` and holds every message acked
/// before it began) or fails cleanly; the restarted server has every acked message.
#[test]
fn a_backup_taken_while_the_server_is_killed_is_whole_or_refused() {
    let storage = Storage::new(Backend::Embedded);
    let mut server = Server::start_with(&storage, &[("RATE_LIMIT", "0")]);
    let group = unique("killed");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    // Enough messages that the copy takes a moment.
    let mut acked = 0;
    for chunk in 0..20 {
        let mut burst = Vec::new();
        for i in 0..250 {
            let line = json!({"event": "send_message", "data": {"group_name": group, "text": format!("{chunk}-{i} {}", "x".repeat(200))}, "id": i});
            burst.extend(serde_json::to_vec(&line).expect("json"));
            burst.push(b'\n');
        }
        owner.send_raw(&burst);
        for _ in 0..250 {
            let reply = owner.recv();
            assert_eq!(reply["event"], "message_sent", "{reply}");
            acked = acked.max(reply["data"]["seq"].as_u64().expect("seq"));
        }
    }
    let target = std::env::temp_dir().join(format!("{}.sqlite3", unique("backup-kill")));
    let data_dir = storage.env()[0].1.clone();
    let backup = Command::new(common::BINARY)
        .env_clear()
        .env("DATA_DIR", &data_dir)
        .args(["backup", target.to_str().expect("path")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start backup");
    server.kill();
    let output = backup.wait_with_output().expect("backup ends");
    if output.status.success() {
        let copy = rusqlite::Connection::open(&target).expect("the copy opens");
        let check: String = copy
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok");
        let count: u64 = copy
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE group_name = ?1",
                [&group],
                |row| row.get(0),
            )
            .expect("count");
        assert_eq!(count, acked, "every acked message is in the copy");
    } else {
        assert!(
            !target.exists() || std::fs::metadata(&target).is_ok(),
            "{output:?}"
        );
    }
    let restarted = Server::start(&storage);
    let mut owner = restarted.login("owner");
    let stored = common::fetch_all(&mut owner, "owner", &group);
    assert_eq!(
        stored.len() as u64,
        acked,
        "the killed server lost nothing acked"
    );
    let _ = std::fs::remove_file(target);
}
