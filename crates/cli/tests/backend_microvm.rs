//! The micro-VM backend (`--backend microvm`): each sandbox a QEMU
//! `microvm` guest with nanoclaw's native engine inside. Through the trait
//! objects only: the scenario every backend goes through
//! (`crates/sandbox/tests/backend_scenario`), then what is particular to a
//! VM, on one booted VM to keep boots few (each takes seconds under TCG):
//! the guest's own kernel, exit codes and signals, a pids limit firing
//! inside the guest, the timeout, the output limit, binary-safe output and
//! stdin, a read-only shared directory, nothing left
//! behind — also when the process holding the VM is SIGKILLed — and
//! fields it cannot honour refused by name.
//!
//! Detached VMs (held by `nanoclaw __microvm-holder`) are driven through
//! the CLI: [`microvm_detached_through_the_cli`].
//!
//! Needs root, QEMU, a virtiofsd and the pinned kernel
//! (`.ci/microvm-kernel.sh`); skipped with a message otherwise, required
//! with `NANOCLAW_REQUIRE_MICROVM=1` (CI).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nanoclaw_microvm::{MicroVm, MicroVmOptions};
use nanoclaw_sandbox::backend::{Backend, LiveSandbox, SandboxConfig};
use nanoclaw_sandbox::native::session::ExecSpec;
use nanoclaw_sandbox::spec::{Access, Mount, Network, Stdin};
use nanoclaw_sandbox::{Error, KillReason, SandboxSpec};

#[path = "../../sandbox/tests/backend_scenario/mod.rs"]
mod backend_scenario;

/// Set in the child that holds a VM until it is killed.
const HOLDER: &str = "NANOCLAW_MICROVM_HOLDER";

fn options() -> MicroVmOptions {
    MicroVmOptions::new(env!("CARGO_BIN_EXE_nanoclaw")).expect("options")
}

/// The backend, or `None` (skipped) where this host cannot run it.
fn backend(test: &str) -> Option<MicroVm> {
    match MicroVm::new(options()) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var("NANOCLAW_REQUIRE_MICROVM").as_deref() != Ok("1"),
                "NANOCLAW_REQUIRE_MICROVM=1 but the micro-VM backend cannot run here: {e}"
            );
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", script])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn alive(pid: i32) -> bool {
    nanoclaw_microvm::procs::start_time(pid).is_some()
}

/// Waits up to `patience` until none of `pids` runs.
fn all_gone(pids: &[i32], patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while pids.iter().any(|p| alive(*p)) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn microvm_backend() {
    let Some(vm) = backend("microvm_backend") else {
        return;
    };
    let _one = serial();
    println!("backend: {}", vm.describe());
    refuses_what_it_cannot_honour(&vm);
    if let Err(e) = backend_scenario::run(&vm, "root") {
        panic!("backend microvm (root): FAIL {e}");
    }
    one_vm(&vm);
}

fn refuses_what_it_cannot_honour(vm: &MicroVm) {
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.network = Network::Allowlist {
        hosts: vec!["example.com".into()],
        cidrs: vec![],
        limits: Default::default(),
        add_hosts: vec![],
    };
    let e = vm
        .create(&SandboxConfig::new(spec))
        .err()
        .expect("an allowlist is refused");
    assert!(
        matches!(&e, Error::NotSupported { .. })
            && e.to_string()
                .starts_with("--backend microvm: --network allowlist is not supported"),
        "{e}"
    );
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.mounts.push(Mount {
        source: "/etc/hostname".into(),
        target: "/x".into(),
        access: Access::Ro,
    });
    let e = vm
        .create(&SandboxConfig::new(spec))
        .err()
        .expect("a file mount is refused");
    assert!(e.to_string().contains("shares directories only"), "{e}");
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.mounts.push(Mount {
        source: "/tmp".into(),
        target: "/x".into(),
        access: Access::Rw,
    });
    let e = vm
        .create(&SandboxConfig::new(spec))
        .err()
        .expect("a rw mount is refused");
    assert!(
        e.to_string()
            .starts_with("--backend microvm: a read-write --mount is not supported"),
        "{e}"
    );
    println!("ok   refused by name: {e}");
}

/// One check of the shared VM (panics on failure).
type Check = fn(&dyn LiveSandbox);

/// Everything particular to a VM, on one VM.
fn one_vm(vm: &MicroVm) {
    let ro = std::env::temp_dir().join(format!("nanoclaw-microvm-ro-{}", std::process::id()));
    std::fs::create_dir_all(&ro).expect("share dir");
    std::fs::write(ro.join("data"), b"from the host\n").expect("ro data");
    let mut spec = SandboxSpec::new(Vec::<String>::new());
    spec.limits.memory = Some(256 << 20);
    spec.limits.pids = Some(32);
    spec.limits.timeout = Duration::from_secs(300);
    spec.mounts.push(Mount {
        source: ro.clone(),
        target: "/data".into(),
        access: Access::Ro,
    });
    let t0 = Instant::now();
    let sb = vm.create(&SandboxConfig::new(spec)).expect("create a VM");
    println!("ok   boot to ready: {:?}", t0.elapsed());
    let info = sb.info();
    let dir = Path::new("/run/nanoclaw/microvm").join(&info.id);
    assert!(dir.is_dir(), "the VM's state directory {}", dir.display());
    assert_eq!(info.host_pids.len(), 3, "qemu and two virtiofsd: {info:?}");
    let checks: [(&str, Check); 7] = [
        ("its own kernel, two walls", own_kernel),
        ("exit codes and signals", exit_codes),
        ("a pids limit fires inside the guest", pids_limit),
        ("timeout and output limit", timeout_and_output_limit),
        ("binary-safe stdout, stderr and stdin", binary_safe),
        ("a read-only shared directory", share),
        ("usage reported", usage),
    ];
    for (what, f) in checks {
        let t0 = Instant::now();
        f(&*sb);
        println!("ok   {what} ({:?})", t0.elapsed());
    }
    sb.destroy().expect("destroy");
    assert!(
        all_gone(&info.host_pids, Duration::from_secs(5)),
        "VM processes left: {info:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(sb.exec(&sh("true")).is_err(), "exec after destroy");
    assert_eq!(
        std::fs::read(ro.join("data")).expect("data"),
        b"from the host\n"
    );
    let _ = std::fs::remove_dir_all(&ro);
    println!("ok   destroy leaves no process, socket or directory");
}

fn run(sb: &dyn LiveSandbox, spec: &ExecSpec) -> nanoclaw_sandbox::Outcome {
    sb.exec(spec)
        .unwrap_or_else(|e| panic!("{:?}: {e}", spec.command))
}

fn own_kernel(sb: &dyn LiveSandbox) {
    let o = run(
        sb,
        &sh("uname -r; id -u; cat /proc/self/status | grep -E '^(Seccomp|NoNewPrivs):'"),
    );
    let out = text(&o.stdout);
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(nanoclaw_microvm::kernel::RELEASE),
        "{out}"
    );
    assert_eq!(lines.next(), Some("1000"), "not root inside: {out}");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("NoNewPrivs:\t1"),
        "the native walls inside: {out}"
    );
    assert!(
        o.layers.mode.starts_with("microvm (qemu, "),
        "{:?}",
        o.layers
    );
    assert!(!o.layers.namespaces.is_empty(), "{:?}", o.layers);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert_ne!(
        host.trim(),
        nanoclaw_microvm::kernel::RELEASE,
        "the guest kernel is not the host's"
    );
    // The guest's /usr is the host's, read-only.
    let o = run(
        sb,
        &sh("test -x /usr/bin/python3 && touch /usr/x 2>&1; echo $?"),
    );
    assert!(text(&o.stdout).trim_end().ends_with('1'), "{o:?}");
}

fn exit_codes(sb: &dyn LiveSandbox) {
    let o = run(sb, &sh("echo out; echo err >&2; exit 7"));
    assert_eq!(
        (o.exit_code, text(&o.stdout), text(&o.stderr)),
        (Some(7), "out\n".into(), "err\n".into())
    );
    let o = run(sb, &sh("kill -TERM $$"));
    assert_eq!((o.exit_code, o.signal), (None, Some(15)), "{o:?}");
    let o = run(sb, &ExecSpec::new(["no-such-command"]));
    assert_eq!(o.exit_code, Some(127), "{o:?}");
}

fn pids_limit(sb: &dyn LiveSandbox) {
    // 32 tasks at most: 40 background sleeps hit the limit inside the guest.
    // (A memory limit's OOM kill ends a native sandbox as a whole, its
    // init included — memory.oom.group — so it is not tried on the VM
    // the other checks share.)
    let o = run(
        sb,
        &sh("for i in $(seq 40); do sleep 1 & done 2>/dev/null; wait; echo waited"),
    );
    assert_eq!(o.killed_by, Some(KillReason::Pids), "{o:?}");
    let o = run(sb, &sh("echo still fine"));
    assert_eq!(text(&o.stdout), "still fine\n");
}

fn timeout_and_output_limit(sb: &dyn LiveSandbox) {
    // Well past what starting a command takes here (seconds under TCG).
    let t0 = Instant::now();
    run(sb, &sh("true"));
    let mut e = sh("echo started; sleep 60");
    e.timeout = Duration::from_millis(1500).max(t0.elapsed() * 4);
    let o = run(sb, &e);
    assert_eq!(o.killed_by, Some(KillReason::Timeout), "{o:?}");
    assert_eq!(text(&o.stdout), "started\n");
    let mut e = sh("head -c 100000 /dev/zero; echo done >&2");
    e.output_limit = 1000;
    let o = run(sb, &e);
    assert_eq!(o.stdout.len(), 1000, "{o:?}");
    assert!(o.stdout_truncated, "{o:?}");
}

fn binary_safe(sb: &dyn LiveSandbox) {
    let all: Vec<u8> = (0..=255u8).cycle().take(3 * 256 + 7).collect();
    let mut e = ExecSpec::new(["cat"]);
    e.stdin = Stdin::Bytes(all.clone());
    let o = run(sb, &e);
    assert_eq!(o.stdout, all, "stdin to stdout, byte for byte");
    let mut e = sh("cat >&2");
    e.stdin = Stdin::Bytes(all.clone());
    assert_eq!(run(sb, &e).stderr, all, "stdin to stderr");
    // Larger than one frame (1 MiB), through put_file and get_file.
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    sb.put_file("/tmp/big", big.clone(), None)
        .expect("put_file");
    assert_eq!(sb.get_file("/tmp/big").expect("get_file"), big);
}

fn share(sb: &dyn LiveSandbox) {
    let o = run(sb, &sh("cat /data/data; echo x > /data/nope"));
    assert_eq!(text(&o.stdout), "from the host\n", "{o:?}");
    assert!(text(&o.stderr).contains("Read-only file system"), "{o:?}");
}

fn usage(sb: &dyn LiveSandbox) {
    // A long-lived native sandbox reports usage for the sandbox (its
    // cgroup), not per command: the guest's numbers come through stats.
    let o = run(
        sb,
        &ExecSpec::new([
            "python3",
            "-c",
            "b = bytearray(20 << 20); sum(range(2000000))",
        ]),
    );
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    let st = sb.stats().expect("stats");
    assert!(st.memory_bytes.is_some_and(|m| m > 0), "{st:?}");
    assert!(st.cpu.is_some_and(|c| c > Duration::ZERO), "{st:?}");
    assert!(st.tasks.is_some_and(|t| t > 0), "{st:?}");
}

/// The child of `killed_owner_leaves_nothing`: makes a VM, says where it
/// is, waits to be killed.
fn hold() {
    let vm = MicroVm::new(options()).expect("backend in the holder");
    let sb = vm
        .create(&SandboxConfig::new(SandboxSpec::new(Vec::<String>::new())))
        .expect("create");
    let info = sb.info();
    let pids: Vec<String> = info.host_pids.iter().map(|p| p.to_string()).collect();
    println!("\nHOLDING {} {}", info.id, pids.join(","));
    std::thread::sleep(Duration::from_secs(600));
}

/// SIGKILL of the process holding a VM: its VMM and virtiofsd die with it,
/// and the next backend sweeps its state directory.
#[test]
fn microvm_killed_owner_leaves_nothing() {
    if std::env::var_os(HOLDER).is_some() {
        return hold();
    }
    if backend("microvm_killed_owner_leaves_nothing").is_none() {
        return;
    }
    let _one = serial();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "microvm_killed_owner_leaves_nothing",
            "--nocapture",
        ])
        .env(HOLDER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let held = loop {
        line.clear();
        if out.read_line(&mut line).expect("holder output") == 0 {
            let _ = child.wait();
            panic!("the holder ended without a VM");
        }
        if let Some((_, rest)) = line.split_once("HOLDING ") {
            break rest.to_string();
        }
    };
    let mut f = held.split_whitespace();
    let id = f.next().expect("id").to_string();
    let pids: Vec<i32> = f
        .next()
        .expect("pids")
        .split(',')
        .map(|p| p.parse().expect("pid"))
        .collect();
    let dir = PathBuf::from("/run/nanoclaw/microvm").join(&id);
    assert!(
        pids.iter().all(|p| alive(*p)) && dir.is_dir(),
        "{pids:?} {}",
        dir.display()
    );
    child.kill().expect("SIGKILL the holder");
    let _ = child.wait();
    assert!(
        all_gone(&pids, Duration::from_secs(10)),
        "the VM outlived its owner: {pids:?}"
    );
    assert!(dir.is_dir(), "nothing removed it yet (the sweep does)");
    let _again = MicroVm::new(options()).expect("backend");
    assert!(!dir.exists(), "the next backend swept {}", dir.display());
    println!("ok   a SIGKILLed owner's VM dies with it; its state is swept at the next start");
}

/// One VM-booting test at a time (each boot takes seconds of both cores
/// under TCG; the sweeps of one must not meet the VMs of another).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const BIN: &str = env!("CARGO_BIN_EXE_nanoclaw");

/// `nanoclaw ARGS` (stdin empty), its output.
fn nanoclaw(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("nanoclaw")
}

/// `nanoclaw ARGS` that must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let o = nanoclaw(args);
    assert!(
        o.status.success(),
        "nanoclaw {args:?}: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// What a holder records next to its VM: (holder pid, [qemu and
/// virtiofsd pids]).
fn held_pids(id: &str) -> (i32, Vec<i32>) {
    let path = Path::new("/run/nanoclaw/microvm")
        .join(id)
        .join("holder.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("holder.json")).expect("json");
    let holder = v["holder"][0].as_i64().expect("holder pid") as i32;
    let vm: Vec<i32> = v["vm_pids"]
        .as_array()
        .expect("vm_pids")
        .iter()
        .map(|p| p.as_i64().expect("pid") as i32)
        .collect();
    (holder, vm)
}

fn listed(id: &str) -> bool {
    let out = ok(&["sandbox", "ls", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).expect("ls --json");
    all.iter()
        .any(|s| s["id"] == id && s["backend"] == "microvm")
}

/// A detached micro-VM through the CLI, as every backend's: `sandbox
/// create --backend microvm` returns while the VM lives on in its holder;
/// `exec` many times (exit codes, both streams, stdin, state kept, a
/// timeout, two at once from two processes); `ls`, `inspect`, `pause`;
/// `rm` leaves no process or directory. A second VM's holder SIGKILLed:
/// QEMU and virtiofsd die with it, `prune` removes its directory. A third
/// ends by itself at the end of its lifetime.
#[test]
fn microvm_detached_through_the_cli() {
    if backend("microvm_detached_through_the_cli").is_none() {
        return;
    }
    let _one = serial();
    let name = format!("vmcli-{}", std::process::id());
    // Refused by name before anything is made.
    let o = nanoclaw(&[
        "sandbox",
        "create",
        "--backend",
        "microvm",
        "--idle-timeout",
        "5m",
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--backend microvm: --idle-timeout is not supported"),
        "{}",
        text(&o.stderr)
    );

    let t0 = Instant::now();
    let id = ok(&[
        "sandbox",
        "create",
        "--backend",
        "microvm",
        "--name",
        &name,
        "--lifetime",
        "10m",
        "--timeout",
        "120s",
    ])
    .trim()
    .to_string();
    println!(
        "ok   sandbox create --backend microvm: {id} ({:?})",
        t0.elapsed()
    );
    let dir = Path::new("/run/nanoclaw/microvm").join(&id);
    let (holder, vm_pids) = held_pids(&id);
    assert!(
        alive(holder) && vm_pids.iter().all(|p| alive(*p)),
        "{vm_pids:?}"
    );
    assert!(listed(&id), "sandbox ls shows {id}");

    let o = nanoclaw(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(
        (o.status.code(), text(&o.stdout), text(&o.stderr)),
        (Some(7), "out\n".into(), "err\n".into())
    );
    assert_eq!(
        ok(&["exec", &id, "--", "uname", "-r"]).trim(),
        nanoclaw_microvm::kernel::RELEASE
    );
    ok(&["exec", &id, "--", "sh", "-c", "echo kept > /tmp/state"]);
    assert_eq!(ok(&["exec", &name, "--", "cat", "/tmp/state"]), "kept\n");
    let mut cat = Command::new(BIN)
        .args(["exec", "--stdin", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec --stdin");
    {
        use std::io::Write;
        let mut input = cat.stdin.take().expect("stdin");
        input.write_all(b"\x00through\xffstdin").expect("write");
    }
    let o = cat.wait_with_output().expect("exec --stdin");
    assert_eq!(o.stdout, b"\x00through\xffstdin");
    let o = nanoclaw(&[
        "exec",
        "--timeout",
        "2s",
        &id,
        "--",
        "sh",
        "-c",
        "echo started; sleep 60",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "started\n");
    // Two clients at once: the holder relays both.
    let slow = Command::new(BIN)
        .args([
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "cat /tmp/state; sleep 2; echo slow",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("slow exec");
    assert_eq!(ok(&["exec", &id, "--", "echo", "fast"]), "fast\n");
    let o = slow.wait_with_output().expect("slow exec");
    assert_eq!(text(&o.stdout), "kept\nslow\n");
    let outcome: serde_json::Value =
        serde_json::from_str(&ok(&["exec", "--json", &id, "--", "true"])).expect("json");
    assert_eq!(outcome["sandbox_id"], id.as_str());
    assert!(
        outcome["layers"]["mode"]
            .as_str()
            .is_some_and(|m| m.starts_with("microvm (qemu, ")),
        "{outcome}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["sandbox", "inspect", &name])).expect("inspect");
    assert_eq!(v["state"], "running", "{v}");
    ok(&["sandbox", "pause", &id]);
    let o = nanoclaw(&["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "exec into a paused VM");
    ok(&["sandbox", "resume", &id]);
    assert_eq!(ok(&["exec", &id, "--", "echo", "again"]), "again\n");
    println!(
        "ok   exec many times, two at once, stdin, timeout, inspect, pause ({:?})",
        t0.elapsed()
    );

    assert_eq!(ok(&["sandbox", "rm", &name]).trim(), id);
    let mut all = vm_pids.clone();
    all.push(holder);
    assert!(
        all_gone(&all, Duration::from_secs(30)),
        "left running: {all:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!listed(&id));
    let o = nanoclaw(&["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "exec after rm");
    println!("ok   sandbox rm leaves no holder, QEMU, virtiofsd, socket or directory");

    // The holder SIGKILLed: its VM dies with it; prune removes the rest.
    let id = ok(&[
        "sandbox",
        "create",
        "--backend",
        "microvm",
        "--lifetime",
        "10m",
    ])
    .trim()
    .to_string();
    let dir = Path::new("/run/nanoclaw/microvm").join(&id);
    let (holder, vm_pids) = held_pids(&id);
    assert!(alive(holder));
    // SAFETY: kill has no memory effects; the holder runs (checked above).
    unsafe { libc::kill(holder, libc::SIGKILL) };
    assert!(
        all_gone(&vm_pids, Duration::from_secs(30)),
        "QEMU or virtiofsd outlived their holder: {vm_pids:?}"
    );
    assert!(dir.is_dir(), "nothing removed {} yet", dir.display());
    ok(&["sandbox", "prune", "--older-than", "100000h"]);
    assert!(!dir.exists(), "prune swept {}", dir.display());
    assert!(!listed(&id));
    println!("ok   a SIGKILLed holder takes its VM along; prune removes its directory");

    // The end of its lifetime ends it, with nothing left.
    let t0 = Instant::now();
    let id = ok(&[
        "sandbox",
        "create",
        "--backend",
        "microvm",
        "--lifetime",
        "20s",
    ])
    .trim()
    .to_string();
    let dir = Path::new("/run/nanoclaw/microvm").join(&id);
    let (holder, mut all) = held_pids(&id);
    all.push(holder);
    assert_eq!(ok(&["exec", &id, "--", "echo", "alive"]), "alive\n");
    assert!(
        all_gone(&all, Duration::from_secs(20 + 120)),
        "still running past its lifetime: {all:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!listed(&id));
    println!("ok   the lifetime ends a detached VM ({:?})", t0.elapsed());
}

/// The containment suite (tests/containment/run.py) inside one detached
/// micro-VM: each attack is a `nanoclaw exec ID -- python3 -c ATTACK`
/// into the VM's sandbox (created with `--pids 64 --memory 64m`), judged
/// by the same rules as the native engine's run (no capabilities,
/// read-only root, no host files or processes, seccomp, Landlock, the
/// pids limit…). `landlock` is left out: its walk of the host's `/usr`
/// (180,000 entries) exhausts the descriptors of the VM's virtiofsd where
/// nanoclaw may not raise its limit (here: no CAP_SYS_RESOURCE), and every
/// later command of the VM then fails to read `/usr` (README: known gap).
/// A memory limit's OOM kill ends a native sandbox as a whole
/// (memory.oom.group), so `memory_hog` runs last on its own, and
/// `memfd_bomb` (the same kill) is left out.
#[test]
fn microvm_containment_suite() {
    if backend("microvm_containment_suite").is_none() {
        return;
    }
    let _one = serial();
    let id = ok(&[
        "sandbox",
        "create",
        "--backend",
        "microvm",
        "--pids",
        "64",
        "--memory",
        "64m",
        "--lifetime",
        "30m",
        "--timeout",
        "120s",
    ])
    .trim()
    .to_string();
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/containment/run.py");
    let prefix = format!("{BIN} exec {id} --");
    let run = |extra: &[&str]| {
        let out = Command::new("python3")
            .arg(&suite)
            .args(["--prefix", &prefix, "--pids-prefix", &prefix])
            .args(["--memory-prefix", &prefix])
            .args(["--pids-limit", "64", "--memory-limit", "64"])
            .args(["--protect", BIN])
            // /dev/shm is the sandbox's own tmpfs, writable like /tmp by
            // design (as in the native engine's run of the suite).
            .args(["--allow-write", "/tmp", "--allow-write", "/dev/shm"])
            .args(extra)
            .current_dir(std::env::temp_dir())
            .output()
            .expect("python3 run.py");
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        print!(
            "{}",
            all.lines()
                .filter(|l| !l.starts_with("CONTAINED"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        (out.status.success(), all)
    };
    let (passed, all) = run(&["--skip", "landlock,memory_hog,memfd_bomb"]);
    let (hog_passed, hog) = run(&["--only", "memory_hog"]);
    let _ = nanoclaw(&["sandbox", "rm", "-f", &id]);
    assert!(passed, "the containment suite in a micro-VM:\n{all}");
    assert!(hog_passed, "memory_hog in a micro-VM:\n{hog}");
    let contained = all.lines().filter(|l| l.starts_with("CONTAINED")).count();
    assert!(contained >= 20, "{contained} CONTAINED:\n{all}");
    println!("ok   containment suite in one micro-VM: {contained} CONTAINED + memory_hog");
}
