//! The seccomp-bpf layer.
//!
//! * [`default_filter`]: nanoclaw's built-in profile, `seccomp/default.json`
//!   (reviewable data with a reason per rule), compiled to BPF once by
//!   `build.rs` and embedded as a `static`; a run only hands it to the kernel.
//! * [`load_docker_profile`]: a Docker-format JSON profile (`--seccomp PATH`),
//!   evaluated against the sandbox's capabilities, this architecture and the
//!   running kernel, and compiled by the same compiler
//!   (`seccomp/compiler.rs`, no libseccomp).
//! * [`Filter::install`]: called in the sandboxed child right before
//!   `execve`, after `PR_SET_NO_NEW_PRIVS`; it does not allocate.
//!
//! Every program starts with an architecture check (other ABIs — ia32 and
//! x32 on x86_64, aarch32 on aarch64 — are killed with SIGSYS) and then
//! applies the rules. See `seccomp/compiler.rs` for the exact semantics.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
compile_error!(
    "nanoclaw's seccomp layer supports Linux on x86_64 and aarch64 only: add a syscall table \
     under crates/sandbox/seccomp/ and an Arch variant in seccomp/compiler.rs to port it"
);

#[allow(dead_code)]
#[path = "../../seccomp/compiler.rs"]
mod compiler;

pub use compiler::ProfileError;

// `static DEFAULT_PROGRAM: [libc::sock_filter; N]`, written by build.rs. A
// Rust static rather than include_bytes!, so the instructions are correctly
// aligned `sock_filter`s with no conversion at run time.
include!(concat!(env!("OUT_DIR"), "/seccomp_default.rs"));

/// The architecture this binary was built for.
#[cfg(target_arch = "x86_64")]
const NATIVE: compiler::Arch = compiler::Arch::X86_64;
#[cfg(target_arch = "aarch64")]
const NATIVE: compiler::Arch = compiler::Arch::Aarch64;

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;

/// Errors of the seccomp layer.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile file could not be read.
    #[error("cannot read seccomp profile {path}: {source}; check the path given to --seccomp")]
    Read {
        /// The profile's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The profile is not a valid Docker seccomp profile.
    #[error("invalid seccomp profile {path}: {error}")]
    Profile {
        /// The profile's path (or `<inline>`).
        path: PathBuf,
        /// Which field is wrong and why.
        error: ProfileError,
    },
    /// The kernel refused the filter.
    #[error("{}", install_message(*.errno))]
    Install {
        /// The errno of `seccomp(2)` (or of `prctl(2)` on old kernels).
        errno: i32,
    },
}

fn install_message(errno: i32) -> String {
    let why = std::io::Error::from_raw_os_error(errno);
    match errno {
        libc::EACCES => format!(
            "installing the seccomp filter failed ({why}): PR_SET_NO_NEW_PRIVS must be set first"
        ),
        libc::EINVAL => format!(
            "installing the seccomp filter failed ({why}): this kernel lacks \
             CONFIG_SECCOMP_FILTER or refused the program; run `nanoclaw doctor`"
        ),
        _ => format!("installing the seccomp filter failed: {why}"),
    }
}

/// A compiled seccomp-bpf program, ready to install.
#[derive(Clone)]
pub struct Filter {
    insns: Cow<'static, [libc::sock_filter]>,
    flags: u32,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("instructions", &self.insns.len())
            .field("flags", &self.flags)
            .finish()
    }
}

/// The built-in profile's source, in Docker's JSON format (with nanoclaw's
/// comments and its `nanoclaw` extension): what a backend that takes
/// Docker profiles (Docker itself) is given.
pub const DEFAULT_PROFILE_JSON: &str = include_str!("../../seccomp/default.json");

/// The built-in profile (`seccomp/default.json`), compiled at build time.
pub fn default_filter() -> Filter {
    Filter {
        insns: Cow::Borrowed(&DEFAULT_PROGRAM[..]),
        flags: 0,
    }
}

/// Reads and compiles a Docker-format profile for this architecture, the
/// running kernel and `caps` (the capabilities the sandbox keeps, as
/// `CAP_CHOWN` or `CHOWN`; used by `includes.caps` / `excludes.caps`).
pub fn load_docker_profile(path: &Path, caps: &[String]) -> Result<Filter, SeccompError> {
    let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    compile_docker_profile(&text, caps).map_err(|error| SeccompError::Profile {
        path: path.to_path_buf(),
        error,
    })
}

/// Rules added to the default profile for one sandbox (compiled at run
/// time, only when asked for; the plain default is compiled at build time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultExtras {
    /// Refuse `memfd_create` (EPERM), for sandboxes with an exec allowlist:
    /// an executable memfd would otherwise be a file outside every Landlock
    /// rule that `execveat` can run.
    pub no_memfd: bool,
    /// Refuse creating set-user-ID or set-group-ID files (EPERM): `chmod`
    /// family, `open`/`openat`/`creat`, `mknod`/`mknodat` with S_ISUID or
    /// S_ISGID in the mode, and `openat2` (its mode is out of a filter's
    /// reach; ENOSYS, so callers fall back to `openat`). For sandboxes with
    /// a rootful read-write idmapped mount, whose files land on the host as
    /// a real host user (root, for a root-owned directory).
    pub no_setid_files: bool,
    /// Refuse `memfd_create` and SysV `shmget` (EPERM) because memory is
    /// limited only per process (no memory cgroup): no rlimit counts the
    /// pages they hold.
    pub no_unaccounted_memory: bool,
}

impl DefaultExtras {
    /// What the extras add, for the `--json` layers report.
    pub fn describe(&self) -> String {
        let mut s = String::from("default");
        if self.no_memfd {
            s.push_str(", no memfd_create (exec allowlist)");
        }
        if self.no_setid_files {
            s.push_str(", no set-id files (read-write idmapped mount)");
        }
        if self.no_unaccounted_memory {
            s.push_str(", no memfd_create or shmget (no memory cgroup)");
        }
        s
    }
}

/// The default profile with `extras`: the build-time program when there are
/// none, else the profile with the extra rules first, compiled now.
pub fn default_filter_with(extras: DefaultExtras) -> Result<Filter, ProfileError> {
    if extras == DefaultExtras::default() {
        return Ok(default_filter());
    }
    let mut v: serde_json::Value =
        serde_json::from_str(DEFAULT_PROFILE_JSON).map_err(|e| ProfileError {
            field: String::new(),
            message: format!("built-in profile: {e}"),
        })?;
    let mut extra = Vec::new();
    if extras.no_memfd {
        extra.push(serde_json::json!({
            "comment": "--exec-allow: no memfd_create (executable anonymous files escape path rules)",
            "names": ["memfd_create"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1
        }));
    }
    if extras.no_unaccounted_memory {
        extra.push(serde_json::json!({
            "comment": "no memory cgroup: memfd and SysV shm pages escape every rlimit",
            "names": ["memfd_create", "shmget"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1
        }));
    }
    if extras.no_setid_files {
        // (syscall names, index of the mode argument) on x86_64 and aarch64.
        let with_mode: [(&[&str], u32); 3] = [
            (&["chmod", "fchmod", "creat", "mknod"], 1),
            (&["fchmodat", "fchmodat2", "open", "mknodat"], 2),
            (&["openat"], 3),
        ];
        for (names, index) in with_mode {
            for bit in [libc::S_ISUID, libc::S_ISGID] {
                extra.push(serde_json::json!({
                    "comment": "a read-write idmapped mount: no set-id files on the host",
                    "names": names,
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 1,
                    "args": [{ "index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ" }]
                }));
            }
        }
        extra.push(serde_json::json!({
            "comment": "openat2's mode is behind a pointer a filter cannot read: not supported (libc falls back to openat)",
            "names": ["openat2"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 38
        }));
    }
    if let Some(rules) = v.get_mut("syscalls").and_then(|r| r.as_array_mut()) {
        rules.splice(0..0, extra);
    }
    compile_docker_profile(&v.to_string(), &[])
}

/// Compiles a Docker-format profile given as text (see [`load_docker_profile`]).
pub fn compile_docker_profile(json: &str, caps: &[String]) -> Result<Filter, ProfileError> {
    let ctx = compiler::Context {
        arch: NATIVE,
        caps: caps.iter().map(|c| compiler::normalize_cap(c)).collect(),
        kernel: Some(running_kernel().unwrap_or((0, 0, 0))),
    };
    let resolved = compiler::parse_profile(json, &ctx)?;
    let prog = compiler::compile(&resolved)?;
    Ok(Filter {
        insns: Cow::Owned(
            prog.iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        ),
        flags: resolved.flags,
    })
}

/// The running kernel's (major, minor, patch), from uname(2).
pub(crate) fn running_kernel() -> Option<(u32, u32, u32)> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates `release` within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    compiler::parse_kernel_release(&release.to_string_lossy())
}

impl Filter {
    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// True for an empty program (never the case for a compiled profile).
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// The instructions, e.g. for `nanoclaw doctor` or a disassembler.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.insns
    }

    /// Installs the filter on the calling thread (and what it execs).
    ///
    /// Call after `prctl(PR_SET_NO_NEW_PRIVS, 1)`. Uses `seccomp(2)` and
    /// falls back to `prctl(PR_SET_SECCOMP)` where `seccomp(2)` is missing.
    /// Async-signal-safe: no allocation, no locks; safe after `fork`.
    pub fn install(&self) -> Result<(), SeccompError> {
        let prog = libc::sock_fprog {
            // Compiled programs are at most compiler::MAX_INSNS (4096) long.
            len: self.insns.len() as libc::c_ushort,
            filter: self.insns.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `self.insns`, which outlives the call; the
        // kernel copies the program before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                libc::c_ulong::from(self.flags),
                &prog as *const libc::sock_fprog,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let errno = last_errno();
        if errno != libc::ENOSYS || self.flags != 0 {
            return Err(SeccompError::Install { errno });
        }
        // SAFETY: as above; PR_SET_SECCOMP takes the same sock_fprog.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SeccompError::Install {
                errno: last_errno(),
            })
        }
    }
}

fn last_errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::compiler::{self, Action, Arch};
    use super::*;

    const EPERM: i32 = libc::EPERM;
    const ENOSYS: i32 = libc::ENOSYS;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;

    fn prog(f: &Filter) -> Vec<compiler::Insn> {
        f.instructions()
            .iter()
            .map(|i| compiler::Insn {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect()
    }

    /// What `f` answers for `name(args)` on the native architecture.
    fn emulate(f: &Filter, name: &str, args: [u64; 6]) -> u32 {
        let nr = NATIVE
            .syscall_nr(name)
            .unwrap_or_else(|| panic!("{name} not in table"));
        compiler::run(&prog(f), nr, NATIVE.audit_arch(), args).unwrap()
    }

    fn errno_ret(e: i32) -> u32 {
        Action::Errno(e as u16).ret()
    }

    // ---- the built-in program, checked by emulation (every syscall) ----

    #[test]
    fn default_program_size_and_shape() {
        let f = default_filter();
        eprintln!("default filter: {} BPF instructions", f.len());
        assert!(f.len() > 20 && f.len() < 1024, "{}", f.len());
        // It is the same program the runtime compiler makes from default.json.
        let text = include_str!("../../seccomp/default.json");
        let again = compiler::compile(
            &compiler::parse_profile(
                text,
                &compiler::Context {
                    arch: NATIVE,
                    caps: vec![],
                    kernel: None,
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(prog(&f), again);
    }

    #[test]
    fn default_profile_compiles_for_every_arch() {
        // aarch64 cannot be built here; at least its program is checked.
        let text = include_str!("../../seccomp/default.json");
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let ctx = compiler::Context {
                arch,
                caps: vec![],
                kernel: None,
            };
            let p = compiler::compile(&compiler::parse_profile(text, &ctx).unwrap()).unwrap();
            let a = arch.audit_arch();
            let nr = |n: &str| arch.syscall_nr(n).unwrap();
            let eperm = errno_ret(EPERM);
            assert_eq!(compiler::run(&p, nr("mount"), a, [0; 6]), Some(eperm));
            assert_eq!(compiler::run(&p, nr("getpid"), a, [0; 6]), Some(RET_ALLOW));
            assert_eq!(
                compiler::run(&p, nr("clone3"), a, [0; 6]),
                Some(errno_ret(ENOSYS))
            );
            let newuser = [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0];
            assert_eq!(compiler::run(&p, nr("unshare"), a, newuser), Some(eperm));
            // The other architecture's ABI is killed.
            let other = if arch == Arch::X86_64 {
                Arch::Aarch64
            } else {
                Arch::X86_64
            };
            assert_eq!(
                compiler::run(&p, nr("getpid"), other.audit_arch(), [0; 6]),
                Some(RET_KILL_PROCESS)
            );
            eprintln!(
                "default filter for {}: {} instructions",
                arch.name(),
                p.len()
            );
        }
    }

    #[test]
    fn default_program_kills_foreign_abis() {
        let p = prog(&default_filter());
        let getpid = NATIVE.syscall_nr("getpid").unwrap();
        // ia32 (AUDIT_ARCH_I386) and aarch32 (AUDIT_ARCH_ARM).
        for arch in [0x4000_0003u32, 0x4000_0028] {
            assert_eq!(compiler::run(&p, 20, arch, [0; 6]), Some(RET_KILL_PROCESS));
        }
        if NATIVE == Arch::X86_64 {
            let a = NATIVE.audit_arch();
            assert_eq!(
                compiler::run(&p, 0x4000_0000 | getpid, a, [0; 6]),
                Some(RET_KILL_PROCESS)
            );
            assert_eq!(
                compiler::run(&p, 0x4000_0000 | 512, a, [0; 6]),
                Some(RET_KILL_PROCESS)
            );
            // -1 is not x32: it falls through (beyond the table → ENOSYS).
            assert_eq!(
                compiler::run(&p, u32::MAX, a, [0; 6]),
                Some(errno_ret(ENOSYS))
            );
        }
    }

    /// Names Docker's default profile (moby profiles/seccomp/default.json)
    /// does not allow on amd64 to a container with no capabilities, computed
    /// from that file against our x86_64 table. Ours must refuse each one,
    /// except the listed exceptions.
    const DOCKER_DENIED: &str = "_sysctl acct add_key afs_syscall bpf cachestat chroot \
        clock_settime clone3 create_module delete_module fanotify_init fchmodat2 file_getattr \
        file_setattr finit_module fsconfig fsmount fsopen fspick futex_requeue futex_wait \
        futex_wake get_kernel_syms get_mempolicy getpmsg getxattrat init_module ioperm iopl kcmp \
        kexec_file_load kexec_load keyctl listmount listxattrat lookup_dcookie lsm_get_self_attr \
        lsm_list_modules lsm_set_self_attr map_shadow_stack mbind migrate_pages mount \
        mount_setattr move_mount move_pages mseal nfsservctl open_by_handle_at open_tree \
        open_tree_attr perf_event_open pidfd_getfd pivot_root process_madvise putpmsg \
        query_module quotactl quotactl_fd reboot removexattrat request_key security \
        set_mempolicy set_mempolicy_home_node setdomainname sethostname setns settimeofday \
        setxattrat statmount swapoff swapon sysfs syslog tuxcall umount2 unshare uselib \
        userfaultfd ustat vhangup vserver";
    /// Allowed by us although that Docker profile refuses them: syscalls the
    /// kernel does not implement (ENOSYS anyway), and syscalls newer than
    /// that profile that act only on the caller's own files and memory.
    const DOCKER_DENIED_BUT_ALLOWED_HERE: &str = "afs_syscall getpmsg putpmsg security tuxcall \
        vserver cachestat fchmodat2 futex_requeue futex_wait futex_wake map_shadow_stack mseal \
        statmount listmount lsm_get_self_attr lsm_list_modules getxattrat setxattrat listxattrat \
        removexattrat file_getattr file_setattr";

    #[test]
    fn default_refuses_all_that_docker_refuses() {
        let f = default_filter();
        let exceptions: Vec<&str> = DOCKER_DENIED_BUT_ALLOWED_HERE.split_whitespace().collect();
        let mut checked = 0;
        for name in DOCKER_DENIED.split_whitespace() {
            let Some(nr) = NATIVE.syscall_nr(name) else {
                continue; // x86-only syscall on aarch64
            };
            let got = compiler::run(&prog(&f), nr, NATIVE.audit_arch(), [0; 6]).unwrap();
            if exceptions.contains(&name) {
                assert_eq!(got, RET_ALLOW, "{name}");
            } else {
                // unshare(0) is allowed; flags that matter are covered below.
                let args = if name == "unshare" {
                    [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]
                } else {
                    [0; 6]
                };
                let got = compiler::run(&prog(&f), nr, NATIVE.audit_arch(), args).unwrap();
                assert_ne!(got, RET_ALLOW, "{name} must be refused");
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked}");
    }

    #[test]
    fn default_argument_rules() {
        let f = default_filter();
        let deny = errno_ret(EPERM);
        let ns_flags = [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
        ];
        for flag in ns_flags {
            let flags = (flag | libc::SIGCHLD) as u64;
            assert_eq!(emulate(&f, "clone", [flags, 0, 0, 0, 0, 0]), deny);
            assert_eq!(emulate(&f, "unshare", [flag as u64, 0, 0, 0, 0, 0]), deny);
        }
        assert_eq!(emulate(&f, "unshare", [0x80, 0, 0, 0, 0, 0]), deny); // CLONE_NEWTIME
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(emulate(&f, "clone", [thread, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            emulate(&f, "unshare", [libc::CLONE_FILES as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(emulate(&f, "clone3", [0; 6]), errno_ret(ENOSYS));
        for p in [0u64, 8, 0x20000, 0x20008, 0xffff_ffff] {
            assert_eq!(emulate(&f, "personality", [p, 0, 0, 0, 0, 0]), RET_ALLOW);
        }
        for p in [
            0x0040000u64,
            0x0400000,
            0x1_0000_0000,
            0xffff_ffff_ffff_ffff,
        ] {
            assert_eq!(emulate(&f, "personality", [p, 0, 0, 0, 0, 0]), deny);
        }
        for cmd in [0x5412u64, 0x541c, 0xdead_0000_0000_5412, 0x1_0000_541c] {
            assert_eq!(emulate(&f, "ioctl", [1, cmd, 0, 0, 0, 0]), deny, "{cmd:#x}");
        }
        for cmd in [0x541bu64 /* FIONREAD */, 0x5413 /* TIOCGWINSZ */] {
            assert_eq!(emulate(&f, "ioctl", [1, cmd, 0, 0, 0, 0]), RET_ALLOW);
        }
        for fam in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            assert_eq!(
                emulate(&f, "socket", [fam as u64, 1, 0, 0, 0, 0]),
                RET_ALLOW
            );
            assert_eq!(
                emulate(&f, "socketpair", [fam as u64, 1, 0, 0, 0, 0]),
                RET_ALLOW
            );
        }
        for fam in [
            libc::AF_PACKET,
            libc::AF_VSOCK,
            libc::AF_ALG,
            libc::AF_BLUETOOTH,
            libc::AF_XDP,
            libc::AF_CAN,
            libc::AF_KEY,
        ] {
            let r = errno_ret(libc::EPERM);
            assert_eq!(emulate(&f, "socket", [fam as u64, 3, 0, 0, 0, 0]), r);
            assert_eq!(emulate(&f, "socketpair", [fam as u64, 1, 0, 0, 0, 0]), r);
        }
        // Above the table: refused as unknown.
        let beyond = NATIVE.max_nr() + 1;
        assert_eq!(
            compiler::run(&prog(&f), beyond, NATIVE.audit_arch(), [0; 6]),
            Some(errno_ret(ENOSYS))
        );
        // A syscall that is not named anywhere is allowed without touching args.
        for name in [
            "read", "write", "openat", "execve", "mmap", "futex", "wait4", "getpid",
        ] {
            assert_eq!(emulate(&f, name, [0; 6]), RET_ALLOW, "{name}");
        }
    }

    // ---- the compiler: 64-bit comparisons and dispatch, by emulation ----

    fn compile_str(json: &str) -> Result<Filter, ProfileError> {
        compile_docker_profile(json, &[])
    }

    #[test]
    fn comparisons_are_64_bit() {
        let values: [u64; 12] = [
            0,
            1,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x1_0000_0000,
            0x1_0000_0001,
            0x1_ffff_ffff,
            0x8000_0000_0000_0000,
            0xffff_ffff_0000_0000,
            0xffff_ffff_ffff_fffe,
            u64::MAX,
        ];
        type Pred = fn(u64, u64, u64) -> bool;
        let ops: [(&str, Pred); 7] = [
            ("SCMP_CMP_EQ", |a, v, _| a == v),
            ("SCMP_CMP_NE", |a, v, _| a != v),
            ("SCMP_CMP_LT", |a, v, _| a < v),
            ("SCMP_CMP_LE", |a, v, _| a <= v),
            ("SCMP_CMP_GT", |a, v, _| a > v),
            ("SCMP_CMP_GE", |a, v, _| a >= v),
            ("SCMP_CMP_MASKED_EQ", |a, m, e| a & m == e),
        ];
        let getpid = NATIVE.syscall_nr("getpid").unwrap();
        for (op, pred) in ops {
            for &v in &values {
                for &v2 in &[0u64, 1, 0xffff_ffff, 0x1_0000_0000] {
                    let json = format!(
                        r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getpid"],
                        "action":"SCMP_ACT_ERRNO","errnoRet":7,
                        "args":[{{"index":3,"value":{v},"valueTwo":{v2},"op":"{op}"}}]}}]}}"#
                    );
                    let p = prog(&compile_str(&json).unwrap());
                    for &a in &values {
                        let got =
                            compiler::run(&p, getpid, NATIVE.audit_arch(), [0, 0, 0, a, 0, 0]);
                        let want = if pred(a, v, v2) {
                            errno_ret(7)
                        } else {
                            RET_ALLOW
                        };
                        assert_eq!(got, Some(want), "{op} a={a:#x} v={v:#x} v2={v2:#x}");
                    }
                }
            }
        }
    }

    #[test]
    fn dispatch_reaches_every_syscall() {
        // A distinct errno per syscall: the binary search must route each
        // number to its own rule and everything else to the default.
        let names: Vec<(&str, u32)> = NATIVE.syscalls().collect();
        let rules: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(i, (n, _))| {
                format!(
                    r#"{{"names":["{n}"],"action":"SCMP_ACT_ERRNO","errnoRet":{}}}"#,
                    100 + i
                )
            })
            .collect();
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":3,"syscalls":[{}]}}"#,
            rules.join(",")
        );
        let f = compile_str(&json).unwrap();
        eprintln!("{} distinct rules: {} instructions", rules.len(), f.len());
        let p = prog(&f);
        for (i, (n, nr)) in names.iter().enumerate() {
            let want = if i % 3 != 0 {
                errno_ret(100 + i as i32)
            } else {
                errno_ret(3)
            };
            let got = compiler::run(&p, *nr, NATIVE.audit_arch(), [0; 6]);
            assert_eq!(got, Some(want), "{n}");
        }
        for nr in [NATIVE.max_nr() + 1, 1000, 0x3fff_ffff, u32::MAX] {
            assert_eq!(
                compiler::run(&p, nr, NATIVE.audit_arch(), [0; 6]),
                Some(errno_ret(3))
            );
        }
    }

    // ---- Docker-format profiles ----

    const DOCKER_LIKE: &str = include_str!("../../seccomp/testdata/docker-like.json");

    #[test]
    fn docker_like_profile_conditions() {
        let ctx = |caps: &[&str], kernel| compiler::Context {
            arch: NATIVE,
            caps: caps.iter().map(|c| compiler::normalize_cap(c)).collect(),
            kernel: Some(kernel),
        };
        let run = |c: &compiler::Context, name: &str, args: [u64; 6]| {
            let p = compiler::compile(&compiler::parse_profile(DOCKER_LIKE, c).unwrap()).unwrap();
            compiler::run(
                &p,
                NATIVE.syscall_nr(name).unwrap(),
                NATIVE.audit_arch(),
                args,
            )
            .unwrap()
        };
        let none = ctx(&[], (6, 1, 0));
        let admin = ctx(&["sys_admin"], (6, 1, 0));
        let old = ctx(&[], (4, 4, 0));
        let eperm = errno_ret(EPERM);
        assert_eq!(run(&none, "getpid", [0; 6]), RET_ALLOW);
        assert_eq!(run(&none, "mount", [0; 6]), eperm);
        assert_eq!(run(&admin, "mount", [0; 6]), RET_ALLOW); // includes.caps
        assert_eq!(run(&none, "ptrace", [0; 6]), RET_ALLOW); // minKernel 4.8
        assert_eq!(run(&old, "ptrace", [0; 6]), eperm);
        assert_eq!(run(&none, "clone3", [0; 6]), errno_ret(ENOSYS)); // excludes.caps
        assert_eq!(run(&admin, "clone3", [0; 6]), RET_ALLOW);
        let newuser = (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64;
        assert_eq!(run(&none, "clone", [newuser, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(
            run(&none, "clone", [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(run(&none, "socket", [40, 1, 0, 0, 0, 0]), eperm);
        assert_eq!(run(&none, "socket", [2, 1, 0, 0, 0, 0]), RET_ALLOW);
        let arch_only = if NATIVE == Arch::X86_64 {
            "arch_prctl"
        } else {
            "getpid"
        };
        assert_eq!(run(&none, arch_only, [0; 6]), RET_ALLOW); // includes.arches
        assert_eq!(run(&none, "uname", [0; 6]), errno_ret(42)); // per-rule errnoRet
        assert_eq!(run(&none, "sched_yield", [0; 6]), RET_ALLOW); // excludes.minKernel 5.0
        assert_eq!(run(&old, "sched_yield", [0; 6]), 0x7ffc_0000); // SCMP_ACT_LOG
    }

    /// Docker's own default profile, if a copy is at hand (it is not
    /// committed: third-party data). Set NANOCLAW_DOCKER_SECCOMP_PROFILE.
    #[test]
    fn real_docker_default_profile() {
        let Ok(path) = std::env::var("NANOCLAW_DOCKER_SECCOMP_PROFILE") else {
            eprintln!("NANOCLAW_DOCKER_SECCOMP_PROFILE not set; skipped");
            return;
        };
        let none = load_docker_profile(Path::new(&path), &[]).unwrap();
        let admin = load_docker_profile(Path::new(&path), &["CAP_SYS_ADMIN".into()]).unwrap();
        eprintln!(
            "Docker default: {} instructions (no caps), {} (CAP_SYS_ADMIN)",
            none.len(),
            admin.len()
        );
        assert_eq!(emulate(&none, "mount", [0; 6]), errno_ret(EPERM));
        assert_eq!(emulate(&admin, "mount", [0; 6]), RET_ALLOW);
        assert_eq!(emulate(&none, "clone3", [0; 6]), errno_ret(ENOSYS));
        assert_eq!(emulate(&none, "getpid", [0; 6]), RET_ALLOW);
        let newuser = (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64;
        assert_eq!(
            emulate(&none, "clone", [newuser, 0, 0, 0, 0, 0]),
            errno_ret(EPERM)
        );
        assert_eq!(
            emulate(&admin, "clone", [newuser, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            emulate(&none, "socket", [40, 1, 0, 0, 0, 0]),
            errno_ret(EPERM)
        );
        // Real programs run under it.
        let out = run_under(&none, "/bin/sh", &["-c", "echo ok"]);
        assert_eq!(out, Ok((0, b"ok\n".to_vec())));
    }

    fn err(json: &str) -> String {
        compile_str(json).unwrap_err().to_string()
    }

    #[test]
    fn invalid_profiles_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"},{"names":["write"],"action":"SCMP_ACT_ALLOW"},{"names":["close"],"action":"SCMP_ACT_ALLOW"},{"names":["umount2","mountt"],"action":"SCMP_ACT_ERRNO"}]}"#,
                "syscalls[3].names[1]: unknown syscall \"mountt\" for {arch}: it is not a syscall on any Linux architecture; check the spelling",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALOW"}"#,
                "defaultAction: unknown action \"SCMP_ACT_ALOW\"; expected one of: SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, SCMP_ACT_KILL_PROCESS, SCMP_ACT_KILL_THREAD, SCMP_ACT_TRAP, SCMP_ACT_LOG, SCMP_ACT_TRACE",
            ),
            (
                r#"{"syscalls":[]}"#,
                "defaultAction: missing; it is required",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscals":[]}"#,
                "syscals: unknown field \"syscals\"; expected one of: defaultAction, defaultErrnoRet, architectures, archMap, syscalls, flags, listenerPath, listenerMetadata, comment, nanoclaw",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["ioctl"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
                "syscalls[0].args[0].index: argument index 6 is out of range; syscalls have arguments 0 to 5",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["ioctl"],"action":"SCMP_ACT_ERRNO","args":[{"index":1,"value":1,"op":"SCMP_CMP_EQUAL"}]}]}"#,
                "syscalls[0].args[0].op: unknown operator \"SCMP_CMP_EQUAL\"; expected one of: SCMP_CMP_EQ, SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_GT, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["ioctl"],"action":"SCMP_ACT_ERRNO","args":[{"index":1,"value":-1,"op":"SCMP_CMP_EQ"}]}]}"#,
                "syscalls[0].args[0].value: expected a non-negative integer, found the number -1",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO","errnoRet":5000}]}"#,
                "syscalls[0].errnoRet: errno 5000 is out of range; use a value from 0 to 4095",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ALLOW","errnoRet":1}]}"#,
                "syscalls[0].errnoRet: only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not SCMP_ACT_ALLOW; remove it",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"name":"mount","names":["mount"],"action":"SCMP_ACT_ERRNO"}]}"#,
                "syscalls[0]: both 'name' and 'names' are set; use one of them",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_ERRNO"}]}"#,
                "syscalls[0]: no syscall given; set 'names' (a list) or 'name'",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":"mount","action":"SCMP_ACT_ERRNO"}]}"#,
                "syscalls[0].names: expected an array, found the string \"mount\"",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO","includes":{"caps":["SYS_ADMIN"]}}]}"#,
                "syscalls[0].includes.caps[0]: unknown capability \"SYS_ADMIN\"; write it like CAP_SYS_ADMIN",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO","excludes":{"minKernel":"four"}}]}"#,
                "syscalls[0].excludes.minKernel: \"four\" is not a kernel version; write it like \"4.8\" or \"5.10.1\"",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO","includes":{"arches":["x86-64"]}}]}"#,
                "syscalls[0].includes.arches[0]: unknown architecture \"x86-64\"; expected one of: 386, x86, amd64, x32, arm, arm64, mips, mipsle, mipsel, mips64, mips64le, mips64n32, mipsel64, mipsel64n32, mips3l64n32, ppc, ppc64, ppc64le, s390, s390x, parisc, parisc64, riscv64, loong64",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_NOTIFY"}]}"#,
                "syscalls[0].action: SCMP_ACT_NOTIFY needs a seccomp agent, which nanoclaw does not run; use SCMP_ACT_ERRNO or SCMP_ACT_LOG",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],"archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":null}]}"#,
                "archMap: 'architectures' and 'archMap' are both set; use one of them",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["X86_64"]}"#,
                "architectures[0]: unknown architecture \"X86_64\"; expected a name like SCMP_ARCH_X86_64",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}"#,
                "flags[0]: unsupported flag \"SECCOMP_FILTER_FLAG_NEW_LISTENER\"; nanoclaw supports SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_LOG and SECCOMP_FILTER_FLAG_SPEC_ALLOW",
            ),
            (
                r#"[]"#,
                "expected an object, found an array",
            ),
            (
                "{\"defaultAction\": \"SCMP_ACT_ALLOW\",\n \"syscalls\": [}",
                "not valid JSON: expected value at line 2 column 15",
            ),
        ];
        for (json, want) in cases {
            let want = want.replace("{arch}", NATIVE.name());
            assert_eq!(err(json), want);
        }
        // The typo check runs even in rules that do not apply here.
        let json = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["s390_runtime_instr","chown32","riscv_flush_icache","s390_runtime_instrr"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["s390x"]}}]}"#;
        assert!(
            err(json).starts_with("syscalls[0].names[3]: unknown syscall \"s390_runtime_instrr\"")
        );
        // Other architectures' syscalls are skipped silently.
        let json = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chown32","_llseek","socketcall","arm_fadvise64_64"],"action":"SCMP_ACT_ERRNO"}]}"#;
        assert!(compile_str(json).is_ok());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mountt"],"action":"SCMP_ACT_ERRNO"}]}"#).unwrap();
        let e = load_docker_profile(&bad, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "invalid seccomp profile {}: syscalls[0].names[0]: unknown syscall \"mountt\" for {}: it is not a syscall on any Linux architecture; check the spelling",
                bad.display(),
                NATIVE.name()
            )
        );
        let missing = dir.join("missing.json");
        let e = load_docker_profile(&missing, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot read seccomp profile {}: No such file",
                missing.display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ---- the real kernel: attacks in a forked child ----

    #[derive(Debug, PartialEq, Eq, Clone, Copy)]
    enum End {
        /// The child's body returned this: 0 for success, else the errno.
        Code(i32),
        /// The child died of this signal.
        Signal(i32),
    }

    /// Forks; the child leaves its session (no controlling terminal), sets
    /// no_new_privs, installs `filter` (if any) and exits with `body()`.
    /// The child does raw syscalls only: no allocation after fork.
    fn in_child(filter: Option<&Filter>, body: &dyn Fn() -> i32) -> End {
        // SAFETY: the child only makes raw syscalls and calls _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: raw syscalls in the child; it never returns.
            unsafe {
                libc::setsid();
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(201);
                }
                if let Some(f) = filter {
                    if f.install().is_err() {
                        libc::_exit(202);
                    }
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        if libc::WIFSIGNALED(status) {
            End::Signal(libc::WTERMSIG(status))
        } else {
            let code = libc::WEXITSTATUS(status);
            assert!(code != 201 && code != 202, "child setup failed: {code}");
            End::Code(code)
        }
    }

    /// A raw syscall: 0 if it returned >= 0, else errno. A fork-like clone
    /// that succeeded exits the new child at once and reaps it.
    fn sc(nr: libc::c_long, a: [u64; 6]) -> i32 {
        // SAFETY: raw syscall with integer arguments; callers pass only
        // invalid pointers (0 or 1) or harmless values.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if r < 0 {
            return last_errno();
        }
        if nr == libc::SYS_clone && a[1] == 0 {
            if r == 0 {
                // SAFETY: leaving the forked grandchild immediately.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(r as libc::pid_t, std::ptr::null_mut(), libc::__WALL) };
        }
        0
    }

    struct Case {
        what: &'static str,
        nr: libc::c_long,
        args: [u64; 6],
        want: i32,
        /// Without the filter the result must differ (proves the test can fail).
        differs: bool,
    }

    fn case(
        what: &'static str,
        nr: libc::c_long,
        args: [u64; 6],
        want: i32,
        differs: bool,
    ) -> Case {
        Case {
            what,
            nr,
            args,
            want,
            differs,
        }
    }

    fn kernel_cases() -> Vec<Case> {
        use libc::*;
        let e = EPERM;
        let m = u64::MAX; // -1 as an fd
        let ns = |f: c_int| (f | SIGCHLD) as u64;
        let parent = u64::from(std::process::id());
        let mut v = vec![
            case("mount", SYS_mount, [0; 6], e, true),
            case("umount2", SYS_umount2, [0; 6], e, true),
            case("pivot_root", SYS_pivot_root, [0; 6], e, true),
            case("chroot", SYS_chroot, [0; 6], e, true),
            case("fsopen", SYS_fsopen, [0; 6], e, true),
            case("fsconfig", SYS_fsconfig, [m, 0, 0, 0, 0, 0], e, true),
            case("fsmount", SYS_fsmount, [m, 0, 0, 0, 0, 0], e, true),
            case("fspick", SYS_fspick, [m, 0, 0, 0, 0, 0], e, true),
            case("move_mount", SYS_move_mount, [m, 0, m, 0, 0, 0], e, true),
            case("open_tree", SYS_open_tree, [m, 0, 0, 0, 0, 0], e, true),
            case(
                "mount_setattr",
                SYS_mount_setattr,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("setns", SYS_setns, [m, 0, 0, 0, 0, 0], e, true),
            case(
                "unshare(NEWUSER)",
                SYS_unshare,
                [CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWNS)",
                SYS_unshare,
                [CLONE_NEWNS as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWPID)",
                SYS_unshare,
                [CLONE_NEWPID as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWNET)",
                SYS_unshare,
                [CLONE_NEWNET as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWIPC)",
                SYS_unshare,
                [CLONE_NEWIPC as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWUTS)",
                SYS_unshare,
                [CLONE_NEWUTS as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWCGROUP)",
                SYS_unshare,
                [CLONE_NEWCGROUP as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(NEWTIME)",
                SYS_unshare,
                [0x80, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "unshare(FILES)",
                SYS_unshare,
                [CLONE_FILES as u64, 0, 0, 0, 0, 0],
                0,
                false,
            ),
            case(
                "clone(NEWUSER)",
                SYS_clone,
                [ns(CLONE_NEWUSER), 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "clone(NEWNS)",
                SYS_clone,
                [ns(CLONE_NEWNS), 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "clone(NEWPID)",
                SYS_clone,
                [ns(CLONE_NEWPID), 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "clone(NEWNET)",
                SYS_clone,
                [ns(CLONE_NEWNET), 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "clone(fork)",
                SYS_clone,
                [SIGCHLD as u64, 0, 0, 0, 0, 0],
                0,
                false,
            ),
            case("clone3", SYS_clone3, [0; 6], ENOSYS, true),
            case(
                "ptrace(TRACEME)",
                SYS_ptrace,
                [PTRACE_TRACEME as u64, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "process_vm_readv",
                SYS_process_vm_readv,
                [1, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "process_vm_writev",
                SYS_process_vm_writev,
                [1, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "kcmp(parent, parent)",
                SYS_kcmp,
                [parent, parent, 0, 0, 0, 0],
                e,
                true,
            ),
            case("pidfd_getfd", SYS_pidfd_getfd, [m, 0, 0, 0, 0, 0], e, true),
            case(
                "process_madvise",
                SYS_process_madvise,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("bpf", SYS_bpf, [0, 0, 0, 0, 0, 0], e, true),
            case(
                "perf_event_open",
                SYS_perf_event_open,
                [0, 0, m, m, 0, 0],
                e,
                true,
            ),
            case("userfaultfd", SYS_userfaultfd, [0; 6], e, true),
            case(
                "io_uring_setup",
                SYS_io_uring_setup,
                [1, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "io_uring_enter",
                SYS_io_uring_enter,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "io_uring_register",
                SYS_io_uring_register,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "keyctl",
                SYS_keyctl,
                [0, (-3i64) as u64, 0, 0, 0, 0],
                e,
                true,
            ),
            case("add_key", SYS_add_key, [0; 6], e, true),
            case("request_key", SYS_request_key, [0; 6], e, true),
            case("init_module", SYS_init_module, [0; 6], e, true),
            case(
                "finit_module",
                SYS_finit_module,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("delete_module", SYS_delete_module, [0; 6], e, true),
            case(
                "kexec_load",
                SYS_kexec_load,
                [0, 0, 0, 0xffff_0000, 0, 0],
                e,
                true,
            ),
            case(
                "kexec_file_load",
                SYS_kexec_file_load,
                [m, m, 0, 0, 0, 0],
                e,
                true,
            ),
            case("reboot", SYS_reboot, [0; 6], e, true),
            case("swapon", SYS_swapon, [0; 6], e, true),
            case("swapoff", SYS_swapoff, [0; 6], e, true),
            case("acct", SYS_acct, [1, 0, 0, 0, 0, 0], e, true),
            case("vhangup (no tty)", SYS_vhangup, [0; 6], e, true),
            case(
                "syslog(SIZE_BUFFER)",
                SYS_syslog,
                [10, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("quotactl", SYS_quotactl, [0; 6], e, true),
            case("quotactl_fd", SYS_quotactl_fd, [m, 0, 0, 0, 0, 0], e, true),
            case(
                "sethostname(len 1000)",
                SYS_sethostname,
                [0, 1000, 0, 0, 0, 0],
                e,
                true,
            ),
            case("settimeofday(NULL,NULL)", SYS_settimeofday, [0; 6], e, true),
            case(
                "clock_settime(-1)",
                SYS_clock_settime,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "clock_adjtime(-1)",
                SYS_clock_adjtime,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("adjtimex", SYS_adjtimex, [0; 6], e, true),
            case(
                "open_by_handle_at",
                SYS_open_by_handle_at,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "name_to_handle_at",
                SYS_name_to_handle_at,
                [m, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case("fanotify_init", SYS_fanotify_init, [0; 6], e, true),
            case(
                "personality(ADDR_NO_RANDOMIZE)",
                SYS_personality,
                [0x0040000, 0, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "personality(query)",
                SYS_personality,
                [0xffff_ffff, 0, 0, 0, 0, 0],
                0,
                false,
            ),
            case(
                "ioctl(TIOCSTI)",
                SYS_ioctl,
                [m, 0x5412, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "ioctl(TIOCSTI|1<<32)",
                SYS_ioctl,
                [m, 0x1_0000_5412, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "ioctl(TIOCLINUX)",
                SYS_ioctl,
                [m, 0x541c, 0, 0, 0, 0],
                e,
                true,
            ),
            case(
                "ioctl(FIONREAD)",
                SYS_ioctl,
                [m, 0x541b, 0, 0, 0, 0],
                EBADF,
                false,
            ),
            case(
                "socket(AF_PACKET)",
                SYS_socket,
                [AF_PACKET as u64, SOCK_RAW as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socket(AF_VSOCK)",
                SYS_socket,
                [AF_VSOCK as u64, SOCK_STREAM as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socket(AF_ALG)",
                SYS_socket,
                [AF_ALG as u64, SOCK_SEQPACKET as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socket(AF_BLUETOOTH)",
                SYS_socket,
                [AF_BLUETOOTH as u64, SOCK_STREAM as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socket(AF_INET|1<<32)",
                SYS_socket,
                [0x1_0000_0002, SOCK_STREAM as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socketpair(AF_PACKET)",
                SYS_socketpair,
                [AF_PACKET as u64, SOCK_DGRAM as u64, 0, 0, 0, 0],
                libc::EPERM,
                true,
            ),
            case(
                "socket(AF_INET)",
                SYS_socket,
                [AF_INET as u64, SOCK_STREAM as u64, 0, 0, 0, 0],
                0,
                false,
            ),
            case(
                "socket(AF_INET6)",
                SYS_socket,
                [AF_INET6 as u64, SOCK_DGRAM as u64, 0, 0, 0, 0],
                0,
                false,
            ),
            case(
                "socket(AF_UNIX)",
                SYS_socket,
                [AF_UNIX as u64, SOCK_STREAM as u64, 0, 0, 0, 0],
                0,
                false,
            ),
            case(
                "socket(AF_NETLINK)",
                SYS_socket,
                [AF_NETLINK as u64, SOCK_RAW as u64, 0, 0, 0, 0],
                0,
                false,
            ),
            case("getpid", SYS_getpid, [0; 6], 0, false),
            case("write(-1)", SYS_write, [m, 0, 0, 0, 0, 0], EBADF, false),
            case("syscall(-1)", -1, [0; 6], ENOSYS, false),
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend([
            case("iopl(0)", SYS_iopl, [0; 6], e, true),
            case("ioperm(0,0,0)", SYS_ioperm, [0; 6], e, true),
        ]);
        v
    }

    #[test]
    fn kernel_enforces_default_profile() {
        let f = default_filter();
        let mut failures = Vec::new();
        for c in kernel_cases() {
            let body = || sc(c.nr, c.args);
            let with = in_child(Some(&f), &body);
            let without = in_child(None, &body);
            if with != End::Code(c.want) {
                failures.push(format!("{}: got {with:?}, want Code({})", c.what, c.want));
            }
            if c.differs && with == without {
                failures.push(format!(
                    "{}: same result without the filter ({without:?})",
                    c.what
                ));
            }
            if !c.differs && c.want == 0 && without != End::Code(0) {
                failures.push(format!(
                    "{}: fails even without the filter: {without:?}",
                    c.what
                ));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernel_kills_x32_and_ia32() {
        let f = default_filter();
        // x32: this kernel has no x32 ABI (ENOSYS), the filter kills first.
        let x32 = || sc(0x4000_0000 | libc::SYS_getpid, [0; 6]);
        assert_eq!(in_child(None, &x32), End::Code(ENOSYS));
        assert_eq!(in_child(Some(&f), &x32), End::Signal(libc::SIGSYS));

        // ia32: int 0x80 with eax = 20 (getpid in the i386 table).
        fn int80_getpid() -> i32 {
            let ret: i64;
            // SAFETY: int 0x80 with eax=20 (getpid) reads no memory; the
            // 32-bit entry clobbers r8-r11 (declared).
            unsafe {
                core::arch::asm!(
                    "int 0x80",
                    inlateout("rax") 20i64 => ret,
                    out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                    options(nostack)
                );
            }
            if ret > 0 {
                0
            } else {
                (-ret) as i32
            }
        }
        // Without the filter the ia32 ABI works on this kernel (IA32_EMULATION),
        // so the attack is real...
        let without = in_child(None, &int80_getpid);
        if without != End::Code(0) {
            eprintln!("ia32 emulation is off on this kernel ({without:?}); the test is weaker");
        }
        // ...and with it the process dies of SIGSYS.
        assert_eq!(in_child(Some(&f), &int80_getpid), End::Signal(libc::SIGSYS));
    }

    #[test]
    fn kernel_refuses_new_syscalls_with_enosys() {
        let f = default_filter();
        let beyond = libc::c_long::from(NATIVE.max_nr() + 1);
        let body = || sc(beyond, [0; 6]);
        assert_eq!(in_child(Some(&f), &body), End::Code(ENOSYS));
    }

    #[test]
    fn kernel_applies_docker_profile_args_and_errno() {
        let f = compile_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":42,
             "args":[{"index":2,"value":4294967296,"op":"SCMP_CMP_GE"}]},
            {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":43,
             "args":[{"index":0,"value":4026531840,"valueTwo":1879048192,"op":"SCMP_CMP_MASKED_EQ"}]},
            {"names":["gettid"],"action":"SCMP_ACT_KILL_PROCESS"},
            {"names":["getuid"],"action":"SCMP_ACT_TRAP"}]}"#,
        )
        .unwrap();
        let p = |a: [u64; 6]| move || sc(libc::SYS_getppid, a);
        assert_eq!(
            in_child(Some(&f), &p([0, 0, 0xffff_ffff, 0, 0, 0])),
            End::Code(0)
        );
        assert_eq!(
            in_child(Some(&f), &p([0, 0, 0x1_0000_0000, 0, 0, 0])),
            End::Code(42)
        );
        assert_eq!(
            in_child(Some(&f), &p([0x7000_0001, 0, 0, 0, 0, 0])),
            End::Code(43)
        );
        assert_eq!(
            in_child(Some(&f), &p([0x6000_0001, 0, 0, 0, 0, 0])),
            End::Code(0)
        );
        let tid = || sc(libc::SYS_gettid, [0; 6]);
        assert_eq!(in_child(Some(&f), &tid), End::Signal(libc::SIGSYS));
        let uid = || sc(libc::SYS_getuid, [0; 6]);
        assert_eq!(in_child(Some(&f), &uid), End::Signal(libc::SIGSYS));
    }

    /// Runs a program with no_new_privs and `filter`, returns (status, stdout).
    fn run_under(filter: &Filter, prog: &str, args: &[&str]) -> Result<(i32, Vec<u8>), String> {
        use std::os::unix::process::CommandExt;
        let f = filter.clone();
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp");
        // SAFETY: the hook only makes raw syscalls (prctl, seccomp) and
        // builds an io::Error from an errno, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                f.install().map_err(|e| match e {
                    SeccompError::Install { errno } => std::io::Error::from_raw_os_error(errno),
                    _ => std::io::Error::from_raw_os_error(libc::EINVAL),
                })
            });
        }
        let out = cmd.output().map_err(|e| format!("{prog}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{prog} {args:?}: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((out.status.code().unwrap_or(-1), out.stdout))
    }

    fn have(prog: &str) -> bool {
        std::process::Command::new(prog)
            .arg("--version")
            .output()
            .is_ok()
    }

    #[test]
    fn real_programs_work_under_default_profile() {
        let f = default_filter();
        let sh = run_under(&f, "/bin/sh", &["-c", "echo $((6*7)); ls / >/dev/null; cat /proc/self/status | grep -c Seccomp; (sleep 0 &) ; wait"]);
        assert_eq!(sh, Ok((0, b"42\n2\n".to_vec())));
        let cu = run_under(
            &f,
            "sh",
            &[
                "-c",
                "d=$(mktemp -d) && echo hi > $d/a && cp $d/a $d/b && sort $d/b && rm -r $d",
            ],
        );
        assert_eq!(cu, Ok((0, b"hi\n".to_vec())));
        if have("python3") {
            let py = run_under(
                &f,
                "python3",
                &["-c", "import socket, subprocess, threading, os, multiprocessing\n\
                    t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
                    s = socket.socket(socket.AF_INET); s.bind(('127.0.0.1', 0)); s.close()\n\
                    print(subprocess.run(['echo', 'sub'], capture_output=True).stdout.decode().strip())\n\
                    try:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\nexcept OSError as e:\n    print('packet', e.errno)\n\
                    try:\n    os.unshare(os.CLONE_NEWUSER) if hasattr(os, 'unshare') else (_ for _ in ()).throw(PermissionError(1, 'x'))\nexcept PermissionError as e:\n    print('unshare', e.errno)\n\
                    with multiprocessing.Pool(2) as p: print(sum(p.map(abs, [-1, -2])))"],
            );
            assert_eq!(py, Ok((0, b"sub\npacket 1\nunshare 1\n3\n".to_vec())));
        }
        if have("node") {
            let js = run_under(
                &f,
                "node",
                &["-e", "const cp=require('child_process');console.log(cp.execSync('echo n').toString().trim());require('fs').readdirSync('/');new Promise(r=>setTimeout(r,10)).then(()=>console.log('t'))"],
            );
            assert_eq!(js, Ok((0, b"n\nt\n".to_vec())));
        }
        if have("gcc") {
            let dir =
                std::env::temp_dir().join(format!("nanoclaw-seccomp-gcc-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let script = format!(
                "cd {} && printf 'int main(void){{return 7;}}' > a.c && gcc -O1 -o a a.c && ./a; echo $?",
                dir.display()
            );
            let cc = run_under(&f, "sh", &["-c", &script]);
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(cc, Ok((0, b"7\n".to_vec())));
        }
    }

    fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Measures, in a child, the cost of installing the default filter and
    /// of a syscall under it; prints the numbers (run with --nocapture).
    #[test]
    fn measure_install_and_syscall_cost() {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let f = default_filter();
        let len = f.len();
        let (r, w) = (fds[0], fds[1]);
        let body = move || {
            const N: u64 = 200_000;
            let loop_ns = |nr: libc::c_long, a: [u64; 6]| {
                let t = now_ns();
                for _ in 0..N {
                    // SAFETY: harmless raw syscalls.
                    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
                }
                (now_ns() - t) / N
            };
            let m = u64::MAX;
            let before_getpid = loop_ns(libc::SYS_getpid, [0; 6]);
            let before_ioctl = loop_ns(libc::SYS_ioctl, [m, 0x541b, 0, 0, 0, 0]);
            let t0 = now_ns();
            if f.install().is_err() {
                return 1;
            }
            let install = now_ns() - t0;
            let after_getpid = loop_ns(libc::SYS_getpid, [0; 6]);
            let after_ioctl = loop_ns(libc::SYS_ioctl, [m, 0x541b, 0, 0, 0, 0]);
            let out = [
                install,
                before_getpid,
                after_getpid,
                before_ioctl,
                after_ioctl,
            ];
            // SAFETY: writing a stack array to our pipe.
            unsafe { libc::write(w, out.as_ptr().cast(), std::mem::size_of_val(&out)) };
            0
        };
        assert_eq!(in_child(None, &body), End::Code(0));
        let mut out = [0u64; 5];
        // SAFETY: reading into a stack array of the same size.
        let n = unsafe { libc::read(r, out.as_mut_ptr().cast(), std::mem::size_of_val(&out)) };
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
        assert_eq!(n as usize, std::mem::size_of_val(&out));
        eprintln!(
            "default filter: {} insns; install {} ns; getpid {} -> {} ns (cached allow); \
             ioctl(-1, FIONREAD) {} -> {} ns (filter runs)",
            len, out[0], out[1], out[2], out[3], out[4]
        );
        assert!(out[0] < 5_000_000, "install took {} ns", out[0]);
    }
}
