//! Credential rules: headers the proxy sets on requests to a host, so that
//! a secret (an API token) is added at the network boundary and never
//! enters the sandbox.
//!
//! The shape follows E2B's `network.rules` (`SandboxNetworkRule`): a map
//! from a domain (`api.github.com`, or `*.example.com` for every name below
//! it) to header transforms; a header already in the request with the same
//! name is replaced. A rule does not allow a host: the allowlist still
//! decides whether the sandbox may reach it at all.
//!
//! Values are secrets: [`HeaderRules`]'s `Debug` never prints them. They
//! are checked here so that a rule cannot smuggle a second header or a
//! second request (`\r\n` in a value) or change the request's framing or
//! destination (`Host`, `Content-Length`, `Transfer-Encoding`,
//! `Connection`, ...).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::{normalize_name, HostPattern};

/// Most rules one sandbox may carry.
pub const MAX_RULES: usize = 256;
/// Most headers one rule may set.
pub const MAX_RULE_HEADERS: usize = 32;
/// Longest header value a rule may set (bytes).
pub const MAX_RULE_VALUE: usize = 8192;

/// Headers a rule may not set: they decide where a request goes or how it
/// is framed, which the proxy checks and must not let a rule change.
const FORBIDDEN: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
];

/// A credential rule that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The domain is not a DNS name or `*.name`.
    #[error("network.rules {domain:?}: {reason}; write a domain such as api.github.com or *.example.com")]
    Domain {
        /// The key as given.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name that is not an HTTP token.
    #[error("network.rules {domain:?}: header name {name:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)")]
    HeaderName {
        /// The rule's domain.
        domain: String,
        /// The name.
        name: String,
    },
    /// A header the proxy will not let a rule set.
    #[error("network.rules {domain:?}: header {name:?} decides the request's destination or framing and cannot be set by a rule")]
    ForbiddenHeader {
        /// The rule's domain.
        domain: String,
        /// The name.
        name: String,
    },
    /// A value with a control character (CR, LF, NUL, ...).
    #[error("network.rules {domain:?}: the value of header {name:?} contains a control character (line breaks would inject headers)")]
    HeaderValue {
        /// The rule's domain.
        domain: String,
        /// The header's name (never the value: it is a secret).
        name: String,
    },
    /// Too many rules or headers, or a value too long.
    #[error("network.rules: {what}")]
    TooLarge {
        /// Which limit.
        what: String,
    },
}

/// One host's header transform.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    /// The domain as written (`api.github.com`, `*.example.com`).
    pub domain: String,
    /// Headers set on every request to a matching host, replacing any
    /// header of the same name (case-insensitive), in order.
    pub headers: Vec<(String, String)>,
}

impl fmt::Debug for HeaderRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HeaderRule")
            .field("domain", &self.domain)
            .field("headers", &names)
            .finish_non_exhaustive()
    }
}

/// Every credential rule of one sandbox, checked.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<HeaderRule>", into = "Vec<HeaderRule>")]
pub struct HeaderRules {
    rules: Vec<(HostPattern, HeaderRule)>,
}

impl fmt::Debug for HeaderRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|(_, r)| r))
            .finish()
    }
}

impl TryFrom<Vec<HeaderRule>> for HeaderRules {
    type Error = RuleError;
    fn try_from(v: Vec<HeaderRule>) -> Result<Self, Self::Error> {
        HeaderRules::new(v)
    }
}

impl From<HeaderRules> for Vec<HeaderRule> {
    fn from(r: HeaderRules) -> Self {
        r.rules.into_iter().map(|(_, r)| r).collect()
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a rule's domain: an exact name or `*.name` (at least two labels
/// after the `*.`).
pub fn parse_domain(domain: &str) -> Result<HostPattern, RuleError> {
    let bad = |reason: &str| RuleError::Domain {
        domain: domain.to_string(),
        reason: reason.to_string(),
    };
    if let Some(suffix) = domain.strip_prefix("*.") {
        let s = normalize_name(suffix).map_err(bad)?;
        if !s.contains('.') {
            return Err(bad("a wildcard must name at least two labels after `*.`"));
        }
        return Ok(HostPattern::Wildcard(s));
    }
    if domain.contains('*') {
        return Err(bad("only a leading `*.` wildcard is supported"));
    }
    if domain.parse::<std::net::IpAddr>().is_ok() {
        return Err(bad(
            "an IP address: rules apply to names (TLS interception needs one)",
        ));
    }
    normalize_name(domain).map(HostPattern::Exact).map_err(bad)
}

impl HeaderRules {
    /// Checks `rules` (domains, header names and values, limits).
    pub fn new(rules: Vec<HeaderRule>) -> Result<HeaderRules, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(RuleError::TooLarge {
                what: format!("{} rules; at most {MAX_RULES}", rules.len()),
            });
        }
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let pattern = parse_domain(&r.domain)?;
            if r.headers.len() > MAX_RULE_HEADERS {
                return Err(RuleError::TooLarge {
                    what: format!(
                        "{:?} sets {} headers; at most {MAX_RULE_HEADERS}",
                        r.domain,
                        r.headers.len()
                    ),
                });
            }
            for (name, value) in &r.headers {
                if !is_token(name) {
                    return Err(RuleError::HeaderName {
                        domain: r.domain.clone(),
                        name: name.clone(),
                    });
                }
                if FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f)) {
                    return Err(RuleError::ForbiddenHeader {
                        domain: r.domain.clone(),
                        name: name.clone(),
                    });
                }
                if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    return Err(RuleError::HeaderValue {
                        domain: r.domain.clone(),
                        name: name.clone(),
                    });
                }
                if value.len() > MAX_RULE_VALUE {
                    return Err(RuleError::TooLarge {
                        what: format!(
                            "{:?}: the value of {name:?} is longer than {MAX_RULE_VALUE} bytes",
                            r.domain
                        ),
                    });
                }
            }
            out.push((pattern, r));
        }
        Ok(HeaderRules { rules: out })
    }

    /// True when there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, as given.
    pub fn rules(&self) -> impl Iterator<Item = &HeaderRule> {
        self.rules.iter().map(|(_, r)| r)
    }

    /// The domains the rules name (for the interception CA's name
    /// constraints): `api.github.com`, or `example.com` for
    /// `*.example.com`.
    pub fn domains(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rules
            .iter()
            .map(|(p, _)| match p {
                HostPattern::Exact(n) | HostPattern::Wildcard(n) => n.clone(),
                HostPattern::Ip(ip) => ip.to_string(),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether any rule matches `name` (normalised).
    pub fn matches(&self, name: &str) -> bool {
        self.rules.iter().any(|(p, _)| p.matches_name(name))
    }

    /// The headers to set on a request to `name`: every matching rule's, in
    /// order (a later rule's header replaces an earlier one's).
    pub fn headers_for(&self, name: &str) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for (p, r) in &self.rules {
            if !p.matches_name(name) {
                continue;
            }
            for (k, v) in &r.headers {
                out.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
                out.push((k.as_str(), v.as_str()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(domain: &str, headers: &[(&str, &str)]) -> HeaderRule {
        HeaderRule {
            domain: domain.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn matches_exact_and_wildcard_and_merges_in_order() {
        let r = HeaderRules::new(vec![
            rule("api.github.com", &[("Authorization", "Bearer a")]),
            rule(
                "*.github.com",
                &[("authorization", "Bearer b"), ("X-K", "1")],
            ),
        ])
        .unwrap();
        assert_eq!(
            r.headers_for("api.github.com"),
            vec![("authorization", "Bearer b"), ("X-K", "1")]
        );
        assert_eq!(r.headers_for("uploads.github.com").len(), 2);
        assert!(r.headers_for("github.com").is_empty());
        assert!(!r.matches("example.com"));
        assert_eq!(r.domains(), vec!["api.github.com", "github.com"]);
    }

    #[test]
    fn refuses_injection_framing_and_bad_domains() {
        let bad = [
            rule("a.test", &[("X", "v\r\nHost: evil")]),
            rule("a.test", &[("Host", "evil.test")]),
            rule("a.test", &[("Content-Length", "0")]),
            rule("a.test", &[("Bad Name", "v")]),
            rule("*.com", &[("X", "v")]),
            rule("10.0.0.1", &[("X", "v")]),
            rule("a.*.test", &[("X", "v")]),
        ];
        for b in bad {
            assert!(HeaderRules::new(vec![b.clone()]).is_err(), "{b:?}");
        }
    }

    #[test]
    fn debug_never_prints_values() {
        let r = HeaderRules::new(vec![rule("a.test", &[("Authorization", "s3cret")])]).unwrap();
        let d = format!("{r:?}");
        assert!(d.contains("Authorization") && !d.contains("s3cret"), "{d}");
    }
}
