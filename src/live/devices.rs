//! Protocol 3's devices in sync: a user's other connections hear what one of them did —
//! `read_marker` when the marker rose, `joined_group`, `left_group` — here and, through the
//! control channel, on every other instance. Only connections that asked for protocol 3 get
//! these (but a removal or ban is also told to the user's older connections in that room:
//! they are taken out of it and should know why).

use mio::Token;
use serde::{Deserialize, Serialize};

use super::{line_of, Cx, Learned, LiveFeature, Origin};
use crate::ops::ToDevices;
use crate::peer::{Departure, Reach};
use crate::session::ReadState;

/// The feature's name.
const DEVICES: &str = crate::ops::DEVICES;
/// Its relay note's kind (the name the envelope has always used).
const USER: &str = "user";

/// A line for one user's protocol-3 connections on every instance: this feature's relay note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNotice {
    pub username: String,
    /// The whole line, as the connections get it (without its newline).
    pub line: String,
}

/// `left_group {group_name, reason}`: `left` for the user's own leave, else why they are out
/// (`removed`, `banned`). Also what the loop tells a protocol-2 resumer whose stream a
/// removal ends.
pub fn left_group_line(departure: &Departure) -> Vec<u8> {
    let reason = departure.reason.as_deref().unwrap_or("left");
    super::notice(
        "left_group",
        serde_json::json!({"group_name": departure.group_name, "reason": reason}),
    )
}

/// Devices in sync keeps no state: the loop's index of a user's connections is all it needs.
#[derive(Debug, Default)]
pub struct Devices;

impl Devices {
    /// A line for the user's other devices, here and on every other instance.
    fn tell_everywhere(cx: &mut Cx<'_>, username: &str, line: &[u8], origin: Token) {
        cx.tell_user(username, line, Some(origin));
        let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line));
        let notice = UserNotice {
            username: username.to_string(),
            line: text.into_owned(),
        };
        if let Ok(body) = serde_json::to_value(notice) {
            cx.relay(USER, Reach::Everyone, body);
        }
    }
}

impl LiveFeature for Devices {
    fn name(&self) -> &'static str {
        DEVICES
    }

    fn effect(
        &mut self,
        cx: &mut Cx<'_>,
        token: Option<Token>,
        effect: crate::session::LiveEffect,
    ) {
        let (Some(token), Some(to_devices)) = (token, effect.take::<ToDevices>()) else {
            return;
        };
        Devices::tell_everywhere(cx, &to_devices.username, &to_devices.line, token);
    }

    fn joined(&mut self, cx: &mut Cx<'_>, origin: Origin, username: &str, group_name: &str) {
        let Origin::Here(token) = origin else {
            return;
        };
        let line = super::notice(
            "joined_group",
            serde_json::json!({"group_name": group_name}),
        );
        Devices::tell_everywhere(cx, username, &line, token);
    }

    /// The user's devices here hear that the user left a group (here or on a peer).
    fn left(&mut self, cx: &mut Cx<'_>, origin: Origin, departure: &Departure) {
        let line = left_group_line(departure);
        let except = match origin {
            Origin::Here(token) => Some(token),
            Origin::Peer => None,
        };
        cx.tell_user(&departure.username, &line, except);
        if departure.reason.is_none() {
            return;
        }
        for token in cx.view.room_members(&departure.group_name) {
            let older_device_of_user = cx.view.session(token).is_some_and(|s| {
                s.protocol < 3 && s.username.as_deref() == Some(departure.username.as_str())
            });
            if older_device_of_user {
                cx.send(token, line.clone());
            }
        }
    }

    fn marker_rose(&mut self, cx: &mut Cx<'_>, origin: Origin, state: &ReadState) {
        let Origin::Here(token) = origin else {
            return;
        };
        let mut data = serde_json::json!({
            "group_name": state.group_name,
            "last_read_seq": state.last_read_seq,
            "unread_count": state.unread_count,
        });
        if let Some(mentions) = state.mention_count {
            data["mention_count"] = serde_json::json!(mentions);
        }
        let line = super::notice("read_marker", data);
        Devices::tell_everywhere(cx, &state.username, &line, token);
    }

    /// Another instance's line for a user: to their devices here, and what it says (a raised
    /// marker, a group joined) to the other features.
    fn relayed(&mut self, cx: &mut Cx<'_>, kind: &str, body: &serde_json::Value) {
        if kind != USER {
            return;
        }
        let Ok(notice) = UserNotice::deserialize(body) else {
            return;
        };
        let line = line_of(&notice.line);
        cx.tell_user(&notice.username, &line, None);
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&notice.line) else {
            return;
        };
        let data = &value["data"];
        let group_name = data["group_name"].as_str().unwrap_or_default().to_string();
        match value["event"].as_str() {
            Some("read_marker") => cx.learned(Learned::MarkerRose(ReadState {
                username: notice.username,
                group_name,
                last_read_seq: data["last_read_seq"].as_u64().unwrap_or(0),
                unread_count: data["unread_count"].as_u64().unwrap_or(0),
                mention_count: data["mention_count"].as_u64(),
            })),
            Some("joined_group") => cx.learned(Learned::Joined {
                username: notice.username,
                group_name,
            }),
            _ => {}
        }
    }
}
