//! The control plane's JSON bodies (`spec/openapi.yml` schemas).
//!
//! Requests ignore fields they do not know, as E2B's API does (its Go
//! decoder does): newer SDKs send fields older servers never heard of.
//! Fields that ask for a feature nanoclaw does not have (MCP gateway,
//! volumes, workload identity, egress proxy, auto-resume) are refused with
//! 400 rather than silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::time::{format_rfc3339, unix_seconds};
use crate::backend::{SandboxInfo, SandboxMetric, SandboxState};
use crate::error::ApiError;

/// The sandbox time to live when create or connect gives none: 300 s, the
/// SDK's documented default (E2B's API applies it when the SDK omits the
/// field).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// The deprecated `clientID` every sandbox schema requires.
const CLIENT_ID: &str = "nanoclaw";

/// `NewSandbox`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template name or id.
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Time to live, seconds.
    pub timeout: Option<i64>,
    /// Pause instead of kill at timeout.
    pub auto_pause: Option<bool>,
    /// `{"enabled": bool}`; enabled is not supported.
    pub auto_resume: Option<Value>,
    /// Ignored: envd access is always secured with a token.
    pub secure: Option<bool>,
    /// Internet access (false: deny `0.0.0.0/0`).
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    /// Egress rules.
    pub network: Option<NetworkConfig>,
    /// User metadata.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every process.
    pub env_vars: Option<BTreeMap<String, String>>,
    /// MCP gateway configuration (not supported).
    pub mcp: Option<Value>,
    /// Workload identity (not supported).
    pub iam: Option<Value>,
    /// Volume mounts (not supported).
    pub volume_mounts: Option<Vec<Value>>,
}

/// `SandboxNetworkConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// CIDRs, IPs or domains allowed out.
    pub allow_out: Option<Vec<String>>,
    /// CIDRs or IPs denied.
    pub deny_out: Option<Vec<String>>,
    /// Ignored: nanoclaw publishes no sandbox URLs.
    pub allow_public_traffic: Option<bool>,
    /// Ignored, as `allow_public_traffic`.
    pub mask_request_host: Option<String>,
    /// SOCKS5 egress proxy (not supported).
    pub egress_proxy: Option<Value>,
    /// Per-domain transform rules (`SandboxNetworkRule`): headers the
    /// egress proxy sets on requests to the domain (see [`network_rules`]).
    pub rules: Option<Value>,
}

/// E2B's `network.rules` (`{domain: [{transform: {headers: {..}}}]}`) as
/// the proxy's credential rules. Values are used as given (E2B resolves
/// secrets client-side): `${VAR}` is not expanded from the daemon's
/// environment, which would hand the daemon's secrets to any API caller.
pub fn network_rules(
    rules: Option<&Value>,
) -> Result<nanoclaw_sandbox::net::HeaderRules, ApiError> {
    use nanoclaw_sandbox::net::{HeaderRule, HeaderRules};
    let bad = |what: String| ApiError::bad_request(format!("network.rules: {what}"));
    let map = match rules {
        None | Some(Value::Null) => return Ok(HeaderRules::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("expected an object of domain to a list of rules".into())),
    };
    let mut out = Vec::with_capacity(map.len());
    for (domain, list) in map {
        let items: Vec<&Value> = match list {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![list],
            _ => {
                return Err(bad(format!(
                    "{domain:?}: expected a list of {{transform: {{headers}}}}"
                )))
            }
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        for item in items {
            let Some(h) = item.get("transform").and_then(|t| t.get("headers")) else {
                continue;
            };
            let Some(h) = h.as_object() else {
                return Err(bad(format!(
                    "{domain:?}: transform.headers must be an object of name to string"
                )));
            };
            for (name, value) in h {
                let Some(value) = value.as_str() else {
                    return Err(bad(format!(
                        "{domain:?}: the value of header {name:?} must be a string"
                    )));
                };
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                headers.push((name.clone(), value.to_string()));
            }
        }
        out.push(HeaderRule {
            domain: domain.clone(),
            headers,
        });
    }
    HeaderRules::new(out).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty_value),
        Value::Array(a) => a.is_empty(),
        Value::Bool(b) => !b,
        _ => false,
    }
}

impl NewSandbox {
    /// Refuses features nanoclaw does not have.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        let refuse = |what: &str| {
            Err(ApiError::bad_request(format!(
                "{what} is not supported by nanoclaw"
            )))
        };
        if self.mcp.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("mcp");
        }
        if self.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse("volumeMounts");
        }
        if self.iam.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return refuse("iam");
        }
        if let Some(resume) = &self.auto_resume {
            if resume.get("enabled").and_then(Value::as_bool) == Some(true) {
                return refuse("autoResume");
            }
        }
        if let Some(net) = &self.network {
            if net.egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
                return refuse("network.egressProxy");
            }
        }
        Ok(())
    }
}

/// `SandboxNetworkUpdateConfig`: the body of `PUT /sandboxes/{id}/network`.
/// It replaces the sandbox's egress rules whole: a field left out is
/// cleared (no `allowOut` and no `denyOut`: the internet, as at a create
/// without a `network`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdateBody {
    /// CIDRs, IPs or domains allowed out.
    pub allow_out: Option<Vec<String>>,
    /// CIDRs or IPs denied.
    pub deny_out: Option<Vec<String>>,
    /// `false`: deny everything (as `denyOut: ["0.0.0.0/0"]`).
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    /// SOCKS5 egress proxy (not supported).
    pub egress_proxy: Option<Value>,
    /// Per-domain transform rules (`SandboxNetworkRule`), replacing the
    /// sandbox's (left out: cleared, as in E2B).
    pub rules: Option<Value>,
    /// DNS servers to allow (not supported: the sandbox's DNS is
    /// nanoclaw's own resolver).
    pub dns_servers: Option<Vec<String>>,
}

impl NetworkUpdateBody {
    /// Refuses what nanoclaw does not do; the update otherwise.
    pub fn into_update(self) -> Result<crate::backend::NetworkUpdate, ApiError> {
        let refuse = |what: &str, why: &str| {
            Err(ApiError::bad_request(format!(
                "{what} is not supported by nanoclaw{why}"
            )))
        };
        if self.egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("egressProxy", "");
        }
        if self.dns_servers.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse(
                "dnsServers",
                ": the sandbox's DNS is nanoclaw's own resolver on its loopback, which answers the names allowOut allows",
            );
        }
        Ok(crate::backend::NetworkUpdate {
            rules: network_rules(self.rules.as_ref())?,
            allow_internet_access: self.allow_internet_access,
            allow_out: self.allow_out.unwrap_or_default(),
            deny_out: self.deny_out.unwrap_or_default(),
        })
    }
}

/// The longest timeout a request may ask for (30 days): time arithmetic
/// on anything a client sends must never overflow.
pub const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;

/// A request's `timeout` in seconds (0 or more, at most
/// [`MAX_TIMEOUT_SECS`]), or `default`.
pub fn timeout_secs(value: Option<i64>, default: u64) -> Result<Duration, ApiError> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(n) if n < 0 => Err(ApiError::bad_request(format!(
            "timeout must be 0 or more seconds, got {n}"
        ))),
        Some(n) if n > MAX_TIMEOUT_SECS => Err(ApiError::bad_request(format!(
            "timeout must be at most {MAX_TIMEOUT_SECS} seconds (30 days), got {n}"
        ))),
        Some(n) => Ok(Duration::from_secs(n.unsigned_abs())),
    }
}

/// `ConnectSandbox`, `SandboxTimeoutRequest`, `ResumedSandbox`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutBody {
    /// Seconds from now.
    pub timeout: Option<i64>,
    /// Deprecated in `ResumedSandbox`; ignored.
    pub auto_pause: Option<bool>,
}

/// `SandboxRefreshRequest`.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshBody {
    /// Seconds to keep alive, at most 3600.
    pub duration: Option<i64>,
}

/// `SandboxPauseRequest`.
#[derive(Debug, Default, Deserialize)]
pub struct PauseBody {
    /// `false` (filesystem-only pause) is not supported.
    pub memory: Option<bool>,
}

fn state_name(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
    }
}

/// The `Sandbox` schema (answer to create, connect, resume).
pub fn sandbox(info: &SandboxInfo, envd_version: &str) -> Value {
    let mut v = json!({
        "templateID": info.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": envd_version,
        "envdAccessToken": info.envd_access_token,
        // The same token: the code-interpreter SDK sends it (as
        // E2B-Traffic-Access-Token) on its /contexts calls, which carry no
        // X-Access-Token.
        "trafficAccessToken": info.envd_access_token,
        "domain": null,
    });
    if let (Some(alias), Some(obj)) = (&info.alias, v.as_object_mut()) {
        obj.insert("alias".into(), json!(alias));
    }
    v
}

/// The `ListedSandbox` schema.
pub fn listed_sandbox(info: &SandboxInfo, envd_version: &str) -> Value {
    let mut v = json!({
        "templateID": info.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "startedAt": format_rfc3339(info.started_at),
        "endAt": format_rfc3339(info.end_at),
        "cpuCount": info.cpu_count,
        "memoryMB": info.memory_mb,
        "diskSizeMB": info.disk_size_mb,
        "metadata": info.metadata,
        "state": state_name(info.state),
        "envdVersion": envd_version,
        "volumeMounts": [],
    });
    if let (Some(alias), Some(obj)) = (&info.alias, v.as_object_mut()) {
        obj.insert("alias".into(), json!(alias));
    }
    v
}

/// The `SandboxDetail` schema.
pub fn sandbox_detail(info: &SandboxInfo, envd_version: &str) -> Value {
    let mut v = listed_sandbox(info, envd_version);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("envdAccessToken".into(), json!(info.envd_access_token));
        obj.insert("domain".into(), Value::Null);
        obj.insert(
            "allowInternetAccess".into(),
            json!(info.allow_internet_access),
        );
        obj.insert(
            "network".into(),
            json!({ "allowOut": info.allow_out, "denyOut": info.deny_out }),
        );
        obj.insert(
            "lifecycle".into(),
            json!({
                "autoResume": false,
                "onTimeout": if info.auto_pause { "pause" } else { "kill" },
            }),
        );
    }
    v
}

/// The `SandboxMetric` schema.
pub fn metric(m: &SandboxMetric) -> Value {
    json!({
        "timestamp": format_rfc3339(m.timestamp),
        "timestampUnix": unix_seconds(m.timestamp),
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_rules_take_e2b_shape_and_refuse_bad_ones() {
        let v: Value = serde_json::from_str(
            r#"{"api.test":[{"transform":{"headers":{"Authorization":"Bearer s"}}}],"*.x.test":[{}]}"#,
        )
        .unwrap();
        let r = network_rules(Some(&v)).unwrap();
        assert_eq!(
            r.headers_for("api.test"),
            vec![("Authorization", "Bearer s")]
        );
        for bad in [
            r#"{"api.test":[{"transform":{"headers":{"Host":"evil.test"}}}]}"#,
            r#"{"api.test":[{"transform":{"headers":{"X":"a\r\nB: c"}}}]}"#,
            r#"{"*":[]}"#,
            r#"{"api.test":[{"transform":{"headers":{"X":1}}}]}"#,
            r#"["api.test"]"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(network_rules(Some(&v)).is_err(), "{bad}");
        }
        assert!(network_rules(None).unwrap().is_empty());
    }

    #[test]
    fn new_sandbox_ignores_unknown_and_refuses_unsupported() {
        let ok: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":300,"someFutureField":{"x":1},"mcp":null,
                "autoResume":{"enabled":false},"network":{"allowOut":["1.1.1.1"],"allowPublicTraffic":true}}"#,
        )
        .unwrap();
        assert!(ok.check_supported().is_ok());
        assert_eq!(
            ok.network.unwrap().allow_out.unwrap(),
            vec!["1.1.1.1".to_string()]
        );
        let bad: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}"#,
        )
        .unwrap();
        assert!(bad.check_supported().is_err());
        let bad: NewSandbox =
            serde_json::from_str(r#"{"templateID":"base","mcp":{"github":{}}}"#).unwrap();
        assert!(bad.check_supported().is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout_secs(None, 15).unwrap(), Duration::from_secs(15));
        assert_eq!(timeout_secs(Some(0), 15).unwrap(), Duration::ZERO);
        assert!(timeout_secs(Some(-1), 15).is_err());
    }
}
