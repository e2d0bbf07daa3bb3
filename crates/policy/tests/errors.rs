//! One test per kind of bad input: the exact message, key path, line and
//! column.

mod common;

use common::load;
use nanoclaw_policy::Severity;

/// The only error of `text`: (path, line, col, message).
fn only_error(text: &str) -> (String, usize, usize, String) {
    let l = load(text);
    let errs: Vec<_> = l.errors().collect();
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let e = errs[0];
    (e.path.clone(), e.line, e.col, e.message.clone())
}

fn check(text: &str, path: &str, line: usize, col: usize, message: &str) {
    let got = only_error(text);
    assert_eq!(
        got,
        (path.to_string(), line, col, message.to_string()),
        "\n--- in:\n{text}"
    );
}

#[test]
fn unknown_key_with_suggestion() {
    check(
        "security:\n  memroy_limit: 1g\n",
        "security.memroy_limit",
        2,
        3,
        "unknown key `memroy_limit`; did you mean `memory_limit`?",
    );
    check(
        "agents:\n  defaults:\n    sandbox:\n      workspaceAcess: ro\n",
        "agents.defaults.sandbox.workspaceAcess",
        4,
        7,
        "unknown key `workspaceAcess`; did you mean `workspaceAccess`?",
    );
    // snake_case writers get a snake_case suggestion
    check(
        "agents:\n  defaults:\n    sandbox:\n      workspace_acess: ro\n",
        "agents.defaults.sandbox.workspace_acess",
        4,
        7,
        "unknown key `workspace_acess`; did you mean `workspace_access`?",
    );
    let l = load("securty:\n  timeout: 1s\n");
    let e = l.errors().next().unwrap();
    assert_eq!(e.did_you_mean.as_deref(), Some("security"));
    check(
        "bogus: 1\n",
        "bogus",
        1,
        1,
        "unknown key `bogus`; known keys here: security, execution, llm, agents, tools, session, teams, network, kubernetes",
    );
    // a typo of `defaults` under agents is not silently an agent id
    check("agents:\n  defualts:\n    sandbox: {mode: all}\n", "agents.defualts", 2, 3, "unknown key `defualts`; did you mean `defaults`? (an agent with this id would have to go in agents.list)");
}

#[test]
fn both_spellings_accepted_but_not_twice() {
    let a = load("agents:\n  defaults:\n    sandbox:\n      workspace_access: ro\n      bind_mounts: [\"/data:/data\"]\n      setup_command: x\n");
    assert!(!a.has_errors());
    check(
        "security:\n  memory_limit: 1g\n  memoryLimit: 2g\n",
        "security.memoryLimit",
        3,
        3,
        "`memoryLimit` is set twice (also as `memory_limit` at line 2); keep one",
    );
}

#[test]
fn wrong_types() {
    check(
        "security:\n  memory_limit: [1]\n",
        "security.memory_limit",
        2,
        17,
        "expected a size like 256m or 1g, found a list",
    );
    check(
        "security:\n  read_only: yes\n",
        "security.read_only",
        2,
        14,
        "expected true or false, found \"yes\"",
    );
    check(
        "security: 5\n",
        "security",
        1,
        11,
        "expected a map of settings, found a number",
    );
    check(
        "tools:\n  allow: exec\n",
        "tools.allow",
        2,
        10,
        "expected a list of tool names or group:* shorthands, found a string",
    );
    check(
        "security:\n  pids_limit: 1.5\n",
        "security.pids_limit",
        2,
        15,
        "expected a whole number of processes, e.g. 256, found \"1.5\"",
    );
}

#[test]
fn impossible_values() {
    check("security:\n  memory_limit: 12x\n", "security.memory_limit", 2, 17, "invalid size \"12x\": expected a number with an optional unit b, k, m, g or t (e.g. 256m, 1g)");
    check("security:\n  memory_limit: 1m\n", "security.memory_limit", 2, 17, "memory limit \"1m\" is below the minimum of 4m: not even a shell starts in less; use at least 4m (the default is 512m)");
    for bad in ["0", "-1", ".nan", ".inf"] {
        check(
            &format!("security:\n  cpu_limit: {bad}\n"),
            "security.cpu_limit",
            2,
            14,
            &format!(
                "cpus must be a positive number such as 0.5, 1 or 2 (at most 1024); found {bad:?}"
            ),
        );
    }
    for bad in ["0", "0s", "0ms"] {
        check(
            &format!("security:\n  timeout: {bad}\n"),
            "security.timeout",
            2,
            12,
            "a timeout of 0 would kill every command at once; use a positive duration such as 30s",
        );
    }
    check("security:\n  pids_limit: 0\n", "security.pids_limit", 2, 15, "a pids limit of 0 would forbid even the first process; use at least 1 (the default is 256)");
    check(
        "agents:\n  defaults:\n    sandbox:\n      memory: 1g\n      memorySwap: 512m\n",
        "agents.defaults.sandbox.memorySwap",
        5,
        19,
        "memory swap is memory plus swap (Docker semantics) and must be at least the memory limit; set it equal to the memory limit for no swap",
    );
    check("security:\n  timeout: soon\n", "security.timeout", 2, 12, "invalid duration \"soon\": expected a number with a unit ms, s, m or h (e.g. 500ms, 30s, 2m)");
}

#[test]
fn privileged_is_refused_with_reason() {
    check(
        "security:\n  privileged: true\n",
        "security.privileged",
        2,
        15,
        "privileged: true is not allowed: a privileged sandbox gets every capability, the host's devices and no seccomp filter, so hostile code could take over the host; remove the key (or set it to false) and grant single capabilities with cap_add if a step really needs one",
    );
    assert!(!load("security:\n  privileged: false\n").has_errors());
}

#[test]
fn dangerous_capabilities_and_network() {
    check("security:\n  cap_add: [SYS_ADMIN]\n", "security.cap_add[0]", 2, 13, "capability SYS_ADMIN is refused: CAP_SYS_ADMIN the catch-all capability: mount, namespaces, BPF maps, quotas and much more; it makes most container escapes possible. Nanoclaw never grants it; run the step outside the sandbox if it truly needs it");
    check(
        "security:\n  cap_add: [CHWON]\n",
        "security.cap_add[0]",
        2,
        13,
        "no such capability \"CHWON\"; did you mean CHOWN?; grantable: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_BROADCAST, IPC_LOCK, SYS_CHROOT, SYS_NICE, SYS_RESOURCE, MKNOD, AUDIT_WRITE, SETFCAP",
    );
    let l = load("security:\n  cap_add: [CHWON]\n");
    let e = l.errors().next().expect("an error");
    assert_eq!(e.did_you_mean.as_deref(), Some("CHOWN"));
    check("security:\n  network_mode: host\n", "security.network_mode", 2, 17, "network \"host\" would share the host's network stack with sandboxed code and is refused; use open for full egress or allowlist with allowedHosts");
    check("security:\n  network_mode: nonee\n", "security.network_mode", 2, 17, "invalid value \"nonee\": expected one of none, allowlist, open, bridge; did you mean `none`?");
    check("security:\n  allowed_hosts: [\"https://api.anthropic.com\"]\n", "security.allowed_hosts[0]", 2, 19, "allowed host \"https://api.anthropic.com\" must be a host name (optionally *.domain and :port), without scheme or path, e.g. api.anthropic.com");
}

#[test]
fn bad_enum_values_suggest() {
    check(
        "agents:\n  defaults:\n    sandbox:\n      mode: nonmain\n",
        "agents.defaults.sandbox.mode",
        4,
        13,
        "invalid value \"nonmain\": expected one of off, non-main, all; did you mean `non-main`?",
    );
    check("tools:\n  deny: [\"group:file\"]\n", "tools.deny[0]", 2, 10, "unknown tool group \"group:file\" (did you mean `group:fs`?); known groups: group:runtime, group:fs, group:sessions, group:memory, group:web, group:ui, group:automation, group:messaging, group:nodes, group:openclaw, group:*");
}

fn bind(src: &str) -> String {
    format!("agents:\n  defaults:\n    sandbox:\n      bindMounts:\n        - \"{src}\"\n")
}

const HINT: &str = "sandboxed code could read or change it. Mount a narrower folder, or set dangerouslyAllowUnsafeBinds: true in this sandbox section if you really mean it";

#[test]
fn dangerous_bind_sources() {
    let p = "agents.defaults.sandbox.bindMounts[0]";
    let cases = [
        ("/etc:/host-etc:ro", "bind mount source /etc is a dangerous host path: /etc is the host's configuration, including password hashes; "),
        ("/:/host", "bind mount source / is a dangerous host path: / is the host's whole filesystem; "),
        ("/proc:/p", "bind mount source /proc is a dangerous host path: /proc is the host's processes and kernel interfaces; "),
        // symlinked socket path: /var/run -> /run
        ("/var/run/docker.sock:/var/run/docker.sock", "bind mount source /var/run/docker.sock (it resolves to /run/docker.sock) is a dangerous host path: /run/docker.sock is the Docker socket, which is root on the host; "),
        // a parent of the socket
        ("/run:/r", "bind mount source /run is a dangerous host path: it contains /run/docker.sock (the Docker socket, which is root on the host); "),
        // an innocent-looking symlink to /etc
        ("/srv/innocent:/x", "bind mount source /srv/innocent (it resolves to /etc) is a dangerous host path: /etc is the host's configuration, including password hashes; "),
        // `..` does not bypass
        ("/home/user/data/../.ssh:/k", "bind mount source /home/user/data/../.ssh (it resolves to /home/user/.ssh) is a dangerous host path: /home/user/.ssh is SSH keys; "),
        ("~/.ssh:/k", "bind mount source /home/user/.ssh is a dangerous host path: /home/user/.ssh is SSH keys; "),
        ("/home:/h", "bind mount source /home is a dangerous host path: it contains /home/user/.ssh (SSH keys); "),
        ("/root:/r", "bind mount source /root is a dangerous host path: it contains /root/.ssh (SSH keys); "),
        ("/srv/app/.env:/app/.env", "bind mount source /srv/app/.env is a dangerous host path: it is a .env file, which holds secrets; "),
        ("/srv/app:/app", "bind mount source /srv/app is a dangerous host path: it contains /srv/app/.env (a .env file, which holds secrets); "),
    ];
    for (src, msg) in cases {
        check(&bind(src), p, 5, 11, &format!("{msg}{HINT}"));
    }
}

#[test]
fn dangerous_bind_allowed_explicitly_with_warning() {
    let text = "agents:\n  defaults:\n    sandbox:\n      dangerouslyAllowUnsafeBinds: true\n      bindMounts: [\"/etc:/host-etc:ro\"]\n";
    let l = load(text);
    assert!(!l.has_errors());
    let w: Vec<String> = l.warnings().map(|d| d.to_string()).collect();
    assert_eq!(
        w,
        [
            "4:36: warning: agents.defaults.sandbox.dangerouslyAllowUnsafeBinds: dangerous bind mounts are allowed in this sandbox section: remove this key unless you really mean it",
            "5:20: warning: agents.defaults.sandbox.bindMounts[0]: dangerous bind mount source /etc allowed by dangerouslyAllowUnsafeBinds: /etc is the host's configuration, including password hashes",
        ]
    );
}

#[test]
fn bind_targets_and_missing_sources() {
    let p = "agents.defaults.sandbox.bindMounts[0]";
    check(&bind("/data:/proc"), p, 5, 11, "bind mount target /proc would shadow the sandbox's /proc, which must stay nanoclaw's own; choose a target such as /data or /mnt/NAME");
    check(&bind("/data:/etc/passwd"), p, 5, 11, "bind mount target /etc/passwd would shadow the sandbox's /etc, which must stay nanoclaw's own; choose a target such as /data or /mnt/NAME");
    check(&bind("/data:/x/../dev"), p, 5, 11, "bind mount target /dev would shadow the sandbox's /dev, which must stay nanoclaw's own; choose a target such as /data or /mnt/NAME");
    check(&bind("/data:/"), p, 5, 11, "bind mount target / would replace the sandbox's whole root; choose a target such as /data or /mnt/NAME");
    check(
        &bind("/nope:/data"),
        p,
        5,
        11,
        "bind mount source /nope does not exist on this host; create it or fix the path",
    );
    check(&bind("data:/data"), p, 5, 11, "bind mount \"data:/data\" must look like HOST:CONTAINER[:ro|rw] with absolute paths, e.g. /home/user/data:/data:ro");
    check(
        &bind("/data:/data:rx"),
        p,
        5,
        11,
        "bind mount \"/data:/data:rx\" has mode \"rx\": the mode must be ro or rw",
    );
}

#[test]
fn env_interpolation_errors() {
    check("llm:\n  api_key: ${NOPE_NOT_SET}\n", "llm.api_key", 2, 12, "environment variable NOPE_NOT_SET is not set (referenced as ${NOPE_NOT_SET}); export it, or use ${NOPE_NOT_SET:-default}");
    check("llm:\n  model: \"${oops\"\n", "llm.model", 2, 10, "bad variable reference \"${oops\": write ${NAME} with NAME made of letters, digits and _ (use $${ for a literal ${)");
    // interpolated values are typed after expansion
    let l = load("security:\n  memory_limit: ${MEM}\n");
    assert!(!l.has_errors());
    assert_eq!(l.config.security.memory_limit, Some(1 << 30));
}

#[test]
fn syntax_errors_have_positions() {
    let (path, line, col, msg) = only_error("security:\n  memory_limit: [1g\n");
    assert_eq!(path, "");
    assert_eq!((line, col), (3, 1));
    assert!(msg.starts_with("not valid YAML or JSON: "), "{msg}");
    let (_, line, _, _) = only_error("{\n  \"agents\": {\n    \"x\": 1,,\n  }\n}\n");
    assert_eq!(line, 3);
    let (_, _, _, msg) = only_error("a: &x 1\nb: *x\n");
    assert_eq!(
        msg,
        "YAML aliases (*name) are not supported in nanoclaw.yaml: write the value out"
    );
}

#[test]
fn all_errors_reported_at_once() {
    let text = "\
security:
  memory_limit: 1m
  cpu_limit: 0
  privileged: true
  timeout: 0
agents:
  list:
    - id: a
      sandbox:
        mode: sometimes
        bindMounts: [\"/etc:/e\", \"/data:/proc\"]
      tools:
        alow: [exec]
";
    let l = load(text);
    let errs: Vec<String> = l
        .errors()
        .map(|d| format!("{}:{} {}", d.line, d.col, d.path))
        .collect();
    assert_eq!(
        errs,
        [
            "2:17 security.memory_limit",
            "3:14 security.cpu_limit",
            "4:15 security.privileged",
            "5:12 security.timeout",
            "10:15 agents.list[0].sandbox.mode",
            "11:22 agents.list[0].sandbox.bindMounts[0]",
            "11:33 agents.list[0].sandbox.bindMounts[1]",
            "13:9 agents.list[0].tools.alow",
        ]
    );
    assert!(l
        .diagnostics
        .iter()
        .all(|d| d.severity == Severity::Error || d.severity == Severity::Warning));
}

#[test]
fn agent_ids() {
    check(
        "agents:\n  list:\n    - sandbox: {mode: all}\n",
        "agents.list[0]",
        3,
        7,
        "agent entry has no id; add id: NAME",
    );
    check(
        "agents:\n  list:\n    - id: a\n    - id: a\n",
        "agents.list[1]",
        4,
        7,
        "agent id \"a\" is defined twice; ids must be unique",
    );
    check("agents:\n  list:\n    - id: \"bad id\"\n", "agents.list[0]", 3, 11, "agent id \"bad id\" must be 1-64 letters, digits, _, . or - and start with a letter or digit");
}

#[test]
fn json_is_accepted_with_positions() {
    check("{\n  \"security\": {\n    \"memory_limit\": \"1m\"\n  }\n}\n", "security.memory_limit", 3, 21, "memory limit \"1m\" is below the minimum of 4m: not even a shell starts in less; use at least 4m (the default is 512m)");
}

/// On the real filesystem: a symlink to /etc and a `..` path are caught
/// after canonicalisation.
#[test]
fn real_symlink_and_dotdot_do_not_bypass() {
    use nanoclaw_policy::binds::RealFs;
    use nanoclaw_policy::decode::DecodeEnv;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("innocent");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let fs = RealFs { home: None };
    let env = |_: &str| None;
    for src in [
        link.display().to_string(),
        format!("{}/sub/../innocent", dir.path().display()),
    ] {
        let l = nanoclaw_policy::parse(
            &bind(&format!("{src}:/x")),
            DecodeEnv {
                env: &env,
                fs: &fs,
                home: None,
            },
        );
        let e: Vec<String> = l.errors().map(|d| d.message.clone()).collect();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(&format!("bind mount source {src} (it resolves to /etc) is a dangerous host path: /etc is the host's configuration")),
            "{e:?}"
        );
    }
    // a plain folder of our own is fine
    let ok = dir.path().join("sub");
    let l = nanoclaw_policy::parse(
        &bind(&format!("{}:/data:rw", ok.display())),
        DecodeEnv {
            env: &env,
            fs: &fs,
            home: None,
        },
    );
    assert!(!l.has_errors(), "{:?}", l.diagnostics);
}

/// `security.cap_add` gets the engine's answer (`--cap-add`), name for
/// name: one capability table decides both.
#[test]
fn cap_add_answers_like_the_engine() {
    use nanoclaw_sandbox::native::caps;
    let mut names: Vec<String> = (0..=caps::LAST_KNOWN_CAP)
        .map(|i| caps::names(1u64 << i)[0].clone())
        .collect();
    names.extend(["sys_nice", "SYS_ADMIN", "all", "CHWON", "frobnicate"].map(String::from));
    for name in names {
        let l = load(&format!("security:\n  cap_add: [{name}]\n"));
        let errs: Vec<_> = l.errors().collect();
        match caps::parse_cap(&name) {
            Ok(cap) => {
                assert!(
                    errs.is_empty(),
                    "{name}: the engine grants it, the config refuses: {errs:?}"
                );
                assert_eq!(l.config.security.cap_add, [cap.name()], "{name}");
            }
            Err(e) => {
                assert_eq!(
                    errs.len(),
                    1,
                    "{name}: the engine refuses it ({e}), the config: {errs:?}"
                );
                assert_eq!(errs[0].message, e.to_string(), "{name}");
            }
        }
    }
    // cap_drop accepts every capability the kernel knows, and ALL.
    let l = load("security:\n  cap_drop: [ALL, cap_sys_admin, sys_nice]\n  cap_add: [SYS_NICE]\n");
    assert!(!l.has_errors(), "{:?}", l.diagnostics);
    assert_eq!(l.config.security.cap_drop, ["ALL", "SYS_ADMIN", "SYS_NICE"]);
    assert!(load("security:\n  cap_drop: [CHWON]\n").has_errors());
}
