//! The store's lock file: `flock(2)`, shared for writers that only add
//! content (pull, import, build), exclusive for rm and prune.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::ImageError;

/// Held while the lock is held; released on drop (close).
#[derive(Debug)]
pub(crate) struct LockGuard {
    _file: File,
}

pub(crate) fn lock(path: &Path, exclusive: bool) -> Result<LockGuard, ImageError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ImageError::io(format!("opening lock file {}", path.display()), e))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: file is an open fd for the duration of the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(ImageError::io(format!("locking {}", path.display()), e));
        }
    }
    Ok(LockGuard { _file: file })
}
