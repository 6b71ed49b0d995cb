//! The connections, by token: a slab (a vector and a free list), so finding a connection is an
//! index, not a hash — the broadcast path does it once per recipient of every message.
//!
//! Slots are reused, tokens are not: a token carries its slot's generation in its high bits,
//! so the token of a closed connection (a late store completion, a stale room member, a late
//! readiness event) never finds the connection that reused its slot.

use mio::Token;

use super::FIRST_CONNECTION;
use crate::connection::Connection;

/// Where the generation starts in a token.
const GENERATION_SHIFT: u32 = 32;
const INDEX_MASK: usize = (1 << GENERATION_SHIFT) - 1;
/// Generations wrap here, keeping tokens far below the metrics clients' range.
const GENERATIONS: usize = 1 << 30;

struct Slot {
    generation: usize,
    connection: Option<Connection>,
}

#[derive(Default)]
pub(super) struct Slab {
    slots: Vec<Slot>,
    free: Vec<usize>,
    len: usize,
    /// Connections to service this turn, each once (`touch`).
    pub(super) touched: Vec<Token>,
}

fn token_of(index: usize, generation: usize) -> Token {
    Token(FIRST_CONNECTION + index + (generation << GENERATION_SHIFT))
}

/// (slot index, generation) of a client token.
fn split(token: Token) -> Option<(usize, usize)> {
    let raw = token.0.checked_sub(FIRST_CONNECTION)?;
    Some((raw & INDEX_MASK, raw >> GENERATION_SHIFT))
}

impl Slab {
    /// The token the next `insert` takes (register the socket with it first).
    pub(super) fn vacant_token(&self) -> Token {
        let index = self.free.last().copied().unwrap_or(self.slots.len());
        let generation = self.slots.get(index).map_or(0, |slot| slot.generation);
        token_of(index, generation)
    }

    /// Stores a connection under the token `vacant_token` gave.
    pub(super) fn insert(&mut self, token: Token, connection: Connection) {
        debug_assert_eq!(token, self.vacant_token());
        match self.free.pop() {
            Some(index) => self.slots[index].connection = Some(connection),
            None => self.slots.push(Slot {
                generation: 0,
                connection: Some(connection),
            }),
        }
        self.len += 1;
    }

    pub(super) fn get(&self, token: &Token) -> Option<&Connection> {
        let (index, generation) = split(*token)?;
        let slot = self.slots.get(index)?;
        (slot.generation == generation)
            .then_some(slot.connection.as_ref())
            .flatten()
    }

    pub(super) fn get_mut(&mut self, token: &Token) -> Option<&mut Connection> {
        let (index, generation) = split(*token)?;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.connection.as_mut()
    }

    pub(super) fn remove(&mut self, token: &Token) -> Option<Connection> {
        let (index, generation) = split(*token)?;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let connection = slot.connection.take()?;
        slot.generation = (slot.generation + 1) % GENERATIONS;
        self.free.push(index);
        self.len -= 1;
        Some(connection)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (Token, &Connection)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let connection = slot.connection.as_ref()?;
            Some((token_of(index, slot.generation), connection))
        })
    }

    pub(super) fn tokens(&self) -> Vec<Token> {
        self.iter().map(|(token, _)| token).collect()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Connection> {
        self.iter().map(|(_, connection)| connection)
    }

    /// Puts a connection on this turn's list to service, once.
    pub(super) fn touch(&mut self, token: Token) {
        if self.get_mut(&token).is_some_and(Connection::touch) {
            self.touched.push(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_back_and_never_repeat_for_a_reused_slot() {
        for (index, generation) in [(0, 0), (7, 0), (7, 3), (INDEX_MASK, GENERATIONS - 1)] {
            assert_eq!(
                split(token_of(index, generation)),
                Some((index, generation))
            );
            assert!(token_of(index, generation).0 < super::super::FIRST_METRICS_CLIENT);
        }
        assert_eq!(split(Token(FIRST_CONNECTION - 1)), None);
        assert_ne!(token_of(3, 0), token_of(3, 1));
    }
}
