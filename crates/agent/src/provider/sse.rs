//! Server-sent events (the WHATWG `text/event-stream` format) read from any
//! [`BufRead`]: `event:`/`data:`/`id:`/`retry:` fields, data spread over
//! several lines, `:` comments, LF / CRLF / CR line ends, and dispatch on a
//! blank line.
//!
//! One deliberate leniency: an event still pending when the stream ends (its
//! blank line never came) is dispatched rather than dropped, because some
//! servers end with `data: [DONE]` and no blank line.

use std::io::{self, BufRead, Read};

/// Bound on one event (line or accumulated data): a server cannot make the
/// reader buffer more than this.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its type (`event:` field; `message` when the server gave none).
    pub event: String,
    /// Its data: the `data:` lines joined with `\n`.
    pub data: String,
    /// The last `id:` seen so far in the stream, if any.
    pub id: Option<String>,
    /// The `retry:` field of this event (milliseconds), if it had one.
    pub retry: Option<u64>,
}

/// Reads events one at a time.
#[derive(Debug)]
pub struct SseReader<R> {
    inner: R,
    line: Vec<u8>,
    /// Lines already split off the current physical read (CR-only line ends).
    pending: std::collections::VecDeque<String>,
    first_line: bool,
    eof: bool,
    last_id: Option<String>,
}

/// The fields of the event being built.
#[derive(Default)]
struct Builder {
    event: String,
    data: String,
    has_data: bool,
    retry: Option<u64>,
}

impl<R: BufRead> SseReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> SseReader<R> {
        SseReader {
            inner,
            line: Vec::new(),
            pending: std::collections::VecDeque::new(),
            first_line: true,
            eof: false,
            last_id: None,
        }
    }

    /// The next event; `Ok(None)` at the end of the stream.
    pub fn next_event(&mut self) -> io::Result<Option<Event>> {
        let mut b = Builder::default();
        loop {
            let Some(line) = self.next_line()? else {
                // End of stream: dispatch what is pending (see module doc).
                return Ok(self.dispatch(b));
            };
            if line.is_empty() {
                if let Some(ev) = self.dispatch(std::mem::take(&mut b)) {
                    return Ok(Some(ev));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.find(':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(' ').unwrap_or(v))
                }
                None => (line.as_str(), ""),
            };
            match field {
                "event" => b.event = value.to_string(),
                "data" => {
                    if b.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                        return Err(too_big());
                    }
                    if b.has_data {
                        b.data.push('\n');
                    }
                    b.data.push_str(value);
                    b.has_data = true;
                }
                "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
                "retry" => {
                    if let Ok(ms) = value.parse::<u64>() {
                        b.retry = Some(ms);
                    }
                }
                _ => {}
            }
        }
    }

    /// The event `b` describes, or `None` when it has no data (the spec's
    /// "empty data buffer: reset and do not dispatch").
    fn dispatch(&self, b: Builder) -> Option<Event> {
        if !b.has_data {
            return None;
        }
        Some(Event {
            event: if b.event.is_empty() {
                "message".to_string()
            } else {
                b.event
            },
            data: b.data,
            id: self.last_id.clone(),
            retry: b.retry,
        })
    }

    /// The next line without its terminator; `None` at the end.
    fn next_line(&mut self) -> io::Result<Option<String>> {
        if let Some(l) = self.pending.pop_front() {
            return Ok(Some(l));
        }
        if self.eof {
            return Ok(None);
        }
        self.line.clear();
        let limit = u64::try_from(MAX_EVENT_BYTES).unwrap_or(u64::MAX);
        let n = (&mut self.inner)
            .take(limit)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            self.eof = true;
            return Ok(None);
        }
        let terminated = self.line.last() == Some(&b'\n');
        if !terminated && n >= MAX_EVENT_BYTES {
            return Err(too_big());
        }
        if terminated {
            self.line.pop();
        } else {
            self.eof = true;
        }
        let mut bytes: &[u8] = &self.line;
        if self.first_line {
            self.first_line = false;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        // `\r\n` ends one line; a lone `\r` also ends one.
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = String::from_utf8_lossy(bytes);
        let mut parts = text.split('\r');
        let first = parts.next().unwrap_or_default().to_string();
        self.pending.extend(parts.map(str::to_string));
        Ok(Some(first))
    }
}

impl<R: BufRead> Iterator for SseReader<R> {
    type Item = io::Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

fn too_big() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a server-sent event is larger than {MAX_EVENT_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(s: &str) -> Vec<Event> {
        SseReader::new(s.as_bytes())
            .collect::<io::Result<Vec<_>>>()
            .unwrap()
    }

    fn ev(event: &str, data: &str) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
            id: None,
            retry: None,
        }
    }

    #[test]
    fn event_and_data_fields() {
        let got = events("event: ping\ndata: {\"type\": \"ping\"}\n\ndata: x\n\n");
        assert_eq!(
            got,
            vec![ev("ping", "{\"type\": \"ping\"}"), ev("message", "x")]
        );
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let got = events("data: a\ndata:b\ndata\ndata:  c\n\n");
        assert_eq!(got, vec![ev("message", "a\nb\n\n c")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let got = events(": keep-alive\n\nfoo: bar\n:x\ndata: 1\n\n");
        assert_eq!(got, vec![ev("message", "1")]);
    }

    #[test]
    fn crlf_and_cr_line_ends() {
        let got = events("event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n");
        assert_eq!(got, vec![ev("a", "1"), ev("b", "2"), ev("message", "3")]);
    }

    #[test]
    fn blank_line_without_data_dispatches_nothing_and_resets_type() {
        let got = events("event: lost\n\ndata: kept\n\n");
        assert_eq!(got, vec![ev("message", "kept")]);
    }

    #[test]
    fn id_persists_and_retry_is_parsed() {
        let got = events("id: 7\nretry: 1500\ndata: a\n\ndata: b\n\n");
        assert_eq!(got[0].id.as_deref(), Some("7"));
        assert_eq!(got[0].retry, Some(1500));
        assert_eq!(got[1].id.as_deref(), Some("7"));
        assert_eq!(got[1].retry, None);
    }

    #[test]
    fn pending_event_at_eof_is_dispatched() {
        let got = events("data: 1\n\ndata: [DONE]");
        assert_eq!(got, vec![ev("message", "1"), ev("message", "[DONE]")]);
        let got = events("data: [DONE]\n");
        assert_eq!(got, vec![ev("message", "[DONE]")]);
    }

    #[test]
    fn bom_is_stripped_and_empty_stream_has_no_events() {
        assert_eq!(events("\u{feff}data: x\n\n"), vec![ev("message", "x")]);
        assert!(events("").is_empty());
        assert!(events("\n\n: only comments\n\n").is_empty());
    }

    #[test]
    fn reads_across_small_buffers() {
        let text = "event: message_start\ndata: {\"a\":1}\n\n".repeat(50);
        let reader = io::BufReader::with_capacity(3, text.as_bytes());
        let got: Vec<Event> = SseReader::new(reader).collect::<io::Result<_>>().unwrap();
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|e| e == &ev("message_start", "{\"a\":1}")));
    }

    #[test]
    fn io_errors_surface() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::TimedOut, "slow"))
            }
        }
        let mut r = SseReader::new(io::BufReader::new(Broken));
        let err = r.next_event().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
