//! A minimal netlink socket and message builder (rtnetlink and nfnetlink
//! share it). Only what [`super`] needs: building messages with nested
//! attributes, request/ack, single-reply requests, dumps and nfnetlink
//! batches, with extended-ack error strings.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// <linux/netlink.h>
pub(crate) const NETLINK_ROUTE: libc::c_int = 0;
pub(crate) const NETLINK_NETFILTER: libc::c_int = 12;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLM_F_CAPPED: u16 = 0x100;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const HDR: usize = 16;
const RECV_BUF: usize = 256 * 1024;

/// A failed netlink request: the errno the kernel returned and, when it
/// sent one, its extended-ack message.
#[derive(Debug)]
pub(crate) struct NlError {
    pub errno: i32,
    pub msg: Option<String>,
}

impl NlError {
    fn io(e: io::Error) -> NlError {
        NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            msg: None,
        }
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A buffer holding one or more netlink messages.
#[derive(Default)]
pub(crate) struct MsgBuf {
    buf: Vec<u8>,
    msg_start: usize,
    nests: Vec<usize>,
}

impl MsgBuf {
    pub fn new() -> MsgBuf {
        MsgBuf {
            buf: Vec::with_capacity(1024),
            ..MsgBuf::default()
        }
    }

    /// Starts a message; must be closed with [`MsgBuf::end`].
    pub fn begin(&mut self, ty: u16, flags: u16, seq: u32) {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
    }

    /// Closes the current message (fills in its length).
    pub fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends a fixed header (ifinfomsg, rtmsg, nfgenmsg, ...), padded.
    pub fn raw(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let n = align4(self.buf.len()) - self.buf.len();
        self.buf.extend(std::iter::repeat_n(0u8, n));
    }

    /// Appends an attribute.
    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    /// A u8 attribute.
    pub fn attr_u8(&mut self, ty: u16, v: u8) {
        self.attr(ty, &[v]);
    }

    /// A host-endian u32 attribute.
    pub fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A big-endian u32 attribute (nf_tables uses network order).
    pub fn attr_be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; close with [`MsgBuf::nest_end`].
    pub fn nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost nested attribute.
    pub fn nest_end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Iterates over the attributes in `data` as `(type, payload)`.
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((ty, payload))
    })
}

/// One received message: type, flags, seq and payload (after the header).
struct Msg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn messages(mut data: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    std::iter::from_fn(move || {
        if data.len() < HDR {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < HDR || len > data.len() {
            return None;
        }
        let m = Msg {
            ty: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[HDR..len],
        };
        data = &data[align4(len).min(data.len())..];
        Some(m)
    })
}

/// Parses an NLMSG_ERROR payload: `Ok(())` for an ack, the error otherwise.
fn parse_error(m: &Msg<'_>) -> Result<(), NlError> {
    if m.payload.len() < 4 {
        return Err(NlError {
            errno: libc::EPROTO,
            msg: None,
        });
    }
    let err = i32::from_ne_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
    if err == 0 {
        return Ok(());
    }
    let mut msg = None;
    if m.flags & NLM_F_ACK_TLVS != 0 && m.payload.len() >= 4 + HDR {
        let mut off = 4 + HDR;
        if m.flags & NLM_F_CAPPED == 0 {
            let orig_len =
                u32::from_ne_bytes([m.payload[4], m.payload[5], m.payload[6], m.payload[7]])
                    as usize;
            off = 4 + align4(orig_len);
        }
        if off <= m.payload.len() {
            for (ty, v) in attrs(&m.payload[off..]) {
                if ty == NLMSGERR_ATTR_MSG {
                    let s = v.split(|&b| b == 0).next().unwrap_or_default();
                    msg = Some(String::from_utf8_lossy(s).into_owned());
                }
            }
        }
    }
    Err(NlError { errno: -err, msg })
}

/// A netlink socket bound to the network namespace it was created in.
pub(crate) struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    /// Opens a netlink socket of `proto` in the calling thread's network
    /// namespace.
    pub fn open(proto: libc::c_int) -> io::Result<NlSocket> {
        // SAFETY: plain syscall with constant arguments; the result is
        // checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            // SAFETY: `one` outlives the call and its size is passed; failure
            // only loses error strings, so it is ignored.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok(NlSocket {
            fd,
            seq: 1,
            buf: vec![0; RECV_BUF],
        })
    }

    /// The next sequence number.
    pub fn seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, data: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (the
        // kernel, pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `data` and `sa` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one datagram into the internal buffer; returns its length.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `msgs` (sequence numbers `first_seq..=last_seq`, the last one
    /// flagged `NLM_F_ACK`) and waits for the ack of `last_seq`; the first
    /// error reported for any of them is returned. Used both for single
    /// requests and for nfnetlink batches.
    pub fn send_acked(
        &mut self,
        msgs: &MsgBuf,
        first_seq: u32,
        last_seq: u32,
    ) -> Result<(), NlError> {
        self.send(msgs.as_bytes()).map_err(NlError::io)?;
        loop {
            let n = self.recv().map_err(NlError::io)?;
            let data = std::mem::take(&mut self.buf);
            let mut result = None;
            for m in messages(&data[..n]) {
                if m.ty == NLMSG_ERROR && (first_seq..=last_seq).contains(&m.seq) {
                    match parse_error(&m) {
                        Err(e) => {
                            result = Some(Err(e));
                            break;
                        }
                        Ok(()) if m.seq == last_seq => {
                            result = Some(Ok(()));
                            break;
                        }
                        Ok(()) => {}
                    }
                }
            }
            self.buf = data;
            if let Some(r) = result {
                return r;
            }
        }
    }

    /// Sends one request and returns the payload of the first reply with its
    /// sequence number (an error reply is returned as the error).
    pub fn request(&mut self, msg: &MsgBuf, seq: u32) -> Result<Vec<u8>, NlError> {
        self.send(msg.as_bytes()).map_err(NlError::io)?;
        loop {
            let n = self.recv().map_err(NlError::io)?;
            for m in messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                if m.ty == NLMSG_ERROR {
                    parse_error(&m)?;
                    continue;
                }
                return Ok(m.payload.to_vec());
            }
        }
    }

    /// Sends a dump request and calls `f(type, payload)` for every reply
    /// until `NLMSG_DONE`.
    pub fn dump(
        &mut self,
        msg: &MsgBuf,
        seq: u32,
        mut f: impl FnMut(u16, &[u8]),
    ) -> Result<(), NlError> {
        self.send(msg.as_bytes()).map_err(NlError::io)?;
        loop {
            let n = self.recv().map_err(NlError::io)?;
            for m in messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        parse_error(&m)?;
                        return Ok(());
                    }
                    _ => {
                        f(m.ty, m.payload);
                        if m.flags & NLM_F_MULTI == 0 {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_round_trip() {
        let mut b = MsgBuf::new();
        b.begin(16, NLM_F_REQUEST, 7);
        b.raw(&[1, 2, 3]);
        b.nest(18);
        b.attr_str(1, "veth");
        b.attr_u32(2, 5);
        b.nest_end();
        b.end();
        let bytes = b.as_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let m = messages(bytes).next().unwrap();
        assert_eq!((m.ty, m.seq), (16, 7));
        let outer: Vec<_> = attrs(&m.payload[4..]).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, 18);
        let inner: Vec<_> = attrs(outer[0].1).collect();
        assert_eq!(inner[0], (1, &b"veth\0"[..]));
        assert_eq!(inner[1], (2, &5u32.to_ne_bytes()[..]));
    }
}
