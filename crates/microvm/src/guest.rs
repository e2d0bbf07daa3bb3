//! The guest agent: nanoclaw's own binary as the VM's `/init`.
//!
//! It mounts what a Linux system needs (`/proc`, `/sys`, `/dev`, cgroup
//! v2), loads the kernel modules the initramfs carries (virtio over MMIO,
//! the virtio console, virtiofs), mounts the host's `/usr` (virtiofs,
//! read-only), opens the virtio-serial port named `nanoclaw` and serves
//! the host ([`crate::proto`]): it creates the sandbox with the native
//! engine — a keeper (`/init __keeper`), exactly as `--backend native`
//! does on a host — and runs each command through it, streaming output
//! back. When the host hangs up or asks, it powers the VM off.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::backend::{Backend, LiveSandbox, NativeKeeper, SandboxConfig};
use nanoclaw_sandbox::keeper::{KeeperError, Remote};
use nanoclaw_sandbox::native::session::{self, ExecSpec, RunState};
use nanoclaw_sandbox::spec::{Stdin, User};

use crate::proto::{self, Frame, WireError};

/// Where the guest keeps its keepers' state.
const STATE_ROOT: &str = "/run/nanoclaw/sandboxes";
/// The control port's name (QEMU's `virtserialport,name=`).
const PORT_NAME: &str = "nanoclaw";

/// Whether this process is the guest agent: pid 1, started as `/init`.
pub fn is_guest_init() -> bool {
    std::process::id() == 1 && std::env::args_os().next().is_some_and(|a| a == "/init")
}

/// Runs the agent; never returns (the VM powers off).
pub fn main() -> ! {
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    match setup() {
        Ok(port) => {
            if let Err(e) = serve(port) {
                eprintln!("nanoclaw-agent: {e}");
            }
        }
        Err(e) => eprintln!("nanoclaw-agent: setup failed: {e}"),
    }
    power_off()
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; pid 1 may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Only reached if reboot failed: pid 1 exiting panics the kernel,
    // which (panic=-1, QEMU's -no-reboot) ends the VM too.
    std::process::exit(1)
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} has a NUL byte"))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: every pointer is a valid C string that outlives the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Loads the module file `path` (already loaded is fine).
fn load_module(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let params = cstr("")?;
    // SAFETY: finit_module reads the open file and the empty parameter
    // string; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
        return Err(format!("loading {}: {err}", path.display()));
    }
    Ok(())
}

/// Copies the tree `from` into `to` (directories, files, symlinks).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            std::fs::create_dir_all(&dst)?;
            std::fs::set_permissions(&dst, std::fs::metadata(&src)?.permissions())?;
            copy_tree(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if t.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Moves the root from the initramfs (the kernel's `rootfs`, which
/// `pivot_root` refuses: the native engine pivots into every sandbox) to
/// a tmpfs, as `switch_root` does: copy, free the originals, move the
/// mount onto `/`, chroot into it.
fn leave_rootfs() -> Result<(), String> {
    const NEW: &str = "/newroot";
    mount("tmpfs", NEW, "tmpfs", 0, "mode=0755")?;
    let skip = ["newroot", "dev", "proc", "sys"];
    for e in std::fs::read_dir("/")
        .map_err(|e| format!("reading /: {e}"))?
        .flatten()
    {
        let name = e.file_name();
        if skip.iter().any(|s| name == *s) {
            let _ = std::fs::create_dir_all(Path::new(NEW).join(&name));
            continue;
        }
        let dst = Path::new(NEW).join(&name);
        let copied = match e.file_type() {
            Ok(t) if t.is_dir() => {
                std::fs::create_dir_all(&dst).and_then(|()| copy_tree(&e.path(), &dst))
            }
            Ok(t) if t.is_symlink() => {
                std::fs::read_link(e.path()).and_then(|l| std::os::unix::fs::symlink(l, &dst))
            }
            Ok(_) => std::fs::copy(e.path(), &dst).map(drop),
            Err(e) => Err(e),
        };
        copied.map_err(|err| format!("copying /{}: {err}", name.to_string_lossy()))?;
    }
    // The originals' memory back (the running agent keeps its own pages).
    let _ = std::fs::remove_file("/init");
    let _ = std::fs::remove_dir_all("/modules");
    let (new, root, dot) = (cstr(NEW)?, cstr("/")?, cstr(".")?);
    // SAFETY: every pointer is a valid C string that outlives the calls.
    let rc = unsafe {
        if libc::chdir(new.as_ptr()) != 0
            || libc::mount(
                dot.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) != 0
            || libc::chroot(dot.as_ptr()) != 0
        {
            -1
        } else {
            libc::chdir(root.as_ptr())
        }
    };
    if rc != 0 {
        return Err(format!(
            "moving the root to a tmpfs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The guest's mounts and modules; the control port, open.
fn setup() -> Result<File, String> {
    leave_rootfs()?;
    let nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("proc", "/proc", "proc", nodev | libc::MS_NOEXEC, "")?;
    mount("sysfs", "/sys", "sysfs", nodev | libc::MS_NOEXEC, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", nodev, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", nodev, "mode=0755")?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nodev | libc::MS_NOEXEC,
        "",
    )?;
    let _ = std::fs::write(
        "/sys/fs/cgroup/cgroup.subtree_control",
        "+cpu +memory +pids",
    );
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        nodev | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", nodev, "mode=1777")?;
    for (name, _) in crate::kernel::MODULES {
        load_module(&Path::new("/modules").join(name))?;
    }
    // The host's /usr: the guest's /bin, /lib, /lib64, /sbin point into it.
    mount_virtiofs("usr", Path::new("/usr"), true)?;
    open_port()
}

/// Mounts the virtiofs share `tag` at `path` (its device may still be
/// probing just after the module loaded).
fn mount_virtiofs(tag: &str, path: &Path, readonly: bool) -> Result<(), String> {
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if readonly {
        flags |= libc::MS_RDONLY;
    }
    let target = path.to_str().ok_or("a share path that is not UTF-8")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match mount(tag, target, "virtiofs", flags, "") {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The virtio-serial port named `nanoclaw` (devtmpfs makes `/dev/vportNpM`).
fn open_port() -> Result<File, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for e in std::fs::read_dir("/sys/class/virtio-ports")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            if name.trim() == PORT_NAME {
                let dev = Path::new("/dev").join(e.file_name());
                return std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&dev)
                    .map_err(|e| format!("{}: {e}", dev.display()));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no virtio-serial port named {PORT_NAME}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the agent's threads share.
struct Ctx {
    port: Mutex<File>,
    /// Host exec id → the keeper connection and the guest's exec id, while
    /// the command runs; `None` while it is starting.
    running: Mutex<HashMap<u32, Option<(UnixStream, u32)>>>,
    /// Host exec ids killed before they started.
    doomed: Mutex<Vec<u32>>,
    /// Host exec id → the writer of a command started with its stdin open
    /// (`stream_stdin`), until `STDIN_END` or the command's end.
    stdins: Mutex<HashMap<u32, Sender<Vec<u8>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    fn send(&self, kind: u8, id: u32, payload: &[u8]) {
        if let Err(e) = proto::write_frame(&mut *lock(&self.port), kind, id, payload) {
            eprintln!("nanoclaw-agent: writing to the host: {e}");
        }
    }

    fn send_json(&self, kind: u8, id: u32, value: &impl serde::Serialize) {
        match serde_json::to_vec(value) {
            Ok(v) => self.send(kind, id, &v),
            Err(e) => self.send_error(
                id,
                WireError::Other {
                    message: format!("encoding: {e}"),
                },
            ),
        }
    }

    fn send_error(&self, id: u32, e: WireError) {
        match serde_json::to_vec(&e) {
            Ok(v) => self.send(proto::ERROR, id, &v),
            Err(_) => self.send(proto::ERROR, id, br#"{"kind":"other","message":"?"}"#),
        }
    }

    /// Signals command `id` (SIGKILL: its whole process group, as the
    /// keeper does); a SIGKILL for a command not started yet keeps it from
    /// starting.
    fn kill(&self, id: u32, sig: i32) {
        match lock(&self.running).get(&id) {
            Some(Some((conn, exec))) => {
                let mut c: &UnixStream = conn;
                let _ = c.write_all(&session::kill_frame(*exec, sig));
            }
            Some(None) if sig == libc::SIGKILL => lock(&self.doomed).push(id),
            _ => {}
        }
    }
}

fn keeper_wire(e: KeeperError) -> WireError {
    match e {
        KeeperError::Engine(e) => WireError::from_engine(&e),
        KeeperError::NotFound(id) => WireError::NotFound {
            what: format!("its keeper {id} is gone"),
        },
        KeeperError::Invalid(m) if m.contains(" is paused") => WireError::Paused,
        KeeperError::Invalid(message) => WireError::Invalid { message },
        other => WireError::Other {
            message: other.to_string(),
        },
    }
}

/// A command waiting for its stdin.
struct Pending {
    req: proto::Spawn,
    stdin: Vec<u8>,
}

/// The sandbox, once created.
struct Made {
    sandbox: Box<dyn LiveSandbox>,
    remote: Arc<Remote>,
}

fn serve(port: File) -> Result<(), String> {
    let mut reader = port
        .try_clone()
        .map_err(|e| format!("dup of the port: {e}"))?;
    let ctx = Arc::new(Ctx {
        port: Mutex::new(port),
        running: Mutex::new(HashMap::new()),
        doomed: Mutex::new(Vec::new()),
        stdins: Mutex::new(HashMap::new()),
    });
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| {
            u.split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
        })
        .map_or(0, |s| (s * 1000.0) as u64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ctx.send_json(
        proto::HELLO,
        0,
        &proto::Hello {
            kernel: kernel.trim().to_string(),
            uptime_ms,
        },
    );
    let mut made: Option<Made> = None;
    let mut pending: HashMap<u32, Pending> = HashMap::new();
    loop {
        let frame = match proto::read_frame(&mut reader) {
            Ok(Some(f)) => f,
            // The host hung up (or died): the VM ends.
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("reading from the host: {e}")),
        };
        match frame.kind {
            proto::CREATE => match create(&frame) {
                Ok((m, ready)) => {
                    made = Some(m);
                    ctx.send_json(proto::READY, 0, &ready);
                }
                Err(e) => ctx.send_error(0, e),
            },
            proto::SPAWN => match serde_json::from_slice::<proto::Spawn>(&frame.payload) {
                Ok(req) if req.stdin && req.stream_stdin => {
                    // Started now; its stdin comes through this channel.
                    let (tx, rx) = channel();
                    lock(&ctx.stdins).insert(frame.id, tx);
                    let p = Pending {
                        req,
                        stdin: Vec::new(),
                    };
                    start(&ctx, made.as_ref(), frame.id, p, Some(rx));
                }
                Ok(req) => {
                    pending.insert(
                        frame.id,
                        Pending {
                            req,
                            stdin: Vec::new(),
                        },
                    );
                }
                Err(e) => ctx.send_error(
                    frame.id,
                    WireError::Invalid {
                        message: format!("the command: {e}"),
                    },
                ),
            },
            proto::STDIN => {
                if let Some(p) = pending.get_mut(&frame.id) {
                    p.stdin.extend_from_slice(&frame.payload);
                } else if let Some(tx) = lock(&ctx.stdins).get(&frame.id) {
                    // A command that has ended drops its end: nothing to do.
                    let _ = tx.send(frame.payload);
                }
            }
            proto::STDIN_END => {
                // A running command's open stdin: dropping the sender
                // closes it once what was sent before is written.
                if lock(&ctx.stdins).remove(&frame.id).is_some() {
                    continue;
                }
                let Some(p) = pending.remove(&frame.id) else {
                    continue;
                };
                start(&ctx, made.as_ref(), frame.id, p, None);
            }
            proto::KILL => ctx.kill(frame.id, proto::kill_signal(&frame.payload)),
            proto::STATS | proto::PAUSE | proto::RESUME => control(&ctx, &frame, made.as_ref()),
            proto::SHUTDOWN => return Ok(()),
            k => eprintln!("nanoclaw-agent: unknown frame kind {k} ignored"),
        }
    }
}

/// Starts command `id` on a thread of its own (`stdin`: the channel its
/// open stdin is fed from, for `stream_stdin`).
fn start(
    ctx: &Arc<Ctx>,
    made: Option<&Made>,
    id: u32,
    p: Pending,
    stdin: Option<Receiver<Vec<u8>>>,
) {
    let Some(m) = made else {
        lock(&ctx.stdins).remove(&id);
        ctx.send_error(id, no_sandbox_yet());
        return;
    };
    lock(&ctx.running).insert(id, None);
    let (ctx, remote) = (ctx.clone(), m.remote.clone());
    let started = std::thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || {
            run(&ctx, &remote, id, p, stdin);
            lock(&ctx.stdins).remove(&id);
        });
    if let Err(e) = started {
        eprintln!("nanoclaw-agent: a thread for exec {id}: {e}");
    }
}

/// Writes what comes through `rx` to a command's stdin pipe `w`, in order,
/// and closes it when the sender is gone (`STDIN_END`, or the command's
/// end). A command that stops reading blocks this thread only; one that
/// has exited makes the write fail, and the rest is dropped.
fn feed_stdin(w: OwnedFd, rx: Receiver<Vec<u8>>) {
    let spawned = std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || {
            let mut f = File::from(w);
            for chunk in rx {
                if f.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("nanoclaw-agent: a stdin thread: {e}");
    }
}

/// The answer to a request that needs the sandbox before CREATE made it.
fn no_sandbox_yet() -> WireError {
    WireError::Invalid {
        message: "no sandbox yet".into(),
    }
}

fn create(frame: &Frame) -> Result<(Made, proto::Ready), WireError> {
    let req: proto::Create =
        serde_json::from_slice(&frame.payload).map_err(|e| WireError::Invalid {
            message: format!("the configuration: {e}"),
        })?;
    for s in &req.shares {
        mount_virtiofs(&s.tag, &s.path, s.readonly)
            .map_err(|message| WireError::Other { message })?;
    }
    let backend = NativeKeeper::new("/init", STATE_ROOT).map_err(|e| WireError::from_engine(&e))?;
    let sandbox = backend
        .create(&SandboxConfig::new(req.spec))
        .map_err(|e| WireError::from_engine(&e))?;
    let info = sandbox.info();
    let remote = Arc::new(Remote::new(
        &info.id,
        &PathBuf::from(STATE_ROOT).join(&info.id),
    ));
    Ok((
        Made { sandbox, remote },
        proto::Ready {
            guest_id: info.id,
            layers: info.layers,
        },
    ))
}

fn control(ctx: &Ctx, frame: &Frame, made: Option<&Made>) {
    let Some(m) = made else {
        return ctx.send_error(0, no_sandbox_yet());
    };
    let done = match frame.kind {
        proto::PAUSE => m.sandbox.pause().map(|()| b"{}".to_vec()),
        proto::RESUME => m.sandbox.resume().map(|()| b"{}".to_vec()),
        _ => m.sandbox.stats().map(|st| {
            let s = proto::Stats {
                state: if st.state == RunState::Paused {
                    "paused"
                } else {
                    "running"
                }
                .into(),
                memory_bytes: st.memory_bytes,
                cpu_ms: st.cpu.map(|d| d.as_millis() as u64),
                tasks: st.tasks,
                can_pause: st.can_pause,
                execs: st.execs,
            };
            serde_json::to_vec(&s).unwrap_or_default()
        }),
    };
    match done {
        Ok(v) => ctx.send(proto::REPLY, 0, &v),
        Err(e) => ctx.send_error(0, WireError::from_engine(&e)),
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies a command's output pipe to the host as `kind` frames.
fn forward(ctx: Arc<Ctx>, id: u32, kind: u8, from: OwnedFd) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = File::from(from);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => ctx.send(kind, id, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Runs one command through the keeper, streaming its output (and its
/// stdin from `stdin_rx`, when it was started with its stdin open).
fn run(ctx: &Arc<Ctx>, remote: &Remote, id: u32, p: Pending, stdin_rx: Option<Receiver<Vec<u8>>>) {
    let mut spec = ExecSpec::new(p.req.command);
    spec.env = p.req.env;
    spec.workdir = p.req.workdir;
    spec.user = p.req.user.map(|(uid, gid)| User { uid, gid });
    spec.stdin = match &stdin_rx {
        Some(_) => Stdin::Open,
        None if p.req.stdin => Stdin::Bytes(p.stdin),
        None => Stdin::Null,
    };
    spec.timeout = Duration::from_millis(p.req.timeout_ms);
    spec.output_limit = p.req.output_limit;
    let started = Instant::now();
    let fail = |e: WireError| {
        lock(&ctx.running).remove(&id);
        ctx.send_error(id, e);
    };
    if spec.command.is_empty() {
        return fail(WireError::Invalid {
            message: "an empty command".into(),
        });
    }
    let mut rs = match remote.spawn(&spec, !matches!(spec.stdin, Stdin::Null)) {
        Ok(rs) => rs,
        Err(e) => return fail(keeper_wire(e)),
    };
    // The open stdin's pipe goes to its feeder (the waiter below would
    // close it: an `Open` stdin is not its to write).
    if let Some(rx) = stdin_rx {
        if let Some(w) = rs.spawned.stdin.take() {
            feed_stdin(w, rx);
        }
    }
    match rs.conn.try_clone() {
        Ok(conn) => {
            lock(&ctx.running).insert(id, Some((conn, rs.spawned.id)));
        }
        Err(e) => {
            return fail(WireError::Other {
                message: format!("dup: {e}"),
            })
        }
    }
    ctx.send(proto::SPAWNED, id, b"");
    if lock(&ctx.doomed).contains(&id) {
        ctx.kill(id, libc::SIGKILL);
    }
    let ((out_r, out_w), (err_r, err_w)) = match (pipe(), pipe()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return fail(WireError::Other {
                message: format!("pipe: {e}"),
            })
        }
    };
    let readers = [
        forward(ctx.clone(), id, proto::STDOUT, out_r),
        forward(ctx.clone(), id, proto::STDERR, err_r),
    ];
    let result = rs.wait(
        &remote.id,
        &spec,
        started,
        Some((out_w.as_raw_fd(), err_w.as_raw_fd())),
    );
    drop((out_w, err_w));
    for r in readers {
        let _ = r.join();
    }
    lock(&ctx.running).remove(&id);
    lock(&ctx.doomed).retain(|d| *d != id);
    match result {
        Ok(mut o) => {
            // What the engine itself put in the outcome (e.g. "not found"
            // when the command could not start) follows the output.
            for (kind, data) in [
                (proto::STDOUT, std::mem::take(&mut o.stdout)),
                (proto::STDERR, std::mem::take(&mut o.stderr)),
            ] {
                for chunk in data.chunks(proto::MAX_PAYLOAD) {
                    ctx.send(kind, id, chunk);
                }
            }
            ctx.send_json(proto::DONE, id, &o);
        }
        Err(e) => ctx.send_error(id, keeper_wire(e)),
    }
}
