//! A one-line progress display on stderr (only when stderr is a terminal).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct Progress {
    enabled: bool,
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Progress {
    pub(crate) fn new(enabled: bool, label: String) -> Progress {
        // SAFETY: isatty only inspects fd 2.
        let tty = unsafe { libc::isatty(2) } == 1;
        Progress {
            enabled: enabled && tty,
            label,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    pub(crate) fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if !self.enabled {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_millis(100)) {
            return;
        }
        *last = Some(now);
        self.draw();
    }

    fn draw(&self) {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed).max(1);
        let pct = (done.min(total) * 100 / total) as usize;
        let bar: String = (0..30)
            .map(|i| if i * 100 / 30 < pct { '#' } else { '.' })
            .collect();
        let mb = |b: u64| b as f64 / 1e6;
        let _ = write!(
            std::io::stderr(),
            "\r{} [{bar}] {:.1}/{:.1} MB  ",
            self.label,
            mb(done),
            mb(total)
        );
    }

    pub(crate) fn finish(&self) {
        if self.enabled {
            self.draw();
            let _ = writeln!(std::io::stderr());
        }
    }
}
