//! `my_groups {username, after?, limit?}`: a page of the user's groups by name, each with its
//! read state (newest seq, marker, unread count). The page shrinks to fit `MAX_REPLY_BYTES`;
//! `has_more` and `next_after` say where the next one starts.

use serde_json::value::RawValue;

use super::fields::{limit_field, name_field, optional_string};
use super::{groups_page, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{GroupsQuery, MembershipsPage};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

/// Memberships one `my_groups` page holds at most (and by default, so a v2 client that never
/// pages gets every group of an ordinary user in one reply).
pub const MAX_MEMBERSHIPS_PAGE: u32 = 1000;

#[derive(Debug)]
pub struct MyGroups {
    username: String,
    query: GroupsQuery,
    reply_budget: usize,
    /// Protocol 3 sees each row's attention fields (mentions, level, direct kind).
    protocol3: bool,
}

impl Event for MyGroups {
    const NAME: &'static str = "my_groups";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(MyGroups {
            username: name_field(data, "username")?,
            query: GroupsQuery {
                after: optional_string(data, "after")?,
                limit: limit_field(data, MAX_MEMBERSHIPS_PAGE, MAX_MEMBERSHIPS_PAGE)?,
            },
            reply_budget: 0,
            protocol3: false,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.reply_budget = context.reply_budget;
        self.protocol3 = context.session.protocol >= 3;
        Ok(store(self))
    }
}

impl StoreCall for MyGroups {
    type Output = MembershipsPage;

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<MembershipsPage, StoreError> {
        store.my_groups(&self.username, &self.query)
    }

    fn answer(self, mut page: MembershipsPage, id: Option<&RawValue>) -> Completed {
        if !self.protocol3 {
            for group in &mut page.groups {
                group.attention = None;
            }
        }
        let data = groups_page(page.groups, page.has_more, self.reply_budget, |g| {
            g.group_name.as_str()
        });
        Completed::reply(encode_line("my_groups", &data, id))
    }
}
