//! Room membership on this node: which connections are in which group's room right now, and
//! the page the room's next broadcast line is written on (`pages`).

use std::collections::{HashMap, HashSet};

use mio::Token;

use crate::pages::{RoomPage, Run};

#[derive(Debug, Default)]
pub struct Rooms {
    by_group: HashMap<String, Occupants>,
}

/// Who is in one group's room here (`session::Room` is a connection's side of it).
#[derive(Debug, Default)]
struct Occupants {
    tokens: HashSet<Token>,
    page: RoomPage,
}

impl Rooms {
    /// Puts a connection in a room; true when it is the room's first (it was empty).
    pub fn enter(&mut self, group_name: &str, token: Token) -> bool {
        let room = self.by_group.entry(group_name.to_string()).or_default();
        room.tokens.insert(token);
        room.tokens.len() == 1
    }

    /// Takes a connection out of a room; true when the room is now empty.
    pub fn leave(&mut self, group_name: &str, token: Token) -> bool {
        let Some(room) = self.by_group.get_mut(group_name) else {
            return false;
        };
        if !room.tokens.remove(&token) {
            return false;
        }
        if room.tokens.is_empty() {
            self.by_group.remove(group_name);
            return true;
        }
        false
    }

    /// The connections in a group's room (a snapshot, so the caller may change rooms meanwhile).
    pub fn members(&self, group_name: &str) -> Vec<Token> {
        self.by_group
            .get(group_name)
            .map(|room| room.tokens.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Writes a broadcast line on the room's page, for its members to queue as one run; `None`
    /// when nobody is in the room.
    pub fn share(&mut self, group_name: &str, line: &[u8]) -> Option<Run> {
        let room = self.by_group.get_mut(group_name)?;
        Some(room.page.share(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_rooms_disappear() {
        let mut rooms = Rooms::default();
        assert!(rooms.enter("g", Token(5)), "first in the room");
        assert!(!rooms.enter("g", Token(6)));
        assert!(!rooms.leave("g", Token(5)));
        assert_eq!(rooms.members("g"), vec![Token(6)]);
        assert!(!rooms.leave("g", Token(7)), "not in it");
        assert!(rooms.leave("g", Token(6)), "the last one out");
        assert!(rooms.by_group.is_empty());
    }
}
