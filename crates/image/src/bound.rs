//! The disk bound of a build ([`crate::build::BuildOptions::max_bytes`]).
//!
//! A build's new layers go to the image store's disk: a `RUN` step writes
//! its files into an overlay upper folder there, and every layer is then
//! kept twice (its tar blob and the unpacked folder). Without a bound one
//! Dockerfile fills the disk (`RUN python3 -c "…write 2 GB…"`, or
//! `truncate -s 1T /big`: a sparse file costs nothing until it is tarred).
//!
//! Two checks enforce the bound: a [`Watcher`] measures the upper folder of
//! a running `RUN` step every few hundred milliseconds and stops the step
//! once it holds more than what is left of the bound (how far past the
//! bound a step can get is what it writes in one interval), and the
//! builder measures every finished step's folder ([`layer_bytes`]) before
//! turning it into a layer, so no layer past the bound is ever written.
//!
//! [`layer_bytes`] counts what the layer's tar will hold, not the blocks
//! the folder uses: a file's apparent size (sparse files included) plus
//! 1 KiB per entry (a tar header and padding), so a million empty files
//! count too. Hard links are counted once per name (more than the tar
//! holds: the bound errs on the safe side).

use std::io;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nanoclaw_sandbox::KillHandle;

/// What one entry costs in a tar beyond its data: a 512-byte header and
/// up to 512 bytes of padding.
const PER_ENTRY: u64 = 1024;

/// The shortest pause between two measurements of a running step.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The bytes a layer made of the folder `dir` will hold at most (see the
/// module's documentation). A folder that cannot be read is an error: a
/// step must not hide what it wrote from the bound (rootless, a `chmod 000`
/// folder is unreadable to the builder, and its layer could not be made
/// anyway). Entries that vanish while they are counted are skipped.
pub fn layer_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
        };
        for e in entries {
            let e = match e {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let md = match std::fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            total = total.saturating_add(PER_ENTRY);
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total = total.saturating_add(md.len());
            }
        }
    }
    Ok(total)
}

/// Watches the upper folder of a running `RUN` step and kills the step
/// when it holds more than `limit` bytes ([`layer_bytes`]) or cannot be
/// measured. Stopped by [`Watcher::finish`], which says why it killed, if
/// it did.
pub struct Watcher {
    stop: Sender<()>,
    thread: JoinHandle<()>,
    reason: Arc<Mutex<Option<String>>>,
}

impl Watcher {
    /// Starts watching `upper` (which the step may not have made yet).
    pub fn start(upper: &Path, limit: u64, kill: KillHandle) -> io::Result<Watcher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let reason = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&reason);
        let upper = upper.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("build-disk-bound".into())
            .spawn(move || {
                let mut pause = MIN_INTERVAL;
                loop {
                    match stopped.recv_timeout(pause) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let t0 = Instant::now();
                    let why = match layer_bytes(&upper) {
                        Ok(n) if n > limit => Some(format!(
                            "it wrote more than {} (at least {}), over what is left of the build's disk bound",
                            human(limit),
                            human(n)
                        )),
                        Ok(_) => None,
                        Err(e) => Some(format!(
                            "what it wrote cannot be measured ({e}); a build step must leave its files readable"
                        )),
                    };
                    if let Some(why) = why {
                        *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                        kill.kill();
                        return;
                    }
                    // A large tree is measured less often: at most a fifth
                    // of the time goes to measuring.
                    pause = MIN_INTERVAL.max(t0.elapsed() * 4);
                }
            })?;
        Ok(Watcher {
            stop,
            thread,
            reason,
        })
    }

    /// Stops watching; why the step was killed, if it was.
    pub fn finish(self) -> Option<String> {
        let _ = self.stop.send(());
        let _ = self.thread.join();
        let r = self.reason.lock().unwrap_or_else(|e| e.into_inner()).take();
        r
    }
}

/// `n` bytes for a message: `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if n >= size {
            return format!("{:.1} {name}", n as f64 / size as f64);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_and_empty_entries_count() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(d.path().join("sparse")).expect("create");
        f.set_len(10 << 30).expect("truncate");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        for i in 0..100 {
            std::fs::write(d.path().join("sub").join(i.to_string()), b"").expect("write");
        }
        let n = layer_bytes(d.path()).expect("measure");
        assert_eq!(n, (10 << 30) + PER_ENTRY * 102);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
