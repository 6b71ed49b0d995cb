//! The reference clients in tools/clients/ (Python asyncio, Node), run against the real server
//! in their cut-off scenario: a sender loses its connection 12 times mid-stream (alternately a
//! clean close and an abandoned socket), reconnects, resumes by seq and resends everything
//! unacknowledged with the same `client_msg_id`s; a watcher must receive every message exactly
//! once, in seq order, and the store must hold each once.

mod common;

use std::process::Command;

use common::{Backend, Server, Storage};

backend_tests!(
    python_client_survives_cut_offs,
    node_client_survives_cut_offs
);

fn run_scenario(backend: Backend, program: &str, script: &str) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let script = format!("{}/tools/clients/{script}", env!("CARGO_MANIFEST_DIR"));
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
    run_scenario(backend, "python3", "python/noomnim_client.py");
}

fn node_client_survives_cut_offs(backend: Backend) {
    run_scenario(backend, "node", "node/noomnim_client.js");
}
