//! Each rootful sandbox's own host ids: a slot of 65536 host uids and gids,
//! and a user namespace owned by the first of them.
//!
//! The kernel keeps two kinds of per-user accounts, and a sandbox that
//! shares them with its neighbours can starve them (the red team's issue
//! 10: four rootful sandboxes at their 32-instance inotify cap left none for
//! a fifth, nor for the host's root):
//!
//! * **ucounts** (inotify instances and watches, fanotify groups and marks,
//!   user/pid/net/... namespaces, POSIX message queue bytes, pending
//!   signals, and `RLIMIT_NPROC` above the sandbox's own namespace) are
//!   charged at every user-namespace level up to the host. At the sandbox's
//!   own level they go to the process's uid (and [`super::child::NS_LIMITS`]
//!   caps them there); at each level above, to the **owner** of the
//!   namespace below — the effective uid of whoever created it. A user
//!   namespace created by root is owned by root, so every rootful sandbox
//!   drew from host root's pool (`fs.inotify.max_user_instances`, 128),
//!   whatever uids it mapped. Here the runner creates the namespace with its
//!   thread's effective uid and gid set to the slot's first id
//!   ([`HostIds::clone_fork`]), so each sandbox is charged to a host user of
//!   its own, as a rootless user's sandboxes are charged to that user.
//! * **user_struct** accounts (pipe buffers, `fs.epoll.max_user_watches`,
//!   file descriptors in flight over unix sockets, locked memory) follow
//!   the process's host uid. Each slot's ids are disjoint from every other
//!   slot's, so these are per sandbox too, and no process of one sandbox
//!   ever runs as a host uid of another.
//!
//! Slot `n` (`1 ≤ n < 16382`) is host ids `ROOTFUL_ID_BASE + n·65536` up to
//! 65535 more: between 2^30 + 2^16 and `0x7FFE0000`, so below 2^31 (which
//! some tools mistake for a negative id) and below systemd's "foreign" range
//! `0x7FFE0000–0x7FFEFFFF`; slots that overlap any range in `/etc/subuid`
//! or `/etc/subgid` are skipped. Slot 0, `ROOTFUL_ID_BASE` itself, is the
//! **storage range**: image layers, persistent upper layers and nanoclaw's
//! own workspaces on the host are owned by `ROOTFUL_ID_BASE + n`, and no
//! sandbox process runs in it. A sandbox sees those files through idmapped
//! mounts that shift the storage range onto its slot, so what it writes
//! lands in the storage range again and the next sandbox, whatever its
//! slot, sees the same owners.
//!
//! A slot is owned by holding an exclusive `flock` on
//! `/run/nanoclaw/idslots/<n>`, opened close-on-exec by the process that
//! holds the sandbox (the one-shot runner or the long-lived sandbox's
//! keeper) and never passed to the sandbox (its init closes every
//! descriptor it does not keep). The kernel drops the lock when that
//! process dies, however it dies; a clean release also removes the file.
//! A free slot is looked for from a random start, so a slot's ids are
//! rarely reused right away.
//!
//! Where the kernel cannot shift image layers for overlayfs (before 5.19) an
//! image sandbox keeps the storage range as its ids (as every rootful
//! sandbox did before slots), still with a namespace owner of its own: its
//! ucounts stay private, its user_struct accounts are shared with the other
//! such sandboxes. [`crate::Layers::host_ids`] says which a run got.

use std::cell::OnceCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{idmap, sys, ROOTFUL_ID_BASE, ROOTFUL_ID_COUNT};
use crate::spec::{Root, SandboxSpec};
use crate::Error;

/// Where the slot lock files live.
pub const SLOT_DIR: &str = "/run/nanoclaw/idslots";

/// The slots a rootful sandbox may get: their ids lie between the storage
/// range and `0x7FFE0000`.
pub const SLOTS: Range<u32> = 1..(0x7FFE_0000 - ROOTFUL_ID_BASE) / ROOTFUL_ID_COUNT;

/// The first host id (uid and gid) of slot `slot`: root inside a sandbox
/// that holds it.
pub const fn slot_base(slot: u32) -> u32 {
    ROOTFUL_ID_BASE + slot * ROOTFUL_ID_COUNT
}

/// The slot whose range holds host id `id` (0: the storage range).
pub fn slot_of(id: u32) -> Option<u32> {
    let s = id.checked_sub(ROOTFUL_ID_BASE)? / ROOTFUL_ID_COUNT;
    (s == 0 || SLOTS.contains(&s)).then_some(s)
}

/// Why a sandbox could not get host ids of its own.
#[derive(Debug, thiserror::Error)]
pub enum IdSlotError {
    /// The lock directory could not be made or used.
    #[error("cannot use {}: {source}; rootful nanoclaw keeps its id slot locks there", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A lock file could not be opened or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Every slot is held by a running sandbox.
    #[error(
        "all {usable} host id ranges for rootful sandboxes are in use (one per running sandbox, \
         locked under {}); wait for sandboxes to end or remove idle ones, then retry",
        dir.display()
    )]
    Exhausted {
        /// How many slots this host offers (those clear of /etc/subuid and /etc/subgid).
        usable: u32,
        /// The lock directory.
        dir: PathBuf,
    },
}

/// An id slot, held until dropped (or until the holding process dies).
#[derive(Debug)]
pub struct IdSlot {
    slot: u32,
    path: PathBuf,
    _lock: File,
}

impl IdSlot {
    /// Takes a free slot of [`SLOTS`] under [`SLOT_DIR`], skipping those that
    /// overlap `/etc/subuid` or `/etc/subgid`.
    pub fn acquire() -> Result<IdSlot, IdSlotError> {
        acquire_in(Path::new(SLOT_DIR), SLOTS, &reserved_ranges())
    }

    /// The slot's number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Its first host id (root inside the sandbox).
    pub fn base(&self) -> u32 {
        slot_base(self.slot)
    }
}

impl Drop for IdSlot {
    fn drop(&mut self) {
        // Removed while still locked: a process that opened the file before
        // this finds, once it gets the lock, that the path no longer names
        // it, and looks elsewhere (see `acquire_in`).
        let _ = std::fs::remove_file(&self.path);
        // A holder killed (a keeper is SIGKILLed on `sandbox rm`) left its
        // file, unlocked: the files of such dead holders go now, off the
        // start path.
        if let Some(dir) = self.path.parent() {
            sweep(dir, SWEEP_MAX);
        }
    }
}

/// At most this many lock files are looked at per release.
const SWEEP_MAX: usize = 256;

/// Removes the lock files under `dir` that nobody holds (looking at no more
/// than `max`), each while holding its lock, so that a process racing for
/// the same slot sees the file gone (see `acquire_in`).
pub(crate) fn sweep(dir: &Path, max: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten().take(max) {
        let path = e.path();
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        if !matches!(try_lock(&f), Ok(true)) {
            continue;
        }
        let same = match (f.metadata(), std::fs::symlink_metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Takes a free slot of `slots` under `dir`, skipping slots that overlap a
/// `reserved` id range (`[start, end)`).
pub(crate) fn acquire_in(
    dir: &Path,
    slots: Range<u32>,
    reserved: &[(u64, u64)],
) -> Result<IdSlot, IdSlotError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdSlotError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
    let n = slots.len() as u32;
    let start = if n == 0 { 0 } else { random_u32() % n };
    let mut usable = 0;
    for i in 0..n {
        let slot = slots.start + (start + i) % n;
        let lo = u64::from(slot_base(slot));
        let hi = lo + u64::from(ROOTFUL_ID_COUNT);
        if reserved.iter().any(|&(a, b)| a < hi && lo < b) {
            continue;
        }
        usable += 1;
        let path = dir.join(slot.to_string());
        let lock_err = |source| IdSlotError::Lock {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(lock_err)?;
        if !try_lock(&file).map_err(lock_err)? {
            continue;
        }
        // Its last holder may have removed the file between our open and
        // our lock: then the lock is on a file nobody else will look at.
        let ours = file.metadata().map_err(lock_err)?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
            _ => continue,
        }
        return Ok(IdSlot {
            slot,
            path,
            _lock: file,
        });
    }
    Err(IdSlotError::Exhausted {
        usable,
        dir: dir.to_path_buf(),
    })
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    loop {
        // SAFETY: `f` is an open file; flock has no memory effects.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == b.len() as isize {
        u32::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        t ^ std::process::id()
    }
}

/// The id ranges `[start, end)` handed out in `/etc/subuid` and
/// `/etc/subgid`, which no slot may overlap.
pub fn reserved_ranges() -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for f in ["/etc/subuid", "/etc/subgid"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            out.extend(parse_subid(&s));
        }
    }
    out
}

/// `name:start:count` lines; anything else is skipped.
fn parse_subid(s: &str) -> Vec<(u64, u64)> {
    s.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (_, start, count) = (f.next()?, f.next()?, f.next()?);
            let start: u64 = start.trim().parse().ok()?;
            let count: u64 = count.trim().parse().ok()?;
            (count > 0).then_some((start, start + count))
        })
        .collect()
}

/// Whether the kernel stacks overlayfs on idmapped layers (5.19).
fn idmapped_layers_supported() -> bool {
    super::seccomp::running_kernel().is_some_and(|(a, b, _)| (a, b) >= (5, 19))
}

/// The host ids of one sandbox while it starts: its slot (rootful), the
/// host id root inside maps to, and the idmapping that shifts storage-range
/// files onto it.
pub(crate) struct HostIds {
    /// The slot until the sandbox takes it ([`HostIds::take_slot`]).
    slot: Option<IdSlot>,
    /// Rootful: the slot's first id, owner of the sandbox's user namespace.
    owner: Option<u32>,
    /// The host id root inside maps to (rootful).
    map_base: u32,
    /// A user namespace mapping the storage range onto `map_base`, made
    /// when first needed.
    storage_userns: OnceCell<OwnedFd>,
}

impl HostIds {
    /// Takes a slot for a rootful sandbox and records in `layers` which
    /// host ids the sandbox gets; nothing for a rootless one.
    pub(crate) fn acquire(
        spec: &SandboxSpec,
        rootful: bool,
        layers: &mut crate::Layers,
    ) -> Result<HostIds, Error> {
        if !rootful {
            return Ok(HostIds {
                slot: None,
                owner: None,
                map_base: 0,
                storage_userns: OnceCell::new(),
            });
        }
        let slot = IdSlot::acquire()?;
        let base = slot.base();
        let image = matches!(spec.root, Root::Layers(_));
        let map_base = if image && !idmapped_layers_supported() {
            ROOTFUL_ID_BASE
        } else {
            base
        };
        let end = |b: u32| b + (ROOTFUL_ID_COUNT - 1);
        layers.host_ids = if map_base == base {
            format!(
                "slot {}: host ids {base}-{}, user namespace owned by {base}",
                slot.slot(),
                end(base)
            )
        } else {
            format!(
                "slot {}: user namespace owned by {base}; ids are the shared storage range \
                 {map_base}-{} (this kernel cannot stack overlayfs on idmapped layers: Linux 5.19 can)",
                slot.slot(),
                end(map_base)
            )
        };
        Ok(HostIds {
            slot: Some(slot),
            owner: Some(base),
            map_base,
            storage_userns: OnceCell::new(),
        })
    }

    pub(crate) fn rootful(&self) -> bool {
        self.owner.is_some()
    }

    /// The host id root inside maps to (rootful only).
    pub(crate) fn map_base(&self) -> u32 {
        self.map_base
    }

    /// Whether files in the storage range must be shifted to be the
    /// sandbox's own (rootful, not running in the storage range itself).
    pub(crate) fn shifts_storage(&self) -> bool {
        self.rootful() && self.map_base != ROOTFUL_ID_BASE
    }

    /// The slot, for the sandbox to hold for its life.
    pub(crate) fn take_slot(&mut self) -> Option<IdSlot> {
        self.slot.take()
    }

    /// The uid_map and gid_map lines (rootful).
    pub(crate) fn map_line(&self) -> String {
        format!("0 {} {ROOTFUL_ID_COUNT}\n", self.map_base)
    }

    /// A user namespace (for idmapped mounts) mapping the storage range
    /// onto this sandbox's ids.
    fn storage_userns(&self) -> Result<RawFd, Error> {
        if let Some(fd) = self.storage_userns.get() {
            return Ok(fd.as_raw_fd());
        }
        let line = format!("{ROOTFUL_ID_BASE} {} {ROOTFUL_ID_COUNT}\n", self.map_base);
        let fd = idmap::userns_fd(&line, &line, self)?;
        Ok(self.storage_userns.get_or_init(|| fd).as_raw_fd())
    }

    /// A detached copy of the mount at `src_fd` on which storage-range
    /// owners show as this sandbox's ids, with `attrs` set too.
    pub(crate) fn shifted_tree(
        &self,
        src_fd: RawFd,
        attrs: u64,
        what: &str,
    ) -> Result<RawFd, Error> {
        let userns = self.storage_userns()?;
        idmap::idmapped_tree(src_fd, userns, attrs, what)
    }

    /// `clone(flags)` (fork semantics). Rootful, the calling thread's
    /// effective uid and gid are the slot's first id for the call, so a
    /// `CLONE_NEWUSER` namespace made by it is owned by that id and its
    /// ucounts are charged to it above its own level. The thread's ids,
    /// dumpable flag and parent-death signal (which the kernel resets on an
    /// effective id change) are restored in the parent; the child keeps the
    /// owner's ids until it makes itself root of its namespace, and every
    /// signal blocked.
    pub(crate) fn clone_fork(&self, flags: libc::c_ulong) -> io::Result<libc::pid_t> {
        let Some(owner) = self.owner else {
            return sys::clone_fork(flags);
        };
        let (uid, gid) = effective_ids();
        let dumpable = sys::prctl_get(libc::PR_GET_DUMPABLE);
        let pdeath = sys::get_pdeathsig();
        // No handler may run on this thread while it has the owner's ids.
        let saved_mask = sys::block_all_signals();
        let set = sys::set_effective_ids_raw(owner, owner);
        let r = match set {
            Ok(()) => sys::clone_fork(flags),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("setting the thread's effective ids to the sandbox's owner {owner}: {e}"),
            )),
        };
        if let Ok(0) = r {
            return r;
        }
        if let Err(e) = sys::set_effective_ids_raw(uid, gid) {
            // The saved ids are root's, so the kernel always allows this;
            // a runner left with another uid must not go on.
            eprintln!("nanoclaw: cannot restore the runner's effective ids: {e}");
            std::process::abort();
        }
        if let Ok(d) = dumpable {
            let _ = sys::prctl(libc::PR_SET_DUMPABLE, d as libc::c_ulong);
        }
        if let Ok(s) = pdeath {
            if s != 0 {
                let _ = sys::prctl(libc::PR_SET_PDEATHSIG, s as libc::c_ulong);
            }
        }
        sys::restore_signals(&saved_mask);
        r
    }
}

/// The calling thread's effective uid and gid.
fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// What `nanoclaw doctor` reports about id slots.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotReport {
    /// The lock directory.
    pub dir: String,
    /// Slots clear of /etc/subuid and /etc/subgid.
    pub usable: u32,
    /// Slots held by running sandboxes now.
    pub in_use: u32,
    /// Whether image sandboxes get their own range too (kernel ≥ 5.19);
    /// else they run in the shared storage range.
    pub image_layers_shifted: bool,
}

/// Counts usable and held slots (without taking any).
pub fn report() -> SlotReport {
    let reserved = reserved_ranges();
    let usable = SLOTS
        .filter(|&s| {
            let lo = u64::from(slot_base(s));
            let hi = lo + u64::from(ROOTFUL_ID_COUNT);
            !reserved.iter().any(|&(a, b)| a < hi && lo < b)
        })
        .count() as u32;
    let in_use = std::fs::read_dir(SLOT_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            File::open(e.path())
                .ok()
                .and_then(|f| try_lock(&f).ok())
                .is_some_and(|got| !got)
        })
        .count() as u32;
    SlotReport {
        dir: SLOT_DIR.into(),
        usable,
        in_use,
        image_layers_shifted: idmapped_layers_supported(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nanoclaw-idslot-{tag}-{}-{}",
            std::process::id(),
            random_u32()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn slots_stay_between_the_storage_range_and_the_foreign_range() {
        assert_eq!(slot_base(0), ROOTFUL_ID_BASE);
        assert_eq!(SLOTS.start, 1);
        let last = SLOTS.end - 1;
        assert_eq!(
            u64::from(slot_base(last)) + u64::from(ROOTFUL_ID_COUNT),
            0x7FFE_0000
        );
        assert_eq!(slot_of(slot_base(17) + 1000), Some(17));
        assert_eq!(slot_of(ROOTFUL_ID_BASE + 5), Some(0));
        assert_eq!(slot_of(1000), None);
        assert_eq!(slot_of(0x7FFE_0000), None);
        assert_eq!(slot_of(u32::MAX), None);
    }

    #[test]
    fn subid_lines_are_parsed_and_garbage_skipped() {
        let r = parse_subid("nanotest:100000:65536\n# c\nbad\nx:1:0\nroot:1073807360:10\n");
        assert_eq!(r, vec![(100_000, 165_536), (1_073_807_360, 1_073_807_370)]);
    }

    #[test]
    fn each_holder_gets_its_own_slot_until_none_is_left() {
        let d = tempdir("exhaust");
        let a = acquire_in(&d, 3..6, &[]).unwrap();
        let b = acquire_in(&d, 3..6, &[]).unwrap();
        let c = acquire_in(&d, 3..6, &[]).unwrap();
        let mut got = vec![a.slot(), b.slot(), c.slot()];
        got.sort_unstable();
        assert_eq!(got, vec![3, 4, 5]);
        let e = acquire_in(&d, 3..6, &[]).unwrap_err();
        assert!(matches!(e, IdSlotError::Exhausted { usable: 3, .. }), "{e}");
        assert!(e.to_string().contains("all 3 host id ranges"), "{e}");
        // Released on drop, and its file is gone.
        let freed = b.slot();
        drop(b);
        assert!(!d.join(freed.to_string()).exists());
        assert_eq!(acquire_in(&d, 3..6, &[]).unwrap().slot(), freed);
        drop((a, c));
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "files left behind"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reserved_ranges_are_skipped() {
        let d = tempdir("reserved");
        // Slot 4's range overlaps by one id at each end.
        let lo = u64::from(slot_base(4));
        let reserved = [(lo - 10, lo + 1), (lo + 65535, lo + 65536)];
        let a = acquire_in(&d, 4..6, &reserved).unwrap();
        assert_eq!(a.slot(), 5);
        let e = acquire_in(&d, 4..6, &reserved).unwrap_err();
        assert!(matches!(e, IdSlotError::Exhausted { usable: 1, .. }), "{e}");
        drop(a);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A holder that dies without cleaning up (SIGKILL) leaves its file
    /// but not its lock: the slot is free again at once.
    #[test]
    fn a_killed_holders_slot_is_free_again() {
        let d = tempdir("killed");
        let path = d.join("7");
        // The shell takes the lock on fd 9 and becomes `sleep`, which holds it.
        let mut holder = std::process::Command::new("/bin/sh")
            .args(["-c", "exec 9>>\"$0\" && flock -n 9 && exec sleep 60"])
            .arg(&path)
            .spawn()
            .unwrap();
        let held = || {
            File::open(&path)
                .ok()
                .and_then(|f| try_lock(&f).ok())
                .is_some_and(|got| !got)
        };
        let t0 = std::time::Instant::now();
        while !held() {
            assert!(
                t0.elapsed().as_secs() < 10,
                "the holder did not take the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let e = acquire_in(&d, 7..8, &[]).unwrap_err();
        assert!(matches!(e, IdSlotError::Exhausted { .. }), "{e}");
        holder.kill().unwrap();
        holder.wait().unwrap();
        let s = acquire_in(&d, 7..8, &[]).unwrap();
        assert_eq!(s.slot(), 7);
        drop(s);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "files left behind"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Releasing a slot removes the files that dead holders left (not those
    /// of live ones).
    #[test]
    fn a_release_sweeps_dead_holders_files() {
        let d = tempdir("sweep");
        for n in [20, 21, 22] {
            std::fs::write(d.join(n.to_string()), "").unwrap();
        }
        let live = acquire_in(&d, 30..31, &[]).unwrap();
        let mine = acquire_in(&d, 31..32, &[]).unwrap();
        drop(mine);
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["30".to_string()],
            "only the live holder's file stays"
        );
        drop(live);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A file removed by its holder between another's open and lock is not
    /// taken as owned.
    #[test]
    fn a_lock_on_a_removed_file_does_not_count() {
        let d = tempdir("unlinked");
        let path = d.join("9");
        let stale = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(try_lock(&stale).unwrap());
        // Our stale lock is on an orphan: the slot is still free to take.
        let s = acquire_in(&d, 9..10, &[]).unwrap();
        assert_eq!(s.slot(), 9);
        drop((s, stale));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
