//! Each rootful sandbox's own host ids (issue 10), checked from the host
//! against the real binary: concurrent sandboxes run as disjoint host uid
//! ranges, each in a user namespace owned by the first of its ids; the id
//! slot is held by a lock only the runner has, freed when the runner is
//! SIGKILLed, and a clean exit leaves no lock file; many sandboxes at once
//! all get a slot; files a sandbox writes to a workspace land in the shared
//! storage range, never as its slot's ids. Rootful only (rootless sandboxes
//! run as the caller).

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The storage range's first id; slots of 65536 follow it.
const STORAGE_BASE: u32 = 0x4000_0000;
const SLOT_SIZE: u32 = 65536;
const SLOT_DIR: &str = "/run/nanoclaw/idslots";

fn rootful(test: &str) -> Option<Mode> {
    if !is_root() {
        eprintln!("SKIPPED {test}: rootful only");
        return None;
    }
    Some(modes(test)[0])
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The real uid of `pid`.
fn uid_of(pid: u32) -> Option<u32> {
    status_field(pid, "Uid:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if status_field(pid, "PPid:").and_then(|p| p.parse().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// The owner of `pid`'s user namespace (ioctl NS_GET_OWNER_UID).
fn userns_owner(pid: u32) -> u32 {
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;
    let f = fs::File::open(format!("/proc/{pid}/ns/user")).expect("open ns/user");
    let mut uid: libc::uid_t = u32::MAX;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_OWNER_UID, &mut uid) };
    assert_eq!(
        r,
        0,
        "NS_GET_OWNER_UID: {}",
        std::io::Error::last_os_error()
    );
    uid
}

/// Whether someone holds an flock on `path` (false if it does not exist).
fn locked(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let got = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    !got
}

/// Every pid whose real uid lies in `[lo, lo + SLOT_SIZE)`.
fn pids_in_range(lo: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if uid_of(pid).is_some_and(|u| (lo..lo + SLOT_SIZE).contains(&u)) {
            out.push(pid);
        }
    }
    out
}

/// A runner of `sleep 60` and its sandbox's init and payload pids.
struct Sleeper {
    runner: Child,
    init: u32,
    payload: u32,
}

impl Drop for Sleeper {
    /// A failed assertion leaves no runner behind.
    fn drop(&mut self) {
        let _ = self.runner.kill();
        let _ = self.runner.wait();
    }
}

fn start_sleeper(m: Mode) -> Sleeper {
    let mut s = Sleeper {
        runner: nc(m, &["run", "--timeout", "120s", "--", "sleep", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nanoclaw"),
        init: 0,
        payload: 0,
    };
    let t0 = Instant::now();
    loop {
        let init = children_of(s.runner.id()).into_iter().next();
        if let Some(init) = init {
            if let Some(&payload) = children_of(init).first() {
                // Past setup: the payload runs as the sandbox user.
                if status_field(payload, "Name:").as_deref() == Some("sleep") {
                    (s.init, s.payload) = (init, payload);
                    return s;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the sandbox did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn slot_file(base: u32) -> PathBuf {
    Path::new(SLOT_DIR).join(((base - STORAGE_BASE) / SLOT_SIZE).to_string())
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two sandboxes at once: neither shares a host uid with the other (nor
/// with the storage range that image layers are owned by), and each one's
/// user namespace is owned by its own root, not by the host's root.
#[test]
fn concurrent_sandboxes_run_as_disjoint_host_ids() {
    let Some(m) = rootful("concurrent_sandboxes_run_as_disjoint_host_ids") else {
        return;
    };
    let mut a = start_sleeper(m);
    let mut b = start_sleeper(m);
    let mut bases = Vec::new();
    for s in [&a, &b] {
        let root = uid_of(s.init).expect("init uid");
        let user = uid_of(s.payload).expect("payload uid");
        eprintln!(
            "init {} uid {root}, payload {} uid {user}, userns owner {}",
            s.init,
            s.payload,
            userns_owner(s.init)
        );
        assert_eq!(user, root + 1000, "the payload is the sandbox's user 1000");
        assert_eq!(
            (root - STORAGE_BASE) % SLOT_SIZE,
            0,
            "root inside is the first id of a slot: {root}"
        );
        assert!(
            (STORAGE_BASE + SLOT_SIZE..0x7FFE_0000).contains(&root),
            "outside the storage range and below 2^31: {root}"
        );
        assert_eq!(
            userns_owner(s.init),
            root,
            "the user namespace is owned by the sandbox's root"
        );
        assert!(
            locked(&slot_file(root)),
            "{} is locked while the sandbox runs",
            slot_file(root).display()
        );
        // The lock is the runner's: nothing in the sandbox holds it.
        for pid in [s.init, s.payload] {
            let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fd dir")
                .flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            assert!(
                !fds.iter().any(|p| p.contains("idslots")),
                "pid {pid} holds {fds:?}"
            );
        }
        bases.push(root);
    }
    assert_ne!(bases[0], bases[1], "two sandboxes share host ids");
    for s in [&mut a, &mut b] {
        // SIGTERM: the runner kills its sandbox and cleans up.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(s.runner.id() as i32, libc::SIGTERM) };
        let _ = s.runner.wait();
    }
    for base in bases {
        assert!(
            !slot_file(base).exists(),
            "a clean exit removes {}",
            slot_file(base).display()
        );
    }
}

/// SIGKILL to the runner: the kernel drops its lock, so the slot is free
/// for the next sandbox at once, and no process of the sandbox's host ids
/// is left.
#[test]
fn a_killed_runners_slot_is_free_and_nothing_of_it_is_left() {
    let Some(m) = rootful("a_killed_runners_slot_is_free_and_nothing_of_it_is_left") else {
        return;
    };
    let s = start_sleeper(m);
    let base = uid_of(s.init).expect("init uid");
    let path = slot_file(base);
    assert!(
        locked(&path),
        "{} should be locked while the sandbox runs",
        path.display()
    );
    drop(s); // SIGKILL to the runner, and reaped
             // Init sees its lifeline close and takes the sandbox down with it.
    wait_until("the sandbox's processes are gone", 20, || {
        pids_in_range(base).is_empty()
    });
    // The next sandbox can take it: do what it would (lock, and on release
    // remove the file); another sandbox's release may have removed it
    // already, as releases sweep the files of dead holders.
    let t0 = Instant::now();
    while let Ok(f) = fs::File::open(&path) {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // Only if the path still names the file we locked.
            let ours = f.metadata().expect("fstat").ino();
            if fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ours) {
                let _ = fs::remove_file(&path);
            }
            break;
        }
        // Held: by a sweeper for a moment, or by the killed runner still.
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the killed runner's lock on {} is still held",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!path.exists(), "{} is left behind", path.display());
}

/// More sandboxes at once than a small pool would hold: each gets a slot
/// of its own, none fails.
#[test]
fn many_concurrent_sandboxes_all_get_their_own_slot() {
    let Some(m) = rootful("many_concurrent_sandboxes_all_get_their_own_slot") else {
        return;
    };
    const N: usize = 64;
    let dir = std::env::temp_dir().join(format!("nanoclaw-host-ids-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let mount = format!("{}:/sync:ro", dir.display());
    let script = "head -n1 /proc/self/uid_map; while [ ! -e /sync/go ]; do sleep 0.05; done";
    let mut kids: Vec<Child> = (0..N)
        .map(|_| {
            nc(
                m,
                &[
                    "run",
                    "--timeout",
                    "120s",
                    "-v",
                    &mount,
                    "--",
                    "sh",
                    "-c",
                    script,
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nanoclaw")
        })
        .collect();
    // Every sandbox is running (it printed its map) before any may end.
    let mut maps = Vec::new();
    for k in &mut kids {
        let mut line = String::new();
        BufReader::new(k.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        maps.push(line.split_whitespace().nth(1).unwrap_or("").to_string());
    }
    fs::write(dir.join("go"), "").expect("go");
    let mut failed = Vec::new();
    for k in kids {
        let o = k.wait_with_output().expect("wait");
        if !o.status.success() {
            failed.push(text(&o.stderr));
        }
    }
    let _ = fs::remove_dir_all(&dir);
    assert!(
        failed.is_empty(),
        "{} of {N} failed: {failed:?}",
        failed.len()
    );
    let mut distinct = maps.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        N,
        "every concurrent sandbox has its own host ids: {maps:?}"
    );
}

/// A workspace owned by the sandbox user's id in the storage range (as
/// nanoclaw's default workspaces are): inside, its files are the sandbox's
/// own; what the sandbox writes lands on the host in the storage range, the
/// same whatever slot the sandbox had, never as the slot's own ids.
#[test]
fn workspace_writes_land_in_the_storage_range() {
    let Some(m) = rootful("workspace_writes_land_in_the_storage_range") else {
        return;
    };
    let ws = std::env::temp_dir().join(format!("nanoclaw-host-ids-ws-{}", std::process::id()));
    fs::create_dir_all(&ws).expect("mkdir");
    let chown = |p: &Path, id: u32| std::os::unix::fs::chown(p, Some(id), Some(id)).expect("chown");
    chown(&ws, STORAGE_BASE + 1000);
    fs::write(ws.join("theirs"), "x").expect("write");
    chown(&ws.join("theirs"), STORAGE_BASE);
    let mount = format!("{}:/workspace:rw", ws.display());
    for n in 0..2 {
        let o = run(
            m,
            &[
                "run",
                "-v",
                &mount,
                "--",
                "sh",
                "-c",
                &format!(
                    "stat -c '%u %g' /workspace /workspace/theirs && echo hi > /workspace/mine{n} \
                     && stat -c '%u' /workspace/mine{n} && head -n1 /proc/self/uid_map"
                ),
            ],
        );
        let out = text(&o.stdout);
        assert!(o.status.success(), "{out} {}", text(&o.stderr));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..3], ["1000 1000", "0 0", "1000"], "inside: {out}");
        let base: u32 = lines[3]
            .split_whitespace()
            .nth(1)
            .and_then(|b| b.parse().ok())
            .expect("uid_map");
        assert!(base > STORAGE_BASE, "a slot of its own: {out}");
        let md = fs::metadata(ws.join(format!("mine{n}"))).expect("stat");
        assert_eq!(
            (md.uid(), md.gid()),
            (STORAGE_BASE + 1000, STORAGE_BASE + 1000),
            "on the host, the file is the storage range's, not slot {base}'s"
        );
    }
    let _ = fs::remove_dir_all(&ws);
}
