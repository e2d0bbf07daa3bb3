//! nanoclaw configuration and policy.
