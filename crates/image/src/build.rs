//! `nanoclaw image build`: Dockerfiles built with nanoclaw sandboxes, a
//! build cache, setup-command layers and the Go compile-then-run helper.
//!
//! # Dockerfile support
//!
//! Parsed by [`parse_dockerfile`]: line continuations (the escape character,
//! `\` or `` ` `` by the `# escape=` directive), comments (also inside
//! continuations), blank lines, JSON (exec) and shell forms, and `$VAR`,
//! `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` substitution with quotes and
//! escapes in the instructions Docker substitutes (`FROM`, `ARG`, `ENV`,
//! `LABEL`, `WORKDIR`, `USER`, `COPY`, `ADD`, `EXPOSE`). Not in `RUN`,
//! `CMD`, `ENTRYPOINT`: their shell does it (build args reach `RUN` as
//! environment variables, as in Docker).
//!
//! | instruction | what the builder does |
//! |---|---|
//! | `ARG` (before `FROM` too) | build args (`--build-arg` overrides the default); `RUN` sees them as env, never stored in the image |
//! | `FROM IMAGE [AS NAME]` | an image of the local store, or `scratch`; one stage only (a second `FROM` is an error) |
//! | `RUN` | runs in a nanoclaw sandbox over the image so far (user per `USER`, default root *inside its user namespace*, env per `ENV` + args, workdir per `WORKDIR` else `/`, network per [`BuildOptions::network`], hardening unchanged); its writes (overlayfs upper: whiteouts, opaque dirs) become a layer. `/tmp` is the sandbox's tmpfs: nothing written there is kept |
//! | `COPY`, `ADD` | local files and directories of the context (`.dockerignore` honoured, symlinks resolved inside the context, paths leaving it refused), written into a fresh upper directory which becomes a layer; `--chown` (rootful stores), `--chmod`. `ADD` of a local tar (plain, gzip, zstd) extracts it, like Docker; URLs and git sources are refused |
//! | `ENV`, `LABEL`, `USER`, `CMD`, `ENTRYPOINT` | image config (an `ENTRYPOINT` resets an inherited `CMD`, as in Docker) |
//! | `WORKDIR` | image config; the directory is created (as a layer) when missing |
//! | `EXPOSE`, `MAINTAINER` | accepted: no effect / the `maintainer` label |
//! | `HEALTHCHECK`, `ONBUILD`, `VOLUME`, `SHELL`, `STOPSIGNAL`, `COPY --from`, `RUN --mount`, a second `FROM` | refused, naming the instruction and its line |
//!
//! # Cache
//!
//! Each step has a key chained from the previous one: the base image id,
//! then every instruction after substitution (and for `RUN` the build args
//! it sees, for `COPY`/`ADD` a hash of the copied files' names, types,
//! modes, link targets and contents). A step that makes a layer records
//! `key → layer` in `<store>/build-cache/<key>.json`; a later build with
//! the same key reuses the layer (printed `CACHED`) and runs nothing. A
//! cached layer that `image prune` removed is simply rebuilt.
//!
//! # Atomicity
//!
//! Each step works in a staging folder of the store (`tmp/<pid>-build…`,
//! removed when the step ends, and by the store's stale-staging cleanup
//! if the builder was killed). Layers enter the store whole
//! ([`Store::add_layer_from_dir`]); the image record is written last, only
//! when every step succeeded. A failed build leaves no image and no partial
//! layer (complete layers of the steps that succeeded stay as cache).
#![allow(clippy::too_many_arguments)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nanoclaw_sandbox::native::ROOTFUL_ID_BASE;
use nanoclaw_sandbox::spec::{Limits, Network, Root, User};
use nanoclaw_sandbox::{KillReason, RunOptions, SandboxSpec};
use serde::{Deserialize, Serialize};

use crate::bound::{human, layer_bytes, Watcher};
use crate::unpack::{open_path, remove_tree};
use crate::{Digest, ImageConfig, ImageError, LayerInfo, Reference, Store, UnpackMode};

// ───────────────────────────── errors ─────────────────────────────

/// What can go wrong in a build. Every message says what and where (the
/// Dockerfile line) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile does not parse.
    #[error("Dockerfile line {line}: {message}")]
    Syntax {
        /// 1-based line of the instruction.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An instruction (or a form of one) nanoclaw does not build.
    #[error(
        "Dockerfile line {line}: {instruction} is not supported by `nanoclaw image build`: {hint}"
    )]
    Unsupported {
        /// 1-based line of the instruction.
        line: usize,
        /// The instruction (or flag).
        instruction: String,
        /// Why, and what to use instead.
        hint: String,
    },
    /// A build step failed (a `RUN` exited non-zero, a `COPY` source is missing, ...).
    #[error("step {step} (Dockerfile line {line}) `{instruction}` failed: {reason}")]
    StepFailed {
        /// 1-based step number.
        step: usize,
        /// 1-based Dockerfile line.
        line: usize,
        /// The instruction as written (shortened).
        instruction: String,
        /// What happened.
        reason: String,
    },
    /// The build options are wrong (tag, context, build args).
    #[error("{0}")]
    Options(String),
    /// The image store failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The sandbox engine could not run a step.
    #[error("the sandbox for a build step could not start: {0}")]
    Sandbox(#[from] nanoclaw_sandbox::Error),
    /// Another I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn ioe(context: impl Into<String>, source: io::Error) -> BuildError {
    BuildError::Io {
        context: context.into(),
        source,
    }
}

// ───────────────────────────── parser ─────────────────────────────

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\`, or `` ` `` after `# escape=``).
    pub escape: char,
    /// The instructions, in order.
    pub instructions: Vec<Instruction>,
}

/// One instruction (a logical line: continuations joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// The keyword, upper-case (`RUN`).
    pub keyword: String,
    /// Leading `--name=value` flags (for `FROM`, `RUN`, `COPY`, `ADD`), without the `--`.
    pub flags: Vec<String>,
    /// The rest of the line, trimmed, before substitution.
    pub args: String,
}

impl Instruction {
    /// `KEYWORD [--flags] args`, for display.
    pub fn text(&self) -> String {
        let mut s = self.keyword.clone();
        for f in &self.flags {
            s.push_str(" --");
            s.push_str(f);
        }
        if !self.args.is_empty() {
            s.push(' ');
            s.push_str(&self.args);
        }
        s
    }
}

/// Parse Dockerfile text. Errors name the line.
pub fn parse_dockerfile(text: &str) -> Result<Dockerfile, BuildError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut escape = '\\';
    let mut i = 0;
    // Parser directives: `# key=value` lines at the very top.
    while i < lines.len() {
        let t = lines[i].trim();
        let Some(rest) = t.strip_prefix('#') else {
            break;
        };
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().to_ascii_lowercase();
        if k.contains(char::is_whitespace) {
            break;
        }
        match k.as_str() {
            "escape" => {
                escape = match v.trim() {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return Err(BuildError::Syntax {
                            line: i + 1,
                            message: format!("escape directive {other:?}: must be \\ or `"),
                        })
                    }
                }
            }
            "syntax" | "check" => {}
            _ => break,
        }
        i += 1;
    }
    let mut out = Vec::new();
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i];
        i += 1;
        let t = first.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut logical = String::new();
        let mut cur = first.to_string();
        loop {
            let trimmed = cur.trim_end();
            if let Some(body) = trimmed.strip_suffix(escape) {
                logical.push_str(body);
                let mut next = None;
                while i < lines.len() {
                    let l = lines[i];
                    i += 1;
                    let lt = l.trim_start();
                    if lt.starts_with('#') || lt.is_empty() {
                        continue; // comments and blank lines inside a continuation
                    }
                    next = Some(l);
                    break;
                }
                match next {
                    Some(l) => cur = l.to_string(),
                    None => break,
                }
            } else {
                logical.push_str(&cur);
                break;
            }
        }
        let logical = logical.trim();
        let (kw, rest) = match logical.find(char::is_whitespace) {
            Some(p) => (&logical[..p], logical[p..].trim()),
            None => (logical, ""),
        };
        if !kw.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(BuildError::Syntax {
                line: start,
                message: format!("{kw:?} is not an instruction (expected e.g. FROM, RUN, COPY)"),
            });
        }
        let keyword = kw.to_ascii_uppercase();
        let mut args = rest.to_string();
        let mut flags = Vec::new();
        if matches!(keyword.as_str(), "FROM" | "RUN" | "COPY" | "ADD") {
            loop {
                let a = args.trim_start();
                let Some(f) = a.strip_prefix("--") else {
                    break;
                };
                let end = f.find(char::is_whitespace).unwrap_or(f.len());
                flags.push(f[..end].to_string());
                args = f[end..].trim_start().to_string();
            }
        }
        out.push(Instruction {
            line: start,
            keyword,
            flags,
            args,
        });
    }
    if out.is_empty() {
        return Err(BuildError::Syntax {
            line: 1,
            message: "the Dockerfile has no instructions; it needs at least `FROM IMAGE`".into(),
        });
    }
    Ok(Dockerfile {
        escape,
        instructions: out,
    })
}

type Vars = BTreeMap<String, String>;

/// Shell-like word processing as Docker does for substituted instructions:
/// quotes removed, escapes applied, variables expanded. With `split`,
/// unquoted whitespace separates words.
fn lex(s: &str, vars: &Vars, esc: char, split: bool) -> Result<Vec<String>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if split && ch.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
            i += 1;
            continue;
        }
        in_word = true;
        if ch == esc {
            if let Some(&n) = c.get(i + 1) {
                cur.push(n);
                i += 2;
            } else {
                cur.push(ch);
                i += 1;
            }
        } else if ch == '\'' {
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err("unterminated single quote".into()),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&d) => {
                        cur.push(d);
                        i += 1;
                    }
                }
            }
        } else if ch == '"' {
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err("unterminated double quote".into()),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&d) if d == esc => match c.get(i + 1) {
                        Some(&n) if n == '"' || n == '$' || n == esc => {
                            cur.push(n);
                            i += 2;
                        }
                        _ => {
                            cur.push(d);
                            i += 1;
                        }
                    },
                    Some('$') => i = expand(&c, i, vars, esc, &mut cur)?,
                    Some(&d) => {
                        cur.push(d);
                        i += 1;
                    }
                }
            }
        } else if ch == '$' {
            i = expand(&c, i, vars, esc, &mut cur)?;
        } else {
            cur.push(ch);
            i += 1;
        }
    }
    if in_word || !split {
        words.push(cur);
    }
    Ok(words)
}

/// One word, whitespace kept (WORKDIR, USER, legacy ENV values).
fn lex_one(s: &str, vars: &Vars, esc: char) -> Result<String, String> {
    Ok(lex(s, vars, esc, false)?.concat())
}

/// Expand the `$` at `c[i]` into `out`; returns the index after it.
fn expand(c: &[char], i: usize, vars: &Vars, esc: char, out: &mut String) -> Result<usize, String> {
    let is_name = |ch: char| ch.is_ascii_alphanumeric() || ch == '_';
    match c.get(i + 1) {
        Some('{') => {
            let mut depth = 1;
            let mut j = i + 2;
            while j < c.len() {
                match c[j] {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            if j >= c.len() {
                return Err("missing '}' in a ${...} substitution".into());
            }
            let inner: String = c[i + 2..j].iter().collect();
            let name_len = inner.chars().take_while(|&ch| is_name(ch)).count();
            let name = &inner[..name_len];
            if name.is_empty() {
                return Err(format!("bad substitution ${{{inner}}}"));
            }
            let rest = &inner[name_len..];
            let val = vars.get(name);
            let set_nonempty = val.is_some_and(|v| !v.is_empty());
            let text = if rest.is_empty() {
                val.cloned().unwrap_or_default()
            } else if let Some(w) = rest.strip_prefix(":-") {
                if set_nonempty {
                    val.cloned().unwrap_or_default()
                } else {
                    lex_one(w, vars, esc)?
                }
            } else if let Some(w) = rest.strip_prefix(":+") {
                if set_nonempty {
                    lex_one(w, vars, esc)?
                } else {
                    String::new()
                }
            } else if let Some(w) = rest.strip_prefix('-') {
                match val {
                    Some(v) => v.clone(),
                    None => lex_one(w, vars, esc)?,
                }
            } else if let Some(w) = rest.strip_prefix('+') {
                if val.is_some() {
                    lex_one(w, vars, esc)?
                } else {
                    String::new()
                }
            } else {
                return Err(format!(
                    "unsupported substitution ${{{inner}}} (nanoclaw supports ${{VAR}}, ${{VAR:-default}} and ${{VAR:+alt}})"
                ));
            };
            out.push_str(&text);
            Ok(j + 1)
        }
        Some(&ch) if is_name(ch) => {
            let mut j = i + 1;
            while j < c.len() && is_name(c[j]) {
                j += 1;
            }
            let name: String = c[i + 1..j].iter().collect();
            out.push_str(vars.get(&name).map_or("", String::as_str));
            Ok(j)
        }
        _ => {
            out.push('$');
            Ok(i + 1)
        }
    }
}

/// `["a","b"]` (exec form) if the args are a JSON array of strings.
fn json_form(args: &str) -> Option<Vec<String>> {
    let t = args.trim();
    if !t.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(t).ok()
}

/// RUN/CMD/ENTRYPOINT argv: exec form as is, shell form through `/bin/sh -c`.
fn command_form(args: &str) -> Vec<String> {
    match json_form(args) {
        Some(v) => v,
        None => vec!["/bin/sh".into(), "-c".into(), args.to_string()],
    }
}

// ─────────────────────────── .dockerignore ───────────────────────────

/// `.dockerignore` rules: Go `filepath.Match` patterns per path component,
/// `**` for any number of components, `!` exceptions, last match wins; a
/// pattern matching a directory excludes everything below it.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<(bool, Vec<String>)>,
}

impl IgnoreRules {
    /// Parse `.dockerignore` text.
    pub fn parse(text: &str) -> IgnoreRules {
        let mut rules = Vec::new();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (neg, p) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let comps: Vec<String> = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(str::to_string)
                .collect();
            if !comps.is_empty() {
                rules.push((neg, comps));
            }
        }
        IgnoreRules { rules }
    }

    /// Does any rule re-include something (`!pattern`)?
    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(n, _)| *n)
    }

    /// Is `rel` (relative to the context) excluded?
    pub fn is_ignored(&self, rel: &Path) -> bool {
        let comps: Vec<String> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        if comps.is_empty() {
            return false;
        }
        let mut ignored = false;
        for (neg, pat) in &self.rules {
            // The path itself or one of its parents matches.
            let hit = (1..=comps.len()).any(|n| match_components(pat, &comps[..n]));
            if hit {
                ignored = !neg;
            }
        }
        ignored
    }
}

fn match_components(pat: &[String], path: &[String]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=path.len()).any(|k| match_components(rest, &path[k..]))
        }
        Some((p, rest)) => match path.split_first() {
            Some((c, prest)) => glob_match(p, c) && match_components(rest, prest),
            None => false,
        },
    }
}

/// Go `filepath.Match` for one component: `*`, `?`, `[...]`, `\` escapes.
fn glob_match(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = s.chars().collect();
    fn rec(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|k| rec(&p[1..], &t[k..])),
            Some('?') => !t.is_empty() && rec(&p[1..], &t[1..]),
            Some('[') => {
                let Some(&c) = t.first() else { return false };
                let mut j = 1;
                let neg = matches!(p.get(1), Some('^') | Some('!'));
                if neg {
                    j += 1;
                }
                let mut matched = false;
                let mut first = true;
                while j < p.len() && (p[j] != ']' || first) {
                    first = false;
                    let lo = p[j];
                    if p.get(j + 1) == Some(&'-') && p.get(j + 2).is_some_and(|&x| x != ']') {
                        let hi = p[j + 2];
                        if lo <= c && c <= hi {
                            matched = true;
                        }
                        j += 3;
                    } else {
                        if lo == c {
                            matched = true;
                        }
                        j += 1;
                    }
                }
                if j >= p.len() {
                    return false; // unterminated class: no match
                }
                matched != neg && rec(&p[j + 1..], &t[1..])
            }
            Some('\\') if p.len() > 1 => !t.is_empty() && t[0] == p[1] && rec(&p[2..], &t[1..]),
            Some(&c) => !t.is_empty() && t[0] == c && rec(&p[1..], &t[1..]),
        }
    }
    rec(&p, &t)
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

// ─────────────────────── scoped path resolution ───────────────────────

/// What a path is, as seen in a root made of one or more directories.
enum Node {
    Missing,
    Dir(Metadata),
    Symlink(PathBuf),
    /// A file or something else; the host path of the entry.
    Other(Metadata, PathBuf),
}

/// Lexically normalize `p` relative to a root: `.` dropped, `..` popped;
/// `None` when it climbs above the root.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(s) => out.push(s),
        }
    }
    Some(out)
}

/// Resolve `path` inside a root (symlinks followed as if the root were
/// `/`, never leaving it; `..` at the root stays at the root), with
/// `lookup` describing each entry. Missing components are fine (they
/// will be created). Returns the resolved relative path.
fn resolve_scoped(
    path: &Path,
    follow_last: bool,
    lookup: &dyn Fn(&Path) -> io::Result<Node>,
) -> Result<PathBuf, String> {
    let mut queue: std::collections::VecDeque<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(PathBuf::from(s)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = queue.pop_front() {
        if c.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&c);
        let node = lookup(&cand).map_err(|e| format!("{}: {e}", cand.display()))?;
        match node {
            Node::Symlink(target) if follow_last || !queue.is_empty() => {
                hops += 1;
                if hops > 40 {
                    return Err(format!(
                        "{}: too many levels of symbolic links",
                        path.display()
                    ));
                }
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut front: Vec<PathBuf> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(PathBuf::from(s)),
                        Component::ParentDir => Some(PathBuf::from("..")),
                        _ => None,
                    })
                    .collect();
                while let Some(x) = front.pop() {
                    queue.push_front(x);
                }
            }
            _ => cur = cand,
        }
    }
    Ok(cur)
}

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn xattr_is_y(p: &Path, name: &str) -> bool {
    let (Ok(cp), Ok(cn)) = (CString::new(p.as_os_str().as_bytes()), CString::new(name)) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    n == 1 && buf[0] == b'y'
}

/// The merged view of overlay layers (topmost first), without mounting:
/// whiteouts, opaque directories and non-directories hiding lower ones.
fn layer_lookup(layers_top_first: &[PathBuf], rel: &Path) -> io::Result<Node> {
    let comps: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    if comps.is_empty() {
        return match layers_top_first.first() {
            Some(l) => Ok(Node::Dir(std::fs::symlink_metadata(l)?)),
            None => Ok(Node::Missing),
        };
    }
    'layers: for layer in layers_top_first {
        let mut p = layer.clone();
        let mut opaque = false;
        for (k, c) in comps.iter().enumerate() {
            p.push(c);
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if opaque {
                        return Ok(Node::Missing);
                    }
                    continue 'layers;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(Node::Missing),
                Err(e) => return Err(e),
            };
            if is_whiteout(&md) {
                return Ok(Node::Missing);
            }
            let last = k + 1 == comps.len();
            if last {
                let ft = md.file_type();
                return Ok(if ft.is_dir() {
                    Node::Dir(md)
                } else if ft.is_symlink() {
                    Node::Symlink(std::fs::read_link(&p)?)
                } else {
                    Node::Other(md, p)
                });
            }
            if !md.is_dir() {
                // A non-directory here hides everything below in lower layers.
                return Ok(Node::Missing);
            }
            if xattr_is_y(&p, "user.overlay.opaque") || xattr_is_y(&p, "trusted.overlay.opaque") {
                opaque = true;
            }
        }
    }
    Ok(Node::Missing)
}

/// Lookup in a plain directory (the build context).
fn dir_lookup(root: &Path, rel: &Path) -> io::Result<Node> {
    let p = root.join(rel);
    match std::fs::symlink_metadata(&p) {
        Ok(md) if md.is_dir() => Ok(Node::Dir(md)),
        Ok(md) if md.file_type().is_symlink() => Ok(Node::Symlink(std::fs::read_link(&p)?)),
        Ok(md) => Ok(Node::Other(md, p)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
            Ok(Node::Missing)
        }
        Err(e) => Err(e),
    }
}

/// Open `rel` (already resolved: no symlinks) beneath `root_fd`; refuses
/// any symlink or escape the kernel sees (a race with a changing context).
fn open_beneath(root_fd: &OwnedFd, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let p = if rel.as_os_str().is_empty() {
        CString::new(".")
    } else {
        CString::new(rel.as_os_str().as_bytes())
    }
    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    /// `struct open_how` of openat2(2).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid fd, NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd.as_raw_fd(),
            p.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn set_times(p: &Path, md: &Metadata) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let ts = [
        libc::timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec(),
        },
        libc::timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec(),
        },
    ];
    // SAFETY: NUL-terminated path, two timespecs as utimensat wants.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ─────────────────────────── build options ───────────────────────────

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The name to tag the result with (`myimage`, `myimage:1`).
    pub tag: String,
    /// The build context folder.
    pub context: PathBuf,
    /// The Dockerfile (default `CONTEXT/Dockerfile`).
    pub dockerfile: Option<PathBuf>,
    /// `--build-arg K=V` values.
    pub build_args: Vec<(String, String)>,
    /// Network of every `RUN` (default none: loopback only).
    pub network: Network,
    /// Capabilities granted to `RUN` steps inside their own user namespace
    /// (e.g. `CHOWN`, `SETUID`, `SETGID`, `DAC_OVERRIDE`, `FOWNER` for
    /// package managers). Default none: hardening unchanged.
    pub cap_add: Vec<String>,
    /// Limits of every `RUN` (default: 2 GiB memory, 2 cpus, 1024 tasks, 30 min, 1 GiB /tmp).
    pub limits: Limits,
    /// Ignore the build cache (still records the new layers in it).
    pub no_cache: bool,
    /// Stream `RUN` output to this process's stdout/stderr as it comes
    /// (else it is captured; a failing step's stderr tail is in the error).
    pub stream_output: bool,
    /// Let Ctrl-C / SIGTERM kill a running step cleanly (command-line use).
    pub handle_signals: bool,
    /// The only part of `localhost/` a `FROM` may name (`localhost/TENANT/`,
    /// for the daemon's builds of a tenant's Dockerfile); `None`: any image
    /// of the store. With a scope, `FROM` must name its image by reference
    /// (nor nanoclaw's own `nanoclaw.local/` images): the store holds every
    /// tenant's images, and a tenant's Dockerfile must not read another's
    /// (by name or by id). The build cache is the scope's own too.
    pub from_scope: Option<String>,
    /// At most this many bytes in the layers the build adds (measured as
    /// their tars will hold them, see [`crate::bound`]; the store keeps
    /// each layer twice, as a blob and unpacked). A `RUN` step that writes
    /// past it is stopped while it runs; a step whose result would pass it
    /// fails the build. `None`: no bound (the command line's default).
    pub max_bytes: Option<u64>,
}

impl BuildOptions {
    /// Defaults for building `context` into `tag`.
    pub fn new(tag: impl Into<String>, context: impl Into<PathBuf>) -> BuildOptions {
        BuildOptions {
            tag: tag.into(),
            context: context.into(),
            dockerfile: None,
            build_args: Vec::new(),
            network: Network::None,
            cap_add: Vec::new(),
            limits: build_limits(),
            no_cache: false,
            stream_output: false,
            handle_signals: false,
            from_scope: None,
            max_bytes: None,
        }
    }
}

/// Whether `FROM image` stays inside `scope` (see
/// [`BuildOptions::from_scope`]): a reference (never an image id), and
/// under `localhost/` only below `scope`. Else why not, and what to do.
pub fn check_from_scope(image: &str, scope: &str) -> Result<(), String> {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    let by_id = hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if by_id || image.starts_with("sha256:") {
        return Err("name the base image by reference (e.g. python:3.11-slim), not by id".into());
    }
    let canonical = Reference::parse(image)
        .map_err(|e| format!("{e}; name the base image by reference (e.g. python:3.11-slim)"))?
        .to_string();
    if canonical.starts_with("nanoclaw.local/") {
        return Err(format!(
            "{canonical} is one of nanoclaw's own images (setup layers): name a public base image"
        ));
    }
    if canonical.starts_with("localhost/") && !canonical.starts_with(scope) {
        return Err(format!(
            "{canonical} is not one of your images: name one of yours ({scope}NAME) or a public base image"
        ));
    }
    Ok(())
}

/// The default limits of a build step: roomier than a run (package installs).
pub fn build_limits() -> Limits {
    Limits {
        memory: Some(2 << 30),
        cpus: Some(2.0),
        pids: Some(1024),
        timeout: Duration::from_secs(30 * 60),
        tmpfs_size: 1 << 30,
        ..Limits::default()
    }
}

/// How a step was satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Only the image config changed (ENV, LABEL, ...).
    Config,
    /// Reused from the build cache: nothing ran.
    Cached,
    /// Executed (RUN) or copied (COPY/ADD/WORKDIR).
    Built,
}

/// One step of a build.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// Dockerfile line.
    pub line: usize,
    /// The instruction as written.
    pub instruction: String,
    /// Cached, built, or config only.
    pub status: StepStatus,
    /// The layer it produced or reused (None: no filesystem change).
    pub layer: Option<Digest>,
    /// Wall time of the step.
    #[serde(serialize_with = "ser_ms")]
    pub duration: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The result of a build.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The canonical reference written.
    pub reference: String,
    /// The image id (config digest).
    pub id: Digest,
    /// Every layer of the image, lowest first (diff_ids).
    pub layers: Vec<Digest>,
    /// Per step.
    pub steps: Vec<StepReport>,
    /// Total wall time.
    #[serde(serialize_with = "ser_ms")]
    pub duration: Duration,
    /// Bytes of the layers this build wrote (blobs; cached steps add
    /// nothing): what it added to the store, about twice this on disk.
    pub new_bytes: u64,
}

impl BuildReport {
    /// Steps that executed something (RUN) or copied files: 0 on a fully cached rebuild.
    pub fn built_steps(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.status == StepStatus::Built)
            .count()
    }
}

// ───────────────────────────── the cache ─────────────────────────────

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    layer: Option<LayerInfo>,
    instruction: String,
}

fn chain(prev: &str, parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"nanoclaw-build-v1\0");
    ctx.update(prev.as_bytes());
    for p in parts {
        ctx.update(b"\0");
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p.as_bytes());
    }
    hex(ctx.finish().as_ref())
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn cache_dir(store: &Store) -> PathBuf {
    store.root().join("build-cache")
}

/// A cache hit: `Some(layer-or-none)`; a miss (or a pruned layer): `None`.
fn cache_get(store: &Store, key: &str) -> Option<Option<LayerInfo>> {
    let b = std::fs::read(cache_dir(store).join(format!("{key}.json"))).ok()?;
    let e: CacheEntry = serde_json::from_slice(&b).ok()?;
    match e.layer {
        None => Some(None),
        Some(l) if store.has_layer(&l.diff_id) && store.has_blob(&l.blob) => Some(Some(l)),
        Some(_) => None,
    }
}

fn cache_put(
    store: &Store,
    key: &str,
    layer: Option<&LayerInfo>,
    instruction: &str,
) -> Result<(), BuildError> {
    let dir = cache_dir(store);
    std::fs::create_dir_all(&dir).map_err(|e| ioe(format!("creating {}", dir.display()), e))?;
    let bytes = serde_json::to_vec(&CacheEntry {
        layer: layer.cloned(),
        instruction: instruction.to_string(),
    })
    .map_err(|e| ioe("encoding a build cache entry", io::Error::other(e)))?;
    crate::store::write_atomic(store.root(), &dir.join(format!("{key}.json")), &bytes)?;
    Ok(())
}

// ─────────────────────────── staging folders ───────────────────────────

static STEP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A step's staging folder in the store's tmp/ (named `<pid>-…` so the
/// store removes it if this process dies); removed on drop.
struct StepDir(PathBuf);

impl StepDir {
    fn new(store: &Store) -> Result<StepDir, BuildError> {
        let n = STEP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = store
            .root()
            .join("tmp")
            .join(format!("{}-build{n}", std::process::id()));
        let _ = remove_tree(&p);
        std::fs::create_dir(&p).map_err(|e| ioe(format!("creating {}", p.display()), e))?;
        Ok(StepDir(p))
    }
}

impl Drop for StepDir {
    fn drop(&mut self) {
        let _ = remove_tree(&self.0);
    }
}

/// An image's `USER` value (`name`, `uid`, `name:group`, `uid:gid`) as
/// ids, names looked up in the image's own `/etc/passwd` and `/etc/group`
/// (read inside the image: symlinks never lead to host files).
pub fn image_user(root: &crate::ImageRoot, spec: &str) -> Result<User, String> {
    let stage = Stage {
        layers: Vec::new(),
        dirs: root.layers.clone(),
        config: root.config.clone(),
        chain: String::new(),
        args: Vars::new(),
        cmd_set: false,
    };
    stage.resolve_user(spec)
}

// ─────────────────────────── the builder ───────────────────────────

struct Stage {
    layers: Vec<LayerInfo>,
    /// Unpacked dirs, lowest first.
    dirs: Vec<PathBuf>,
    config: ImageConfig,
    chain: String,
    /// Declared ARGs of this stage with a value.
    args: Vars,
    cmd_set: bool,
}

impl Stage {
    fn top_first(&self) -> Vec<PathBuf> {
        self.dirs.iter().rev().cloned().collect()
    }

    fn env_map(&self) -> Vars {
        let mut v = Vars::new();
        for kv in &self.config.env {
            if let Some((k, val)) = kv.split_once('=') {
                v.insert(k.to_string(), val.to_string());
            }
        }
        v
    }

    /// Substitution variables: ARGs, overridden by ENV (as in Docker).
    fn vars(&self) -> Vars {
        let mut v = self.args.clone();
        v.extend(self.env_map());
        v
    }

    fn push_layer(&mut self, store: &Store, l: LayerInfo) {
        self.dirs.push(store.layer_dir(&l.diff_id));
        self.layers.push(l);
    }

    fn workdir(&self) -> PathBuf {
        PathBuf::from(
            self.config
                .working_dir
                .as_deref()
                .filter(|w| !w.is_empty())
                .unwrap_or("/"),
        )
    }

    /// Read a file of the image so far (symlinks resolved inside the image).
    fn read_file(&self, path: &str) -> Option<String> {
        let layers = self.top_first();
        let look = |r: &Path| layer_lookup(&layers, r);
        let rel = resolve_scoped(Path::new(path), true, &look).ok()?;
        match layer_lookup(&layers, &rel).ok()? {
            Node::Other(md, p) if md.is_file() => {
                let fd = open_path(&p, libc::O_RDONLY | libc::O_NOFOLLOW).ok()?;
                let mut s = String::new();
                File::from(fd).read_to_string(&mut s).ok()?;
                Some(s)
            }
            _ => None,
        }
    }

    /// `user[:group]` (names or ids) to ids, names from the image's /etc files.
    fn resolve_user(&self, spec: &str) -> Result<User, String> {
        let lookup = |file: &str, name: &str| -> Option<u32> {
            let text = self.read_file(file)?;
            text.lines().find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() > 2 && f[0] == name)
                    .then(|| f[2].parse().ok())
                    .flatten()
            })
        };
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let uid = match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("/etc/passwd", u).ok_or_else(|| {
                format!("user {u:?} is not in the image's /etc/passwd; use a numeric UID")
            })?,
        };
        let gid = match g {
            None => {
                // The user's primary group, else the uid.
                let text = self.read_file("/etc/passwd").unwrap_or_default();
                text.lines()
                    .find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f.len() > 3 && (f[0] == u || f[2] == u))
                            .then(|| f[3].parse().ok())
                            .flatten()
                    })
                    .unwrap_or(uid)
            }
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => lookup("/etc/group", g).ok_or_else(|| {
                    format!("group {g:?} is not in the image's /etc/group; use a numeric GID")
                })?,
            },
        };
        Ok(User { uid, gid })
    }
}

fn short(d: &Digest) -> &str {
    &d.hex()[..12]
}

fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() > 120 {
        let cut: String = one_line.chars().take(117).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// Build the Dockerfile described by `opts` into `store`, printing
/// Docker-like step lines to `out` (`Step 2/5 : RUN ...`, ` ---> CACHED`,
/// `Successfully tagged ...`). Returns the report; on error nothing is
/// tagged.
pub fn build(
    store: &Store,
    opts: &BuildOptions,
    out: &mut dyn Write,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let reference = Reference::parse(&opts.tag)
        .map_err(|e| BuildError::Options(format!("-t {}: {e}", opts.tag)))?
        .to_string();
    let context = opts.context.canonicalize().map_err(|e| {
        BuildError::Options(format!(
            "build context {}: {e}; pass an existing folder",
            opts.context.display()
        ))
    })?;
    if !context.is_dir() {
        return Err(BuildError::Options(format!(
            "build context {} is not a folder",
            context.display()
        )));
    }
    let df_path = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| context.join("Dockerfile"));
    let text = std::fs::read_to_string(&df_path).map_err(|e| {
        BuildError::Options(format!(
            "cannot read the Dockerfile {}: {e}; pass -f PATH",
            df_path.display()
        ))
    })?;
    let df = parse_dockerfile(&text)?;
    let ignore = match std::fs::read_to_string(context.join(".dockerignore")) {
        Ok(t) => IgnoreRules::parse(&t),
        Err(_) => IgnoreRules::default(),
    };
    let ctx = Context {
        fd: open_path(&context, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| ioe(format!("opening the context {}", context.display()), e))?,
        path: context,
        ignore,
    };
    let mut b = Builder {
        store,
        opts,
        out,
        escape: df.escape,
        ctx,
        build_args: opts.build_args.iter().cloned().collect(),
        used_args: BTreeSet::new(),
        written: 0,
        added: Vec::new(),
        pending_cache: Vec::new(),
    };
    let mut steps = Vec::new();
    let stage = match b.run_all(&df.instructions, &mut steps) {
        Ok(s) => s,
        Err(e) => {
            b.discard();
            return Err(e);
        }
    };
    let unused: Vec<&String> = b
        .build_args
        .keys()
        .filter(|k| !b.used_args.contains(*k))
        .collect();
    if !unused.is_empty() {
        let _ = writeln!(
            b.out,
            "[Warning] build args not consumed by any ARG: {}",
            unused
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let rec = match store.commit_image(&reference, None, &stage.layers, &stage.config) {
        Ok(r) => r,
        Err(e) => {
            b.discard();
            return Err(e.into());
        }
    };
    for (key, layer, text) in std::mem::take(&mut b.pending_cache) {
        cache_put(store, &key, layer.as_ref(), &text)?;
    }
    let _ = writeln!(b.out, "Successfully built {}", short(&rec.config_digest));
    let _ = writeln!(b.out, "Successfully tagged {}", rec.reference);
    Ok(BuildReport {
        reference: rec.reference,
        id: rec.config_digest,
        layers: stage.layers.iter().map(|l| l.diff_id.clone()).collect(),
        steps,
        duration: started.elapsed(),
        new_bytes: b.written,
    })
}

struct Context {
    path: PathBuf,
    fd: OwnedFd,
    ignore: IgnoreRules,
}

struct Builder<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    out: &'a mut dyn Write,
    escape: char,
    ctx: Context,
    build_args: BTreeMap<String, String>,
    used_args: BTreeSet<String>,
    /// Blob bytes of the layers this build wrote so far.
    written: u64,
    /// Layers this build added to the store (not there before it).
    added: Vec<LayerInfo>,
    /// Cache entries a scoped build writes only once it succeeds.
    pending_cache: Vec<(String, Option<LayerInfo>, String)>,
}

/// A source of COPY/ADD: a resolved path in the context.
struct Source {
    /// As written (for messages).
    written: String,
    /// Resolved, relative to the context.
    rel: PathBuf,
    is_dir: bool,
}

impl Builder<'_> {
    fn say(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.out, "{}", s.as_ref());
        let _ = self.out.flush();
    }

    fn run_all(
        &mut self,
        ins: &[Instruction],
        steps: &mut Vec<StepReport>,
    ) -> Result<Stage, BuildError> {
        let total = ins.len();
        let mut global_args = Vars::new();
        let mut stage: Option<Stage> = None;
        for (n, i) in ins.iter().enumerate() {
            let step = n + 1;
            let t0 = Instant::now();
            self.say(format!("Step {step}/{total} : {}", shorten(&i.text())));
            let unsupported = |what: &str, hint: &str| BuildError::Unsupported {
                line: i.line,
                instruction: what.to_string(),
                hint: hint.to_string(),
            };
            let syntax = |m: String| BuildError::Syntax {
                line: i.line,
                message: m,
            };
            let failed = |reason: String| BuildError::StepFailed {
                step,
                line: i.line,
                instruction: shorten(&i.text()),
                reason,
            };
            let kw = i.keyword.as_str();
            match kw {
                "HEALTHCHECK" | "ONBUILD" | "VOLUME" | "SHELL" | "STOPSIGNAL" => {
                    let hint = match kw {
                        "HEALTHCHECK" => "nanoclaw runs commands, not services; remove it",
                        "ONBUILD" => "triggers for child images are not supported; put the steps in the child's Dockerfile",
                        "VOLUME" => "sandboxes get storage with --workspace/--mount at run time; remove it",
                        "SHELL" => "write RUN in exec form, e.g. RUN [\"/bin/bash\", \"-c\", \"...\"]",
                        _ => "nanoclaw stops sandboxes itself; remove it",
                    };
                    return Err(unsupported(kw, hint));
                }
                _ => {}
            }
            let Some(st) = stage.as_mut() else {
                match kw {
                    "ARG" => {
                        for (k, v) in self.parse_args(i, &global_args)? {
                            global_args.insert(k, v);
                        }
                        steps.push(self.report(step, i, StepStatus::Config, None, t0));
                        continue;
                    }
                    "FROM" => {
                        let s = self.from(i, &global_args)?;
                        stage = Some(s);
                        steps.push(self.report(step, i, StepStatus::Config, None, t0));
                        continue;
                    }
                    _ => {
                        return Err(syntax(format!(
                        "{kw} before FROM: a Dockerfile starts with FROM (only ARG may come first)"
                    )))
                    }
                }
            };
            let flags_none = |i: &Instruction| -> Result<(), BuildError> {
                match i.flags.first() {
                    Some(f) => Err(BuildError::Unsupported {
                        line: i.line,
                        instruction: format!("{} --{f}", i.keyword),
                        hint: "this flag is not supported".into(),
                    }),
                    None => Ok(()),
                }
            };
            let mut status = StepStatus::Config;
            let mut layer = None;
            match kw {
                "FROM" => {
                    return Err(unsupported(
                        "a second FROM (multi-stage build)",
                        "build one stage per Dockerfile: build the first stage as its own image, then start the next with FROM that image",
                    ))
                }
                "ARG" => {
                    for (k, v) in self.parse_args(i, &st.vars())? {
                        // `ARG NAME` after FROM takes the global value.
                        let v = if v.is_empty() && !i.args.contains('=') {
                            global_args.get(&k).cloned().unwrap_or(v)
                        } else {
                            v
                        };
                        st.args.insert(k, v);
                    }
                    st.chain = chain(&st.chain, &["ARG", &i.args]);
                }
                "ENV" | "LABEL" => {
                    let pairs = self.parse_pairs(i, &st.vars())?;
                    for (k, v) in &pairs {
                        if kw == "ENV" {
                            let prefix = format!("{k}=");
                            st.config.env.retain(|e| !e.starts_with(&prefix));
                            st.config.env.push(format!("{k}={v}"));
                        } else {
                            st.config.labels.insert(k.clone(), v.clone());
                        }
                    }
                    let canon = serde_json::to_string(&pairs).unwrap_or_default();
                    st.chain = chain(&st.chain, &[kw, &canon]);
                }
                "MAINTAINER" => {
                    let v = lex_one(&i.args, &st.vars(), self.escape).map_err(syntax)?;
                    st.config.labels.insert("maintainer".into(), v.clone());
                    st.chain = chain(&st.chain, &[kw, &v]);
                }
                "EXPOSE" => {
                    self.say(" ---> EXPOSE has no effect: sandboxes take no inbound connections");
                }
                "USER" => {
                    let v = lex_one(&i.args, &st.vars(), self.escape)
                        .map_err(syntax)?
                        .trim()
                        .to_string();
                    if v.is_empty() {
                        return Err(syntax("USER needs a user: USER NAME[:GROUP] or UID[:GID]".into()));
                    }
                    st.config.user = Some(v.clone());
                    st.chain = chain(&st.chain, &[kw, &v]);
                }
                "CMD" | "ENTRYPOINT" => {
                    let argv = command_form(&i.args);
                    if kw == "CMD" {
                        st.config.cmd = argv.clone();
                        st.cmd_set = true;
                    } else {
                        st.config.entrypoint = argv.clone();
                        if !st.cmd_set {
                            st.config.cmd.clear();
                        }
                    }
                    let canon = serde_json::to_string(&argv).unwrap_or_default();
                    st.chain = chain(&st.chain, &[kw, &canon]);
                }
                "WORKDIR" => {
                    let v = lex_one(&i.args, &st.vars(), self.escape)
                        .map_err(syntax)?
                        .trim()
                        .to_string();
                    if v.is_empty() {
                        return Err(syntax("WORKDIR needs a path".into()));
                    }
                    let abs = st.workdir().join(&v);
                    let abs = PathBuf::from("/").join(normalize(&abs).unwrap_or_default());
                    let abs_s = abs.display().to_string();
                    st.config.working_dir = Some(abs_s.clone());
                    st.chain = chain(&st.chain, &[kw, &abs_s]);
                    let layers = st.top_first();
                    let look = |r: &Path| layer_lookup(&layers, r);
                    let rel = resolve_scoped(&abs, true, &look).map_err(&failed)?;
                    match layer_lookup(&layers, &rel).map_err(|e| failed(e.to_string()))? {
                        Node::Dir(_) => {}
                        Node::Missing => {
                            let key = st.chain.clone();
                            (layer, status) = match self.cache_hit(&key) {
                                Some(hit) => (hit, StepStatus::Cached),
                                None => {
                                    let dir = StepDir::new(self.store)?;
                                    let upper = dir.0.join("upper");
                                    std::fs::create_dir(&upper).map_err(|e| {
                                        ioe(format!("creating {}", upper.display()), e)
                                    })?;
                                    let w = UpperWriter::new(self.store.mode(), &upper, st, (0, 0), None);
                                    w.mkdir_p(&rel).map_err(|e| failed(e.to_string()))?;
                                    let l = self.add_layer(&upper, &failed)?;
                                    self.remember(key, Some(&l), i.text());
                                    (Some(l), StepStatus::Built)
                                }
                            };
                        }
                        _ => return Err(failed(format!("WORKDIR {abs_s}: exists and is not a directory"))),
                    }
                }
                "RUN" => {
                    flags_none(i)?;
                    let argv = command_form(&i.args);
                    let env_keys: BTreeSet<String> = st.env_map().into_keys().collect();
                    let arg_env: Vec<(String, String)> = st
                        .args
                        .iter()
                        .filter(|(k, _)| !env_keys.contains(*k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let canon = serde_json::to_string(&(&argv, &arg_env)).unwrap_or_default();
                    st.chain = chain(&st.chain, &["RUN", &canon]);
                    let key = st.chain.clone();
                    (layer, status) = match self.cache_hit(&key) {
                        Some(hit) => (hit, StepStatus::Cached),
                        None => {
                            let l = self.run_step(st, argv, arg_env, &failed)?;
                            self.remember(key, l.as_ref(), i.text());
                            (l, StepStatus::Built)
                        }
                    };
                }
                "COPY" | "ADD" => {
                    let (l, s) = self.copy_step(st, i, &failed)?;
                    status = s;
                    layer = l;
                }
                other => {
                    return Err(syntax(format!(
                        "unknown instruction {other} (nanoclaw builds FROM, RUN, COPY, ADD, ENV, WORKDIR, USER, ARG, LABEL, CMD, ENTRYPOINT, EXPOSE)"
                    )))
                }
            }
            if let Some(l) = &layer {
                st.push_layer(self.store, l.clone());
            }
            match (status, &layer) {
                (StepStatus::Cached, Some(l)) => {
                    self.say(format!(" ---> CACHED {}", short(&l.diff_id)))
                }
                (StepStatus::Cached, None) => self.say(" ---> CACHED (no filesystem change)"),
                (StepStatus::Built, Some(l)) => self.say(format!(" ---> {}", short(&l.diff_id))),
                (StepStatus::Built, None) => self.say(" ---> (no filesystem change)"),
                (StepStatus::Config, _) => {}
            }
            steps.push(self.report(step, i, status, layer.map(|l| l.diff_id), t0));
        }
        stage.ok_or_else(|| BuildError::Syntax {
            line: ins.last().map_or(1, |i| i.line),
            message: "no FROM instruction".into(),
        })
    }

    fn report(
        &self,
        step: usize,
        i: &Instruction,
        status: StepStatus,
        layer: Option<Digest>,
        t0: Instant,
    ) -> StepReport {
        StepReport {
            step,
            line: i.line,
            instruction: shorten(&i.text()),
            status,
            layer,
            duration: t0.elapsed(),
        }
    }

    /// What is left of the build's disk bound (`None`: no bound).
    fn left(&self) -> Option<u64> {
        self.opts
            .max_bytes
            .map(|max| max.saturating_sub(self.written))
    }

    /// Turns a finished step's folder into a layer, unless that would pass
    /// the build's disk bound; counts it.
    fn add_layer(
        &mut self,
        upper: &Path,
        failed: &dyn Fn(String) -> BuildError,
    ) -> Result<LayerInfo, BuildError> {
        if let Some(left) = self.left() {
            let n = layer_bytes(upper).map_err(|e| {
                failed(format!(
                    "what it wrote cannot be measured ({e}); a build step must leave its files readable"
                ))
            })?;
            if n > left {
                return Err(failed(format!(
                    "its layer would hold {}, over what is left of the build's disk bound ({} of {}); \
                     write less into the image (use /tmp for scratch files) or ask for a larger bound; no image was tagged",
                    human(n),
                    human(left),
                    human(self.opts.max_bytes.unwrap_or(0))
                )));
            }
        }
        // A layer the store had (the same files built before) costs
        // nothing new and is not this build's to remove.
        let before = self.store.layer_ids()?;
        let l = self.store.add_layer_from_dir(upper)?;
        if !before.contains(l.diff_id.hex()) {
            self.written = self.written.saturating_add(l.blob_size);
            self.added.push(l.clone());
        }
        Ok(l)
    }

    /// Records step `key`'s result in the build cache: at once, or for a
    /// scoped build (a tenant's, through the daemon) only when the whole
    /// build succeeds, so that a failed build leaves no layer behind.
    fn remember(&mut self, key: String, layer: Option<&LayerInfo>, text: String) {
        self.pending_cache.push((key, layer.cloned(), text));
        if self.opts.from_scope.is_none() {
            for (key, layer, text) in std::mem::take(&mut self.pending_cache) {
                if let Err(e) = cache_put(self.store, &key, layer.as_ref(), &text) {
                    self.say(format!("[Warning] the build cache was not updated: {e}"));
                }
            }
        }
    }

    /// After a failed scoped build: removes the layers it added that no
    /// image uses (a command-line build keeps them as cache, as Docker
    /// does; a tenant's failed builds must not fill the disk).
    fn discard(&mut self) {
        if self.opts.from_scope.is_none() || self.added.is_empty() {
            return;
        }
        let added = std::mem::take(&mut self.added);
        match self.store.remove_unused_layers(&added) {
            Ok(n) => self.say(format!("Removed {n} layer(s) of the failed build")),
            Err(e) => self.say(format!(
                "[Warning] layers of the failed build were not removed: {e}"
            )),
        }
    }

    /// The cached result of step `key` (unless `--no-cache`).
    fn cache_hit(&self, key: &str) -> Option<Option<LayerInfo>> {
        if self.opts.no_cache {
            return None;
        }
        cache_get(self.store, key)
    }

    /// `ARG A[=x] B[=y]`: returns (name, value) with build-arg overrides.
    fn parse_args(
        &mut self,
        i: &Instruction,
        vars: &Vars,
    ) -> Result<Vec<(String, String)>, BuildError> {
        let words = lex(&i.args, vars, self.escape, true).map_err(|m| BuildError::Syntax {
            line: i.line,
            message: m,
        })?;
        if words.is_empty() {
            return Err(BuildError::Syntax {
                line: i.line,
                message: "ARG needs a name: ARG NAME[=DEFAULT]".into(),
            });
        }
        let mut out = Vec::new();
        for w in words {
            let (k, default) = match w.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (w.clone(), String::new()),
            };
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(BuildError::Syntax {
                    line: i.line,
                    message: format!("ARG {k:?}: not a valid name"),
                });
            }
            let v = match self.build_args.get(&k) {
                Some(v) => {
                    self.used_args.insert(k.clone());
                    v.clone()
                }
                None => default,
            };
            out.push((k, v));
        }
        Ok(out)
    }

    /// `ENV/LABEL k=v k2="v 2"` or legacy `ENV k value with spaces`.
    fn parse_pairs(
        &self,
        i: &Instruction,
        vars: &Vars,
    ) -> Result<Vec<(String, String)>, BuildError> {
        let syn = |m: String| BuildError::Syntax {
            line: i.line,
            message: m,
        };
        let first = i.args.split_whitespace().next().unwrap_or("");
        if first.is_empty() {
            return Err(syn(format!("{} needs KEY=VALUE", i.keyword)));
        }
        if !first.contains('=') {
            let rest = i.args.trim_start()[first.len()..].trim();
            if rest.is_empty() {
                return Err(syn(format!(
                    "{} {first}: missing a value (KEY=VALUE)",
                    i.keyword
                )));
            }
            let v = lex_one(rest, vars, self.escape).map_err(syn)?;
            let k = lex_one(first, vars, self.escape).map_err(syn)?;
            return Ok(vec![(k, v)]);
        }
        let words = lex(&i.args, vars, self.escape, true).map_err(syn)?;
        let mut out = Vec::new();
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(syn(format!("{} {w:?}: expected KEY=VALUE", i.keyword)));
            };
            if k.is_empty() {
                return Err(syn(format!("{} {w:?}: empty key", i.keyword)));
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(out)
    }

    /// Where the cache keys start: a scoped build's cache is its scope's
    /// alone. Shared, a tenant learnt from a `CACHED` step (its build's
    /// time) that another had built the same steps, and reused layers that
    /// another's steps made with another network.
    fn cache_scope(&self) -> &str {
        self.opts.from_scope.as_deref().unwrap_or("")
    }

    fn from(&mut self, i: &Instruction, global: &Vars) -> Result<Stage, BuildError> {
        if let Some(f) = i.flags.first() {
            return Err(BuildError::Unsupported {
                line: i.line,
                instruction: format!("FROM --{f}"),
                hint: "images are built for this host's platform; remove the flag".into(),
            });
        }
        let words = lex(&i.args, global, self.escape, true).map_err(|m| BuildError::Syntax {
            line: i.line,
            message: m,
        })?;
        let image = match words.as_slice() {
            [img] => img.clone(),
            [img, as_, _name] if as_.eq_ignore_ascii_case("as") => img.clone(),
            _ => {
                return Err(BuildError::Syntax {
                    line: i.line,
                    message: "expected FROM IMAGE [AS NAME]".into(),
                })
            }
        };
        if image == "scratch" {
            self.say(" ---> scratch (an empty root)");
            return Ok(Stage {
                layers: Vec::new(),
                dirs: Vec::new(),
                config: ImageConfig::default(),
                chain: chain(self.cache_scope(), &["FROM", "scratch"]),
                args: Vars::new(),
                cmd_set: false,
            });
        }
        if let Some(scope) = &self.opts.from_scope {
            check_from_scope(&image, scope).map_err(|hint| BuildError::Unsupported {
                line: i.line,
                instruction: format!("FROM {image}"),
                hint,
            })?;
        }
        let rec = self
            .store
            .record(&image)
            .map_err(|e| BuildError::StepFailed {
                step: 0,
                line: i.line,
                instruction: shorten(&i.text()),
                reason: e.to_string(),
            })?;
        let root = self.store.resolve(&rec.reference)?;
        self.say(format!(
            " ---> {} ({})",
            short(&rec.config_digest),
            rec.reference
        ));
        Ok(Stage {
            layers: rec.layers.clone(),
            dirs: root.layers,
            config: rec.config.clone(),
            chain: chain(
                self.cache_scope(),
                &["FROM", &rec.config_digest.to_string()],
            ),
            args: Vars::new(),
            cmd_set: false,
        })
    }

    fn run_step(
        &mut self,
        st: &Stage,
        argv: Vec<String>,
        arg_env: Vec<(String, String)>,
        failed: &dyn Fn(String) -> BuildError,
    ) -> Result<Option<LayerInfo>, BuildError> {
        if st.dirs.is_empty() {
            return Err(failed(
                "the image is empty (FROM scratch with nothing copied yet), so there is nothing to run; COPY a static binary first or start FROM an image".into(),
            ));
        }
        let dir = StepDir::new(self.store)?;
        let mut spec = SandboxSpec::new(argv);
        spec.root = Root::Layers(st.dirs.clone());
        spec.root_upper = Some(dir.0.clone());
        let mut env: Vec<(String, String)> = st
            .config
            .env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        env.extend(arg_env);
        spec.env = env;
        spec.workdir = Some(st.workdir());
        spec.user = match st.config.user.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => st.resolve_user(u).map_err(failed)?,
            None => User { uid: 0, gid: 0 },
        };
        spec.network = self.opts.network.clone();
        spec.limits = self.opts.limits;
        spec.hardening.cap_add = self.opts.cap_add.clone();
        spec.hostname = "nanoclaw-build".into();
        self.say(" ---> Running in a nanoclaw sandbox");
        let sb = nanoclaw_sandbox::start(
            &spec,
            RunOptions {
                stream: self.opts.stream_output,
                handle_signals: self.opts.handle_signals,
                exit_after_wait: false,
            },
        )
        .map_err(|e| failed(format!("the sandbox could not start: {e}")))?;
        let watcher = match self.left() {
            Some(left) => Some(
                Watcher::start(&dir.0.join("upper"), left, sb.kill_handle())
                    .map_err(|e| ioe("starting the build's disk watcher", e))?,
            ),
            None => None,
        };
        let o = nanoclaw_sandbox::wait(sb);
        if let Some(why) = watcher.and_then(Watcher::finish) {
            return Err(failed(format!("stopped: {why}; no image was tagged")));
        }
        let o = o.map_err(|e| failed(format!("the sandbox failed: {e}")))?;
        if !self.opts.stream_output {
            let _ = self.out.write_all(&o.stdout);
            let _ = self.out.write_all(&o.stderr);
        }
        if o.exit_code != Some(0) || o.killed_by.is_some() {
            let why = match o.killed_by {
                Some(KillReason::Timeout) => format!(
                    "killed: timeout after {:?} (raise the build step timeout)",
                    self.opts.limits.timeout
                ),
                Some(KillReason::Oom) => {
                    "killed: out of memory (raise the build memory limit)".into()
                }
                Some(KillReason::Pids) => "killed: too many processes".into(),
                Some(KillReason::OutputLimit) => "killed: output over the limit".into(),
                Some(KillReason::Killed) => "interrupted".into(),
                None => match (o.exit_code, o.signal) {
                    (Some(127), _) => "exit code 127 (command not found in the image)".into(),
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => "failed".into(),
                },
            };
            let tail = String::from_utf8_lossy(&o.stderr);
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let extra = if tail.is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", tail.join(" | "))
            };
            return Err(failed(format!("{why}{extra}; no image was tagged")));
        }
        let upper = dir.0.join("upper");
        let empty = std::fs::read_dir(&upper)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            return Ok(None);
        }
        Ok(Some(self.add_layer(&upper, failed)?))
    }

    /// Resolve the sources of COPY/ADD in the context.
    fn sources(
        &self,
        srcs: &[String],
        failed: &dyn Fn(String) -> BuildError,
    ) -> Result<Vec<Source>, BuildError> {
        let mut out = Vec::new();
        for s in srcs {
            let Some(norm) = normalize(Path::new(s)) else {
                return Err(failed(format!(
                    "source {s:?} is outside the build context (paths cannot leave the context with ..)"
                )));
            };
            let candidates: Vec<PathBuf> = if has_glob(s) {
                let pat: Vec<String> = norm
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                let mut hits = Vec::new();
                self.glob_walk(Path::new(""), &pat, &mut hits);
                hits.sort();
                hits
            } else {
                vec![norm]
            };
            if candidates.is_empty() {
                return Err(failed(format!(
                    "no file in the build context matches {s:?}"
                )));
            }
            for c in candidates {
                let look = |r: &Path| dir_lookup(&self.ctx.path, r);
                let rel = resolve_scoped(&c, true, &look).map_err(failed)?;
                let node = dir_lookup(&self.ctx.path, &rel).map_err(|e| failed(e.to_string()))?;
                let is_dir = match node {
                    Node::Missing => {
                        return Err(failed(format!(
                            "{s:?} not found in the build context {}",
                            self.ctx.path.display()
                        )))
                    }
                    Node::Dir(_) => true,
                    Node::Other(md, _) if md.is_file() => false,
                    _ => return Err(failed(format!("{s:?} is not a regular file or folder"))),
                };
                if self.ctx.ignore.is_ignored(&rel) {
                    return Err(failed(format!("{s:?} is excluded by .dockerignore")));
                }
                out.push(Source {
                    written: s.clone(),
                    rel,
                    is_dir,
                });
            }
        }
        Ok(out)
    }

    fn glob_walk(&self, at: &Path, pat: &[String], hits: &mut Vec<PathBuf>) {
        let Some((p, rest)) = pat.split_first() else {
            hits.push(at.to_path_buf());
            return;
        };
        let Ok(rd) = std::fs::read_dir(self.ctx.path.join(at)) else {
            return;
        };
        let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            let name = n.to_string_lossy();
            if glob_match(p, &name) {
                let next = at.join(&n);
                if self.ctx.ignore.is_ignored(&next) {
                    continue;
                }
                self.glob_walk(&next, rest, hits);
            }
        }
    }

    fn copy_step(
        &mut self,
        st: &mut Stage,
        i: &Instruction,
        failed: &dyn Fn(String) -> BuildError,
    ) -> Result<(Option<LayerInfo>, StepStatus), BuildError> {
        let kw = i.keyword.as_str();
        let mut chown: Option<String> = None;
        let mut chmod: Option<u32> = None;
        for f in &i.flags {
            let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
            match k {
                "chown" => chown = Some(lex_one(v, &st.vars(), self.escape).map_err(failed)?),
                "chmod" => {
                    chmod = Some(u32::from_str_radix(v, 8).map_err(|_| {
                        BuildError::Syntax {
                            line: i.line,
                            message: format!("--chmod={v}: expected an octal mode such as 0755"),
                        }
                    })?)
                }
                "link" => {}
                "from" => {
                    return Err(BuildError::Unsupported {
                        line: i.line,
                        instruction: format!("{kw} --from"),
                        hint: "multi-stage builds are not supported; build the other stage as an image and COPY its output from the context".into(),
                    })
                }
                _ => {
                    return Err(BuildError::Unsupported {
                        line: i.line,
                        instruction: format!("{kw} --{k}"),
                        hint: "supported flags: --chown, --chmod".into(),
                    })
                }
            }
        }
        let words = match json_form(&i.args) {
            Some(v) => v,
            None => {
                lex(&i.args, &st.vars(), self.escape, true).map_err(|m| BuildError::Syntax {
                    line: i.line,
                    message: m,
                })?
            }
        };
        if words.len() < 2 {
            return Err(BuildError::Syntax {
                line: i.line,
                message: format!(
                    "{kw} needs at least one source and a destination: {kw} SRC... DEST"
                ),
            });
        }
        let (dest, srcs) = words
            .split_last()
            .ok_or_else(|| failed("no destination".into()))?;
        if kw == "ADD" {
            for s in srcs {
                if s.contains("://") || s.starts_with("git@") {
                    return Err(BuildError::Unsupported {
                        line: i.line,
                        instruction: "ADD from a URL".into(),
                        hint: format!("{s}: download it into the build context first (or RUN a download with --network allowlist)"),
                    });
                }
            }
        }
        let sources = self.sources(srcs, failed)?;
        let dest_abs = {
            let joined = st.workdir().join(dest);
            PathBuf::from("/").join(normalize(&joined).unwrap_or_default())
        };
        let dest_is_dir = dest.ends_with('/')
            || srcs.len() > 1
            || srcs.iter().any(|s| has_glob(s))
            || sources.len() > 1;
        // The owner (in-image ids).
        let owner = match &chown {
            Some(c) => {
                let u = st.resolve_user(c).map_err(failed)?;
                (u.uid, u.gid)
            }
            None => (0, 0),
        };
        if chown.is_some() && self.store.mode() == UnpackMode::Rootless {
            self.say(" ---> note: --chown has no effect in a rootless store (every file belongs to the image's root)");
        }
        // Content hash of everything copied.
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for s in &sources {
            h.update(s.rel.as_os_str().as_bytes());
            h.update(b"\0");
            self.hash_tree(&s.rel, s.is_dir, &mut h)
                .map_err(|e| failed(format!("reading {}: {e}", s.written)))?;
        }
        let content = hex(h.finish().as_ref());
        let canon = serde_json::to_string(&(
            srcs,
            dest_abs.display().to_string(),
            dest_is_dir,
            &chown,
            chmod,
            &content,
        ))
        .unwrap_or_default();
        st.chain = chain(&st.chain, &[kw, &canon]);
        let key = st.chain.clone();
        if let Some(hit) = self.cache_hit(&key) {
            return Ok((hit, StepStatus::Cached));
        }
        let st_ref: &Stage = st;
        let l = {
            let dir = StepDir::new(self.store)?;
            let upper = dir.0.join("upper");
            std::fs::create_dir(&upper)
                .map_err(|e| ioe(format!("creating {}", upper.display()), e))?;
            let w = UpperWriter::new(self.store.mode(), &upper, st_ref, owner, chmod);
            let mut n_files = 0u64;
            let mut bytes = 0u64;
            for (k, s) in sources.iter().enumerate() {
                let src_fd = open_beneath(&self.ctx.fd, &s.rel, libc::O_PATH)
                    .map_err(|e| failed(format!("opening {}: {e}", s.written)))?;
                if s.is_dir {
                    let d = w
                        .mkdir_p_resolved(&dest_abs)
                        .map_err(|e| failed(e.to_string()))?;
                    w.copy_dir(
                        &src_fd,
                        &s.rel,
                        &d,
                        Some(&self.ctx.ignore),
                        false,
                        &mut n_files,
                        &mut bytes,
                    )
                    .map_err(|e| failed(e.to_string()))?;
                    continue;
                }
                if kw == "ADD" && is_archive(&src_fd) {
                    let tmp = dir.0.join(format!("extract{k}"));
                    let f = File::from(
                        open_beneath(&self.ctx.fd, &s.rel, libc::O_RDONLY)
                            .map_err(|e| failed(format!("opening {}: {e}", s.written)))?,
                    );
                    crate::unpack::unpack_layer(f, &tmp, self.store.mode(), &s.written)
                        .map_err(|e| failed(format!("extracting {}: {e}", s.written)))?;
                    let tfd = open_path(&tmp, libc::O_PATH | libc::O_DIRECTORY)
                        .map_err(|e| failed(e.to_string()))?;
                    let d = w
                        .mkdir_p_resolved(&dest_abs)
                        .map_err(|e| failed(e.to_string()))?;
                    w.copy_dir(
                        &tfd,
                        Path::new(""),
                        &d,
                        None,
                        true,
                        &mut n_files,
                        &mut bytes,
                    )
                    .map_err(|e| failed(e.to_string()))?;
                    continue;
                }
                // A single file.
                let into_dir = dest_is_dir || w.is_dir(&dest_abs);
                let target = if into_dir {
                    let d = w
                        .mkdir_p_resolved(&dest_abs)
                        .map_err(|e| failed(e.to_string()))?;
                    let name = s
                        .rel
                        .file_name()
                        .ok_or_else(|| failed("a source has no name".into()))?;
                    d.join(name)
                } else {
                    let parent = dest_abs.parent().unwrap_or(Path::new("/"));
                    let d = w
                        .mkdir_p_resolved(parent)
                        .map_err(|e| failed(e.to_string()))?;
                    let name = dest_abs
                        .file_name()
                        .ok_or_else(|| failed(format!("destination {dest:?} has no file name")))?;
                    d.join(name)
                };
                let f = File::from(
                    open_beneath(&self.ctx.fd, &s.rel, libc::O_RDONLY)
                        .map_err(|e| failed(format!("opening {}: {e}", s.written)))?,
                );
                let md = f.metadata().map_err(|e| failed(e.to_string()))?;
                bytes += md.len();
                n_files += 1;
                w.write_file(f, &md, &target, false)
                    .map_err(|e| failed(e.to_string()))?;
            }
            self.say(format!(" ---> copied {n_files} file(s), {bytes} bytes"));
            self.add_layer(&upper, &failed)?
        };
        self.remember(key, Some(&l), i.text());
        Ok((Some(l), StepStatus::Built))
    }

    /// Hash a source tree: names, types, modes, link targets, contents.
    fn hash_tree(&self, rel: &Path, is_dir: bool, h: &mut ring::digest::Context) -> io::Result<()> {
        if !is_dir {
            let mut f = File::from(open_beneath(&self.ctx.fd, rel, libc::O_RDONLY)?);
            let md = f.metadata()?;
            h.update(format!("f {:o} {}\0", md.mode() & 0o7777, md.len()).as_bytes());
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            return Ok(());
        }
        let dfd = open_beneath(&self.ctx.fd, rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let base = fd_path(&dfd);
        let mut names: Vec<_> = std::fs::read_dir(&base)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names {
            let child = rel.join(&n);
            if self.ctx.ignore.is_ignored(&child) && !self.ctx.ignore.has_exceptions() {
                continue;
            }
            let md = std::fs::symlink_metadata(base.join(&n))?;
            h.update(n.as_bytes());
            h.update(b"\0");
            let ft = md.file_type();
            if ft.is_dir() {
                h.update(format!("d {:o}\0", md.mode() & 0o7777).as_bytes());
                self.hash_tree(&child, true, h)?;
                h.update(b"end\0");
            } else if self.ctx.ignore.is_ignored(&child) {
                continue;
            } else if ft.is_symlink() {
                let t = std::fs::read_link(base.join(&n))?;
                h.update(b"l ");
                h.update(t.as_os_str().as_bytes());
                h.update(b"\0");
            } else if ft.is_file() {
                self.hash_tree(&child, false, h)?;
            }
        }
        Ok(())
    }
}

fn is_archive(fd: &OwnedFd) -> bool {
    let Ok(mut f) = File::open(fd_path(fd)) else {
        return false;
    };
    let mut buf = [0u8; 512];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return false,
        }
    }
    match buf[..n.min(4)] {
        [0x1f, 0x8b, ..] => true,
        [0x28, 0xb5, 0x2f, 0xfd] => true,
        _ => n >= 262 && &buf[257..262] == b"ustar",
    }
}

/// Writes COPY/ADD/WORKDIR results into a fresh overlay upper directory,
/// resolving destinations in the merged view (upper over the image's
/// layers) so image symlinks (`/lib -> usr/lib`) are followed inside the
/// image, never on the host.
struct UpperWriter {
    mode: UnpackMode,
    upper: PathBuf,
    /// upper, then the image's layers, topmost first.
    view: Vec<PathBuf>,
    lowers: Vec<PathBuf>,
    owner: (u32, u32),
    chmod: Option<u32>,
}

impl UpperWriter {
    fn new(
        mode: UnpackMode,
        upper: &Path,
        st: &Stage,
        owner: (u32, u32),
        chmod: Option<u32>,
    ) -> UpperWriter {
        let lowers = st.top_first();
        let mut view = vec![upper.to_path_buf()];
        view.extend(lowers.iter().cloned());
        UpperWriter {
            mode,
            upper: upper.to_path_buf(),
            view,
            lowers,
            owner,
            chmod,
        }
    }

    fn resolve(&self, abs: &Path, follow_last: bool) -> io::Result<PathBuf> {
        let look = |r: &Path| layer_lookup(&self.view, r);
        resolve_scoped(abs, follow_last, &look).map_err(io::Error::other)
    }

    fn is_dir(&self, abs: &Path) -> bool {
        self.resolve(abs, true)
            .ok()
            .and_then(|r| layer_lookup(&self.view, &r).ok())
            .is_some_and(|n| matches!(n, Node::Dir(_)))
    }

    fn host_ids(&self, uid: u32, gid: u32) -> Option<(u32, u32)> {
        match self.mode {
            UnpackMode::Rootful => Some((
                ROOTFUL_ID_BASE + uid.min(65534),
                ROOTFUL_ID_BASE + gid.min(65534),
            )),
            UnpackMode::Rootless => None,
        }
    }

    fn chown(&self, p: &Path, ids: Option<(u32, u32)>) -> io::Result<()> {
        if let Some((u, g)) = ids {
            std::os::unix::fs::lchown(p, Some(u), Some(g))?;
        }
        Ok(())
    }

    /// Resolve `abs` as a directory and create it (and its parents) in the upper.
    fn mkdir_p_resolved(&self, abs: &Path) -> io::Result<PathBuf> {
        let rel = self.resolve(abs, true)?;
        self.mkdir_p(&rel)?;
        Ok(rel)
    }

    /// Create the resolved `rel` and its parents in the upper; a parent that
    /// exists in a lower layer gets that layer's owner, mode and times so the
    /// merged view does not change.
    fn mkdir_p(&self, rel: &Path) -> io::Result<()> {
        let mut cur = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            let up = self.upper.join(&cur);
            match std::fs::symlink_metadata(&up) {
                Ok(md) if md.is_dir() => continue,
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "/{} is not a directory",
                        cur.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match layer_lookup(&self.lowers, &cur)? {
                Node::Dir(md) => {
                    std::fs::create_dir(&up)?;
                    std::os::unix::fs::lchown(&up, Some(md.uid()), Some(md.gid())).or_else(
                        |e| {
                            if self.mode == UnpackMode::Rootless {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        },
                    )?;
                    std::fs::set_permissions(
                        &up,
                        std::fs::Permissions::from_mode(md.mode() & 0o7777),
                    )?;
                    set_times(&up, &md)?;
                }
                Node::Missing => {
                    std::fs::create_dir(&up)?;
                    self.chown(&up, self.host_ids(self.owner.0, self.owner.1))?;
                    std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o755))?;
                }
                _ => {
                    return Err(io::Error::other(format!(
                        "/{} exists in the image and is not a directory",
                        cur.display()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Remove whatever this step already put at `rel` in the upper (a later
    /// source overwrites an earlier one).
    fn clear(&self, rel: &Path) -> io::Result<()> {
        let p = self.upper.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => remove_tree(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => Ok(()),
        }
    }

    fn ids_for(&self, md: &Metadata, preserve: bool) -> Option<(u32, u32)> {
        if preserve {
            match self.mode {
                UnpackMode::Rootful => Some((md.uid(), md.gid())),
                UnpackMode::Rootless => None,
            }
        } else {
            self.host_ids(self.owner.0, self.owner.1)
        }
    }

    fn write_file(
        &self,
        mut src: File,
        md: &Metadata,
        rel: &Path,
        preserve: bool,
    ) -> io::Result<()> {
        self.clear(rel)?;
        let p = self.upper.join(rel);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)?;
        io::copy(&mut src, &mut f)?;
        drop(f);
        self.chown(&p, self.ids_for(md, preserve))?;
        let mode = self.chmod.unwrap_or(md.mode() & 0o7777);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        set_times(&p, md)
    }

    /// Copy the contents of the source dir `src_fd` (`src_rel` for
    /// .dockerignore) into the resolved upper dir `dest_rel`.
    fn copy_dir(
        &self,
        src_fd: &OwnedFd,
        src_rel: &Path,
        dest_rel: &Path,
        ignore: Option<&IgnoreRules>,
        preserve: bool,
        n_files: &mut u64,
        bytes: &mut u64,
    ) -> io::Result<()> {
        let base = fd_path(src_fd);
        let mut names: Vec<_> = std::fs::read_dir(&base)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names {
            let child_src = src_rel.join(&n);
            let md = std::fs::symlink_metadata(base.join(&n))?;
            let ft = md.file_type();
            let ignored = ignore.is_some_and(|r| r.is_ignored(&child_src));
            if ignored && !(ft.is_dir() && ignore.is_some_and(IgnoreRules::has_exceptions)) {
                continue;
            }
            let dest_abs = Path::new("/").join(dest_rel).join(&n);
            if ft.is_dir() {
                let d = self.resolve(&dest_abs, true)?;
                let up = self.upper.join(&d);
                let fresh = !matches!(std::fs::symlink_metadata(&up), Ok(m) if m.is_dir());
                if fresh {
                    self.clear(&d)?;
                    self.mkdir_p(&d)?;
                }
                let cfd = open_beneath(src_fd, Path::new(&n), libc::O_RDONLY | libc::O_DIRECTORY)?;
                self.copy_dir(&cfd, &child_src, &d, ignore, preserve, n_files, bytes)?;
                self.chown(&up, self.ids_for(&md, preserve))?;
                let mode = self.chmod.unwrap_or(md.mode() & 0o7777);
                std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode))?;
                set_times(&up, &md)?;
            } else if ft.is_file() {
                let d = self.resolve(&dest_abs, false)?;
                let f = File::from(open_beneath(src_fd, Path::new(&n), libc::O_RDONLY)?);
                *n_files += 1;
                *bytes += md.len();
                self.write_file(f, &md, &d, preserve)?;
            } else if ft.is_symlink() {
                let d = self.resolve(&dest_abs, false)?;
                self.clear(&d)?;
                let target = std::fs::read_link(base.join(&n))?;
                let p = self.upper.join(&d);
                std::os::unix::fs::symlink(&target, &p)?;
                self.chown(&p, self.ids_for(&md, preserve))?;
                set_times(&p, &md)?;
                *n_files += 1;
            }
            // Sockets, fifos, devices and whiteouts: not copied.
        }
        Ok(())
    }
}

// ─────────────────────────── setup commands ───────────────────────────

/// Options of [`setup_layer`].
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Network of the setup command (package installs need an allowlist).
    pub network: Network,
    /// Capabilities inside the sandbox's user namespace (see [`BuildOptions::cap_add`]).
    pub cap_add: Vec<String>,
    /// Limits (default [`build_limits`]).
    pub limits: Limits,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            network: Network::None,
            cap_add: Vec::new(),
            limits: build_limits(),
        }
    }
}

/// The image reference [`setup_layer`] uses for (`base`, `command`):
/// `nanoclaw.local/setup:<24 hex digits of sha256(base image id, command)>`.
pub fn setup_reference(store: &Store, base_ref: &str, command: &str) -> Result<String, BuildError> {
    let base = store.record(base_ref)?;
    let key = chain(&base.config_digest.to_string(), &["setupCommand", command]);
    Ok(format!("nanoclaw.local/setup:{}", &key[..24]))
}

/// Run `command` (`/bin/sh -c COMMAND`, as the image's user, default root
/// inside the sandbox's user namespace) once over `base_ref` and store the
/// result as a layer and an image; returns that image's reference. The
/// next call with the same base image and command returns at once (the
/// image exists: nothing runs), so a sandbox started from the returned
/// reference has the setup already applied. A failing command stores
/// nothing. For the policy layer's `setupCommand`.
pub fn setup_layer(
    store: &Store,
    base_ref: &str,
    command: &str,
    opts: &SetupOptions,
) -> Result<String, BuildError> {
    let reference = setup_reference(store, base_ref, command)?;
    if store.resolve(&reference).is_ok() {
        return Ok(Reference::parse(&reference)?.to_string());
    }
    let base = store.record(base_ref)?;
    let dir = StepDir::new(store)?;
    let ctx = dir.0.join("context");
    std::fs::create_dir(&ctx).map_err(|e| ioe(format!("creating {}", ctx.display()), e))?;
    let df = format!(
        "FROM {}\nRUN {}\n",
        base.reference,
        serde_json::to_string(&["/bin/sh", "-c", command]).unwrap_or_default()
    );
    let df_path = dir.0.join("Dockerfile");
    std::fs::write(&df_path, df).map_err(|e| ioe(format!("writing {}", df_path.display()), e))?;
    let mut o = BuildOptions::new(reference, &ctx);
    o.dockerfile = Some(df_path);
    o.network = opts.network.clone();
    o.cap_add = opts.cap_add.clone();
    o.limits = opts.limits;
    let rep = build(store, &o, &mut io::sink())?;
    Ok(rep.reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> Vars {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn continuations_comments_and_forms() {
        let df = parse_dockerfile(
            "# syntax=docker/dockerfile:1\n\
             ARG BASE=img\n\
             FROM ${BASE}\n\
             # a comment\n\
             RUN echo a \\\n\
             # comment inside\n\
             \n\
                 && echo b\n\
             CMD [\"python3\", \"-c\", \"print(1)\"]\n\
             copy --chown=1:1 a b /dst/\n",
        )
        .unwrap();
        let ins = &df.instructions;
        assert_eq!(ins.len(), 5);
        assert_eq!(ins[0].keyword, "ARG");
        assert_eq!(ins[1].line, 3);
        assert_eq!(ins[2].keyword, "RUN");
        assert_eq!(ins[2].line, 5);
        assert_eq!(ins[2].args, "echo a && echo b");
        assert_eq!(
            command_form(&ins[3].args),
            vec!["python3", "-c", "print(1)"]
        );
        assert_eq!(command_form(&ins[2].args)[0], "/bin/sh");
        assert_eq!(ins[4].keyword, "COPY");
        assert_eq!(ins[4].flags, vec!["chown=1:1"]);
        assert_eq!(ins[4].args, "a b /dst/");
        assert_eq!(ins[4].line, 10);
    }

    #[test]
    fn escape_directive() {
        let df = parse_dockerfile("# escape=`\nFROM x\nRUN a `\n b\n").unwrap();
        assert_eq!(df.escape, '`');
        assert_eq!(df.instructions[1].args, "a  b");
        assert!(parse_dockerfile("# escape=x\nFROM a").is_err());
        assert!(parse_dockerfile("\n# only a comment\n").is_err());
        let e = parse_dockerfile("FROM a\n12 nope\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn substitution() {
        let v = vars(&[("A", "x"), ("E", "")]);
        assert_eq!(
            lex("$A ${A}b '$A' \"$A c\"", &v, '\\', true).unwrap(),
            vec!["x", "xb", "$A", "x c"]
        );
        assert_eq!(
            lex_one("${B:-def} ${A:+alt} ${E:-e} ${E-e}", &v, '\\').unwrap(),
            "def alt e "
        );
        assert_eq!(lex_one("\\$A $ $1x", &v, '\\').unwrap(), "$A $ ");
        assert_eq!(lex("a\\ b c", &v, '\\', true).unwrap(), vec!["a b", "c"]);
        assert!(lex("'open", &v, '\\', true).is_err());
        assert!(lex_one("${A", &v, '\\').is_err());
        assert!(lex_one("${A/x/y}", &v, '\\').is_err());
    }

    #[test]
    fn dockerignore_rules() {
        let r = IgnoreRules::parse("# c\n*.log\nbuild/\n**/secret*\n!build/keep\n");
        assert!(r.is_ignored(Path::new("a.log")));
        assert!(!r.is_ignored(Path::new("d/a.log")));
        assert!(r.is_ignored(Path::new("build/x/y")));
        assert!(!r.is_ignored(Path::new("build/keep")));
        assert!(r.is_ignored(Path::new("a/b/secret.txt")));
        assert!(r.is_ignored(Path::new("secret")));
        assert!(!r.is_ignored(Path::new("src/main.rs")));
        assert!(glob_match("[a-c]?", "bx"));
        assert!(!glob_match("[^a-c]?", "bx"));
    }

    #[test]
    fn a_scoped_from_names_only_public_or_own_images() {
        let scope = "localhost/bob/";
        for ok in [
            "python:3.11-slim",
            "localhost/bob/x",
            "localhost/bob/x:1",
            "ghcr.io/o/r:t",
        ] {
            assert_eq!(check_from_scope(ok, scope), Ok(()), "{ok}");
        }
        let id = format!("sha256:{}", "a".repeat(64));
        for bad in [
            "localhost/alice/x",
            "localhost/alice/x:latest",
            "localhost/bobby/x",
            "localhost/x",
            "nanoclaw.local/setup:0123",
            "a70a",
            "a70a32227d1a",
            id.as_str(),
            "sha256:zz",
            "Localhost/alice/x",
        ] {
            assert!(check_from_scope(bad, scope).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(
            normalize(Path::new("a/../b/./c")),
            Some(PathBuf::from("b/c"))
        );
        assert_eq!(normalize(Path::new("../x")), None);
        assert_eq!(normalize(Path::new("a/../../x")), None);
        assert_eq!(normalize(Path::new("/abs/p")), Some(PathBuf::from("abs/p")));
    }

    #[test]
    fn scoped_resolution_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/../../../../etc", root.join("esc")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let look = |r: &Path| dir_lookup(root, r);
        assert_eq!(
            resolve_scoped(Path::new("/lib/x"), true, &look).unwrap(),
            PathBuf::from("usr/lib/x")
        );
        assert_eq!(
            resolve_scoped(Path::new("esc/passwd"), true, &look).unwrap(),
            PathBuf::from("etc/passwd")
        );
        assert_eq!(
            resolve_scoped(Path::new("lib"), false, &look).unwrap(),
            PathBuf::from("lib")
        );
        assert!(resolve_scoped(Path::new("loop/x"), true, &look).is_err());
    }

    #[test]
    fn layer_view_whiteouts_and_opaque() {
        let d = tempfile::tempdir().unwrap();
        let low = d.path().join("low");
        let up = d.path().join("up");
        std::fs::create_dir_all(low.join("a")).unwrap();
        std::fs::write(low.join("a/f"), "x").unwrap();
        std::fs::write(low.join("g"), "x").unwrap();
        std::fs::create_dir_all(up.join("a")).unwrap();
        let layers = vec![up.clone(), low.clone()];
        assert!(matches!(
            layer_lookup(&layers, Path::new("a/f")).unwrap(),
            Node::Other(..)
        ));
        // Opaque upper dir hides the lower file.
        let c = CString::new(up.join("a").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid strings and buffer.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"user.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        if r == 0 {
            assert!(matches!(
                layer_lookup(&layers, Path::new("a/f")).unwrap(),
                Node::Missing
            ));
        }
        // A whiteout (char 0:0) hides g; needs mknod rights (root or >= 5.8 userns).
        let g = CString::new(up.join("g").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        if unsafe { libc::mknod(g.as_ptr(), libc::S_IFCHR, 0) } == 0 {
            assert!(matches!(
                layer_lookup(&layers, Path::new("g")).unwrap(),
                Node::Missing
            ));
        }
    }
}
