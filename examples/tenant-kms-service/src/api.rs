//! The HTTP API: routes, bearer-token auth, step-up, JSON errors (the
//! shape is in [`crate::error`]; every code is listed in the service README).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRef, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use keyfold::audit::Actor;
use keyfold::config::{ConfigError, ProviderConfig};
use keyfold::keyring::{DestroyAuthorization, KeyState, Keyring, NoRecordsLeft};
use keyfold::rewrap::{Checkpoint, RowSource, decrypt_and_upgrade};
use keyfold::time::Timestamp;
use keyfold::{Error as CoreError, WrapErrorKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use crate::config::valid_name;
use crate::db::{SECRET_VERSIONS, SECRETS, SecretRow, SecretTable, secret_context};
pub use crate::error::ApiError;
use crate::error::operator_log;
use crate::stepup::{self, Action, Requester, StepUpConfig, StepUpError};
use crate::tenants::{OnboardError, Shared, Tenant};

/// The header carrying a step-up token.
pub const STEP_UP_HEADER: &str = "x-step-up-token";

/// The application state.
#[derive(Debug, Clone)]
pub struct App {
    /// Shared services.
    pub shared: Arc<Shared>,
    /// Tenants by id.
    pub tenants: Arc<Vec<Arc<Tenant>>>,
    /// Step-up settings.
    pub step_up: StepUpConfig,
}

/// How long a throttled client is told to wait when the KMS did not say.
const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        if let CoreError::Wrap(w) = &e {
            // The provider's text (SDK output, remote bodies) stays in the
            // operator log.
            operator_log(format_args!("KMS error: {e}"));
            let message = format!(
                "the KMS answered {} during {} on {} key {:?}",
                w.kind, w.operation, w.provider, w.key_ref
            );
            return match w.kind {
                WrapErrorKind::AccessDenied => {
                    ApiError::new(StatusCode::FORBIDDEN, "kms_access_denied", message)
                }
                WrapErrorKind::Throttled => {
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "kms_throttled", message)
                        .retry_after(
                            w.retry_after
                                .map_or(DEFAULT_RETRY_AFTER_SECS, |d| d.as_secs().max(1)),
                        )
                }
                _ => ApiError::new(StatusCode::BAD_GATEWAY, "kms_error", message),
            }
            .with("kind", w.kind);
        }
        let (status, code) = match &e {
            CoreError::Sealed { .. } => (StatusCode::SERVICE_UNAVAILABLE, "keyring_sealed"),
            CoreError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            CoreError::KeyDestroyed { .. } => (StatusCode::GONE, "key_version_destroyed"),
            CoreError::KeyState { .. } => (StatusCode::CONFLICT, "key_version_unavailable"),
            CoreError::UnknownVersion { .. } => (StatusCode::NOT_FOUND, "unknown_key_version"),
            CoreError::IllegalTransition {
                from: KeyState::Destroyed,
                ..
            } => (StatusCode::CONFLICT, "key_version_destroyed"),
            CoreError::IllegalTransition { .. } => (StatusCode::CONFLICT, "illegal_transition"),
            CoreError::DestroyRefused { .. } => (StatusCode::CONFLICT, "destroy_refused"),
            CoreError::NoActiveVersion => (StatusCode::CONFLICT, "no_active_version"),
            CoreError::SealedByOperator { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "keyring_sealed_by_operator",
            ),
            CoreError::WriteWindowExpired { .. } => (StatusCode::CONFLICT, "write_window_expired"),
            CoreError::BelowMinDecryptionVersion { .. } => {
                (StatusCode::CONFLICT, "below_min_decryption_version")
            }
            _ => return ApiError::internal(&e),
        };
        let err = ApiError::new(status, code, &e);
        match &e {
            CoreError::Sealed { kind, .. } => err
                .with("kind", kind)
                .with("next", "POST /admin/tenant-kms/unseal once the KMS answers again (with a step-up token for `unseal`)"),
            CoreError::IllegalTransition { .. } => err.with(
                "next",
                "destroy needs a disabled version: disable it first (POST .../versions/{v}/disable)",
            ),
            CoreError::DestroyRefused { allowed_at, .. } => err
                .with(
                    "allowed_at",
                    allowed_at.map(|t| crate::time::rfc3339(t.as_secs())),
                )
                .with(
                    "next",
                    "retry at `allowed_at` (when given); the version stays disabled meanwhile, and enabling it cancels",
                ),
            _ => err,
        }
    }
}

fn step_up_error(e: StepUpError, action: Action, target: &str) -> ApiError {
    let ask = format!(
        "POST /admin/auth/step-up with {{\"code\": <your current TOTP code>, \"action\": \"{action}\", \"target\": \"{target}\"}}, then send the token in X-Step-Up-Token"
    );
    match e {
        StepUpError::RateLimited { retry_after_secs } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "step_up_rate_limited",
            format!("too many failed step-up attempts; retry in {retry_after_secs} s"),
        )
        .retry_after(retry_after_secs),
        StepUpError::WrongCode => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "step_up_code_invalid",
            "the TOTP code is wrong or not current",
        )
        .field("code"),
        StepUpError::CodeReused => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "step_up_code_reused",
            "this TOTP code was used already (each code gives one step-up token): wait for the next one",
        )
        .field("code"),
        StepUpError::NoFactor => ApiError::new(
            StatusCode::FORBIDDEN,
            "no_second_factor",
            "no second factor is enrolled for this tenant's admin: ask the operator",
        ),
        StepUpError::Missing => ApiError::new(
            StatusCode::FORBIDDEN,
            "step_up_required",
            format!("this operation needs a step-up token: {ask}"),
        )
        .with("action", action.as_str())
        .with("target", target),
        StepUpError::Internal(detail) => ApiError::internal(detail),
        other => {
            let why = match &other {
                StepUpError::Expired => "it expired".to_owned(),
                StepUpError::WrongTenant => "it is another tenant's".to_owned(),
                StepUpError::WrongAction { granted } => {
                    format!("it was issued for `{granted}`, not `{action}`")
                }
                StepUpError::WrongTarget { granted } => {
                    format!("it was issued for target {granted:?}, not {target:?}")
                }
                _ => "it is unknown or was used already (a token is used once)".to_owned(),
            };
            ApiError::new(
                StatusCode::FORBIDDEN,
                "step_up_invalid",
                format!("the step-up token was refused: {why}; it cannot be used again. {ask}"),
            )
            .with("reason", other.reason())
            .with("action", action.as_str())
            .with("target", target)
        }
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// An authenticated tenant admin.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Their tenant.
    pub tenant: Arc<Tenant>,
}

impl Admin {
    fn actor(&self) -> Actor {
        Actor::new(self.tenant.config.admin.clone())
    }

    fn id(&self) -> &str {
        &self.tenant.config.id
    }

    fn requester(&self) -> Requester<'_> {
        Requester {
            tenant: &self.tenant.config.id,
            admin: &self.tenant.config.admin,
        }
    }
}

impl<S> FromRequestParts<S> for Admin
where
    App: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = App::from_ref(state);
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("expected Authorization: Bearer <token>"))?;
        // Compare against every tenant's token in constant time.
        let mut found = None;
        for t in app.tenants.iter() {
            if bool::from(t.config.token.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(Arc::clone(t));
            }
        }
        let tenant = found.ok_or_else(|| unauthorized("unknown token"))?;
        // A request may name its tenant (`?tenant=ID`); it must be the token's.
        if let Some(named) = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("tenant="))
                .map(str::to_owned)
        }) && named != tenant.config.id
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this token is for tenant {}; it cannot act on tenant {named}",
                    tenant.config.id
                ),
            ));
        }
        // Another instance may have onboarded the tenant or replaced its
        // config since this one loaded it.
        app.shared.sync_config(&tenant).await;
        Ok(Admin { tenant })
    }
}

/// Builds the router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/admin/auth/step-up", post(step_up))
        .route("/admin/tenant-kms", post(onboard).get(metadata))
        .route("/admin/tenant-kms/rotate", post(rotate))
        .route(
            "/admin/tenant-kms/rotation",
            axum::routing::patch(rotation_policy),
        )
        .route("/admin/tenant-kms/seal", post(seal))
        .route("/admin/tenant-kms/unseal", post(unseal))
        .route("/admin/tenant-kms/versions/{v}/{op}", post(version_op))
        .route("/admin/tenant-kms/rewrap", get(rewrap_status))
        .route("/admin/audit", get(audit))
        .route("/secrets/{name}", get(get_secret).put(put_secret))
        .route("/secrets/{name}/rollback", post(rollback_secret))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (see the service README)",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take this method (see the service README)",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            audit_written,
        ))
        .layer(axum::middleware::from_fn(crate::error::request_context))
        .with_state(app)
}

/// Answers only once the request's audit entries are written: on
/// PostgreSQL they are queued to a writer task, and an answer sent before
/// they reach the table could outlive them in a crash.
async fn audit_written(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    if let Err(e) = app.shared.db.flush_audit().await {
        // The change itself is committed: the answer stays true; the
        // operator hears of the lost entries (and the metric counts them).
        crate::error::operator_log(format_args!("{e}"));
    }
    response
}

fn parse_json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("malformed_json", e))
}

fn onboarded(admin: &Admin, kms: &Option<crate::tenants::Onboarded>) -> ApiResult<Arc<Keyring>> {
    kms.as_ref().map(|o| Arc::clone(&o.keyring)).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_onboarded",
            format!(
                "tenant {} has no KMS config yet: POST /admin/tenant-kms first",
                admin.id()
            ),
        )
    })
}

async fn keyring(admin: &Admin) -> ApiResult<Arc<Keyring>> {
    onboarded(admin, &*admin.tenant.kms.read().await)
}

/// Uses the request's step-up token for `action` on `target`.
async fn require_step_up(
    app: &App,
    admin: &Admin,
    headers: &HeaderMap,
    action: Action,
    target: &str,
) -> ApiResult<()> {
    let presented = headers.get(STEP_UP_HEADER).and_then(|h| h.to_str().ok());
    stepup::consume(
        &app.shared.db,
        &admin.requester(),
        presented,
        action,
        target,
    )
    .await
    .map_err(|e| step_up_error(e, action, target))
}

/// `POST /admin/auth/step-up` `{"code", "action", "target"}`.
async fn step_up(
    State(app): State<App>,
    admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: Value = parse_json(body)?;
    let object = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("malformed_json", "expected a JSON object"))?;
    if let Some(extra) = object
        .keys()
        .find(|k| !["code", "action", "target"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown field `{extra}`: expected code, action, target"),
        )
        .field(extra));
    }
    let code = object.get("code").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request(
            "missing_field",
            "`code` (the current 6-digit TOTP code of your authenticator) is required",
        )
        .field("code")
    })?;
    let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
    let action = object
        .get("action")
        .and_then(Value::as_str)
        .and_then(Action::parse)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_field",
                format!("`action` must be one of {names:?}"),
            )
            .field("action")
        })?;
    let target = match object.get("target") {
        None | Some(Value::Null) if action.targets_tenant() => admin.id().to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(ApiError::bad_request(
                "missing_field",
                format!(
                    "`target` is required for `{action}`: {}",
                    match action {
                        Action::Onboard => "the kms_key_ref being onboarded",
                        _ => "the version number",
                    }
                ),
            )
            .field("target"));
        }
    };
    if action.targets_tenant() && target != admin.id() {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "the target of `{action}` is your tenant id, {:?}",
                admin.id()
            ),
        )
        .field("target"));
    }
    let (token, expires_ms) = stepup::issue(
        &app.shared.db,
        &app.step_up,
        &admin.requester(),
        code,
        action,
        &target,
    )
    .await
    .map_err(|e| step_up_error(e, action, &target))?;
    Ok(Json(json!({
        "step_up_token": token.expose(),
        "action": action.as_str(),
        "target": target,
        "expires_at": crate::time::rfc3339_ms(expires_ms),
        "expires_in_secs": app.step_up.token_ttl.as_secs(),
    })))
}

const PROVIDERS: [&str; 4] = ["local", "aws", "gcp", "azure"];

/// The AWS external id this service assigns a tenant: its role's trust
/// policy must demand exactly this (`sts:ExternalId`). Assigned, not chosen,
/// so one tenant cannot have the service assume another tenant's role (the
/// confused deputy that external ids exist to stop).
pub fn aws_external_id(tenant_id: &str) -> String {
    format!("tenant-{tenant_id}")
}

/// Whether a config field is operator configuration a tenant may never set:
/// where the service sends its requests and credentials (endpoints), and
/// where it reads secrets or keys from (environment variables, files).
pub fn operator_only(field: &str) -> bool {
    let f = field.to_ascii_lowercase();
    f.contains("endpoint")
        || f.ends_with("_env_var")
        || f.ends_with("_env")
        || f.ends_with("_file")
        || f.ends_with("_path")
        || f == "url"
}

/// Turns an onboarding body `{provider, kms_key_ref, config: {...}}` into a
/// provider config, naming the problem (and the field) on failure.
fn tenant_config(app: &App, tenant_id: &str, body: Value) -> ApiResult<ProviderConfig> {
    let Value::Object(mut object) = body else {
        return Err(ApiError::bad_request(
            "malformed_json",
            "expected a JSON object {\"provider\", \"kms_key_ref\", \"config\": {...}}",
        ));
    };
    if let Some(extra) = object
        .keys()
        .find(|k| !["provider", "kms_key_ref", "config"].contains(&k.as_str()))
    {
        let err = if operator_only(extra) {
            operator_only_error(extra)
        } else {
            ApiError::bad_request(
                "unknown_field",
                format!(
                    "unknown field `{extra}`: the body is {{\"provider\", \"kms_key_ref\", \"config\": {{...}}}}, provider settings go in `config`"
                ),
            )
            .field(extra)
        };
        return Err(err);
    }
    let provider = match object.get("provider") {
        Some(Value::String(p)) => p.clone(),
        _ => {
            return Err(
                ApiError::bad_request("missing_field", "missing string field `provider`")
                    .field("provider"),
            );
        }
    };
    if !PROVIDERS.contains(&provider.as_str()) {
        return Err(ApiError::bad_request(
            "unknown_provider",
            format!("unknown provider {provider:?}: expected one of {PROVIDERS:?}"),
        )
        .field("provider"));
    }
    let key_ref = match object.get("kms_key_ref") {
        Some(Value::String(k)) => k.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "missing_field",
                "missing string field `kms_key_ref`",
            )
            .field("kms_key_ref"));
        }
    };
    let mut settings = match object.remove("config") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(
                ApiError::bad_request("invalid_field", "`config` must be an object")
                    .field("config"),
            );
        }
    };
    for key in settings.keys() {
        if operator_only(key) {
            return Err(operator_only_error(&format!("config.{key}")));
        }
        if key == "provider" || key == "kms_key_ref" {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("`{key}` belongs at the top level of the body, not in `config`"),
            )
            .field(&format!("config.{key}")));
        }
    }
    if provider == "local" {
        if let Some(extra) = settings.keys().next() {
            return Err(ApiError::bad_request(
                "invalid_config",
                format!(
                    "field `config.{extra}` not allowed: a local config names one of the service's KEKs by `kms_key_ref` only"
                ),
            )
            .field(&format!("config.{extra}")));
        }
        return app
            .shared
            .providers
            .local_config(&key_ref)
            .map(ProviderConfig::Local)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_key_ref",
                    format!("invalid local key reference {key_ref:?}: no such KEK on this service"),
                )
                .field("kms_key_ref")
            });
    }
    if provider == "aws" {
        let assigned = aws_external_id(tenant_id);
        match settings.get("external_id") {
            None => {
                settings.insert("external_id".into(), Value::String(assigned));
            }
            Some(given) if given.as_str() == Some(assigned.as_str()) => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "external_id_mismatch",
                    format!(
                        "this service assigns your AWS external id: {assigned:?} (require it in the role's trust policy, or omit the field)"
                    ),
                )
                .field("config.external_id"));
            }
        }
    }
    settings.insert("provider".into(), Value::String(provider.clone()));
    settings.insert("kms_key_ref".into(), Value::String(key_ref));
    let config = ProviderConfig::try_from(Value::Object(settings)).map_err(|e| {
        let code = match &e {
            ConfigError::StaticCredentials { .. } => "static_credentials",
            ConfigError::InvalidKeyRef { .. } => "invalid_key_ref",
            ConfigError::InvalidField { .. } => "invalid_field",
            _ => "invalid_config",
        };
        let err = ApiError::bad_request(code, &e);
        match &e {
            ConfigError::StaticCredentials { field, .. } => err.field(&format!("config.{field}")),
            ConfigError::InvalidField { field, .. } => err.field(&format!("config.{field}")),
            ConfigError::InvalidKeyRef { .. } => err.field("kms_key_ref"),
            _ => err,
        }
    })?;
    if !app.shared.providers.supports(&provider) {
        return Err(ApiError::bad_request(
            "unsupported_provider",
            format!("this service was built without {provider} support"),
        )
        .field("provider"));
    }
    Ok(config)
}

fn operator_only_error(field: &str) -> ApiError {
    ApiError::bad_request(
        "operator_only_field",
        format!(
            "`{field}` is operator configuration, not tenant input: endpoints and secret sources are set by the service's operator (provider_endpoints in the service config), never by a tenant"
        ),
    )
    .field(field)
}

async fn onboard(
    State(app): State<App>,
    admin: Admin,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value: Value = parse_json(body)?;
    let config = tenant_config(&app, &admin.tenant.config.id, value)?;
    let (provider, key_ref) = (config.provider(), config.kms_key_ref().to_owned());
    require_step_up(&app, &admin, &headers, Action::Onboard, &key_ref).await?;
    let first = admin.tenant.kms.read().await.is_none();
    let done = app
        .shared
        .onboard(&admin.tenant, config, &admin.actor())
        .await
        .map_err(|e| match e {
            OnboardError::Probe(f) => {
                let (status, code) = match f.kind {
                    Some(WrapErrorKind::AccessDenied) => {
                        (StatusCode::FORBIDDEN, "kms_access_denied")
                    }
                    Some(WrapErrorKind::Throttled) => {
                        (StatusCode::TOO_MANY_REQUESTS, "kms_throttled")
                    }
                    _ => (StatusCode::UNPROCESSABLE_ENTITY, "kms_probe_failed"),
                };
                let err = ApiError::new(status, code, &f.message)
                    .with("step", f.step)
                    .with("kind", f.kind)
                    .with("provider", &f.provider)
                    .with("kms_key_ref", &f.key_ref)
                    .with("previous_config_in_force", !first);
                if status == StatusCode::TOO_MANY_REQUESTS {
                    err.retry_after(DEFAULT_RETRY_AFTER_SECS)
                } else {
                    err
                }
            }
            OnboardError::Keyring(e) => e.into(),
            OnboardError::Db(e) => ApiError::internal(e),
        })?;
    let note = if first {
        format!(
            "first configuration: the keyring was created under {provider} key {key_ref:?} with version {}",
            done.version
        )
    } else {
        format!(
            "every master key version is now wrapped under {provider} key {key_ref:?}; new records use version {}, and the rewrap job (GET /admin/tenant-kms/rewrap) moves the existing ones",
            done.version
        )
    };
    Ok(Json(json!({
        "ok": true,
        "provider": provider,
        "kms_key_ref": key_ref,
        "new_key_version": done.version,
        "new_key_id": done.version_id,
        "rewrap_status": "enqueued",
        "rewrap_lease_id": done.lease_id,
        "note": note,
    })))
}

async fn rotate(State(app): State<App>, admin: Admin, headers: HeaderMap) -> ApiResult {
    // Held across the rotation: onboarding cannot replace the config meanwhile.
    let kms = admin.tenant.kms.read().await;
    let keyring = onboarded(&admin, &kms)?;
    require_step_up(&app, &admin, &headers, Action::Rotate, admin.id()).await?;
    // Hold the job slot across the rotation: the background task then cannot
    // start a job of its own for the new version before this one.
    let mut job = admin.tenant.job.lock().await;
    // A conflict means another instance changed the keyring since this
    // one's view: the keyring reloaded it, so the step-up already spent is
    // not wasted on a retryable race.
    let rotation = match keyring.rotate(&admin.actor()).await {
        Err(CoreError::Conflict { .. }) => keyring.rotate(&admin.actor()).await?,
        other => other?,
    };
    app.shared
        .new_job(admin.id(), &mut job, &keyring, rotation.lease_id.clone())
        .await;
    drop(job);
    drop(kms);
    Ok(Json(json!({
        "version": rotation.version,
        "key_id": rotation.version_id,
        "previous_version": rotation.previous_version,
        "rewrap_lease_id": rotation.lease_id,
        "rewrap_status": "enqueued",
    })))
}

async fn metadata(admin: Admin) -> ApiResult {
    let kms = admin.tenant.kms.read().await;
    let keyring = onboarded(&admin, &kms)?;
    let (provider, key_ref) = kms
        .as_ref()
        .map(|o| (o.config.provider(), o.config.kms_key_ref().to_owned()))
        .unwrap_or_default();
    let m = keyring.metadata();
    let mut body = json!({
        "tenant": admin.id(),
        "provider": provider,
        "kms_key_ref": key_ref,
        "latest_version": m.latest_version,
        "active_version": m.active_version,
        "min_decryption_version": m.min_decryption_version,
        "version_count": m.version_count,
        "sealed": m.sealed.is_some() || keyring.operator_seal().is_some(),
        "sealed_info": m.sealed,
        "operator_seal": keyring.operator_seal().map(|(since, reason)| json!({
            "since": crate::time::rfc3339(since.as_secs()),
            "reason": reason,
        })),
        "rotation_policy": keyring.rotation_policy().map(|p| json!({
            "enabled": p.enabled(),
            "period_days": p.period_days(),
        })),
        "keys": m.versions,
    });
    crate::time::rfc3339_fields(&mut body);
    if let Some(since) = body["sealed_info"].get_mut("since")
        && let Some(secs) = since.as_u64()
    {
        *since = Value::String(crate::time::rfc3339(secs));
    }
    Ok(Json(body))
}

async fn version_op(
    State(app): State<App>,
    admin: Admin,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path((v, op)) = path.map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
    let action = match op.as_str() {
        "disable" => Action::Disable,
        "enable" => Action::Enable,
        "destroy" | "schedule-destroy" => Action::Destroy,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "unknown operation {other:?}: disable, enable, destroy or schedule-destroy"
                ),
            ));
        }
    };
    // `schedule-destroy` takes `{"at": RFC 3339}` (optional: the earliest
    // time allowed); the other operations no body.
    let schedule_at = if op == "schedule-destroy" {
        let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
        let at = if bytes.is_empty() {
            None
        } else {
            let value: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad_request("malformed_json", e))?;
            match value.get("at") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(crate::time::parse_rfc3339(t).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_field",
                        format!("{t:?} is not an RFC 3339 UTC time like 2026-12-03T07:00:00Z"),
                    )
                    .field("at")
                })?),
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        "`at` is an RFC 3339 UTC time like 2026-12-03T07:00:00Z",
                    )
                    .field("at"));
                }
            }
        };
        Some(at)
    } else {
        None
    };
    let version: u32 = v.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_version",
            format!("{v:?} is not a key version number"),
        )
    })?;
    let kms = admin.tenant.kms.read().await;
    let keyring = onboarded(&admin, &kms)?;
    require_step_up(&app, &admin, &headers, action, &version.to_string()).await?;
    let actor = admin.actor();
    if let Some(at) = schedule_at {
        if keyring.version_state(version).is_none() {
            return Err(CoreError::UnknownVersion { version }.into());
        }
        let at = match at {
            Some(secs) => Timestamp(secs),
            None => keyring
                .destroy_allowed_at(version)
                .unwrap_or_else(Timestamp::now),
        };
        match keyring.schedule_destroy(version, at, &actor).await {
            Err(CoreError::Conflict { .. }) => {
                keyring.schedule_destroy(version, at, &actor).await?
            }
            other => other?,
        }
        return Ok(Json(json!({
            "version": version,
            "state": keyring.version_state(version),
            "destroy_scheduled_at": crate::time::rfc3339(at.as_secs()),
            "note": "the maintenance task destroys the version once it is due and a scan finds no record left on it; enabling the version cancels",
        })));
    }
    match action {
        Action::Disable => match keyring.disable(version, &actor).await {
            Err(CoreError::Conflict { .. }) => keyring.disable(version, &actor).await?,
            other => other?,
        },
        Action::Enable => match keyring.enable(version, &actor).await {
            Err(CoreError::Conflict { .. }) => keyring.enable(version, &actor).await?,
            other => other?,
        },
        _ => {
            if keyring.version_state(version).is_none() {
                return Err(CoreError::UnknownVersion { version }.into());
            }
            let checked_at = Timestamp::now();
            let remaining = app
                .shared
                .db
                .all_ciphertexts(admin.id())
                .await?
                .iter()
                .filter(|ct| keyfold::format::inspect(ct).is_ok_and(|i| i.key_version == version))
                .count();
            if remaining > 0 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "records_remain",
                    format!(
                        "{remaining} stored records are still on version {version}: let the rewrap job finish first"
                    ),
                )
                .with("version", version)
                .with("records", remaining)
                .with(
                    "next",
                    "enable the version if it is disabled (the rewrap job cannot read records on a disabled version), wait until GET /admin/tenant-kms/rewrap shows status completed, disable it again and retry the destroy",
                ));
            }
            let evidence = NoRecordsLeft {
                keyring_id: admin.id().to_owned(),
                version,
                source: format!("scan of {SECRETS} and {SECRET_VERSIONS}"),
                checked_at,
            };
            keyring
                .destroy(version, DestroyAuthorization::Evidence(evidence), &actor)
                .await?;
        }
    }
    Ok(Json(json!({
        "version": version,
        "state": keyring.version_state(version),
    })))
}

/// `PATCH /admin/tenant-kms/rotation` `{"period_days": 1..=3650, "enabled": true}`.
async fn rotation_policy(
    State(app): State<App>,
    admin: Admin,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value: Value = parse_json(body)?;
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("malformed_json", "expected a JSON object"))?;
    if let Some(extra) = object
        .keys()
        .find(|k| !["period_days", "enabled"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown field `{extra}`: expected period_days, enabled"),
        )
        .field(extra));
    }
    let enabled = match object.get("enabled") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(
                ApiError::bad_request("invalid_field", "`enabled` is true or false")
                    .field("enabled"),
            );
        }
    };
    let bad_period = || {
        ApiError::bad_request(
            "invalid_field",
            "`period_days` is a whole number of days, 1..=3650",
        )
        .field("period_days")
    };
    let days = object
        .get("period_days")
        .and_then(Value::as_u64)
        .and_then(|d| u32::try_from(d).ok())
        .ok_or_else(bad_period)?;
    let policy = keyfold::RotationPolicy::new(enabled, days).map_err(|_| bad_period())?;
    let kms = admin.tenant.kms.read().await;
    let keyring = onboarded(&admin, &kms)?;
    require_step_up(&app, &admin, &headers, Action::RotationPolicy, admin.id()).await?;
    match keyring
        .set_rotation_policy(Some(policy), &admin.actor())
        .await
    {
        Err(CoreError::Conflict { .. }) => {
            keyring
                .set_rotation_policy(Some(policy), &admin.actor())
                .await?;
        }
        other => other?,
    }
    Ok(Json(json!({
        "rotation_policy": { "enabled": enabled, "period_days": days },
        "note": "every instance's maintenance task evaluates the policy hourly and rotates when it is due (kms.rotate.scheduled)",
    })))
}

/// `POST /admin/tenant-kms/seal` `{"reason": "..."}`: stops every use of the
/// tenant's keys, on every instance, until an unseal (the post-breach
/// cycle). No step-up: it only ever protects.
async fn seal(admin: Admin, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let value: Value = parse_json(body)?;
    let reason = value
        .get("reason")
        .and_then(Value::as_str)
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "missing_field",
                "`reason` (why the keyring is sealed) is required",
            )
            .field("reason")
        })?;
    let keyring = keyring(&admin).await?;
    // Stored with the keyring: every instance refuses within the store's
    // notification (max staleness without one).
    keyring.seal(reason, &admin.actor()).await?;
    Ok(Json(json!({
        "sealed": true,
        "reason": reason,
        "note": "nothing is encrypted or decrypted until POST /admin/tenant-kms/unseal (step-up `unseal`)",
    })))
}

/// `POST /admin/tenant-kms/unseal` (step-up `unseal`): lifts an operator's
/// seal and retries the KMS if it had sealed the keyring too.
async fn unseal(State(app): State<App>, admin: Admin, headers: HeaderMap) -> ApiResult {
    let kms = admin.tenant.kms.read().await;
    let keyring = onboarded(&admin, &kms)?;
    require_step_up(&app, &admin, &headers, Action::Unseal, admin.id()).await?;
    keyring.unseal_as(&admin.actor()).await?;
    Ok(Json(json!({ "sealed": false })))
}

async fn rewrap_status(State(app): State<App>, admin: Admin) -> ApiResult {
    let Some(row) = app.shared.db.job(admin.id()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_rewrap_job",
            "no rewrap job has run for this tenant",
        ));
    };
    #[cfg(feature = "postgres")]
    if let Some(reference) = crate::distributed::JobRef::of(&row) {
        return distributed_status(&app, row, reference).await;
    }
    let cp: Checkpoint = serde_json::from_str(&row.checkpoint).map_err(ApiError::internal)?;
    let Some(db) = app.shared.db.sqlite() else {
        return Err(ApiError::internal("a SQLite job row in another database"));
    };
    let mut remaining = 0;
    for s in cp.sources.iter().filter(|s| !s.exhausted) {
        let table = if s.name == SECRETS {
            SECRETS
        } else {
            SECRET_VERSIONS
        };
        remaining += SecretTable::new(db.clone(), admin.id(), table)
            .count_after(s.cursor.as_deref())
            .await
            .unwrap_or(0);
    }
    let failures: Vec<Value> = app
        .shared
        .db
        .row_failures(admin.id())
        .await?
        .into_iter()
        .filter(|f| f.job_id == row.job_id)
        .map(|f| {
            json!({
                "source": f.source,
                "row_id": f.row_id,
                "reason": f.error,
                "attempts": f.attempts,
                "next_retry_at": crate::time::rfc3339_ms(f.next_retry_at_ms),
            })
        })
        .collect();
    let reasons: Vec<String> = match row.status.as_str() {
        "failed" => row.error.iter().cloned().collect(),
        _ => failures
            .iter()
            .map(|f| {
                format!(
                    "{} row {}: {}",
                    f["source"].as_str().unwrap_or_default(),
                    f["row_id"].as_str().unwrap_or_default(),
                    f["reason"].as_str().unwrap_or_default()
                )
            })
            .collect(),
    };
    let next = match row.status.as_str() {
        "incomplete" => Some(
            "the rows listed are retried with backoff; fix what the reasons name (or rewrite the secret), or disable and destroy only once they are gone",
        ),
        "failed" => Some("the job stopped; a rotation starts a new one"),
        _ => None,
    };
    let mut body = json!({
        "job_id": row.job_id,
        "status": row.status,
        "error": row.error,
        "reasons": reasons,
        "failures": failures,
        "next": next,
        "target_version": cp.target_version,
        "started_at": cp.started_at,
        "lease_expires_at": cp.lease_expires_at,
        "batches": cp.batches,
        "completed": cp.completed,
        "totals": cp.totals(),
        "sources": cp.sources,
        "estimated_remaining": remaining,
    });
    crate::time::rfc3339_fields(&mut body);
    Ok(Json(body))
}

/// The rewrap status of a distributed job (PostgreSQL): read from the
/// job's tables, shared by every instance.
#[cfg(feature = "postgres")]
async fn distributed_status(
    app: &App,
    row: crate::db::JobRow,
    reference: crate::distributed::JobRef,
) -> ApiResult {
    let Some(pg) = app.shared.db.postgres() else {
        return Err(ApiError::internal(
            "a distributed job row without PostgreSQL",
        ));
    };
    let status = pg
        .coordinator()
        .status(&row.job_id)
        .await
        .map_err(ApiError::internal)?;
    // Finished in its tables but not yet recorded by the worker that ran
    // the last shard (which names the failed rows first): still running.
    let word = match crate::distributed::status_word(&status) {
        "completed" | "incomplete" if row.status == "running" => "running",
        word => word,
    };
    let failures: Vec<Value> = app
        .shared
        .db
        .row_failures(&status.keyring_id)
        .await?
        .into_iter()
        .filter(|f| f.job_id == row.job_id)
        .map(|f| json!({ "source": f.source, "row_id": f.row_id, "reason": f.error }))
        .collect();
    let mut reasons: Vec<String> = status.failed.iter().cloned().collect();
    reasons.extend(failures.iter().map(|f| {
        format!(
            "{} row {}: {}",
            f["source"].as_str().unwrap_or_default(),
            f["row_id"].as_str().unwrap_or_default(),
            f["reason"].as_str().unwrap_or_default()
        )
    }));
    if status.totals.failed > 0 {
        reasons.push(format!(
            "{} rows could not be moved (failed to decrypt or re-wrap)",
            status.totals.failed
        ));
    }
    if status.totals.unresolved > 0 {
        reasons.push(format!(
            "{} rows kept changing under the job (conflicts it gave up on)",
            status.totals.unresolved
        ));
    }
    let next = match word {
        "incomplete" => Some(
            "a new pass over the rows starts after the retry backoff (rows moved already are skipped); rewrite or fix the secrets that keep failing, and destroy only once none is left",
        ),
        "failed" => Some("the job stopped; a rotation starts a new one"),
        _ => None,
    };
    let mut body = json!({
        "job_id": row.job_id,
        "status": word,
        "error": status.failed,
        "reasons": reasons,
        "failures": failures,
        "next": next,
        "target_version": reference.target_version,
        "completed": status.completed,
        "distributed": {
            "shards": status.shards,
            "shards_done": status.shards_done,
            "shards_leased": status.shards_leased,
            "rows_read": status.rows_read,
            "rows_per_second": status.rows_per_second,
        },
        "totals": status.totals,
        "estimated_remaining": status.rows_total.saturating_sub(status.totals.seen),
    });
    crate::time::rfc3339_fields(&mut body);
    Ok(Json(body))
}

async fn audit(State(app): State<App>, admin: Admin) -> ApiResult {
    let events = app.shared.db.audit(admin.id()).await?;
    let mut body = json!({ "events": events });
    crate::time::rfc3339_fields(&mut body);
    Ok(Json(body))
}

fn check_name(name: &str) -> ApiResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_name",
            "a secret name is 1..=128 of [A-Za-z0-9._-]",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSecret {
    value: String,
}

/// `row` moved to the active version (header only) when it is on an older
/// one; as it is when it cannot be (its version is disabled: the destroy
/// check will still find it).
async fn upgraded(keyring: &Keyring, tenant: &str, row: SecretRow) -> SecretRow {
    // `active_key` reloads a stale view first: never upgrade onto a version
    // another instance has retired.
    let Ok(active) = keyring.active_key().await else {
        return row;
    };
    let ctx = secret_context(tenant, &row.name, row.version);
    match keyring
        .rewrap(&ctx, &row.ciphertext, active.version())
        .await
    {
        Ok(Some(ciphertext)) => SecretRow { ciphertext, ..row },
        _ => row,
    }
}

fn key_version(ct: &[u8]) -> Option<u32> {
    keyfold::format::inspect(ct).ok().map(|i| i.key_version)
}

async fn put_secret(
    State(app): State<App>,
    admin: Admin,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_name(&name)?;
    let req: PutSecret = parse_json(body)?;
    let keyring = keyring(&admin).await?;
    let db = &app.shared.db;
    let tenant = admin.id();
    for _ in 0..5 {
        let current = db.current_secret(tenant, &name).await?;
        let version = db.next_secret_version(tenant, &name).await?;
        let pending = keyring
            .encrypt_for_write(
                &secret_context(tenant, &name, version),
                req.value.as_bytes(),
            )
            .await?;
        // The previous value moves to the history table on the active
        // version, so no record lands behind a running job's cursor on an old one.
        let history = match &current {
            Some(c) => Some(upgraded(&keyring, tenant, c.clone()).await),
            None => None,
        };
        // The write-window check, just before the write (docs/LIFECYCLE.md,
        // "Write window"): a record sealed too long ago under a version
        // retired meanwhile is encrypted again, never stored.
        let ciphertext = match keyring.ready_to_write(pending).await {
            Ok(ct) => ct,
            Err(CoreError::WriteWindowExpired { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let new = SecretRow {
            name: name.clone(),
            version,
            ciphertext,
        };
        if db
            .replace_secret(
                tenant,
                current.as_ref(),
                &new,
                history.as_ref(),
                Timestamp::now().as_secs(),
            )
            .await?
        {
            return Ok((
                StatusCode::CREATED,
                Json(json!({
                    "name": name,
                    "version": version,
                    "key_version": key_version(&new.ciphertext),
                })),
            ));
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the secret kept changing; retry",
    ))
}

async fn get_secret(State(app): State<App>, admin: Admin, Path(name): Path<String>) -> ApiResult {
    check_name(&name)?;
    let keyring = keyring(&admin).await?;
    let db = &app.shared.db;
    let tenant = admin.id();
    let row = db.current_secret(tenant, &name).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            format!("no secret {name:?}"),
        )
    })?;
    let ctx = secret_context(tenant, &name, row.version);
    let read = decrypt_and_upgrade(&keyring, &ctx, &row.ciphertext).await?;
    if let Some(e) = &read.upgrade_error {
        operator_log(format_args!(
            "tenant {tenant}: lazy rewrap of secret {name} skipped: {e}"
        ));
    }
    let mut on = key_version(&row.ciphertext);
    if let Some(new) = &read.upgraded {
        // Lazy rewrap: write back only if nobody changed the row meanwhile.
        if db.cas_secret(tenant, &name, &row.ciphertext, new).await? {
            on = key_version(new);
        }
    }
    Ok(Json(json!({
        "name": name,
        "version": row.version,
        "value": String::from_utf8_lossy(&read.plaintext),
        "key_version": on,
    })))
}

async fn rollback_secret(
    State(app): State<App>,
    admin: Admin,
    Path(name): Path<String>,
) -> ApiResult {
    check_name(&name)?;
    let keyring = keyring(&admin).await?;
    let db = &app.shared.db;
    let tenant = admin.id();
    let current = db.current_secret(tenant, &name).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            format!("no secret {name:?}"),
        )
    })?;
    let previous = db
        .previous_secret(tenant, &name, current.version)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_previous_version",
                format!("secret {name:?} has no earlier version"),
            )
        })?;
    let restored = upgraded(&keyring, tenant, previous).await;
    let history = upgraded(&keyring, tenant, current.clone()).await;
    if !db
        .replace_secret(
            tenant,
            Some(&current),
            &restored,
            Some(&history),
            Timestamp::now().as_secs(),
        )
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the secret changed meanwhile; retry",
        ));
    }
    Ok(Json(json!({
        "name": name,
        "version": restored.version,
        "rolled_back_from": current.version,
    })))
}
