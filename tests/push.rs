//! Issue 37 item 5: offline push. A webhook receiver of the test's own checks every
//! signature, fails the first request of each notice (half of all requests) and is down for
//! 5 s while 1,000 mentions are sent: every notice for the offline user arrives at least once,
//! none for the online one, none past a level of `none`; a direct message is pushed. The queue
//! survives kill -9 of the server mid-queue, and across two peers a user whose only
//! connection was on a killed instance is pushed by the survivor.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ask, metric, unique, v3, Backend, Client, LocalService, Server, Storage};
use serde_json::{json, Value};

const SECRET: &str = "a-webhook-secret-of-at-least-32-bytes!";

/// What the receiver saw: accepted notices (body), requests per notice id, bad signatures.
#[derive(Default)]
struct Seen {
    accepted: Vec<Value>,
    requests: HashMap<String, usize>,
    bad: Vec<String>,
}

/// A webhook receiver on a port of its own that can be taken down and brought back.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let mut receiver = Receiver {
            port: common::free_port(),
            seen: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        receiver.up();
        receiver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/notify", self.port)
    }

    fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        self.stop.store(false, Ordering::SeqCst);
        let (seen, stop) = (self.seen.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &seen),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }));
    }

    /// Stops listening: connections are refused until `up`.
    fn down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn accepted(&self) -> Vec<Value> {
        self.seen.lock().expect("seen").accepted.clone()
    }

    /// Waits (bounded) until `done` holds for what was accepted.
    fn wait_until(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let accepted = self.accepted();
            if done(&accepted) || Instant::now() > deadline {
                return accepted;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// One request: the signature is checked; a notice's first request is answered 500 (the
/// receiver fails half of all requests), later ones 200.
fn serve(stream: TcpStream, seen: &Mutex<Seen>) {
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let mut headers = HashMap::new();
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        if let Some((name, value)) = line.trim_end().split_once(": ") {
            headers.insert(name.to_ascii_lowercase(), value.to_string());
        }
        line.clear();
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let expected: String = ring::hmac::sign(&key, &body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let notice: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let status = {
        let mut seen = seen.lock().expect("seen");
        let signed = headers.get("x-noomnim-signature") == Some(&format!("sha256={expected}"));
        let id = notice["id"].as_str().unwrap_or("").to_string();
        let keyed = headers.get("idempotency-key") == Some(&id);
        if !signed || !keyed {
            seen.bad.push(format!("{headers:?} {notice}"));
            "401 Unauthorized"
        } else {
            let tries = seen.requests.entry(id).or_default();
            *tries += 1;
            if *tries == 1 {
                "500 Internal Server Error"
            } else {
                seen.accepted.push(notice);
                "200 OK"
            }
        }
    };
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

fn pushing(storage: &Storage, receiver: &Receiver, extra: &[(&str, &str)]) -> Server {
    let url = receiver.url();
    let mut env = vec![
        ("PUSH_WEBHOOK_URL", url.as_str()),
        ("PUSH_WEBHOOK_SECRET", SECRET),
        ("PUSH_RETRY_MS", "50"),
        ("METRICS_PORT", "0"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(storage, &env)
}

fn seqs_for(accepted: &[Value], user: &str, group: &str) -> BTreeSet<u64> {
    accepted
        .iter()
        .filter(|n| n["username"] == user && n["group_name"] == group)
        .filter_map(|n| n["seq"].as_u64())
        .collect()
}

/// Sends `count` messages mentioning `mentions`, pipelined, and waits for every ack.
fn mention_many(client: &mut Client, group: &str, count: u64, mentions: &[&str]) {
    for i in 1..=count {
        let data = json!({"group_name": group, "text": format!("ping {i}"), "mentions": mentions});
        client.send(&json!({"event": "send_message", "data": data, "id": i}));
    }
    let mut acked = 0;
    while acked < count {
        let line = client.recv();
        if line.get("id").is_some() {
            assert_eq!(line["event"], "message_sent", "{line}");
            acked += 1;
        }
    }
}

/// A user who has logged in once and is gone.
fn register(server: &Server, username: &str, groups: &[&str]) {
    let mut client = server.login(username);
    for group in groups {
        let joined = ask(&mut client, "join_group", common::ug(username, group));
        assert_eq!(joined["event"], "join_success", "{joined}");
    }
}

/// `count` mentions (the shared MongoDB test server is a slow Python one: fewer there).
fn flaky_receiver_gets_every_offline_notice(backend: Backend, count: u64) {
    let storage = Storage::new(backend);
    let mut receiver = Receiver::start();
    let server = pushing(&storage, &receiver, &[]);
    let (ann, bob, cy) = (unique("ann"), unique("bob"), unique("cy"));
    let (group, quiet) = (unique("team"), unique("quiet"));
    let mut ann_c = v3(&server, &ann);
    for g in [&group, &quiet] {
        ask(&mut ann_c, "create_group", common::ug(&ann, g));
    }
    register(&server, &bob, &[&group, &quiet]);
    let mut cy_c = v3(&server, &cy); // online throughout: never pushed
    ask(&mut cy_c, "join_group", common::ug(&cy, &group));
    {
        // Bob silences one group before he goes.
        let mut bob_c = server.login(&bob);
        let set = ask(
            &mut bob_c,
            "set_notify",
            json!({"group_name": quiet, "level": "none"}),
        );
        assert_eq!(set["event"], "notify_set", "{set}");
    }

    receiver.down();
    let down_since = Instant::now();
    mention_many(&mut ann_c, &group, count, &[&bob, &cy]);
    mention_many(&mut ann_c, &quiet, 5, &[&bob]);
    let opened = ask(&mut ann_c, "open_direct", json!({"username": bob}));
    let dm = opened["data"]["group_name"]
        .as_str()
        .expect("dm")
        .to_string();
    let sent = ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": dm, "text": "call me"}),
    );
    assert_eq!(sent["event"], "message_sent", "{sent}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(down_since.elapsed()));
    receiver.up();

    let all: BTreeSet<u64> = (1..=count).collect();
    let accepted = receiver.wait_until(|got| {
        seqs_for(got, &bob, &group) == all && !seqs_for(got, &bob, &dm).is_empty()
    });
    assert_eq!(
        seqs_for(&accepted, &bob, &group),
        all,
        "every mention, at least once"
    );
    let direct: Vec<&Value> = accepted
        .iter()
        .filter(|n| n["group_name"] == dm.as_str())
        .collect();
    assert_eq!(direct.len(), 1, "{direct:?}");
    assert_eq!(direct[0]["kind"], "direct");
    assert_eq!(direct[0]["sender"], ann.as_str());
    assert_eq!(direct[0]["preview"], "call me");
    let one = accepted
        .iter()
        .find(|n| n["group_name"] == group.as_str())
        .expect("one");
    assert_eq!(one["kind"], "mention");
    assert!(one["preview"]
        .as_str()
        .is_some_and(|p| p.starts_with("ping ")));
    // Everything settles (the online user's notices are held for presence, then dropped).
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(&server, "noomnim_push_queued") != Some(0.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(&server, "noomnim_push_queued"), Some(0.0));
    let accepted = receiver.accepted();
    assert!(
        accepted.iter().all(|n| n["username"] != cy.as_str()),
        "nothing for an online user"
    );
    assert!(
        seqs_for(&accepted, &bob, &quiet).is_empty(),
        "level none: nothing"
    );
    assert!(metric(&server, "noomnim_push_failed_total").is_some_and(|n| n >= count as f64));
    assert!(metric(&server, "noomnim_push_delivered_total").is_some_and(|n| n > count as f64));
    assert!(metric(&server, "noomnim_push_skipped_online_total").is_some_and(|n| n >= count as f64));
    let seen = receiver.seen.lock().expect("seen");
    assert!(seen.bad.is_empty(), "every request signed: {:?}", seen.bad);
}

#[test]
fn a_flaky_receiver_gets_every_offline_notice_on_the_embedded_store() {
    flaky_receiver_gets_every_offline_notice(Backend::Embedded, 1000);
}

#[test]
fn a_flaky_receiver_gets_every_offline_notice_on_mongodb() {
    flaky_receiver_gets_every_offline_notice(Backend::Mongo, 40);
}

#[test]
fn queued_notices_survive_a_kill_mid_queue() {
    let storage = Storage::new(Backend::Embedded);
    let mut receiver = Receiver::start();
    receiver.down();
    let mut server = pushing(&storage, &receiver, &[]);
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("g"));
    let mut ann_c = v3(&server, &ann);
    ask(&mut ann_c, "create_group", common::ug(&ann, &group));
    register(&server, &bob, &[&group]);
    mention_many(&mut ann_c, &group, 50, &[&bob]);
    server.kill();
    receiver.up();
    let _server = pushing(&storage, &receiver, &[]);
    let all: BTreeSet<u64> = (1..=50).collect();
    let accepted = receiver.wait_until(|got| seqs_for(got, &bob, &group) == all);
    assert_eq!(
        seqs_for(&accepted, &bob, &group),
        all,
        "none lost to kill -9"
    );
}

#[test]
fn a_user_on_a_killed_instance_is_pushed_by_the_survivor() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let receiver = Receiver::start();
    let url = receiver.url();
    let env = |node: &'static str| {
        vec![
            ("PEER", "true".to_string()),
            ("REDIS_URL", redis.redis_url()),
            ("NODE_ID", node.to_string()),
            ("PUSH_WEBHOOK_URL", url.clone()),
            ("PUSH_WEBHOOK_SECRET", SECRET.to_string()),
            ("PUSH_RETRY_MS", "50".to_string()),
        ]
    };
    let spawn = |node: &'static str| {
        let pairs = env(node);
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = Server::start_with(&storage, &refs);
        assert!(server.logged("peer subscriber: connected"));
        server
    };
    let a = spawn("push_a");
    let mut b = spawn("push_b");
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("g"));
    let mut ann_c = v3(&a, &ann);
    ask(&mut ann_c, "create_group", common::ug(&ann, &group));
    let mut bob_c = v3(&b, &bob);
    ask(&mut bob_c, "join_group", common::ug(&bob, &group));
    // Bob is online (on b) as a sees it: its presence snapshot reached a.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entered = ask(&mut ann_c, "enter_group", json!({"group_name": group}));
        let online = entered["data"]["online"].to_string();
        if online.contains(&bob) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    b.kill();
    mention_many(&mut ann_c, &group, 1, &[&bob]);
    let accepted = receiver.wait_until(|got| !seqs_for(got, &bob, &group).is_empty());
    assert_eq!(seqs_for(&accepted, &bob, &group), BTreeSet::from([1]));
}

/// The README's ten-line receiver, run as written (on a free port): it accepts the server's
/// signed notices and refuses a forged one.
#[test]
fn the_readme_receiver_checks_the_signature() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme.split("## Offline push").nth(1).expect("the section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the receiver");
    assert!(code.lines().count() <= 10, "ten lines: {code}");
    let port = common::free_port();
    let code = code.replace("8099", &port.to_string());
    let mut child = std::process::Command::new("python3")
        .args(["-c", &code])
        .env("PUSH_WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, printed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    // Listening once a connection is accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let forged = {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("receiver");
        let body = r#"{"username":"mallory"}"#;
        let _ = write!(
            stream,
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nX-Noomnim-Signature: sha256=00\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        let _ = BufReader::new(stream).read_line(&mut answer);
        answer
    };
    assert!(forged.contains(" 401 "), "{forged}");
    let storage = Storage::new(Backend::Embedded);
    let url = format!("http://127.0.0.1:{port}/");
    let server = Server::start_with(
        &storage,
        &[("PUSH_WEBHOOK_URL", &url), ("PUSH_WEBHOOK_SECRET", SECRET)],
    );
    let (ann, bob) = (unique("ann"), unique("bob"));
    register(&server, &bob, &[]);
    let mut ann_c = v3(&server, &ann);
    let opened = ask(&mut ann_c, "open_direct", json!({"username": bob}));
    let dm = opened["data"]["group_name"]
        .as_str()
        .expect("dm")
        .to_string();
    ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": dm, "text": "hi"}),
    );
    let line = printed.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.ok(), Some(format!("notify {bob}")));
}

/// MongoDB has no transaction here to queue a message's pushes in its commit, so the jobs are
/// written first, keyed by the message's id, and completed from the message at delivery. What
/// an instance killed between the two writes leaves — a job whose message never landed — is
/// dropped unsent; a job whose message did land is delivered with its seq and its text as it
/// is now (an edit after queueing shows).
#[test]
fn on_mongodb_a_job_whose_message_never_landed_is_dropped_and_one_whose_did_is_sent() {
    use mongodb::bson::{doc, oid::ObjectId};
    let storage = Storage::new(Backend::Mongo);
    let receiver = Receiver::start();
    let server = pushing(&storage, &receiver, &[]);
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("g"));
    let mut ann_c = v3(&server, &ann);
    ask(&mut ann_c, "create_group", common::ug(&ann, &group));
    register(&server, &bob, &[&group]);
    // A message with no mention (so no job of its own), then edited.
    let sent = ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": group, "text": "first words"}),
    );
    let seq = sent["data"]["seq"].as_u64().expect("seq");
    let edited = ask(
        &mut ann_c,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "the words as edited"}),
    );
    assert_eq!(edited["event"], "message_edited", "{edited}");

    let client = mongodb::sync::Client::with_uri_str(common::mongo_uri()).expect("mongo");
    let db = client.database(&storage.mongo_db);
    let stored = db
        .collection::<mongodb::bson::Document>("messages")
        .find_one(doc! {"group_name": &group, "seq": seq as i64})
        .run()
        .expect("read")
        .expect("the message is stored");
    let landed_id = stored.get_object_id("_id").expect("_id").to_hex();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // The orphan was queued long ago (past the grace a message has to land); the other just
    // now (bob's presence may not have settled yet, which a fresh job waits out).
    let job = |id: &str, message_id: &str, created_ms: i64| {
        doc! {
            "_id": id, "message_id": message_id, "username": &bob, "group_name": &group,
            "sender": &ann, "kind": "mention", "with_preview": true,
            "created_ms": created_ms, "next_ms": 0_i64, "attempts": 0_i64,
        }
    };
    let queue = db.collection::<mongodb::bson::Document>("push_queue");
    queue
        .insert_many([
            job("orphan-job", &ObjectId::new().to_hex(), now - 600_000),
            job("landed-job", &landed_id, now),
        ])
        .run()
        .expect("queue the jobs a killed instance left");

    let accepted = receiver.wait_until(|got| got.iter().any(|n| n["id"] == "landed-job"));
    let landed = accepted
        .iter()
        .find(|n| n["id"] == "landed-job")
        .expect("the job whose message landed is delivered");
    assert_eq!(landed["seq"], seq, "{landed}");
    assert_eq!(landed["preview"], "the words as edited", "{landed}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue
        .count_documents(doc! {"_id": "orphan-job"})
        .run()
        .expect("count")
        > 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = queue
        .count_documents(doc! {"_id": "orphan-job"})
        .run()
        .expect("count");
    assert_eq!(left, 0, "the orphan is dropped");
    let seen = receiver.seen.lock().expect("seen");
    assert!(!seen.requests.contains_key("orphan-job"), "never sent");
    assert!(seen.bad.is_empty(), "{:?}", seen.bad);
}
