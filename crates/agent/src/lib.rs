//! nanoclaw's agent: an LLM loop whose every tool call is checked against
//! policy and runs in the agent's sandbox.

pub mod provider;
