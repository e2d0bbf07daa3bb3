//! Landlock filesystem rules and IPC scoping: defence in depth inside the sandbox.
//!
//! Landlock is applied in the payload process **after** `pivot_root` (so every
//! path here is a path as seen inside the sandbox), after `PR_SET_NO_NEW_PRIVS`
//! and after capabilities are dropped, right before seccomp and `execve`.
//!
//! The policy ([`LandlockPolicy`]):
//! - **reads** are never restricted (read access rights are not handled);
//! - **writes** (write, truncate, create/remove of anything, cross-directory
//!   rename/link) are allowed only beneath [`LandlockPolicy::writable`]; a few
//!   device files ([`DEV_WRITABLE_FILES`]) may be written (not created or removed);
//! - **execution** is unrestricted when [`LandlockPolicy::exec_allow`] is empty,
//!   otherwise only files beneath those paths (plus the ELF interpreters, which
//!   the kernel opens with exec intent) may be executed;
//! - **ioctl on device files** (ABI >= 5) only on the writable device files;
//! - with [`LandlockPolicy::scope_ipc`] and ABI >= 6, signals and abstract unix
//!   socket connections cannot leave the Landlock domain.
//!
//! Building the rules is a pure, unit-tested function ([`plan`]); installing
//! them is a separate step ([`Prepared::apply`]) that does not allocate, so it
//! may run in a child between `fork` and `execve`.
//!
//! What Landlock does not cover (the read-only root mount and seccomp do):
//! `chmod`, `chown`, `utime`, xattrs and `mmap(PROT_EXEC)` of already opened
//! files are not checked. Files opened before [`Prepared::apply`] (stdio) keep
//! their rights. On ABI 1 every cross-directory rename or link is refused.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Landlock filesystem access rights (`LANDLOCK_ACCESS_FS_*` from `<linux/landlock.h>`).
pub mod access {
    /// Execute a file.
    pub const EXECUTE: u64 = 1 << 0;
    /// Open a file with write access.
    pub const WRITE_FILE: u64 = 1 << 1;
    /// Open a file with read access.
    pub const READ_FILE: u64 = 1 << 2;
    /// Open a directory or list its content.
    pub const READ_DIR: u64 = 1 << 3;
    /// Remove an empty directory or rename one.
    pub const REMOVE_DIR: u64 = 1 << 4;
    /// Unlink (or rename) a file.
    pub const REMOVE_FILE: u64 = 1 << 5;
    /// Create (or rename or link) a character device.
    pub const MAKE_CHAR: u64 = 1 << 6;
    /// Create (or rename) a directory.
    pub const MAKE_DIR: u64 = 1 << 7;
    /// Create (or rename or link) a regular file.
    pub const MAKE_REG: u64 = 1 << 8;
    /// Create (or rename or link) a unix domain socket.
    pub const MAKE_SOCK: u64 = 1 << 9;
    /// Create (or rename or link) a named pipe.
    pub const MAKE_FIFO: u64 = 1 << 10;
    /// Create (or rename or link) a block device.
    pub const MAKE_BLOCK: u64 = 1 << 11;
    /// Create (or rename or link) a symbolic link.
    pub const MAKE_SYM: u64 = 1 << 12;
    /// Link or rename a file from or to a different directory (ABI 2).
    pub const REFER: u64 = 1 << 13;
    /// Truncate a file (ABI 3).
    pub const TRUNCATE: u64 = 1 << 14;
    /// `ioctl` on character or block devices (ABI 5).
    pub const IOCTL_DEV: u64 = 1 << 15;

    /// The rights that make sense on a non-directory (the kernel refuses others
    /// with `EINVAL` on a file rule).
    pub const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

    /// Every write-ish right of ABI 1.
    pub const WRITE_V1: u64 = WRITE_FILE
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM;
}

/// Landlock scopes (`LANDLOCK_SCOPE_*`, ABI 6).
pub mod scope {
    /// Refuse connecting to abstract unix sockets created outside the domain.
    pub const ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    /// Refuse sending signals to processes outside the domain.
    pub const SIGNAL: u64 = 1 << 1;
}

/// The highest Landlock ABI this module knows. Newer kernels are used at
/// this level (their extra rights are simply not requested).
pub const MAX_KNOWN_ABI: u32 = 7;

/// Device files a program legitimately opens for writing (and `ioctl`s, e.g.
/// `isatty`): writable as existing files, never created or removed.
pub const DEV_WRITABLE_FILES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/pts",
    "/dev/ptmx",
    "/dev/random",
    "/dev/urandom",
];

/// The payload's stdout and stderr, reopened through `/dev/stdout` and
/// `/dev/stderr` by shells and scripts. When they are regular files (e.g. a
/// host file the output was redirected to) a file rule is added for that very
/// file, so reopening it works as it would outside; pipes and sockets need no
/// rule; terminals get none (so a host tty cannot be reopened, e.g. to regain
/// a controlling terminal).
pub const STDIO_FILES: &[&str] = &["/proc/self/fd/1", "/proc/self/fd/2"];

/// ELF interpreters the kernel opens (with exec intent, so they need the
/// EXECUTE right) when it starts a dynamically linked program. Added to the
/// exec rules automatically when execution is restricted; missing ones are
/// skipped. Symlinks are followed when the rule is installed, so the rule
/// lands on the resolved file.
pub const ELF_INTERPRETERS: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "/lib/ld-linux-aarch64.so.1",
    "/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
    "/lib/ld-musl-x86_64.so.1",
    "/lib/ld-musl-aarch64.so.1",
];

const CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// `struct landlock_ruleset_attr`.
#[repr(C)]
#[derive(Default)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the UAPI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// What the sandbox may write and execute, in sandbox paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LandlockPolicy {
    /// Directories (or files) beneath which everything may be written,
    /// created, removed, renamed and truncated: /tmp, /dev/shm, a rw
    /// /workspace, rw mounts. Missing paths are skipped.
    pub writable: Vec<PathBuf>,
    /// Existing files (or directories of files, like /dev/pts) that may be
    /// opened for writing, truncated and `ioctl`ed, but in which nothing may
    /// be created or removed. Missing paths are skipped.
    pub writable_files: Vec<PathBuf>,
    /// When non-empty, only files beneath these paths may be executed (plus
    /// the [`ELF_INTERPRETERS`]). Each must exist inside the sandbox. Note that
    /// a script's interpreter (`#!/bin/sh`) must be allowed too.
    pub exec_allow: Vec<PathBuf>,
    /// Scope signals and abstract unix sockets to the sandbox (ABI >= 6).
    pub scope_ipc: bool,
}

impl LandlockPolicy {
    /// The policy nanoclaw uses: `writable` as given, the
    /// [`DEV_WRITABLE_FILES`], execution limited to `exec_allow` when it is
    /// non-empty, and IPC scoped.
    pub fn standard(writable: Vec<PathBuf>, exec_allow: Vec<PathBuf>) -> Self {
        LandlockPolicy {
            writable,
            writable_files: DEV_WRITABLE_FILES.iter().map(PathBuf::from).collect(),
            exec_allow,
            scope_ipc: true,
        }
    }
}

/// Why a rule is in the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// From [`LandlockPolicy::writable`].
    Writable,
    /// From [`LandlockPolicy::writable_files`].
    WritableFile,
    /// From [`LandlockPolicy::exec_allow`] (must exist).
    ExecAllow,
    /// An ELF interpreter added automatically (skipped when missing).
    Interpreter,
    /// One of [`STDIO_FILES`]: added only when it is a regular file.
    Stdio,
}

/// One `LANDLOCK_RULE_PATH_BENEATH` rule to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedRule {
    /// Sandbox path; symlinks are followed.
    pub path: PathBuf,
    /// Rights granted beneath the path. When the path turns out not to be a
    /// directory, [`access::FILE_RIGHTS`] are kept and the rest dropped.
    pub access: u64,
    /// Where the rule comes from.
    pub kind: RuleKind,
}

impl PlannedRule {
    /// A missing path is an error (true only for [`RuleKind::ExecAllow`]).
    pub fn required(&self) -> bool {
        self.kind == RuleKind::ExecAllow
    }
}

/// The ruleset for one ABI level: what is handled (denied unless a rule
/// grants it) and the rules granting it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The ABI the plan was made for (0: Landlock unavailable, nothing to do).
    pub abi: u32,
    /// `handled_access_fs`.
    pub handled_fs: u64,
    /// `scoped` (ABI >= 6).
    pub scoped: u64,
    /// The rules, in order.
    pub rules: Vec<PlannedRule>,
}

impl Plan {
    /// A short description for reports, e.g.
    /// `"abi 7: fs write+exec rules, scoped signals+abstract unix"`.
    pub fn describe(&self) -> String {
        if self.abi == 0 {
            return "unavailable: Landlock not supported by this kernel".to_string();
        }
        let exec = if self.handled_fs & access::EXECUTE != 0 {
            "+exec"
        } else {
            ""
        };
        let mut s = format!("abi {}: fs write{exec} rules", self.abi);
        if self.handled_fs & access::IOCTL_DEV != 0 {
            s.push_str(", device ioctl rules");
        }
        let sig = self.scoped & scope::SIGNAL != 0;
        let unix = self.scoped & scope::ABSTRACT_UNIX_SOCKET != 0;
        match (sig, unix) {
            (true, true) => s.push_str(", scoped signals+abstract unix"),
            (true, false) => s.push_str(", scoped signals"),
            (false, true) => s.push_str(", scoped abstract unix"),
            (false, false) if self.abi < 6 => {
                s.push_str(", signals and abstract unix not scoped (needs abi 6)")
            }
            (false, false) => {}
        }
        if self.abi < 2 {
            s.push_str(", cross-directory rename/link refused (abi 1)");
        }
        s
    }
}

/// The write rights an ABI knows.
fn write_rights(abi: u32) -> u64 {
    let mut w = access::WRITE_V1;
    if abi >= 2 {
        w |= access::REFER;
    }
    if abi >= 3 {
        w |= access::TRUNCATE;
    }
    w
}

/// Pure planning step: which rules with which access masks for `abi`.
/// `abi == 0` means Landlock is unavailable and yields an empty plan.
pub fn plan(policy: &LandlockPolicy, abi: u32) -> Plan {
    if abi == 0 {
        return Plan {
            abi,
            handled_fs: 0,
            scoped: 0,
            rules: Vec::new(),
        };
    }
    let write = write_rights(abi);
    let ioctl = if abi >= 5 { access::IOCTL_DEV } else { 0 };
    let restrict_exec = !policy.exec_allow.is_empty();
    let exec = if restrict_exec { access::EXECUTE } else { 0 };
    let handled_fs = write | ioctl | exec;
    let scoped = if policy.scope_ipc && abi >= 6 {
        scope::ABSTRACT_UNIX_SOCKET | scope::SIGNAL
    } else {
        0
    };
    let file_write = access::WRITE_FILE | (write & access::TRUNCATE) | ioctl;

    let mut rules = Vec::new();
    for p in STDIO_FILES {
        rules.push(PlannedRule {
            path: PathBuf::from(p),
            access: file_write,
            kind: RuleKind::Stdio,
        });
    }
    for p in &policy.writable {
        rules.push(PlannedRule {
            path: p.clone(),
            access: write | ioctl,
            kind: RuleKind::Writable,
        });
    }
    for p in &policy.writable_files {
        rules.push(PlannedRule {
            path: p.clone(),
            access: file_write,
            kind: RuleKind::WritableFile,
        });
    }
    if restrict_exec {
        for p in &policy.exec_allow {
            rules.push(PlannedRule {
                path: p.clone(),
                access: access::EXECUTE,
                kind: RuleKind::ExecAllow,
            });
        }
        for p in ELF_INTERPRETERS {
            rules.push(PlannedRule {
                path: PathBuf::from(p),
                access: access::EXECUTE,
                kind: RuleKind::Interpreter,
            });
        }
    }
    Plan {
        abi,
        handled_fs,
        scoped,
        rules,
    }
}

/// Why Landlock cannot be used on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// `ENOSYS`: the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK).
    NotBuiltIn,
    /// `EOPNOTSUPP`: built in but not enabled at boot (`lsm=` lacks landlock).
    DisabledAtBoot,
    /// Another errno (e.g. `EPERM` from a seccomp filter of a parent sandbox).
    Other(i32),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NotBuiltIn => f.write_str(
                "kernel built without Landlock (landlock_create_ruleset: ENOSYS); \
                 use Linux >= 5.13 with CONFIG_SECURITY_LANDLOCK=y",
            ),
            Unavailable::DisabledAtBoot => f.write_str(
                "Landlock disabled at boot (landlock_create_ruleset: EOPNOTSUPP); \
                 add landlock to the lsm= kernel parameter",
            ),
            Unavailable::Other(e) => write!(
                f,
                "landlock_create_ruleset failed: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
        }
    }
}

/// The kernel's Landlock ABI version, or why there is none.
pub fn probe() -> Result<u32, Unavailable> {
    // SAFETY: with a NULL attr, size 0 and the VERSION flag the syscall only
    // returns a number; no memory is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        return Err(match errno() {
            libc::ENOSYS => Unavailable::NotBuiltIn,
            libc::EOPNOTSUPP => Unavailable::DisabledAtBoot,
            e => Unavailable::Other(e),
        });
    }
    Ok(u32::try_from(r).unwrap_or(0))
}

/// The kernel's Landlock ABI version (`None` when unavailable).
pub fn abi_version() -> Option<u32> {
    probe().ok()
}

/// Everything that can go wrong with Landlock.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// An `--exec-allow` path does not exist inside the sandbox.
    #[error(
        "--exec-allow {path}: {source}; give a path as it is seen inside the sandbox \
         (e.g. /usr/bin), or remove the flag"
    )]
    MissingExecAllow {
        /// The sandbox path.
        path: PathBuf,
        /// Why it could not be opened.
        source: std::io::Error,
    },
    /// A policy path cannot be passed to the kernel.
    #[error("Landlock path {path} contains a NUL byte; remove it from the policy")]
    BadPath {
        /// The offending path.
        path: PathBuf,
    },
    /// A Landlock step failed.
    #[error("Landlock: {call}{} failed: {source}{hint}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    Syscall {
        /// The failing call.
        call: &'static str,
        /// The policy path involved, if any.
        path: Option<PathBuf>,
        /// The kernel's answer.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

/// The step of [`Prepared::apply`] that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// `landlock_create_ruleset`.
    CreateRuleset = 1,
    /// `open(O_PATH)` of a rule's path.
    OpenPath = 2,
    /// `fstat` of a rule's path.
    Fstat = 3,
    /// `landlock_add_rule`.
    AddRule = 4,
    /// `landlock_restrict_self`.
    RestrictSelf = 5,
}

impl Step {
    fn from_u8(v: u8) -> Option<Step> {
        Some(match v {
            1 => Step::CreateRuleset,
            2 => Step::OpenPath,
            3 => Step::Fstat,
            4 => Step::AddRule,
            5 => Step::RestrictSelf,
            _ => return None,
        })
    }
    fn call(self) -> &'static str {
        match self {
            Step::CreateRuleset => "landlock_create_ruleset",
            Step::OpenPath => "open(O_PATH)",
            Step::Fstat => "fstat",
            Step::AddRule => "landlock_add_rule",
            Step::RestrictSelf => "landlock_restrict_self",
        }
    }
}

/// A failure of [`Prepared::apply`], small and `Copy` so a child can send it
/// to its parent over a pipe ([`ApplyFailure::to_bytes`]); the parent turns it
/// into a [`LandlockError`] with [`Prepared::explain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyFailure {
    /// The failing step.
    pub step: Step,
    /// Index of the rule in [`Prepared::plan`]'s rules, if a rule was involved.
    pub rule: Option<u32>,
    /// The errno.
    pub errno: i32,
}

impl ApplyFailure {
    /// Encodes into 9 bytes.
    pub fn to_bytes(self) -> [u8; 9] {
        let mut b = [0u8; 9];
        b[0] = self.step as u8;
        b[1..5].copy_from_slice(&self.rule.unwrap_or(u32::MAX).to_le_bytes());
        b[5..9].copy_from_slice(&self.errno.to_le_bytes());
        b
    }

    /// Decodes what [`ApplyFailure::to_bytes`] produced.
    pub fn from_bytes(b: [u8; 9]) -> Option<Self> {
        let step = Step::from_u8(b[0])?;
        let rule = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        let errno = i32::from_le_bytes([b[5], b[6], b[7], b[8]]);
        Some(ApplyFailure {
            step,
            rule: (rule != u32::MAX).then_some(rule),
            errno,
        })
    }
}

/// A plan made ready to install: ABI probed, paths converted to C strings,
/// description rendered. Build it before `fork`; call [`Prepared::apply`] in
/// the child (it does not allocate).
#[derive(Debug)]
pub struct Prepared {
    plan: Plan,
    cpaths: Vec<CString>,
    description: String,
}

/// Probes the kernel and prepares `policy` for [`Prepared::apply`].
pub fn prepare(policy: &LandlockPolicy) -> Result<Prepared, LandlockError> {
    match probe() {
        Ok(abi) => prepare_plan(plan(policy, abi)),
        Err(why) => {
            let mut p = prepare_plan(plan(policy, 0))?;
            p.description = format!("unavailable: {why}");
            Ok(p)
        }
    }
}

/// Prepares an explicit plan (e.g. one adjusted by a test).
pub fn prepare_plan(plan: Plan) -> Result<Prepared, LandlockError> {
    let mut cpaths = Vec::with_capacity(plan.rules.len());
    for r in &plan.rules {
        let c =
            CString::new(r.path.as_os_str().as_bytes()).map_err(|_| LandlockError::BadPath {
                path: r.path.clone(),
            })?;
        cpaths.push(c);
    }
    let description = plan.describe();
    Ok(Prepared {
        plan,
        cpaths,
        description,
    })
}

/// Installs `policy` on the calling thread (it must be the only thread of the
/// process, and `PR_SET_NO_NEW_PRIVS` must be set). Returns a description for
/// reports; when the kernel lacks Landlock returns `Ok("unavailable: <why>")`.
pub fn install(policy: &LandlockPolicy) -> Result<String, LandlockError> {
    let p = prepare(policy)?;
    p.apply().map_err(|f| p.explain(f))?;
    Ok(p.description)
}

/// Installs an explicit plan; see [`install`].
pub fn install_plan(plan: Plan) -> Result<String, LandlockError> {
    let p = prepare_plan(plan)?;
    p.apply().map_err(|f| p.explain(f))?;
    Ok(p.description)
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Closes an fd on drop.
struct Fd(libc::c_int);

/// Puts the calling thread in a new Landlock domain nested in its current
/// one that restricts nothing on the filesystem (it handles reading files
/// and allows it beneath `/`) and scopes nothing: what it adds is Landlock's
/// ptrace rule — a process may not ptrace, or read the memory, environment
/// or descriptors through `/proc` of, a process that is not in its own
/// domain or one nested in it. Each exec into a long-lived sandbox enters
/// one, so what one exec leaves running cannot reach into another exec's
/// processes, while signals between them still work (scoping is checked
/// against the enclosing sandbox domain). Needs `no_new_privs` (or
/// CAP_SYS_ADMIN). Does not allocate; returns the errno on failure.
pub fn enter_sub_domain() -> Result<(), i32> {
    let attr = RulesetAttr {
        handled_access_fs: access::READ_FILE,
        handled_access_net: 0,
        scoped: 0,
    };
    // SAFETY: `attr` is a valid ruleset_attr; we pass its first 8 bytes
    // (handled_access_fs only), which every ABI accepts.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            8usize,
            0u32,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    let ruleset = Fd(r as libc::c_int);
    // SAFETY: a NUL-terminated path; the flags need no mode.
    let root = unsafe { libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if root < 0 {
        return Err(errno());
    }
    let root = Fd(root);
    let rule = PathBeneathAttr {
        allowed_access: access::READ_FILE,
        parent_fd: root.0,
    };
    // SAFETY: our ruleset fd and a valid packed path_beneath_attr that lives
    // across the call; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.0,
            RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0u32,
        )
    };
    if r != 0 {
        return Err(errno());
    }
    // SAFETY: plain syscall on our ruleset fd.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.0, 0u32) } != 0 {
        return Err(errno());
    }
    Ok(())
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by the kernel to us and is closed once.
        unsafe { libc::close(self.0) };
    }
}

impl Prepared {
    /// The plan being installed.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// What [`Prepared::apply`] sets up, for reports (e.g.
    /// `"abi 7: fs write+exec rules, device ioctl rules, scoped signals+abstract unix"`,
    /// or `"unavailable: <why>"`).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Installs the ruleset on the calling thread with `landlock_restrict_self`.
    /// Does not allocate. Does nothing when Landlock is unavailable (see
    /// [`Prepared::description`]). Requires `PR_SET_NO_NEW_PRIVS` (or
    /// CAP_SYS_ADMIN) and a single-threaded process.
    pub fn apply(&self) -> Result<(), ApplyFailure> {
        let plan = &self.plan;
        if plan.abi == 0 {
            return Ok(());
        }
        let fail = |step, rule: Option<usize>| ApplyFailure {
            step,
            rule: rule.and_then(|r| u32::try_from(r).ok()),
            errno: errno(),
        };
        let attr = RulesetAttr {
            handled_access_fs: plan.handled_fs,
            handled_access_net: 0,
            scoped: plan.scoped,
        };
        // Pass only the fields the ABI knows, so older kernels accept it.
        let size = if plan.abi >= 6 {
            std::mem::size_of::<RulesetAttr>()
        } else if plan.abi >= 4 {
            16
        } else {
            8
        };
        // SAFETY: `attr` is a valid ruleset_attr of at least `size` bytes that
        // lives across the call; the kernel only reads it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if r < 0 {
            return Err(fail(Step::CreateRuleset, None));
        }
        let ruleset = Fd(r as libc::c_int);

        for (i, (rule, cpath)) in plan.rules.iter().zip(&self.cpaths).enumerate() {
            // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
            let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                let e = errno();
                let missing = e == libc::ENOENT || e == libc::ENOTDIR;
                if !rule.required() && (missing || rule.kind == RuleKind::Stdio) {
                    continue;
                }
                return Err(ApplyFailure {
                    step: Step::OpenPath,
                    rule: u32::try_from(i).ok(),
                    errno: e,
                });
            }
            let fd = Fd(fd);
            // SAFETY: an all-zero `stat` is a valid value; fstat fills it.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `fd.0` is an open fd and `st` is a writable stat buffer.
            if unsafe { libc::fstat(fd.0, &mut st) } != 0 {
                return Err(fail(Step::Fstat, Some(i)));
            }
            let fmt = st.st_mode & libc::S_IFMT;
            if rule.kind == RuleKind::Stdio && fmt != libc::S_IFREG {
                continue;
            }
            let mut allowed = rule.access & plan.handled_fs;
            if fmt != libc::S_IFDIR {
                allowed &= access::FILE_RIGHTS;
            }
            if allowed == 0 {
                continue;
            }
            let attr = PathBeneathAttr {
                allowed_access: allowed,
                parent_fd: fd.0,
            };
            // SAFETY: `ruleset.0` is our ruleset fd; `attr` is a valid packed
            // path_beneath_attr living across the call; the kernel only reads it.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.0,
                    RULE_PATH_BENEATH,
                    &attr as *const PathBeneathAttr,
                    0u32,
                )
            };
            if r != 0 {
                return Err(fail(Step::AddRule, Some(i)));
            }
        }
        // SAFETY: plain syscall on our ruleset fd, no memory involved.
        let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.0, 0u32) };
        if r != 0 {
            return Err(fail(Step::RestrictSelf, None));
        }
        Ok(())
    }

    /// Turns an [`ApplyFailure`] into a [`LandlockError`] naming the path and
    /// saying what to do.
    pub fn explain(&self, f: ApplyFailure) -> LandlockError {
        let rule = f
            .rule
            .and_then(|i| self.plan.rules.get(usize::try_from(i).ok()?));
        let source = std::io::Error::from_raw_os_error(f.errno);
        if let (Step::OpenPath, Some(r)) = (f.step, rule) {
            if r.required() {
                return LandlockError::MissingExecAllow {
                    path: r.path.clone(),
                    source,
                };
            }
        }
        let hint = match (f.step, f.errno) {
            (Step::RestrictSelf, libc::EPERM) => {
                "; set PR_SET_NO_NEW_PRIVS before installing Landlock (a nanoclaw bug)"
            }
            (Step::RestrictSelf, libc::E2BIG) => {
                "; too many nested Landlock domains (at most 16): run nanoclaw less deeply nested"
            }
            (Step::OpenPath, libc::EACCES) => {
                "; the sandbox user cannot reach this path: fix its permissions or drop it from the policy"
            }
            (Step::AddRule, _) | (Step::CreateRuleset, _) => {
                "; this is a nanoclaw bug, please report it with `nanoclaw doctor` output"
            }
            _ => "",
        };
        LandlockError::Syscall {
            call: f.step.call(),
            path: rule.map(|r| r.path.clone()),
            source,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn pb(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    // ---------- pure planning ----------

    #[test]
    fn plan_abi0_is_empty() {
        let p = plan(
            &LandlockPolicy::standard(vec![pb("/tmp")], vec![pb("/usr/bin")]),
            0,
        );
        assert_eq!(p.handled_fs, 0);
        assert!(p.rules.is_empty());
        assert!(p.describe().starts_with("unavailable"));
    }

    #[test]
    fn plan_per_abi_level() {
        let pol = LandlockPolicy::standard(vec![pb("/tmp")], vec![]);
        for abi in 1..=MAX_KNOWN_ABI + 1 {
            let p = plan(&pol, abi);
            // Never handles reads, never exec when exec_allow is empty.
            assert_eq!(p.handled_fs & (access::READ_FILE | access::READ_DIR), 0);
            assert_eq!(p.handled_fs & access::EXECUTE, 0);
            assert_eq!(p.handled_fs & access::WRITE_V1, access::WRITE_V1);
            assert_eq!(p.handled_fs & access::REFER != 0, abi >= 2, "abi {abi}");
            assert_eq!(p.handled_fs & access::TRUNCATE != 0, abi >= 3, "abi {abi}");
            assert_eq!(p.handled_fs & access::IOCTL_DEV != 0, abi >= 5, "abi {abi}");
            let want_scope = if abi >= 6 {
                scope::SIGNAL | scope::ABSTRACT_UNIX_SOCKET
            } else {
                0
            };
            assert_eq!(p.scoped, want_scope, "abi {abi}");
            // No bit above what the ABI knows.
            let known = match abi {
                1 => (1 << 13) - 1,
                2 => (1 << 14) - 1,
                3 | 4 => (1 << 15) - 1,
                _ => (1 << 16) - 1,
            };
            assert_eq!(p.handled_fs & !known, 0, "abi {abi}");
            for r in &p.rules {
                assert_eq!(r.access & !p.handled_fs, 0, "rule outside handled set");
                assert_ne!(r.access, 0);
            }
            // /tmp: every handled write right; /dev/null: write+truncate(+ioctl) only.
            let tmp = p.rules.iter().find(|r| r.path == pb("/tmp")).unwrap();
            assert_eq!(tmp.kind, RuleKind::Writable);
            assert_eq!(tmp.access, p.handled_fs);
            let null = p.rules.iter().find(|r| r.path == pb("/dev/null")).unwrap();
            assert_eq!(null.access & !access::FILE_RIGHTS, 0);
            assert_ne!(null.access & access::WRITE_FILE, 0);
            assert_eq!(null.access & access::MAKE_REG, 0);
        }
        assert!(plan(&pol, 1).describe().contains("rename/link refused"));
        assert!(plan(&pol, 5).describe().contains("not scoped"));
        assert_eq!(
            plan(&pol, 6).describe(),
            "abi 6: fs write rules, device ioctl rules, scoped signals+abstract unix"
        );
    }

    #[test]
    fn plan_exec_allow_adds_interpreters() {
        let pol = LandlockPolicy::standard(vec![pb("/tmp")], vec![pb("/usr/bin")]);
        for abi in 1..=MAX_KNOWN_ABI {
            let p = plan(&pol, abi);
            assert_ne!(p.handled_fs & access::EXECUTE, 0);
            let exec: Vec<_> = p
                .rules
                .iter()
                .filter(|r| r.access & access::EXECUTE != 0)
                .collect();
            assert_eq!(exec[0].path, pb("/usr/bin"));
            assert!(exec[0].required());
            assert!(exec
                .iter()
                .any(|r| r.path == pb("/lib64/ld-linux-x86-64.so.2") && !r.required()));
            // Writable places are not executable.
            let tmp = p.rules.iter().find(|r| r.path == pb("/tmp")).unwrap();
            assert_eq!(tmp.access & access::EXECUTE, 0);
            assert!(p.describe().contains("write+exec"));
        }
        let mut nos = pol.clone();
        nos.scope_ipc = false;
        assert_eq!(plan(&nos, 7).scoped, 0);
    }

    #[test]
    fn apply_failure_roundtrip() {
        let f = ApplyFailure {
            step: Step::AddRule,
            rule: Some(3),
            errno: libc::EINVAL,
        };
        assert_eq!(ApplyFailure::from_bytes(f.to_bytes()), Some(f));
        let g = ApplyFailure { rule: None, ..f };
        assert_eq!(ApplyFailure::from_bytes(g.to_bytes()), Some(g));
        assert_eq!(ApplyFailure::from_bytes([0; 9]), None);
    }

    // ---------- real kernel, in forked children ----------

    fn kernel_abi() -> u32 {
        let abi = abi_version().expect("this test host must have Landlock");
        assert!(abi >= 1);
        abi
    }

    /// Runs `f` in a forked child after setting NO_NEW_PRIVS; returns its exit
    /// status (`f`'s return value, 255 on panic).
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: fork in a test; the child only runs `f` and `_exit`s. glibc
        // makes malloc usable after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: plain prctl, no memory involved.
                let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                assert_eq!(r, 0);
                f()
            }))
            .unwrap_or(255);
            // SAFETY: leaving the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p = std::env::temp_dir().join(format!(
                "nanoclaw-landlock-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn errno_of(r: std::io::Result<()>) -> i32 {
        match r {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        }
    }

    fn try_write(p: &Path) -> i32 {
        errno_of(std::fs::write(p, b"x"))
    }

    #[test]
    fn writes_only_beneath_writable() {
        kernel_abi();
        let allowed = TempDir::new("rw");
        let denied = TempDir::new("deny"); // mode 0777: DAC would allow it
        std::fs::write(denied.0.join("existing"), b"old").unwrap();
        std::fs::create_dir(denied.0.join("sub")).unwrap();
        let (a, d) = (allowed.0.clone(), denied.0.clone());
        // Control: without Landlock, writing to `denied` works (the test can fail).
        assert_eq!(try_write(&d.join("control")), 0);
        let code = in_child(move || {
            let pol = LandlockPolicy::standard(vec![a.clone()], vec![]);
            install(&pol).unwrap();
            let checks: [(i32, i32); 11] = [
                (try_write(&a.join("new")), 0),
                (errno_of(std::fs::create_dir(a.join("d"))), 0),
                (
                    errno_of(std::fs::rename(a.join("new"), a.join("d/moved"))),
                    0,
                ),
                (errno_of(std::fs::remove_file(a.join("d/moved"))), 0),
                (try_write(&d.join("new")), libc::EACCES),
                (try_write(&d.join("existing")), libc::EACCES),
                (
                    errno_of(std::fs::remove_file(d.join("existing"))),
                    libc::EACCES,
                ),
                (errno_of(std::fs::create_dir(d.join("x"))), libc::EACCES),
                (errno_of(std::fs::remove_dir(d.join("sub"))), libc::EACCES),
                (
                    errno_of(std::os::unix::fs::symlink("/etc/passwd", d.join("l"))),
                    libc::EACCES,
                ),
                // Device files stay writable; reads everywhere.
                (try_write(Path::new("/dev/null")), 0),
            ];
            for (i, (got, want)) in checks.iter().enumerate() {
                if got != want {
                    eprintln!("check {i}: errno {got}, want {want}");
                    return 10 + i as i32;
                }
            }
            if std::fs::read(d.join("existing")).ok().as_deref() != Some(&b"old"[..]) {
                return 2;
            }
            // Truncating an existing file outside (ABI >= 3) or opening it for
            // write is refused even without O_CREAT.
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("existing"));
            if r.map_err(|e| e.raw_os_error()).err() != Some(Some(libc::EACCES)) {
                return 3;
            }
            0
        });
        assert_eq!(code, 0);
        assert_eq!(std::fs::read(denied.0.join("existing")).unwrap(), b"old");
        assert!(!denied.0.join("new").exists());
    }

    #[test]
    fn cross_dir_rename_out_of_writable_refused() {
        let abi = kernel_abi();
        let allowed = TempDir::new("ren");
        let denied = TempDir::new("rendeny");
        std::fs::write(denied.0.join("victim"), b"v").unwrap();
        let (a, d) = (allowed.0.clone(), denied.0.clone());
        let code = in_child(move || {
            install(&LandlockPolicy::standard(vec![a.clone()], vec![])).unwrap();
            // Moving a file from a read-only place into a writable one would
            // remove it from the read-only place: refused.
            let e = errno_of(std::fs::rename(d.join("victim"), a.join("stolen")));
            if e != libc::EACCES && e != libc::EXDEV {
                return 1;
            }
            // Rename within the writable dir across subdirs works with REFER.
            std::fs::create_dir(a.join("s1")).unwrap();
            std::fs::create_dir(a.join("s2")).unwrap();
            std::fs::write(a.join("s1/f"), b"").unwrap();
            let e = errno_of(std::fs::rename(a.join("s1/f"), a.join("s2/f")));
            if abi >= 2 && e != 0 {
                return 2;
            }
            0
        });
        assert_eq!(code, 0);
        assert!(denied.0.join("victim").exists());
    }

    fn exec_errno(prog: &Path) -> i32 {
        match std::process::Command::new(prog)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(s) if s.success() => 0,
            Ok(_) => -2,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        }
    }

    #[test]
    fn exec_allow_restricts_execution() {
        kernel_abi();
        let dir = TempDir::new("exec");
        let outside = dir.0.join("mytrue");
        std::fs::copy("/usr/bin/true", &outside).unwrap();
        // Control: without Landlock it runs.
        assert_eq!(exec_errno(&outside), 0);
        let o = outside.clone();
        let w = dir.0.clone();
        let code = in_child(move || {
            let pol = LandlockPolicy::standard(vec![w.clone()], vec![pb("/usr/bin")]);
            install(&pol).unwrap();
            if exec_errno(Path::new("/usr/bin/true")) != 0 {
                return 1;
            }
            // /bin/sh -> /usr/bin/dash is inside /usr/bin (usrmerge): allowed.
            if exec_errno(Path::new("/bin/sh")) != 0 {
                return 2;
            }
            // A copy in a writable dir: refused.
            if exec_errno(&o) != libc::EACCES {
                return 3;
            }
            // Something outside /usr/bin that is a real program.
            if Path::new("/usr/sbin/nologin").exists()
                && exec_errno(Path::new("/usr/sbin/nologin")) != libc::EACCES
            {
                return 4;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn interpreter_rule_is_needed() {
        // Proves the ELF interpreter needs EXECUTE: without its rule, a
        // dynamically linked program in an allowed dir cannot start.
        kernel_abi();
        let interp = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2")
            .or_else(|_| std::fs::canonicalize("/lib/ld-linux-aarch64.so.1"))
            .unwrap();
        if interp.starts_with("/usr/bin") {
            return;
        }
        let code = in_child(|| {
            let pol = LandlockPolicy::standard(vec![], vec![pb("/usr/bin")]);
            let mut p = plan(&pol, abi_version().unwrap());
            p.rules.retain(|r| r.kind != RuleKind::Interpreter);
            install_plan(p).unwrap();
            exec_errno(Path::new("/usr/bin/true"))
        });
        assert_eq!(code, libc::EACCES);
    }

    #[test]
    fn missing_exec_allow_is_an_error() {
        kernel_abi();
        let code = in_child(|| {
            let pol = LandlockPolicy::standard(vec![], vec![pb("/nonexistent/nanoclaw-bin")]);
            match install(&pol) {
                Err(e @ LandlockError::MissingExecAllow { .. }) => {
                    let msg = e.to_string();
                    if msg.contains("/nonexistent/nanoclaw-bin") && msg.contains("exec-allow") {
                        0
                    } else {
                        2
                    }
                }
                _ => 1,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn missing_writable_paths_are_skipped() {
        kernel_abi();
        let code = in_child(|| {
            let pol = LandlockPolicy::standard(vec![pb("/nonexistent/nanoclaw-w")], vec![]);
            match install(&pol) {
                Ok(d) if d.starts_with("abi ") => 0,
                _ => 1,
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn restrict_self_without_nnp_says_why() {
        kernel_abi();
        // A child without NO_NEW_PRIVS and without CAP_SYS_ADMIN.
        // SAFETY: fork in a test; child only runs simple code and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // Drop all caps: setresuid to nobody clears them.
            // SAFETY: plain syscalls in the child.
            unsafe {
                libc::setresgid(65534, 65534, 65534);
                libc::setresuid(65534, 65534, 65534);
            }
            let code = match install(&LandlockPolicy::standard(vec![], vec![])) {
                Err(e) if e.to_string().contains("PR_SET_NO_NEW_PRIVS") => 0,
                _ => 1,
            };
            // SAFETY: exit child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }

    fn spawn_sleeper() -> std::process::Child {
        std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap()
    }

    #[test]
    fn signals_scoped_to_domain() {
        let abi = kernel_abi();
        if abi < 6 {
            eprintln!("skipping: abi {abi} < 6 has no signal scoping");
            return;
        }
        let mut sibling = spawn_sleeper();
        let spid = sibling.id() as libc::pid_t;
        let run = |scope_ipc: bool| {
            in_child(move || {
                let mut pol = LandlockPolicy::standard(vec![], vec![]);
                pol.scope_ipc = scope_ipc;
                install(&pol).unwrap();
                // A process inside the domain can still be signalled.
                // SAFETY: fork; the grandchild only pauses.
                let inner = unsafe { libc::fork() };
                if inner == 0 {
                    // SAFETY: wait for a signal, then exit.
                    unsafe {
                        libc::pause();
                        libc::_exit(0)
                    };
                }
                // SAFETY: signalling our own child.
                if unsafe { libc::kill(inner, libc::SIGKILL) } != 0 {
                    return 3;
                }
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(inner, std::ptr::null_mut(), 0) };
                // Signal 0 to the sibling outside the domain.
                // SAFETY: kill with signal 0 only checks permission.
                let r = unsafe { libc::kill(spid, 0) };
                if r == 0 {
                    0
                } else if errno() == libc::EPERM {
                    1
                } else {
                    2
                }
            })
        };
        assert_eq!(run(false), 0, "control: unscoped child can signal sibling");
        assert_eq!(run(true), 1, "scoped child must get EPERM");
        // And a real SIGKILL attempt does not kill the sibling.
        let code = in_child(move || {
            install(&LandlockPolicy::standard(vec![], vec![])).unwrap();
            // SAFETY: attempted kill of a process outside the domain.
            unsafe { libc::kill(spid, libc::SIGKILL) };
            0
        });
        assert_eq!(code, 0);
        assert!(sibling.try_wait().unwrap().is_none(), "sibling was killed");
        sibling.kill().unwrap();
        sibling.wait().unwrap();
    }

    #[test]
    fn abstract_unix_scoped_to_domain() {
        let abi = kernel_abi();
        if abi < 6 {
            return;
        }
        use std::os::linux::net::SocketAddrExt;
        let name = format!("nanoclaw-landlock-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        let run = |scope_ipc: bool| {
            let addr = addr.clone();
            in_child(move || {
                let mut pol = LandlockPolicy::standard(vec![], vec![]);
                pol.scope_ipc = scope_ipc;
                install(&pol).unwrap();
                match std::os::unix::net::UnixStream::connect_addr(&addr) {
                    Ok(_) => 0,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => 1,
                    Err(_) => 2,
                }
            })
        };
        assert_eq!(run(false), 0, "control: unscoped child can connect");
        assert_eq!(run(true), 1, "scoped child must get EPERM");
        drop(listener);
    }

    #[test]
    fn stdout_file_can_be_reopened_but_not_its_neighbours() {
        kernel_abi();
        let dir = TempDir::new("stdio");
        let out = dir.0.join("out.txt");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap();
        let d = dir.0.clone();
        let pol = LandlockPolicy::standard(vec![], vec![]);
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                "echo a; echo b > /dev/stdout; echo c >> /proc/self/fd/1; \
                 (echo no > {}/neighbour) 2>/dev/null || echo denied",
                d.display()
            ))
            .stdout(f);
        let prepared = std::sync::Arc::new(prepare(&pol).unwrap());
        let p2 = prepared.clone();
        // SAFETY: runs between fork and exec; only syscalls, `apply` does not allocate.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                p2.apply()
                    .map_err(|f| std::io::Error::from_raw_os_error(f.errno))
            });
        }
        assert!(cmd.status().unwrap().success());
        // `> /dev/stdout` truncates the same file, so "a" is gone.
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "b\nc\ndenied\n");
        assert!(!dir.0.join("neighbour").exists());
    }

    /// Runs `argv` under the standard policy in a child, stdout to a pipe.
    fn run_under_policy(pol: LandlockPolicy, argv: &[&str]) -> (i32, String, String) {
        let mut cmd = std::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let prepared = prepare(&pol).unwrap();
        let prepared = std::sync::Arc::new(prepared);
        let p2 = prepared.clone();
        // SAFETY: the closure runs between fork and exec; it only makes
        // syscalls and `Prepared::apply` does not allocate.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                p2.apply()
                    .map_err(|f| std::io::Error::from_raw_os_error(f.errno))
            });
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait().unwrap();
        (st.code().unwrap_or(-1), out, err)
    }

    #[test]
    fn interpreters_work_under_policy() {
        kernel_abi();
        let tmp = TempDir::new("interp");
        let t = tmp.0.display().to_string();
        let pol = LandlockPolicy::standard(
            vec![tmp.0.clone(), pb("/dev/shm")],
            vec![pb("/usr/bin"), pb("/usr/local/bin")],
        );
        let script = format!(
            "echo hi > {t}/x && cat {t}/x && echo out > /dev/stdout && echo err > /dev/stderr \
             && echo n > /dev/null && ! (echo no > /var/tmp/nanoclaw-ll-$$) 2>/dev/null && echo ok"
        );
        let (c, o, e) = run_under_policy(pol.clone(), &["/bin/sh", "-c", &script]);
        assert_eq!((c, o.as_str()), (0, "hi\nout\nok\n"), "stderr: {e}");
        assert_eq!(e, "err\n");

        let (c, o, e) = run_under_policy(
            pol.clone(),
            &[
                "/usr/bin/python3",
                "-c",
                &format!(
                    "import sys,os,tempfile,subprocess\n\
                     open('{t}/p','w').write('py')\n\
                     print(open('{t}/p').read(), file=open('/dev/stdout','w'))\n\
                     sys.stderr.write('e\\n')\n\
                     print(subprocess.run(['true']).returncode)\n\
                     try:\n open('/var/tmp/nanoclaw-ll-py','w')\nexcept PermissionError: print('denied')"
                ),
            ],
        );
        assert_eq!((c, o.as_str()), (0, "py\n0\ndenied\n"), "stderr: {e}");

        if Path::new("/usr/bin/node").exists() {
            let (c, o, e) = run_under_policy(
                pol,
                &[
                    "/usr/bin/node",
                    "-e",
                    &format!(
                        "const fs=require('fs');fs.writeFileSync('{t}/n','js');\
                         console.log(fs.readFileSync('{t}/n','utf8'));\
                         try{{fs.writeFileSync('/var/tmp/nanoclaw-ll-js','x')}}catch(e){{console.log(e.code)}}\
                         console.log(require('child_process').execFileSync('true').length)"
                    ),
                ],
            );
            assert_eq!((c, o.as_str()), (0, "js\nEACCES\n0\n"), "stderr: {e}");
        }
    }
}
