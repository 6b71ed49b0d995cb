//! Issue 26 item 1: `noomnim cli` as people use it. Interactive under tmux (a message from
//! someone else appears above a half-typed line, which stays intact; tab completion; history
//! across runs), and the one-shot commands from a shell, in pipelines, with their exit codes;
//! `tail` prints every message exactly once across a server restart.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::tmux::Tmux;
use common::{ask, free_port, next_of, ug, unique, Backend, Server, Storage, BINARY};
use serde_json::{json, Value};

/// `noomnim cli` against `server` as `user`, with `args`.
fn cli(server: &Server, user: &str, args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .arg("cli")
        .args(["--port", &server.addr.port().to_string(), "--user", user])
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .expect("run noomnim cli")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn one_shot_commands_report_by_exit_code_and_work_in_pipelines() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (user, group) = (unique("scripted"), unique("ops"));
    let refused = cli(&server, &user, &["send", &group, "hello"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        text(&refused.stderr).contains("group_not_found"),
        "{refused:?}"
    );
    let mut owner = server.login(&user);
    assert_eq!(
        ask(&mut owner, "create_group", ug(&user, &group))["event"],
        "group_created"
    );
    let stored = cli(&server, &user, &["send", &group, "hello"]);
    assert!(stored.status.success(), "{stored:?}");
    assert_eq!(
        text(&stored.stdout).trim(),
        format!("stored as #1 in {group}")
    );
    // Retrying with the same --client-msg-id stores nothing new and still says "stored".
    for _ in 0..2 {
        let keyed = cli(
            &server,
            &user,
            &["send", &group, "once", "--client-msg-id", "k-1"],
        );
        assert!(keyed.status.success(), "{keyed:?}");
    }
    for i in 0..5 {
        assert!(cli(&server, &user, &["send", &group, &format!("n{i}")])
            .status
            .success());
    }
    // history | a pipeline: one JSON object per line, oldest first.
    let pipeline = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BINARY} cli --port {} --user {user} history {group} --limit 4 --json | python3 -c 'import sys, json; print(\",\".join(str(json.loads(l)[\"seq\"]) for l in sys.stdin))'",
            server.addr.port()
        ))
        .output()
        .expect("sh");
    assert!(pipeline.status.success(), "{pipeline:?}");
    assert_eq!(text(&pipeline.stdout).trim(), "4,5,6,7");
    let all = cli(&server, &user, &["history", &group, "--limit", "500"]);
    let lines: Vec<String> = text(&all.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 7, "{lines:?}");
    assert!(
        lines[0].contains("#1") && lines[0].ends_with("hello"),
        "{lines:?}"
    );
    assert!(
        !lines[0].contains('\x1b'),
        "no colour when not on a terminal"
    );
    let ping = cli(&server, &user, &["ping", "--count", "3"]);
    assert!(ping.status.success(), "{ping:?}");
    assert!(text(&ping.stdout).contains("(3 samples)"), "{ping:?}");
    let usage = cli(&server, &user, &["dance"]);
    assert_eq!(usage.status.code(), Some(2));
    let nowhere = Command::new(BINARY)
        .args([
            "cli",
            "--port",
            &free_port().to_string(),
            "--user",
            "x",
            "send",
            "g",
            "t",
        ])
        .output()
        .expect("run");
    assert_eq!(
        nowhere.status.code(),
        Some(1),
        "a failed connection is not stored"
    );
}

#[test]
fn tail_prints_every_message_once_across_a_server_restart() {
    let storage = Storage::new(Backend::Embedded);
    let port = free_port().to_string();
    let mut env = storage.env();
    env.push(("PORT".into(), port.clone()));
    let mut server = Server::spawn(&env);
    let (user, group) = (unique("tailer"), unique("tailed"));
    let mut writer = server.login(&user);
    assert_eq!(
        ask(&mut writer, "create_group", ug(&user, &group))["event"],
        "group_created"
    );
    let mut tail = Command::new(BINARY)
        .args([
            "cli", "--port", &port, "--user", &user, "tail", &group, "--since", "0", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tail");
    let mut lines = BufReader::new(tail.stdout.take().expect("stdout")).lines();
    let mut seqs = Vec::new();
    let mut read_until = |seqs: &mut Vec<u64>, last: u64| {
        while seqs.last() != Some(&last) {
            let line = lines.next().expect("tail ended").expect("read");
            let message: Value = serde_json::from_str(&line).expect("json line");
            seqs.push(message["seq"].as_u64().expect("seq"));
        }
    };
    for i in 1..=5 {
        let sent = ask(
            &mut writer,
            "send_message",
            json!({"group_name": group, "text": format!("before {i}")}),
        );
        assert_eq!(sent["data"]["seq"], i);
    }
    read_until(&mut seqs, 5);
    drop(writer);
    assert!(server.terminate().success());
    let server = Server::spawn(&env);
    let mut writer = server.login(&user);
    for i in 6..=10 {
        let sent = ask(
            &mut writer,
            "send_message",
            json!({"group_name": group, "text": format!("after {i}")}),
        );
        assert_eq!(sent["data"]["seq"], i);
    }
    read_until(&mut seqs, 10);
    let _ = tail.kill();
    let _ = tail.wait();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "each message exactly once, in order"
    );
}

#[test]
fn interactive_cli_keeps_a_half_typed_line_while_messages_arrive() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (alice, bob, group) = (unique("alice"), unique("bob"), unique("room"));
    let history = std::env::temp_dir().join(unique("cli-history"));
    let start = || {
        Tmux::start(&format!(
            "{BINARY} cli --port {} --user {alice} --history {}",
            server.addr.port(),
            history.display()
        ))
    };
    let tmux = start();
    tmux.wait_for(&format!("logged in as {alice}"), 1);
    tmux.type_line(&format!("/create {group}"));
    tmux.wait_for(&format!("group created {group}"), 1);
    // Tab completes commands and the groups seen.
    tmux.keys(&["-l", "/ent"]);
    tmux.keys(&["Tab"]);
    tmux.keys(&["-l", &group[..group.len() - 2]]);
    tmux.keys(&["Tab"]);
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for(&format!("entered {group}"), 1);
    assert!(screen.contains(&format!("/enter {group}")), "{screen}");
    // Bob speaks while Alice is half-way through a line (typed a key at a time, as a person
    // types; bursts have a test of their own below).
    for key in "hello wor".chars() {
        tmux.keys(&["-l", &key.to_string()]);
    }
    tmux.wait_for("hello wor", 1);
    let mut b = server.login(&bob);
    assert_eq!(
        ask(&mut b, "join_group", ug(&bob, &group))["event"],
        "join_success"
    );
    assert_eq!(
        ask(&mut b, "enter_group", json!({"group_name": group}))["event"],
        "enter_group"
    );
    ask(
        &mut b,
        "send_message",
        json!({"group_name": group, "text": "from bob"}),
    );
    // (The screen is read until the redraw under the new line is complete.)
    let half = format!("{alice}> hello wor");
    let screen = tmux.wait_until(|screen| {
        screen.contains(&format!("{bob}: from bob")) && screen.lines().any(|l| l.trim_end() == half)
    });
    let rows: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
    let bob_row = rows
        .iter()
        .position(|l| l.contains("from bob"))
        .expect("bob's line");
    let prompt_row = rows
        .iter()
        .rposition(|l| l.starts_with(&format!("{alice}> ")))
        .expect("prompt");
    assert!(
        bob_row < prompt_row,
        "the message is above the prompt:\n{screen}"
    );
    assert_eq!(
        rows[prompt_row].trim_end(),
        format!("{alice}> hello wor"),
        "{screen}"
    );
    // Finishing the line sends it as it was meant.
    tmux.keys(&["-l", "l"]);
    tmux.keys(&["-l", "d"]);
    tmux.keys(&["Enter"]);
    let said = next_of(&mut b, &["message_sent"]);
    assert_eq!(said["data"]["text"], "hello world");
    assert_eq!(said["data"]["username"], alice.as_str());
    tmux.type_line("/history 5");
    tmux.wait_for("hello world", 2);
    tmux.type_line("/quit");
    // Each line is written to the history file as it is entered.
    let deadline = std::time::Instant::now() + common::REPLY_TIMEOUT;
    while !std::fs::read_to_string(&history).is_ok_and(|h| h.contains("/quit")) {
        assert!(
            std::time::Instant::now() < deadline,
            "history was not written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(tmux);
    // History survives the run: Up recalls the last line typed.
    let tmux = start();
    tmux.wait_for(&format!("logged in as {alice}"), 1);
    tmux.keys(&["Up"]);
    let screen = tmux.wait_for(&format!("{alice}> /quit"), 1);
    assert!(screen.contains(&format!("{alice}> /quit")), "{screen}");
    let _ = std::fs::remove_file(history);
}

/// Issue 35 item 1: nothing typed or pasted is lost or waits for another key. A line and its
/// Enter arriving in one read (a fast typist, a program driving the terminal), 30 lines
/// pasted without bracketed paste (tmux's `paste-buffer`, which turns newlines into Enter),
/// and an input method committing a whole word at once are each sent, in order, as typed.
#[test]
fn interactive_cli_keeps_every_key_of_bursts_and_pastes() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (alice, bob, group) = (unique("alice"), unique("bob"), unique("room"));
    let mut b = server.login(&bob);
    assert_eq!(
        ask(&mut b, "create_group", ug(&bob, &group))["event"],
        "group_created"
    );
    assert_eq!(
        ask(&mut b, "enter_group", json!({"group_name": group}))["event"],
        "enter_group"
    );
    let tmux = Tmux::start(&format!(
        "{BINARY} cli --port {} --user {alice}",
        server.addr.port()
    ));
    tmux.wait_for(&format!("logged in as {alice}"), 1);
    let shows = |needle: String| {
        let screen = tmux.wait_for(&needle, 1);
        assert!(screen.contains(&needle), "no {needle:?} on\n{screen}");
    };
    // The banner stays above the first prompt (it was drawn over by it).
    let screen = tmux.wait_for(&format!("{alice}> "), 1);
    assert!(
        screen.contains(&format!("logged in as {alice}")),
        "the banner is gone:\n{screen}"
    );
    // Entering a group one is not in says how to become a member.
    tmux.type_line(&format!("/enter {group}"));
    shows(format!("(/join {group} to become one)"));
    tmux.type_line(&format!("/join {group}"));
    shows(format!("join success {group}"));
    tmux.type_line(&format!("/enter {group}"));
    shows(format!("entered {group}"));
    let mut expected = Vec::new();
    // One write: the text and its Enter.
    tmux.keys(&["-l", "burst one\r"]);
    expected.push("burst one".to_string());
    // A paste of 30 lines, no bracketed paste.
    let pasted: Vec<String> = (1..=30).map(|i| format!("pasted line {i}")).collect();
    let buffer = unique("paste");
    let status = std::process::Command::new("tmux")
        .args([
            "set-buffer",
            "-b",
            &buffer,
            &format!("{}\n", pasted.join("\n")),
        ])
        .status()
        .expect("tmux set-buffer");
    assert!(status.success());
    tmux.paste(&buffer);
    expected.extend(pasted);
    // An input method commits a word in one write: all of it is drawn before any other key.
    tmux.keys(&["-l", "これはテストです"]);
    let screen = tmux.wait_for(&format!("{alice}> これはテストです"), 1);
    assert!(
        screen.contains(&format!("{alice}> これはテストです")),
        "the committed word is not all drawn:\n{screen}"
    );
    tmux.keys(&["Enter"]);
    expected.push("これはテストです".to_string());
    let mut said = Vec::new();
    while said.len() < expected.len() {
        let line = next_of(&mut b, &["message_sent"]);
        said.push(line["data"]["text"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(said, expected, "every line, in order, once");
    // Ctrl-C drops a half-typed line and says how to leave; a second one leaves.
    tmux.keys(&["-l", "not meant"]);
    tmux.keys(&["C-c"]);
    shows("(line dropped; Ctrl-C again, Ctrl-D or /quit to leave)".into());
    tmux.keys(&["C-c"]);
    let deadline = std::time::Instant::now() + common::REPLY_TIMEOUT;
    while tmux.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "a second Ctrl-C did not end the cli"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        common::nothing_pending(&mut b).is_empty(),
        "the dropped line was sent"
    );
}

/// Issue 35 item 2: `noomnim cli history … | head` printed `panicked … Broken pipe` and exited
/// 101. A reader that goes away ends the cli quietly, with exit 0.
#[test]
fn the_cli_ends_quietly_when_its_reader_goes_away() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (user, group) = (unique("piped"), unique("long"));
    let mut owner = server.login(&user);
    ask(&mut owner, "create_group", ug(&user, &group));
    // Far more than a pipe holds, so the cli writes into a closed pipe.
    for i in 0..100 {
        let text = format!("{i:03} {}", "p".repeat(2000));
        ask(
            &mut owner,
            "send_message",
            json!({"group_name": group, "text": text}),
        );
    }
    let port = server.addr.port().to_string();
    let pipeline = format!(
        "{BINARY} cli --port {port} --user {user} history {group} --limit 100 | head -n 1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\""
    );
    let output = Command::new("bash")
        .args(["-c", &pipeline])
        .output()
        .expect("run the pipeline");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stdout.trim(), "status=0", "{stderr}");
}

/// Issue 35 item 3: `--help` was taken as an argument (a backup file named `--help`, a token
/// for the user `--help`, an erase of a user of that name creating an empty store in ./data).
/// Every subcommand answers `--help` with its usage on stdout and exit 0; an admin command
/// never creates a store that is not there.
#[test]
fn every_subcommand_answers_help_and_admin_never_creates_a_store() {
    let dir = std::env::temp_dir().join(unique("help"));
    std::fs::create_dir_all(&dir).expect("dir");
    for args in [
        vec!["--help"],
        vec!["cli", "--help"],
        vec!["backup", "--help"],
        vec!["token", "--help"],
        vec!["admin", "--help"],
        vec!["admin", "erase-user", "--help"],
    ] {
        let output = Command::new(BINARY)
            .current_dir(&dir)
            .env_clear()
            .env("AUTH_SECRET", "a-test-secret-of-at-least-32-bytes-long")
            .args(&args)
            .output()
            .expect("run noomnim");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        assert!(
            text(&output.stdout).to_lowercase().contains("usage")
                || text(&output.stdout).contains("PORT"),
            "{args:?} prints its usage on stdout: {output:?}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&dir).expect("list").collect();
    assert!(left.is_empty(), "nothing created: {left:?}");
    let missing = dir.join("no-such-store");
    let erase = Command::new(BINARY)
        .current_dir(&dir)
        .env_clear()
        .env("DATA_DIR", &missing)
        .args(["admin", "erase-user", "bob"])
        .output()
        .expect("run admin");
    assert_eq!(erase.status.code(), Some(2), "{erase:?}");
    assert!(text(&erase.stderr).contains("no-such-store"), "{erase:?}");
    assert!(!missing.exists(), "no store created for a wrong DATA_DIR");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 37: `/dm NAME` opens and enters a direct conversation, `@` completes the names seen
/// and mentions them, and the person mentioned elsewhere hears of it; `/block`, `/notify` and
/// `/groups` say what they did.
#[test]
fn interactive_cli_talks_directly_and_mentions() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut b = common::v3(&server, &bob);
    let tmux = Tmux::start(&format!(
        "{BINARY} cli --port {} --user {alice}",
        server.addr.port()
    ));
    tmux.wait_for(&format!("logged in as {alice}"), 1);
    tmux.type_line(&format!("/dm {bob}"));
    tmux.wait_for(&format!("direct conversation with {bob}"), 1);
    let screen = tmux.wait_for("entered @dm:", 1);
    assert!(screen.contains("entered @dm:"), "{screen}");
    // `@` and the start of a name seen, Tab: the name, then the rest of the line.
    tmux.keys(&["-l", &format!("lunch @{}", &bob[..4])]);
    tmux.keys(&["Tab"]);
    tmux.keys(&["-l", "today?"]);
    tmux.keys(&["Enter"]);
    tmux.wait_for("sent #1", 1);
    let opened = next_of(&mut b, &["direct_opened"]);
    assert_eq!(opened["data"]["with"], alice.as_str(), "{opened}");
    let mention = next_of(&mut b, &["mentioned"]);
    assert_eq!(mention["data"]["by"], alice.as_str(), "{mention}");
    let dm = opened["data"]["group_name"]
        .as_str()
        .expect("name")
        .to_string();
    let page = ask(&mut b, "fetch_messages", json!({"group_name": dm}));
    let message = &page["data"]["messages"][0];
    assert_eq!(message["text"], format!("lunch @{bob} today?"), "{page}");
    assert_eq!(message["mentions"], json!([bob]));
    tmux.type_line("/notify mentions");
    tmux.wait_for(&format!("{dm}: notifications mentions"), 1);
    tmux.type_line("/groups");
    tmux.wait_for(&format!("(direct with {bob})"), 1);
    tmux.type_line(&format!("/block {bob}"));
    tmux.wait_for(&format!("you block: {bob}"), 1);
    let refused = ask(
        &mut b,
        "send_message",
        json!({"group_name": dm, "text": "hey"}),
    );
    assert_eq!(refused["data"]["code"], "forbidden", "{refused}");
    tmux.type_line("/quit");
}

/// `/reply SEQ TEXT` answers in the message's thread, and `/thread SEQ` shows the root with
/// its count and the replies indented under it.
#[test]
fn interactive_cli_replies_in_threads() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (alice, bob, group) = (unique("alice"), unique("bob"), unique("team"));
    let mut b = common::v3(&server, &bob);
    ask(&mut b, "create_group", common::ug(&bob, &group));
    let root = ask(
        &mut b,
        "send_message",
        json!({"group_name": group, "text": "who takes the release?"}),
    );
    assert_eq!(root["data"]["seq"], 1, "{root}");
    let tmux = Tmux::start(&format!(
        "{BINARY} cli --port {} --user {alice}",
        server.addr.port()
    ));
    tmux.wait_for(&format!("logged in as {alice}"), 1);
    tmux.type_line(&format!("/join {group}"));
    tmux.type_line(&format!("/enter {group}"));
    tmux.wait_for("who takes the release?", 1);
    tmux.type_line("/reply 1 I can do it");
    tmux.wait_for("sent #2", 1);
    let page = ask(
        &mut b,
        "fetch_messages",
        json!({"group_name": group, "thread": 1, "after_seq": 0}),
    );
    let messages = page["data"]["messages"].as_array().expect("messages");
    assert_eq!(messages[1]["text"], "I can do it", "{page}");
    assert_eq!(messages[1]["reply_to"], 1, "{page}");
    tmux.type_line("/reply 2 (on tuesday)");
    tmux.wait_for("sent #3", 1);
    tmux.type_line("/thread 1");
    let screen = tmux.wait_for("[2 replies, /thread 1]", 1);
    assert!(
        screen.contains("\u{21b3} ") && screen.contains("(re #1): (on tuesday)"),
        "replies indented under their root: {screen}"
    );
    tmux.type_line("/quit");
}
