//! The HTTP API: routes, bearer-token auth, step-up tokens, JSON errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRef, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keyfold::Error as CoreError;
use keyfold::audit::Actor;
use keyfold::config::{ConfigError, ProviderConfig};
use keyfold::keyring::{DestroyAuthorization, KeyState, Keyring, NoRecordsLeft};
use keyfold::rewrap::{Checkpoint, RowSource, decrypt_and_upgrade};
use keyfold::time::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::valid_name;
use crate::db::{SECRET_VERSIONS, SECRETS, SecretRow, SecretTable, secret_context};
use crate::tenants::{CLIENT_IP, OnboardError, Shared, Tenant};

/// The header carrying a step-up token.
pub const STEP_UP_HEADER: &str = "x-step-up-token";

/// The application state.
#[derive(Debug, Clone)]
pub struct App {
    /// Shared services.
    pub shared: Arc<Shared>,
    /// Tenants by id.
    pub tenants: Arc<Vec<Arc<Tenant>>>,
    /// Step-up tokens: token → (tenant id, expiry).
    pub step_ups: Arc<Mutex<HashMap<String, (String, Instant)>>>,
    /// Step-up token lifetime.
    pub step_up_ttl: Duration,
}

/// A JSON error: `{"error": code, "message": ..., ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            status,
            body: json!({ "error": code, "message": message.to_string() }),
        }
    }

    fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        if let Some(map) = self.body.as_object_mut() {
            map.insert(key.to_owned(), json!(value));
        }
        self
    }

    fn bad_request(code: &str, message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::internal(format!("database: {e}"))
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let (status, code) = match &e {
            CoreError::Sealed { .. } => (StatusCode::SERVICE_UNAVAILABLE, "keyring_sealed"),
            CoreError::Wrap(_) => (StatusCode::BAD_GATEWAY, "kms_error"),
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
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let err = ApiError::new(status, code, &e);
        match &e {
            CoreError::Wrap(w) => err.with("kind", w.kind),
            _ => err,
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
        Ok(Admin { tenant })
    }
}

/// Builds the router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/admin/auth/step-up", post(step_up))
        .route("/admin/tenant-kms", post(onboard).get(metadata))
        .route("/admin/tenant-kms/rotate", post(rotate))
        .route("/admin/tenant-kms/versions/{v}/{op}", post(version_op))
        .route("/admin/tenant-kms/rewrap", get(rewrap_status))
        .route("/admin/audit", get(audit))
        .route("/secrets/{name}", get(get_secret).put(put_secret))
        .route("/secrets/{name}/rollback", post(rollback_secret))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::middleware::from_fn(client_ip))
        .with_state(app)
}

/// Makes the client's address available to the audit sink for the request.
async fn client_ip(
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    CLIENT_IP.scope(addr.ip().to_string(), next.run(req)).await
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

fn require_step_up(app: &App, admin: &Admin, headers: &HeaderMap) -> ApiResult<()> {
    let refused = |m: &str| ApiError::new(StatusCode::FORBIDDEN, "step_up_required", m);
    let token = headers
        .get(STEP_UP_HEADER)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            refused("this operation needs a step-up token: POST /admin/auth/step-up, then send it in X-Step-Up-Token")
        })?;
    let mut tokens = app.step_ups.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    tokens.retain(|_, (_, exp)| *exp > now);
    match tokens.get(token) {
        Some((tenant, _)) if tenant == admin.id() => Ok(()),
        _ => Err(refused(
            "the step-up token is unknown, expired or for another tenant",
        )),
    }
}

async fn step_up(State(app): State<App>, admin: Admin) -> ApiResult {
    let token = crate::config::random_hex(24).map_err(ApiError::internal)?;
    let expires = Timestamp::now().saturating_add(app.step_up_ttl);
    app.step_ups
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            token.clone(),
            (admin.id().to_owned(), Instant::now() + app.step_up_ttl),
        );
    Ok(Json(json!({
        "step_up_token": token,
        "expires_at": expires,
        "expires_in_secs": app.step_up_ttl.as_secs(),
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

/// Turns the request body into a provider config, naming the problem on failure.
fn provider_config(app: &App, tenant_id: &str, mut body: Value) -> ApiResult<ProviderConfig> {
    let object = body
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("malformed_json", "expected a JSON object"))?;
    if object.get("provider").and_then(Value::as_str) == Some("aws") {
        let assigned = aws_external_id(tenant_id);
        match object.get("external_id") {
            None => {
                object.insert("external_id".into(), Value::String(assigned));
            }
            Some(given) if given.as_str() == Some(assigned.as_str()) => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "external_id_mismatch",
                    format!(
                        "this service assigns your AWS external id: {assigned:?} (require it in the role's trust policy, or omit the field)"
                    ),
                )
                .with("field", "external_id"));
            }
        }
    }
    let object = &*object;
    let provider = object
        .get("provider")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("invalid_config", "missing string field `provider`"))?
        .to_owned();
    let provider = provider.as_str();
    if !PROVIDERS.contains(&provider) {
        return Err(ApiError::bad_request(
            "unknown_provider",
            format!("unknown provider {provider:?}: expected one of {PROVIDERS:?}"),
        ));
    }
    if provider == "local" {
        if let Some(extra) = object
            .keys()
            .find(|k| !["provider", "kms_key_ref"].contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(
                "invalid_config",
                format!(
                    "field `{extra}` not allowed: a local config names one of the service's KEKs by `kms_key_ref` only"
                ),
            ));
        }
        let key_ref = object
            .get("kms_key_ref")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return app
            .shared
            .providers
            .local_config(key_ref)
            .map(ProviderConfig::Local)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_key_ref",
                    format!("invalid local key reference {key_ref:?}: no such KEK on this service"),
                )
            });
    }
    let config = ProviderConfig::try_from(body).map_err(|e| {
        let code = match &e {
            ConfigError::StaticCredentials { .. } => "static_credentials",
            ConfigError::InvalidKeyRef { .. } => "invalid_key_ref",
            ConfigError::InvalidField { .. } => "invalid_field",
            _ => "invalid_config",
        };
        let err = ApiError::bad_request(code, &e);
        match &e {
            ConfigError::StaticCredentials { field, .. } => err.with("field", field),
            ConfigError::InvalidField { field, .. } => err.with("field", field),
            _ => err,
        }
    })?;
    if !app.shared.providers.supports(provider) {
        return Err(ApiError::bad_request(
            "unsupported_provider",
            format!("this service was built without {provider} support"),
        ));
    }
    Ok(config)
}

async fn onboard(
    State(app): State<App>,
    admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value: Value = parse_json(body)?;
    let config = provider_config(&app, &admin.tenant.config.id, value)?;
    let (provider, key_ref) = (config.provider(), config.kms_key_ref().to_owned());
    let done = app
        .shared
        .onboard(&admin.tenant, config, &admin.actor())
        .await
        .map_err(|e| match e {
            OnboardError::Probe(f) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "kms_probe_failed",
                &f.message,
            )
            .with("step", f.step)
            .with("kind", f.kind)
            .with("provider", &f.provider)
            .with("kms_key_ref", &f.key_ref),
            OnboardError::Keyring(e) => e.into(),
            OnboardError::Db(e) => ApiError::internal(e),
        })?;
    Ok(Json(json!({
        "provider": provider,
        "kms_key_ref": key_ref,
        "new_key_version": done.version,
        "new_key_id": done.version_id,
        "rewrap_status": "enqueued",
        "rewrap_lease_id": done.lease_id,
    })))
}

async fn rotate(State(app): State<App>, admin: Admin, headers: HeaderMap) -> ApiResult {
    require_step_up(&app, &admin, &headers)?;
    let keyring = keyring(&admin).await?;
    // Hold the job slot across the rotation: the background task then cannot
    // start a job of its own for the new version before this one.
    let mut job = admin.tenant.job.lock().await;
    let rotation = keyring.rotate(&admin.actor()).await?;
    app.shared
        .new_job(admin.id(), &mut job, &keyring, rotation.lease_id.clone());
    drop(job);
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
    Ok(Json(json!({
        "tenant": admin.id(),
        "provider": provider,
        "kms_key_ref": key_ref,
        "latest_version": m.latest_version,
        "active_version": m.active_version,
        "min_decryption_version": m.min_decryption_version,
        "version_count": m.version_count,
        "sealed": m.sealed.is_some(),
        "sealed_info": m.sealed,
        "keys": m.versions,
    })))
}

async fn version_op(
    State(app): State<App>,
    admin: Admin,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let Path((v, op)) = path.map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
    let version: u32 = v.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_version",
            format!("{v:?} is not a key version number"),
        )
    })?;
    let keyring = keyring(&admin).await?;
    let actor = admin.actor();
    match op.as_str() {
        "disable" => keyring.disable(version, &actor).await?,
        "enable" => keyring.enable(version, &actor).await?,
        "destroy" => {
            require_step_up(&app, &admin, &headers)?;
            match keyring.version_state(version) {
                None => return Err(CoreError::UnknownVersion { version }.into()),
                Some(KeyState::Disabled) => {}
                Some(_) => {} // the keyring refuses with the state in its error
            }
            let checked_at = Timestamp::now();
            let remaining = app
                .shared
                .db
                .all_ciphertexts(admin.id())?
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
                .with("records", remaining));
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
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown operation {other:?}: disable, enable or destroy"),
            ));
        }
    }
    Ok(Json(json!({
        "version": version,
        "state": keyring.version_state(version),
    })))
}

async fn rewrap_status(State(app): State<App>, admin: Admin) -> ApiResult {
    let Some(row) = app.shared.db.job(admin.id())? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_rewrap_job",
            "no rewrap job has run for this tenant",
        ));
    };
    let cp: Checkpoint = serde_json::from_str(&row.checkpoint).map_err(ApiError::internal)?;
    let mut remaining = 0;
    for s in cp.sources.iter().filter(|s| !s.exhausted) {
        let table = if s.name == SECRETS {
            SECRETS
        } else {
            SECRET_VERSIONS
        };
        remaining += SecretTable::new(app.shared.db.clone(), admin.id(), table)
            .count_after(s.cursor.as_deref())
            .await
            .unwrap_or(0);
    }
    Ok(Json(json!({
        "job_id": row.job_id,
        "status": row.status,
        "error": row.error,
        "target_version": cp.target_version,
        "started_at": cp.started_at,
        "lease_expires_at": cp.lease_expires_at,
        "batches": cp.batches,
        "completed": cp.completed,
        "totals": cp.totals(),
        "sources": cp.sources,
        "estimated_remaining": remaining,
    })))
}

async fn audit(State(app): State<App>, admin: Admin) -> ApiResult {
    let events = app.shared.db.audit(admin.id())?;
    Ok(Json(json!({ "events": events })))
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
        let current = db.current_secret(tenant, &name)?;
        let version = db.next_secret_version(tenant, &name)?;
        let ciphertext = keyring
            .encrypt(
                &secret_context(tenant, &name, version),
                req.value.as_bytes(),
            )
            .await?;
        let new = SecretRow {
            name: name.clone(),
            version,
            ciphertext,
        };
        // The previous value moves to the history table on the active
        // version, so no record lands behind a running job's cursor on an old one.
        let history = match &current {
            Some(c) => Some(upgraded(&keyring, tenant, c.clone()).await),
            None => None,
        };
        if db.replace_secret(
            tenant,
            current.as_ref(),
            &new,
            history.as_ref(),
            Timestamp::now().as_secs(),
        )? {
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
    let row = db.current_secret(tenant, &name)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            format!("no secret {name:?}"),
        )
    })?;
    let ctx = secret_context(tenant, &name, row.version);
    let read = decrypt_and_upgrade(&keyring, &ctx, &row.ciphertext).await?;
    if let Some(e) = &read.upgrade_error {
        eprintln!("tenant {tenant}: lazy rewrap of secret {name} skipped: {e}");
    }
    let mut on = key_version(&row.ciphertext);
    if let Some(new) = &read.upgraded {
        // Lazy rewrap: write back only if nobody changed the row meanwhile.
        if db.cas_secret(tenant, &name, &row.ciphertext, new)? {
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
    let current = db.current_secret(tenant, &name)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            format!("no secret {name:?}"),
        )
    })?;
    let previous = db
        .previous_secret(tenant, &name, current.version)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_previous_version",
                format!("secret {name:?} has no earlier version"),
            )
        })?;
    let restored = upgraded(&keyring, tenant, previous).await;
    let history = upgraded(&keyring, tenant, current.clone()).await;
    if !db.replace_secret(
        tenant,
        Some(&current),
        &restored,
        Some(&history),
        Timestamp::now().as_secs(),
    )? {
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
