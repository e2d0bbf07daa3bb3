//! Placeholder: replaced by the real client.

use std::time::Instant;

use super::{Provider, ProviderConfig, ProviderError, Request, Response};

/// The client.
pub struct Anthropic {
    cfg: ProviderConfig,
}

impl Anthropic {
    /// A client for `cfg`.
    pub fn new(cfg: ProviderConfig) -> Result<Anthropic, ProviderError> {
        Ok(Anthropic { cfg })
    }
}

impl Provider for Anthropic {
    fn complete(
        &self,
        _req: &Request<'_>,
        _deadline: Instant,
        _on_text: &mut dyn FnMut(&str),
    ) -> Result<Response, ProviderError> {
        Err(ProviderError::Config("not implemented yet".into()))
    }

    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }
}
