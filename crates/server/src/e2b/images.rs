//! nanoclaw's image routes: `POST /v1/images` (seed 000's
//! `register_image(name, dockerfile, languages)`), `GET /v1/images` and
//! `DELETE /v1/images/{name}`.
//! They parse and check the request, hand the build to
//! [`crate::images::Images`] (a child `nanoclaw image build`) and register
//! the image as a template of the caller's tenant with the backend.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::json;

use super::observe::{note_input, note_quota_refusal};
use super::{authenticate, AppState, E2bState, Peer};
use crate::audit::{Captured, Record};
use crate::auth::{Authenticator, TenantId};
use crate::backend::Backend;
use crate::error::ApiError;
use crate::images::{
    valid_name, ImageError, Images, RegisterRequest, AUDIT_KIND, BUSY_RETRY, LANGUAGES,
    REMOVE_AUDIT_KIND,
};

type ApiResult = Result<Response<Body>, ApiError>;

fn images_of<B, A>(state: &E2bState<B, A>) -> Result<&Images, ApiError> {
    state.images.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server builds no images (it has no data folder)",
        )
    })
}

/// The HTTP answer to a build without an image.
fn image_error(e: ImageError) -> ApiError {
    let status = match &e {
        ImageError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
        ImageError::TooMany(_) | ImageError::DiskQuota(_) => StatusCode::CONFLICT,
        ImageError::Build(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ImageError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ImageError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError {
        status,
        retry_after: matches!(e, ImageError::Busy(_)).then_some(BUSY_RETRY),
        message: e.to_string(),
    }
}

/// Records a build's outcome (beside the request's own record).
async fn audit_build<B, A>(
    state: &E2bState<B, A>,
    tenant: &TenantId,
    name: &str,
    outcome: &Result<String, String>,
    duration_ms: u64,
) {
    let Some(log) = state.audit.clone() else {
        return;
    };
    let mut rec = Record::new(AUDIT_KIND);
    rec.tenant = Some(tenant.0.clone());
    rec.path = Some(name.to_string());
    rec.duration_ms = Some(duration_ms);
    rec.detail = Some(match outcome {
        Ok(what) => what.clone(),
        Err(why) => format!("failed: {why}"),
    });
    if log.append_with_answer(rec).await.is_err() {
        eprintln!("nanoclaw serve: could not write an image build's audit record ({name})");
    }
}

/// `POST /v1/images`: builds the Dockerfile (a child `nanoclaw image
/// build`, no network for its RUN steps) and makes the image a template of
/// the caller's tenant; answers its entry (201).
pub async fn register<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let images = images_of(&state)?;
    let bytes = state.limits.read_control_body(&headers, body).await?;
    note_input(Captured::of(&bytes));
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is required: a JSON RegisterImage (see /openapi.json)",
        ));
    }
    if !matches!(
        serde_json::from_slice(&bytes),
        Ok(serde_json::Value::Object(_))
    ) {
        return Err(ApiError::bad_request(
            "the body must be a JSON object: {\"name\", \"dockerfile\", \"languages\": [...], \"allow_hosts\": [...] (optional)}",
        ));
    }
    let req: RegisterRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid RegisterImage: {e}")))?;
    let req = req.check().map_err(ApiError::bad_request)?;
    if let Some(why) = state.backend.reserved_template(&req.name) {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            retry_after: None,
            message: why,
        });
    }
    let _slot = images.admit(&tenant).map_err(|e| {
        if matches!(e, ImageError::Busy(_)) {
            note_quota_refusal(&e.to_string());
        }
        image_error(e)
    })?;
    let t0 = std::time::Instant::now();
    let built = images.build(&tenant, &req).await;
    let ms = t0.elapsed().as_millis() as u64;
    let (entry, template) = match built {
        Ok(b) => b,
        Err(e) => {
            audit_build(&state, &tenant, &req.name, &Err(e.to_string()), ms).await;
            return Err(image_error(e));
        }
    };
    let what = format!(
        "{} {} for {}",
        entry.reference,
        entry.id,
        entry.languages.join(", ")
    );
    if let Err(e) = state.backend.register_image(&tenant, &req.name, template) {
        audit_build(&state, &tenant, &req.name, &Err(e.to_string()), ms).await;
        return Err(ApiError::control(e));
    }
    images.record(&tenant, entry.clone()).map_err(image_error)?;
    audit_build(&state, &tenant, &req.name, &Ok(what), ms).await;
    Ok((StatusCode::CREATED, Json(entry)).into_response())
}

/// `GET /v1/images`: the templates the caller's tenant can use: `base`
/// (the host's root, any language) and its registered images.
pub async fn list<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let images = images_of(&state)?;
    let mut out = vec![json!({
        "name": "base",
        "reference": null,
        "languages": LANGUAGES,
        "builtin": true,
    })];
    for r in images.list(&tenant) {
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        v["builtin"] = json!(false);
        out.push(v);
    }
    Ok((StatusCode::OK, Json(out)).into_response())
}

/// `DELETE /v1/images/{name}`: unregisters one of the caller's tenant's
/// images and frees what only it held in the image store. Refused (409)
/// while a sandbox or a run uses it; another tenant's image is a 404, as
/// if it did not exist.
pub async fn remove<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    conn: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let tenant = authenticate(&state, &headers, conn.map(|Extension(p)| p)).await?;
    let images = images_of(&state)?;
    if name == "base" || state.backend.reserved_template(&name).is_some() {
        return Err(ApiError::bad_request(format!(
            "template '{name}' is one of the daemon's own, not a registered image: only images registered with POST /v1/images can be removed"
        )));
    }
    if !valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "invalid image name {name:?}: names are 1 to 64 lowercase letters and digits with single '.', '_' or '-' between them"
        )));
    }
    let not_found = || {
        ApiError::not_found(format!(
            "no image '{name}' is registered for tenant {tenant} (GET /v1/images lists them)"
        ))
    };
    if images.get(&tenant, &name).is_none() {
        return Err(not_found());
    }
    state
        .backend
        .unregister_image(&tenant, &name)
        .map_err(ApiError::control)?;
    let Some(entry) = images.forget(&tenant, &name).map_err(image_error)? else {
        // Another DELETE of the same image won the race.
        return Err(not_found());
    };
    let e = entry.clone();
    let freed = tokio::task::spawn_blocking(move || Images::remove_from_store(&e))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (layers, detail) = match &freed {
        Ok(n) => (
            Some(*n),
            format!("{} {}, {n} layer(s) removed", entry.reference, entry.id),
        ),
        Err(e) => (
            None,
            format!("{} {} unregistered; {e}", entry.reference, entry.id),
        ),
    };
    if let Some(log) = state.audit.clone() {
        let mut rec = Record::new(REMOVE_AUDIT_KIND);
        rec.tenant = Some(tenant.0.clone());
        rec.path = Some(name.clone());
        rec.detail = Some(detail);
        if log.append_with_answer(rec).await.is_err() {
            eprintln!("nanoclaw serve: could not write an image removal's audit record ({name})");
        }
    }
    if let Err(e) = &freed {
        eprintln!(
            "nanoclaw serve: image {name} of tenant {tenant} unregistered, store not cleaned: {e}"
        );
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "name": entry.name,
            "reference": entry.reference,
            "id": entry.id,
            "removed": true,
            "layers_removed": layers,
        })),
    )
        .into_response())
}
