//! Idmapped bind mounts for rootful sandboxes.
//!
//! A rootful sandbox's ids map to an unprivileged host range, so a host
//! directory owned by, say, uid 0 or 1000 is not writable by the sandbox
//! user. Instead of changing ownership on the host, the runner attaches an
//! idmapped copy of the mount: files owned by the directory's host owner
//! appear owned by the sandbox user, and files the sandbox creates land on
//! the host owned by that same host owner.
//!
//! Files in the storage range (image layers, persistent upper layers,
//! nanoclaw's own workspaces: see [`super::idslot`]) are attached through
//! an idmapping of the whole range onto the sandbox's own slot, so they are
//! the sandbox's own inside and stay in the storage range on the host.

use std::fs::Metadata;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::idslot::HostIds;
use super::sys;
use crate::Error;

/// `OPEN_TREE_CLONE`.
const OPEN_TREE_CLONE: libc::c_uint = 1;

/// Returns a detached, idmapped clone of the mount at `src_fd` (an `O_PATH`
/// descriptor) on which the source's owner is the sandbox user `uid`:`gid`
/// (host ids `ids.map_base() + uid`). The sandbox attaches it with
/// `move_mount`.
pub(crate) fn idmapped_clone(
    src_fd: RawFd,
    md: &Metadata,
    ids: &HostIds,
    uid: u32,
    gid: u32,
) -> Result<RawFd, Error> {
    // Only the owner is mapped. For an unprivileged owner the host's uid 0
    // and gid 0 never appear in the mapping, so nothing the sandbox does on
    // this mount can act as, or create files owned by, the host's root. A
    // root-owned source maps root (the caller allows that only together
    // with the seccomp rules that refuse creating set-id files).
    let group = if md.gid() == 0 && md.uid() != 0 {
        md.uid()
    } else {
        md.gid()
    };
    let uid_map = format!("{} {} 1\n", md.uid(), ids.map_base() + uid);
    let gid_map = format!("{} {} 1\n", group, ids.map_base() + gid);
    let userns = userns_fd(&uid_map, &gid_map, ids)?;
    idmapped_tree(
        src_fd,
        userns.as_raw_fd(),
        0,
        "a read-write mount in a rootful sandbox",
    )
}

/// A detached clone of the mount at `src_fd`, idmapped through the user
/// namespace `userns`, with the mount attributes `attrs` set as well.
/// `what` names the mount for the error.
pub(crate) fn idmapped_tree(
    src_fd: RawFd,
    userns: RawFd,
    attrs: u64,
    what: &str,
) -> Result<RawFd, Error> {
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    let tree = sys::open_tree(src_fd, c"", flags).map_err(|e| Error::Sys {
        call: "open_tree(OPEN_TREE_CLONE) of a mount source".into(),
        source: e,
    })?;
    let r = sys::mount_setattr(
        tree,
        c"",
        libc::AT_EMPTY_PATH as libc::c_uint,
        sys::MOUNT_ATTR_IDMAP | attrs,
        Some(userns),
    );
    if let Err(e) = r {
        sys::close(tree);
        return Err(Error::Unsupported {
            what: what.into(),
            why: format!("the host filesystem does not support idmapped mounts ({e})"),
            fix: "put the directory on ext4, xfs, btrfs or tmpfs, or run nanoclaw as an ordinary user (rootless)".into(),
        });
    }
    Ok(tree)
}

/// A user namespace fd with the given maps, made by a short-lived child,
/// owned (like the sandbox's own) by the sandbox's host uid.
pub(crate) fn userns_fd(uid_map: &str, gid_map: &str, ids: &HostIds) -> Result<OwnedFd, Error> {
    let (r, w) = sys::pipe().map_err(|e| Error::Sys {
        call: "pipe2".into(),
        source: e,
    })?;
    let pid = match ids.clone_fork(libc::CLONE_NEWUSER as libc::c_ulong) {
        Ok(0) => {
            // The child only waits until the runner has taken its namespace.
            sys::close(w);
            let mut b = [0u8; 1];
            let _ = sys::read(r, &mut b);
            sys::exit_now(0);
        }
        Ok(pid) => pid,
        Err(e) => {
            sys::close(r);
            sys::close(w);
            return Err(Error::Sys {
                call: "clone(CLONE_NEWUSER) for an idmapped mount".into(),
                source: e,
            });
        }
    };
    sys::close(r);
    let res = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
        let p = std::ffi::CString::new(format!("/proc/{pid}/ns/user"))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        sys::open(&p, libc::O_RDONLY)
    })();
    sys::close(w);
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid out pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    res.map(|fd| {
        // SAFETY: `fd` was just opened and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .map_err(|e| Error::Sys {
        call: "setting up the id mapping of an idmapped mount".into(),
        source: e,
    })
}

/// The first file under the directory `src_fd` (an `O_PATH` descriptor)
/// that carries privilege: set-user-ID, set-group-ID with group execute, or
/// a `security.capability` attribute. Symlinks are not followed and other
/// filesystems (invisible through the sandbox's non-recursive bind) are
/// skipped. Returned as a path relative to the source.
///
/// A root-owned read-write mount needs this: the kernel clears set-id bits
/// and file capabilities when the sandbox `write`s such a file, but not
/// when it writes through a shared `mmap`, so an existing setuid-root file
/// would keep its bit with the sandbox's code in it.
pub(crate) fn find_privileged_file(src_fd: RawFd) -> std::io::Result<Option<PathBuf>> {
    let root = PathBuf::from(format!("/proc/self/fd/{src_fd}"));
    let dev = std::fs::metadata(&root)?.dev();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let md = e.metadata()?; // lstat: symlinks are not followed
            let rel = rel.join(e.file_name());
            if md.dev() != dev {
                continue;
            }
            let ft = md.file_type();
            if ft.is_dir() {
                dirs.push(rel);
            } else if ft.is_file() {
                let mode = md.mode();
                let setgid_exec = mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0;
                if mode & libc::S_ISUID != 0 || setgid_exec || has_file_caps(&root.join(&rel)) {
                    return Ok(Some(rel));
                }
            }
        }
    }
    Ok(None)
}

fn has_file_caps(path: &Path) -> bool {
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated; a null buffer with size 0
    // only asks for the attribute's size.
    let r = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    r >= 0
}
