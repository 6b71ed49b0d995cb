//! The client packages in clients/ (Python asyncio, Node), run against the real server
//! in their cut-off scenario: a sender loses its connection 12 times mid-stream (alternately a
//! clean close and an abandoned socket), reconnects, resumes by seq and resends everything
//! unacknowledged with the same `client_msg_id`s; a watcher must receive every message exactly
//! once, in seq order, and the store must hold each once. The Python client also runs it across
//! a peer hop (two instances; the watcher resumes on the other one).

mod common;

use std::process::Command;

use common::{Backend, Server, Storage};

/// The Python package's module, which also runs as a program (`scenario`).
const PYTHON_CLIENT: &str = "python/src/noomnim_client/__init__.py";

backend_tests!(
    python_client_survives_cut_offs,
    node_client_survives_cut_offs
);

fn run_scenario(backend: Backend, program: &str, script: &str) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let script = format!("{}/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let port = server.addr.port().to_string();
    // The MongoDB test server is single-threaded and slow: fewer messages, as many cut-offs.
    let messages = match backend {
        Backend::Embedded => "300",
        Backend::Mongo => "100",
    };
    let output = Command::new(program)
        .args([&script, "scenario", "--port", &port, "--messages", messages])
        .args(["--cutoffs", "12", "--prefix", &common::unique(program)])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} scenario failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("12 cut-offs") && stdout.contains("lost=0 duplicated=0 out_of_order=0"),
        "{stdout}"
    );
}

fn python_client_survives_cut_offs(backend: Backend) {
    run_scenario(backend, "python3", PYTHON_CLIENT);
}

/// Issue 23: the same naive printing loop across a peer hop. Two instances share one MongoDB
/// and a Redis; the sender reconnects to either in turn and the watcher, cut off halfway,
/// resumes (`since_seq`) on the other instance: still every message once, in order.
#[test]
fn python_client_survives_cut_offs_and_a_peer_hop() {
    let storage = Storage::new(Backend::Mongo);
    let redis = common::LocalService::redis();
    let start = |node: &str| {
        Server::start_with(
            &storage,
            &[
                ("PEER", "true"),
                ("REDIS_URL", &redis.redis_url()),
                ("NODE_ID", node),
            ],
        )
    };
    let (a, b) = (start("hop_a"), start("hop_b"));
    for server in [&a, &b] {
        assert!(server.logged("peer subscriber: connected"));
    }
    let script = format!("{}/clients/{PYTHON_CLIENT}", env!("CARGO_MANIFEST_DIR"));
    let (port, hop) = (a.addr.port().to_string(), b.addr.port().to_string());
    let output = Command::new("python3")
        .args([&script, "scenario", "--port", &port, "--hop-port", &hop])
        .args(["--messages", "100", "--cutoffs", "12"])
        .args(["--prefix", &common::unique("hop")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("peer hop") && stdout.contains("lost=0 duplicated=0 out_of_order=0"),
        "{stdout}"
    );
    assert!(stdout.contains("protocol=3 gaps=0"), "{stdout}");
}

fn node_client_survives_cut_offs(backend: Backend) {
    run_scenario(backend, "node", "node/index.js");
}

/// Issue 26 item 2: each package installs into a fresh environment, as a user would install
/// it (`pip install ./clients/python` into a new venv; `npm install` of the packed tarball into
/// a new directory), and its own tests pass there against a real server.
#[test]
fn the_client_packages_install_fresh_and_pass_their_own_tests() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let port = server.addr.port().to_string();
    let root = env!("CARGO_MANIFEST_DIR");
    let scratch = std::env::temp_dir().join(common::unique("packages"));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let run = |program: &str, args: &[&str], dir: &std::path::Path| {
        let output = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("NOOMNIM_PORT", &port)
            // The packages' tests erase a user through the store, as an operator would.
            .env("NOOMNIM_BINARY", common::BINARY)
            .envs(storage.env())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let venv = scratch.join("venv");
    let venv_text = venv.display().to_string();
    run("python3", &["-m", "venv", &venv_text], &scratch);
    let python = venv.join("bin/python").display().to_string();
    let package = format!("{root}/clients/python");
    run(&python, &["-m", "pip", "install", "-q", &package], &scratch);
    // From the scratch directory: the tests import the installed package, not the source.
    let tests = format!("{root}/clients/python/tests");
    let report = run(
        &python,
        &["-m", "unittest", "discover", "-s", &tests],
        &scratch,
    );
    assert!(report.contains("OK"), "{report}");
    let node_dir = scratch.join("node");
    std::fs::create_dir_all(&node_dir).expect("node dir");
    let node_text = node_dir.display().to_string();
    let node_package = format!("{root}/clients/node");
    run(
        "npm",
        &["pack", &node_package, "--pack-destination", &node_text],
        &node_dir,
    );
    run("npm", &["init", "-y"], &node_dir);
    run(
        "npm",
        &[
            "install",
            "--no-audit",
            "--no-fund",
            "./noomnim-client-0.4.0.tgz",
        ],
        &node_dir,
    );
    run(
        "node",
        &["--test", "node_modules/noomnim-client/test/"],
        &node_dir,
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
