//! How the cli shows what the server sends: one readable line per message or event, in colour
//! only on a terminal (and never with `NO_COLOR` set), or the JSON itself with `--json`.

use std::io::IsTerminal;

use serde_json::Value;

/// Whether stdout takes colour.
pub fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `text` in the ANSI colour `code` when `on`.
pub fn paint(code: &str, text: &str, on: bool) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `12:04:31 #7 alice: text` (with the group first when `with_group`); a tombstone shows
/// `(deleted)`, an edit `(edited)`. A reply is indented under its thread (`  ↳ … (re #7)`),
/// and a thread's root says how many replies it has (`[2 replies, /thread 7]`).
pub fn message(data: &Value, with_group: bool, on: bool) -> String {
    let time = data["timestamp"]
        .as_str()
        .and_then(|t| t.get(11..19))
        .unwrap_or("");
    let group = if with_group {
        format!(
            "{} ",
            paint("36", data["group_name"].as_str().unwrap_or(""), on)
        )
    } else {
        String::new()
    };
    let text = if data["deleted"] == true {
        paint("2", "(deleted)", on)
    } else {
        let edited = if data["edited_at"].is_string() {
            " (edited)"
        } else {
            ""
        };
        format!("{}{edited}", data["text"].as_str().unwrap_or(""))
    };
    let (indent, answers) = match data["reply_to"].as_u64() {
        Some(root) => ("  \u{21b3} ", paint("2", &format!(" (re #{root})"), on)),
        None => ("", String::new()),
    };
    let replies = match data["reply_count"].as_u64() {
        Some(count) if count > 0 => {
            let noun = if count == 1 { "reply" } else { "replies" };
            let hint = format!(" [{count} {noun}, /thread {}]", data["seq"]);
            paint("2", &hint, on)
        }
        _ => String::new(),
    };
    format!(
        "{indent}{} {group}#{} {}{answers}: {text}{replies}",
        paint("2", time, on),
        data["seq"],
        paint("1", data["username"].as_str().unwrap_or("?"), on)
    )
}

/// Prints a line on stdout. A reader that went away (`noomnim cli tail G | head -n 1`) ends the
/// program quietly with exit 0, as `cat` does, instead of a panic on the broken pipe.
pub fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Prints a message: its JSON with `json`, else the readable line.
pub fn print_message(data: &Value, json: bool, with_group: bool) {
    if json {
        say(data);
    } else {
        say(message(data, with_group, colour()));
    }
}

/// An edit or delete of a stored message.
pub fn is_change(line: &Value) -> bool {
    line["event"] == "message_edited" || line["event"] == "message_deleted"
}

pub fn print_change(line: &Value, json: bool) {
    if json {
        say(line);
    } else {
        say(message(&line["data"], false, colour()));
    }
}

/// Any other line from the server, readable: events the cli knows get a sentence, the rest
/// their JSON.
pub fn event(line: &Value, on: bool) -> String {
    let data = &line["data"];
    let text = |key: &str| data[key].as_str().unwrap_or("").to_string();
    match line["event"].as_str().unwrap_or("") {
        "message_sent" => message(data, true, on),
        "message_edited" | "message_deleted" => {
            format!("{} {}", paint("2", "changed:", on), message(data, true, on))
        }
        "blocked_users" => {
            let names: Vec<&str> = data["users"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
                .collect();
            match names.is_empty() {
                true => "you block nobody".to_string(),
                false => format!("you block: {}", names.join(", ")),
            }
        }
        "notify_set" => format!("{}: notifications {}", text("group_name"), text("level")),
        "mentioned" => paint(
            "1;33",
            &format!(
                "{} mentioned you in {} (#{})",
                text("by"),
                text("group_name"),
                data["seq"]
            ),
            on,
        ),
        "direct_opened" => paint(
            "1;33",
            &format!(
                "{} wrote to you directly: /enter {} (or /dm {})",
                text("with"),
                text("group_name"),
                text("with")
            ),
            on,
        ),
        "typing" => paint(
            "2",
            &format!("{} is typing in {}", text("username"), text("group_name")),
            on,
        ),
        "presence" => {
            let state = if data["online"] == true {
                "online"
            } else {
                "offline"
            };
            paint(
                "2",
                &format!("{} is {state} ({})", text("username"), text("group_name")),
                on,
            )
        }
        "group_activity" => paint(
            "33",
            &format!(
                "{}: {} unread (newest #{})",
                text("group_name"),
                data["unread_count"],
                data["last_seq"]
            ),
            on,
        ),
        "left_group" => paint(
            "33",
            &format!("you left {} ({})", text("group_name"), text("reason")),
            on,
        ),
        "group_deleted" => paint(
            "33",
            &format!("group {} was deleted", text("group_name")),
            on,
        ),
        "member_removed" => paint(
            "33",
            &format!(
                "{} was {} from {}",
                text("username"),
                text("reason"),
                text("group_name")
            ),
            on,
        ),
        "closing" => paint(
            "31",
            &format!("server closing: {} {}", text("code"), text("Error")),
            on,
        ),
        "error" => paint(
            "31",
            &format!("error {}: {}", text("code"), text("Error")),
            on,
        ),
        _ => line.to_string(),
    }
}
