//! The backend's Kubernetes client: every request runs on the backend's
//! own runtime, and every API call has a deadline.
//!
//! Why: a tokio socket belongs to the runtime it was opened on (its
//! reactor), and hyper's connection pool spawns each connection's task on
//! whatever runtime is current when the connection is made. A caller that
//! drives the client from a runtime of its own (a test, the daemon) thus
//! leaves connections in the shared pool that only move while that caller
//! blocks on its runtime; the backend's next request may pick one and wait
//! forever. That was stop 24's CI hang (`tests/kubernetes.rs`,
//! `foreign_runtime`). [`OnRuntime`] moves each request onto the backend's
//! runtime, whose worker thread always runs, so connections are made,
//! driven and pooled there, whoever calls.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;

/// The deadline of one API call (not of an exec stream, which has the
/// command's own timeout). A request that gets no answer in this time
/// fails with an error naming the call and the server.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tower layer that runs each request's future as a task on `Handle`'s
/// runtime (see the module's documentation).
#[derive(Clone)]
pub(crate) struct OnRuntime(pub(crate) Handle);

impl<S> tower_layer::Layer<S> for OnRuntime {
    type Service = OnRuntimeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OnRuntimeService {
            inner,
            handle: self.0.clone(),
        }
    }
}

/// [`OnRuntime`]'s service.
pub(crate) struct OnRuntimeService<S> {
    inner: S,
    handle: Handle,
}

/// Aborts the request's task when its caller gives up on it (a deadline),
/// so nothing keeps running for nobody.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S, R> tower_service::Service<R> for OnRuntimeService<S>
where
    S: tower_service::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let task = AbortOnDrop(self.handle.spawn(self.inner.call(req)));
        Box::pin(async move {
            let mut task = task;
            match (&mut task.0).await {
                Ok(r) => r.map_err(Into::into),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }
}

/// A client for `config` whose requests run on `handle`'s runtime.
pub(crate) fn build(config: kube::Config, handle: Handle) -> Result<kube::Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&OnRuntime(handle))
        .build())
}

/// `call` with [`API_TIMEOUT`]. A call that gets no answer in time fails
/// as a [`kube::Error::Service`] saying so, so callers handle it like any
/// other failed call (and name the call in their error).
pub(crate) async fn timed<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the API server did not answer within {} s",
                API_TIMEOUT.as_secs()
            ),
        )))),
    }
}
