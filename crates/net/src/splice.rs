//! Zero-copy relaying between two TCP sockets with `splice(2)` through a
//! pipe, for connections the proxy only passes through (no TLS
//! interception, no header rewriting after the first bytes).
//!
//! A read/write copy moves every byte through user space twice; on the
//! 2-core machines nanoclaw targets the proxy then competes with both the
//! sandboxed client and the server for CPU, and a pass-through download
//! reached only 0.43–0.62× of a direct one (bench/egress.py). `splice`
//! moves page references from the socket into a pipe and on into the other
//! socket without copying them to user space.
//!
//! Readiness comes from tokio (`readable`/`writable` + `try_io`), so a
//! relay is cancelled like any other future: dropping it closes its pipe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::conn::{grant, End, Shared};
use crate::record::DenyReason;

/// Bytes asked of one `splice` call, and the pipe's capacity (the default
/// 64 KiB pipe would cap each move at 16 pages).
const CHUNK: usize = 1 << 20;

/// A non-blocking pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe moves more per call; the default size still works if
    // the system refuses (pipe-max-size, per-user pipe limits).
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

/// One non-blocking `splice` of at most `len` bytes.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors that stay open for the call; null
    // offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves what `from` has into the pipe: `Ok(0)` at end of stream.
async fn fill(from: &TcpStream, pipe_w: RawFd) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            splice_once(from.as_raw_fd(), pipe_w, CHUNK)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Moves exactly `len` bytes from the pipe into `to`.
async fn drain(pipe_r: RawFd, to: &TcpStream, mut len: usize) -> io::Result<()> {
    while len > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice_once(pipe_r, to.as_raw_fd(), len)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `from` to `to` until end of stream (then shuts `to`'s write side
/// down), within the proxy's byte cap, counting into `n`.
pub(crate) async fn pump(
    sh: &Shared,
    from: &TcpStream,
    to: &TcpStream,
    up: bool,
    n: &AtomicU64,
) -> Result<(), End> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        let got = fill(from, pipe_w.as_raw_fd()).await?;
        if got == 0 {
            // SAFETY: shutdown of a socket we hold a reference to; only the
            // write direction, as AsyncWrite::shutdown does.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(());
        }
        // Past the cap only what it grants is passed; the rest stays in the
        // pipe, which is dropped with the connection.
        let g = grant(sh, got, up);
        drain(pipe_r.as_raw_fd(), to, g).await?;
        n.fetch_add(g as u64, Ordering::Relaxed);
        if g < got {
            return Err(End::Deny(DenyReason::ByteLimit {
                max: sh.limits.max_bytes,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::policy::NetworkPolicy;
    use crate::record::Limits;
    use crate::resolve::{SystemResolver, TcpConnector};

    fn shared(max_bytes: u64) -> Shared {
        let limits = Limits {
            max_bytes,
            ..Limits::default()
        };
        Shared::new(
            NetworkPolicy::default(),
            limits,
            Arc::new(SystemResolver),
            Arc::new(TcpConnector),
        )
    }

    /// A connected pair on loopback: (the end we write to, the end pump reads).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Relays `data` through `pump` and returns what came out and its result.
    async fn through(sh: &Shared, data: Vec<u8>) -> (Vec<u8>, Result<(), End>, u64) {
        let (mut src, from) = pair().await;
        let (to, mut dst) = pair().await;
        let writer = tokio::spawn(async move {
            let _ = src.write_all(&data).await;
            let _ = src.shutdown().await;
            src
        });
        let n = AtomicU64::new(0);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = dst.read_to_end(&mut out).await;
            out
        });
        let r = pump(sh, &from, &to, false, &n).await;
        drop(to);
        let _src = writer.await.unwrap();
        (reader.await.unwrap(), r, n.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn every_byte_passes_in_order_and_the_end_is_passed_on() {
        let data: Vec<u8> = (0..8 << 20)
            .map(|i: u32| (i * 7 + i / 4096) as u8)
            .collect();
        let sh = shared(u64::MAX);
        let (out, r, n) = through(&sh, data.clone()).await;
        assert!(r.is_ok());
        assert_eq!(n, data.len() as u64);
        assert!(out == data, "{} bytes out of {}", out.len(), data.len());
    }

    #[tokio::test]
    async fn the_byte_cap_passes_exactly_what_it_grants() {
        let cap = 100_000;
        let sh = shared(cap);
        let (out, r, n) = through(&sh, vec![7u8; 1 << 20]).await;
        assert!(
            matches!(r, Err(End::Deny(DenyReason::ByteLimit { max })) if max == cap),
            "the cap ends the relay"
        );
        assert_eq!(out.len() as u64, cap);
        assert_eq!(n, cap);
    }
}
