//! Secrets (API keys): the value is kept, but never printed.

use std::fmt;

use serde::{Serialize, Serializer};

/// A secret string. `Debug`, `Display` and `Serialize` all print `***`;
/// only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call this only where the value is used (e.g. an
    /// HTTP header), never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `${NAME}` could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolationError {
    /// The variable is not set.
    #[error("environment variable {0} is not set (referenced as ${{{0}}}); export it, or use ${{{0}:-default}}")]
    Missing(String),
    /// `${` without `}` or with a bad name.
    #[error("bad variable reference {0:?}: write ${{NAME}} with NAME made of letters, digits and _ (use $${{ for a literal ${{)")]
    Syntax(String),
}

/// Expands `${NAME}` and `${NAME:-default}` with `env`; `$${` is a literal
/// `${`. Any other `$` is kept as is.
pub fn interpolate(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolationError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix("${") {
            out.push_str("${");
            rest = a;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err(InterpolationError::Syntax(rest.chars().take(40).collect()));
        };
        let body = &body_start[..end];
        let (name, default) = match body.find(":-") {
            Some(j) => (&body[..j], Some(&body[j + 2..])),
            None => (body, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(InterpolationError::Syntax(format!("${{{body}}}")));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(InterpolationError::Missing(name.to_string())),
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "KEY").then(|| "sk-123".to_string())
    }

    #[test]
    fn expands() {
        assert_eq!(interpolate("${KEY}", &env).unwrap(), "sk-123");
        assert_eq!(interpolate("a-${KEY}-b", &env).unwrap(), "a-sk-123-b");
        assert_eq!(interpolate("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(interpolate("$${KEY} $5", &env).unwrap(), "${KEY} $5");
        assert_eq!(
            interpolate("${NOPE}", &env),
            Err(InterpolationError::Missing("NOPE".into()))
        );
        assert!(matches!(
            interpolate("${KEY", &env),
            Err(InterpolationError::Syntax(_))
        ));
        assert!(matches!(
            interpolate("${1X}", &env),
            Err(InterpolationError::Syntax(_))
        ));
    }

    #[test]
    fn never_printed() {
        let s = Secret::new("sk-live-abc");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "sk-live-abc");
    }
}
