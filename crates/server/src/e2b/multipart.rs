//! A streaming `multipart/form-data` reader for `/files` uploads: parts
//! come out as their bytes arrive, so a large upload is never held in
//! memory. Header blocks are bounded; the whole body is bounded by the
//! upload limit.

use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};

use super::body::{next_chunk, percent_decode, BodyError};

/// Largest header block of one part.
const MAX_PART_HEADERS: usize = 16 << 10;

/// Why a multipart body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// Reading the body failed (too large, too slow, broken).
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The body is not valid multipart.
    #[error("malformed multipart body: {0}")]
    Malformed(String),
}

/// What a part's headers say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders {
    /// The form field name.
    pub name: Option<String>,
    /// The file name (E2B's SDK puts the destination path here).
    pub filename: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preamble,
    AfterDelimiter,
    InPart,
    Done,
}

/// Reads parts from a body. Call [`Multipart::next_part`], then
/// [`Multipart::next_data`] until `None`, and again.
pub struct Multipart {
    body: Body,
    buf: BytesMut,
    delimiter: Vec<u8>,
    idle: Duration,
    pace: super::body::Pace,
    stage: Stage,
    eof: bool,
    limit: u64,
    total: u64,
    failed: Option<MultipartError>,
}

/// The boundary of a `multipart/form-data` content type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let media = parts.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= 200).then(|| v.to_owned())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Multipart {
    /// A reader of `body` with `boundary`, refusing more than `limit`
    /// bytes in total and waiting at most `idle` for each chunk.
    pub fn new(body: Body, boundary: &str, limit: u64, idle: Duration) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        let mut buf = BytesMut::new();
        // The first delimiter need not follow a CRLF; pretend it does.
        buf.extend_from_slice(b"\r\n");
        Multipart {
            body,
            buf,
            delimiter,
            idle,
            stage: Stage::Preamble,
            eof: false,
            limit,
            total: 0,
            failed: None,
            pace: super::body::Pace::new(),
        }
    }

    /// The body must keep `pace` (see [`super::body::Pace`]).
    pub fn with_pace(mut self, pace: super::body::Pace) -> Self {
        self.pace = pace;
        self
    }

    /// The error that stopped the reader, if any.
    pub fn failure(&self) -> Option<&MultipartError> {
        self.failed.as_ref()
    }

    fn fail<T>(&mut self, e: MultipartError) -> Result<T, MultipartError> {
        self.failed = Some(e.clone());
        self.stage = Stage::Done;
        Err(e)
    }

    /// Reads more of the body; false at its end.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        match next_chunk(&mut self.body, self.idle).await {
            Ok(Some(chunk)) => {
                self.total += chunk.len() as u64;
                if self.total > self.limit {
                    return self.fail(BodyError::TooLarge { limit: self.limit }.into());
                }
                if let Err(e) = self.pace.add(chunk.len()) {
                    return self.fail(e.into());
                }
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            Ok(None) => {
                self.eof = true;
                Ok(false)
            }
            Err(e) => self.fail(e.into()),
        }
    }

    fn malformed<T>(&mut self, why: &str) -> Result<T, MultipartError> {
        self.fail(MultipartError::Malformed(why.to_owned()))
    }

    /// Skips to the next part and returns its headers; `None` after the
    /// last part.
    pub async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while self.stage == Stage::InPart {
            self.next_data().await?;
        }
        if self.stage == Stage::Preamble {
            self.skip_preamble().await?;
        }
        if self.stage == Stage::Done {
            return Ok(None);
        }
        // After a delimiter: "--" ends the body, else CRLF and headers.
        while self.buf.len() < 2 {
            if !self.fill().await? {
                return self.malformed("the body ended after a boundary");
            }
        }
        if &self.buf[..2] == b"--" {
            self.stage = Stage::Done;
            return Ok(None);
        }
        let headers = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let block = self.buf.split_to(end + 4);
                break parse_headers(&block[..end]);
            }
            if self.buf.len() > MAX_PART_HEADERS {
                return self.malformed("a part's headers are too large");
            }
            if !self.fill().await? {
                return self.malformed("the body ended inside a part's headers");
            }
        };
        self.stage = Stage::InPart;
        Ok(Some(headers))
    }

    async fn skip_preamble(&mut self) -> Result<(), MultipartError> {
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                self.buf.advance(at + self.delimiter.len());
                self.stage = Stage::AfterDelimiter;
                return Ok(());
            }
            // Keep only what could be the start of the delimiter.
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let drop = self.buf.len() - keep;
                self.buf.advance(drop);
            }
            if !self.fill().await? {
                return self.malformed("no multipart boundary in the body");
            }
        }
    }

    /// The next bytes of the current part; `None` at its end.
    pub async fn next_data(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.stage != Stage::InPart {
            return Ok(None);
        }
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                let data = self.buf.split_to(at).freeze();
                self.buf.advance(self.delimiter.len());
                self.stage = Stage::AfterDelimiter;
                return Ok((!data.is_empty()).then_some(data));
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let safe = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(safe).freeze()));
            }
            if !self.fill().await? {
                return self.malformed("the body ended inside a part");
            }
        }
    }
}

/// Parses a part's header block (CRLF-separated `Name: value` lines).
fn parse_headers(block: &[u8]) -> PartHeaders {
    let text = String::from_utf8_lossy(block);
    let mut out = PartHeaders::default();
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("content-disposition") {
            let (field, file) = disposition(value);
            out.name = field;
            out.filename = file;
        }
    }
    out
}

/// Splits a header value on `;` outside quoted strings.
fn split_params(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

/// A parameter value: a quoted string (backslash escapes undone) or a
/// token.
fn unquote(v: &str) -> String {
    let v = v.trim();
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `form-data; name="file"; filename="…"` → (name, filename).
/// `filename*=UTF-8''…` (RFC 5987) wins over `filename`.
fn disposition(value: &str) -> (Option<String>, Option<String>) {
    let mut name = None;
    let mut filename = None;
    let mut filename_ext = None;
    for param in split_params(value).iter().skip(1) {
        let Some((k, v)) = param.split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "name" => name = Some(unquote(v)),
            "filename" => filename = Some(unquote(v)),
            "filename*" => {
                let v = unquote(v);
                if let Some((charset, rest)) = v.split_once('\'') {
                    if charset.eq_ignore_ascii_case("utf-8") {
                        let encoded = rest.split_once('\'').map_or(rest, |(_, e)| e);
                        filename_ext = Some(percent_decode(encoded, false));
                    }
                }
            }
            _ => {}
        }
    }
    (name, filename_ext.or(filename))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn body_in_chunks(data: &[u8], size: usize) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(stream::iter(chunks))
    }

    const SAMPLE: &[u8] = b"preamble\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"/home/user/a \\\"q\\\".txt\"\r\n\
Content-Type: application/octet-stream\r\n\r\n\
hello\r\n--Xy-not-yet\r\nworld\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"b.bin\"\r\n\r\n\
\r\n--XyZ--\r\nepilogue";

    async fn collect(size: usize) -> Vec<(PartHeaders, Vec<u8>)> {
        let mut m = Multipart::new(
            body_in_chunks(SAMPLE, size),
            "XyZ",
            1 << 20,
            Duration::from_secs(5),
        );
        let mut out = Vec::new();
        while let Some(h) = m.next_part().await.unwrap() {
            let mut data = Vec::new();
            while let Some(chunk) = m.next_data().await.unwrap() {
                data.extend_from_slice(&chunk);
            }
            out.push((h, data));
        }
        out
    }

    #[tokio::test]
    async fn parts_survive_any_split() {
        for size in [1, 2, 3, 5, 7, 16, 1000] {
            let parts = collect(size).await;
            assert_eq!(parts.len(), 2, "chunk size {size}");
            assert_eq!(parts[0].0.name.as_deref(), Some("file"));
            assert_eq!(
                parts[0].0.filename.as_deref(),
                Some("/home/user/a \"q\".txt")
            );
            assert_eq!(
                parts[0].1,
                b"hello\r\n--Xy-not-yet\r\nworld".to_vec(),
                "chunk size {size}"
            );
            assert_eq!(parts[1].0.filename.as_deref(), Some("b.bin"));
            assert_eq!(parts[1].1, b"".to_vec());
        }
    }

    #[tokio::test]
    async fn limit_and_truncation() {
        let mut m = Multipart::new(body_in_chunks(SAMPLE, 4), "XyZ", 20, Duration::from_secs(5));
        let err = async {
            while m.next_part().await?.is_some() {
                while m.next_data().await?.is_some() {}
            }
            Ok::<_, MultipartError>(())
        }
        .await
        .unwrap_err();
        assert_eq!(err, MultipartError::Body(BodyError::TooLarge { limit: 20 }));

        let cut = &SAMPLE[..SAMPLE.len() - 30];
        let mut m = Multipart::new(
            body_in_chunks(cut, 8),
            "XyZ",
            1 << 20,
            Duration::from_secs(5),
        );
        let mut result = Ok(());
        while let Ok(Some(_)) = m.next_part().await {
            loop {
                match m.next_data().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        assert!(matches!(result, Err(MultipartError::Malformed(_))) || m.failure().is_some());
    }

    #[test]
    fn boundaries_and_dispositions() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        let (n, f) = disposition(" form-data; name=\"file\"; filename*=UTF-8''%C3%A9.txt");
        assert_eq!(n.as_deref(), Some("file"));
        assert_eq!(f.as_deref(), Some("é.txt"));
    }
}
