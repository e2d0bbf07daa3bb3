//! nanoclaw's micro-VM backend (`--backend microvm`): each sandbox is a
//! small virtual machine with its own kernel, and inside it the command
//! still runs in nanoclaw's native sandbox — two walls (seed 001: "even if
//! an agent somehow broke out of its container, it hits the VM wall").
//!
//! * The VM: QEMU's `microvm` machine ([`vmm::Qemu`], behind the [`vmm::Vmm`]
//!   trait so Cloud Hypervisor or Firecracker can be added), Debian's cloud
//!   kernel, pinned and checked by hash ([`kernel`]), and an initramfs built
//!   at boot ([`initramfs`]) whose `/init` is nanoclaw's own (static)
//!   binary: the guest agent ([`guest`]).
//! * Inside: the agent mounts the host's `/usr` (shared read-only with
//!   virtiofs; the guest's `/bin`, `/lib*` point into it) and creates the
//!   sandbox with the native engine (a keeper in the guest), so the
//!   command sees the same host root, seccomp, Landlock, cgroups and
//!   namespaces as `--backend native`, under a kernel of its own.
//! * Host ↔ guest: a framed, binary-safe protocol ([`proto`]) on a
//!   virtio-serial port, which QEMU connects to a Unix socket the host
//!   listens on. `--mount` directories are shared with virtiofs too (one
//!   `virtiofsd` each, read-only ones through a read-only bind mount). The
//!   guest has no network device; egress policies are refused by name.
//! * Acceleration: KVM where `/dev/kvm` boots a standard kernel, else
//!   software emulation (TCG) with a warning ([`AccelChoice`]).
//! * Nothing left behind: the VM's processes die with the process that
//!   made them, the guest powers off when its control channel closes, and
//!   what a killed nanoclaw left is swept by the next one ([`procs`]).

#![warn(missing_docs)]

pub mod guest;
pub mod holder;
mod host;
pub mod initramfs;
pub mod kernel;
pub mod procs;
pub mod proto;
pub mod vmm;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nanoclaw_sandbox::backend::{
    label, Backend, Capabilities, LiveSandbox, SandboxConfig, SandboxInfo, LABEL_DETACHED,
};
use nanoclaw_sandbox::Error;
use serde::{Deserialize, Serialize};

use vmm::{Accel, Qemu, Vmm};

/// The backend's name.
pub const NAME: &str = "microvm";

/// Guest memory when the sandbox sets no memory limit, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Guest memory beyond the sandbox's memory limit (the guest kernel, the
/// agent, the keeper), MiB.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// How long a KVM boot may take before KVM is taken as unusable here.
pub const KVM_PROBE: Duration = Duration::from_secs(5);
/// How long a TCG boot may take (seconds on a loaded machine).
pub const TCG_BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Which accelerator to use (`$NANOCLAW_MICROVM_ACCEL`: `auto`, `kvm`,
/// `tcg`).
///
/// `auto` uses KVM when `/dev/kvm` is there and a first boot with it
/// reaches the guest agent within [`KVM_PROBE`]; the answer is kept for
/// this host boot (in the state root's `kvm-probe`). Some hosts offer a
/// `/dev/kvm` that boots only special guest kernels (a `kvm_pvm`
/// hypervisor boots only PVM kernels, and a standard kernel hangs): there
/// the probe fails once and every VM falls back to TCG, with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Probe KVM, fall back to TCG.
    Auto,
    /// KVM (an operator says `/dev/kvm` boots standard kernels).
    Kvm,
    /// Software emulation.
    Tcg,
}

impl AccelChoice {
    /// From `$NANOCLAW_MICROVM_ACCEL` (default `auto`).
    pub fn from_env() -> Result<AccelChoice, Error> {
        match std::env::var("NANOCLAW_MICROVM_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(AccelChoice::Auto),
            Ok("kvm") => Ok(AccelChoice::Kvm),
            Ok("tcg") => Ok(AccelChoice::Tcg),
            Ok(other) => Err(Error::InvalidSpec(format!(
                "NANOCLAW_MICROVM_ACCEL={other:?}: use auto, kvm or tcg"
            ))),
        }
    }
}

/// How the backend runs its VMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicroVmOptions {
    /// nanoclaw's binary: the guest agent (it must be statically linked).
    pub exe: PathBuf,
    /// The kernel's directory ([`kernel::default_dir`]).
    pub kernel_dir: PathBuf,
    /// Where each VM's state directory goes ([`default_state_root`]).
    pub state_root: PathBuf,
    /// The accelerator.
    pub accel: AccelChoice,
    /// Guest CPUs.
    pub cpus: u32,
    /// Every VM in a holder process of its own ([`holder`]), also those
    /// that are not detached (which then end with this process): for a
    /// multithreaded caller such as the daemon, which must not start
    /// QEMU from its own address space. Detached VMs always have one.
    #[serde(default)]
    pub holder: bool,
}

impl MicroVmOptions {
    /// The defaults for `exe` (accelerator from the environment).
    pub fn new(exe: impl Into<PathBuf>) -> Result<MicroVmOptions, Error> {
        Ok(MicroVmOptions {
            exe: exe.into(),
            kernel_dir: kernel::default_dir(),
            state_root: default_state_root(),
            accel: AccelChoice::from_env()?,
            cpus: 1,
            holder: false,
        })
    }
}

/// `/run/nanoclaw/microvm` (the backend needs root).
pub fn default_state_root() -> PathBuf {
    PathBuf::from("/run/nanoclaw/microvm")
}

/// A virtiofsd: QEMU's C one (Debian 12's `qemu-system-common` ships it in
/// `/usr/lib/qemu`) or the Rust one (`cargo install virtiofsd`, Debian 13's
/// package). Their options differ.
#[derive(Debug, Clone)]
pub struct Virtiofsd {
    /// Its binary.
    pub path: PathBuf,
    /// The Rust implementation (`--shared-dir`), else QEMU's (`-o source=`).
    pub rust: bool,
}

impl Virtiofsd {
    /// `$NANOCLAW_VIRTIOFSD`, else the first of `virtiofsd` on `PATH`,
    /// `~/.cargo/bin`, `/usr/libexec`, `/usr/lib/qemu`.
    pub fn find() -> Option<Virtiofsd> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("NANOCLAW_VIRTIOFSD").filter(|p| !p.is_empty()) {
            candidates.push(p.into());
        }
        for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            candidates.push(d.join("virtiofsd"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            candidates.push(Path::new(&h).join(".cargo/bin/virtiofsd"));
        }
        candidates.push("/usr/libexec/virtiofsd".into());
        candidates.push("/usr/lib/qemu/virtiofsd".into());
        let path = candidates.into_iter().find(|p| is_executable(p))?;
        let version = Command::new(&path).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&version.stdout).into_owned()
            + &String::from_utf8_lossy(&version.stderr);
        Some(Virtiofsd {
            rust: !text.contains("QEMU"),
            path,
        })
    }

    /// The command serving `dir` on the listening socket passed as fd 3.
    pub fn command(&self, dir: &Path, readonly: bool) -> Command {
        let mut c = Command::new(&self.path);
        c.arg("--fd=3");
        if self.rust {
            c.arg("--shared-dir").arg(dir);
            c.args(["--cache", "auto", "--sandbox", "namespace"]);
            if readonly {
                c.arg("--readonly");
            }
        } else {
            c.arg("-o").arg(format!("source={}", dir.display()));
            c.args([
                "-o",
                "cache=auto",
                "-o",
                "sandbox=namespace",
                "-o",
                "log_level=err",
            ]);
        }
        c
    }
}

/// Whether `p` is an executable file.
pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn unsupported(what: &str, why: impl Into<String>, fix: &str) -> Error {
    Error::Unsupported {
        what: what.into(),
        why: why.into(),
        fix: fix.into(),
    }
}

/// The micro-VM backend (see the crate's documentation).
#[derive(Debug, Clone)]
pub struct MicroVm {
    opts: MicroVmOptions,
    kernel: kernel::Kernel,
    vmm: Arc<dyn Vmm>,
    virtiofsd: Virtiofsd,
}

impl MicroVm {
    /// The backend with `opts`, if this host can run it: root, QEMU, a
    /// virtiofsd and the pinned kernel (each missing piece refused with
    /// what to install). Sweeps what VMs of earlier, killed processes left.
    pub fn new(opts: MicroVmOptions) -> Result<MicroVm, Error> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(unsupported(
                "--backend microvm",
                "it needs root on the host (virtiofsd serves the guest's /usr and mounts \
                 from a private mount namespace)",
                "run nanoclaw as root, or use --backend native",
            ));
        }
        let vmm = Qemu::find().ok_or_else(|| {
            unsupported(
                "--backend microvm",
                format!("no QEMU at {} (or $NANOCLAW_QEMU)", Qemu::DEFAULT),
                "apt-get install qemu-system-x86",
            )
        })?;
        let virtiofsd = Virtiofsd::find().ok_or_else(|| {
            unsupported(
                "--backend microvm",
                "no virtiofsd (on PATH, in ~/.cargo/bin, /usr/libexec or /usr/lib/qemu)",
                "cargo install virtiofsd, or apt-get install qemu-system-common",
            )
        })?;
        let kernel = kernel::locate(&opts.kernel_dir).map_err(|e| {
            unsupported(
                "--backend microvm",
                format!("the guest kernel: {e}"),
                "fetch the pinned kernel with .ci/microvm-kernel.sh (as root)",
            )
        })?;
        // The ELF header and program headers are at the start (the whole
        // binary is read at each boot, into the initramfs).
        let mut head = Vec::new();
        std::fs::File::open(&opts.exe)
            .and_then(|f| f.take(1 << 16).read_to_end(&mut head))
            .map_err(|source| Error::Sys {
                call: format!("reading the agent binary {}", opts.exe.display()),
                source,
            })?;
        if !is_static(&head) {
            return Err(unsupported(
                "--backend microvm",
                format!(
                    "{} is dynamically linked; the guest has no libraries of its own",
                    opts.exe.display()
                ),
                "build nanoclaw statically (the release build is)",
            ));
        }
        nanoclaw_sandbox::keeper::own_dir(&opts.state_root, 0).map_err(|e| Error::Backend {
            backend: NAME.into(),
            message: format!("its state root {}: {e}", opts.state_root.display()),
        })?;
        procs::sweep(&opts.state_root);
        Ok(MicroVm {
            opts,
            kernel,
            vmm: Arc::new(vmm),
            virtiofsd,
        })
    }

    /// What `nanoclaw doctor` says: the VMM, virtiofsd, kernel and
    /// accelerator this backend would use.
    pub fn describe(&self) -> String {
        let accel = match self.opts.accel {
            AccelChoice::Kvm => "kvm (operator's choice)".to_string(),
            AccelChoice::Tcg => "tcg (operator's choice; boots take seconds)".to_string(),
            AccelChoice::Auto => match self.cached_probe() {
                Some(true) => "kvm (a probe boot succeeded)".into(),
                Some(false) => "tcg: /dev/kvm did not boot a standard kernel here (probed)".into(),
                None if kvm_device() => "auto: kvm if a first boot works, else tcg".into(),
                None => "tcg: no usable /dev/kvm".into(),
            },
        };
        format!(
            "{} ({}), virtiofsd {}, kernel {} {} (pinned), accelerator {accel}",
            self.vmm.name(),
            self.vmm.binary().display(),
            self.virtiofsd.path.display(),
            kernel::PACKAGE,
            kernel::PACKAGE_VERSION,
        )
    }

    fn probe_file(&self) -> PathBuf {
        self.opts.state_root.join("kvm-probe")
    }

    /// This host boot's recorded probe: `Some(true)` KVM boots our kernel.
    fn cached_probe(&self) -> Option<bool> {
        let boot = boot_id()?;
        let text = std::fs::read_to_string(self.probe_file()).ok()?;
        let (id, result) = text.trim().split_once(' ')?;
        (id == boot).then(|| result == "kvm-works")
    }

    fn record_probe(&self, works: bool) {
        if let Some(boot) = boot_id() {
            let result = if works { "kvm-works" } else { "kvm-hangs" };
            let _ = std::fs::write(self.probe_file(), format!("{boot} {result}\n"));
        }
    }
}

fn kvm_device() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the ELF image `elf` has no program interpreter (`PT_INTERP`).
fn is_static(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != 3)
    })
}

/// Says once per process that VMs run under software emulation.
fn warn_tcg(why: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::SeqCst) {
        eprintln!(
            "nanoclaw: warning: --backend microvm runs under software emulation (TCG): {why}; \
             each VM boots in seconds instead of the ~150 ms KVM aims for (set \
             NANOCLAW_MICROVM_ACCEL=kvm where /dev/kvm boots standard kernels)"
        );
    }
}

impl Backend for MicroVm {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Image roots, a directory root and a kept upper layer need the
            // image store shared into the guest: a later slice.
            image_root: false,
            dir_root: false,
            persistent_upper: false,
            // No network device in the guest yet: egress through the host's
            // proxy is a later slice.
            network_allowlist: false,
            network_open: false,
            network_kernel: false,
            // A profile is a host path the guest cannot read.
            seccomp_profile: false,
            // Nothing outside the VM watches it idle.
            idle_timeout: false,
            // Through a holder process (the `nanoclaw.detached` label).
            detached: true,
            ..Capabilities::NATIVE
        }
    }

    fn create(&self, config: &SandboxConfig) -> Result<Box<dyn LiveSandbox>, Error> {
        self.check(config)?;
        self.check_mounts(config)?;
        let detached = label(&config.labels, LABEL_DETACHED) == Some("true");
        if detached || self.opts.holder {
            return Ok(Box::new(holder::start(self, config, detached)?));
        }
        Ok(Box::new(self.create_here(config)?))
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, Error> {
        Ok(holder::list(&self.opts.state_root))
    }

    fn attach(&self, id: &str) -> Result<Box<dyn LiveSandbox>, Error> {
        Ok(Box::new(holder::attach(&self.opts.state_root, id)?))
    }
}

impl MicroVm {
    /// Refuses mounts a VM cannot share.
    fn check_mounts(&self, config: &SandboxConfig) -> Result<(), Error> {
        for m in &config.spec.mounts {
            if m.access == nanoclaw_sandbox::spec::Access::Rw {
                return Err(Error::NotSupported {
                    backend: NAME.into(),
                    field: "a read-write --mount".into(),
                    why: "the guest's rootful sandbox gives the sandbox user its files through an \
                          idmapped mount, which virtiofs does not offer; mount it read-only, and \
                          copy results out with the file calls"
                        .into(),
                });
            }
            if !m.source.is_dir() {
                return Err(Error::InvalidSpec(format!(
                    "--backend microvm: --mount {}: the micro-VM shares directories only \
                     (virtiofs); mount the directory that holds it",
                    m.source.display()
                )));
            }
        }
        Ok(())
    }

    /// Boots a VM for `config` held by this process (it ends with the
    /// handle, or with this process).
    pub(crate) fn create_here(&self, config: &SandboxConfig) -> Result<host::VmSandbox, Error> {
        self.check(config)?;
        self.check_mounts(config)?;
        let accel = match self.opts.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => {
                warn_tcg("NANOCLAW_MICROVM_ACCEL=tcg");
                Accel::Tcg
            }
            AccelChoice::Auto if !kvm_device() => {
                warn_tcg("no usable /dev/kvm");
                Accel::Tcg
            }
            AccelChoice::Auto => match self.cached_probe() {
                Some(true) => Accel::Kvm,
                Some(false) => {
                    warn_tcg("/dev/kvm did not boot a standard kernel here (probed this boot)");
                    Accel::Tcg
                }
                None => match host::boot(self, config, Accel::Kvm, KVM_PROBE) {
                    Ok(sb) => {
                        self.record_probe(true);
                        return Ok(sb);
                    }
                    Err(host::BootError::NoHello(why)) => {
                        self.record_probe(false);
                        warn_tcg(&format!(
                            "/dev/kvm did not boot a standard kernel within {}s ({why})",
                            KVM_PROBE.as_secs()
                        ));
                        Accel::Tcg
                    }
                    Err(host::BootError::Failed(e)) => return Err(e),
                },
            },
        };
        let patience = match accel {
            Accel::Kvm => KVM_PROBE * 4,
            Accel::Tcg => TCG_BOOT_TIMEOUT,
        };
        match host::boot(self, config, accel, patience) {
            Ok(sb) => Ok(sb),
            Err(host::BootError::Failed(e)) => Err(e),
            Err(host::BootError::NoHello(why)) => Err(Error::Backend {
                backend: NAME.into(),
                message: format!(
                    "the VM ({}) did not boot within {}s: {why}",
                    accel.name(),
                    patience.as_secs()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_static_binary_can_be_the_guest_agent() {
        let me = std::fs::read("/proc/self/exe").expect("own binary");
        let sh = std::fs::read("/bin/sh").expect("/bin/sh");
        assert!(!is_static(&sh), "/bin/sh has an interpreter");
        assert!(!is_static(b"#!/bin/sh\n"));
        // Test binaries are linked like the release binary.
        println!("this test binary static: {}", is_static(&me));
    }
}
