//! The VMM driver: what turns a [`Launch`] (kernel, initramfs, memory, the
//! control channel, the virtiofs shares) into a monitor process.
//!
//! [`Qemu`] (QEMU's `microvm` machine) is the one driver today. Another
//! monitor is another [`Vmm`]: its `command` builds that monitor's command
//! line from the same [`Launch`], and the rest of the backend (initramfs,
//! guest agent, protocol, virtiofsd, clean-up) stays as it is:
//!
//! * Cloud Hypervisor: `cloud-hypervisor --kernel K --initramfs I --cmdline
//!   C --memory size=…M,shared=on --cpus boot=N --fs tag=T,socket=S …`;
//!   the control channel as `--console socket=…` (its virtio console is
//!   `hvc0` in the guest, which the agent would open instead of the
//!   virtio-serial port: [`Launch::control`] stays the socket the host
//!   listens on).
//! * Firecracker: no virtio-serial and no virtiofs, so the control channel
//!   becomes vsock (`vsock.uds_path`, with Firecracker's `CONNECT <port>`
//!   handshake on the host side) and shares become block devices; its
//!   JSON `--config-file` is written from the [`Launch`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (`/dev/kvm`).
    Kvm,
    /// QEMU's software emulation: works anywhere, boots take seconds.
    Tcg,
}

impl Accel {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One VM to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs (nanoclaw's agent as `/init`).
    pub initramfs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Guest CPUs.
    pub cpus: u32,
    /// The accelerator.
    pub accel: Accel,
    /// The Unix socket the host listens on; the monitor connects the
    /// guest's control port (virtio-serial port `nanoclaw`) to it.
    pub control: PathBuf,
    /// (virtiofs tag, vhost-user socket a virtiofsd listens on).
    pub shares: Vec<(String, PathBuf)>,
    /// Where the guest's serial console goes (kept for error messages).
    pub console_log: PathBuf,
    /// The monitor's own stdout and stderr.
    pub monitor_log: PathBuf,
}

/// A virtual machine monitor (see the module's documentation).
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Its name, e.g. `qemu`.
    fn name(&self) -> &str;

    /// The monitor's binary.
    fn binary(&self) -> &Path;

    /// The command that starts `launch` (the caller starts it, tied to
    /// its own life, see [`crate::procs`]); the monitor must exit when the
    /// guest powers off.
    fn command(&self, launch: &Launch) -> std::io::Result<Command>;
}

/// QEMU's `microvm` machine: no PCI, no firmware, virtio over MMIO.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
}

impl Qemu {
    /// Debian's `qemu-system-x86` puts it here.
    pub const DEFAULT: &'static str = "/usr/bin/qemu-system-x86_64";

    /// QEMU at `binary`.
    pub fn new(binary: impl Into<PathBuf>) -> Qemu {
        Qemu {
            binary: binary.into(),
        }
    }

    /// `$NANOCLAW_QEMU`, else [`Qemu::DEFAULT`], if executable.
    pub fn find() -> Option<Qemu> {
        let p = std::env::var_os("NANOCLAW_QEMU")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(Qemu::DEFAULT));
        crate::is_executable(&p).then(|| Qemu::new(p))
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &str {
        "qemu"
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    fn command(&self, l: &Launch) -> std::io::Result<Command> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut c = Command::new(&self.binary);
        // vhost-user (virtiofsd) needs guest memory it can map: a shared
        // memfd. virtio-mmio defaults to legacy devices, which
        // vhost-user-fs refuses.
        c.args(["-M", "microvm,memory-backend=mem"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-accel", l.accel.name()])
            .args(["-cpu", if l.accel == Accel::Kvm { "host" } else { "max" }])
            .args(["-m", &format!("{}M", l.memory_mib)])
            .args(["-smp", &l.cpus.to_string()])
            .args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    l.memory_mib
                ),
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .args(["-kernel", &path(&l.kernel)])
            .args(["-initrd", &path(&l.initramfs)])
            .args(["-append", &l.cmdline])
            .args(["-serial", &format!("file:{}", path(&l.console_log))])
            .args([
                "-chardev",
                &format!("socket,id=ctl,path={}", path(&l.control)),
            ])
            .args(["-device", "virtio-serial-device"])
            .args(["-device", "virtserialport,chardev=ctl,name=nanoclaw"]);
        for (i, (tag, sock)) in l.shares.iter().enumerate() {
            c.args(["-chardev", &format!("socket,id=fs{i},path={}", path(sock))])
                .args([
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"),
                ]);
        }
        let log = std::fs::File::create(&l.monitor_log)?;
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        Ok(c)
    }
}

/// The host's TSC rate in kHz, for `tsc_early_khz=`: under TCG the guest's
/// TSC runs at the host's rate, and the `microvm` machine has no PIT or
/// HPET to calibrate it against (the kernel hangs without it).
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}
