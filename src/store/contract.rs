//! Behaviour every `Store` backend must have, checked against a real backend instance.

use super::{Store, StoreError};
use crate::model::{NewMessage, PageQuery, ReadMark};

fn message(group: &str, user: &str, text: &str) -> NewMessage {
    NewMessage {
        group_name: group.into(),
        username: user.into(),
        text: text.into(),
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
    let visit = store.visit_group(bob, group, None).expect("bob visits");
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
    let visit = store.visit_group(bob, group, None).expect("visit");
    assert_eq!(
        visit.last_read_seq, 12,
        "a lower mark never lowers the marker"
    );
    let one_message = super::encoded_len(&store.messages_after(group, 12, 1).expect("read")[0]);
    let history = store
        .enter_group(bob, group, None, one_message * 3)
        .expect("enter with a small budget");
    let unread: Vec<u64> = history.unread.iter().map(|m| m.seq).collect();
    assert_eq!(unread, vec![13, 14, 15], "the oldest unread that fit");
    assert!(history.unread_has_more);
    assert_eq!(history.read_seq, 15);
    let history = store
        .enter_group(bob, group, None, 1 << 20)
        .expect("enter again");
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
        store.find_or_create_user(&carol, false).map(|(_, new)| new),
        Err(StoreError::UserNotFound),
        "a name that may not be created is not"
    );
    store
        .find_or_create_user(&carol, true)
        .expect("create carol");
    for i in 0..2 {
        store
            .create_group(&carol, &format!("{prefix}carol-{i}"), 2)
            .expect("within the quota");
    }
    assert_eq!(
        store.create_group(&carol, &format!("{prefix}carol-2"), 2),
        Err(StoreError::QuotaExceeded)
    );
    assert!(store
        .create_group(&carol, &format!("{prefix}carol-3"), 0)
        .is_ok());
}

fn check_users_and_groups(store: &mut dyn Store, alice: &str, bob: &str, group: &str) {
    let (created, is_new) = store
        .find_or_create_user(alice, true)
        .expect("create alice");
    assert!(is_new);
    assert!(created.group_list.is_empty());
    let (found, is_new) = store.find_or_create_user(alice, true).expect("find alice");
    assert!(!is_new);
    assert_eq!(found.id, created.id);
    assert_eq!(
        store.create_group("nobody-here", group, 0),
        Err(StoreError::UserNotFound)
    );
    let made = store.create_group(alice, group, 0).expect("create group");
    assert_eq!(made.user.len(), 1);
    assert_eq!(made.user[0].name_id, alice);
    assert_eq!(
        store.create_group(alice, group, 0),
        Err(StoreError::GroupExists)
    );
    store.find_or_create_user(bob, true).expect("create bob");
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
    let (bob_profile, _) = store.find_or_create_user(bob, true).expect("find bob");
    assert_eq!(bob_profile.group_list, vec![group.to_string()]);
    let listed = store.list_groups().expect("list");
    let row = listed
        .iter()
        .find(|g| g.group_name == group)
        .expect("group listed");
    assert_eq!(row.members, vec![alice.to_string(), bob.to_string()]);
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
    assert_eq!(results[0].as_ref().map(|m| m.seq), Ok(1));
    assert_eq!(results[1], Err(StoreError::NotAMember));
    assert_eq!(results[2].as_ref().map(|m| m.seq), Ok(2));
    let missing = store.append_messages(&[message("no-such-group-y", alice, "x")]);
    assert_eq!(missing, vec![Err(StoreError::GroupNotFound)]);
    for i in 3..=10 {
        let stored = store.append_messages(&[message(group, alice, &format!("m{i}"))]);
        assert_eq!(stored[0].as_ref().map(|m| m.seq), Ok(i));
    }
    let newest = PageQuery {
        before_seq: None,
        after_seq: None,
        limit: 3,
    };
    let page = store
        .fetch_messages(alice, group, newest)
        .expect("newest page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert!(page.has_more);
    let older = PageQuery {
        before_seq: Some(3),
        after_seq: None,
        limit: 5,
    };
    let page = store
        .fetch_messages(alice, group, older)
        .expect("older page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(!page.has_more);
    let after = PageQuery {
        before_seq: None,
        after_seq: Some(7),
        limit: 2,
    };
    let page = store
        .fetch_messages(alice, group, after)
        .expect("after page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![8, 9]
    );
    assert!(page.has_more);
    assert_eq!(
        store.fetch_messages(bob, group, after),
        Err(StoreError::NotAMember)
    );
    let tail = store.messages_after(group, 8, 100).expect("messages after");
    assert_eq!(tail.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
}

fn check_history(store: &mut dyn Store, alice: &str, group: &str) {
    let history = store
        .enter_group(alice, group, None, 1 << 20)
        .expect("enter");
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
    let again = store
        .enter_group(alice, group, None, 1 << 20)
        .expect("enter again");
    assert!(again.unread.is_empty(), "entering marks everything read");
    assert_eq!(again.read.len(), 10);
    let visit = store.visit_group(alice, group, None).expect("visit");
    assert_eq!(visit.head_seq, 10);
    assert_eq!(
        store.visit_group("nobody-here", group, None),
        Err(StoreError::NotAMember)
    );
    assert_eq!(
        store.enter_group(alice, "no-such-group-z", None, 1 << 20),
        Err(StoreError::GroupNotFound)
    );
}
