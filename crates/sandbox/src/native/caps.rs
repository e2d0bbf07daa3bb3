//! Capabilities: every set empty by default, `--cap-add` for a vetted few.
//!
//! A sandboxed process starts as uid 0 of its own user namespace, with every
//! capability *of that namespace*. [`drop_privileges`] switches it to the
//! sandbox user and leaves it with exactly the capabilities the operator asked
//! for ([`parse_cap`]; none by default) in all five sets: effective,
//! permitted, inheritable, ambient (so they survive `execve` for a non-root
//! uid) and bounding (so nothing can ever be regained, even by uid 0 or a file
//! capability).
//!
//! A capability granted here is only ever one of the sandbox's user namespace:
//! it acts on objects that namespace owns (its mounts, its ipc/net/uts
//! namespaces, files whose owner is mapped into it). Some capabilities the
//! kernel checks against the *initial* user namespace (`capable()`), so
//! granting them has no effect in a sandbox; [`Cap::note`] says so.

use std::fmt;

/// One Linux capability that may be granted with `--cap-add`.
///
/// Values are only made by [`parse_cap`] (or the constants here), so a `Cap`
/// is never one of the refused, dangerous capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cap(u8);

/// Whether a capability may be granted, and why.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// May be granted; the note says what it does in a sandbox.
    Allowed(&'static str),
    /// Refused; the reason says why.
    Refused(&'static str),
}

use Verdict::{Allowed, Refused};

/// Every capability the kernel knows (index = capability number), with our
/// decision and its reason. Reviewable data: change a decision here.
const CAPS: [(&str, Verdict); 41] = [
    ("CHOWN", Allowed("change file owners to uids/gids mapped in the sandbox (package installs)")),
    ("DAC_OVERRIDE", Allowed("bypass file permission checks on files owned by uids mapped in the sandbox; the read-only root and Landlock still apply")),
    ("DAC_READ_SEARCH", Refused("bypasses read permission checks and enables open_by_handle_at, the classic container escape (\"shocker\") that opens host files by handle")),
    ("FOWNER", Allowed("act as owner (chmod, utime) on files owned by uids mapped in the sandbox")),
    ("FSETID", Allowed("keep set-user/group-ID bits when modifying files; mounts are nosuid, so they grant nothing")),
    ("KILL", Allowed("signal any process of the sandbox's uids; processes outside the sandbox are invisible (pid namespace) and scoped out by Landlock")),
    ("SETGID", Allowed("switch to gids mapped in the sandbox (e.g. package installers dropping to a service group)")),
    ("SETUID", Allowed("switch to uids mapped in the sandbox (e.g. package installers dropping to a service user)")),
    ("SETPCAP", Allowed("only lets the sandbox drop capabilities further or change securebits; the bounding set stays as granted")),
    ("LINUX_IMMUTABLE", Refused("sets immutable/append-only flags that the host's own tools and cleanup cannot undo without root; checked against the host namespace anyway")),
    ("NET_BIND_SERVICE", Allowed("bind ports below 1024 inside the sandbox's own network namespace")),
    ("NET_BROADCAST", Allowed("unused by current kernels; acts only in the sandbox's own network namespace")),
    ("NET_ADMIN", Refused("reconfigures interfaces, routes and firewall rules; would let sandboxed code undo the network policy of its namespace")),
    ("NET_RAW", Refused("opens raw and packet sockets: spoofed packets and ways around the egress policy")),
    ("IPC_LOCK", Allowed("lock memory; limited by the memory cgroup (the kernel checks the host namespace, so it rarely has an effect)")),
    ("IPC_OWNER", Refused("bypasses System V IPC permission checks; no build or package step needs it")),
    ("SYS_MODULE", Refused("loads kernel modules: arbitrary code in the host kernel")),
    ("SYS_RAWIO", Refused("raw I/O port and device access (iopl, /dev/mem): direct access to host hardware")),
    ("SYS_CHROOT", Allowed("chroot inside the sandbox (the default seccomp profile still refuses chroot(2); it needs a custom profile)")),
    ("SYS_PTRACE", Refused("traces and rewrites other processes' memory; the sandbox's runtime and init must stay untouchable")),
    ("SYS_PACCT", Refused("switches host-wide process accounting on or off")),
    ("SYS_ADMIN", Refused("the catch-all capability: mount, namespaces, BPF maps, quotas and much more; it makes most container escapes possible")),
    ("SYS_BOOT", Refused("reboots (or kexec-loads) the machine, or kills the whole sandbox from inside")),
    ("SYS_NICE", Allowed("raise the priority of sandbox processes (the kernel checks realtime scheduling against the host namespace, so it rarely has an effect); cpu is still capped by the cgroup")),
    ("SYS_RESOURCE", Allowed("raise resource limits (checked against the host namespace, so it rarely has an effect); cgroup limits still hold")),
    ("SYS_TIME", Refused("sets the host's system clock, which every other process and TLS certificate check depends on")),
    ("SYS_TTY_CONFIG", Refused("vhangup and terminal configuration: can hang up the host's terminals")),
    ("MKNOD", Allowed("create special files; device nodes are useless in a user namespace and every mount is nodev, so only FIFOs and sockets result")),
    ("LEASE", Refused("takes leases on files it did not create, e.g. a read-only workspace, stalling host writers for the lease-break time")),
    ("AUDIT_WRITE", Allowed("write to the audit log (needed by some login and package tools); the audit socket only exists in the host network namespace")),
    ("AUDIT_CONTROL", Refused("changes the host's audit rules and can switch auditing off")),
    ("SETFCAP", Allowed("set file capabilities; they are namespaced to the sandbox and ignored on its nosuid mounts (refused with a read-write mount of a root-owned directory, where they would count as root's on the host)")),
    ("MAC_OVERRIDE", Refused("overrides mandatory access control (AppArmor, SELinux, Smack)")),
    ("MAC_ADMIN", Refused("reconfigures mandatory access control policy (AppArmor, SELinux, Smack)")),
    ("SYSLOG", Refused("reads and clears the kernel log and exposes kernel addresses, defeating KASLR")),
    ("WAKE_ALARM", Refused("programs alarms that wake the host from suspend")),
    ("BLOCK_SUSPEND", Refused("prevents the host from suspending")),
    ("AUDIT_READ", Refused("reads the host's audit log over netlink: other users' activity")),
    ("PERFMON", Refused("performance monitoring of the host kernel and other processes: side channels and kernel attack surface")),
    ("BPF", Refused("loads BPF programs and creates maps: a large kernel attack surface")),
    ("CHECKPOINT_RESTORE", Refused("chooses pids and reads /proc/*/map_files: tools for attacking other processes")),
];

/// The highest capability number this module knows (CAP_CHECKPOINT_RESTORE).
pub const LAST_KNOWN_CAP: u8 = 40;

impl Cap {
    /// CAP_CHOWN.
    pub const CHOWN: Cap = Cap(0);
    /// CAP_DAC_OVERRIDE.
    pub const DAC_OVERRIDE: Cap = Cap(1);
    /// CAP_FOWNER.
    pub const FOWNER: Cap = Cap(3);
    /// CAP_FSETID.
    pub const FSETID: Cap = Cap(4);
    /// CAP_SETFCAP.
    pub const SETFCAP: Cap = Cap(31);
    /// CAP_SETGID.
    pub const SETGID: Cap = Cap(6);
    /// CAP_SETUID.
    pub const SETUID: Cap = Cap(7);
    /// CAP_NET_BIND_SERVICE.
    pub const NET_BIND_SERVICE: Cap = Cap(10);

    /// The name without the `CAP_` prefix, e.g. `"CHOWN"`.
    pub fn name(self) -> &'static str {
        CAPS[usize::from(self.0)].0
    }

    /// The capability number (`CAP_CHOWN` = 0).
    pub fn number(self) -> u8 {
        self.0
    }

    /// What granting it means inside a sandbox.
    pub fn note(self) -> &'static str {
        match CAPS[usize::from(self.0)].1 {
            Allowed(n) | Refused(n) => n,
        }
    }

    /// Every capability `--cap-add` accepts.
    pub fn grantable() -> impl Iterator<Item = Cap> {
        (0..=LAST_KNOWN_CAP)
            .filter(|&i| matches!(CAPS[usize::from(i)].1, Allowed(_)))
            .map(Cap)
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAP_{}", self.name())
    }
}

/// The bit mask of `caps` (bit n = capability n).
pub fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0u64, |m, c| m | (1u64 << c.0))
}

/// The names of the capabilities in `mask` (unknown bits as `"CAP_<n>"`).
pub fn names(mask: u64) -> Vec<String> {
    (0..64u8)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| match CAPS.get(usize::from(i)) {
            Some((n, _)) => format!("CAP_{n}"),
            None => format!("CAP_{i}"),
        })
        .collect()
}

/// Everything that can go wrong with capabilities.
///
/// The refusals ([`CapError::Dangerous`], [`CapError::All`],
/// [`CapError::Unknown`]) name no flag or config key: the same message
/// answers `--cap-add` and a config file's `cap_add` alike.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// A capability that nanoclaw never grants.
    #[error(
        "capability {name} is refused: CAP_{name} {reason}. Nanoclaw never grants it; \
         run the step outside the sandbox if it truly needs it"
    )]
    Dangerous {
        /// The capability name (without `CAP_`).
        name: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
    /// `ALL`, which would include every refused capability.
    #[error("capability ALL is refused: it would grant SYS_ADMIN and the other dangerous capabilities; list the few you need (grantable: {grantable})")]
    All {
        /// The accepted names.
        grantable: String,
    },
    /// A name that is not a capability.
    #[error(
        "no such capability {name:?}{}; grantable: {grantable}",
        did_you_mean(near)
    )]
    Unknown {
        /// What was given.
        name: String,
        /// Known capability names close to it, closest first (at most 3).
        near: Vec<&'static str>,
        /// The accepted names.
        grantable: String,
    },
    /// A system call of [`drop_privileges`] failed.
    #[error("dropping privileges: {call} failed: {}{hint}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        /// The failing call.
        call: &'static str,
        /// The errno.
        errno: i32,
        /// What to do about it.
        hint: &'static str,
    },
    /// After dropping, the kernel reports other sets than intended.
    #[error("dropping privileges: capabilities still held after capset (effective {effective:#x}, permitted {permitted:#x}); this is a nanoclaw bug")]
    Verify {
        /// CapEff as read back.
        effective: u64,
        /// CapPrm as read back.
        permitted: u64,
    },
    /// `/proc/self/status` could not be read or parsed.
    #[error("reading capabilities from /proc/self/status: {0}")]
    Status(String),
}

/// Levenshtein distance (ASCII, short names).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `"; did you mean X or Y?"`, or nothing.
fn did_you_mean(near: &[&str]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", near.join(" or "))
    }
}

/// A capability name as written by a user (`chown`, `CAP_CHOWN`,
/// `cap-chown`) in the table's spelling (`CHOWN`), without checking it.
fn normalize(name: &str) -> String {
    let up = name.trim().to_ascii_uppercase().replace('-', "_");
    match up.strip_prefix("CAP_") {
        Some(bare) => bare.to_string(),
        None => up,
    }
}

/// The table's name of a capability the kernel knows, granted or not
/// (`"cap_sys_admin"` → `"SYS_ADMIN"`); `None` for anything else.
pub fn canonical_name(name: &str) -> Option<&'static str> {
    let bare = normalize(name);
    CAPS.iter().map(|(n, _)| *n).find(|n| *n == bare)
}

fn grantable_list() -> String {
    Cap::grantable()
        .map(Cap::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a capability name from `--cap-add` or a config's `cap_add`:
/// with or without the `CAP_` prefix, any case (`chown`, `CAP_CHOWN`,
/// `Cap_Chown`). This table is the only place that decides: dangerous
/// capabilities (and `ALL`) are refused with the reason; unknown names get
/// suggestions.
pub fn parse_cap(name: &str) -> Result<Cap, CapError> {
    let bare = normalize(name);
    if let Some(i) = CAPS.iter().position(|(n, _)| *n == bare) {
        return match CAPS[i].1 {
            Allowed(_) => Ok(Cap(i as u8)),
            Refused(reason) => Err(CapError::Dangerous {
                name: CAPS[i].0,
                reason,
            }),
        };
    }
    if bare == "ALL" {
        return Err(CapError::All {
            grantable: grantable_list(),
        });
    }
    let mut near: Vec<(usize, &'static str)> = CAPS
        .iter()
        .map(|(n, _)| {
            let d = if !bare.is_empty() && (n.contains(bare.as_str()) || bare.contains(n)) {
                0
            } else {
                distance(&bare, n)
            };
            (d, *n)
        })
        .filter(|(d, n)| *d <= (n.len() / 3).max(2))
        .collect();
    near.sort();
    Err(CapError::Unknown {
        name: name.to_string(),
        near: near.iter().take(3).map(|(_, n)| *n).collect(),
        grantable: grantable_list(),
    })
}

/// The five capability sets of a process, as bit masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    /// CapEff.
    pub effective: u64,
    /// CapPrm.
    pub permitted: u64,
    /// CapInh.
    pub inheritable: u64,
    /// CapAmb.
    pub ambient: u64,
    /// CapBnd.
    pub bounding: u64,
}

impl CapSets {
    /// Parses the `Cap*` lines of a `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> Option<CapSets> {
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            u64::from_str_radix(line[key.len()..].trim(), 16).ok()
        };
        Some(CapSets {
            effective: field("CapEff:")?,
            permitted: field("CapPrm:")?,
            inheritable: field("CapInh:")?,
            ambient: field("CapAmb:")?,
            bounding: field("CapBnd:")?,
        })
    }

    /// True when every set is empty.
    pub fn is_empty(&self) -> bool {
        *self == CapSets::default()
    }
}

/// The calling process's capability sets, from `/proc/self/status`.
pub fn read_current() -> Result<CapSets, CapError> {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| CapError::Status(e.to_string()))?;
    CapSets::parse(&s).ok_or_else(|| CapError::Status("no Cap* lines".to_string()))
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn sys_err(call: &'static str, hint: &'static str) -> CapError {
    CapError::Syscall {
        call,
        errno: errno(),
        hint,
    }
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capset(m: u64) -> Result<(), CapError> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let lo = m as u32;
    let hi = (m >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: header and two data structs of the v3 ABI, valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(sys_err("capset", ""));
    }
    Ok(())
}

fn capget() -> Result<(u64, u64, u64), CapError> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and room for two data structs of the v3 ABI.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(sys_err("capget", ""));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

fn prctl(
    op: libc::c_int,
    a: libc::c_ulong,
    b: libc::c_ulong,
    call: &'static str,
) -> Result<libc::c_int, CapError> {
    // SAFETY: the prctl operations used here take integer arguments only.
    let r = unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(sys_err(call, ""));
    }
    Ok(r)
}

/// Switches the calling process to `uid:gid` keeping exactly `keep`.
///
/// Runs in the sandboxed child (uid 0 inside its user namespace, full
/// capabilities there) after every step that needs privileges (mounts,
/// `pivot_root`, hostname) and before `PR_SET_NO_NEW_PRIVS`, Landlock,
/// seccomp and `execve`. Steps, in order:
///
/// 1. `setgroups([gid])`; `EPERM` (rootless: `/proc/<pid>/setgroups` is
///    `deny`) is skipped, the groups then stay what the user namespace maps;
/// 2. `setresgid(gid, gid, gid)`;
/// 3. `PR_SET_KEEPCAPS` so the permitted set survives the uid change;
/// 4. every capability not in `keep` dropped from the bounding set
///    (`PR_CAPBSET_DROP`, while CAP_SETPCAP is still effective);
/// 5. the ambient set cleared;
/// 6. `setresuid(uid, uid, uid)`;
/// 7. `capset`: effective = permitted = inheritable = `keep`;
/// 8. `PR_SET_KEEPCAPS` off again; `keep` raised in the ambient set so it
///    survives `execve` for a non-root uid;
/// 9. read back with `capget` and checked.
///
/// Does not allocate (safe between `fork` and `execve`); an error names the
/// failing call. Must run single-threaded (the calls act per thread).
pub fn drop_privileges(uid: u32, gid: u32, keep: &[Cap]) -> Result<(), CapError> {
    let want = mask(keep);
    // Raw syscalls, not glibc's wrappers: those wait for every thread the
    // C library believes the process has, and a child cloned from a
    // multithreaded runner has only one (see sys::setgroups_raw).
    if super::sys::setgroups_raw(&[gid]).is_err() && errno() != libc::EPERM {
        return Err(sys_err("setgroups", ""));
    }
    if super::sys::setresgid_raw(gid).is_err() {
        return Err(sys_err(
            "setresgid",
            "; the gid must be mapped in the sandbox's user namespace (check --user and the gid map)",
        ));
    }
    prctl(libc::PR_SET_KEEPCAPS, 1, 0, "prctl(PR_SET_KEEPCAPS, 1)")?;
    // Drop blindly (dropping an absent capability succeeds): reading each
    // first would double the ~40 calls. EINVAL means past the kernel's last
    // capability.
    for cap in 0..64u8 {
        if want & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: integer-only prctl.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if r != 0 {
            if errno() == libc::EINVAL {
                break;
            }
            return Err(sys_err("prctl(PR_CAPBSET_DROP)", ""));
        }
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    )?;
    if super::sys::setresuid_raw(uid).is_err() {
        return Err(sys_err(
            "setresuid",
            "; the uid must be mapped in the sandbox's user namespace (check --user and the uid map)",
        ));
    }
    // Each id change above reset the address space's dumpable flag to the
    // host's `fs.suid_dumpable`. A command started with `clone_vfork`
    // shares init's address space until its execve: with that setting at 1,
    // once the capabilities below are gone a process of the same uid could
    // read init's memory and descriptors through /proc/PID in that window,
    // stopped only by Landlock (tests/vfork_window.rs, the case without
    // it). So non-dumpable again before they go (dropping capabilities
    // does not reset the flag); execve gives the command its own.
    prctl(libc::PR_SET_DUMPABLE, 0, 0, "prctl(PR_SET_DUMPABLE, 0)")?;
    capset(want)?;
    prctl(libc::PR_SET_KEEPCAPS, 0, 0, "prctl(PR_SET_KEEPCAPS, 0)")?;
    for c in keep {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(c.0),
            "prctl(PR_CAP_AMBIENT_RAISE)",
        )?;
    }
    let (eff, prm, inh) = capget()?;
    if eff != want || prm != want || inh != want {
        return Err(CapError::Verify {
            effective: eff,
            permitted: prm,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::ffi::CString;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    #[test]
    fn parse_accepts_any_spelling() {
        for s in [
            "chown",
            "CHOWN",
            "CAP_CHOWN",
            "cap_chown",
            "Cap_Chown",
            " chown ",
        ] {
            assert_eq!(parse_cap(s).unwrap(), Cap::CHOWN, "{s}");
        }
        assert_eq!(
            parse_cap("net-bind-service").unwrap(),
            Cap::NET_BIND_SERVICE
        );
        assert_eq!(Cap::CHOWN.name(), "CHOWN");
        assert_eq!(Cap::CHOWN.to_string(), "CAP_CHOWN");
        assert_eq!(parse_cap("setfcap").unwrap().number(), 31);
    }

    #[test]
    fn table_matches_kernel_numbers() {
        // Spot checks against <linux/capability.h>.
        let num = |n: &str| CAPS.iter().position(|(x, _)| *x == n).unwrap();
        assert_eq!(num("SYS_ADMIN"), 21);
        assert_eq!(num("MKNOD"), 27);
        assert_eq!(num("SETFCAP"), 31);
        assert_eq!(num("SYSLOG"), 34);
        assert_eq!(num("BPF"), 39);
        assert_eq!(num("CHECKPOINT_RESTORE"), 40);
        let last: u8 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(last >= LAST_KNOWN_CAP, "kernel knows fewer caps: {last}");
    }

    #[test]
    fn dangerous_caps_refused_with_reason() {
        for n in [
            "SYS_ADMIN",
            "SYS_MODULE",
            "SYS_PTRACE",
            "SYS_RAWIO",
            "SYS_BOOT",
            "NET_ADMIN",
            "NET_RAW",
            "BPF",
            "PERFMON",
            "MAC_ADMIN",
            "MAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "SYSLOG",
            "SYS_TIME",
            "LINUX_IMMUTABLE",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_CONTROL",
            "AUDIT_READ",
            "CHECKPOINT_RESTORE",
            "SYS_PACCT",
            "SYS_TTY_CONFIG",
            "LEASE",
            "IPC_OWNER",
        ] {
            match parse_cap(&format!("cap_{}", n.to_lowercase())) {
                Err(e @ CapError::Dangerous { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains(n) && m.contains("refused"), "{m}");
                    assert!(m.len() > 60, "reason too short: {m}");
                }
                other => panic!("{n}: {other:?}"),
            }
        }
        let m = parse_cap("SYS_ADMIN").unwrap_err().to_string();
        assert!(m.contains("mount"), "{m}");
    }

    #[test]
    fn grantable_set_is_the_documented_one() {
        let g: Vec<&str> = Cap::grantable().map(Cap::name).collect();
        assert_eq!(
            g,
            [
                "CHOWN",
                "DAC_OVERRIDE",
                "FOWNER",
                "FSETID",
                "KILL",
                "SETGID",
                "SETUID",
                "SETPCAP",
                "NET_BIND_SERVICE",
                "NET_BROADCAST",
                "IPC_LOCK",
                "SYS_CHROOT",
                "SYS_NICE",
                "SYS_RESOURCE",
                "MKNOD",
                "AUDIT_WRITE",
                "SETFCAP"
            ]
        );
    }

    #[test]
    fn unknown_names_get_suggestions() {
        let m = parse_cap("CAP_CHWON").unwrap_err().to_string();
        assert!(m.contains("did you mean CHOWN"), "{m}");
        let m = parse_cap("net_bind").unwrap_err().to_string();
        assert!(m.contains("NET_BIND_SERVICE"), "{m}");
        let m = parse_cap("setuld").unwrap_err().to_string();
        assert!(m.contains("did you mean SETUID"), "{m}");
        let m = parse_cap("frobnicate").unwrap_err().to_string();
        assert!(
            m.contains("no such capability") && !m.contains("did you mean"),
            "{m}"
        );
        assert!(m.contains("grantable: CHOWN"), "{m}");
    }

    #[test]
    fn all_and_canonical_names() {
        let m = parse_cap("all").unwrap_err().to_string();
        assert!(m.contains("ALL is refused") && m.contains("CHOWN"), "{m}");
        assert_eq!(canonical_name("cap_sys_admin"), Some("SYS_ADMIN"));
        assert_eq!(canonical_name("Net-Raw"), Some("NET_RAW"));
        assert_eq!(canonical_name("CHOWN"), Some("CHOWN"));
        assert_eq!(canonical_name("ALL"), None);
        assert_eq!(canonical_name("frobnicate"), None);
        match parse_cap("CHWON") {
            Err(CapError::Unknown { near, .. }) => assert_eq!(near.first(), Some(&"CHOWN")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mask_and_names() {
        assert_eq!(mask(&[Cap::CHOWN, Cap::SETUID]), 0b1000_0001);
        assert_eq!(names(0b1000_0001), ["CAP_CHOWN", "CAP_SETUID"]);
        assert_eq!(names(1 << 50), ["CAP_50"]);
    }

    #[test]
    fn status_parse() {
        let s = "Name:\tcat\nCapInh:\t0000000000000001\nCapPrm:\t0000000000000003\n\
                 CapEff:\t0000000000000002\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        let c = CapSets::parse(s).unwrap();
        assert_eq!(
            c,
            CapSets {
                effective: 2,
                permitted: 3,
                inheritable: 1,
                ambient: 0,
                bounding: 0x1ff_ffff_ffff
            }
        );
        assert!(CapSets::parse("Name: x\n").is_none());
        // We run as root in tests: something is held.
        assert!(!read_current().unwrap().is_empty());
    }

    // ---------- real kernel: a child in a fresh user namespace ----------

    struct Report {
        before_exec: String,
        after_exec: String,
        code: i32,
    }

    fn pipe() -> (i32, i32) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-int array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        (fds[0], fds[1])
    }

    fn write_all(fd: i32, b: &[u8]) {
        let mut off = 0;
        while off < b.len() {
            // SAFETY: writing from a live slice.
            let n = unsafe { libc::write(fd, b[off..].as_ptr().cast(), b.len() - off) };
            if n <= 0 {
                return;
            }
            off += n as usize;
        }
    }

    /// Forks a child that enters a new user namespace (mapped by us:
    /// 0..65536 -> 100000..165536), calls `drop_privileges(uid, gid, keep)`,
    /// writes its own /proc/self/status, then execs `sh -c script` with stdout
    /// to the same pipe. `deny_setgroups` simulates rootless mode.
    fn run_in_userns(
        uid: u32,
        gid: u32,
        keep: &[Cap],
        script: &str,
        deny_setgroups: bool,
    ) -> Report {
        let keep = keep.to_vec();
        let sh = CString::new("/bin/sh").unwrap();
        let dash_c = CString::new("-c").unwrap();
        let script = CString::new(script).unwrap();
        let argv = [
            sh.as_ptr(),
            dash_c.as_ptr(),
            script.as_ptr(),
            std::ptr::null(),
        ];
        let envp = [c"PATH=/usr/bin:/bin".as_ptr(), std::ptr::null()];
        let (ready_r, ready_w) = pipe();
        let (go_r, go_w) = pipe();
        let (out_r, out_w) = pipe();
        // SAFETY: fork in a test; the child only makes syscalls (no
        // allocation) until execve or _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: child side: only async-signal-safe syscalls on our own fds.
            unsafe {
                let fail = |code: i32| -> ! {
                    libc::_exit(code);
                };
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    fail(40);
                }
                libc::write(ready_w, b"r".as_ptr().cast(), 1);
                let mut b = [0u8; 1];
                if libc::read(go_r, b.as_mut_ptr().cast(), 1) != 1 {
                    fail(41);
                }
                if let Err(e) = drop_privileges(uid, gid, &keep) {
                    if let CapError::Syscall { errno, .. } = e {
                        write_all(out_w, b"ERR ");
                        write_all(out_w, &errno.to_le_bytes());
                    }
                    fail(42);
                }
                let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
                let mut buf = [0u8; 8192];
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    fail(43);
                }
                write_all(out_w, &buf[..n as usize]);
                write_all(out_w, b"====\n");
                libc::dup2(out_w, 1);
                libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr());
                fail(44);
            }
        }
        // SAFETY: closing our copies of the child's ends.
        unsafe {
            libc::close(ready_w);
            libc::close(go_r);
            libc::close(out_w);
        }
        let mut b = [0u8; 1];
        // SAFETY: reading one byte into a live buffer.
        assert_eq!(unsafe { libc::read(ready_r, b.as_mut_ptr().cast(), 1) }, 1);
        if deny_setgroups {
            std::fs::write(format!("/proc/{pid}/setgroups"), "deny").unwrap();
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), "0 100000 65536\n").unwrap();
        std::fs::write(format!("/proc/{pid}/gid_map"), "0 100000 65536\n").unwrap();
        write_all(go_w, b"g");
        // SAFETY: taking ownership of our read end.
        let mut out = unsafe { std::fs::File::from_raw_fd(out_r) };
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child; closing our fds.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
            libc::close(ready_r);
            libc::close(go_w);
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        let (a, b) = text.split_once("====\n").unwrap_or((&text, ""));
        Report {
            before_exec: a.to_string(),
            after_exec: b.to_string(),
            code,
        }
    }

    fn ids(status: &str, key: &str) -> String {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| {
                l[key.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("nanoclaw-caps-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(101000), Some(101000)).unwrap();
        p
    }

    #[test]
    fn drop_all_caps() {
        let dir = tempdir("none");
        let f = dir.join("f");
        std::fs::write(&f, "").unwrap();
        std::os::unix::fs::chown(&f, Some(101000), Some(101000)).unwrap();
        let script = format!(
            "cat /proc/self/status; chown 1002 {} 2>/dev/null && echo CHOWN_OK || echo CHOWN_DENIED",
            f.display()
        );
        let r = run_in_userns(1000, 1000, &[], &script, false);
        assert_eq!(r.code, 0, "{}", r.before_exec);
        for (when, s) in [
            ("before exec", &r.before_exec),
            ("after exec", &r.after_exec),
        ] {
            let c = CapSets::parse(s).unwrap();
            assert!(c.is_empty(), "{when}: {c:?}");
            assert_eq!(ids(s, "Uid:"), "1000 1000 1000 1000", "{when}");
            assert_eq!(ids(s, "Gid:"), "1000 1000 1000 1000", "{when}");
            assert_eq!(ids(s, "Groups:"), "1000", "{when}");
        }
        assert!(r.after_exec.contains("CHOWN_DENIED"), "{}", r.after_exec);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keep_chown_survives_exec_via_ambient() {
        let dir = tempdir("chown");
        let f = dir.join("f");
        std::fs::write(&f, "").unwrap();
        std::os::unix::fs::chown(&f, Some(101000), Some(101000)).unwrap();
        let script = format!(
            "cat /proc/self/status; chown 1002 {} && echo CHOWN_OK || echo CHOWN_DENIED",
            f.display()
        );
        let r = run_in_userns(1000, 1000, &[Cap::CHOWN], &script, false);
        assert_eq!(r.code, 0);
        let one = CapSets {
            effective: 1,
            permitted: 1,
            inheritable: 1,
            ambient: 1,
            bounding: 1,
        };
        assert_eq!(CapSets::parse(&r.before_exec).unwrap(), one);
        // The exec'd shell (and the chown it runs) still hold CAP_CHOWN.
        assert_eq!(CapSets::parse(&r.after_exec).unwrap(), one);
        assert_eq!(ids(&r.after_exec, "Uid:"), "1000 1000 1000 1000");
        assert!(r.after_exec.contains("CHOWN_OK"), "{}", r.after_exec);
        // The chown happened in the namespace: 1002 inside is 101002 outside.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 101002);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn root_inside_gets_nothing_after_exec() {
        // uid 0 inside: exec would normally grant the full bounding set.
        let r = run_in_userns(0, 0, &[], "cat /proc/self/status", false);
        assert_eq!(r.code, 0);
        assert!(CapSets::parse(&r.before_exec).unwrap().is_empty());
        let after = CapSets::parse(&r.after_exec).unwrap();
        assert!(after.is_empty(), "{after:?}");
        assert_eq!(ids(&r.after_exec, "Uid:"), "0 0 0 0");
    }

    #[test]
    fn rootless_setgroups_denied_is_skipped() {
        let r = run_in_userns(1000, 1000, &[], "cat /proc/self/status", true);
        assert_eq!(r.code, 0, "{}", r.before_exec);
        assert!(CapSets::parse(&r.after_exec).unwrap().is_empty());
        assert_eq!(ids(&r.after_exec, "Gid:"), "1000 1000 1000 1000");
    }

    #[test]
    fn unmapped_uid_is_a_named_error() {
        // 70000 is outside the 65536-id map: setresgid fails with EINVAL.
        let r = run_in_userns(70000, 70000, &[], "true", false);
        assert_eq!(r.code, 42);
        assert!(r.before_exec.starts_with("ERR "));
        let e = CapError::Syscall {
            call: "setresgid",
            errno: libc::EINVAL,
            hint: "; the gid must be mapped",
        };
        assert!(e.to_string().contains("setresgid failed: Invalid argument"));
    }
}
