//! `noomnim cli`: a terminal client, interactive (`noomnim cli`) or one command at a time for
//! scripts (`send`, `tail`, `history`, `ping`). It speaks the same newline-delimited JSON as
//! any client, through the library's own framing (`LineFramer`) and encoder (`encode_line`).
//!
//! Exit codes of the one-shot commands: 0 done (for `send`: stored, or a repeat of a stored
//! `--client-msg-id`), 1 not done (refused, or the connection failed: `send` with the same
//! `--client-msg-id` is then safe to retry), 2 usage.

mod interactive;
mod link;
mod show;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use show::say;

pub use link::{describe_error, Incoming, Link};

pub const USAGE: &str = "usage: noomnim cli [OPTIONS] [COMMAND]
  (no command)                 interactive: /help lists the slash commands
  send GROUP TEXT              store one message; exit 0 when stored [--client-msg-id ID]
  tail GROUP                   follow a group like tail -f, exactly once across reconnects
                               [--since SEQ] [--json]
  history GROUP                print the newest messages, oldest first [--limit N] [--json]
  ping                         measure round trips like redis-cli --latency [--count N]
options: --host H (127.0.0.1)  --port P (7777; 7443 with --tls)  --user NAME ($NOOMNIM_USER, $USER)
         --tls --ca FILE [--server-name NAME]  --token JWT | --token-secret SECRET
         --history FILE (interactive history; ~/.noomnim_history)
environment: NOOMNIM_HOST, NOOMNIM_PORT, NOOMNIM_USER, NOOMNIM_TOKEN";

/// Parsed command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub tls: bool,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub token: Option<String>,
    pub token_secret: Option<String>,
    pub json: bool,
    pub since: Option<u64>,
    pub limit: Option<u64>,
    pub count: Option<u64>,
    pub client_msg_id: Option<String>,
    pub history_file: Option<PathBuf>,
    /// Whether logging in makes the user online to others (the interactive cli: a person is
    /// there); one-shot commands and `tail` say `hello {presence: false}`.
    pub present: bool,
    /// The command and its arguments.
    pub words: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut options = Options {
            host: env("NOOMNIM_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            user: env("NOOMNIM_USER").or_else(|| env("USER")),
            token: env("NOOMNIM_TOKEN"),
            ..Options::default()
        };
        let mut port = env("NOOMNIM_PORT");
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match arg.as_str() {
                "--host" => options.host = value(arg)?,
                "--port" => port = Some(value(arg)?),
                "--user" => options.user = Some(value(arg)?),
                "--tls" => options.tls = true,
                "--ca" => options.ca = Some(value(arg)?.into()),
                "--server-name" => options.server_name = Some(value(arg)?),
                "--token" => options.token = Some(value(arg)?),
                "--token-secret" => options.token_secret = Some(value(arg)?),
                "--json" => options.json = true,
                "--since" => options.since = Some(number(arg, &value(arg)?)?),
                "--limit" => options.limit = Some(number(arg, &value(arg)?)?),
                "--count" => options.count = Some(number(arg, &value(arg)?)?),
                "--client-msg-id" => options.client_msg_id = Some(value(arg)?),
                "--history" => options.history_file = Some(value(arg)?.into()),
                "-h" | "--help" => return Err(String::new()),
                flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
                word => options.words.push(word.to_string()),
            }
        }
        options.port = match port {
            Some(port) => port
                .parse()
                .map_err(|_| format!("--port must be a port number, not {port:?}"))?,
            None if options.tls => 7443,
            None => 7777,
        };
        Ok(options)
    }

    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.host)
    }

    pub fn user(&self) -> Result<String, String> {
        self.user
            .clone()
            .ok_or_else(|| "no user: give --user NAME (or set NOOMNIM_USER)".to_string())
    }

    /// The token to log in with: `--token`, or one minted from `--token-secret` (1 hour).
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let Some(secret) = &self.token_secret else {
            return Ok(None);
        };
        let secret = crate::auth::Secret::new(secret.as_bytes().to_vec());
        crate::auth::Authenticator::new(&secret, None)
            .mint(&self.user()?, 3600)
            .map(Some)
    }
}

fn number(flag: &str, text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{flag} must be a whole number, not {text:?}"))
}

/// `noomnim cli ...`.
pub fn run(args: Vec<String>) -> ExitCode {
    let options = match Options::parse(&args) {
        Ok(options) => options,
        Err(problem) => {
            // Asked for (`--help`): the usage on stdout, exit 0, as `noomnim --help`.
            if problem.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("noomnim cli: {problem}");
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let words: Vec<&str> = options.words.iter().map(String::as_str).collect();
    let outcome = match words.as_slice() {
        [] => interactive::run(&options),
        ["send", group, text] => send(&options, group, text),
        ["tail", group] => tail(&options, group),
        ["history", group] => history(&options, group),
        ["ping"] => ping(&options),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("noomnim cli: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// `send GROUP TEXT`: exit 0 once the server says it is stored.
fn send(options: &Options, group: &str, text: &str) -> Result<(), String> {
    let (mut link, _) = Link::connect_and_login(options)?;
    let mut data = json!({"group_name": group, "text": text});
    if let Some(id) = &options.client_msg_id {
        data["client_msg_id"] = json!(id);
    }
    let reply = link.call("send_message", data)?;
    if reply["event"] != "message_sent" {
        return Err(format!("not stored: {}", describe_error(&reply)));
    }
    if options.json {
        say(&reply["data"]);
    } else {
        let repeat = if reply["data"]["duplicate"] == true {
            " (already stored before)"
        } else {
            ""
        };
        say(format!(
            "stored as #{} in {group}{repeat}",
            reply["data"]["seq"]
        ));
    }
    Ok(())
}

/// Where a follower of a group stands: the newest seq it printed, of which epoch.
#[derive(Debug, Clone)]
pub struct Follow {
    pub group: String,
    pub last_seq: u64,
    pub epoch: Option<String>,
}

impl Follow {
    /// Asks for everything after `last_seq` (a gapless resume); the reply says what happened.
    pub fn resume(&mut self, link: &mut Link) -> Result<Value, String> {
        let mut data = json!({"group_name": self.group, "since_seq": self.last_seq});
        if let Some(epoch) = &self.epoch {
            data["since_epoch"] = json!(epoch);
        }
        let reply = link.call("enter_group", data)?;
        if reply["event"] != "enter_group" {
            return Err(describe_error(&reply));
        }
        if reply["data"]["epoch_changed"] == true {
            self.last_seq = 0;
        }
        self.epoch = reply["data"]["epoch"].as_str().map(str::to_string);
        Ok(reply)
    }

    /// A new message of this group (not one already printed).
    pub fn takes(&mut self, line: &Value) -> bool {
        let data = &line["data"];
        if line["event"] != "message_sent" || data["group_name"] != self.group.as_str() {
            return false;
        }
        let Some(seq) = data["seq"].as_u64() else {
            return false;
        };
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        true
    }
}

/// `tail GROUP`: prints every message of the group from `--since` (default: from now) and
/// follows, reconnecting and resuming after the last seq printed, so each is printed once.
fn tail(options: &Options, group: &str) -> Result<(), String> {
    let mut follow = Follow {
        group: group.to_string(),
        last_seq: 0,
        epoch: None,
    };
    let mut first = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut link = match Link::connect_and_login(options) {
            Ok((link, _)) => link,
            Err(problem) if !first => {
                eprintln!("noomnim cli: {problem}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(problem) => return Err(problem),
        };
        if first {
            // From `--since`, else from the group's newest message on.
            follow.last_seq = match options.since {
                Some(since) => since,
                None => newest_seq(&mut link, group)?,
            };
            first = false;
        }
        let reply = follow.resume(&mut link)?;
        if reply["data"]["truncated"] == true {
            eprintln!(
                "noomnim cli: messages before #{} are no longer stored",
                reply["data"]["first_seq"]
            );
        }
        backoff = Duration::from_millis(100);
        loop {
            match link.next(None) {
                Ok(Incoming::Line(line)) => {
                    if follow.takes(&line) {
                        show::print_message(&line["data"], options.json, false);
                    } else if show::is_change(&line) && line["data"]["group_name"] == group {
                        show::print_change(&line, options.json);
                    } else if line["event"] == "group_deleted" {
                        return Err(format!("group {group} was deleted"));
                    }
                }
                Ok(Incoming::Quiet) => {}
                Err(error) => {
                    if let Some(reason) = link.ended_for_good() {
                        return Err(reason.to_string());
                    }
                    eprintln!("noomnim cli: connection lost ({error}); reconnecting");
                    break;
                }
            }
        }
    }
}

/// The group's newest seq (0: no messages), for following from now on.
fn newest_seq(link: &mut Link, group: &str) -> Result<u64, String> {
    let page = link.call("fetch_messages", json!({"group_name": group, "limit": 1}))?;
    if page["event"] != "messages" {
        return Err(describe_error(&page));
    }
    Ok(page["data"]["messages"][0]["seq"].as_u64().unwrap_or(0))
}

/// `history GROUP [--limit N]`: the newest N (default 50) messages, oldest first.
fn history(options: &Options, group: &str) -> Result<(), String> {
    let (mut link, _) = Link::connect_and_login(options)?;
    let wanted = options.limit.unwrap_or(50).max(1);
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut got = 0;
    let mut before: Option<u64> = None;
    while got < wanted {
        let mut data = json!({"group_name": group, "limit": (wanted - got).min(100)});
        if let Some(before) = before {
            data["before_seq"] = json!(before);
        }
        let page = link.call("fetch_messages", data)?;
        if page["event"] != "messages" {
            return Err(describe_error(&page));
        }
        let messages = page["data"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        got += messages.len() as u64;
        before = messages.first().and_then(|m| m["seq"].as_u64());
        let more = page["data"]["has_more"] == true;
        pages.push(messages);
        if !more || before.is_none() {
            break;
        }
    }
    for message in pages.iter().rev().flatten() {
        show::print_message(message, options.json, false);
    }
    Ok(())
}

/// `ping [--count N]`: N round trips (default 10), one every 100 ms, then min/avg/max and p99.
fn ping(options: &Options) -> Result<(), String> {
    let mut link = Link::connect(options)
        .map_err(|e| format!("cannot connect to {}:{}: {e}", options.host, options.port))?;
    let count = options.count.unwrap_or(10).max(1);
    let mut samples = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let reply = link.call("ping", json!({}))?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if reply["event"] != "pong" {
            return Err(describe_error(&reply));
        }
        samples.push(ms);
        if options.json {
            say(json!({"seq": i + 1, "ms": ms}));
        }
        if i + 1 < count {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    samples.sort_by(f64::total_cmp);
    let average = samples.iter().sum::<f64>() / samples.len() as f64;
    let p99 = samples[((samples.len() as f64 * 0.99) as usize).min(samples.len() - 1)];
    let (min, max) = (samples[0], samples[samples.len() - 1]);
    if options.json {
        say(
            json!({"samples": samples.len(), "min_ms": min, "avg_ms": average, "max_ms": max, "p99_ms": p99}),
        );
    } else {
        say(format!("min: {min:.3} ms, avg: {average:.3} ms, max: {max:.3} ms, p99: {p99:.3} ms ({} samples)", samples.len()));
    }
    Ok(())
}
