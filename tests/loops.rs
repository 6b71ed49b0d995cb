//! Issue 25 item 2: `IO_THREADS` event loops in one process, each owning the connections the
//! kernel hands its listener (SO_REUSEPORT). A storm across 4 loops: every client receives
//! every message of its group exactly once, in seq order, whichever loop stored it; a user's
//! devices on different loops stay in sync; the same across two peer instances of four loops;
//! SIGTERM and kill -9 mid-storm lose nothing acked; connection limits, presence and
//! `/metrics` speak for the process, not one loop.

mod common;

use std::thread::JoinHandle;

use common::{ask, next_of, ug, unique, Backend, Client, Server, Storage};
use serde_json::{json, Value};

backend_tests!(
    a_storm_across_four_loops_reaches_everyone_once_in_order,
    senders_in_the_room_see_their_own_messages_in_seq_order
);

const LOOPS: &str = "4";

/// The MongoDB storms take turns: the test MongoDB (one Python process) stalled for over the
/// reply timeout when both ran at once on a loaded machine.
static MONGO_STORM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mongo_storm_turn(backend: Backend) -> Option<std::sync::MutexGuard<'static, ()>> {
    match backend {
        Backend::Mongo => Some(MONGO_STORM.lock().unwrap_or_else(|p| p.into_inner())),
        Backend::Embedded => None,
    }
}

/// A new user `prefix_...`, logged in and joined to `group`.
fn member_of(server: &Server, group: &str, prefix: &str) -> Client {
    let name = unique(prefix);
    let mut client = server.login(&name);
    assert_eq!(
        ask(&mut client, "join_group", ug(&name, group))["event"],
        "join_success"
    );
    client
}

/// A new member of `group` (as `member_of`) that entered the group's room.
fn in_room(server: &Server, group: &str, prefix: &str) -> Client {
    let mut client = member_of(server, group, prefix);
    assert_eq!(
        ask(&mut client, "enter_group", json!({"group_name": group}))["event"],
        "enter_group"
    );
    client
}

/// A new owner, logged in, and `count` groups `prefix_...` it created.
fn new_groups(server: &Server, prefix: &str, count: usize) -> (String, Client, Vec<String>) {
    let owner = unique("owner");
    let mut client = server.login(&owner);
    let groups: Vec<String> = (0..count).map(|_| unique(prefix)).collect();
    for group in &groups {
        assert_eq!(
            ask(&mut client, "create_group", ug(&owner, group))["event"],
            "group_created"
        );
    }
    (owner, client, groups)
}

/// A receiver in `group`'s room: returns the seqs it was sent, once `total` arrived.
fn receiver(server: &Server, group: &str, total: usize) -> JoinHandle<Vec<u64>> {
    let mut client = in_room(server, group, "rx");
    std::thread::spawn(move || {
        let mut seqs = Vec::with_capacity(total);
        while seqs.len() < total {
            let line = client.recv();
            if line["event"] == "message_sent" {
                seqs.push(line["data"]["seq"].as_u64().expect("seq"));
            }
        }
        seqs
    })
}

/// A sender that pipelines `count` messages to `group`; returns the seqs acknowledged.
fn sender(server: &Server, group: &str, count: usize) -> JoinHandle<Vec<u64>> {
    let mut client = member_of(server, group, "tx");
    let group = group.to_string();
    std::thread::spawn(move || pipelined_sends(&mut client, &group, count))
}

/// Writes `count` `send_message` requests (ids 0..count) to `group` at once.
fn send_burst(client: &mut Client, group: &str, count: usize) {
    let mut burst = Vec::new();
    for i in 0..count {
        let line = json!({"event": "send_message", "data": {"group_name": group, "text": format!("storm {i}")}, "id": i});
        burst.extend(serde_json::to_vec(&line).expect("json"));
        burst.push(b'\n');
    }
    client.send_raw(&burst);
}

fn pipelined_sends(client: &mut Client, group: &str, count: usize) -> Vec<u64> {
    send_burst(client, group, count);
    let mut acked = Vec::new();
    while acked.len() < count {
        match client.recv_or_closed() {
            Some(line) if line.get("id").is_some() => {
                if line["event"] == "message_sent" {
                    acked.push(line["data"]["seq"].as_u64().expect("seq"));
                } else {
                    break;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    acked
}

fn a_storm_across_four_loops_reaches_everyone_once_in_order(backend: Backend) {
    let _turn = mongo_storm_turn(backend);
    let storage = Storage::new(backend);
    let server = Server::start_with(
        &storage,
        &[
            ("IO_THREADS", LOOPS),
            ("RATE_LIMIT", "0"),
            ("METRICS_PORT", "0"),
        ],
    );
    assert!(
        server.ready_line.contains("4 event loops"),
        "{}",
        server.ready_line
    );
    let per_sender = match backend {
        Backend::Embedded => 200,
        Backend::Mongo => 60,
    };
    let (_, _owner, groups) = new_groups(&server, "loops", 4);
    // 10 receivers and 2 senders per group: 48 connections, spread over the 4 loops.
    let total = 2 * per_sender;
    let receivers: Vec<(String, JoinHandle<Vec<u64>>)> = groups
        .iter()
        .flat_map(|group| (0..10).map(move |_| group.clone()))
        .map(|group| {
            let handle = receiver(&server, &group, total);
            (group, handle)
        })
        .collect();
    let senders: Vec<JoinHandle<Vec<u64>>> = groups
        .iter()
        .flat_map(|group| {
            [
                sender(&server, group, per_sender),
                sender(&server, group, per_sender),
            ]
        })
        .collect();
    for sent in senders {
        assert_eq!(
            sent.join().expect("sender").len(),
            per_sender,
            "every send acknowledged"
        );
    }
    for (group, handle) in receivers {
        let seqs = handle.join().expect("receiver");
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "{group}: every message exactly once, in seq order"
        );
    }
    // /metrics speaks for every loop, as of the scrape: the messages stored by all of them
    // (every send was acknowledged, so every loop counted its own), and all 49 connections.
    let stored = (groups.len() * total) as f64;
    assert_eq!(
        common::metric(&server, "noomnim_messages_stored_total"),
        Some(stored)
    );
    let accepted = common::metric(&server, "noomnim_connections_accepted_total");
    assert!(accepted.is_some_and(|n| n >= 49.0), "{accepted:?}");
}

/// Senders that are in the room, on four loops: a sender's copy of its own message is its reply,
/// and it comes in seq order among the others' messages (a message stored on one loop can be
/// held there for an earlier seq stored on another; its reply waits with it).
fn senders_in_the_room_see_their_own_messages_in_seq_order(backend: Backend) {
    let _turn = mongo_storm_turn(backend);
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("IO_THREADS", LOOPS), ("RATE_LIMIT", "0")]);
    let per_sender = match backend {
        Backend::Embedded => 150,
        Backend::Mongo => 40,
    };
    let (_, _owner, groups) = new_groups(&server, "own", 1);
    let group = &groups[0];
    let senders = 6;
    let total = senders * per_sender;
    let mut clients: Vec<Client> = (0..senders)
        .map(|_| in_room(&server, group, "own"))
        .collect();
    for client in &mut clients {
        send_burst(client, group, per_sender);
    }
    let handles: Vec<JoinHandle<(Vec<u64>, usize)>> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                let (mut seqs, mut own) = (Vec::with_capacity(total), 0);
                while seqs.len() < total {
                    let line = client.recv();
                    assert_eq!(line["event"], "message_sent", "{line}");
                    own += usize::from(line.get("id").is_some());
                    seqs.push(line["data"]["seq"].as_u64().expect("seq"));
                }
                (seqs, own)
            })
        })
        .collect();
    for handle in handles {
        let (seqs, own) = handle.join().expect("sender");
        assert_eq!(own, per_sender, "every send answered once");
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "own replies and others' messages, each once, in seq order"
        );
    }
}

/// The same storm over two peer instances of four loops each (MongoDB, Redis): a message
/// stored by any loop of either instance reaches every receiver on every loop of both,
/// exactly once and in seq order.
#[test]
fn a_storm_across_two_peers_of_four_loops_reaches_everyone_once_in_order() {
    let _turn = mongo_storm_turn(Backend::Mongo);
    let storage = Storage::new(Backend::Mongo);
    let redis = common::LocalService::redis();
    let redis_url = redis.redis_url();
    let start = |node: &str| {
        Server::start_with(
            &storage,
            &[
                ("IO_THREADS", LOOPS),
                ("RATE_LIMIT", "0"),
                ("PEER", "true"),
                ("REDIS_URL", redis_url.as_str()),
                ("NODE_ID", node),
            ],
        )
    };
    let peers = [start("storm_a"), start("storm_b")];
    for peer in &peers {
        assert!(peer.logged("peer subscriber: connected"));
    }
    let (_, _owner, groups) = new_groups(&peers[0], "peerloops", 2);
    let per_sender = 60;
    // Per group: 8 receivers and 2 senders, half on each instance.
    let total = 2 * per_sender;
    let receivers: Vec<(String, JoinHandle<Vec<u64>>)> = groups
        .iter()
        .flat_map(|group| (0..8).map(move |i| (group.clone(), i % 2)))
        .map(|(group, at)| {
            let handle = receiver(&peers[at], &group, total);
            (group, handle)
        })
        .collect();
    let senders: Vec<JoinHandle<Vec<u64>>> = groups
        .iter()
        .flat_map(|group| {
            [
                sender(&peers[0], group, per_sender),
                sender(&peers[1], group, per_sender),
            ]
        })
        .collect();
    for sent in senders {
        assert_eq!(sent.join().expect("sender").len(), per_sender);
    }
    for (group, handle) in receivers {
        assert_eq!(
            handle.join().expect("receiver"),
            (1..=total as u64).collect::<Vec<_>>(),
            "{group}: every message exactly once, in seq order, on both instances"
        );
    }
}

/// A user's protocol-3 devices on different loops hear each other's read marks, and typing
/// crosses loops like messages do.
#[test]
fn devices_and_typing_cross_loops() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("IO_THREADS", LOOPS)]);
    let (user, other) = (unique("multi"), unique("typist"));
    let v3 = |name: &str| {
        let mut client = server.connect();
        assert_eq!(
            ask(&mut client, "hello", json!({"protocol": 3}))["data"]["protocol"],
            3
        );
        ask(&mut client, "find_user", json!({"username": name}));
        client
    };
    // Eight devices: with four loops, some are on other loops than the first.
    let mut devices: Vec<Client> = (0..8).map(|_| v3(&user)).collect();
    let group = unique("sync");
    let mut t = v3(&other);
    assert_eq!(
        ask(&mut t, "create_group", ug(&other, &group))["event"],
        "group_created"
    );
    assert_eq!(
        ask(&mut devices[0], "join_group", ug(&user, &group))["event"],
        "join_success"
    );
    for device in devices.iter_mut().skip(1) {
        assert_eq!(
            next_of(device, &["joined_group"])["data"]["group_name"],
            group
        );
    }
    ask(
        &mut t,
        "send_message",
        json!({"group_name": group, "text": "one"}),
    );
    let marked = ask(
        &mut devices[0],
        "mark_read",
        json!({"group_name": group, "seq": 1}),
    );
    assert_eq!(marked["data"]["last_read_seq"], 1);
    for device in devices.iter_mut().skip(1) {
        let mark: Value = next_of(device, &["read_marker"]);
        assert_eq!(mark["data"]["last_read_seq"], 1, "{mark}");
    }
    for device in devices.iter_mut() {
        assert_eq!(
            ask(device, "enter_group", json!({"group_name": group}))["event"],
            "enter_group"
        );
    }
    ask(&mut t, "enter_group", json!({"group_name": group}));
    ask(&mut t, "typing", json!({"group_name": group}));
    for device in devices.iter_mut() {
        assert_eq!(
            next_of(device, &["typing"])["data"]["username"],
            other.as_str()
        );
    }
}

/// SIGTERM mid-storm: the loops drain and exit 0; kill -9 mid-storm: nothing acked is lost.
#[test]
fn stopping_four_loops_mid_storm_loses_nothing_acked() {
    for graceful in [true, false] {
        let storage = Storage::new(Backend::Embedded);
        let port = common::free_port().to_string();
        let mut env = storage.env();
        env.push(("PORT".into(), port.clone()));
        env.push(("IO_THREADS".into(), LOOPS.into()));
        env.push(("RATE_LIMIT".into(), "0".into()));
        let mut server = Server::spawn(&env);
        let (owner, mut o, groups) = new_groups(&server, "stop", 1);
        let group = groups[0].clone();
        let senders: Vec<JoinHandle<Vec<u64>>> =
            (0..4).map(|_| sender(&server, &group, 2000)).collect();
        // Let the storm get going, then stop the server under it.
        loop {
            let page = ask(
                &mut o,
                "fetch_messages",
                json!({"group_name": group, "limit": 1}),
            );
            if page["data"]["messages"][0]["seq"].as_u64().unwrap_or(0) >= 500 {
                break;
            }
        }
        if graceful {
            assert!(server.terminate().success(), "SIGTERM: a clean exit");
        } else {
            server.kill();
        }
        let acked: usize = senders
            .into_iter()
            .map(|s| s.join().expect("sender").len())
            .sum();
        let server = Server::spawn(&env);
        let mut o = server.login(&owner);
        let stored = common::fetch_all(&mut o, &owner, &group);
        assert!(
            stored.len() >= acked,
            "{} stored < {acked} acked (graceful: {graceful})",
            stored.len()
        );
        common::assert_seqs_are_one_to_n(&stored, stored.len());
    }
}

/// `MAX_CONNECTIONS` and `MAX_CONNECTIONS_PER_IP` are the server's limits, not each loop's:
/// with four loops one address still gets only its cap, and every one of `MAX_CONNECTIONS`
/// is usable wherever the kernel puts it.
#[test]
fn connection_limits_hold_across_loops() {
    let storage = Storage::new(Backend::Embedded);
    for (total, per_ip) in [("100", "3"), ("5", "0")] {
        let server = Server::start_with(
            &storage,
            &[
                ("IO_THREADS", LOOPS),
                ("MAX_CONNECTIONS", total),
                ("MAX_CONNECTIONS_PER_IP", per_ip),
            ],
        );
        let allowed = if per_ip == "0" { total } else { per_ip };
        let allowed: usize = allowed.parse().expect("number");
        let mut open: Vec<Client> = (0..allowed).map(|_| server.connect()).collect();
        for client in open.iter_mut() {
            assert_eq!(ask(client, "ping", json!({}))["event"], "pong");
        }
        // Over the cap: refused whichever loop the kernel picks.
        for _ in 0..8 {
            let mut extra = server.connect();
            let refusal = extra.recv();
            assert_eq!(refusal["data"]["code"], "unavailable", "{refusal}");
        }
        // A freed place is usable again (the close is counted once the loop saw it).
        drop(open.pop());
        let usable = (0..100).any(|_| {
            if server.connect().try_request_ping() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            false
        });
        assert!(usable, "a freed place is usable again");
    }
}

/// A scrape counts what every loop did before it: connections logged in on any loop are in
/// `noomnim_connections` at once, not after the loops' once-a-second reports.
#[test]
fn metrics_count_every_loop_as_of_the_scrape() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("IO_THREADS", LOOPS), ("METRICS_PORT", "0")]);
    let mut clients: Vec<Client> = Vec::new();
    for round in 1..=3 {
        for _ in 0..4 {
            let name = unique("counted");
            clients.push(server.login(&name));
        }
        assert_eq!(
            common::metric(&server, "noomnim_connections"),
            Some((round * 4) as f64),
            "round {round}"
        );
    }
    let group = unique("counted");
    let name = unique("sender");
    let mut sender = server.login(&name);
    ask(&mut sender, "create_group", ug(&name, &group));
    for i in 0..5 {
        ask(
            &mut sender,
            "send_message",
            json!({"group_name": group, "text": format!("m{i}")}),
        );
    }
    assert_eq!(
        common::metric(&server, "noomnim_messages_stored_total"),
        Some(5.0)
    );
}

/// Protocol 3's `online` in `enter_group` knows at once who logged in on another loop (the
/// loops share who is present; the presence events still come from their snapshots).
#[test]
fn online_is_current_across_loops() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("IO_THREADS", LOOPS)]);
    let group = unique("here");
    let names: Vec<String> = (0..8).map(|_| unique("present")).collect();
    let mut clients: Vec<Client> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let mut client = server.connect();
        ask(&mut client, "hello", json!({"protocol": 3}));
        ask(&mut client, "find_user", json!({"username": name}));
        let request = if index == 0 {
            "create_group"
        } else {
            "join_group"
        };
        let joined = ask(&mut client, request, ug(name, &group));
        assert!(
            ["group_created", "join_success"].contains(&joined["event"].as_str().unwrap_or("")),
            "{joined}"
        );
        // Everyone logged in so far, on whichever loop, is online for the newcomer.
        let entered = ask(&mut client, "enter_group", json!({"group_name": group}));
        let online: Vec<&str> = entered["data"]["online"]
            .as_array()
            .expect("online")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for earlier in &names[..=index] {
            assert!(online.contains(&earlier.as_str()), "{earlier} in {entered}");
        }
        clients.push(client);
    }
}

/// Without `IO_THREADS` the server runs one loop per CPU it may use (this process's affinity
/// and quota, which the server inherits).
#[test]
fn the_default_is_one_loop_per_cpu() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
    if cpus > 1 {
        assert!(
            server.ready_line.contains(&format!("{cpus} event loops")),
            "{}",
            server.ready_line
        );
    } else {
        assert!(
            !server.ready_line.contains("event loops"),
            "{}",
            server.ready_line
        );
    }
}
