//! The replicated state machine's data and its deterministic `apply`.
//!
//! Maps are `BTreeMap`s so that iteration, serialization and therefore snapshots are
//! identical on every replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandError, Response};

/// One coordination key's value. Revisions are Raft log indexes, so they are unique,
/// increase with every write and are the same on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub value: String,
    /// Log index of the last write to this key.
    pub revision: u64,
    /// Log index of the write that created this key.
    pub create_revision: u64,
}

/// Everything the cluster agrees on (besides Raft membership, which openraft tracks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub kv: BTreeMap<String, KvEntry>,
    pub maintenance: bool,
}

impl State {
    /// Applies `cmd`, written at log index `index`, and says what happened. Pure: the same
    /// state, index and command always give the same new state and response.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::Rejected(e);
        }
        match cmd {
            Command::KvPut { key, value, prev_revision } => {
                let current = self.kv.get(key);
                if let Some(expected) = *prev_revision {
                    let actual = current.map_or(0, |e| e.revision);
                    if actual != expected {
                        return Response::Rejected(CommandError::RevisionMismatch { key: key.clone(), expected, actual });
                    }
                }
                let create_revision = current.map_or(index, |e| e.create_revision);
                self.kv.insert(key.clone(), KvEntry { value: value.clone(), revision: index, create_revision });
                Response::KvPut { revision: index }
            }
            Command::KvDelete { key, prev_revision } => {
                let Some(current) = self.kv.get(key) else {
                    return match *prev_revision {
                        Some(expected) if expected != 0 => {
                            Response::Rejected(CommandError::RevisionMismatch { key: key.clone(), expected, actual: 0 })
                        }
                        _ => Response::Rejected(CommandError::NotFound { key: key.clone() }),
                    };
                };
                if let Some(expected) = *prev_revision {
                    if current.revision != expected {
                        let actual = current.revision;
                        return Response::Rejected(CommandError::RevisionMismatch { key: key.clone(), expected, actual });
                    }
                }
                self.kv.remove(key);
                Response::KvDelete { revision: index }
            }
            Command::SetMaintenance { enabled } => {
                self.maintenance = *enabled;
                Response::Maintenance { enabled: *enabled }
            }
        }
    }

    /// Keys starting with `prefix` and strictly after `start_after`, in key order, at most
    /// `limit` of them; the flag says whether more matched.
    pub fn kv_list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> (Vec<(&String, &KvEntry)>, bool) {
        use std::ops::Bound;
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut matching = self
            .kv
            .range::<String, _>((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix));
        let items: Vec<_> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        (items, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use proptest::prelude::*;

    fn put(key: &str, value: &str, prev: Option<u64>) -> Command {
        Command::KvPut { key: key.into(), value: value.into(), prev_revision: prev }
    }

    #[test]
    fn put_sets_revision_to_log_index_and_keeps_create_revision() {
        let mut s = State::default();
        assert_eq!(s.apply(3, &put("a", "1", None)), Response::KvPut { revision: 3 });
        assert_eq!(s.apply(7, &put("a", "2", None)), Response::KvPut { revision: 7 });
        let e = &s.kv["a"];
        assert_eq!((e.value.as_str(), e.revision, e.create_revision), ("2", 7, 3));
    }

    #[test]
    fn compare_and_swap_only_succeeds_on_the_current_revision() {
        let mut s = State::default();
        assert_eq!(s.apply(1, &put("k", "a", Some(0))), Response::KvPut { revision: 1 });
        let stale = s.apply(2, &put("k", "b", Some(0)));
        assert_eq!(
            stale,
            Response::Rejected(CommandError::RevisionMismatch { key: "k".into(), expected: 0, actual: 1 })
        );
        assert_eq!(s.kv["k"].value, "a");
        assert_eq!(s.apply(3, &put("k", "c", Some(1))), Response::KvPut { revision: 3 });
    }

    #[test]
    fn delete_of_a_missing_key_is_not_found_and_changes_nothing() {
        let mut s = State::default();
        s.apply(1, &put("x", "1", None));
        let before = s.clone();
        let r = s.apply(2, &Command::KvDelete { key: "y".into(), prev_revision: None });
        assert_eq!(r, Response::Rejected(CommandError::NotFound { key: "y".into() }));
        assert_eq!(s, before);
    }

    #[test]
    fn invalid_commands_are_rejected_at_apply_too() {
        let mut s = State::default();
        let huge = "v".repeat(crate::limits::MAX_VALUE_BYTES + 1);
        assert!(matches!(s.apply(1, &put("k", &huge, None)), Response::Rejected(CommandError::Invalid { .. })));
        assert!(matches!(s.apply(2, &put("", "v", None)), Response::Rejected(CommandError::Invalid { .. })));
        assert!(matches!(s.apply(3, &put("a\nb", "v", None)), Response::Rejected(CommandError::Invalid { .. })));
        assert_eq!(s, State::default());
    }

    #[test]
    fn list_pages_by_prefix_and_start_after() {
        let mut s = State::default();
        for (i, k) in ["a/1", "a/2", "a/3", "b/1"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, "v", None));
        }
        let (items, more) = s.kv_list("a/", None, 2);
        assert_eq!(items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
        assert!(more);
        let (items, more) = s.kv_list("a/", Some("a/2"), 2);
        assert_eq!(items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a/3"]);
        assert!(!more);
    }

    fn command_strategy() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from);
        let prev = prop::option::of(0u64..12);
        prop_oneof![
            (key.clone(), "[a-z]{0,4}", prev.clone())
                .prop_map(|(key, value, prev_revision)| Command::KvPut { key, value, prev_revision }),
            (key, prev).prop_map(|(key, prev_revision)| Command::KvDelete { key, prev_revision }),
            any::<bool>().prop_map(|enabled| Command::SetMaintenance { enabled }),
        ]
    }

    proptest! {
        /// The state machine agrees with a plain model of a CAS map, command by command.
        #[test]
        fn apply_matches_a_model_of_a_cas_map(cmds in prop::collection::vec(command_strategy(), 0..60)) {
            let mut s = State::default();
            let mut model: HashMap<String, (String, u64)> = HashMap::new();
            let mut maintenance = false;
            for (i, cmd) in cmds.iter().enumerate() {
                let index = i as u64 + 1;
                let got = s.apply(index, cmd);
                match cmd {
                    Command::KvPut { key, value, prev_revision } => {
                        let actual = model.get(key).map_or(0, |e| e.1);
                        if prev_revision.is_none_or(|p| p == actual) {
                            model.insert(key.clone(), (value.clone(), index));
                            prop_assert_eq!(got, Response::KvPut { revision: index });
                        } else {
                            prop_assert!(matches!(got, Response::Rejected(CommandError::RevisionMismatch { .. })), "expected a mismatch, got {:?}", got);
                        }
                    }
                    Command::KvDelete { key, prev_revision } => {
                        let actual = model.get(key).map_or(0, |e| e.1);
                        let exists = model.contains_key(key);
                        if exists && prev_revision.is_none_or(|p| p == actual) {
                            model.remove(key);
                            prop_assert_eq!(got, Response::KvDelete { revision: index });
                        } else {
                            prop_assert!(matches!(got, Response::Rejected(_)), "expected a rejection, got {:?}", got);
                        }
                    }
                    Command::SetMaintenance { enabled } => {
                        maintenance = *enabled;
                        prop_assert_eq!(got, Response::Maintenance { enabled: *enabled });
                    }
                }
                prop_assert_eq!(s.maintenance, maintenance);
                prop_assert_eq!(s.kv.len(), model.len());
                for (k, (v, rev)) in &model {
                    prop_assert_eq!(&s.kv[k].value, v);
                    prop_assert_eq!(s.kv[k].revision, *rev);
                }
            }
        }

        /// Replaying the same log always gives the same state, and a state survives its
        /// snapshot encoding unchanged.
        #[test]
        fn replay_is_deterministic_and_snapshots_round_trip(cmds in prop::collection::vec(command_strategy(), 0..60)) {
            let mut a = State::default();
            let mut b = State::default();
            let ra: Vec<_> = cmds.iter().enumerate().map(|(i, c)| a.apply(i as u64 + 1, c)).collect();
            let rb: Vec<_> = cmds.iter().enumerate().map(|(i, c)| b.apply(i as u64 + 1, c)).collect();
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(&a, &b);
            let bytes = rmp_serde::to_vec_named(&a).unwrap();
            let back: State = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(back, a);
        }

        /// Every command survives the wire encoding used by the Raft log.
        #[test]
        fn commands_round_trip_through_msgpack(cmd in command_strategy()) {
            let bytes = rmp_serde::to_vec_named(&cmd).unwrap();
            let back: Command = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(back, cmd);
        }
    }
}
