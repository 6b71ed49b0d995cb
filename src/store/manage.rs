//! Managing messages and groups, the store's half (what rooms see of it is `server/manage.rs`'s):
//! who may change what, the rules of editing and deleting messages, roles, removals, bans,
//! deleting a group, retention and erasing a user, written once over the `Store` primitives
//! (each backend only reads and writes; see `store/mod.rs`).
//!
//! Every rule that must hold against a concurrent writer is enforced by a conditional write in
//! the primitive itself (an edit never touches a tombstone; a join never passes a ban); what
//! is checked here first can only change to something the primitive still refuses.

use std::sync::{Mutex, MutexGuard};

use super::{PruneCut, Rewrite, Store, StoreError, StoreResult};
use crate::model::{Message, Role};

/// Membership changes of this process take turns: a leave that hands ownership over, a role
/// change, a removal or ban read a member's role and then write, in several store calls, and
/// two of them at once on different workers (an owner and its heir leaving together, with
/// several event loops) could otherwise both read the state before either wrote it (groups
/// left without an owner, leaves answered `not_a_member` that took effect). They are rare;
/// holding a turn across the few calls costs nothing measurable. Taken before any store call,
/// so it is always taken before SQLite's writer turn.
static MEMBERSHIP_TURN: Mutex<()> = Mutex::new(());

fn membership_turn() -> MutexGuard<'static, ()> {
    MEMBERSHIP_TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A message change that was carried out (`changed`), or found already done (a repeated
/// delete: nothing to broadcast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub message: Message,
    pub changed: bool,
}

/// `edit_message`: only the author, while a member, and never a deleted message.
pub fn edit(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    seq: u64,
    text: &str,
    mentions: Option<&[String]>,
) -> StoreResult<Rewritten> {
    let role = store.role(group_name, username)?;
    let message = live_message(store, group_name, seq)?;
    if message.username != username {
        return Err(StoreError::Forbidden("Only the author may edit a message."));
    }
    if let Some(mentions) = mentions {
        super::check_mentions(mentions, role, |name| match store.role(group_name, name) {
            Ok(_) => Ok(true),
            Err(StoreError::NotAMember | StoreError::GroupNotFound) => Ok(false),
            Err(error) => Err(error),
        })?;
    }
    let at = crate::model::now_timestamp();
    let change = Rewrite::Edit {
        text,
        at: &at,
        mentions,
    };
    let message = store
        .rewrite(group_name, seq, change)?
        .ok_or(StoreError::MessageNotFound)?;
    Ok(Rewritten {
        message,
        changed: true,
    })
}

/// `delete_message`: the author, or the group's owner or an admin. Deleting a tombstone again
/// succeeds and changes nothing (so a retry is safe).
pub fn delete(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    seq: u64,
) -> StoreResult<Rewritten> {
    let role = store.role(group_name, username)?;
    let message = store
        .message_at(group_name, seq)?
        .ok_or(StoreError::MessageNotFound)?;
    if message.username != username && !role.moderates() {
        return Err(StoreError::Forbidden(
            "Only the author, an admin or the owner may delete a message.",
        ));
    }
    if message.deleted {
        return Ok(Rewritten {
            message,
            changed: false,
        });
    }
    match store.rewrite(group_name, seq, Rewrite::Erase)? {
        Some(message) => Ok(Rewritten {
            message,
            changed: true,
        }),
        // Deleted by someone else in between: the same outcome.
        None => Ok(Rewritten {
            message: store
                .message_at(group_name, seq)?
                .ok_or(StoreError::MessageNotFound)?,
            changed: false,
        }),
    }
}

fn live_message(store: &mut dyn Store, group_name: &str, seq: u64) -> StoreResult<Message> {
    match store.message_at(group_name, seq)? {
        Some(message) if !message.deleted => Ok(message),
        _ => Err(StoreError::MessageNotFound),
    }
}

/// What `set_role` did: the target's new role, and the actor's when ownership moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub role: Role,
    /// Set when the owner handed ownership over (the former owner is now an admin).
    pub former_owner: Option<String>,
}

/// `set_role`: only the owner. `admin`/`member` for another member; `owner` hands ownership
/// over (the former owner becomes an admin). The owner cannot demote themself otherwise: a
/// group always has its owner.
pub fn set_role(
    store: &mut dyn Store,
    actor: &str,
    group_name: &str,
    target: &str,
    role: Role,
) -> StoreResult<RoleChange> {
    let _turn = membership_turn();
    if store.role(group_name, actor)? != Role::Owner {
        return Err(StoreError::Forbidden(
            "Only the group's owner may change roles.",
        ));
    }
    store.role(group_name, target)?;
    if target == actor {
        if role == Role::Owner {
            return Ok(RoleChange {
                role,
                former_owner: None,
            });
        }
        return Err(StoreError::Forbidden(
            "The owner keeps the role until handing it to another member (role: owner).",
        ));
    }
    store.set_role(group_name, target, role)?;
    if role != Role::Owner {
        return Ok(RoleChange {
            role,
            former_owner: None,
        });
    }
    store.set_role(group_name, actor, Role::Admin)?;
    Ok(RoleChange {
        role,
        former_owner: Some(actor.to_string()),
    })
}

/// Whether `actor` may remove or ban `target`: owner and admins moderate; nobody removes the
/// owner; only the owner removes an admin.
fn may_moderate(
    store: &mut dyn Store,
    actor: &str,
    group_name: &str,
    target: &str,
) -> StoreResult<()> {
    let actor_role = store.role(group_name, actor)?;
    if !actor_role.moderates() {
        return Err(StoreError::Forbidden(
            "Only the group's owner or an admin may remove or ban members.",
        ));
    }
    if actor == target {
        return Err(StoreError::Forbidden(
            "You cannot remove or ban yourself; leave_group instead.",
        ));
    }
    match store.role(group_name, target) {
        Ok(Role::Owner) => Err(StoreError::Forbidden(
            "Nobody may remove the group's owner.",
        )),
        Ok(Role::Admin) if actor_role != Role::Owner => Err(StoreError::Forbidden(
            "Only the owner may remove or ban an admin.",
        )),
        Ok(_) | Err(StoreError::NotAMember) => Ok(()),
        Err(error) => Err(error),
    }
}

/// `remove_member`: takes a member out of the group (they may join again).
pub fn remove(
    store: &mut dyn Store,
    actor: &str,
    group_name: &str,
    target: &str,
) -> StoreResult<()> {
    let _turn = membership_turn();
    may_moderate(store, actor, group_name, target)?;
    store.leave_group(target, group_name).map(|_| ())
}

/// `ban_member`: bans the user (a member or not) and takes them out of the group. The ban is
/// written first, so a join racing it is refused rather than let in behind it.
pub fn ban(
    store: &mut dyn Store,
    actor: &str,
    group_name: &str,
    target: &str,
) -> StoreResult<bool> {
    let _turn = membership_turn();
    may_moderate(store, actor, group_name, target)?;
    store.set_banned(group_name, target, true)?;
    match store.leave_group(target, group_name) {
        Ok(_) => Ok(true),
        Err(StoreError::NotAMember | StoreError::UserNotFound) => Ok(false),
        Err(error) => Err(error),
    }
}

/// `unban_member`: owner and admins lift a ban (lifting none is a success).
pub fn unban(
    store: &mut dyn Store,
    actor: &str,
    group_name: &str,
    target: &str,
) -> StoreResult<()> {
    let _turn = membership_turn();
    if !store.role(group_name, actor)?.moderates() {
        return Err(StoreError::Forbidden(
            "Only the group's owner or an admin may lift a ban.",
        ));
    }
    store.set_banned(group_name, target, false)
}

/// `delete_group`: only the owner.
pub fn delete_group(store: &mut dyn Store, actor: &str, group_name: &str) -> StoreResult<()> {
    let _turn = membership_turn();
    if store.role(group_name, actor)? != Role::Owner {
        return Err(StoreError::Forbidden(
            "Only the group's owner may delete it.",
        ));
    }
    store.remove_group(group_name)
}

/// `leave_group`: an owner who leaves hands ownership to the longest-standing admin, else to
/// the longest-standing member (a group keeps an owner while it has members). Returns the new
/// owner, if ownership moved.
pub fn leave(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
) -> StoreResult<(crate::model::GroupRef, Option<String>)> {
    let _turn = membership_turn();
    let was_owner = matches!(store.role(group_name, username), Ok(Role::Owner));
    let group = store.leave_group(username, group_name)?;
    if !was_owner {
        return Ok((group, None));
    }
    let successor = successor(store, group_name, username)?;
    if let Some(successor) = &successor {
        store.set_role(group_name, successor, Role::Owner)?;
    }
    Ok((group, successor))
}

/// Who takes a group over from `leaving`, its owner: the longest-standing admin, else the
/// longest-standing member; `None` when nobody else is in it.
fn successor(
    store: &mut dyn Store,
    group_name: &str,
    leaving: &str,
) -> StoreResult<Option<String>> {
    let other = |names: Vec<String>| names.into_iter().find(|name| name != leaving);
    match other(store.members_with_role(group_name, Role::Admin)?) {
        Some(admin) => Ok(Some(admin)),
        None => Ok(other(store.group_members(group_name)?)),
    }
}

/// What erasing a user did (`noomnim admin erase-user`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Erasure {
    /// The groups they were in (their memberships are gone).
    pub groups: Vec<String>,
    /// Groups they owned, each with its new owner (chosen as when an owner leaves).
    pub handed_over: Vec<(String, String)>,
    /// Groups they owned alone: deleted, as nobody could ever manage them again.
    pub deleted: Vec<String>,
}

/// Erases a user (the right to be forgotten). Every group they owned is handed over as if
/// they had left it, or deleted when they were its only member, so no group is left without
/// an owner; then the store erases them (`Store::erase_user`: messages scrubbed and
/// anonymous, memberships, bans and quota gone, the erasure logged for every server).
pub fn erase(store: &mut dyn Store, username: &str) -> StoreResult<Erasure> {
    let _turn = membership_turn();
    let mut erasure = Erasure::default();
    for group in store.owned_groups(username)? {
        match successor(store, &group, username)? {
            Some(heir) => {
                store.set_role(&group, &heir, Role::Owner)?;
                erasure.handed_over.push((group, heir));
            }
            None => {
                store.remove_group(&group)?;
                erasure.deleted.push(group);
            }
        }
    }
    erasure.groups = store.erase_user(username)?;
    Ok(erasure)
}

/// Retention limits, as configured (`config::Retention`).
pub use crate::config::Retention;

/// One retention batch for one group whose newest seq is `head`: removes at most `batch` of
/// its messages past the limits. Returns how many were removed (0: the group is within them).
pub fn prune_batch(
    store: &mut dyn Store,
    retention: &Retention,
    group_name: &str,
    head: u64,
    batch: u32,
) -> StoreResult<u64> {
    let below_seq = if retention.max_messages > 0 {
        (head + 1).saturating_sub(retention.max_messages)
    } else {
        0
    };
    let older_than = retention.max_age.and_then(|age| {
        let age = chrono::Duration::from_std(age).ok()?;
        Some(crate::model::format_timestamp(chrono::Utc::now() - age))
    });
    if below_seq <= 1 && older_than.is_none() {
        return Ok(0);
    }
    let cut = PruneCut {
        below_seq,
        older_than: older_than.as_deref(),
    };
    store.prune(group_name, &cut, batch)
}
