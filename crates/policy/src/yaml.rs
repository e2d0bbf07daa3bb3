//! A YAML (and JSON / JSON-with-comments) reader that keeps the line and
//! column of every node, so that every configuration error can say where it
//! is.
//!
//! The file is parsed with `yaml-rust2`'s event parser into a small tree of
//! [`Node`]s. Aliases are refused (no "billion laughs"), nesting is capped at
//! [`MAX_DEPTH`], and only one document is allowed.

use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deepest nesting of maps and lists accepted (the schema needs 6).
pub const MAX_DEPTH: usize = 64;

/// A position in the configuration file (both 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
pub struct Pos {
    /// Line, 1-based.
    pub line: usize,
    /// Column, 1-based.
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// A scalar's quoting: plain scalars are typed (`true`, `12`, `null`),
/// quoted ones are always strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    /// Unquoted.
    Plain,
    /// Single- or double-quoted, or a block scalar.
    Quoted,
}

/// A node of the positioned tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar, as written (interpretation is up to the schema).
    Scalar(String, ScalarStyle),
    /// A sequence.
    List(Vec<Node>),
    /// A mapping, in file order. Keys are scalars (with their positions).
    Map(Vec<(Node, Node)>),
}

/// A value with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it starts.
    pub pos: Pos,
}

impl Node {
    /// The scalar text if this is a scalar.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    /// True for a plain `null`, `~` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s, ScalarStyle::Plain) if s.is_empty() || s == "~" || s == "null" || s == "Null" || s == "NULL")
    }

    /// A short description of the node's kind, for "expected X, found Y".
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(_, ScalarStyle::Quoted) => "a string",
            Value::Scalar(s, ScalarStyle::Plain) => {
                if self.is_null() {
                    "null"
                } else if s == "true" || s == "false" {
                    "a boolean"
                } else if s.parse::<f64>().is_ok() {
                    "a number"
                } else {
                    "a string"
                }
            }
            Value::List(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

/// The file could not be read as YAML/JSON at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct SyntaxError {
    /// Where the parser stopped.
    pub pos: Pos,
    /// What the parser said, and how to fix it.
    pub message: String,
}

enum Frame {
    List(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn fail(&mut self, pos: Pos, message: &str) {
        if self.error.is_none() {
            self.error = Some(SyntaxError {
                pos,
                message: message.to_string(),
            });
        }
    }

    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::List(_, items)) => items.push(node),
            Some(Frame::Map(start, entries, key)) => match key.take() {
                None => {
                    // A map's position is where its first key is, if earlier
                    // markers pointed past it (block maps).
                    if entries.is_empty() && node.pos < *start {
                        *start = node.pos;
                    }
                    *key = Some(node)
                }
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = Pos::from(mark);
        match ev {
            Event::Alias(_) => self.fail(
                pos,
                "YAML aliases (*name) are not supported in nanoclaw.yaml: write the value out",
            ),
            Event::Scalar(s, style, _, _) => {
                let style = match style {
                    TScalarStyle::Plain => ScalarStyle::Plain,
                    _ => ScalarStyle::Quoted,
                };
                self.push_value(Node {
                    value: Value::Scalar(s, style),
                    pos,
                });
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(
                        pos,
                        &format!(
                            "nesting deeper than {MAX_DEPTH} levels: this is not a nanoclaw config"
                        ),
                    );
                    return;
                }
                if matches!(ev, Event::SequenceStart(..)) {
                    self.stack.push(Frame::List(pos, Vec::new()));
                } else {
                    self.stack.push(Frame::Map(pos, Vec::new(), None));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::List(p, items)) => Node {
                        value: Value::List(items),
                        pos: p,
                    },
                    Some(Frame::Map(p, entries, _)) => Node {
                        value: Value::Map(entries),
                        pos: p,
                    },
                    None => return,
                };
                self.push_value(node);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Blanks out `//` and `/* */` comments outside strings when the text is
/// JSON (starts with `{`), keeping every other byte where it was so that
/// positions stay right. OpenClaw's config (seed 003) is JSON with comments.
pub fn strip_json_comments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut in_str = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_str {
            if b == b'\\' {
                i += 2;
                continue;
            }
            if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let start = i;
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                let end = (i + 2).min(bytes.len());
                for o in out.iter_mut().take(end).skip(start) {
                    if *o != b'\n' {
                        *o = b' ';
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII spaces, and only whole
    // comment runs, so multi-byte characters inside comments are blanked
    // byte by byte: still valid UTF-8 (all spaces). Fall back to the
    // original text if not.
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// True when the text looks like JSON (first non-blank character `{`).
pub fn looks_like_json(text: &str) -> bool {
    text.trim_start_matches('\u{feff}')
        .trim_start()
        .starts_with('{')
}

/// Parses YAML or JSON (with comments) into a positioned tree. An empty file
/// is an empty map.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let owned;
    let text = if looks_like_json(text) {
        owned = strip_json_comments(text);
        owned.as_str()
    } else {
        text
    };
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        return Err(SyntaxError {
            pos: Pos::from(*e.marker()),
            message: format!("not valid YAML or JSON: {}", e.info()),
        });
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    let mut docs = b.docs;
    if docs.len() > 1 {
        let pos = docs[1].pos;
        return Err(SyntaxError {
            pos,
            message: "more than one YAML document (---) in the file: keep one".to_string(),
        });
    }
    Ok(docs.pop().unwrap_or(Node {
        value: Value::Map(Vec::new()),
        pos: Pos { line: 1, col: 1 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nbb:\n  c: x\n").unwrap();
        let Value::Map(m) = &n.value else { panic!() };
        assert_eq!(m[0].0.pos, Pos { line: 1, col: 1 });
        assert_eq!(m[1].0.pos, Pos { line: 2, col: 1 });
        assert_eq!(m[1].1.pos, Pos { line: 3, col: 3 });
        let Value::Map(inner) = &m[1].1.value else {
            panic!()
        };
        assert_eq!(inner[0].1.pos, Pos { line: 3, col: 6 });
    }

    #[test]
    fn json_with_comments() {
        let n =
            parse("{\n  \"a\": \"x\", // comment \"quoted\"\n  /* block\n */ \"b\": [1,2,],\n}\n")
                .unwrap();
        let Value::Map(m) = &n.value else { panic!() };
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].0.pos, Pos { line: 4, col: 5 });
        // a "//" inside a string is not a comment
        let n = parse("{\"u\": \"http://x\"}").unwrap();
        let Value::Map(m) = &n.value else { panic!() };
        assert_eq!(m[0].1.as_scalar(), Some("http://x"));
    }

    #[test]
    fn aliases_and_depth_refused() {
        assert!(parse("a: &x 1\nb: *x\n").is_err());
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&deep).is_err());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }

    #[test]
    fn empty_is_empty_map() {
        assert_eq!(parse("").unwrap().value, Value::Map(vec![]));
        assert_eq!(
            parse("# only a comment\n").unwrap().value,
            Value::Map(vec![])
        );
    }
}
