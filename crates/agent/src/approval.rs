//! Human approvals. A request names one exact call (its binding: the
//! sha256 of the tool, its arguments, and for commands the exact argv, cwd
//! and environment); an answer is allow-once, allow-always (remembered for
//! that agent and that binding only), or deny. No answer before the expiry,
//! or nobody to ask: deny (fail closed).

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// How long a request waits for a person by default.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(300);

/// One request for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalRequest {
    /// Its id (`apr_` and 16 hex digits).
    pub id: String,
    /// The agent asking.
    pub agent: String,
    /// The tool.
    pub tool: String,
    /// What would run, for a person.
    pub summary: String,
    /// Why approval is needed.
    pub reason: String,
    /// The binding (64 hex digits).
    pub binding: String,
}

/// A person's answer, or its absence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// Run it this once.
    AllowOnce,
    /// Run it, and this exact call again without asking.
    AllowAlways,
    /// Refused by a person.
    Deny,
    /// Nobody answered in time.
    Expired,
    /// There is no way to ask anyone (no terminal, no daemon).
    Unavailable,
}

impl Answer {
    /// Does it let the call run?
    pub fn allows(self) -> bool {
        matches!(self, Answer::AllowOnce | Answer::AllowAlways)
    }

    /// The spelling used in the API and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::AllowOnce => "allow-once",
            Answer::AllowAlways => "allow-always",
            Answer::Deny => "deny",
            Answer::Expired => "expired",
            Answer::Unavailable => "unavailable",
        }
    }

    /// Parses a person's answer (`allow-once`, `allow-always`, `deny`).
    pub fn parse(s: &str) -> Option<Answer> {
        match s {
            "allow-once" | "allow_once" | "once" => Some(Answer::AllowOnce),
            "allow-always" | "allow_always" | "always" => Some(Answer::AllowAlways),
            "deny" => Some(Answer::Deny),
            _ => None,
        }
    }
}

/// Who answers approval requests.
pub trait Approver: Send + Sync {
    /// Asks, waiting at most `wait`.
    fn ask(&self, req: &ApprovalRequest, wait: Duration) -> Answer;
}

/// Nobody: every request is refused (fail closed).
pub struct Nobody;

impl Approver for Nobody {
    fn ask(&self, _req: &ApprovalRequest, _wait: Duration) -> Answer {
        Answer::Unavailable
    }
}

/// The binding of a call: sha256 over its canonical JSON.
pub fn binding(
    tool: &str,
    args: &Value,
    argv: Option<&[String]>,
    cwd: &str,
    env: &[(String, String)],
) -> String {
    let mut env: Vec<&(String, String)> = env.iter().collect();
    env.sort();
    let v = json!({"tool": tool, "args": args, "argv": argv, "cwd": cwd, "env": env});
    // serde_json's map is ordered (BTreeMap), so this is canonical.
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// A fresh request id.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // The clock is unique enough for an id that is never a secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = t.to_be_bytes();
    }
    format!("apr_{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_changes_with_argv_cwd_or_env() {
        let argv = vec!["sh".to_string(), "-c".into(), "rm -rf x".into()];
        let a = binding(
            "exec",
            &json!({"command": "rm -rf x"}),
            Some(&argv),
            "/w",
            &[],
        );
        assert_eq!(
            a,
            binding(
                "exec",
                &json!({"command": "rm -rf x"}),
                Some(&argv),
                "/w",
                &[]
            )
        );
        assert_ne!(
            a,
            binding(
                "exec",
                &json!({"command": "rm -rf x"}),
                Some(&argv),
                "/",
                &[]
            )
        );
        let env = [("LD_PRELOAD".to_string(), "/tmp/x.so".to_string())];
        assert_ne!(
            a,
            binding(
                "exec",
                &json!({"command": "rm -rf x"}),
                Some(&argv),
                "/w",
                &env
            )
        );
        assert_eq!(
            Nobody.ask(
                &ApprovalRequest {
                    id: new_id(),
                    agent: "a".into(),
                    tool: "exec".into(),
                    summary: String::new(),
                    reason: String::new(),
                    binding: a
                },
                Duration::ZERO
            ),
            Answer::Unavailable
        );
    }
}
