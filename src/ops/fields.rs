//! Field validation shared by the event modules: names (NFC, length, the rules for new names),
//! message text, idempotency keys, counts and page sizes. Each failure is a `bad_request` whose
//! text names the field.

use serde_json::{Map, Value};
use unicode_normalization::{is_nfc, UnicodeNormalization};

use crate::model::{GroupsQuery, PageQuery};
use crate::protocol::request::{
    DEFAULT_PAGE_LIMIT, MAX_CLIENT_MSG_ID_CHARS, MAX_COUNT, MAX_NAME_CHARS, MAX_PAGE_LIMIT,
    MAX_TEXT_CHARS,
};
use crate::protocol::{ErrorCode, ProtocolError};

/// `username` and `group_name`, the pair most events carry.
pub fn user_and_group(data: &Map<String, Value>) -> Result<(String, String), ProtocolError> {
    Ok((
        name_field(data, "username")?,
        name_field(data, "group_name")?,
    ))
}

/// A user and a group: the whole request of the membership events.
#[derive(Debug)]
pub struct UserGroup {
    pub username: String,
    pub group_name: String,
}

impl UserGroup {
    pub fn parse(data: &Map<String, Value>) -> Result<UserGroup, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        Ok(UserGroup {
            username,
            group_name,
        })
    }
}

pub fn bad_request(text: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, &text)
}

pub fn string_field<'a>(
    data: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a str, ProtocolError> {
    match data.get(name) {
        Some(Value::String(text)) => Ok(text),
        None | Some(Value::Null) => Err(bad_request(format!("Field '{name}' is missing."))),
        Some(_) => Err(bad_request(format!("Field '{name}' must be a string."))),
    }
}

/// A name as the server compares and stores it: Unicode NFC, so a composed and a decomposed
/// "é" are the same user. Checks the rules every name meets (length, no control characters).
pub fn name_field(data: &Map<String, Value>, name: &str) -> Result<String, ProtocolError> {
    let raw = string_field(data, name)?;
    let text: String = if is_nfc(raw) {
        raw.to_string()
    } else {
        raw.nfc().collect()
    };
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(bad_request(format!(
            "Field '{name}' must be 1-{MAX_NAME_CHARS} characters."
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(bad_request(format!(
            "Field '{name}' must not contain control characters."
        )));
    }
    Ok(text)
}

/// The rules a *new* user or group name must also meet, so that two names a person cannot
/// tell apart are not two accounts (after Ergo's and PRECIS's nickname rules): no invisible
/// format characters (bidi overrides such as U+202E, zero-width spaces and joiners, soft
/// hyphens), no line or paragraph separators, no blank fillers, and no whitespace at either
/// end (so "bob" and "bob " are not both possible). Names created before these rules existed
/// keep working: only creation is refused.
pub fn new_name_rules(text: &str, name: &str) -> Result<(), String> {
    if text.chars().all(char::is_whitespace) {
        return Err(format!("Field '{name}' must not be only whitespace."));
    }
    if text.starts_with(char::is_whitespace) || text.ends_with(char::is_whitespace) {
        return Err(format!(
            "Field '{name}' must not start or end with whitespace."
        ));
    }
    if text.chars().any(is_invisible) {
        return Err(format!(
            "Field '{name}' must not contain invisible or formatting characters (such as zero-width or bidi-override characters)."
        ));
    }
    Ok(())
}

/// Characters that render as nothing or rearrange the text around them.
pub fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::Control
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    ) || matches!(
        c,
        '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
    )
}

pub fn text_field(data: &Map<String, Value>) -> Result<String, ProtocolError> {
    let text = string_field(data, "text")?;
    if text.trim().is_empty() {
        return Err(bad_request("Field 'text' must not be empty.".to_string()));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(bad_request(format!(
            "Field 'text' must be at most {MAX_TEXT_CHARS} characters."
        )));
    }
    Ok(text.to_string())
}

/// `send_message`'s optional idempotency key: a string of 1-`MAX_CLIENT_MSG_ID_CHARS` characters.
pub fn client_msg_id_field(data: &Map<String, Value>) -> Result<Option<String>, ProtocolError> {
    match data.get("client_msg_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if (1..=MAX_CLIENT_MSG_ID_CHARS).contains(&id.chars().count()) => {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(bad_request(format!(
            "Field 'client_msg_id' must be a string of 1-{MAX_CLIENT_MSG_ID_CHARS} characters."
        ))),
    }
}

/// Most names one message may mention.
pub const MAX_MENTIONS: usize = 50;

/// `mentions`: an optional list of member names (and `@room`), each checked and normalised as
/// a name, repeats dropped; `None` when left out.
pub fn mentions_field(data: &Map<String, Value>) -> Result<Option<Vec<String>>, ProtocolError> {
    let names = match data.get("mentions") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(names)) => names,
        Some(_) => {
            return Err(bad_request(
                "Field 'mentions' must be a list of usernames.".to_string(),
            ))
        }
    };
    if names.len() > MAX_MENTIONS {
        return Err(bad_request(format!(
            "Field 'mentions' may name at most {MAX_MENTIONS} users."
        )));
    }
    let mut mentions: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let mut one = Map::new();
        one.insert("mentions".to_string(), name.clone());
        let name = name_field(&one, "mentions")?;
        if !mentions.contains(&name) {
            mentions.push(name);
        }
    }
    Ok(Some(mentions))
}

/// A string field that may be left out (`None`).
/// A name field that may be left out (checked and normalised as `name_field` when given).
pub fn optional_name(
    data: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, ProtocolError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => name_field(data, name).map(Some),
    }
}

pub fn optional_string(
    data: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, ProtocolError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(bad_request(format!("Field '{name}' must be a string."))),
    }
}

/// A boolean field that may be left out (`None`).
pub fn optional_bool(data: &Map<String, Value>, name: &str) -> Result<Option<bool>, ProtocolError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(on)) => Ok(Some(*on)),
        Some(_) => Err(bad_request(format!("Field '{name}' must be a boolean."))),
    }
}

/// `list_groups {after?, limit?}`: groups named after `after`, at most `limit` (default 100).
pub fn groups_query(data: &Map<String, Value>) -> Result<GroupsQuery, ProtocolError> {
    Ok(GroupsQuery {
        after: optional_string(data, "after")?,
        limit: limit_field(data, MAX_PAGE_LIMIT, MAX_PAGE_LIMIT)?,
    })
}

pub fn optional_count(data: &Map<String, Value>, name: &str) -> Result<Option<u64>, ProtocolError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        // Seqs are stored as signed 64-bit integers: anything above i64::MAX is refused here
        // rather than wrapped to a negative number by a cast further down.
        Some(value) => value
            .as_u64()
            .filter(|&count| count <= MAX_COUNT)
            .map(Some)
            .ok_or_else(|| {
                bad_request(format!(
                    "Field '{name}' must be a whole number 0-{MAX_COUNT}."
                ))
            }),
    }
}

/// A count that must be there (`seq` of `mark_read`, `edit_message`, `delete_message`).
pub fn required_count(data: &Map<String, Value>, name: &str) -> Result<u64, ProtocolError> {
    optional_count(data, name)?.ok_or_else(|| bad_request(format!("Field '{name}' is missing.")))
}

/// A group and one of its messages: `{group_name, seq}`.
#[derive(Debug, Clone)]
pub struct MessageRef {
    pub group_name: String,
    pub seq: u64,
}

impl MessageRef {
    pub fn parse(data: &Map<String, Value>) -> Result<MessageRef, ProtocolError> {
        Ok(MessageRef {
            group_name: name_field(data, "group_name")?,
            seq: required_count(data, "seq")?,
        })
    }
}

/// A page size: 1-`most`, `default` when absent.
pub fn limit_field(
    data: &Map<String, Value>,
    default: u32,
    most: u32,
) -> Result<u32, ProtocolError> {
    match optional_count(data, "limit") {
        Ok(None) => Ok(default),
        Ok(Some(limit)) if (1..=u64::from(most)).contains(&limit) => Ok(limit as u32),
        _ => Err(bad_request(format!(
            "Field 'limit' must be a whole number 1-{most}."
        ))),
    }
}

pub fn page_fields(data: &Map<String, Value>) -> Result<PageQuery, ProtocolError> {
    Ok(PageQuery {
        before_seq: optional_count(data, "before_seq")?,
        after_seq: optional_count(data, "after_seq")?,
        limit: limit_field(data, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT)?,
        thread: optional_count(data, "thread")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(value: serde_json::Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("an object"),
        }
    }

    #[test]
    fn names_refuse_wrong_types_empty_and_control_characters() {
        for bad in [
            serde_json::json!({"username": {"$ne": null}}),
            serde_json::json!({"username": ""}),
            serde_json::json!({"username": "a\u{1}"}),
            serde_json::json!({}),
        ] {
            let error = name_field(&data(bad.clone()), "username").expect_err("refused");
            assert_eq!(error.code, ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn name_limits_count_characters_not_bytes() {
        let name = "é".repeat(MAX_NAME_CHARS);
        assert!(name_field(&data(serde_json::json!({ "username": name })), "username").is_ok());
        let longer = format!("{name}é");
        assert!(name_field(&data(serde_json::json!({ "username": longer })), "username").is_err());
    }

    #[test]
    fn names_are_nfc_and_new_names_must_be_visible() {
        let decomposed = data(serde_json::json!({"username": "Jose\u{301}"}));
        let username = name_field(&decomposed, "username").expect("valid");
        assert_eq!(username, "Jos\u{e9}");
        assert_eq!(new_name_rules(&username, "username"), Ok(()));
        for bad in [
            "ev\u{202E}il",
            "a\u{200B}b",
            "bob ",
            " bob",
            "   ",
            "\u{3164}",
            "g\u{200d}",
        ] {
            assert!(new_name_rules(bad, "username").is_err(), "{bad:?}");
        }
        assert!(new_name_rules("Zo\u{eb} 2", "username").is_ok());
    }

    #[test]
    fn limits_are_bounded() {
        assert!(limit_field(&data(serde_json::json!({"limit": 0})), 50, 100).is_err());
        assert!(limit_field(&data(serde_json::json!({"limit": 101})), 50, 100).is_err());
        assert_eq!(limit_field(&data(serde_json::json!({})), 50, 100), Ok(50));
        let too_big = serde_json::json!({ "seq": u64::MAX });
        assert!(optional_count(&data(too_big), "seq").is_err());
    }
}
