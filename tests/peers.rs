//! Peer mode: several instances on one MongoDB relay messages through Redis. Every client in a
//! group gets every message exactly once, broadcasts in `seq` order, across a Redis restart.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{msg, ug, unique, Backend, Client, LocalService, PrivateMongo, Server, Storage};
use serde_json::json;

/// Generates `single::NAME` and `cluster::NAME` tests calling `NAME(RedisKind)`.
macro_rules! redis_tests {
    ($($name:ident),* $(,)?) => {
        mod single {
            $( #[test] fn $name() { super::$name(super::RedisKind::Single) } )*
        }
        mod cluster {
            $( #[test] fn $name() { super::$name(super::RedisKind::Cluster) } )*
        }
    };
}
// The relay tests that do not stop their Redis run on a private single Redis and on the
// shared three-master test cluster (tools/services.sh).
redis_tests!(
    a_leave_on_one_peer_takes_the_user_out_of_rooms_on_every_peer,
    keyed_sends_racing_on_two_peers_are_stored_and_delivered_once,
    an_instance_receives_only_the_groups_whose_room_it_hosts,
    rooms_entered_and_left_during_a_storm_miss_nothing,
    idle_rooms_read_nothing_from_the_store
);

#[derive(Debug, Clone, Copy)]
enum RedisKind {
    Single,
    Cluster,
}

/// The peers' Redis for one test: a private redis-server, or the shared test cluster.
enum TestRedis {
    Single(LocalService),
    Cluster { url: String, masters: usize },
}

impl TestRedis {
    fn start(kind: RedisKind) -> TestRedis {
        match kind {
            RedisKind::Single => TestRedis::Single(LocalService::redis()),
            RedisKind::Cluster => {
                let (url, ports) = redis_cluster();
                TestRedis::Cluster {
                    url,
                    masters: ports.len(),
                }
            }
        }
    }

    fn url(&self) -> String {
        match self {
            TestRedis::Single(redis) => redis.redis_url(),
            TestRedis::Cluster { url, .. } => url.clone(),
        }
    }

    /// Channels an instance holds with no room occupied: the control channel, plus one
    /// heartbeat channel per master on a cluster.
    fn idle_channels(&self) -> usize {
        match self {
            TestRedis::Single(_) => 1,
            TestRedis::Cluster { masters, .. } => 1 + masters,
        }
    }
}

const INSTANCES: usize = 3;
const CLIENTS_PER_INSTANCE: usize = 2;

/// A group with clients spread over the instances, every one of them in the group's room.
struct Cluster {
    servers: Vec<Server>,
    group: String,
    clients: Vec<(String, Client)>,
}

impl Cluster {
    fn start(storage: &Storage, redis_url: &str) -> Cluster {
        let servers: Vec<Server> = (0..INSTANCES)
            .map(|i| {
                let node = format!("node{i}");
                Server::start_with(
                    storage,
                    &[
                        ("PEER", "true"),
                        ("REDIS_URL", redis_url),
                        ("NODE_ID", &node),
                    ],
                )
            })
            .collect();
        let group = unique("peers");
        let mut owner = servers[0].login("owner");
        owner.request("create_group", ug("owner", &group));
        let mut clients = Vec::new();
        for (s, server) in servers.iter().enumerate() {
            for c in 0..CLIENTS_PER_INSTANCE {
                let name = format!("member{s}_{c}");
                let mut client = server.login(&name);
                client.request("join_group", ug(&name, &group));
                assert_eq!(
                    client.request("enter_group", ug(&name, &group))["event"],
                    "enter_group"
                );
                clients.push((name, client));
            }
        }
        wait_for_links(&servers);
        Cluster {
            servers,
            group,
            clients,
        }
    }
}

/// Waits until every instance logged that its subscriber is connected.
fn wait_for_links<'a>(servers: impl IntoIterator<Item = &'a Server>) {
    for server in servers {
        assert!(
            server.logged("peer subscriber: connected"),
            "peers did not connect to Redis"
        );
    }
}

/// What one client saw: broadcasts (in arrival order) and its own acks.
#[derive(Default)]
struct Seen {
    broadcast: Vec<u64>,
    acked: Vec<u64>,
}

/// Sends `count` messages (pausing `pause` between them, calling `midway` once halfway through
/// the first client's storm) and reads until `total` distinct seqs arrived.
fn run_client(
    name: String,
    mut client: Client,
    group: String,
    count: usize,
    pause: Duration,
    total: u64,
) -> Seen {
    let mut seen = Seen::default();
    for i in 0..count {
        let text = format!("{name}#{i}");
        client.send(&json!({"event": "send_message", "data": msg(&name, &group, &text), "id": i}));
        if !pause.is_zero() {
            std::thread::sleep(pause);
            drain(&mut client, &mut seen);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (seen.broadcast.len() + seen.acked.len()) < total as usize && Instant::now() < deadline {
        match client.try_recv(Duration::from_millis(500)) {
            Some(line) => record(&line, &mut seen),
            None => continue,
        }
    }
    // Anything extra (a duplicate) would arrive shortly after.
    while let Some(line) = client.try_recv(Duration::from_millis(300)) {
        record(&line, &mut seen);
    }
    seen
}

fn drain(client: &mut Client, seen: &mut Seen) {
    while let Some(line) = client.try_recv(Duration::from_millis(1)) {
        record(&line, seen);
    }
}

fn record(line: &serde_json::Value, seen: &mut Seen) {
    assert_eq!(line["event"], "message_sent", "unexpected line: {line}");
    let seq = line["data"]["seq"].as_u64().expect("seq");
    if line.get("id").is_some() {
        seen.acked.push(seq);
    } else {
        seen.broadcast.push(seq);
    }
}

/// Every client saw each of 1..=total exactly once, its broadcasts in increasing order.
fn check_exactly_once_in_order(name: &str, seen: &Seen, total: u64) {
    let increasing = seen.broadcast.windows(2).all(|w| w[0] < w[1]);
    assert!(
        increasing,
        "{name}: broadcasts out of seq order: {:?}",
        seen.broadcast
    );
    let mut all: Vec<u64> = seen.broadcast.iter().chain(&seen.acked).copied().collect();
    all.sort_unstable();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "{name}: a message arrived twice");
    assert_eq!(
        distinct,
        (1..=total).collect::<BTreeSet<_>>(),
        "{name}: messages missing"
    );
}

/// One sender per instance; everyone checks; `disturb` runs once while the storm is on.
fn storm(cluster: Cluster, per_sender: usize, pause: Duration, disturb: impl FnOnce()) {
    let total = (INSTANCES * per_sender) as u64;
    let group = cluster.group.clone();
    let threads: Vec<_> = cluster
        .clients
        .into_iter()
        .enumerate()
        .map(|(i, (name, client))| {
            let count = if i % CLIENTS_PER_INSTANCE == 0 {
                per_sender
            } else {
                0
            };
            let group = group.clone();
            std::thread::spawn(move || {
                let seen = run_client(name.clone(), client, group, count, pause, total);
                (name, seen)
            })
        })
        .collect();
    disturb();
    for thread in threads {
        let (name, seen) = thread.join().expect("client");
        check_exactly_once_in_order(&name, &seen, total);
    }
    drop(cluster.servers);
}

/// Storage on a MongoDB of the test's own: the storms are the heaviest MongoDB load of the
/// suite, and the test server (single-threaded) would otherwise serve two at once.
fn private_storage(mongo: &PrivateMongo) -> Storage {
    let mut storage = Storage::new(Backend::Mongo);
    storage.mongo_uri = Some(mongo.uri());
    storage
}

#[test]
fn three_peers_deliver_every_message_once_in_seq_order() {
    let mongo = PrivateMongo::start();
    let storage = private_storage(&mongo);
    let redis = LocalService::redis();
    let cluster = Cluster::start(&storage, &redis.redis_url());
    storm(cluster, 100, Duration::ZERO, || {});
}

#[test]
fn a_redis_restart_mid_storm_loses_and_duplicates_nothing() {
    let mongo = PrivateMongo::start();
    let storage = private_storage(&mongo);
    let mut redis = LocalService::redis();
    let cluster = Cluster::start(&storage, &redis.redis_url());
    storm(cluster, 120, Duration::from_millis(20), || {
        std::thread::sleep(Duration::from_millis(700));
        redis.stop();
        std::thread::sleep(Duration::from_millis(800));
        redis.restart();
    });
}

/// Two peers on one database and Redis, without the storm harness.
fn two_peers(storage: &Storage, redis_url: &str) -> (Server, Server) {
    peer_pair(storage, redis_url, ("left_a", "left_b"), &[])
}

/// Two instances on one database and Redis, both linked, with extra settings.
fn peer_pair(
    storage: &Storage,
    redis_url: &str,
    nodes: (&str, &str),
    extra: &[(&str, &str)],
) -> (Server, Server) {
    let start = |node: &str| {
        let mut env = vec![
            ("PEER", "true"),
            ("REDIS_URL", redis_url),
            ("NODE_ID", node),
        ];
        env.extend_from_slice(extra);
        Server::start_with(storage, &env)
    };
    let servers = (start(nodes.0), start(nodes.1));
    wait_for_links([&servers.0, &servers.1]);
    servers
}

/// Issue 11 item 5 (peer mode): after a user left a group on instance A, the same user's
/// connection on instance B kept receiving the group's messages.
fn a_leave_on_one_peer_takes_the_user_out_of_rooms_on_every_peer(kind: RedisKind) {
    let storage = Storage::new(Backend::Mongo);
    let redis = TestRedis::start(kind);
    let (a, b) = two_peers(&storage, &redis.url());
    let group = unique("leave");
    let mut carol = a.login("carol");
    carol.request("create_group", ug("carol", &group));
    let mut dave = b.login("dave");
    dave.request("join_group", ug("dave", &group));
    dave.request("enter_group", ug("dave", &group));
    let mut alice_on_b = b.login("alice");
    alice_on_b.request("join_group", ug("alice", &group));
    alice_on_b.request("enter_group", ug("alice", &group));
    // Both rooms on B are live: a message from A reaches them.
    carol.request("send_message", msg("carol", &group, "before"));
    assert_eq!(dave.recv()["data"]["text"], "before");
    assert_eq!(alice_on_b.recv()["data"]["text"], "before");

    let mut alice_on_a = a.login("alice");
    let left = alice_on_a.request("leave_group", ug("alice", &group));
    assert_eq!(left["event"], "leave_success", "{left}");
    carol.request("send_message", msg("carol", &group, "after"));
    // Dave, on B, got it: B has handled the message (and, relayed before it, the leave).
    assert_eq!(dave.recv()["data"]["text"], "after");
    alice_on_b.send(&json!({"event": "ping", "id": "probe"}));
    let next = alice_on_b.recv();
    assert_eq!(
        next["id"], "probe",
        "alice, no longer a member, got a broadcast on B: {next}"
    );
}

/// Issue 11 item 9: a message stored by an instance that could not relay it (it died, or its
/// Redis link is gone) reached other instances' clients only when a later message arrived.
#[test]
fn a_stored_but_unrelayed_message_still_reaches_other_peers() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let dead_redis = format!("redis://127.0.0.1:{}/", common::free_port());
    let silent = Server::start_with(
        &storage,
        &[
            ("PEER", "true"),
            ("REDIS_URL", &dead_redis),
            ("NODE_ID", "silent"),
        ],
    );
    let listening = Server::start_with(
        &storage,
        &[
            ("PEER", "true"),
            ("REDIS_URL", &redis.redis_url()),
            ("NODE_ID", "listening"),
        ],
    );
    wait_for_links([&listening]);
    let group = unique("tail");
    let mut writer = silent.login("writer");
    writer.request("create_group", ug("writer", &group));
    let mut reader = listening.login("reader");
    reader.request("join_group", ug("reader", &group));
    reader.request("enter_group", ug("reader", &group));
    let ack = writer.request("send_message", msg("writer", &group, "never relayed"));
    assert_eq!(ack["event"], "message_sent", "{ack}");
    // No later message comes: the listening peer must find this one by itself.
    let line = reader.recv();
    assert_eq!(line["event"], "message_sent", "{line}");
    assert_eq!(line["data"]["text"], "never relayed");
    assert_eq!(line["data"]["seq"], 1);
}

/// Issue 13: the same user on two instances sends the same keys at once (a client that moved
/// to another instance and retried). Each key is stored once, both senders get the same
/// message, and the room on each instance sees every message once, in order.
fn keyed_sends_racing_on_two_peers_are_stored_and_delivered_once(kind: RedisKind) {
    let storage = Storage::new(Backend::Mongo);
    let redis = TestRedis::start(kind);
    let (a, b) = two_peers(&storage, &redis.url());
    let group = unique("keyed");
    let mut carol = a.login("carol");
    carol.request("create_group", ug("carol", &group));
    let mut alice_a = a.login("alice");
    alice_a.request("join_group", ug("alice", &group));
    carol.request("enter_group", ug("carol", &group));
    let mut dave = b.login("dave");
    dave.request("join_group", ug("dave", &group));
    dave.request("enter_group", ug("dave", &group));
    let mut alice_b = b.login("alice");

    let keys: Vec<String> = (1..=30).map(|i| format!("p-{i}")).collect();
    let racer = {
        let (keys, group) = (keys.clone(), group.clone());
        std::thread::spawn(move || common::send_keyed(&mut alice_b, &group, &keys))
    };
    let on_a = common::send_keyed(&mut alice_a, &group, &keys);
    let on_b = racer.join().expect("racer");
    for (x, y) in on_a.iter().zip(&on_b) {
        assert_eq!(x["_id"], y["_id"], "one message per key: {x} {y}");
    }
    alice_a.request("send_message", common::keyed_msg(&group, "end", "end"));
    for (name, observer) in [("carol", &mut carol), ("dave", &mut dave)] {
        let seqs: Vec<u64> = common::broadcasts_until(observer, "end")
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "{name}");
    }
    assert_eq!(common::fetch_all(&mut carol, "carol", &group).len(), 31);
}

fn relay_peers(storage: &Storage, redis_url: &str, mode: &str) -> (Server, Server) {
    let extra = [("PEER_RELAY", mode), ("METRICS_PORT", "0")];
    peer_pair(storage, redis_url, ("relay_a", "relay_b"), &extra)
}

/// Waits (bounded by the reply timeout) until a metric reaches `at_least`.
fn metric_reaches(server: &Server, name: &str, at_least: f64) -> bool {
    let deadline = Instant::now() + common::REPLY_TIMEOUT;
    while Instant::now() < deadline {
        if common::metric(server, name).is_some_and(|v| v >= at_least) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Issue 16: an instance receives a group's relay traffic only while one of its connections is
/// in that group's room; with `PEER_RELAY=shared` it receives everything.
fn an_instance_receives_only_the_groups_whose_room_it_hosts(kind: RedisKind) {
    let storage = Storage::new(Backend::Mongo);
    let redis = TestRedis::start(kind);
    // Subscribed while no room is hosted: the control channel, and on a cluster one heartbeat
    // channel per master.
    let idle_channels = redis.idle_channels() as f64;
    for (mode, expected_idle) in [("per_group", 0.0), ("shared", 40.0)] {
        let (a, b) = relay_peers(&storage, &redis.url(), mode);
        let group = unique("hosted");
        let mut alice = a.login("alice");
        alice.request("create_group", ug("alice", &group));
        alice.request("enter_group", ug("alice", &group));
        common::send_many(&mut alice, "alice", &group, 40, 8);
        alice.request("leave_group", ug("alice", &group));
        let relayed_idle = common::metric(&b, "noomnim_peer_relay_messages_in_total");
        assert!(
            metric_reaches(&b, "noomnim_peer_heartbeat_lag_ms", 0.0),
            "heartbeat metric"
        );
        if mode == "shared" {
            assert!(
                metric_reaches(&b, "noomnim_peer_relay_messages_in_total", expected_idle),
                "{mode}: B receives everything"
            );
        } else {
            assert_eq!(
                relayed_idle,
                Some(0.0),
                "{mode}: nothing for an unhosted group"
            );
            assert_eq!(
                common::metric(&b, "noomnim_peer_subscribed_channels"),
                Some(idle_channels),
                "only the control and heartbeat channels"
            );
        }
        // Once B hosts the room, it receives the group's messages, exactly once, in order.
        let mut alice = a.login("alice");
        alice.request("join_group", ug("alice", &group));
        let mut bob = b.login("bob");
        bob.request("join_group", ug("bob", &group));
        bob.request("enter_group", ug("bob", &group));
        if mode == "per_group" {
            assert!(metric_reaches(
                &b,
                "noomnim_peer_subscribed_channels",
                idle_channels + 1.0
            ));
        }
        // (Keys are per user and forever: the second mode needs its own.)
        let key = format!("live-{mode}");
        alice.request("send_message", common::keyed_msg(&group, "live", &key));
        let seen = common::broadcasts_until(&mut bob, &key);
        assert!(
            seen.is_empty(),
            "{mode}: nothing but the new message: {seen:?}"
        );
    }
}

/// Issue 16: rooms entered and left on one instance while a storm runs on another: every
/// visit sees its history and then every later message once, in order, with no gap.
fn rooms_entered_and_left_during_a_storm_miss_nothing(kind: RedisKind) {
    let mongo = PrivateMongo::start();
    let storage = private_storage(&mongo);
    let redis = TestRedis::start(kind);
    let (a, b) = relay_peers(&storage, &redis.url(), "per_group");
    let group = unique("churn");
    let other = unique("churn-other");
    let mut alice = a.login("alice");
    alice.request("create_group", ug("alice", &group));
    let mut bob = b.login("bob");
    bob.request("join_group", ug("bob", &group));
    bob.request("create_group", ug("bob", &other));
    let total = 300;
    let storm = {
        let group = group.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                alice.send(&json!({"event": "send_message", "data": msg("alice", &group, &format!("s{i}")), "id": i}));
                if i % 10 == 9 {
                    for _ in 0..10 {
                        assert_eq!(alice.recv()["event"], "message_sent");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            alice
        })
    };
    // Bob hops between the storm's room and another group's room a number of times; in each
    // visit the messages after his history must continue without a gap.
    for visit in 0..8 {
        let entered = bob.request("enter_group", ug("bob", &group));
        let history: Vec<u64> = ["read", "unread"]
            .iter()
            .flat_map(|k| entered["data"][k].as_array().cloned().unwrap_or_default())
            .filter_map(|m| m["seq"].as_u64())
            .collect();
        let mut last = history.iter().copied().max().unwrap_or(0);
        for _ in 0..10 {
            match bob.try_recv(Duration::from_millis(200)) {
                Some(line) if line["event"] == "message_sent" && line.get("id").is_none() => {
                    let seq = line["data"]["seq"].as_u64().expect("seq");
                    assert_eq!(seq, last + 1, "visit {visit}: gap or repeat after {last}");
                    last = seq;
                }
                Some(other) => panic!("unexpected {other}"),
                None => break,
            }
        }
        bob.request("visit_group", ug("bob", &other));
        while bob.try_recv(Duration::from_millis(20)).is_some() {}
    }
    let mut alice = storm.join().expect("storm");
    // Finally in the room for good: everything up to the end arrives once, in order.
    let entered = bob.request("enter_group", ug("bob", &group));
    let mut last = ["read", "unread"]
        .iter()
        .flat_map(|k| entered["data"][k].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["seq"].as_u64())
        .max()
        .unwrap_or(0);
    alice.request("send_message", common::keyed_msg(&group, "end", "end"));
    for line in common::broadcasts_until(&mut bob, "end") {
        let seq = line["seq"].as_u64().expect("seq");
        assert_eq!(seq, last + 1, "gap or repeat after {last}");
        last = seq;
    }
    assert_eq!(last, total as u64, "everything before the end marker");
    // A busy link is not taken for a silent one: heartbeats kept flowing during the storm.
    for server in [&a, &b] {
        assert_eq!(
            common::metric(server, "noomnim_peer_heartbeat_resets_total"),
            Some(0.0)
        );
    }
}

/// The test Redis Cluster (three masters, started by tools/services.sh).
fn redis_cluster() -> (String, Vec<u16>) {
    let url = std::env::var("NOOMNIM_TEST_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        panic!("NOOMNIM_TEST_REDIS_CLUSTER_URL is not set: start the test services with tools/services.sh")
    });
    let ports = std::env::var("NOOMNIM_TEST_REDIS_CLUSTER_PORTS")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|port| port.parse().ok())
        .collect();
    (url, ports)
}

/// `redis-cli -p PORT ARGS...`, its output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Issue 16 item 2: on a Redis Cluster the storm is delivered exactly once and in order, also
/// when every node drops every client connection mid-storm (as a node restart does): each
/// instance reconnects and resubscribes per shard and catches up from the database.
#[test]
fn three_peers_on_a_redis_cluster_survive_dropped_shard_links() {
    let mongo = PrivateMongo::start();
    let storage = private_storage(&mongo);
    let (url, ports) = redis_cluster();
    let cluster = Cluster::start(&storage, &url);
    storm(cluster, 120, Duration::from_millis(20), || {
        std::thread::sleep(Duration::from_millis(700));
        for &port in &ports {
            redis_cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
            redis_cli(port, &["CLIENT", "KILL", "TYPE", "normal"]);
        }
    });
}

/// Issue 16 item 2: relay channels are sharded channels spread over the masters, and an
/// instance still receives exactly the groups whose rooms it hosts.
#[test]
fn on_a_redis_cluster_group_channels_spread_over_the_shards() {
    const GROUPS: usize = 12;
    let storage = Storage::new(Backend::Mongo);
    let (url, ports) = redis_cluster();
    let (a, b) = relay_peers(&storage, &url, "per_group");
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let groups: Vec<String> = (0..GROUPS).map(|_| unique("shard")).collect();
    for group in &groups {
        alice.request("create_group", ug("alice", group));
        bob.request("join_group", ug("bob", group));
    }
    // Bob's room on B subscribes B to one group at a time; each delivers its message once.
    for (i, group) in groups.iter().enumerate() {
        bob.request("enter_group", ug("bob", group));
        let key = format!("shard-{i}");
        alice.request("send_message", common::keyed_msg(group, "hi", &key));
        let seen = common::broadcasts_until(&mut bob, &key);
        assert!(seen.is_empty(), "only the new message: {seen:?}");
    }
    assert!(metric_reaches(
        &b,
        "noomnim_peer_relay_messages_in_total",
        1.0
    ));
    // The groups' channels are sharded channels, living on more than one master (12 groups on
    // one of three masters would be a 1-in-177,147 chance).
    let holding: Vec<usize> = ports
        .iter()
        .map(|&port| {
            redis_cli(port, &["PUBSUB", "SHARDCHANNELS", "*:g:shard*"])
                .lines()
                .filter(|line| !line.trim().is_empty())
                .count()
        })
        .collect();
    assert!(
        holding.iter().filter(|&&n| n > 0).count() >= 2,
        "group channels per master: {holding:?}"
    );
    assert!(holding.iter().sum::<usize>() >= 1);
}

/// Issue 16 item 3: a subscription that silently stops delivering (the connection stays up,
/// nothing arrives) is noticed through the missing heartbeat, resubscribed, and what was
/// published meanwhile reaches the room from the database.
#[test]
fn a_silently_dead_subscription_is_noticed_and_recovered() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let proxy = common::MutingProxy::start(redis.port);
    let (a, b) = relay_peers(&storage, &proxy.redis_url(), "per_group");
    let group = unique("silent");
    let mut alice = a.login("alice");
    alice.request("create_group", ug("alice", &group));
    let mut bob = b.login("bob");
    bob.request("join_group", ug("bob", &group));
    bob.request("enter_group", ug("bob", &group));
    assert!(metric_reaches(&b, "noomnim_peer_subscribed_channels", 2.0));
    alice.request(
        "send_message",
        common::keyed_msg(&group, "before", "silent-0"),
    );
    assert!(common::broadcasts_until(&mut bob, "silent-0").is_empty());
    // From now on the subscribers' connections deliver nothing, yet stay open.
    proxy.mute_subscribers();
    for i in 1..=5 {
        let key = format!("silent-{i}");
        alice.request("send_message", common::keyed_msg(&group, "during", &key));
    }
    assert!(
        metric_reaches(&b, "noomnim_peer_heartbeat_resets_total", 1.0),
        "B noticed its silent subscription"
    );
    let seen = common::broadcasts_until(&mut bob, "silent-5");
    let keys: Vec<&str> = seen
        .iter()
        .filter_map(|m| m["client_msg_id"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["silent-1", "silent-2", "silent-3", "silent-4"],
        "once, in order"
    );
}

/// Issue 22 item 2: idle rooms cost the store nothing. Every occupied room used to read the
/// database every 2 s (150 idle rooms: 69 reads/s, and everyone's requests queued behind
/// them). Now one batched head check covers all rooms, and no room reads messages while no
/// message is missing: across several head checks, no catch-up read happens.
fn idle_rooms_read_nothing_from_the_store(kind: RedisKind) {
    let storage = Storage::new(Backend::Mongo);
    let redis = TestRedis::start(kind);
    let (a, b) = relay_peers(&storage, &redis.url(), "per_group");
    let tag = unique("idle");
    let mut idle = Vec::new();
    for i in 0..100 {
        let user = format!("{tag}-u{i}");
        let group = format!("{tag}-g{i}");
        let mut client = a.login(&user);
        client.request("create_group", ug(&user, &group));
        let entered = client.request("enter_group", ug(&user, &group));
        assert_eq!(entered["event"], "enter_group", "{entered}");
        idle.push(client);
    }
    // One busy group across the two instances: its messages arrive through the relay.
    let group = format!("{tag}-busy");
    let mut writer = b.login(&format!("{tag}-writer"));
    writer.request("create_group", ug(&format!("{tag}-writer"), &group));
    let mut reader = a.login(&format!("{tag}-reader"));
    reader.request("join_group", ug(&format!("{tag}-reader"), &group));
    reader.request("enter_group", ug(&format!("{tag}-reader"), &group));
    // Each newly watched group reads once what was published before its subscription took
    // effect (101 groups here); after that, nothing.
    assert!(metric_reaches(&a, "noomnim_peer_catch_ups_total", 101.0));
    let checks = common::metric(&a, "noomnim_peer_head_checks_total").expect("metric");
    let before = common::metric(&a, "noomnim_peer_catch_ups_total").expect("metric");
    assert_eq!(before, 101.0, "one read per watched group");
    for i in 0..3 {
        let ack = writer.request(
            "send_message",
            msg(&format!("{tag}-writer"), &group, &format!("m{i}")),
        );
        assert_eq!(ack["event"], "message_sent", "{ack}");
        assert_eq!(reader.recv()["data"]["text"], format!("m{i}"));
        // Wait for a fresh head check after each message (bounded by the metric wait).
        assert!(metric_reaches(
            &a,
            "noomnim_peer_head_checks_total",
            checks + 2.0 * (i + 1) as f64
        ));
    }
    let after = common::metric(&a, "noomnim_peer_catch_ups_total").expect("metric");
    assert_eq!(
        after, before,
        "100 idle rooms and a relayed busy one read no messages from the store"
    );
    for client in &mut idle[..3] {
        assert!(client.try_request_ping());
    }
}

/// Issue 22 item 2: a peer killed with -9 may have stored a message it never published; its
/// heartbeats stop, and the other instance reads what its rooms may have missed, once.
#[test]
fn a_killed_peer_makes_the_others_read_once() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let (a, mut b) = relay_peers(&storage, &redis.redis_url(), "per_group");
    let group = unique("killed");
    let mut reader = a.login("reader");
    reader.request("create_group", ug("reader", &group));
    reader.request("enter_group", ug("reader", &group));
    let mut writer = b.login("writer");
    writer.request("join_group", ug("writer", &group));
    writer.request("send_message", msg("writer", &group, "before"));
    assert_eq!(reader.recv()["data"]["text"], "before");
    let before = common::metric(&a, "noomnim_peer_catch_ups_total").expect("metric");
    b.kill();
    assert!(
        a.logged("fell silent; reading what they may have stored"),
        "{}",
        a.log_text()
    );
    assert!(metric_reaches(
        &a,
        "noomnim_peer_catch_ups_total",
        before + 1.0
    ));
}
