//! Benchmark-only store (`--features bench-noop`, `BENCH_STORE=noop`): keeps users, groups and
//! per-group `seq` in memory and throws message texts away. It exists to measure the ceiling the
//! persisted stores are compared with; a default build cannot select it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use super::{Store, StoreError, StoreResult};
use crate::model::{
    new_object_id, now_timestamp, Appended, CreatedGroup, Entry, GroupHistory, GroupReadState,
    GroupRef, GroupSummary, GroupsPage, GroupsQuery, Member, MemberOf, MembershipsPage, Message,
    MessagePage, NewMessage, PageQuery, ReadMark, Role, UserProfile, Visit,
};

/// Every group's `epoch`: this store never restarts a numbering it keeps.
const NOOP_EPOCH: &str = "noop";

#[derive(Default)]
struct Shared {
    users: HashSet<String>,
    groups: HashMap<String, (HashSet<String>, u64)>,
}

/// All workers share one in-memory state.
pub struct NoopStore {
    shared: Arc<Mutex<Shared>>,
}

impl NoopStore {
    pub fn open() -> NoopStore {
        static SHARED: OnceLock<Arc<Mutex<Shared>>> = OnceLock::new();
        NoopStore {
            shared: SHARED.get_or_init(Default::default).clone(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> StoreResult<T>) -> StoreResult<T> {
        let mut shared = self
            .shared
            .lock()
            .map_err(|_| StoreError::Unavailable("noop store poisoned".into()))?;
        f(&mut shared)
    }
}

fn member_of<'a>(
    shared: &'a mut Shared,
    username: &str,
    group_name: &str,
) -> StoreResult<&'a mut (HashSet<String>, u64)> {
    let group = shared
        .groups
        .get_mut(group_name)
        .ok_or(StoreError::GroupNotFound)?;
    if !group.0.contains(username) {
        return Err(StoreError::NotAMember);
    }
    Ok(group)
}

fn group_ref(group_name: &str) -> GroupRef {
    GroupRef {
        group_id: new_object_id(),
        group_name: group_name.to_string(),
    }
}

impl Store for NoopStore {
    fn find_user(&mut self, username: &str, may_create: bool) -> StoreResult<(UserProfile, bool)> {
        self.with(|shared| {
            if !may_create && !shared.users.contains(username) {
                return Err(StoreError::UserNotFound);
            }
            let created = shared.users.insert(username.to_string());
            let group_list = shared
                .groups
                .iter()
                .filter(|(_, (members, _))| members.contains(username))
                .map(|(name, _)| name.clone())
                .collect();
            let profile = UserProfile {
                id: new_object_id(),
                username: username.to_string(),
                group_list,
                group_list_has_more: false,
            };
            Ok((profile, created))
        })
    }

    fn create_group(&mut self, creator: MemberOf, _quota: usize) -> StoreResult<CreatedGroup> {
        let (username, group_name) = (creator.username, creator.group_name);
        self.with(|shared| {
            if !shared.users.contains(username) {
                return Err(StoreError::UserNotFound);
            }
            if shared.groups.contains_key(group_name) {
                return Err(StoreError::GroupExists);
            }
            let members = HashSet::from([username.to_string()]);
            shared.groups.insert(group_name.to_string(), (members, 0));
            Ok(CreatedGroup {
                group_name: group_name.to_string(),
                user: vec![Member {
                    name_id: username.to_string(),
                    last_read: now_timestamp(),
                }],
            })
        })
    }

    fn join_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        self.with(|shared| {
            if !shared.users.contains(username) {
                return Err(StoreError::UserNotFound);
            }
            let group = shared
                .groups
                .get_mut(group_name)
                .ok_or(StoreError::GroupNotFound)?;
            group.0.insert(username.to_string());
            Ok(group_ref(group_name))
        })
    }

    fn leave_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        self.with(|shared| {
            member_of(shared, username, group_name)?.0.remove(username);
            Ok(group_ref(group_name))
        })
    }

    /// Keeps no messages, so `client_msg_id` repeats are not recognised (benchmarks only).
    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<StoreResult<Appended>> {
        let timestamp = now_timestamp();
        batch
            .iter()
            .map(|new| {
                self.with(|shared| {
                    let group = member_of(shared, &new.username, &new.group_name)?;
                    group.1 += 1;
                    Ok(Appended::new(Message {
                        id: new_object_id(),
                        group_name: new.group_name.clone(),
                        username: new.username.clone(),
                        text: new.text.clone(),
                        timestamp: timestamp.clone(),
                        seq: group.1,
                        client_msg_id: new.client_msg_id.clone(),
                        mentions: new.mentions.clone(),
                        ..Message::default()
                    }))
                })
            })
            .collect()
    }

    fn visit_group(&mut self, entry: &Entry) -> StoreResult<Visit> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        self.with(|shared| {
            let head_seq = member_of(shared, username, group_name)?.1;
            Ok(Visit {
                last_read: now_timestamp(),
                head_seq,
                last_read_seq: head_seq,
            })
        })
    }

    fn enter_group(&mut self, entry: &Entry, _: usize) -> StoreResult<GroupHistory> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        self.with(|shared| {
            let head_seq = member_of(shared, username, group_name)?.1;
            Ok(GroupHistory {
                unread: Vec::new(),
                unread_has_more: false,
                read: Vec::new(),
                head_seq,
                read_seq: head_seq,
                marker_before: head_seq,
                epoch: NOOP_EPOCH.to_string(),
                first_seq: 1,
            })
        })
    }

    fn mark_read(&mut self, _: &[ReadMark]) -> StoreResult<()> {
        Ok(())
    }

    fn read_state(&mut self, username: &str, group_name: &str) -> StoreResult<GroupReadState> {
        self.with(|shared| {
            let head = member_of(shared, username, group_name)?.1;
            Ok(GroupReadState::new(
                group_name.to_string(),
                new_object_id(),
                head,
                head,
            ))
        })
    }

    fn my_groups(&mut self, _: &str, _: &GroupsQuery) -> StoreResult<MembershipsPage> {
        Ok(MembershipsPage {
            groups: Vec::new(),
            has_more: false,
        })
    }

    fn fetch_messages(&mut self, member: MemberOf, page: PageQuery) -> StoreResult<MessagePage> {
        let (username, group_name) = (member.username, member.group_name);
        self.with(|shared| {
            member_of(shared, username, group_name)?;
            Ok(MessagePage {
                messages: Vec::new(),
                has_more: false,
                epoch: NOOP_EPOCH.to_string(),
                first_seq: 1,
            })
        })
    }

    fn list_groups(&mut self, query: &GroupsQuery, _: &str) -> StoreResult<GroupsPage> {
        self.with(|shared| {
            let after = query.after.as_deref().unwrap_or("");
            let mut groups: Vec<GroupSummary> = shared
                .groups
                .iter()
                .filter(|(name, _)| name.as_str() > after)
                .map(|(name, (members, _))| {
                    GroupSummary::new(name.clone(), members.iter().cloned().collect())
                })
                .collect();
            groups.sort_by(|a, b| a.group_name.cmp(&b.group_name));
            let has_more = groups.len() > query.limit as usize;
            groups.truncate(query.limit as usize);
            Ok(GroupsPage { groups, has_more })
        })
    }

    fn group_members(&mut self, group_name: &str) -> StoreResult<Vec<String>> {
        self.with(|shared| {
            shared
                .groups
                .get(group_name)
                .map(|(members, _)| members.iter().cloned().collect())
                .ok_or(StoreError::GroupNotFound)
        })
    }

    fn group_heads(&mut self, _: &[String]) -> StoreResult<Vec<(String, u64)>> {
        Ok(Vec::new())
    }

    fn messages_after(&mut self, _: &str, _: u64, _: u32) -> StoreResult<Vec<Message>> {
        Ok(Vec::new())
    }
    // Managing messages and groups is not part of what this store measures.
    fn message_at(&mut self, _: &str, _: u64) -> StoreResult<Option<Message>> {
        Err(not_kept())
    }

    fn rewrite(&mut self, _: &str, _: u64, _: Rewrite) -> StoreResult<Option<Message>> {
        Err(not_kept())
    }

    fn role(&mut self, _: &str, _: &str) -> StoreResult<Role> {
        Err(not_kept())
    }

    fn set_role(&mut self, _: &str, _: &str, _: Role) -> StoreResult<()> {
        Err(not_kept())
    }

    fn members_with_role(&mut self, _: &str, _: Role) -> StoreResult<Vec<String>> {
        Err(not_kept())
    }

    fn set_banned(&mut self, _: &str, _: &str, _: bool) -> StoreResult<()> {
        Err(not_kept())
    }

    fn remove_group(&mut self, _: &str) -> StoreResult<()> {
        Err(not_kept())
    }

    fn prune(&mut self, _: &str, _: &PruneCut, _: u32) -> StoreResult<u64> {
        Ok(0)
    }

    fn group_names(&mut self, _: &str, _: u32) -> StoreResult<Vec<(String, u64)>> {
        Ok(Vec::new())
    }

    fn owned_groups(&mut self, _: &str) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    fn erase_user(&mut self, _: &str) -> StoreResult<Vec<String>> {
        Err(not_kept())
    }

    fn erasures_since(&mut self, _: u64) -> StoreResult<Vec<(String, u64)>> {
        Ok(Vec::new())
    }

    fn open_direct(&mut self, _: &str, _: &str) -> StoreResult<GroupRef> {
        Err(not_kept())
    }

    fn set_blocked(&mut self, _: &str, _: &str, _: bool) -> StoreResult<Vec<String>> {
        Err(not_kept())
    }

    fn blocked_users(&mut self, _: &str) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    fn set_notify(
        &mut self,
        _: crate::model::MemberOf,
        _: crate::model::Notify,
    ) -> StoreResult<()> {
        Err(not_kept())
    }

    fn claim_pushes(&mut self, _: u64, _: u64, _: u32) -> StoreResult<Vec<crate::model::PushJob>> {
        Ok(Vec::new())
    }

    fn settle_pushes(&mut self, _: &[(String, Option<u64>)]) -> StoreResult<()> {
        Ok(())
    }

    fn trim_pushes(&mut self, _: u64, _: u64) -> StoreResult<crate::model::PushQueueState> {
        Ok(crate::model::PushQueueState::default())
    }
}

fn not_kept() -> StoreError {
    StoreError::Unavailable("the benchmark store keeps no messages to manage".into())
}
