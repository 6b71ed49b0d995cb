//! `list_groups {after?, limit?}`: one page of groups by name, each with `member_count` (and
//! `members` while there are at most `MAX_LISTED_MEMBERS`).

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::groups_query;
use super::{store, Completed, Context, Data, Event, Planned, Route, StoreCall};
use crate::model::{GroupsPage, GroupsQuery};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct ListGroups(GroupsQuery);

impl Event for ListGroups {
    const NAME: &'static str = "list_groups";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        groups_query(data).map(ListGroups)
    }

    fn plan(self, _: &Context<'_>) -> Result<Planned, Failure> {
        Ok(store(self))
    }
}

impl StoreCall for ListGroups {
    type Output = GroupsPage;

    fn route(&self) -> Route<'_> {
        Route::any()
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupsPage, StoreError> {
        store.list_groups(&self.0)
    }

    fn answer(self, page: GroupsPage, id: Option<&RawValue>) -> Completed {
        let data = json!({ "groups": page.groups, "has_more": page.has_more });
        Completed::reply(encode_line("groups", &data, id))
    }
}
