//! Protocol 3's live events between connections: a user's devices in sync (`read_marker`,
//! `joined_group`, `left_group` to the user's other connections) and `typing` in a room. Only
//! connections that asked for protocol 3 get any of it; every line also goes to the other
//! instances (peer mode), the user's through the control channel and typing through the
//! group's channel.

use super::*;
use crate::ops::typing::TYPING_EVERY;
use crate::peer::UserNotice;
use crate::session::ReadState;

/// A user's devices here and typing's relay times.
#[derive(Debug, Default)]
pub(super) struct Devices {
    /// The connections each logged-in user has here (lines to all of a user's devices).
    pub(super) users: HashMap<String, Vec<Token>>,
    /// When each (user, group) last had a `typing` relayed (at most one per 2 s).
    pub(super) typing_seen: HashMap<(String, String), Instant>,
}

impl Devices {
    /// The connections `username` has here (none when not logged in here).
    pub(super) fn connections_of(&self, username: &str) -> Vec<Token> {
        self.users.get(username).cloned().unwrap_or_default()
    }
}

impl Server {
    /// Remembers which connections a user has here (for lines to all of a user's devices);
    /// one that `counts` for presence may make the user online.
    pub(super) fn index_user(&mut self, token: Token, username: &str, counts: bool) {
        let tokens = self.devices.users.entry(username.to_string()).or_default();
        if !tokens.contains(&token) {
            tokens.push(token);
            if counts {
                self.user_came(username);
            }
        }
    }

    /// Forgets a closed connection in the user index (`counted`: it counted for presence).
    pub(super) fn unindex_user(&mut self, token: Token, username: &str, counted: bool) {
        if let Some(tokens) = self.devices.users.get_mut(username) {
            let before = tokens.len();
            tokens.retain(|t| *t != token);
            let removed = tokens.len() < before;
            if tokens.is_empty() {
                self.devices.users.remove(username);
            }
            if removed && counted {
                self.user_went(username);
            }
        }
    }

    /// Queues `line` for every protocol-3 connection of `username` here but `except`.
    pub(super) fn tell_user_here(&mut self, username: &str, line: &[u8], except: Option<Token>) {
        let tokens = self.devices.connections_of(username);
        for token in tokens.into_iter().filter(|t| Some(*t) != except) {
            let on_protocol_3 = self
                .connections
                .get(&token)
                .is_some_and(|c| c.session().protocol >= 3);
            if on_protocol_3 {
                self.notify(token, line.to_vec());
            }
        }
    }

    /// A line for the user's other devices, here and on every other instance.
    pub(super) fn tell_user(&mut self, username: String, line: Vec<u8>, origin: Token) {
        self.tell_user_here(&username, &line, Some(origin));
        if let Some(peer) = &self.peer {
            let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line));
            peer.publish_user(UserNotice {
                username,
                line: text.into_owned(),
            });
        }
    }

    /// An implicit read mark (a connection left a room or closed): announced like an
    /// explicit one, its `unread_count` from the newest seq this instance delivered.
    pub(super) fn announce_mark(&mut self, origin: Token, mark: &crate::model::ReadMark) {
        let head = self
            .sequencer
            .delivered(&mark.group_name)
            .unwrap_or(mark.seq)
            .max(mark.seq);
        self.read_marker_rose(
            origin,
            ReadState {
                username: mark.username.clone(),
                group_name: mark.group_name.clone(),
                last_read_seq: mark.seq,
                unread_count: head - mark.seq,
            },
        );
    }

    /// Entering `room` raised the user's read marker to what the reply held: this instance's
    /// activity notices count from it, and the user's other devices hear `read_marker`.
    pub(super) fn entered_mark(&mut self, origin: Token, room: &crate::session::Room) {
        let Some(username) = self
            .connections
            .get(&origin)
            .and_then(|c| c.session().username.clone())
        else {
            return;
        };
        let last_read_seq = room.frontier.stored();
        self.read_marker_rose(
            origin,
            ReadState {
                username,
                group_name: room.group_name.clone(),
                last_read_seq,
                unread_count: room.floor_seq.saturating_sub(last_read_seq),
            },
        );
    }

    /// A user's read marker rose (explicitly or implicitly): this instance's activity notices
    /// count from it, and the user's other devices hear `read_marker`.
    pub(super) fn read_marker_rose(&mut self, origin: Token, state: ReadState) {
        self.know_mark(&state.username, &state.group_name, state.last_read_seq);
        let line = crate::protocol::reply::encode_line(
            "read_marker",
            &serde_json::json!({
                "group_name": state.group_name,
                "last_read_seq": state.last_read_seq,
                "unread_count": state.unread_count,
            }),
            None,
        );
        self.tell_user(state.username, line, origin);
    }

    /// A user's devices here hear that the user left a group (here or on a peer). A removal
    /// or ban is also told to the user's connections in that room whatever their protocol:
    /// they are taken out of it and should know why.
    pub(super) fn tell_left(&mut self, departure: &Departure, origin: Option<Token>) {
        let reason = departure.reason.as_deref().unwrap_or("left");
        let line = crate::protocol::reply::encode_line(
            "left_group",
            &serde_json::json!({"group_name": departure.group_name, "reason": reason}),
            None,
        );
        self.tell_user_here(&departure.username, &line, origin);
        if departure.reason.is_none() {
            return;
        }
        for token in self.rooms.members(&departure.group_name) {
            let older_device_of_user = self.connections.get(&token).is_some_and(|c| {
                c.session().protocol < 3
                    && c.session().username.as_deref() == Some(departure.username.as_str())
            });
            if older_device_of_user {
                self.notify(token, line.clone());
            }
        }
    }

    /// `typing` from a connection in the room: relayed unless this user typed in this group
    /// less than `TYPING_EVERY` ago (then dropped silently).
    pub(super) fn typing(&mut self, typing: Departure, origin: Option<Token>) {
        let now = Instant::now();
        if origin.is_some() {
            let key = (typing.username.clone(), typing.group_name.clone());
            if self
                .devices
                .typing_seen
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < TYPING_EVERY)
            {
                return;
            }
            self.devices.typing_seen.insert(key, now);
            if let Some(peer) = &self.peer {
                peer.publish_typing(typing.clone());
            }
        }
        let line = crate::protocol::reply::encode_line(
            "typing",
            &serde_json::json!({"group_name": typing.group_name, "username": typing.username}),
            None,
        );
        self.tell_room(&typing.group_name, &line, &typing.username);
    }

    /// Queues `line` for the protocol-3 connections in a group's room here, but `about`'s own
    /// (a line about that user: typing, presence).
    pub(super) fn tell_room(&mut self, group_name: &str, line: &[u8], about: &str) {
        for token in self.rooms.members(group_name) {
            let hears = self.connections.get(&token).is_some_and(|c| {
                c.session().protocol >= 3 && c.session().username.as_deref() != Some(about)
            });
            if hears {
                self.notify(token, line.to_vec());
            }
        }
    }

    /// Forgets typing times older than the relay interval (from the sweep).
    pub(super) fn forget_old_typing(&mut self, now: Instant) {
        self.devices
            .typing_seen
            .retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
    }
}
