use super::*;

fn list(from: u64, n: u64) -> Vec<u64> {
    (from..from + n).map(|k| k * 3).collect()
}

/// A weak name: every list of the same length collides on the first hash; the second
/// hash is the real one.
fn colliding(keys: &[u64]) -> ListId {
    let real = ListId::of(keys);
    ListId {
        lo: keys.len() as u64,
        ..real
    }
}

#[test]
fn names_tell_lists_apart_and_round_trip_as_words() {
    let a = ListId::of(&list(0, 20));
    let b = ListId::of(&list(1, 20));
    let c = ListId::of(&list(0, 21));
    assert_ne!(a, b);
    assert_ne!(a.lo, b.lo);
    assert_ne!(a.hi, b.hi);
    assert_eq!(c.len, 21);
    assert_eq!(ListId::from_words(&a.words()), Some(a));
    assert_eq!(ListId::from_words(&[1, 2]), None);
    assert_eq!(
        ListId::of(&list(0, 20)),
        a,
        "a name is a function of the keys"
    );
}

#[test]
fn store_then_hit_per_sender() {
    let c = KeyCache::new(1000);
    let keys = list(5, 40);
    let id = c.store(7, &keys).unwrap();
    assert_eq!(id, ListId::of(&keys));
    assert_eq!(c.lookup(7, id), Lookup::Hit(keys.clone().into()));
    // Another sender's name space is its own.
    assert_eq!(c.lookup(8, id), Lookup::Absent);
    let s = c.stats();
    assert_eq!((s.stored, s.hits, s.absent, s.keys_held), (1, 1, 1, 40));
}

#[test]
fn a_wrong_second_hash_or_length_is_a_miss_not_a_hit() {
    let c = KeyCache::new(1000);
    let id = c.store(1, &list(0, 30)).unwrap();
    assert_eq!(
        c.lookup(
            1,
            ListId {
                hi: id.hi ^ 1,
                ..id
            }
        ),
        Lookup::Mismatch
    );
    assert_eq!(c.lookup(1, ListId { len: 31, ..id }), Lookup::Mismatch);
    assert_eq!(c.stats().mismatches, 2);
}

#[test]
fn colliding_first_hashes_never_resolve_to_the_other_list() {
    let c = KeyCache::with_hasher(1000, colliding);
    let a = list(0, 20);
    let b = list(100, 20);
    let ia = c.store(1, &a).unwrap();
    let ib = colliding(&b);
    assert_eq!(ia.lo, ib.lo, "the weak hasher collides");
    // b's name does not resolve to a's keys.
    assert_eq!(c.lookup(1, ib), Lookup::Mismatch);
    // Storing b replaces a: a's name now misses, b's hits with b's keys.
    c.store(1, &b).unwrap();
    assert_eq!(c.lookup(1, ia), Lookup::Mismatch);
    assert_eq!(c.lookup(1, ib), Lookup::Hit(b.into()));
    assert_eq!(c.stats().keys_held, 20);
}

#[test]
fn eviction_keeps_the_bound_in_keys_and_drops_the_least_recent() {
    let c = KeyCache::new(100);
    let a = c.store(1, &list(0, 40)).unwrap();
    let b = c.store(1, &list(50, 40)).unwrap();
    // Touch a: b is now the least recent.
    assert!(matches!(c.lookup(1, a), Lookup::Hit(_)));
    let d = c.store(1, &list(200, 40)).unwrap();
    assert_eq!(c.lookup(1, b), Lookup::Absent);
    assert!(matches!(c.lookup(1, a), Lookup::Hit(_)));
    assert!(matches!(c.lookup(1, d), Lookup::Hit(_)));
    let s = c.stats();
    assert_eq!((s.evicted, s.keys_held), (1, 80));
    // A list larger than the whole bound is not stored, and evicts nothing.
    assert_eq!(c.store(1, &list(0, 101)), None);
    assert_eq!(c.stats().keys_held, 80);
    // Off: nothing is stored.
    assert_eq!(KeyCache::new(0).store(1, &list(0, 20)), None);
}

#[test]
fn forgetting_a_sender_frees_its_lists_only() {
    let c = KeyCache::new(1000);
    let a = c.store(1, &list(0, 20)).unwrap();
    let b = c.store(2, &list(0, 20)).unwrap();
    c.forget_sender(1);
    assert_eq!(c.lookup(1, a), Lookup::Absent);
    assert!(matches!(c.lookup(2, b), Lookup::Hit(_)));
    assert_eq!(c.stats().keys_held, 20);
}

#[test]
fn a_sender_names_only_what_the_server_confirmed() {
    let s = SentLists::new(2);
    let a = ListId::of(&list(0, 20));
    let b = ListId::of(&list(1, 20));
    let d = ListId::of(&list(2, 20));
    assert!(!s.send_by_name(0, a, true), "not confirmed yet");
    s.confirm(0, a);
    assert!(s.send_by_name(0, a, true));
    assert!(!s.send_by_name(0, a, false), "a resend carries its keys");
    assert!(
        !s.send_by_name(1, a, true),
        "another server did not confirm it"
    );
    // Bounded per server: a third list evicts the least recent.
    s.confirm(0, b);
    s.confirm(0, d);
    assert!(!s.send_by_name(0, a, true));
    assert!(s.send_by_name(0, b, true) && s.send_by_name(0, d, true));
    // A miss forgets it; a closed connection forgets the server.
    s.missed(0, b);
    assert!(!s.send_by_name(0, b, true));
    s.forget_server(0);
    assert!(!s.send_by_name(0, d, true));
    let st = s.stats();
    assert_eq!(st.by_name, 3);
    assert_eq!(st.eligible, 9);
    assert_eq!(st.misses, 1);
    assert_eq!(st.key_bytes_saved, 3 * 17 * 8);
}

#[test]
fn a_sender_never_names_a_colliding_list_by_the_other_ones_name() {
    let s = SentLists::new(8);
    let a = colliding(&list(0, 20));
    let b = colliding(&list(100, 20));
    assert_eq!(a.lo, b.lo);
    s.confirm(0, a);
    assert!(
        !s.send_by_name(0, b, true),
        "same first hash, other list: full keys"
    );
    assert!(s.send_by_name(0, a, true));
}
