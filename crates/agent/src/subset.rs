//! Agents that create agents: the new agent's tools, hosts and budget are
//! a subset of its creator's — never more. Each excess is refused with the
//! reason, before anything is stored.

use crate::run::{offered_tools, Agent};
use crate::store::{self, AgentRecord};

/// Does the creator's host pattern `mine` cover the child's `theirs`?
pub fn host_covers(mine: &str, theirs: &str) -> bool {
    let (mine, theirs) = (mine.to_ascii_lowercase(), theirs.to_ascii_lowercase());
    if mine == "*" || mine == theirs {
        return true;
    }
    match mine.strip_prefix("*.") {
        // `*.d` covers `x.d` and `*.x.d`, never `d` itself.
        Some(domain) => {
            let t = theirs.strip_prefix("*.").unwrap_or(&theirs);
            t.len() > domain.len()
                && t.ends_with(domain)
                && t[..t.len() - domain.len()].ends_with('.')
        }
        None => false,
    }
}

/// The record of the agent `creator` asks for, or why it is refused.
pub fn child_record(
    creator: &Agent<'_>,
    id: &str,
    system: Option<String>,
    tools: Option<Vec<String>>,
    hosts: Option<Vec<String>>,
    daily_tokens: Option<u64>,
) -> Result<AgentRecord, String> {
    let id = &store::tenant_id(id, creator.tenant.as_deref()).map_err(|e| e.to_string())?;
    let mine: Vec<String> = offered_tools(creator)
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tools = match tools {
        Some(t) => {
            let t: Vec<String> = t
                .iter()
                .map(|s| nanoclaw_policy::tools::normalize(s))
                .collect();
            if let Some(extra) = t.iter().find(|t| !mine.contains(t)) {
                return Err(format!(
                    "refused: {extra:?} is not among the creator's own tools ({})",
                    mine.join(", ")
                ));
            }
            t
        }
        None => mine,
    };
    let my_hosts: Vec<String> = match creator.record.as_ref().and_then(|r| r.hosts.clone()) {
        Some(h) => h,
        None => creator.policy.hosts.clone(),
    };
    let hosts = match hosts {
        Some(h) => {
            if let Some(extra) = h
                .iter()
                .find(|h| !my_hosts.iter().any(|m| host_covers(m, h)))
            {
                return Err(format!(
                    "refused: host {extra:?} is not among the hosts the creator may reach ({})",
                    if my_hosts.is_empty() {
                        "none".to_string()
                    } else {
                        my_hosts.join(", ")
                    }
                ));
            }
            h
        }
        None => my_hosts,
    };
    let my_daily = creator
        .record
        .as_ref()
        .and_then(|r| r.daily_tokens)
        .or(creator.limits.daily_tokens);
    let daily_tokens = match (daily_tokens, my_daily) {
        (Some(d), Some(m)) if d > m => {
            return Err(format!(
                "refused: a daily budget of {d} tokens is more than the creator's {m}"
            ));
        }
        (Some(d), _) => Some(d),
        (None, m) => m,
    };
    let base = creator.record.as_ref().and_then(|r| r.base.clone());
    Ok(AgentRecord {
        id: id.to_string(),
        created_ms: store::now_ms(),
        base,
        config: creator.record.as_ref().and_then(|r| r.config.clone()),
        system,
        tools: Some(tools),
        hosts: Some(hosts),
        daily_tokens,
        creator: Some(creator.id.clone()),
        team: creator.record.as_ref().and_then(|r| r.team.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_cover_only_what_they_name() {
        assert!(host_covers("*.example.com", "api.example.com"));
        assert!(host_covers("*.example.com", "*.api.example.com"));
        assert!(!host_covers("*.example.com", "example.com"));
        assert!(!host_covers("*.example.com", "*.com"));
        assert!(!host_covers("*.example.com", "evilexample.com"));
        assert!(!host_covers("api.example.com", "*.example.com"));
        assert!(host_covers("*", "anything.org"));
    }
}
