//! `network.rules` (credentials at the boundary): E2B's shape and the short
//! form, `${VAR}` expanded from nanoclaw's environment, the values never
//! printed, bad rules refused with the key that is wrong.

mod common;

use common::{load, load_ok};
use nanoclaw_policy::{resolve, Request};

const RULES: &str = "
agents:
  list:
    - id: coder
      sandbox:
        mode: all
        network: allowlist
        allowedHosts: [api.github.com, example.com]
network:
  rules:
    api.github.com:
      - transform:
          headers:
            Authorization: \"Bearer ${ANTHROPIC_API_KEY}\"
    \"*.example.com\":
      headers:
        X-Key: \"${ANTHROPIC_API_KEY}\"
";

#[test]
fn both_shapes_expand_the_variable_and_reach_the_spec() {
    let l = load_ok(RULES);
    let rules = &l.config.network.rules;
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].domain, "api.github.com");
    assert_eq!(rules[0].headers[0].1.expose(), "Bearer sk-ant-secret-value");
    // The value is never printed: not by Debug, not in the JSON report.
    assert!(!format!("{:?}", l.config).contains("sk-ant-secret-value"));
    let r = resolve(&l.config, &Request::new(Some("coder"), "main")).expect("resolve");
    let json = serde_json::to_string(&r).expect("json");
    assert!(!json.contains("sk-ant-secret-value"), "{json}");
    assert!(json.contains("api.github.com: Authorization"), "{json}");
    let spec = r.to_spec(vec!["true".into()]).expect("spec");
    let headers = spec.egress.rules.headers_for("api.github.com");
    assert_eq!(
        headers,
        vec![("Authorization", "Bearer sk-ant-secret-value")]
    );
    assert_eq!(spec.egress.rules.headers_for("a.example.com").len(), 1);
    assert!(!format!("{spec:?}").contains("sk-ant-secret-value"));
}

#[test]
fn a_written_secret_warns_and_bad_rules_are_errors() {
    let l = load("network:\n  rules:\n    api.test:\n      headers:\n        Authorization: Bearer literal\n");
    assert!(!l.has_errors());
    assert!(l
        .warnings()
        .any(|d| d.to_string().contains("credential written in the file")));
    for (bad, why) in [
        ("\"*.com\":\n      headers: {X: y}", "at least two labels"),
        (
            "api.test:\n      headers: {Host: evil.test}",
            "cannot be set by a rule",
        ),
        (
            "api.test:\n      headers: {X: \"${NOT_SET_ANYWHERE}\"}",
            "not set",
        ),
        (
            "api.test:\n      transform: {headers: {X: y}}\n      headers: {X: y}",
            "not both",
        ),
    ] {
        let l = load(&format!("network:\n  rules:\n    {bad}\n"));
        let errs: Vec<String> = l.errors().map(|d| d.to_string()).collect();
        assert!(errs.iter().any(|e| e.contains(why)), "{bad}: {errs:?}");
    }
}

/// An agent's own rules (issue 13 item 5): the map form of its network
/// (`{mode, allowed_hosts, rules}`, under `sandbox` or on the agent),
/// added to the top-level rules, the agent's winning for a domain in both;
/// another agent gets only the top-level ones.
#[test]
fn an_agents_network_map_carries_its_own_rules() {
    let yaml = "
network:
  rules:
    api.github.com:
      headers: {Authorization: \"Bearer top-level\"}
    shared.test:
      headers: {X-Shared: \"${ANTHROPIC_API_KEY}\"}
agents:
  list:
    - id: coder
      sandbox:
        mode: all
        network:
          mode: allowlist
          allowed_hosts: [api.github.com, api.test]
          rules:
            api.test:
              - transform:
                  headers:
                    Authorization: \"Bearer ${ANTHROPIC_API_KEY}\"
            api.github.com:
              headers: {X-Agent: \"${ANTHROPIC_API_KEY}\"}
    - id: other
      sandbox: {mode: all}
      network: {mode: allowlist, allowedHosts: [api.test]}
";
    let l = load(yaml);
    let errs: Vec<String> = l.errors().map(|d| d.to_string()).collect();
    assert!(errs.is_empty(), "{errs:?}");
    let r = resolve(&l.config, &Request::new(Some("coder"), "main")).expect("resolve");
    assert_eq!(r.network.allowed_hosts, vec!["api.github.com", "api.test"]);
    let spec = r.to_spec(vec!["true".into()]).expect("spec");
    let rules = &spec.egress.rules;
    assert_eq!(
        rules.headers_for("api.test"),
        vec![("Authorization", "Bearer sk-ant-secret-value")]
    );
    // The agent's rule for api.github.com replaced the top-level one whole.
    assert_eq!(
        rules.headers_for("api.github.com"),
        vec![("X-Agent", "sk-ant-secret-value")]
    );
    assert_eq!(rules.headers_for("shared.test").len(), 1);
    let json = serde_json::to_string(&r).expect("json");
    assert!(!json.contains("sk-ant-secret-value"), "{json}");
    assert!(!format!("{:?}", l.config).contains("sk-ant-secret-value"));

    let r = resolve(&l.config, &Request::new(Some("other"), "main")).expect("resolve");
    assert_eq!(r.network.allowed_hosts, vec!["api.test"]);
    let spec = r.to_spec(vec!["true".into()]).expect("spec");
    assert!(spec.egress.rules.headers_for("api.test").is_empty());
    assert_eq!(
        spec.egress.rules.headers_for("api.github.com"),
        vec![("Authorization", "Bearer top-level")]
    );

    // Set twice, or a bad rule: one error naming the key.
    for (bad, why) in [
        (
            "    - id: x\n      sandbox: {network: allowlist}\n      network: {mode: allowlist}\n",
            "set it in one place",
        ),
        (
            "    - id: x\n      sandbox:\n        network: {allowed_hosts: [a.test]}\n        allowedHosts: [b.test]\n",
            "given twice",
        ),
        (
            "    - id: x\n      sandbox:\n        network: {rules: {a.test: {headers: {Host: evil.test}}}}\n",
            "cannot be set by a rule",
        ),
        (
            "    - id: x\n      sandbox:\n        network: {mode: allowlist, hosts: [a.test]}\n",
            "hosts",
        ),
    ] {
        let l = load(&format!("agents:\n  list:\n{bad}"));
        let errs: Vec<String> = l.errors().map(|d| d.to_string()).collect();
        assert!(errs.iter().any(|e| e.contains(why)), "{bad}: {errs:?}");
    }
}
