//! `fetch_messages {username, group_name, before_seq?, after_seq?, limit?}`: one page of a
//! group's history, cut to the reply budget (`has_more` says when there is more).

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{page_fields, user_and_group};
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{MemberOf, MessagePage, PageQuery};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{fit_messages, Store, StoreError};

#[derive(Debug)]
pub struct FetchMessages {
    username: String,
    group_name: String,
    page: PageQuery,
    reply_budget: usize,
}

impl Event for FetchMessages {
    const NAME: &'static str = "fetch_messages";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        Ok(FetchMessages {
            username,
            group_name,
            page: page_fields(data)?,
            reply_budget: 0,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        Ok(store(FetchMessages {
            reply_budget: context.reply_budget,
            ..self
        }))
    }
}

impl StoreCall for FetchMessages {
    type Output = MessagePage;

    fn route(&self) -> Route<'_> {
        Route::by(&self.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<MessagePage, StoreError> {
        let mut found = store.fetch_messages(
            MemberOf {
                username: &self.username,
                group_name: &self.group_name,
            },
            self.page,
        )?;
        // Pages after a seq keep their oldest messages, pages before one their newest, so the
        // next page continues where this one stopped.
        let (messages, cut) = fit_messages(
            found.messages,
            self.page.after_seq.is_some(),
            self.reply_budget,
        );
        found.messages = messages;
        found.has_more |= cut;
        Ok(found)
    }

    fn answer(self, page: MessagePage, id: Option<&RawValue>) -> Completed {
        let shows = match (page.messages.first(), page.messages.last()) {
            (Some(first), Some(last)) => Some((self.group_name.clone(), first.seq, last.seq)),
            _ => None,
        };
        let mut data = json!({
            "group_name": self.group_name,
            "messages": page.messages,
            "has_more": page.has_more,
            "epoch": page.epoch,
        });
        super::mark_history_start(&mut data, page.first_seq);
        Completed {
            line: encode_line("messages", &data, id),
            effect: Effect::None,
            shows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::request::DEFAULT_PAGE_LIMIT;

    #[test]
    fn fetch_defaults_its_limit() {
        let data = json!({"username":"a","group_name":"g","after_seq":3});
        let serde_json::Value::Object(data) = data else {
            panic!("an object");
        };
        let parsed = FetchMessages::parse(&data).expect("valid");
        let page = PageQuery {
            before_seq: None,
            after_seq: Some(3),
            limit: DEFAULT_PAGE_LIMIT,
            thread: None,
        };
        assert_eq!(parsed.page, page);
    }
}
