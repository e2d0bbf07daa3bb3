//! Both provider clients against the fake model server speaking their real
//! wire formats: streamed text, tool-call round trips (checked by the fake),
//! retries, timeouts, deadlines, and the key staying out of everything but
//! the auth header.
//!
//! The test bodies are plain functions run per wire format by `both_kinds!`,
//! so clippy does not see them as tests: unwrap is allowed file-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nanoclaw_agent::provider::{
    anthropic::Anthropic, connect, openai::OpenAi, Block, Kind, Message, Provider, ProviderConfig,
    ProviderError, Request, Response, Role, StopReason, ToolSpec, Usage,
};
use nanoclaw_fakellm::{self as fake, Expect, FakeLlm, ToolCall, Turn};
use serde_json::{json, Value};

const KEY: &str = "sk-test-4f9a2c7e1b0d";
const OTHER_SECRET: &str = "db-password-hunter2";
const SYSTEM: &str = "You are a test agent. Be brief.";

fn fake_kind(kind: Kind) -> fake::Kind {
    match kind {
        Kind::Anthropic => fake::Kind::Anthropic,
        Kind::OpenAi => fake::Kind::OpenAi,
    }
}

fn expect() -> Expect {
    Expect {
        api_key: Some(KEY.into()),
        secrets: vec![OTHER_SECRET.into()],
        system_must_contain: vec!["You are a test agent".into()],
    }
}

fn start(kind: Kind, script: Vec<Turn>) -> FakeLlm {
    FakeLlm::start(fake_kind(kind), script, expect()).expect("start the fake")
}

fn config(kind: Kind, fake: &FakeLlm) -> ProviderConfig {
    ProviderConfig {
        kind,
        api_key: Some(KEY.into()),
        model: "test-model".into(),
        base_url: Some(fake.base_url()),
        max_tokens: 256,
        request_timeout: Duration::from_secs(10),
        max_retries: 3,
        backoff: Duration::from_millis(10),
    }
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "sh".into(),
            description: "Run a shell command in the sandbox.".into(),
            input_schema: json!({"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}),
        },
        ToolSpec {
            name: "now".into(),
            description: "The time.".into(),
            input_schema: json!({"type": "object", "properties": {}}),
        },
    ]
}

/// One call: the result, and the text deltas in order.
fn call(
    p: &dyn Provider,
    messages: &[Message],
    deadline: Instant,
) -> (Result<Response, ProviderError>, Vec<String>) {
    let tools = tools();
    let req = Request {
        model: "test-model",
        system: SYSTEM,
        messages,
        tools: &tools,
        max_tokens: 256,
    };
    let mut deltas = Vec::new();
    let r = p.complete(&req, deadline, &mut |t| deltas.push(t.to_string()));
    (r, deltas)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn hello() -> Vec<Message> {
    vec![Message::user_text("Say hello.")]
}

fn assert_clean(fake: &FakeLlm) {
    let v = fake.violations();
    assert!(v.is_empty(), "the fake saw violations: {v:#?}");
}

/// Runs a test body once per wire format, as `<name>::anthropic` and
/// `<name>::openai`.
macro_rules! both_kinds {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn anthropic() {
                super::$name(super::Kind::Anthropic)
            }
            #[test]
            fn openai() {
                super::$name(super::Kind::OpenAi)
            }
        }
    )*};
}

both_kinds!(
    streamed_text,
    tool_call_round_trip,
    unanswered_tool_call_is_caught_by_the_fake,
    retry_after_is_honoured,
    server_errors_are_retried,
    retries_run_out,
    no_retry_on_400,
    request_timeout,
    timeouts_are_retried,
    deadline_bounds_everything,
    retry_after_past_the_deadline_is_not_waited_for,
    key_stays_out_of_debug_and_errors,
    unstreamed_json_answer,
    in_stream_error_is_retried,
);

fn streamed_text(kind: Kind) {
    let text = "Hello there, this answer arrives in several pieces.";
    let fake = start(
        kind,
        vec![Turn::Reply {
            text: Some(text.into()),
            tool_calls: vec![],
            usage: fake::Usage {
                input_tokens: 12,
                output_tokens: 7,
            },
        }],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    let r = r.unwrap();
    assert!(
        deltas.len() >= 2,
        "the text should stream in pieces: {deltas:?}"
    );
    assert_eq!(deltas.concat(), text);
    assert_eq!(r.content, vec![Block::Text { text: text.into() }]);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 7
        }
    );
    assert_eq!(r.stop_reason, StopReason::EndTurn);
    assert_eq!(r.model, "test-model");
    assert_eq!(r.attempts, 1);
    assert_clean(&fake);
    let req = &fake.requests()[0];
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["max_tokens"], 256);
    match kind {
        Kind::Anthropic => {
            assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
            assert_eq!(req.body["system"], SYSTEM);
            assert_eq!(req.body["tools"][0]["input_schema"]["required"][0], "cmd");
        }
        Kind::OpenAi => {
            assert_eq!(req.body["stream_options"]["include_usage"], true);
            assert_eq!(
                req.body["messages"][0],
                json!({"role": "system", "content": SYSTEM})
            );
            assert_eq!(req.body["tools"][0]["type"], "function");
        }
    }
}

/// The assistant turn of a tool call and the user turn answering it.
fn answer_calls(resp: &Response, results: &[(&str, bool)]) -> Vec<Message> {
    let ids: Vec<String> = resp
        .content
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), results.len());
    let mut m = hello();
    m.push(Message {
        role: Role::Assistant,
        content: resp.content.clone(),
    });
    m.push(Message {
        role: Role::User,
        content: ids
            .iter()
            .zip(results)
            .map(|(id, (content, is_error))| Block::ToolResult {
                tool_use_id: id.clone(),
                content: (*content).into(),
                is_error: *is_error,
            })
            .collect(),
    });
    m
}

fn tool_call_round_trip(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::Reply {
                text: Some("Let me look.".into()),
                tool_calls: vec![
                    ToolCall::new("sh", json!({"cmd": "ls -la /work", "env": {"A": "1"}})),
                    ToolCall::new("now", json!({})),
                ],
                usage: fake::Usage {
                    input_tokens: 30,
                    output_tokens: 20,
                },
            },
            Turn::echo_tool_result(),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, _) = call(p.as_ref(), &hello(), soon());
    let r = r.unwrap();
    assert_eq!(r.stop_reason, StopReason::ToolUse);
    assert_eq!(r.content.len(), 3, "{:?}", r.content);
    assert_eq!(
        r.content[0],
        Block::Text {
            text: "Let me look.".into()
        }
    );
    let prefix = match kind {
        Kind::Anthropic => "toolu_",
        Kind::OpenAi => "call_",
    };
    match (&r.content[1], &r.content[2]) {
        (
            Block::ToolUse {
                id: id1,
                name: n1,
                input: i1,
            },
            Block::ToolUse {
                id: id2,
                name: n2,
                input: i2,
            },
        ) => {
            assert!(id1.starts_with(prefix) && id2.starts_with(prefix) && id1 != id2);
            assert_eq!((n1.as_str(), n2.as_str()), ("sh", "now"));
            assert_eq!(*i1, json!({"cmd": "ls -la /work", "env": {"A": "1"}}));
            assert_eq!(*i2, json!({}));
        }
        other => panic!("expected two tool uses, got {other:?}"),
    }

    let messages = answer_calls(&r, &[("file-a file-b", false), ("clock refused", true)]);
    let (r2, deltas) = call(p.as_ref(), &messages, soon());
    let r2 = r2.unwrap();
    let expected = match kind {
        Kind::Anthropic => "tool result: clock refused",
        Kind::OpenAi => "tool result: ERROR: clock refused",
    };
    assert_eq!(deltas.concat(), expected);
    assert_eq!(r2.stop_reason, StopReason::EndTurn);
    assert_eq!(fake.served(), 2);
    assert_clean(&fake);
    let body = &fake.requests()[1].body;
    match kind {
        Kind::Anthropic => {
            let results = &body["messages"][2]["content"];
            assert_eq!(results[0]["type"], "tool_result");
            assert_eq!(results[0]["content"], "file-a file-b");
            assert_eq!(results[1]["is_error"], true);
        }
        Kind::OpenAi => {
            let m = body["messages"].as_array().unwrap();
            let calls = &m[2]["tool_calls"];
            let args: Value =
                serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(args["cmd"], "ls -la /work");
            assert_eq!(m[3]["role"], "tool");
            assert_eq!(m[3]["tool_call_id"], calls[0]["id"]);
            assert_eq!(m[4]["content"], "ERROR: clock refused");
        }
    }
}

fn unanswered_tool_call_is_caught_by_the_fake(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::tools(vec![ToolCall::new("sh", json!({"cmd": "ls"}))]),
            Turn::text("ok"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, _) = call(p.as_ref(), &hello(), soon());
    let r = r.unwrap();
    // The loop "forgets" the tool result, and leaks a secret in its text.
    let mut messages = hello();
    messages.push(Message {
        role: Role::Assistant,
        content: r.content.clone(),
    });
    messages.push(Message::user_text(format!(
        "never mind; the password is {OTHER_SECRET}"
    )));
    let (r2, _) = call(p.as_ref(), &messages, soon());
    assert!(r2.is_ok(), "the fake still answers: {r2:?}");
    let v = fake.violations();
    assert!(
        v.iter()
            .any(|v| v.starts_with("request 2") && v.contains("never answered")),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|v| v.starts_with("request 2") && v.contains("appears in the body")),
        "{v:#?}"
    );
    assert!(!v.iter().any(|v| v.starts_with("request 1")), "{v:#?}");
}

fn retry_after_is_honoured(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::Status {
                code: 429,
                retry_after: Some(1),
                message: "rate limited".into(),
            },
            Turn::text("finally"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let t0 = Instant::now();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    let r = r.unwrap();
    let took = t0.elapsed();
    assert_eq!(r.attempts, 2);
    assert_eq!(deltas.concat(), "finally");
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After: 1 not honoured ({took:?})"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(fake.requests().len(), 2);
    assert_clean(&fake);
}

fn server_errors_are_retried(kind: Kind) {
    // 529 overloaded_error is Anthropic's; OpenAI-compatible servers say 503.
    let busy = match kind {
        Kind::Anthropic => 529,
        Kind::OpenAi => 503,
    };
    let fake = start(
        kind,
        vec![
            Turn::status(busy, "Overloaded"),
            Turn::status(500, "internal"),
            Turn::text("ok"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, _) = call(p.as_ref(), &hello(), soon());
    assert_eq!(r.unwrap().attempts, 3);
    assert_eq!(fake.served(), 3);
    assert_clean(&fake);
}

fn retries_run_out(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::status(500, "first"),
            Turn::status(500, "second"),
            Turn::text("unreached"),
        ],
    );
    let mut cfg = config(kind, &fake);
    cfg.max_retries = 1;
    let p = connect(cfg).unwrap();
    match call(p.as_ref(), &hello(), soon()).0 {
        Err(ProviderError::Status {
            status: 500,
            message,
        }) => assert_eq!(message, "second"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.served(), 2);
    assert_eq!(fake.remaining(), 1);
}

fn no_retry_on_400(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::status(400, "max_tokens: 99999 > 8192, the maximum"),
            Turn::text("unreached"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let e = call(p.as_ref(), &hello(), soon()).0.unwrap_err();
    match &e {
        ProviderError::Status {
            status: 400,
            message,
        } => {
            assert_eq!(message, "max_tokens: 99999 > 8192, the maximum")
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.retryable());
    assert_eq!(fake.requests().len(), 1);
}

fn request_timeout(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::Stall(Duration::from_secs(20)),
            Turn::text("unreached"),
        ],
    );
    let mut cfg = config(kind, &fake);
    cfg.request_timeout = Duration::from_millis(300);
    cfg.max_retries = 0;
    let p = connect(cfg).unwrap();
    let t0 = Instant::now();
    let e = call(p.as_ref(), &hello(), soon()).0.unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

fn timeouts_are_retried(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::Stall(Duration::from_secs(20)),
            Turn::text("second try"),
        ],
    );
    let mut cfg = config(kind, &fake);
    cfg.request_timeout = Duration::from_millis(300);
    let p = connect(cfg).unwrap();
    let t0 = Instant::now();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    assert_eq!(r.unwrap().attempts, 2);
    assert_eq!(deltas.concat(), "second try");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

fn deadline_bounds_everything(kind: Kind) {
    let stall = || Turn::Stall(Duration::from_secs(20));
    let fake = start(kind, vec![stall(), stall(), stall(), stall()]);
    let p = connect(config(kind, &fake)).unwrap(); // request_timeout 10 s
    let t0 = Instant::now();
    let e = call(p.as_ref(), &hello(), t0 + Duration::from_millis(700))
        .0
        .unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A deadline already past: no request at all.
    let before = fake.requests().len();
    let e = call(p.as_ref(), &hello(), Instant::now()).0.unwrap_err();
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert_eq!(fake.requests().len(), before);
}

fn retry_after_past_the_deadline_is_not_waited_for(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::Status {
                code: 429,
                retry_after: Some(30),
                message: "come back later".into(),
            },
            Turn::text("unreached"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let t0 = Instant::now();
    let e = call(p.as_ref(), &hello(), t0 + Duration::from_secs(3))
        .0
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "slept towards the deadline: {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(e, ProviderError::Status { status: 429, .. }),
        "{e:?}"
    );
    assert_eq!(fake.requests().len(), 1);
}

fn key_stays_out_of_debug_and_errors(kind: Kind) {
    let fake = start(
        kind,
        vec![Turn::status(
            401,
            format!("Incorrect API key provided: {KEY}. Check it."),
        )],
    );
    let cfg = config(kind, &fake);
    let debug = match kind {
        Kind::Anthropic => format!("{:?}", Anthropic::new(cfg.clone()).unwrap()),
        Kind::OpenAi => format!("{:?}", OpenAi::new(cfg.clone()).unwrap()),
    };
    assert!(!debug.contains(KEY), "{debug}");
    assert!(!format!("{cfg:?}").contains(KEY));
    let p = connect(cfg.clone()).unwrap();
    let e = call(p.as_ref(), &hello(), soon()).0.unwrap_err();
    assert!(
        matches!(e, ProviderError::Status { status: 401, .. }),
        "{e:?}"
    );
    for shown in [e.to_string(), format!("{e:?}")] {
        assert!(!shown.contains(KEY), "{shown}");
        assert!(shown.contains("Incorrect API key provided"), "{shown}");
    }
    // The key went in its header, and nowhere else.
    assert_clean(&fake);
    // A transport error (nothing listens) does not show it either.
    let addr = fake.addr();
    drop(fake);
    let mut dead = cfg;
    dead.max_retries = 0;
    dead.base_url = Some(format!("http://{addr}"));
    let p = connect(dead).unwrap();
    let e = call(p.as_ref(), &hello(), soon()).0.unwrap_err();
    assert!(matches!(e, ProviderError::Transport { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains(KEY));
}

fn unstreamed_json_answer(kind: Kind) {
    let fake = start(
        kind,
        vec![Turn::Unstreamed {
            text: Some("One piece.".into()),
            tool_calls: vec![ToolCall::new("sh", json!({"cmd": "pwd"}))],
            usage: fake::Usage {
                input_tokens: 4,
                output_tokens: 5,
            },
        }],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    let r = r.unwrap();
    assert_eq!(deltas, vec!["One piece.".to_string()]);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 4,
            output_tokens: 5
        }
    );
    assert_eq!(r.stop_reason, StopReason::ToolUse);
    assert!(
        matches!(&r.content[1], Block::ToolUse { name, input, .. } if name == "sh" && input["cmd"] == "pwd")
    );
    assert_clean(&fake);
}

fn in_stream_error_is_retried(kind: Kind) {
    let fake = start(
        kind,
        vec![
            Turn::StreamError {
                code: 529,
                message: "Overloaded".into(),
            },
            Turn::text("ok"),
        ],
    );
    let p = connect(config(kind, &fake)).unwrap();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    assert_eq!(r.unwrap().attempts, 2);
    assert_eq!(deltas.concat(), "ok");
    // Without retries the error surfaces with its status.
    let fake = start(
        kind,
        vec![Turn::StreamError {
            code: 529,
            message: "Overloaded".into(),
        }],
    );
    let mut cfg = config(kind, &fake);
    cfg.max_retries = 0;
    let p = connect(cfg).unwrap();
    match call(p.as_ref(), &hello(), soon()).0 {
        Err(ProviderError::Status {
            status: 529,
            message,
        }) => assert_eq!(message, "Overloaded"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn openai_compatible_server_without_a_key() {
    // Ollama & co.: no key configured, so no Authorization header at all.
    let fake = FakeLlm::start(
        fake::Kind::OpenAi,
        vec![Turn::text("local model here")],
        Expect::default(),
    )
    .unwrap();
    let mut cfg = config(Kind::OpenAi, &fake);
    cfg.api_key = None;
    let p = connect(cfg).unwrap();
    let (r, deltas) = call(p.as_ref(), &hello(), soon());
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(deltas.concat(), "local model here");
    assert_eq!(fake.requests()[0].header("authorization"), None);
    assert_clean(&fake);
}

#[test]
fn anthropic_model_and_max_tokens_fall_back_to_the_config() {
    let fake = start(Kind::Anthropic, vec![Turn::text("x")]);
    let p = connect(config(Kind::Anthropic, &fake)).unwrap();
    let messages = hello();
    let req = Request {
        model: "",
        system: SYSTEM,
        messages: &messages,
        tools: &[],
        max_tokens: 0,
    };
    p.complete(&req, soon(), &mut |_| {}).unwrap();
    let body = &fake.requests()[0].body;
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["max_tokens"], 256);
    assert!(body.get("tools").is_none());
    assert_clean(&fake);
}
