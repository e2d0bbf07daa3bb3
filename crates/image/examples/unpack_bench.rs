//! Layer unpack throughput: builds a synthetic layer (a mix of small and
//! large files, like a language runtime image) and unpacks it repeatedly,
//! printing MB/s of uncompressed tar for plain tar and gzip.
//!
//! `cargo run --release -p nanoclaw-image --example unpack_bench [-- MB [DIR [LAYER.tar[.gz]]]]`
//! (DIR: where to unpack; default a temp dir on the same disk as the store would be;
//! LAYER: a real layer to time as well.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Instant;

use nanoclaw_image::{unpack_layer, UnpackMode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let base = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).unwrap();
    // ~70% of bytes in files of 1-8 MB, the rest in many 1-64 KiB files.
    let mut b = tar::Builder::new(Vec::with_capacity(mb << 20));
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut total, mut files) = (0usize, 0usize);
    let target = mb << 20;
    let mut dir = 0;
    while total < target {
        let big = total < target * 7 / 10;
        let size = if big {
            (1 << 20) + (rnd() as usize % (7 << 20))
        } else {
            1024 + (rnd() as usize % (63 << 10))
        };
        if files % 100 == 0 {
            dir += 1;
        }
        // About 1.6:1 compressible, like binaries and libraries: random
        // bytes from a small alphabet with runs.
        let data: Vec<u8> = (0..size / 8)
            .flat_map(|_| {
                let r = rnd();
                if r & 3 == 0 {
                    [0u8; 8]
                } else {
                    (r & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes()
                }
            })
            .collect();
        let size = data.len();
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, format!("usr/lib/d{dir}/f{files}"), &data[..])
            .unwrap();
        total += size;
        files += 1;
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    // SAFETY: geteuid cannot fail.
    let mode = if unsafe { libc::geteuid() } == 0 {
        UnpackMode::Rootful
    } else {
        UnpackMode::Rootless
    };
    println!(
        "layer: {files} files, {:.0} MB tar, {:.0} MB gzip; unpacking into {} as {mode:?}",
        tar.len() as f64 / 1e6,
        gz.len() as f64 / 1e6,
        work.path().display()
    );
    // Every iteration unpacks into a fresh directory and nothing is deleted
    // until the end: on ext4 without a journal (this VM's disk) the inode
    // allocator skips inodes freed in the last seconds by reading each one
    // (`recently_deleted`), so deleting a tree and then creating files in the
    // same block group measures that scan, not the unpacker.
    let mut keep = Vec::new();
    for (name, data) in [("tar", &tar), ("tar+gzip", &gz)] {
        let mut best = f64::MAX;
        for i in 0..3 {
            let dest = work.path().join(format!("{name}-{i}"));
            let t = Instant::now();
            let rep = unpack_layer(&data[..], &dest, mode, name).unwrap();
            let s = t.elapsed().as_secs_f64();
            best = best.min(s);
            assert_eq!(rep.tar_size as usize, tar.len());
            keep.push(dest);
        }
        println!(
            "{name:>9}: {:.0} MB/s (uncompressed bytes, best of 3, {:.3}s)",
            tar.len() as f64 / 1e6 / best,
            best
        );
    }
    // A real layer, if given: a tar (optionally gzip) of an actual tree,
    // e.g. `tar -C / -czf /tmp/py.tgz usr/lib/python3.11`.
    if let Some(real) = args.get(3) {
        let data = std::fs::read(real).unwrap();
        let mut best = f64::MAX;
        let mut size = 0;
        let mut entries = 0;
        for i in 0..3 {
            let dest = work.path().join(format!("real-{i}"));
            let t = Instant::now();
            let rep = unpack_layer(&data[..], &dest, mode, "real").unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            size = rep.tar_size;
            entries = rep.entries;
            keep.push(dest);
        }
        println!(
            "{real}: {entries} entries, {:.0} MB tar: {:.0} MB/s (best of 3, {:.3}s)",
            size as f64 / 1e6,
            size as f64 / 1e6 / best,
            best
        );
    }
    for d in keep {
        std::fs::remove_dir_all(d).unwrap();
    }
}
