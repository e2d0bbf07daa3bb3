//! Placeholder: replaced by the real client.

use std::time::Instant;

use super::{Provider, ProviderConfig, ProviderError, Request, Response};

/// The client.
pub struct OpenAi {
    cfg: ProviderConfig,
}

impl OpenAi {
    /// A client for `cfg`.
    pub fn new(cfg: ProviderConfig) -> Result<OpenAi, ProviderError> {
        Ok(OpenAi { cfg })
    }
}

impl Provider for OpenAi {
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
