//! envd's protobuf messages (`spec/envd/process/process.proto`,
//! `spec/envd/filesystem/filesystem.proto`) in the proto3 JSON mapping:
//! lowerCamelCase names (the proto names are accepted too), `bytes` as
//! base64 (standard or URL-safe, padded or not), `int64` as strings,
//! enums by name (numbers accepted), `Timestamp` as RFC 3339, `oneof`
//! members as plain fields. Unknown fields are ignored, as envd does.

use std::collections::BTreeMap;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};

use crate::backend::{
    EntryInfo, FileType, FsEvent, FsEventType, ProcessConfig, ProcessEnd, ProcessInfo,
    ProcessInput, ProcessOutput, ProcessSelector, PtySize, Signal,
};
use crate::connect::ConnectError;
use crate::e2b::time::format_rfc3339;

/// Decoder accepting padded and unpadded standard base64.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `bytes` from JSON: base64, standard or URL-safe alphabet.
fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let normalized: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT
        .decode(normalized.as_bytes())
        .map(|v| Some(Bytes::from(v)))
        .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
}

/// A `uint32` from a JSON number or a numeric string.
fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("expected a uint32")),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expected a uint32")),
        Some(_) => Err(serde::de::Error::custom("expected a uint32")),
    }
}

/// An enum from its name or number, as the number.
fn de_enum<'de, D: Deserializer<'de>>(
    d: D,
    names: &[(&str, i64)],
) -> Result<Option<i64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("expected an enum value")),
        Some(Value::String(s)) => names
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| Some(*v))
            .ok_or_else(|| serde::de::Error::custom(format!("unknown enum value {s:?}"))),
        Some(_) => Err(serde::de::Error::custom("expected an enum value")),
    }
}

fn de_signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    de_enum(
        d,
        &[
            ("SIGNAL_UNSPECIFIED", 0),
            ("SIGNAL_SIGTERM", 15),
            ("SIGNAL_SIGKILL", 9),
        ],
    )
}

/// `process.ProcessConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessConfigMsg {
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub envs: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
}

impl From<ProcessConfigMsg> for ProcessConfig {
    fn from(m: ProcessConfigMsg) -> Self {
        ProcessConfig {
            cmd: m.cmd,
            args: m.args,
            envs: m.envs,
            cwd: m.cwd.filter(|c| !c.is_empty()),
        }
    }
}

/// `process.PTY.Size`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PtySizeMsg {
    /// Columns.
    #[serde(deserialize_with = "de_u32")]
    pub cols: Option<u32>,
    /// Rows.
    #[serde(deserialize_with = "de_u32")]
    pub rows: Option<u32>,
}

/// `process.PTY`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PtyMsg {
    /// The terminal size.
    pub size: Option<PtySizeMsg>,
}

impl PtyMsg {
    /// The size (80×24 when not given).
    pub fn size(&self) -> PtySize {
        let size = self.size.as_ref();
        PtySize {
            cols: size.and_then(|s| s.cols).unwrap_or(80),
            rows: size.and_then(|s| s.rows).unwrap_or(24),
        }
    }
}

/// `process.ProcessSelector` (a oneof of `pid` and `tag`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SelectorMsg {
    /// By pid.
    #[serde(deserialize_with = "de_u32")]
    pub pid: Option<u32>,
    /// By tag.
    pub tag: Option<String>,
}

/// The selector of a request, required.
pub fn selector(msg: Option<SelectorMsg>) -> Result<ProcessSelector, ConnectError> {
    match msg {
        Some(SelectorMsg {
            pid: Some(_),
            tag: Some(_),
        }) => Err(ConnectError::invalid(
            "process selector has both pid and tag (a oneof)",
        )),
        Some(SelectorMsg { pid: Some(pid), .. }) => Ok(ProcessSelector::Pid(pid)),
        Some(SelectorMsg { tag: Some(tag), .. }) => Ok(ProcessSelector::Tag(tag)),
        _ => Err(ConnectError::invalid(
            "process selector (pid or tag) is required",
        )),
    }
}

/// `process.StartRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    /// What to run.
    pub process: Option<ProcessConfigMsg>,
    /// Run on a terminal.
    pub pty: Option<PtyMsg>,
    /// Optional tag.
    pub tag: Option<String>,
    /// Keep stdin open (default true, for old clients).
    pub stdin: Option<bool>,
}

/// Requests that only select a process: `ConnectRequest`,
/// `CloseStdinRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SelectRequest {
    /// Which process.
    pub process: Option<SelectorMsg>,
}

/// `process.ProcessInput` (a oneof of `stdin` and `pty`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct InputMsg {
    /// Bytes for stdin.
    #[serde(deserialize_with = "de_bytes")]
    pub stdin: Option<Bytes>,
    /// Bytes for the terminal.
    #[serde(deserialize_with = "de_bytes")]
    pub pty: Option<Bytes>,
}

/// The input of a request, required.
pub fn input(msg: Option<InputMsg>) -> Result<ProcessInput, ConnectError> {
    match msg {
        Some(InputMsg {
            stdin: Some(_),
            pty: Some(_),
        }) => Err(ConnectError::invalid(
            "input has both stdin and pty (a oneof)",
        )),
        Some(InputMsg { stdin: Some(b), .. }) => Ok(ProcessInput::Stdin(b)),
        Some(InputMsg { pty: Some(b), .. }) => Ok(ProcessInput::Pty(b)),
        _ => Err(ConnectError::invalid("input (stdin or pty) is required")),
    }
}

/// `process.SendInputRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    /// Which process.
    pub process: Option<SelectorMsg>,
    /// The bytes.
    pub input: Option<InputMsg>,
}

/// `StreamInputRequest.StartEvent`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputStart {
    /// Which process.
    pub process: Option<SelectorMsg>,
}

/// `StreamInputRequest.DataEvent`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputData {
    /// The bytes.
    pub input: Option<InputMsg>,
}

/// `process.StreamInputRequest` (a oneof of start, data, keepalive).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputRequest {
    /// First message: which process.
    pub start: Option<StreamInputStart>,
    /// Input.
    pub data: Option<StreamInputData>,
    /// Keepalive (no effect).
    pub keepalive: Option<Value>,
}

/// `process.SendSignalRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    /// Which process.
    pub process: Option<SelectorMsg>,
    /// Which signal.
    #[serde(deserialize_with = "de_signal")]
    pub signal: Option<i64>,
}

impl SendSignalRequest {
    /// The signal, required (SIGTERM or SIGKILL).
    pub fn signal(&self) -> Result<Signal, ConnectError> {
        match self.signal {
            Some(15) => Ok(Signal::Term),
            Some(9) => Ok(Signal::Kill),
            _ => Err(ConnectError::invalid(
                "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
            )),
        }
    }
}

/// `process.UpdateRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    /// Which process.
    pub process: Option<SelectorMsg>,
    /// New terminal size.
    pub pty: Option<PtyMsg>,
}

/// `filesystem.{Stat,MakeDir,Remove}Request`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    /// The path.
    pub path: String,
}

/// `filesystem.ListDirRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    /// The directory.
    pub path: String,
    /// Levels (0 means 1).
    #[serde(deserialize_with = "de_u32")]
    pub depth: Option<u32>,
}

/// `filesystem.MoveRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    /// From.
    pub source: String,
    /// To.
    pub destination: String,
}

/// `filesystem.WatchDirRequest` and `CreateWatcherRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchRequest {
    /// The directory.
    pub path: String,
    /// Subdirectories too.
    pub recursive: bool,
    /// Entry info in events.
    #[serde(alias = "include_entry", rename = "includeEntry")]
    pub include_entry: bool,
    /// Network mounts too.
    #[serde(alias = "allow_network_mounts", rename = "allowNetworkMounts")]
    pub allow_network_mounts: bool,
}

/// `filesystem.GetWatcherEventsRequest` and `RemoveWatcherRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatcherIdRequest {
    /// The watcher.
    #[serde(alias = "watcher_id", rename = "watcherId")]
    pub watcher_id: String,
}

fn event(inner: Value) -> Value {
    json!({ "event": inner })
}

/// `{"event": {"start": {"pid": …}}}`.
pub fn start_event(pid: u32) -> Value {
    event(json!({ "start": { "pid": pid } }))
}

/// `{"event": {"keepalive": {}}}`.
pub fn keepalive_event() -> Value {
    event(json!({ "keepalive": {} }))
}

/// `{"event": {"data": {"stdout" | "stderr" | "pty": base64}}}`.
pub fn data_event(output: &ProcessOutput) -> Value {
    let (field, bytes) = match output {
        ProcessOutput::Stdout(b) => ("stdout", b),
        ProcessOutput::Stderr(b) => ("stderr", b),
        ProcessOutput::Pty(b) => ("pty", b),
    };
    let mut data = Map::new();
    data.insert(field.into(), Value::String(STANDARD.encode(bytes)));
    event(json!({ "data": data }))
}

/// `{"event": {"end": {…}}}`.
pub fn end_event(end: &ProcessEnd) -> Value {
    let mut body = json!({
        "exitCode": end.exit_code,
        "exited": end.exited,
        "status": end.status,
    });
    if let (Some(err), Some(obj)) = (&end.error, body.as_object_mut()) {
        obj.insert("error".into(), json!(err));
    }
    event(json!({ "end": body }))
}

/// `process.ProcessConfig` as JSON.
fn config_json(c: &ProcessConfig) -> Value {
    let mut v = json!({ "cmd": c.cmd, "args": c.args, "envs": c.envs });
    if let (Some(cwd), Some(obj)) = (&c.cwd, v.as_object_mut()) {
        obj.insert("cwd".into(), json!(cwd));
    }
    v
}

/// `process.ListResponse`.
pub fn list_response(processes: &[ProcessInfo]) -> Value {
    let items: Vec<Value> = processes
        .iter()
        .map(|p| {
            let mut v = json!({ "config": config_json(&p.config), "pid": p.pid });
            if let (Some(tag), Some(obj)) = (&p.tag, v.as_object_mut()) {
                obj.insert("tag".into(), json!(tag));
            }
            v
        })
        .collect();
    json!({ "processes": items })
}

/// Go's `os.FileMode` type bits, which envd's `mode` carries.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

fn file_type_name(t: FileType) -> &'static str {
    match t {
        FileType::File => "FILE_TYPE_FILE",
        FileType::Directory => "FILE_TYPE_DIRECTORY",
        FileType::Symlink => "FILE_TYPE_SYMLINK",
    }
}

/// `filesystem.EntryInfo` as JSON.
pub fn entry_json(e: &EntryInfo) -> Value {
    let mut v = json!({
        "name": e.name,
        "type": file_type_name(e.file_type),
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode & 0o7777 | match e.file_type {
            FileType::Directory => GO_MODE_DIR,
            FileType::Symlink => GO_MODE_SYMLINK,
            FileType::File => 0,
        },
        "permissions": e.permissions,
        "owner": e.owner,
        "group": e.group,
    });
    if let Some(obj) = v.as_object_mut() {
        if let Some(t) = e.modified_time {
            obj.insert("modifiedTime".into(), json!(format_rfc3339(t)));
        }
        if let Some(target) = &e.symlink_target {
            obj.insert("symlinkTarget".into(), json!(target));
        }
        if !e.metadata.is_empty() {
            obj.insert("metadata".into(), json!(e.metadata));
        }
    }
    v
}

fn event_type_name(t: FsEventType) -> &'static str {
    match t {
        FsEventType::Create => "EVENT_TYPE_CREATE",
        FsEventType::Write => "EVENT_TYPE_WRITE",
        FsEventType::Remove => "EVENT_TYPE_REMOVE",
        FsEventType::Rename => "EVENT_TYPE_RENAME",
        FsEventType::Chmod => "EVENT_TYPE_CHMOD",
    }
}

/// `filesystem.FilesystemEvent` as JSON.
pub fn fs_event_json(e: &FsEvent) -> Value {
    let mut v = json!({ "name": e.name, "type": event_type_name(e.event_type) });
    if let (Some(entry), Some(obj)) = (&e.entry, v.as_object_mut()) {
        obj.insert("entry".into(), entry_json(entry));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::decode_json;

    #[test]
    fn start_request_as_the_sdk_sends_it() {
        let req: StartRequest = decode_json(
            br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"},"cwd":"/tmp"},"stdin":false,"unknownField":1}"#,
        )
        .unwrap();
        let p = req.process.unwrap();
        assert_eq!(p.cmd, "/bin/bash");
        assert_eq!(p.args.len(), 3);
        assert_eq!(req.stdin, Some(false));
    }

    #[test]
    fn selectors_and_inputs() {
        let r: SendInputRequest =
            decode_json(br#"{"process":{"pid":42},"input":{"stdin":"aGk="}}"#).unwrap();
        assert_eq!(selector(r.process).unwrap(), ProcessSelector::Pid(42));
        assert_eq!(
            input(r.input).unwrap(),
            ProcessInput::Stdin(Bytes::from_static(b"hi"))
        );
        // Unpadded and URL-safe base64 are accepted too.
        let r: SendInputRequest =
            decode_json(br#"{"process":{"tag":"t"},"input":{"pty":"-_8"}}"#).unwrap();
        assert_eq!(
            selector(r.process).unwrap(),
            ProcessSelector::Tag("t".into())
        );
        assert_eq!(
            input(r.input).unwrap(),
            ProcessInput::Pty(Bytes::from_static(&[0xfb, 0xff]))
        );
        let r: SendInputRequest = decode_json(br#"{"process":{}}"#).unwrap();
        assert!(selector(r.process).is_err());
        assert!(decode_json::<SendInputRequest>(br#"{"input":{"stdin":"***"}}"#).is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        let r: SendSignalRequest =
            decode_json(br#"{"process":{"pid":1},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(r.signal().unwrap(), Signal::Kill);
        let r: SendSignalRequest = decode_json(br#"{"process":{"pid":1},"signal":15}"#).unwrap();
        assert_eq!(r.signal().unwrap(), Signal::Term);
        let r: SendSignalRequest = decode_json(br#"{"process":{"pid":1}}"#).unwrap();
        assert!(r.signal().is_err());
        assert!(decode_json::<SendSignalRequest>(br#"{"signal":"SIGHUP"}"#).is_err());
    }

    #[test]
    fn watcher_fields_accept_both_spellings() {
        let a: WatcherIdRequest = decode_json(br#"{"watcherId":"w"}"#).unwrap();
        let b: WatcherIdRequest = decode_json(br#"{"watcher_id":"w"}"#).unwrap();
        assert_eq!(a.watcher_id, b.watcher_id);
        let w: WatchRequest =
            decode_json(br#"{"path":"/x","recursive":true,"include_entry":true}"#).unwrap();
        assert!(w.recursive && w.include_entry);
    }

    #[test]
    fn events_encode_in_proto_json() {
        assert_eq!(start_event(7), json!({"event": {"start": {"pid": 7}}}));
        assert_eq!(
            data_event(&ProcessOutput::Stdout(Bytes::from_static(b"hi\n"))),
            json!({"event": {"data": {"stdout": "aGkK"}}})
        );
        let end = end_event(&ProcessEnd::exited(2));
        assert_eq!(end["event"]["end"]["exitCode"], 2);
        assert_eq!(end["event"]["end"]["error"], "exit status 2");
        let entry = entry_json(&EntryInfo {
            name: "a".into(),
            file_type: FileType::File,
            path: "/a".into(),
            size: 5,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: None,
            symlink_target: None,
            metadata: Default::default(),
        });
        assert_eq!(entry["size"], "5");
        assert_eq!(entry["type"], "FILE_TYPE_FILE");
    }
}
