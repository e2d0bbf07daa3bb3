//! The one output type: what happened to a sandboxed command.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the engine killed a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KillReason {
    /// The wall-clock timeout expired.
    Timeout,
    /// The memory cgroup's OOM killer fired (read from the kernel's oom_kill counter).
    Oom,
    /// The pids limit was hit (read from the kernel's pids.events).
    Pids,
    /// A stream exceeded the output limit.
    OutputLimit,
    /// The caller asked for the sandbox to be killed.
    Killed,
}

/// What the engine applied to a run, layer by layer (reported by `--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layers {
    /// "rootful" or "rootless".
    pub mode: String,
    /// Namespaces unshared.
    pub namespaces: Vec<String>,
    /// The uid map written for the sandbox ("inside host count" lines).
    pub uid_map: String,
    /// Rootful: the sandbox's host id slot, its host ids and the owner of
    /// its user namespace (see `native::idslot`); empty rootless.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_ids: String,
    /// Cgroup version per controller, e.g. `memory: v1`; empty when none.
    pub cgroup: Vec<String>,
    /// Limits that could not be enforced by a cgroup (and what replaced them).
    pub degraded: Vec<String>,
    /// Seccomp: "default", "profile:PATH", or "unconfined".
    pub seccomp: String,
    /// Landlock ABI in use, or why none.
    pub landlock: String,
    /// Capabilities left to the command (empty: none).
    pub capabilities: Vec<String>,
    /// `no_new_privs` set.
    pub no_new_privs: bool,
}

/// A destination the egress proxy refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetDenial {
    /// Host name or address asked for.
    pub destination: String,
    /// Port asked for.
    pub port: u16,
    /// Why it was refused (a stable kind, e.g. `not_allowed`, `special_address`).
    pub reason: String,
    /// The human explanation.
    pub detail: String,
    /// `http`, `connect` or `socks5`.
    pub protocol: String,
}

/// What the network layer did during a run (allowlist and open modes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkReport {
    /// `none`, `allowlist` or `open`.
    pub mode: String,
    /// Where the proxy listened inside the sandbox.
    pub proxy: Option<String>,
    /// Connections allowed.
    pub allowed: u64,
    /// Connections refused.
    pub denied: u64,
    /// Bytes from the sandbox to the outside.
    pub bytes_up: u64,
    /// Bytes from the outside to the sandbox.
    pub bytes_down: u64,
    /// Requests that got headers from a credential rule (intercepted).
    #[serde(default)]
    pub intercepted: u64,
    /// Every refusal (destination, port, reason), oldest first.
    pub denials: Vec<NetDenial>,
    /// Every connection redirected transparently (allowed and refused:
    /// address, name, port, bytes, reason), oldest first.
    #[serde(default)]
    pub connections: Vec<NetConnection>,
    /// Every query to the sandbox's DNS (name, type, answers, rcode,
    /// reason), oldest first.
    #[serde(default)]
    pub dns: Vec<NetDnsQuery>,
}

/// One transparent connection, for the outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConnection {
    /// The address connected to.
    pub address: String,
    /// The port.
    pub port: u16,
    /// The name the decision used (TLS SNI, HTTP Host, or DNS answer).
    pub name: Option<String>,
    /// `sni`, `http_host`, `dns` or `none`.
    pub name_source: String,
    /// Let through?
    pub allowed: bool,
    /// Machine-readable reason when refused or cut.
    pub reason: Option<String>,
    /// The reason in words.
    pub detail: Option<String>,
    /// Bytes from the sandbox.
    pub bytes_up: u64,
    /// Bytes to the sandbox.
    pub bytes_down: u64,
}

/// One query to the sandbox's DNS, for the outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetDnsQuery {
    /// The name asked for.
    pub name: String,
    /// `A`, `AAAA`, `TXT`, ...
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Answered with the name's addresses?
    pub allowed: bool,
    /// The addresses returned.
    pub answers: Vec<String>,
    /// `NOERROR`, `NXDOMAIN`, ...
    pub rcode: String,
    /// Machine-readable reason when refused or empty.
    pub reason: Option<String>,
    /// The reason in words.
    pub detail: Option<String>,
}

impl NetworkReport {
    /// What happened between `before` and `self`, two reports of the same
    /// long-lived sandbox (its proxy's counters only grow): the counts'
    /// differences and the refusals, transparent connections and DNS
    /// queries added since (the proxy keeps the first ones, so those past
    /// its cap are counted, not listed).
    pub fn since(&self, before: &NetworkReport) -> NetworkReport {
        NetworkReport {
            mode: self.mode.clone(),
            proxy: self.proxy.clone(),
            allowed: self.allowed.saturating_sub(before.allowed),
            denied: self.denied.saturating_sub(before.denied),
            bytes_up: self.bytes_up.saturating_sub(before.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(before.bytes_down),
            intercepted: self.intercepted.saturating_sub(before.intercepted),
            denials: self
                .denials
                .get(before.denials.len()..)
                .unwrap_or_default()
                .to_vec(),
            connections: self
                .connections
                .get(before.connections.len()..)
                .unwrap_or_default()
                .to_vec(),
            dns: self
                .dns
                .get(before.dns.len()..)
                .unwrap_or_default()
                .to_vec(),
        }
    }
}

/// The result of one sandboxed run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// Exit code, when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when the command was killed by a signal.
    pub signal: Option<i32>,
    /// Why the engine killed the sandbox, if it did.
    pub killed_by: Option<KillReason>,
    /// Captured stdout (empty when streamed). In JSON: `stdout`, the text
    /// (invalid UTF-8 replaced by U+FFFD, for people), and `stdout_b64`,
    /// the exact bytes in base64, present only when they are not valid
    /// UTF-8; reading JSON prefers `stdout_b64`, so a round trip is exact.
    #[serde(flatten, with = "stdout_stream")]
    pub stdout: Vec<u8>,
    /// Captured stderr (empty when streamed); in JSON `stderr` and
    /// `stderr_b64`, as for `stdout`.
    #[serde(flatten, with = "stderr_stream")]
    pub stderr: Vec<u8>,
    /// stdout went past the output limit and the rest was dropped.
    pub stdout_truncated: bool,
    /// stderr went past the output limit and the rest was dropped.
    pub stderr_truncated: bool,
    /// Wall-clock time from spawn to exit.
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: Duration,
    /// CPU time used by everything in the sandbox (from the cgroup, else rusage).
    #[serde(rename = "cpu_ms", with = "millis")]
    pub cpu_time: Duration,
    /// Peak memory of the sandbox in bytes (from the cgroup), if known.
    pub peak_memory_bytes: Option<u64>,
    /// Unique id of this sandbox.
    pub sandbox_id: String,
    /// What the engine applied.
    pub layers: Layers,
    /// Network activity and refusals.
    pub network: NetworkReport,
}

impl Outcome {
    /// The exit code a CLI should return, `docker run` style: the command's
    /// own code, 128+N for signal N, 124 on timeout.
    pub fn cli_exit_code(&self) -> i32 {
        if self.killed_by == Some(KillReason::Timeout) {
            return 124;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 125,
        }
    }
}

/// One output stream in JSON: `NAME` (lossy text) and, when the bytes are
/// not valid UTF-8, `NAME_b64` (standard base64 of the exact bytes).
mod stream {
    use base64::Engine;
    use serde::ser::SerializeMap;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(
        name: &str,
        b64_name: &str,
        b: &[u8],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match std::str::from_utf8(b) {
            Ok(text) => m.serialize_entry(name, text)?,
            Err(_) => {
                m.serialize_entry(name, &String::from_utf8_lossy(b))?;
                let exact = base64::engine::general_purpose::STANDARD.encode(b);
                m.serialize_entry(b64_name, &exact)?;
            }
        }
        m.end()
    }

    /// The value of one stream from its two keys: the exact bytes of
    /// `NAME_b64` when present, else the text of `NAME`.
    pub fn decode<E: serde::de::Error>(
        name: &str,
        text: Option<String>,
        b64: Option<String>,
    ) -> Result<Vec<u8>, E> {
        match (b64, text) {
            (Some(b64), _) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| E::custom(format!("{name}_b64: {e}"))),
            (None, Some(t)) => Ok(t.into_bytes()),
            (None, None) => Err(E::custom(format!("missing field `{name}`"))),
        }
    }
}

// Each flattened stream names only its own two keys: a flattened field
// takes the keys it knows out of the object, so one struct for both
// streams would leave none for the second.
mod stdout_stream {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Keys {
        stdout: Option<String>,
        stdout_b64: Option<String>,
    }

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        super::stream::serialize("stdout", "stdout_b64", b, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let k = Keys::deserialize(d)?;
        super::stream::decode("stdout", k.stdout, k.stdout_b64)
    }
}

mod stderr_stream {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Keys {
        stderr: Option<String>,
        stderr_b64: Option<String>,
    }

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        super::stream::serialize("stderr", "stderr_b64", b, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let k = Keys::deserialize(d)?;
        super::stream::decode("stderr", k.stderr, k.stderr_b64)
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(stdout: &[u8], stderr: &[u8]) -> Outcome {
        Outcome {
            exit_code: Some(0),
            signal: None,
            killed_by: None,
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
            stdout_truncated: false,
            stderr_truncated: true,
            duration: Duration::from_millis(12),
            cpu_time: Duration::from_millis(3),
            peak_memory_bytes: Some(1 << 20),
            sandbox_id: "abc".into(),
            layers: Layers::default(),
            network: NetworkReport::default(),
        }
    }

    /// Binary output survives a JSON round trip byte for byte.
    #[test]
    fn binary_output_round_trips_exactly() {
        let bin: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, b'\n', 0xc3]).collect();
        for (out, err) in [
            (bin.as_slice(), b"fine\n".as_slice()),
            (b"caf\xc3\xa9 ok\n".as_slice(), bin.as_slice()),
            (b"".as_slice(), b"\x80".as_slice()),
        ] {
            let o = outcome(out, err);
            let json = serde_json::to_string(&o).expect("serializes");
            let back: Outcome = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, o, "{json}");
        }
    }

    /// Text stays readable; the base64 field appears only for bytes that
    /// are not UTF-8.
    #[test]
    fn json_shape_of_the_streams() {
        let v = serde_json::to_value(outcome(b"h\xc3\xa9\n", b"bad \xff\n")).expect("json");
        assert_eq!(v["stdout"], "h\u{e9}\n");
        assert!(v.get("stdout_b64").is_none(), "{v}");
        assert_eq!(v["stderr"], "bad \u{fffd}\n");
        assert_eq!(v["stderr_b64"], "YmFkIP8K");
        assert_eq!(v["stderr_truncated"], true);
        assert_eq!(v["duration_ms"], 12);
        // JSON from before the b64 fields (text only) still reads.
        let mut old = v.clone();
        old.as_object_mut().expect("object").remove("stderr_b64");
        let back: Outcome = serde_json::from_value(old).expect("parses");
        assert_eq!(back.stderr, "bad \u{fffd}\n".as_bytes());
        // A bad base64 field is an error, not silently the lossy text.
        let mut bad = v;
        bad["stderr_b64"] = "***".into();
        assert!(serde_json::from_value::<Outcome>(bad).is_err());
    }
}
