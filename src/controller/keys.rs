//! Cluster keys: which NodeRegionDigests were made under a key the controller accepts.
//!
//! Every agent keys the region identities it publishes with the cluster key, and identities
//! made under different keys never match. A node whose agent runs with another key (a wrong
//! Secret, a rotation left half done) would only look as if it held nothing in common with
//! anyone. The planner already compares a VM only with digests made under its own key (with a
//! note naming the others); this module makes the cause visible where an administrator looks:
//! a `KeyAccepted` condition on every NodeRegionDigest, a Warning Event when a digest stops
//! being accepted, and the gauge `commonground_controller_digests_key_not_accepted`.
//!
//! Which keys are accepted: the key files of `--cluster-key-dir` (`key`, and during a
//! rotation `previous`), read again on every check so a changed Secret takes effect without a
//! restart. Without the flag, the key most digests use (a tie accepts every tied key: there is
//! no telling which is right).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;
use crate::api::conditions::Condition;
use crate::api::NodeRegionDigest;
use crate::plan::region::ClusterKey;

/// The condition on a NodeRegionDigest saying whether its key is accepted.
pub const KEY_CONDITION: &str = "KeyAccepted";
/// Field manager of the condition (apart from the agents' status and the republisher).
pub const KEY_MANAGER: &str = "commonground-controller-keys";
/// Key files read from `--cluster-key-dir`: the current key and, during a rotation, the
/// previous one.
pub const KEY_FILES: [&str; 2] = ["key", "previous"];
/// How often the digests' keys are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// Which key ids are accepted, and where that came from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub ids: BTreeSet<String>,
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading cluster key {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cluster key {0}: {1}")]
    Bad(PathBuf, crate::plan::region::RegionError),
    #[error("no cluster key in {0} (expected a file named \"key\")")]
    Missing(PathBuf),
}

/// The key ids of the key files in `dir`: `key` must exist, `previous` may.
pub fn accepted_from_dir(dir: &Path) -> Result<Accepted, KeyError> {
    let mut ids = BTreeSet::new();
    for name in KEY_FILES {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = ClusterKey::from_hex(&text).map_err(|e| KeyError::Bad(path, e))?;
                ids.insert(key.key_id);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "key" => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::Missing(dir.to_path_buf()))
            }
            Err(e) => return Err(KeyError::Read(path, e)),
        }
    }
    Ok(Accepted {
        ids,
        source: format!("the cluster key files in {}", dir.display()),
    })
}

/// Without key files: the key id most digests use (every one of them on a tie). Digests
/// without a key id (not yet scanned) do not vote.
pub fn accepted_by_majority<'a>(key_ids: impl IntoIterator<Item = &'a str>) -> Accepted {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in key_ids.into_iter().filter(|k| !k.is_empty()) {
        *counts.entry(id).or_default() += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    Accepted {
        ids: counts
            .into_iter()
            .filter(|(_, n)| *n == top)
            .map(|(id, _)| id.to_string())
            .collect(),
        source: "the key most digests use".into(),
    }
}

/// The `KeyAccepted` condition a digest made under `key_id` should carry; `None` while it has
/// no key id yet (the agent has not published a scan).
pub fn key_condition(key_id: &str, accepted: &Accepted) -> Option<Condition> {
    if key_id.is_empty() {
        return None;
    }
    let list = accepted.ids.iter().cloned().collect::<Vec<_>>().join(", ");
    Some(if accepted.ids.contains(key_id) {
        Condition {
            r#type: KEY_CONDITION.into(),
            status: "True".into(),
            reason: "KeyAccepted".into(),
            message: format!("made under key id {key_id}, accepted ({})", accepted.source),
            last_transition_time: None,
        }
    } else {
        Condition {
            r#type: KEY_CONDITION.into(),
            status: "False".into(),
            reason: "KeyNotAccepted".into(),
            message: format!(
                "made under key id {key_id}, but {} gives {list}: this node's memory is not \
                 compared with other nodes' (check the agent's cluster key Secret)",
                accepted.source
            ),
            last_transition_time: None,
        }
    })
}

/// What to do for one digest: the condition to write when it differs from the current one
/// (timestamps aside), and whether the digest just stopped being accepted (an Event).
pub fn key_change(current: Option<&Condition>, desired: &Condition) -> Option<(Condition, bool)> {
    let same = current.is_some_and(|c| {
        c.status == desired.status && c.reason == desired.reason && c.message == desired.message
    });
    if same {
        return None;
    }
    let newly_refused =
        desired.status == "False" && current.is_none_or(|c| c.status != desired.status);
    Some((desired.clone(), newly_refused))
}

fn current_condition(d: &NodeRegionDigest) -> Option<&Condition> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == KEY_CONDITION)
}

/// One check over every digest the view holds; returns how many are not accepted.
async fn check(ctx: &Context, key_dir: Option<&Path>) -> usize {
    let digests = ctx.view.digests.state();
    let accepted = match key_dir {
        Some(dir) => match accepted_from_dir(dir) {
            Ok(a) => a,
            Err(e) => {
                // Never flag digests on a key list that could not be read.
                tracing::error!(error = %e, "cannot read the accepted cluster keys; digests not checked");
                return 0;
            }
        },
        None => accepted_by_majority(
            digests
                .iter()
                .filter_map(|d| d.status.as_ref().map(|s| s.key_id.as_str())),
        ),
    };
    let api: Api<NodeRegionDigest> = Api::all(ctx.client.clone());
    let now = crate::api::time::now_rfc3339();
    let mut refused = 0;
    for d in &digests {
        let key_id = d.status.as_ref().map_or("", |s| s.key_id.as_str());
        let Some(desired) = key_condition(key_id, &accepted) else {
            continue;
        };
        if desired.status == "False" {
            refused += 1;
        }
        let current = current_condition(d);
        let Some((mut cond, newly_refused)) = key_change(current, &desired) else {
            continue;
        };
        cond.last_transition_time = match current {
            Some(c) if c.status == cond.status => c.last_transition_time.clone(),
            _ => Some(now.clone()),
        };
        let patch = serde_json::json!({
            "apiVersion": "commonground.dev/v1alpha1", "kind": "NodeRegionDigest",
            "status": {"conditions": [cond]}
        });
        let params = PatchParams::apply(KEY_MANAGER).force();
        if let Err(e) = api
            .patch_status(&d.name_any(), &params, &Patch::Apply(&patch))
            .await
        {
            tracing::warn!(digest = %d.name_any(), error = %e, "could not write the key condition");
            continue;
        }
        if newly_refused {
            tracing::warn!(digest = %d.name_any(), message = %cond.message, "digest made under a key that is not accepted");
            let ev = Event {
                type_: EventType::Warning,
                reason: "KeyNotAccepted".into(),
                note: Some(cond.message.chars().take(1000).collect()),
                action: "CompareDigests".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &d.object_ref(&())).await {
                tracing::warn!(error = %e, "could not publish event");
            }
        }
    }
    refused
}

/// Checks the digests' keys every [`CHECK_EVERY`] until shutdown.
pub async fn run(ctx: Arc<Context>, key_dir: Option<PathBuf>) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = crate::telemetry::shutdown_signal() => return,
        }
        let refused = check(&ctx, key_dir.as_deref()).await;
        ctx.metrics.digests_key_not_accepted.set(refused as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "00112233445566778899aabbccddeeff";
    const HEX_B: &str = "ffeeddccbbaa99887766554433221100";

    fn id(hex: &str) -> String {
        ClusterKey::from_hex(hex).unwrap().key_id
    }

    #[test]
    fn key_files_give_the_current_and_the_previous_key() {
        let dir = std::env::temp_dir().join(format!("cg-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(accepted_from_dir(&dir), Err(KeyError::Missing(_))));
        std::fs::write(dir.join("key"), format!("{HEX_A}\n")).unwrap();
        assert_eq!(
            accepted_from_dir(&dir).unwrap().ids,
            BTreeSet::from([id(HEX_A)])
        );
        // During a rotation both are accepted.
        std::fs::write(dir.join("previous"), HEX_B).unwrap();
        assert_eq!(
            accepted_from_dir(&dir).unwrap().ids,
            BTreeSet::from([id(HEX_A), id(HEX_B)])
        );
        std::fs::write(dir.join("previous"), "not a key").unwrap();
        let e = accepted_from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("previous"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_key_files_the_key_most_digests_use_is_accepted() {
        let a = accepted_by_majority(["k1", "k1", "k2", ""]);
        assert_eq!(a.ids, BTreeSet::from(["k1".to_string()]));
        // A tie cannot say which key is right: both are accepted.
        let tie = accepted_by_majority(["k1", "k2"]);
        assert_eq!(tie.ids.len(), 2);
        assert!(accepted_by_majority(["", ""]).ids.is_empty());
    }

    #[test]
    fn a_digest_under_another_key_gets_a_false_condition_naming_both() {
        let accepted = accepted_by_majority(["k1", "k1", "k2"]);
        let ok = key_condition("k1", &accepted).unwrap();
        assert_eq!(
            (ok.status.as_str(), ok.reason.as_str()),
            ("True", "KeyAccepted")
        );
        let bad = key_condition("k2", &accepted).unwrap();
        assert_eq!(
            (bad.status.as_str(), bad.reason.as_str()),
            ("False", "KeyNotAccepted")
        );
        assert!(bad.message.contains("k2") && bad.message.contains("k1"));
        // Not yet scanned: nothing to say.
        assert!(key_condition("", &accepted).is_none());
    }

    #[test]
    fn conditions_are_written_only_on_change_and_an_event_only_when_refused_anew() {
        let accepted = accepted_by_majority(["k1", "k1", "k2"]);
        let bad = key_condition("k2", &accepted).unwrap();
        let good = key_condition("k1", &accepted).unwrap();
        // First sight of a refused digest: write and tell.
        assert_eq!(key_change(None, &bad), Some((bad.clone(), true)));
        // Unchanged (whatever the timestamp): nothing.
        let mut stamped = bad.clone();
        stamped.last_transition_time = Some("2026-01-01T00:00:00Z".into());
        assert_eq!(key_change(Some(&stamped), &bad), None);
        // Still refused with another message (the accepted list changed): write, no new Event.
        let other = key_condition("k2", &accepted_by_majority(["k3", "k3"])).unwrap();
        assert_eq!(key_change(Some(&bad), &other), Some((other.clone(), false)));
        // Accepted again: write, no Event.
        assert_eq!(key_change(Some(&bad), &good), Some((good.clone(), false)));
        // From accepted to refused: an Event.
        assert_eq!(key_change(Some(&good), &bad), Some((bad, true)));
    }
}
