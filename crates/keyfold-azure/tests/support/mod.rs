//! A fake Azure Key Vault (and Entra ID token endpoint) for the tests, served
//! over HTTPS on 127.0.0.1 inside the test process, talked to by the real SDK
//! client.
//!
//! # How faithful it is
//!
//! Faithful (checked against Key Vault's REST reference and the SDK's code):
//! - **TLS**: a test CA and a leaf certificate (`CA:FALSE`, SANs `localhost`,
//!   `127.0.0.1` and the fake vault's public host name) made with `rcgen` at
//!   start; the client trusts that CA only (`reqwest::ClientBuilder::tls_certs_only`).
//!   The SDK refuses bearer tokens over plain HTTP, so this is required.
//! - **Challenge flow**: a request without a valid bearer token gets 401 with
//!   `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/TENANT",
//!   resource="https://vault.azure.net"`; the SDK then asks its credential for
//!   `https://vault.azure.net/.default` and resends. The first, unauthenticated
//!   request must carry no body (the SDK withholds it): recorded in the log.
//! - **Paths and bodies**: `POST /keys/{name}/{version}/wrapkey|unwrapkey?api-version=…`
//!   (an empty version, `/keys/{name}//wrapkey`, means the latest), body
//!   `{"alg", "value"}` in unpadded base64url, answer `{"kid", "value"}` where
//!   `kid` names the vault's public URL and the version used;
//!   `GET /keys/{name}/{version}` answers the public JWK (`kty`, `n`, `e`).
//! - **Crypto**: real RSA-OAEP-256 (SHA-256, MGF1-SHA-256) under a distinct
//!   RSA-2048 key per version, and real RFC 3394 AES-256 key wrap for
//!   `oct-HSM` keys; a tampered or foreign blob fails as it would in Key Vault
//!   (400 `BadParameter`).
//! - **Versions**: rotating adds a version (32 hex digits) that becomes the
//!   latest; old versions keep unwrapping until disabled; a disabled RSA
//!   version still wraps (a public-key operation) but refuses to unwrap with
//!   403 `Forbidden` / inner `KeyDisabled`, as Key Vault does.
//! - **Errors**: Key Vault's JSON error shape `{"error":{"code","message","innererror"}}`;
//!   404 `KeyNotFound`; injected faults answer the next authorized key
//!   request(s) with 401 (with a fresh challenge), 403, 404, 429 with
//!   `Retry-After`, 500 or 503.
//! - **Entra ID**: `POST /{tenant}/oauth2/v2.0/token` checks the tenant, the
//!   client id, the client secret or the federated client assertion, and the
//!   scope, and answers a bearer token or Entra's `invalid_client` error.
//!
//! Not modelled: real token validation (a token is one fixed string),
//! RBAC, soft-delete and purge, key release, the `RSA-OAEP`/`RSA1_5`/`A128KW`
//! algorithms, request-size limits, HTTP/2, and Key Vault's per-vault
//! throttling thresholds (429 only when injected).
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test support shared by several test binaries; a broken fixture is a test failure"
)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use keyfold_azure::sdk::{
    AccessToken, OffsetDateTime, Secret, TokenCredential, TokenRequestOptions, Transport,
};
use keyfold_core::SecretKey;
use keyfold_core::config::AzureConfig;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The tenant the fake's challenge names.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The bearer token the fake accepts.
pub const TOKEN: &str = "fake-vault-access-token";
/// The scope the SDK must ask for after the challenge.
pub const SCOPE: &str = "https://vault.azure.net/.default";
/// The fake vault's public name (what a real vault's `kid`s name).
pub const VAULT_HOST: &str = "kftest.vault.azure.net";
/// The fake Managed HSM's public name.
pub const HSM_HOST: &str = "kftest.managedhsm.azure.net";

const RSA_POOL: usize = 4;

/// RSA-2048 keys, made once per test process (generation is the slow part).
fn rsa_pool() -> &'static Vec<rsa::PrivateKey> {
    static POOL: OnceLock<Vec<rsa::PrivateKey>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads: Vec<_> = (0..RSA_POOL)
            .map(|_| {
                std::thread::spawn(|| {
                    rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA key generation")
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

fn next_rsa_key() -> rsa::PrivateKey {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    rsa_pool()[NEXT.fetch_add(1, Ordering::Relaxed) % RSA_POOL].clone()
}

fn random_hex(len: usize) -> String {
    let bytes = SecretKey::generate().unwrap();
    bytes.expose()[..len / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Key material of one key version.
#[derive(Clone)]
pub enum Material {
    /// An RSA key (`kty` `RSA`).
    Rsa(Box<rsa::PrivateKey>),
    /// An AES-256 key (`kty` `oct-HSM`, Managed HSM only).
    Aes([u8; 32]),
}

#[derive(Clone)]
struct Version {
    id: String,
    material: Material,
    enabled: bool,
}

/// A fault injected into the next authorized key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and Key Vault's matching error body.
    Status(u16),
    /// 429 with `Retry-After: seconds`.
    Throttle {
        /// The `Retry-After` value.
        retry_after_secs: u64,
    },
    /// Serve the request, but name this `kid` in the answer (a vault or proxy
    /// answering for another key version).
    ReportKid(String),
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path (no query).
    pub path: String,
    /// Whether it carried the valid bearer token.
    pub authorized: bool,
    /// Body length.
    pub body_len: usize,
    /// The status answered.
    pub status: u16,
}

/// A token request the fake's Entra endpoint received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Tenant in the path.
    pub tenant: String,
    /// Form fields.
    pub form: HashMap<String, String>,
    /// Whether a token was issued.
    pub granted: bool,
}

#[derive(Default)]
struct State {
    public_url: String,
    keys: HashMap<String, Vec<Version>>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    /// client id -> accepted secret or federated assertion.
    clients: HashMap<String, String>,
    token_requests: Vec<TokenRequest>,
}

/// The fake vault. Stops serving when dropped.
pub struct FakeVault {
    addr: SocketAddr,
    ca_pem: String,
    public_url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVault {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeVault {
    /// A fake Key Vault named `https://kftest.vault.azure.net`.
    pub async fn start() -> Self {
        Self::start_named(VAULT_HOST).await
    }

    /// A fake Managed HSM named `https://kftest.managedhsm.azure.net`.
    pub async fn start_hsm() -> Self {
        Self::start_named(HSM_HOST).await
    }

    async fn start_named(host: &str) -> Self {
        let (tls, ca_pem) = tls_config(host);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let public_url = format!("https://{host}");
        let state = Arc::new(Mutex::new(State {
            public_url: public_url.clone(),
            ..State::default()
        }));
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let served = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let state = Arc::clone(&served);
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeVault {
            addr,
            ca_pem,
            public_url,
            state,
            task,
        }
    }

    /// `https://localhost:PORT`: the `endpoint_url` that reaches the fake.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The socket address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The vault's public URL, `https://kftest.vault.azure.net`.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The key URL (`kms_key_ref`) of `name`, unversioned.
    pub fn key_url(&self, name: &str) -> String {
        format!("{}/keys/{name}", self.public_url)
    }

    /// The test CA, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A transport trusting only the test CA, resolving the public host
    /// name and `localhost` to the fake, with no proxy.
    pub fn transport(&self) -> Transport {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let host = self.public_url.trim_start_matches("https://");
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .resolve(host, self.addr)
            // `localhost` may resolve to ::1 first; the fake listens on 127.0.0.1.
            .resolve("localhost", self.addr)
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        Transport::new(Arc::new(client))
    }

    /// Creates RSA key `name` with one version; returns the version.
    pub fn create_rsa_key(&self, name: &str) -> String {
        self.add_version(name, Material::Rsa(Box::new(next_rsa_key())))
    }

    /// Creates AES-256 key `name` (`oct-HSM`); returns the version.
    pub fn create_aes_key(&self, name: &str) -> String {
        let key = SecretKey::generate().unwrap();
        self.add_version(name, Material::Aes(*key.expose()))
    }

    /// Rotates `name`: a new version of the same type becomes the latest.
    pub fn rotate(&self, name: &str) -> String {
        let material = {
            let state = self.state.lock().unwrap();
            match &state.keys[name].last().unwrap().material {
                Material::Rsa(_) => None,
                Material::Aes(_) => Some(()),
            }
        };
        match material {
            None => self.add_version(name, Material::Rsa(Box::new(next_rsa_key()))),
            Some(()) => {
                let key = SecretKey::generate().unwrap();
                self.add_version(name, Material::Aes(*key.expose()))
            }
        }
    }

    fn add_version(&self, name: &str, material: Material) -> String {
        let id = random_hex(32);
        self.state
            .lock()
            .unwrap()
            .keys
            .entry(name.to_owned())
            .or_default()
            .push(Version {
                id: id.clone(),
                material,
                enabled: true,
            });
        id
    }

    /// Enables or disables one version.
    pub fn set_enabled(&self, name: &str, version: &str, enabled: bool) {
        let mut state = self.state.lock().unwrap();
        let v = state
            .keys
            .get_mut(name)
            .and_then(|vs| vs.iter_mut().find(|v| v.id == version))
            .expect("no such version");
        v.enabled = enabled;
    }

    /// Deletes key `name` and all its versions.
    pub fn delete(&self, name: &str) {
        self.state.lock().unwrap().keys.remove(name);
    }

    /// Queues faults for the next authorized key requests, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// Drops the faults not yet served; returns how many there were.
    pub fn clear_faults(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        let n = state.faults.len();
        state.faults.clear();
        n
    }

    /// Accepts `secret` (a client secret or a federated assertion) for `client_id`.
    pub fn register_client(&self, client_id: &str, secret: &str) {
        self.state
            .lock()
            .unwrap()
            .clients
            .insert(client_id.to_owned(), secret.to_owned());
    }

    /// Every key request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Every token request received so far.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().token_requests.clone()
    }

    /// A tenant's config for key `name` (the endpoint that reaches the fake
    /// is the operator's: see [`builder`]).
    pub fn config(&self, name: &str) -> AzureConfig {
        serde_json::from_value(json!({
            "kms_key_ref": self.key_url(name),
            "vault_url": self.public_url,
        }))
        .unwrap()
    }
}

/// A credential that hands out the fake's token and records the scopes asked.
#[derive(Debug, Default)]
pub struct TestCredential {
    /// Scopes of every token request.
    pub scopes: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl TokenCredential for TestCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.scopes
            .lock()
            .unwrap()
            .extend(scopes.iter().map(|s| (*s).to_owned()));
        Ok(AccessToken::new(
            Secret::new(TOKEN),
            OffsetDateTime::now_utc() + keyfold_azure::sdk::AzureDuration::hours(1),
        ))
    }
}

fn tls_config(host: &str) -> (ServerConfig, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keyfold-azure test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        host.to_owned(),
    ])
    .unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();

    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (config, ca.pem())
}

fn reply(status: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json; charset=utf-8")
        .header("x-ms-keyvault-service-version", "1.9.0.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn kv_error(status: u16, code: &str, message: &str, inner: Option<&str>) -> Response<Full<Bytes>> {
    let mut error = json!({ "code": code, "message": message });
    if let Some(inner) = inner {
        error["innererror"] = json!({ "code": inner });
    }
    reply(status, &json!({ "error": error }))
}

fn challenge() -> Response<Full<Bytes>> {
    let mut r = kv_error(
        401,
        "Unauthorized",
        "AKV10000: Request is missing a Bearer or PoP token.",
        None,
    );
    r.headers_mut().insert(
        "www-authenticate",
        format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"https://vault.azure.net\""
        )
        .parse()
        .unwrap(),
    );
    r
}

fn fault_response(fault: &Fault) -> Response<Full<Bytes>> {
    match fault {
        Fault::Throttle { retry_after_secs } => {
            let mut r = kv_error(
                429,
                "Throttled",
                "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
                None,
            );
            r.headers_mut()
                .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
            r
        }
        Fault::Status(401) => challenge(),
        Fault::Status(403) => kv_error(
            403,
            "Forbidden",
            "Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/keys/wrap/action'",
            Some("ForbiddenByRbac"),
        ),
        Fault::Status(404) => kv_error(
            404,
            "KeyNotFound",
            "A key with (name/id) was not found in this key vault.",
            None,
        ),
        Fault::Status(500) => kv_error(
            500,
            "InternalServerError",
            "An unexpected error occurred.",
            None,
        ),
        Fault::Status(503) => kv_error(
            503,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
            None,
        ),
        Fault::Status(other) => kv_error(*other, "Error", "injected fault", None),
        // Served by `key_request`, which answers the call itself.
        Fault::ReportKid(_) => kv_error(500, "Error", "unexpected fault", None),
    }
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .ok()
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return kv_error(400, "BadParameter", "unreadable body", None),
    };
    if method == Method::POST && path.ends_with("/oauth2/v2.0/token") {
        return token_endpoint(state, &path, &body);
    }
    let authorized = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
    let response = key_request(state, &method, &path, &query, authorized, &body);
    state.lock().unwrap().seen.push(Seen {
        method: method.to_string(),
        path,
        authorized,
        body_len: body.len(),
        status: response.status().as_u16(),
    });
    response
}

fn key_request(
    state: &Arc<Mutex<State>>,
    method: &Method,
    path: &str,
    query: &str,
    authorized: bool,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let Some(rest) = path.strip_prefix("/keys/") else {
        return kv_error(404, "NotFound", "no such collection", None);
    };
    if !authorized {
        return challenge();
    }
    if !query
        .split('&')
        .any(|p| p.starts_with("api-version=") && p.len() > 12)
    {
        return kv_error(
            400,
            "BadParameter",
            "The request URI contains an invalid or missing api-version.",
            None,
        );
    }
    let mut state = state.lock().unwrap();
    let mut report_kid = None;
    match state.faults.pop_front() {
        Some(Fault::ReportKid(kid)) => report_kid = Some(kid),
        Some(fault) => return fault_response(&fault),
        None => {}
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let (name, version, op) = match (method, parts.as_slice()) {
        (&Method::GET, [name]) => (*name, "", None),
        (&Method::GET, [name, version]) => (*name, *version, None),
        (&Method::POST, [name, version, op]) => (*name, *version, Some(*op)),
        _ => return kv_error(400, "BadParameter", "unsupported request", None),
    };
    let Some(versions) = state.keys.get(name) else {
        return kv_error(
            404,
            "KeyNotFound",
            &format!("A key with (name/id) {name} was not found in this key vault."),
            None,
        );
    };
    let found = if version.is_empty() {
        versions.last()
    } else {
        versions.iter().find(|v| v.id.eq_ignore_ascii_case(version))
    };
    let Some(v) = found.cloned() else {
        return kv_error(
            404,
            "KeyNotFound",
            &format!("A key with (name/id) {name}/{version} was not found in this key vault."),
            None,
        );
    };
    let kid = format!("{}/keys/{name}/{}", state.public_url, v.id);
    drop(state);
    let reported = report_kid.unwrap_or_else(|| kid.clone());
    match op {
        None => get_key(&kid, &v),
        Some(op @ ("wrapkey" | "unwrapkey")) => crypto(&reported, &v, op == "wrapkey", body),
        Some(_) => kv_error(400, "BadParameter", "unsupported operation", None),
    }
}

fn get_key(kid: &str, v: &Version) -> Response<Full<Bytes>> {
    let key = match &v.material {
        Material::Rsa(k) => json!({
            "kid": kid,
            "kty": "RSA",
            "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],
            "n": URL_SAFE_NO_PAD.encode(k.n_bytes()),
            "e": URL_SAFE_NO_PAD.encode(k.e_bytes()),
        }),
        Material::Aes(_) => json!({
            "kid": kid,
            "kty": "oct-HSM",
            "key_ops": ["wrapKey", "unwrapKey"],
        }),
    };
    reply(
        200,
        &json!({ "key": key, "attributes": { "enabled": v.enabled, "recoveryLevel": "Recoverable+Purgeable" } }),
    )
}

fn crypto(kid: &str, v: &Version, wrap: bool, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return kv_error(
            400,
            "BadParameter",
            "The request body is not valid JSON.",
            None,
        );
    };
    let alg = request["alg"].as_str().unwrap_or_default();
    let Some(value) = request["value"].as_str().and_then(b64_decode) else {
        return kv_error(
            400,
            "BadParameter",
            "Property 'value' is missing or not base64url.",
            None,
        );
    };
    let op_name = if wrap { "wrapKey" } else { "unwrapKey" };
    // Key Vault lets a disabled RSA key wrap (a public-key operation) but not
    // unwrap; a disabled AES key does neither.
    let blocked = !v.enabled && (!wrap || matches!(v.material, Material::Aes(_)));
    if blocked {
        return kv_error(
            403,
            "Forbidden",
            &format!("Operation {op_name} is not allowed on a disabled key."),
            Some("KeyDisabled"),
        );
    }
    let result = match (&v.material, alg) {
        (Material::Rsa(k), "RSA-OAEP-256") => {
            if wrap {
                k.to_public_key()
                    .oaep_encrypt::<rsa::sha2::Sha256>(&value)
                    .ok()
            } else {
                k.oaep_decrypt::<rsa::sha2::Sha256>(&value).ok()
            }
        }
        (Material::Aes(k), "A256KW") => {
            use aes_kw::KeyInit;
            let kw = aes_kw::KwAes256::new(k.into());
            let mut buf = vec![0u8; value.len() + 8];
            if wrap {
                kw.wrap_key(&value, &mut buf).ok().map(<[u8]>::to_vec)
            } else {
                kw.unwrap_key(&value, &mut buf).ok().map(<[u8]>::to_vec)
            }
        }
        _ => {
            return kv_error(
                400,
                "BadParameter",
                &format!("Algorithm {alg:?} is not supported for this key type."),
                None,
            );
        }
    };
    match result {
        Some(out) => reply(
            200,
            &json!({ "kid": kid, "value": URL_SAFE_NO_PAD.encode(out) }),
        ),
        None => kv_error(
            400,
            "BadParameter",
            &format!("Error {op_name}: the parameter is incorrect."),
            None,
        ),
    }
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn token_endpoint(state: &Arc<Mutex<State>>, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let tenant = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let form: HashMap<String, String> = std::str::from_utf8(body)
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    let mut state = state.lock().unwrap();
    let client = form.get("client_id").cloned().unwrap_or_default();
    let expected = state.clients.get(&client).cloned();
    let presented = form.get("client_secret").or_else(|| {
        (form.get("client_assertion_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"))
        .then(|| form.get("client_assertion"))
        .flatten()
    });
    let granted = tenant == TENANT
        && form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("scope").map(String::as_str) == Some(SCOPE)
        && expected.is_some()
        && presented == expected.as_ref();
    state.token_requests.push(TokenRequest {
        tenant,
        form,
        granted,
    });
    if granted {
        reply(
            200,
            &json!({ "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN }),
        )
    } else {
        reply(
            401,
            &json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
                "error_codes": [7000215],
            }),
        )
    }
}

/// A clock that records the waits asked of it and returns at once.
#[derive(Debug, Default)]
pub struct RecordingSleeper {
    /// Every wait, in order.
    pub waits: Mutex<Vec<Duration>>,
}

impl keyfold_azure::Sleeper for RecordingSleeper {
    fn sleep(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        self.waits.lock().unwrap().push(duration);
        Box::pin(std::future::ready(()))
    }
}

/// A wrapper for key `name` of `vault`, reached through the operator's
/// endpoint override on `localhost` (the loopback test switch on, the
/// challenge-resource check off), authenticated by a [`TestCredential`],
/// waiting on a [`RecordingSleeper`].
pub fn wrapper(vault: &FakeVault, name: &str) -> keyfold_azure::AzureKeyWrapper {
    builder(vault, &vault.config(name)).build().unwrap()
}

/// The builder [`wrapper`] uses, for `config`.
pub fn builder(vault: &FakeVault, config: &AzureConfig) -> keyfold_azure::AzureKeyWrapperBuilder {
    keyfold_azure::AzureKeyWrapper::builder(config)
        .endpoint_url(vault.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .credential(Arc::new(TestCredential::default()))
        .transport(vault.transport())
        .verify_challenge_resource(false)
        .sleeper(Arc::new(RecordingSleeper::default()))
}
