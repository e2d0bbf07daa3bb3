//! Model providers: one conversation format in, one response out, whatever
//! the wire format (Anthropic Messages with SSE, OpenAI Chat Completions
//! with SSE — the latter also serves Ollama, llama.cpp and vLLM through
//! `base_url`).
//!
//! The loop speaks only these types; [`anthropic`] and [`openai`] translate
//! them to and from the providers' streams. The API key lives here, in the
//! runtime: it is sent in the auth header and nowhere else.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod anthropic;
mod http;
pub mod openai;
pub mod sse;

pub use http::MAX_BACKOFF;

/// Who said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person, and the tool results sent back on the agent's behalf.
    User,
    /// The model.
    Assistant,
}

/// One piece of a message (Anthropic's content blocks; OpenAI's messages
/// are mapped to and from them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// The model asks for a tool call.
    ToolUse {
        /// The call's id (the provider's).
        id: String,
        /// The tool's name.
        name: String,
        /// Its arguments (a JSON object).
        input: Value,
    },
    /// The answer to a tool call (sent in a `User` message).
    ToolResult {
        /// The id of the `ToolUse` it answers.
        tool_use_id: String,
        /// What the tool returned (or why it was refused).
        content: String,
        /// True when the call failed or was refused.
        is_error: bool,
    },
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who.
    pub role: Role,
    /// What.
    pub content: Vec<Block>,
}

impl Message {
    /// A user message of plain text.
    pub fn user_text(text: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: vec![Block::Text { text: text.into() }],
        }
    }

    /// The text blocks, joined.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for b in &self.content {
            if let Block::Text { text } = b {
                out.push_str(text);
            }
        }
        out
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Name.
    pub name: String,
    /// What it does (for the model).
    pub description: String,
    /// JSON schema of its arguments.
    pub input_schema: Value,
}

/// One call to the model.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The model name.
    pub model: &'a str,
    /// The system prompt.
    pub system: &'a str,
    /// The conversation so far.
    pub messages: &'a [Message],
    /// The tools offered.
    pub tools: &'a [ToolSpec],
    /// Upper bound on the answer's tokens.
    pub max_tokens: u32,
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Its answer is complete.
    EndTurn,
    /// It wants tool results.
    ToolUse,
    /// It hit `max_tokens`.
    MaxTokens,
    /// Something else, as the provider named it.
    Other(String),
}

/// Tokens one call used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Answer tokens.
    pub output_tokens: u64,
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Text and tool-use blocks, in order.
    pub content: Vec<Block>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Tokens used.
    pub usage: Usage,
    /// The model that answered (as the provider reports it).
    pub model: String,
    /// HTTP attempts it took (1 without retries).
    pub attempts: u32,
}

/// Which wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Anthropic Messages API.
    Anthropic,
    /// OpenAI Chat Completions (and compatible servers).
    OpenAi,
}

impl Kind {
    /// The provider named in the config (`anthropic`; `openai` and every
    /// OpenAI-compatible name: `ollama`, `vllm`, `llamacpp`, `azure`, …).
    pub fn from_name(name: &str) -> Kind {
        match name {
            "anthropic" | "claude" => Kind::Anthropic,
            _ => Kind::OpenAi,
        }
    }

    /// The default endpoint (without the path).
    pub fn default_base_url(self) -> &'static str {
        match self {
            Kind::Anthropic => "https://api.anthropic.com",
            Kind::OpenAi => "https://api.openai.com/v1",
        }
    }
}

/// How to reach a model.
#[derive(Clone)]
pub struct ProviderConfig {
    /// Wire format.
    pub kind: Kind,
    /// The key (sent as `x-api-key` or `Authorization: Bearer`; local
    /// servers may need none).
    pub api_key: Option<String>,
    /// The model.
    pub model: String,
    /// Endpoint base (`https://api.anthropic.com`,
    /// `http://127.0.0.1:11434/v1`); `None`: [`Kind::default_base_url`].
    pub base_url: Option<String>,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Bound on one HTTP attempt (connect to last byte).
    pub request_timeout: Duration,
    /// Retries after the first attempt on 429, 529, 5xx and transport errors.
    pub max_retries: u32,
    /// First backoff (doubled each retry, with jitter; `Retry-After` wins
    /// when the server sends one, up to the deadline).
    pub backoff: Duration,
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl ProviderConfig {
    /// The model and `max_tokens` of `req`, or this config's when the
    /// request leaves them empty.
    pub fn model_and_max_tokens<'r>(&'r self, req: &Request<'r>) -> (&'r str, u32) {
        let model = if req.model.is_empty() {
            self.model.as_str()
        } else {
            req.model
        };
        let max_tokens = if req.max_tokens == 0 {
            self.max_tokens
        } else {
            req.max_tokens
        };
        (model, max_tokens)
    }
}

/// Defaults for [`ProviderConfig`].
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Default bound on one HTTP attempt.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Default retries.
pub const DEFAULT_MAX_RETRIES: u32 = 4;
/// Default first backoff.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);

/// What went wrong talking to the model.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with an error status (after retries, if it
    /// was retryable).
    #[error("the model API answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The provider's error message (its JSON `error.message`, or the body's start).
        message: String,
    },
    /// No answer in time.
    #[error("the model API did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection-level failure.
    #[error("cannot reach the model API at {url}: {message}")]
    Transport {
        /// Where.
        url: String,
        /// What.
        message: String,
    },
    /// The stream or body did not follow the provider's format.
    #[error("the model API sent something unexpected: {0}")]
    Protocol(String),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
}

impl ProviderError {
    /// Worth another attempt?
    pub fn retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                *status == 429 || *status == 529 || *status == 408 || *status >= 500
            }
            ProviderError::Transport { .. } | ProviderError::Timeout(_) => true,
            ProviderError::Protocol(_) | ProviderError::Config(_) => false,
        }
    }
}

/// A model endpoint.
pub trait Provider: Send + Sync {
    /// Sends one request and reads its whole (streamed) answer, calling
    /// `on_text` with each text delta as it arrives. Retries retryable
    /// failures with backoff, never past `deadline`; a failure that comes
    /// after text already reached `on_text` is returned, not retried (the
    /// text would be repeated).
    fn complete(
        &self,
        req: &Request<'_>,
        deadline: Instant,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Response, ProviderError>;

    /// The configuration it was made from.
    fn config(&self) -> &ProviderConfig;
}

/// The provider for a configuration.
pub fn connect(cfg: ProviderConfig) -> Result<Box<dyn Provider>, ProviderError> {
    match cfg.kind {
        Kind::Anthropic => Ok(Box::new(anthropic::Anthropic::new(cfg)?)),
        Kind::OpenAi => Ok(Box::new(openai::OpenAi::new(cfg)?)),
    }
}
