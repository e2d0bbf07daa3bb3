//! `nanoclaw-fakellm`: the fake model server as a process, for test suites
//! in other languages. Prints `listening on http://127.0.0.1:PORT` once
//! ready and serves until killed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use nanoclaw_fakellm::{script, Expect, FakeLlm, Kind, Options};

/// A fake Anthropic / OpenAI model server that serves a scripted
/// conversation and records and checks every request.
#[derive(Parser, Debug)]
#[command(name = "nanoclaw-fakellm", version)]
struct Args {
    /// The JSON script: an array of turns (see the crate's `script` module).
    #[arg(long)]
    script: PathBuf,
    /// Wire format: anthropic or openai.
    #[arg(long)]
    kind: Kind,
    /// Port on 127.0.0.1 (0: any free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The key the auth header must carry (none: no auth header expected).
    #[arg(long)]
    api_key: Option<String>,
    /// A string that must appear nowhere in a request (repeatable).
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// A string the system prompt must contain (repeatable).
    #[arg(long = "system-must-contain")]
    system_must_contain: Vec<String>,
    /// Where to write the recorded requests and violations (JSON) after
    /// each request.
    #[arg(long)]
    record: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.script)
        .with_context(|| format!("cannot read the script {}", args.script.display()))?;
    let turns = script::parse(&text)
        .with_context(|| format!("{} is not a valid script", args.script.display()))?;
    let expect = Expect {
        api_key: args.api_key,
        secrets: args.secrets,
        system_must_contain: args.system_must_contain,
    };
    let opts = Options {
        kind: args.kind,
        port: args.port,
        record: args.record,
    };
    let fake = FakeLlm::start_with(opts, turns, expect)
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{}", fake.addr())?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
