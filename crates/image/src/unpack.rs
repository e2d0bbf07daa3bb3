//! Unpacking one layer tar (plain, gzip or zstd) into a directory that
//! overlayfs can use as a lower layer. See the crate docs for the exact
//! on-disk format per mode.
//!
//! Safety of extraction: every path is split into components; absolute
//! paths and `..` are refused; each parent directory is opened with
//! `openat(O_NOFOLLOW | O_DIRECTORY)` relative to the previous one, so a
//! symlink created by the layer (or an earlier entry) is never followed;
//! everything is created with `*at` calls relative to the parent's fd.

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;

use nanoclaw_sandbox::native::{ROOTFUL_ID_BASE, ROOTFUL_ID_COUNT};

use crate::digest::HashReader;
use crate::error::is_enospc;
use crate::{Digest, ImageError};

/// How to lay a layer out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackMode {
    /// As root: owners shifted by `ROOTFUL_ID_BASE`, `user.overlay.*` xattrs
    /// (the engine mounts overlayfs from inside the sandbox's user
    /// namespace, where only `userxattr` works: trusted.* is ignored there).
    Rootful,
    /// As an ordinary user: owned by the caller, `user.overlay.*` xattrs
    /// (overlayfs must be mounted with `userxattr`).
    Rootless,
}

impl UnpackMode {
    /// The opaque-directory xattr name for this mode.
    pub fn opaque_xattr(self) -> &'static str {
        match self {
            UnpackMode::Rootful | UnpackMode::Rootless => "user.overlay.opaque",
        }
    }
}

/// What unpacking a layer found.
#[derive(Debug, Clone)]
pub struct UnpackReport {
    /// sha256 of the uncompressed tar stream (the OCI diff_id).
    pub diff_id: Digest,
    /// sha256 of the bytes as read (compressed), i.e. the blob digest.
    pub blob_digest: Digest,
    /// Bytes read (compressed size).
    pub blob_size: u64,
    /// Uncompressed tar size.
    pub tar_size: u64,
    /// `tar`, `gzip` or `zstd`.
    pub compression: &'static str,
    /// Entries written (files, dirs, links, whiteouts).
    pub entries: u64,
    /// Whiteouts written.
    pub whiteouts: u64,
    /// Opaque directories marked.
    pub opaque_dirs: u64,
    /// Entries skipped, with the reason (device nodes and unknown types).
    pub skipped: Vec<String>,
}

const BUF: usize = 256 * 1024;

/// Unpack the layer read from `reader` into `dest`, which must not exist
/// yet (it is created, mode 0755). `layer` names the layer in errors.
///
/// The stream may be a plain tar, gzip or zstd (detected from its magic).
/// On error `dest` may hold a partial tree: callers unpack into a staging
/// directory and remove it on failure (as [`crate::Store`] does).
pub fn unpack_layer<R: Read + Send>(
    reader: R,
    dest: &Path,
    mode: UnpackMode,
    layer: &str,
) -> Result<UnpackReport, ImageError> {
    let io_err = |what: &str, e: io::Error| -> ImageError {
        if is_enospc(&e) {
            ImageError::DiskFull(dest.to_path_buf(), format!("unpacking layer {layer}"))
        } else {
            ImageError::io(
                format!("{what} (layer {layer}, into {})", dest.display()),
                e,
            )
        }
    };
    std::fs::create_dir(dest).map_err(|e| io_err("creating the layer directory", e))?;
    let root = open_path(dest, libc::O_RDONLY | libc::O_DIRECTORY)
        .map_err(|e| io_err("opening the layer directory", e))?;

    let mut raw = BufReader::with_capacity(BUF, HashReader::new(reader));
    let magic = raw
        .fill_buf()
        .map_err(|e| io_err("reading the layer", e))?
        .get(..4)
        .map(|m| [m[0], m[1], m[2], m[3]]);
    let compression = match magic {
        Some([0x1f, 0x8b, _, _]) => "gzip",
        Some([0x28, 0xb5, 0x2f, 0xfd]) => "zstd",
        _ => "tar",
    };
    // Compressed layers are decoded (and both digests computed) on a second
    // thread while this one writes files: decoding and file creation each
    // take about half the time, so the pipeline nearly doubles throughput.
    let (inner, mut state) = std::thread::scope(|scope| {
        let (src, decoder) = match compression {
            "tar" => (Src::Plain(&mut raw), None),
            kind => {
                let (tx, rx) = mpsc::sync_channel(4);
                let (back, spare) = mpsc::channel();
                let input = &mut raw;
                let handle = scope.spawn(move || decode(kind, input, tx, spare));
                let chan = ChanReader {
                    rx,
                    back,
                    cur: Vec::new(),
                    pos: 0,
                };
                (Src::Chan(chan), Some(handle))
            }
        };
        let mut archive = tar::Archive::new(src);
        let mut state = State {
            root,
            mode,
            layer: layer.to_string(),
            buf: vec![0u8; BUF],
            cache: None,
            deferred: Vec::new(),
            report_entries: 0,
            whiteouts: 0,
            opaque: 0,
            skipped: Vec::new(),
        };
        let entries = archive.entries().map_err(|e| tar_err(layer, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| tar_err(layer, e))?;
            state.entry(&mut entry).map_err(|e| match e {
                ImageError::Io { source, .. } if is_enospc(&source) => {
                    ImageError::DiskFull(dest.to_path_buf(), format!("unpacking layer {layer}"))
                }
                other => other,
            })?;
        }
        state
            .finish_dirs()
            .map_err(|e| io_err("setting directory modes", e))?;
        let mut src = archive.into_inner();
        // The rest (end-of-archive blocks, padding) counts in the digests.
        io::copy(&mut src, &mut io::sink()).map_err(|e| tar_err(layer, e))?;
        drop(src);
        let inner = match decoder {
            None => None,
            Some(h) => {
                let r = h
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                Some(r.map_err(|e| tar_err(layer, e))?)
            }
        };
        Ok::<_, ImageError>((inner, state))
    })?;
    let (blob_digest, blob_size) = raw
        .into_inner()
        .finish()
        .map_err(|e| io_err("reading the layer", e))?;
    let (diff_id, tar_size) = inner.unwrap_or_else(|| (blob_digest.clone(), blob_size));
    state.cache = None;
    Ok(UnpackReport {
        diff_id,
        blob_digest,
        blob_size,
        tar_size,
        compression,
        entries: state.report_entries,
        whiteouts: state.whiteouts,
        opaque_dirs: state.opaque,
        skipped: state.skipped,
    })
}

/// The tar stream: the raw (buffered, hashed) input, or the decoder thread's output.
enum Src<'a, R: Read> {
    Plain(&'a mut BufReader<HashReader<R>>),
    Chan(ChanReader),
}

impl<R: Read> Read for Src<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Src::Plain(r) => r.read(buf),
            Src::Chan(r) => r.read(buf),
        }
    }
}

/// Decoded chunks (or the decoder's error) from the decoder thread.
type Chunk = io::Result<Vec<u8>>;

/// Runs on the decoder thread: decode `input` (hashed as read, for the blob
/// digest) as `kind`, hash the decoded stream (the diff_id) and send it in
/// chunks. Returns the diff_id and decoded size once the input is exhausted.
/// Stops quietly when the reader went away (the unpack failed).
fn decode<R: Read>(
    kind: &str,
    input: &mut BufReader<HashReader<R>>,
    tx: mpsc::SyncSender<Chunk>,
    spare: mpsc::Receiver<Vec<u8>>,
) -> io::Result<(Digest, u64)> {
    let fail = |tx: &mpsc::SyncSender<Chunk>, e: io::Error| {
        let copy = io::Error::new(e.kind(), e.to_string());
        let _ = tx.send(Err(e));
        copy
    };
    let decoder: Box<dyn Read + '_> = if kind == "gzip" {
        Box::new(flate2::bufread::MultiGzDecoder::new(input))
    } else {
        match ruzstd::decoding::StreamingDecoder::new(input) {
            Ok(d) => Box::new(d),
            Err(e) => {
                let e = io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"));
                return Err(fail(&tx, e));
            }
        }
    };
    let mut decoder = HashReader::new(decoder);
    loop {
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(BUF, 0);
        let n = match read_full(&mut decoder, &mut buf) {
            Ok(n) => n,
            Err(e) => return Err(fail(&tx, e)),
        };
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if tx.send(Ok(buf)).is_err() {
            return Err(io::Error::other("the unpacker stopped reading"));
        }
    }
    decoder.finish()
}

/// Fill `buf` as far as the reader allows (decoders return short reads).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The reading end of the decoder thread's channel; returns emptied
/// buffers for reuse.
struct ChanReader {
    rx: mpsc::Receiver<Chunk>,
    back: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(next)) => {
                    let used = std::mem::replace(&mut self.cur, next);
                    self.pos = 0;
                    if used.capacity() > 0 {
                        let _ = self.back.send(used);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn tar_err(layer: &str, e: io::Error) -> ImageError {
    if is_enospc(&e) {
        return ImageError::io(format!("unpacking layer {layer}"), e);
    }
    ImageError::invalid(
        format!("layer {layer}"),
        format!("not a readable tar (plain, gzip or zstd): {e}"),
    )
}

struct State {
    root: OwnedFd,
    mode: UnpackMode,
    layer: String,
    buf: Vec<u8>,
    /// The last parent directory opened: (components joined, fd).
    cache: Option<(Vec<u8>, OwnedFd)>,
    /// Directories whose mode and mtime are set at the end.
    deferred: Vec<(Vec<Vec<u8>>, u32, u64)>,
    report_entries: u64,
    whiteouts: u64,
    opaque: u64,
    skipped: Vec<String>,
}

/// Split a tar path into safe components.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains `..`"),
            c if c.contains(&0) => return Err("NUL in path"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens `p` with `flags` (plus `O_CLOEXEC`; never `O_CREAT`).
pub(crate) fn open_path(p: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path; without O_CREAT no mode is read.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open directory `name` in `dirfd` without following a symlink.
fn open_dir_at(dirfd: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid C string and dirfd; O_NOFOLLOW|O_DIRECTORY refuses symlinks and non-dirs.
    let fd = cvt(unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstat_at(dirfd: RawFd, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dirfd, C string and out pointer; AT_SYMLINK_NOFOLLOW.
    cvt(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

impl State {
    fn refuse(&self, entry: &[u8], reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeLayer {
            layer: self.layer.clone(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn ioe(&self, entry: &[u8], what: &str, e: io::Error) -> ImageError {
        ImageError::io(
            format!(
                "{what} {:?} (layer {})",
                String::from_utf8_lossy(entry),
                self.layer
            ),
            e,
        )
    }

    fn ids(&self, uid: u64, gid: u64) -> Option<(u32, u32)> {
        match self.mode {
            UnpackMode::Rootless => None,
            UnpackMode::Rootful => {
                let shift = |id: u64| {
                    if id < u64::from(ROOTFUL_ID_COUNT) {
                        ROOTFUL_ID_BASE + id as u32
                    } else {
                        ROOTFUL_ID_BASE + 65534
                    }
                };
                Some((shift(uid), shift(gid)))
            }
        }
    }

    /// The fd of the directory `comps`, creating missing ones (0755, owned by
    /// the image's root) when `create`. Refuses symlinks and non-directories.
    fn parent(&mut self, path: &[u8], comps: &[&[u8]], create: bool) -> Result<RawFd, ImageError> {
        let key = comps.join(&b'/');
        if let Some((k, fd)) = &self.cache {
            if *k == key {
                return Ok(fd.as_raw_fd());
            }
        }
        let mut cur: Option<OwnedFd> = None;
        for c in comps {
            let dirfd = cur
                .as_ref()
                .map_or(self.root.as_raw_fd(), |f| f.as_raw_fd());
            let next = match open_dir_at(dirfd, c) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    let name = cstr(c).map_err(|e| self.ioe(path, "creating", e))?;
                    // SAFETY: valid dirfd and C string.
                    cvt(unsafe { libc::mkdirat(dirfd, name.as_ptr(), 0o755) })
                        .map_err(|e| self.ioe(path, "creating a parent of", e))?;
                    if let Some((u, g)) = self.ids(0, 0) {
                        // SAFETY: valid dirfd and C string; does not follow symlinks.
                        cvt(unsafe {
                            libc::fchownat(dirfd, name.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW)
                        })
                        .map_err(|e| self.ioe(path, "chown of a parent of", e))?;
                    }
                    open_dir_at(dirfd, c).map_err(|e| self.ioe(path, "opening a parent of", e))?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    return Err(self.refuse(
                        path,
                        format!(
                            "its parent {:?} is a symlink or not a directory (a layer may not write through a link)",
                            String::from_utf8_lossy(c)
                        ),
                    ));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(self.refuse(path, "hard link target is not in this layer"));
                }
                Err(e) => return Err(self.ioe(path, "opening a parent of", e)),
            };
            cur = Some(next);
        }
        match cur {
            None => {
                self.cache = None;
                Ok(self.root.as_raw_fd())
            }
            Some(fd) => {
                let raw = fd.as_raw_fd();
                self.cache = Some((key, fd));
                Ok(raw)
            }
        }
    }

    /// Remove whatever is at `name` in `pfd` (a subtree too). Keeps a
    /// directory when `keep_dir`. Returns true if a directory was kept.
    fn clear(
        &mut self,
        pfd: RawFd,
        name: &CString,
        keep_dir: bool,
        path: &[u8],
    ) -> Result<bool, ImageError> {
        let st = match lstat_at(pfd, name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(self.ioe(path, "checking", e)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if keep_dir {
                return Ok(true);
            }
            // Remove a subtree safely: std's remove_dir_all does not follow symlinks.
            let sub = format!(
                "/proc/self/fd/{pfd}/{}",
                String::from_utf8_lossy(name.as_bytes())
            );
            self.cache = None;
            std::fs::remove_dir_all(&sub).map_err(|e| self.ioe(path, "replacing directory", e))?;
        } else {
            // SAFETY: valid dirfd and C string.
            cvt(unsafe { libc::unlinkat(pfd, name.as_ptr(), 0) })
                .map_err(|e| self.ioe(path, "replacing", e))?;
        }
        Ok(false)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        use tar::EntryType as T;
        let path: Vec<u8> = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let comps = components(&path).map_err(|r| self.refuse(&path, r))?;
        let Some((name, parents)) = comps.split_last() else {
            // The layer root ("./"): its attributes come from the upper dir.
            if kind == T::Directory {
                return Ok(());
            }
            return Err(self.refuse(&path, "a non-directory at the layer root"));
        };
        let name = *name;
        let hdr = entry.header();
        let mode = hdr.mode().unwrap_or(0o644) & 0o7777;
        let mtime = hdr.mtime().unwrap_or(0);
        let uid = hdr.uid().unwrap_or(0);
        let gid = hdr.gid().unwrap_or(0);
        let ids = self.ids(uid, gid);

        // Whiteouts.
        if let Some(target) = name.strip_prefix(b".wh.") {
            let pfd = self.parent(&path, parents, true)?;
            if target == b".wh..opq" {
                let key = cstr(self.mode.opaque_xattr().as_bytes())
                    .map_err(|e| self.ioe(&path, "xattr", e))?;
                // SAFETY: pfd is an open directory fd; key and value are valid buffers.
                cvt(unsafe { libc::fsetxattr(pfd, key.as_ptr(), b"y".as_ptr().cast(), 1, 0) })
                    .map_err(|e| self.ioe(&path, "marking opaque", e))?;
                self.opaque += 1;
                self.report_entries += 1;
                return Ok(());
            }
            if target.starts_with(b".wh.") {
                return Ok(()); // AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(self.refuse(&path, "whiteout of nothing"));
            }
            let t = cstr(target).map_err(|e| self.ioe(&path, "whiteout", e))?;
            self.clear(pfd, &t, false, &path)?;
            // SAFETY: valid dirfd and C string; char device 0:0 is overlayfs' whiteout.
            cvt(unsafe { libc::mknodat(pfd, t.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) })
                .map_err(|e| {
                    self.ioe(
                        &path,
                        "creating whiteout (char 0:0; needs Linux >= 5.8 as non-root)",
                        e,
                    )
                })?;
            self.whiteouts += 1;
            self.report_entries += 1;
            return Ok(());
        }

        let cname = cstr(name).map_err(|e| self.ioe(&path, "name", e))?;
        match kind {
            T::Directory => {
                let pfd = self.parent(&path, parents, true)?;
                let kept = self.clear(pfd, &cname, true, &path)?;
                if !kept {
                    // SAFETY: valid dirfd and C string.
                    cvt(unsafe { libc::mkdirat(pfd, cname.as_ptr(), 0o700) })
                        .map_err(|e| self.ioe(&path, "creating directory", e))?;
                }
                self.chown_at(pfd, &cname, ids, &path)?;
                self.deferred
                    .push((comps.iter().map(|c| c.to_vec()).collect(), mode, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let pfd = self.parent(&path, parents, true)?;
                self.clear(pfd, &cname, false, &path)?;
                // SAFETY: valid dirfd and C string; O_EXCL|O_NOFOLLOW never reuses or follows.
                let fd = cvt(unsafe {
                    libc::openat(
                        pfd,
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                })
                .map_err(|e| self.ioe(&path, "creating", e))?;
                // SAFETY: fd was just returned by openat and is owned here only.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                loop {
                    let n = match entry.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(tar_err(&self.layer, e)),
                    };
                    file.write_all(&self.buf[..n])
                        .map_err(|e| self.ioe(&path, "writing", e))?;
                }
                let fd = file.as_raw_fd();
                if let Some((u, g)) = ids {
                    // SAFETY: fd is an open file.
                    cvt(unsafe { libc::fchown(fd, u, g) })
                        .map_err(|e| self.ioe(&path, "chown", e))?;
                }
                // After chown (which clears setuid/setgid); the sandbox mounts nosuid anyway.
                // SAFETY: fd is an open file.
                cvt(unsafe { libc::fchmod(fd, mode as libc::mode_t) })
                    .map_err(|e| self.ioe(&path, "chmod", e))?;
                let ts = times(mtime);
                // SAFETY: fd is an open file; ts points to two timespecs.
                cvt(unsafe { libc::futimens(fd, ts.as_ptr()) })
                    .map_err(|e| self.ioe(&path, "setting mtime of", e))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&path, "symlink without a target"))?
                    .into_owned();
                let ctarget = cstr(&target).map_err(|e| self.ioe(&path, "symlink", e))?;
                let pfd = self.parent(&path, parents, true)?;
                self.clear(pfd, &cname, false, &path)?;
                // SAFETY: valid C strings and dirfd; the link is created, never followed.
                cvt(unsafe { libc::symlinkat(ctarget.as_ptr(), pfd, cname.as_ptr()) })
                    .map_err(|e| self.ioe(&path, "creating symlink", e))?;
                self.chown_at(pfd, &cname, ids, &path)?;
                let ts = times(mtime);
                // SAFETY: valid dirfd, C string and timespec array; does not follow.
                let _ = unsafe {
                    libc::utimensat(pfd, cname.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                };
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&path, "hard link without a target"))?
                    .into_owned();
                let tcomps = components(&target)
                    .map_err(|r| self.refuse(&path, format!("hard link target: {r}")))?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(self.refuse(&path, "hard link to the layer root"));
                };
                let ctname = cstr(tname).map_err(|e| self.ioe(&path, "link", e))?;
                // Open the target's parent as its own fd (the cache holds one).
                let tparent_fd = {
                    let fd = self.parent(&path, tparents, false)?;
                    // SAFETY: fd is an open directory; dup gives an owned copy.
                    let d = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
                        .map_err(|e| self.ioe(&path, "dup", e))?;
                    // SAFETY: d is a fresh fd owned here only.
                    unsafe { OwnedFd::from_raw_fd(d) }
                };
                let st = lstat_at(tparent_fd.as_raw_fd(), &ctname)
                    .map_err(|_| self.refuse(&path, "hard link target is not in this layer"))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return Err(self.refuse(&path, "hard link to a directory"));
                }
                let pfd = self.parent(&path, parents, true)?;
                if tcomps == comps {
                    return Ok(());
                }
                self.clear(pfd, &cname, false, &path)?;
                // SAFETY: valid fds and C strings; flags 0: a symlink target is linked, not followed.
                cvt(unsafe {
                    libc::linkat(
                        tparent_fd.as_raw_fd(),
                        ctname.as_ptr(),
                        pfd,
                        cname.as_ptr(),
                        0,
                    )
                })
                .map_err(|e| self.ioe(&path, "creating hard link", e))?;
            }
            T::Fifo => {
                let pfd = self.parent(&path, parents, true)?;
                self.clear(pfd, &cname, false, &path)?;
                // SAFETY: valid dirfd and C string; a fifo needs no privilege.
                cvt(unsafe {
                    libc::mknodat(
                        pfd,
                        cname.as_ptr(),
                        libc::S_IFIFO | (mode as libc::mode_t & 0o777),
                        0,
                    )
                })
                .map_err(|e| self.ioe(&path, "creating fifo", e))?;
                self.chown_at(pfd, &cname, ids, &path)?;
            }
            T::Char | T::Block => {
                self.skipped.push(format!(
                    "{}: device node skipped (a sandbox gets its own /dev)",
                    String::from_utf8_lossy(&path)
                ));
                return Ok(());
            }
            other => {
                self.skipped.push(format!(
                    "{}: unsupported tar entry type {other:?} skipped",
                    String::from_utf8_lossy(&path)
                ));
                return Ok(());
            }
        }
        self.report_entries += 1;
        Ok(())
    }

    fn chown_at(
        &self,
        pfd: RawFd,
        name: &CString,
        ids: Option<(u32, u32)>,
        path: &[u8],
    ) -> Result<(), ImageError> {
        if let Some((u, g)) = ids {
            // SAFETY: valid dirfd and C string; does not follow symlinks.
            cvt(unsafe { libc::fchownat(pfd, name.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW) })
                .map_err(|e| self.ioe(path, "chown", e))?;
        }
        Ok(())
    }

    /// Apply directory modes and mtimes, deepest first (children's changes
    /// would otherwise bump their parent's mtime after it was set).
    fn finish_dirs(&mut self) -> io::Result<()> {
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
        for (comps, mode, mtime) in deferred {
            let mut cur: Option<OwnedFd> = None;
            let mut ok = true;
            for c in &comps {
                let dirfd = cur
                    .as_ref()
                    .map_or(self.root.as_raw_fd(), |f| f.as_raw_fd());
                match open_dir_at(dirfd, c) {
                    Ok(fd) => cur = Some(fd),
                    // Removed or replaced by a later entry: nothing to set.
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            let (Some(fd), true) = (cur, ok) else {
                continue;
            };
            // SAFETY: fd is an open directory.
            cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
            let ts = times(mtime);
            // SAFETY: fd is an open directory; ts points to two timespecs.
            cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })?;
        }
        Ok(())
    }
}

fn times(mtime: u64) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    [t, t]
}

/// Remove a tree that may contain directories without write permission
/// (rootless layers keep the image's modes): make each directory writable
/// first. Never follows symlinks.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e)
            if e.raw_os_error() != Some(libc::EACCES)
                && e.kind() != io::ErrorKind::PermissionDenied =>
        {
            return Err(e)
        }
        Err(_) => {}
    }
    fn chmod_dirs(p: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::symlink_metadata(p)?;
        if md.is_dir() {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
            for e in std::fs::read_dir(p)? {
                chmod_dirs(&e?.path())?;
            }
        }
        Ok(())
    }
    chmod_dirs(path)?;
    std::fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components() {
        assert_eq!(components(b"./a/b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(components(b"a//./b").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../x").is_err());
        assert!(components(b"..").is_err());
        assert!(components(b"./").unwrap().is_empty());
    }
}
