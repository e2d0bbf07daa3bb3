//! The host side of one VM: booting it ([`boot`]), the live sandbox it
//! holds ([`VmSandbox`]) and its commands ([`VmExecution`]).
//!
//! One thread per VM reads the guest's frames and routes them by exec id
//! to the waiting caller (id 0: the answer to a control request); writes
//! go through one lock, a frame at a time. The same thread ends the VM at
//! the end of the sandbox's lifetime.

use std::collections::HashMap;
use std::io::{BufWriter, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nanoclaw_sandbox::backend::{
    Echo, ExecControl, Execution, LiveSandbox, SandboxConfig, SandboxInfo, SandboxStats,
};
use nanoclaw_sandbox::native::session::{ExecSpec, RunState};
use nanoclaw_sandbox::spec::{Access, Stdin};
use nanoclaw_sandbox::{Error, Layers, Outcome};

use crate::proto::{self, Frame, Share, WireError};
use crate::vmm::{Accel, Launch};
use crate::{procs, MicroVm, NAME};

/// How long a control request (stats, pause, resume, spawn) may take.
const ANSWER: Duration = Duration::from_secs(60);
/// How long creating the sandbox inside a booted guest may take.
const CREATE_PATIENCE: Duration = Duration::from_secs(90);
/// How long the guest may take to power off before its VMM is killed.
const POWER_OFF: Duration = Duration::from_secs(5);
/// How much later than its own timeout a command's end may be reported
/// before the host gives up on the guest.
const EXEC_SLACK: Duration = Duration::from_secs(60);

/// Why a boot failed.
pub(crate) enum BootError {
    /// The guest agent never said `HELLO` in time (with what the console
    /// showed): for a KVM probe, the sign to fall back to TCG.
    NoHello(String),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for BootError {
    fn from(e: Error) -> BootError {
        BootError::Failed(e)
    }
}

pub(crate) fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.into(),
        message: message.into(),
    }
}

pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let call = what.into();
    move |source| Error::Sys { call, source }
}

/// A random id, `vm-` and 12 hex digits.
fn new_id() -> Result<String, Error> {
    Ok(format!("vm-{}", nanoclaw_sandbox::procs::random_id()?))
}

/// The VM's host processes.
pub(crate) struct Procs {
    vmm: Child,
    fsds: Vec<Child>,
}

/// How a handle reaches its VM.
pub(crate) enum Link {
    /// This process started the VM: the control channel is the guest's
    /// own, and the VM's processes are this process's children.
    Owner(Mutex<Option<Procs>>),
    /// A holder process ([`crate::holder`]) owns the VM; the channel is
    /// the holder's socket, which speaks the same frames. Destroying asks
    /// the holder to end the VM; dropping the handle only hangs up.
    Holder {
        /// The holder's pid and start time.
        pid: i32,
        start: u64,
    },
}

/// What a VM's handle, its executions and its reader thread share.
pub(crate) struct Shared {
    pub(crate) id: String,
    dir: PathBuf,
    layers: Layers,
    writer: Mutex<UnixStream>,
    /// Exec id → its waiter; 0 → the control request's.
    pub(crate) routes: Mutex<HashMap<u32, Sender<Frame>>>,
    /// One control request at a time.
    control: Mutex<()>,
    link: Link,
    pub(crate) ended: AtomicBool,
    pub(crate) next_id: AtomicU32,
    deadline: SystemTime,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn send(&self, kind: u8, id: u32, payload: &[u8]) -> Result<(), Error> {
        proto::write_frame(&mut *lock(&self.writer), kind, id, payload).map_err(|e| {
            backend_error(format!(
                "sandbox {}: the VM's control channel: {e}",
                self.id
            ))
        })
    }

    fn gone(&self) -> Error {
        Error::NotFound {
            id: self.id.clone(),
            what: "the sandbox was destroyed (its VM has ended)".into(),
        }
    }

    /// One control request and its `REPLY` payload.
    pub(crate) fn ask(&self, kind: u8, payload: &[u8]) -> Result<Vec<u8>, Error> {
        if self.ended.load(Ordering::SeqCst) {
            return Err(self.gone());
        }
        let _one = lock(&self.control);
        let (tx, rx) = channel();
        lock(&self.routes).insert(0, tx);
        let answer = self
            .send(kind, 0, payload)
            .and_then(|()| match rx.recv_timeout(ANSWER) {
                Ok(f) if f.kind == proto::REPLY => Ok(f.payload),
                Ok(f) if f.kind == proto::ERROR => Err(self.wire_error(&f.payload)),
                Ok(f) => Err(backend_error(format!(
                    "unexpected frame {} to a request",
                    f.kind
                ))),
                Err(RecvTimeoutError::Timeout) => Err(backend_error(format!(
                    "sandbox {}: the guest did not answer within {}s",
                    self.id,
                    ANSWER.as_secs()
                ))),
                Err(RecvTimeoutError::Disconnected) => Err(self.gone()),
            });
        lock(&self.routes).remove(&0);
        answer
    }

    fn wire_error(&self, payload: &[u8]) -> Error {
        match serde_json::from_slice::<WireError>(payload) {
            Ok(w) => w.into_engine(NAME, &self.id),
            Err(e) => backend_error(format!("an unreadable error from the guest: {e}")),
        }
    }

    /// Powers the VM off (killing it if it does not go), stops its
    /// virtiofsd daemons, removes its state directory. Idempotent. Through
    /// a holder: asks it to do that, and waits until it has exited (a
    /// holder that does not is killed, and what it left is removed here).
    pub(crate) fn teardown(&self) {
        let already = self.ended.swap(true, Ordering::SeqCst);
        match &self.link {
            Link::Owner(procs) => {
                // Held while the VM powers off: a second caller waits
                // until it has.
                let mut held = lock(procs);
                if let Some(mut p) = held.take() {
                    let _ = self.send(proto::SHUTDOWN, 0, b"");
                    procs::reap(&mut p.vmm, POWER_OFF);
                    for f in &mut p.fsds {
                        // Each exits when the VMM hangs up; a stuck one is killed.
                        procs::reap(f, Duration::from_secs(1));
                    }
                }
            }
            Link::Holder { pid, start } => {
                if !already {
                    let _ = self.send(proto::SHUTDOWN, 0, b"");
                }
                let holder = [(*pid, *start)];
                if !procs::wait_gone(&holder, POWER_OFF + Duration::from_secs(10)) {
                    procs::kill_and_wait(&[*pid], Duration::from_secs(2));
                }
                // A holder killed before it cleaned up: its VM's processes
                // died with it (their death signal); its directory stays.
                procs::sweep_one(&self.dir);
                self.hang_up();
            }
        }
        // Waiters learn the VM is gone.
        lock(&self.routes).clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The VM's state directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the sandbox's lifetime.
    pub(crate) fn deadline(&self) -> SystemTime {
        self.deadline
    }

    /// Closes the channel (the reader thread ends; a holder kills what
    /// this connection left running).
    fn hang_up(&self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }
}

/// Reads the guest's frames and routes them, until the channel closes or
/// the sandbox's lifetime ends.
fn route(shared: Arc<Shared>, mut reader: UnixStream) {
    let owner = matches!(shared.link, Link::Owner(_));
    loop {
        let left = shared
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // A holder ends its VM at the deadline itself (and hangs up).
        if owner && left.is_zero() {
            shared.teardown();
            return;
        }
        let wait = if owner {
            Some(left.min(Duration::from_secs(3600)))
        } else {
            None
        };
        let _ = reader.set_read_timeout(wait);
        match proto::read_frame(&mut reader) {
            Ok(Some(f)) => {
                let tx = lock(&shared.routes).get(&f.id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(f);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok(None) | Err(_) => {
                shared.ended.store(true, Ordering::SeqCst);
                lock(&shared.routes).clear();
                return;
            }
        }
    }
}

/// Removes the VM's state (processes, directory) if booting fails.
struct BootGuard {
    dir: PathBuf,
    procs: Option<Procs>,
}

impl Drop for BootGuard {
    fn drop(&mut self) {
        if let Some(p) = &mut self.procs {
            let _ = p.vmm.kill();
            let _ = p.vmm.wait();
            for f in &mut p.fsds {
                let _ = f.kill();
                let _ = f.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last lines of the guest's console, for error messages.
fn console_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
    if tail.is_empty() {
        let monitor = std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default();
        format!("no console output; the monitor said: {}", monitor.trim())
    } else {
        format!("its console ended with: {tail}")
    }
}

/// Starts one virtiofsd serving `source` on a socket in `dir`.
fn start_virtiofsd(
    vm: &MicroVm,
    dir: &Path,
    n: usize,
    source: &Path,
    readonly: bool,
) -> Result<(Child, PathBuf), Error> {
    let sock = dir.join(format!("fs{n}.sock"));
    let listener =
        UnixListener::bind(&sock).map_err(io_error(format!("binding {}", sock.display())))?;
    let mut cmd = vm.virtiofsd.command(source, readonly);
    let log = std::fs::File::create(dir.join(format!("virtiofsd{n}.log")))
        .map_err(io_error("creating the virtiofsd log"))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io_error("dup"))?)
        .stderr(log);
    // SAFETY: the listener stays open until the child has started.
    unsafe { procs::pass_as_fd3(&mut cmd, listener.as_raw_fd()) };
    if readonly {
        procs::readonly_view(&mut cmd, source).map_err(io_error("preparing a read-only share"))?;
    }
    procs::raise_nofile(&mut cmd, procs::VIRTIOFSD_NOFILE);
    let child = procs::spawn_tied(cmd).map_err(io_error(format!(
        "starting {}",
        vm.virtiofsd.path.display()
    )))?;
    let _ = procs::remember(dir, child.id() as i32);
    Ok((child, sock))
}

/// Waits for the VMM to connect to `listener`, until `deadline`.
fn accept(
    listener: &UnixListener,
    vmm: &mut Child,
    deadline: Instant,
) -> Result<UnixStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| format!("{e}"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accepting the VMM's connection: {e}")),
        }
        if let Ok(Some(st)) = vmm.try_wait() {
            return Err(format!("the VMM exited ({st}) before connecting"));
        }
        if Instant::now() >= deadline {
            return Err("the VMM did not connect its control port".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads one frame before `deadline` (the VMM's exit ends the wait).
fn read_before(s: &mut UnixStream, deadline: Instant) -> Result<Frame, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    let _ = s.set_read_timeout(Some(left));
    match proto::read_frame(s) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err("the guest closed its control port".into()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err("timed out".into())
        }
        Err(e) => Err(format!("the control channel: {e}")),
    }
}

/// Boots a VM for `config` with `accel`, the agent's `HELLO` due within
/// `patience`, and creates the sandbox in it.
pub(crate) fn boot(
    vm: &MicroVm,
    config: &SandboxConfig,
    accel: Accel,
    patience: Duration,
) -> Result<VmSandbox, BootError> {
    let started = Instant::now();
    let id = new_id()?;
    let dir = vm.opts.state_root.join(&id);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io_error(format!("creating {}", dir.display())))?;
    let mut guard = BootGuard {
        dir: dir.clone(),
        procs: None,
    };
    std::fs::write(dir.join("owner"), procs::record(std::process::id() as i32))
        .map_err(io_error("writing the VM's owner"))?;

    let initramfs = dir.join("initramfs.cpio");
    let file = std::fs::File::create(&initramfs).map_err(io_error("creating the initramfs"))?;
    let init = std::fs::read(&vm.opts.exe).map_err(io_error(format!(
        "reading the agent binary {}",
        vm.opts.exe.display()
    )))?;
    crate::initramfs::write(BufWriter::new(file), &init, &vm.kernel.modules)
        .map_err(io_error("writing the initramfs"))?;
    drop(init);

    let control = dir.join("ctl.sock");
    let listener =
        UnixListener::bind(&control).map_err(io_error(format!("binding {}", control.display())))?;
    let _ = std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600));

    // The host's /usr (the guest's /bin, /lib* point into it), then each
    // --mount directory.
    let mut spec = config.spec.clone();
    let mut shares = vec![Share {
        tag: "usr".into(),
        path: "/usr".into(),
        readonly: true,
    }];
    let mut sources = vec![PathBuf::from("/usr")];
    for (i, m) in spec.mounts.iter_mut().enumerate() {
        let path = PathBuf::from(format!("/mnt/nanoclaw/{i}"));
        shares.push(Share {
            tag: format!("m{i}"),
            path: path.clone(),
            readonly: m.access == Access::Ro,
        });
        sources.push(std::mem::replace(&mut m.source, path));
    }
    let mut fsds = Vec::new();
    let mut sockets = Vec::new();
    for (n, (share, source)) in shares.iter().zip(&sources).enumerate() {
        match start_virtiofsd(vm, &dir, n, source, share.readonly) {
            Ok((child, sock)) => {
                fsds.push(child);
                sockets.push((share.tag.clone(), sock));
            }
            Err(e) => {
                for mut f in fsds {
                    let _ = f.kill();
                    let _ = f.wait();
                }
                return Err(e.into());
            }
        }
    }

    let memory_mib = config
        .spec
        .limits
        .memory
        .map(|m| m.div_ceil(1 << 20) + crate::MEMORY_OVERHEAD_MIB)
        .unwrap_or(0)
        .max(crate::DEFAULT_MEMORY_MIB);
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1 rdinit=/init");
    if accel == Accel::Tcg {
        if let Some(khz) = crate::vmm::host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    let launch = Launch {
        kernel: vm.kernel.vmlinuz.clone(),
        initramfs,
        cmdline,
        memory_mib,
        cpus: vm.opts.cpus,
        accel,
        control,
        shares: sockets,
        console_log: dir.join("console.log"),
        monitor_log: dir.join("monitor.log"),
    };
    let vmm = vm
        .vmm
        .command(&launch)
        .and_then(procs::spawn_tied)
        .map_err(io_error(format!("starting {}", vm.vmm.binary().display())));
    let vmm = match vmm {
        Ok(c) => c,
        Err(e) => {
            for mut f in fsds {
                let _ = f.kill();
                let _ = f.wait();
            }
            return Err(e.into());
        }
    };
    let _ = procs::remember(&dir, vmm.id() as i32);
    let procs = guard.procs.insert(Procs { vmm, fsds });

    let deadline = started + patience;
    let mut stream = accept(&listener, &mut procs.vmm, deadline)
        .map_err(|e| BootError::Failed(backend_error(format!("{e}; {}", console_tail(&dir)))))?;
    drop(listener);
    let hello = read_before(&mut stream, deadline)
        .map_err(|e| BootError::NoHello(format!("{e}; {}", console_tail(&dir))))?;
    if hello.kind != proto::HELLO {
        return Err(backend_error(format!(
            "the guest's first frame was {}, not HELLO",
            hello.kind
        ))
        .into());
    }

    // The agent mounted /usr itself, before it said HELLO.
    let create = proto::Create {
        spec,
        shares: shares[1..].to_vec(),
    };
    let payload = serde_json::to_vec(&create)
        .map_err(|e| backend_error(format!("the configuration: {e}")))?;
    proto::write_frame(&mut stream, proto::CREATE, 0, &payload)
        .map_err(io_error("sending the configuration"))?;
    let reply = read_before(&mut stream, Instant::now() + CREATE_PATIENCE).map_err(|e| {
        backend_error(format!(
            "creating the sandbox in the guest: {e}; {}",
            console_tail(&dir)
        ))
    })?;
    let ready: proto::Ready = match reply.kind {
        proto::READY => serde_json::from_slice(&reply.payload)
            .map_err(|e| backend_error(format!("the guest's READY: {e}")))?,
        proto::ERROR => {
            let w: WireError = serde_json::from_slice(&reply.payload)
                .map_err(|e| backend_error(format!("the guest's error: {e}")))?;
            return Err(w.into_engine(NAME, &id).into());
        }
        k => return Err(backend_error(format!("unexpected frame {k} to CREATE")).into()),
    };
    let _ = stream.set_read_timeout(None);

    let mut layers = ready.layers;
    layers.mode = format!(
        "microvm ({}, {}, kernel {}) > {}",
        vm.vmm.name(),
        accel.name(),
        crate::kernel::RELEASE,
        layers.mode
    );
    let procs = guard.procs.take();
    let host_pids: Vec<i32> = procs
        .iter()
        .flat_map(|p| std::iter::once(&p.vmm).chain(&p.fsds))
        .map(|c| c.id() as i32)
        .collect();
    let reader = stream
        .try_clone()
        .map_err(io_error("dup of the control channel"))?;
    let shared = Arc::new(Shared {
        id: id.clone(),
        dir: dir.clone(),
        layers: layers.clone(),
        writer: Mutex::new(stream),
        routes: Mutex::new(HashMap::new()),
        control: Mutex::new(()),
        link: Link::Owner(Mutex::new(procs)),
        ended: AtomicBool::new(false),
        next_id: AtomicU32::new(1),
        deadline: SystemTime::now() + config.spec.limits.timeout,
    });
    std::mem::forget(guard); // the state is the handle's now
    let s = shared.clone();
    if let Err(e) = std::thread::Builder::new()
        .name(format!("microvm-{id}"))
        .spawn(move || route(s, reader))
    {
        shared.teardown();
        return Err(io_error("starting the VM's reader thread")(e).into());
    }
    Ok(VmSandbox {
        info: SandboxInfo {
            id,
            backend: NAME.into(),
            layers,
            host_pids,
            labels: config.labels.clone(),
        },
        shared,
    })
}

/// A sandbox in a VM.
pub(crate) struct VmSandbox {
    pub(crate) info: SandboxInfo,
    pub(crate) shared: Arc<Shared>,
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        match self.shared.link {
            // Not detached: the VM ends with its handle.
            Link::Owner(_) => self.shared.teardown(),
            // Held by a holder: this handle only hangs up.
            Link::Holder { .. } => self.shared.hang_up(),
        }
    }
}

/// A handle on the VM a holder process keeps (see [`crate::holder`]):
/// connects to its socket `sock` in the VM's state directory `dir`.
pub(crate) fn attach(
    dir: &Path,
    sock: &Path,
    info: SandboxInfo,
    holder: (i32, u64),
    deadline: SystemTime,
) -> Result<VmSandbox, Error> {
    let stream = UnixStream::connect(sock).map_err(io_error(format!(
        "connecting to the VM's holder {}",
        sock.display()
    )))?;
    let reader = stream
        .try_clone()
        .map_err(io_error("dup of the holder connection"))?;
    let shared = Arc::new(Shared {
        id: info.id.clone(),
        dir: dir.to_path_buf(),
        layers: info.layers.clone(),
        writer: Mutex::new(stream),
        routes: Mutex::new(HashMap::new()),
        control: Mutex::new(()),
        link: Link::Holder {
            pid: holder.0,
            start: holder.1,
        },
        ended: AtomicBool::new(false),
        next_id: AtomicU32::new(1),
        deadline,
    });
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("microvm-{}", info.id))
        .spawn(move || route(s, reader))
        .map_err(io_error("starting the holder connection's reader thread"))?;
    Ok(VmSandbox { info, shared })
}

/// The stdin bytes of `spec` sent before the command starts (the caller's
/// own stdin read to its end for `Inherit`). An `Open` stdin has none: the
/// command starts at once and its control handle feeds it.
fn stdin_bytes(spec: &ExecSpec) -> Result<Option<Vec<u8>>, Error> {
    match &spec.stdin {
        Stdin::Null | Stdin::Open => Ok(None),
        Stdin::Bytes(b) => Ok(Some(b.clone())),
        Stdin::Inherit => {
            let mut b = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut b)
                .map_err(io_error("reading stdin for the VM"))?;
            Ok(Some(b))
        }
    }
}

impl LiveSandbox for VmSandbox {
    fn id(&self) -> &str {
        &self.info.id
    }

    fn info(&self) -> SandboxInfo {
        self.info.clone()
    }

    fn spawn(&self, spec: &ExecSpec) -> Result<Box<dyn Execution>, Error> {
        let sh = &self.shared;
        if sh.ended.load(Ordering::SeqCst) {
            return Err(sh.gone());
        }
        let stdin = stdin_bytes(spec)?;
        let open = matches!(spec.stdin, Stdin::Open);
        let req = proto::Spawn {
            command: spec.command.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            user: spec.user.map(|u| (u.uid, u.gid)),
            stdin: stdin.is_some() || open,
            stream_stdin: open,
            timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
            output_limit: spec.output_limit,
        };
        let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = channel();
        lock(&sh.routes).insert(id, tx);
        let mut x = VmExecution {
            shared: sh.clone(),
            id,
            rx,
            spec: spec.clone(),
            finished: false,
            stdin_open: Arc::new(AtomicBool::new(open)),
        };
        let payload = serde_json::to_vec(&req)
            .map_err(|e| Error::InvalidSpec(format!("the command: {e}")))?;
        sh.send(proto::SPAWN, id, &payload)?;
        if !open {
            for chunk in stdin
                .as_deref()
                .unwrap_or_default()
                .chunks(proto::MAX_PAYLOAD)
            {
                sh.send(proto::STDIN, id, chunk)?;
            }
            sh.send(proto::STDIN_END, id, b"")?;
        }
        match x.rx.recv_timeout(ANSWER) {
            Ok(f) if f.kind == proto::SPAWNED => Ok(Box::new(x)),
            Ok(f) if f.kind == proto::ERROR => {
                x.finished = true;
                Err(sh.wire_error(&f.payload))
            }
            Ok(f) => Err(backend_error(format!(
                "unexpected frame {} to a spawn",
                f.kind
            ))),
            Err(RecvTimeoutError::Timeout) => Err(backend_error(format!(
                "sandbox {}: the guest did not start the command within {}s",
                sh.id,
                ANSWER.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                x.finished = true;
                Err(sh.gone())
            }
        }
    }

    fn pause(&self) -> Result<(), Error> {
        self.shared.ask(proto::PAUSE, b"").map(drop)
    }

    fn resume(&self) -> Result<(), Error> {
        self.shared.ask(proto::RESUME, b"").map(drop)
    }

    fn stats(&self) -> Result<SandboxStats, Error> {
        let payload = self.shared.ask(proto::STATS, b"")?;
        let st: proto::Stats = serde_json::from_slice(&payload)
            .map_err(|e| backend_error(format!("the guest's stats: {e}")))?;
        Ok(SandboxStats {
            state: if st.state == "paused" {
                RunState::Paused
            } else {
                RunState::Running
            },
            memory_bytes: st.memory_bytes,
            cpu: st.cpu_ms.map(Duration::from_millis),
            tasks: st.tasks,
            can_pause: st.can_pause,
            execs: st.execs,
            deadline: self.shared.deadline,
        })
    }

    fn destroy(&self) -> Result<(), Error> {
        self.shared.teardown();
        Ok(())
    }
}

/// A command running in a VM.
struct VmExecution {
    shared: Arc<Shared>,
    id: u32,
    rx: Receiver<Frame>,
    spec: ExecSpec,
    /// Its end was reported (or it never started).
    finished: bool,
    /// Its stdin is open for its control handles: started with
    /// [`Stdin::Open`] and not closed yet (shared by every handle).
    stdin_open: Arc<AtomicBool>,
}

/// Writes all of `data` to `fd` (the caller's echo descriptor).
fn write_fd(fd: BorrowedFd<'_>, mut data: &[u8]) -> Result<(), Error> {
    while !data.is_empty() {
        // SAFETY: `fd` is open for the borrow; `data` is valid for its length.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_error("writing the command's output")(e));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

impl Execution for VmExecution {
    fn id(&self) -> u32 {
        self.id
    }

    fn control(&self) -> Option<Box<dyn ExecControl>> {
        Some(Box::new(VmControl {
            shared: self.shared.clone(),
            id: self.id,
            stdin_open: self.stdin_open.clone(),
        }))
    }

    fn wait(mut self: Box<Self>, echo: Option<Echo<'_>>) -> Result<Outcome, Error> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let patience = self.spec.timeout.saturating_add(EXEC_SLACK);
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(f) => match f.kind {
                    proto::STDOUT => match echo {
                        Some(e) => write_fd(e.stdout, &f.payload)?,
                        None => out.extend_from_slice(&f.payload),
                    },
                    proto::STDERR => match echo {
                        Some(e) => write_fd(e.stderr, &f.payload)?,
                        None => err.extend_from_slice(&f.payload),
                    },
                    proto::DONE => {
                        self.finished = true;
                        let mut o: Outcome = serde_json::from_slice(&f.payload)
                            .map_err(|e| backend_error(format!("the guest's outcome: {e}")))?;
                        o.stdout = out;
                        o.stderr = err;
                        o.sandbox_id = self.shared.id.clone();
                        o.layers = self.shared.layers.clone();
                        return Ok(o);
                    }
                    proto::ERROR => {
                        self.finished = true;
                        return Err(self.shared.wire_error(&f.payload));
                    }
                    k => return Err(backend_error(format!("unexpected frame {k} for a command"))),
                },
                Err(RecvTimeoutError::Timeout) => {
                    return Err(backend_error(format!(
                        "sandbox {}: the guest did not report the command's end within {}s of \
                         its start; it was killed",
                        self.shared.id,
                        patience.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finished = true;
                    return Err(self.shared.gone());
                }
            }
        }
    }
}

/// A running command's stdin and signals, from other threads (how the
/// daemon serves E2B's `SendInput`, `CloseStdin` and `SendSignal`): frames
/// on the VM's connection, which the guest writes to the command's stdin.
struct VmControl {
    shared: Arc<Shared>,
    id: u32,
    /// See [`VmExecution::stdin_open`]; any other command's stdin went to
    /// the guest whole before it started.
    stdin_open: Arc<AtomicBool>,
}

impl ExecControl for VmControl {
    fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        if !self.stdin_open.load(Ordering::SeqCst) {
            return Err(Error::InvalidSpec(
                "the command has no open stdin (it was closed, or never open)".into(),
            ));
        }
        if self.shared.ended.load(Ordering::SeqCst) {
            return Err(self.shared.gone());
        }
        for chunk in data.chunks(proto::MAX_PAYLOAD) {
            self.shared.send(proto::STDIN, self.id, chunk)?;
        }
        Ok(())
    }

    fn close_stdin(&self) {
        // Once: closing twice does nothing.
        if self.stdin_open.swap(false, Ordering::SeqCst)
            && !self.shared.ended.load(Ordering::SeqCst)
        {
            let _ = self.shared.send(proto::STDIN_END, self.id, b"");
        }
    }

    fn signal(&self, signal: i32) -> Result<(), Error> {
        if self.shared.ended.load(Ordering::SeqCst) {
            return Err(self.shared.gone());
        }
        self.shared
            .send(proto::KILL, self.id, &(signal as u32).to_le_bytes())
    }
}

impl Drop for VmExecution {
    fn drop(&mut self) {
        lock(&self.shared.routes).remove(&self.id);
        if !self.finished && !self.shared.ended.load(Ordering::SeqCst) {
            let _ = self.shared.send(proto::KILL, self.id, b"");
        }
    }
}
