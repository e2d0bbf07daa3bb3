//! A container's cgroup counters, read from the host: what fired during a
//! command (OOM kills, the pids limit), its CPU time and the memory peak.
//! Docker reports none of these per exec, so they are read before and
//! after each one, the way the native engine does.

use std::path::{Path, PathBuf};

/// Where a container's cgroup files are (v1 controllers or v2).
#[derive(Debug, Clone, Default)]
pub struct Cgroup {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    v2: Option<PathBuf>,
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// OOM kills so far.
    pub oom_kills: u64,
    /// Forks refused by the pids limit so far.
    pub pids_max: u64,
    /// CPU time so far, in nanoseconds.
    pub cpu_ns: u64,
    /// Peak memory so far, in bytes.
    pub peak: Option<u64>,
    /// Memory charged now, in bytes.
    pub memory: Option<u64>,
    /// Tasks now.
    pub tasks: Option<u64>,
}

impl Cgroup {
    /// The cgroup of host process `pid` (the container's first process),
    /// from `/proc/PID/cgroup`. Empty when it cannot be read (a remote
    /// daemon, or the process has ended): counters then read as zero.
    pub fn of_pid(pid: i64) -> Cgroup {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return Cgroup::default();
        };
        let mut cg = Cgroup::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            let at = |c: &str| Path::new("/sys/fs/cgroup").join(c).join(rel);
            if ctrls.is_empty() {
                let p = Path::new("/sys/fs/cgroup").join(rel);
                if p.join("memory.events").exists() || p.join("pids.events").exists() {
                    cg.v2 = Some(p);
                }
            }
            for c in ctrls.split(',') {
                match c {
                    "memory" => cg.memory = Some(at("memory")),
                    "pids" => cg.pids = Some(at("pids")),
                    "cpuacct" => cg.cpu = Some(at(ctrls)),
                    _ => {}
                }
            }
        }
        cg
    }

    /// The counters now.
    pub fn read(&self) -> Counters {
        let mut c = Counters::default();
        if let Some(m) = &self.memory {
            c.oom_kills = keyed(&m.join("memory.oom_control"), "oom_kill").unwrap_or(0);
            c.peak = number(&m.join("memory.max_usage_in_bytes"));
            c.memory = number(&m.join("memory.usage_in_bytes"));
        }
        if let Some(p) = &self.pids {
            c.pids_max = keyed(&p.join("pids.events"), "max").unwrap_or(0);
            c.tasks = number(&p.join("pids.current"));
        }
        if let Some(cpu) = &self.cpu {
            c.cpu_ns = number(&cpu.join("cpuacct.usage")).unwrap_or(0);
        }
        if let Some(v2) = &self.v2 {
            if self.memory.is_none() {
                c.oom_kills = keyed(&v2.join("memory.events"), "oom_kill").unwrap_or(0);
                c.peak = number(&v2.join("memory.peak"));
                c.memory = number(&v2.join("memory.current"));
            }
            if self.pids.is_none() {
                c.pids_max = keyed(&v2.join("pids.events"), "max").unwrap_or(0);
                c.tasks = number(&v2.join("pids.current"));
            }
            if self.cpu.is_none() {
                c.cpu_ns = keyed(&v2.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000;
            }
        }
        c
    }
}

fn number(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `KEY VALUE` lines: the value of `key`.
fn keyed(p: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(p).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}
