//! Black-box tests of `nanoclaw run --config FILE --agent ID`: a
//! capability gets the same answer from `--cap-add` and from the config's
//! `cap_add`. As the invoking user (root in CI) and rootless as `nanotest`
//! (see `common`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

mod common;
use common::*;

/// A config file readable by the rootless user; removed on drop.
struct Config {
    dir: PathBuf,
}

impl Config {
    fn new(tag: &str, yaml: &str) -> Config {
        let dir =
            std::env::temp_dir().join(format!("nanoclaw-policy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("config dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let file = dir.join("nanoclaw.yaml");
        fs::write(&file, yaml).expect("write config");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod config");
        Config { dir }
    }

    fn path(&self) -> String {
        self.dir.join("nanoclaw.yaml").display().to_string()
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `nanoclaw run --config F --agent A ARGS...`.
fn run_agent(m: Mode, cfg: &Config, agent: &str, args: &[&str]) -> std::process::Output {
    let path = cfg.path();
    let mut a = vec!["run", "--config", path.as_str(), "--agent", agent];
    a.extend_from_slice(args);
    run(m, &a)
}

/// One capability table: a capability the engine grants through
/// `--cap-add` is granted through the config's `security.cap_add`, and one
/// it refuses is refused there with the same message.
#[test]
fn cap_add_gets_the_same_answer_on_the_cli_and_in_the_config() {
    let allowed = Config::new(
        "cap-ok",
        "security:\n  cap_add: [SYS_NICE]\nagents:\n  list:\n    - id: a\n",
    );
    let refused = Config::new(
        "cap-no",
        "security:\n  cap_add: [SYS_ADMIN]\nagents:\n  list:\n    - id: a\n",
    );
    let caps = ["grep", "-E", "^Cap(Eff|Prm|Bnd)", "/proc/self/status"];
    for m in modes("cap_add paths") {
        // Allowed: the same capability sets either way (CAP_SYS_NICE = bit 23).
        let mut cli = vec!["run", "--cap-add", "SYS_NICE", "--"];
        cli.extend_from_slice(&caps);
        let o = run(m, &cli);
        assert_eq!(
            code(&o),
            0,
            "[{}] --cap-add SYS_NICE: {}",
            m.name,
            text(&o.stderr)
        );
        let from_flag = text(&o.stdout);
        assert!(
            from_flag.contains("CapEff:\t0000000000800000"),
            "[{}] {from_flag}",
            m.name
        );
        let mut with_cfg = vec!["--"];
        with_cfg.extend_from_slice(&caps);
        let o = run_agent(m, &allowed, "a", &with_cfg);
        assert_eq!(
            code(&o),
            0,
            "[{}] cap_add: [SYS_NICE] in the config: {}",
            m.name,
            text(&o.stderr)
        );
        assert_eq!(text(&o.stdout), from_flag, "[{}]", m.name);

        // Refused: exit 125 both ways, with the same reason.
        let o = run(m, &["run", "--cap-add", "SYS_ADMIN", "--", "true"]);
        assert_eq!(code(&o), 125, "[{}] {}", m.name, text(&o.stderr));
        let err = text(&o.stderr);
        let msg = err
            .trim()
            .strip_prefix("nanoclaw: ")
            .unwrap_or_else(|| panic!("[{}] one nanoclaw line: {err}", m.name))
            .to_string();
        assert!(
            msg.contains("SYS_ADMIN is refused") && msg.contains("catch-all"),
            "[{}] {msg}",
            m.name
        );
        let o = run_agent(m, &refused, "a", &["--", "true"]);
        assert_eq!(code(&o), 125, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            text(&o.stderr).contains(&msg),
            "[{}] the config path gave another answer: {}\nthe flag's: {msg}",
            m.name,
            text(&o.stderr)
        );
        let path = refused.path();
        let o = run(m, &["config", "validate", "--config", &path]);
        assert_eq!(code(&o), 125, "[{}]", m.name);
        assert!(
            text(&o.stdout).contains(&msg),
            "[{}] validate: {}",
            m.name,
            text(&o.stdout)
        );
    }
}
