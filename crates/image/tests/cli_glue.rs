//! Compiles and drives the CLI glue (crates/cli/src/image_cmd.rs) the way
//! main.rs will: clap parsing, then `run_image`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../cli/src/image_cmd.rs"]
mod image_cmd;

use clap::Parser;
use common::*;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: image_cmd::ImageCommand,
}

fn run(args: &[&str]) -> anyhow::Result<u8> {
    let cli = Cli::try_parse_from(std::iter::once("image").chain(args.iter().copied()))?;
    image_cmd::run_image(cli.cmd)
}

#[test]
fn image_subcommands() {
    let t = tempfile::tempdir().unwrap();
    std::env::set_var("NANOCLAW_DATA_DIR", t.path().join("data"));
    let img = TestImage::new(vec![base_layer()], true, &["A=1"], "amd64");
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &[("example.com/glue:1", &img)]);
    assert_eq!(run(&["import", layout.to_str().unwrap()]).unwrap(), 0);
    assert_eq!(run(&["ls"]).unwrap(), 0);
    assert_eq!(run(&["ls", "--json"]).unwrap(), 0);
    assert_eq!(run(&["inspect", "example.com/glue:1"]).unwrap(), 0);
    assert_eq!(run(&["stats", "--json"]).unwrap(), 0);
    let err = run(&["inspect", "nope"]).unwrap_err().to_string();
    assert!(
        err.contains("not found locally") && err.contains("nanoclaw image pull"),
        "{err}"
    );
    let err = run(&["pull", "--platform", "bogus", "x"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("OS/ARCH"), "{err}");
    assert_eq!(run(&["rm", "example.com/glue:1"]).unwrap(), 0);
    assert_eq!(run(&["prune"]).unwrap(), 0);
    assert!(t
        .path()
        .join("data/images/layers")
        .read_dir()
        .unwrap()
        .next()
        .is_none());
}
