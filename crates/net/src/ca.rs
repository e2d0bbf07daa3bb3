//! The per-sandbox interception CA.
//!
//! Made for one sandbox when its policy has credential rules: an ECDSA
//! P-256 key and a self-signed CA certificate, valid for a day and
//! name-constrained to the domains the rules name (so even a stolen key
//! could not vouch for any other site). Its certificate is trusted inside
//! that sandbox only (its `/etc/nanoclaw/ca.crt` and CA bundle); it is
//! never written to the host's trust store. Its private key lives in this
//! value, in the memory of the process that runs the sandbox's proxy (the
//! keeper or the `run` process), and nowhere else: the engine makes it
//! after the sandbox's first process was cloned, so no sandbox process is
//! ever a copy of memory holding it.
//!
//! Leaf certificates are minted on demand, one per name (the SNI of an
//! intercepted connection), and cached.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

/// How long the CA and its leaves are valid (a sandbox outliving it gets
/// handshake failures, not silent trust).
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most leaf certificates cached (one per intercepted name).
const MAX_LEAVES: usize = 1024;

/// Creating the CA or a leaf failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused the parameters or the key.
    #[error("cannot make the sandbox's interception certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("cannot use the sandbox's interception certificate: {0}")]
    Tls(#[from] rustls::Error),
}

/// A sandbox's interception CA (see the module docs).
pub struct SandboxCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

fn validity(p: &mut CertificateParams) {
    let now = SystemTime::now();
    // An hour back, for clocks a little behind.
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + VALIDITY).into();
}

/// The rustls crypto provider the proxy uses (ring).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl SandboxCa {
    /// A new CA for sandbox `label`, constrained to `domains` (names the
    /// leaves may be for, each with its subdomains).
    pub fn new(label: &str, domains: &[String]) -> Result<SandboxCa, CaError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nanoclaw");
        dn.push(
            DnType::CommonName,
            format!("nanoclaw sandbox {label} egress CA"),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        if !domains.is_empty() {
            p.name_constraints = Some(NameConstraints {
                permitted_subtrees: domains
                    .iter()
                    .map(|d| GeneralSubtree::DnsName(d.clone()))
                    .collect(),
                excluded_subtrees: Vec::new(),
            });
        }
        validity(&mut p);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = p.self_signed(&key)?;
        let pem = cert.pem();
        Ok(SandboxCa {
            cert,
            key,
            pem,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM (what the sandbox trusts).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A TLS server configuration presenting a leaf for `name` (minted
    /// once, then cached), offering only HTTP/1.1 by ALPN.
    pub(crate) fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, CaError> {
        let mut leaves = match self.leaves.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = leaves.get(name) {
            return Ok(c.clone());
        }
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = p.signed_by(&leaf_key, &self.cert, &self.key)?;
        let chain = vec![
            CertificateDer::from(leaf.der().to_vec()),
            CertificateDer::from(self.cert.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // No h2: the proxy reads HTTP/1.1 requests (a client offering only
        // h2 fails the handshake rather than bypassing the checks).
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_string(), cfg.clone());
        Ok(cfg)
    }
}
