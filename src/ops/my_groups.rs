//! `my_groups {username}`: the user's groups with their read state (newest seq, marker,
//! unread count), one indexed read per group.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::name_field;
use super::{store, Completed, Context, Data, Event, Planned, Route, StoreCall};
use crate::model::GroupReadState;
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct MyGroups {
    username: String,
}

impl Event for MyGroups {
    const NAME: &'static str = "my_groups";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(MyGroups {
            username: name_field(data, "username")?,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, _: &Context<'_>) -> Result<Planned, Failure> {
        Ok(store(self))
    }
}

impl StoreCall for MyGroups {
    type Output = Vec<GroupReadState>;

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Vec<GroupReadState>, StoreError> {
        store.my_groups(&self.username)
    }

    fn answer(self, groups: Vec<GroupReadState>, id: Option<&RawValue>) -> Completed {
        Completed::reply(encode_line("my_groups", &json!({ "groups": groups }), id))
    }
}
