//! A minimal TLS ClientHello reader: finds the SNI `host_name`, across TLS
//! records and TCP segments, without decrypting anything (the ClientHello is
//! plaintext in TLS 1.2 and 1.3; with ECH only the outer, public name is seen).

/// What the first bytes of a tunnel say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // ClientHello is the TLS message's name
pub(crate) enum Hello {
    /// Not enough bytes yet.
    NeedMore,
    /// Not a TLS handshake record: not inspected.
    NotTls,
    /// A complete ClientHello, with its SNI host name if it has one
    /// (lower-case, trailing dot removed).
    ClientHello(Option<String>),
    /// A TLS handshake record that is not a sane ClientHello.
    Malformed,
}

/// Largest ClientHello accepted (real ones are under 16 KiB even with
/// post-quantum key shares).
pub(crate) const MAX_HELLO: usize = 64 * 1024;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Parses the start of a client-to-server byte stream.
pub(crate) fn parse_client_hello(buf: &[u8]) -> Hello {
    let Some(&first) = buf.first() else {
        return Hello::NeedMore;
    };
    if first != 0x16 {
        return Hello::NotTls;
    }
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return need_more(buf);
        };
        if header[0] != 0x16 || header[1] != 0x03 {
            return Hello::Malformed;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16384 + 2048 {
            return Hello::Malformed;
        }
        let Some(payload) = buf.get(pos + 5..pos + 5 + len) else {
            return need_more(buf);
        };
        handshake.extend_from_slice(payload);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != 0x01 {
                return Hello::Malformed;
            }
            let msg_len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if msg_len > MAX_HELLO {
                return Hello::Malformed;
            }
            if let Some(body) = handshake.get(4..4 + msg_len) {
                return match parse_body(body) {
                    Some(sni) => Hello::ClientHello(sni),
                    None => Hello::Malformed,
                };
            }
        }
    }
}

fn need_more(buf: &[u8]) -> Hello {
    if buf.len() > MAX_HELLO + 1024 {
        Hello::Malformed
    } else {
        Hello::NeedMore
    }
}

/// `Some(sni)` for a well-formed body, `None` if malformed.
fn parse_body(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.buf.is_empty() {
        return Some(None);
    }
    let mut exts = Reader { buf: r.vec16()? };
    let mut sni = None;
    while !exts.buf.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != 0 {
            continue;
        }
        if sni.is_some() {
            return None; // two SNI extensions
        }
        let mut list = Reader {
            buf: Reader { buf: data }.vec16()?,
        };
        while !list.buf.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                if sni.is_some() || name.is_empty() || !name.is_ascii() {
                    return None;
                }
                let s = std::str::from_utf8(name).ok()?;
                let s = s.strip_suffix('.').unwrap_or(s);
                sni = Some(s.to_ascii_lowercase());
            }
        }
    }
    Some(sni)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rustls_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_from_a_real_client_hello() {
        let hello = rustls_hello("API.Test");
        assert_eq!(
            parse_client_hello(&hello),
            Hello::ClientHello(Some("api.test".into()))
        );
        // Every strict prefix needs more bytes.
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Hello::NeedMore,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn ip_server_name_has_no_sni() {
        let hello = rustls_hello("127.0.0.1");
        assert_eq!(parse_client_hello(&hello), Hello::ClientHello(None));
    }

    #[test]
    fn hello_fragmented_over_records() {
        let hello = rustls_hello("api.test");
        let payload = &hello[5..];
        let mut split = Vec::new();
        for chunk in payload.chunks(7) {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            split.extend_from_slice(chunk);
        }
        assert_eq!(
            parse_client_hello(&split),
            Hello::ClientHello(Some("api.test".into()))
        );
    }

    #[test]
    fn not_tls_and_garbage() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"SSH-2.0-x"), Hello::NotTls);
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0, 0]),
            Hello::Malformed
        );
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0, 4, 2, 0, 0, 0]),
            Hello::Malformed
        );
        // A ClientHello whose body is truncated inside its declared length.
        let mut bad = vec![0x16, 0x03, 0x01, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0];
        assert_eq!(parse_client_hello(&bad), Hello::Malformed);
        bad[12] = 1;
        assert_eq!(parse_client_hello(&bad), Hello::Malformed);
    }
}
