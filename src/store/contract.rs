//! Behaviour every `Store` backend must have, checked against a real backend instance.

use super::{Store, StoreError, StoreResult};
use crate::model::{
    CreatedGroup, Entry, GroupHistory, GroupsQuery, MemberOf, MessagePage, NewMessage, PageQuery,
    ReadMark, Visit, MAX_LISTED_MEMBERS,
};

fn message(group: &str, user: &str, text: &str) -> NewMessage {
    NewMessage {
        group_name: group.into(),
        username: user.into(),
        text: text.into(),
        client_msg_id: None,
        mentions: Vec::new(),
        reply_to: None,
    }
}

fn message_with_id(group: &str, user: &str, text: &str, id: &str) -> NewMessage {
    NewMessage {
        client_msg_id: Some(id.into()),
        ..message(group, user, text)
    }
}

/// Runs every check; `prefix` keeps names unique when the database is shared.
pub fn check_all(store: &mut dyn Store, prefix: &str) {
    let alice = format!("{prefix}alice");
    let bob = format!("{prefix}bob");
    let group = format!("{prefix}room");
    check_users_and_groups(store, &alice, &bob, &group);
    check_messages(store, &alice, &bob, &group);
    check_history(store, &alice, &group);
    check_read_marks(store, &alice, &bob, &group);
    check_creation_limits(store, prefix);
    check_idempotent_sends(store, prefix);
    check_group_pages(store, prefix);
    check_membership_pages(store, prefix);
    check_management(store, prefix);
    check_retention(store, prefix);
    check_threads(store, prefix);
    check_erasure(store, prefix);
    check_direct_conversations(store, prefix);
    check_mentions_and_levels(store, prefix);
}

/// The names of the user's `my_groups` rows.
fn shown(store: &mut dyn Store, username: &str) -> Vec<String> {
    let query = GroupsQuery {
        after: None,
        limit: 100,
    };
    let page = store.my_groups(username, &query).expect("memberships");
    page.groups.into_iter().map(|g| g.group_name).collect()
}

fn check_direct_conversations(store: &mut dyn Store, prefix: &str) {
    use crate::model::direct;
    let (ann, bob, eve) = (
        format!("{prefix}dm-ann"),
        format!("{prefix}dm-bob"),
        format!("{prefix}dm-eve"),
    );
    for user in [&ann, &bob, &eve] {
        store.find_user(user, true).expect("user");
    }
    let opened = store.open_direct(&ann, &bob).expect("open");
    assert_eq!(opened.group_name, direct::name_of(&bob, &ann));
    let dm = opened.group_name.clone();
    assert_eq!(
        store.open_direct(&ann, &bob),
        Ok(opened.clone()),
        "safe to repeat"
    );
    assert!(shown(store, &ann).contains(&dm));
    assert!(
        !shown(store, &bob).contains(&dm),
        "shown at the first message"
    );
    let sent = store.append_messages(&[message(&dm, &ann, "hi"), message(&dm, &ann, "there")]);
    assert_eq!(
        sent[0].as_ref().map(|a| a.revealed_to.clone()),
        Ok(Some(bob.clone()))
    );
    assert_eq!(sent[1].as_ref().map(|a| a.revealed_to.clone()), Ok(None));
    let row = store.read_state(&bob, &dm).expect("state");
    let attention = row.attention.expect("attention");
    assert_eq!(attention.kind.as_deref(), Some(direct::KIND));
    assert_eq!(attention.with.as_deref(), Some(ann.as_str()));
    assert!(shown(store, &bob).contains(&dm));
    // A third user finds nothing.
    assert_eq!(store.join_group(&eve, &dm), Err(StoreError::GroupNotFound));
    assert_eq!(
        fetch(store, &eve, &dm, page_from(0)).map(|_| ()),
        Err(StoreError::GroupNotFound)
    );
    assert!(matches!(
        store.append_messages(&[message(&dm, &eve, "me too")])[0],
        Err(StoreError::GroupNotFound)
    ));
    let listed = store
        .list_groups(
            &GroupsQuery {
                after: None,
                limit: 1000,
            },
            &eve,
        )
        .expect("list");
    assert!(listed
        .groups
        .iter()
        .all(|g| !direct::is_direct(&g.group_name)));
    // Leaving hides it until the next message.
    store.leave_group(&bob, &dm).expect("leave");
    assert!(!shown(store, &bob).contains(&dm));
    let sent = store.append_messages(&[message(&dm, &ann, "still there?")]);
    assert_eq!(
        sent[0].as_ref().map(|a| a.revealed_to.clone()),
        Ok(Some(bob.clone()))
    );
    assert!(shown(store, &bob).contains(&dm));
    // Blocks: no opening, no sending; erasing either side removes them.
    assert_eq!(store.set_blocked(&bob, &ann, true), Ok(vec![ann.clone()]));
    assert_eq!(store.set_blocked(&bob, &ann, true), Ok(vec![ann.clone()]));
    assert_eq!(store.open_direct(&ann, &bob), Err(StoreError::Blocked));
    assert!(matches!(
        store.append_messages(&[message(&dm, &ann, "please")])[0],
        Err(StoreError::Blocked)
    ));
    assert!(store.append_messages(&[message(&dm, &bob, "no")])[0].is_ok());
    assert_eq!(
        store.set_blocked(&bob, &format!("{prefix}nobody"), true),
        Err(StoreError::UserNotFound)
    );
    assert_eq!(store.set_blocked(&bob, &ann, false), Ok(Vec::new()));
    assert_eq!(store.set_blocked(&bob, &eve, true), Ok(vec![eve.clone()]));
    super::manage::erase(store, &eve).expect("erase");
    assert_eq!(store.blocked_users(&bob), Ok(Vec::new()));
}

/// Replies join their thread's root, which counts its live replies through deletes and
/// erasures; a thread pages as its root and replies; a reply to nothing is refused.
fn check_threads(store: &mut dyn Store, prefix: &str) {
    let (ann, bob) = (format!("{prefix}t-ann"), format!("{prefix}t-bob"));
    let group = format!("{prefix}threads");
    owner_and_member(store, &ann, &bob, &group);
    let reply = |text: &str, by: &str, to: u64| NewMessage {
        reply_to: Some(to),
        ..message(&group, by, text)
    };
    // A reply names a seq its sender has seen stored: never one of its own batch.
    let mut sent = store.append_messages(&[
        message(&group, &ann, "root"),
        message(&group, &bob, "aside"),
    ]);
    sent.extend(store.append_messages(&[reply("first", &bob, 1)]));
    sent.extend(store.append_messages(&[
        // A reply to a reply joins the root's thread.
        reply("second", &ann, 3),
        reply("to nothing", &ann, 99),
    ]));
    let seqs: Vec<Option<u64>> = sent
        .iter()
        .map(|r| r.as_ref().ok().map(|a| a.message.seq))
        .collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3), Some(4), None]);
    assert_eq!(sent[4].as_ref().err(), Some(&StoreError::MessageNotFound));
    assert_eq!(sent[3].as_ref().map(|a| a.message.reply_to), Ok(Some(1)));
    let root = |store: &mut dyn Store| store.message_at(&group, 1).expect("read").expect("root");
    let counted = root(store);
    assert_eq!((counted.reply_count, counted.last_reply_seq), (2, Some(4)));
    let thread = PageQuery {
        thread: Some(3),
        ..page_from(0)
    };
    let page = fetch(store, &ann, &group, thread).expect("thread");
    let in_thread: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        in_thread,
        [1, 3, 4],
        "the root and its replies, not the aside"
    );
    let missing = PageQuery {
        thread: Some(77),
        ..page_from(0)
    };
    assert_eq!(
        fetch(store, &ann, &group, missing).err(),
        Some(StoreError::MessageNotFound)
    );
    // Deleting the newest reply counts again; so does erasing the other reply's author.
    store
        .rewrite(&group, 4, super::Rewrite::Erase)
        .expect("delete")
        .expect("deleted");
    let counted = root(store);
    assert_eq!((counted.reply_count, counted.last_reply_seq), (1, Some(3)));
    assert_eq!(
        store.append_messages(&[reply("to a deleted one", &bob, 4)])[0]
            .as_ref()
            .err(),
        Some(&StoreError::MessageNotFound)
    );
    store.erase_user(&bob).expect("erase");
    let counted = root(store);
    assert_eq!((counted.reply_count, counted.last_reply_seq), (0, None));
}

fn check_mentions_and_levels(store: &mut dyn Store, prefix: &str) {
    use crate::model::Notify;
    let (owner, member) = (format!("{prefix}m-owner"), format!("{prefix}m-member"));
    let group = format!("{prefix}mentioning");
    owner_and_member(store, &owner, &member, &group);
    let mentioning = |text: &str, by: &str, names: &[&str]| NewMessage {
        mentions: names.iter().map(|n| n.to_string()).collect(),
        ..message(&group, by, text)
    };
    let count = |store: &mut dyn Store| {
        let state = store.read_state(&member, &group).expect("state");
        state.attention.expect("attention").mention_count
    };
    let sent = store.append_messages(&[
        mentioning("you", &owner, &[&member]),
        mentioning("all", &owner, &["@room"]),
        mentioning("me", &member, &[&member]),
        mentioning("nobody", &owner, &["stranger"]),
        mentioning("everyone", &member, &["@room"]),
    ]);
    assert_eq!(
        sent[0].as_ref().map(|a| a.message.mentions.clone()),
        Ok(vec![member.clone()])
    );
    assert!(sent[1].is_ok() && sent[2].is_ok());
    assert_eq!(sent[3], Err(StoreError::NotMentionable("stranger".into())));
    assert!(matches!(sent[4], Err(StoreError::Forbidden(_))));
    assert_eq!(count(store), 2, "a self-mention does not count");
    let page = fetch(store, &member, &group, page_from(0)).expect("page");
    assert_eq!(page.messages.len(), 3, "refused mentions store nothing");
    assert_eq!(page.messages[1].mentions, vec!["@room".to_string()]);
    let rows = store
        .my_groups(
            &member,
            &GroupsQuery {
                after: None,
                limit: 10,
            },
        )
        .expect("rows");
    let row = rows
        .groups
        .iter()
        .find(|g| g.group_name == group)
        .expect("row");
    assert_eq!(row.attention.as_ref().map(|a| a.mention_count), Some(2));
    super::manage::edit(store, &owner, &group, 1, "never mind", Some(&[])).expect("edit");
    assert_eq!(count(store), 1);
    super::manage::edit(
        store,
        &owner,
        &group,
        1,
        "you again",
        Some(std::slice::from_ref(&member)),
    )
    .expect("edit");
    assert_eq!(count(store), 2);
    super::manage::delete(store, &owner, &group, 2).expect("delete");
    assert_eq!(count(store), 1);
    store
        .mark_read(&[ReadMark {
            username: member.clone(),
            group_name: group.clone(),
            seq: 3,
        }])
        .expect("mark");
    assert_eq!(count(store), 0, "read mentions stop counting");
    let who = MemberOf {
        username: &member,
        group_name: &group,
    };
    store.set_notify(who, Notify::Mentions).expect("level");
    let state = store.read_state(&member, &group).expect("state");
    assert_eq!(state.attention.map(|a| a.notify), Some(Notify::Mentions));
    let stranger = MemberOf {
        username: &member,
        group_name: "no such group",
    };
    assert_eq!(
        store.set_notify(stranger, Notify::None),
        Err(StoreError::GroupNotFound)
    );
}

// The calls about one member, by name (what most checks here do).
/// Registers both users; `owner` creates `group` and `member` joins it.
fn owner_and_member(store: &mut dyn Store, owner: &str, member: &str, group: &str) {
    store.find_user(owner, true).expect("user");
    store.find_user(member, true).expect("user");
    create(store, owner, group, 0).expect("group");
    store.join_group(member, group).expect("join");
}

fn create(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    quota: usize,
) -> StoreResult<CreatedGroup> {
    store.create_group(
        MemberOf {
            username,
            group_name,
        },
        quota,
    )
}

fn entry<'a>(username: &'a str, group_name: &'a str) -> Entry<'a> {
    Entry {
        member: MemberOf {
            username,
            group_name,
        },
        leaving: None,
        marks_entry: true,
    }
}

fn enter(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    leaving: Option<&ReadMark>,
    budget: usize,
) -> StoreResult<GroupHistory> {
    let entry = Entry {
        leaving,
        ..entry(username, group_name)
    };
    store.enter_group(&entry, budget)
}

fn visit_as(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    leaving: Option<&ReadMark>,
) -> StoreResult<Visit> {
    store.visit_group(&Entry {
        leaving,
        ..entry(username, group_name)
    })
}

fn fetch(
    store: &mut dyn Store,
    username: &str,
    group_name: &str,
    page: PageQuery,
) -> StoreResult<MessagePage> {
    store.fetch_messages(
        MemberOf {
            username,
            group_name,
        },
        page,
    )
}

fn page_from(after_seq: u64) -> PageQuery {
    PageQuery {
        before_seq: None,
        after_seq: Some(after_seq),
        limit: 100,
        thread: None,
    }
}

/// Edits, tombstones, roles, removal, bans and deleting a group: the rules of `manage.rs` over
/// this backend's primitives.
fn check_management(store: &mut dyn Store, prefix: &str) {
    use super::manage;
    use crate::model::Role;
    let [owner, admin, member, stranger] =
        ["owner", "admin", "member", "stranger"].map(|n| format!("{prefix}mg-{n}"));
    let group = format!("{prefix}managed");
    for user in [&owner, &admin, &member, &stranger] {
        store.find_user(user, true).expect("user");
    }
    create(store, &owner, &group, 0).expect("group");
    store.join_group(&admin, &group).expect("join");
    store.join_group(&member, &group).expect("join");
    assert_eq!(store.role(&group, &owner), Ok(Role::Owner));
    assert_eq!(store.role(&group, &member), Ok(Role::Member));
    assert_eq!(store.role(&group, &stranger), Err(StoreError::NotAMember));
    let sent = store.append_messages(&[
        message(&group, &member, "first"),
        message(&group, &owner, "second"),
        message(&group, &member, "third"),
    ]);
    assert!(sent.iter().all(Result::is_ok));

    // Edit: the author only; the seq stays; history has the new text and `edited_at`.
    let edited = manage::edit(store, &member, &group, 1, "first, edited", None).expect("edit");
    assert!(edited.changed);
    assert_eq!(edited.message.seq, 1);
    assert_eq!(edited.message.text, "first, edited");
    assert!(edited.message.edited_at.is_some());
    assert!(matches!(
        manage::edit(store, &owner, &group, 1, "hijack", None),
        Err(StoreError::Forbidden(_))
    ));
    assert_eq!(
        manage::edit(store, &member, &group, 99, "nothing", None),
        Err(StoreError::MessageNotFound)
    );

    // Delete: the author, or a moderator; the tombstone keeps the seq and no text.
    assert!(matches!(
        manage::delete(store, &member, &group, 2),
        Err(StoreError::Forbidden(_))
    ));
    let deleted = manage::delete(store, &owner, &group, 1).expect("owner deletes");
    assert!(deleted.changed && deleted.message.deleted && deleted.message.text.is_empty());
    let again = manage::delete(store, &member, &group, 1).expect("repeat");
    assert!(!again.changed, "a repeated delete changes nothing");
    assert_eq!(
        manage::edit(store, &member, &group, 1, "back from the dead", None),
        Err(StoreError::MessageNotFound),
        "a tombstone cannot be edited"
    );
    assert_eq!(
        store.rewrite(
            &group,
            1,
            super::Rewrite::Edit {
                text: "x",
                at: "2026-01-01T00:00:00.000Z",
                mentions: None,
            }
        ),
        Ok(None)
    );
    let page = fetch(store, &member, &group, page_from(0)).expect("page");
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "tombstones keep history gapless");
    assert!(page.messages[0].deleted && page.messages[0].text.is_empty());
    assert_eq!(page.messages[1].text, "second");

    // Roles: only the owner sets them; hand-over makes the former owner an admin.
    assert!(matches!(
        manage::set_role(store, &member, &group, &admin, Role::Admin),
        Err(StoreError::Forbidden(_))
    ));
    manage::set_role(store, &owner, &group, &admin, Role::Admin).expect("promote");
    assert_eq!(store.role(&group, &admin), Ok(Role::Admin));
    let page = store
        .my_groups(
            &admin,
            &GroupsQuery {
                after: None,
                limit: 10,
            },
        )
        .expect("my groups");
    let mine = page
        .groups
        .iter()
        .find(|g| g.group_name == group)
        .expect("listed");
    assert_eq!(mine.role, Role::Admin);
    let listed = store
        .list_groups(
            &GroupsQuery {
                after: Some(format!("{prefix}managec")),
                limit: 1,
            },
            &admin,
        )
        .expect("list");
    assert_eq!(listed.groups[0].role, Some(Role::Admin));

    // An admin deletes anyone's message; removes members but not the owner.
    assert!(
        manage::delete(store, &admin, &group, 3)
            .expect("admin deletes")
            .changed
    );
    assert!(matches!(
        manage::remove(store, &admin, &group, &owner),
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        manage::remove(store, &member, &group, &admin),
        Err(StoreError::Forbidden(_))
    ));
    manage::remove(store, &admin, &group, &member).expect("remove");
    assert_eq!(store.role(&group, &member), Err(StoreError::NotAMember));
    store
        .join_group(&member, &group)
        .expect("a removed member may rejoin");

    // Ban: out at once, and no way back in until unbanned (a non-member can be banned too).
    assert_eq!(manage::ban(store, &admin, &group, &member), Ok(true));
    assert_eq!(store.join_group(&member, &group), Err(StoreError::Banned));
    assert_eq!(manage::ban(store, &admin, &group, &stranger), Ok(false));
    assert_eq!(store.join_group(&stranger, &group), Err(StoreError::Banned));
    let refused = store.append_messages(&[message(&group, &member, "after the ban")]);
    assert_eq!(refused[0], Err(StoreError::NotAMember));
    manage::unban(store, &admin, &group, &member).expect("unban");
    store
        .join_group(&member, &group)
        .expect("joins after the ban is lifted");

    // Hand-over, then an owner who leaves passes the group to the longest-standing admin.
    let change = manage::set_role(store, &owner, &group, &member, Role::Owner).expect("hand over");
    assert_eq!(change.former_owner.as_deref(), Some(owner.as_str()));
    assert_eq!(store.role(&group, &owner), Ok(Role::Admin));
    // (`owner` has been a member, and an admin, longer than `admin`.)
    let (_, successor) = manage::leave(store, &member, &group).expect("owner leaves");
    assert_eq!(successor.as_deref(), Some(owner.as_str()));
    assert_eq!(store.role(&group, &owner), Ok(Role::Owner));

    // Delete the group: only the owner; a new group of that name has a new epoch and seq 1.
    let old_epoch = store.read_state(&admin, &group).expect("state").group_id;
    assert!(matches!(
        manage::delete_group(store, &admin, &group),
        Err(StoreError::Forbidden(_))
    ));
    manage::delete_group(store, &owner, &group).expect("delete group");
    assert_eq!(store.role(&group, &admin), Err(StoreError::GroupNotFound));
    assert_eq!(store.messages_after(&group, 0, 10), Ok(Vec::new()));
    create(store, &stranger, &group, 0).expect("the name is free again");
    assert_eq!(
        store.role(&group, &stranger),
        Ok(Role::Owner),
        "bans went with the group"
    );
    let fresh = store.append_messages(&[message(&group, &stranger, "new life")]);
    assert_eq!(fresh[0].as_ref().map(|a| a.message.seq), Ok(1));
    let state = store.read_state(&stranger, &group).expect("state");
    assert_ne!(state.group_id, old_epoch);
}

/// Retention removes a prefix of the history in batches, never the newest message, and
/// history replies say where it now starts.
fn check_retention(store: &mut dyn Store, prefix: &str) {
    use super::manage::{prune_batch, Retention};
    let user = format!("{prefix}keeper");
    let group = format!("{prefix}retained");
    store.find_user(&user, true).expect("user");
    create(store, &user, &group, 0).expect("group");
    let batch: Vec<NewMessage> = (0..30)
        .map(|i| message(&group, &user, &format!("m{i}")))
        .collect();
    assert!(store.append_messages(&batch).iter().all(Result::is_ok));
    let keep_ten = Retention {
        max_age: None,
        max_messages: 10,
    };
    assert_eq!(prune_batch(store, &keep_ten, &group, 30, 7), Ok(7));
    assert_eq!(prune_batch(store, &keep_ten, &group, 30, 100), Ok(13));
    assert_eq!(prune_batch(store, &keep_ten, &group, 30, 100), Ok(0));
    let page = fetch(store, &user, &group, page_from(0)).expect("page");
    assert_eq!(page.first_seq, 21);
    assert_eq!(page.messages.first().map(|m| m.seq), Some(21));
    assert_eq!(page.messages.len(), 10);
    let history = enter(store, &user, &group, None, 1 << 20).expect("enter");
    assert_eq!(history.first_seq, 21);
    // Everything is too old: all but the newest goes, and numbering goes on after it.
    let nothing_is_young = Retention {
        max_age: Some(std::time::Duration::from_secs(0)),
        max_messages: 0,
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(
        prune_batch(store, &nothing_is_young, &group, 30, 100),
        Ok(9)
    );
    let page = fetch(store, &user, &group, page_from(0)).expect("page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![30]
    );
    let next = store.append_messages(&[message(&group, &user, "after")]);
    assert_eq!(next[0].as_ref().map(|a| a.message.seq), Ok(31));
}

/// Erasing a user: anonymous tombstones, no memberships, owned groups handed over or deleted,
/// the name free with a fresh quota, and the erasure logged.
fn check_erasure(store: &mut dyn Store, prefix: &str) {
    use crate::model::Role;
    let (gone, stays) = (format!("{prefix}erased"), format!("{prefix}stays"));
    let group = format!("{prefix}erasing");
    let (owned, alone) = (
        format!("{prefix}erased-owns"),
        format!("{prefix}erased-alone"),
    );
    owner_and_member(store, &stays, &gone, &group);
    create(store, &gone, &owned, 2).expect("an owned group");
    store.join_group(&stays, &owned).expect("join");
    create(store, &gone, &alone, 2).expect("a group of their own");
    assert_eq!(
        create(store, &gone, &format!("{prefix}erased-3"), 2),
        Err(StoreError::QuotaExceeded)
    );
    let sent = store.append_messages(&[
        message_with_id(&group, &gone, "my secret", &format!("{prefix}erase-key")),
        message(&group, &stays, "hello"),
    ]);
    assert!(sent.iter().all(Result::is_ok));
    let before = crate::model::unix_millis();
    let erasure = super::manage::erase(store, &gone).expect("erase");
    assert_eq!(erasure.groups, vec![owned.clone(), group.clone()]);
    assert_eq!(erasure.handed_over, vec![(owned.clone(), stays.clone())]);
    assert_eq!(erasure.deleted, vec![alone.clone()]);
    assert_eq!(store.erase_user(&gone), Err(StoreError::UserNotFound));
    assert_eq!(store.role(&owned, &stays), Ok(Role::Owner));
    assert_eq!(store.group_members(&alone), Err(StoreError::GroupNotFound));
    let page = fetch(store, &stays, &group, page_from(0)).expect("page");
    assert!(page.messages[0].deleted && page.messages[0].text.is_empty());
    assert_eq!(
        page.messages[0].username, "",
        "no name is left on a tombstone"
    );
    assert_eq!(page.messages[0].client_msg_id, None);
    assert_eq!(page.messages[1].text, "hello");
    assert_eq!(store.group_members(&group), Ok(vec![stays.clone()]));
    let erased = store.erasures_since(before).expect("log");
    assert!(erased
        .iter()
        .any(|(name, at)| *name == gone && *at >= before));
    let (_, created) = store.find_user(&gone, true).expect("register again");
    assert!(created, "the name can be registered again");
    assert_eq!(store.owned_groups(&gone), Ok(Vec::new()));
    create(store, &gone, &format!("{prefix}erased-new"), 1).expect("a fresh quota");
}

/// At most one message per (username, client_msg_id): repeats, in a later batch or the same
/// one, get the original back marked `duplicate`, take no seq and are not stored.
fn check_idempotent_sends(store: &mut dyn Store, prefix: &str) {
    let (dave, erin) = (format!("{prefix}dave"), format!("{prefix}erin"));
    let group = format!("{prefix}retries");
    store.find_user(&dave, true).expect("dave");
    store.find_user(&erin, true).expect("erin");
    create(store, &dave, &group, 0).expect("group");
    let joined = store.join_group(&erin, &group).expect("erin joins");
    let entered = enter(store, &erin, &group, None, 1 << 20).expect("enter");
    assert_eq!(
        entered.epoch, joined.group_id,
        "the epoch is the group's identity"
    );
    let first = store.append_messages(&[message_with_id(&group, &dave, "hi", "k1")]);
    let original = first[0].clone().expect("stored");
    assert!(!original.duplicate);
    assert_eq!(original.message.client_msg_id.as_deref(), Some("k1"));
    let batch = vec![
        message_with_id(&group, &dave, "hi again", "k1"),
        message_with_id(&group, &dave, "two", "k2"),
        message_with_id(&group, &dave, "two, retried in the same batch", "k2"),
        message_with_id(&group, &erin, "same id, other sender", "k1"),
        message(&group, &dave, "no id"),
        message(&group, &dave, "no id"),
    ];
    let results: Vec<_> = store
        .append_messages(&batch)
        .into_iter()
        .map(|r| r.expect("stored or found"))
        .collect();
    assert_eq!(
        results[0],
        crate::model::Appended::duplicate(original.message.clone())
    );
    assert!(!results[1].duplicate);
    assert!(results[2].duplicate, "a repeat within one batch");
    assert_eq!(results[2].message, results[1].message);
    assert!(!results[3].duplicate, "ids are per sender");
    assert!(!results[4].duplicate && !results[5].duplicate);
    let seqs: Vec<u64> = results
        .iter()
        .filter(|r| !r.duplicate)
        .map(|r| r.message.seq)
        .collect();
    assert_eq!(seqs, vec![2, 3, 4, 5], "repeats take no seq");
    let stored = store.messages_after(&group, 0, 100).expect("history");
    assert_eq!(stored.len(), 5);
    let page = fetch(
        store,
        &erin,
        &group,
        PageQuery {
            before_seq: None,
            after_seq: None,
            limit: 10,
            thread: None,
        },
    )
    .expect("page");
    assert_eq!(page.epoch, joined.group_id);
    assert_eq!(stored[0].client_msg_id.as_deref(), Some("k1"));
    store.leave_group(&dave, &group).expect("dave leaves");
    let retry = store.append_messages(&[message_with_id(&group, &dave, "late retry", "k2")]);
    assert_eq!(
        retry[0].as_ref().map(|r| (r.duplicate, r.message.seq)),
        Ok((true, 2)),
        "a retry after leaving still gets its original"
    );
    let stranger = store.append_messages(&[message_with_id(&group, &dave, "new", "k9")]);
    assert_eq!(stranger[0], Err(StoreError::NotAMember));
    let elsewhere = format!("{prefix}no-such-group");
    let retry = store.append_messages(&[message_with_id(&elsewhere, &dave, "lost", "k2")]);
    assert_eq!(
        retry[0].as_ref().map(|r| (r.duplicate, r.message.seq)),
        Ok((true, 2)),
        "a retry naming a group that does not exist still gets its original"
    );
    let fresh = store.append_messages(&[message_with_id(&elsewhere, &dave, "new", "k8")]);
    assert_eq!(fresh[0], Err(StoreError::GroupNotFound));
}

/// `my_groups` and `find_user`'s `group_list` list memberships by group name (byte order)
/// whatever order they were created or joined in, and page with `after`.
fn check_membership_pages(store: &mut dyn Store, prefix: &str) {
    let (owner, member) = (format!("{prefix}mp-owner"), format!("{prefix}mp-member"));
    store.find_user(&owner, true).expect("owner");
    store.find_user(&member, true).expect("member");
    // Created in one order, joined in another, listed by name.
    let names: Vec<String> = ["c", "a", "d", "b"]
        .iter()
        .map(|n| format!("{prefix}mp-{n}"))
        .collect();
    for name in &names {
        create(store, &owner, name, 0).expect("group");
    }
    for name in names.iter().rev() {
        store.join_group(&member, name).expect("join");
    }
    let first_in_a = store.append_messages(&[message(&names[1], &owner, "in a")]);
    assert!(first_in_a[0].is_ok());
    let mut sorted = names.clone();
    sorted.sort();
    let (profile, _) = store.find_user(&member, true).expect("find");
    assert_eq!(profile.group_list, sorted);
    assert!(!profile.group_list_has_more);
    let query = |after: Option<&String>, limit| GroupsQuery {
        after: after.cloned(),
        limit,
    };
    let page = store.my_groups(&member, &query(None, 3)).expect("page 1");
    let listed: Vec<&str> = page.groups.iter().map(|g| g.group_name.as_str()).collect();
    assert_eq!(
        listed,
        sorted[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(page.has_more);
    let a = &page.groups[0];
    assert_eq!((a.last_seq, a.last_read_seq, a.unread_count), (1, 0, 1));
    let rest = store
        .my_groups(&member, &query(Some(&sorted[2]), 3))
        .expect("page 2");
    assert_eq!(rest.groups.len(), 1);
    assert_eq!(rest.groups[0].group_name, sorted[3]);
    assert!(!rest.has_more);
    let none = store
        .my_groups(&format!("{prefix}mp-nobody"), &query(None, 10))
        .expect("no memberships");
    assert!(none.groups.is_empty() && !none.has_more);
}

/// `list_groups` pages by name with a member count; big groups leave out the member list.
fn check_group_pages(store: &mut dyn Store, prefix: &str) {
    let owner = format!("{prefix}pager");
    store.find_user(&owner, true).expect("owner");
    for i in 0..5 {
        create(store, &owner, &format!("{prefix}page-{i}"), 0).expect("group");
    }
    let mut seen = Vec::new();
    let mut after = Some(format!("{prefix}page-"));
    loop {
        let page = store
            .list_groups(
                &GroupsQuery {
                    after: after.clone(),
                    limit: 2,
                },
                &owner,
            )
            .expect("page");
        assert!(page.groups.len() <= 2);
        let mine: Vec<String> = page
            .groups
            .iter()
            .map(|g| g.group_name.clone())
            .filter(|name| name.starts_with(&format!("{prefix}page-")))
            .collect();
        seen.extend(mine);
        after = page.groups.last().map(|g| g.group_name.clone());
        if !page.has_more || seen.len() >= 5 {
            break;
        }
    }
    let expected: Vec<String> = (0..5).map(|i| format!("{prefix}page-{i}")).collect();
    assert_eq!(seen[..5], expected[..]);
    let first = store
        .list_groups(
            &GroupsQuery {
                after: Some(format!("{prefix}page-")),
                limit: 1,
            },
            &owner,
        )
        .expect("one");
    assert_eq!(first.groups[0].member_count, 1);
    assert_eq!(first.groups[0].members, Some(vec![owner.clone()]));
    assert!(first.has_more);
    let crowded = format!("{prefix}page-4");
    for i in 0..MAX_LISTED_MEMBERS {
        let member = format!("{prefix}crowd-{i}");
        store.find_user(&member, true).expect("member");
        store.join_group(&member, &crowded).expect("join");
    }
    let last = store
        .list_groups(
            &GroupsQuery {
                after: Some(format!("{prefix}page-3")),
                limit: 1,
            },
            &owner,
        )
        .expect("last");
    assert_eq!(last.groups[0].group_name, crowded);
    assert_eq!(last.groups[0].member_count, MAX_LISTED_MEMBERS as u64 + 1);
    assert_eq!(
        last.groups[0].members, None,
        "only the count past 100 members"
    );
}

fn mark(user: &str, group: &str, seq: u64) -> ReadMark {
    ReadMark {
        username: user.into(),
        group_name: group.into(),
        seq,
    }
}

/// Markers only rise; entering splits by them; a reply budget cuts the unread list and marks
/// only what was handed over.
fn check_read_marks(store: &mut dyn Store, alice: &str, bob: &str, group: &str) {
    store.join_group(bob, group).expect("bob joins again");
    let visit = visit_as(store, bob, group, None).expect("bob visits");
    assert_eq!(
        visit.last_read_seq, 10,
        "joining counts earlier messages as read"
    );
    let batch: Vec<NewMessage> = (11..=20)
        .map(|i| message(group, alice, &format!("{i}").repeat(100)))
        .collect();
    assert!(store.append_messages(&batch).iter().all(Result::is_ok));
    store.mark_read(&[mark(bob, group, 12)]).expect("mark");
    store
        .mark_read(&[mark(bob, group, 11)])
        .expect("a lower mark");
    let visit = visit_as(store, bob, group, None).expect("visit");
    assert_eq!(
        visit.last_read_seq, 12,
        "a lower mark never lowers the marker"
    );
    let one_message = super::encoded_len(&store.messages_after(group, 12, 1).expect("read")[0]);
    let history =
        enter(store, bob, group, None, one_message * 3).expect("enter with a small budget");
    let unread: Vec<u64> = history.unread.iter().map(|m| m.seq).collect();
    assert_eq!(unread, vec![13, 14, 15], "the oldest unread that fit");
    assert!(history.unread_has_more);
    assert_eq!(history.read_seq, 15);
    let history = enter(store, bob, group, None, 1 << 20).expect("enter again");
    let unread: Vec<u64> = history.unread.iter().map(|m| m.seq).collect();
    assert_eq!(
        unread,
        (16..=20).collect::<Vec<_>>(),
        "the rest is still unread"
    );
    assert_eq!(history.read_seq, 20);
    assert!(!history.unread_has_more);
}

fn check_creation_limits(store: &mut dyn Store, prefix: &str) {
    let carol = format!("{prefix}carol");
    assert_eq!(
        store.find_user(&carol, false).map(|(_, new)| new),
        Err(StoreError::UserNotFound),
        "a name that may not be created is not"
    );
    store.find_user(&carol, true).expect("create carol");
    for i in 0..2 {
        create(store, &carol, &format!("{prefix}carol-{i}"), 2).expect("within the quota");
    }
    assert_eq!(
        create(store, &carol, &format!("{prefix}carol-2"), 2),
        Err(StoreError::QuotaExceeded)
    );
    assert!(create(store, &carol, &format!("{prefix}carol-3"), 0).is_ok());
}

fn check_users_and_groups(store: &mut dyn Store, alice: &str, bob: &str, group: &str) {
    let (created, is_new) = store.find_user(alice, true).expect("create alice");
    assert!(is_new);
    assert!(created.group_list.is_empty());
    let (found, is_new) = store.find_user(alice, true).expect("find alice");
    assert!(!is_new);
    assert_eq!(found.id, created.id);
    assert_eq!(
        create(store, "nobody-here", group, 0),
        Err(StoreError::UserNotFound)
    );
    let made = create(store, alice, group, 0).expect("create group");
    assert_eq!(made.user.len(), 1);
    assert_eq!(made.user[0].name_id, alice);
    assert_eq!(create(store, alice, group, 0), Err(StoreError::GroupExists));
    store.find_user(bob, true).expect("create bob");
    assert_eq!(
        store.join_group(bob, "no-such-group-x"),
        Err(StoreError::GroupNotFound)
    );
    let joined = store.join_group(bob, group).expect("join");
    assert_eq!(
        store.join_group(bob, group),
        Ok(joined.clone()),
        "join is idempotent"
    );
    let (bob_profile, _) = store.find_user(bob, true).expect("find bob");
    assert_eq!(bob_profile.group_list, vec![group.to_string()]);
    let listed = store
        .list_groups(
            &GroupsQuery {
                after: None,
                limit: 100,
            },
            "",
        )
        .expect("list");
    let row = listed
        .groups
        .iter()
        .find(|g| g.group_name == group)
        .expect("group listed");
    assert_eq!(row.member_count, 2);
    assert_eq!(row.members, Some(vec![alice.to_string(), bob.to_string()]));
    assert_eq!(store.leave_group(bob, group), Ok(joined));
    assert_eq!(store.leave_group(bob, group), Err(StoreError::NotAMember));
}

fn check_messages(store: &mut dyn Store, alice: &str, bob: &str, group: &str) {
    let batch = vec![
        message(group, alice, "one"),
        message(group, bob, "not member"),
        message(group, alice, "two"),
    ];
    let results = store.append_messages(&batch);
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().map(|m| m.message.seq), Ok(1));
    assert_eq!(results[1], Err(StoreError::NotAMember));
    assert_eq!(results[2].as_ref().map(|m| m.message.seq), Ok(2));
    let missing = store.append_messages(&[message("no-such-group-y", alice, "x")]);
    assert_eq!(missing, vec![Err(StoreError::GroupNotFound)]);
    for i in 3..=10 {
        let stored = store.append_messages(&[message(group, alice, &format!("m{i}"))]);
        assert_eq!(stored[0].as_ref().map(|m| m.message.seq), Ok(i));
    }
    let newest = PageQuery {
        before_seq: None,
        after_seq: None,
        limit: 3,
        thread: None,
    };
    let page = fetch(store, alice, group, newest).expect("newest page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert!(page.has_more);
    let older = PageQuery {
        before_seq: Some(3),
        after_seq: None,
        limit: 5,
        thread: None,
    };
    let page = fetch(store, alice, group, older).expect("older page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(!page.has_more);
    let after = PageQuery {
        before_seq: None,
        after_seq: Some(7),
        limit: 2,
        thread: None,
    };
    let page = fetch(store, alice, group, after).expect("after page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9]
    );
    assert!(page.has_more);
    assert_eq!(fetch(store, bob, group, after), Err(StoreError::NotAMember));
    let tail = store.messages_after(group, 8, 100).expect("messages after");
    assert_eq!(tail.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
}

fn check_history(store: &mut dyn Store, alice: &str, group: &str) {
    let history = enter(store, alice, group, None, 1 << 20).expect("enter");
    assert_eq!(history.head_seq, 10);
    assert_eq!(history.unread.len() + history.read.len(), 10);
    let seqs: Vec<u64> = history
        .read
        .iter()
        .chain(&history.unread)
        .map(|m| m.seq)
        .collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "read then unread, oldest first"
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = enter(store, alice, group, None, 1 << 20).expect("enter again");
    assert!(again.unread.is_empty(), "entering marks everything read");
    assert_eq!(again.read.len(), 10);
    let visit = visit_as(store, alice, group, None).expect("visit");
    assert_eq!(visit.head_seq, 10);
    assert_eq!(
        visit_as(store, "nobody-here", group, None),
        Err(StoreError::NotAMember)
    );
    assert_eq!(
        enter(store, alice, "no-such-group-z", None, 1 << 20),
        Err(StoreError::GroupNotFound)
    );
}
