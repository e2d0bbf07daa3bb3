//! `gvisor-run [--memory MIB] [--pids N] [--timeout SECS] -- CMD...`: one
//! command in a fresh gVisor sandbox through the library (`run_once`), its
//! output streamed, its exit code `nanoclaw run`'s. A command prefix for
//! the containment suite (`tests/containment/run.py --prefix`) that does
//! not need the CLI.

use std::os::fd::BorrowedFd;
use std::process::ExitCode;
use std::time::Duration;

use nanoclaw_gvisor::Gvisor;
use nanoclaw_sandbox::backend::Echo;
use nanoclaw_sandbox::SandboxSpec;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dash) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: gvisor-run [--memory MIB] [--pids N] [--timeout SECS] -- CMD...");
        return ExitCode::from(125);
    };
    let mut spec = SandboxSpec::new(args[dash + 1..].iter().cloned());
    let mut i = 0;
    while i + 1 < dash {
        let v: u64 = match args[i + 1].parse() {
            Ok(v) => v,
            Err(_) => {
                eprintln!("gvisor-run: {} wants a number", args[i]);
                return ExitCode::from(125);
            }
        };
        match args[i].as_str() {
            "--memory" => {
                spec.limits.memory = Some(v << 20);
                spec.limits.explicit.memory = true;
            }
            "--pids" => {
                spec.limits.pids = Some(v);
                spec.limits.explicit.pids = true;
            }
            "--timeout" => spec.limits.timeout = Duration::from_secs(v),
            other => {
                eprintln!("gvisor-run: unknown option {other}");
                return ExitCode::from(125);
            }
        }
        i += 2;
    }
    let g = match Gvisor::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gvisor-run: {e}");
            return ExitCode::from(125);
        }
    };
    // SAFETY: fds 1 and 2 stay open for this process's life.
    let echo = unsafe {
        Echo {
            stdout: BorrowedFd::borrow_raw(1),
            stderr: BorrowedFd::borrow_raw(2),
        }
    };
    match g.run_once(&spec, Some(echo)) {
        Ok(o) => {
            if let Some(k) = o.killed_by {
                eprintln!("gvisor-run: killed: {k:?}");
            }
            ExitCode::from(u8::try_from(o.cli_exit_code().clamp(0, 255)).unwrap_or(125))
        }
        Err(e) => {
            eprintln!("gvisor-run: {e}");
            ExitCode::from(125)
        }
    }
}
