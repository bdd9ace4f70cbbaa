//! Status conditions, compared without their timestamps so status is not rewritten in a loop.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A standard Kubernetes-style condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Planned`, `Ready`, `Failed`.
    pub r#type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One-word CamelCase reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// Sets `cond` in `list`, keeping the old transition time when only the message or reason
/// changed. Returns whether anything but timestamps changed.
pub fn set_condition(list: &mut Vec<Condition>, mut cond: Condition, now: &str) -> bool {
    match list.iter_mut().find(|c| c.r#type == cond.r#type) {
        Some(existing) => {
            let same = existing.status == cond.status
                && existing.reason == cond.reason
                && existing.message == cond.message;
            if same {
                return false;
            }
            cond.last_transition_time = if existing.status == cond.status {
                existing.last_transition_time.clone()
            } else {
                Some(now.to_string())
            };
            *existing = cond;
            true
        }
        None => {
            cond.last_transition_time = Some(now.to_string());
            list.push(cond);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: &str, msg: &str) -> Condition {
        Condition {
            r#type: "Planned".into(),
            status: status.into(),
            reason: "R".into(),
            message: msg.into(),
            last_transition_time: None,
        }
    }

    #[test]
    fn unchanged_condition_is_not_rewritten() {
        let mut list = vec![];
        assert!(set_condition(&mut list, c("True", "m"), "t1"));
        assert!(!set_condition(&mut list, c("True", "m"), "t2"));
        assert_eq!(list[0].last_transition_time.as_deref(), Some("t1"));
        assert!(set_condition(&mut list, c("True", "other"), "t3"));
        assert_eq!(
            list[0].last_transition_time.as_deref(),
            Some("t1"),
            "same status keeps time"
        );
        assert!(set_condition(&mut list, c("False", "other"), "t4"));
        assert_eq!(list[0].last_transition_time.as_deref(), Some("t4"));
    }
}
