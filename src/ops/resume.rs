//! Gapless resume: `enter_group {group_name, since_seq, since_epoch?}`. The connection is sent
//! every message of the group with seq > `since_seq` exactly once, in seq order, as ordinary
//! `message_sent` lines: first the stored backlog, page by page, then live. No client-side
//! paging, holding or de-duplication.
//!
//! How: each page is one store call that reads the group's head and up to `PAGE_MESSAGES`
//! messages after the cursor. While a page ends below the head it read, the connection is
//! outside the room and the next page is asked for only once its output has drained below
//! `RESUME_LOW_WATER` (server side): memory per connection stays at about a page, and backlog
//! lines are replies, so a slow reader is slowed down, never cut off as a slow consumer for its
//! own backlog.
//!
//! Backlog pages are reads: they run beside the writes (on SQLite, on a reader worker, not in
//! the single writer's queue), so a resume storm does not hold up other users' sends. Once a
//! page reaches the head it read, one more page, the hand-over, is ordered with the group's
//! messages (`Route::with_messages`): usually empty or a few messages, it enters the room with
//! its head as the floor, so live broadcasts continue exactly after it (the same hand-over
//! `enter_group` has always used). A message stored between a read page and the hand-over is
//! in the hand-over's page.
//!
//! Access ends the stream: every page after the first reads the group by the epoch the first
//! one found, so a group deleted (and maybe re-created under its name) mid-stream ends it with
//! `group_deleted` instead of continuing into the new group; a leave, removal, ban or deletion
//! drops what of the backlog is still unwritten and the page in flight (`server/delivery.rs`).
//! Retention removing messages the stream has not reached yet is said with `resume_truncated
//! {group_name, first_seq}` (id-less) before the first message after the gap.
//!
//! Beyond `RESUME_MAX_MESSAGES` the stream starts that many messages before the head and the
//! reply says `truncated: true` and `first_seq` (as Centrifugo's `recovered: false`). A
//! `since_epoch` other than the group's (the group was re-created) is reported
//! (`epoch_changed: true`) and the stream starts at the new group's beginning.

use serde_json::json;
use serde_json::value::RawValue;

use super::{store, work, Completed, Plan, Route, StoreCall};
use crate::model::{GroupReadState, Message, ReadMark};
use crate::protocol::encode_broadcast;
use crate::protocol::reply::encode_line;
use crate::session::{Effect, ResumeCursor, Room};
use crate::store::{Store, StoreError};
use crate::workers::Work;

/// Most messages one page reads (fewer when they would not fit the reply budget).
pub const PAGE_MESSAGES: u32 = 500;

/// What only the first page does: the reply header, the checks, the leaving mark.
#[derive(Debug)]
pub struct ResumeStart {
    pub since_epoch: Option<String>,
    /// The reply names the members online (protocol 3), as a plain `enter_group` does.
    pub with_members: bool,
    pub max_messages: u64,
    /// The read mark leaving the current room implies.
    pub leaving: Option<ReadMark>,
}

/// One page of a resume.
#[derive(Debug)]
pub struct ResumePage {
    username: String,
    group_name: String,
    after_seq: u64,
    start: Option<ResumeStart>,
    /// Bytes the page's lines may take together.
    budget: usize,
    /// The hand-over page: ordered with the group's messages, it may enter the room.
    handover: bool,
    /// The group's epoch the stream started in (none on the first page, which finds it).
    epoch: Option<String>,
}

/// What a page read.
#[derive(Debug)]
pub struct PageRead {
    state: GroupReadState,
    /// The stream goes on after this seq (moved by truncation or an epoch change).
    after_seq: u64,
    messages: Vec<Message>,
    truncated: bool,
    epoch_changed: bool,
    /// The group the stream started in is gone (deleted, maybe re-created under its name).
    gone: bool,
    /// Retention removed messages after the cursor that the stream had not sent yet.
    gap: bool,
    /// The group's members, read for the first page's `online`.
    members: Option<Vec<String>>,
}

/// The first page, from `enter_group {since_seq}`.
pub fn first_page(
    username: String,
    group_name: String,
    since_seq: u64,
    start: ResumeStart,
    budget: usize,
) -> Plan {
    store(ResumePage {
        username,
        group_name,
        after_seq: since_seq,
        start: Some(start),
        budget,
        handover: false,
        epoch: None,
    })
}

/// The next page of a resume in progress (asked for by the server as output drains).
pub fn next_page(username: String, cursor: ResumeCursor, budget: usize) -> Work {
    work(ResumePage {
        username,
        group_name: cursor.group_name,
        after_seq: cursor.after_seq,
        start: None,
        budget,
        handover: cursor.handover,
        epoch: Some(cursor.epoch),
    })
}

impl StoreCall for ResumePage {
    type Output = PageRead;

    fn route(&self) -> Route<'_> {
        match self.handover {
            true => Route::with_messages(&self.group_name),
            false => Route::by(&self.group_name),
        }
    }

    fn run(&self, store: &mut dyn Store) -> Result<PageRead, StoreError> {
        let state = store.read_state(&self.username, &self.group_name)?;
        if self
            .epoch
            .as_ref()
            .is_some_and(|epoch| *epoch != state.group_id)
        {
            return Ok(PageRead {
                state,
                after_seq: self.after_seq,
                messages: Vec::new(),
                truncated: false,
                epoch_changed: false,
                gone: true,
                gap: false,
                members: None,
            });
        }
        let head = state.last_seq;
        let mut after = self.after_seq;
        let (mut truncated, mut epoch_changed) = (false, false);
        if let Some(start) = &self.start {
            if let Some(mark) = &start.leaving {
                store.mark_read(std::slice::from_ref(mark))?;
            }
            // Without `since_epoch`, a `since_seq` past the head can only be of an earlier
            // group of the name (seqs never go back otherwise): taken as the epoch changed,
            // rather than silently skipping the new group's first messages.
            let another_epoch = match &start.since_epoch {
                Some(epoch) => *epoch != state.group_id,
                None => after > head,
            };
            if another_epoch {
                epoch_changed = true;
                after = 0;
            }
            after = after.min(head);
            if head - after > start.max_messages {
                after = head - start.max_messages;
                truncated = true;
            }
        }
        let wanted = (head.saturating_sub(after)).min(u64::from(PAGE_MESSAGES)) as u32;
        let mut messages = if wanted == 0 {
            Vec::new()
        } else {
            store.messages_after(&self.group_name, after, wanted)?
        };
        messages.retain(|m| m.seq <= head);
        // Retention removed the start of what was asked for: say so, like a cut backlog (on
        // the first page in its header, later with `resume_truncated`).
        let mut gap = false;
        if let Some(first) = messages.first() {
            if first.seq > after + 1 {
                after = first.seq - 1;
                truncated = self.start.is_some();
                gap = self.start.is_none();
            }
        }
        let members = match &self.start {
            Some(start) if start.with_members => Some(store.group_members(&self.group_name)?),
            _ => None,
        };
        Ok(PageRead {
            state,
            after_seq: after,
            messages,
            truncated,
            epoch_changed,
            gone: false,
            gap,
            members,
        })
    }

    fn answer(self, read: PageRead, id: Option<&RawValue>) -> Completed {
        if read.gone {
            // The group ended under the stream: say so, as its room heard it.
            let data = json!({"group_name": self.group_name});
            return Completed {
                line: encode_line("group_deleted", &data, None),
                effect: Effect::None,
                shows: None,
            };
        }
        let head = read.state.last_seq;
        let mut line = Vec::new();
        if self.start.is_some() {
            let mut data = json!({
                "group_name": self.group_name,
                "epoch": read.state.group_id,
                "since_seq": self.after_seq,
                "first_seq": read.after_seq + 1,
                "head_seq": head,
                "truncated": read.truncated,
            });
            if read.epoch_changed {
                data["epoch_changed"] = json!(true);
            }
            line = encode_line("enter_group", &data, id);
        }
        if read.gap {
            let data = json!({"group_name": self.group_name, "first_seq": read.after_seq + 1});
            line.extend(encode_line("resume_truncated", &data, None));
        }
        let epoch = read.state.group_id;
        // As many whole lines as the page's budget takes (at least one), counted as written:
        // each message's line wrapper counts too, so a page of long messages stays within
        // MAX_REPLY_BYTES.
        let mut last_sent: Option<u64> = None;
        let start = line.len();
        for message in &read.messages {
            let encoded = encode_broadcast(message);
            if last_sent.is_some() && line.len() - start + encoded.len() > self.budget {
                break;
            }
            line.extend(encoded);
            last_sent = Some(message.seq);
        }
        // Caught up with the head this page read (or nothing more to read): the hand-over
        // page enters the room, live broadcasts follow from its head on; a read page asks for
        // the hand-over.
        let effect = match last_sent {
            Some(last) if last < head => Effect::Resume(ResumeCursor {
                group_name: self.group_name,
                after_seq: last,
                handover: false,
                epoch,
            }),
            _ if self.handover => {
                Effect::Resumed(Room::new(self.group_name, head, read.state.last_read_seq))
            }
            last => Effect::Resume(ResumeCursor {
                group_name: self.group_name,
                after_seq: last.unwrap_or(read.after_seq),
                handover: true,
                epoch,
            }),
        };
        Completed {
            line,
            effect: match read.members {
                Some(members) => Effect::Online(Box::new(effect), members),
                None => effect,
            },
            shows: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberOf, NewMessage};
    use crate::store::manage::{prune_batch, Retention};
    use crate::store::sqlite::SqliteStore;

    /// Issue 34 item 3: retention removing what a stream had not reached yet left a silent gap
    /// (1000 -> 1501). The next page says where the stream goes on.
    #[test]
    fn retention_during_a_resume_is_said() {
        let dir = std::env::temp_dir().join(format!("noomnim-resume-gap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = SqliteStore::open(&dir, false, 64 << 20).expect("store");
        store.find_user("reader", true).expect("user");
        let member = MemberOf {
            username: "reader",
            group_name: "g",
        };
        store.create_group(member, 0).expect("group");
        let batch: Vec<NewMessage> = (0..30)
            .map(|i| NewMessage {
                group_name: "g".into(),
                username: "reader".into(),
                text: format!("m{i}"),
                client_msg_id: None,
                mentions: Vec::new(),
                reply_to: None,
            })
            .collect();
        assert!(store.append_messages(&batch).iter().all(Result::is_ok));
        let epoch = store.read_state("reader", "g").expect("state").group_id;
        // The stream had sent up to 5 when retention kept only the newest 10.
        let keep_ten = Retention {
            max_age: None,
            max_messages: 10,
        };
        prune_batch(&mut store, &keep_ten, "g", 30, 100).expect("prune");
        let page = ResumePage {
            username: "reader".into(),
            group_name: "g".into(),
            after_seq: 5,
            start: None,
            budget: 1 << 20,
            handover: false,
            epoch: Some(epoch),
        };
        let read = page.run(&mut store).expect("page");
        assert!(read.gap);
        let completed = page.answer(read, None);
        let text = String::from_utf8(completed.line).expect("utf-8");
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        assert_eq!(first["event"], "resume_truncated", "{first}");
        assert_eq!(first["data"]["first_seq"], 21, "{first}");
        assert!(text
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains(r#""seq":21"#)));
        let _ = std::fs::remove_dir_all(dir);
    }
}
