//! Feeds arbitrary bytes to the config parser, then resolves and explains
//! every agent: nothing may panic, and explain must agree with `sandboxed`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanoclaw_policy::explain::explain_text;
use nanoclaw_policy::{parse_with_process_env, resolve, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let loaded = parse_with_process_env(text);
    let mut agents = vec![None];
    agents.extend(loaded.config.agents.list.iter().map(|a| Some(a.id.clone())));
    for agent in agents {
        for session in ["main", "other"] {
            if let Ok(r) = resolve(&loaded.config, &Request::new(agent.as_deref(), session)) {
                let t = explain_text(&r, None);
                assert_eq!(t.contains("SANDBOXED: NO"), !r.sandboxed);
                let _ = r.to_spec(vec!["true".into()]);
            }
        }
    }
});
