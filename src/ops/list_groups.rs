//! `list_groups {after?, limit?}`: one page of groups by name, each with `member_count` (and
//! `members` while there are at most `MAX_LISTED_MEMBERS`). The page shrinks to fit
//! `MAX_REPLY_BYTES`; `has_more` and `next_after` say where the next one starts.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::groups_query;
use super::{store, Completed, Context, Data, Event, Planned, Route, StoreCall};
use crate::model::{GroupsPage, GroupsQuery};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{fit_page, Store, StoreError};

#[derive(Debug)]
pub struct ListGroups {
    query: GroupsQuery,
    reply_budget: usize,
}

impl Event for ListGroups {
    const NAME: &'static str = "list_groups";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(ListGroups {
            query: groups_query(data)?,
            reply_budget: 0,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Planned, Failure> {
        self.reply_budget = context.reply_budget;
        Ok(store(self))
    }
}

impl StoreCall for ListGroups {
    type Output = GroupsPage;

    fn route(&self) -> Route<'_> {
        Route::any()
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupsPage, StoreError> {
        store.list_groups(&self.query)
    }

    fn answer(self, page: GroupsPage, id: Option<&RawValue>) -> Completed {
        let (groups, cut) = fit_page(page.groups, self.reply_budget);
        let has_more = page.has_more || cut;
        let mut data = json!({ "groups": groups, "has_more": has_more });
        if has_more {
            data["next_after"] = json!(groups.last().map(|g| &g.group_name));
        }
        Completed::reply(encode_line("groups", &data, id))
    }
}
