//! `list_groups {after?, limit?}`: one page of groups by name, each with `member_count` (and
//! `members` while there are at most `MAX_LISTED_MEMBERS`). The page shrinks to fit
//! `MAX_REPLY_BYTES`; `has_more` and `next_after` say where the next one starts. Groups the
//! asking user is in show their `role`.

use serde_json::value::RawValue;

use super::fields::groups_query;
use super::{groups_page, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{GroupsPage, GroupsQuery};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct ListGroups {
    query: GroupsQuery,
    reply_budget: usize,
    /// Who asks (each group they are in shows their `role`).
    asking: String,
}

impl Event for ListGroups {
    const NAME: &'static str = "list_groups";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(ListGroups {
            query: groups_query(data)?,
            reply_budget: 0,
            asking: String::new(),
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.reply_budget = context.reply_budget;
        self.asking = context.session.username.clone().unwrap_or_default();
        Ok(store(self))
    }
}

impl StoreCall for ListGroups {
    type Output = GroupsPage;

    fn route(&self) -> Route<'_> {
        Route::any()
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupsPage, StoreError> {
        store.list_groups(&self.query, &self.asking)
    }

    fn answer(self, page: GroupsPage, id: Option<&RawValue>) -> Completed {
        let data = groups_page(page.groups, page.has_more, self.reply_budget, |g| {
            g.group_name.as_str()
        });
        Completed::reply(encode_line("groups", &data, id))
    }
}
