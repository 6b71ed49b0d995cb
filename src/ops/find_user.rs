//! `find_user {username, token?}`: log in, creating the user if the name is new. With
//! authentication on, the token must prove the name; every way to fail gets the same
//! `unauthorized` answer (the connection counts them, see `session::MAX_AUTH_FAILURES`).
//! `group_list` names at most `MAX_GROUP_LIST` groups (fewer if they would not fit the reply);
//! `group_list_has_more: true` then says to page the rest with `my_groups`.

use serde_json::value::RawValue;
use serde_json::Value;

use super::fields::{name_field, new_name_rules};
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::UserProfile;
use crate::protocol::reply::encode_line;
use crate::protocol::{ErrorCode, Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{fit_page, Store, StoreError};

pub struct FindUser {
    username: String,
    /// Whether the name may be used for a new user: `Err(reason)` when it breaks the rules
    /// for new names (it may still log in an existing user of that name).
    new_name: Result<(), String>,
    token: Option<String>,
}

impl Event for FindUser {
    const NAME: &'static str = "find_user";
    const BEFORE_LOGIN: bool = true;
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let username = name_field(data, "username")?;
        Ok(FindUser {
            new_name: new_name_rules(&username, "username"),
            username,
            // Anything but a string is no token: with authentication on it is refused like any
            // other bad token, without saying why.
            token: data
                .get("token")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        if let Some(auth) = &context.rules.auth {
            // One answer for every way to fail, so a client learns nothing from it.
            if !self
                .token
                .is_some_and(|token| auth.admits(&token, &self.username))
            {
                let text = "Authentication failed.";
                return Err(ProtocolError::new(ErrorCode::Unauthorized, text).into());
            }
        }
        Ok(store(FindOrCreate {
            username: self.username,
            new_name: self.new_name.err(),
            reply_budget: context.reply_budget,
        }))
    }
}

#[derive(Debug)]
struct FindOrCreate {
    username: String,
    /// Why the name may not be used for a new user (`None`: it may).
    new_name: Option<String>,
    /// Bytes the reply may take: `group_list` is cut to fit (`group_list_has_more`).
    reply_budget: usize,
}

impl StoreCall for FindOrCreate {
    type Output = (UserProfile, bool);

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Self::Output, StoreError> {
        store.find_user(&self.username, self.new_name.is_none())
    }

    fn answer(self, (mut profile, created): Self::Output, id: Option<&RawValue>) -> Completed {
        let (group_list, cut) =
            fit_page(std::mem::take(&mut profile.group_list), self.reply_budget);
        profile.group_list = group_list;
        profile.group_list_has_more |= cut;
        let event = if created {
            "user_created"
        } else {
            "user_found"
        };
        Completed {
            line: encode_line(event, &profile, id),
            effect: Effect::Bind(self.username),
            shows: None,
        }
    }

    fn failure(&self, error: StoreError) -> Failure {
        match (error, &self.new_name) {
            // A name the creation rules refuse was not found among existing users.
            (StoreError::UserNotFound, Some(reason)) => {
                ProtocolError::new(ErrorCode::BadRequest, reason).into()
            }
            (error, _) => super::failure_of(error),
        }
    }
}
