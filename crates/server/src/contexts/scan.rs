//! Splits an interpreter's output stream into the user's text and the
//! driver's control records (`MARK` + JSON + `\n`, see the module docs of
//! [`super`]). Pure and unit-tested: the bytes arrive in arbitrary chunks,
//! so a marker or a UTF-8 sequence may be cut anywhere.

/// One piece of a stream.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// The user's output (never empty).
    Text(String),
    /// A control record's payload (without marker and newline).
    Record(Vec<u8>),
    /// A record longer than the limit was dropped.
    Oversized,
}

/// The scanner of one stream.
pub struct Scanner {
    mark: Vec<u8>,
    /// Undecided bytes: a possible start of the marker, or an incomplete
    /// UTF-8 sequence.
    pending: Vec<u8>,
    /// Inside a record: its bytes so far.
    record: Option<Vec<u8>>,
    /// Inside a record being dropped (too long).
    skipping: bool,
    max_record: usize,
}

impl Scanner {
    /// A scanner for records introduced by `mark` of at most `max_record` bytes.
    pub fn new(mark: Vec<u8>, max_record: usize) -> Scanner {
        Scanner {
            mark,
            pending: Vec::new(),
            record: None,
            skipping: false,
            max_record,
        }
    }

    /// Feeds a chunk; returns the pieces it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(chunk);
        let mut at = 0;
        while at < buf.len() {
            if self.record.is_some() || self.skipping {
                let rest = &buf[at..];
                match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.take_record_bytes(&rest[..i], &mut out);
                        if let Some(r) = self.record.take() {
                            out.push(Piece::Record(r));
                        }
                        self.skipping = false;
                        at += i + 1;
                    }
                    None => {
                        self.take_record_bytes(rest, &mut out);
                        at = buf.len();
                    }
                }
                continue;
            }
            let rest = &buf[at..];
            match find(rest, &self.mark) {
                Some(i) => {
                    emit_text(&rest[..i], &mut out);
                    self.record = Some(Vec::new());
                    at += i + self.mark.len();
                }
                None => {
                    let keep = self.keep_len(rest);
                    let cut = rest.len() - keep;
                    emit_text(&rest[..cut], &mut out);
                    self.pending = rest[cut..].to_vec();
                    at = buf.len();
                }
            }
        }
        out
    }

    fn take_record_bytes(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        if self.skipping {
            return;
        }
        if let Some(r) = self.record.as_mut() {
            if r.len() + bytes.len() > self.max_record {
                self.record = None;
                self.skipping = true;
                out.push(Piece::Oversized);
            } else {
                r.extend_from_slice(bytes);
            }
        }
    }

    /// How many trailing bytes of `text` must wait for the next chunk: a
    /// prefix of the marker, or an incomplete UTF-8 sequence.
    fn keep_len(&self, text: &[u8]) -> usize {
        let max = self.mark.len().saturating_sub(1).min(text.len());
        let marker = (1..=max)
            .rev()
            .find(|&k| self.mark.starts_with(&text[text.len() - k..]))
            .unwrap_or(0);
        marker.max(incomplete_utf8(text))
    }
}

/// The length of an incomplete UTF-8 sequence at the end of `b` (0 to 3).
fn incomplete_utf8(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

fn emit_text(b: &[u8], out: &mut Vec<Piece>) {
    if !b.is_empty() {
        out.push(Piece::Text(String::from_utf8_lossy(b).into_owned()));
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = Scanner::new(b"\x1eNONCE".to_vec(), 64);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        // Merge adjacent texts: chunking may split them anywhere.
        let mut merged: Vec<Piece> = Vec::new();
        for p in out {
            match (merged.last_mut(), p) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    #[test]
    fn text_and_records() {
        let input = b"hello\n\x1eNONCE{\"type\":\"end\"}\nbye";
        let want = vec![
            Piece::Text("hello\n".into()),
            Piece::Record(b"{\"type\":\"end\"}".to_vec()),
            Piece::Text("bye".into()),
        ];
        assert_eq!(all(&[input]), want);
        // Every split point gives the same pieces.
        for i in 0..input.len() {
            assert_eq!(all(&[&input[..i], &input[i..]]), want, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(all(&bytes), want);
    }

    #[test]
    fn a_partial_marker_is_text_when_it_does_not_complete() {
        assert_eq!(
            all(&[b"a\x1eNON", b"X"]),
            vec![Piece::Text("a\u{1e}NONX".into())]
        );
    }

    #[test]
    fn utf8_cut_in_the_middle() {
        let s = "é€😀".as_bytes();
        for i in 0..s.len() {
            assert_eq!(all(&[&s[..i], &s[i..]]), vec![Piece::Text("é€😀".into())]);
        }
    }

    #[test]
    fn oversized_records_are_dropped() {
        let mut rec = b"\x1eNONCE".to_vec();
        rec.extend(std::iter::repeat_n(b'x', 100));
        rec.extend_from_slice(b"\nafter");
        assert_eq!(
            all(&[&rec]),
            vec![Piece::Oversized, Piece::Text("after".into())]
        );
    }
}
