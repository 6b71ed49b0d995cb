//! Attention: a message that names someone reaches them at once wherever they are. A
//! mentioned member's protocol-3 connections outside the message's room hear
//! `mentioned {group_name, seq, by}` (not coalesced: one per mention; `@room` names every
//! member but the sender), and a direct conversation's other member hears
//! `direct_opened {group_name, with, seq}` when a message shows it to them (its first, or
//! the first since they left it), and from then on hears its activity like a group's. Here
//! and, through one note to every instance, on the others.
//!
//! The counts themselves (`mention_count`) are the store's: `my_groups`, `mark_read` and
//! `read_marker` say them; this feature only tells who should look.

use mio::Token;
use serde::Deserialize;

use super::{Cx, Learned, LiveFeature};
use crate::model::ROOM_MENTION;
use crate::ops::send_message::{MessageAttention, ATTENTION};
use crate::ops::{Completed, Route, StoreCall};
use crate::peer::Reach;
use crate::session::{Effect, LiveEffect};
use crate::store::{Store, StoreError};

/// The feature keeps no state: each message's note says everything.
#[derive(Debug, Default)]
pub struct Attention;

/// An `@room` mention's members, read from the store (answered as this feature's effect,
/// the note with `mentions` expanded to the names).
#[derive(Debug)]
struct RoomMembers(MessageAttention);

impl StoreCall for RoomMembers {
    type Output = Vec<String>;

    fn route(&self) -> Route<'_> {
        Route::by(&self.0.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Vec<String>, StoreError> {
        store.group_members(&self.0.group_name)
    }

    fn answer(self, members: Vec<String>, _: Option<&serde_json::value::RawValue>) -> Completed {
        let mut note = self.0;
        note.mentions = members;
        Completed {
            line: Vec::new(),
            effect: Effect::Live(LiveEffect::new(ATTENTION, note)),
            shows: None,
        }
    }
}

/// Tells the connections here what `note` asks of them.
fn tell_here(cx: &mut Cx<'_>, note: &MessageAttention) {
    let outside_room = |cx: &Cx<'_>, token: Token| {
        cx.view.session(token).is_some_and(|session| {
            session.protocol >= 3
                && session.room.as_ref().map(|room| room.group_name.as_str())
                    != Some(note.group_name.as_str())
        })
    };
    // The conversation is known before anything in it is pointed at.
    if let Some(other) = &note.revealed_to {
        let line = super::notice(
            "direct_opened",
            serde_json::json!({"group_name": note.group_name, "with": note.by, "seq": note.seq}),
        );
        cx.tell_user(other, &line, None);
        // Activity (and whatever else follows a user's groups) covers it from now on.
        cx.learned(Learned::Joined {
            username: other.clone(),
            group_name: note.group_name.clone(),
        });
    }
    let mentioned = super::notice(
        "mentioned",
        serde_json::json!({"group_name": note.group_name, "seq": note.seq, "by": note.by}),
    );
    for name in note.mentions.iter().filter(|name| **name != note.by) {
        // Activity counts it into the user's `mention_count`.
        cx.learned(Learned::Mentioned {
            username: name.clone(),
            group_name: note.group_name.clone(),
            seq: note.seq,
        });
        let tokens = cx.view.connections_of(name).to_vec();
        for token in tokens {
            if outside_room(cx, token) {
                cx.send(token, mentioned.clone());
            }
        }
    }
}

impl LiveFeature for Attention {
    fn name(&self) -> &'static str {
        ATTENTION
    }

    /// A message stored here asks someone's attention (or an `@room`'s members were read).
    fn effect(&mut self, cx: &mut Cx<'_>, _: Option<Token>, effect: LiveEffect) {
        let Some(note) = effect.take::<MessageAttention>() else {
            return;
        };
        if note.mentions.iter().any(|name| name == ROOM_MENTION) {
            cx.read(None, crate::ops::work(RoomMembers(note)));
            return;
        }
        if let Ok(body) = serde_json::to_value(&note) {
            cx.relay(ATTENTION, Reach::Everyone, body);
        }
        tell_here(cx, &note);
    }

    fn relayed(&mut self, cx: &mut Cx<'_>, kind: &str, body: &serde_json::Value) {
        if kind != ATTENTION {
            return;
        }
        if let Ok(note) = MessageAttention::deserialize(body) {
            tell_here(cx, &note);
        }
    }
}
