//! Interactive `noomnim cli`: a line editor (rustyline: editing, history across runs in
//! `~/.noomnim_history`, tab completion of slash commands, event names and the groups seen)
//! over one connection kept by a thread of its own. Lines from the server are printed above
//! the prompt through rustyline's external printer, so a half-typed line stays intact. The
//! connection thread reconnects by itself and resumes the room it was in after the last seq
//! shown (protocol 3's gapless resume), so nothing is missed or shown twice.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter, Helper};
use serde_json::{json, Value};

use super::show;
use super::{describe_error, Follow, Incoming, Link, Options};

/// The slash commands, with what they take.
const COMMANDS: [(&str, &str); 22] = [
    ("/help", "this list"),
    ("/join", "GROUP: become a member"),
    ("/leave", "GROUP: stop being a member"),
    ("/create", "GROUP: make a group (you own it)"),
    ("/enter", "GROUP: enter its room (history, then live)"),
    (
        "/say",
        "TEXT: send to the room you are in (plain text does the same)",
    ),
    (
        "/history",
        "[GROUP] [N]: the newest N messages (default: the room, 20)",
    ),
    (
        "/dm",
        "NAME: talk to one person (opens and enters your direct conversation)",
    ),
    ("/groups", "your groups, with unread counts"),
    ("/list", "every group"),
    ("/read", "[GROUP]: mark everything read"),
    (
        "/reply",
        "SEQ TEXT: answer a message in the room (in its thread)",
    ),
    (
        "/thread",
        "SEQ: a message's thread, the message and its replies",
    ),
    ("/edit", "SEQ TEXT: change a message of yours in the room"),
    ("/delete", "SEQ: delete a message in the room"),
    ("/typing", "tell the room you are typing"),
    (
        "/notify",
        "all|mentions|none [GROUP]: what the room's messages should tell you",
    ),
    (
        "/block",
        "NAME: no direct messages from them (/unblock NAME undoes it)",
    ),
    ("/unblock", "NAME: take them off your blocked list"),
    ("/raw", "{json}: send a request as typed"),
    ("/who", "who you are and where"),
    ("/quit", "leave (also Ctrl-D)"),
];

/// What the editor and the connection thread share.
#[derive(Default)]
struct Shared {
    /// Group names seen (for completion).
    groups: BTreeSet<String>,
    /// The room entered, and how far its messages were shown.
    room: Option<Follow>,
    /// The group of the last `/enter`, until its reply (to say `/join` when not a member).
    entering: Option<String>,
    /// Usernames seen (authors, the online, direct partners): `@name` completion.
    names: BTreeSet<String>,
    /// A request a reply calls for (`/dm` enters the conversation it opened).
    follow_up: Option<(&'static str, Value)>,
}

/// TabCompletion of commands, event names (after `/raw {"event":"`) and group names.
struct TabCompletion {
    shared: Arc<Mutex<Shared>>,
}

impl Completer for TabCompletion {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(' ').map_or(0, |i| i + 1);
        let word = &before[start..];
        let pair = |text: String| Pair {
            display: text.clone(),
            replacement: text,
        };
        if start == 0 {
            let found = COMMANDS
                .iter()
                .filter(|(name, _)| name.starts_with(word))
                .map(|(name, _)| pair(format!("{name} ")))
                .collect();
            return Ok((0, found));
        }
        const EVENT_KEY: &str = "{\"event\":\"";
        if before.starts_with("/raw") && EVENT_KEY.starts_with(word) || word.starts_with(EVENT_KEY)
        {
            let typed = word.get(EVENT_KEY.len()..).unwrap_or("");
            let found = crate::ops::event_names()
                .into_iter()
                .filter(|name| name.starts_with(typed))
                .map(|name| pair(format!("{EVENT_KEY}{name}\",\"data\":{{}}}}")))
                .collect();
            return Ok((start, found));
        }
        if let Some(typed) = word.strip_prefix('@') {
            let names = self
                .shared
                .lock()
                .map(|s| s.names.clone())
                .unwrap_or_default();
            let found = names
                .into_iter()
                .chain(std::iter::once(crate::model::ROOM_MENTION[1..].to_string()))
                .filter(|name| name.starts_with(typed))
                .map(|name| pair(format!("@{name} ")))
                .collect();
            return Ok((start, found));
        }
        let groups = self
            .shared
            .lock()
            .map(|s| s.groups.clone())
            .unwrap_or_default();
        let found = groups
            .into_iter()
            .filter(|name| name.starts_with(word))
            .map(|name| pair(format!("{name} ")))
            .collect();
        Ok((start, found))
    }
}

impl Hinter for TabCompletion {
    type Hint = String;
}
impl Highlighter for TabCompletion {}
impl Validator for TabCompletion {}
impl Helper for TabCompletion {}

/// What the editor asks of the connection thread.
enum Outgoing {
    Request(&'static str, Value),
    Raw(String),
}

/// Where lines go: above the prompt (rustyline's printer), or plain stdout when there is no
/// terminal to draw a prompt on.
struct Screen {
    printer: Option<Box<dyn ExternalPrinter + Send>>,
}

impl Screen {
    fn say(&mut self, text: String) {
        match &mut self.printer {
            Some(printer) => {
                if printer.print(text.clone()).is_err() {
                    println!("{text}");
                }
            }
            None => println!("{text}"),
        }
    }
}

pub fn run(options: &Options) -> Result<(), String> {
    // A person at a prompt is someone online.
    let options = &Options {
        present: true,
        ..options.clone()
    };
    let (link, login) = Link::connect_and_login(options)?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    if let Ok(mut state) = shared.lock() {
        let names = login["data"]["group_list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        state
            .groups
            .extend(names.iter().filter_map(|n| n.as_str().map(str::to_string)));
    }
    let config = rustyline::Config::builder()
        .completion_type(rustyline::CompletionType::List)
        .auto_add_history(true)
        .build();
    let mut editor: Editor<TabCompletion, DefaultHistory> =
        Editor::with_config(config).map_err(|e| format!("cannot start the line editor: {e}"))?;
    editor.set_helper(Some(TabCompletion {
        shared: shared.clone(),
    }));
    let history = history_path(options);
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    let printer = editor
        .create_external_printer()
        .ok()
        .map(|p| Box::new(p) as Box<dyn ExternalPrinter + Send>);
    let on = show::colour();
    let screen = Screen { printer };
    let user = options.user()?;
    // Printed before the editor starts: through the printer it was drawn over by the prompt.
    println!(
        "logged in as {user} on {}:{}; /help lists the commands, Ctrl-D or /quit leaves",
        options.host, options.port
    );
    let (to_link, from_editor) = crossbeam_channel::unbounded();
    let thread_shared = shared.clone();
    let thread_options = options.clone();
    std::thread::Builder::new()
        .name("cli-link".into())
        .spawn(move || keep_link(link, thread_options, from_editor, thread_shared, screen, on))
        .map_err(|e| format!("cannot start the connection thread: {e}"))?;
    let prompt = format!("{user}> ");
    // Ctrl-C drops the line being typed and says how to leave; a second one in a row leaves
    // (as psql and redis-cli let Ctrl-C end them without losing a line typed by mistake).
    let mut interrupted = false;
    loop {
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) if interrupted => break,
            Err(ReadlineError::Interrupted) => {
                interrupted = true;
                println!("(line dropped; Ctrl-C again, Ctrl-D or /quit to leave)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(format!("reading the terminal failed: {error}")),
        };
        interrupted = false;
        if let Some(path) = &history {
            let _ = editor.append_history(path);
        }
        match command(line.trim(), &shared) {
            Command::Quit => break,
            Command::Say(text) => println!("{text}"),
            Command::Send(outgoing) => {
                if to_link.send(outgoing).is_err() {
                    return Err("the connection thread stopped".into());
                }
            }
            Command::Nothing => {}
        }
    }
    if let Some(path) = &history {
        let _ = editor.append_history(path);
    }
    Ok(())
}

fn history_path(options: &Options) -> Option<std::path::PathBuf> {
    options.history_file.clone().or_else(|| {
        std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".noomnim_history"))
    })
}

enum Command {
    Send(Outgoing),
    Say(String),
    Quit,
    Nothing,
}

/// What a typed line means.
fn command(line: &str, shared: &Arc<Mutex<Shared>>) -> Command {
    let room = shared
        .lock()
        .ok()
        .and_then(|s| s.room.as_ref().map(|f| f.group.clone()));
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let request = |event: &'static str, data: Value| Command::Send(Outgoing::Request(event, data));
    let in_room = |make: &dyn Fn(&str) -> Command| match &room {
        Some(group) => make(group),
        None => Command::Say("enter a group first: /enter GROUP".into()),
    };
    let group_or_room = |word: &str| {
        if word.is_empty() {
            room.clone()
        } else {
            Some(word.to_string())
        }
    };
    match verb {
        "" => Command::Nothing,
        "/quit" | "/exit" => Command::Quit,
        "/help" => Command::Say(
            COMMANDS
                .iter()
                .map(|(name, what)| format!("  {name:<9} {what}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        "/join" | "/leave" | "/create" if !rest.is_empty() => {
            let event = match verb {
                "/join" => "join_group",
                "/leave" => "leave_group",
                _ => "create_group",
            };
            request(event, json!({"group_name": rest}))
        }
        "/enter" if !rest.is_empty() => {
            if let Ok(mut state) = shared.lock() {
                state.room = None;
                state.entering = Some(rest.to_string());
            }
            request("enter_group", json!({"group_name": rest}))
        }
        "/say" if !rest.is_empty() => in_room(&|group| request("send_message", said(group, rest))),
        "/dm" if !rest.is_empty() => request("open_direct", json!({"username": rest})),
        "/block" | "/unblock" if !rest.is_empty() => {
            let event = if verb == "/block" {
                "block_user"
            } else {
                "unblock_user"
            };
            request(event, json!({"username": rest}))
        }
        "/notify" => {
            let (level, group) = rest.split_once(' ').unwrap_or((rest, ""));
            match (level, group_or_room(group.trim())) {
                ("all" | "mentions" | "none", Some(group)) => {
                    request("set_notify", json!({"group_name": group, "level": level}))
                }
                _ => Command::Say("/notify all|mentions|none [GROUP]".into()),
            }
        }
        "/history" => {
            let mut words = rest.split_whitespace();
            let (first, second) = (words.next().unwrap_or(""), words.next());
            let (group, limit) = match first.parse::<u64>() {
                Ok(n) => (room.clone(), n),
                Err(_) => (
                    group_or_room(first),
                    second.and_then(|n| n.parse().ok()).unwrap_or(20),
                ),
            };
            match group {
                Some(group) => request(
                    "fetch_messages",
                    json!({"group_name": group, "limit": limit.clamp(1, 100)}),
                ),
                None => Command::Say("/history GROUP [N]".into()),
            }
        }
        "/groups" => request("my_groups", json!({})),
        "/list" => request("list_groups", json!({})),
        "/read" => match group_or_room(rest) {
            // A seq past the newest is clamped by the server: "everything".
            Some(group) => request(
                "mark_read",
                json!({"group_name": group, "seq": 9_223_372_036_854_775_807_u64}),
            ),
            None => Command::Say("/read GROUP".into()),
        },
        "/edit" => match rest
            .split_once(' ')
            .map(|(seq, text)| (seq.parse::<u64>(), text))
        {
            Some((Ok(seq), text)) => in_room(&|group| {
                request(
                    "edit_message",
                    json!({"group_name": group, "seq": seq, "text": text}),
                )
            }),
            _ => Command::Say("/edit SEQ TEXT".into()),
        },
        "/reply" => match rest
            .split_once(' ')
            .map(|(seq, text)| (seq.parse::<u64>(), text.trim()))
        {
            Some((Ok(seq), text)) if !text.is_empty() => in_room(&|group| {
                let mut data = said(group, text);
                data["reply_to"] = json!(seq);
                request("send_message", data)
            }),
            _ => Command::Say("/reply SEQ TEXT".into()),
        },
        "/thread" => match rest.parse::<u64>() {
            Ok(seq) => in_room(&|group| {
                request(
                    "fetch_messages",
                    json!({"group_name": group, "thread": seq, "after_seq": 0, "limit": 100}),
                )
            }),
            Err(_) => Command::Say("/thread SEQ".into()),
        },
        "/delete" => match rest.parse::<u64>() {
            Ok(seq) => in_room(&|group| {
                request("delete_message", json!({"group_name": group, "seq": seq}))
            }),
            Err(_) => Command::Say("/delete SEQ".into()),
        },
        "/typing" => in_room(&|group| request("typing", json!({"group_name": group}))),
        "/raw" if !rest.is_empty() => Command::Send(Outgoing::Raw(rest.to_string())),
        "/who" => Command::Say(match &room {
            Some(group) => format!("in the room of {group}"),
            None => "in no room".into(),
        }),
        text if !text.starts_with('/') => {
            in_room(&|group| request("send_message", said(group, line)))
        }
        _ => Command::Say(format!("unknown command {verb}; /help lists them")),
    }
}

/// A `send_message` of typed text: each `@name` word mentions that member (`@room`: all of
/// them); the server refuses a name that is not a member (`not_mentionable`).
fn said(group: &str, text: &str) -> Value {
    let mut mentions: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        let name = word
            .strip_prefix('@')
            .map(|name| name.trim_end_matches([',', '.', ':', ';', '!', '?']))
            .filter(|name| !name.is_empty());
        if let Some(name) = name {
            let mention = if name == &crate::model::ROOM_MENTION[1..] {
                crate::model::ROOM_MENTION.to_string()
            } else {
                name.to_string()
            };
            if !mentions.contains(&mention) {
                mentions.push(mention);
            }
        }
    }
    let mut data = json!({"group_name": group, "text": text});
    if !mentions.is_empty() {
        data["mentions"] = json!(mentions);
    }
    data
}

/// The connection thread: sends what the editor asks, shows what arrives, reconnects and
/// resumes the room when the connection drops.
fn keep_link(
    mut link: Link,
    options: Options,
    requests: Receiver<Outgoing>,
    shared: Arc<Mutex<Shared>>,
    mut screen: Screen,
    on: bool,
) {
    loop {
        let lost = serve(&mut link, &requests, &shared, &mut screen, on);
        if let Some(reason) = link.ended_for_good() {
            screen.say(show_problem(&format!("{reason} (/quit to leave)"), on));
            return;
        }
        match lost {
            None => return,
            Some(reason) => screen.say(show_problem(
                &format!("connection lost ({reason}); reconnecting"),
                on,
            )),
        }
        link = reconnect(&options, &shared, &mut screen, on);
    }
}

fn show_problem(text: &str, on: bool) -> String {
    show::paint("31", text, on)
}

/// Serves one connection; `None` when the editor is gone, else why the connection ended.
fn serve(
    link: &mut Link,
    requests: &Receiver<Outgoing>,
    shared: &Arc<Mutex<Shared>>,
    screen: &mut Screen,
    on: bool,
) -> Option<String> {
    loop {
        loop {
            match requests.try_recv() {
                Ok(Outgoing::Request(event, data)) => {
                    if let Err(error) = link.send(event, data) {
                        return Some(error.to_string());
                    }
                }
                Ok(Outgoing::Raw(line)) => {
                    if serde_json::from_str::<Value>(&line).is_err() {
                        screen.say(show_problem("/raw needs one JSON object", on));
                    } else if let Err(error) = link.send_raw(&line) {
                        return Some(error.to_string());
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            }
        }
        match link.next(Some(Duration::from_millis(50))) {
            Ok(Incoming::Line(line)) => {
                for text in shown(&line, shared, on) {
                    screen.say(text);
                }
                let follow_up = shared.lock().ok().and_then(|mut s| s.follow_up.take());
                if let Some((event, data)) = follow_up {
                    if let Err(error) = link.send(event, data) {
                        return Some(error.to_string());
                    }
                }
            }
            Ok(Incoming::Quiet) => {}
            Err(error) => return Some(error.to_string()),
        }
    }
}

/// Connects again (with backoff) and resumes the room after the last seq shown.
fn reconnect(
    options: &Options,
    shared: &Arc<Mutex<Shared>>,
    screen: &mut Screen,
    on: bool,
) -> Link {
    let mut backoff = Duration::from_millis(100);
    loop {
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let Ok((mut link, _)) = Link::connect_and_login(options) else {
            continue;
        };
        let room = shared.lock().ok().and_then(|s| s.room.clone());
        if let Some(mut follow) = room {
            match follow.resume(&mut link) {
                Ok(_) => {
                    if let Ok(mut state) = shared.lock() {
                        state.room = Some(follow.clone());
                    }
                    screen.say(format!(
                        "reconnected; back in {} after #{}",
                        follow.group, follow.last_seq
                    ));
                }
                Err(problem) => screen.say(show_problem(
                    &format!("reconnected, but not back in {}: {problem}", follow.group),
                    on,
                )),
            }
        } else {
            screen.say("reconnected".into());
        }
        return link;
    }
}

/// The lines to show for one line from the server (and what it teaches the shared state).
fn shown(line: &Value, shared: &Arc<Mutex<Shared>>, on: bool) -> Vec<String> {
    let Ok(mut state) = shared.lock() else {
        return vec![line.to_string()];
    };
    let data = &line["data"];
    let event = line["event"].as_str().unwrap_or("");
    let is_reply = line.get("id").is_some();
    let name_of = |value: &Value| value.as_str().map(str::to_string);
    for key in ["username", "with", "by"] {
        if let Some(name) = data[key].as_str().filter(|name| !name.is_empty()) {
            state.names.insert(name.to_string());
        }
    }
    for name in data["online"].as_array().into_iter().flatten() {
        if let Some(name) = name.as_str() {
            state.names.insert(name.to_string());
        }
    }
    match event {
        "direct_opened" => {
            let group = data["group_name"].as_str().unwrap_or("").to_string();
            let with = data["with"].as_str().unwrap_or("");
            state.groups.insert(group.clone());
            if is_reply {
                // `/dm`: straight into the conversation.
                state.room = None;
                state.entering = Some(group.clone());
                state.follow_up = Some(("enter_group", json!({"group_name": group})));
                return vec![format!("direct conversation with {with}: {group}")];
            }
            vec![show::event(line, on)]
        }
        "message_sent" => {
            let seen = match state.room.as_mut() {
                Some(follow) if follow.group == data["group_name"].as_str().unwrap_or("") => {
                    follow.takes(line)
                }
                _ => true,
            };
            if !seen {
                return Vec::new();
            }
            if is_reply {
                return vec![format!(
                    "sent #{} to {}",
                    data["seq"],
                    data["group_name"].as_str().unwrap_or("")
                )];
            }
            vec![show::message(data, true, on)]
        }
        "enter_group" if is_reply => {
            state.entering = None;
            let group = data["group_name"].as_str().unwrap_or("").to_string();
            state.groups.insert(group.clone());
            let messages: Vec<Value> = ["read", "unread"]
                .iter()
                .flat_map(|key| data[*key].as_array().cloned().unwrap_or_default())
                .collect();
            let last_seq = messages
                .iter()
                .filter_map(|m| m["seq"].as_u64())
                .max()
                .unwrap_or(0);
            state.room = Some(Follow {
                group: group.clone(),
                last_seq: data["head_seq"].as_u64().unwrap_or(last_seq).max(last_seq),
                epoch: name_of(&data["epoch"]),
            });
            let mut out: Vec<String> = messages
                .iter()
                .map(|m| show::message(m, false, on))
                .collect();
            let online = data["online"].as_array().map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            out.push(format!(
                "entered {group}{}",
                online.map(|o| format!("; online: {o}")).unwrap_or_default()
            ));
            out
        }
        "groups" | "my_groups" if is_reply => {
            let rows = data["groups"].as_array().cloned().unwrap_or_default();
            state
                .groups
                .extend(rows.iter().filter_map(|g| name_of(&g["group_name"])));
            let mut out: Vec<String> = rows
                .iter()
                .map(|g| {
                    let role = g["role"]
                        .as_str()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    let mentions = match g["mention_count"].as_u64() {
                        Some(n) if n > 0 => format!(", {n} mentioning you"),
                        _ => String::new(),
                    };
                    let level = match g["notify"].as_str() {
                        Some(level) if level != "all" => format!(" [{level}]"),
                        _ => String::new(),
                    };
                    let label = match g["with"].as_str() {
                        Some(with) => format!(
                            "{} (direct with {with})",
                            g["group_name"].as_str().unwrap_or("")
                        ),
                        None => format!("{}{role}", g["group_name"].as_str().unwrap_or("")),
                    };
                    match g["unread_count"].as_u64() {
                        Some(unread) => format!("  {label}: {unread} unread{mentions}{level}"),
                        None => format!(
                            "  {}{role}: {} members",
                            g["group_name"].as_str().unwrap_or(""),
                            g["member_count"]
                        ),
                    }
                })
                .collect();
            if out.is_empty() {
                out.push("  (none)".into());
            }
            out
        }
        "messages" if is_reply => {
            let rows = data["messages"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                return vec!["  (no messages)".into()];
            }
            rows.iter().map(|m| show::message(m, false, on)).collect()
        }
        "group_created" | "join_success" | "leave_success" => {
            if let Some(name) = name_of(&data["group_name"]) {
                state.groups.insert(name.clone());
                if event == "leave_success" && state.room.as_ref().is_some_and(|f| f.group == name)
                {
                    state.room = None;
                }
                return vec![format!("{} {name}", event.replace('_', " "))];
            }
            vec![line.to_string()]
        }
        "group_deleted" | "left_group" => {
            if let Some(name) = name_of(&data["group_name"]) {
                if state.room.as_ref().is_some_and(|f| f.group == name) {
                    state.room = None;
                }
            }
            vec![show::event(line, on)]
        }
        "marked_read" if is_reply => vec![format!(
            "{} read up to #{}",
            data["group_name"].as_str().unwrap_or(""),
            data["last_read_seq"]
        )],
        "pong" | "typing" if is_reply => Vec::new(),
        _ if data["code"].is_string() && is_reply => {
            let mut problem = describe_error(line);
            if let Some(group) = state
                .entering
                .take()
                .filter(|_| data["code"] == "not_a_member")
            {
                problem.push_str(&format!(" (/join {group} to become one)"));
            }
            vec![show_problem(&problem, on)]
        }
        _ => vec![show::event(line, on)],
    }
}
