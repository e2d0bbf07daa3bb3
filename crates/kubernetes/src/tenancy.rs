//! Tenants as namespaces: each tenant of `nanoclaw serve` gets a namespace
//! of its own with a `ResourceQuota` derived from its nanoclaw quota
//! (sandboxes → `pods`, memory → `limits.memory`, CPUs → `limits.cpu`),
//! so that the cluster itself bounds a tenant however many daemon
//! replicas create sandboxes for it at once, and a sandbox id of another
//! tenant is simply not found in the tenant's namespace.
//!
//! The namespace's name is a pure function of the tenant's name
//! ([`namespace_for`]); the objects are written with server-side apply, so
//! a changed quota is applied by the next create, by any replica.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, ResourceQuotaSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use nanoclaw_sandbox::Error;

use crate::client::timed;
use crate::pod::{valid_label_value, LABEL_BACKEND};
use crate::{api_error, backend_error, Kubernetes, MANAGER, NAME};

/// The ResourceQuota's name in a tenant's namespace.
pub const QUOTA_NAME: &str = "nanoclaw";
/// Label on a tenant's namespace: the tenant's name (when it is a valid
/// label value; the namespace's name carries it anyway).
pub const LABEL_TENANT: &str = "nanoclaw.tenant";
/// How long a new namespace may take to get its `default` ServiceAccount
/// (Kubernetes 1.20 refuses Pods until it exists).
const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// The start of [`quota_refusal`]'s message, for [`is_quota_refusal`].
const REFUSED: &str = "the namespace's ResourceQuota refused the sandbox";

/// A tenant's bounds, as its namespace's ResourceQuota.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantQuota {
    /// Sandboxes at once (`pods`).
    pub sandboxes: u32,
    /// Memory over all its sandboxes, bytes (`limits.memory`).
    pub memory_bytes: u64,
    /// CPUs over all its sandboxes (`limits.cpu`).
    pub cpus: f64,
}

/// The namespace of tenant `tenant`: `PREFIX-TENANT` when that is a valid
/// namespace name (a DNS label: at most 63 of `[a-z0-9-]`, alphanumeric at
/// both ends), else the tenant's name made valid plus a hash of it, so two
/// tenants never share one.
pub fn namespace_for(prefix: &str, tenant: &str) -> String {
    let plain = format!("{prefix}-{tenant}");
    let valid = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if valid(&plain) {
        return plain;
    }
    // FNV-1a: stable across versions and machines (every replica must
    // derive the same name).
    let hash = tenant.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut cleaned: String = tenant
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    cleaned.truncate(40);
    let head: String = format!("{prefix}-{cleaned}")
        .trim_matches('-')
        .chars()
        .take(50)
        .collect();
    format!(
        "{}-{:012x}",
        head.trim_end_matches('-'),
        hash & 0xffff_ffff_ffff
    )
}

/// The error of a Pod the ResourceQuota of `namespace` refused
/// (`message`: the API server's).
pub(crate) fn quota_refusal(namespace: &str, message: &str) -> Error {
    backend_error(format!("{REFUSED} (namespace {namespace}): {message}"))
}

/// Whether `e` is a refusal by a namespace's ResourceQuota, and if so the
/// API server's message (it names the resource: `pods`, `limits.memory`,
/// `limits.cpu`).
pub fn is_quota_refusal(e: &Error) -> Option<&str> {
    match e {
        Error::Backend { backend, message } if backend == NAME && message.starts_with(REFUSED) => {
            Some(message.as_str())
        }
        _ => None,
    }
}

/// The ResourceQuota `quota` is, as an object.
pub fn resource_quota(quota: &TenantQuota) -> ResourceQuota {
    let mut hard = BTreeMap::new();
    hard.insert("pods".to_string(), Quantity(quota.sandboxes.to_string()));
    hard.insert(
        "limits.memory".to_string(),
        Quantity(quota.memory_bytes.to_string()),
    );
    let milli = (quota.cpus * 1000.0).round().max(0.0) as u64;
    hard.insert("limits.cpu".to_string(), Quantity(format!("{milli}m")));
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_BACKEND.to_string(), NAME.to_string());
    ResourceQuota {
        metadata: ObjectMeta {
            name: Some(QUOTA_NAME.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(ResourceQuotaSpec {
            hard: Some(hard),
            ..ResourceQuotaSpec::default()
        }),
        status: None,
    }
}

impl Kubernetes {
    /// Makes (or updates) namespace `ns` for tenant `tenant` and its
    /// ResourceQuota from `quota` (server-side apply; `None`: no quota
    /// object), and waits (a watch) until the namespace can take Pods.
    /// Returns the backend making sandboxes there.
    pub fn tenant_namespace(
        &self,
        ns: &str,
        tenant: &str,
        quota: Option<&TenantQuota>,
    ) -> Result<Kubernetes, Error> {
        let pp = PatchParams::apply(MANAGER).force();
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_BACKEND.to_string(), NAME.to_string());
        if valid_label_value(tenant) {
            labels.insert(LABEL_TENANT.to_string(), tenant.to_string());
        }
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.to_string()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        self.block(timed(namespaces.patch(ns, &pp, &Patch::Apply(&namespace))))
            .map_err(|e| api_error(&format!("applying namespace {ns}"), e))?;
        if let Some(q) = quota {
            let quotas: Api<ResourceQuota> = Api::namespaced(self.client.clone(), ns);
            self.block(timed(quotas.patch(
                QUOTA_NAME,
                &pp,
                &Patch::Apply(&resource_quota(q)),
            )))
            .map_err(|e| api_error(&format!("applying resourcequota {ns}/{QUOTA_NAME}"), e))?;
        }
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let waited = self.block(tokio::time::timeout(
            ACCOUNT_TIMEOUT,
            kube::runtime::wait::await_condition(
                accounts,
                "default",
                |a: Option<&ServiceAccount>| a.is_some(),
            ),
        ));
        match waited {
            Ok(Ok(_)) => Ok(self.in_namespace(ns)),
            Ok(Err(e)) => Err(backend_error(format!(
                "watching serviceaccount {ns}/default: {e}"
            ))),
            Err(_) => Err(backend_error(format!(
                "namespace {ns} got no default ServiceAccount within {} s (is the controller-manager running?)",
                ACCOUNT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The namespace prefix of tenants' namespaces: the configured
    /// namespace when one was set, else `nanoclaw`.
    pub fn tenant_prefix(&self) -> String {
        self.opts
            .namespace
            .clone()
            .unwrap_or_else(|| "nanoclaw".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_gets_a_valid_namespace_of_its_own() {
        assert_eq!(namespace_for("nanoclaw", "alice"), "nanoclaw-alice");
        let odd = namespace_for("nanoclaw", "Team_A");
        assert!(odd.starts_with("nanoclaw-team-a-"), "{odd}");
        assert_ne!(odd, namespace_for("nanoclaw", "team-a"));
        assert_ne!(odd, namespace_for("nanoclaw", "Team.A"));
        let long = namespace_for("nanoclaw", &"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert_eq!(long, namespace_for("nanoclaw", &"x".repeat(100)));
    }

    #[test]
    fn the_quota_bounds_pods_memory_and_cpu() {
        let rq = resource_quota(&TenantQuota {
            sandboxes: 3,
            memory_bytes: 1 << 30,
            cpus: 1.5,
        });
        let hard = rq.spec.unwrap().hard.unwrap();
        assert_eq!(hard["pods"].0, "3");
        assert_eq!(hard["limits.memory"].0, (1u64 << 30).to_string());
        assert_eq!(hard["limits.cpu"].0, "1500m");
    }
}
