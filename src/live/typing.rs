//! Protocol 3's `typing` in a room: a request's `typing` is relayed to the others' protocol-3
//! connections in the group's room, here and (through the group's channel) on every instance
//! hosting it, at most one per user per group per `TYPING_EVERY` (the rest dropped silently).

use std::collections::HashMap;
use std::time::Instant;

use mio::Token;
use serde::Deserialize;

use super::{Cx, LiveFeature};
use crate::ops::typing::{TypingIn, FEATURE, TYPING_EVERY};
use crate::peer::Reach;
use crate::session::LiveEffect;

/// When each (user, group) last had a `typing` relayed.
#[derive(Debug, Default)]
pub struct Typing {
    seen: HashMap<(String, String), Instant>,
}

/// `typing {group_name, username}` to the room here, but the typist's own connections.
fn tell_room(cx: &mut Cx<'_>, typing: &TypingIn) {
    let line = super::notice(
        "typing",
        serde_json::json!({"group_name": typing.group_name, "username": typing.username}),
    );
    cx.tell_room(&typing.group_name, &line, &typing.username);
}

impl LiveFeature for Typing {
    fn name(&self) -> &'static str {
        FEATURE
    }

    /// `typing` from a connection in the room: relayed unless this user typed in this group
    /// less than `TYPING_EVERY` ago.
    fn effect(&mut self, cx: &mut Cx<'_>, _: Option<Token>, effect: LiveEffect) {
        let Some(typing) = effect.take::<TypingIn>() else {
            return;
        };
        let key = (typing.username.clone(), typing.group_name.clone());
        if self
            .seen
            .get(&key)
            .is_some_and(|at| cx.now.duration_since(*at) < TYPING_EVERY)
        {
            return;
        }
        self.seen.insert(key, cx.now);
        if let Ok(body) = serde_json::to_value(&typing) {
            cx.relay(FEATURE, Reach::Room(typing.group_name.clone()), body);
        }
        tell_room(cx, &typing);
    }

    fn relayed(&mut self, cx: &mut Cx<'_>, kind: &str, body: &serde_json::Value) {
        if kind != FEATURE {
            return;
        }
        if let Ok(typing) = TypingIn::deserialize(body) {
            tell_room(cx, &typing);
        }
    }

    /// Forgets typing times older than the relay interval.
    fn sweep(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        self.seen
            .retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
    }
}
