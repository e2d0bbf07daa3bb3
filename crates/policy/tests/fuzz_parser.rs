//! Fuzzing the config parser inside `cargo test`: random text and mutated
//! valid configs go through parse → resolve → explain → to_spec, for about
//! 8 seconds (`NANOCLAW_FUZZ_SECS` changes it). Nothing may panic, and the
//! explain output must agree with `sandboxed`.

mod common;

use std::time::{Duration, Instant};

use nanoclaw_policy::explain::{explain_json, explain_text};
use nanoclaw_policy::{resolve, Request};
use proptest::prelude::*;

const CORPUS: &[&str] = &[
    "security:\n  cpu_limit: 1.0\n  memory_limit: 512m\n  timeout: 30s\n  network_mode: none # or bridge\n  read_only: true\n  tmpfs_size: 100m\nexecution:\n  languages:\n    - python:3.11-slim\n    - node:18-alpine\n  preload_images: true\n  pool_size: 3\nllm:\n  provider: anthropic\n  api_key: ${ANTHROPIC_API_KEY}\n  model: claude-3-5-sonnet-20241022\n",
    "security:\n  network_mode: bridge\n  allowed_hosts:\n    - api.anthropic.com\n  cap_drop: [ALL]\n  cap_add: [CHOWN]\n  privileged: false\n  cpu_shares: 512\n  memory_swap: 1g\n  blkio_weight: 500\n",
    "{\n  \"agents\": {\n    \"defaults\": {\n      \"sandbox\": {\n        \"mode\": \"non-main\", // x\n        \"scope\": \"shared\",\n        \"workspaceAccess\": \"ro\",\n        \"bindMounts\": [\"/shared/lib:/lib:ro\"]\n      }\n    },\n    \"data-processor\": {\"sandbox\": {\"bindMounts\": [\"/data:/data:rw\"]}}\n  }\n}\n",
    "{\"agents\": {\"scraper\": {\"sandbox\": {\"mode\": \"all\", \"scope\": \"session\", \"workspaceAccess\": \"rw\", \"network\": \"bridge\", \"setupCommand\": \"pip install requests\"}, \"tools\": {\"allow\": [\"http-request\", \"read\", \"write\"]}}}}",
    "{\"agents\": {\"admin\": {\"sandbox\": {\"mode\": \"off\"}, \"tools\": {\"allow\": [\"group:*\"]}}}, \"tools\": {\"elevated\": {\"enabled\": true, \"allowFrom\": {\"telegram\": [\"1\"]}}}}",
    "tools:\n  allow: [exec, read, write, group:fs]\n  deny: [shell]\nsession:\n  mainKey: main\nagents:\n  list:\n    - id: a\n      default: true\n      workspace: /srv/ws\n      sandbox:\n        mode: all\n        scope: agent\n        memory: 1g\n        memorySwap: 2g\n        cpus: 0.5\n        pids: 64\n        timeout: 500ms\n        prune: {idleHours: 2, maxAgeDays: 1}\n        image: host\n        allowedHosts: [\"*.example.com:443\"]\n        network: allowlist\n      tools:\n        deny: [exec]\n        elevated: {enabled: true, allowFrom: [\"cli:me\"]}\n",
];

const TOKENS: &[&str] = &[
    ":",
    "- ",
    "\n",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "!!str ",
    "---\n",
    "...",
    "|\n",
    ">\n",
    "${",
    "${X}",
    "$${",
    "}",
    "~",
    "null",
    "true",
    "false",
    "-1",
    "0",
    ".nan",
    "1e400",
    "9999999999999999999999t",
    "mode",
    "non-main",
    "scope",
    "shared",
    "bindMounts",
    "/etc:/etc",
    "/:/",
    "..",
    "group:*",
    "group:",
    "exec",
    "elevated",
    "allowFrom",
    "agents",
    "list",
    "defaults",
    "id",
    "security",
    "memory_limit",
    "\u{feff}",
    "\t",
    "\r\n",
    "é",
    "日本",
    "\u{0}",
    "? ",
    "<<: ",
    "%YAML 1.2\n",
    "//",
    "/*",
    "*/",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i.min(s.len())
}

fn mutate(rng: &mut Rng, s: &str) -> String {
    let mut s = s.to_string();
    for _ in 0..=rng.below(6) {
        let len = s.len();
        let a = floor_char(&s, rng.below(len + 1));
        let b = floor_char(&s, (a + rng.below(16)).min(len));
        match rng.below(6) {
            0 => s.replace_range(a..b, ""),
            1 => s.insert_str(a, TOKENS[rng.below(TOKENS.len())]),
            2 => {
                let chunk = s[a..b].to_string();
                s.insert_str(a, &chunk);
            }
            3 => {
                let c = char::from_u32(rng.below(0x3000) as u32).unwrap_or('?');
                s.insert(a, c);
            }
            4 => {
                let other = CORPUS[rng.below(CORPUS.len())];
                let oa = floor_char(other, rng.below(other.len()));
                let ob = floor_char(other, (oa + rng.below(64)).min(other.len()));
                s.insert_str(a, &other[oa..ob]);
            }
            _ => s.replace_range(a..b, TOKENS[rng.below(TOKENS.len())]),
        }
    }
    s
}

/// Everything downstream of the parser, with the invariants that must hold.
fn exercise(text: &str) {
    let l = common::load(text);
    for d in &l.diagnostics {
        assert!(d.line >= 1 && d.col >= 1, "positions are 1-based: {d:?}");
    }
    let mut agents: Vec<Option<String>> = vec![None];
    agents.extend(l.config.agents.list.iter().map(|a| Some(a.id.clone())));
    for agent in agents {
        for session in ["main", "other"] {
            let Ok(r) = resolve(&l.config, &Request::new(agent.as_deref(), session)) else {
                continue;
            };
            let t = explain_text(&r, None);
            assert_eq!(t.contains("SANDBOXED: NO"), !r.sandboxed, "{t}");
            let j = explain_json(&r, None);
            assert_eq!(j["sandboxed"].as_bool(), Some(r.sandboxed));
            let spec = r.to_spec(vec!["true".into()]);
            if !r.sandboxed {
                assert!(spec.is_err());
            }
            assert!(
                !t.contains("sk-ant-secret-value")
                    && !j.to_string().contains("sk-ant-secret-value")
            );
        }
    }
}

#[test]
fn fuzz_mutated_configs_never_panic() {
    let secs: u64 = std::env::var("NANOCLAW_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut n = 0u64;
    for c in CORPUS {
        exercise(c);
    }
    while Instant::now() < deadline {
        let base = CORPUS[rng.below(CORPUS.len())];
        let input = mutate(&mut rng, base);
        exercise(&input);
        n += 1;
    }
    eprintln!("fuzz: {n} mutated configs in {secs}s, no panic");
    assert!(n > 100);
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [65usize, 1_000, 100_000] {
        let l = common::load(&("a: ".to_string() + &"[".repeat(depth) + &"]".repeat(depth)));
        assert!(l.has_errors());
        let l = common::load(&"{a: ".repeat(depth));
        assert!(l.has_errors());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        exercise(&s);
    }

    #[test]
    fn arbitrary_yamlish_never_panics(parts in prop::collection::vec(prop::sample::select(TOKENS), 0..60)) {
        exercise(&parts.concat());
    }
}
