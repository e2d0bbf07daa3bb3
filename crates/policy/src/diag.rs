//! Diagnostics: one per problem, each with the key path, line, column,
//! what is wrong and (for typos) the likely intended key.

use std::fmt;

use serde::Serialize;

use crate::yaml::Pos;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The configuration is refused.
    Error,
    /// Accepted, but the operator should know.
    Warning,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Key path as written in the file, e.g. `agents.list[0].sandbox.memory`.
    pub path: String,
    /// Where the offending key or value starts.
    pub line: usize,
    /// Column (1-based).
    pub col: usize,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The key that was probably meant, for an unknown key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub did_you_mean: Option<String>,
}

impl Diagnostic {
    /// An error at `pos`.
    pub fn error(path: &str, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            path: path.to_string(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
            did_you_mean: None,
        }
    }

    /// A warning at `pos`.
    pub fn warning(path: &str, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(path, pos, message)
        }
    }

    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `LINE:COL: error: PATH: MESSAGE`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}: {sev}: ", self.line, self.col)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// The key among `candidates` closest to `key` (by edit distance, ignoring
/// case and `_`/`-`), if it is close enough to be a likely typo.
pub fn suggest<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let k = norm(key);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = strsim::levenshtein(&k, &norm(c));
        let limit = (k.chars().count().max(c.len()) / 3).max(2);
        let better = match best {
            None => true,
            Some((bd, _)) => d < bd,
        };
        if d <= limit && better {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let keys = ["memory", "memorySwap", "cpus", "workspaceAccess"];
        assert_eq!(suggest("memroy", keys), Some("memory"));
        assert_eq!(suggest("workspace_acess", keys), Some("workspaceAccess"));
        assert_eq!(suggest("cpu", keys), Some("cpus"));
        assert_eq!(suggest("zzzzzzzz", keys), None);
    }
}
