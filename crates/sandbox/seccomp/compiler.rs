//! Docker-format seccomp profiles → classic BPF, with no C library.
//!
//! This file is compiled twice: by `build.rs` (to turn `default.json` into the
//! built-in program once, at build time) and by `src/native/seccomp.rs` (for
//! `--seccomp PATH`). It therefore depends on nothing but `serde_json` and
//! the standard library.
//!
//! # Semantics
//!
//! * Architecture: the program first checks `seccomp_data.arch` against the
//!   one native ABI (x86_64 or aarch64). Anything else — the ia32 (`int 0x80`)
//!   ABI on x86_64, or any ABI a profile lists in `architectures` — gets
//!   `SECCOMP_RET_KILL_PROCESS`: syscall numbers of another ABI mean other
//!   syscalls, so no rule can be applied to them, no program in the sandbox
//!   legitimately uses them, and a kill (SIGSYS) is loud where an errno
//!   would let a probe continue quietly.
//! * On x86_64, numbers with the x32 bit (`0x40000000`) set are killed the
//!   same way, except `-1` (`0xffffffff`), which ptrace-style callers use
//!   and which the kernel answers with ENOSYS anyway.
//! * Rules for one syscall are tried in profile order; the first whose
//!   argument comparisons all hold decides. No match → `defaultAction`.
//!   (libseccomp merges rules into a tree instead; for every profile that
//!   does not give one syscall overlapping rules with different actions —
//!   Docker's own default among them — the result is the same.)
//! * `SCMP_ACT_KILL` is `KILL_THREAD` (as in libseccomp); `SCMP_ACT_TRACE`
//!   is compiled to `ERRNO(ENOSYS)`, which is what the kernel answers when no
//!   tracer is attached — nanoclaw never attaches one, and compiling it
//!   directly means an outside tracer cannot change the outcome.
//!   `SCMP_ACT_NOTIFY` is refused (there is no listener).
//! * Comparisons are unsigned 64-bit, done as two 32-bit halves.
//! * Syscall names: a name in the native table is used; a name that is a
//!   syscall only on another architecture is skipped (as Docker does); a
//!   name that is a syscall nowhere is an error (a typo).
//! * Extension `"nanoclaw": {"syscallsBeyondTable": {action, errnoRet}}`:
//!   the action for numbers above the highest syscall in our table, so
//!   syscalls added to future kernels are refused until reviewed.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde_json::{Map, Value};

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

// seccomp return values (linux/seccomp.h).
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const EPERM: u16 = 1;
const ENOSYS: u16 = 38;
const MAX_ERRNO: u64 = 4095;
/// The kernel refuses classic BPF programs longer than this (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

/// Filter flags a Docker profile may ask for (linux/seccomp.h values).
pub const FLAG_TSYNC: u32 = 1;
/// `SECCOMP_FILTER_FLAG_LOG`.
pub const FLAG_LOG: u32 = 2;
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`.
pub const FLAG_SPEC_ALLOW: u32 = 4;

/// One classic BPF instruction, laid out like `struct sock_filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

/// A syscall ABI the compiler can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64 (the x32 and ia32 ABIs are refused by the program).
    X86_64,
    /// aarch64 (the aarch32 compat ABI is refused by the program).
    Aarch64,
}

const X86_64_TABLE: &str = include_str!("syscalls_x86_64.tsv");
const AARCH64_TABLE: &str = include_str!("syscalls_aarch64.tsv");
const OTHER_NAMES: &str = include_str!("syscall_names_other_arches.txt");

impl Arch {
    /// The architecture named by Cargo's `target_arch`, if supported.
    pub fn from_target_arch(name: &str) -> Option<Arch> {
        match name {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// `AUDIT_ARCH_*` as seen in `seccomp_data.arch`.
    pub fn audit_arch(self) -> u32 {
        match self {
            Arch::X86_64 => 0xc000_003e,
            Arch::Aarch64 => 0xc000_00b7,
        }
    }

    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The name Docker profiles use in `includes.arches` (Go's GOARCH).
    pub fn docker_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    fn table_text(self) -> &'static str {
        match self {
            Arch::X86_64 => X86_64_TABLE,
            Arch::Aarch64 => AARCH64_TABLE,
        }
    }

    /// Every (name, number) of this architecture's syscall table.
    pub fn syscalls(self) -> impl Iterator<Item = (&'static str, u32)> {
        self.table_text().lines().filter_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (name, nr) = line.split_once('\t')?;
            Some((name, nr.trim().parse().ok()?))
        })
    }

    /// The number of `name` on this architecture.
    pub fn syscall_nr(self, name: &str) -> Option<u32> {
        self.syscalls().find(|(n, _)| *n == name).map(|(_, nr)| nr)
    }

    /// The highest syscall number in the table.
    pub fn max_nr(self) -> u32 {
        self.syscalls().map(|(_, nr)| nr).max().unwrap_or(0)
    }
}

/// True if `name` is a syscall on some Linux architecture we know of.
fn known_anywhere(name: &str) -> bool {
    Arch::X86_64.syscall_nr(name).is_some()
        || Arch::Aarch64.syscall_nr(name).is_some()
        || OTHER_NAMES
            .lines()
            .any(|l| !l.starts_with('#') && l == name)
}

/// What the program answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Run the syscall.
    Allow,
    /// Fail it with this errno.
    Errno(u16),
    /// Kill the calling thread.
    KillThread,
    /// Kill the whole process.
    KillProcess,
    /// Send SIGSYS.
    Trap,
    /// Run it and log it.
    Log,
}

impl Action {
    /// The `SECCOMP_RET_*` value.
    pub fn ret(self) -> u32 {
        match self {
            Action::Allow => RET_ALLOW,
            Action::Errno(e) => RET_ERRNO | u32::from(e),
            Action::KillThread => RET_KILL_THREAD,
            Action::KillProcess => RET_KILL_PROCESS,
            Action::Trap => RET_TRAP,
            Action::Log => RET_LOG,
        }
    }
}

/// A comparison operator of Docker's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `arg == value`
    Eq,
    /// `arg != value`
    Ne,
    /// `arg < value`
    Lt,
    /// `arg <= value`
    Le,
    /// `arg > value`
    Gt,
    /// `arg >= value`
    Ge,
    /// `arg & value == valueTwo`
    MaskedEq,
}

/// One argument comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cmp {
    /// Argument index, 0..=5.
    pub index: u8,
    /// Operator.
    pub op: Op,
    /// `value` (the mask for `MaskedEq`).
    pub value: u64,
    /// `valueTwo` (only used by `MaskedEq`).
    pub value_two: u64,
}

/// Comparisons (all must hold) and the action they lead to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// ANDed comparisons; empty means unconditional.
    pub cmps: Vec<Cmp>,
    /// What to answer when they hold.
    pub action: Action,
}

/// A profile resolved for one architecture, capability set and kernel.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Target architecture.
    pub arch: Arch,
    /// Action when no rule matches.
    pub default_action: Action,
    /// Action for numbers above the table (nanoclaw extension).
    pub beyond_table: Option<Action>,
    /// Rules per syscall number, in profile order.
    pub rules: BTreeMap<u32, Vec<Rule>>,
    /// `SECCOMP_FILTER_FLAG_*` bits asked for by `flags`.
    pub flags: u32,
}

/// A profile error: the JSON path of the offending field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileError {
    /// Path such as `syscalls[3].names[1]`; empty for the whole document.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ProfileError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ProfileError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// What a profile's conditions are evaluated against.
#[derive(Clone, Debug)]
pub struct Context {
    /// Target architecture.
    pub arch: Arch,
    /// Capabilities the sandbox holds, as `CAP_*` names in upper case.
    pub caps: Vec<String>,
    /// Running kernel (major, minor, patch); `None` at build time.
    pub kernel: Option<(u32, u32, u32)>,
}

const ACTIONS: &str = "SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, SCMP_ACT_KILL_PROCESS, \
SCMP_ACT_KILL_THREAD, SCMP_ACT_TRAP, SCMP_ACT_LOG, SCMP_ACT_TRACE";
const OPS: &str = "SCMP_CMP_EQ, SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_GT, \
SCMP_CMP_GE, SCMP_CMP_MASKED_EQ";

const SCMP_ARCHES: &[&str] = &[
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH",
    "SCMP_ARCH_SHEB",
];

const DOCKER_ARCHES: &[&str] = &[
    "386",
    "x86",
    "amd64",
    "x32",
    "arm",
    "arm64",
    "mips",
    "mipsle",
    "mipsel",
    "mips64",
    "mips64le",
    "mips64n32",
    "mipsel64",
    "mipsel64n32",
    "mips3l64n32",
    "ppc",
    "ppc64",
    "ppc64le",
    "s390",
    "s390x",
    "parisc",
    "parisc64",
    "riscv64",
    "loong64",
];

/// Every capability name the kernel defines (linux/capability.h).
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `chown` or `cap_chown` or `CAP_CHOWN` → `CAP_CHOWN`.
pub fn normalize_cap(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

fn check_keys(obj: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), ProfileError> {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            return Err(ProfileError::new(
                field,
                format!(
                    "unknown field \"{key}\"; expected one of: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn as_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, ProfileError> {
    v.as_str()
        .ok_or_else(|| ProfileError::new(path, format!("expected a string, found {}", kind(v))))
}

fn as_u64(v: &Value, path: &str) -> Result<u64, ProfileError> {
    v.as_u64().ok_or_else(|| {
        ProfileError::new(
            path,
            format!("expected a non-negative integer, found {}", kind(v)),
        )
    })
}

fn as_array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, ProfileError> {
    v.as_array()
        .ok_or_else(|| ProfileError::new(path, format!("expected an array, found {}", kind(v))))
}

fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ProfileError> {
    v.as_object()
        .ok_or_else(|| ProfileError::new(path, format!("expected an object, found {}", kind(v))))
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn strings<'a>(v: &'a Value, path: &str) -> Result<Vec<&'a str>, ProfileError> {
    as_array(v, path)?
        .iter()
        .enumerate()
        .map(|(i, s)| as_str(s, &format!("{path}[{i}]")))
        .collect()
}

fn parse_errno(v: Option<&Value>, path: &str) -> Result<Option<u16>, ProfileError> {
    match v {
        None => Ok(None),
        Some(v) => {
            let n = as_u64(v, path)?;
            if n > MAX_ERRNO {
                return Err(ProfileError::new(
                    path,
                    format!("errno {n} is out of range; use a value from 0 to {MAX_ERRNO}"),
                ));
            }
            Ok(Some(n as u16))
        }
    }
}

fn parse_action(
    v: Option<&Value>,
    path: &str,
    errno: Option<u16>,
    errno_path: &str,
) -> Result<Action, ProfileError> {
    let v = v.ok_or_else(|| ProfileError::new(path, "missing; it is required"))?;
    let name = as_str(v, path)?;
    let action = match name {
        "SCMP_ACT_ALLOW" => Action::Allow,
        "SCMP_ACT_ERRNO" => Action::Errno(errno.unwrap_or(EPERM)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
        "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
        "SCMP_ACT_TRAP" => Action::Trap,
        "SCMP_ACT_LOG" => Action::Log,
        "SCMP_ACT_TRACE" => Action::Errno(ENOSYS),
        "SCMP_ACT_NOTIFY" => {
            return Err(ProfileError::new(
                path,
                "SCMP_ACT_NOTIFY needs a seccomp agent, which nanoclaw does not run; \
                 use SCMP_ACT_ERRNO or SCMP_ACT_LOG",
            ))
        }
        other => {
            return Err(ProfileError::new(
                path,
                format!("unknown action \"{other}\"; expected one of: {ACTIONS}"),
            ))
        }
    };
    if errno.is_some() && !matches!(name, "SCMP_ACT_ERRNO" | "SCMP_ACT_TRACE") {
        return Err(ProfileError::new(
            errno_path,
            format!("only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not {name}; remove it"),
        ));
    }
    Ok(action)
}

fn parse_kernel_version(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Parses a kernel release such as `6.18.44-fc-v669` into (major, minor, patch).
pub fn parse_kernel_release(s: &str) -> Option<(u32, u32, u32)> {
    parse_kernel_version(s)
}

struct Conditions<'a> {
    caps: Vec<&'a str>,
    arches: Vec<&'a str>,
    min_kernel: Option<(u32, u32, u32)>,
}

fn parse_conditions<'a>(
    v: Option<&'a Value>,
    path: &str,
    ctx: &Context,
) -> Result<Conditions<'a>, ProfileError> {
    let mut c = Conditions {
        caps: Vec::new(),
        arches: Vec::new(),
        min_kernel: None,
    };
    let Some(v) = v else { return Ok(c) };
    let obj = as_object(v, path)?;
    check_keys(obj, path, &["caps", "arches", "minKernel"])?;
    if let Some(caps) = obj.get("caps") {
        let p = join(path, "caps");
        for (i, cap) in strings(caps, &p)?.into_iter().enumerate() {
            if !CAPABILITIES.contains(&cap) {
                return Err(ProfileError::new(
                    format!("{p}[{i}]"),
                    format!("unknown capability \"{cap}\"; write it like CAP_SYS_ADMIN"),
                ));
            }
            c.caps.push(cap);
        }
        if !c.caps.is_empty() && ctx.kernel.is_none() {
            return Err(ProfileError::new(
                p,
                "the built-in profile is compiled at build time and cannot depend on capabilities",
            ));
        }
    }
    if let Some(arches) = obj.get("arches") {
        let p = join(path, "arches");
        for (i, a) in strings(arches, &p)?.into_iter().enumerate() {
            if !DOCKER_ARCHES.contains(&a) {
                return Err(ProfileError::new(
                    format!("{p}[{i}]"),
                    format!(
                        "unknown architecture \"{a}\"; expected one of: {}",
                        DOCKER_ARCHES.join(", ")
                    ),
                ));
            }
            c.arches.push(a);
        }
    }
    if let Some(k) = obj.get("minKernel") {
        let p = join(path, "minKernel");
        let s = as_str(k, &p)?;
        let parsed = parse_kernel_version(s).filter(|_| {
            s.chars().next().is_some_and(|ch| ch.is_ascii_digit())
                && s.chars().all(|ch| ch.is_ascii_digit() || ch == '.')
        });
        let Some(version) = parsed else {
            return Err(ProfileError::new(
                p,
                format!("\"{s}\" is not a kernel version; write it like \"4.8\" or \"5.10.1\""),
            ));
        };
        if ctx.kernel.is_none() {
            return Err(ProfileError::new(
                p,
                "the built-in profile is compiled at build time and cannot depend on the kernel version",
            ));
        }
        c.min_kernel = Some(version);
    }
    Ok(c)
}

/// Docker's rule: every `includes` condition must hold and no `excludes` one.
fn applies(inc: &Conditions<'_>, exc: &Conditions<'_>, ctx: &Context) -> bool {
    let arch = ctx.arch.docker_name();
    let has_cap = |c: &&str| ctx.caps.iter().any(|have| have == c);
    let kernel_ge = |v: (u32, u32, u32)| ctx.kernel.is_some_and(|k| k >= v);
    if exc.arches.contains(&arch) || exc.caps.iter().any(has_cap) {
        return false;
    }
    if exc.min_kernel.is_some_and(kernel_ge) {
        return false;
    }
    if !inc.arches.is_empty() && !inc.arches.contains(&arch) {
        return false;
    }
    if !inc.caps.iter().all(has_cap) {
        return false;
    }
    if let Some(v) = inc.min_kernel {
        if !kernel_ge(v) {
            return false;
        }
    }
    true
}

fn parse_arg(v: &Value, path: &str) -> Result<Cmp, ProfileError> {
    let obj = as_object(v, path)?;
    check_keys(obj, path, &["index", "value", "valueTwo", "op"])?;
    let ip = join(path, "index");
    let index = as_u64(
        obj.get("index")
            .ok_or_else(|| ProfileError::new(&ip, "missing; it is required"))?,
        &ip,
    )?;
    if index > 5 {
        return Err(ProfileError::new(
            ip,
            format!("argument index {index} is out of range; syscalls have arguments 0 to 5"),
        ));
    }
    let value = match obj.get("value") {
        Some(v) => as_u64(v, &join(path, "value"))?,
        None => 0,
    };
    let value_two = match obj.get("valueTwo") {
        Some(v) => as_u64(v, &join(path, "valueTwo"))?,
        None => 0,
    };
    let op_path = join(path, "op");
    let op_name = as_str(
        obj.get("op")
            .ok_or_else(|| ProfileError::new(&op_path, "missing; it is required"))?,
        &op_path,
    )?;
    let op = match op_name {
        "SCMP_CMP_EQ" => Op::Eq,
        "SCMP_CMP_NE" => Op::Ne,
        "SCMP_CMP_LT" => Op::Lt,
        "SCMP_CMP_LE" => Op::Le,
        "SCMP_CMP_GT" => Op::Gt,
        "SCMP_CMP_GE" => Op::Ge,
        "SCMP_CMP_MASKED_EQ" => Op::MaskedEq,
        other => {
            return Err(ProfileError::new(
                op_path,
                format!("unknown operator \"{other}\"; expected one of: {OPS}"),
            ))
        }
    };
    Ok(Cmp {
        index: index as u8,
        op,
        value,
        value_two,
    })
}

/// Parses and resolves a Docker-format profile for `ctx`.
pub fn parse_profile(text: &str, ctx: &Context) -> Result<Resolved, ProfileError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| ProfileError::new("", format!("not valid JSON: {e}")))?;
    let top = as_object(&doc, "")?;
    check_keys(
        top,
        "",
        &[
            "defaultAction",
            "defaultErrnoRet",
            "architectures",
            "archMap",
            "syscalls",
            "flags",
            "listenerPath",
            "listenerMetadata",
            "comment",
            "nanoclaw",
        ],
    )?;
    let default_errno = parse_errno(top.get("defaultErrnoRet"), "defaultErrnoRet")?;
    let default_action = parse_action(
        top.get("defaultAction"),
        "defaultAction",
        default_errno,
        "defaultErrnoRet",
    )?;

    let has_archs = match top.get("architectures") {
        Some(v) => {
            let list = strings(v, "architectures")?;
            for (i, a) in list.iter().enumerate() {
                check_scmp_arch(a, &format!("architectures[{i}]"))?;
            }
            !list.is_empty()
        }
        None => false,
    };
    if let Some(v) = top.get("archMap") {
        let list = as_array(v, "archMap")?;
        if has_archs && !list.is_empty() {
            return Err(ProfileError::new(
                "archMap",
                "'architectures' and 'archMap' are both set; use one of them",
            ));
        }
        for (i, entry) in list.iter().enumerate() {
            let p = format!("archMap[{i}]");
            let obj = as_object(entry, &p)?;
            check_keys(obj, &p, &["architecture", "subArchitectures", "comment"])?;
            let ap = join(&p, "architecture");
            let a = obj
                .get("architecture")
                .ok_or_else(|| ProfileError::new(&ap, "missing; it is required"))?;
            check_scmp_arch(as_str(a, &ap)?, &ap)?;
            match obj.get("subArchitectures") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let sp = join(&p, "subArchitectures");
                    for (j, s) in strings(v, &sp)?.iter().enumerate() {
                        check_scmp_arch(s, &format!("{sp}[{j}]"))?;
                    }
                }
            }
        }
    }

    let mut flags = 0;
    if let Some(v) = top.get("flags") {
        for (i, f) in strings(v, "flags")?.iter().enumerate() {
            flags |= match *f {
                "SECCOMP_FILTER_FLAG_TSYNC" => FLAG_TSYNC,
                "SECCOMP_FILTER_FLAG_LOG" => FLAG_LOG,
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => FLAG_SPEC_ALLOW,
                other => {
                    return Err(ProfileError::new(
                        format!("flags[{i}]"),
                        format!(
                            "unsupported flag \"{other}\"; nanoclaw supports \
                             SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_LOG and \
                             SECCOMP_FILTER_FLAG_SPEC_ALLOW"
                        ),
                    ))
                }
            };
        }
    }
    if let Some(v) = top.get("listenerPath") {
        if !as_str(v, "listenerPath")?.is_empty() {
            return Err(ProfileError::new(
                "listenerPath",
                "seccomp agents (SCMP_ACT_NOTIFY) are not supported by nanoclaw; remove it",
            ));
        }
    }

    let mut beyond_table = None;
    if let Some(v) = top.get("nanoclaw") {
        let obj = as_object(v, "nanoclaw")?;
        check_keys(obj, "nanoclaw", &["syscallsBeyondTable", "comment"])?;
        if let Some(b) = obj.get("syscallsBeyondTable") {
            let p = "nanoclaw.syscallsBeyondTable";
            let bo = as_object(b, p)?;
            check_keys(bo, p, &["action", "errnoRet", "comment"])?;
            let ep = format!("{p}.errnoRet");
            let errno = parse_errno(bo.get("errnoRet"), &ep)?;
            beyond_table = Some(parse_action(
                bo.get("action"),
                &format!("{p}.action"),
                errno,
                &ep,
            )?);
        }
    }

    let mut rules: BTreeMap<u32, Vec<Rule>> = BTreeMap::new();
    if let Some(v) = top.get("syscalls") {
        for (i, entry) in as_array(v, "syscalls")?.iter().enumerate() {
            let p = format!("syscalls[{i}]");
            let obj = as_object(entry, &p)?;
            check_keys(
                obj,
                &p,
                &[
                    "names", "name", "action", "errnoRet", "args", "includes", "excludes",
                    "comment",
                ],
            )?;
            // Names first: a typo is an error even in a rule that does not apply here.
            let names: Vec<(String, &str)> = match (obj.get("names"), obj.get("name")) {
                (Some(_), Some(_)) => {
                    return Err(ProfileError::new(
                        p,
                        "both 'name' and 'names' are set; use one of them",
                    ))
                }
                (Some(n), None) => {
                    let np = join(&p, "names");
                    let list = strings(n, &np)?;
                    if list.is_empty() {
                        return Err(ProfileError::new(np, "empty; list at least one syscall"));
                    }
                    list.into_iter()
                        .enumerate()
                        .map(|(j, s)| (format!("{np}[{j}]"), s))
                        .collect()
                }
                (None, Some(n)) => {
                    let np = join(&p, "name");
                    vec![(np.clone(), as_str(n, &np)?)]
                }
                (None, None) => {
                    return Err(ProfileError::new(
                        p,
                        "no syscall given; set 'names' (a list) or 'name'",
                    ))
                }
            };
            let mut nrs = Vec::new();
            for (np, name) in &names {
                match ctx.arch.syscall_nr(name) {
                    Some(nr) => nrs.push(nr),
                    None if known_anywhere(name) => {} // another architecture's syscall
                    None => {
                        return Err(ProfileError::new(
                            np.clone(),
                            format!(
                                "unknown syscall \"{name}\" for {}: it is not a syscall on any \
                                 Linux architecture; check the spelling",
                                ctx.arch.name()
                            ),
                        ))
                    }
                }
            }
            let ep = join(&p, "errnoRet");
            let errno = parse_errno(obj.get("errnoRet"), &ep)?;
            let action = parse_action(obj.get("action"), &join(&p, "action"), errno, &ep)?;
            let mut cmps = Vec::new();
            if let Some(args) = obj.get("args") {
                if !args.is_null() {
                    let ap = join(&p, "args");
                    for (j, a) in as_array(args, &ap)?.iter().enumerate() {
                        cmps.push(parse_arg(a, &format!("{ap}[{j}]"))?);
                    }
                }
            }
            let inc = parse_conditions(obj.get("includes"), &join(&p, "includes"), ctx)?;
            let exc = parse_conditions(obj.get("excludes"), &join(&p, "excludes"), ctx)?;
            if !applies(&inc, &exc, ctx) {
                continue;
            }
            let mut seen = HashSet::new();
            for nr in nrs {
                if seen.insert(nr) {
                    rules.entry(nr).or_default().push(Rule {
                        cmps: cmps.clone(),
                        action,
                    });
                }
            }
        }
    }

    Ok(Resolved {
        arch: ctx.arch,
        default_action,
        beyond_table,
        rules,
        flags,
    })
}

fn check_scmp_arch(a: &str, path: &str) -> Result<(), ProfileError> {
    if SCMP_ARCHES.contains(&a) {
        Ok(())
    } else {
        Err(ProfileError::new(
            path,
            format!("unknown architecture \"{a}\"; expected a name like SCMP_ARCH_X86_64"),
        ))
    }
}

// ---------------------------------------------------------------------------
// The assembler: instructions with symbolic jump targets, resolved at the end.

#[derive(Clone, Copy)]
enum Target {
    Next,
    Label(usize),
}

enum Item {
    Label(usize),
    Stmt(u16, u32),
    Jump(u16, u32, Target, Target),
    Ja(usize),
}

struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }
    fn place(&mut self, l: usize) {
        self.items.push(Item::Label(l));
    }
    fn ld(&mut self, off: u32) {
        self.items.push(Item::Stmt(BPF_LD_W_ABS, off));
    }
    fn and(&mut self, k: u32) {
        self.items.push(Item::Stmt(BPF_ALU_AND_K, k));
    }
    fn ret(&mut self, a: Action) {
        self.items.push(Item::Stmt(BPF_RET_K, a.ret()));
    }
    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        self.items.push(Item::Jump(code, k, jt, jf));
    }
    fn ja(&mut self, l: usize) {
        self.items.push(Item::Ja(l));
    }

    fn finish(self) -> Result<Vec<Insn>, ProfileError> {
        let mut pos = vec![usize::MAX; self.labels];
        let mut n = 0;
        for item in &self.items {
            match item {
                Item::Label(l) => pos[*l] = n,
                _ => n += 1,
            }
        }
        if n > MAX_INSNS {
            return Err(ProfileError::new(
                "",
                format!(
                    "the compiled filter has {n} instructions, more than the kernel's limit of \
                     {MAX_INSNS}; merge rules or use fewer argument conditions"
                ),
            ));
        }
        let mut out = Vec::with_capacity(n);
        let offset = |at: usize, t: Target| -> Result<u32, ProfileError> {
            match t {
                Target::Next => Ok(0),
                Target::Label(l) => {
                    let to = pos[l];
                    if to == usize::MAX || to <= at {
                        return Err(ProfileError::new("", "internal error: backward jump"));
                    }
                    Ok((to - at - 1) as u32)
                }
            }
        };
        for item in &self.items {
            let at = out.len();
            match *item {
                Item::Label(_) => {}
                Item::Stmt(code, k) => out.push(Insn {
                    code,
                    jt: 0,
                    jf: 0,
                    k,
                }),
                Item::Ja(l) => out.push(Insn {
                    code: BPF_JMP_JA,
                    jt: 0,
                    jf: 0,
                    k: offset(at, Target::Label(l))?,
                }),
                Item::Jump(code, k, jt, jf) => {
                    let (t, f) = (offset(at, jt)?, offset(at, jf)?);
                    if t > 255 || f > 255 {
                        return Err(ProfileError::new(
                            "",
                            "a rule has too many argument conditions (a conditional jump \
                             would exceed 255 instructions)",
                        ));
                    }
                    out.push(Insn {
                        code,
                        jt: t as u8,
                        jf: f as u8,
                        k,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn emit_cmp(asm: &mut Asm, c: &Cmp, fail: usize) {
    // Little-endian ABIs only (x86_64, aarch64): low word first.
    let lo = OFF_ARGS + 8 * u32::from(c.index);
    let hi = lo + 4;
    let (vhi, vlo) = ((c.value >> 32) as u32, c.value as u32);
    let pass = asm.label();
    let f = Target::Label(fail);
    let p = Target::Label(pass);
    let n = Target::Next;
    match c.op {
        Op::Eq => {
            asm.ld(hi);
            asm.jump(BPF_JMP_JEQ_K, vhi, n, f);
            asm.ld(lo);
            asm.jump(BPF_JMP_JEQ_K, vlo, n, f);
        }
        Op::Ne => {
            asm.ld(hi);
            asm.jump(BPF_JMP_JEQ_K, vhi, n, p);
            asm.ld(lo);
            asm.jump(BPF_JMP_JEQ_K, vlo, f, n);
        }
        Op::Gt | Op::Ge => {
            // hi > vhi → pass; hi < vhi → fail; equal → compare low words.
            asm.ld(hi);
            asm.jump(BPF_JMP_JGT_K, vhi, p, n);
            asm.jump(BPF_JMP_JEQ_K, vhi, n, f);
            asm.ld(lo);
            let code = if c.op == Op::Gt {
                BPF_JMP_JGT_K
            } else {
                BPF_JMP_JGE_K
            };
            asm.jump(code, vlo, n, f);
        }
        Op::Lt | Op::Le => {
            // a < v is !(a >= v); a <= v is !(a > v).
            asm.ld(hi);
            asm.jump(BPF_JMP_JGT_K, vhi, f, n);
            asm.jump(BPF_JMP_JEQ_K, vhi, n, p);
            asm.ld(lo);
            let code = if c.op == Op::Lt {
                BPF_JMP_JGE_K
            } else {
                BPF_JMP_JGT_K
            };
            asm.jump(code, vlo, f, n);
        }
        Op::MaskedEq => {
            let (mhi, mlo) = vhi_vlo(c.value);
            let (ehi, elo) = vhi_vlo(c.value_two);
            if mhi != 0 || ehi != 0 {
                asm.ld(hi);
                asm.and(mhi);
                asm.jump(BPF_JMP_JEQ_K, ehi, n, f);
            }
            asm.ld(lo);
            asm.and(mlo);
            asm.jump(BPF_JMP_JEQ_K, elo, n, f);
        }
    }
    asm.place(pass);
}

fn vhi_vlo(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// Where a range of syscall numbers goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dest {
    Ret(Action),
    Block(usize),
}

/// Compiles a resolved profile to a BPF program.
///
/// Layout: arch check, x32 check (x86_64), a binary search over ranges of
/// syscall numbers (two instructions per node, so every conditional jump is
/// short), then one block per distinct rule list.
pub fn compile(r: &Resolved) -> Result<Vec<Insn>, ProfileError> {
    let mut asm = Asm {
        items: Vec::new(),
        labels: 0,
    };
    let kill = Action::KillProcess;
    let dispatch = asm.label();
    let bad = asm.label();

    asm.ld(OFF_ARCH);
    asm.jump(
        BPF_JMP_JEQ_K,
        r.arch.audit_arch(),
        Target::Next,
        Target::Label(bad),
    );
    asm.ld(OFF_NR);
    if r.arch == Arch::X86_64 {
        asm.jump(
            BPF_JMP_JGE_K,
            X32_SYSCALL_BIT,
            Target::Next,
            Target::Label(dispatch),
        );
        asm.jump(
            BPF_JMP_JEQ_K,
            u32::MAX,
            Target::Label(dispatch),
            Target::Label(bad),
        );
    } else {
        asm.ja(dispatch);
    }
    asm.place(bad);
    asm.ret(kill);
    asm.place(dispatch);

    // Distinct rule lists become blocks; trivial ones become plain returns.
    let mut blocks: Vec<&[Rule]> = Vec::new();
    // Ranges [start, next start) → destination, covering 0..=u32::MAX.
    let default = Dest::Ret(r.default_action);
    let mut ranges: Vec<(u32, Dest)> = vec![(0, default)];
    let push = |start: u32, d: Dest, ranges: &mut Vec<(u32, Dest)>| {
        if let Some(last) = ranges.last_mut() {
            if last.0 == start {
                last.1 = d;
                // May now equal the one before it.
                let n = ranges.len();
                if n >= 2 && ranges[n - 2].1 == d {
                    ranges.pop();
                }
                return;
            }
            if last.1 == d {
                return;
            }
        }
        ranges.push((start, d));
    };
    let max_nr = r.arch.max_nr();
    for (&nr, rules) in &r.rules {
        let d = dest_of(rules, &mut blocks).unwrap_or(default);
        push(nr, d, &mut ranges);
        if nr < u32::MAX {
            push(nr + 1, default, &mut ranges);
        }
    }
    if let Some(b) = r.beyond_table {
        if let Some(&last) = r.rules.keys().next_back() {
            if last > max_nr {
                return Err(ProfileError::new("", "internal error: rule beyond table"));
            }
        }
        push(max_nr + 1, Dest::Ret(b), &mut ranges);
    }

    let block_labels: Vec<usize> = (0..blocks.len()).map(|_| asm.label()).collect();
    emit_search(&mut asm, &ranges, &block_labels);

    for (rules, &label) in blocks.iter().zip(&block_labels) {
        asm.place(label);
        for rule in rules.iter() {
            let next = asm.label();
            for c in &rule.cmps {
                emit_cmp(&mut asm, c, next);
            }
            asm.ret(rule.action);
            asm.place(next);
        }
        if rules.last().is_some_and(|r| !r.cmps.is_empty()) {
            asm.ret(r.default_action);
        }
    }
    asm.finish()
}

fn dest_of<'a>(rules: &'a [Rule], blocks: &mut Vec<&'a [Rule]>) -> Option<Dest> {
    let rules = match rules.iter().position(|r| r.cmps.is_empty()) {
        Some(i) => &rules[..=i], // rules after an unconditional one are unreachable
        None => rules,
    };
    match rules {
        [] => None,
        [only] if only.cmps.is_empty() => Some(Dest::Ret(only.action)),
        _ => {
            let idx = match blocks.iter().position(|b| *b == rules) {
                Some(i) => i,
                None => {
                    blocks.push(rules);
                    blocks.len() - 1
                }
            };
            Some(Dest::Block(idx))
        }
    }
}

fn emit_search(asm: &mut Asm, ranges: &[(u32, Dest)], blocks: &[usize]) {
    if ranges.len() == 1 {
        match ranges[0].1 {
            Dest::Ret(a) => asm.ret(a),
            Dest::Block(i) => asm.ja(blocks[i]),
        }
        return;
    }
    let mid = ranges.len() / 2;
    let left = asm.label();
    let right = asm.label();
    // nr >= start of the upper half → the jump to the right half; else skip it.
    asm.jump(
        BPF_JMP_JGE_K,
        ranges[mid].0,
        Target::Next,
        Target::Label(left),
    );
    asm.ja(right);
    asm.place(left);
    emit_search(asm, &ranges[..mid], blocks);
    asm.place(right);
    emit_search(asm, &ranges[mid..], blocks);
}

/// Runs a program the way the kernel would, for tests and tooling.
/// `data` is `struct seccomp_data` as (nr, arch, args).
pub fn run(prog: &[Insn], nr: u32, arch: u32, args: [u64; 6]) -> Option<u32> {
    let word = |off: u32| -> Option<u32> {
        match off {
            OFF_NR => Some(nr),
            OFF_ARCH => Some(arch),
            o if (OFF_ARGS..OFF_ARGS + 48).contains(&o) => {
                let rel = o - OFF_ARGS;
                let v = args[(rel / 8) as usize];
                match rel % 8 {
                    0 => Some(v as u32),
                    4 => Some((v >> 32) as u32),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let (mut a, mut pc) = (0u32, 0usize);
    while let Some(i) = prog.get(pc) {
        pc += 1;
        match i.code {
            BPF_LD_W_ABS => a = word(i.k)?,
            BPF_ALU_AND_K => a &= i.k,
            BPF_JMP_JA => pc += i.k as usize,
            BPF_JMP_JEQ_K | BPF_JMP_JGT_K | BPF_JMP_JGE_K => {
                let t = match i.code {
                    BPF_JMP_JEQ_K => a == i.k,
                    BPF_JMP_JGT_K => a > i.k,
                    _ => a >= i.k,
                };
                pc += usize::from(if t { i.jt } else { i.jf });
            }
            BPF_RET_K => return Some(i.k),
            _ => return None,
        }
    }
    None
}
