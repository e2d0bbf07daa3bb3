//! nanoclaw's agent: an LLM loop whose every tool call is checked against
//! policy (outside the model and outside the sandbox), approved by a person
//! when policy says so, run in the agent's sandbox, and audited.
//!
//! - [`provider`]: Anthropic Messages and OpenAI Chat Completions (SSE).
//! - [`tools`]: what the model is offered, and the strict parsing of calls.
//! - [`gate`]: the tool policy, argument rules and when to ask.
//! - [`approval`]: requests, bindings and answers (fail closed).
//! - [`host`]: the agent's sandbox, through any [`Execute`](nanoclaw_sandbox::native::session::Execute).
//! - [`run`]: the loop and its limits.
//! - [`store`]: persistent agents, memory, history, usage.
//! - [`subset`]: agents creating agents with at most their own rights.

pub mod approval;
pub mod audit;
pub mod gate;
pub mod host;
pub mod provider;
pub mod run;
pub mod store;
pub mod subset;
pub mod tools;
