//! Black-box tests of `nanoclaw run` (issue 2): every option, the exit
//! codes, --json, the limits, cleanup. Each scenario runs as the invoking
//! user (root in CI) and rootless as user `nanotest` (uid 1500, created by
//! CI; skipped with a message when missing, unless
//! NANOCLAW_REQUIRE_ROOTLESS=1).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::*;

/// Leak checks take this for writing; every other test for reading, so the
/// before/after snapshots see no other test's sandboxes.
static SERIAL: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    SERIAL.write().unwrap_or_else(|e| e.into_inner())
}

#[track_caller]
fn ok_out(mode: Mode, args: &[&str]) -> String {
    let o = run(mode, args);
    assert_eq!(
        code(&o),
        0,
        "[{}] nanoclaw {args:?}: exit {:?}, stderr: {}",
        mode.name,
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

#[track_caller]
fn json(mode: Mode, args: &[&str]) -> Value {
    let mut a = vec!["run", "--json"];
    a.extend_from_slice(args);
    let o = run(mode, &a);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "[{}] nanoclaw {a:?}: stdout is not one JSON object ({e}): {} / stderr {}",
            mode.name,
            text(&o.stdout),
            text(&o.stderr)
        )
    })
}

fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("nct-{tag}-{}-{n}-{}", std::process::id(), t % 1_000_000_007)
}

/// Host pids whose command line contains `needle`.
///
/// A process in the middle of `execve` shows an empty command line for a
/// moment (the new image's argv is not set up yet), so one empty scan does
/// not prove a process is gone: see `wait_gone`.
fn pids_with(needle: &str) -> Vec<i32> {
    commands_with(needle).into_iter().map(|(p, _)| p).collect()
}

/// (pid, argv\0-joined) of the host processes whose command line contains `needle`.
fn commands_with(needle: &str) -> Vec<(i32, Vec<u8>)> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                v.push((pid, c));
            }
        }
    }
    v
}

/// Waits up to `secs` for the sandboxed command itself (a process whose
/// argv[0] is `argv0` and whose command line carries `needle`) to run `count`
/// times; the runner's own command line, which also carries `needle`, does
/// not count. Panics with `what` when it never does.
fn wait_payload(needle: &str, argv0: &str, count: usize, secs: u64, what: &str) {
    let prefix = format!("{argv0}\0");
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = commands_with(needle)
            .iter()
            .filter(|(_, c)| c.starts_with(prefix.as_bytes()))
            .count();
        if n >= count {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: the sandboxed command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `secs` for no host process to carry `needle`; returns the
/// survivors. "None" must hold for two scans 50 ms apart, so a process caught
/// mid-exec (an empty command line) is not mistaken for a gone one.
fn wait_gone(needle: &str, secs: u64) -> Vec<i32> {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut empty_before = false;
    loop {
        let left = pids_with(needle);
        if left.is_empty() && empty_before {
            return left;
        }
        if Instant::now() > end {
            return left;
        }
        empty_before = left.is_empty();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A spawned nanoclaw that is SIGKILLed and reaped if the test panics before
/// it is done with it, so a failed test leaves no sandbox running into the
/// next test's leak check.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn kill_all(pids: &[i32]) {
    for &p in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// A host dir the sandbox user (whatever it maps to) can use. As root it is
/// handed to an unprivileged owner (`nanotest` if it exists), the common
/// case (a root-owned one is tested on its own).
fn host_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(tag));
    fs::create_dir_all(&d).expect("mkdir");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    if is_root() {
        let (uid, gid) = rootless_user().unwrap_or((1_073_742_824, 1_073_742_824));
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).expect("chown host dir");
    }
    d
}

/// Hostile code on a rootful read-write mount of a root-owned directory
/// (what `mktemp -d` gives root): it may write there (as the host's root),
/// but every way to create a set-user/group-ID file or a file capability is
/// refused, raw syscalls included; a directory that already holds a setuid
/// program (which a shared mmap could rewrite keeping the bit) is refused.
const SETID_ATTACK: &str = r#"
import ctypes, os, sys
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *a):
    r = libc.syscall(nr, *a)
    return "ok" if r >= 0 else "errno %d" % ctypes.get_errno()
res = {}
with open(d + "/plain", "w") as f:
    f.write("hi")
p = (d + "/plain").encode()
res["chmod"] = raw(90, p, 0o4755)
res["fchmodat"] = raw(268, -100, p, 0o2755)
res["fchmodat2"] = raw(452, -100, p, 0o6755, 0)
fd = os.open(d + "/plain", os.O_RDONLY)
res["fchmod"] = raw(91, fd, 0o4755)
res["open"] = raw(2, (d + "/o").encode(), os.O_CREAT | os.O_WRONLY, 0o4755)
res["openat"] = raw(257, -100, (d + "/oa").encode(), os.O_CREAT | os.O_WRONLY, 0o2755)
res["creat"] = raw(85, (d + "/c").encode(), 0o6755)
res["mknod"] = raw(133, (d + "/n").encode(), 0o104755, 0)
res["mknodat"] = raw(259, -100, (d + "/na").encode(), 0o102755, 0)
res["tmpfile"] = raw(257, -100, d.encode(), os.O_TMPFILE | os.O_WRONLY, 0o4755)
res["openat2"] = raw(437, -100, (d + "/o2").encode(), ctypes.create_string_buffer(24), 24)
# A v3 file capability (DAC_OVERRIDE, SETUID, SETGID) for the sandbox's root.
cap = (0x03000001).to_bytes(4, "little") + (0xc2).to_bytes(4, "little") + bytes(12) + (1000).to_bytes(4, "little")
try:
    os.setxattr(d + "/plain", "security.capability", cap)
    res["setfcap"] = "ok"
except OSError as e:
    res["setfcap"] = "errno %d" % e.errno
os.chmod(d + "/plain", 0o755)
res["plain_chmod"] = "ok"
print(res)
"#;

#[test]
fn rootful_rw_mount_of_a_root_owned_dir_plants_no_setid_file() {
    let _g = shared();
    if !is_root() {
        eprintln!("SKIPPED rootful_rw_mount_of_a_root_owned_dir_plants_no_setid_file: needs root");
        return;
    }
    let d = std::env::temp_dir().join(unique("rootowned"));
    fs::create_dir_all(&d).expect("mkdir");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).expect("chmod");
    let w = d.to_str().expect("utf-8");
    let root_mode = Mode {
        name: "root",
        user: None,
    };
    // A directory that already holds a set-id or file-capability program
    // is refused, naming it.
    fs::create_dir_all(d.join("sub")).expect("mkdir");
    fs::copy("/bin/true", d.join("sub/victim")).expect("copy");
    for (mode, xattr) in [(0o4755, false), (0o2755, false), (0o755, true)] {
        fs::set_permissions(d.join("sub/victim"), fs::Permissions::from_mode(mode)).expect("chmod");
        if xattr {
            let cap: Vec<u8> = [0x0200_0001u32, 0xc2, 0, 0, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let p = std::ffi::CString::new(format!("{w}/sub/victim")).expect("path");
            // SAFETY: NUL-terminated strings and a buffer of cap.len() bytes.
            let r = unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    c"security.capability".as_ptr(),
                    cap.as_ptr().cast(),
                    cap.len(),
                    0,
                )
            };
            assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
        }
        let o = run(
            root_mode,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "rw",
                "--",
                "true",
            ],
        );
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "mode {mode:o} xattr {xattr}: {err}");
        assert!(err.contains("sub/victim"), "names the file: {err}");
    }
    fs::remove_dir_all(d.join("sub")).expect("rm");
    for (args, inside) in [
        (
            vec!["run", "--workspace", w, "--workspace-access", "rw", "--"],
            "/workspace",
        ),
        (
            vec!["run", "--mount", &format!("{w}:/data:rw"), "--"],
            "/data",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["python3", "-c", SETID_ATTACK, inside]);
        let out = ok_out(root_mode, &a);
        for (call, want) in [
            ("chmod", "errno 1"),
            ("fchmodat", "errno 1"),
            ("fchmodat2", "errno 1"),
            ("fchmod", "errno 1"),
            ("open", "errno 1"),
            ("openat", "errno 1"),
            ("creat", "errno 1"),
            ("mknod", "errno 1"),
            ("mknodat", "errno 1"),
            ("tmpfile", "errno 1"),
            ("openat2", "errno 38"),
            ("setfcap", "errno 1"),
            ("plain_chmod", "ok"),
        ] {
            assert!(
                out.contains(&format!("'{call}': '{want}'")),
                "{args:?}: {call} should give {want}: {out}"
            );
        }
        // What the sandbox wrote is root's on the host; nothing is set-id.
        let md = fs::metadata(d.join("plain")).expect("written file");
        assert_eq!((md.uid(), md.gid()), (0, 0), "{args:?}");
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let mode = e.metadata().expect("metadata").mode();
            assert_eq!(
                mode & 0o6000,
                0,
                "{args:?}: {} is set-id on the host ({mode:o}): {out}",
                e.path().display()
            );
        }
        let has_caps = |p: &Path| {
            let p = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
            // SAFETY: NUL-terminated strings; size 0 only asks for the size.
            unsafe {
                libc::getxattr(
                    p.as_ptr(),
                    c"security.capability".as_ptr(),
                    std::ptr::null_mut(),
                    0,
                )
            }
        };
        assert!(
            has_caps(&d.join("plain")) < 0,
            "{args:?}: a file capability reached the host"
        );
    }
    // An unprivileged owner's directory (idmapped to that owner): no set-id
    // files either.
    let theirs = host_dir("theirs");
    let o = run(
        root_mode,
        &[
            "run",
            "--mount",
            &format!("{}:/t:rw", theirs.display()),
            "--",
            "sh",
            "-c",
            "touch /t/f && chmod 4755 /t/f; chmod 2755 /t/f; echo done",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let mode = fs::metadata(theirs.join("f")).expect("f").mode();
    assert_eq!(
        mode & 0o6000,
        0,
        "set-id file on an idmapped mount: {mode:o}"
    );
    let _ = fs::remove_dir_all(&theirs);
    // Without the default seccomp profile, or with CAP_FSETID or CAP_SETFCAP: refused.
    for extra in [
        ["--seccomp", "unconfined"],
        ["--cap-add", "FSETID"],
        ["--cap-add", "SETFCAP"],
    ] {
        let mut a = vec!["run", extra[0], extra[1]];
        a.extend(["--workspace", w, "--workspace-access", "rw", "--", "true"]);
        let o = run(root_mode, &a);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "{a:?}: {err}");
        assert!(
            err.lines()
                .any(|l| l.contains("owned by root") && l.contains("chown")),
            "{a:?}: {err}"
        );
    }
    // Read-only is fine, and host permissions still apply inside.
    fs::write(d.join("secret"), "s").expect("write");
    fs::set_permissions(d.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let o = run(
        root_mode,
        &[
            "run",
            "--mount",
            &format!("{w}:/data:ro"),
            "--",
            "cat",
            "/data/secret",
        ],
    );
    assert_ne!(
        code(&o),
        0,
        "a 0600 root file was readable through a ro mount"
    );
    let _ = fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------- exit codes

#[test]
fn exit_codes() {
    let _g = shared();
    for m in modes("exit_codes") {
        let o = run(m, &["run", "--", "sh", "-c", "exit 7"]);
        assert_eq!(code(&o), 7, "[{}] own exit code", m.name);
        let o = run(m, &["run", "--", "sh", "-c", "kill -TERM $$"]);
        assert_eq!(code(&o), 128 + 15, "[{}] killed by SIGTERM: 143", m.name);
        let o = run(m, &["run", "--", "sh", "-c", "kill -KILL $$"]);
        assert_eq!(code(&o), 137, "[{}] killed by SIGKILL: 137", m.name);
        let t = Instant::now();
        let o = run(m, &["run", "--timeout", "500ms", "--", "sleep", "30"]);
        assert_eq!(
            code(&o),
            124,
            "[{}] timeout: 124 ({})",
            m.name,
            text(&o.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "[{}] timeout took {:?}",
            m.name,
            t.elapsed()
        );
        let o = run(m, &["run", "--", "/etc/passwd"]);
        assert_eq!(
            code(&o),
            126,
            "[{}] not executable: 126 ({})",
            m.name,
            text(&o.stderr)
        );
        let o = run(m, &["run", "--", "nct-no-such-command-xyz"]);
        assert_eq!(
            code(&o),
            127,
            "[{}] not found: 127 ({})",
            m.name,
            text(&o.stderr)
        );
        for bad in [
            &["run", "--no-such-flag", "--", "true"][..],
            &["run", "--memory", "lots", "--", "true"],
            &["run", "--timeout", "soon", "--", "true"],
            &["run", "--workspace-access", "maybe", "--", "true"],
            &["run", "--user", "root:x", "--", "true"],
            &["run", "--lang", "cobol", "--code", "x"],
            &["run", "--mount", "/nonexistent-nct:/x", "--", "true"],
            &["run", "--workdir", "/nonexistent-nct", "--", "true"],
            &["run", "--cpus", "-1", "--", "true"],
            &["run", "--cpus", "0.001", "--", "true"],
        ] {
            let o = run(m, bad);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{}] {bad:?}: 125 (stderr {err})", m.name);
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "[{}] {bad:?}: exactly one line on stderr, got {err:?}",
                m.name
            );
            assert!(
                err.len() > 10,
                "[{}] {bad:?}: an explanation on stderr",
                m.name
            );
        }
    }
}

// ---------------------------------------------------------------- --json

#[test]
fn json_fields() {
    let _g = shared();
    for m in modes("json_fields") {
        let v = json(m, &["--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(v["exit_code"], 3, "[{}] {v}", m.name);
        assert!(v["signal"].is_null(), "[{}] {v}", m.name);
        assert!(v["killed_by"].is_null(), "[{}] {v}", m.name);
        assert_eq!(v["stdout"], "out\n");
        assert_eq!(v["stderr"], "err\n");
        assert_eq!(v["stdout_truncated"], false);
        assert_eq!(v["stderr_truncated"], false);
        for k in ["duration_ms", "cpu_ms", "peak_memory_bytes"] {
            assert!(v[k].is_u64(), "[{}] {k} must be a number: {v}", m.name);
        }
        assert!(
            v["peak_memory_bytes"].as_u64().unwrap_or(0) > 0,
            "[{}] peak memory measured: {v}",
            m.name
        );
        assert!(
            v["sandbox_id"].as_str().is_some_and(|s| !s.is_empty()),
            "[{}] sandbox_id: {v}",
            m.name
        );
        assert!(!v["layers"].is_null(), "[{}] layers reported: {v}", m.name);
        let v = json(m, &["--", "sh", "-c", "kill -KILL $$"]);
        assert_eq!(v["signal"], 9, "[{}] signal: {v}", m.name);
        let v = json(m, &["--timeout", "300ms", "--", "sleep", "10"]);
        assert_eq!(v["killed_by"], "timeout", "[{}] {v}", m.name);
        let a = json(m, &["--", "true"]);
        let b = json(m, &["--", "true"]);
        assert_ne!(
            a["sandbox_id"], b["sandbox_id"],
            "[{}] sandbox ids are unique",
            m.name
        );
    }
}

// ---------------------------------------------------------------- environment

#[test]
fn environment_is_not_inherited_and_sane() {
    let _g = shared();
    for m in modes("environment") {
        let secret = unique("env-secret");
        let o = nc(m, &["run", "--", "env"])
            .env("NANOCLAW_TEST_SECRET", &secret)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .output()
            .expect("spawn");
        let env = text(&o.stdout);
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            !env.contains(&secret) && !env.contains("NANOCLAW_TEST_SECRET"),
            "[{}] host env leaked: {env}",
            m.name
        );
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        let path = get("PATH").unwrap_or_default();
        assert!(
            path.split(':').any(|p| p == "/usr/bin") && path.split(':').any(|p| p == "/bin"),
            "[{}] PATH {path:?}",
            m.name
        );
        let home = get("HOME").unwrap_or_default();
        assert!(home.starts_with('/'), "[{}] HOME {home:?}", m.name);
        assert!(
            get("LANG").is_some_and(|l| !l.is_empty()),
            "[{}] LANG missing: {env}",
            m.name
        );
        let out = ok_out(
            m,
            &["run", "--", "sh", "-c", "test -d \"$HOME\" && echo home-ok"],
        );
        assert_eq!(out.trim(), "home-ok", "[{}] HOME exists", m.name);
        let out = ok_out(
            m,
            &[
                "run",
                "--env",
                "FOO=bar baz",
                "--env",
                "X=1=2",
                "--",
                "sh",
                "-c",
                "echo \"$FOO|$X\"",
            ],
        );
        assert_eq!(out.trim(), "bar baz|1=2", "[{}] --env", m.name);
    }
}

// ---------------------------------------------------------------- options

#[test]
fn workdir_and_user() {
    let _g = shared();
    for m in modes("workdir_and_user") {
        assert_eq!(
            ok_out(m, &["run", "--workdir", "/tmp", "--", "pwd"]).trim(),
            "/tmp",
            "[{}]",
            m.name
        );
        assert_eq!(
            ok_out(m, &["run", "--", "sh", "-c", "echo $(id -u):$(id -g)"]).trim(),
            "1000:1000",
            "[{}] default user",
            m.name
        );
        assert_eq!(
            ok_out(
                m,
                &[
                    "run",
                    "--user",
                    "1234:2345",
                    "--",
                    "sh",
                    "-c",
                    "echo $(id -u):$(id -g)"
                ]
            )
            .trim(),
            "1234:2345",
            "[{}]",
            m.name
        );
        assert_eq!(
            ok_out(m, &["run", "--user", "4321", "--", "id", "-u"]).trim(),
            "4321",
            "[{}]",
            m.name
        );
        // Names (and $USER) as a user expects them.
        for (user, want) in [
            ("0", "root root root"),
            ("1000", "sandbox sandbox sandbox"),
            ("65534:65534", "nobody nobody nogroup"),
        ] {
            let o = ok_out(
                m,
                &[
                    "run",
                    "--user",
                    user,
                    "--",
                    "sh",
                    "-c",
                    "echo $USER $(id -un) $(id -gn)",
                ],
            );
            assert_eq!(o.trim(), want, "[{}] --user {user}", m.name);
        }
    }
}

#[test]
fn stdin_forwarding() {
    let _g = shared();
    for m in modes("stdin") {
        let mut c = nc(m, &["run", "--stdin", "--", "sh", "-c", "tr a-z A-Z"]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut ch = c.spawn().expect("spawn");
        ch.stdin
            .take()
            .expect("stdin")
            .write_all(b"hello sandbox\n")
            .expect("write stdin");
        let o = ch.wait_with_output().expect("wait");
        assert_eq!(
            text(&o.stdout),
            "HELLO SANDBOX\n",
            "[{}] --stdin: {}",
            m.name,
            text(&o.stderr)
        );
        // Without --stdin: /dev/null, even though our stdin is an open pipe that never ends.
        let mut c = nc(
            m,
            &["run", "--timeout", "10s", "--", "sh", "-c", "cat; echo eof"],
        );
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ch = c.spawn().expect("spawn");
        let o = ch.wait_with_output_keep_stdin();
        assert_eq!(
            text(&o.stdout),
            "eof\n",
            "[{}] default stdin is /dev/null",
            m.name
        );
    }
}

/// wait_with_output, but stdin (a pipe) stays open until the child exits.
trait KeepStdin {
    fn wait_with_output_keep_stdin(self) -> Output;
}

impl KeepStdin for Child {
    fn wait_with_output_keep_stdin(mut self) -> Output {
        let stdin = self.stdin.take();
        let o = self.wait_with_output().expect("wait");
        drop(stdin);
        o
    }
}

#[test]
fn workspace_access() {
    let _g = shared();
    for m in modes("workspace") {
        let ws = host_dir("ws");
        fs::write(ws.join("input.txt"), "from-host\n").expect("write");
        fs::set_permissions(ws.join("input.txt"), fs::Permissions::from_mode(0o666))
            .expect("chmod");
        let w = ws.to_str().expect("utf-8");
        // none (default): no /workspace content.
        let o = run(
            m,
            &["run", "--workspace", w, "--", "cat", "/workspace/input.txt"],
        );
        assert_ne!(
            code(&o),
            0,
            "[{}] default access is none: {}",
            m.name,
            text(&o.stdout)
        );
        // ro: readable, not writable.
        let out = ok_out(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "ro",
                "--",
                "cat",
                "/workspace/input.txt",
            ],
        );
        assert_eq!(out, "from-host\n", "[{}] ro read", m.name);
        let o = run(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "ro",
                "--",
                "sh",
                "-c",
                "echo x > /workspace/new.txt",
            ],
        );
        assert_ne!(code(&o), 0, "[{}] ro write must fail", m.name);
        assert!(
            !ws.join("new.txt").exists(),
            "[{}] ro write reached the host",
            m.name
        );
        // rw: writes land on the host.
        ok_out(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "rw",
                "--",
                "sh",
                "-c",
                "echo made-inside > /workspace/new.txt",
            ],
        );
        assert_eq!(
            fs::read_to_string(ws.join("new.txt")).unwrap_or_default(),
            "made-inside\n",
            "[{}] rw write",
            m.name
        );
        let _ = fs::remove_dir_all(&ws);
    }
}

#[test]
fn bind_mounts() {
    let _g = shared();
    for m in modes("mounts") {
        let d = host_dir("mnt");
        fs::write(d.join("f"), "mounted\n").expect("write");
        fs::set_permissions(d.join("f"), fs::Permissions::from_mode(0o666)).expect("chmod");
        let spec_ro = format!("{}:/mnt/data", d.display());
        assert_eq!(
            ok_out(m, &["run", "--mount", &spec_ro, "--", "cat", "/mnt/data/f"]),
            "mounted\n",
            "[{}]",
            m.name
        );
        let o = run(
            m,
            &[
                "run",
                "--mount",
                &spec_ro,
                "--",
                "sh",
                "-c",
                "echo x > /mnt/data/g",
            ],
        );
        assert_ne!(code(&o), 0, "[{}] default mount is ro", m.name);
        let o = run(
            m,
            &[
                "run",
                "--mount",
                &format!("{spec_ro}:ro"),
                "--",
                "sh",
                "-c",
                "echo x > /mnt/data/g",
            ],
        );
        assert_ne!(code(&o), 0, "[{}] :ro mount", m.name);
        ok_out(
            m,
            &[
                "run",
                "--mount",
                &format!("{spec_ro}:rw"),
                "--",
                "sh",
                "-c",
                "echo rw > /mnt/data/g",
            ],
        );
        assert_eq!(
            fs::read_to_string(d.join("g")).unwrap_or_default(),
            "rw\n",
            "[{}] :rw mount",
            m.name
        );
        let _ = fs::remove_dir_all(&d);
    }
}

#[test]
fn languages() {
    let _g = shared();
    for m in modes("languages") {
        let cases: &[(&str, &str)] = &[
            ("python", "print(6*7)"),
            ("node", "console.log(6*7)"),
            ("bash", "echo $((6*7))"),
            ("sh", "echo $((6*7))"),
        ];
        for (lang, code_) in cases {
            if *lang == "node" && !Path::new("/usr/bin/node").exists() {
                eprintln!("SKIPPED node: /usr/bin/node not on this host");
                continue;
            }
            assert_eq!(
                ok_out(m, &["run", "--lang", lang, "--code", code_]).trim(),
                "42",
                "[{}] --lang {lang} --code",
                m.name
            );
            let f = host_dir("lang").join("snippet");
            fs::write(&f, code_).expect("write snippet");
            fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
            let fp = f.to_str().expect("utf-8");
            assert_eq!(
                ok_out(m, &["run", "--lang", lang, "--file", fp]).trim(),
                "42",
                "[{}] --lang {lang} --file",
                m.name
            );
            let _ = fs::remove_dir_all(f.parent().expect("parent"));
        }
    }
}

#[test]
fn tmpfs_size() {
    let _g = shared();
    for m in modes("tmpfs_size") {
        ok_out(
            m,
            &[
                "run",
                "--tmpfs-size",
                "16m",
                "--",
                "sh",
                "-c",
                "head -c 8000000 /dev/zero > /tmp/a",
            ],
        );
        let o = run(
            m,
            &[
                "run",
                "--tmpfs-size",
                "16m",
                "--",
                "sh",
                "-c",
                "head -c 40000000 /dev/zero > /tmp/a",
            ],
        );
        assert_ne!(code(&o), 0, "[{}] 40 MB into a 16m /tmp must fail", m.name);
        assert!(
            text(&o.stderr).contains("No space"),
            "[{}] ENOSPC expected: {}",
            m.name,
            text(&o.stderr)
        );
    }
}

// ---------------------------------------------------------------- limits

const HOG: &str = "import sys\nb=[]\nfor i in range(int(sys.argv[1])):\n    x=bytearray(1<<20)\n    x[::4096]=b'\\1'*256\n    b.append(x)\nprint('survived', len(b))";

#[test]
fn memory_limit_oom() {
    let _g = shared();
    for m in modes("memory_limit") {
        let out = ok_out(
            m,
            &["run", "--memory", "128m", "--", "python3", "-c", HOG, "32"],
        );
        assert_eq!(
            out.trim(),
            "survived 32",
            "[{}] 32 MiB fits in 128m",
            m.name
        );
        let o = run(
            m,
            &["run", "--memory", "64m", "--", "python3", "-c", HOG, "512"],
        );
        assert_eq!(
            code(&o),
            137,
            "[{}] OOM: 137; stdout {} stderr {}",
            m.name,
            text(&o.stdout),
            text(&o.stderr)
        );
        let v = json(m, &["--memory", "64m", "--", "python3", "-c", HOG, "512"]);
        assert_eq!(v["killed_by"], "oom", "[{}] {v}", m.name);
        assert!(
            v["peak_memory_bytes"].as_u64().unwrap_or(0) <= 80 << 20,
            "[{}] peak within the limit: {v}",
            m.name
        );
        // --memory-swap equal to memory: no swap, same result.
        let v = json(
            m,
            &[
                "--memory",
                "64m",
                "--memory-swap",
                "64m",
                "--",
                "python3",
                "-c",
                HOG,
                "512",
            ],
        );
        assert_eq!(v["killed_by"], "oom", "[{}] {v}", m.name);
    }
}

const FORKS: &str = "import os,sys,time\nn=0\nfor i in range(int(sys.argv[1])):\n    try:\n        if os.fork()==0:\n            time.sleep(30); os._exit(0)\n        n+=1\n    except OSError as e:\n        print('fork failed after', n, e); break\nprint('forked', n, flush=True)";

#[test]
fn pids_limit() {
    let _g = shared();
    for m in modes("pids_limit") {
        let marker = unique("pids");
        let v = json(
            m,
            &[
                "--pids",
                "32",
                "--timeout",
                "20s",
                "--",
                "python3",
                "-c",
                FORKS,
                "200",
                &marker,
            ],
        );
        assert_eq!(v["killed_by"], "pids", "[{}] {v}", m.name);
        assert!(
            !v["stdout"].as_str().unwrap_or("").contains("forked 200"),
            "[{}] {v}",
            m.name
        );
        let left = wait_gone(&marker, 3);
        kill_all(&left);
        assert!(
            left.is_empty(),
            "[{}] fork-bomb children outlived the sandbox: {left:?}",
            m.name
        );
        let v = json(
            m,
            &[
                "--pids",
                "64",
                "--",
                "python3",
                "-c",
                FORKS,
                "10",
                &unique("pids-ok"),
            ],
        );
        assert!(
            v["killed_by"].is_null(),
            "[{}] 10 processes under --pids 64: {v}",
            m.name
        );
        // --pids N is N tasks for the command (nanoclaw's init is not one).
        ok_out(m, &["run", "--pids", "1", "--", "true"]);
        let v = json(
            m,
            &[
                "--pids",
                "2",
                "--",
                "python3",
                "-c",
                FORKS,
                "1",
                &unique("pids-2"),
            ],
        );
        assert!(
            v["killed_by"].is_null() && v["stdout"].as_str().unwrap_or("").contains("forked 1"),
            "[{}] the command and one child under --pids 2: {v}",
            m.name
        );
    }
}

#[test]
fn cpu_limit_visible_in_cpu_ms() {
    let _g = shared();
    // Burn a fixed amount of CPU time (not wall time, so a busy host does not
    // matter): under --cpus 0.25 that needs at least ~4x as much wall time.
    let burn = "import time\nwhile time.process_time() < 0.6: pass";
    for m in modes("cpu_limit") {
        let full = json(m, &["--cpus", "1", "--", "python3", "-c", burn]);
        let quarter = json(m, &["--cpus", "0.25", "--", "python3", "-c", burn]);
        let (cf, df) = (
            full["cpu_ms"].as_u64().unwrap_or(0),
            full["duration_ms"].as_u64().unwrap_or(0),
        );
        let (cq, dq) = (
            quarter["cpu_ms"].as_u64().unwrap_or(0),
            quarter["duration_ms"].as_u64().unwrap_or(0),
        );
        eprintln!(
            "[{}] cpus=1: cpu {cf} ms / wall {df} ms; cpus=0.25: cpu {cq} ms / wall {dq} ms",
            m.name
        );
        assert!(
            cf >= 550 && cq >= 550,
            "[{}] cpu_ms must count the 600 ms burnt: {cf}, {cq}",
            m.name
        );
        assert!(
            dq >= cq * 3,
            "[{}] --cpus 0.25: {cq} ms cpu in only {dq} ms wall",
            m.name
        );
        // A command killed by its timeout: its cpu time still counts (it is
        // never reaped by init, so init's rusage alone would say ~0).
        let v = json(
            m,
            &["--timeout", "1s", "--", "python3", "-c", "while True: pass"],
        );
        assert_eq!(v["killed_by"], "timeout", "[{}] {v}", m.name);
        let c = v["cpu_ms"].as_u64().expect("cpu_ms");
        assert!(
            c >= 200,
            "[{}] a 1 s busy loop killed at its timeout: cpu_ms {c}",
            m.name
        );
    }
}

#[test]
// The children are reaped with wait4 (for ru_maxrss), not Child::wait.
#[allow(clippy::zombie_processes)]
fn output_limit_truncates_and_memory_stays_bounded() {
    let _g = shared();
    for m in modes("output_limit") {
        let v = json(
            m,
            &[
                "--output-limit",
                "1k",
                "--",
                "sh",
                "-c",
                "yes aaaaaaaaaaaaaaa | head -c 100000; yes bbb | head -c 10 >&2",
            ],
        );
        assert_eq!(
            v["stdout_truncated"], true,
            "[{}] {}",
            m.name, v["killed_by"]
        );
        assert!(
            v["stdout"].as_str().unwrap_or("").len() <= 1024,
            "[{}] stdout kept under 1k",
            m.name
        );
        assert_eq!(
            v["killed_by"], "output_limit",
            "[{}] {}",
            m.name, v["killed_by"]
        );
        // A 2 GB flood, both streamed and with --json: nanoclaw's own memory
        // stays near its baseline (the 8m capture in --json mode allowed for).
        let mut base = nc(m, &["run", "--", "true"]);
        let (_, baseline_kib) = wait4_rusage(base.spawn().expect("spawn").id() as i32);
        for json_mode in [false, true] {
            let mut args = vec!["run", "--output-limit", "8m", "--timeout", "60s"];
            if json_mode {
                args.push("--json");
            }
            args.extend_from_slice(&[
                "--",
                "sh",
                "-c",
                "yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 2000000000",
            ]);
            let mut c = nc(m, &args);
            c.stdout(Stdio::piped()).stderr(Stdio::null());
            let mut ch = c.spawn().expect("spawn");
            let mut stdout = ch.stdout.take().expect("stdout");
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0usize;
                while let Ok(k) = stdout.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                n
            });
            let (status, rss_kib) = wait4_rusage(ch.id() as i32);
            let got = reader.join().expect("reader");
            eprintln!(
                "[{}] flood json={json_mode}: nanoclaw max RSS {rss_kib} KiB (baseline {baseline_kib} KiB), passed {got} bytes, status {status}",
                m.name
            );
            let allowed = baseline_kib + if json_mode { 40 * 1024 } else { 16 * 1024 };
            assert!(
                rss_kib < allowed,
                "[{}] nanoclaw used {rss_kib} KiB on an output flood (baseline {baseline_kib} KiB)",
                m.name
            );
            assert!(
                got < 16 << 20,
                "[{}] {got} bytes got through an 8m limit",
                m.name
            );
        }
    }
}

/// Reaps `pid` with wait4 and returns (exit status or 128+signal, ru_maxrss in KiB).
fn wait4_rusage(pid: i32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: status and ru are valid, writable, and live across the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let st = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    (st, ru.ru_maxrss)
}

// ---------------------------------------------------------------- processes

const DAEMONIZE: &str = "import os,sys,time\nif os.fork()==0:\n    os.setsid()\n    if os.fork()==0:\n        time.sleep(1000); os._exit(0)\n    os._exit(0)\ntime.sleep(float(sys.argv[1]))";

#[test]
fn timeout_kills_daemonized_grandchild() {
    let _g = shared();
    for m in modes("timeout_daemon") {
        // The command outlives the timeout; its setsid'ed grandchild must die with it.
        let marker = unique("daemon");
        let o = run(
            m,
            &[
                "run",
                "--timeout",
                "1s",
                "--",
                "python3",
                "-c",
                DAEMONIZE,
                "1000",
                &marker,
            ],
        );
        assert_eq!(code(&o), 124, "[{}] {}", m.name, text(&o.stderr));
        let left = wait_gone(&marker, 3);
        kill_all(&left);
        assert!(
            left.is_empty(),
            "[{}] daemonized grandchild survived the timeout: {left:?}",
            m.name
        );
        // The command exits at once, leaving the daemon: nanoclaw must not leave it behind either.
        let marker = unique("daemon2");
        let o = run(
            m,
            &[
                "run",
                "--timeout",
                "20s",
                "--",
                "python3",
                "-c",
                DAEMONIZE,
                "0",
                &marker,
            ],
        );
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        let left = wait_gone(&marker, 3);
        kill_all(&left);
        assert!(
            left.is_empty(),
            "[{}] daemon survived its sandbox: {left:?}",
            m.name
        );
    }
}

/// What a sandbox could leave behind on the host, as comparable strings.
fn host_traces(uid: Option<u32>) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for l in fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if l.contains("nanoclaw") || l.contains(" nsfs ") || l.contains("nct-") {
            s.insert(format!("mount {l}"));
        }
    }
    // Every cgroup directory below a nanoclaw-named one, on v1 and v2.
    fn walk(dir: &Path, depth: u32, inside: bool, s: &mut BTreeSet<String>) {
        if depth > 5 {
            return;
        }
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let here = inside || e.file_name().to_string_lossy().contains("nanoclaw");
            if here {
                s.insert(format!("cgroup {}", p.display()));
            }
            walk(&p, depth + 1, here, s);
        }
    }
    walk(Path::new("/sys/fs/cgroup"), 0, false, &mut s);
    let uids: Vec<u32> = [Some(0), uid].into_iter().flatten().collect();
    let mut dirs = vec![
        PathBuf::from("/tmp"),
        PathBuf::from("/run/nanoclaw"),
        PathBuf::from("/var/lib/nanoclaw/run"),
    ];
    for u in &uids {
        dirs.push(PathBuf::from(format!("/run/user/{u}/nanoclaw")));
        dirs.push(PathBuf::from(format!("/tmp/nanoclaw-{u}")));
    }
    for d in dirs {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let relevant = d != Path::new("/tmp") || n.contains("nanoclaw") || n.starts_with("ncl");
            let ours =
                n.starts_with("nanoclaw-cli-test-") || n.starts_with("nanoclaw-containment-");
            if relevant && !ours {
                s.insert(format!("file {}", e.path().display()));
            }
        }
    }
    // Processes running the nanoclaw binary.
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(exe) = fs::read_link(e.path().join("exe")) {
            // Without " (deleted)": a binary unlinked between two snapshots
            // is still the same process.
            let exe = exe.to_string_lossy();
            let exe = exe.trim_end_matches(" (deleted)");
            if exe.contains("nanoclaw") && !exe.contains("deps/") {
                s.insert(format!("process {} {exe}", e.file_name().to_string_lossy()));
            }
        }
    }
    s
}

#[track_caller]
fn assert_no_new_traces(before: &BTreeSet<String>, uid: Option<u32>, what: &str) {
    let mut after = host_traces(uid);
    for _ in 0..40 {
        if after.difference(before).next().is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = host_traces(uid);
    }
    let new: Vec<&String> = after.difference(before).collect();
    panic!("{what}: left behind on the host:\n{new:#?}");
}

#[test]
fn nothing_left_behind_after_100_runs() {
    let _g = exclusive();
    for m in modes("leaks") {
        let uid = m.user.map(|u| u.0);
        let before = host_traces(uid);
        let marker = unique("leak");
        let mut ids = Vec::new();
        for i in 0..100 {
            let o = match i % 4 {
                0 => run(m, &["run", "--", "true", &marker]),
                1 => run(
                    m,
                    &[
                        "run",
                        "--",
                        "sh",
                        "-c",
                        "sleep 5 & sleep 5 & exit 3",
                        &marker,
                    ],
                ),
                2 => run(
                    m,
                    &[
                        "run",
                        "--timeout",
                        "100ms",
                        "--",
                        "sh",
                        "-c",
                        "sleep 10",
                        &marker,
                    ],
                ),
                _ => run(
                    m,
                    &[
                        "run",
                        "--json",
                        "--",
                        "sh",
                        "-c",
                        "echo x > /tmp/f; exit 0",
                        &marker,
                    ],
                ),
            };
            assert!(
                code(&o) != 125,
                "[{}] run {i} failed: {}",
                m.name,
                text(&o.stderr)
            );
            if i % 4 == 3 {
                let v: Value = serde_json::from_slice(&o.stdout).expect("json");
                ids.push(v["sandbox_id"].as_str().unwrap_or_default().to_string());
            }
        }
        let left = wait_gone(&marker, 3);
        kill_all(&left);
        assert!(
            left.is_empty(),
            "[{}] processes left after 100 runs: {left:?}",
            m.name
        );
        assert_no_new_traces(&before, uid, &format!("[{}] 100 runs", m.name));
        let after = host_traces(uid);
        for id in ids.iter().filter(|i| i.len() >= 6) {
            let hits: Vec<&String> = after.iter().filter(|t| t.contains(id.as_str())).collect();
            assert!(hits.is_empty(), "[{}] sandbox {id} left {hits:?}", m.name);
        }
    }
}

#[test]
fn sigint_and_sigterm_clean_up_everything() {
    let _g = exclusive();
    for m in modes("signals") {
        let uid = m.user.map(|u| u.0);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let before = host_traces(uid);
            let marker = unique("sig");
            let code_ = "import os,time\nif os.fork()==0:\n    os.setsid(); time.sleep(1000)\ntime.sleep(1000)";
            let mut c = nc(
                m,
                &[
                    "run",
                    "--timeout",
                    "60s",
                    "--",
                    "python3",
                    "-c",
                    code_,
                    &marker,
                ],
            );
            c.stdout(Stdio::null()).stderr(Stdio::piped());
            // Own process group, so the signal reaches nanoclaw only (not via a terminal).
            c.process_group(0);
            let mut guard = Reaped(c.spawn().expect("spawn"));
            let ch = &mut guard.0;
            // Both python processes (the command and its setsid'd child).
            wait_payload(&marker, "python3", 2, 15, m.name);
            // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
            unsafe { libc::kill(ch.id() as i32, sig) };
            let end = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(s) = ch.try_wait().expect("try_wait") {
                    break s;
                }
                if Instant::now() > end {
                    let _ = ch.kill();
                    panic!(
                        "[{}] nanoclaw did not exit within 10 s of signal {sig}",
                        m.name
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(
                !status.success(),
                "[{}] signal {sig}: nanoclaw reported success",
                m.name
            );
            let left = wait_gone(&marker, 3);
            kill_all(&left);
            assert!(
                left.is_empty(),
                "[{}] signal {sig}: sandboxed processes survived: {left:?}",
                m.name
            );
            assert_no_new_traces(&before, uid, &format!("[{}] signal {sig}", m.name));
        }
    }
}

// ---------------------------------------------------------------- containment basics

#[test]
fn host_is_invisible_and_root_read_only() {
    let _g = shared();
    for m in modes("host_view") {
        let marker_dir = host_dir("hostview");
        fs::write(marker_dir.join("secret"), "s3cret").expect("write");
        let probe = format!(
            "for p in /etc/shadow {}/secret /root /home /var /run; do if [ -e $p ]; then ls -A $p 2>/dev/null | head -3; echo visible:$p; fi; done; \
             touch /nct-x 2>/dev/null && echo wrote-root; touch /usr/nct-x 2>/dev/null && echo wrote-usr; \
             touch /etc/nct-x 2>/dev/null && echo wrote-etc; touch /tmp/ok && echo tmp-ok",
            marker_dir.display()
        );
        let out = ok_out(m, &["run", "--", "sh", "-c", &probe]);
        let bad: Vec<&str> = out
            .lines()
            .filter(|l| {
                l.starts_with("visible:/etc/shadow")
                    || l.contains("/secret")
                    || l.starts_with("wrote-")
            })
            .collect();
        assert!(
            bad.is_empty(),
            "[{}] host visible / root writable: {out}",
            m.name
        );
        for d in ["/root", "/home", "/var", "/run"] {
            if out.contains(&format!("visible:{d}")) {
                // Allowed only as an empty directory.
                let o = ok_out(m, &["run", "--", "sh", "-c", &format!("ls -A {d} | wc -l")]);
                assert_eq!(
                    o.trim(),
                    "0",
                    "[{}] {d} is visible with host content",
                    m.name
                );
            }
        }
        assert!(out.contains("tmp-ok"), "[{}] /tmp writable: {out}", m.name);
        let _ = fs::remove_dir_all(&marker_dir);
        // Host processes: our own pid must not be signalable from inside.
        let me = std::process::id();
        let o = run(
            m,
            &[
                "run",
                "--",
                "sh",
                "-c",
                &format!("kill -0 {me} 2>/dev/null && echo visible; ls /proc | grep -c '^[0-9]'"),
            ],
        );
        assert!(
            !text(&o.stdout).contains("visible"),
            "[{}] host pid {me} signalable",
            m.name
        );
        // Network: a host listener on 127.0.0.1 is unreachable; only lo exists.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = l.local_addr().expect("addr").port();
        let o = run(m, &["run", "--", "python3", "-c", &format!(
            "import socket\ns=socket.socket(); s.settimeout(2)\ntry:\n    s.connect(('127.0.0.1',{port})); print('connected')\nexcept OSError as e: print('refused', e)\nprint(sorted(n for _,n in socket.if_nameindex()))"
        )]);
        let out = text(&o.stdout);
        assert!(
            out.contains("refused") && out.contains("['lo']"),
            "[{}] network: {out} {}",
            m.name,
            text(&o.stderr)
        );
    }
}

#[test]
fn sandbox_dies_with_a_sigkilled_runner() {
    // Exclusive: the sweep below (age 0) must not race another test's
    // freshly created, not yet populated cgroup.
    let _g = exclusive();
    for m in modes("sandbox_dies_with_a_sigkilled_runner") {
        let marker = unique("lifeline");
        let mut guard = Reaped(
            nc(
                m,
                &[
                    "run",
                    "--timeout",
                    "60s",
                    "--",
                    "sh",
                    "-c",
                    &format!("sleep 1000 # {marker}"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
        );
        let child = &mut guard.0;
        // The payload itself (`sh -c ...`), not the runner's command line.
        wait_payload(&marker, "sh", 1, 10, m.name);
        // SIGKILL: nanoclaw gets no chance to clean up; init must notice.
        let _ = child.kill();
        let _ = child.wait();
        let left = wait_gone(&marker, 5);
        assert!(
            left.is_empty(),
            "[{}] sandbox processes outlived the runner: {left:?}",
            m.name
        );
        // The killed runner could not remove its cgroup; a later run sweeps
        // empty sandbox cgroups older than NANOCLAW_CGROUP_STALE_SECS. The
        // killed sandbox's tasks may take a moment to leave the cgroup
        // (rmdir is EBUSY until then), so a few runs are allowed.
        let empty_sandbox_cgroups = || {
            let mut v = Vec::new();
            for h in ["memory", "pids", "cpu", "unified"] {
                for parent in [
                    "nanoclaw".to_string(),
                    format!("nanoclaw-{}", m.user.map_or(0, |u| u.0)),
                ] {
                    let dir = Path::new("/sys/fs/cgroup").join(h).join(&parent);
                    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        let procs =
                            fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                        if n.len() == 12
                            && n.bytes().all(|b| b.is_ascii_hexdigit())
                            && procs.trim().is_empty()
                        {
                            v.push(e.path());
                        }
                    }
                }
            }
            v
        };
        let mut left = Vec::new();
        for _ in 0..20 {
            let o = nc(m, &["run", "--", "true"])
                .env("NANOCLAW_CGROUP_STALE_SECS", "0")
                .output()
                .expect("spawn");
            assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
            left = empty_sandbox_cgroups();
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            left.is_empty(),
            "[{}] empty sandbox cgroups survived the sweep: {left:?}",
            m.name
        );
    }
}

#[test]
fn mount_targets_are_never_reached_through_planted_symlinks() {
    let _g = shared();
    for m in modes("mount_targets_are_never_reached_through_planted_symlinks") {
        let ws = host_dir("plant-ws");
        let victim = host_dir("plant-victim");
        fs::write(victim.join("important.txt"), "precious\n").expect("write");
        fs::set_permissions(
            victim.join("important.txt"),
            fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        let src = host_dir("plant-src").join("cfg.json");
        fs::write(&src, "{}\n").expect("write");
        fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).expect("chmod");
        let w = ws.to_str().expect("utf-8");
        // Run 1: hostile code plants a symlink to a host dir in its workspace.
        ok_out(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "rw",
                "--",
                "ln",
                "-s",
                victim.to_str().expect("utf-8"),
                "/workspace/config",
            ],
        );
        // Run 2: a mount whose target path goes through that symlink.
        let o = run(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "rw",
                "--mount",
                &format!("{}:/workspace/config/important.txt:ro", src.display()),
                "--",
                "true",
            ],
        );
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "[{}] {err}", m.name);
        assert!(err.contains("symlink"), "[{}] {err}", m.name);
        assert_eq!(
            fs::read_to_string(victim.join("important.txt")).expect("read"),
            "precious\n",
            "[{}] the host file behind the symlink was touched",
            m.name
        );
        // An existing regular file used as a mount point is not truncated.
        fs::write(ws.join("existing"), "keep\n").expect("write");
        fs::set_permissions(ws.join("existing"), fs::Permissions::from_mode(0o666)).expect("chmod");
        let out = ok_out(
            m,
            &[
                "run",
                "--workspace",
                w,
                "--workspace-access",
                "rw",
                "--mount",
                &format!("{}:/workspace/existing:ro", src.display()),
                "--",
                "cat",
                "/workspace/existing",
            ],
        );
        assert_eq!(out, "{}\n", "[{}]", m.name);
        assert_eq!(
            fs::read_to_string(ws.join("existing")).expect("read"),
            "keep\n",
            "[{}] mount point file truncated",
            m.name
        );
    }
}

#[test]
fn exec_allowlist_holds_against_memfd_exec() {
    let _g = shared();
    let code_ = r#"
import os
try:
    fd = os.memfd_create("x", 0)
    os.write(fd, open("/usr/bin/id", "rb").read())
    os.execv(f"/proc/self/fd/{fd}", ["id"])
except OSError as e:
    print("refused", e.errno)
"#;
    for m in modes("exec_allowlist_holds_against_memfd_exec") {
        // Without an allowlist the trick runs `id` (so the test can fail).
        let out = ok_out(m, &["run", "--", "python3", "-c", code_]);
        assert!(out.contains("uid="), "[{}] control run: {out}", m.name);
        let o = run(
            m,
            &[
                "run",
                "--exec-allow",
                "/usr/bin/python3.11",
                "--",
                "/usr/bin/python3.11",
                "-c",
                code_,
            ],
        );
        let out = text(&o.stdout);
        assert!(
            out.contains("refused") && !out.contains("uid="),
            "[{}] memfd exec escaped the allowlist: {out} {}",
            m.name,
            text(&o.stderr)
        );
    }
}

#[test]
fn lang_go_compiles_and_runs() {
    let _g = shared();
    if !Path::new("/usr/bin/go").exists() {
        assert!(
            std::env::var("NANOCLAW_REQUIRE_GO").map_or(true, |v| v != "1"),
            "NANOCLAW_REQUIRE_GO=1 but /usr/bin/go is missing (apt-get install golang-go)"
        );
        eprintln!("SKIPPED lang_go_compiles_and_runs: no /usr/bin/go (apt-get install golang-go)");
        return;
    }
    let code_ = "package main\nimport (\"fmt\"; \"os\")\nfunc main() { fmt.Println(\"go says\", len(os.Args[1:])) }\n";
    for m in modes("lang_go_compiles_and_runs") {
        for _ in 0..2 {
            let out = ok_out(m, &["run", "--lang", "go", "--code", code_, "--", "x", "y"]);
            assert_eq!(out, "go says 2\n", "[{}]", m.name);
        }
    }
}

/// A limit the host cannot enforce is found out after the sandbox's process
/// exists (the cgroup is planned while the child builds its root): the run
/// still ends at once with one clear 125 line and leaves nothing behind.
/// Defaults that cannot be enforced by a cgroup fall back to rlimits, which
/// reach the command. `NANOCLAW_CGROUP_PARENT=../x` makes every controller
/// unusable, as root and rootless alike.
#[test]
fn a_limit_the_host_cannot_enforce_fails_cleanly_after_the_clone() {
    let _g = exclusive();
    for m in modes("unenforceable") {
        let uid = m.user.map(|u| u.0);
        let before = host_traces(uid);
        let marker = unique("unenf");
        let started = Instant::now();
        let mut c = nc(m, &["run", "--memory", "64m", "--", "sleep", "30", &marker]);
        c.env("NANOCLAW_CGROUP_PARENT", "../x")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn nanoclaw");
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let left = wait_gone(&marker, 1);
                kill_all(&left);
                panic!(
                    "[{}] nanoclaw hung after a post-clone setup failure",
                    m.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read stderr");
        assert_eq!(status.code(), Some(125), "[{}] stderr: {err}", m.name);
        assert!(
            err.contains("cannot enforce the memory (64 MiB) limit") && err.lines().count() == 1,
            "[{}] want one clear line, got: {err}",
            m.name
        );
        let left = wait_gone(&marker, 3);
        kill_all(&left);
        assert!(left.is_empty(), "[{}] processes left: {left:?}", m.name);
        assert_no_new_traces(&before, uid, &format!("[{}] unenforceable limit", m.name));

        // Default limits degrade to rlimits, visibly.
        let mut c = nc(
            m,
            &[
                "run",
                "--",
                "sh",
                "-c",
                "grep -E 'data size|processes' /proc/self/limits",
            ],
        );
        c.env("NANOCLAW_CGROUP_PARENT", "../x");
        let o = c.output().expect("spawn nanoclaw");
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            out.contains("536870912") && out.contains(" 256 "),
            "[{}] rlimits not applied: {out}",
            m.name
        );
        assert!(
            text(&o.stderr).contains("no cgroup for the default"),
            "[{}] no warning: {}",
            m.name,
            text(&o.stderr)
        );
    }
}

/// Signals the caller ignored (nohup, a shell's background job) are not
/// ignored by the sandboxed command: it starts with every disposition at
/// its default and nothing blocked.
#[test]
fn signals_ignored_by_the_caller_are_default_in_the_sandbox() {
    let _g = shared();
    for m in modes("signal dispositions") {
        let mut c = nc(
            m,
            &[
                "run",
                "--",
                "grep",
                "-E",
                "^Sig(Ign|Blk)",
                "/proc/self/status",
            ],
        );
        // SAFETY: only async-signal-safe calls (signal) between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                Ok(())
            });
        }
        let o = c.output().expect("spawn nanoclaw");
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "[{}] {}", m.name, text(&o.stderr));
        assert!(
            out.contains("SigIgn:\t0000000000000000") && out.contains("SigBlk:\t0000000000000000"),
            "[{}] the command inherited ignored or blocked signals: {out}",
            m.name
        );
    }
}

#[test]
fn doctor_reports_the_host_and_json_parses() {
    let _g = shared();
    for m in modes("doctor") {
        let out = ok_out(m, &["doctor", "--json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("[{}] doctor --json is not JSON ({e}): {out}", m.name));
        let checks = v.as_array().expect("an array of checks");
        let get = |name: &str| {
            checks
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("[{}] no {name} check: {out}", m.name))
        };
        for name in [
            "mode",
            "user namespaces",
            "cgroups",
            "seccomp",
            "landlock",
            "overlayfs",
            "kvm",
            "nftables",
        ] {
            let c = get(name);
            assert!(c["ok"].is_boolean(), "[{}] {name}: {c}", m.name);
            assert!(
                c["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "[{}] {name}: {c}",
                m.name
            );
        }
        let mode = get("mode")["detail"].as_str().unwrap_or("").to_string();
        let want = if m.user.is_some() || !is_root() {
            "rootless"
        } else {
            "rootful"
        };
        assert!(mode.starts_with(want), "[{}] mode: {mode}", m.name);
        // Rootful: the host id slots (one per running sandbox) and how many
        // are free; rootless sandboxes run as the caller and have none.
        let ids = checks.iter().find(|c| c["name"] == "host ids");
        if want == "rootful" {
            let ids = ids.unwrap_or_else(|| panic!("no host ids check: {out}"));
            assert_eq!(ids["ok"], true, "{ids}");
            assert!(
                ids["data"]["usable"].as_u64().is_some_and(|n| n > 1000),
                "{ids}"
            );
        } else {
            assert!(ids.is_none(), "[{}] host ids: {out}", m.name);
        }
        // What every test here relies on: user namespaces and seccomp.
        assert_eq!(get("user namespaces")["ok"], true, "[{}]", m.name);
        assert_eq!(get("seccomp")["ok"], true, "[{}]", m.name);
        // The cgroup probe is structured, and agrees with its verdict.
        let cg = get("cgroups");
        assert_eq!(
            cg["ok"], cg["data"]["can_limit_all"],
            "[{}] cgroups: {cg}",
            m.name
        );
        assert!(
            cg["data"]["controllers"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "[{}] cgroups: {cg}",
            m.name
        );
        // The text form says the same, a line per check.
        let text_out = ok_out(m, &["doctor"]);
        for name in ["cgroups", "seccomp", "landlock"] {
            assert!(text_out.contains(name), "[{}] doctor: {text_out}", m.name);
        }
    }
}
