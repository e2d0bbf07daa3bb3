//! `nanoclaw`: run hostile code in a sandbox, in milliseconds.
//!
//! The binary is thin: it parses arguments into a `SandboxSpec`, hands it to
//! the engine and turns the outcome into an exit code. Exit codes follow
//! `docker run`: the command's own code, 128+N for signal N, 124 on
//! timeout, 125 when nanoclaw itself failed, 126 not executable, 127 not
//! found.

mod agent_cmd;
mod audit_cmd;
mod backend_cmd;
mod backends;
mod build_cmd;
mod config_cmd;
mod doctor;
mod image_cmd;
mod mcp_cmd;
mod run_cmd;
mod sandbox_cmd;
mod scope_cmd;
mod serve_cmd;
mod tenant_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for "nanoclaw itself failed" (bad input, host cannot do it).
pub const EXIT_NANOCLAW: u8 = 125;

#[derive(Debug, Parser)]
#[command(
    name = "nanoclaw",
    version,
    about = "A secure runtime for AI agents: every command runs in a sandbox that assumes it is hostile."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(about = RUN_ABOUT, long_about = None)]
    Run(Box<run_cmd::RunArgs>),
    /// Report what this host supports and which protections a run gets.
    Doctor(doctor::DoctorArgs),
    /// Manage images: pull, import, ls, inspect, rm, prune, stats.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Check the configuration file (nanoclaw.yaml).
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Long-lived sandboxes: create, ls, inspect, pause, resume, rm; and policy: explain.
    #[command(subcommand)]
    Sandbox(Box<config_cmd::SandboxCommand>),
    /// Run a command in a sandbox made with `nanoclaw sandbox create`.
    Exec(Box<sandbox_cmd::ExecArgs>),
    /// Copy files between the host and a sandbox made with `sandbox create`.
    Cp(sandbox_cmd::CpArgs),
    /// Serve E2B's API (and nanoclaw's) over long-lived sandboxes.
    Serve(serve_cmd::ServeArgs),
    /// Tenants of `nanoclaw serve`: add, ls, set, rm, and their API keys.
    Tenant(tenant_cmd::TenantArgs),
    /// The audit log: ls, show, export, verify, prune.
    Audit(audit_cmd::AuditArgs),
    /// Agents: create, ls, show, rm, run, execute; approvals.
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// An MCP server over stdio: a sandbox's tools for any MCP host (Claude Code, Codex, Cursor).
    Mcp(mcp_cmd::McpArgs),
    /// (internal) One run from a JSON spec on stdin (the daemon's /v1/run).
    #[command(name = "__run", hide = true)]
    RunSpec,
    /// (internal) The keeper of one long-lived sandbox.
    #[command(name = "__keeper", hide = true)]
    Keeper,
    /// (internal) The holder of one micro-VM (see nanoclaw_microvm::holder).
    #[command(name = "__microvm-holder", hide = true)]
    MicroVmHolder,
    /// (internal) The first process of a Docker sandbox (see nanoclaw_docker::init).
    #[command(name = "__docker-init", hide = true)]
    DockerInit {
        /// Its arguments.
        args: Vec<String>,
    },
}

/// The doc line of `nanoclaw run`, shared by the full parser and the fast
/// path below (a test checks that both print the same help).
const RUN_ABOUT: &str = "Run a command (or a code snippet) in a fresh sandbox";

/// Parses the command line. `nanoclaw run` is the start-up path that is
/// measured against bwrap, and clap builds every subcommand's arguments
/// (≈40 of them) before it parses one: for `run` only its own are built,
/// which saves ≈100 page faults and ≈0.2 ms of every run's start-up.
fn parse() -> Result<Cli, clap::Error> {
    let mut argv = std::env::args_os();
    let first = argv.nth(1);
    if first.as_deref() != Some(std::ffi::OsStr::new("run")) {
        return Cli::try_parse();
    }
    use clap::FromArgMatches;
    let m =
        run_command().try_get_matches_from(std::iter::once("nanoclaw run".into()).chain(argv))?;
    let args = run_cmd::RunArgs::from_arg_matches(&m)?;
    Ok(Cli {
        command: Command::Run(Box::new(args)),
    })
}

/// `nanoclaw run`'s parser alone (see [`parse`]).
fn run_command() -> clap::Command {
    use clap::Args;
    // The struct's own doc comment (for readers of the code) would become
    // the help's text: the subcommand's line replaces it, as in the full
    // parser.
    run_cmd::RunArgs::augment_args(clap::Command::new("run").bin_name("nanoclaw run"))
        .about(RUN_ABOUT)
        .long_about(None)
}

fn main() -> ExitCode {
    // In a micro-VM, this binary is the guest's /init (--backend microvm).
    if nanoclaw_microvm::guest::is_guest_init() {
        nanoclaw_microvm::guest::main();
    }
    let cli = match parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    // One clear error, exit 125 like `docker run`.
                    let msg = e.render().to_string();
                    let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
                    let mut first = lines
                        .next()
                        .unwrap_or("invalid arguments")
                        .trim_start_matches("error: ")
                        .to_string();
                    // "...not provided:" is followed by what was missing.
                    if first.ends_with(':') {
                        if let Some(next) = lines.next() {
                            first.push(' ');
                            first.push_str(next);
                        }
                    }
                    let sub = std::env::args()
                        .nth(1)
                        .filter(|a| !a.starts_with('-'))
                        .unwrap_or_else(|| "run".into());
                    let hint = if msg.contains("--help") {
                        format!("; see `nanoclaw {sub} --help`")
                    } else {
                        String::new()
                    };
                    eprintln!("nanoclaw: {first}{hint}");
                    ExitCode::from(EXIT_NANOCLAW)
                }
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => run_cmd::run(*args),
        Command::Doctor(args) => doctor::run(args),
        Command::Config(c) => config_cmd::run_config(c),
        Command::Image(c) => image_cmd::run_image(c),
        Command::Sandbox(c) => config_cmd::run_sandbox(*c),
        Command::Exec(a) => sandbox_cmd::exec(*a),
        Command::Cp(a) => sandbox_cmd::cp(a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Tenant(a) => tenant_cmd::run_tenant(a),
        Command::Audit(a) => audit_cmd::run_audit(a),
        Command::Agent(c) => agent_cmd::run_agent(c),
        Command::Mcp(a) => mcp_cmd::run(a),
        Command::RunSpec => sandbox_cmd::run_spec(),
        Command::Keeper => sandbox_cmd::keeper(),
        Command::MicroVmHolder => Ok(nanoclaw_microvm::holder::main()),
        Command::DockerInit { args } => {
            Ok(u8::try_from(nanoclaw_docker::init::init_main(&args)).unwrap_or(1))
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: the error and each cause not already spelled out.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.contains(&c) {
                    line.push_str(": ");
                    line.push_str(&c);
                }
            }
            eprintln!("nanoclaw: {line}");
            ExitCode::from(EXIT_NANOCLAW)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// The fast path's `nanoclaw run` must be the full parser's `run`.
    fn full_run_command() -> clap::Command {
        let mut cli = Cli::command();
        cli.build();
        cli.find_subcommand("run").expect("run").clone()
    }

    #[test]
    fn fast_run_parser_prints_the_same_help() {
        let mut fast = run_command();
        let mut full = full_run_command();
        assert_eq!(
            fast.render_long_help().to_string(),
            full.render_long_help().to_string()
        );
        assert_eq!(
            fast.render_usage().to_string(),
            full.render_usage().to_string()
        );
    }

    #[test]
    fn fast_run_parser_parses_as_the_full_one() {
        let cases: &[&[&str]] = &[
            &["--", "/bin/true"],
            &[
                "--memory",
                "64m",
                "--timeout",
                "2",
                "sh",
                "-c",
                "x",
                "--timeout",
                "9",
            ],
            &["--json", "--network", "none", "--", "python3", "-c", "pass"],
            &["--lang", "python", "--code", "print(1)"],
        ];
        for args in cases {
            let full = Cli::try_parse_from(["nanoclaw", "run"].iter().chain(args.iter()))
                .expect("full parse");
            let m = run_command()
                .try_get_matches_from(["nanoclaw run"].iter().chain(args.iter()))
                .expect("fast parse");
            let fast = run_cmd::RunArgs::from_arg_matches(&m).expect("fast args");
            let Command::Run(full) = full.command else {
                panic!("not run")
            };
            assert_eq!(format!("{full:?}"), format!("{fast:?}"), "{args:?}");
        }
        for bad in [&["--memory"][..], &["--no-such-flag", "x"]] {
            let full = Cli::try_parse_from(["nanoclaw", "run"].iter().chain(bad.iter()))
                .expect_err("full refuses");
            let fast = run_command()
                .try_get_matches_from(["nanoclaw run"].iter().chain(bad.iter()))
                .expect_err("fast refuses");
            assert_eq!(full.kind(), fast.kind(), "{bad:?}");
            assert_eq!(full.to_string(), fast.to_string(), "{bad:?}");
        }
    }
}
