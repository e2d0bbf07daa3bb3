//! The holder: a VM that outlives the process that asked for it.
//!
//! A VM's processes (QEMU, virtiofsd) die with the process that started
//! them ([`crate::procs`]: a death signal, tied to its launcher thread).
//! For a sandbox that must outlive the CLI (`nanoclaw sandbox create
//! --backend microvm`), or one a multithreaded daemon asks for, that
//! process is a *holder*: nanoclaw's own binary, exec'd as `nanoclaw
//! __microvm-holder` (never a fork of the busy caller), which forks once
//! while it is still single-threaded (so the caller reaps the first process
//! at once and the holder is nobody's child), starts a session of its own,
//! boots the VM as `nanoclaw run --backend microvm` does, and then serves
//! it on a Unix socket in the VM's state directory (0600, root's peers
//! only).
//!
//! The socket speaks the guest's own frames ([`crate::proto`]): a client
//! is a [`crate::host`] handle like one on the guest's channel. The holder
//! relays each client's commands under exec ids of its own (several
//! clients may run commands at once), answers control requests itself, and
//! kills what a client that hangs up left running. `SHUTDOWN` ends the VM
//! and the holder.
//!
//! It ends the VM, removes the state directory and exits: at the end of
//! the sandbox's lifetime, when the guest goes away, when a client asks,
//! or — for a VM that is not detached (a daemon's) — when the process that
//! made it ends (watched through a pidfd, so a `kill -9`ed daemon leaves no
//! VM running). A holder that is itself killed takes QEMU and virtiofsd
//! with it (their death signal); its directory is swept by the next
//! nanoclaw that opens the backend (`sandbox ls`, `prune`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanoclaw_sandbox::backend::{SandboxConfig, SandboxInfo};
use nanoclaw_sandbox::{Error, Layers, SandboxSpec};
use serde::{Deserialize, Serialize};

use crate::host::{self, backend_error, io_error, lock, Shared, VmSandbox};
use crate::proto::{self, Frame, WireError};
use crate::{procs, MicroVm, MicroVmOptions, NAME};

/// The hidden command that runs a holder.
pub const COMMAND: &str = "__microvm-holder";
/// The holder's socket, in the VM's state directory.
const SOCKET: &str = "holder.sock";
/// The holder's record, in the VM's state directory.
const RECORD: &str = "holder.json";
/// How long a holder may take to boot its VM and say so: a KVM probe,
/// a TCG boot and the sandbox's creation on a loaded machine.
const HOLDER_START: Duration = Duration::from_secs(300);

/// What the caller tells its holder (on the holder's stdin, as JSON).
#[derive(Debug, Serialize, Deserialize)]
struct HolderConfig {
    opts: MicroVmOptions,
    spec: SandboxSpec,
    labels: Vec<(String, String)>,
    /// The process whose end ends the VM (pid, start time); `None`: the VM
    /// is detached and ends at its lifetime or when removed.
    maker: Option<(i32, u64)>,
}

/// What a holder keeps next to its VM (`holder.json`): how `sandbox ls`
/// lists it and a later process attaches to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    id: String,
    layers: Layers,
    labels: Vec<(String, String)>,
    /// QEMU's and the virtiofsd daemons' pids.
    vm_pids: Vec<i32>,
    /// The holder's pid and start time.
    holder: (i32, u64),
    /// The end of the sandbox's lifetime, ms since the epoch.
    deadline_ms: u64,
    /// It outlives its maker.
    detached: bool,
}

impl Record {
    fn alive(&self) -> bool {
        procs::start_time(self.holder.0) == Some(self.holder.1)
    }

    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            id: self.id.clone(),
            backend: NAME.into(),
            layers: self.layers.clone(),
            host_pids: std::iter::once(self.holder.0)
                .chain(self.vm_pids.iter().copied())
                .collect(),
            labels: self.labels.clone(),
        }
    }

    fn deadline(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.deadline_ms)
    }
}

/// Starts a holder for `config` and returns a handle on its VM once it
/// has booted. `detached`: the VM outlives this process; otherwise it ends
/// when this process does (the holder watches it).
pub(crate) fn start(
    vm: &MicroVm,
    config: &SandboxConfig,
    detached: bool,
) -> Result<VmSandbox, Error> {
    let me = std::process::id() as i32;
    let cfg = HolderConfig {
        opts: vm.opts.clone(),
        spec: config.spec.clone(),
        labels: config.labels.clone(),
        maker: (!detached).then(|| (me, procs::start_time(me).unwrap_or(0))),
    };
    let input = serde_json::to_vec(&cfg)
        .map_err(|e| Error::InvalidSpec(format!("the VM's configuration: {e}")))?;
    // Spawned, not forked here (posix_spawn: nothing of this process runs
    // in the child before exec). Its stderr is ours until it is ready, so
    // its warnings (software emulation) reach the caller.
    let mut child = Command::new(&vm.opts.exe)
        .arg(COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io_error(format!(
            "starting the VM's holder ({} {COMMAND})",
            vm.opts.exe.display()
        )))?;
    let written = child
        .stdin
        .take()
        .map(|mut s| s.write_all(&input))
        .unwrap_or(Ok(()));
    // The first process exits at once, leaving the holder (its child).
    let _ = child.wait();
    written.map_err(io_error("configuring the VM's holder"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| backend_error("the holder has no stdout"))?;
    let out: OwnedFd = out.into();
    let deadline = Instant::now() + HOLDER_START;
    // First its pid (so a holder that never gets ready can be ended), then
    // its readiness.
    let first = read_line(&out, deadline);
    let holder = first
        .as_deref()
        .and_then(|l| l.strip_prefix("holder "))
        .and_then(|l| {
            let (pid, start) = l.trim().split_once(' ')?;
            Some((pid.parse::<i32>().ok()?, start.parse::<u64>().ok()?))
        })
        .ok_or_else(|| {
            backend_error(format!(
                "the VM's holder did not start: {}",
                first.as_deref().unwrap_or("it said nothing").trim()
            ))
        })?;
    let line = read_line(&out, deadline);
    match line.as_deref().map(str::trim) {
        Some(l) if l.starts_with("ok ") => {
            let record: Record = serde_json::from_str(&l[3..])
                .map_err(|e| backend_error(format!("the holder's record: {e}")))?;
            attach_record(&vm.opts.state_root.join(&record.id), &record)
        }
        Some(l) if l.starts_with("error ") => {
            let w: WireError = serde_json::from_str(&l[6..])
                .map_err(|e| backend_error(format!("the holder's error: {e}: {l}")))?;
            Err(match w {
                // The holder's own failure (booting, starting a process).
                WireError::Other { message } => backend_error(message),
                w => w.into_engine(NAME, "(new)"),
            })
        }
        other => {
            // Not ready in time (or it died): end it; its VM dies with it.
            if procs::start_time(holder.0) == Some(holder.1) {
                procs::kill_and_wait(&[holder.0], Duration::from_secs(5));
            }
            procs::sweep(&vm.opts.state_root);
            Err(backend_error(match other {
                None => format!(
                    "the VM's holder did not report a booted VM within {}s",
                    HOLDER_START.as_secs()
                ),
                Some(l) => format!("the VM's holder said: {l}"),
            }))
        }
    }
}

/// The first line `fd` gives before `deadline` (`None`: EOF or too late).
fn read_line(fd: &OwnedFd, deadline: Instant) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        // SAFETY: reading one byte into a buffer we own from an open fd.
        let r = unsafe { libc::read(fd.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        match r {
            1 => buf.push(byte[0]),
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// The record of the VM in `dir`, if a holder keeps one there.
pub(crate) fn read_record(dir: &Path) -> Option<Record> {
    let text = std::fs::read(dir.join(RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The detached VMs whose holders run, under `root`.
pub(crate) fn list(root: &Path) -> Vec<SandboxInfo> {
    let mut out: Vec<SandboxInfo> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| read_record(&e.path()))
        .filter(|r| r.detached && r.alive())
        .map(|r| r.info())
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// A handle on the held VM `id` under `root`.
pub(crate) fn attach(root: &Path, id: &str) -> Result<VmSandbox, Error> {
    let not_found = |what: &str| Error::NotFound {
        id: id.to_string(),
        what: what.to_string(),
    };
    if !id.starts_with("vm-") || id.contains('/') {
        return Err(not_found("not a micro-VM sandbox id"));
    }
    let dir = root.join(id);
    let record = read_record(&dir).ok_or_else(|| not_found("no such micro-VM sandbox"))?;
    if !record.alive() {
        procs::sweep_one(&dir);
        return Err(not_found("its holder has ended (the VM with it)"));
    }
    attach_record(&dir, &record)
}

fn attach_record(dir: &Path, record: &Record) -> Result<VmSandbox, Error> {
    host::attach(
        dir,
        &dir.join(SOCKET),
        record.info(),
        record.holder,
        record.deadline(),
    )
}

/// `nanoclaw __microvm-holder`: the holder's whole life (see the module's
/// documentation). Must run first thing, before any thread exists.
pub fn main() -> u8 {
    // SAFETY: fork in a single-threaded process (the first thing this
    // command does); the parent exits at once without running anything.
    match unsafe { libc::fork() } {
        -1 => return 125,
        // SAFETY: _exit ends the first process without running destructors.
        pid if pid > 0 => unsafe { libc::_exit(0) },
        _ => {}
    }
    // SAFETY: setsid has no arguments; the child is not a group leader.
    unsafe { libc::setsid() };
    let me = std::process::id() as i32;
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "holder {me} {}",
        procs::start_time(me).unwrap_or_default()
    );
    let _ = out.flush();
    match boot() {
        Ok((sb, listener, maker, record)) => {
            let text = serde_json::to_string(&record).unwrap_or_default();
            let _ = writeln!(out, "ok {text}");
            let _ = out.flush();
            detach_stdio(&record_dir(&sb));
            serve(sb, listener, maker)
        }
        Err(e) => {
            let w = serde_json::to_string(&WireError::from_engine(&e)).unwrap_or_default();
            let _ = writeln!(out, "error {w}");
            125
        }
    }
}

fn record_dir(sb: &VmSandbox) -> PathBuf {
    sb.shared.dir().to_path_buf()
}

/// Reads the configuration, boots the VM, opens the socket, writes the
/// record.
fn boot() -> Result<(VmSandbox, UnixListener, Option<OwnedFd>, Record), Error> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(io_error("reading the holder's configuration"))?;
    let cfg: HolderConfig = serde_json::from_slice(&input)
        .map_err(|e| Error::InvalidSpec(format!("the holder's configuration: {e}")))?;
    let maker = cfg
        .maker
        .map(|(pid, start)| watch(pid, start))
        .transpose()?;
    let detached = cfg.maker.is_none();
    let state_root = cfg.opts.state_root.clone();
    let vm = MicroVm::new(MicroVmOptions {
        holder: false,
        ..cfg.opts
    })?;
    let mut config = SandboxConfig::new(cfg.spec);
    config.labels = cfg.labels;
    let sb = vm.create_here(&config)?;
    let dir = state_root.join(&sb.info.id);
    let sock = dir.join(SOCKET);
    let listener =
        UnixListener::bind(&sock).map_err(io_error(format!("binding {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("chmod of the holder's socket"))?;
    let me = std::process::id() as i32;
    let info = sb.info.clone();
    let record = Record {
        id: info.id.clone(),
        layers: info.layers,
        labels: info.labels,
        vm_pids: info.host_pids,
        holder: (me, procs::start_time(me).unwrap_or_default()),
        deadline_ms: sb
            .shared
            .deadline()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        detached,
    };
    let text = serde_json::to_vec(&record).map_err(|e| backend_error(e.to_string()))?;
    let tmp = dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, dir.join(RECORD)))
        .map_err(io_error("writing the holder's record"))?;
    Ok((sb, listener, maker, record))
}

/// A pidfd on the maker (pid, start time): readable when it has ended.
fn watch(pid: i32, start: u64) -> Result<OwnedFd, Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io_error("pidfd_open of the VM's maker")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The pid may have been reused before the pidfd was opened.
    if procs::start_time(pid) != Some(start) {
        return Err(backend_error("the process that asked for the VM has ended"));
    }
    Ok(fd)
}

/// The holder's stdio becomes /dev/null (stderr: a log in the VM's
/// directory): nothing ties it to the terminal or pipeline of its caller.
fn detach_stdio(dir: &Path) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let log = std::fs::File::create(dir.join("holder.log"));
    if let Ok(null) = null {
        for fd in 0..2 {
            // SAFETY: dup2 of a descriptor we hold onto a standard descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
        let err = log
            .as_ref()
            .map(|l| l.as_raw_fd())
            .unwrap_or(null.as_raw_fd());
        // SAFETY: as above.
        unsafe { libc::dup2(err, 2) };
    }
}

/// Serves clients until the VM ends (its lifetime, the guest gone, a
/// client's `SHUTDOWN`) or its maker does; then ends the VM and exits.
fn serve(sb: VmSandbox, listener: UnixListener, maker: Option<OwnedFd>) -> ! {
    let shared = sb.shared.clone();
    let _ = listener.set_nonblocking(true);
    let me = euid();
    while !shared.ended.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: maker.as_ref().map_or(-1, |m| m.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored). The
        // timeout only bounds how late an ended VM is noticed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 500) };
        if n <= 0 {
            continue;
        }
        if fds[1].revents != 0 {
            eprintln!("nanoclaw: microvm holder: the VM's maker ended; ending the VM");
            break;
        }
        while let Ok((stream, _)) = listener.accept() {
            if peer_uid(&stream) != Some(me) {
                continue;
            }
            let _ = stream.set_nonblocking(false);
            let s = shared.clone();
            let _ = std::thread::Builder::new()
                .name("microvm-client".into())
                .spawn(move || client(s, stream));
        }
    }
    drop(sb); // powers the VM off, removes its directory
    std::process::exit(0)
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the peer of `s` (`SO_PEERCRED`).
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

fn error_frame(id: u32, e: &Error) -> Frame {
    Frame {
        kind: proto::ERROR,
        id,
        payload: serde_json::to_vec(&WireError::from_engine(e)).unwrap_or_default(),
    }
}

/// One client connection: its commands relayed under the holder's own
/// exec ids (guest id → the client's), its control requests answered.
fn client(shared: Arc<Shared>, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let (tx, rx) = channel::<Frame>();
    let ids: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (w_ids, w_shared) = (ids.clone(), shared.clone());
    let forward = std::thread::Builder::new()
        .name("microvm-client-out".into())
        .spawn(move || {
            for f in rx {
                let to = if f.id == 0 {
                    Some(0)
                } else {
                    lock(&w_ids).get(&f.id).copied()
                };
                let Some(to) = to else { continue };
                if f.id != 0 && matches!(f.kind, proto::DONE | proto::ERROR) {
                    lock(&w_ids).remove(&f.id);
                    lock(&w_shared.routes).remove(&f.id);
                }
                if proto::write_frame(&mut writer, f.kind, to, &f.payload).is_err() {
                    break;
                }
            }
        });
    let mut reader = stream;
    while let Ok(Some(f)) = proto::read_frame(&mut reader) {
        match f.kind {
            proto::SPAWN => {
                let g = shared.next_id.fetch_add(1, Ordering::SeqCst);
                lock(&ids).insert(g, f.id);
                lock(&shared.routes).insert(g, tx.clone());
                if let Err(e) = shared.send(proto::SPAWN, g, &f.payload) {
                    let _ = tx.send(error_frame(g, &e));
                }
            }
            proto::STDIN | proto::STDIN_END | proto::KILL => {
                let g = lock(&ids)
                    .iter()
                    .find(|(_, c)| **c == f.id)
                    .map(|(g, _)| *g);
                if let Some(g) = g {
                    let _ = shared.send(f.kind, g, &f.payload);
                }
            }
            proto::STATS | proto::PAUSE | proto::RESUME => {
                let reply = match shared.ask(f.kind, &f.payload) {
                    Ok(payload) => Frame {
                        kind: proto::REPLY,
                        id: 0,
                        payload,
                    },
                    Err(e) => error_frame(0, &e),
                };
                let _ = tx.send(reply);
            }
            proto::SHUTDOWN => {
                shared.teardown();
                break;
            }
            _ => {}
        }
    }
    // Hung up: what this connection left running is killed.
    let left: Vec<u32> = lock(&ids).drain().map(|(g, _)| g).collect();
    for g in left {
        lock(&shared.routes).remove(&g);
        let _ = shared.send(proto::KILL, g, b"");
    }
    drop(tx);
    let _ = reader.shutdown(std::net::Shutdown::Both);
    if let Ok(t) = forward {
        let _ = t.join();
    }
}
