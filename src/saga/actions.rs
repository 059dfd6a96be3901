//! Operators' actions on sagas, as they travel on the application's control topic
//! ([`super::topology::control_topic`]): one JSON record per action, keyed by the saga id.
//!
//! The task that owns the saga applies it inside its transaction ([`super::machine::act`]), in
//! order with the saga's events; a record read again after a crash is recognised by its action
//! id, which joins the saga's recent event ids.

use serde::{Deserialize, Serialize};

use super::machine::Action;

/// One action as written to the control topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRequest {
    /// Unique per request (a UUID): what makes the action apply once.
    pub action_id: String,
    pub saga_id: String,
    #[serde(flatten)]
    pub action: Action,
    /// Who asked (`--by`, or the caller's user name), for the history and the audit log.
    pub requested_by: String,
    /// When, in ms since the epoch.
    pub requested_at_ms: i64,
}

/// The most an action's reason and requester may hold, each: they end up in the saga's history.
pub const MAX_TEXT: usize = 500;

impl ActionRequest {
    /// Checks what a caller sent: an id to act on, and reasons that fit.
    pub fn validate(&self) -> Result<(), String> {
        if self.saga_id.is_empty() {
            return Err("an action needs a saga id".into());
        }
        if self.action_id.is_empty() {
            return Err("an action needs an action id".into());
        }
        if self.requested_by.trim().is_empty() {
            return Err("an action needs who requested it".into());
        }
        if self.requested_by.len() > MAX_TEXT {
            return Err(format!("who requested it is longer than {MAX_TEXT} bytes"));
        }
        if let Action::Cancel { reason } = &self.action {
            if reason.trim().is_empty() {
                return Err("a cancel needs a reason".into());
            }
            if reason.len() > MAX_TEXT {
                return Err(format!("the reason is longer than {MAX_TEXT} bytes"));
            }
        }
        Ok(())
    }
}

/// The action named `name` (`retry`, `cancel`, `resume`); a cancel with its reason.
pub fn parse_action(name: &str, reason: Option<String>) -> Result<Action, String> {
    match name {
        "retry" => Ok(Action::Retry),
        "resume" => Ok(Action::Resume),
        "cancel" => Ok(Action::Cancel {
            reason: reason.unwrap_or_default(),
        }),
        other => Err(format!(
            "unknown action '{other}' (retry, cancel or resume)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_reads_back_as_written_and_is_checked() {
        let request = ActionRequest {
            action_id: "a-1".into(),
            saga_id: "o-1".into(),
            action: Action::Cancel {
                reason: "participant bug".into(),
            },
            requested_by: "ops".into(),
            requested_at_ms: 1,
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains(r#""action":"cancel""#), "{text}");
        assert_eq!(
            serde_json::from_str::<ActionRequest>(&text).unwrap(),
            request
        );
        assert!(request.validate().is_ok());
        let mut blank = request.clone();
        blank.action = Action::Cancel { reason: " ".into() };
        assert!(blank.validate().is_err());
        assert!(parse_action("terminate", None).is_err());
        assert_eq!(parse_action("retry", None), Ok(Action::Retry));
    }
}
