//! Per-channel stream tracking: hands the application each channel's messages in
//! offset order, exactly once, and notices gaps.
//!
//! Each subscribed channel remembers the last offset delivered and its epoch.
//! Messages are delivered only when they are the next offset; later ones wait in a
//! bounded buffer while the gap is fetched with `history`. If history no longer
//! has the missing range (or the epoch changed), the tracker says so
//! ([`Action::Unrecovered`]) and moves on: never silently partial. While a
//! subscribe or resume is in flight the channel is "unanchored": messages wait
//! until the reply says where the stream stands. Pure state, no I/O: the client
//! task performs the actions.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// One publication received on a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    /// The channel.
    pub channel: String,
    /// What was published.
    pub data: Value,
    /// Its offset in the channel.
    pub offset: u64,
    /// The epoch of the offset.
    pub epoch: String,
    /// Who published it (None: the server or the HTTP API).
    pub publisher: Option<String>,
}

impl Publication {
    /// Reads a `message` payload (also an entry of `history_response`).
    pub(crate) fn from_payload(p: &Value) -> Option<Publication> {
        Some(Publication {
            channel: p.get("channel")?.as_str()?.to_string(),
            data: p.get("data").cloned().unwrap_or(Value::Null),
            offset: p.get("offset")?.as_u64()?,
            epoch: p.get("epoch")?.as_str()?.to_string(),
            publisher: p
                .get("publisher")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// What the client task must do next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Hand this publication to the application.
    Deliver(Publication),
    /// Ask the server for `limit` publications after `since` in `epoch`.
    FetchHistory {
        channel: String,
        since: u64,
        epoch: String,
        limit: u64,
    },
    /// Publications `from..=to` of `channel` are lost (`to` is `None` when the
    /// epoch changed and the extent is unknown).
    Unrecovered {
        channel: String,
        from: u64,
        to: Option<u64>,
    },
}

/// The stream state of one channel.
#[derive(Debug, Default)]
pub(crate) struct Track {
    /// Epoch of `offset`; None before the first reply.
    pub(crate) epoch: Option<String>,
    /// Last offset delivered.
    pub(crate) offset: u64,
    anchored: bool,
    repairing: bool,
    pending: BTreeMap<u64, Publication>,
}

/// Stream state of every subscribed channel.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) channels: HashMap<String, Track>,
    /// Most publications waiting per channel behind a gap.
    max_pending: usize,
}

/// Most publications asked for in one gap-repair `history` request (a larger gap
/// takes several, each answer a bounded frame).
pub(crate) const HISTORY_BATCH: u64 = 100;

impl Tracker {
    pub(crate) fn new(max_pending: usize) -> Self {
        Tracker {
            channels: HashMap::new(),
            max_pending: max_pending.max(1),
        }
    }

    /// A subscribe for `channel` was sent: hold its messages until the reply.
    pub(crate) fn subscribing(&mut self, channel: &str) {
        let t = self.channels.entry(channel.to_string()).or_default();
        t.anchored = false;
        t.repairing = false;
    }

    pub(crate) fn remove(&mut self, channel: &str) {
        self.channels.remove(channel);
    }

    /// The connection is gone: everything waits for the next subscribe or resume.
    pub(crate) fn disconnected(&mut self) {
        for t in self.channels.values_mut() {
            t.anchored = false;
            t.repairing = false;
            t.pending.clear();
        }
    }

    /// Where each channel stands, for `resume` / `subscribe` with `since`.
    pub(crate) fn positions(&self) -> Vec<(String, Option<(u64, String)>)> {
        self.channels
            .iter()
            .map(|(name, t)| (name.clone(), t.epoch.clone().map(|e| (t.offset, e))))
            .collect()
    }

    /// The reply to a subscribe or resume for `channel` arrived: the server
    /// replayed everything after our offset (`recovered`), or the stream now stands
    /// at `position` and what lies between is lost.
    pub(crate) fn anchor(
        &mut self,
        channel: &str,
        recovered: bool,
        position: (u64, String),
    ) -> Vec<Action> {
        let Some(t) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let (offset, epoch) = position;
        if !(recovered && t.epoch.as_deref() == Some(&epoch)) {
            if let Some(old) = &t.epoch {
                let same_epoch = *old == epoch;
                if !same_epoch || offset > t.offset {
                    out.push(Action::Unrecovered {
                        channel: channel.to_string(),
                        from: t.offset + 1,
                        to: same_epoch.then_some(offset),
                    });
                }
            }
            // Messages held so far that the reply's position already covers are
            // older than the anchor; a replay did not happen.
            t.offset = offset;
            t.epoch = Some(epoch);
        }
        t.anchored = true;
        out.extend(self.drain(channel));
        out
    }

    /// A `message` arrived.
    pub(crate) fn on_message(&mut self, p: Publication) -> Vec<Action> {
        let channel = p.channel.clone();
        let Some(t) = self.channels.get_mut(&channel) else {
            // Not subscribed (any more): nothing to track, nothing to deliver.
            return Vec::new();
        };
        if t.anchored && t.epoch.as_deref() != Some(&p.epoch) {
            // The channel's history was lost on the server (restart): the old
            // offsets mean nothing now. Re-anchor just before this message.
            let lost = Action::Unrecovered {
                channel: channel.clone(),
                from: t.offset + 1,
                to: None,
            };
            t.offset = p.offset.saturating_sub(1);
            t.epoch = Some(p.epoch.clone());
            t.pending.clear();
            t.pending.insert(p.offset, p);
            let mut out = vec![lost];
            out.extend(self.drain(&channel));
            return out;
        }
        if t.anchored && p.offset <= t.offset {
            return Vec::new();
        }
        t.pending.insert(p.offset, p);
        if !t.anchored {
            return Vec::new();
        }
        self.drain(&channel)
    }

    /// The answer to a gap's `history` request: `messages` (None if the request
    /// failed) in `epoch`.
    pub(crate) fn on_history(
        &mut self,
        channel: &str,
        epoch: Option<&str>,
        messages: Option<Vec<Publication>>,
    ) -> Vec<Action> {
        let Some(t) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        t.repairing = false;
        if !t.anchored {
            return Vec::new();
        }
        if let (Some(msgs), true) = (messages, epoch == t.epoch.as_deref()) {
            for m in msgs {
                if m.offset > t.offset && m.epoch.as_str() == epoch.unwrap_or_default() {
                    t.pending.entry(m.offset).or_insert(m);
                }
            }
        }
        // If the next offset is still missing, history no longer has it: what lies
        // before the first message held is gone. (Otherwise `drain` delivers and,
        // for a gap larger than one batch, asks for the next batch.)
        let mut out = Vec::new();
        if let Some((&first, _)) = t.pending.first_key_value() {
            if first > t.offset + 1 {
                out.push(Action::Unrecovered {
                    channel: channel.to_string(),
                    from: t.offset + 1,
                    to: Some(first - 1),
                });
                t.offset = first - 1;
            }
        }
        out.extend(self.drain(channel));
        out
    }

    fn drain(&mut self, channel: &str) -> Vec<Action> {
        let max_pending = self.max_pending;
        let Some(t) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some((&first, _)) = t.pending.first_key_value() {
            if first <= t.offset {
                t.pending.pop_first();
            } else if first == t.offset + 1 {
                if let Some((_, p)) = t.pending.pop_first() {
                    t.offset = first;
                    out.push(Action::Deliver(p));
                }
            } else if t.pending.len() > max_pending {
                // Too much waiting behind the gap: give the gap up.
                out.push(Action::Unrecovered {
                    channel: channel.to_string(),
                    from: t.offset + 1,
                    to: Some(first - 1),
                });
                t.offset = first - 1;
                t.repairing = false;
            } else {
                if !t.repairing {
                    t.repairing = true;
                    out.push(Action::FetchHistory {
                        channel: channel.to_string(),
                        since: t.offset,
                        epoch: t.epoch.clone().unwrap_or_default(),
                        limit: (first - t.offset - 1).min(HISTORY_BATCH),
                    });
                }
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(offset: u64) -> Publication {
        Publication {
            channel: "c".into(),
            data: Value::from(offset),
            offset,
            epoch: "e".into(),
            publisher: None,
        }
    }

    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver(p) => Some(p.offset),
                _ => None,
            })
            .collect()
    }

    fn anchored_at(offset: u64) -> Tracker {
        let mut t = Tracker::new(100);
        t.subscribing("c");
        assert!(t.anchor("c", false, (offset, "e".into())).is_empty());
        t
    }

    #[test]
    fn in_order_and_duplicates() {
        let mut t = anchored_at(0);
        assert_eq!(delivered(&t.on_message(p(1))), vec![1]);
        assert!(t.on_message(p(1)).is_empty());
        assert_eq!(delivered(&t.on_message(p(2))), vec![2]);
    }

    #[test]
    fn gap_is_fetched_then_delivered_in_order() {
        let mut t = anchored_at(0);
        t.on_message(p(1));
        let a = t.on_message(p(4));
        assert_eq!(
            a,
            vec![Action::FetchHistory {
                channel: "c".into(),
                since: 1,
                epoch: "e".into(),
                limit: 2
            }]
        );
        // More arrive while repairing: held, no second fetch.
        assert!(t.on_message(p(5)).is_empty());
        let a = t.on_history("c", Some("e"), Some(vec![p(2), p(3)]));
        assert_eq!(delivered(&a), vec![2, 3, 4, 5]);
    }

    #[test]
    fn gap_history_no_longer_has_is_reported() {
        let mut t = anchored_at(0);
        t.on_message(p(1));
        t.on_message(p(5));
        // History kept only offset 4.
        let a = t.on_history("c", Some("e"), Some(vec![p(4)]));
        assert_eq!(
            a[0],
            Action::Unrecovered {
                channel: "c".into(),
                from: 2,
                to: Some(3)
            }
        );
        assert_eq!(delivered(&a), vec![4, 5]);
    }

    #[test]
    fn messages_wait_for_the_subscribe_reply() {
        let mut t = Tracker::new(100);
        t.subscribing("c");
        // A live message raced ahead of the reply.
        assert!(t.on_message(p(8)).is_empty());
        let a = t.anchor("c", false, (7, "e".into()));
        assert_eq!(delivered(&a), vec![8]);
    }

    #[test]
    fn recovered_resume_keeps_the_position_and_replays() {
        let mut t = anchored_at(3);
        t.disconnected();
        t.subscribing("c");
        t.on_message(p(4));
        t.on_message(p(5));
        let a = t.anchor("c", true, (5, "e".into()));
        assert_eq!(delivered(&a), vec![4, 5]);
    }

    #[test]
    fn unrecovered_resume_reports_the_lost_range() {
        let mut t = anchored_at(3);
        t.disconnected();
        t.subscribing("c");
        let a = t.anchor("c", false, (9, "e".into()));
        assert_eq!(
            a,
            vec![Action::Unrecovered {
                channel: "c".into(),
                from: 4,
                to: Some(9)
            }]
        );
        assert_eq!(delivered(&t.on_message(p(10))), vec![10]);
        // New epoch on resume: extent unknown.
        t.disconnected();
        t.subscribing("c");
        let a = t.anchor("c", false, (0, "f".into()));
        assert_eq!(
            a,
            vec![Action::Unrecovered {
                channel: "c".into(),
                from: 11,
                to: None
            }]
        );
    }

    #[test]
    fn large_gaps_are_fetched_in_batches() {
        let mut t = anchored_at(0);
        let a = t.on_message(p(HISTORY_BATCH + 51));
        assert!(matches!(
            a[0],
            Action::FetchHistory {
                since: 0,
                limit: HISTORY_BATCH,
                ..
            }
        ));
        let batch: Vec<Publication> = (1..=HISTORY_BATCH).map(p).collect();
        let a = t.on_history("c", Some("e"), Some(batch));
        assert_eq!(delivered(&a).len(), HISTORY_BATCH as usize);
        assert!(matches!(
            a.last(),
            Some(Action::FetchHistory {
                since: HISTORY_BATCH,
                limit: 50,
                ..
            })
        ));
        let rest: Vec<Publication> = (HISTORY_BATCH + 1..=HISTORY_BATCH + 50).map(p).collect();
        let a = t.on_history("c", Some("e"), Some(rest));
        assert_eq!(delivered(&a).len(), 51);
    }

    #[test]
    fn pending_is_bounded() {
        let mut t = Tracker::new(3);
        t.subscribing("c");
        t.anchor("c", false, (0, "e".into()));
        t.on_message(p(10));
        t.on_message(p(11));
        t.on_message(p(12));
        let a = t.on_message(p(13));
        assert!(a.contains(&Action::Unrecovered {
            channel: "c".into(),
            from: 1,
            to: Some(9)
        }));
        assert_eq!(delivered(&a), vec![10, 11, 12, 13]);
    }
}
